//! Downstream forwarding: a redacted copy of each newly stored event, POSTed to the practice's
//! own URL.
//!
//! The copy is built up from an allowlist of non-PHI fields plus the paths of the stored
//! artifacts ([`super::event::Event::redacted`]). It is signed like Retell signs its webhooks,
//! with the practice's forwarding secret: `x-callseal-signature: v=<unix ms>,d=<hex HMAC-SHA256
//! of the body followed by the timestamp>`. Delivery goes through the same address guard as media
//! downloads and is retried with exponential backoff and full jitter.
//!
//! Each copy is first stored as an encrypted job object beside the event,
//! `forward.v{timestamp}-{digest}.json` (the event version's suffix), and the job is deleted once
//! the copy is delivered or has failed for good. Jobs left by a stopped gateway are sent again
//! after the next start ([`resume`]), so the receiver may see a copy twice and should treat the
//! event path in `artifacts` as its key.
//!
//! NOTE: if the gateway crashes between storing an event and storing its job, that event's copy
//! is never sent.

use std::time::Duration;

use bytes::Bytes;
use tracing::{Instrument, error, info, info_span, warn};

use super::event::parse_version_name;
use super::fetch::{self, Fetcher};
use super::signature::sign;
use super::store_bytes;
use crate::config::Forward;
use crate::ids::{ArtifactName, ObjectId};
use crate::metrics::Metrics;
use crate::server::{ApiError, AppState, read_object};
use crate::storage::{Storage, StorageError};

/// Prefix of forward jobs' artifact names.
pub const JOB_PREFIX: &str = "forward.";

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

    /// Stores `copy` of the event version `event` as a job, then delivers it in the background.
    /// If the job cannot be stored, the copy is still sent, from memory only.
    pub async fn record(
        &self,
        state: &AppState,
        forward: Forward,
        event: &ObjectId,
        copy: serde_json::Value,
    ) {
        let job = match job_id(event) {
            Some(job) => job,
            None => {
                error!(event = %event.artifact, "not an event version; forwarding without a job");
                self.send(forward, copy, None);
                return;
            }
        };
        let bytes = copy.to_string().into_bytes();
        match store_bytes(state, &job, &bytes).await {
            Ok(()) => self.send(forward, copy, Some((state.storage.clone(), job))),
            // A job for this version exists: its delivery is under way.
            Err(ApiError::AlreadyExists) => {}
            Err(error) => {
                warn!(%error, "cannot store the forward job; the copy is sent from memory only");
                self.send(forward, copy, None);
            }
        }
    }

    /// Starts delivering `copy` to the practice's URL in the background, then deletes its job.
    fn send(&self, forward: Forward, copy: serde_json::Value, job: Option<(Storage, ObjectId)>) {
        let forwarder = self.clone();
        let span = info_span!(
            "forward",
            event = copy["event"].as_str().unwrap_or("?").to_owned()
        );
        tokio::spawn(
            async move {
                let outcome = forwarder.deliver(&forward, &copy).await;
                forwarder.metrics.record_background_task("forward", outcome);
                if let Some((storage, job)) = job {
                    delete_job(&storage, &job).await;
                }
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

/// Sends again every forward job an earlier run left in storage. Nothing is sent unless every
/// practice's jobs were listed, so a retry after a failure sends no job twice.
pub async fn resume(state: &AppState) -> Result<usize, StorageError> {
    let Some(forwarder) = &state.webhooks.forwarder else {
        return Ok(0);
    };
    let found = super::media::find_jobs(state, JOB_PREFIX).await?;
    let count = found.len();
    for job in found {
        let forward = state
            .config
            .practice(&job.practice)
            .and_then(|practice| practice.forward.clone());
        let Some(forward) = forward else {
            warn!(practice = %job.practice, "practice no longer forwards; dropping its forward job");
            delete_job(&state.storage, &job).await;
            continue;
        };
        let copy = match read_object(state, &job).await {
            Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes).ok(),
            Err(error) => {
                error!(%error, practice = %job.practice, call = %job.call, "cannot read a forward job; it stays for the next start");
                continue;
            }
        };
        match copy {
            Some(copy) => forwarder.send(forward, copy, Some((state.storage.clone(), job))),
            None => {
                error!(practice = %job.practice, call = %job.call, "forward job is not JSON; deleting it");
                delete_job(&state.storage, &job).await;
            }
        }
    }
    Ok(count)
}

/// The forward job of an event version: `forward.v{timestamp}-{digest}.json`.
fn job_id(event: &ObjectId) -> Option<ObjectId> {
    let (_, timestamp, digest) = parse_version_name(event.artifact.as_str())?;
    let name = format!("{JOB_PREFIX}v{timestamp:013}-{digest}.json");
    let artifact = ArtifactName::new(name).ok()?;
    Some(ObjectId::new(
        event.practice.clone(),
        event.call.clone(),
        artifact,
    ))
}

async fn delete_job(storage: &Storage, job: &ObjectId) {
    if let Err(error) = storage.delete(job).await {
        warn!(%error, "cannot delete a finished forward job; it is sent again after the next start");
    }
}
