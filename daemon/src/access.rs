//! The access line: one per request, on both daemons, at info, target
//! `access` (turn it down with `access=warn` in the filter).
//!
//! In the journal and in JSON lines every field is a field of its own
//! (`journalctl REQUEST_ID=...`). As a text line the request is said once,
//! formatted here into a buffer each thread reuses and, when the text is
//! plain (not a terminal), written whole with the timestamp and level in
//! `tracing`'s own layout: its formatter writes each of a dozen fields
//! through `Debug` with escaping and styling, which cost a request about a
//! fifth of the instructions both daemons spend on it.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::logging::{self, Output};

/// What one access line says.
#[derive(Debug)]
pub struct Line<'a> {
    /// The agent session the stream ran on (stream ids restart with each).
    pub session: &'a str,
    pub request_id: &'a str,
    /// relayd only: the keyed hash of the user id, never the id.
    pub user_hash: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u32,
    pub duration: Duration,
    pub outcome: &'a str,
    pub reason: &'a str,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Model streams: the model and the tokens it reported.
    pub model: &'a str,
    pub tokens: u64,
    /// relayd, among several devices: where the request went, and why.
    pub route: &'a str,
}

thread_local! {
    static TEXT: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Line<'_> {
    /// Writes the line, when the filter lets `access` info through.
    pub fn write(&self) {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        if logging::plain_text() {
            TEXT.with_borrow_mut(|text| {
                text.clear();
                timestamp(text, SystemTime::now());
                text.push_str("  INFO access: ");
                self.text(text);
                text.push('\n');
                crate::held::hold(text.as_bytes());
            });
        } else if logging::output() == Some(Output::Text) {
            TEXT.with_borrow_mut(|text| {
                text.clear();
                self.text(text);
                tracing::info!(target: "access", "{text}");
            });
        } else {
            self.structured();
        }
    }

    /// `GET /api/tags 200 0.412 ms ok session=s_1 request_id=req_3
    /// bytes_in=0 bytes_out=188`, then the user hash, reason, model and
    /// tokens when there are any.
    fn text(&self, out: &mut String) {
        // Pieces pushed, numbers by `digits`: `write!` goes through
        // `core::fmt` for each, which was most of the line's cost.
        let micros = u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX);
        out.push_str(self.method);
        out.push(' ');
        // The path is checked for ASCII control characters, but not for
        // the C1 controls (U+0080..U+009F) a terminal may act on when the
        // log is read: a path that is not ASCII is written escaped.
        if self.path.is_ascii() {
            out.push_str(self.path);
        } else {
            let _ = write!(out, "{}", self.path.escape_debug());
        }
        out.push(' ');
        digits(out, u64::from(self.status), 1);
        out.push(' ');
        digits(out, micros / 1000, 1);
        out.push('.');
        digits(out, micros % 1000, 3);
        out.push_str(" ms ");
        out.push_str(self.outcome);
        for (key, value) in [(" session=", self.session), (" request_id=", self.request_id)] {
            out.push_str(key);
            out.push_str(value);
        }
        if !self.user_hash.is_empty() {
            out.push_str(" user_hash=");
            out.push_str(self.user_hash);
        }
        out.push_str(" bytes_in=");
        digits(out, self.bytes_in, 1);
        out.push_str(" bytes_out=");
        digits(out, self.bytes_out, 1);
        if !self.reason.is_empty() {
            let _ = write!(out, " reason={:?}", self.reason);
        }
        if !self.model.is_empty() {
            let _ = write!(out, " model={:?}", self.model);
        }
        if !self.model.is_empty() || self.tokens > 0 {
            out.push_str(" tokens=");
            digits(out, self.tokens, 1);
        }
        if !self.route.is_empty() {
            let _ = write!(out, " route={:?}", self.route);
        }
    }

    /// The event with every field of its own (journal, JSON lines).
    fn structured(&self) {
        let duration_ms = self.duration.as_secs_f64() * 1000.0;
        let (method, path, status, outcome) = (self.method, self.path, self.status, self.outcome);
        let (session, request_id, reason) = (self.session, self.request_id, self.reason);
        let (bytes_in, bytes_out, model, tokens, route) =
            (self.bytes_in, self.bytes_out, self.model, self.tokens, self.route);
        if self.user_hash.is_empty() {
            tracing::info!(
                target: "access",
                session, request_id, method, path, status, duration_ms, outcome, reason,
                bytes_in, bytes_out, model, tokens, route,
                "{method} {path} {status} {duration_ms} ms {outcome}"
            );
        } else {
            let user_hash = self.user_hash;
            tracing::info!(
                target: "access",
                session, request_id, user_hash, method, path, status, duration_ms, outcome,
                reason, bytes_in, bytes_out, model, tokens, route,
                "{method} {path} {status} {duration_ms} ms {outcome}"
            );
        }
    }
}

/// `2026-12-07T11:11:17.123456Z`: RFC 3339 in UTC with microseconds, as
/// `tracing`'s text lines start.
fn timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm,
    // shifted to eras that start on March 1st).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    for (value, width, then) in [
        (year, 4, '-'),
        (month, 2, '-'),
        (day, 2, 'T'),
        (rem / 3600, 2, ':'),
        (rem % 3600 / 60, 2, ':'),
        (rem % 60, 2, '.'),
        (u64::from(since.subsec_micros()), 6, 'Z'),
    ] {
        digits(out, value, width);
        out.push(then);
    }
}

/// `value` in decimal, zero-padded to `width` digits.
fn digits(out: &mut String, value: u64, width: u32) {
    let mut div = 10u64.pow(width.saturating_sub(1));
    while value / div >= 10 {
        div *= 10;
    }
    while div > 0 {
        out.push(char::from(b'0' + (value / div % 10) as u8));
        div /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(user_hash: &'a str, reason: &'a str, model: &'a str) -> Line<'a> {
        Line {
            session: "s_1",
            request_id: "req_3",
            user_hash,
            method: "POST",
            path: "/api/chat",
            status: 200,
            duration: Duration::from_micros(812_045),
            outcome: "ok",
            reason,
            bytes_in: 42,
            bytes_out: 1_234,
            model,
            tokens: 17,
            route: "",
        }
    }

    #[test]
    fn a_path_that_is_not_ascii_is_written_escaped_and_tokens_without_a_model_are_kept() {
        let mut l = line("", "", "");
        l.path = "/api/caf\u{e9}\u{9b}31m";
        l.tokens = 5;
        let mut out = String::new();
        l.text(&mut out);
        assert!(out.starts_with("POST /api/café\\u{9b}31m 200 "), "{out}");
        assert!(!out.contains('\u{9b}'));
        assert!(out.ends_with(" bytes_out=1234 tokens=5"), "{out}");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            let mut out = String::new();
            timestamp(
                &mut out,
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros),
            );
            out
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        // A leap day, the last second of a century year that is a leap
        // year, and the day after.
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(978_307_199, 999_999), "2000-12-31T23:59:59.999999Z");
        assert_eq!(at(978_307_200, 0), "2001-01-01T00:00:00.000000Z");
        assert_eq!(at(1_796_642_477, 123_456), "2026-12-07T11:21:17.123456Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn a_text_line_says_the_request_once_and_only_the_fields_it_has() {
        let mut out = String::new();
        Line { tokens: 0, ..line("", "", "") }.text(&mut out);
        assert_eq!(
            out,
            "POST /api/chat 200 812.045 ms ok session=s_1 request_id=req_3 bytes_in=42 bytes_out=1234"
        );
        out.clear();
        line("u_9f", "the client \"went\" away", "llama3:8b").text(&mut out);
        assert_eq!(
            out,
            "POST /api/chat 200 812.045 ms ok session=s_1 request_id=req_3 user_hash=u_9f \
             bytes_in=42 bytes_out=1234 reason=\"the client \\\"went\\\" away\" model=\"llama3:8b\" tokens=17"
        );
        out.clear();
        Line { route: "gpu-box model_loaded", ..line("u_9f", "", "llama3:8b") }.text(&mut out);
        assert!(out.ends_with(" tokens=17 route=\"gpu-box model_loaded\""), "{out}");
    }
}
