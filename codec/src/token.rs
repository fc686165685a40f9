//! Access tokens: JWTs signed with HS256 and a secret shared by the relay
//! and the app's backend (development), or with EdDSA (Ed25519) or ES256
//! by a backend that holds the private key, checked against public keys
//! named by `kid` in a JWKS (RFC 7517). `docs/protocol.md` ("Tokens")
//! lists the claims.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::wire::check_name;

/// What a user may do in a talk channel. Each right includes the ones
/// before it: `talk` can listen, `priority` can talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Receive the channel's clips.
    Listen,
    /// Also talk (take the floor when it is free).
    Talk,
    /// Also pre-empt whoever holds the floor (dispatchers).
    Priority,
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Right::Listen => "listen",
            Right::Talk => "talk",
            Right::Priority => "priority",
        })
    }
}

impl FromStr for Right {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "listen" => Ok(Right::Listen),
            "talk" => Ok(Right::Talk),
            "priority" => Ok(Right::Priority),
            other => Err(format!("`{other}`: a right is listen, talk or priority")),
        }
    }
}

/// A channel grant as written on a command line: `NAME` (talk) or
/// `NAME:listen|talk|priority`.
pub fn parse_grant(s: &str) -> Result<(String, Right), String> {
    let (name, right) = match s.rsplit_once(':') {
        Some((n, r)) => (n, r.parse()?),
        None => (s, Right::Talk),
    };
    check_name("channel", name).map_err(|e| e.to_string())?;
    Ok((name.to_owned(), right))
}

/// Most channels one token may grant.
pub const MAX_CHANNELS_PER_TOKEN: usize = 1024;

/// The claims the relay reads.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Claims {
    /// User id: who this connection speaks for. 1..=128 bytes of UTF-8, no
    /// control characters.
    pub sub: String,
    /// Expiry, Unix time in seconds.
    pub exp: u64,
    /// Issued at, Unix time in seconds (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Talk channels the user belongs to, and the right in each:
    /// `{"ops": "talk", "dispatch": "priority"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub channels: BTreeMap<String, Right>,
}

/// Why a token was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// `exp` has passed: the client needs a fresh token.
    #[error("token expired")]
    Expired,
    /// Signature, algorithm, encoding or claims are wrong: the token will
    /// never be accepted; do not retry with it.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Smallest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// The shared secret in its two forms, plus the validation rules.
#[derive(Clone)]
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

/// Current Unix time in seconds.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn check_channels(c: &Claims) -> Result<(), TokenError> {
    if c.channels.len() > MAX_CHANNELS_PER_TOKEN {
        return Err(TokenError::Invalid(format!(
            "more than {MAX_CHANNELS_PER_TOKEN} channels"
        )));
    }
    for name in c.channels.keys() {
        check_name("channel", name).map_err(|e| TokenError::Invalid(e.to_string()))?;
    }
    Ok(())
}

impl TokenKey {
    /// A key from the secret's bytes (the secret file's content without
    /// surrounding white space). `leeway` is the clock skew tolerated on
    /// `exp`.
    pub fn new(secret: &[u8], leeway: Duration) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TokenError::Invalid(format!(
                "secret shorter than {MIN_SECRET_BYTES} bytes"
            )));
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation: validation(Algorithm::HS256, leeway),
        })
    }

    /// Reads a secret file: its content, trimmed of white space, is the key.
    pub fn from_file(path: &std::path::Path, leeway: Duration) -> std::io::Result<Self> {
        let raw = std::fs::read(path)?;
        let secret = raw.trim_ascii();
        Self::new(secret, leeway)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    }

    /// Mints a token for `user`, valid for `ttl`.
    pub fn mint(&self, user: &str, ttl: Duration) -> Result<String, TokenError> {
        self.mint_with_channels(user, ttl, BTreeMap::new())
    }

    /// Mints a token for `user` with channel grants.
    pub fn mint_with_channels(
        &self,
        user: &str,
        ttl: Duration,
        channels: BTreeMap<String, Right>,
    ) -> Result<String, TokenError> {
        self.mint_claims(&Claims::new(user, ttl, channels)?)
    }

    /// Signs arbitrary claims (e.g. a chosen `exp`).
    pub fn mint_claims(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// Checks signature, algorithm, expiry and the user id.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        verify_claims(token, &self.decoding, self.validation.clone())
    }
}

/// The public-key algorithms tokens may be signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// EdDSA over Ed25519 (`"alg": "EdDSA"`, JWK `OKP`/`Ed25519`).
    Ed25519,
    /// ECDSA over P-256 with SHA-256 (`"alg": "ES256"`, JWK `EC`/`P-256`).
    Es256,
}

impl KeyAlg {
    fn jwt(self) -> Algorithm {
        match self {
            KeyAlg::Ed25519 => Algorithm::EdDSA,
            KeyAlg::Es256 => Algorithm::ES256,
        }
    }
}

impl FromStr for KeyAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ed25519" | "eddsa" => Ok(KeyAlg::Ed25519),
            "es256" | "p256" | "p-256" => Ok(KeyAlg::Es256),
            other => Err(format!("`{other}`: a key algorithm is ed25519 or es256")),
        }
    }
}

/// Public keys that verify tokens, by key id: a JWKS file's keys (or
/// several files' keys together). Only Ed25519 (`EdDSA`) and P-256
/// (`ES256`) keys are taken.
#[derive(Clone, Default)]
pub struct PublicKeys {
    keys: std::collections::HashMap<String, (Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for PublicKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("PublicKeys").field("kids", &ids).finish()
    }
}

impl PublicKeys {
    /// Keys from a JWKS document (`{"keys": [...]}`). Every key needs a
    /// `kid`, unique within the set; a key of another type (RSA, another
    /// curve) is an error, so a mistake is seen when the file is loaded.
    pub fn from_jwks(json: &str) -> Result<Self, TokenError> {
        let mut keys = Self::default();
        keys.add_jwks(json)?;
        Ok(keys)
    }

    /// Adds a JWKS document's keys.
    pub fn add_jwks(&mut self, json: &str) -> Result<(), TokenError> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
        let bad = |why: String| TokenError::Invalid(format!("JWKS: {why}"));
        let set: JwkSet = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| bad("a key without `kid`".into()))?;
            let alg = match &jwk.algorithm {
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    Algorithm::EdDSA
                }
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => {
                    return Err(bad(format!(
                        "key {kid}: only Ed25519 (EdDSA) and P-256 (ES256) keys are taken"
                    )));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("key {kid}: {e}")))?;
            if self.keys.insert(kid.clone(), (alg, key)).is_some() {
                return Err(bad(format!("key id {kid} appears twice")));
            }
        }
        Ok(())
    }

    /// Reads a JWKS file, or every `*.json` file of a directory (one key
    /// set, for keys dropped in and removed one file each).
    pub fn from_path(path: &std::path::Path) -> std::io::Result<Self> {
        let invalid = |e: TokenError| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        };
        let mut keys = Self::default();
        if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            for f in files {
                keys.add_jwks(&std::fs::read_to_string(&f)?)
                    .map_err(invalid)?;
            }
        } else {
            keys.add_jwks(&std::fs::read_to_string(path)?)
                .map_err(invalid)?;
        }
        Ok(keys)
    }

    /// Key ids in the set, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// How the relay checks tokens: HS256 with the shared secret (when
/// allowed), EdDSA and ES256 with the public key their `kid` names.
pub struct Verifier<'a> {
    /// The shared secret; `None` when HS256 tokens are refused.
    pub secret: Option<&'a TokenKey>,
    pub public: &'a PublicKeys,
    /// Clock skew tolerated on `exp`.
    pub leeway: Duration,
}

impl Verifier<'_> {
    /// Checks a token's signature (by its header's `alg` and `kid`),
    /// expiry and claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        match header.alg {
            Algorithm::HS256 => match self.secret {
                Some(k) => k.verify(token),
                None => Err(TokenError::Invalid(
                    "HS256 tokens are not accepted by this relay".into(),
                )),
            },
            Algorithm::EdDSA | Algorithm::ES256 => {
                let kid = header
                    .kid
                    .ok_or_else(|| TokenError::Invalid("a signed token needs a `kid`".into()))?;
                let (alg, key) = self
                    .public
                    .keys
                    .get(&kid)
                    .ok_or_else(|| TokenError::Invalid(format!("unknown key id `{kid}`")))?;
                if *alg != header.alg {
                    return Err(TokenError::Invalid(format!(
                        "key `{kid}` is for {alg:?}, the token says {:?}",
                        header.alg
                    )));
                }
                verify_claims(token, key, validation(*alg, self.leeway))
            }
            other => Err(TokenError::Invalid(format!(
                "algorithm {other:?} is not accepted"
            ))),
        }
    }
}

fn validation(alg: Algorithm, leeway: Duration) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = leeway.as_secs();
    v.validate_exp = true;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

fn verify_claims(token: &str, key: &DecodingKey, v: Validation) -> Result<Claims, TokenError> {
    let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        _ => TokenError::Invalid(e.to_string()),
    })?;
    check_name("sub", &data.claims.sub).map_err(|e| TokenError::Invalid(e.to_string()))?;
    check_channels(&data.claims)?;
    Ok(data.claims)
}

/// A private key that mints tokens for a [`PublicKeys`] set: the app
/// backend's side (and `ptt-relay token --private-key`).
pub struct SigningKey {
    alg: KeyAlg,
    kid: String,
    encoding: EncodingKey,
}

impl SigningKey {
    /// A PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), Ed25519
    /// or P-256, published under key id `kid`.
    pub fn from_pem(pem: &[u8], kid: &str) -> Result<Self, TokenError> {
        let (alg, encoding) = match EncodingKey::from_ed_pem(pem) {
            Ok(k) => (KeyAlg::Ed25519, k),
            Err(_) => (
                KeyAlg::Es256,
                EncodingKey::from_ec_pem(pem).map_err(|e| {
                    TokenError::Invalid(format!("not an Ed25519 or P-256 private key: {e}"))
                })?,
            ),
        };
        Ok(Self {
            alg,
            kid: kid.to_owned(),
            encoding,
        })
    }

    pub fn alg(&self) -> KeyAlg {
        self.alg
    }

    /// Signs `claims` (header `alg` and `kid` set).
    pub fn mint_claims(&self, claims: &Claims) -> Result<String, TokenError> {
        let mut h = Header::new(self.alg.jwt());
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }
}

/// A new key pair: the private key as PKCS#8 PEM and the public key as a
/// JWK (JSON) with `kid`, `alg` and `use: sig`, for a JWKS.
pub fn generate_key(alg: KeyAlg, kid: &str) -> Result<(String, serde_json::Value), TokenError> {
    use base64::Engine;
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let fail = |e: ring::error::Unspecified| TokenError::Invalid(format!("key generation: {e}"));
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let (der, jwk) = match alg {
        KeyAlg::Ed25519 => {
            let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(fail)?;
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8(der.as_ref())
                .map_err(|e| TokenError::Invalid(e.to_string()))?;
            let jwk = serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref()),
                "kid": kid, "alg": "EdDSA", "use": "sig",
            });
            (der, jwk)
        }
        KeyAlg::Es256 => {
            let a = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let der = ring::signature::EcdsaKeyPair::generate_pkcs8(a, &rng).map_err(fail)?;
            let pair = ring::signature::EcdsaKeyPair::from_pkcs8(a, der.as_ref(), &rng)
                .map_err(|e| TokenError::Invalid(e.to_string()))?;
            // Uncompressed point: 0x04 | x (32) | y (32).
            let p = pair.public_key().as_ref();
            let jwk = serde_json::json!({
                "kty": "EC", "crv": "P-256", "x": b64(&p[1..33]), "y": b64(&p[33..65]),
                "kid": kid, "alg": "ES256", "use": "sig",
            });
            (der, jwk)
        }
    };
    let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok((pem, jwk))
}

impl Claims {
    /// Claims for `user`, valid for `ttl` from now, with channel grants;
    /// the user id and the grants are checked.
    pub fn new(
        user: &str,
        ttl: Duration,
        channels: BTreeMap<String, Right>,
    ) -> Result<Claims, TokenError> {
        check_name("user", user).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let now = now_secs();
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
            channels,
        };
        check_channels(&claims)?;
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn mint_and_verify() {
        let k = TokenKey::new(SECRET, Duration::ZERO).unwrap();
        let t = k.mint("alice", Duration::from_secs(60)).unwrap();
        let c = k.verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        assert!(c.exp >= now_secs() + 59);
    }

    #[test]
    fn refuses_bad_tokens() {
        let k = TokenKey::new(SECRET, Duration::ZERO).unwrap();
        let other = TokenKey::new(b"another secret of at least 32 bytes!", Duration::ZERO).unwrap();
        let forged = other.mint("alice", Duration::from_secs(60)).unwrap();
        assert!(matches!(k.verify(&forged), Err(TokenError::Invalid(_))));
        assert!(matches!(k.verify("garbage"), Err(TokenError::Invalid(_))));
        assert!(matches!(k.verify(""), Err(TokenError::Invalid(_))));
        // Expired an hour ago.
        let old = Claims {
            sub: "alice".into(),
            exp: now_secs() - 3600,
            ..Claims::default()
        };
        let t = k.mint_claims(&old).unwrap();
        assert_eq!(k.verify(&t), Err(TokenError::Expired));
        // Right key, wrong algorithm (HS512).
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims {
                sub: "a".into(),
                exp: now_secs() + 60,
                ..Claims::default()
            },
            &k.encoding,
        )
        .unwrap();
        assert!(matches!(k.verify(&t), Err(TokenError::Invalid(_))));
        // Empty subject.
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: String::new(),
                exp: now_secs() + 60,
                ..Claims::default()
            },
            &k.encoding,
        )
        .unwrap();
        assert!(matches!(k.verify(&t), Err(TokenError::Invalid(_))));
        assert!(TokenKey::new(b"short", Duration::ZERO).is_err());
    }

    #[test]
    fn channel_grants_round_trip_and_are_checked() {
        let k = TokenKey::new(SECRET, Duration::ZERO).unwrap();
        let mut ch = BTreeMap::new();
        for g in ["ops", "news:listen", "dispatch:priority"] {
            let (n, r) = parse_grant(g).unwrap();
            ch.insert(n, r);
        }
        let t = k
            .mint_with_channels("alice", Duration::from_secs(60), ch.clone())
            .unwrap();
        let c = k.verify(&t).unwrap();
        assert_eq!(c.channels, ch);
        assert_eq!(c.channels["ops"], Right::Talk);
        assert!(Right::Priority > Right::Talk && Right::Talk > Right::Listen);
        // The claim as JSON, as an app backend writes it.
        let payload = t.split('.').nth(1).unwrap();
        assert!(!payload.is_empty());
        assert!(parse_grant("ops:shout").is_err());
        assert!(parse_grant(":talk").is_err());
        // A bad channel name inside a signed token is refused.
        let bad = Claims {
            sub: "a".into(),
            exp: now_secs() + 60,
            channels: [("".to_owned(), Right::Talk)].into_iter().collect(),
            ..Claims::default()
        };
        let t = k.mint_claims(&bad).unwrap();
        assert!(matches!(k.verify(&t), Err(TokenError::Invalid(_))));
        // Tokens without the claim have no channels.
        let plain = k
            .verify(&k.mint("bob", Duration::from_secs(60)).unwrap())
            .unwrap();
        assert!(plain.channels.is_empty());
    }

    fn jwks(keys: &[&serde_json::Value]) -> String {
        serde_json::json!({ "keys": keys }).to_string()
    }

    #[test]
    fn public_key_tokens_verify_by_kid() {
        let (ed_pem, ed_jwk) = generate_key(KeyAlg::Ed25519, "ed-1").unwrap();
        let (es_pem, es_jwk) = generate_key(KeyAlg::Es256, "es-1").unwrap();
        let keys = PublicKeys::from_jwks(&jwks(&[&ed_jwk, &es_jwk])).unwrap();
        assert_eq!(keys.kids(), ["ed-1", "es-1"]);
        let hs = TokenKey::new(SECRET, Duration::ZERO).unwrap();
        let v = Verifier {
            secret: Some(&hs),
            public: &keys,
            leeway: Duration::ZERO,
        };
        let ch: BTreeMap<String, Right> = [("ops".to_owned(), Right::Talk)].into();
        for (pem, kid, alg) in [
            (&ed_pem, "ed-1", KeyAlg::Ed25519),
            (&es_pem, "es-1", KeyAlg::Es256),
        ] {
            let k = SigningKey::from_pem(pem.as_bytes(), kid).unwrap();
            assert_eq!(k.alg(), alg);
            let t = k
                .mint_claims(&Claims::new("alice", Duration::from_secs(60), ch.clone()).unwrap())
                .unwrap();
            let c = v.verify(&t).unwrap();
            assert_eq!((c.sub.as_str(), &c.channels), ("alice", &ch));
            // Expired.
            let old = Claims {
                sub: "alice".into(),
                exp: now_secs() - 3600,
                ..Claims::default()
            };
            assert_eq!(
                v.verify(&k.mint_claims(&old).unwrap()),
                Err(TokenError::Expired)
            );
        }
        // HS256 still works while allowed, and is refused when not.
        let t = hs.mint("bob", Duration::from_secs(60)).unwrap();
        assert_eq!(v.verify(&t).unwrap().sub, "bob");
        let strict = Verifier { secret: None, ..v };
        assert!(matches!(strict.verify(&t), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn unknown_kids_retired_keys_and_forgeries_are_refused() {
        let (pem1, jwk1) = generate_key(KeyAlg::Ed25519, "k1").unwrap();
        let (pem2, jwk2) = generate_key(KeyAlg::Ed25519, "k2").unwrap();
        let (es_pem, _) = generate_key(KeyAlg::Es256, "k1").unwrap();
        let before = PublicKeys::from_jwks(&jwks(&[&jwk1])).unwrap();
        let after = PublicKeys::from_jwks(&jwks(&[&jwk2])).unwrap();
        let verifier = |keys| Verifier {
            secret: None,
            public: keys,
            leeway: Duration::ZERO,
        };
        let k1 = SigningKey::from_pem(pem1.as_bytes(), "k1").unwrap();
        let t1 = k1
            .mint_claims(&Claims::new("a", Duration::from_secs(60), BTreeMap::new()).unwrap())
            .unwrap();
        assert!(verifier(&before).verify(&t1).is_ok());
        // k1 retired (rotated to k2): its tokens are refused.
        let e = verifier(&after).verify(&t1).unwrap_err();
        assert!(
            matches!(&e, TokenError::Invalid(m) if m.contains("unknown key id")),
            "{e}"
        );
        // A kid nobody published.
        let k9 = SigningKey::from_pem(pem2.as_bytes(), "k9").unwrap();
        let t9 = k9
            .mint_claims(&Claims::new("a", Duration::from_secs(60), BTreeMap::new()).unwrap())
            .unwrap();
        assert!(verifier(&after).verify(&t9).is_err());
        // k1's id on another Ed25519 key: a forgery.
        let forged = SigningKey::from_pem(pem2.as_bytes(), "k1").unwrap();
        let tf = forged
            .mint_claims(&Claims::new("a", Duration::from_secs(60), BTreeMap::new()).unwrap())
            .unwrap();
        assert!(verifier(&before).verify(&tf).is_err());
        // k1's id with another algorithm.
        let wrong = SigningKey::from_pem(es_pem.as_bytes(), "k1").unwrap();
        let tw = wrong
            .mint_claims(&Claims::new("a", Duration::from_secs(60), BTreeMap::new()).unwrap())
            .unwrap();
        assert!(verifier(&before).verify(&tw).is_err());
        // A signed token without a kid.
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = None;
        let claims = Claims::new("a", Duration::from_secs(60), BTreeMap::new()).unwrap();
        let tn = jsonwebtoken::encode(&h, &claims, &k1.encoding).unwrap();
        assert!(verifier(&before).verify(&tn).is_err());
        // Bad key sets are refused whole.
        assert!(PublicKeys::from_jwks("{}").is_err());
        assert!(
            PublicKeys::from_jwks(&jwks(&[&jwk1, &jwk1])).is_err(),
            "a kid twice"
        );
        let mut no_kid = jwk1.clone();
        no_kid.as_object_mut().unwrap().remove("kid");
        assert!(PublicKeys::from_jwks(&jwks(&[&no_kid])).is_err());
        let rsa = serde_json::json!({"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"});
        assert!(PublicKeys::from_jwks(&jwks(&[&rsa])).is_err());
    }
}
