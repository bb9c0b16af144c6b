//! Authorization at the relay's two doors: what a request's bearer token
//! lets it do. Tokens travel only in `Authorization: Bearer`; a token in a
//! query string is not looked at (it would end up in logs).
//!
//! - A tunnel route needs a client token for its user, unless the user is
//!   public (then a token it cannot use is ignored: SDKs send one anyway). A
//!   missing, malformed, badly signed or expired token is a 401 that says
//!   which; a valid token for another user, or an agent token, is a 403.
//! - `/ws/tunnel` needs an agent token (or credential) of the user it
//!   opens; a client token is a 403, so a leaked web token can never
//!   register an agent and intercept a user's traffic.

use http::HeaderMap;

use crate::identity::{AuthError, Identity, Principal, Role};

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Why a request carried no usable credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthorized {
    /// No `Authorization: Bearer` at all.
    Missing,
    /// A token that is not valid here (malformed, badly signed, revoked).
    Invalid,
    /// A token that was valid and ran out.
    Expired,
    /// A credential or token its issuer revoked (or one minted for a
    /// revoked credential): a new one is needed, retrying will not help.
    Revoked,
}

/// Why a request may not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401: no usable credential.
    Unauthorized(Unauthorized, String),
    /// 403: a valid credential that does not allow this.
    Forbidden(&'static str, String),
    /// 503: the relay cannot check the token now (its shared store is out
    /// of reach); the same token may pass later.
    Unavailable(String),
}

impl Denied {
    fn of(e: AuthError) -> Self {
        if let AuthError::Unavailable(_) = e {
            return Denied::Unavailable(e.to_string());
        }
        let kind = match e {
            AuthError::Missing => Unauthorized::Missing,
            AuthError::Expired => Unauthorized::Expired,
            AuthError::Revoked => Unauthorized::Revoked,
            _ => Unauthorized::Invalid,
        };
        Denied::Unauthorized(kind, e.to_string())
    }
}

/// Who may use `user`'s tunnel with these headers: `None` for a public
/// tunnel called without a token.
pub async fn client(
    identity: &Identity,
    headers: &HeaderMap,
    user: &str,
) -> Result<Option<Principal>, Denied> {
    let public = identity.is_public(user);
    let token = match bearer(headers) {
        Some(t) => t,
        None if public => return Ok(None),
        None => return Err(Denied::of(AuthError::Missing)),
    };
    // A public tunnel ignores what it cannot use: SDKs send an API key
    // whether or not the server wants one.
    let p = match identity.verify(token).await {
        Ok(p) => p,
        Err(e @ AuthError::Unavailable(_)) => return Err(Denied::of(e)),
        Err(_) if public => return Ok(None),
        Err(e) => return Err(Denied::of(e)),
    };
    if public && (p.role != Role::Client || p.user != user) {
        return Ok(None);
    }
    if p.role != Role::Client {
        return Err(Denied::Forbidden(
            "wrong_role",
            "an agent token cannot call a tunnel: use a client token".into(),
        ));
    }
    if p.user != user {
        return Err(Denied::Forbidden(
            "wrong_user",
            "this token is for another user's tunnel".into(),
        ));
    }
    Ok(Some(p))
}

/// The agent these headers speak for.
pub async fn agent(identity: &Identity, headers: &HeaderMap) -> Result<Principal, Denied> {
    let token = bearer(headers).ok_or_else(|| Denied::of(AuthError::Missing))?;
    let p = identity.verify(token).await.map_err(Denied::of)?;
    if p.role != Role::Agent {
        return Err(Denied::Forbidden(
            "wrong_role",
            "a client token cannot open a tunnel: use the user's agent credential".into(),
        ));
    }
    Ok(p)
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
}
