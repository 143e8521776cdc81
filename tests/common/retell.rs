//! Helpers for the Retell webhook tests: a gateway configured with Retell API keys, signed
//! deliveries, Retell's own SDK as a signing oracle, event bodies, and listings of stored files.
//!
//! [`RetellSettings`] builds on [`GatewayFiles`] (certificates, wrapping keys and bearer tokens of
//! [`PRACTICE`] and [`OTHER_PRACTICE`]) and writes its own `callseal.toml` with the Retell keys,
//! key files, agent allowlists and `[webhooks]` limits that a test sets.
//!
//! Signatures are made here independently of callseal's code: `x-retell-signature:
//! v=<unix ms>,d=<hex HMAC-SHA256>`, keyed with the API key string, over the raw body bytes followed
//! by the decimal timestamp. [`sdk_sign`] makes them with the `retell-sdk` Python package instead,
//! through `tests/oracle/retell_sign.py`.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::{Method, StatusCode};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::gateway::{
    BoxError, Client, GatewayFiles, GatewaySettings, MAX_PIECE, OTHER_PRACTICE, PRACTICE, Reply,
    RequestBody, TestGateway, full_body, object_url, stream_body, within_guard,
};

type HmacSha256 = hmac::Hmac<Sha256>;

/// The header that carries Retell's signature.
pub const SIGNATURE_HEADER: &str = "x-retell-signature";

/// The call id of both fixtures.
pub const FIXTURE_CALL_ID: &str = "call_0f1e2d3c4b5a69788796a5b4c3";

/// The agent id of both fixtures.
pub const FIXTURE_AGENT_ID: &str = "agent_1a2b3c4d5e6f708192a3b4c5d6";

/// How far a signature's timestamp may be from the gateway's clock, either way, in milliseconds.
pub const WINDOW_MS: u64 = 300_000;

/// Environment variable through which `retell_sign.py` receives the API key.
const SDK_KEY_VARIABLE: &str = "RETELL_API_KEY";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// The Retell settings of one practice.
#[derive(Clone, Debug)]
pub struct RetellPractice {
    /// [`PRACTICE`] or [`OTHER_PRACTICE`], the practices that have wrapping keys and tokens.
    pub id: &'static str,
    /// Keys listed inline in `retell_api_keys`.
    pub api_keys: Vec<String>,
    /// Keys written one per line to a file named by `retell_api_keys_file`. An empty list writes
    /// no file.
    pub api_keys_in_file: Vec<String>,
    /// `retell_agent_ids`.
    pub agent_ids: Vec<String>,
}

impl RetellPractice {
    pub fn new(id: &'static str) -> Self {
        assert!(
            id == PRACTICE || id == OTHER_PRACTICE,
            "practice `{id}` has no wrapping key in GatewayFiles; use {PRACTICE} or {OTHER_PRACTICE}"
        );
        RetellPractice {
            id,
            api_keys: Vec::new(),
            api_keys_in_file: Vec::new(),
            agent_ids: Vec::new(),
        }
    }

    pub fn key(mut self, key: &str) -> Self {
        self.api_keys.push(key.to_owned());
        self
    }

    pub fn key_in_file(mut self, key: &str) -> Self {
        self.api_keys_in_file.push(key.to_owned());
        self
    }

    pub fn agent(mut self, agent_id: &str) -> Self {
        self.agent_ids.push(agent_id.to_owned());
        self
    }
}

/// A gateway's Retell practices and webhook limits. A `None` keeps the gateway's default.
#[derive(Clone, Debug, Default)]
pub struct RetellSettings {
    pub practices: Vec<RetellPractice>,
    pub max_body_bytes: Option<u64>,
    pub max_unverified_bytes: Option<u64>,
}

impl RetellSettings {
    /// Settings with one practice, [`PRACTICE`], signed with `key`.
    pub fn single(key: &str) -> Self {
        RetellSettings::default().practice(RetellPractice::new(PRACTICE).key(key))
    }

    pub fn practice(mut self, practice: RetellPractice) -> Self {
        self.practices.push(practice);
        self
    }

    pub fn max_body_bytes(mut self, bytes: u64) -> Self {
        self.max_body_bytes = Some(bytes);
        self
    }

    pub fn max_unverified_bytes(mut self, bytes: u64) -> Self {
        self.max_unverified_bytes = Some(bytes);
        self
    }

    /// Creates the gateway's files and replaces their `callseal.toml` with one that has these
    /// settings. The configuration is written as is, not validated.
    pub fn create_files(&self) -> GatewayFiles {
        let files = GatewaySettings::default().create_files();
        let config = self.config_text(&files);
        fs::write(&files.config_path, config).expect("write the webhook callseal.toml");
        files
    }

    /// Creates the files and starts a gateway on them in the test's runtime.
    pub async fn start(&self) -> TestGateway {
        TestGateway::start(self.create_files()).await
    }

    /// Builds the configuration text, writing the practices' key files beside it.
    fn config_text(&self, files: &GatewayFiles) -> String {
        let mut practices = String::new();
        for id in [PRACTICE, OTHER_PRACTICE] {
            writeln!(practices, "[[practices]]\nid = \"{id}\"").expect("write to a String");
            let Some(settings) = self.practices.iter().find(|practice| practice.id == id) else {
                practices.push('\n');
                continue;
            };
            if !settings.api_keys.is_empty() {
                writeln!(
                    practices,
                    "retell_api_keys = {}",
                    toml_list(&settings.api_keys)
                )
                .expect("write to a String");
            }
            if !settings.api_keys_in_file.is_empty() {
                let name = format!("retell-keys-{id}.txt");
                let mut text = settings.api_keys_in_file.join("\n");
                text.push('\n');
                fs::write(files.dir().join(&name), text).expect("write the Retell key file");
                writeln!(practices, "retell_api_keys_file = \"{name}\"")
                    .expect("write to a String");
            }
            if !settings.agent_ids.is_empty() {
                writeln!(
                    practices,
                    "retell_agent_ids = {}",
                    toml_list(&settings.agent_ids)
                )
                .expect("write to a String");
            }
            practices.push('\n');
        }

        // Storage here is a local disk that fails at once when a test blocks a path, never by
        // hanging. A long store timeout keeps large bodies from being spooled when the machine
        // is slow, so the status a test expects does not depend on the load.
        let mut webhooks = String::from("store_timeout_secs = 600\n");
        if let Some(bytes) = self.max_body_bytes {
            writeln!(webhooks, "max_body_bytes = {bytes}").expect("write to a String");
        }
        if let Some(bytes) = self.max_unverified_bytes {
            writeln!(webhooks, "max_unverified_bytes = {bytes}").expect("write to a String");
        }

        format!(
            r#"[listen]
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

[webhooks]
{webhooks}
{practices}[[tokens]]
name = "{PRACTICE}-back-office"
sha256 = "{token_hash}"
role = "reader"
practices = ["{PRACTICE}"]

[[tokens]]
name = "{OTHER_PRACTICE}-back-office"
sha256 = "{other_token_hash}"
role = "reader"
practices = ["{OTHER_PRACTICE}"]
"#,
            token_hash = hex::encode(Sha256::digest(files.token.as_bytes())),
            other_token_hash = hex::encode(Sha256::digest(files.other_token.as_bytes())),
        )
    }
}

/// Formats strings as a TOML array of basic strings.
fn toml_list(values: &[String]) -> String {
    let quoted: Vec<String> = values
        .iter()
        .map(|value| {
            assert!(
                !value.contains(['"', '\\', '\n']),
                "test value {value:?} needs TOML escaping"
            );
            format!("\"{value}\"")
        })
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Generates a random API key for a test: `key_` and 32 random hex digits.
pub fn new_api_key() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("draw a random API key");
    format!("key_{}", hex::encode(bytes))
}

// ---------------------------------------------------------------------------------------------
// Signing and delivery
// ---------------------------------------------------------------------------------------------

/// Returns the current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(elapsed.as_millis()).expect("milliseconds since 1970 fit in u64")
}

/// Computes the lowercase hex HMAC-SHA256 of `body` followed by the decimal `timestamp_ms`.
pub fn digest_hex(key: &str, body: &[u8], timestamp_ms: u64) -> String {
    let mut mac =
        HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.update(timestamp_ms.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Builds the `x-retell-signature` value for `body` signed with `key` at `timestamp_ms`.
pub fn sign(key: &str, body: &[u8], timestamp_ms: u64) -> String {
    format!("v={timestamp_ms},d={}", digest_hex(key, body, timestamp_ms))
}

/// Returns the webhook URL path of a practice.
pub fn webhook_url(practice: &str) -> String {
    format!("/v1/webhooks/retell/{practice}")
}

/// Starts a webhook `POST` with the signature header, when one is given.
pub fn webhook_request(
    client: &Client,
    practice: &str,
    signature: Option<&str>,
) -> http::request::Builder {
    let mut builder = client.request(Method::POST, &webhook_url(practice));
    builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    if let Some(signature) = signature {
        builder = builder.header(SIGNATURE_HEADER, signature);
    }
    builder
}

/// Posts `body` to a practice's webhook URL with the given signature header value.
pub async fn post_signed(
    client: &Client,
    practice: &str,
    signature: Option<&str>,
    body: RequestBody,
) -> Reply {
    let request = webhook_request(client, practice, signature)
        .body(body)
        .expect("build the webhook POST");
    client.fetch(request).await
}

/// Signs `body` with `key` at the current time and posts it with `Content-Length`.
pub async fn deliver(client: &Client, practice: &str, key: &str, body: &[u8]) -> Reply {
    let signature = sign(key, body, now_ms());
    post_signed(client, practice, Some(&signature), full_body(body.to_vec())).await
}

/// Checks that a delivery got 204 with no body.
pub fn assert_accepted(reply: &Reply, case: &str) {
    let detail = match &reply.body {
        Ok(body) => String::from_utf8_lossy(body).into_owned(),
        Err(error) => error.clone(),
    };
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{case}: {detail}");
    assert!(reply.bytes().is_empty(), "{case}: a 204 has no body");
}

/// Checks a rejected delivery's status and that its body is a JSON error message.
pub fn assert_rejected(reply: &Reply, status: StatusCode, case: &str) {
    assert_eq!(reply.status, status, "{case}: {:?}", reply.body);
    assert!(
        !reply.error_message().is_empty(),
        "{case}: the error message is empty"
    );
}

/// `GET` of an artifact of a call with the practice's bearer token.
pub async fn get_artifact(
    client: &Client,
    token: &str,
    practice: &str,
    call: &str,
    artifact: &str,
) -> Reply {
    client
        .get(&object_url(practice, call, artifact), token, None)
        .await
}

/// Opens a TLS connection offering HTTP/1.1 and sends the head of a webhook `POST` that announces
/// `content_length` body bytes, without sending any of them.
pub async fn raw_webhook_head(
    gateway: &TestGateway,
    practice: &str,
    signature: &str,
    content_length: u64,
) -> TlsStream<TcpStream> {
    let mut tls = gateway.raw_tls(b"http/1.1").await;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\n{SIGNATURE_HEADER}: {signature}\r\n\
         Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n",
        webhook_url(practice)
    );
    tls.write_all(head.as_bytes())
        .await
        .expect("send the request head");
    tls.flush().await.expect("flush the request head");
    tls
}

/// Reads an HTTP/1.1 response head from a raw stream and returns its status line.
pub async fn read_status_line(stream: &mut TlsStream<TcpStream>) -> String {
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
// Retell's SDK as an oracle
// ---------------------------------------------------------------------------------------------

/// Returns the path of the SDK signing script.
pub fn sdk_signer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/retell_sign.py")
}

/// Signs each body with the `retell-sdk` package and returns the header values in order. The SDK
/// takes the current time unless `timestamp_ms` is given.
///
/// # Panics
///
/// If the script fails, for example because the venv lacks `retell-sdk`.
pub fn sdk_sign(key: &str, timestamp_ms: Option<u64>, bodies: &[&[u8]]) -> Vec<String> {
    let dir = tempfile::Builder::new()
        .prefix("callseal-retell-sdk-")
        .tempdir()
        .expect("create a directory for the SDK's input files");
    let mut command = Command::new(super::python());
    command.arg(sdk_signer_script());
    if let Some(timestamp_ms) = timestamp_ms {
        command.arg("--timestamp").arg(timestamp_ms.to_string());
    }
    for (index, body) in bodies.iter().enumerate() {
        let path = dir.path().join(format!("body-{index}.json"));
        fs::write(&path, body).expect("write a body file for the SDK");
        command.arg(path);
    }

    let output = command
        .env(SDK_KEY_VARIABLE, key)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("failed to start the Retell SDK signer: {error}"));
    assert!(
        output.status.success(),
        "the Retell SDK signer failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let stdout = String::from_utf8(output.stdout).expect("the SDK signer prints text");
    let headers: Vec<String> = stdout.lines().map(str::to_owned).collect();
    assert_eq!(headers.len(), bodies.len(), "one header per body: {stdout}");
    headers
}

// ---------------------------------------------------------------------------------------------
// Event bodies
// ---------------------------------------------------------------------------------------------

/// Returns the bytes of `tests/fixtures/retell/{name}`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/retell")
        .join(name);
    fs::read(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

/// Returns a fixture with its call id replaced by `call_id`, byte for byte otherwise.
pub fn fixture_for_call(name: &str, call_id: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture(name)).expect("fixtures are UTF-8");
    let needle = format!("\"call_id\": \"{FIXTURE_CALL_ID}\"");
    assert_eq!(text.matches(&needle).count(), 1, "{name} has one call id");
    text.replace(&needle, &format!("\"call_id\": \"{call_id}\""))
        .into_bytes()
}

/// Builds a compact `call_ended` event of exactly `size` bytes whose transcript is ASCII filler.
pub fn call_ended_of_size(call_id: &str, size: usize) -> Vec<u8> {
    let prefix = format!(
        r#"{{"event":"call_ended","call":{{"call_id":"{call_id}","agent_id":"{FIXTURE_AGENT_ID}","call_status":"ended","transcript":""#
    );
    let suffix = r#""}}"#;
    let filler_len = size
        .checked_sub(prefix.len() + suffix.len())
        .unwrap_or_else(|| panic!("{size} bytes cannot hold the event's fixed fields"));

    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(prefix.as_bytes());
    let mut line = 0u64;
    while body.len() < prefix.len() + filler_len {
        let text = format!("Agent: line {line:08}, how can I help? User: a refill, please. ");
        let room = prefix.len() + filler_len - body.len();
        body.extend_from_slice(&text.as_bytes()[..text.len().min(room)]);
        line += 1;
    }
    body.extend_from_slice(suffix.as_bytes());
    assert_eq!(body.len(), size, "the event has the requested size");
    body
}

/// A SplitMix64 generator: deterministic for a seed, so a failing case can be reproduced.
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Returns a number in `0..bound`.
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Text pieces that random strings are built from: Spanish, Chinese, emoji (one with a skin tone
/// and a zero-width joiner), characters JSON must escape, and U+2028.
const TEXT_PIECES: &[&str] = &[
    "Hola, ",
    "me llamo ",
    "José Pérez ",
    "¿cómo está? ",
    "¡Sí! ",
    "añoranza ",
    "你好",
    "医生",
    "我想预约明天",
    "😀",
    "🩺💊",
    "👩🏽‍⚕️",
    "\"quoted\" ",
    "back\\slash ",
    "tab\t",
    "new\nline ",
    "nul\u{0}byte ",
    "\u{2028}",
    "plain ascii ",
    "12345 ",
];

fn random_text(rng: &mut SeededRng) -> String {
    let pieces = 1 + rng.below(8);
    (0..pieces).map(|_| *rng.pick(TEXT_PIECES)).collect()
}

/// Generates a random JSON value, nested at most `depth` levels.
fn random_value(rng: &mut SeededRng, depth: u32) -> Value {
    let kinds = if depth == 0 { 5 } else { 7 };
    match rng.below(kinds) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 1),
        2 => json!(rng.next_u64() as i64),
        3 => json!((rng.next_u64() % 1_000_000) as f64 / 1000.0),
        4 => Value::String(random_text(rng)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut object = Map::new();
            for _ in 0..rng.below(4) {
                object.insert(random_text(rng), random_value(rng, depth - 1));
            }
            Value::Object(object)
        }
    }
}

/// Generates a random Retell event for `call_id`: a known or unknown event type, a transcript and
/// extra fields of random text and structure. Most bodies are compact, as Retell sends them, and
/// some are pretty-printed.
pub fn random_event(rng: &mut SeededRng, call_id: &str) -> Vec<u8> {
    let kind = *rng.pick(&[
        "call_started",
        "call_ended",
        "call_analyzed",
        "transcript_updated",
    ]);
    let mut call = Map::new();
    call.insert("call_id".into(), json!(call_id));
    call.insert("agent_id".into(), json!(FIXTURE_AGENT_ID));
    call.insert("transcript".into(), json!(random_text(rng)));
    call.insert("metadata".into(), random_value(rng, 3));
    for _ in 0..rng.below(4) {
        call.insert(random_text(rng), random_value(rng, 3));
    }
    let mut event = Map::new();
    event.insert("event".into(), json!(kind));
    event.insert("call".into(), Value::Object(call));
    event.insert(random_text(rng), random_value(rng, 2));

    let value = Value::Object(event);
    if rng.below(4) == 0 {
        serde_json::to_vec_pretty(&value).expect("serialize a JSON value")
    } else {
        serde_json::to_vec(&value).expect("serialize a JSON value")
    }
}

/// Returns the hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------------
// Stored files
// ---------------------------------------------------------------------------------------------

/// Returns the directory of a call in local storage.
pub fn call_dir(files: &GatewayFiles, practice: &str, call: &str) -> PathBuf {
    files.storage_root.join(practice).join("calls").join(call)
}

/// Lists the names of the files in a call's directory, sorted, or none if there is no directory.
pub fn call_files(files: &GatewayFiles, practice: &str, call: &str) -> Vec<String> {
    let dir = call_dir(files, practice, call);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|entry| {
            entry
                .expect("read a call directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Returns the name of the stored version of `base` for a body signed at `timestamp_ms`:
/// `{base}.v{13-digit timestamp}-{first 16 hex digits of the body's SHA-256}.json`.
pub fn version_name(base: &str, timestamp_ms: u64, body: &[u8]) -> String {
    format!(
        "{base}.v{timestamp_ms:013}-{}.json",
        &sha256_hex(body)[..16]
    )
}

/// Lists the stored versions of `base` in a call's directory: the names of the form
/// `{base}.v{13 digits}-{16 lowercase hex digits}.json`, sorted.
pub fn versions(files: &GatewayFiles, practice: &str, call: &str, base: &str) -> Vec<String> {
    call_files(files, practice, call)
        .into_iter()
        .filter(|name| is_version_of(name, base))
        .collect()
}

fn is_version_of(name: &str, base: &str) -> bool {
    let Some(version) = name
        .strip_prefix(base)
        .and_then(|rest| rest.strip_prefix(".v"))
        .and_then(|rest| rest.strip_suffix(".json"))
    else {
        return false;
    };
    let Some((timestamp, digest)) = version.split_once('-') else {
        return false;
    };
    timestamp.len() == 13
        && timestamp.bytes().all(|b| b.is_ascii_digit())
        && digest.len() == 16
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ---------------------------------------------------------------------------------------------
// The gateway as a child process
// ---------------------------------------------------------------------------------------------

/// A `callseal serve` child process whose standard error goes to a log file. It is killed on drop
/// if the test did not stop it.
pub struct ServeProcess {
    child: Child,
    pub data_addr: SocketAddr,
    log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl ServeProcess {
    /// Starts `callseal serve --config {files.config_path}` with `CALLSEAL_LOG={log_filter}` and
    /// waits for its `gateway started` line to learn the data address.
    pub async fn spawn(files: &GatewayFiles, log_filter: &str) -> Self {
        let log_dir = tempfile::Builder::new()
            .prefix("callseal-serve-log-")
            .tempdir()
            .expect("create the log directory");
        let log_path = log_dir.path().join("stderr.log");
        let log_file = fs::File::create(&log_path).expect("create the log file");
        let child = Command::new(env!("CARGO_BIN_EXE_callseal"))
            .arg("serve")
            .arg("--config")
            .arg(&files.config_path)
            .env("CALLSEAL_LOG", log_filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("start callseal serve");
        let mut process = ServeProcess {
            child,
            data_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
            _log_dir: log_dir,
        };

        let line = within_guard("the `gateway started` log line", async {
            loop {
                if let Some(line) = process
                    .log_text()
                    .lines()
                    .find(|line| line.contains("gateway started"))
                {
                    return line.to_owned();
                }
                if let Ok(Some(status)) = process.child.try_wait() {
                    panic!(
                        "callseal serve exited ({status}) before it started; log:\n{}",
                        process.log_text()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        process.data_addr = log_field(&line, "data_addr")
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no data_addr in the start-up line: {line}"));
        process
    }

    /// Returns what the process has logged so far.
    pub fn log_text(&self) -> String {
        let bytes = fs::read(&self.log_path).expect("read the log file");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Sends SIGTERM, waits for the process to exit, and returns its whole log.
    pub async fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let exit = within_guard("callseal serve exiting", async {
            loop {
                if let Some(exit) = self.child.try_wait().expect("poll callseal serve") {
                    return exit;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(exit.success(), "callseal serve exited with {exit}");
        self.log_text()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Returns the value of `name=value` in a log line.
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
}

/// Builds a body of unknown length (chunked over HTTP/1.1, no `Content-Length` over h2) that
/// sends `body` in pieces of 1 to 64 KiB, with sizes drawn from `seed`.
pub fn streamed(body: &[u8], seed: u64) -> RequestBody {
    let mut rng = SeededRng::new(seed);
    let mut pieces = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let size = (1 + rng.below(MAX_PIECE)).min(rest.len());
        let (piece, tail) = rest.split_at(size);
        pieces.push(Ok::<_, BoxError>(Bytes::copy_from_slice(piece)));
        rest = tail;
    }
    stream_body(futures::stream::iter(pieces))
}
