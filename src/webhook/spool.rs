//! The webhook spool: verified events kept encrypted on local disk while storage is unreachable.
//!
//! A verified event whose store fails because storage is unreachable, or does not finish within
//! `webhooks.store_timeout_secs`, is not rejected. The gateway encrypts it exactly as its stored
//! object would be (the practice's key, the object's encryption context), writes that message to
//! the spool directory and responds with 202. Only a spool without room for the message
//! (`webhooks.spool_max_bytes`) or one that cannot be written gets a 503, and Retell retries.
//!
//! The drainer ([`spawn_drainer`]) copies spooled messages into storage oldest first, byte for
//! byte (unless the same body is stored already), and completes each event's transcript,
//! analysis and media jobs as a repeated delivery would. A file leaves the spool only after all
//! of that is stored. When a store fails, the drainer requests a storage listing. If that fails
//! too, storage is down and the drainer backs off. Otherwise only that message waits. After a
//! store timed out, new deliveries go straight to the spool while it contains events, instead of
//! each waiting for the timeout.
//!
//! The spool contains no plaintext: each file is a complete AWS Encryption SDK message whose header
//! names the object it belongs to. Files are named `{received_ms}-{sequence}.esdk`, so name
//! order is arrival order. A file is written under a temporary name, synced, renamed into place
//! and the directory synced, so a crash leaves either a whole file or a temporary one, which the
//! next start removes. A file that cannot be delivered at all moves to `quarantine/` beside the
//! spool files: one that fails authentication, or whose practice is no longer configured.
//! Nothing is deleted unread, and quarantined files do not count against the spool's size; a
//! file removed by hand is forgotten.
//!
//! NOTE: media links in a spooled event are downloaded only once the event is delivered. A link
//! that expires during a long outage (Retell's live for about 10 minutes) is lost, and only a
//! later `call_analyzed` event brings fresh links for a recording still missing.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use zeroize::Zeroizing;

use super::event::{Event, parse_version_name};
use super::{Sealed, SealedSlot, Stored, forward_event, store_event};
use crate::envelope::{
    ARTIFACT_KEY, CALL_KEY, Decryptor, MAX_HEADER_LEN, PRACTICE_KEY, ParsedHeader,
};
use crate::ids::{ArtifactName, CallId, ObjectId, PracticeId};
use crate::metrics::Metrics;
use crate::server::{ApiError, AppState};

/// The extension of spooled messages.
const EXTENSION: &str = "esdk";
/// The directory, inside the spool, of files that cannot be delivered.
pub const QUARANTINE: &str = "quarantine";
/// The first and the longest wait between the drainer's attempts while storage is unreachable.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How many store timeouts one delivery of a spooled message may take before the drainer goes on
/// to the next message: the drainer has no client waiting, so it gives large events more time.
const DELIVERY_TIMEOUTS: u64 = 6;

/// A spool operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "storage is unreachable and the webhook spool is full ({used} of {limit} bytes used); retry later"
    )]
    Full { used: u64, limit: u64 },
    #[error("storage is unreachable and the webhook spool cannot be written; retry later")]
    Unwritable(#[source] io::Error),
    #[error("the webhook spool directory {path} cannot be opened")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl SpoolError {
    /// Returns a short, fixed reason for the audit log and the metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SpoolError::Full { .. } => "spool_full",
            SpoolError::Unwritable(_) | SpoolError::Open { .. } => "spool_unwritable",
        }
    }
}

/// One spooled message: its file name and the object it becomes.
#[derive(Clone, Debug)]
pub struct Spooled {
    pub file: String,
    pub id: ObjectId,
    size: u64,
}

/// The spool directory and what it holds.
pub struct Spool {
    directory: PathBuf,
    max_bytes: u64,
    contents: Mutex<Contents>,
    sequence: AtomicU64,
    /// Set when a store failed for storage reasons, cleared when one succeeds.
    storage_down: AtomicBool,
    wake: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Contents {
    files: BTreeMap<String, Spooled>,
    /// `{practice}/{call}/{base}/{digest}` of each spooled event version, for deduplication.
    versions: HashSet<String>,
    /// Bytes of the files, plus the bytes reserved by writes in progress.
    bytes: u64,
}

impl Spool {
    /// Opens the spool directory, creating it (mode 0700) if needed. Removes temporary files a
    /// crash left behind, indexes the spooled messages, and moves files that are not messages to
    /// quarantine.
    pub fn open(
        directory: &Path,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Spool, SpoolError> {
        let open_error = |source| SpoolError::Open {
            path: directory.to_owned(),
            source,
        };
        create_private_directory(directory).map_err(open_error)?;
        let mut contents = Contents::default();
        // Odd entries never stop start-up: they are set aside or ignored, and logged.
        for entry in fs::read_dir(directory).map_err(open_error)? {
            let entry = entry.map_err(open_error)?;
            let file_name = entry.file_name();
            let file_type = entry.file_type().map_err(open_error)?;
            if file_name == QUARANTINE && file_type.is_dir() {
                continue;
            }
            if !file_type.is_file() {
                warn!(entry = %file_name.to_string_lossy(), "ignoring a spool entry that is not a regular file");
                continue;
            }
            let Ok(name) = file_name.clone().into_string() else {
                set_aside(directory, &file_name, "a file name that is not UTF-8");
                continue;
            };
            let path = entry.path();
            if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(&path).map_err(open_error)?;
                continue;
            }
            match read_object_id(&path) {
                Ok(id) => {
                    let size = entry.metadata().map_err(open_error)?.len();
                    contents.insert(Spooled {
                        file: name,
                        id,
                        size,
                    });
                }
                Err(reason) => set_aside(directory, &file_name, reason),
            }
        }
        if !contents.files.is_empty() {
            info!(
                events = contents.files.len(),
                bytes = contents.bytes,
                "webhook events are waiting in the spool"
            );
        }
        let spool = Spool {
            directory: directory.to_owned(),
            max_bytes,
            contents: Mutex::new(contents),
            sequence: AtomicU64::new(0),
            storage_down: AtomicBool::new(false),
            wake: Notify::new(),
            metrics,
        };
        spool.update_gauges();
        Ok(spool)
    }

    /// Returns whether the last store failed for storage reasons and none has succeeded since.
    pub fn storage_down(&self) -> bool {
        self.storage_down.load(Ordering::Acquire)
    }

    pub fn set_storage_down(&self, down: bool) {
        if self.storage_down.swap(down, Ordering::AcqRel) != down {
            if down {
                warn!("storage is unreachable; webhook events go to the spool");
            } else {
                info!("storage is reachable again");
            }
        }
    }

    /// Whether a version of this event body is spooled: same practice, call, event type and
    /// body digest (the first 16 hex digits of its SHA-256).
    pub fn holds_version(
        &self,
        practice: &PracticeId,
        call: &CallId,
        base: &str,
        digest: &str,
    ) -> bool {
        self.lock()
            .versions
            .contains(&version_key(practice, call, base, digest))
    }

    /// Writes `message`, the sealed object `id`, to the spool and wakes the drainer.
    pub async fn put(&self, id: &ObjectId, message: Bytes) -> Result<(), SpoolError> {
        let size = message.len() as u64;
        {
            let mut contents = self.lock();
            if contents.bytes.saturating_add(size) > self.max_bytes {
                self.metrics.record_spool("rejected_full");
                return Err(SpoolError::Full {
                    used: contents.bytes,
                    limit: self.max_bytes,
                });
            }
            contents.bytes += size;
        }

        let received_ms = super::now_ms();
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let file = format!("{received_ms:013}-{sequence:010}.{EXTENSION}");
        let directory = self.directory.clone();
        let name = file.clone();
        let written = tokio::task::spawn_blocking(move || write_file(&directory, &name, &message))
            .await
            .unwrap_or_else(|join| Err(io::Error::other(join)));

        let mut contents = self.lock();
        contents.bytes -= size;
        if let Err(source) = written {
            drop(contents);
            self.metrics.record_spool("rejected_unwritable");
            return Err(SpoolError::Unwritable(source));
        }
        contents.insert(Spooled {
            file,
            id: id.clone(),
            size,
        });
        drop(contents);
        self.metrics.record_spool("spooled");
        self.update_gauges();
        self.wake.notify_one();
        Ok(())
    }

    /// Returns whether the spool has room for more messages.
    pub fn has_room(&self) -> bool {
        self.lock().bytes < self.max_bytes
    }

    /// Returns whether any message is spooled.
    pub fn holds_events(&self) -> bool {
        !self.lock().files.is_empty()
    }

    /// Lists every spooled message, oldest first.
    pub fn list(&self) -> Vec<Spooled> {
        self.lock().files.values().cloned().collect()
    }

    /// Reads a spooled message.
    pub async fn read(&self, spooled: &Spooled) -> io::Result<Vec<u8>> {
        tokio::fs::read(self.directory.join(&spooled.file)).await
    }

    /// Removes a delivered message.
    pub async fn remove(&self, spooled: &Spooled) -> io::Result<()> {
        let directory = self.directory.clone();
        let file = spooled.file.clone();
        let removed = tokio::task::spawn_blocking(move || {
            fs::remove_file(directory.join(&file))?;
            sync_directory(&directory)
        })
        .await
        .unwrap_or_else(|join| Err(io::Error::other(join)));
        if let Err(error) = removed
            && error.kind() != io::ErrorKind::NotFound
        {
            return Err(error);
        }
        self.forget(spooled);
        self.metrics.record_spool("delivered");
        Ok(())
    }

    /// Moves a message that cannot be delivered to the quarantine directory.
    pub async fn quarantine(&self, spooled: &Spooled) -> io::Result<()> {
        let directory = self.directory.clone();
        let file = spooled.file.clone();
        let moved = tokio::task::spawn_blocking(move || quarantine_file(&directory, file.as_ref()))
            .await
            .unwrap_or_else(|join| Err(io::Error::other(join)));
        if let Err(error) = moved
            && error.kind() != io::ErrorKind::NotFound
        {
            return Err(error);
        }
        self.forget(spooled);
        self.metrics.record_spool("quarantined");
        Ok(())
    }

    /// Drops a message from the index, for example one whose file was removed by hand.
    pub fn forget(&self, spooled: &Spooled) {
        let mut contents = self.lock();
        if let Some(removed) = contents.files.remove(&spooled.file) {
            contents.bytes -= removed.size;
            if let Some(key) = event_version_key(&removed.id) {
                contents.versions.remove(&key);
            }
        }
        drop(contents);
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let contents = self.lock();
        self.metrics
            .set_spool_size(contents.files.len() as u64, contents.bytes);
    }

    fn lock(&self) -> MutexGuard<'_, Contents> {
        self.contents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Contents {
    fn insert(&mut self, spooled: Spooled) {
        self.bytes += spooled.size;
        if let Some(key) = event_version_key(&spooled.id) {
            self.versions.insert(key);
        }
        self.files.insert(spooled.file.clone(), spooled);
    }
}

/// The failure of one delivery attempt of a spooled message.
pub enum DeliveryError {
    /// Storage failed: stop the pass and try again later.
    Storage(String),
    /// The practice's key failed (KMS down, key disabled): try this message again later, and go
    /// on with the other practices' messages meanwhile.
    Key(String),
    /// The message can never be delivered: quarantine it.
    Undeliverable(&'static str),
    /// The file is gone, removed by hand: forget it.
    Vanished,
}

/// Starts the task that delivers spooled messages until `shutdown` is cancelled.
///
/// Each pass goes through the spool oldest first. A storage failure ends the pass; a key failure
/// skips only that message, so one practice's KMS outage does not hold up the others. Between
/// unfinished passes the drainer backs off, from 0.5 s up to 10 s.
pub fn spawn_drainer(
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let spool = &state.webhooks.spool;
        let mut backoff = FIRST_BACKOFF;
        loop {
            // `notified` is created before the check so that a put between the check and the
            // wait still wakes the drainer.
            let notified = spool.wake.notified();
            if !spool.holds_events() {
                tokio::select! {
                    () = notified => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            let pass = tokio::select! {
                finished = drain_pass(&state) => finished,
                () = shutdown.cancelled() => return,
            };
            if pass {
                backoff = FIRST_BACKOFF;
                continue;
            }
            if !sleep_or_stop(&shutdown, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })
}

/// Tries every spooled message once, oldest first; returns whether all were delivered.
async fn drain_pass(state: &AppState) -> bool {
    let spool = &state.webhooks.spool;
    let timeout = Duration::from_secs(state.config.webhooks.store_timeout_secs * DELIVERY_TIMEOUTS);
    let mut finished = true;
    for spooled in spool.list() {
        let (practice, call) = (&spooled.id.practice, &spooled.id.call);
        // A message whose store hangs (or waits for a hanging store of the same event) must
        // not hold up the others.
        let outcome = tokio::time::timeout(timeout, deliver_spooled(state, &spooled))
            .await
            .unwrap_or_else(|_| {
                Err(DeliveryError::Storage(format!(
                    "no result within {} s",
                    timeout.as_secs()
                )))
            });
        match outcome {
            Ok(()) => {
                spool.set_storage_down(false);
                if let Err(error) = spool.remove(&spooled).await {
                    // Left in place, it is delivered again after the next start as a duplicate,
                    // which stores nothing new.
                    error!(file = %spooled.file, %error, "cannot remove a delivered spool file; ignoring it until the next start");
                    spool.forget(&spooled);
                }
                info!(%practice, %call, "spooled webhook event delivered to storage");
            }
            Err(DeliveryError::Storage(reason)) => {
                // One path may fail while storage works: then only this message waits.
                if !storage_answers(state).await {
                    spool.set_storage_down(true);
                    warn!(%practice, %call, %reason, "spooled webhook events wait for storage");
                    return false;
                }
                warn!(%practice, %call, %reason, "spooled webhook event cannot be stored yet");
                finished = false;
            }
            Err(DeliveryError::Vanished) => {
                warn!(%practice, %call, file = %spooled.file, "spool file was removed by hand; forgetting it");
                spool.forget(&spooled);
            }
            Err(DeliveryError::Key(reason)) => {
                warn!(%practice, %call, %reason, "spooled webhook event waits for its practice's key");
                finished = false;
            }
            Err(DeliveryError::Undeliverable(reason)) => {
                error!(%practice, %call, file = %spooled.file, reason, "spooled webhook event cannot be delivered; moving it to quarantine");
                if let Err(error) = spool.quarantine(&spooled).await {
                    error!(file = %spooled.file, %error, "cannot quarantine a spool file; ignoring it until the next start");
                    spool.forget(&spooled);
                }
            }
        }
    }
    finished
}

/// Returns whether storage completes a listing within the store timeout.
async fn storage_answers(state: &AppState) -> bool {
    let timeout = Duration::from_secs(state.config.webhooks.store_timeout_secs);
    matches!(
        tokio::time::timeout(timeout, state.storage.check()).await,
        Ok(Ok(()))
    )
}

/// Delivers one spooled message: copies it into storage as is, then completes the event's
/// artifacts and media jobs, and forwards it if this delivery stored it.
async fn deliver_spooled(state: &AppState, spooled: &Spooled) -> Result<(), DeliveryError> {
    let message = state
        .webhooks
        .spool
        .read(spooled)
        .await
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => DeliveryError::Vanished,
            _ => DeliveryError::Undeliverable("the spool file cannot be read"),
        })?;
    let parsed = ParsedHeader::parse(&message)
        .ok()
        .flatten()
        .ok_or(DeliveryError::Undeliverable("no valid message header"))?;
    let id = object_id_of(&parsed).map_err(DeliveryError::Undeliverable)?;
    let (_, timestamp_ms, _) = parse_version_name(id.artifact.as_str())
        .ok_or(DeliveryError::Undeliverable("not an event version"))?;
    let practice = state
        .config
        .practice(&id.practice)
        .ok_or(DeliveryError::Undeliverable(
            "practice no longer configured",
        ))?;
    let keys = state
        .keys
        .get(&id.practice)
        .ok_or(DeliveryError::Undeliverable("practice has no keys"))?;

    let data_key = keys
        .unwrap(&parsed.header.edks, &parsed.header.context)
        .await
        .map_err(|error| match ApiError::from(error) {
            ApiError::StoredObjectInvalid => {
                DeliveryError::Undeliverable("the data key does not unwrap")
            }
            // KMS down, a disabled key or an unreadable key file may all be put right.
            other => DeliveryError::Key(other.to_string()),
        })?;
    let mut decryptor = Decryptor::new(&parsed, &data_key)
        .map_err(|_| DeliveryError::Undeliverable("message failed authentication"))?;
    let mut plaintext = BytesMut::new();
    decryptor
        .update(&message[parsed.len()..], &mut plaintext)
        .and_then(|()| decryptor.finish())
        .map_err(|_| DeliveryError::Undeliverable("message failed authentication"))?;
    let body = Zeroizing::new(plaintext.to_vec());
    zeroize::Zeroize::zeroize(&mut plaintext[..]);
    let event =
        Event::parse(&body).map_err(|_| DeliveryError::Undeliverable("not a webhook event"))?;

    let sealed = SealedSlot::new(Some(Sealed {
        id,
        message: Bytes::from(message),
    }));
    match store_event(state, practice, &event, &body, timestamp_ms, &sealed).await {
        Ok(Stored::New { artifacts }) => {
            forward_event(state, practice, &event, &artifacts).await;
            Ok(())
        }
        Ok(Stored::Duplicate | Stored::Spooled) => Ok(()),
        Err(error @ ApiError::StorageUnavailable(_)) => {
            Err(DeliveryError::Storage(error.to_string()))
        }
        Err(
            error @ (ApiError::KeyServiceUnavailable(_)
            | ApiError::KeyRefused(_)
            | ApiError::KeyUnavailable(_)),
        ) => Err(DeliveryError::Key(error.to_string())),
        // Anything else (an artifact name the event makes invalid, a stored object that fails
        // authentication) fails the same way every time.
        Err(error) => {
            error!(error = %error, "storing a spooled webhook event failed");
            Err(DeliveryError::Undeliverable(error.reason()))
        }
    }
}

/// Sleeps for `duration`; returns false if `shutdown` came first.
async fn sleep_or_stop(shutdown: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => true,
        () = shutdown.cancelled() => false,
    }
}

/// Returns the object a spooled message names in its encryption context.
pub fn object_id_of(parsed: &ParsedHeader) -> Result<ObjectId, &'static str> {
    let context = &parsed.header.context;
    let field = |key| {
        context
            .get(key)
            .ok_or("missing object id in the encryption context")
    };
    let practice = PracticeId::new(field(PRACTICE_KEY)?).map_err(|_| "invalid practice id")?;
    let call = CallId::new(field(CALL_KEY)?).map_err(|_| "invalid call id")?;
    let artifact = ArtifactName::new(field(ARTIFACT_KEY)?).map_err(|_| "invalid artifact")?;
    Ok(ObjectId::new(practice, call, artifact))
}

/// Reads a spool file's header and returns the object it names.
fn read_object_id(path: &Path) -> Result<ObjectId, &'static str> {
    let mut prefix = Vec::new();
    fs::File::open(path)
        .and_then(|file| file.take(MAX_HEADER_LEN as u64).read_to_end(&mut prefix))
        .map_err(|_| "unreadable")?;
    let parsed = ParsedHeader::parse(&prefix)
        .ok()
        .flatten()
        .ok_or("no valid message header")?;
    object_id_of(&parsed)
}

fn version_key(practice: &PracticeId, call: &CallId, base: &str, digest: &str) -> String {
    format!("{practice}/{call}/{base}/{digest}")
}

fn event_version_key(id: &ObjectId) -> Option<String> {
    let (base, _, digest) = parse_version_name(id.artifact.as_str())?;
    Some(version_key(&id.practice, &id.call, base, digest))
}

/// Writes `bytes` to `directory/name` durably: a temporary file, synced, renamed, and the
/// directory synced.
fn write_file(directory: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let temporary = directory.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, directory.join(name))?;
        sync_directory(directory)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// Moves a file found at start-up that is not a spooled message to quarantine, or leaves it in
/// place (ignored) if that fails.
fn set_aside(directory: &Path, name: &std::ffi::OsStr, reason: &str) {
    let file_name = name.to_string_lossy();
    error!(file = %file_name, reason, "spool file is not a callseal message; moving it to quarantine");
    if let Err(error) = quarantine_file(directory, name) {
        error!(file = %file_name, %error, "cannot move the file to quarantine; it stays in the spool, ignored");
    }
}

fn quarantine_file(directory: &Path, name: &std::ffi::OsStr) -> io::Result<()> {
    let quarantine = directory.join(QUARANTINE);
    create_private_directory(&quarantine)?;
    fs::rename(directory.join(name), quarantine.join(name))?;
    sync_directory(&quarantine)?;
    sync_directory(directory)
}

fn sync_directory(directory: &Path) -> io::Result<()> {
    fs::File::open(directory)?.sync_all()
}

fn create_private_directory(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(artifact: &str) -> ObjectId {
        ObjectId::new(
            PracticeId::new("clinic-1").unwrap(),
            CallId::new("call_1").unwrap(),
            ArtifactName::new(artifact).unwrap(),
        )
    }

    #[tokio::test]
    async fn full_spool_refuses_and_keeps_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 100, Metrics::new()).unwrap();
        let first = id("event-call_ended.v0000000000001-00000000000000aa.json");
        spool.put(&first, Bytes::from(vec![1; 60])).await.unwrap();
        let rejected = spool.put(&id("x.json"), Bytes::from(vec![2; 41])).await;
        assert!(
            matches!(
                rejected,
                Err(SpoolError::Full {
                    used: 60,
                    limit: 100
                })
            ),
            "{rejected:?}"
        );
        spool
            .put(&id("y.json"), Bytes::from(vec![3; 40]))
            .await
            .unwrap();
        assert_eq!(spool.list().len(), 2);
        let practice = PracticeId::new("clinic-1").unwrap();
        let call = CallId::new("call_1").unwrap();
        assert!(spool.holds_version(&practice, &call, "event-call_ended", "00000000000000aa"));
        assert!(!spool.holds_version(&practice, &call, "event-call_ended", "00000000000000ab"));
    }

    #[tokio::test]
    async fn unwritable_directory_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let spool = Spool::open(&spool_dir, 7, Metrics::new()).unwrap();
        fs::remove_dir(&spool_dir).unwrap();
        fs::write(&spool_dir, b"not a directory").unwrap();
        let rejected = spool
            .put(&id("x.json"), Bytes::from_static(b"message"))
            .await;
        assert!(
            matches!(rejected, Err(SpoolError::Unwritable(_))),
            "{rejected:?}"
        );
        assert!(spool.list().is_empty());
        // The failed write released its reservation.
        fs::remove_file(&spool_dir).unwrap();
        fs::create_dir(&spool_dir).unwrap();
        spool
            .put(&id("x.json"), Bytes::from_static(b"message"))
            .await
            .unwrap();
    }

    #[test]
    fn odd_entries_do_not_stop_start_up() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the quarantine directory goes, so nothing can be quarantined.
        fs::write(dir.path().join(QUARANTINE), b"in the way").unwrap();
        let odd_name = std::ffi::OsStr::from_bytes(b"bad-\xff-name");
        fs::write(dir.path().join(odd_name), b"not a message").unwrap();
        fs::create_dir(dir.path().join("a-directory")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("dangling")).unwrap();
        let spool = Spool::open(dir.path(), 1000, Metrics::new()).unwrap();
        assert!(spool.list().is_empty());
        assert!(dir.path().join(odd_name).exists(), "left in place, ignored");
    }

    #[test]
    fn start_up_removes_temporary_files_and_quarantines_strangers() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(".0000000000001-0000000000.esdk.tmp"),
            b"half",
        )
        .unwrap();
        fs::write(
            dir.path().join("0000000000002-0000000000.esdk"),
            b"not a message",
        )
        .unwrap();
        let spool = Spool::open(dir.path(), 1000, Metrics::new()).unwrap();
        assert!(spool.list().is_empty());
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [QUARANTINE]);
        assert!(
            dir.path()
                .join(QUARANTINE)
                .join("0000000000002-0000000000.esdk")
                .exists()
        );
    }
}
