//! Scenario `small`: small requests per second and latency, by concurrency.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use http::{Method, Request};
use serde_json::{Value, json};

use crate::*;
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
