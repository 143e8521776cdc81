//! The gateway's configuration: one TOML file.
//!
//! Every error names the file, the key and what is wrong, and the gateway refuses to start on
//! any of them. Secrets (token hashes) may be given inline or read from a `*_file` path, so the
//! TOML file itself can be public. Relative paths are resolved against the directory of the
//! configuration file, not the working directory.
//!
//! ```toml
//! [listen]
//! data = "127.0.0.1:8443"     # HTTPS: uploads, reads, webhooks
//! admin = "127.0.0.1:9090"    # plain HTTP: /healthz, /readyz, /metrics
//!
//! [tls]
//! cert = "certs/server.pem"
//! key = "certs/server-key.pem"
//!
//! [storage]
//! kind = "local"              # or "memory" (tests only: nothing survives a restart)
//! path = "data"
//!
//! [keys]
//! directory = "keys"
//!
//! [[practices]]
//! id = "clinic-1"
//!
//! [[tokens]]
//! name = "back-office"
//! sha256_file = "secrets/back-office.sha256"   # or sha256 = "<64 hex digits>"
//! role = "ingest"                  # ingest, reader, admin or auditor
//! practices = ["clinic-1"]
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::Role;
use crate::envelope::{DEFAULT_FRAME_LENGTH, MAX_FRAME_LENGTH};
use crate::ids::PracticeId;
use crate::tls::TlsSettings;
use crate::webhook::signature::RetellKey;

/// A configuration error: which file, which key, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration {file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub tls: TlsSettings,
    pub storage: StorageSettings,
    pub keys: KeySettings,
    pub envelope: EnvelopeSettings,
    pub limits: Limits,
    pub practices: Vec<Practice>,
    pub tokens: Vec<Token>,
    pub webhooks: WebhookSettings,
    pub media: MediaSettings,
    pub aws: AwsSettings,
    pub residency: ResidencySettings,
    pub clients: Vec<Client>,
    pub audit: AuditSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// The HTTPS data listener.
    pub data: SocketAddr,
    /// The plain-HTTP admin listener; keep it on loopback or a private interface.
    #[serde(default = "default_admin_address")]
    pub admin: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageSettings {
    /// Objects under a local directory.
    Local { path: PathBuf },
    /// Objects in memory, lost on exit: for tests and demonstrations.
    Memory,
    /// Objects in an S3 bucket or an S3-compatible store.
    S3(S3Settings),
}

/// An S3 bucket (or S3-compatible store) for objects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    pub bucket: String,
    pub region: String,
    /// Key prefix inside the bucket, without leading or trailing `/`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Endpoint override for S3-compatible stores and emulators.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), as most S3-compatible stores need.
    #[serde(default)]
    pub path_style: bool,
    /// Plain HTTP to the endpoint: only for a local emulator.
    #[serde(default)]
    pub allow_http: bool,
}

/// AWS client settings shared by every practice's KMS key.
///
/// # Defaults
///
/// | key | default |
/// |---|---|
/// | `region` | from the environment or profile |
/// | `kms_endpoint_url` | AWS's regional endpoint |
/// | `max_attempts` | 3 (the SDK's standard retry: exponential backoff with jitter) |
/// | `connect_timeout_secs` | 3 |
/// | `attempt_timeout_secs` | 5 |
/// | `operation_timeout_secs` | 15 |
/// | `data_key_cache_ttl_secs` | 60 (0 disables the cache) |
/// | `data_key_cache_max_entries` | 10000 |
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    pub region: Option<String>,
    pub kms_endpoint_url: Option<String>,
    pub max_attempts: u32,
    pub connect_timeout_secs: u64,
    pub attempt_timeout_secs: u64,
    pub operation_timeout_secs: u64,
    pub data_key_cache_ttl_secs: u64,
    pub data_key_cache_max_entries: usize,
}

impl Default for AwsSettings {
    fn default() -> Self {
        AwsSettings {
            region: None,
            kms_endpoint_url: None,
            max_attempts: 3,
            connect_timeout_secs: 3,
            attempt_timeout_secs: 5,
            operation_timeout_secs: 15,
            data_key_cache_ttl_secs: 60,
            data_key_cache_max_entries: 10_000,
        }
    }
}

/// Where data may live: KMS keys and buckets must be in one of these regions.
///
/// # Defaults
///
/// The US regions: `us-east-1`, `us-east-2`, `us-west-1`, `us-west-2`, `us-gov-east-1`,
/// `us-gov-west-1`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResidencySettings {
    pub allowed_regions: Vec<String>,
}

impl Default for ResidencySettings {
    fn default() -> Self {
        let regions = [
            "us-east-1",
            "us-east-2",
            "us-west-1",
            "us-west-2",
            "us-gov-east-1",
            "us-gov-west-1",
        ];
        ResidencySettings {
            allowed_regions: regions.map(str::to_owned).to_vec(),
        }
    }
}

/// A practice's customer-managed KMS key.
#[derive(Debug, Clone)]
pub struct KmsKey {
    /// The full key ARN, as KMS returns it in responses.
    pub arn: String,
    /// A role in the practice's account to assume for this key.
    pub role: Option<KmsRole>,
}

/// A role assumed for a practice's KMS key; the external id guards against the confused deputy.
#[derive(Debug, Clone)]
pub struct KmsRole {
    pub arn: String,
    pub external_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// The local key directory: `{directory}/{practice}/v{N}.key`.
    pub directory: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSettings {
    /// Plaintext bytes per frame of newly written objects.
    #[serde(default = "default_frame_length")]
    pub frame_length: u32,
}

impl Default for EnvelopeSettings {
    fn default() -> Self {
        EnvelopeSettings {
            frame_length: DEFAULT_FRAME_LENGTH,
        }
    }
}

/// Connection and request limits of the data listener.
///
/// # Defaults
///
/// | key | default | why |
/// |---|---|---|
/// | `header_read_timeout_secs` | 10 | a client has this long for the TLS handshake and for each request's headers |
/// | `idle_timeout_secs` | 60 | a connection with no bytes moving either way for this long is closed |
/// | `max_header_bytes` | 16384 | request header block limit; larger gets 431 (HTTP/1.1) or a stream reset (h2) |
/// | `max_upload_bytes` | 4294967296 | plaintext per upload (4 GiB: a two-hour stereo call at 16 kHz is about 0.5 GiB) |
/// | `max_connections` | 1024 | concurrent connections; more wait in the kernel's accept queue |
/// | `shutdown_grace_secs` | 30 | in-flight requests get this long to finish at shutdown, then are aborted |
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub header_read_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_header_bytes: usize,
    pub max_upload_bytes: u64,
    pub max_connections: usize,
    pub shutdown_grace_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_header_bytes: 16 * 1024,
            max_upload_bytes: 4 * 1024 * 1024 * 1024,
            max_connections: 1024,
            shutdown_grace_secs: 30,
        }
    }
}

impl Limits {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// A practice (tenant) and its webhook settings.
#[derive(Debug, Clone)]
pub struct Practice {
    pub id: PracticeId,
    /// Retell API keys that sign this practice's webhooks; several during a key rotation.
    pub retell_keys: Vec<RetellKey>,
    /// Retell agent ids whose events this practice accepts. Empty means any agent, which is
    /// allowed only while no other practice shares one of its Retell keys.
    pub retell_agent_ids: BTreeSet<String>,
    /// Where a redacted copy of each new event is sent, if anywhere.
    pub forward: Option<Forward>,
    /// The practice's KMS key; `None` means local wrapping keys.
    pub kms: Option<KmsKey>,
}

/// Downstream forwarding of redacted events.
#[derive(Debug, Clone)]
pub struct Forward {
    pub url: String,
    /// Key of the HMAC-SHA256 signature on each forwarded body.
    pub secret: RetellKey,
}

/// Limits of the Retell webhook route.
///
/// # Defaults
///
/// | key | default | why |
/// |---|---|---|
/// | `max_body_bytes` | 33554432 | Retell bodies grow about 1.5 MiB per hour of call and calls last up to 2 hours |
/// | `max_unverified_bytes` | 134217728 | body bytes held in memory, across all requests, before their signature is checked |
/// | `store_timeout_secs` | 5 | a store that takes longer goes to the spool, well inside Retell's 10 s timeout |
/// | `spool_directory` | `spool`, beside the configuration file | encrypted events waiting for storage to return |
/// | `spool_max_bytes` | 1073741824 | room for about 30 maximum-size events, or tens of thousands of typical ones |
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    pub max_body_bytes: u64,
    pub max_unverified_bytes: u64,
    pub store_timeout_secs: u64,
    pub spool_directory: PathBuf,
    pub spool_max_bytes: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            max_body_bytes: 32 * 1024 * 1024,
            max_unverified_bytes: 128 * 1024 * 1024,
            store_timeout_secs: 5,
            spool_directory: PathBuf::from("spool"),
            spool_max_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// Downloads of call media (recordings, logs) linked from webhook events.
///
/// # Defaults
///
/// | key | default |
/// |---|---|
/// | `allowed_hosts` | none: every download is refused until hosts are listed |
/// | `allow_loopback_for_tests` | false |
/// | `max_bytes` | 2147483648 (2 GiB) |
/// | `connect_timeout_secs` | 10 |
/// | `total_timeout_secs` | 900 (per attempt) |
/// | `max_attempts` | 8 |
/// | `initial_backoff_ms` | 500 |
/// | `max_backoff_secs` | 60 |
/// | `workers` | 4 concurrent downloads |
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaSettings {
    pub allowed_hosts: Vec<String>,
    pub allow_loopback_for_tests: bool,
    pub extra_ca_file: Option<PathBuf>,
    pub max_bytes: u64,
    pub connect_timeout_secs: u64,
    pub total_timeout_secs: u64,
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_secs: u64,
    pub workers: usize,
}

impl Default for MediaSettings {
    fn default() -> Self {
        MediaSettings {
            allowed_hosts: Vec::new(),
            allow_loopback_for_tests: false,
            extra_ca_file: None,
            max_bytes: 2 * 1024 * 1024 * 1024,
            connect_timeout_secs: 10,
            total_timeout_secs: 900,
            max_attempts: 8,
            initial_backoff_ms: 500,
            max_backoff_secs: 60,
            workers: 4,
        }
    }
}

/// A bearer token: only the SHA-256 of the token is configured, never the token.
#[derive(Clone)]
pub struct Token {
    /// A label for logs and the audit trail; not secret. Follows the id grammar.
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
    pub practices: BTreeSet<PracticeId>,
}

/// A principal that authenticates with a TLS client certificate issued by `tls.client_ca`.
#[derive(Debug, Clone)]
pub struct Client {
    /// A label for logs and the audit trail. Follows the id grammar.
    pub name: String,
    /// Matches the certificate's subject common name, if set.
    pub subject_cn: Option<String>,
    /// Matches one of the certificate's DNS subject alternative names, if set.
    pub dns_name: Option<String>,
    pub role: Role,
    pub practices: BTreeSet<PracticeId>,
}

/// The audit log.
///
/// # Defaults
///
/// `directory` is `audit` and `signing_key` is `audit-signing.key`, both beside the
/// configuration file. A missing signing key is generated at start-up (and logged); in
/// production, create it with `callseal audit keygen` on storage the audit directory is not on.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub directory: PathBuf,
    pub signing_key: PathBuf,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("practices", &self.practices)
            .finish_non_exhaustive()
    }
}

/// The file as written, before validation and path resolution.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Listen,
    tls: TlsSettings,
    storage: StorageSettings,
    keys: KeySettings,
    #[serde(default)]
    envelope: EnvelopeSettings,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    practices: Vec<RawPractice>,
    #[serde(default)]
    tokens: Vec<RawToken>,
    #[serde(default)]
    webhooks: WebhookSettings,
    #[serde(default)]
    media: MediaSettings,
    #[serde(default)]
    aws: AwsSettings,
    #[serde(default)]
    residency: ResidencySettings,
    #[serde(default)]
    clients: Vec<RawClient>,
    #[serde(default)]
    audit: RawAudit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPractice {
    id: PracticeId,
    #[serde(default)]
    retell_api_keys: Vec<String>,
    /// A file with one Retell API key per line.
    retell_api_keys_file: Option<PathBuf>,
    #[serde(default)]
    retell_agent_ids: Vec<String>,
    forward: Option<RawForward>,
    kms_key_arn: Option<String>,
    kms_role_arn: Option<String>,
    kms_external_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    url: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    sha256: Option<String>,
    sha256_file: Option<PathBuf>,
    role: Role,
    practices: Vec<PracticeId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    subject_cn: Option<String>,
    dns_name: Option<String>,
    role: Role,
    practices: Vec<PracticeId>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    directory: Option<PathBuf>,
    signing_key: Option<PathBuf>,
}

fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

fn default_frame_length() -> u32 {
    DEFAULT_FRAME_LENGTH
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: path.display().to_string(),
            message: format!("cannot read the file: {error}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|message| ConfigError {
            file: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates configuration text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|error| describe_toml_error(text, &error))?;
        let resolve = |path: &Path| {
            if path.is_absolute() {
                path.to_owned()
            } else {
                base.join(path)
            }
        };

        if raw.envelope.frame_length == 0 || raw.envelope.frame_length > MAX_FRAME_LENGTH {
            return Err(format!(
                "key `envelope.frame_length`: {} is outside 1..={MAX_FRAME_LENGTH}",
                raw.envelope.frame_length
            ));
        }
        check_limits(&raw.limits)?;

        let mut practice_ids = BTreeSet::new();
        let mut practices = Vec::new();
        for (index, practice) in raw.practices.into_iter().enumerate() {
            if !practice_ids.insert(practice.id.clone()) {
                return Err(format!(
                    "key `practices[{index}].id`: practice `{}` is listed twice",
                    practice.id
                ));
            }
            practices.push(validate_practice(index, practice, &resolve)?);
        }
        check_shared_retell_keys(&practices)?;
        check_residency(&practices, &raw.storage, &raw.residency)?;
        check_media(&raw.media)?;
        if raw.webhooks.max_unverified_bytes < raw.webhooks.max_body_bytes {
            tracing::warn!(
                max_unverified_bytes = raw.webhooks.max_unverified_bytes,
                max_body_bytes = raw.webhooks.max_body_bytes,
                "webhooks.max_unverified_bytes is below webhooks.max_body_bytes: bodies larger than the budget always get 503"
            );
        }
        if raw.webhooks.store_timeout_secs == 0 {
            return Err("key `webhooks.store_timeout_secs`: must be at least 1".into());
        }
        if raw.webhooks.spool_max_bytes < raw.webhooks.max_body_bytes {
            tracing::warn!(
                spool_max_bytes = raw.webhooks.spool_max_bytes,
                max_body_bytes = raw.webhooks.max_body_bytes,
                "webhooks.spool_max_bytes is below webhooks.max_body_bytes: the largest events cannot be spooled while storage is unreachable"
            );
        }

        let mut tokens = Vec::new();
        for (index, token) in raw.tokens.into_iter().enumerate() {
            tokens.push(validate_token(index, token, &practice_ids, &resolve)?);
        }
        let mut hashes = BTreeSet::new();
        for (index, token) in tokens.iter().enumerate() {
            if !hashes.insert(token.sha256) {
                return Err(format!(
                    "key `tokens[{index}]`: the same token hash is configured twice"
                ));
            }
        }

        let mut clients = Vec::new();
        for (index, client) in raw.clients.into_iter().enumerate() {
            clients.push(validate_client(index, client, &practice_ids)?);
        }
        if !clients.is_empty() && raw.tls.client_ca.is_none() {
            return Err("key `clients`: client certificates need `tls.client_ca`".into());
        }
        let audit = AuditSettings {
            directory: resolve(raw.audit.directory.as_deref().unwrap_or(Path::new("audit"))),
            signing_key: resolve(
                raw.audit
                    .signing_key
                    .as_deref()
                    .unwrap_or(Path::new("audit-signing.key")),
            ),
        };
        if audit.signing_key.starts_with(&audit.directory) {
            return Err("key `audit.signing_key`: must be outside `audit.directory`, so that whoever can edit the log cannot re-sign it".into());
        }

        let tls = TlsSettings {
            cert: resolve(&raw.tls.cert),
            key: resolve(&raw.tls.key),
            client_ca: raw.tls.client_ca.as_deref().map(resolve),
            ..raw.tls
        };
        let storage = match raw.storage {
            StorageSettings::Local { path } => StorageSettings::Local {
                path: resolve(&path),
            },
            StorageSettings::Memory => StorageSettings::Memory,
            StorageSettings::S3(s3) => StorageSettings::S3(s3),
        };
        Ok(Config {
            listen: raw.listen,
            tls,
            storage,
            keys: KeySettings {
                directory: resolve(&raw.keys.directory),
            },
            envelope: raw.envelope,
            limits: raw.limits,
            practices,
            tokens,
            webhooks: WebhookSettings {
                spool_directory: resolve(&raw.webhooks.spool_directory),
                ..raw.webhooks
            },
            aws: raw.aws,
            residency: raw.residency,
            clients,
            audit,
            media: MediaSettings {
                extra_ca_file: raw.media.extra_ca_file.as_deref().map(resolve),
                ..raw.media
            },
        })
    }

    pub fn practice(&self, id: &PracticeId) -> Option<&Practice> {
        self.practices.iter().find(|practice| &practice.id == id)
    }
}

fn check_limits(limits: &Limits) -> Result<(), String> {
    let positive = [
        ("header_read_timeout_secs", limits.header_read_timeout_secs),
        ("idle_timeout_secs", limits.idle_timeout_secs),
        ("max_header_bytes", limits.max_header_bytes as u64),
        ("max_connections", limits.max_connections as u64),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err(format!("key `limits.{key}`: must be greater than 0"));
        }
    }
    if limits.max_header_bytes < 1024 {
        return Err("key `limits.max_header_bytes`: must be at least 1024".into());
    }
    Ok(())
}

fn validate_practice(
    index: usize,
    practice: RawPractice,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Practice, String> {
    let key = format!("practices[{index}]");
    let mut retell_keys: Vec<RetellKey> = practice
        .retell_api_keys
        .into_iter()
        .map(RetellKey::new)
        .collect();
    if let Some(file) = practice.retell_api_keys_file {
        let file = resolve(&file);
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(&file).map_err(|error| {
            format!(
                "key `{key}.retell_api_keys_file`: cannot read {}: {error}",
                file.display()
            )
        })?);
        let lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
        retell_keys.extend(lines.map(|line| RetellKey::new(line.to_owned())));
    }
    if retell_keys
        .iter()
        .any(|retell_key| retell_key.expose().trim().is_empty())
    {
        return Err(format!("key `{key}.retell_api_keys`: a key is empty"));
    }

    let forward = match practice.forward {
        None => None,
        Some(forward) => {
            let secret = read_secret(
                &format!("{key}.forward"),
                forward.secret,
                forward.secret_file,
                resolve,
            )?;
            if !forward.url.starts_with("https://") {
                return Err(format!("key `{key}.forward.url`: must be an https:// URL"));
            }
            Some(Forward {
                url: forward.url,
                secret: RetellKey::new(secret),
            })
        }
    };
    let kms = match (
        practice.kms_key_arn,
        practice.kms_role_arn,
        practice.kms_external_id,
    ) {
        (None, None, None) => None,
        (None, _, _) => return Err(format!("key `{key}.kms_role_arn`: needs `kms_key_arn`")),
        (Some(arn), role, external_id) => {
            if crate::keys::kms::arn_region(&arn).is_none() {
                return Err(format!(
                    "key `{key}.kms_key_arn`: `{arn}` is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)"
                ));
            }
            let role = match (role, external_id) {
                (None, None) => None,
                (Some(role), Some(external_id)) if !external_id.trim().is_empty() => {
                    Some(KmsRole {
                        arn: role,
                        external_id,
                    })
                }
                (Some(_), _) => {
                    return Err(format!(
                        "key `{key}.kms_external_id`: a role is always assumed with an external id"
                    ));
                }
                (None, Some(_)) => {
                    return Err(format!("key `{key}.kms_external_id`: needs `kms_role_arn`"));
                }
            };
            Some(KmsKey { arn, role })
        }
    };
    Ok(Practice {
        id: practice.id,
        retell_keys,
        retell_agent_ids: practice.retell_agent_ids.into_iter().collect(),
        forward,
        kms,
    })
}

/// Reads a secret given inline (`secret`) or in a file (`secret_file`), exactly one of them.
fn read_secret(
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<String, String> {
    let secret = match (inline, file) {
        (Some(secret), None) => secret,
        (None, Some(file)) => {
            let file = resolve(&file);
            std::fs::read_to_string(&file)
                .map_err(|error| {
                    format!(
                        "key `{key}.secret_file`: cannot read {}: {error}",
                        file.display()
                    )
                })?
                .trim()
                .to_owned()
        }
        _ => {
            return Err(format!(
                "key `{key}`: set exactly one of `secret` and `secret_file`"
            ));
        }
    };
    if secret.is_empty() {
        return Err(format!("key `{key}.secret`: must not be empty"));
    }
    Ok(secret)
}

/// Practices that share a Retell key must each list their agent ids, and no agent id may
/// belong to two of them, so an event signed for one practice cannot be replayed into another.
fn check_shared_retell_keys(practices: &[Practice]) -> Result<(), String> {
    for (index, practice) in practices.iter().enumerate() {
        for other in &practices[index + 1..] {
            let shared = practice
                .retell_keys
                .iter()
                .any(|key| other.retell_keys.contains(key));
            if !shared {
                continue;
            }
            for sharing in [practice, other] {
                if sharing.retell_agent_ids.is_empty() {
                    return Err(format!(
                        "practices `{}` and `{}` share a Retell API key, so practice `{}` must list its `retell_agent_ids`",
                        practice.id, other.id, sharing.id
                    ));
                }
            }
            if let Some(agent) = practice
                .retell_agent_ids
                .intersection(&other.retell_agent_ids)
                .next()
            {
                return Err(format!(
                    "practices `{}` and `{}` share a Retell API key and both list agent `{agent}`",
                    practice.id, other.id
                ));
            }
        }
    }
    Ok(())
}

/// Refuses KMS keys and buckets outside the allowed regions.
fn check_residency(
    practices: &[Practice],
    storage: &StorageSettings,
    residency: &ResidencySettings,
) -> Result<(), String> {
    let allowed = |region: &str| {
        residency
            .allowed_regions
            .iter()
            .any(|allowed| allowed == region)
    };
    let listed = residency.allowed_regions.join(", ");
    for practice in practices {
        let Some(kms) = &practice.kms else { continue };
        let region = crate::keys::kms::arn_region(&kms.arn).unwrap_or_default();
        if !allowed(region) {
            return Err(format!(
                "practice `{}`: KMS key {} is in region {region}, outside the allowed regions {listed} (`residency.allowed_regions`)",
                practice.id, kms.arn
            ));
        }
    }
    if let StorageSettings::S3(s3) = storage
        && !allowed(&s3.region)
    {
        return Err(format!(
            "key `storage.region`: bucket {} is in region {}, outside the allowed regions {listed} (`residency.allowed_regions`)",
            s3.bucket, s3.region
        ));
    }
    Ok(())
}

fn check_media(media: &MediaSettings) -> Result<(), String> {
    let positive = [
        ("max_bytes", media.max_bytes),
        ("connect_timeout_secs", media.connect_timeout_secs),
        ("total_timeout_secs", media.total_timeout_secs),
        ("max_attempts", u64::from(media.max_attempts)),
        ("workers", media.workers as u64),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err(format!("key `media.{key}`: must be greater than 0"));
        }
    }
    if let Some(host) = media
        .allowed_hosts
        .iter()
        .find(|host| host.is_empty() || host.contains(['/', ':', '@']))
    {
        return Err(format!(
            "key `media.allowed_hosts`: `{host}` is not a host name"
        ));
    }
    Ok(())
}

fn validate_client(
    index: usize,
    client: RawClient,
    practices: &BTreeSet<PracticeId>,
) -> Result<Client, String> {
    let key = format!("clients[{index}]");
    crate::ids::validate("client name", &client.name)
        .map_err(|error| format!("key `{key}.name`: {error}"))?;
    if client.subject_cn.is_none() && client.dns_name.is_none() {
        return Err(format!(
            "key `{key}`: set `subject_cn` or `dns_name` to match certificates"
        ));
    }
    if client.practices.is_empty() {
        return Err(format!(
            "key `{key}.practices`: a client needs at least one practice"
        ));
    }
    if let Some(practice) = client
        .practices
        .iter()
        .find(|practice| !practices.contains(*practice))
    {
        return Err(format!(
            "key `{key}.practices`: practice `{practice}` is not configured in [[practices]]"
        ));
    }
    Ok(Client {
        name: client.name,
        subject_cn: client.subject_cn,
        dns_name: client.dns_name,
        role: client.role,
        practices: client.practices.into_iter().collect(),
    })
}

fn validate_token(
    index: usize,
    token: RawToken,
    practices: &BTreeSet<PracticeId>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Token, String> {
    let key = format!("tokens[{index}]");
    let hex_digest = match (token.sha256, token.sha256_file) {
        (Some(digest), None) => digest,
        (None, Some(file)) => {
            let file = resolve(&file);
            std::fs::read_to_string(&file).map_err(|error| {
                format!(
                    "key `{key}.sha256_file`: cannot read {}: {error}",
                    file.display()
                )
            })?
        }
        _ => {
            return Err(format!(
                "key `{key}`: set exactly one of `sha256` and `sha256_file`"
            ));
        }
    };
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut sha256).map_err(|_| {
        format!("key `{key}.sha256`: expected 64 hex digits (the SHA-256 of the token)")
    })?;
    if token.name.trim().is_empty() {
        return Err(format!("key `{key}.name`: must not be empty"));
    }
    if token.practices.is_empty() {
        return Err(format!(
            "key `{key}.practices`: a token needs at least one practice"
        ));
    }
    for practice in &token.practices {
        if !practices.contains(practice) {
            return Err(format!(
                "key `{key}.practices`: practice `{practice}` is not configured in [[practices]]"
            ));
        }
    }
    crate::ids::validate("token name", &token.name)
        .map_err(|error| format!("key `{key}.name`: {error}"))?;
    Ok(Token {
        name: token.name,
        sha256,
        role: token.role,
        practices: token.practices.into_iter().collect(),
    })
}

/// Turns a TOML error into one line: the reason (which names the key), then the line and column.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let reason = error.message().trim();
    let Some(span) = error.span() else {
        return reason.to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
    format!("{reason} (line {line}, column {column})")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [listen]
        data = "127.0.0.1:8443"

        [tls]
        cert = "certs/server.pem"
        key = "certs/server-key.pem"

        [storage]
        kind = "local"
        path = "data"

        [keys]
        directory = "keys"

        [[practices]]
        id = "clinic-1"

        [[tokens]]
        name = "back-office"
        sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        role = "reader"
        practices = ["clinic-1"]
    "#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/callseal"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.listen.admin, default_admin_address());
        assert_eq!(config.envelope.frame_length, DEFAULT_FRAME_LENGTH);
        assert_eq!(config.limits.max_connections, 1024);
        assert_eq!(config.tls.cert, Path::new("/etc/callseal/certs/server.pem"));
        assert_eq!(config.keys.directory, Path::new("/etc/callseal/keys"));
        assert!(
            matches!(&config.storage, StorageSettings::Local { path } if path == Path::new("/etc/callseal/data"))
        );
        assert_eq!(config.tokens[0].practices.len(), 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let error = parse(&MINIMAL.replace("[keys]", "[keys]\ndirectroy = \"x\"")).unwrap_err();
        assert!(error.contains("directroy"), "{error}");
    }

    #[test]
    fn bad_practice_id_is_rejected() {
        let error = parse(&MINIMAL.replace("id = \"clinic-1\"", "id = \"../etc\"")).unwrap_err();
        assert!(error.contains("practice id"), "{error}");
    }

    #[test]
    fn token_for_unknown_practice_is_rejected() {
        let text = MINIMAL.replace("practices = [\"clinic-1\"]", "practices = [\"clinic-2\"]");
        let error = parse(&text).unwrap_err();
        assert!(
            error.contains("tokens[0].practices") && error.contains("clinic-2"),
            "{error}"
        );
    }

    #[test]
    fn token_hash_must_be_hex() {
        let text = MINIMAL.replace("9f86d081", "zz86d081");
        let error = parse(&text).unwrap_err();
        assert!(error.contains("tokens[0].sha256"), "{error}");
    }

    #[test]
    fn token_hash_from_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("token.sha256"),
            format!("{}\n", "ab".repeat(32)),
        )
        .unwrap();
        let text = MINIMAL.replace(
            "sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"",
            "sha256_file = \"token.sha256\"",
        );
        let config = Config::parse(&text, dir.path()).unwrap();
        assert_eq!(config.tokens[0].sha256, [0xab; 32]);
        let missing = Config::parse(&text, Path::new("/nonexistent")).unwrap_err();
        assert!(missing.contains("tokens[0].sha256_file"), "{missing}");
    }

    #[test]
    fn frame_length_limits() {
        for bad in ["0", "1048577"] {
            let text = format!("{MINIMAL}\n[envelope]\nframe_length = {bad}\n");
            let error = parse(&text).unwrap_err();
            assert!(error.contains("envelope.frame_length"), "{error}");
        }
        let text = format!("{MINIMAL}\n[envelope]\nframe_length = 1048576\n");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn shared_retell_key_needs_agent_allowlists() {
        let practices = |agents1: &str, agents2: &str| {
            let block = format!(
                "[[practices]]\nid = \"clinic-1\"\nretell_api_keys = [\"k1\"]\n{agents1}\n\
                 [[practices]]\nid = \"clinic-2\"\nretell_api_keys = [\"k1\"]\n{agents2}\n"
            );
            let text = MINIMAL.replace("[[practices]]\n        id = \"clinic-1\"", &block);
            parse(&text)
        };
        let missing = practices("", "").unwrap_err();
        assert!(missing.contains("share a Retell API key"), "{missing}");
        let same = "retell_agent_ids = [\"agent_a\"]";
        let overlapping = practices(same, same).unwrap_err();
        assert!(overlapping.contains("agent_a"), "{overlapping}");
        let config = practices(same, "retell_agent_ids = [\"agent_b\"]").unwrap();
        assert_eq!(config.practices.len(), 2);
    }

    #[test]
    fn forward_url_must_be_https() {
        let text = MINIMAL.replace(
            "[[practices]]\n        id = \"clinic-1\"",
            "[[practices]]\nid = \"clinic-1\"\nforward = { url = \"http://x.test/\", secret = \"s\" }",
        );
        let error = parse(&text).unwrap_err();
        assert!(error.contains("forward.url"), "{error}");
    }

    #[test]
    fn kms_key_outside_residency_is_rejected() {
        let arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let text = MINIMAL.replace(
            "id = \"clinic-1\"",
            &format!("id = \"clinic-1\"\nkms_key_arn = \"{arn}\""),
        );
        let error = parse(&text).unwrap_err();
        assert!(error.contains(arn), "{error}");
        assert!(error.contains("eu-west-1"), "{error}");
        assert!(error.contains("us-east-1"), "{error}");
        let us = text.replace("eu-west-1", "us-west-2");
        assert!(parse(&us).unwrap().practices[0].kms.is_some());
    }

    #[test]
    fn kms_role_needs_external_id() {
        let text = MINIMAL.replace(
            "id = \"clinic-1\"",
            "id = \"clinic-1\"\nkms_key_arn = \"arn:aws:kms:us-east-1:1:key/k\"\nkms_role_arn = \"arn:aws:iam::1:role/r\"",
        );
        let error = parse(&text).unwrap_err();
        assert!(error.contains("kms_external_id"), "{error}");
    }

    #[test]
    fn zero_limit_is_rejected() {
        let text = format!("{MINIMAL}\n[limits]\nmax_connections = 0\n");
        assert!(parse(&text).unwrap_err().contains("limits.max_connections"));
    }

    #[test]
    fn load_names_the_file() {
        let error = Config::load(Path::new("/nonexistent/callseal.toml")).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/callseal.toml"),
            "{error}"
        );
    }

    #[test]
    fn token_debug_hides_hash() {
        let config = parse(MINIMAL).unwrap();
        let text = format!("{:?}", config.tokens[0]);
        assert!(!text.contains("9f86"), "{text}");
        assert!(!text.contains("159"), "{text}");
    }
}
