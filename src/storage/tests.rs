//! Unit tests that need the private constructor: an in-memory store wrapped so that tests can see
//! the parts and aborts of an upload and make parts fail or stall.

use std::ffi::OsStr;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::FutureExt;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum PartBehavior {
    Succeed,
    Fail,
    /// The part's future never completes.
    Stall,
}

#[derive(Default, Debug)]
struct UploadLog {
    part_sizes: Vec<usize>,
    aborts: usize,
    completes: usize,
}

#[derive(Debug)]
struct RecordingStore {
    inner: InMemory,
    parts: PartBehavior,
    fail_complete: bool,
    log: Arc<Mutex<UploadLog>>,
}

#[derive(Debug)]
struct RecordingUpload {
    inner: Box<dyn MultipartUpload>,
    parts: PartBehavior,
    fail_complete: bool,
    log: Arc<Mutex<UploadLog>>,
}

fn test_failure(message: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "RecordingStore",
        source: message.to_owned().into(),
    }
}

impl fmt::Display for RecordingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordingStore")
    }
}

#[async_trait]
impl ObjectStore for RecordingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(RecordingUpload {
            inner,
            parts: self.parts,
            fail_complete: self.fail_complete,
            log: Arc::clone(&self.log),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[async_trait]
impl MultipartUpload for RecordingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.log
            .lock()
            .unwrap()
            .part_sizes
            .push(data.content_length());
        match self.parts {
            PartBehavior::Succeed => self.inner.put_part(data),
            PartBehavior::Fail => futures::future::ready(Err(test_failure("part failed"))).boxed(),
            PartBehavior::Stall => futures::future::pending().boxed(),
        }
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.log.lock().unwrap().completes += 1;
        if self.fail_complete {
            return Err(test_failure("complete failed"));
        }
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.log.lock().unwrap().aborts += 1;
        self.inner.abort().await
    }
}

fn recording_storage(parts: PartBehavior, fail_complete: bool) -> (Storage, Arc<Mutex<UploadLog>>) {
    recording_storage_on(Backend::Memory, parts, fail_complete)
}

/// Builds a recording store that part sizes and bounds treat as `backend`.
fn recording_storage_on(
    backend: Backend,
    parts: PartBehavior,
    fail_complete: bool,
) -> (Storage, Arc<Mutex<UploadLog>>) {
    let log = Arc::new(Mutex::new(UploadLog::default()));
    let store = RecordingStore {
        inner: InMemory::new(),
        parts,
        fail_complete,
        log: Arc::clone(&log),
    };
    let storage = Storage::from_store(Arc::new(store), backend, memory_namespace());
    (storage, log)
}

fn object_id(practice: &str, call: &str, artifact: &str) -> ObjectId {
    ObjectId::new(
        PracticeId::new(practice).unwrap(),
        CallId::new(call).unwrap(),
        ArtifactName::new(artifact).unwrap(),
    )
}

fn pattern(length: usize, seed: u8) -> Bytes {
    (0..length)
        .map(|index| (index % 251) as u8 ^ seed)
        .collect::<Vec<u8>>()
        .into()
}

#[test]
fn object_path_follows_layout() {
    let id = object_id("clinic-7", "call_0123abcdef", "recording.wav");
    assert_eq!(
        object_path(&id).as_ref(),
        "clinic-7/calls/call_0123abcdef/recording.wav"
    );

    let prefix = call_prefix(&id.practice, &id.call);
    assert_eq!(prefix.as_ref(), "clinic-7/calls/call_0123abcdef");
}

#[test]
fn object_path_keeps_ids_unencoded() {
    // Every character class of the id grammar, and dot-only names other than `.` and `..`.
    let id = object_id("AZaz09-_.", "...", ".hidden");
    let path = object_path(&id);
    assert_eq!(path.as_ref(), "AZaz09-_./calls/.../.hidden");

    let parts: Vec<String> = path.parts().map(|part| part.as_ref().to_owned()).collect();
    assert_eq!(parts, ["AZaz09-_.", "calls", "...", ".hidden"]);
}

#[test]
fn staged_upload_name_matches_object_store() {
    for name in ["recording.wav#1", "a#0123", "...#9"] {
        assert!(local::is_staged_upload_name(OsStr::new(name)), "{name:?}");
    }
    for name in [
        "recording.wav",
        "a#",
        "#1",
        "a#b",
        "a#1x",
        "a b#1",
        "a#1#2",
        "a#-1",
        ".#1",
    ] {
        assert!(!local::is_staged_upload_name(OsStr::new(name)), "{name:?}");
    }
}

#[tokio::test]
async fn upload_writes_fixed_size_parts() {
    let (storage, log) = recording_storage(PartBehavior::Succeed, false);
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    let mut expected = Vec::new();
    // One chunk larger than a part, then small odd chunks across a part boundary.
    let sizes = [
        LOCAL_PART_SIZE + LOCAL_PART_SIZE / 2,
        1,
        65_537,
        LOCAL_PART_SIZE / 2,
        123,
    ];
    for (index, size) in sizes.into_iter().enumerate() {
        let chunk = pattern(size, index as u8);
        expected.extend_from_slice(&chunk);
        upload.write(chunk).await.unwrap();
    }
    let total = expected.len() as u64;
    assert_eq!(upload.size(), total);
    assert_eq!(upload.commit().await.unwrap(), total);

    let tail = expected.len() - 2 * LOCAL_PART_SIZE;
    assert_eq!(
        log.lock().unwrap().part_sizes,
        [LOCAL_PART_SIZE, LOCAL_PART_SIZE, tail]
    );
    assert_eq!(log.lock().unwrap().aborts, 0);

    let stored = storage.get_range(&id, 0..total).await.unwrap();
    assert!(
        stored == expected,
        "stored object differs from the written bytes"
    );
}

#[tokio::test]
async fn s3_upload_writes_minimum_size_parts() {
    let backend = Backend::S3 {
        bucket: "bucket".into(),
    };
    let (storage, log) = recording_storage_on(backend, PartBehavior::Succeed, false);
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    let chunk_len = 4 * 1024 * 1024;
    for index in 0..3 {
        upload.write(pattern(chunk_len, index)).await.unwrap();
    }
    let total = 3 * chunk_len;
    assert_eq!(upload.commit().await.unwrap(), total as u64);

    // S3 rejects a part below 5 MiB unless it is the last one.
    assert_eq!(PART_SIZE, 5 * 1024 * 1024);
    let tail = total - 2 * PART_SIZE;
    assert_eq!(log.lock().unwrap().part_sizes, [PART_SIZE, PART_SIZE, tail]);
    assert_eq!(storage.max_upload_buffer(), MAX_UPLOAD_BUFFER);
}

#[test]
fn local_and_memory_parts_are_small() {
    assert_eq!(
        Storage::in_memory().max_upload_buffer(),
        LOCAL_MAX_UPLOAD_BUFFER
    );
    let local = Backend::Local {
        root: std::path::PathBuf::from("/"),
    };
    assert_eq!(local.part_size(), LOCAL_PART_SIZE);
    // What `LOCAL_PART_SIZE` promises: 256 uploads buffer at most 192 MiB of parts.
    const { assert!(256 * LOCAL_MAX_UPLOAD_BUFFER <= 192 * 1024 * 1024) };
}

#[tokio::test]
async fn dropped_upload_is_aborted() {
    let (storage, log) = recording_storage(PartBehavior::Succeed, false);
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    upload.write(pattern(LOCAL_PART_SIZE + 1, 1)).await.unwrap();
    drop(upload);
    storage.wait_for_background_tasks().await;

    assert_eq!(log.lock().unwrap().aborts, 1);
    assert_eq!(log.lock().unwrap().completes, 0);
    assert_eq!(storage.head(&id).await.unwrap(), None);
}

#[tokio::test]
async fn failed_part_aborts_upload() {
    let (storage, log) = recording_storage(PartBehavior::Fail, false);
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    // The third part waits for the first, whose failure surfaces here.
    let error = upload
        .write(pattern(3 * LOCAL_PART_SIZE, 1))
        .await
        .unwrap_err();
    assert!(matches!(error, StorageError::Backend { .. }), "{error:?}");
    assert_eq!(log.lock().unwrap().aborts, 1);

    let error = upload.write(pattern(1, 2)).await.unwrap_err();
    assert!(
        matches!(error, StorageError::UploadClosed { .. }),
        "{error:?}"
    );
    let error = upload.commit().await.unwrap_err();
    assert!(
        matches!(error, StorageError::UploadClosed { .. }),
        "{error:?}"
    );

    assert_eq!(log.lock().unwrap().completes, 0);
    assert_eq!(storage.head(&id).await.unwrap(), None);
}

#[tokio::test]
async fn failed_final_part_fails_commit() {
    let (storage, log) = recording_storage(PartBehavior::Fail, false);
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    upload.write(pattern(100, 1)).await.unwrap();
    let error = upload.commit().await.unwrap_err();
    assert!(matches!(error, StorageError::Backend { .. }), "{error:?}");

    assert_eq!(log.lock().unwrap().completes, 0);
    assert_eq!(log.lock().unwrap().aborts, 1);
    assert_eq!(storage.head(&id).await.unwrap(), None);
}

#[tokio::test]
async fn failed_completion_fails_commit() {
    let (storage, log) = recording_storage(PartBehavior::Succeed, true);
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    upload.write(pattern(100, 1)).await.unwrap();
    let error = upload.commit().await.unwrap_err();
    assert!(matches!(error, StorageError::Backend { .. }), "{error:?}");

    assert_eq!(log.lock().unwrap().aborts, 1);
    assert_eq!(storage.head(&id).await.unwrap(), None);
}

#[tokio::test]
async fn interrupted_write_closes_upload() {
    let (storage, log) = recording_storage(PartBehavior::Stall, false);
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    // The third part waits for a stalled part, so one poll cannot finish the write.
    let finished = upload.write(pattern(3 * LOCAL_PART_SIZE, 1)).now_or_never();
    assert!(finished.is_none(), "write should wait for a part in flight");
    assert_eq!(log.lock().unwrap().part_sizes.len(), 2, "parts in flight");

    let error = upload.write(pattern(1, 2)).await.unwrap_err();
    assert!(
        matches!(error, StorageError::UploadClosed { .. }),
        "{error:?}"
    );
    assert_eq!(log.lock().unwrap().aborts, 1);

    let error = upload.commit().await.unwrap_err();
    assert!(
        matches!(error, StorageError::UploadClosed { .. }),
        "{error:?}"
    );
    assert_eq!(log.lock().unwrap().completes, 0);
}

#[tokio::test]
async fn cancelled_commit_still_completes() {
    let storage = Storage::in_memory();
    let id = object_id("p", "c", "a");
    let key = storage.inner.commit_lock_key(&object_path(&id));

    let mut upload = storage.start_upload(&id).await.unwrap();
    upload.write(pattern(1000, 1)).await.unwrap();

    // While the lock is held the commit cannot finish, so the caller gives up on it.
    let held_lock = commit_lock::lock(key.clone()).await;
    assert!(
        upload.commit().now_or_never().is_none(),
        "commit finished despite the held lock"
    );
    drop(held_lock);

    storage.wait_for_background_tasks().await;
    assert_eq!(storage.head(&id).await.unwrap(), Some(1000));
    assert!(!commit_lock::is_live(&key), "lock entry should be released");
}

#[tokio::test]
async fn error_messages_name_path_only() {
    let storage = Storage::in_memory();
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    upload
        .write(Bytes::from_static(b"secret-canary"))
        .await
        .unwrap();
    upload.commit().await.unwrap();

    let mut second = storage.start_upload(&id).await.unwrap();
    second
        .write(Bytes::from_static(b"other-canary"))
        .await
        .unwrap();
    let message = second.commit().await.unwrap_err().to_string();
    assert_eq!(message, "object p/calls/c/a already exists");

    let message = storage
        .get_range(&id, 5..100)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "invalid range 5..100 for object p/calls/c/a of 13 bytes"
    );
    assert!(!message.contains("canary"));
}

/// Checks at compile time that the futures the server spawns are `Send`.
#[allow(dead_code)]
fn storage_futures_are_send(storage: &Storage, upload: &mut Upload, id: &ObjectId) {
    fn assert_send<T: Send>(_: T) {}
    assert_send(storage.start_upload(id));
    assert_send(storage.head(id));
    assert_send(storage.get_range(id, 0..1));
    assert_send(storage.get_range_stream(id, 0..1));
    assert_send(storage.list_call(&id.practice, &id.call));
    assert_send(storage.delete(id));
    assert_send(storage.check());
    assert_send(upload.write(Bytes::new()));
}
