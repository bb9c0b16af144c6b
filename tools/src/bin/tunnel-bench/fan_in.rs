//! Scenario `fan-in`: relay memory per idle tunnel, with TLS and without.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::*;
use tools::procs::proc_stats;
use tools::svg::{COLORS, Series, chart};
use tunnel_proto::{Hello, Limits, Message, PROTOCOL_VERSION, SUBPROTOCOL, capability};
use tunnel_tests::tls::TestCert;

/// A minimal version-1 agent that connects, says hello and answers pings:
/// an idle tunnel, at the cost of one task and one socket here. Over TLS
/// when `tls` is given.
pub(crate) async fn idle_agent(
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: String,
) -> Result<tokio::task::JoinHandle<()>> {
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let mut request = format!("{scheme}://127.0.0.1:{port}/ws/tunnel").into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    request.headers_mut().insert("sec-websocket-protocol", SUBPROTOCOL.parse()?);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stream = match &tls {
        Some(client) => MaybeTlsStream::Rustls(tunnel_tests::tls::connect(client, addr).await?),
        None => MaybeTlsStream::Plain(tokio::net::TcpStream::connect(addr).await?),
    };
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await?;
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        agent: "bench-idle-agent".into(),
        capabilities: capability::ALL.iter().map(|c| (*c).to_owned()).collect(),
        limits: Limits::default(),
    });
    socket.send(Ws::text(hello.encode())).await?;
    match socket.next().await {
        Some(Ok(Ws::Text(_))) => {}
        other => bail!("no welcome: {other:?}"),
    }
    Ok(tokio::spawn(async move {
        while let Some(Ok(frame)) = socket.next().await {
            if let Ws::Text(t) = frame
                && let Ok(Message::Ping(p)) = Message::decode(&t, &Limits::default())
                && socket.send(Ws::text(Message::pong(&p).encode())).await.is_err()
            {
                return;
            }
        }
    }))
}

/// Idle tunnels on one relay, over TLS (the target) and then over plain
/// WebSockets (what TLS adds).
pub(crate) async fn fan_in(bin: &Path, args: &Args) -> Result<Value> {
    let tls = fan_in_pass(bin, args, true).await?;
    let plain = fan_in_pass(bin, args, false).await?;
    Ok(json!({ "tls": tls, "plain": plain }))
}

#[allow(clippy::print_stdout)]
pub(crate) async fn fan_in_pass(bin: &Path, args: &Args, tls: bool) -> Result<Value> {
    let total = if args.smoke { 200 } else { 10_000 };
    let step = if args.smoke { 100 } else { 1000 };
    let rig = Rig::start(
        bin,
        args,
        RigOpts { users: total, agents: 0, handshakes_per_second: 100_000, tls, callgrind: false },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = proc_stats(rig.relay_pid()).rss_kib;
    let client = rig.cert.as_ref().map(TestCert::client);
    let mut agents = Vec::with_capacity(total);
    let mut points = vec![(0.0, base as f64 / 1024.0)];
    let mut rows = Vec::new();
    let kind = if tls { "TLS (wss)" } else { "plain ws" };
    println!("fan-in: idle agents on one relay, {kind}");
    println!("{:>8} {:>14} {:>18}", "agents", "relayd RSS", "per idle tunnel");
    println!("{:>8} {:>10.1} MiB {:>18}", 0, base as f64 / 1024.0, "");
    while agents.len() < total {
        let from = agents.len();
        let batch: Vec<_> = (from..from + step)
            .map(|i| idle_agent(rig.relay_port, client.clone(), token(i)))
            .collect();
        // At most 200 handshakes in flight from this client.
        let mut connected = futures_util::stream::iter(batch).buffer_unordered(200);
        while let Some(r) = connected.next().await {
            agents.push(r?);
        }
        rig.wait_agents(agents.len(), Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = proc_stats(rig.relay_pid()).rss_kib;
        let per = (rss.saturating_sub(base)) as f64 / agents.len() as f64;
        println!("{:>8} {:>10.1} MiB {:>14.1} KiB", agents.len(), rss as f64 / 1024.0, per);
        points.push((agents.len() as f64, rss as f64 / 1024.0));
        rows.push(
            json!({ "agents": agents.len(), "relayd_rss_kib": rss, "kib_per_idle_tunnel": per }),
        );
    }
    let stats = proc_stats(rig.relay_pid());
    println!("  relayd: {} fds, {} threads with {} agents", stats.fds, stats.threads, agents.len());
    write_plot(
        &args.out,
        if tls { "fan-in-memory.svg" } else { "fan-in-memory-plain.svg" },
        chart(
            &format!("relayd resident memory against idle tunnels ({kind})"),
            "idle agents",
            "relayd RSS (MiB)",
            &[Series { name: "relayd RSS".into(), color: COLORS[1], points }],
        ),
    )?;
    for a in agents {
        a.abort();
    }
    Ok(json!({ "tls": tls, "baseline_rss_kib": base, "rows": rows, "relayd_fds": stats.fds }))
}

// ---------------------------------------------------------------- 1,000 streams
