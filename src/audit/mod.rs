//! The tamper-evident audit log: one record per authorization decision and one per completed
//! access to call data, hash-chained and checkpointed with signatures.
//!
//! # Records
//!
//! A record is one line of JSON (see [`Record`] for the fields). It contains only ids, enums,
//! numbers and the client address. No field accepts free text from a request. Ids are validated
//! types from [`crate::ids`] or [`PrincipalName`] and [`RequestId`]. Actions, roles and outcomes
//! are enums, and a [`Reason`] is built from a `&'static str`. So phone numbers, transcript text,
//! media URLs and tokens cannot reach the audit log by construction.
//!
//! # The chain
//!
//! Records are numbered by `seq` from 1, without gaps, across all segments. Each record's `prev`
//! is the hex SHA-256 of the previous record's exact line bytes, without the final `\n`. The
//! first record's `prev` is [`ChainHash::GENESIS`] (64 zeros). A record stores no hash of itself:
//! the next record's `prev` commits to it, and a signed checkpoint commits to the last one. Any
//! change to a byte of a record therefore breaks the link to the next record, or the checkpoint.
//!
//! # Segments
//!
//! Records go to `audit-{YYYYMMDD}-{NNNNNN}.jsonl` files in the audit directory. `NNNNNN` counts
//! segments from 1 across the whole log (it is not reset each day), and the date is the UTC day of
//! every record in the file. A new segment starts when the UTC day changes or when the next record
//! would make the segment larger than [`Settings::max_segment_bytes`]. The first record of a
//! segment links to the last record of the segment before, like any other record. Record times
//! never decrease along the chain: if the clock steps back, the writer reuses the previous
//! record's time.
//!
//! # Durability and failure
//!
//! [`AuditLog::append`] returns only after the record's bytes are written and `fdatasync`ed. One
//! writer thread commits the records of all concurrent callers in groups: while one group is being
//! synced, the next one queues, so many concurrent requests share each sync. After each sync the
//! writer checks that the segment path still names the file it wrote (a removed directory or a
//! replaced file is an error, although writes to the open descriptor succeeded).
//!
//! The log fails closed. After the first write, sync or check error, that append and every later
//! one return an error, until the log is opened again. A failed `fsync` leaves the state of the
//! page cache unknown, so retrying in place could acknowledge records that are not on disk. The
//! caller responds with 503 and releases no PHI. The failure is logged once with `tracing::error!`.
//! Every failed append calls [`Settings::on_failure`] (for a metrics counter), and
//! [`AuditLog::is_failed`] reports the failed state to the readiness check. A record whose append failed may still appear in the log, because the failure
//! may come after its bytes reached the disk.
//!
//! # Checkpoints
//!
//! A checkpoint is a line in `checkpoints.jsonl` naming the chain head (segment, `seq`, SHA-256
//! of the last record's line, time) and signed with Ed25519 (see [`SigningKey`]). The key file
//! must be outside the audit directory, and verification needs only the public key. The writer
//! writes a checkpoint:
//!
//! - before appending a record when [`Settings::checkpoint_records`] records have no checkpoint;
//! - before appending a record whose time is [`Settings::checkpoint_interval`] or more after the
//!   oldest record without a checkpoint, and when the writer is idle that long;
//! - on open, when the previous run left records without a checkpoint;
//! - on [`AuditLog::checkpoint`] and [`AuditLog::close`].
//!
//! So after the last checkpoint there are at most `checkpoint_records` records, spanning less than
//! `checkpoint_interval`. [`verify`] reports an error when the chain ends before a checkpointed
//! record, and when the records after the last checkpoint break either limit.
//!
//! The residual window: anyone who can write the audit directory can remove the records written
//! after the last checkpoint without `verify` noticing. They can also remove the last checkpoints
//! together with the records they cover, because the checkpoints live in the same directory. The
//! writer logs every checkpoint (segment, `seq`, hash) with `tracing::info!`, so a log pipeline
//! keeps an independent copy of the chain heads. Storing segments and checkpoints on write-once
//! storage closes the window.
//!
//! # Torn last lines
//!
//! A crash during a write can leave the newest segment (or `checkpoints.jsonl`) ending in an
//! incomplete line. No caller was told that line was written, because the sync had not returned.
//! [`AuditLog::open`] moves those bytes to a quarantine file named after the segment and the byte
//! offset (`audit-20250102-000003.jsonl.torn-4096`), cuts them off the segment and continues the
//! chain from the last complete record. [`verify`] lists quarantine files in its report. Any other
//! damage (a complete last line that is not a valid record, a broken link in the newest segment)
//! makes `open` fail with the file and line, because it cannot come from a torn write.
//!
//! # Retention
//!
//! No code path deletes or rewrites audit records or segments. Quarantine only moves bytes of an
//! unacknowledged incomplete line into their own file. HIPAA requires keeping audit documentation
//! for at least 6 years, and that is an operator policy: ship closed segments and
//! `checkpoints.jsonl` to write-once storage (for example S3 Object Lock in compliance mode) and
//! keep them there for the retention period.
//!
//! # One writer per directory
//!
//! [`AuditLog::open`] holds an exclusive lock on `audit.lock` in the directory for the life of the
//! log, so two processes never extend the same chain. Replicas each write their own directory.

mod checkpoint;
pub mod cli;
mod clock;
mod files;
mod query;
mod record;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use checkpoint::{Checkpoint, KeyError, PublicKey, SigningKey, generate_key};
pub use clock::{Clock, ManualClock, SystemClock};
pub use query::{Filter, QueryError, query};
pub use record::{
    Access, Action, ByteRange, ChainHash, InvalidRecord, Kind, Outcome, PrincipalName, Reason,
    Record, RequestId, Role, TlsVersion,
};
pub use verify::{Location, VerifyError, VerifyReport, verify};
pub use writer::{
    AuditError, AuditLog, DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_CHECKPOINT_RECORDS,
    DEFAULT_MAX_SEGMENT_BYTES, FailureHook, Settings,
};

/// The file of signed checkpoints in the audit directory.
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";
