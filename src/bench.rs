//! `callseal bench`: HTTPS load against a gateway, measured from the client and from the server
//! process.
//!
//! Without `--url` it starts `callseal serve` as a child process on loopback, with development
//! certificates, a local practice key, a bearer token and local storage in a temporary directory
//! that is removed afterwards. A child process lets the bench read the gateway's CPU time
//! (`/proc/PID/stat`) and peak resident set size (`VmHWM` in `/proc/PID/status`). With `--url` it
//! targets a gateway or proxy that is already running, and `--pid` names the processes to
//! account.
//!
//! A run uploads `--requests` objects of `--size` bytes, `--concurrency` at a time, each to its
//! own path, then downloads each of them, then times a few range reads of the first and the last
//! MiB of the first object. Upload bodies are generated while they stream from one shared 1 MiB
//! block, so the client never holds more than that of payload. Downloads are checked for length
//! and, unless `--no-verify`, for content.
//!
//! Units: MB is 10^6 bytes and GB 10^9 bytes in the results; sizes given on the command line
//! take the suffixes described at [`parse_size`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::demo::{client_tls_config, free_loopback_port, write_private_file};
use crate::ids::PracticeId;
use crate::keys::KeyDirectory;
use crate::tls;

/// Bytes of the pattern block that every upload body repeats.
const PATTERN_LEN: usize = 1024 * 1024;
/// Bytes per body chunk handed to the HTTP client.
const UPLOAD_CHUNK_LEN: usize = 64 * 1024;
/// Concurrent streams the gateway allows per h2 connection (`MAX_STREAMS_PER_CONNECTION` in
/// `server/routes.rs`).
const STREAMS_PER_CONNECTION: u32 = 64;
/// Range reads of each end of the first object, when it is at least 2 MiB.
const RANGE_READS: usize = 10;
const MIB: u64 = 1024 * 1024;
/// How long a started gateway has to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `callseal bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
SIZES: a number of bytes with an optional suffix, case-insensitive: K, M, G (or KiB, MiB, GiB) \
are powers of 1024; KB, MB, GB are powers of 1000. Examples: 65536, 64KiB, 64MiB, 1GiB.

RESULTS: MB/s counts 10^6 bytes per second of payload (plaintext); CPU seconds per GB divide \
the server's user and system CPU time by 10^9 payload bytes moved.")]
pub struct BenchArgs {
    /// Base URL of a running gateway or proxy to target, such as https://localhost:8443;
    /// without it, the bench starts its own gateway on loopback.
    #[arg(long, value_name = "URL", requires_all = ["token_file", "ca"])]
    url: Option<String>,
    /// File with the bearer token for uploads, of role `ingest` (with --url).
    #[arg(long, value_name = "FILE", requires = "url")]
    token_file: Option<PathBuf>,
    /// File with the bearer token for downloads, of role `reader` (with --url; default: the
    /// upload token).
    #[arg(long, value_name = "FILE", requires = "url")]
    read_token_file: Option<PathBuf>,
    /// PEM file with the CA certificate that signs the server's certificate (with --url).
    #[arg(long, value_name = "FILE", requires = "url")]
    ca: Option<PathBuf>,
    /// Process id whose CPU time and peak resident set size to report (with --url;
    /// repeatable, the figures are summed).
    #[arg(long = "pid", value_name = "PID", requires = "url")]
    pids: Vec<u32>,
    /// Practice id in the upload paths; the token must be allowed to write it.
    #[arg(long, default_value = "bench-clinic", value_name = "ID")]
    practice: PracticeId,
    /// Requests in flight at once, in each phase.
    #[arg(long, default_value_t = 8, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    concurrency: u32,
    /// Number of uploads in the run, and of downloads (default: the concurrency).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    requests: Option<u32>,
    /// Bytes per object (see SIZES below).
    #[arg(long, default_value = "64MiB", value_name = "SIZE", value_parser = parse_size)]
    size: u64,
    /// Use HTTP/1.1 only (ALPN offers only http/1.1).
    #[arg(long, conflicts_with = "http2")]
    http1: bool,
    /// Use HTTP/2 only (ALPN offers only h2). Without --http1 or --http2 the server picks.
    #[arg(long)]
    http2: bool,
    /// HTTP/2 connections to spread the requests over (default: one per 64 requests in flight,
    /// the gateway's stream limit per connection). HTTP/1.1 opens one connection per request in
    /// flight.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    connections: Option<u32>,
    /// Frame length of the gateway this bench starts, in plaintext bytes per frame.
    #[arg(long, default_value_t = crate::envelope::DEFAULT_FRAME_LENGTH, value_name = "BYTES",
          conflicts_with = "url",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::envelope::MAX_FRAME_LENGTH)))]
    frame_length: u32,
    /// Storage of the gateway this bench starts: `local` (files in the temporary directory)
    /// or `memory`.
    #[arg(long, default_value = "local", value_name = "KIND", conflicts_with = "url",
          value_parser = ["local", "memory"])]
    storage: String,
    /// Directory to create the started gateway's temporary directory in (default: the
    /// system's temporary directory). Stored objects take requests × size bytes there.
    #[arg(long, value_name = "DIR", conflicts_with = "url")]
    work_dir: Option<PathBuf>,
    /// Skip the download phase and the range reads.
    #[arg(long)]
    upload_only: bool,
    /// Check only the length of downloads, not their content (for servers that return other
    /// bytes than were uploaded).
    #[arg(long)]
    no_verify: bool,
    /// Print the results as JSON on standard output.
    #[arg(long)]
    json: bool,
}

/// Parses a size: digits with an optional suffix, case-insensitive. `K`, `M`, `G`, `KiB`,
/// `MiB` and `GiB` are powers of 1024; `KB`, `MB` and `GB` are powers of 1000; `B` or no suffix
/// means bytes. Zero is rejected.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size `{text}`: expected digits, such as 64MiB"))?;
    let suffix = suffix.trim();
    let multiplier: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "invalid size unit `{suffix}`: use B, K, M, G, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    let size = number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size `{text}` is too large"))?;
    if size == 0 {
        return Err("size must be at least 1 byte".into());
    }
    Ok(size)
}

/// The HTTP version the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// Both are offered by ALPN and the server picks.
    Either,
}

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `callseal serve (started by the bench)` or the URL given.
    pub target: String,
    /// The HTTP version of the responses, such as `HTTP/2.0`.
    pub http_version: String,
    pub size_bytes: u64,
    pub requests: u32,
    pub concurrency: u32,
    /// HTTP clients (each with its own connection pool) the requests were spread over.
    pub clients: u32,
    pub upload: Phase,
    pub download: Option<Phase>,
    pub range_reads: Option<RangeReads>,
    /// Whether server CPU and memory figures were read (a started gateway, or `--pid`).
    pub server_measured: bool,
}

/// The figures of one phase: uploads or downloads.
#[derive(Debug, Serialize)]
pub struct Phase {
    pub seconds: f64,
    /// Payload bytes moved.
    pub bytes: u64,
    pub mb_per_s: f64,
    pub requests_per_s: f64,
    /// Request start to response complete.
    pub latency_ms: Percentiles,
    /// Request start to the first body byte (downloads only).
    pub first_byte_ms: Option<Percentiles>,
    pub server: Option<ServerUsage>,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

/// CPU time and memory of the server processes during one phase.
#[derive(Debug, Serialize)]
pub struct ServerUsage {
    pub cpu_seconds: f64,
    pub cpu_seconds_per_gb: f64,
    /// Peak resident set size (`VmHWM`) reached by the end of the phase, summed over the
    /// processes. The peak is reset between phases.
    pub peak_rss_mib: f64,
}

/// Time to the first byte of range reads at the two ends of one object.
#[derive(Debug, Serialize)]
pub struct RangeReads {
    pub reads_per_end: usize,
    pub first_mib_first_byte_ms_p50: f64,
    pub last_mib_first_byte_ms_p50: f64,
    pub first_mib_total_ms_p50: f64,
    pub last_mib_total_ms_p50: f64,
}

/// Runs `callseal bench` and prints its report.
pub fn run(args: BenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = runtime.block_on(bench(&args))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", describe(&report));
    }
    Ok(())
}

async fn bench(args: &BenchArgs) -> Result<Report> {
    let protocol = match (args.http1, args.http2) {
        (true, _) => Protocol::Http1,
        (_, true) => Protocol::Http2,
        _ => Protocol::Either,
    };
    match &args.url {
        Some(url) => {
            let (Some(token_file), Some(ca)) = (&args.token_file, &args.ca) else {
                bail!("--url needs --token-file and --ca");
            };
            let read_token_file = args.read_token_file.as_ref().unwrap_or(token_file);
            let target = Target {
                base_url: url.trim_end_matches('/').to_owned(),
                ingest_token: read_token(token_file)?,
                reader_token: read_token(read_token_file)?,
                ca: ca.clone(),
                processes: args.pids.clone(),
            };
            drive(args, protocol, &target, url.clone()).await
        }
        None => {
            let mut gateway = StartedGateway::start(args)?;
            let result = async {
                gateway.wait_ready().await?;
                drive(
                    args,
                    protocol,
                    &gateway.target,
                    "callseal serve (started by the bench)".into(),
                )
                .await
            }
            .await;
            let log = gateway.stop();
            result.map_err(|error| match log {
                Some(log) if !log.is_empty() => {
                    anyhow::anyhow!("{error:#}\nlast lines of the gateway's log:\n{log}")
                }
                _ => error,
            })
        }
    }
}

fn read_token(path: &Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    Ok(token.trim().to_owned())
}

/// The server under load: its address, tokens and CA, and the processes that serve it.
struct Target {
    base_url: String,
    /// Bearer token of role `ingest`, for uploads.
    ingest_token: String,
    /// Bearer token of role `reader`, for downloads.
    reader_token: String,
    ca: PathBuf,
    processes: Vec<u32>,
}

/// Runs the upload phase, the download phase and the range reads.
async fn drive(
    args: &BenchArgs,
    protocol: Protocol,
    target: &Target,
    label: String,
) -> Result<Report> {
    let requests = args.requests.unwrap_or(args.concurrency);
    let concurrency = args.concurrency.min(requests);
    let clients = match protocol {
        Protocol::Http1 => 1,
        _ => args
            .connections
            .unwrap_or_else(|| concurrency.div_ceil(STREAMS_PER_CONNECTION)),
    };
    let clients: Vec<reqwest::Client> = (0..clients)
        .map(|_| http_client(&target.ca, protocol))
        .collect::<Result<_>>()?;

    let mut run_id = [0u8; 4];
    getrandom::fill(&mut run_id)
        .map_err(|_| anyhow::anyhow!("the operating system's random number generator failed"))?;
    let load = Arc::new(Load {
        clients,
        base_url: target.base_url.clone(),
        upload_bearer: format!("Bearer {}", target.ingest_token),
        read_bearer: format!("Bearer {}", target.reader_token),
        practice: args.practice.to_string(),
        run_id: hex::encode(run_id),
        size: args.size,
        pattern: pattern_block(),
        verify: !args.no_verify,
    });
    let http_version = load.warm_up().await?;
    let mut meter = ServerMeter::new(&target.processes)?;

    let progress = progress_bar(args.json, u64::from(requests) * args.size);
    progress.set_message("upload");
    let upload = run_phase(&load, Direction::Upload, requests, concurrency, &progress).await?;
    let upload = upload.summarize(meter.as_mut(), args.size)?;

    let (download, range_reads) = if args.upload_only {
        (None, None)
    } else {
        progress.set_position(0);
        progress.set_message("download");
        let download =
            run_phase(&load, Direction::Download, requests, concurrency, &progress).await?;
        let download = download.summarize(meter.as_mut(), args.size)?;
        let range_reads = if args.size >= 2 * MIB {
            Some(load.range_reads().await?)
        } else {
            None
        };
        (Some(download), range_reads)
    };
    progress.finish_and_clear();

    Ok(Report {
        target: label,
        http_version,
        size_bytes: args.size,
        requests,
        concurrency,
        clients: load.clients.len() as u32,
        upload,
        download,
        range_reads,
        server_measured: meter.is_some(),
    })
}

/// Everything the request tasks share.
struct Load {
    clients: Vec<reqwest::Client>,
    base_url: String,
    upload_bearer: String,
    read_bearer: String,
    practice: String,
    /// Random per run, so that paths are unique across runs against one server.
    run_id: String,
    size: u64,
    pattern: Bytes,
    verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Upload,
    Download,
}

/// Timings of one request.
struct Timing {
    total: Duration,
    first_byte: Option<Duration>,
}

impl Load {
    fn url(&self, index: u32) -> String {
        format!(
            "{}/v1/practices/{}/calls/bench-{}-{index:06}/payload.bin",
            self.base_url, self.practice, self.run_id
        )
    }

    fn client(&self, index: u32) -> &reqwest::Client {
        &self.clients[index as usize % self.clients.len()]
    }

    /// Opens every client's connection with a small request outside the timed phases, and
    /// returns the HTTP version of the response.
    async fn warm_up(&self) -> Result<String> {
        let mut version = String::new();
        for client in &self.clients {
            let url = format!(
                "{}/v1/practices/{}/calls/bench-{}-warm-up/none",
                self.base_url, self.practice, self.run_id
            );
            let response = client
                .head(&url)
                .header("authorization", &self.read_bearer)
                .send()
                .await
                .with_context(|| format!("cannot reach {}", self.base_url))?;
            version = format!("{:?}", response.version());
        }
        Ok(version)
    }

    async fn upload(&self, index: u32, progress: &ProgressBar) -> Result<Timing> {
        let started = Instant::now();
        let body = reqwest::Body::wrap_stream(upload_body(
            self.pattern.clone(),
            self.size,
            progress.clone(),
        ));
        let response = self
            .client(index)
            .put(self.url(index))
            .header("authorization", &self.upload_bearer)
            .header("content-length", self.size)
            .body(body)
            .send()
            .await
            .with_context(|| format!("upload {index} failed"))?;
        let status = response.status();
        // Read the whole response, so that the connection is free for the next request.
        let text = response.text().await.unwrap_or_default();
        ensure!(
            status.is_success(),
            "upload {index} returned status {status}: {}",
            text.chars().take(200).collect::<String>()
        );
        Ok(Timing {
            total: started.elapsed(),
            first_byte: None,
        })
    }

    async fn download(&self, index: u32, progress: &ProgressBar) -> Result<Timing> {
        let started = Instant::now();
        let (received, first_byte) = self
            .read(index, None, Some(progress))
            .await
            .with_context(|| format!("download {index} failed"))?;
        ensure!(
            received == self.size,
            "download {index} returned {received} bytes, expected {}",
            self.size
        );
        Ok(Timing {
            total: started.elapsed(),
            first_byte,
        })
    }

    /// Reads object `index` (or its byte `range`), checking the content against the pattern unless
    /// verification is off. Returns the bytes received and the time to the first of them.
    async fn read(
        &self,
        index: u32,
        range: Option<std::ops::Range<u64>>,
        progress: Option<&ProgressBar>,
    ) -> Result<(u64, Option<Duration>)> {
        let started = Instant::now();
        let mut request = self
            .client(index)
            .get(self.url(index))
            .header("authorization", &self.read_bearer);
        if let Some(range) = &range {
            request = request.header("range", format!("bytes={}-{}", range.start, range.end - 1));
        }
        let mut response = request.send().await?;
        let status = response.status();
        let expected = if range.is_some() { 206 } else { 200 };
        ensure!(status == expected, "status {status}, expected {expected}");

        let mut offset = range.map_or(0, |range| range.start);
        let start = offset;
        let mut first_byte = None;
        while let Some(chunk) = response.chunk().await? {
            if first_byte.is_none() && !chunk.is_empty() {
                first_byte = Some(started.elapsed());
            }
            if self.verify {
                ensure!(
                    matches_pattern(&self.pattern, offset, &chunk),
                    "content differs from the upload in the {} bytes at offset {offset}",
                    chunk.len()
                );
            }
            offset += chunk.len() as u64;
            if let Some(progress) = progress {
                progress.inc(chunk.len() as u64);
            }
        }
        Ok((offset - start, first_byte))
    }

    /// Times range reads of the first and the last MiB of the first object, alternating.
    async fn range_reads(&self) -> Result<RangeReads> {
        let ends = [0..MIB, self.size - MIB..self.size];
        let mut first_byte = [Vec::new(), Vec::new()];
        let mut total = [Vec::new(), Vec::new()];
        for _ in 0..RANGE_READS {
            for (end, range) in ends.iter().enumerate() {
                let started = Instant::now();
                let (received, first) = self
                    .read(0, Some(range.clone()), None)
                    .await
                    .with_context(|| format!("range read of bytes {range:?} failed"))?;
                ensure!(received == MIB, "range read returned {received} bytes");
                total[end].push(started.elapsed());
                first_byte[end].push(first.unwrap_or_default());
            }
        }
        let p50 = |samples: &mut Vec<Duration>| millis(percentile(samples, 50.0));
        Ok(RangeReads {
            reads_per_end: RANGE_READS,
            first_mib_first_byte_ms_p50: p50(&mut first_byte[0]),
            last_mib_first_byte_ms_p50: p50(&mut first_byte[1]),
            first_mib_total_ms_p50: p50(&mut total[0]),
            last_mib_total_ms_p50: p50(&mut total[1]),
        })
    }
}

/// The timings of one phase, before they are summarized.
struct PhaseTimings {
    elapsed: Duration,
    timings: Vec<Timing>,
    direction: Direction,
}

/// Runs `requests` uploads or downloads, `concurrency` at a time. The first failure stops the
/// phase and is returned.
async fn run_phase(
    load: &Arc<Load>,
    direction: Direction,
    requests: u32,
    concurrency: u32,
    progress: &ProgressBar,
) -> Result<PhaseTimings> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let load = Arc::clone(load);
        let next = Arc::clone(&next);
        let progress = progress.clone();
        workers.spawn(async move {
            let mut timings = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed) as u32;
                if index >= requests {
                    return Ok::<_, anyhow::Error>(timings);
                }
                let timing = match direction {
                    Direction::Upload => load.upload(index, &progress).await?,
                    Direction::Download => load.download(index, &progress).await?,
                };
                timings.push(timing);
            }
        });
    }

    let mut timings = Vec::with_capacity(requests as usize);
    while let Some(joined) = workers.join_next().await {
        match joined.context("a request task panicked")? {
            Ok(mut worker_timings) => timings.append(&mut worker_timings),
            Err(error) => {
                workers.abort_all();
                return Err(error);
            }
        }
    }
    Ok(PhaseTimings {
        elapsed: started.elapsed(),
        timings,
        direction,
    })
}

impl PhaseTimings {
    fn summarize(self, meter: Option<&mut ServerMeter>, size: u64) -> Result<Phase> {
        let seconds = self.elapsed.as_secs_f64();
        let bytes = size * self.timings.len() as u64;
        let mut totals: Vec<Duration> = self.timings.iter().map(|t| t.total).collect();
        let mut first_bytes: Vec<Duration> =
            self.timings.iter().filter_map(|t| t.first_byte).collect();
        let server = match meter {
            Some(meter) => Some(meter.finish_phase(bytes)?),
            None => None,
        };
        Ok(Phase {
            seconds,
            bytes,
            mb_per_s: bytes as f64 / 1e6 / seconds,
            requests_per_s: self.timings.len() as f64 / seconds,
            latency_ms: Percentiles {
                p50: millis(percentile(&mut totals, 50.0)),
                p99: millis(percentile(&mut totals, 99.0)),
            },
            first_byte_ms: (self.direction == Direction::Download).then(|| Percentiles {
                p50: millis(percentile(&mut first_bytes, 50.0)),
                p99: millis(percentile(&mut first_bytes, 99.0)),
            }),
            server,
        })
    }
}

/// Streams an upload body: `size` bytes of the pattern, in chunks that share the pattern's buffer.
fn upload_body(
    pattern: Bytes,
    size: u64,
    progress: ProgressBar,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let chunks = size.div_ceil(UPLOAD_CHUNK_LEN as u64);
    futures::stream::iter((0..chunks).map(move |chunk| {
        let offset = chunk * UPLOAD_CHUNK_LEN as u64;
        let len = (size - offset).min(UPLOAD_CHUNK_LEN as u64) as usize;
        let start = (offset % pattern.len() as u64) as usize;
        progress.inc(len as u64);
        // PATTERN_LEN is a multiple of UPLOAD_CHUNK_LEN, so a chunk never wraps around.
        Ok(pattern.slice(start..start + len))
    }))
}

/// Builds the block every body repeats: SHA-256 in counter mode, so no two 32-byte pieces repeat.
fn pattern_block() -> Bytes {
    let mut block = Vec::with_capacity(PATTERN_LEN);
    let mut counter = 0u64;
    while block.len() < PATTERN_LEN {
        block.extend_from_slice(&Sha256::digest(counter.to_be_bytes()));
        counter += 1;
    }
    Bytes::from(block)
}

/// Returns whether `chunk` equals the repeated pattern at byte `offset` of an object.
fn matches_pattern(pattern: &[u8], offset: u64, mut chunk: &[u8]) -> bool {
    let mut position = (offset % pattern.len() as u64) as usize;
    while !chunk.is_empty() {
        let take = (pattern.len() - position).min(chunk.len());
        if chunk[..take] != pattern[position..position + take] {
            return false;
        }
        chunk = &chunk[take..];
        position = 0;
    }
    true
}

/// Builds an HTTPS client on rustls with *ring* that trusts `ca` and offers `protocol`.
fn http_client(ca: &Path, protocol: Protocol) -> Result<reqwest::Client> {
    let mut config = client_tls_config(ca)?;
    config.alpn_protocols = match protocol {
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::Http2 => vec![b"h2".to_vec()],
        Protocol::Either => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    let builder = reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(config);
    let builder = match protocol {
        Protocol::Http1 => builder.http1_only(),
        Protocol::Http2 => builder.http2_prior_knowledge(),
        Protocol::Either => builder,
    };
    Ok(builder.build()?)
}

fn progress_bar(hidden: bool, total: u64) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg:>8} {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(style)
}

/// A gateway started as a child process, with its files in a temporary directory.
struct StartedGateway {
    child: Child,
    directory: tempfile::TempDir,
    admin_url: String,
    target: Target,
}

impl StartedGateway {
    /// Writes certificates, a key, a token and a configuration, and starts `callseal serve`.
    fn start(args: &BenchArgs) -> Result<Self> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("callseal-bench-");
        let directory = match &args.work_dir {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .context("cannot create the bench directory")?;
        let root = directory.path();

        tls::write_dev_certs(&root.join("certs"), false)?;
        KeyDirectory::new(root.join("keys")).generate(&args.practice)?;
        let ingest_token = random_token()?;
        let reader_token = random_token()?;
        let ingest_hash = hex::encode(Sha256::digest(ingest_token.as_bytes()));
        let reader_hash = hex::encode(Sha256::digest(reader_token.as_bytes()));

        let data = free_loopback_port()?;
        let admin = free_loopback_port()?;
        let storage = match args.storage.as_str() {
            "memory" => "kind = \"memory\"".to_owned(),
            _ => "kind = \"local\"\npath = \"data\"".to_owned(),
        };
        let max_upload_bytes = args
            .size
            .max(crate::config::Limits::default().max_upload_bytes);
        let config = format!(
            r#"# Written by `callseal bench`.
[listen]
data = "{data}"
admin = "{admin}"

[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"

[storage]
{storage}

[keys]
directory = "keys"

[envelope]
frame_length = {frame_length}

[limits]
max_upload_bytes = {max_upload_bytes}

[[practices]]
id = "{practice}"

[[tokens]]
name = "bench-ingest"
sha256 = "{ingest_hash}"
role = "ingest"
practices = ["{practice}"]

[[tokens]]
name = "bench-reader"
sha256 = "{reader_hash}"
role = "reader"
practices = ["{practice}"]
"#,
            frame_length = args.frame_length,
            practice = args.practice,
        );
        let config_path = root.join("callseal.toml");
        write_private_file(&config_path, config.as_bytes())?;

        let log = std::fs::File::create(root.join("gateway.log"))?;
        let executable = std::env::current_exe().context("cannot find the callseal binary")?;
        let child = Command::new(executable)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start `callseal serve`")?;
        let target = Target {
            base_url: format!("https://localhost:{}", data.port()),
            ingest_token,
            reader_token,
            ca: root.join("certs/ca.pem"),
            processes: vec![child.id()],
        };
        Ok(StartedGateway {
            child,
            admin_url: format!("http://{admin}/readyz"),
            directory,
            target,
        })
    }

    /// Waits until the admin listener reports ready, or fails if the child exits first.
    async fn wait_ready(&mut self) -> Result<()> {
        // The admin listener is plain HTTP, but reqwest needs a TLS provider to build any client.
        let client = reqwest::Client::builder()
            .no_proxy()
            .tls_backend_preconfigured(client_tls_config(&self.target.ca)?)
            .build()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(response) = client.get(&self.admin_url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the gateway exited during start-up ({status})");
            }
            ensure!(
                Instant::now() < deadline,
                "the gateway did not report ready within {} seconds",
                START_TIMEOUT.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the child and removes the directory; returns the end of the gateway's log.
    fn stop(mut self) -> Option<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(self.directory.path().join("gateway.log")).ok()?;
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        Some(tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }
}

impl Drop for StartedGateway {
    /// Stops the child on every path out of the bench, early errors and panics included.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Draws a bearer token: 32 random bytes in hex.
fn random_token() -> Result<String> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|_| anyhow::anyhow!("the operating system's random number generator failed"))?;
    Ok(hex::encode(secret))
}

/// Reads the CPU time and peak memory of the server processes between phases.
struct ServerMeter {
    processes: Vec<u32>,
    ticks_per_second: f64,
    /// CPU seconds of the processes when the current phase started.
    cpu_at_start: f64,
}

impl ServerMeter {
    /// Starts measuring `processes`, or returns `None` when there are none to measure.
    fn new(processes: &[u32]) -> Result<Option<Self>> {
        if processes.is_empty() {
            return Ok(None);
        }
        let mut meter = ServerMeter {
            processes: processes.to_vec(),
            ticks_per_second: clock_ticks_per_second(),
            cpu_at_start: 0.0,
        };
        meter.reset_peaks()?;
        meter.cpu_at_start = meter.cpu_seconds()?;
        Ok(Some(meter))
    }

    /// Returns the usage since the previous phase ended, and starts the next phase.
    fn finish_phase(&mut self, bytes: u64) -> Result<ServerUsage> {
        let cpu_now = self.cpu_seconds()?;
        let peak_kib: u64 = self
            .processes
            .iter()
            .map(|&pid| read_status_kib(pid, "VmHWM:"))
            .sum::<Result<u64>>()?;
        let cpu_seconds = cpu_now - self.cpu_at_start;
        self.cpu_at_start = cpu_now;
        self.reset_peaks()?;
        Ok(ServerUsage {
            cpu_seconds,
            cpu_seconds_per_gb: cpu_seconds / (bytes as f64 / 1e9),
            peak_rss_mib: peak_kib as f64 / 1024.0,
        })
    }

    fn cpu_seconds(&self) -> Result<f64> {
        let ticks: u64 = self
            .processes
            .iter()
            .map(|&pid| read_cpu_ticks(pid))
            .sum::<Result<u64>>()?;
        Ok(ticks as f64 / self.ticks_per_second)
    }

    /// Resets the peak resident set size of each process to its current size (writing `5` to
    /// `/proc/PID/clear_refs`, Linux 4.0 and later).
    fn reset_peaks(&self) -> Result<()> {
        for pid in &self.processes {
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
                .with_context(|| format!("cannot reset the peak memory of process {pid}"))?;
        }
        Ok(())
    }
}

/// Reads a `kB` field such as `VmHWM:` from `/proc/PID/status`.
fn read_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read the status of process {pid}"))?;
    parse_status_kib(&status, field)
        .with_context(|| format!("no {field} in the status of process {pid}"))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Reads user plus system CPU time of a process, in clock ticks, from `/proc/PID/stat`.
fn read_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read the CPU time of process {pid}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("malformed /proc/{pid}/stat"))
}

/// Parses utime and stime (fields 14 and 15) of a `/proc/PID/stat` line. The command name in
/// field 2 may contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Clock ticks per second of `/proc` CPU times: `AT_CLKTCK` from this process's auxiliary
/// vector, or 100 (the value on Linux x86-64) if that cannot be read.
fn clock_ticks_per_second() -> f64 {
    const AT_CLKTCK: u64 = 17;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return 100.0;
    };
    auxv.chunks_exact(16)
        .map(|pair| {
            let key = u64::from_ne_bytes(pair[..8].try_into().unwrap_or_default());
            let value = u64::from_ne_bytes(pair[8..].try_into().unwrap_or_default());
            (key, value)
        })
        .find(|&(key, value)| key == AT_CLKTCK && value > 0)
        .map_or(100.0, |(_, value)| value as f64)
}

/// Returns the nearest-rank percentile of `samples`, which it sorts, or zero if there are none.
fn percentile(samples: &mut [Duration], percent: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = (percent / 100.0 * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Formats a report as text.
fn describe(report: &Report) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "target:      {}", report.target);
    let _ = writeln!(
        text,
        "load:        {} requests of {} bytes each way, {} in flight, {} over {} client(s)",
        report.requests, report.size_bytes, report.concurrency, report.http_version, report.clients
    );
    let phases = [
        ("upload", Some(&report.upload)),
        ("download", report.download.as_ref()),
    ];
    for (name, phase) in phases {
        let Some(phase) = phase else { continue };
        let _ = writeln!(
            text,
            "{name:<9}    {:.1} MB/s, {:.2} requests/s, latency p50 {:.1} ms, p99 {:.1} ms",
            phase.mb_per_s, phase.requests_per_s, phase.latency_ms.p50, phase.latency_ms.p99
        );
        if let Some(first_byte) = &phase.first_byte_ms {
            let _ = writeln!(
                text,
                "             first byte p50 {:.1} ms, p99 {:.1} ms",
                first_byte.p50, first_byte.p99
            );
        }
        match &phase.server {
            Some(server) => {
                let _ = writeln!(
                    text,
                    "             server: {:.2} CPU s ({:.2} CPU s per GB), peak RSS {:.1} MiB",
                    server.cpu_seconds, server.cpu_seconds_per_gb, server.peak_rss_mib
                );
            }
            None => {
                let _ = writeln!(text, "             server: not measured (pass --pid)");
            }
        }
    }
    if let Some(range) = &report.range_reads {
        let _ = writeln!(
            text,
            "range reads: first byte p50 {:.2} ms (first MiB) vs {:.2} ms (last MiB); \
             whole MiB p50 {:.2} ms vs {:.2} ms ({} reads each)",
            range.first_mib_first_byte_ms_p50,
            range.last_mib_first_byte_ms_p50,
            range.first_mib_total_ms_p50,
            range.last_mib_total_ms_p50,
            range.reads_per_end
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_units_parse() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1B"), Ok(1));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("64k"), Ok(64 * 1024));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64 M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("5KB"), Ok(5_000));
        assert_eq!(parse_size("5mb"), Ok(5_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
    }

    #[test]
    fn size_invalid_rejected() {
        for text in [
            "",
            "MiB",
            "0",
            "0MiB",
            "1.5MiB",
            "-1",
            "12 parsecs",
            "64TiB",
        ] {
            assert!(parse_size(text).is_err(), "{text:?} accepted");
        }
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn percentile_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&mut samples, 99.0), Duration::from_millis(99));
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(percentile(&mut one, 99.0), Duration::from_millis(7));
        assert_eq!(percentile(&mut [], 50.0), Duration::ZERO);
    }

    #[test]
    fn stat_cpu_ticks_parse() {
        let stat = "4242 (callseal (x) y) S 1 4242 4242 0 -1 4194560 2913 0 0 0 \
                    1234 567 0 0 20 0 6 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("4242 (truncated) S 1"), None);
    }

    #[test]
    fn status_field_parse() {
        let status =
            "Name:\tcallseal\nVmPeak:\t  900000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(123_456));
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(1000));
        assert_eq!(parse_status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn pattern_check_wraps_around() {
        let pattern = pattern_block();
        let offset = PATTERN_LEN as u64 * 3 - 10;
        let mut chunk = pattern[PATTERN_LEN - 10..].to_vec();
        chunk.extend_from_slice(&pattern[..20]);
        assert!(matches_pattern(&pattern, offset, &chunk));
        chunk[15] ^= 1;
        assert!(!matches_pattern(&pattern, offset, &chunk));
        assert!(!matches_pattern(&pattern, offset + 1, &pattern[..20]));
    }

    #[test]
    fn upload_body_has_exact_size() {
        let pattern = pattern_block();
        for size in [1, UPLOAD_CHUNK_LEN as u64, PATTERN_LEN as u64 * 2 + 3] {
            let chunks: Vec<Bytes> = futures::executor::block_on_stream(upload_body(
                pattern.clone(),
                size,
                ProgressBar::hidden(),
            ))
            .map(|chunk| chunk.expect("chunks never fail"))
            .collect();
            let total: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
            assert_eq!(total, size);
            let mut offset = 0;
            for chunk in &chunks {
                assert!(matches_pattern(&pattern, offset, chunk));
                offset += chunk.len() as u64;
            }
        }
    }
}
