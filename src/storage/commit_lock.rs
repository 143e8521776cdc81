//! Process-wide locks that serialize the commits of one object path.
//!
//! The table is global rather than per [`super::Storage`], so that two handles opened on the same
//! local root (keys share the root's namespace) still exclude each other. An entry lives only
//! while some commit holds or waits for its lock.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use tokio::sync::OwnedMutexGuard;

type CommitMutex = tokio::sync::Mutex<()>;

static LOCKS: LazyLock<Mutex<HashMap<String, Weak<CommitMutex>>>> = LazyLock::new(Mutex::default);

/// Waits for and returns the commit lock of `key`. The lock is released when the guard drops.
pub(super) async fn lock(key: String) -> OwnedMutexGuard<()> {
    let mutex = {
        // The table is only read and updated here, where nothing panics, so a poisoned table
        // is still consistent.
        let mut table = LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
        table.retain(|_, entry| entry.strong_count() > 0);
        match table.get(&key).and_then(Weak::upgrade) {
            Some(mutex) => mutex,
            None => {
                let mutex = Arc::new(CommitMutex::new(()));
                table.insert(key, Arc::downgrade(&mutex));
                mutex
            }
        }
    };
    mutex.lock_owned().await
}

/// Returns whether the table has a live entry for `key`.
#[cfg(test)]
pub(super) fn is_live(key: &str) -> bool {
    let table = LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    table.get(key).is_some_and(|entry| entry.strong_count() > 0)
}
