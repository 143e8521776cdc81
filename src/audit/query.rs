//! Reading records back: one practice's records, optionally for one call, principal or time range.
//!
//! [`query`] reads the segment files directly and does not check the chain, which
//! [`crate::audit::verify`] does. It skips segments whose date is outside the time range, because
//! the writer puts only records of the segment's UTC day in it. It may run while the writer
//! appends, so an incomplete line at the end of the newest segment is a record still being written
//! and is skipped. It blocks on file I/O, so async callers run it in a blocking task.

use std::io;
use std::path::{Path, PathBuf};

use time::{OffsetDateTime, UtcOffset};

use super::files::{self, LineError, Lines, MAX_LINE_BYTES};
use super::record::{PrincipalName, Record};
use super::verify::Location;
use crate::ids::{CallId, PracticeId};

/// The conditions of a [`query`]. A record must meet every condition given.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Filter {
    pub practice: PracticeId,
    pub call: Option<CallId>,
    pub principal: Option<PrincipalName>,
    /// Earliest record time, inclusive.
    pub since: Option<OffsetDateTime>,
    /// Latest record time, exclusive.
    pub until: Option<OffsetDateTime>,
    /// Maximum number of records returned, the oldest first.
    pub limit: Option<usize>,
}

/// An error reading records in [`query`].
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{at}: line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong { at: Location },
    #[error("{at}: incomplete line before the end of the log")]
    IncompleteLine { at: Location },
    #[error("{at}: not a valid record: {detail}")]
    InvalidRecord { at: Location, detail: String },
}

impl Filter {
    /// Returns a filter for all of `practice`'s records.
    pub fn practice(practice: PracticeId) -> Self {
        Filter {
            practice,
            call: None,
            principal: None,
            since: None,
            until: None,
            limit: None,
        }
    }

    pub fn matches(&self, record: &Record) -> bool {
        let access = &record.access;
        access.practice == self.practice
            && self
                .call
                .as_ref()
                .is_none_or(|call| access.call.as_ref() == Some(call))
            && self
                .principal
                .as_ref()
                .is_none_or(|principal| access.principal.as_ref() == Some(principal))
            && self.since.is_none_or(|since| record.time >= since)
            && self.until.is_none_or(|until| record.time < until)
    }
}

/// Returns the records of the audit log in `dir` that match `filter`, in chain order.
pub fn query(dir: &Path, filter: &Filter) -> Result<Vec<Record>, QueryError> {
    let listing = files::list(dir).map_err(io_error(dir))?;
    let limit = filter.limit.unwrap_or(usize::MAX);
    let mut records = Vec::new();
    if limit == 0 {
        return Ok(records);
    }

    let utc_day = |time: OffsetDateTime| time.to_offset(UtcOffset::UTC).date();
    let since_day = filter.since.map(utc_day);
    let until_day = filter.until.map(utc_day);
    let newest = listing.segments.last().map(|segment| segment.number);
    for segment in &listing.segments {
        if since_day.is_some_and(|since| segment.date < since) {
            continue;
        }
        if until_day.is_some_and(|until| segment.date > until) {
            break;
        }

        let name = segment.to_string();
        let path = dir.join(&name);
        let mut lines = Lines::open(&path).map_err(io_error(&path))?;
        loop {
            let line = match lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(LineError::Io(source)) => return Err(io_error(&path)(source)),
                Err(LineError::TooLong(line)) => {
                    let at = Location { file: name, line };
                    return Err(QueryError::LineTooLong { at });
                }
            };
            let at = Location {
                file: name.clone(),
                line: line.number,
            };
            if !line.complete {
                if Some(segment.number) == newest {
                    break;
                }
                return Err(QueryError::IncompleteLine { at });
            }
            let record: Record =
                serde_json::from_slice(line.bytes).map_err(|error| QueryError::InvalidRecord {
                    at,
                    detail: error.to_string(),
                })?;
            if filter.matches(&record) {
                records.push(record);
                if records.len() >= limit {
                    return Ok(records);
                }
            }
        }
    }
    Ok(records)
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> QueryError + '_ {
    move |source| QueryError::Io {
        path: path.to_owned(),
        source,
    }
}
