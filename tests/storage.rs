//! Storage tests against real files in temporary directories and against the in-memory store.

use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::TryStreamExt;
use tempfile::TempDir;

use callseal::ids::{ArtifactName, CallId, ObjectId, PracticeId};
use callseal::storage::{PART_SIZE, READ_CHUNK_SIZE, Storage, StorageError};

fn object_id(practice: &str, call: &str, artifact: &str) -> ObjectId {
    ObjectId::new(
        PracticeId::new(practice).unwrap(),
        CallId::new(call).unwrap(),
        ArtifactName::new(artifact).unwrap(),
    )
}

/// Deterministic bytes that differ per `seed`, so a mixed-up or shifted object is detected.
fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|index| ((index % 251) as u8).wrapping_add(seed.wrapping_mul(31)))
        .collect()
}

fn file_path(root: &Path, id: &ObjectId) -> PathBuf {
    root.join(id.practice.as_str())
        .join("calls")
        .join(id.call.as_str())
        .join(id.artifact.as_str())
}

/// Lists every file (not directory) under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    files
}

async fn local_storage() -> (TempDir, Storage) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open_local(dir.path()).await.unwrap();
    (dir, storage)
}

/// Writes `data` in chunks of `chunk_size` bytes and commits it.
async fn put(storage: &Storage, id: &ObjectId, data: &[u8], chunk_size: usize) -> u64 {
    let mut upload = storage.start_upload(id).await.unwrap();
    for chunk in data.chunks(chunk_size) {
        upload.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    upload.commit().await.unwrap()
}

async fn read_stream(storage: &Storage, id: &ObjectId, range: Range<u64>) -> Vec<Bytes> {
    let stream = storage.get_range_stream(id, range).await.unwrap();
    stream.try_collect().await.unwrap()
}

async fn check_round_trip(storage: &Storage) -> Vec<u8> {
    let id = object_id("clinic-1", "call_00ff", "recording.wav");
    let data = pattern(2 * PART_SIZE + 1000, 1);

    let size = put(storage, &id, &data, 64 * 1024 + 13).await;
    assert_eq!(size, data.len() as u64);
    assert_eq!(storage.head(&id).await.unwrap(), Some(size));
    assert!(storage.exists(&id).await.unwrap());

    let whole = storage.get_range(&id, 0..size).await.unwrap();
    assert!(whole == data, "get_range returned different bytes");

    let streamed: Vec<u8> = read_stream(storage, &id, 0..size).await.concat();
    assert!(
        streamed == data,
        "get_range_stream returned different bytes"
    );

    let listed = storage.list_call(&id.practice, &id.call).await.unwrap();
    assert_eq!(listed, [(id.artifact.clone(), size)]);
    data
}

#[tokio::test]
async fn round_trip_multipart_local() {
    let (dir, storage) = local_storage().await;
    let data = check_round_trip(&storage).await;

    let id = object_id("clinic-1", "call_00ff", "recording.wav");
    let path = file_path(dir.path(), &id);
    assert_eq!(files_under(dir.path()), std::slice::from_ref(&path));
    assert!(
        std::fs::read(&path).unwrap() == data,
        "file on disk differs"
    );
}

#[tokio::test]
async fn round_trip_multipart_memory() {
    check_round_trip(&Storage::in_memory()).await;
}

#[tokio::test]
async fn round_trip_empty_object() {
    let (dir, storage) = local_storage().await;
    let id = object_id("p", "c", "empty");

    assert_eq!(put(&storage, &id, &[], 1).await, 0);
    assert_eq!(storage.head(&id).await.unwrap(), Some(0));
    assert!(storage.get_range(&id, 0..0).await.unwrap().is_empty());
    assert!(read_stream(&storage, &id, 0..0).await.is_empty());
    assert_eq!(
        std::fs::metadata(file_path(dir.path(), &id)).unwrap().len(),
        0
    );
}

async fn check_invisible_before_commit(storage: &Storage, root: Option<&Path>) {
    let id = object_id("p", "c", "transcript.json");
    let mut upload = storage.start_upload(&id).await.unwrap();
    upload
        .write(pattern(PART_SIZE + 7, 2).into())
        .await
        .unwrap();
    upload.write(pattern(5, 3).into()).await.unwrap();

    assert_eq!(storage.head(&id).await.unwrap(), None);
    assert!(!storage.exists(&id).await.unwrap());
    let error = storage.get_range(&id, 0..1).await.unwrap_err();
    assert!(matches!(error, StorageError::NotFound { .. }), "{error:?}");
    assert!(
        storage
            .list_call(&id.practice, &id.call)
            .await
            .unwrap()
            .is_empty()
    );
    if let Some(root) = root {
        assert!(
            !file_path(root, &id).exists(),
            "target file exists before commit"
        );
    }

    assert_eq!(upload.commit().await.unwrap(), PART_SIZE as u64 + 12);
    assert_eq!(
        storage.head(&id).await.unwrap(),
        Some(PART_SIZE as u64 + 12)
    );
}

#[tokio::test]
async fn upload_invisible_before_commit_local() {
    let (dir, storage) = local_storage().await;
    check_invisible_before_commit(&storage, Some(dir.path())).await;
}

#[tokio::test]
async fn upload_invisible_before_commit_memory() {
    check_invisible_before_commit(&Storage::in_memory(), None).await;
}

#[tokio::test]
async fn abort_leaves_nothing_local() {
    let (dir, storage) = local_storage().await;
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    upload
        .write(pattern(PART_SIZE + 100, 4).into())
        .await
        .unwrap();
    assert_eq!(
        files_under(dir.path()).len(),
        1,
        "expected one temporary file while writing"
    );
    upload.abort().await.unwrap();

    assert_eq!(storage.head(&id).await.unwrap(), None);
    assert_eq!(files_under(dir.path()), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn abort_leaves_nothing_memory() {
    let storage = Storage::in_memory();
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    upload
        .write(pattern(PART_SIZE + 100, 4).into())
        .await
        .unwrap();
    upload.abort().await.unwrap();

    assert_eq!(storage.head(&id).await.unwrap(), None);
    assert!(
        storage
            .list_call(&id.practice, &id.call)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn dropped_upload_leaves_nothing_local() {
    let (dir, storage) = local_storage().await;
    let id = object_id("p", "c", "a");

    let mut upload = storage.start_upload(&id).await.unwrap();
    upload
        .write(pattern(2 * PART_SIZE + 1, 5).into())
        .await
        .unwrap();
    drop(upload);
    storage.wait_for_background_tasks().await;

    assert_eq!(storage.head(&id).await.unwrap(), None);
    assert_eq!(files_under(dir.path()), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn open_removes_stale_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let id = object_id("clinic-1", "call_1", "recording.wav");
    let data = pattern(3000, 6);
    {
        let storage = Storage::open_local(dir.path()).await.unwrap();
        put(&storage, &id, &data, 1000).await;
    }

    // What a crash leaves: object_store's staged uploads, named `{artifact}#{n}`.
    let call_dir = dir.path().join("clinic-1/calls/call_1");
    let stale = [
        call_dir.join("recording.wav#1"),
        call_dir.join("transcript.json#42"),
    ];
    // Files that only look similar, or sit outside the object layout, are not ours to remove.
    let unrelated = [
        call_dir.join("notes#draft"),
        call_dir.join("#1"),
        dir.path().join("clinic-1/recording.wav#1"),
        dir.path().join("unrelated#1"),
    ];
    std::fs::create_dir_all(dir.path().join("clinic-2/calls/call_9")).unwrap();
    let other_call = dir.path().join("clinic-2/calls/call_9/a#7");
    for path in stale.iter().chain(&unrelated).chain([&other_call]) {
        std::fs::write(path, b"partial").unwrap();
    }

    let storage = Storage::open_local(dir.path()).await.unwrap();

    for path in stale.iter().chain([&other_call]) {
        assert!(!path.exists(), "stale file {} survived", path.display());
    }
    for path in &unrelated {
        assert!(
            path.exists(),
            "unrelated file {} was removed",
            path.display()
        );
    }
    let stored = storage.get_range(&id, 0..3000).await.unwrap();
    assert!(stored == data, "committed object changed");
}

async fn check_second_commit_rejected(storage: &Storage) {
    let id = object_id("p", "c", "a");
    let first = pattern(PART_SIZE + 10, 7);
    put(storage, &id, &first, 100_000).await;

    let mut second = storage.start_upload(&id).await.unwrap();
    second.write(pattern(20, 8).into()).await.unwrap();
    let error = second.commit().await.unwrap_err();
    assert!(
        matches!(error, StorageError::AlreadyExists { .. }),
        "{error:?}"
    );

    assert_eq!(storage.head(&id).await.unwrap(), Some(first.len() as u64));
    let stored = storage.get_range(&id, 0..first.len() as u64).await.unwrap();
    assert!(stored == first, "first object changed");
}

#[tokio::test]
async fn second_commit_rejected_local() {
    let (dir, storage) = local_storage().await;
    check_second_commit_rejected(&storage).await;
    let id = object_id("p", "c", "a");
    assert_eq!(files_under(dir.path()), [file_path(dir.path(), &id)]);
}

#[tokio::test]
async fn second_commit_rejected_memory() {
    check_second_commit_rejected(&Storage::in_memory()).await;
}

/// Commits two uploads of one path at the same time, `rounds` times, and checks that exactly one
/// wins each time and that its bytes are stored.
async fn check_racing_commits(first: &Storage, second: &Storage, label: &str, rounds: u8) {
    for round in 0..rounds {
        let id = object_id("p", "c", &format!("{label}-{round}"));
        let data_a = pattern(PART_SIZE + 3, 2 * round);
        let data_b = pattern(PART_SIZE + 3, 2 * round + 1);

        let mut upload_a = first.start_upload(&id).await.unwrap();
        let mut upload_b = second.start_upload(&id).await.unwrap();
        upload_a.write(data_a.clone().into()).await.unwrap();
        upload_b.write(data_b.clone().into()).await.unwrap();

        let task_a = tokio::spawn(upload_a.commit());
        let task_b = tokio::spawn(upload_b.commit());
        let (result_a, result_b) = (task_a.await.unwrap(), task_b.await.unwrap());

        let winner = match (&result_a, &result_b) {
            (Ok(_), Err(StorageError::AlreadyExists { .. })) => &data_a,
            (Err(StorageError::AlreadyExists { .. }), Ok(_)) => &data_b,
            other => panic!("round {round}: expected one commit to win, got {other:?}"),
        };
        let stored = first.get_range(&id, 0..winner.len() as u64).await.unwrap();
        assert!(
            stored == *winner,
            "round {round}: stored bytes are not the winner's"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_commits_one_wins_local() {
    let (dir, storage) = local_storage().await;
    check_racing_commits(&storage, &storage, "same-handle", 8).await;

    // A second handle on the same root shares the commit locks.
    let other = Storage::open_local(dir.path()).await.unwrap();
    let mut storages = [storage, other];
    for label in ["two-handles", "two-handles-swapped"] {
        storages.swap(0, 1);
        let [first, second] = &storages;
        check_racing_commits(first, second, label, 8).await;
    }

    let files = files_under(dir.path());
    assert!(
        files
            .iter()
            .all(|path| !path.to_string_lossy().contains('#')),
        "{files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_commits_one_wins_memory() {
    let storage = Storage::in_memory();
    check_racing_commits(&storage, &storage, "memory", 16).await;
}

async fn check_range_reads(storage: &Storage) {
    let id = object_id("p", "c", "a");
    let data = pattern(PART_SIZE + 10, 9);
    let size = put(storage, &id, &data, 333_333).await;
    let boundary = PART_SIZE as u64;

    let valid = [
        0..1,
        0..size,
        size - 1..size,
        boundary - 3..boundary + 3,
        1000..1000 + READ_CHUNK_SIZE as u64 + 1,
        7..7,
        size..size,
    ];
    for range in valid {
        let expected = &data[range.start as usize..range.end as usize];
        let bytes = storage.get_range(&id, range.clone()).await.unwrap();
        assert!(
            bytes == expected,
            "get_range {range:?} returned different bytes"
        );

        let chunks = read_stream(storage, &id, range.clone()).await;
        assert!(
            chunks.concat() == expected,
            "get_range_stream {range:?} returned different bytes"
        );
    }

    #[allow(clippy::reversed_empty_ranges)]
    let invalid = [0..size + 1, size..size + 1, size + 5..size + 10, 10..5];
    for range in invalid {
        let error = storage.get_range(&id, range.clone()).await.unwrap_err();
        assert!(
            matches!(error, StorageError::InvalidRange { size: s, .. } if s == size),
            "get_range {range:?}: {error:?}"
        );
        let error = storage.get_range_stream(&id, range.clone()).await.err();
        assert!(
            matches!(error, Some(StorageError::InvalidRange { .. })),
            "get_range_stream {range:?}: {error:?}"
        );
    }

    let missing = object_id("p", "c", "missing");
    for range in [0..1, 0..0] {
        let error = storage
            .get_range(&missing, range.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(error, StorageError::NotFound { .. }),
            "{range:?}: {error:?}"
        );
        let error = storage
            .get_range_stream(&missing, range.clone())
            .await
            .err();
        assert!(
            matches!(error, Some(StorageError::NotFound { .. })),
            "{range:?}: {error:?}"
        );
    }
}

#[tokio::test]
async fn range_reads_local() {
    let (_dir, storage) = local_storage().await;
    check_range_reads(&storage).await;

    // Streamed local reads come in chunks of at most READ_CHUNK_SIZE bytes.
    let id = object_id("p", "c", "a");
    let chunks = read_stream(&storage, &id, 0..PART_SIZE as u64).await;
    assert!(chunks.len() > 1);
    assert!(chunks.iter().all(|chunk| chunk.len() <= READ_CHUNK_SIZE));
}

#[tokio::test]
async fn range_reads_memory() {
    check_range_reads(&Storage::in_memory()).await;
}

#[tokio::test]
async fn list_call_returns_artifacts_sorted() {
    let (dir, storage) = local_storage().await;
    let practice = PracticeId::new("p").unwrap();
    let call = CallId::new("call_1").unwrap();

    let artifacts = [
        ("transcript.json", 40),
        ("recording.wav", 300),
        ("event-1.json", 7),
    ];
    for (name, length) in artifacts {
        put(
            &storage,
            &object_id("p", "call_1", name),
            &pattern(length, 1),
            64,
        )
        .await;
    }
    put(
        &storage,
        &object_id("p", "call_2", "other.json"),
        &pattern(5, 1),
        64,
    )
    .await;
    put(
        &storage,
        &object_id("q", "call_1", "other.json"),
        &pattern(5, 1),
        64,
    )
    .await;

    // An upload in progress, a file with an invalid name and a subdirectory are not artifacts.
    let mut pending = storage
        .start_upload(&object_id("p", "call_1", "pending"))
        .await
        .unwrap();
    pending.write(pattern(10, 1).into()).await.unwrap();
    let call_dir = dir.path().join("p/calls/call_1");
    std::fs::write(call_dir.join("bad name"), b"x").unwrap();
    std::fs::create_dir(call_dir.join("subdirectory")).unwrap();
    std::fs::write(call_dir.join("subdirectory/nested"), b"x").unwrap();

    let listed = storage.list_call(&practice, &call).await.unwrap();
    let expected: Vec<(ArtifactName, u64)> = [
        ("event-1.json", 7),
        ("recording.wav", 300),
        ("transcript.json", 40),
    ]
    .into_iter()
    .map(|(name, size)| (ArtifactName::new(name).unwrap(), size))
    .collect();
    assert_eq!(listed, expected);

    let unknown = CallId::new("call_unknown").unwrap();
    assert!(
        storage
            .list_call(&practice, &unknown)
            .await
            .unwrap()
            .is_empty()
    );
    pending.abort().await.unwrap();
}

#[tokio::test]
async fn list_call_memory() {
    let storage = Storage::in_memory();
    put(&storage, &object_id("p", "c", "b"), &pattern(2, 1), 64).await;
    put(&storage, &object_id("p", "c", "a"), &pattern(1, 1), 64).await;
    put(&storage, &object_id("p", "c2", "x"), &pattern(1, 1), 64).await;

    let listed = storage
        .list_call(&"p".parse().unwrap(), &"c".parse().unwrap())
        .await
        .unwrap();
    let names: Vec<(&str, u64)> = listed
        .iter()
        .map(|(name, size)| (name.as_str(), *size))
        .collect();
    assert_eq!(names, [("a", 1), ("b", 2)]);
}

#[tokio::test]
async fn ids_stay_inside_root() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let storage = Storage::open_local(&root).await.unwrap();

    // Dot-only names other than `.` and `..` are valid ids and must stay plain file names.
    let ids = [
        object_id("...", "...", "..."),
        object_id(".p", "..c", "a.."),
    ];
    for id in &ids {
        put(&storage, id, b"ciphertext", 4).await;
    }

    let expected: Vec<PathBuf> = {
        let mut paths: Vec<PathBuf> = ids.iter().map(|id| file_path(&root, id)).collect();
        paths.sort();
        paths
    };
    assert_eq!(files_under(&root), expected);
    assert_eq!(
        files_under(parent.path()),
        expected,
        "a file was written outside the root"
    );
    assert_eq!(
        expected[0].strip_prefix(&root).unwrap(),
        Path::new("...").join("calls").join("...").join("...")
    );
}

#[tokio::test]
async fn delete_removes_object() {
    let (dir, storage) = local_storage().await;
    let id = object_id("p", "c", "a");
    put(&storage, &id, b"ciphertext", 4).await;

    storage.delete(&id).await.unwrap();
    assert_eq!(storage.head(&id).await.unwrap(), None);
    assert!(
        storage
            .list_call(&id.practice, &id.call)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(files_under(dir.path()), Vec::<PathBuf>::new());

    // Deleting again succeeds, and the path can be written anew.
    storage.delete(&id).await.unwrap();
    put(&storage, &id, b"new", 4).await;
    assert_eq!(storage.head(&id).await.unwrap(), Some(3));
}

#[tokio::test]
async fn check_detects_missing_root() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let storage = Storage::open_local(&root).await.unwrap();
    storage.check().await.unwrap();

    std::fs::remove_dir(&root).unwrap();
    let error = storage.check().await.unwrap_err();
    assert!(
        matches!(error, StorageError::InvalidRoot { .. }),
        "{error:?}"
    );

    Storage::in_memory().check().await.unwrap();
}

#[tokio::test]
async fn open_rejects_unusable_root() {
    let parent = tempfile::tempdir().unwrap();
    let missing = parent.path().join("missing");
    let error = Storage::open_local(&missing).await.unwrap_err();
    assert!(
        matches!(error, StorageError::InvalidRoot { .. }),
        "{error:?}"
    );
    assert!(!missing.exists(), "open created the missing root");

    let file = parent.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let error = Storage::open_local(&file).await.unwrap_err();
    assert!(
        matches!(error, StorageError::InvalidRoot { .. }),
        "{error:?}"
    );
}
