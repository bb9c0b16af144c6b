//! End-to-end tests: web client -> relayd -> agentd -> stand-in Ollama, all
//! in-process on 127.0.0.1 with OS-picked ports.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tunnel_tests::legacy::LegacyAgent;
use tunnel_tests::ollama::{UTF8_TEXT, pattern, pattern_byte};
use tunnel_tests::{
    StandIn, StandInConfig, TestAgent, TestRelay, WAIT, agent_token, init_logging, read_answer,
    rss_kib, send_raw,
};

/// Relay, agent for "alice" and a stand-in, wired together.
struct Setup {
    relay: TestRelay,
    agent: TestAgent,
    standin: StandIn,
    http: reqwest::Client,
}

async fn setup(config: StandInConfig) -> Setup {
    init_logging();
    let standin = StandIn::start(config).await.expect("stand-in");
    let relay = TestRelay::start(&["alice", "bob"]).await;
    let agent = TestAgent::start(&relay, "alice", &standin.url()).await;
    Setup { relay, agent, standin, http: reqwest::Client::new() }
}

fn fast() -> StandInConfig {
    StandInConfig { token_delay: Duration::ZERO, ..StandInConfig::default() }
}

/// Reads a streamed body and splits it into lines as they arrive, with the
/// time each line completed.
async fn read_lines(resp: reqwest::Response) -> Vec<(Instant, String)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(WAIT, stream.next()).await.expect("body stalled") {
        buf.extend_from_slice(&chunk.expect("body chunk"));
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            out.push((
                Instant::now(),
                String::from_utf8(line).expect("utf-8 line").trim_end().to_owned(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn streaming_chat_delivers_each_token_line_before_the_next_is_generated() {
    let s = setup(StandInConfig::default()).await;
    let gate = s.standin.gate();
    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }], "options": { "num_predict": 8 } }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    // The stand-in may produce token i only after the client has read line
    // i-1: if anything on the path buffered lines, this would deadlock.
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..8 {
        gate.add_permits(1);
        loop {
            if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let v: Value = serde_json::from_slice(&line).expect("json line");
                assert_eq!(v["done"], false, "line {i}");
                tokens.push(v["message"]["content"].as_str().expect("content").to_owned());
                break;
            }
            let chunk = tokio::time::timeout(WAIT, stream.next())
                .await
                .unwrap_or_else(|_| panic!("token {i} was held back by the tunnel"))
                .expect("stream ended early")
                .expect("chunk");
            buf.extend_from_slice(&chunk);
        }
    }
    assert_eq!(tokens.concat(), tunnel_tests::ollama::WORDS[..8].concat());
    let rest: Vec<u8> = {
        let mut rest = buf;
        while let Some(c) = stream.next().await {
            rest.extend_from_slice(&c.expect("chunk"));
        }
        rest
    };
    let last: Value = serde_json::from_slice(&rest).expect("final line");
    assert_eq!(last["done"], true);
}

#[tokio::test]
async fn streaming_chat_keeps_the_backends_token_pace() {
    let delay = Duration::from_millis(25);
    let s = setup(StandInConfig { token_delay: delay, ..StandInConfig::default() }).await;
    let start = Instant::now();
    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/api/generate"))
        .json(&json!({ "model": "m", "prompt": "hi", "options": { "num_predict": 20 } }))
        .send()
        .await
        .expect("request");
    let lines = read_lines(resp).await;
    assert_eq!(lines.len(), 21);
    let arrivals: Vec<f64> =
        lines.iter().map(|(t, _)| t.duration_since(start).as_secs_f64() * 1e3).collect();
    let gaps: Vec<f64> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    println!("token delay {delay:?}; arrival of each line (ms): {arrivals:.1?}");
    println!("gaps between lines (ms): {gaps:.1?}");
    // Lines arrive spread over the generation, not in one burst at the end:
    // the first arrives before the last token was even generated.
    let generation = delay * 20;
    assert!(
        lines[0].0.duration_since(start) < generation,
        "first line only arrived after the whole generation"
    );
}

#[tokio::test]
async fn non_streaming_chat_returns_one_json_document() {
    let s = setup(fast()).await;
    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "stream": false, "messages": [], "options": { "num_predict": 5 } }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["done"], true);
    assert_eq!(v["message"]["content"], tunnel_tests::ollama::WORDS[..5].concat());
}

#[tokio::test]
async fn openai_sse_streams_events_and_ends_with_done() {
    let s = setup(fast()).await;
    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/v1/chat/completions"))
        .json(&json!({ "model": "m", "stream": true, "messages": [], "max_tokens": 4 }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let text = resp.text().await.expect("body");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    // Four tokens, the finish reason, [DONE].
    assert_eq!(events.len(), 6, "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert!(events[4].contains(r#""finish_reason":"stop""#), "{text}");
    let content: String = events[..4]
        .iter()
        .map(|e| {
            let v: Value =
                serde_json::from_str(e.strip_prefix("data: ").expect("data line")).expect("json");
            v["choices"][0]["delta"]["content"].as_str().expect("content").to_owned()
        })
        .collect();
    assert_eq!(content, tunnel_tests::ollama::WORDS[..4].concat());
}

#[tokio::test]
async fn utf8_characters_split_across_chunks_arrive_intact() {
    let s = setup(fast()).await;
    let resp = s.http.get(s.relay.tunnel_url("alice", "/utf8")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    let mut chunks = 0;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(c) = stream.next().await {
        body.extend_from_slice(&c.expect("chunk"));
        chunks += 1;
    }
    assert!(chunks > 1, "expected a streamed body");
    assert_eq!(String::from_utf8(body).expect("valid utf-8"), UTF8_TEXT);
}

#[tokio::test]
async fn binary_body_of_100_mib_round_trips_byte_exact_with_bounded_buffers() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let s = setup(fast()).await;
    let rss_before = rss_kib();
    // Upload a generated pattern (never held whole in memory) to the echo
    // route and check every byte that comes back.
    let upload = futures_util::stream::unfold(0u64, |off| async move {
        if off >= SIZE {
            return None;
        }
        let len = (SIZE - off).min(256 * 1024) as usize;
        Some((Ok::<_, std::io::Error>(Bytes::from(pattern(off, len))), off + len as u64))
    });
    let started = Instant::now();
    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/echo"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut off = 0u64;
    let mut rss_peak = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        for (i, b) in chunk.iter().enumerate() {
            if *b != pattern_byte(off + i as u64) {
                panic!("byte {} differs", off + i as u64);
            }
        }
        off += chunk.len() as u64;
        rss_peak = rss_peak.max(rss_kib().unwrap_or(0));
    }
    assert_eq!(off, SIZE);
    let secs = started.elapsed().as_secs_f64();
    let window = tunnel_proto::limits::DEFAULT_INITIAL_WINDOW as usize;
    let relay_peak = s.relay.relay.buffered().peak();
    let agent_peak = s.agent.agent.buffered().peak();
    println!(
        "100 MiB echoed in {secs:.2}s ({:.0} MiB/s each way); buffered peak: relay {relay_peak} B, agent {agent_peak} B (window {window} B); \
         process RSS before {rss_before:?} KiB, peak {rss_peak} KiB",
        100.0 / secs
    );
    assert!(relay_peak <= window, "relay buffered {relay_peak} bytes for one stream");
    assert!(agent_peak <= window, "agent buffered {agent_peak} bytes for one stream");
}

#[tokio::test]
async fn head_returns_headers_without_a_body() {
    let s = setup(fast()).await;
    let resp = s.http.head(s.relay.tunnel_url("alice", "/api/tags")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    let len: usize = resp.headers()["content-length"].to_str().unwrap().parse().unwrap();
    assert!(len > 0);
    assert!(resp.bytes().await.expect("body").is_empty());
}

#[tokio::test]
async fn delete_is_forwarded() {
    let s = setup(fast()).await;
    let resp = s
        .http
        .delete(s.relay.tunnel_url("alice", "/api/delete"))
        .json(&json!({ "model": "m" }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body() {
    let s = setup(fast()).await;
    for code in [204u16, 304] {
        let resp = s
            .http
            .get(s.relay.tunnel_url("alice", &format!("/status/{code}")))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), code);
        assert!(resp.headers().get("transfer-encoding").is_none(), "{code} must not be chunked");
        assert!(resp.bytes().await.expect("body").is_empty());
    }
}

#[tokio::test]
async fn large_headers_are_forwarded_and_oversized_ones_refused() {
    let s = setup(fast()).await;
    let mut req = s.http.get(s.relay.tunnel_url("alice", "/headers"));
    for i in 0..40 {
        req = req.header(format!("x-large-{i}"), "v".repeat(1000));
    }
    let resp = req.send().await.expect("request");
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    for i in 0..40 {
        assert_eq!(v["headers"][format!("x-large-{i}")].as_str().map(str::len), Some(1000));
    }
    let mut req = s.http.get(s.relay.tunnel_url("alice", "/headers"));
    for i in 0..70 {
        req = req.header(format!("x-large-{i}"), "v".repeat(1000));
    }
    assert_eq!(req.send().await.expect("request").status(), 431);
}

#[tokio::test]
async fn host_origin_and_authorization_are_rewritten_and_the_query_kept() {
    let s = setup(fast()).await;
    let resp = s
        .http
        .get(s.relay.tunnel_url("alice", "/headers?x=1&y=%20z"))
        .header("origin", "https://evil.example")
        .header("authorization", "Bearer web-secret")
        .header("x-custom", "kept")
        .send()
        .await
        .expect("request");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["query"], "x=1&y=%20z");
    assert_eq!(v["headers"]["host"], s.standin.addr.to_string());
    assert!(v["headers"].get("origin").is_none());
    assert!(v["headers"].get("authorization").is_none());
    assert_eq!(v["headers"]["x-custom"], "kept");
}

#[tokio::test]
async fn concurrent_streams_from_one_user_each_get_their_own_answer() {
    let s =
        setup(StandInConfig { token_delay: Duration::from_millis(2), ..StandInConfig::default() })
            .await;
    let mut tasks = Vec::new();
    for n in 1..=24u64 {
        let http = s.http.clone();
        let url = s.relay.tunnel_url("alice", "/api/generate");
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .json(&json!({ "model": "m", "prompt": "p", "options": { "num_predict": n } }))
                .send()
                .await
                .expect("request");
            let text = resp.text().await.expect("body");
            (n, text.lines().count())
        }));
    }
    for t in tasks {
        let (n, lines) = t.await.expect("task");
        assert_eq!(lines as u64, n + 1, "stream {n} got {lines} lines");
    }
    assert_eq!(s.relay.wait_for_agent("alice").await.in_flight(), 0);
}

#[tokio::test]
async fn two_users_are_kept_apart() {
    init_logging();
    let alice_backend =
        StandIn::start(StandInConfig { model: "alice-model".into(), ..fast() }).await.unwrap();
    let bob_backend =
        StandIn::start(StandInConfig { model: "bob-model".into(), ..fast() }).await.unwrap();
    let relay = TestRelay::start(&["alice", "bob"]).await;
    let _a = TestAgent::start(&relay, "alice", &alice_backend.url()).await;
    let _b = TestAgent::start(&relay, "bob", &bob_backend.url()).await;
    let http = reqwest::Client::new();
    for (user, model) in [("alice", "alice-model"), ("bob", "bob-model")] {
        let v: Value = http
            .get(relay.tunnel_url(user, "/api/tags"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["models"][0]["name"], model, "{user} reached the wrong backend");
    }
}

#[tokio::test]
async fn client_abort_closes_the_upstream_connection_within_a_second() {
    let s = setup(StandInConfig {
        token_delay: Duration::from_millis(20),
        tokens: 10_000,
        ..StandInConfig::default()
    })
    .await;
    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "messages": [] }))
        .send()
        .await
        .expect("request");
    let mut stream = resp.bytes_stream();
    stream.next().await.expect("first chunk").expect("chunk");
    let dropped = Instant::now();
    drop(stream);
    let disconnects = s
        .standin
        .events
        .wait_disconnects(1, Duration::from_secs(1))
        .await
        .expect("the stand-in still had its client after 1 s");
    let took = disconnects[0].at.duration_since(dropped);
    println!("client abort reached the model server after {took:?}");
    let session = s.relay.wait_for_agent("alice").await;
    tokio::time::timeout(WAIT, async {
        while session.in_flight() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("relay kept the aborted stream");
}

#[tokio::test]
async fn agent_offline_gives_503_with_a_json_body() {
    init_logging();
    let relay = TestRelay::start(&["alice"]).await;
    let resp = reqwest::get(relay.tunnel_url("alice", "/api/tags")).await.expect("request");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.expect("json body");
    assert!(v["error"].as_str().unwrap().contains("not connected"));
}

#[tokio::test]
async fn upstream_down_gives_502() {
    init_logging();
    // A port that was just free: nothing listens there.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let relay = TestRelay::start(&["alice"]).await;
    let _agent = TestAgent::start(&relay, "alice", &format!("http://{dead}")).await;
    let resp = reqwest::get(relay.tunnel_url("alice", "/api/tags")).await.expect("request");
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.expect("json body");
    assert!(v["error"].as_str().unwrap().contains("unreachable"), "{v}");
}

#[tokio::test]
async fn slow_reader_keeps_buffers_within_the_window() {
    const SIZE: u64 = 64 * 1024 * 1024;
    let s = setup(fast()).await;
    let rss_before = rss_kib().unwrap_or(0);
    let resp = s
        .http
        .get(s.relay.tunnel_url("alice", &format!("/bytes?n={SIZE}")))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = 0u64;
    let mut samples = Vec::new();
    // Read the first 4 MiB slowly (a pause after every 256 KiB), sampling
    // what the relay buffers meanwhile; then the rest at full speed.
    let mut next_pause = 256 * 1024;
    while let Some(c) = stream.next().await {
        got += c.expect("chunk").len() as u64;
        if got >= next_pause && got < 4 * 1024 * 1024 {
            next_pause += 256 * 1024;
            tokio::time::sleep(Duration::from_millis(20)).await;
            samples.push((s.relay.relay.buffered().current(), rss_kib().unwrap_or(0)));
        }
    }
    assert_eq!(got, SIZE);
    let window = tunnel_proto::limits::DEFAULT_INITIAL_WINDOW as usize;
    let relay_peak = s.relay.relay.buffered().peak();
    println!("slow reader: relay buffered (bytes, process RSS KiB) while paused: {samples:?}");
    println!(
        "relay buffered peak {relay_peak} B (window {window} B); RSS before {rss_before} KiB, after {} KiB",
        rss_kib().unwrap_or(0)
    );
    assert!(relay_peak <= window);
}

#[tokio::test]
async fn a_stalled_reader_does_not_stall_other_streams() {
    let s = setup(fast()).await;
    let stalled = s
        .http
        .get(s.relay.tunnel_url("alice", "/bytes?n=104857600"))
        .send()
        .await
        .expect("request");
    assert_eq!(stalled.status(), 200);
    // Never read `stalled`; the relay's window for it fills up.
    let session = s.relay.wait_for_agent("alice").await;
    tokio::time::timeout(WAIT, async {
        while s.relay.relay.buffered().current()
            < tunnel_proto::limits::DEFAULT_INITIAL_WINDOW as usize / 2
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("window never filled");
    for _ in 0..5 {
        let resp = s
            .http
            .post(s.relay.tunnel_url("alice", "/api/chat"))
            .json(&json!({ "model": "m", "messages": [], "options": { "num_predict": 3 } }))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.text().await.expect("body").lines().count(), 4);
    }
    assert_eq!(session.in_flight(), 1);
    drop(stalled);
}

#[tokio::test]
async fn bulk_upload_does_not_hold_back_a_token_stream() {
    const SIZE: u64 = 200 * 1024 * 1024;
    let s =
        setup(StandInConfig { token_delay: Duration::from_millis(10), ..StandInConfig::default() })
            .await;
    let upload_started = Instant::now();
    let http = s.http.clone();
    let url = s.relay.tunnel_url("alice", "/echo");
    let upload = tokio::spawn(async move {
        let body = futures_util::stream::unfold(0u64, |off| async move {
            (off < SIZE).then(|| {
                (Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 256 * 1024])), off + 256 * 1024)
            })
        });
        let resp =
            http.post(url).body(reqwest::Body::wrap_stream(body)).send().await.expect("upload");
        let mut n = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(c) = stream.next().await {
            n += c.expect("chunk").len() as u64;
        }
        (n, Instant::now())
    });
    // Let the upload get going before the token stream starts.
    tokio::time::timeout(WAIT, async {
        while s.agent.agent.buffered().peak() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("upload never started");
    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "messages": [], "options": { "num_predict": 30 } }))
        .send()
        .await
        .expect("request");
    let lines = read_lines(resp).await;
    let chat_done = Instant::now();
    let gaps: Vec<f64> =
        lines.windows(2).map(|w| w[1].0.duration_since(w[0].0).as_secs_f64() * 1e3).collect();
    let max_gap = gaps.iter().cloned().fold(0.0, f64::max);
    let (uploaded, upload_done) = upload.await.expect("upload task");
    assert_eq!(uploaded, SIZE);
    println!(
        "token stream during a {} MiB echo: {} lines, gaps (ms, backend pace 10 ms) max {max_gap:.1}, all {gaps:.1?}; upload took {:?}",
        SIZE >> 20,
        lines.len(),
        upload_done.duration_since(upload_started)
    );
    assert_eq!(lines.len(), 31);
    assert!(chat_done < upload_done, "the token stream only finished after the bulk upload");
}

#[tokio::test]
async fn original_protocol_agent_is_served() {
    init_logging();
    let standin = StandIn::start(fast()).await.unwrap();
    let relay = TestRelay::start(&["alice"]).await;
    let _legacy = LegacyAgent::connect(&relay.ws_url(), &agent_token("alice"), &standin.url())
        .await
        .expect("connect");
    let session = relay.wait_for_agent("alice").await;
    assert_eq!(session.protocol_version(), 0);
    let http = reqwest::Client::new();
    let v: Value = http
        .post(relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "stream": false, "messages": [], "options": { "num_predict": 3 } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["message"]["content"], tunnel_tests::ollama::WORDS[..3].concat());
    // A streamed answer arrives whole, as the original protocol carries it.
    let text = http
        .post(relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "messages": [], "options": { "num_predict": 3 } }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 4);
    let echoed =
        http.post(relay.tunnel_url("alice", "/echo")).body("plain text body").send().await.unwrap();
    assert_eq!(echoed.text().await.unwrap(), "plain text body");
    let binary = http
        .post(relay.tunnel_url("alice", "/echo"))
        .body(vec![0xffu8, 0xfe])
        .send()
        .await
        .unwrap();
    assert_eq!(binary.status(), 415);
}

#[tokio::test]
async fn a_new_agent_session_replaces_the_old_and_its_streams_end_cleanly() {
    let s = setup(StandInConfig {
        token_delay: Duration::from_millis(20),
        tokens: 10_000,
        ..StandInConfig::default()
    })
    .await;
    let old = s.relay.wait_for_agent("alice").await;
    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "messages": [] }))
        .send()
        .await
        .expect("request");
    let mut stream = resp.bytes_stream();
    stream.next().await.expect("first chunk").expect("chunk");
    let second = TestAgent::start(&s.relay, "alice", &s.standin.url()).await;
    tokio::time::timeout(WAIT, old.closed()).await.expect("old session still open");
    // The old stream ends with an Ollama-style error line.
    let mut tail: Vec<u8> = Vec::new();
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(c) = stream.next().await {
            match c {
                Ok(c) => tail.extend_from_slice(&c),
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "old stream never ended");
    let text = String::from_utf8_lossy(&tail);
    assert!(text.contains(r#"{"error":"agent session replaced"#), "{text}");
    let new = s.relay.wait_for_agent("alice").await;
    assert_ne!(new.session_id(), old.session_id());
    let resp = s.http.get(s.relay.tunnel_url("alice", "/api/tags")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    drop(second);
}

#[tokio::test]
async fn relay_routes_refuse_bad_input_with_clear_errors() {
    let s = setup(fast()).await;
    let get = |path: &str| s.http.get(s.relay.url(path)).send();
    // Users come from tokens: an unknown user is told to bring one, like
    // any user without a public tunnel (no enumeration of user ids).
    assert_eq!(get("/api/tunnel/nobody/api/tags").await.unwrap().status(), 401);
    assert_eq!(get("/api/tunnel/bad%20user/api/tags").await.unwrap().status(), 400);
    // HTTP clients resolve dot segments themselves; send this one raw.
    assert_eq!(raw_status(s.relay.addr, "/api/tunnel/alice/api/%2e%2e/secret").await, 400);
    assert_eq!(raw_status(s.relay.addr, "/api/tunnel/alice/../bob/api/tags").await, 400);
    assert_eq!(get("/nowhere").await.unwrap().status(), 404);
    // A method the relay does not carry is refused there, never forwarded.
    let odd = reqwest::Method::from_bytes(b"FOO1").unwrap();
    let resp = s.http.request(odd, s.relay.tunnel_url("alice", "/api/tags")).send().await.unwrap();
    assert_eq!(resp.status(), 501);
    assert!(resp.text().await.unwrap().contains("does not carry FOO1"));
    let long = format!("/api/{}", "x".repeat(17 * 1024));
    assert_eq!(get(&format!("/api/tunnel/alice{long}")).await.unwrap().status(), 414);
    let ws = s.http.get(s.relay.url("/ws/tunnel")).send().await.unwrap();
    assert_eq!(ws.status(), 400);
    let health: Value = get("/api/tunnel/alice/health").await.unwrap().json().await.unwrap();
    assert_eq!(health["connected"], true);
    assert_eq!(health["protocol_version"], 1);
}

/// Status code of a GET sent byte for byte, without client-side URL cleanup.
async fn raw_status(addr: std::net::SocketAddr, target: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut head = vec![0u8; 12];
    tcp.read_exact(&mut head).await.expect("status line");
    std::str::from_utf8(&head[9..12]).expect("ascii").parse().expect("status code")
}

#[tokio::test]
async fn agentd_acknowledges_so_a_slow_model_load_outlasts_the_ack_timeout() {
    init_logging();
    // The shortest acknowledgement timeout a relay accepts; agentd
    // acknowledges a request whose head takes longer than 100 ms.
    let ack_timeout = relayd::config::ACK_FLOOR;
    let relay = TestRelay::start_with(&["alice"], |c| c.ack_timeout = ack_timeout).await;
    // An upstream that takes a request and answers only when the test says:
    // a model still loading.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", upstream.local_addr().unwrap());
    let _agent = TestAgent::start(&relay, "alice", &url).await;
    let client = tokio::spawn(reqwest::get(relay.tunnel_url("alice", "/api/tags")));
    // The tunnelled request; the agent's health checks (GET /api/version)
    // come on connections of their own and are left unanswered.
    let mut conn = loop {
        let (mut conn, _) = tokio::time::timeout(WAIT, upstream.accept()).await.unwrap().unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut conn, &mut byte).await.unwrap();
            head.push(byte[0]);
        }
        if head.starts_with(b"GET /api/tags ") {
            break conn;
        }
    };
    tokio::time::sleep(ack_timeout + ack_timeout / 2).await;
    tokio::io::AsyncWriteExt::write_all(
        &mut conn,
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"models\":[]}",
    )
    .await
    .unwrap();
    let resp = tokio::time::timeout(WAIT, client).await.expect("answered").unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{\"models\":[]}");
}

#[tokio::test]
async fn original_protocol_agents_are_not_held_to_the_ack_timeout() {
    init_logging();
    let standin = StandIn::start(StandInConfig {
        token_delay: Duration::from_millis(50),
        ..StandInConfig::default()
    })
    .await
    .unwrap();
    let relay =
        TestRelay::start_with(&["alice"], |c| c.ack_timeout = Duration::from_millis(50)).await;
    let _legacy = LegacyAgent::connect(&relay.ws_url(), &agent_token("alice"), &standin.url())
        .await
        .expect("connect");
    relay.wait_for_agent("alice").await;
    // Four tokens at 50 ms: the whole answer comes after 200 ms, and an
    // original agent has no way to acknowledge before it.
    let resp = reqwest::Client::new()
        .post(relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "stream": false, "messages": [], "options": { "num_predict": 4 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test]
async fn metrics_count_agents_streams_and_tasks_on_their_own_listener() {
    let s = setup(StandInConfig {
        token_delay: Duration::from_millis(10),
        tokens: 100_000,
        ..StandInConfig::default()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = s.relay.relay.clone();
    tokio::spawn({
        let stop = stop.clone();
        daemon::metrics::serve(listener, stop, std::sync::Arc::new(move || relay.metrics()))
    });
    let scrape = || async {
        let resp = reqwest::get(&url).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    };
    let idle = scrape().await;
    assert_eq!(metric(&idle, "relayd_agents_connected"), 1);
    assert_eq!(metric(&idle, "relayd_streams_in_flight"), 0);
    assert!(metric(&idle, "relayd_tasks") > 0);
    assert!(idle.contains("# TYPE relayd_buffered_bytes gauge"));
    assert_eq!(metric(&s.agent.agent.metrics(), "agentd_connected"), 1);

    let resp = s
        .http
        .post(s.relay.tunnel_url("alice", "/api/chat"))
        .json(&json!({ "model": "m", "messages": [] }))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert_eq!(metric(&scrape().await, "relayd_streams_in_flight"), 1);
    assert_eq!(metric(&s.agent.agent.metrics(), "agentd_streams_in_flight"), 1);
    drop(body);
    tokio::time::timeout(WAIT, async {
        while metric(&scrape().await, "relayd_streams_in_flight") != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the cancelled stream stayed in flight");
    let missing = reqwest::get(url.replace("/metrics", "/other")).await.unwrap();
    assert_eq!(missing.status(), 404);
    stop.cancel();
}

#[tokio::test]
async fn a_request_body_that_stalls_is_ended_after_the_idle_timeout() {
    init_logging();
    let standin = StandIn::start(fast()).await.unwrap();
    let relay =
        TestRelay::start_with(&["alice"], |c| c.idle_timeout = Some(Duration::from_millis(200)))
            .await;
    let _agent = TestAgent::start(&relay, "alice", &standin.url()).await;
    // Promises a small body (read whole before forwarding) or a large one
    // (streamed), sends 10 bytes, then goes quiet without closing.
    for promised in [100, 10_000_000] {
        let head = format!(
            "POST /api/tunnel/alice/sink HTTP/1.1\r\nhost: x\r\ncontent-length: {promised}\r\n\r\n0123456789"
        );
        let mut conn = send_raw(relay.addr, head.as_bytes()).await;
        let head = read_answer(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 408"), "{promised}: {head}");
    }
}
