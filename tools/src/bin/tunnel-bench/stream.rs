//! Scenario `stream`: time to first token and the delivery of each token
//! line of a paced and a burst stream.

use std::path::Path;
use std::time::{Instant, SystemTime};

use anyhow::{Result, bail};
use http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::*;
use tools::svg::{COLORS, Series, cdf, chart};

/// What a client saw of one streamed answer.
#[derive(Default)]
pub(crate) struct Seen {
    /// When each line completed, from sending the request.
    pub(crate) arrivals_ms: Vec<f64>,
    /// Each line's arrival minus its `created_at` at the model server.
    pub(crate) delivery_ms: Vec<f64>,
    /// Lines that arrived in the same read as an earlier line.
    pub(crate) coalesced: usize,
}

pub(crate) async fn chat_stream(
    http: &Http,
    url: &str,
    tokens: usize,
    delay_ms: u64,
) -> Result<Seen> {
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

pub(crate) fn created_at(line: &[u8]) -> Option<SystemTime> {
    const KEY: &[u8] = b"\"created_at\":\"";
    let start = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let end = start + line[start..].iter().position(|b| *b == b'"')?;
    humantime::parse_rfc3339(std::str::from_utf8(&line[start..end]).ok()?).ok()
}

pub(crate) fn gaps(arrivals: &[f64]) -> Vec<f64> {
    arrivals.windows(2).map(|w| w[1] - w[0]).collect()
}

#[allow(clippy::print_stdout)]
pub(crate) async fn stream(bin: &Path, args: &Args) -> Result<Value> {
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
