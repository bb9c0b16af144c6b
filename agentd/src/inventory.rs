//! What the agent knows of its local service: whether it answers, its
//! version, the models it has and those loaded in memory. Checked at start,
//! every [`crate::supervisor::HEALTH_INTERVAL`], and soon after a request
//! that changes the models (a pull, a delete: `upstream::changes_models`);
//! sent to the relay as the
//! `service` message, which is what a relay routing a user's requests
//! across devices by model reads.

use std::time::SystemTime;

use http::uri::PathAndQuery;
use serde_json::Value;
use tunnel_proto::message::{MAX_SERVICE_AVAILABLE, MAX_SERVICE_MODELS};

use crate::upstream::Upstream;

/// The largest answer read from `/api/version` and `/api/ps`.
const SMALL_ANSWER: usize = 64 * 1024;
/// The largest model list read (`/api/tags` with its details runs to about
/// 600 bytes per model).
const LIST_ANSWER: usize = 2 * 1024 * 1024;

/// The local service as the agent last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceHealth {
    pub reachable: bool,
    /// Ollama's version, when it answered.
    pub version: Option<String>,
    /// Why it is not reachable.
    pub error: Option<String>,
    /// Models loaded in memory (`GET /api/ps`).
    pub models: Vec<String>,
    /// Models the service has (Ollama's `GET /api/tags`, or `GET /v1/models`
    /// from a server that speaks only OpenAI's API).
    pub available: Vec<String>,
    /// Sizes (`/api/tags`) and context lengths (`/api/ps`), where told.
    pub details: Vec<tunnel_proto::message::ModelDetail>,
    pub checked: Option<SystemTime>,
}

impl ServiceHealth {
    /// The `service` message the relay gets, with the models requests are
    /// loading now and the owner's `[routing]` wishes for this device.
    pub fn report(
        &self,
        loading: &[String],
        routing: &crate::config::Routing,
    ) -> tunnel_proto::ServiceState {
        // What the protocol allows (names of at most 256 bytes without
        // control characters, at most so many); anything else is left
        // out, not refused.
        let fits = |t: &&String| t.len() <= 256 && !t.chars().any(char::is_control);
        let names = |list: &[String], most| list.iter().filter(fits).take(most).cloned().collect();
        tunnel_proto::ServiceState {
            reachable: self.reachable,
            version: self.version.as_ref().filter(fits).cloned(),
            models: names(&self.models, MAX_SERVICE_MODELS),
            available: names(&self.available, MAX_SERVICE_AVAILABLE),
            details: self
                .details
                .iter()
                .filter(|d| fits(&&d.name))
                .take(MAX_SERVICE_AVAILABLE)
                .cloned()
                .collect(),
            loading: names(loading, MAX_SERVICE_MODELS),
            checked_at: humantime::format_rfc3339_seconds(
                self.checked.unwrap_or_else(SystemTime::now),
            )
            .to_string(),
            priority: routing.priority,
            spread_loads: !routing.wait_for_load,
        }
    }
}

/// Checks the service at `upstream`: `GET /api/version`, then the models
/// loaded (`/api/ps`) and present (`/api/tags`, else `/v1/models`).
pub(crate) async fn check(upstream: &Upstream) -> ServiceHealth {
    let checked = Some(SystemTime::now());
    let (status, body) =
        match upstream.get_json(PathAndQuery::from_static("/api/version"), SMALL_ANSWER).await {
            Ok(answer) => answer,
            Err(why) => {
                return ServiceHealth {
                    reachable: false,
                    error: Some(why),
                    checked,
                    ..ServiceHealth::default()
                };
            }
        };
    let version =
        body.as_ref().and_then(|v| v.get("version").and_then(Value::as_str).map(str::to_owned));
    let list =
        async |path, size| match upstream.get_json(PathAndQuery::from_static(path), size).await {
            Ok((s, Some(v))) if s.is_success() => Some(v),
            _ => None,
        };
    // The models in memory, when the service is Ollama enough to say.
    let ps = list("/api/ps", SMALL_ANSWER).await;
    let models = ps.as_ref().map(|v| names_in(v, "models", "name")).unwrap_or_default();
    let tags = list("/api/tags", LIST_ANSWER).await;
    let available = match &tags {
        Some(v) => names_in(v, "models", "name"),
        None => list("/v1/models", LIST_ANSWER)
            .await
            .map(|v| names_in(&v, "data", "id"))
            .unwrap_or_default(),
    };
    let details = details(tags.as_ref(), ps.as_ref());
    // Reachable, whatever it answered: a version only when it says one.
    ServiceHealth {
        reachable: true,
        version,
        error: (!status.is_success()).then(|| format!("/api/version answered {status}")),
        models,
        available,
        details,
        checked,
    }
}

/// Each model's size from `/api/tags` and context length from `/api/ps`,
/// for the models either tells anything of.
fn details(tags: Option<&Value>, ps: Option<&Value>) -> Vec<tunnel_proto::message::ModelDetail> {
    let entries = |v: Option<&Value>| {
        v.and_then(|v| v.get("models")?.as_array().cloned()).unwrap_or_default().into_iter()
    };
    let mut out: Vec<tunnel_proto::message::ModelDetail> = Vec::new();
    for (m, from_ps) in entries(tags).map(|m| (m, false)).chain(entries(ps).map(|m| (m, true))) {
        let Some(name) = m.get("name").and_then(Value::as_str) else { continue };
        let number = |k: &str| m.get(k).and_then(Value::as_u64);
        let (size, context) =
            if from_ps { (None, number("context_length")) } else { (number("size"), None) };
        if size.is_none() && context.is_none() {
            continue;
        }
        match out.iter().position(|d| d.name == name) {
            Some(i) => {
                out[i].size = out[i].size.or(size);
                out[i].context_length = out[i].context_length.or(context);
            }
            None if out.len() < MAX_SERVICE_AVAILABLE => {
                out.push(tunnel_proto::message::ModelDetail {
                    name: name.to_owned(),
                    size,
                    context_length: context,
                });
            }
            None => {}
        }
    }
    out
}

/// `v[key][*][field]` as strings: Ollama's `{"models": [{"name": ...}]}`,
/// OpenAI's `{"data": [{"id": ...}]}`.
fn names_in(v: &Value, key: &str, field: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|m| m.get(field).and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_lists_read_in_ollamas_and_openais_shapes() {
        let ollama = serde_json::json!({ "models": [{ "name": "llama3.2:latest", "size": 1 }, { "model": "no-name" }] });
        assert_eq!(names_in(&ollama, "models", "name"), ["llama3.2:latest"]);
        let openai = serde_json::json!({ "object": "list", "data": [{ "id": "qwen2.5" }] });
        assert_eq!(names_in(&openai, "data", "id"), ["qwen2.5"]);
        assert!(names_in(&serde_json::json!({ "models": "none" }), "models", "name").is_empty());
    }

    #[test]
    fn sizes_come_from_the_tags_and_context_lengths_from_what_is_loaded() {
        let tags = serde_json::json!({ "models": [
            { "name": "llama3.2:latest", "size": 2019393189u64 },
            { "name": "qwen2.5:7b", "size": 4683087332u64 },
            { "name": "no-size" },
        ]});
        let ps = serde_json::json!({ "models": [{ "name": "llama3.2:latest", "size": 3e9, "context_length": 8192 }] });
        let d = details(Some(&tags), Some(&ps));
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].name.as_str(), d[0].size, d[0].context_length),
            ("llama3.2:latest", Some(2019393189), Some(8192))
        );
        assert_eq!(
            (d[1].name.as_str(), d[1].size, d[1].context_length),
            ("qwen2.5:7b", Some(4683087332), None)
        );
        assert!(details(None, None).is_empty());
    }

    #[test]
    fn a_report_leaves_out_what_the_protocol_refuses() {
        let health = ServiceHealth {
            reachable: true,
            available: (0..MAX_SERVICE_AVAILABLE + 5)
                .map(|i| format!("m{i}"))
                .chain(["bad\nname".to_owned()])
                .collect(),
            models: vec!["x".repeat(300), "ok".into()],
            ..ServiceHealth::default()
        };
        let report = health.report(&[], &crate::config::Routing::default());
        assert_eq!(report.available.len(), MAX_SERVICE_AVAILABLE);
        assert_eq!(report.models, ["ok"]);
        let limits = tunnel_proto::Limits::default();
        assert!(tunnel_proto::Message::Service(report).validate(&limits).is_ok());
    }
}
