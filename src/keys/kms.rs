//! The AWS KMS keyring: a practice's customer-managed KMS key wraps each object's data key.
//!
//! Every object written gets its own `GenerateDataKey` call (32 bytes) under the object's
//! encryption context, so each write is one event in the practice's own CloudTrail, and KMS binds
//! the wrapped key to that context. Reads call `Decrypt` naming the key id and passing the same
//! context, and check that KMS answered with that key and 32 bytes. EDKs follow the AWS
//! Encryption SDK's KMS keyring layout: provider id `aws-kms`, provider info the key ARN that
//! KMS returned, ciphertext the `CiphertextBlob` as it is.
//!
//! Unwrapped data keys are cached briefly ([`DataKeyCache`]), keyed by the wrapped key and the
//! encryption context; a failure is never cached. Concurrent misses of one key share one
//! `Decrypt` call, and its failure reaches only the reads that waited for it. Throttling and server errors are retried by
//! the SDK with exponential backoff and jitter; what still fails maps to [`KeyError::KmsUnavailable`],
//! and an access-denied, disabled or pending-deletion key has an error of its own.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kms::Client;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use sha2::{Digest, Sha256};
use tracing::warn;
use zeroize::Zeroize;

use super::{DataKey, KEY_LEN, KeyError};
use crate::envelope::{EncryptedDataKey, EncryptionContext};
use crate::ids::PracticeId;
use crate::metrics::Metrics;

/// The EDK provider id of KMS-wrapped data keys.
pub const PROVIDER_ID: &str = "aws-kms";

/// The KMS key of one practice, and the client that reaches it.
#[derive(Clone)]
pub struct KmsKeyring {
    practice: PracticeId,
    key_arn: String,
    client: Client,
    cache: Arc<DataKeyCache>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for KmsKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsKeyring")
            .field("practice", &self.practice)
            .field("key_arn", &self.key_arn)
            .finish_non_exhaustive()
    }
}

impl KmsKeyring {
    pub fn new(
        practice: PracticeId,
        key_arn: String,
        client: Client,
        cache: Arc<DataKeyCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        KmsKeyring {
            practice,
            key_arn,
            client,
            cache,
            metrics,
        }
    }

    pub fn key_arn(&self) -> &str {
        &self.key_arn
    }

    /// Generates one object's data key under the practice's KMS key and `context`.
    pub async fn generate_data_key(
        &self,
        context: &EncryptionContext,
    ) -> Result<(DataKey, EncryptedDataKey), KeyError> {
        self.metrics.record_kms_call("GenerateDataKey");
        let output = self
            .client
            .generate_data_key()
            .key_id(&self.key_arn)
            .number_of_bytes(KEY_LEN as i32)
            .set_encryption_context(Some(context_map(context)))
            .send()
            .await
            .map_err(|error| self.classify(error))?;

        let key_id = output
            .key_id()
            .ok_or_else(|| self.bad_response("no key id"))?
            .to_owned();
        if !self.is_our_key(&key_id) {
            return Err(self.bad_response("a key id other than the practice's key"));
        }
        let wrapped = output
            .ciphertext_blob()
            .ok_or_else(|| self.bad_response("no ciphertext"))?;
        let mut plaintext = output
            .plaintext()
            .ok_or_else(|| self.bad_response("no plaintext key"))?
            .as_ref()
            .to_vec();
        let data_key = DataKey::from_slice(&plaintext);
        plaintext.zeroize();
        let data_key =
            data_key.map_err(|_| self.bad_response("a data key that is not 32 bytes"))?;

        let edk = EncryptedDataKey {
            provider_id: PROVIDER_ID.as_bytes().to_vec(),
            provider_info: key_id.into_bytes(),
            ciphertext: wrapped.as_ref().to_vec(),
        };
        Ok((data_key, edk))
    }

    /// Wraps an existing data key under this KMS key with `Encrypt` (key rotation re-wraps
    /// this way, as the AWS Encryption SDK's KMS keyring does for additional keys).
    pub async fn wrap(
        &self,
        data_key: &DataKey,
        context: &EncryptionContext,
    ) -> Result<EncryptedDataKey, KeyError> {
        self.metrics.record_kms_call("Encrypt");
        let output = self
            .client
            .encrypt()
            .key_id(&self.key_arn)
            .plaintext(Blob::new(data_key.expose().to_vec()))
            .set_encryption_context(Some(context_map(context)))
            .send()
            .await
            .map_err(|error| self.classify(error))?;
        let key_id = output
            .key_id()
            .ok_or_else(|| self.bad_response("no key id"))?
            .to_owned();
        if !self.is_our_key(&key_id) {
            return Err(self.bad_response("a key id other than the target key"));
        }
        let wrapped = output
            .ciphertext_blob()
            .ok_or_else(|| self.bad_response("no ciphertext"))?;
        Ok(EncryptedDataKey {
            provider_id: PROVIDER_ID.as_bytes().to_vec(),
            provider_info: key_id.into_bytes(),
            ciphertext: wrapped.as_ref().to_vec(),
        })
    }

    /// Unwraps the first EDK of this practice's KMS key, from the cache or with `Decrypt`.
    pub async fn unwrap(
        &self,
        edks: &[EncryptedDataKey],
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyError> {
        let edk = edks
            .iter()
            .filter(|edk| edk.provider_id == PROVIDER_ID.as_bytes())
            .find(|edk| {
                std::str::from_utf8(&edk.provider_info).is_ok_and(|arn| self.is_our_key(arn))
            })
            .ok_or(KeyError::NoMatchingKey)?;
        let cache_key = DataKeyCache::key(&edk.ciphertext, context);
        if let Some(data_key) = self.cache.get(&cache_key) {
            return Ok(data_key);
        }

        // The first miss runs `Decrypt`; misses that arrive meanwhile wait for its result. If the
        // first caller is cancelled, a waiting one runs the call instead.
        let flight = self.cache.join_flight(cache_key);
        flight
            .cell
            .get_or_init(|| self.decrypt(edk, context, cache_key))
            .await
            .clone()
    }

    /// Calls `Decrypt` for one EDK and caches the data key it returns.
    async fn decrypt(
        &self,
        edk: &EncryptedDataKey,
        context: &EncryptionContext,
        cache_key: [u8; 32],
    ) -> Result<DataKey, KeyError> {
        if let Some(data_key) = self.cache.get(&cache_key) {
            return Ok(data_key);
        }
        let key_id =
            std::str::from_utf8(&edk.provider_info).map_err(|_| KeyError::NoMatchingKey)?;
        self.metrics.record_kms_call("Decrypt");
        let output = self
            .client
            .decrypt()
            .ciphertext_blob(Blob::new(edk.ciphertext.clone()))
            .key_id(key_id)
            .set_encryption_context(Some(context_map(context)))
            .send()
            .await
            .map_err(|error| self.classify(error))?;

        if output.key_id() != Some(key_id) {
            return Err(self.bad_response("a key id other than the one the object names"));
        }
        let mut plaintext = output
            .plaintext()
            .ok_or_else(|| self.bad_response("no plaintext key"))?
            .as_ref()
            .to_vec();
        let data_key = DataKey::from_slice(&plaintext);
        plaintext.zeroize();
        let data_key =
            data_key.map_err(|_| self.bad_response("a data key that is not 32 bytes"))?;
        self.cache
            .insert(cache_key, &self.practice, data_key.clone());
        Ok(data_key)
    }

    /// Whether `arn` names this practice's key. KMS returns the full key ARN, while the
    /// configuration may name the key by ARN only; aliases are not accepted.
    fn is_our_key(&self, arn: &str) -> bool {
        arn == self.key_arn
    }

    fn bad_response(&self, what: &'static str) -> KeyError {
        KeyError::KmsBadResponse {
            practice: self.practice.to_string(),
            key_id: self.key_arn.clone(),
            what,
        }
    }

    /// Maps a KMS failure to a key error, logs it with the practice and key id, and flushes the
    /// practice's cached keys when KMS reports the key disabled or unusable.
    fn classify<E, R>(&self, error: SdkError<E, R>) -> KeyError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug,
    {
        let practice = self.practice.to_string();
        let key_id = self.key_arn.clone();
        let code = error.code().unwrap_or("").to_owned();
        let key_error = match code.as_str() {
            "DisabledException" => KeyError::KmsKeyDisabled { practice, key_id },
            "KMSInvalidStateException" => KeyError::KmsKeyState { practice, key_id },
            "AccessDeniedException" | "NotFoundException" | "IncorrectKeyException" => {
                KeyError::KmsAccessDenied { practice, key_id }
            }
            "InvalidCiphertextException" => KeyError::Unwrap,
            _ => KeyError::KmsUnavailable {
                practice,
                key_id,
                code: if code.is_empty() {
                    "unreachable".into()
                } else {
                    code.clone()
                },
            },
        };
        if matches!(
            key_error,
            KeyError::KmsKeyDisabled { .. }
                | KeyError::KmsKeyState { .. }
                | KeyError::KmsAccessDenied { .. }
        ) {
            self.cache.flush_practice(&self.practice);
        }
        // The SDK's error text names the operation and the code, never key material.
        warn!(practice = %self.practice, key_id = %self.key_arn, code = %code, "KMS request failed");
        self.metrics.record_kms_failure();
        key_error
    }
}

/// A context as the KMS API takes it.
fn context_map(context: &EncryptionContext) -> HashMap<String, String> {
    context
        .iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// Unwrapped data keys, kept for a short time so that repeated reads of one object cost one KMS
/// call. Keyed by SHA-256 of the wrapped key and the serialized context; bounded in size, with
/// the oldest entries evicted first. Evicted and expired keys are zeroized when dropped.
pub struct DataKeyCache {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<[u8; 32], CachedKey>>,
    /// `Decrypt` calls in progress, by cache key.
    flights: Mutex<HashMap<[u8; 32], FlightCell>>,
}

/// The shared result of one `Decrypt` call.
type FlightCell = Arc<tokio::sync::OnceCell<Result<DataKey, KeyError>>>;

/// One caller's share of a `Decrypt` call; the last one to leave removes the call from the map,
/// even when its request was cancelled.
struct Flight<'a> {
    cache: &'a DataKeyCache,
    key: [u8; 32],
    cell: FlightCell,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.cache.land_flight(self.key, &self.cell);
    }
}

struct CachedKey {
    data_key: DataKey,
    practice: PracticeId,
    inserted: Instant,
}

impl DataKeyCache {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        DataKeyCache {
            ttl,
            max_entries,
            entries: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the `Decrypt` call in progress for `key`, or a new one.
    fn join_flight(&self, key: [u8; 32]) -> Flight<'_> {
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let cell = Arc::clone(flights.entry(key).or_default());
        Flight {
            cache: self,
            key,
            cell,
        }
    }

    /// Forgets a call once it finished or its last caller left, so that later misses find the
    /// key in the cache or, after a failure, start a call of their own.
    fn land_flight(&self, key: [u8; 32], cell: &FlightCell) {
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(current) = flights.get(&key) else {
            return;
        };
        // The map and this caller hold the only references when no one else waits.
        let last = Arc::strong_count(current) == 2;
        if Arc::ptr_eq(current, cell) && (cell.initialized() || last) {
            flights.remove(&key);
        }
    }

    fn key(wrapped: &[u8], context: &EncryptionContext) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update((wrapped.len() as u64).to_be_bytes());
        hasher.update(wrapped);
        hasher.update(context.serialize());
        hasher.finalize().into()
    }

    fn get(&self, key: &[u8; 32]) -> Option<DataKey> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match entries.get(key) {
            Some(entry) if entry.inserted.elapsed() < self.ttl => Some(entry.data_key.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, key: [u8; 32], practice: &PracticeId, data_key: DataKey) {
        if self.ttl.is_zero() || self.max_entries == 0 {
            return;
        }
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let ttl = self.ttl;
        entries.retain(|_, entry| entry.inserted.elapsed() < ttl);
        while entries.len() >= self.max_entries {
            let oldest = entries
                .iter()
                .min_by_key(|(_, entry)| entry.inserted)
                .map(|(key, _)| *key);
            match oldest {
                Some(oldest) => entries.remove(&oldest),
                None => break,
            };
        }
        entries.insert(
            key,
            CachedKey {
                data_key,
                practice: practice.clone(),
                inserted: Instant::now(),
            },
        );
    }

    /// Drops every cached key of `practice`, for example when its KMS key was disabled.
    pub fn flush_practice(&self, practice: &PracticeId) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.retain(|_, entry| &entry.practice != practice);
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |entries| entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The region of a KMS key ARN (`arn:{partition}:kms:{region}:{account}:key/{id}`).
pub fn arn_region(arn: &str) -> Option<&str> {
    let mut parts = arn.split(':');
    let (Some("arn"), Some(_partition), Some("kms"), Some(region)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let account = parts.next()?;
    let resource = parts.next()?;
    if region.is_empty() || account.is_empty() || !resource.starts_with("key/") {
        return None;
    }
    Some(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(call: &str) -> EncryptionContext {
        EncryptionContext::from_pairs([("practice", "p1"), ("call", call), ("artifact", "a")])
            .unwrap()
    }

    #[test]
    fn arn_region_parses() {
        let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(arn_region(arn), Some("us-east-1"));
        assert_eq!(
            arn_region("arn:aws-us-gov:kms:us-gov-west-1:1:key/x"),
            Some("us-gov-west-1")
        );
        for bad in [
            "alias/x",
            "arn:aws:kms:us-east-1:1:alias/x",
            "arn:aws:s3:::bucket",
            "arn:aws:kms::1:key/x",
            "1234abcd",
        ] {
            assert_eq!(arn_region(bad), None, "{bad}");
        }
    }

    #[test]
    fn cache_hits_until_expiry() {
        let cache = DataKeyCache::new(Duration::from_millis(200), 10);
        let practice = PracticeId::new("p1").unwrap();
        let key = DataKeyCache::key(b"wrapped", &context("c1"));
        cache.insert(key, &practice, DataKey::from_slice(&[1; 32]).unwrap());
        assert_eq!(cache.get(&key).map(|k| *k.expose()), Some([1; 32]));
        std::thread::sleep(Duration::from_millis(250));
        assert!(cache.get(&key).is_none(), "expired key served");
    }

    #[test]
    fn cache_key_binds_context() {
        assert_ne!(
            DataKeyCache::key(b"w", &context("c1")),
            DataKeyCache::key(b"w", &context("c2"))
        );
        assert_ne!(
            DataKeyCache::key(b"w1", &context("c1")),
            DataKeyCache::key(b"w2", &context("c1"))
        );
    }

    #[test]
    fn cache_size_bound_evicts_oldest() {
        let cache = DataKeyCache::new(Duration::from_secs(60), 2);
        let practice = PracticeId::new("p1").unwrap();
        let keys: Vec<_> = (0..3u8)
            .map(|i| DataKeyCache::key(&[i], &context("c")))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            cache.insert(
                *key,
                &practice,
                DataKey::from_slice(&[i as u8; 32]).unwrap(),
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&keys[0]).is_none(), "oldest entry kept");
        assert!(cache.get(&keys[2]).is_some());
    }

    #[test]
    fn cache_flush_by_practice() {
        let cache = DataKeyCache::new(Duration::from_secs(60), 10);
        let p1 = PracticeId::new("p1").unwrap();
        let p2 = PracticeId::new("p2").unwrap();
        let k1 = DataKeyCache::key(b"1", &context("c"));
        let k2 = DataKeyCache::key(b"2", &context("c"));
        cache.insert(k1, &p1, DataKey::from_slice(&[1; 32]).unwrap());
        cache.insert(k2, &p2, DataKey::from_slice(&[2; 32]).unwrap());
        cache.flush_practice(&p1);
        assert!(cache.get(&k1).is_none());
        assert!(cache.get(&k2).is_some());
    }
}
