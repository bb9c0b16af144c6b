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

/// Each device reports the models its service has and those loaded; the
/// user's health answer lists them per device (what routing by model reads).
#[tokio::test]
async fn each_device_reports_the_models_its_service_has() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let stand_in = |model: &str| {
        StandIn::start(StandInConfig { model: model.into(), ..StandInConfig::default() })
    };
    let (big, small) = (
        stand_in("llama3.3:70b").await.expect("stand-in"),
        stand_in("qwen2.5:7b").await.expect("stand-in"),
    );
    let gpu = relay.relay.issue_credential("alice", Some("gpu-box")).await.expect("issue");
    let laptop = relay.relay.issue_credential("alice", Some("laptop")).await.expect("issue");
    let _gpu_agent = agent(&relay, &big, gpu.secret.clone()).await;
    let _laptop_agent = agent(&relay, &small, laptop.secret.clone()).await;
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + WAIT;
    let health = loop {
        let resp = http.get(relay.tunnel_url("alice", "/health")).send().await.expect("health");
        let body: serde_json::Value = resp.json().await.expect("JSON");
        let devices = body["devices"].as_array().cloned().unwrap_or_default();
        let reported = |d: &serde_json::Value| d["service"]["models_available"].is_array();
        if devices.len() == 2 && devices.iter().all(reported) {
            break devices;
        }
        assert!(std::time::Instant::now() < deadline, "both devices reported: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut seen: Vec<(String, serde_json::Value)> = health
        .iter()
        .map(|d| {
            let device = d["device"].as_str().unwrap_or("").to_owned();
            (device, d["service"]["models_available"].clone())
        })
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("gpu-box".to_owned(), serde_json::json!(["llama3.3:70b"])),
            ("laptop".to_owned(), serde_json::json!(["qwen2.5:7b"])),
        ]
    );
}
