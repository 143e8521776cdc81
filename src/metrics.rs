//! Process metrics in the Prometheus text exposition format, served by the admin listener.
//!
//! One [`Metrics`] value is created at start-up and shared as `Arc<Metrics>` by every part that
//! records or serves metrics, from any task or thread. Recording a labelled metric takes a read
//! lock on its label map (a write lock only the first time a label combination appears) and then
//! an atomic add. Metrics without labels are a single atomic operation.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `callseal_http_requests_total` | counter | `route`, `method`, `status` |
//! | `callseal_http_request_body_bytes_total` | counter | `route` |
//! | `callseal_http_response_body_bytes_total` | counter | `route` |
//! | `callseal_authentication_failures_total` | counter | none |
//! | `callseal_active_streams` | gauge | none |
//! | `callseal_connections_rejected_total` | counter | `reason` |
//!
//! Invariants:
//!
//! - Label values come from a bounded set, so a client cannot grow the number of series. Routes and
//!   rejection reasons are `&'static str` names chosen by the code, never a request path (paths
//!   contain practice and call ids). Methods outside the standard HTTP methods are counted as
//!   `other`.
//! - No label or value carries PHI, a token or key material: only route names, methods, status
//!   codes, reasons and counts.
//!
//! A metric with labels appears in [`Metrics::encode`]'s output from its first recording on,
//! because the encoder writes no help or type line for a metric without series. The metrics
//! without labels appear from the start, at zero.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::encode`]'s output: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The `method` label value for a request method that is not one of the standard HTTP methods.
pub const OTHER_METHOD: &str = "other";

/// The standard HTTP methods (RFC 9110 and RFC 5789), kept as their own `method` label values.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The metrics registry of one callseal process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_body_bytes: Family<RouteLabels, Counter>,
    response_body_bytes: Family<RouteLabels, Counter>,
    authentication_failures: Counter,
    active_streams: Gauge,
    connections_rejected: Family<ReasonLabels, Counter>,
    background_tasks: Family<TaskLabels, Counter>,
    kms_calls: Family<OperationLabels, Counter>,
    kms_failures: Counter,
    audit_failures: Counter,
    spool_operations: Family<OutcomeLabels, Counter>,
    spool_events: Gauge,
    spool_bytes: Gauge,
}

/// A request body or response body in flight, counted in `callseal_active_streams` until dropped.
///
/// Move the guard into the body stream so that the gauge goes down however the stream ends:
/// completed, failed or dropped by a disconnecting client.
#[derive(Debug)]
#[must_use = "the stream stops being counted as soon as the guard is dropped"]
pub struct StreamGuard {
    active_streams: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
    outcome: &'static str,
}

impl Metrics {
    /// Creates a registry with every callseal metric registered.
    pub fn new() -> Arc<Metrics> {
        let requests = Family::<RequestLabels, Counter>::default();
        let request_body_bytes = Family::<RouteLabels, Counter>::default();
        let response_body_bytes = Family::<RouteLabels, Counter>::default();
        let authentication_failures = Counter::default();
        let active_streams = Gauge::default();
        let connections_rejected = Family::<ReasonLabels, Counter>::default();
        let background_tasks = Family::<TaskLabels, Counter>::default();
        let kms_calls = Family::<OperationLabels, Counter>::default();
        let kms_failures = Counter::default();
        let audit_failures = Counter::default();
        let spool_operations = Family::<OutcomeLabels, Counter>::default();
        let spool_events = Gauge::default();
        let spool_bytes = Gauge::default();

        // Counter names are registered without the `_total` suffix because the encoder appends
        // it, and help texts without a final period because the encoder appends one.
        let mut registry = Registry::default();
        registry.register(
            "callseal_http_requests",
            "HTTP requests answered by the data listener, by route name, method and status code",
            requests.clone(),
        );
        registry.register(
            "callseal_http_request_body_bytes",
            "Plaintext bytes received in HTTP request bodies, by route name",
            request_body_bytes.clone(),
        );
        registry.register(
            "callseal_http_response_body_bytes",
            "Plaintext bytes sent in HTTP response bodies, by route name",
            response_body_bytes.clone(),
        );
        registry.register(
            "callseal_authentication_failures",
            "Stored objects that failed AES-GCM authentication on read, a sign of tampering or \
             corruption",
            authentication_failures.clone(),
        );
        registry.register(
            "callseal_active_streams",
            "Request and response bodies currently being streamed",
            active_streams.clone(),
        );
        registry.register(
            "callseal_connections_rejected",
            "Connections closed before a request was served, by reason",
            connections_rejected.clone(),
        );
        registry.register(
            "callseal_background_tasks",
            "Background work finished, by task (media_download, forward) and outcome (stored, \
             failed, skipped)",
            background_tasks.clone(),
        );
        registry.register(
            "callseal_kms_calls",
            "Calls to AWS KMS, by operation (GenerateDataKey, Decrypt); cached unwraps are not calls",
            kms_calls.clone(),
        );
        registry.register(
            "callseal_kms_failures",
            "KMS calls that failed after the SDK's retries",
            kms_failures.clone(),
        );
        registry.register(
            "callseal_audit_write_failures",
            "Audit records that could not be written; each failed its request with 503",
            audit_failures.clone(),
        );
        registry.register(
            "callseal_webhook_spool_operations",
            "Webhook events the spool took while storage was unreachable, by outcome (spooled, \
             delivered, quarantined, rejected_full, rejected_unwritable)",
            spool_operations.clone(),
        );
        registry.register(
            "callseal_webhook_spool_events",
            "Webhook events waiting in the spool for storage",
            spool_events.clone(),
        );
        registry.register(
            "callseal_webhook_spool_bytes",
            "Bytes of encrypted webhook events waiting in the spool",
            spool_bytes.clone(),
        );

        Arc::new(Metrics {
            registry,
            requests,
            request_body_bytes,
            response_body_bytes,
            authentication_failures,
            active_streams,
            background_tasks,
            kms_calls,
            kms_failures,
            audit_failures,
            connections_rejected,
            spool_operations,
            spool_events,
            spool_bytes,
        })
    }

    /// Counts one request, by the status of its response, in `callseal_http_requests_total`.
    ///
    /// `route` is a fixed route name such as `object`, `webhook`, `list` or `not_found`, never a
    /// request path. A `method` that is not a standard HTTP method is counted as `other`.
    pub fn record_request(&self, route: &'static str, method: &str, status: u16) {
        let labels = RequestLabels {
            route,
            method: method_label(method),
            status,
        };
        self.requests.get_or_create(&labels).inc();
    }

    /// Adds plaintext request body bytes to `callseal_http_request_body_bytes_total`.
    pub fn add_bytes_received(&self, route: &'static str, bytes: u64) {
        self.request_body_bytes
            .get_or_create(&RouteLabels { route })
            .inc_by(bytes);
    }

    /// Adds plaintext response body bytes to `callseal_http_response_body_bytes_total`.
    pub fn add_bytes_sent(&self, route: &'static str, bytes: u64) {
        self.response_body_bytes
            .get_or_create(&RouteLabels { route })
            .inc_by(bytes);
    }

    /// Counts one stored object that failed AES-GCM authentication in
    /// `callseal_authentication_failures_total`.
    pub fn record_tag_failure(&self) {
        self.authentication_failures.inc();
    }

    /// Increments `callseal_active_streams` and returns the guard that decrements it on drop.
    pub fn stream_started(&self) -> StreamGuard {
        self.active_streams.inc();
        StreamGuard {
            active_streams: self.active_streams.clone(),
        }
    }

    /// Counts one rejected connection in `callseal_connections_rejected_total`.
    ///
    /// `reason` is a fixed name such as `limit`, `tls_handshake` or `timeout`.
    pub fn record_connection_rejected(&self, reason: &'static str) {
        self.connections_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts one finished background task: a media download or a downstream forward that
    /// `stored` its result, `failed` after its retries, or was `skipped` as already done.
    pub fn record_background_task(&self, task: &'static str, outcome: &'static str) {
        self.background_tasks
            .get_or_create(&TaskLabels { task, outcome })
            .inc();
    }

    /// Counts one call to KMS.
    pub fn record_kms_call(&self, operation: &'static str) {
        self.kms_calls
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// Returns how many calls of `operation` were made, for tests and the bench command.
    pub fn kms_calls(&self, operation: &'static str) -> u64 {
        self.kms_calls
            .get_or_create(&OperationLabels { operation })
            .get()
    }

    /// Counts one spool operation by its outcome.
    pub fn record_spool(&self, outcome: &'static str) {
        self.spool_operations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Sets the spool's gauges: the events waiting and their bytes.
    pub fn set_spool_size(&self, events: u64, bytes: u64) {
        self.spool_events
            .set(i64::try_from(events).unwrap_or(i64::MAX));
        self.spool_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts one KMS call that failed after retries.
    pub fn record_kms_failure(&self) {
        self.kms_failures.inc();
    }

    /// Counts one audit record that could not be written.
    pub fn record_audit_failure(&self) {
        self.audit_failures.inc();
    }

    /// Encodes every metric in the Prometheus text format, to be served with [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail, and the encoder's only other error is for native
        // histograms, which this registry does not contain.
        prometheus_text::encode(&mut text, &self.registry)
            .expect("encoding into a String is infallible without native histograms");
        text
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.active_streams.dec();
    }
}

/// Maps a request method to its `method` label value, keeping the label set bounded.
fn method_label(method: &str) -> &'static str {
    STANDARD_METHODS
        .into_iter()
        .find(|standard| *standard == method)
        .unwrap_or(OTHER_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the sample lines of `text` (the lines that are not `#` comments).
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|line| !line.starts_with('#')).collect()
    }

    #[test]
    fn encode_has_help_and_type_for_every_metric() {
        let metrics = Metrics::new();
        metrics.record_request("object", "GET", 200);
        metrics.add_bytes_received("object", 1);
        metrics.add_bytes_sent("object", 1);
        metrics.record_connection_rejected("limit");
        metrics.record_spool("spooled");
        let text = metrics.encode();

        for (name, kind) in [
            ("callseal_http_requests_total", "counter"),
            ("callseal_http_request_body_bytes_total", "counter"),
            ("callseal_http_response_body_bytes_total", "counter"),
            ("callseal_authentication_failures_total", "counter"),
            ("callseal_active_streams", "gauge"),
            ("callseal_connections_rejected_total", "counter"),
            ("callseal_webhook_spool_operations_total", "counter"),
            ("callseal_webhook_spool_events", "gauge"),
            ("callseal_webhook_spool_bytes", "gauge"),
        ] {
            let help = format!("# HELP {name} ");
            assert!(text.contains(&help), "no help text for {name}:\n{text}");
            let type_line = format!("# TYPE {name} {kind}\n");
            assert!(
                text.contains(&type_line),
                "no type line for {name}:\n{text}"
            );
        }
    }

    /// A labelled metric has no series, and the encoder writes nothing for it, until its first
    /// recording.
    #[test]
    fn new_registry_reports_only_unlabelled_metrics() {
        let text = Metrics::new().encode();
        let samples = samples(&text);

        assert_eq!(
            samples,
            [
                "callseal_authentication_failures_total 0",
                "callseal_active_streams 0",
                "callseal_kms_failures_total 0",
                "callseal_audit_write_failures_total 0",
                "callseal_webhook_spool_events 0",
                "callseal_webhook_spool_bytes 0"
            ]
        );
    }

    #[test]
    fn record_request_counts_per_label_set() {
        let metrics = Metrics::new();

        metrics.record_request("object", "GET", 200);
        metrics.record_request("object", "GET", 200);
        metrics.record_request("object", "PUT", 201);
        metrics.record_request("webhook", "POST", 204);
        let text = metrics.encode();
        let samples = samples(&text);

        assert!(
            samples.contains(
                &r#"callseal_http_requests_total{route="object",method="GET",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(
            samples.contains(
                &r#"callseal_http_requests_total{route="object",method="PUT",status="201"} 1"#
            ),
            "{text}"
        );
        assert!(
            samples.contains(
                &r#"callseal_http_requests_total{route="webhook",method="POST",status="204"} 1"#
            ),
            "{text}"
        );
        let request_samples = samples
            .iter()
            .filter(|line| line.starts_with("callseal_http_requests_total"))
            .count();
        assert_eq!(request_samples, 3, "{text}");
    }

    #[test]
    fn record_request_counts_unknown_methods_as_other() {
        let metrics = Metrics::new();

        metrics.record_request("not_found", "BREW", 404);
        metrics.record_request("not_found", "get", 404);
        metrics.record_request("not_found", "PROPFIND", 404);
        let text = metrics.encode();
        let samples = samples(&text);

        assert!(
            samples.contains(
                &r#"callseal_http_requests_total{route="not_found",method="other",status="404"} 3"#
            ),
            "{text}"
        );
        assert!(!text.contains("BREW"), "{text}");
        assert!(!text.contains("PROPFIND"), "{text}");
    }

    #[test]
    fn method_label_keeps_every_standard_method() {
        for method in STANDARD_METHODS {
            assert_eq!(method_label(method), method);
        }
        assert_eq!(method_label(""), OTHER_METHOD);
        assert_eq!(method_label("GET "), OTHER_METHOD);
    }

    #[test]
    fn body_bytes_add_up_per_route() {
        let metrics = Metrics::new();

        metrics.add_bytes_received("object", 65_536);
        metrics.add_bytes_received("object", 1);
        metrics.add_bytes_received("webhook", 0);
        metrics.add_bytes_sent("object", 10);
        metrics.add_bytes_sent("list", u64::from(u32::MAX) + 1);
        let text = metrics.encode();
        let samples = samples(&text);

        for expected in [
            r#"callseal_http_request_body_bytes_total{route="object"} 65537"#,
            r#"callseal_http_request_body_bytes_total{route="webhook"} 0"#,
            r#"callseal_http_response_body_bytes_total{route="object"} 10"#,
            r#"callseal_http_response_body_bytes_total{route="list"} 4294967296"#,
        ] {
            assert!(samples.contains(&expected), "missing {expected}:\n{text}");
        }
        assert!(
            !samples.contains(&r#"callseal_http_response_body_bytes_total{route="webhook"} 0"#),
            "received bytes leaked into the sent counter:\n{text}"
        );
    }

    #[test]
    fn record_tag_failure_increments_counter() {
        let metrics = Metrics::new();

        metrics.record_tag_failure();
        metrics.record_tag_failure();
        let text = metrics.encode();

        assert!(
            samples(&text).contains(&"callseal_authentication_failures_total 2"),
            "{text}"
        );
    }

    #[test]
    fn record_connection_rejected_counts_per_reason() {
        let metrics = Metrics::new();

        metrics.record_connection_rejected("limit");
        metrics.record_connection_rejected("tls_handshake");
        metrics.record_connection_rejected("tls_handshake");
        metrics.record_connection_rejected("timeout");
        let text = metrics.encode();
        let samples = samples(&text);

        for expected in [
            r#"callseal_connections_rejected_total{reason="limit"} 1"#,
            r#"callseal_connections_rejected_total{reason="tls_handshake"} 2"#,
            r#"callseal_connections_rejected_total{reason="timeout"} 1"#,
        ] {
            assert!(samples.contains(&expected), "missing {expected}:\n{text}");
        }
    }

    #[test]
    fn stream_guard_decrements_gauge_on_drop() {
        let metrics = Metrics::new();

        let first = metrics.stream_started();
        let second = metrics.stream_started();
        assert!(
            samples(&metrics.encode()).contains(&"callseal_active_streams 2"),
            "gauge did not count two guards"
        );

        drop(first);
        assert!(
            samples(&metrics.encode()).contains(&"callseal_active_streams 1"),
            "gauge did not go down when the first guard dropped"
        );

        drop(second);
        assert!(
            samples(&metrics.encode()).contains(&"callseal_active_streams 0"),
            "gauge did not return to zero"
        );
    }

    #[test]
    fn concurrent_recording_loses_no_updates() {
        const THREADS: u64 = 8;
        const ROUNDS: u64 = 1_000;
        let metrics = Metrics::new();
        let all_started = Arc::new(std::sync::Barrier::new(THREADS as usize + 1));
        let release = Arc::new(std::sync::Barrier::new(THREADS as usize + 1));

        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let metrics = Arc::clone(&metrics);
                let all_started = Arc::clone(&all_started);
                let release = Arc::clone(&release);
                std::thread::spawn(move || {
                    let long_lived_guard = metrics.stream_started();
                    for _ in 0..ROUNDS {
                        let _guard = metrics.stream_started();
                        metrics.record_request("object", "GET", 200);
                        metrics.add_bytes_sent("object", 3);
                        metrics.record_tag_failure();
                    }
                    all_started.wait();
                    release.wait();
                    drop(long_lived_guard);
                })
            })
            .collect();

        // Every worker now holds exactly one guard.
        all_started.wait();
        let text = metrics.encode();
        assert!(
            samples(&text).contains(&format!("callseal_active_streams {THREADS}").as_str()),
            "{text}"
        );

        release.wait();
        for worker in workers {
            worker.join().expect("worker thread panicked");
        }
        let text = metrics.encode();
        let samples = samples(&text);

        assert!(samples.contains(&"callseal_active_streams 0"), "{text}");
        let requests = format!(
            r#"callseal_http_requests_total{{route="object",method="GET",status="200"}} {}"#,
            THREADS * ROUNDS
        );
        assert!(samples.contains(&requests.as_str()), "{text}");
        let bytes = format!(
            r#"callseal_http_response_body_bytes_total{{route="object"}} {}"#,
            THREADS * ROUNDS * 3
        );
        assert!(samples.contains(&bytes.as_str()), "{text}");
        let failures = format!(
            "callseal_authentication_failures_total {}",
            THREADS * ROUNDS
        );
        assert!(samples.contains(&failures.as_str()), "{text}");
    }

    #[test]
    fn stream_guard_drops_on_other_thread() {
        let metrics = Metrics::new();
        let guard = metrics.stream_started();

        std::thread::spawn(move || drop(guard))
            .join()
            .expect("thread dropping the guard panicked");

        assert!(samples(&metrics.encode()).contains(&"callseal_active_streams 0"));
    }
}
