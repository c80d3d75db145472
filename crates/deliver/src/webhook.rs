//! Webhook delivery: events POSTed to one URL; any 2xx acknowledges.
//!
//! As Tap: the body is the event's JSON exactly as `/channel` sends it, with
//! `Content-Type: application/json` and HTTP Basic `admin:<password>` when a password is set;
//! a failed call is retried with backoff until it succeeds (nothing is dropped). Beyond Tap:
//! events can go several to a request (a JSON array), and each body can be signed with
//! HMAC-SHA256 so the receiver knows it came from us.

use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_lc_rs::hmac;
use tokio_util::sync::CancellationToken;

use crate::{Consumer, Delivery, DeliveryError, Outgoing};

/// The header carrying `sha256=<hex HMAC-SHA256 of the body>` when a secret is set.
pub const SIGNATURE_HEADER: &str = "x-atpdb-signature";

/// Where and how webhook calls go.
#[derive(Clone)]
pub struct WebhookConfig {
    /// The receiver.
    pub url: String,
    /// Sent as HTTP Basic `admin:<password>` (Tap sends its admin password this way).
    pub admin_password: Option<String>,
    /// Signs each body (see [`SIGNATURE_HEADER`]).
    pub secret: Option<Vec<u8>>,
    /// Events per request: 1 sends Tap's body (one event object); more sends a JSON array.
    pub batch: usize,
    /// Requests in flight at once.
    pub parallelism: usize,
    /// How long one request may take.
    pub timeout: Duration,
    /// First retry delay; doubles up to `backoff_max` (Tap: 1 s to 10 s).
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("batch", &self.batch)
            .field("parallelism", &self.parallelism)
            .field("signed", &self.secret.is_some())
            .finish_non_exhaustive()
    }
}

impl WebhookConfig {
    /// Tap's behaviour for `url`: one event a request, 30 s timeout, backoff 1 s to 10 s.
    pub fn new(url: impl Into<String>) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            admin_password: None,
            secret: None,
            batch: 1,
            parallelism: 16,
            timeout: Duration::from_secs(30),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`, as sent in
/// [`SIGNATURE_HEADER`]. Receivers compute the same and compare in constant time.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in tag.as_ref() {
        out.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(byte & 15)]));
    }
    out
}

pub(crate) fn spawn(
    config: WebhookConfig,
    delivery: &Delivery,
    cancel: CancellationToken,
) -> Result<(), DeliveryError> {
    let client = reqwest::Client::builder()
        .timeout(config.timeout)
        .user_agent(concat!("atpdb/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|err| DeliveryError::Webhook(err.to_string()))?;
    for _ in 0..config.parallelism.max(1) {
        let worker = Worker {
            consumer: delivery.worker(false),
            client: client.clone(),
            config: config.clone(),
            delivery: delivery.clone(),
        };
        tokio::spawn(worker.run(cancel.clone()));
    }
    Ok(())
}

struct Worker {
    consumer: Consumer,
    client: reqwest::Client,
    config: WebhookConfig,
    delivery: Delivery,
}

impl Worker {
    async fn run(mut self, cancel: CancellationToken) {
        let mut batch = Vec::with_capacity(self.config.batch.max(1));
        loop {
            let first = tokio::select! {
                () = cancel.cancelled() => return,
                next = self.consumer.next() => match next {
                    Some(outgoing) => outgoing,
                    None => return,
                },
            };
            batch.clear();
            batch.push(first);
            self.consumer.try_next(self.config.batch.max(1), &mut batch);
            let body = body_of(&batch);
            let mut delay = self.config.backoff_min;
            loop {
                match self.post(&body).await {
                    Ok(()) => break,
                    Err(reason) => {
                        self.delivery
                            .stats()
                            .webhook_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(url = %self.config.url, %reason, retry_in = ?delay, "webhook.failed");
                        let jitter =
                            Duration::from_millis(u64::from(rand_jitter()) % 1000).min(delay / 2);
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(delay + jitter) => {}
                        }
                        delay = (delay * 2).min(self.config.backoff_max);
                    }
                }
            }
            for outgoing in &batch {
                self.consumer.ack(outgoing.id);
            }
        }
    }

    async fn post(&self, body: &[u8]) -> Result<(), String> {
        let mut request = self
            .client
            .post(&self.config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(password) = &self.config.admin_password {
            request = request.basic_auth("admin", Some(password));
        }
        if let Some(secret) = &self.config.secret {
            request = request.header(SIGNATURE_HEADER, sign(secret, body));
        }
        let response = request.send().await.map_err(|err| err.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("status {}", response.status()))
        }
    }
}

/// One event's frame as is; several as a JSON array of them.
fn body_of(batch: &[Outgoing]) -> Vec<u8> {
    if let [one] = batch {
        return one.frame.to_vec();
    }
    let mut body = Vec::with_capacity(batch.iter().map(|o| o.frame.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (index, outgoing) in batch.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&outgoing.frame);
    }
    body.push(b']');
    body
}

/// A little jitter so retries from many workers do not arrive together.
fn rand_jitter() -> u32 {
    use std::hash::BuildHasher;
    // Each `RandomState` is freshly seeded: enough randomness for spreading retries.
    std::collections::hash_map::RandomState::new().hash_one(0u8) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc_4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn batches_are_json_arrays_and_single_events_are_bare() {
        let one = Outgoing {
            id: 1,
            frame: bytes::Bytes::from_static(b"{\"id\":1}"),
        };
        let two = Outgoing {
            id: 2,
            frame: bytes::Bytes::from_static(b"{\"id\":2}"),
        };
        assert_eq!(body_of(std::slice::from_ref(&one)), b"{\"id\":1}");
        assert_eq!(body_of(&[one, two]), b"[{\"id\":1},{\"id\":2}]");
    }
}
