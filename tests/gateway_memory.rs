//! Peak memory of the real `callseal serve` process while 1 GiB streams through it, up and down.
//!
//! The test starts the binary on the files of a `GatewayFiles` and learns its address from the
//! `gateway started` log line. It uploads 1 GiB generated on the fly (HTTP/1.1, chunked, in pieces
//! of 1 byte to 64 KiB) and reads it back over h2 while hashing it. After each direction it reads
//! the child's peak resident set size (`VmHWM` in `/proc/{pid}/status`).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, StatusCode};

use common::gateway::{
    Client, GatewayFiles, GatewaySettings, HANG_GUARD, PRACTICE, Protocol, empty_body, hash_body,
    object_url, pattern_sha256, random_pieces, stream_body, within,
};

const GIB: u64 = 1024 * 1024 * 1024;

/// Limit for each direction of the transfer: a debug build streams 1 GiB in minutes. It only
/// keeps a broken build from hanging CI.
const TRANSFER_GUARD: Duration = Duration::from_secs(3600);

/// The peak resident set size the gateway must stay under while streaming 1 GiB.
const MAX_PEAK_RSS_KIB: u64 = 64 * 1024;

/// A running `callseal serve` child process, killed on drop if the test did not stop it.
struct ServerProcess {
    child: Child,
    data_addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    fn spawn(files: &GatewayFiles) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_callseal"))
            .arg("serve")
            .arg("--config")
            .arg(&files.config_path)
            .env("CALLSEAL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start callseal serve");

        // The reader thread keeps draining standard error, so the child never blocks on a full
        // pipe, and hands over the start-up line.
        let stderr = child.stderr.take().expect("standard error is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (started_sender, started) = mpsc::channel();
        let thread_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if line.contains("gateway started") {
                    let _ = started_sender.send(line.clone());
                }
                thread_log.lock().expect("log lock").push(line);
            }
        });

        let mut process = ServerProcess {
            child,
            data_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let line = match started.recv_timeout(HANG_GUARD) {
            Ok(line) => line,
            Err(_) => panic!(
                "callseal serve did not log `gateway started`; log:\n{}",
                process.log_text()
            ),
        };
        process.data_addr = field(&line, "data_addr")
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no data_addr in the start-up line: {line}"));
        process
    }

    /// Returns the child's peak resident set size in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read the child's /proc status");
        let line = status
            .lines()
            .find(|line| line.starts_with("VmHWM:"))
            .expect("/proc status has VmHWM");
        line.trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .expect("VmHWM is a number of kB")
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Sends SIGTERM and waits for the child to exit.
    fn stop(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        self.child.wait().expect("wait for callseal serve")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Removes ANSI escape sequences such as `ESC[3m`.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Returns the value of `name=value` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_streams_in_bounded_memory() {
    let files = GatewaySettings::default().create_files();
    let server = ServerProcess::spawn(&files);
    let path = object_url(PRACTICE, "call-1gib", "recording.wav");
    let seed = 1024;
    let expected = pattern_sha256(seed, GIB);

    let upload = Client::new(server.data_addr, &files.ca_cert, Protocol::Http1)
        .with_hang_guard(TRANSFER_GUARD);
    let body = stream_body(random_pieces(seed, 99, GIB));
    let request = upload
        .authorized(Method::PUT, &path, &files.ingest_token)
        .body(body)
        .expect("build PUT");
    let put = upload.fetch(request).await;
    assert_eq!(put.status, StatusCode::CREATED, "PUT 1 GiB: {:?}", put.body);
    let after_upload = server.peak_rss_kib();
    eprintln!("peak RSS of callseal serve after the 1 GiB upload: {after_upload} KiB");
    assert!(
        after_upload < MAX_PEAK_RSS_KIB,
        "peak RSS after the upload: {after_upload} KiB"
    );

    let download = Client::new(server.data_addr, &files.ca_cert, Protocol::Http2)
        .with_hang_guard(TRANSFER_GUARD);
    let request = download
        .authorized(Method::GET, &path, &files.token)
        .body(empty_body())
        .expect("build GET");
    let response = download.send(request).await.expect("GET response head");
    assert_eq!(response.status(), StatusCode::OK, "GET 1 GiB");
    let (length, digest) = within(TRANSFER_GUARD, "the 1 GiB GET body", hash_body(response))
        .await
        .expect("the GET body completes");
    assert_eq!(length, GIB, "GET length");
    assert_eq!(hex::encode(digest), hex::encode(expected), "SHA-256 of GET");
    let after_download = server.peak_rss_kib();
    eprintln!("peak RSS of callseal serve after the 1 GiB download: {after_download} KiB");
    assert!(
        after_download < MAX_PEAK_RSS_KIB,
        "peak RSS after the download: {after_download} KiB"
    );

    let log = server.log_text();
    assert!(
        !log.contains(&files.ingest_token) && !log.contains(&files.token),
        "the log contains a bearer token"
    );
    let status = server.stop();
    assert!(
        status.success(),
        "callseal serve exits cleanly on SIGTERM: {status}; log:\n{log}"
    );
}
