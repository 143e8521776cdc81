//! The admin listener: liveness, readiness and Prometheus metrics over plain HTTP/1.1.
//!
//! | route | response |
//! |---|---|
//! | `GET /healthz` | `200 ok` while the process runs |
//! | `GET /readyz` | `200 ready`, or `503` with the reason from [`Readiness::check`] |
//! | `GET /metrics` | `200` with [`Metrics::encode`] as [`metrics::CONTENT_TYPE`] |
//!
//! `HEAD` is accepted wherever `GET` is (RFC 9110 requires general-purpose servers to support
//! both). Another method on these paths gets `405` with an `Allow` header, and any other path
//! gets `404`.
//!
//! The listener carries no PHI and has no authentication, so the caller binds it to a loopback
//! address unless the operator configures otherwise. It still limits what a client can hold:
//!
//! - a connection that has not sent complete request headers within [`HEADER_READ_TIMEOUT`] is
//!   closed, and that includes an idle keep-alive connection between two requests;
//! - a readiness check that runs longer than [`READINESS_CHECK_TIMEOUT`] returns `503`;
//! - at most [`MAX_CONNECTIONS`] connections are served at once, and further ones wait in the
//!   listen backlog;
//! - on shutdown, the listener stops accepting, closes idle connections, lets in-flight requests
//!   finish for up to [`SHUTDOWN_DRAIN_TIMEOUT`], and then drops what is left.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::metrics::{self, Metrics};

/// Maximum time from the start of a connection, or from the end of its previous response, until
/// the client has sent complete request headers.
///
/// # Defaults
///
/// 10 seconds. Scrapers and probes send a few hundred bytes at once, so only a stalled or hostile
/// client comes near it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Maximum time one [`Readiness::check`] may take before `/readyz` returns `503`.
///
/// # Defaults
///
/// 5 seconds, so that a hung dependency cannot hold probe connections open. A probe receives the
/// reason only if its own timeout is longer: Kubernetes probes default to 1 second
/// (`timeoutSeconds`), so set that to 6 seconds or more.
pub const READINESS_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Maximum number of admin connections served at once.
///
/// # Defaults
///
/// 64 connections. A few scrapers and probes need a handful, and the limit keeps a misbehaving
/// client from using up file descriptors that the data listener needs.
pub const MAX_CONNECTIONS: usize = 64;

/// Maximum time that shutdown waits for in-flight admin requests before dropping them.
///
/// # Defaults
///
/// 15 seconds, longer than [`HEADER_READ_TIMEOUT`] plus [`READINESS_CHECK_TIMEOUT`], so that any
/// request that the other limits allow can finish.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Pause after an accept error that is not specific to one connection (such as running out of
/// file descriptors), so that the loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

const ALLOWED_METHODS: &str = "GET, HEAD";

/// A check of whether the process can serve requests, run on every `GET /readyz`.
pub trait Readiness: Send + Sync {
    /// Checks readiness, returning `Err` with what is not ready (for example `storage
    /// unreachable`). The reason is sent to the client and logged, so it must not contain a
    /// secret, a token, a URL with credentials or PHI.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// A [`Readiness`] that always reports ready.
#[derive(Clone, Copy, Debug, Default)]
pub struct AlwaysReady;

/// What the admin listener serves.
#[derive(Clone)]
pub struct AdminState {
    /// The process's metrics registry, encoded on every `GET /metrics`.
    pub metrics: Arc<Metrics>,

    /// The readiness check run on every `GET /readyz`.
    pub readiness: Arc<dyn Readiness>,
}

/// The state shared by the connections of one [`serve`] call.
struct Shared {
    state: AdminState,
    readiness_log: ReadinessLog,
}

/// The outcome of the last readiness check, so that only changes are logged.
#[derive(Default)]
struct ReadinessLog {
    last: Mutex<Option<Result<(), String>>>,
}

/// An admin route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Health,
    Ready,
    Metrics,
}

impl Readiness for AlwaysReady {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Serves the admin routes on `listener` until `shutdown` completes.
///
/// The caller binds the listener, on a loopback address by default. After `shutdown` completes
/// the listener is closed at once, idle connections are closed, and this function returns when
/// the in-flight requests have finished or [`SHUTDOWN_DRAIN_TIMEOUT`] has passed.
///
/// # Errors
///
/// Returns an error only if the listener's local address cannot be read. Accept errors are
/// logged and the loop goes on, because a failed accept (a reset connection, a full file
/// descriptor table) is temporary.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let address = listener.local_addr()?;
    tracing::info!(%address, "admin listener started");

    let shared = Arc::new(Shared {
        state,
        readiness_log: ReadinessLog::default(),
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        while connections.try_join_next().is_some() {}

        // At the limit, wait for a connection to end before accepting the next one.
        if connections.len() >= MAX_CONNECTIONS {
            tokio::select! {
                () = &mut shutdown => break,
                _ = connections.join_next() => continue,
            }
        }

        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_connection_error(&error) => {
                tracing::debug!(%address, %error, "admin connection failed during accept");
                continue;
            }
            Err(error) => {
                tracing::warn!(%address, %error, "admin listener failed to accept a connection");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };

        let shared = Arc::clone(&shared);
        let service = service_fn(move |request: Request<Incoming>| {
            let shared = Arc::clone(&shared);
            async move {
                let (parts, _body) = request.into_parts();
                let response = respond(&parts.method, parts.uri.path(), &shared).await;
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!(%address, open_connections = graceful.count(), "admin listener stopped accepting");

    if tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            %address,
            timeout_secs = SHUTDOWN_DRAIN_TIMEOUT.as_secs(),
            "admin connections were still open at the shutdown drain timeout, so they are dropped",
        );
    }
    connections.shutdown().await;

    tracing::info!(%address, "admin listener stopped");
    Ok(())
}

/// Routes one request and builds its response. The request body is never read.
async fn respond(method: &Method, path: &str, shared: &Shared) -> Response<Full<Bytes>> {
    let route = match path {
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        "/metrics" => Route::Metrics,
        _ => return text_response(StatusCode::NOT_FOUND, "not found".to_owned()),
    };

    if method != Method::GET && method != Method::HEAD {
        let mut response = text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed".to_owned(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        return response;
    }

    match route {
        Route::Health => text_response(StatusCode::OK, "ok".to_owned()),
        Route::Ready => readiness_response(shared).await,
        Route::Metrics => {
            let mut response = text_response(StatusCode::OK, shared.state.metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
    }
}

/// Runs the readiness check under [`READINESS_CHECK_TIMEOUT`] and builds a `200` or `503` response.
async fn readiness_response(shared: &Shared) -> Response<Full<Bytes>> {
    let outcome =
        match tokio::time::timeout(READINESS_CHECK_TIMEOUT, shared.state.readiness.check()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "readiness check timed out after {} seconds",
                READINESS_CHECK_TIMEOUT.as_secs()
            )),
        };

    shared.readiness_log.record(&outcome);

    match outcome {
        Ok(()) => text_response(StatusCode::OK, "ready".to_owned()),
        Err(reason) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        ),
    }
}

/// Builds a plain-text response that caches must not store.
fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;

    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(TEXT_CONTENT_TYPE),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Tells whether an accept error concerns only the connection being accepted, so that the next
/// accept can follow at once.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

impl ReadinessLog {
    /// Logs `outcome` if it differs from the previous check's outcome.
    fn record(&self, outcome: &Result<(), String>) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_ref() == Some(outcome) {
            return;
        }

        match outcome {
            Ok(()) => tracing::info!("readiness check passed"),
            Err(reason) => tracing::warn!(%reason, "readiness check failed"),
        }
        *last = Some(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http_body_util::{BodyExt, Empty};
    use hyper::HeaderMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::{Notify, oneshot};
    use tokio::task::JoinHandle;
    use tokio::time::Instant;

    use super::*;

    /// A hang guard for tests on the paused clock: far longer than every admin timeout, so it
    /// only ends a test whose server never responds.
    const HANG_GUARD: Duration = Duration::from_secs(3600);

    /// A readiness check whose outcome the test sets.
    #[derive(Default)]
    struct SwitchableReadiness {
        reason: Mutex<Option<String>>,
    }

    impl SwitchableReadiness {
        fn set_not_ready(&self, reason: &str) {
            *self.reason.lock().expect("readiness lock poisoned") = Some(reason.to_owned());
        }

        fn set_ready(&self) {
            *self.reason.lock().expect("readiness lock poisoned") = None;
        }
    }

    impl Readiness for SwitchableReadiness {
        fn check(&self) -> BoxFuture<'_, Result<(), String>> {
            let reason = self.reason.lock().expect("readiness lock poisoned").clone();
            Box::pin(std::future::ready(match reason {
                Some(reason) => Err(reason),
                None => Ok(()),
            }))
        }
    }

    /// A readiness check that signals when it starts and reports ready once released.
    #[derive(Default)]
    struct GatedReadiness {
        started: Notify,
        release: Notify,
    }

    impl Readiness for GatedReadiness {
        fn check(&self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async {
                self.started.notify_one();
                self.release.notified().await;
                Ok(())
            })
        }
    }

    /// A readiness check that never completes.
    struct StuckReadiness;

    impl Readiness for StuckReadiness {
        fn check(&self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(std::future::pending())
        }
    }

    struct TestServer {
        address: SocketAddr,
        metrics: Arc<Metrics>,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<io::Result<()>>,
    }

    impl TestServer {
        async fn start(readiness: Arc<dyn Readiness>) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind loopback listener");
            let address = listener.local_addr().expect("listener address");
            let metrics = Metrics::new();
            let state = AdminState {
                metrics: Arc::clone(&metrics),
                readiness,
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, state, async move {
                let _ = stopped.await;
            }));

            TestServer {
                address,
                metrics,
                stop: Some(stop),
                task,
            }
        }

        fn shut_down(&mut self) {
            let stop = self.stop.take().expect("server already shut down");
            stop.send(()).expect("server task ended before shutdown");
        }
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    }

    /// Sends one request on a new connection with hyper's HTTP/1.1 client.
    async fn send(address: SocketAddr, method: Method, path: &str) -> Answer {
        let stream = TcpStream::connect(address).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);

        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, address.to_string())
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        let response = sender.send_request(request).await.expect("response");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();

        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).expect("UTF-8 response body"),
        }
    }

    async fn get(address: SocketAddr, path: &str) -> Answer {
        send(address, Method::GET, path).await
    }

    /// Reads from `stream` until the server closes it, returning what was read.
    async fn read_until_closed(stream: &mut TcpStream) -> String {
        let mut received = Vec::new();
        tokio::time::timeout(HANG_GUARD, stream.read_to_end(&mut received))
            .await
            .expect("server kept the connection open")
            .expect("read from server");
        String::from_utf8_lossy(&received).into_owned()
    }

    /// Opens a connection that sends nothing, so the server counts it until the header timeout.
    async fn open_idle_connection(address: SocketAddr) -> TcpStream {
        TcpStream::connect(address).await.expect("connect")
    }

    #[tokio::test]
    async fn healthz_returns_ok() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;

        let answer = get(server.address, "/healthz").await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "ok");
        assert_eq!(answer.headers[header::CONTENT_TYPE], TEXT_CONTENT_TYPE);
        assert_eq!(answer.headers[header::CACHE_CONTROL], "no-store");
    }

    #[tokio::test]
    async fn healthz_ignores_query_string() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;

        let answer = get(server.address, "/healthz?verbose=1").await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "ok");
    }

    #[tokio::test]
    async fn readyz_follows_readiness_changes() {
        let readiness = Arc::new(SwitchableReadiness::default());
        let server = TestServer::start(Arc::clone(&readiness) as Arc<dyn Readiness>).await;

        let answer = get(server.address, "/readyz").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "ready");

        readiness.set_not_ready("storage unreachable");
        let answer = get(server.address, "/readyz").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.body, "not ready: storage unreachable");
        assert_eq!(answer.headers[header::CONTENT_TYPE], TEXT_CONTENT_TYPE);

        readiness.set_not_ready("audit sink unavailable");
        let answer = get(server.address, "/readyz").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.body, "not ready: audit sink unavailable");

        readiness.set_ready();
        let answer = get(server.address, "/readyz").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "ready");

        let health = get(server.address, "/healthz").await;
        assert_eq!(
            health.status,
            StatusCode::OK,
            "liveness must not follow readiness"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn readyz_times_out_stuck_check() {
        let server = TestServer::start(Arc::new(StuckReadiness)).await;
        let started = Instant::now();

        let answer = tokio::time::timeout(HANG_GUARD, get(server.address, "/readyz"))
            .await
            .expect("readiness check was not bounded");

        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            answer.body,
            "not ready: readiness check timed out after 5 seconds"
        );
        assert!(started.elapsed() >= READINESS_CHECK_TIMEOUT);
    }

    #[tokio::test]
    async fn metrics_serves_encoded_registry() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;
        server.metrics.record_request("object", "GET", 200);
        server.metrics.record_tag_failure();
        let _stream = server.metrics.stream_started();

        let answer = get(server.address, "/metrics").await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers[header::CONTENT_TYPE], metrics::CONTENT_TYPE);
        assert_eq!(answer.body, server.metrics.encode());
        let lines: Vec<&str> = answer.body.lines().collect();
        assert!(
            lines.contains(
                &r#"callseal_http_requests_total{route="object",method="GET",status="200"} 1"#
            ),
            "{}",
            answer.body
        );
        assert!(
            lines.contains(&"callseal_authentication_failures_total 1"),
            "{}",
            answer.body
        );
        assert!(
            lines.contains(&"callseal_active_streams 1"),
            "{}",
            answer.body
        );
    }

    #[tokio::test]
    async fn head_returns_headers_without_body() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;

        for path in ["/healthz", "/readyz", "/metrics"] {
            let answer = send(server.address, Method::HEAD, path).await;

            assert_eq!(answer.status, StatusCode::OK, "HEAD {path}");
            assert_eq!(answer.body, "", "HEAD {path}");
        }
    }

    #[tokio::test]
    async fn unknown_paths_return_404() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;

        for path in [
            "/",
            "/healthz/",
            "/HEALTHZ",
            "/metricsx",
            "/readyz/extra",
            "/v1/practices/p1/calls/c1/audio",
        ] {
            let answer = get(server.address, path).await;

            assert_eq!(answer.status, StatusCode::NOT_FOUND, "GET {path}");
            assert_eq!(answer.body, "not found", "GET {path}");
        }

        let answer = send(server.address, Method::POST, "/unknown").await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "POST to an unknown path"
        );
    }

    #[tokio::test]
    async fn other_methods_return_405() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;

        for path in ["/healthz", "/readyz", "/metrics"] {
            for method in [
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
                Method::OPTIONS,
            ] {
                let answer = send(server.address, method.clone(), path).await;

                assert_eq!(
                    answer.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}"
                );
                assert_eq!(
                    answer.headers[header::ALLOW],
                    ALLOWED_METHODS,
                    "{method} {path}"
                );
            }
        }
    }

    #[tokio::test]
    async fn keep_alive_connection_serves_several_requests() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;
        let stream = TcpStream::connect(server.address).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);

        for path in ["/healthz", "/readyz", "/metrics", "/healthz"] {
            let request = Request::get(path)
                .header(header::HOST, server.address.to_string())
                .body(Empty::<Bytes>::new())
                .expect("valid request");
            let response = sender.send_request(request).await.expect("response");

            assert_eq!(response.status(), StatusCode::OK, "GET {path}");
            response.into_body().collect().await.expect("body");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn partial_headers_are_cut_off() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;
        let mut stream = TcpStream::connect(server.address).await.expect("connect");
        let started = Instant::now();

        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .expect("write partial headers");
        let received = read_until_closed(&mut stream).await;

        assert!(
            !received.contains("200 OK"),
            "served partial headers: {received}"
        );
        assert!(started.elapsed() >= HEADER_READ_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keep_alive_connection_is_closed() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;
        let mut stream = TcpStream::connect(server.address).await.expect("connect");

        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write request");
        let received = read_until_closed(&mut stream).await;

        assert!(received.starts_with("HTTP/1.1 200 OK\r\n"), "{received}");
        assert!(received.ends_with("\r\n\r\nok"), "{received}");
    }

    #[tokio::test(start_paused = true)]
    async fn connection_below_limit_is_served_at_once() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS - 1 {
            idle.push(open_idle_connection(server.address).await);
        }
        let started = Instant::now();

        let answer = tokio::time::timeout(HANG_GUARD, get(server.address, "/healthz"))
            .await
            .expect("request was not served");

        assert_eq!(answer.status, StatusCode::OK);
        assert!(
            started.elapsed() < HEADER_READ_TIMEOUT,
            "request waited for an idle connection to time out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connection_over_limit_waits_for_a_free_slot() {
        let server = TestServer::start(Arc::new(AlwaysReady)).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(open_idle_connection(server.address).await);
        }
        let started = Instant::now();

        let answer = tokio::time::timeout(HANG_GUARD, get(server.address, "/healthz"))
            .await
            .expect("request was not served after the idle connections timed out");

        assert_eq!(answer.status, StatusCode::OK);
        assert!(
            started.elapsed() >= HEADER_READ_TIMEOUT,
            "request was served while the limit was reached"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_with_no_connections_returns() {
        let mut server = TestServer::start(Arc::new(AlwaysReady)).await;
        get(server.address, "/healthz").await;

        server.shut_down();
        let outcome = tokio::time::timeout(HANG_GUARD, server.task)
            .await
            .expect("serve did not return after shutdown")
            .expect("serve task panicked");

        assert!(outcome.is_ok(), "{outcome:?}");
        let refused = TcpStream::connect(server.address).await;
        assert!(refused.is_err(), "listener still accepts after shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_finishes_in_flight_request() {
        let readiness = Arc::new(GatedReadiness::default());
        let mut server = TestServer::start(Arc::clone(&readiness) as Arc<dyn Readiness>).await;
        let address = server.address;
        let in_flight = tokio::spawn(async move { get(address, "/readyz").await });
        readiness.started.notified().await;

        server.shut_down();
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(address).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "listener still accepts after shutdown");
        assert!(
            !server.task.is_finished(),
            "serve returned before the in-flight request finished"
        );

        readiness.release.notify_one();
        let answer = in_flight.await.expect("request task panicked");
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "ready");
        let outcome = tokio::time::timeout(HANG_GUARD, server.task)
            .await
            .expect("serve did not return after the drain")
            .expect("serve task panicked");
        assert!(outcome.is_ok(), "{outcome:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_idle_keep_alive_connection() {
        let mut server = TestServer::start(Arc::new(AlwaysReady)).await;
        let mut stream = TcpStream::connect(server.address).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write request");
        let mut response = [0_u8; 512];
        let read = stream.read(&mut response).await.expect("read response");
        assert!(response[..read].starts_with(b"HTTP/1.1 200 OK\r\n"));
        let started = Instant::now();

        server.shut_down();
        let outcome = tokio::time::timeout(HANG_GUARD, server.task)
            .await
            .expect("serve did not return after shutdown")
            .expect("serve task panicked");

        assert!(outcome.is_ok(), "{outcome:?}");
        assert!(
            started.elapsed() < HEADER_READ_TIMEOUT,
            "shutdown waited for the idle connection to time out"
        );
        let received = read_until_closed(&mut stream).await;
        assert_eq!(received, "", "server sent more after the response");
    }
}
