//! The service manager's view of a running daemon: `STATUS=` with its live
//! state, and `WATCHDOG=1` only while its core loop provably makes progress.
//!
//! A daemon hands over a probe: an `async` call that goes through its core
//! loop (agentd: a round trip through the supervisor's command channel;
//! relayd: through its tunnel registry) and answers the one-line status.
//! Every tick the probe runs under a deadline. An answer is the proof of
//! progress: the watchdog is fed and a changed status line sent. No answer
//! (a loop stuck on a lock, an await that never ends) withholds the ping,
//! and so does a runtime whose only thread is blocked, because this task
//! then never runs: systemd's `WatchdogSec=` kills the daemon either way and
//! `Restart=` brings it back.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

/// How often the status line is refreshed when no watchdog asks for more.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);

/// When the probe runs and how the results are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Time between probes, which is also each probe's deadline.
    pub tick: Duration,
    /// Whether the service manager expects `WATCHDOG=1`.
    pub watchdog: bool,
}

impl Schedule {
    /// From the service manager's `WATCHDOG_USEC` (half of it, the usual
    /// margin, at most [`STATUS_EVERY`]).
    pub fn from_env() -> Self {
        Self::new(sd_notify::watchdog_enabled())
    }

    /// For a watchdog period (`None`: no watchdog).
    pub fn new(watchdog: Option<Duration>) -> Self {
        match watchdog {
            Some(period) if !period.is_zero() => Self {
                tick: (period / 2).clamp(Duration::from_millis(10), STATUS_EVERY),
                watchdog: true,
            },
            _ => Self { tick: STATUS_EVERY, watchdog: false },
        }
    }
}

/// Probes forever (the task ends with the runtime, so the watchdog is fed
/// through the drain as well); `send` gets what to tell the service manager.
pub async fn run<P, Fut>(schedule: Schedule, mut probe: P, mut send: impl FnMut(&[NotifyState]))
where
    P: FnMut() -> Fut,
    Fut: Future<Output = String>,
{
    let mut last = String::new();
    let mut stuck = false;
    loop {
        match tokio::time::timeout(schedule.tick, probe()).await {
            Ok(line) => {
                if stuck {
                    warn!("the core loop answers again; feeding the watchdog");
                    stuck = false;
                }
                if schedule.watchdog {
                    send(&[NotifyState::Watchdog]);
                }
                if line != last {
                    send(&[NotifyState::Status(&line)]);
                    last = line;
                }
            }
            Err(_) if !stuck => {
                stuck = true;
                warn!(
                    deadline = ?schedule.tick,
                    "the core loop did not answer its health probe within {:?}; withholding the watchdog ping (systemd restarts a daemon stuck past WatchdogSec=)",
                    schedule.tick
                );
            }
            Err(_) => {}
        }
        tokio::time::sleep(schedule.tick).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn told(states: &[NotifyState]) -> String {
        states
            .iter()
            .map(|s| match s {
                NotifyState::Watchdog => "WATCHDOG=1".to_owned(),
                NotifyState::Status(t) => format!("STATUS={t}"),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn half_the_watchdog_period_and_never_slower_than_the_status_refresh() {
        let s = Schedule::new(Some(Duration::from_secs(1)));
        assert_eq!(s, Schedule { tick: Duration::from_millis(500), watchdog: true });
        let s = Schedule::new(Some(Duration::from_secs(60)));
        assert_eq!(s, Schedule { tick: STATUS_EVERY, watchdog: true });
        assert_eq!(Schedule::new(None), Schedule { tick: STATUS_EVERY, watchdog: false });
        assert!(!Schedule::new(Some(Duration::ZERO)).watchdog);
    }

    /// The probe answers three times, then its loop wedges (it never
    /// answers again): the pings stop with it, and a changed status is sent
    /// once, an unchanged one not again.
    #[tokio::test(start_paused = true)]
    async fn a_wedged_core_loop_stops_the_watchdog_pings() {
        let calls = Arc::new(AtomicUsize::new(0));
        let probes = calls.clone();
        let probe = move || {
            let n = probes.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => "connecting".to_owned(),
                    1 | 2 => "connected".to_owned(),
                    _ => std::future::pending().await,
                }
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let schedule = Schedule::new(Some(Duration::from_millis(200)));
        let task = tokio::spawn(run(schedule, probe, move |s| {
            let _ = tx.send(told(s));
        }));
        // Twenty ticks of virtual time: the wedge lasts seventeen of them.
        tokio::time::sleep(schedule.tick * 20).await;
        task.abort();
        let mut seen = Vec::new();
        while let Ok(m) = rx.try_recv() {
            seen.push(m);
        }
        assert_eq!(
            seen,
            ["WATCHDOG=1", "STATUS=connecting", "WATCHDOG=1", "STATUS=connected", "WATCHDOG=1"]
        );
        assert!(calls.load(Ordering::SeqCst) > 5, "the probe kept being tried");
    }

    /// Without a watchdog only status changes are sent.
    #[tokio::test(start_paused = true)]
    async fn without_a_watchdog_only_the_status_is_told() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            Schedule::new(None),
            || async { "up".to_owned() },
            move |s| {
                let _ = tx.send(told(s));
            },
        ));
        tokio::time::sleep(STATUS_EVERY * 5).await;
        task.abort();
        assert_eq!(rx.recv().await.as_deref(), Some("STATUS=up"));
        assert!(rx.try_recv().is_err());
    }
}
