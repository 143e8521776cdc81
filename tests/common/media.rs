//! Helpers for the media download and forwarding tests: a gateway configuration with a `[media]`
//! section and an optional forwarding target, a local HTTPS server that replaces Retell's media
//! host and a practice's forwarding receiver, and generated WAV recordings.
//!
//! The server listens on 127.0.0.1 with the gateway's own development certificate (issued for
//! `localhost`), so the gateway trusts it through `media.extra_ca_file`. It records every
//! connection and request, and can hold a response body at a byte offset until the test
//! releases it, so a test can act while a download is known to be in progress.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use callseal::tls::{self, CertResolver};

use super::gateway::{
    BoxError, GatewayFiles, GatewaySettings, OTHER_PRACTICE, PRACTICE, admin_get, metric_value,
    within_guard,
};
use super::retell::{FIXTURE_AGENT_ID, SeededRng, ServeProcess};

type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Length of a canonical PCM WAV header: RIFF, `fmt ` and `data` chunk headers.
pub const WAV_HEADER_LEN: usize = 44;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// The `[media]` settings and forwarding target of a test gateway.
#[derive(Clone, Debug)]
pub struct MediaSettings {
    /// `media.allow_loopback_for_tests`.
    pub allow_loopback: bool,
    /// `media.max_attempts`.
    pub max_attempts: u32,
    /// `forward = { url, secret }` of [`PRACTICE`].
    pub forward: Option<(String, String)>,
}

impl Default for MediaSettings {
    /// Loopback allowed, two attempts, no forwarding.
    fn default() -> Self {
        MediaSettings {
            allow_loopback: true,
            max_attempts: 2,
            forward: None,
        }
    }
}

impl MediaSettings {
    /// Creates the gateway's files and replaces their `callseal.toml` with one where
    /// [`PRACTICE`] accepts webhooks signed with `api_key` and only `localhost` is an allowed
    /// media host. The development CA of the files is the extra CA of downloads and forwards.
    pub fn create_files(&self, api_key: &str) -> GatewayFiles {
        let files = GatewaySettings::default().create_files();
        self.write_config(&files, api_key);
        files
    }

    /// Replaces the `callseal.toml` of `files` with one for these settings, as
    /// [`MediaSettings::create_files`] describes.
    pub fn write_config(&self, files: &GatewayFiles, api_key: &str) {
        let mut forward = String::new();
        if let Some((url, secret)) = &self.forward {
            writeln!(
                forward,
                "forward = {{ url = \"{url}\", secret = \"{secret}\" }}"
            )
            .expect("write to a String");
        }
        let config = format!(
            r#"[listen]
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

# Local storage never hangs; see the same setting in retell.rs.
[webhooks]
store_timeout_secs = 600

[media]
allowed_hosts = ["localhost"]
allow_loopback_for_tests = {loopback}
extra_ca_file = "{ca}"
max_attempts = {attempts}
initial_backoff_ms = 50
max_backoff_secs = 1
total_timeout_secs = 120

[[practices]]
id = "{PRACTICE}"
retell_api_keys = ["{api_key}"]
{forward}
[[practices]]
id = "{OTHER_PRACTICE}"

{tokens}"#,
            loopback = self.allow_loopback,
            ca = files.ca_cert.display(),
            attempts = self.max_attempts,
            tokens = files.token_tables(),
        );
        fs::write(&files.config_path, config).expect("write the media callseal.toml");
    }
}

// ---------------------------------------------------------------------------------------------
// Event bodies and recordings
// ---------------------------------------------------------------------------------------------

/// Builds a compact `call_ended` event for `call_id` with the given extra call fields.
pub fn call_ended(call_id: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut call = serde_json::Map::new();
    call.insert("call_id".into(), call_id.into());
    call.insert("agent_id".into(), FIXTURE_AGENT_ID.into());
    call.insert("call_status".into(), "ended".into());
    call.insert("duration_ms".into(), 61_000.into());
    for (name, value) in fields {
        call.insert((*name).into(), (*value).into());
    }
    let event = serde_json::json!({ "event": "call_ended", "call": call });
    serde_json::to_vec(&event).expect("serialize the event")
}

/// Generates a mono 16 kHz 16-bit PCM WAV file with `data_len` bytes of samples drawn from
/// `seed`, so the same arguments always give the same bytes.
pub fn wav_recording(data_len: u32, seed: u64) -> Vec<u8> {
    assert!(
        data_len.is_multiple_of(2),
        "16-bit samples need an even length"
    );
    let sample_rate: u32 = 16_000;
    let mut wav = Vec::with_capacity(WAV_HEADER_LEN + data_len as usize);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // channels
    wav.extend_from_slice(&sample_rate.to_le_bytes());
    wav.extend_from_slice(&(sample_rate * 2).to_le_bytes()); // bytes per second
    wav.extend_from_slice(&2u16.to_le_bytes()); // block align
    wav.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    assert_eq!(wav.len(), WAV_HEADER_LEN, "the WAV header has 44 bytes");

    let mut rng = SeededRng::new(seed);
    while wav.len() < WAV_HEADER_LEN + data_len as usize {
        wav.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    wav.truncate(WAV_HEADER_LEN + data_len as usize);
    wav
}

/// Returns `prefix-` and 16 random hex digits, a value that appears nowhere by chance.
pub fn canary(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("draw a random canary");
    format!("{prefix}-{}", hex::encode(bytes))
}

/// Returns the hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------------
// The gateway as a child process
// ---------------------------------------------------------------------------------------------

/// Returns the admin listener's address from a child gateway's `gateway started` log line.
pub fn admin_addr(process: &ServeProcess) -> SocketAddr {
    let log = process.log_text();
    let line = log
        .lines()
        .find(|line| line.contains("gateway started"))
        .expect("the gateway logged its start");
    line.split_whitespace()
        .find_map(|part| part.strip_prefix("admin_addr="))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no admin_addr in the start-up line: {line}"))
}

/// Returns the count of `callseal_background_tasks_total` for `task` and `outcome`, 0 when
/// the sample does not exist yet.
pub async fn background_tasks(admin: SocketAddr, task: &str, outcome: &str) -> f64 {
    let (status, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK, "GET /metrics: {text}");
    let sample =
        format!("callseal_background_tasks_total{{task=\"{task}\",outcome=\"{outcome}\"}}");
    metric_value(&text, &sample).unwrap_or(0.0)
}

/// Waits until `callseal_background_tasks_total` for `task` and `outcome` is at least `count`.
pub async fn wait_for_background_tasks(admin: SocketAddr, task: &str, outcome: &str, count: f64) {
    let event = format!("{count} {task} tasks with outcome {outcome}");
    within_guard(&event, async {
        while background_tasks(admin, task, outcome).await < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The local HTTPS server
// ---------------------------------------------------------------------------------------------

/// What the server sends for one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A `200 OK` with `Content-Length`, its body sent in `chunk`-byte frames with a sleep of
    /// `pause` before each frame.
    Slow {
        data: Bytes,
        chunk: usize,
        pause: Duration,
    },
    /// A `302 Found` to this location.
    Redirect(String),
    /// An empty response with this status.
    Status(u16),
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: http::Method,
    /// The path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct Shared {
    connections: AtomicUsize,
    requests: Mutex<Vec<Recorded>>,
    bytes_sent: AtomicU64,
    /// Offset at which [`Reply::Slow`] bodies stop until [`MediaServer::release`].
    hold_at: Option<u64>,
    holding: AtomicBool,
    released: watch::Sender<bool>,
}

/// A local HTTPS server on 127.0.0.1 with the `localhost` certificate of a [`GatewayFiles`].
pub struct MediaServer {
    pub port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl MediaServer {
    /// Starts a server that responds to each request with `handler`'s reply.
    pub async fn start(
        files: &GatewayFiles,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::start_holding(files, None, handler).await
    }

    /// Starts a server whose [`Reply::Slow`] bodies stop once `hold_at` bytes of one body have
    /// been sent, until the test calls [`MediaServer::release`].
    pub async fn start_holding(
        files: &GatewayFiles,
        hold_at: Option<u64>,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let certs = files.dir().join("certs");
        let resolver = CertResolver::load(certs.join("server.pem"), certs.join("server-key.pem"))
            .expect("load the localhost certificate");
        let acceptor = tls::acceptor(resolver, None).expect("build the TLS acceptor");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the media server");
        let port = listener.local_addr().expect("the local address").port();
        let shared = Arc::new(Shared {
            connections: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            bytes_sent: AtomicU64::new(0),
            hold_at,
            holding: AtomicBool::new(false),
            released: watch::Sender::new(false),
        });
        let handler = Arc::new(handler);

        let server_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                server_shared.connections.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let shared = Arc::clone(&server_shared);
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request: Request<Incoming>| {
                        let shared = Arc::clone(&shared);
                        let handler = Arc::clone(&handler);
                        async move { Ok::<_, Infallible>(serve(&shared, &*handler, request).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MediaServer { port, shared, task }
    }

    /// Returns `https://localhost:{port}{path_and_query}`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("https://localhost:{}{path_and_query}", self.port)
    }

    /// Returns the number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Returns a copy of the requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared
            .requests
            .lock()
            .expect("the request list is not poisoned")
            .clone()
    }

    /// Returns the body bytes sent so far, over all responses.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::SeqCst)
    }

    /// Waits until a body has reached the hold offset and stopped there.
    pub async fn wait_until_held(&self) {
        within_guard("a media body reaching the hold offset", async {
            while !self.shared.holding.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// Lets held bodies continue, and later bodies pass the hold offset without stopping.
    pub fn release(&self) {
        self.shared.released.send_replace(true);
    }

    /// Waits until the server has received `count` requests.
    pub async fn wait_for_requests(&self, count: usize) {
        within_guard(&format!("{count} requests at the media server"), async {
            while self.requests().len() < count {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

impl Drop for MediaServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    shared: &Arc<Shared>,
    handler: &(impl Fn(&Recorded) -> Reply + ?Sized),
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method,
        target: parts
            .uri
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let reply = handler(&recorded);
    shared
        .requests
        .lock()
        .expect("the request list is not poisoned")
        .push(recorded);

    match reply {
        Reply::Slow { data, chunk, pause } => {
            let length = data.len();
            let mut response = Response::new(slow_body(Arc::clone(shared), data, chunk, pause));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, length.into());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("audio/wav"),
            );
            response
        }
        Reply::Redirect(location) => {
            let mut response = Response::new(empty_body());
            *response.status_mut() = StatusCode::FOUND;
            response.headers_mut().insert(
                header::LOCATION,
                location.parse().expect("a valid Location header"),
            );
            response
        }
        Reply::Status(status) => {
            let mut response = Response::new(empty_body());
            *response.status_mut() = StatusCode::from_u16(status).expect("a valid status code");
            response
        }
    }
}

fn empty_body() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn slow_body(shared: Arc<Shared>, data: Bytes, chunk: usize, pause: Duration) -> ResponseBody {
    let frames = futures::stream::unfold(0usize, move |offset| {
        let shared = Arc::clone(&shared);
        let data = data.clone();
        async move {
            if offset >= data.len() {
                return None;
            }
            if shared
                .hold_at
                .is_some_and(|hold_at| offset as u64 >= hold_at)
            {
                shared.holding.store(true, Ordering::SeqCst);
                let mut released = shared.released.subscribe();
                let _ = released.wait_for(|released| *released).await;
            }
            tokio::time::sleep(pause).await;
            let end = (offset + chunk).min(data.len());
            shared
                .bytes_sent
                .fetch_add((end - offset) as u64, Ordering::SeqCst);
            Some((Ok::<_, BoxError>(Frame::data(data.slice(offset..end))), end))
        }
    });
    StreamBody::new(frames).boxed_unsync()
}
