//! Durable media downloads: the recordings and logs a webhook event links to.
//!
//! Before the webhook is answered, each media link gets a job object next to the call's other
//! artifacts, `job.{artifact}.{event}.json`, encrypted like every object because the link works
//! as a password. Workers then download each link straight into the encryptor and a new upload
//! of the target artifact, and delete the job once the artifact is committed or the download has
//! failed for good. Jobs left by a stopped or crashed gateway are found again at start-up
//! ([`resume`]), so a download that was cut off completes after a restart.
//!
//! A later event (`call_analyzed` after `call_ended`) records its own job for every artifact
//! that does not exist yet, which retries media the earlier event lacked or failed to fetch.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};
use zeroize::Zeroizing;

use super::fetch::{ChunkSink, FetchPolicy, Fetcher};
use super::store_bytes;
use crate::config::MediaSettings;
use crate::envelope::{EncryptionContext, Encryptor};
use crate::ids::{ArtifactName, ObjectId};
use crate::server::{ApiError, AppState, read_object};
use crate::storage::Upload;

/// Prefix of job objects' artifact names.
pub const JOB_PREFIX: &str = "job.";
/// Encrypted bytes gathered before they are written to the upload.
const FLUSH_BYTES: usize = 256 * 1024;

/// The content of a job object.
#[derive(Serialize, Deserialize)]
struct JobRecord {
    url: String,
    artifact: ArtifactName,
    event: String,
}

impl Drop for JobRecord {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.url);
    }
}

/// The queue of jobs waiting for a worker: job object ids.
#[derive(Clone)]
pub struct JobQueue {
    sender: mpsc::UnboundedSender<ObjectId>,
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<ObjectId>>>,
}

impl Default for JobQueue {
    fn default() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        JobQueue {
            sender,
            receiver: Arc::new(Mutex::new(receiver)),
        }
    }
}

impl JobQueue {
    /// Writes the job object for downloading `url` into `target`, then queues it. A job that
    /// already exists (a repeated delivery) is neither written nor queued again.
    pub async fn record(
        &self,
        state: &AppState,
        target: &ObjectId,
        event: &str,
        url: Zeroizing<String>,
    ) -> Result<(), ApiError> {
        let job = job_id(target, event)?;
        let record = JobRecord {
            url: url.to_string(),
            artifact: target.artifact.clone(),
            event: event.to_owned(),
        };
        let bytes = Zeroizing::new(
            serde_json::to_vec(&record).map_err(|error| ApiError::Internal(error.to_string()))?,
        );
        match store_bytes(state, &job, &bytes).await {
            Ok(()) => {
                let _ = self.sender.send(job);
                Ok(())
            }
            Err(ApiError::AlreadyExists) => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn enqueue(&self, job: ObjectId) {
        let _ = self.sender.send(job);
    }
}

/// Builds the fetcher the media settings describe; `None` when no host is allowed, in which
/// case every job fails as not allowed.
pub fn fetcher(settings: &MediaSettings) -> Result<Option<Fetcher>, super::fetch::FetchError> {
    if settings.allowed_hosts.is_empty() {
        return Ok(None);
    }
    let policy = FetchPolicy {
        allowed_hosts: settings.allowed_hosts.clone(),
        allow_loopback_for_tests: settings.allow_loopback_for_tests,
        extra_ca_file: settings.extra_ca_file.clone(),
        max_bytes: settings.max_bytes,
        connect_timeout: std::time::Duration::from_secs(settings.connect_timeout_secs),
        total_timeout: std::time::Duration::from_secs(settings.total_timeout_secs),
        max_attempts: settings.max_attempts,
        initial_backoff: std::time::Duration::from_millis(settings.initial_backoff_ms),
        max_backoff: std::time::Duration::from_secs(settings.max_backoff_secs),
    };
    Fetcher::new(policy).map(Some)
}

/// Queues every job object left in storage by an earlier run. Nothing is queued unless every
/// practice's jobs were listed, so a retry after a failure queues no job twice.
pub async fn resume(state: &AppState) -> Result<usize, crate::storage::StorageError> {
    let found = find_jobs(state, JOB_PREFIX).await?;
    let count = found.len();
    for job in found {
        state.webhooks.jobs.enqueue(job);
    }
    Ok(count)
}

/// Queues the media and forward jobs left by an earlier run ([`resume`],
/// [`super::forward::resume`]), and retries while storage cannot list them. A gateway started
/// during a storage outage thus spools webhooks at once and resumes its jobs when storage returns.
pub async fn resume_until_listed(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut backoff = std::time::Duration::from_millis(500);
    // Each kind of job is listed once: a retry only lists what failed.
    let mut downloads = None;
    loop {
        let listed = async {
            if downloads.is_none() {
                downloads = Some(resume(&state).await?);
            }
            super::forward::resume(&state).await
        };
        let listed = tokio::select! {
            listed = listed => listed,
            () = shutdown.cancelled() => return,
        };
        match listed {
            Ok(forwards) => {
                let downloads = downloads.unwrap_or_default();
                if downloads + forwards > 0 {
                    info!(
                        downloads,
                        forwards, "resuming unfinished media downloads and forwards"
                    );
                }
                return;
            }
            Err(error) => {
                warn!(%error, retry_in_ms = backoff.as_millis() as u64, "cannot list unfinished media downloads yet");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
    }
}

/// Lists the objects of every configured practice whose artifact name starts with `prefix`.
pub async fn find_jobs(
    state: &AppState,
    prefix: &str,
) -> Result<Vec<ObjectId>, crate::storage::StorageError> {
    let mut found = Vec::new();
    for practice in &state.config.practices {
        found.extend(state.storage.find_artifacts(&practice.id, prefix).await?);
    }
    Ok(found)
}

/// Starts `workers` download workers that run until `shutdown` is cancelled.
pub fn spawn_workers(
    state: Arc<AppState>,
    workers: usize,
    shutdown: CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            loop {
                let next = async { state.webhooks.jobs.receiver.lock().await.recv().await };
                let job = tokio::select! {
                    job = next => job,
                    () = shutdown.cancelled() => return,
                };
                let Some(job) = job else { return };
                let span = info_span!("media_job", worker, practice = %job.practice, call = %job.call, job = %job.artifact);
                // A download cut off by shutdown stays in storage as a job and resumes at the
                // next start-up.
                tokio::select! {
                    () = run_job(&state, &job).instrument(span) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
    tasks
}

/// Runs one job to its end: the artifact stored, or the download failed for good.
async fn run_job(state: &AppState, job: &ObjectId) {
    let record = match read_object(state, job).await {
        Ok(bytes) => match serde_json::from_slice::<JobRecord>(&bytes) {
            Ok(record) => record,
            Err(_) => {
                error!("job object is not a valid job record; deleting it");
                let _ = state.storage.delete(job).await;
                return;
            }
        },
        Err(ApiError::NotFound) => return, // another worker finished it
        Err(error) => {
            // Storage or key trouble: leave the job for the next start-up.
            error!(error = %error, "cannot read the job object; it stays queued for the next start");
            return;
        }
    };
    let target = ObjectId::new(
        job.practice.clone(),
        job.call.clone(),
        record.artifact.clone(),
    );

    let outcome = match state.storage.exists(&target).await {
        Ok(true) => {
            info!(artifact = %target.artifact, "artifact already stored; job skipped");
            "skipped"
        }
        Ok(false) => download(state, &target, &record.url).await,
        Err(error) => {
            error!(error = %error, "cannot check the target artifact; the job stays for the next start");
            return;
        }
    };
    state
        .metrics
        .record_background_task("media_download", outcome);
    if let Err(error) = state.storage.delete(job).await {
        warn!(error = %error, "cannot delete the finished job object; it will be skipped at the next start");
    }
}

/// Downloads `url` into `target`; returns the outcome for the metric.
async fn download(state: &AppState, target: &ObjectId, url: &str) -> &'static str {
    let Some(fetcher) = &state.webhooks.fetcher else {
        error!(artifact = %target.artifact, "media download refused: no media host is allowed in the configuration");
        return "failed";
    };
    let result = fetcher
        .fetch(url, |_attempt| EncryptingUpload::start(state, target))
        .await;
    match result {
        Ok(fetched) => match fetched.sink.commit().await {
            Ok(()) | Err(ApiError::AlreadyExists) => {
                info!(artifact = %target.artifact, bytes = fetched.bytes, attempts = fetched.attempts, "media stored");
                "stored"
            }
            Err(error) => {
                error!(artifact = %target.artifact, error = %error, "committing the media failed");
                "failed"
            }
        },
        Err(error) => {
            // The fetcher's errors never contain the URL.
            error!(artifact = %target.artifact, kind = error.kind(), error = %error, "media download failed for good");
            "failed"
        }
    }
}

/// An upload of one artifact that encrypts each downloaded chunk as it arrives.
struct EncryptingUpload {
    encryptor: Encryptor,
    upload: Upload,
    out: BytesMut,
}

impl EncryptingUpload {
    async fn start(state: &AppState, target: &ObjectId) -> Result<Self, ApiError> {
        let keys = state
            .keys
            .get(&target.practice)
            .ok_or(ApiError::Forbidden)?;
        let context = EncryptionContext::for_object(target);
        let (data_key, edk) = keys.generate_data_key(&context).await?;
        let frame_length = state.config.envelope.frame_length;
        let encryptor = Encryptor::new(&data_key, vec![edk], context, frame_length)?;
        let mut upload = state.storage.start_upload(target).await?;
        upload
            .write(Bytes::copy_from_slice(encryptor.header()))
            .await?;
        Ok(EncryptingUpload {
            encryptor,
            upload,
            out: BytesMut::new(),
        })
    }

    async fn commit(mut self) -> Result<(), ApiError> {
        self.encryptor.finish(&mut self.out);
        self.upload.write(self.out.split().freeze()).await?;
        self.upload.commit().await?;
        Ok(())
    }
}

impl ChunkSink for EncryptingUpload {
    type Error = ApiError;

    async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), ApiError> {
        self.encryptor.update(&chunk, &mut self.out)?;
        if self.out.len() >= FLUSH_BYTES {
            self.upload.write(self.out.split().freeze()).await?;
        }
        Ok(())
    }

    async fn abort(self) {
        let _ = self.upload.abort().await;
    }
}

/// The job object of downloading into `target` for `event`.
fn job_id(target: &ObjectId, event: &str) -> Result<ObjectId, ApiError> {
    let name = ArtifactName::new(format!("{JOB_PREFIX}{}.{event}.json", target.artifact))?;
    Ok(ObjectId::new(
        target.practice.clone(),
        target.call.clone(),
        name,
    ))
}
