//! Protocol versions, cipher suites and ALPN of the data listener, and the [`ServerConfig`] built
//! from them.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::cipher_suite;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CommonState, ProtocolVersion, RootCertStore, ServerConfig, SupportedCipherSuite,
    SupportedProtocolVersion,
};
use tokio_rustls::TlsAcceptor;

use super::TlsError;
use super::resolver::{CertResolver, pem_error};

/// Protocol versions the server accepts, most preferred first.
///
/// # Defaults
///
/// TLS 1.3 and TLS 1.2. A client that offers only TLS 1.1 or older fails the handshake: rustls
/// 0.23 answers `protocol_version`, or `handshake_failure` when the hello lacks the
/// `signature_algorithms` extension, which TLS 1.1 clients never send.
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Cipher suites the server accepts, most preferred first. All are AEAD suites with ephemeral key
/// exchange, so every session has forward secrecy.
///
/// # Defaults
///
/// - TLS 1.3: `TLS13_AES_256_GCM_SHA384`, `TLS13_AES_128_GCM_SHA256`,
///   `TLS13_CHACHA20_POLY1305_SHA256`.
/// - TLS 1.2, ECDSA certificates: `TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384`,
///   `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`, `TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256`.
/// - TLS 1.2, RSA certificates: the same three with `ECDHE_RSA`.
///
/// CBC, RC4, 3DES, static RSA key exchange and anonymous suites are absent. ChaCha20-Poly1305
/// serves clients without AES instructions.
pub static CIPHER_SUITES: &[SupportedCipherSuite] = &[
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// ALPN protocol ids the server offers, most preferred first.
///
/// # Defaults
///
/// `h2`, then `http/1.1`. A client that sends no ALPN extension gets HTTP/1.1 by convention. A
/// client whose ALPN list contains neither id fails the handshake with a `no_application_protocol`
/// alert.
pub static ALPN_PROTOCOLS: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Returns the *ring* crypto provider restricted to [`CIPHER_SUITES`].
///
/// Key exchange groups are *ring*'s defaults in rustls 0.23: X25519, P-256 and P-384.
pub fn crypto_provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    }
}

/// Builds the server configuration: [`PROTOCOL_VERSIONS`], [`CIPHER_SUITES`], [`ALPN_PROTOCOLS`],
/// and the certificate that `resolver` currently holds.
///
/// With `client_ca`, the server requests a client certificate and verifies it against the CA
/// certificates in that PEM bundle. A client without a certificate is still accepted, and the
/// caller finds a verified client chain in the connection's `peer_certificates()`.
///
/// 0-RTT data stays disabled, since replayed early data could repeat a webhook or an upload.
pub fn server_config(
    resolver: Arc<CertResolver>,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(crypto_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(TlsError::ServerConfig)?;

    let builder = match client_ca {
        Some(path) => {
            let roots = read_client_ca(path)?;
            // TODO: load CRLs for client certificates, and reload the CA bundle with the
            // server certificate. Today a CA change needs a restart.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|source| TlsError::ClientCa {
                    path: path.to_path_buf(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };

    let mut config = builder.with_cert_resolver(resolver);
    config.max_early_data_size = 0;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|id| id.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Builds a [`TlsAcceptor`] over [`server_config`].
pub fn acceptor(
    resolver: Arc<CertResolver>,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, TlsError> {
    server_config(resolver, client_ca).map(TlsAcceptor::from)
}

/// Returns the negotiated protocol version as `TLSv1.2` or `TLSv1.3`, as OpenSSL names them.
///
/// Returns `None` before the handshake has chosen a version. A server connection can be passed
/// directly, since it dereferences to [`CommonState`].
pub fn protocol_version_name(state: &CommonState) -> Option<&'static str> {
    match state.protocol_version()? {
        ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        // PROTOCOL_VERSIONS contains only the two versions above, so no other can be negotiated.
        _ => None,
    }
}

/// Returns the IANA name of the negotiated cipher suite, such as `TLS13_AES_128_GCM_SHA256`, or
/// `None` before the handshake has chosen one.
pub fn cipher_suite_name(state: &CommonState) -> Option<&'static str> {
    state.negotiated_cipher_suite()?.suite().as_str()
}

/// Reads every certificate in the PEM bundle at `path` into a root store.
fn read_client_ca(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;

    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|error| pem_error(path, &error))?;
        roots
            .add(cert)
            .map_err(|source| TlsError::InvalidCertificate {
                path: path.to_path_buf(),
                source,
            })?;
    }

    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_versions_are_tls12_and_tls13_only() {
        let versions: Vec<ProtocolVersion> = PROTOCOL_VERSIONS.iter().map(|v| v.version).collect();

        assert_eq!(
            versions,
            [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2]
        );
    }

    #[test]
    fn cipher_suites_are_aead_only() {
        for suite in CIPHER_SUITES {
            let name = suite.suite().as_str().expect("known suite");
            let aead = name.contains("_GCM_") || name.contains("_CHACHA20_POLY1305_");

            assert!(aead, "{name} is not an AEAD suite");
        }
    }

    #[test]
    fn cipher_suites_cover_both_versions() {
        let tls13 = CIPHER_SUITES
            .iter()
            .filter(|s| s.version().version == ProtocolVersion::TLSv1_3)
            .count();
        let tls12 = CIPHER_SUITES
            .iter()
            .filter(|s| s.version().version == ProtocolVersion::TLSv1_2)
            .count();

        assert_eq!(tls13, 3);
        assert_eq!(tls12, 6);
    }

    #[test]
    fn crypto_provider_offers_only_policy_suites() {
        let provider = crypto_provider();

        assert_eq!(provider.cipher_suites.as_slice(), CIPHER_SUITES);
    }

    #[test]
    fn client_ca_without_certificates_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        fs::write(&path, "no PEM here\n").expect("write");

        let error = read_client_ca(&path).expect_err("empty bundle");

        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
    }
}
