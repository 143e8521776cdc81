//! A Tokio task that polls the certificate and key files and reloads them when they change.
//!
//! Polling file metadata works the same on every filesystem, including network filesystems and
//! Kubernetes secret volumes that swap a symbolic link, where change notifications are
//! unreliable.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::TlsError;
use super::resolver::CertResolver;

/// A running certificate watcher, returned by [`CertResolver::watch`].
///
/// The watcher stops when the shutdown future completes, when the resolver is dropped, or when
/// this handle is dropped.
#[derive(Debug)]
#[must_use = "dropping a CertWatcher stops it"]
pub struct CertWatcher {
    task: JoinHandle<()>,
}

impl CertWatcher {
    /// Waits until the watcher task has ended.
    pub async fn stopped(mut self) {
        // The task only ends by returning or by being aborted, and both mean it has stopped.
        let _ = (&mut self.task).await;
    }

    /// Returns whether the watcher task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for CertWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CertResolver {
    /// Spawns a task that checks the certificate and key files every `interval` and calls
    /// [`reload`](Self::reload) when the size, modification time, status-change time or inode of
    /// either has changed.
    ///
    /// A failed reload is logged once and retried only after a file changes again. The task
    /// holds only a weak reference to the resolver, so it never keeps a dropped listener's
    /// certificate alive. It stops when `shutdown` completes. Any future works, such as
    /// tokio-util's `CancellationToken::cancelled_owned()` or an awaited `oneshot::Receiver`.
    ///
    /// # Errors
    ///
    /// [`TlsError::ZeroReloadInterval`] when `interval` is zero.
    ///
    /// # Panics
    ///
    /// Panics when called outside a Tokio runtime, as `tokio::spawn` does.
    pub fn watch<F>(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: F,
    ) -> Result<CertWatcher, TlsError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if interval.is_zero() {
            return Err(TlsError::ZeroReloadInterval);
        }

        tracing::info!(
            cert = %self.cert_path().display(),
            key = %self.key_path().display(),
            interval_ms = interval.as_millis(),
            "watching TLS certificate files"
        );
        let task = tokio::spawn(poll_files(
            Arc::downgrade(self),
            self.cert_path().to_path_buf(),
            interval,
            shutdown,
        ));
        Ok(CertWatcher { task })
    }
}

async fn poll_files<F>(
    resolver: Weak<CertResolver>,
    cert_path: PathBuf,
    interval: Duration,
    shutdown: F,
) where
    F: Future<Output = ()> + Send + 'static,
{
    let mut shutdown = std::pin::pin!(shutdown);
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = ticks.tick() => {}
        }

        let Some(resolver) = resolver.upgrade() else {
            break;
        };

        // Reading metadata and parsing PEM block, so they run off the async worker threads. The
        // outcome of a reload is logged by the reload itself.
        let check = tokio::task::spawn_blocking(move || {
            resolver.reload_if_changed();
        });
        if let Err(error) = check.await {
            tracing::error!(cert = %cert_path.display(), %error, "TLS certificate check failed");
        }
    }

    tracing::info!(cert = %cert_path.display(), "stopped watching TLS certificate files");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::write_dev_certs;

    #[tokio::test]
    async fn watch_rejects_zero_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");
        let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");

        let result = resolver.watch(Duration::ZERO, std::future::pending());

        assert!(matches!(result, Err(TlsError::ZeroReloadInterval)));
    }

    #[tokio::test]
    async fn watcher_stops_when_resolver_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_dev_certs(dir.path(), false).expect("dev certs");
        let resolver = CertResolver::load(&paths.server_cert, &paths.server_key).expect("load");
        let watcher = resolver
            .watch(Duration::from_millis(5), std::future::pending())
            .expect("watch");

        drop(resolver);

        watcher.stopped().await;
    }
}
