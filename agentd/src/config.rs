//! agentd configuration: the strict on-disk file and the resolved `Config`.

use std::path::PathBuf;
use std::time::Duration;

use daemon::Resolve;
use daemon::config::{Human, duration, secret};
use http::Uri;
use serde::{Deserialize, Serialize};

use tunnel_proto::Limits;

pub use daemon::ConfigError;

/// The TOML file as written by the owner. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The relay: `wss://relay.example.com` (the `/ws/tunnel` path is added
    /// when the URL has none), or a full `ws://`/`wss://` URL.
    pub relay: Option<String>,
    /// The agent token. Prefer `token_file`.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM file of the CAs to trust for a `wss://` relay instead of the
    /// system's roots (a relay with a private CA or a self-signed cert).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectFile {
    pub max_delay: Option<Human>,
    pub healthy_after: Option<Human>,
}

/// The resolved configuration agentd runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// WebSocket URL of the relay's agent endpoint.
    #[serde(serialize_with = "display")]
    pub relay: Uri,
    #[serde(skip)]
    pub token: String,
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
    /// TLS client settings, for `wss://` relays only.
    #[serde(skip)]
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:11434";

impl Resolve for ConfigFile {
    type Config = Config;

    /// Applies defaults and checks every value; the token file is read.
    fn resolve(self) -> Result<Config, ConfigError> {
        let relay = self.relay.ok_or_else(|| ConfigError::Invalid("relay is not set".into()))?;
        let relay = relay_url(&relay)?;
        let tls = match (relay.scheme_str(), &self.tls.ca_file) {
            (Some("wss"), ca_file) => Some(
                crate::tls::client_config(ca_file.as_deref())
                    .map_err(|e| ConfigError::Invalid(format!("[tls] {e}")))?,
            ),
            (_, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "[tls] ca_file is set but the relay is not a wss:// URL".into(),
                ));
            }
            _ => None,
        };
        let token = secret("token", self.token, self.token_file)?
            .ok_or_else(|| ConfigError::invalid("token_file is not set"))?;
        if token.is_empty() || token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(ConfigError::Invalid(
                "the token must be printable ASCII without spaces".into(),
            ));
        }
        let upstream = upstream_url(self.upstream.as_deref().unwrap_or(DEFAULT_UPSTREAM))?;
        let limits = self.limits.resolve()?;
        Ok(Config {
            relay,
            token,
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
            tls,
        })
    }
}

/// Accepts `ws`, `wss`, `http` and `https` URLs; adds `/ws/tunnel` when the
/// URL has no path.
pub fn relay_url(text: &str) -> Result<Uri, ConfigError> {
    let bad = |why: &str| ConfigError::Invalid(format!("relay {text:?}: {why}"));
    let uri: Uri = text.parse().map_err(|_| bad("not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("ws") | Some("http") => "ws",
        Some("wss") | Some("https") => "wss",
        _ => return Err(bad("use ws://, wss://, http:// or https://")),
    };
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("/") | Some("") => "/ws/tunnel",
        Some(p) => p,
    };
    format!("{scheme}://{authority}{path}").parse().map_err(|_| bad("not a URL"))
}

/// The local service: `http://host:port`, no path.
pub fn upstream_url(text: &str) -> Result<Uri, ConfigError> {
    let bad = |why: &str| ConfigError::Invalid(format!("upstream {text:?}: {why}"));
    let uri: Uri = text.parse().map_err(|_| bad("not a URL"))?;
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
        toml::from_str::<ConfigFile>(text).expect("packaging/agentd.toml is valid");
        let uncommented = daemon::config::uncomment_example(text, &["token"]);
        let file: ConfigFile =
            toml::from_str(&uncommented).expect("every documented knob is accepted");
        assert!(file.reconnect.max_delay.is_some());
    }

    #[test]
    fn upstream_must_be_plain_http_without_a_path() {
        assert!(upstream_url("http://127.0.0.1:11434").is_ok());
        assert!(upstream_url("https://127.0.0.1:11434").is_err());
        assert!(upstream_url("http://127.0.0.1:11434/api").is_err());
    }

    #[test]
    fn token_is_required_and_unknown_keys_are_refused() {
        let parse = |t: &str| {
            toml::from_str::<ConfigFile>(t)
                .map_err(|e| e.to_string())
                .and_then(|f| f.resolve().map_err(|e| e.to_string()))
        };
        assert!(parse("relay = \"ws://127.0.0.1:1\"").is_err());
        assert!(parse("relay = \"ws://127.0.0.1:1\"\ntoken = \"abc\"\nextra = 1").is_err());
        let c = parse("relay = \"ws://127.0.0.1:1\"\ntoken = \"abc\"").unwrap();
        assert_eq!(c.upstream.to_string(), "http://127.0.0.1:11434/");
    }
}
