//! Acceptance tests of the HTTPS gateway over real TLS on 127.0.0.1: round trips over HTTP/1.1
//! and h2, range reads, stored objects that were cut, extended or moved on disk, authentication,
//! and the admin listener.
//!
//! Each test starts its own gateway (`common::gateway::TestGateway`) with local storage in a
//! temporary directory. Objects use the default frame length F = 65536 unless a test sets
//! another, and AWS's Python Encryption SDK checks that what the gateway stored decrypts to what
//! was sent.

mod common;

use std::fs;
use std::ops::Range;

use http::{Method, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use serde_json::json;

use common::gateway::{
    GatewaySettings, OTHER_PRACTICE, PRACTICE, Protocol, Reply, TestGateway, empty_body, full_body,
    hash_body, metric_value, object_url, oracle_decrypt, pattern_bytes, pattern_sha256,
    random_pieces, sha256_hex, stored_header_len, stream_body,
};

const MIB: u64 = 1024 * 1024;
const ARTIFACT: &str = "recording.wav";

/// Uploads the pattern `seed` of `length` bytes with `Content-Length` and checks the 201.
async fn upload(
    gateway: &TestGateway,
    protocol: Protocol,
    call: &str,
    seed: u64,
    length: u64,
) -> Vec<u8> {
    let plaintext = pattern_bytes(seed, 0..length);
    let path = object_url(PRACTICE, call, ARTIFACT);
    let reply = gateway
        .client(protocol)
        .put(
            &path,
            &gateway.files.ingest_token,
            full_body(plaintext.clone()),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "PUT {path} over {}: {:?}",
        protocol.name(),
        reply.body
    );
    plaintext
}

/// Checks that the stored object decrypts with the ESDK to `expected` and carries the encryption
/// context of its path.
fn assert_oracle_decrypts(gateway: &TestGateway, call: &str, expected: &[u8]) {
    let stored = gateway.files.stored_file(PRACTICE, call, ARTIFACT);
    let (plaintext, header) = oracle_decrypt(&gateway.files, PRACTICE, &stored);

    assert_eq!(
        plaintext.len(),
        expected.len(),
        "ESDK plaintext length of {call}"
    );
    assert!(
        plaintext == expected,
        "ESDK plaintext of {call} differs from what was sent"
    );
    assert_eq!(
        header["encryption_context"],
        json!({ "practice": PRACTICE, "call": call, "artifact": ARTIFACT }),
        "encryption context of {call}"
    );
    assert_eq!(
        header["frame_length"],
        json!(gateway.files.frame_length),
        "frame length of {call}"
    );
}

/// Checks that a reply rejected a stored object: a 5xx status and a JSON error body, so
/// no plaintext byte.
fn assert_rejected(reply: &Reply, case: &str) {
    assert!(
        reply.status.is_server_error(),
        "{case}: expected 5xx, got {}",
        reply.status
    );
    let message = reply.error_message();
    assert!(!message.is_empty(), "{case}: the error message is empty");
}

/// Checks that a HEAD reply rejected a stored object.
fn assert_head_rejected(reply: &Reply, case: &str) {
    assert!(
        reply.status.is_server_error(),
        "{case}: expected 5xx, got {}",
        reply.status
    );
    assert!(
        reply.bytes().is_empty(),
        "{case}: a HEAD response has no body"
    );
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

/// Uploads and reads back objects of 0, 1, F-1, F, F+1 and 16F+1 bytes (F = 65536).
async fn round_trip_boundary_sizes(protocol: Protocol) {
    let mut gateway = TestGateway::new().await;
    let client = gateway.client(protocol);
    let ingest = gateway.files.ingest_token.clone();
    let reader = gateway.files.token.clone();
    let frame = u64::from(gateway.files.frame_length);

    for (index, length) in [0, 1, frame - 1, frame, frame + 1, 16 * frame + 1]
        .into_iter()
        .enumerate()
    {
        let call = format!("call-{}-{length}", protocol.name());
        let path = object_url(PRACTICE, &call, ARTIFACT);
        let plaintext = pattern_bytes(index as u64 + 1, 0..length);

        let put = client
            .put(&path, &ingest, full_body(plaintext.clone()))
            .await;
        assert_eq!(
            put.status,
            StatusCode::CREATED,
            "PUT {length} bytes: {:?}",
            put.body
        );
        let stored: serde_json::Value =
            serde_json::from_slice(put.bytes()).expect("PUT returns JSON");
        assert_eq!(
            stored["plaintext_bytes"],
            json!(length),
            "plaintext_bytes of {length}"
        );

        let get = client.get(&path, &reader, None).await;
        assert_eq!(get.status, StatusCode::OK, "GET {length} bytes");
        assert_eq!(
            get.header("content-length"),
            Some(length.to_string().as_str()),
            "Content-Length of {length}"
        );
        assert_eq!(
            sha256_hex(get.bytes()),
            sha256_hex(&plaintext),
            "SHA-256 of GET {length} bytes"
        );

        let head = client.head(&path, &reader).await;
        assert_eq!(head.status, StatusCode::OK, "HEAD {length} bytes");
        assert_eq!(
            head.header("content-length"),
            Some(length.to_string().as_str()),
            "HEAD Content-Length of {length}"
        );

        assert_oracle_decrypts(&gateway, &call, &plaintext);
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_sizes_http1() {
    round_trip_boundary_sizes(Protocol::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_sizes_http2() {
    round_trip_boundary_sizes(Protocol::Http2).await;
}

/// Streams 50 MiB without `Content-Length`, in pieces of 1 byte to 64 KiB, and reads it back.
async fn round_trip_streamed_50_mib(protocol: Protocol) {
    let mut gateway = TestGateway::new().await;
    let client = gateway.client(protocol);
    let ingest = gateway.files.ingest_token.clone();
    let reader = gateway.files.token.clone();
    let length = 50 * MIB;
    let seed = 50;
    let call = format!("call-{}-streamed", protocol.name());
    let path = object_url(PRACTICE, &call, ARTIFACT);

    let body = stream_body(random_pieces(seed, 7, length));
    assert_eq!(
        body.size_hint().exact(),
        None,
        "the body has no known length, so no Content-Length is sent"
    );
    let request = client
        .authorized(Method::PUT, &path, &ingest)
        .body(body)
        .expect("build PUT");
    let put = client.fetch(request).await;
    assert_eq!(
        put.status,
        StatusCode::CREATED,
        "streamed PUT: {:?}",
        put.body
    );

    let request = client
        .authorized(Method::GET, &path, &reader)
        .body(empty_body())
        .expect("build GET");
    let response = client.send(request).await.expect("GET the streamed object");
    assert_eq!(response.status(), StatusCode::OK, "GET status");
    let (received, digest) = hash_body(response).await.expect("the GET body completes");
    assert_eq!(received, length, "GET length");
    assert_eq!(
        hex::encode(digest),
        hex::encode(pattern_sha256(seed, length)),
        "SHA-256 of GET"
    );

    assert_oracle_decrypts(&gateway, &call, &pattern_bytes(seed, 0..length));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_50_mib_http1() {
    round_trip_streamed_50_mib(Protocol::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_50_mib_http2() {
    round_trip_streamed_50_mib(Protocol::Http2).await;
}

// ---------------------------------------------------------------------------------------------
// Range reads
// ---------------------------------------------------------------------------------------------

/// What a `Range` request should return.
enum Expect {
    /// 206 with exactly these plaintext bytes.
    Partial(Range<u64>),
    /// 416 with `Content-Range: bytes */{length}`.
    Unsatisfiable,
}

/// Sends each `Range` header over both protocols and checks status, headers and body.
async fn check_ranges(
    gateway: &TestGateway,
    call: &str,
    seed: u64,
    length: u64,
    cases: &[(String, Expect)],
) {
    let path = object_url(PRACTICE, call, ARTIFACT);
    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        for (range, expect) in cases {
            let case = format!("{range} on {length} bytes over {}", protocol.name());
            let reply = client.get(&path, &gateway.files.token, Some(range)).await;
            match expect {
                Expect::Partial(bytes) => {
                    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{case}");
                    let content_length = (bytes.end - bytes.start).to_string();
                    assert_eq!(
                        reply.header("content-length"),
                        Some(content_length.as_str()),
                        "Content-Length of {case}"
                    );
                    let content_range = format!("bytes {}-{}/{length}", bytes.start, bytes.end - 1);
                    assert_eq!(
                        reply.header("content-range"),
                        Some(content_range.as_str()),
                        "Content-Range of {case}"
                    );
                    assert_eq!(
                        reply.bytes().len() as u64,
                        bytes.end - bytes.start,
                        "body length of {case}"
                    );
                    assert!(
                        reply.bytes()[..] == pattern_bytes(seed, bytes.clone())[..],
                        "body of {case}"
                    );
                }
                Expect::Unsatisfiable => {
                    assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE, "{case}");
                    let content_range = format!("bytes */{length}");
                    assert_eq!(
                        reply.header("content-range"),
                        Some(content_range.as_str()),
                        "Content-Range of {case}"
                    );
                    reply.error_message();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_multi_frame_object() {
    let mut gateway = TestGateway::new().await;
    let frame = u64::from(gateway.files.frame_length);
    let length = 3 * frame + 100;
    let seed = 31;
    upload(&gateway, Protocol::Http2, "call-ranges", seed, length).await;

    let cases = [
        ("bytes=0-0".to_owned(), Expect::Partial(0..1)),
        (
            format!("bytes={0}-{0}", length - 1),
            Expect::Partial(length - 1..length),
        ),
        (
            format!("bytes={}-{}", frame - 3, frame + 2),
            Expect::Partial(frame - 3..frame + 3),
        ),
        (
            format!("bytes={}-{}", 2 * frame - 1, 2 * frame),
            Expect::Partial(2 * frame - 1..2 * frame + 1),
        ),
        (
            format!("bytes={}-{}", 3 * frame - 1, 3 * frame),
            Expect::Partial(3 * frame - 1..3 * frame + 1),
        ),
        (
            format!("bytes=-{}", frame + 5),
            Expect::Partial(length - frame - 5..length),
        ),
        (format!("bytes=-{}", length + 1), Expect::Partial(0..length)),
        (
            format!("bytes={}-", 2 * frame + 7),
            Expect::Partial(2 * frame + 7..length),
        ),
        ("bytes=0-".to_owned(), Expect::Partial(0..length)),
        (format!("bytes={length}-"), Expect::Unsatisfiable),
        (
            format!("bytes={}-{}", length + 10, length + 20),
            Expect::Unsatisfiable,
        ),
        ("bytes=-0".to_owned(), Expect::Unsatisfiable),
    ];
    check_ranges(&gateway, "call-ranges", seed, length, &cases).await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_frame_sized_object() {
    let mut gateway = TestGateway::new().await;
    let frame = u64::from(gateway.files.frame_length);
    let seed = 32;
    upload(&gateway, Protocol::Http1, "call-one-frame", seed, frame).await;

    let cases = [
        ("bytes=0-0".to_owned(), Expect::Partial(0..1)),
        (
            format!("bytes={0}-{0}", frame - 1),
            Expect::Partial(frame - 1..frame),
        ),
        (
            format!("bytes={}-{}", frame / 2 - 1, frame / 2),
            Expect::Partial(frame / 2 - 1..frame / 2 + 1),
        ),
        ("bytes=-10".to_owned(), Expect::Partial(frame - 10..frame)),
        (format!("bytes=-{frame}"), Expect::Partial(0..frame)),
        (
            format!("bytes={}-", frame - 10),
            Expect::Partial(frame - 10..frame),
        ),
        (
            format!("bytes=0-{}", frame + 100),
            Expect::Partial(0..frame),
        ),
        (format!("bytes={frame}-"), Expect::Unsatisfiable),
        (
            format!("bytes={}-{}", frame + 1, frame + 2),
            Expect::Unsatisfiable,
        ),
    ];
    check_ranges(&gateway, "call-one-frame", seed, frame, &cases).await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_empty_object() {
    let mut gateway = TestGateway::new().await;
    upload(&gateway, Protocol::Http1, "call-empty", 33, 0).await;

    let cases = ["bytes=0-0", "bytes=0-", "bytes=-1", "bytes=-0", "bytes=5-9"]
        .map(|range| (range.to_owned(), Expect::Unsatisfiable));
    check_ranges(&gateway, "call-empty", 33, 0, &cases).await;

    let path = object_url(PRACTICE, "call-empty", ARTIFACT);
    for protocol in Protocol::ALL {
        let whole = gateway
            .client(protocol)
            .get(&path, &gateway.files.token, None)
            .await;
        assert_eq!(
            whole.status,
            StatusCode::OK,
            "GET without Range over {}",
            protocol.name()
        );
        assert_eq!(
            whole.header("content-length"),
            Some("0"),
            "Content-Length over {}",
            protocol.name()
        );
        assert!(whole.bytes().is_empty(), "body over {}", protocol.name());
    }
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Stored objects changed on disk
// ---------------------------------------------------------------------------------------------

/// A change to a stored object file that the gateway must detect.
#[derive(Clone, Copy, Debug)]
enum Damage {
    CutOneByte,
    /// Cuts the final frame whole, so the object ends after its last regular frame.
    CutFinalFrame,
    /// Cuts the last regular frame out of the middle, so the final frame follows a gap.
    CutRegularFrame,
    AppendOneByte,
    /// Appends a copy of the final frame.
    AppendFinalFrameCopy,
}

impl Damage {
    /// Applies the damage to a stored object of 3 regular frames and a final frame of 100 bytes.
    fn apply(self, stored: &[u8], frame: u64) -> Vec<u8> {
        let header = stored_header_len(stored);
        let regular = frame as usize + callseal::envelope::REGULAR_FRAME_OVERHEAD;
        let final_start = header + 3 * regular;
        assert_eq!(
            stored.len(),
            final_start + callseal::envelope::FINAL_FRAME_OVERHEAD + 100,
            "stored layout"
        );

        let mut damaged = stored.to_vec();
        match self {
            Damage::CutOneByte => {
                damaged.pop();
            }
            Damage::CutFinalFrame => damaged.truncate(final_start),
            Damage::CutRegularFrame => {
                damaged.drain(final_start - regular..final_start);
            }
            Damage::AppendOneByte => damaged.push(0),
            Damage::AppendFinalFrameCopy => damaged.extend_from_slice(&stored[final_start..]),
        }
        damaged
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_or_extended_objects_rejected() {
    let mut gateway = TestGateway::new().await;
    let frame = u64::from(gateway.files.frame_length);
    let reader = gateway.files.token.clone();
    let damages = [
        Damage::CutOneByte,
        Damage::CutFinalFrame,
        Damage::CutRegularFrame,
        Damage::AppendOneByte,
        Damage::AppendFinalFrameCopy,
    ];

    for (index, damage) in damages.into_iter().enumerate() {
        let call = format!("call-damaged-{index}");
        upload(
            &gateway,
            Protocol::Http2,
            &call,
            40 + index as u64,
            3 * frame + 100,
        )
        .await;
        let stored_path = gateway.files.stored_file(PRACTICE, &call, ARTIFACT);
        let stored = fs::read(&stored_path).expect("read the stored object");
        fs::write(&stored_path, damage.apply(&stored, frame)).expect("write the damaged object");

        let path = object_url(PRACTICE, &call, ARTIFACT);
        for protocol in Protocol::ALL {
            let client = gateway.client(protocol);
            let case = format!("{damage:?} over {}", protocol.name());
            assert_rejected(
                &client.get(&path, &reader, None).await,
                &format!("GET {case}"),
            );
            assert_head_rejected(&client.head(&path, &reader).await, &format!("HEAD {case}"));
            assert_rejected(
                &client.get(&path, &reader, Some("bytes=-10")).await,
                &format!("suffix range {case}"),
            );
            assert_rejected(
                &client.get(&path, &reader, Some("bytes=0-0")).await,
                &format!("first byte {case}"),
            );
        }
    }
    gateway.shutdown().await;
}

/// A frame that fails authentication during a GET ends the transfer with an error, never with a
/// clean end, and no plaintext of that frame or a later one is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_middle_frame_breaks_transfer() {
    let mut gateway = TestGateway::new().await;
    let frame = u64::from(gateway.files.frame_length);
    let reader = gateway.files.token.clone();
    let seed = 45;
    let plaintext = upload(
        &gateway,
        Protocol::Http1,
        "call-tampered",
        seed,
        3 * frame + 100,
    )
    .await;

    let stored_path = gateway
        .files
        .stored_file(PRACTICE, "call-tampered", ARTIFACT);
    let mut stored = fs::read(&stored_path).expect("read the stored object");
    let second_frame =
        stored_header_len(&stored) + frame as usize + callseal::envelope::REGULAR_FRAME_OVERHEAD;
    stored[second_frame + 100] ^= 0x01;
    fs::write(&stored_path, &stored).expect("write the tampered object");

    let path = object_url(PRACTICE, "call-tampered", ARTIFACT);
    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        let request = client
            .authorized(Method::GET, &path, &reader)
            .body(empty_body())
            .expect("build GET");
        // The failure may come before hyper flushed the response head (HTTP/1.1 buffers it with
        // the first body bytes), so a connection closed without a response is broken too.
        let mut received = Vec::new();
        let mut failed = false;
        match client.send(request).await {
            Err(_) => failed = true,
            Ok(response) => {
                assert_eq!(
                    response.status(),
                    StatusCode::OK,
                    "GET status over {}",
                    protocol.name()
                );
                let mut body = response.into_body();
                while let Some(chunk) = body.frame().await {
                    match chunk {
                        Ok(chunk) => {
                            received.extend_from_slice(&chunk.into_data().unwrap_or_default())
                        }
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
            }
        }
        assert!(
            failed,
            "the transfer over {} must end with an error",
            protocol.name()
        );
        assert!(
            received.len() as u64 <= frame,
            "at most frame 1 is sent over {}",
            protocol.name()
        );
        assert!(
            received[..] == plaintext[..received.len()],
            "what was sent is frame 1's plaintext"
        );
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_objects_are_rejected() {
    let mut gateway = TestGateway::new().await;
    upload(&gateway, Protocol::Http1, "call-a", 50, 100_000).await;
    let original = gateway.files.stored_file(PRACTICE, "call-a", ARTIFACT);

    let moves = [
        (PRACTICE, "call-b", ARTIFACT, gateway.files.token.clone()),
        (
            OTHER_PRACTICE,
            "call-a",
            ARTIFACT,
            gateway.files.other_token.clone(),
        ),
        (
            PRACTICE,
            "call-a",
            "transcript.json",
            gateway.files.token.clone(),
        ),
    ];
    for (practice, call, artifact, token) in moves {
        let copy = gateway.files.stored_file(practice, call, artifact);
        fs::create_dir_all(copy.parent().expect("object files have a parent"))
            .expect("create the call directory");
        fs::copy(&original, &copy).expect("copy the stored object");

        let path = object_url(practice, call, artifact);
        for protocol in Protocol::ALL {
            let client = gateway.client(protocol);
            let case = format!("{practice}/{call}/{artifact} over {}", protocol.name());
            assert_rejected(
                &client.get(&path, &token, None).await,
                &format!("GET {case}"),
            );
            assert_head_rejected(&client.head(&path, &token).await, &format!("HEAD {case}"));
            assert_rejected(
                &client.get(&path, &token, Some("bytes=0-9")).await,
                &format!("range {case}"),
            );
        }
    }

    let original_path = object_url(PRACTICE, "call-a", ARTIFACT);
    let reply = gateway
        .client(Protocol::Http2)
        .get(&original_path, &gateway.files.token, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "the original stays readable");
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Authentication, ids and routes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_401() {
    let mut gateway = TestGateway::new().await;
    upload(&gateway, Protocol::Http1, "call-1", 60, 1000).await;
    let path = object_url(PRACTICE, "call-1", ARTIFACT);
    let new_path = object_url(PRACTICE, "call-2", ARTIFACT);

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        let requests = [
            client.request(Method::GET, &path).body(empty_body()),
            client.request(Method::HEAD, &path).body(empty_body()),
            client
                .request(Method::PUT, &new_path)
                .body(full_body(vec![1u8; 10])),
        ];
        for request in requests {
            let request = request.expect("build the request");
            let case = format!(
                "{} without a token over {}",
                request.method(),
                protocol.name()
            );
            let reply = client.fetch(request).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{case}");
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer"),
                "WWW-Authenticate of {case}"
            );
        }
    }
    assert!(
        !gateway
            .files
            .stored_file(PRACTICE, "call-2", ARTIFACT)
            .exists(),
        "nothing is stored"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_401() {
    let mut gateway = TestGateway::new().await;
    upload(&gateway, Protocol::Http1, "call-1", 61, 1000).await;
    let path = object_url(PRACTICE, "call-1", ARTIFACT);
    let wrong = format!("{}0", gateway.files.token);

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        let reply = client.get(&path, &wrong, None).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "wrong token over {}",
            protocol.name()
        );
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer"),
            "WWW-Authenticate over {}",
            protocol.name()
        );

        let basic = client
            .request(Method::GET, &path)
            .header(
                header::AUTHORIZATION,
                format!("Basic {}", gateway.files.token),
            )
            .body(empty_body())
            .expect("build GET");
        let reply = client.fetch(basic).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "Basic scheme over {}",
            protocol.name()
        );
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_practice_token_is_403() {
    let mut gateway = TestGateway::new().await;
    upload(&gateway, Protocol::Http1, "call-1", 62, 1000).await;
    let path = object_url(PRACTICE, "call-1", ARTIFACT);
    let new_path = object_url(PRACTICE, "call-2", ARTIFACT);
    let other_reader = gateway.files.other_token.clone();
    let other_ingest = gateway.files.other_ingest_token.clone();

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        assert_eq!(
            client.get(&path, &other_reader, None).await.status,
            StatusCode::FORBIDDEN,
            "GET over {}",
            protocol.name()
        );
        assert_eq!(
            client.head(&path, &other_reader).await.status,
            StatusCode::FORBIDDEN,
            "HEAD over {}",
            protocol.name()
        );
        let put = client
            .put(&new_path, &other_ingest, full_body(vec![1u8; 10]))
            .await;
        assert_eq!(
            put.status,
            StatusCode::FORBIDDEN,
            "PUT over {}",
            protocol.name()
        );
    }
    assert!(
        !gateway
            .files
            .stored_file(PRACTICE, "call-2", ARTIFACT)
            .exists(),
        "nothing is stored"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ids_are_400() {
    let mut gateway = TestGateway::new().await;
    let ingest = gateway.files.ingest_token.clone();
    let reader = gateway.files.token.clone();
    let long = "c".repeat(129);
    let paths = [
        format!("/v1/practices/{PRACTICE}/calls/../{ARTIFACT}"),
        format!("/v1/practices/{PRACTICE}/calls/call-1/.."),
        format!("/v1/practices/{PRACTICE}/calls/./{ARTIFACT}"),
        format!("/v1/practices/../calls/call-1/{ARTIFACT}"),
        format!("/v1/practices/{PRACTICE}/calls/call%2F1/{ARTIFACT}"),
        format!("/v1/practices/{PRACTICE}/calls/call-1/..%2F..%2Fkeys"),
        format!("/v1/practices/{PRACTICE}/calls/call%00/{ARTIFACT}"),
        format!("/v1/practices/{PRACTICE}/calls/{long}/{ARTIFACT}"),
        format!("/v1/practices/{PRACTICE}/calls/call-1/{long}"),
        format!("/v1/practices/{long}/calls/call-1/{ARTIFACT}"),
    ];

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        for path in &paths {
            let get = client.get(path, &reader, None).await;
            assert_eq!(
                get.status,
                StatusCode::BAD_REQUEST,
                "GET {path} over {}",
                protocol.name()
            );
            let put = client.put(path, &ingest, full_body(vec![1u8; 10])).await;
            assert_eq!(
                put.status,
                StatusCode::BAD_REQUEST,
                "PUT {path} over {}",
                protocol.name()
            );
        }
    }
    assert_eq!(
        gateway.files.stored_files(),
        Vec::<std::path::PathBuf>::new(),
        "nothing is stored"
    );

    // The pair of the over-long case: 128 bytes is the maximum and is accepted.
    let longest = "c".repeat(128);
    let path = object_url(PRACTICE, &longest, ARTIFACT);
    let put = gateway
        .client(Protocol::Http1)
        .put(&path, &ingest, full_body(vec![1u8; 10]))
        .await;
    assert_eq!(
        put.status,
        StatusCode::CREATED,
        "a 128-byte call id is valid"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_is_404() {
    let mut gateway = TestGateway::new().await;
    let reader = gateway.files.token.clone();
    let paths = [
        "/".to_owned(),
        "/v1".to_owned(),
        format!("/v1/practices/{PRACTICE}"),
        format!("/v1/practices/{PRACTICE}/calls"),
        format!("/v1/practices/{PRACTICE}/calls/call-1/{ARTIFACT}/extra"),
        format!("/v1/practices/{PRACTICE}/recordings/call-1/{ARTIFACT}"),
        format!("/v2/practices/{PRACTICE}/calls/call-1/{ARTIFACT}"),
    ];
    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        for path in &paths {
            let reply = client.get(path, &reader, None).await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "GET {path} over {}",
                protocol.name()
            );
        }
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_methods_are_405() {
    let mut gateway = TestGateway::new().await;
    upload(&gateway, Protocol::Http1, "call-1", 63, 1000).await;
    let path = object_url(PRACTICE, "call-1", ARTIFACT);

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        for method in [Method::POST, Method::PATCH, Method::OPTIONS] {
            let request = client
                .authorized(method.clone(), &path, &gateway.files.admin_token)
                .body(empty_body());
            let reply = client.fetch(request.expect("build the request")).await;
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} over {}",
                protocol.name()
            );
            assert_eq!(
                reply.header("allow"),
                Some("GET, HEAD, PUT, DELETE"),
                "Allow of {method} over {}",
                protocol.name()
            );
        }
    }
    let reply = gateway
        .client(Protocol::Http1)
        .get(&path, &gateway.files.token, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "the object is still in place");
    gateway.shutdown().await;
}

/// DELETE is allowed to the `admin` role only; the other roles get 403 and the object stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_needs_admin_role() {
    let mut gateway = TestGateway::new().await;
    for protocol in Protocol::ALL {
        let call = format!("call-delete-{}", protocol.name());
        upload(&gateway, protocol, &call, 65, 1000).await;
        let path = object_url(PRACTICE, &call, ARTIFACT);
        let client = gateway.client(protocol);

        for token in [&gateway.files.ingest_token, &gateway.files.token] {
            let request = client
                .authorized(Method::DELETE, &path, token)
                .body(empty_body())
                .expect("build DELETE");
            let reply = client.fetch(request).await;
            assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.request);
        }
        let get = client.get(&path, &gateway.files.token, None).await;
        assert_eq!(
            get.status,
            StatusCode::OK,
            "kept after 403 over {}",
            protocol.name()
        );

        let request = client
            .authorized(Method::DELETE, &path, &gateway.files.admin_token)
            .body(empty_body())
            .expect("build DELETE");
        let reply = client.fetch(request).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.request);
        let get = client.get(&path, &gateway.files.token, None).await;
        assert_eq!(
            get.status,
            StatusCode::NOT_FOUND,
            "GET after DELETE over {}",
            protocol.name()
        );
        assert!(
            !gateway
                .files
                .stored_file(PRACTICE, &call, ARTIFACT)
                .exists(),
            "the object file is gone over {}",
            protocol.name()
        );
    }
    gateway.shutdown().await;
}

/// Each role may do only its own action: an `ingest` token cannot read, a `reader` token cannot
/// upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_role_is_403() {
    let mut gateway = TestGateway::new().await;
    upload(&gateway, Protocol::Http1, "call-1", 66, 1000).await;
    let path = object_url(PRACTICE, "call-1", ARTIFACT);
    let new_path = object_url(PRACTICE, "call-2", ARTIFACT);
    let ingest = gateway.files.ingest_token.clone();
    let reader = gateway.files.token.clone();

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        let get = client.get(&path, &ingest, None).await;
        assert_eq!(
            get.status,
            StatusCode::FORBIDDEN,
            "{} with ingest",
            get.request
        );
        let head = client.head(&path, &ingest).await;
        assert_eq!(
            head.status,
            StatusCode::FORBIDDEN,
            "{} with ingest",
            head.request
        );
        let put = client
            .put(&new_path, &reader, full_body(vec![1u8; 10]))
            .await;
        assert_eq!(
            put.status,
            StatusCode::FORBIDDEN,
            "{} with reader",
            put.request
        );
    }
    assert!(
        !gateway
            .files
            .stored_file(PRACTICE, "call-2", ARTIFACT)
            .exists(),
        "nothing is stored"
    );
    gateway.shutdown().await;
}

/// HEAD responses carry no content on either protocol (RFC 9110, section 9.3.2), also when they
/// report an error whose GET response has a JSON body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_responses_have_no_body() {
    let mut gateway = TestGateway::new().await;
    upload(&gateway, Protocol::Http1, "call-1", 64, 1000).await;
    let path = object_url(PRACTICE, "call-1", ARTIFACT);
    let missing = object_url(PRACTICE, "call-missing", ARTIFACT);
    let reader = gateway.files.token.clone();

    for protocol in Protocol::ALL {
        let client = gateway.client(protocol);
        let cases = [
            (client.head(&path, &reader).await, StatusCode::OK),
            (client.head(&missing, &reader).await, StatusCode::NOT_FOUND),
            (
                client.head(&path, "not-a-token").await,
                StatusCode::UNAUTHORIZED,
            ),
            (
                client.head(&path, &gateway.files.other_token).await,
                StatusCode::FORBIDDEN,
            ),
        ];
        for (reply, status) in cases {
            assert_eq!(reply.status, status, "{}", reply.request);
            assert!(reply.bytes().is_empty(), "{} has no body", reply.request);
        }
    }
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Admin listener
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_key_file() {
    let mut gateway = TestGateway::new().await;

    let (status, body) = gateway.admin_get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "/healthz: {body}");
    let (status, body) = gateway.admin_get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "/readyz: {body}");

    fs::remove_file(gateway.files.key_file(PRACTICE)).expect("delete the practice's key file");
    let (status, body) = gateway.admin_get("/readyz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/readyz without the key file: {body}"
    );
    assert!(
        body.contains(PRACTICE),
        "the reason names the practice: {body}"
    );
    let (status, _) = gateway.admin_get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "/healthz does not depend on keys");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_round_trip() {
    let mut gateway = TestGateway::new().await;
    let length = 100_000;
    upload(&gateway, Protocol::Http1, "call-1", 70, length).await;
    let path = object_url(PRACTICE, "call-1", ARTIFACT);
    let client = gateway.client(Protocol::Http2);
    let get = client.get(&path, &gateway.files.token, None).await;
    assert_eq!(get.bytes().len() as u64, length, "GET length");
    let missing = client.get("/nowhere", &gateway.files.token, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "unknown route");
    let unauthenticated = client.get(&path, "not-a-token", None).await;
    assert_eq!(
        unauthenticated.status,
        StatusCode::UNAUTHORIZED,
        "wrong token"
    );

    let (status, text) = gateway.admin_get("/metrics").await;
    assert_eq!(status, StatusCode::OK, "/metrics");
    let expected = [
        (
            r#"callseal_http_requests_total{route="object",method="PUT",status="201"}"#,
            1.0,
        ),
        (
            r#"callseal_http_requests_total{route="object",method="GET",status="200"}"#,
            1.0,
        ),
        (
            r#"callseal_http_requests_total{route="object",method="GET",status="401"}"#,
            1.0,
        ),
        (
            r#"callseal_http_requests_total{route="not_found",method="GET",status="404"}"#,
            1.0,
        ),
        (
            r#"callseal_http_request_body_bytes_total{route="object"}"#,
            length as f64,
        ),
        (
            r#"callseal_http_response_body_bytes_total{route="object"}"#,
            length as f64,
        ),
        ("callseal_active_streams", 0.0),
    ];
    for (sample, value) in expected {
        assert_eq!(
            metric_value(&text, sample),
            Some(value),
            "{sample} in:\n{text}"
        );
    }
    gateway.shutdown().await;
}

/// A gateway configured with 4 KiB frames writes 4 KiB frames, and the ESDK decrypts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_frame_length_is_used() {
    let mut gateway = GatewaySettings::default().frame_length(4096).start().await;
    for protocol in Protocol::ALL {
        let call = format!("call-small-frames-{}", protocol.name());
        let plaintext = upload(&gateway, protocol, &call, 80, 5 * 4096 + 1).await;
        assert_oracle_decrypts(&gateway, &call, &plaintext);
    }
    gateway.shutdown().await;
}
