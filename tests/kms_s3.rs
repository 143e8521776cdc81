//! Acceptance tests of practices with AWS KMS keys and of S3 storage, against moto's server as a
//! local KMS and S3 (see `common::aws`).
//!
//! Run them through `scripts/test`, which starts moto and sets `CALLSEAL_MOTO_ENDPOINT`. Without
//! it, every test that needs moto fails with a message that names the missing setup. The
//! residency tests need no moto because they stop at configuration parsing.
//!
//! Not covered yet: S3 becoming unreachable while webhook events arrive. The gateway has no spool
//! for that case, so there is no behaviour to test.

mod common;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use bytes::Bytes;
use futures::SinkExt;
use http::{Method, StatusCode};
use object_store::ObjectStoreExt;

use callseal::config::Config;
use callseal::envelope::ParsedHeader;

use common::aws::{
    FaultProxy, KmsFault, KmsGateway, KmsGatewaySettings, Moto, ObjectStorage, download,
    esdk_decrypt_kms_file, file_sha256, s3_object_path,
};
use common::gateway::{
    Client, Protocol, Reply, channel_body, full_body, hash_body, object_url, pattern_bytes,
    pattern_sha256, random_pieces, read_reply, sha256_hex, stream_body, within_guard,
};

const PRACTICE: &str = "clinic-1";
const OTHER_PRACTICE: &str = "clinic-2";
const ARTIFACT: &str = "recording.wav";

/// Suite 0x0478: AES-256-GCM, HKDF-SHA512, key commitment, no signature.
const SUITE_ID: u64 = 0x0478;

/// The gateway's default frame length, which these tests keep.
const FRAME_LENGTH: u64 = 64 * 1024;

/// The client-facing messages of the KMS failures (`src/server/error.rs`).
const KEY_SERVICE_UNAVAILABLE: &str = "the practice's key service is unavailable; retry later";
const KEY_DISABLED: &str = "the practice's KMS key is disabled";
const KEY_PENDING_DELETION: &str = "the practice's KMS key is pending deletion or unusable";
const KEY_ACCESS_DENIED: &str = "callseal is not allowed to use the practice's KMS key";
const OBJECT_MISPLACED: &str = "the stored object does not belong to this path";

/// A data key cache lifetime far beyond any test's run time, so that no cached key expires
/// during a test however slow the machine is.
const LONG_CACHE_TTL_SECS: u64 = 3600;

/// Attempts per KMS call in the fault tests: one retry keeps them quick.
const FAULT_MAX_ATTEMPTS: u32 = 2;

/// Two practices with their own KMS keys, a bucket, and a gateway storing into that bucket.
struct S3Setup {
    moto: Moto,
    bucket: String,
    prefix: Option<String>,
    key_arn: String,
    other_key_arn: String,
    gateway: KmsGateway,
}

impl S3Setup {
    /// Creates the keys and the bucket and starts the gateway. KMS calls go to `kms_endpoint`
    /// (moto itself when `None`).
    async fn start(
        moto: &Moto,
        kms_endpoint: Option<String>,
        prefix: Option<&str>,
        max_attempts: Option<u32>,
    ) -> S3Setup {
        let key_arn = moto.create_kms_key().await;
        let other_key_arn = moto.create_kms_key().await;
        let bucket = moto.create_bucket().await;
        let settings = KmsGatewaySettings {
            moto_endpoint: moto.endpoint.clone(),
            kms_endpoint: kms_endpoint.unwrap_or_else(|| moto.endpoint.clone()),
            storage: ObjectStorage::S3 {
                bucket: bucket.clone(),
                prefix: prefix.map(str::to_owned),
            },
            practices: vec![
                (PRACTICE.to_owned(), key_arn.clone()),
                (OTHER_PRACTICE.to_owned(), other_key_arn.clone()),
            ],
            max_attempts,
            data_key_cache_ttl_secs: Some(LONG_CACHE_TTL_SECS),
            retell_key: None,
            webhooks: None,
        };
        let gateway = KmsGateway::start(&settings).await;
        S3Setup {
            moto: moto.clone(),
            bucket,
            prefix: prefix.map(str::to_owned),
            key_arn,
            other_key_arn,
            gateway,
        }
    }

    fn store(&self) -> object_store::aws::AmazonS3 {
        self.moto.bucket(&self.bucket)
    }

    fn object_path(&self, practice: &str, call: &str, artifact: &str) -> object_store::path::Path {
        s3_object_path(self.prefix.as_deref(), practice, call, artifact)
    }

    fn ingest(&self, practice: &str) -> &str {
        self.gateway.ingest_token(practice)
    }

    fn reader(&self, practice: &str) -> &str {
        self.gateway.reader_token(practice)
    }
}

/// Uploads `plaintext` and asserts 201.
async fn put_ok(client: &Client, token: &str, url: &str, plaintext: &[u8]) {
    let reply = client
        .put(url, token, full_body(Bytes::copy_from_slice(plaintext)))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "{}: {:?}",
        reply.request,
        reply.body
    );
}

/// Reads `url` and asserts 200 with exactly `plaintext`.
async fn get_ok(client: &Client, token: &str, url: &str, plaintext: &[u8]) {
    let reply = client.get(url, token, None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}: {:?}",
        reply.request,
        reply.body
    );
    assert_eq!(
        sha256_hex(reply.bytes()),
        sha256_hex(plaintext),
        "{} returned other bytes",
        reply.request
    );
}

/// Asserts a JSON error reply with `status` and `message`, and no `Retry-After`.
fn assert_rejected(reply: &Reply, status: StatusCode, message: &str) {
    assert_eq!(reply.status, status, "{}: {:?}", reply.request, reply.body);
    assert_eq!(reply.error_message(), message, "{}", reply.request);
    assert_eq!(
        reply.header("retry-after"),
        None,
        "{} is not retryable",
        reply.request
    );
}

/// Asserts 503 with `Retry-After` and the key-service message.
fn assert_key_service_unavailable(reply: &Reply) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}: {:?}",
        reply.request,
        reply.body
    );
    assert_eq!(
        reply.error_message(),
        KEY_SERVICE_UNAVAILABLE,
        "{}",
        reply.request
    );
    assert_eq!(reply.header("retry-after"), Some("5"), "{}", reply.request);
}

/// Checks the header JSON of the ESDK oracle for an object of `practice` under `key_arn`.
fn assert_kms_header(header: &serde_json::Value, key_arn: &str, practice: &str, call: &str) {
    assert_eq!(header["version"], 2, "{header}");
    assert_eq!(header["algorithm_suite_id"], SUITE_ID, "{header}");
    assert_eq!(header["frame_length"], FRAME_LENGTH, "{header}");
    let edks = header["encrypted_data_keys"]
        .as_array()
        .expect("encrypted_data_keys is an array");
    assert_eq!(edks.len(), 1, "one EDK per object: {header}");
    assert_eq!(edks[0]["provider_id"], "aws-kms", "{header}");
    assert_eq!(edks[0]["key_name"], key_arn, "{header}");
    let expected_context = serde_json::json!({
        "artifact": ARTIFACT,
        "call": call,
        "practice": practice,
    });
    assert_eq!(header["encryption_context"], expected_context, "{header}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_s3_round_trip_of_boundary_sizes() {
    let moto = Moto::connect().await;
    let setup = S3Setup::start(&moto, None, Some("tenants/east"), None).await;
    let ingest = setup.ingest(PRACTICE);
    let reader = setup.reader(PRACTICE);
    let sizes = [
        0,
        1,
        FRAME_LENGTH - 1,
        FRAME_LENGTH,
        FRAME_LENGTH + 1,
        3 * FRAME_LENGTH + 5,
    ];

    let mut objects = 0u64;
    for protocol in Protocol::ALL {
        let client = setup.gateway.client(protocol);
        for (index, &size) in sizes.iter().enumerate() {
            let call = format!("call-{}-{index}", protocol.name());
            let url = object_url(PRACTICE, &call, ARTIFACT);
            let plaintext = pattern_bytes(index as u64 + 1, 0..size);
            put_ok(&client, ingest, &url, &plaintext).await;
            objects += 1;

            get_ok(&client, reader, &url, &plaintext).await;

            let head = client.head(&url, reader).await;
            assert_eq!(head.status, StatusCode::OK, "{}", head.request);
            assert_eq!(
                head.header("content-length"),
                Some(size.to_string().as_str()),
                "{}",
                head.request
            );

            if size >= 3 {
                let range = format!("bytes=1-{}", size - 2);
                let partial = client.get(&url, reader, Some(&range)).await;
                assert_eq!(
                    partial.status,
                    StatusCode::PARTIAL_CONTENT,
                    "{}",
                    partial.request
                );
                assert_eq!(
                    sha256_hex(partial.bytes()),
                    sha256_hex(&plaintext[1..size as usize - 1]),
                    "{} {range}",
                    partial.request
                );
            }
        }
    }

    assert_eq!(
        setup.gateway.kms_calls("GenerateDataKey"),
        objects,
        "one GenerateDataKey per object"
    );
    assert_eq!(
        setup.gateway.kms_calls("Decrypt"),
        objects,
        "one Decrypt per object: its GET, HEAD and range read share the cached data key"
    );

    // The prefix is part of every stored key.
    let store = setup.store();
    let call = "call-h2-5";
    let stored = setup.object_path(PRACTICE, call, ARTIFACT);
    assert!(
        store.head(&stored).await.is_ok(),
        "no object at the prefixed key {stored}"
    );
    let unprefixed = s3_object_path(None, PRACTICE, call, ARTIFACT);
    assert!(
        matches!(
            store.head(&unprefixed).await,
            Err(object_store::Error::NotFound { .. })
        ),
        "an object outside the prefix at {unprefixed}"
    );

    // AWS's own SDK decrypts the stored object with the practice's KMS key.
    let scratch = tempfile::tempdir().expect("create a scratch directory");
    let message = scratch.path().join("message");
    let output = scratch.path().join("plaintext");
    download(&store, &stored, &message).await;
    let header = esdk_decrypt_kms_file(&setup.key_arn, &moto.endpoint, &message, &output)
        .unwrap_or_else(|error| panic!("the ESDK rejected {stored}: {error}"));
    let plaintext = std::fs::read(&output).expect("read the oracle's plaintext");
    assert_eq!(
        sha256_hex(&plaintext),
        sha256_hex(&pattern_bytes(6, 0..sizes[5])),
        "the ESDK's plaintext differs"
    );
    assert_kms_header(&header, &setup.key_arn, PRACTICE, call);

    // The other practice's key cannot unwrap it.
    let rejected = esdk_decrypt_kms_file(&setup.other_key_arn, &moto.endpoint, &message, &output);
    assert!(
        rejected.is_err(),
        "the ESDK decrypted an object of {PRACTICE} with the key of {OTHER_PRACTICE}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_s3_streams_100_mib_upload() {
    const LENGTH: u64 = 100 * 1024 * 1024;
    const SEED: u64 = 0x100_0000;

    let moto = Moto::connect().await;
    let setup = S3Setup::start(&moto, None, None, None).await;
    let ingest = setup.ingest(PRACTICE);
    let reader = setup.reader(PRACTICE);
    let client = setup.gateway.client(Protocol::Http2);
    let call = "long-call";
    let url = object_url(PRACTICE, call, ARTIFACT);

    let put = client
        .put(&url, ingest, stream_body(random_pieces(SEED, 7, LENGTH)))
        .await;
    assert_eq!(put.status, StatusCode::CREATED, "{:?}", put.body);
    let stored: serde_json::Value = serde_json::from_slice(put.bytes()).expect("PUT returns JSON");
    assert_eq!(stored["plaintext_bytes"], LENGTH, "{stored}");

    let expected = pattern_sha256(SEED, LENGTH);
    let request = client
        .authorized(Method::GET, &url, reader)
        .body(common::gateway::empty_body())
        .expect("build GET");
    let response = client.send(request).await.expect("GET the 100 MiB object");
    assert_eq!(response.status(), StatusCode::OK);
    let (length, digest) = within_guard("reading 100 MiB", hash_body(response))
        .await
        .expect("the 100 MiB body ends cleanly");
    assert_eq!(length, LENGTH, "bytes read back");
    assert_eq!(
        hex::encode(digest),
        hex::encode(expected),
        "SHA-256 read back"
    );

    let scratch = tempfile::tempdir().expect("create a scratch directory");
    let message = scratch.path().join("message");
    let output = scratch.path().join("plaintext");
    let object = setup.object_path(PRACTICE, call, ARTIFACT);
    let stored_length = download(&setup.store(), &object, &message).await;
    assert_eq!(
        serde_json::Value::from(stored_length),
        stored["stored_bytes"],
        "stored size in S3 and in the PUT reply"
    );
    let header = esdk_decrypt_kms_file(&setup.key_arn, &moto.endpoint, &message, &output)
        .unwrap_or_else(|error| panic!("the ESDK rejected the 100 MiB object: {error}"));
    let (oracle_length, oracle_digest) = file_sha256(&output);
    assert_eq!(oracle_length, LENGTH, "bytes the ESDK decrypted");
    assert_eq!(
        hex::encode(oracle_digest),
        hex::encode(expected),
        "SHA-256 of the ESDK's plaintext"
    );
    assert_kms_header(&header, &setup.key_arn, PRACTICE, call);
}

/// Calls KMS Decrypt in moto directly and returns the plaintext length or the error code.
async fn kms_decrypt(
    moto: &Moto,
    key_arn: &str,
    ciphertext: &[u8],
    context: &[(&str, &str)],
) -> Result<usize, String> {
    let context: HashMap<String, String> = context
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    moto.kms()
        .decrypt()
        .key_id(key_arn)
        .ciphertext_blob(Blob::new(ciphertext.to_vec()))
        .set_encryption_context(Some(context))
        .send()
        .await
        .map(|output| {
            output
                .plaintext()
                .map_or(0, |plaintext| plaintext.as_ref().len())
        })
        .map_err(|error| error.code().unwrap_or("no error code").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_data_key_is_bound_to_encryption_context() {
    let moto = Moto::connect().await;
    let setup = S3Setup::start(&moto, None, None, None).await;
    let client = setup.gateway.client(Protocol::Http1);
    let url = object_url(PRACTICE, "call-1", ARTIFACT);
    put_ok(
        &client,
        setup.ingest(PRACTICE),
        &url,
        b"transcript of call 1",
    )
    .await;

    let stored = setup
        .store()
        .get(&setup.object_path(PRACTICE, "call-1", ARTIFACT))
        .await
        .expect("GET the stored object from S3")
        .bytes()
        .await
        .expect("read the stored object");
    let parsed = ParsedHeader::parse(&stored)
        .expect("the stored header parses")
        .expect("the stored object holds a whole header");
    let edks = &parsed.header.edks;
    assert_eq!(edks.len(), 1, "one EDK per object");
    assert_eq!(edks[0].provider_id, b"aws-kms", "EDK provider id");
    assert_eq!(
        edks[0].provider_info,
        setup.key_arn.as_bytes(),
        "EDK provider info is the key ARN"
    );
    let header_context: BTreeMap<&str, &str> = parsed.header.context.iter().collect();
    let expected_context = BTreeMap::from([
        ("practice", PRACTICE),
        ("call", "call-1"),
        ("artifact", ARTIFACT),
    ]);
    assert_eq!(
        header_context, expected_context,
        "header encryption context"
    );

    let ciphertext = &edks[0].ciphertext;
    let key = &setup.key_arn;
    let right = [
        ("practice", PRACTICE),
        ("call", "call-1"),
        ("artifact", ARTIFACT),
    ];
    assert_eq!(
        kms_decrypt(&moto, key, ciphertext, &right).await,
        Ok(32),
        "the object's own context unwraps the data key"
    );

    let wrong_contexts: [(&str, Vec<(&str, &str)>); 5] = [
        (
            "another call",
            vec![
                ("practice", PRACTICE),
                ("call", "call-2"),
                ("artifact", ARTIFACT),
            ],
        ),
        (
            "another practice",
            vec![
                ("practice", OTHER_PRACTICE),
                ("call", "call-1"),
                ("artifact", ARTIFACT),
            ],
        ),
        (
            "another artifact",
            vec![
                ("practice", PRACTICE),
                ("call", "call-1"),
                ("artifact", "transcript.json"),
            ],
        ),
        ("no context", vec![]),
        (
            "an extra pair",
            vec![
                ("practice", PRACTICE),
                ("call", "call-1"),
                ("artifact", ARTIFACT),
                ("copy", "1"),
            ],
        ),
    ];
    for (case, context) in wrong_contexts {
        assert_eq!(
            kms_decrypt(&moto, key, ciphertext, &context).await,
            Err("InvalidCiphertextException".to_owned()),
            "KMS Decrypt under {case}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_s3_object_is_rejected() {
    const CANARY: &[u8] = b"PHI-CANARY: patient Jane Roe, DOB 1970-01-01, callback 555-0100";

    let moto = Moto::connect().await;
    let setup = S3Setup::start(&moto, None, None, None).await;
    let client = setup.gateway.client(Protocol::Http1);
    let ingest = setup.ingest(PRACTICE);
    let reader = setup.reader(PRACTICE);
    let url = object_url(PRACTICE, "call-1", ARTIFACT);
    put_ok(&client, ingest, &url, CANARY).await;

    let store = setup.store();
    let source = setup.object_path(PRACTICE, "call-1", ARTIFACT);
    let copies = [
        ("another call", PRACTICE, "call-2"),
        ("another practice", OTHER_PRACTICE, "call-1"),
    ];
    for (_, practice, call) in copies {
        let target = setup.object_path(practice, call, ARTIFACT);
        store
            .copy(&source, &target)
            .await
            .unwrap_or_else(|error| panic!("S3 copy to {target}: {error}"));
    }

    let decrypts_before = setup.gateway.kms_calls("Decrypt");
    for (case, practice, call) in copies {
        let copy_url = object_url(practice, call, ARTIFACT);
        let copy_token = setup.reader(practice);
        let replies = [
            client.get(&copy_url, copy_token, None).await,
            client.get(&copy_url, copy_token, Some("bytes=0-9")).await,
            client.head(&copy_url, copy_token).await,
        ];
        for reply in replies {
            assert_eq!(
                reply.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "copy to {case}: {}",
                reply.request
            );
            let body = reply.bytes();
            assert!(
                !body.windows(CANARY.len()).any(|window| window == CANARY),
                "copy to {case}: {} released the plaintext",
                reply.request
            );
            if reply.request.starts_with("GET") {
                assert_eq!(
                    reply.error_message(),
                    OBJECT_MISPLACED,
                    "copy to {case}: {}",
                    reply.request
                );
            }
        }
    }
    assert_eq!(
        setup.gateway.kms_calls("Decrypt"),
        decrypts_before,
        "the context check rejects a copy before any KMS call"
    );

    get_ok(&client, reader, &url, CANARY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_calls_per_upload_and_read() {
    const UPLOADS: usize = 1000;
    const READS: usize = 1000;
    const CONCURRENCY: usize = 16;

    let moto = Moto::connect().await;
    let proxy = FaultProxy::start(moto.addr).await;
    let key_arn = moto.create_kms_key().await;
    // Storage does not matter for counting KMS calls, and memory keeps 2,000 requests quick.
    let settings = KmsGatewaySettings {
        moto_endpoint: moto.endpoint.clone(),
        kms_endpoint: proxy.url(),
        storage: ObjectStorage::Memory,
        practices: vec![(PRACTICE.to_owned(), key_arn)],
        max_attempts: None,
        data_key_cache_ttl_secs: Some(LONG_CACHE_TTL_SECS),
        retell_key: None,
        webhooks: None,
    };
    let gateway = KmsGateway::start(&settings).await;
    let client = gateway.client(Protocol::Http1);
    let ingest = gateway.ingest_token(PRACTICE);
    let reader = gateway.reader_token(PRACTICE);

    let failures = run_workers(CONCURRENCY, UPLOADS, &client, ingest, |index| {
        let url = object_url(PRACTICE, &format!("call-{index}"), ARTIFACT);
        let body = pattern_bytes(index as u64, 0..100 + index as u64 % 200);
        (Method::PUT, url, body, StatusCode::CREATED)
    })
    .await;
    assert_eq!(failures, Vec::<String>::new(), "uploads that failed");
    assert_eq!(
        gateway.kms_calls("GenerateDataKey"),
        UPLOADS as u64,
        "GenerateDataKey calls by the gateway's metric"
    );
    assert_eq!(
        proxy.kms_requests("GenerateDataKey"),
        UPLOADS as u64,
        "GenerateDataKey requests that reached KMS"
    );
    assert_eq!(
        gateway.kms_calls("Decrypt"),
        0,
        "uploads never call Decrypt"
    );

    // The first 16 reads start together on a cold cache: their misses share one Decrypt call.
    let read_url = object_url(PRACTICE, "call-0", ARTIFACT);
    let failures = run_workers(CONCURRENCY, READS - 1, &client, reader, |_| {
        (Method::GET, read_url.clone(), Vec::new(), StatusCode::OK)
    })
    .await;
    get_ok(&client, reader, &read_url, &pattern_bytes(0, 0..100)).await;
    assert_eq!(failures, Vec::<String>::new(), "reads that failed");
    assert_eq!(
        gateway.kms_calls("Decrypt"),
        1,
        "Decrypt calls by the gateway's metric for {READS} reads of one object"
    );
    assert_eq!(
        proxy.kms_requests("Decrypt"),
        1,
        "Decrypt requests that reached KMS for {READS} reads of one object"
    );
}

/// Sends `count` requests from `workers` tasks, each on its own kept-alive connection. The
/// request of index `i` is `make(i)`: method, path, body and expected status. Returns a line per
/// request that got another status.
async fn run_workers(
    workers: usize,
    count: usize,
    client: &Client,
    token: &str,
    make: impl Fn(usize) -> (Method, String, Vec<u8>, StatusCode),
) -> Vec<String> {
    let mut batches: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
    for index in 0..count {
        batches[index % workers].push(make(index));
    }

    let mut tasks = tokio::task::JoinSet::new();
    for batch in batches {
        let client = client.clone();
        let token = token.to_owned();
        tasks.spawn(async move {
            let mut connection = client.connect().await;
            let mut failures = Vec::new();
            for (method, url, body, expected) in batch {
                let request = client
                    .authorized(method.clone(), &url, &token)
                    .body(full_body(body))
                    .expect("build the request");
                let response = connection
                    .send(request)
                    .await
                    .unwrap_or_else(|error| panic!("{method} {url}: {error}"));
                let reply = read_reply(response).await;
                if reply.status != expected {
                    failures.push(format!("{method} {url}: {} {:?}", reply.status, reply.body));
                }
            }
            failures
        });
    }

    let mut failures = Vec::new();
    while let Some(result) = within_guard("the request workers", tasks.join_next()).await {
        failures.extend(result.expect("a request worker panicked"));
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_unreachable_fails_writes_and_uncached_reads() {
    let moto = Moto::connect().await;
    let proxy = FaultProxy::start(moto.addr).await;
    let setup = S3Setup::start(&moto, Some(proxy.url()), None, Some(FAULT_MAX_ATTEMPTS)).await;
    let client = setup.gateway.client(Protocol::Http1);
    let ingest = setup.ingest(PRACTICE);
    let reader = setup.reader(PRACTICE);
    let cached = object_url(PRACTICE, "cached", ARTIFACT);
    let uncached = object_url(PRACTICE, "uncached", ARTIFACT);
    let written_later = object_url(PRACTICE, "written-later", ARTIFACT);
    put_ok(&client, ingest, &cached, b"cached object").await;
    put_ok(&client, ingest, &uncached, b"uncached object").await;
    get_ok(&client, reader, &cached, b"cached object").await;

    proxy.set_fault(KmsFault::Unreachable);
    let put = client
        .put(&written_later, ingest, full_body(&b"written later"[..]))
        .await;
    assert_key_service_unavailable(&put);
    let missing = client.head(&written_later, reader).await;
    assert_eq!(
        missing.status,
        StatusCode::NOT_FOUND,
        "a write that KMS failed stores nothing"
    );
    let read = client.get(&uncached, reader, None).await;
    assert_key_service_unavailable(&read);
    get_ok(&client, reader, &cached, b"cached object").await;

    proxy.set_fault(KmsFault::PassThrough);
    put_ok(&client, ingest, &written_later, b"written later").await;
    get_ok(&client, reader, &uncached, b"uncached object").await;
    get_ok(&client, reader, &written_later, b"written later").await;
    get_ok(&client, reader, &cached, b"cached object").await;

    assert_eq!(
        setup.moto.multipart_uploads(&setup.bucket).await,
        Vec::<String>::new(),
        "multipart uploads left in the bucket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_key_rejections_return_403() {
    let moto = Moto::connect().await;
    let proxy = FaultProxy::start(moto.addr).await;
    let setup = S3Setup::start(&moto, Some(proxy.url()), None, Some(FAULT_MAX_ATTEMPTS)).await;
    let client = setup.gateway.client(Protocol::Http2);
    let ingest = setup.ingest(PRACTICE);
    let reader = setup.reader(PRACTICE);
    let cases = [
        ("disabled", KmsFault::disabled(), KEY_DISABLED),
        (
            "pending-deletion",
            KmsFault::pending_deletion(),
            KEY_PENDING_DELETION,
        ),
        (
            "access-denied",
            KmsFault::access_denied(),
            KEY_ACCESS_DENIED,
        ),
    ];

    for (case, fault, message) in cases {
        let cached = object_url(PRACTICE, &format!("{case}-cached"), ARTIFACT);
        let uncached = object_url(PRACTICE, &format!("{case}-uncached"), ARTIFACT);
        let rejected_url = object_url(PRACTICE, &format!("{case}-rejected"), ARTIFACT);
        put_ok(&client, ingest, &cached, case.as_bytes()).await;
        put_ok(&client, ingest, &uncached, case.as_bytes()).await;
        get_ok(&client, reader, &cached, case.as_bytes()).await;

        proxy.set_fault(fault);
        let generate_before = proxy.kms_requests("GenerateDataKey");
        let put = client
            .put(&rejected_url, ingest, full_body(case.as_bytes()))
            .await;
        assert_rejected(&put, StatusCode::FORBIDDEN, message);
        assert_eq!(
            proxy.kms_requests("GenerateDataKey") - generate_before,
            1,
            "{case}: a rejection is not retried"
        );
        let body = String::from_utf8_lossy(put.bytes()).into_owned();
        assert!(
            !body.contains(&setup.key_arn),
            "{case}: the reply names the key ARN: {body}"
        );
        let missing = client.head(&rejected_url, reader).await;
        assert_eq!(
            missing.status,
            StatusCode::NOT_FOUND,
            "{case}: stored anyway"
        );
        let read = client.get(&uncached, reader, None).await;
        assert_rejected(&read, StatusCode::FORBIDDEN, message);
        // KMS's rejection flushed the practice's cached data keys.
        let read_cached = client.get(&cached, reader, None).await;
        assert_rejected(&read_cached, StatusCode::FORBIDDEN, message);

        proxy.set_fault(KmsFault::PassThrough);
        put_ok(&client, ingest, &rejected_url, case.as_bytes()).await;
        get_ok(&client, reader, &uncached, case.as_bytes()).await;
        get_ok(&client, reader, &cached, case.as_bytes()).await;
    }

    // A rejection flushes the cached data keys of the rejected practice only.
    let other = object_url(OTHER_PRACTICE, "call-1", ARTIFACT);
    let other_reader = setup.reader(OTHER_PRACTICE);
    put_ok(
        &client,
        setup.ingest(OTHER_PRACTICE),
        &other,
        b"other practice",
    )
    .await;
    get_ok(&client, other_reader, &other, b"other practice").await;
    proxy.set_fault(KmsFault::disabled());
    let late = object_url(PRACTICE, "late", ARTIFACT);
    let put = client.put(&late, ingest, full_body(&b"late"[..])).await;
    assert_rejected(&put, StatusCode::FORBIDDEN, KEY_DISABLED);
    get_ok(&client, other_reader, &other, b"other practice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_throttling_and_server_errors_return_503() {
    let moto = Moto::connect().await;
    let proxy = FaultProxy::start(moto.addr).await;
    let setup = S3Setup::start(&moto, Some(proxy.url()), None, Some(FAULT_MAX_ATTEMPTS)).await;
    let client = setup.gateway.client(Protocol::Http1);
    let ingest = setup.ingest(PRACTICE);
    let reader = setup.reader(PRACTICE);
    let cases = [
        ("throttling", KmsFault::throttling()),
        ("internal-error", KmsFault::internal_error()),
    ];

    for (case, fault) in cases {
        let stored = object_url(PRACTICE, &format!("{case}-stored"), ARTIFACT);
        let rejected_url = object_url(PRACTICE, &format!("{case}-rejected"), ARTIFACT);
        put_ok(&client, ingest, &stored, case.as_bytes()).await;

        proxy.set_fault(fault);
        let generate_before = proxy.kms_requests("GenerateDataKey");
        let put = client
            .put(&rejected_url, ingest, full_body(case.as_bytes()))
            .await;
        assert_key_service_unavailable(&put);
        assert_eq!(
            proxy.kms_requests("GenerateDataKey") - generate_before,
            u64::from(FAULT_MAX_ATTEMPTS),
            "{case}: GenerateDataKey attempts with max_attempts = {FAULT_MAX_ATTEMPTS}"
        );
        let decrypt_before = proxy.kms_requests("Decrypt");
        let read = client.get(&stored, reader, None).await;
        assert_key_service_unavailable(&read);
        assert_eq!(
            proxy.kms_requests("Decrypt") - decrypt_before,
            u64::from(FAULT_MAX_ATTEMPTS),
            "{case}: Decrypt attempts with max_attempts = {FAULT_MAX_ATTEMPTS}"
        );

        proxy.set_fault(KmsFault::PassThrough);
        put_ok(&client, ingest, &rejected_url, case.as_bytes()).await;
        get_ok(&client, reader, &stored, case.as_bytes()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_s3_upload_leaves_no_multipart_upload() {
    const SENT: usize = 6 * 1024 * 1024;
    const PIECE: usize = 64 * 1024;

    let moto = Moto::connect().await;
    let setup = S3Setup::start(&moto, None, None, None).await;
    let client = setup.gateway.client(Protocol::Http1);
    let ingest = setup.ingest(PRACTICE);
    let reader = setup.reader(PRACTICE);
    let url = object_url(PRACTICE, "dropped", ARTIFACT);
    let key = setup.object_path(PRACTICE, "dropped", ARTIFACT).to_string();

    let mut connection = client.connect().await;
    let transport = connection.transport();
    let (mut sender, body) = channel_body();
    let request = client
        .authorized(Method::PUT, &url, ingest)
        .body(body)
        .expect("build PUT");
    let in_flight = tokio::spawn(async move { connection.send(request).await.map(|_| ()) });

    for offset in (0..SENT).step_by(PIECE) {
        let piece = pattern_bytes(9, offset as u64..(offset + PIECE) as u64);
        within_guard(
            "sending the upload body",
            sender.send(Ok(Bytes::from(piece))),
        )
        .await
        .expect("the gateway reads the body");
    }
    within_guard("the multipart upload to appear", async {
        while !setup
            .moto
            .multipart_uploads(&setup.bucket)
            .await
            .contains(&key)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    transport.sever();
    drop(sender);
    let outcome = within_guard("the severed request", in_flight)
        .await
        .expect("the request task");
    assert!(outcome.is_err(), "the severed upload got a response");
    setup.gateway.wait_until_idle().await;

    within_guard("the multipart upload to be aborted", async {
        while !setup.moto.multipart_uploads(&setup.bucket).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let head = setup
        .store()
        .head(&setup.object_path(PRACTICE, "dropped", ARTIFACT))
        .await;
    assert!(
        matches!(head, Err(object_store::Error::NotFound { .. })),
        "the dropped upload became an object: {head:?}"
    );
    let read = client.get(&url, reader, None).await;
    assert_eq!(read.status, StatusCode::NOT_FOUND, "{:?}", read.body);
}

/// Returns a configuration with one practice using `key_arn`, S3 storage in `bucket_region`, and
/// `[residency] allowed_regions` when given.
fn residency_config(key_arn: &str, bucket_region: &str, allowed: Option<&[&str]>) -> String {
    let residency = allowed
        .map(|regions| {
            let quoted: Vec<String> = regions
                .iter()
                .map(|region| format!("\"{region}\""))
                .collect();
            format!("[residency]\nallowed_regions = [{}]\n", quoted.join(", "))
        })
        .unwrap_or_default();
    format!(
        r#"
[listen]
data = "127.0.0.1:0"

[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"

[storage]
kind = "s3"
bucket = "phi-bucket"
region = "{bucket_region}"

[keys]
directory = "keys"

{residency}
[[practices]]
id = "{PRACTICE}"
kms_key_arn = "{key_arn}"

[[tokens]]
name = "back-office"
sha256 = "{hash}"
role = "ingest"
practices = ["{PRACTICE}"]
"#,
        hash = "ab".repeat(32),
    )
}

/// Writes `text` to a configuration file and loads it.
fn load_config(dir: &Path, text: &str) -> Result<Config, String> {
    let path = dir.join("callseal.toml");
    std::fs::write(&path, text).expect("write callseal.toml");
    Config::load(&path).map_err(|error| error.to_string())
}

const US_KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/0b6a1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d";
const EU_KEY: &str = "arn:aws:kms:eu-west-1:111122223333:key/9f8e7d6c-5b4a-4c3d-8e2f-1a0b9c8d7e6f";

#[test]
fn residency_rejects_kms_key_outside_allowed_regions() {
    let dir = tempfile::tempdir().expect("create a scratch directory");
    let error = load_config(dir.path(), &residency_config(EU_KEY, "us-east-1", None))
        .expect_err("a key in eu-west-1 is outside the default regions");
    assert!(error.contains("callseal.toml"), "names the file: {error}");
    assert!(error.contains(PRACTICE), "names the practice: {error}");
    assert!(error.contains(EU_KEY), "names the key: {error}");
    assert!(
        error.contains("eu-west-1"),
        "names the key's region: {error}"
    );
    assert!(
        error.contains("us-east-1, us-east-2, us-west-1, us-west-2, us-gov-east-1, us-gov-west-1"),
        "lists the allowed regions: {error}"
    );
    assert!(
        error.contains("residency.allowed_regions"),
        "names the setting: {error}"
    );
}

#[test]
fn residency_rejects_bucket_outside_allowed_regions() {
    let dir = tempfile::tempdir().expect("create a scratch directory");
    let error = load_config(dir.path(), &residency_config(US_KEY, "eu-central-1", None))
        .expect_err("a bucket in eu-central-1 is outside the default regions");
    assert!(error.contains("storage.region"), "names the key: {error}");
    assert!(error.contains("phi-bucket"), "names the bucket: {error}");
    assert!(
        error.contains("eu-central-1"),
        "names the bucket's region: {error}"
    );
    assert!(
        error.contains("us-east-1, us-east-2"),
        "lists the allowed regions: {error}"
    );
}

#[test]
fn residency_allowed_regions_are_configurable() {
    let dir = tempfile::tempdir().expect("create a scratch directory");
    let eu_only: &[&str] = &["eu-west-1"];

    let config = load_config(
        dir.path(),
        &residency_config(EU_KEY, "eu-west-1", Some(eu_only)),
    )
    .expect("a key and bucket in an allowed region load");
    let kms = config.practices[0]
        .kms
        .as_ref()
        .expect("the practice's KMS key");
    assert_eq!(kms.arn, EU_KEY);

    let error = load_config(
        dir.path(),
        &residency_config(US_KEY, "eu-west-1", Some(eu_only)),
    )
    .expect_err("a key in us-east-1 is outside [\"eu-west-1\"]");
    assert!(error.contains(US_KEY), "names the key: {error}");
    assert!(
        error.contains("allowed regions eu-west-1"),
        "lists the configured regions: {error}"
    );

    let error = load_config(
        dir.path(),
        &residency_config(EU_KEY, "us-east-1", Some(eu_only)),
    )
    .expect_err("a bucket in us-east-1 is outside [\"eu-west-1\"]");
    assert!(error.contains("phi-bucket"), "names the bucket: {error}");
    assert!(
        error.contains("allowed regions eu-west-1"),
        "lists the configured regions: {error}"
    );
}
