//! The model a request body names, read with the meaning the desktop's
//! server will give it: the relay routes and scopes by it, the agent
//! tells a model being loaded by it.
//!
//! Ollama (and its OpenAI-compatible routes) decodes bodies with Go's
//! `encoding/json`: a key matches a field whatever its case, and the last
//! matching key wins; `name` stands in for `model` where `model` is empty.
//! So `{"model":"llama3.2","Model":"mistral"}` runs `mistral`. Rather than
//! imitate every rule, the relay refuses what two readers could read
//! differently: a key that folds to `model` or to `name` more than once, or
//! either one that is not a string. Every model the body names must then be
//! allowed.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, Deserializer as _, IgnoredAny, MapAccess, Visitor};

/// The endpoints whose `POST` body names the model they run (Ollama's and
/// OpenAI's inference endpoints, and Ollama's `show`).
pub const RUNS_A_MODEL: &[&str] = &[
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// Whether a `POST` to `path` (without its query) names a model in its body.
pub fn runs_a_model(path: &str) -> bool {
    RUNS_A_MODEL.contains(&path)
}

/// Whether a `POST` to `path` loads the model its body names into memory:
/// every endpoint of [`RUNS_A_MODEL`] but `show`, which reads its metadata.
pub fn loads_a_model(path: &str) -> bool {
    path != "/api/show" && runs_a_model(path)
}

/// The top-level keys that name a model, compared as Go compares them.
const MODEL_KEYS: [&str; 2] = ["model", "name"];

/// Why a body's model cannot be told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("the request body is not a JSON object")]
    NotAnObject,
    #[error("the request body names {0:?} more than once (in any case)")]
    Repeated(&'static str),
    #[error("the request body's {0:?} is not a string")]
    NotAString(&'static str),
}

/// The non-empty models `body` names (`model`, then `name`), in that order.
pub fn named_models(body: &[u8]) -> Result<Vec<String>, ModelError> {
    let refused = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = de.deserialize_map(Keys(&refused));
    if let Some(why) = refused.take() {
        return Err(why);
    }
    let found = found.map_err(|_| ModelError::NotAnObject)?;
    de.end().map_err(|_| ModelError::NotAnObject)?;
    Ok(found.into_iter().flatten().filter(|m| !m.is_empty()).collect())
}

/// Whether `key` is `target` under Unicode case folding, as Go's
/// `encoding/json` matches field names.
fn folds_to(key: &str, target: &str) -> bool {
    key.len() <= target.len() * 4 && key.chars().flat_map(char::to_lowercase).eq(target.chars())
}

/// Reads the top-level keys; a refusal is left in the cell.
struct Keys<'a>(&'a Cell<Option<ModelError>>);

impl Keys<'_> {
    fn refuse<E: de::Error>(&self, why: ModelError) -> E {
        let e = E::custom(&why);
        self.0.set(Some(why));
        e
    }
}

impl<'de> Visitor<'de> for Keys<'_> {
    type Value = [Option<String>; 2];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: [Option<String>; 2] = [None, None];
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let Some(i) = MODEL_KEYS.iter().position(|t| folds_to(&key, t)) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if found[i].is_some() {
                return Err(self.refuse(ModelError::Repeated(MODEL_KEYS[i])));
            }
            match map.next_value::<serde_json::Value>()? {
                serde_json::Value::String(s) => found[i] = Some(s),
                _ => return Err(self.refuse(ModelError::NotAString(MODEL_KEYS[i]))),
            }
        }
        Ok(found)
    }
}

/// Whether two model names name one model: Ollama reads a name without a
/// tag as `:latest`.
pub fn same_model(a: &str, b: &str) -> bool {
    let tagged =
        |n: &str, other: &str| !n.contains(':') && other.strip_prefix(n) == Some(":latest");
    a == b || tagged(a, b) || tagged(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_body_names_its_model() {
        assert_eq!(
            named_models(br#"{"model":"llama3.2","stream":true}"#),
            Ok(vec!["llama3.2".into()])
        );
        assert_eq!(named_models(br#"{"name":"llama3.2"}"#), Ok(vec!["llama3.2".into()]));
        assert_eq!(named_models(br#"{"messages":[]}"#), Ok(vec![]));
    }

    #[test]
    fn a_second_key_that_go_would_read_as_the_model_is_refused() {
        for body in [
            r#"{"model":"llama3.2","Model":"mistral"}"#,
            r#"{"model":"llama3.2","MODEL":"mistral"}"#,
            r#"{"model":"llama3.2","model":"mistral"}"#,
            r#"{"model":"llama3.2","mod\u0045l":"mistral"}"#,
            r#"{"NAME":"a","name":"b"}"#,
        ] {
            assert!(
                matches!(named_models(body.as_bytes()), Err(ModelError::Repeated(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn model_and_name_are_both_checked() {
        assert_eq!(named_models(br#"{"model":"","Name":"mistral"}"#), Ok(vec!["mistral".into()]));
        assert_eq!(
            named_models(br#"{"model":"llama3.2","name":"mistral"}"#),
            Ok(vec!["llama3.2".into(), "mistral".into()])
        );
    }

    #[test]
    fn what_is_not_a_single_object_with_string_models_is_refused() {
        assert_eq!(named_models(br#"{"model":1}"#), Err(ModelError::NotAString("model")));
        assert_eq!(named_models(br#"{"model":null}"#), Err(ModelError::NotAString("model")));
        assert_eq!(named_models(br#"[1]"#), Err(ModelError::NotAnObject));
        assert_eq!(named_models(br#"{"model":"a"}{"model":"b"}"#), Err(ModelError::NotAnObject));
        assert_eq!(named_models(b"not json"), Err(ModelError::NotAnObject));
    }

    #[test]
    fn nested_keys_do_not_count() {
        assert_eq!(
            named_models(br#"{"model":"a","options":{"model":"b","Name":"c"}}"#),
            Ok(vec!["a".into()])
        );
    }

    #[test]
    fn showing_a_model_does_not_load_it() {
        assert!(runs_a_model("/api/show") && !loads_a_model("/api/show"));
        assert!(loads_a_model("/api/chat") && loads_a_model("/v1/embeddings"));
        assert!(!loads_a_model("/api/pull"));
    }

    #[test]
    fn a_name_without_a_tag_is_latest() {
        assert!(same_model("llama3.2", "llama3.2:latest"));
        assert!(same_model("llama3.2:latest", "llama3.2"));
        assert!(same_model("qwen2.5:7b", "qwen2.5:7b"));
        assert!(!same_model("qwen2.5", "qwen2.5:7b"));
        assert!(!same_model("llama3", "llama3.2:latest"));
    }
}
