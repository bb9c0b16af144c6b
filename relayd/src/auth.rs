//! Placeholder authentication: static per-user tokens from the config.
//!
//! Agents present their user's `agent_token`, web clients the user's
//! `client_token` (when one is configured), both as `Authorization: Bearer`.
//! The JWT identity work replaces this module; routing by user does not change.

use http::HeaderMap;

use crate::config::{Config, User};
use crate::response::Unauthorized;

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The user whose agent token `token` is.
pub fn agent_user<'a>(config: &'a Config, token: &str) -> Option<&'a User> {
    // Compare against every user so the time taken does not say which
    // prefix matched.
    let mut found = None;
    for user in &config.users {
        if constant_time_eq(user.agent_token.as_bytes(), token.as_bytes()) {
            found = Some(user);
        }
    }
    found
}

/// Whether a web request may use `user`'s routes, and if not, whether it
/// lacked a token or carried a wrong one.
pub fn client_allowed(user: &User, headers: &HeaderMap) -> Result<(), Unauthorized> {
    let Some(expected) = &user.client_token else { return Ok(()) };
    match bearer(headers) {
        None => Err(Unauthorized::Missing),
        Some(t) if constant_time_eq(expected.as_bytes(), t.as_bytes()) => Ok(()),
        Some(_) => Err(Unauthorized::Invalid),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "bearer abc".parse().expect("valid"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert("authorization", "Basic abc".parse().expect("valid"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn tokens_must_match_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
