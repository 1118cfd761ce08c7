//! Who can reach the server and what its jobs can see: TCP only on loopback and only with the token (health
//! excepted), and jobs that inherit none of the server's secrets or service-manager handles.

#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};

use common::{DEADLINE, Home, wait_until};

/// `queuectld --listen <url>` in `home`, with its stderr in test-server.log.
fn tcp_server(home: &Home, url: &str) -> Command {
    let mut command = home.server_command(0);
    command.args(["--listen", url]);
    command
}

/// Starts a TCP server on a free loopback port and returns it with its address.
fn start_tcp(home: &Home) -> (Child, String) {
    let server = tcp_server(home, "http://127.0.0.1:0").spawn().unwrap();
    let address_file = home.file("server.addr");
    wait_until("the server to write its address", DEADLINE, || {
        std::fs::read_to_string(&address_file).is_ok_and(|url| url.starts_with("http://"))
    });
    (server, std::fs::read_to_string(address_file).unwrap())
}

/// `grpcurl -plaintext [flags] host:port args` against a TCP server.
fn grpcurl_tcp(url: &str, flags: &[&str], args: &[&str]) -> Output {
    common::grpcurl()
        .unwrap()
        .arg("-plaintext")
        .args(flags)
        .arg(url.trim_start_matches("http://"))
        .args(args)
        .output()
        .unwrap()
}

/// The part of the standard health contract that grpcurl needs to call Check.
const HEALTH_PROTO: &str = r#"syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
"#;

#[test]
fn tcp_needs_the_token_for_everything_but_health() {
    let home = Home::new();
    let (mut server, url) = start_tcp(&home);
    let token_file = home.file("token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The right token (read by queuectl from the home) is accepted.
    assert!(
        home.ok(&["--server", &url, "status"])
            .starts_with("Job states:")
    );
    home.ok(&[
        "--server",
        &url,
        "enqueue",
        r#"{"id":"mine","command":"true"}"#,
    ]);

    // A wrong token, and no token at all (another home, no token file), are refused.
    let wrong = home
        .command(&["--server", &url, "status"])
        .env("QUEUECTL_TOKEN", "0".repeat(64))
        .output()
        .unwrap();
    let stranger = Home::new();
    let missing = stranger.try_queuectl(&["--server", &url, "enqueue", r#"{"command":"id"}"#]);
    for refused in [&wrong, &missing] {
        assert_eq!(refused.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("missing or wrong token"), "{stderr}");
    }

    if common::grpcurl().is_some() {
        // Reflection needs the token, so grpcurl gets the health contract from a file.
        std::fs::write(home.file("health.proto"), HEALTH_PROTO).unwrap();
        let import = home.path().to_str().unwrap();
        let health = grpcurl_tcp(
            &url,
            &["-import-path", import, "-proto", "health.proto"],
            &["grpc.health.v1.Health/Check"],
        );
        assert!(health.status.success(), "health needs no token");
        assert_eq!(
            String::from_utf8_lossy(&health.stdout)
                .split_whitespace()
                .collect::<String>(),
            r#"{"status":"SERVING"}"#,
            "health says nothing else"
        );
        for args in [&["list"][..], &["queuectl.v1.QueueService/Status"]] {
            let anonymous = grpcurl_tcp(&url, &[], args);
            assert!(!anonymous.status.success(), "{args:?} without a token");
            let stderr = String::from_utf8_lossy(&anonymous.stderr);
            assert!(stderr.contains("Unauthenticated"), "{stderr}");
        }
        let bearer = format!("authorization: Bearer {}", token.trim());
        let listed = grpcurl_tcp(&url, &["-H", &bearer], &["list"]);
        assert!(listed.status.success(), "reflection with the token");
        assert!(String::from_utf8_lossy(&listed.stdout).contains("queuectl.v1.QueueService"));
    }

    assert!(!home.file("queuectl.sock").exists(), "no socket beside TCP");
    let listed = home.ok(&["--server", &url, "list"]);
    assert_eq!(
        listed.lines().count(),
        1,
        "only the job with the right token"
    );
    let log = std::fs::read_to_string(home.file("test-server.log")).unwrap();
    assert!(!log.contains(token.trim()), "the token is never logged");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_non_loopback_listener_is_refused_with_the_reason() {
    let home = Home::new();
    for url in ["http://0.0.0.0:0", "http://[::]:0"] {
        let output = tcp_server(&home, url)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{url}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains("is not a loopback address"), "{stderr}");
        assert!(stderr.contains("--tls-cert and --tls-key"), "{stderr}");
    }
}

/// A certificate authority and a certificate it signed for localhost, made with openssl in `dir`.
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).display().to_string();
    let (ca_key, ca, key, csr, cert) = (
        path("ca.key"),
        path("ca.pem"),
        path("server.key"),
        path("server.csr"),
        path("server.pem"),
    );
    let extensions = path("ext.cnf");
    std::fs::write(
        &extensions,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    for args in [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-days",
            "1",
            "-subj",
            "/CN=queuectl test CA",
        ],
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=localhost",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "1",
            "-extfile",
            &extensions,
        ],
    ] {
        let output = Command::new("openssl").args(&args).output().unwrap();
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (ca, cert, key)
}

/// Starts `command` and returns it with the address it wrote.
fn start_listening(home: &Home, mut command: Command) -> (Child, String) {
    let server = command.spawn().unwrap();
    let address_file = home.file("server.addr");
    wait_until("the server to write its address", DEADLINE, || {
        std::fs::read_to_string(&address_file).is_ok_and(|url| url.contains("://"))
    });
    (server, std::fs::read_to_string(address_file).unwrap())
}

#[test]
fn a_non_loopback_listener_serves_with_tls_or_an_explicit_opt_out() {
    let home = Home::new();
    let (ca, cert, key) = certificates(home.path());
    let mut command = tcp_server(&home, "https://0.0.0.0:0");
    command.args(["--tls-cert", &cert, "--tls-key", &key]);
    let (mut server, url) = start_listening(&home, command);
    let port = url.rsplit(':').next().unwrap().trim().to_owned();
    assert!(url.starts_with("https://"), "{url}");
    let over_tls = home
        .command(&["--server", &format!("https://localhost:{port}"), "status"])
        .env("QUEUECTL_CA_CERT", &ca)
        .output()
        .unwrap();
    assert!(
        over_tls.status.success(),
        "{}",
        String::from_utf8_lossy(&over_tls.stderr)
    );
    let plain = home
        .command(&["--server", &format!("http://127.0.0.1:{port}"), "status"])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain text is not served");
    let _ = server.kill();
    let _ = server.wait();

    let other = Home::new();
    let mut command = tcp_server(&other, "http://0.0.0.0:0");
    command.arg("--insecure-allow-remote");
    let (mut server, url) = start_listening(&other, command);
    let port = url.rsplit(':').next().unwrap().trim().to_owned();
    other.ok(&["--server", &format!("http://127.0.0.1:{port}"), "status"]);
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn jobs_inherit_none_of_the_servers_secrets() {
    let home = Home::new();
    let secrets = [
        ("QUEUECTL_TOKEN", "secret-token-value"),
        ("NOTIFY_SOCKET", "/run/systemd/notify"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_PID", "1"),
        ("LISTEN_FDNAMES", "queuectl"),
        ("WATCHDOG_USEC", "1000000"),
        ("WATCHDOG_PID", "1"),
    ];
    let mut server = home.server_command(1);
    server.envs(secrets);
    let mut server = server.spawn().unwrap();
    wait_until("the server to answer", DEADLINE, || {
        home.try_queuectl(&["status"]).status.success()
    });
    home.enqueue(r#"{"id":"env","command":"env"}"#);
    home.wait_for_state("env", "completed");
    let printed = home.ok(&["logs", "env"]);
    assert!(printed.contains("QUEUECTL_HOME="), "env ran: {printed}");
    for (name, _) in secrets {
        assert!(
            !printed
                .lines()
                .any(|line| line.starts_with(&format!("{name}="))),
            "{name} reached the job"
        );
    }
    assert!(
        !printed.contains("secret-token-value"),
        "the token reached the job"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// A restart kills a recorded process group only if it still belongs to that run (a process carries the run's tag)
/// or to a shell this server started (it carries the server's tag): after a reboot the same group id can be
/// anything, another server's shell included.
#[cfg(target_os = "linux")]
#[test]
fn recovery_kills_only_process_groups_tagged_with_their_run_or_their_server() {
    use std::os::unix::process::CommandExt;
    let spawn = |variable: Option<(&str, &str)>| {
        let mut command = Command::new("sleep");
        command.arg("300").process_group(0);
        if let Some((name, value)) = variable {
            command.env(name, value);
        }
        command.spawn().unwrap()
    };
    let (run, gate) = (
        queuectl::runner::TAG_VARIABLE,
        queuectl::runner::GATE_VARIABLE,
    );
    let kill = |child: &std::process::Child| {
        queuectl::runner::kill_group(child.id(), "job1#1", "host-server-a")
    };
    let strangers = [
        spawn(None),
        spawn(Some((run, "job1#2"))),
        spawn(Some((gate, "host-server-b"))),
    ];
    for stranger in &strangers {
        assert!(!kill(stranger));
    }
    assert!(
        strangers
            .iter()
            .all(|stranger| common::alive(stranger.id()))
    );

    for variable in [(run, "job1#1"), (gate, "host-server-a")] {
        let mut ours = spawn(Some(variable));
        assert!(kill(&ours), "{variable:?} is ours");
        assert!(!ours.wait().unwrap().success());
    }
    for mut child in strangers {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// `nobody`: the user the next tests give a home to.
const STRANGER: &str = "65534:65534";

fn give_to(path: &std::path::Path, owner: &str) {
    let chown = Command::new("chown")
        .args(["-R", owner])
        .arg(path)
        .status()
        .unwrap();
    assert!(chown.success());
}

/// A user who owns a home could have planted jobs in it or could move its socket: neither the server nor the CLI
/// uses a home, or a file of one, that another user owns, even as root.
#[test]
fn a_home_another_user_owns_is_refused_by_the_server_and_the_cli() {
    if !common::root_or_skip("a_home_another_user_owns_is_refused_by_the_server_and_the_cli") {
        return;
    }
    let outside = tempfile::tempdir().unwrap();
    let marker = outside.path().join("planted-job-ran");
    let mut home = Home::with_server(0);
    home.enqueue(&format!(
        r#"{{"id":"planted","command":"touch {}"}}"#,
        marker.display()
    ));
    home.stop_server();
    give_to(home.path(), STRANGER);

    let server = common::output_within(&mut home.server_command(1), DEADLINE);
    assert!(!server.status.success());
    let stderr = String::from_utf8_lossy(&server.stderr);
    assert!(
        stderr.contains("belongs to")
            && stderr.contains("uid 65534")
            && stderr.contains("QUEUECTL_HOME"),
        "{stderr}"
    );

    // The CLI refuses before it connects or starts a server there.
    for args in [
        &["worker", "start", "--count", "1", "--daemon"][..],
        &["status"],
    ] {
        let output = common::output_within(
            home.command(args).env_remove("QUEUECTL_NO_AUTOSTART"),
            DEADLINE,
        );
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("belongs to"), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
    assert!(
        !home.file("queuectl.sock").exists(),
        "no server was started in the stranger's home"
    );
    assert!(!marker.exists(), "the planted job never ran");

    // A home of one's own with one file of someone else's is refused too, naming the file.
    give_to(home.path(), "0:0");
    give_to(&home.file("jobs.db"), STRANGER);
    let server = common::output_within(&mut home.server_command(1), DEADLINE);
    assert!(!server.status.success());
    let stderr = String::from_utf8_lossy(&server.stderr);
    assert!(stderr.contains("jobs.db belongs to"), "{stderr}");
    give_to(home.path(), "0:0");
}

/// A home made with a plain `mkdir` under umask 022: the server makes the folder 0700 and every file in it
/// (database, WAL, shared memory, log, lock, socket) is created owner-only.
#[test]
fn every_file_of_the_home_is_private_whatever_the_umask() {
    use std::os::unix::process::CommandExt;
    let home = Home::new();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut enqueue = home.command(&["enqueue", r#"{"id":"one","command":"echo hi"}"#]);
    enqueue.env_remove("QUEUECTL_NO_AUTOSTART");
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        enqueue.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    assert!(enqueue.output().unwrap().status.success());
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    home.wait_for_state("one", "completed");

    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(home.path()), 0o700, "the home was tightened");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(home.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(
            mode(&entry.path()) & 0o077,
            0,
            "{name} is readable by others"
        );
        checked.push(name);
    }
    for expected in [
        "jobs.db",
        "jobs.db-wal",
        "jobs.db-shm",
        "server.log",
        "server.lock",
        "queuectl.sock",
    ] {
        assert!(
            checked.iter().any(|name| name == expected),
            "{expected} in {checked:?}"
        );
    }
}

/// A TCP server that records the `authorization` header of every request it gets (and answers none).
fn recording_server(
    runtime: &tokio::runtime::Runtime,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    String,
) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = listener.local_addr().unwrap();
    let (_, health) = tonic_health::server::health_reporter();
    let recorder = tonic::service::InterceptorLayer::new(move |request: tonic::Request<()>| {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|value| value.to_str().unwrap().to_owned());
        record.lock().unwrap().push(authorization);
        Ok(request)
    });
    runtime.spawn(
        tonic::transport::Server::builder()
            .layer(recorder)
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (seen, format!("http://{address}"))
}

/// `--server` naming some other address never receives the home's token; only `QUEUECTL_TOKEN` is sent there.
#[test]
fn the_homes_token_goes_only_to_the_homes_own_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let home = Home::new();
    let (mut server, url) = start_tcp(&home);
    let (seen, other) = recording_server(&runtime);

    let output = home.try_queuectl(&["--server", &other, "status"]);
    assert!(!output.status.success(), "the recorder answers nothing");
    let requests = seen.lock().unwrap().clone();
    assert!(!requests.is_empty(), "the request reached the recorder");
    assert!(
        requests.iter().all(Option::is_none),
        "the home's token went to another server: {requests:?}"
    );

    let explicit = home
        .command(&["--server", &other, "status"])
        .env("QUEUECTL_TOKEN", "given-on-purpose")
        .output()
        .unwrap();
    assert!(!explicit.status.success());
    assert_eq!(
        seen.lock().unwrap().last().cloned().flatten().as_deref(),
        Some("Bearer given-on-purpose"),
        "a token named explicitly goes where it is sent"
    );

    assert!(
        home.ok(&["--server", url.trim(), "status"])
            .starts_with("Job states:")
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// A TCP server killed -9 leaves its address recorded, and someone else may listen there next; the home's next
/// server, on the socket, forgets that address, so the CLI neither talks to it nor sends it the home's token.
#[test]
fn a_killed_tcp_servers_address_is_forgotten_by_the_next_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut home = Home::new();
    let (mut tcp, _) = start_tcp(&home);
    tcp.kill().unwrap();
    tcp.wait().unwrap();
    let (seen, stranger) = recording_server(&runtime);
    // The freed port, taken by a stranger.
    std::fs::write(home.file("server.addr"), &stranger).unwrap();

    home.start_server(0);
    assert!(!home.file("server.addr").exists());
    assert_eq!(home.enqueue(r#"{"command":"true"}"#), "job1");
    assert!(
        seen.lock().unwrap().is_empty(),
        "the CLI went to the stale address: {:?}",
        seen.lock().unwrap()
    );
}

/// A job's processes get stdin, stdout and stderr only, whatever descriptors whoever started the server left open.
/// (The job's own shell also holds the pipe it read its job from, close-on-exec: a shell started before its job
/// reads it from its stdin.)
#[cfg(target_os = "linux")]
#[test]
fn jobs_inherit_no_descriptors_the_server_was_started_with() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut home = Home::new();
    let left_open = std::fs::File::open("/dev/null").unwrap();
    let source = left_open.as_raw_fd();
    let mut server = home.server_command(1);
    // SAFETY: dup2(2) is async-signal-safe; the copies at 10 and 251 lose the close-on-exec flag, as a careless
    // parent's descriptors would have it.
    unsafe {
        server.pre_exec(move || {
            for target in [10, 251] {
                if libc::dup2(source, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    home.start_server_with(server);
    let pid = home.server().id();
    let server_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let server_fds: Vec<String> = server_fds
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        server_fds.iter().any(|fd| fd == "251"),
        "the server holds the descriptor: {server_fds:?}"
    );

    home.enqueue(r#"{"id":"fds","command":"sh -c 'ls /proc/$$/fd'"}"#);
    home.wait_for_state("fds", "completed");
    let logs = home.ok(&["logs", "fds"]);
    let listed: Vec<&str> = logs
        .lines()
        .filter(|line| line.trim().parse::<u32>().is_ok())
        .map(str::trim)
        .collect();
    assert_eq!(listed, ["0", "1", "2"], "{logs}");
}

/// Metrics need no token, so they are served on loopback unless the deployer says otherwise.
#[test]
fn metrics_on_a_non_loopback_address_need_an_explicit_flag() {
    let home = Home::new();
    let mut refused = home.server_command(0);
    refused.args(["--metrics-listen", "0.0.0.0:0"]);
    let output = common::output_within(&mut refused, DEADLINE);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("--metrics-allow-remote"),
        "{stderr}"
    );

    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut home = Home::new();
    let mut allowed = home.server_command(0);
    allowed.args([
        "--metrics-listen",
        &format!("0.0.0.0:{port}"),
        "--metrics-allow-remote",
    ]);
    home.start_server_with(allowed);
    wait_until("the metrics endpoint to answer", DEADLINE, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// Methods of the queue's service that no server has.
const MADE_UP_PROTO: &str = r#"syntax = "proto3";
package queuectl.v1;
message Nothing {}
service QueueService {
  rpc MadeUpOne(Nothing) returns (Nothing);
  rpc MadeUpTwo(Nothing) returns (Nothing);
  rpc MadeUpThree(Nothing) returns (Nothing);
}
"#;

/// Anyone who can reach the port can send any path: the metrics must not grow a label for each, with or without
/// the token.
#[test]
fn made_up_methods_share_one_metrics_label() {
    if common::grpcurl().is_none() {
        return;
    }
    let home = Home::new();
    let port = common::free_port();
    let mut command = tcp_server(&home, "http://127.0.0.1:0");
    command.args(["--metrics-listen", &format!("127.0.0.1:{port}")]);
    let (mut server, url) = start_listening(&home, command);
    let protos = tempfile::tempdir().unwrap();
    std::fs::write(protos.path().join("made_up.proto"), MADE_UP_PROTO).unwrap();
    let import = protos.path().to_str().unwrap();
    let token = std::fs::read_to_string(home.file("token")).unwrap();
    let bearer = format!("authorization: Bearer {}", token.trim());
    for method in ["MadeUpOne", "MadeUpTwo", "MadeUpThree"] {
        let path = format!("queuectl.v1.QueueService/{method}");
        for (flags, code) in [
            (vec![], "Unauthenticated"),
            (vec!["-H", bearer.as_str()], "Unimplemented"),
        ] {
            let mut flags = flags;
            flags.extend(["-import-path", import, "-proto", "made_up.proto"]);
            let answer = grpcurl_tcp(&url, &flags, &[&path]);
            let stderr = String::from_utf8_lossy(&answer.stderr);
            assert!(
                !answer.status.success() && stderr.contains(code),
                "{path} {flags:?}: {stderr}"
            );
        }
    }
    let metrics = common::scrape(port);
    server.kill().unwrap();
    assert!(!metrics.contains("MadeUp"), "{metrics}");
    for line in [
        "queuectl_grpc_requests_total{method=\"unknown\",code=\"Unauthenticated\"} 3",
        "queuectl_grpc_requests_total{method=\"unknown\",code=\"Unimplemented\"} 3",
    ] {
        assert!(metrics.contains(line), "{line:?} missing from:\n{metrics}");
    }
}
