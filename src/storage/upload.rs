//! Streamed, create-only uploads.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};

use super::{Inner, MAX_PARTS_IN_FLIGHT, Result, StorageError, classify, commit_lock};

/// An object being written. Its data becomes readable only when [`Upload::commit`] returns.
///
/// [`Upload::write`] accepts chunks of any size and sends them to the backend in parts of the
/// backend's part size: [`super::PART_SIZE`] on S3, [`super::LOCAL_PART_SIZE`] elsewhere. At most
/// [`MAX_PARTS_IN_FLIGHT`] parts are in flight, so the data it buffers is bounded by
/// [`super::Storage::max_upload_buffer`] and does not grow with the object.
///
/// Callers that stop early should await [`Upload::abort`]. Dropping an upload without commit
/// aborts it in a background task (see [`super::Storage::wait_for_background_tasks`]). Outside a
/// Tokio runtime the drop only releases what the backend frees on its own, which on the local
/// filesystem includes the temporary file.
pub struct Upload {
    storage: Arc<Inner>,
    path: Path,
    /// `None` once the upload was committed, aborted or failed.
    writer: Option<WriteMultipart>,
    /// Bytes per part, fixed for the upload.
    part_size: usize,
    size: u64,
    /// Set while a [`Upload::write`] runs. It stays set if that future is dropped halfway, and
    /// then an unknown prefix of the chunk was buffered, so the upload cannot continue.
    write_interrupted: bool,
}

impl Upload {
    pub(super) async fn start(storage: Arc<Inner>, path: Path) -> Result<Self> {
        let multipart = storage
            .store
            .put_multipart(&path)
            .await
            .map_err(|source| classify(&path, source))?;
        let part_size = storage.backend.part_size();
        let writer = WriteMultipart::new_with_chunk_size(multipart, part_size);
        Ok(Self {
            storage,
            path,
            writer: Some(writer),
            part_size,
            size: 0,
            write_interrupted: false,
        })
    }

    /// Returns the number of bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends `chunk` to the object, waiting while [`MAX_PARTS_IN_FLIGHT`] parts are in flight.
    ///
    /// A failed part aborts the upload and returns the error. Later calls then return
    /// [`StorageError::UploadClosed`], and so does every call after a `write` future that was
    /// dropped before it finished.
    pub async fn write(&mut self, mut chunk: Bytes) -> Result<()> {
        self.ensure_writable().await?;
        let Some(writer) = self.writer.as_mut() else {
            return Err(self.closed());
        };
        self.write_interrupted = true;

        let mut failure = None;
        while !chunk.is_empty() {
            // WriteMultipart sends a part each time its buffer reaches the part size, so the
            // bytes buffered now are the size modulo the part size.
            let buffered = (self.size % self.part_size as u64) as usize;
            let room = self.part_size - buffered;
            let piece = chunk.split_to(room.min(chunk.len()));

            // A piece that fills the buffer sends a part, so first wait until fewer than
            // MAX_PARTS_IN_FLIGHT parts are in flight.
            if piece.len() == room
                && let Err(source) = writer.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await
            {
                failure = Some(source);
                break;
            }
            self.size += piece.len() as u64;
            writer.put(piece);
        }

        if let Some(source) = failure {
            self.abort_after_failure().await;
            return Err(classify(&self.path, source));
        }
        self.write_interrupted = false;
        Ok(())
    }

    /// Writes the remaining parts and makes the object readable at its path, unless an object
    /// already exists there. Returns the object's size in bytes.
    ///
    /// An existing object makes it fail with [`StorageError::AlreadyExists`] and leaves that
    /// object unchanged. Any failure aborts the upload. The commit runs in a background task, so
    /// a caller that stops waiting does not leave it half done.
    pub async fn commit(mut self) -> Result<u64> {
        self.ensure_writable().await?;
        let Some(writer) = self.writer.take() else {
            return Err(self.closed());
        };

        let storage = Arc::clone(&self.storage);
        let commit = commit_in_background(storage, self.path.clone(), writer);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return commit.await.map(|()| self.size);
        };

        let task = self.storage.background.spawn(&runtime, commit);
        match task.await {
            Ok(result) => result.map(|()| self.size),
            Err(source) => Err(StorageError::Backend {
                path: self.path.to_string(),
                source: source.into(),
            }),
        }
    }

    /// Aborts the upload and removes what it wrote. Nothing becomes readable.
    pub async fn abort(mut self) -> Result<()> {
        match self.writer.take() {
            Some(writer) => writer
                .abort()
                .await
                .map_err(|source| classify(&self.path, source)),
            None => Ok(()),
        }
    }

    /// Aborts the upload if an earlier `write` was interrupted.
    async fn ensure_writable(&mut self) -> Result<()> {
        if self.write_interrupted {
            self.abort_after_failure().await;
            return Err(self.closed());
        }
        Ok(())
    }

    async fn abort_after_failure(&mut self) {
        if let Some(writer) = self.writer.take() {
            abort_and_log(writer, &self.path).await;
        }
    }

    fn closed(&self) -> StorageError {
        StorageError::UploadClosed {
            path: self.path.to_string(),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let path = self.path.clone();
                let task = async move { abort_and_log(writer, &path).await };
                drop(self.storage.background.spawn(&runtime, task));
            }
            Err(_) => drop(writer),
        }
    }
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload")
            .field("path", &self.path.as_ref())
            .field("size", &self.size)
            .field("open", &self.writer.is_some())
            .finish()
    }
}

/// Commits `writer` to `path` unless an object exists there.
///
/// NOTE: the lock serializes the commits of this process only. Two processes that commit the same
/// path (replicas sharing a filesystem, or an S3 bucket later) can both pass the existence check,
/// and then the later rename or multipart completion replaces the earlier object. object_store
/// 0.14 offers no create-only multipart completion that would close this gap.
async fn commit_in_background(
    storage: Arc<Inner>,
    path: Path,
    writer: WriteMultipart,
) -> Result<()> {
    let _lock = commit_lock::lock(storage.commit_lock_key(&path)).await;

    match storage.head_path(&path).await {
        Ok(None) => {}
        Ok(Some(_)) => {
            abort_and_log(writer, &path).await;
            return Err(StorageError::AlreadyExists {
                path: path.to_string(),
            });
        }
        Err(error) => {
            abort_and_log(writer, &path).await;
            return Err(error);
        }
    }

    // `finish` writes the last part, waits for all parts, completes the upload, and aborts it if
    // any of that fails. If the local rename itself fails, the temporary file stays until the
    // next `Storage::open_local`.
    writer
        .finish()
        .await
        .map_err(|source| classify(&path, source))?;
    tracing::debug!(object = %path, "committed object");
    Ok(())
}

async fn abort_and_log(writer: WriteMultipart, path: &Path) {
    if let Err(error) = writer.abort().await {
        tracing::warn!(object = %path, error = %error, "failed to abort upload");
    }
}
