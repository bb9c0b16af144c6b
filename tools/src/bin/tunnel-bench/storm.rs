//! Scenario `storm`: a reconnect storm of many agents.

use daemon::Resolve as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::*;
use tools::procs::scrape;
use tools::svg::{COLORS, Series, chart};

#[allow(clippy::print_stdout)]
pub(crate) async fn storm(bin: &Path, args: &Args) -> Result<Value> {
    let n = if args.smoke { 100 } else { 1000 };
    let rate = 200;
    let mut rig = Rig::start(
        bin,
        args,
        RigOpts { users: n, agents: 0, handshakes_per_second: rate, tls: false, callgrind: false },
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
