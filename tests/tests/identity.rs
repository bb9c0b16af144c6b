//! The identity suite: who may open a tunnel and who may use one, against
//! the attacks the checks exist to stop, and the credential life cycle
//! (refresh, rotation, expiry, revocation) on live sessions.
//!
//! The adversarial table runs every case against one relay with two
//! users' agents (each with the default endpoint policy) and prints one line
//! per case with the answer it got. Each case asserts the status, that the
//! request got exactly as far as it should (relay refusals: nothing reached
//! the agent; policy refusals: the agent saw it, the local service did not),
//! and that the other user's tunnel still serves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use daemon::Resolve as _;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relayd::identity::keys::Signer;
use relayd::identity::{Role, Scope};
use serde_json::{Value, json};
use tunnel_tests::tls::TestCert;
use tunnel_tests::{StandIn, StandInConfig, TempDir, TestAgent, TestRelay, WAIT, init_logging};

const ISS: &str = "https://relay.test";
const AUD: &str = "llm-tunnel";

/// Key material for one relay: its signing key and an HS256 secret.
struct Keys {
    /// Holds the key files until the test ends.
    _dir: TempDir,
    signing: PathBuf,
    signer: Signer,
    hs256: PathBuf,
    secret: String,
}

fn keys() -> Keys {
    let dir = TempDir::new("identity");
    let signing = dir.path("signing.pem");
    relayd::admin::generate_key(&signing).expect("generate the signing key");
    let pem = std::fs::read(&signing).expect("read the key");
    let signer = Signer::from_pem(&pem, &signing).expect("load the key");
    let secret: String = (0..48).map(|_| format!("{:x}", rand::random::<u8>() % 16)).collect();
    let hs256 = dir.path("hs256.secret");
    daemon::config::write_secret(&hs256, &secret).expect("write the secret");
    Keys { _dir: dir, signing, signer, hs256, secret }
}

/// A relay configuration from TOML, as an operator writes it: `top` are
/// top-level keys, `identity` extra `[identity]` keys, `tail` more tables.
fn relay_config(k: &Keys, top: &str, identity: &str, tail: &str) -> relayd::Config {
    let text = format!(
        "listen = \"127.0.0.1:0\"\n{top}\n[identity]\nissuer = \"{ISS}\"\naudience = \"{AUD}\"\nsigning_key_file = \"{}\"\nhs256_secret_file = \"{}\"\n{identity}\n{tail}\n",
        k.signing.display(),
        k.hs256.display()
    );
    toml::from_str::<relayd::ConfigFile>(&text)
        .expect("the relay configuration parses")
        .resolve()
        .expect("the relay configuration is valid")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

fn claims(user: &str, role: &str, ttl: i64) -> Value {
    json!({ "sub": user, "role": role, "iss": ISS, "aud": AUD, "iat": now(),
            "exp": now() as i64 + ttl, "jti": format!("t_test{:016x}", rand::random::<u64>()) })
}

/// Waits (bounded) until `cond` holds, checking every 20 ms.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How far a request should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Refused by the relay: the agent never hears of it.
    Relay,
    /// Refused by the agent's policy: the local service never hears of it.
    Agent,
    /// Served (a control case).
    Service,
}

/// One user's side of the rig.
struct Side {
    upstream: StandIn,
    agent: TestAgent,
    credential: relayd::identity::IssuedCredential,
    client: String,
}

struct Rig {
    keys: Keys,
    relay: TestRelay,
    alice: Side,
    bob: Side,
    http: reqwest::Client,
}

async fn side(relay: &TestRelay, user: &'static str) -> Side {
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let credential = relay.relay.issue_credential(user, None).await.expect("issue a credential");
    let secret = credential.secret.clone();
    let agent = TestAgent::start_with(relay, user, &upstream.url(), move |c| {
        c.credential.token = Some(secret);
        c.policy = agentd::policy::Policy::default();
    })
    .await;
    let client =
        relay.relay.mint(user, Role::Client, Duration::from_secs(600), None).expect("mint").token;
    Side { upstream, agent, credential, client }
}

/// An agent serves as the device its credential names: the relay lists it
/// under that device, and the access token minted for the session (what
/// the agent reconnects with) names the same device.
#[tokio::test]
async fn an_agent_serves_as_the_device_its_credential_names() {
    init_logging();
    let keys = keys();
    let config = relay_config(&keys, "", "", "");
    let relay = TestRelay::start_with(&[], move |c| *c = config).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let credential =
        relay.relay.issue_credential("alice", Some("gpu-box")).await.expect("issue a credential");
    let secret = credential.secret.clone();
    let agent = TestAgent::start_with(&relay, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(secret);
        c.policy = agentd::policy::Policy::default();
    })
    .await;
    let listed: Vec<(String, String)> = relay
        .relay
        .tunnels()
        .iter()
        .map(|t| (t.user().to_owned(), t.device().to_owned()))
        .collect();
    assert_eq!(listed, [("alice".to_owned(), "gpu-box".to_owned())]);
    drop(agent);
}

async fn rig() -> Rig {
    init_logging();
    let keys = keys();
    let config = relay_config(&keys, "", "", "");
    let relay = TestRelay::start_with(&[], move |c| *c = config).await;
    let alice = side(&relay, "alice").await;
    let bob = side(&relay, "bob").await;
    Rig { keys, relay, alice, bob, http: reqwest::Client::new() }
}

/// What a case got back.
struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    body: String,
}

impl Answer {
    async fn of(resp: reqwest::Response) -> Self {
        let status = resp.status().as_u16();
        let www_authenticate =
            resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Answer { status, www_authenticate, body: resp.text().await.unwrap_or_default() }
    }

    /// The error's message (Ollama's `{"error": ...}` or OpenAI's object).
    fn message(&self) -> String {
        let v: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        match &v["error"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("message").and_then(Value::as_str).unwrap_or("").to_owned(),
            _ => self.body.chars().take(60).collect(),
        }
    }
}

/// A raw request (paths an HTTP client would normalize first).
async fn raw(relay: &TestRelay, method: &str, target: &str, token: &str) -> Answer {
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let mut conn = tunnel_tests::send_raw(relay.addr, req.as_bytes()).await;
    let text = tunnel_tests::read_until_closed(&mut conn).await;
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // A chunked body: keep the JSON line.
    let body = body.lines().find(|l| l.starts_with('{')).unwrap_or(&body).to_owned();
    Answer { status, www_authenticate: None, body }
}

/// Runs one case: the answer, how far it got, and that the other user
/// was not affected. Returns the line to print, or the failure.
async fn check(
    rig: &Rig,
    name: &str,
    want: u16,
    reach: Reach,
    answer: impl std::future::Future<Output = Answer>,
) -> Result<String, String> {
    let agent_before = rig.alice.agent.agent.requests();
    let service_before = rig.alice.upstream.events.requests().len();
    let alice_session = rig.relay.relay.tunnel("alice").map(|t| t.session_id().to_owned());
    let a = answer.await;
    let line = format!("{name:<62} -> {} {}", a.status, a.message());
    let mut problems = Vec::new();
    if a.status != want {
        problems.push(format!("wanted {want}"));
    }
    if a.status == 401 && a.www_authenticate.as_deref().is_some_and(|w| !w.starts_with("Bearer")) {
        problems.push("401 without WWW-Authenticate: Bearer".into());
    }
    // The agent's stream for a refused request ends just after the answer.
    let agent_after = rig.alice.agent.agent.requests();
    let service_after = rig.alice.upstream.events.requests().len();
    let (agent_saw, service_saw) =
        (agent_after.received > agent_before.received, service_after > service_before);
    match reach {
        Reach::Relay if agent_saw => problems.push("the agent received it".into()),
        Reach::Agent if !agent_saw || agent_after.refused == agent_before.refused => {
            problems.push("the agent's policy did not refuse it".into())
        }
        Reach::Agent | Reach::Relay if service_saw => {
            problems.push("the local service received it".into())
        }
        Reach::Service if !service_saw => problems.push("the local service never saw it".into()),
        _ => {}
    }
    // The other user is unaffected, and alice's own agent still holds its
    // session.
    let bob = rig
        .http
        .get(rig.relay.tunnel_url("bob", "/api/tags"))
        .bearer_auth(&rig.bob.client)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string());
    if bob != Ok(200) {
        problems.push(format!("bob's tunnel answered {bob:?}"));
    }
    let alice_now = rig.relay.relay.tunnel("alice").map(|t| t.session_id().to_owned());
    if alice_now != alice_session {
        problems.push("alice's agent session changed".into());
    }
    if problems.is_empty() {
        Ok(line)
    } else {
        Err(format!("{line}   <-- {}", problems.join("; ")))
    }
}

#[tokio::test]
async fn adversarial_suite() {
    let rig = rig().await;
    let alice_url = |path: &str| rig.relay.tunnel_url("alice", path);
    let get = |token: String| {
        let req = rig.http.get(alice_url("/api/tags")).bearer_auth(token);
        async move { Answer::of(req.send().await.expect("request")).await }
    };
    let sign = |c: &Value| rig.keys.signer.sign(c).expect("sign");
    let chat = |token: &str, model: &str| {
        let req = rig
            .http
            .post(alice_url("/api/chat"))
            .bearer_auth(token)
            .json(&json!({ "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": false }));
        async move { Answer::of(req.send().await.expect("request")).await }
    };
    let method = |m: &str, path: &str| {
        let req = rig
            .http
            .request(reqwest::Method::from_bytes(m.as_bytes()).expect("method"), alice_url(path))
            .bearer_auth(&rig.alice.client)
            .body("{}");
        async move { Answer::of(req.send().await.expect("request")).await }
    };

    // Tokens for the cases.
    let none_token = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("alice", "client", 600).to_string())
    );
    let public_key = URL_SAFE_NO_PAD
        .decode(rig.keys.signer.public_jwk()["x"].as_str().expect("x"))
        .expect("base64");
    let hs_with_public_key = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(rig.keys.signer.kid().to_owned());
        jsonwebtoken::encode(
            &h,
            &claims("alice", "client", 600),
            &EncodingKey::from_secret(&public_key),
        )
        .expect("encode")
    };
    let hs_good = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("alice", "client", 600),
        &EncodingKey::from_secret(rig.keys.secret.as_bytes()),
    )
    .expect("encode");
    let expired = sign(&claims("alice", "client", -3600));
    let mut future = claims("alice", "client", 7200);
    future["nbf"] = json!(now() + 3600);
    let not_yet = sign(&future);
    let mut c = claims("alice", "client", 600);
    c["iss"] = json!("https://evil.test");
    let wrong_iss = sign(&c);
    let mut c = claims("alice", "client", 600);
    c["aud"] = json!("another-service");
    let wrong_aud = sign(&c);
    let (stranger, _) = Signer::generate().expect("key");
    let unknown_kid = stranger.sign(&claims("alice", "client", 600)).expect("sign");
    let tampered = {
        let good = sign(&claims("bob", "client", 600));
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(claims("alice", "client", 600).to_string());
        parts.join(".")
    };
    let mut big = claims("alice", "client", 600);
    big["padding"] = json!("x".repeat(9 * 1024));
    let oversized = sign(&big);
    let agent_jwt = sign(&claims("alice", "agent", 600));
    let revoked_client =
        rig.relay.relay.mint("alice", Role::Client, Duration::from_secs(600), None).expect("mint");
    rig.relay.relay.revoke(&revoked_client.id).await.expect("revoke");
    let revoked_credential = rig.relay.relay.issue_credential("alice", None).await.expect("issue");
    rig.relay.relay.revoke(&revoked_credential.id).await.expect("revoke");
    let share = |paths: &[&str], models: &[&str]| {
        let scope = Scope {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
        };
        rig.relay
            .relay
            .mint("alice", Role::Client, Duration::from_secs(600), Some(scope))
            .expect("mint")
            .token
    };
    let chat_only = share(&["/api/chat"], &["llama3.2"]);

    let mut lines = Vec::new();
    macro_rules! case {
        ($name:expr, $want:expr, $reach:expr, $answer:expr) => {
            lines.push(check(&rig, $name, $want, $reach, $answer).await)
        };
    }
    // Controls: the real thing works, so the refusals below mean something.
    case!("control: alice's client token", 200, Reach::Service, get(rig.alice.client.clone()));
    case!("control: an HS256 token with the right secret", 200, Reach::Service, get(hs_good));
    case!(
        "control: share token within its scope (/api/chat, llama3.2)",
        200,
        Reach::Service,
        chat(&chat_only, "llama3.2")
    );
    // Missing, malformed, forged.
    case!("no token", 401, Reach::Relay, async {
        Answer::of(rig.http.get(alice_url("/api/tags")).send().await.expect("request")).await
    });
    case!("alg: none", 401, Reach::Relay, get(none_token));
    case!(
        "HS256 signed with the relay's Ed25519 public key",
        401,
        Reach::Relay,
        get(hs_with_public_key)
    );
    case!("expired", 401, Reach::Relay, get(expired));
    case!("not yet valid (nbf in an hour)", 401, Reach::Relay, get(not_yet));
    case!("wrong iss", 401, Reach::Relay, get(wrong_iss));
    case!("wrong aud", 401, Reach::Relay, get(wrong_aud));
    case!("unknown kid (another key)", 401, Reach::Relay, get(unknown_kid));
    case!("tampered payload (bob's signature, alice's claims)", 401, Reach::Relay, get(tampered));
    case!("oversized token (9 KiB)", 401, Reach::Relay, get(oversized));
    case!("garbage token", 401, Reach::Relay, get("not-a-token-at-all-0123456789".into()));
    case!("token in the query string (access_token=)", 401, Reach::Relay, async {
        let url = format!("{}?access_token={}", alice_url("/api/tags"), rig.alice.client);
        Answer::of(rig.http.get(url).send().await.expect("request")).await
    });
    case!("token in the query string (token=)", 401, Reach::Relay, async {
        let url = format!("{}?token={}", alice_url("/api/tags"), rig.alice.client);
        Answer::of(rig.http.get(url).send().await.expect("request")).await
    });
    // Roles and users.
    case!(
        "agent credential used as a client token",
        403,
        Reach::Relay,
        get(rig.alice.credential.secret.clone())
    );
    case!("agent JWT used as a client token", 403, Reach::Relay, get(agent_jwt.clone()));
    case!("client token at /ws/tunnel (register as alice's agent)", 403, Reach::Relay, async {
        let status = rig.relay.agent_handshake(&rig.alice.client).await;
        Answer { status, www_authenticate: None, body: String::new() }
    });
    case!("share token at /ws/tunnel", 403, Reach::Relay, async {
        let status = rig.relay.agent_handshake(&chat_only).await;
        Answer { status, www_authenticate: None, body: String::new() }
    });
    case!("bob's client token on alice's tunnel", 403, Reach::Relay, get(rig.bob.client.clone()));
    case!("revoked client token", 401, Reach::Relay, get(revoked_client.token.clone()));
    case!("revoked agent credential at /ws/tunnel", 401, Reach::Relay, async {
        let status = rig.relay.agent_handshake(&revoked_credential.secret).await;
        Answer { status, www_authenticate: None, body: String::new() }
    });
    // Share tokens outside their scope.
    case!("share token on another path (/api/tags)", 403, Reach::Relay, get(chat_only.clone()));
    case!("share token naming another model (qwen3)", 403, Reach::Relay, chat(&chat_only, "qwen3"));
    case!("share token with no model named", 403, Reach::Relay, async {
        let req = rig
            .http
            .post(alice_url("/api/chat"))
            .bearer_auth(&chat_only)
            .json(&json!({"messages": []}));
        Answer::of(req.send().await.expect("request")).await
    });
    // Traversal and SSRF-style paths (raw: clients would normalize them).
    for (name, target) in [
        ("traversal to another user (/../bob)", "/api/tunnel/alice/../bob/api/tags"),
        ("encoded traversal (%2e%2e)", "/api/tunnel/alice/api/%2e%2e/%2e%2e/etc/passwd"),
        ("double-encoded traversal (%252e%252e)", "/api/tunnel/alice/api/%252e%252e/x"),
        ("encoded slash (%2f)", "/api/tunnel/alice/api%2ftags"),
        ("backslash", "/api/tunnel/alice/api\\..\\tags"),
        ("empty segment (//host: protocol-relative)", "/api/tunnel/alice//169.254.169.254/latest"),
        ("encoded NUL", "/api/tunnel/alice/api/tags%00"),
        ("encoded CR LF (header injection)", "/api/tunnel/alice/api/tags%0d%0aHost:%20evil"),
        ("CR LF in the query", "/api/tunnel/alice/api/tags?x=%0d%0aHost:%20evil"),
    ] {
        let name = format!("path: {name}");
        case!(&name, 400, Reach::Relay, raw(&rig.relay, "GET", target, &rig.alice.client));
    }
    // Every endpoint the default policy denies.
    for (m, path) in [
        ("DELETE", "/api/delete"),
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("POST", "/api/blobs/sha256:0123456789abcdef"),
        ("HEAD", "/api/blobs/sha256:0123456789abcdef"),
        ("POST", "/api/signout"),
        ("GET", "/api/chat"),
        ("POST", "/api/tags"),
        ("PUT", "/api/chat"),
        ("GET", "/metrics"),
        ("GET", "/debug/pprof"),
        ("GET", "/api/tags/"),
    ] {
        let name = format!("policy: {m} {path}");
        case!(&name, 403, Reach::Agent, method(m, path));
    }

    println!("\nadversarial suite ({} cases):", lines.len());
    let mut failures = 0;
    for l in &lines {
        match l {
            Ok(line) => println!("  ok    {line}"),
            Err(line) => {
                failures += 1;
                println!("  FAIL  {line}");
            }
        }
    }
    assert_eq!(failures, 0, "{failures} cases failed (listed above)");
}

/// An agent started by hand (the harness's waits for a session it must
/// not get).
fn spawn_agent(config: agentd::Config) -> (Arc<agentd::Agent>, tokio_util::sync::DropGuard) {
    let agent = Arc::new(agentd::Agent::new(config));
    let stop = tokio_util::sync::CancellationToken::new();
    let running = agent.clone();
    let token = stop.clone();
    tokio::spawn(async move { running.run(token).await });
    (agent, stop.drop_guard())
}

fn tls_agent_config(
    relay: &TestRelay,
    ca_file: &std::path::Path,
    pins: &[String],
) -> agentd::Config {
    agentd::ConfigFile {
        relay: Some(format!("wss://127.0.0.1:{}", relay.addr.port())),
        token: Some(tunnel_tests::agent_token("alice")),
        upstream: Some("http://127.0.0.1:9".into()),
        tls: agentd::config::TlsFile {
            ca_file: Some(ca_file.to_owned()),
            pins: pins.to_vec(),
            ..Default::default()
        },
        ..agentd::ConfigFile::default()
    }
    .resolve()
    .expect("valid agent config")
}

async fn last_error(agent: &agentd::Agent) -> agentd::AgentError {
    let mut state = agent.state();
    let s = tokio::time::timeout(WAIT, state.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("the agent never failed")
        .expect("state");
    s.last_error.clone().expect("an error")
}

#[tokio::test]
async fn pins_refuse_another_key_and_accept_the_relays_own() {
    init_logging();
    let cert = TestCert::new().expect("certificate");
    let tls = cert.relay_tls();
    let relay = TestRelay::start_with(&["alice"], move |c| c.tls = Some(tls)).await;
    // The operator learns the pin as `agentd pin` does.
    let presented = agentd::tls::probe("127.0.0.1", relay.addr.port(), Some(&cert.cert_file))
        .await
        .expect("probe");
    assert_eq!(presented.trusted, Ok(()));
    let pin = presented.pins[0].to_string();

    // A pin for another key: refused, naming the key that was seen.
    let other = TestCert::new().expect("certificate");
    let other_pin = agentd::tls::pin_of_file(&other.cert_file).expect("pin of a PEM file");
    let (agent, _guard) =
        spawn_agent(tls_agent_config(&relay, &cert.cert_file, &[other_pin.to_string()]));
    let err = last_error(&agent).await;
    println!("pin mismatch                      -> {err}");
    assert_eq!(err, agentd::AgentError::PinMismatch { seen: pin.clone() });
    assert!(relay.relay.tunnel("alice").is_none(), "a pin mismatch must not open a tunnel");
    // It backs off (like a refused token), not a tight loop.
    let state = agent.state().borrow().clone();
    assert!(
        matches!(state.phase, agentd::Phase::BackingOff { .. } | agentd::Phase::Connecting),
        "{state:?}"
    );
    drop(_guard);

    // Both pins (a rollover): the relay's own key is among them.
    let (agent, _guard) =
        spawn_agent(tls_agent_config(&relay, &cert.cert_file, &[other_pin.to_string(), pin]));
    let mut state = agent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected()))
        .await
        .expect("the right pin connects")
        .expect("state");
    println!("pinned key among two pins         -> connected");

    // A certificate for another name: refused before any pin is looked at.
    let wrong = TestCert::for_names(&["relay.example.invalid"]).expect("certificate");
    let tls = wrong.relay_tls();
    let wrong_relay = TestRelay::start_with(&["alice"], move |c| c.tls = Some(tls)).await;
    let (agent, _guard2) = spawn_agent(tls_agent_config(&wrong_relay, &wrong.cert_file, &[]));
    let err = last_error(&agent).await;
    println!("certificate for another name      -> {err}");
    assert!(
        matches!(&err, agentd::AgentError::Tls(why) if why.contains("not valid for name")),
        "{err:?}"
    );
    assert!(wrong_relay.relay.tunnel("alice").is_none());
}

#[tokio::test]
async fn the_relay_reloads_its_certificate_without_dropping_a_tunnel() {
    init_logging();
    let a = TestCert::new().expect("certificate");
    let b = TestCert::new().expect("certificate");
    // The agent trusts both (a CA file with the old and the new).
    let both = a.dir.join("both.pem");
    let mut pem = std::fs::read(&a.cert_file).expect("read");
    pem.extend(std::fs::read(&b.cert_file).expect("read"));
    std::fs::write(&both, pem).expect("write");
    let tls = a.relay_tls();
    let relay = TestRelay::start_with(&["alice"], move |c| c.tls = Some(tls)).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let url = format!("wss://127.0.0.1:{}", relay.addr.port());
    let ca = agentd::tls::client_config(Some(&both), &[]).expect("CA");
    let relay_url = agentd::config::relay_url(&url).expect("url");
    let agent = TestAgent::start_with(&relay, "alice", &upstream.url(), move |c| {
        let target = c.target.as_mut().expect("a relay");
        target.relay = relay_url;
        target.tls = Some(ca);
    })
    .await;
    let session = relay.relay.tunnel("alice").expect("tunnel").session_id().to_owned();
    let port = relay.addr.port();
    let before = agentd::tls::probe("127.0.0.1", port, Some(&both)).await.expect("probe");
    assert_eq!(before.pins[0], agentd::tls::pin_of_file(&a.cert_file).expect("pin"));

    // Replace the files, then reload (what SIGHUP does in relayd).
    std::fs::copy(&b.cert_file, &a.cert_file).expect("copy");
    std::fs::copy(&b.key_file, &a.key_file).expect("copy");
    relay.relay.config().tls.as_ref().expect("tls").reload().expect("reload");
    let after = agentd::tls::probe("127.0.0.1", port, Some(&both)).await.expect("probe");
    assert_eq!(after.pins[0], agentd::tls::pin_of_file(&b.cert_file).expect("pin"));
    // The tunnel on the old certificate is still the same session, serving.
    assert_eq!(relay.relay.tunnel("alice").expect("tunnel").session_id(), session);
    assert!(agent.agent.state().borrow().is_connected());
    let client = agentd::tls::client_config(Some(&both), &[]).expect("CA");
    let resp = tunnel_tests::tls::request(
        &client,
        relay.addr,
        http::Request::get("/api/tunnel/alice/api/tags")
            .header("host", format!("127.0.0.1:{port}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request"),
    )
    .await
    .expect("request through the reloaded relay");
    assert_eq!(resp.status(), 200);

    // A broken file keeps the certificate in use.
    std::fs::write(&a.key_file, "not a key").expect("write");
    assert!(relay.relay.config().tls.as_ref().expect("tls").reload().is_err());
    let still = agentd::tls::probe("127.0.0.1", port, Some(&both)).await.expect("probe");
    assert_eq!(still.pins[0], after.pins[0]);
}

/// Reads a streamed NDJSON body, line by line, into `lines`.
async fn collect_lines(resp: reqwest::Response, lines: Arc<std::sync::Mutex<Vec<Value>>>) {
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let v: Value = serde_json::from_slice(&line).expect("an NDJSON line");
            lines.lock().expect("lines").push(v);
        }
    }
}

#[tokio::test]
async fn rotation_refresh_and_install_during_a_stream_lose_no_token() {
    init_logging();
    let keys = keys();
    // Access tokens live 2 s: the agent must refresh them in-band, several
    // times during one answer.
    let config = relay_config(&keys, "", "access_token_ttl = \"2s\"", "");
    let relay = TestRelay::start_with(&[], move |c| *c = config).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let gate = upstream.gate();
    let first = relay.relay.issue_credential("alice", None).await.expect("credential");
    let state = TempDir::new("agent-state");
    let state_dir = state.0.clone();
    let secret = first.secret.clone();
    let agent = TestAgent::start_with(&relay, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(secret);
        c.state_dir = Some(state_dir);
    })
    .await;
    let tunnel = relay.relay.tunnel("alice").expect("tunnel");
    let opened = tunnel.auth_expires().expect("a credential session expires");
    assert_eq!(tunnel.auth_id().as_deref(), Some(first.id.as_str()));

    let client =
        relay.relay.mint("alice", Role::Client, Duration::from_secs(600), None).expect("mint");
    let n = tunnel_tests::ollama::WORDS.len();
    let resp = reqwest::Client::new()
        .post(relay.tunnel_url("alice", "/api/chat"))
        .bearer_auth(&client.token)
        .json(&json!({ "model": "m", "messages": [{"role": "user", "content": "hi"}] }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = tokio::spawn(collect_lines(resp, lines.clone()));
    let count = || lines.lock().expect("lines").len();

    gate.add_permits(3);
    eventually("3 lines arrived", || count() >= 3).await;
    // Rotation on the live session.
    let rotation = agent.agent.rotate().await.expect("rotation");
    let stored = agentd::credential::path(&state.0);
    assert_eq!(rotation.stored, stored);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&stored).expect("stored").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the credential file is private");
    let new_secret = std::fs::read_to_string(&stored).expect("read").trim().to_owned();
    let p =
        relay.relay.identity().verify(&new_secret).await.expect("the stored credential is valid");
    assert_eq!(p.id.as_deref(), Some(rotation.id.as_str()));
    assert!(relay.relay.identity().is_revoked(&first.id), "the old credential is revoked");
    assert_eq!(tunnel.auth_id().as_deref(), Some(rotation.id.as_str()));

    gate.add_permits(3);
    eventually("6 lines arrived", || count() >= 6).await;
    // Refreshes happen by themselves (2 s tokens, renewed at 80 %).
    eventually("the session was refreshed", || {
        tunnel.auth_expires().is_some_and(|t| t > opened + Duration::from_secs(2))
    })
    .await;

    // Installing a credential given by the operator, in-band.
    let third = relay.relay.issue_credential("alice", None).await.expect("credential");
    let installed = agent.agent.install_token(third.secret.clone()).await.expect("install");
    assert!(installed.in_band);
    assert_eq!(installed.stored.as_deref(), Some(stored.as_path()));
    assert_eq!(tunnel.auth_id().as_deref(), Some(third.id.as_str()));
    // A token the relay refuses changes nothing.
    let refused = agent.agent.install_token("tcred_not-a-real-credential".into()).await;
    assert!(matches!(refused, Err(agentd::InstallError::Refused { code: 401, .. })), "{refused:?}");
    assert_eq!(std::fs::read_to_string(&stored).expect("read").trim(), third.secret);

    gate.add_permits(n + 1);
    tokio::time::timeout(WAIT, reader).await.expect("the answer ends").expect("reader");
    let lines = lines.lock().expect("lines").clone();
    let text: String =
        lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect::<String>();
    assert_eq!(text, tunnel_tests::ollama::WORDS.concat(), "every token, in order");
    assert_eq!(lines.len(), n + 1);
    assert_eq!(lines.last().expect("last")["done"], true);
    // One session throughout.
    assert_eq!(agent.agent.state().borrow().sessions, 1);
    assert_eq!(relay.relay.tunnel("alice").expect("tunnel").session_id(), tunnel.session_id());
    // The rotated-out credential no longer opens a tunnel.
    assert_eq!(relay.agent_handshake(&first.secret).await, 401);
}

#[tokio::test]
async fn an_expired_unrefreshed_session_is_closed_and_a_renewed_one_lives_on() {
    init_logging();
    let keys = keys();
    // A session lasts until its token's exp plus the leeway: a short one.
    let config = relay_config(&keys, "", "leeway = \"1s\"", "");
    let relay = TestRelay::start_with(&[], move |c| *c = config).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");

    // A JWT that lives 3 s, with nothing to renew it from.
    let short = relay.relay.mint("alice", Role::Agent, Duration::from_secs(3), None).expect("mint");
    let agent = TestAgent::start_with(&relay, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(short.token);
        c.reconnect_max_delay = Duration::from_secs(1);
    })
    .await;
    let tunnel = relay.relay.tunnel("alice").expect("tunnel");
    tokio::time::timeout(WAIT, tunnel.closed()).await.expect("the relay closes the session");
    let err = last_error(&agent.agent).await;
    println!("expired session                   -> {err}");
    assert!(err.to_string().contains("4003"), "{err}");
    drop(agent);

    // A JWT renewed through its token file (an identity provider's tooling
    // writes the new one): the session outlives the first token.
    let dir = TempDir::new("jwt");
    let file = dir.path("token");
    let first = relay.relay.mint("bob", Role::Agent, Duration::from_secs(3), None).expect("mint");
    daemon::config::write_secret(&file, &first.token).expect("write");
    let (token, path) = (first.token.clone(), file.clone());
    let agent = TestAgent::start_with(&relay, "bob", &upstream.url(), move |c| {
        c.credential.token = Some(token.clone());
        c.credential.configured = Some(token);
        c.token_file = Some(path);
    })
    .await;
    let tunnel = relay.relay.tunnel("bob").expect("tunnel");
    let fresh = relay.relay.mint("bob", Role::Agent, Duration::from_secs(600), None).expect("mint");
    daemon::config::write_secret(&file, &fresh.token).expect("write");
    eventually("the session was renewed with the file's token", || {
        tunnel.auth_id().as_deref() == Some(fresh.id.as_str())
    })
    .await;
    assert!(tunnel.auth_expires().expect("expiry") > first.expires + Duration::from_secs(60));
    assert_eq!(agent.agent.state().borrow().sessions, 1);
}

#[tokio::test]
async fn revoking_a_credential_ends_its_session_at_once() {
    init_logging();
    let keys = keys();
    let config = relay_config(&keys, "", "", "");
    let relay = TestRelay::start_with(&[], move |c| *c = config).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let credential = relay.relay.issue_credential("alice", None).await.expect("credential");
    let secret = credential.secret.clone();
    let agent = TestAgent::start_with(&relay, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(secret);
        c.reconnect_max_delay = Duration::from_secs(1);
    })
    .await;
    let tunnel = relay.relay.tunnel("alice").expect("tunnel");
    let start = Instant::now();
    let revoked = relay.relay.revoke(&credential.id).await.expect("revoke");
    assert_eq!(revoked, relayd::Revoked { newly: true, sessions_ended: 1 });
    tokio::time::timeout(WAIT, tunnel.closed()).await.expect("the session ends");
    println!("revoked credential's session ended after {:?}", start.elapsed());
    // The agent says so and waits for a new credential instead of
    // knocking with the revoked one.
    let mut state = agent.agent.state();
    let seen = tokio::time::timeout(WAIT, state.wait_for(|s| s.phase == agentd::Phase::Revoked))
        .await
        .expect("the agent stops trying")
        .expect("state")
        .clone();
    assert_eq!(seen.last_error, Some(agentd::AgentError::Revoked));
    assert!(agent.agent.status_line().contains("revoked"), "{}", agent.agent.status_line());
    assert!(relay.relay.tunnel("alice").is_none());
    // A new credential brings it back.
    let fresh = relay.relay.issue_credential("alice", None).await.expect("credential");
    agent.agent.install_token(fresh.secret).await.expect("install");
    relay.wait_for_agent("alice").await;
}

/// A stand-in identity provider: serves `jwks` at `/jwks` and counts the
/// fetches.
async fn identity_provider(
    jwks: Value,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let body = jwks.to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (hits, body) = (counter.clone(), body.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let body = body.clone();
                    async move {
                        http::Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn a_relay_behind_an_identity_provider_serves_a_user_it_was_never_told_of() {
    init_logging();
    let (idp_key, _) = Signer::generate().expect("key");
    let (idp, fetches) = identity_provider(json!({ "keys": [idp_key.public_jwk()] })).await;
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[identity]\nissuer = \"https://idp.test\"\naudience = \"{AUD}\"\njwks_url = \"http://{idp}/jwks\"\njwks_min_interval = \"1s\"\n"
    );
    let config =
        toml::from_str::<relayd::ConfigFile>(&text).expect("parses").resolve().expect("valid");
    let relay = TestRelay::start_with(&[], move |c| *c = config).await;
    let idp_token = |role: &str| {
        let mut c = claims("zed", role, 600);
        c["iss"] = json!("https://idp.test");
        idp_key.sign(&c).expect("sign")
    };
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let agent_token = idp_token("agent");
    let _agent = TestAgent::start_with(&relay, "zed", &upstream.url(), move |c| {
        c.credential.token = Some(agent_token);
    })
    .await;
    let resp = reqwest::Client::new()
        .get(relay.tunnel_url("zed", "/api/tags"))
        .bearer_auth(idp_token("client"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.events.requests(), vec!["GET /api/tags".to_owned()]);
    assert!(fetches.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    // The provider's token for one user opens nothing of another's.
    let resp = reqwest::Client::new()
        .get(relay.tunnel_url("alice", "/api/tags"))
        .bearer_auth(idp_token("client"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn per_user_limits_and_cors_preflights() {
    init_logging();
    let keys = keys();
    let config = relay_config(
        &keys,
        "",
        "",
        "[limits]\nrequests_per_minute = 3\nagent_handshakes_per_minute = 2\n[http]\ncors_origins = [\"https://app.example\"]\n",
    );
    let relay = TestRelay::start_with(&[], move |c| *c = config).await;
    let upstream = StandIn::start(StandInConfig::default()).await.expect("stand-in");
    let credential = relay.relay.issue_credential("alice", None).await.expect("credential");
    let secret = credential.secret.clone();
    let _agent = TestAgent::start_with(&relay, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(secret)
    })
    .await;
    let http = reqwest::Client::new();
    let token = |u: &str| {
        relay.relay.mint(u, Role::Client, Duration::from_secs(600), None).expect("mint").token
    };
    let (alice, bob) = (token("alice"), token("bob"));
    let get =
        |user: &str, t: &str| http.get(relay.tunnel_url(user, "/api/tags")).bearer_auth(t).send();

    // A burst of 3, then 429 with Retry-After; another user is not limited.
    for _ in 0..3 {
        assert_eq!(get("alice", &alice).await.expect("request").status(), 200);
    }
    let limited = get("alice", &alice).await.expect("request");
    assert_eq!(limited.status(), 429);
    let retry: u64 =
        limited.headers()["retry-after"].to_str().expect("ascii").parse().expect("secs");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    println!("4th request in a minute           -> 429, Retry-After {retry}");
    assert_eq!(
        get("bob", &bob).await.expect("request").status(),
        503,
        "bob has no agent, but is not limited"
    );

    // Agent handshakes per user: the agent's own connect was one; one more
    // passes, then 429.
    assert_eq!(relay.agent_handshake(&credential.secret).await, 101);
    assert_eq!(relay.agent_handshake(&credential.secret).await, 429);
    println!("3rd agent handshake in a minute   -> 429");

    // CORS: the relay answers an allowed origin's preflight without a
    // token; another origin gets 403 and no CORS headers.
    let preflight = |origin: &str| {
        http.request(reqwest::Method::OPTIONS, relay.tunnel_url("alice", "/api/chat"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let ok = preflight("https://app.example").await.expect("preflight");
    assert_eq!(ok.status(), 204);
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://app.example");
    assert!(ok.headers()["access-control-allow-methods"].to_str().expect("ascii").contains("POST"));
    let evil = preflight("https://evil.example").await.expect("preflight");
    assert_eq!(evil.status(), 403);
    assert!(evil.headers().get("access-control-allow-origin").is_none());
    println!("preflight: allowed origin -> 204, other origin -> 403");
}
