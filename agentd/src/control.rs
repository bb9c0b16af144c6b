//! agentd's control API (`tunnel.control.v1.Agent`) on its unix socket: a
//! thin adapter over the [`Agent`] handle. Each call checks its caller
//! ([`Guard`]), asks the handle, and translates; no logic of its own.

use std::sync::Arc;
use std::time::SystemTime;

use daemon::control::{Access, Common, Guard};
use daemon::trace::unix_ms;
use tonic::{Request, Response, Status};
use tunnel_proto::control::v1::{self as pb, agent_server};

use crate::{Agent, AgentError, Phase};

/// The service: the agent and who may call it.
pub struct Control {
    agent: Arc<Agent>,
    common: Common,
}

impl Control {
    pub fn new(agent: Arc<Agent>, owner_only: bool) -> Self {
        let guard = Guard::new("agentd", owner_only);
        let common = Common::new(guard, agent.observer().clone(), false);
        Self { agent, common }
    }

    /// The gRPC service, for [`daemon::control::start`] (or `serve`).
    pub fn server(self) -> agent_server::AgentServer<Self> {
        agent_server::AgentServer::new(self)
    }
}

fn ms(t: Option<SystemTime>) -> u64 {
    t.map_or(0, unix_ms)
}

fn error_kind(e: &AgentError) -> pb::AgentErrorKind {
    use pb::AgentErrorKind as K;
    match e {
        AgentError::Unauthorized(_) => K::Unauthorized,
        AgentError::Revoked => K::Revoked,
        AgentError::Unreachable(_) => K::Unreachable,
        AgentError::Tls(_) => K::Tls,
        AgentError::PinMismatch { .. } => K::PinMismatch,
        AgentError::RelayBusy => K::RelayBusy,
        AgentError::TooManyDevices => K::TooManyDevices,
        AgentError::Protocol(_) => K::Protocol,
        AgentError::Handshake(_) => K::Handshake,
        AgentError::Timeout => K::Timeout,
        AgentError::SessionLost(_) => K::SessionLost,
    }
}

fn state_of(phase: &Phase) -> pb::AgentState {
    use pb::AgentState as S;
    match phase {
        Phase::Idle => S::Idle,
        Phase::NotEnrolled => S::NotEnrolled,
        Phase::Connecting => S::Connecting,
        Phase::Connected { .. } => S::Connected,
        Phase::BackingOff { .. } => S::BackingOff,
        Phase::Revoked => S::Revoked,
        Phase::Stopped => S::Stopped,
    }
}

/// The status the handle reports, in the API's terms.
pub fn status(agent: &Agent) -> pb::AgentStatus {
    let state = agent.state().borrow().clone();
    let phase = state_of(&state.phase);
    let (session_id, since, until) = match &state.phase {
        Phase::Connected { session_id, since } => (session_id.clone(), Some(*since), None),
        Phase::BackingOff { until } => (String::new(), None, Some(*until)),
        _ => (String::new(), None, None),
    };
    let target = agent.target();
    let service = agent.service_health();
    let requests = agent.requests();
    pb::AgentStatus {
        state: phase as i32,
        relay: target.as_ref().map(|t| t.relay.to_string()).unwrap_or_default(),
        session_id,
        since_unix_ms: ms(since),
        rtt_us: agent.rtt().map_or(0, |d| d.as_micros() as u64),
        in_flight: agent.in_flight() as u32,
        sessions: state.sessions,
        last_error_kind: state
            .last_error
            .as_ref()
            .map_or(pb::AgentErrorKind::Unspecified, error_kind) as i32,
        last_error: state.last_error.as_ref().map(ToString::to_string).unwrap_or_default(),
        backoff_until_unix_ms: ms(until),
        credential_expires_unix_ms: ms(agent.session_expires()),
        relay_pin: agent.relay_pin().unwrap_or_default(),
        pins: target.map(|t| t.pins).unwrap_or_default(),
        service: Some(pb::ServiceHealth {
            url: agent.config().upstream.to_string(),
            reachable: service.reachable,
            version: service.version.unwrap_or_default(),
            error: service.error.unwrap_or_default(),
            checked_unix_ms: ms(service.checked),
            models_loaded: service.models,
            models_available: service.available,
            models_loading: agent.models_loading(),
        }),
        requests: requests.received,
        refused: requests.refused,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

#[tonic::async_trait]
impl agent_server::Agent for Control {
    async fn status(
        &self,
        req: Request<pb::AgentStatusRequest>,
    ) -> Result<Response<pb::AgentStatus>, Status> {
        self.common.guard().check(&req, Access::Read)?;
        Ok(Response::new(status(&self.agent)))
    }

    async fn reconnect(
        &self,
        req: Request<pb::ReconnectRequest>,
    ) -> Result<Response<pb::ReconnectReply>, Status> {
        self.common.guard().check(&req, Access::Change)?;
        let was_connected = self.agent.state().borrow().is_connected();
        self.agent.reconnect().map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ReconnectReply { was_connected }))
    }

    async fn rotate_token(
        &self,
        req: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::RotateTokenReply>, Status> {
        self.common.guard().check(&req, Access::Change)?;
        use pb::rotate_token_request::How;
        let reply = match req.into_inner().how {
            Some(How::Rotate(true)) | None => {
                let r = self.agent.rotate().await.map_err(rotate_status)?;
                pb::RotateTokenReply {
                    credential_id: r.id,
                    stored: r.stored.display().to_string(),
                    in_band: true,
                }
            }
            Some(How::Rotate(false)) => {
                return Err(Status::invalid_argument("rotate must be true"));
            }
            Some(How::Install(token)) => {
                let i = self.agent.install_token(token).await.map_err(install_status)?;
                pb::RotateTokenReply {
                    credential_id: String::new(),
                    stored: i.stored.map(|p| p.display().to_string()).unwrap_or_default(),
                    in_band: i.in_band,
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollReply>, Status> {
        self.common.guard().check(&req, Access::Change)?;
        let req = req.into_inner();
        let token = (!req.token.is_empty()).then_some(req.token);
        let e = self.agent.enroll(&req.relay, token, req.pins).await.map_err(enroll_status)?;
        Ok(Response::new(pb::EnrollReply {
            relay: e.relay,
            stored: e.stored.display().to_string(),
            state: state_of(&e.state.phase) as i32,
            last_error: e.state.last_error.as_ref().map(ToString::to_string).unwrap_or_default(),
        }))
    }

    async fn log_level(
        &self,
        req: Request<pb::LogLevelRequest>,
    ) -> Result<Response<pb::LogLevelReply>, Status> {
        self.common.log_level(req)
    }

    type TraceStream = daemon::trace::TraceStream;

    async fn trace(
        &self,
        req: Request<pb::TraceRequest>,
    ) -> Result<Response<Self::TraceStream>, Status> {
        self.common.trace(req)
    }
}

fn enroll_status(e: crate::enroll::EnrollError) -> Status {
    use crate::enroll::EnrollError as E;
    match &e {
        E::Invalid(_) | E::NoToken => Status::invalid_argument(e.to_string()),
        E::ConfigWins { .. } | E::NoStateDir => Status::failed_precondition(e.to_string()),
        E::Store { .. } => Status::internal(e.to_string()),
    }
}

fn rotate_status(e: crate::RotateError) -> Status {
    use crate::RotateError as E;
    match &e {
        E::NoStateDir => Status::failed_precondition(e.to_string()),
        E::NotConnected => Status::unavailable(e.to_string()),
        // The relay said no: not this caller's permission on the socket.
        E::Refused { .. } => Status::failed_precondition(e.to_string()),
        E::Exchange(_) | E::Unexpected { .. } => Status::unavailable(e.to_string()),
        E::Store { .. } => Status::internal(e.to_string()),
    }
}

fn install_status(e: crate::InstallError) -> Status {
    use crate::InstallError as E;
    match &e {
        E::Invalid(_) => Status::invalid_argument(e.to_string()),
        E::Refused { .. } => Status::failed_precondition(e.to_string()),
        E::Exchange(_) | E::Unexpected(_) => Status::unavailable(e.to_string()),
        E::Store { .. } => Status::internal(e.to_string()),
    }
}
