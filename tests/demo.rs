//! `callseal demo` end to end: the kept directory serves the same objects again, and AWS's own
//! Encryption SDK decrypts what the demo stored.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

use rustls::pki_types::pem::PemObject;

const BINARY: &str = env!("CARGO_BIN_EXE_callseal");
const OBJECT: &str = "data/demo-clinic/calls/call_demo_0001/recording.wav";

/// Stops the gateway process when the test ends, whatever the outcome.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_keep_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("demo");
    let output = Command::new(BINARY)
        .args(["demo", "--keep"])
        .arg(&kept)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("summary:"), "{stdout}");
    assert!(stdout.contains("suite 0x0478"), "{stdout}");

    for file in [
        "callseal.toml",
        "token",
        "keys/demo-clinic/v1.key",
        "certs/ca.pem",
        OBJECT,
    ] {
        assert!(
            kept.join(file).is_file(),
            "{file} missing from the kept directory"
        );
    }
    for secret in ["token", "keys/demo-clinic/v1.key", "certs/server-key.pem"] {
        let mode = fs::metadata(kept.join(secret))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{secret} has mode {mode:o}");
    }
    let token = fs::read_to_string(kept.join("token"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        !stdout.contains(&token),
        "the demo printed its bearer token"
    );

    // AWS's SDK decrypts the stored object into a WAV file.
    let key = kept.join("keys/demo-clinic/v1.key");
    let plaintext_path = dir.path().join("recording.wav");
    let header = common::esdk_decrypt_file(
        &[(&key, "demo-clinic/v1")],
        &kept.join(OBJECT),
        &plaintext_path,
    )
    .expect("the ESDK oracle rejected the demo's stored object");
    assert_eq!(header["encryption_context"]["call"], "call_demo_0001");
    let recording = fs::read(&plaintext_path).unwrap();
    assert_eq!(&recording[..4], b"RIFF");
    assert_eq!(&recording[8..12], b"WAVE");

    // The kept configuration serves the same object again.
    let mut child = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(kept.join("callseal.toml"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _gateway = Gateway(child);
    let started = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("gateway started"));
    assert!(started, "the gateway did not start");
    let config = callseal::config::Config::load(&kept.join("callseal.toml")).unwrap();
    let port = config.listen.data.port();

    let url = format!(
        "https://localhost:{port}/v1/practices/demo-clinic/calls/call_demo_0001/recording.wav"
    );
    let served = get_trusting(&kept.join("certs/ca.pem"), &url, &token);
    assert!(
        served == recording,
        "the served recording differs from what AWS's SDK decrypted"
    );
}

/// Fetches `url` with a bearer token over HTTPS, trusting only the CA certificate `ca`.
fn get_trusting(ca: &std::path::Path, url: &str, token: &str) -> Vec<u8> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let provider = std::sync::Arc::new(callseal::tls::crypto_provider());
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(certificate.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .no_proxy()
            .tls_backend_preconfigured(config)
            .build()
            .unwrap();
        let response = client.get(url).bearer_auth(token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap().to_vec()
    })
}

#[test]
fn demo_refuses_non_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("something"), b"x").unwrap();
    let output = Command::new(BINARY)
        .args(["demo", "--keep"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not empty"), "{stderr}");
}
