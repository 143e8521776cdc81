//! Downstream forwarding: a redacted copy of each newly stored event, POSTed to the practice's
//! own URL.
//!
//! The copy is built up from an allowlist of non-PHI fields plus the paths of the stored
//! artifacts ([`super::event::Event::redacted`]). It is signed like Retell signs its webhooks,
//! with the practice's forwarding secret: `x-callseal-signature: v=<unix ms>,d=<hex HMAC-SHA256
//! of the body followed by the timestamp>`. Delivery goes through the same address guard as media
//! downloads and is retried with exponential backoff and full jitter.
//!
//! NOTE: pending forwards live in memory only; a copy still being retried when the gateway stops
//! is lost (the event itself is stored).

use std::time::Duration;

use bytes::Bytes;

use tracing::{Instrument, error, info, info_span, warn};

use super::fetch::{self, Fetcher};
use super::signature::sign;
use crate::config::Forward;
use crate::metrics::Metrics;

/// The header carrying callseal's signature on forwarded copies.
pub const SIGNATURE_HEADER: &str = "x-callseal-signature";
/// Attempts per forwarded copy, the first one included.
const MAX_ATTEMPTS: u32 = 6;
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Sends redacted copies in background tasks.
#[derive(Clone)]
pub struct Forwarder {
    fetcher: Fetcher,
    metrics: std::sync::Arc<Metrics>,
}

impl Forwarder {
    pub fn new(fetcher: Fetcher, metrics: std::sync::Arc<Metrics>) -> Self {
        Forwarder { fetcher, metrics }
    }

    /// Starts delivering `copy` to the practice's URL in the background.
    pub fn send(&self, forward: Forward, copy: serde_json::Value) {
        let forwarder = self.clone();
        let span = info_span!(
            "forward",
            event = copy["event"].as_str().unwrap_or("?").to_owned()
        );
        tokio::spawn(
            async move {
                let outcome = forwarder.deliver(&forward, &copy).await;
                forwarder.metrics.record_background_task("forward", outcome);
            }
            .instrument(span),
        );
    }

    async fn deliver(&self, forward: &Forward, copy: &serde_json::Value) -> &'static str {
        let body = Bytes::from(copy.to_string());
        for attempt in 1..=MAX_ATTEMPTS {
            let timestamp = super::now_ms();
            let signature = sign(forward.secret.expose().as_bytes(), &body, timestamp);
            match self
                .fetcher
                .post(&forward.url, body.clone(), &[(SIGNATURE_HEADER, signature)])
                .await
            {
                Ok(status) if (200..300).contains(&status) => {
                    info!(attempt, status, "redacted event forwarded");
                    return "stored";
                }
                Ok(status) if status != 429 && (400..500).contains(&status) => {
                    error!(
                        attempt,
                        status, "downstream refused the forwarded event; not retrying"
                    );
                    return "failed";
                }
                Ok(status) => warn!(attempt, status, "forwarding failed; retrying"),
                Err(error) if !error.is_retryable() => {
                    error!(attempt, kind = error.kind(), error = %error, "forwarding failed; not retrying");
                    return "failed";
                }
                Err(error) => {
                    warn!(attempt, kind = error.kind(), error = %error, "forwarding failed; retrying")
                }
            }
            if attempt < MAX_ATTEMPTS {
                let cap = fetch::backoff_cap(attempt, INITIAL_BACKOFF, MAX_BACKOFF);
                let delay = getrandom::u64().map_or(cap, |random| fetch::jittered(cap, random));
                tokio::time::sleep(delay).await;
            }
        }
        error!(attempts = MAX_ATTEMPTS, "forwarding failed for good");
        "failed"
    }
}
