//! Scenario `devices`: one user with three desktops (devices) that hold
//! different models, behind one relay, all real processes. A mixed load of
//! 1,000 requests routed by model; the relay's CPU per request with that
//! routing against a user with one device (c = 64, same run); a minute of
//! light load counting session replacements; a model pulled through the
//! tunnel and how soon it is routable; a device killed mid-load; a device
//! frozen (SIGSTOP) and how soon it leaves the route.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::process::Child;

use crate::*;
use tools::procs::{cpu_time, free_port, path, scrape, spawn};

/// A device: its name, its models (the first is the stand-in's own), whether
/// they are loaded in memory, and its pace per token.
pub(crate) struct Spec {
    name: &'static str,
    models: &'static [&'static str],
    loaded: bool,
    token_ms: u64,
}

pub(crate) const SPECS: [Spec; 3] = [
    Spec { name: "gpu-box", models: &["llama3.3:70b", "qwen2.5:7b"], loaded: true, token_ms: 2 },
    Spec { name: "laptop", models: &["qwen2.5:7b", "llama3.2:3b"], loaded: true, token_ms: 6 },
    Spec {
        name: "mini",
        models: &["llama3.2:3b", "nomic-embed-text:latest"],
        loaded: false,
        token_ms: 6,
    },
];
/// The relay's liveness: a frozen agent is dropped within about
/// `ping x (missed + 1)`.
const PING: Duration = Duration::from_secs(1);
const MISSED: u32 = 3;

pub(crate) struct Setup {
    dir: std::path::PathBuf,
    relay: Child,
    pub(crate) relay_port: u16,
    /// Per device (SPECS order), then the one-device user's: agentd, its
    /// metrics port.
    agents: Vec<(Child, u16)>,
    _standins: Vec<Child>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn setup(bin: &Path, args: &Args) -> Result<Setup> {
    let dir = std::env::temp_dir().join(format!("tunnel-bench-devices-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("state"))?;
    let (relay_port, relay_metrics) = (free_port()?, free_port()?);
    let conf = format!(
        "listen = \"127.0.0.1:{relay_port}\"\nworker_threads = {}\nmetrics_listen = \"127.0.0.1:{relay_metrics}\"\nstate_dir = \"{}\"\n\n[[users]]\nid = \"u0\"\npublic = true\n\n[[users]]\nid = \"u1\"\npublic = true\nagent_token = \"{}\"\n\n[liveness]\nping_interval = \"{}s\"\nmax_missed_pings = {MISSED}\n\n[control]\nsocket = \"off\"\n",
        args.relay_workers,
        path(&dir.join("state")),
        token(1),
        PING.as_secs()
    );
    std::fs::write(dir.join("relayd.toml"), conf)?;
    // One credential per device, issued before relayd starts (it holds the
    // store while it runs).
    let mut secrets = Vec::new();
    for s in &SPECS {
        let out = tokio::process::Command::new(bin.join("relayd"))
            .args(["--config", &path(&dir.join("relayd.toml")), "token", "issue"])
            .args(["--user", "u0", "--role", "agent", "--device", s.name])
            .output()
            .await?;
        if !out.status.success() {
            bail!("relayd token issue: {}", String::from_utf8_lossy(&out.stderr));
        }
        secrets.push(String::from_utf8(out.stdout)?.trim().to_owned());
    }
    let relay =
        spawn(bin, "relayd", &["--config".into(), path(&dir.join("relayd.toml"))], &dir, "relayd")?;
    wait_port(relay_metrics).await?;
    let solo = Spec { name: "solo", models: &["qwen2.5:7b"], loaded: true, token_ms: 2 };
    let (mut agents, mut standins) = (Vec::new(), Vec::new());
    for (i, s) in SPECS.iter().chain([&solo]).enumerate() {
        let port = free_port()?;
        let mut a: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--model".into(),
            s.models[0].into(),
            "--only-its-model".into(),
            "--token-delay-ms".into(),
            s.token_ms.to_string(),
            "--name".into(),
            s.name.into(),
        ];
        for m in &s.models[1..] {
            a.extend(["--also".into(), (*m).into()]);
        }
        if s.loaded {
            a.push("--loaded".into());
        }
        standins.push(spawn(bin, "stand-in-ollama", &a, &dir, &format!("stand-in-{}", s.name))?);
        wait_port(port).await?;
        let metrics = free_port()?;
        let secret = secrets.get(i).cloned().unwrap_or_else(|| token(1));
        let file = dir.join(format!("agentd-{}.toml", s.name));
        std::fs::write(
            &file,
            format!(
                "relay = \"ws://127.0.0.1:{relay_port}\"\ntoken = \"{secret}\"\nupstream = \"http://127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\n[policy]\nallow = [\"POST /api/pull\"]\n\n[control]\nsocket = \"off\"\n"
            ),
        )?;
        let agent = spawn(
            bin,
            "agentd",
            &["--config".into(), path(&file)],
            &dir,
            &format!("agentd-{}", s.name),
        )?;
        agents.push((agent, metrics));
    }
    let setup = Setup { dir, relay, relay_port, agents, _standins: standins };
    let http = client(8);
    let deadline = Instant::now() + Duration::from_secs(60);
    while reported(&http, &setup.base()).await < SPECS.len() {
        if Instant::now() > deadline {
            bail!("the three devices did not report their models within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(setup)
}

impl Setup {
    pub(crate) fn base(&self) -> String {
        format!("http://127.0.0.1:{}/api/tunnel/u0", self.relay_port)
    }

    pub(crate) fn relay_cpu(&self) -> Duration {
        cpu_time(self.relay.id().unwrap_or(0))
    }

    pub(crate) fn signal(&self, device: usize, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.agents[device].0.id().context("agentd exited")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }
}

/// How many of u0's devices are connected and reported their models.
async fn reported(http: &Http, base: &str) -> usize {
    devices_connected(http, base).await.map_or(0, |d| d.1)
}

/// u0's connected devices, and how many of them reported their models.
pub(crate) async fn devices_connected(http: &Http, base: &str) -> Option<(Vec<String>, usize)> {
    let req = http::Request::get(format!("{base}/health")).body(full("")).ok()?;
    let resp = http.request(req).await.ok()?;
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.ok()?.to_bytes();
    let v: Value = serde_json::from_slice(&body).ok()?;
    let devices = v["devices"].as_array()?;
    let names = devices.iter().filter_map(|d| d["device"].as_str().map(str::to_owned)).collect();
    let n = devices.iter().filter(|d| d["service"]["models_available"].is_array()).count();
    Some((names, n))
}

/// Whether `device` has `model`, by the table.
pub(crate) fn has(device: &str, model: &str) -> bool {
    SPECS.iter().any(|s| s.name == device && s.models.contains(&model))
}

#[allow(clippy::print_stdout)]
pub(crate) async fn devices(bin: &Path, args: &Args) -> Result<Value> {
    let s = setup(bin, args).await?;
    let http = client(128);
    let base = s.base();
    let tokens = 16;
    println!(
        "one user, three devices: gpu-box {{llama3.3:70b, qwen2.5:7b}} loaded, 2 ms/token; laptop {{qwen2.5:7b, llama3.2:3b}} loaded, 6 ms/token; mini {{llama3.2:3b, nomic-embed-text}} on disk, 6 ms/token"
    );

    // 1. The mix.
    let n = if args.smoke { 100 } else { 1000 };
    let answers = run_all(&http, &base, (0..n).map(|i| mixed(i, tokens)).collect(), 16).await;
    let mix = judge_mix(&answers);
    println!("mixed load, {n} requests at c=16: {mix}");

    // 2. Routing's cost: the relay's CPU per chat, three devices against one.
    let cost = routing_cost(&s, &http, args).await;
    println!("relay CPU per chat at c=64 (medians of rounds): {cost}");

    // 3. A minute of light load: no device takes another's session.
    let steady_for = if args.smoke { Duration::from_secs(2) } else { Duration::from_secs(60) };
    let steady = run_until(&http, &base, mixed, tokens, 2, Instant::now() + steady_for).await;
    let mut sessions = Vec::new();
    for (_, metrics) in &s.agents[..SPECS.len()] {
        sessions.push(scrape(*metrics, "agentd_sessions_total").await.unwrap_or(0));
    }
    let replacements: u64 = sessions.iter().map(|n| n.saturating_sub(1)).sum();
    let steady_errors = steady.iter().filter(|a| a.status != 200).count();
    println!(
        "{:.0} s of light load ({} requests, {steady_errors} not 200): sessions per device {sessions:?}, {replacements} replacements",
        steady_for.as_secs_f64(),
        steady.len()
    );

    // 4. A model pulled through the tunnel: routable how soon.
    let pull = pulled(&http, &base).await?;
    println!("model pulled through the tunnel: {pull}");

    // 5. The laptop's agentd killed mid-load.
    let kill = killed(&s, &http, &base, tokens, args).await?;
    println!("laptop killed mid-load: {kill}");

    // 6. The mini frozen: out of the route within the liveness window.
    let t = Instant::now();
    s.signal(2, nix::sys::signal::Signal::SIGSTOP)?;
    let gone = loop {
        let now = devices_connected(&http, &base).await.map(|d| d.0).unwrap_or_default();
        if !now.iter().any(|d| d == "mini") {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("a frozen agent stayed in the route for 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    s.signal(2, nix::sys::signal::Signal::SIGCONT)?;
    let window = PING * (MISSED + 1);
    println!(
        "mini frozen (SIGSTOP): out of the route after {:.2} s (liveness window {:.0} s)",
        gone.as_secs_f64(),
        window.as_secs_f64()
    );

    Ok(json!({
        "mix": mix_json(&mix),
        "routing_cost": cost.json(),
        "steady": { "seconds": steady_for.as_secs_f64(), "requests": steady.len(), "not_200": steady_errors, "sessions_per_device": sessions, "replacements": replacements },
        "pull": pull.json(),
        "kill": kill.json(),
        "frozen": { "out_of_route_s": gone.as_secs_f64(), "liveness_window_s": window.as_secs_f64() },
    }))
}
