//! Liveness: `ping`/`pong` on an interval, and when to give up on a peer.
//!
//! Each side pings every `interval`. Any frame from the peer proves it alive
//! (a busy peer's pong may queue behind body frames); a peer that sent
//! nothing for `max_missed` intervals in a row is dead, and the session is
//! torn down so its streams fail promptly instead of hanging on a half-open
//! TCP connection. Pure state: the caller owns the clock and the timer.

use std::time::{Duration, Instant};

use crate::Message;

/// Default time between pings.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(15);
/// Default number of silent intervals before a peer is declared dead.
pub const DEFAULT_MAX_MISSED: u32 = 3;

/// What to do at a heartbeat tick.
#[derive(Debug, Clone, PartialEq)]
pub enum Beat {
    /// Send this `ping`.
    Ping(Message),
    /// The peer has been silent for too long.
    Dead { silent_for: Duration },
}

#[derive(Debug)]
pub struct Heartbeat {
    max_missed: u32,
    missed: u32,
    last_heard: Instant,
    seq: u64,
    /// The ping awaiting its pong, for round-trip time.
    pending: Option<(String, Instant)>,
    rtt: Option<Duration>,
}

impl Heartbeat {
    pub fn new(max_missed: u32, now: Instant) -> Self {
        Self {
            max_missed: max_missed.max(1),
            missed: 0,
            last_heard: now,
            seq: 0,
            pending: None,
            rtt: None,
        }
    }

    /// Any frame arrived from the peer.
    pub fn heard(&mut self, now: Instant) {
        self.missed = 0;
        self.last_heard = now;
    }

    /// A `pong` arrived; returns the round-trip time when it answers our
    /// latest ping.
    pub fn pong(&mut self, id: &str, now: Instant) -> Option<Duration> {
        self.heard(now);
        let (sent_id, at) = self.pending.take_if(|(sent, _)| sent == id)?;
        debug_assert_eq!(sent_id, id);
        let rtt = now.saturating_duration_since(at);
        self.rtt = Some(rtt);
        Some(rtt)
    }

    /// The interval elapsed.
    pub fn tick(&mut self, now: Instant) -> Beat {
        if self.missed >= self.max_missed {
            return Beat::Dead { silent_for: now.saturating_duration_since(self.last_heard) };
        }
        self.missed += 1;
        self.seq += 1;
        let id = format!("ping_{}", self.seq);
        self.pending = Some((id.clone(), now));
        Beat::Ping(Message::ping(id))
    }

    /// The last measured round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_is_dead_after_max_missed_intervals() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(3, t0);
        for i in 1..=3 {
            assert!(matches!(hb.tick(t0 + Duration::from_secs(i)), Beat::Ping(_)), "tick {i}");
        }
        assert_eq!(
            hb.tick(t0 + Duration::from_secs(4)),
            Beat::Dead { silent_for: Duration::from_secs(4) }
        );
    }

    #[test]
    fn any_frame_from_the_peer_resets_the_count() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(2, t0);
        hb.tick(t0);
        hb.tick(t0);
        hb.heard(t0);
        assert!(matches!(hb.tick(t0), Beat::Ping(_)));
        assert!(matches!(hb.tick(t0), Beat::Ping(_)));
        assert!(matches!(hb.tick(t0), Beat::Dead { .. }));
    }

    #[test]
    fn pong_for_the_latest_ping_measures_the_round_trip() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(3, t0);
        let Beat::Ping(Message::Ping(p)) = hb.tick(t0) else { panic!("expected a ping") };
        assert_eq!(hb.pong("ping_999", t0), None);
        assert_eq!(hb.pong(&p.id, t0 + Duration::from_millis(7)), Some(Duration::from_millis(7)));
        assert_eq!(hb.rtt(), Some(Duration::from_millis(7)));
    }
}
