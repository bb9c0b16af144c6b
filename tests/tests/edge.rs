//! The relay's HTTP edge against hostile and careless peers: handshake
//! floods, forged and credential-bearing headers, answers that would act on
//! the relay's origin, methods and heads the tunnel cannot carry, clients
//! that stop reading, agents that break the rules or flood a session, and
//! upstream bodies cut short. Each test is named after the behaviour it
//! proves.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tunnel_tests::ollama::{HOSTILE_PAGE, pattern};
use tunnel_tests::raw::RawAgent;
use tunnel_tests::{
    StandIn, StandInConfig, TestAgent, TestRelay, WAIT, agent_token, init_logging, read_answer,
    read_until_closed, send_raw, send_raw_from,
};

use tunnel_proto::{Headers, Limits, Message, ResponseHeadMsg};

const T: Duration = Duration::from_secs(10);

fn fast() -> StandInConfig {
    StandInConfig { token_delay: Duration::ZERO, ..StandInConfig::default() }
}

async fn relay_agent_standin(
    tweak: impl FnOnce(&mut relayd::Config),
) -> (TestRelay, TestAgent, StandIn) {
    init_logging();
    let standin = StandIn::start(fast()).await.expect("stand-in");
    let relay = TestRelay::start_with(&["alice"], tweak).await;
    let agent = TestAgent::start(&relay, "alice", &standin.url()).await;
    (relay, agent, standin)
}

/// The status code of a raw HTTP answer.
fn status_of(answer: &str) -> Option<u16> {
    answer.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Header `name` of a raw HTTP answer.
fn header_of<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An agent handshake as the adversarial review sent it, with `extra`
/// header lines.
fn upgrade(extra: &str) -> String {
    format!(
        "GET /ws/tunnel HTTP/1.1\r\nHost: R\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: llm-tunnel.v1\r\n{extra}\r\n"
    )
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[tokio::test]
async fn an_unauthenticated_handshake_flood_does_not_lock_out_a_reconnecting_agent() {
    let (relay, agent, _standin) = relay_agent_standin(|_| {}).await;
    let first = relay.wait_for_agent("alice").await;

    // Eight flooders on 127.0.0.2, each writing the handshake 500 times per
    // write and reconnecting whenever the relay closes its connection.
    let flood: Vec<u8> = upgrade("").repeat(500).into_bytes();
    let stop = CancellationToken::new();
    let tally: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let (connections, started) =
        (Arc::new(Mutex::new(0usize)), Arc::new(tokio::sync::Notify::new()));
    let mut flooders = Vec::new();
    for _ in 0..8 {
        let (flood, stop, tally, connections, started) =
            (flood.clone(), stop.clone(), tally.clone(), connections.clone(), started.clone());
        let addr = relay.addr;
        flooders.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let Ok(conn) = send_raw_from(loopback(2), addr, b"").await else { continue };
                *connections.lock().expect("lock") += 1;
                let (mut rd, mut wr) = conn.into_split();
                // Writes the handshake 500 times per write for as long as
                // the relay keeps the connection open...
                let writer = {
                    let (flood, stop) = (flood.clone(), stop.clone());
                    tokio::spawn(async move {
                        while !stop.is_cancelled() {
                            if tokio::io::AsyncWriteExt::write_all(&mut wr, &flood).await.is_err() {
                                return;
                            }
                        }
                    })
                };
                // ...and reads what comes until it closes (or resets) it.
                let mut answer = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = tokio::select! {
                        r = tokio::io::AsyncReadExt::read(&mut rd, &mut buf) => r.unwrap_or(0),
                        _ = stop.cancelled() => 0,
                    };
                    if n == 0 {
                        break;
                    }
                    answer.extend_from_slice(&buf[..n]);
                    started.notify_one();
                }
                writer.abort();
                let answer = String::from_utf8_lossy(&answer);
                let mut t = tally.lock().expect("lock");
                for status in
                    answer.match_indices("HTTP/1.1 ").filter_map(|(i, _)| status_of(&answer[i..]))
                {
                    *t.entry(status).or_default() += 1;
                }
            }
        }));
    }
    tokio::time::timeout(WAIT, started.notified()).await.expect("the flood never got an answer");

    // The agent loses its session mid-flood and comes back within its
    // normal backoff (the first retry waits at most 1 s).
    first.disconnect();
    let back = tokio::time::timeout(
        WAIT,
        relay.relay.wait_until(|r| {
            r.tunnel("alice").is_some_and(|t| t.session_id() != first.session_id())
        }),
    )
    .await;
    assert!(back.is_ok(), "the agent could not reconnect during the flood");
    assert!(!flooders.iter().any(|f| f.is_finished()), "the flood must still be running");

    // A handshake with a valid token from another address is upgraded.
    let token = format!("Authorization: Bearer {}\r\n", agent_token("alice"));
    let mut valid = send_raw(relay.addr, upgrade(&token).as_bytes()).await;
    let answer = read_answer(&mut valid).await;
    assert_eq!(status_of(&answer), Some(101), "{answer}");

    stop.cancel();
    for f in flooders {
        f.await.expect("flooder");
    }
    let tally = tally.lock().expect("lock").clone();
    let connections = *connections.lock().expect("lock");
    let answers: usize = tally.values().sum();
    println!("flood: {connections} connections, answers by status {tally:?}");
    // One refused attempt per connection: the relay closes after answering.
    assert!(answers <= connections, "{answers} answers on {connections} connections");
    // The source's budget of refused attempts, then 429; never the agents'
    // allowance (no 503).
    assert!(tally.get(&401).copied().unwrap_or(0) <= 20, "{tally:?}");
    assert!(tally.get(&429).copied().unwrap_or(0) > 0, "{tally:?}");
    assert_eq!(tally.get(&503), None, "{tally:?}");
    drop(agent);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_address_has_its_own_refusal_budget() {
    let bad = "Authorization: Bearer not-a-token-of-anyone\r\n";
    let good = format!("Authorization: Bearer {}\r\n", agent_token("alice"));
    let attempt = |relay: &TestRelay, auth: &str, xff: &str| {
        let request = upgrade(&format!("{auth}X-Forwarded-For: {xff}\r\n"));
        let addr = relay.addr;
        async move {
            let mut conn = send_raw(addr, request.as_bytes()).await;
            status_of(&read_answer(&mut conn).await)
        }
    };
    init_logging();
    let relay = TestRelay::start_with(&["alice"], |c| {
        c.trusted_proxies =
            relayd::admission::TrustedProxies(vec!["127.0.0.1".parse().expect("cidr")]);
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..21 {
        statuses.push(attempt(&relay, bad, "198.51.100.7").await);
    }
    assert_eq!(statuses[..20], [Some(401); 20]);
    assert_eq!(statuses[20], Some(429), "the 21st refused attempt from one address");
    // Another client behind the same proxy is not limited with it.
    assert_eq!(attempt(&relay, &good, "198.51.100.8").await, Some(101));
    // The blocked address is refused before its credential is looked at.
    assert_eq!(attempt(&relay, &good, "198.51.100.7").await, Some(429));

    // Without trust, the header is ignored: everyone is the proxy's address.
    let untrusting = TestRelay::start(&["alice"]).await;
    for _ in 0..20 {
        attempt(&untrusting, bad, "198.51.100.7").await;
    }
    assert_eq!(attempt(&untrusting, &good, "198.51.100.8").await, Some(429));
}

#[tokio::test]
async fn web_client_cookies_stay_at_the_relay_unless_the_operator_forwards_them() {
    for forward in [false, true] {
        let (relay, _agent, _standin) = relay_agent_standin(|c| c.forward_cookies = forward).await;
        let v: Value = reqwest::Client::new()
            .get(relay.tunnel_url("alice", "/headers"))
            .header("cookie", "relay_session=secret")
            .header("x-kept", "yes")
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        assert_eq!(v["headers"]["x-kept"], "yes");
        let cookie = v["headers"].get("cookie");
        if forward {
            assert_eq!(cookie, Some(&Value::from("relay_session=secret")));
        } else {
            assert_eq!(cookie, None, "{v}");
        }
    }
}

#[tokio::test]
async fn a_desktops_page_cannot_set_cookies_or_run_script_on_the_relays_origin() {
    let (relay, _agent, _standin) = relay_agent_standin(|_| {}).await;
    let resp = reqwest::get(relay.tunnel_url("alice", "/page")).await.expect("request");
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h.get_all("set-cookie").iter().count(), 0, "{h:?}");
    for gone in ["strict-transport-security", "clear-site-data", "access-control-allow-origin"] {
        assert!(h.get(gone).is_none(), "{gone} reached the client: {h:?}");
    }
    let csp = h["content-security-policy"].to_str().expect("ascii");
    assert!(csp.starts_with("sandbox;") && csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-desktop"], "kept");
    assert_eq!(resp.text().await.expect("body"), HOSTILE_PAGE);
    // API answers are unchanged for API clients.
    let tags: Value = reqwest::get(relay.tunnel_url("alice", "/api/tags"))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert!(tags["models"].is_array());
}

#[tokio::test]
async fn connect_trace_and_unknown_methods_are_refused_at_the_relay() {
    let (relay, _agent, standin) = relay_agent_standin(|_| {}).await;
    for (method, status) in [("CONNECT", 405), ("TRACE", 405), ("PROPFIND", 501)] {
        let request = format!("{method} /api/tunnel/alice/api/tags HTTP/1.1\r\nHost: r\r\n\r\n");
        let mut conn = send_raw(relay.addr, request.as_bytes()).await;
        let answer = read_answer(&mut conn).await;
        assert_eq!(status_of(&answer), Some(status), "{method}: {answer}");
        let allow = header_of(&answer, "allow").expect("an Allow header");
        assert!(allow.contains("GET") && !allow.contains(method), "{allow}");
    }
    let mut conn =
        send_raw(relay.addr, b"CONNECT 127.0.0.1:11434 HTTP/1.1\r\nHost: 127.0.0.1:11434\r\n\r\n")
            .await;
    assert_eq!(status_of(&read_answer(&mut conn).await), Some(405));
    assert_eq!(standin.events.requests(), Vec::<String>::new());

    // A method the operator lists is carried.
    let (relay, _agent, standin) =
        relay_agent_standin(|c| c.extra_methods = vec!["PROPFIND".into()]).await;
    let request = "PROPFIND /api/tunnel/alice/dav HTTP/1.1\r\nHost: r\r\n\r\n";
    let mut conn = send_raw(relay.addr, request.as_bytes()).await;
    assert_eq!(status_of(&read_answer(&mut conn).await), Some(404), "the stand-in's own 404");
    assert_eq!(standin.events.requests(), ["PROPFIND /dav"]);
}

#[tokio::test]
async fn a_duplicate_response_head_ends_the_stream_and_nothing_after_it_reaches_the_client() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let mut agent = RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default())
        .await
        .expect("connect");
    relay.wait_for_agent("alice").await;
    for ndjson in [true, false] {
        let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/api/chat")));
        let Message::HttpRequest(req) = agent.recv_msg(T).await else {
            panic!("expected a request")
        };
        let id = tunnel_proto::StreamId::new(req.id.clone()).expect("id");
        let ct = if ndjson { "application/x-ndjson" } else { "application/octet-stream" };
        let headers = Headers(vec![("content-type".into(), ct.into())]);
        let head = ResponseHeadMsg::new(&id, http::StatusCode::OK, headers, true);
        agent.send(&Message::ResponseHead(head.clone())).await;
        agent.send_data(&req.id, false, b"{\"n\":0}\n").await;
        agent.send(&Message::ResponseHead(head)).await;
        agent.send_data(&req.id, true, b"after the second head\n").await;
        let (mut refused, mut cancelled) = (false, false);
        while !(refused && cancelled) {
            match agent.recv_msg(T).await {
                Message::Error(e) if e.error.starts_with("stream_state") => refused = true,
                Message::Cancel(c) if c.id == req.id => cancelled = true,
                other => panic!("unexpected {other:?}"),
            }
        }
        let resp = client.await.expect("task").expect("head");
        assert_eq!(resp.status(), 200);
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        let mut failed = false;
        while let Some(chunk) =
            tokio::time::timeout(WAIT, stream.next()).await.expect("body stalled")
        {
            match chunk {
                Ok(c) => body.extend_from_slice(&c),
                Err(_) => failed = true,
            }
        }
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("after the second head"), "{text}");
        assert!(text.starts_with("{\"n\":0}\n"), "{text}");
        if ndjson {
            let last = text.lines().last().expect("a last line");
            let v: Value = serde_json::from_str(last).expect("json error line");
            assert!(v["error"].as_str().expect("text").contains("second head"), "{v}");
        } else {
            assert!(failed, "a cut stream must not look complete: {text}");
        }
    }
}

/// A raw request to `alice`'s `/headers` with `n` header fields in all.
fn request_with_fields(n: usize) -> String {
    let mut r = "GET /api/tunnel/alice/headers HTTP/1.1\r\nHost: r\r\n".to_owned();
    for i in 1..n {
        r.push_str(&format!("x-h-{i}: v\r\n"));
    }
    r + "\r\n"
}

#[tokio::test]
async fn the_header_field_limit_is_exact_at_its_edge_and_configurable() {
    // The default (hyper's own, told nothing), one above it, one below; the
    // same at both ends (the relay refuses what its agent would).
    for limit in [100usize, 128, 16] {
        init_logging();
        let _standin = StandIn::start(fast()).await.expect("stand-in");
        let relay =
            TestRelay::start_with(&["alice"], |c| c.limits.max_headers = limit as u32).await;
        let _agent = TestAgent::start_with(&relay, "alice", &_standin.url(), |c| {
            c.limits.max_headers = limit as u32
        })
        .await;
        let mut conn = send_raw(relay.addr, request_with_fields(limit).as_bytes()).await;
        let answer = read_until_closed_or_answer(&mut conn).await;
        assert_eq!(status_of(&answer), Some(200), "{limit} fields: {answer}");
        let body = answer.split("\r\n\r\n").nth(1).expect("a body");
        let v: Value = serde_json::from_str(body.trim()).expect("json");
        assert!(v["headers"].get(format!("x-h-{}", limit - 1)).is_some(), "{v}");
        let mut conn = send_raw(relay.addr, request_with_fields(limit + 1).as_bytes()).await;
        let answer = read_answer(&mut conn).await;
        assert_eq!(status_of(&answer), Some(431), "{} fields: {answer}", limit + 1);
    }
}

#[tokio::test]
async fn a_response_head_within_the_field_limit_crosses_the_tunnel() {
    let (relay, _agent, _standin) = relay_agent_standin(|_| {}).await;
    // 95 fields of the local service plus its own: within the tunnel's
    // default of 100, which both hyper ends parse without being told.
    // (Read raw: reqwest itself stops at 100 fields.)
    let request = "GET /api/tunnel/alice/many-headers?n=95 HTTP/1.1\r\nHost: r\r\n\r\n";
    let mut conn = send_raw(relay.addr, request.as_bytes()).await;
    let answer = read_until_closed_or_answer(&mut conn).await;
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    assert_eq!(header_of(&answer, "x-many-94"), Some("v"));
}

/// Reads one whole answer with a `Content-Length` (the relay keeps the
/// connection open after it).
async fn read_until_closed_or_answer(conn: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(conn, &mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        if n == 0 {
            return text;
        }
        if let Some((head, body)) = text.split_once("\r\n\r\n")
            && let Some(len) = header_of(&format!("{head}\r\n\r\n"), "content-length")
                .and_then(|l| l.parse::<usize>().ok())
            && body.len() >= len
        {
            return text;
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cancelled_at_the_agent_after_the_idle_timeout() {
    let (relay, _agent, standin) =
        relay_agent_standin(|c| c.idle_timeout = Some(Duration::from_millis(500))).await;
    let session = relay.wait_for_agent("alice").await;
    // Asks for 4 GiB and reads only the first bytes of the answer.
    let request = "GET /api/tunnel/alice/zeros?n=4294967296 HTTP/1.1\r\nHost: r\r\n\r\n";
    let mut conn = send_raw(relay.addr, request.as_bytes()).await;
    let answer = read_answer(&mut conn).await;
    assert_eq!(status_of(&answer), Some(200));
    // The stalled write to this client cancels the stream at the agent,
    // which drops its request to the local service.
    let gone =
        standin.events.wait_disconnects(1, WAIT).await.expect("the stream was never cancelled");
    assert_eq!(gone[0].path, "/zeros");
    assert_eq!(session.in_flight(), 0, "the slot is free again");
    drop(conn);
}

#[tokio::test]
async fn forged_forwarding_headers_reach_the_local_service_only_from_a_trusted_proxy() {
    let forged = [
        ("x-forwarded-for", "203.0.113.1"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=203.0.113.1"),
        ("x-real-ip", "203.0.113.1"),
    ];
    for trusted in [false, true] {
        let (relay, _agent, _standin) = relay_agent_standin(|c| {
            if trusted {
                c.trusted_proxies =
                    relayd::admission::TrustedProxies(vec!["127.0.0.0/8".parse().expect("cidr")]);
            }
        })
        .await;
        let mut req = reqwest::Client::new().get(relay.tunnel_url("alice", "/headers"));
        for (name, value) in forged {
            req = req.header(name, value);
        }
        let v: Value = req.send().await.expect("request").json().await.expect("json");
        for (name, value) in forged {
            let seen = v["headers"].get(name);
            if trusted {
                assert_eq!(seen, Some(&Value::from(value)), "{name}: {v}");
            } else {
                assert_eq!(seen, None, "{name} reached the local service: {v}");
            }
        }
    }
}

#[tokio::test]
async fn a_request_without_exactly_one_host_is_refused_with_400() {
    let (relay, _agent, standin) = relay_agent_standin(|_| {}).await;
    for request in [
        "GET /api/tunnel/alice/api/tags HTTP/1.1\r\n\r\n",
        "GET /api/tunnel/alice/api/tags HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /healthz HTTP/1.1\r\n\r\n",
    ] {
        let mut conn = send_raw(relay.addr, request.as_bytes()).await;
        let answer = read_answer(&mut conn).await;
        assert_eq!(status_of(&answer), Some(400), "{request:?}: {answer}");
    }
    assert_eq!(standin.events.requests(), Vec::<String>::new());
    // HTTP/1.0 has no Host requirement.
    let mut conn = send_raw(relay.addr, b"GET /api/tunnel/alice/api/tags HTTP/1.0\r\n\r\n").await;
    let answer = read_until_closed(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn invalid_utf8_closes_the_session_with_1007_and_oversized_messages_with_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let (url, token) = (relay.ws_url(), agent_token("alice"));
    let connect = || RawAgent::connect(&url, &token, Limits::default());
    let mut agent = connect().await.expect("connect");
    agent
        .send_frame(Frame::message(
            &b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}"[..],
            OpCode::Data(Data::Text),
            true,
        ))
        .await
        .expect("send");
    assert_eq!(agent.closed(T).await, Some(1007));

    let mut agent = connect().await.expect("connect");
    let limits = relay.relay.config().limits;
    let too_big = vec![0u8; limits.max_control_bytes.max(limits.max_chunk_bytes + 66) as usize + 1];
    let _ = agent.send_frame(Frame::message(too_big, OpCode::Data(Data::Binary), true)).await;
    assert_eq!(agent.closed(T).await, Some(1009));
}

/// Sends `count` text frames made by `frame(i)` without reading a reply
/// (stopping when the relay closed), and returns the close code.
async fn flood(count: usize, frame: impl Fn(usize) -> String) -> Option<u16> {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let mut agent = RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default())
        .await
        .expect("connect");
    for i in 0..count {
        if agent.try_send_text(&frame(i)).await.is_err() {
            break;
        }
    }
    let code = agent.closed(T).await;
    tokio::time::timeout(WAIT, relay.relay.wait_until(|r| r.tunnel_count() == 0))
        .await
        .expect("the session left the hub");
    code
}

#[tokio::test]
async fn a_ping_flood_closes_the_session_with_a_policy_violation() {
    assert_eq!(flood(5000, |i| Message::ping(format!("p{i}")).encode()).await, Some(1008));
}

#[tokio::test]
async fn a_flood_of_invalid_frames_closes_the_session_with_a_policy_violation() {
    assert_eq!(flood(10_000, |_| "not json".to_owned()).await, Some(1008));
}

#[tokio::test]
async fn a_flood_of_session_error_reports_closes_the_session_instead_of_flooding_the_log() {
    let report = Message::error("", 400, "malformed_message: you sent garbage").encode();
    assert_eq!(flood(10_000, |_| report.clone()).await, Some(1008));
}

#[tokio::test]
async fn a_truncated_upstream_body_delivers_what_arrived_then_ends_with_an_error() {
    let (relay, _agent, _standin) = relay_agent_standin(|_| {}).await;
    // NDJSON: the lines that arrived, then an error line, then a clean end.
    let resp = reqwest::get(relay.tunnel_url("alice", "/truncated?n=1000&send=60&ndjson=1"))
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none(), "token streams go out chunked");
    let text = resp.text().await.expect("a clean end");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    for (i, line) in lines[..lines.len() - 1].iter().enumerate() {
        assert_eq!(*line, format!("{{\"n\":{i}}}"));
    }
    let v: Value = serde_json::from_str(lines[lines.len() - 1]).expect("error line");
    assert_eq!(v["error"], "the local service failed mid-response");

    // Bytes with a declared length: what arrived, then a cut.
    let resp = reqwest::get(relay.tunnel_url("alice", "/truncated?n=100000&send=50000"))
        .await
        .expect("request");
    assert_eq!(resp.headers()["content-length"], "100000");
    let mut stream = resp.bytes_stream();
    let (mut got, mut failed) = (Vec::new(), false);
    while let Some(chunk) = tokio::time::timeout(WAIT, stream.next()).await.expect("body stalled") {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(_) => failed = true,
        }
    }
    assert!(failed, "a short body must not look complete");
    assert_eq!(got.len(), 50000);
    assert!(got == pattern(0, 50000), "the bytes that arrived, unchanged");
}

#[tokio::test]
async fn a_failed_event_stream_ends_with_an_error_event_the_openai_sdk_raises() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let mut agent = RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default())
        .await
        .expect("connect");
    relay.wait_for_agent("alice").await;
    let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/v1/chat/completions")));
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    let id = tunnel_proto::StreamId::new(req.id.clone()).expect("id");
    let headers = Headers(vec![("content-type".into(), "text/event-stream".into())]);
    agent
        .send(&Message::ResponseHead(ResponseHeadMsg::new(
            &id,
            http::StatusCode::OK,
            headers,
            true,
        )))
        .await;
    agent.send_data(&req.id, false, b"data: {\"choices\":[]}\n\n").await;
    agent
        .send(&Message::error(req.id.as_str(), 502, "the local service failed mid-response"))
        .await;
    let text = client.await.expect("task").expect("head").text().await.expect("a clean end");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events[0], "data: {\"choices\":[]}");
    let last: Value =
        serde_json::from_str(events[1].strip_prefix("data: ").expect("data event")).expect("json");
    assert_eq!(last["error"]["message"], "the local service failed mid-response");
    assert_eq!(last["error"]["code"], "upstream_failed");
}

#[tokio::test]
async fn errors_on_v1_paths_are_openai_error_objects_and_do_not_invite_retries() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let resp = reqwest::Client::new()
        .post(relay.tunnel_url("alice", "/v1/chat/completions"))
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(resp.headers()["retry-after"], "5");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["code"], "agent_not_connected");
    assert!(v["error"]["message"].as_str().expect("text").contains("not connected"), "{v}");
    // Ollama's paths keep Ollama's shape.
    let v: Value = reqwest::get(relay.tunnel_url("alice", "/api/tags"))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert!(v["error"].is_string(), "{v}");
}

#[tokio::test]
async fn a_missing_token_and_a_wrong_token_get_different_401s() {
    init_logging();
    let relay = TestRelay::start_with(&["alice"], |c| {
        c.users[0].client_token = Some("client-token-alice-0123456789".into());
        c.users[0].public = false;
    })
    .await;
    let http = reqwest::Client::new();
    let missing = http.get(relay.tunnel_url("alice", "/v1/models")).send().await.expect("request");
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer realm=\"relayd\"");
    let missing: Value = missing.json().await.expect("json");
    assert_eq!(missing["error"]["code"], "missing_token");
    let wrong = http
        .get(relay.tunnel_url("alice", "/v1/models"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers()["www-authenticate"].to_str().expect("ascii").contains("invalid_token"));
    let wrong: Value = wrong.json().await.expect("json");
    assert_eq!(wrong["error"]["code"], "invalid_token");
    assert_ne!(missing["error"]["message"], wrong["error"]["message"]);
}

#[tokio::test]
async fn a_502_does_not_reveal_the_desktops_addresses_or_library_errors() {
    init_logging();
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let relay = TestRelay::start(&["alice"]).await;
    let _agent = TestAgent::start(&relay, "alice", &format!("http://{dead}")).await;
    for path in ["/api/tags", "/v1/models"] {
        let resp = reqwest::get(relay.tunnel_url("alice", path)).await.expect("request");
        assert_eq!(resp.status(), 502);
        let text = resp.text().await.expect("body");
        assert!(!text.contains(&dead.port().to_string()), "{text}");
        assert!(!text.contains("127.0.0.1") && !text.contains("tcp connect error"), "{text}");
        assert!(text.contains("unreachable"), "{text}");
    }
}
