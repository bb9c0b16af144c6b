//! The relay against an agent that misbehaves on purpose: every refused
//! frame gets an `error` with a code, the session survives single bad
//! frames, and a stream whose agent breaks the rules ends with a clean error
//! for its web client.

use std::time::Duration;

use serde_json::Value;
use tunnel_tests::raw::{RawAgent, Received};
use tunnel_tests::{TestRelay, agent_token, init_logging, read_answer, send_raw};

use tunnel_proto::{Headers, Limits, Message, ResponseHeadMsg};

const T: Duration = Duration::from_secs(10);

async fn relay_and_raw_agent() -> (TestRelay, RawAgent) {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let agent = RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default())
        .await
        .expect("connect");
    relay.wait_for_agent("alice").await;
    (relay, agent)
}

fn expect_error(msg: Message, code: u16, name: &str) {
    match msg {
        Message::Error(e) => {
            assert_eq!(e.code, code, "{e:?}");
            assert!(e.error.starts_with(name), "{e:?}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn welcome_announces_version_limits_and_capabilities() {
    let (_relay, agent) = relay_and_raw_agent().await;
    assert_eq!(agent.welcome.version, tunnel_proto::PROTOCOL_VERSION);
    assert_eq!(agent.welcome.limits, Limits::default());
    assert!(agent.welcome.capabilities.iter().any(|c| c == "flow_control"));
}

#[tokio::test]
async fn bad_frames_get_coded_errors_and_the_session_survives() {
    let (relay, mut agent) = relay_and_raw_agent().await;
    agent.send_text("this is not json").await;
    expect_error(agent.recv_msg(T).await, 400, "malformed_message");
    agent.send_text(r#"{"type":"teleport","id":"x"}"#).await;
    expect_error(agent.recv_msg(T).await, 400, "unknown_type");
    agent.send_binary(bytes::Bytes::from_static(b"\x80\x01a")).await;
    expect_error(agent.recv_msg(T).await, 400, "malformed_frame");
    agent.send_text(r#"{"type":"window_update","id":"req_1","credit":0}"#).await;
    expect_error(agent.recv_msg(T).await, 400, "invalid_credit");
    agent.send(&Message::ping("p1")).await;
    assert!(matches!(agent.recv_msg(T).await, Message::Pong(p) if p.id == "p1"));
    assert_eq!(relay.relay.tunnel_count(), 1);
}

#[tokio::test]
async fn an_invalid_response_head_fails_only_its_stream_with_502() {
    let (relay, mut agent) = relay_and_raw_agent().await;
    let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/api/tags")));
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    assert_eq!(req.path, "/api/tags");
    agent
        .send_text(&format!(
            r#"{{"type":"response_head","id":"{}","status":999,"headers":{{}}}}"#,
            req.id
        ))
        .await;
    // The relay refuses the frame and cancels the stream it named.
    let (mut refused, mut cancelled) = (false, false);
    for _ in 0..2 {
        match agent.recv_msg(T).await {
            Message::Cancel(c) => cancelled = c.id == req.id,
            other => {
                expect_error(other, 502, "invalid_status");
                refused = true;
            }
        }
    }
    assert!(refused && cancelled);
    let resp = client.await.unwrap().expect("response");
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("invalid"), "{v}");
    // The session still serves the next request.
    let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/ok")));
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    let id = tunnel_proto::StreamId::new(req.id).unwrap();
    agent
        .send(&Message::ResponseHead(ResponseHeadMsg::new(
            &id,
            http::StatusCode::OK,
            Headers::default(),
            true,
        )))
        .await;
    agent.send_data(id.as_str(), true, b"fine").await;
    assert_eq!(client.await.unwrap().unwrap().text().await.unwrap(), "fine");
}

#[tokio::test]
async fn an_agent_that_overruns_its_window_loses_the_stream_and_is_cancelled() {
    let (relay, mut agent) = relay_and_raw_agent().await;
    let window = agent.welcome.limits.initial_window as usize;
    let client = tokio::spawn(async move {
        let resp = reqwest::get(relay.tunnel_url("alice", "/big")).await.expect("response");
        // Do not read: the relay must not buffer beyond the window.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (resp.status(), resp.bytes().await.map(|b| b.len()), relay)
    });
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    let id = tunnel_proto::StreamId::new(req.id).unwrap();
    agent
        .send(&Message::ResponseHead(ResponseHeadMsg::new(
            &id,
            http::StatusCode::OK,
            Headers::default(),
            true,
        )))
        .await;
    // Far more than the window plus anything the socket buffers between
    // relay and client could have earned back as credit.
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..512 {
        agent.send_data(id.as_str(), false, &chunk).await;
    }
    let mut saw_error = false;
    let mut saw_cancel = false;
    while !(saw_error && saw_cancel) {
        match agent.recv_msg(T).await {
            Message::Error(e) if e.error.starts_with("flow_control") => saw_error = true,
            Message::Cancel(c) if c.id == id.as_str() => saw_cancel = true,
            Message::WindowUpdate(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let (status, body, relay) = client.await.unwrap();
    assert_eq!(status, 200);
    assert!(body.is_err(), "a cut-off body must not look complete");
    assert!(relay.relay.buffered().peak() <= window);
}

#[tokio::test]
async fn an_agent_error_before_the_head_becomes_the_http_status() {
    let (relay, mut agent) = relay_and_raw_agent().await;
    let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/api/pull")));
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    agent.send(&Message::error(req.id, 403, "endpoint not allowed by the owner's policy")).await;
    let resp = client.await.unwrap().unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "endpoint not allowed by the owner's policy");
}

#[tokio::test]
async fn requests_beyond_the_agents_stream_limit_get_429() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let limits = Limits { max_streams: 2, ..Limits::default() };
    let mut agent =
        RawAgent::connect(&relay.ws_url(), &agent_token("alice"), limits).await.unwrap();
    relay.wait_for_agent("alice").await;
    let held: Vec<_> =
        (0..2).map(|_| tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/slow")))).collect();
    for _ in 0..2 {
        assert!(matches!(agent.recv_msg(T).await, Message::HttpRequest(_)));
    }
    let resp = reqwest::get(relay.tunnel_url("alice", "/one-too-many")).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    drop(held);
    drop(agent);
}

#[tokio::test]
async fn a_silent_agent_gets_504_after_the_first_byte_timeout_and_a_cancel() {
    init_logging();
    let relay =
        TestRelay::start_with(&["alice"], |c| c.first_byte_timeout = Duration::from_millis(300))
            .await;
    let mut agent =
        RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default()).await.unwrap();
    relay.wait_for_agent("alice").await;
    let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/api/chat")));
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    let resp = client.await.unwrap().unwrap();
    assert_eq!(resp.status(), 504);
    match agent.recv_msg(T).await {
        Message::Cancel(c) => assert_eq!(c.id, req.id),
        other => panic!("expected cancel, got {other:?}"),
    }
}

#[tokio::test]
async fn an_agent_without_hello_is_closed_with_a_protocol_error() {
    init_logging();
    let relay =
        TestRelay::start_with(&["alice"], |c| c.hello_timeout = Duration::from_millis(200)).await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            relay.ws_url(),
        )
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", agent_token("alice")).parse().unwrap());
    request
        .headers_mut()
        .insert("sec-websocket-protocol", tunnel_proto::SUBPROTOCOL.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    use futures_util::StreamExt;
    let frame = tokio::time::timeout(T, socket.next()).await.unwrap();
    match frame {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
            assert_eq!(u16::from(f.code), 1002)
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!((relay.relay.tunnel_count() == 0));
}

#[tokio::test]
async fn a_wrong_agent_token_is_refused_with_401() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let err = RawAgent::connect(&relay.ws_url(), "not-the-token-0123456789", Limits::default())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("401"), "{err}");
}

async fn ndjson_head(agent: &mut RawAgent) -> tunnel_proto::StreamId {
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    let id = tunnel_proto::StreamId::new(req.id).expect("relay ids are valid");
    let headers = Headers(vec![("content-type".into(), "application/x-ndjson".into())]);
    agent
        .send(&Message::ResponseHead(ResponseHeadMsg::new(
            &id,
            http::StatusCode::OK,
            headers,
            true,
        )))
        .await;
    id
}

async fn expect_cancel(agent: &mut RawAgent, id: &tunnel_proto::StreamId) -> String {
    loop {
        match agent.recv_msg(T).await {
            Message::Cancel(c) if c.id == id.as_str() => return c.reason,
            Message::WindowUpdate(_) | Message::Ping(_) => {}
            other => panic!("expected cancel, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_stream_that_goes_quiet_is_ended_after_the_idle_timeout() {
    init_logging();
    let relay =
        TestRelay::start_with(&["alice"], |c| c.idle_timeout = Some(Duration::from_millis(200)))
            .await;
    let mut agent =
        RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default()).await.unwrap();
    relay.wait_for_agent("alice").await;
    let url = relay.tunnel_url("alice", "/api/chat");
    let client =
        tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await.unwrap() });
    let id = ndjson_head(&mut agent).await;
    agent.send_data(id.as_str(), false, b"{\"done\":false}\n").await;
    let reason = expect_cancel(&mut agent, &id).await;
    assert!(reason.contains("no data"), "{reason}");
    let body = client.await.unwrap();
    let last = body.lines().last().unwrap();
    assert!(last.starts_with(r#"{"error":"no data from the local service"#), "{body}");
}

#[tokio::test]
async fn a_route_with_a_total_timeout_is_cut_even_while_data_flows() {
    init_logging();
    let relay = TestRelay::start_with(&["alice"], |c| {
        c.route_timeouts.push(relayd::config::RouteTimeouts {
            prefix: "/api/chat".into(),
            timeouts: relayd::config::Timeouts {
                first_byte: Duration::from_secs(5),
                idle: None,
                total: Some(Duration::from_millis(300)),
            },
        })
    })
    .await;
    let mut agent =
        RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default()).await.unwrap();
    relay.wait_for_agent("alice").await;
    let url = relay.tunnel_url("alice", "/api/chat");
    let client =
        tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await.unwrap() });
    let id = ndjson_head(&mut agent).await;
    let feeder = {
        let id = id.clone();
        async move {
            for _ in 0..100 {
                agent.send_data(id.as_str(), false, b"{\"done\":false}\n").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            agent
        }
    };
    let (body, mut agent) = tokio::join!(client, feeder);
    let body = body.unwrap();
    assert!(body.lines().count() < 100, "the total timeout never fired");
    assert!(body.lines().last().unwrap().contains("total timeout"), "{body}");
    let reason = expect_cancel(&mut agent, &id).await;
    assert!(reason.contains("total timeout"), "{reason}");
}

#[tokio::test]
async fn an_agent_that_never_acknowledges_gets_504_and_a_cancel_long_before_the_first_byte_timeout()
{
    init_logging();
    let relay = TestRelay::start_with(&["alice"], |c| {
        c.ack_timeout = Duration::from_millis(200);
        c.first_byte_timeout = Duration::from_secs(300);
    })
    .await;
    let mut agent =
        RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default()).await.unwrap();
    assert!(agent.welcome.capabilities.iter().any(|c| c == "ack"));
    relay.wait_for_agent("alice").await;
    let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/api/tags")));
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    let resp = tokio::time::timeout(T, client).await.expect("answered").unwrap().unwrap();
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("did not acknowledge"), "{body}");
    match agent.recv_msg(T).await {
        Message::Cancel(c) => assert_eq!(c.id, req.id),
        other => panic!("expected cancel, got {other:?}"),
    }
}

#[tokio::test]
async fn an_acknowledged_request_may_wait_past_the_ack_timeout_for_its_head() {
    init_logging();
    let ack_timeout = relayd::config::ACK_FLOOR;
    let relay = TestRelay::start_with(&["alice"], |c| c.ack_timeout = ack_timeout).await;
    let mut agent =
        RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default()).await.unwrap();
    relay.wait_for_agent("alice").await;
    let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/api/tags")));
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    agent.send(&Message::ack(req.id.as_str())).await;
    // A model loading: the head comes well after the acknowledgement timer
    // would have fired.
    tokio::time::sleep(ack_timeout + ack_timeout / 2).await;
    agent
        .send(&Message::HttpResponse(tunnel_proto::HttpResponseMsg {
            id: req.id,
            status: 200,
            headers: Headers::default(),
            body: Some("{\"models\":[]}".into()),
        }))
        .await;
    let resp = tokio::time::timeout(T, client).await.expect("answered").unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{\"models\":[]}");
}

/// Reads what the relay sends for one request: the `http_request` and the
/// body frames up to the one with the end flag.
async fn request_and_body(
    agent: &mut RawAgent,
) -> (tunnel_proto::HttpRequestMsg, Vec<(bool, usize)>) {
    let Message::HttpRequest(req) = agent.recv_msg(T).await else { panic!("expected a request") };
    let mut frames = Vec::new();
    loop {
        match agent.recv(T).await {
            Received::Data(d) => {
                assert_eq!(d.id, req.id);
                frames.push((d.end, d.payload.len()));
                if d.end {
                    return (req, frames);
                }
            }
            Received::Msg(Message::WindowUpdate(_) | Message::Ping(_)) => continue,
            other => panic!("expected body frames, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_small_body_arriving_in_pieces_follows_its_request_as_one_final_frame() {
    let (relay, mut agent) = relay_and_raw_agent().await;
    // The client sends the head and half the body, pauses, sends the rest.
    let mut conn = send_raw(
        relay.addr,
        b"POST /api/tunnel/alice/api/chat HTTP/1.1\r\nhost: x\r\ncontent-length: 26\r\n\r\nabcdefghijklm",
    )
    .await;
    let (mut req, mut frames) = (None, None);
    let read = async {
        let got = request_and_body(&mut agent).await;
        req = Some(got.0);
        frames = Some(got.1);
    };
    let write = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        tokio::io::AsyncWriteExt::write_all(&mut conn, b"nopqrstuvwxyz").await.unwrap();
    };
    tokio::join!(read, write);
    let req = req.expect("request");
    assert!(req.body_follows);
    assert_eq!(frames, Some(vec![(true, 26)]), "the whole body in one final frame");
}

#[tokio::test]
async fn a_body_larger_than_a_chunk_is_streamed_in_chunks() {
    let (relay, mut agent) = relay_and_raw_agent().await;
    let chunk = agent.welcome.limits.max_chunk_bytes as usize;
    let size = chunk * 2 + 10;
    let body = vec![7u8; size];
    let url = relay.tunnel_url("alice", "/api/blobs/x");
    let client =
        tokio::spawn(async move { reqwest::Client::new().post(url).body(body).send().await });
    let (req, frames) = request_and_body(&mut agent).await;
    assert!(req.body_follows);
    assert!(frames.len() >= 3, "{frames:?}");
    assert!(frames.iter().all(|(_, n)| *n <= chunk), "{frames:?}");
    assert_eq!(frames.iter().map(|(_, n)| n).sum::<usize>(), size);
    client.abort();
}

#[tokio::test]
async fn the_total_timeout_bounds_a_small_body_that_never_completes() {
    init_logging();
    let relay = TestRelay::start_with(&["alice"], |c| {
        c.idle_timeout = None;
        c.total_timeout = Some(Duration::from_millis(300));
    })
    .await;
    let mut agent = RawAgent::connect(&relay.ws_url(), &agent_token("alice"), Limits::default())
        .await
        .expect("connect");
    relay.wait_for_agent("alice").await;
    let mut conn = send_raw(
        relay.addr,
        b"POST /api/tunnel/alice/api/chat HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789",
    )
    .await;
    let head = read_answer(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(head.contains("total timeout"), "{head}");
    // The request never reached the agent.
    agent.send(&Message::ping("after")).await;
    assert!(matches!(agent.recv_msg(T).await, Message::Pong(p) if p.id == "after"));
}

#[tokio::test]
async fn a_connection_that_sends_no_headers_is_closed_after_the_header_timeout() {
    init_logging();
    let relay = TestRelay::start_with(&["alice"], |c| {
        c.header_read_timeout = Duration::from_millis(200);
    })
    .await;
    let mut conn = send_raw(relay.addr, b"GET /healthz HTTP/1.1\r\nhost:").await;
    let mut answer = Vec::new();
    // Closed (possibly with a 408) instead of held open.
    tokio::time::timeout(T, tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut answer))
        .await
        .expect("the silent connection was never closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
}
