//! Media downloads against a real HTTPS server on 127.0.0.1, with the development CA.
//!
//! Every test talks only to its own server on the loopback interface. Rejected URLs that name
//! other hosts are rejected before any name resolution or connection, and each such test checks
//! that the server saw no connection.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use callseal::tls::{self, CertResolver};
use callseal::webhook::fetch::{
    AddressClass, ChunkSink, FetchError, FetchPolicy, Fetcher, MAX_REDIRECTS, UrlRejection,
};
use futures::StreamExt;
use futures::stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::Notify;

type BoxError = Box<dyn StdError + Send + Sync>;
type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the test server sends for one request.
enum Reply {
    /// A `200 OK` body sent in `chunk`-byte frames, with a pause of 1 ms after every
    /// `pause_every` frames. `content_length` sets the header.
    Body {
        data: Bytes,
        chunk: usize,
        content_length: bool,
        pause_every: Option<usize>,
    },
    /// An empty response with this status.
    Status(u16),
    /// A `302 Found` to this location, which also sets a cookie.
    Redirect(String),
    /// A `200 OK` with `Content-Length: length` that sends `prefix` and then nothing more.
    Stall { prefix: Bytes, length: u64 },
    /// A `200 OK` with `Content-Length: length` that sends `prefix`, waits for `resume`, and then
    /// fails the body, so the connection or stream is reset mid-body.
    Break {
        prefix: Bytes,
        length: u64,
        resume: Arc<Notify>,
    },
}

/// A request as the handler receives it.
struct ServedRequest {
    path_and_query: String,
    headers: http::HeaderMap,
    /// Number of requests before this one.
    index: usize,
    port: u16,
}

type Handler = Arc<dyn Fn(&ServedRequest) -> Reply + Send + Sync>;

/// An HTTPS server on 127.0.0.1 with a `localhost` certificate from a fresh development CA.
struct TestServer {
    port: u16,
    ca_cert: PathBuf,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    _dir: TempDir,
}

impl TestServer {
    async fn start(handler: impl Fn(&ServedRequest) -> Reply + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let certs = tls::write_dev_certs(dir.path(), false).expect("development certificates");
        let resolver = CertResolver::load(&certs.server_cert, &certs.server_key).expect("load");
        let acceptor = tls::acceptor(resolver, None).expect("acceptor");

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);

        let accepted = Arc::clone(&connections);
        let counted = Arc::clone(&requests);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let handler = Arc::clone(&handler);
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request: Request<Incoming>| {
                        let index = counted.fetch_add(1, Ordering::SeqCst);
                        let incoming = ServedRequest {
                            path_and_query: request
                                .uri()
                                .path_and_query()
                                .map(|p| p.as_str().to_owned())
                                .unwrap_or_default(),
                            headers: request.headers().clone(),
                            index,
                            port,
                        };
                        let reply = handler(&incoming);
                        async move { Ok::<_, Infallible>(respond(reply)) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        Self {
            port,
            ca_cert: certs.ca_cert,
            connections,
            requests,
            _dir: dir,
        }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("https://localhost:{}{path_and_query}", self.port)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Returns a policy that reaches this server: `localhost` only, loopback allowed, the
    /// development CA trusted, and timeouts long enough that only a stalled test reaches them.
    fn policy(&self) -> FetchPolicy {
        let mut policy = FetchPolicy::new(["localhost"]);
        policy.allow_loopback_for_tests = true;
        policy.extra_ca_file = Some(self.ca_cert.clone());
        policy.connect_timeout = Duration::from_secs(60);
        policy.total_timeout = Duration::from_secs(120);
        policy.max_attempts = 3;
        policy.initial_backoff = Duration::from_millis(1);
        policy.max_backoff = Duration::from_millis(10);
        policy
    }

    fn fetcher(&self) -> Fetcher {
        Fetcher::new(self.policy()).expect("valid policy")
    }
}

fn respond(reply: Reply) -> Response<ResponseBody> {
    let mut builder = Response::builder();
    let body: ResponseBody = match reply {
        Reply::Body {
            data,
            chunk,
            content_length,
            pause_every,
        } => {
            if content_length {
                builder = builder.header(header::CONTENT_LENGTH, data.len());
            }
            chunked_body(data, chunk, pause_every)
        }
        Reply::Status(status) => {
            builder = builder.status(status);
            empty_body()
        }
        Reply::Redirect(location) => {
            builder = builder
                .status(StatusCode::FOUND)
                .header(header::LOCATION, location)
                .header(header::SET_COOKIE, "session=1; Secure");
            empty_body()
        }
        Reply::Stall { prefix, length } => {
            builder = builder.header(header::CONTENT_LENGTH, length);
            let frames = stream::iter([Ok(Frame::data(prefix))]).chain(stream::pending());
            BodyExt::boxed_unsync(StreamBody::new(frames))
        }
        Reply::Break {
            prefix,
            length,
            resume,
        } => {
            builder = builder.header(header::CONTENT_LENGTH, length);
            let failure = stream::once(async move {
                resume.notified().await;
                Err::<Frame<Bytes>, BoxError>(Box::new(io::Error::other(
                    "test server broke the body",
                )))
            });
            let frames = stream::iter([Ok(Frame::data(prefix))]).chain(failure);
            BodyExt::boxed_unsync(StreamBody::new(frames))
        }
    };
    builder.body(body).expect("valid response")
}

fn empty_body() -> ResponseBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn chunked_body(data: Bytes, chunk: usize, pause_every: Option<usize>) -> ResponseBody {
    let frames = stream::unfold((data, 0usize), move |(mut rest, sent)| async move {
        if rest.is_empty() {
            return None;
        }
        if let Some(every) = pause_every
            && sent > 0
            && sent % every == 0
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let piece = rest.split_to(chunk.min(rest.len()));
        Some((Ok::<_, BoxError>(Frame::data(piece)), (rest, sent + 1)))
    });
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

/// `len` bytes of a fixed pseudo-random sequence.
fn test_data(len: usize) -> Bytes {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len);
    Bytes::from(data)
}

fn body(data: &Bytes, content_length: bool) -> Reply {
    Reply::Body {
        data: data.clone(),
        chunk: 16 * 1024,
        content_length,
        pause_every: None,
    }
}

/// A sink that hashes what it receives and counts chunks and aborts.
#[derive(Default)]
struct HashSink {
    hasher: Sha256,
    bytes: u64,
    chunks: usize,
    aborts: Option<Arc<AtomicUsize>>,
    /// Notified when the first chunk arrives.
    first_chunk: Option<Arc<Notify>>,
    fail: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("test sink failed")]
struct SinkFailure;

impl ChunkSink for HashSink {
    type Error = SinkFailure;

    async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), SinkFailure> {
        if self.fail {
            return Err(SinkFailure);
        }
        self.hasher.update(&chunk);
        self.bytes += chunk.len() as u64;
        self.chunks += 1;
        if let Some(first_chunk) = self.first_chunk.take() {
            first_chunk.notify_one();
        }
        Ok(())
    }

    async fn abort(self) {
        if let Some(aborts) = &self.aborts {
            aborts.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for HashSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashSink")
            .field("bytes", &self.bytes)
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

impl HashSink {
    fn digest(self) -> Vec<u8> {
        self.hasher.finalize().to_vec()
    }
}

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

fn assert_rejected(result: &Result<u64, FetchError>, expected: UrlRejection) {
    match result {
        Err(FetchError::Rejected { reason }) => assert_eq!(reason, &expected),
        other => panic!("expected a rejection ({expected}), got {other:?}"),
    }
}

#[tokio::test]
async fn slow_multi_mib_body_arrives_intact() {
    let data = test_data(6 * 1024 * 1024 + 123);
    let served = data.clone();
    let server = TestServer::start(move |_| Reply::Body {
        data: served.clone(),
        chunk: 7 * 1024,
        content_length: false,
        pause_every: Some(64),
    })
    .await;

    let mut sink = HashSink::default();
    let bytes = server
        .fetcher()
        .fetch_once(&server.url("/recording.wav?sig=abc"), &mut sink)
        .await
        .expect("download succeeds");

    assert_eq!(bytes, data.len() as u64);
    assert_eq!(sink.bytes, data.len() as u64);
    assert!(sink.chunks > 1, "the body arrived in {} chunk", sink.chunks);
    assert_eq!(sink.digest(), sha256(&data));
}

#[tokio::test]
async fn redirect_to_allowed_host_is_followed() {
    let data = test_data(100_000);
    let served = data.clone();
    let final_headers = Arc::new(Mutex::new(None));
    let recorded = Arc::clone(&final_headers);
    let server = TestServer::start(move |request| match request.path_and_query.as_str() {
        "/start?sig=abc" => Reply::Redirect(format!("https://localhost:{}/final", request.port)),
        "/final" => {
            *recorded.lock().expect("lock") = Some(request.headers.clone());
            body(&served, true)
        }
        _ => Reply::Status(404),
    })
    .await;

    let mut sink = HashSink::default();
    let bytes = server
        .fetcher()
        .fetch_once(&server.url("/start?sig=abc"), &mut sink)
        .await
        .expect("download succeeds");

    assert_eq!(bytes, data.len() as u64);
    assert_eq!(sink.digest(), sha256(&data));
    assert_eq!(server.requests(), 2);

    let headers = final_headers.lock().expect("lock").take();
    let headers = headers.expect("the redirect target was requested");
    assert!(
        headers.get(header::REFERER).is_none(),
        "the link leaked in Referer"
    );
    assert!(headers.get(header::COOKIE).is_none(), "a cookie was stored");
    assert_eq!(
        headers.get(header::ACCEPT_ENCODING).map(|v| v.as_bytes()),
        Some(&b"identity"[..])
    );
}

#[tokio::test]
async fn relative_redirect_is_followed() {
    let data = test_data(1000);
    let served = data.clone();
    let server = TestServer::start(move |request| match request.path_and_query.as_str() {
        "/start" => Reply::Redirect("/final".to_owned()),
        _ => body(&served, true),
    })
    .await;

    let mut sink = HashSink::default();
    let result = server
        .fetcher()
        .fetch_once(&server.url("/start"), &mut sink)
        .await;

    assert_eq!(result.expect("download succeeds"), 1000);
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn redirect_to_host_off_allowlist_is_rejected() {
    // 127.0.0.1 is this server too, but only `localhost` is on the allowlist.
    let server = TestServer::start(|request| {
        Reply::Redirect(format!("https://127.0.0.1:{}/final", request.port))
    })
    .await;

    let mut sink = HashSink::default();
    let result = server
        .fetcher()
        .fetch_once(&server.url("/start"), &mut sink)
        .await;

    match &result {
        Err(FetchError::RedirectRejected { reason }) => {
            assert_eq!(reason, &UrlRejection::HostNotAllowed)
        }
        other => panic!("expected a rejected redirect, got {other:?}"),
    }
    assert!(!result.as_ref().expect_err("rejected").is_retryable());
    assert_eq!(server.requests(), 1);
    assert_eq!(sink.bytes, 0);
}

#[tokio::test]
async fn redirect_to_http_is_rejected() {
    let server = TestServer::start(|request| {
        Reply::Redirect(format!("http://localhost:{}/final", request.port))
    })
    .await;

    let mut sink = HashSink::default();
    let result = server
        .fetcher()
        .fetch_once(&server.url("/start"), &mut sink)
        .await;

    match &result {
        Err(FetchError::RedirectRejected { reason }) => {
            assert_eq!(reason, &UrlRejection::NotHttps)
        }
        other => panic!("expected a rejected redirect, got {other:?}"),
    }
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn redirect_chain_stops_after_max_redirects() {
    let server =
        TestServer::start(|request| Reply::Redirect(format!("/hop/{}", request.index + 1))).await;

    let mut sink = HashSink::default();
    let result = server
        .fetcher()
        .fetch_once(&server.url("/hop/0"), &mut sink)
        .await;

    assert!(
        matches!(
            result,
            Err(FetchError::TooManyRedirects { max: MAX_REDIRECTS })
        ),
        "{result:?}"
    );
    assert_eq!(server.requests(), MAX_REDIRECTS + 1);
}

#[tokio::test]
async fn redirect_chain_of_max_redirects_is_followed() {
    let data = test_data(10);
    let served = data.clone();
    let server = TestServer::start(move |request| {
        if request.index < MAX_REDIRECTS {
            Reply::Redirect(format!("/hop/{}", request.index + 1))
        } else {
            body(&served, true)
        }
    })
    .await;

    let mut sink = HashSink::default();
    let result = server
        .fetcher()
        .fetch_once(&server.url("/hop/0"), &mut sink)
        .await;

    assert_eq!(result.expect("download succeeds"), 10);
    assert_eq!(server.requests(), MAX_REDIRECTS + 1);
}

#[tokio::test]
async fn http_url_is_rejected_before_connecting() {
    let server = TestServer::start(|_| Reply::Status(200)).await;
    let fetcher = server.fetcher();

    for url in [
        format!("http://localhost:{}/recording.wav", server.port),
        format!("ftp://localhost:{}/recording.wav", server.port),
    ] {
        let result = fetcher.fetch_once(&url, &mut HashSink::default()).await;
        assert_rejected(&result, UrlRejection::NotHttps);
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn host_off_allowlist_is_rejected_before_connecting() {
    let server = TestServer::start(|_| Reply::Status(200)).await;
    let fetcher = server.fetcher();

    for url in [
        format!("https://127.0.0.1:{}/recording.wav", server.port),
        format!("https://[::1]:{}/recording.wav", server.port),
        format!("https://localhost.:{}/recording.wav", server.port),
        "https://media.example.invalid/recording.wav".to_owned(),
    ] {
        let result = fetcher.fetch_once(&url, &mut HashSink::default()).await;
        assert_rejected(&result, UrlRejection::HostNotAllowed);
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn loopback_is_rejected_without_test_flag() {
    let server = TestServer::start(|_| Reply::Status(200)).await;
    let mut policy = server.policy();
    policy.allowed_hosts = ["localhost", "127.0.0.1", "[::1]", "[::ffff:7f00:1]"]
        .map(String::from)
        .to_vec();
    policy.allow_loopback_for_tests = false;
    let fetcher = Fetcher::new(policy).expect("valid policy");

    let port = server.port;
    for url in [
        // Resolved by the system resolver, which gives loopback addresses for `localhost`.
        format!("https://localhost:{port}/recording.wav"),
        // Literal addresses, in the forms the URL parser normalizes to these hosts.
        format!("https://127.0.0.1:{port}/recording.wav"),
        format!("https://2130706433:{port}/recording.wav"),
        format!("https://0x7f.0.0.1:{port}/recording.wav"),
        format!("https://[::1]:{port}/recording.wav"),
        format!("https://[::ffff:127.0.0.1]:{port}/recording.wav"),
    ] {
        let mut sink = HashSink::default();
        let result = fetcher.fetch_once(&url, &mut sink).await;
        assert_rejected(
            &result,
            UrlRejection::AddressNotAllowed(AddressClass::Loopback),
        );
        assert!(!result.expect_err("rejected").is_retryable());
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn body_at_size_limit_succeeds() {
    for content_length in [true, false] {
        let data = test_data(50_000);
        let served = data.clone();
        let server = TestServer::start(move |_| body(&served, content_length)).await;
        let mut policy = server.policy();
        policy.max_bytes = 50_000;

        let mut sink = HashSink::default();
        let result = Fetcher::new(policy)
            .expect("valid policy")
            .fetch_once(&server.url("/x"), &mut sink)
            .await;

        assert_eq!(
            result.expect("download at the limit succeeds"),
            50_000,
            "content_length={content_length}"
        );
        assert_eq!(sink.digest(), sha256(&data));
    }
}

#[tokio::test]
async fn streamed_body_over_size_limit_fails() {
    let data = test_data(50_001);
    let served = data.clone();
    let server = TestServer::start(move |_| body(&served, false)).await;
    let mut policy = server.policy();
    policy.max_bytes = 50_000;

    let mut sink = HashSink::default();
    let result = Fetcher::new(policy)
        .expect("valid policy")
        .fetch_once(&server.url("/x"), &mut sink)
        .await;

    let error = result.expect_err("one byte over the limit");
    assert!(
        matches!(error, FetchError::TooLarge { max_bytes: 50_000 }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    assert!(sink.bytes <= 50_000, "the sink got {} bytes", sink.bytes);
}

#[tokio::test]
async fn content_length_over_limit_fails_before_body() {
    // The body never arrives, so a client that read it would time out instead.
    let server = TestServer::start(|_| Reply::Stall {
        prefix: Bytes::new(),
        length: 50_001,
    })
    .await;
    let mut policy = server.policy();
    policy.max_bytes = 50_000;

    let mut starts = 0;
    let result = Fetcher::new(policy)
        .expect("valid policy")
        .fetch(&server.url("/x"), |_| {
            starts += 1;
            async { Ok(HashSink::default()) }
        })
        .await;

    let error = result.expect_err("announced size over the limit");
    assert!(
        matches!(error, FetchError::TooLarge { max_bytes: 50_000 }),
        "{error:?}"
    );
    assert_eq!(starts, 0, "no sink is started for a rejected response");
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn service_unavailable_then_ok_succeeds_on_retry() {
    let data = test_data(20_000);
    let served = data.clone();
    let server = TestServer::start(move |request| match request.index {
        0 => Reply::Status(503),
        _ => body(&served, true),
    })
    .await;

    let mut starts = Vec::new();
    let fetched = server
        .fetcher()
        .fetch(&server.url("/x"), |attempt| {
            starts.push(attempt);
            async { Ok(HashSink::default()) }
        })
        .await
        .expect("the second attempt succeeds");

    assert_eq!(fetched.attempts, 2);
    assert_eq!(fetched.bytes, 20_000);
    assert_eq!(fetched.sink.digest(), sha256(&data));
    assert_eq!(starts, [2], "the 503 response starts no sink");
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let server = TestServer::start(|_| Reply::Status(404)).await;

    let result = server
        .fetcher()
        .fetch(&server.url("/x"), |_| async { Ok(HashSink::default()) })
        .await;

    let error = result.expect_err("404");
    assert!(
        matches!(error, FetchError::Status { status: 404 }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn too_many_requests_is_retried() {
    let server = TestServer::start(|_| Reply::Status(429)).await;
    let fetcher = server.fetcher();

    let result = fetcher
        .fetch(&server.url("/x"), |_| async { Ok(HashSink::default()) })
        .await;

    let error = result.expect_err("429 every time");
    assert!(
        matches!(error, FetchError::Status { status: 429 }),
        "{error:?}"
    );
    assert_eq!(
        server.requests(),
        fetcher.policy().max_attempts as usize,
        "one request per attempt"
    );
}

#[tokio::test]
async fn broken_body_restarts_with_fresh_sink() {
    let data = test_data(64 * 1024);
    let served = data.clone();
    // The server breaks the first body only after the first sink has its prefix.
    let resume = Arc::new(Notify::new());
    let server_resume = Arc::clone(&resume);
    let server = TestServer::start(move |request| match request.index {
        0 => Reply::Break {
            prefix: served.slice(..1000),
            length: served.len() as u64,
            resume: Arc::clone(&server_resume),
        },
        _ => body(&served, true),
    })
    .await;

    let aborts = Arc::new(AtomicUsize::new(0));
    let mut starts = Vec::new();
    let fetched = server
        .fetcher()
        .fetch(&server.url("/x"), |attempt| {
            starts.push(attempt);
            let sink = HashSink {
                aborts: Some(Arc::clone(&aborts)),
                first_chunk: Some(Arc::clone(&resume)),
                ..HashSink::default()
            };
            async { Ok(sink) }
        })
        .await
        .expect("the second attempt succeeds");

    assert_eq!(starts, [1, 2]);
    assert_eq!(
        aborts.load(Ordering::SeqCst),
        1,
        "the first sink is aborted"
    );
    assert_eq!(fetched.attempts, 2);
    assert_eq!(fetched.bytes, data.len() as u64);
    assert_eq!(fetched.sink.digest(), sha256(&data));
}

/// Runs `fetch` with a server that stalls after `prefix`, and pauses the Tokio clock once the
/// sink has the prefix. From then on nothing but the stalled body is pending, so the clock
/// advances to the attempt's deadline without the test waiting in real time.
async fn fetch_until_stalled(fetcher: &Fetcher, url: &str) -> (Result<u64, FetchError>, HashSink) {
    let first_chunk = Arc::new(Notify::new());
    let mut sink = HashSink {
        first_chunk: Some(Arc::clone(&first_chunk)),
        ..HashSink::default()
    };
    let download = fetcher.fetch_once(url, &mut sink);
    let pause = async {
        first_chunk.notified().await;
        tokio::time::pause();
    };
    let (result, ()) = tokio::join!(download, pause);
    (result, sink)
}

#[tokio::test]
async fn stalled_body_hits_total_timeout() {
    let server = TestServer::start(|_| Reply::Stall {
        prefix: Bytes::from_static(b"first bytes"),
        length: 1_000_000,
    })
    .await;
    let fetcher = server.fetcher();

    let (result, sink) = fetch_until_stalled(&fetcher, &server.url("/x")).await;

    let error = result.expect_err("the body stalls");
    assert!(
        matches!(error, FetchError::Timeout { after } if after == fetcher.policy().total_timeout),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert_eq!(sink.bytes, b"first bytes".len() as u64);
}

#[tokio::test]
async fn untrusted_certificate_fails_without_retry() {
    let server = TestServer::start(|_| Reply::Status(200)).await;
    let mut policy = server.policy();
    policy.extra_ca_file = None;

    let result = Fetcher::new(policy)
        .expect("valid policy")
        .fetch(&server.url("/x"), |_| async { Ok(HashSink::default()) })
        .await;

    let error = result.expect_err("the development CA is not trusted");
    assert!(matches!(error, FetchError::Tls { .. }), "{error:?}");
    assert!(!error.is_retryable());
    assert_eq!(server.connections(), 1);
    assert_eq!(server.requests(), 0);
}

#[tokio::test]
async fn sink_error_is_not_retried() {
    let data = test_data(1000);
    let served = data.clone();
    let server = TestServer::start(move |_| body(&served, true)).await;

    let result = server
        .fetcher()
        .fetch(&server.url("/x"), |_| async {
            Ok(HashSink {
                fail: true,
                ..HashSink::default()
            })
        })
        .await;

    let error = result.expect_err("the sink fails");
    assert!(matches!(error, FetchError::Sink { .. }), "{error:?}");
    assert!(!error.is_retryable());
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn refused_connection_is_retried() {
    // A port that was free a moment ago, so connections to it are refused.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("local address").port()
    };
    let mut policy = FetchPolicy::new(["localhost"]);
    policy.allow_loopback_for_tests = true;
    policy.max_attempts = 2;
    policy.initial_backoff = Duration::from_millis(1);
    policy.max_backoff = Duration::from_millis(1);
    let fetcher = Fetcher::new(policy).expect("valid policy");

    let mut starts = 0;
    let result = fetcher
        .fetch(&format!("https://localhost:{port}/x"), |_| {
            starts += 1;
            async { Ok(HashSink::default()) }
        })
        .await;

    let error = result.expect_err("nothing listens");
    assert!(matches!(error, FetchError::Connect { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(starts, 0);
}

/// Collects formatted log lines of every level from every target.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

/// Returns the `Display` and `Debug` output of `error` and of every error in its source chain.
fn error_texts(error: &FetchError) -> Vec<String> {
    let mut texts = vec![error.to_string(), format!("{error:?}")];
    let mut source = error.source();
    while let Some(cause) = source {
        texts.push(cause.to_string());
        texts.push(format!("{cause:?}"));
        source = cause.source();
    }
    texts
}

#[tokio::test]
async fn failures_never_reveal_url() {
    const CANARY: &str = "canary7f3c9e";

    // Forward `log` records (rustls, reqwest) to tracing, so the capture records them too. The
    // subscriber is this thread's default, and the current-thread runtime runs the server and
    // the client on this thread.
    let _ = tracing_log::LogTracer::init();
    let capture = LogCapture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let resume = Arc::new(Notify::new());
    let server_resume = Arc::clone(&resume);
    let server = TestServer::start(move |request| {
        let path = request.path_and_query.as_str();
        if path.starts_with("/404/") {
            Reply::Status(404)
        } else if path.starts_with("/503/") {
            Reply::Status(503)
        } else if path.starts_with("/redirect-off/") {
            Reply::Redirect(format!(
                "https://127.0.0.1:{}/{CANARY}/next?sig={CANARY}",
                request.port
            ))
        } else if path.starts_with("/redirect-http/") {
            Reply::Redirect(format!(
                "http://localhost:{}/{CANARY}/next?sig={CANARY}",
                request.port
            ))
        } else if path.starts_with("/loop/") {
            Reply::Redirect(format!("/loop/{CANARY}/{}?sig={CANARY}", request.index))
        } else if path.starts_with("/large/") {
            body(&test_data(2000), false)
        } else if path.starts_with("/small/") {
            body(&test_data(500), false)
        } else if path.starts_with("/stall/") {
            Reply::Stall {
                prefix: Bytes::from_static(b"x"),
                length: 10,
            }
        } else if path.starts_with("/break/") {
            Reply::Break {
                prefix: Bytes::from_static(b"x"),
                length: 10,
                resume: Arc::clone(&server_resume),
            }
        } else {
            Reply::Status(500)
        }
    })
    .await;
    let port = server.port;
    let secret =
        |route: &str| format!("/{route}/{CANARY}/recording.wav?token={CANARY}&sig={CANARY}");

    let mut policy = server.policy();
    policy.max_bytes = 1000;
    let fetcher = Fetcher::new(policy.clone()).expect("valid policy");
    let mut untrusting = policy.clone();
    untrusting.extra_ca_file = None;
    let untrusting = Fetcher::new(untrusting).expect("valid policy");
    let mut production = policy.clone();
    production.allow_loopback_for_tests = false;
    let production = Fetcher::new(production).expect("valid policy");

    let mut errors = Vec::new();
    for route in [
        "404",
        "503",
        "redirect-off",
        "redirect-http",
        "loop",
        "large",
        "break",
    ] {
        let result = fetcher
            .fetch(&server.url(&secret(route)), |_| {
                let sink = HashSink {
                    first_chunk: Some(Arc::clone(&resume)),
                    ..HashSink::default()
                };
                async { Ok(sink) }
            })
            .await;
        errors.push(result.expect_err(route));
    }
    let with_sink_failure = fetcher
        .fetch(&server.url(&secret("small")), |_| async {
            Ok(HashSink {
                fail: true,
                ..HashSink::default()
            })
        })
        .await;
    errors.push(with_sink_failure.expect_err("the sink fails"));

    let rejected_urls = [
        format!("http://localhost:{port}{}", secret("http")),
        format!("https://127.0.0.1:{port}{}", secret("ip")),
        format!(
            "https://user:{CANARY}@localhost:{port}{}",
            secret("userinfo")
        ),
        format!("https://localhost:{port}{}#{CANARY}", secret("fragment")),
        format!("https://{CANARY}.invalid{}", secret("host")),
        format!("https://localhost:{port}/%zz{}", secret("odd")),
        format!("https://exa mple{CANARY}/{CANARY}"),
        format!("not a url {CANARY}"),
    ];
    for url in &rejected_urls {
        let mut sink = HashSink::default();
        if let Err(error) = fetcher.fetch_once(url, &mut sink).await {
            errors.push(error);
        }
        if let Err(error) = fetcher.check_url(url) {
            errors.push(error);
        }
    }

    let tls_failure = untrusting
        .fetch_once(&server.url(&secret("tls")), &mut HashSink::default())
        .await;
    errors.push(tls_failure.expect_err("untrusted certificate"));
    let loopback = production
        .fetch_once(&server.url(&secret("loopback")), &mut HashSink::default())
        .await;
    errors.push(loopback.expect_err("loopback without the test flag"));

    let refused_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("local address").port()
    };
    let refused = fetcher
        .fetch(
            &format!("https://localhost:{refused_port}{}", secret("refused")),
            |_| async { Ok(HashSink::default()) },
        )
        .await;
    errors.push(refused.expect_err("connection refused"));

    let (stalled, _) = fetch_until_stalled(&fetcher, &server.url(&secret("stall"))).await;
    errors.push(stalled.expect_err("stalled body"));

    let kinds: Vec<&str> = errors.iter().map(FetchError::kind).collect();
    for kind in [
        "status",
        "redirect_rejected",
        "too_many_redirects",
        "too_large",
        "transfer",
        "sink",
        "rejected",
        "tls",
        "connect",
        "timeout",
    ] {
        assert!(kinds.contains(&kind), "no {kind} error among {kinds:?}");
    }

    for error in &errors {
        for text in error_texts(error) {
            assert!(!text.contains(CANARY), "error text reveals the URL: {text}");
        }
    }

    let logs = capture.text();
    assert!(
        logs.contains("media download attempt failed, retrying"),
        "retries were not logged:\n{logs}"
    );
    assert!(
        logs.contains("attempt=2"),
        "attempt numbers were not logged"
    );
    assert!(
        logs.contains("kind=\"status\""),
        "error kinds were not logged"
    );
    assert!(
        !logs.contains(CANARY),
        "logs reveal the URL:\n{}",
        logs.lines()
            .filter(|line| line.contains(CANARY))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
