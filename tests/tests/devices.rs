//! Several devices per user: each device keeps its own session; a device
//! that connects again replaces only its own; a limit on devices per user
//! refuses one more, clearly.

use agentd::AgentError;
use serde_json::{Value, json};
use tunnel_tests::{
    StandIn, StandInConfig, TestAgent, TestRelay, WAIT, backed_off, init_logging, spawn_agent,
};

async fn agent(relay: &TestRelay, upstream: &StandIn, secret: String) -> TestAgent {
    agent_with(relay, upstream, secret, agentd::config::Routing::default()).await
}

async fn agent_with(
    relay: &TestRelay,
    upstream: &StandIn,
    secret: String,
    routing: agentd::config::Routing,
) -> TestAgent {
    TestAgent::start_with(relay, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(secret);
        c.policy = agentd::policy::Policy::default();
        c.routing = routing;
    })
    .await
}

/// Alice's health answer once `done` holds for it (bounded: [`WAIT`]).
async fn health_until(relay: &TestRelay, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let resp = http.get(relay.tunnel_url("alice", "/health")).send().await.expect("health");
        let body: Value = resp.json().await.expect("JSON");
        if done(&body) {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Alice's devices in her health answer, once `n` of them reported what
/// their services have (bounded: [`WAIT`]).
async fn reported(relay: &TestRelay, n: usize) -> Vec<Value> {
    let devices = |body: &Value| body["devices"].as_array().cloned().unwrap_or_default();
    let reported = |d: &Value| d["service"]["models_available"].is_array();
    let body = health_until(relay, &format!("{n} devices reported"), |body| {
        let devices = devices(body);
        devices.len() == n && devices.iter().all(reported)
    })
    .await;
    devices(&body)
}

/// A stand-in Ollama that has `model`, loaded in memory or not.
async fn stand_in(model: &str, loaded: bool) -> StandIn {
    let config = StandInConfig {
        model: model.into(),
        loaded,
        only_its_model: true,
        ..StandInConfig::default()
    };
    StandIn::start(config).await.expect("stand-in")
}

/// Requests `stand_in` received for `what` (`POST /api/chat`).
fn received(stand_in: &StandIn, what: &str) -> usize {
    stand_in.events.requests().iter().filter(|r| *r == what).count()
}

/// Alice on a relay with two devices, gpu-box served by `gpu` and laptop
/// by `laptop` (the laptop connecting first when `laptop_first`), once
/// both reported what their services have.
struct Devices {
    relay: TestRelay,
    gpu_agent: TestAgent,
    _laptop_agent: TestAgent,
}

async fn two_devices(gpu: &StandIn, laptop: &StandIn, laptop_first: bool) -> Devices {
    two_devices_with(gpu, laptop, laptop_first, agentd::config::Routing::default()).await
}

/// [`two_devices`], the GPU box's owner asking for `gpu_routing`.
async fn two_devices_with(
    gpu: &StandIn,
    laptop: &StandIn,
    laptop_first: bool,
    gpu_routing: agentd::config::Routing,
) -> Devices {
    let relay = TestRelay::start(&["alice"]).await;
    let issue = |device| relay.relay.issue_credential("alice", Some(device));
    let (gpu_secret, laptop_secret) = (
        issue("gpu-box").await.expect("issue").secret,
        issue("laptop").await.expect("issue").secret,
    );
    let (gpu_agent, laptop_agent) = if laptop_first {
        let l = agent(&relay, laptop, laptop_secret).await;
        (agent_with(&relay, gpu, gpu_secret, gpu_routing).await, l)
    } else {
        let g = agent_with(&relay, gpu, gpu_secret, gpu_routing).await;
        (g, agent(&relay, laptop, laptop_secret).await)
    };
    reported(&relay, 2).await;
    Devices { relay, gpu_agent, _laptop_agent: laptop_agent }
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
    let seen = backed_off(&refused).await;
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
    let health = reported(&relay, 2).await;
    let mut seen: Vec<(String, Value)> = health
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
            ("gpu-box".to_owned(), json!(["llama3.3:70b"])),
            ("laptop".to_owned(), json!(["qwen2.5:7b"])),
        ]
    );
}

#[tokio::test]
async fn a_request_goes_to_the_device_that_has_its_model() {
    init_logging();
    let (big, small) = (stand_in("llama3.3:70b", false).await, stand_in("qwen2.5:7b", false).await);
    let two = two_devices(&big, &small, false).await;
    let relay = &two.relay;
    let http = reqwest::Client::new();
    let post = |path: &str, model: &str| {
        let body = json!({ "model": model, "stream": false, "messages": [{ "role": "user", "content": "hi" }] });
        http.post(relay.tunnel_url("alice", path)).json(&body).send()
    };
    for _ in 0..5 {
        for model in ["llama3.3:70b", "qwen2.5:7b"] {
            let resp = post("/api/chat", model).await.expect("chat");
            assert_eq!(resp.status(), 200, "{model}");
        }
    }
    assert_eq!((received(&big, "POST /api/chat"), received(&small, "POST /api/chat")), (5, 5));
    let resp = post("/v1/chat/completions", "qwen2.5:7b").await.expect("chat");
    assert_eq!(resp.status(), 200);
    assert_eq!(received(&small, "POST /v1/chat/completions"), 1);

    // A model no device has: 404 naming it, in the client's own shape.
    let resp = post("/api/chat", "mistral").await.expect("chat");
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("JSON");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("\"mistral\"")), "{body}");
    let resp = post("/v1/chat/completions", "mistral").await.expect("chat");
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(received(&big, "POST /api/chat") + received(&small, "POST /api/chat"), 10);
    // Why each went where it went, counted: the first chat for each model
    // found it on disk, and once a device answered it, it is in memory.
    let metrics = relay.relay.metrics();
    assert!(metrics.contains("relayd_routed_total{why=\"model_present\"} 2"), "{metrics}");
    assert!(metrics.contains("relayd_routed_total{why=\"model_loaded\"} 9"), "{metrics}");
    // And where, by device (no user label).
    assert!(metrics.contains("relayd_routed_device_total{device=\"gpu-box\"} 5"), "{metrics}");
    assert!(metrics.contains("relayd_routed_device_total{device=\"laptop\"} 6"), "{metrics}");
}

#[tokio::test]
async fn a_device_with_the_model_loaded_is_preferred() {
    init_logging();
    let (cold, warm) =
        (stand_in("llama3.2:latest", false).await, stand_in("llama3.2:latest", true).await);
    let two = two_devices(&cold, &warm, true).await;
    let relay = &two.relay;
    let http = reqwest::Client::new();
    for _ in 0..10 {
        // Without a tag: `llama3.2` is `llama3.2:latest`.
        let body = json!({ "model": "llama3.2", "prompt": "hi", "stream": false });
        let resp = http.post(relay.tunnel_url("alice", "/api/generate")).json(&body).send().await;
        assert_eq!(resp.expect("generate").status(), 200);
    }
    assert_eq!(
        (received(&warm, "POST /api/generate"), received(&cold, "POST /api/generate")),
        (10, 0)
    );
}

#[tokio::test]
async fn the_model_lists_answer_the_union_of_the_devices() {
    init_logging();
    let (big, small) = (stand_in("llama3.3:70b", true).await, stand_in("qwen2.5:7b", false).await);
    let two = two_devices(&big, &small, false).await;
    let relay = &two.relay;
    let http = reqwest::Client::new();
    let list = async |path: &str, key: &str, name: &str| {
        let resp = http.get(relay.tunnel_url("alice", path)).send().await.expect("list");
        assert_eq!(resp.status(), 200, "{path}");
        let body: Value = resp.json().await.expect("JSON");
        let mut seen: Vec<(String, Value)> = body[key]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: {body}"))
            .iter()
            .map(|m| (m[name].as_str().unwrap_or("").to_owned(), m["devices"].clone()))
            .collect();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        seen
    };
    let both = vec![
        ("llama3.3:70b".to_owned(), json!(["gpu-box"])),
        ("qwen2.5:7b".to_owned(), json!(["laptop"])),
    ];
    assert_eq!(list("/api/tags", "models", "name").await, both);
    assert_eq!(list("/v1/models", "data", "id").await, both);
    // Loaded in memory: only the GPU box's.
    assert_eq!(list("/api/ps", "models", "name").await, both[..1]);
}

/// A device whose service fails before answering (here: gone, while its
/// agent stays connected) hands the request to the next device that has
/// the model, once: the client sees an answer, not the failure.
#[tokio::test]
async fn a_request_its_device_fails_before_answering_goes_to_the_next() {
    init_logging();
    let (warm, cold) =
        (stand_in("llama3.2:latest", true).await, stand_in("llama3.2:latest", false).await);
    let two = two_devices(&warm, &cold, false).await;
    let relay = &two.relay;
    // The GPU box has the model loaded: it is asked first, and its Ollama
    // is now down.
    drop(warm);
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let body = json!({ "model": "llama3.2", "stream": false, "messages": [{ "role": "user", "content": "hi" }] });
        let resp = http.post(relay.tunnel_url("alice", "/api/chat")).json(&body).send().await;
        let resp = resp.expect("chat");
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(received(&cold, "POST /api/chat"), 5);
    // Both devices stay connected: a failed request is not a lost device.
    assert_eq!(relay.relay.tunnel_count(), 2);
}

/// The turns of a conversation land on one device (its first user message
/// or the `X-Tunnel-Affinity` header picks it among equally good ones).
#[tokio::test]
async fn a_conversation_stays_on_one_device() {
    init_logging();
    let (a, b) = (stand_in("llama3.2:latest", true).await, stand_in("llama3.2:latest", true).await);
    let two = two_devices(&a, &b, false).await;
    let relay = &two.relay;
    let http = reqwest::Client::new();
    let handled_by = async |body: Value, header: Option<&str>| {
        let before = (received(&a, "POST /api/chat"), received(&b, "POST /api/chat"));
        let mut req = http.post(relay.tunnel_url("alice", "/api/chat")).json(&body);
        if let Some(h) = header {
            req = req.header("x-tunnel-affinity", h);
        }
        assert_eq!(req.send().await.expect("chat").status(), 200);
        let after = (received(&a, "POST /api/chat"), received(&b, "POST /api/chat"));
        if after.0 > before.0 { "gpu-box" } else { "laptop" }
    };
    let mut used = Vec::new();
    for topic in 0..8 {
        let mut messages = vec![json!({ "role": "system", "content": "be brief" })];
        let mut devices = Vec::new();
        for turn in 0..4 {
            messages
                .push(json!({ "role": "user", "content": format!("topic {topic}, turn {turn}") }));
            let body = json!({ "model": "llama3.2", "stream": false, "messages": messages });
            devices.push(handled_by(body, None).await);
            messages.push(json!({ "role": "assistant", "content": "ok" }));
        }
        assert!(devices.iter().all(|d| *d == devices[0]), "topic {topic} moved: {devices:?}");
        used.push(devices[0]);
    }
    // Different conversations are not all pinned to one device.
    assert!(used.contains(&"gpu-box") && used.contains(&"laptop"), "{used:?}");
    // A client-named conversation: its header decides, whatever the body.
    let mut by_header = Vec::new();
    for turn in 0..4 {
        let body = json!({ "model": "llama3.2", "stream": false, "messages": [{ "role": "user", "content": format!("unrelated {turn}") }] });
        by_header.push(handled_by(body, Some("conversation-42")).await);
    }
    assert!(by_header.iter().all(|d| *d == by_header[0]), "{by_header:?}");
}

/// A model only a device that left has: 503 with Retry-After naming the
/// device (it may come back), not the 404 of a model that does not exist.
#[tokio::test]
async fn a_model_only_a_device_that_left_has_asks_the_client_to_come_back() {
    init_logging();
    let (big, small) = (stand_in("llama3.3:70b", false).await, stand_in("qwen2.5:7b", false).await);
    let two = two_devices(&big, &small, false).await;
    let relay = &two.relay;
    two.gpu_agent.stop().await;
    tokio::time::timeout(WAIT, relay.relay.wait_until(|r| r.tunnel_count() == 1))
        .await
        .expect("the GPU box left");
    let http = reqwest::Client::new();
    let chat = async |model: &str| {
        let body = json!({ "model": model, "stream": false, "messages": [{ "role": "user", "content": "hi" }] });
        http.post(relay.tunnel_url("alice", "/api/chat")).json(&body).send().await.expect("chat")
    };
    let resp = chat("llama3.3:70b").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("30"));
    let body: Value = resp.json().await.expect("JSON");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("\"gpu-box\"")), "{body}");
    assert_eq!(chat("qwen2.5:7b").await.status(), 200);
    // A model no device ever had: the remaining device's own answer.
    assert_eq!(chat("mistral").await.status(), 404);
    assert_eq!(received(&small, "POST /api/chat"), 2);
}

/// Chats with `model` (not streamed, so that they can run concurrently).
async fn chat(relay: &TestRelay, model: &str) -> u16 {
    chat_to(relay.tunnel_url("alice", "/api/chat"), model.to_owned()).await
}

/// [`chat`] at `url`, owning what it needs (for a task of its own).
async fn chat_to(url: String, model: String) -> u16 {
    let body = json!({ "model": model, "stream": false, "messages": [{ "role": "user", "content": "hi" }] });
    reqwest::Client::new().post(url).json(&body).send().await.expect("chat").status().as_u16()
}

/// Requests for a model one device is loading wait for that load instead
/// of loading the model on another device too.
#[tokio::test]
async fn requests_for_a_model_being_loaded_wait_for_that_load() {
    init_logging();
    let cold = |_| {
        let config = StandInConfig {
            model: "llama3.2:latest".into(),
            only_its_model: true,
            load_delay: std::time::Duration::from_millis(800),
            ..StandInConfig::default()
        };
        StandIn::start(config)
    };
    let (a, b) = (cold(0).await.expect("stand-in"), cold(1).await.expect("stand-in"));
    let two = two_devices(&a, &b, false).await;
    let relay = &two.relay;
    let first = tokio::spawn(chat_to(relay.tunnel_url("alice", "/api/chat"), "llama3.2".into()));
    // The relay shows the load on the device it sent the first chat to.
    let loading_device = |body: &Value| {
        let devices = body["devices"].as_array().cloned().unwrap_or_default();
        devices.into_iter().find(|d| {
            d["service"]["models"]
                .as_array()
                .is_some_and(|m| m.contains(&json!({ "name": "llama3.2", "state": "loading" })))
        })
    };
    let body = health_until(relay, "no device shows a load", |b| loading_device(b).is_some()).await;
    let loading = loading_device(&body).expect("a device loading")["device"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Three more while it loads: all wait for that one load.
    let more = futures_util::future::join_all((0..3).map(|_| chat(relay, "llama3.2"))).await;
    assert_eq!(more, [200, 200, 200]);
    assert_eq!(first.await.expect("first chat"), 200);
    let (on_a, on_b) = (received(&a, "POST /api/chat"), received(&b, "POST /api/chat"));
    let loader = if loading == "gpu-box" { (4, 0) } else { (0, 4) };
    assert_eq!((on_a, on_b), loader, "all four on {loading}");
    assert_eq!(a.events.loads() + b.events.loads(), 1, "one load in all");
    let metrics = relay.relay.metrics();
    assert!(metrics.contains("relayd_routed_total{why=\"model_loading\"} 3"), "{metrics}");
}

/// A request that names no model goes to the device its owner prefers
/// (`[routing] priority`), which the health answer lists first; among
/// devices equal for a model, priority breaks the tie.
#[tokio::test]
async fn the_owners_priority_picks_among_equal_devices() {
    init_logging();
    let (gpu, laptop) =
        (stand_in("llama3.2:latest", true).await, stand_in("llama3.2:latest", true).await);
    // The GPU box connects first: without its priority, the newer laptop
    // would take these.
    let preferred = agentd::config::Routing { priority: 10, ..agentd::config::Routing::default() };
    let two = two_devices_with(&gpu, &laptop, false, preferred).await;
    let relay = &two.relay;
    let devices = reported(relay, 2).await;
    assert_eq!(
        (devices[0]["device"].as_str(), devices[0]["priority"].as_i64()),
        (Some("gpu-box"), Some(10))
    );
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let resp = http.get(relay.tunnel_url("alice", "/api/version")).send().await.expect("GET");
        assert_eq!(resp.status(), 200);
        assert_eq!(chat(relay, "llama3.2").await, 200);
    }
    assert_eq!(received(&gpu, "GET /api/version"), 3);
    assert_eq!(received(&laptop, "GET /api/version"), 0);
    assert_eq!((received(&gpu, "POST /api/chat"), received(&laptop, "POST /api/chat")), (3, 0));
}

/// Among devices with the model loaded, the faster one (tokens per second
/// measured on the streams it answered) takes the requests once both were
/// measured.
#[tokio::test]
async fn the_faster_device_is_preferred_once_measured() {
    init_logging();
    let with_delay = |ms| {
        StandIn::start(StandInConfig {
            model: "llama3.2:latest".into(),
            loaded: true,
            only_its_model: true,
            tokens: 16,
            token_delay: std::time::Duration::from_millis(ms),
            ..StandInConfig::default()
        })
    };
    let (fast, slow) =
        (with_delay(1).await.expect("stand-in"), with_delay(15).await.expect("stand-in"));
    let two = two_devices(&fast, &slow, false).await;
    let relay = &two.relay;
    let http = reqwest::Client::new();
    // Generations name no conversation: nothing keeps them on a device.
    let stream = async || {
        let body = json!({ "model": "llama3.2", "prompt": "hi" });
        let resp = http.post(relay.tunnel_url("alice", "/api/generate")).json(&body).send();
        let resp = resp.await.expect("generate");
        assert_eq!(resp.status(), 200);
        resp.bytes().await.expect("the whole stream");
    };
    // The first goes to the newest (the laptop, slow); the next to the
    // GPU box, not measured yet; from then on, the faster.
    for _ in 0..6 {
        stream().await;
    }
    let on = |s: &StandIn| received(s, "POST /api/generate");
    assert_eq!((on(&fast), on(&slow)), (5, 1));
    let devices = reported(relay, 2).await;
    let speed = |name: &str| {
        let d = devices.iter().find(|d| d["device"] == name).expect("device");
        d["tokens_per_second"].as_f64().unwrap_or_default()
    };
    assert!(speed("gpu-box") > 2.0 * speed("laptop"), "{devices:?}");
}

/// An agent whose service is loading a model for a request says so: its
/// `tunnelctl status` (models loading) and the relay's health answer show
/// it until the service answers, also with one device, where the relay
/// itself chose nothing.
#[tokio::test]
async fn an_agent_reports_a_model_its_service_is_loading() {
    init_logging();
    let cold = StandIn::start(StandInConfig {
        model: "llama3.2:latest".into(),
        load_delay: std::time::Duration::from_millis(800),
        ..StandInConfig::default()
    })
    .await
    .expect("stand-in");
    let relay = TestRelay::start(&["alice"]).await;
    let secret =
        relay.relay.issue_credential("alice", Some("gpu-box")).await.expect("issue").secret;
    let agent = agent(&relay, &cold, secret).await;
    reported(&relay, 1).await;
    let chat = tokio::spawn(chat_to(relay.tunnel_url("alice", "/api/chat"), "llama3.2".into()));
    let loading = json!({ "name": "llama3.2", "state": "loading" });
    health_until(&relay, "no load reported", |b| {
        b["service"]["models"].as_array().is_some_and(|m| m.contains(&loading))
    })
    .await;
    assert_eq!(agent.agent.models_loading(), ["llama3.2"]);
    assert_eq!(chat.await.expect("chat"), 200);
    assert!(agent.agent.models_loading().is_empty(), "answered: loaded");
    // The report that the load ended reaches the relay too.
    health_until(&relay, "the load stayed", |b| {
        b["service"]["models_loading"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
}
