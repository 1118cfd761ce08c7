//! Starting and stopping the server: the home folder, the single-instance lock, the store, the listener, health,
//! reflection, and a graceful drain on SIGTERM, Ctrl-C or a Shutdown request.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use crate::grpc::Grpc;
use crate::home::{self, ADDRESS_FILE, DATABASE_FILE, HomeError, write_private};
use crate::pb::queue_service_server::QueueServiceServer;
use crate::queue::Queue;
use crate::store::{Store, StoreError, postgres::PgStore, sqlite::SqliteStore};

/// Requests larger than this are refused before they are decoded (tonic's default is 4 MiB).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// How long clients get to close their connections after the drain. A client that does not read (stopped, or
/// stuck) never acknowledges the end of its connection, and would otherwise hold the server open for ever.
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Home(#[from] HomeError),
    #[error("{0}")]
    Listen(String),
    #[error("opening the database: {0}")]
    Store(#[from] StoreError),
    #[error("starting the queue: {0}")]
    Queue(#[from] crate::error::QueueError),
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A Unix socket in the home folder: only its owner can reach it.
    #[cfg(unix)]
    Socket,
    /// TCP on a loopback address, with a bearer token from the home folder.
    Tcp(SocketAddr),
}

impl Default for Listen {
    #[cfg(unix)]
    fn default() -> Self {
        Listen::Socket
    }

    #[cfg(windows)]
    fn default() -> Self {
        Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub home: PathBuf,
    pub workers: u32,
    pub listen: Listen,
    /// A PostgreSQL URL shared with other servers; `None` for SQLite in the home folder.
    pub database_url: Option<String>,
    /// How long a server's claim on a job outlives its last heartbeat, with a shared database.
    pub lease: std::time::Duration,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Serve metrics on a non-loopback address: they need no token.
    pub metrics_allow_remote: bool,
    /// A certificate and key (PEM) to serve TCP with TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Serve a non-loopback TCP address without TLS: only on a network where nobody can listen in.
    pub insecure_allow_remote: bool,
}

/// Checks the bearer token in constant time.
#[derive(Clone)]
struct TokenCheck {
    expected: Arc<[u8]>,
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        if bool::from(presented.as_bytes().ct_eq(&self.expected)) {
            Ok(request)
        } else {
            Err(crate::error::Refusal::new(
                crate::error::Reason::TokenInvalid,
                "missing or wrong token: send `authorization: Bearer TOKEN` with the token the server keeps in \
                 its home",
            )
            .into())
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(windows)]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `serve` until it ends by itself, or for [`CLOSE_LIMIT`] after `closing` turns true.
async fn serve_until_closed(
    serve: impl Future<Output = Result<(), tonic::transport::Error>>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ServerError> {
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return Ok(result?),
        _ = closing.wait_for(|closing| *closing) => {}
    }
    match tokio::time::timeout(CLOSE_LIMIT, serve).await {
        Ok(result) => Ok(result?),
        Err(_) => {
            tracing::warn!(
                limit_secs = CLOSE_LIMIT.as_secs(),
                "clients kept their connections open after the drain; closing them"
            );
            Ok(())
        }
    }
}

/// Runs the server until SIGTERM, Ctrl-C or a Shutdown request, then drains it.
pub async fn run(options: Options) -> Result<(), ServerError> {
    bind(options).await?.serve(termination_signal()).await
}

/// A server that holds its home's lock and listens, ready to serve.
pub struct Bound {
    options: Options,
    _lock: fs::File,
    listener: Listener,
    connection_limit: usize,
}

enum Listener {
    #[cfg(unix)]
    Socket {
        listener: tokio::net::UnixListener,
        path: PathBuf,
    },
    Tcp {
        listener: tokio::net::TcpListener,
        url: String,
        token: String,
        tls: Option<tonic::transport::ServerTlsConfig>,
    },
}

/// Makes the home ready, takes its lock (one server per home) and binds the listener `options` ask for, refusing
/// a remote address that is neither TLS nor explicitly allowed.
pub async fn bind(options: Options) -> Result<Bound, ServerError> {
    #[cfg(unix)]
    crate::runner::stop_inheriting_descriptors();
    let descriptors = crate::connections::raise_descriptor_limit();
    let connection_limit = crate::connections::connection_limit(descriptors);
    tracing::debug!(?descriptors, connection_limit, "descriptor limit");
    let home = &options.home;
    home::prepare(home)?;
    let lock = home::lock(home)?;
    // We hold the lock, so an address recorded here belongs to a server that died (killed before it could remove
    // it); clients must not go there, nor send it the home's token. A TCP server records its own once it listens.
    let recorded = home.join(ADDRESS_FILE);
    match fs::remove_file(&recorded) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(ServerError::Listen(format!(
                "cannot remove {}, the address of a server that is gone: {error}",
                recorded.display()
            )));
        }
        _ => {}
    }
    if let Some(address) = options.metrics
        && !address.ip().is_loopback()
        && !options.metrics_allow_remote
    {
        return Err(ServerError::Listen(format!(
            "{address} is not a loopback address, and the metrics tell whoever reaches it how busy the queue \
             is (job counts, durations, workers); serve them on 127.0.0.1, or pass --metrics-allow-remote"
        )));
    }
    let listener = match options.listen {
        #[cfg(unix)]
        Listen::Socket => {
            use std::os::unix::fs::PermissionsExt;
            let path = home.join(home::SOCKET_FILE);
            // We hold the lock, so a socket file left here belongs to a server that died.
            let _ = fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).map_err(|error| {
                ServerError::Listen(format!("cannot listen on {}: {error}", path.display()))
            })?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            Listener::Socket { listener, path }
        }
        Listen::Tcp(address) => {
            if !address.ip().is_loopback()
                && options.tls.is_none()
                && !options.insecure_allow_remote
            {
                return Err(ServerError::Listen(format!(
                    "{address} is not a loopback address, and whoever reaches it runs commands as you: serve it \
                     with TLS (--tls-cert and --tls-key), or pass --insecure-allow-remote on a network you trust"
                )));
            }
            let tls = match &options.tls {
                Some((cert, key)) => {
                    let read = |path: &PathBuf| {
                        fs::read(path).map_err(|error| {
                            ServerError::Listen(format!("cannot read {}: {error}", path.display()))
                        })
                    };
                    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
                    Some(tonic::transport::ServerTlsConfig::new().identity(identity))
                }
                None => None,
            };
            let token = home::load_or_create_token(home)?;
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|error| {
                    ServerError::Listen(format!("cannot listen on {address}: {error}"))
                })?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://{}", listener.local_addr()?);
            Listener::Tcp {
                listener,
                url,
                token,
                tls,
            }
        }
    };
    Ok(Bound {
        options,
        _lock: lock,
        listener,
        connection_limit,
    })
}

impl Bound {
    /// Where clients reach the server: a socket path or a URL.
    pub fn address(&self) -> String {
        match &self.listener {
            #[cfg(unix)]
            Listener::Socket { path, .. } => path.display().to_string(),
            Listener::Tcp { url, .. } => url.clone(),
        }
    }

    /// Opens the store, recovers, serves until `shutdown` resolves or a client asks the server to stop, then
    /// drains the workers and closes.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Bound {
            options,
            _lock,
            listener,
            connection_limit,
        } = self;
        let home = &options.home;
        let store: Arc<dyn Store> = match &options.database_url {
            Some(url) => Arc::new(PgStore::open(url, options.lease).await?),
            None => {
                // Created here, owner-only: SQLite gives its -wal and -shm files the mode of the database file.
                let database = home.join(DATABASE_FILE);
                home::open_private(&database)?;
                Arc::new(SqliteStore::open(&database).await?)
            }
        };
        let server_id = home::server_id(home)?;
        crate::containment::init(&server_id).await;
        let queue = Arc::new(Queue::start(store, server_id, options.workers).await?);

        if let Some(address) = options.metrics {
            let queue = queue.clone();
            let scrape = move || {
                let queue = queue.clone();
                async move {
                    queue
                        .metrics_text()
                        .await
                        .map_err(|error| error.to_string())
                }
            };
            tokio::spawn(async move {
                if let Err(error) = crate::metrics::serve(address, scrape).await {
                    tracing::error!(%error, %address, "cannot serve metrics");
                }
            });
        }

        let health = tonic_health::server::HealthReporter::new();
        let health_service = crate::health::service(health.clone(), queue.closing());
        health.set_serving::<QueueServiceServer<Grpc>>().await;
        let store_health = tokio::spawn(report_store_health(
            queue.store_faults(),
            queue.lease_lost(),
            health.clone(),
        ));
        let described = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                // The google.rpc error details, so that grpcurl and other reflecting clients decode them.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let served_methods = crate::metrics::ServedMethods::described_in(&[
            crate::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])
        .map_err(|error| ServerError::Listen(format!("reading the served methods: {error}")))?;
        let reflection_error = |error| ServerError::Listen(format!("building reflection: {error}"));
        let reflection = described().build_v1().map_err(reflection_error)?;
        // grpcurl and older clients still ask the v1alpha service.
        let reflection_alpha = described().build_v1alpha().map_err(reflection_error)?;
        let queue_service = QueueServiceServer::new(Grpc::new(queue.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);

        let drained = {
            let queue = queue.clone();
            async move {
                tokio::select! {
                    () = shutdown => {}
                    () = queue.shutdown_requested() => {}
                }
                tracing::info!(running = queue.running(), "stopping: draining workers");
                crate::notify::stopping();
                store_health.abort();
                health
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                health.set_not_serving::<QueueServiceServer<Grpc>>().await;
                queue.drain().await;
                crate::containment::close().await;
                queue.close_streams();
            }
        };

        let mut router = Server::builder()
            .layer(crate::metrics::Observe::layer(
                queue.metrics(),
                served_methods,
            ))
            .layer(tower::util::MapResponseLayer::new(
                crate::status::transport_refusals::<tonic::body::Body>,
            ));
        match listener {
            #[cfg(unix)]
            Listener::Socket { listener, path } => {
                tracing::info!(socket = %path.display(), workers = options.workers, "queuectld ready");
                crate::notify::ready(&format!("serving on {}", path.display()));
                let serve = router
                    .add_service(health_service)
                    .add_service(reflection)
                    .add_service(reflection_alpha)
                    .add_service(queue_service)
                    .serve_with_incoming_shutdown(
                        crate::connections::limited(listener, connection_limit),
                        drained,
                    );
                serve_until_closed(serve, queue.closing()).await?;
                let _ = fs::remove_file(&path);
            }
            Listener::Tcp {
                listener,
                url,
                token,
                tls,
            } => {
                if let Some(tls) = tls {
                    router = router.tls_config(tls)?;
                }
                let check = TokenCheck {
                    expected: token.into_bytes().into(),
                };
                write_private(&home.join(ADDRESS_FILE), &url)?;
                tracing::info!(address = %url, workers = options.workers, "queuectld ready");
                crate::notify::ready(&format!("serving on {url}"));
                let serve = router
                    .add_service(health_service)
                    .add_service(InterceptedService::new(reflection, check.clone()))
                    .add_service(InterceptedService::new(reflection_alpha, check.clone()))
                    .add_service(InterceptedService::new(queue_service, check))
                    .serve_with_incoming_shutdown(
                        crate::connections::limited(listener, connection_limit),
                        drained,
                    );
                serve_until_closed(serve, queue.closing()).await?;
                let _ = fs::remove_file(home.join(ADDRESS_FILE));
            }
        }
        if let Err(error) = queue.close().await {
            tracing::warn!(%error, "could not checkpoint the database at the stop; the next start does it");
        }
        tracing::info!("queuectld stopped");
        Ok(())
    }
}

/// NOT_SERVING, with the reason in the log, while the database fails writes or claims or this server lost its
/// lease on a shared one; SERVING once it works again.
async fn report_store_health(
    mut faults: tokio::sync::watch::Receiver<crate::writer::Faults>,
    mut lease_lost: tokio::sync::watch::Receiver<Option<String>>,
    health: tonic_health::server::HealthReporter,
) {
    loop {
        tokio::select! {
            changed = faults.changed() => if changed.is_err() { return },
            changed = lease_lost.changed() => if changed.is_err() { return },
        }
        let reason = faults
            .borrow_and_update()
            .reason()
            .map(ToString::to_string)
            .or_else(|| lease_lost.borrow_and_update().clone());
        let status = match reason {
            Some(reason) => {
                tracing::error!(%reason, "not serving: the database fails");
                ServingStatus::NotServing
            }
            None => {
                tracing::info!("serving again: the database works");
                ServingStatus::Serving
            }
        };
        health.set_service_status("", status).await;
        health
            .set_service_status(
                <QueueServiceServer<Grpc> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
    }
}
