//! relayd's configuration file as the operator writes it: every table and
//! key, unknown ones refused. [`super::Config`] is what it resolves into.

use std::net::SocketAddr;
use std::path::PathBuf;

use daemon::config::{Human, Limit};
use serde::Deserialize;

use super::IdentityFile;

/// The TOML file as written by the operator. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address the HTTP listener binds (web clients and agents).
    pub listen: Option<SocketAddr>,
    /// Tokio worker threads; 0 or absent = one per core.
    pub worker_threads: Option<usize>,
    /// Address for Prometheus `GET /metrics`; absent = no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub users: Vec<UserFile>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    #[serde(default)]
    pub liveness: link::settings::LivenessFile,
    /// Serve HTTPS/WSS on `listen`; absent = plain HTTP (behind a TLS proxy).
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default)]
    pub proxy: ProxyFile,
    #[serde(default)]
    pub http: HttpFile,
    #[serde(default)]
    pub identity: IdentityFile,
    #[serde(default)]
    pub control: daemon::control::ControlFile,
    /// Relays run as replicas over one PostgreSQL database (opt-in).
    #[serde(default)]
    pub cluster: crate::cluster::ClusterFile,
    /// Where relayd keeps what must survive a restart: issued credentials
    /// and revocations. Default `$STATE_DIRECTORY` (systemd's
    /// `StateDirectory=`); without either, kept in memory.
    pub state_dir: Option<PathBuf>,
}

/// `[proxy]`: reverse proxies in front of the relay.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    /// Addresses or CIDR networks of proxies whose `X-Forwarded-For` (and
    /// other forwarding headers) are believed.
    #[serde(default)]
    pub trusted: Vec<String>,
}

/// `[http]`: what crosses the tunnel.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    /// Forward the web client's `Cookie` header to the local service.
    pub forward_cookies: Option<bool>,
    /// Methods beyond GET, HEAD, POST, PUT, DELETE, PATCH and OPTIONS that
    /// the tunnel carries (CONNECT and TRACE never).
    #[serde(default)]
    pub extra_methods: Vec<String>,
    /// Browser origins allowed to call tunnels (`["*"]` for any); the relay
    /// answers their CORS preflights itself, without a token.
    #[serde(default)]
    pub cors_origins: Vec<String>,
}

/// `[tls]`: both files, or neither (plain HTTP).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the leaf certificate.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    pub id: String,
    /// Token the user's agent presents (`Authorization: Bearer`). Prefer
    /// `agent_token_file`.
    pub agent_token: Option<String>,
    pub agent_token_file: Option<PathBuf>,
    /// A static token web clients may present for this user's routes.
    pub client_token: Option<String>,
    pub client_token_file: Option<PathBuf>,
    /// The user's routes need no token at all. Off unless set: a relay
    /// never serves open routes by accident.
    pub public: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub stream_window: Option<u32>,
    pub max_chunk_bytes: Option<u32>,
    /// Requests in flight per agent session (the agent's own `max_streams`
    /// may lower it).
    pub max_streams: Option<u32>,
    /// The name `max_streams` used to have; still read, with a warning.
    pub max_streams_per_agent: Option<u32>,
    pub max_request_body: Option<u64>,
    pub legacy_max_body: Option<usize>,
    pub handshakes_per_second: Option<u32>,
    pub refused_handshakes_per_minute: Option<u32>,
    pub max_headers: Option<u32>,
    /// Requests per minute one user's tunnel takes (a burst of as many,
    /// then that rate); absent or 0: no limit.
    pub requests_per_minute: Option<u32>,
    /// Agent handshakes per minute one user may make (valid ones).
    pub agent_handshakes_per_minute: Option<u32>,
    /// Agents connected at once.
    pub max_tunnels: Option<usize>,
    /// Devices one user may have connected at once.
    pub max_devices_per_user: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    pub ack: Option<Human>,
    pub first_byte: Option<Human>,
    pub hello: Option<Human>,
    pub header_read: Option<Human>,
    /// A duration, or "off".
    pub idle: Option<Limit>,
    pub total: Option<Limit>,
    #[serde(default)]
    pub route: Vec<RouteTimeoutsFile>,
    /// Time in-flight streams get to finish on shutdown.
    pub drain: Option<Human>,
}

/// Timeouts for requests whose path (at the local service) starts with
/// `prefix`; unset fields keep the global values.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeoutsFile {
    pub prefix: String,
    pub first_byte: Option<Human>,
    pub idle: Option<Limit>,
    pub total: Option<Limit>,
}
