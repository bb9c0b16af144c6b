//! A verified JWT's claims read into a [`Principal`]: the user, the role,
//! a share scope, the token's id and the credential it was minted from, and
//! its times.
//!
//! Times are NumericDates as RFC 7519 defines them: any JSON number of
//! seconds since 1970, fractions included. Each one a token carries is read
//! and checked here, whatever the signature library made of it, and a date
//! past year 9999 is refused rather than added to a clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{AuthError, IdentityConfig, Principal, Role, Scope, Via};

/// The last instant a NumericDate may name: 9999-12-31T23:59:59Z. Later
/// ones are refused (they would overflow the clock arithmetic, and no real
/// token needs them).
pub const MAX_NUMERIC_DATE: u64 = 253_402_300_799;

/// The claim a relay-minted access token names its credential in:
/// revoking that credential revokes every token minted from it.
pub const CREDENTIAL_CLAIM: &str = "cred";

/// The instant `secs` seconds after 1970, when it is one a token may name.
fn instant(secs: f64) -> Option<SystemTime> {
    (secs.is_finite() && (0.0..=MAX_NUMERIC_DATE as f64).contains(&secs))
        .then(|| UNIX_EPOCH + Duration::from_secs_f64(secs))
}

/// Claim `name` as a NumericDate (`None`: absent).
pub fn numeric_date(claims: &Value, name: &str) -> Result<Option<SystemTime>, AuthError> {
    let Some(v) = claims.get(name) else { return Ok(None) };
    v.as_f64().and_then(instant).map(Some).ok_or_else(|| {
        AuthError::Claims(format!(
            "the {name} claim is not a date: a number of seconds since 1970 up to year 9999"
        ))
    })
}

/// `t + d`, or the last representable date past it.
pub fn later(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d).unwrap_or(UNIX_EPOCH + Duration::from_secs(MAX_NUMERIC_DATE))
}

/// Who a verified token's `claims` speak for, at `now`.
pub fn principal_of(
    c: &IdentityConfig,
    claims: &Value,
    now: SystemTime,
) -> Result<Principal, AuthError> {
    // jsonwebtoken accepts an `iss` list when one member matches; a
    // token names one issuer.
    if claims.get("iss").is_some_and(|i| !i.is_string()) {
        return Err(AuthError::Claims("iss must be a single string".into()));
    }
    let expires =
        numeric_date(claims, "exp")?.ok_or_else(|| AuthError::Claims("no exp claim".into()))?;
    if later(expires, c.leeway) <= now {
        return Err(AuthError::Expired);
    }
    let not_before = numeric_date(claims, "nbf")?;
    let issued = numeric_date(claims, "iat")?;
    if not_before.into_iter().chain(issued).any(|t| t > later(now, c.leeway)) {
        return Err(AuthError::NotYetValid);
    }
    let user = claims
        .get(&c.user_claim)
        .and_then(Value::as_str)
        .filter(|u| super::valid_user_id(u))
        .ok_or_else(|| {
            AuthError::Claims(format!("no valid user id in the {} claim", c.user_claim))
        })?
        .to_owned();
    let role = role_of(c, claims)?;
    let scope = match claims.get("share") {
        None => None,
        Some(s) => Some(scope_of(s)?),
    };
    if scope.is_some() && role != Role::Client {
        return Err(AuthError::Claims("only client tokens carry a share scope".into()));
    }
    let text = |name: &str| match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(AuthError::Claims(format!("the {name} claim must be a string"))),
    };
    let device = match claims.get(&c.device_claim) {
        None => None,
        Some(Value::String(d)) if super::valid_user_id(d) && role == Role::Agent => Some(d.clone()),
        Some(_) if role != Role::Agent => {
            return Err(AuthError::Claims(format!(
                "only agent tokens name a device (the {} claim)",
                c.device_claim
            )));
        }
        Some(_) => {
            return Err(AuthError::Claims(format!(
                "the {} claim is not a valid device name (1-64 characters from [A-Za-z0-9._-])",
                c.device_claim
            )));
        }
    };
    Ok(Principal {
        user,
        device,
        role,
        scope,
        id: text("jti")?,
        parent: text(CREDENTIAL_CLAIM)?,
        expires: Some(expires),
        via: Via::Token,
    })
}

fn role_of(c: &IdentityConfig, claims: &Value) -> Result<Role, AuthError> {
    let names: Vec<&str> = match claims.get(&c.role_claim) {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    match (names.contains(&c.agent_role.as_str()), names.contains(&c.client_role.as_str())) {
        (true, false) => Ok(Role::Agent),
        (false, true) => Ok(Role::Client),
        (true, true) => Err(AuthError::Claims("the token names both roles".into())),
        (false, false) => Err(AuthError::Claims(format!("no role in the {} claim", c.role_claim))),
    }
}

/// A share claim: an object with `paths` and/or `models`, nothing else,
/// limiting something. A member the relay does not know could be a limit
/// it would not enforce, so it is refused, never ignored.
fn scope_of(share: &Value) -> Result<Scope, AuthError> {
    let malformed = |why: String| AuthError::Claims(format!("the share claim is malformed: {why}"));
    let scope =
        serde_json::from_value::<Scope>(share.clone()).map_err(|e| malformed(e.to_string()))?;
    if scope.paths.is_empty() && scope.models.is_empty() {
        return Err(malformed("it limits neither paths nor models".into()));
    }
    Ok(scope)
}
