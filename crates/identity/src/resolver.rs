//! The resolver: DID documents over HTTP, handles over DNS and HTTPS, both cached.

use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use atpdb_net::{Http, NetError};
use atpdb_repo::syntax::{Did, Handle};
use hickory_resolver::TokioResolver;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HOST};

use crate::cache::{Answer, Cache, Lifetimes, Start, Weigh};
use crate::{Identity, IdentityError};

/// Largest DID document read, in bytes; a larger one is [`IdentityError::Invalid`]. Real
/// documents are about a kilobyte; the cap keeps a hostile did:web host from filling memory.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// Largest `/.well-known/atproto-did` body read: a DID (at most 2048 bytes) and whitespace.
const MAX_WELL_KNOWN_BYTES: usize = 4096;

/// Settings of a [`Resolver`].
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The PLC directory, `https://plc.directory` by default (a mirror or the devnet's
    /// directory otherwise).
    pub plc_url: String,
    /// How long a resolved identity or handle is served from the cache: 24 h, the longest
    /// the identity spec recommends.
    pub hit_ttl: Duration,
    /// How long a failure (not found, invalid, unreachable) is served from the cache: 2 min,
    /// so a burst of events for a broken identity asks once, and a fixed one recovers soon.
    pub miss_ttl: Duration,
    /// Most entries in each of the two caches (DIDs, handles); least recently used entries
    /// are evicted first. 0 caches nothing.
    pub capacity: usize,
    /// Approximate bytes each cache may hold, documents included; evicts like `capacity`.
    pub max_cache_bytes: usize,
    /// How long one lookup (one DID document, or one handle over DNS then HTTPS) may take.
    pub timeout: Duration,
    /// The scheme of did:web and handle `/.well-known` URLs: `https`; tests set `http` to
    /// reach a loopback server.
    pub did_web_scheme: String,
    /// The DNS server asked for `_atproto` TXT records; `None` uses the system's
    /// (`/etc/resolv.conf`). Tests point it at a loopback responder.
    pub dns_nameserver: Option<SocketAddr>,
    /// Dial this address for every handle's `/.well-known/atproto-did`, sending the handle
    /// as `Host`; `None` dials the handle's own host. For tests, whose handles cannot
    /// resolve to a loopback server; the network guard still applies to the address.
    pub handle_well_known_addr: Option<SocketAddr>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            plc_url: "https://plc.directory".to_owned(),
            hit_ttl: Duration::from_secs(24 * 60 * 60),
            miss_ttl: Duration::from_secs(2 * 60),
            capacity: 1_000_000,
            max_cache_bytes: 1 << 30,
            timeout: Duration::from_secs(10),
            did_web_scheme: "https".to_owned(),
            dns_nameserver: None,
            handle_well_known_addr: None,
        }
    }
}

/// Resolves DIDs to [`Identity`]s and handles to DIDs, caching both; cheap to clone, and
/// clones share the caches.
///
/// Every request goes through the given [`Http`], so the network guard decides which
/// addresses may be dialled: a did:web or handle naming a loopback or private host is
/// refused with [`IdentityError::Net`] unless private networks are allowed.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    /// `plc_url` without a trailing slash.
    plc_url: String,
    config: IdentityConfig,
    http: Http,
    dids: Mutex<Cache<Did, Arc<Identity>>>,
    handles: Mutex<Cache<Handle, Did>>,
    /// Built on first use, so that a resolver that never resolves a handle never reads the
    /// system's DNS configuration (and cannot fail on it).
    dns: OnceLock<Result<TokioResolver, String>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("plc_url", &self.inner.plc_url)
            .field("cache_len", &self.cache_len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Resolver {
    /// A resolver dialling through `http`.
    ///
    /// # Errors
    ///
    /// [`IdentityError::Net`] with [`NetError::BadUrl`] when `plc_url` is not an http(s)
    /// URL or `did_web_scheme` is neither `http` nor `https`.
    pub fn new(config: IdentityConfig, http: Http) -> Result<Resolver, IdentityError> {
        let plc_url = config.plc_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&plc_url).map_err(|err| NetError::BadUrl {
            url: config.plc_url.clone(),
            reason: err.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(NetError::BadUrl {
                url: config.plc_url.clone(),
                reason: "the PLC directory must be an http(s) URL with a host".to_owned(),
            }
            .into());
        }
        if !matches!(config.did_web_scheme.as_str(), "http" | "https") {
            return Err(NetError::BadUrl {
                url: config.did_web_scheme.clone(),
                reason: "the did:web scheme must be http or https".to_owned(),
            }
            .into());
        }
        Ok(Resolver {
            inner: Arc::new(Inner {
                plc_url,
                dids: Mutex::new(Cache::new(config.capacity, config.max_cache_bytes)),
                handles: Mutex::new(Cache::new(config.capacity, config.max_cache_bytes)),
                config,
                http,
                dns: OnceLock::new(),
            }),
        })
    }

    /// The identity of `did`, from the cache while its answer lives (failures included).
    ///
    /// When the directory cannot be reached but the DID resolved before (even if that
    /// answer expired or was purged), the old identity is returned, with a warning logged.
    ///
    /// # Errors
    ///
    /// [`IdentityError::NotFound`], [`IdentityError::Invalid`], [`IdentityError::Unsupported`],
    /// [`IdentityError::Unreachable`] (transient) or [`IdentityError::Net`] (refused).
    pub async fn resolve(&self, did: &Did) -> Result<Arc<Identity>, IdentityError> {
        self.lookup(&self.inner.dids, did, false, || self.fetch_identity(did))
            .await
    }

    /// Purges `did`, then resolves it again: what an `#identity` event or a signature that
    /// no longer verifies calls for.
    ///
    /// When the directory cannot be reached and an old value exists, returns the old value
    /// (a flaky directory must not stop a relay), with a warning logged. A lookup of the same
    /// DID already in flight is not joined, and its answer is not cached: it may predate the
    /// change that made the caller refresh. The handles the old and new documents claim are
    /// purged too, so that [`Resolver::verified_handle`] checks them again.
    ///
    /// # Errors
    ///
    /// As [`Resolver::resolve`].
    pub async fn refresh(&self, did: &Did) -> Result<Arc<Identity>, IdentityError> {
        self.purge(did);
        let answer = self
            .lookup(&self.inner.dids, did, true, || self.fetch_identity(did))
            .await;
        if let Ok(identity) = &answer
            && let Some(handle) = &identity.handle
        {
            lock(&self.inner.handles).purge(handle);
        }
        answer
    }

    /// Forgets the cached answer for `did` (and for the handle its document claimed). The
    /// last good identity is kept only as a fallback for when the directory cannot be
    /// reached. A lookup in flight still answers its callers but is not cached.
    pub fn purge(&self, did: &Did) {
        let old_handle = {
            let mut dids = lock(&self.inner.dids);
            let old = dids.last_good(did);
            dids.purge(did);
            old.and_then(|identity| identity.handle.clone())
        };
        if let Some(handle) = old_handle {
            lock(&self.inner.handles).purge(&handle);
        }
    }

    /// The DID `handle` points at: the `_atproto.<handle>` DNS TXT record `did=<did>` first,
    /// then `https://<handle>/.well-known/atproto-did`. Cached like DIDs.
    ///
    /// This is one direction only; [`Resolver::verified_handle`] checks both.
    ///
    /// # Errors
    ///
    /// [`IdentityError::Handle`] when it does not resolve (no record, a reserved TLD,
    /// several DIDs in DNS, a malformed answer), [`IdentityError::HandleUnreachable`] when it
    /// could not be found out, [`IdentityError::Net`] when the guard refused the host.
    pub async fn resolve_handle(&self, handle: &Handle) -> Result<Did, IdentityError> {
        self.lookup(&self.inner.handles, handle, false, || {
            self.fetch_handle(handle)
        })
        .await
    }

    /// The identity's handle if it verifies both ways: the document claims it
    /// (`alsoKnownAs`) and the handle resolves back to this DID. `None` otherwise (callers
    /// show `handle.invalid`), including when the handle could not be resolved.
    pub async fn verified_handle(&self, identity: &Identity) -> Option<Handle> {
        let handle = identity.handle.as_ref()?;
        match self.resolve_handle(handle).await {
            Ok(did) if did == identity.did => Some(handle.clone()),
            Ok(did) => {
                tracing::debug!(did = %identity.did, %handle, points_at = %did,
                    "identity: handle points at another DID");
                None
            }
            Err(err) => {
                tracing::debug!(did = %identity.did, %handle, %err, "identity: handle does not resolve");
                None
            }
        }
    }

    /// Entries held in the DID and handle caches together (each is bounded by `capacity`),
    /// counting expired and purged entries not evicted yet.
    pub fn cache_len(&self) -> usize {
        lock(&self.inner.dids).len() + lock(&self.inner.handles).len()
    }
}

// ---------------------------------------------------------------------------------------------
// Cached lookups.

/// Removes a flight whose leader was dropped before it settled, so followers start over.
struct Abandon<'a, K: Hash + Eq + Clone + std::fmt::Display + Weigh, V: Clone + Weigh> {
    cache: &'a Mutex<Cache<K, V>>,
    key: &'a K,
    flight: Option<Arc<crate::cache::Flight<V>>>,
}

impl<K: Hash + Eq + Clone + std::fmt::Display + Weigh, V: Clone + Weigh> Drop
    for Abandon<'_, K, V>
{
    fn drop(&mut self) {
        if let Some(flight) = self.flight.take() {
            lock(self.cache).abandon(self.key, &flight);
        }
    }
}

impl Resolver {
    fn lifetimes(&self) -> Lifetimes {
        Lifetimes {
            hit: self.inner.config.hit_ttl,
            miss: self.inner.config.miss_ttl,
        }
    }

    /// The cached answer for `key`, or the answer of a lookup in flight, or `fetch`'s.
    async fn lookup<K, V, F, Fut>(
        &self,
        cache: &Mutex<Cache<K, V>>,
        key: &K,
        fresh: bool,
        fetch: F,
    ) -> Answer<V>
    where
        K: Hash + Eq + Clone + std::fmt::Display + Weigh,
        V: Clone + Weigh,
        F: Fn() -> Fut,
        Fut: Future<Output = Answer<V>>,
    {
        let mut fresh = fresh;
        loop {
            let start = lock(cache).start(key, fresh, Instant::now());
            match start {
                Start::Cached(answer) => return answer,
                Start::Follow(mut receiver) => {
                    // The leader's lookup is bounded by the timeout, but its caller may stop
                    // polling it without dropping it: then stop waiting and look it up anew.
                    let patience = self.inner.config.timeout.saturating_mul(2);
                    let answer =
                        match tokio::time::timeout(patience, receiver.wait_for(Option::is_some))
                            .await
                        {
                            Ok(Ok(answer)) => answer.clone(),
                            Ok(Err(_)) => None,
                            Err(_) => {
                                fresh = true;
                                None
                            }
                        };
                    if let Some(answer) = answer {
                        return answer;
                    }
                    // The leader was dropped or stalled before answering: try again, leading.
                }
                Start::Lead(flight) => {
                    let mut guard = Abandon {
                        cache,
                        key,
                        flight: Some(flight.clone()),
                    };
                    let found = fetch().await;
                    guard.flight = None;
                    return lock(cache).settle(
                        key,
                        &flight,
                        found,
                        self.lifetimes(),
                        Instant::now(),
                    );
                }
            }
        }
    }
}

impl Weigh for Did {
    fn weigh(&self) -> usize {
        self.as_str().len()
    }
}

impl Weigh for Handle {
    fn weigh(&self) -> usize {
        self.as_str().len()
    }
}

impl Weigh for Arc<Identity> {
    fn weigh(&self) -> usize {
        // The key is a fixed-size struct; the rest is heap.
        128 + self.did.as_str().len()
            + self.pds.len()
            + self
                .handle
                .as_ref()
                .map_or(0, |handle| handle.as_str().len())
            + json_weight(&self.document)
    }
}

/// Approximate heap bytes of a JSON value. Documents come from `serde_json`, whose parser
/// stops at 128 levels of nesting, which bounds the recursion.
fn json_weight(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 16,
        Value::String(text) => 24 + text.len(),
        Value::Array(items) => 24 + items.iter().map(json_weight).sum::<usize>(),
        Value::Object(map) => {
            48 + map
                .iter()
                .map(|(key, value)| 48 + key.len() + json_weight(value))
                .sum::<usize>()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DID documents.

/// Whether `identifier` is a did:plc identifier: 24 characters of base32 (`a-z2-7`).
/// Checked before it goes into a URL path.
fn is_plc_identifier(identifier: &str) -> bool {
    identifier.len() == 24
        && identifier
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

/// `host` or `host:port` of a did:web identifier: a hostname with an optional `%3A`-encoded
/// port, no path (`:`-separated segments) and nothing else percent-encoded.
fn did_web_authority(identifier: &str) -> Option<String> {
    let lower = identifier.to_ascii_lowercase();
    let (host, port) = match lower.split_once("%3a") {
        Some((host, port)) => (host, Some(port)),
        None => (lower.as_str(), None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !host.starts_with(['.', '-'])
        && !host.ends_with(['.', '-']);
    if !host_ok {
        return None;
    }
    match port {
        None => Some(host.to_owned()),
        Some(port) => {
            let number: u16 = port.parse().ok().filter(|&n| n > 0)?;
            port.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| format!("{host}:{number}"))
        }
    }
}

impl Resolver {
    /// Where the DID's document is served.
    fn document_url(&self, did: &Did) -> Result<String, IdentityError> {
        match did.method() {
            "plc" if is_plc_identifier(did.identifier()) => {
                Ok(format!("{}/{did}", self.inner.plc_url))
            }
            "plc" => Err(IdentityError::Invalid {
                did: did.clone(),
                reason: "a did:plc identifier is 24 characters of base32 (a-z, 2-7)".to_owned(),
            }),
            "web" => match did_web_authority(did.identifier()) {
                Some(authority) => Ok(format!(
                    "{}://{authority}/.well-known/did.json",
                    self.inner.config.did_web_scheme
                )),
                None => Err(IdentityError::Unsupported { did: did.clone() }),
            },
            _ => Err(IdentityError::Unsupported { did: did.clone() }),
        }
    }

    /// One GET of the DID's document, read and checked.
    async fn fetch_identity(&self, did: &Did) -> Answer<Arc<Identity>> {
        let url = self.document_url(did)?;
        let request = self
            .inner
            .http
            .get(&url)?
            .header(ACCEPT, "application/did+ld+json, application/json");
        let timeout = self.inner.config.timeout;
        let fetched = tokio::time::timeout(timeout, get_capped(request, MAX_DOCUMENT_BYTES))
            .await
            .unwrap_or(Err(FetchError::Timeout(timeout)));
        let unreachable = |reason: String| IdentityError::Unreachable {
            did: did.clone(),
            reason: format!("GET {url}: {reason}"),
        };
        let invalid = |reason: String| IdentityError::Invalid {
            did: did.clone(),
            reason: format!("GET {url}: {reason}"),
        };
        let body = match fetched {
            Ok(Fetched::Body(body)) => body,
            Ok(Fetched::Status(status))
                if status == StatusCode::NOT_FOUND || status == StatusCode::GONE =>
            {
                return Err(IdentityError::NotFound { did: did.clone() });
            }
            Ok(Fetched::Status(status)) if is_transient_status(status) => {
                return Err(unreachable(format!("HTTP {status}")));
            }
            Ok(Fetched::Status(status)) => return Err(invalid(format!("HTTP {status}"))),
            Err(FetchError::Net(err)) => return Err(IdentityError::Net(err)),
            Err(FetchError::TooLarge) => {
                return Err(invalid(format!(
                    "document larger than {MAX_DOCUMENT_BYTES} bytes"
                )));
            }
            Err(err @ (FetchError::Transport(_) | FetchError::Timeout(_))) => {
                return Err(unreachable(err.to_string()));
            }
        };
        let document: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|err| invalid(format!("document is not JSON: {err}")))?;
        Identity::from_document(did, document)
            .map(Arc::new)
            .map_err(|reason| IdentityError::Invalid {
                did: did.clone(),
                reason,
            })
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// What a GET brought back.
enum Fetched {
    /// A success status, and the body.
    Body(Vec<u8>),
    /// Any other status; the body is not read.
    Status(StatusCode),
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// The guard refused the request (a redirect, or a name resolving to a private address).
    #[error(transparent)]
    Net(NetError),
    #[error("{0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("body larger than the limit")]
    TooLarge,
}

/// 5xx but 501 (the spec's "do not retry"), 408 and 429: asking later may work.
fn is_transient_status(status: StatusCode) -> bool {
    (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// Sends `request` and reads a success body of at most `cap` bytes, chunk by chunk, so a
/// huge or endless body costs at most `cap` bytes of memory.
async fn get_capped(request: reqwest::RequestBuilder, cap: usize) -> Result<Fetched, FetchError> {
    let mut response = request.send().await.map_err(send_error)?;
    let status = response.status();
    if !status.is_success() {
        return Ok(Fetched::Status(status));
    }
    if response
        .content_length()
        .is_some_and(|length| length > cap as u64)
    {
        return Err(FetchError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(send_error)? {
        if body.len() + chunk.len() > cap {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched::Body(body))
}

/// A guard refusal found anywhere in the error's chain, else the chain as text.
fn send_error(err: reqwest::Error) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    let mut text = Vec::new();
    while let Some(current) = source {
        if let Some(net) = current.downcast_ref::<NetError>() {
            return FetchError::Net(net.clone());
        }
        let line = current.to_string();
        if !text.iter().any(|seen: &String| seen.contains(&line)) {
            text.push(line);
        }
        source = current.source();
    }
    FetchError::Transport(text.join(": "))
}

// ---------------------------------------------------------------------------------------------
// Handles.

/// Why one method (DNS or HTTPS) found no DID for a handle.
enum Miss {
    /// The method answered: nothing there (or nothing usable).
    Absent(String),
    /// The method could not be asked.
    Failed(String),
}

impl Resolver {
    /// DNS, then HTTPS, within the configured timeout.
    async fn fetch_handle(&self, handle: &Handle) -> Answer<Did> {
        if handle.has_disallowed_tld() {
            return Err(IdentityError::Handle {
                handle: handle.clone(),
                reason: "reserved top-level domain; such handles are never resolved".to_owned(),
            });
        }
        let timeout = self.inner.config.timeout;
        match tokio::time::timeout(timeout, self.handle_both_ways(handle)).await {
            Ok(answer) => answer,
            Err(_) => Err(IdentityError::HandleUnreachable {
                handle: handle.clone(),
                reason: format!("no answer within {timeout:?}"),
            }),
        }
    }

    async fn handle_both_ways(&self, handle: &Handle) -> Answer<Did> {
        let dns = match self.handle_from_dns(handle).await {
            Ok(did) => return Ok(did),
            Err(IdentityError::Handle { reason, .. }) => Miss::Absent(reason),
            Err(IdentityError::HandleUnreachable { reason, .. }) => Miss::Failed(reason),
            Err(other) => return Err(other),
        };
        let https = match self.handle_from_well_known(handle).await {
            Ok(did) => return Ok(did),
            Err(IdentityError::Handle { reason, .. }) => Miss::Absent(reason),
            Err(IdentityError::HandleUnreachable { reason, .. }) => Miss::Failed(reason),
            Err(other) => return Err(other),
        };
        let handle = handle.clone();
        match (dns, https) {
            (Miss::Absent(dns), Miss::Absent(https)) => Err(IdentityError::Handle {
                handle,
                reason: format!("{dns}; {https}"),
            }),
            (Miss::Absent(dns) | Miss::Failed(dns), Miss::Absent(https) | Miss::Failed(https)) => {
                Err(IdentityError::HandleUnreachable {
                    handle,
                    reason: format!("{dns}; {https}"),
                })
            }
        }
    }

    /// The DNS resolver, built on first use.
    fn dns(&self) -> Result<&TokioResolver, String> {
        self.inner
            .dns
            .get_or_init(|| build_dns(&self.inner.config))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// `_atproto.<handle>` TXT: `Ok` with the one DID named by `did=` records, `Handle` when
    /// there is none (or several different ones), `HandleUnreachable` when DNS failed.
    async fn handle_from_dns(&self, handle: &Handle) -> Answer<Did> {
        use hickory_resolver::proto::rr::RData;

        let name = format!("_atproto.{handle}.");
        let absent = |reason: String| IdentityError::Handle {
            handle: handle.clone(),
            reason,
        };
        let failed = |reason: String| IdentityError::HandleUnreachable {
            handle: handle.clone(),
            reason,
        };
        let dns = self
            .dns()
            .map_err(|reason| failed(format!("DNS resolver: {reason}")))?;
        let lookup = match dns.txt_lookup(name.as_str()).await {
            Ok(lookup) => lookup,
            Err(err) if err.is_no_records_found() || err.is_nx_domain() => {
                return Err(absent(format!("no TXT record at {name}")));
            }
            Err(err) => return Err(failed(format!("DNS TXT {name}: {err}"))),
        };
        let mut found: Vec<Did> = Vec::new();
        for record in lookup.answers() {
            let RData::TXT(txt) = &record.data else {
                continue;
            };
            let text: Vec<u8> = txt.txt_data.iter().flatten().copied().collect();
            let Some(did) = std::str::from_utf8(&text)
                .ok()
                .and_then(|text| text.strip_prefix("did="))
                .and_then(|did| did.parse::<Did>().ok())
            else {
                continue;
            };
            if !found.contains(&did) {
                found.push(did);
            }
        }
        match found.as_slice() {
            [] => Err(absent(format!("no did= TXT record at {name}"))),
            [did] => Ok(did.clone()),
            several => Err(absent(format!(
                "TXT records at {name} name {} different DIDs",
                several.len()
            ))),
        }
    }

    /// `GET <scheme>://<handle>/.well-known/atproto-did`: a DID as plain text.
    async fn handle_from_well_known(&self, handle: &Handle) -> Answer<Did> {
        let scheme = &self.inner.config.did_web_scheme;
        let url = match self.inner.config.handle_well_known_addr {
            Some(addr) => format!("{scheme}://{addr}/.well-known/atproto-did"),
            None => format!("{scheme}://{handle}/.well-known/atproto-did"),
        };
        let mut request = self.inner.http.get(&url)?.header(ACCEPT, "text/plain");
        if self.inner.config.handle_well_known_addr.is_some() {
            request = request.header(HOST, handle.as_str());
        }
        let absent = |reason: String| IdentityError::Handle {
            handle: handle.clone(),
            reason: format!("GET {url}: {reason}"),
        };
        let failed = |reason: String| IdentityError::HandleUnreachable {
            handle: handle.clone(),
            reason: format!("GET {url}: {reason}"),
        };
        let body = match get_capped(request, MAX_WELL_KNOWN_BYTES).await {
            Ok(Fetched::Body(body)) => body,
            Ok(Fetched::Status(status)) if is_transient_status(status) => {
                return Err(failed(format!("HTTP {status}")));
            }
            Ok(Fetched::Status(status)) => return Err(absent(format!("HTTP {status}"))),
            Err(FetchError::Net(err)) => return Err(IdentityError::Net(err)),
            Err(FetchError::TooLarge) => {
                return Err(absent(format!(
                    "body larger than {MAX_WELL_KNOWN_BYTES} bytes"
                )));
            }
            Err(err @ (FetchError::Transport(_) | FetchError::Timeout(_))) => {
                return Err(failed(err.to_string()));
            }
        };
        let text =
            std::str::from_utf8(&body).map_err(|_| absent("body is not UTF-8".to_owned()))?;
        text.trim()
            .parse::<Did>()
            .map_err(|err| absent(format!("body is not a DID: {err}")))
    }
}

/// A DNS resolver asking `dns_nameserver` over UDP, or the system's servers. Its own
/// timeouts are a quarter of the lookup's, so HTTPS still gets its turn after a DNS
/// timeout. Its own cache is off: answers are cached above it, and a DNS TTL must not
/// outlive a [`Resolver::refresh`].
fn build_dns(config: &IdentityConfig) -> Result<TokioResolver, String> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;

    let mut builder = match config.dns_nameserver {
        Some(addr) => {
            let mut connection = ConnectionConfig::udp();
            connection.port = addr.port();
            let server = NameServerConfig::new(addr.ip(), true, vec![connection]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()
            .map_err(|err| format!("reading the system DNS configuration: {err}"))?,
    };
    let options = builder.options_mut();
    options.timeout = (config.timeout / 4).max(Duration::from_millis(100));
    options.attempts = 2;
    options.cache_size = 0;
    options.positive_max_ttl = Some(Duration::ZERO);
    options.negative_max_ttl = Some(Duration::ZERO);
    builder.build().map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if the resolver can be shared and its futures spawned.
    #[allow(dead_code)]
    fn resolver_and_futures_are_send(
        resolver: &Resolver,
        did: &Did,
        handle: &Handle,
        identity: &Identity,
    ) {
        fn send<T: Send>(_: T) {}
        fn shared<T: Send + Sync + Clone + 'static>() {}
        shared::<Resolver>();
        send(resolver.resolve(did));
        send(resolver.refresh(did));
        send(resolver.resolve_handle(handle));
        send(resolver.verified_handle(identity));
    }

    #[test]
    fn did_web_authorities() {
        for (identifier, expected) in [
            ("example.com", Some("example.com")),
            ("Example.COM", Some("example.com")),
            ("localhost%3A8080", Some("localhost:8080")),
            ("127.0.0.1%3a1234", Some("127.0.0.1:1234")),
            ("example.com:user:alice", None),
            ("example.com%2Fpath", None),
            ("example.com%3A", None),
            ("example.com%3A0", None),
            ("example.com%3A99999", None),
            ("example.com%3A+80", None),
            ("exa_mple.com", None),
            (".example.com", None),
            ("example.com.", None),
        ] {
            assert_eq!(
                did_web_authority(identifier).as_deref(),
                expected,
                "{identifier}"
            );
        }
    }

    #[test]
    fn plc_identifiers() {
        assert!(is_plc_identifier("7iza6de2dwap2sbkpav7c6c6"));
        for bad in [
            "7iza6de2dwap2sbkpav7c6c",
            "7iza6de2dwap2sbkpav7c6c61",
            "7iza6de2dwap2sbkpav7c6c1",
            "7IZA6DE2DWAP2SBKPAV7C6C6",
            "..%2F..%2Fadminxxxxxxxx",
        ] {
            assert!(!is_plc_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn config_is_checked() -> Result<(), Box<dyn std::error::Error>> {
        let http = Http::new(&atpdb_net::HttpConfig::default())?;
        for config in [
            IdentityConfig {
                plc_url: "plc.directory".to_owned(),
                ..IdentityConfig::default()
            },
            IdentityConfig {
                plc_url: "file:///etc".to_owned(),
                ..IdentityConfig::default()
            },
            IdentityConfig {
                did_web_scheme: "ftp".to_owned(),
                ..IdentityConfig::default()
            },
        ] {
            assert!(matches!(
                Resolver::new(config, http.clone()),
                Err(IdentityError::Net(NetError::BadUrl { .. }))
            ));
        }
        let resolver = Resolver::new(
            IdentityConfig {
                plc_url: "https://plc.example.com/".to_owned(),
                ..IdentityConfig::default()
            },
            http,
        )?;
        assert_eq!(resolver.inner.plc_url, "https://plc.example.com");
        Ok(())
    }
}
