//! The requests of scenario `devices` and what each one came to: which
//! device answered (the stand-ins name themselves in `x-stand-in`), when
//! its head came, and how its body ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use serde_json::json;

use crate::*;

/// One request of the mix.
#[derive(Debug, Clone)]
pub(crate) struct Ask {
    pub(crate) kind: &'static str,
    pub(crate) model: &'static str,
    /// The conversation (its first user message), for chats that have one.
    pub(crate) conversation: Option<usize>,
    pub(crate) path: &'static str,
    pub(crate) body: Option<String>,
}

/// What one request came to.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) ask: Ask,
    pub(crate) started: Instant,
    pub(crate) status: u16,
    /// The device whose stand-in answered (empty: the relay answered).
    pub(crate) device: String,
    pub(crate) head_ms: f64,
    pub(crate) total_ms: f64,
    /// A 200 whose stream ended in the format's error line.
    pub(crate) error_line: bool,
    /// A 200 whose stream ended with neither `done` nor an error line.
    pub(crate) cut_silently: bool,
}

/// The `i`-th request of the mixed load: a quarter for the model only the
/// GPU box has, a third chats with a model two devices have loaded (40
/// conversations), a quarter generations with a model loaded on one
/// device and on disk on another, a tenth for a model only the mini has,
/// and model lists.
pub(crate) fn mixed(i: usize, tokens: usize) -> Ask {
    let generate = |model: &'static str, kind| Ask {
        kind,
        model,
        conversation: None,
        path: "/api/generate",
        body: Some(
            json!({ "model": model, "prompt": "hi", "options": { "num_predict": tokens } })
                .to_string(),
        ),
    };
    let chat = |model: &'static str, kind, conversation: usize| Ask {
        kind,
        model,
        conversation: Some(conversation),
        path: "/api/chat",
        body: Some(
            json!({ "model": model, "options": { "num_predict": tokens }, "messages": [
                { "role": "system", "content": "be brief" },
                { "role": "user", "content": format!("conversation {conversation}") },
                { "role": "assistant", "content": "ok" },
                { "role": "user", "content": format!("turn {i}") },
            ]})
            .to_string(),
        ),
    };
    match i % 20 {
        0..5 => generate("llama3.3:70b", "only-on-one"),
        5..12 => chat("qwen2.5:7b", "conversation", (i / 20 * 7 + i % 20) % 40),
        12..17 => generate("llama3.2:3b", "loaded-on-one"),
        17..19 => chat("nomic-embed-text:latest", "only-on-one", i),
        _ => Ask { kind: "list", model: "", conversation: None, path: "/api/tags", body: None },
    }
}

/// Sends `ask` to `url` (the user's tunnel address) and reads the answer
/// whole.
pub(crate) async fn send(http: &Http, base: &str, ask: Ask) -> Answer {
    let started = Instant::now();
    let mut req = Request::builder()
        .method(if ask.body.is_some() { "POST" } else { "GET" })
        .uri(format!("{base}{}", ask.path));
    if ask.body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(full(ask.body.clone().unwrap_or_default())).expect("valid request");
    let mut answer = Answer {
        ask,
        started,
        status: 0,
        device: String::new(),
        head_ms: 0.0,
        total_ms: 0.0,
        error_line: false,
        cut_silently: false,
    };
    let resp = match tokio::time::timeout(Duration::from_secs(60), http.request(req)).await {
        Ok(Ok(resp)) => resp,
        _ => {
            answer.total_ms = started.elapsed().as_secs_f64() * 1e3;
            return answer;
        }
    };
    answer.head_ms = started.elapsed().as_secs_f64() * 1e3;
    answer.status = resp.status().as_u16();
    answer.device = resp
        .headers()
        .get("x-stand-in")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect()).await;
    let bytes = match body {
        Ok(Ok(b)) => b.to_bytes(),
        _ => Default::default(),
    };
    answer.total_ms = started.elapsed().as_secs_f64() * 1e3;
    if answer.status == 200 && answer.ask.body.is_some() {
        let last = bytes.split(|b| *b == b'\n').rev().find(|l| !l.is_empty()).unwrap_or_default();
        let last: serde_json::Value = serde_json::from_slice(last).unwrap_or_default();
        answer.error_line = last.get("error").is_some();
        answer.cut_silently = !answer.error_line && last.get("done") != Some(&json!(true));
    }
    answer
}

/// `c` clients sending `asks` (shared, in order) until none is left.
pub(crate) async fn run_all(http: &Http, base: &str, asks: Vec<Ask>, c: usize) -> Vec<Answer> {
    let queue = Arc::new(std::sync::Mutex::new(asks.into_iter()));
    let mut workers = Vec::new();
    for _ in 0..c {
        let (http, base, queue) = (http.clone(), base.to_owned(), queue.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
                let Some(ask) = next else { return out };
                out.push(send(&http, &base, ask).await);
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    all
}

/// `c` clients sending `make(i)` back to back until `until`.
pub(crate) async fn run_until(
    http: &Http,
    base: &str,
    make: fn(usize, usize) -> Ask,
    tokens: usize,
    c: usize,
    until: Instant,
) -> Vec<Answer> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..c {
        let (http, base, next) = (http.clone(), base.to_owned(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while Instant::now() < until {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                out.push(send(&http, &base, make(i, tokens)).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    all
}
