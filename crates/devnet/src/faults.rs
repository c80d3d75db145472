//! Fault injection: per-host failures a sync engine meets on the real network, switchable at runtime.
//!
//! # Overview
//!
//! Each host of the devnet (every PDS, the relay, the PLC directory) owns one [`Faults`] handle,
//! a cheap clone of shared state holding a [`FaultSet`]. The set is fixed when the host starts
//! and can be replaced while it runs, from Rust ([`Faults::set`], [`Faults::update`]) or over
//! HTTP through [`admin_router`], so a test can break a host in the middle of a sync and then
//! heal it.
//!
//! Faults act at three levels, because real failures do:
//!
//! - **Connection**: [`FaultyListener`] wraps the host's TCP listener and resets connections
//!   (`reset`), which no HTTP middleware can do: the client must see a TCP RST, not a response.
//! - **HTTP**: [`middleware`] answers 429s and 5xx, adds latency, trickles or truncates bodies
//!   (`rate_limit`, `status`, `latency_ms`, `slow_drip`, `truncate_after`), optionally only for
//!   some paths (`paths`) and only a number of times (`times`).
//! - **Events**: flags such as `corrupt_blocks` or `reorder_seqs` are only stored here; the PDS
//!   and relay firehose code read them per commit through [`Faults::event_flags`], which reads
//!   one atomic instead of cloning the set.
//!
//! # Invariants
//!
//! - Requests under `/admin/` are never faulted, so a test can always switch faults off again.
//! - No lock is held across an `.await`, and a poisoned lock is recovered, not propagated: a
//!   fault switch never takes a host down by itself.
//! - Bad input (an unknown field, a status outside 400–599) is refused by [`FaultSet::validate`]
//!   and the admin API; a bad value set directly from Rust degrades to a documented default
//!   instead of panicking.
//!
//! # Example
//!
//! ```no_run
//! use atpdb_devnet::faults::{self, FaultSet, Faults, FaultyListener, RateLimit};
//!
//! # async fn run() -> std::io::Result<()> {
//! let faults = Faults::new(FaultSet::default());
//! let app = axum::Router::new()
//!     .route("/xrpc/com.atproto.sync.getRepo", axum::routing::get(|| async { "car" }))
//!     .layer(axum::middleware::from_fn_with_state(faults.clone(), faults::middleware))
//!     .merge(faults::admin_router(faults.clone()));
//! let (listener, _addr) = FaultyListener::bind_loopback(faults.clone()).await?;
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! // Later, in the middle of a test: the next 3 getRepo calls get a proxy's HTML 429.
//! faults.set(FaultSet {
//!     rate_limit: Some(RateLimit { html: true, ..RateLimit::default() }),
//!     paths: vec!["com.atproto.sync.getRepo".to_owned()],
//!     times: Some(3),
//!     ..FaultSet::default()
//! });
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The faults one host injects, as posted to and returned by `/admin/faults`.
///
/// Everything is off by default, so `{}` is a healthy host and a test names only what it breaks.
/// Unknown fields are refused rather than ignored: a typo such as `"rate_limt"` would otherwise
/// leave the host healthy and the test passing for the wrong reason.
///
/// The HTTP-layer faults are applied by [`middleware`] in this order: `latency_ms`, then
/// `rate_limit` (which wins over `status`), then `status`, then `slow_drip` and
/// `truncate_after` on whatever body is sent, including the fault's own error body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSet {
    /// Answer 429 Too Many Requests instead of calling the handler.
    pub rate_limit: Option<RateLimit>,
    /// Answer this HTTP status (400–599) instead of calling the handler.
    ///
    /// 502, 503 and 504 get an HTML page with `content-type: text/html`, because in practice
    /// those come from a proxy in front of the host, not from the host; every other status gets
    /// the XRPC JSON error body `{"error": .., "message": ..}` with the XRPC error name for the
    /// status (`InternalServerError` for 500, `MethodNotImplemented` for 501, `InvalidRequest`
    /// for other 4xx). A value outside 400–599 set from Rust is answered as 500.
    pub status: Option<u16>,
    /// Wait this long before answering, whether the answer is a fault or the real response.
    pub latency_ms: Option<u64>,
    /// Send the response body in small chunks with pauses between them.
    pub slow_drip: Option<SlowDrip>,
    /// Announce the whole body in `Content-Length`, send only this many bytes, then close the
    /// connection, so the client sees an incomplete body.
    ///
    /// A body no longer than this is sent whole. Bodies whose length is not known in advance
    /// (streams) are buffered first to learn it.
    pub truncate_after: Option<u64>,
    /// Reset TCP connections (RST, via `SO_LINGER` 0) before any response.
    ///
    /// Applied by [`FaultyListener`], not by [`middleware`]: new connections are reset on
    /// accept, and open connections are reset as soon as the client sends anything on them
    /// (the next request on a kept-alive connection, a WebSocket frame). Responses already being
    /// written are not cut. Ignores `paths` and `times` and never switches itself off.
    ///
    /// This includes the host's own `/admin/` routes when they share the listener, so switch
    /// it off from Rust ([`Faults::set`]) or through an admin API served on another listener.
    pub reset: bool,
    /// If not empty, the HTTP-layer faults only apply to requests whose path and query
    /// contain one of these strings, e.g. `"com.atproto.sync.getRepo"`, or
    /// `"listRepos?limit=100&cursor=500"` for one page of a listing.
    pub paths: Vec<String>,
    /// Apply the HTTP-layer faults to the next this-many matching requests only, then switch
    /// them off (they become `None` and `times` becomes `None`). `None` keeps them until changed.
    ///
    /// Each matching request consumes one atomically, so concurrent requests never see more
    /// faults than asked for. Event flags and `reset` are not counted and stay as they are.
    pub times: Option<u32>,
    /// The firehose `#commit` events carry a CAR slice in which one byte of a record block is
    /// flipped while the block keeps its original CID, so only a client that hashes blocks
    /// notices (failure mode: block hashes often go unchecked).
    pub corrupt_blocks: bool,
    /// Commits are signed with a key other than the account's `#atproto` key, so signature
    /// verification against the DID document fails.
    pub bad_signature: bool,
    /// `#commit` events omit `prevData`, as some non-reference PDSes do, so the client cannot
    /// check the commit against its previous MST root.
    pub drop_prev_data: bool,
    /// `#commit` CAR slices leave out MST nodes needed to invert the operations, so inductive
    /// verification cannot prove the diff.
    pub drop_proof_nodes: bool,
    /// The firehose sends the first half of a frame and then drops the connection, so the
    /// client must discard the partial frame and reconnect from its last processed cursor.
    pub disconnect_mid_frame: bool,
    /// The firehose sends some events twice under the same seq, as relays replaying after a
    /// cut-over do, so the client must deduplicate.
    pub duplicate_seqs: bool,
    /// The firehose sends some events out of seq order, so the client must not assume seqs
    /// only grow within a connection.
    pub reorder_seqs: bool,
}

/// How a 429 looks. The three shapes are the ones clients meet: the reference PDS (JSON with
/// `ratelimit-*` headers), a proxy (HTML, no headers), and bare servers (no hint at all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Seconds to send in `Retry-After`; `None` sends no `Retry-After`.
    pub retry_after: Option<u64>,
    /// Send the reference PDS's `ratelimit-limit: 3000`, `ratelimit-remaining: 0`,
    /// `ratelimit-reset` (unix seconds, `retry_after` from now, or 300 s) and
    /// `ratelimit-policy: 3000;w=300`.
    pub ratelimit_headers: bool,
    /// Send an HTML page (`content-type: text/html`) like a front proxy, instead of the XRPC
    /// JSON `{"error":"RateLimitExceeded","message":..}`, to catch clients that parse 429 bodies
    /// as JSON.
    pub html: bool,
}

/// How a response body trickles out under the `slow_drip` fault, to exercise client timeouts
/// and streaming without making the host fail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlowDrip {
    /// Bytes per chunk; must be at least 1 (a 0 set from Rust is treated as 1).
    pub chunk_bytes: usize,
    /// Pause before every chunk but the first.
    pub interval_ms: u64,
}

/// A snapshot of the event-level flags of a [`FaultSet`], for code that checks them per event.
///
/// It is `Copy` and read from one atomic, so checking it costs no lock and no allocation.
/// See the fields of the same names on [`FaultSet`] for what each one means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventFaults {
    /// [`FaultSet::corrupt_blocks`].
    pub corrupt_blocks: bool,
    /// [`FaultSet::bad_signature`].
    pub bad_signature: bool,
    /// [`FaultSet::drop_prev_data`].
    pub drop_prev_data: bool,
    /// [`FaultSet::drop_proof_nodes`].
    pub drop_proof_nodes: bool,
    /// [`FaultSet::disconnect_mid_frame`].
    pub disconnect_mid_frame: bool,
    /// [`FaultSet::duplicate_seqs`].
    pub duplicate_seqs: bool,
    /// [`FaultSet::reorder_seqs`].
    pub reorder_seqs: bool,
}

/// Why a [`FaultSet`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultSetError {
    /// `status` is not an HTTP error status.
    #[error("status {status} is not an HTTP error status (expected 400-599)")]
    Status {
        /// The refused status.
        status: u16,
    },
    /// `slow_drip.chunk_bytes` is 0, which would never send a byte.
    #[error("slow_drip.chunk_bytes is 0 (expected at least 1)")]
    ZeroChunkBytes,
    /// `times` is 0, which would fault nothing; `null` means "until changed".
    #[error("times is 0 (expected at least 1, or null to fault until changed)")]
    ZeroTimes,
}

/// The shared, switchable faults of one host.
///
/// Cloning is cheap and every clone sees the same state, so the host's router, its listener,
/// its firehose and the test all hold the same handle.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    inner: Arc<Inner>,
}

/// A [`axum::serve::Listener`] that resets connections while the host's `reset` fault is on.
///
/// Resetting has to happen here, below HTTP: a middleware can only answer, and the failure to
/// simulate is a connection that dies with RST before any answer.
#[derive(Debug)]
pub struct FaultyListener {
    listener: TcpListener,
    faults: Faults,
}

/// A connection accepted by [`FaultyListener`]: a [`TcpStream`] that is reset when the client
/// sends data while the `reset` fault is on, so kept-alive connections are not spared.
#[derive(Debug)]
pub struct FaultyStream {
    stream: TcpStream,
    faults: Faults,
}

impl FaultSet {
    /// Checks the values the type system does not: the admin API refuses a set that fails here.
    ///
    /// # Errors
    ///
    /// [`FaultSetError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), FaultSetError> {
        if let Some(status) = self.status
            && !(400..=599).contains(&status)
        {
            return Err(FaultSetError::Status { status });
        }
        if let Some(drip) = &self.slow_drip
            && drip.chunk_bytes == 0
        {
            return Err(FaultSetError::ZeroChunkBytes);
        }
        if self.times == Some(0) {
            return Err(FaultSetError::ZeroTimes);
        }
        Ok(())
    }

    /// The event-level flags of this set.
    #[must_use]
    pub fn event_faults(&self) -> EventFaults {
        EventFaults {
            corrupt_blocks: self.corrupt_blocks,
            bad_signature: self.bad_signature,
            drop_prev_data: self.drop_prev_data,
            drop_proof_nodes: self.drop_proof_nodes,
            disconnect_mid_frame: self.disconnect_mid_frame,
            duplicate_seqs: self.duplicate_seqs,
            reorder_seqs: self.reorder_seqs,
        }
    }

    fn has_http_faults(&self) -> bool {
        self.rate_limit.is_some()
            || self.status.is_some()
            || self.latency_ms.is_some()
            || self.slow_drip.is_some()
            || self.truncate_after.is_some()
    }

    fn clear_http_faults(&mut self) {
        self.rate_limit = None;
        self.status = None;
        self.latency_ms = None;
        self.slow_drip = None;
        self.truncate_after = None;
        self.times = None;
    }

    fn matches_path(&self, path: &str) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|p| path.contains(p.as_str()))
    }
}

impl EventFaults {
    const CORRUPT_BLOCKS: u8 = 1 << 0;
    const BAD_SIGNATURE: u8 = 1 << 1;
    const DROP_PREV_DATA: u8 = 1 << 2;
    const DROP_PROOF_NODES: u8 = 1 << 3;
    const DISCONNECT_MID_FRAME: u8 = 1 << 4;
    const DUPLICATE_SEQS: u8 = 1 << 5;
    const REORDER_SEQS: u8 = 1 << 6;

    /// Whether any event fault is on, so the firehose can skip all per-flag checks at once.
    #[must_use]
    pub fn any(self) -> bool {
        self.to_bits() != 0
    }

    fn to_bits(self) -> u8 {
        let mut bits = 0;
        for (on, bit) in [
            (self.corrupt_blocks, Self::CORRUPT_BLOCKS),
            (self.bad_signature, Self::BAD_SIGNATURE),
            (self.drop_prev_data, Self::DROP_PREV_DATA),
            (self.drop_proof_nodes, Self::DROP_PROOF_NODES),
            (self.disconnect_mid_frame, Self::DISCONNECT_MID_FRAME),
            (self.duplicate_seqs, Self::DUPLICATE_SEQS),
            (self.reorder_seqs, Self::REORDER_SEQS),
        ] {
            if on {
                bits |= bit;
            }
        }
        bits
    }

    fn from_bits(bits: u8) -> Self {
        Self {
            corrupt_blocks: bits & Self::CORRUPT_BLOCKS != 0,
            bad_signature: bits & Self::BAD_SIGNATURE != 0,
            drop_prev_data: bits & Self::DROP_PREV_DATA != 0,
            drop_proof_nodes: bits & Self::DROP_PROOF_NODES != 0,
            disconnect_mid_frame: bits & Self::DISCONNECT_MID_FRAME != 0,
            duplicate_seqs: bits & Self::DUPLICATE_SEQS != 0,
            reorder_seqs: bits & Self::REORDER_SEQS != 0,
        }
    }
}

impl Faults {
    /// A handle starting with `set`.
    #[must_use]
    pub fn new(set: FaultSet) -> Self {
        let faults = Self::default();
        faults.set(set);
        faults
    }

    /// A copy of the current set.
    #[must_use]
    pub fn get(&self) -> FaultSet {
        self.read().clone()
    }

    /// Replaces the whole set; requests and connections from now on see the new one.
    pub fn set(&self, set: FaultSet) {
        self.update(|current| *current = set);
    }

    /// Changes the set in place, atomically with respect to requests consuming `times`.
    pub fn update(&self, change: impl FnOnce(&mut FaultSet)) {
        let mut set = self.write();
        change(&mut set);
        self.publish(&set);
    }

    /// Switches every fault off.
    pub fn clear(&self) {
        self.set(FaultSet::default());
    }

    /// The event-level flags, read without a lock; meant to be called per event.
    #[must_use]
    pub fn event_flags(&self) -> EventFaults {
        EventFaults::from_bits(self.inner.event_bits.load(Ordering::Acquire))
    }

    /// Whether connections are being reset, read without a lock; checked per accept and read.
    #[must_use]
    pub fn resets_connections(&self) -> bool {
        self.inner.reset.load(Ordering::Acquire) != 0
    }

    fn read(&self) -> RwLockReadGuard<'_, FaultSet> {
        self.inner
            .set
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, FaultSet> {
        self.inner
            .set
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Mirrors the set into the atomics; called with the write lock held so they never lag.
    fn publish(&self, set: &FaultSet) {
        let bits = set.event_faults().to_bits();
        self.inner.event_bits.store(bits, Ordering::Release);
        self.inner
            .reset
            .store(u8::from(set.reset), Ordering::Release);
    }

    /// Decides whether the HTTP-layer faults apply to a request to `path`, consuming one of
    /// `times` if so.
    fn claim_http(&self, path: &str) -> Option<HttpPlan> {
        if is_admin_path(path) {
            return None;
        }
        {
            let set = self.read();
            if !set.has_http_faults() || !set.matches_path(path) {
                return None;
            }
            if set.times.is_none() {
                return Some(HttpPlan::from_set(&set));
            }
        }
        // Counted faults: decrement under the write lock so N concurrent requests get N faults.
        let mut set = self.write();
        if !set.has_http_faults() || !set.matches_path(path) {
            return None;
        }
        let plan = HttpPlan::from_set(&set);
        match set.times {
            None => {}
            Some(0) => {
                set.clear_http_faults();
                return None;
            }
            Some(1) => set.clear_http_faults(),
            Some(n) => set.times = Some(n - 1),
        }
        self.publish(&set);
        Some(plan)
    }
}

impl FaultyListener {
    /// Wraps an already bound listener.
    #[must_use]
    pub fn new(listener: TcpListener, faults: Faults) -> Self {
        Self { listener, faults }
    }

    /// Binds `127.0.0.1` on a free port, as every devnet host does.
    ///
    /// # Errors
    ///
    /// The bind error from the OS.
    pub async fn bind_loopback(faults: Faults) -> io::Result<(Self, SocketAddr)> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        Ok((Self::new(listener, faults), addr))
    }

    /// The faults this listener obeys.
    #[must_use]
    pub fn faults(&self) -> &Faults {
        &self.faults
    }
}

impl axum::serve::Listener for FaultyListener {
    type Io = FaultyStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    if self.faults.resets_connections() {
                        tracing::debug!(%addr, "fault: resetting connection on accept");
                        reset(stream);
                        continue;
                    }
                    let faults = self.faults.clone();
                    return (FaultyStream { stream, faults }, addr);
                }
                Err(err) => handle_accept_error(err).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl FaultyStream {
    /// The underlying connection.
    #[must_use]
    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for FaultyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        // Only when the client speaks: a connection idling while the fault is on lives on.
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && this.faults.resets_connections()
        {
            buf.set_filled(before);
            tracing::debug!("fault: resetting open connection");
            if let Err(err) = this.stream.set_zero_linger() {
                tracing::debug!(%err, "fault: could not set SO_LINGER 0; the close may be a FIN");
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by the devnet reset fault",
            )));
        }
        polled
    }
}

impl AsyncWrite for FaultyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Applies the HTTP-layer faults of a host's [`Faults`] to its requests.
///
/// Mount it with
/// `router.layer(axum::middleware::from_fn_with_state(faults.clone(), faults::middleware))`.
/// Requests under `/admin/` pass untouched. See [`FaultSet`] for the order faults apply in.
pub async fn middleware(State(faults): State<Faults>, request: Request, next: Next) -> Response {
    // Path and query, so a fault can target one cursor of a listing.
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path(), |target| target.as_str())
        .to_owned();
    let Some(plan) = faults.claim_http(&path) else {
        return next.run(request).await;
    };
    let is_head = request.method() == Method::HEAD;
    if let Some(latency_ms) = plan.latency_ms {
        tracing::debug!(path, latency_ms, "fault: delaying response");
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }
    let response = if let Some(rate_limit) = &plan.rate_limit {
        tracing::debug!(path, "fault: answering 429");
        rate_limited(rate_limit)
    } else if let Some(status) = plan.status {
        tracing::debug!(path, status, "fault: answering error status");
        error_status(status)
    } else {
        next.run(request).await
    };
    if is_head || !carries_body(response.status()) {
        return response;
    }
    let response = match plan.truncate_after {
        Some(limit) => truncate(response, limit).await,
        None => response,
    };
    match &plan.slow_drip {
        Some(drip) => slow_drip(response, drip),
        None => response,
    }
}

/// `GET`, `POST` and `DELETE /admin/faults`: read, replace and clear the host's faults.
///
/// `POST` takes a whole [`FaultSet`] as JSON (omitted fields are off) and returns the set now in
/// force; a body that does not parse or validate gets 400 with
/// `{"error":"InvalidFaultSet","message":..}` naming the problem, and leaves the faults as
/// they were. There is no authentication here: the host mounts this behind its admin auth.
pub fn admin_router(faults: Faults) -> Router {
    Router::new()
        .route(
            "/admin/faults",
            get(get_faults).post(post_faults).delete(delete_faults),
        )
        .with_state(faults)
}

struct Inner {
    set: RwLock<FaultSet>,
    event_bits: AtomicU8,
    reset: AtomicU8,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            set: RwLock::new(FaultSet::default()),
            event_bits: AtomicU8::new(0),
            reset: AtomicU8::new(0),
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.set.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Faults").field("set", &*set).finish()
    }
}

/// The HTTP-layer part of a [`FaultSet`], copied out so no lock is held while it is applied.
struct HttpPlan {
    rate_limit: Option<RateLimit>,
    status: Option<u16>,
    latency_ms: Option<u64>,
    slow_drip: Option<SlowDrip>,
    truncate_after: Option<u64>,
}

impl HttpPlan {
    fn from_set(set: &FaultSet) -> Self {
        Self {
            rate_limit: set.rate_limit.clone(),
            status: set.status,
            latency_ms: set.latency_ms,
            slow_drip: set.slow_drip.clone(),
            truncate_after: set.truncate_after,
        }
    }
}

fn is_admin_path(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

fn carries_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Drops a connection with RST instead of FIN.
fn reset(stream: TcpStream) {
    if let Err(err) = stream.set_zero_linger() {
        tracing::debug!(%err, "fault: could not set SO_LINGER 0; the close may be a FIN");
    }
    drop(stream);
}

/// What axum's own `TcpListener` does: skip per-connection errors, back off on the others
/// (such as running out of file descriptors) instead of spinning.
async fn handle_accept_error(err: io::Error) {
    if matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%err, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

const HTML: &str = "text/html";

fn rate_limited(rate_limit: &RateLimit) -> Response {
    let status = StatusCode::TOO_MANY_REQUESTS;
    let mut response = if rate_limit.html {
        html_error(status)
    } else {
        xrpc_error(status, "RateLimitExceeded", "Rate Limit Exceeded")
    };
    let headers = response.headers_mut();
    if let Some(seconds) = rate_limit.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if rate_limit.ratelimit_headers {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let reset_at = now.saturating_add(rate_limit.retry_after.unwrap_or(300));
        headers.insert("ratelimit-limit", HeaderValue::from(3000u32));
        headers.insert("ratelimit-remaining", HeaderValue::from(0u32));
        headers.insert("ratelimit-reset", HeaderValue::from(reset_at));
        headers.insert("ratelimit-policy", HeaderValue::from_static("3000;w=300"));
    }
    response
}

fn error_status(status: u16) -> Response {
    let status = match StatusCode::from_u16(status) {
        Ok(status) if status.is_client_error() || status.is_server_error() => status,
        _ => {
            tracing::warn!(status, "fault: status is not 400-599; answering 500");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    match status.as_u16() {
        502..=504 => html_error(status),
        code => {
            let name = match code {
                401 => "AuthenticationRequired",
                403 => "Forbidden",
                404 => "NotFound",
                413 => "PayloadTooLarge",
                429 => "RateLimitExceeded",
                501 => "MethodNotImplemented",
                500..=599 => "InternalServerError",
                _ => "InvalidRequest",
            };
            xrpc_error(status, name, status.canonical_reason().unwrap_or(name))
        }
    }
}

fn xrpc_error(status: StatusCode, error: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": error, "message": message });
    (status, Json(body)).into_response()
}

/// A page shaped like nginx's, which is what fronts most hosts that answer in HTML.
fn html_error(status: StatusCode) -> Response {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let page = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    (status, [(header::CONTENT_TYPE, HTML)], page).into_response()
}

/// Keeps the body's full length in `Content-Length` but sends only `limit` bytes, then fails
/// the body so hyper closes the connection mid-message.
async fn truncate(response: Response, limit: u64) -> Response {
    let (mut parts, body) = response.into_parts();
    let (full_len, body) = match body.size_hint().exact() {
        Some(len) => (len, body),
        None => {
            // The length must be announced before the first byte, so a stream is read whole.
            let bytes = match axum::body::to_bytes(body, usize::MAX).await {
                Ok(bytes) => bytes,
                Err(err) => {
                    tracing::debug!(%err, "fault: body failed while buffering it to truncate");
                    return (StatusCode::INTERNAL_SERVER_ERROR, "body failed").into_response();
                }
            };
            (bytes.len() as u64, Body::from(bytes))
        }
    };
    if full_len <= limit {
        return Response::from_parts(parts, body);
    }
    tracing::debug!(full_len, limit, "fault: truncating body");
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(full_len));
    let state = Truncating {
        stream: Some(body.into_data_stream()),
        remaining: limit,
    };
    let truncated = futures_util::stream::unfold(state, |mut state| async move {
        let stream = state.stream.as_mut()?;
        if state.remaining == 0 {
            state.stream = None;
            // Let hyper flush what was sent before the failure makes it close the socket.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let err = io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "body truncated by the devnet truncate_after fault",
            );
            return Some((Err(err), state));
        }
        match stream.next().await? {
            Ok(mut chunk) => {
                let take = usize::try_from(state.remaining)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                state.remaining -= take as u64;
                Some((Ok(chunk.split_to(take)), state))
            }
            Err(err) => {
                state.stream = None;
                Some((Err(io::Error::other(err)), state))
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(truncated))
}

/// The body being truncated: `stream` is `None` once the body has failed.
struct Truncating {
    stream: Option<axum::body::BodyDataStream>,
    remaining: u64,
}

/// Re-chunks the body into `chunk_bytes` pieces with `interval_ms` between them, keeping its
/// `Content-Length` when it was known.
fn slow_drip(response: Response, drip: &SlowDrip) -> Response {
    let (mut parts, body) = response.into_parts();
    if let Some(len) = body.size_hint().exact() {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let chunk_bytes = drip.chunk_bytes.max(1);
    let interval = Duration::from_millis(drip.interval_ms);
    let state = Dripping {
        stream: body.into_data_stream(),
        pending: Bytes::new(),
        first: true,
    };
    let dripped = futures_util::stream::unfold(state, move |mut state| async move {
        while state.pending.is_empty() {
            match state.stream.next().await? {
                Ok(chunk) => state.pending = chunk,
                Err(err) => return Some((Err(io::Error::other(err)), state)),
            }
        }
        if !state.first {
            tokio::time::sleep(interval).await;
        }
        state.first = false;
        let take = chunk_bytes.min(state.pending.len());
        let chunk = state.pending.split_to(take);
        Some((Ok(chunk), state))
    });
    Response::from_parts(parts, Body::from_stream(dripped))
}

struct Dripping {
    stream: axum::body::BodyDataStream,
    pending: Bytes,
    first: bool,
}

async fn get_faults(State(faults): State<Faults>) -> Json<FaultSet> {
    Json(faults.get())
}

async fn post_faults(State(faults): State<Faults>, body: Bytes) -> Response {
    let set = match serde_json::from_slice::<FaultSet>(&body) {
        Ok(set) => set,
        Err(err) => return invalid_fault_set(&format!("fault set: {err}")),
    };
    if let Err(err) = set.validate() {
        return invalid_fault_set(&format!("fault set: {err}"));
    }
    tracing::info!(?set, "faults replaced through the admin API");
    faults.set(set.clone());
    Json(set).into_response()
}

async fn delete_faults(State(faults): State<Faults>) -> Json<FaultSet> {
    faults.clear();
    Json(FaultSet::default())
}

fn invalid_fault_set(message: &str) -> Response {
    xrpc_error(StatusCode::BAD_REQUEST, "InvalidFaultSet", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let parsed = serde_json::from_str::<FaultSet>(r#"{"rate_limt": {}}"#);
        let message = parsed.err().map(|err| err.to_string()).unwrap_or_default();
        assert!(message.contains("rate_limt"), "{message:?}");
    }

    #[test]
    fn empty_object_is_healthy() -> Result<(), serde_json::Error> {
        let set: FaultSet = serde_json::from_str("{}")?;
        assert_eq!(set, FaultSet::default());
        Ok(())
    }

    #[test]
    fn event_flags_round_trip_through_bits() {
        let flags = EventFaults {
            corrupt_blocks: true,
            drop_proof_nodes: true,
            reorder_seqs: true,
            ..EventFaults::default()
        };
        assert_eq!(EventFaults::from_bits(flags.to_bits()), flags);
        let faults = Faults::new(FaultSet {
            bad_signature: true,
            ..FaultSet::default()
        });
        assert!(faults.event_flags().bad_signature);
        assert!(faults.event_flags().any());
        faults.clear();
        assert!(!faults.event_flags().any());
    }

    #[test]
    fn times_counts_down_then_switches_http_faults_off() {
        let faults = Faults::new(FaultSet {
            status: Some(503),
            times: Some(2),
            duplicate_seqs: true,
            ..FaultSet::default()
        });
        assert!(faults.claim_http("/xrpc/x").is_some());
        assert_eq!(faults.get().times, Some(1));
        assert!(faults.claim_http("/xrpc/x").is_some());
        assert!(faults.claim_http("/xrpc/x").is_none());
        let after = faults.get();
        assert_eq!(after.status, None);
        assert_eq!(after.times, None);
        assert!(after.duplicate_seqs, "event flags survive the countdown");
    }

    #[test]
    fn validate_names_the_bad_field() {
        let bad_status = FaultSet {
            status: Some(200),
            ..FaultSet::default()
        };
        assert_eq!(
            bad_status.validate(),
            Err(FaultSetError::Status { status: 200 })
        );
        let zero_times = FaultSet {
            times: Some(0),
            ..FaultSet::default()
        };
        assert_eq!(zero_times.validate(), Err(FaultSetError::ZeroTimes));
    }
}
