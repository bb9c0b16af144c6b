//! Plain access lines held back while a daemon is busy, and written
//! together (see [`hold`]). Its own module: the access line holds lines,
//! the text writer and the runtime flush them.

use std::io::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Plain access lines not yet written. A line costs a `write` of its own
/// otherwise (a tenth of the CPU a small request costs both daemons); held
/// here, the lines of a busy moment go out in one, as nginx's `access_log
/// ... buffer=` does, but with no timer: the runtime calls [`flush`] each
/// time it runs out of work, before it sleeps, so an idle daemon has
/// written every line, and any other line is written after them ([`flush`]
/// is part of the text writer). A daemon that never idles writes them once
/// `HELD_BYTES` or `HELD_FOR` is reached.
struct Held {
    text: Vec<u8>,
    since: Instant,
}

static HELD: Mutex<Option<Held>> = Mutex::new(None);
const HELD_BYTES: usize = 32 * 1024;
const HELD_FOR: Duration = Duration::from_millis(200);

impl Held {
    /// Holds `line`; true when what is held must be written now.
    fn push(&mut self, line: &[u8], now: Instant) -> bool {
        if self.text.is_empty() {
            self.since = now;
        }
        self.text.extend_from_slice(line);
        self.text.len() >= HELD_BYTES || now.duration_since(self.since) >= HELD_FOR
    }
}

pub(crate) fn hold(line: &[u8]) {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let h = held.get_or_insert_with(|| Held { text: Vec::with_capacity(HELD_BYTES), since: now });
    if h.push(line, now) {
        let _ = std::io::stderr().write_all(&h.text);
        h.text.clear();
    }
}

/// Writes the access lines held back, if any: the runtime calls it before
/// it sleeps, the text writer before any other line, the process before it
/// exits.
pub fn flush() {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = held.as_mut().filter(|h| !h.text.is_empty()) {
        let _ = std::io::stderr().write_all(&h.text);
        h.text.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_lines_go_out_at_32_kib_or_once_the_first_is_200_ms_old() {
        let start = Instant::now();
        let mut h = Held { text: Vec::new(), since: start };
        let line = [b'x'; 1000];
        for i in 0..32 {
            assert!(!h.push(&line, start + Duration::from_millis(i)), "line {i} written early");
        }
        assert!(h.push(&line, start + Duration::from_millis(32)), "33 KB still held");
        h.text.clear();
        assert!(!h.push(&line, start + Duration::from_secs(5)), "a first line goes out alone");
        assert!(!h.push(&line, start + Duration::from_millis(5199)));
        assert!(h.push(&line, start + Duration::from_millis(5200)), "held for 200 ms");
    }
}
