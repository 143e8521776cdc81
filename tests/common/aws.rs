//! AWS pieces of the KMS and S3 tests: moto's server as a local KMS and S3, a fault proxy in
//! front of its KMS API, a gateway whose practices use KMS keys, and the ESDK oracle with a KMS
//! keyring.
//!
//! `scripts/test` starts moto on a loopback port and exports its URL as `CALLSEAL_MOTO_ENDPOINT`,
//! with static credentials and instance metadata disabled. [`Moto::connect`] fails the test when
//! that environment is missing, so these tests never pass by skipping. moto keeps its state for
//! the whole run, so every test creates its own KMS keys and its own bucket.
//!
//! moto 5.2.5 does not enforce key states or throttle, so the gateway's KMS requests go through
//! [`FaultProxy`], which forwards them to moto or returns KMS's errors for those cases in their
//! place, or drops connections to simulate an unreachable KMS.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use object_store::ObjectStoreExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use callseal::config::{AwsSettings, Config};
use callseal::server::{self, AppState, Running};
use callseal::tls::write_dev_certs;

use super::gateway::{BoxError, Client, Protocol, metric_value, within_guard};

/// Environment variable with the URL of moto's server, set by `scripts/test`.
pub const MOTO_ENDPOINT_VAR: &str = "CALLSEAL_MOTO_ENDPOINT";

/// The region of every key and bucket that the tests create in moto.
pub const MOTO_REGION: &str = "us-east-1";

/// Variables that `scripts/test` sets so that no AWS client looks for credentials or a region
/// beyond the environment, and in particular never at an instance metadata address.
const REQUIRED_AWS_VARIABLES: [(&str, Option<&str>); 4] = [
    ("AWS_EC2_METADATA_DISABLED", Some("true")),
    ("AWS_ACCESS_KEY_ID", None),
    ("AWS_SECRET_ACCESS_KEY", None),
    ("AWS_REGION", Some(MOTO_REGION)),
];

/// Python statements that create the bucket `sys.argv[2]` at the endpoint `sys.argv[1]`.
const CREATE_BUCKET_SCRIPT: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
s3.create_bucket(Bucket=sys.argv[2])
"#;

/// Python statements that print the keys of the bucket's unfinished multipart uploads as JSON.
const LIST_MULTIPART_UPLOADS_SCRIPT: &str = r#"
import json, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
uploads = s3.list_multipart_uploads(Bucket=sys.argv[2]).get("Uploads", [])
print(json.dumps([upload["Key"] for upload in uploads]))
"#;

/// moto's server as the tests reach it: its URL and a KMS client for it.
#[derive(Clone)]
pub struct Moto {
    pub endpoint: String,
    pub addr: SocketAddr,
    kms: aws_sdk_kms::Client,
}

impl Moto {
    /// Connects to the moto server that `scripts/test` started.
    ///
    /// # Panics
    ///
    /// If `CALLSEAL_MOTO_ENDPOINT` is unset or not a loopback `http://` URL, or the static test
    /// credentials are missing: the test needs moto and must not pass without it.
    pub async fn connect() -> Moto {
        let endpoint = std::env::var(MOTO_ENDPOINT_VAR).unwrap_or_else(|_| {
            panic!(
                "{MOTO_ENDPOINT_VAR} is not set: this test needs moto's server as a local KMS and \
                 S3; run scripts/test, which starts moto and sets the AWS test environment"
            )
        });
        for (name, expected) in REQUIRED_AWS_VARIABLES {
            let value = std::env::var(name).unwrap_or_default();
            let valid = match expected {
                Some(expected) => value == expected,
                None => !value.is_empty(),
            };
            assert!(
                valid,
                "{name} must be {} for the moto tests, found {value:?}; run scripts/test",
                expected.unwrap_or("set")
            );
        }

        let addr: SocketAddr = endpoint
            .strip_prefix("http://")
            .and_then(|authority| authority.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| {
                panic!("{MOTO_ENDPOINT_VAR}={endpoint} is not an http://IP:PORT URL")
            });
        assert!(
            addr.ip().is_loopback(),
            "{MOTO_ENDPOINT_VAR}={endpoint} must be a loopback address"
        );

        let kms = kms_client(&endpoint).await;
        Moto {
            endpoint,
            addr,
            kms,
        }
    }

    /// Returns a KMS client that talks to moto directly, not through a proxy.
    pub fn kms(&self) -> &aws_sdk_kms::Client {
        &self.kms
    }

    /// Creates a symmetric KMS key and returns its ARN.
    pub async fn create_kms_key(&self) -> String {
        let output = self
            .kms
            .create_key()
            .description("callseal test key")
            .send()
            .await
            .expect("CreateKey in moto");
        let arn = output
            .key_metadata()
            .and_then(|metadata| metadata.arn())
            .expect("CreateKey returns the key's ARN");
        assert!(
            arn.starts_with(&format!("arn:aws:kms:{MOTO_REGION}:")),
            "unexpected ARN {arn}"
        );
        arn.to_owned()
    }

    /// Creates a bucket with a new unique name and returns the name.
    pub async fn create_bucket(&self) -> String {
        let bucket = format!("callseal-test-{}", random_hex(8));
        run_boto3(CREATE_BUCKET_SCRIPT, &self.endpoint, &bucket).await;
        bucket
    }

    /// Lists the object keys of the bucket's unfinished multipart uploads.
    pub async fn multipart_uploads(&self, bucket: &str) -> Vec<String> {
        let output = run_boto3(LIST_MULTIPART_UPLOADS_SCRIPT, &self.endpoint, bucket).await;
        serde_json::from_str(output.trim()).unwrap_or_else(|error| {
            panic!("ListMultipartUploads printed invalid JSON ({error}): {output}")
        })
    }

    /// Returns an object_store client of the bucket, reaching moto directly.
    pub fn bucket(&self, bucket: &str) -> AmazonS3 {
        AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(MOTO_REGION)
            .with_endpoint(&self.endpoint)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(true)
            .build()
            .expect("build an S3 client for moto")
    }
}

/// Builds a KMS client for `endpoint` with callseal's own AWS configuration loader.
pub async fn kms_client(endpoint: &str) -> aws_sdk_kms::Client {
    let settings = AwsSettings {
        region: Some(MOTO_REGION.to_owned()),
        ..AwsSettings::default()
    };
    let base = callseal::keys::aws::load_config(&settings).await;
    let config = aws_sdk_kms::config::Builder::from(&base)
        .endpoint_url(endpoint)
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

/// Runs a Python script with boto3 from the oracle's venv and returns its standard output.
async fn run_boto3(script: &str, endpoint: &str, bucket: &str) -> String {
    let output = tokio::process::Command::new(super::python())
        .arg("-c")
        .arg(script)
        .arg(endpoint)
        .arg(bucket)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("start Python for a boto3 call");
    assert!(
        output.status.success(),
        "boto3 call on bucket {bucket} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8(output.stdout).expect("boto3 output is UTF-8")
}

/// Returns `bytes` random bytes as hex digits.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("draw random bytes");
    hex::encode(buffer)
}

/// Returns the S3 key of an object: `[{prefix}/]{practice}/calls/{call}/{artifact}`.
pub fn s3_object_path(
    prefix: Option<&str>,
    practice: &str,
    call: &str,
    artifact: &str,
) -> ObjectPath {
    let mut parts: Vec<&str> = prefix.map(|p| p.split('/').collect()).unwrap_or_default();
    parts.extend([practice, "calls", call, artifact]);
    ObjectPath::from_iter(parts)
}

/// Downloads an object into a file, streaming, and returns the number of bytes written.
pub async fn download(store: &AmazonS3, path: &ObjectPath, file: &Path) -> u64 {
    let mut stream = store
        .get(path)
        .await
        .unwrap_or_else(|error| panic!("GET {path} from S3: {error}"))
        .into_stream();
    let mut out = fs::File::create(file).expect("create the download file");
    let mut length = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap_or_else(|error| panic!("read {path} from S3: {error}"));
        out.write_all(&chunk).expect("write the download file");
        length += chunk.len() as u64;
    }
    length
}

/// Returns the length and SHA-256 of a file, read in pieces.
pub fn file_sha256(path: &Path) -> (u64, [u8; 32]) {
    let mut file = fs::File::open(path).expect("open the file to hash");
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1024 * 1024];
    let mut length = 0u64;
    loop {
        let read = file.read(&mut buffer).expect("read the file to hash");
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        length += read as u64;
    }
    (length, hasher.finalize().into())
}

/// Decrypts the ESDK message in `input` into `output` with AWS's Python Encryption SDK and a
/// strict KMS keyring for `key_arn` at `kms_endpoint`. Returns the header JSON (see
/// [`super::esdk_decrypt`]) or the oracle's one-line error.
///
/// # Panics
///
/// If the oracle rejects its arguments or cannot be started.
pub fn esdk_decrypt_kms_file(
    key_arn: &str,
    kms_endpoint: &str,
    input: &Path,
    output: &Path,
) -> Result<serde_json::Value, String> {
    let scratch = tempfile::tempdir().expect("create the oracle's scratch directory");
    let header_path = scratch.path().join("header.json");
    let mut command = std::process::Command::new(super::python());
    command
        .arg(super::oracle_script())
        .arg("decrypt")
        .arg("--kms-key-arn")
        .arg(key_arn)
        .arg("--kms-endpoint-url")
        .arg(kms_endpoint)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .arg("--header-json")
        .arg(&header_path);

    let result = super::run_oracle(command);
    let stderr = String::from_utf8_lossy(&result.stderr).trim().to_owned();
    match result.status.code() {
        Some(0) => {}
        Some(super::ORACLE_EXIT_CRYPTO_FAILURE) => return Err(stderr),
        _ => panic!(
            "ESDK oracle decrypt could not run ({}): {stderr}",
            result.status
        ),
    }
    let header = fs::read(&header_path).expect("read the oracle's header JSON");
    Ok(serde_json::from_slice(&header).expect("parse the oracle's header JSON"))
}

/// What [`FaultProxy`] does with KMS requests (those whose `X-Amz-Target` starts with
/// `TrentService.`). Other requests are always forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KmsFault {
    /// Forward every request to moto.
    PassThrough,
    /// Return this status and an AWS JSON error body for KMS requests, as KMS does.
    Error {
        status: u16,
        error_type: &'static str,
        message: &'static str,
    },
    /// Close new connections at once, and close a kept-alive connection when a request arrives
    /// on it, as if the upstream could not be reached. Unlike the errors, this applies to every
    /// request, so a proxy in front of moto's S3 API simulates an S3 outage.
    Unreachable,
    /// Forward every request, delaying S3 part uploads and multipart completions (requests with
    /// an `uploadId`) by this long: a store that commits slowly.
    SlowUploads(std::time::Duration),
    /// Hold every request whose path contains this text until the fault changes, and forward the
    /// others: one call whose store hangs.
    HangPath(String),
}

impl KmsFault {
    /// The error KMS returns for a disabled key.
    pub fn disabled() -> Self {
        KmsFault::Error {
            status: 400,
            error_type: "DisabledException",
            message: "The key is disabled.",
        }
    }

    /// The error KMS returns for a key that is pending deletion.
    pub fn pending_deletion() -> Self {
        KmsFault::Error {
            status: 400,
            error_type: "KMSInvalidStateException",
            message: "The key is pending deletion.",
        }
    }

    /// The error KMS returns when the key policy does not allow the caller.
    pub fn access_denied() -> Self {
        KmsFault::Error {
            status: 400,
            error_type: "AccessDeniedException",
            message: "The caller is not authorized to use the key.",
        }
    }

    /// The error KMS returns when the caller exceeds its request quota.
    pub fn throttling() -> Self {
        KmsFault::Error {
            status: 400,
            error_type: "ThrottlingException",
            message: "Rate exceeded",
        }
    }

    /// The error KMS returns for an internal failure.
    pub fn internal_error() -> Self {
        KmsFault::Error {
            status: 500,
            error_type: "KMSInternalException",
            message: "An internal error occurred.",
        }
    }
}

type ProxyBody = BoxBody<Bytes, BoxError>;

/// An HTTP/1.1 proxy on 127.0.0.1 in front of moto whose KMS responses the test controls.
///
/// It opens one upstream connection per forwarded request. Dropping it stops the proxy and closes
/// its connections.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept_task: tokio::task::JoinHandle<()>,
}

struct ProxyShared {
    upstream: SocketAddr,
    fault: Mutex<KmsFault>,
    /// KMS requests read from clients, by operation, whatever the proxy then did with them.
    requests: Mutex<HashMap<String, u64>>,
}

impl FaultProxy {
    /// Starts a proxy that forwards to `upstream`, in [`KmsFault::PassThrough`] mode.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("the fault proxy's address");
        let shared = Arc::new(ProxyShared {
            upstream,
            fault: Mutex::new(KmsFault::PassThrough),
            requests: Mutex::new(HashMap::new()),
        });
        let accept_task = tokio::spawn(accept_connections(listener, Arc::clone(&shared)));
        FaultProxy {
            addr,
            shared,
            accept_task,
        }
    }

    /// Returns the proxy's URL, for `[aws] kms_endpoint_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets what the proxy does with the KMS requests that arrive from now on.
    pub fn set_fault(&self, fault: KmsFault) {
        *lock(&self.shared.fault) = fault;
    }

    /// Returns how many requests for the KMS operation (such as `GenerateDataKey`) the proxy has
    /// read. Connections closed in [`KmsFault::Unreachable`] mode before a request was read are
    /// not counted.
    pub fn kms_requests(&self, operation: &str) -> u64 {
        lock(&self.shared.requests)
            .get(operation)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts connections until the task is aborted, which also aborts the connection tasks.
async fn accept_connections(listener: TcpListener, shared: Arc<ProxyShared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if *lock(&shared.fault) == KmsFault::Unreachable {
            drop(stream);
            continue;
        }

        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let service = service_fn(move |request| proxy_request(Arc::clone(&shared), request));
            // A connection that ends with an error (the proxy closed it on purpose, or the client
            // went away) needs no handling.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Handles one request: forwards it, returns the injected error, or drops it with its
/// connection.
async fn proxy_request(
    shared: Arc<ProxyShared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    let operation = request
        .headers()
        .get("x-amz-target")
        .and_then(|value| value.to_str().ok())
        .and_then(|target| target.strip_prefix("TrentService."))
        .map(str::to_owned);
    let Some(operation) = operation else {
        let fault = lock(&shared.fault).clone();
        let upload = request
            .uri()
            .query()
            .is_some_and(|query| query.contains("uploadId"));
        let is_held = |fault: &KmsFault| match fault {
            KmsFault::HangPath(text) => request.uri().path().contains(text.as_str()),
            _ => false,
        };
        while is_held(&lock(&shared.fault).clone()) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        return match fault {
            KmsFault::Unreachable => {
                Err("the fault proxy simulates an unreachable upstream".into())
            }
            KmsFault::SlowUploads(delay) if upload => {
                tokio::time::sleep(delay).await;
                forward(shared.upstream, request).await
            }
            _ => forward(shared.upstream, request).await,
        };
    };
    *lock(&shared.requests).entry(operation).or_default() += 1;

    let fault = lock(&shared.fault).clone();
    match fault {
        KmsFault::PassThrough | KmsFault::SlowUploads(_) | KmsFault::HangPath(_) => {
            forward(shared.upstream, request).await
        }
        KmsFault::Unreachable => Err("the fault proxy simulates an unreachable KMS".into()),
        KmsFault::Error {
            status,
            error_type,
            message,
        } => {
            let body = serde_json::json!({ "__type": error_type, "message": message });
            let response = Response::builder()
                .status(StatusCode::from_u16(status).expect("valid injected status"))
                .header(header::CONTENT_TYPE, "application/x-amz-json-1.1")
                .header("x-amzn-requestid", random_hex(8))
                .body(
                    Full::new(Bytes::from(body.to_string()))
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .expect("build the injected KMS error");
            Ok(response)
        }
    }
}

/// Sends `request` to `upstream` on a new connection and returns the streamed response.
async fn forward(
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    Ok(response.map(|body| body.map_err(BoxError::from).boxed()))
}

/// The token roles that upload and read objects.
const INGEST: &str = "ingest";
const READER: &str = "reader";

/// Where a [`KmsGateway`] keeps objects.
#[derive(Clone, Debug)]
pub enum ObjectStorage {
    /// A moto bucket, with an optional key prefix.
    S3 {
        bucket: String,
        prefix: Option<String>,
    },
    /// The in-memory store: for tests where storage does not matter.
    Memory,
}

/// Settings of a [`KmsGateway`]; `None` keeps the gateway's default.
#[derive(Clone, Debug)]
pub struct KmsGatewaySettings {
    /// moto's URL, for S3.
    pub moto_endpoint: String,
    /// `[aws] kms_endpoint_url`: moto itself or a [`FaultProxy`].
    pub kms_endpoint: String,
    pub storage: ObjectStorage,
    /// `(practice id, KMS key ARN)` of each practice.
    pub practices: Vec<(String, String)>,
    pub max_attempts: Option<u32>,
    pub data_key_cache_ttl_secs: Option<u64>,
    /// A Retell API key configured for every practice, so that it accepts webhooks.
    pub retell_key: Option<String>,
    /// Lines added to the `[webhooks]` table.
    pub webhooks: Option<String>,
}

/// A gateway whose practices use KMS keys, started in the test's runtime, with its files in a
/// temporary directory.
pub struct KmsGateway {
    dir: TempDir,
    pub ca_cert: PathBuf,
    /// Bearer tokens by practice id and role.
    tokens: HashMap<(String, &'static str), String>,
    running: Option<Running>,
    pub data_addr: SocketAddr,
}

impl KmsGateway {
    /// Writes certificates, tokens and `callseal.toml`, and starts the gateway.
    pub async fn start(settings: &KmsGatewaySettings) -> KmsGateway {
        let dir = tempfile::Builder::new()
            .prefix("callseal-kms-gateway-")
            .tempdir()
            .expect("create the gateway's temporary directory");
        let certs = write_dev_certs(&dir.path().join("certs"), false)
            .expect("write development certificates");

        let mut tokens = HashMap::new();
        let mut practices = String::new();
        let mut token_blocks = String::new();
        for (practice, key_arn) in &settings.practices {
            practices.push_str(&format!(
                "[[practices]]\nid = \"{practice}\"\nkms_key_arn = \"{key_arn}\"\n"
            ));
            if let Some(key) = &settings.retell_key {
                practices.push_str(&format!("retell_api_keys = [\"{key}\"]\n"));
            }
            practices.push('\n');
            for role in [INGEST, READER] {
                let token = random_hex(32);
                let token_hash = hex::encode(Sha256::digest(token.as_bytes()));
                token_blocks.push_str(&format!(
                    "[[tokens]]\nname = \"{practice}-{role}\"\nsha256 = \"{token_hash}\"\n\
                     role = \"{role}\"\npractices = [\"{practice}\"]\n\n"
                ));
                tokens.insert((practice.clone(), role), token);
            }
        }

        let config = format!(
            r#"
[listen]
data = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"

{storage}
[keys]
directory = "keys"

{aws}
[webhooks]
{webhooks}

{practices}{token_blocks}"#,
            storage = storage_table(settings),
            aws = aws_table(settings),
            webhooks = settings.webhooks.as_deref().unwrap_or_default(),
        );
        let config_path = dir.path().join("callseal.toml");
        fs::write(&config_path, config).expect("write callseal.toml");

        let config = Config::load(&config_path).expect("load the test configuration");
        let running = server::start(config).await.expect("start the gateway");
        KmsGateway {
            ca_cert: certs.ca_cert,
            tokens,
            data_addr: running.data_addr,
            running: Some(running),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the bearer token that may upload objects of `practice`.
    pub fn ingest_token(&self, practice: &str) -> &str {
        self.token(practice, INGEST)
    }

    /// Returns the bearer token that may read objects of `practice`.
    pub fn reader_token(&self, practice: &str) -> &str {
        self.token(practice, READER)
    }

    fn token(&self, practice: &str, role: &'static str) -> &str {
        self.tokens
            .get(&(practice.to_owned(), role))
            .unwrap_or_else(|| panic!("practice {practice} has no {role} token"))
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.running.as_ref().expect("the gateway is running").state
    }

    /// Returns a client of the data listener.
    pub fn client(&self, protocol: Protocol) -> Client {
        Client::new(self.data_addr, &self.ca_cert, protocol)
    }

    /// Returns how many KMS calls of `operation` the gateway made, by its own metrics.
    pub fn kms_calls(&self, operation: &'static str) -> u64 {
        self.state().metrics.kms_calls(operation)
    }

    /// Waits until no body is streaming and storage's background tasks (aborts of dropped
    /// uploads) have finished.
    pub async fn wait_until_idle(&self) {
        let state = Arc::clone(self.state());
        within_guard("the gateway becoming idle", async move {
            while metric_value(&state.metrics.encode(), "callseal_active_streams") != Some(0.0) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            state.storage.wait_for_background_tasks().await;
        })
        .await;
    }

    /// Stops the gateway if it runs, then starts it again from the same files.
    pub async fn restart(&mut self) {
        self.shutdown().await;
        let config = Config::load(&self.dir.path().join("callseal.toml"))
            .expect("load the test configuration");
        let running = server::start(config).await.expect("restart the gateway");
        self.data_addr = running.data_addr;
        self.running = Some(running);
    }

    /// Stops the gateway gracefully.
    pub async fn shutdown(&mut self) {
        if let Some(running) = self.running.take() {
            within_guard("gateway shutdown", running.shutdown()).await;
        }
    }
}

fn storage_table(settings: &KmsGatewaySettings) -> String {
    match &settings.storage {
        ObjectStorage::Memory => "[storage]\nkind = \"memory\"\n".to_owned(),
        ObjectStorage::S3 { bucket, prefix } => {
            let prefix = prefix
                .as_ref()
                .map(|prefix| format!("prefix = \"{prefix}\"\n"))
                .unwrap_or_default();
            format!(
                "[storage]\nkind = \"s3\"\nbucket = \"{bucket}\"\nregion = \"{MOTO_REGION}\"\n\
                 {prefix}endpoint_url = \"{}\"\npath_style = true\nallow_http = true\n",
                settings.moto_endpoint
            )
        }
    }
}

fn aws_table(settings: &KmsGatewaySettings) -> String {
    let mut table = format!(
        "[aws]\nregion = \"{MOTO_REGION}\"\nkms_endpoint_url = \"{}\"\n",
        settings.kms_endpoint
    );
    if let Some(attempts) = settings.max_attempts {
        table.push_str(&format!("max_attempts = {attempts}\n"));
    }
    if let Some(ttl) = settings.data_key_cache_ttl_secs {
        table.push_str(&format!("data_key_cache_ttl_secs = {ttl}\n"));
    }
    table
}
