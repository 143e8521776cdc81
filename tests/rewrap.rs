//! `callseal keys rewrap` with local keys: objects move to a new key version without their bodies
//! being re-encrypted, an interrupted run completes when run again, and the old key can then go.

use std::fs;

use callseal::config::Config;
use callseal::envelope::ParsedHeader;
use callseal::ids::{ObjectId, PracticeId};
use callseal::keys::KeyDirectory;
use callseal::rewrap::{self, Report, Target};
use callseal::{server, tls, webhook};

const OBJECTS: usize = 10;

fn config_text() -> &'static str {
    r#"
[listen]
data = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"

[storage]
kind = "local"
path = "data"

[keys]
directory = "keys"

[[practices]]
id = "clinic-1"
"#
}

fn object(index: usize) -> ObjectId {
    let call = format!("call_{index:04}");
    ObjectId::new(
        "clinic-1".parse().unwrap(),
        call.parse().unwrap(),
        "recording.wav".parse().unwrap(),
    )
}

fn content(index: usize) -> Vec<u8> {
    (0..100_000 + index)
        .map(|i| (i * 7 + index) as u8)
        .collect()
}

/// Returns the key name in the stored object's first EDK.
fn stored_key_name(dir: &std::path::Path, index: usize) -> String {
    let path = dir.join(format!("data/clinic-1/calls/call_{index:04}/recording.wav"));
    let bytes = fs::read(path).unwrap();
    let parsed = ParsedHeader::parse(&bytes).unwrap().unwrap();
    let info = &parsed.header.edks[0].provider_info;
    String::from_utf8_lossy(&info[..info.len() - 20]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_local_resumes_and_old_key_can_go() {
    let dir = tempfile::tempdir().unwrap();
    tls::write_dev_certs(&dir.path().join("certs"), false).unwrap();
    let practice: PracticeId = "clinic-1".parse().unwrap();
    let keys = KeyDirectory::new(dir.path().join("keys"));
    keys.generate(&practice).unwrap();
    let config_path = dir.path().join("callseal.toml");
    fs::write(&config_path, config_text()).unwrap();
    let config = Config::load(&config_path).unwrap();

    let running = server::start(config.clone()).await.unwrap();
    for index in 0..OBJECTS {
        webhook::store_bytes(&running.state, &object(index), &content(index))
            .await
            .unwrap();
    }
    running.shutdown().await;
    let bodies_before: Vec<Vec<u8>> = (0..OBJECTS)
        .map(|index| {
            let path = dir
                .path()
                .join(format!("data/clinic-1/calls/call_{index:04}/recording.wav"));
            let bytes = fs::read(path).unwrap();
            let header_len = ParsedHeader::parse(&bytes).unwrap().unwrap().len();
            bytes[header_len..].to_vec()
        })
        .collect();

    keys.rotate(&practice).unwrap();

    let dry = rewrap::run(&config, &practice, &Target::Local, true, None, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        dry,
        Report {
            objects: OBJECTS,
            rewrapped: OBJECTS,
            already_on_target: 0
        }
    );
    assert_eq!(
        stored_key_name(dir.path(), 0),
        "clinic-1/v1",
        "a dry run changed an object"
    );

    let first = rewrap::run(
        &config,
        &practice,
        &Target::Local,
        false,
        Some(3),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(first.rewrapped, 3, "{first:?}");
    let second = rewrap::run(&config, &practice, &Target::Local, false, None, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        second,
        Report {
            objects: OBJECTS,
            rewrapped: OBJECTS - 3,
            already_on_target: 3
        }
    );
    let third = rewrap::run(&config, &practice, &Target::Local, false, None, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        third.rewrapped, 0,
        "a finished rewrap did more work: {third:?}"
    );

    for (index, body_before) in bodies_before.iter().enumerate() {
        assert_eq!(
            stored_key_name(dir.path(), index),
            "clinic-1/v2",
            "object {index}"
        );
        let path = dir
            .path()
            .join(format!("data/clinic-1/calls/call_{index:04}/recording.wav"));
        let bytes = fs::read(path).unwrap();
        let header_len = ParsedHeader::parse(&bytes).unwrap().unwrap().len();
        assert!(
            bytes[header_len..] == body_before[..],
            "object {index}: body re-encrypted"
        );
    }
    let staging = dir.path().join("data/clinic-1/rewrap");
    let leftovers: Vec<_> = walk_files(&staging);
    assert!(leftovers.is_empty(), "staging objects left: {leftovers:?}");

    // With version 1 gone, everything still reads through the gateway.
    fs::remove_file(dir.path().join("keys/clinic-1/v1.key")).unwrap();
    let running = server::start(config.clone()).await.unwrap();
    for index in 0..OBJECTS {
        let plaintext = server::read_object(&running.state, &object(index))
            .await
            .unwrap();
        assert!(
            plaintext[..] == content(index)[..],
            "object {index} differs after rewrap"
        );
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_rejects_target_outside_residency() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("callseal.toml");
    fs::write(&config_path, config_text()).unwrap();
    let config = Config::load(&config_path).unwrap();
    let target: Target = "arn:aws:kms:eu-west-1:123456789012:key/abc"
        .parse()
        .unwrap();
    let practice: PracticeId = "clinic-1".parse().unwrap();
    KeyDirectory::new(dir.path().join("keys"))
        .generate(&practice)
        .unwrap();
    fs::create_dir_all(dir.path().join("data")).unwrap();
    let error = rewrap::run(&config, &practice, &target, true, None, |_, _| {})
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("eu-west-1"), "{error:#}");
}

fn walk_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = fs::read_dir(root) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}
