//! Every control RPC over a real unix socket in a temp dir, driven through
//! tunnelctl itself (the library for output, the binary for exit codes and
//! callers of another uid).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser as _;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tunnel_tests::{StandIn, StandInConfig, TempDir, TestAgent, TestRelay, WAIT, init_logging};
use tunnelctl::cli::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_tunnelctl");

/// A relay and an agent, each with its control socket served.
struct Rig {
    dir: TempDir,
    relay: TestRelay,
    agent: TestAgent,
    upstream: StandIn,
    stop: CancellationToken,
}

impl Rig {
    fn agent_sock(&self) -> PathBuf {
        self.dir.path("agentd.sock")
    }

    fn relay_sock(&self) -> PathBuf {
        self.dir.path("relayd.sock")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn rig() -> Rig {
    init_logging();
    let dir = TempDir::new("control");
    let relay = TestRelay::start(&["alice"]).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let state = dir.path("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let agent = TestAgent::start_with(&relay, "alice", &upstream.url(), move |c| {
        c.state_dir = Some(state);
    })
    .await;
    let stop = CancellationToken::new();
    let agent_listener = daemon::control::bind(&dir.path("agentd.sock")).expect("bind");
    let svc = agentd::control::Control::new(agent.agent.clone(), false);
    tokio::spawn(daemon::control::serve(svc.server(), agent_listener, stop.clone()));
    let relay_listener = daemon::control::bind(&dir.path("relayd.sock")).expect("bind");
    let svc = relayd::control::Control::new(relay.relay.clone(), relay.addr, false);
    tokio::spawn(daemon::control::serve(svc.server(), relay_listener, stop.clone()));
    Rig { dir, relay, agent, upstream, stop }
}

/// Runs tunnelctl in-process; its output or its error (with exit code).
async fn ctl(socket: &Path, args: &[&str]) -> Result<String, (u8, String)> {
    let mut argv = vec!["tunnelctl", "--socket", socket.to_str().expect("utf-8")];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).expect("valid arguments");
    let mut out = Vec::new();
    match tunnelctl::commands::run(cli, &mut out).await {
        Ok(()) => Ok(String::from_utf8(out).expect("utf-8")),
        Err(e) => Err((e.exit_code(), e.to_string())),
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("JSON output")
}

#[tokio::test]
async fn agent_rpcs_status_reconnect_rotate_install() {
    let rig = rig().await;
    let sock = rig.agent_sock();
    let status = ctl(&sock, &["status"]).await.expect("status");
    println!("{status}");
    assert!(status.starts_with("agentd "), "{status}");
    assert!(status.contains(": connected"), "{status}");
    assert!(status.contains(&rig.relay.ws_url()), "{status}");
    let j = json(&ctl(&sock, &["status", "--json"]).await.expect("status"));
    assert_eq!(j["state"], "connected");
    assert_eq!(j["sessions"], 1);
    let session = j["session_id"].as_str().expect("session").to_owned();
    assert_eq!(rig.relay.relay.tunnel("alice").expect("tunnel").session_id(), session);

    // Reconnect: a new session.
    let out = ctl(&sock, &["reconnect"]).await.expect("reconnect");
    assert!(out.contains("reconnecting"), "{out}");
    let mut state = rig.agent.agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.sessions == 2 && s.is_connected()))
        .await
        .expect("reconnected")
        .expect("state");

    // Rotation needs a credential session; this agent runs on a static
    // token: the relay says so, and tunnelctl passes it on.
    let (code, msg) = ctl(&sock, &["rotate-token"]).await.expect_err("a static token");
    assert_eq!(code, tunnelctl::exit::FAILED, "{msg}");
    assert!(msg.contains("rotate needs a session opened with an agent credential"), "{msg}");

    // Installing a token from a file: checked in-band, stored.
    let token = rig.dir.path("new.token");
    daemon::config::write_secret(&token, &tunnel_tests::agent_token("alice")).expect("write");
    let out = ctl(&sock, &["rotate-token", "--file", token.to_str().expect("utf-8")])
        .await
        .expect("install");
    assert!(out.contains("the live session runs on it"), "{out}");
    assert!(out.contains("credential"), "{out}");
    // An empty file is bad input, not a call.
    daemon::config::write_secret(&token, "").expect("write");
    let (code, _) = ctl(&sock, &["rotate-token", "--file", token.to_str().expect("utf-8")])
        .await
        .expect_err("empty");
    assert_eq!(code, tunnelctl::exit::DATA);
}

#[tokio::test]
async fn relay_rpcs_status_tunnels_tokens_disconnect_reload() {
    let rig = rig().await;
    let sock = rig.relay_sock();
    let relay = |args: &'static [&'static str]| {
        let sock = sock.clone();
        async move {
            let mut a = vec!["--daemon", "relayd"];
            a.extend_from_slice(args);
            ctl(&sock, &a).await
        }
    };
    let status = relay(&["status"]).await.expect("status");
    println!("{status}");
    assert!(status.starts_with("relayd ") && status.contains("serving"), "{status}");
    assert!(status.contains("tunnels    1"), "{status}");
    let tunnels = relay(&["tunnels"]).await.expect("tunnels");
    println!("{tunnels}");
    assert!(tunnels.starts_with("USER "), "{tunnels}");
    assert!(tunnels.lines().nth(1).is_some_and(|l| l.starts_with("alice ")), "{tunnels}");
    let j = json(&relay(&["tunnels", "--json"]).await.expect("tunnels"));
    assert_eq!(j[0]["user"], "alice");
    assert!(j[0]["user_hash"].as_str().is_some_and(|h| h.starts_with("u_")));

    // Without a signing key the relay cannot mint: said as such.
    let (code, msg) = relay(&["token", "issue", "--user", "alice", "--role", "client"])
        .await
        .expect_err("no key");
    assert_eq!(code, tunnelctl::exit::FAILED);
    assert!(msg.contains("signing key"), "{msg}");
    // An agent credential can be issued and revoked.
    let cred = relay(&["token", "issue", "--user", "alice", "--role", "agent", "--json"])
        .await
        .expect("issue");
    let cred = json(&cred);
    let id = cred["id"].as_str().expect("id").to_owned();
    assert!(cred["token"].as_str().is_some_and(|t| t.starts_with("tcred_")));
    let out = ctl(&sock, &["--daemon", "relayd", "token", "revoke", &id]).await.expect("revoke");
    assert!(out.contains("revoked"), "{out}");
    let out = ctl(&sock, &["--daemon", "relayd", "token", "revoke", &id]).await.expect("again");
    assert!(out.contains("was revoked already"), "{out}");

    // Reload with no TLS: nothing to reload, and that is not an error.
    let out = relay(&["reload"]).await.expect("reload");
    assert_eq!(out, "nothing to reload (relayd has no [tls])\n");

    // Disconnect: the tunnel goes, the agent comes back.
    let tunnel = rig.relay.relay.tunnel("alice").expect("tunnel");
    let out = relay(&["disconnect", "alice", "--device", "laptop"]).await.expect("disconnect");
    assert_eq!(out, "alice's device laptop has no tunnel\n");
    let out = relay(&["disconnect", "alice"]).await.expect("disconnect");
    assert!(out.starts_with("alice: 1 tunnel closed"), "{out}");
    tokio::time::timeout(WAIT, tunnel.closed()).await.expect("closed");
    let out = relay(&["disconnect", "nobody"]).await.expect("disconnect");
    assert!(out.contains("nobody has no tunnel"), "{out}");
    let _ = &rig.agent;
}

#[tokio::test]
async fn trace_streams_events_of_a_request() {
    let rig = rig().await;
    // agentd knows no user ids: a filter by user is refused, not silently
    // matching nothing.
    let (code, msg) = ctl(&rig.agent_sock(), &["trace", "--user", "alice"])
        .await
        .expect_err("agentd cannot filter by user");
    assert_eq!(code, tunnelctl::exit::FAILED, "{msg}");
    assert!(msg.contains("--user filters only at relayd"), "{msg}");
    for (which, sock) in [("agentd", rig.agent_sock()), ("relayd", rig.relay_sock())] {
        let args = ["--daemon", which, "trace", "--limit", "3", "--path", "/api/chat", "--json"];
        let tracing = {
            let sock = sock.clone();
            tokio::spawn(async move { ctl(&sock, &args).await })
        };
        // The subscriber is registered once the daemon counts it.
        let observer = if which == "agentd" {
            rig.agent.agent.observer().clone()
        } else {
            rig.relay.relay.observer().clone()
        };
        let deadline = std::time::Instant::now() + WAIT;
        while observer.taps.subscribers() == 0 {
            assert!(std::time::Instant::now() < deadline, "the trace never subscribed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A request on another path is filtered out; the chat is traced.
        let http = reqwest::Client::new();
        http.get(rig.relay.tunnel_url("alice", "/api/tags")).send().await.expect("tags");
        let resp = http
            .post(rig.relay.tunnel_url("alice", "/api/chat"))
            .json(&serde_json::json!({"model": "m", "messages": []}))
            .send()
            .await
            .expect("chat");
        resp.text().await.expect("body");
        let out = tokio::time::timeout(WAIT, tracing).await.expect("trace ends").expect("task");
        let out = out.expect("trace");
        println!("{which} trace:\n{out}");
        let events: Vec<Value> = out.lines().map(json).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap_or("")).collect();
        assert_eq!(kinds, ["start", "head", "end"], "{out}");
        assert_eq!(events[0]["path"], "/api/chat");
        assert_eq!(events[2]["status"], 200);
        assert_eq!(events[2]["outcome"], "ok");
        assert_eq!(events[2]["model"], "m", "the model the stand-in answered with");
        assert_eq!(events[2]["tokens"], tunnel_tests::ollama::WORDS.len() as u64);
        if which == "relayd" {
            assert!(events[0]["user_hash"].as_str().is_some_and(|h| h.starts_with("u_")));
        }
        assert!(!out.contains("alice"), "user ids never appear in a trace: {out}");
    }
    let _ = &rig.upstream;
}

/// Runs the tunnelctl binary as uid/gid 65534 (nobody), or as a member of
/// the socket's group: `setpriv` from util-linux.
fn as_nobody(groups: Option<u32>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("setpriv");
    cmd.arg("--reuid=65534");
    match groups {
        Some(g) => cmd.arg(format!("--regid={g}")).arg(format!("--groups={g}")),
        None => cmd.arg("--regid=65534").arg("--clear-groups"),
    };
    cmd.arg(BIN).args(args).output().expect("run setpriv")
}

// The children block this test's thread while the daemons answer them:
// the daemons need threads of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_another_uid_are_refused_by_mode_and_by_credentials() {
    if !nix::unistd::geteuid().is_root() || Command::new("setpriv").arg("--help").output().is_err()
    {
        println!("skipped: needs root and setpriv to run a caller of another uid");
        return;
    }
    let rig = rig().await;
    let sock = rig.agent_sock();
    let s = sock.to_str().expect("utf-8");
    // The directory must let nobody reach the socket at all.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&rig.dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // Mode 0660: the connect itself is refused.
    let out = as_nobody(None, &["--socket", s, "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("0660, another user: {} {err}", out.status);
    assert_eq!(out.status.code(), Some(i32::from(tunnelctl::exit::NO_PERMISSION)), "{err}");
    assert!(err.contains("add yourself to group agentd"), "{err}");

    // Mode 0666: the connect works, the daemon's peer check refuses.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_nobody(None, &["--socket", s, "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("0666, another user: {} {err}", out.status);
    assert_eq!(out.status.code(), Some(i32::from(tunnelctl::exit::NO_PERMISSION)), "{err}");
    assert!(err.contains("permission denied"), "{err}");

    // A member of the daemon's group may read, not change.
    let gid = nix::unistd::getegid().as_raw();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).expect("chmod");
    let out = as_nobody(Some(gid), &["--socket", s, "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("connected"));
    let out = as_nobody(Some(gid), &["--socket", s, "reconnect"]);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("group member, reconnect: {} {err}", out.status);
    assert_eq!(out.status.code(), Some(i32::from(tunnelctl::exit::NO_PERMISSION)), "{err}");
    assert!(err.contains("changing agentd takes root or the agentd user"), "{err}");
    assert_eq!(rig.agent.agent.state().borrow().sessions, 1, "the refused reconnect did nothing");
}

#[test]
fn a_missing_socket_says_the_daemon_is_not_running() {
    let dir = TempDir::new("ctl-missing");
    let sock = dir.path("nope.sock");
    let out = Command::new(BIN)
        .args(["--socket", sock.to_str().expect("utf-8"), "status"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(i32::from(tunnelctl::exit::UNAVAILABLE)), "{err}");
    assert!(err.contains("agentd is not running: no control socket at"), "{err}");
    let out = Command::new(BIN)
        .args(["--socket", sock.to_str().expect("utf-8"), "tunnels"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relayd is not running"), "{err}");
}

#[tokio::test]
async fn a_closed_stdout_ends_trace_quietly() {
    let rig = rig().await;
    let mut child = Command::new(BIN)
        .args(["--socket", rig.agent_sock().to_str().expect("utf-8"), "trace"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let observer = rig.agent.agent.observer().clone();
    let deadline = std::time::Instant::now() + WAIT;
    while observer.taps.subscribers() == 0 {
        assert!(std::time::Instant::now() < deadline, "the trace never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(child.stdout.take());
    let http = reqwest::Client::new();
    // Requests until the child writes into the closed pipe and exits.
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        http.get(rig.relay.tunnel_url("alice", "/api/tags")).send().await.expect("tags");
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "tunnelctl never noticed its closed stdout");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).ok();
    assert!(status.success(), "{status} {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// First run: an agent with no relay and no credential stays up, says so,
/// and `tunnelctl enroll` stores both in its state directory and connects;
/// a restarted agent finds them there. A relay set in the file wins.
#[tokio::test]
async fn enroll_takes_a_fresh_agent_to_a_connected_one() {
    use daemon::Resolve as _;
    init_logging();
    let dir = TempDir::new("enroll");
    let relay = TestRelay::start(&["alice"]).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let state_dir = dir.path("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let fresh = || {
        agentd::ConfigFile {
            state_dir: Some(state_dir.clone()),
            upstream: Some(upstream.url()),
            ..agentd::ConfigFile::default()
        }
        .resolve()
        .expect("a configuration without relay or token is valid")
    };
    let agent = std::sync::Arc::new(agentd::Agent::new(fresh()));
    let stop = CancellationToken::new();
    let running = agent.clone();
    let run_stop = stop.clone();
    let run = tokio::spawn(async move { running.run(run_stop).await });
    let sock = dir.path("agentd.sock");
    let listener = daemon::control::bind(&sock).expect("bind");
    tokio::spawn(daemon::control::serve(
        agentd::control::Control::new(agent.clone(), false).server(),
        listener,
        stop.clone(),
    ));

    let mut state = agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.phase == agentd::Phase::NotEnrolled))
        .await
        .expect("waits to be enrolled")
        .expect("state");
    let status = ctl(&sock, &["status"]).await.expect("status");
    println!("{status}");
    assert!(status.contains(": not enrolled"), "{status}");
    assert!(status.contains("run tunnelctl enroll"), "{status}");
    assert!(agent.status_line().starts_with("not enrolled: run tunnelctl enroll"));

    // A credential file that is empty is bad input, not a call.
    let token_file = dir.path("alice.token");
    daemon::config::write_secret(&token_file, "").expect("write");
    let (code, _) =
        ctl(&sock, &["enroll", &relay.ws_url(), "--token-file", token_file.to_str().unwrap()])
            .await
            .expect_err("no credential");
    assert_eq!(code, tunnelctl::exit::DATA);

    // A credential file others may read is refused, as agentd refuses such
    // a token_file.
    std::fs::write(&token_file, format!("{}\n", tunnel_tests::agent_token("alice")))
        .expect("write");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    let (code, msg) =
        ctl(&sock, &["enroll", &relay.ws_url(), "--token-file", token_file.to_str().unwrap()])
            .await
            .expect_err("a credential file others can read");
    assert_eq!(code, tunnelctl::exit::DATA, "{msg}");
    assert!(msg.contains("readable by others"), "{msg}");
    daemon::config::write_secret(&token_file, &tunnel_tests::agent_token("alice")).expect("write");
    // What agentd would not accept is refused at enrollment too, and
    // nothing is stored: a port that is not one, a secret in the URL, plain
    // text to another machine.
    for (bad, why) in [
        ("ws://127.0.0.1:99999".to_owned(), "not a port"),
        (format!("ws://user:secret@{}", relay.addr), "user name or password"),
        (format!("{}?token=abc", relay.ws_url()), "query string"),
        ("ws://relay.example.com".to_owned(), "in clear"),
    ] {
        let (code, msg) =
            ctl(&sock, &["enroll", &bad, "--token-file", token_file.to_str().unwrap()])
                .await
                .expect_err(&bad);
        assert_eq!(code, tunnelctl::exit::FAILED, "{bad}: {msg}");
        assert!(msg.contains(why), "{bad}: {msg}");
    }
    assert!(!state_dir.join("enrollment.toml").exists());
    assert!(!state_dir.join("credential").exists());
    // A relay that is not a URL is refused, and nothing is stored.
    let (code, msg) =
        ctl(&sock, &["enroll", "ftp://relay", "--token-file", token_file.to_str().unwrap()])
            .await
            .expect_err("not a relay URL");
    assert_eq!(code, tunnelctl::exit::FAILED, "{msg}");
    assert!(msg.contains("use ws://, wss://, http:// or https://"), "{msg}");
    assert!(!state_dir.join("enrollment.toml").exists());
    assert!(!state_dir.join("credential").exists());
    let url = format!("http://{}", relay.addr);
    let out = ctl(&sock, &["enroll", &url, "--token-file", token_file.to_str().unwrap()])
        .await
        .expect("enroll");
    println!("{out}");
    assert!(out.contains("; connected"), "{out}");
    assert!(out.contains(&relay.ws_url()), "{out}");
    relay.wait_for_agent("alice").await;
    let stored = std::fs::read_to_string(state_dir.join("enrollment.toml")).expect("stored");
    assert!(stored.contains(&relay.ws_url()), "{stored}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(state_dir.join("enrollment.toml")).expect("enrollment");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the enrollment is agentd's only");
    }
    let credential = state_dir.join("credential");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&credential).expect("credential").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    stop.cancel();
    tokio::time::timeout(WAIT, run).await.expect("stops").expect("join");

    // A restart finds the enrollment: connected without any call.
    let restarted = fresh();
    assert_eq!(
        restarted.target.as_ref().map(|t| t.relay.to_string()),
        Some(relay.ws_url()),
        "the relay comes from the state directory"
    );
    let agent = std::sync::Arc::new(agentd::Agent::new(restarted));
    let stop = CancellationToken::new();
    let running = agent.clone();
    let run_stop = stop.clone();
    tokio::spawn(async move { running.run(run_stop).await });
    let mut state = agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected()))
        .await
        .expect("connects after a restart")
        .expect("state");

    // A relay named in the file wins over an enrollment elsewhere.
    let configured = agentd::ConfigFile {
        relay: Some(relay.ws_url()),
        state_dir: Some(state_dir.clone()),
        upstream: Some(upstream.url()),
        ..agentd::ConfigFile::default()
    }
    .resolve()
    .expect("config");
    let pinned = std::sync::Arc::new(agentd::Agent::new(configured));
    let err = pinned
        .enroll("wss://other.example", Some(tunnel_tests::agent_token("alice")), vec![])
        .await
        .expect_err("the file wins");
    assert!(err.to_string().contains("the configuration file sets relay"), "{err}");
    stop.cancel();
}

#[tokio::test]
async fn one_user_cannot_hold_the_control_socket_open_without_bound() {
    use tokio::io::AsyncReadExt as _;
    let rig = rig().await;
    let sock = rig.agent_sock();
    // Connections that never speak, up to the bound: they stay open.
    let mut idle = Vec::new();
    for _ in 0..daemon::control::conns::PER_UID {
        idle.push(tokio::net::UnixStream::connect(&sock).await.expect("connect"));
    }
    // One more is closed at once.
    let mut extra = tokio::net::UnixStream::connect(&sock).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, extra.read(&mut byte)).await.expect("closed, not held");
    assert_eq!(read.unwrap_or(0), 0, "the connection past the bound is closed");
    // The ones held are still open (the server's HTTP/2 preface arrives,
    // no end).
    let mut first = idle.swap_remove(0);
    let mut preface = [0u8; 256];
    let held = tokio::time::timeout(Duration::from_millis(200), async {
        while first.read(&mut preface).await.unwrap_or(0) > 0 {}
    })
    .await;
    assert!(held.is_err(), "a held connection within the bound stays open");
    // Closed, they give their places back: tunnelctl works again.
    drop(first);
    drop(idle);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match ctl(&sock, &["status"]).await {
            Ok(out) => break assert!(out.starts_with("agentd "), "{out}"),
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "never answered again: {e:?}")
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// On a host with both daemons, tunnelctl says which one it shows.
#[tokio::test]
async fn with_both_daemons_here_tunnelctl_says_which_one_answers() {
    let rig = rig().await;
    let xdg = rig.dir.path("xdg");
    let agent_listener =
        daemon::control::bind(&xdg.join("agentd").join("control.sock")).expect("bind");
    let svc = agentd::control::Control::new(rig.agent.agent.clone(), false);
    tokio::spawn(daemon::control::serve(svc.server(), agent_listener, rig.stop.clone()));
    let relay_listener =
        daemon::control::bind(&xdg.join("relayd").join("control.sock")).expect("bind");
    let svc = relayd::control::Control::new(rig.relay.relay.clone(), rig.relay.addr, false);
    tokio::spawn(daemon::control::serve(svc.server(), relay_listener, rig.stop.clone()));
    let run = |args: &'static [&'static str]| {
        let xdg = xdg.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(BIN).args(args).env("XDG_RUNTIME_DIR", xdg).output().expect("tunnelctl")
        })
    };
    let out = run(&["status"]).await.expect("join");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("agentd "), "{stdout}");
    assert!(
        stderr.contains("agentd and relayd both run here; this is agentd (--daemon relayd"),
        "{stderr}"
    );
    let out = run(&["--daemon", "relayd", "status"]).await.expect("join");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("relayd "), "{stdout}");
    assert!(stderr.is_empty(), "asked for by name: no note ({stderr})");
}

/// tunnelctl's man page describes its commands on the page: it points at
/// no `tunnelctl-status(1)`, which no package ships.
#[test]
fn the_man_page_names_no_page_that_is_not_shipped() {
    let out = Command::new(BIN).arg("man").output().expect("tunnelctl man");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(page.contains(".SH COMMANDS") && page.contains("\\fBstatus\\fR"), "{page}");
    assert!(!page.contains("tunnelctl\\-status") && !page.contains("tunnelctl-status"), "{page}");
}
