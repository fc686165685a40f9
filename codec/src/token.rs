//! Access tokens: JWTs signed with HS256 and a secret shared by the relay
//! and the app's backend. `docs/protocol.md` ("Tokens") lists the claims.

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
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
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
        check_name("user", user).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let now = now_secs();
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
            channels,
        };
        check_channels(&claims)?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// Signs arbitrary claims (e.g. a chosen `exp`).
    pub fn mint_claims(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// Checks signature, algorithm, expiry and the user id.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            })?;
        check_name("sub", &data.claims.sub).map_err(|e| TokenError::Invalid(e.to_string()))?;
        check_channels(&data.claims)?;
        Ok(data.claims)
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
}
