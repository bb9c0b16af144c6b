//! Scenario `trace`: what a trace subscriber that never reads costs the
//! data path. Small requests through the tunnel at concurrency 16, rounds
//! alternating without and with a `Trace` subscriber on relayd's control
//! socket that never reads its stream: its buffer fills, events are
//! dropped (and counted), requests go on.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use http::Request;
use serde_json::{Value, json};
use tunnel_proto::control::v1::{TraceRequest, relay_client::RelayClient};

use crate::*;

#[allow(clippy::print_stdout)]
pub(crate) async fn trace(bin: &Path, args: &Args) -> Result<Value> {
    let rig = Rig::start(bin, args, ONE_AGENT).await?;
    let http = client(64);
    let (rounds, dur) = if args.smoke {
        (1, Duration::from_millis(300))
    } else {
        (args.rounds.unwrap_or(5), Duration::from_secs(3))
    };
    let url = rig.url(Route::Tunnel, 0, "/api/tags");
    let make = std::sync::Arc::new(move || {
        Request::get(&url).body(full(String::new())).expect("valid request")
    });
    closed_loop(&http, make.clone(), 16, Duration::from_millis(300)).await;
    let socket = rig.dir.join("relayd.sock");
    let channel =
        tunnelctl::client::connect("relayd", &socket, Duration::from_secs(5), true).await?;
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut errors = 0;
    for r in 0..rounds {
        for subscribed in if r % 2 == 0 { [false, true] } else { [true, false] } {
            // Subscribed: the stream is held, never read.
            let _held = if subscribed {
                let mut c = RelayClient::new(channel.clone());
                Some(c.trace(TraceRequest::default()).await?.into_inner())
            } else {
                None
            };
            let l = closed_loop(&http, make.clone(), 16, dur).await;
            errors += l.errors;
            let rps = l.ok as f64 / l.elapsed.as_secs_f64();
            if subscribed { with.push(rps) } else { without.push(rps) }
        }
    }
    let dropped = tools::procs::scrape(rig.relay_metrics, "relayd_trace_events_dropped_total")
        .await
        .unwrap_or(0);
    let (a, b) = (median(&without), median(&with));
    println!(
        "trace subscriber that never reads ({rounds} rounds x {dur:?}, GET /api/tags, c=16, medians)"
    );
    println!("  tunnel req/s without a subscriber {a:>9.0}");
    println!("  tunnel req/s with one             {b:>9.0}  ({:.3}x)", b / a);
    println!("  trace events dropped by the stuck subscriber: {dropped}; request errors: {errors}");
    Ok(json!({
        "without_rps": a, "with_rps": b, "ratio": b / a,
        "rounds": { "without": without, "with": with },
        "events_dropped": dropped, "errors": errors,
    }))
}
