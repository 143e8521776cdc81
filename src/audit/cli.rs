//! The `callseal audit` commands: `verify`, `query` and `keygen`.
//!
//! Each command is a function that writes its output to a writer, so tests can read it; [`run`]
//! sends it to standard output. Failures return an error, which `callseal` prints on standard
//! error with a non-zero exit status.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::checkpoint::{PublicKey, generate_key};
use super::query::{Filter, query};
use super::record::{PrincipalName, Record, format_time};
use super::verify::verify;
use crate::ids::{CallId, PracticeId};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every record, chain link and signed checkpoint of an audit directory.
    Verify(VerifyArgs),
    /// Print one practice's audit records as a table, or as JSON lines with --json.
    Query(QueryArgs),
    /// Create an Ed25519 key for signing checkpoints (file mode 0600) and print its public key.
    Keygen(KeygenArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The audit directory.
    #[arg(
        value_name = "DIR",
        env = "CALLSEAL_AUDIT_DIR",
        default_value = "audit"
    )]
    pub dir: PathBuf,
    /// Public key of the checkpoint signing key: 64 hex digits, or a file containing them.
    /// Repeat it to accept checkpoints signed before a key change.
    #[arg(long = "public-key", value_name = "HEX|FILE", required = true)]
    pub public_keys: Vec<String>,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The audit directory.
    #[arg(
        long,
        value_name = "DIR",
        env = "CALLSEAL_AUDIT_DIR",
        default_value = "audit"
    )]
    pub dir: PathBuf,
    /// Practice whose records to print.
    #[arg(long, value_name = "ID")]
    pub practice: PracticeId,
    /// Print only records of this call.
    #[arg(long, value_name = "ID")]
    pub call: Option<CallId>,
    /// Print only records of this principal.
    #[arg(long, value_name = "NAME")]
    pub principal: Option<PrincipalName>,
    /// Earliest record time, inclusive, in RFC 3339 (2025-01-02T00:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time_arg)]
    pub since: Option<OffsetDateTime>,
    /// Latest record time, exclusive, in RFC 3339.
    #[arg(long, value_name = "TIME", value_parser = parse_time_arg)]
    pub until: Option<OffsetDateTime>,
    /// Print at most this many records, the oldest first.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print one JSON record per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Key file to create; it must not exist. Keep it outside the audit directory.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
}

/// Runs an audit command with its output on standard output.
pub fn run(command: AuditCommand) -> Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match command {
        AuditCommand::Verify(args) => verify_command(&args, &mut out),
        AuditCommand::Query(args) => query_command(&args, &mut out),
        AuditCommand::Keygen(args) => keygen_command(&args, &mut out),
    }
}

/// Verifies an audit directory and prints the counts, or returns the first problem as the error.
pub fn verify_command(args: &VerifyArgs, out: &mut dyn Write) -> Result<()> {
    let keys = args
        .public_keys
        .iter()
        .map(|arg| PublicKey::from_arg(arg))
        .collect::<Result<Vec<_>, _>>()?;
    let report = verify(&args.dir, &keys)
        .map_err(|error| anyhow!("audit log verification failed: {error}"))?;

    writeln!(
        out,
        "OK: {} in {}, {}",
        count(report.records, "record"),
        count(report.segments as u64, "segment"),
        count(report.checkpoints as u64, "checkpoint"),
    )?;
    if report.records_after_last_checkpoint > 0 {
        writeln!(
            out,
            "records after the last checkpoint, which could be removed unnoticed: {}",
            report.records_after_last_checkpoint
        )?;
    }
    for name in &report.quarantined {
        writeln!(out, "quarantined torn line: {name}")?;
    }
    Ok(())
}

/// Prints the records that match the arguments, as a table or as JSON lines.
pub fn query_command(args: &QueryArgs, out: &mut dyn Write) -> Result<()> {
    let filter = Filter {
        practice: args.practice.clone(),
        call: args.call.clone(),
        principal: args.principal.clone(),
        since: args.since,
        until: args.until,
        limit: args.limit,
    };
    let records = query(&args.dir, &filter)
        .with_context(|| format!("cannot query the audit log in {}", args.dir.display()))?;

    if args.json {
        for record in &records {
            out.write_all(&record.to_line())?;
            out.write_all(b"\n")?;
        }
    } else {
        write_table(&records, out)?;
    }
    Ok(())
}

/// Creates a checkpoint signing key and prints its public key in hex.
pub fn keygen_command(args: &KeygenArgs, out: &mut dyn Write) -> Result<()> {
    let public_key = generate_key(&args.key)?;
    writeln!(out, "{public_key}")?;
    eprintln!(
        "created checkpoint signing key {} (key id {}); the line above is its public key, which \
         `callseal audit verify --public-key` takes",
        args.key.display(),
        public_key.key_id()
    );
    Ok(())
}

const COLUMNS: [&str; 9] = [
    "time",
    "principal",
    "role",
    "action",
    "call",
    "artifact",
    "outcome",
    "status",
    "bytes",
];

fn write_table(records: &[Record], out: &mut dyn Write) -> io::Result<()> {
    let rows: Vec<[String; 9]> = records.iter().map(table_row).collect();
    let mut widths = COLUMNS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }

    let header = COLUMNS.map(str::to_owned);
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

fn table_row(record: &Record) -> [String; 9] {
    let access = &record.access;
    let text = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    [
        format_time(record.time),
        text(access.principal.as_ref().map(ToString::to_string)),
        text(access.role.map(|role| role.as_str().to_owned())),
        access.action.as_str().to_owned(),
        text(access.call.as_ref().map(ToString::to_string)),
        text(access.artifact.as_ref().map(ToString::to_string)),
        record.outcome.as_str().to_owned(),
        text(record.outcome.status().map(|status| status.to_string())),
        text(record.outcome.bytes().map(|bytes| bytes.to_string())),
    ]
}

/// Formats `number` with `noun`, adding `s` unless the number is 1.
fn count(number: u64, noun: &str) -> String {
    let suffix = if number == 1 { "" } else { "s" };
    format!("{number} {noun}{suffix}")
}

fn parse_time_arg(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(|time| time.to_offset(time::UtcOffset::UTC))
        .map_err(|error| format!("invalid RFC 3339 time: {error}"))
}
