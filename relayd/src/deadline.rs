//! The deadlines of one forwarded request until its response head, as pure
//! state: the driver in [`crate::forward`] sleeps until [`Clock::next`] and
//! asks [`Clock::expired`] what passed.
//!
//! - `total` (when set) runs from the start and bounds everything.
//! - `ack` runs from the moment the request is queued until the agent
//!   acknowledges it (or answers): a stuck agent or a congested tunnel is
//!   told from a model that is slow to load.
//! - `first_byte` runs from the end of the request body upload until the
//!   head: a model server answers only after reading the body, and a
//!   multi-GB upload must not count against it.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Timeouts;

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Ack,
    Total,
    FirstByte,
}

impl Expired {
    /// What the agent is told in its `cancel`.
    pub fn cancel_reason(self) -> &'static str {
        match self {
            Expired::Ack => "the agent did not acknowledge the request in time",
            Expired::Total => "the total timeout passed before the response head",
            Expired::FirstByte => "no response head before the first-byte timeout",
        }
    }

    /// What the web client is told (504).
    pub fn message(self) -> &'static str {
        match self {
            Expired::Ack => "the agent did not acknowledge the request in time",
            Expired::Total => "the request took longer than the relay's total timeout",
            Expired::FirstByte => "the local service did not answer in time",
        }
    }
}

/// One request's deadlines.
#[derive(Debug, Clone)]
pub struct Clock {
    first_byte: Duration,
    total_limit: Option<Duration>,
    total: Option<Instant>,
    /// While the agent has not acknowledged.
    ack: Option<Instant>,
    /// For the head: `total` until the upload ended, then the sooner of
    /// `total` and `first_byte` after it.
    head: Option<Instant>,
}

impl Clock {
    /// The exchange starts at `now`: only `total` runs.
    pub fn new(now: Instant, timeouts: Timeouts) -> Self {
        let total = timeouts.total.map(|t| now + t);
        Self {
            first_byte: timeouts.first_byte,
            total_limit: timeouts.total,
            total,
            ack: None,
            head: total,
        }
    }

    /// The end of the whole exchange, if `total` is set.
    pub fn total(&self) -> Option<Instant> {
        self.total
    }

    /// The request is queued for the agent at `now`; with `ack`, the agent
    /// must acknowledge within it. Returns the deadline for queueing it: a
    /// tunnel too congested to take the request in time is a 504 too.
    pub fn sending(&mut self, now: Instant, ack: Option<Duration>) -> Instant {
        self.ack = ack.map(|a| now + a);
        let first_byte = self.total_limit.map_or(self.first_byte, |t| t.min(self.first_byte));
        let send = now + first_byte;
        self.ack.map_or(send, |a| a.min(send))
    }

    /// The agent acknowledged the request.
    pub fn acked(&mut self) {
        self.ack = None;
    }

    /// The whole request body is with the agent at `now`.
    pub fn uploaded(&mut self, now: Instant) {
        let until = now + self.first_byte;
        self.head = Some(self.total.map_or(until, |t| t.min(until)));
    }

    /// When to look again; `None` while nothing can expire.
    pub fn next(&self) -> Option<Instant> {
        match (self.ack, self.head) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        }
    }

    /// What passed at `now`, if anything.
    pub fn expired(&self, now: Instant) -> Option<Expired> {
        if self.ack.is_some_and(|a| a <= now) {
            Some(Expired::Ack)
        } else if self.total.is_some_and(|t| t <= now) {
            Some(Expired::Total)
        } else if self.head.is_some_and(|h| h <= now) {
            Some(Expired::FirstByte)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timeouts(first_byte: u64, total: Option<u64>) -> Timeouts {
        Timeouts {
            first_byte: S * first_byte as u32,
            idle: None,
            total: total.map(|t| S * t as u32),
        }
    }

    /// Sleeps until the clock's next deadline and says what passed.
    async fn run_out(clock: &Clock) -> (Duration, Option<Expired>) {
        let start = Instant::now();
        match clock.next() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => return (Duration::ZERO, None),
        }
        (start.elapsed(), clock.expired(Instant::now()))
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_never_acknowledges_expires_on_the_ack_timer() {
        let mut clock = Clock::new(Instant::now(), timeouts(300, None));
        let send = clock.sending(Instant::now(), Some(S * 30));
        assert_eq!(send, Instant::now() + S * 30);
        clock.uploaded(Instant::now());
        assert_eq!(run_out(&clock).await, (S * 30, Some(Expired::Ack)));
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_ack_the_first_byte_timer_runs_from_the_end_of_the_upload() {
        let mut clock = Clock::new(Instant::now(), timeouts(300, None));
        clock.sending(Instant::now(), Some(S * 30));
        tokio::time::advance(S * 10).await;
        clock.acked();
        // A long upload: nothing can expire while it runs.
        assert_eq!(clock.next(), None);
        tokio::time::advance(S * 3600).await;
        clock.uploaded(Instant::now());
        assert_eq!(run_out(&clock).await, (S * 300, Some(Expired::FirstByte)));
    }

    #[tokio::test(start_paused = true)]
    async fn total_bounds_the_upload_and_caps_first_byte() {
        let mut clock = Clock::new(Instant::now(), timeouts(300, Some(60)));
        let send = clock.sending(Instant::now(), None);
        assert_eq!(send, Instant::now() + S * 60, "queueing is bounded by the smaller limit");
        assert_eq!(run_out(&clock).await, (S * 60, Some(Expired::Total)));

        let mut clock = Clock::new(Instant::now(), timeouts(300, Some(60)));
        clock.sending(Instant::now(), None);
        tokio::time::advance(S * 50).await;
        clock.uploaded(Instant::now());
        assert_eq!(run_out(&clock).await, (S * 10, Some(Expired::Total)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_timer_beyond_the_head_deadline_does_not_delay_it() {
        let mut clock = Clock::new(Instant::now(), timeouts(5, None));
        clock.sending(Instant::now(), Some(S * 30));
        clock.uploaded(Instant::now());
        assert_eq!(run_out(&clock).await, (S * 5, Some(Expired::FirstByte)));
    }

    #[test]
    fn nothing_has_expired_before_its_time() {
        let now = Instant::now();
        let mut clock = Clock::new(now, timeouts(5, Some(10)));
        clock.sending(now, Some(S));
        assert_eq!(clock.expired(now), None);
        assert_eq!(clock.expired(now + S), Some(Expired::Ack));
        clock.acked();
        assert_eq!(clock.expired(now + S * 9), None);
        assert_eq!(clock.expired(now + S * 10), Some(Expired::Total));
    }
}
