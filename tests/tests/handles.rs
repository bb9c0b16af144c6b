//! The daemons' handles, as the control plane will use them: the agent's
//! commands (reconnect, replace the token, shut down) and typed state, the
//! relay's tunnels and disconnect.

use std::time::Duration;

use daemon::Resolve as _;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tunnel_tests::{
    StandIn, StandInConfig, TestAgent, TestRelay, WAIT, agent_token, backed_off, init_logging,
    spawn_agent,
};

use agentd::{AgentError, Phase};

#[tokio::test]
async fn reconnect_lets_in_flight_streams_finish_then_connects_again_at_once() {
    init_logging();
    let standin = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let gate = standin.gate();
    let relay = TestRelay::start(&["alice"]).await;
    let agent = TestAgent::start(&relay, "alice", &standin.url()).await;
    let first = relay.wait_for_agent("alice").await;
    let resp = reqwest::Client::new()
        .post(relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "messages": [], "options": { "num_predict": 4 } }))
        .send()
        .await
        .expect("request");
    agent.agent.reconnect().expect("command taken");
    // The stream finishes on the old session before it ends.
    gate.add_permits(4);
    let text = resp.text().await.expect("the whole stream");
    let last: Value = serde_json::from_str(text.lines().last().expect("a line")).expect("json");
    assert_eq!(last["done"], true, "{text}");
    let mut state = agent.agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected() && s.sessions == 2))
        .await
        .expect("reconnected")
        .expect("state");
    let second = relay.wait_for_agent("alice").await;
    assert_ne!(second.session_id(), first.session_id());
    assert_eq!(state.borrow().last_error, None, "a requested reconnect is not a failure");
}

#[tokio::test]
async fn a_replaced_token_is_used_at_once_instead_of_after_the_backoff() {
    init_logging();
    let standin = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let relay = TestRelay::start(&["alice"]).await;
    let (agent, shutdown, task) = spawn_agent(&relay, "a-token-nobody-issued", &standin.url());
    let mut state = agent.state();
    // A refused token backs off to the cap (30 s), longer than this test waits.
    let refused = backed_off(&agent).await;
    assert_eq!(refused.last_error, Some(AgentError::Unauthorized(401)));
    agent.replace_token(agent_token("alice")).expect("command taken");
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected()))
        .await
        .expect("the new token connected without waiting out the backoff")
        .expect("state");
    relay.wait_for_agent("alice").await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.expect("stopped").expect("task");
}

#[tokio::test]
async fn the_state_tells_an_unreachable_relay_from_a_refused_token() {
    init_logging();
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let config = agentd::ConfigFile {
        relay: Some(url),
        token: Some("some-token-0123456789".into()),
        ..agentd::ConfigFile::default()
    }
    .resolve()
    .expect("valid agent config");
    let agent = std::sync::Arc::new(agentd::Agent::new(config));
    let shutdown = CancellationToken::new();
    let (running, stop) = (agent.clone(), shutdown.clone());
    let task = tokio::spawn(async move { running.run(stop).await });
    let mut state = agent.state();
    let seen = tokio::time::timeout(WAIT, state.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("failed in time")
        .expect("state")
        .clone();
    assert!(matches!(seen.last_error, Some(AgentError::Unreachable(_))), "{seen:?}");
    agent.shutdown().expect("command taken");
    tokio::time::timeout(WAIT, task).await.expect("the shutdown command stops it").expect("task");
    assert_eq!(agent.state().borrow().phase, Phase::Stopped);
    assert!(agent.reconnect().is_err(), "a stopped agent takes no commands");
    drop(shutdown);
}

#[tokio::test]
async fn disconnecting_a_tunnel_fails_its_streams_and_the_agent_comes_back() {
    init_logging();
    let standin = StandIn::start(StandInConfig {
        token_delay: Duration::from_millis(5),
        tokens: 100_000,
        ..StandInConfig::default()
    })
    .await
    .expect("stand-in");
    let relay = TestRelay::start(&["alice", "bob"]).await;
    let agent = TestAgent::start(&relay, "alice", &standin.url()).await;
    let first = relay.wait_for_agent("alice").await;
    assert_eq!(relay.relay.tunnels().len(), 1);
    assert_eq!(relay.relay.disconnect("bob", None), 0, "bob has no tunnel");
    let resp = reqwest::Client::new()
        .post(relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "messages": [] }))
        .send()
        .await
        .expect("request");
    let mut body = resp.bytes_stream();
    body.next().await.expect("a first chunk").expect("chunk");
    assert_eq!(first.in_flight(), 1);
    assert_eq!(relay.relay.disconnect("alice", None), 1);
    tokio::time::timeout(WAIT, first.closed()).await.expect("the session ended");
    let mut rest = Vec::new();
    while let Some(Ok(chunk)) = tokio::time::timeout(WAIT, body.next()).await.expect("ends") {
        rest.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("disconnected by the relay's operator"), "{text}");
    let mut state = agent.agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected() && s.sessions == 2))
        .await
        .expect("the agent came back")
        .expect("state");
}
