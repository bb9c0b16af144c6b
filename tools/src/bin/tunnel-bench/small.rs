//! Scenario `small`: small requests per second and latency, by concurrency.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use http::{Method, Request};
use serde_json::{Value, json};

use crate::*;
use tools::procs::proc_stats;
use tools::svg::{COLORS, Series, cdf, chart};

#[allow(clippy::print_stdout)]
pub(crate) async fn small(bin: &Path, args: &Args) -> Result<Value> {
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
    let paths = routes();
    println!(
        "small requests ({rounds} rounds x {dur:?} per path, medians; raw = two plain TCP forwarders)"
    );
    let mut head = format!("{:<16} {:>4} {:>9}", "request", "c", "direct/s");
    for p in &paths[1..] {
        head.push_str(&format!(" {:>10} {:>6}", format!("{}/s", short(*p)), "ratio"));
    }
    head.push_str(&format!(" {:>13}", "direct p50/99"));
    for p in &paths[1..] {
        head.push_str(&format!(" {:>13}", format!("{} p50/99", short(*p))));
    }
    for p in &paths[1..] {
        head.push_str(&format!(" {:>8}", format!("{} us", short(*p))));
    }
    println!("{head}");
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
        let mut rps: [Vec<f64>; PATHS] = per_path();
        let mut p50: [Vec<f64>; PATHS] = per_path();
        let mut p99: [Vec<f64>; PATHS] = per_path();
        let mut lat: [Vec<f64>; PATHS] = per_path();
        let mut cpu_per_req: [Vec<f64>; PATHS] = per_path();
        let mut errors = [0u64; PATHS];
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
        let m = |v: &[Vec<f64>; PATHS], p: Route| median(&v[p as usize]);
        let d = m(&rps, Route::Direct);
        let mut row = json!({ "request": label, "concurrency": c, "direct_rps": d });
        let mut line = format!("{label:<16} {c:>4} {d:>9.0}");
        for &p in &paths {
            let key = p.key();
            row[format!("{key}_p50_ms")] = json!(m(&p50, p));
            row[format!("{key}_p99_ms")] = json!(m(&p99, p));
            if p == Route::Direct {
                continue;
            }
            let r = m(&rps, p);
            row[format!("{key}_rps")] = json!(r);
            row[format!("{key}_ratio")] = json!(r / d);
            row[format!("{key}_cpu_us_per_request")] = json!(m(&cpu_per_req, p));
            line.push_str(&format!(" {r:>10.0} {:>5.2}x", r / d));
        }
        for &p in &paths {
            line.push_str(&format!(" {:>6.2}/{:<6.2}", m(&p50, p), m(&p99, p)));
        }
        for &p in &paths[1..] {
            line.push_str(&format!(" {:>8.1}", m(&cpu_per_req, p)));
        }
        row["rounds_rps"] =
            paths.iter().map(|p| (p.key().to_owned(), json!(rps[*p as usize]))).collect();
        row["errors"] =
            paths.iter().map(|p| (p.key().to_owned(), json!(errors[*p as usize]))).collect();
        if errors.iter().any(|e| *e > 0) {
            line.push_str(&format!("  (errors: {errors:?})"));
        }
        println!("{line}");
        if label.starts_with("GET") && c == 64 {
            for &p in &paths {
                plot.push(Series {
                    name: format!("{} (c=64)", p.name()),
                    color: COLORS[p as usize],
                    points: cdf(&lat[p as usize]),
                });
            }
        }
        rows.push(row);
    }
    // What the carriers hold once the load is over.
    let rss =
        |pids: &[u32]| pids.iter().map(|p| proc_stats(*p).rss_kib).sum::<u64>() as f64 / 1024.0;
    let daemons = rss(&[rig.relay_pid(), rig.agent_pid(0)]);
    let forwarders = rss(&rig.forwarders.iter().filter_map(|c| c.id()).collect::<Vec<_>>());
    let ratholes = rss(&rig.ratholes.iter().filter_map(|c| c.id()).collect::<Vec<_>>());
    println!(
        "RSS after the load: relayd + agentd {daemons:.1} MiB, raw forwarders {forwarders:.1} MiB{}",
        if rig.ratholes.is_empty() {
            String::new()
        } else {
            format!(", rathole server + client {ratholes:.1} MiB")
        }
    );
    write_plot(
        &args.out,
        "small-latency.svg",
        chart("GET /api/tags, concurrency 64: latency CDF", "latency (ms)", "% of requests", &plot),
    )?;
    Ok(json!({
        "rows": rows, "round_seconds": dur.as_secs_f64(), "rounds": rounds,
        "rss_after_mib": { "tunnel": daemons, "raw_tcp": forwarders, "rathole": (!rig.ratholes.is_empty()).then_some(ratholes) },
    }))
}

/// A path's name in a narrow column.
pub(crate) fn short(p: Route) -> &'static str {
    match p {
        Route::Raw => "raw",
        p => p.name(),
    }
}

// ---------------------------------------------------------------- streaming
