//! Soak harness (a benchmark program, not a test): runs relayd, N agentd
//! processes and the stand-in Ollama as real processes, drives M concurrent
//! client streams per agent with churn (cancelled requests, slow readers,
//! agents killed and restarted), and samples both daemons' RSS, open file
//! descriptors, threads, CLOSE_WAIT sockets and tokio tasks (from each
//! daemon's `/metrics`), plus the streams in flight, over time. Writes `soak.csv` and `soak.svg` into `--out`.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/tunnel-soak --agents 100 --streams 4 --duration 30m --out docs/soak
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::process::Child;
use tokio::sync::Mutex;
use tools::procs::{ProcStats, bin_dir, free_port, path, proc_stats, scrape, spawn};

#[derive(Parser, Debug)]
#[command(about = "Soak the tunnel with real processes and sample resource use")]
struct Args {
    /// Agent processes (one user each).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Concurrent client streams per agent.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// How long to run, e.g. "30m".
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time between samples.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sample: Duration,
    /// Kill and restart one random agent this often (reconnect churn).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    churn: Duration,
    /// Stand-in pause between tokens, in milliseconds.
    #[arg(long, default_value_t = 25)]
    token_delay_ms: u64,
    /// Where to write soak.csv and soak.svg.
    #[arg(long, default_value = "soak-out")]
    out: PathBuf,
}

type Http = Client<HttpConnector, Full<Bytes>>;

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    cancelled: AtomicU64,
    errors: AtomicU64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
#[allow(clippy::print_stdout)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = bin_dir(&["relayd", "agentd", "stand-in-ollama"])?;
    std::fs::create_dir_all(&args.out)?;
    let dir = std::env::temp_dir().join(format!("tunnel-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let standin_port = free_port()?;
    let mut standin = spawn(
        &bin,
        "stand-in-ollama",
        &[
            "--listen".into(),
            format!("127.0.0.1:{standin_port}"),
            "--token-delay-ms".into(),
            args.token_delay_ms.to_string(),
        ],
        &dir,
        "stand-in",
    )?;
    let relay_port = free_port()?;
    let relay_metrics = free_port()?;
    let mut conf = format!(
        "listen = \"127.0.0.1:{relay_port}\"\nworker_threads = 1\nmetrics_listen = \"127.0.0.1:{relay_metrics}\"\n"
    );
    for i in 0..args.agents {
        let token = dir.join(format!("u{i}.token"));
        daemon::config::write_secret(&token, &format!("soak-agent-token-{i:06}-0123456789"))?;
        write!(
            conf,
            "\n[[users]]\nid = \"u{i}\"\nagent_token_file = \"{}\"\npublic = true\n",
            token.display()
        )?;
    }
    conf.push_str("\n[limits]\nhandshakes_per_second = 1000\n\n[control]\nsocket = \"off\"\n");
    std::fs::write(dir.join("relayd.toml"), conf)?;
    let mut relay = spawn(
        &bin,
        "relayd",
        &["--config".into(), path(&dir.join("relayd.toml"))],
        &dir,
        "relayd",
    )?;
    let mut agent_metrics = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let port = free_port()?;
        agent_metrics.push(port);
        std::fs::write(
            dir.join(format!("agentd-{i}.toml")),
            format!(
                "relay = \"ws://127.0.0.1:{relay_port}\"\ntoken_file = \"{}\"\nupstream = \"http://127.0.0.1:{standin_port}\"\nmetrics_listen = \"127.0.0.1:{port}\"\n\n[reconnect]\nmax_delay = \"5s\"\n\n[control]\nsocket = \"off\"\n",
                dir.join(format!("u{i}.token")).display()
            ),
        )?;
    }
    let agents: Arc<Mutex<Vec<Child>>> = Arc::new(Mutex::new(Vec::new()));
    for i in 0..args.agents {
        let child = spawn_agent(&bin, &dir, i)?;
        agents.lock().await.push(child);
    }
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.agents * args.streams)
        .build(HttpConnector::new());
    let base = format!("http://127.0.0.1:{relay_port}");
    wait_connected(relay_metrics, args.agents).await?;
    println!("{} agents connected; soaking for {:?}", args.agents, args.duration);

    let counters = Arc::new(Counters::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for a in 0..args.agents {
        for s in 0..args.streams {
            load.push(tokio::spawn(client_loop(
                http.clone(),
                format!("{base}/api/tunnel/u{a}"),
                (a * 7 + s) as u64,
                counters.clone(),
                stop.clone(),
            )));
        }
    }
    let churn = tokio::spawn(churn_loop(
        bin.clone(),
        dir.clone(),
        agents.clone(),
        args.churn,
        stop.clone(),
    ));

    let started = Instant::now();
    let mut rows = Vec::new();
    let header = "t_s,relay_rss_kib,relay_fds,relay_threads,relay_close_wait,agents_rss_kib,agents_fds,agents_close_wait,in_flight,done,cancelled,errors,relay_tasks,agents_tasks";
    println!("{header}");
    while started.elapsed() < args.duration {
        tokio::time::sleep(args.sample).await;
        let agent_pids: Vec<u32> = agents.lock().await.iter().filter_map(Child::id).collect();
        let relay_pid = relay.id().context("relayd exited")?;
        let r = proc_stats(relay_pid);
        let mut a = ProcStats::default();
        for pid in &agent_pids {
            let s = proc_stats(*pid);
            a.rss_kib += s.rss_kib;
            a.fds += s.fds;
            a.close_wait += s.close_wait;
        }
        let in_flight = scrape(relay_metrics, "relayd_streams_in_flight").await.unwrap_or(0);
        let relay_tasks = scrape(relay_metrics, "relayd_tasks").await.unwrap_or(0);
        let mut agents_tasks = 0;
        for port in &agent_metrics {
            agents_tasks += scrape(*port, "agentd_tasks").await.unwrap_or(0);
        }
        let row = format!(
            "{:.0},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            started.elapsed().as_secs_f64(),
            r.rss_kib,
            r.fds,
            r.threads,
            r.close_wait,
            a.rss_kib,
            a.fds,
            a.close_wait,
            in_flight,
            counters.done.load(Ordering::Relaxed),
            counters.cancelled.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed),
            relay_tasks,
            agents_tasks,
        );
        println!("{row}");
        rows.push(row);
    }
    stop.cancel();
    for l in load {
        let _ = l.await;
    }
    let _ = churn.await;
    let mut csv = String::from(header);
    csv.push('\n');
    for r in &rows {
        csv.push_str(r);
        csv.push('\n');
    }
    std::fs::write(args.out.join("soak.csv"), &csv)?;
    std::fs::write(args.out.join("soak.svg"), plot(&rows))?;
    println!(
        "wrote {} and {}",
        args.out.join("soak.csv").display(),
        args.out.join("soak.svg").display()
    );
    for mut c in agents.lock().await.drain(..) {
        let _ = c.kill().await;
    }
    let _ = relay.kill().await;
    let _ = standin.kill().await;
    Ok(())
}

/// One client: chats in a loop; 1 in 10 requests is abandoned after its
/// first line, 1 in 10 is read slowly.
async fn client_loop(
    http: Http,
    base: String,
    seed: u64,
    counters: Arc<Counters>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut n = seed;
    while !stop.is_cancelled() {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let kind = (n >> 33) % 10;
        let tokens = 5 + (n >> 40) % 40;
        let body = json!({ "model": "m", "messages": [], "options": { "num_predict": tokens } })
            .to_string();
        let Ok(req) =
            http::Request::post(format!("{base}/api/chat")).body(Full::new(Bytes::from(body)))
        else {
            return;
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(60), exchange(&http, req, kind)) => r,
        };
        match result {
            Ok(Ok(true)) => counters.done.fetch_add(1, Ordering::Relaxed),
            Ok(Ok(false)) => counters.cancelled.fetch_add(1, Ordering::Relaxed),
            _ => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                0
            }
        };
    }
}

/// Returns Ok(true) for a complete answer, Ok(false) for an abandoned one.
async fn exchange(http: &Http, req: http::Request<Full<Bytes>>, kind: u64) -> Result<bool> {
    let resp = http.request(req).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        seen.extend_from_slice(&data);
        if kind == 0 && seen.contains(&b'\n') {
            return Ok(false); // dropping the body cancels the stream
        }
        if kind == 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let text = String::from_utf8_lossy(&seen);
    let last = text.lines().last().unwrap_or_default();
    if last.contains("\"error\"") || !last.contains("\"done\":true") {
        bail!("incomplete answer: {last}");
    }
    Ok(true)
}

async fn churn_loop(
    bin: PathBuf,
    dir: PathBuf,
    agents: Arc<Mutex<Vec<Child>>>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut i = 0usize;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let mut list = agents.lock().await;
        if list.is_empty() {
            continue;
        }
        i = (i * 31 + 17) % list.len();
        let _ = list[i].kill().await;
        if let Ok(child) = spawn_agent(&bin, &dir, i) {
            list[i] = child;
        }
    }
}

/// Waits until the relay counts `agents` connected agents.
async fn wait_connected(relay_metrics: u16, agents: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if scrape(relay_metrics, "relayd_agents_connected").await.unwrap_or(0) as usize >= agents {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("agents did not all connect within 60 s")
}

fn spawn_agent(bin: &Path, dir: &Path, i: usize) -> Result<Child> {
    spawn(
        bin,
        "agentd",
        &["--config".into(), path(&dir.join(format!("agentd-{i}.toml")))],
        dir,
        &format!("agentd-{i}"),
    )
}

/// Four panels over time: RSS (relay, all agents), open fds (relay, all
/// agents), streams in flight, tokio tasks. Plain SVG, no plotting
/// dependency.
fn plot(rows: &[String]) -> String {
    let data: Vec<Vec<f64>> =
        rows.iter().map(|r| r.split(',').filter_map(|v| v.parse().ok()).collect()).collect();
    let col = |i: usize| -> Vec<(f64, f64)> {
        data.iter().filter(|r| r.len() > i).map(|r| (r[0], r[i])).collect()
    };
    let panels: [(&str, Vec<Series>); 4] = [
        (
            "RSS (MiB)",
            vec![
                ("relayd", "#c0392b", scale(col(1), 1024.0)),
                ("all agentd", "#2980b9", scale(col(5), 1024.0)),
            ],
        ),
        ("open fds", vec![("relayd", "#c0392b", col(2)), ("all agentd", "#2980b9", col(6))]),
        (
            "streams in flight / CLOSE_WAIT",
            vec![
                ("in flight", "#27ae60", col(8)),
                ("CLOSE_WAIT (both)", "#8e44ad", sum(col(4), col(7))),
            ],
        ),
        ("tokio tasks", vec![("relayd", "#c0392b", col(12)), ("all agentd", "#2980b9", col(13))]),
    ];
    let (w, h, pad) = (900.0, 220.0, 50.0);
    let t_max = data.iter().map(|r| r[0]).fold(1.0, f64::max);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="12">"#,
        h * panels.len() as f64
    );
    svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (p, (title, series)) in panels.iter().enumerate() {
        let y0 = p as f64 * h;
        let v_max =
            series.iter().flat_map(|(_, _, s)| s.iter().map(|(_, v)| *v)).fold(1.0, f64::max)
                * 1.15;
        let _ = write!(
            svg,
            r#"<text x="{pad}" y="{}" font-weight="bold">{title} (max axis {v_max:.1})</text>"#,
            y0 + 18.0
        );
        let _ = write!(
            svg,
            r#"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
            y0 + h - 30.0,
            w - 20.0,
            y0 + h - 30.0
        );
        let _ = write!(
            svg,
            r#"<line x1="{pad}" y1="{}" x2="{pad}" y2="{}" stroke="black"/>"#,
            y0 + 28.0,
            y0 + h - 30.0
        );
        let _ =
            write!(svg, r#"<text x="{}" y="{}">{:.0} s</text>"#, w - 60.0, y0 + h - 12.0, t_max);
        for (k, (name, color, s)) in series.iter().enumerate() {
            let pts: Vec<String> = s
                .iter()
                .map(|(t, v)| {
                    let x = pad + (t / t_max) * (w - pad - 20.0);
                    let y = y0 + h - 30.0 - (v / v_max) * (h - 60.0);
                    format!("{x:.1},{y:.1}")
                })
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
                w - 200.0,
                y0 + 40.0 + 15.0 * k as f64
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// A named, coloured line of (time, value) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

fn scale(s: Vec<(f64, f64)>, by: f64) -> Vec<(f64, f64)> {
    s.into_iter().map(|(t, v)| (t, v / by)).collect()
}

fn sum(a: Vec<(f64, f64)>, b: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    a.into_iter().zip(b).map(|((t, x), (_, y))| (t, x + y)).collect()
}
