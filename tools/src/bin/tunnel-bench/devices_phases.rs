//! What scenario `devices` makes of its answers: the mix judged against
//! which device has which model, routing's CPU, a pulled model, a killed
//! device.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::*;

/// The mixed load, judged.
pub(crate) struct Mix {
    total: usize,
    /// Answered by a device that does not have the model (or 404).
    wrong_device: usize,
    /// Neither 200 nor a wrong device's 404.
    failed: usize,
    /// Requests for the model loaded on the laptop only (on disk on the
    /// mini), and how many the laptop took.
    loaded_on_one: (usize, usize),
    /// Conversation requests, and how many went to their conversation's
    /// most used device.
    sticky: (usize, usize),
    /// Conversations whose most used device is each device.
    conversations_on: Vec<(String, usize)>,
    per_device: Vec<(String, usize)>,
    p50_ms: f64,
    p99_ms: f64,
}

pub(crate) fn judge_mix(answers: &[Answer]) -> Mix {
    let mut m = Mix {
        total: answers.len(),
        wrong_device: 0,
        failed: 0,
        loaded_on_one: (0, 0),
        sticky: (0, 0),
        conversations_on: Vec::new(),
        per_device: Vec::new(),
        p50_ms: 0.0,
        p99_ms: 0.0,
    };
    let mut per_device: HashMap<String, usize> = HashMap::new();
    let mut by_conversation: HashMap<usize, HashMap<String, usize>> = HashMap::new();
    for a in answers {
        let model_request = !a.ask.model.is_empty();
        let wrong =
            model_request && (a.status == 404 || (a.status == 200 && !has(&a.device, a.ask.model)));
        if wrong {
            m.wrong_device += 1;
        } else if a.status != 200 || a.error_line || a.cut_silently {
            m.failed += 1;
        }
        if a.status != 200 || !model_request {
            continue;
        }
        *per_device.entry(a.device.clone()).or_default() += 1;
        if a.ask.kind == "loaded-on-one" {
            m.loaded_on_one.0 += 1;
            m.loaded_on_one.1 += usize::from(a.device == "laptop");
        }
        if let (Some(c), "conversation") = (a.ask.conversation, a.ask.kind) {
            *by_conversation.entry(c).or_default().entry(a.device.clone()).or_default() += 1;
        }
    }
    let mut on: HashMap<String, usize> = HashMap::new();
    for devices in by_conversation.values() {
        let (top, most) = devices.iter().max_by_key(|(_, n)| **n).expect("a conversation has one");
        m.sticky.0 += devices.values().sum::<usize>();
        m.sticky.1 += most;
        *on.entry(top.clone()).or_default() += 1;
    }
    m.conversations_on = sorted(on);
    m.per_device = sorted(per_device);
    let ok: Vec<f64> = answers.iter().filter(|a| a.status == 200).map(|a| a.total_ms).collect();
    (m.p50_ms, m.p99_ms) = (percentile(&ok, 50.0), percentile(&ok, 99.0));
    m
}

fn sorted(map: HashMap<String, usize>) -> Vec<(String, usize)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort();
    v
}

fn share(part: usize, of: usize) -> f64 {
    if of == 0 { f64::NAN } else { 100.0 * part as f64 / of as f64 }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to a device without the model, {} failed; loaded on one device: {}/{} ({:.1} %) there; same conversation on one device: {}/{} ({:.1} %), conversations per device {:?}; answers per device {:?}; p50 {:.1} ms, p99 {:.1} ms",
            self.wrong_device,
            self.failed,
            self.loaded_on_one.1,
            self.loaded_on_one.0,
            share(self.loaded_on_one.1, self.loaded_on_one.0),
            self.sticky.1,
            self.sticky.0,
            share(self.sticky.1, self.sticky.0),
            self.conversations_on,
            self.per_device,
            self.p50_ms,
            self.p99_ms,
        )
    }
}

pub(crate) fn mix_json(m: &Mix) -> Value {
    json!({
        "requests": m.total, "wrong_device": m.wrong_device, "failed": m.failed,
        "loaded_on_one_pct": share(m.loaded_on_one.1, m.loaded_on_one.0),
        "sticky_pct": share(m.sticky.1, m.sticky.0),
        "conversations_on": m.conversations_on, "per_device": m.per_device,
        "p50_ms": m.p50_ms, "p99_ms": m.p99_ms,
    })
}

/// The relay's CPU per chat, one device against three.
pub(crate) struct Cost {
    one_us: f64,
    three_us: f64,
    one_rps: f64,
    three_rps: f64,
}

impl Cost {
    pub(crate) fn json(&self) -> Value {
        json!({ "one_device_us": self.one_us, "three_devices_us": self.three_us, "added_us": self.three_us - self.one_us, "one_device_rps": self.one_rps, "three_devices_rps": self.three_rps })
    }
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "one device {:.1} us ({:.0}/s), three devices {:.1} us ({:.0}/s): routing adds {:+.1} us",
            self.one_us,
            self.one_rps,
            self.three_us,
            self.three_rps,
            self.three_us - self.one_us
        )
    }
}

/// Chats with the model two of u0's devices and u1's only device have
/// loaded, each a conversation of its own, at c=64; rounds alternate.
pub(crate) async fn routing_cost(s: &Setup, http: &Http, args: &Args) -> Cost {
    let (rounds, dur) = if args.smoke {
        (1, Duration::from_millis(300))
    } else {
        (args.rounds.unwrap_or(3), Duration::from_secs(3))
    };
    let mut runs: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, user) in ["u1", "u0"].iter().enumerate() {
            let url = format!("http://127.0.0.1:{}/api/tunnel/{user}/api/chat", s.relay_port);
            let n = Arc::new(AtomicUsize::new(0));
            let make = Arc::new(move || {
                let c = n.fetch_add(1, Ordering::Relaxed);
                let body = json!({ "model": "qwen2.5:7b", "stream": false, "options": { "num_predict": 4 }, "messages": [{ "role": "user", "content": format!("conversation {c}") }] });
                http::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(full(body.to_string()))
                    .expect("valid request")
            });
            let before = s.relay_cpu();
            let load = closed_loop(http, make, 64, dur).await;
            let cpu = s.relay_cpu().saturating_sub(before);
            let ok = load.ok.max(1) as f64;
            runs[i].push((cpu.as_secs_f64() * 1e6 / ok, ok / load.elapsed.as_secs_f64()));
        }
    }
    let med =
        |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    Cost {
        one_us: med(&runs[0], |r| r.0),
        one_rps: med(&runs[0], |r| r.1),
        three_us: med(&runs[1], |r| r.0),
        three_rps: med(&runs[1], |r| r.1),
    }
}

/// A model pulled through the tunnel, and how soon a chat with it reached
/// the device that pulled it.
pub(crate) struct Pull {
    before: u16,
    device: String,
    routable_after: Duration,
}

impl Pull {
    pub(crate) fn json(&self) -> Value {
        json!({ "status_before": self.before, "device": self.device, "routable_after_s": self.routable_after.as_secs_f64() })
    }
}

impl fmt::Display for Pull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "before the pull {}; pulled on {}; routable {:.2} s after the pull answered",
            self.before,
            self.device,
            self.routable_after.as_secs_f64()
        )
    }
}

fn generate(model: &'static str) -> Ask {
    Ask {
        kind: "pull",
        model,
        conversation: None,
        path: "/api/generate",
        body: Some(
            json!({ "model": model, "prompt": "hi", "options": { "num_predict": 1 } }).to_string(),
        ),
    }
}

pub(crate) async fn pulled(http: &Http, base: &str) -> Result<Pull> {
    let model = "phi4:14b";
    let before = send(http, base, generate(model)).await.status;
    let pull = Ask {
        kind: "pull",
        model: "",
        conversation: None,
        path: "/api/pull",
        body: Some(json!({ "model": model, "stream": false }).to_string()),
    };
    let pulled = send(http, base, pull).await;
    if pulled.status != 200 {
        bail!("the pull answered {}", pulled.status);
    }
    let t = Instant::now();
    loop {
        let a = send(http, base, generate(model)).await;
        if a.status == 200 && a.device == pulled.device {
            return Ok(Pull { before, device: pulled.device, routable_after: t.elapsed() });
        }
        if t.elapsed() > Duration::from_secs(40) {
            bail!("{model} not routable 40 s after its pull (last: {})", a.status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Generations with models that the laptop and another device have:
/// qwen2.5:7b (also loaded on the GPU box), llama3.2:3b (on disk on the
/// mini).
fn survivable(i: usize, tokens: usize) -> Ask {
    let model = if i % 2 == 0 { "qwen2.5:7b" } else { "llama3.2:3b" };
    let body = json!({ "model": model, "prompt": "hi", "options": { "num_predict": tokens } });
    Ask {
        kind: "survivable",
        model,
        conversation: None,
        path: "/api/generate",
        body: Some(body.to_string()),
    }
}

/// The laptop's agentd killed (SIGKILL) in the middle of a load.
pub(crate) struct Kill {
    requests: usize,
    in_flight: usize,
    /// In flight at the kill: answered by the laptop and cut with the
    /// format's error line; cut without one; not 200 (client-visible).
    cut_with_error_line: usize,
    cut_silently: usize,
    failed: usize,
    /// Not 200 over the whole run.
    failed_all: usize,
    p99_before_ms: f64,
    p99_in_flight_ms: f64,
    out_of_route: Duration,
}

impl Kill {
    pub(crate) fn json(&self) -> Value {
        json!({
            "requests": self.requests, "in_flight_at_kill": self.in_flight,
            "cut_with_error_line": self.cut_with_error_line, "cut_silently": self.cut_silently,
            "in_flight_not_200": self.failed, "not_200": self.failed_all,
            "p99_before_ms": self.p99_before_ms, "p99_in_flight_ms": self.p99_in_flight_ms,
            "out_of_route_s": self.out_of_route.as_secs_f64(),
        })
    }
}

impl fmt::Display for Kill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests, {} in flight at the kill: {} streams already answering ended with the error line, {} cut silently, {} not 200; not 200 over the run: {}; p99 {:.1} ms before, {:.1} ms for those in flight without a first byte cut; out of the route after {:.3} s",
            self.requests,
            self.in_flight,
            self.cut_with_error_line,
            self.cut_silently,
            self.failed,
            self.failed_all,
            self.p99_before_ms,
            self.p99_in_flight_ms,
            self.out_of_route.as_secs_f64()
        )
    }
}

pub(crate) async fn killed(
    s: &Setup,
    http: &Http,
    base: &str,
    tokens: usize,
    args: &Args,
) -> Result<Kill> {
    let (run, at) = if args.smoke {
        (Duration::from_millis(1500), Duration::from_millis(700))
    } else {
        (Duration::from_secs(5), Duration::from_secs(2))
    };
    let until = Instant::now() + run;
    let load = {
        let (http, base) = (http.clone(), base.to_owned());
        tokio::spawn(async move { run_until(&http, &base, survivable, tokens, 16, until).await })
    };
    tokio::time::sleep(at).await;
    let kill = Instant::now();
    s.signal(1, nix::sys::signal::Signal::SIGKILL)?;
    let out_of_route = loop {
        let now = devices_connected(http, base).await.map(|d| d.0).unwrap_or_default();
        if !now.iter().any(|d| d == "laptop") {
            break kill.elapsed();
        }
        if kill.elapsed() > Duration::from_secs(10) {
            bail!("a killed agent stayed in the route for 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let answers = load.await?;
    let ended = |a: &Answer| a.started + Duration::from_secs_f64(a.total_ms / 1e3);
    let in_flight: Vec<&Answer> =
        answers.iter().filter(|a| a.started <= kill && ended(a) > kill).collect();
    let before: Vec<f64> =
        answers.iter().filter(|a| ended(a) <= kill).map(|a| a.total_ms).collect();
    let survived: Vec<f64> = in_flight
        .iter()
        .filter(|a| a.status == 200 && !a.error_line && !a.cut_silently)
        .map(|a| a.total_ms)
        .collect();
    Ok(Kill {
        requests: answers.len(),
        in_flight: in_flight.len(),
        cut_with_error_line: in_flight.iter().filter(|a| a.status == 200 && a.error_line).count(),
        cut_silently: answers.iter().filter(|a| a.cut_silently).count(),
        failed: in_flight.iter().filter(|a| a.status != 200).count(),
        failed_all: answers.iter().filter(|a| a.status != 200).count(),
        p99_before_ms: percentile(&before, 99.0),
        p99_in_flight_ms: percentile(&survived, 99.0),
        out_of_route,
    })
}
