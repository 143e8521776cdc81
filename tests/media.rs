//! Media downloads and downstream forwarding of Retell webhook events, end to end: `callseal
//! serve` runs as a child process, and a local HTTPS server on 127.0.0.1 serves the media and
//! receives forwarded copies.
//!
//! Every URL a test delivers points at its own server on loopback, or at a host that the policy
//! rejects before any name resolution or connection (`media.example.invalid`).

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use common::gateway::{Client, GatewayFiles, PRACTICE, Protocol, full_body, within_guard};
use common::media::{
    MediaServer, MediaSettings, Reply, admin_addr, background_tasks, call_ended, canary,
    sha256_hex, wait_for_background_tasks, wav_recording,
};
use common::retell::{
    ServeProcess, assert_accepted, call_dir, call_files, deliver, digest_hex, fixture_for_call,
    get_artifact, new_api_key, now_ms, post_signed, sign, version_name, versions,
};

/// Length of the generated recording's samples: 10 MiB, so with its header the file exceeds 10 MiB.
const RECORDING_DATA_LEN: u32 = 10 * 1024 * 1024;
/// Frame size and pause of the slow media server: 10 MiB in 320 frames of 32 KiB, about 3
/// seconds in all.
const SLOW_CHUNK: usize = 32 * 1024;
const SLOW_PAUSE: Duration = Duration::from_millis(10);
/// Log filter of the child gateways, so that debug lines are checked for canaries too.
const LOG_FILTER: &str = "debug";

fn slow_recording(recording: &Bytes) -> Reply {
    Reply::Slow {
        data: recording.clone(),
        chunk: SLOW_CHUNK,
        pause: SLOW_PAUSE,
    }
}

fn client(files: &GatewayFiles, process: &ServeProcess) -> Client {
    files.client(process.data_addr, Protocol::Http1)
}

/// Polls `GET recording.wav` until it returns 200 and returns the body.
async fn wait_for_recording(client: &Client, files: &GatewayFiles, call: &str) -> Bytes {
    within_guard("the recording being stored", async {
        loop {
            let reply = get_artifact(client, &files.token, PRACTICE, call, "recording.wav").await;
            if reply.status == StatusCode::OK {
                return reply.bytes().clone();
            }
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "GET recording.wav before it is stored"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Downloads
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn slow_large_recording_is_stored_intact() {
    let api_key = new_api_key();
    let files = MediaSettings::default().create_files(&api_key);
    let recording = Bytes::from(wav_recording(RECORDING_DATA_LEN, 1));
    assert!(
        recording.len() >= 10 * 1024 * 1024,
        "the recording has 10 MiB or more"
    );
    let served = recording.clone();
    let media = MediaServer::start(&files, move |_| slow_recording(&served)).await;
    let process = ServeProcess::spawn(&files, LOG_FILTER).await;
    let client = client(&files, &process);

    let call = "call_media_slow";
    let url = media.url("/recordings/slow.wav?token=abc");
    let body = call_ended(call, &[("recording_url", &url)]);
    let reply = deliver(&client, PRACTICE, &api_key, &body).await;
    assert_accepted(&reply, "call_ended with a recording link");

    let downloaded = wait_for_recording(&client, &files, call).await;
    assert_eq!(downloaded.len(), recording.len(), "recording length");
    assert_eq!(
        sha256_hex(&downloaded),
        sha256_hex(&recording),
        "recording SHA-256"
    );
    assert_eq!(media.requests().len(), 1, "one download request");
    let admin = admin_addr(&process);
    wait_for_background_tasks(admin, "media_download", "stored", 1.0).await;
    let leftover_jobs: Vec<String> = call_files(&files, PRACTICE, call)
        .into_iter()
        .filter(|name| name.starts_with("job."))
        .collect();
    assert!(
        leftover_jobs.is_empty(),
        "the job object is deleted: {leftover_jobs:?}"
    );
    process.stop().await;
}

#[tokio::test]
async fn download_resumes_after_sigkill() {
    let api_key = new_api_key();
    let files = MediaSettings::default().create_files(&api_key);
    let recording = Bytes::from(wav_recording(RECORDING_DATA_LEN, 2));
    let served = recording.clone();
    // The first body stops after 1 MiB, so the gateway is killed while a download is running.
    let media =
        MediaServer::start_holding(&files, Some(1024 * 1024), move |_| slow_recording(&served))
            .await;
    let process = ServeProcess::spawn(&files, LOG_FILTER).await;

    let call = "call_media_killed";
    let url = media.url("/recordings/killed.wav");
    let body = call_ended(call, &[("recording_url", &url)]);
    let reply = deliver(&client(&files, &process), PRACTICE, &api_key, &body).await;
    assert_accepted(&reply, "call_ended with a recording link");

    media.wait_until_held().await;
    // Dropping the process handle sends SIGKILL (`Child::kill`) and waits for the exit.
    drop(process);
    let left = call_files(&files, PRACTICE, call);
    assert!(
        !left.iter().any(|name| name == "recording.wav"),
        "no recording is stored before the restart: {left:?}"
    );
    assert!(
        left.iter()
            .any(|name| name.starts_with("job.recording.wav.")),
        "the job object survives SIGKILL: {left:?}"
    );
    media.release();

    let process = ServeProcess::spawn(&files, LOG_FILTER).await;
    let client = client(&files, &process);
    let downloaded = wait_for_recording(&client, &files, call).await;
    assert_eq!(downloaded.len(), recording.len(), "recording length");
    assert_eq!(
        sha256_hex(&downloaded),
        sha256_hex(&recording),
        "recording SHA-256"
    );
    assert_eq!(
        media.requests().len(),
        2,
        "one download before the kill and one after the restart"
    );
    let log = process.stop().await;
    assert!(
        log.contains("media stored"),
        "the restarted gateway logs the stored media"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

/// A media link the policy rejects: how to build it from the local server's port and the canaries, and
/// whether the policy must reject it before any connection to the local server.
struct RejectedLink {
    case: &'static str,
    allow_loopback: bool,
    build_url: fn(port: u16, path_canary: &str, query_canary: &str) -> String,
    /// The local server's reply, for the case that reaches it.
    reply: fn(path_canary: &str, query_canary: &str) -> Reply,
    connects: bool,
}

/// Delivers a `call_ended` whose recording link is rejected, and checks the 204 response, the
/// missing artifact, the failure metric and the log.
async fn check_rejected_link(rejected: RejectedLink) {
    let case = rejected.case;
    let api_key = new_api_key();
    let settings = MediaSettings {
        allow_loopback: rejected.allow_loopback,
        ..MediaSettings::default()
    };
    let files = settings.create_files(&api_key);
    let path_canary = canary("PATHCANARY");
    let query_canary = canary("QUERYCANARY");
    let reply = (rejected.reply)(&path_canary, &query_canary);
    let media = MediaServer::start(&files, move |_| reply.clone()).await;
    let process = ServeProcess::spawn(&files, LOG_FILTER).await;
    let admin = admin_addr(&process);
    let client = client(&files, &process);

    let call = "call_media_rejected";
    let url = (rejected.build_url)(media.port, &path_canary, &query_canary);
    let body = call_ended(call, &[("recording_url", &url)]);
    let reply = deliver(&client, PRACTICE, &api_key, &body).await;
    assert_accepted(&reply, case);

    wait_for_background_tasks(admin, "media_download", "failed", 1.0).await;
    assert_eq!(
        background_tasks(admin, "media_download", "stored").await,
        0.0,
        "{case}: no download is counted as stored"
    );
    let read = get_artifact(&client, &files.token, PRACTICE, call, "recording.wav").await;
    assert_eq!(
        read.status,
        StatusCode::NOT_FOUND,
        "{case}: GET recording.wav"
    );
    let stored = call_files(&files, PRACTICE, call);
    assert!(
        !stored.iter().any(|name| name == "recording.wav"),
        "{case}: no recording file: {stored:?}"
    );
    assert!(
        !stored.iter().any(|name| name.starts_with("job.")),
        "{case}: the failed job is deleted: {stored:?}"
    );
    if rejected.connects {
        assert!(
            !media.requests().is_empty(),
            "{case}: the allowed URL is requested"
        );
    } else {
        assert_eq!(
            media.connections(),
            0,
            "{case}: rejected before any connection"
        );
    }

    let log = process.stop().await;
    assert!(
        log.contains("DEBUG"),
        "{case}: the log has debug lines, so they are checked too"
    );
    assert!(
        log.contains("media download failed for good"),
        "{case}: the failure is logged"
    );
    for secret in [
        path_canary.as_str(),
        query_canary.as_str(),
        "example.invalid",
    ] {
        assert!(
            !log.contains(secret),
            "{case}: the log contains {secret}:\n{log}"
        );
    }
}

fn no_reply(_: &str, _: &str) -> Reply {
    Reply::Status(500)
}

#[tokio::test]
async fn plain_http_link_is_rejected() {
    check_rejected_link(RejectedLink {
        case: "http:// link",
        allow_loopback: true,
        build_url: |port, path, query| format!("http://localhost:{port}/{path}.wav?sig={query}"),
        reply: no_reply,
        connects: false,
    })
    .await;
}

#[tokio::test]
async fn host_off_allowlist_is_rejected() {
    check_rejected_link(RejectedLink {
        case: "host off the allowlist",
        allow_loopback: true,
        build_url: |_, path, query| format!("https://media.example.invalid/{path}.wav?sig={query}"),
        reply: no_reply,
        connects: false,
    })
    .await;
}

#[tokio::test]
async fn redirect_off_allowlist_is_rejected() {
    check_rejected_link(RejectedLink {
        case: "redirect to a host off the allowlist",
        allow_loopback: true,
        build_url: |port, path, query| format!("https://localhost:{port}/{path}.wav?sig={query}"),
        reply: |path, query| {
            Reply::Redirect(format!(
                "https://media.example.invalid/{path}/moved.wav?sig={query}"
            ))
        },
        connects: true,
    })
    .await;
}

#[tokio::test]
async fn loopback_link_rejected_without_test_flag() {
    check_rejected_link(RejectedLink {
        case: "loopback without allow_loopback_for_tests",
        allow_loopback: false,
        build_url: |port, path, query| format!("https://localhost:{port}/{path}.wav?sig={query}"),
        reply: no_reply,
        connects: false,
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forwarded_copy_is_redacted_and_signed() {
    let api_key = new_api_key();
    let secret = canary("forward-secret");
    let files = MediaSettings::default().create_files(&api_key);
    let receiver = MediaServer::start(&files, |_| Reply::Status(204)).await;
    let settings = MediaSettings {
        forward: Some((receiver.url("/hook"), secret.clone())),
        ..MediaSettings::default()
    };
    settings.write_config(&files, &api_key);

    let process = ServeProcess::spawn(&files, LOG_FILTER).await;
    let admin = admin_addr(&process);
    let client = client(&files, &process);
    let call = "call_media_forward";
    let unknown_canary = canary("UNKNOWNCANARY");
    let phone_canary = format!("+1555{}", &canary("x")[2..10]);
    let body = call_ended(
        call,
        &[
            ("zz_unknown_field", &unknown_canary),
            ("from_number", &phone_canary),
        ],
    );
    let timestamp = now_ms();
    let signature = sign(&api_key, &body, timestamp);
    let reply = post_signed(&client, PRACTICE, Some(&signature), full_body(body.clone())).await;
    assert_accepted(&reply, "call_ended for forwarding");

    wait_for_background_tasks(admin, "forward", "stored", 1.0).await;
    let posts: Vec<_> = receiver
        .requests()
        .into_iter()
        .filter(|request| request.method == Method::POST)
        .collect();
    assert_eq!(posts.len(), 1, "one POST at the receiver");
    let post = &posts[0];
    assert_eq!(post.target, "/hook", "POST path");
    let text = String::from_utf8_lossy(&post.body).into_owned();
    assert!(text.contains(call), "the copy contains call_id: {text}");
    assert!(
        !text.contains(&unknown_canary),
        "the copy drops the unknown field: {text}"
    );
    assert!(
        !text.contains(&phone_canary),
        "the copy drops from_number: {text}"
    );

    let signature = post
        .headers
        .get("x-callseal-signature")
        .and_then(|value| value.to_str().ok())
        .expect("the POST has x-callseal-signature");
    let (signed_at, digest) = signature
        .strip_prefix("v=")
        .and_then(|rest| rest.split_once(",d="))
        .unwrap_or_else(|| panic!("malformed x-callseal-signature: {signature}"));
    let signed_at: u64 = signed_at.parse().expect("a numeric signature timestamp");
    assert_eq!(
        digest,
        digest_hex(&secret, &post.body, signed_at),
        "x-callseal-signature digest"
    );

    let copy: serde_json::Value = serde_json::from_slice(&post.body).expect("the copy is JSON");
    assert_eq!(copy["call"]["call_id"], call, "call.call_id of the copy");
    let stored_versions = versions(&files, PRACTICE, call, "event-call_ended");
    let expected = version_name("event-call_ended", timestamp, &body);
    assert_eq!(
        stored_versions,
        vec![expected.clone()],
        "stored event version"
    );
    let event_path = format!("{PRACTICE}/calls/{call}/{expected}");
    let artifacts = copy["artifacts"]
        .as_array()
        .expect("the copy has an artifacts list");
    assert!(
        artifacts.iter().any(|artifact| artifact == &event_path),
        "artifacts name {event_path}: {artifacts:?}"
    );

    let log = process.stop().await;
    for secret in [unknown_canary.as_str(), phone_canary.as_str(), &secret] {
        assert!(!log.contains(secret), "the log contains {secret}");
    }
}

/// A copy still being retried when the gateway stops is kept as an encrypted job object, so it
/// is delivered after the next start. The job is deleted once the receiver accepts the copy.
#[tokio::test]
async fn forward_job_survives_restart() {
    let api_key = new_api_key();
    let secret = canary("forward-secret");
    let files = MediaSettings::default().create_files(&api_key);
    let accepting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = MediaServer::start(&files, {
        let accepting = std::sync::Arc::clone(&accepting);
        move |_| {
            if accepting.load(std::sync::atomic::Ordering::SeqCst) {
                Reply::Status(204)
            } else {
                Reply::Status(503)
            }
        }
    })
    .await;
    let settings = MediaSettings {
        forward: Some((receiver.url("/hook"), secret)),
        ..MediaSettings::default()
    };
    settings.write_config(&files, &api_key);

    let process = ServeProcess::spawn(&files, LOG_FILTER).await;
    let call = "call_forward_restart";
    let body = call_ended(call, &[]);
    let reply = deliver(&client(&files, &process), PRACTICE, &api_key, &body).await;
    assert_accepted(&reply, "call_ended for forwarding");
    receiver.wait_for_requests(1).await;
    process.stop().await;

    let jobs = |files: &GatewayFiles| -> Vec<String> {
        call_files(files, PRACTICE, call)
            .into_iter()
            .filter(|name| name.starts_with("forward."))
            .collect()
    };
    assert_eq!(
        jobs(&files).len(),
        1,
        "the forward job outlives the process"
    );
    let failed_posts = receiver.requests().len();

    accepting.store(true, std::sync::atomic::Ordering::SeqCst);
    let process = ServeProcess::spawn(&files, LOG_FILTER).await;
    let admin = admin_addr(&process);
    wait_for_background_tasks(admin, "forward", "stored", 1.0).await;
    let posts = receiver.requests();
    assert_eq!(posts.len(), failed_posts + 1, "one POST after the restart");
    let copy: serde_json::Value =
        serde_json::from_slice(&posts[failed_posts].body).expect("the copy is JSON");
    assert_eq!(
        copy["call"]["call_id"], call,
        "call.call_id of the resent copy"
    );
    within_guard("the forward job being deleted", async {
        while !jobs(&files).is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let listing = client(&files, &process)
        .get(
            &format!("/v1/practices/{PRACTICE}/calls/{call}"),
            &files.token,
            None,
        )
        .await;
    assert_eq!(listing.status, StatusCode::OK);
    let text = String::from_utf8_lossy(listing.bytes()).into_owned();
    assert!(!text.contains("forward."), "jobs are not listed: {text}");
    process.stop().await;
}

/// An event stored while its transcript failed is spooled. Once the spool stores the transcript,
/// the downstream copy is sent, because no earlier delivery completed the event.
#[tokio::test]
async fn forward_sent_after_spool_completes_event() {
    let api_key = new_api_key();
    let secret = canary("forward-secret");
    let files = MediaSettings::default().create_files(&api_key);
    let receiver = MediaServer::start(&files, |_| Reply::Status(204)).await;
    let settings = MediaSettings {
        forward: Some((receiver.url("/hook"), secret)),
        ..MediaSettings::default()
    };
    settings.write_config(&files, &api_key);

    let process = ServeProcess::spawn(&files, LOG_FILTER).await;
    let admin = admin_addr(&process);
    let call = "call_forward_completed";
    let body = fixture_for_call("call_ended.json", call);
    let timestamp = now_ms();
    let blocker =
        call_dir(&files, PRACTICE, call).join(version_name("transcript", timestamp, &body));
    std::fs::create_dir_all(blocker.join("occupied")).expect("block the transcript's name");
    let signature = sign(&api_key, &body, timestamp);
    let reply = post_signed(
        &client(&files, &process),
        PRACTICE,
        Some(&signature),
        full_body(body.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);

    std::fs::remove_dir_all(&blocker).expect("unblock the transcript");
    wait_for_background_tasks(admin, "forward", "stored", 1.0).await;
    let posts: Vec<_> = receiver
        .requests()
        .into_iter()
        .filter(|request| request.method == Method::POST)
        .collect();
    assert_eq!(posts.len(), 1, "one copy at the receiver");
    process.stop().await;
}
