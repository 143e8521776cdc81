//! A gateway under test and HTTPS clients for it.
//!
//! [`GatewayFiles`] lays out everything the gateway needs in a temporary directory. That is
//! development certificates, a wrapping key and bearer tokens for each of two practices, and a
//! `callseal.toml` that listens on port 0 of 127.0.0.1 and stores objects under `data/`.
//! [`TestGateway`] starts `callseal::server` on those files in the test's own runtime, and
//! [`Client`] speaks HTTP/1.1 or h2 (chosen by ALPN) over real TLS that trusts only the
//! development CA.
//!
//! Plaintext comes from [`pattern_bytes`], a counter-based generator, so a test can stream any
//! amount and recompute any slice of it without holding the whole object in memory.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use callseal::config::Config;
use callseal::ids::PracticeId;
use callseal::keys::KeyDirectory;
use callseal::server::{self, AppState, Running};
use callseal::tls::write_dev_certs;

/// The practice that most tests use.
pub const PRACTICE: &str = "clinic-1";
/// A second practice, with its own key and tokens.
pub const OTHER_PRACTICE: &str = "clinic-2";

/// Limit for waits on events that should happen within seconds. It only keeps a broken build from
/// hanging CI: no assertion depends on how fast anything runs.
pub const HANG_GUARD: Duration = Duration::from_secs(300);

/// Largest piece that [`random_pieces`] yields: 64 KiB.
pub const MAX_PIECE: usize = 64 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body type of every [`Client`] request.
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// The HTTP version a [`Client`] negotiates by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Http1, Protocol::Http2];

    /// Returns the ALPN protocol id.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::Http1 => b"http/1.1",
            Protocol::Http2 => b"h2",
        }
    }

    /// Returns a short name for call ids and assertion messages.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "h1",
            Protocol::Http2 => "h2",
        }
    }
}

/// Settings a test may change; `None` keeps the gateway's default.
#[derive(Clone, Debug, Default)]
pub struct GatewaySettings {
    pub frame_length: Option<u32>,
    pub header_read_timeout_secs: Option<u64>,
    pub max_upload_bytes: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
}

impl GatewaySettings {
    pub fn frame_length(mut self, bytes: u32) -> Self {
        self.frame_length = Some(bytes);
        self
    }

    pub fn header_read_timeout_secs(mut self, secs: u64) -> Self {
        self.header_read_timeout_secs = Some(secs);
        self
    }

    pub fn max_upload_bytes(mut self, bytes: u64) -> Self {
        self.max_upload_bytes = Some(bytes);
        self
    }

    pub fn shutdown_grace_secs(mut self, secs: u64) -> Self {
        self.shutdown_grace_secs = Some(secs);
        self
    }

    /// Creates the files of a gateway with these settings.
    pub fn create_files(self) -> GatewayFiles {
        GatewayFiles::create(&self)
    }

    /// Creates the files and starts a gateway on them.
    pub async fn start(self) -> TestGateway {
        TestGateway::start(self.create_files()).await
    }
}

/// Certificates, keys, tokens, configuration and storage of one gateway, in a temporary
/// directory that is removed on drop.
pub struct GatewayFiles {
    dir: TempDir,
    pub config_path: PathBuf,
    pub ca_cert: PathBuf,
    pub key_dir: PathBuf,
    pub storage_root: PathBuf,
    /// The bearer token with role `reader` (GET, HEAD, list) for [`PRACTICE`].
    pub token: String,
    /// The bearer token with role `reader` for [`OTHER_PRACTICE`].
    pub other_token: String,
    /// The bearer token with role `ingest` (PUT) for [`PRACTICE`].
    pub ingest_token: String,
    /// The bearer token with role `ingest` for [`OTHER_PRACTICE`].
    pub other_ingest_token: String,
    /// The bearer token with role `admin` (DELETE) for [`PRACTICE`].
    pub admin_token: String,
    pub frame_length: u32,
}

impl GatewayFiles {
    fn create(settings: &GatewaySettings) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("callseal-gateway-")
            .tempdir()
            .expect("create the gateway's temporary directory");
        let root = dir.path();

        let certs =
            write_dev_certs(&root.join("certs"), false).expect("write development certificates");
        let key_dir = root.join("keys");
        let keys = KeyDirectory::new(&key_dir);
        for practice in [PRACTICE, OTHER_PRACTICE] {
            keys.generate(&PracticeId::new(practice).expect("valid practice id"))
                .expect("generate the practice's wrapping key");
        }

        let frame_length = settings
            .frame_length
            .unwrap_or(callseal::envelope::DEFAULT_FRAME_LENGTH);
        let mut limits = String::new();
        let limit_values = [
            (
                "header_read_timeout_secs",
                settings.header_read_timeout_secs,
            ),
            ("max_upload_bytes", settings.max_upload_bytes),
            ("shutdown_grace_secs", settings.shutdown_grace_secs),
        ];
        for (key, value) in limit_values {
            if let Some(value) = value {
                limits.push_str(&format!("{key} = {value}\n"));
            }
        }

        let files = GatewayFiles {
            config_path: root.join("callseal.toml"),
            ca_cert: certs.ca_cert,
            key_dir,
            storage_root: root.join("data"),
            token: random_token(),
            other_token: random_token(),
            ingest_token: random_token(),
            other_ingest_token: random_token(),
            admin_token: random_token(),
            frame_length,
            dir,
        };

        let config = format!(
            r#"
[listen]
data = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"

[storage]
kind = "local"
path = "data"

[keys]
directory = "keys"

[envelope]
frame_length = {frame_length}

[limits]
{limits}
[[practices]]
id = "{PRACTICE}"

[[practices]]
id = "{OTHER_PRACTICE}"

{tokens}"#,
            tokens = files.token_tables(),
        );
        fs::write(&files.config_path, config).expect("write callseal.toml");
        files
    }

    /// Returns the `[[tokens]]` tables of the five bearer tokens, each named `{practice}-{role}`.
    pub fn token_tables(&self) -> String {
        let tokens = [
            (PRACTICE, "reader", &self.token),
            (OTHER_PRACTICE, "reader", &self.other_token),
            (PRACTICE, "ingest", &self.ingest_token),
            (OTHER_PRACTICE, "ingest", &self.other_ingest_token),
            (PRACTICE, "admin", &self.admin_token),
        ];
        let mut tables = String::new();
        for (practice, role, token) in tokens {
            let hash = hex::encode(Sha256::digest(token.as_bytes()));
            tables.push_str(&format!(
                "[[tokens]]\nname = \"{practice}-{role}\"\nsha256 = \"{hash}\"\nrole = \"{role}\"\npractices = [\"{practice}\"]\n\n"
            ));
        }
        tables
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the practice's version-1 key file.
    pub fn key_file(&self, practice: &str) -> PathBuf {
        self.key_dir.join(practice).join("v1.key")
    }

    /// Returns the Raw AES key name of the practice's version-1 key.
    pub fn key_name(&self, practice: &str) -> String {
        super::local_key_name(practice, 1)
    }

    /// Returns where local storage keeps an object: `{root}/{practice}/calls/{call}/{artifact}`.
    pub fn stored_file(&self, practice: &str, call: &str, artifact: &str) -> PathBuf {
        self.storage_root
            .join(practice)
            .join("calls")
            .join(call)
            .join(artifact)
    }

    /// Lists every file under the storage root, sorted.
    pub fn stored_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if self.storage_root.exists() {
            collect_files(&self.storage_root, &mut files);
        }
        files.sort();
        files
    }

    /// Lists the files under the storage root whose names contain `#`: object_store stages
    /// uploads as `{artifact}#{n}`, and no valid id contains `#`.
    pub fn temporary_files(&self) -> Vec<PathBuf> {
        self.stored_files()
            .into_iter()
            .filter(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().contains('#'))
            })
            .collect()
    }

    /// Builds a client for a gateway that serves these files at `addr`.
    pub fn client(&self, addr: SocketAddr, protocol: Protocol) -> Client {
        Client::new(addr, &self.ca_cert, protocol)
    }
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read a storage directory") {
        let entry = entry.expect("read a storage directory entry");
        let kind = entry.file_type().expect("read a storage entry's type");
        if kind.is_dir() {
            collect_files(&entry.path(), files);
        } else {
            files.push(entry.path());
        }
    }
}

/// Returns 32 random bytes as 64 hex digits.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("draw a random token");
    hex::encode(bytes)
}

/// Returns the URL path of an object.
pub fn object_url(practice: &str, call: &str, artifact: &str) -> String {
    format!("/v1/practices/{practice}/calls/{call}/{artifact}")
}

/// A gateway running in the test's runtime on the files of a [`GatewayFiles`].
pub struct TestGateway {
    pub files: GatewayFiles,
    running: Option<Running>,
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl TestGateway {
    /// Starts a gateway with default settings.
    pub async fn new() -> Self {
        GatewaySettings::default().start().await
    }

    /// Loads `files.config_path` and starts a gateway on it.
    pub async fn start(files: GatewayFiles) -> Self {
        let config = Config::load(&files.config_path).expect("load the test configuration");
        let running = server::start(config).await.expect("start the gateway");
        TestGateway {
            data_addr: running.data_addr,
            admin_addr: running.admin_addr,
            running: Some(running),
            files,
        }
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.running.as_ref().expect("the gateway is running").state
    }

    /// Returns a client of the data listener.
    pub fn client(&self, protocol: Protocol) -> Client {
        self.files.client(self.data_addr, protocol)
    }

    /// Stops the gateway gracefully, as the binary does on SIGTERM.
    pub async fn shutdown(&mut self) {
        if let Some(running) = self.running.take() {
            within_guard("gateway shutdown", running.shutdown()).await;
        }
    }

    /// Stops the gateway and starts a new one on the same files (with new ports).
    pub async fn restart(mut self) -> Self {
        self.shutdown().await;
        TestGateway::start(self.files).await
    }

    /// Waits until no request or response body is streaming and storage's background tasks
    /// (aborts of dropped uploads) have finished.
    pub async fn wait_until_idle(&self) {
        let state = Arc::clone(self.state());
        within_guard("the gateway becoming idle", async move {
            while metric_value(&state.metrics.encode(), "callseal_active_streams") != Some(0.0) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            state.storage.wait_for_background_tasks().await;
        })
        .await;
    }

    /// Sends `GET {path}` to the admin listener and returns the status and body.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        admin_get(self.admin_addr, path).await
    }

    /// Opens a raw TLS connection to the data listener, offering `alpn` (none if empty).
    pub async fn raw_tls(&self, alpn: &[u8]) -> TlsStream<TcpStream> {
        raw_tls(self.data_addr, &self.files.ca_cert, alpn).await
    }
}

/// Sends `GET {path}` over plain HTTP/1.1 to an admin listener.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    within_guard("admin request", async {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the admin listener");
        let (mut sender, connection) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .expect("admin handshake");
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::new())
            .expect("build the admin request");
        let response = sender
            .send_request(request)
            .await
            .expect("send the admin request");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("read the admin body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

/// Returns the value of the sample whose name and labels are exactly `sample` in Prometheus
/// text, such as `callseal_http_requests_total{route="object",method="PUT",status="201"}`.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}

/// Builds a rustls client configuration that trusts only the CA in `ca_cert`.
pub fn client_tls_config(ca_cert: &Path, alpn: &[u8]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_cert).expect("open the development CA") {
        roots
            .add(cert.expect("parse the development CA"))
            .expect("trust the development CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !alpn.is_empty() {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    Arc::new(config)
}

/// Connects to `addr` over TLS as `localhost`, offering `alpn` (none if empty).
pub async fn raw_tls(addr: SocketAddr, ca_cert: &Path, alpn: &[u8]) -> TlsStream<TcpStream> {
    let connector = TlsConnector::from(client_tls_config(ca_cert, alpn));
    within_guard("TLS connection", async {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the data listener");
        tcp.set_nodelay(true).expect("set TCP_NODELAY");
        let name = ServerName::try_from("localhost").expect("valid server name");
        connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the gateway")
    })
    .await
}

/// A response with its whole body read, or the error that ended the body.
#[derive(Debug)]
pub struct Reply {
    /// The method, path and protocol of the request, for assertion messages.
    pub request: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Bytes, String>,
}

impl Reply {
    /// Returns a header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("header value is text"))
    }

    /// Returns the body, panicking if it ended with an error.
    pub fn bytes(&self) -> &Bytes {
        match &self.body {
            Ok(bytes) => bytes,
            Err(error) => panic!(
                "the {} body of {} failed: {error}",
                self.status, self.request
            ),
        }
    }

    /// Returns the `error` message of a JSON error body, panicking if the body is anything else
    /// (so no plaintext can be in it).
    pub fn error_message(&self) -> String {
        let body: serde_json::Value =
            serde_json::from_slice(self.bytes()).unwrap_or_else(|error| {
                panic!(
                    "the {} body of {} is not JSON ({error}): {} bytes",
                    self.status,
                    self.request,
                    self.bytes().len()
                )
            });
        let object = body.as_object().expect("the error body is a JSON object");
        assert_eq!(object.len(), 1, "the error body has only `error`: {body}");
        object["error"]
            .as_str()
            .expect("`error` is a string")
            .to_owned()
    }
}

/// An HTTPS client of the data listener. Each request opens its own connection, so a request
/// never depends on the state a previous one left.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    protocol: Protocol,
    tls: Arc<ClientConfig>,
    /// Limit for one request until its response head, [`HANG_GUARD`] unless set.
    hang_guard: Duration,
}

/// One open client connection.
pub struct ClientConnection {
    sender: Sender,
    transport: Severable,
}

/// The client's TLS stream, which a test can close from outside the connection's tasks.
#[derive(Clone)]
pub struct Severable {
    stream: Arc<Mutex<Option<TlsStream<TcpStream>>>>,
}

enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

impl Client {
    pub fn new(addr: SocketAddr, ca_cert: &Path, protocol: Protocol) -> Self {
        Client {
            addr,
            protocol,
            tls: client_tls_config(ca_cert, protocol.alpn()),
            hang_guard: HANG_GUARD,
        }
    }

    /// Sets the hang guard of each request, for uploads that take minutes in a debug build.
    pub fn with_hang_guard(mut self, limit: Duration) -> Self {
        self.hang_guard = limit;
        self
    }

    /// Starts a request for `path` with the URI form and headers the protocol needs.
    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        let authority = format!("localhost:{}", self.addr.port());
        match self.protocol {
            Protocol::Http1 => Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, authority),
            Protocol::Http2 => Request::builder()
                .method(method)
                .uri(format!("https://{authority}{path}"))
                .version(http::Version::HTTP_2),
        }
    }

    /// Opens a connection and checks that ALPN selected the client's protocol.
    pub async fn connect(&self) -> ClientConnection {
        let tcp = TcpStream::connect(self.addr)
            .await
            .expect("connect to the data listener");
        tcp.set_nodelay(true).expect("set TCP_NODELAY");
        let name = ServerName::try_from("localhost").expect("valid server name");
        let tls = TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the gateway");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(
            negotiated.as_deref(),
            Some(self.protocol.alpn()),
            "ALPN must select {}",
            self.protocol.name()
        );

        let transport = Severable {
            stream: Arc::new(Mutex::new(Some(tls))),
        };
        let io = TokioIo::new(transport.clone());
        let sender = match self.protocol {
            Protocol::Http1 => {
                let (sender, connection) = http1::handshake(io).await.expect("HTTP/1.1 handshake");
                tokio::spawn(connection);
                Sender::Http1(sender)
            }
            Protocol::Http2 => {
                let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                tokio::spawn(connection);
                Sender::Http2(sender)
            }
        };
        ClientConnection { sender, transport }
    }

    /// Sends a request on a new connection and returns the response head with a streaming body.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        within(self.hang_guard, "request", async {
            self.connect().await.send(request).await
        })
        .await
    }

    /// Sends a request and reads the whole response body.
    pub async fn fetch(&self, request: Request<RequestBody>) -> Reply {
        let description = format!(
            "{} {} over {}",
            request.method(),
            request.uri().path(),
            self.protocol.name()
        );
        let response = self
            .send(request)
            .await
            .unwrap_or_else(|error| panic!("{description} failed: {error}"));
        let mut reply = read_reply(response).await;
        reply.request = description;
        reply
    }

    /// `PUT path` with a bearer token.
    pub async fn put(&self, path: &str, token: &str, body: RequestBody) -> Reply {
        self.fetch(
            self.authorized(Method::PUT, path, token)
                .body(body)
                .expect("build PUT"),
        )
        .await
    }

    /// `GET path` with a bearer token and an optional `Range` header.
    pub async fn get(&self, path: &str, token: &str, range: Option<&str>) -> Reply {
        let mut builder = self.authorized(Method::GET, path, token);
        if let Some(range) = range {
            builder = builder.header(header::RANGE, range);
        }
        self.fetch(builder.body(empty_body()).expect("build GET"))
            .await
    }

    /// `HEAD path` with a bearer token.
    pub async fn head(&self, path: &str, token: &str) -> Reply {
        self.fetch(
            self.authorized(Method::HEAD, path, token)
                .body(empty_body())
                .expect("build HEAD"),
        )
        .await
    }

    /// Starts a request with `Authorization: Bearer {token}`.
    pub fn authorized(&self, method: Method, path: &str, token: &str) -> http::request::Builder {
        self.request(method, path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
    }
}

impl ClientConnection {
    /// Sends one request on this connection.
    pub async fn send(
        &mut self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }

    /// Returns a handle on the connection's transport, whose [`Severable::sever`] closes it.
    pub fn transport(&self) -> Severable {
        self.transport.clone()
    }
}

impl Severable {
    /// Closes the TCP connection at once, without a TLS close_notify or an h2 GOAWAY, as a
    /// client that crashes or loses its network does. Later reads and writes fail.
    pub fn sever(&self) {
        drop(self.lock().take());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<TlsStream<TcpStream>>> {
        self.stream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn severed() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the test severed the connection",
        )
    }
}

impl AsyncRead for Severable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.lock().as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Err(Severable::severed())),
        }
    }
}

impl AsyncWrite for Severable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.lock().as_mut() {
            Some(stream) => Pin::new(stream).poll_write(cx, buf),
            None => Poll::Ready(Err(Severable::severed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.lock().as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Err(Severable::severed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.lock().as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Err(Severable::severed())),
        }
    }
}

/// Reads a response's whole body into a [`Reply`].
pub async fn read_reply(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = within_guard("response body", body.collect())
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|error| error.to_string());
    Reply {
        request: String::new(),
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Streams a response body through SHA-256 and returns its length and digest, or the error that
/// ended it.
pub async fn hash_body(response: Response<Incoming>) -> Result<(u64, [u8; 32]), String> {
    let mut body = response.into_body();
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| error.to_string())?;
        if let Ok(data) = frame.into_data() {
            length += data.len() as u64;
            hasher.update(&data);
        }
    }
    Ok((length, hasher.finalize().into()))
}

pub fn empty_body() -> RequestBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Returns a body of known length, sent with `Content-Length`.
pub fn full_body(bytes: impl Into<Bytes>) -> RequestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Returns a body of unknown length: chunked over HTTP/1.1, without `Content-Length` over h2.
pub fn stream_body<S>(stream: S) -> RequestBody
where
    S: Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
{
    BodyExt::boxed_unsync(StreamBody::new(stream.map_ok(Frame::data)))
}

/// Returns a streamed body that the test feeds piece by piece. Dropping the sender ends the body
/// cleanly.
pub fn channel_body() -> (
    futures::channel::mpsc::Sender<Result<Bytes, BoxError>>,
    RequestBody,
) {
    let (sender, receiver) = futures::channel::mpsc::channel(1);
    (sender, stream_body(receiver))
}

/// Returns the bytes `range` of the plaintext pattern `seed`.
///
/// Byte `i` is byte `i % 8` of SplitMix64 applied to `seed` and `i / 8`, so any slice can be
/// computed alone and different seeds give unrelated bytes.
pub fn pattern_bytes(seed: u64, range: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    let mut position = range.start;
    while position < range.end {
        let block =
            splitmix64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (position / 8)).to_le_bytes();
        let offset = (position % 8) as usize;
        let take = (8 - offset).min((range.end - position) as usize);
        out.extend_from_slice(&block[offset..offset + take]);
        position += take as u64;
    }
    out
}

/// Returns the SHA-256 of the first `length` bytes of the pattern `seed`, computed in pieces.
pub fn pattern_sha256(seed: u64, length: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut position = 0;
    while position < length {
        let end = (position + 1024 * 1024).min(length);
        hasher.update(pattern_bytes(seed, position..end));
        position = end;
    }
    hasher.finalize().into()
}

/// Streams the first `length` bytes of the pattern `seed` in pieces of 1 to [`MAX_PIECE`] bytes,
/// with sizes drawn from `size_seed`, generating each piece only when it is polled.
pub fn random_pieces(
    seed: u64,
    size_seed: u64,
    length: u64,
) -> impl Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
    let mut size_state = size_seed;
    let mut position = 0u64;
    futures::stream::iter(std::iter::from_fn(move || {
        if position >= length {
            return None;
        }
        size_state = size_state.wrapping_add(1);
        let size = 1 + splitmix64(size_state) % MAX_PIECE as u64;
        let end = (position + size).min(length);
        let piece = Bytes::from(pattern_bytes(seed, position..end));
        position = end;
        Some(Ok(piece))
    }))
}

fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Decrypts a stored object file with AWS's Python Encryption SDK under the practice's key and
/// returns the plaintext and the header JSON.
///
/// # Panics
///
/// If the SDK rejects the object.
pub fn oracle_decrypt(
    files: &GatewayFiles,
    practice: &str,
    stored: &Path,
) -> (Vec<u8>, serde_json::Value) {
    let scratch = tempfile::tempdir().expect("create the oracle's output directory");
    let output = scratch.path().join("plaintext");
    let key_file = files.key_file(practice);
    let key_name = files.key_name(practice);
    let header = super::esdk_decrypt_file(&[(&key_file, &key_name)], stored, &output)
        .unwrap_or_else(|error| panic!("the ESDK rejected {}: {error}", stored.display()));
    let plaintext = fs::read(&output).expect("read the oracle's plaintext");
    (plaintext, header)
}

/// Awaits `future`, failing the test if it takes longer than [`HANG_GUARD`].
pub async fn within_guard<T>(event: &str, future: impl Future<Output = T>) -> T {
    within(HANG_GUARD, event, future).await
}

/// Awaits `future`, failing the test if it takes longer than the hang guard `limit`.
pub async fn within<T>(limit: Duration, event: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{event} did not finish within the hang guard of {limit:?}"),
    }
}

/// Returns the hex SHA-256 of `bytes`, for assertion messages that stay short.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Returns the length of the envelope header at the start of a stored object.
pub fn stored_header_len(stored: &[u8]) -> usize {
    callseal::envelope::ParsedHeader::parse(stored)
        .expect("the stored header parses")
        .expect("the stored object holds a whole header")
        .len()
}
