//! A reconnecting `com.atproto.sync.subscribeRepos` client.
//!
//! # Overview
//!
//! [`Firehose`] turns one host's event stream into a sequence of [`FirehoseEvent`]s that never
//! ends: decoded messages, frames that did not decode, and the life of the connection
//! (connected, disconnected, the host's error frames). It keeps the cursor, the highest seq
//! received, and resumes from it after every drop, so a reconnect neither skips nor repeats
//! events (a host replays events *after* the cursor). It never gives up: a host that stays
//! down is retried with backoff for as long as the caller keeps calling
//! [`Firehose::next`]; the caller decides when to stop.
//!
//! # Design
//!
//! - **Connecting is lazy and never fails the caller.** [`Firehose::connect`] only records
//!   the settings; every failure (the guard refusing the address, DNS, TLS, an HTTP 429 or
//!   502 instead of the upgrade) is one [`FirehoseEvent::Disconnected`] naming the reason and
//!   the wait before the next try.
//! - **Backoff** doubles from [`FirehoseConfig::backoff_min`] to
//!   [`FirehoseConfig::backoff_max`], each wait drawn between half and all of it, and goes
//!   back to the minimum once a connection has delivered a message. A 429 before the upgrade
//!   waits at least what its `Retry-After` asks (up to the maximum).
//! - **The guard applies to WebSocket URLs too.** The host name is resolved here and every
//!   address checked by [`Http::resolve`], so a name resolving to 10.0.0.1 is refused
//!   unless private networks are allowed; TLS uses the same verifier as the HTTP client.
//! - **Frames are bounded.** A frame above [`FirehoseConfig::max_frame_bytes`] is refused by
//!   the WebSocket layer before it is buffered; the connection is dropped and reported.
//! - **A frame that does not decode is reported and skipped**, as the relay does: its seq
//!   (when readable) still moves the cursor, because asking for it again would only bring the
//!   same bytes. Duplicate or out-of-order seqs within a connection are passed on unchanged:
//!   what to do with them is the engine's decision, and the cursor only moves forward.
//! - **Cancel safety.** [`Firehose::next`] keeps every piece of state in the struct, so
//!   dropping its future (a `tokio::select!` branch that lost) loses no event: a frame is
//!   either returned or still in the socket, a pending reconnect waits only the rest of its
//!   delay, and the idle timer counts from the last frame, not from the call. A connection
//!   attempt in progress is abandoned and started again by the next call.
//! - **A refused address is not special.** The guard's refusal is reported as a
//!   [`FirehoseEvent::Disconnected`] like any other failure and retried at the backoff; a
//!   caller that dials addresses from untrusted sources should stop on it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use atpdb_repo::firehose::{Frame, FrameError, MAX_FRAME_BYTES, Message, decode_frame};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use crate::guard::{Http, NetError};
use crate::xrpc::error_chain;

/// The method path appended to a host's base URL.
/// The repository event stream.
pub const SUBSCRIBE_REPOS: &str = "com.atproto.sync.subscribeRepos";
/// A labeler's label stream: the same framing, cursors and error frames, `#labels` messages
/// (reported as [`Message::Unknown`] for the caller to decode and to move the cursor with).
pub const SUBSCRIBE_LABELS: &str = "com.atproto.label.subscribeLabels";

/// Extra room above [`MAX_FRAME_BYTES`] by default, so a frame slightly over the protocol
/// limit is reported as an invalid frame by the decoder rather than cutting the connection.
const FRAME_HEADROOM: usize = 1 << 20;

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct FirehoseConfig {
    /// The host's base URL, `http(s)://host[:port]` (`ws(s)://` also accepted); the client
    /// builds `ws(s)://host/xrpc/com.atproto.sync.subscribeRepos?cursor=N` from it.
    pub url: String,
    /// The subscription's NSID: [`SUBSCRIBE_REPOS`] or [`SUBSCRIBE_LABELS`].
    pub method: &'static str,
    /// Resume after this seq; `None` starts live.
    pub cursor: Option<u64>,
    /// Largest WebSocket message and frame accepted; larger ones drop the connection.
    pub max_frame_bytes: usize,
    /// The first wait before reconnecting.
    pub backoff_min: Duration,
    /// The longest wait before reconnecting.
    pub backoff_max: Duration,
    /// With nothing received for this long (no frame, not even a ping), reconnect.
    pub idle_timeout: Duration,
    /// Resolving, connecting, TLS and the upgrade must finish within this.
    pub connect_timeout: Duration,
}

impl FirehoseConfig {
    /// Defaults for `url`: no cursor, frames up to 6 MiB, backoff 500 ms to 60 s, idle 60 s,
    /// connect 10 s.
    pub fn new(url: impl Into<String>) -> FirehoseConfig {
        FirehoseConfig {
            url: url.into(),
            method: SUBSCRIBE_REPOS,
            cursor: None,
            max_frame_bytes: MAX_FRAME_BYTES + FRAME_HEADROOM,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What [`Firehose::next`] reports.
// Nearly every event is a message, so boxing it would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirehoseEvent {
    /// A decoded `op = 1` message; the cursor moved to its seq if it has one.
    Message(Message),
    /// A binary frame that did not decode; the stream goes on.
    Invalid {
        /// Why it did not decode.
        error: FrameError,
        /// Its size in bytes.
        len: usize,
    },
    /// A connection is up, subscribed after `cursor` (`None`: live).
    Connected {
        /// The cursor sent.
        cursor: Option<u64>,
    },
    /// The connection ended or could not be made; the next call waits `retry_in`, then
    /// reconnects from the cursor.
    Disconnected {
        /// What happened.
        reason: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// `#info OutdatedCursor`: the cursor was older than the host's replay window, so events
    /// were missed; the host now replays its whole window. The engine decides (resync).
    OutdatedCursor {
        /// The host's explanation.
        message: Option<String>,
    },
    /// Error frame `FutureCursor`: the cursor is ahead of the host (it was reset or
    /// replaced). The cursor is dropped and the next connection is live.
    FutureCursor {
        /// The host's explanation.
        message: Option<String>,
    },
    /// Any other error frame (`ConsumerTooSlow`...); the host closes the stream and the
    /// client reconnects from the cursor.
    ErrorFrame {
        /// The error name.
        error: String,
        /// The host's explanation.
        message: Option<String>,
    },
}

/// A reconnecting subscription to one host. See the [module docs](self).
pub struct Firehose {
    http: Http,
    config: FirehoseConfig,
    cursor: Option<u64>,
    /// Connect without a cursor next (after `FutureCursor`).
    live_next: bool,
    socket: Option<Socket>,
    /// When the current connection last received anything.
    last_frame: Instant,
    /// When the next connection attempt may start.
    reconnect_at: Option<Instant>,
    /// The ceiling of the next backoff.
    backoff: Duration,
    /// The current connection delivered a message (resets the backoff).
    delivered: bool,
    /// The connection ended after an error frame; report it on the next call.
    closing: Option<String>,
    /// A floor for the next backoff (a 429's `Retry-After`).
    retry_after: Option<Duration>,
}

impl std::fmt::Debug for Firehose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firehose")
            .field("url", &self.config.url)
            .field("cursor", &self.cursor)
            .field("connected", &self.socket.is_some())
            .finish_non_exhaustive()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}
type Socket = WebSocketStream<Box<dyn Io>>;

impl Firehose {
    /// A subscription to `config.url` through `http`'s guard; nothing is dialled until
    /// [`Firehose::next`].
    pub fn connect(http: &Http, config: FirehoseConfig) -> Firehose {
        Firehose {
            http: http.clone(),
            cursor: config.cursor,
            backoff: config.backoff_min,
            config,
            live_next: false,
            socket: None,
            last_frame: Instant::now(),
            reconnect_at: None,
            delivered: false,
            closing: None,
            retry_after: None,
        }
    }

    /// The next event. Never ends: after a drop it waits, reconnects and reports
    /// [`FirehoseEvent::Connected`]. Cancel-safe (see the [module docs](self)).
    pub async fn next(&mut self) -> FirehoseEvent {
        loop {
            if let Some(reason) = self.closing.take() {
                return self.disconnected(reason);
            }
            let Some(socket) = self.socket.as_mut() else {
                if let Some(at) = self.reconnect_at {
                    tokio::time::sleep_until(at).await;
                    self.reconnect_at = None;
                }
                let cursor = if self.live_next { None } else { self.cursor };
                match tokio::time::timeout(self.config.connect_timeout, self.dial(cursor)).await {
                    Ok(Ok(socket)) => {
                        tracing::debug!(url = %self.config.url, ?cursor, "firehose: connected");
                        self.socket = Some(socket);
                        self.live_next = false;
                        self.delivered = false;
                        self.last_frame = Instant::now();
                        return FirehoseEvent::Connected { cursor };
                    }
                    Ok(Err(err)) => {
                        if let NetError::RateLimited { retry_after, .. } = &err {
                            self.retry_after = Some(*retry_after);
                        }
                        return self.disconnected(format!("connecting: {err}"));
                    }
                    Err(_) => {
                        return self.disconnected(format!(
                            "connecting: not connected within {:?}",
                            self.config.connect_timeout
                        ));
                    }
                }
            };
            let idle_at = self.last_frame + self.config.idle_timeout;
            let received = tokio::select! {
                biased;
                received = socket.next() => received,
                () = tokio::time::sleep_until(idle_at) => {
                    let reason = format!("no frame for {:?}", self.config.idle_timeout);
                    return self.disconnected(reason);
                }
            };
            match received {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    self.last_frame = Instant::now();
                    if let Some(event) = self.take_frame(&bytes) {
                        return event;
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    let reason = match frame {
                        Some(frame) if !frame.reason.is_empty() => format!(
                            "the host closed the connection ({}: {})",
                            u16::from(frame.code),
                            frame.reason.as_str()
                        ),
                        Some(frame) => {
                            format!("the host closed the connection ({})", u16::from(frame.code))
                        }
                        None => "the host closed the connection".to_owned(),
                    };
                    return self.disconnected(reason);
                }
                // Text, ping, pong: the connection is alive; tungstenite answers pings.
                Some(Ok(_)) => self.last_frame = Instant::now(),
                Some(Err(err)) => {
                    let reason = self.describe_ws_error(&err);
                    return self.disconnected(reason);
                }
                None => return self.disconnected("the connection ended".to_owned()),
            }
        }
    }

    /// Sets the cursor the next connection resumes after; the current connection (if any)
    /// is not affected.
    pub fn set_cursor(&mut self, cursor: Option<u64>) {
        self.cursor = cursor;
        self.live_next = false;
    }

    /// The highest seq received (or the cursor set); where the next connection resumes.
    pub fn cursor(&self) -> Option<u64> {
        self.cursor
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.socket.is_some()
    }

    /// The settings in use.
    pub fn config(&self) -> &FirehoseConfig {
        &self.config
    }

    /// Decodes one binary frame; `None` for frames to ignore (unknown `op`).
    fn take_frame(&mut self, bytes: &[u8]) -> Option<FirehoseEvent> {
        match decode_frame(bytes) {
            Err(error) => {
                tracing::debug!(url = %self.config.url, %error, "firehose: invalid frame");
                if let Some(seq) = error.seq() {
                    self.advance(seq);
                }
                Some(FirehoseEvent::Invalid {
                    error,
                    len: bytes.len(),
                })
            }
            Ok(Frame::Message(Message::Info(info))) if info.name == "OutdatedCursor" => {
                self.delivered = true;
                Some(FirehoseEvent::OutdatedCursor {
                    message: info.message,
                })
            }
            Ok(Frame::Message(message)) => {
                self.delivered = true;
                if let Some(seq) = message.seq() {
                    self.advance(seq);
                }
                Some(FirehoseEvent::Message(message))
            }
            Ok(Frame::Error { error, message }) => {
                // The host closes the stream after an error frame; so do we.
                self.socket = None;
                self.closing = Some(format!("the host sent the error frame {error}"));
                if error == "FutureCursor" {
                    self.cursor = None;
                    self.live_next = true;
                    Some(FirehoseEvent::FutureCursor { message })
                } else {
                    Some(FirehoseEvent::ErrorFrame { error, message })
                }
            }
            Ok(Frame::Unknown { op }) => {
                tracing::debug!(url = %self.config.url, op, "firehose: ignoring a frame with an unknown op");
                None
            }
        }
    }

    fn advance(&mut self, seq: u64) {
        self.cursor = Some(self.cursor.map_or(seq, |cursor| cursor.max(seq)));
    }

    /// Drops the connection and schedules the next attempt.
    fn disconnected(&mut self, reason: String) -> FirehoseEvent {
        self.socket = None;
        if std::mem::take(&mut self.delivered) {
            self.backoff = self.config.backoff_min;
        }
        let ceiling = self.backoff.max(self.config.backoff_min);
        let mut retry_in = ceiling.mul_f64(0.5 + 0.5 * crate::random_fraction());
        if let Some(floor) = self.retry_after.take() {
            retry_in = retry_in.max(floor.min(self.config.backoff_max));
        }
        self.backoff = ceiling.saturating_mul(2).min(self.config.backoff_max);
        self.reconnect_at = Some(Instant::now() + retry_in);
        tracing::debug!(url = %self.config.url, reason, ?retry_in, "firehose: disconnected");
        FirehoseEvent::Disconnected { reason, retry_in }
    }

    fn describe_ws_error(&self, err: &WsError) -> String {
        match err {
            WsError::Capacity(capacity) => format!(
                "frame refused: larger than max_frame_bytes ({}): {capacity}",
                self.config.max_frame_bytes
            ),
            WsError::Io(io) => format!("connection failed: {}", error_chain(io)),
            other => format!("connection failed: {}", error_chain(other)),
        }
    }

    /// Resolves, connects, checks every address, does TLS for `wss` and upgrades.
    async fn dial(&self, cursor: Option<u64>) -> Result<Socket, NetError> {
        let url = subscribe_url(&self.config.url, self.config.method, cursor)?;
        let url = self.http.check(url.as_str())?;
        let host_name = url.host_str().unwrap_or_default().to_owned();
        let origin = format!("{}://{}", url.scheme(), url_authority(&url));
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs = self.http.resolve(&host_name, port).await?;
        let tcp = connect_any(&addrs, &origin).await?;
        let stream: Box<dyn Io> = if url.scheme() == "wss" {
            Box::new(tls_connect(&host_name, tcp, &origin).await?)
        } else {
            Box::new(tcp)
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|err| NetError::BadUrl {
                url: url.to_string(),
                reason: err.to_string(),
            })?;
        if let Ok(agent) = self.http.user_agent().parse() {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::header::USER_AGENT,
                agent,
            );
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.config.max_frame_bytes))
            .max_frame_size(Some(self.config.max_frame_bytes));
        match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok((socket, _response)) => Ok(socket),
            Err(WsError::Http(response)) => {
                Err(upgrade_refused(&origin, self.config.method, &response))
            }
            Err(err) => Err(NetError::Transport {
                host: origin,
                reason: format!("WebSocket upgrade: {}", error_chain(&err)),
            }),
        }
    }
}

/// The host's `ws(s)://…/xrpc/{method}?cursor=N`.
fn subscribe_url(base: &str, method: &str, cursor: Option<u64>) -> Result<url::Url, NetError> {
    let bad = |reason: String| NetError::BadUrl {
        url: base.to_owned(),
        reason,
    };
    let mut url = url::Url::parse(base).map_err(|err| bad(err.to_string()))?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(bad(format!("scheme {other} is not http(s) or ws(s)"))),
    };
    url.set_scheme(scheme)
        .map_err(|()| bad(format!("cannot use scheme {scheme}")))?;
    let path = url.path().trim_end_matches('/').to_owned();
    let subscribe_path = format!("/xrpc/{method}");
    if !path.ends_with(&subscribe_path) {
        url.set_path(&format!("{path}{subscribe_path}"));
    }
    url.set_query(None);
    url.set_fragment(None);
    if let Some(cursor) = cursor {
        url.query_pairs_mut()
            .append_pair("cursor", &cursor.to_string());
    }
    Ok(url)
}

fn url_authority(url: &url::Url) -> String {
    match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    }
}

async fn connect_any(addrs: &[std::net::SocketAddr], origin: &str) -> Result<TcpStream, NetError> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(err) => last = Some(format!("connecting to {addr}: {err}")),
        }
    }
    Err(NetError::Transport {
        host: origin.to_owned(),
        reason: last.unwrap_or_else(|| "the name resolved to no address".to_owned()),
    })
}

/// The TLS settings, built once: loading the platform's roots is not free.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            use rustls_platform_verifier::BuilderVerifierExt;
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|err| err.to_string())?
                .with_platform_verifier()
                .map_err(|err| err.to_string())?
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

async fn tls_connect(
    host_name: &str,
    tcp: TcpStream,
    origin: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, NetError> {
    let transport = |reason: String| NetError::Transport {
        host: origin.to_owned(),
        reason,
    };
    let config = tls_config().map_err(|err| transport(format!("TLS setup: {err}")))?;
    let name = rustls::pki_types::ServerName::try_from(host_name.to_owned())
        .map_err(|err| transport(format!("TLS server name {host_name:?}: {err}")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|err| transport(format!("TLS: {}", error_chain(&err))))
}

/// The error an HTTP answer instead of the upgrade stands for.
fn upgrade_refused(
    origin: &str,
    method: &str,
    response: &tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>,
) -> NetError {
    let status = response.status().as_u16();
    if status == 429 {
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        return NetError::RateLimited {
            host: origin.to_owned(),
            retry_after,
        };
    }
    let body = response.body().as_deref().unwrap_or_default();
    let looks_html = body.trim_ascii_start().starts_with(b"<");
    #[derive(serde::Deserialize)]
    struct XrpcBody {
        error: Option<String>,
        message: Option<String>,
    }
    if !looks_html && let Ok(parsed) = serde_json::from_slice::<XrpcBody>(body) {
        return NetError::Xrpc {
            host: origin.to_owned(),
            method: method.to_owned(),
            status,
            error: parsed.error,
            message: parsed.message,
        };
    }
    NetError::Http {
        host: origin.to_owned(),
        method: method.to_owned(),
        status,
        body: if looks_html {
            "HTML error page".to_owned()
        } else {
            format!("{} bytes instead of a WebSocket upgrade", body.len())
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_urls() -> Result<(), NetError> {
        let url = |base: &str, cursor| {
            subscribe_url(base, SUBSCRIBE_REPOS, cursor).map(|url| url.to_string())
        };
        assert_eq!(
            url("http://127.0.0.1:2583", Some(7))?,
            "ws://127.0.0.1:2583/xrpc/com.atproto.sync.subscribeRepos?cursor=7"
        );
        assert_eq!(
            url("https://pds.example/", None)?,
            "wss://pds.example/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            url(
                "wss://relay.example/xrpc/com.atproto.sync.subscribeRepos?cursor=1",
                Some(2)
            )?,
            "wss://relay.example/xrpc/com.atproto.sync.subscribeRepos?cursor=2"
        );
        assert_eq!(
            subscribe_url("http://127.0.0.1:9", SUBSCRIBE_LABELS, Some(0))?.to_string(),
            "ws://127.0.0.1:9/xrpc/com.atproto.label.subscribeLabels?cursor=0"
        );
        assert!(matches!(
            url("ftp://pds.example", None),
            Err(NetError::BadUrl { .. })
        ));
        Ok(())
    }

    #[test]
    fn tls_settings_build() {
        assert!(tls_config().is_ok(), "{:?}", tls_config().err());
    }
}
