//! relayd's control API (`tunnel.control.v1.Relay`) on its unix socket: a
//! thin adapter over the [`Relay`] handle. Each call checks its caller
//! ([`Guard`]), asks the handle, and translates; no logic of its own.

use std::time::{Duration, SystemTime};

use daemon::control::{Access, Common, Guard};
use daemon::trace::unix_ms;
use tonic::{Request, Response, Status};
use tunnel_proto::control::v1::{self as pb, relay_server};

use crate::Relay;
use crate::identity::{IdentityError, Role, Scope};

/// The service: the relay, its public address and who may call it.
pub struct Control {
    relay: Relay,
    listen: String,
    common: Common,
}

impl Control {
    pub fn new(relay: Relay, listen: std::net::SocketAddr, owner_only: bool) -> Self {
        let guard = Guard::new("relayd", owner_only);
        let common = Common::new(guard, relay.observer().clone(), true);
        Self { relay, listen: listen.to_string(), common }
    }

    /// The gRPC service, for [`daemon::control::start`] (or `serve`).
    pub fn server(self) -> relay_server::RelayServer<Self> {
        relay_server::RelayServer::new(self)
    }
}

fn ms(t: Option<SystemTime>) -> u64 {
    t.map_or(0, unix_ms)
}

fn identity_status(e: IdentityError) -> Status {
    match e {
        IdentityError::NoSigningKey => Status::failed_precondition(e.to_string()),
        IdentityError::Invalid(_) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl relay_server::Relay for Control {
    async fn status(
        &self,
        req: Request<pb::RelayStatusRequest>,
    ) -> Result<Response<pb::RelayStatus>, Status> {
        self.common.guard().check(&req, Access::Read)?;
        let r = &self.relay;
        let tunnels = r.tunnels();
        let tls = r.config().tls.as_ref();
        let (replica_id, replicas, cluster_error) = match r.cluster_view().await {
            None => (String::new(), Vec::new(), String::new()),
            Some(Err(e)) => (String::new(), Vec::new(), e),
            Some(Ok(v)) => (v.me, v.replicas.iter().map(replica).collect(), String::new()),
        };
        Ok(Response::new(pb::RelayStatus {
            replica_id,
            replicas,
            cluster_error,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            listen: self.listen.clone(),
            since_unix_ms: unix_ms(r.started()),
            tunnels: tunnels.len() as u64,
            in_flight: tunnels.iter().map(|t| t.in_flight() as u64).sum(),
            draining: r.is_draining(),
            buffered_bytes: r.buffered().current() as u64,
            tls_cert_file: tls.map(|t| t.cert_file.display().to_string()).unwrap_or_default(),
            tls_pin: tls.and_then(|t| t.pin()).unwrap_or_default(),
        }))
    }

    async fn list_tunnels(
        &self,
        req: Request<pb::ListTunnelsRequest>,
    ) -> Result<Response<pb::ListTunnelsReply>, Status> {
        self.common.guard().check(&req, Access::Read)?;
        let mut tunnels: Vec<pb::Tunnel> = self
            .relay
            .tunnels()
            .into_iter()
            .map(|t| pb::Tunnel {
                user: t.user().to_owned(),
                user_hash: self.relay.user_hash(t.user()),
                session_id: t.session_id().to_owned(),
                since_unix_ms: unix_ms(t.since()),
                agent: t.agent().to_owned(),
                protocol_version: t.protocol_version(),
                in_flight: t.in_flight() as u32,
                rtt_us: t.rtt().map_or(0, |d| d.as_micros() as u64),
                auth_id: t.auth_id().unwrap_or_default(),
                auth_expires_unix_ms: ms(t.auth_expires()),
                device: t.device().to_owned(),
                replica: String::new(),
            })
            .collect();
        if req.get_ref().cluster {
            match self.relay.cluster_view().await {
                None => {
                    return Err(Status::failed_precondition(
                        "this relay runs alone (no [cluster]): tunnelctl tunnels lists every agent",
                    ));
                }
                Some(Err(e)) => return Err(Status::unavailable(e)),
                Some(Ok(v)) => {
                    for t in &mut tunnels {
                        t.replica = v.me.clone();
                    }
                    for (user, device, replica, _) in v.devices {
                        if replica != v.me {
                            let user_hash = self.relay.user_hash(&user);
                            let row = pb::Tunnel {
                                user,
                                user_hash,
                                device,
                                replica,
                                ..Default::default()
                            };
                            tunnels.push(row);
                        }
                    }
                }
            }
        }
        tunnels.sort_by(|a, b| (&a.user, &a.device).cmp(&(&b.user, &b.device)));
        Ok(Response::new(pb::ListTunnelsReply { tunnels }))
    }

    async fn disconnect(
        &self,
        req: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectReply>, Status> {
        self.common.guard().check(&req, Access::Change)?;
        let req = req.into_inner();
        let device = (!req.device.is_empty()).then_some(req.device.as_str());
        let sessions = self.relay.disconnect(&req.user, device);
        Ok(Response::new(pb::DisconnectReply {
            disconnected: sessions > 0,
            sessions: sessions as u32,
        }))
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenReply>, Status> {
        self.common.guard().check(&req, Access::Change)?;
        let req = req.into_inner();
        if !crate::config::valid_user_id(&req.user) {
            return Err(Status::invalid_argument(format!("{:?} is not a valid user id", req.user)));
        }
        let reply = match pb::TokenRole::try_from(req.role) {
            Ok(pb::TokenRole::Agent) => {
                if req.ttl_seconds != 0 || !req.paths.is_empty() || !req.models.is_empty() {
                    return Err(Status::invalid_argument(
                        "agent credentials take no lifetime or scope (they are revoked, not expired)",
                    ));
                }
                let device = (!req.device.is_empty()).then_some(req.device.as_str());
                let c = self
                    .relay
                    .issue_credential(&req.user, device)
                    .await
                    .map_err(identity_status)?;
                pb::IssueTokenReply { id: c.id, token: c.secret, expires_unix_ms: 0 }
            }
            Ok(pb::TokenRole::Client) => {
                if !req.device.is_empty() {
                    return Err(Status::invalid_argument(
                        "a device names an agent's credential; client tokens take none",
                    ));
                }
                let ttl = match req.ttl_seconds {
                    0 => Duration::from_secs(3600),
                    s => Duration::from_secs(s),
                };
                let scope = (!req.paths.is_empty() || !req.models.is_empty())
                    .then_some(Scope { paths: req.paths, models: req.models });
                let m = self
                    .relay
                    .mint(&req.user, Role::Client, ttl, scope)
                    .map_err(identity_status)?;
                pb::IssueTokenReply {
                    id: m.id,
                    token: m.token,
                    expires_unix_ms: unix_ms(m.expires),
                }
            }
            _ => return Err(Status::invalid_argument("role must be agent or client")),
        };
        tracing::info!(user = %self.relay.user_hash(&req.user), id = %reply.id, "token issued through the control socket");
        Ok(Response::new(reply))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenReply>, Status> {
        self.common.guard().check(&req, Access::Change)?;
        let id = req.into_inner().id;
        let r = self.relay.revoke(&id).await.map_err(identity_status)?;
        tracing::info!(%id, sessions = r.sessions_ended, "{id} revoked through the control socket; {} sessions ended", r.sessions_ended);
        Ok(Response::new(pb::RevokeTokenReply {
            revoked: r.newly,
            sessions_ended: r.sessions_ended as u32,
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

    async fn reload(
        &self,
        req: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadReply>, Status> {
        self.common.guard().check(&req, Access::Change)?;
        let reloaded =
            self.relay.reload().map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::ReloadReply { reloaded }))
    }
}

fn replica(r: &crate::cluster::registry::Replica) -> pb::Replica {
    pb::Replica {
        id: r.id.clone(),
        host: r.host.clone(),
        listen: r.listen.clone(),
        up_ms: (r.up_secs.max(0.0) * 1e3) as u64,
        heartbeat_age_ms: (r.heartbeat_age_secs.max(0.0) * 1e3) as u64,
        devices: r.devices.max(0) as u64,
    }
}
