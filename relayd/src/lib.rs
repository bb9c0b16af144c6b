//! relayd: the cloud side of the tunnel.
//!
//! Web clients call `ALL /api/tunnel/{user}/{*path}`; each user's agent holds
//! one WebSocket on `GET /ws/tunnel`. The relay routes a request to the
//! user's agent session ([`hub`]), correlates the answer by stream id
//! ([`session`]) and streams it back chunk by chunk ([`forward`], [`body`]).
//!
//! [`Relay::new`] does no I/O; [`Relay::run`] takes any bound listener and a
//! shutdown token, so tests run the relay in-process. The [`Relay`] is also
//! its handle: the tunnels it holds ([`Relay::tunnels`], [`Tunnel`]), and
//! disconnecting one.

pub mod admin;
pub mod admission;
mod affinity;
mod agents;
mod auth;
mod body;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
mod cors;
mod deadline;
mod device;
mod edge;
mod forward;
mod hop;
mod hub;
pub mod identity;
mod listener;
mod metrics;
mod peer;
mod presence;
mod response;
mod revocations;
mod route;
mod server;
pub mod service;
mod session;
mod shape;
mod stall;
mod state;
pub mod tls;
mod union;
mod upload;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tunnel_proto::flow::BufferGauge;

pub use config::{Config, ConfigFile};

use crate::identity::{Identity, IdentityError, IssuedCredential, Minted, Role, Scope};
use crate::session::{CloseReason, Session};
use crate::state::Shared;

/// What a relay keeps across restarts, opened by [`open_state`].
pub struct State {
    pub identity: Identity,
    /// The key user ids are hashed with in logs.
    pub log_key: Vec<u8>,
}

/// What went wrong opening the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{0}")]
    Store(#[from] identity::store::StoreError),
    #[error("{0}")]
    Key(#[from] identity::keys::KeyError),
}

/// Opens the credential store and the log key in `config.state_dir`
/// (creating them on first start); in memory without a state directory.
pub async fn open_state(config: &Config) -> Result<State, StateError> {
    let configured_key = config.identity.user_hash_key.clone();
    // A replica keeps nothing of its own: its keys are configured (the
    // same on every replica) and its store is the database.
    let dir = config.state_dir.as_ref().filter(|_| config.cluster.is_none());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)
            .map_err(|source| StateError::Io { path: dir.clone(), source })?;
    }
    let Some(store) =
        identity::open_store(config.cluster.as_ref(), dir.map(|d| d.as_path())).await?
    else {
        return Ok(State {
            identity: Identity::in_memory(config.identity_config(), config.static_tokens()),
            log_key: configured_key.unwrap_or_else(random_key),
        });
    };
    let Some(dir) = dir else {
        let identity =
            Identity::open(config.identity_config(), config.static_tokens(), store).await?;
        // check_config made sure the key is configured.
        return Ok(State { identity, log_key: configured_key.unwrap_or_else(random_key) });
    };
    let io = |source| StateError::Io { path: dir.clone(), source };
    let mut identity_config = config.identity_config();
    if identity_config.signing_key_file.is_none() {
        // Like an SSH host key: made on first start, kept from then on.
        let path = dir.join(admin::SIGNING_KEY);
        let signer = identity::keys::Signer::load_or_create(&path)?;
        identity_config.key_summary.insert(
            0,
            format!("EdDSA {} (own signing key {}, made by relayd)", signer.kid(), path.display()),
        );
        identity_config.signer = Some(Arc::new(signer));
        identity_config.signing_key_file = Some(path);
    }
    let identity = Identity::open(identity_config, config.static_tokens(), store).await?;
    let key_path = dir.join("log.key");
    let log_key = match (configured_key, std::fs::read(&key_path)) {
        (Some(k), _) => k,
        (None, Ok(k)) if k.len() >= 32 => k,
        _ => {
            let key = random_key();
            daemon::config::write_secret_bytes(&key_path, &key).map_err(io)?;
            key
        }
    };
    Ok(State { identity, log_key })
}

fn random_key() -> Vec<u8> {
    let mut key = vec![0u8; 32];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key);
    key
}

/// The cluster as the database shows it ([`Relay::cluster_view`]).
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// This replica's id.
    pub me: String,
    pub replicas: Vec<cluster::registry::Replica>,
    /// (user, device, replica, epoch) of every connected device.
    pub devices: Vec<(String, String, String, i64)>,
}

/// What a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// It was not revoked before.
    pub newly: bool,
    /// Live sessions it ended.
    pub sessions_ended: usize,
}

/// A relay, ready to serve on any listener; cheap to clone.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

impl Relay {
    /// A relay with its credentials in memory (see [`Relay::with_state`]).
    pub fn new(config: Config) -> Self {
        let identity = Identity::in_memory(config.identity_config(), config.static_tokens());
        let log_key = config.identity.user_hash_key.clone().unwrap_or_else(random_key);
        Self::with_state(config, State { identity, log_key })
    }

    /// A relay over a state opened with [`open_state`].
    pub fn with_state(config: Config, state: State) -> Self {
        let log_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &state.log_key);
        Self { shared: Arc::new(Shared::new(config, Arc::new(state.identity), log_key)) }
    }

    /// Who tokens speak for.
    pub fn identity(&self) -> &Identity {
        &self.shared.identity
    }

    /// Mints a JWT (a client token, a share token with `scope`, or an
    /// agent access token) for `user`, valid for `ttl`.
    pub fn mint(
        &self,
        user: &str,
        role: Role,
        ttl: Duration,
        scope: Option<Scope>,
    ) -> Result<Minted, IdentityError> {
        self.shared.identity.mint(user, role, ttl, scope)
    }

    /// Issues a long-lived agent credential for `user`'s `device` (`None`:
    /// the user's default device).
    pub async fn issue_credential(
        &self,
        user: &str,
        device: Option<&str>,
    ) -> Result<IssuedCredential, IdentityError> {
        self.shared.identity.issue_credential(user, device, None).await
    }

    /// Revokes a credential id or a token's `jti` and ends the sessions it
    /// authorizes (close code 4004): here at once, and on every relay
    /// sharing the credential store when the store tells it.
    pub async fn revoke(&self, id: &str) -> Result<Revoked, IdentityError> {
        let newly = self.shared.identity.revoke(id, None).await?;
        let sessions_ended = revocations::end_sessions(&self.shared, id);
        Ok(Revoked { newly, sessions_ended })
    }

    /// SIGHUP: `changed` is what the configuration file, read again, sets
    /// differently (named in the log as taking a restart), or why it does
    /// not load; then the certificate and key are reloaded as
    /// [`Relay::reload`] does.
    pub async fn reload_after_signal(&self, changed: Result<Vec<String>, daemon::ConfigError>) {
        match changed {
            Err(e) => tracing::warn!(
                error = %e,
                "the configuration file does not load ({e}); the running configuration stays: fix it and reload again"
            ),
            Ok(keys) if !keys.is_empty() => tracing::warn!(
                settings = %keys.join(", "),
                "changed in the configuration file: {}; they take effect at the next restart (systemctl restart relayd)",
                keys.join(", ")
            ),
            Ok(_) => {}
        }
        let relay = self.clone();
        match tokio::task::spawn_blocking(move || relay.reload()).await {
            Ok(Ok(reloaded)) if reloaded.is_empty() => {
                tracing::info!("no certificate to reload without [tls]")
            }
            Ok(Ok(_)) => tracing::info!("TLS certificate and key reloaded"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot reload TLS: {e}; keeping the certificate in use")
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS reload failed: {e}; keeping the certificate in use")
            }
        }
    }

    /// Reloads what can change without a restart (the TLS certificate and
    /// key), as SIGHUP does; what was reloaded.
    pub fn reload(&self) -> Result<Vec<String>, tls::TlsError> {
        match &self.shared.config.tls {
            Some(tls) => {
                tls.reload()?;
                Ok(vec![format!("TLS certificate {}", tls.cert_file.display())])
            }
            None => Ok(Vec::new()),
        }
    }

    /// What the relay's trace and request metrics are recorded with.
    pub fn observer(&self) -> &Arc<daemon::observe::Observer> {
        &self.shared.observer
    }

    /// When the relay started.
    pub fn started(&self) -> SystemTime {
        self.shared.started
    }

    /// A round trip through the accept loop (the service manager's watchdog
    /// is fed only when it answers), then the one-line status for
    /// `systemctl status`. A draining relay answers without the loop.
    pub async fn probe(&self) -> String {
        if !self.is_draining() {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if self.shared.probes.send(reply).await.is_ok() {
                let _ = answer.await;
            }
        }
        self.status_line()
    }

    /// `serving 3 tunnels, 5 streams in flight`, or `draining: ...`.
    pub fn status_line(&self) -> String {
        let sessions = self.shared.router.local().sessions();
        let streams: usize = sessions.iter().map(|s| s.in_flight()).sum();
        let what = format!(
            "{} tunnel{}, {streams} stream{} in flight",
            sessions.len(),
            if sessions.len() == 1 { "" } else { "s" },
            if streams == 1 { "" } else { "s" },
        );
        if self.is_draining() { format!("draining: {what}") } else { format!("serving {what}") }
    }

    /// Whether it drains (shutting down).
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// `user` as logs name it (a keyed hash).
    pub fn user_hash(&self, user: &str) -> String {
        self.shared.user_hash(user)
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Serves on `listener` until `shutdown` is cancelled, then drains:
    /// stops accepting, answers new requests 503, sends `goaway` to agents,
    /// lets in-flight streams finish until `drain_timeout`, then ends the
    /// rest and closes the sessions.
    pub async fn run(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let identity = self.shared.identity.clone();
        tokio::spawn(async move { identity.load_jwks().await });
        let listener_addr = listener.local_addr();
        // Revocations made by any relay sharing the store end sessions
        // here, for as long as the relay serves (in this task: a relay
        // that stopped leaves nothing behind).
        let served = CancellationToken::new();
        let serving = async {
            let result = listener::serve(self.shared.clone(), listener, shutdown).await;
            served.cancel();
            result
        };
        let following = revocations::follow(self.shared.clone(), served.clone());
        // Replicas: where this one's devices are, for as long as it serves.
        let present = async {
            let Some(db) = &self.shared.config.cluster else { return };
            let Ok(addr) = listener_addr else { return };
            // Forwarded requests, when this replica takes them.
            let mut peer = None;
            if let Some(p) = &db.peering {
                match TcpListener::bind(p.listen).await {
                    Ok(l) => {
                        let serving =
                            peer::serve(self.shared.clone(), l, p.clone(), served.clone());
                        tokio::spawn(serving);
                        peer = Some(p.address.clone());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for other replicas on {}: {e}; this replica takes no forwarded requests", p.listen);
                    }
                }
            }
            let me = presence::Me::new(addr, peer);
            presence::run(self.shared.clone(), db.clone(), me, served.clone()).await;
        };
        tokio::join!(serving, following, present).0
    }

    /// The tunnel of `user`'s newest connected device, if any.
    pub fn tunnel(&self, user: &str) -> Option<Tunnel> {
        self.shared.router.local().pick(user, |s| s.last().cloned()).map(Tunnel)
    }

    /// The tunnel of `user`'s `device`, if it is connected.
    pub fn device_tunnel(&self, user: &str, device: &str) -> Option<Tunnel> {
        self.shared.router.local().device(user, device).map(Tunnel)
    }

    /// Every connected tunnel.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.shared.router.local().sessions().into_iter().map(Tunnel).collect()
    }

    /// Run as a replica: this one's id, the registry's replicas and where
    /// every device is, read from the database (for operators: `tunnelctl
    /// status` and `tunnelctl tunnels --cluster`); `None` for one relay.
    pub async fn cluster_view(&self) -> Option<Result<ClusterView, String>> {
        use cluster::registry;
        let db = self.shared.config.cluster.as_ref()?;
        let me = self.shared.directory.me().unwrap_or_default().to_owned();
        let read = async {
            let c = db.connect().await?;
            Ok::<_, cluster::DbError>(ClusterView {
                me,
                replicas: registry::replicas(db, &c).await?,
                devices: registry::devices(db, &c).await?,
            })
        };
        Some(read.await.map_err(|e| e.to_string()))
    }

    /// Agents connected.
    pub fn tunnel_count(&self) -> usize {
        self.shared.router.local().len()
    }

    /// Ends the sessions of `user`'s devices, or of its one `device` (their
    /// streams fail with 502); their agents reconnect with backoff. The
    /// number of sessions ended.
    pub fn disconnect(&self, user: &str, device: Option<&str>) -> usize {
        let sessions = self.shared.router.local().devices(user);
        let ended = sessions.into_iter().filter(|s| device.is_none_or(|d| s.device == d));
        ended.map(|s| Tunnel(s).disconnect()).count()
    }

    /// Waits until `pred` holds; re-checked whenever a tunnel comes or goes.
    pub async fn wait_until(&self, mut pred: impl FnMut(&Relay) -> bool) {
        self.shared.router.local().wait_until(|_| pred(self)).await
    }

    /// Bytes of response bodies buffered in the relay right now and at peak.
    pub fn buffered(&self) -> &BufferGauge {
        &self.shared.gauge
    }

    /// The Prometheus text `GET /metrics` answers.
    pub fn metrics(&self) -> String {
        metrics::render(&self.shared)
    }
}

/// A connected agent, as operators and tests see it.
#[derive(Clone)]
pub struct Tunnel(Arc<Session>);

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("user", &self.0.user)
            .field("session_id", &self.0.id)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    pub fn user(&self) -> &str {
        &self.0.user
    }

    pub fn session_id(&self) -> &str {
        &self.0.id
    }

    /// When the agent connected.
    pub fn since(&self) -> SystemTime {
        self.0.connected_at
    }

    /// What the agent called itself in `hello` (`agentd/0.1.0`).
    pub fn agent(&self) -> &str {
        &self.0.agent
    }

    /// The device the agent serves as under its user.
    pub fn device(&self) -> &str {
        &self.0.device
    }

    /// 0 for an original agent, else the negotiated version.
    pub fn protocol_version(&self) -> u32 {
        self.0.version
    }

    /// Requests in flight through this tunnel.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight()
    }

    /// Last measured ping round-trip time to the agent.
    pub fn rtt(&self) -> Option<Duration> {
        self.0.rtt()
    }

    /// The credential id or token id the session is authorized by.
    pub fn auth_id(&self) -> Option<String> {
        self.0.auth_id()
    }

    /// When the session's authorization ends unless the agent renews it.
    pub fn auth_expires(&self) -> Option<SystemTime> {
        self.0.auth_expires()
    }

    /// Ends the session; its streams fail with 502.
    pub fn disconnect(&self) {
        self.0.close(CloseReason::OperatorDisconnect);
    }

    /// Resolves once the session has ended (whatever ended it).
    pub async fn closed(&self) {
        self.0.closed().await
    }
}
