//! Access control and the audit log over real HTTPS.
//!
//! The tests cover which role may use which route on which practice, the records each request
//! leaves, `callseal audit verify`, failing closed when the audit log cannot be written, one chain
//! under concurrency, no PHI in records, and client certificates.

mod common;

use std::fs;
use std::process::Command;

use http::{Method, StatusCode, header};

use callseal::audit::{Action, ByteRange, Kind, Outcome, PublicKey, Record, Role, TlsVersion};
use common::access::{
    AccessGateway, AccessSettings, TestCa, handshake_error, random_hex, read_records, records_of,
    request_to, segment_files, send_from_known_address, wait_for_records,
};
use common::gateway::{
    Client, OTHER_PRACTICE, PRACTICE, Protocol, Reply, empty_body, full_body, object_url,
    pattern_bytes,
};
use common::retell::{self, FIXTURE_CALL_ID};

const CALL: &str = "call-access";
const RECORDING: &str = "recording.wav";
const RECORDING_LEN: u64 = 300_000;
const RECORDING_SEED: u64 = 41;

/// Routes of the data listener that reach call data or the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    PutObject,
    GetObject,
    HeadObject,
    DeleteObject,
    ListCall,
    QueryAudit,
}

/// The only role each route grants, and its status on success in the principal's own practice.
/// Every other role, and every role on another practice, gets 403. A missing or unknown token
/// gets 401.
const GRANTS: [(Route, &str, StatusCode); 6] = [
    (Route::PutObject, "ingest", StatusCode::CREATED),
    (Route::GetObject, "reader", StatusCode::OK),
    (Route::HeadObject, "reader", StatusCode::OK),
    (Route::DeleteObject, "admin", StatusCode::NO_CONTENT),
    (Route::ListCall, "reader", StatusCode::OK),
    (Route::QueryAudit, "auditor", StatusCode::OK),
];

/// The credential a matrix request carries.
#[derive(Clone, Copy, Debug)]
enum Credential {
    Role(&'static str),
    Missing,
    Unknown,
}

const CREDENTIALS: [Credential; 6] = [
    Credential::Role("ingest"),
    Credential::Role("reader"),
    Credential::Role("admin"),
    Credential::Role("auditor"),
    Credential::Missing,
    Credential::Unknown,
];

fn principal_name(role: &str) -> String {
    format!("{PRACTICE}-{role}")
}

fn role_of(name: &str) -> Role {
    match name {
        "ingest" => Role::Ingest,
        "reader" => Role::Reader,
        "admin" => Role::Admin,
        "auditor" => Role::Auditor,
        other => panic!("unknown role {other}"),
    }
}

fn recording() -> Vec<u8> {
    pattern_bytes(RECORDING_SEED, 0..RECORDING_LEN)
}

/// Uploads `body` as `{practice}/{CALL}/{artifact}` with that practice's ingest token.
async fn upload(access: &AccessGateway, practice: &str, artifact: &str, body: Vec<u8>) {
    let files = access.files();
    let token = if practice == PRACTICE {
        &files.ingest_token
    } else {
        &files.other_ingest_token
    };
    let reply = client(access)
        .put(
            &object_url(practice, CALL, artifact),
            token,
            full_body(body),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "upload of {practice}/{artifact}"
    );
}

fn client(access: &AccessGateway) -> Client {
    access.gateway.client(Protocol::Http1)
}

fn request_id(reply: &Reply) -> String {
    reply
        .header("x-request-id")
        .unwrap_or_else(|| panic!("{} has no x-request-id", reply.request))
        .to_owned()
}

/// Builds the matrix request of `route` on `practice`.
fn route_request(
    access: &AccessGateway,
    route: Route,
    practice: &str,
    credential: Credential,
) -> http::Request<common::gateway::RequestBody> {
    let (method, path) = match route {
        Route::PutObject => (Method::PUT, object_url(practice, CALL, "matrix-upload.bin")),
        Route::GetObject => (Method::GET, object_url(practice, CALL, RECORDING)),
        Route::HeadObject => (Method::HEAD, object_url(practice, CALL, RECORDING)),
        Route::DeleteObject => (Method::DELETE, object_url(practice, CALL, "doomed.bin")),
        Route::ListCall => (
            Method::GET,
            format!("/v1/practices/{practice}/calls/{CALL}"),
        ),
        Route::QueryAudit => (Method::GET, format!("/v1/audit?practice={practice}")),
    };
    let mut builder = client(access).request(method, &path);
    match credential {
        Credential::Role(role) => {
            builder = builder.header(
                header::AUTHORIZATION,
                format!("Bearer {}", access.token(role)),
            )
        }
        Credential::Missing => {}
        Credential::Unknown => {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {}", random_hex(32)))
        }
    }
    let body = if route == Route::PutObject {
        full_body(b"matrix upload".to_vec())
    } else {
        empty_body()
    };
    builder.body(body).expect("build the matrix request")
}

#[tokio::test]
async fn role_practice_route_matrix() {
    let access = AccessSettings::default().start().await;
    for practice in [PRACTICE, OTHER_PRACTICE] {
        upload(&access, practice, RECORDING, recording()).await;
        upload(&access, practice, "doomed.bin", b"to delete".to_vec()).await;
    }
    let audit_dir = access.audit_dir();

    for (route, granted_role, success) in GRANTS {
        for practice in [PRACTICE, OTHER_PRACTICE] {
            for credential in CREDENTIALS {
                let case = format!("{route:?} on {practice} with {credential:?}");
                let expected = match credential {
                    Credential::Missing | Credential::Unknown => StatusCode::UNAUTHORIZED,
                    Credential::Role(role) if role == granted_role && practice == PRACTICE => {
                        success
                    }
                    Credential::Role(_) => StatusCode::FORBIDDEN,
                };

                let reply = client(&access)
                    .fetch(route_request(&access, route, practice, credential))
                    .await;
                assert_eq!(reply.status, expected, "{case}: {:?}", reply.body);
                let id = request_id(&reply);

                if expected.is_success() {
                    let records = wait_for_records(&audit_dir, |records| {
                        records_of(records, &id)
                            .iter()
                            .any(|record| record.outcome.kind() == Kind::Completion)
                    })
                    .await;
                    let own = records_of(&records, &id);
                    assert_eq!(own.len(), 2, "{case}: authorization and completion");
                    assert_eq!(own[0].outcome, Outcome::Allowed, "{case}");
                    assert_eq!(
                        own[1].outcome.status(),
                        Some(expected.as_u16()),
                        "{case}: completion status"
                    );
                    continue;
                }

                let records = records_of(&read_records(&audit_dir), &id);
                assert_eq!(records.len(), 1, "{case}: one record for a denial");
                let record = &records[0];
                assert_eq!(record.outcome.as_str(), "denied", "{case}");
                assert_eq!(record.access.practice.as_str(), practice, "{case}");
                let reason = if expected == StatusCode::UNAUTHORIZED {
                    "unauthenticated"
                } else {
                    "forbidden"
                };
                assert_eq!(
                    record.outcome.reason().map(|reason| reason.as_str()),
                    Some(reason),
                    "{case}"
                );
                if let Credential::Role(role) = credential {
                    assert_eq!(
                        record.access.principal.as_ref().map(|name| name.as_str()),
                        Some(principal_name(role).as_str()),
                        "{case}: a 403 record names the authenticated principal"
                    );
                    assert_eq!(record.access.role, Some(role_of(role)), "{case}");
                } else {
                    assert_eq!(record.access.principal, None, "{case}");
                }
            }
        }
    }
}

/// Returns the authorization and completion records of one request, waiting for the completion.
async fn request_records(access: &AccessGateway, id: &str) -> (Record, Record) {
    let records = wait_for_records(&access.audit_dir(), |records| {
        records_of(records, id)
            .iter()
            .any(|record| record.outcome.kind() == Kind::Completion)
    })
    .await;
    let own = records_of(&records, id);
    assert_eq!(own.len(), 2, "records of request {id}: {own:?}");
    let authorization = own
        .iter()
        .filter(|record| record.outcome.kind() == Kind::Authorization)
        .cloned()
        .collect::<Vec<_>>();
    let completion = own
        .iter()
        .filter(|record| record.outcome.kind() == Kind::Completion)
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(authorization.len(), 1, "one authorization record");
    assert_eq!(completion.len(), 1, "one completion record");
    assert!(
        authorization[0].seq < completion[0].seq,
        "the authorization precedes the completion"
    );
    (authorization[0].clone(), completion[0].clone())
}

fn assert_get_access(record: &Record, id: &str, client: std::net::SocketAddr) {
    let access = &record.access;
    assert_eq!(access.request_id.as_str(), id);
    assert_eq!(
        access.principal.as_ref().map(|name| name.as_str()),
        Some(principal_name("reader").as_str())
    );
    assert_eq!(access.role, Some(Role::Reader));
    assert_eq!(access.action, Action::ObjectGet);
    assert_eq!(access.practice.as_str(), PRACTICE);
    assert_eq!(access.call.as_ref().map(|call| call.as_str()), Some(CALL));
    assert_eq!(
        access.artifact.as_ref().map(|artifact| artifact.as_str()),
        Some(RECORDING)
    );
    assert_eq!(access.client, client);
    assert_eq!(access.tls_version, TlsVersion::Tls13);
}

/// Sends a reader's GET of the recording and returns the client address and the reply.
async fn get_recording(
    access: &AccessGateway,
    range: Option<&str>,
) -> (std::net::SocketAddr, Reply) {
    let addr = access.gateway.data_addr;
    let mut builder = request_to(addr, Method::GET, &object_url(PRACTICE, CALL, RECORDING)).header(
        header::AUTHORIZATION,
        format!("Bearer {}", access.token("reader")),
    );
    if let Some(range) = range {
        builder = builder.header(header::RANGE, range);
    }
    let request = builder.body(empty_body()).expect("build GET");
    send_from_known_address(addr, access.tls_config(None), request).await
}

#[tokio::test]
async fn recording_get_records_fields() {
    let access = AccessSettings::default().start().await;
    upload(&access, PRACTICE, RECORDING, recording()).await;

    let (client_addr, reply) = get_recording(&access, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.bytes().len() as u64, RECORDING_LEN);
    let id = request_id(&reply);
    let (authorization, completion) = request_records(&access, &id).await;

    assert_get_access(&authorization, &id, client_addr);
    assert_eq!(authorization.outcome, Outcome::Allowed);
    assert_get_access(&completion, &id, client_addr);
    assert_eq!(
        completion.outcome,
        Outcome::Ok {
            status: 200,
            bytes: RECORDING_LEN
        }
    );

    let (client_addr, reply) = get_recording(&access, Some("bytes=1000-4999")).await;
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
    let id = request_id(&reply);
    let (authorization, completion) = request_records(&access, &id).await;
    assert_get_access(&authorization, &id, client_addr);
    assert_get_access(&completion, &id, client_addr);
    assert_eq!(
        completion.access.range,
        Some(ByteRange {
            first: 1000,
            last: 4999
        })
    );
    assert_eq!(
        completion.outcome,
        Outcome::Ok {
            status: 206,
            bytes: 4000
        }
    );
}

fn run_verify(access: &AccessGateway) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_callseal"))
        .arg("audit")
        .arg("verify")
        .arg(access.audit_dir())
        .arg("--public-key")
        .arg(access.public_key_file())
        .env_remove("CALLSEAL_AUDIT_DIR")
        .output()
        .expect("run callseal audit verify")
}

#[tokio::test]
async fn verify_binary_detects_edit() {
    let mut access = AccessSettings::default().start().await;
    upload(&access, PRACTICE, RECORDING, recording()).await;
    let (_, reply) = get_recording(&access, Some("bytes=0-99")).await;
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
    request_records(&access, &request_id(&reply)).await;
    let denied = client(&access)
        .get(
            &object_url(OTHER_PRACTICE, CALL, RECORDING),
            access.token("reader"),
            None,
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    access.gateway.shutdown().await;

    let output = run_verify(&access);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "verify failed: {stderr}");
    assert!(stdout.starts_with("OK: 5 records"), "{stdout}");

    let segments = segment_files(&access.audit_dir());
    let segment = segments.first().expect("the log has a segment");
    let mut bytes = fs::read(segment).expect("read the segment");
    let marker = b"\"request_id\":\"";
    let position = bytes
        .windows(marker.len())
        .position(|window| window == marker)
        .expect("the first record has a request id")
        + marker.len();
    bytes[position] = if bytes[position] == b'0' { b'1' } else { b'0' };
    fs::write(segment, bytes).expect("write the edited segment");

    let output = run_verify(&access);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file_name = segment
        .file_name()
        .expect("a segment file name")
        .to_string_lossy();
    assert!(
        !output.status.success(),
        "verify accepted an edited segment"
    );
    assert!(
        stderr.contains(file_name.as_ref()),
        "the error names {file_name}: {stderr}"
    );
}

#[tokio::test]
async fn missing_audit_directory_fails_closed() {
    let access = AccessSettings::default().start().await;
    let plaintext = recording();
    upload(&access, PRACTICE, RECORDING, plaintext.clone()).await;
    fs::remove_dir_all(access.audit_dir()).expect("remove the audit directory");

    let reply = client(&access)
        .get(
            &object_url(PRACTICE, CALL, RECORDING),
            access.token("reader"),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "only an error message is sent"
    );
    assert_eq!(
        reply.error_message(),
        "the audit log is unavailable; retry later"
    );
    let body = reply.bytes();
    assert!(
        !body
            .windows(16)
            .any(|window| plaintext.windows(16).next() == Some(window)),
        "no recording bytes in the body"
    );
    assert!(
        (body.len() as u64) < RECORDING_LEN,
        "the body is not the recording"
    );

    let again = client(&access)
        .get(
            &object_url(PRACTICE, CALL, RECORDING),
            access.token("reader"),
            None,
        )
        .await;
    assert_eq!(
        again.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the log stays failed"
    );
}

#[tokio::test]
async fn concurrent_requests_keep_one_chain() {
    const REQUESTS: usize = 200;
    let mut access = AccessSettings::default().start().await;
    upload(&access, PRACTICE, RECORDING, b"short recording".to_vec()).await;
    let before = read_records(&access.audit_dir()).len();

    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..REQUESTS {
        let client = client(&access);
        let token = access.token("reader").to_owned();
        let range = format!("bytes={}-{}", index % 10, 10 + index % 5);
        tasks.spawn(async move {
            client
                .get(&object_url(PRACTICE, CALL, RECORDING), &token, Some(&range))
                .await
        });
    }
    let mut ids = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.expect("the request task finished");
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
        ids.push(request_id(&reply));
    }

    let records = wait_for_records(&access.audit_dir(), |records| {
        records.len() >= before + 2 * REQUESTS
    })
    .await;
    assert_eq!(records.len(), before + 2 * REQUESTS);
    for id in &ids {
        assert_eq!(records_of(&records, id).len(), 2, "records of request {id}");
    }
    access.gateway.shutdown().await;

    let public_key = PublicKey::from_arg(
        access
            .public_key_file()
            .to_str()
            .expect("the key path is UTF-8"),
    )
    .expect("load the public key");
    let report =
        callseal::audit::verify(&access.audit_dir(), &[public_key]).expect("the chain verifies");
    assert_eq!(report.records, (before + 2 * REQUESTS) as u64);
    assert_eq!(report.records_after_last_checkpoint, 0);
}

/// Collects values of the fixture that are PHI or secrets: phone numbers, names, transcript words
/// of six letters or more, and media URLs with their host.
fn fixture_canaries(body: &[u8]) -> Vec<String> {
    let event: serde_json::Value = serde_json::from_slice(body).expect("the fixture is JSON");
    let call = &event["call"];
    let mut canaries = Vec::new();
    for field in ["from_number", "to_number", "agent_name"] {
        if let Some(value) = call[field].as_str() {
            canaries.push(value.to_owned());
        }
    }
    if let Some(name) = call["retell_llm_dynamic_variables"]["patient_first_name"].as_str() {
        canaries.push(name.to_owned());
    }
    if let Some(transcript) = call["transcript"].as_str() {
        for word in transcript.split(|c: char| !c.is_ascii_alphabetic()) {
            if word.len() >= 6 {
                canaries.push(word.to_owned());
            }
        }
    }
    if let Some(object) = call.as_object() {
        for (key, value) in object {
            if key.ends_with("_url")
                && let Some(url) = value.as_str()
            {
                canaries.push(url.to_owned());
            }
        }
    }
    canaries.push("recordings.example.test".to_owned());
    canaries
}

#[tokio::test]
async fn audit_records_contain_no_phi() {
    let key = retell::new_api_key();
    let access = AccessSettings::default().retell_key(&key).start().await;
    let client = client(&access);

    let mut canaries = Vec::new();
    for name in ["call_ended.json", "call_analyzed.json"] {
        let body = retell::fixture(name);
        canaries.extend(fixture_canaries(&body));
        let reply = retell::deliver(&client, PRACTICE, &key, &body).await;
        retell::assert_accepted(&reply, name);
    }
    for known in ["+15550100001", "Jordan", "metformin", "Testpatient"] {
        assert!(
            canaries.iter().any(|canary| canary == known),
            "the canaries include {known}"
        );
    }
    assert!(
        canaries
            .iter()
            .any(|canary| canary.starts_with("https://recordings.example.test/")),
        "the canaries include media URLs"
    );

    let reader = access.token("reader");
    let event = client
        .get(
            &object_url(PRACTICE, FIXTURE_CALL_ID, "event-call_ended.json"),
            reader,
            None,
        )
        .await;
    assert_eq!(event.status, StatusCode::OK);
    let transcript = client
        .get(
            &object_url(PRACTICE, FIXTURE_CALL_ID, "transcript.json"),
            reader,
            None,
        )
        .await;
    assert_eq!(transcript.status, StatusCode::OK);
    let listing = client
        .get(
            &format!("/v1/practices/{PRACTICE}/calls/{FIXTURE_CALL_ID}"),
            reader,
            None,
        )
        .await;
    assert_eq!(listing.status, StatusCode::OK);
    let query = client
        .get(
            &format!("/v1/audit?practice={PRACTICE}&call={FIXTURE_CALL_ID}"),
            access.token("auditor"),
            None,
        )
        .await;
    assert_eq!(query.status, StatusCode::OK);
    let transcript_id = request_id(&transcript);
    let records = wait_for_records(&access.audit_dir(), |records| {
        records_of(records, &transcript_id)
            .iter()
            .any(|record| record.outcome.kind() == Kind::Completion)
    })
    .await;
    assert!(
        records
            .iter()
            .any(|record| record.access.action == Action::WebhookReceive),
        "the deliveries are audited"
    );

    let mut audit_text = String::new();
    for entry in fs::read_dir(access.audit_dir()).expect("read the audit directory") {
        let path = entry.expect("read an audit directory entry").path();
        if path.is_file() {
            audit_text.push_str(&String::from_utf8_lossy(
                &fs::read(&path).expect("read an audit file"),
            ));
        }
    }
    for canary in &canaries {
        assert!(
            !audit_text.contains(canary.as_str()),
            "the audit files contain {canary:?}"
        );
    }
    let auditor_query = String::from_utf8_lossy(query.bytes());
    for canary in &canaries {
        assert!(
            !auditor_query.contains(canary.as_str()),
            "the audit query response contains {canary:?}"
        );
    }
}

#[tokio::test]
async fn client_certificate_maps_to_principal() {
    let ca = TestCa::new("access test client CA");
    let access = AccessSettings::default()
        .client_ca(&ca)
        .client("scanner-reader", "scanner.clinic-1", "reader")
        .start()
        .await;
    upload(&access, PRACTICE, RECORDING, recording()).await;
    let addr = access.gateway.data_addr;
    let tls = access.tls_config(Some(&ca.issue_client("scanner.clinic-1")));

    let get = request_to(addr, Method::GET, &object_url(PRACTICE, CALL, RECORDING))
        .body(empty_body())
        .expect("build GET");
    let (client_addr, reply) = send_from_known_address(addr, tls.clone(), get).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.bytes().len() as u64, RECORDING_LEN);
    let id = request_id(&reply);
    let (authorization, _) = request_records(&access, &id).await;
    assert_eq!(
        authorization
            .access
            .principal
            .as_ref()
            .map(|name| name.as_str()),
        Some("scanner-reader")
    );
    assert_eq!(authorization.access.role, Some(Role::Reader));
    assert_eq!(authorization.access.client, client_addr);

    let put = request_to(
        addr,
        Method::PUT,
        &object_url(PRACTICE, CALL, "scanner.bin"),
    )
    .body(full_body(b"not allowed".to_vec()))
    .expect("build PUT");
    let (_, reply) = send_from_known_address(addr, tls, put).await;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "a reader cannot upload"
    );

    let unknown = access.tls_config(Some(&ca.issue_client("unknown.clinic-1")));
    let get = request_to(addr, Method::GET, &object_url(PRACTICE, CALL, RECORDING))
        .body(empty_body())
        .expect("build GET");
    let (_, reply) = send_from_known_address(addr, unknown, get).await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "a certificate that matches no client"
    );
}

#[tokio::test]
async fn untrusted_client_certificate_rejected() {
    let ca = TestCa::new("access test client CA");
    let access = AccessSettings::default()
        .client_ca(&ca)
        .client("scanner-reader", "scanner.clinic-1", "reader")
        .start()
        .await;
    let untrusted = TestCa::new("untrusted client CA");
    let tls = access.tls_config(Some(&untrusted.issue_client("scanner.clinic-1")));

    let error = handshake_error(access.gateway.data_addr, tls).await;
    assert!(
        matches!(
            error,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))
        ),
        "the handshake ends with an unknown-CA alert: {error:?}"
    );

    let before = read_records(&access.audit_dir()).len();
    assert_eq!(before, 0, "a rejected handshake reaches no route");
}
