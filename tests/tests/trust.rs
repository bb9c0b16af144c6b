//! Trust that holds: what a revocation takes away, the times a token
//! carries, what a share token's model limit means to the desktop, and a
//! session that ends with the reason it was given. Each test is named after
//! a defect a hostile tester found, and failed before its fix.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use relayd::identity::{Role, Scope};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tunnel_proto::{Limits, Message};
use tunnel_tests::raw::RawAgent;
use tunnel_tests::{StandIn, StandInConfig, TempDir, TestAgent, TestRelay, WAIT, init_logging};

const ISS: &str = "https://relay.test";
const AUD: &str = "llm-tunnel";

/// A relay configuration as an operator writes it, with a state directory
/// (where relayd makes its own signing key) and `identity` extra keys.
fn config(state: &TempDir, identity: &str) -> relayd::Config {
    use daemon::Resolve as _;
    let text = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[identity]\nissuer = \"{ISS}\"\naudience = \"{AUD}\"\n{identity}\n",
        state.0.display()
    );
    toml::from_str::<relayd::ConfigFile>(&text)
        .expect("the relay configuration parses")
        .resolve()
        .expect("the relay configuration is valid")
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs_f64()
}

/// Claims for `user` in `role`, expiring at `exp` (any JSON number).
fn claims(user: &str, role: &str, exp: Value) -> Value {
    json!({ "sub": user, "role": role, "iss": ISS, "aud": AUD, "iat": now() as u64,
            "exp": exp, "jti": format!("t_{:016x}", rand::random::<u64>()) })
}

/// A relay over `state` with `identity` settings, and alice's agent
/// (connected with a credential) in front of a stand-in Ollama.
async fn served(state: &TempDir, identity: &str) -> (TestRelay, StandIn, TestAgent) {
    let relay = TestRelay::with_state(config(state, identity)).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let secret = relay.relay.issue_credential("alice", None).await.expect("credential").secret;
    let agent = TestAgent::start_with(&relay, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(secret);
    })
    .await;
    (relay, upstream, agent)
}

/// Signs `claims` with the relay's own key (the one it made in its state
/// directory).
fn sign(relay: &TestRelay, claims: &Value) -> String {
    relay
        .relay
        .identity()
        .config()
        .signer
        .as_ref()
        .expect("relayd made a key")
        .sign(claims)
        .expect("sign")
}

/// The status of an agent's WebSocket handshake with `token`, and the
/// relay's error code when it refused.
async fn handshake(relay: &TestRelay, token: &str) -> (u16, Option<String>) {
    let mut req = relay.ws_url().into_client_request().expect("request");
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("header value"));
    req.headers_mut()
        .insert("sec-websocket-protocol", tunnel_proto::SUBPROTOCOL.parse().expect("value"));
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => (resp.status().as_u16(), None),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get(tunnel_proto::ERROR_CODE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
    }
}

#[tokio::test]
async fn revoking_a_credential_revokes_the_access_tokens_minted_for_it_even_after_a_restart() {
    init_logging();
    let state = TempDir::new("trust-revoke");
    let relay = TestRelay::with_state(config(&state, "")).await;
    let credential = relay.relay.issue_credential("alice", None).await.expect("credential");
    let agent = RawAgent::connect(&relay.ws_url(), &credential.secret, Limits::default())
        .await
        .expect("the credential opens a session");
    let access = agent.welcome.token.clone().expect("an access token in welcome");
    // The access token works on its own, as a thief who saw it would use it.
    let mut thief = RawAgent::connect(&relay.ws_url(), &access, Limits::default())
        .await
        .expect("the access token opens a session before the revocation");

    let revoked = relay.relay.revoke(&credential.id).await.expect("revoke");
    // The thief's session replaced the agent's (one per user): it is the
    // one the revocation must end.
    assert_eq!(revoked.sessions_ended, 1, "the session opened with the access token ends");
    assert_eq!(thief.closed(WAIT).await, Some(tunnel_proto::CLOSE_REVOKED));
    assert_eq!(handshake(&relay, &access).await, (401, Some("revoked_token".into())));
    assert_eq!(handshake(&relay, &credential.secret).await, (401, Some("revoked_token".into())));

    // A restart keeps it so: the token names its credential.
    relay.shutdown().await;
    let relay = TestRelay::with_state(config(&state, "")).await;
    assert_eq!(handshake(&relay, &access).await, (401, Some("revoked_token".into())));
}

/// Two relays over one credential store (a store in memory standing for
/// the database replicas share), with one signing key.
async fn replicas(state: &TempDir) -> (TestRelay, TestRelay) {
    let key = state.path("signing.pem");
    relayd::admin::generate_key(&key).expect("a signing key");
    let cfg = config(state, &format!("signing_key_file = \"{}\"", key.display()));
    let store: std::sync::Arc<dyn relayd::identity::store::CredentialStore> =
        std::sync::Arc::new(relayd::identity::store::MemoryStore::default());
    let mut relays = Vec::new();
    for _ in 0..2 {
        let identity =
            relayd::identity::Identity::open(cfg.identity_config(), vec![], store.clone())
                .await
                .expect("the identity opens over the shared store");
        let state = relayd::State { identity, log_key: vec![7; 32] };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        relays.push(TestRelay::serve(listener, relayd::Relay::with_state(cfg.clone(), state)));
    }
    let b = relays.pop().expect("two relays");
    (relays.pop().expect("two relays"), b)
}

#[tokio::test]
async fn a_revocation_made_on_one_relay_ends_sessions_and_tokens_on_another_sharing_the_store() {
    init_logging();
    let state = TempDir::new("trust-replicas");
    let (a, b) = replicas(&state).await;
    let credential = a.relay.issue_credential("alice", None).await.expect("credential");
    let mut agent = RawAgent::connect(&b.ws_url(), &credential.secret, Limits::default())
        .await
        .expect("relay b admits a credential relay a issued");
    let client = a.relay.mint("alice", Role::Client, Duration::from_secs(600), None).expect("mint");
    let http = reqwest::Client::new();
    let health = b.tunnel_url("alice", "/health");
    let status = http.get(&health).bearer_auth(&client.token).send().await.expect("GET");
    assert_eq!(status.status(), 200, "relay b takes a client token relay a minted");

    // Revoked on relay a, which holds no session: relay b is told.
    assert_eq!(a.relay.revoke(&client.id).await.expect("revoke").sessions_ended, 0);
    assert_eq!(a.relay.revoke(&credential.id).await.expect("revoke").sessions_ended, 0);
    assert_eq!(agent.closed(WAIT).await, Some(tunnel_proto::CLOSE_REVOKED));
    // The client token's revocation was told before the credential's.
    let status = http.get(&health).bearer_auth(&client.token).send().await.expect("GET");
    assert_eq!(status.status(), 401, "relay b refuses the token relay a revoked");
    assert_eq!(handshake(&b, &credential.secret).await, (401, Some("revoked_token".into())));
}

#[tokio::test]
async fn a_rotated_out_credentials_access_tokens_stop_working_with_it() {
    init_logging();
    let state = TempDir::new("trust-rotate");
    let relay = TestRelay::with_state(config(&state, "")).await;
    let credential = relay.relay.issue_credential("alice", None).await.expect("credential");
    let mut agent = RawAgent::connect(&relay.ws_url(), &credential.secret, Limits::default())
        .await
        .expect("connect");
    let old_access = agent.welcome.token.clone().expect("access token");
    agent.send(&Message::Rotate(Default::default())).await;
    let fresh = loop {
        if let Message::Credential(c) = agent.recv_msg(WAIT).await {
            break c;
        }
    };
    agent.send(&Message::Rotated(tunnel_proto::Rotated { id: fresh.id.clone() })).await;
    let new_access = loop {
        if let Message::Authorized(a) = agent.recv_msg(WAIT).await {
            break a.token;
        }
    };
    let new_access = new_access.expect("an access token for the new credential");
    let deadline = Instant::now() + WAIT;
    while !relay.relay.identity().is_revoked(&credential.id) {
        assert!(Instant::now() < deadline, "the old credential was never revoked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handshake(&relay, &old_access).await.0, 401, "the old credential's token");
    assert_eq!(handshake(&relay, &credential.secret).await.0, 401, "the old credential");
    assert_eq!(handshake(&relay, &new_access).await.0, 101, "the new credential's token");
}

#[tokio::test]
async fn a_token_whose_exp_has_a_fraction_expires_like_any_other() {
    init_logging();
    let state = TempDir::new("trust-float");
    let (relay, _upstream, _agent) = served(&state, "leeway = \"0s\"").await;
    let exp = now() + 1.5;
    let client = sign(&relay, &claims("alice", "client", json!(exp)));
    let http = reqwest::Client::new();
    let call = || http.get(relay.tunnel_url("alice", "/api/tags")).bearer_auth(&client).send();
    assert_eq!(call().await.expect("request").status(), 200, "valid before its exp");
    // An agent session opened with such a token ends when it expires.
    let agent_jwt = sign(&relay, &claims("bob", "agent", json!(exp)));
    let mut session =
        RawAgent::connect(&relay.ws_url(), &agent_jwt, Limits::default()).await.expect("connect");
    let wait = Duration::from_secs_f64((exp - now()).max(0.0) + 0.2);
    tokio::time::sleep(wait).await;
    assert_eq!(call().await.expect("request").status(), 401, "refused once past its exp");
    assert_eq!(session.closed(WAIT).await, Some(4003), "the session closes on expiry");
}

#[tokio::test]
async fn a_token_inside_the_leeway_opens_a_session_that_lasts_until_the_leeway_ends() {
    init_logging();
    let state = TempDir::new("trust-leeway");
    let relay = TestRelay::with_state(config(&state, "leeway = \"3s\"")).await;
    // Expired a second ago: inside the 3 s leeway, so valid for 2 s more.
    let token = sign(&relay, &claims("alice", "agent", json!(now() - 1.0)));
    let mut session =
        RawAgent::connect(&relay.ws_url(), &token, Limits::default()).await.expect("accepted");
    let opened = Instant::now();
    assert_eq!(session.closed(WAIT).await, Some(4003));
    let lasted = opened.elapsed();
    assert!(
        lasted >= Duration::from_millis(1500),
        "a session the handshake admitted was closed at once ({lasted:?}): one rule for both"
    );
}

#[tokio::test]
async fn dates_past_year_9999_and_huge_lifetimes_are_refused_not_a_panic() {
    init_logging();
    let state = TempDir::new("trust-huge");
    let relay = TestRelay::with_state(config(&state, "")).await;
    let http = reqwest::Client::new();
    for exp in [json!(1u64 << 63), json!(u64::MAX), json!(1e300), json!(-5)] {
        let token = sign(&relay, &claims("alice", "client", exp.clone()));
        let resp = http
            .get(relay.tunnel_url("alice", "/api/tags"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("an answer, not a dead worker");
        assert_eq!(resp.status(), 401, "exp {exp}");
        assert_eq!(handshake(&relay, &token).await.0, 401, "agent door, exp {exp}");
    }
    let err = relay
        .relay
        .mint("alice", Role::Client, Duration::from_secs(u64::MAX), None)
        .expect_err("a lifetime past year 9999");
    assert!(matches!(err, relayd::identity::IdentityError::Invalid(_)), "{err}");
    // The relay still serves.
    assert_eq!(http.get(relay.url("/healthz")).send().await.expect("healthz").status(), 200);
}

#[tokio::test]
async fn a_share_claim_with_a_member_the_relay_does_not_know_is_refused() {
    init_logging();
    let state = TempDir::new("trust-share");
    let relay = TestRelay::with_state(config(&state, "")).await;
    let http = reqwest::Client::new();
    for share in [
        json!({"path": ["/api/tags"]}),
        json!({"models": ["llama3.2"], "max_tokens": 10}),
        json!({}),
        json!(null),
        json!(["/api/tags"]),
    ] {
        let mut c = claims("alice", "client", json!(now() + 600.0));
        c["share"] = share.clone();
        let resp = http
            .get(relay.tunnel_url("alice", "/api/tags"))
            .bearer_auth(sign(&relay, &c))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 401, "share {share}");
    }
}

#[tokio::test]
async fn a_share_token_for_one_model_cannot_name_another_in_a_key_go_would_read() {
    init_logging();
    let state = TempDir::new("trust-model");
    let (relay, upstream, _agent) = served(&state, "").await;
    let scope = Scope { paths: vec![], models: vec!["llama3.2".into()] };
    let token = relay
        .relay
        .mint("alice", Role::Client, Duration::from_secs(600), Some(scope))
        .expect("share token")
        .token;
    let http = reqwest::Client::new();
    let chat = |body: &'static str| {
        http.post(relay.tunnel_url("alice", "/api/chat"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let ok = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    assert_eq!(chat(ok).await.expect("request").status(), 200);
    let seen = upstream.events.requests().len();
    for body in [
        r#"{"model":"llama3.2","Model":"mistral","messages":[],"stream":false}"#,
        r#"{"model":"llama3.2","MODEL":"mistral","stream":false}"#,
        r#"{"model":"llama3.2","model":"mistral","stream":false}"#,
        r#"{"model":"","name":"mistral","stream":false}"#,
        r#"{"model":"llama3.2","name":"mistral","stream":false}"#,
        r#"{"model":"llama3.2"}{"model":"mistral"}"#,
    ] {
        let status = chat(body).await.expect("request").status();
        assert!(status == 400 || status == 403, "{body} -> {status}");
    }
    assert_eq!(upstream.events.requests().len(), seen, "none of them reached the desktop");
}

/// A real agent's reader and a flood of pings at once: the reader gets the
/// close frame, and after it a clean end of the connection. A relay that
/// drops the socket with unread input resets it (the agent's reply then
/// fails with a broken pipe), and a reset can destroy the close frame
/// before the agent reads it.
#[tokio::test]
async fn a_ping_flood_ends_with_a_close_frame_and_a_clean_closing_handshake() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let agent =
        RawAgent::connect(&relay.ws_url(), &tunnel_tests::agent_token("alice"), Limits::default())
            .await
            .expect("connect");
    let (mut sink, mut stream) = agent.into_socket().split();
    let reader = tokio::spawn(async move {
        let mut code = None;
        while let Some(frame) = stream.next().await {
            match frame {
                Ok(Ws::Close(f)) => code = Some(f.map(|f| u16::from(f.code))),
                Ok(_) => continue,
                Err(e) => return (code, Some(e.to_string())),
            }
        }
        (code, None)
    });
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < WAIT {
        if sink.send(Ws::text(Message::ping(format!("p{sent}")).encode())).await.is_err() {
            break;
        }
        sent += 1;
    }
    let (code, error) =
        tokio::time::timeout(WAIT, reader).await.expect("reader ends").expect("join");
    assert_eq!(code, Some(Some(1008)), "after {sent} pings the agent saw {code:?} ({error:?})");
    assert_eq!(
        error, None,
        "the relay dropped the connection (unread input: a reset) instead of finishing the closing handshake"
    );
}

/// Relays that share `[identity] user_hash_key_file` hash a user alike (so
/// their access lines join); relays with their own `log.key` do not.
#[tokio::test]
async fn relays_sharing_a_user_hash_key_hash_a_user_alike() {
    init_logging();
    let keys = TempDir::new("trust-hash-key");
    let key = keys.path("user-hash.key");
    daemon::config::write_secret_bytes(&key, &[7u8; 32]).expect("key");
    let shared = format!("user_hash_key_file = \"{}\"", key.display());
    let (a, b) = (TempDir::new("trust-hash-a"), TempDir::new("trust-hash-b"));
    let one = TestRelay::with_state(config(&a, &shared)).await;
    let two = TestRelay::with_state(config(&b, &shared)).await;
    assert_eq!(one.relay.user_hash("alice"), two.relay.user_hash("alice"));
    let (c, d) = (TempDir::new("trust-hash-c"), TempDir::new("trust-hash-d"));
    let three = TestRelay::with_state(config(&c, "")).await;
    let four = TestRelay::with_state(config(&d, "")).await;
    assert_ne!(three.relay.user_hash("alice"), four.relay.user_hash("alice"));
    // A short key is refused at start.
    let short = keys.path("short.key");
    daemon::config::write_secret_bytes(&short, &[7u8; 8]).expect("key");
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[identity]\nuser_hash_key_file = \"{}\"\n",
        short.display()
    );
    use daemon::Resolve as _;
    let err = toml::from_str::<relayd::ConfigFile>(&text).expect("parses").resolve();
    assert!(err.expect_err("too short").to_string().contains("at least 32 bytes"));
}
