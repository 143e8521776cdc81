//! TLS policy over real loopback connections: protocol versions, cipher suites, ALPN, certificate
//! reloads, client certificates and the development certificate files.
//!
//! Each test writes development certificates into its own temporary directory, starts a TLS
//! listener on 127.0.0.1 with the `callseal::tls` acceptor, and connects with tokio-rustls
//! clients or with hand-built ClientHello bytes over a plain TCP stream.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use callseal::tls::{self, CertResolver, DevCertPaths, TlsAcceptor, TlsError, write_dev_certs};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

// TLS record and handshake constants from RFC 5246, written out so that the raw ClientHello
// tests depend on no TLS library.
const CONTENT_TYPE_ALERT: u8 = 21;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const ALERT_LEVEL_FATAL: u8 = 2;
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_PROTOCOL_VERSION: u8 = 70;
const TLS1_0: u16 = 0x0301;
const TLS1_1: u16 = 0x0302;
const TLS1_2: u16 = 0x0303;

/// Limit for waits on events that should happen within milliseconds. It only keeps a broken
/// build from hanging CI: no assertion depends on how fast anything runs.
const HANG_GUARD: Duration = Duration::from_secs(30);

const ALL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn within_guard<T>(event: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, future).await {
        Ok(value) => value,
        Err(_) => panic!("{event} did not happen within the hang guard of {HANG_GUARD:?}"),
    }
}

/// Starts a TLS listener on 127.0.0.1. After each handshake the server sends one line,
/// `VERSION SUITE ALPN CLIENT_CERTS`, and closes the connection with close_notify.
async fn start_server(acceptor: TlsAcceptor) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");

    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let report = {
                    let (_, connection) = stream.get_ref();
                    let alpn = connection
                        .alpn_protocol()
                        .map(|id| String::from_utf8_lossy(id).into_owned())
                        .unwrap_or_else(|| "-".to_string());
                    format!(
                        "{} {} {} {}\n",
                        tls::protocol_version_name(connection).unwrap_or("-"),
                        tls::cipher_suite_name(connection).unwrap_or("-"),
                        alpn,
                        connection.peer_certificates().map_or(0, <[_]>::len),
                    )
                };
                let _ = stream.write_all(report.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Loads the dev certificate in `paths` and starts a listener serving it.
async fn start_dev_server(paths: &DevCertPaths) -> (Arc<CertResolver>, SocketAddr) {
    let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");
    let acceptor = tls::acceptor(Arc::clone(&resolver), None).expect("acceptor");
    let addr = start_server(acceptor).await;
    (resolver, addr)
}

fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("open PEM")
        .collect::<Result<_, _>>()
        .expect("parse PEM")
}

fn client_config(
    trusted_cas: &[&Path],
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for path in trusted_cas {
        for cert in read_certs(path) {
            roots.add(cert).expect("add trusted CA");
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("client versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    config
}

/// What a client saw of one completed connection.
#[derive(Debug)]
struct Session {
    leaf: CertificateDer<'static>,
    version: Option<ProtocolVersion>,
    alpn: Option<Vec<u8>>,
    /// The line the server sent: version, cipher suite, ALPN and client certificate count.
    server_report: String,
}

async fn connect(
    addr: SocketAddr,
    config: ClientConfig,
    server_name: &str,
) -> std::io::Result<Session> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let mut stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;

    let (leaf, version, alpn) = {
        let (_, connection) = stream.get_ref();
        let leaf = connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .expect("server sent a certificate")
            .clone();
        (
            leaf,
            connection.protocol_version(),
            connection.alpn_protocol().map(<[u8]>::to_vec),
        )
    };

    let mut server_report = String::new();
    stream.read_to_string(&mut server_report).await?;
    Ok(Session {
        leaf,
        version,
        alpn,
        server_report: server_report.trim_end().to_string(),
    })
}

/// Builds one TLS record that carries a ClientHello with a fixed random and no session id.
fn client_hello(
    record_version: u16,
    client_version: u16,
    cipher_suites: &[u16],
    extensions: &[(u16, Vec<u8>)],
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(client_version.to_be_bytes());
    body.extend([0x5a; 32]);
    body.push(0);
    body.extend(u16_len(cipher_suites.len() * 2));
    for suite in cipher_suites {
        body.extend(suite.to_be_bytes());
    }
    // One compression method: null.
    body.extend([1, 0]);

    let mut extension_bytes = Vec::new();
    for (kind, data) in extensions {
        extension_bytes.extend(kind.to_be_bytes());
        extension_bytes.extend(u16_len(data.len()));
        extension_bytes.extend(data);
    }
    body.extend(u16_len(extension_bytes.len()));
    body.extend(extension_bytes);

    let mut handshake = vec![HANDSHAKE_CLIENT_HELLO];
    handshake.extend(&u32::try_from(body.len()).expect("short body").to_be_bytes()[1..]);
    handshake.extend(body);

    let mut record = vec![CONTENT_TYPE_HANDSHAKE];
    record.extend(record_version.to_be_bytes());
    record.extend(u16_len(handshake.len()));
    record.extend(handshake);
    record
}

fn u16_len(len: usize) -> [u8; 2] {
    u16::try_from(len).expect("length fits u16").to_be_bytes()
}

/// Builds the `server_name` extension for one host name.
fn server_name_extension(host: &str) -> (u16, Vec<u8>) {
    let mut entry = vec![0];
    entry.extend(u16_len(host.len()));
    entry.extend(host.as_bytes());
    let mut data = u16_len(entry.len()).to_vec();
    data.extend(entry);
    (0x0000, data)
}

/// Builds `supported_groups` with x25519 and secp256r1, and `ec_point_formats` with
/// uncompressed.
fn ecdhe_extensions() -> [(u16, Vec<u8>); 2] {
    [
        (0x000a, vec![0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]),
        (0x000b, vec![0x01, 0x00]),
    ]
}

/// Builds `signature_algorithms` with ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256 and
/// rsa_pkcs1_sha256.
fn signature_algorithms_extension() -> (u16, Vec<u8>) {
    (0x000d, vec![0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01])
}

/// Sends `hello` over plain TCP and returns the first record the server sends back, as
/// (content type, record payload).
async fn send_raw_hello(addr: SocketAddr, hello: &[u8]) -> (u8, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(hello).await.expect("send ClientHello");

    let mut header = [0u8; 5];
    within_guard("server reply", tcp.read_exact(&mut header))
        .await
        .expect("read record header");
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let mut payload = vec![0u8; len];
    within_guard("server reply", tcp.read_exact(&mut payload))
        .await
        .expect("read record payload");
    (header[0], payload)
}

/// Log output shared between a tracing subscriber and the test that reads it.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuffer {
    fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Rebuilds the issuer of the development CA in `paths` from its key and its subject name.
fn dev_ca_issuer(paths: &DevCertPaths) -> Issuer<'static, KeyPair> {
    let key_pem = std::fs::read_to_string(&paths.ca_key).expect("read CA key");
    let key = KeyPair::from_pem(&key_pem).expect("parse CA key");
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "callseal development");
    params
        .distinguished_name
        .push(DnType::CommonName, "callseal development CA");
    Issuer::new(params, key)
}

/// Writes a server certificate for `host`, signed by `issuer`, and its key.
fn write_leaf_signed_by(
    issuer: &Issuer<'_, KeyPair>,
    host: &str,
    cert_path: &Path,
    key_path: &Path,
) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(vec![host.to_string()]).expect("leaf params");
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).expect("leaf cert");
    std::fs::write(cert_path, cert.pem()).expect("write leaf cert");
    std::fs::write(key_path, key.serialize_pem()).expect("write leaf key");
}

fn client_cert_ca() -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "test client CA");
    let cert = params.self_signed(&key).expect("CA cert");
    (cert, Issuer::new(params, key))
}

fn client_cert(issuer: &Issuer<'_, KeyPair>) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().expect("client key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    params
        .distinguished_name
        .push(DnType::CommonName, "ingest-client");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).expect("client cert");
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.der().clone(), key_der)
}

// ---------------------------------------------------------------------------------------------
// Protocol versions and cipher suites
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tls11_client_hello_gets_protocol_version_alert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (_resolver, addr) = start_dev_server(&paths).await;

    // A TLS 1.1 client: version 0x0302 in the record and the hello, no supported_versions
    // extension, and CBC suites only (ECDHE_RSA and ECDHE_ECDSA AES-128/256-CBC-SHA,
    // RSA AES-128/256-CBC-SHA, RSA 3DES-EDE-CBC-SHA). It also sends signature_algorithms,
    // because rustls 0.23 rejects a hello without that extension before it compares versions
    // (the next test covers that shape).
    let [groups, point_formats] = ecdhe_extensions();
    let hello = client_hello(
        TLS1_1,
        TLS1_1,
        &[0xc013, 0xc014, 0xc009, 0xc00a, 0x002f, 0x0035, 0x000a],
        &[
            server_name_extension("localhost"),
            groups,
            point_formats,
            signature_algorithms_extension(),
        ],
    );

    let (content_type, payload) = send_raw_hello(addr, &hello).await;

    assert_eq!(content_type, CONTENT_TYPE_ALERT);
    assert_eq!(payload, [ALERT_LEVEL_FATAL, ALERT_PROTOCOL_VERSION]);
}

#[tokio::test]
async fn tls11_client_hello_without_signature_algorithms_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (_resolver, addr) = start_dev_server(&paths).await;

    // The hello of a client that implements TLS 1.1 only: signature_algorithms was introduced
    // in TLS 1.2, so it is absent. rustls 0.23 sends a handshake_failure alert here, not
    // protocol_version, because it checks for that extension first. Either alert rejects it.
    let [groups, point_formats] = ecdhe_extensions();
    let hello = client_hello(
        TLS1_1,
        TLS1_1,
        &[0xc013, 0xc014, 0xc009, 0xc00a, 0x002f, 0x0035, 0x000a],
        &[server_name_extension("localhost"), groups, point_formats],
    );

    let (content_type, payload) = send_raw_hello(addr, &hello).await;

    assert_eq!(content_type, CONTENT_TYPE_ALERT);
    assert_eq!(payload[0], ALERT_LEVEL_FATAL);
    assert!(
        matches!(payload[1], ALERT_HANDSHAKE_FAILURE | ALERT_PROTOCOL_VERSION),
        "alert description {}",
        payload[1]
    );
}

#[tokio::test]
async fn tls12_cbc_only_client_hello_gets_handshake_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (_resolver, addr) = start_dev_server(&paths).await;

    // TLS 1.2 offered, but only CBC suites (ECDHE_ECDSA and ECDHE_RSA AES-128-CBC-SHA256 and
    // AES-128/256-CBC-SHA), which the AEAD-only policy excludes.
    let [groups, point_formats] = ecdhe_extensions();
    let hello = client_hello(
        TLS1_0,
        TLS1_2,
        &[0xc023, 0xc027, 0xc009, 0xc00a, 0xc013, 0xc014],
        &[
            server_name_extension("localhost"),
            groups,
            point_formats,
            signature_algorithms_extension(),
        ],
    );

    let (content_type, payload) = send_raw_hello(addr, &hello).await;

    assert_eq!(content_type, CONTENT_TYPE_ALERT);
    assert_eq!(payload, [ALERT_LEVEL_FATAL, ALERT_HANDSHAKE_FAILURE]);
}

#[tokio::test]
async fn tls12_only_client_completes_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (_resolver, addr) = start_dev_server(&paths).await;
    let config = client_config(
        &[&paths.ca_cert],
        &[&rustls::version::TLS12],
        &[b"h2", b"http/1.1"],
    );

    let session = connect(addr, config, "localhost").await.expect("handshake");

    assert_eq!(session.version, Some(ProtocolVersion::TLSv1_2));
    assert_eq!(session.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        session.server_report,
        "TLSv1.2 TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 h2 0"
    );
}

#[tokio::test]
async fn tls13_only_client_completes_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (_resolver, addr) = start_dev_server(&paths).await;
    let config = client_config(
        &[&paths.ca_cert],
        &[&rustls::version::TLS13],
        &[b"h2", b"http/1.1"],
    );

    let session = connect(addr, config, "localhost").await.expect("handshake");

    assert_eq!(session.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(session.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        session.server_report,
        "TLSv1.3 TLS13_AES_256_GCM_SHA384 h2 0"
    );
}

#[tokio::test]
async fn alpn_falls_back_to_http11_or_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (_resolver, addr) = start_dev_server(&paths).await;

    let http11 = client_config(&[&paths.ca_cert], ALL_VERSIONS, &[b"http/1.1"]);
    let session = connect(addr, http11, "localhost").await.expect("handshake");
    assert_eq!(session.alpn.as_deref(), Some(&b"http/1.1"[..]));

    let no_alpn = client_config(&[&paths.ca_cert], ALL_VERSIONS, &[]);
    let session = connect(addr, no_alpn, "localhost")
        .await
        .expect("handshake");
    assert_eq!(session.alpn, None);
}

#[tokio::test]
async fn alpn_without_common_protocol_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (_resolver, addr) = start_dev_server(&paths).await;
    let config = client_config(&[&paths.ca_cert], ALL_VERSIONS, &[b"spdy/3.1"]);

    let result = connect(addr, config, "localhost").await;

    assert!(result.is_err(), "{result:?}");
}

// ---------------------------------------------------------------------------------------------
// Certificate reloads
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reload_swaps_certificate_only_when_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let renewed_dir = tempfile::tempdir().expect("tempdir");
    let renewed = write_dev_certs(renewed_dir.path(), false).expect("renewed dev certs");
    let (resolver, addr) = start_dev_server(&paths).await;
    let status = resolver.subscribe();
    let trust_both = || client_config(&[&paths.ca_cert, &renewed.ca_cert], ALL_VERSIONS, &[]);

    let before = connect(addr, trust_both(), "localhost")
        .await
        .expect("handshake");
    assert_eq!(before.leaf, read_certs(&paths.server_cert)[0]);

    // Renewal: copy the new certificate and key over the served files.
    std::fs::copy(&renewed.server_cert, &paths.server_cert).expect("copy cert");
    std::fs::copy(&renewed.server_key, &paths.server_key).expect("copy key");
    resolver.reload().expect("reload");

    let renewed_leaf = read_certs(&renewed.server_cert)[0].clone();
    let after = connect(addr, trust_both(), "localhost")
        .await
        .expect("handshake");
    assert_eq!(after.leaf, renewed_leaf);
    assert_ne!(after.leaf, before.leaf);
    assert_eq!(status.borrow().succeeded, 1);

    // A garbage certificate file: the reload fails and the renewed certificate keeps serving.
    std::fs::write(&paths.server_cert, "not a certificate\n").expect("write garbage");
    let error = resolver.reload().expect_err("garbage PEM");
    assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
    assert!(error.to_string().contains("server.pem"), "{error}");

    let still = connect(addr, trust_both(), "localhost")
        .await
        .expect("handshake");
    assert_eq!(still.leaf, renewed_leaf);

    // A valid certificate with the key of another certificate: rejected the same way.
    std::fs::copy(&paths.ca_cert, &paths.server_cert).expect("copy CA cert");
    let error = resolver.reload().expect_err("key mismatch");
    assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");

    let still = connect(addr, trust_both(), "localhost")
        .await
        .expect("handshake");
    assert_eq!(still.leaf, renewed_leaf);

    let status = status.borrow().clone();
    assert_eq!(status.succeeded, 1);
    assert_eq!(status.failed, 2);
    let last_error = status.last_error.expect("last error recorded");
    assert!(last_error.contains("does not match"), "{last_error}");
}

#[test]
fn reload_failure_logs_paths_but_no_key_material() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");
    let ca_key_pem = std::fs::read_to_string(&paths.ca_key).expect("read CA key");
    let ca_key_line = ca_key_pem.lines().nth(1).expect("base64 line").to_string();
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();

    tracing::subscriber::with_default(subscriber, || {
        // A key that does not match the certificate, then a key file with invalid base64.
        std::fs::copy(&paths.ca_key, &paths.server_key).expect("copy CA key");
        assert!(resolver.reload().is_err());
        std::fs::write(
            &paths.server_key,
            "-----BEGIN PRIVATE KEY-----\nCANARY*KEY*BYTES\n-----END PRIVATE KEY-----\n",
        )
        .expect("write bad key");
        assert!(resolver.reload().is_err());
    });

    let output = logs.contents();
    assert_eq!(output.matches("reload failed").count(), 2, "{output}");
    assert!(output.contains("server-key.pem"), "{output}");
    assert!(!output.contains(&ca_key_line), "{output}");
    assert!(!output.contains("CANARY"), "{output}");
}

#[tokio::test]
async fn watcher_reloads_changed_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let renewed_dir = tempfile::tempdir().expect("tempdir");
    let renewed = write_dev_certs(renewed_dir.path(), false).expect("renewed dev certs");
    let (resolver, addr) = start_dev_server(&paths).await;
    let mut status = resolver.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = resolver
        .watch(Duration::from_millis(10), async move {
            let _ = stopped.await;
        })
        .expect("watch");

    // Copying two files is not atomic, so the watcher may first read the new certificate with
    // the old key and fail once before it reads both.
    std::fs::copy(&renewed.server_cert, &paths.server_cert).expect("copy cert");
    std::fs::copy(&renewed.server_key, &paths.server_key).expect("copy key");
    within_guard("a successful reload", status.wait_for(|s| s.succeeded >= 1))
        .await
        .expect("resolver alive");

    let trust_both = client_config(&[&paths.ca_cert, &renewed.ca_cert], ALL_VERSIONS, &[]);
    let session = connect(addr, trust_both, "localhost")
        .await
        .expect("handshake");
    assert_eq!(session.leaf, read_certs(&renewed.server_cert)[0]);

    stop.send(()).expect("watcher listening");
    within_guard("watcher stop", watcher.stopped()).await;
}

#[tokio::test]
async fn watcher_stops_when_handle_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");
    let (mut stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = resolver
        .watch(Duration::from_millis(10), async move {
            let _ = stopped.await;
        })
        .expect("watch");

    drop(watcher);

    // The shutdown future owns the receiver, so the sender reports closed once the task and its
    // future are dropped.
    within_guard("watcher task drop", stop.closed()).await;
}

// ---------------------------------------------------------------------------------------------
// Client certificates
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_ca_verifies_client_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (client_ca_cert, client_issuer) = client_cert_ca();
    let client_ca_path = dir.path().join("client-ca.pem");
    std::fs::write(&client_ca_path, client_ca_cert.pem()).expect("write client CA");

    let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");
    let acceptor = tls::acceptor(resolver, Some(&client_ca_path)).expect("acceptor");
    let addr = start_server(acceptor).await;
    let roots = || {
        let mut roots = RootCertStore::empty();
        roots
            .add(read_certs(&paths.ca_cert)[0].clone())
            .expect("root");
        roots
    };
    let client_with = |cert: CertificateDer<'static>, key: PrivateKeyDer<'static>| {
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots())
            .with_client_auth_cert(vec![cert], key)
            .expect("client auth")
    };

    let (cert, key) = client_cert(&client_issuer);
    let session = connect(addr, client_with(cert, key), "localhost")
        .await
        .expect("handshake with trusted client certificate");
    assert!(
        session.server_report.ends_with(" 1"),
        "{}",
        session.server_report
    );

    let without_cert = client_config(&[&paths.ca_cert], ALL_VERSIONS, &[]);
    let session = connect(addr, without_cert, "localhost")
        .await
        .expect("handshake without client certificate");
    assert!(
        session.server_report.ends_with(" 0"),
        "{}",
        session.server_report
    );

    let (_, other_issuer) = client_cert_ca();
    let (cert, key) = client_cert(&other_issuer);
    let result = connect(addr, client_with(cert, key), "localhost").await;
    assert!(
        result.is_err(),
        "untrusted client certificate accepted: {result:?}"
    );
}

#[test]
fn client_ca_file_without_certificates_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");

    let result = tls::server_config(resolver, Some(&paths.server_key));

    assert!(
        matches!(result, Err(TlsError::NoCertificate { .. })),
        "{result:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Development certificates
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dev_cert_covers_localhost_and_loopback_ips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let (_resolver, addr) = start_dev_server(&paths).await;

    for name in ["localhost", "127.0.0.1", "::1"] {
        let config = client_config(&[&paths.ca_cert], ALL_VERSIONS, &[]);
        let result = connect(addr, config, name).await;
        assert!(result.is_ok(), "{name}: {result:?}");
    }

    let config = client_config(&[&paths.ca_cert], ALL_VERSIONS, &[]);
    let result = connect(addr, config, "callseal.example").await;
    assert!(result.is_err(), "certificate accepted for another host");
}

#[tokio::test]
async fn dev_ca_name_constraints_reject_other_hosts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let issuer = dev_ca_issuer(&paths);

    // The positive case proves that the rebuilt issuer chains to `ca.pem`, so the rejection
    // below comes from the name constraints and not from a broken chain.
    for (host, accepted) in [("localhost", true), ("callseal.example", false)] {
        let cert_path = dir.path().join(format!("{host}.pem"));
        let key_path = dir.path().join(format!("{host}-key.pem"));
        write_leaf_signed_by(&issuer, host, &cert_path, &key_path);
        let resolver = CertResolver::load(&cert_path, &key_path).expect("load");
        let addr = start_server(tls::acceptor(resolver, None).expect("acceptor")).await;
        let config = client_config(&[&paths.ca_cert], ALL_VERSIONS, &[]);

        let result = connect(addr, config, host).await;

        assert_eq!(result.is_ok(), accepted, "{host}: {result:?}");
    }
}

#[cfg(unix)]
#[test]
fn dev_cert_key_files_have_mode_0600() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };

    assert_eq!(mode(&paths.ca_key), 0o600);
    assert_eq!(mode(&paths.server_key), 0o600);
    assert_ne!(
        mode(&paths.ca_cert) & 0o044,
        0,
        "certificates stay readable"
    );

    // Overwriting replaces the files, and the new key files are private too.
    write_dev_certs(dir.path(), true).expect("overwrite");
    assert_eq!(mode(&paths.ca_key), 0o600);
    assert_eq!(mode(&paths.server_key), 0o600);
}

#[test]
fn dev_certs_refuse_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = write_dev_certs(dir.path(), false).expect("dev certs");
    let original = std::fs::read(&paths.server_key).expect("read key");

    let error = write_dev_certs(dir.path(), false).expect_err("second write");

    assert!(matches!(error, TlsError::DevCertExists { .. }), "{error}");
    assert!(error.to_string().contains("ca.pem"), "{error}");
    assert_eq!(
        std::fs::read(&paths.server_key).expect("read key"),
        original
    );

    write_dev_certs(dir.path(), true).expect("overwrite");
    assert_ne!(
        std::fs::read(&paths.server_key).expect("read key"),
        original
    );
}

#[test]
fn dev_certs_create_missing_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nested = dir.path().join("certs").join("dev");

    let paths = write_dev_certs(&nested, false).expect("dev certs");

    assert_eq!(paths, DevCertPaths::in_dir(&nested));
    assert!(CertResolver::load(&paths.server_cert, &paths.server_key).is_ok());
}
