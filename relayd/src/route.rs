//! The router: where a request that the edge ([`crate::edge`]) admitted
//! goes, and what the relay knows of a user's agents.
//!
//! The edge says what a request asks for (an [`Ask`]: the user, and the
//! model when the body names one); the router answers with a [`Route`];
//! delivery over that route is [`crate::forward`]'s. The registry of this
//! relay's own sessions is the [`Hub`]. A route is one of the user's
//! devices connected here: for a request that names a model, one that has
//! it (loaded in memory first, then being loaded, then on disk; among
//! equals the conversation's, else the fewest requests in flight for the
//! device's speed, then the owner's priority), else the owner's preferred
//! device; or nothing. A peer relay that holds the agent is an answer
//! this type will learn to give without the edge or delivery changing.

use std::cmp::Reverse;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tunnel_proto::ServiceState;

use crate::hub::Hub;
use crate::session::Session;
pub use daemon::model::same_model;

/// What a request asks of the router.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub user: &'a str,
    /// The model the request's body names, when the edge read it (only
    /// when [`Router::routes_by_model`], or for a share token's models).
    pub model: Option<&'a str>,
    /// The conversation it belongs to, when the edge read the body
    /// ([`crate::affinity`]): among equally good devices, it picks one.
    pub affinity: Option<u64>,
}

/// Where a request goes.
#[derive(Debug)]
pub enum Route {
    /// To an agent connected to this relay.
    Local(Arc<Session>),
    /// To one of several devices of the user connected here, and why that
    /// one: another may take the request if this one fails before
    /// answering.
    Choice(Arc<Session>, Why),
    /// Nowhere: no agent of the user is connected.
    Offline,
    /// Nowhere: none of the user's connected devices has the model.
    NoModel(String),
    /// Nowhere now: only a device that left has the model (its name).
    ModelOffline { model: String, device: String },
}

/// Why a request went to the device it went to, among several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The device has the request's model loaded in memory.
    Loaded,
    /// A request is loading the model on the device: this one waits for
    /// that load rather than start another elsewhere.
    Loading,
    /// The device's service has the model.
    Present,
    /// No device is known to have the model; this one has not said.
    Unreported,
    /// The request names no model: the owner's preferred device (its
    /// priority, then the newest).
    NoModel,
    /// Its first device failed before answering.
    Failover,
}

impl Why {
    pub const ALL: [Why; 6] =
        [Why::Loaded, Why::Loading, Why::Present, Why::Unreported, Why::NoModel, Why::Failover];

    pub fn as_str(self) -> &'static str {
        match self {
            Why::Loaded => "model_loaded",
            Why::Loading => "model_loading",
            Why::Present => "model_present",
            Why::Unreported => "model_unreported",
            Why::NoModel => "no_model",
            Why::Failover => "failover",
        }
    }
}

/// What a device is known to hold of a model, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Holds {
    /// Loaded in memory (its last report's `models`, or a request this
    /// relay sent loaded it since).
    Loaded,
    /// Being loaded by a request this relay sent ([`crate::device::DeviceState::loading`]).
    Loading,
    /// On the service (its `available`).
    Present,
    /// Not known: no report yet, or an agent that does not list what its
    /// service has. Tried when no device is known to have the model.
    Unknown,
    /// Its service has other models, not this one.
    Absent,
}

fn holds(session: &Session, model: &str) -> Holds {
    let held = session.with_service(|service| match service {
        Some(s) if s.models.iter().any(|m| same_model(m, model)) => Holds::Loaded,
        Some(s) if s.available.iter().any(|m| same_model(m, model)) => Holds::Present,
        Some(s) if !s.available.is_empty() => Holds::Absent,
        _ => Holds::Unknown,
    });
    // Read once the report's lock is released: `loading` takes it too.
    if held == Holds::Present && session.state.loading(model) { Holds::Loading } else { held }
}

/// The device `model` goes to among `sessions` (oldest first): one that
/// holds it, loaded first, then one loading it; among those, the
/// conversation's (`affinity`), else the least busy for its speed
/// ([`least_busy`]). `None` when
/// every device is known not to have it.
fn by_model<'a>(
    sessions: &'a [Arc<Session>],
    model: &str,
    ask: &Ask<'_>,
    placements: &crate::affinity::Placements,
) -> Option<(&'a Arc<Session>, Why)> {
    let held: Vec<(Holds, usize, &Arc<Session>)> = sessions
        .iter()
        .enumerate()
        .map(|(age, s)| (holds(s, model), age, s))
        .filter(|(holds, ..)| *holds != Holds::Absent)
        .collect();
    let best = held.iter().map(|(holds, ..)| *holds).min()?;
    let equals: Vec<(usize, &Arc<Session>)> =
        held.into_iter().filter(|(holds, ..)| *holds == best).map(|(_, a, s)| (a, s)).collect();
    let why = match best {
        Holds::Loaded => Why::Loaded,
        Holds::Loading => Why::Loading,
        Holds::Present => Why::Present,
        Holds::Unknown | Holds::Absent => Why::Unreported,
    };
    let chosen = match ask.affinity {
        Some(key) => by_affinity(&equals, ask.user, key, placements),
        None => least_busy(&equals),
    };
    chosen.map(|(_, s)| (*s, why))
}

/// The tokens per second of each of `equals`; one not measured yet counts
/// as fast as the fastest that is (so that it gets tried, and measured).
fn speeds(equals: &[(usize, &Arc<Session>)]) -> Vec<f64> {
    let measured: Vec<Option<f64>> =
        equals.iter().map(|(_, s)| s.state.speed.tokens_per_second()).collect();
    let fastest = measured.iter().flatten().copied().fold(1.0, f64::max);
    measured.into_iter().map(|m| m.unwrap_or(fastest)).collect()
}

/// The conversation's device among `equals`: the one it went to before,
/// when that one is among them; else [`crate::affinity::score`]'s pick,
/// remembered.
fn by_affinity<'s, 'a>(
    equals: &'s [(usize, &'a Arc<Session>)],
    user: &str,
    key: u64,
    placements: &crate::affinity::Placements,
) -> Option<&'s (usize, &'a Arc<Session>)> {
    if let Some(device) = placements.get(user, key)
        && let Some(before) = equals.iter().find(|(_, s)| *s.device == *device)
    {
        return Some(before);
    }
    let scored = equals.iter().zip(speeds(equals));
    let chosen = scored
        .map(|(e, speed)| (crate::affinity::score(key, &e.1.device, speed), e))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, e)| e)?;
    placements.put(user, key, &chosen.1.device);
    Some(chosen)
}

/// Among equally good devices (with their age, oldest first): the fewest
/// requests in flight for its measured speed, then the owner's priority,
/// then one not measured yet (so that each gets measured), then the newest.
fn least_busy<'s, 'a>(
    equals: &'s [(usize, &'a Arc<Session>)],
) -> Option<&'s (usize, &'a Arc<Session>)> {
    let measured: Vec<bool> =
        equals.iter().map(|(_, s)| s.state.speed.tokens_per_second().is_some()).collect();
    equals
        .iter()
        .zip(speeds(equals))
        .zip(measured)
        .min_by_key(|(((age, s), speed), measured)| {
            let busy = busy(s.in_flight(), *speed);
            (busy, Reverse(s.state.priority()), *measured, Reverse(*age))
        })
        .map(|((e, _), _)| e)
}

/// How long a device would take, in relative terms, to serve one more
/// request: its requests in flight plus that one, over its tokens per
/// second (as an integer, so that equal devices compare equal).
fn busy(in_flight: usize, tokens_per_second: f64) -> u64 {
    ((in_flight as f64 + 1.0) * 1000.0 / tokens_per_second.max(0.01)).round() as u64
}

/// The device a request that names no model goes to: the owner's highest
/// priority, then the newest.
fn preferred(sessions: &[Arc<Session>]) -> Option<&Arc<Session>> {
    sessions.iter().enumerate().max_by_key(|(age, s)| (s.state.priority(), *age)).map(|(_, s)| s)
}

/// One connected agent as the health answer reports it: plain data, which a
/// peer relay could send as well.
#[derive(Debug, Clone)]
pub struct AgentStatus {
    pub device: String,
    pub session_id: String,
    pub since: SystemTime,
    pub protocol_version: u32,
    pub agent: String,
    pub in_flight: usize,
    pub rtt: Option<Duration>,
    /// The owner's priority for it (`[routing] priority` in agentd).
    pub priority: i32,
    /// Its measured tokens per second, once streams reported usage.
    pub tokens_per_second: Option<f64>,
    /// Models requests this relay sent are loading on it now.
    pub loading: Vec<String>,
    /// The agent's own view of its local service (agents that list the
    /// `service` capability report it every 30 s).
    pub service: Option<ServiceState>,
}

/// Answers routes over the sessions this relay holds.
#[derive(Debug, Default)]
pub struct Router {
    local: Hub,
    /// Requests routed among several devices, by why (as [`Why::ALL`]).
    routed: [std::sync::atomic::AtomicU64; 6],
    /// Where conversations went.
    placements: crate::affinity::Placements,
    /// Requests routed among several devices, by device name.
    by_device: crate::device::Tally,
}

impl Router {
    /// This relay's own sessions: where agents register and leave.
    pub fn local(&self) -> &Hub {
        &self.local
    }

    /// The route for `ask`: with one device, that one; with several, for a
    /// request that names a model, the device that holds it best, and for
    /// one that names none, the preferred one.
    pub fn route(&self, ask: Ask<'_>) -> Route {
        self.local.pick(ask.user, |sessions| {
            let Some(newest) = sessions.last() else { return Route::Offline };
            if sessions.len() == 1 {
                // Its own service answers for a model it lacks, unless a
                // device that left has it: then the client comes back.
                return match ask.model {
                    Some(model) if holds(newest, model) == Holds::Absent => {
                        match self.elsewhere(ask.user, model) {
                            offline @ Route::ModelOffline { .. } => offline,
                            _ => Route::Local(newest.clone()),
                        }
                    }
                    _ => Route::Local(newest.clone()),
                };
            }
            let route = match ask.model {
                Some(model) => match by_model(sessions, model, &ask, &self.placements) {
                    Some((s, why)) => Route::Choice(s.clone(), why),
                    None => self.elsewhere(ask.user, model),
                },
                None => Route::Choice(preferred(sessions).unwrap_or(newest).clone(), Why::NoModel),
            };
            if let Route::Choice(s, why) = &route {
                self.count(*why);
                self.by_device.add(&s.device);
            }
            route
        })
    }

    /// The route for `ask` among the user's devices other than `failed`'s
    /// (the next candidate, once a device was lost before answering).
    pub fn route_past(&self, ask: Ask<'_>, failed: &Session) -> Route {
        self.local.pick(ask.user, |sessions| {
            let others: Vec<Arc<Session>> =
                sessions.iter().filter(|s| s.id != failed.id).cloned().collect();
            let Some(first) = preferred(&others) else { return Route::Offline };
            self.count(Why::Failover);
            match ask.model {
                Some(model) => match by_model(&others, model, &ask, &self.placements) {
                    Some((s, _)) => {
                        self.by_device.add(&s.device);
                        Route::Local(s.clone())
                    }
                    None => Route::NoModel(model.to_owned()),
                },
                None => {
                    self.by_device.add(&first.device);
                    Route::Local(first.clone())
                }
            }
        })
    }

    /// Where a model no connected device has went: a device that left
    /// with it, or nowhere.
    fn elsewhere(&self, user: &str, model: &str) -> Route {
        let gone = self.local.gone(user);
        match gone.iter().rev().find(|g| g.models.iter().any(|m| same_model(m, model))) {
            Some(g) => Route::ModelOffline { model: model.to_owned(), device: g.device.clone() },
            None => Route::NoModel(model.to_owned()),
        }
    }

    /// Whether any device of `user` is connected here (else, with
    /// replicas, the request may be another one's).
    pub fn holds(&self, user: &str) -> bool {
        self.local.pick(user, |s| !s.is_empty())
    }

    /// Every device of `user` connected here, oldest first: for a request
    /// answered as their union (the model lists, [`crate::union`]).
    pub fn everyone(&self, user: &str) -> Vec<Arc<Session>> {
        self.local.devices(user)
    }

    /// Requests routed among several devices so far, by why.
    pub fn routed(&self) -> impl Iterator<Item = (Why, u64)> + '_ {
        Why::ALL.into_iter().zip(&self.routed).map(|(w, n)| (w, n.load(Ordering::Relaxed)))
    }

    /// Requests routed among several devices so far, by device name
    /// ([`crate::device::Tally`]).
    pub fn routed_by_device(&self) -> Vec<(String, u64)> {
        self.by_device.counts()
    }

    fn count(&self, why: Why) {
        self.routed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the edge reads a request's model to route it: the user has
    /// several devices connected, or had devices that left with models.
    pub fn routes_by_model(&self, user: &str) -> bool {
        self.devices(user) > 1 || self.local.has_gone(user)
    }

    /// How many devices of `user` are connected here.
    pub fn devices(&self, user: &str) -> usize {
        self.local.pick(user, <[_]>::len)
    }

    /// The user's connected agents, the one a request naming no model
    /// reaches first (the owner's priority, then the newest).
    pub fn status(&self, user: &str) -> Vec<AgentStatus> {
        let status = |s: &Arc<Session>| AgentStatus {
            device: s.device.clone(),
            session_id: s.id.clone(),
            since: s.connected_at,
            protocol_version: s.version,
            agent: s.agent.clone(),
            in_flight: s.in_flight(),
            rtt: s.rtt(),
            priority: s.state.priority(),
            tokens_per_second: s.state.speed.tokens_per_second(),
            loading: s.state.loads(),
            service: s.service(),
        };
        self.local.pick(user, |sessions| {
            let mut agents: Vec<(i32, AgentStatus)> =
                sessions.iter().rev().map(|s| (s.state.priority(), status(s))).collect();
            // Stable: equal priorities stay newest first.
            agents.sort_by_key(|(priority, _)| Reverse(*priority));
            agents.into_iter().map(|(_, a)| a).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_twice_as_fast_takes_a_second_request_before_a_slow_one_takes_its_first() {
        assert!(busy(1, 100.0) == busy(0, 50.0));
        assert!(busy(0, 100.0) < busy(0, 50.0));
        assert!(busy(2, 100.0) > busy(0, 50.0));
        assert_eq!(busy(0, 0.0), busy(0, 0.01), "no speed is the slowest, not a division by 0");
    }
}
