//! Scenario `slow-reader`: a client reading a large response at 1 MB/s,
//! and what the daemons buffer meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::*;
use tools::procs::{proc_stats, scrape};
use tunnel_proto::Limits;

#[allow(clippy::print_stdout)]
pub(crate) async fn slow_reader(bin: &Path, args: &Args) -> Result<Value> {
    let rig = Rig::start(bin, args, ONE_AGENT).await?;
    let http = client(4);
    let read_for = if args.smoke { Duration::from_millis(1500) } else { Duration::from_secs(10) };
    let rate = 1_000_000.0; // bytes per second
    let size: u64 = 256 << 20;
    let mut out = serde_json::Map::new();
    println!("slow reader: {size} byte response read at 1 MB/s for {read_for:?}");
    for p in [Route::Direct, Route::Tunnel] {
        let resp = http
            .request(
                Request::get(rig.url(p, 0, &format!("/zeros?n={size}")))
                    .body(full(Bytes::new()))?,
            )
            .await?;
        let mut body = resp.into_body();
        let t0 = Instant::now();
        let mut read = 0u64;
        let mut peak = (0u64, 0u64, 0u64, 0u64);
        let mut next_sample = Instant::now();
        while t0.elapsed() < read_for {
            let Some(frame) = body.frame().await else { break };
            if let Some(d) = frame?.data_ref() {
                read += d.len() as u64;
            }
            // Hold back until the read rate is back at 1 MB/s, sampling the
            // daemons meanwhile.
            let due = t0 + Duration::from_secs_f64(read as f64 / rate);
            loop {
                let now = Instant::now();
                if p == Route::Tunnel && now >= next_sample {
                    next_sample = now + Duration::from_millis(50);
                    peak.0 = peak
                        .0
                        .max(scrape(rig.relay_metrics, "relayd_buffered_bytes").await.unwrap_or(0));
                    peak.1 = peak.1.max(
                        scrape(rig.agent_metrics[0], "agentd_buffered_bytes").await.unwrap_or(0),
                    );
                    peak.2 = peak.2.max(proc_stats(rig.relay_pid()).rss_kib);
                    peak.3 = peak.3.max(proc_stats(rig.agent_pid(0)).rss_kib);
                }
                if Instant::now() >= due {
                    break;
                }
                let wake = if p == Route::Tunnel { due.min(next_sample) } else { due };
                tokio::time::sleep_until(wake.into()).await;
            }
        }
        let got = read as f64 / t0.elapsed().as_secs_f64() / 1e6;
        drop(body);
        if p == Route::Direct {
            println!("  direct: read {read} bytes at {got:.2} MB/s");
            out.insert("direct".into(), json!({ "bytes_read": read, "mb_s": got }));
        } else {
            let window = Limits::default().initial_window;
            println!(
                "  tunnel: read {read} bytes at {got:.2} MB/s; relayd buffered peak {} B, agentd buffered peak {} B (window {window} B); RSS peak relayd {:.1} MiB, agentd {:.1} MiB",
                peak.0,
                peak.1,
                peak.2 as f64 / 1024.0,
                peak.3 as f64 / 1024.0
            );
            out.insert(
                "tunnel".into(),
                json!({
                    "bytes_read": read, "mb_s": got, "window_bytes": window,
                    "relayd_buffered_peak_bytes": peak.0, "agentd_buffered_peak_bytes": peak.1,
                    "relayd_rss_peak_kib": peak.2, "agentd_rss_peak_kib": peak.3,
                }),
            );
        }
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------- fan-in
