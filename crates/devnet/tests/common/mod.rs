//! Helpers the devnet integration tests share: a firehose client that decodes every frame,
//! DID key lookup, and small HTTP shorthands.

#![allow(dead_code, unreachable_pub, clippy::large_enum_variant)]

use std::time::Duration;

use atpdb_devnet::Devnet;
use atpdb_repo::crypto::PublicKey;
use atpdb_repo::firehose::{Frame, decode_frame};
use atpdb_repo::syntax::Did;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long any single wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// What one read from a firehose produced.
#[derive(Debug)]
pub enum Read {
    /// A decoded frame.
    Frame(Frame),
    /// A binary message that does not decode (the reason).
    Undecodable(String),
    /// The connection ended (cleanly or not).
    Closed,
}

/// A firehose consumer.
pub struct Firehose {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Firehose {
    /// Connects to `subscribeRepos` at `base` (`http://…`), from `cursor` if given.
    pub async fn connect(
        base: &str,
        cursor: Option<u64>,
    ) -> Result<Firehose, Box<dyn std::error::Error>> {
        let mut url = format!(
            "{}/xrpc/com.atproto.sync.subscribeRepos",
            base.replacen("http://", "ws://", 1)
        );
        if let Some(cursor) = cursor {
            url.push_str(&format!("?cursor={cursor}"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Firehose { ws })
    }

    /// Connects over a socket with a tiny receive buffer, so that a consumer that stops
    /// reading is noticed by the server quickly.
    pub async fn connect_small_buffer(base: &str) -> Result<Firehose, Box<dyn std::error::Error>> {
        let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse()?;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let stream = socket.connect(addr).await?;
        let url = format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await?;
        Ok(Firehose { ws })
    }

    /// The next frame, or why there is none; fails the test after [`PATIENCE`].
    pub async fn next(&mut self) -> Result<Read, Box<dyn std::error::Error>> {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .map_err(|_| "firehose: no frame within the time limit")?;
            return Ok(match message {
                None | Some(Ok(WsMessage::Close(_))) | Some(Err(_)) => Read::Closed,
                Some(Ok(WsMessage::Binary(bytes))) => match decode_frame(&bytes) {
                    Ok(frame) => Read::Frame(frame),
                    Err(err) => Read::Undecodable(err.to_string()),
                },
                Some(Ok(_)) => continue,
            });
        }
    }

    /// The next frame, which must decode.
    pub async fn frame(&mut self) -> Result<Frame, Box<dyn std::error::Error>> {
        match self.next().await? {
            Read::Frame(frame) => Ok(frame),
            other => Err(format!("expected a frame, got {other:?}").into()),
        }
    }

    /// Frames until one has seq ≥ `until` (inclusive).
    pub async fn frames_until(
        &mut self,
        until: u64,
    ) -> Result<Vec<Frame>, Box<dyn std::error::Error>> {
        let mut frames = Vec::new();
        loop {
            let frame = self.frame().await?;
            let seq = seq_of(&frame);
            frames.push(frame);
            if seq.is_some_and(|seq| seq >= until) {
                return Ok(frames);
            }
        }
    }
}

/// A frame's seq, if it is a sequenced message.
pub fn seq_of(frame: &Frame) -> Option<u64> {
    match frame {
        Frame::Message(message) => message.seq(),
        _ => None,
    }
}

/// An account's current `#atproto` key, from the devnet's PLC directory.
pub fn key_of(devnet: &Devnet, did: &Did) -> Result<PublicKey, Box<dyn std::error::Error>> {
    let data = devnet
        .plc()
        .data(did)
        .ok_or("DID not in the PLC directory")?;
    let key = data
        .verification_methods
        .get("atproto")
        .ok_or("no atproto key")?;
    Ok(PublicKey::from_did_key(key)?)
}

/// A client that never follows redirects (tests look at them).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(PATIENCE)
        .build()
        .unwrap_or_default()
}

/// `GET base/xrpc/nsid?query` as JSON, with the status.
pub async fn xrpc_get(
    base: &str,
    nsid: &str,
    query: &[(&str, &str)],
) -> Result<(u16, serde_json::Value), Box<dyn std::error::Error>> {
    let response = http()
        .get(format!("{base}/xrpc/{nsid}"))
        .query(query)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// Polls `check` every 20 ms until it holds, failing after [`PATIENCE`].
pub async fn eventually(mut check: impl FnMut() -> bool, what: &str) -> TestResult {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
