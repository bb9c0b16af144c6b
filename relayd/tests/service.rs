//! relayd under a service manager: socket activation (the listener systemd
//! passes wins over `listen`), READY=1, a live status line, watchdog pings
//! answered by the accept loop, STOPPING=1 and a clean exit.

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::process::Stdio;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tunnel_tests::notify::NotifySocket;
use tunnel_tests::{TempDir, WAIT};

/// relayd on `config` as systemd starts it with a socket unit: the
/// socket at fd 3, LISTEN_FDS=1, LISTEN_PID its pid (the shell moves its
/// stdin to fd 3 and execs, so its pid is relayd's), NOTIFY_SOCKET set.
fn activated_relayd(
    config: &std::path::Path,
    activated: std::net::TcpListener,
    notify: &NotifySocket,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --config \"$1\" 3<&0 0</dev/null")
        .arg(env!("CARGO_BIN_EXE_relayd"))
        .arg(config)
        .stdin(Stdio::from(OwnedFd::from(activated)))
        .stdout(Stdio::null())
        .env("NOTIFY_SOCKET", notify.path());
    cmd
}

#[tokio::test]
async fn relayd_serves_on_the_socket_systemd_passes_and_reports_its_state() {
    let dir = TempDir::new("relayd-notify");
    let mut notify = NotifySocket::bind(&dir);
    // The activated socket, and an address already taken that `listen`
    // names: binding it would fail, so an answer proves the passed socket
    // was used.
    let activated = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = activated.local_addr().expect("addr");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = dir.path("relayd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{}\"\n[[users]]\nid = \"alice\"\nagent_token = \"{}\"\npublic = true\n[control]\nsocket = \"off\"\n",
            taken.local_addr().expect("addr"),
            tunnel_tests::agent_token("alice"),
        ),
    )
    .expect("write the config");
    let mut child = activated_relayd(&config, activated, &notify)
        .env("WATCHDOG_USEC", "400000")
        .env("RELAYD_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start relayd");
    let pid = Pid::from_raw(child.id().expect("pid") as i32);

    let seen = notify.until(|l| l == "READY=1").await;
    assert_eq!(seen, ["READY=1"], "READY=1 comes first");
    let seen = notify.until(|l| l.starts_with("STATUS=")).await;
    assert_eq!(
        seen.last().map(String::as_str),
        Some("STATUS=serving 0 tunnels, 0 streams in flight")
    );
    notify.until(|l| l == "WATCHDOG=1").await;
    notify.until(|l| l == "WATCHDOG=1").await;

    let answer = tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect to the passed socket");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("read");
        answer
    })
    .await
    .expect("join");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    notify.until(|l| l == "STOPPING=1").await;
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "{status}");
    drop(taken);
}

/// A socket-activated relayd that cannot start holds the socket (closing
/// each connection) instead of exiting: otherwise each waiting connection
/// starts it again, systemd's start limit fails the socket unit and nothing
/// listens. It says once what is wrong (also in STATUS=), and exits when
/// told to stop, for the restart that brings it back.
#[tokio::test]
async fn a_relayd_that_cannot_start_holds_its_activated_socket_and_says_why() {
    let dir = TempDir::new("relayd-hold");
    let mut notify = NotifySocket::bind(&dir);
    let activated = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = activated.local_addr().expect("addr");
    let config = dir.path("relayd.toml");
    let missing = dir.path("absent-key.pem");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert_file = \"{0}\"\nkey_file = \"{0}\"\n[control]\nsocket = \"off\"\n",
            missing.display()
        ),
    )
    .expect("write the config");
    let child = activated_relayd(&config, activated, &notify)
        .stderr(Stdio::piped())
        .env("RELAYD_LOG", "info")
        .kill_on_drop(true)
        .spawn()
        .expect("start relayd");
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    notify.until(|l| l == "READY=1").await;
    let seen = notify.until(|l| l.starts_with("STATUS=")).await;
    let status = seen.last().cloned().unwrap_or_default();
    assert!(status.contains("cannot start") && status.contains("absent-key.pem"), "{status}");
    assert!(status.contains("systemctl restart relayd"), "{status}");
    // Connections are taken off the backlog and closed, again and again.
    for _ in 0..3 {
        let closed = tokio::task::spawn_blocking(move || {
            let mut conn = std::net::TcpStream::connect(addr).expect("the socket still listens");
            let _ = conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n");
            let mut answer = Vec::new();
            let _ = conn.read_to_end(&mut answer);
            answer.len()
        })
        .await
        .expect("join");
        assert_eq!(closed, 0, "closed without an answer");
    }
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let out =
        tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("exits").expect("wait");
    assert_eq!(out.status.code(), Some(78), "a configuration error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("absent-key.pem") && err.contains("systemctl restart relayd"), "{err}");
}

/// A file the daemon's user may not read: the message names that user,
/// the file's owner and mode, and the commands that fix it.
#[test]
fn an_unreadable_key_file_names_the_owner_and_mode_it_needs() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("relayd-unreadable");
    let cert = tunnel_tests::tls::TestCert::new().expect("certificate");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let key = dir.path("key.pem");
    std::fs::copy(&cert.key_file, &key).expect("copy");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let certificate = dir.path("cert.pem");
    std::fs::copy(&cert.cert_file, &certificate).expect("copy");
    std::fs::set_permissions(&certificate, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = dir.path("relayd.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            certificate.display(),
            key.display()
        ),
    )
    .expect("config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // As nobody (uid 65534), the way relayd runs as its own user.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_relayd"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .expect("setpriv relayd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("key.pem") && err.contains("Permission denied"), "{err}");
    assert!(err.contains("owned by root with mode 0600"), "{err}");
    assert!(err.contains("chown nobody") && err.contains("chmod 600"), "{err}");
}
