//! agentd's control API (`tunnel.control.v1.Agent`) on its unix socket: a
//! thin adapter over the [`Agent`] handle. Each call checks its caller
//! ([`Guard`]), asks the handle, and translates; no logic of its own.

use std::sync::Arc;
use std::time::SystemTime;

use daemon::control::{Access, Guard};
use daemon::trace::{Filter, unix_ms};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tunnel_proto::control::v1::{self as pb, agent_server};

use crate::{Agent, AgentError, Phase};

/// The service: the agent and who may call it.
pub struct Control {
    agent: Arc<Agent>,
    guard: Guard,
}

impl Control {
    pub fn new(agent: Arc<Agent>, owner_only: bool) -> Self {
        Self { agent, guard: Guard::new("agentd", owner_only) }
    }

    /// Serves on `listener` until `stop`.
    pub async fn serve(
        self,
        listener: UnixListener,
        stop: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        daemon::control::serve(agent_server::AgentServer::new(self), listener, stop).await
    }
}

fn ms(t: Option<SystemTime>) -> u64 {
    t.map_or(0, unix_ms)
}

fn error_kind(e: &AgentError) -> pb::AgentErrorKind {
    use pb::AgentErrorKind as K;
    match e {
        AgentError::Unauthorized(_) => K::Unauthorized,
        AgentError::Unreachable(_) => K::Unreachable,
        AgentError::Tls(_) => K::Tls,
        AgentError::PinMismatch { .. } => K::PinMismatch,
        AgentError::RelayBusy => K::RelayBusy,
        AgentError::Protocol(_) => K::Protocol,
        AgentError::Handshake(_) => K::Handshake,
        AgentError::Timeout => K::Timeout,
        AgentError::SessionLost(_) => K::SessionLost,
    }
}

/// The status the handle reports, in the API's terms.
pub fn status(agent: &Agent) -> pb::AgentStatus {
    use pb::AgentState as S;
    let state = agent.state().borrow().clone();
    let (phase, session_id, since, until) = match &state.phase {
        Phase::Idle => (S::Idle, String::new(), None, None),
        Phase::Connecting => (S::Connecting, String::new(), None, None),
        Phase::Connected { session_id, since } => {
            (S::Connected, session_id.clone(), Some(*since), None)
        }
        Phase::BackingOff { until } => (S::BackingOff, String::new(), None, Some(*until)),
        Phase::Stopped => (S::Stopped, String::new(), None, None),
    };
    let service = agent.service_health();
    let requests = agent.requests();
    pb::AgentStatus {
        state: phase as i32,
        relay: agent.config().relay.to_string(),
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
        pins: agent.config().pins.clone(),
        service: Some(pb::ServiceHealth {
            url: agent.config().upstream.to_string(),
            reachable: service.reachable,
            version: service.version.unwrap_or_default(),
            error: service.error.unwrap_or_default(),
            checked_unix_ms: ms(service.checked),
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
        self.guard.check(&req, Access::Read)?;
        Ok(Response::new(status(&self.agent)))
    }

    async fn reconnect(
        &self,
        req: Request<pb::ReconnectRequest>,
    ) -> Result<Response<pb::ReconnectReply>, Status> {
        self.guard.check(&req, Access::Change)?;
        let was_connected = self.agent.state().borrow().is_connected();
        self.agent.reconnect().map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ReconnectReply { was_connected }))
    }

    async fn rotate_token(
        &self,
        req: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::RotateTokenReply>, Status> {
        self.guard.check(&req, Access::Change)?;
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

    type TraceStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::TraceEvent, Status>> + Send + 'static>,
    >;

    async fn trace(
        &self,
        req: Request<pb::TraceRequest>,
    ) -> Result<Response<Self::TraceStream>, Status> {
        self.guard.check(&req, Access::Read)?;
        let req = req.into_inner();
        let observer = self.agent.observer();
        let bodies = req.bodies && observer.trace_bodies;
        let limit = (req.limit > 0).then_some(req.limit);
        let sub = observer.taps.subscribe(Filter::of(&req), limit, bodies);
        Ok(Response::new(sub.into_stream()))
    }
}

fn rotate_status(e: crate::RotateError) -> Status {
    use crate::RotateError as E;
    match &e {
        E::NoStateDir => Status::failed_precondition(e.to_string()),
        E::NotConnected => Status::unavailable(e.to_string()),
        // The relay said no: not this caller's permission on the socket.
        E::Refused { .. } => Status::failed_precondition(e.to_string()),
        E::Exchange(_) | E::Unexpected(_) => Status::unavailable(e.to_string()),
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
