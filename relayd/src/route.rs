//! The router: where a request that the edge ([`crate::edge`]) admitted
//! goes, and what the relay knows of a user's agents.
//!
//! The edge says what a request asks for (an [`Ask`]: the user, and the
//! model when the body names one); the router answers with a [`Route`];
//! delivery over that route is [`crate::forward`]'s. The registry of this
//! relay's own sessions is the [`Hub`]. Today a route is the newest of the
//! user's devices connected here, or nothing; a device picked by the model
//! it holds, and a peer relay that holds the agent, are answers this type
//! will learn to give without the edge or delivery changing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tunnel_proto::ServiceState;

use crate::hub::Hub;
use crate::session::Session;

/// What a request asks of the router.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub user: &'a str,
    /// The model the request's body names, when the edge read it. No
    /// route depends on it yet.
    #[expect(dead_code, reason = "read once a user's agents are told apart by model")]
    pub model: Option<&'a str>,
}

/// Where a request goes.
#[derive(Debug)]
pub enum Route {
    /// To an agent connected to this relay.
    Local(Arc<Session>),
    /// Nowhere: no agent of the user is connected.
    Offline,
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
}

impl Router {
    /// This relay's own sessions: where agents register and leave.
    pub fn local(&self) -> &Hub {
        &self.local
    }

    /// The route for `ask`: the newest of the user's connected devices.
    pub fn route(&self, ask: Ask<'_>) -> Route {
        match self.local.pick(ask.user, |sessions| sessions.last().cloned()) {
            Some(session) => Route::Local(session),
            None => Route::Offline,
        }
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
