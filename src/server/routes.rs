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
//! ([`crate::storage::Storage::max_upload_buffer`]). That buffer is 768 KiB on the local
//! filesystem and in memory and 15 MiB on S3. A read holds one storage chunk
//! ([`crate::storage::READ_CHUNK_SIZE`]), one partial frame (F + 40) and the plaintext of one chunk.

use std::pin::Pin;
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
use super::trail::{StreamCompletion, Trail};
use super::{AppState, ResponseBody, full_body};
use crate::audit::{Action, RequestId, TlsVersion};
use crate::auth::{CertificateNames, Principal};
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
    pub tls_version: TlsVersion,
    /// Names of the verified client certificate, if the client sent one.
    pub certificate: Option<CertificateNames>,
}

/// The route a request matched. Its name labels metrics and logs in place of the raw path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Object,
    List,
    Audit,
    Webhook,
    NotFound,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Object => "object",
            Route::List => "list",
            Route::Audit => "audit",
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
    let audit_request_id =
        RequestId::new(request_id.clone()).expect("hex request ids follow the id grammar");
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
                crate::webhook::handle_retell(
                    &state,
                    &connection,
                    &audit_request_id,
                    request,
                    practice,
                )
                .await
            }
            (Route::Object, Some(segments)) => {
                object_route(&state, &connection, &audit_request_id, request, segments).await
            }
            (Route::List, Some([practice, call, _])) => {
                list_route(
                    &state,
                    &connection,
                    &audit_request_id,
                    request,
                    practice,
                    call,
                )
                .await
            }
            (Route::Audit, _) => audit_route(&state, &connection, &audit_request_id, request).await,
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
    if path == "/v1/audit" {
        return (Route::Audit, None);
    }
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
        (Some(practice), Some("calls"), Some(call), None, None) => {
            (Route::List, Some([practice, call, ""]))
        }
        _ => (Route::NotFound, None),
    }
}

async fn object_route(
    state: &AppState,
    connection: &Connection,
    request_id: &RequestId,
    request: Request<Incoming>,
    [practice, call, artifact]: [&str; 3],
) -> Result<Response<ResponseBody>, ApiError> {
    let action = match *request.method() {
        Method::PUT => Action::ObjectPut,
        Method::GET => Action::ObjectGet,
        Method::HEAD => Action::ObjectHead,
        Method::DELETE => Action::ObjectDelete,
        _ => {
            return Err(ApiError::MethodNotAllowed {
                allow: "GET, HEAD, PUT, DELETE",
            });
        }
    };
    let id = ObjectId::new(
        PracticeId::new(practice)?,
        CallId::new(call)?,
        ArtifactName::new(artifact)?,
    );
    let span = tracing::Span::current();
    span.record("practice", id.practice.as_str());
    span.record("call", id.call.as_str());
    span.record("artifact", id.artifact.as_str());

    let mut trail = Trail::new(
        Arc::clone(&state.audit),
        request_id,
        action,
        id.practice.clone(),
        Some(id.call.clone()),
        Some(id.artifact.clone()),
        connection.peer,
        connection.tls_version,
    );
    let principal = authorize(
        state,
        connection,
        request.headers(),
        action,
        &id.practice,
        &mut trail,
    )
    .await?;

    match action {
        Action::ObjectPut => {
            let result = put_object(state, &principal, request, &id).await;
            complete(&trail, result).await
        }
        Action::ObjectDelete => {
            let result = delete_object(state, &principal, &id).await;
            complete(&trail, result).await
        }
        _ => {
            get_object(
                state,
                request.headers(),
                &id,
                action == Action::ObjectHead,
                trail,
            )
            .await
        }
    }
}

/// Authenticates and authorizes a request and writes the authorization record; a denial is
/// recorded and returned as the error.
async fn authorize(
    state: &AppState,
    connection: &Connection,
    headers: &HeaderMap,
    action: Action,
    practice: &PracticeId,
    trail: &mut Trail,
) -> Result<Principal, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let authenticated = state
        .auth
        .authenticate(authorization, connection.certificate.as_ref());
    // A 403 record names the principal that was refused; only a 401 record has none.
    if let Ok(principal) = authenticated {
        trail.identify(principal);
    }
    let decision = authenticated.and_then(|principal| {
        state
            .auth
            .authorize(principal, action, practice)
            .map(|()| principal)
    });
    let principal = decision.clone().ok().cloned();
    trail.authorize(decision).await?;
    let principal = principal.ok_or(ApiError::Forbidden)?;
    tracing::debug!(principal = %principal.name, role = principal.role.as_str(), client = %connection.peer, "authorized");
    Ok(principal)
}

/// Writes the completion record of a response sent in one piece; `result` carries the plaintext
/// bytes the request moved.
async fn complete(
    trail: &Trail,
    result: Result<(Response<ResponseBody>, u64), ApiError>,
) -> Result<Response<ResponseBody>, ApiError> {
    match result {
        Ok((response, bytes)) => {
            trail
                .complete(response.status().as_u16(), bytes, None)
                .await?;
            Ok(response)
        }
        Err(error) => {
            trail
                .complete(error.status().as_u16(), 0, Some(&error))
                .await?;
            Err(error)
        }
    }
}

/// `DELETE`: removes an object (admin only).
async fn delete_object(
    state: &AppState,
    principal: &Principal,
    id: &ObjectId,
) -> Result<(Response<ResponseBody>, u64), ApiError> {
    if !state.storage.exists(id).await? {
        return Err(ApiError::NotFound);
    }
    state.storage.delete(id).await?;
    info!(principal = %principal.name, "object deleted");
    let mut response = Response::new(full_body(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok((response, 0))
}

/// `GET /v1/practices/{practice}/calls/{call}`: the call's artifacts with their plaintext sizes.
async fn list_route(
    state: &AppState,
    connection: &Connection,
    request_id: &RequestId,
    request: Request<Incoming>,
    practice: &str,
    call: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    if request.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed { allow: "GET" });
    }
    let practice = PracticeId::new(practice)?;
    let call = CallId::new(call)?;
    tracing::Span::current().record("practice", practice.as_str());
    let mut trail = Trail::new(
        Arc::clone(&state.audit),
        request_id,
        Action::CallList,
        practice.clone(),
        Some(call.clone()),
        None,
        connection.peer,
        connection.tls_version,
    );
    authorize(
        state,
        connection,
        request.headers(),
        Action::CallList,
        &practice,
        &mut trail,
    )
    .await?;
    let result = list_call(state, &practice, &call).await;
    complete(&trail, result).await
}

/// Lists a call's artifacts. The plaintext size of each is what its header and stored size
/// imply; `HEAD` on the artifact authenticates it.
async fn list_call(
    state: &AppState,
    practice: &PracticeId,
    call: &CallId,
) -> Result<(Response<ResponseBody>, u64), ApiError> {
    let mut artifacts = Vec::new();
    for (artifact, stored_bytes) in state.storage.list_call(practice, call).await? {
        // Jobs are the gateway's own work items, not call data.
        let name = artifact.as_str();
        if name.starts_with(crate::webhook::media::JOB_PREFIX)
            || name.starts_with(crate::webhook::forward::JOB_PREFIX)
        {
            continue;
        }
        let id = ObjectId::new(practice.clone(), call.clone(), artifact.clone());
        let prefix = state
            .storage
            .get_range(&id, 0..stored_bytes.min(MAX_HEADER_LEN as u64))
            .await?;
        let plaintext_bytes = ParsedHeader::parse(&prefix)
            .ok()
            .flatten()
            .and_then(|parsed| Layout::new(&parsed, stored_bytes).ok())
            .map(|layout| layout.plaintext_len());
        artifacts.push(serde_json::json!({
            "artifact": artifact.as_str(),
            "plaintext_bytes": plaintext_bytes,
            "stored_bytes": stored_bytes,
        }));
    }
    if artifacts.is_empty() {
        return Err(ApiError::NotFound);
    }
    let body = serde_json::json!({ "practice": practice.as_str(), "call": call.as_str(), "artifacts": artifacts });
    Ok((json_response(StatusCode::OK, &body), 0))
}

/// `GET /v1/audit?practice=P[&call=C][&principal=X][&since=T][&until=T][&limit=N]`: who
/// accessed what, for the auditor role. Times are RFC 3339.
async fn audit_route(
    state: &AppState,
    connection: &Connection,
    request_id: &RequestId,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    if request.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed { allow: "GET" });
    }
    let query = request.uri().query().unwrap_or("");

    let mut parameters: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        parameters.push((key.to_owned(), percent_decode(value)?));
    }
    let practice = parameters
        .iter()
        .find(|(key, _)| key == "practice")
        .map(|(_, value)| PracticeId::new(value.as_str()))
        .transpose()?
        .ok_or_else(|| ApiError::BadRequest("missing query parameter `practice`".into()))?;
    let mut trail = Trail::new(
        Arc::clone(&state.audit),
        request_id,
        Action::AuditQuery,
        practice.clone(),
        None,
        None,
        connection.peer,
        connection.tls_version,
    );
    authorize(
        state,
        connection,
        request.headers(),
        Action::AuditQuery,
        &practice,
        &mut trail,
    )
    .await?;

    let result = async {
        let mut built = crate::audit::Filter::practice(practice.clone());
        built.limit = Some(10_000);
        for (key, value) in &parameters {
            match key.as_str() {
                "practice" => {}
                "call" => built.call = Some(CallId::new(value.as_str())?),
                "principal" => {
                    built.principal = Some(
                        crate::audit::PrincipalName::new(value.as_str())
                            .map_err(|error| ApiError::BadRequest(error.to_string()))?,
                    )
                }
                "since" => built.since = Some(parse_time(value)?),
                "until" => built.until = Some(parse_time(value)?),
                "limit" => {
                    built.limit = Some(
                        value
                            .parse()
                            .map_err(|_| ApiError::BadRequest("invalid `limit`".into()))?,
                    )
                }
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter `{other}`"
                    )));
                }
            }
        }

        let directory = state.audit.dir().to_owned();
        let records = tokio::task::spawn_blocking(move || crate::audit::query(&directory, &built))
            .await
            .map_err(|error| ApiError::Internal(error.to_string()))?
            .map_err(|error| ApiError::Internal(error.to_string()))?;
        let body = serde_json::to_value(&records)
            .map_err(|error| ApiError::Internal(error.to_string()))?;
        Ok((json_response(StatusCode::OK, &body), 0))
    }
    .await;
    complete(&trail, result).await
}

fn parse_time(value: &str) -> Result<time::OffsetDateTime, ApiError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).map_err(
        |_| {
            ApiError::BadRequest(
                "invalid time: expected RFC 3339, such as 2026-01-31T00:00:00Z".into(),
            )
        },
    )
}

/// Decodes `%XX` escapes and `+` in a query value.
fn percent_decode(value: &str) -> Result<String, ApiError> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = bytes
                    .get(index + 1..index + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest("invalid percent-encoding in the query".into())
                    })?;
                decoded.push(hex);
                index += 3;
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).map_err(|_| ApiError::BadRequest("query is not UTF-8".into()))
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Streams a request body through the encryptor into a new object, committed only when the body
/// ended cleanly and the final frame is written.
async fn put_object(
    state: &AppState,
    principal: &Principal,
    request: Request<Incoming>,
    id: &ObjectId,
) -> Result<(Response<ResponseBody>, u64), ApiError> {
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
    Ok((json_response(StatusCode::CREATED, &body), received))
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

/// `GET` and `HEAD`: verifies the object, then answers whole or by range. A streamed body writes
/// the completion record when it ends; every other outcome writes it here.
async fn get_object(
    state: &AppState,
    headers: &HeaderMap,
    id: &ObjectId,
    head_only: bool,
    mut trail: Trail,
) -> Result<Response<ResponseBody>, ApiError> {
    let prepared = prepare_read(state, headers, id, head_only).await;
    let (response, range, body) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            trail
                .complete(error.status().as_u16(), 0, Some(&error))
                .await?;
            return Err(error);
        }
    };
    trail.set_range(&range);
    let status = response.status().as_u16();
    let Some((decryptor, ciphertext)) = body else {
        trail.complete(status, 0, None).await?;
        return Ok(response);
    };
    let mut response = response;
    *response.body_mut() = plaintext_body(
        state,
        decryptor,
        ciphertext,
        trail.stream_completion(status),
    );
    Ok(response)
}

/// The decryptor and ciphertext stream of a read that has a body.
type ReadBody = (
    Decryptor,
    futures::stream::BoxStream<'static, crate::storage::Result<Bytes>>,
);

/// Verifies the object and plans the response: its headers, the plaintext range, and the
/// decryptor and ciphertext stream when there is a body to send.
async fn prepare_read(
    state: &AppState,
    headers: &HeaderMap,
    id: &ObjectId,
    head_only: bool,
) -> Result<
    (
        Response<ResponseBody>,
        std::ops::Range<u64>,
        Option<ReadBody>,
    ),
    ApiError,
> {
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
        return Ok((response, range, None));
    }

    let plan = object.layout.plan(range.clone())?;
    let decryptor = Decryptor::for_range(&object.parsed, &object.data_key, &plan)?;
    let ciphertext = state
        .storage
        .get_range_stream(&object.id, plan.ciphertext.clone())
        .await?;
    Ok((response, range, Some((decryptor, ciphertext))))
}

/// Streams the plaintext of a planned read, decrypting only the frames that cover it. A frame
/// that fails authentication ends the body with an error, so the client sees a broken transfer
/// rather than a clean end. `completion` writes the audit record when the stream ends.
fn plaintext_body(
    state: &AppState,
    decryptor: Decryptor,
    ciphertext: futures::stream::BoxStream<'static, crate::storage::Result<Bytes>>,
    completion: StreamCompletion,
) -> ResponseBody {
    let metrics = Arc::clone(&state.metrics);
    let guard = metrics.stream_started();
    let span = tracing::Span::current();
    let state = StreamState {
        ciphertext: ciphertext.peekable(),
        decryptor,
        out: BytesMut::new(),
        finished: false,
        completion,
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
                state.completion.sent(chunk.len() as u64);
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
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

/// The state of a streamed read: ciphertext chunks in, verified plaintext chunks out.
struct StreamState {
    ciphertext: futures::stream::Peekable<
        futures::stream::BoxStream<'static, crate::storage::Result<Bytes>>,
    >,
    decryptor: Decryptor,
    out: BytesMut,
    finished: bool,
    completion: StreamCompletion,
}

impl StreamState {
    /// Returns the next non-empty plaintext chunk, `None` at a verified end, or the error that
    /// must abort the response.
    async fn next_plaintext(&mut self) -> Result<Option<Bytes>, envelope::Error> {
        while !self.finished {
            match self.ciphertext.next().await {
                Some(Ok(chunk)) => {
                    self.decryptor.update(&chunk, &mut self.out)?;
                    // hyper stops polling a body once Content-Length bytes are written, so the
                    // verified end is detected before the last plaintext is handed over.
                    if Pin::new(&mut self.ciphertext).peek().await.is_none() {
                        self.decryptor.finish()?;
                        self.finished = true;
                        self.completion.finish();
                    }
                }
                Some(Err(error)) => {
                    warn!(error = %error, "storage read failed midway");
                    return Err(envelope::Error::Truncated);
                }
                None => {
                    self.decryptor.finish()?;
                    self.finished = true;
                    self.completion.finish();
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
    fn call_and_audit_paths_match() {
        assert_eq!(
            match_route("/v1/practices/p1/calls/c1"),
            (Route::List, Some(["p1", "c1", ""]))
        );
        assert_eq!(match_route("/v1/audit").0, Route::Audit);
        assert_eq!(match_route("/v1/webhooks/retell/p1").0, Route::Webhook);
    }

    #[test]
    fn other_paths_do_not_match() {
        for path in [
            "/",
            "/v1/practices/p1",
            "/v1/practices/p1/calls",
            "/v1/practices/p1/calls/c1/a/extra",
            "/v1/practices/p1/other/c1/a",
            "/v2/practices/p1/calls/c1/a",
        ] {
            assert_eq!(match_route(path).0, Route::NotFound, "{path}");
        }
    }
}
