//! Several devices per user: each device keeps its own session; a device
//! that connects again replaces only its own; a limit on devices per user
//! refuses one more, clearly.

use agentd::{AgentError, Phase};
use tunnel_tests::{StandIn, StandInConfig, TestAgent, TestRelay, WAIT, init_logging, spawn_agent};

async fn agent(relay: &TestRelay, upstream: &StandIn, secret: String) -> TestAgent {
    TestAgent::start_with(relay, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(secret);
        c.policy = agentd::policy::Policy::default();
    })
    .await
}

fn session_of(relay: &TestRelay, device: &str) -> String {
    let tunnel = relay.relay.device_tunnel("alice", device);
    tunnel.unwrap_or_else(|| panic!("{device} is connected")).session_id().to_owned()
}

#[tokio::test]
async fn two_devices_of_one_user_keep_their_own_sessions() {
    init_logging();
    let relay = TestRelay::start_with(&["alice"], |c| c.max_devices_per_user = 2).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let issue = |device| relay.relay.issue_credential("alice", Some(device));
    let (gpu, laptop, tablet) = (
        issue("gpu-box").await.expect("issue"),
        issue("laptop").await.expect("issue"),
        issue("tablet").await.expect("issue"),
    );
    let _gpu_agent = agent(&relay, &upstream, gpu.secret.clone()).await;
    let laptop_agent = agent(&relay, &upstream, laptop.secret.clone()).await;
    assert_eq!(relay.relay.tunnel_count(), 2);
    let (gpu_session, laptop_session) =
        (session_of(&relay, "gpu-box"), session_of(&relay, "laptop"));

    // The user's address answers, and neither device displaces the other
    // (before devices, these two took the session from each other).
    let http = reqwest::Client::new();
    for _ in 0..20 {
        let resp = http.get(relay.tunnel_url("alice", "/api/tags")).send().await.expect("request");
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(session_of(&relay, "gpu-box"), gpu_session);
    assert_eq!(session_of(&relay, "laptop"), laptop_session);

    // A third device is one too many: refused at the handshake.
    assert_eq!(relay.agent_handshake(&tablet.secret).await, 409);
    assert_eq!(relay.relay.tunnel_count(), 2);

    // The same device connecting again replaces its own session, and only
    // that one.
    let old_laptop = relay.relay.device_tunnel("alice", "laptop").expect("laptop");
    drop(laptop_agent);
    tokio::time::timeout(WAIT, old_laptop.closed()).await.expect("the laptop's agent left");
    let _again = agent(&relay, &upstream, laptop.secret.clone()).await;
    assert_ne!(session_of(&relay, "laptop"), laptop_session);
    let second_laptop = relay.relay.device_tunnel("alice", "laptop").expect("laptop");
    let _third = agent(&relay, &upstream, laptop.secret.clone()).await;
    tokio::time::timeout(WAIT, second_laptop.closed()).await.expect("replaced by the newer one");
    assert_eq!(session_of(&relay, "gpu-box"), gpu_session, "the other device kept its session");
    assert_eq!(relay.relay.tunnel_count(), 2);
}

#[tokio::test]
async fn disconnecting_one_device_leaves_the_others() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let gpu = relay.relay.issue_credential("alice", Some("gpu-box")).await.expect("issue");
    let laptop = relay.relay.issue_credential("alice", Some("laptop")).await.expect("issue");
    let _gpu_agent = agent(&relay, &upstream, gpu.secret.clone()).await;
    let _laptop_agent = agent(&relay, &upstream, laptop.secret.clone()).await;
    let gpu_session = session_of(&relay, "gpu-box");
    let laptop = relay.relay.device_tunnel("alice", "laptop").expect("laptop");
    assert_eq!(relay.relay.disconnect("alice", Some("laptop")), 1);
    tokio::time::timeout(WAIT, laptop.closed()).await.expect("the laptop's session ended");
    assert_eq!(session_of(&relay, "gpu-box"), gpu_session);
    assert_eq!(relay.relay.disconnect("alice", Some("tablet")), 0);
}

#[tokio::test]
async fn an_agent_past_the_device_limit_says_so_and_retries() {
    init_logging();
    let relay = TestRelay::start_with(&["alice"], |c| c.max_devices_per_user = 1).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let gpu = relay.relay.issue_credential("alice", Some("gpu-box")).await.expect("issue");
    let laptop = relay.relay.issue_credential("alice", Some("laptop")).await.expect("issue");
    let _gpu_agent = agent(&relay, &upstream, gpu.secret.clone()).await;
    let (refused, shutdown, task) = spawn_agent(&relay, &laptop.secret, &upstream.url());
    let mut state = refused.state();
    let seen = tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s.phase, Phase::BackingOff { .. }) && s.last_error.is_some()),
    )
    .await
    .expect("refused in time")
    .expect("state")
    .clone();
    assert_eq!(seen.last_error, Some(AgentError::TooManyDevices));
    assert_eq!(relay.relay.tunnel_count(), 1);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.expect("stopped").expect("task");
}
