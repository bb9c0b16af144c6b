//! JWTs checked: the keys a token may be verified with (its `kid`, or every
//! key of its algorithm; an unknown `kid` fetches the JWKS again, at most
//! once per interval), the signature, `exp`/`nbf`, `iss` and `aud` as
//! configured, then the claims read into a [`Principal`].

use std::time::SystemTime;

use jsonwebtoken::Validation;
use serde_json::Value;

use super::keys::VerifyKey;
use tracing::warn;

use super::issue::{hex, sha256};
use super::{
    AuthError, Identity, Principal, Role, Via, claims, constant_time_eq, parse_credential,
};

impl Identity {
    pub(super) fn static_token(&self, token: &str) -> Result<Principal, AuthError> {
        // Compare against every token so the time taken does not say which
        // prefix matched.
        let mut found = None;
        for s in &self.statics {
            if constant_time_eq(s.token.as_bytes(), token.as_bytes()) {
                found = Some(s);
            }
        }
        let s = found.ok_or(AuthError::Unknown)?;
        Ok(Principal {
            user: s.user.clone(),
            device: None,
            role: s.role,
            scope: None,
            id: None,
            parent: None,
            expires: None,
            via: Via::Static,
        })
    }

    pub(super) async fn credential(&self, token: &str) -> Result<Principal, AuthError> {
        let (id, secret) = parse_credential(token).ok_or(AuthError::Unknown)?;
        let record = match self.store.get(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(AuthError::Unknown),
            Err(e) => {
                warn!(error = %e, "cannot look the credential up in the store: {e}; refusing it for now");
                return Err(AuthError::Unavailable(e.0));
            }
        };
        if !constant_time_eq(
            hex(&sha256(secret.as_bytes())).as_bytes(),
            record.secret_sha256.as_bytes(),
        ) {
            return Err(AuthError::Unknown);
        }
        Ok(Principal {
            user: record.user,
            device: record.device,
            role: Role::Agent,
            scope: None,
            id: Some(record.id),
            parent: None,
            expires: None,
            via: Via::Credential,
        })
    }

    /// The keys a token with `header` may be verified with.
    async fn candidates(&self, header: &jsonwebtoken::Header) -> Result<Vec<VerifyKey>, AuthError> {
        let pick = |keys: Vec<VerifyKey>| -> Vec<VerifyKey> {
            match &header.kid {
                Some(kid) => {
                    keys.into_iter().filter(|k| k.kid.as_deref() == Some(kid.as_str())).collect()
                }
                None => keys.into_iter().filter(|k| k.alg == header.alg).collect(),
            }
        };
        let all = |this: &Self| {
            let mut keys = this.config.keys.clone();
            if let Some(s) = &this.config.signer {
                keys.push(s.verify_key());
            }
            if let Some(j) = &this.jwks {
                keys.extend(j.keys());
            }
            keys
        };
        let found = pick(all(self));
        if !found.is_empty() {
            return Ok(found);
        }
        // An unknown kid may be a provider's new key: look again, at most
        // once per interval. A fetch already under way (the one at start)
        // is waited for, and its keys count.
        if header.kid.is_some()
            && let Some(j) = &self.jwks
        {
            j.refresh().await;
            let found = pick(all(self));
            if !found.is_empty() {
                return Ok(found);
            }
        }
        Err(if header.kid.is_some() { AuthError::UnknownKey } else { AuthError::Algorithm })
    }

    pub(super) async fn jwt(&self, token: &str) -> Result<Principal, AuthError> {
        // `alg: none` (and any algorithm the library does not implement)
        // fails here: no such key exists.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Unknown)?;
        if header.crit.is_some() {
            return Err(AuthError::Claims("critical header parameters are not supported".into()));
        }
        let mut last = AuthError::Algorithm;
        for key in self.candidates(&header).await? {
            if key.alg != header.alg {
                last = AuthError::Algorithm;
                continue;
            }
            let mut v = Validation::new(key.alg);
            v.leeway = self.config.leeway.as_secs();
            v.validate_nbf = true;
            v.validate_exp = true;
            // A configured issuer or audience must be present, not just
            // right when present.
            let mut required = vec!["exp"];
            if let Some(iss) = &self.config.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            match &self.config.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            v.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<Value>(token, &key.key, &v) {
                Ok(data) => {
                    return claims::principal_of(&self.config, &data.claims, SystemTime::now());
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature => AuthError::BadSignature,
                        K::ExpiredSignature => AuthError::Expired,
                        K::ImmatureSignature => AuthError::NotYetValid,
                        K::InvalidIssuer => AuthError::Issuer,
                        K::InvalidAudience => AuthError::Audience,
                        K::InvalidAlgorithm => AuthError::Algorithm,
                        K::MissingRequiredClaim(c) => AuthError::Claims(format!("no {c} claim")),
                        K::InvalidClaimFormat(c) => {
                            AuthError::Claims(format!("the {c} claim is malformed"))
                        }
                        _ => AuthError::Unknown,
                    };
                    // Another key with the same kid may still match.
                    if last != AuthError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}
