//! Key rotation for stored objects: `callseal keys rewrap`.
//!
//! Each object of a practice gets its data key unwrapped with the practice's configured keyring
//! and wrapped again under the target key, a local key version or a KMS key. Only the header is
//! rewritten ([`crate::envelope::rewrap_header`]), and the object is replaced atomically
//! ([`crate::storage::Storage::replace_header`]). Bodies are not re-encrypted.
//!
//! The run is resumable: an object whose header already names the target key is skipped, so a
//! rewrap that was interrupted (or stopped by `--max-objects`) completes when run again. After a
//! rewrap to a KMS key, point the practice's `kms_key_arn` at it; after a rewrap to a new local
//! version, older versions may be removed.
//!
//! NOTE: opening local storage removes temporary files of unfinished uploads, so run a rewrap of
//! a local store while the gateway is stopped; S3 storage has no such step.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;

use crate::config::{Config, KmsKey};
use crate::envelope::{self, EncryptedDataKey, EncryptionContext, MAX_HEADER_LEN, ParsedHeader};
use crate::ids::{ObjectId, PracticeId};
use crate::keys::kms::{DataKeyCache, KmsKeyring, PROVIDER_ID};
use crate::keys::local::NAMESPACE;
use crate::keys::{DataKey, KeyDirectory, KeyName, Keyring, PracticeKeys};
use crate::metrics::Metrics;
use crate::storage::Storage;

/// The key to wrap under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The practice's current local key version.
    Local,
    /// A KMS key, by its full ARN.
    Kms(String),
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "local" {
            return Ok(Target::Local);
        }
        if crate::keys::kms::arn_region(text).is_some() {
            return Ok(Target::Kms(text.to_owned()));
        }
        Err("expected `local` or a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)".into())
    }
}

/// The counts of one rewrap run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub objects: usize,
    pub rewrapped: usize,
    pub already_on_target: usize,
}

/// The target wrapping key, ready to wrap.
enum TargetKeyring {
    Local(PracticeKeys),
    Kms(KmsKeyring),
}

impl TargetKeyring {
    /// Whether an EDK is already wrapped under this target.
    fn names(&self, edk: &EncryptedDataKey) -> bool {
        match self {
            TargetKeyring::Local(keys) => {
                local_key_name(edk).is_some_and(|name| name == keys.current())
            }
            TargetKeyring::Kms(keyring) => {
                edk.provider_id == PROVIDER_ID.as_bytes()
                    && edk.provider_info == keyring.key_arn().as_bytes()
            }
        }
    }

    async fn wrap(
        &self,
        data_key: &DataKey,
        context: &EncryptionContext,
    ) -> Result<EncryptedDataKey> {
        Ok(match self {
            TargetKeyring::Local(keys) => keys.wrap(data_key, context)?,
            TargetKeyring::Kms(keyring) => keyring.wrap(data_key, context).await?,
        })
    }

    fn describe(&self) -> String {
        match self {
            TargetKeyring::Local(keys) => keys.current().to_string(),
            TargetKeyring::Kms(keyring) => keyring.key_arn().to_owned(),
        }
    }
}

/// Rewraps every object of `practice` under `target`. With `dry_run`, only counts. Stops after
/// `max_objects` rewrapped objects when given. `progress` is called after each object with the
/// number of objects done and the total.
pub async fn run(
    config: &Config,
    practice: &PracticeId,
    target: &Target,
    dry_run: bool,
    max_objects: Option<usize>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Report> {
    let practice_config = config
        .practice(practice)
        .with_context(|| format!("practice `{practice}` is not in the configuration"))?;
    if let Target::Kms(arn) = target {
        let region = crate::keys::kms::arn_region(arn).unwrap_or_default();
        if !config
            .residency
            .allowed_regions
            .iter()
            .any(|allowed| allowed == region)
        {
            bail!(
                "target key {arn} is in region {region}, outside the allowed regions {}",
                config.residency.allowed_regions.join(", ")
            );
        }
    }
    let metrics = Metrics::new();
    let storage = open_storage(config).await?;
    let cache = Arc::new(DataKeyCache::new(std::time::Duration::ZERO, 0));
    let aws = match (&practice_config.kms, target) {
        (None, Target::Local) => None,
        _ => Some(crate::keys::aws::load_config(&config.aws).await),
    };

    let source = match (&practice_config.kms, &aws) {
        (Some(kms), Some(aws)) => {
            Keyring::Kms(kms_keyring(config, practice, kms, aws, &cache, &metrics).await)
        }
        _ => Keyring::Local(KeyDirectory::new(&config.keys.directory).load(practice)?),
    };
    let target_keyring = match (target, &aws) {
        (Target::Local, _) => {
            TargetKeyring::Local(KeyDirectory::new(&config.keys.directory).load(practice)?)
        }
        (Target::Kms(arn), Some(aws)) => {
            let kms = KmsKey {
                arn: arn.clone(),
                role: practice_config
                    .kms
                    .as_ref()
                    .and_then(|kms| kms.role.clone()),
            };
            TargetKeyring::Kms(kms_keyring(config, practice, &kms, aws, &cache, &metrics).await)
        }
        (Target::Kms(_), None) => bail!("no AWS configuration loaded for a KMS target"),
    };

    let objects = storage.find_artifacts(practice, "").await?;
    let mut report = Report {
        objects: objects.len(),
        ..Report::default()
    };
    tracing::info!(practice = %practice, objects = objects.len(), target = %target_keyring.describe(), dry_run, "rewrap started");
    for (done, id) in objects.iter().enumerate() {
        if max_objects.is_some_and(|max| report.rewrapped >= max) {
            break;
        }
        if rewrap_object(&storage, id, &source, &target_keyring, dry_run).await? {
            report.rewrapped += 1;
        } else {
            report.already_on_target += 1;
        }
        progress(done + 1, objects.len());
    }
    Ok(report)
}

/// Rewraps one object; returns false if it was already on the target key.
async fn rewrap_object(
    storage: &Storage,
    id: &ObjectId,
    source: &Keyring,
    target: &TargetKeyring,
    dry_run: bool,
) -> Result<bool> {
    let size = storage
        .head(id)
        .await?
        .with_context(|| format!("{id} disappeared"))?;
    let prefix = storage
        .get_range(id, 0..size.min(MAX_HEADER_LEN as u64))
        .await?;
    let parsed = ParsedHeader::parse(&prefix)
        .with_context(|| format!("{id}: invalid header"))?
        .with_context(|| format!("{id}: truncated header"))?;
    if parsed.header.edks.iter().any(|edk| target.names(edk)) {
        return Ok(false);
    }
    let context = EncryptionContext::for_object(id);
    envelope::check_context(&parsed.header, &context)
        .with_context(|| format!("{id}: stored at the wrong path"))?;
    if dry_run {
        return Ok(true);
    }

    let data_key = source
        .unwrap(&parsed.header.edks, &parsed.header.context)
        .await
        .with_context(|| format!("{id}: cannot unwrap the data key"))?;
    let edk = target.wrap(&data_key, &context).await?;
    let header = envelope::rewrap_header(&parsed, &data_key, vec![edk])
        .with_context(|| format!("{id}: header failed authentication"))?;
    storage
        .replace_header(id, Bytes::from(header), parsed.len() as u64)
        .await
        .with_context(|| format!("{id}: cannot replace the object"))?;
    Ok(true)
}

async fn kms_keyring(
    config: &Config,
    practice: &PracticeId,
    kms: &KmsKey,
    aws: &aws_config::SdkConfig,
    cache: &Arc<DataKeyCache>,
    metrics: &Arc<Metrics>,
) -> KmsKeyring {
    let client = crate::keys::aws::kms_client(aws, &config.aws, kms).await;
    KmsKeyring::new(
        practice.clone(),
        kms.arn.clone(),
        client,
        Arc::clone(cache),
        Arc::clone(metrics),
    )
}

async fn open_storage(config: &Config) -> Result<Storage> {
    use crate::config::StorageSettings;
    Ok(match &config.storage {
        StorageSettings::Local { path } => Storage::open_local(path).await?,
        StorageSettings::Memory => bail!("in-memory storage has nothing to rewrap"),
        StorageSettings::S3(s3) => Storage::open_s3(s3)?,
    })
}

/// Returns the local key name an EDK names, for reports; `None` for other providers.
pub fn local_key_name(edk: &EncryptedDataKey) -> Option<KeyName> {
    if edk.provider_id != NAMESPACE.as_bytes() {
        return None;
    }
    let name_len = edk.provider_info.len().checked_sub(20)?;
    KeyName::parse(std::str::from_utf8(&edk.provider_info[..name_len]).ok()?)
}
