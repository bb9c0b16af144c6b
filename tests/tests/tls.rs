//! TLS on the relay's listener: web clients over HTTPS and agents over WSS,
//! with a self-signed certificate for 127.0.0.1.

use daemon::Resolve as _;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tunnel_tests::tls::{TestCert, body_bytes, request};
use tunnel_tests::{StandIn, StandInConfig, TestAgent, TestRelay, WAIT, init_logging};

fn chat() -> http::Request<Full<Bytes>> {
    http::Request::post("/api/tunnel/alice/api/chat")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":5}}"#,
        )))
        .expect("valid request")
}

#[tokio::test]
async fn a_chat_streams_over_https_through_an_agent_on_wss() {
    init_logging();
    let cert = TestCert::new().expect("certificate");
    let standin = StandIn::start(StandInConfig {
        token_delay: Duration::from_millis(5),
        ..StandInConfig::default()
    })
    .await
    .expect("stand-in");
    let tls = cert.relay_tls();
    let relay = TestRelay::start_with(&["alice"], move |c| c.tls = Some(tls)).await;
    let ca = cert.cert_file.clone();
    let wss = format!("wss://{}/ws/tunnel", relay.addr);
    let _agent = TestAgent::start_with(&relay, "alice", &standin.url(), move |c| {
        let target = c.target.as_mut().expect("a relay");
        target.relay = wss.parse().expect("valid URL");
        target.tls = Some(agentd::tls::client_config(Some(&ca), &[]).expect("CA loads"));
    })
    .await;

    let resp = tokio::time::timeout(WAIT, request(&cert.client(), relay.addr, chat()))
        .await
        .expect("answer in time")
        .expect("HTTPS request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    // Lines arrive one body chunk at a time, as over plain HTTP.
    let mut body = resp.into_body();
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.expect("body stalled") {
        if let Ok(data) = frame.expect("body frame").into_data() {
            buf.extend_from_slice(&data);
        }
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            lines.push(serde_json::from_slice::<Value>(&line).expect("JSON line"));
        }
    }
    assert_eq!(lines.len(), 6, "5 tokens and the final line");
    assert_eq!(lines.last().map(|l| l["done"].clone()), Some(Value::Bool(true)));
}

#[tokio::test]
async fn the_relays_own_endpoints_answer_over_https_and_plain_http_gets_nothing() {
    init_logging();
    let cert = TestCert::new().expect("certificate");
    let tls = cert.relay_tls();
    let relay = TestRelay::start_with(&["alice"], move |c| c.tls = Some(tls)).await;
    let req = http::Request::get("/healthz")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let resp = request(&cert.client(), relay.addr, req).await.expect("HTTPS request");
    assert_eq!(resp.status(), 200);
    assert_eq!(body_bytes(resp).await.expect("body"), "ok\n");

    // Plain HTTP on the TLS port is not served: the relay ends the
    // connection without an HTTP answer.
    let plain = reqwest::Client::new();
    let err = tokio::time::timeout(WAIT, plain.get(relay.url("/healthz")).send())
        .await
        .expect("refused in time");
    assert!(err.is_err(), "plain HTTP must not be answered: {err:?}");
}

/// Runs an agent for "alice" against `relay` over `wss://` trusting
/// `ca_file`, and returns the error of its first failed attempt.
async fn first_connect_error(relay: &TestRelay, ca_file: &std::path::Path) -> String {
    let config = agentd::ConfigFile {
        relay: Some(format!("wss://{}", relay.addr)),
        token: Some(tunnel_tests::agent_token("alice")),
        tls: agentd::config::TlsFile {
            ca_file: Some(ca_file.to_owned()),
            pins: vec![],
            ..Default::default()
        },
        ..agentd::ConfigFile::default()
    }
    .resolve()
    .expect("valid agent config");
    let agent = std::sync::Arc::new(agentd::Agent::new(config));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = agent.clone();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { running.run(token).await });
    let mut state = agent.state();
    let seen = tokio::time::timeout(WAIT, state.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("the attempt fails in time")
        .expect("agent state")
        .clone();
    assert!(!seen.is_connected());
    assert!(relay.relay.tunnel("alice").is_none());
    shutdown.cancel();
    let _ = tokio::time::timeout(WAIT, task).await;
    seen.last_error.expect("an error").to_string()
}

#[tokio::test]
async fn an_agent_refuses_a_relay_whose_certificate_it_does_not_trust() {
    init_logging();
    let served = TestCert::new().expect("certificate");
    let other = TestCert::new().expect("certificate");
    let tls = served.relay_tls();
    let relay = TestRelay::start_with(&["alice"], move |c| c.tls = Some(tls)).await;
    let why = first_connect_error(&relay, &other.cert_file).await;
    // Both test certificates carry rcgen's default subject, so rustls
    // finds the other one as issuer and the signature does not verify.
    assert!(why.contains("TLS") && why.contains("invalid peer certificate"), "{why}");
    // And what to do about it.
    assert!(why.contains("[tls] ca_file") && why.contains("agentd --config FILE pin"), "{why}");
    let metrics = relay.relay.metrics();
    assert!(metrics.contains("relayd_tls_handshake_failures_total 1"), "{metrics}");
}

#[tokio::test]
async fn an_agent_refuses_a_trusted_certificate_for_another_name() {
    init_logging();
    // Trusted (the agent's CA file is this very certificate), but issued
    // for another host than the 127.0.0.1 the agent dials.
    let served = TestCert::for_names(&["relay.example.invalid"]).expect("certificate");
    let tls = served.relay_tls();
    let relay = TestRelay::start_with(&["alice"], move |c| c.tls = Some(tls)).await;
    let why = first_connect_error(&relay, &served.cert_file).await;
    assert!(why.contains("TLS") && why.contains("not valid for name"), "{why}");
    assert!(why.contains("enroll with the name the certificate carries"), "{why}");
}

#[test]
fn unusable_tls_files_are_refused_with_the_file_named() {
    let cert = TestCert::new().expect("certificate");
    // The key file given as the certificate: no certificate in it.
    let err = relayd::tls::load(&cert.key_file, &cert.key_file).expect_err("must fail");
    assert!(err.to_string().contains("key.pem"), "{err}");
    // A missing key file.
    let missing = cert.dir.join("absent.pem");
    let err = relayd::tls::load(&cert.cert_file, &missing).expect_err("must fail");
    assert!(err.to_string().contains("absent.pem"), "{err}");
    // A CA file for a ws:// relay is a mistake, said at start.
    let err = agentd::ConfigFile {
        relay: Some("ws://127.0.0.1:1".into()),
        token: Some(tunnel_tests::agent_token("alice")),
        tls: agentd::config::TlsFile {
            ca_file: Some(cert.cert_file.clone()),
            pins: vec![],
            ..Default::default()
        },
        ..agentd::ConfigFile::default()
    }
    .resolve()
    .expect_err("must fail");
    assert!(err.to_string().contains("wss://"), "{err}");
}
