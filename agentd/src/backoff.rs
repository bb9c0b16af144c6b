//! Reconnect backoff: 1, 2, 4, 8, 16, 30 s (capped) with full jitter.
//!
//! Full jitter (a uniform delay between zero and the exponential step)
//! spreads a crowd of agents that lost the same relay over the whole window,
//! instead of bringing them back in synchronised waves.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    /// The ceiling of the next delay: base * 2^attempt, capped.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(16)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay, drawn uniformly from `[0, ceiling]` by `uniform`
    /// (a number in `[0, 1)`), and advances the step.
    pub fn next_with(&mut self, uniform: f64) -> Duration {
        let d = self.ceiling().mul_f64(uniform.clamp(0.0, 1.0));
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    /// Back to the first step, after a session proved healthy.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let c = b.ceiling().as_secs();
                b.next_with(0.5);
                c
            })
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling_and_reset_starts_over() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(b.next_with(0.0), Duration::ZERO);
        assert_eq!(b.next_with(0.5), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }
}
