//! Helpers shared by the integration tests: local key files, the ESDK oracle, (in [`gateway`]) a
//! gateway under test with its HTTPS clients, and (in [`retell`]) signed Retell webhook deliveries.
//!
//! The oracle is `tests/oracle/esdk_oracle.py`, which encrypts and decrypts with AWS's Python
//! Encryption SDK (suite 0x0478, framed, Raw AES keys in the `callseal` namespace). It runs under
//! the interpreter of the venv that `scripts/test` creates. Inputs and outputs go through files in
//! a temporary directory, never pipes, so multi-MiB messages cannot deadlock on a full pipe.

#![allow(dead_code)]

pub mod access;
pub mod aws;
pub mod gateway;
pub mod media;
pub mod retell;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

/// Raw AES key namespace of local keys, stored as the EDK provider id.
pub const KEY_NAMESPACE: &str = "callseal";

/// Length in bytes of a local wrapping key file.
pub const WRAPPING_KEY_LEN: usize = 32;

/// Exit status of the oracle when encryption or decryption fails. Status 2 means invalid
/// arguments or key files, which is a bug in the test, not a result.
const ORACLE_EXIT_CRYPTO_FAILURE: i32 = 1;

/// Returns the Python interpreter that has `tests/requirements.txt` installed.
///
/// This is `CALLSEAL_PYTHON` when set (as `scripts/test` does), else `.venv/bin/python` in the
/// repository root.
///
/// # Panics
///
/// If neither exists, because the oracle cannot run without the venv.
pub fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("CALLSEAL_PYTHON") {
        return PathBuf::from(path);
    }
    let venv_python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv_python.exists() {
        return venv_python;
    }
    panic!(
        "no Python for the ESDK oracle: CALLSEAL_PYTHON is not set and {} does not exist; \
         run scripts/test once to create the venv",
        venv_python.display()
    );
}

/// Returns the path of the oracle script.
pub fn oracle_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/esdk_oracle.py")
}

/// Returns the Raw AES key name of a practice's local key version, such as `clinic-1/v1`.
pub fn local_key_name(practice: &str, version: u32) -> String {
    format!("{practice}/v{version}")
}

/// Writes a local wrapping key to `{key_dir}/{practice}/v{version}.key` with mode 0600 and
/// returns the file's path. An existing file is overwritten.
pub fn write_key_file(
    key_dir: &Path,
    practice: &str,
    version: u32,
    key: &[u8; WRAPPING_KEY_LEN],
) -> PathBuf {
    let practice_dir = key_dir.join(practice);
    fs::create_dir_all(&practice_dir).expect("create the practice's key directory");

    let path = practice_dir.join(format!("v{version}.key"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .expect("open the key file for writing");
    // `mode` applies only when the file is created, so an existing file is narrowed here.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .expect("set the key file's mode to 0600");
    file.write_all(key).expect("write the key file");
    path
}

/// Encrypts `plaintext` with the oracle under one local key and returns the message.
///
/// # Panics
///
/// If the oracle fails, which valid arguments and key files never cause.
pub fn esdk_encrypt(
    key_file: &Path,
    key_name: &str,
    frame_length: u32,
    context: &[(&str, &str)],
    plaintext: &[u8],
) -> Vec<u8> {
    esdk_encrypt_with_keys(&[(key_file, key_name)], frame_length, context, plaintext)
}

/// Encrypts `plaintext` with the oracle and returns the message. The message gets one EDK per
/// `(key file, key name)` pair, in that order, and the first key generates the data key.
///
/// # Panics
///
/// If the oracle fails.
pub fn esdk_encrypt_with_keys(
    keys: &[(&Path, &str)],
    frame_length: u32,
    context: &[(&str, &str)],
    plaintext: &[u8],
) -> Vec<u8> {
    let dir = scratch_dir();
    let input = dir.path().join("plaintext");
    let output = dir.path().join("message");
    fs::write(&input, plaintext).expect("write the oracle's input file");

    esdk_encrypt_file(keys, frame_length, context, &input, &output);
    fs::read(&output).expect("read the oracle's output file")
}

/// Encrypts the file `input` into the file `output` with the oracle.
///
/// # Panics
///
/// If the oracle fails.
pub fn esdk_encrypt_file(
    keys: &[(&Path, &str)],
    frame_length: u32,
    context: &[(&str, &str)],
    input: &Path,
    output: &Path,
) {
    let mut command = oracle_command("encrypt", keys);
    command.arg("--frame-length").arg(frame_length.to_string());
    for (key, value) in context {
        // The oracle splits each KEY=VALUE option at the first `=`.
        assert!(
            !key.is_empty() && !key.contains('='),
            "encryption context key {key:?} cannot be passed to the oracle: it must be non-empty and contain no '='"
        );
        command.arg("--context").arg(format!("{key}={value}"));
    }
    command
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output);

    let result = run_oracle(command);
    if !result.status.success() {
        panic!(
            "ESDK oracle encrypt failed ({}): {}",
            result.status,
            String::from_utf8_lossy(&result.stderr).trim()
        );
    }
}

/// Decrypts `ciphertext` with the oracle under one local key.
///
/// Returns the plaintext and the message header as JSON: `version`, `algorithm_suite_id`
/// (integer), `message_id_hex`, `encryption_context` (object), `encrypted_data_keys` (array of
/// `provider_id`, `key_name`, `provider_info_hex`, `ciphertext_length`), `content_type` (integer)
/// and `frame_length`. Returns the oracle's one-line error when decryption fails.
///
/// # Panics
///
/// If the oracle rejects its arguments or key files, or cannot be started.
pub fn esdk_decrypt(
    key_file: &Path,
    key_name: &str,
    ciphertext: &[u8],
) -> Result<(Vec<u8>, serde_json::Value), String> {
    esdk_decrypt_with_keys(&[(key_file, key_name)], ciphertext)
}

/// Decrypts `ciphertext` with the oracle, which may unwrap the data key with any of `keys`.
/// Returns the same as [`esdk_decrypt`].
///
/// # Panics
///
/// If the oracle rejects its arguments or key files, or cannot be started.
pub fn esdk_decrypt_with_keys(
    keys: &[(&Path, &str)],
    ciphertext: &[u8],
) -> Result<(Vec<u8>, serde_json::Value), String> {
    let dir = scratch_dir();
    let input = dir.path().join("message");
    let output = dir.path().join("plaintext");
    fs::write(&input, ciphertext).expect("write the oracle's input file");

    let header = esdk_decrypt_file(keys, &input, &output)?;
    let plaintext = fs::read(&output).expect("read the oracle's output file");
    Ok((plaintext, header))
}

/// Decrypts the file `input` into the file `output` with the oracle and returns the header as
/// JSON (see [`esdk_decrypt`]). On failure `output` does not exist afterwards.
///
/// # Panics
///
/// If the oracle rejects its arguments or key files, or cannot be started.
pub fn esdk_decrypt_file(
    keys: &[(&Path, &str)],
    input: &Path,
    output: &Path,
) -> Result<serde_json::Value, String> {
    let dir = scratch_dir();
    let header_path = dir.path().join("header.json");

    let mut command = oracle_command("decrypt", keys);
    command
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .arg("--header-json")
        .arg(&header_path);

    let result = run_oracle(command);
    let stderr = String::from_utf8_lossy(&result.stderr).trim().to_owned();
    match result.status.code() {
        Some(0) => {}
        Some(ORACLE_EXIT_CRYPTO_FAILURE) => return Err(stderr),
        _ => panic!(
            "ESDK oracle decrypt could not run ({}): {stderr}",
            result.status
        ),
    }

    let header = fs::read(&header_path).expect("read the oracle's header JSON");
    Ok(serde_json::from_slice(&header).expect("parse the oracle's header JSON"))
}

fn scratch_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("callseal-oracle-")
        .tempdir()
        .expect("create a temporary directory for the oracle")
}

fn oracle_command(subcommand: &str, keys: &[(&Path, &str)]) -> Command {
    assert!(!keys.is_empty(), "the ESDK oracle needs at least one key");

    let mut command = Command::new(python());
    command.arg(oracle_script()).arg(subcommand);
    for (key_file, key_name) in keys {
        command
            .arg("--key-file")
            .arg(key_file)
            .arg("--key-name")
            .arg(key_name);
    }
    command
}

fn run_oracle(mut command: Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("failed to start the ESDK oracle ({command:?}): {error}"))
}
