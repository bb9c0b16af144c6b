//! What both daemons record about each request they carry, written once:
//! a [`Span`] per request publishes trace events to the subscribers
//! ([`crate::trace`]) and feeds the request metrics ([`Observer::render`]):
//! answers by status class, ends by outcome, cancels by reason, and for
//! model streams the time to first token and the tokens per second per
//! model, read from the stream's own final line as it passes.
//!
//! A span costs a few counters when nobody traces; events are built only
//! for subscribers. User ids never become labels.

pub use crate::usage::Speed;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tunnel_proto::control::v1::{self as pb, trace_event::Kind};

use crate::metrics::{Exposition, Histogram};
use crate::trace::{Subject, Taps, unix_ms};
use crate::usage::{Format, Usage};

/// Bytes of a body a trace shows, when bodies were granted.
pub const BODY_SAMPLE: usize = 4096;
/// Models tracked by name; more are counted as "other" (a label's values
/// must stay few).
const MAX_MODELS: usize = 64;

const TTFT_BOUNDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
const TPS_BOUNDS: &[f64] = &[1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0];

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered in full.
    Ok,
    /// The local service or the tunnel failed.
    Error,
    /// Cut short: the web client left, a timeout, the session ended.
    Cancelled,
    /// Never sent on (policy, limits, authentication, bad input).
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Refused => "refused",
        }
    }
}

/// Why a request was cancelled, as a metric label (a fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CancelReason {
    /// The web client went away.
    ClientGone,
    /// A timeout (acknowledgement, first byte, idle, total).
    Timeout,
    /// The other side of the tunnel cancelled it.
    Peer,
    /// The tunnel session ended under it.
    SessionLost,
    /// The daemon shut down.
    Shutdown,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::ClientGone => "client_gone",
            CancelReason::Timeout => "timeout",
            CancelReason::Peer => "peer",
            CancelReason::SessionLost => "session_lost",
            CancelReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug)]
struct ModelStats {
    ttft: Histogram,
    tps: Histogram,
    tokens: u64,
    generation_seconds: f64,
    streams: u64,
}

impl Default for ModelStats {
    fn default() -> Self {
        Self {
            ttft: Histogram::new(TTFT_BOUNDS),
            tps: Histogram::new(TPS_BOUNDS),
            tokens: 0,
            generation_seconds: 0.0,
            streams: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    /// Answers by status class: 1xx..5xx at 1..=5; 0 = no answer head.
    by_class: [u64; 6],
    by_outcome: HashMap<Outcome, u64>,
    cancels: HashMap<CancelReason, u64>,
    models: HashMap<String, ModelStats>,
}

/// One daemon's request observer: the trace registry and the metrics.
#[derive(Debug)]
pub struct Observer {
    pub taps: Arc<Taps>,
    /// The daemon's configuration lets traces carry bodies.
    pub trace_bodies: bool,
    stats: Mutex<Stats>,
}

impl Observer {
    pub fn new(trace_bodies: bool) -> Arc<Self> {
        Arc::new(Self { taps: Arc::new(Taps::default()), trace_bodies, stats: Mutex::default() })
    }

    /// A `Trace` call's subscription: its filters and limit, and bodies
    /// only when both the call and the daemon's configuration ask.
    pub fn trace(&self, req: &pb::TraceRequest) -> crate::trace::TraceStream {
        let bodies = req.bodies && self.trace_bodies;
        let limit = (req.limit > 0).then_some(req.limit);
        self.taps.subscribe(crate::trace::Filter::of(req), limit, bodies).into_stream()
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the span of request `id` (`user` empty at the agent, which
    /// serves one user).
    pub fn start(
        self: &Arc<Self>,
        session: &str,
        id: &str,
        user: &str,
        user_hash: &str,
        method: &str,
        path: &str,
    ) -> Span {
        let span = Span {
            observer: self.clone(),
            session: session.to_owned(),
            id: id.to_owned(),
            user: user.to_owned(),
            user_hash: user_hash.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            started: Instant::now(),
            status: 0,
            usage: None,
            bytes_in: Arc::default(),
            bytes_out: 0,
            first_chunk: None,
            sample: None,
            route: String::new(),
            speed: None,
            ended: false,
        };
        let bodies = self.trace_bodies && self.taps.wants_bodies(&span.subject());
        let mut span = span;
        if bodies {
            span.sample = Some(Vec::new());
        }
        self.taps.publish(span.subject(), || {
            span.event(Kind::Start(pb::RequestStart {
                method: method.to_owned(),
                path: path.to_owned(),
                body: Vec::new(),
            }))
        });
        span
    }

    /// The request metrics, with `prefix` (`relayd`, `agentd`).
    pub fn render(&self, prefix: &str, out: &mut Exposition) {
        let s = self.stats();
        let name = format!("{prefix}_responses_total");
        out.family(&name, "counter", "Answers by status class (none: ended before a head).");
        for (i, class) in ["none", "1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            out.labelled(&name, &[("class", class)], s.by_class[i]);
        }
        let name = format!("{prefix}_requests_finished_total");
        out.family(&name, "counter", "Requests by how they ended.");
        for o in [Outcome::Ok, Outcome::Error, Outcome::Cancelled, Outcome::Refused] {
            out.labelled(&name, &[("outcome", o.as_str())], s.by_outcome.get(&o).unwrap_or(&0));
        }
        let name = format!("{prefix}_cancels_total");
        out.family(&name, "counter", "Cancelled requests by reason.");
        for r in [
            CancelReason::ClientGone,
            CancelReason::Timeout,
            CancelReason::Peer,
            CancelReason::SessionLost,
            CancelReason::Shutdown,
        ] {
            out.labelled(&name, &[("reason", r.as_str())], s.cancels.get(&r).unwrap_or(&0));
        }
        let mut models: Vec<(&String, &ModelStats)> = s.models.iter().collect();
        models.sort_by(|a, b| a.0.cmp(b.0));
        let name = format!("{prefix}_time_to_first_token_seconds");
        out.family(
            &name,
            "histogram",
            "From a model request's arrival to its first body bytes, per model.",
        );
        for (m, st) in &models {
            out.histogram(&name, &[("model", m)], &st.ttft.snapshot());
        }
        let name = format!("{prefix}_tokens_per_second");
        out.family(
            &name,
            "histogram",
            "Generation speed of model streams, per model (tokens over the model's own generation time when it reports one).",
        );
        for (m, st) in &models {
            out.histogram(&name, &[("model", m)], &st.tps.snapshot());
        }
        let name = format!("{prefix}_generated_tokens_total");
        out.family(&name, "counter", "Tokens the local service reported generating, per model.");
        for (m, st) in &models {
            out.labelled(&name, &[("model", m)], st.tokens);
        }
        let name = format!("{prefix}_generation_seconds_total");
        out.family(&name, "counter", "Time the local service reported generating, per model.");
        for (m, st) in &models {
            out.labelled(&name, &[("model", m)], st.generation_seconds);
        }
        let name = format!("{prefix}_model_streams_total");
        out.family(&name, "counter", "Model answers seen, per model.");
        for (m, st) in &models {
            out.labelled(&name, &[("model", m)], st.streams);
        }
        drop(s);
        out.counter(
            &format!("{prefix}_trace_events_dropped_total"),
            "Trace events slow subscribers lost.",
            self.taps.dropped(),
        );
        out.gauge(
            &format!("{prefix}_trace_subscribers"),
            "Live trace subscribers.",
            self.taps.subscribers() as u64,
        );
    }
}

/// One request, from arrival to end. Dropped without [`Span::end`], it
/// ends as cancelled (its task was dropped).
#[derive(Debug)]
pub struct Span {
    observer: Arc<Observer>,
    /// The session the stream runs on: stream ids restart with each one.
    session: String,
    id: String,
    user: String,
    user_hash: String,
    method: String,
    path: String,
    started: Instant,
    status: u32,
    usage: Option<Usage>,
    /// Request body bytes, counted wherever the upload runs.
    bytes_in: Arc<std::sync::atomic::AtomicU64>,
    bytes_out: u64,
    first_chunk: Option<Duration>,
    /// The response body's first bytes, when a subscriber gets bodies.
    sample: Option<Vec<u8>>,
    /// Where the request went among several devices, and why.
    route: String,
    /// The device's speed, which this stream's tokens per second feed.
    speed: Option<Arc<Speed>>,
    ended: bool,
}

impl Span {
    fn subject(&self) -> Subject<'_> {
        Subject { user: &self.user, path: &self.path }
    }

    fn event(&self, kind: Kind) -> pb::TraceEvent {
        pb::TraceEvent {
            request_id: self.id.clone(),
            user_hash: self.user_hash.clone(),
            at_unix_ms: unix_ms(SystemTime::now()),
            kind: Some(kind),
        }
    }

    /// Where the request went among several devices, and why
    /// (`gpu-box model_loaded`): on its access line and trace.
    pub fn routed(&mut self, route: String) {
        self.route = route;
    }

    /// The stream's tokens per second, when it reports usage, feed `speed`
    /// (its device's).
    pub fn measure_into(&mut self, speed: Arc<Speed>) {
        self.speed = Some(speed);
    }

    /// The response head went out.
    pub fn head(&mut self, status: u16, content_type: Option<&str>) {
        self.status = u32::from(status);
        self.usage = Format::of(content_type).map(Usage::new);
        let first_byte_us = self.started.elapsed().as_micros() as u64;
        let status = self.status;
        let observer = self.observer.clone();
        observer.taps.publish(self.subject(), || {
            self.event(Kind::Head(pb::ResponseHead { status, first_byte_us }))
        });
    }

    /// Response body bytes out so far.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// Request body bytes went in.
    pub fn uploaded(&mut self, n: u64) {
        self.bytes_in.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// A counter the upload (in a task of its own) adds its bytes to.
    pub fn upload_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.bytes_in.clone()
    }

    /// A response body chunk went out.
    pub fn chunk(&mut self, data: &Bytes) {
        if self.first_chunk.is_none() && !data.is_empty() {
            self.first_chunk = Some(self.started.elapsed());
        }
        self.bytes_out += data.len() as u64;
        if let Some(u) = &mut self.usage {
            u.feed(data);
        }
        if let Some(s) = &mut self.sample
            && s.len() < BODY_SAMPLE
        {
            let take = (BODY_SAMPLE - s.len()).min(data.len());
            s.extend_from_slice(&data[..take]);
        }
    }

    /// Ends the span: the end event and the metrics.
    pub fn end(mut self, outcome: Outcome, cancel: Option<CancelReason>, reason: &str) {
        self.finish(outcome, cancel, reason);
    }

    fn finish(&mut self, outcome: Outcome, cancel: Option<CancelReason>, reason: &str) {
        if self.ended {
            return;
        }
        self.ended = true;
        let duration = self.started.elapsed();
        let report = self.usage.as_ref().map(Usage::finish).unwrap_or_default();
        {
            let mut s = self.observer.stats();
            let class = (self.status / 100).min(5) as usize;
            s.by_class[if (1..=5).contains(&class) { class } else { 0 }] += 1;
            *s.by_outcome.entry(outcome).or_default() += 1;
            if let Some(c) = cancel {
                *s.cancels.entry(c).or_default() += 1;
            }
            if let Some(model) = &report.model {
                let known = s.models.contains_key(model) || s.models.len() < MAX_MODELS;
                let key = if known { model.clone() } else { "other".to_owned() };
                let m = s.models.entry(key).or_default();
                m.streams += 1;
                if let Some(t) = self.first_chunk {
                    m.ttft.observe(t.as_secs_f64());
                }
                if let Some(tokens) = report.tokens {
                    m.tokens += tokens;
                    // The model's own generation time when it reports one,
                    // else from the first chunk to the end.
                    let secs = report.generation_seconds.unwrap_or_else(|| {
                        duration.saturating_sub(self.first_chunk.unwrap_or_default()).as_secs_f64()
                    });
                    m.generation_seconds += secs;
                    if secs > 0.0 && tokens > 0 {
                        m.tps.observe(tokens as f64 / secs);
                    }
                    if let Some(speed) = &self.speed
                        && secs > 0.0
                        && tokens >= Speed::MIN_TOKENS
                    {
                        speed.observe(tokens as f64 / secs);
                    }
                }
            }
        }
        self.log(outcome, reason, duration, &report);
        let end = pb::RequestEnd {
            status: self.status,
            bytes_in: self.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
            bytes_out: self.bytes_out,
            duration_us: duration.as_micros() as u64,
            outcome: outcome.as_str().to_owned(),
            reason: reason.to_owned(),
            model: report.model.unwrap_or_default(),
            tokens: report.tokens.unwrap_or_default(),
            body: self.sample.take().unwrap_or_default(),
            route: self.route.clone(),
        };
        let observer = self.observer.clone();
        observer.taps.publish(self.subject(), || self.event(Kind::End(end)));
    }
}

impl Span {
    /// The request's access line ([`crate::access`]).
    fn log(
        &self,
        outcome: Outcome,
        reason: &str,
        duration: Duration,
        report: &crate::usage::Report,
    ) {
        crate::access::Line {
            session: &self.session,
            request_id: &self.id,
            user_hash: &self.user_hash,
            method: &self.method,
            path: &self.path,
            status: self.status,
            duration,
            outcome: outcome.as_str(),
            reason,
            bytes_in: self.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
            bytes_out: self.bytes_out,
            model: report.model.as_deref().unwrap_or_default(),
            tokens: report.tokens.unwrap_or_default(),
            route: &self.route,
        }
        .write();
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        self.finish(Outcome::Cancelled, Some(CancelReason::ClientGone), "the client went away");
    }
}
