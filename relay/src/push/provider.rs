//! The push providers over HTTPS/HTTP2: APNs (token-based: an ES256
//! provider JWT, `apns-push-type: pushtotalk`) and FCM HTTP v1 (an OAuth2
//! access token from the service account's RS256 assertion). One pooled
//! HTTP/2 connection per provider host carries every request in flight.
//! What each answer means is decided in [`super::plan`].

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use codec::wire::Target;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;

use super::plan::{Answer, Push, apns_answer, fcm_answer, retry_after};

/// Why a provider could not be set up or reached.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A push setting is wrong (a key that does not read, a bad URL): fix
    /// it; the relay does not start.
    #[error("push setting {what}: {why}")]
    Config { what: &'static str, why: String },
    /// A request did not get an answer (connection, TLS): retried like a
    /// provider's "try again later".
    #[error("push request to {host}: {why}")]
    Transport { host: String, why: String },
}

fn config(what: &'static str) -> impl FnOnce(String) -> PushError {
    move |why| PushError::Config { what, why }
}

pub type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS client speaking HTTP/2 only, trusting the system's roots and
/// the certificates in `push_ca` (if set).
pub fn https(push_ca: &Path) -> Result<Https, PushError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if !push_ca.as_os_str().is_empty() {
        let pem = std::fs::read(push_ca).map_err(|e| config("push_ca")(e.to_string()))?;
        let mut n = 0;
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let c: rustls_pki_types::CertificateDer<'static> =
                c.map_err(|e| config("push_ca")(e.to_string()))?;
            roots.add(c).map_err(|e| config("push_ca")(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(config("push_ca")("holds no certificate".into()));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| config("push TLS")(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(Duration::from_secs(600))
        .build(connector))
}

/// One answer: status, the header named `want` (if any), body.
struct Reply {
    status: u16,
    retry_after: Option<Duration>,
    body: Bytes,
}

async fn post(
    http: &Https,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, PushError> {
    let uri: hyper::Uri =
        url.parse()
            .map_err(|e: hyper::http::uri::InvalidUri| PushError::Transport {
                host: url.to_owned(),
                why: e.to_string(),
            })?;
    let host = uri.host().unwrap_or_default().to_owned();
    let transport = |why: String| PushError::Transport {
        host: host.clone(),
        why,
    };
    let mut req = hyper::Request::post(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| transport(e.to_string()))?;
    let res = http
        .request(req)
        .await
        .map_err(|e| transport(e.to_string()))?;
    let status = res.status().as_u16();
    let retry_after = retry_after(
        res.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
    );
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| transport(e.to_string()))?
        .to_bytes();
    Ok(Reply {
        status,
        retry_after,
        body,
    })
}

/// A signed token reused until it is `refresh` old.
struct Cached {
    token: String,
    made: Instant,
    valid: Duration,
}

/// APNs over token-based authentication.
pub struct Apns {
    url: String,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    jwt: Mutex<Option<Cached>>,
}

/// A provider JWT is refreshed after this long: Apple accepts one for an
/// hour and refuses new ones more often than every 20 minutes.
const APNS_JWT_REFRESH: Duration = Duration::from_secs(40 * 60);

impl Apns {
    /// From the settings; `None` when APNs is not configured.
    pub fn from_config(cfg: &crate::Config) -> Result<Option<Apns>, PushError> {
        if cfg.apns_key.as_os_str().is_empty() {
            return Ok(None);
        }
        let pem = std::fs::read(&cfg.apns_key)
            .map_err(|e| config("apns_key")(format!("{}: {e}", cfg.apns_key.display())))?;
        let key = EncodingKey::from_ec_pem(&pem)
            .map_err(|e| config("apns_key")(format!("not an ES256 key (.p8): {e}")))?;
        Ok(Some(Apns {
            url: cfg.apns_url.trim_end_matches('/').to_owned(),
            key,
            key_id: cfg.apns_key_id.clone(),
            team_id: cfg.apns_team_id.clone(),
            jwt: Mutex::new(None),
        }))
    }

    /// The provider JWT: `kid` = key id, `iss` = team id, `iat` = now.
    fn bearer(&self, fresh: bool) -> Result<String, PushError> {
        let mut g = self
            .jwt
            .lock()
            .map_err(|_| config("apns_key")("poisoned".to_owned()))?;
        if let Some(c) = g.as_ref()
            && !fresh
            && c.made.elapsed() < c.valid
        {
            return Ok(c.token.clone());
        }
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            iat: u64,
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat: crate::now_ms() / 1000,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| config("apns_key")(e.to_string()))?;
        *g = Some(Cached {
            token: token.clone(),
            made: Instant::now(),
            valid: APNS_JWT_REFRESH,
        });
        Ok(token)
    }

    /// Sends one push; `fresh` signs a new provider JWT first.
    pub async fn send(&self, http: &Https, p: &Push, fresh: bool) -> Result<Answer, PushError> {
        let bearer = self.bearer(fresh)?;
        let auth = format!("bearer {bearer}");
        let mut headers = vec![
            ("authorization", auth.as_str()),
            ("apns-push-type", "pushtotalk"),
            ("apns-topic", p.device.topic.as_str()),
            ("apns-priority", "10"),
            ("apns-expiration", "0"),
        ];
        if let Some(c) = &p.collapse {
            headers.push(("apns-collapse-id", c.as_str()));
        }
        let url = format!("{}/3/device/{}", self.url, p.device.token);
        let reply = post(http, &url, &headers, Bytes::from(apns_payload(p))).await?;
        #[derive(Deserialize)]
        struct Reason {
            reason: String,
        }
        let reason = serde_json::from_slice::<Reason>(&reply.body)
            .map(|r| r.reason)
            .unwrap_or_default();
        Ok(apns_answer(reply.status, &reason, reply.retry_after))
    }
}

/// The PushToTalk payload: who talks (`activeRemoteParticipant`, the
/// name the system shows) and to whom, with the clip's id.
pub fn apns_payload(p: &Push) -> Vec<u8> {
    let target = match &p.target {
        Target::User(u) => serde_json::json!({ "user": u }),
        Target::Channel(c) => serde_json::json!({ "channel": c }),
    };
    let v = serde_json::json!({
        "aps": {},
        "activeRemoteParticipant": { "name": &*p.sender },
        "ptt": {
            "clip_id": p.clip.to_hex(),
            "sender": &*p.sender,
            "target": target,
        }
    });
    // Names are at most 128 bytes each: far below the 4 KB limit.
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The parts of a Firebase service-account file the relay uses.
#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: String,
    token_uri: String,
}

/// FCM HTTP v1.
pub struct Fcm {
    url: String,
    project_id: String,
    client_email: String,
    key: EncodingKey,
    key_id: String,
    token_uri: String,
    access: tokio::sync::Mutex<Option<Cached>>,
}

/// The OAuth2 scope of FCM sends.
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

impl Fcm {
    /// From the settings; `None` when FCM is not configured.
    pub fn from_config(cfg: &crate::Config) -> Result<Option<Fcm>, PushError> {
        if cfg.fcm_credentials.as_os_str().is_empty() {
            return Ok(None);
        }
        let what = "fcm_credentials";
        let path = cfg.fcm_credentials.display();
        let raw = std::fs::read(&cfg.fcm_credentials)
            .map_err(|e| config(what)(format!("{path}: {e}")))?;
        let sa: ServiceAccount = serde_json::from_slice(&raw)
            .map_err(|e| config(what)(format!("{path}: not a service-account JSON file: {e}")))?;
        let key = EncodingKey::from_rsa_pem(sa.private_key.as_bytes())
            .map_err(|e| config(what)(format!("{path}: private_key is not an RSA key: {e}")))?;
        Ok(Some(Fcm {
            url: cfg.fcm_url.trim_end_matches('/').to_owned(),
            project_id: sa.project_id,
            client_email: sa.client_email,
            key,
            key_id: sa.private_key_id,
            token_uri: sa.token_uri,
            access: tokio::sync::Mutex::new(None),
        }))
    }

    /// An access token, cached until a minute before it expires; `fresh`
    /// gets a new one (the last was refused). `Err` carries what the token
    /// endpoint's refusal means for the push.
    async fn access_token(
        &self,
        http: &Https,
        fresh: bool,
    ) -> Result<Result<String, Answer>, PushError> {
        let mut g = self.access.lock().await;
        if let Some(c) = g.as_ref()
            && !fresh
            && c.made.elapsed() < c.valid
        {
            return Ok(Ok(c.token.clone()));
        }
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            scope: &'a str,
            aud: &'a str,
            iat: u64,
            exp: u64,
        }
        let now = crate::now_ms() / 1000;
        let mut header = Header::new(Algorithm::RS256);
        if !self.key_id.is_empty() {
            header.kid = Some(self.key_id.clone());
        }
        let claims = Claims {
            iss: &self.client_email,
            scope: FCM_SCOPE,
            aud: &self.token_uri,
            iat: now,
            exp: now + 3600,
        };
        let assertion = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| config("fcm_credentials")(e.to_string()))?;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let reply = post(
            http,
            &self.token_uri,
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from(form),
        )
        .await?;
        if reply.status != 200 {
            return Ok(Err(match reply.status {
                429 | 500 | 503 => Answer::Retry {
                    after: reply.retry_after,
                },
                s => Answer::Failed(format!(
                    "OAuth2 token {s}: {}",
                    String::from_utf8_lossy(&reply.body)
                )),
            }));
        }
        #[derive(Deserialize)]
        struct Token {
            access_token: String,
            expires_in: u64,
        }
        let t: Token = serde_json::from_slice(&reply.body).map_err(|e| PushError::Transport {
            host: self.token_uri.clone(),
            why: format!("OAuth2 answer: {e}"),
        })?;
        *g = Some(Cached {
            token: t.access_token.clone(),
            made: Instant::now(),
            valid: Duration::from_secs(t.expires_in.saturating_sub(60)),
        });
        Ok(Ok(t.access_token))
    }

    /// Sends one push; `fresh` gets a new access token first.
    pub async fn send(
        &self,
        http: &Https,
        p: &Push,
        fresh: bool,
        ttl: Duration,
    ) -> Result<Answer, PushError> {
        let token = match self.access_token(http, fresh).await? {
            Ok(t) => t,
            Err(answer) => return Ok(answer),
        };
        let auth = format!("Bearer {token}");
        let url = format!("{}/v1/projects/{}/messages:send", self.url, self.project_id);
        let reply = post(
            http,
            &url,
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            Bytes::from(fcm_body(p, ttl)),
        )
        .await?;
        Ok(fcm_answer(
            reply.status,
            &fcm_error_code(&reply.body),
            reply.retry_after,
        ))
    }
}

/// A high-priority data message: the app is woken with the clip's id,
/// sender and target (data values are strings).
pub fn fcm_body(p: &Push, ttl: Duration) -> Vec<u8> {
    let (kind, name) = match &p.target {
        Target::User(u) => ("user", u.as_str()),
        Target::Channel(c) => ("channel", c.as_str()),
    };
    let mut android = serde_json::json!({
        "priority": "HIGH",
        "ttl": format!("{}s", ttl.as_secs().max(1)),
    });
    if let Some(c) = &p.collapse {
        android["collapse_key"] = serde_json::Value::from(c.as_str());
    }
    let v = serde_json::json!({
        "message": {
            "token": p.device.token,
            "data": {
                "type": "ptt.clip",
                "clip_id": p.clip.to_hex(),
                "sender": &*p.sender,
                "target_kind": kind,
                "target": name,
            },
            "android": android,
        }
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The FCM error code of an error answer (`details[].errorCode`, else the
/// `status`).
fn fcm_error_code(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let e = &v["error"];
    e["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| d["errorCode"].as_str())
        .or_else(|| e["status"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::book::Device;
    use codec::wire::{ClipId, PushProvider};

    /// Longest APNs payload (bytes) for this push type.
    const APNS_MAX_PAYLOAD: usize = 4096;

    fn push(target: Target) -> Push {
        Push {
            clip: ClipId([7; 16]),
            sender: "alice".into(),
            target,
            user: "bob".into(),
            device: Device {
                provider: PushProvider::Fcm,
                device_id: "d".into(),
                token: "tok".into(),
                topic: String::new(),
                at_ms: 0,
            },
            collapse: Some("ptt-ch-1".into()),
            started_ms: 0,
        }
    }

    #[test]
    fn payloads_name_sender_and_target() {
        let p = push(Target::Channel("ops".into()));
        let a: serde_json::Value = serde_json::from_slice(&apns_payload(&p)).unwrap();
        assert_eq!(a["activeRemoteParticipant"]["name"], "alice");
        assert_eq!(a["ptt"]["target"]["channel"], "ops");
        assert!(apns_payload(&p).len() <= APNS_MAX_PAYLOAD);
        let f: serde_json::Value =
            serde_json::from_slice(&fcm_body(&p, Duration::from_secs(30))).unwrap();
        let m = &f["message"];
        assert_eq!(m["token"], "tok");
        assert_eq!(m["android"]["priority"], "HIGH");
        assert_eq!(m["android"]["ttl"], "30s");
        assert_eq!(m["android"]["collapse_key"], "ptt-ch-1");
        assert_eq!(m["data"]["target_kind"], "channel");
        assert!(
            m["data"]
                .as_object()
                .unwrap()
                .values()
                .all(|v| v.is_string())
        );
    }

    #[test]
    fn fcm_error_codes_come_from_details_or_status() {
        let unregistered = br#"{"error":{"code":404,"status":"NOT_FOUND","details":[
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert_eq!(fcm_error_code(unregistered), "UNREGISTERED");
        assert_eq!(
            fcm_error_code(br#"{"error":{"code":503,"status":"UNAVAILABLE"}}"#),
            "UNAVAILABLE"
        );
        assert_eq!(fcm_error_code(b"not json"), "");
    }
}
