//! The keys relayd verifies tokens with, each pinned to one algorithm, and
//! the Ed25519 key it signs its own tokens with.
//!
//! A token's `alg` must be the algorithm of the key that verifies it: an
//! HS256 token is never checked against a public key's bytes (no HS/RS
//! confusion), and `none` matches no key at all. Keys come from relayd's own
//! signing key, PEM public keys, an HS256 secret file, and JWKS documents
//! (a file or a URL); `kid` picks among them, so a provider can roll keys
//! over.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;

/// Where a verification key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrigin {
    /// relayd's own signing key.
    Own,
    /// A PEM public key file.
    Pem(PathBuf),
    /// The HS256 secret file.
    Secret(PathBuf),
    /// A JWKS document (file or URL).
    Jwks(String),
}

/// One key a token may be verified with.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    /// The one algorithm tokens for this key may use.
    pub alg: Algorithm,
    pub key: DecodingKey,
    pub origin: KeyOrigin,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {}: {source}{}", path.display(), daemon::config::access_hint(path, source))]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error("{origin}: {why}")]
    Jwks { origin: String, why: String },
}

/// Algorithms an operator may pin a public key to.
pub fn public_algorithm(name: &str) -> Option<Algorithm> {
    match name.parse::<Algorithm>().ok()? {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
        alg => Some(alg),
    }
}

/// A PEM public key for `alg`.
pub fn pem_key(path: &Path, alg: Algorithm, kid: Option<String>) -> Result<VerifyKey, KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
    let invalid = |why: String| KeyError::Invalid { path: path.into(), why };
    let key = match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
        _ => return Err(invalid(format!("{alg:?} is not a public-key algorithm"))),
    }
    .map_err(|e| invalid(format!("not a {alg:?} public key in PEM: {e}")))?;
    Ok(VerifyKey { kid, alg, key, origin: KeyOrigin::Pem(path.into()) })
}

/// The HS256 key in `path` (its trimmed content is the secret; at least 32
/// bytes, or a guessed secret would forge tokens).
pub fn hs256_key(path: &Path, kid: Option<String>) -> Result<VerifyKey, KeyError> {
    let secret =
        std::fs::read(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
    let secret = secret.trim_ascii();
    if secret.len() < 32 {
        return Err(KeyError::Invalid {
            path: path.into(),
            why: "an HS256 secret must be at least 32 bytes".into(),
        });
    }
    Ok(VerifyKey {
        kid,
        alg: Algorithm::HS256,
        key: DecodingKey::from_secret(secret),
        origin: KeyOrigin::Secret(path.into()),
    })
}

/// The signature keys of a JWKS document. Encryption keys and symmetric
/// keys are left out; a key without `alg` gets its type's usual one.
pub fn jwks_keys(text: &[u8], origin: &str) -> Result<Vec<VerifyKey>, KeyError> {
    let set: JwkSet = serde_json::from_slice(text)
        .map_err(|e| KeyError::Jwks { origin: origin.into(), why: format!("not a JWKS: {e}") })?;
    let keys: Vec<VerifyKey> = set.keys.iter().filter_map(|jwk| jwks_key(jwk, origin)).collect();
    if keys.is_empty() && !set.keys.is_empty() {
        return Err(KeyError::Jwks {
            origin: origin.into(),
            why: "no usable signature key".into(),
        });
    }
    Ok(keys)
}

fn jwks_key(jwk: &Jwk, origin: &str) -> Option<VerifyKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
        (_, AlgorithmParameters::OctetKey(_)) => return None,
        (Some(a), _) => jwk_algorithm(a)?,
        (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
        (None, AlgorithmParameters::EllipticCurve(p)) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        (None, AlgorithmParameters::OctetKeyPair(p)) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
        origin: KeyOrigin::Jwks(origin.into()),
    })
}

fn jwk_algorithm(a: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        // Symmetric and encryption algorithms never verify a signature
        // from a key set someone else publishes.
        _ => return None,
    })
}

/// relayd's own Ed25519 key: it signs access, client and share tokens.
pub struct Signer {
    kid: String,
    key: EncodingKey,
    public: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl Signer {
    /// The key in `path`, made there (mode 0600) when there is none yet.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let invalid = |why: String| KeyError::Invalid { path: path.into(), why };
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(mut f) => {
                let (signer, pem) = Self::generate().map_err(invalid)?;
                f.write_all(pem.as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|source| KeyError::Read { path: path.into(), source })?;
                Ok(signer)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                daemon::config::private_file(path).map_err(|e| invalid(e.to_string()))?;
                let pem = std::fs::read(path)
                    .map_err(|source| KeyError::Read { path: path.into(), source })?;
                Self::from_pem(&pem, path)
            }
            Err(source) => Err(KeyError::Read { path: path.into(), source }),
        }
    }

    /// A PKCS#8 PEM Ed25519 private key (what [`Signer::generate`] writes).
    pub fn from_pem(pem: &[u8], path: &Path) -> Result<Self, KeyError> {
        let invalid = |why: String| KeyError::Invalid { path: path.into(), why };
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| invalid(format!("not a PKCS#8 PEM private key: {e}")))?;
        Self::from_pkcs8(der.secret_pkcs8_der()).map_err(invalid)
    }

    fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| format!("not an Ed25519 key: {e}"))?;
        let public = pair.public_key().as_ref().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, &public);
        let kid = format!("relayd-{}", URL_SAFE_NO_PAD.encode(&digest.as_ref()[..9]));
        Ok(Self { kid, key: EncodingKey::from_ed_der(der), public })
    }

    /// A new key, and its PKCS#8 PEM form to store (mode 0600).
    pub fn generate() -> Result<(Self, String), String> {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
        let signer = Self::from_pkcs8(der.as_ref())?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Ok((signer, pem))
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key that verifies what this key signs.
    pub fn verify_key(&self) -> VerifyKey {
        VerifyKey {
            kid: Some(self.kid.clone()),
            alg: Algorithm::EdDSA,
            key: DecodingKey::from_ed_der(&self.public),
            origin: KeyOrigin::Own,
        }
    }

    /// Signs `claims` as a JWT with this key's `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| e.to_string())
    }

    /// The public key as a JWK, for publishing.
    pub fn public_jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA",
            "kid": self.kid, "x": URL_SAFE_NO_PAD.encode(&self.public),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_signs_what_its_verify_key_accepts_and_reloads_from_pem() {
        let (signer, pem) = Signer::generate().expect("generate");
        let token = signer
            .sign(&serde_json::json!({ "sub": "alice", "exp": 4_000_000_000u64 }))
            .expect("sign");
        let vk = signer.verify_key();
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &vk.key,
            &jsonwebtoken::Validation::new(Algorithm::EdDSA),
        )
        .expect("verifies");
        assert_eq!(data.claims["sub"], "alice");
        let again = Signer::from_pem(pem.as_bytes(), Path::new("k.pem")).expect("reload");
        assert_eq!(again.kid(), signer.kid());
        assert!(Signer::from_pem(b"not a key", Path::new("k.pem")).is_err());
    }

    #[test]
    fn jwks_keeps_signature_keys_and_drops_symmetric_and_encryption_ones() {
        let (signer, _) = Signer::generate().expect("generate");
        let mut enc = signer.public_jwk();
        enc["use"] = "enc".into();
        enc["kid"] = "enc-key".into();
        let set = serde_json::json!({ "keys": [
            signer.public_jwk(),
            enc,
            { "kty": "oct", "k": "c2VjcmV0", "kid": "sym", "alg": "HS256" },
        ]});
        let keys = jwks_keys(set.to_string().as_bytes(), "test").expect("parse");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some(signer.kid()));
        assert_eq!(keys[0].alg, Algorithm::EdDSA);
        assert!(jwks_keys(b"nope", "test").is_err());
    }

    #[test]
    fn symmetric_algorithms_cannot_be_pinned_to_public_keys() {
        assert_eq!(public_algorithm("RS256"), Some(Algorithm::RS256));
        assert_eq!(public_algorithm("HS256"), None);
        assert_eq!(public_algorithm("none"), None);
    }
}
