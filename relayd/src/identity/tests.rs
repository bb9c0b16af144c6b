//! Token verification against the attacks it exists to stop.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::keys::Signer;
use super::*;

fn identity() -> (Identity, Arc<Signer>) {
    let (signer, _) = Signer::generate().expect("key");
    let signer = Arc::new(signer);
    let config = IdentityConfig {
        issuer: Some("https://relay.test".into()),
        audience: Some("llm-tunnel".into()),
        signer: Some(signer.clone()),
        ..IdentityConfig::default()
    };
    let statics = vec![StaticToken {
        token: "static-agent-token-0123456789".into(),
        user: "carol".into(),
        role: Role::Agent,
    }];
    (Identity::in_memory(config, statics), signer)
}

fn now() -> u64 {
    unix(SystemTime::now())
}

fn claims(user: &str, role: &str) -> Value {
    json!({ "sub": user, "role": role, "iss": "https://relay.test", "aud": "llm-tunnel",
            "iat": now(), "exp": now() + 600, "jti": "t_0000000000000001" })
}

fn block<T>(on: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(on)
}

#[test]
fn a_minted_token_names_its_user_and_role() {
    let (id, _) = identity();
    let minted = id.mint("alice", Role::Client, Duration::from_secs(60), None).expect("mint");
    let p = block(id.verify(&minted.token)).expect("valid");
    assert_eq!((p.user.as_str(), p.role, p.via), ("alice", Role::Client, Via::Token));
    assert_eq!(p.id, Some(minted.id));
}

#[test]
fn alg_none_and_tampered_tokens_are_refused() {
    let (id, signer) = identity();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims("alice", "client").to_string());
    assert_eq!(block(id.verify(&format!("{header}.{body}."))), Err(AuthError::Unknown));
    let good = signer.sign(&claims("alice", "client")).expect("sign");
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(claims("bob", "client").to_string());
    parts[1] = &forged;
    assert_eq!(block(id.verify(&parts.join("."))), Err(AuthError::BadSignature));
}

#[test]
fn an_hs256_token_signed_with_the_public_key_is_refused() {
    let (id, signer) = identity();
    // The classic confusion: the verifier's public key used as an HMAC
    // secret. The relay's key is pinned to EdDSA.
    let public =
        URL_SAFE_NO_PAD.decode(signer.public_jwk()["x"].as_str().expect("x")).expect("b64");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(signer.kid().to_owned());
    let token = jsonwebtoken::encode(
        &header,
        &claims("alice", "client"),
        &EncodingKey::from_secret(&public),
    )
    .expect("encode");
    assert_eq!(block(id.verify(&token)), Err(AuthError::Algorithm));
}

#[test]
fn time_issuer_and_audience_are_checked() {
    let (id, signer) = identity();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("alice", "client");
        f(&mut c);
        block(id.verify(&signer.sign(&c).expect("sign")))
    };
    assert_eq!(with(&|c| c["exp"] = (now() - 120).into()), Err(AuthError::Expired));
    assert_eq!(with(&|c| c["nbf"] = (now() + 600).into()), Err(AuthError::NotYetValid));
    assert_eq!(with(&|c| c["iat"] = (now() + 600).into()), Err(AuthError::NotYetValid));
    assert_eq!(with(&|c| c["iss"] = "https://evil.test".into()), Err(AuthError::Issuer));
    assert_eq!(with(&|c| c["aud"] = "another".into()), Err(AuthError::Audience));
    assert!(matches!(
        with(&|c| c["iss"] = json!(["https://relay.test", "https://evil.test"])),
        Err(AuthError::Issuer | AuthError::Claims(_))
    ));
    assert!(matches!(
        with(&|c| {
            c.as_object_mut().expect("map").remove("exp");
        }),
        Err(AuthError::Claims(_))
    ));
    // A configured issuer and audience must be there, not only right.
    for claim in ["iss", "aud"] {
        assert!(
            matches!(
                with(&|c| {
                    c.as_object_mut().expect("map").remove(claim);
                }),
                Err(AuthError::Claims(_))
            ),
            "a token without {claim}"
        );
    }
    // Within the leeway (30 s) a just-expired token still passes.
    assert!(with(&|c| c["exp"] = (now() - 5).into()).is_ok());
}

#[test]
fn roles_users_and_scopes_come_from_the_claims() {
    let (id, signer) = identity();
    let verify = |c: Value| block(id.verify(&signer.sign(&c).expect("sign")));
    assert_eq!(verify(claims("alice", "agent")).expect("ok").role, Role::Agent);
    assert!(matches!(verify(claims("alice", "admin")), Err(AuthError::Claims(_))));
    assert!(matches!(verify(claims("a/b", "client")), Err(AuthError::Claims(_))));
    let mut both = claims("alice", "agent");
    both["role"] = json!(["agent", "client"]);
    assert!(matches!(verify(both), Err(AuthError::Claims(_))));
    let mut share = claims("alice", "client");
    share["share"] = json!({ "paths": ["/api/chat"], "models": ["llama3.2"] });
    let scope = verify(share).expect("ok").scope.expect("scope");
    assert!(scope.allows_path("/api/chat") && !scope.allows_path("/api/pull"));
    assert!(scope.allows_model("llama3.2") && !scope.allows_model("other"));
}

#[test]
fn unknown_kids_and_oversized_tokens_are_refused() {
    let (id, _) = identity();
    let (other, _) = Signer::generate().expect("key");
    let token = other.sign(&claims("alice", "client")).expect("sign");
    assert_eq!(block(id.verify(&token)), Err(AuthError::UnknownKey));
    assert_eq!(block(id.verify(&"a".repeat(MAX_TOKEN_LEN + 1))), Err(AuthError::TooLarge));
    assert_eq!(block(id.verify("garbage")), Err(AuthError::Unknown));
}

#[test]
fn credentials_verify_until_revoked_and_the_cache_does_not_hide_a_revocation() {
    let (id, _) = identity();
    let issued = block(id.issue_credential("alice", None, None)).expect("issue");
    assert!(issued.secret.starts_with("tcred_c_"));
    let p = block(id.verify(&issued.secret)).expect("valid");
    assert_eq!((p.user.as_str(), p.role, p.via), ("alice", Role::Agent, Via::Credential));
    let mut wrong = issued.secret.clone();
    // Another last character (the secret's own may be 'A').
    let last = wrong.pop();
    wrong.push(if last == Some('A') { 'B' } else { 'A' });
    assert_eq!(block(id.verify(&wrong)), Err(AuthError::Unknown));
    assert!(block(id.revoke(&issued.id, None)).expect("revoke"));
    assert_eq!(block(id.verify(&issued.secret)), Err(AuthError::Revoked));
    let minted = id.mint("alice", Role::Client, Duration::from_secs(60), None).expect("mint");
    assert!(block(id.verify(&minted.token)).is_ok());
    block(id.revoke(&minted.id, Some(minted.expires))).expect("revoke");
    assert_eq!(block(id.verify(&minted.token)), Err(AuthError::Revoked));
}

#[test]
fn static_tokens_still_work() {
    let (id, _) = identity();
    let p = block(id.verify("static-agent-token-0123456789")).expect("valid");
    assert_eq!((p.user.as_str(), p.role, p.via), ("carol", Role::Agent, Via::Static));
    assert_eq!(block(id.verify("static-agent-token-012345678X")), Err(AuthError::Unknown));
}

#[test]
fn credentials_parse_only_in_their_own_shape() {
    assert_eq!(
        parse_credential("tcred_c_0123456789abcdef_secret"),
        Some(("c_0123456789abcdef", "secret"))
    );
    assert_eq!(parse_credential("tcred_c_0123456789abcdef_"), None);
    assert_eq!(parse_credential("tcred_x_0123456789abcdef_s"), None);
    assert_eq!(parse_credential("c_0123456789abcdef_s"), None);
    let _ = Path::new("");
}

#[test]
fn an_agent_names_its_device_in_its_credential_or_its_token() {
    let (id, signer) = identity();
    let issued = block(id.issue_credential("alice", Some("gpu-box"), None)).expect("issue");
    assert_eq!(issued.device.as_deref(), Some("gpu-box"));
    let p = block(id.verify(&issued.secret)).expect("valid");
    assert_eq!((p.user.as_str(), p.device()), ("alice", "gpu-box"));
    // The access token minted for the credential keeps the device.
    let access = id.mint_access("alice", Some(p.device()), &issued.id).expect("mint");
    let token = access.expect("relayd signs").token;
    assert_eq!(block(id.verify(&token)).expect("valid").device(), "gpu-box");
    // Without a device: the user's default one.
    let plain = block(id.issue_credential("alice", None, None)).expect("issue");
    assert_eq!(block(id.verify(&plain.secret)).expect("valid").device(), DEFAULT_DEVICE);
    assert!(matches!(
        block(id.issue_credential("alice", Some("a/b"), None)),
        Err(IdentityError::Invalid(_))
    ));
    let verify = |c: Value| block(id.verify(&signer.sign(&c).expect("sign")));
    let mut jwt = claims("alice", "agent");
    jwt["device"] = json!("laptop");
    assert_eq!(verify(jwt).expect("ok").device(), "laptop");
    assert_eq!(verify(claims("alice", "agent")).expect("ok").device(), DEFAULT_DEVICE);
    let mut bad = claims("alice", "agent");
    bad["device"] = json!("no spaces");
    assert!(matches!(verify(bad), Err(AuthError::Claims(_))));
    let mut client = claims("alice", "client");
    client["device"] = json!("laptop");
    assert!(matches!(verify(client), Err(AuthError::Claims(_))));
}
