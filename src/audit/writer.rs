//! The audit writer: one thread that owns the chain head and commits records in groups.
//!
//! [`AuditLog`] is the handle request handlers share. Each [`AuditLog::append`] sends its record
//! to the writer thread and waits for the result. The thread takes every request that is waiting,
//! numbers and links the records in arrival order, writes them with one `write` and one
//! `fdatasync`, and then replies to all of them. Records that arrive during that sync form the next
//! group, so one sync serves many concurrent requests and no append returns before its record is
//! durable.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::CHECKPOINTS_FILE;
use super::checkpoint::{Checkpoint, KeyError, PublicKey, SigningKey};
use super::clock::{Clock, SystemClock};
use super::files::{self, FileIdentity, LOCK_FILE, Lines, SegmentName};
use super::record::{
    Access, ChainHash, InvalidRecord, Outcome, Record, check_outcome, truncate_to_millis,
};

/// Default [`Settings::max_segment_bytes`]: 64 MiB.
pub const DEFAULT_MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default [`Settings::checkpoint_records`].
pub const DEFAULT_CHECKPOINT_RECORDS: u64 = 1000;
/// Default [`Settings::checkpoint_interval`].
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// Maximum number of requests the writer takes into one group.
const MAX_GROUP: usize = 1024;

/// A function called once for every append that returns an error, such as a metrics counter.
pub type FailureHook = Arc<dyn Fn() + Send + Sync>;

/// Settings of segment rotation, checkpoints, the clock and failure counting.
///
/// # Defaults
///
/// Segments rotate at [`DEFAULT_MAX_SEGMENT_BYTES`]; a checkpoint is due after
/// [`DEFAULT_CHECKPOINT_RECORDS`] records or [`DEFAULT_CHECKPOINT_INTERVAL`]; the clock is the
/// system clock; no failure hook.
#[derive(Clone)]
pub struct Settings {
    /// The Ed25519 PKCS#8 key file that signs checkpoints; must be outside the audit directory.
    pub signing_key: PathBuf,
    /// A segment ends before the record that would make it larger than this many bytes. A record
    /// larger than this gets a segment of its own.
    pub max_segment_bytes: u64,
    /// Maximum number of records after the last checkpoint, at least 1.
    pub checkpoint_records: u64,
    /// Maximum time between the oldest record without a checkpoint and the next record, and the
    /// time after which an idle writer checkpoints. At least 1 ms; whole milliseconds count.
    pub checkpoint_interval: Duration,
    pub clock: Arc<dyn Clock>,
    pub on_failure: Option<FailureHook>,
}

impl Settings {
    /// Returns the default settings with the given signing key file.
    pub fn new(signing_key: impl Into<PathBuf>) -> Self {
        Settings {
            signing_key: signing_key.into(),
            max_segment_bytes: DEFAULT_MAX_SEGMENT_BYTES,
            checkpoint_records: DEFAULT_CHECKPOINT_RECORDS,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            clock: Arc::new(SystemClock),
            on_failure: None,
        }
    }

    fn check(&self) -> Result<(), AuditError> {
        if self.max_segment_bytes == 0 {
            return Err(AuditError::Settings("max_segment_bytes must be at least 1"));
        }
        if self.checkpoint_records == 0 {
            return Err(AuditError::Settings(
                "checkpoint_records must be at least 1",
            ));
        }
        if self.checkpoint_interval.as_millis() == 0 {
            return Err(AuditError::Settings(
                "checkpoint_interval must be at least 1 ms",
            ));
        }
        Ok(())
    }

    fn interval_ms(&self) -> u64 {
        u64::try_from(self.checkpoint_interval.as_millis()).unwrap_or(u64::MAX)
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("signing_key", &self.signing_key)
            .field("max_segment_bytes", &self.max_segment_bytes)
            .field("checkpoint_records", &self.checkpoint_records)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .finish_non_exhaustive()
    }
}

/// An error opening or writing the audit log. The HTTP layer responds 503 to any of them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log: cannot {operation} {}: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        source: Arc<io::Error>,
    },
    #[error("the audit log failed earlier and accepts no records until it is opened again")]
    Failed,
    #[error("the audit log is closed")]
    Closed,
    #[error(
        "audit directory {} is in use by another process (it holds {LOCK_FILE})",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error(transparent)]
    Key(Arc<KeyError>),
    #[error(
        "signing key {} is inside the audit directory {}; keep it elsewhere, so that someone who \
         can rewrite audit files cannot sign checkpoints",
        key.display(),
        dir.display()
    )]
    KeyInsideDirectory { key: PathBuf, dir: PathBuf },
    #[error("{place}: {detail}; run `callseal audit verify` on the directory before writing to it")]
    Damaged { place: String, detail: String },
    #[error(
        "the audit chain ends at seq {head} but {CHECKPOINTS_FILE} covers seq {checkpoint}: \
         records were removed; run `callseal audit verify` on the directory"
    )]
    ChainCut { head: u64, checkpoint: u64 },
    #[error("invalid audit record: {0}")]
    InvalidRecord(InvalidRecord),
    #[error("invalid audit settings: {0}")]
    Settings(&'static str),
}

/// The shared handle of an open audit log. See the module documentation of [`crate::audit`].
pub struct AuditLog {
    sender: mpsc::Sender<Request>,
    failed: Arc<AtomicBool>,
    on_failure: Option<FailureHook>,
    dir: PathBuf,
    public_key: PublicKey,
}

type AppendReply = oneshot::Sender<Result<u64, AuditError>>;
type DoneReply = oneshot::Sender<Result<(), AuditError>>;

enum Request {
    Append {
        access: Box<Access>,
        outcome: Outcome,
        reply: AppendReply,
    },
    Checkpoint {
        reply: DoneReply,
    },
    Close {
        reply: DoneReply,
    },
}

impl AuditLog {
    /// Opens or creates the audit log in `dir` and starts its writer thread.
    ///
    /// Creates `dir` (mode 0700) if needed, takes its lock, loads the signing key, quarantines a
    /// torn last line, checks the newest segment's chain and the last checkpoint, and writes a
    /// checkpoint when the previous run left records without one. Blocks on file I/O: call it at
    /// start-up or from a blocking task.
    pub fn open(dir: impl AsRef<Path>, settings: Settings) -> Result<AuditLog, AuditError> {
        let failed = Arc::new(AtomicBool::new(false));
        let on_failure = settings.on_failure.clone();
        let writer = Writer::open(dir.as_ref(), settings, failed.clone())?;
        let dir = writer.dir.clone();
        let public_key = writer.key.public_key();

        let (sender, receiver) = mpsc::channel();
        let panic_guard = PanicGuard(failed.clone());
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let _guard = panic_guard;
                writer.run(receiver)
            })
            .map_err(|source| io_error("start the writer thread for", &dir)(source))?;
        tracing::info!(dir = %dir.display(), key_id = %public_key.key_id(), "audit log opened");
        Ok(AuditLog {
            sender,
            failed,
            on_failure,
            dir,
            public_key,
        })
    }

    /// Appends one record and returns its `seq` once it is durable (written and `fdatasync`ed).
    ///
    /// An error means the record may not be durable: the request must fail without releasing
    /// call data. The record is sent on the first poll, and dropping the future after that does not
    /// withdraw it.
    pub async fn append(&self, access: &Access, outcome: Outcome) -> Result<u64, AuditError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Append {
            access: Box::new(access.clone()),
            outcome,
            reply,
        };
        let result = match self.sender.send(request) {
            Ok(()) => answer.await.unwrap_or(Err(AuditError::Closed)),
            Err(_) => Err(AuditError::Closed),
        };
        if result.is_err()
            && let Some(hook) = &self.on_failure
        {
            hook();
        }
        result
    }

    /// Writes a checkpoint of the current chain head now, unless the head already has one.
    pub async fn checkpoint(&self) -> Result<(), AuditError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request::Checkpoint { reply })
            .map_err(|_| AuditError::Closed)?;
        answer.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Writes a final checkpoint, stops the writer and releases the directory lock.
    ///
    /// Later appends return [`AuditError::Closed`]. Dropping the log without closing it also
    /// writes the final checkpoint, in the background, without waiting for it.
    pub async fn close(&self) -> Result<(), AuditError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request::Close { reply })
            .map_err(|_| AuditError::Closed)?;
        answer.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Returns whether a write failed, so that readiness can report the gateway unready.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Returns the audit directory, as an absolute path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the public key that verifies this log's checkpoints.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .field("failed", &self.is_failed())
            .finish_non_exhaustive()
    }
}

/// Marks the log failed if the writer thread panics, so that readiness reports it: the appends
/// waiting then return [`AuditError::Closed`], and no later append can succeed.
struct PanicGuard(Arc<AtomicBool>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// The segment records are appended to.
struct Segment {
    name: SegmentName,
    path: PathBuf,
    file: File,
    identity: FileIdentity,
    /// Bytes in the file, all of them synced.
    len: u64,
}

/// The last record of the chain.
struct Head {
    seq: u64,
    hash: ChainHash,
    time: Option<OffsetDateTime>,
    /// The segment that contains record `seq`.
    segment: Option<SegmentName>,
}

/// The records after the last checkpoint.
struct Tail {
    last_checkpoint_seq: u64,
    /// Time of the oldest record without a checkpoint.
    first_time: Option<OffsetDateTime>,
    /// When that record was appended, for the idle timer.
    started: Option<Instant>,
}

struct Writer {
    dir: PathBuf,
    key: SigningKey,
    settings: Settings,
    segment: Option<Segment>,
    next_number: u64,
    head: Head,
    tail: Tail,
    checkpoints: Option<(File, FileIdentity)>,
    /// Lines staged for the current group, each ending in `\n`.
    buffer: Vec<u8>,
    /// Appends whose lines are in `buffer`, with their `seq`.
    waiting: Vec<(AppendReply, u64)>,
    failure: Option<AuditError>,
    failed: Arc<AtomicBool>,
    /// Holds the directory lock until the writer is dropped.
    _lock: File,
}

impl Writer {
    fn open(dir: &Path, settings: Settings, failed: Arc<AtomicBool>) -> Result<Writer, AuditError> {
        settings.check()?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("create directory", dir))?;
        let dir = dir
            .canonicalize()
            .map_err(io_error("resolve directory", dir))?;
        let lock = lock_directory(&dir)?;

        let key =
            SigningKey::load(&settings.signing_key).map_err(|e| AuditError::Key(Arc::new(e)))?;
        let key_path = settings
            .signing_key
            .canonicalize()
            .map_err(io_error("resolve", &settings.signing_key))?;
        if key_path.starts_with(&dir) {
            return Err(AuditError::KeyInsideDirectory { key: key_path, dir });
        }

        let listing = files::list(&dir).map_err(io_error("list", &dir))?;
        if let Some(pair) = listing
            .segments
            .windows(2)
            .find(|pair| pair[0].number == pair[1].number)
        {
            return Err(AuditError::Damaged {
                place: dir.display().to_string(),
                detail: format!("segments {} and {} have the same number", pair[0], pair[1]),
            });
        }
        let (head, segment) = resume_chain(&dir, &listing.segments)?;
        let last_checkpoint_seq = check_last_checkpoint(&dir, &key, &head)?;
        let next_number = listing.segments.last().map_or(1, |last| last.number + 1);

        let mut writer = Writer {
            dir,
            key,
            settings,
            segment,
            next_number,
            head,
            tail: Tail {
                last_checkpoint_seq,
                first_time: None,
                started: None,
            },
            checkpoints: None,
            buffer: Vec::new(),
            waiting: Vec::new(),
            failure: None,
            failed,
            _lock: lock,
        };
        writer.checkpoint()?;
        Ok(writer)
    }

    fn run(self, receiver: Receiver<Request>) {
        if let Some((reply, result)) = self.serve(receiver) {
            // The writer, and with it the directory lock, is gone before the caller hears back.
            let _ = reply.send(result);
        }
    }

    /// Handles requests until a close request, which it returns with its result, or until every
    /// sender is gone.
    fn serve(mut self, receiver: Receiver<Request>) -> Option<(DoneReply, Result<(), AuditError>)> {
        loop {
            let first = match self.idle_timeout() {
                Some(timeout) => receiver.recv_timeout(timeout),
                None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            // A failed checkpoint has no caller to tell: `fail` has logged it and the next append
            // returns `Failed`.
            let first = match first {
                Ok(request) => request,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.checkpoint_or_fail();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.checkpoint_or_fail();
                    return None;
                }
            };

            let mut next = Some(first);
            let mut group_size = 0;
            while let Some(request) = next.take() {
                group_size += 1;
                if let Some(close) = self.handle(request) {
                    return Some(close);
                }
                if group_size < MAX_GROUP {
                    next = receiver.try_recv().ok();
                }
            }
            if let Err(error) = self.flush() {
                self.fail(error);
            }
        }
    }

    /// Handles one request; returns the reply and result of a close request.
    fn handle(&mut self, request: Request) -> Option<(DoneReply, Result<(), AuditError>)> {
        match request {
            Request::Append {
                access,
                outcome,
                reply,
            } => {
                self.append(*access, outcome, reply);
                None
            }
            Request::Checkpoint { reply } => {
                let _ = reply.send(self.checkpoint_or_fail());
                None
            }
            Request::Close { reply } => {
                let result = self.checkpoint_or_fail();
                Some((reply, result))
            }
        }
    }

    fn append(&mut self, access: Access, outcome: Outcome, reply: AppendReply) {
        if self.failure.is_some() {
            let _ = reply.send(Err(AuditError::Failed));
            return;
        }
        if let Err(invalid) = check_access(&access).and_then(|()| check_outcome(&outcome)) {
            let _ = reply.send(Err(AuditError::InvalidRecord(invalid)));
            return;
        }
        match self.stage(access, outcome) {
            Ok(seq) => self.waiting.push((reply, seq)),
            Err(error) => {
                self.waiting.push((reply, 0));
                self.fail(error);
            }
        }
    }

    /// Numbers, links and buffers one record, first writing a checkpoint or starting a segment
    /// when one is due.
    fn stage(&mut self, access: Access, outcome: Outcome) -> Result<u64, AuditError> {
        let time = self.stamp();
        if self.checkpoint_due(time) {
            self.checkpoint()?;
        }

        let seq = self.head.seq + 1;
        let record = Record {
            time,
            access,
            outcome,
            seq,
            prev: self.head.hash,
        };
        let line = record.to_line();
        let line_len = line.len() as u64 + 1;
        if self.needs_new_segment(time, line_len) {
            self.flush()?;
            self.start_segment(time)?;
        }

        self.head = Head {
            seq,
            hash: ChainHash::of_line(&line),
            time: Some(time),
            segment: self.segment.as_ref().map(|segment| segment.name),
        };
        self.buffer.extend_from_slice(&line);
        self.buffer.push(b'\n');
        if self.tail.first_time.is_none() {
            self.tail.first_time = Some(time);
            self.tail.started = Some(Instant::now());
        }
        Ok(seq)
    }

    /// Returns the clock's time in milliseconds, never earlier than the last record's.
    fn stamp(&self) -> OffsetDateTime {
        let now = truncate_to_millis(self.settings.clock.now());
        match self.head.time {
            Some(last) if now < last => last,
            _ => now,
        }
    }

    fn tail_records(&self) -> u64 {
        self.head.seq - self.tail.last_checkpoint_seq
    }

    /// Whether a checkpoint must come before a record stamped `time`.
    fn checkpoint_due(&self, time: OffsetDateTime) -> bool {
        if self.tail_records() == 0 {
            return false;
        }
        if self.tail_records() >= self.settings.checkpoint_records {
            return true;
        }
        let Some(first) = self.tail.first_time else {
            // Records left by an earlier run: open checkpoints them, so this is not reached.
            return true;
        };
        (time - first).whole_milliseconds() >= i128::from(self.settings.interval_ms())
    }

    fn needs_new_segment(&self, time: OffsetDateTime, line_len: u64) -> bool {
        let Some(segment) = &self.segment else {
            return true;
        };
        if segment.name.date != time.date() {
            return true;
        }
        let size = segment.len + self.buffer.len() as u64;
        size > 0 && size + line_len > self.settings.max_segment_bytes
    }

    fn start_segment(&mut self, time: OffsetDateTime) -> Result<(), AuditError> {
        let name = SegmentName {
            date: time.date(),
            number: self.next_number,
        };
        let path = self.dir.join(name.to_string());
        let file = files::create_new(&path).map_err(io_error("create segment", &path))?;
        files::sync_dir(&self.dir).map_err(io_error("sync directory", &self.dir))?;
        let identity = FileIdentity::of(&file).map_err(io_error("inspect", &path))?;

        self.next_number += 1;
        self.segment = Some(Segment {
            name,
            path,
            file,
            identity,
            len: 0,
        });
        Ok(())
    }

    /// Writes and syncs the staged lines, then replies to their appends.
    fn flush(&mut self) -> Result<(), AuditError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let Some(segment) = self.segment.as_mut() else {
            return Err(AuditError::Failed);
        };
        files::write_durably(
            &mut segment.file,
            segment.identity,
            &segment.path,
            &self.buffer,
        )
        .map_err(io_error("write segment", &segment.path))?;

        segment.len += self.buffer.len() as u64;
        self.buffer.clear();
        for (reply, seq) in self.waiting.drain(..) {
            let _ = reply.send(Ok(seq));
        }
        Ok(())
    }

    /// Flushes staged records and writes a signed checkpoint of the head, unless the head has one.
    fn checkpoint(&mut self) -> Result<(), AuditError> {
        self.flush()?;
        if self.tail_records() == 0 {
            return Ok(());
        }
        let Some(segment) = self.head.segment else {
            return Err(AuditError::Failed);
        };

        let mut checkpoint = Checkpoint {
            time: truncate_to_millis(self.settings.clock.now()),
            segment: segment.to_string(),
            seq: self.head.seq,
            hash: self.head.hash,
            interval_records: self.settings.checkpoint_records,
            interval_ms: self.settings.interval_ms(),
            key: String::new(),
            signature: String::new(),
        };
        self.key.sign(&mut checkpoint);
        let mut line = checkpoint.to_line();
        line.push(b'\n');

        let path = self.dir.join(CHECKPOINTS_FILE);
        let (file, identity) = match &mut self.checkpoints {
            Some(open) => open,
            None => self.checkpoints.insert(open_checkpoints(&self.dir, &path)?),
        };
        files::write_durably(file, *identity, &path, &line)
            .map_err(io_error("write checkpoint", &path))?;

        self.tail = Tail {
            last_checkpoint_seq: checkpoint.seq,
            first_time: None,
            started: None,
        };
        tracing::info!(
            segment = %checkpoint.segment,
            seq = checkpoint.seq,
            hash = %checkpoint.hash,
            "audit checkpoint written"
        );
        Ok(())
    }

    /// Checkpoints, turning an error into the log's failure; returns `Failed` once failed.
    fn checkpoint_or_fail(&mut self) -> Result<(), AuditError> {
        if self.failure.is_some() {
            return Err(AuditError::Failed);
        }
        self.checkpoint()
            .inspect_err(|error| self.fail(error.clone()))
    }

    /// Returns how long the writer may wait for a request before an idle checkpoint is due.
    fn idle_timeout(&self) -> Option<Duration> {
        if self.failure.is_some() || self.tail_records() == 0 {
            return None;
        }
        let elapsed = self
            .tail
            .started
            .map_or(Duration::MAX, |started| started.elapsed());
        Some(self.settings.checkpoint_interval.saturating_sub(elapsed))
    }

    /// Fails every waiting append with `error` and refuses all later ones.
    fn fail(&mut self, error: AuditError) {
        tracing::error!(
            error = %error,
            "audit log write failed; it accepts no records until it is opened again"
        );
        self.failed.store(true, Ordering::Relaxed);
        for (reply, _) in self.waiting.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        self.buffer.clear();
        self.failure = Some(error);
    }
}

/// Checks the parts of an access that types cannot: a byte range's order.
fn check_access(access: &Access) -> Result<(), InvalidRecord> {
    match access.range {
        Some(range) if range.first > range.last => Err(InvalidRecord::Range),
        _ => Ok(()),
    }
}

fn io_error<'a>(operation: &'static str, path: &'a Path) -> impl Fn(io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        operation,
        path: path.to_owned(),
        source: Arc::new(source),
    }
}

fn lock_directory(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join(LOCK_FILE);
    let lock = files::open_append(&path).map_err(io_error("open lock file", &path))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(AuditError::Locked {
            path: dir.to_owned(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(io_error("lock", &path)(source)),
    }
}

fn open_checkpoints(dir: &Path, path: &Path) -> Result<(File, FileIdentity), AuditError> {
    let existed = path.exists();
    let file = files::open_append(path).map_err(io_error("open", path))?;
    if !existed {
        files::sync_dir(dir).map_err(io_error("sync directory", dir))?;
    }
    let identity = FileIdentity::of(&file).map_err(io_error("inspect", path))?;
    Ok((file, identity))
}

/// Finds the chain head from the newest segments and reopens the newest one for appending.
///
/// Quarantines an incomplete last line of the newest segment, then checks every record in it.
/// Each record must parse, count `seq` up by one and link `prev` to the record before. The first
/// one links to the last record of the nearest earlier segment that has records.
fn resume_chain(
    dir: &Path,
    segments: &[SegmentName],
) -> Result<(Head, Option<Segment>), AuditError> {
    let mut head = Head {
        seq: 0,
        hash: ChainHash::GENESIS,
        time: None,
        segment: None,
    };
    let Some((newest, earlier)) = segments.split_last() else {
        return Ok((head, None));
    };
    let newest_name = newest.to_string();
    files::quarantine_torn_tail(dir, &newest_name).map_err(io_error(
        "quarantine the last line of",
        &dir.join(&newest_name),
    ))?;

    for segment in earlier.iter().rev() {
        let path = dir.join(segment.to_string());
        let Some(line) = files::read_last_line(&path).map_err(io_error("read", &path))? else {
            continue;
        };
        let record = parse_record(&line, || format!("{segment} (last line)"))?;
        head = Head {
            seq: record.seq,
            hash: ChainHash::of_line(&line),
            time: Some(record.time),
            segment: Some(*segment),
        };
        break;
    }

    let path = dir.join(&newest_name);
    let mut lines = Lines::open(&path).map_err(io_error("open", &path))?;
    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(files::LineError::Io(source)) => return Err(io_error("read", &path)(source)),
            Err(files::LineError::TooLong(number)) => {
                return Err(damaged(
                    &newest_name,
                    number,
                    "line longer than the maximum",
                ));
            }
        };
        let number = line.number;
        let record = parse_record(line.bytes, || format!("{newest_name} line {number}"))?;
        if record.seq != head.seq + 1 {
            let detail = format!("expected seq {}, found {}", head.seq + 1, record.seq);
            return Err(damaged(&newest_name, number, &detail));
        }
        if record.prev != head.hash {
            let detail = "`prev` does not match the hash of the previous record";
            return Err(damaged(&newest_name, number, detail));
        }
        head = Head {
            seq: record.seq,
            hash: ChainHash::of_line(line.bytes),
            time: Some(record.time),
            segment: Some(*newest),
        };
    }

    let file = files::open_append(&path).map_err(io_error("open", &path))?;
    let identity = FileIdentity::of(&file).map_err(io_error("inspect", &path))?;
    let len = file.metadata().map_err(io_error("inspect", &path))?.len();
    let segment = Segment {
        name: *newest,
        path,
        file,
        identity,
        len,
    };
    Ok((head, Some(segment)))
}

fn parse_record(line: &[u8], place: impl Fn() -> String) -> Result<Record, AuditError> {
    serde_json::from_slice(line).map_err(|error| AuditError::Damaged {
        place: place(),
        detail: format!("not a valid audit record: {error}"),
    })
}

fn damaged(file: &str, line: u64, detail: &str) -> AuditError {
    AuditError::Damaged {
        place: format!("{file} line {line}"),
        detail: detail.to_owned(),
    }
}

/// Reads the last checkpoint and checks it against the chain head; returns its `seq`.
///
/// A checkpoint signed with this writer's key must not cover more records than the chain has, and
/// one at the head must match it. A checkpoint signed with another key (before a key change) is
/// not trusted here: the writer then treats every record as lacking a checkpoint.
fn check_last_checkpoint(dir: &Path, key: &SigningKey, head: &Head) -> Result<u64, AuditError> {
    let path = dir.join(CHECKPOINTS_FILE);
    if !path.exists() {
        return Ok(0);
    }
    files::quarantine_torn_tail(dir, CHECKPOINTS_FILE)
        .map_err(io_error("quarantine the last line of", &path))?;
    let Some(line) = files::read_last_line(&path).map_err(io_error("read", &path))? else {
        return Ok(0);
    };
    let place = || format!("{CHECKPOINTS_FILE} (last line)");
    let checkpoint: Checkpoint =
        serde_json::from_slice(&line).map_err(|error| AuditError::Damaged {
            place: place(),
            detail: format!("not a valid checkpoint: {error}"),
        })?;

    let public_key = key.public_key();
    if checkpoint.key != public_key.key_id() {
        tracing::warn!(
            key_id = %checkpoint.key,
            "the last audit checkpoint is signed by another key; writing a new checkpoint of the \
             whole chain"
        );
        return Ok(0);
    }
    if checkpoint.check_fields().is_err() || !public_key.verifies(&checkpoint) {
        return Err(AuditError::Damaged {
            place: place(),
            detail: "the checkpoint's signature is invalid".into(),
        });
    }
    if checkpoint.seq > head.seq {
        return Err(AuditError::ChainCut {
            head: head.seq,
            checkpoint: checkpoint.seq,
        });
    }
    if checkpoint.seq == head.seq && checkpoint.hash != head.hash {
        return Err(AuditError::Damaged {
            place: place(),
            detail: format!(
                "the checkpoint of seq {} does not match that record",
                head.seq
            ),
        });
    }
    Ok(checkpoint.seq)
}
