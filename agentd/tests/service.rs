//! agentd under a service manager: the real binary with `NOTIFY_SOCKET`
//! and `WATCHDOG_USEC` pointing at a socket this test reads.

use std::process::Stdio;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tunnel_tests::notify::NotifySocket;
use tunnel_tests::{TempDir, WAIT};

/// A loopback port nothing listens on (bound by the OS, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Ready without the relay (an offline laptop boots), a live status line,
/// watchdog pings, RELOADING/READY around SIGHUP, STOPPING on SIGTERM.
#[tokio::test]
async fn agentd_tells_the_service_manager_its_state() {
    let dir = TempDir::new("agentd-notify");
    let mut notify = NotifySocket::bind(&dir);
    let relay_port = closed_port();
    let config = dir.path("agentd.toml");
    std::fs::write(
        &config,
        format!(
            "relay = \"ws://127.0.0.1:{relay_port}\"\ntoken = \"{}\"\nupstream = \"http://127.0.0.1:{}\"\nstate_dir = \"{}\"\n[control]\nsocket = \"off\"\n",
            tunnel_tests::agent_token("alice"),
            closed_port(),
            dir.0.display()
        ),
    )
    .expect("write the config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "400000")
        .env("AGENTD_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start agentd");
    let pid = Pid::from_raw(child.id().expect("pid") as i32);

    let seen = notify.until(|l| l == "READY=1").await;
    assert_eq!(seen, ["READY=1"], "READY=1 comes first");
    let seen = notify.until(|l| l.starts_with("STATUS=reconnecting in")).await;
    let status = seen.last().expect("a status");
    assert!(status.contains("cannot reach the relay"), "{status}");
    println!("{status}");
    // The watchdog is fed while the supervisor answers its probes.
    notify.until(|l| l == "WATCHDOG=1").await;
    notify.until(|l| l == "WATCHDOG=1").await;

    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    notify.until(|l| l == "RELOADING=1").await;
    let seen = notify.until(|l| l == "READY=1").await;
    assert!(
        seen.iter().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING=1 carries MONOTONIC_USEC: {seen:?}"
    );

    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    notify.until(|l| l == "STOPPING=1").await;
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "{status}");
}

/// First run: no relay and no credential anywhere. agentd still starts
/// (READY=1) and says what to do in its status line.
#[tokio::test]
async fn a_fresh_agentd_is_ready_and_says_it_waits_to_be_enrolled() {
    let dir = TempDir::new("agentd-fresh");
    let mut notify = NotifySocket::bind(&dir);
    let config = dir.path("agentd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nupstream = \"http://127.0.0.1:{}\"\n[control]\nsocket = \"off\"\n",
            dir.0.display(),
            closed_port()
        ),
    )
    .expect("write the config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", notify.path())
        .env("AGENTD_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start agentd");
    notify.until(|l| l == "READY=1").await;
    let seen = notify.until(|l| l.starts_with("STATUS=")).await;
    assert_eq!(
        seen.last().map(String::as_str),
        Some("STATUS=not enrolled: run tunnelctl enroll wss://RELAY (credential on stdin)")
    );
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "{status}");
}
