//! Allowances for what a peer may do per unit of time: token buckets, and the
//! per-session budget that ends a session flooding pings or invalid frames.
//!
//! Pure state with an injected [`Instant`], like [`crate::liveness`], so the
//! rules are tested without clocks or sockets.

use std::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` banked, full at
/// creation.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token if one is available at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True once the bucket has refilled completely: nothing of it is worth
    /// remembering.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    /// Seconds until the next token, at `now` (0 when one is available).
    pub fn wait_secs(&mut self, now: Instant) -> f64 {
        self.refill(now);
        if self.tokens >= 1.0 || self.rate <= 0.0 { 0.0 } else { (1.0 - self.tokens) / self.rate }
    }
}

/// Pings a peer may send: a burst, then this many per second. A daemon pings
/// once per ping interval (15 s by default); a thousand times that is abuse.
pub const PINGS_BURST: u32 = 100;
pub const PINGS_PER_SECOND: f64 = 10.0;
/// Frames of a peer that may be refused (each answered with `error`): a
/// burst, then this many per second. A correct peer sends none.
pub const REFUSALS_BURST: u32 = 64;
pub const REFUSALS_PER_SECOND: f64 = 1.0;

/// What a peer spent beyond its budget: the session ends with close code
/// 1008 (policy violation) and this text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Flood {
    #[error("too many pings")]
    Pings,
    #[error("too many invalid frames")]
    Refusals,
}

/// One session's allowance of pings and refused frames.
#[derive(Debug, Clone)]
pub struct PeerBudget {
    pings: TokenBucket,
    refusals: TokenBucket,
}

impl PeerBudget {
    pub fn new(now: Instant) -> Self {
        Self {
            pings: TokenBucket::new(PINGS_PER_SECOND, PINGS_BURST, now),
            refusals: TokenBucket::new(REFUSALS_PER_SECOND, REFUSALS_BURST, now),
        }
    }

    /// The peer sent a `ping`.
    pub fn ping(&mut self, now: Instant) -> Result<(), Flood> {
        if self.pings.take(now) { Ok(()) } else { Err(Flood::Pings) }
    }

    /// A frame of the peer was refused.
    pub fn refusal(&mut self, now: Instant) -> Result<(), Flood> {
        if self.refusals.take(now) { Ok(()) } else { Err(Flood::Refusals) }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 10, t0);
        assert_eq!((0..20).filter(|_| b.take(t0)).count(), 10);
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert_eq!((0..20).filter(|_| b.take(t0 + Duration::from_secs(5))).count(), 10);
        assert!(b.is_full(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn wait_secs_says_when_the_next_token_comes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 1, t0);
        assert_eq!(b.wait_secs(t0), 0.0);
        assert!(b.take(t0));
        assert!((b.wait_secs(t0) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_ping_flood_exhausts_the_budget_but_a_steady_peer_never_does() {
        let t0 = Instant::now();
        let mut flood = PeerBudget::new(t0);
        let refused = (0..5000).filter(|_| flood.ping(t0).is_err()).count();
        assert_eq!(refused, 5000 - PINGS_BURST as usize);
        let mut steady = PeerBudget::new(t0);
        for i in 0..10_000u64 {
            assert_eq!(steady.ping(t0 + Duration::from_millis(200 * i)), Ok(()));
        }
    }

    #[test]
    fn refusals_have_a_budget_of_their_own() {
        let t0 = Instant::now();
        let mut b = PeerBudget::new(t0);
        for _ in 0..REFUSALS_BURST {
            assert_eq!(b.refusal(t0), Ok(()));
        }
        assert_eq!(b.refusal(t0), Err(Flood::Refusals));
        assert_eq!(b.ping(t0), Ok(()));
    }
}
