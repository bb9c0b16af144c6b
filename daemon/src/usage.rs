//! What a model stream says about itself, read on the way through without
//! holding a byte back: the model and the tokens generated.
//!
//! Ollama ends an NDJSON stream (and answers a `"stream": false` request)
//! with a line that carries `model`, `eval_count` (tokens generated) and
//! `eval_duration` (nanoseconds spent generating them). The OpenAI API
//! carries `model` in every chunk and, when asked for
//! (`stream_options.include_usage`) or in a whole answer,
//! `usage.completion_tokens`. [`Usage`] keeps only the last few KiB of the
//! body it is shown and reads those fields at the end, parsing JSON only
//! when the tail names a count.

use bytes::Bytes;
use serde_json::Value;

/// Bytes of the body's tail kept: the final NDJSON line or SSE events.
const TAIL: usize = 8 * 1024;

/// The kinds of body worth reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/x-ndjson` (Ollama's streams).
    Ndjson,
    /// `text/event-stream` (the OpenAI API's streams).
    Sse,
    /// `application/json` (a whole answer).
    Json,
}

impl Format {
    /// The format of a body with this `Content-Type`, if it is one to read.
    pub fn of(content_type: Option<&str>) -> Option<Format> {
        let mime = content_type?.split(';').next()?.trim();
        [
            ("application/x-ndjson", Format::Ndjson),
            ("text/event-stream", Format::Sse),
            ("application/json", Format::Json),
        ]
        .into_iter()
        .find_map(|(name, format)| mime.eq_ignore_ascii_case(name).then_some(format))
    }
}

/// What the stream reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub model: Option<String>,
    /// Tokens generated.
    pub tokens: Option<u64>,
    /// Time the model spent generating them (Ollama's `eval_duration`).
    pub generation_seconds: Option<f64>,
}

/// A body's tail, fed chunk by chunk.
#[derive(Debug)]
pub struct Usage {
    format: Format,
    tail: Vec<u8>,
    /// The first `model` seen (streams repeat it).
    model: Option<String>,
    first_line_seen: bool,
}

impl Usage {
    pub fn new(format: Format) -> Self {
        Self { format, tail: Vec::new(), model: None, first_line_seen: false }
    }

    /// Shows the scanner the next chunk. The tail may grow to twice
    /// [`TAIL`] before its front is dropped, so that a stream of small
    /// chunks (a token each) moves its bytes once, not once per chunk.
    pub fn feed(&mut self, chunk: &Bytes) {
        if chunk.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - TAIL..]);
        } else {
            if self.tail.len() + chunk.len() > 2 * TAIL {
                self.tail.drain(..self.tail.len() + chunk.len() - TAIL);
            }
            self.tail.extend_from_slice(chunk);
        }
        // The model from the first complete line, for streams whose last
        // line does not name it (only the new bytes can end it).
        if !self.first_line_seen {
            let new = self.tail.len() - chunk.len().min(TAIL);
            if let Some(at) = memchr::memchr(b'\n', &self.tail[new..]) {
                self.first_line_seen = true;
                if let Some(v) = self.parse(&self.tail[..new + at]) {
                    self.model = v.get("model").and_then(Value::as_str).map(str::to_owned);
                }
            }
        }
    }

    fn parse(&self, line: &[u8]) -> Option<Value> {
        let line = std::str::from_utf8(line).ok()?.trim();
        let json = match self.format {
            Format::Sse => line.strip_prefix("data:")?.trim(),
            Format::Ndjson | Format::Json => line,
        };
        serde_json::from_str(json).ok()
    }

    /// Reads the fields from what the body ended with.
    pub fn finish(&self) -> Report {
        let mut report = Report { model: self.model.clone(), ..Report::default() };
        let tail = &self.tail[self.tail.len().saturating_sub(TAIL)..];
        // Most answers carry no counts (lists, errors): no JSON to parse.
        // The searchers are built once (building one for each call cost
        // ~900 instructions, more than searching a short answer).
        static COUNTS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 2]> =
            std::sync::LazyLock::new(|| {
                [
                    memchr::memmem::Finder::new(b"\"eval_count\""),
                    memchr::memmem::Finder::new(b"\"completion_tokens\""),
                ]
            });
        if COUNTS.iter().all(|f| f.find(tail).is_none()) {
            return report;
        }
        let text = String::from_utf8_lossy(tail);
        let lines: Vec<&str> = match self.format {
            Format::Json => vec![text.trim()],
            _ => text.lines().collect(),
        };
        // The last line or event that carries counts wins; the model comes
        // from the last line that names one.
        let mut named = None;
        for line in lines.iter().rev() {
            let Some(v) = self.parse(line.as_bytes()) else { continue };
            if named.is_none() {
                named = v.get("model").and_then(Value::as_str).map(str::to_owned);
            }
            if report.tokens.is_none() {
                if let Some(n) = v.get("eval_count").and_then(Value::as_u64) {
                    report.tokens = Some(n);
                    report.generation_seconds =
                        v.get("eval_duration").and_then(Value::as_u64).map(|ns| ns as f64 / 1e9);
                } else if let Some(n) =
                    v.pointer("/usage/completion_tokens").and_then(Value::as_u64)
                {
                    report.tokens = Some(n);
                }
            }
            if named.is_some() && report.tokens.is_some() {
                break;
            }
        }
        report.model = named.or(report.model);
        report
    }
}

/// A device's generation speed: a moving average of the tokens per second
/// of its streams that reported usage (at least [`Speed::MIN_TOKENS`]).
#[derive(Debug, Default)]
pub struct Speed {
    /// Hundredths of a token per second; 0 until measured.
    centi: std::sync::atomic::AtomicU32,
}

impl Speed {
    /// Streams shorter than this say more about latency than speed.
    pub const MIN_TOKENS: u64 = 8;

    pub fn tokens_per_second(&self) -> Option<f64> {
        match self.centi.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            c => Some(f64::from(c) / 100.0),
        }
    }

    /// Folds in one stream's speed, a fifth of the new value at a time.
    pub fn observe(&self, tokens_per_second: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        let new = (tokens_per_second * 100.0).clamp(1.0, f64::from(u32::MAX / 2));
        let _ = self.centi.fetch_update(Relaxed, Relaxed, |old| {
            let next = if old == 0 { new } else { f64::from(old) * 0.8 + new * 0.2 };
            Some(next.round().max(1.0) as u32)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_speed_is_unknown_until_measured_then_moves_a_fifth_at_a_time() {
        let speed = Speed::default();
        assert_eq!(speed.tokens_per_second(), None);
        speed.observe(50.0);
        assert_eq!(speed.tokens_per_second(), Some(50.0));
        speed.observe(100.0);
        assert_eq!(speed.tokens_per_second(), Some(60.0));
    }

    #[test]
    fn ollama_streams_report_their_final_line() {
        let mut u = Usage::new(Format::Ndjson);
        u.feed(&Bytes::from_static(b"{\"model\":\"llama3.2\",\"message\":{\"content\":\"Hi\"},\"done\":false}\n{\"model\":\"llama3.2\",\"mess"));
        u.feed(&Bytes::from_static(b"age\":{\"content\":\"!\"},\"done\":false}\n"));
        u.feed(&Bytes::from_static(
            b"{\"model\":\"llama3.2\",\"done\":true,\"eval_count\":42,\"eval_duration\":2100000000}\n",
        ));
        let r = u.finish();
        assert_eq!(r.model.as_deref(), Some("llama3.2"));
        assert_eq!(r.tokens, Some(42));
        assert_eq!(r.generation_seconds, Some(2.1));
    }

    #[test]
    fn openai_streams_report_their_usage_chunk() {
        let mut u = Usage::new(Format::Sse);
        u.feed(&Bytes::from_static(
            b"data: {\"model\":\"qwen3\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        ));
        u.feed(&Bytes::from_static(b"data: {\"model\":\"qwen3\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n"));
        let r = u.finish();
        assert_eq!((r.model.as_deref(), r.tokens), (Some("qwen3"), Some(7)));
    }

    #[test]
    fn a_long_body_keeps_only_its_tail_and_other_bodies_report_nothing() {
        let mut u = Usage::new(Format::Ndjson);
        let filler = Bytes::from(format!("{{\"model\":\"m\",\"x\":\"{}\"}}\n", "y".repeat(1000)));
        for _ in 0..100 {
            u.feed(&filler);
        }
        assert!(u.tail.len() <= 2 * TAIL);
        u.feed(&Bytes::from_static(b"{\"done\":true,\"eval_count\":3}\n"));
        assert_eq!(u.finish().tokens, Some(3));
        assert_eq!(u.finish().model.as_deref(), Some("m"));
        let mut plain = Usage::new(Format::Json);
        plain.feed(&Bytes::from_static(b"{\"models\":[]}"));
        assert_eq!(plain.finish(), Report::default());
        assert_eq!(Format::of(Some("text/event-stream; charset=utf-8")), Some(Format::Sse));
        assert_eq!(Format::of(Some("text/plain")), None);
    }
}
