//! The gateway: the HTTPS data listener and the admin listener, and their lifecycle.
//!
//! Each connection goes accept → connection limit → TLS handshake (bounded by the header-read
//! timeout) → HTTP/1.1 or h2 by ALPN → requests ([`routes`]). A connection on which no byte moves
//! for the idle timeout is closed.
//!
//! Shutdown stops accepting, lets in-flight requests run for the grace period, then drops the
//! connections that remain. A dropped upload is aborted (nothing becomes readable), and the
//! gateway waits for storage's background aborts before it returns.

mod error;
mod idle;
pub mod range;
mod routes;
mod trail;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::admin::{self, AdminState, Readiness};
use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::config::{Config, StorageSettings};
use crate::ids::PracticeId;
use crate::keys::kms::{DataKeyCache, KmsKeyring};
use crate::keys::{KeyDirectory, Keyring};
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::tls::{self, CertResolver, CertWatcher};
use crate::webhook::WebhookState;

pub use error::ApiError;
pub use routes::Connection;
pub use routes::read_object;
pub use trail::Trail;

/// The response body type of every route: a full buffer or a stream that may fail midway.
pub type ResponseBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub(crate) fn full_body(bytes: Bytes) -> ResponseBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Everything a request handler needs, shared by all connections.
pub struct AppState {
    pub config: Config,
    pub storage: Storage,
    pub keys: HashMap<PracticeId, Keyring>,
    pub key_directory: KeyDirectory,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub webhooks: WebhookState,
    pub audit: Arc<AuditLog>,
}

impl AppState {
    /// Opens storage and loads every configured practice's keys; fails if any is missing.
    pub async fn new(config: Config, metrics: Arc<Metrics>) -> Result<Self> {
        let storage = match &config.storage {
            StorageSettings::Local { path } => {
                create_private_directory(path)?;
                Storage::open_local(path)
                    .await
                    .with_context(|| format!("cannot open storage at {}", path.display()))?
            }
            StorageSettings::Memory => Storage::in_memory(),
            StorageSettings::S3(s3) => Storage::open_s3(s3).context("cannot open S3 storage")?,
        };
        let keys = load_keyrings(&config, &metrics).await?;
        let key_directory = KeyDirectory::new(&config.keys.directory);
        let auth = Authenticator::new(&config.tokens, &config.clients)
            .context("invalid principal name")?;
        let audit = Arc::new(open_audit_log(&config, &metrics)?);
        let webhooks =
            WebhookState::new(&config, &metrics).context("cannot set up the webhook route")?;
        Ok(AppState {
            config,
            storage,
            keys,
            key_directory,
            auth,
            metrics,
            webhooks,
            audit,
        })
    }
}

/// Opens the audit log, generating its signing key on first use.
fn open_audit_log(config: &Config, metrics: &Arc<Metrics>) -> Result<AuditLog> {
    let settings = &config.audit;
    if !settings.signing_key.exists() {
        if let Some(parent) = settings.signing_key.parent() {
            create_private_directory(parent)?;
        }
        let public_key = crate::audit::generate_key(&settings.signing_key).with_context(|| {
            format!(
                "cannot create the audit signing key {}",
                settings.signing_key.display()
            )
        })?;
        let public_path = settings.signing_key.with_extension("pub");
        std::fs::write(
            &public_path,
            format!("{}\n", hex::encode(public_key.as_bytes())),
        )
        .with_context(|| format!("cannot write {}", public_path.display()))?;
        warn!(
            key = %settings.signing_key.display(),
            public_key = %public_path.display(),
            "generated a new audit signing key; keep it away from the audit directory"
        );
    }
    create_private_directory(&settings.directory)?;
    let hook_metrics = Arc::clone(metrics);
    let mut audit_settings = crate::audit::Settings::new(&settings.signing_key);
    audit_settings.on_failure = Some(Arc::new(move || hook_metrics.record_audit_failure()));
    AuditLog::open(&settings.directory, audit_settings).with_context(|| {
        format!(
            "cannot open the audit log in {}",
            settings.directory.display()
        )
    })
}

/// Loads each practice's keyring: its local keys, or a client for its KMS key.
async fn load_keyrings(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<HashMap<PracticeId, Keyring>> {
    let key_directory = KeyDirectory::new(&config.keys.directory);
    let uses_kms = config
        .practices
        .iter()
        .any(|practice| practice.kms.is_some());
    let aws = if uses_kms {
        Some(crate::keys::aws::load_config(&config.aws).await)
    } else {
        None
    };
    let cache = Arc::new(DataKeyCache::new(
        std::time::Duration::from_secs(config.aws.data_key_cache_ttl_secs),
        config.aws.data_key_cache_max_entries,
    ));

    let mut keys = HashMap::new();
    for practice in &config.practices {
        let keyring =
            match (&practice.kms, &aws) {
                (Some(kms), Some(aws)) => {
                    let client = crate::keys::aws::kms_client(aws, &config.aws, kms).await;
                    info!(practice = %practice.id, key_id = %kms.arn, "practice uses its KMS key");
                    Keyring::Kms(KmsKeyring::new(
                        practice.id.clone(),
                        kms.arn.clone(),
                        client,
                        Arc::clone(&cache),
                        Arc::clone(metrics),
                    ))
                }
                _ => Keyring::Local(key_directory.load(&practice.id).with_context(|| {
                    format!("cannot load the keys of practice `{}`", practice.id)
                })?),
            };
        keys.insert(practice.id.clone(), keyring);
    }
    Ok(keys)
}

/// Creates a directory (and its parents) with mode 0700 unless it exists.
fn create_private_directory(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("cannot create the directory {}", path.display()))
}

/// A started gateway: its bound addresses, and the handle that stops it.
pub struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    media_workers: JoinSet<()>,
    spool_drainer: tokio::task::JoinHandle<()>,
    _watcher: CertWatcher,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within the grace period, aborts the rest,
    /// and waits until storage has cleaned up after them.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        while self.media_workers.join_next().await.is_some() {}
        if let Err(error) = self.spool_drainer.await {
            error!(%error, "the webhook spool drainer failed");
        }
        if let Err(error) = self.state.audit.close().await {
            error!(%error, "closing the audit log failed");
        }
        self.state.storage.wait_for_background_tasks().await;
        info!("gateway stopped");
    }
}

/// Binds both listeners and starts serving.
pub async fn start(config: Config) -> Result<Running> {
    let metrics = Metrics::new();
    let state = Arc::new(AppState::new(config, Arc::clone(&metrics)).await?);
    let config = &state.config;

    let resolver = CertResolver::load(&config.tls.cert, &config.tls.key)?;
    let acceptor = tls::acceptor(Arc::clone(&resolver), config.tls.client_ca.as_deref())?;
    let shutdown = CancellationToken::new();
    let watcher = resolver.watch(
        config.tls.reload_interval(),
        shutdown.clone().cancelled_owned(),
    )?;

    let data = TcpListener::bind(config.listen.data)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen.data))?;
    let admin_listener = TcpListener::bind(config.listen.admin)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen.admin))?;
    let data_addr = data.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let media_workers = crate::webhook::media::spawn_workers(
        Arc::clone(&state),
        state.config.media.workers,
        shutdown.clone(),
    );

    let spool_drainer = crate::webhook::spool::spawn_drainer(Arc::clone(&state), shutdown.clone());

    let mut tasks = JoinSet::new();
    tasks.spawn(crate::webhook::media::resume_until_listed(
        Arc::clone(&state),
        shutdown.clone(),
    ));
    tasks.spawn(accept_loop(
        data,
        acceptor,
        Arc::clone(&state),
        shutdown.clone(),
    ));
    let admin_state = AdminState {
        metrics,
        readiness: Arc::new(GatewayReadiness {
            state: Arc::clone(&state),
        }),
    };
    let admin_shutdown = shutdown.clone().cancelled_owned();
    tasks.spawn(async move {
        if let Err(error) = admin::serve(admin_listener, admin_state, admin_shutdown).await {
            error!(%error, "admin listener failed");
        }
    });

    info!(%data_addr, %admin_addr, practices = state.config.practices.len(), "gateway started");
    Ok(Running {
        data_addr,
        admin_addr,
        state,
        shutdown,
        tasks,
        media_workers,
        spool_drainer,
        _watcher: watcher,
    })
}

/// Runs the gateway until `signal` completes, then shuts it down gracefully.
pub async fn serve(config: Config, signal: impl Future<Output = ()>) -> Result<()> {
    let running = start(config).await?;
    signal.await;
    info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// `/readyz`: storage responds (or the webhook spool has room), the audit log works, and every
/// practice's key files still load.
struct GatewayReadiness {
    state: Arc<AppState>,
}

impl Readiness for GatewayReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            // While storage is unreachable, the spool stores webhook events, which are lost once
            // Retell's retries run out. So the gateway stays in service while the spool has
            // room, and reads and uploads return 503 meanwhile.
            if let Err(error) = self.state.storage.check().await {
                let spool = &self.state.webhooks.spool;
                if !spool.has_room() {
                    return Err(format!("storage: {error}; the webhook spool is full"));
                }
                warn!(%error, "storage is unreachable; ready only for webhooks, which are spooled");
            }
            if self.state.audit.is_failed() {
                return Err(
                    "audit log: a write failed; requests are refused until it is reopened".into(),
                );
            }
            // Local key files must still load. KMS keys are not probed here: a KMS call per
            // probe would flood the practice's CloudTrail; KMS failures show in requests and
            // in `callseal_kms_failures_total`.
            for practice in &self.state.config.practices {
                if practice.kms.is_some() {
                    continue;
                }
                self.state
                    .key_directory
                    .load(&practice.id)
                    .map_err(|error| format!("keys of practice `{}`: {error}", practice.id))?;
            }
            Ok(())
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tls::TlsAcceptor,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let limits = state.config.limits.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();

    loop {
        // Waiting for a permit before accepting leaves excess clients in the kernel's queue.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit,
            () = shutdown.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);

        let connection = serve_connection(stream, peer, acceptor.clone(), Arc::clone(&state));
        let watcher = graceful.watcher();
        connections.spawn(
            async move {
                let _permit = permit;
                connection(watcher).await;
            }
            .instrument(info_span!("connection", %peer)),
        );
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }

    drop(listener);
    info!(in_flight = connections.len(), "data listener closed");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace()) => {
            warn!(aborted = connections.len(), "grace period over; aborting connections");
            connections.abort_all();
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Builds the task that serves one accepted TCP connection.
fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tls::TlsAcceptor,
    state: Arc<AppState>,
) -> impl FnOnce(hyper_util::server::graceful::Watcher) -> BoxFuture<'static, ()> {
    move |watcher| {
        Box::pin(async move {
            let limits = &state.config.limits;
            let handshake =
                tokio::time::timeout(limits.header_read_timeout(), acceptor.accept(stream)).await;
            let tls_stream = match handshake {
                Ok(Ok(tls_stream)) => tls_stream,
                Ok(Err(error)) => {
                    debug!(%error, "TLS handshake failed");
                    state.metrics.record_connection_rejected("tls_handshake");
                    return;
                }
                Err(_) => {
                    debug!("TLS handshake timed out");
                    state.metrics.record_connection_rejected("timeout");
                    return;
                }
            };
            let session = tls_stream.get_ref().1;
            let Some(tls_version) = session
                .protocol_version()
                .and_then(crate::audit::TlsVersion::from_rustls)
            else {
                return; // rustls negotiates only TLS 1.2 and 1.3
            };
            // The handshake verified any client certificate against `tls.client_ca`.
            let certificate = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| crate::auth::CertificateNames::from_der(leaf));
            let connection = routes::Connection {
                peer,
                tls_version,
                certificate,
            };

            let activity = idle::Activity::new();
            let io = TokioIo::new(idle::Tracked::new(tls_stream, activity.clone()));
            let service_state = Arc::clone(&state);
            let first_request = Arc::new(tokio::sync::Notify::new());
            let request_seen = Arc::clone(&first_request);
            let service = service_fn(move |request| {
                request_seen.notify_one();
                routes::handle(Arc::clone(&service_state), connection.clone(), request)
            });
            // hyper's header-read timeout covers HTTP/1.1 request heads only, so every connection
            // also gets a deadline for its first complete request: an h2 client that trickles
            // its preface or HEADERS is closed like a slow HTTP/1.1 client.
            let first_request_deadline = async {
                if tokio::time::timeout(limits.header_read_timeout(), first_request.notified())
                    .await
                    .is_err()
                {
                    return;
                }
                std::future::pending::<()>().await;
            };

            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout())
                .max_buf_size(limits.max_header_bytes.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(limits.max_header_bytes as u32)
                .max_concurrent_streams(routes::MAX_STREAMS_PER_CONNECTION);
            let served = watcher.watch(builder.serve_connection(io, service));

            tokio::select! {
                result = served => {
                    if let Err(error) = result {
                        debug!(error = %error, "connection ended with an error");
                    }
                }
                () = activity.idle_for(limits.idle_timeout()) => {
                    debug!("closing idle connection");
                    state.metrics.record_connection_rejected("idle");
                }
                () = first_request_deadline => {
                    debug!("closing a connection that sent no complete request in time");
                    state.metrics.record_connection_rejected("timeout");
                }
            }
        })
    }
}
