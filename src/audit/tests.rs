//! Tests of the audit log against real files: writing, rotation, failure, tampering and queries.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use tempfile::TempDir;
use time::OffsetDateTime;
use time::macros::datetime;

use super::cli::{AuditCommand, KeygenArgs};
use super::*;
use crate::ids::{ArtifactName, CallId, PracticeId};

const START: OffsetDateTime = datetime!(2025-01-02 10:00:00 UTC);

/// A signing key outside the audit directory, an audit directory not yet created, and a clock.
struct Fixture {
    _key_dir: TempDir,
    root: TempDir,
    key_path: PathBuf,
    public_key: PublicKey,
    clock: Arc<ManualClock>,
}

impl Fixture {
    fn new() -> Self {
        let key_dir = tempfile::tempdir().unwrap();
        let key_path = key_dir.path().join("checkpoint.key");
        let public_key = generate_key(&key_path).unwrap();
        Fixture {
            _key_dir: key_dir,
            root: tempfile::tempdir().unwrap(),
            key_path,
            public_key,
            clock: Arc::new(ManualClock::new(START)),
        }
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("audit")
    }

    fn settings(&self) -> Settings {
        let mut settings = Settings::new(&self.key_path);
        settings.clock = self.clock.clone();
        settings
    }

    fn open(&self) -> AuditLog {
        AuditLog::open(self.dir(), self.settings()).unwrap()
    }

    fn verify(&self) -> Result<VerifyReport, VerifyError> {
        verify(&self.dir(), &[self.public_key])
    }

    /// Segment file names in order.
    fn segments(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("audit-") && name.ends_with(".jsonl"))
            .collect();
        names.sort();
        names
    }

    fn lines(&self, name: &str) -> Vec<String> {
        let text = fs::read_to_string(self.dir().join(name)).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    fn write_lines(&self, name: &str, lines: &[String]) {
        let mut text = lines.join("\n");
        if !lines.is_empty() {
            text.push('\n');
        }
        fs::write(self.dir().join(name), text).unwrap();
    }

    fn checkpoint_seqs(&self) -> Vec<u64> {
        self.lines(CHECKPOINTS_FILE)
            .iter()
            .map(|line| serde_json::from_str::<Checkpoint>(line).unwrap().seq)
            .collect()
    }
}

fn access(practice: &str, call: &str, principal: &str) -> Access {
    Access {
        request_id: RequestId::new("00000000000000aa").unwrap(),
        principal: Some(PrincipalName::new(principal).unwrap()),
        role: Some(Role::Reader),
        action: Action::ObjectGet,
        practice: PracticeId::new(practice).unwrap(),
        call: Some(CallId::new(call).unwrap()),
        artifact: Some(ArtifactName::new("recording.wav").unwrap()),
        client: "127.0.0.1:40000".parse().unwrap(),
        tls_version: TlsVersion::Tls13,
        range: None,
    }
}

/// Appends `count` allowed reads of calls `call_1`, `call_2`, … (equal line lengths up to 9).
async fn append_reads(log: &AuditLog, count: u64) {
    for n in 1..=count {
        let access = access("clinic-1", &format!("call_{n}"), "reader-1");
        log.append(&access, Outcome::Allowed).await.unwrap();
    }
}

/// Returns the file and line an error names for a record or checkpoint, if it names one.
fn error_location(error: &VerifyError) -> Option<&Location> {
    match error {
        VerifyError::LineTooLong { at }
        | VerifyError::IncompleteLine { at }
        | VerifyError::InvalidRecord { at, .. }
        | VerifyError::Sequence { at, .. }
        | VerifyError::BrokenLink { at, .. }
        | VerifyError::TimeOrder { at }
        | VerifyError::WrongDate { at, .. }
        | VerifyError::InvalidCheckpoint { at, .. }
        | VerifyError::UnknownKey { at, .. }
        | VerifyError::BadSignature { at }
        | VerifyError::CheckpointOrder { at, .. }
        | VerifyError::CheckpointMismatch { at, .. } => Some(at),
        _ => None,
    }
}

#[tokio::test]
async fn append_then_query_round_trip() {
    let fixture = Fixture::new();
    let log = fixture.open();
    let base = access("clinic-1", "call_1", "reader-1");
    let outcomes = [
        Outcome::Allowed,
        Outcome::Ok {
            status: 200,
            bytes: 4096,
        },
        Outcome::Denied {
            reason: Reason::new("forbidden"),
        },
        Outcome::Error {
            status: 503,
            bytes: 0,
            reason: Reason::new("storage_unavailable"),
        },
    ];
    for (index, outcome) in outcomes.iter().enumerate() {
        let seq = log.append(&base, outcome.clone()).await.unwrap();
        assert_eq!(seq, index as u64 + 1);
    }
    log.close().await.unwrap();

    let records = query(&fixture.dir(), &Filter::practice(base.practice.clone())).unwrap();
    assert_eq!(records.len(), 4);
    let lines = fixture.lines("audit-20250102-000001.jsonl");
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record.access, base);
        assert_eq!(record.outcome, outcomes[index]);
        assert_eq!(record.seq, index as u64 + 1);
        assert_eq!(record.time, START);
        assert_eq!(record.to_line(), lines[index].as_bytes());
        let expected_prev = match index {
            0 => ChainHash::GENESIS,
            _ => ChainHash::of_line(lines[index - 1].as_bytes()),
        };
        assert_eq!(record.prev, expected_prev);
    }

    let report = fixture.verify().unwrap();
    assert_eq!(report.records, 4);
    assert_eq!(report.segments, 1);
    assert_eq!(report.checkpoints, 1);
    assert_eq!(report.last_checkpoint_seq, Some(4));
    assert_eq!(report.records_after_last_checkpoint, 0);
}

#[tokio::test]
async fn every_byte_edit_is_detected() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 3).await;
    log.close().await.unwrap();
    fixture.verify().unwrap();

    let path = fixture.dir().join("audit-20250102-000001.jsonl");
    let original = fs::read(&path).unwrap();
    for index in 0..original.len() {
        let mut edited = original.clone();
        edited[index] ^= 0x01;
        fs::write(&path, &edited).unwrap();

        let edited_line = original[..index].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        let error = fixture
            .verify()
            .expect_err(&format!("edit of byte {index} not detected"));
        let at = error_location(&error).unwrap_or_else(|| panic!("byte {index}: {error}"));
        assert_eq!(
            at.file, "audit-20250102-000001.jsonl",
            "byte {index}: {error}"
        );
        assert!(
            at.line == edited_line || at.line == edited_line + 1,
            "byte {index} is on line {edited_line}: {error}"
        );
    }
    fs::write(&path, &original).unwrap();
    fixture.verify().unwrap();
}

#[tokio::test]
async fn deleted_record_is_detected() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 4).await;
    log.close().await.unwrap();

    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines.remove(1);
    fixture.write_lines(name, &lines);

    let error = fixture.verify().unwrap_err();
    match &error {
        VerifyError::Sequence {
            at,
            expected,
            found,
        } => {
            assert_eq!(at.to_string(), format!("{name} line 2"));
            assert_eq!((*expected, *found), (2, 3));
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[tokio::test]
async fn swapped_records_are_detected() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 4).await;
    log.close().await.unwrap();

    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines.swap(1, 2);
    fixture.write_lines(name, &lines);

    let error = fixture.verify().unwrap_err();
    assert!(
        matches!(&error, VerifyError::Sequence { at, expected: 2, found: 3 } if at.line == 2),
        "{error}"
    );
}

#[tokio::test]
async fn rewritten_seq_still_breaks_link() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 4).await;
    log.close().await.unwrap();

    // Delete record 2 and renumber the rest, as an attacker would to hide the gap.
    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines.remove(1);
    lines[1] = lines[1].replace("\"seq\":3", "\"seq\":2");
    lines[2] = lines[2].replace("\"seq\":4", "\"seq\":3");
    fixture.write_lines(name, &lines);

    let error = fixture.verify().unwrap_err();
    match &error {
        VerifyError::BrokenLink { at, previous } => {
            assert_eq!(at.line, 2);
            assert_eq!(previous.as_ref().map(|p| p.line), Some(1));
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[tokio::test]
async fn cut_tail_below_checkpoint_is_detected() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 5).await;
    log.close().await.unwrap();

    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines.truncate(3);
    fixture.write_lines(name, &lines);

    let error = fixture.verify().unwrap_err();
    match &error {
        VerifyError::ChainCut {
            head,
            last,
            checkpoint,
            seq,
        } => {
            assert_eq!(*head, 3);
            assert_eq!(last.as_ref().unwrap().to_string(), format!("{name} line 3"));
            assert_eq!(checkpoint.to_string(), "checkpoints.jsonl line 1");
            assert_eq!(*seq, 5);
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[tokio::test]
async fn removed_newest_segment_is_detected() {
    let fixture = Fixture::new();
    let mut settings = fixture.settings();
    settings.max_segment_bytes = 1;
    let log = AuditLog::open(fixture.dir(), settings).unwrap();
    append_reads(&log, 3).await;
    log.close().await.unwrap();

    let segments = fixture.segments();
    assert_eq!(segments.len(), 3);
    fs::remove_file(fixture.dir().join(&segments[2])).unwrap();

    let error = fixture.verify().unwrap_err();
    assert!(
        matches!(
            &error,
            VerifyError::ChainCut {
                head: 2,
                seq: 3,
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn cut_after_last_checkpoint_goes_unnoticed() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 3).await;
    log.checkpoint().await.unwrap();
    append_reads(&log, 2).await;
    log.close().await.unwrap();
    assert_eq!(fixture.checkpoint_seqs(), [3, 5]);

    // The residual window: without the last checkpoint, records 4 and 5 are unsigned ...
    let mut checkpoints = fixture.lines(CHECKPOINTS_FILE);
    checkpoints.truncate(1);
    fixture.write_lines(CHECKPOINTS_FILE, &checkpoints);
    let report = fixture.verify().unwrap();
    assert_eq!(report.records_after_last_checkpoint, 2);

    // ... and removing them goes unnoticed.
    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines.truncate(3);
    fixture.write_lines(name, &lines);
    let report = fixture.verify().unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(report.records_after_last_checkpoint, 0);
}

#[tokio::test]
async fn missing_middle_segment_is_detected() {
    let fixture = Fixture::new();
    let mut settings = fixture.settings();
    settings.max_segment_bytes = 1;
    let log = AuditLog::open(fixture.dir(), settings).unwrap();
    append_reads(&log, 3).await;
    log.close().await.unwrap();

    fs::remove_file(fixture.dir().join("audit-20250102-000002.jsonl")).unwrap();
    let error = fixture.verify().unwrap_err();
    match &error {
        VerifyError::MissingSegment { expected, found } => {
            assert_eq!(*expected, 2);
            assert_eq!(found, "audit-20250102-000003.jsonl");
        }
        other => panic!("unexpected error: {other}"),
    }
}

/// Writes six equally long records with the given segment size; returns the lines per segment.
async fn segment_sizes(max_segment_bytes: u64) -> Vec<usize> {
    let fixture = Fixture::new();
    let mut settings = fixture.settings();
    settings.max_segment_bytes = max_segment_bytes;
    let log = AuditLog::open(fixture.dir(), settings).unwrap();
    append_reads(&log, 6).await;
    log.close().await.unwrap();

    let segments = fixture.segments();
    for pair in segments.windows(2) {
        let last = fixture.lines(&pair[0]).pop().unwrap();
        let first = fixture.lines(&pair[1]).remove(0);
        let record: Record = serde_json::from_str(&first).unwrap();
        assert_eq!(record.prev, ChainHash::of_line(last.as_bytes()));
    }
    let report = fixture.verify().unwrap();
    assert_eq!(report.records, 6);
    segments
        .iter()
        .map(|name| fixture.lines(name).len())
        .collect()
}

#[tokio::test]
async fn rotation_by_size_limits() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 1).await;
    log.close().await.unwrap();
    let line_len = fixture.lines("audit-20250102-000001.jsonl")[0].len() as u64 + 1;

    assert_eq!(segment_sizes(2 * line_len).await, [2, 2, 2]);
    assert_eq!(segment_sizes(2 * line_len - 1).await, [1, 1, 1, 1, 1, 1]);
    assert_eq!(segment_sizes(3 * line_len).await, [3, 3]);
    assert_eq!(segment_sizes(1).await, [1, 1, 1, 1, 1, 1]);
}

#[tokio::test]
async fn rotation_by_day() {
    let fixture = Fixture::new();
    fixture.clock.set(datetime!(2025-01-02 23:59:59.900 UTC));
    let log = fixture.open();
    append_reads(&log, 2).await;
    fixture.clock.advance(time::Duration::milliseconds(200));
    append_reads(&log, 1).await;
    log.close().await.unwrap();

    let segments = fixture.segments();
    assert_eq!(
        segments,
        ["audit-20250102-000001.jsonl", "audit-20250103-000002.jsonl"]
    );
    let last = fixture.lines(&segments[0]).pop().unwrap();
    let first: Record = serde_json::from_str(&fixture.lines(&segments[1])[0]).unwrap();
    assert_eq!(first.seq, 3);
    assert_eq!(first.prev, ChainHash::of_line(last.as_bytes()));
    assert_eq!(first.time, datetime!(2025-01-03 00:00:00.100 UTC));

    let report = fixture.verify().unwrap();
    assert_eq!((report.segments, report.records), (2, 3));
}

#[tokio::test]
async fn clock_stepping_back_keeps_time_order() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 1).await;
    fixture.clock.set(START - time::Duration::hours(12));
    append_reads(&log, 1).await;
    log.close().await.unwrap();

    let records = query(
        &fixture.dir(),
        &Filter::practice("clinic-1".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(records[1].time, START);
    assert_eq!(fixture.segments().len(), 1);
    fixture.verify().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_form_one_chain() {
    let fixture = Fixture::new();
    let log = Arc::new(fixture.open());
    let mut tasks = Vec::new();
    for task in 0..200 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let access = access("clinic-1", &format!("call_{task}"), "reader-1");
            let authorization = log.append(&access, Outcome::Allowed).await.unwrap();
            let completion = Outcome::Ok {
                status: 200,
                bytes: task,
            };
            let completed = log.append(&access, completion).await.unwrap();
            (authorization, completed)
        }));
    }
    let mut seqs = Vec::new();
    for task in tasks {
        let (authorization, completed) = task.await.unwrap();
        assert!(authorization < completed);
        seqs.extend([authorization, completed]);
    }
    log.close().await.unwrap();

    seqs.sort_unstable();
    assert_eq!(seqs, (1..=400).collect::<Vec<u64>>());
    let report = fixture.verify().unwrap();
    assert_eq!(report.records, 400);
    assert_eq!(report.segments, 1);
}

/// A failure hook that counts its calls.
fn counting_hook(settings: &mut Settings) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    settings.on_failure = Some(Arc::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    count
}

// Tests run as root, and file modes do not block root's writes. These two failures are real for
// root too: a removed directory, and a segment path that now names a directory. In both, writes
// to the open descriptor still succeed, and only the path check after the sync notices.

#[tokio::test]
async fn removed_directory_fails_closed() {
    let fixture = Fixture::new();
    let mut settings = fixture.settings();
    let failures = counting_hook(&mut settings);
    let log = AuditLog::open(fixture.dir(), settings).unwrap();
    append_reads(&log, 1).await;
    assert!(!log.is_failed());

    fs::remove_dir_all(fixture.dir()).unwrap();
    let access = access("clinic-1", "call_2", "reader-1");
    let error = log.append(&access, Outcome::Allowed).await.unwrap_err();
    assert!(matches!(error, AuditError::Io { .. }), "{error}");
    assert!(
        error.to_string().contains("audit-20250102-000001.jsonl"),
        "{error}"
    );
    assert!(log.is_failed());

    let error = log.append(&access, Outcome::Allowed).await.unwrap_err();
    assert!(matches!(error, AuditError::Failed), "{error}");
    assert_eq!(failures.load(Ordering::Relaxed), 2);
    assert!(matches!(log.close().await, Err(AuditError::Failed)));
}

#[tokio::test]
async fn segment_replaced_by_directory_fails_closed() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 1).await;

    let segment = fixture.dir().join("audit-20250102-000001.jsonl");
    fs::remove_file(&segment).unwrap();
    fs::create_dir(&segment).unwrap();
    let access = access("clinic-1", "call_2", "reader-1");
    let error = log.append(&access, Outcome::Allowed).await.unwrap_err();
    assert!(matches!(error, AuditError::Io { .. }), "{error}");
    assert!(log.is_failed());
}

#[tokio::test]
async fn removed_directory_fails_new_segment() {
    let fixture = Fixture::new();
    let log = fixture.open();
    fs::remove_dir_all(fixture.dir()).unwrap();
    let access = access("clinic-1", "call_1", "reader-1");
    let error = log.append(&access, Outcome::Allowed).await.unwrap_err();
    assert!(
        matches!(
            error,
            AuditError::Io {
                operation: "create segment",
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn torn_last_line_is_quarantined() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 3).await;
    log.close().await.unwrap();

    let name = "audit-20250102-000001.jsonl";
    let path = fixture.dir().join(name);
    let complete_len = fs::metadata(&path).unwrap().len();
    let torn = br#"{"time":"2025-01-02T10:00:00.000Z","request_id":"000"#;
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(torn);
    fs::write(&path, &bytes).unwrap();

    let error = fixture.verify().unwrap_err();
    assert!(
        matches!(&error, VerifyError::IncompleteLine { at } if at.line == 4),
        "{error}"
    );

    let log = fixture.open();
    let quarantine = format!("{name}.torn-{complete_len}");
    assert_eq!(fs::read(fixture.dir().join(&quarantine)).unwrap(), torn);
    assert_eq!(fs::metadata(&path).unwrap().len(), complete_len);
    let access = access("clinic-1", "call_4", "reader-1");
    assert_eq!(log.append(&access, Outcome::Allowed).await.unwrap(), 4);
    log.close().await.unwrap();

    let report = fixture.verify().unwrap();
    assert_eq!(report.records, 4);
    assert_eq!(report.quarantined, [quarantine]);
}

#[tokio::test]
async fn torn_checkpoint_line_is_quarantined() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 2).await;
    log.close().await.unwrap();

    let path = fixture.dir().join(CHECKPOINTS_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let complete_len = bytes.len();
    bytes.extend_from_slice(br#"{"time":"2025"#);
    fs::write(&path, &bytes).unwrap();

    let log = fixture.open();
    log.close().await.unwrap();
    let quarantine = format!("{CHECKPOINTS_FILE}.torn-{complete_len}");
    assert!(fixture.dir().join(&quarantine).exists());
    let report = fixture.verify().unwrap();
    assert_eq!(report.quarantined, [quarantine]);
}

#[tokio::test]
async fn damaged_last_line_blocks_open() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 2).await;
    log.close().await.unwrap();

    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines.push("not a record".to_owned());
    fixture.write_lines(name, &lines);

    let error = AuditLog::open(fixture.dir(), fixture.settings())
        .err()
        .unwrap();
    assert!(matches!(error, AuditError::Damaged { .. }), "{error}");
    assert!(
        error.to_string().contains(&format!("{name} line 3")),
        "{error}"
    );
}

#[tokio::test]
async fn broken_link_blocks_open() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 3).await;
    log.close().await.unwrap();

    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines[1] = lines[1].replace("call_2", "call_9");
    fixture.write_lines(name, &lines);

    let error = AuditLog::open(fixture.dir(), fixture.settings())
        .err()
        .unwrap();
    assert!(
        error.to_string().contains(&format!("{name} line 3")),
        "{error}"
    );
}

#[tokio::test]
async fn open_rejects_chain_shorter_than_checkpoint() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 3).await;
    log.close().await.unwrap();

    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines.pop();
    fixture.write_lines(name, &lines);

    let error = AuditLog::open(fixture.dir(), fixture.settings())
        .err()
        .unwrap();
    assert!(
        matches!(
            error,
            AuditError::ChainCut {
                head: 2,
                checkpoint: 3
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn reopen_continues_chain() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 3).await;
    log.close().await.unwrap();

    let log = fixture.open();
    let access = access("clinic-1", "call_4", "reader-1");
    assert_eq!(log.append(&access, Outcome::Allowed).await.unwrap(), 4);
    log.close().await.unwrap();

    assert_eq!(fixture.checkpoint_seqs(), [3, 4]);
    let report = fixture.verify().unwrap();
    assert_eq!((report.records, report.segments), (4, 1));
}

#[tokio::test]
async fn reopen_checkpoints_records_left_without_one() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 3).await;
    log.close().await.unwrap();

    // As after a crash: the last checkpoint never reached the disk.
    fs::remove_file(fixture.dir().join(CHECKPOINTS_FILE)).unwrap();
    let log = fixture.open();
    assert_eq!(fixture.checkpoint_seqs(), [3]);
    log.close().await.unwrap();
    assert_eq!(fixture.checkpoint_seqs(), [3]);
}

#[tokio::test]
async fn checkpoint_tamper_is_detected() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 2).await;
    log.close().await.unwrap();
    let original = fixture.lines(CHECKPOINTS_FILE);

    let mut checkpoint: Checkpoint = serde_json::from_str(&original[0]).unwrap();
    let flipped = if checkpoint.signature.starts_with('0') {
        "1"
    } else {
        "0"
    };
    checkpoint.signature.replace_range(0..1, flipped);
    fixture.write_lines(
        CHECKPOINTS_FILE,
        &[serde_json::to_string(&checkpoint).unwrap()],
    );
    let error = fixture.verify().unwrap_err();
    assert!(
        matches!(&error, VerifyError::BadSignature { at } if at.line == 1),
        "{error}"
    );

    let lowered = original[0].replace("\"seq\":2", "\"seq\":1");
    assert_ne!(lowered, original[0]);
    fixture.write_lines(CHECKPOINTS_FILE, &[lowered]);
    let error = fixture.verify().unwrap_err();
    assert!(
        matches!(&error, VerifyError::BadSignature { .. }),
        "{error}"
    );

    fixture.write_lines(CHECKPOINTS_FILE, &original);
    let other_key_dir = tempfile::tempdir().unwrap();
    let other = generate_key(&other_key_dir.path().join("other.key")).unwrap();
    let error = verify(&fixture.dir(), &[other]).unwrap_err();
    assert!(matches!(&error, VerifyError::UnknownKey { .. }), "{error}");
    assert!(matches!(
        verify(&fixture.dir(), &[]),
        Err(VerifyError::NoPublicKey)
    ));
    assert_eq!(
        verify(&fixture.dir(), &[other, fixture.public_key])
            .unwrap()
            .records,
        2
    );
}

#[tokio::test]
async fn checkpoint_forged_with_other_key_is_rejected() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 2).await;
    log.close().await.unwrap();

    // Re-sign the checkpoint with a key the verifier was not given.
    let other_key_dir = tempfile::tempdir().unwrap();
    let other_path = other_key_dir.path().join("other.key");
    generate_key(&other_path).unwrap();
    let other = SigningKey::load(&other_path).unwrap();
    let mut checkpoint: Checkpoint =
        serde_json::from_str(&fixture.lines(CHECKPOINTS_FILE)[0]).unwrap();
    other.sign(&mut checkpoint);
    fixture.write_lines(
        CHECKPOINTS_FILE,
        &[serde_json::to_string(&checkpoint).unwrap()],
    );

    let error = fixture.verify().unwrap_err();
    assert!(matches!(&error, VerifyError::UnknownKey { .. }), "{error}");
}

#[tokio::test]
async fn checkpoints_by_record_count() {
    let fixture = Fixture::new();
    let mut settings = fixture.settings();
    settings.checkpoint_records = 3;
    let log = AuditLog::open(fixture.dir(), settings).unwrap();
    append_reads(&log, 7).await;
    log.close().await.unwrap();
    assert_eq!(fixture.checkpoint_seqs(), [3, 6, 7]);
    fixture.verify().unwrap();
}

#[tokio::test]
async fn missing_checkpoint_by_count_is_detected() {
    let fixture = Fixture::new();
    let mut settings = fixture.settings();
    settings.checkpoint_records = 3;
    let log = AuditLog::open(fixture.dir(), settings).unwrap();
    append_reads(&log, 7).await;
    log.close().await.unwrap();

    let mut checkpoints = fixture.lines(CHECKPOINTS_FILE);
    checkpoints.truncate(2);
    fixture.write_lines(CHECKPOINTS_FILE, &checkpoints);
    assert_eq!(fixture.verify().unwrap().records_after_last_checkpoint, 1);

    checkpoints.truncate(1);
    fixture.write_lines(CHECKPOINTS_FILE, &checkpoints);
    let error = fixture.verify().unwrap_err();
    assert!(
        matches!(
            error,
            VerifyError::TooManyAfterCheckpoint {
                records: 4,
                limit: 3
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn checkpoints_by_record_time() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 1).await;
    fixture.clock.advance(time::Duration::milliseconds(59_999));
    append_reads(&log, 1).await;
    assert!(!fixture.dir().join(CHECKPOINTS_FILE).exists());
    fixture.clock.advance(time::Duration::milliseconds(1));
    append_reads(&log, 1).await;
    assert_eq!(fixture.checkpoint_seqs(), [2]);
    log.close().await.unwrap();
    assert_eq!(fixture.checkpoint_seqs(), [2, 3]);
    fixture.verify().unwrap();
}

#[tokio::test]
async fn missing_checkpoint_by_time_is_detected() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 1).await;
    fixture.clock.advance(time::Duration::seconds(59));
    append_reads(&log, 1).await;
    fixture.clock.advance(time::Duration::seconds(2));
    append_reads(&log, 1).await;
    log.close().await.unwrap();
    assert_eq!(fixture.checkpoint_seqs(), [2, 3]);

    fs::remove_file(fixture.dir().join(CHECKPOINTS_FILE)).unwrap();
    let error = fixture.verify().unwrap_err();
    match &error {
        VerifyError::TailTooOld {
            first,
            last,
            span_ms,
            limit_ms,
        } => {
            assert_eq!((first.line, last.line), (1, 3));
            assert_eq!((*span_ms, *limit_ms), (61_000, 60_000));
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[tokio::test]
async fn idle_writer_checkpoints_after_interval() {
    let fixture = Fixture::new();
    let mut settings = fixture.settings();
    settings.checkpoint_interval = std::time::Duration::from_millis(20);
    let log = AuditLog::open(fixture.dir(), settings).unwrap();
    append_reads(&log, 1).await;

    // Wait for the idle timer; the bound only keeps a broken timer from hanging the test.
    let path = fixture.dir().join(CHECKPOINTS_FILE);
    for _ in 0..3000 {
        if path.exists() && !fixture.lines(CHECKPOINTS_FILE).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(fixture.checkpoint_seqs(), [1]);
    log.close().await.unwrap();
    assert_eq!(fixture.checkpoint_seqs(), [1]);
}

#[tokio::test]
async fn invalid_reason_is_rejected_without_failing() {
    let fixture = Fixture::new();
    let log = fixture.open();
    let access = access("clinic-1", "call_1", "reader-1");
    let outcome = Outcome::Denied {
        reason: Reason::new("not allowed"),
    };
    let error = log.append(&access, outcome).await.unwrap_err();
    assert!(matches!(error, AuditError::InvalidRecord(_)), "{error}");
    assert!(!log.is_failed());
    assert_eq!(log.append(&access, Outcome::Allowed).await.unwrap(), 1);
    log.close().await.unwrap();
}

#[tokio::test]
async fn append_after_close_is_rejected() {
    let fixture = Fixture::new();
    let log = fixture.open();
    append_reads(&log, 1).await;
    log.close().await.unwrap();
    let access = access("clinic-1", "call_2", "reader-1");
    let error = log.append(&access, Outcome::Allowed).await.unwrap_err();
    assert!(matches!(error, AuditError::Closed), "{error}");
}

#[tokio::test]
async fn second_writer_is_locked_out() {
    let fixture = Fixture::new();
    let log = fixture.open();
    let error = AuditLog::open(fixture.dir(), fixture.settings())
        .err()
        .unwrap();
    assert!(matches!(error, AuditError::Locked { .. }), "{error}");
    log.close().await.unwrap();
    fixture.open().close().await.unwrap();
}

#[test]
fn key_inside_directory_is_rejected() {
    let fixture = Fixture::new();
    fs::create_dir(fixture.dir()).unwrap();
    let key = fixture.dir().join("checkpoint.key");
    generate_key(&key).unwrap();
    let error = AuditLog::open(fixture.dir(), Settings::new(&key))
        .err()
        .unwrap();
    assert!(
        matches!(error, AuditError::KeyInsideDirectory { .. }),
        "{error}"
    );
}

#[test]
fn keygen_creates_private_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.key");
    let mut out = Vec::new();
    super::cli::keygen_command(&KeygenArgs { key: path.clone() }, &mut out).unwrap();

    let printed: PublicKey = String::from_utf8(out).unwrap().trim().parse().unwrap();
    assert_eq!(SigningKey::load(&path).unwrap().public_key(), printed);
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let before = fs::read(&path).unwrap();
    let error = generate_key(&path).unwrap_err();
    assert!(matches!(error, KeyError::Exists { .. }), "{error}");
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn public_key_from_file_or_hex() {
    let dir = tempfile::tempdir().unwrap();
    let key = generate_key(&dir.path().join("checkpoint.key")).unwrap();
    let file = dir.path().join("checkpoint.pub");
    fs::write(&file, format!("{key}\n")).unwrap();
    assert_eq!(PublicKey::from_arg(&key.to_string()).unwrap(), key);
    assert_eq!(PublicKey::from_arg(file.to_str().unwrap()).unwrap(), key);
    assert!(PublicKey::from_arg("abcd").is_err());
}

/// Writes records of two practices, two calls and two principals, one minute apart.
async fn write_mixed(fixture: &Fixture) {
    let log = fixture.open();
    let entries = [
        ("clinic-1", "call_a", "reader-1"),
        ("clinic-1", "call_b", "reader-2"),
        ("clinic-2", "call_c", "reader-1"),
        ("clinic-1", "call_a", "reader-2"),
        ("clinic-1", "call_b", "reader-1"),
    ];
    for (practice, call, principal) in entries {
        let access = access(practice, call, principal);
        log.append(&access, Outcome::Allowed).await.unwrap();
        fixture.clock.advance(time::Duration::minutes(1));
    }
    log.close().await.unwrap();
}

#[tokio::test]
async fn query_filters() {
    let fixture = Fixture::new();
    write_mixed(&fixture).await;
    let dir = fixture.dir();
    let practice: PracticeId = "clinic-1".parse().unwrap();
    let seqs = |filter: &Filter| -> Vec<u64> {
        query(&dir, filter)
            .unwrap()
            .iter()
            .map(|record| record.seq)
            .collect()
    };

    let all = Filter::practice(practice.clone());
    assert_eq!(seqs(&all), [1, 2, 4, 5]);
    assert_eq!(seqs(&Filter::practice("clinic-2".parse().unwrap())), [3]);
    assert_eq!(
        seqs(&Filter::practice("clinic-3".parse().unwrap())),
        [] as [u64; 0]
    );

    let call = Filter {
        call: Some("call_a".parse().unwrap()),
        ..all.clone()
    };
    assert_eq!(seqs(&call), [1, 4]);
    let principal = Filter {
        principal: Some("reader-1".parse().unwrap()),
        ..all.clone()
    };
    assert_eq!(seqs(&principal), [1, 5]);
    let both = Filter {
        principal: Some("reader-2".parse().unwrap()),
        ..call.clone()
    };
    assert_eq!(seqs(&both), [4]);

    // Record n was written at START + (n - 1) minutes: `since` is inclusive, `until` exclusive.
    let minute = |n: i64| START + time::Duration::minutes(n);
    let range = Filter {
        since: Some(minute(1)),
        until: Some(minute(4)),
        ..all.clone()
    };
    assert_eq!(seqs(&range), [2, 4]);
    let range = Filter {
        since: Some(minute(1) + time::Duration::milliseconds(1)),
        until: Some(minute(4) + time::Duration::milliseconds(1)),
        ..all.clone()
    };
    assert_eq!(seqs(&range), [4, 5]);
    let next_day = Filter {
        since: Some(START + time::Duration::days(1)),
        ..all.clone()
    };
    assert_eq!(seqs(&next_day), [] as [u64; 0]);

    let limited = Filter {
        limit: Some(2),
        ..all.clone()
    };
    assert_eq!(seqs(&limited), [1, 2]);
}

#[tokio::test]
async fn query_skips_record_being_written() {
    let fixture = Fixture::new();
    write_mixed(&fixture).await;
    let name = "audit-20250102-000001.jsonl";
    let path = fixture.dir().join(name);
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(br#"{"time":"20"#);
    fs::write(&path, &bytes).unwrap();

    let records = query(
        &fixture.dir(),
        &Filter::practice("clinic-1".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(records.len(), 4);
}

/// Parses `callseal audit …` arguments as the command line does.
#[derive(Parser)]
struct TestCli {
    #[command(subcommand)]
    command: AuditCommand,
}

fn parse_args(args: &[&str]) -> AuditCommand {
    TestCli::try_parse_from(std::iter::once("audit").chain(args.iter().copied()))
        .unwrap()
        .command
}

#[tokio::test]
async fn verify_command_prints_counts_or_problem() {
    let fixture = Fixture::new();
    write_mixed(&fixture).await;
    let dir = fixture.dir();
    let key = fixture.public_key.to_string();
    let AuditCommand::Verify(args) =
        parse_args(&["verify", dir.to_str().unwrap(), "--public-key", &key])
    else {
        panic!("not a verify command");
    };
    let mut out = Vec::new();
    super::cli::verify_command(&args, &mut out).unwrap();
    // Records one minute apart each get a checkpoint under the 60 s interval.
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "OK: 5 records in 1 segment, 5 checkpoints\n"
    );

    let name = "audit-20250102-000001.jsonl";
    let mut lines = fixture.lines(name);
    lines.remove(2);
    fixture.write_lines(name, &lines);
    let error = super::cli::verify_command(&args, &mut Vec::new()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains(&format!("{name} line 3")), "{message}");

    let missing_key = TestCli::try_parse_from(["audit", "verify", dir.to_str().unwrap()]);
    assert!(missing_key.is_err());
}

#[tokio::test]
async fn query_command_prints_table_and_json() {
    let fixture = Fixture::new();
    write_mixed(&fixture).await;
    let dir = fixture.dir();
    let base = [
        "query",
        "--dir",
        dir.to_str().unwrap(),
        "--practice",
        "clinic-1",
        "--call",
        "call_a",
        "--since",
        "2025-01-02T11:00:00+01:00",
    ];
    let AuditCommand::Query(args) = parse_args(&base) else {
        panic!("not a query command");
    };
    assert_eq!(args.since, Some(START));
    let mut out = Vec::new();
    super::cli::query_command(&args, &mut out).unwrap();
    let table = String::from_utf8(out).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    let header: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "time",
            "principal",
            "role",
            "action",
            "call",
            "artifact",
            "outcome",
            "status",
            "bytes"
        ]
    );
    let first: Vec<&str> = rows[1].split_whitespace().collect();
    assert_eq!(
        first,
        [
            "2025-01-02T10:00:00.000Z",
            "reader-1",
            "reader",
            "object.get",
            "call_a",
            "recording.wav",
            "allowed",
            "-",
            "-"
        ]
    );

    let json_args = [&base[..], &["--json"]].concat();
    let AuditCommand::Query(args) = parse_args(&json_args) else {
        panic!("not a query command");
    };
    let mut out = Vec::new();
    super::cli::query_command(&args, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines = fixture.lines("audit-20250102-000001.jsonl");
    assert_eq!(text, format!("{}\n{}\n", lines[0], lines[3]));

    let bad_time = [&base[..6], &["--since", "yesterday"]].concat();
    assert!(TestCli::try_parse_from(std::iter::once("audit").chain(bad_time)).is_err());
}

#[test]
fn settings_limits_are_checked() {
    let fixture = Fixture::new();
    type Change = fn(&mut Settings);
    let cases: [(&str, Change); 3] = [
        ("max_segment_bytes", |s| s.max_segment_bytes = 0),
        ("checkpoint_records", |s| s.checkpoint_records = 0),
        ("checkpoint_interval", |s| {
            s.checkpoint_interval = std::time::Duration::from_micros(999)
        }),
    ];
    for (name, change) in cases {
        let mut settings = fixture.settings();
        change(&mut settings);
        let error = AuditLog::open(fixture.dir(), settings).err().unwrap();
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[tokio::test]
async fn query_since_with_offset_uses_utc_day() {
    let fixture = Fixture::new();
    fixture.clock.set(datetime!(2025-01-02 23:45:00 UTC));
    let log = fixture.open();
    append_reads(&log, 1).await;
    log.close().await.unwrap();

    // 00:30 at +01:00 on January 3 is 23:30 UTC on January 2, before the record.
    let filter = Filter {
        since: Some(datetime!(2025-01-03 00:30:00 +01:00)),
        until: Some(datetime!(2025-01-03 01:00:00 +01:00)),
        ..Filter::practice("clinic-1".parse().unwrap())
    };
    assert_eq!(query(&fixture.dir(), &filter).unwrap().len(), 1);
}
