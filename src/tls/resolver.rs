//! The server certificate currently in use, and its replacement at run time.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{Error as RustlsError, InconsistentKeys};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::TlsError;
use super::policy::crypto_provider;

/// Counters of the reloads a [`CertResolver`] has attempted since it was loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Reloads that replaced the certificate.
    pub succeeded: u64,

    /// Reloads that failed and left the previous certificate serving.
    pub failed: u64,

    /// Message of the error of the latest reload, or `None` when it succeeded or none has run.
    pub last_error: Option<String>,
}

/// A [`ResolvesServerCert`] that serves one certificate chain and key, read from two PEM files,
/// and replaces them when [`reload`](Self::reload) succeeds.
///
/// Every handshake gets the certificate that is current when it starts, whatever server name the
/// client sends. Handshakes that started before a reload finish with the certificate they
/// started with.
pub struct CertResolver {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: CryptoProvider,
    current: RwLock<Arc<CertifiedKey>>,
    // The metadata of both files as of the latest load attempt. The mutex also serializes
    // reloads, so that an older read never replaces a newer one.
    last_stamps: Mutex<FileStamps>,
    status: watch::Sender<ReloadStatus>,
}

impl CertResolver {
    /// Reads the certificate chain at `cert_path` and the private key at `key_path`, checks that
    /// the key matches the leaf certificate, and returns a resolver serving them.
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Result<Arc<Self>, TlsError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let provider = crypto_provider();

        let stamps = FileStamps::read(&cert_path, &key_path);
        let certified = read_certified_key(&cert_path, &key_path, &provider)?;
        tracing::info!(
            cert = %cert_path.display(),
            key = %key_path.display(),
            sha256 = %leaf_fingerprint(&certified),
            "loaded TLS certificate"
        );

        Ok(Arc::new(Self {
            cert_path,
            key_path,
            provider,
            current: RwLock::new(Arc::new(certified)),
            last_stamps: Mutex::new(stamps),
            status: watch::Sender::new(ReloadStatus::default()),
        }))
    }

    /// Re-reads the certificate chain and private key and, when both are valid and match, makes
    /// them the certificate for new handshakes.
    ///
    /// On failure the previous certificate keeps serving, the error is logged at error level and
    /// counted in [`ReloadStatus::failed`], and the error is returned.
    ///
    /// The files are read with blocking I/O, so async code calls this through
    /// `tokio::task::spawn_blocking`, as [`watch`](Self::watch) does.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut last_stamps = lock_ignoring_poison(&self.last_stamps);
        *last_stamps = FileStamps::read(&self.cert_path, &self.key_path);
        self.reload_locked()
    }

    /// Reloads when the metadata of either file differs from the latest load attempt, and
    /// returns `None` when neither changed.
    ///
    /// A failed attempt is not retried until a file changes again, so a broken file is logged
    /// once, not on every check.
    pub(super) fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let mut last_stamps = lock_ignoring_poison(&self.last_stamps);
        let stamps = FileStamps::read(&self.cert_path, &self.key_path);
        if stamps == *last_stamps {
            return None;
        }

        *last_stamps = stamps;
        Some(self.reload_locked())
    }

    /// Returns the certificate chain and key that new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Returns a receiver of the reload counters, which changes after every reload attempt.
    pub fn subscribe(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// Returns the path of the certificate chain file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Returns the path of the private key file.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// Loads both files and swaps the certificate. The caller holds the `last_stamps` lock.
    fn reload_locked(&self) -> Result<(), TlsError> {
        match read_certified_key(&self.cert_path, &self.key_path, &self.provider) {
            Ok(certified) => {
                let fingerprint = leaf_fingerprint(&certified);
                // Nothing inside this critical section can panic, so the lock is never poisoned.
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);

                tracing::info!(
                    cert = %self.cert_path.display(),
                    key = %self.key_path.display(),
                    sha256 = %fingerprint,
                    "reloaded TLS certificate"
                );
                self.status.send_modify(|status| {
                    status.succeeded += 1;
                    status.last_error = None;
                });
                Ok(())
            }
            Err(error) => {
                tracing::error!(
                    cert = %self.cert_path.display(),
                    key = %self.key_path.display(),
                    %error,
                    "TLS certificate reload failed; the previous certificate stays in use"
                );
                self.status.send_modify(|status| {
                    status.failed += 1;
                    status.last_error = Some(error.to_string());
                });
                Err(error)
            }
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

// Hand-written so that the signing key never reaches a log through `{:?}`.
impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// Reads a PEM certificate chain and a PEM private key and checks that the key belongs to the
/// leaf certificate.
fn read_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = read_cert_chain(cert_path)?;

    let key_pem = Zeroizing::new(read_file(key_path)?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| match error {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: key_path.to_path_buf(),
        },
        other => pem_error(key_path, &other),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnsupportedPrivateKey {
            path: key_path.to_path_buf(),
            source,
        })?;

    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert_path: cert_path.to_path_buf(),
                key_path: key_path.to_path_buf(),
            })
        }
        Err(source @ RustlsError::InconsistentKeys(_)) => Err(TlsError::KeyCheck {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            source,
        }),
        Err(source) => Err(TlsError::InvalidCertificate {
            path: cert_path.to_path_buf(),
            source,
        }),
    }
}

/// Reads every certificate in the PEM file at `path`, in file order.
fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(path, &error))?;

    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Maps a PEM parse error to [`TlsError::InvalidPem`].
///
/// Only the kind of error is kept: the details of some kinds quote bytes of the file, which for
/// a key file would be key material.
pub(super) fn pem_error(path: &Path, error: &pem::Error) -> TlsError {
    let reason = match error {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "malformed BEGIN line",
        pem::Error::Base64Decode(_) => "a section is not valid base64",
        pem::Error::SectionTooLarge => "a section is too large",
        pem::Error::NoItemsFound => "no PEM section found",
        _ => "malformed PEM",
    };
    TlsError::InvalidPem {
        path: path.to_path_buf(),
        reason,
    }
}

/// Returns the SHA-256 fingerprint of the leaf certificate in lowercase hex. It is the digest that
/// `openssl x509 -fingerprint -sha256` prints in uppercase with colons.
fn leaf_fingerprint(certified: &CertifiedKey) -> String {
    certified
        .cert
        .first()
        .map(|leaf| hex::encode(Sha256::digest(leaf)))
        .unwrap_or_default()
}

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Metadata of the certificate and key files, compared between checks to detect a replaced or
/// rewritten file. `None` is a file whose metadata could not be read, such as a missing file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamps {
    cert: Option<FileStamp>,
    key: Option<FileStamp>,
}

impl FileStamps {
    fn read(cert_path: &Path, key_path: &Path) -> Self {
        Self {
            cert: FileStamp::read(cert_path),
            key: FileStamp::read(key_path),
        }
    }
}

/// Size, modification time and, on Unix, device, inode and status-change time of one file.
///
/// The inode catches a file replaced by rename (as Kubernetes secret volumes and most deployment
/// tools do), and the status-change time catches a rewrite that restores the old modification
/// time. Symbolic links are followed, so the stamp describes the file that would be read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    device: u64,
    #[cfg(unix)]
    inode: u64,
    /// Status-change time as seconds and nanoseconds since the Unix epoch.
    #[cfg(unix)]
    changed: (i64, i64),
}

impl FileStamp {
    fn read(path: &Path) -> Option<Self> {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;

        let metadata = fs::metadata(path).ok()?;
        Some(Self {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            #[cfg(unix)]
            device: metadata.dev(),
            #[cfg(unix)]
            inode: metadata.ino(),
            #[cfg(unix)]
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::write_dev_certs;

    #[test]
    fn load_accepts_matching_dev_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");

        let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");

        assert_eq!(resolver.current().cert.len(), 1);
        assert_eq!(
            resolver.subscribe().borrow().clone(),
            ReloadStatus::default()
        );
    }

    #[test]
    fn load_rejects_key_of_other_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");

        let error = CertResolver::load(&paths.server_cert, &paths.ca_key).expect_err("mismatch");

        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("ca-key.pem"), "{message}");
        assert!(message.contains("server.pem"), "{message}");
    }

    #[test]
    fn load_rejects_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");
        let missing = dir.path().join("missing.pem");

        let error = CertResolver::load(&missing, &paths.server_key).expect_err("missing");

        assert!(matches!(error, TlsError::Read { .. }), "{error}");
        assert!(error.to_string().contains("missing.pem"), "{error}");
    }

    #[test]
    fn load_rejects_file_without_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");

        // A key file contains PEM, but no CERTIFICATE section.
        let error = CertResolver::load(&paths.server_key, &paths.server_key).expect_err("no cert");

        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
    }

    #[test]
    fn load_rejects_file_without_private_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");

        let error = CertResolver::load(&paths.server_cert, &paths.server_cert).expect_err("no key");

        assert!(matches!(error, TlsError::NoPrivateKey { .. }), "{error}");
    }

    #[test]
    fn load_rejects_truncated_pem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");
        let truncated = dir.path().join("truncated.pem");
        let pem = fs::read_to_string(&paths.server_cert).expect("read");
        fs::write(&truncated, &pem[..pem.len() / 2]).expect("write");

        let error = CertResolver::load(&truncated, &paths.server_key).expect_err("truncated");

        assert!(matches!(error, TlsError::InvalidPem { .. }), "{error}");
    }

    #[test]
    fn load_rejects_certificate_that_is_not_der() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");
        let bogus = dir.path().join("bogus.pem");
        fs::write(
            &bogus,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .expect("write");

        let error = CertResolver::load(&bogus, &paths.server_key).expect_err("not DER");

        assert!(
            matches!(error, TlsError::InvalidCertificate { .. }),
            "{error}"
        );
    }

    #[test]
    fn invalid_pem_error_hides_file_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");
        let key = dir.path().join("bad-key.pem");
        fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nSECRET*CANARY*BYTES\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");

        let error = CertResolver::load(&paths.server_cert, &key).expect_err("bad base64");

        assert!(matches!(error, TlsError::InvalidPem { .. }), "{error}");
        assert!(
            !format!("{error} {error:?}").contains("CANARY"),
            "{error:?}"
        );
    }

    #[test]
    fn resolver_debug_omits_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");
        let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");

        let debug = format!("{resolver:?}");

        assert!(debug.contains("server-key.pem"), "{debug}");
        assert!(!debug.contains("key:"), "{debug}");
    }

    #[test]
    fn reload_if_changed_skips_unchanged_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");
        let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");

        assert!(resolver.reload_if_changed().is_none());

        write_dev_certs(dir.path(), true).expect("rewrite");
        assert!(matches!(resolver.reload_if_changed(), Some(Ok(()))));
        assert!(resolver.reload_if_changed().is_none());
    }
}
