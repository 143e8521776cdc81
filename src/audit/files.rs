//! Files of the audit directory: segment names, reading lines, and quarantining a torn last line.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use time::Date;

/// Maximum length of one line of a segment or of `checkpoints.jsonl`, without the `\n`.
///
/// A record is about 1 KiB at most: five ids of at most 128 bytes plus fixed fields. The limit
/// keeps a damaged file without newlines from being read into memory whole.
pub(crate) const MAX_LINE_BYTES: usize = 16 * 1024;

/// The lock file that keeps a second writer out of the directory.
pub(crate) const LOCK_FILE: &str = "audit.lock";

/// Mode of every file the audit log creates: records name practices, calls and client addresses.
pub(crate) const FILE_MODE: u32 = 0o600;

/// The name of a segment file: `audit-{YYYYMMDD}-{NNNNNN}.jsonl`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct SegmentName {
    /// The UTC day of every record in the segment.
    pub date: Date,
    /// The segment's position in the log, from 1, never reset.
    pub number: u64,
}

impl SegmentName {
    /// Parses a file name; `None` for names that are not segments, such as quarantine files.
    pub fn parse(name: &str) -> Option<SegmentName> {
        let rest = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
        let (date, number) = rest.split_once('-')?;
        let all_digits = |text: &str| text.bytes().all(|b| b.is_ascii_digit());
        if date.len() != 8 || !all_digits(date) || number.len() < 6 || !all_digits(number) {
            return None;
        }
        let year = date[0..4].parse().ok()?;
        let month = date[4..6].parse::<u8>().ok()?.try_into().ok()?;
        let day = date[6..8].parse().ok()?;
        let date = Date::from_calendar_date(year, month, day).ok()?;
        let number: u64 = number.parse().ok()?;
        let name_back = SegmentName { date, number };
        // Only the canonical spelling is a segment, so one number has one file name.
        (name_back.to_string() == name && number > 0).then_some(name_back)
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit-{:04}{:02}{:02}-{:06}.jsonl",
            self.date.year(),
            u8::from(self.date.month()),
            self.date.day(),
            self.number
        )
    }
}

/// The contents of the audit directory that the writer, the verifier and queries care about.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// Segments in order of their number.
    pub segments: Vec<SegmentName>,
    /// Quarantine files of torn last lines, sorted by name.
    pub quarantined: Vec<String>,
}

/// Lists the segments and quarantine files of `dir`; other files are ignored.
pub(crate) fn list(dir: &Path) -> io::Result<Listing> {
    let mut listing = Listing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(segment) = SegmentName::parse(&name) {
            listing.segments.push(segment);
        } else if name.contains(".torn-") {
            listing.quarantined.push(name);
        }
    }
    listing.segments.sort_by_key(|segment| segment.number);
    listing.quarantined.sort();
    Ok(listing)
}

/// One line read by [`Lines`].
pub(crate) struct Line<'a> {
    /// 1-based line number in the file.
    pub number: u64,
    /// The bytes without the final `\n`.
    pub bytes: &'a [u8],
    /// Whether a `\n` ended the line; only the last line of a file can lack one.
    pub complete: bool,
}

/// An error reading a line in [`Lines`].
#[derive(Debug)]
pub(crate) enum LineError {
    Io(io::Error),
    /// The line numbered here is longer than [`MAX_LINE_BYTES`].
    TooLong(u64),
}

/// Reads a file line by line, with a bound on the length of a line.
pub(crate) struct Lines<R> {
    reader: R,
    buffer: Vec<u8>,
    number: u64,
}

impl Lines<BufReader<File>> {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Lines::new(BufReader::with_capacity(
            256 * 1024,
            File::open(path)?,
        )))
    }
}

impl<R: BufRead> Lines<R> {
    pub fn new(reader: R) -> Self {
        Lines {
            reader,
            buffer: Vec::new(),
            number: 0,
        }
    }

    pub fn next_line(&mut self) -> Result<Option<Line<'_>>, LineError> {
        self.buffer.clear();
        let limit = MAX_LINE_BYTES as u64 + 1;
        let read = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.buffer)
            .map_err(LineError::Io)?;
        if read == 0 {
            return Ok(None);
        }
        self.number += 1;

        let complete = self.buffer.last() == Some(&b'\n');
        if complete {
            self.buffer.pop();
        }
        if self.buffer.len() > MAX_LINE_BYTES {
            return Err(LineError::TooLong(self.number));
        }
        Ok(Some(Line {
            number: self.number,
            bytes: &self.buffer,
            complete,
        }))
    }
}

/// Returns the last complete line of a file (without its `\n`), or `None` when it has none.
///
/// The caller has already quarantined an incomplete last line, so the file ends with `\n`.
pub(crate) fn read_last_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let window = len.min(MAX_LINE_BYTES as u64 + 1);
    file.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::with_capacity(window as usize);
    file.read_to_end(&mut tail)?;

    let Some(body) = tail.strip_suffix(b"\n") else {
        return Ok(None);
    };
    let start = match body.iter().rposition(|&b| b == b'\n') {
        Some(newline) => newline + 1,
        // Without a `\n` in the window the line starts at the file start, or is too long.
        None if window == len => 0,
        None => return Err(io::Error::other("last line longer than the maximum")),
    };
    Ok(Some(body[start..].to_vec()))
}

/// Moves an incomplete last line of `dir/name` into a quarantine file and cuts it off.
///
/// Returns the quarantine file's name, or `None` when the file ends with `\n` or is empty. The
/// bytes are synced in the quarantine file before the original is cut, so they exist on disk in
/// one place or the other at every moment.
pub(crate) fn quarantine_torn_tail(dir: &Path, name: &str) -> io::Result<Option<String>> {
    let path = dir.join(name);
    let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
    let len = file.metadata()?.len();
    let Some(offset) = start_of_incomplete_line(&mut file, len)? else {
        return Ok(None);
    };

    let (quarantine_name, mut quarantine) = create_quarantine_file(dir, name, offset)?;
    file.seek(SeekFrom::Start(offset))?;
    io::copy(&mut (&mut file).take(len - offset), &mut quarantine)?;
    quarantine.sync_all()?;
    sync_dir(dir)?;

    file.set_len(offset)?;
    file.sync_all()?;
    tracing::warn!(
        file = name,
        offset,
        bytes = len - offset,
        quarantine = %quarantine_name,
        "moved an incomplete last line of the audit log to a quarantine file"
    );
    Ok(Some(quarantine_name))
}

/// Finds the offset after the last `\n`, when bytes follow it.
fn start_of_incomplete_line(file: &mut File, len: u64) -> io::Result<Option<u64>> {
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(newline) = part.iter().rposition(|&b| b == b'\n') {
            let after = start + newline as u64 + 1;
            return Ok((after < len).then_some(after));
        }
        end = start;
    }
    Ok((len > 0).then_some(0))
}

/// Creates `{name}.torn-{offset}`, or `{name}.torn-{offset}-{n}` when that name is taken.
fn create_quarantine_file(dir: &Path, name: &str, offset: u64) -> io::Result<(String, File)> {
    let mut candidate = format!("{name}.torn-{offset}");
    for attempt in 1..=1000 {
        match create_new(&dir.join(&candidate)) {
            Ok(file) => return Ok((candidate, file)),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                candidate = format!("{name}.torn-{offset}-{attempt}");
            }
            Err(error) => return Err(error),
        }
    }
    Err(io::Error::other("every quarantine file name is taken"))
}

/// Creates a file that must not exist yet, with [`FILE_MODE`], for appending.
pub(crate) fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Opens a file for appending, creating it with [`FILE_MODE`] if needed.
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Syncs a directory, so that entries created or renamed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The device and inode of an open file, to check that its path still leads to it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    pub fn of(file: &File) -> io::Result<Self> {
        let metadata = file.metadata()?;
        Ok(FileIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }

    /// Fails unless `path` names this file: the file or its directory may have been removed,
    /// renamed or replaced, and writes to the open descriptor would then reach no audit file.
    pub fn check_path(self, path: &Path) -> io::Result<()> {
        let metadata = fs::metadata(path)?;
        if metadata.dev() != self.device || metadata.ino() != self.inode || !metadata.is_file() {
            return Err(io::Error::other(
                "the path no longer names the open audit file (removed or replaced)",
            ));
        }
        Ok(())
    }
}

/// Writes all of `bytes` and syncs the file's data, then checks that `path` still names it.
pub(crate) fn write_durably(
    file: &mut File,
    identity: FileIdentity,
    path: &Path,
    bytes: &[u8],
) -> io::Result<()> {
    file.write_all(bytes)?;
    file.sync_data()?;
    identity.check_path(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        let name = SegmentName::parse("audit-20250102-000003.jsonl").unwrap();
        assert_eq!(name.number, 3);
        assert_eq!(name.to_string(), "audit-20250102-000003.jsonl");
        let wide = SegmentName::parse("audit-20250102-1234567.jsonl").unwrap();
        assert_eq!(wide.number, 1_234_567);
    }

    #[test]
    fn other_names_are_not_segments() {
        for name in [
            "audit-20250102-000003.jsonl.torn-10",
            "audit-20250102-0000003.jsonl",
            "audit-20250102-000000.jsonl",
            "audit-20251302-000001.jsonl",
            "audit-2025012-000001.jsonl",
            "audit-20250102-00001.jsonl",
            "checkpoints.jsonl",
            "audit.lock",
        ] {
            assert_eq!(SegmentName::parse(name), None, "{name}");
        }
    }

    #[test]
    fn lines_mark_incomplete_last_line() {
        let mut lines = Lines::new(&b"one\ntwo\nthr"[..]);
        let first = lines.next_line().unwrap().unwrap();
        assert_eq!(
            (first.number, first.bytes, first.complete),
            (1, &b"one"[..], true)
        );
        lines.next_line().unwrap().unwrap();
        let last = lines.next_line().unwrap().unwrap();
        assert_eq!(
            (last.number, last.bytes, last.complete),
            (3, &b"thr"[..], false)
        );
        assert!(lines.next_line().unwrap().is_none());
    }

    #[test]
    fn line_length_limits() {
        let at_limit = [vec![b'a'; MAX_LINE_BYTES], b"\n".to_vec()].concat();
        let mut lines = Lines::new(&at_limit[..]);
        assert_eq!(
            lines.next_line().unwrap().unwrap().bytes.len(),
            MAX_LINE_BYTES
        );

        let over = [vec![b'a'; MAX_LINE_BYTES + 1], b"\n".to_vec()].concat();
        let mut lines = Lines::new(&over[..]);
        assert!(matches!(lines.next_line(), Err(LineError::TooLong(1))));
    }

    #[test]
    fn quarantine_moves_incomplete_line() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("seg"), b"one\ntwo\nthr").unwrap();
        let name = quarantine_torn_tail(dir.path(), "seg").unwrap().unwrap();
        assert_eq!(name, "seg.torn-8");
        assert_eq!(fs::read(dir.path().join("seg")).unwrap(), b"one\ntwo\n");
        assert_eq!(fs::read(dir.path().join(&name)).unwrap(), b"thr");
        assert_eq!(quarantine_torn_tail(dir.path(), "seg").unwrap(), None);

        fs::write(dir.path().join("seg"), b"one\ntwo\nthr").unwrap();
        let second = quarantine_torn_tail(dir.path(), "seg").unwrap().unwrap();
        assert_eq!(second, "seg.torn-8-1");
    }

    #[test]
    fn quarantine_of_file_without_newline() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("seg"), b"partial").unwrap();
        let name = quarantine_torn_tail(dir.path(), "seg").unwrap().unwrap();
        assert_eq!(name, "seg.torn-0");
        assert_eq!(fs::read(dir.path().join("seg")).unwrap(), b"");
    }

    #[test]
    fn last_line_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        fs::write(&path, b"one\ntwo\n").unwrap();
        assert_eq!(read_last_line(&path).unwrap(), Some(b"two".to_vec()));
        fs::write(&path, b"only\n").unwrap();
        assert_eq!(read_last_line(&path).unwrap(), Some(b"only".to_vec()));
        fs::write(&path, b"").unwrap();
        assert_eq!(read_last_line(&path).unwrap(), None);
    }
}
