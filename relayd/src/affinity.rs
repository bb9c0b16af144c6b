//! Stickiness: the requests of one conversation stay on one device while
//! it is healthy, so that a model keeps its context (Ollama's KV cache)
//! and a conversation does not hop between machines mid-way.
//!
//! A request's key, first found of: the `X-Tunnel-Affinity` header (any
//! text a client picks), Open WebUI's `X-OpenWebUI-Chat-Id` (sent when its
//! `ENABLE_FORWARD_USER_INFO_HEADERS` is on), and, for a chat body, its
//! model and its first user message, which every later turn of the
//! conversation repeats. The router picks among the devices that hold the
//! model equally well by rendezvous hashing on the key, weighted by each
//! device's speed: a device twice as fast takes about twice the
//! conversations, and a device coming or going moves only its own.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use http::HeaderMap;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The header a client names its conversation in.
pub const HEADER: &str = "x-tunnel-affinity";
/// Open WebUI's chat id, when it forwards its user headers.
const OPEN_WEBUI_CHAT: &str = "x-openwebui-chat-id";

/// The affinity key of a request with `headers` and, when the relay read
/// it, `body`; `None` when it names no conversation.
pub fn key(headers: &HeaderMap, body: Option<&[u8]>) -> Option<u64> {
    let named = [HEADER, OPEN_WEBUI_CHAT]
        .iter()
        .find_map(|h| headers.get(*h).map(|v| v.as_bytes()).filter(|v| !v.is_empty()));
    if let Some(name) = named {
        return Some(hash(&[b"header", name]));
    }
    let chat: Chat<'_> = serde_json::from_slice(body?).ok()?;
    let first = chat.messages.iter().find(|m| m.role == Some("user"))?;
    Some(hash(&[
        b"chat",
        chat.model.unwrap_or_default().as_bytes(),
        first.content?.get().as_bytes(),
    ]))
}

/// A device's score for `key` at `tokens_per_second`: the device with the
/// highest among those equally good takes the conversation (weighted
/// rendezvous hashing: `w / -ln(u)` gives each device a share of keys in
/// proportion to `w`). The speed counts in steps of a factor of 1.41, so
/// that the small changes of a measured speed do not move conversations.
pub fn score(key: u64, device: &str, tokens_per_second: f64) -> f64 {
    let h = hash(&[&key.to_le_bytes(), device.as_bytes()]);
    // 53 bits of the hash as a uniform number strictly between 0 and 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let steps = (tokens_per_second.max(0.01).log2() * 2.0).round();
    let w = (steps / 2.0).exp2();
    w / -u.ln()
}

/// Most conversations whose device a relay remembers; the oldest placed is
/// forgotten first (its next turn is placed again by [`score`]).
pub const MAX_PLACEMENTS: usize = 65_536;

/// Where conversations went: their user's and key's hash, and the device.
#[derive(Debug, Default)]
pub struct Placements {
    inner: Mutex<Placed>,
}

/// The devices by conversation, and the conversations in the order placed.
type Placed = (HashMap<u64, Arc<str>>, VecDeque<u64>);

impl Placements {
    /// The device `user`'s conversation `key` went to last.
    pub fn get(&self, user: &str, key: u64) -> Option<Arc<str>> {
        let slot = hash(&[user.as_bytes(), &key.to_le_bytes()]);
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).0.get(&slot).cloned()
    }

    /// Remembers that `user`'s conversation `key` went to `device`.
    pub fn put(&self, user: &str, key: u64, device: &str) {
        let slot = hash(&[user.as_bytes(), &key.to_le_bytes()]);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, order) = &mut *inner;
        if map.insert(slot, Arc::from(device)).is_none() {
            order.push_back(slot);
            if order.len() > MAX_PLACEMENTS
                && let Some(oldest) = order.pop_front()
            {
                map.remove(&oldest);
            }
        }
    }
}

fn hash(parts: &[&[u8]]) -> u64 {
    // SipHash with fixed keys: the same on every relay and every restart.
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// What of a chat body makes its key; the rest is skipped unread.
#[derive(Deserialize)]
struct Chat<'a> {
    #[serde(borrow, default)]
    model: Option<&'a str>,
    #[serde(borrow, default)]
    messages: Vec<Turn<'a>>,
}

#[derive(Deserialize)]
struct Turn<'a> {
    #[serde(borrow, default)]
    role: Option<&'a str>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn chat(turns: &[(&str, &str)]) -> Vec<u8> {
        let messages: Vec<_> =
            turns.iter().map(|(r, c)| serde_json::json!({ "role": r, "content": c })).collect();
        serde_json::json!({ "model": "llama3.2", "messages": messages }).to_string().into_bytes()
    }

    #[test]
    fn the_turns_of_one_conversation_share_a_key() {
        let none = HeaderMap::new();
        let first = chat(&[("system", "be brief"), ("user", "hello")]);
        let later = chat(&[
            ("system", "be brief"),
            ("user", "hello"),
            ("assistant", "hi"),
            ("user", "more"),
        ]);
        let other = chat(&[("system", "be brief"), ("user", "another topic")]);
        let k = key(&none, Some(&first));
        assert!(k.is_some());
        assert_eq!(k, key(&none, Some(&later)));
        assert_ne!(k, key(&none, Some(&other)));
        assert_eq!(key(&none, Some(br#"{"model":"m","prompt":"x"}"#)), None);
        assert_eq!(key(&none, Some(b"not json")), None);
        let mut named = HeaderMap::new();
        named.insert(HEADER, HeaderValue::from_static("conversation-7"));
        let by_header = key(&named, Some(&other));
        assert!(by_header.is_some() && by_header != key(&none, Some(&other)));
        assert_eq!(by_header, key(&named, None));
        assert_ne!(score(1, "gpu-box", 1.0), score(1, "laptop", 1.0));
        assert_eq!(score(1, "gpu-box", 1.0), score(1, "gpu-box", 1.0));
    }

    #[test]
    fn placements_are_per_user_and_bounded() {
        let p = Placements::default();
        p.put("alice", 7, "gpu-box");
        assert_eq!(p.get("alice", 7).as_deref(), Some("gpu-box"));
        assert_eq!(p.get("bob", 7), None);
        p.put("alice", 7, "laptop");
        assert_eq!(p.get("alice", 7).as_deref(), Some("laptop"));
        for k in 0..MAX_PLACEMENTS as u64 {
            p.put("bob", k, "mini");
        }
        assert_eq!(p.get("alice", 7), None, "the oldest is forgotten first");
        assert_eq!(p.get("bob", 0).as_deref(), Some("mini"));
    }

    /// Of 10,000 conversations, a device four times as fast takes about
    /// four fifths; speeds that differ by a few percent change nothing.
    #[test]
    fn conversations_spread_in_proportion_to_speed() {
        let fast_wins = |fast: f64, slow: f64| {
            (0..10_000u64)
                .filter(|k| score(*k, "gpu-box", fast) > score(*k, "laptop", slow))
                .count()
        };
        let share = fast_wins(80.0, 20.0);
        assert!((7_700..8_300).contains(&share), "{share}");
        let even = fast_wins(20.0, 20.0);
        assert!((4_700..5_300).contains(&even), "{even}");
        assert_eq!(fast_wins(20.5, 20.0), even);
    }
}
