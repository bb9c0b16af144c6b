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

/// agentd on `config` under the notify socket (the caller adds what else
/// the environment holds, and may redirect stderr).
fn agentd(config: &std::path::Path, notify: &NotifySocket) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"));
    cmd.arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", notify.path())
        .env("AGENTD_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// agentd at `info`, its stderr to the file `log`.
fn agentd_logging(
    config: &std::path::Path,
    notify: &NotifySocket,
    log: &std::path::Path,
) -> tokio::process::Child {
    agentd(config, notify)
        .env("AGENTD_LOG", "info")
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("start agentd")
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
    let mut child =
        agentd(&config, &notify).env("WATCHDOG_USEC", "400000").spawn().expect("start agentd");
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
    let mut child = agentd(&config, &notify).spawn().expect("start agentd");
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

/// `tunnelctl log-level` reads and replaces the filter of a running agentd
/// over its control socket; the change takes effect at once (the next
/// debug line is written) and a filter that does not parse is refused.
#[tokio::test]
async fn the_log_filter_changes_while_agentd_runs() {
    use clap::Parser as _;
    let dir = TempDir::new("agentd-log-level");
    let mut notify = NotifySocket::bind(&dir);
    let sock = dir.path("agentd.sock");
    let config = dir.path("agentd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nupstream = \"http://127.0.0.1:{}\"\n[control]\nsocket = \"{}\"\n",
            dir.0.display(),
            closed_port(),
            sock.display()
        ),
    )
    .expect("write the config");
    let log = dir.path("stderr.json");
    let mut child = agentd(&config, &notify)
        .env("AGENTD_LOG", "info")
        .env("AGENTD_LOG_FORMAT", "json")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start agentd");
    notify.until(|l| l == "READY=1").await;
    let ctl = |args: &[&str]| {
        let mut argv = vec!["tunnelctl", "--socket", sock.to_str().expect("utf-8")];
        argv.extend_from_slice(args);
        let cli = tunnelctl::cli::Cli::try_parse_from(argv).expect("arguments");
        async move {
            let mut out = Vec::new();
            tunnelctl::commands::run(cli, &mut out)
                .await
                .map(|()| String::from_utf8(out).expect("utf-8"))
                .map_err(|e| (e.exit_code(), e.to_string()))
        }
    };
    assert_eq!(ctl(&["log-level"]).await.expect("read"), "log filter: info (lines go to json)\n");
    assert_eq!(
        ctl(&["log-level", "debug"]).await.expect("set"),
        "log filter: debug (was info; until the next restart)\n"
    );
    let (code, msg) = ctl(&["log-level", "info,[[["]).await.expect_err("not a filter");
    assert_eq!(code, tunnelctl::exit::FAILED, "{msg}");
    assert!(msg.contains("is not a log filter"), "{msg}");
    let j = ctl(&["--json", "log-level"]).await.expect("read");
    let j: serde_json::Value = serde_json::from_str(&j).expect("json");
    assert_eq!(j["filter"], "debug");
    // The change is logged (as JSON lines, the format asked for).
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "{status}");
    let lines = std::fs::read_to_string(&log).expect("log");
    let changed = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "log filter changed")
        .unwrap_or_else(|| panic!("no JSON line says the filter changed:\n{lines}"));
    assert_eq!(changed["fields"]["filter"], "debug");
    // Debug lines appear once the filter says so (the drain at SIGTERM
    // logs at debug).
    assert!(lines.contains("\"level\":\"DEBUG\""), "{lines}");
}

/// SIGHUP reads the file again: a new endpoint policy applies at once on
/// the live session (a refused endpoint becomes reachable, same session),
/// other changed settings are named as taking a restart, and
/// RELOADING=1/READY=1 frame it.
#[tokio::test]
async fn sighup_applies_a_new_endpoint_policy_without_reconnecting() {
    use tunnel_tests::{StandIn, StandInConfig, TestRelay};
    let dir = TempDir::new("agentd-reload");
    let mut notify = NotifySocket::bind(&dir);
    let relay = TestRelay::start(&["alice"]).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let config = dir.path("agentd.toml");
    let base = format!(
        "relay = \"{}\"\ntoken = \"{}\"\nupstream = \"{}\"\n[control]\nsocket = \"off\"\n",
        relay.ws_url(),
        tunnel_tests::agent_token("alice"),
        upstream.url()
    );
    std::fs::write(&config, &base).expect("write the config");
    let log = dir.path("stderr.log");
    let mut child = agentd_logging(&config, &notify, &log);
    notify.until(|l| l == "READY=1").await;
    let session = relay.wait_for_agent("alice").await.session_id().to_owned();
    let http = reqwest::Client::new();
    let pull =
        || http.post(relay.tunnel_url("alice", "/api/pull")).body("{\"model\":\"m\"}").send();
    assert_eq!(pull().await.expect("pull").status(), 403, "refused by the default policy");

    std::fs::write(
        &config,
        format!("{base}[policy]\nallow = [\"POST /api/pull\"]\n[reconnect]\nmax_delay = \"7s\"\n"),
    )
    .expect("rewrite the config");
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    notify.until(|l| l == "RELOADING=1").await;
    notify.until(|l| l == "READY=1").await;
    assert_ne!(pull().await.expect("pull").status(), 403, "the new policy lets it through");
    assert_eq!(relay.relay.tunnel("alice").expect("tunnel").session_id(), session, "same session");

    // A file that no longer loads changes nothing.
    std::fs::write(&config, "relay = 5\n").expect("break the config");
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    notify.until(|l| l == "RELOADING=1").await;
    notify.until(|l| l == "READY=1").await;
    assert_ne!(pull().await.expect("pull").status(), 403, "the policy in force stays");

    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "{status}");
    let lines = std::fs::read_to_string(&log).expect("log");
    assert!(lines.contains("endpoint policy reloaded"), "{lines}");
    assert!(
        lines.contains("reconnect_max_delay")
            && lines.contains("they take effect at the next restart"),
        "{lines}"
    );
    assert!(lines.contains("the configuration file does not load"), "{lines}");
}

/// `agentd --config FILE pin` trusts what the agent trusts (the file's
/// `[tls] ca_file`), and says with its exit code whether the relay's chain
/// is trusted.
#[tokio::test]
async fn pin_uses_the_configured_ca_and_fails_on_an_untrusted_chain() {
    let cert = tunnel_tests::tls::TestCert::new().expect("certificate");
    let tls = cert.relay_tls();
    let relay = tunnel_tests::TestRelay::start_with(&["alice"], move |c| c.tls = Some(tls)).await;
    let dir = TempDir::new("agentd-pin");
    let config = dir.path("agentd.toml");
    std::fs::write(&config, format!("[tls]\nca_file = \"{}\"\n", cert.cert_file.display()))
        .expect("config");
    let url = format!("wss://{}", relay.addr);
    let pin = |config: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"));
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("pin").arg(&url).stdin(Stdio::null());
        async move { tokio::task::spawn_blocking(move || cmd.output()).await }
    };
    let trusted = pin(Some(&config)).await.expect("join").expect("agentd pin");
    let err = String::from_utf8_lossy(&trusted.stderr);
    assert!(trusted.status.success(), "{err}");
    assert!(err.contains("trusted by the CA file"), "{err}");
    assert!(String::from_utf8_lossy(&trusted.stdout).starts_with("sha256/"));
    // Without the file: the system's roots do not know this certificate.
    let untrusted = pin(None).await.expect("join").expect("agentd pin");
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(untrusted.status.code(), Some(1), "{err}");
    assert!(err.contains("NOT trusted") && err.contains("[tls] ca_file"), "{err}");
    assert!(
        String::from_utf8_lossy(&untrusted.stdout).starts_with("sha256/"),
        "the pins still show"
    );
}

/// `--help` names the file read without `--config`.
#[test]
fn help_names_the_configuration_file_read_by_default() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--help")
        .output()
        .expect("agentd --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/etc/agentd/agentd.toml"), "{text}");
    assert!(!text.contains("NAME"), "{text}");
}

/// The man page describes its commands itself: it points at no
/// `agentd-pin(8)` or `agentd-help(8)`, which no package ships.
#[test]
fn the_man_page_names_no_page_that_is_not_shipped() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("man")
        .output()
        .expect("agentd man");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(page.contains(".SH COMMANDS") && page.contains("\\fBpin\\fR"), "{page}");
    assert!(!page.contains("agentd\\-pin") && !page.contains("agentd-pin"), "{page}");
    assert!(!page.contains("agentd\\-help") && !page.contains("agentd-help"), "{page}");
}

/// What the journal shows by default is the message text: it says what
/// happened, why, and what comes next (the fields stay for queries).
#[tokio::test]
async fn a_warning_says_its_cause_in_its_message_text() {
    let dir = TempDir::new("agentd-messages");
    let notify = NotifySocket::bind(&dir);
    let relay_port = closed_port();
    let config = dir.path("agentd.toml");
    std::fs::write(
        &config,
        format!(
            "relay = \"ws://127.0.0.1:{relay_port}\"\ntoken = \"{}\"\n[control]\nsocket = \"off\"\n",
            tunnel_tests::agent_token("alice"),
        ),
    )
    .expect("write the config");
    let mut child = agentd(&config, &notify)
        .env("AGENTD_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agentd");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let message = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
            let text = v["fields"]["message"].as_str().unwrap_or_default().to_owned();
            if text.starts_with("cannot connect") {
                return text;
            }
        }
        panic!("agentd ended its log without the warning");
    })
    .await
    .expect("the warning in time");
    assert!(message.contains(&format!("127.0.0.1:{relay_port}")), "{message}");
    assert!(message.contains("Connection refused"), "the cause: {message}");
    assert!(message.contains("retrying in"), "what comes next: {message}");
    let _ = child.kill().await;
}

/// Access lines written as plain text are held while the daemon is busy and
/// go out when it runs out of work: each request's line is in the log while
/// agentd keeps running, and a later line of another kind comes after it.
#[tokio::test]
async fn an_idle_agentd_has_written_the_access_line_of_every_request() {
    use tunnel_tests::{StandIn, StandInConfig, TestRelay};
    let dir = TempDir::new("agentd-access");
    let notify = NotifySocket::bind(&dir);
    let relay = TestRelay::start(&["alice"]).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let config = dir.path("agentd.toml");
    std::fs::write(
        &config,
        format!(
            "relay = \"{}\"\ntoken = \"{}\"\nupstream = \"{}\"\n[control]\nsocket = \"off\"\n",
            relay.ws_url(),
            tunnel_tests::agent_token("alice"),
            upstream.url()
        ),
    )
    .expect("write the config");
    let log = dir.path("stderr.log");
    let mut child = agentd_logging(&config, &notify, &log);
    relay.wait_for_agent("alice").await;
    let http = reqwest::Client::new();
    for n in 1..=3 {
        let answer = http
            .get(relay.tunnel_url("alice", "/api/tags"))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body");
        assert!(answer.contains("models"), "{answer}");
        // The daemon is idle once it answered: the line must be there,
        // without a restart or a timer.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let lines = std::fs::read_to_string(&log).expect("log");
            if lines.matches("access: GET /api/tags 200").count() == n {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "request {n}: no access line:\n{lines}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    kill(Pid::from_raw(child.id().expect("pid") as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "{status}");
    let lines = std::fs::read_to_string(&log).expect("log");
    let last_access = lines.rfind("access: GET").expect("an access line");
    let stopping = lines.find("terminate signal").expect("the stop is logged");
    assert!(last_access < stopping, "lines out of order:\n{lines}");
}
