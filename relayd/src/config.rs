//! relayd configuration: the strict on-disk file and the resolved `Config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use daemon::Resolve;
use daemon::config::{Human, Limit, at_least_one, duration, positive, secret};
use serde::Serialize;

use tunnel_proto::Limits;
use tunnel_proto::limits::LimitOverrides;

mod file;
mod identity;

/// User ids are identity's to define; the configuration checks them.
pub use crate::identity::valid_user_id;
pub use identity::{IdentityFile, KeyFile, private_file};

pub use daemon::ConfigError;

pub use crate::tls::Tls;
pub use file::{
    ConfigFile, HttpFile, LimitsFile, ProxyFile, RouteTimeoutsFile, TimeoutsFile, TlsFile, UserFile,
};

/// The timeouts that apply to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// Forward -> response head (504 when it passes).
    #[serde(serialize_with = "duration::show")]
    pub first_byte: Duration,
    /// Longest pause between two body chunks once the response started.
    #[serde(serialize_with = "duration::show_limit")]
    pub idle: Option<Duration>,
    /// Whole exchange, head and body.
    #[serde(serialize_with = "duration::show_limit")]
    pub total: Option<Duration>,
}

/// Route-specific timeouts, matched by path prefix.
#[derive(Debug, Clone, Serialize)]
pub struct RouteTimeouts {
    pub prefix: String,
    pub timeouts: Timeouts,
}

/// The shortest `[timeouts] ack`: an agent acknowledges only requests whose
/// response head takes longer than 100 ms.
pub const ACK_FLOOR: Duration = Duration::from_secs(1);

/// The resolved configuration relayd runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub listen: SocketAddr,
    pub worker_threads: usize,
    pub metrics_listen: Option<SocketAddr>,
    /// HTTPS/WSS on `listen` when set.
    pub tls: Option<Tls>,
    /// The control socket (`tunnelctl`); none by default in tests.
    pub control: daemon::control::Control,
    #[serde(skip)]
    pub users: Vec<User>,
    /// Limits announced to agents in `welcome`.
    pub limits: Limits,
    /// Largest request body a web client may send (413 above it).
    pub max_request_body: u64,
    /// Largest request body sent to an original (version 0) agent, which
    /// takes the body inline in one message.
    pub legacy_max_body: usize,
    /// Agent handshakes with a valid credential admitted per second; above
    /// it agents get 503 and retry with backoff (a relay restart brings
    /// everyone back at once).
    pub handshakes_per_second: u32,
    /// Refused agent handshakes one source address may make: this many at
    /// once, then this many per minute; beyond it the source gets 429.
    pub refused_handshakes_per_minute: u32,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: crate::admission::TrustedProxies,
    /// The web client's `Cookie` reaches the local service.
    pub forward_cookies: bool,
    /// Methods carried beyond the standard ones.
    pub extra_methods: Vec<String>,
    /// Browser origins allowed to call tunnels (`*` for any).
    pub cors_origins: Vec<String>,
    /// Requests per minute per user; `None`: no limit.
    pub requests_per_minute: Option<u32>,
    /// Valid agent handshakes per minute per user.
    pub agent_handshakes_per_minute: u32,
    /// Agents connected at once (503 to more).
    pub max_tunnels: usize,
    /// Devices one user may have connected at once (409 to more).
    pub max_devices_per_user: usize,
    /// How tokens are verified and minted.
    pub identity: crate::identity::IdentityConfig,
    /// Issued credentials and revocations live here (`credentials.redb`).
    pub state_dir: Option<PathBuf>,
    /// Replicas over one PostgreSQL database (`[cluster]`): credentials
    /// and revocations live there instead.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Time an agent that listed `ack` has to acknowledge a request (504).
    #[serde(serialize_with = "duration::show")]
    pub ack_timeout: Duration,
    /// Time from forwarding a request until the response head arrives (504).
    #[serde(serialize_with = "duration::show")]
    pub first_byte_timeout: Duration,
    /// Longest pause between body chunks once a response started.
    #[serde(serialize_with = "duration::show_limit")]
    pub idle_timeout: Option<Duration>,
    /// Longest whole exchange; off by default (generations and pulls run long).
    #[serde(serialize_with = "duration::show_limit")]
    pub total_timeout: Option<Duration>,
    /// Overrides by path prefix, longest prefix first.
    pub route_timeouts: Vec<RouteTimeouts>,
    /// On SIGTERM, time in-flight streams get before they are ended.
    #[serde(serialize_with = "duration::show")]
    pub drain_timeout: Duration,
    /// Time a connection has to send a request's headers (also how long an
    /// idle keep-alive connection stays open).
    #[serde(serialize_with = "duration::show")]
    pub header_read_timeout: Duration,
    /// Time an agent that offered the v1 subprotocol has to send `hello`.
    #[serde(serialize_with = "duration::show")]
    pub hello_timeout: Duration,
    /// How the relay watches each agent: pings and missed intervals.
    pub liveness: link::settings::Liveness,
}

/// One user of `[[users]]`: static tokens, or a public tunnel.
#[derive(Clone, Default)]
pub struct User {
    pub id: String,
    pub agent_token: Option<String>,
    pub client_token: Option<String>,
    pub public: bool,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            worker_threads: 0,
            metrics_listen: None,
            control: daemon::control::Control::default(),
            tls: None,
            users: Vec::new(),
            limits: Limits::default(),
            max_request_body: 64 * 1024 * 1024 * 1024,
            legacy_max_body: 16 * 1024 * 1024,
            handshakes_per_second: 200,
            refused_handshakes_per_minute: 20,
            trusted_proxies: Default::default(),
            forward_cookies: false,
            extra_methods: Vec::new(),
            cors_origins: Vec::new(),
            requests_per_minute: None,
            agent_handshakes_per_minute: 30,
            max_tunnels: 100_000,
            max_devices_per_user: 8,
            identity: crate::identity::IdentityConfig::default(),
            state_dir: None,
            cluster: None,
            ack_timeout: Duration::from_secs(30),
            first_byte_timeout: Duration::from_secs(300),
            idle_timeout: Some(Duration::from_secs(300)),
            total_timeout: None,
            route_timeouts: Vec::new(),
            drain_timeout: Duration::from_secs(20),
            hello_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            liveness: link::settings::Liveness::default(),
        }
    }
}

impl Resolve for ConfigFile {
    type Config = Config;

    /// Applies defaults and checks every value; secrets in files are read.
    fn resolve(mut self) -> Result<Config, ConfigError> {
        let routes = std::mem::take(&mut self.timeouts.route);
        let mut config = self.resolve_global()?;
        for r in routes {
            if !r.prefix.starts_with('/') {
                return Err(ConfigError::Invalid(format!(
                    "[[timeouts.route]] prefix {:?} must start with /",
                    r.prefix
                )));
            }
            let base = config.timeouts_for("");
            let timeouts = Timeouts {
                first_byte: positive(r.first_byte.map(Human::get), base.first_byte, "first_byte")?,
                idle: r.idle.map_or(base.idle, Limit::get),
                total: r.total.map_or(base.total, Limit::get),
            };
            config.route_timeouts.push(RouteTimeouts { prefix: r.prefix, timeouts });
        }
        config.route_timeouts.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(config)
    }
}

impl ConfigFile {
    fn resolve_global(mut self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let cluster = std::mem::take(&mut self.cluster).resolve()?;
        let max_streams = match (self.limits.max_streams, self.limits.max_streams_per_agent) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "[limits] max_streams_per_agent is the old name of max_streams: set only max_streams",
                ));
            }
            (None, Some(s)) => {
                tracing::warn!(
                    "[limits] max_streams_per_agent is now called max_streams; rename it (the old name still works)"
                );
                Some(s)
            }
            (s, None) => s,
        };
        let limits = link::settings::limits(LimitOverrides {
            stream_window: self.limits.stream_window,
            max_chunk_bytes: self.limits.max_chunk_bytes,
            max_streams,
            max_headers: self.limits.max_headers,
        })?;
        let mut users = Vec::with_capacity(self.users.len());
        for u in self.users {
            if !valid_user_id(&u.id) {
                return Err(ConfigError::Invalid(format!(
                    "user id {:?}: use 1-64 characters from [A-Za-z0-9._-]",
                    u.id
                )));
            }
            if users.iter().any(|x: &User| x.id == u.id) {
                return Err(ConfigError::Invalid(format!("user {:?} is listed twice", u.id)));
            }
            let agent_token = user_secret(&u.id, "agent_token", u.agent_token, u.agent_token_file)?;
            let client_token =
                user_secret(&u.id, "client_token", u.client_token, u.client_token_file)?;
            let public = u.public.unwrap_or(false);
            if agent_token.is_none() && client_token.is_none() && !public {
                return Err(ConfigError::Invalid(format!(
                    "user {:?} has no agent_token, no client_token and is not public: nothing to configure",
                    u.id
                )));
            }
            users.push(User { id: u.id, agent_token, client_token, public });
        }
        distinct_tokens(&users)?;
        let public: Vec<String> = users.iter().filter(|u| u.public).map(|u| u.id.clone()).collect();
        let trusted_proxies = self
            .proxy
            .trusted
            .iter()
            .map(|t| t.parse().map_err(|e| ConfigError::Invalid(format!("[proxy] trusted: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let extra_methods = self
            .http
            .extra_methods
            .into_iter()
            .map(|m| match m.as_str() {
                "CONNECT" | "TRACE" => Err(ConfigError::Invalid(format!(
                    "[http] extra_methods: {m} cannot cross the tunnel"
                ))),
                _ if http::Method::from_bytes(m.as_bytes()).is_err()
                    || !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') =>
                {
                    Err(ConfigError::Invalid(format!(
                        "[http] extra_methods: {m:?} is not a method name (upper-case letters, - and _)"
                    )))
                }
                _ => Ok(m),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            listen: self.listen.unwrap_or(d.listen),
            worker_threads: self.worker_threads.unwrap_or(0),
            metrics_listen: self.metrics_listen,
            control: self.control.resolve("relayd"),
            tls: match (self.tls.cert_file, self.tls.key_file) {
                (None, None) => None,
                (Some(cert_file), Some(key_file)) => Some(
                    crate::tls::load(&cert_file, &key_file)
                        .map_err(|e| ConfigError::Invalid(format!("[tls] {e}")))?,
                ),
                _ => {
                    return Err(ConfigError::Invalid(
                        "[tls] needs both cert_file and key_file".into(),
                    ));
                }
            },
            users,
            limits,
            max_request_body: self.limits.max_request_body.unwrap_or(d.max_request_body),
            legacy_max_body: self.limits.legacy_max_body.unwrap_or(d.legacy_max_body),
            handshakes_per_second: at_least_one(
                self.limits.handshakes_per_second,
                d.handshakes_per_second,
                "[limits] handshakes_per_second",
            )?,
            refused_handshakes_per_minute: at_least_one(
                self.limits.refused_handshakes_per_minute,
                d.refused_handshakes_per_minute,
                "[limits] refused_handshakes_per_minute",
            )?,
            trusted_proxies: crate::admission::TrustedProxies(trusted_proxies),
            forward_cookies: self.http.forward_cookies.unwrap_or(d.forward_cookies),
            extra_methods,
            cors_origins: self.http.cors_origins,
            requests_per_minute: self.limits.requests_per_minute.filter(|n| *n > 0),
            agent_handshakes_per_minute: at_least_one(
                self.limits.agent_handshakes_per_minute,
                d.agent_handshakes_per_minute,
                "[limits] agent_handshakes_per_minute",
            )?,
            max_tunnels: match self.limits.max_tunnels {
                Some(0) => {
                    return Err(ConfigError::invalid("[limits] max_tunnels must be at least 1"));
                }
                Some(n) => n,
                None => d.max_tunnels,
            },
            max_devices_per_user: match self.limits.max_devices_per_user {
                Some(0) => {
                    return Err(ConfigError::invalid(
                        "[limits] max_devices_per_user must be at least 1",
                    ));
                }
                Some(n) => n,
                None => d.max_devices_per_user,
            },
            identity: self.identity.resolve(public)?,
            state_dir: self.state_dir.or_else(daemon::config::state_directory),
            ack_timeout: match self.timeouts.ack.map(Human::get) {
                // Agents may wait ACK_FLOOR / 10 before acknowledging.
                Some(a) if a < ACK_FLOOR => {
                    return Err(ConfigError::Invalid(format!(
                        "[timeouts] ack must be at least {ACK_FLOOR:?}"
                    )));
                }
                Some(a) => a,
                None => d.ack_timeout,
            },
            first_byte_timeout: positive(
                self.timeouts.first_byte.map(Human::get),
                d.first_byte_timeout,
                "first_byte",
            )?,
            idle_timeout: self.timeouts.idle.map_or(d.idle_timeout, Limit::get),
            total_timeout: self.timeouts.total.map_or(d.total_timeout, Limit::get),
            route_timeouts: Vec::new(),
            drain_timeout: self.timeouts.drain.map_or(d.drain_timeout, Human::get),
            hello_timeout: self.timeouts.hello.map_or(d.hello_timeout, Human::get),
            header_read_timeout: positive(
                self.timeouts.header_read.map(Human::get),
                d.header_read_timeout,
                "header_read",
            )?,
            liveness: self.liveness.resolve()?,
            cluster,
        })
        .and_then(check_cluster)
    }
}

impl Config {
    /// The identity settings, with the users `[[users]]` marks public.
    pub fn identity_config(&self) -> crate::identity::IdentityConfig {
        let mut identity = self.identity.clone();
        for u in self.users.iter().filter(|u| u.public) {
            if !identity.public_users.contains(&u.id) {
                identity.public_users.push(u.id.clone());
            }
        }
        identity
    }

    /// The static tokens of `[[users]]`, for the identity.
    pub fn static_tokens(&self) -> Vec<crate::identity::StaticToken> {
        use crate::identity::{Role, StaticToken};
        let mut out = Vec::new();
        for u in &self.users {
            if let Some(t) = &u.agent_token {
                out.push(StaticToken { token: t.clone(), user: u.id.clone(), role: Role::Agent });
            }
            if let Some(t) = &u.client_token {
                out.push(StaticToken { token: t.clone(), user: u.id.clone(), role: Role::Client });
            }
        }
        out
    }

    /// The timeouts for a request to `path` at the local service: the
    /// longest matching route prefix, else the global values.
    pub fn timeouts_for(&self, path: &str) -> Timeouts {
        self.route_timeouts.iter().find(|r| path.starts_with(&r.prefix)).map_or(
            Timeouts {
                first_byte: self.first_byte_timeout,
                idle: self.idle_timeout,
                total: self.total_timeout,
            },
            |r| r.timeouts,
        )
    }
}

/// Every token must be different: one secret for two users would let one
/// user's agent serve another's traffic, and one for both roles would let a
/// web client register as the agent.
/// Replicas must sign and hash alike: a token minted by one is verified by
/// another, and access lines join across them.
fn check_cluster(config: Config) -> Result<Config, ConfigError> {
    if config.cluster.is_some() {
        if config.identity.signing_key_file.is_none() {
            return Err(ConfigError::invalid(
                "[cluster] needs [identity] signing_key_file, the same key on every replica (relayd key generate --out FILE): a token one replica mints is verified by the others",
            ));
        }
        if config.identity.user_hash_key.is_none() {
            return Err(ConfigError::invalid(
                "[cluster] needs [identity] user_hash_key_file, the same on every replica (head -c 32 /dev/urandom > FILE): access lines join across replicas by it",
            ));
        }
    }
    Ok(config)
}

fn distinct_tokens(users: &[User]) -> Result<(), ConfigError> {
    let mut seen: Vec<(&str, &str, &str)> = Vec::new();
    for u in users {
        let tokens = u
            .agent_token
            .as_deref()
            .map(|t| ("agent_token", t))
            .into_iter()
            .chain(u.client_token.as_deref().map(|t| ("client_token", t)));
        for (role, token) in tokens {
            if let Some((other, other_role, _)) = seen.iter().find(|(_, _, t)| *t == token) {
                return Err(ConfigError::Invalid(format!(
                    "user {:?}'s {role} is the same as user {other:?}'s {other_role}; every token must be different",
                    u.id
                )));
            }
            seen.push((&u.id, role, token));
        }
    }
    Ok(())
}

/// A user's token, inline or from a file, at least 16 characters.
fn user_secret(
    user: &str,
    what: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    let value = secret(what, inline, file)
        .map_err(|e| ConfigError::Invalid(format!("user {user:?}: {e}")))?;
    let Some(v) = &value else { return Ok(None) };
    let bad = |why: &str| Err(ConfigError::Invalid(format!("user {user:?}: {what} {why}")));
    if v.len() < 16 {
        return bad("must be at least 16 characters");
    }
    if v.len() > crate::identity::MAX_TOKEN_LEN || v.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return bad("must be printable ASCII without spaces, at most 8 KiB");
    }
    // Tokens of these shapes are read as credentials or JWTs, never
    // compared with static ones: such a static token could never work.
    if v.starts_with(crate::identity::CREDENTIAL_PREFIX)
        || v.bytes().filter(|b| *b == b'.').count() == 2
    {
        return bad(
            "looks like an agent credential or a JWT (tcred_ prefix, or two dots); pick another static token",
        );
    }
    Ok(value)
}

#[cfg(test)]
mod tests;
