//! Object storage for encrypted call data, built on the `object_store` crate.
//!
//! Every object lives at `{practice}/calls/{call}/{artifact}` (see [`object_path`]). The path is
//! built only from the validated ids of [`crate::ids`], so each component is one inert path
//! segment that object_store stores as is: no encoding, no `/`, no `.` or `..`, no `#`.
//!
//! The module keeps these invariants:
//!
//! - **Atomic writes.** An [`Upload`] streams parts to the backend, and nothing is readable at the
//!   object's path until [`Upload::commit`] returns. An aborted, failed or dropped upload leaves
//!   nothing readable. On the local filesystem, object_store 0.14 writes the parts to a temporary
//!   file next to the target, named `{artifact}#{n}` with `n` a decimal counter, and commit
//!   renames that file into place.
//! - **Create-only writes.** Within one process, a commit never replaces an existing object: it
//!   fails with [`StorageError::AlreadyExists`] instead, also when a racing upload of the same
//!   path committed first, because the commits of one path are serialized and each checks for an
//!   existing object before it completes. Commits from several processes to one path can still
//!   race, as the NOTE at `commit_in_background` in `upload.rs` explains.
//! - **Bounded memory.** An upload buffers at most [`Storage::max_upload_buffer`] bytes of data at
//!   a time, whatever the chunk sizes and the object size: [`LOCAL_MAX_UPLOAD_BUFFER`] (768 KiB)
//!   on the local filesystem and in memory, [`MAX_UPLOAD_BUFFER`] (15 MiB) on S3. A streamed read
//!   holds one chunk of at most [`READ_CHUNK_SIZE`] bytes on the local filesystem.
//! - **Crash cleanup.** [`Storage::open_local`] removes the temporary files that a crashed
//!   process left behind (only names of the form above, only inside the object layout).
//!
//! The backends are the local filesystem ([`Storage::open_local`], the default) and an in-memory
//! store for tests ([`Storage::in_memory`]). Each is an `Arc<dyn ObjectStore>` behind [`Storage`],
//! so an S3 backend (object_store's `AmazonS3`) needs only a new constructor.
//!
//! Stored sizes are not trusted on their own: the caller authenticates the final frame of the
//! envelope before it returns a size or plaintext to a client.

mod commit_lock;
mod local;
mod upload;

#[cfg(test)]
mod tests;

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{GetOptions, GetResult, GetResultPayload, ObjectStore, ObjectStoreExt};
use tokio::sync::Notify;

use crate::ids::{ArtifactName, CallId, ObjectId, PracticeId};

pub use upload::Upload;

/// Size in bytes of each multipart part that an [`Upload`] to S3 writes, except the last part,
/// which may be shorter. It is also the largest part size of any backend.
///
/// 5 MiB is the smallest part size that S3 accepts, and S3 allows at most 10,000 parts (AWS S3
/// user guide, "Amazon S3 multipart upload limits"), so objects can reach about 48.8 GiB.
pub const PART_SIZE: usize = 5 * 1024 * 1024;

/// Size in bytes of each part that an [`Upload`] to the local filesystem or to memory writes,
/// except the last part.
///
/// These backends have no minimum part size, and every upload keeps its parts in memory until
/// they are written, so small parts keep many concurrent uploads cheap: 256 uploads buffer at most
/// 192 MiB. On the local filesystem each part is one positioned write to the staged file.
pub const LOCAL_PART_SIZE: usize = 256 * 1024;

/// Maximum number of parts of one [`Upload`] that are being written to the backend at once.
pub const MAX_PARTS_IN_FLIGHT: usize = 2;

/// Maximum bytes of object data that one [`Upload`] to S3 buffers in memory: the parts in flight
/// plus the part being filled. No backend buffers more.
///
/// Chunks are buffered without copying, so a chunk that is a slice of a larger buffer keeps that
/// whole buffer alive until its part is written.
pub const MAX_UPLOAD_BUFFER: usize = (MAX_PARTS_IN_FLIGHT + 1) * PART_SIZE;

/// Maximum bytes of object data that one [`Upload`] to the local filesystem or to memory buffers,
/// counted as for [`MAX_UPLOAD_BUFFER`].
pub const LOCAL_MAX_UPLOAD_BUFFER: usize = (MAX_PARTS_IN_FLIGHT + 1) * LOCAL_PART_SIZE;

/// Maximum size in bytes of one chunk that [`Storage::get_range_stream`] reads from a local file.
///
/// Other backends yield the chunks that their client receives.
pub const READ_CHUNK_SIZE: usize = 256 * 1024;

/// A failed storage operation.
///
/// Messages name the object path (ids are not secret) and never object contents.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {path} not found")]
    NotFound { path: String },

    #[error("object {path} already exists")]
    AlreadyExists { path: String },

    #[error("invalid range {start}..{end} for object {path} of {size} bytes")]
    InvalidRange {
        path: String,
        start: u64,
        end: u64,
        size: u64,
    },

    #[error("upload of {path} is closed after an earlier failure or interrupted write")]
    UploadClosed { path: String },

    #[error("storage root {path} is not an accessible directory")]
    InvalidRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to remove stale temporary upload files under {path}")]
    Cleanup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("storage backend failed on {path}")]
    Backend {
        path: String,
        #[source]
        source: object_store::Error,
    },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A handle on one object store. Clones share the store.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    backend: Backend,
    /// Prefix of the commit lock keys, unique per store in this process: the canonical root of a
    /// local store, so that two handles opened on one directory share their locks.
    lock_namespace: String,
    background: Arc<BackgroundTasks>,
}

enum Backend {
    Local { root: PathBuf },
    Memory,
    S3 { bucket: String },
}

impl Backend {
    /// Returns the size of every part of an upload but the last: S3's minimum on S3, smaller
    /// elsewhere.
    fn part_size(&self) -> usize {
        match self {
            Backend::Local { .. } | Backend::Memory => LOCAL_PART_SIZE,
            Backend::S3 { .. } => PART_SIZE,
        }
    }
}

/// Counts the tasks that run on after their caller returned: spawned aborts of dropped uploads
/// and commits whose caller was cancelled.
#[derive(Default)]
struct BackgroundTasks {
    running: AtomicUsize,
    idle: Notify,
}

/// Returns the storage path of an object: `{practice}/calls/{call}/{artifact}`.
pub fn object_path(id: &ObjectId) -> Path {
    Path::from_iter([
        id.practice.as_str(),
        "calls",
        id.call.as_str(),
        id.artifact.as_str(),
    ])
}

/// Returns the storage prefix of a call's objects: `{practice}/calls/{call}`.
pub fn call_prefix(practice: &PracticeId, call: &CallId) -> Path {
    Path::from_iter([practice.as_str(), "calls", call.as_str()])
}

impl Storage {
    /// Opens the local filesystem store rooted at `root`, which must be an existing directory.
    ///
    /// Before it returns, it removes the temporary upload files that a crashed process left
    /// behind: files named `{artifact}#{n}` (`n` decimal digits) in a call's directory, where
    /// object_store 0.14 stages multipart uploads. Committed objects are not touched. Writes are
    /// fsynced (file and directory) before a commit returns.
    ///
    /// NOTE: only one process may use a root at a time, because this cleanup also removes the
    /// temporary files of another process's uploads in progress (those uploads then fail at
    /// commit, and no committed object is affected).
    pub async fn open_local(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let blocking_root = root.clone();
        let (root, removed) =
            tokio::task::spawn_blocking(move || local::prepare_root(&blocking_root))
                .await
                .map_err(|source| StorageError::Backend {
                    path: root.display().to_string(),
                    source: source.into(),
                })??;

        let store = LocalFileSystem::new_with_prefix(&root)
            .map_err(|source| StorageError::Backend {
                path: root.display().to_string(),
                source,
            })?
            .with_fsync(true)
            .with_automatic_cleanup(true);

        tracing::info!(
            root = %root.display(),
            removed_temporary_files = removed,
            "opened local object storage"
        );
        let lock_namespace = format!("local:{}", root.display());
        Ok(Self::from_store(
            Arc::new(store),
            Backend::Local { root },
            lock_namespace,
        ))
    }

    /// Opens an S3 bucket or an S3-compatible store. Credentials come from the environment
    /// (`AWS_ACCESS_KEY_ID`, web identity, container or instance credentials), as object_store's
    /// `AmazonS3Builder::from_env` reads them.
    ///
    /// NOTE: create-only commits are enforced by a per-process lock and an existence check, so
    /// two gateway replicas writing one path at the same moment could both succeed; the later
    /// completion then replaces the earlier object.
    pub fn open_s3(settings: &crate::config::S3Settings) -> Result<Self> {
        // object_store's reqwest client (feature `rustls-no-provider`) panics at build time unless
        // a process-wide rustls provider is installed; an earlier installation is kept.
        let _ = crate::tls::crypto_provider().install_default();
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_allow_http(settings.allow_http);
        if let Some(endpoint) = &settings.endpoint_url {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder
            .build()
            .map_err(|source| classify_str(&format!("s3://{}", settings.bucket), source))?;
        let prefix = settings
            .prefix
            .as_deref()
            .map(|p| p.trim_matches('/'))
            .filter(|p| !p.is_empty());
        let store: Arc<dyn ObjectStore> = match prefix {
            Some(prefix) => Arc::new(object_store::prefix::PrefixStore::new(store, prefix)),
            None => Arc::new(store),
        };
        let namespace = format!("s3:{}/{}", settings.bucket, prefix.unwrap_or_default());
        tracing::info!(bucket = %settings.bucket, region = %settings.region, "opened S3 object storage");
        Ok(Self::from_store(
            store,
            Backend::S3 {
                bucket: settings.bucket.clone(),
            },
            namespace,
        ))
    }

    /// Creates an empty in-memory store, for tests.
    pub fn in_memory() -> Self {
        Self::from_store(
            Arc::new(InMemory::new()),
            Backend::Memory,
            memory_namespace(),
        )
    }

    fn from_store(store: Arc<dyn ObjectStore>, backend: Backend, lock_namespace: String) -> Self {
        let inner = Inner {
            store,
            backend,
            lock_namespace,
            background: Arc::default(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Starts an upload of the object `id`. Nothing is readable at its path until
    /// [`Upload::commit`] returns.
    ///
    /// It does not check whether the object exists: call [`Storage::exists`] before accepting a
    /// body, and the commit rejects an existing object in any case.
    pub async fn start_upload(&self, id: &ObjectId) -> Result<Upload> {
        Upload::start(Arc::clone(&self.inner), object_path(id)).await
    }

    /// Returns the most bytes of object data that one [`Upload`] to this store buffers in memory.
    pub fn max_upload_buffer(&self) -> usize {
        (MAX_PARTS_IN_FLIGHT + 1) * self.inner.backend.part_size()
    }

    /// Returns the stored size of the object `id` in bytes, or `None` if it does not exist.
    pub async fn head(&self, id: &ObjectId) -> Result<Option<u64>> {
        self.inner.head_path(&object_path(id)).await
    }

    /// Returns whether the object `id` exists: the cheap check before accepting an upload body.
    pub async fn exists(&self, id: &ObjectId) -> Result<bool> {
        Ok(self.head(id).await?.is_some())
    }

    /// Reads the bytes `range` of the object `id` into memory.
    ///
    /// The range must lie inside the object (`start <= end <= size`), otherwise the result is
    /// [`StorageError::InvalidRange`]. An empty range inside the object returns no bytes.
    pub async fn get_range(&self, id: &ObjectId, range: Range<u64>) -> Result<Bytes> {
        let path = object_path(id);
        let Some(result) = self.inner.open_range(&path, range).await? else {
            return Ok(Bytes::new());
        };
        result
            .bytes()
            .await
            .map_err(|source| classify(&path, source))
    }

    /// Streams the bytes `range` of the object `id`, with the range rules of
    /// [`Storage::get_range`].
    ///
    /// The object is opened before this returns, so a missing object or an invalid range fails
    /// here and not in the stream.
    pub async fn get_range_stream(
        &self,
        id: &ObjectId,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let path = object_path(id);
        let Some(result) = self.inner.open_range(&path, range).await? else {
            return Ok(futures::stream::empty().boxed());
        };

        let object = path.to_string();
        match result.payload {
            GetResultPayload::File(file, _) => {
                Ok(local::file_range_stream(file, result.range, object))
            }
            GetResultPayload::Stream(stream) => Ok(stream
                .map_err(move |source| classify_str(&object, source))
                .boxed()),
        }
    }

    /// Lists the artifacts of one call with their stored sizes, sorted by name.
    ///
    /// Entries whose name is not a valid [`ArtifactName`] are skipped (temporary upload files,
    /// files placed by hand). A call without objects has an empty list.
    pub async fn list_call(
        &self,
        practice: &PracticeId,
        call: &CallId,
    ) -> Result<Vec<(ArtifactName, u64)>> {
        let prefix = call_prefix(practice, call);
        let listing = match self.inner.store.list_with_delimiter(Some(&prefix)).await {
            Ok(listing) => listing,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(source) => return Err(classify(&prefix, source)),
        };

        let mut artifacts: Vec<(ArtifactName, u64)> = listing
            .objects
            .into_iter()
            .filter_map(|meta| {
                let artifact = ArtifactName::new(meta.location.filename()?).ok()?;
                Some((artifact, meta.size))
            })
            .collect();
        artifacts.sort();
        Ok(artifacts)
    }

    /// Lists every object of a practice whose artifact name starts with `artifact_prefix`, across
    /// all of its calls. Entries that do not follow the layout are skipped.
    ///
    /// NOTE: this walks the practice's whole tree, so its cost grows with the number of stored
    /// objects; it runs at start-up only.
    pub async fn find_artifacts(
        &self,
        practice: &PracticeId,
        artifact_prefix: &str,
    ) -> Result<Vec<ObjectId>> {
        let prefix = Path::from_iter([practice.as_str(), "calls"]);
        let mut listing = self.inner.store.list(Some(&prefix));
        let mut found = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = match meta {
                Ok(meta) => meta,
                Err(object_store::Error::NotFound { .. }) => break,
                Err(source) => return Err(classify(&prefix, source)),
            };
            let parts: Vec<_> = meta.location.parts().collect();
            let [_, _, call, artifact] = parts.as_slice() else {
                continue;
            };
            if !artifact.as_ref().starts_with(artifact_prefix) {
                continue;
            }
            let (Ok(call), Ok(artifact)) = (
                CallId::new(call.as_ref()),
                ArtifactName::new(artifact.as_ref()),
            ) else {
                continue;
            };
            found.push(ObjectId::new(practice.clone(), call, artifact));
        }
        found.sort();
        Ok(found)
    }

    /// Replaces the first `old_header_len` bytes of the object `id` with `header` and keeps the
    /// rest, for key rotation; returns the new size.
    ///
    /// The new object is written under a staging path outside the call layout,
    /// `{practice}/rewrap/{call}/{artifact}`, and then renamed over the old one, so readers see
    /// the old object or the new one, never a mix: an atomic rename on the local filesystem, a
    /// copy then delete on S3. A staging object left by an interrupted run is replaced.
    pub async fn replace_header(
        &self,
        id: &ObjectId,
        header: Bytes,
        old_header_len: u64,
    ) -> Result<u64> {
        let path = object_path(id);
        let size = self.head(id).await?.ok_or_else(|| StorageError::NotFound {
            path: path.to_string(),
        })?;
        let staging = Path::from_iter([
            id.practice.as_str(),
            "rewrap",
            id.call.as_str(),
            id.artifact.as_str(),
        ]);
        match self.inner.store.delete(&staging).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => return Err(classify(&staging, source)),
        }

        let mut upload = Upload::start(Arc::clone(&self.inner), staging.clone()).await?;
        upload.write(header).await?;
        let mut body = self.get_range_stream(id, old_header_len..size).await?;
        while let Some(chunk) = body.next().await {
            upload.write(chunk?).await?;
        }
        let new_size = upload.commit().await?;
        self.inner
            .store
            .rename(&staging, &path)
            .await
            .map_err(|source| classify(&path, source))?;
        Ok(new_size)
    }

    /// Deletes the object `id`. Deleting an object that does not exist succeeds, as on S3, so a
    /// caller that must report a missing object calls [`Storage::head`] first.
    pub async fn delete(&self, id: &ObjectId) -> Result<()> {
        let path = object_path(id);
        match self.inner.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(classify(&path, source)),
        }
    }

    /// Checks that the store is reachable, for a readiness probe: the local root must still be a
    /// directory, and listing the top level of the store must succeed.
    pub async fn check(&self) -> Result<()> {
        if let Backend::Local { root } = &self.inner.backend {
            let metadata =
                tokio::fs::metadata(root)
                    .await
                    .map_err(|source| StorageError::InvalidRoot {
                        path: root.clone(),
                        source,
                    })?;
            if !metadata.is_dir() {
                let source =
                    std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory");
                return Err(StorageError::InvalidRoot {
                    path: root.clone(),
                    source,
                });
            }
        }

        let root_label = match &self.inner.backend {
            Backend::Local { root } => root.display().to_string(),
            Backend::Memory => "the in-memory store".to_owned(),
            Backend::S3 { bucket } => format!("s3://{bucket}"),
        };
        self.inner
            .store
            .list_with_delimiter(None)
            .await
            .map_err(|source| classify_str(&root_label, source))?;
        Ok(())
    }

    /// Waits until the background tasks of this store have finished: the aborts of uploads
    /// dropped without commit, and commits whose caller stopped waiting. Call it at shutdown
    /// after the last request.
    pub async fn wait_for_background_tasks(&self) {
        self.inner.background.wait_idle().await;
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.backend {
            Backend::Local { root } => f.debug_struct("Storage").field("local_root", root).finish(),
            Backend::Memory => f
                .debug_struct("Storage")
                .field("backend", &"memory")
                .finish(),
            Backend::S3 { bucket } => f
                .debug_struct("Storage")
                .field("s3_bucket", bucket)
                .finish(),
        }
    }
}

impl Inner {
    fn commit_lock_key(&self, path: &Path) -> String {
        format!("{}\n{}", self.lock_namespace, path)
    }

    async fn head_path(&self, path: &Path) -> Result<Option<u64>> {
        match self.store.head(path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(classify(path, source)),
        }
    }

    /// Opens `range` of the object at `path` after checking it against the object's size.
    /// Returns `None` for an empty range inside the object.
    async fn open_range(&self, path: &Path, range: Range<u64>) -> Result<Option<GetResult>> {
        let invalid = |size| StorageError::InvalidRange {
            path: path.to_string(),
            start: range.start,
            end: range.end,
            size,
        };

        // object_store rejects empty and reversed ranges before it looks at the object, so these
        // are checked here against the stored size.
        if range.start >= range.end {
            let size = self.head_path(path).await?.ok_or_else(|| not_found(path))?;
            if range.start > range.end || range.end > size {
                return Err(invalid(size));
            }
            return Ok(None);
        }

        let options = GetOptions {
            range: Some(range.clone().into()),
            ..GetOptions::default()
        };
        match self.store.get_opts(path, options).await {
            // The backends shorten a range that ends past the object instead of failing.
            Ok(result) if result.range != range => Err(invalid(result.meta.size)),
            Ok(result) => Ok(Some(result)),
            Err(object_store::Error::NotFound { .. }) => Err(not_found(path)),
            Err(source) => {
                // A range that starts past the end fails with a generic error, so a head request
                // decides whether the range was the cause.
                match self.head_path(path).await {
                    Ok(Some(size)) if range.end > size => Err(invalid(size)),
                    Ok(None) => Err(not_found(path)),
                    _ => Err(classify(path, source)),
                }
            }
        }
    }
}

impl BackgroundTasks {
    /// Spawns `task` on the current runtime and counts it until it finishes or is dropped.
    fn spawn<T: Send + 'static>(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        task: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.running.fetch_add(1, Ordering::AcqRel);
        let running = RunningTask(Arc::clone(self));
        runtime.spawn(async move {
            let _running = running;
            task.await
        })
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registering before the check means a task that finishes in between still wakes
            // this waiter.
            notified.as_mut().enable();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Decrements the count of running background tasks when dropped.
struct RunningTask(Arc<BackgroundTasks>);

impl Drop for RunningTask {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn memory_namespace() -> String {
    static NEXT_MEMORY_STORE: AtomicU64 = AtomicU64::new(0);
    format!(
        "memory:{}",
        NEXT_MEMORY_STORE.fetch_add(1, Ordering::Relaxed)
    )
}

fn not_found(path: &Path) -> StorageError {
    StorageError::NotFound {
        path: path.to_string(),
    }
}

/// Maps an object_store error on `path` to the matching [`StorageError`] variant.
fn classify(path: &Path, source: object_store::Error) -> StorageError {
    classify_str(path.as_ref(), source)
}

fn classify_str(path: &str, source: object_store::Error) -> StorageError {
    let path = path.to_owned();
    match source {
        object_store::Error::NotFound { .. } => StorageError::NotFound { path },
        object_store::Error::AlreadyExists { .. } => StorageError::AlreadyExists { path },
        source => StorageError::Backend { path, source },
    }
}
