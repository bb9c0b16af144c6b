//! Benchmark (a program that prints numbers, not a test): runs relayd,
//! agentd and the stand-in Ollama as real processes on this machine and
//! measures each scenario on the direct path (client -> stand-in) and the
//! tunnel path (client -> relayd -> agentd -> stand-in) in the same run,
//! interleaved, over several rounds; reports medians and tunnel/direct
//! ratios with the machine (cores, load) beside them. Writes
//! `<out>/<scenario>.json` and SVG plots.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/tunnel-bench all --out docs/bench
//! target/release/tunnel-bench small --relay-workers 2
//! target/release/tunnel-bench --smoke all    # seconds; CI proves it runs
//! ```

use daemon::Resolve as _;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::process::Child;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use tunnel_proto::{Hello, Limits, Message, PROTOCOL_VERSION, SUBPROTOCOL, capability};
use tunnel_tests::procs::{
    bin_dir, cpu_time, free_port, machine, path, proc_stats, reset_peak_rss, scrape, spawn,
};
use tunnel_tests::svg::{COLORS, Series, cdf, chart};
use tunnel_tests::tls::TestCert;

#[derive(Parser, Debug)]
#[command(about = "Measure the tunnel against the direct path, scenario by scenario")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Short runs that prove each scenario works (CI), not measurements.
    #[arg(long, global = true)]
    smoke: bool,
    /// Where JSON results and SVG plots go.
    #[arg(long, global = true, default_value = "bench-out")]
    out: PathBuf,
    /// relayd tokio worker threads.
    #[arg(long, global = true, default_value_t = 1)]
    relay_workers: usize,
    /// Rounds per measurement (each round runs direct and tunnel once).
    #[arg(long, global = true)]
    rounds: Option<usize>,
    /// Flow-control window per stream, both daemons (default: theirs).
    #[arg(long, global = true)]
    stream_window: Option<u32>,
    /// Largest body chunk per frame, both daemons (default: theirs).
    #[arg(long, global = true)]
    max_chunk: Option<u32>,
    /// Pause between tokens in the `streams` scenario, in milliseconds.
    #[arg(long, global = true, default_value_t = 100)]
    token_ms: u64,
}

/// `[limits]` lines both daemons get (from --stream-window, --max-chunk).
static LIMITS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// GET /api/tags at concurrency 1/16/64, POST /api/chat at 16.
    Small,
    /// 200 NDJSON tokens at 5 ms/token, and a 200-token burst.
    Stream,
    /// 50 MiB and 1 GiB uploads and downloads.
    Bulk,
    /// A client reading a large response at 1 MB/s.
    SlowReader,
    /// Idle agents on one relay: relay memory per tunnel.
    FanIn,
    /// 1,000 concurrent streams across 100 agents.
    Streams,
    /// Time until 1,000 agents are back after a relay crash.
    Storm,
    /// Every scenario above, in order.
    All,
}

const ALL: [Scenario; 7] = [
    Scenario::Small,
    Scenario::Stream,
    Scenario::Bulk,
    Scenario::SlowReader,
    Scenario::FanIn,
    Scenario::Streams,
    Scenario::Storm,
];

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Small => "small",
            Scenario::Stream => "stream",
            Scenario::Bulk => "bulk",
            Scenario::SlowReader => "slow-reader",
            Scenario::FanIn => "fan-in",
            Scenario::Streams => "streams",
            Scenario::Storm => "storm",
            Scenario::All => "all",
        }
    }
}

#[tokio::main]
#[allow(clippy::print_stdout)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut limits = String::new();
    if let Some(w) = args.stream_window {
        limits.push_str(&format!("stream_window = {w}\n"));
    }
    if let Some(c) = args.max_chunk {
        limits.push_str(&format!("max_chunk_bytes = {c}\n"));
    }
    LIMITS.get_or_init(|| limits);
    let fds = tunnel_tests::raise_fd_limit()?;
    std::fs::create_dir_all(&args.out)?;
    let bin = bin_dir(&["relayd", "agentd", "stand-in-ollama", "tcp-forward"])?;
    let list: Vec<Scenario> =
        if args.scenario == Scenario::All { ALL.to_vec() } else { vec![args.scenario] };
    let (load, cores) = machine();
    println!(
        "machine: {cores} cores, load {load:.2}, {}; open-file limit {fds}; relayd workers {}{}",
        cpu_model(),
        args.relay_workers,
        if args.smoke { "; SMOKE run: not a measurement" } else { "" }
    );
    for s in list {
        let started = Instant::now();
        let (load_before, _) = machine();
        let mut result = match s {
            Scenario::Small => small(&bin, &args).await,
            Scenario::Stream => stream(&bin, &args).await,
            Scenario::Bulk => bulk(&bin, &args).await,
            Scenario::SlowReader => slow_reader(&bin, &args).await,
            Scenario::FanIn => fan_in(&bin, &args).await,
            Scenario::Streams => streams(&bin, &args).await,
            Scenario::Storm => storm(&bin, &args).await,
            Scenario::All => unreachable!("expanded above"),
        }
        .with_context(|| format!("scenario {}", s.name()))?;
        let (load_after, _) = machine();
        result["scenario"] = json!(s.name());
        result["smoke"] = json!(args.smoke);
        result["seconds"] = json!(started.elapsed().as_secs_f64());
        result["machine"] = json!({
            "cores": cores,
            "cpu": cpu_model(),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "load_before": load_before,
            "load_after": load_after,
            "relay_workers": args.relay_workers,
            "limits": LIMITS.get().cloned().unwrap_or_default(),
            "agent_workers": 1,
            "when": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        });
        let file = args.out.join(format!("{}.json", s.name()));
        std::fs::write(&file, serde_json::to_string_pretty(&result)?)?;
        println!(
            "  -> {} ({:.1} s, load {load_before:.2} -> {load_after:.2})\n",
            file.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                Some(l.strip_prefix("model name")?.split(':').nth(1)?.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

// ---------------------------------------------------------------- the rig

type Body = BoxBody<Bytes, Infallible>;
type Http = Client<HttpConnector, Body>;

fn client(pool: usize) -> Http {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(pool).build(conn)
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// Which way a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Client -> stand-in.
    Direct,
    /// Client -> relayd -> agentd -> stand-in.
    Tunnel,
    /// Client -> tcp-forward -> tcp-forward -> stand-in: the raw-TCP
    /// baseline, two hops that only copy bytes.
    Raw,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Tunnel => "tunnel",
            Route::Raw => "raw TCP",
        }
    }
}

/// The order of the paths in round `r`: rotating, so none always runs on a
/// warmer machine.
fn order(r: usize) -> [Route; 3] {
    match r % 3 {
        0 => [Route::Direct, Route::Tunnel, Route::Raw],
        1 => [Route::Tunnel, Route::Raw, Route::Direct],
        _ => [Route::Raw, Route::Direct, Route::Tunnel],
    }
}

struct RigOpts {
    /// Users the relay knows (u0, u1, ...).
    users: usize,
    /// agentd processes (for u0.., each its own).
    agents: usize,
    handshakes_per_second: u32,
    /// relayd terminates TLS (a throwaway self-signed certificate); agents
    /// dial `wss://`.
    tls: bool,
}

/// One user with one agentd: most scenarios.
const ONE_AGENT: RigOpts = RigOpts { users: 1, agents: 1, handshakes_per_second: 1000, tls: false };

/// The stand-in, relayd and agentd processes of one scenario.
struct Rig {
    bin: PathBuf,
    dir: PathBuf,
    _standin: Child,
    relay: Child,
    agents: Vec<Child>,
    standin_port: u16,
    relay_port: u16,
    relay_metrics: u16,
    agent_metrics: Vec<u16>,
    /// The relay's certificate when it serves TLS.
    cert: Option<TestCert>,
    /// The two chained forwarders of the raw-TCP baseline, and the port of
    /// the first.
    forwarders: Vec<Child>,
    raw_port: u16,
}

static RIGS: AtomicUsize = AtomicUsize::new(0);

fn token(i: usize) -> String {
    format!("bench-agent-token-{i:06}-0123456789")
}

impl Rig {
    async fn start(bin: &Path, args: &Args, o: RigOpts) -> Result<Rig> {
        let dir = std::env::temp_dir().join(format!(
            "tunnel-bench-{}-{}",
            std::process::id(),
            RIGS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let standin_port = free_port()?;
        let standin = spawn(
            bin,
            "stand-in-ollama",
            &[
                "--listen".into(),
                format!("127.0.0.1:{standin_port}"),
                // Each chat request sets its own pace.
                "--token-delay-ms".into(),
                "0".into(),
            ],
            &dir,
            "stand-in",
        )?;
        wait_port(standin_port).await?;
        let (raw_port, second) = (free_port()?, free_port()?);
        let mut forwarders = Vec::new();
        for (name, listen, to) in [("fwd-2", second, standin_port), ("fwd-1", raw_port, second)] {
            forwarders.push(spawn(
                bin,
                "tcp-forward",
                &[
                    "--listen".into(),
                    format!("127.0.0.1:{listen}"),
                    "--to".into(),
                    format!("127.0.0.1:{to}"),
                ],
                &dir,
                name,
            )?);
            wait_port(listen).await?;
        }
        let relay_port = free_port()?;
        let relay_metrics = free_port()?;
        let mut conf = format!(
            "listen = \"127.0.0.1:{relay_port}\"\nworker_threads = {}\nmetrics_listen = \"127.0.0.1:{relay_metrics}\"\n",
            args.relay_workers
        );
        for i in 0..o.users {
            conf.push_str(&format!("\n[[users]]\nid = \"u{i}\"\nagent_token = \"{}\"\n", token(i)));
        }
        conf.push_str(&format!(
            "\n[limits]\nhandshakes_per_second = {}\n{}",
            o.handshakes_per_second,
            LIMITS.get().map(String::as_str).unwrap_or_default()
        ));
        let cert = if o.tls { Some(TestCert::new()?) } else { None };
        if let Some(c) = &cert {
            conf.push_str(&format!(
                "\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                path(&c.cert_file),
                path(&c.key_file)
            ));
        }
        std::fs::write(dir.join("relayd.toml"), conf)?;
        let mut rig = Rig {
            bin: bin.to_owned(),
            relay: Self::spawn_relay(bin, &dir)?,
            dir,
            _standin: standin,
            agents: Vec::new(),
            standin_port,
            relay_port,
            relay_metrics,
            agent_metrics: Vec::new(),
            cert,
            forwarders,
            raw_port,
        };
        wait_port(relay_metrics).await?;
        for i in 0..o.agents {
            let port = free_port()?;
            rig.agent_metrics.push(port);
            let file = rig.dir.join(format!("agentd-{i}.toml"));
            std::fs::write(
                &file,
                format!(
                    "relay = \"{}://127.0.0.1:{relay_port}\"\ntoken = \"{}\"\nupstream = \"http://127.0.0.1:{standin_port}\"\nmetrics_listen = \"127.0.0.1:{port}\"\n\n[limits]\n{}{}",
                    if rig.cert.is_some() { "wss" } else { "ws" },
                    token(i),
                    LIMITS.get().map(String::as_str).unwrap_or_default(),
                    rig.cert.as_ref().map_or(String::new(), |c| format!(
                        "\n[tls]\nca_file = \"{}\"\n",
                        path(&c.cert_file)
                    )),
                ),
            )?;
            rig.agents.push(spawn(
                bin,
                "agentd",
                &["--config".into(), path(&file)],
                &rig.dir,
                &format!("agentd-{i}"),
            )?);
        }
        rig.wait_agents(o.agents, Duration::from_secs(120)).await?;
        Ok(rig)
    }

    fn spawn_relay(bin: &Path, dir: &Path) -> Result<Child> {
        spawn(bin, "relayd", &["--config".into(), path(&dir.join("relayd.toml"))], dir, "relayd")
    }

    /// Waits until the relay counts `n` agents.
    async fn wait_agents(&self, n: usize, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let have = scrape(self.relay_metrics, "relayd_agents_connected").await.unwrap_or(0);
            if have as usize >= n {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!("only {have} of {n} agents connected after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, p: Route, user: usize, target: &str) -> String {
        match p {
            Route::Direct => format!("http://127.0.0.1:{}{target}", self.standin_port),
            Route::Tunnel => {
                format!("http://127.0.0.1:{}/api/tunnel/u{user}{target}", self.relay_port)
            }
            Route::Raw => format!("http://127.0.0.1:{}{target}", self.raw_port),
        }
    }

    /// CPU time of the two raw-TCP forwarders so far.
    fn forwarders_cpu(&self) -> Duration {
        self.forwarders.iter().filter_map(Child::id).map(cpu_time).sum()
    }

    /// CPU time of what carries `p` besides the client and the stand-in.
    fn path_cpu(&self, p: Route) -> Duration {
        match p {
            Route::Direct => Duration::ZERO,
            Route::Tunnel => self.daemons_cpu(),
            Route::Raw => self.forwarders_cpu(),
        }
    }

    fn relay_pid(&self) -> u32 {
        self.relay.id().unwrap_or(0)
    }

    fn agent_pid(&self, i: usize) -> u32 {
        self.agents.get(i).and_then(Child::id).unwrap_or(0)
    }

    /// CPU time of relayd and every agentd so far.
    fn daemons_cpu(&self) -> Duration {
        cpu_time(self.relay_pid())
            + self.agents.iter().filter_map(Child::id).map(cpu_time).sum::<Duration>()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_port(port: u16) -> Result<()> {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("nothing listens on port {port} after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- statistics

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Whole requests, with their latencies.
#[derive(Default)]
struct Load {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    latencies_ms: Vec<f64>,
}

/// `c` clients each sending `make()` back to back for `dur`.
async fn closed_loop(
    http: &Http,
    make: Arc<dyn Fn() -> Request<Body> + Send + Sync>,
    c: usize,
    dur: Duration,
) -> Load {
    let started = Instant::now();
    let deadline = started + dur;
    let mut workers = Vec::with_capacity(c);
    for _ in 0..c {
        let http = http.clone();
        let make = make.clone();
        workers.push(tokio::spawn(async move {
            let mut l = Load::default();
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = match http.request(make()).await {
                    Ok(resp) => {
                        let good = resp.status().is_success();
                        resp.into_body().collect().await.is_ok() && good
                    }
                    Err(_) => false,
                };
                if ok {
                    l.ok += 1;
                    l.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    l.errors += 1;
                }
            }
            l
        }));
    }
    let mut total = Load::default();
    for w in workers {
        if let Ok(l) = w.await {
            total.ok += l.ok;
            total.errors += l.errors;
            total.latencies_ms.extend(l.latencies_ms);
        }
    }
    total.elapsed = started.elapsed();
    total
}

fn write_plot(out: &Path, name: &str, svg: String) -> Result<()> {
    std::fs::write(out.join(name), svg)?;
    Ok(())
}

// ---------------------------------------------------------------- small requests

#[allow(clippy::print_stdout)]
async fn small(bin: &Path, args: &Args) -> Result<Value> {
    let rig = Rig::start(bin, args, ONE_AGENT).await?;
    let http = client(256);
    let (rounds, dur) = if args.smoke {
        (1, Duration::from_millis(300))
    } else {
        (args.rounds.unwrap_or(5), Duration::from_secs(3))
    };
    let chat = json!({ "model": "m", "stream": false, "messages": [{ "role": "user", "content": "hi" }], "options": { "num_predict": 8 } }).to_string();
    let cases: Vec<(&str, Method, &str, Option<String>, usize)> = vec![
        ("GET /api/tags", Method::GET, "/api/tags", None, 1),
        ("GET /api/tags", Method::GET, "/api/tags", None, 16),
        ("GET /api/tags", Method::GET, "/api/tags", None, 64),
        ("POST /api/chat", Method::POST, "/api/chat", Some(chat), 16),
    ];
    println!(
        "small requests ({rounds} rounds x {dur:?} per path, medians; raw = two plain TCP forwarders)"
    );
    println!(
        "{:<16} {:>4} {:>9} {:>9} {:>6} {:>9} {:>6} {:>13} {:>13} {:>13} {:>7} {:>7}",
        "request",
        "c",
        "direct/s",
        "tunnel/s",
        "ratio",
        "raw/s",
        "ratio",
        "direct p50/99",
        "tunnel p50/99",
        "raw p50/99",
        "tun us",
        "raw us"
    );
    let mut rows = Vec::new();
    let mut plot = Vec::new();
    for (label, method, target, body, c) in cases {
        let make_for = |p: Route| -> Arc<dyn Fn() -> Request<Body> + Send + Sync> {
            let url = rig.url(p, 0, target);
            let method = method.clone();
            let body = body.clone();
            Arc::new(move || {
                let mut b = Request::builder().method(method.clone()).uri(&url);
                if body.is_some() {
                    b = b.header("content-type", "application/json");
                }
                b.body(full(body.clone().unwrap_or_default())).expect("valid request")
            })
        };
        // Warm every path (connections, pools, page cache).
        for p in order(0) {
            closed_loop(&http, make_for(p), c, Duration::from_millis(200)).await;
        }
        let mut rps = [Vec::new(), Vec::new(), Vec::new()];
        let mut p50 = [Vec::new(), Vec::new(), Vec::new()];
        let mut p99 = [Vec::new(), Vec::new(), Vec::new()];
        let mut lat = [Vec::new(), Vec::new(), Vec::new()];
        let mut cpu_per_req = [Vec::new(), Vec::new(), Vec::new()];
        let mut errors = [0u64; 3];
        for r in 0..rounds {
            for p in order(r) {
                let k = p as usize;
                let cpu0 = rig.path_cpu(p);
                let l = closed_loop(&http, make_for(p), c, dur).await;
                let cpu = rig.path_cpu(p).saturating_sub(cpu0);
                errors[k] += l.errors;
                rps[k].push(l.ok as f64 / l.elapsed.as_secs_f64());
                p50[k].push(percentile(&l.latencies_ms, 50.0));
                p99[k].push(percentile(&l.latencies_ms, 99.0));
                if l.ok > 0 {
                    cpu_per_req[k].push(cpu.as_secs_f64() * 1e6 / l.ok as f64);
                }
                lat[k].extend(l.latencies_ms);
            }
        }
        let (d, t, w) = (median(&rps[0]), median(&rps[1]), median(&rps[2]));
        let row = json!({
            "request": label, "concurrency": c,
            "direct_rps": d, "tunnel_rps": t, "ratio": t / d,
            "raw_tcp_rps": w, "raw_tcp_ratio": w / d,
            "direct_p50_ms": median(&p50[0]), "direct_p99_ms": median(&p99[0]),
            "tunnel_p50_ms": median(&p50[1]), "tunnel_p99_ms": median(&p99[1]),
            "raw_tcp_p50_ms": median(&p50[2]), "raw_tcp_p99_ms": median(&p99[2]),
            "daemons_cpu_us_per_request": median(&cpu_per_req[1]),
            "raw_tcp_forwarders_cpu_us_per_request": median(&cpu_per_req[2]),
            "rounds_rps": { "direct": rps[0], "tunnel": rps[1], "raw_tcp": rps[2] },
            "errors": { "direct": errors[0], "tunnel": errors[1], "raw_tcp": errors[2] },
        });
        println!(
            "{:<16} {:>4} {:>9.0} {:>9.0} {:>5.2}x {:>9.0} {:>5.2}x {:>6.2}/{:<6.2} {:>6.2}/{:<6.2} {:>6.2}/{:<6.2} {:>7.1} {:>7.1}{}",
            label,
            c,
            d,
            t,
            t / d,
            w,
            w / d,
            median(&p50[0]),
            median(&p99[0]),
            median(&p50[1]),
            median(&p99[1]),
            median(&p50[2]),
            median(&p99[2]),
            median(&cpu_per_req[1]),
            median(&cpu_per_req[2]),
            if errors != [0; 3] {
                format!("  (errors: direct {}, tunnel {}, raw {})", errors[0], errors[1], errors[2])
            } else {
                String::new()
            }
        );
        if label.starts_with("GET") && c == 64 {
            for (k, p) in [Route::Direct, Route::Tunnel, Route::Raw].iter().enumerate() {
                plot.push(Series {
                    name: format!("{} (c=64)", p.name()),
                    color: COLORS[k],
                    points: cdf(&lat[k]),
                });
            }
        }
        rows.push(row);
    }
    write_plot(
        &args.out,
        "small-latency.svg",
        chart("GET /api/tags, concurrency 64: latency CDF", "latency (ms)", "% of requests", &plot),
    )?;
    Ok(json!({ "rows": rows, "round_seconds": dur.as_secs_f64(), "rounds": rounds }))
}

// ---------------------------------------------------------------- streaming

/// What a client saw of one streamed answer.
#[derive(Default)]
struct Seen {
    /// When each line completed, from sending the request.
    arrivals_ms: Vec<f64>,
    /// Each line's arrival minus its `created_at` at the model server.
    delivery_ms: Vec<f64>,
    /// Lines that arrived in the same read as an earlier line.
    coalesced: usize,
}

async fn chat_stream(http: &Http, url: &str, tokens: usize, delay_ms: u64) -> Result<Seen> {
    let body = json!({ "model": "m", "messages": [], "options": { "num_predict": tokens, "token_delay_ms": delay_ms } }).to_string();
    let req = Request::post(url).header("content-type", "application/json").body(full(body))?;
    let t0 = Instant::now();
    let resp = http.request(req).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut seen = Seen::default();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        let at = t0.elapsed().as_secs_f64() * 1e3;
        let wall = SystemTime::now();
        buf.extend_from_slice(&data);
        let mut lines = 0usize;
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            lines += 1;
            seen.arrivals_ms.push(at);
            if let Some(created) = created_at(&line)
                && let Ok(d) = wall.duration_since(created)
            {
                seen.delivery_ms.push(d.as_secs_f64() * 1e3);
            }
        }
        seen.coalesced += lines.saturating_sub(1);
    }
    if seen.arrivals_ms.len() != tokens + 1 {
        bail!("{} lines instead of {}", seen.arrivals_ms.len(), tokens + 1);
    }
    Ok(seen)
}

fn created_at(line: &[u8]) -> Option<SystemTime> {
    const KEY: &[u8] = b"\"created_at\":\"";
    let start = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let end = start + line[start..].iter().position(|b| *b == b'"')?;
    humantime::parse_rfc3339(std::str::from_utf8(&line[start..end]).ok()?).ok()
}

fn gaps(arrivals: &[f64]) -> Vec<f64> {
    arrivals.windows(2).map(|w| w[1] - w[0]).collect()
}

#[allow(clippy::print_stdout)]
async fn stream(bin: &Path, args: &Args) -> Result<Value> {
    let rig = Rig::start(bin, args, ONE_AGENT).await?;
    let http = client(16);
    let (paced_rounds, burst_rounds) =
        if args.smoke { (1, 2) } else { (args.rounds.unwrap_or(10), 30) };
    let tokens = 200;
    for p in order(0) {
        chat_stream(&http, &rig.url(p, 0, "/api/chat"), 5, 0).await?;
    }
    let mut ttft = [Vec::new(), Vec::new(), Vec::new()];
    let mut gap = [Vec::new(), Vec::new(), Vec::new()];
    let mut delivery = [Vec::new(), Vec::new(), Vec::new()];
    let mut coalesced = [0usize; 3];
    for r in 0..paced_rounds {
        for p in order(r) {
            let k = p as usize;
            let s = chat_stream(&http, &rig.url(p, 0, "/api/chat"), tokens, 5).await?;
            ttft[k].push(s.arrivals_ms[0]);
            gap[k].extend(gaps(&s.arrivals_ms));
            delivery[k].extend(s.delivery_ms);
            coalesced[k] += s.coalesced;
        }
    }
    let mut burst = [Vec::new(), Vec::new(), Vec::new()];
    let mut burst_coalesced = [0usize; 3];
    for r in 0..burst_rounds {
        for p in order(r) {
            let k = p as usize;
            let s = chat_stream(&http, &rig.url(p, 0, "/api/chat"), tokens, 0).await?;
            burst[k].push(*s.arrivals_ms.last().unwrap_or(&f64::NAN));
            burst_coalesced[k] += s.coalesced;
        }
    }
    println!(
        "streaming: {tokens} tokens at 5 ms ({paced_rounds} rounds), burst at 0 ms ({burst_rounds} rounds)"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "direct", "tunnel", "added", "raw TCP", "added"
    );
    let line = |name: &str, v: [f64; 3]| {
        println!(
            "{name:<34} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            v[0],
            v[1],
            v[1] - v[0],
            v[2],
            v[2] - v[0]
        )
    };
    let each = |f: &dyn Fn(usize) -> f64| [f(0), f(1), f(2)];
    let ttft_m = each(&|k| median(&ttft[k]));
    let d50 = each(&|k| percentile(&delivery[k], 50.0));
    let d99 = each(&|k| percentile(&delivery[k], 99.0));
    let g50 = each(&|k| percentile(&gap[k], 50.0));
    let g99 = each(&|k| percentile(&gap[k], 99.0));
    let gmax = each(&|k| percentile(&gap[k], 100.0));
    let burst_m = each(&|k| median(&burst[k]));
    line("time to first token, median (ms)", ttft_m);
    line("line delivery latency p50 (ms)", d50);
    line("line delivery latency p99 (ms)", d99);
    line("gap between lines p50 (ms)", g50);
    line("gap between lines p99 (ms)", g99);
    line("200-token burst, whole (ms)", burst_m);
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "coalesced lines (paced / burst)",
        format!("{}/{}", coalesced[0], burst_coalesced[0]),
        format!("{}/{}", coalesced[1], burst_coalesced[1]),
        "",
        format!("{}/{}", coalesced[2], burst_coalesced[2])
    );
    write_plot(
        &args.out,
        "stream-latency.svg",
        chart(
            "200 tokens at 5 ms: time from the model server writing a line to the client reading it",
            "delivery latency (ms)",
            "% of lines",
            &[
                Series { name: "direct".into(), color: COLORS[0], points: cdf(&delivery[0]) },
                Series { name: "tunnel".into(), color: COLORS[1], points: cdf(&delivery[1]) },
                Series { name: "raw TCP".into(), color: COLORS[2], points: cdf(&delivery[2]) },
            ],
        ),
    )?;
    let per_path = |v: [f64; 3]| json!({ "direct": v[0], "tunnel": v[1], "raw_tcp": v[2], "added": v[1] - v[0], "added_raw_tcp": v[2] - v[0] });
    let pct = |k: usize| json!({ "p50": d50[k], "p99": d99[k] });
    let gp = |k: usize| json!({ "p50": g50[k], "p99": g99[k], "max": gmax[k] });
    Ok(json!({
        "tokens": tokens, "token_delay_ms": 5, "paced_rounds": paced_rounds, "burst_rounds": burst_rounds,
        "ttft_ms": per_path(ttft_m),
        "delivery_ms": { "direct": pct(0), "tunnel": pct(1), "raw_tcp": pct(2) },
        "gap_ms": { "direct": gp(0), "tunnel": gp(1), "raw_tcp": gp(2) },
        "coalesced_lines": { "direct": coalesced[0], "tunnel": coalesced[1], "raw_tcp": coalesced[2] },
        "burst_ms": per_path(burst_m),
        "burst_coalesced_lines": { "direct": burst_coalesced[0], "tunnel": burst_coalesced[1], "raw_tcp": burst_coalesced[2] },
    }))
}

// ---------------------------------------------------------------- bulk

static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

async fn download(http: &Http, url: &str, size: u64) -> Result<Duration> {
    let t0 = Instant::now();
    let resp = http.request(Request::get(url).body(full(Bytes::new()))?).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len() as u64;
        }
    }
    if n != size {
        bail!("downloaded {n} bytes instead of {size}");
    }
    Ok(t0.elapsed())
}

async fn upload(http: &Http, url: &str, size: u64) -> Result<Duration> {
    let chunks = size.div_ceil(ZEROS.len() as u64);
    let frames = futures_util::stream::iter((0..chunks).map(move |i| {
        let len = (size - i * ZEROS.len() as u64).min(ZEROS.len() as u64) as usize;
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(&ZEROS[..len])))
    }));
    let body = BodyExt::boxed(StreamBody::new(frames));
    let t0 = Instant::now();
    let resp = http.request(Request::post(url).body(body)?).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let answer: Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
    if answer["bytes"].as_u64() != Some(size) {
        bail!("the model server got {} bytes instead of {size}", answer["bytes"]);
    }
    Ok(t0.elapsed())
}

#[allow(clippy::print_stdout)]
async fn bulk(bin: &Path, args: &Args) -> Result<Value> {
    let rig = Rig::start(bin, args, ONE_AGENT).await?;
    let http = client(4);
    let sizes: Vec<u64> = if args.smoke { vec![4 << 20] } else { vec![50 << 20, 1 << 30] };
    let rounds = if args.smoke { 1 } else { args.rounds.unwrap_or(3) };
    println!("bulk transfers ({rounds} rounds, medians; MB = 10^6 bytes)");
    println!(
        "{:<22} {:>11} {:>11} {:>6} {:>11} {:>6} {:>14} {:>14}",
        "transfer",
        "direct MB/s",
        "tunnel MB/s",
        "ratio",
        "raw MB/s",
        "ratio",
        "relayd peak",
        "agentd peak"
    );
    let mut rows = Vec::new();
    for &size in &sizes {
        for dir in ["download", "upload"] {
            let mut mbps = [Vec::new(), Vec::new(), Vec::new()];
            let mut peak = (0u64, 0u64);
            for r in 0..rounds {
                for p in order(r) {
                    if p == Route::Tunnel {
                        reset_peak_rss(rig.relay_pid());
                        reset_peak_rss(rig.agent_pid(0));
                    }
                    let took = if dir == "download" {
                        download(&http, &rig.url(p, 0, &format!("/zeros?n={size}")), size).await?
                    } else {
                        upload(&http, &rig.url(p, 0, "/sink"), size).await?
                    };
                    mbps[p as usize].push(size as f64 / took.as_secs_f64() / 1e6);
                    if p == Route::Tunnel {
                        peak.0 = peak.0.max(proc_stats(rig.relay_pid()).hwm_kib);
                        peak.1 = peak.1.max(proc_stats(rig.agent_pid(0)).hwm_kib);
                    }
                }
            }
            let (d, t, w) = (median(&mbps[0]), median(&mbps[1]), median(&mbps[2]));
            let label = format!("{dir} {} MiB", size >> 20);
            println!(
                "{label:<22} {d:>11.0} {t:>11.0} {:>5.2}x {w:>11.0} {:>5.2}x {:>10.1} MiB {:>10.1} MiB",
                t / d,
                w / d,
                peak.0 as f64 / 1024.0,
                peak.1 as f64 / 1024.0
            );
            rows.push(json!({
                "transfer": dir, "bytes": size,
                "direct_mb_s": d, "tunnel_mb_s": t, "ratio": t / d,
                "raw_tcp_mb_s": w, "raw_tcp_ratio": w / d,
                "relayd_peak_rss_kib": peak.0, "agentd_peak_rss_kib": peak.1,
                "rounds_mb_s": { "direct": mbps[0], "tunnel": mbps[1], "raw_tcp": mbps[2] },
            }));
        }
    }
    Ok(json!({ "rows": rows, "rounds": rounds }))
}

// ---------------------------------------------------------------- slow reader

#[allow(clippy::print_stdout)]
async fn slow_reader(bin: &Path, args: &Args) -> Result<Value> {
    let rig = Rig::start(bin, args, ONE_AGENT).await?;
    let http = client(4);
    let read_for = if args.smoke { Duration::from_millis(1500) } else { Duration::from_secs(10) };
    let rate = 1_000_000.0; // bytes per second
    let size: u64 = 256 << 20;
    let mut out = serde_json::Map::new();
    println!("slow reader: {size} byte response read at 1 MB/s for {read_for:?}");
    for p in [Route::Direct, Route::Tunnel] {
        let resp = http
            .request(
                Request::get(rig.url(p, 0, &format!("/zeros?n={size}")))
                    .body(full(Bytes::new()))?,
            )
            .await?;
        let mut body = resp.into_body();
        let t0 = Instant::now();
        let mut read = 0u64;
        let mut peak = (0u64, 0u64, 0u64, 0u64);
        let mut next_sample = Instant::now();
        while t0.elapsed() < read_for {
            let Some(frame) = body.frame().await else { break };
            if let Some(d) = frame?.data_ref() {
                read += d.len() as u64;
            }
            // Hold back until the read rate is back at 1 MB/s, sampling the
            // daemons meanwhile.
            let due = t0 + Duration::from_secs_f64(read as f64 / rate);
            loop {
                let now = Instant::now();
                if p == Route::Tunnel && now >= next_sample {
                    next_sample = now + Duration::from_millis(50);
                    peak.0 = peak
                        .0
                        .max(scrape(rig.relay_metrics, "relayd_buffered_bytes").await.unwrap_or(0));
                    peak.1 = peak.1.max(
                        scrape(rig.agent_metrics[0], "agentd_buffered_bytes").await.unwrap_or(0),
                    );
                    peak.2 = peak.2.max(proc_stats(rig.relay_pid()).rss_kib);
                    peak.3 = peak.3.max(proc_stats(rig.agent_pid(0)).rss_kib);
                }
                if Instant::now() >= due {
                    break;
                }
                let wake = if p == Route::Tunnel { due.min(next_sample) } else { due };
                tokio::time::sleep_until(wake.into()).await;
            }
        }
        let got = read as f64 / t0.elapsed().as_secs_f64() / 1e6;
        drop(body);
        if p == Route::Direct {
            println!("  direct: read {read} bytes at {got:.2} MB/s");
            out.insert("direct".into(), json!({ "bytes_read": read, "mb_s": got }));
        } else {
            let window = Limits::default().initial_window;
            println!(
                "  tunnel: read {read} bytes at {got:.2} MB/s; relayd buffered peak {} B, agentd buffered peak {} B (window {window} B); RSS peak relayd {:.1} MiB, agentd {:.1} MiB",
                peak.0,
                peak.1,
                peak.2 as f64 / 1024.0,
                peak.3 as f64 / 1024.0
            );
            out.insert(
                "tunnel".into(),
                json!({
                    "bytes_read": read, "mb_s": got, "window_bytes": window,
                    "relayd_buffered_peak_bytes": peak.0, "agentd_buffered_peak_bytes": peak.1,
                    "relayd_rss_peak_kib": peak.2, "agentd_rss_peak_kib": peak.3,
                }),
            );
        }
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------- fan-in

/// A minimal version-1 agent that connects, says hello and answers pings:
/// an idle tunnel, at the cost of one task and one socket here. Over TLS
/// when `tls` is given.
async fn idle_agent(
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: String,
) -> Result<tokio::task::JoinHandle<()>> {
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let mut request = format!("{scheme}://127.0.0.1:{port}/ws/tunnel").into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    request.headers_mut().insert("sec-websocket-protocol", SUBPROTOCOL.parse()?);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stream = match &tls {
        Some(client) => MaybeTlsStream::Rustls(tunnel_tests::tls::connect(client, addr).await?),
        None => MaybeTlsStream::Plain(tokio::net::TcpStream::connect(addr).await?),
    };
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await?;
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        agent: "bench-idle-agent".into(),
        capabilities: capability::ALL.iter().map(|c| (*c).to_owned()).collect(),
        limits: Limits::default(),
    });
    socket.send(Ws::text(hello.encode())).await?;
    match socket.next().await {
        Some(Ok(Ws::Text(_))) => {}
        other => bail!("no welcome: {other:?}"),
    }
    Ok(tokio::spawn(async move {
        while let Some(Ok(frame)) = socket.next().await {
            if let Ws::Text(t) = frame
                && let Ok(Message::Ping(p)) = Message::decode(&t, &Limits::default())
                && socket.send(Ws::text(Message::pong(&p).encode())).await.is_err()
            {
                return;
            }
        }
    }))
}

/// Idle tunnels on one relay, over TLS (the target) and then over plain
/// WebSockets (what TLS adds).
async fn fan_in(bin: &Path, args: &Args) -> Result<Value> {
    let tls = fan_in_pass(bin, args, true).await?;
    let plain = fan_in_pass(bin, args, false).await?;
    Ok(json!({ "tls": tls, "plain": plain }))
}

#[allow(clippy::print_stdout)]
async fn fan_in_pass(bin: &Path, args: &Args, tls: bool) -> Result<Value> {
    let total = if args.smoke { 200 } else { 10_000 };
    let step = if args.smoke { 100 } else { 1000 };
    let rig = Rig::start(
        bin,
        args,
        RigOpts { users: total, agents: 0, handshakes_per_second: 100_000, tls },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = proc_stats(rig.relay_pid()).rss_kib;
    let client = rig.cert.as_ref().map(TestCert::client);
    let mut agents = Vec::with_capacity(total);
    let mut points = vec![(0.0, base as f64 / 1024.0)];
    let mut rows = Vec::new();
    let kind = if tls { "TLS (wss)" } else { "plain ws" };
    println!("fan-in: idle agents on one relay, {kind}");
    println!("{:>8} {:>14} {:>18}", "agents", "relayd RSS", "per idle tunnel");
    println!("{:>8} {:>10.1} MiB {:>18}", 0, base as f64 / 1024.0, "");
    while agents.len() < total {
        let from = agents.len();
        let batch: Vec<_> = (from..from + step)
            .map(|i| idle_agent(rig.relay_port, client.clone(), token(i)))
            .collect();
        // At most 200 handshakes in flight from this client.
        let mut connected = futures_util::stream::iter(batch).buffer_unordered(200);
        while let Some(r) = connected.next().await {
            agents.push(r?);
        }
        rig.wait_agents(agents.len(), Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = proc_stats(rig.relay_pid()).rss_kib;
        let per = (rss.saturating_sub(base)) as f64 / agents.len() as f64;
        println!("{:>8} {:>10.1} MiB {:>14.1} KiB", agents.len(), rss as f64 / 1024.0, per);
        points.push((agents.len() as f64, rss as f64 / 1024.0));
        rows.push(
            json!({ "agents": agents.len(), "relayd_rss_kib": rss, "kib_per_idle_tunnel": per }),
        );
    }
    let stats = proc_stats(rig.relay_pid());
    println!("  relayd: {} fds, {} threads with {} agents", stats.fds, stats.threads, agents.len());
    write_plot(
        &args.out,
        if tls { "fan-in-memory.svg" } else { "fan-in-memory-plain.svg" },
        chart(
            &format!("relayd resident memory against idle tunnels ({kind})"),
            "idle agents",
            "relayd RSS (MiB)",
            &[Series { name: "relayd RSS".into(), color: COLORS[1], points }],
        ),
    )?;
    for a in agents {
        a.abort();
    }
    Ok(json!({ "tls": tls, "baseline_rss_kib": base, "rows": rows, "relayd_fds": stats.fds }))
}

// ---------------------------------------------------------------- 1,000 streams

#[allow(clippy::print_stdout)]
async fn streams(bin: &Path, args: &Args) -> Result<Value> {
    let (agents, per_agent, tokens, delay_ms) =
        if args.smoke { (5, 10, 10, 20) } else { (100, 10, 40, args.token_ms) };
    let rounds = if args.smoke { 1 } else { args.rounds.unwrap_or(3) };
    let rig = Rig::start(
        bin,
        args,
        RigOpts { users: agents, agents, handshakes_per_second: 1000, tls: false },
    )
    .await?;
    let http = client(agents * per_agent);
    let n = agents * per_agent;
    println!(
        "{n} concurrent streams across {agents} agents: {tokens} tokens at {delay_ms} ms each ({rounds} rounds)"
    );
    let mut delivery = [Vec::new(), Vec::new(), Vec::new()];
    let mut failures = [0usize; 3];
    for r in 0..rounds {
        for p in order(r) {
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let http = http.clone();
                let url = rig.url(p, i % agents, "/api/chat");
                tasks.push(tokio::spawn(async move {
                    chat_stream(&http, &url, tokens, delay_ms).await
                }));
            }
            for t in tasks {
                match t.await {
                    Ok(Ok(seen)) => delivery[p as usize].extend(seen.delivery_ms),
                    _ => failures[p as usize] += 1,
                }
            }
        }
    }
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "line delivery latency (ms)", "direct", "tunnel", "added", "raw TCP", "added"
    );
    for q in [50.0, 99.0] {
        let [d, t, w] = [0, 1, 2].map(|k| percentile(&delivery[k], q));
        println!(
            "{:<30} {d:>10.3} {t:>10.3} {:>10.3} {w:>10.3} {:>10.3}",
            format!("p{q}"),
            t - d,
            w - d
        );
    }
    println!(
        "  failed streams: direct {}, tunnel {}, raw TCP {}",
        failures[0], failures[1], failures[2]
    );
    write_plot(
        &args.out,
        "streams-latency.svg",
        chart(
            &format!("{n} concurrent streams, {agents} agents: line delivery latency"),
            "delivery latency (ms)",
            "% of lines",
            &[
                Series { name: "direct".into(), color: COLORS[0], points: cdf(&delivery[0]) },
                Series { name: "tunnel".into(), color: COLORS[1], points: cdf(&delivery[1]) },
                Series { name: "raw TCP".into(), color: COLORS[2], points: cdf(&delivery[2]) },
            ],
        ),
    )?;
    let pct = |k: usize, q: f64| percentile(&delivery[k], q);
    Ok(json!({
        "streams": n, "agents": agents, "tokens": tokens, "token_delay_ms": delay_ms, "rounds": rounds,
        "delivery_ms": {
            "direct": { "p50": pct(0, 50.0), "p99": pct(0, 99.0) },
            "tunnel": { "p50": pct(1, 50.0), "p99": pct(1, 99.0) },
            "raw_tcp": { "p50": pct(2, 50.0), "p99": pct(2, 99.0) },
            "added": { "p50": pct(1, 50.0) - pct(0, 50.0), "p99": pct(1, 99.0) - pct(0, 99.0) },
            "added_raw_tcp": { "p50": pct(2, 50.0) - pct(0, 50.0), "p99": pct(2, 99.0) - pct(0, 99.0) },
        },
        "failed_streams": { "direct": failures[0], "tunnel": failures[1], "raw_tcp": failures[2] },
    }))
}

// ---------------------------------------------------------------- reconnect storm

#[allow(clippy::print_stdout)]
async fn storm(bin: &Path, args: &Args) -> Result<Value> {
    let n = if args.smoke { 100 } else { 1000 };
    let rate = 200;
    let mut rig = Rig::start(
        bin,
        args,
        RigOpts { users: n, agents: 0, handshakes_per_second: rate, tls: false },
    )
    .await?;
    // In-process agents: the agentd library, with its default backoff
    // (1..30 s, full jitter). Sessions count as healthy after 1 s instead of
    // 30 s so the crowd starts from a reset backoff without a long wait.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut running = Vec::with_capacity(n);
    for i in 0..n {
        let config = agentd::ConfigFile {
            relay: Some(format!("ws://127.0.0.1:{}", rig.relay_port)),
            token: Some(token(i)),
            upstream: Some(format!("http://127.0.0.1:{}", rig.standin_port)),
            ..agentd::ConfigFile::default()
        }
        .resolve()?;
        let mut config = config;
        config.healthy_after = Duration::from_secs(1);
        let agent = agentd::Agent::new(config);
        let stop = shutdown.clone();
        running.push(tokio::spawn(async move { agent.run(stop).await }));
    }
    let first = rig.wait_agents(n, Duration::from_secs(180)).await?;
    println!(
        "reconnect storm: {n} agents connected in {first:?}; relayd admits {rate} handshakes/s"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A crash: no drain, no goaway; a new relay on the same port at once.
    rig.relay.start_kill()?;
    let _ = rig.relay.wait().await;
    let killed = Instant::now();
    rig.relay = Rig::spawn_relay(&rig.bin, &rig.dir)?;
    let mut curve = vec![(0.0, 0.0)];
    let back = loop {
        let have = scrape(rig.relay_metrics, "relayd_agents_connected").await.unwrap_or(0) as usize;
        let t = killed.elapsed();
        curve.push((t.as_secs_f64(), have as f64));
        if have >= n {
            break t;
        }
        if t > Duration::from_secs(120) {
            bail!("only {have} of {n} agents back after {t:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cap = Duration::from_secs(30);
    println!("  all {n} agents back {back:?} after the crash (target: backoff cap {cap:?} + 5 s)");
    write_plot(
        &args.out,
        "storm.svg",
        chart(
            &format!("{n} agents reconnecting after a relay crash ({rate} handshakes/s)"),
            "seconds since the crash",
            "agents connected",
            &[Series { name: "connected".into(), color: COLORS[2], points: curve.clone() }],
        ),
    )?;
    shutdown.cancel();
    for r in running {
        let _ = tokio::time::timeout(Duration::from_secs(15), r).await;
    }
    Ok(json!({
        "agents": n, "handshakes_per_second": rate, "backoff_cap_s": cap.as_secs(),
        "initial_connect_s": first.as_secs_f64(), "back_after_s": back.as_secs_f64(),
        "curve": curve,
    }))
}
