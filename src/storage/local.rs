//! Local filesystem helpers: opening the root, removing stale temporary upload files, and
//! streaming a byte range of a file in chunks of [`READ_CHUNK_SIZE`].

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

use super::{READ_CHUNK_SIZE, Result, StorageError};
use crate::ids::{ArtifactName, CallId, PracticeId};

/// Canonicalizes `root`, checks that it is a directory and removes the stale temporary upload
/// files under it. Returns the canonical root and the number of files removed.
pub(super) fn prepare_root(root: &Path) -> Result<(PathBuf, usize)> {
    let invalid_root = |source| StorageError::InvalidRoot {
        path: root.to_path_buf(),
        source,
    };
    let canonical = std::fs::canonicalize(root).map_err(invalid_root)?;
    if !std::fs::metadata(&canonical)
        .map_err(invalid_root)?
        .is_dir()
    {
        return Err(invalid_root(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }

    let removed = remove_stale_uploads(&canonical).map_err(|source| StorageError::Cleanup {
        path: canonical.clone(),
        source,
    })?;
    Ok((canonical, removed))
}

/// Removes the files named `{artifact}#{n}` in every `{practice}/calls/{call}/` directory under
/// `root`, and nothing else.
///
/// object_store 0.14's `LocalFileSystem` stages each multipart upload in such a file next to its
/// target and renames it at completion, so after a crash these are unfinished uploads. The id
/// grammar has no `#`, so no object is named like this. Directories that are not valid ids are
/// skipped, and symbolic links are never followed or removed.
fn remove_stale_uploads(root: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for practice_dir in subdirectories(root, |name| PracticeId::new(name).is_ok())? {
        let calls_dir = practice_dir.join("calls");
        if !std::fs::symlink_metadata(&calls_dir).is_ok_and(|metadata| metadata.is_dir()) {
            continue;
        }

        for call_dir in subdirectories(&calls_dir, |name| CallId::new(name).is_ok())? {
            for entry in std::fs::read_dir(&call_dir)? {
                let entry = entry?;
                if !entry.file_type()?.is_file() || !is_staged_upload_name(&entry.file_name()) {
                    continue;
                }

                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        removed += 1;
                        tracing::info!(
                            file = %entry.path().display(),
                            "removed stale temporary upload file"
                        );
                    }
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }
    Ok(removed)
}

/// Lists the subdirectories of `dir` (not following symbolic links) whose names pass `accept`.
fn subdirectories(dir: &Path, accept: impl Fn(&str) -> bool) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_dir() && name.to_str().is_some_and(&accept) {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Returns whether `name` is `{artifact}#{n}`: a valid artifact name, `#`, and one or more
/// decimal digits, which is how object_store names a staged upload of that artifact.
pub(super) fn is_staged_upload_name(name: &OsStr) -> bool {
    let Some((artifact, counter)) = name.to_str().and_then(|name| name.rsplit_once('#')) else {
        return false;
    };
    ArtifactName::new(artifact).is_ok()
        && !counter.is_empty()
        && counter.bytes().all(|byte| byte.is_ascii_digit())
}

/// Streams the bytes `range` of `file` in chunks of at most [`READ_CHUNK_SIZE`] bytes, each read
/// on the blocking thread pool. A file shorter than the range ends the stream with an error.
pub(super) fn file_range_stream(
    file: File,
    range: Range<u64>,
    object: String,
) -> BoxStream<'static, Result<Bytes>> {
    let state = Some((file, range.start));
    futures::stream::try_unfold(state, move |state| {
        let object = object.clone();
        let end = range.end;
        async move {
            let Some((file, offset)) = state else {
                return Ok(None);
            };
            if offset >= end {
                return Ok(None);
            }

            let length = (end - offset).min(READ_CHUNK_SIZE as u64) as usize;
            let (file, chunk) = tokio::task::spawn_blocking(move || read_at(file, offset, length))
                .await
                .map_err(|source| backend_error(&object, source.into()))?
                .map_err(|source| backend_error(&object, local_error(source)))?;

            let next = offset + chunk.len() as u64;
            Ok(Some((chunk, Some((file, next)))))
        }
    })
    .boxed()
}

fn read_at(mut file: File, offset: u64, length: usize) -> io::Result<(File, Bytes)> {
    file.seek(SeekFrom::Start(offset))?;
    let mut buffer = vec![0; length];
    file.read_exact(&mut buffer)?;
    Ok((file, Bytes::from(buffer)))
}

fn local_error(source: io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: Box::new(source),
    }
}

fn backend_error(object: &str, source: object_store::Error) -> StorageError {
    StorageError::Backend {
        path: object.to_owned(),
        source,
    }
}
