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

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use tools::procs::{bin_dir, machine};

mod bulk;
mod cluster;
mod cluster_drill;
mod cost;
mod devices;
mod devices_load;
mod devices_phases;
mod fan_in;
mod rig;
mod slow_reader;
mod small;
mod stats;
mod storm;
mod stream;
mod streams;
mod trace;

pub(crate) use bulk::*;
pub(crate) use cluster::*;
pub(crate) use cluster_drill::*;
pub(crate) use cost::*;
pub(crate) use devices::*;
pub(crate) use devices_load::*;
pub(crate) use devices_phases::*;
pub(crate) use fan_in::*;
pub(crate) use rig::*;
pub(crate) use slow_reader::*;
pub(crate) use small::*;
pub(crate) use stats::*;
pub(crate) use storm::*;
pub(crate) use stream::*;
pub(crate) use streams::*;
pub(crate) use trace::*;

#[derive(Parser, Debug)]
#[command(about = "Measure the tunnel against the direct path, scenario by scenario")]
pub(crate) struct Args {
    #[command(subcommand)]
    pub(crate) scenario: Scenario,
    /// Short runs that prove each scenario works (CI), not measurements.
    #[arg(long, global = true)]
    pub(crate) smoke: bool,
    /// Where JSON results and SVG plots go.
    #[arg(long, global = true, default_value = "bench-out")]
    pub(crate) out: PathBuf,
    /// relayd tokio worker threads.
    #[arg(long, global = true, default_value_t = 1)]
    pub(crate) relay_workers: usize,
    /// Rounds per measurement (each round runs direct and tunnel once).
    #[arg(long, global = true)]
    pub(crate) rounds: Option<usize>,
    /// Flow-control window per stream, both daemons (default: theirs).
    #[arg(long, global = true)]
    pub(crate) stream_window: Option<u32>,
    /// Largest body chunk per frame, both daemons (default: theirs).
    #[arg(long, global = true)]
    pub(crate) max_chunk: Option<u32>,
    /// Pause between tokens in the `streams` scenario, in milliseconds.
    #[arg(long, global = true, default_value_t = 100)]
    pub(crate) token_ms: u64,
    /// The rathole binary to measure beside the tunnel (default: `rathole`
    /// on PATH; without one the rathole path is left out).
    #[arg(long, global = true)]
    pub(crate) rathole: Option<PathBuf>,
}

/// `[limits]` lines both daemons get (from --stream-window, --max-chunk).
pub(crate) static LIMITS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
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
    /// Small requests with and without a trace subscriber that never reads.
    Trace,
    /// One user with three devices holding different models: routing by
    /// model, stickiness, a device killed and one frozen, a pulled model,
    /// and routing's CPU against one device.
    Devices,
    /// Three relayd replicas over PostgreSQL behind HAProxy round-robin:
    /// requests to random users over 1,000 agents, how many were
    /// forwarded, and cross-replica against same-replica latency (needs
    /// Debian's postgresql and haproxy).
    Cluster,
    /// Instructions relayd and agentd spend per request and per streamed
    /// token, under valgrind (what `.ci/cost` holds to its baseline; not
    /// part of `all`).
    Cost,
    /// Every scenario above but `cost`, in order.
    All,
}

pub(crate) const ALL: [Scenario; 10] = [
    Scenario::Small,
    Scenario::Stream,
    Scenario::Bulk,
    Scenario::SlowReader,
    Scenario::FanIn,
    Scenario::Streams,
    Scenario::Storm,
    Scenario::Trace,
    Scenario::Devices,
    Scenario::Cluster,
];

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Small => "small",
            Scenario::Stream => "stream",
            Scenario::Bulk => "bulk",
            Scenario::SlowReader => "slow-reader",
            Scenario::FanIn => "fan-in",
            Scenario::Streams => "streams",
            Scenario::Storm => "storm",
            Scenario::Trace => "trace",
            Scenario::Devices => "devices",
            Scenario::Cluster => "cluster",
            Scenario::Cost => "cost",
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
    let rathole = args.rathole.clone().or_else(|| on_path("rathole"));
    RATHOLE.get_or_init(|| rathole.clone());
    let list: Vec<Scenario> =
        if args.scenario == Scenario::All { ALL.to_vec() } else { vec![args.scenario] };
    let (load, cores) = machine();
    println!(
        "machine: {cores} cores, load {load:.2}, {}; open-file limit {fds}; relayd workers {}; rathole {}{}",
        cpu_model(),
        args.relay_workers,
        rathole.as_deref().map_or("not found (left out)".into(), |p| p.display().to_string()),
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
            Scenario::Trace => trace(&bin, &args).await,
            Scenario::Devices => devices(&bin, &args).await,
            Scenario::Cluster => cluster(&bin, &args).await,
            Scenario::Cost => cost(&bin, &args).await,
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
            "rathole": rathole.as_deref().map(|p| p.display().to_string()),
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

/// `name` in a directory of `PATH`, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

pub(crate) fn cpu_model() -> String {
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
