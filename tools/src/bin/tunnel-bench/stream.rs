//! Scenario `stream`: time to first token and the delivery of each token
//! line of a paced and a burst stream.

use std::path::Path;
use std::time::{Instant, SystemTime};

use anyhow::{Result, bail};
use http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::*;
use tools::svg::chart;

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
    let paths = routes();
    let mut ttft: [Vec<f64>; PATHS] = per_path();
    let mut gap: [Vec<f64>; PATHS] = per_path();
    let mut delivery: [Vec<f64>; PATHS] = per_path();
    let mut coalesced = [0usize; PATHS];
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
    let mut burst: [Vec<f64>; PATHS] = per_path();
    let mut burst_coalesced = [0usize; PATHS];
    for r in 0..burst_rounds {
        for p in order(r) {
            let k = p as usize;
            let s = chat_stream(&http, &rig.url(p, 0, "/api/chat"), tokens, 0).await?;
            burst[k].push(*s.arrivals_ms.last().unwrap_or(&f64::NAN));
            burst_coalesced[k] += s.coalesced;
        }
    }
    // CPU per token of long answers sent without pauses: what a relay
    // carrying many fast streams pays per token (ticks of 10 ms, so many
    // tokens per round).
    let (long, per_round, cpu_rounds) = if args.smoke { (200, 1, 1) } else { (2000, 10, 3) };
    let mut cpu_ns: [Vec<f64>; PATHS] = per_path();
    for r in 0..cpu_rounds {
        for p in order(r) {
            let before = rig.path_cpu(p);
            for _ in 0..per_round {
                chat_stream(&http, &rig.url(p, 0, "/api/chat"), long, 0).await?;
            }
            let used = rig.path_cpu(p).saturating_sub(before);
            cpu_ns[p as usize].push(used.as_nanos() as f64 / (long * per_round) as f64);
        }
    }
    println!(
        "streaming: {tokens} tokens at 5 ms ({paced_rounds} rounds), burst at 0 ms ({burst_rounds} rounds)"
    );
    let mut head = format!("{:<34} {:>10}", "", "direct");
    for p in &paths[1..] {
        head.push_str(&format!(" {:>10} {:>8}", p.name(), "added"));
    }
    println!("{head}");
    let line = |name: &str, v: [f64; PATHS]| {
        let mut l = format!("{name:<34} {:>10.3}", v[0]);
        for p in &paths[1..] {
            let x = v[*p as usize];
            l.push_str(&format!(" {x:>10.3} {:>8.3}", x - v[0]));
        }
        println!("{l}");
    };
    let each = |f: &dyn Fn(usize) -> f64| -> [f64; PATHS] { std::array::from_fn(f) };
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
    let cpu_m = each(&|k| median(&cpu_ns[k]));
    line(&format!("CPU per token, {long} in a burst (ns)"), cpu_m);
    let mut l = format!("{:<34}", "coalesced lines (paced / burst)");
    for p in &paths {
        let k = *p as usize;
        l.push_str(&format!(
            " {:>10}{}",
            format!("{}/{}", coalesced[k], burst_coalesced[k]),
            if k == 0 { "" } else { "         " }
        ));
    }
    println!("{l}");
    write_plot(
        &args.out,
        "stream-latency.svg",
        chart(
            "200 tokens at 5 ms: time from the model server writing a line to the client reading it",
            "delivery latency (ms)",
            "% of lines",
            &cdf_per_path(&paths, &delivery),
        ),
    )?;
    // Per path, and what each adds to the direct path ("added_<path>").
    let by_path = |v: [f64; PATHS]| -> Value {
        let mut o = serde_json::Map::new();
        for p in &paths {
            o.insert(p.key().into(), json!(v[*p as usize]));
            if *p != Route::Direct {
                o.insert(format!("added_{}", p.key()), json!(v[*p as usize] - v[0]));
            }
        }
        o.into()
    };
    let of_path = |f: &dyn Fn(usize) -> Value| -> Value {
        paths.iter().map(|p| (p.key().to_owned(), f(*p as usize))).collect()
    };
    Ok(json!({
        "tokens": tokens, "token_delay_ms": 5, "paced_rounds": paced_rounds, "burst_rounds": burst_rounds,
        "ttft_ms": by_path(ttft_m),
        "delivery_ms": of_path(&|k| json!({ "p50": d50[k], "p99": d99[k] })),
        "gap_ms": of_path(&|k| json!({ "p50": g50[k], "p99": g99[k], "max": gmax[k] })),
        "coalesced_lines": of_path(&|k| json!(coalesced[k])),
        "burst_ms": by_path(burst_m),
        "burst_cpu_tokens": long, "burst_cpu_streams_per_round": per_round,
        "burst_cpu_ns_per_token": by_path(cpu_m),
        "burst_coalesced_lines": of_path(&|k| json!(burst_coalesced[k])),
    }))
}

// ---------------------------------------------------------------- bulk
