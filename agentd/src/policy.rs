//! The endpoint policy: which requests the owner's machine serves at all.
//!
//! Ollama's API has no authentication and some of it changes the machine
//! (`DELETE /api/delete`, `/api/pull`, `/api/create`, `/api/blobs`, ...).
//! The owner's machine is the trust boundary, so agentd decides, whatever
//! the relay let through: inference and read-only endpoints are allowed by
//! default, everything else is denied. `[policy]` widens (`allow`) or
//! narrows (`deny`, which always wins) that list, or starts from nothing
//! (`defaults = false`).
//!
//! A rule is `"METHOD /path"` or `"/path"` (any method); a path ending in
//! `/*` covers everything below it, and `"*"` alone covers every path. A
//! rule for `GET` covers `HEAD` too. Rules match the path without its
//! query, after [`tunnel_proto::path::check`] accepted it.

use http::Method;
use serde::Deserialize;

/// The endpoints served when `[policy]` says nothing: inference and
/// read-only (Ollama's API and its OpenAI-compatible one).
pub const DEFAULT_ALLOW: &[&str] = &[
    "GET /",
    "GET /api/version",
    "GET /api/tags",
    "GET /api/ps",
    "POST /api/show",
    "POST /api/chat",
    "POST /api/generate",
    "POST /api/embed",
    "POST /api/embeddings",
    "GET /v1/models",
    "GET /v1/models/*",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
];

/// `[policy]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Start from [`DEFAULT_ALLOW`] (default true).
    pub defaults: Option<bool>,
    /// Rules allowed on top of the defaults.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Rules refused even when allowed.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// One rule: a method (or any) and a path (exact or a prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    method: Option<Method>,
    path: Pattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    /// `/api/blobs/*`: held as `/api/blobs/`.
    Below(String),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(m) = &self.method {
            write!(f, "{m} ")?;
        }
        match &self.path {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(p) => f.write_str(p),
            Pattern::Below(p) => write!(f, "{p}*"),
        }
    }
}

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("policy rule {text:?}: {why}");
        let mut words = text.split_whitespace();
        let (method, path) = match (words.next(), words.next(), words.next()) {
            (Some(path), None, None) => (None, path),
            (Some(method), Some(path), None) => {
                let m = Method::from_bytes(method.as_bytes())
                    .map_err(|_| bad("not a method"))
                    .and_then(|m| {
                        if method.bytes().all(|b| b.is_ascii_uppercase()) {
                            Ok(m)
                        } else {
                            Err(bad("write the method in capitals (POST /api/pull)"))
                        }
                    })?;
                (Some(m), path)
            }
            _ => return Err(bad("write \"METHOD /path\" or \"/path\"")),
        };
        let path = if path == "*" {
            Pattern::Any
        } else if let Some(prefix) = path.strip_suffix('*') {
            if !prefix.ends_with('/') {
                return Err(bad("a wildcard covers a whole directory: end the rule in /*"));
            }
            Pattern::Below(prefix.to_owned())
        } else {
            Pattern::Exact(path.to_owned())
        };
        if let Pattern::Exact(p) | Pattern::Below(p) = &path
            && p.contains('*')
        {
            return Err(bad("* stands alone or ends the rule (/api/blobs/*)"));
        }
        if let Pattern::Exact(p) | Pattern::Below(p) = &path
            && (tunnel_proto::path::check(p).is_err() || p.contains('?'))
        {
            return Err(bad("the path must be a plain absolute path"));
        }
        Ok(Rule { method, path })
    }
}

impl Rule {
    fn matches(&self, method: &Method, path: &str) -> bool {
        let method_ok = match &self.method {
            None => true,
            Some(m) => m == method || (*m == Method::GET && *method == Method::HEAD),
        };
        method_ok
            && match &self.path {
                Pattern::Any => true,
                Pattern::Exact(p) => p == path,
                Pattern::Below(p) => path.starts_with(p.as_str()),
            }
    }
}

/// The resolved policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Default for Policy {
    fn default() -> Self {
        PolicyFile::default().resolve().unwrap_or_else(|_| Policy::nothing())
    }
}

/// Why a request is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The path could mean something other than it says (400).
    #[error("refused path: {0}")]
    BadPath(#[from] tunnel_proto::path::PathError),
    /// The owner's policy does not serve it (403).
    #[error("the owner's endpoint policy does not allow {method} {path}")]
    Denied { method: Method, path: String },
}

impl Refusal {
    /// The status the web client gets.
    pub fn code(&self) -> u16 {
        match self {
            Refusal::BadPath(_) => 400,
            Refusal::Denied { .. } => 403,
        }
    }
}

impl PolicyFile {
    pub fn resolve(&self) -> Result<Policy, String> {
        let parse = |rules: &[String]| -> Result<Vec<Rule>, String> {
            rules.iter().map(|r| r.parse()).collect()
        };
        let mut allow = Vec::new();
        if self.defaults.unwrap_or(true) {
            allow.extend(DEFAULT_ALLOW.iter().map(|r| r.parse().expect("the defaults parse")));
        }
        allow.extend(parse(&self.allow)?);
        Ok(Policy { allow, deny: parse(&self.deny)? })
    }
}

impl Policy {
    /// Serves nothing.
    pub fn nothing() -> Self {
        Policy { allow: Vec::new(), deny: Vec::new() }
    }

    /// Serves every well-formed path (tests and benchmarks).
    pub fn everything() -> Self {
        Policy { allow: vec![Rule { method: None, path: Pattern::Any }], deny: Vec::new() }
    }

    /// Whether `method` on `target` (`/path?query`) may reach the local
    /// service.
    pub fn check(&self, method: &Method, target: &str) -> Result<(), Refusal> {
        tunnel_proto::path::check(target)?;
        let path = target.split('?').next().unwrap_or(target);
        let allowed = !self.deny.iter().any(|r| r.matches(method, path))
            && self.allow.iter().any(|r| r.matches(method, path));
        if allowed {
            Ok(())
        } else {
            Err(Refusal::Denied { method: method.clone(), path: path.to_owned() })
        }
    }

    /// The rules, for `--check-config` and status.
    pub fn describe(&self) -> (Vec<String>, Vec<String>) {
        let show = |rules: &[Rule]| rules.iter().map(Rule::to_string).collect();
        (show(&self.allow), show(&self.deny))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], defaults: bool) -> Policy {
        PolicyFile {
            defaults: Some(defaults),
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny: deny.iter().map(|s| (*s).to_owned()).collect(),
        }
        .resolve()
        .unwrap()
    }

    #[test]
    fn defaults_serve_inference_and_reads_only() {
        let p = Policy::default();
        for (m, path) in [
            (Method::POST, "/api/chat"),
            (Method::POST, "/api/generate"),
            (Method::GET, "/api/tags"),
            (Method::HEAD, "/api/tags"),
            (Method::GET, "/api/version"),
            (Method::POST, "/v1/chat/completions"),
            (Method::GET, "/v1/models/llama3.2:latest"),
            (Method::POST, "/api/chat?x=1"),
        ] {
            assert_eq!(p.check(&m, path), Ok(()), "{m} {path}");
        }
        for (m, path) in [
            (Method::DELETE, "/api/delete"),
            (Method::POST, "/api/pull"),
            (Method::POST, "/api/push"),
            (Method::POST, "/api/create"),
            (Method::POST, "/api/copy"),
            (Method::POST, "/api/blobs/sha256:abc"),
            (Method::HEAD, "/api/blobs/sha256:abc"),
            (Method::POST, "/api/signout"),
            (Method::GET, "/api/chat"),
            (Method::POST, "/api/tags"),
            (Method::GET, "/api/chat/x"),
            (Method::GET, "/metrics"),
            (Method::GET, "/api/tags/"),
        ] {
            assert!(
                matches!(p.check(&m, path), Err(Refusal::Denied { .. })),
                "{m} {path} must be denied"
            );
        }
    }

    #[test]
    fn allow_widens_deny_narrows_and_wins() {
        let p = policy(&["POST /api/pull", "/api/blobs/*"], &["POST /api/generate"], true);
        assert_eq!(p.check(&Method::POST, "/api/pull"), Ok(()));
        assert_eq!(p.check(&Method::HEAD, "/api/blobs/sha256:1"), Ok(()));
        assert!(p.check(&Method::POST, "/api/generate").is_err());
        assert_eq!(p.check(&Method::POST, "/api/chat"), Ok(()));
        let only_chat = policy(&["POST /api/chat"], &[], false);
        assert_eq!(only_chat.check(&Method::POST, "/api/chat"), Ok(()));
        assert!(only_chat.check(&Method::GET, "/api/tags").is_err());
        let all_but = policy(&["*"], &["DELETE *"], true);
        assert_eq!(all_but.check(&Method::PUT, "/anything"), Ok(()));
        assert!(all_but.check(&Method::DELETE, "/api/delete").is_err());
    }

    #[test]
    fn bad_paths_are_refused_before_any_rule() {
        let p = Policy::everything();
        for path in ["/api/../x", "//x", "/api/%2e%2e/x", "/a%00", "http://10.0.0.1/x"] {
            assert!(matches!(p.check(&Method::GET, path), Err(Refusal::BadPath(_))), "{path}");
        }
    }

    #[test]
    fn rules_that_cannot_mean_anything_are_config_errors() {
        for bad in [
            "post /api/chat",
            "GET",
            "GET /a /b",
            "/api/blobs*",
            "GET api/tags",
            "/a/../b",
            "/api/*/x",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?}");
        }
        assert_eq!("GET /v1/models/*".parse::<Rule>().unwrap().to_string(), "GET /v1/models/*");
    }
}
