//! The web listener (`web`, default 127.0.0.1:8080): the browser app's
//! static files, embedded in the binary (`web/` in the repository), and
//! `/config.json`, which tells the page where the relay's WebTransport
//! endpoint is and, for the self-signed development certificate, the
//! hash to pin (`serverCertificateHashes`). Plain HTTP: browsers treat
//! loopback as a secure context; anywhere else put it behind HTTPS
//! (docs/operations.md, "The web app").

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::warn;

use crate::tls::WebCerts;

/// One embedded file: name, content type, bytes.
type Asset = (&'static str, &'static str, &'static [u8]);

macro_rules! assets {
    ($($name:literal => $mime:literal),* $(,)?) => {
        &[$(($name, $mime, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../web/", $name))),)*]
    };
}

/// The app: no framework, no build step.
const ASSETS: &[Asset] = assets! {
    "index.html" => "text/html; charset=utf-8",
    "style.css" => "text/css; charset=utf-8",
    "app.js" => "text/javascript; charset=utf-8",
    "ptt.js" => "text/javascript; charset=utf-8",
    "audio.js" => "text/javascript; charset=utf-8",
    "worklets.js" => "text/javascript; charset=utf-8",
    "icon.svg" => "image/svg+xml",
};

/// What the page is told.
pub struct WebInfo {
    /// The relay's UDP port (WebTransport at `https://HOST:PORT/ptt`).
    pub quic_port: u16,
    pub certs: WebCerts,
    /// The other relays' web listeners (`web_relays`).
    pub relays: Vec<String>,
}

/// `/config.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PageConfig {
    /// UDP port of the relay: the page connects to
    /// `https://<its own host>:<port><path>`.
    pub port: u16,
    pub path: String,
    /// Hex SHA-256 of the certificate to pin (empty with an operator's
    /// certificate: the browser verifies it as for any site).
    pub certificate_hashes: Vec<String>,
    /// Unix ms when the pinned certificate expires (0: none pinned).
    pub certificate_expires_ms: u64,
    /// The service's other relays, in order of preference after this one:
    /// their web listeners' addresses, where each serves its own
    /// `/config.json` (to any origin).
    #[serde(default)]
    pub relays: Vec<String>,
}

impl WebInfo {
    pub fn page_config(&self) -> PageConfig {
        let (certificate_hashes, certificate_expires_ms) = match &self.certs {
            WebCerts::Operator => (Vec::new(), 0),
            WebCerts::Ephemeral(e) => {
                let c = e.current();
                let ms = c
                    .not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                (vec![crate::tls::hex(&c.sha256)], ms)
            }
        };
        PageConfig {
            port: self.quic_port,
            path: crate::webtransport::PATH.into(),
            certificate_hashes,
            certificate_expires_ms,
            relays: self.relays.clone(),
        }
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    info: Arc<WebInfo>,
    stop: tokio_util::sync::CancellationToken,
) {
    let app = Router::new()
        .route("/", get(|| async { asset("index.html") }))
        .route("/config.json", get(config))
        .route(
            "/{file}",
            get(|Path(f): Path<String>| async move { asset(&f) }),
        )
        .with_state(info);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "web listener failed");
    }
}

async fn config(State(info): State<Arc<WebInfo>>) -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            // A page loaded from another relay of the service reads it to
            // move here (it says nothing secret).
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        axum::Json(info.page_config()),
    )
        .into_response()
}

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, body)) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::REFERRER_POLICY, "no-referrer"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use codec::ErrorCode;

    const PTT_JS: &str = include_str!("../../web/ptt.js");

    /// The hex numbers in the JavaScript line that starts with `start`.
    fn numbers_after(start: &str) -> Vec<u64> {
        let line = PTT_JS
            .lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("web/ptt.js has no `{start}`"));
        line.split(|c: char| !c.is_ascii_alphanumeric())
            .filter_map(|w| w.strip_prefix("0x"))
            .filter_map(|h| u64::from_str_radix(h, 16).ok())
            .collect()
    }

    /// The web app retries the codes every client retries
    /// (`ErrorCode::RETRYABLE`), and names every code as the protocol does.
    #[test]
    fn the_web_app_retries_and_names_the_codes_as_the_protocol_does() {
        let mut web = numbers_after("const RETRYABLE");
        web.sort_unstable();
        let mut ours: Vec<u64> = ErrorCode::RETRYABLE.iter().map(|c| c.to_u64()).collect();
        ours.sort_unstable();
        assert_eq!(web, ours, "web/ptt.js RETRYABLE against codec's list");
        for c in ErrorCode::ALL {
            let row = format!("0x{:02x}: [\"{}\"", c.to_u64(), c.name());
            assert!(PTT_JS.contains(&row), "web/ptt.js CODES lacks {row}");
        }
    }
}
