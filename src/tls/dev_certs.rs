//! Development certificates: a local CA and a `localhost` server certificate that it signs.
//!
//! These files let a developer run the data listener with TLS on their own machine. The CA is
//! name-constrained to `localhost` and the loopback addresses: a developer may add `ca.pem` to a
//! trust store, and if `ca-key.pem` leaks, clients that enforce X.509 name constraints still
//! reject a certificate it signs for any other host.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::TlsError;

/// File name of the development CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the development CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the `localhost` server certificate.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the `localhost` server private key.
pub const SERVER_KEY_FILE: &str = "server-key.pem";

/// Validity of the development CA: 10 years.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Validity of the server certificate: 397 days, one day under the 398-day maximum for publicly
/// trusted server certificates, so it is renewed about once a year like one.
const SERVER_VALIDITY: Duration = Duration::days(397);
/// Backdating of `notBefore`, so that a client whose clock runs slightly behind accepts new
/// certificates.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// Paths of the four files that [`write_dev_certs`] writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevCertPaths {
    /// The development CA certificate, to add to a client's trust store.
    pub ca_cert: PathBuf,
    /// The development CA private key (mode 0600).
    pub ca_key: PathBuf,
    /// The `localhost` server certificate, signed by the CA.
    pub server_cert: PathBuf,
    /// The server private key (mode 0600).
    pub server_key: PathBuf,
}

impl DevCertPaths {
    /// Returns the paths of the development certificate files in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            server_cert: dir.join(SERVER_CERT_FILE),
            server_key: dir.join(SERVER_KEY_FILE),
        }
    }

    fn all(&self) -> [&Path; 4] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
        ]
    }
}

/// Generates a development CA and a `localhost` server certificate signed by it, and writes them
/// to `dir` as `ca.pem`, `ca-key.pem`, `server.pem` and `server-key.pem`.
///
/// The server certificate has the subject alternative names `localhost`, `127.0.0.1` and `::1`.
/// Keys are ECDSA P-256 in PKCS#8 PEM, written with mode 0600 on Unix. `dir` is created when
/// missing.
///
/// Without `overwrite`, the call fails with [`TlsError::DevCertExists`] before writing anything
/// when any of the four files exists. With `overwrite`, each file is replaced by an atomic rename,
/// so a server watching the files never reads a half-written one.
pub fn write_dev_certs(dir: &Path, overwrite: bool) -> Result<DevCertPaths, TlsError> {
    let paths = DevCertPaths::in_dir(dir);
    if !overwrite && let Some(existing) = paths.all().into_iter().find(|path| path.exists()) {
        return Err(TlsError::DevCertExists {
            path: existing.to_path_buf(),
        });
    }

    let generated = generate().map_err(TlsError::Generate)?;

    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(
        &paths.ca_cert,
        generated.ca_cert.as_bytes(),
        false,
        overwrite,
    )?;
    write_file(&paths.ca_key, generated.ca_key.as_bytes(), true, overwrite)?;
    write_file(
        &paths.server_cert,
        generated.server_cert.as_bytes(),
        false,
        overwrite,
    )?;
    write_file(
        &paths.server_key,
        generated.server_key.as_bytes(),
        true,
        overwrite,
    )?;

    tracing::info!(dir = %dir.display(), "wrote development TLS certificates");
    Ok(paths)
}

/// PEM text of the generated certificates and keys. The keys are zeroized on drop.
struct Generated {
    ca_cert: String,
    ca_key: Zeroizing<String>,
    server_cert: String,
    server_key: Zeroizing<String>,
}

fn generate() -> Result<Generated, rcgen::Error> {
    let now = OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params(now);
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_cert = server_params(now)?.signed_by(&server_key, &issuer)?;

    Ok(Generated {
        ca_cert: ca_cert.pem(),
        ca_key: Zeroizing::new(ca_key.serialize_pem()),
        server_cert: server_cert.pem(),
        server_key: Zeroizing::new(server_key.serialize_pem()),
    })
}

fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name("callseal development CA");
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    // A path length of 0: the CA signs leaf certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![
            GeneralSubtree::DnsName("localhost".to_string()),
            GeneralSubtree::IpAddress(CidrSubnet::V4([127, 0, 0, 0], [255, 0, 0, 0])),
            GeneralSubtree::IpAddress(CidrSubnet::V6(Ipv6Addr::LOCALHOST.octets(), [0xff; 16])),
        ],
        excluded_subtrees: Vec::new(),
    });
    params
}

fn server_params(now: OffsetDateTime) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name("localhost");
    params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + SERVER_VALIDITY;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "callseal development");
    name.push(DnType::CommonName, common_name);
    name
}

/// Writes `contents` to `path`, with mode 0600 when `secret`.
///
/// With `overwrite`, the contents go to a temporary file in the same directory first and are
/// renamed over `path`. Without it, the file is created exclusively, so an existing file is never
/// replaced, even one created after the existence check in [`write_dev_certs`].
fn write_file(path: &Path, contents: &[u8], secret: bool, overwrite: bool) -> Result<(), TlsError> {
    let write_error = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };

    if !overwrite {
        return create_new(path, contents, secret).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                TlsError::DevCertExists {
                    path: path.to_path_buf(),
                }
            } else {
                write_error(source)
            }
        });
    }

    let temporary = temporary_path(path);
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(write_error(error)),
    }
    create_new(&temporary, contents, secret).map_err(write_error)?;
    fs::rename(&temporary, path).map_err(write_error)
}

/// Creates `path`, failing when it exists, and writes and syncs `contents`.
fn create_new(path: &Path, contents: &[u8], secret: bool) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;

    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Returns `.NAME.tmp` beside `path`.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_path_is_hidden_sibling() {
        let path = Path::new("/etc/callseal/server-key.pem");

        assert_eq!(
            temporary_path(path),
            Path::new("/etc/callseal/.server-key.pem.tmp")
        );
    }

    #[test]
    fn existing_file_blocks_all_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = DevCertPaths::in_dir(dir.path());
        fs::write(&paths.server_key, "keep").expect("write");

        let error = write_dev_certs(dir.path(), false).expect_err("exists");

        assert!(matches!(error, TlsError::DevCertExists { .. }), "{error}");
        assert!(!paths.ca_cert.exists());
        assert!(!paths.ca_key.exists());
        assert!(!paths.server_cert.exists());
    }

    #[test]
    fn overwrite_replaces_stale_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("first");
        fs::write(temporary_path(&paths.ca_key), "left by a crash").expect("write");

        write_dev_certs(dir.path(), true).expect("overwrite");

        assert!(!temporary_path(&paths.ca_key).exists());
    }
}
