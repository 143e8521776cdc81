//! Routes of the data listener and the request lifecycle: authenticate → parse ids → authorize →
//! stream → commit, with one log line per request at the end.
//!
//! | route | |
//! |---|---|
//! | `PUT /v1/practices/{practice}/calls/{call}/{artifact}` | create-only streamed upload, encrypted on the fly |
//! | `GET` (with an optional `Range`) and `HEAD` on the same path | streamed, verified read; length |
//!
//! Memory per request does not grow with the object. An upload buffers at most: hyper's read
//! buffer (`limits.max_header_bytes`, at least 8 KiB) or the h2 stream window (hyper's default,
//! 1 MiB), one partial frame in the encryptor (F), the encrypted output gathered until it
//! reaches [`FLUSH_BYTES`] (plus one frame of F + 32), and storage's upload buffer
//! ([`crate::storage::MAX_UPLOAD_BUFFER`]). A read holds one storage chunk
//! ([`crate::storage::READ_CHUNK_SIZE`]), one partial frame (F + 40) and the plaintext of one chunk.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tracing::{Instrument, error, info, info_span, warn};

use super::error::ApiError;
use super::range::{self, RangeRequest};
use super::{AppState, ResponseBody, full_body};
use crate::auth::{Action, Principal};
use crate::envelope::{
    self, Decryptor, EncryptionContext, Encryptor, Layout, MAX_HEADER_LEN, ParsedHeader,
};
use crate::ids::{ArtifactName, CallId, ObjectId, PracticeId};
use crate::keys::DataKey;

/// Encrypted bytes gathered before they are handed to storage.
pub const FLUSH_BYTES: usize = 256 * 1024;
/// Concurrent h2 streams per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Bytes read for a header at first; a header that is longer is read again whole.
const HEADER_PROBE_LEN: u64 = 4096;

/// Facts about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: std::net::SocketAddr,
    pub tls_version: &'static str,
}

/// The route a request matched. Its name labels metrics and logs in place of the raw path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Object,
    Webhook,
    NotFound,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Object => "object",
            Route::Webhook => "webhook",
            Route::NotFound => "not_found",
        }
    }
}

/// Serves one request. The result is always `Ok`, because every error becomes a response.
pub async fn handle(
    state: Arc<AppState>,
    connection: Connection,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, std::convert::Infallible> {
    let started = Instant::now();
    let request_id = new_request_id();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let (route, object) = match_route(&path);
    let span = info_span!(
        "request",
        %request_id,
        method = %method,
        route = route.name(),
        practice = tracing::field::Empty,
        call = tracing::field::Empty,
        artifact = tracing::field::Empty,
    );

    let result = async {
        match (route, object) {
            (Route::Webhook, Some([practice, _, _])) => {
                if request.method() != Method::POST {
                    return Err(ApiError::MethodNotAllowed { allow: "POST" });
                }
                crate::webhook::handle_retell(&state, request, practice).await
            }
            (Route::Object, Some(segments)) => {
                object_route(&state, &connection, request, segments).await
            }
            _ => Err(ApiError::NotFound),
        }
    }
    .instrument(span.clone())
    .await;

    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            let status = error.status();
            span.in_scope(|| match &error {
                ApiError::Internal(detail) => error!(%status, detail, "request failed"),
                ApiError::StoredObjectInvalid | ApiError::StoredObjectMisplaced => {
                    state.metrics.record_tag_failure();
                    error!(%status, error = %error, "stored object rejected")
                }
                error if status.is_server_error() => {
                    error!(%status, error = %error, "request failed")
                }
                error => info!(%status, error = %error, "request rejected"),
            });
            error.into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    // hyper leaves out a HEAD response's body on HTTP/1.1 but sends it as DATA frames on h2,
    // where RFC 9110 forbids content and clients reset the stream (error responses have bodies).
    if method == Method::HEAD {
        *response.body_mut() = full_body(Bytes::new());
    }
    let status = response.status();
    state
        .metrics
        .record_request(route.name(), method.as_str(), status.as_u16());
    span.in_scope(|| {
        info!(
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request headers sent"
        )
    });
    Ok(response)
}

/// Splits `/v1/practices/{practice}/calls/{call}/{artifact}` into its three raw segments.
fn match_route(path: &str) -> (Route, Option<[&str; 3]>) {
    if let Some(practice) = path.strip_prefix("/v1/webhooks/retell/") {
        if practice.is_empty() || practice.contains('/') {
            return (Route::NotFound, None);
        }
        return (Route::Webhook, Some([practice, "", ""]));
    }
    let mut parts = path
        .strip_prefix("/v1/practices/")
        .map(|rest| rest.split('/'));
    let Some(parts) = parts.as_mut() else {
        return (Route::NotFound, None);
    };
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(practice), Some("calls"), Some(call), Some(artifact), None) => {
            (Route::Object, Some([practice, call, artifact]))
        }
        _ => (Route::NotFound, None),
    }
}

async fn object_route(
    state: &AppState,
    connection: &Connection,
    request: Request<Incoming>,
    [practice, call, artifact]: [&str; 3],
) -> Result<Response<ResponseBody>, ApiError> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let principal = state.auth.authenticate(authorization)?.clone();

    let id = ObjectId::new(
        PracticeId::new(practice)?,
        CallId::new(call)?,
        ArtifactName::new(artifact)?,
    );
    let span = tracing::Span::current();
    span.record("practice", id.practice.as_str());
    span.record("call", id.call.as_str());
    span.record("artifact", id.artifact.as_str());

    let action = match *request.method() {
        Method::PUT => Action::Upload,
        Method::GET | Method::HEAD => Action::Read,
        _ => {
            return Err(ApiError::MethodNotAllowed {
                allow: "GET, HEAD, PUT",
            });
        }
    };
    state.auth.authorize(&principal, action, &id.practice)?;
    tracing::debug!(principal = %principal.name, client = %connection.peer, tls = connection.tls_version, "authorized");

    match action {
        Action::Upload => put_object(state, &principal, request, &id).await,
        Action::Read => {
            let head_only = request.method() == Method::HEAD;
            get_object(state, request.headers(), &id, head_only).await
        }
    }
}

/// Streams a request body through the encryptor into a new object, committed only when the body
/// ended cleanly and the final frame is written.
async fn put_object(
    state: &AppState,
    principal: &Principal,
    request: Request<Incoming>,
    id: &ObjectId,
) -> Result<Response<ResponseBody>, ApiError> {
    let limit = state.config.limits.max_upload_bytes;
    if let Some(length) = content_length(request.headers())?
        && length > limit
    {
        return Err(ApiError::TooLarge { limit });
    }
    if state.storage.exists(id).await? {
        return Err(ApiError::AlreadyExists);
    }

    let keys = state.keys.get(&id.practice).ok_or(ApiError::Forbidden)?;
    let context = EncryptionContext::for_object(id);
    let (data_key, edk) = keys.generate_data_key(&context).await?;
    let frame_length = state.config.envelope.frame_length;
    let mut encryptor = Encryptor::new(&data_key, vec![edk], context, frame_length)?;
    drop(data_key);

    let _stream = state.metrics.stream_started();
    let mut upload = state.storage.start_upload(id).await?;
    upload
        .write(Bytes::copy_from_slice(encryptor.header()))
        .await?;

    let mut body = request.into_body();
    let mut out = BytesMut::with_capacity(FLUSH_BYTES + frame_length as usize + 64);
    let mut received = 0u64;
    // On any early return below, `upload` is dropped uncommitted, which aborts it.
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ApiError::ClientBody)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if received > limit {
            return Err(ApiError::TooLarge { limit });
        }
        encryptor.update(&data, &mut out)?;
        if out.len() >= FLUSH_BYTES {
            upload.write(out.split().freeze()).await?;
        }
    }
    encryptor.finish(&mut out);
    upload.write(out.split().freeze()).await?;
    let stored = upload.commit().await?;
    state.metrics.add_bytes_received("object", received);
    info!(principal = %principal.name, plaintext_bytes = received, stored_bytes = stored, "object stored");

    let body = serde_json::json!({ "plaintext_bytes": received, "stored_bytes": stored });
    let mut response = Response::new(full_body(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::CREATED;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// An object whose header, context, data key and final frame have been verified.
struct VerifiedObject {
    /// The object read: the requested one, or the current version it resolved to.
    id: ObjectId,
    parsed: ParsedHeader,
    data_key: DataKey,
    layout: Layout,
}

/// Reads and verifies everything about a stored object except the frames a read will stream:
/// header, expected encryption context, data key, header tag and, through the final frame, its
/// length.
async fn open_object(state: &AppState, requested: &ObjectId) -> Result<VerifiedObject, ApiError> {
    let (id, size) = match state.storage.head(requested).await? {
        Some(size) => (requested.clone(), size),
        None => {
            // `event-call_ended.json` and the like name the latest of their stored versions.
            let current = crate::webhook::current_version(&state.storage, requested)
                .await?
                .ok_or(ApiError::NotFound)?;
            let size = state
                .storage
                .head(&current)
                .await?
                .ok_or(ApiError::NotFound)?;
            (current, size)
        }
    };
    let id = &id;

    let mut prefix = state
        .storage
        .get_range(id, 0..size.min(HEADER_PROBE_LEN))
        .await?;
    let mut parsed = ParsedHeader::parse(&prefix)?;
    if parsed.is_none() && size > HEADER_PROBE_LEN {
        prefix = state
            .storage
            .get_range(id, 0..size.min(MAX_HEADER_LEN as u64))
            .await?;
        parsed = ParsedHeader::parse(&prefix)?;
    }
    let parsed = parsed.ok_or(ApiError::StoredObjectInvalid)?;

    envelope::check_context(&parsed.header, &EncryptionContext::for_object(id))?;
    let keys = state.keys.get(&id.practice).ok_or(ApiError::Forbidden)?;
    let data_key = keys
        .unwrap(&parsed.header.edks, &parsed.header.context)
        .await?;

    let layout = Layout::new(&parsed, size)?;
    let final_plan = layout.final_frame_plan();
    let final_frame = state
        .storage
        .get_range(id, final_plan.ciphertext.clone())
        .await?;
    let mut decryptor = Decryptor::for_range(&parsed, &data_key, &final_plan)?;
    decryptor.update(&final_frame, &mut BytesMut::new())?;
    decryptor.finish()?;

    Ok(VerifiedObject {
        id: id.clone(),
        parsed,
        data_key,
        layout,
    })
}

/// Reads and verifies a whole object into memory: for small internal objects such as job
/// records, never for media.
pub async fn read_object(
    state: &AppState,
    id: &ObjectId,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
    let object = open_object(state, id).await?;
    let body = object.parsed.len() as u64..object.layout.object_size();
    let ciphertext = state.storage.get_range(&object.id, body).await?;
    let mut decryptor = Decryptor::new(&object.parsed, &object.data_key)?;
    let mut plaintext = BytesMut::new();
    decryptor.update(&ciphertext, &mut plaintext)?;
    decryptor.finish()?;
    Ok(zeroize::Zeroizing::new(plaintext.to_vec()))
}

async fn get_object(
    state: &AppState,
    headers: &HeaderMap,
    id: &ObjectId,
    head_only: bool,
) -> Result<Response<ResponseBody>, ApiError> {
    let object = open_object(state, id).await?;
    let length = object.layout.plaintext_len();

    let range_header = headers.get(header::RANGE).map(HeaderValue::as_bytes);
    let (status, range) = match range::parse(range_header, length) {
        RangeRequest::Whole => (StatusCode::OK, 0..length),
        RangeRequest::Partial(range) => (StatusCode::PARTIAL_CONTENT, range),
        RangeRequest::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable { length }),
    };

    let mut response = Response::new(full_body(Bytes::new()));
    *response.status_mut() = status;
    let response_headers = response.headers_mut();
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(range.end - range.start),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {}-{}/{length}", range.start, range.end - 1);
        response_headers.insert(header::CONTENT_RANGE, header_value(&value)?);
    }
    if head_only || range.is_empty() {
        return Ok(response);
    }

    *response.body_mut() = stream_plaintext(state, object, range).await?;
    Ok(response)
}

/// Streams the plaintext `range` of a verified object, decrypting only the frames that cover it.
/// A frame that fails authentication ends the body with an error, so the client sees a broken
/// transfer rather than a clean end.
async fn stream_plaintext(
    state: &AppState,
    object: VerifiedObject,
    range: std::ops::Range<u64>,
) -> Result<ResponseBody, ApiError> {
    let plan = object.layout.plan(range)?;
    let decryptor = Decryptor::for_range(&object.parsed, &object.data_key, &plan)?;
    let id = object.id;
    let ciphertext = state
        .storage
        .get_range_stream(&id, plan.ciphertext.clone())
        .await?;

    let metrics = Arc::clone(&state.metrics);
    let guard = metrics.stream_started();
    let span = tracing::Span::current();
    let state = StreamState {
        ciphertext,
        decryptor,
        out: BytesMut::new(),
        finished: false,
    };
    let frames = futures::stream::try_unfold(state, move |mut state| {
        let metrics = Arc::clone(&metrics);
        async move {
            let chunk = state.next_plaintext().await.inspect_err(|error| {
                if matches!(error, envelope::Error::Authentication) {
                    metrics.record_tag_failure();
                }
                error!(error = %error, "aborting response: stored object failed verification midway");
            })?;
            Ok::<_, envelope::Error>(chunk.map(|chunk| {
                metrics.add_bytes_sent("object", chunk.len() as u64);
                (Frame::data(chunk), state)
            }))
        }
        .instrument(span.clone())
    })
    .map_ok(move |frame| {
        let _ = &guard;
        frame
    })
    .map_err(|error: envelope::Error| Box::new(error) as Box<dyn std::error::Error + Send + Sync>);
    Ok(BodyExt::boxed_unsync(StreamBody::new(frames)))
}

/// The state of a streamed read: ciphertext chunks in, verified plaintext chunks out.
struct StreamState {
    ciphertext: futures::stream::BoxStream<'static, crate::storage::Result<Bytes>>,
    decryptor: Decryptor,
    out: BytesMut,
    finished: bool,
}

impl StreamState {
    /// Returns the next non-empty plaintext chunk, `None` at a verified end, or the error that
    /// must abort the response.
    async fn next_plaintext(&mut self) -> Result<Option<Bytes>, envelope::Error> {
        while !self.finished {
            match self.ciphertext.next().await {
                Some(Ok(chunk)) => self.decryptor.update(&chunk, &mut self.out)?,
                Some(Err(error)) => {
                    warn!(error = %error, "storage read failed midway");
                    return Err(envelope::Error::Truncated);
                }
                None => {
                    self.decryptor.finish()?;
                    self.finished = true;
                }
            }
            if !self.out.is_empty() {
                return Ok(Some(self.out.split().freeze()));
            }
        }
        Ok(None)
    }
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    let length = value
        .to_str()
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?;
    Ok(Some(length))
}

fn header_value(text: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(text)
        .map_err(|_| ApiError::Internal(format!("invalid header value {text:?}")))
}

/// Generates a random request id: 16 hex digits, returned as `x-request-id` and logged.
fn new_request_id() -> String {
    let mut bytes = [0u8; 8];
    // A failed draw leaves zeros: the id only correlates logs, it protects nothing.
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_match() {
        let (route, segments) = match_route("/v1/practices/p1/calls/c1/recording.wav");
        assert_eq!(route, Route::Object);
        assert_eq!(segments, Some(["p1", "c1", "recording.wav"]));
    }

    #[test]
    fn other_paths_do_not_match() {
        for path in [
            "/",
            "/v1/practices/p1",
            "/v1/practices/p1/calls/c1",
            "/v1/practices/p1/calls/c1/a/extra",
            "/v1/practices/p1/other/c1/a",
            "/v2/practices/p1/calls/c1/a",
        ] {
            assert_eq!(match_route(path).0, Route::NotFound, "{path}");
        }
    }
}
