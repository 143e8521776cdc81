//! TLS policy for the data listener: the one place where a rustls [`ServerConfig`] is built.
//!
//! This module owns:
//!
//! - the protocol policy ([`policy`]): TLS 1.2 and 1.3 only, AEAD cipher suites only, ALPN `h2`
//!   and `http/1.1`, the *ring* crypto provider;
//! - the server certificate ([`CertResolver`]): loaded from a PEM chain and a PEM private key,
//!   checked to match, and replaced at run time by [`CertResolver::reload`] or by a
//!   [`CertWatcher`] that polls the files;
//! - development certificates ([`write_dev_certs`]): a local CA and a `localhost` certificate.
//!
//! Invariants:
//!
//! - A reload that fails for any reason (unreadable file, malformed PEM, unsupported key, key that
//!   does not match the certificate) leaves the previous certificate serving.
//! - Private keys are never logged and never `Debug`-printed by this module. Log lines and errors
//!   name file paths and, for certificates, the SHA-256 fingerprint of the leaf.
//!
//! A listener puts the pieces together like this:
//!
//! ```no_run
//! # async fn listen(settings: callseal::tls::TlsSettings) -> Result<(), callseal::tls::TlsError> {
//! use std::sync::Arc;
//! use callseal::tls::{self, CertResolver};
//!
//! let resolver = CertResolver::load(&settings.cert, &settings.key)?;
//! let acceptor = tls::acceptor(Arc::clone(&resolver), settings.client_ca.as_deref())?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let _watcher = resolver.watch(settings.reload_interval(), async move {
//!     let _ = stopped.await;
//! })?;
//! // Accept TCP connections and pass each one to `acceptor.accept(stream)`. Send on `stop`
//! // (or drop `_watcher`) at shutdown.
//! # drop(stop);
//! # Ok(())
//! # }
//! ```

mod dev_certs;
pub mod policy;
mod resolver;
mod watcher;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use dev_certs::{DevCertPaths, write_dev_certs};
pub use policy::{
    ALPN_PROTOCOLS, CIPHER_SUITES, PROTOCOL_VERSIONS, acceptor, cipher_suite_name, crypto_provider,
    protocol_version_name, server_config,
};
pub use resolver::{CertResolver, ReloadStatus};
pub use watcher::CertWatcher;

// Re-exported so that callers name the same rustls types as this module.
pub use rustls::ServerConfig;
pub use tokio_rustls::TlsAcceptor;

/// Seconds between two checks of the certificate and key files, unless the settings set another
/// value.
///
/// # Defaults
///
/// 10 seconds. A check reads the metadata of two files, so polling this often costs nothing
/// measurable, and a renewed certificate is served within seconds.
pub const DEFAULT_RELOAD_INTERVAL_SECS: u64 = 10;

/// The `tls` section of the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file with the server certificate chain, leaf certificate first.
    pub cert: PathBuf,

    /// PEM file with the private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,

    /// PEM bundle of the CA certificates that sign client certificates. When set, the server
    /// requests a client certificate and rejects one that does not chain to these CAs. Clients
    /// without a certificate still connect, because bearer-token clients and webhook senders
    /// have none.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,

    /// Seconds between two checks of `cert` and `key` for changes.
    #[serde(default = "default_reload_interval_secs")]
    pub reload_interval_secs: u64,
}

impl TlsSettings {
    /// Creates settings for a certificate and key, with no client CA and the default reload
    /// interval.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            reload_interval_secs: DEFAULT_RELOAD_INTERVAL_SECS,
        }
    }

    /// Returns the interval between two checks of the certificate files.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.reload_interval_secs)
    }
}

fn default_reload_interval_secs() -> u64 {
    DEFAULT_RELOAD_INTERVAL_SECS
}

/// Errors of the TLS module. Each message names the file involved; none contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("failed to read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("invalid PEM in {}: {reason}", path.display())]
    InvalidPem { path: PathBuf, reason: &'static str },

    #[error("no certificate found in {}", path.display())]
    NoCertificate { path: PathBuf },

    #[error("no private key found in {}", path.display())]
    NoPrivateKey { path: PathBuf },

    #[error("unsupported private key in {}: {source}", path.display())]
    UnsupportedPrivateKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },

    #[error("invalid certificate in {}: {source}", path.display())]
    InvalidCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },

    #[error(
        "private key {} does not match the certificate in {}",
        key_path.display(),
        cert_path.display()
    )]
    KeyMismatch {
        cert_path: PathBuf,
        key_path: PathBuf,
    },

    #[error(
        "failed to check that private key {} matches the certificate in {}: {source}",
        key_path.display(),
        cert_path.display()
    )]
    KeyCheck {
        cert_path: PathBuf,
        key_path: PathBuf,
        #[source]
        source: rustls::Error,
    },

    #[error("invalid client CA bundle {}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },

    #[error("failed to build the TLS server configuration: {0}")]
    ServerConfig(#[source] rustls::Error),

    #[error("invalid certificate reload interval: must be greater than zero")]
    ZeroReloadInterval,

    #[error("{} already exists; remove it or request overwrite", path.display())]
    DevCertExists { path: PathBuf },

    #[error("failed to generate the development certificates: {0}")]
    Generate(#[source] rcgen::Error),

    #[error("failed to write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_defaults() {
        let settings: TlsSettings =
            toml::from_str("cert = \"/etc/callseal/server.pem\"\nkey = \"/etc/callseal/key.pem\"")
                .expect("settings parse");

        assert_eq!(
            settings,
            TlsSettings::new("/etc/callseal/server.pem", "/etc/callseal/key.pem")
        );
        assert_eq!(
            settings.reload_interval(),
            Duration::from_secs(DEFAULT_RELOAD_INTERVAL_SECS)
        );
    }

    #[test]
    fn settings_reject_unknown_field() {
        let parsed = toml::from_str::<TlsSettings>("cert = \"a\"\nkey = \"b\"\nciphers = \"all\"");

        assert!(parsed.is_err());
    }
}
