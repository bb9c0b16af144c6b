//! Live request tracing as a registry of taps (`tunnelctl trace`).
//!
//! A subscriber registers a filter, a limit and a bounded buffer. The data
//! path hands each event over with a non-blocking send: a subscriber that
//! reads too slowly loses events (and is told how many, in a `Dropped`
//! event before the next one it gets); it never slows a request. With no
//! subscriber, an event is not even built ([`Taps::publish`] takes a
//! closure).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;
use tunnel_proto::control::v1::{self as pb, trace_event::Kind};

/// What the `Trace` RPC of both daemons answers with.
pub type TraceStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::TraceEvent, tonic::Status>> + Send>>;

/// Events a subscriber's buffer holds before it loses some.
pub const BUFFER: usize = 1024;

/// Which requests a subscriber follows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this user's requests (compared, never shown).
    pub user: Option<String>,
    /// Only paths starting with this.
    pub path_prefix: Option<String>,
    /// Only end events with this status (start and head events are left
    /// out when set).
    pub status: Option<u32>,
}

impl Filter {
    /// The filter a `TraceRequest` asks for.
    pub fn of(req: &pb::TraceRequest) -> Self {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Filter {
            user: some(&req.user),
            path_prefix: some(&req.path_prefix),
            status: (req.status != 0).then_some(req.status),
        }
    }

    fn passes(&self, subject: &Subject<'_>, event: &pb::TraceEvent) -> bool {
        if self.user.as_deref().is_some_and(|u| u != subject.user) {
            return false;
        }
        if self.path_prefix.as_deref().is_some_and(|p| !subject.path.starts_with(p)) {
            return false;
        }
        match (self.status, &event.kind) {
            (None, _) => true,
            (Some(s), Some(Kind::End(end))) => end.status == s,
            (Some(_), _) => false,
        }
    }
}

/// What the filters look at: the request's user and path.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub user: &'a str,
    pub path: &'a str,
}

struct Tap {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<pb::TraceEvent>,
    lost: Arc<AtomicU64>,
    bodies: bool,
}

/// The registry: every live subscriber.
#[derive(Default)]
pub struct Taps {
    taps: Mutex<Vec<Tap>>,
    count: AtomicUsize,
    next_id: AtomicU64,
    /// Events lost by slow subscribers since start (a metric).
    dropped: AtomicU64,
}

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taps").field("subscribers", &self.subscribers()).finish_non_exhaustive()
    }
}

impl Taps {
    /// Subscribers right now.
    pub fn subscribers(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether anyone listens (the data path skips building events if not).
    pub fn is_active(&self) -> bool {
        self.subscribers() > 0
    }

    /// Whether some subscriber that follows `subject` asked for bodies.
    pub fn wants_bodies(&self, subject: &Subject<'_>) -> bool {
        self.is_active()
            && self.lock().iter().any(|t| {
                t.bodies
                    && t.filter.user.as_deref().is_none_or(|u| u == subject.user)
                    && t.filter.path_prefix.as_deref().is_none_or(|p| subject.path.starts_with(p))
            })
    }

    /// Events lost by slow subscribers since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tap>> {
        self.taps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a subscriber; it ends when the returned subscription is
    /// dropped. `bodies`: it may see bodies (the daemon's configuration and
    /// the caller both said so).
    pub fn subscribe(
        self: &Arc<Self>,
        filter: Filter,
        limit: Option<u64>,
        bodies: bool,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(BUFFER);
        let lost = Arc::new(AtomicU64::new(0));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Tap { id, filter, tx, lost: lost.clone(), bodies });
        self.count.fetch_add(1, Ordering::Relaxed);
        Subscription { taps: self.clone(), id, rx, lost, remaining: limit }
    }

    /// Hands the event `make` builds to every subscriber that follows
    /// `subject`, without waiting: a full buffer loses the event. `make`
    /// runs only when someone listens.
    pub fn publish(&self, subject: Subject<'_>, make: impl FnOnce() -> pb::TraceEvent) {
        if !self.is_active() {
            return;
        }
        let event = make();
        let mut taps = self.lock();
        let before = taps.len();
        taps.retain(|t| {
            if !t.filter.passes(&subject, &event) {
                return !t.tx.is_closed();
            }
            match t.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    t.lost.fetch_add(1, Ordering::Relaxed);
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        let gone = before - taps.len();
        if gone > 0 {
            self.count.fetch_sub(gone, Ordering::Relaxed);
        }
    }

    fn unsubscribe(&self, id: u64) {
        let mut taps = self.lock();
        let before = taps.len();
        taps.retain(|t| t.id != id);
        let gone = before - taps.len();
        if gone > 0 {
            self.count.fetch_sub(gone, Ordering::Relaxed);
        }
    }
}

/// One subscriber's end: its events, a `Dropped` event before the next one
/// whenever some were lost, and the end once its limit is reached.
pub struct Subscription {
    taps: Arc<Taps>,
    id: u64,
    rx: mpsc::Receiver<pb::TraceEvent>,
    lost: Arc<AtomicU64>,
    remaining: Option<u64>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next event; `None` once the limit is reached.
    pub async fn next(&mut self) -> Option<pb::TraceEvent> {
        if self.remaining == Some(0) {
            return None;
        }
        let lost = self.lost.swap(0, Ordering::Relaxed);
        let event = if lost > 0 {
            pb::TraceEvent {
                at_unix_ms: unix_ms(std::time::SystemTime::now()),
                kind: Some(Kind::Dropped(pb::Dropped { count: lost })),
                ..pb::TraceEvent::default()
            }
        } else {
            self.rx.recv().await?
        };
        if let Some(n) = &mut self.remaining {
            *n -= 1;
        }
        Some(event)
    }

    /// The events as a stream, for a server-streaming RPC.
    pub fn into_stream(self) -> TraceStream {
        Box::pin(futures_util::stream::unfold(self, |mut s| async move {
            s.next().await.map(|e| (Ok(e), s))
        }))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.taps.unsubscribe(self.id);
    }
}

/// Unix time in milliseconds, as the control API writes times.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(id: &str) -> pb::TraceEvent {
        pb::TraceEvent {
            request_id: id.into(),
            kind: Some(Kind::Start(pb::RequestStart::default())),
            ..pb::TraceEvent::default()
        }
    }

    fn end(id: &str, status: u32) -> pb::TraceEvent {
        pb::TraceEvent {
            request_id: id.into(),
            kind: Some(Kind::End(pb::RequestEnd { status, ..pb::RequestEnd::default() })),
            ..pb::TraceEvent::default()
        }
    }

    const ALICE: Subject<'static> = Subject { user: "alice", path: "/api/chat" };

    #[tokio::test]
    async fn nobody_listening_builds_nothing() {
        let taps = Arc::new(Taps::default());
        taps.publish(ALICE, || panic!("built without a subscriber"));
        let sub = taps.subscribe(Filter::default(), None, false);
        assert!(taps.is_active());
        drop(sub);
        assert!(!taps.is_active());
        taps.publish(ALICE, || panic!("built after the subscriber left"));
    }

    #[tokio::test]
    async fn a_slow_subscriber_loses_events_and_is_told_how_many() {
        let taps = Arc::new(Taps::default());
        let mut sub = taps.subscribe(Filter::default(), None, false);
        for i in 0..BUFFER + 10 {
            taps.publish(ALICE, || start(&i.to_string()));
        }
        assert_eq!(taps.dropped(), 10);
        let first = sub.next().await.expect("event");
        assert_eq!(first.kind, Some(Kind::Dropped(pb::Dropped { count: 10 })));
        assert_eq!(sub.next().await.expect("event").request_id, "0");
    }

    #[tokio::test]
    async fn filters_and_limits_hold() {
        let taps = Arc::new(Taps::default());
        let filter = Filter { user: Some("bob".into()), ..Filter::default() };
        let mut bobs = taps.subscribe(filter, Some(1), false);
        let only_500 = Filter { status: Some(500), ..Filter::default() };
        let mut errors = taps.subscribe(only_500, None, false);
        let bob = Subject { user: "bob", path: "/api/tags" };
        taps.publish(ALICE, || start("a"));
        taps.publish(bob, || start("b1"));
        taps.publish(bob, || end("b1", 200));
        taps.publish(ALICE, || end("a", 500));
        assert_eq!(bobs.next().await.expect("event").request_id, "b1");
        assert!(bobs.next().await.is_none(), "the limit ends the subscription");
        let e = errors.next().await.expect("event");
        assert_eq!(
            (e.request_id.as_str(), e.kind),
            ("a", Some(Kind::End(pb::RequestEnd { status: 500, ..Default::default() })))
        );
    }
}
