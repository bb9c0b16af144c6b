//! Scenario `streams`: many concurrent token streams through one tunnel.

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use crate::*;
use tools::svg::{COLORS, Series, cdf, chart};

#[allow(clippy::print_stdout)]
pub(crate) async fn streams(bin: &Path, args: &Args) -> Result<Value> {
    let (agents, per_agent, tokens, delay_ms) =
        if args.smoke { (5, 10, 10, 20) } else { (100, 10, 40, args.token_ms) };
    let rounds = if args.smoke { 1 } else { args.rounds.unwrap_or(3) };
    let rig = Rig::start(
        bin,
        args,
        RigOpts {
            users: agents,
            agents,
            handshakes_per_second: 1000,
            tls: false,
            callgrind: false,
        },
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
