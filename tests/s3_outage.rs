//! Webhook deliveries while S3 is unreachable. The events wait encrypted in the local spool and
//! reach S3 once it returns, none lost and none stored twice. Only a full or unwritable spool
//! returns 503.
//!
//! S3 and KMS are moto's server (`scripts/test` starts it and sets `CALLSEAL_MOTO_ENDPOINT`). S3
//! requests pass through a [`FaultProxy`] that the test switches to unreachable and back.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use futures::TryStreamExt;
use http::StatusCode;
use object_store::{ObjectStore, ObjectStoreExt};

use common::aws::{FaultProxy, KmsFault, KmsGateway, KmsGatewaySettings, Moto, ObjectStorage};
use common::gateway::{Client, Protocol, Reply, metric_value, within_guard};
use common::retell::{deliver, fixture_for_call, get_artifact, new_api_key};

const PRACTICE: &str = "clinic-1";
/// Text from the fixture's transcript, which must never appear in a spool file.
const TRANSCRIPT_TEXT: &str = "Example Family Clinic";
/// A store that takes longer than this goes to the spool; short, so the tests run fast.
const STORE_TIMEOUT_SECS: u64 = 2;

/// A gateway storing into a moto bucket through a proxy that can cut S3 off.
struct Outage {
    moto: Moto,
    bucket: String,
    s3_proxy: FaultProxy,
    gateway: KmsGateway,
    retell_key: String,
}

impl Outage {
    async fn start(spool_max_bytes: Option<u64>) -> Outage {
        let moto = Moto::connect().await;
        let key_arn = moto.create_kms_key().await;
        let bucket = moto.create_bucket().await;
        let s3_proxy = FaultProxy::start(moto.addr).await;
        let retell_key = new_api_key();
        let mut webhooks = format!("store_timeout_secs = {STORE_TIMEOUT_SECS}\n");
        if let Some(bytes) = spool_max_bytes {
            webhooks.push_str(&format!("spool_max_bytes = {bytes}\n"));
        }
        let settings = KmsGatewaySettings {
            moto_endpoint: s3_proxy.url(),
            kms_endpoint: moto.endpoint.clone(),
            storage: ObjectStorage::S3 {
                bucket: bucket.clone(),
                prefix: None,
            },
            practices: vec![(PRACTICE.to_owned(), key_arn)],
            max_attempts: None,
            data_key_cache_ttl_secs: None,
            retell_key: Some(retell_key.clone()),
            webhooks: Some(webhooks),
        };
        let gateway = KmsGateway::start(&settings).await;
        Outage {
            moto,
            bucket,
            s3_proxy,
            gateway,
            retell_key,
        }
    }

    fn client(&self) -> Client {
        self.gateway.client(Protocol::Http1)
    }

    async fn deliver(&self, body: &[u8]) -> Reply {
        deliver(&self.client(), PRACTICE, &self.retell_key, body).await
    }

    fn spool_dir(&self) -> std::path::PathBuf {
        self.gateway.dir().join("spool")
    }

    /// Returns the spool's message files and their bytes, by file name.
    fn spool_files(&self) -> BTreeMap<String, Vec<u8>> {
        spool_files(&self.spool_dir())
    }

    fn spooled_events(&self) -> f64 {
        let metrics = self.gateway.state().metrics.encode();
        metric_value(&metrics, "callseal_webhook_spool_events").expect("the spool gauge")
    }

    /// Waits until the drainer has emptied the spool.
    async fn wait_until_drained(&self) {
        within_guard("the spool draining", async {
            while self.spooled_events() > 0.0 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    /// Returns every object in the bucket, by key, with its bytes.
    async fn bucket_objects(&self) -> BTreeMap<String, Vec<u8>> {
        let store = self.moto.bucket(&self.bucket);
        let listed: Vec<_> = store
            .list(None)
            .try_collect()
            .await
            .expect("list the bucket");
        let mut objects = BTreeMap::new();
        for meta in listed {
            // Media workers delete finished job objects between the listing and the read.
            let object = match store.get(&meta.location).await {
                Ok(object) => object,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(error) => panic!("get {}: {error}", meta.location),
            };
            let bytes = object.bytes().await.expect("read an object");
            objects.insert(meta.location.to_string(), bytes.to_vec());
        }
        objects
    }
}

fn spool_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("read the spool directory")
        .map(|entry| entry.expect("a spool entry"))
        .filter(|entry| entry.file_type().expect("a file type").is_file())
        .map(|entry| {
            let name = entry.file_name().into_string().expect("a UTF-8 name");
            (name, fs::read(entry.path()).expect("read a spool file"))
        })
        .collect()
}

fn assert_status(reply: &Reply, status: StatusCode, case: &str) {
    assert_eq!(reply.status, status, "{case}: {:?}", reply.body);
}

fn call_id(index: usize) -> String {
    format!("call_outage{index:03}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_events_survive_restart() {
    let mut outage = Outage::start(None).await;
    let before = fixture_for_call("call_ended.json", &call_id(0));
    assert_status(
        &outage.deliver(&before).await,
        StatusCode::NO_CONTENT,
        "S3 up",
    );
    assert!(outage.spool_files().is_empty());

    outage.s3_proxy.set_fault(KmsFault::Unreachable);
    let events: Vec<Vec<u8>> = (1..=5)
        .map(|index| fixture_for_call("call_ended.json", &call_id(index)))
        .collect();
    for (index, body) in events.iter().enumerate() {
        let reply = outage.deliver(body).await;
        assert_status(
            &reply,
            StatusCode::ACCEPTED,
            &format!("event {index} with S3 down"),
        );
    }
    // A second delivery of a spooled body is a duplicate: it is not spooled again.
    let repeat = outage.deliver(&events[0]).await;
    assert_status(
        &repeat,
        StatusCode::NO_CONTENT,
        "repeated delivery with S3 down",
    );

    let spooled = outage.spool_files();
    assert_eq!(spooled.len(), events.len(), "{:?}", spooled.keys());
    for (name, bytes) in &spooled {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(TRANSCRIPT_TEXT), "{name} holds plaintext");
    }
    assert_eq!(outage.spooled_events(), events.len() as f64);

    // The spool outlives the process: the gateway restarts while S3 is still unreachable.
    outage.gateway.restart().await;
    assert_eq!(outage.spooled_events(), events.len() as f64);
    let during = fixture_for_call("call_ended.json", &call_id(6));
    let reply = outage.deliver(&during).await;
    assert_status(&reply, StatusCode::ACCEPTED, "after a restart with S3 down");
    let spooled = outage.spool_files();
    assert!(
        outage
            .bucket_objects()
            .await
            .keys()
            .all(|key| key.contains(&call_id(0))),
        "nothing of the spooled calls reached S3 while it was down"
    );

    outage.s3_proxy.set_fault(KmsFault::PassThrough);
    outage.wait_until_drained().await;
    assert!(outage.spool_files().is_empty());

    // Each spooled message is now stored byte for byte. Each event also reads back exactly
    // through the gateway, with its transcript beside it.
    let objects = outage.bucket_objects().await;
    for message in spooled.values() {
        assert!(
            objects.values().any(|object| object == message),
            "a spooled message is not stored as is"
        );
    }
    let reader = outage.gateway.reader_token(PRACTICE).to_owned();
    let client = outage.client();
    for (index, body) in events.iter().chain([&during]).enumerate() {
        let call = if index < events.len() {
            call_id(index + 1)
        } else {
            call_id(6)
        };
        let reply = get_artifact(&client, &reader, PRACTICE, &call, "event-call_ended.json").await;
        assert_status(&reply, StatusCode::OK, &call);
        assert_eq!(reply.bytes().as_ref(), body.as_slice(), "{call}");
        let reply = get_artifact(&client, &reader, PRACTICE, &call, "transcript.json").await;
        assert_status(&reply, StatusCode::OK, &format!("{call} transcript"));
        let version_prefix = format!("/calls/{call}/event-call_ended.v");
        let stored_versions = objects
            .keys()
            .filter(|key| key.contains(&version_prefix))
            .count();
        assert_eq!(stored_versions, 1, "{call} has one stored version");
    }
    outage.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_or_unwritable_spool_503() {
    let body_len = fixture_for_call("call_ended.json", &call_id(1)).len() as u64;
    // Room for one sealed event (the body plus its header and frame overhead), not two.
    let mut outage = Outage::start(Some(body_len * 3 / 2)).await;
    outage.s3_proxy.set_fault(KmsFault::Unreachable);

    let first = fixture_for_call("call_ended.json", &call_id(1));
    assert_status(
        &outage.deliver(&first).await,
        StatusCode::ACCEPTED,
        "first event",
    );
    let second = fixture_for_call("call_ended.json", &call_id(2));
    let rejected = outage.deliver(&second).await;
    assert_status(&rejected, StatusCode::SERVICE_UNAVAILABLE, "spool full");
    assert!(
        rejected.error_message().contains("spool is full"),
        "{:?}",
        rejected.body
    );
    assert!(rejected.header("retry-after").is_some());
    assert_eq!(outage.spool_files().len(), 1, "the spooled event is kept");

    outage.s3_proxy.set_fault(KmsFault::PassThrough);
    outage.wait_until_drained().await;
    // Retell's retry of the rejected event now reaches S3 directly.
    assert_status(
        &outage.deliver(&second).await,
        StatusCode::NO_CONTENT,
        "retry",
    );

    // A spool directory that cannot be written: the path is a file now.
    outage.s3_proxy.set_fault(KmsFault::Unreachable);
    let spool_dir = outage.spool_dir();
    fs::remove_dir_all(&spool_dir).expect("remove the spool directory");
    fs::write(&spool_dir, b"in the way").expect("put a file in its place");
    let third = fixture_for_call("call_ended.json", &call_id(3));
    let rejected = outage.deliver(&third).await;
    assert_status(
        &rejected,
        StatusCode::SERVICE_UNAVAILABLE,
        "spool unwritable",
    );
    assert!(
        rejected.error_message().contains("spool cannot be written"),
        "{:?}",
        rejected.body
    );

    fs::remove_file(&spool_dir).expect("remove the file");
    fs::create_dir(&spool_dir).expect("recreate the spool directory");
    assert_status(
        &outage.deliver(&third).await,
        StatusCode::ACCEPTED,
        "spool writable again",
    );
    outage.s3_proxy.set_fault(KmsFault::PassThrough);
    outage.wait_until_drained().await;

    let reader = outage.gateway.reader_token(PRACTICE).to_owned();
    let client = outage.client();
    for (index, body) in [(1, &first), (2, &second), (3, &third)] {
        let call = call_id(index);
        let reply = get_artifact(&client, &reader, PRACTICE, &call, "event-call_ended.json").await;
        assert_status(&reply, StatusCode::OK, &call);
        assert_eq!(reply.bytes().as_ref(), body.as_slice(), "{call}");
    }

    outage.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_spool_file_quarantined() {
    let mut outage = Outage::start(None).await;
    outage.s3_proxy.set_fault(KmsFault::Unreachable);
    let intact = fixture_for_call("call_ended.json", &call_id(1));
    let tampered = fixture_for_call("call_ended.json", &call_id(2));
    for body in [&intact, &tampered] {
        assert_status(&outage.deliver(body).await, StatusCode::ACCEPTED, "spooled");
    }
    outage.gateway.shutdown().await;

    // The second file contains the second event: flip a bit in its last frame's tag.
    let spooled = outage.spool_files();
    let (name, bytes) = spooled.iter().nth(1).expect("two spool files");
    let mut bytes = bytes.clone();
    *bytes.last_mut().expect("a non-empty file") ^= 0x01;
    fs::write(outage.spool_dir().join(name), bytes).expect("tamper with the spool file");

    outage.s3_proxy.set_fault(KmsFault::PassThrough);
    outage.gateway.restart().await;
    outage.wait_until_drained().await;
    assert!(
        outage
            .spool_dir()
            .join(callseal::webhook::spool::QUARANTINE)
            .join(name)
            .exists(),
        "the tampered file is kept in quarantine"
    );
    let metrics = outage.gateway.state().metrics.encode();
    let quarantined = metric_value(
        &metrics,
        "callseal_webhook_spool_operations_total{outcome=\"quarantined\"}",
    );
    assert_eq!(quarantined, Some(1.0));

    let reader = outage.gateway.reader_token(PRACTICE).to_owned();
    let client = outage.client();
    let reply = get_artifact(
        &client,
        &reader,
        PRACTICE,
        &call_id(1),
        "event-call_ended.json",
    )
    .await;
    assert_status(&reply, StatusCode::OK, "intact event");
    assert_eq!(reply.bytes().as_ref(), intact.as_slice());
    for artifact in ["event-call_ended.json", "transcript.json"] {
        let reply = get_artifact(&client, &reader, PRACTICE, &call_id(2), artifact).await;
        assert_status(&reply, StatusCode::NOT_FOUND, artifact);
    }
    outage.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_store_and_redelivery_store_one_version() {
    let outage = Outage::start(None).await;
    // Committing takes longer than the store timeout. So the first delivery is spooled while its
    // commit goes on, and the second arrives before that commit has finished.
    let delay = std::time::Duration::from_millis(STORE_TIMEOUT_SECS * 1000 + 500);
    outage.s3_proxy.set_fault(KmsFault::SlowUploads(delay));
    let body = fixture_for_call("call_ended.json", &call_id(1));
    let first = outage.deliver(&body);
    let second = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        outage.deliver(&body).await
    };
    let (first, second) = tokio::join!(first, second);
    for (case, reply) in [("first", &first), ("second", &second)] {
        assert!(reply.status.is_success(), "{case}: {:?}", reply.body);
    }
    // The commits already under way stay slow; the rest of the work need not be.
    outage.s3_proxy.set_fault(KmsFault::PassThrough);

    outage.wait_until_drained().await;
    outage.gateway.wait_until_idle().await;
    // A store still running after the drain would show up as a second version.
    tokio::time::sleep(delay * 3).await;
    let objects = outage.bucket_objects().await;
    let version_prefix = format!("/calls/{}/event-call_ended.v", call_id(1));
    let stored_versions: Vec<_> = objects
        .keys()
        .filter(|key| key.contains(&version_prefix))
        .collect();
    assert_eq!(stored_versions.len(), 1, "{stored_versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_call_leaves_others_stored() {
    let outage = Outage::start(None).await;
    let stuck = call_id(1);
    outage
        .s3_proxy
        .set_fault(KmsFault::HangPath(format!("/calls/{stuck}/")));
    let reply = outage
        .deliver(&fixture_for_call("call_ended.json", &stuck))
        .await;
    assert_status(&reply, StatusCode::ACCEPTED, "the hanging call");
    let healthy: Vec<String> = (2..=3).map(call_id).collect();
    for call in &healthy {
        let reply = outage
            .deliver(&fixture_for_call("call_ended.json", call))
            .await;
        assert!(reply.status.is_success(), "{call}: {:?}", reply.body);
    }

    within_guard("the other calls reaching S3", async {
        loop {
            let objects = outage.bucket_objects().await;
            let stored = |call: &String| {
                let prefix = format!("/calls/{call}/event-call_ended.v");
                objects.keys().any(|key| key.contains(&prefix))
            };
            if healthy.iter().all(stored) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;

    outage.s3_proxy.set_fault(KmsFault::PassThrough);
    outage.wait_until_drained().await;
    let reader = outage.gateway.reader_token(PRACTICE).to_owned();
    let reply = get_artifact(
        &outage.client(),
        &reader,
        PRACTICE,
        &stuck,
        "event-call_ended.json",
    )
    .await;
    assert_status(&reply, StatusCode::OK, "the hanging call once released");
}
