//! Finding the server: an explicit address, or the socket in QUEUECTL_HOME with a server started there on demand.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use queuectl::home::{self, ADDRESS_FILE, LOCK_FILE, LOG_FILE, TOKEN_FILE};
use queuectl::pb::queue_service_client::QueueServiceClient;
use tonic::codegen::http::Uri;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// How long `queuectl` waits for a server it started to answer.
const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// How long a client waits on a server: to connect, and for the answer to each call. A stream (`wait`,
/// `logs -f`, `worker start`) is bounded only until the server starts it, then runs as long as it needs.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub connect: Duration,
    pub call: Duration,
}

/// Every command but `health`: a server that is up answers any call in well under this, even one waiting out a
/// locked database (5 s per statement) to say it is unavailable.
pub const COMMAND: Patience = Patience {
    connect: Duration::from_secs(5),
    call: Duration::from_secs(30),
};

/// `health`, as grpc_health_probe waits by default.
pub const PROBE: Patience = Patience {
    connect: Duration::from_secs(1),
    call: Duration::from_secs(1),
};

/// What a call that ran out of patience means to the user, if `status` is one.
pub fn timed_out(status: &Status, patience: Patience) -> Option<String> {
    // The only CANCELLED a client sees: our server never sends it, and tonic reports its own deadline so.
    (status.code() == tonic::Code::Cancelled).then(|| {
        format!(
            "the server did not answer within {}s; it may be stopped, stuck or overloaded: see its log (what \
             was asked may still be done if it resumes)",
            patience.call.as_secs()
        )
    })
}

/// The server's message for a refusal, with what a user of this CLI can do about it where the reason tells.
pub fn explained(status: &Status) -> String {
    use tonic_types::StatusExt;
    let reason = status.get_details_error_info().map(|info| info.reason);
    match reason.as_deref() {
        Some("JOB_NOT_FOUND") => format!(
            "{}; `queuectl list` shows the jobs there are",
            status.message()
        ),
        Some("TOKEN_INVALID") => format!(
            "{}; queuectl reads it from the server's token file, or QUEUECTL_TOKEN",
            status.message()
        ),
        _ => status.message().to_owned(),
    }
}

/// No server could be reached; exit code 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// Adds the bearer token to every request over TCP.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

pub type Client = QueueServiceClient<InterceptedService<Channel, Auth>>;

enum Target {
    #[cfg(unix)]
    Socket(std::path::PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            #[cfg(unix)]
            Target::Socket(path) => write!(f, "unix:{}", path.display()),
            Target::Tcp(url) => f.write_str(url),
        }
    }
}

fn parse_target(address: &str) -> anyhow::Result<Target> {
    #[cfg(unix)]
    if let Some(path) = address.strip_prefix("unix:") {
        return Ok(Target::Socket(path.into()));
    }
    if address.starts_with("http://") || address.starts_with("https://") {
        return Ok(Target::Tcp(address.to_owned()));
    }
    Err(crate::commands::Usage(format!(
        "server address must be unix:/path/to/socket or http://HOST:PORT, got {address:?}"
    ))
    .into())
}

async fn open(target: &Target, patience: Patience) -> Result<Channel, tonic::transport::Error> {
    let limit = |endpoint: Endpoint| {
        endpoint
            .connect_timeout(patience.connect)
            .timeout(patience.call)
    };
    match target {
        #[cfg(unix)]
        Target::Socket(path) => {
            // The URI is required but unused: the connector decides where to connect.
            let endpoint = limit(Endpoint::from_static("http://localhost"));
            queuectl::channel::unix_with(endpoint, path.clone()).await
        }
        Target::Tcp(url) => {
            let mut endpoint = limit(Endpoint::from_shared(url.clone())?);
            if url.starts_with("https://") {
                let mut tls = tonic::transport::ClientTlsConfig::new();
                // The server's certificate authority, when it is not one the system trusts.
                if let Some(ca) =
                    std::env::var_os("QUEUECTL_CA_CERT").and_then(|path| std::fs::read(path).ok())
                {
                    tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
                }
                endpoint = endpoint.tls_config(tls)?;
            }
            endpoint.connect().await
        }
    }
}

/// The token to present: `QUEUECTL_TOKEN` when it is set; else the home's own token, but only to the home's own
/// server (no `--server`, or the very address the server recorded), so that a server named by mistake or by
/// someone else never receives it.
fn token(home: &Path, server: Option<&str>) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
    let token = match std::env::var("QUEUECTL_TOKEN") {
        Ok(token) => token,
        Err(_) if !serves_home(home, server) => return Ok(None),
        Err(_) => {
            home::check(home)?;
            match std::fs::read_to_string(home.join(TOKEN_FILE)) {
                Ok(token) => token,
                Err(_) => return Ok(None),
            }
        }
    };
    Ok(Some(format!("Bearer {}", token.trim()).parse()?))
}

/// Whether `server` is the home's own server: none named, or the address its running server recorded in
/// `server.addr` (`localhost`, a loopback address and `0.0.0.0` are one host). A recorded address whose server is
/// gone (the home's lock is free) is stale: whoever listens there now is not the home's server.
fn serves_home(home: &Path, server: Option<&str>) -> bool {
    let Some(address) = server else {
        return true;
    };
    let Ok(recorded) = std::fs::read_to_string(home.join(ADDRESS_FILE)) else {
        return false;
    };
    same_server(recorded.trim(), address) && home_server_running(home)
}

fn same_server(recorded: &str, named: &str) -> bool {
    let (Ok(recorded), Ok(named)) = (recorded.parse::<Uri>(), named.parse::<Uri>()) else {
        return false;
    };
    let local = |host: &str| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
    };
    let same_host = match (recorded.host(), named.host()) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b) || (local(a) && local(b)),
        _ => false,
    };
    recorded.scheme() == named.scheme() && recorded.port_u16() == named.port_u16() && same_host
}

/// Whether a server holds the home's lock right now.
fn home_server_running(home: &Path) -> bool {
    let Ok(lock) = std::fs::File::open(home.join(LOCK_FILE)) else {
        return false;
    };
    matches!(
        lock.try_lock_shared(),
        Err(std::fs::TryLockError::WouldBlock)
    )
}

/// The address of the home's own server: the TCP address a running server recorded (`queuectld --listen`), else
/// the socket (on Windows, always the recorded address).
fn home_target(home: &Path) -> Target {
    let recorded = std::fs::read_to_string(home.join(ADDRESS_FILE)).unwrap_or_default();
    let recorded = recorded.trim();
    #[cfg(unix)]
    {
        if recorded.is_empty() || !home_server_running(home) {
            return Target::Socket(home.join(home::SOCKET_FILE));
        }
    }
    Target::Tcp(recorded.to_owned())
}

fn autostart_disabled() -> bool {
    std::env::var("QUEUECTL_NO_AUTOSTART").is_ok_and(|value| !value.is_empty() && value != "0")
}

/// A server this command started, and where its log stood before it started.
struct Started {
    server: std::process::Child,
    log_start: u64,
}

impl Started {
    /// Why the server exited, if it has: the error it logged last (`queuectld: ...`).
    fn failure(&mut self, home: &Path) -> Option<String> {
        use std::io::{Read, Seek};
        let status = self.server.try_wait().ok()??;
        let mut logged = String::new();
        if let Ok(mut log) = std::fs::File::open(home.join(LOG_FILE)) {
            let _ = log.seek(std::io::SeekFrom::Start(self.log_start));
            let _ = log.take(64 * 1024).read_to_string(&mut logged);
        }
        let reason = logged
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("queuectld: "))
            .map_or_else(|| format!("it exited with {status}"), str::to_owned);
        Some(reason)
    }
}

/// Starts `queuectld` for `home`, detached, with no workers and its log in the home folder.
fn spawn_server(home: &Path) -> anyhow::Result<Started> {
    if !home.exists() {
        home::create_dir_private(home)?;
    }
    let binary = std::env::current_exe()?
        .with_file_name(format!("queuectld{}", std::env::consts::EXE_SUFFIX));
    let log = home::open_private(&home.join(LOG_FILE))?;
    let log_start = log.metadata()?.len();
    let mut command = std::process::Command::new(&binary);
    command
        .arg("--workers")
        .arg("0")
        .env("QUEUECTL_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // Its own process group, so that Ctrl-C in this terminal does not reach it.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    // No server, and none can be started: as unreachable as one that does not answer (exit 3).
    let server = command.spawn().map_err(|error| {
        Unreachable(format!(
            "no queuectl server is running, and {} cannot be started: {error}; install queuectld beside queuectl",
            binary.display()
        ))
    })?;
    Ok(Started { server, log_start })
}

/// Connects to the server, starting the home's own one if it is not running and `autostart` allows it.
pub async fn connect(server: Option<&str>, autostart: bool) -> anyhow::Result<Client> {
    let channel = channel(server, autostart, COMMAND).await?;
    // Read after a start: a server listening on TCP writes its token when it starts.
    let auth = Auth(token(&home::default_home(), server)?);
    Ok(QueueServiceClient::with_interceptor(channel, auth))
}

/// A channel to the server whose calls wait as long as `patience` allows; with `autostart`, the home's own server
/// is started if it is not running.
pub async fn channel(
    server: Option<&str>,
    autostart: bool,
    patience: Patience,
) -> anyhow::Result<Channel> {
    let home = home::default_home();
    if let Some(address) = server {
        let target = parse_target(address)?;
        return open(&target, patience).await.map_err(|error| {
            Unreachable(format!(
                "no queuectl server answers at {target} ({error}); start one with `queuectld`"
            ))
            .into()
        });
    }
    // Refused before anything is sent there or started there: a home another user owns is theirs to control.
    home::check(&home)?;
    let target = home_target(&home);
    if let Ok(channel) = open(&target, patience).await {
        return Ok(channel);
    }
    if !autostart || autostart_disabled() {
        return Err(Unreachable(format!(
            "no queuectl server is running at {target}; start one with `queuectld`{}",
            if autostart {
                " (QUEUECTL_NO_AUTOSTART is set, so queuectl does not start it)"
            } else {
                ""
            }
        ))
        .into());
    }
    // Another command may be starting the home's server right now (it holds the home's lock before it listens):
    // wait for that one rather than start a second, which would only step back.
    let mut started = match home_server_running(&home) {
        true => None,
        false => Some(spawn_server(&home)?),
    };
    let deadline = tokio::time::Instant::now() + STARTUP_LIMIT;
    loop {
        let target = home_target(&home);
        match open(&target, patience).await {
            Ok(channel) => return Ok(channel),
            // A server that exited because another took the home is no failure: that one is starting.
            Err(_)
                if let Some(reason) =
                    started.as_mut().and_then(|started| started.failure(&home))
                    && !home_server_running(&home) =>
            {
                return Err(Unreachable(format!(
                    "no queuectl server is running, and queuectld could not start: {reason}"
                ))
                .into());
            }
            // The server this command waited for is gone (it was stopping): start one after all.
            Err(_) if started.is_none() && !home_server_running(&home) => {
                started = Some(spawn_server(&home)?);
            }
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(Unreachable(format!(
                    "queuectld was started, but it did not answer at {target} within {}s ({error}); \
                     see {}",
                    STARTUP_LIMIT.as_secs(),
                    home.join(LOG_FILE).display()
                ))
                .into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
