//! The `callseal` command line: key management, and encryption, decryption and inspection of
//! stored objects with local keys.
//!
//! Output files are written under a temporary name in the target directory with mode 0600. They
//! are renamed into place only when the whole message has been processed, so a failed decryption
//! (a tampered or truncated message) never leaves a partial plaintext file. Decryption to
//! standard output streams verified frames as they come; there a failure is reported on
//! standard error with a non-zero exit status, and the consumer must discard what it received.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::envelope::{
    self, DEFAULT_FRAME_LENGTH, Decryptor, EncryptionContext, Encryptor, ParsedHeader, io as eio,
};
use crate::ids::{ArtifactName, CallId, ObjectId, PracticeId};
use crate::keys::{KeyDirectory, KeyName, local::NAMESPACE};
use crate::{demo, server, tls};

/// Inputs at least this large get a progress bar when standard error is a terminal.
const PROGRESS_THRESHOLD: u64 = 16 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "callseal",
    version,
    about = "Encryption gateway for healthcare voice-agent call data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage practices' local wrapping keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Encrypt a file or standard input into one stored-format message.
    Encrypt(EncryptArgs),
    /// Decrypt a message, after checking that it belongs to the expected object.
    Decrypt(DecryptArgs),
    /// Print a message's header and its verified plaintext length; never a secret.
    Inspect(InspectArgs),
    /// Run the gateway with a configuration file until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Manage TLS certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the main job end to end on this machine: a gateway with throwaway certificates, key
    /// and token, a WAV recording uploaded over HTTPS, read back whole and by range.
    Demo(DemoArgs),
    /// Measure HTTPS upload and download throughput, latency, and the server's CPU time and
    /// peak memory, against a gateway it starts or a running one.
    Bench(crate::bench::BenchArgs),
    /// Verify or query the audit log; create its checkpoint signing key.
    #[command(subcommand)]
    Audit(crate::audit::cli::AuditCommand),
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Keep the configuration, keys, certificates, stored objects and token in DIR (new or
    /// empty), so that `callseal serve --config DIR/callseal.toml` serves them again.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Upload this file instead of the generated recording.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a development CA and a `localhost` server certificate signed by it.
    Dev(DevCertsArgs),
}

#[derive(Debug, Args)]
struct DevCertsArgs {
    /// Directory to write `ca.pem`, `ca-key.pem`, `server.pem` and `server-key.pem` into.
    #[arg(long, default_value = "certs", value_name = "DIR")]
    dir: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a practice's first 256-bit wrapping key (file mode 0600); never overwrites.
    Generate(PracticeArgs),
    /// Add a new key version and make it current; older versions still decrypt.
    Rotate(PracticeArgs),
    /// List a practice's key versions.
    List(PracticeArgs),
    /// Re-wrap every stored object's data key under another key, without re-encrypting bodies.
    Rewrap(RewrapArgs),
}

#[derive(Debug, Args)]
struct RewrapArgs {
    /// The gateway's TOML configuration (storage, keys, the practice's current key).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Practice whose objects are re-wrapped.
    #[arg(long, value_name = "ID")]
    practice: PracticeId,
    /// Target key: `local` (the practice's current local key version, after `keys rotate`) or
    /// a KMS key ARN.
    #[arg(long, value_name = "KEY")]
    to: crate::rewrap::Target,
    /// Count what would be re-wrapped without changing anything.
    #[arg(long)]
    dry_run: bool,
    /// Stop after re-wrapping this many objects; run again to continue.
    #[arg(long, value_name = "COUNT")]
    max_objects: Option<usize>,
}

#[derive(Debug, Args)]
struct KeyDirArg {
    /// Directory of local wrapping keys, one subdirectory per practice.
    #[arg(
        long,
        env = "CALLSEAL_KEY_DIR",
        default_value = "keys",
        value_name = "DIR"
    )]
    key_dir: PathBuf,
}

#[derive(Debug, Args)]
struct PracticeArgs {
    /// Practice id: ASCII letters, digits, `-`, `_` and `.`, at most 128 bytes.
    #[arg(long, value_name = "ID")]
    practice: PracticeId,
    #[command(flatten)]
    keys: KeyDirArg,
}

#[derive(Debug, Args)]
struct ObjectArgs {
    /// Practice the object belongs to; its current key wraps the data key.
    #[arg(long, value_name = "ID")]
    practice: PracticeId,
    /// Call the object belongs to.
    #[arg(long, value_name = "ID")]
    call: CallId,
    /// Artifact name of the object, such as `recording.wav`.
    #[arg(long, value_name = "NAME")]
    artifact: ArtifactName,
}

#[derive(Debug, Args)]
struct Files {
    /// Input file; standard input when absent or `-`.
    #[arg(value_name = "INPUT")]
    input: Option<PathBuf>,
    /// Output file, written atomically with mode 0600; standard output when absent or `-`.
    #[arg(short, long, value_name = "OUTPUT")]
    output: Option<PathBuf>,
    /// Replace the output file if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct EncryptArgs {
    #[command(flatten)]
    object: ObjectArgs,
    /// Plaintext bytes per frame, 1 to 1048576.
    #[arg(long, default_value_t = DEFAULT_FRAME_LENGTH, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(envelope::MAX_FRAME_LENGTH)))]
    frame_length: u32,
    #[command(flatten)]
    files: Files,
    #[command(flatten)]
    keys: KeyDirArg,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("expectation").required(true).args(["practice", "context", "any_context"])))]
struct DecryptArgs {
    /// Expected practice; with --call and --artifact it states the expected object.
    #[arg(long, value_name = "ID", requires_all = ["call", "artifact"])]
    practice: Option<PracticeId>,
    /// Expected call.
    #[arg(long, value_name = "ID", requires = "practice")]
    call: Option<CallId>,
    /// Expected artifact name.
    #[arg(long, value_name = "NAME", requires = "practice")]
    artifact: Option<ArtifactName>,
    /// Expected encryption context pair, for messages not written by callseal (repeatable;
    /// the message's context must equal the pairs given, exactly).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair, conflicts_with = "practice")]
    context: Vec<(String, String)>,
    /// Accept any encryption context (printed to standard error). Use only for messages whose
    /// origin is known by other means.
    #[arg(long, conflicts_with_all = ["practice", "context"])]
    any_context: bool,
    #[command(flatten)]
    files: Files,
    #[command(flatten)]
    keys: KeyDirArg,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// Message file; standard input when absent or `-`.
    #[arg(value_name = "INPUT")]
    input: Option<PathBuf>,
    /// Authenticate every frame, not only the header and the final frame.
    #[arg(long)]
    full: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keys: KeyDirArg,
}

/// Runs the command line and maps failures to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The gateway logs its requests; the one-shot commands report through their own output.
    let default_level = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    init_logging(default_level);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("callseal: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error at `default_level`, or at the filter in `CALLSEAL_LOG`.
fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CALLSEAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

/// Standard error for log lines, ignoring write failures: a closed or full log sink must not
/// stop the gateway (tracing-subscriber reports a failed write with `eprintln!`, which panics
/// when standard error itself is the failing sink).
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().write_all(buffer);
        Ok(buffer.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keys(command) => keys(command),
        Command::Encrypt(args) => encrypt(args),
        Command::Decrypt(args) => decrypt(args),
        Command::Inspect(args) => inspect(args),
        Command::Serve(args) => serve(args),
        Command::Certs(CertsCommand::Dev(args)) => dev_certs(args),
        Command::Audit(command) => crate::audit::cli::run(command),
        Command::Bench(args) => crate::bench::run(args),
        Command::Demo(args) => {
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(demo::run(args.keep.as_deref(), args.input.as_deref()))?;
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(server::serve(config, shutdown_signal()))
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn dev_certs(args: DevCertsArgs) -> Result<()> {
    let paths = tls::write_dev_certs(&args.dir, args.force)?;
    println!(
        "wrote a development CA and a localhost certificate to {}",
        args.dir.display()
    );
    println!(
        "trust {} in clients; never use these files in production",
        paths.ca_cert.display()
    );
    Ok(())
}

fn keys(command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::Generate(args) => {
            let name = KeyDirectory::new(&args.keys.key_dir).generate(&args.practice)?;
            println!("created key {name} in {}", args.keys.key_dir.display());
        }
        KeysCommand::Rotate(args) => {
            let name = KeyDirectory::new(&args.keys.key_dir).rotate(&args.practice)?;
            println!("created key {name}; new objects are wrapped under it");
        }
        KeysCommand::Rewrap(args) => rewrap(args)?,
        KeysCommand::List(args) => {
            let versions = KeyDirectory::new(&args.keys.key_dir).versions(&args.practice)?;
            if versions.is_empty() {
                bail!(
                    "practice `{}` has no keys in {}",
                    args.practice,
                    args.keys.key_dir.display()
                );
            }
            let current = versions.last().copied();
            for version in versions {
                let name = KeyName {
                    practice: args.practice.clone(),
                    version,
                };
                let marker = if Some(version) == current {
                    " (current)"
                } else {
                    ""
                };
                println!("{name}{marker}");
            }
        }
    }
    Ok(())
}

fn rewrap(args: RewrapArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let bar = ProgressBar::new(0);
    if io::stderr().is_terminal() {
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} objects eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let report = runtime.block_on(crate::rewrap::run(
        &config,
        &args.practice,
        &args.to,
        args.dry_run,
        args.max_objects,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    ))?;
    bar.finish_and_clear();
    let verb = if args.dry_run {
        "would re-wrap"
    } else {
        "re-wrapped"
    };
    println!(
        "{} objects of practice `{}`: {verb} {}, {} already on the target key",
        report.objects, args.practice, report.rewrapped, report.already_on_target
    );
    Ok(())
}

fn encrypt(args: EncryptArgs) -> Result<()> {
    let ObjectArgs {
        practice,
        call,
        artifact,
    } = args.object;
    let object = ObjectId::new(practice, call, artifact);
    let keys = KeyDirectory::new(&args.keys.key_dir).load(&object.practice)?;
    let context = EncryptionContext::for_object(&object);
    let (data_key, edk) = keys.generate_data_key(&context)?;
    let encryptor = Encryptor::new(&data_key, vec![edk], context, args.frame_length)?;

    let (input, size) = open_input(args.files.input.as_deref())?;
    let progress = progress_bar(size);
    let output = Output::create(args.files.output.as_deref(), args.files.force)?;
    let length = eio::encrypt(encryptor, input, output.writer(), |done| {
        progress.set_position(done)
    })
    .context("encryption failed")?;
    output.commit()?;
    progress.finish_and_clear();
    tracing::info!(practice = %object.practice, call = %object.call, artifact = %object.artifact, bytes = length, "encrypted");
    Ok(())
}

fn decrypt(args: DecryptArgs) -> Result<()> {
    let expected = expected_context(&args)?;
    let (mut input, size) = open_input(args.files.input.as_deref())?;
    let (parsed, body_start) = eio::read_header(&mut input)?;

    match &expected {
        Some(expected) => envelope::check_context(&parsed.header, expected)?,
        None => eprintln!(
            "callseal: accepting encryption context {}",
            describe_context(&parsed.header.context)
        ),
    }
    let keys = KeyDirectory::new(&args.keys.key_dir).load_for(&parsed.header.edks)?;
    let data_key = keys.unwrap(&parsed.header.edks, &parsed.header.context)?;
    let decryptor = Decryptor::new(&parsed, &data_key)?;

    let progress = progress_bar(size);
    let output = Output::create(args.files.output.as_deref(), args.files.force)?;
    let failure = match output {
        Output::Stdout(_) => {
            "decryption failed; the output written so far is incomplete and must be discarded"
        }
        Output::File { .. } => "decryption failed; no output file was written",
    };
    eio::decrypt_body(decryptor, &body_start, input, output.writer(), |done| {
        progress.set_position(done)
    })
    .context(failure)?;
    output.commit()?;
    progress.finish_and_clear();
    Ok(())
}

fn expected_context(args: &DecryptArgs) -> Result<Option<EncryptionContext>> {
    if args.any_context {
        return Ok(None);
    }
    if let (Some(practice), Some(call), Some(artifact)) =
        (&args.practice, &args.call, &args.artifact)
    {
        let object = ObjectId::new(practice.clone(), call.clone(), artifact.clone());
        return Ok(Some(EncryptionContext::for_object(&object)));
    }
    Ok(Some(EncryptionContext::from_pairs(
        args.context.iter().cloned(),
    )?))
}

fn inspect(args: InspectArgs) -> Result<()> {
    let (mut input, size) = open_input(args.input.as_deref())?;
    let (parsed, body_start) = eio::read_header(&mut input)?;
    let keys = KeyDirectory::new(&args.keys.key_dir).load_for(&parsed.header.edks)?;
    let data_key = keys.unwrap(&parsed.header.edks, &parsed.header.context)?;

    let (length, verified) = match (input, size) {
        (Input::File(mut file), Some(size)) if !args.full => {
            // Reading the final frame at the offset the size implies proves the length.
            let mut reader = BufReader::new(&mut file);
            reader.rewind()?;
            let (layout, _) = eio::verified_length(&mut reader, &parsed, &data_key, size)?;
            (
                layout.plaintext_len(),
                "header and final frame authenticated",
            )
        }
        (input, size) => {
            let progress = progress_bar(size);
            let decryptor = Decryptor::new(&parsed, &data_key)?;
            let length = eio::decrypt_body(decryptor, &body_start, input, io::sink(), |done| {
                progress.set_position(done)
            })?;
            progress.finish_and_clear();
            (length, "every frame authenticated")
        }
    };

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&describe_json(&parsed, length))?
        );
    } else {
        print!("{}", describe_text(&parsed, length, verified));
    }
    Ok(())
}

fn describe_text(parsed: &ParsedHeader, length: u64, verified: &str) -> String {
    let header = &parsed.header;
    let mut text = String::new();
    text += &format!(
        "suite:              {:#06x} (AES-256-GCM, HKDF-SHA512, key commitment, no signature)\n",
        envelope::SUITE_ID
    );
    text += &format!("frame length:       {} bytes\n", header.frame_length);
    text += &format!("header length:      {} bytes\n", parsed.len());
    text += "encryption context:";
    if header.context.is_empty() {
        text += " (empty)\n";
    } else {
        text += "\n";
        for (key, value) in header.context.iter() {
            text += &format!("  {key} = {value}\n");
        }
    }
    text += &format!("encrypted data keys: {}\n", header.edks.len());
    for (provider, key) in header.edks.iter().map(describe_edk) {
        text += &format!("  provider {provider}, key {key}\n");
    }
    text += &format!("plaintext length:   {length} bytes ({verified})\n");
    text
}

fn describe_json(parsed: &ParsedHeader, length: u64) -> serde_json::Value {
    let header = &parsed.header;
    let context: serde_json::Map<_, _> = header
        .context
        .iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    let edks: Vec<_> = header
        .edks
        .iter()
        .map(describe_edk)
        .map(|(provider, key)| serde_json::json!({ "provider": provider, "key": key }))
        .collect();
    serde_json::json!({
        "suite": envelope::SUITE_ID,
        "frame_length": header.frame_length,
        "header_length": parsed.len(),
        "encryption_context": context,
        "encrypted_data_keys": edks,
        "plaintext_length": length,
    })
}

/// Names an EDK's provider and key without printing any wrapped key bytes.
fn describe_edk(edk: &envelope::EncryptedDataKey) -> (String, String) {
    let provider = edk.provider_id_str().unwrap_or("(not UTF-8)").to_owned();
    let key = if edk.provider_id == NAMESPACE.as_bytes() {
        // Raw AES provider info: key name, then 20 bytes of tag length, IV length and IV.
        let name_len = edk.provider_info.len().saturating_sub(20);
        String::from_utf8_lossy(&edk.provider_info[..name_len]).into_owned()
    } else {
        match std::str::from_utf8(&edk.provider_info) {
            Ok(info) if info.chars().all(|c| !c.is_control()) => info.to_owned(),
            _ => format!("({} bytes of provider info)", edk.provider_info.len()),
        }
    };
    (provider, key)
}

fn describe_context(context: &EncryptionContext) -> String {
    if context.is_empty() {
        return "(empty)".into();
    }
    let pairs: Vec<_> = context.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(", ")
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((key.to_owned(), value.to_owned()))
}

/// An input file (seekable, with a known size) or standard input.
enum Input {
    File(File),
    Stdin(io::Stdin),
}

impl Read for Input {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Input::File(file) => file.read(buffer),
            Input::Stdin(stdin) => stdin.read(buffer),
        }
    }
}

fn open_input(path: Option<&Path>) -> Result<(Input, Option<u64>)> {
    match path {
        None => Ok((Input::Stdin(io::stdin()), None)),
        Some(path) if path == Path::new("-") => Ok((Input::Stdin(io::stdin()), None)),
        Some(path) => {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let size = file.metadata()?.len();
            Ok((Input::File(file), Some(size)))
        }
    }
}

/// Standard output, or a file that appears under its name only on [`Output::commit`].
enum Output {
    Stdout(io::Stdout),
    File {
        temporary: tempfile::NamedTempFile,
        path: PathBuf,
        force: bool,
    },
}

impl Output {
    fn create(path: Option<&Path>, force: bool) -> Result<Self> {
        let Some(path) = path.filter(|path| *path != Path::new("-")) else {
            return Ok(Output::Stdout(io::stdout()));
        };
        if !force && path.exists() {
            bail!(
                "{} already exists; pass --force to replace it",
                path.display()
            );
        }
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        // NamedTempFile creates the file with mode 0600.
        let temporary = tempfile::Builder::new()
            .prefix(".callseal-")
            .suffix(".partial")
            .tempfile_in(directory)
            .with_context(|| format!("cannot create a file in {}", directory.display()))?;
        Ok(Output::File {
            temporary,
            path: path.to_owned(),
            force,
        })
    }

    fn writer(&self) -> Box<dyn Write + '_> {
        match self {
            Output::Stdout(stdout) => Box::new(BufWriter::with_capacity(1 << 20, stdout.lock())),
            Output::File { temporary, .. } => {
                Box::new(BufWriter::with_capacity(1 << 20, temporary.as_file()))
            }
        }
    }

    fn commit(self) -> Result<()> {
        let Output::File {
            temporary,
            path,
            force,
        } = self
        else {
            return Ok(());
        };
        temporary.as_file().sync_all()?;
        let persisted = if force {
            temporary.persist(&path)
        } else {
            temporary.persist_noclobber(&path)
        };
        persisted.map_err(|error| anyhow!("cannot write {}: {}", path.display(), error.error))?;
        Ok(())
    }
}

fn progress_bar(size: Option<u64>) -> ProgressBar {
    match size {
        Some(size) if size >= PROGRESS_THRESHOLD && io::stderr().is_terminal() => {
            let style = ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            ProgressBar::new(size).with_style(style)
        }
        _ => ProgressBar::hidden(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn decrypt_requires_an_expectation() {
        let result = Cli::try_parse_from(["callseal", "decrypt", "in.bin"]);
        assert!(result.is_err());
        let result = Cli::try_parse_from(["callseal", "decrypt", "--any-context", "in.bin"]);
        assert!(result.is_ok());
        let partial = Cli::try_parse_from(["callseal", "decrypt", "--practice", "p", "in.bin"]);
        assert!(
            partial.is_err(),
            "practice without call and artifact accepted"
        );
    }
}
