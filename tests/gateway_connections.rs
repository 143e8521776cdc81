//! Acceptance tests of slow and silent clients: the header-read timeout closes their connections
//! while other clients are served normally.
//!
//! The gateway runs with `limits.header_read_timeout_secs = 2`. The slow client sends one byte per
//! second, so without the timeout its request head would take minutes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use common::gateway::{
    GatewaySettings, PRACTICE, Protocol, TestGateway, full_body, object_url, pattern_bytes,
    within_guard,
};

const HEADER_READ_TIMEOUT_SECS: u64 = 2;

async fn start_gateway() -> TestGateway {
    GatewaySettings::default()
        .header_read_timeout_secs(HEADER_READ_TIMEOUT_SECS)
        .start()
        .await
}

/// Uploads and reads back a small object, checking both responses.
async fn round_trip(gateway: &TestGateway, protocol: Protocol, call: &str) {
    let path = object_url(PRACTICE, call, "note.txt");
    let plaintext = pattern_bytes(21, 0..10_000);
    let client = gateway.client(protocol);
    let put = client
        .put(
            &path,
            &gateway.files.ingest_token,
            full_body(plaintext.clone()),
        )
        .await;
    assert_eq!(
        put.status,
        StatusCode::CREATED,
        "PUT over {}",
        protocol.name()
    );
    let get = client.get(&path, &gateway.files.token, None).await;
    assert!(
        get.bytes()[..] == plaintext[..],
        "GET over {}",
        protocol.name()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_closed_others_served() {
    let mut gateway = start_gateway().await;
    let path = object_url(PRACTICE, "call-slow", "note.txt");
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Length: 5\r\n\r\n",
        gateway.files.ingest_token
    );

    let tls = gateway.raw_tls(b"http/1.1").await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    // The reader ends when the gateway closes the connection, and returns what it received.
    let closed = tokio::spawn(async move {
        let mut received = Vec::new();
        let _ = reader.read_to_end(&mut received).await;
        received
    });
    let (first_byte_sent, first_byte) = oneshot::channel();
    let head_bytes = head.into_bytes();
    let head_length = head_bytes.len();
    let sent = Arc::new(AtomicUsize::new(0));
    let dribble = tokio::spawn({
        let sent = Arc::clone(&sent);
        async move {
            let mut first_byte_sent = Some(first_byte_sent);
            for byte in head_bytes {
                if writer.write_all(&[byte]).await.is_err() || writer.flush().await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                if let Some(signal) = first_byte_sent.take() {
                    let _ = signal.send(());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });

    first_byte
        .await
        .expect("the slow client sent its first byte");
    assert!(
        !closed.is_finished(),
        "the slow connection is open while the other client starts"
    );
    round_trip(&gateway, Protocol::Http1, "call-fast-h1").await;
    round_trip(&gateway, Protocol::Http2, "call-fast-h2").await;

    let received = within_guard("the slow connection closing", closed)
        .await
        .expect("the reader task");
    let sent = sent.load(Ordering::SeqCst);
    dribble.abort();
    assert!(
        sent < head_length,
        "closed after {sent} of {head_length} head bytes"
    );
    let response = String::from_utf8_lossy(&received);
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 408"),
        "the slow client gets no response or 408: {response:?}"
    );
    assert!(
        !gateway
            .files
            .stored_file(PRACTICE, "call-slow", "note.txt")
            .exists(),
        "nothing is stored"
    );
    gateway.shutdown().await;
}

/// A client that connects and never starts the TLS handshake is closed by the same timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed() {
    let mut gateway = start_gateway().await;
    let mut tcp = tokio::net::TcpStream::connect(gateway.data_addr)
        .await
        .expect("connect");

    round_trip(&gateway, Protocol::Http2, "call-fast").await;

    let mut received = Vec::new();
    // Any outcome of the read (end of stream or reset) means the gateway closed the connection.
    let _ = within_guard(
        "the silent connection closing",
        tcp.read_to_end(&mut received),
    )
    .await;
    assert!(
        received.is_empty(),
        "the gateway sends nothing before a ClientHello: {} bytes",
        received.len()
    );
    gateway.shutdown().await;
}
