//! Local stand-ins for Apple's and Google's push services (their real
//! hosts are out of reach from here), written from the providers'
//! published request rules: HTTPS over HTTP/2 on loopback, checking what
//! a real provider checks and answering as scripted.
//!
//! - APNs ("Sending notification requests to APNs", "Establishing a
//!   token-based connection to APNs"): `POST /3/device/<token>`; an ES256
//!   provider JWT in `authorization: bearer`, its `kid` the key id, `iss`
//!   the team id, `iat` within the hour; `apns-push-type: pushtotalk`,
//!   `apns-topic` ending `.voip-ptt`, `apns-priority: 10`,
//!   `apns-expiration: 0`; a JSON payload of at most 4 KB.
//! - FCM HTTP v1 ("Authorize send requests", "Send a message"): the OAuth2
//!   JWT-bearer grant at the service account's `token_uri` (an RS256
//!   assertion: `iss` the client email, the messaging scope, `aud` the
//!   token URI, at most an hour), then `POST
//!   /v1/projects/<project>/messages:send` with that access token and a
//!   message with `token`, string-valued `data`, `android.priority: HIGH`
//!   and a `ttl`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

/// What the stand-in answers to the next push (default: accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Ok,
    /// APNs 410 `Unregistered`; FCM 404 `UNREGISTERED`.
    Gone,
    /// 429, with `Retry-After` in seconds.
    TooMany(u64),
    /// 500.
    Internal,
}

/// One push request as it arrived, with what the checks found.
#[derive(Debug, Clone)]
pub struct Seen {
    pub token: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// Every rule the request broke (empty: a good request).
    pub broken: Vec<String>,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    seen: Vec<Seen>,
    /// FCM: access tokens handed out.
    issued: Vec<String>,
    /// FCM: token requests that broke a rule.
    bad_grants: Vec<String>,
}

pub struct Standin {
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// The stand-in's certificate (PEM): the relay's `push_ca`.
    pub ca: std::path::PathBuf,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

pub const TEAM: &str = "TEAM123456";
pub const KEY_ID: &str = "KEY1234567";
pub const TOPIC: &str = "com.example.ptt.voip-ptt";

/// A new APNs provider key, written to `dir` as Apple hands it out
/// (`AuthKey_<key id>.p8`), and the rules a stand-in checks its tokens by.
pub fn apns_key(dir: &std::path::Path) -> (Rules, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let p8 = dir.join(format!("AuthKey_{KEY_ID}.p8"));
    std::fs::write(&p8, key.serialize_pem()).unwrap();
    let rules = Rules::Apns {
        public_key_pem: key.public_key_pem(),
        key_id: KEY_ID.into(),
        team_id: TEAM.into(),
    };
    (rules, p8)
}

/// The settings that make a relay push to APNs through `standin`, signing
/// with the key at `p8` (from [`apns_key`]).
pub fn apns_settings(c: &mut relay::Config, standin: &Standin, p8: &std::path::Path) {
    c.push_ca = standin.ca.clone();
    c.apns_key = p8.to_owned();
    c.apns_key_id = KEY_ID.into();
    c.apns_team_id = TEAM.into();
    c.apns_url = standin.url.clone();
}

/// What the stand-in checks requests against.
#[derive(Clone)]
pub enum Rules {
    Apns {
        public_key_pem: String,
        key_id: String,
        team_id: String,
    },
    Fcm {
        public_key_pem: String,
        client_email: String,
        project: String,
    },
}

impl Standin {
    pub async fn start(rules: Rules) -> Standin {
        let dir = tempfile::tempdir().unwrap();
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .unwrap();
        let ca = dir.path().join("standin.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (st, u) = (state.clone(), url.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, st, rules, u) =
                    (acceptor.clone(), st.clone(), rules.clone(), u.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, rules, u) = (st.clone(), rules.clone(), u.clone());
                        async move { Ok::<_, Infallible>(handle(req, &st, &rules, &u).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Standin {
            url,
            ca,
            state,
            task,
            _dir: dir,
        }
    }

    /// The next pushes are answered so, in order (then accepted).
    pub fn script(&self, replies: &[Reply]) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// Push requests so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// FCM token requests that broke a rule.
    pub fn bad_grants(&self) -> Vec<String> {
        self.state.lock().unwrap().bad_grants.clone()
    }

    /// Waits (at most `secs`) until `n` push requests have arrived.
    pub async fn until(&self, n: usize, secs: u64) -> Vec<Seen> {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} push requests, {n} expected: {seen:?}",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reply(status: u16, headers: &[(&str, String)], body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    r.header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn handle(
    req: Request<Incoming>,
    st: &Mutex<State>,
    rules: &Rules,
    url: &str,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let mut broken = Vec::new();
    if parts.method != hyper::Method::POST {
        broken.push(format!("method {}", parts.method));
    }
    if parts.version != hyper::Version::HTTP_2 {
        broken.push(format!("not HTTP/2: {:?}", parts.version));
    }
    let token = match rules {
        Rules::Apns {
            public_key_pem,
            key_id,
            team_id,
        } => {
            let Some(token) = path.strip_prefix("/3/device/") else {
                return reply(404, &[], json!({ "reason": "BadPath" }));
            };
            check_apns(&header, &body, public_key_pem, key_id, team_id, &mut broken);
            token.to_owned()
        }
        Rules::Fcm {
            public_key_pem,
            client_email,
            project,
        } => {
            if path == "/token" {
                return grant(st, &body, public_key_pem, client_email, url);
            }
            if path != format!("/v1/projects/{project}/messages:send") {
                return reply(404, &[], json!({ "error": { "status": "NOT_FOUND" } }));
            }
            let auth = header("authorization");
            let issued = st.lock().unwrap().issued.clone();
            if !auth
                .strip_prefix("Bearer ")
                .is_some_and(|t| issued.iter().any(|i| i == t))
            {
                broken.push(format!(
                    "authorization {auth:?}: not an access token we issued"
                ));
            }
            check_fcm(&body, &mut broken);
            serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["message"]["token"].as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    };
    let json_body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let next = {
        let mut s = st.lock().unwrap();
        s.seen.push(Seen {
            at: std::time::Instant::now(),
            token: token.clone(),
            headers: headers.clone(),
            body: json_body,
            broken: broken.clone(),
        });
        s.script.pop_front().unwrap_or(Reply::Ok)
    };
    let apns = matches!(rules, Rules::Apns { .. });
    if !broken.is_empty() {
        return reply(
            400,
            &[],
            json!({ "reason": "BadRequest", "error": { "status": "INVALID_ARGUMENT" } }),
        );
    }
    match (next, apns) {
        (Reply::Ok, true) => reply(200, &[("apns-id", "1".into())], json!({})),
        (Reply::Ok, false) => reply(200, &[], json!({ "name": "projects/p/messages/1" })),
        (Reply::Gone, true) => reply(
            410,
            &[],
            json!({ "reason": "Unregistered", "timestamp": 1 }),
        ),
        (Reply::Gone, false) => reply(
            404,
            &[],
            json!({ "error": { "code": 404, "status": "NOT_FOUND", "details": [
                { "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED" }
            ] } }),
        ),
        (Reply::TooMany(s), true) => reply(
            429,
            &[("retry-after", s.to_string())],
            json!({ "reason": "TooManyRequests" }),
        ),
        (Reply::TooMany(s), false) => reply(
            429,
            &[("retry-after", s.to_string())],
            json!({ "error": { "code": 429, "status": "RESOURCE_EXHAUSTED" } }),
        ),
        (Reply::Internal, true) => reply(500, &[], json!({ "reason": "InternalServerError" })),
        (Reply::Internal, false) => reply(
            500,
            &[],
            json!({ "error": { "code": 500, "status": "INTERNAL" } }),
        ),
    }
}

fn check_apns(
    header: &dyn Fn(&str) -> String,
    body: &[u8],
    public_key_pem: &str,
    key_id: &str,
    team_id: &str,
    broken: &mut Vec<String>,
) {
    let auth = header("authorization");
    match auth.strip_prefix("bearer ") {
        None => broken.push(format!("authorization {auth:?}")),
        Some(jwt) => {
            let h = jsonwebtoken::decode_header(jwt);
            if !h
                .as_ref()
                .is_ok_and(|h| h.alg == Algorithm::ES256 && h.kid.as_deref() == Some(key_id))
            {
                broken.push(format!("provider JWT header {h:?}"));
            }
            let key = DecodingKey::from_ec_pem(public_key_pem.as_bytes()).unwrap();
            let mut v = Validation::new(Algorithm::ES256);
            v.required_spec_claims = ["iss".to_owned()].into();
            v.validate_exp = false;
            v.set_issuer(&[team_id]);
            match jsonwebtoken::decode::<Value>(jwt, &key, &v) {
                Ok(t) => {
                    let iat = t.claims["iat"].as_u64().unwrap_or(0);
                    let now = relay::testing::now_ms() / 1000;
                    if iat + 3600 < now || iat > now + 60 {
                        broken.push(format!("provider JWT iat {iat}, now {now}"));
                    }
                }
                Err(e) => broken.push(format!("provider JWT: {e}")),
            }
        }
    }
    for (name, want) in [
        ("apns-push-type", "pushtotalk"),
        ("apns-priority", "10"),
        ("apns-expiration", "0"),
    ] {
        if header(name) != want {
            broken.push(format!("{name}: {:?}", header(name)));
        }
    }
    if !header("apns-topic").ends_with(".voip-ptt") {
        broken.push(format!("apns-topic {:?}", header("apns-topic")));
    }
    if header("apns-collapse-id").len() > 64 {
        broken.push("apns-collapse-id over 64 bytes".into());
    }
    if body.len() > 4096 {
        broken.push(format!("payload of {} bytes", body.len()));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v["activeRemoteParticipant"]["name"].is_string() => {}
        other => broken.push(format!(
            "payload without activeRemoteParticipant: {other:?}"
        )),
    }
}

fn check_fcm(body: &[u8], broken: &mut Vec<String>) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        broken.push("body is not JSON".into());
        return;
    };
    let m = &v["message"];
    if !m["token"].is_string() {
        broken.push("message.token".into());
    }
    if m["android"]["priority"] != "HIGH" {
        broken.push(format!("android.priority {}", m["android"]["priority"]));
    }
    if !m["android"]["ttl"]
        .as_str()
        .is_some_and(|t| t.ends_with('s'))
    {
        broken.push(format!("android.ttl {}", m["android"]["ttl"]));
    }
    let data_ok = m["data"]
        .as_object()
        .is_some_and(|d| !d.is_empty() && d.values().all(Value::is_string));
    if !data_ok {
        broken.push(format!("data {}", m["data"]));
    }
}

/// The OAuth2 JWT-bearer grant: checks the assertion, issues a token.
fn grant(
    st: &Mutex<State>,
    body: &[u8],
    public_key_pem: &str,
    client_email: &str,
    url: &str,
) -> Response<Full<Bytes>> {
    let form = String::from_utf8_lossy(body);
    let field = |k: &str| {
        form.split('&')
            .find_map(|p| p.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let mut broken = Vec::new();
    if field("grant_type") != "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" {
        broken.push(format!("grant_type {}", field("grant_type")));
    }
    let key = DecodingKey::from_rsa_pem(public_key_pem.as_bytes()).unwrap();
    let mut v = Validation::new(Algorithm::RS256);
    v.set_issuer(&[client_email]);
    v.set_audience(&[format!("{url}/token")]);
    match jsonwebtoken::decode::<Value>(&field("assertion"), &key, &v) {
        Ok(t) => {
            let c = &t.claims;
            if c["scope"] != "https://www.googleapis.com/auth/firebase.messaging" {
                broken.push(format!("scope {}", c["scope"]));
            }
            let (iat, exp) = (
                c["iat"].as_u64().unwrap_or(0),
                c["exp"].as_u64().unwrap_or(0),
            );
            if exp <= iat || exp - iat > 3600 {
                broken.push(format!("iat {iat} exp {exp}"));
            }
        }
        Err(e) => broken.push(format!("assertion: {e}")),
    }
    let mut s = st.lock().unwrap();
    if !broken.is_empty() {
        s.bad_grants.extend(broken);
        return reply(400, &[], json!({ "error": "invalid_grant" }));
    }
    let token = format!("access-{}", s.issued.len() + 1);
    s.issued.push(token.clone());
    reply(
        200,
        &[],
        json!({ "access_token": token, "expires_in": 3599, "token_type": "Bearer" }),
    )
}
