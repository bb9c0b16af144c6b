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
    // systemd's convention: the socket at fd 3, LISTEN_FDS=1, LISTEN_PID
    // the daemon's pid. The shell moves its stdin to fd 3 and execs, so
    // its pid is relayd's.
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --config \"$1\" 3<&0 0</dev/null")
        .arg(env!("CARGO_BIN_EXE_relayd"))
        .arg(&config)
        .stdin(Stdio::from(OwnedFd::from(activated)))
        .stdout(Stdio::null())
        .env("NOTIFY_SOCKET", notify.path())
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
