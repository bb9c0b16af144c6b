//! A stand-in for Ollama: enough of its HTTP API to exercise the tunnel.
//!
//! - `POST /api/chat`, `/api/generate`: NDJSON, one line per token with a
//!   configurable delay (or a test-controlled gate), unless `"stream": false`;
//! - `POST /v1/chat/completions`: SSE ending with `data: [DONE]`, or JSON;
//! - `GET /api/tags`, `/api/ps`, `/v1/models`, `/api/version`,
//!   `DELETE /api/delete`;
//! - test routes: `/echo` (streams the request body back), `/bytes?n=N`
//!   (N pattern bytes), `/zeros?n=N` (N zero bytes, at no cost: for
//!   throughput), `/sink` (reads the body, answers `{"bytes": N}`),
//!   `/headers` (the request head as JSON), `/status/N`, `/utf8` (multibyte
//!   text cut mid-character across chunks).
//!
//! A chat request may set `options.token_delay_ms` to override the pause
//! between tokens (benchmarks mix paces on one stand-in). `created_at` has
//! nanoseconds, as Ollama's does, so a client on the same machine can tell
//! how long each line took to reach it.
//!
//! It records when a client went away before a streamed answer ended, so
//! tests can measure how fast a cancel reaches the model server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The text the stand-in "generates", one word per token.
pub const WORDS: &[&str] = &[
    "The", " tunnel", " streams", " every", " token", " as", " soon", " as", " the", " model",
    " writes", " it", ",", " and", " stops", " the", " GPU", " when", " you", " leave", ".",
];

#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// Pause before each token.
    pub token_delay: Duration,
    /// Tokens per answer unless the request sets `options.num_predict`.
    pub tokens: usize,
    pub model: String,
    /// Whether `/api/ps` lists the model as loaded in memory.
    pub loaded: bool,
    /// Answer only requests for `model` (others get Ollama's 404), as a
    /// real server with one model would; else any model is answered.
    pub only_its_model: bool,
    /// A cold load: the first chat for the model waits this long before it
    /// answers (requests that arrive meanwhile wait for the same load), and
    /// `/api/ps` lists the model from then on, as Ollama does.
    pub load_delay: Duration,
    /// Other models it has (listed, answered, loaded with `loaded`).
    pub extra_models: Vec<String>,
    /// Sent back in an `x-stand-in` header on every answer, so that a
    /// client behind a relay with several devices sees which one answered.
    pub name: String,
}

impl StandInConfig {
    /// Its models: `model`, then `extra_models`.
    fn models(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.model).chain(&self.extra_models)
    }
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            token_delay: Duration::from_millis(20),
            tokens: WORDS.len(),
            model: "stand-in:latest".into(),
            loaded: false,
            only_its_model: false,
            load_delay: Duration::ZERO,
            extra_models: Vec::new(),
            name: String::new(),
        }
    }
}

/// A client that went away before a streamed answer ended.
#[derive(Debug, Clone)]
pub struct Disconnect {
    pub path: String,
    pub at: Instant,
}

/// What the stand-in observed, for tests.
#[derive(Default)]
pub struct Events {
    disconnects: Mutex<Vec<Disconnect>>,
    /// `METHOD path` of every request received (the first 4096).
    requests: Mutex<Vec<String>>,
    changed: watch::Sender<u64>,
    /// When set, each token waits for one permit (tests release them).
    gate: Mutex<Option<Arc<Semaphore>>>,
    /// The model was loaded by a chat (held while a load runs).
    warm: tokio::sync::Mutex<bool>,
    /// Cold loads done.
    loads: std::sync::atomic::AtomicUsize,
    /// Models pulled (`POST /api/pull`) since it started, at most 64.
    pulled: Mutex<Vec<String>>,
}

impl Events {
    /// `METHOD path` of every request the stand-in received (agentd's own
    /// health checks left out).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn record_request(&self, method: &Method, path: &str) {
        let mut r = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if r.len() < 4096 {
            r.push(format!("{method} {path}"));
        }
    }

    /// How many cold loads the stand-in did ([`StandInConfig::load_delay`]).
    pub fn loads(&self) -> usize {
        self.loads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for the model to be in memory, loading it when no chat did
    /// yet; chats that arrive during a load wait for that one.
    async fn load(&self, config: &StandInConfig) {
        if config.loaded || config.load_delay.is_zero() {
            return;
        }
        let mut warm = self.warm.lock().await;
        if !*warm {
            tokio::time::sleep(config.load_delay).await;
            self.loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *warm = true;
        }
    }

    /// Every model it has: its configured ones, then those pulled.
    fn models(&self, config: &StandInConfig) -> Vec<String> {
        let pulled = self.pulled.lock().unwrap_or_else(PoisonError::into_inner);
        config.models().chain(pulled.iter()).cloned().collect()
    }

    fn is_warm(&self) -> bool {
        self.warm.try_lock().is_ok_and(|w| *w)
    }

    pub fn disconnects(&self) -> Vec<Disconnect> {
        self.disconnects.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn record_disconnect(&self, path: &str) {
        let mut d = self.disconnects.lock().unwrap_or_else(PoisonError::into_inner);
        if d.len() < 1024 {
            d.push(Disconnect { path: path.to_owned(), at: Instant::now() });
        }
        drop(d);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits (at most `limit`) for the `n`-th disconnect.
    pub async fn wait_disconnects(&self, n: usize, limit: Duration) -> Option<Vec<Disconnect>> {
        let mut rx = self.changed.subscribe();
        tokio::time::timeout(limit, async {
            loop {
                let d = self.disconnects();
                if d.len() >= n {
                    return d;
                }
                if rx.changed().await.is_err() {
                    return d;
                }
            }
        })
        .await
        .ok()
    }
}

/// A running stand-in; stops when dropped.
pub struct StandIn {
    pub addr: SocketAddr,
    pub events: Arc<Events>,
    shutdown: CancellationToken,
}

impl StandIn {
    /// Binds 127.0.0.1 on a port the OS picks.
    pub async fn start(config: StandInConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve(listener, config))
    }

    /// Serves on `listener` until dropped.
    pub fn serve(listener: TcpListener, config: StandInConfig) -> Self {
        let addr = listener.local_addr().expect("bound listener has an address");
        let events = Arc::new(Events::default());
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(config), events.clone(), shutdown.clone()));
        Self { addr, events, shutdown }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes every token wait for a permit; returns the semaphore to
    /// release them with.
    pub fn gate(&self) -> Arc<Semaphore> {
        let sem = Arc::new(Semaphore::new(0));
        *self.events.gate.lock().unwrap_or_else(PoisonError::into_inner) = Some(sem.clone());
        sem
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: Arc<StandInConfig>,
    events: Arc<Events>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let config = config.clone();
        let events = events.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(config.clone(), events.clone(), req));
            // Ollama (Go's net/http) limits header bytes, not fields.
            let conn =
                http1::Builder::new().max_headers(512).serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

type Resp = Response<StandInBody>;

async fn handle(
    config: Arc<StandInConfig>,
    events: Arc<Events>,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    // agentd's periodic health checks are not the traffic tests count.
    let health_check = req
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.contains(agentd::HEALTH_CHECK_AGENT));
    if !health_check {
        events.record_request(&method, &path);
    }
    let mut resp = match (path.as_str(), get) {
        ("/api/tags", true) => {
            let models: Vec<Value> = events
                .models(&config)
                .iter()
                .map(|m| json!({ "name": m, "model": m, "size": 0, "digest": "0".repeat(64) }))
                .collect();
            json_response(StatusCode::OK, &json!({ "models": models }))
        }
        ("/v1/models", true) => {
            let data: Vec<Value> = events
                .models(&config)
                .iter()
                .map(|m| json!({ "id": m, "object": "model", "created": 0, "owned_by": "library" }))
                .collect();
            json_response(StatusCode::OK, &json!({ "object": "list", "data": data }))
        }
        ("/api/pull", false) if method == Method::POST => {
            let body = read_json(req).await;
            let named = body.get("model").or(body.get("name")).and_then(Value::as_str);
            match named.map(tagged) {
                Some(model) => {
                    let mut pulled = events.pulled.lock().unwrap_or_else(PoisonError::into_inner);
                    if !pulled.contains(&model) && pulled.len() < 64 {
                        pulled.push(model);
                    }
                    drop(pulled);
                    json_response(StatusCode::OK, &json!({ "status": "success" }))
                }
                None => {
                    json_response(StatusCode::BAD_REQUEST, &json!({ "error": "model is required" }))
                }
            }
        }
        ("/api/version", true) => {
            json_response(StatusCode::OK, &json!({ "version": "0.0.0-stand-in" }))
        }
        ("/api/ps", true) => {
            let models: Vec<Value> = if config.loaded || events.is_warm() {
                config.models().map(|m| json!({ "name": m, "model": m })).collect()
            } else {
                Vec::new()
            };
            json_response(StatusCode::OK, &json!({ "models": models }))
        }
        ("/api/chat" | "/api/generate", false) if method == Method::POST => {
            let body = read_json(req).await;
            match not_its_model(&config, &events, &body) {
                Some(model) => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": format!("model {model:?} not found, try pulling it first") }),
                ),
                None => {
                    events.load(&config).await;
                    chat(&config, &events, &path, body)
                }
            }
        }
        ("/v1/chat/completions", false) if method == Method::POST => {
            let body = read_json(req).await;
            match not_its_model(&config, &events, &body) {
                Some(model) => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": { "message": format!("model {model:?} not found"), "type": "api_error", "code": "model_not_found" } }),
                ),
                None => {
                    events.load(&config).await;
                    openai(&config, &events, &path, body)
                }
            }
        }
        ("/api/delete", false) if method == Method::DELETE => Response::new(StandInBody::empty()),
        ("/echo", false) => echo(req),
        ("/sink", false) => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    n += d.len() as u64;
                }
            }
            json_response(StatusCode::OK, &json!({ "bytes": n }))
        }
        ("/zeros", true) => {
            let n = query_param(req.uri().query(), "n").unwrap_or(1024);
            zeros_response(&events, n)
        }
        ("/bytes", true) => {
            let n = query_param(req.uri().query(), "n").unwrap_or(1024);
            bytes_response(&events, n)
        }
        ("/headers", true) => {
            let headers: serde_json::Map<String, Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (k.as_str().to_owned(), Value::from(v.to_str().unwrap_or("<binary>")))
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "method": method.as_str(),
                    "path": path,
                    "query": req.uri().query(),
                    "headers": headers,
                }),
            )
        }
        ("/utf8", true) => utf8(&events),
        ("/truncated", true) => {
            let q = req.uri().query();
            let declared = query_param(q, "n").unwrap_or(1000);
            let send = query_param(q, "send").unwrap_or(declared / 2).min(declared);
            truncated(&events, declared, send, query_param(q, "ndjson") == Some(1))
        }
        ("/page", true) => page(),
        ("/many-headers", true) => {
            let mut r = json_response(StatusCode::OK, &json!({}));
            for i in 0..query_param(req.uri().query(), "n").unwrap_or(120) {
                r.headers_mut().insert(
                    http::header::HeaderName::try_from(format!("x-many-{i}"))
                        .expect("a valid name"),
                    HeaderValue::from_static("v"),
                );
            }
            r
        }
        (p, _) if p.starts_with("/status/") => {
            let code =
                p["/status/".len()..].parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
            match code {
                Some(code) => {
                    let mut r = Response::new(StandInBody::empty());
                    *r.status_mut() = code;
                    r
                }
                None => json_response(StatusCode::BAD_REQUEST, &json!({ "error": "bad status" })),
            }
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("{method} {path} not found") }),
        ),
    };
    if let Ok(name) = http::HeaderValue::from_str(&config.name)
        && !config.name.is_empty()
    {
        resp.headers_mut().insert("x-stand-in", name);
    }
    Ok(resp)
}

async fn read_json(req: Request<Incoming>) -> Value {
    match req.into_body().collect().await {
        Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<u64> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

fn token_count(config: &StandInConfig, body: &Value) -> usize {
    body.pointer("/options/num_predict")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .map_or(config.tokens, |n| n as usize)
}

fn token(i: usize) -> &'static str {
    WORDS[i % WORDS.len()]
}

fn now() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

fn chat(config: &Arc<StandInConfig>, events: &Arc<Events>, path: &str, body: Value) -> Resp {
    let n = token_count(config, &body);
    let model = body.get("model").and_then(Value::as_str).unwrap_or(&config.model).to_owned();
    let is_chat = path == "/api/chat";
    let piece = move |text: &str, done: bool| -> Value {
        let mut v = if is_chat {
            json!({ "model": model, "created_at": now(), "message": { "role": "assistant", "content": text }, "done": done })
        } else {
            json!({ "model": model, "created_at": now(), "response": text, "done": done })
        };
        if done {
            v["done_reason"] = json!("stop");
            v["eval_count"] = json!(n);
        }
        v
    };
    if body.get("stream") == Some(&Value::Bool(false)) {
        let text: String = (0..n).map(token).collect();
        return json_response(StatusCode::OK, &piece(&text, true));
    }
    // Lines are made when they are sent, so `created_at` is the real time.
    let line = move |i: usize| {
        let v = if i < n { piece(token(i), false) } else { piece("", true) };
        Bytes::from(v.to_string() + "\n")
    };
    let delay = body
        .pointer("/options/token_delay_ms")
        .and_then(Value::as_u64)
        .map_or(config.token_delay, Duration::from_millis);
    match fail_after(&body) {
        Some(k) => {
            failing(stream_response(delay, events, path, "application/x-ndjson", k.min(n), line, n))
        }
        None => stream_response(delay, events, path, "application/x-ndjson", n + 1, line, n),
    }
}

/// `options.fail_after` (or a top-level `fail_after`, which the `openai`
/// SDK sends with `extra_body`): the model server crashes after this many
/// tokens.
fn fail_after(body: &Value) -> Option<usize> {
    body.pointer("/options/fail_after")
        .or_else(|| body.get("fail_after"))
        .and_then(Value::as_u64)
        .map(|k| k as usize)
}

/// Makes a streamed answer end with an error instead of its last chunk:
/// the connection closes mid-body, as when the model server crashes.
fn failing(mut resp: Resp) -> Resp {
    if let StandInBody::Channel { fail_at_end, .. } = resp.body_mut() {
        *fail_at_end = true;
    }
    resp
}

/// The model a request names when the stand-in answers only its own and
/// this is another (a name without a tag is `:latest`).
fn not_its_model(config: &StandInConfig, events: &Events, body: &Value) -> Option<String> {
    let named = body.get("model").and_then(Value::as_str).unwrap_or_default();
    let full = tagged(named);
    let has = |m: &String| *m == full || m == named;
    (config.only_its_model && !events.models(config).iter().any(has)).then(|| named.to_owned())
}

/// A model name as Ollama reads it: without a tag, `:latest`.
fn tagged(name: &str) -> String {
    if name.contains(':') { name.to_owned() } else { format!("{name}:latest") }
}

fn openai(config: &Arc<StandInConfig>, events: &Arc<Events>, path: &str, body: Value) -> Resp {
    let n = token_count(config, &body);
    let model = body.get("model").and_then(Value::as_str).unwrap_or(&config.model).to_owned();
    if body.get("stream") != Some(&Value::Bool(true)) {
        let text: String = (0..n).map(token).collect();
        return json_response(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-standin", "object": "chat.completion", "model": model,
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop" }]
            }),
        );
    }
    // Tokens, then a chunk with the finish reason and no content, then
    // `[DONE]`, as Ollama's OpenAI endpoint streams them.
    let event = move |i: usize| {
        if i == n + 1 {
            return Bytes::from_static(b"data: [DONE]\n\n");
        }
        if i == n {
            let chunk = json!({
                "id": "chatcmpl-standin", "object": "chat.completion.chunk", "model": model,
                "choices": [{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": "stop" }]
            });
            return Bytes::from(format!("data: {chunk}\n\n"));
        }
        let chunk = json!({
            "id": "chatcmpl-standin", "object": "chat.completion.chunk", "model": model,
            "choices": [{ "index": 0, "delta": { "role": "assistant", "content": token(i) }, "finish_reason": null }]
        });
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    match fail_after(&body) {
        Some(k) => failing(stream_response(
            config.token_delay,
            events,
            path,
            "text/event-stream",
            k.min(n),
            event,
            n,
        )),
        None => {
            stream_response(config.token_delay, events, path, "text/event-stream", n + 2, event, n)
        }
    }
}

/// Streams `count` pieces made by `piece(i)`, pausing (or waiting at the
/// gate) before each of the first `paced` pieces.
fn stream_response(
    delay: Duration,
    events: &Arc<Events>,
    path: &str,
    content_type: &'static str,
    count: usize,
    piece: impl Fn(usize) -> Bytes + Send + 'static,
    paced: usize,
) -> Resp {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let gate = events.gate.lock().unwrap_or_else(PoisonError::into_inner).clone();
    tokio::spawn(async move {
        for i in 0..count {
            if i < paced {
                if let Some(gate) = &gate {
                    match gate.acquire().await {
                        Ok(p) => p.forget(),
                        Err(_) => return,
                    }
                } else if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
            if tx.send(piece(i)).await.is_err() {
                return;
            }
        }
        // The end comes a moment after the last piece went out: hyper drops
        // unflushed bytes when a body fails.
        tokio::time::sleep(Duration::from_millis(20)).await;
    });
    let mut r = Response::new(StandInBody::channel(rx, events.clone(), path));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn echo(req: Request<Incoming>) -> Resp {
    let content_type = req.headers().get(CONTENT_TYPE).cloned();
    let mut r = Response::new(StandInBody::Echo(req.into_body()));
    if let Some(ct) = content_type {
        r.headers_mut().insert(CONTENT_TYPE, ct);
    }
    r
}

/// The byte at offset `i` of every pattern body (`/bytes`, tests' uploads).
pub fn pattern_byte(i: u64) -> u8 {
    ((i * 31 + 7) % 251) as u8
}

/// `len` pattern bytes starting at offset `start`.
pub fn pattern(start: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(start + i)).collect()
}

fn bytes_response(events: &Arc<Events>, n: u64) -> Resp {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        let mut off = 0u64;
        while off < n {
            let len = (n - off).min(64 * 1024) as usize;
            if tx.send(Bytes::from(pattern(off, len))).await.is_err() {
                return;
            }
            off += len as u64;
        }
    });
    let mut r = Response::new(StandInBody::channel(rx, events.clone(), "/bytes"));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    r.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    r
}

fn zeros_response(events: &Arc<Events>, n: u64) -> Resp {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut left = n;
        while left > 0 {
            let len = left.min(ZEROS.len() as u64) as usize;
            if tx.send(Bytes::from_static(&ZEROS[..len])).await.is_err() {
                return;
            }
            left -= len as u64;
        }
    });
    let mut r = Response::new(StandInBody::channel(rx, events.clone(), "/zeros"));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    r.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    r
}

/// Declares `declared` bytes and sends only `send` of them, then ends: the
/// connection closes under the client, as when a model server crashes
/// mid-answer. NDJSON sends whole `{"n":i}` lines.
fn truncated(events: &Arc<Events>, declared: u64, send: u64, ndjson: bool) -> Resp {
    let body = if ndjson {
        let mut text = String::new();
        let mut i = 0;
        loop {
            let line = format!("{{\"n\":{i}}}\n");
            if (text.len() + line.len()) as u64 > send {
                break;
            }
            text.push_str(&line);
            i += 1;
        }
        Bytes::from(text)
    } else {
        Bytes::from(pattern(0, send as usize))
    };
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let _ = tx.send(body).await;
        // The crash comes a moment after the bytes went out (hyper drops
        // unflushed bytes when a body ends short).
        tokio::time::sleep(Duration::from_millis(20)).await;
    });
    let mut r = Response::new(StandInBody::channel(rx, events.clone(), "/truncated"));
    let ct = if ndjson { "application/x-ndjson" } else { "application/octet-stream" };
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    r.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(declared));
    r
}

/// What a hostile desktop could answer: a page with script that sets
/// cookies and origin-wide policies on whatever origin serves it.
pub const HOSTILE_PAGE: &str =
    "<html><script>document.cookie='relay_session=stolen; path=/'</script></html>";

fn page() -> Resp {
    let mut r = Response::new(StandInBody::Full(Some(Bytes::from_static(HOSTILE_PAGE.as_bytes()))));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    h.append("set-cookie", HeaderValue::from_static("relay_session=stolen; Path=/"));
    h.append("set-cookie", HeaderValue::from_static("other=1; Path=/"));
    h.insert(
        "strict-transport-security",
        HeaderValue::from_static("max-age=63072000; includeSubDomains"),
    );
    h.insert("clear-site-data", HeaderValue::from_static("\"*\""));
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert("content-security-policy", HeaderValue::from_static("script-src *"));
    h.insert("x-desktop", HeaderValue::from_static("kept"));
    r
}

/// Text with 2-, 3- and 4-byte characters, sent 1-3 bytes at a time so
/// characters are cut across chunks.
pub const UTF8_TEXT: &str = "héllo wörld — 日本語のテキスト 🦀🚀 ñandú ÆØÅ 你好 ✓";

fn utf8(events: &Arc<Events>) -> Resp {
    let bytes = UTF8_TEXT.as_bytes();
    let mut pieces = Vec::new();
    let mut i = 0;
    let mut step = 1;
    while i < bytes.len() {
        let end = (i + step).min(bytes.len());
        pieces.push(Bytes::copy_from_slice(&bytes[i..end]));
        i = end;
        step = step % 3 + 1;
    }
    let n = pieces.len();
    stream_response(
        Duration::from_millis(1),
        events,
        "/utf8",
        "text/plain; charset=utf-8",
        n,
        move |i| pieces[i].clone(),
        n,
    )
}

fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(StandInBody::Full(Some(Bytes::from(v.to_string()))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    r
}

/// Response bodies of the stand-in.
pub enum StandInBody {
    Full(Option<Bytes>),
    /// Streamed from a producer task; records a disconnect when dropped
    /// before the producer finished.
    Channel {
        rx: mpsc::Receiver<Bytes>,
        done: bool,
        /// End with an error instead of cleanly (a crash mid-answer).
        fail_at_end: bool,
        events: Arc<Events>,
        path: String,
    },
    Echo(Incoming),
}

impl StandInBody {
    fn empty() -> Self {
        StandInBody::Full(None)
    }

    fn channel(rx: mpsc::Receiver<Bytes>, events: Arc<Events>, path: &str) -> Self {
        StandInBody::Channel { rx, done: false, fail_at_end: false, events, path: path.to_owned() }
    }
}

impl http_body::Body for StandInBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            StandInBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            StandInBody::Channel { rx, done, fail_at_end, .. } => match rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(None) if *fail_at_end => {
                    *done = true;
                    Poll::Ready(Some(Err("the model server crashed".into())))
                }
                Poll::Ready(None) => {
                    *done = true;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
            StandInBody::Echo(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            StandInBody::Full(b) => {
                http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            _ => http_body::SizeHint::default(),
        }
    }
}

impl Drop for StandInBody {
    fn drop(&mut self) {
        if let StandInBody::Channel { done: false, events, path, .. } = self {
            events.record_disconnect(path);
        }
    }
}
