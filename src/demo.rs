//! `callseal demo`: the gateway's main job on this machine with nothing set up beforehand.
//!
//! In a fresh directory it writes development certificates, a practice key, a bearer token and
//! a configuration, then starts the gateway on loopback ports. It uploads a WAV recording over
//! HTTPS, reads it back whole and by range, and shows that the stored bytes are an AWS
//! Encryption SDK message with no plaintext in them. With `--keep DIR` everything stays in DIR, and
//! `callseal serve --config DIR/callseal.toml` serves the same objects again.

use std::fmt::Write as _;
use std::fs;
use std::io::Cursor;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::envelope::{self, Layout, ParsedHeader};
use crate::ids::PracticeId;
use crate::keys::KeyDirectory;
use crate::webhook::SIGNATURE_HEADER;
use crate::webhook::signature::sign;
use crate::{server, tls};

const PRACTICE: &str = "demo-clinic";
const CALL: &str = "call_demo_0001";
const ARTIFACT: &str = "recording.wav";
/// Sample rate and length of the generated recording.
const SAMPLE_RATE: u32 = 16_000;
const SECONDS: u32 = 30;

/// The outcome of a demo run, for the caller to print or check.
#[derive(Debug)]
pub struct Summary {
    pub directory: PathBuf,
    pub plaintext_bytes: u64,
    pub stored_bytes: u64,
    pub stored_path: PathBuf,
    pub http_version: String,
    pub webhook: Option<WebhookSummary>,
}

/// The call and artifacts that the webhook part of the demo stored.
#[derive(Debug)]
pub struct WebhookSummary {
    pub call: String,
    pub artifacts: Vec<String>,
}

/// Runs the demo in `keep` (which must be absent or empty) or in a temporary directory that is
/// removed afterwards. `input` replaces the generated recording with a file of the caller's.
pub async fn run(keep: Option<&Path>, input: Option<&Path>) -> Result<Summary> {
    let temporary;
    let directory = match keep {
        Some(directory) => {
            prepare_empty_directory(directory)?;
            directory.to_owned()
        }
        None => {
            temporary = tempfile::Builder::new()
                .prefix("callseal-demo-")
                .tempdir()?;
            temporary.path().to_owned()
        }
    };
    println!("callseal demo in {}", directory.display());

    let recording = match input {
        Some(path) => fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        None => generate_recording()?,
    };
    let tokens = setup(&directory)?;
    let config = Config::load(&directory.join("callseal.toml"))?;
    let running = server::start(config).await?;
    println!(
        "  started the gateway: https://{} (admin http://{})",
        running.data_addr, running.admin_addr
    );

    let result = match exercise(&directory, &running, &tokens, &recording).await {
        Ok(summary) => webhook_flow(&directory, &running, &tokens.reader, &recording)
            .await
            .map(|webhook| Summary {
                webhook: Some(webhook),
                ..summary
            }),
        Err(error) => Err(error),
    };
    running.shutdown().await;
    let summary = result?;

    println!();
    println!(
        "summary: {} bytes of audio went in over HTTPS ({}), {} bytes of ciphertext were",
        summary.plaintext_bytes, summary.http_version, summary.stored_bytes
    );
    println!("stored, and the same audio came back whole and by range.");
    if let Some(webhook) = &summary.webhook {
        println!(
            "The signed call_ended webhook for {} was verified and stored, and its media was",
            webhook.call
        );
        println!(
            "downloaded and stored encrypted: {}.",
            webhook.artifacts.join(", ")
        );
    }
    if keep.is_some() {
        println!(
            "kept in {}: run `callseal serve --config {}` to serve it again;",
            directory.display(),
            directory.join("callseal.toml").display()
        );
        println!(
            "the bearer token is in {}.",
            directory.join("token").display()
        );
    }
    Ok(summary)
}

fn prepare_empty_directory(directory: &Path) -> Result<()> {
    if directory.exists() {
        let mut entries = fs::read_dir(directory)
            .with_context(|| format!("cannot read {}", directory.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty; --keep needs a new or empty directory",
                directory.display()
            );
        }
    }
    fs::create_dir_all(directory).with_context(|| format!("cannot create {}", directory.display()))
}

/// The demo's two bearer tokens: each principal has one role.
pub struct DemoTokens {
    /// Role `reader`, kept in `token`.
    pub reader: String,
    /// Role `ingest`, kept in `ingest-token`.
    pub ingest: String,
}

/// Writes certificates, the practice key, the tokens and the configuration; returns the tokens.
fn setup(directory: &Path) -> Result<DemoTokens> {
    tls::write_dev_certs(&directory.join("certs"), false)?;
    println!("  wrote a development CA and a localhost certificate    certs/");

    let practice = PracticeId::new(PRACTICE)?;
    let key = KeyDirectory::new(directory.join("keys")).generate(&practice)?;
    println!("  generated the practice's wrapping key {key:<16} keys/{PRACTICE}/v1.key");

    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|_| anyhow::anyhow!("the operating system's random number generator failed"))?;
    let token = hex::encode(secret);
    write_private_file(&directory.join("token"), format!("{token}\n").as_bytes())?;
    let token_hash = hex::encode(Sha256::digest(token.as_bytes()));
    getrandom::fill(&mut secret)
        .map_err(|_| anyhow::anyhow!("the operating system's random number generator failed"))?;
    let ingest_token = hex::encode(secret);
    write_private_file(
        &directory.join("ingest-token"),
        format!("{ingest_token}\n").as_bytes(),
    )?;
    let ingest_hash = hex::encode(Sha256::digest(ingest_token.as_bytes()));
    getrandom::fill(&mut secret)
        .map_err(|_| anyhow::anyhow!("the operating system's random number generator failed"))?;
    let retell_key = format!("key_demo_{}", hex::encode(secret));
    write_private_file(
        &directory.join("retell-api-key"),
        format!("{retell_key}\n").as_bytes(),
    )?;
    println!(
        "  created reader and ingest bearer tokens (only SHA-256s are configured)  token, ingest-token"
    );
    println!("  created a Retell API key that signs the demo's webhook   retell-api-key");

    let config = format!(
        r#"# Written by `callseal demo`. Serve it again with: callseal serve --config callseal.toml

[listen]
data = "{data}"
admin = "{admin}"

[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"

[storage]
kind = "local"
path = "data"

[keys]
directory = "keys"

[[practices]]
id = "{PRACTICE}"
retell_api_keys_file = "retell-api-key"

[media]
# The demo serves the call's recording itself, on loopback, which only tests and demonstrations
# may reach. A production gateway lists Retell's media hosts and keeps loopback refused.
allowed_hosts = ["localhost"]
allow_loopback_for_tests = true
extra_ca_file = "certs/ca.pem"

[[tokens]]
name = "demo-reader"
sha256 = "{token_hash}"
role = "reader"
practices = ["{PRACTICE}"]

[[tokens]]
name = "demo-ingest"
sha256 = "{ingest_hash}"
role = "ingest"
practices = ["{PRACTICE}"]
"#,
        data = free_loopback_port()?,
        admin = free_loopback_port()?,
    );
    write_private_file(&directory.join("callseal.toml"), config.as_bytes())?;
    println!("  wrote the configuration                                callseal.toml");
    Ok(DemoTokens {
        reader: token,
        ingest: ingest_token,
    })
}

/// Uploads, reads back and inspects the recording against a running gateway.
async fn exercise(
    directory: &Path,
    running: &server::Running,
    tokens: &DemoTokens,
    recording: &[u8],
) -> Result<Summary> {
    let client = https_client(&directory.join("certs/ca.pem"))?;
    let url = format!(
        "https://localhost:{}/v1/practices/{PRACTICE}/calls/{CALL}/{ARTIFACT}",
        running.data_addr.port()
    );
    let bearer = format!("Bearer {}", tokens.reader);
    let ingest_bearer = format!("Bearer {}", tokens.ingest);

    let started = Instant::now();
    let response = client
        .put(&url)
        .header("authorization", &ingest_bearer)
        .body(recording.to_vec())
        .send()
        .await
        .context("upload failed")?;
    let http_version = format!("{:?}", response.version());
    ensure!(
        response.status() == 201,
        "upload returned status {}",
        response.status()
    );
    println!(
        "  uploaded {ARTIFACT} ({} bytes) over {http_version}: 201 in {} ms",
        recording.len(),
        started.elapsed().as_millis()
    );

    let whole = client
        .get(&url)
        .header("authorization", &bearer)
        .send()
        .await?;
    ensure!(
        whole.status() == 200,
        "read returned status {}",
        whole.status()
    );
    let whole = whole.bytes().await?;
    ensure!(
        Sha256::digest(&whole) == Sha256::digest(recording),
        "the audio read back differs"
    );
    println!(
        "  read it back whole: SHA-256 {} matches",
        &hex::encode(Sha256::digest(&whole))[..16]
    );

    let range_end = recording.len().min(44 + 4096);
    let range = client
        .get(&url)
        .header("authorization", &bearer)
        .header("range", format!("bytes=44-{}", range_end - 1))
        .send()
        .await?;
    ensure!(
        range.status() == 206,
        "range read returned status {}",
        range.status()
    );
    let part = range.bytes().await?;
    ensure!(
        part[..] == recording[44..range_end],
        "the range read back differs"
    );
    println!(
        "  read bytes 44-{} by range: 206, {} bytes, match",
        range_end - 1,
        part.len()
    );

    let stored_path = directory.join(format!("data/{PRACTICE}/calls/{CALL}/{ARTIFACT}"));
    let stored = fs::read(&stored_path).context("cannot read the stored object")?;
    print!("{}", describe_stored(&stored, recording)?);

    Ok(Summary {
        directory: directory.to_owned(),
        plaintext_bytes: recording.len() as u64,
        stored_bytes: stored.len() as u64,
        stored_path,
        http_version,
        webhook: None,
    })
}

/// Posts the signed `call_ended` event of a synthetic call, with its media links pointing at a
/// local HTTPS server, and waits until the gateway has downloaded and stored the recording.
async fn webhook_flow(
    directory: &Path,
    running: &server::Running,
    token: &str,
    recording: &[u8],
) -> Result<WebhookSummary> {
    let media = MediaServer::start(&directory.join("certs"), recording.to_vec()).await?;
    let body = include_str!("../tests/fixtures/retell/call_ended.json").replace(
        "https://recordings.example.test",
        &format!("https://localhost:{}", media.port),
    );
    let event: serde_json::Value = serde_json::from_str(&body)?;
    let call = event["call"]["call_id"]
        .as_str()
        .context("fixture has no call id")?
        .to_owned();

    let retell_key = fs::read_to_string(directory.join("retell-api-key"))?;
    let signature = sign(
        retell_key.trim().as_bytes(),
        body.as_bytes(),
        crate::webhook::now_ms(),
    );
    let client = https_client(&directory.join("certs/ca.pem"))?;
    let base = format!("https://localhost:{}", running.data_addr.port());
    let response = client
        .post(format!("{base}/v1/webhooks/retell/{PRACTICE}"))
        .header(SIGNATURE_HEADER, signature)
        .body(body.clone())
        .send()
        .await
        .context("webhook delivery failed")?;
    // 202 means that the store took longer than `webhooks.store_timeout_secs` on a busy machine,
    // so the event went to the spool. The recording then follows once the spool is drained.
    let status = response.status().as_u16();
    ensure!(
        status == 204 || status == 202,
        "webhook returned status {status}"
    );
    println!(
        "  posted a signed call_ended webhook ({} bytes): {status}",
        body.len()
    );

    let call_url = format!("{base}/v1/practices/{PRACTICE}/calls/{call}");
    let bearer = format!("Bearer {token}");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let downloaded = loop {
        let response = client
            .get(format!("{call_url}/recording.wav"))
            .header("authorization", &bearer)
            .send()
            .await?;
        if response.status() == 200 {
            break response.bytes().await?;
        }
        ensure!(
            Instant::now() < deadline,
            "the recording was not downloaded within 60 seconds"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    ensure!(
        downloaded[..] == recording[..],
        "the downloaded recording differs from the one served"
    );
    println!(
        "  the gateway downloaded the recording from the local media server and stored it encrypted"
    );

    let stored_event = client
        .get(format!("{call_url}/event-call_ended.json"))
        .header("authorization", &bearer)
        .send()
        .await?;
    ensure!(
        stored_event.status() == 200,
        "reading the event returned status {}",
        stored_event.status()
    );
    ensure!(
        stored_event.bytes().await?[..] == *body.as_bytes(),
        "the stored event differs from the body sent"
    );
    println!("  read the event back byte for byte, as Retell signed it");

    // The other media downloads run on; list the call once every job has finished, so that no
    // half-written file (`{artifact}#{n}`) shows up as stored.
    let call_directory = directory.join(format!("data/{PRACTICE}/calls/{call}"));
    let list = || -> std::io::Result<Vec<String>> {
        Ok(fs::read_dir(&call_directory)?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect())
    };
    while list()?.iter().any(|name| name.starts_with("job.")) {
        ensure!(
            Instant::now() < deadline,
            "the media downloads did not finish within 60 seconds"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut artifacts: Vec<String> = list()?
        .into_iter()
        .filter(|name| !name.starts_with("job.") && !name.contains('#'))
        .collect();
    artifacts.sort();
    println!("  stored for call {call}: {}", artifacts.join(", "));
    Ok(WebhookSummary { call, artifacts })
}

/// A local HTTPS server standing in for Retell's media host: `.wav` paths serve the recording,
/// any other path a short text log.
struct MediaServer {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl MediaServer {
    async fn start(certs: &Path, recording: Vec<u8>) -> Result<Self> {
        let resolver =
            tls::CertResolver::load(certs.join("server.pem"), certs.join("server-key.pem"))?;
        let acceptor = tls::acceptor(resolver, None)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let recording = bytes::Bytes::from(recording);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let recording = recording.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let body = if request.uri().path().ends_with(".wav") {
                                recording.clone()
                            } else {
                                bytes::Bytes::from_static(
                                    b"agent: Thank you for calling the demo clinic.\n",
                                )
                            };
                            async move {
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(body),
                                ))
                            }
                        },
                    );
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(MediaServer { port, task })
    }
}

impl Drop for MediaServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Describes the stored object as a reader of the AWS Encryption SDK format parses it, and
/// checks that the start of the plaintext appears nowhere in it.
fn describe_stored(stored: &[u8], recording: &[u8]) -> Result<String> {
    let parsed =
        ParsedHeader::parse(stored)?.context("the stored object has no complete header")?;
    let layout = Layout::new(&parsed, stored.len() as u64)?;
    let header = &parsed.header;

    let window = &recording[..recording.len().min(64)];
    let leaked = !window.is_empty() && stored.windows(window.len()).any(|w| w == window);
    ensure!(!leaked, "plaintext found in the stored object");

    let mut text = String::new();
    writeln!(
        text,
        "  stored object: data/{PRACTICE}/calls/{CALL}/{ARTIFACT}, {} bytes",
        stored.len()
    )?;
    writeln!(
        text,
        "    an AWS Encryption SDK message: version {}, suite {:#06x}, frame length {}, {} frames",
        stored[0],
        envelope::SUITE_ID,
        header.frame_length,
        u64::from(layout.final_sequence())
    )?;
    let context: Vec<_> = header
        .context
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    writeln!(text, "    encryption context: {}", context.join(", "))?;
    for edk in &header.edks {
        let name_len = edk.provider_info.len().saturating_sub(20);
        let key = String::from_utf8_lossy(&edk.provider_info[..name_len]);
        writeln!(
            text,
            "    data key wrapped by provider `{}`, key `{key}`",
            edk.provider_id_str().unwrap_or("?")
        )?;
    }
    writeln!(
        text,
        "    no plaintext in it: the recording's first {} bytes appear nowhere in the stored bytes",
        window.len()
    )?;
    writeln!(
        text,
        "    AWS's own aws-encryption-sdk decrypts it with a Raw AES key (namespace `callseal`)"
    )?;
    Ok(text)
}

/// Builds an HTTPS client that trusts only the demo's development CA.
fn https_client(ca: &Path) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(client_tls_config(ca)?)
        .build()?)
}

/// Builds a rustls client configuration with the *ring* provider that trusts only the CA
/// certificates in the PEM file `ca` and offers ALPN `h2` and `http/1.1`.
pub(crate) fn client_tls_config(ca: &Path) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read the CA file {}", ca.display()))?;
    for certificate in certificates {
        roots.add(certificate.context("invalid CA certificate")?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(tls::crypto_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Picks a free port on 127.0.0.1 for the configuration. Another process could take it before
/// the gateway binds it; the gateway then fails to start with a clear error.
pub(crate) fn free_loopback_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Creates `path` with mode 0600 and writes `contents`; fails if it exists.
pub(crate) fn write_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)?;
    Ok(())
}

/// Generates a WAV recording: 16 kHz mono 16-bit PCM of a call's sounds, dial tones for a
/// phone number and a voice-band sweep, 30 seconds long.
pub fn generate_recording() -> Result<Vec<u8>> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut bytes = Cursor::new(Vec::new());
    let mut writer = hound::WavWriter::new(&mut bytes, spec)?;
    // DTMF pairs (row, column in Hz) for the digits 5 5 5 0 1 0 0.
    let digits: [(f32, f32); 7] = [
        (770.0, 1336.0),
        (770.0, 1336.0),
        (770.0, 1336.0),
        (941.0, 1336.0),
        (697.0, 1209.0),
        (941.0, 1336.0),
        (941.0, 1336.0),
    ];
    let total = SAMPLE_RATE * SECONDS;
    for n in 0..total {
        let t = n as f32 / SAMPLE_RATE as f32;
        let slot = (t / 0.25) as usize;
        let sample = if slot < digits.len() * 2 && slot.is_multiple_of(2) {
            let (low, high) = digits[slot / 2];
            0.4 * ((2.0 * std::f32::consts::PI * low * t).sin()
                + (2.0 * std::f32::consts::PI * high * t).sin())
        } else {
            // A sweep through the voice band, 300 to 3400 Hz, every 2 seconds.
            let phase = t % 2.0;
            let frequency = 300.0 + 1550.0 * phase;
            0.5 * (2.0 * std::f32::consts::PI * frequency * phase).sin()
        };
        writer.write_sample((sample * i16::MAX as f32 * 0.8) as i16)?;
    }
    writer.finalize()?;
    Ok(bytes.into_inner())
}
