//! What the daemons observe of the traffic they carry: the request metrics
//! (scraped and parsed as Prometheus text), including tokens per second
//! read from a stand-in's stream, and the relay's health answer with the
//! agent's view of its local service.

use std::collections::HashMap;

use serde_json::{Value, json};
use tunnel_tests::{StandIn, StandInConfig, TestAgent, TestRelay, WAIT, init_logging};

/// Parses Prometheus text: `name{labels}` -> value. Every sample line must
/// parse, every family must have HELP and TYPE.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            typed.insert(parts.next().expect("name").to_owned());
            let kind = parts.next().expect("kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().expect("name");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "{name} has no # TYPE");
        assert!(!series.contains("alice"), "a user id became a label: {line}");
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test]
async fn model_streams_are_measured_per_model_and_user_ids_stay_out_of_labels() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let agent = TestAgent::start(&relay, "alice", &upstream.url()).await;
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let resp = http
            .post(relay.tunnel_url("alice", "/api/chat"))
            .json(&json!({ "model": "m", "messages": [{"role": "user", "content": "hi"}] }))
            .send()
            .await
            .expect("chat");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("body");
    }
    let missing = http.get(relay.tunnel_url("alice", "/nowhere")).send().await.expect("404");
    assert_eq!(missing.status(), 404);
    missing.text().await.expect("body");

    let tokens = tunnel_tests::ollama::WORDS.len() as f64;
    let model = "{model=\"m\"}";
    // A span ends just after its last bytes went out: the client may read
    // them first. Wait (bounded) until both daemons counted all three.
    let ended = |text: &str| {
        parse(text)
            .iter()
            .filter(|(k, _)| k.contains("_requests_finished_total"))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while ended(&agent.agent.metrics()) < 3.0 || ended(&relay.relay.metrics()) < 3.0 {
        assert!(std::time::Instant::now() < deadline, "the requests never ended in the metrics");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for (prefix, text) in [("agentd", agent.agent.metrics()), ("relayd", relay.relay.metrics())] {
        let m = parse(&text);
        for l in
            text.lines().filter(|l| l.contains("finished_total{") || l.contains("cancels_total{"))
        {
            println!("{l}");
        }
        let get = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("{k} missing:\n{text}"));
        println!(
            "{prefix}: {} tokens, {:.0} tokens/s on average, first token after {:.1} ms",
            get(&format!("{prefix}_generated_tokens_total{model}")),
            get(&format!("{prefix}_generated_tokens_total{model}"))
                / get(&format!("{prefix}_generation_seconds_total{model}")),
            get(&format!("{prefix}_time_to_first_token_seconds_sum{model}")) * 1e3 / 2.0,
        );
        assert_eq!(get(&format!("{prefix}_generated_tokens_total{model}")), 2.0 * tokens);
        assert_eq!(get(&format!("{prefix}_model_streams_total{model}")), 2.0);
        assert_eq!(get(&format!("{prefix}_time_to_first_token_seconds_count{model}")), 2.0);
        assert_eq!(get(&format!("{prefix}_tokens_per_second_count{model}")), 2.0);
        assert!(get(&format!("{prefix}_tokens_per_second_sum{model}")) > 0.0);
        assert!(get(&format!("{prefix}_generation_seconds_total{model}")) > 0.0);
        let inf = format!("{prefix}_tokens_per_second_bucket{{model=\"m\",le=\"+Inf\"}}");
        assert_eq!(get(&inf), 2.0);
        assert_eq!(get(&format!("{prefix}_responses_total{{class=\"2xx\"}}")), 2.0);
        assert_eq!(get(&format!("{prefix}_responses_total{{class=\"4xx\"}}")), 1.0);
        assert_eq!(get(&format!("{prefix}_requests_finished_total{{outcome=\"ok\"}}")), 3.0);
        assert_eq!(get(&format!("{prefix}_trace_events_dropped_total")), 0.0);
    }
}

#[tokio::test]
async fn the_relays_health_answer_carries_the_agents_view_of_its_service() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let _agent = TestAgent::start(&relay, "alice", &upstream.url()).await;
    let http = reqwest::Client::new();
    // The agent checks at once, then every 30 s: wait for the first report.
    let deadline = std::time::Instant::now() + WAIT;
    let health = loop {
        let h: Value = http
            .get(relay.tunnel_url("alice", "/health"))
            .send()
            .await
            .expect("health")
            .json()
            .await
            .expect("json");
        if !h["service"].is_null() {
            break h;
        }
        assert!(std::time::Instant::now() < deadline, "no service report: {h}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    println!("{health:#}");
    assert_eq!(health["connected"], true);
    assert_eq!(health["service"]["reachable"], true);
    assert!(health["service"]["version"].is_string(), "{health}");
    assert!(health["service"]["checked_at"].is_string(), "{health}");
    assert!(health["service"]["models_loaded"].is_array(), "{health}");
    // readyz is up while serving.
    let ready = http.get(relay.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
}

/// A local service that comes up after the agent: the first tunnelled
/// request that reaches it makes the agent check again at once, so its
/// status does not say "unreachable" for the rest of the 30 s interval.
#[tokio::test]
async fn a_request_that_finds_the_service_up_refreshes_the_agents_view() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    // A port nothing listens on yet (bound by the OS, then released).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let agent = TestAgent::start(&relay, "alice", &format!("http://127.0.0.1:{port}")).await;
    let deadline = std::time::Instant::now() + WAIT;
    while agent.agent.service_health().checked.is_none() {
        assert!(std::time::Instant::now() < deadline, "no first check");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!agent.agent.service_health().reachable, "nothing listens yet");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("rebind");
    let _upstream = StandIn::serve(listener, StandInConfig::default());
    let answer = reqwest::Client::new()
        .get(relay.tunnel_url("alice", "/api/tags"))
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 200);
    let deadline = std::time::Instant::now() + WAIT;
    while !agent.agent.service_health().reachable {
        assert!(
            std::time::Instant::now() < deadline,
            "still unreachable: {:?}",
            agent.agent.service_health()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(agent.agent.service_health().version.is_some());
}
