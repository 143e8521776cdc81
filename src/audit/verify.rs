//! Verification of a whole audit directory: every record, link, segment and checkpoint.
//!
//! [`verify`] stops at the first problem and names its file and line. Checks, in order:
//!
//! 1. Every checkpoint parses and is signed by one of the given public keys. No checkpoint has a
//!    lower `seq` than the one before it.
//! 2. Segments are numbered 1, 2, 3, … without gaps, and their dates never decrease.
//! 3. Every line of every segment is complete and a valid record. `seq` counts up by one from 1,
//!    and `prev` is the SHA-256 of the previous record's line ([`ChainHash::GENESIS`] for the
//!    first). Times never decrease and fall on the segment's date.
//! 4. Each checkpointed record has the checkpoint's hash and is in the checkpoint's segment.
//! 5. The chain reaches the highest checkpointed `seq`.
//! 6. The records after the last checkpoint are no more, and span no longer, than the writer's
//!    checkpoint settings (stored in the last checkpoint) allow.
//!
//! Records after the last checkpoint can still be removed without any of these checks failing:
//! see the residual window in the documentation of [`crate::audit`].

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::CHECKPOINTS_FILE;
use super::checkpoint::{Checkpoint, PublicKey};
use super::files::{self, LineError, Lines, MAX_LINE_BYTES, SegmentName};
use super::record::{ChainHash, Record, format_time};
use super::writer::{DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_CHECKPOINT_RECORDS};

/// The counts of a successful verification.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub checkpoints: usize,
    /// The `seq` of the last checkpoint, if there is one.
    pub last_checkpoint_seq: Option<u64>,
    /// Records after the last checkpoint: these could have been removed without detection.
    pub records_after_last_checkpoint: u64,
    /// Quarantine files of torn last lines, by name.
    pub quarantined: Vec<String>,
}

/// A line in a file of the audit directory.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Location {
    pub file: String,
    /// 1-based line number.
    pub line: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} line {}", self.file, self.line)
    }
}

/// The first problem [`verify`] found.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no public key given, so checkpoints cannot be verified")]
    NoPublicKey,
    #[error("segment number {expected:06} is missing: the next segment found is {found}")]
    MissingSegment { expected: u64, found: String },
    #[error("segment {found} is dated before {previous}, which comes before it")]
    SegmentOrder { found: String, previous: String },
    #[error("{at}: line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong { at: Location },
    #[error("{at}: incomplete last line (a torn write, which opening the log quarantines)")]
    IncompleteLine { at: Location },
    #[error("{at}: not a valid record: {detail}")]
    InvalidRecord { at: Location, detail: String },
    #[error(
        "{at}: expected seq {expected}, found {found}: records are missing, reordered or duplicated"
    )]
    Sequence {
        at: Location,
        expected: u64,
        found: u64,
    },
    #[error("{at}: `prev` does not match the SHA-256 of {}: one of the two records was changed",
        previous.as_ref().map_or_else(|| "the chain's start".to_owned(), |p| p.to_string()))]
    BrokenLink {
        at: Location,
        /// The record `prev` should hash, or `None` for the first record of the chain.
        previous: Option<Location>,
    },
    #[error("{at}: record time is earlier than the previous record's")]
    TimeOrder { at: Location },
    #[error("{at}: record time {time} is not on the segment's date")]
    WrongDate { at: Location, time: String },
    #[error("{at}: not a valid checkpoint: {detail}")]
    InvalidCheckpoint { at: Location, detail: String },
    #[error("{at}: checkpoint signed by key id {key_id}, which none of the given public keys has")]
    UnknownKey { at: Location, key_id: String },
    #[error("{at}: invalid checkpoint signature")]
    BadSignature { at: Location },
    #[error("{at}: checkpoint seq {seq} is lower than seq {previous} of the checkpoint before it")]
    CheckpointOrder {
        at: Location,
        seq: u64,
        previous: u64,
    },
    #[error("{at}: record seq {seq} does not match the checkpoint at {checkpoint}: {detail}")]
    CheckpointMismatch {
        at: Location,
        checkpoint: Location,
        seq: u64,
        detail: &'static str,
    },
    #[error("the chain ends at seq {head}{} but the checkpoint at {checkpoint} covers seq {seq}: \
             records were removed from the end",
        last.as_ref().map_or_else(String::new, |last| format!(" ({last})")))]
    ChainCut {
        head: u64,
        last: Option<Location>,
        checkpoint: Location,
        seq: u64,
    },
    #[error(
        "{records} records follow the last checkpoint, more than the {limit} the writer \
             allows: a checkpoint is missing"
    )]
    TooManyAfterCheckpoint { records: u64, limit: u64 },
    #[error(
        "the records after the last checkpoint, {first} to {last}, span {span_ms} ms, but the \
         writer checkpoints before they span {limit_ms} ms: a checkpoint is missing"
    )]
    TailTooOld {
        first: Location,
        last: Location,
        span_ms: i128,
        limit_ms: u64,
    },
}

/// Verifies the audit log in `dir`; see the module documentation for the checks.
///
/// `public_keys` must contain the key of every checkpoint (several after a key change).
pub fn verify(dir: &Path, public_keys: &[PublicKey]) -> Result<VerifyReport, VerifyError> {
    if public_keys.is_empty() {
        return Err(VerifyError::NoPublicKey);
    }
    let listing = files::list(dir).map_err(io_error(dir))?;
    let checkpoints = read_checkpoints(dir, public_keys)?;
    let last_checkpoint = checkpoints.last().map(|(_, checkpoint)| checkpoint);
    let mut chain = Chain {
        checkpoints_at: BTreeMap::new(),
        tail_start: last_checkpoint.map_or(1, |checkpoint| checkpoint.seq + 1),
        seq: 0,
        hash: ChainHash::GENESIS,
        time: None,
        last: None,
        tail_first: None,
    };
    for (index, (_, checkpoint)) in checkpoints.iter().enumerate() {
        chain
            .checkpoints_at
            .entry(checkpoint.seq)
            .or_default()
            .push(index);
    }

    let mut previous: Option<SegmentName> = None;
    for (index, segment) in listing.segments.iter().enumerate() {
        let expected = index as u64 + 1;
        if segment.number != expected {
            return Err(VerifyError::MissingSegment {
                expected,
                found: segment.to_string(),
            });
        }
        if let Some(previous) = previous
            && segment.date < previous.date
        {
            return Err(VerifyError::SegmentOrder {
                found: segment.to_string(),
                previous: previous.to_string(),
            });
        }
        chain.scan(dir, segment, &checkpoints)?;
        previous = Some(*segment);
    }

    if let Some((at, checkpoint)) = checkpoints.iter().find(|(_, c)| c.seq > chain.seq) {
        return Err(VerifyError::ChainCut {
            head: chain.seq,
            last: chain.last.clone(),
            checkpoint: at.clone(),
            seq: checkpoint.seq,
        });
    }
    let after = chain.seq - last_checkpoint.map_or(0, |checkpoint| checkpoint.seq);
    check_tail(&chain, last_checkpoint, after)?;

    Ok(VerifyReport {
        segments: listing.segments.len(),
        records: chain.seq,
        checkpoints: checkpoints.len(),
        last_checkpoint_seq: last_checkpoint.map(|checkpoint| checkpoint.seq),
        records_after_last_checkpoint: after,
        quarantined: listing.quarantined,
    })
}

/// Checks the records after the last checkpoint against the writer's checkpoint settings.
fn check_tail(
    chain: &Chain,
    last_checkpoint: Option<&Checkpoint>,
    after: u64,
) -> Result<(), VerifyError> {
    let (limit, limit_ms) = match last_checkpoint {
        Some(checkpoint) => (checkpoint.interval_records, checkpoint.interval_ms),
        None => (
            DEFAULT_CHECKPOINT_RECORDS,
            DEFAULT_CHECKPOINT_INTERVAL.as_millis() as u64,
        ),
    };
    if after > limit {
        return Err(VerifyError::TooManyAfterCheckpoint {
            records: after,
            limit,
        });
    }
    if let (Some((first, first_time)), Some(last), Some(last_time)) =
        (&chain.tail_first, &chain.last, chain.time)
    {
        let span_ms = (last_time - *first_time).whole_milliseconds();
        if span_ms >= i128::from(limit_ms) {
            return Err(VerifyError::TailTooOld {
                first: first.clone(),
                last: last.clone(),
                span_ms,
                limit_ms,
            });
        }
    }
    Ok(())
}

/// The chain as verified so far.
struct Chain {
    /// Indexes into the checkpoint list, by the `seq` they cover.
    checkpoints_at: BTreeMap<u64, Vec<usize>>,
    /// The first `seq` after the last checkpoint.
    tail_start: u64,
    seq: u64,
    hash: ChainHash,
    time: Option<OffsetDateTime>,
    /// The location of record `seq`.
    last: Option<Location>,
    /// The location and time of record `tail_start`.
    tail_first: Option<(Location, OffsetDateTime)>,
}

impl Chain {
    fn scan(
        &mut self,
        dir: &Path,
        segment: &SegmentName,
        checkpoints: &[(Location, Checkpoint)],
    ) -> Result<(), VerifyError> {
        let name = segment.to_string();
        let path = dir.join(&name);
        let mut lines = Lines::open(&path).map_err(io_error(&path))?;
        loop {
            let line = match lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(()),
                Err(LineError::Io(source)) => return Err(io_error(&path)(source)),
                Err(LineError::TooLong(line)) => {
                    let at = Location { file: name, line };
                    return Err(VerifyError::LineTooLong { at });
                }
            };
            let at = Location {
                file: name.clone(),
                line: line.number,
            };
            if !line.complete {
                return Err(VerifyError::IncompleteLine { at });
            }
            let record: Record =
                serde_json::from_slice(line.bytes).map_err(|error| VerifyError::InvalidRecord {
                    at: at.clone(),
                    detail: error.to_string(),
                })?;
            let hash = ChainHash::of_line(line.bytes);
            self.check_record(&record, hash, segment, &at, checkpoints)?;

            if record.seq == self.tail_start {
                self.tail_first = Some((at.clone(), record.time));
            }
            self.seq = record.seq;
            self.hash = hash;
            self.time = Some(record.time);
            self.last = Some(at);
        }
    }

    fn check_record(
        &self,
        record: &Record,
        hash: ChainHash,
        segment: &SegmentName,
        at: &Location,
        checkpoints: &[(Location, Checkpoint)],
    ) -> Result<(), VerifyError> {
        if record.seq != self.seq + 1 {
            return Err(VerifyError::Sequence {
                at: at.clone(),
                expected: self.seq + 1,
                found: record.seq,
            });
        }
        if record.prev != self.hash {
            return Err(VerifyError::BrokenLink {
                at: at.clone(),
                previous: self.last.clone(),
            });
        }
        if self.time.is_some_and(|previous| record.time < previous) {
            return Err(VerifyError::TimeOrder { at: at.clone() });
        }
        if record.time.date() != segment.date {
            return Err(VerifyError::WrongDate {
                at: at.clone(),
                time: format_time(record.time),
            });
        }

        for &index in self.checkpoints_at.get(&record.seq).into_iter().flatten() {
            let (checkpoint_at, checkpoint) = &checkpoints[index];
            let detail = if checkpoint.hash != hash {
                "the record's hash differs, so the record was changed"
            } else if checkpoint.segment != at.file {
                "the checkpoint names another segment"
            } else {
                continue;
            };
            return Err(VerifyError::CheckpointMismatch {
                at: at.clone(),
                checkpoint: checkpoint_at.clone(),
                seq: record.seq,
                detail,
            });
        }
        Ok(())
    }
}

/// Reads `checkpoints.jsonl` and checks each checkpoint's fields, key, signature and order.
fn read_checkpoints(
    dir: &Path,
    public_keys: &[PublicKey],
) -> Result<Vec<(Location, Checkpoint)>, VerifyError> {
    let path = dir.join(CHECKPOINTS_FILE);
    let mut lines = match Lines::open(&path) {
        Ok(lines) => lines,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(&path)(error)),
    };
    let location = |line| Location {
        file: CHECKPOINTS_FILE.to_owned(),
        line,
    };

    let mut checkpoints: Vec<(Location, Checkpoint)> = Vec::new();
    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(checkpoints),
            Err(LineError::Io(source)) => return Err(io_error(&path)(source)),
            Err(LineError::TooLong(line)) => {
                return Err(VerifyError::LineTooLong { at: location(line) });
            }
        };
        let at = location(line.number);
        if !line.complete {
            return Err(VerifyError::IncompleteLine { at });
        }
        let checkpoint: Checkpoint = match serde_json::from_slice(line.bytes) {
            Ok(checkpoint) => checkpoint,
            Err(error) => {
                let detail = error.to_string();
                return Err(VerifyError::InvalidCheckpoint { at, detail });
            }
        };
        if let Err(detail) = checkpoint.check_fields() {
            let detail = detail.to_owned();
            return Err(VerifyError::InvalidCheckpoint { at, detail });
        }
        let Some(key) = public_keys
            .iter()
            .find(|key| key.key_id() == checkpoint.key)
        else {
            let key_id = checkpoint.key;
            return Err(VerifyError::UnknownKey { at, key_id });
        };
        if !key.verifies(&checkpoint) {
            return Err(VerifyError::BadSignature { at });
        }
        if let Some((_, previous)) = checkpoints.last()
            && checkpoint.seq < previous.seq
        {
            return Err(VerifyError::CheckpointOrder {
                at,
                seq: checkpoint.seq,
                previous: previous.seq,
            });
        }
        checkpoints.push((at, checkpoint));
    }
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.to_owned(),
        source,
    }
}
