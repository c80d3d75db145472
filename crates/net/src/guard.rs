//! The SSRF guard and the one HTTP client every crate dials through.
//!
//! Names are checked after DNS resolution (a public-looking name may resolve to 10.0.0.1), by
//! a reqwest resolver that drops non-public addresses; IP literals never reach a resolver, so
//! URLs are checked before each request and on each redirect.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// What went wrong talking to another host.
///
/// Retry policy hangs on [`NetError::is_transient`]: a transient error (5xx, 429, a timeout,
/// a dropped connection) may go away if asked again later; a permanent one (a refused
/// address, a 4xx, a malformed answer) will not.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The URL does not parse or is not http(s).
    #[error("bad URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it is refused.
        reason: String,
    },
    /// The host is, or resolves only to, an address the guard refuses.
    #[error(
        "{host} is a loopback, private, link-local or multicast address; \
         refused (allow with --allow-private-network / ATPDB_ALLOW_PRIVATE_NETWORK=true)"
    )]
    PrivateAddress {
        /// The host name or address.
        host: String,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(String),
    /// The host answered an XRPC error: a JSON body `{"error": .., "message": ..}`.
    #[error("{method} at {host}: HTTP {status}{}", xrpc_suffix(.error, .message))]
    Xrpc {
        /// The host's base URL.
        host: String,
        /// The XRPC method (NSID).
        method: String,
        /// The HTTP status.
        status: u16,
        /// The XRPC error name, e.g. `RepoNotFound`.
        error: Option<String>,
        /// The host's explanation.
        message: Option<String>,
    },
    /// The host (or a proxy in front of it) answered an error status without an XRPC body.
    #[error("{method} at {host}: HTTP {status}: {body}")]
    Http {
        /// The host's base URL.
        host: String,
        /// The XRPC method (NSID).
        method: String,
        /// The HTTP status.
        status: u16,
        /// A short description of the body: `HTML error page "502 Bad Gateway"`, or its first
        /// 200 bytes.
        body: String,
    },
    /// The host kept answering 429 after every retry.
    #[error("{host} is rate limiting us; it asked to wait {retry_after:?}")]
    RateLimited {
        /// The host's base URL.
        host: String,
        /// How long the host asked us to wait (or the backoff used when it did not say),
        /// capped at the configured maximum wait.
        retry_after: std::time::Duration,
    },
    /// An operation did not finish in time.
    #[error("{host}: timed out {what}")]
    Timeout {
        /// The host's base URL.
        host: String,
        /// What was being waited for, e.g. `reading the getRepo body (no data for 30s)`.
        what: String,
    },
    /// The connection failed (refused, reset, closed mid-body, TLS or DNS failure).
    #[error("{host}: {reason}")]
    Transport {
        /// The host's base URL.
        host: String,
        /// What failed, with the underlying errors.
        reason: String,
    },
    /// The response is larger than allowed; it was refused or cut.
    #[error("{host}: response larger than the limit of {limit} bytes")]
    TooLarge {
        /// The host's base URL.
        host: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// A success response that does not parse or breaks the lexicon.
    #[error("{method} at {host}: bad response: {reason}")]
    BadResponse {
        /// The host's base URL.
        host: String,
        /// The XRPC method (NSID).
        method: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn xrpc_suffix(error: &Option<String>, message: &Option<String>) -> String {
    match (error, message) {
        (Some(error), Some(message)) => format!(" {error}: {message}"),
        (Some(error), None) => format!(" {error}"),
        (None, Some(message)) => format!(": {message}"),
        (None, None) => String::new(),
    }
}

/// XRPC errors that say the host will not serve this repository (now): the account is
/// unknown, taken down, deactivated or suspended. The sync engine stops fetching it rather
/// than retrying.
const REPO_UNAVAILABLE: [&str; 5] = [
    "RepoNotFound",
    "RepoTakendown",
    "RepoDeactivated",
    "RepoSuspended",
    "RepoDeleted",
];

impl NetError {
    /// Whether asking again later may succeed: 5xx (but 501), 408, 429, timeouts and
    /// connection failures. Refused addresses, other 4xx, oversized and malformed answers
    /// are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            NetError::Xrpc { status, .. } | NetError::Http { status, .. } => {
                is_transient_status(*status)
            }
            NetError::RateLimited { .. }
            | NetError::Timeout { .. }
            | NetError::Transport { .. } => true,
            NetError::BadUrl { .. }
            | NetError::PrivateAddress { .. }
            | NetError::Client(_)
            | NetError::TooLarge { .. }
            | NetError::BadResponse { .. } => false,
        }
    }

    /// The XRPC error name when the host says it will not serve the repository
    /// (`RepoNotFound`, `RepoTakendown`, `RepoDeactivated`, `RepoSuspended`, `RepoDeleted`).
    pub fn repo_unavailable(&self) -> Option<&str> {
        match self {
            NetError::Xrpc {
                error: Some(error), ..
            } if REPO_UNAVAILABLE.contains(&error.as_str()) => Some(error),
            _ => None,
        }
    }

    /// Whether the host definitely does not serve the repository (see
    /// [`NetError::repo_unavailable`]), as opposed to "could not find out".
    pub fn is_not_found(&self) -> bool {
        self.repo_unavailable().is_some()
    }

    /// The `NetError` inside an `io::Error` returned by a [`crate::RepoBody`] read, if any.
    pub fn from_io(err: &std::io::Error) -> Option<&NetError> {
        err.get_ref()?.downcast_ref::<NetError>()
    }
}

/// 5xx but 501 (the spec's "do not retry"), 408 and 429.
pub(crate) fn is_transient_status(status: u16) -> bool {
    (status >= 500 && status != 501) || status == 408 || status == 429
}

/// Settings of the shared HTTP client.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Allow loopback, private, link-local and multicast addresses (tests, the devnet, a
    /// private deployment).
    pub allow_private_network: bool,
    /// Sent with every request, so operators of the hosts we crawl can reach us.
    pub user_agent: String,
    /// Connecting must finish within this.
    pub connect_timeout: Duration,
    /// Most redirects followed, each checked by the guard.
    pub max_redirects: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            allow_private_network: false,
            user_agent: concat!("atpdb/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(10),
            max_redirects: 5,
        }
    }
}

/// The guarded HTTP client: cheap to clone, one connection pool.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    allow_private_network: bool,
    user_agent: Arc<str>,
    connect_timeout: Duration,
}

impl Http {
    /// Builds the client; with `allow_private_network` off, no request reaches a non-public
    /// address.
    pub fn new(config: &HttpConfig) -> Result<Http, NetError> {
        let allow = config.allow_private_network;
        let max_redirects = config.max_redirects;
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= max_redirects {
                return attempt.error(format!("more than {max_redirects} redirects"));
            }
            match check_url(attempt.url(), allow) {
                Ok(()) => attempt.follow(),
                Err(err) => attempt.error(err),
            }
        });
        let mut builder = reqwest::Client::builder()
            .user_agent(config.user_agent.clone())
            .connect_timeout(config.connect_timeout)
            .redirect(redirects);
        if !allow {
            builder = builder.dns_resolver(Arc::new(PublicOnly));
        }
        let client = builder
            .build()
            .map_err(|err| NetError::Client(err.to_string()))?;
        Ok(Http {
            client,
            allow_private_network: allow,
            user_agent: Arc::from(config.user_agent.as_str()),
            connect_timeout: config.connect_timeout,
        })
    }

    /// A GET of `url`, refused before any connection if the guard says no.
    pub fn get(&self, url: &str) -> Result<reqwest::RequestBuilder, NetError> {
        let parsed = parse_url(url)?;
        check_url(&parsed, self.allow_private_network)?;
        Ok(self.client.get(parsed))
    }

    /// Checks a URL without requesting it (e.g. a WebSocket URL dialled by another client).
    pub fn check(&self, url: &str) -> Result<reqwest::Url, NetError> {
        let parsed = parse_url(url)?;
        check_url(&parsed, self.allow_private_network)?;
        Ok(parsed)
    }

    /// Whether non-public addresses are allowed.
    pub fn allows_private_network(&self) -> bool {
        self.allow_private_network
    }

    /// The underlying client, for requests the guard already checked.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The `User-Agent` sent with every request (the firehose sends it too).
    pub fn user_agent(&self) -> &str {
        &self.user_agent
    }

    /// How long connecting may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The addresses `host` resolves to that the guard allows, for clients that dial
    /// themselves (the firehose): the same rule as the HTTP client's resolver.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, NetError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            if self.allow_private_network || is_public(ip) {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
            return Err(NetError::PrivateAddress {
                host: ip.to_string(),
            });
        }
        if !self.allow_private_network && is_localhost(host) {
            return Err(NetError::PrivateAddress {
                host: host.to_owned(),
            });
        }
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|err| NetError::Transport {
                host: host.to_owned(),
                reason: format!("resolving {host}: {err}"),
            })?
            .collect();
        let allowed: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|addr| self.allow_private_network || is_public(addr.ip()))
            .collect();
        if allowed.is_empty() && !found.is_empty() {
            return Err(NetError::PrivateAddress {
                host: host.to_owned(),
            });
        }
        Ok(allowed)
    }
}

fn parse_url(url: &str) -> Result<reqwest::Url, NetError> {
    reqwest::Url::parse(url).map_err(|err| NetError::BadUrl {
        url: url.to_owned(),
        reason: err.to_string(),
    })
}

/// Refuses non-http(s) schemes and IP-literal hosts that are not public. Host names are
/// checked again when they resolve.
pub fn check_url(url: &reqwest::Url, allow_private_network: bool) -> Result<(), NetError> {
    match url.scheme() {
        "http" | "https" | "ws" | "wss" => {}
        other => {
            return Err(NetError::BadUrl {
                url: url.to_string(),
                reason: format!("scheme {other} is not http(s) or ws(s)"),
            });
        }
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(domain)) => {
            // "localhost" never goes to DNS in most stacks; treat it as the address it is.
            if !allow_private_network && is_localhost(domain) {
                return Err(NetError::PrivateAddress {
                    host: domain.to_owned(),
                });
            }
            return Ok(());
        }
        None => {
            return Err(NetError::BadUrl {
                url: url.to_string(),
                reason: "no host".to_owned(),
            });
        }
    };
    if allow_private_network || is_public(ip) {
        Ok(())
    } else {
        Err(NetError::PrivateAddress {
            host: ip.to_string(),
        })
    }
}

fn is_localhost(domain: &str) -> bool {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    domain == "localhost" || domain.ends_with(".localhost")
}

/// Whether an address may be dialled without `--allow-private-network`: not loopback,
/// private (RFC 1918, CGNAT, unique local), link-local, multicast, unspecified, broadcast,
/// documentation or benchmarking ranges, nor an IPv4 address hidden in IPv6.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = ip.segments();
            let first = segments[0];
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || first & 0xfe00 == 0xfc00 // unique local fc00::/7
                || first & 0xffc0 == 0xfe80 // link-local fe80::/10
                || first & 0xffc0 == 0xfec0 // site-local (deprecated) fec0::/10
                || (first == 0x2001 && segments[1] == 0x0db8) // documentation
                || (first == 0x0064 && segments[1] == 0xff9b) // NAT64 to an IPv4 address
                || (first == 0 && segments[1..6].iter().all(|&s| s == 0))) // IPv4-compatible
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

/// A resolver that keeps only public addresses, so a name cannot smuggle a request to
/// loopback or the internal network.
#[derive(Debug)]
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            if is_localhost(&host) {
                return Err(Box::new(NetError::PrivateAddress { host }) as _);
            }
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|addr| is_public(addr.ip()))
                .collect();
            if public.is_empty() && !found.is_empty() {
                return Err(Box::new(NetError::PrivateAddress { host }) as _);
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    }

    #[test]
    fn non_public_ranges_are_refused() {
        for text in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip(text)), "{text} must be refused");
        }
        for text in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(ip(text)), "{text} must be allowed");
        }
    }

    #[test]
    fn urls_are_checked_before_dialling() -> Result<(), NetError> {
        let http = Http::new(&HttpConfig::default())?;
        for url in [
            "http://127.0.0.1:2583/xrpc/x",
            "https://[::1]/",
            "http://localhost:80/",
            "http://169.254.169.254/latest/meta-data",
        ] {
            assert!(
                matches!(http.get(url), Err(NetError::PrivateAddress { .. })),
                "{url}"
            );
        }
        assert!(matches!(
            http.get("file:///etc/passwd"),
            Err(NetError::BadUrl { .. })
        ));
        assert!(http.get("https://bsky.social/xrpc/x").is_ok());
        let open = Http::new(&HttpConfig {
            allow_private_network: true,
            ..HttpConfig::default()
        })?;
        assert!(open.get("http://127.0.0.1:2583/").is_ok());
        Ok(())
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused() -> Result<(), NetError> {
        // "localhost" is refused by name; a listener on loopback proves the request would
        // otherwise have succeeded.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|err| NetError::Client(err.to_string()))?;
        let port = listener
            .local_addr()
            .map_err(|err| NetError::Client(err.to_string()))?
            .port();
        let http = Http::new(&HttpConfig::default())?;
        let url = format!("http://localhost:{port}/");
        assert!(matches!(
            http.get(&url),
            Err(NetError::PrivateAddress { .. })
        ));
        // The resolver itself also refuses, for names that pass the URL check.
        let resolved = PublicOnly
            .resolve(
                "localhost"
                    .parse()
                    .map_err(|_| NetError::Client("name".into()))?,
            )
            .await;
        assert!(resolved.is_err());
        Ok(())
    }
}
