//! Chaos: agents, relays, networks and model servers that die mid-stream.
//! Every request must end with an answer or a clean error, promptly, and the
//! relay must let go of every stream it held. Each test also measures the
//! tasks alive on its runtime and the sockets open on its ports while idle,
//! and checks both return there afterwards: no leaked task or descriptor.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tunnel_tests::footprint::Footprint;
use tunnel_tests::proxy::{ChaosProxy, Mode};
use tunnel_tests::{StandIn, StandInConfig, TestAgent, TestRelay, WAIT, init_logging};

/// A chat that streams for a long time.
fn endless() -> StandInConfig {
    StandInConfig {
        token_delay: Duration::from_millis(20),
        tokens: 100_000,
        ..StandInConfig::default()
    }
}

async fn start_chat(
    http: &reqwest::Client,
    url: String,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + use<> {
    let resp = http
        .post(url)
        .json(&json!({ "model": "m", "messages": [] }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut stream = Box::pin(resp.bytes_stream());
    stream.next().await.expect("first chunk").expect("chunk");
    stream
}

/// Reads until the body ends; returns the tail and how long that took.
async fn until_end(
    mut stream: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> (String, Duration) {
    let started = Instant::now();
    let mut tail = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        while let Some(c) = stream.next().await {
            match c {
                Ok(c) => tail.extend_from_slice(&c),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stream never ended");
    let text = String::from_utf8_lossy(&tail);
    let last = text.lines().last().unwrap_or_default().to_owned();
    (last, started.elapsed())
}

/// Bounded poll: the gauge and stream tables have no change notification.
async fn relay_lets_go(relay: &TestRelay) {
    tokio::time::timeout(WAIT, async {
        while relay.relay.buffered().current() > 0
            || relay.relay.tunnels().iter().any(|s| s.in_flight() > 0)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("relay kept streams or buffers of a dead session");
}

/// Checks that tasks and sockets came back to `baseline` (or below).
#[allow(clippy::print_stdout)]
async fn no_leaks(baseline: Footprint, ports: &[u16], what: &str) {
    match baseline.settled(ports).await {
        Ok(now) => println!("{what}: idle {baseline:?}, after {now:?}"),
        Err(now) => panic!("{what}: leaked; idle {baseline:?}, after {now:?}"),
    }
}

/// Serves one request, so that the idle footprint taken next includes
/// what a tunnel that has served a request keeps: the web client's pooled
/// connection to the relay and the agent's pooled connection to the model
/// server. The test ends with a request through the same client.
async fn warm_up(http: &reqwest::Client, relay: &TestRelay) {
    let resp = http.get(relay.tunnel_url("alice", "/api/tags")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    resp.bytes().await.expect("body");
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.split('/').next()?.parse().ok()).expect("a port")
}

#[tokio::test]
async fn agent_killed_mid_stream_ends_the_client_stream_with_an_error() {
    init_logging();
    let standin = StandIn::start(endless()).await.unwrap();
    let relay = TestRelay::start(&["alice"]).await;
    let ports = [relay.addr.port(), port_of(&standin.url())];
    // Before the agent: everything it and its session held must go.
    let idle = Footprint::now(&ports);
    let agent = TestAgent::start(&relay, "alice", &standin.url()).await;
    let http = reqwest::Client::new();
    let stream = start_chat(&http, relay.tunnel_url("alice", "/api/chat")).await;
    agent.kill().await;
    let (last, took) = until_end(Box::pin(stream)).await;
    println!("agent killed: client stream ended after {took:?} with {last}");
    assert!(last.contains(r#""error""#), "{last}");
    relay_lets_go(&relay).await;
    let resp = http.get(relay.tunnel_url("alice", "/api/tags")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    drop((resp, http));
    no_leaks(idle, &ports, "agent killed").await;
}

/// Ping interval of the proxied set-up: a dead path is noticed after two
/// silent intervals.
const PING: Duration = Duration::from_millis(100);

/// A stand-in with an endless chat, a relay, and an agent that reaches the
/// relay through a [`ChaosProxy`]; both daemons ping every [`PING`] and give
/// up after two silent intervals.
async fn behind_a_proxy() -> (StandIn, TestRelay, ChaosProxy, TestAgent) {
    init_logging();
    let standin = StandIn::start(endless()).await.expect("stand-in");
    let relay = TestRelay::start_with(&["alice"], |c| {
        c.liveness.ping_interval = PING;
        c.liveness.max_missed_pings = 2;
    })
    .await;
    let proxy = ChaosProxy::start(relay.addr).await;
    let agent = TestAgent::start_with(&relay, "alice", &standin.url(), |c| {
        c.target.as_mut().expect("a relay").relay = proxy.url().parse().expect("proxy url");
        c.liveness.ping_interval = PING;
        c.liveness.max_missed_pings = 2;
        c.reconnect_max_delay = Duration::from_millis(200);
    })
    .await;
    (standin, relay, proxy, agent)
}

#[tokio::test]
async fn a_blackholed_network_is_detected_by_pings_and_the_agent_comes_back() {
    let (standin, relay, proxy, agent) = behind_a_proxy().await;
    let first = relay.wait_for_agent("alice").await;
    let ports = [relay.addr.port(), proxy.addr.port(), port_of(&standin.url())];
    let http = reqwest::Client::new();
    warm_up(&http, &relay).await;
    let idle = Footprint::now(&ports);
    let stream = start_chat(&http, relay.tunnel_url("alice", "/api/chat")).await;
    proxy.set(Mode::Blackhole);
    let (last, took) = until_end(Box::pin(stream)).await;
    println!(
        "blackhole: client stream ended after {took:?} (ping every {PING:?}, 2 missed) with {last}"
    );
    assert!(last.contains("stopped answering pings"), "{last}");
    tokio::time::timeout(WAIT, first.closed()).await.expect("relay kept the dead session");
    relay_lets_go(&relay).await;
    proxy.set(Mode::Forward);
    let mut state = agent.agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected() && s.sessions >= 2))
        .await
        .expect("agent never came back")
        .expect("state");
    let resp = http.get(relay.tunnel_url("alice", "/api/tags")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    drop(first);
    no_leaks(idle, &ports, "blackhole").await;
}

#[tokio::test]
async fn a_stalled_network_is_detected_too() {
    let (standin, relay, proxy, agent) = behind_a_proxy().await;
    let session = relay.wait_for_agent("alice").await;
    let ports = [relay.addr.port(), proxy.addr.port(), port_of(&standin.url())];
    let idle = Footprint::now(&ports);
    let http = reqwest::Client::new();
    let stream = start_chat(&http, relay.tunnel_url("alice", "/api/chat")).await;
    proxy.set(Mode::Stall);
    let (last, took) = until_end(Box::pin(stream)).await;
    println!("stall: client stream ended after {took:?}");
    assert!(last.contains(r#""error""#), "{last}");
    tokio::time::timeout(WAIT, session.closed()).await.expect("relay kept the stalled session");
    relay_lets_go(&relay).await;
    // The network recovers; the proxy's own stalled pipes are the harness's,
    // not the tunnel's, so they are cut.
    proxy.cut();
    proxy.set(Mode::Forward);
    let mut state = agent.agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected() && s.sessions >= 2))
        .await
        .expect("agent never came back")
        .expect("state");
    relay.wait_for_agent("alice").await;
    drop((http, session));
    no_leaks(idle, &ports, "stall").await;
}

#[tokio::test]
async fn relay_restarts_mid_stream_error_the_client_and_the_agent_reconnects() {
    init_logging();
    let standin = StandIn::start(endless()).await.unwrap();
    // A short drain: the endless streams would otherwise hold each relay
    // for the whole default drain deadline.
    let short_drain = |c: &mut relayd::Config| c.drain_timeout = Duration::from_millis(200);
    let mut relay = TestRelay::start_with(&["alice"], short_drain).await;
    let addr = relay.addr;
    let agent = TestAgent::start_with(&relay, "alice", &standin.url(), |c| {
        c.reconnect_max_delay = Duration::from_millis(300);
    })
    .await;
    let ports = [addr.port(), port_of(&standin.url())];
    relay.wait_for_agent("alice").await;
    let http = reqwest::Client::new();
    warm_up(&http, &relay).await;
    let idle = Footprint::now(&ports);
    for round in 1..=3 {
        relay.wait_for_agent("alice").await;
        let stream = start_chat(&http, relay.tunnel_url("alice", "/api/chat")).await;
        let ending = tokio::spawn(until_end(Box::pin(stream)));
        relay.shutdown().await;
        let (last, took) = ending.await.unwrap();
        println!("relay restart {round}: client stream ended after {took:?} with {last}");
        assert!(last.contains(r#""error""#), "{last}");
        relay = TestRelay::start_on(addr, &["alice"], short_drain).await;
    }
    relay.wait_for_agent("alice").await;
    let mut state = agent.agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected() && s.sessions >= 4))
        .await
        .expect("agent did not reconnect after every restart")
        .expect("state");
    let resp = http.get(relay.tunnel_url("alice", "/api/tags")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    no_leaks(idle, &ports, "three relay restarts").await;
}

#[tokio::test]
async fn upstream_dying_mid_stream_ends_the_client_stream_with_an_error() {
    init_logging();
    let standin = StandIn::start(endless()).await.unwrap();
    let relay = TestRelay::start(&["alice"]).await;
    let _agent = TestAgent::start(&relay, "alice", &standin.url()).await;
    let ports = [relay.addr.port(), port_of(&standin.url())];
    let idle = Footprint::now(&ports);
    let http = reqwest::Client::new();
    let stream = start_chat(&http, relay.tunnel_url("alice", "/api/chat")).await;
    drop(standin);
    let (last, took) = until_end(Box::pin(stream)).await;
    println!("upstream died: client stream ended after {took:?} with {last}");
    assert!(last.contains(r#""error""#), "{last}");
    relay_lets_go(&relay).await;
    drop(http);
    no_leaks(idle, &ports, "upstream died").await;
    // The stand-in's own tasks and sockets left with it, which could hide a
    // leak in the totals: nothing may still touch its port, so the agent
    // closed its connection to the dead model server.
    let standin_port = ports[1];
    tokio::time::timeout(WAIT, async {
        while tunnel_tests::footprint::sockets_on(&[standin_port]) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a socket to the dead model server stayed open");
}

/// A chat that ends by itself after `tokens` tokens.
fn finite(tokens: usize) -> StandInConfig {
    StandInConfig { token_delay: Duration::from_millis(20), tokens, ..StandInConfig::default() }
}

#[tokio::test]
async fn a_draining_relay_lets_streams_finish_refuses_new_ones_and_sends_goaway() {
    init_logging();
    let standin = StandIn::start(finite(25)).await.unwrap();
    let relay = TestRelay::start(&["alice"]).await;
    let addr = relay.addr;
    let agent = TestAgent::start_with(&relay, "alice", &standin.url(), |c| {
        c.reconnect_max_delay = Duration::from_millis(300);
    })
    .await;
    let ports = [addr.port(), port_of(&standin.url())];
    let http = reqwest::Client::new();
    warm_up(&http, &relay).await;
    let idle = Footprint::now(&ports);
    let stream = start_chat(&http, relay.tunnel_url("alice", "/api/chat")).await;
    let ending = tokio::spawn(until_end(Box::pin(stream)));
    relay.stop();
    // New work is refused while the stream in flight goes on.
    let refused = reqwest::Client::new().get(relay.tunnel_url("alice", "/api/tags")).send().await;
    if let Ok(resp) = refused {
        assert_eq!(resp.status(), 503);
    }
    let (last, took) = ending.await.unwrap();
    println!("drain: the in-flight stream finished after {took:?} with {last}");
    assert!(last.contains(r#""done":true"#), "the stream was cut: {last}");
    relay.shutdown().await;
    // The agent left on the relay's goaway and comes back to its successor.
    let successor = TestRelay::start_on(addr, &["alice"], |_| {}).await;
    successor.wait_for_agent("alice").await;
    let mut state = agent.agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected() && s.sessions >= 2))
        .await
        .expect("agent did not come back after the goaway")
        .expect("state");
    warm_up(&http, &successor).await;
    no_leaks(idle, &ports, "relay drain").await;
}

#[tokio::test]
async fn a_stopping_agent_finishes_its_streams_first() {
    init_logging();
    let standin = StandIn::start(finite(25)).await.unwrap();
    let relay = TestRelay::start(&["alice"]).await;
    let ports = [relay.addr.port(), port_of(&standin.url())];
    let idle = Footprint::now(&ports);
    let agent = TestAgent::start(&relay, "alice", &standin.url()).await;
    let http = reqwest::Client::new();
    let stream = start_chat(&http, relay.tunnel_url("alice", "/api/chat")).await;
    let ending = tokio::spawn(until_end(Box::pin(stream)));
    let stopping = tokio::spawn(agent.stop());
    let (last, took) = ending.await.unwrap();
    println!("agent drain: the in-flight stream finished after {took:?}");
    assert!(last.contains(r#""done":true"#), "the stream was cut: {last}");
    stopping.await.unwrap();
    tokio::time::timeout(WAIT, relay.relay.wait_until(|r| r.tunnel_count() == 0))
        .await
        .expect("agent never left");
    drop(http);
    no_leaks(idle, &ports, "agent drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_relay_restart_a_crowd_of_agents_all_comes_back_under_the_handshake_limit() {
    const AGENTS: usize = 1000;
    const RATE: u32 = 200;
    const CAP: Duration = Duration::from_secs(2);
    init_logging();
    // Two sockets per agent in this one process.
    let fds = tunnel_tests::raise_fd_limit().expect("raise the open-file limit");
    assert!(fds > 2 * AGENTS as u64 + 100, "the open-file limit ({fds}) is too low for this test");
    let standin = StandIn::start(finite(1)).await.unwrap();
    let users: Vec<String> = (0..AGENTS).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let limit = |c: &mut relayd::Config| {
        c.handshakes_per_second = RATE;
        c.drain_timeout = Duration::from_millis(100);
    };
    // The crowd first arrives one by one, without a limit to wait on.
    let relay = TestRelay::start_with(&names, |c| c.handshakes_per_second = 100_000).await;
    let addr = relay.addr;
    let mut agents = Vec::with_capacity(AGENTS);
    for user in &names {
        agents.push(
            TestAgent::start_with(&relay, user, &standin.url(), |c| c.reconnect_max_delay = CAP)
                .await,
        );
    }
    assert_eq!(relay.relay.tunnel_count(), AGENTS);
    relay.shutdown().await;
    let restarted = Instant::now();
    let relay = TestRelay::start_on(addr, &names, limit).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        relay.relay.wait_until(|r| r.tunnel_count() == AGENTS),
    )
    .await
    .unwrap_or_else(|_| panic!("only {} of {AGENTS} agents came back", relay.relay.tunnel_count()));
    println!(
        "{AGENTS} agents back {:?} after the restart ({RATE} handshakes/s admitted, backoff cap {CAP:?})",
        restarted.elapsed()
    );
    let resp = reqwest::get(relay.tunnel_url("u7", "/api/tags")).await.unwrap();
    assert_eq!(resp.status(), 200);
}
