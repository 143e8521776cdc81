//! Acceptance tests of uploads that do not end well: bodies over the size limit, clients that
//! disconnect midway, uploads over an existing object, and uploads in flight at shutdown.
//!
//! In every case nothing partial may become readable and no temporary upload file may remain
//! under the storage root (object_store stages an upload as `{artifact}#{n}` next to its target).

mod common;

use std::fs;
use std::path::PathBuf;

use bytes::Bytes;
use futures::SinkExt;
use http::{Method, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::gateway::{
    BoxError, GatewaySettings, PRACTICE, Protocol, TestGateway, channel_body, full_body,
    object_url, pattern_bytes, random_pieces, read_reply, stream_body, within_guard,
};

const ARTIFACT: &str = "recording.wav";

/// The upload limit of the limit tests: above one 256 KiB flush of encrypted output, so the
/// gateway has written to storage before the limit is crossed.
const LIMIT: u64 = 300_000;

fn no_files() -> Vec<PathBuf> {
    Vec::new()
}

/// Waits until the gateway has started the upload of `call`, which it shows by creating the
/// temporary file.
async fn wait_for_upload_start(gateway: &TestGateway, call: &str) {
    let stored = gateway.files.stored_file(PRACTICE, call, ARTIFACT);
    let call_dir = stored.parent().expect("object files have a parent");
    within_guard("the upload's temporary file", async {
        loop {
            let started = fs::read_dir(call_dir).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.file_name().to_string_lossy().contains('#'))
            });
            if started {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Sends the head of an HTTP/1.1 request over raw TLS and returns the stream.
async fn raw_http1_head(
    gateway: &TestGateway,
    path: &str,
    content_length: u64,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = gateway.raw_tls(b"http/1.1").await;
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Length: {content_length}\r\n\r\n",
        gateway.files.ingest_token
    );
    tls.write_all(head.as_bytes())
        .await
        .expect("send the request head");
    tls.flush().await.expect("flush the request head");
    tls
}

/// Reads an HTTP/1.1 response head from a raw stream and returns its status line.
async fn read_status_line(stream: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    within_guard("the response head", async {
        while !received.ends_with(b"\r\n\r\n") {
            let read = stream
                .read(&mut byte)
                .await
                .expect("read the response head");
            assert_eq!(
                read,
                1,
                "the connection closed before a response: {:?}",
                String::from_utf8_lossy(&received)
            );
            received.push(byte[0]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Upload limit
// ---------------------------------------------------------------------------------------------

/// A `Content-Length` over the limit gets 413 while the client has not sent a
/// single body byte, so the gateway decided from the header alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_over_limit_is_413() {
    let mut gateway = GatewaySettings::default()
        .max_upload_bytes(LIMIT)
        .start()
        .await;
    let path = object_url(PRACTICE, "call-too-long", ARTIFACT);

    let mut tls = raw_http1_head(&gateway, &path, LIMIT + 1).await;
    assert_eq!(
        read_status_line(&mut tls).await,
        "HTTP/1.1 413 Payload Too Large",
        "HTTP/1.1"
    );
    drop(tls);

    let client = gateway.client(Protocol::Http2);
    let request = client
        .authorized(Method::PUT, &path, &gateway.files.ingest_token)
        .header(header::CONTENT_LENGTH, LIMIT + 1)
        .body(stream_body(futures::stream::pending::<
            Result<Bytes, BoxError>,
        >()))
        .expect("build PUT");
    let response = client
        .send(request)
        .await
        .expect("the h2 response arrives before any body byte");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "h2");

    gateway.wait_until_idle().await;
    assert_eq!(
        gateway.files.stored_files(),
        no_files(),
        "nothing is stored"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_at_limit_is_stored() {
    let mut gateway = GatewaySettings::default()
        .max_upload_bytes(LIMIT)
        .start()
        .await;
    for protocol in Protocol::ALL {
        let path = object_url(
            PRACTICE,
            &format!("call-at-limit-{}", protocol.name()),
            ARTIFACT,
        );
        let plaintext = pattern_bytes(1, 0..LIMIT);
        let put = gateway
            .client(protocol)
            .put(
                &path,
                &gateway.files.ingest_token,
                full_body(plaintext.clone()),
            )
            .await;
        assert_eq!(
            put.status,
            StatusCode::CREATED,
            "PUT of the limit over {}",
            protocol.name()
        );

        let get = gateway
            .client(protocol)
            .get(&path, &gateway.files.token, None)
            .await;
        assert!(
            get.bytes()[..] == plaintext[..],
            "GET after PUT of the limit over {}",
            protocol.name()
        );
    }
    gateway.shutdown().await;
}

/// A body without `Content-Length` that crosses the limit is rejected with 413 and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_over_limit_is_413() {
    let mut gateway = GatewaySettings::default()
        .max_upload_bytes(LIMIT)
        .start()
        .await;
    for protocol in Protocol::ALL {
        let path = object_url(
            PRACTICE,
            &format!("call-over-limit-{}", protocol.name()),
            ARTIFACT,
        );
        let body = stream_body(random_pieces(2, 3, LIMIT + 1));
        let client = gateway.client(protocol);
        let request = client
            .authorized(Method::PUT, &path, &gateway.files.ingest_token)
            .body(body)
            .expect("build PUT");
        let reply = client.fetch(request).await;
        assert_eq!(
            reply.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "over {}",
            protocol.name()
        );

        gateway.wait_until_idle().await;
        let get = gateway
            .client(protocol)
            .get(&path, &gateway.files.token, None)
            .await;
        assert_eq!(
            get.status,
            StatusCode::NOT_FOUND,
            "GET after 413 over {}",
            protocol.name()
        );
        assert_eq!(
            gateway.files.stored_files(),
            no_files(),
            "nothing is stored over {}",
            protocol.name()
        );
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_at_limit_is_stored() {
    let mut gateway = GatewaySettings::default()
        .max_upload_bytes(LIMIT)
        .start()
        .await;
    for protocol in Protocol::ALL {
        let path = object_url(
            PRACTICE,
            &format!("call-at-limit-{}", protocol.name()),
            ARTIFACT,
        );
        let client = gateway.client(protocol);
        let body = stream_body(random_pieces(4, 5, LIMIT));
        let request = client
            .authorized(Method::PUT, &path, &gateway.files.ingest_token)
            .body(body)
            .expect("build PUT");
        let reply = client.fetch(request).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "over {}",
            protocol.name()
        );

        let get = client.get(&path, &gateway.files.token, None).await;
        assert!(
            get.bytes()[..] == pattern_bytes(4, 0..LIMIT)[..],
            "GET over {}",
            protocol.name()
        );
    }
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Disconnects and conflicts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_disconnect_mid_upload_stores_nothing() {
    let mut gateway = TestGateway::new().await;
    let path = object_url(PRACTICE, "call-cut", ARTIFACT);

    let mut tls = raw_http1_head(&gateway, &path, 1_000_000).await;
    tls.write_all(&pattern_bytes(6, 0..300_000))
        .await
        .expect("send part of the body");
    tls.flush().await.expect("flush part of the body");
    wait_for_upload_start(&gateway, "call-cut").await;
    drop(tls);

    gateway.wait_until_idle().await;
    assert_eq!(
        gateway.files.temporary_files(),
        no_files(),
        "no temporary file remains"
    );
    assert!(
        !gateway
            .files
            .stored_file(PRACTICE, "call-cut", ARTIFACT)
            .exists(),
        "no object file"
    );
    let get = gateway
        .client(Protocol::Http1)
        .get(&path, &gateway.files.token, None)
        .await;
    assert_eq!(
        get.status,
        StatusCode::NOT_FOUND,
        "GET after the disconnect"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_disconnect_mid_upload_stores_nothing() {
    let mut gateway = TestGateway::new().await;
    let path = object_url(PRACTICE, "call-cut", ARTIFACT);
    let client = gateway.client(Protocol::Http2);

    let (mut sender, body) = channel_body();
    let request = client
        .authorized(Method::PUT, &path, &gateway.files.ingest_token)
        .header(header::CONTENT_LENGTH, 1_000_000)
        .body(body)
        .expect("build PUT");
    let mut connection = client.connect().await;
    let transport = connection.transport();
    let response = tokio::spawn(async move { connection.send(request).await });
    sender
        .send(Ok(Bytes::from(pattern_bytes(7, 0..300_000))))
        .await
        .expect("send part of the body");
    wait_for_upload_start(&gateway, "call-cut").await;

    // The client's own tasks wait on the closed socket forever, so only the gateway's side is
    // checked.
    transport.sever();
    response.abort();
    drop(sender);

    gateway.wait_until_idle().await;
    assert_eq!(
        gateway.files.temporary_files(),
        no_files(),
        "no temporary file remains"
    );
    assert!(
        !gateway
            .files
            .stored_file(PRACTICE, "call-cut", ARTIFACT)
            .exists(),
        "no object file"
    );
    let get = gateway
        .client(Protocol::Http2)
        .get(&path, &gateway.files.token, None)
        .await;
    assert_eq!(
        get.status,
        StatusCode::NOT_FOUND,
        "GET after the disconnect"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_over_existing_object_is_409() {
    let mut gateway = TestGateway::new().await;
    for protocol in Protocol::ALL {
        let call = format!("call-existing-{}", protocol.name());
        let path = object_url(PRACTICE, &call, ARTIFACT);
        let client = gateway.client(protocol);
        let original = pattern_bytes(8, 0..100_000);
        let put = client
            .put(
                &path,
                &gateway.files.ingest_token,
                full_body(original.clone()),
            )
            .await;
        assert_eq!(
            put.status,
            StatusCode::CREATED,
            "first PUT over {}",
            protocol.name()
        );
        let stored_path = gateway.files.stored_file(PRACTICE, &call, ARTIFACT);
        let stored = fs::read(&stored_path).expect("read the stored object");

        let again = client
            .put(
                &path,
                &gateway.files.ingest_token,
                full_body(pattern_bytes(9, 0..1000)),
            )
            .await;
        assert_eq!(
            again.status,
            StatusCode::CONFLICT,
            "PUT with Content-Length over {}",
            protocol.name()
        );
        again.error_message();
        let streamed = stream_body(random_pieces(10, 11, 200_000));
        let request = client
            .authorized(Method::PUT, &path, &gateway.files.ingest_token)
            .body(streamed)
            .expect("build PUT");
        let again = client.fetch(request).await;
        assert_eq!(
            again.status,
            StatusCode::CONFLICT,
            "streamed PUT over {}",
            protocol.name()
        );

        gateway.wait_until_idle().await;
        assert!(
            fs::read(&stored_path).expect("read the stored object") == stored,
            "the stored file is unchanged"
        );
        let get = client.get(&path, &gateway.files.token, None).await;
        assert!(
            get.bytes()[..] == original[..],
            "GET returns the original over {}",
            protocol.name()
        );
    }
    assert_eq!(
        gateway.files.temporary_files(),
        no_files(),
        "no temporary file remains"
    );
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown with an upload in flight
// ---------------------------------------------------------------------------------------------

/// Waits until the data listener refuses connections, which shows that shutdown has begun.
async fn wait_for_listener_closed(addr: std::net::SocketAddr) {
    within_guard("the data listener closing", async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// An upload whose client keeps sending during the grace period completes and is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_upload_finish() {
    for protocol in Protocol::ALL {
        let gateway = GatewaySettings::default()
            .shutdown_grace_secs(60)
            .start()
            .await;
        let call = format!("call-draining-{}", protocol.name());
        let path = object_url(PRACTICE, &call, ARTIFACT);
        let client = gateway.client(protocol);
        let length = 600_000;

        let (mut sender, body) = channel_body();
        let request = client
            .authorized(Method::PUT, &path, &gateway.files.ingest_token)
            .body(body)
            .expect("build PUT");
        let response = tokio::spawn({
            let client = client.clone();
            async move { client.send(request).await }
        });
        sender
            .send(Ok(Bytes::from(pattern_bytes(12, 0..300_000))))
            .await
            .expect("send the first half");
        wait_for_upload_start(&gateway, &call).await;

        let data_addr = gateway.data_addr;
        let shutdown = tokio::spawn(async move {
            let mut gateway = gateway;
            gateway.shutdown().await;
            gateway
        });
        wait_for_listener_closed(data_addr).await;
        sender
            .send(Ok(Bytes::from(pattern_bytes(12, 300_000..length))))
            .await
            .expect("send the second half");
        drop(sender);

        let response = response
            .await
            .expect("the request task")
            .expect("the upload gets a response");
        let reply = read_reply(response).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "upload during shutdown over {}",
            protocol.name()
        );

        let gateway = within_guard("shutdown", shutdown)
            .await
            .expect("the shutdown task");
        assert_eq!(
            gateway.files.temporary_files(),
            no_files(),
            "no temporary file remains"
        );
        let mut gateway = gateway.restart().await;
        let get = gateway
            .client(protocol)
            .get(&path, &gateway.files.token, None)
            .await;
        assert!(
            get.bytes()[..] == pattern_bytes(12, 0..length)[..],
            "GET after restart over {}",
            protocol.name()
        );
        gateway.shutdown().await;
    }
}

/// An upload whose client stalls past the grace period is aborted: nothing is readable and no
/// temporary file remains once shutdown returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_aborts_stalled_upload() {
    for protocol in Protocol::ALL {
        let mut gateway = GatewaySettings::default()
            .shutdown_grace_secs(1)
            .start()
            .await;
        let call = format!("call-stalled-{}", protocol.name());
        let path = object_url(PRACTICE, &call, ARTIFACT);
        let client = gateway.client(protocol);

        let (mut sender, body) = channel_body();
        let request = client
            .authorized(Method::PUT, &path, &gateway.files.ingest_token)
            .body(body)
            .expect("build PUT");
        let response = tokio::spawn({
            let client = client.clone();
            async move { client.send(request).await }
        });
        sender
            .send(Ok(Bytes::from(pattern_bytes(13, 0..300_000))))
            .await
            .expect("send part of the body");
        wait_for_upload_start(&gateway, &call).await;

        gateway.shutdown().await;
        assert_eq!(
            gateway.files.temporary_files(),
            no_files(),
            "no temporary file remains over {}",
            protocol.name()
        );
        assert_eq!(
            gateway.files.stored_files(),
            no_files(),
            "no object file over {}",
            protocol.name()
        );
        let outcome = within_guard("the aborted request", response)
            .await
            .expect("the request task");
        assert!(
            outcome.is_err(),
            "the client sees a broken upload over {}",
            protocol.name()
        );
        drop(sender);

        let mut gateway = gateway.restart().await;
        let get = gateway
            .client(protocol)
            .get(&path, &gateway.files.token, None)
            .await;
        assert_eq!(
            get.status,
            StatusCode::NOT_FOUND,
            "GET after restart over {}",
            protocol.name()
        );
        let head = gateway
            .client(protocol)
            .head(&path, &gateway.files.token)
            .await;
        assert_eq!(
            head.status,
            StatusCode::NOT_FOUND,
            "HEAD after restart over {}",
            protocol.name()
        );
        gateway.shutdown().await;
    }
}
