//! agentd configuration: the strict on-disk file and the resolved `Config`.

use std::path::PathBuf;
use std::time::Duration;

use daemon::Resolve;
use daemon::config::{Human, duration, read_secret};
use http::Uri;
use serde::{Deserialize, Serialize};

use tunnel_proto::Limits;

use crate::credential::Starting;

pub use daemon::ConfigError;

/// The TOML file as written by the owner. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The relay: `wss://relay.example.com` (the `/ws/tunnel` path is added
    /// when the URL has none), or a full `ws://`/`wss://` URL. Absent: the
    /// relay `tunnelctl enroll` stored in `state_dir`, or none yet (agentd
    /// waits to be enrolled).
    pub relay: Option<String>,
    /// The agent token. Prefer `token_file`.
    pub token: Option<String>,
    /// A file (mode 0600) holding the agent token: a credential from
    /// `relayd token issue`, or a JWT an identity provider's tooling keeps
    /// fresh (re-read before it expires). Without `token` and `token_file`,
    /// systemd's `$CREDENTIALS_DIRECTORY/agent-token`.
    pub token_file: Option<PathBuf>,
    /// Where agentd keeps what it learns: a rotated or installed credential
    /// (`credential`, mode 0600), which then wins over `token_file`. Default
    /// `$STATE_DIRECTORY` (systemd's `StateDirectory=`); without either,
    /// rotation is unavailable.
    pub state_dir: Option<PathBuf>,
    /// The local service requests go to.
    pub upstream: Option<String>,
    /// Address for Prometheus `GET /metrics`; absent = no metrics listener.
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub limits: link::settings::LimitsFile,
    #[serde(default)]
    pub reconnect: ReconnectFile,
    #[serde(default)]
    pub liveness: link::settings::LivenessFile,
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default)]
    pub policy: crate::policy::PolicyFile,
    #[serde(default)]
    pub control: daemon::control::ControlFile,
    #[serde(default)]
    pub routing: RoutingFile,
}

/// `[routing]`: how the relay weighs this device among its user's others.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    /// Higher is preferred where devices are otherwise equal (-1000 to
    /// 1000, default 0).
    pub priority: Option<i32>,
    /// Requests for a model this device is loading wait for that load
    /// rather than load it on another device (default true).
    pub wait_for_load: Option<bool>,
}

/// What the relay is told of the owner's wishes for this device
/// (`[routing]`), in every `service` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Routing {
    pub priority: i32,
    pub wait_for_load: bool,
}

impl Default for Routing {
    fn default() -> Self {
        Self { priority: 0, wait_for_load: true }
    }
}

impl RoutingFile {
    fn resolve(self) -> Result<Routing, ConfigError> {
        let priority = self.priority.unwrap_or(0);
        let most = tunnel_proto::message::MAX_PRIORITY;
        if priority.abs() > most {
            return Err(ConfigError::Invalid(format!(
                "[routing] priority {priority}: use -{most} to {most}"
            )));
        }
        Ok(Routing { priority, wait_for_load: self.wait_for_load.unwrap_or(true) })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM file of the CAs to trust for a `wss://` relay instead of the
    /// system's roots (a relay with a private CA or a self-signed cert).
    pub ca_file: Option<PathBuf>,
    /// SHA-256 pins of the relay's public key (`sha256/` + base64 of the
    /// SubjectPublicKeyInfo digest), checked on top of the CA validation;
    /// several for a key rollover. `agentd pin URL` prints a relay's.
    #[serde(default)]
    pub pins: Vec<String>,
    /// Allow a plain `ws://` relay on another machine: the credential and
    /// every prompt then cross the network in clear. Only for a relay
    /// behind a TLS-terminating hop on a network you control. Default false
    /// (plain text only to a loopback relay).
    #[serde(default)]
    pub allow_plaintext: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectFile {
    pub max_delay: Option<Human>,
    pub healthy_after: Option<Human>,
}

/// Where agentd connects: the relay's WebSocket URL and how its TLS is
/// checked.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// WebSocket URL of the relay's agent endpoint.
    #[serde(serialize_with = "display")]
    pub relay: Uri,
    /// Pins of the relay's public key (`sha256/...`).
    pub pins: Vec<String>,
    /// Whether the configuration file names it (else `tunnelctl enroll`
    /// stored it in `state_dir`).
    pub configured: bool,
    /// TLS client settings, for `wss://` relays only.
    #[serde(skip)]
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Target {
    /// Checks `relay` and `pins` and builds the TLS settings (`ca_file`:
    /// the CAs to trust instead of the system's roots).
    pub fn new(
        relay: &str,
        pins: &[String],
        ca_file: Option<&std::path::Path>,
        allow_plaintext: bool,
        configured: bool,
    ) -> Result<Self, ConfigError> {
        let relay = relay_url(relay)?;
        if relay.scheme_str() == Some("ws") && !allow_plaintext && !daemon::url::is_loopback(&relay)
        {
            return Err(ConfigError::Invalid(format!(
                "relay {relay}: ws:// would send the credential and every prompt in clear; use wss:// (plain text goes only to a loopback relay, or set [tls] allow_plaintext = true)"
            )));
        }
        let parsed = pins
            .iter()
            .map(|p| {
                crate::tls::Pin::parse(p).map_err(|e| ConfigError::Invalid(format!("[tls] {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match (relay.scheme_str(), ca_file) {
            (Some("wss"), ca_file) => Some(
                crate::tls::client_config(ca_file, &parsed)
                    .map_err(|e| ConfigError::Invalid(format!("[tls] {e}")))?,
            ),
            (_, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "[tls] ca_file is set but the relay is not a wss:// URL".into(),
                ));
            }
            _ if !parsed.is_empty() => {
                return Err(ConfigError::Invalid(
                    "[tls] pins are set but the relay is not a wss:// URL".into(),
                ));
            }
            _ => None,
        };
        let pins = parsed.iter().map(ToString::to_string).collect();
        Ok(Self { relay, pins, configured, tls })
    }

    /// The relay's host (and port), for messages.
    pub fn host(&self) -> &str {
        self.relay.authority().map_or("the relay", |a| a.as_str())
    }
}

/// The resolved configuration agentd runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The relay, from the file or an enrollment; `None` until enrolled.
    pub target: Option<Target>,
    /// The tokens the agent starts with (a stored credential before the
    /// configured token).
    #[serde(skip)]
    pub credential: Starting,
    /// Where the configured token is read again (a refreshed JWT, SIGHUP).
    pub token_file: Option<PathBuf>,
    /// Where rotated and installed credentials are stored.
    pub state_dir: Option<PathBuf>,
    /// Which requests may reach the local service.
    #[serde(serialize_with = "show_policy")]
    pub policy: crate::policy::Policy,
    /// The control socket (`tunnelctl`).
    pub control: daemon::control::Control,
    /// Base URL of the local service (scheme and authority).
    #[serde(serialize_with = "display")]
    pub upstream: Uri,
    /// Limits announced to the relay in `hello`.
    pub limits: Limits,
    /// Longest wait between reconnect attempts.
    #[serde(serialize_with = "duration::show")]
    pub reconnect_max_delay: Duration,
    /// A session must stay up this long before the backoff resets.
    #[serde(serialize_with = "duration::show")]
    pub healthy_after: Duration,
    /// How the agent watches the relay: pings and missed intervals.
    pub liveness: link::settings::Liveness,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The CA file trusted for `wss://` instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The `[tls] pins` of the file (an enrollment adds its own).
    pub pins: Vec<String>,
    /// A plain `ws://` relay on another machine is allowed.
    pub allow_plaintext: bool,
    /// This device among the user's others (`[routing]`).
    pub routing: Routing,
}

pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:11434";

impl Resolve for ConfigFile {
    type Config = Config;

    /// Applies defaults and checks every value; the token file is read.
    fn resolve(self) -> Result<Config, ConfigError> {
        let state_dir = self.state_dir.or_else(daemon::config::state_directory);
        let token_file = match (&self.token, self.token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid("set token or token_file, not both"));
            }
            (Some(_), None) => None,
            (None, Some(f)) => Some(f),
            (None, None) => std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|d| PathBuf::from(d).join(SYSTEMD_CREDENTIAL))
                .filter(|f| f.exists()),
        };
        let configured = match (self.token, &token_file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(read_secret(f)?),
            (None, None) => None,
        };
        let ca_file = self.tls.ca_file.as_deref();
        let target = match (&self.relay, &state_dir) {
            (Some(relay), _) => {
                Some(Target::new(relay, &self.tls.pins, ca_file, self.tls.allow_plaintext, true)?)
            }
            (None, Some(dir)) => match crate::enrollment::read(dir)? {
                Some(e) => {
                    let pins: Vec<String> = self.tls.pins.iter().chain(&e.pins).cloned().collect();
                    Some(Target::new(&e.relay, &pins, ca_file, self.tls.allow_plaintext, false)?)
                }
                None => None,
            },
            (None, None) => None,
        };
        if target.is_none() {
            // Checked now rather than at enrollment.
            for p in &self.tls.pins {
                crate::tls::Pin::parse(p)
                    .map_err(|e| ConfigError::Invalid(format!("[tls] {e}")))?;
            }
        }
        let credential = Starting::load(state_dir.as_deref(), configured)?;
        let policy =
            self.policy.resolve().map_err(|e| ConfigError::Invalid(format!("[policy] {e}")))?;
        let upstream = upstream_url(self.upstream.as_deref().unwrap_or(DEFAULT_UPSTREAM))?;
        let limits = self.limits.resolve()?;
        Ok(Config {
            target,
            credential,
            token_file,
            state_dir,
            policy,
            control: self.control.resolve("agentd"),
            upstream,
            limits,
            reconnect_max_delay: self
                .reconnect
                .max_delay
                .map_or(Duration::from_secs(30), Human::get),
            healthy_after: self.reconnect.healthy_after.map_or(Duration::from_secs(30), Human::get),
            liveness: self.liveness.resolve()?,
            metrics_listen: self.metrics_listen,
            ca_file: self.tls.ca_file,
            pins: self.tls.pins,
            allow_plaintext: self.tls.allow_plaintext,
            routing: self.routing.resolve()?,
        })
    }
}

/// The name of the systemd credential agentd reads its token from.
pub const SYSTEMD_CREDENTIAL: &str = "agent-token";

fn show_policy<S: serde::Serializer>(p: &crate::policy::Policy, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap as _;
    let (allow, deny) = p.describe();
    let mut m = s.serialize_map(Some(2))?;
    m.serialize_entry("allow", &allow)?;
    m.serialize_entry("deny", &deny)?;
    m.end()
}

/// Accepts `ws`, `wss`, `http` and `https` URLs; adds `/ws/tunnel` when the
/// URL has no path. The one rule for a relay URL, in the file and at
/// enrollment: a real port, no user name or password, no query string (a
/// token there would end up in logs).
pub fn relay_url(text: &str) -> Result<Uri, ConfigError> {
    let bad = |why: &str| ConfigError::Invalid(format!("relay {text:?}: {why}"));
    let uri = daemon::url::parse(text, "relay").map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let scheme = match uri.scheme_str() {
        Some("ws") | Some("http") => "ws",
        Some("wss") | Some("https") => "wss",
        _ => return Err(bad("use ws://, wss://, http:// or https://")),
    };
    if uri.query().is_some() {
        return Err(bad(
            "a query string does not belong in the relay URL; the credential goes on stdin",
        ));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    let path = match uri.path() {
        "/" | "" => "/ws/tunnel",
        p => p,
    };
    format!("{scheme}://{authority}{path}").parse().map_err(|_| bad("not a URL"))
}

/// The local service: `http://host:port`, no path.
pub fn upstream_url(text: &str) -> Result<Uri, ConfigError> {
    let bad = |why: &str| ConfigError::Invalid(format!("upstream {text:?}: {why}"));
    let uri =
        daemon::url::parse(text, "upstream").map_err(|e| ConfigError::Invalid(e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("use http://host:port"));
    }
    if uri.authority().is_none() {
        return Err(bad("no host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad("give only scheme, host and port"));
    }
    Ok(uri)
}

fn display<S: serde::Serializer>(v: &Uri, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_get_the_tunnel_path_and_a_websocket_scheme() {
        assert_eq!(
            relay_url("https://relay.example.com").unwrap().to_string(),
            "wss://relay.example.com/ws/tunnel"
        );
        assert_eq!(
            relay_url("ws://127.0.0.1:8080/").unwrap().to_string(),
            "ws://127.0.0.1:8080/ws/tunnel"
        );
        assert_eq!(
            relay_url("wss://r.example/custom").unwrap().to_string(),
            "wss://r.example/custom"
        );
        assert!(relay_url("ftp://x").is_err());
        assert!(relay_url("not a url").is_err());
    }

    #[test]
    fn the_example_configuration_parses() {
        let text = include_str!("../../packaging/agentd.toml");
        let shipped = toml::from_str::<ConfigFile>(text).expect("packaging/agentd.toml is valid");
        // As shipped (the package's conffile), agentd starts and waits to
        // be enrolled.
        let shipped = shipped.resolve().expect("the shipped agentd.toml resolves");
        assert!(shipped.target.is_none() && shipped.credential.token.is_none());
        let uncommented = daemon::config::uncomment_example(text, &["token"]);
        let file: ConfigFile =
            toml::from_str(&uncommented).expect("every documented knob is accepted");
        assert!(file.reconnect.max_delay.is_some());
        assert_eq!(file.routing.resolve().unwrap(), Routing::default());
    }

    #[test]
    fn routing_defaults_to_no_preference_and_waiting_for_loads() {
        let routing = |t: &str| toml::from_str::<ConfigFile>(t).unwrap().routing.resolve();
        assert_eq!(routing("").unwrap(), Routing { priority: 0, wait_for_load: true });
        let set = routing("[routing]\npriority = -5\nwait_for_load = false").unwrap();
        assert_eq!(set, Routing { priority: -5, wait_for_load: false });
        let err = routing("[routing]\npriority = 1001").unwrap_err().to_string();
        assert!(err.contains("[routing] priority 1001: use -1000 to 1000"), "{err}");
    }

    #[test]
    fn upstream_must_be_plain_http_without_a_path() {
        assert!(upstream_url("http://127.0.0.1:11434").is_ok());
        assert!(upstream_url("https://127.0.0.1:11434").is_err());
        assert!(upstream_url("http://127.0.0.1:11434/api").is_err());
    }

    #[test]
    fn without_a_token_the_agent_waits_to_be_enrolled_and_unknown_keys_are_refused() {
        let parse = |t: &str| {
            toml::from_str::<ConfigFile>(t)
                .map_err(|e| e.to_string())
                .and_then(|f| f.resolve().map_err(|e| e.to_string()))
        };
        let bare = parse("relay = \"ws://127.0.0.1:1\"").expect("no token: not enrolled");
        assert!(bare.credential.token.is_none() && bare.target.is_some());
        let empty = parse("").expect("an empty file: not enrolled");
        assert!(empty.credential.token.is_none() && empty.target.is_none());
        assert!(parse("relay = \"ws://127.0.0.1:1\"\ntoken = \"abc\"\nextra = 1").is_err());
        let c = parse("relay = \"ws://127.0.0.1:1\"\ntoken = \"abc\"").unwrap();
        assert_eq!(c.upstream.to_string(), "http://127.0.0.1:11434/");
    }
}
