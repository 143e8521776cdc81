//! Retell webhooks: `POST /v1/webhooks/retell/{practice}`.
//!
//! The request lifecycle, in order:
//!
//! 1. Before the body is read: the practice must be configured with Retell keys, the
//!    `x-retell-signature` header must be well formed, and its timestamp must be within 5 minutes
//!    of the gateway's clock. Anything else gets 401.
//! 2. The body streams through one HMAC per key into a memory buffer, up to
//!    `webhooks.max_body_bytes` (413 beyond it, without reading further). Every buffered byte
//!    counts against `webhooks.max_unverified_bytes` across all requests; a full budget gets 503.
//!    Nothing of an unverified body ever reaches storage.
//! 3. The signature must match one of the practice's keys (401 otherwise), and the event's agent
//!    must be on the practice's agent allowlist when it has one (403 otherwise).
//! 4. The exact body is stored encrypted as a new version of `event-{type}`, with `transcript` and
//!    `analysis` artifacts beside it, and a durable download job is written for each media link.
//!    Only then does the gateway respond with 204. A body already stored (same call, event type
//!    and SHA-256) gets 204 without a second write. When storage is unreachable or slower than
//!    `webhooks.store_timeout_secs`, the encrypted event goes to the local [`spool`] instead and
//!    the response is 202. Only a full or unwritable spool gets 503, and Retell retries.
//! 5. Media downloads and the optional downstream copy run in the background ([`media`],
//!    [`forward`]).
//!
//! Versions: each distinct body is its own object, `{base}.v{timestamp}-{digest}.json`, and a read
//! of `{base}.json` serves the version with the latest signature timestamp ([`current_version`]).

pub mod event;
pub mod fetch;
pub mod forward;
pub mod media;
pub mod signature;
pub mod spool;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{Semaphore, TryAcquireError};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::audit::{Action, PrincipalName, RequestId, Role};
use crate::config::{Config, MediaSettings, Practice};
use crate::envelope::{EncryptionContext, Encryptor};
use crate::ids::{ArtifactName, ObjectId, PracticeId};
use crate::metrics::Metrics;
use crate::server::{ApiError, AppState, Connection, ResponseBody, Trail, full_body};
use crate::storage::{Storage, StorageError};
use event::{Event, parse_version_name, version_name};
use signature::{BodyVerifier, Signature, SignatureError};
use spool::{Spool, SpoolError};

/// The header Retell signs its webhooks with.
pub const SIGNATURE_HEADER: &str = "x-retell-signature";

/// Shared state of the webhook route.
pub struct WebhookState {
    /// Body bytes that may be held before their signature is checked, across all requests.
    unverified_budget: Arc<Semaphore>,
    pub jobs: media::JobQueue,
    /// Serializes the storing of one event type for one call.
    event_locks: KeyedLocks,
    /// The media download client; `None` when no media host is allowed.
    pub fetcher: Option<fetch::Fetcher>,
    /// The downstream client; `None` when no practice forwards.
    pub forwarder: Option<forward::Forwarder>,
    /// Events waiting for storage to return.
    pub spool: Spool,
}

/// The webhook route could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("invalid media or forwarding settings")]
    Fetch(#[from] fetch::FetchError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl WebhookState {
    /// Builds the route's state from the configuration: the unverified-bytes budget, the media
    /// fetcher, the forwarder and the spool.
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Result<Self, SetupError> {
        let max_unverified_bytes = config.webhooks.max_unverified_bytes;
        let permits = usize::try_from(max_unverified_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let forward_hosts: Vec<String> = config
            .practices
            .iter()
            .filter_map(|practice| practice.forward.as_ref())
            .filter_map(|forward| {
                reqwest::Url::parse(&forward.url)
                    .ok()?
                    .host_str()
                    .map(str::to_owned)
            })
            .collect();
        let forwarder = if forward_hosts.is_empty() {
            None
        } else {
            let settings = MediaSettings {
                allowed_hosts: forward_hosts,
                ..config.media.clone()
            };
            let fetcher = media::fetcher(&settings)?.expect("forward hosts are not empty");
            Some(forward::Forwarder::new(fetcher, Arc::clone(metrics)))
        };
        Ok(WebhookState {
            unverified_budget: Arc::new(Semaphore::new(permits)),
            jobs: media::JobQueue::default(),
            event_locks: KeyedLocks::default(),
            fetcher: media::fetcher(&config.media)?,
            forwarder,
            spool: Spool::open(
                &config.webhooks.spool_directory,
                config.webhooks.spool_max_bytes,
                Arc::clone(metrics),
            )?,
        })
    }
}

/// Handles one webhook delivery; `practice_segment` is the raw path segment.
pub async fn handle_retell(
    state: &Arc<AppState>,
    connection: &Connection,
    request_id: &RequestId,
    request: Request<Incoming>,
    practice_segment: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    // A practice id that is not even valid names nothing to audit.
    let practice_id = PracticeId::new(practice_segment)
        .map_err(|_| ApiError::WebhookUnauthenticated(SignatureError::Mismatch))?;
    tracing::Span::current().record("practice", practice_id.as_str());
    let mut trail = Trail::new(
        Arc::clone(&state.audit),
        request_id,
        Action::WebhookReceive,
        practice_id.clone(),
        None,
        None,
        connection.peer,
        connection.tls_version,
    );

    let verified = verify_delivery(state, &practice_id, request).await;
    let (practice, body, event, timestamp_ms) = match verified {
        Ok(verified) => verified,
        Err(error) => {
            trail.deny(error.reason()).await?;
            return Err(error);
        }
    };
    trail.set_call(event.call.clone());
    let (event, body) = (Arc::new(event), Arc::new(body));
    let principal = PrincipalName::new(RETELL_PRINCIPAL).expect("a valid principal name");
    trail.allow_as(principal, Some(Role::Ingest)).await?;

    let stored = store_or_spool(state, practice, &event, &body, timestamp_ms).await;
    let stored = match stored {
        Ok(stored) => stored,
        Err(error) => {
            trail
                .complete(error.status().as_u16(), 0, Some(&error))
                .await?;
            return Err(error);
        }
    };
    state
        .metrics
        .add_bytes_received("webhook", body.len() as u64);
    let status = match &stored {
        Stored::Duplicate => {
            info!(event = %event.kind, "duplicate webhook delivery; already stored");
            StatusCode::NO_CONTENT
        }
        Stored::New { artifacts } => {
            info!(event = %event.kind, bytes = body.len(), artifacts = artifacts.len(), "webhook event stored");
            StatusCode::NO_CONTENT
        }
        Stored::Spooled => {
            info!(event = %event.kind, bytes = body.len(), "webhook event spooled until storage returns");
            StatusCode::ACCEPTED
        }
    };
    trail
        .complete(status.as_u16(), body.len() as u64, None)
        .await?;

    let mut response = Response::new(full_body(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}

/// Sends the redacted copy of a newly stored event downstream, if the practice forwards.
/// `artifacts` starts with the stored event version.
async fn forward_event(
    state: &AppState,
    practice: &Practice,
    event: &Event,
    artifacts: &[ObjectId],
) {
    let (Some(forwarder), Some(forward)) = (&state.webhooks.forwarder, &practice.forward) else {
        return;
    };
    let Some(event_id) = artifacts.first() else {
        return;
    };
    let paths: Vec<String> = artifacts.iter().map(ToString::to_string).collect();
    let copy = event.redacted(practice.id.as_str(), &paths);
    forwarder
        .record(state, forward.clone(), event_id, copy)
        .await;
}

/// The principal name webhook deliveries are audited under.
pub const RETELL_PRINCIPAL: &str = "retell";

/// Checks everything that authenticates a delivery: the practice, the signature header and its
/// window, the body limits, the signature itself, the event's ids and its agent. Returns the
/// practice, the verified body, the parsed event and the signature timestamp.
async fn verify_delivery<'a>(
    state: &'a AppState,
    practice_id: &PracticeId,
    request: Request<Incoming>,
) -> Result<(&'a Practice, Zeroizing<Vec<u8>>, Event, u64), ApiError> {
    let practice = state
        .config
        .practice(practice_id)
        .filter(|practice| !practice.retell_keys.is_empty())
        .ok_or(ApiError::WebhookUnauthenticated(SignatureError::Mismatch))?;

    let header = request
        .headers()
        .get(SIGNATURE_HEADER)
        .map(|value| value.as_bytes());
    let signature = Signature::parse(header).map_err(ApiError::WebhookUnauthenticated)?;
    signature
        .check_window(now_ms())
        .map_err(ApiError::WebhookUnauthenticated)?;

    let limit = state.config.webhooks.max_body_bytes;
    if content_length(request.headers()).is_some_and(|length| length > limit) {
        return Err(ApiError::TooLarge { limit });
    }

    let body = read_verified_body(
        request.into_body(),
        practice,
        &signature,
        limit,
        &state.webhooks,
    )
    .await?;
    let event = Event::parse(&body).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    tracing::Span::current().record("call", event.call.as_str());

    if !practice.retell_agent_ids.is_empty() {
        let allowed = event
            .agent_id
            .as_ref()
            .is_some_and(|agent| practice.retell_agent_ids.contains(agent));
        if !allowed {
            return Err(ApiError::WebhookAgentNotAllowed);
        }
    }
    Ok((practice, body, event, signature.timestamp_ms))
}

/// Reads the whole body into memory while it runs through the HMACs, within the body limit and
/// the shared budget for unverified bytes, and checks the signature at the end.
async fn read_verified_body(
    mut body: Incoming,
    practice: &Practice,
    signature: &Signature,
    limit: u64,
    webhooks: &WebhookState,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let mut verifier = BodyVerifier::new(&practice.retell_keys);
    let mut buffer = Zeroizing::new(Vec::new());
    // Permits return to the budget when `held` drops, verified or not.
    let mut held = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ApiError::ClientBody)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buffer.len() as u64 + data.len() as u64 > limit {
            return Err(ApiError::TooLarge { limit });
        }
        let permits = u32::try_from(data.len()).map_err(|_| ApiError::TooLarge { limit })?;
        match Arc::clone(&webhooks.unverified_budget).try_acquire_many_owned(permits) {
            Ok(permit) => held.push(permit),
            Err(TryAcquireError::NoPermits) | Err(TryAcquireError::Closed) => {
                warn!(
                    "webhook rejected with 503: the budget for unverified body bytes is exhausted"
                );
                return Err(ApiError::Busy);
            }
        }
        verifier.update(&data);
        buffer.extend_from_slice(&data);
    }
    verifier
        .verify(signature)
        .map_err(ApiError::WebhookUnauthenticated)?;
    Ok(buffer)
}

/// The result of [`store_event`] and [`store_or_spool`].
enum Stored {
    /// The same body was already stored (or spooled) for this call and event type.
    Duplicate,
    /// A new version was stored, or an earlier delivery's missing transcript or analysis, with
    /// these artifacts.
    New { artifacts: Vec<ObjectId> },
    /// Storage was unreachable; the encrypted event waits in the spool.
    Spooled,
}

/// An event version encrypted for its object, ready to be written as is.
struct Sealed {
    id: ObjectId,
    message: Bytes,
}

/// The slot in which [`store_event`] leaves the message it sealed, for a caller that spools it
/// instead.
type SealedSlot = std::sync::Mutex<Option<Sealed>>;

fn lock_slot(slot: &SealedSlot) -> std::sync::MutexGuard<'_, Option<Sealed>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Returns the sealed message of `id` from `slot`, or seals one and leaves it there. A store that
/// timed out and the delivery that spools its event share the slot, so both write one message:
/// whichever is sealed first.
async fn sealed_message(
    state: &AppState,
    slot: &SealedSlot,
    id: &ObjectId,
    plaintext: &[u8],
) -> Result<Bytes, ApiError> {
    let existing = |slot: &Option<Sealed>| {
        slot.as_ref()
            .filter(|sealed| sealed.id == *id)
            .map(|sealed| sealed.message.clone())
    };
    if let Some(message) = existing(&lock_slot(slot)) {
        return Ok(message);
    }
    let message = seal(state, id, plaintext).await?;
    let mut current = lock_slot(slot);
    if let Some(first) = existing(&current) {
        return Ok(first);
    }
    *current = Some(Sealed {
        id: id.clone(),
        message: message.clone(),
    });
    Ok(message)
}

/// Stores the event, or spools it when storage is unreachable.
///
/// The store runs in its own task. When it exceeds the timeout, the task goes on and keeps the
/// event's lock, so an overlapping delivery of the same body waits for it. Meanwhile the delivery
/// spools the message the store sealed (both use one sealed message, see [`sealed_message`]). The
/// drainer then finds the version stored, or stores it.
///
/// After a store timed out, and while the spool still contains events, the store is not
/// attempted, so that each delivery does not wait out the timeout. The drainer finds out when
/// storage returns. A
/// store that fails at once (a path that cannot be written) changes nothing for other calls.
async fn store_or_spool(
    state: &Arc<AppState>,
    practice: &Practice,
    event: &Arc<Event>,
    body: &Arc<Zeroizing<Vec<u8>>>,
    timestamp_ms: u64,
) -> Result<Stored, ApiError> {
    let spool = &state.webhooks.spool;
    let slot = Arc::new(SealedSlot::default());
    if !(spool.storage_down() && spool.holds_events()) {
        let timeout = std::time::Duration::from_secs(state.config.webhooks.store_timeout_secs);
        let task = tokio::spawn(store_and_forward(
            Arc::clone(state),
            practice.id.clone(),
            Arc::clone(event),
            Arc::clone(body),
            timestamp_ms,
            Arc::clone(&slot),
        ));
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(Err(ApiError::StorageUnavailable(error)))) => {
                warn!(error = %error, "storing the webhook event failed; spooling it");
            }
            Ok(Ok(result)) => {
                if result.is_ok() {
                    spool.set_storage_down(false);
                }
                return result;
            }
            Ok(Err(join)) => return Err(ApiError::Internal(join.to_string())),
            Err(_elapsed) => {
                warn!(
                    timeout_secs = timeout.as_secs(),
                    "storing the webhook event timed out; spooling it"
                );
                spool.set_storage_down(true);
            }
        }
    }

    let base = event.artifact_base();
    let digest = hex::encode(&event.digest[..8]);
    if spool.holds_version(&practice.id, &event.call, &base, &digest) {
        return Ok(Stored::Duplicate);
    }
    let id = ObjectId::new(
        practice.id.clone(),
        event.call.clone(),
        ArtifactName::new(version_name(&base, timestamp_ms, &event.digest))?,
    );
    let message = sealed_message(state, &slot, &id, body).await?;
    spool.put(&id, message).await.map_err(|error| {
        warn!(error = %error, "webhook event rejected: storage is unreachable and the spool cannot store it");
        ApiError::Spool(error)
    })?;
    Ok(Stored::Spooled)
}

/// Runs [`store_event`] and sends the downstream copy of a new version, in a task of its own
/// that outlives a delivery that timed out or whose client went away.
async fn store_and_forward(
    state: Arc<AppState>,
    practice_id: PracticeId,
    event: Arc<Event>,
    body: Arc<Zeroizing<Vec<u8>>>,
    timestamp_ms: u64,
    slot: Arc<SealedSlot>,
) -> Result<Stored, ApiError> {
    let practice = state
        .config
        .practice(&practice_id)
        .ok_or(ApiError::Forbidden)?;
    let stored = store_event(&state, practice, &event, &body, timestamp_ms, &slot).await?;
    if let Stored::New { artifacts } = &stored {
        forward_event(&state, practice, &event, artifacts).await;
    }
    Ok(stored)
}

/// Stores the raw event as a new version (unless this body is already stored), then records the
/// media jobs and writes the transcript and analysis that are still missing.
///
/// The new version is written from `sealed` when that contains its message (a spooled event), and
/// otherwise sealed here and left in `sealed` for the caller.
///
/// A repeated delivery completes what an earlier, failed one left out, so Retell's retry after a
/// 503 never leaves a transcript or a media job missing for good. Deliveries of one event type
/// for one call are serialized, so overlapping retries of one body (each signed at another
/// timestamp) store a single version.
///
/// NOTE: the serialization is per process; two replicas receiving the same body at the same
/// moment could each store a version, which readers see as two identical versions.
async fn store_event(
    state: &AppState,
    practice: &Practice,
    event: &Event,
    body: &[u8],
    timestamp_ms: u64,
    sealed: &SealedSlot,
) -> Result<Stored, ApiError> {
    let base = event.artifact_base();
    let lock_key = format!("{}/{}/{base}", practice.id, event.call);
    let _serialized = state.webhooks.event_locks.lock(lock_key).await;

    let storage = &state.storage;
    let existing = storage.list_call(&practice.id, &event.call).await?;
    let digest = hex::encode(&event.digest[..8]);
    let stored_timestamp = existing.iter().find_map(|(name, _)| {
        let (version_base, timestamp, version_digest) = parse_version_name(name.as_str())?;
        (version_base == base && version_digest == digest).then_some(timestamp)
    });

    let object = |name: String| -> Result<ObjectId, ApiError> {
        Ok(ObjectId::new(
            practice.id.clone(),
            event.call.clone(),
            ArtifactName::new(name)?,
        ))
    };
    let version_timestamp = stored_timestamp.unwrap_or(timestamp_ms);
    let event_id = object(version_name(&base, version_timestamp, &event.digest))?;
    let is_new = stored_timestamp.is_none();
    if is_new {
        let message = sealed_message(state, sealed, &event_id, body).await?;
        // An earlier attempt whose commit finished after its caller gave up already stored it.
        match put_sealed(state, &event_id, message).await {
            Ok(()) | Err(ApiError::AlreadyExists) => {}
            Err(error) => return Err(error),
        }
    }
    let mut artifacts = vec![event_id];
    // Whether this call stored an artifact that an earlier, failed one left out. The event then
    // counts as new: its downstream copy was not sent yet.
    let mut completed_earlier = false;

    // Media jobs come before the derived artifacts: their links may expire within minutes.
    for (artifact, url) in event.media() {
        if existing.iter().any(|(name, _)| *name == artifact) {
            continue;
        }
        let target = ObjectId::new(practice.id.clone(), event.call.clone(), artifact);
        state
            .webhooks
            .jobs
            .record(state, &target, &event.kind, Zeroizing::new(url))
            .await?;
        artifacts.push(target);
    }

    let derived = [
        ("transcript", event.transcript()),
        ("analysis", event.analysis()),
    ];
    for (derived_base, content) in derived {
        let Some(content) = content.map(Zeroizing::new) else {
            continue;
        };
        let id = object(version_name(derived_base, version_timestamp, &event.digest))?;
        if existing.iter().any(|(name, _)| *name == id.artifact) {
            artifacts.push(id);
            continue;
        }
        match store_bytes(state, &id, &content).await {
            Ok(()) => {
                completed_earlier = true;
                artifacts.push(id);
            }
            Err(ApiError::AlreadyExists) => artifacts.push(id),
            Err(error) => return Err(error),
        }
    }

    Ok(if is_new || completed_earlier {
        Stored::New { artifacts }
    } else {
        Stored::Duplicate
    })
}

/// Async locks by key, created on demand and removed when no one holds or waits for them.
#[derive(Default)]
pub struct KeyedLocks {
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A held [`KeyedLocks`] entry; releases the key when dropped.
pub struct KeyedGuard<'a> {
    owner: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: String) -> KeyedGuard<'_> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(locks.entry(key.clone()).or_default())
        };
        let guard = lock.lock_owned().await;
        KeyedGuard {
            owner: self,
            key,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self
            .owner
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The guard held a clone of the lock. With it dropped, a count of one means only the map
        // holds the lock and nobody waits for it, so the entry can go.
        if locks
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

/// Encrypts `plaintext` into a new object `id`; fails with [`ApiError::AlreadyExists`] if the
/// object exists.
pub async fn store_bytes(
    state: &AppState,
    id: &ObjectId,
    plaintext: &[u8],
) -> Result<(), ApiError> {
    let message = seal(state, id, plaintext).await?;
    put_sealed(state, id, message).await
}

/// Encrypts `plaintext` in memory as the message of object `id`: a new data key, the object's
/// encryption context.
async fn seal(state: &AppState, id: &ObjectId, plaintext: &[u8]) -> Result<Bytes, ApiError> {
    let keys = state.keys.get(&id.practice).ok_or(ApiError::Forbidden)?;
    let context = EncryptionContext::for_object(id);
    let (data_key, edk) = keys.generate_data_key(&context).await?;
    let frame_length = state.config.envelope.frame_length;
    let mut encryptor = Encryptor::new(&data_key, vec![edk], context, frame_length)?;
    let mut out = BytesMut::from(encryptor.header());
    encryptor.update(plaintext, &mut out)?;
    encryptor.finish(&mut out);
    Ok(out.freeze())
}

/// Writes a sealed message as the new object `id`.
async fn put_sealed(state: &AppState, id: &ObjectId, message: Bytes) -> Result<(), ApiError> {
    let mut upload = state.storage.start_upload(id).await?;
    upload.write(message).await?;
    upload.commit().await?;
    Ok(())
}

/// Resolves a read of `{base}.json` to the stored version with the latest signature timestamp,
/// when no object has that exact name. Returns `None` when there is no version either.
pub async fn current_version(
    storage: &Storage,
    id: &ObjectId,
) -> Result<Option<ObjectId>, StorageError> {
    let Some(base) = id.artifact.as_str().strip_suffix(".json") else {
        return Ok(None);
    };
    let artifacts = storage.list_call(&id.practice, &id.call).await?;
    let latest = artifacts
        .into_iter()
        .filter_map(|(name, _)| {
            let (version_base, timestamp, digest) = parse_version_name(name.as_str())?;
            (version_base == base).then(|| (timestamp, digest.to_owned(), name.clone()))
        })
        .max();
    Ok(latest.map(|(_, _, name)| ObjectId::new(id.practice.clone(), id.call.clone(), name)))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
