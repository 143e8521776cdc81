//! Acceptance tests of the Retell webhook route, `POST /v1/webhooks/retell/{practice}`, over real
//! TLS on 127.0.0.1. They cover signatures (made here and by Retell's own Python SDK), the
//! 5-minute window, body limits, duplicate deliveries and versions, practices with separate or
//! shared keys, storage failures, logs and metrics.
//!
//! Each test starts its own gateway with local storage in a temporary directory
//! (`common::retell::RetellSettings`). Stored events are read back through the object route with
//! the practice's bearer token, and "nothing stored" is checked by listing the call's directory on
//! disk. Media downloads and downstream forwarding are not configured and not tested here.

mod common;

use std::fs;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use serde_json::{Value, json};

use common::gateway::{
    BoxError, Client, OTHER_PRACTICE, PRACTICE, Protocol, TestGateway, full_body, metric_value,
    oracle_decrypt, stream_body, within_guard,
};
use common::retell::{
    FIXTURE_AGENT_ID, FIXTURE_CALL_ID, RetellPractice, RetellSettings, SeededRng, ServeProcess,
    WINDOW_MS, assert_accepted, assert_rejected, call_dir, call_ended_of_size, call_files, deliver,
    digest_hex, fixture, fixture_for_call, get_artifact, new_api_key, now_ms, post_signed,
    random_event, raw_webhook_head, read_status_line, sdk_sign, sha256_hex, sign, streamed,
    version_name, versions, webhook_request, webhook_url,
};

const MIB: usize = 1024 * 1024;

/// Transcript fields of `call_ended.json`, which `transcript.json` copies.
const FIXTURE_TRANSCRIPT_FIELDS: [&str; 4] = [
    "transcript",
    "transcript_object",
    "transcript_with_tool_calls",
    "scrubbed_transcript_with_tool_calls",
];

fn no_files() -> Vec<String> {
    Vec::new()
}

/// Returns the `event` field of a JSON body.
fn event_kind(body: &[u8]) -> String {
    let value: Value = serde_json::from_slice(body).expect("the event is JSON");
    value["event"]
        .as_str()
        .expect("the event has a type")
        .to_owned()
}

/// Reads an artifact back and checks that it is exactly `expected`.
async fn assert_artifact_bytes(
    client: &Client,
    gateway: &TestGateway,
    practice: &str,
    call: &str,
    artifact: &str,
    expected: &[u8],
) {
    let token = if practice == PRACTICE {
        &gateway.files.token
    } else {
        &gateway.files.other_token
    };
    let reply = get_artifact(client, token, practice, call, artifact).await;
    assert_eq!(reply.status, StatusCode::OK, "GET {call}/{artifact}");
    assert_eq!(
        reply.bytes().len(),
        expected.len(),
        "length of {call}/{artifact}"
    );
    assert_eq!(
        sha256_hex(reply.bytes()),
        sha256_hex(expected),
        "SHA-256 of {call}/{artifact}"
    );
}

/// Changes one ASCII letter of `body` to the other case, at a random position where the result is
/// still JSON with the same event type and call id, so only the signature can tell them apart.
fn tamper_one_byte(rng: &mut SeededRng, body: &[u8]) -> Vec<u8> {
    let original: Value = serde_json::from_slice(body).expect("the event is JSON");
    let letters: Vec<usize> = (0..body.len())
        .filter(|&index| body[index].is_ascii_alphabetic())
        .collect();
    for _ in 0..1000 {
        let position = *rng.pick(&letters);
        let mut tampered = body.to_vec();
        tampered[position] ^= 0x20;
        let Ok(value) = serde_json::from_slice::<Value>(&tampered) else {
            continue;
        };
        if value["event"] == original["event"]
            && value["call"]["call_id"] == original["call"]["call_id"]
        {
            return tampered;
        }
    }
    panic!("no letter of the body can change without changing its event type or call id");
}

// ---------------------------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------------------------

/// The fixtures, freshly signed, are stored as their exact bytes: readable as the current event,
/// by their versioned name, decryptable by AWS's Encryption SDK under the practice's key with the
/// version's encryption context, and with `transcript.json` and `analysis.json` beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_fixtures_are_stored() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        let call = format!("call-fixture-{}", protocol.name());
        let ended = fixture_for_call("call_ended.json", &call);
        let analyzed = fixture_for_call("call_analyzed.json", &call);

        let timestamp = now_ms();
        let signature = sign(&key, &ended, timestamp);
        let reply = post_signed(
            &client,
            PRACTICE,
            Some(&signature),
            full_body(ended.clone()),
        )
        .await;
        assert_accepted(&reply, &format!("call_ended over {}", protocol.name()));

        let version = version_name("event-call_ended", timestamp, &ended);
        assert_eq!(
            versions(&gateway.files, PRACTICE, &call, "event-call_ended"),
            vec![version.clone()],
            "one stored version of call_ended over {}",
            protocol.name()
        );
        assert_artifact_bytes(
            &client,
            &gateway,
            PRACTICE,
            &call,
            "event-call_ended.json",
            &ended,
        )
        .await;
        assert_artifact_bytes(&client, &gateway, PRACTICE, &call, &version, &ended).await;

        let stored_path = call_dir(&gateway.files, PRACTICE, &call).join(&version);
        let stored = fs::read(&stored_path).expect("read the stored event");
        let stored_text = String::from_utf8_lossy(&stored);
        assert!(
            !stored_text.contains("Testpatient"),
            "the stored event is not plaintext"
        );
        let (plaintext, esdk_header) = oracle_decrypt(&gateway.files, PRACTICE, &stored_path);
        assert!(
            plaintext == ended,
            "the ESDK decrypts the stored event to the body"
        );
        assert_eq!(
            esdk_header["encryption_context"],
            json!({ "practice": PRACTICE, "call": call, "artifact": version }),
            "encryption context of the stored event"
        );

        let fixture_value: Value = serde_json::from_slice(&ended).expect("the fixture is JSON");
        let expected_transcript: serde_json::Map<String, Value> = FIXTURE_TRANSCRIPT_FIELDS
            .iter()
            .map(|field| ((*field).to_owned(), fixture_value["call"][*field].clone()))
            .collect();
        let transcript = get_artifact(
            &client,
            &gateway.files.token,
            PRACTICE,
            &call,
            "transcript.json",
        )
        .await;
        assert_eq!(transcript.status, StatusCode::OK, "GET transcript.json");
        let transcript: Value =
            serde_json::from_slice(transcript.bytes()).expect("transcript.json is JSON");
        assert_eq!(
            transcript,
            Value::Object(expected_transcript),
            "transcript.json holds the transcript fields of call_ended"
        );

        let reply = deliver(&client, PRACTICE, &key, &analyzed).await;
        assert_accepted(&reply, &format!("call_analyzed over {}", protocol.name()));
        assert_artifact_bytes(
            &client,
            &gateway,
            PRACTICE,
            &call,
            "event-call_analyzed.json",
            &analyzed,
        )
        .await;
        let analysis = get_artifact(
            &client,
            &gateway.files.token,
            PRACTICE,
            &call,
            "analysis.json",
        )
        .await;
        assert_eq!(analysis.status, StatusCode::OK, "GET analysis.json");
        let analysis: Value =
            serde_json::from_slice(analysis.bytes()).expect("analysis.json is JSON");
        let analyzed_value: Value = serde_json::from_slice(&analyzed).expect("the fixture is JSON");
        assert_eq!(
            analysis, analyzed_value["call"]["call_analysis"],
            "analysis.json holds call_analysis"
        );
    }
    gateway.shutdown().await;
}

/// Timestamps 299 s ahead of and behind the gateway's clock are inside the 5-minute window. The
/// exact edges (±300,000 ms in, ±300,001 ms out) are unit tests with a fixed clock. Over HTTP, a
/// second of margin keeps the result independent of how long a request takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_inside_window_are_accepted() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);

    let margin = WINDOW_MS - 1000;
    for (name, timestamp) in [("ahead", now_ms() + margin), ("behind", now_ms() - margin)] {
        let call = format!("call-window-{name}");
        let body = fixture_for_call("call_ended.json", &call);
        let signature = sign(&key, &body, timestamp);
        let reply = post_signed(&client, PRACTICE, Some(&signature), full_body(body.clone())).await;
        assert_accepted(&reply, &format!("timestamp 299 s {name}"));
        assert_eq!(
            versions(&gateway.files, PRACTICE, &call, "event-call_ended"),
            vec![version_name("event-call_ended", timestamp, &body)],
            "stored version for the timestamp 299 s {name}"
        );
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_outside_window_are_401() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);

    let margin = WINDOW_MS + 1000;
    for (name, timestamp) in [("ahead", now_ms() + margin), ("behind", now_ms() - margin)] {
        let call = format!("call-window-{name}");
        let body = fixture_for_call("call_ended.json", &call);
        let signature = sign(&key, &body, timestamp);
        let reply = post_signed(&client, PRACTICE, Some(&signature), full_body(body)).await;
        assert_rejected(
            &reply,
            StatusCode::UNAUTHORIZED,
            &format!("timestamp 301 s {name}"),
        );
        assert_eq!(
            call_files(&gateway.files, PRACTICE, &call),
            no_files(),
            "nothing stored for the timestamp 301 s {name}"
        );
    }
    gateway.shutdown().await;
}

/// Malformed `x-retell-signature` headers get 401 and store nothing. The well-formed header for
/// the same body is accepted afterwards, so the rejections were about the header alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_signature_headers_are_401() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);
    let call = "call-malformed";
    let body = fixture_for_call("call_ended.json", call);
    let timestamp = now_ms();
    let digest = digest_hex(&key, &body, timestamp);

    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing header", None),
        ("empty header", Some(String::new())),
        ("extra field", Some(format!("v={timestamp},d={digest},x=1"))),
        (
            "non-numeric timestamp",
            Some(format!("v=17672256O1234,d={digest}")),
        ),
        ("empty timestamp", Some(format!("v=,d={digest}"))),
        (
            "63 hex digits",
            Some(format!("v={timestamp},d={}", &digest[..63])),
        ),
        ("65 hex digits", Some(format!("v={timestamp},d={digest}0"))),
        (
            "non-hex digit",
            Some(format!("v={timestamp},d={}g", &digest[..63])),
        ),
        ("fields swapped", Some(format!("d={digest},v={timestamp}"))),
        (
            "seconds-style prefix",
            Some(format!("t={timestamp},d={digest}")),
        ),
    ];
    for (name, header) in &cases {
        let reply = post_signed(
            &client,
            PRACTICE,
            header.as_deref(),
            full_body(body.clone()),
        )
        .await;
        assert_rejected(&reply, StatusCode::UNAUTHORIZED, name);
        assert_eq!(
            call_files(&gateway.files, PRACTICE, call),
            no_files(),
            "nothing stored after {name}"
        );
    }

    let reply = post_signed(
        &client,
        PRACTICE,
        Some(&format!("v={timestamp},d={digest}")),
        full_body(body.clone()),
    )
    .await;
    assert_accepted(&reply, "the well-formed header");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uppercase_hex_digest_is_accepted() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);
    let call = "call-uppercase";
    let body = fixture_for_call("call_ended.json", call);
    let timestamp = now_ms();
    let digest = digest_hex(&key, &body, timestamp).to_uppercase();
    assert!(
        digest.bytes().any(|b| b.is_ascii_uppercase()),
        "the digest has letters"
    );

    let signature = format!("v={timestamp},d={digest}");
    let reply = post_signed(&client, PRACTICE, Some(&signature), full_body(body.clone())).await;
    assert_accepted(&reply, "uppercase hex");
    assert_artifact_bytes(
        &client,
        &gateway,
        PRACTICE,
        call,
        "event-call_ended.json",
        &body,
    )
    .await;
    gateway.shutdown().await;
}

/// A practice with two keys in `retell_api_keys_file` (a rotation) accepts a body signed with
/// either, and still rejects a third key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_of_two_keys_verifies() {
    let old_key = new_api_key();
    let new_key = new_api_key();
    let practice = RetellPractice::new(PRACTICE)
        .key_in_file(&old_key)
        .key_in_file(&new_key);
    let mut gateway = RetellSettings::default().practice(practice).start().await;
    let client = gateway.client(Protocol::Http1);

    for (name, key) in [("old key", &old_key), ("new key", &new_key)] {
        let call = format!("call-rotation-{}", name.replace(' ', "-"));
        let body = fixture_for_call("call_ended.json", &call);
        let reply = deliver(&client, PRACTICE, key, &body).await;
        assert_accepted(&reply, name);
        assert_artifact_bytes(
            &client,
            &gateway,
            PRACTICE,
            &call,
            "event-call_ended.json",
            &body,
        )
        .await;
    }

    let call = "call-rotation-unknown-key";
    let body = fixture_for_call("call_ended.json", call);
    let reply = deliver(&client, PRACTICE, &new_api_key(), &body).await;
    assert_rejected(
        &reply,
        StatusCode::UNAUTHORIZED,
        "a key that is not configured",
    );
    assert_eq!(
        call_files(&gateway.files, PRACTICE, call),
        no_files(),
        "nothing stored for the unknown key"
    );
    gateway.shutdown().await;
}

/// The signature covers the exact bytes: the same JSON value serialized again (compact, with
/// `\u00e9` escapes, or pretty-printed) fails with the original signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserialized_body_is_401() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);
    let call = "call-reserialized";
    let text = String::from_utf8(fixture_for_call("call_ended.json", call)).expect("UTF-8");
    let needle = "\"patient_first_name\": \"Jordan\"";
    assert_eq!(
        text.matches(needle).count(),
        1,
        "the fixture names the patient once"
    );
    let original = text
        .replace(needle, "\"patient_first_name\": \"José\"")
        .into_bytes();
    let timestamp = now_ms();
    let signature = sign(&key, &original, timestamp);

    let value: Value = serde_json::from_slice(&original).expect("the body is JSON");
    let compact = serde_json::to_vec(&value).expect("serialize");
    let escaped = String::from_utf8(original.clone())
        .expect("UTF-8")
        .replace('é', "\\u00e9")
        .into_bytes();
    let pretty = serde_json::to_vec_pretty(&value).expect("serialize");
    for (name, body) in [
        ("compact", compact),
        ("\\u00e9 escapes", escaped),
        ("pretty", pretty),
    ] {
        assert_ne!(
            body, original,
            "the {name} form differs from the signed bytes"
        );
        let same_value: Value =
            serde_json::from_slice(&body).expect("the re-serialized body is JSON");
        assert_eq!(same_value, value, "the {name} form is the same JSON value");

        let reply = post_signed(&client, PRACTICE, Some(&signature), full_body(body)).await;
        assert_rejected(
            &reply,
            StatusCode::UNAUTHORIZED,
            &format!("{name} re-serialization"),
        );
        assert_eq!(
            call_files(&gateway.files, PRACTICE, call),
            no_files(),
            "nothing stored after the {name} form"
        );
    }

    let reply = post_signed(
        &client,
        PRACTICE,
        Some(&signature),
        full_body(original.clone()),
    )
    .await;
    assert_accepted(&reply, "the signed bytes");
    assert_artifact_bytes(
        &client,
        &gateway,
        PRACTICE,
        call,
        "event-call_ended.json",
        &original,
    )
    .await;
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Retell's SDK as the signer
// ---------------------------------------------------------------------------------------------

/// Random events with Spanish, Chinese and emoji text, signed by the `retell-sdk` Python package,
/// are accepted and stored byte for byte. Before each, a copy with one byte changed is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_signed_random_bodies_verify() {
    const BODIES: usize = 16;
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let mut rng = SeededRng::new(0x5eed_2026);

    let calls: Vec<String> = (0..BODIES)
        .map(|index| format!("call-sdk-{index:02}"))
        .collect();
    let bodies: Vec<Vec<u8>> = calls
        .iter()
        .map(|call| random_event(&mut rng, call))
        .collect();
    let body_refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    assert!(
        bodies.iter().any(|body| body.iter().any(|b| !b.is_ascii())),
        "the bodies contain non-ASCII text"
    );

    let fixed_timestamp = 1_767_225_601_234;
    let sdk_fixed = sdk_sign(&key, Some(fixed_timestamp), &body_refs[..1]);
    assert_eq!(
        sdk_fixed[0],
        sign(&key, &bodies[0], fixed_timestamp),
        "the SDK and this test's signer agree"
    );

    let signatures = sdk_sign(&key, None, &body_refs);
    for (index, ((call, body), signature)) in calls.iter().zip(&bodies).zip(&signatures).enumerate()
    {
        let protocol = Protocol::ALL[index % 2];
        let client = gateway.client(protocol);

        let tampered = tamper_one_byte(&mut rng, body);
        let reply = post_signed(&client, PRACTICE, Some(signature), full_body(tampered)).await;
        assert_rejected(
            &reply,
            StatusCode::UNAUTHORIZED,
            &format!("tampered body {index}"),
        );
        assert_eq!(
            call_files(&gateway.files, PRACTICE, call),
            no_files(),
            "nothing stored for tampered body {index}"
        );

        let reply = post_signed(&client, PRACTICE, Some(signature), full_body(body.clone())).await;
        assert_accepted(
            &reply,
            &format!("SDK-signed body {index} over {}", protocol.name()),
        );
        let artifact = format!("event-{}.json", event_kind(body));
        assert_artifact_bytes(&client, &gateway, PRACTICE, call, &artifact, body).await;
    }
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Body sizes
// ---------------------------------------------------------------------------------------------

/// Bodies of 65,537 bytes (one past a 64 KiB frame) and 20 MiB, sent with `Content-Length` and
/// streamed without one, read back with the same SHA-256. The small body runs every combination
/// of protocol and framing, and the 20 MiB body runs two of them to keep the test short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_stored_intact() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let cases = [
        (Protocol::Http1, 65_537, false),
        (Protocol::Http1, 65_537, true),
        (Protocol::Http2, 65_537, false),
        (Protocol::Http2, 65_537, true),
        (Protocol::Http1, 20 * MIB, false),
        (Protocol::Http2, 20 * MIB, true),
    ];

    for (protocol, size, streaming) in cases {
        let client = gateway.client(protocol);
        let mode = if streaming {
            "streamed"
        } else {
            "content-length"
        };
        let call = format!("call-large-{size}-{}-{mode}", protocol.name());
        let body = call_ended_of_size(&call, size);
        let signature = sign(&key, &body, now_ms());
        let request_body = if streaming {
            streamed(&body, size as u64)
        } else {
            full_body(body.clone())
        };

        let reply = post_signed(&client, PRACTICE, Some(&signature), request_body).await;
        assert_accepted(
            &reply,
            &format!("{size} bytes, {mode}, over {}", protocol.name()),
        );
        assert_artifact_bytes(
            &client,
            &gateway,
            PRACTICE,
            &call,
            "event-call_ended.json",
            &body,
        )
        .await;
    }
    gateway.shutdown().await;
}

/// With `webhooks.max_body_bytes` = 1 MiB, a body of exactly 1 MiB is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_at_limit_is_stored() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key)
        .max_body_bytes(MIB as u64)
        .start()
        .await;

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        for streaming in [false, true] {
            let mode = if streaming {
                "streamed"
            } else {
                "content-length"
            };
            let call = format!("call-at-limit-{}-{mode}", protocol.name());
            let body = call_ended_of_size(&call, MIB);
            let signature = sign(&key, &body, now_ms());
            let request_body = if streaming {
                streamed(&body, 7)
            } else {
                full_body(body.clone())
            };
            let reply = post_signed(&client, PRACTICE, Some(&signature), request_body).await;
            assert_accepted(&reply, &format!("1 MiB, {mode}, over {}", protocol.name()));
            assert_artifact_bytes(
                &client,
                &gateway,
                PRACTICE,
                &call,
                "event-call_ended.json",
                &body,
            )
            .await;
        }
    }
    gateway.shutdown().await;
}

/// A `Content-Length` one past `webhooks.max_body_bytes` gets 413 before any body byte is sent,
/// over HTTP/1.1 and h2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_over_limit_is_413() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key)
        .max_body_bytes(MIB as u64)
        .start()
        .await;
    let call = "call-over-limit-length";
    let body = call_ended_of_size(call, MIB + 1);
    let signature = sign(&key, &body, now_ms());

    let mut tls = raw_webhook_head(&gateway, PRACTICE, &signature, body.len() as u64).await;
    assert_eq!(
        read_status_line(&mut tls).await,
        "HTTP/1.1 413 Payload Too Large",
        "HTTP/1.1"
    );
    drop(tls);

    let client = gateway.client(Protocol::Http2);
    let request = webhook_request(&client, PRACTICE, Some(&signature))
        .header(header::CONTENT_LENGTH, body.len())
        .body(stream_body(futures::stream::pending::<
            Result<Bytes, BoxError>,
        >()))
        .expect("build the webhook POST");
    let response = client
        .send(request)
        .await
        .expect("the h2 response arrives before any body byte");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "h2");
    drop(response);

    assert_eq!(
        call_files(&gateway.files, PRACTICE, call),
        no_files(),
        "nothing stored"
    );
    gateway.shutdown().await;
}

/// A body without `Content-Length` that grows one byte past `webhooks.max_body_bytes` gets 413
/// and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_over_limit_is_413() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key)
        .max_body_bytes(MIB as u64)
        .start()
        .await;

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        let call = format!("call-over-limit-streamed-{}", protocol.name());
        let body = call_ended_of_size(&call, MIB + 1);
        let signature = sign(&key, &body, now_ms());
        let reply = post_signed(&client, PRACTICE, Some(&signature), streamed(&body, 11)).await;
        assert_rejected(
            &reply,
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("streamed over {}", protocol.name()),
        );
        assert_eq!(
            call_files(&gateway.files, PRACTICE, &call),
            no_files(),
            "nothing stored over {}",
            protocol.name()
        );
    }
    gateway.shutdown().await;
}

/// A 30 MiB body (under the default 32 MiB limit) with a signature that does not match is read,
/// rejected with 401, and leaves nothing in storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_30_mib_body_is_401() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);
    let call = "call-unsigned-large";
    let body = call_ended_of_size(call, 30 * MIB);
    let signature = sign(&new_api_key(), &body, now_ms());

    let reply = post_signed(&client, PRACTICE, Some(&signature), full_body(body)).await;
    assert_rejected(
        &reply,
        StatusCode::UNAUTHORIZED,
        "30 MiB with a wrong signature",
    );
    assert_eq!(
        call_files(&gateway.files, PRACTICE, call),
        no_files(),
        "nothing stored"
    );
    assert_eq!(
        gateway.files.stored_files(),
        Vec::<std::path::PathBuf>::new(),
        "nothing under the storage root"
    );
    gateway.shutdown().await;
}

/// A body larger than `webhooks.max_unverified_bytes` cannot be buffered for verification: 503
/// with `Retry-After` and nothing stored. Smaller bodies, one after another, are accepted, so the
/// budget is given back after each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_budget_exhausted_is_503() {
    const BUDGET: usize = 256 * 1024;
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key)
        .max_unverified_bytes(BUDGET as u64)
        .start()
        .await;
    let client = gateway.client(Protocol::Http1);

    let call = "call-over-budget";
    let body = call_ended_of_size(call, 2 * BUDGET);
    let signature = sign(&key, &body, now_ms());
    let reply = post_signed(&client, PRACTICE, Some(&signature), full_body(body)).await;
    assert_rejected(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "a body over the budget",
    );
    assert!(
        reply.header("retry-after").is_some(),
        "503 carries Retry-After"
    );
    assert_eq!(
        call_files(&gateway.files, PRACTICE, call),
        no_files(),
        "nothing stored over the budget"
    );

    for index in 0..3 {
        let call = format!("call-within-budget-{index}");
        let body = call_ended_of_size(&call, BUDGET * 3 / 4);
        let reply = deliver(&client, PRACTICE, &key, &body).await;
        assert_accepted(&reply, &format!("body {index} within the budget"));
    }
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Duplicates and versions
// ---------------------------------------------------------------------------------------------

/// Five concurrent deliveries of one signed event store one version. A later retry of the same
/// body with a new timestamp stores nothing new. A changed body stores a second version, which
/// becomes the current one while the first stays readable by its versioned name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_store_one_version() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let call = "call-duplicates";
    let first = fixture_for_call("call_analyzed.json", call);
    let first_timestamp = now_ms();
    let signature = sign(&key, &first, first_timestamp);
    let first_version = version_name("event-call_analyzed", first_timestamp, &first);

    let deliveries = (0..5).map(|index| {
        let client = gateway.client(Protocol::ALL[index % 2]);
        let signature = signature.clone();
        let body = first.clone();
        async move { post_signed(&client, PRACTICE, Some(&signature), full_body(body)).await }
    });
    let replies = futures::future::join_all(deliveries).await;
    for (index, reply) in replies.iter().enumerate() {
        assert_accepted(reply, &format!("concurrent delivery {index}"));
    }
    assert_eq!(
        versions(&gateway.files, PRACTICE, call, "event-call_analyzed"),
        vec![first_version.clone()],
        "one version after five concurrent deliveries"
    );

    let client = gateway.client(Protocol::Http1);
    let retry_timestamp = now_ms().max(first_timestamp + 1);
    let retry_signature = sign(&key, &first, retry_timestamp);
    let reply = post_signed(
        &client,
        PRACTICE,
        Some(&retry_signature),
        full_body(first.clone()),
    )
    .await;
    assert_accepted(&reply, "the retry with a new timestamp");
    assert_eq!(
        versions(&gateway.files, PRACTICE, call, "event-call_analyzed"),
        vec![first_version.clone()],
        "still one version after the retry"
    );

    let text = String::from_utf8(first.clone()).expect("UTF-8");
    let old_summary = "refill request logged.";
    assert_eq!(
        text.matches(old_summary).count(),
        1,
        "the fixture's summary ends once"
    );
    let second = text
        .replace(old_summary, "refill approved after re-analysis.")
        .into_bytes();
    let second_timestamp = retry_timestamp + 1000;
    let second_signature = sign(&key, &second, second_timestamp);
    let reply = post_signed(
        &client,
        PRACTICE,
        Some(&second_signature),
        full_body(second.clone()),
    )
    .await;
    assert_accepted(&reply, "the re-analysis");
    let second_version = version_name("event-call_analyzed", second_timestamp, &second);
    let mut expected = vec![first_version.clone(), second_version];
    expected.sort();
    assert_eq!(
        versions(&gateway.files, PRACTICE, call, "event-call_analyzed"),
        expected,
        "two versions after the re-analysis"
    );

    assert_artifact_bytes(
        &client,
        &gateway,
        PRACTICE,
        call,
        "event-call_analyzed.json",
        &second,
    )
    .await;
    assert_artifact_bytes(&client, &gateway, PRACTICE, call, &first_version, &first).await;
    let analysis = get_artifact(
        &client,
        &gateway.files.token,
        PRACTICE,
        call,
        "analysis.json",
    )
    .await;
    assert_eq!(analysis.status, StatusCode::OK, "GET analysis.json");
    let analysis: Value = serde_json::from_slice(analysis.bytes()).expect("analysis.json is JSON");
    assert_eq!(
        analysis["call_summary"]
            .as_str()
            .map(|summary| summary.ends_with("refill approved after re-analysis.")),
        Some(true),
        "analysis.json is the re-analysis: {analysis}"
    );
    gateway.shutdown().await;
}

/// Retell retries a delivery it considers failed with a new signature timestamp, so retries can
/// overlap a slow first delivery. Five concurrent deliveries of one body, each signed at its own
/// timestamp, still store one version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_retries_store_one_version() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let call = "call-overlapping-retries";
    let body = fixture_for_call("call_ended.json", call);
    let start = now_ms();

    let deliveries = (0..5u64).map(|index| {
        let client = gateway.client(Protocol::ALL[index as usize % 2]);
        let signature = sign(&key, &body, start + index);
        let body = body.clone();
        async move { post_signed(&client, PRACTICE, Some(&signature), full_body(body)).await }
    });
    let replies = futures::future::join_all(deliveries).await;
    for (index, reply) in replies.iter().enumerate() {
        assert_accepted(reply, &format!("retry {index}"));
    }
    let stored = versions(&gateway.files, PRACTICE, call, "event-call_ended");
    assert_eq!(stored.len(), 1, "one version of one body: {stored:?}");
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Practices
// ---------------------------------------------------------------------------------------------

/// An event signed with practice A's key and posted to practice B's URL is rejected: B verifies
/// with its own key only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_practice_key_is_401() {
    let key_a = new_api_key();
    let key_b = new_api_key();
    let mut gateway = RetellSettings::default()
        .practice(RetellPractice::new(PRACTICE).key(&key_a))
        .practice(RetellPractice::new(OTHER_PRACTICE).key(&key_b))
        .start()
        .await;
    let client = gateway.client(Protocol::Http1);
    let call = "call-cross-practice";
    let body = fixture_for_call("call_ended.json", call);

    let reply = deliver(&client, OTHER_PRACTICE, &key_a, &body).await;
    assert_rejected(&reply, StatusCode::UNAUTHORIZED, "A's event at B's URL");
    assert_eq!(
        call_files(&gateway.files, OTHER_PRACTICE, call),
        no_files(),
        "nothing stored for B"
    );
    assert_eq!(
        call_files(&gateway.files, PRACTICE, call),
        no_files(),
        "nothing stored for A"
    );

    let reply = deliver(&client, PRACTICE, &key_a, &body).await;
    assert_accepted(&reply, "A's event at A's URL");
    assert_eq!(
        call_files(&gateway.files, OTHER_PRACTICE, call),
        no_files(),
        "still nothing stored for B"
    );
    gateway.shutdown().await;
}

/// Practices that share one key are distinguished by their agent allowlists. An event of A's
/// agent posted to B's URL gets 403 and is not stored, and both reject an event without an agent
/// id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_key_uses_agent_allowlists() {
    let shared = new_api_key();
    let agent_a = FIXTURE_AGENT_ID;
    let agent_b = "agent_b0000000000000000000000b";
    let mut gateway = RetellSettings::default()
        .practice(RetellPractice::new(PRACTICE).key(&shared).agent(agent_a))
        .practice(
            RetellPractice::new(OTHER_PRACTICE)
                .key_in_file(&shared)
                .agent(agent_b),
        )
        .start()
        .await;
    let client = gateway.client(Protocol::Http1);

    let call_a = "call-agent-a";
    let body_a = fixture_for_call("call_ended.json", call_a);
    let reply = deliver(&client, OTHER_PRACTICE, &shared, &body_a).await;
    assert_rejected(&reply, StatusCode::FORBIDDEN, "A's agent at B's URL");
    assert_eq!(
        call_files(&gateway.files, OTHER_PRACTICE, call_a),
        no_files(),
        "nothing stored for B"
    );

    let reply = deliver(&client, PRACTICE, &shared, &body_a).await;
    assert_accepted(&reply, "A's agent at A's URL");

    let call_b = "call-agent-b";
    let text_b = String::from_utf8(fixture_for_call("call_ended.json", call_b)).expect("UTF-8");
    let body_b = text_b.replace(agent_a, agent_b).into_bytes();
    let reply = deliver(&client, PRACTICE, &shared, &body_b).await;
    assert_rejected(&reply, StatusCode::FORBIDDEN, "B's agent at A's URL");
    assert_eq!(
        call_files(&gateway.files, PRACTICE, call_b),
        no_files(),
        "nothing stored for A"
    );
    let reply = deliver(&client, OTHER_PRACTICE, &shared, &body_b).await;
    assert_accepted(&reply, "B's agent at B's URL");
    assert_artifact_bytes(
        &client,
        &gateway,
        OTHER_PRACTICE,
        call_b,
        "event-call_ended.json",
        &body_b,
    )
    .await;

    let call_none = "call-agent-none";
    let body_none =
        format!(r#"{{"event":"call_ended","call":{{"call_id":"{call_none}"}}}}"#).into_bytes();
    for practice in [PRACTICE, OTHER_PRACTICE] {
        let reply = deliver(&client, practice, &shared, &body_none).await;
        assert_rejected(
            &reply,
            StatusCode::FORBIDDEN,
            &format!("no agent id at {practice}"),
        );
        assert_eq!(
            call_files(&gateway.files, practice, call_none),
            no_files(),
            "nothing stored for {practice}"
        );
    }
    gateway.shutdown().await;
}

/// Loading the configuration fails when practices share a key and one of them has no agent
/// allowlist, or when both allowlists name the same agent. The error names the setting.
#[test]
fn shared_key_without_allowlist_fails_config() {
    let shared = new_api_key();
    let cases = [
        (
            "A lists no agents",
            RetellSettings::default()
                .practice(RetellPractice::new(PRACTICE).key(&shared))
                .practice(
                    RetellPractice::new(OTHER_PRACTICE)
                        .key(&shared)
                        .agent("agent_b"),
                ),
            "retell_agent_ids",
        ),
        (
            "B lists no agents, key in a file",
            RetellSettings::default()
                .practice(RetellPractice::new(PRACTICE).key(&shared).agent("agent_a"))
                .practice(RetellPractice::new(OTHER_PRACTICE).key_in_file(&shared)),
            "retell_agent_ids",
        ),
        (
            "both list the same agent",
            RetellSettings::default()
                .practice(RetellPractice::new(PRACTICE).key(&shared).agent("agent_x"))
                .practice(
                    RetellPractice::new(OTHER_PRACTICE)
                        .key(&shared)
                        .agent("agent_x"),
                ),
            "agent_x",
        ),
    ];
    for (name, settings, expected) in cases {
        let files = settings.create_files();
        let error = callseal::config::Config::load(&files.config_path)
            .err()
            .unwrap_or_else(|| panic!("{name}: the configuration loads"))
            .to_string();
        assert!(error.contains("share a Retell API key"), "{name}: {error}");
        assert!(error.contains(expected), "{name}: {error}");
        assert!(
            !error.contains(&shared),
            "{name}: the error shows the key: {error}"
        );
    }

    let files = RetellSettings::default()
        .practice(RetellPractice::new(PRACTICE).key(&shared).agent("agent_a"))
        .practice(
            RetellPractice::new(OTHER_PRACTICE)
                .key(&shared)
                .agent("agent_b"),
        )
        .create_files();
    assert!(
        callseal::config::Config::load(&files.config_path).is_ok(),
        "disjoint allowlists load"
    );
}

// ---------------------------------------------------------------------------------------------
// Unknown practices, events and fields
// ---------------------------------------------------------------------------------------------

/// A practice that is not configured, one without Retell keys, and an invalid practice id all get
/// 401, and nothing is stored anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_practice_is_401() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let body = fixture_for_call("call_ended.json", "call-unknown-practice");

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        for practice in ["clinic-9", OTHER_PRACTICE, "..", "clinic%2F1"] {
            let reply = deliver(&client, practice, &key, &body).await;
            assert_rejected(
                &reply,
                StatusCode::UNAUTHORIZED,
                &format!("practice {practice:?} over {}", protocol.name()),
            );
        }
    }
    assert_eq!(
        gateway.files.stored_files(),
        Vec::<std::path::PathBuf>::new(),
        "nothing stored"
    );
    gateway.shutdown().await;
}

/// Event types and fields that callseal does not know are stored byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_events_and_fields_stored_unchanged() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);

    let call = "call-unknown-event";
    let unknown_event = format!(
        r#"{{ "event" : "call_transferred_v2", "call": {{"call_id":"{call}", "agent_id": "{FIXTURE_AGENT_ID}", "future_field": {{"nested": [1, 2.50, null, "ñ"]}}}}, "sent_at": 1767225600000 }}"#
    )
    .into_bytes();
    let reply = deliver(&client, PRACTICE, &key, &unknown_event).await;
    assert_accepted(&reply, "an unknown event type");
    assert_artifact_bytes(
        &client,
        &gateway,
        PRACTICE,
        call,
        "event-call_transferred_v2.json",
        &unknown_event,
    )
    .await;

    let text = String::from_utf8(fixture_for_call("call_ended.json", call)).expect("UTF-8");
    let known_with_extras = text
        .replacen("{\n", "{\n  \"webhook_version\": \"2099-01\",\n", 1)
        .replace(
            "\"call_status\": \"ended\",",
            "\"call_status\": \"ended\",\n    \"new_call_field\": {\"a\": [true]},",
        )
        .into_bytes();
    assert_ne!(
        known_with_extras,
        text.as_bytes(),
        "the extra fields were inserted"
    );
    let reply = deliver(&client, PRACTICE, &key, &known_with_extras).await;
    assert_accepted(&reply, "call_ended with unknown fields");
    assert_artifact_bytes(
        &client,
        &gateway,
        PRACTICE,
        call,
        "event-call_ended.json",
        &known_with_extras,
    )
    .await;
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Storage failures
// ---------------------------------------------------------------------------------------------

/// Waits until `artifact` of `call` reads back with 200, as the spool drainer delivers it.
async fn wait_for_artifact(client: &Client, gateway: &TestGateway, call: &str, artifact: &str) {
    within_guard("the spooled event reaching storage", async {
        loop {
            let reply = get_artifact(client, &gateway.files.token, PRACTICE, call, artifact).await;
            if reply.status == StatusCode::OK {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// When the call's directory cannot be created (a regular file is in its place), the delivery
/// gets 202: the event waits in the spool, and no object or temporary file is left in storage.
/// Once storage works again, the spool delivers the event without a retry from Retell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failure_spools_event() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);
    let call = "call-storage-failure";
    let body = fixture_for_call("call_ended.json", call);

    let blocker = call_dir(&gateway.files, PRACTICE, call);
    fs::create_dir_all(blocker.parent().expect("the call directory has a parent"))
        .expect("create the calls directory");
    fs::write(&blocker, b"not a directory").expect("put a file where the call directory goes");

    let reply = deliver(&client, PRACTICE, &key, &body).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    gateway.wait_until_idle().await;
    assert_eq!(
        gateway.files.stored_files(),
        vec![blocker.clone()],
        "only the blocking file is under the storage root"
    );
    assert_eq!(
        gateway.files.temporary_files(),
        Vec::<std::path::PathBuf>::new(),
        "no temporary file"
    );
    let spool = gateway.files.dir().join("spool");
    let spooled: Vec<_> = fs::read_dir(&spool)
        .expect("read the spool")
        .map(|entry| entry.expect("a spool entry").path())
        .filter(|path| path.is_file())
        .collect();
    assert_eq!(spooled.len(), 1, "one spooled event: {spooled:?}");
    let get = get_artifact(
        &client,
        &gateway.files.token,
        PRACTICE,
        call,
        "event-call_ended.json",
    )
    .await;
    assert_ne!(get.status, StatusCode::OK, "no event is readable");

    fs::remove_file(&blocker).expect("remove the blocking file");
    wait_for_artifact(&client, &gateway, call, "event-call_ended.json").await;
    assert_artifact_bytes(
        &client,
        &gateway,
        PRACTICE,
        call,
        "event-call_ended.json",
        &body,
    )
    .await;
    wait_for_artifact(&client, &gateway, call, "transcript.json").await;
    assert!(!spooled[0].exists(), "the delivered spool file is removed");
    gateway.shutdown().await;
}

/// When the event is stored but its `transcript.json` cannot be (a directory occupies the
/// version's name), the delivery is spooled. The spool must then store the transcript rather
/// than treat the event as a finished duplicate, and Retell's repeated delivery is a duplicate.
///
/// The failed rename leaves the transcript's temporary file behind until the next start (a known
/// limit of local storage, noted at `commit_in_background` in `src/storage/upload.rs`), so this
/// test does not check for temporary files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_completes_failed_transcript() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);
    let call = "call-transcript-failure";
    let body = fixture_for_call("call_ended.json", call);
    let timestamp = now_ms();

    let blocker =
        call_dir(&gateway.files, PRACTICE, call).join(version_name("transcript", timestamp, &body));
    fs::create_dir_all(blocker.join("occupied"))
        .expect("put a directory where the transcript goes");
    let signature = sign(&key, &body, timestamp);
    let reply = post_signed(&client, PRACTICE, Some(&signature), full_body(body.clone())).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    let reply = deliver(&client, PRACTICE, &key, &body).await;
    assert_accepted(&reply, "the repeated delivery");

    fs::remove_dir_all(&blocker).expect("remove the blocking directory");
    wait_for_artifact(&client, &gateway, call, "transcript.json").await;
    assert_artifact_bytes(
        &client,
        &gateway,
        PRACTICE,
        call,
        "event-call_ended.json",
        &body,
    )
    .await;
    assert_eq!(
        versions(&gateway.files, PRACTICE, call, "event-call_ended").len(),
        1,
        "one stored version"
    );
    gateway.shutdown().await;
}

/// Returns the spool's message files, oldest first.
fn spool_files(gateway: &TestGateway) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = fs::read_dir(gateway.files.dir().join("spool"))
        .expect("read the spool")
        .map(|entry| entry.expect("a spool entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Blocks a call's directory with a regular file, so that nothing of the call can be stored.
fn block_call(gateway: &TestGateway, call: &str) -> std::path::PathBuf {
    let blocker = call_dir(&gateway.files, PRACTICE, call);
    fs::create_dir_all(blocker.parent().expect("the call directory has a parent"))
        .expect("create the calls directory");
    fs::write(&blocker, b"not a directory").expect("put a file where the call directory goes");
    blocker
}

/// One call whose objects cannot be written must not hold up another call's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_call_leaves_others_stored() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);
    let blocked = "call-blocked";
    let healthy = "call-healthy";
    let blocker = block_call(&gateway, blocked);

    let reply = deliver(
        &client,
        PRACTICE,
        &key,
        &fixture_for_call("call_ended.json", blocked),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    let healthy_body = fixture_for_call("call_ended.json", healthy);
    let reply = deliver(&client, PRACTICE, &key, &healthy_body).await;
    assert_accepted(&reply, "a healthy call while another is blocked");
    assert_artifact_bytes(
        &client,
        &gateway,
        PRACTICE,
        healthy,
        "event-call_ended.json",
        &healthy_body,
    )
    .await;
    assert_eq!(
        spool_files(&gateway).len(),
        1,
        "only the blocked call waits"
    );

    fs::remove_file(&blocker).expect("remove the blocking file");
    wait_for_artifact(&client, &gateway, blocked, "event-call_ended.json").await;
    gateway.shutdown().await;
}

/// A spool file removed by hand is forgotten; the messages after it are still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_spool_file_is_forgotten() {
    let key = new_api_key();
    let mut gateway = RetellSettings::single(&key).start().await;
    let client = gateway.client(Protocol::Http1);
    let (removed, kept) = ("call-removed", "call-kept");
    let blockers = [block_call(&gateway, removed), block_call(&gateway, kept)];
    for call in [removed, kept] {
        let reply = deliver(
            &client,
            PRACTICE,
            &key,
            &fixture_for_call("call_ended.json", call),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{call}: {:?}",
            reply.body
        );
    }
    let spooled = spool_files(&gateway);
    assert_eq!(spooled.len(), 2, "{spooled:?}");
    fs::remove_file(&spooled[0]).expect("remove the older spool file");

    for blocker in &blockers {
        fs::remove_file(blocker).expect("remove a blocking file");
    }
    wait_for_artifact(&client, &gateway, kept, "event-call_ended.json").await;
    let state = std::sync::Arc::clone(gateway.state());
    within_guard("the spool index emptying", async {
        while metric_value(&state.metrics.encode(), "callseal_webhook_spool_events") != Some(0.0) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let reply = get_artifact(
        &client,
        &gateway.files.token,
        PRACTICE,
        removed,
        "event-call_ended.json",
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::NOT_FOUND,
        "the removed event is gone"
    );
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Logs and metrics
// ---------------------------------------------------------------------------------------------

/// PHI of the fixtures: names, phone numbers, identifiers, transcript and summary words, and the
/// media URLs' host, path and query parts.
const PHI_CANARIES: &[&str] = &[
    "Jordan",
    "Testpatient",
    "+15550100001",
    "5550100001",
    "5550100002",
    "metformin",
    "February 29th",
    "1980-02-29",
    "TEST-MRN-42",
    "PT-TEST-0001",
    "Example Family Clinic",
    "CA00000000000000000000000000000001",
    "identity confirmed",
    "recordings.example.test",
    "example.test",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "kb_retrieved_contents",
    "Signature=FAKE",
    "Key-Pair-Id",
    "Expires=1767312062",
];

/// The real `callseal serve` at debug level, fed valid, duplicate, tampered, misdirected and
/// unparseable deliveries and authorized and unauthorized reads, logs none of the fixtures' PHI,
/// the Retell API key or any bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_contain_no_phi_or_secrets() {
    let key = new_api_key();
    let wrong_key = new_api_key();
    let wrong_token = new_api_key();
    let files = RetellSettings::single(&key).create_files();
    let process = ServeProcess::spawn(&files, "debug").await;
    let h1 = Client::new(process.data_addr, &files.ca_cert, Protocol::Http1);
    let h2 = Client::new(process.data_addr, &files.ca_cert, Protocol::Http2);
    let ended = fixture("call_ended.json");
    let analyzed = fixture("call_analyzed.json");
    let mut rng = SeededRng::new(8);

    for client in [&h1, &h2] {
        let reply = deliver(client, PRACTICE, &key, &ended).await;
        assert_accepted(&reply, "call_ended");
        let reply = deliver(client, PRACTICE, &key, &analyzed).await;
        assert_accepted(&reply, "call_analyzed");

        let tampered = tamper_one_byte(&mut rng, &analyzed);
        let signature = sign(&key, &analyzed, now_ms());
        let reply = post_signed(client, PRACTICE, Some(&signature), full_body(tampered)).await;
        assert_rejected(&reply, StatusCode::UNAUTHORIZED, "tampered");

        let reply = deliver(client, PRACTICE, &wrong_key, &ended).await;
        assert_rejected(&reply, StatusCode::UNAUTHORIZED, "wrong key");
        let reply = deliver(client, OTHER_PRACTICE, &key, &ended).await;
        assert_rejected(&reply, StatusCode::UNAUTHORIZED, "practice without keys");
        let expired = sign(&key, &ended, now_ms() - WINDOW_MS - 60_000);
        let reply = post_signed(client, PRACTICE, Some(&expired), full_body(ended.clone())).await;
        assert_rejected(&reply, StatusCode::UNAUTHORIZED, "expired");

        let phi_id = r#"{"event":"call_ended","call":{"call_id":"Jordan Testpatient +15550100001","transcript":"metformin"}}"#;
        let reply = deliver(client, PRACTICE, &key, phi_id.as_bytes()).await;
        assert_rejected(&reply, StatusCode::BAD_REQUEST, "PHI in the call id");
        let phi_kind = r#"{"event":"Jordan Testpatient","call":{"call_id":"call-x"}}"#;
        let reply = deliver(client, PRACTICE, &key, phi_kind.as_bytes()).await;
        assert_rejected(&reply, StatusCode::BAD_REQUEST, "PHI in the event type");

        for artifact in ["event-call_ended.json", "transcript.json", "analysis.json"] {
            let reply =
                get_artifact(client, &files.token, PRACTICE, FIXTURE_CALL_ID, artifact).await;
            assert_eq!(reply.status, StatusCode::OK, "GET {artifact}");
        }
        let reply = get_artifact(
            client,
            &wrong_token,
            PRACTICE,
            FIXTURE_CALL_ID,
            "transcript.json",
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "GET with a wrong token"
        );
        let reply = get_artifact(
            client,
            &files.other_token,
            PRACTICE,
            FIXTURE_CALL_ID,
            "transcript.json",
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "GET with another practice's token"
        );
    }

    let log = process.stop().await;
    assert!(
        log.contains("webhook event stored"),
        "the log has the stored events:\n{log}"
    );
    assert!(
        log.contains("duplicate webhook delivery"),
        "the log has the duplicates:\n{log}"
    );
    assert!(
        log.contains(FIXTURE_CALL_ID),
        "the log has the call id:\n{log}"
    );
    for canary in PHI_CANARIES {
        assert!(!log.contains(canary), "the log contains the PHI {canary:?}");
    }
    let secrets = [
        ("the Retell API key", key.as_str()),
        ("the wrong Retell API key", wrong_key.as_str()),
        ("the bearer token", files.token.as_str()),
        (
            "the other practice's bearer token",
            files.other_token.as_str(),
        ),
        ("the wrong bearer token", wrong_token.as_str()),
    ];
    for (name, secret) in secrets {
        assert!(!log.contains(secret), "the log contains {name}");
    }
}

/// `callseal_http_requests_total` counts webhook requests by method and status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_webhook_requests_by_status() {
    let key = new_api_key();
    let mut gateway = RetellSettings::default()
        .practice(
            RetellPractice::new(PRACTICE)
                .key(&key)
                .agent(FIXTURE_AGENT_ID),
        )
        .max_body_bytes(MIB as u64)
        .start()
        .await;
    let client = gateway.client(Protocol::Http1);

    for call in ["call-metrics-1", "call-metrics-2"] {
        let reply = deliver(
            &client,
            PRACTICE,
            &key,
            &fixture_for_call("call_ended.json", call),
        )
        .await;
        assert_accepted(&reply, call);
    }
    let reply = deliver(
        &client,
        PRACTICE,
        &key,
        &fixture_for_call("call_ended.json", "call-metrics-1"),
    )
    .await;
    assert_accepted(&reply, "duplicate");

    let body = fixture_for_call("call_ended.json", "call-metrics-3");
    let reply = deliver(&client, PRACTICE, &new_api_key(), &body).await;
    assert_rejected(&reply, StatusCode::UNAUTHORIZED, "wrong key");
    let reply = post_signed(&client, PRACTICE, None, full_body(body.clone())).await;
    assert_rejected(&reply, StatusCode::UNAUTHORIZED, "no signature");

    let other_agent = String::from_utf8(body.clone())
        .expect("UTF-8")
        .replace(FIXTURE_AGENT_ID, "agent_other");
    let reply = deliver(&client, PRACTICE, &key, other_agent.as_bytes()).await;
    assert_rejected(&reply, StatusCode::FORBIDDEN, "agent not allowed");

    let large = call_ended_of_size("call-metrics-4", MIB + 1);
    let signature = sign(&key, &large, now_ms());
    let reply = post_signed(&client, PRACTICE, Some(&signature), streamed(&large, 3)).await;
    assert_rejected(&reply, StatusCode::PAYLOAD_TOO_LARGE, "over the limit");

    let reply = deliver(&client, PRACTICE, &key, b"not json").await;
    assert_rejected(&reply, StatusCode::BAD_REQUEST, "not JSON");

    let request = client
        .request(Method::GET, &webhook_url(PRACTICE))
        .body(common::gateway::empty_body())
        .expect("build GET");
    let reply = client.fetch(request).await;
    assert_eq!(
        reply.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "GET on the webhook URL"
    );
    assert_eq!(
        reply.header("allow"),
        Some("POST"),
        "Allow of the webhook URL"
    );

    let (status, metrics) = gateway.admin_get("/metrics").await;
    assert_eq!(status, StatusCode::OK, "GET /metrics");
    let expected = [
        ("POST", 204, 3.0),
        ("POST", 401, 2.0),
        ("POST", 403, 1.0),
        ("POST", 413, 1.0),
        ("POST", 400, 1.0),
        ("GET", 405, 1.0),
    ];
    for (method, status, count) in expected {
        let sample = format!(
            r#"callseal_http_requests_total{{route="webhook",method="{method}",status="{status}"}}"#
        );
        assert_eq!(metric_value(&metrics, &sample), Some(count), "{sample}");
    }
    let webhook_samples = metrics
        .lines()
        .filter(|line| line.starts_with("callseal_http_requests_total{route=\"webhook\""))
        .count();
    assert_eq!(
        webhook_samples,
        expected.len(),
        "no other webhook samples:\n{metrics}"
    );
    gateway.shutdown().await;
}
