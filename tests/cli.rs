//! End-to-end tests of the `callseal` binary's key and envelope commands.
//!
//! Each test runs the real binary as a subprocess in its own temporary directory, which is also
//! the working directory, with real key files and the WAV fixture as plaintext. Every run's
//! standard output and standard error are recorded with `CALLSEAL_LOG=trace`, and when a test's
//! [`Sandbox`] is dropped they are scanned for every wrapping key in the key directory (raw, hex
//! and base64) and for the [`CANARY`] plaintext.

mod common;

use std::cell::RefCell;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

const WAV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/audio/call-recording.wav"
);

const PRACTICE: &str = "clinic-1";
const OTHER_PRACTICE: &str = "clinic-2";
const CALL: &str = "call_4f2a9c";
const ARTIFACT: &str = "recording.wav";

/// Distinctive plaintext that no command may print, except decrypt writing plaintext to stdout.
const CANARY: &str = "CANARY-dob-1961-04-17-mrn-88412-callseal";

/// Header of every message callseal writes: format version 2, then suite 0x0478.
const MESSAGE_PREFIX: [u8; 3] = [0x02, 0x04, 0x78];

const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL_SAFE: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The recorded result of one `callseal` run.
#[derive(Clone)]
struct Run {
    /// The command line, shown in failure messages.
    command: String,
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    /// Whether stdout carries decrypted plaintext, the one place the canary may appear.
    stdout_is_plaintext: bool,
}

impl Run {
    fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "`{}` failed ({}): {}",
            self.command,
            self.status,
            self.stderr
        );
        self
    }

    fn assert_failure(&self) -> &Self {
        assert!(
            !self.status.success(),
            "`{}` succeeded but was expected to fail",
            self.command
        );
        self
    }

    fn assert_stderr_contains(&self, expected: &str) -> &Self {
        assert!(
            self.stderr.contains(expected),
            "stderr of `{}` does not contain {expected:?}: {}",
            self.command,
            self.stderr
        );
        self
    }

    fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone())
            .unwrap_or_else(|_| panic!("stdout of `{}` is not UTF-8", self.command))
    }
}

/// A temporary directory containing a key directory (`keys`), and the record of every run.
struct Sandbox {
    dir: tempfile::TempDir,
    runs: RefCell<Vec<Run>>,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("callseal-cli-")
                .tempdir()
                .expect("create the sandbox directory"),
            runs: RefCell::new(Vec::new()),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root().join(relative)
    }

    fn key_dir(&self) -> PathBuf {
        self.path("keys")
    }

    fn key_file(&self, practice: &str, version: u32) -> PathBuf {
        self.key_dir()
            .join(practice)
            .join(format!("v{version}.key"))
    }

    /// Creates an empty directory in the sandbox for output files and returns its path.
    fn output_dir(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        fs::create_dir(&path).expect("create an output directory");
        path
    }

    /// Runs `callseal ARGS --key-dir KEYS` with standard input closed.
    fn callseal<S: AsRef<str>>(&self, args: &[S]) -> Run {
        self.run(args, None)
    }

    /// Runs `callseal ARGS --key-dir KEYS` with `stdin` written to its standard input.
    fn callseal_with_stdin<S: AsRef<str>>(&self, args: &[S], stdin: &[u8]) -> Run {
        self.run(args, Some(stdin))
    }

    fn run<S: AsRef<str>>(&self, args: &[S], stdin: Option<&[u8]>) -> Run {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let mut command = Command::new(env!("CARGO_BIN_EXE_callseal"));
        command
            .args(&args)
            .arg("--key-dir")
            .arg(self.key_dir())
            .current_dir(self.root())
            .env_remove("CALLSEAL_KEY_DIR")
            .env("CALLSEAL_LOG", "trace")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start the callseal binary");

        // Standard input is fed from a second thread while this one drains stdout and stderr,
        // so a message larger than a pipe buffer cannot deadlock.
        let pipe = child.stdin.take();
        let output = std::thread::scope(|scope| {
            if let (Some(mut pipe), Some(bytes)) = (pipe, stdin) {
                scope.spawn(move || {
                    // A command that fails early closes its input, so the write fails with a
                    // broken pipe. The exit status reports that failure instead.
                    let _ = pipe.write_all(bytes);
                });
            }
            child.wait_with_output()
        })
        .expect("wait for the callseal binary");

        let run = Run {
            command: format!("callseal {}", args.join(" ")),
            status: output.status,
            stdout: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            stdout_is_plaintext: writes_plaintext_to_stdout(&args),
        };
        self.runs.borrow_mut().push(run.clone());
        run
    }

    fn generate_key(&self, practice: &str) {
        self.callseal(&["keys", "generate", "--practice", practice])
            .assert_success();
    }

    /// Encrypts `input` as `PRACTICE`/`call`/`artifact` into the sandbox file `name`.
    fn encrypt(&self, input: &str, call: &str, artifact: &str, name: &str) -> PathBuf {
        let output = self.path(name);
        self.callseal(&[
            "encrypt",
            "--practice",
            PRACTICE,
            "--call",
            call,
            "--artifact",
            artifact,
            input,
            "-o",
            path_str(&output),
        ])
        .assert_success();
        output
    }

    /// Decrypts `message` into `output`, expecting the object `PRACTICE`/`CALL`/`ARTIFACT`.
    fn decrypt(&self, message: &Path, output: &Path) -> Run {
        self.callseal(&[
            "decrypt",
            "--practice",
            PRACTICE,
            "--call",
            CALL,
            "--artifact",
            ARTIFACT,
            path_str(message),
            "-o",
            path_str(output),
        ])
    }

    fn inspect(&self, args: &[&str]) -> String {
        let mut full_args = vec!["inspect"];
        full_args.extend_from_slice(args);
        self.callseal(&full_args).assert_success().stdout_text()
    }

    /// Lists every secret form that appears in a recorded output, as `STREAM of COMMAND
    /// contains SECRET`.
    fn leaks(&self) -> Vec<String> {
        let secrets = self.secret_forms();
        let mut leaks = Vec::new();
        for run in self.runs.borrow().iter() {
            let streams = [
                ("stdout", run.stdout.as_slice()),
                ("stderr", run.stderr.as_bytes()),
            ];
            for (stream, bytes) in streams {
                for (description, secret) in &secrets {
                    if contains(bytes, secret) {
                        leaks.push(format!(
                            "{stream} of `{}` contains {description}",
                            run.command
                        ));
                    }
                }
                let plaintext_allowed = stream == "stdout" && run.stdout_is_plaintext;
                if !plaintext_allowed && contains(bytes, CANARY.as_bytes()) {
                    leaks.push(format!(
                        "{stream} of `{}` contains the canary plaintext",
                        run.command
                    ));
                }
            }
        }
        leaks
    }

    fn assert_no_secret_in_outputs(&self) {
        let leaks = self.leaks();
        assert!(
            leaks.is_empty(),
            "secret material in command output:\n{}",
            leaks.join("\n")
        );
    }

    /// Lists every wrapping key under the key directory with a description: raw, as hex (both
    /// cases) and as base64 (both alphabets, without padding so a padded form matches too).
    fn secret_forms(&self) -> Vec<(String, Vec<u8>)> {
        let mut forms = Vec::new();
        for key_file in key_files(&self.key_dir()) {
            let key = fs::read(&key_file).expect("read a key file");
            let name = key_file
                .strip_prefix(self.key_dir())
                .unwrap_or(&key_file)
                .display()
                .to_string();
            let encodings = [
                ("raw bytes", key.clone()),
                ("lowercase hex", hex::encode(&key).into_bytes()),
                ("uppercase hex", hex::encode_upper(&key).into_bytes()),
                (
                    "base64",
                    base64_unpadded(&key, BASE64_STANDARD).into_bytes(),
                ),
                (
                    "URL-safe base64",
                    base64_unpadded(&key, BASE64_URL_SAFE).into_bytes(),
                ),
            ];
            for (encoding, bytes) in encodings {
                forms.push((format!("wrapping key {name} as {encoding}"), bytes));
            }
        }
        forms
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // A test that already failed keeps its own message.
        if !std::thread::panicking() {
            self.assert_no_secret_in_outputs();
        }
    }
}

/// Reports whether a `callseal` invocation writes decrypted plaintext to standard output, which
/// is a decrypt without `-o`/`--output` or with `-o -`.
fn writes_plaintext_to_stdout(args: &[&str]) -> bool {
    if args.first() != Some(&"decrypt") {
        return false;
    }
    let output = args
        .windows(2)
        .find(|pair| pair[0] == "-o" || pair[0] == "--output")
        .map(|pair| pair[1]);
    matches!(output, None | Some("-"))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("sandbox paths are UTF-8")
}

fn wav() -> Vec<u8> {
    fs::read(WAV).expect("read the WAV fixture")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .expect("stat a file")
        .permissions()
        .mode()
        & 0o777
}

/// Encodes `bytes` as base64 without `=` padding.
fn base64_unpadded(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let mut group = [0u8; 3];
        group[..chunk.len()].copy_from_slice(chunk);
        let bits = u32::from_be_bytes([0, group[0], group[1], group[2]]);
        // One to three input bytes give two to four characters.
        for index in 0..=chunk.len() {
            let sextet = (bits >> (18 - 6 * index)) & 0x3f;
            text.push(char::from(alphabet[sextet as usize]));
        }
    }
    text
}

/// Lists `*.key` files one level below `key_dir` (one directory per practice).
fn key_files(key_dir: &Path) -> Vec<PathBuf> {
    let Ok(practices) = fs::read_dir(key_dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for practice in practices {
        let practice = practice.expect("read the key directory").path();
        let Ok(entries) = fs::read_dir(&practice) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read a practice's key directory").path();
            if path.extension().is_some_and(|extension| extension == "key") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Lists every regular file under `directory`, recursively.
fn files_under(directory: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).expect("read a sandbox directory") {
            let path = entry.expect("read a sandbox entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Names the `.callseal-*.partial` temporary files left in `directory`.
fn partial_files(directory: &Path) -> Vec<String> {
    fs::read_dir(directory)
        .expect("read an output directory")
        .map(|entry| entry.expect("read an output entry").file_name())
        .filter_map(|name| name.into_string().ok())
        .filter(|name| name.starts_with(".callseal-") && name.ends_with(".partial"))
        .collect()
}

/// Returns the rest of the line of `text` that starts with `label`, trimmed.
fn text_field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.strip_prefix(label))
        .unwrap_or_else(|| panic!("no line starting with {label:?} in:\n{text}"))
        .trim()
}

/// Returns `message` with bit 0 of its middle byte flipped. That byte lies in a regular frame's
/// ciphertext, far from the header and the final frame.
fn flip_middle_byte(message: &[u8]) -> Vec<u8> {
    let mut tampered = message.to_vec();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    tampered
}

#[test]
fn keys_generate_creates_0600_key() {
    let sandbox = Sandbox::new();

    let run = sandbox.callseal(&["keys", "generate", "--practice", PRACTICE]);

    run.assert_success();
    let key_file = sandbox.key_file(PRACTICE, 1);
    assert!(key_file.is_file(), "{} was not created", key_file.display());
    assert_eq!(
        fs::metadata(&key_file).unwrap().len(),
        32,
        "key file is not 32 bytes"
    );
    assert_eq!(mode(&key_file), 0o600, "key file mode is not 0600");
    assert_eq!(
        mode(&sandbox.key_dir().join(PRACTICE)),
        0o700,
        "practice key directory mode is not 0700"
    );
    assert!(
        run.stdout_text().contains("clinic-1/v1"),
        "stdout does not name the new key: {}",
        run.stdout_text()
    );
    assert_eq!(
        key_files(&sandbox.key_dir()),
        vec![key_file],
        "generate left files other than v1.key"
    );
}

#[test]
fn keys_generate_rejects_overwrite() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let key_file = sandbox.key_file(PRACTICE, 1);
    let before = fs::read(&key_file).unwrap();

    let run = sandbox.callseal(&["keys", "generate", "--practice", PRACTICE]);

    run.assert_failure()
        .assert_stderr_contains("refusing to overwrite");
    assert_eq!(
        fs::read(&key_file).unwrap(),
        before,
        "second generate changed the key file"
    );
    let practice_dir = sandbox.key_dir().join(PRACTICE);
    let entries: Vec<_> = fs::read_dir(&practice_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        entries,
        vec!["v1.key"],
        "second generate left a new file in the practice directory"
    );
}

#[test]
fn keys_generate_rejects_invalid_practice() {
    for practice in ["../x", "a/b", "", "..", "."] {
        let sandbox = Sandbox::new();

        let run = sandbox.callseal(&["keys", "generate", "--practice", practice]);

        run.assert_failure()
            .assert_stderr_contains("invalid practice id");
        // The key directory is `SANDBOX/keys`, so `../x` would escape it into `SANDBOX/x`.
        let created = files_under(sandbox.root());
        assert!(
            created.is_empty(),
            "practice id {practice:?} created files: {created:?}"
        );
        let outside_key_dir: Vec<_> = fs::read_dir(sandbox.root())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name != "keys")
            .collect();
        assert!(
            outside_key_dir.is_empty(),
            "practice id {practice:?} created entries outside the key directory: {outside_key_dir:?}"
        );
    }
}

#[test]
fn wav_round_trip_through_files() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let wav = wav();

    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");
    let ciphertext = fs::read(&message).unwrap();
    assert!(
        ciphertext.starts_with(&MESSAGE_PREFIX),
        "message does not start with version 2 and suite 0x0478"
    );
    assert_eq!(mode(&message), 0o600, "encrypted file mode is not 0600");

    let text = sandbox.inspect(&[path_str(&message)]);
    assert!(
        text_field(&text, "suite:").starts_with("0x0478"),
        "inspect suite line: {text}"
    );
    assert_eq!(
        text_field(&text, "frame length:"),
        "65536 bytes",
        "inspect frame length"
    );
    for (key, value) in [
        ("practice", PRACTICE),
        ("call", CALL),
        ("artifact", ARTIFACT),
    ] {
        assert!(
            text.contains(&format!("\n  {key} = {value}\n")),
            "inspect does not list context pair {key} = {value}:\n{text}"
        );
    }
    assert_eq!(
        text_field(&text, "encrypted data keys:"),
        "1",
        "inspect EDK count"
    );
    assert!(
        text.contains("\n  provider callseal, key clinic-1/v1\n"),
        "inspect does not name provider callseal and key clinic-1/v1:\n{text}"
    );
    assert_eq!(
        text_field(&text, "plaintext length:"),
        format!("{} bytes (header and final frame authenticated)", wav.len()),
        "inspect plaintext length"
    );

    let output_dir = sandbox.output_dir("out");
    let decrypted = output_dir.join("recording.wav");
    sandbox.decrypt(&message, &decrypted).assert_success();
    assert!(
        fs::read(&decrypted).unwrap() == wav,
        "decrypted file differs from the WAV fixture"
    );
    assert_eq!(mode(&decrypted), 0o600, "decrypted file mode is not 0600");
    assert!(
        partial_files(&output_dir).is_empty(),
        "decrypt left a temporary file"
    );
}

#[test]
fn inspect_json_and_full() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let wav_len = wav().len() as u64;
    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");

    let json_text = sandbox.inspect(&["--json", path_str(&message)]);
    let json: serde_json::Value =
        serde_json::from_str(&json_text).expect("inspect --json prints valid JSON");
    assert_eq!(json["suite"], 0x0478, "JSON suite");
    assert_eq!(json["frame_length"], 65536, "JSON frame length");
    assert_eq!(json["plaintext_length"], wav_len, "JSON plaintext length");
    assert_eq!(
        json["encryption_context"],
        serde_json::json!({ "practice": PRACTICE, "call": CALL, "artifact": ARTIFACT }),
        "JSON encryption context"
    );
    assert_eq!(
        json["encrypted_data_keys"],
        serde_json::json!([{ "provider": "callseal", "key": "clinic-1/v1" }]),
        "JSON encrypted data keys"
    );
    assert!(
        json["header_length"]
            .as_u64()
            .is_some_and(|length| length > 0),
        "JSON header length missing: {json}"
    );

    let full = sandbox.inspect(&["--full", path_str(&message)]);
    assert_eq!(
        text_field(&full, "plaintext length:"),
        format!("{wav_len} bytes (every frame authenticated)"),
        "inspect --full plaintext length"
    );
    assert!(
        full.contains("\n  provider callseal, key clinic-1/v1\n"),
        "inspect --full does not name the key:\n{full}"
    );

    let full_json_text = sandbox.inspect(&["--full", "--json", path_str(&message)]);
    let full_json: serde_json::Value =
        serde_json::from_str(&full_json_text).expect("inspect --full --json prints valid JSON");
    assert_eq!(
        full_json["plaintext_length"], wav_len,
        "inspect --full --json plaintext length"
    );
}

#[test]
fn stdin_stdout_streaming_round_trip() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let wav = wav();

    let encrypted = sandbox.callseal_with_stdin(
        &[
            "encrypt",
            "--practice",
            PRACTICE,
            "--call",
            CALL,
            "--artifact",
            ARTIFACT,
        ],
        &wav,
    );
    encrypted.assert_success();
    let ciphertext = encrypted.stdout.clone();
    assert!(
        ciphertext.starts_with(&MESSAGE_PREFIX),
        "stdout of encrypt is not a version 2, suite 0x0478 message"
    );
    assert!(
        ciphertext.len() > wav.len(),
        "ciphertext of {} bytes is shorter than the plaintext",
        ciphertext.len()
    );

    let decrypted = sandbox.callseal_with_stdin(
        &[
            "decrypt",
            "--practice",
            PRACTICE,
            "--call",
            CALL,
            "--artifact",
            ARTIFACT,
            "-",
            "-o",
            "-",
        ],
        &ciphertext,
    );
    decrypted.assert_success();
    assert!(
        decrypted.stdout == wav,
        "decrypt from stdin to stdout did not return the WAV fixture ({} bytes)",
        decrypted.stdout.len()
    );

    let inspected = sandbox.callseal_with_stdin(&["inspect"], &ciphertext);
    inspected.assert_success();
    let text = inspected.stdout_text();
    assert_eq!(
        text_field(&text, "plaintext length:"),
        format!("{} bytes (every frame authenticated)", wav.len()),
        "inspect from stdin plaintext length"
    );

    // The streamed message is an ordinary message: decrypting it from a file works too.
    let message = sandbox.path("streamed.enc");
    fs::write(&message, &ciphertext).unwrap();
    let output = sandbox.path("streamed.wav");
    sandbox.decrypt(&message, &output).assert_success();
    assert!(
        fs::read(&output).unwrap() == wav,
        "file decrypt of the streamed message differs from the WAV fixture"
    );
}

#[test]
fn inspect_stdin_authenticates_every_frame() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");
    let tampered = flip_middle_byte(&fs::read(&message).unwrap());
    let tampered_path = sandbox.path("tampered.enc");
    fs::write(&tampered_path, &tampered).unwrap();

    // By path, inspect reads only the header and the final frame, so a flipped byte in a
    // middle frame passes. This shows that only a check of every frame can detect the flip.
    let quick = sandbox.inspect(&[path_str(&tampered_path)]);
    assert!(
        quick.contains("(header and final frame authenticated)"),
        "inspect by path did not report its partial check:\n{quick}"
    );

    let from_stdin = sandbox.callseal_with_stdin(&["inspect", "-"], &tampered);
    from_stdin
        .assert_failure()
        .assert_stderr_contains("authentication failed");
    assert!(
        from_stdin.stdout.is_empty(),
        "inspect from stdin printed a description of a tampered message"
    );

    let full = sandbox.callseal(&["inspect", "--full", path_str(&tampered_path)]);
    full.assert_failure()
        .assert_stderr_contains("authentication failed");
}

#[test]
fn esdk_decrypts_cli_output() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");
    let ciphertext = fs::read(&message).unwrap();

    let (plaintext, header) = common::esdk_decrypt(
        &sandbox.key_file(PRACTICE, 1),
        &common::local_key_name(PRACTICE, 1),
        &ciphertext,
    )
    .unwrap_or_else(|error| panic!("AWS's ESDK failed to decrypt the CLI's message: {error}"));

    assert!(
        plaintext == wav(),
        "AWS's ESDK decrypted {} bytes that differ from the WAV fixture",
        plaintext.len()
    );
    assert_eq!(header["algorithm_suite_id"], 0x0478, "ESDK suite");
    assert_eq!(header["frame_length"], 65536, "ESDK frame length");
    assert_eq!(
        header["encryption_context"],
        serde_json::json!({ "practice": PRACTICE, "call": CALL, "artifact": ARTIFACT }),
        "ESDK encryption context"
    );
    assert_eq!(
        header["encrypted_data_keys"][0]["provider_id"],
        common::KEY_NAMESPACE,
        "ESDK provider id"
    );
    assert_eq!(
        header["encrypted_data_keys"][0]["key_name"], "clinic-1/v1",
        "ESDK key name"
    );
}

#[test]
fn decrypt_rejects_other_object() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    sandbox.generate_key(OTHER_PRACTICE);
    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");
    let output_dir = sandbox.output_dir("out");
    let output = output_dir.join("recording.wav");

    let cases = [
        ("call", [PRACTICE, "call_other", ARTIFACT]),
        ("artifact", [PRACTICE, CALL, "transcript.json"]),
        ("practice", [OTHER_PRACTICE, CALL, ARTIFACT]),
    ];
    for (mismatching_key, [practice, call, artifact]) in cases {
        let run = sandbox.callseal(&[
            "decrypt",
            "--practice",
            practice,
            "--call",
            call,
            "--artifact",
            artifact,
            path_str(&message),
            "-o",
            path_str(&output),
        ]);

        run.assert_failure().assert_stderr_contains(&format!(
            "encryption context key `{mismatching_key}` does not match"
        ));
        assert!(
            !output.exists(),
            "decrypt expecting another {mismatching_key} created the output file"
        );
        assert!(
            partial_files(&output_dir).is_empty(),
            "decrypt expecting another {mismatching_key} left a temporary file"
        );
        assert!(
            run.stdout.is_empty(),
            "decrypt expecting another {mismatching_key} printed to stdout"
        );
    }

    // The same expectations stated as --context pairs are rejected the same way.
    let run = sandbox.callseal(&[
        "decrypt",
        "--context",
        "practice=clinic-1",
        "--context",
        "call=call_other",
        "--context",
        "artifact=recording.wav",
        path_str(&message),
        "-o",
        path_str(&output),
    ]);
    run.assert_failure()
        .assert_stderr_contains("encryption context key `call` does not match");
    assert!(
        !output.exists(),
        "decrypt with another --context call created the output file"
    );
}

#[test]
fn decrypt_rejects_tampered_message() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");
    let ciphertext = fs::read(&message).unwrap();
    let output_dir = sandbox.output_dir("out");
    let output = output_dir.join("recording.wav");

    let wav_len = wav().len();
    let mut appended = ciphertext.clone();
    appended.push(0);
    let cases = [
        (
            "flipped middle byte",
            flip_middle_byte(&ciphertext),
            "authentication failed",
        ),
        (
            "last byte removed",
            ciphertext[..ciphertext.len() - 1].to_vec(),
            "truncated",
        ),
        (
            "byte appended",
            appended,
            "unexpected bytes after the final frame",
        ),
    ];
    for (case, tampered, expected_error) in cases {
        let tampered_path = sandbox.path("tampered.enc");
        fs::write(&tampered_path, &tampered).unwrap();

        let run = sandbox.decrypt(&tampered_path, &output);

        run.assert_failure()
            .assert_stderr_contains(expected_error)
            .assert_stderr_contains("decryption failed");
        assert!(!output.exists(), "{case}: decrypt created the output file");
        assert!(
            partial_files(&output_dir).is_empty(),
            "{case}: decrypt left a temporary file"
        );

        // Decrypt to stdout may already have written verified frames, so the exit status is
        // the consumer's only signal.
        let to_stdout = sandbox.callseal(&[
            "decrypt",
            "--practice",
            PRACTICE,
            "--call",
            CALL,
            "--artifact",
            ARTIFACT,
            path_str(&tampered_path),
        ]);
        to_stdout
            .assert_failure()
            .assert_stderr_contains(expected_error);
        assert!(
            to_stdout.stdout.len() < wav_len,
            "{case}: decrypt to stdout released the whole plaintext"
        );
    }
}

#[test]
fn decrypt_without_expectation_is_usage_error() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");
    let output = sandbox.path("recording.wav");

    let run = sandbox.callseal(&["decrypt", path_str(&message), "-o", path_str(&output)]);

    run.assert_failure();
    assert_eq!(
        run.status.code(),
        Some(2),
        "missing expectation is not a usage error (exit status 2)"
    );
    run.assert_stderr_contains("--any-context")
        .assert_stderr_contains("Usage:");
    assert!(
        !output.exists(),
        "decrypt without an expectation created the output file"
    );
}

#[test]
fn existing_output_requires_force() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let wav = wav();
    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");
    let existing = b"an existing file that must survive".as_slice();

    let decrypted = sandbox.path("recording.wav");
    fs::write(&decrypted, existing).unwrap();
    let rejected = sandbox.decrypt(&message, &decrypted);
    rejected
        .assert_failure()
        .assert_stderr_contains("already exists")
        .assert_stderr_contains("--force");
    assert_eq!(
        fs::read(&decrypted).unwrap(),
        existing,
        "decrypt without --force changed the existing file"
    );

    let decrypt_args = [
        "decrypt",
        "--practice",
        PRACTICE,
        "--call",
        CALL,
        "--artifact",
        ARTIFACT,
        path_str(&message),
        "-o",
        path_str(&decrypted),
        "--force",
    ];
    sandbox.callseal(&decrypt_args).assert_success();
    assert!(
        fs::read(&decrypted).unwrap() == wav,
        "decrypt --force did not replace the file with the plaintext"
    );
    assert_eq!(
        mode(&decrypted),
        0o600,
        "file replaced by decrypt --force is not mode 0600"
    );

    let encrypted = sandbox.path("again.enc");
    fs::write(&encrypted, existing).unwrap();
    let encrypt_args = [
        "encrypt",
        "--practice",
        PRACTICE,
        "--call",
        CALL,
        "--artifact",
        ARTIFACT,
        WAV,
        "-o",
        path_str(&encrypted),
    ];
    sandbox
        .callseal(&encrypt_args)
        .assert_failure()
        .assert_stderr_contains("already exists");
    assert_eq!(
        fs::read(&encrypted).unwrap(),
        existing,
        "encrypt without --force changed the existing file"
    );

    let mut forced_args = encrypt_args.to_vec();
    forced_args.push("--force");
    sandbox.callseal(&forced_args).assert_success();
    assert!(
        fs::read(&encrypted).unwrap().starts_with(&MESSAGE_PREFIX),
        "encrypt --force did not replace the file with a message"
    );
    assert!(
        partial_files(sandbox.root()).is_empty(),
        "a temporary file was left in the sandbox"
    );
}

#[test]
fn rotate_keeps_old_objects_readable() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let wav = wav();
    let v1_before = fs::read(sandbox.key_file(PRACTICE, 1)).unwrap();
    let before = sandbox.encrypt(WAV, CALL, ARTIFACT, "before.enc");

    let rotated = sandbox.callseal(&["keys", "rotate", "--practice", PRACTICE]);
    rotated.assert_success();
    assert!(
        rotated.stdout_text().contains("clinic-1/v2"),
        "rotate does not name the new key: {}",
        rotated.stdout_text()
    );
    let v2 = sandbox.key_file(PRACTICE, 2);
    assert_eq!(mode(&v2), 0o600, "rotated key file mode is not 0600");
    assert_eq!(
        fs::metadata(&v2).unwrap().len(),
        32,
        "rotated key file is not 32 bytes"
    );
    assert_eq!(
        fs::read(sandbox.key_file(PRACTICE, 1)).unwrap(),
        v1_before,
        "rotate changed v1.key"
    );
    assert_ne!(
        fs::read(&v2).unwrap(),
        v1_before,
        "rotate wrote the same key bytes as v1"
    );

    let after = sandbox.encrypt(WAV, CALL, ARTIFACT, "after.enc");
    let after_text = sandbox.inspect(&[path_str(&after)]);
    assert!(
        after_text.contains("\n  provider callseal, key clinic-1/v2\n"),
        "object encrypted after rotation does not name clinic-1/v2:\n{after_text}"
    );
    let before_text = sandbox.inspect(&[path_str(&before)]);
    assert!(
        before_text.contains("\n  provider callseal, key clinic-1/v1\n"),
        "object encrypted before rotation does not name clinic-1/v1:\n{before_text}"
    );

    let before_output = sandbox.path("before.wav");
    sandbox.decrypt(&before, &before_output).assert_success();
    assert!(
        fs::read(&before_output).unwrap() == wav,
        "object encrypted before rotation decrypts to other bytes"
    );
    let after_output = sandbox.path("after.wav");
    sandbox.decrypt(&after, &after_output).assert_success();
    assert!(
        fs::read(&after_output).unwrap() == wav,
        "object encrypted after rotation decrypts to other bytes"
    );

    let listed = sandbox.callseal(&["keys", "list", "--practice", PRACTICE]);
    listed.assert_success();
    assert_eq!(
        listed.stdout_text(),
        "clinic-1/v1\nclinic-1/v2 (current)\n",
        "keys list output"
    );
}

#[test]
fn outputs_contain_no_secrets() {
    let sandbox = Sandbox::new();
    let output_dir = sandbox.output_dir("out");
    let plaintext = format!("{CANARY}\n").repeat(64);
    let plaintext_path = sandbox.path("canary.txt");
    fs::write(&plaintext_path, &plaintext).unwrap();
    // `PRACTICE`/`CALL`/`ARTIFACT` arguments of `command`, followed by `rest`.
    let with_object = |command: &str, rest: &[&str]| -> Vec<String> {
        let object = [
            "--practice",
            PRACTICE,
            "--call",
            CALL,
            "--artifact",
            ARTIFACT,
        ];
        [command]
            .iter()
            .chain(&object)
            .chain(rest)
            .map(|arg| arg.to_string())
            .collect()
    };

    // Keys: generate, then a rejected second generate.
    sandbox.generate_key(PRACTICE);
    sandbox
        .callseal(&["keys", "generate", "--practice", PRACTICE])
        .assert_failure();

    // Encrypt with small frames, so the canary spans many of them.
    let message = sandbox.path("canary.enc");
    sandbox
        .callseal(&with_object(
            "encrypt",
            &[
                "--frame-length",
                "100",
                path_str(&plaintext_path),
                "-o",
                path_str(&message),
            ],
        ))
        .assert_success();
    let streamed = sandbox.callseal_with_stdin(&with_object("encrypt", &[]), plaintext.as_bytes());
    streamed.assert_success();
    let ciphertext = fs::read(&message).unwrap();

    // Inspect in every form.
    for args in [
        vec!["inspect", path_str(&message)],
        vec!["inspect", "--full", path_str(&message)],
        vec!["inspect", "--json", path_str(&message)],
        vec!["inspect", "--full", "--json", path_str(&message)],
    ] {
        sandbox.callseal(&args).assert_success();
    }
    sandbox
        .callseal_with_stdin(&["inspect"], &ciphertext)
        .assert_success();

    // Decrypt to a file, to stdout, and with each kind of expectation.
    let decrypted = output_dir.join("canary.txt");
    sandbox.decrypt(&message, &decrypted).assert_success();
    let to_stdout = sandbox.callseal(&with_object("decrypt", &[path_str(&message)]));
    to_stdout.assert_success();
    assert!(
        contains(&to_stdout.stdout, CANARY.as_bytes()),
        "decrypt to stdout did not print the canary, so the scan below could not see a leak"
    );
    sandbox
        .callseal_with_stdin(&with_object("decrypt", &["-"]), &streamed.stdout)
        .assert_success();
    sandbox
        .callseal(&[
            "decrypt",
            "--any-context",
            path_str(&message),
            "-o",
            path_str(&output_dir.join("any-context.txt")),
        ])
        .assert_success();
    sandbox
        .callseal(&[
            "decrypt",
            "--context",
            "practice=clinic-1",
            "--context",
            "call=call_4f2a9c",
            "--context",
            "artifact=recording.wav",
            path_str(&message),
            "-o",
            path_str(&output_dir.join("context-pairs.txt")),
        ])
        .assert_success();

    // Failures: an existing output, another call, tampering and truncation.
    sandbox.decrypt(&message, &decrypted).assert_failure();
    sandbox
        .callseal(&[
            "decrypt",
            "--practice",
            PRACTICE,
            "--call",
            "call_other",
            "--artifact",
            ARTIFACT,
            path_str(&message),
            "-o",
            path_str(&output_dir.join("other-call.txt")),
        ])
        .assert_failure();
    let tampered = sandbox.path("tampered.enc");
    fs::write(&tampered, flip_middle_byte(&ciphertext)).unwrap();
    sandbox
        .decrypt(&tampered, &output_dir.join("tampered.txt"))
        .assert_failure();
    sandbox
        .callseal(&with_object("decrypt", &[path_str(&tampered)]))
        .assert_failure();
    sandbox
        .callseal(&["inspect", "--full", path_str(&tampered)])
        .assert_failure();
    let truncated = sandbox.path("truncated.enc");
    fs::write(&truncated, &ciphertext[..ciphertext.len() - 1]).unwrap();
    sandbox
        .decrypt(&truncated, &output_dir.join("truncated.txt"))
        .assert_failure();
    sandbox
        .callseal(&["inspect", path_str(&truncated)])
        .assert_failure();

    // Rotation, then the same commands under two key versions.
    sandbox
        .callseal(&["keys", "rotate", "--practice", PRACTICE])
        .assert_success();
    sandbox
        .callseal(&["keys", "list", "--practice", PRACTICE])
        .assert_success();
    let after_rotation = sandbox.path("after-rotation.enc");
    sandbox
        .callseal(&with_object(
            "encrypt",
            &[path_str(&plaintext_path), "-o", path_str(&after_rotation)],
        ))
        .assert_success();
    sandbox
        .callseal(&["inspect", "--json", path_str(&after_rotation)])
        .assert_success();
    sandbox
        .decrypt(&after_rotation, &output_dir.join("after-rotation.txt"))
        .assert_success();

    // A key file with loose permissions is rejected, and the message must not quote its bytes.
    let key_file = sandbox.key_file(PRACTICE, 2);
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
    sandbox
        .decrypt(&after_rotation, &output_dir.join("loose-key.txt"))
        .assert_failure();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();

    assert!(
        sandbox.runs.borrow().len() >= 25,
        "the scan covers only {} runs",
        sandbox.runs.borrow().len()
    );
    sandbox.assert_no_secret_in_outputs();
}

#[test]
fn secret_scan_detects_leaks() {
    assert_eq!(
        base64_unpadded(b"foob", BASE64_STANDARD),
        "Zm9vYg",
        "base64 of a known value"
    );
    assert_eq!(
        base64_unpadded(&[0xfb, 0xff], BASE64_URL_SAFE),
        "-_8",
        "URL-safe base64 of a known value"
    );

    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let key = fs::read(sandbox.key_file(PRACTICE, 1)).unwrap();
    let forms = [
        ("raw bytes", key.clone()),
        ("lowercase hex", hex::encode(&key).into_bytes()),
        ("uppercase hex", hex::encode_upper(&key).into_bytes()),
        (
            "base64",
            format!("{}=", base64_unpadded(&key, BASE64_STANDARD)).into_bytes(),
        ),
        (
            "URL-safe base64",
            base64_unpadded(&key, BASE64_URL_SAFE).into_bytes(),
        ),
        ("canary plaintext", CANARY.as_bytes().to_vec()),
    ];
    for (form, bytes) in forms {
        let mut stderr = b"callseal: some message ".to_vec();
        stderr.extend_from_slice(&bytes);
        let fake = Run {
            command: format!("fake run leaking {form}"),
            status: ExitStatus::from_raw(0),
            stdout: Vec::new(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            stdout_is_plaintext: false,
        };
        let raw_fake = Run {
            stdout: stderr.clone(),
            stderr: String::new(),
            ..fake.clone()
        };
        // Raw key bytes are rarely UTF-8, so they are planted in stdout, which is kept as bytes.
        let planted = if form == "raw bytes" { raw_fake } else { fake };
        sandbox.runs.borrow_mut().push(planted);

        let leaks = sandbox.leaks();
        assert!(
            leaks.iter().any(|leak| leak.contains(form)),
            "the scan missed a planted {form}: {leaks:?}"
        );
        sandbox.runs.borrow_mut().pop();
    }

    let plaintext_stdout = Run {
        command: "fake decrypt to stdout".to_owned(),
        status: ExitStatus::from_raw(0),
        stdout: CANARY.as_bytes().to_vec(),
        stderr: String::new(),
        stdout_is_plaintext: true,
    };
    sandbox.runs.borrow_mut().push(plaintext_stdout);
    assert!(
        sandbox.leaks().is_empty(),
        "the scan flagged the canary in decrypt's own plaintext output"
    );
    sandbox.runs.borrow_mut().clear();
}

#[test]
fn loose_key_file_mode_rejected() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let message = sandbox.encrypt(WAV, CALL, ARTIFACT, "recording.wav.enc");
    let key_file = sandbox.key_file(PRACTICE, 1);
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
    let output_dir = sandbox.output_dir("out");

    let encrypted = output_dir.join("again.enc");
    let encrypt = sandbox.callseal(&[
        "encrypt",
        "--practice",
        PRACTICE,
        "--call",
        CALL,
        "--artifact",
        ARTIFACT,
        WAV,
        "-o",
        path_str(&encrypted),
    ]);
    encrypt
        .assert_failure()
        .assert_stderr_contains("chmod 600")
        .assert_stderr_contains(path_str(&key_file));
    assert!(
        !encrypted.exists(),
        "encrypt with a loose key file created the output file"
    );

    let decrypted = output_dir.join("recording.wav");
    sandbox
        .decrypt(&message, &decrypted)
        .assert_failure()
        .assert_stderr_contains("chmod 600");
    assert!(
        !decrypted.exists(),
        "decrypt with a loose key file created the output file"
    );

    sandbox
        .callseal(&["inspect", path_str(&message)])
        .assert_failure()
        .assert_stderr_contains("chmod 600");
    assert!(
        partial_files(&output_dir).is_empty(),
        "a temporary file was left in the output directory"
    );
    assert_eq!(
        mode(&key_file),
        0o644,
        "callseal changed the key file's mode itself"
    );
}

#[test]
fn frame_length_limits() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let wav = wav();
    let encrypt_args = |frame_length: &str, output: &Path| -> Vec<String> {
        [
            "encrypt",
            "--practice",
            PRACTICE,
            "--call",
            CALL,
            "--artifact",
            ARTIFACT,
            "--frame-length",
            frame_length,
            WAV,
            "-o",
            path_str(output),
        ]
        .map(str::to_owned)
        .to_vec()
    };

    for frame_length in ["0", "1048577"] {
        let output = sandbox.path(&format!("frame-{frame_length}.enc"));
        let run = sandbox.callseal(&encrypt_args(frame_length, &output));

        assert_eq!(
            run.status.code(),
            Some(2),
            "--frame-length {frame_length} is a usage error"
        );
        run.assert_stderr_contains(&format!(
            "invalid value '{frame_length}' for '--frame-length"
        ));
        assert!(
            !output.exists(),
            "--frame-length {frame_length} created the output file"
        );
    }

    let output = sandbox.path("frame-max.enc");
    sandbox
        .callseal(&encrypt_args("1048576", &output))
        .assert_success();
    let text = sandbox.inspect(&[path_str(&output)]);
    assert_eq!(
        text_field(&text, "frame length:"),
        "1048576 bytes",
        "inspect frame length at the maximum"
    );
    let decrypted = sandbox.path("frame-max.wav");
    sandbox.decrypt(&output, &decrypted).assert_success();
    assert!(
        fs::read(&decrypted).unwrap() == wav,
        "round trip with 1048576-byte frames differs from the WAV fixture"
    );
    assert!(
        partial_files(sandbox.root()).is_empty(),
        "a temporary file was left in the sandbox"
    );
}

#[test]
fn encrypt_read_failure_leaves_no_output() {
    let sandbox = Sandbox::new();
    sandbox.generate_key(PRACTICE);
    let output_dir = sandbox.output_dir("out");
    let output = output_dir.join("directory.enc");
    // Opening a directory succeeds on Linux but reading it fails, after the output was started.
    let unreadable = sandbox.output_dir("not-a-file");

    let run = sandbox.callseal(&[
        "encrypt",
        "--practice",
        PRACTICE,
        "--call",
        CALL,
        "--artifact",
        ARTIFACT,
        path_str(&unreadable),
        "-o",
        path_str(&output),
    ]);

    run.assert_failure()
        .assert_stderr_contains("encryption failed");
    assert!(!output.exists(), "failed encrypt created the output file");
    assert!(
        partial_files(&output_dir).is_empty(),
        "failed encrypt left a temporary file"
    );
}
