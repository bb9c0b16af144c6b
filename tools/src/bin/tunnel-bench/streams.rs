//! Scenario `streams`: many concurrent token streams through one tunnel.

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use crate::*;
use tools::svg::chart;

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
    let paths = routes();
    let mut delivery: [Vec<f64>; PATHS] = per_path();
    let mut failures = [0usize; PATHS];
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
    let mut head = format!("{:<30} {:>10}", "line delivery latency (ms)", "direct");
    for p in &paths[1..] {
        head.push_str(&format!(" {:>10} {:>8}", p.name(), "added"));
    }
    println!("{head}");
    for q in [50.0, 99.0] {
        let d = percentile(&delivery[0], q);
        let mut l = format!("{:<30} {d:>10.3}", format!("p{q}"));
        for p in &paths[1..] {
            let x = percentile(&delivery[*p as usize], q);
            l.push_str(&format!(" {x:>10.3} {:>8.3}", x - d));
        }
        println!("{l}");
    }
    println!(
        "  failed streams: {}",
        paths
            .iter()
            .map(|p| format!("{} {}", p.name(), failures[*p as usize]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    write_plot(
        &args.out,
        "streams-latency.svg",
        chart(
            &format!("{n} concurrent streams, {agents} agents: line delivery latency"),
            "delivery latency (ms)",
            "% of lines",
            &cdf_per_path(&paths, &delivery),
        ),
    )?;
    let pct = |k: usize, q: f64| percentile(&delivery[k], q);
    let mut by_path = serde_json::Map::new();
    for p in &paths {
        let k = *p as usize;
        by_path.insert(p.key().into(), json!({ "p50": pct(k, 50.0), "p99": pct(k, 99.0) }));
        if k != 0 {
            by_path.insert(
                format!("added_{}", p.key()),
                json!({ "p50": pct(k, 50.0) - pct(0, 50.0), "p99": pct(k, 99.0) - pct(0, 99.0) }),
            );
        }
    }
    let failed: serde_json::Map<String, Value> =
        paths.iter().map(|p| (p.key().to_owned(), json!(failures[*p as usize]))).collect();
    Ok(json!({
        "streams": n, "agents": agents, "tokens": tokens, "token_delay_ms": delay_ms, "rounds": rounds,
        "delivery_ms": by_path,
        "failed_streams": failed,
    }))
}

// ---------------------------------------------------------------- reconnect storm
