//! Scenario `bulk`: large downloads and uploads.

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};

use crate::*;
use tools::procs::{proc_stats, reset_peak_rss};

pub(crate) static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

pub(crate) async fn download(http: &Http, url: &str, size: u64) -> Result<Duration> {
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

pub(crate) async fn upload(http: &Http, url: &str, size: u64) -> Result<Duration> {
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
pub(crate) async fn bulk(bin: &Path, args: &Args) -> Result<Value> {
    let rig = Rig::start(bin, args, ONE_AGENT).await?;
    let http = client(4);
    let sizes: Vec<u64> = if args.smoke { vec![4 << 20] } else { vec![50 << 20, 1 << 30] };
    let rounds = if args.smoke { 1 } else { args.rounds.unwrap_or(3) };
    println!("bulk transfers ({rounds} rounds, medians; MB = 10^6 bytes)");
    let paths = routes();
    let mut head = format!("{:<22} {:>11}", "transfer", "direct MB/s");
    for p in &paths[1..] {
        head.push_str(&format!(" {:>12} {:>6}", format!("{} MB/s", short(*p)), "ratio"));
    }
    println!("{head} {:>14} {:>14}", "relayd peak", "agentd peak");
    let mut rows = Vec::new();
    for &size in &sizes {
        for dir in ["download", "upload"] {
            let mut mbps: [Vec<f64>; PATHS] = per_path();
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
            let d = median(&mbps[0]);
            let label = format!("{dir} {} MiB", size >> 20);
            let mut line = format!("{label:<22} {d:>11.0}");
            let mut row = json!({
                "transfer": dir, "bytes": size, "direct_mb_s": d,
                "relayd_peak_rss_kib": peak.0, "agentd_peak_rss_kib": peak.1,
            });
            for &p in &paths[1..] {
                let x = median(&mbps[p as usize]);
                line.push_str(&format!(" {x:>12.0} {:>5.2}x", x / d));
                row[format!("{}_mb_s", p.key())] = json!(x);
                row[format!("{}_ratio", p.key())] = json!(x / d);
            }
            row["rounds_mb_s"] =
                paths.iter().map(|p| (p.key().to_owned(), json!(mbps[*p as usize]))).collect();
            println!(
                "{line} {:>10.1} MiB {:>10.1} MiB",
                peak.0 as f64 / 1024.0,
                peak.1 as f64 / 1024.0
            );
            rows.push(row);
        }
    }
    Ok(json!({ "rows": rows, "rounds": rounds }))
}

// ---------------------------------------------------------------- slow reader
