//! Helpers for the access-control and audit tests.
//!
//! They provide a gateway with a bearer token for every role, optional Retell keys and
//! client-certificate principals, requests that report their client address, test CAs that issue
//! client certificates, and readers of the audit directory.
//!
//! [`AccessSettings`] starts from [`GatewayFiles`], which configures `reader`, `ingest` and
//! `admin` tokens for [`PRACTICE`], and adds an `auditor` token for it. The audit log uses the
//! gateway's defaults: `audit/` and `audit-signing.key` (with `audit-signing.pub`) beside the
//! configuration file.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, header};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use callseal::audit::Record;

use super::gateway::{
    GatewayFiles, GatewaySettings, PRACTICE, Reply, RequestBody, TestGateway, read_reply,
    within_guard,
};

/// Principal name of the `auditor` token that [`AccessSettings`] adds for [`PRACTICE`].
pub const AUDITOR_NAME: &str = "clinic-1-auditor";

/// File name of the client CA certificate in the gateway's directory.
const CLIENT_CA_FILE: &str = "client-ca.pem";

/// Extra configuration of an access-test gateway.
#[derive(Default)]
pub struct AccessSettings {
    retell_key: Option<String>,
    client_ca_pem: Option<String>,
    clients: Vec<(String, String, String)>,
}

impl AccessSettings {
    /// Configures `key` as [`PRACTICE`]'s Retell API key.
    pub fn retell_key(mut self, key: &str) -> Self {
        self.retell_key = Some(key.to_owned());
        self
    }

    /// Sets `tls.client_ca` to the certificate of `ca`.
    pub fn client_ca(mut self, ca: &TestCa) -> Self {
        self.client_ca_pem = Some(ca.pem());
        self
    }

    /// Adds a `[[clients]]` entry for [`PRACTICE`] that matches the subject common name.
    pub fn client(mut self, name: &str, subject_cn: &str, role: &str) -> Self {
        self.clients
            .push((name.to_owned(), subject_cn.to_owned(), role.to_owned()));
        self
    }

    /// Creates the files, edits their `callseal.toml` and starts a gateway on them.
    pub async fn start(self) -> AccessGateway {
        let files = GatewaySettings::default().create_files();
        let auditor_token = random_hex(32);
        let mut config =
            fs::read_to_string(&files.config_path).expect("read the generated callseal.toml");

        if let Some(key) = &self.retell_key {
            let practice_table = format!("[[practices]]\nid = \"{PRACTICE}\"\n");
            replace_once(
                &mut config,
                &practice_table,
                &format!("{practice_table}retell_api_keys = [\"{key}\"]\n"),
            );
        }
        if let Some(pem) = &self.client_ca_pem {
            fs::write(files.dir().join(CLIENT_CA_FILE), pem).expect("write the client CA");
            let key_line = "key = \"certs/server-key.pem\"\n";
            replace_once(
                &mut config,
                key_line,
                &format!("{key_line}client_ca = \"{CLIENT_CA_FILE}\"\n"),
            );
        }

        let auditor_hash = hex::encode(Sha256::digest(auditor_token.as_bytes()));
        config.push_str(&format!(
            "\n[[tokens]]\nname = \"{AUDITOR_NAME}\"\nsha256 = \"{auditor_hash}\"\nrole = \"auditor\"\npractices = [\"{PRACTICE}\"]\n"
        ));
        for (name, subject_cn, role) in &self.clients {
            config.push_str(&format!(
                "\n[[clients]]\nname = \"{name}\"\nsubject_cn = \"{subject_cn}\"\nrole = \"{role}\"\npractices = [\"{PRACTICE}\"]\n"
            ));
        }
        fs::write(&files.config_path, config).expect("write the access callseal.toml");

        AccessGateway {
            gateway: TestGateway::start(files).await,
            auditor_token,
        }
    }
}

/// A running gateway with a token for every role of [`PRACTICE`].
pub struct AccessGateway {
    pub gateway: TestGateway,
    pub auditor_token: String,
}

impl AccessGateway {
    pub fn files(&self) -> &GatewayFiles {
        &self.gateway.files
    }

    /// Returns [`PRACTICE`]'s bearer token of `role`: `ingest`, `reader`, `admin` or `auditor`.
    pub fn token(&self, role: &str) -> &str {
        let files = self.files();
        match role {
            "ingest" => &files.ingest_token,
            "reader" => &files.token,
            "admin" => &files.admin_token,
            "auditor" => &self.auditor_token,
            other => panic!("no token of role `{other}`"),
        }
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.files().dir().join("audit")
    }

    /// Returns the public key file written beside the generated signing key.
    pub fn public_key_file(&self) -> PathBuf {
        self.files().dir().join("audit-signing.pub")
    }

    /// Builds a rustls client configuration that trusts the development CA and offers HTTP/1.1,
    /// with `identity` as its client certificate when given.
    pub fn tls_config(&self, identity: Option<&ClientIdentity>) -> Arc<ClientConfig> {
        client_config(&self.files().ca_cert, identity)
    }
}

/// Reads every complete record of every segment in `dir`, in chain order.
pub fn read_records(dir: &Path) -> Vec<Record> {
    let mut records = Vec::new();
    for segment in segment_files(dir) {
        let text = fs::read_to_string(&segment).expect("read an audit segment");
        // A line without its final `\n` is a record still being written.
        for line in text
            .split_inclusive('\n')
            .filter(|line| line.ends_with('\n'))
        {
            let record: Record = serde_json::from_str(line.trim_end())
                .unwrap_or_else(|error| panic!("{}: invalid record: {error}", segment.display()));
            records.push(record);
        }
    }
    records.sort_by_key(|record| record.seq);
    records
}

/// Lists the `audit-*.jsonl` segment files of `dir`, sorted by name.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read the audit directory")
        .map(|entry| entry.expect("read an audit directory entry").path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("audit-") && name.ends_with(".jsonl"))
        })
        .collect();
    segments.sort();
    segments
}

/// Returns the records of the request whose `x-request-id` is `request_id`.
pub fn records_of(records: &[Record], request_id: &str) -> Vec<Record> {
    records
        .iter()
        .filter(|record| record.access.request_id.as_str() == request_id)
        .cloned()
        .collect()
}

/// Polls the audit directory until `done` holds for its records, and returns them. A streamed
/// response writes its completion record after the client has read the body, so tests wait for it.
pub async fn wait_for_records(dir: &Path, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    within_guard("the expected audit records", async {
        loop {
            let records = read_records(dir);
            if done(&records) {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Sends one HTTP/1.1 request on a new TLS connection to `addr` and returns the connection's
/// local address (the client address in audit records) with the response.
pub async fn send_from_known_address(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    request: Request<RequestBody>,
) -> (SocketAddr, Reply) {
    within_guard("request", async {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the data listener");
        let local = tcp.local_addr().expect("read the client's local address");
        let name = ServerName::try_from("localhost").expect("valid server name");
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the gateway");
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        let description = format!("{} {}", request.method(), request.uri().path());
        let response = sender
            .send_request(request)
            .await
            .unwrap_or_else(|error| panic!("{description} failed: {error}"));
        let mut reply = read_reply(response).await;
        reply.request = description;
        (local, reply)
    })
    .await
}

/// Starts an HTTP/1.1 request to the gateway at `addr` without credentials.
pub fn request_to(addr: SocketAddr, method: http::Method, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, format!("localhost:{}", addr.port()))
}

/// Connects with `tls` and reads until the connection ends, returning the TLS error that ended
/// it, or `None` if the gateway accepted the handshake and closed cleanly.
///
/// In TLS 1.3 the client finishes its side of the handshake before the server has checked the
/// client certificate, so a rejection arrives as an alert on the first read.
pub async fn handshake_error(addr: SocketAddr, tls: Arc<ClientConfig>) -> Option<rustls::Error> {
    within_guard("TLS handshake", async {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the data listener");
        let name = ServerName::try_from("localhost").expect("valid server name");
        let mut stream = match TlsConnector::from(tls).connect(name, tcp).await {
            Ok(stream) => stream,
            Err(error) => return Some(tls_error(error)),
        };
        let mut buffer = [0u8; 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => return None,
                Ok(_) => continue,
                Err(error) => return Some(tls_error(error)),
            }
        }
    })
    .await
}

fn tls_error(error: std::io::Error) -> rustls::Error {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
        .unwrap_or_else(|| panic!("the connection failed with a non-TLS error: {error}"))
}

/// A self-signed CA that issues client certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A client certificate and its private key, in DER.
pub struct ClientIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl TestCa {
    pub fn new(common_name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generate the CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-sign the CA"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a client-authentication certificate with the subject common name `common_name`.
    pub fn issue_client(&self, common_name: &str) -> ClientIdentity {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate the client key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign the client certificate");
        ClientIdentity {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Builds a client configuration that trusts only the CA in `ca_cert` and offers HTTP/1.1.
pub fn client_config(ca_cert: &Path, identity: Option<&ClientIdentity>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_cert).expect("open the development CA") {
        roots
            .add(cert.expect("parse the development CA"))
            .expect("trust the development CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())
            .expect("use the client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn replace_once(text: &mut String, needle: &str, replacement: &str) {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "the generated callseal.toml must contain {needle:?} exactly once"
    );
    *text = text.replacen(needle, replacement, 1);
}

/// Returns `bytes` random bytes as hex digits.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("draw random bytes");
    hex::encode(buffer)
}
