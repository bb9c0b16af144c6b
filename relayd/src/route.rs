//! The router: where a request that the edge ([`crate::edge`]) admitted
//! goes, and what the relay knows of a user's agents.
//!
//! The edge says what a request asks for (an [`Ask`]: the user, and the
//! model when the body names one); the router answers with a [`Route`];
//! delivery over that route is [`crate::forward`]'s. The registry of this
//! relay's own sessions is the [`Hub`]. A route is one of the user's
//! devices connected here: for a request that names a model, one that has
//! it (loaded in memory first, then the fewest requests in flight), else
//! the newest; or nothing. A peer relay that holds the agent is an answer
//! this type will learn to give without the edge or delivery changing.

use std::cmp::Reverse;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tunnel_proto::ServiceState;

use crate::hub::Hub;
use crate::session::Session;

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
    /// The device's service has the model.
    Present,
    /// No device is known to have the model; this one has not said.
    Unreported,
    /// The request names no model: the newest device.
    NoModel,
    /// Its first device failed before answering.
    Failover,
}

impl Why {
    pub const ALL: [Why; 5] =
        [Why::Loaded, Why::Present, Why::Unreported, Why::NoModel, Why::Failover];

    pub fn as_str(self) -> &'static str {
        match self {
            Why::Loaded => "model_loaded",
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
    /// Loaded in memory (its last report's `models`).
    Loaded,
    /// On the service (its `available`).
    Present,
    /// Not known: no report yet, or an agent that does not list what its
    /// service has. Tried when no device is known to have the model.
    Unknown,
    /// Its service has other models, not this one.
    Absent,
}

fn holds(session: &Session, model: &str) -> Holds {
    session.with_service(|service| match service {
        Some(s) if s.models.iter().any(|m| same_model(m, model)) => Holds::Loaded,
        Some(s) if s.available.iter().any(|m| same_model(m, model)) => Holds::Present,
        Some(s) if !s.available.is_empty() => Holds::Absent,
        _ => Holds::Unknown,
    })
}

/// Whether two model names name one model: Ollama reads a name without a
/// tag as `:latest`.
pub fn same_model(a: &str, b: &str) -> bool {
    let tagged =
        |n: &str, other: &str| !n.contains(':') && other.strip_prefix(n) == Some(":latest");
    a == b || tagged(a, b) || tagged(b, a)
}

/// The device `model` goes to among `sessions` (oldest first): one that
/// holds it, loaded first; among those, the conversation's (`affinity`),
/// else the one with the fewest requests in flight, then the newest;
/// `None` when every device is known not to have it.
fn by_model<'a>(
    sessions: &'a [Arc<Session>],
    model: &str,
    affinity: Option<u64>,
) -> Option<(&'a Arc<Session>, Why)> {
    let held: Vec<(Holds, usize, &Arc<Session>)> = sessions
        .iter()
        .enumerate()
        .map(|(age, s)| (holds(s, model), age, s))
        .filter(|(holds, ..)| *holds != Holds::Absent)
        .collect();
    let best = held.iter().map(|(holds, ..)| *holds).min()?;
    let equals = held.into_iter().filter(|(holds, ..)| *holds == best);
    let why = match best {
        Holds::Loaded => Why::Loaded,
        Holds::Present => Why::Present,
        Holds::Unknown | Holds::Absent => Why::Unreported,
    };
    match affinity {
        Some(key) => equals.max_by_key(|(.., s)| crate::affinity::weight(key, &s.device)),
        None => equals.min_by_key(|(_, age, s)| (s.in_flight(), Reverse(*age))),
    }
    .map(|(.., s)| (s, why))
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
    /// The agent's own view of its local service (agents that list the
    /// `service` capability report it every 30 s).
    pub service: Option<ServiceState>,
}

/// Answers routes over the sessions this relay holds.
#[derive(Debug, Default)]
pub struct Router {
    local: Hub,
    /// Requests routed among several devices, by why (as [`Why::ALL`]).
    routed: [std::sync::atomic::AtomicU64; 5],
}

impl Router {
    /// This relay's own sessions: where agents register and leave.
    pub fn local(&self) -> &Hub {
        &self.local
    }

    /// The route for `ask`: with one device, that one; with several, for a
    /// request that names a model, the device that holds it best, and for
    /// one that names none, the newest.
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
                Some(model) => match by_model(sessions, model, ask.affinity) {
                    Some((s, why)) => Route::Choice(s.clone(), why),
                    None => self.elsewhere(ask.user, model),
                },
                None => Route::Choice(newest.clone(), Why::NoModel),
            };
            if let Route::Choice(_, why) = &route {
                self.count(*why);
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
            let Some(newest) = others.last() else { return Route::Offline };
            self.count(Why::Failover);
            match ask.model {
                Some(model) => match by_model(&others, model, ask.affinity) {
                    Some((s, _)) => Route::Local(s.clone()),
                    None => Route::NoModel(model.to_owned()),
                },
                None => Route::Local(newest.clone()),
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

    /// Every device of `user` connected here, oldest first: for a request
    /// answered as their union (the model lists, [`crate::union`]).
    pub fn everyone(&self, user: &str) -> Vec<Arc<Session>> {
        self.local.devices(user)
    }

    /// Requests routed among several devices so far, by why.
    pub fn routed(&self) -> impl Iterator<Item = (Why, u64)> + '_ {
        Why::ALL.into_iter().zip(&self.routed).map(|(w, n)| (w, n.load(Ordering::Relaxed)))
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
    /// reaches first.
    pub fn status(&self, user: &str) -> Vec<AgentStatus> {
        let status = |s: &Arc<Session>| AgentStatus {
            device: s.device.clone(),
            session_id: s.id.clone(),
            since: s.connected_at,
            protocol_version: s.version,
            agent: s.agent.clone(),
            in_flight: s.in_flight(),
            rtt: s.rtt(),
            service: s.service(),
        };
        self.local.pick(user, |sessions| sessions.iter().rev().map(status).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_without_a_tag_is_latest() {
        assert!(same_model("llama3.2", "llama3.2:latest"));
        assert!(same_model("llama3.2:latest", "llama3.2"));
        assert!(same_model("qwen2.5:7b", "qwen2.5:7b"));
        assert!(!same_model("qwen2.5", "qwen2.5:7b"));
        assert!(!same_model("llama3", "llama3.2:latest"));
    }
}
