//! The `ptt-relay` command line (the binary is this and its allocator).
//! `ptt-relay serve` runs the relay; `ptt-relay token` mints access tokens;
//! `ptt-relay keygen` makes a key pair for public-key tokens.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{LogFormat, Settings};
use crate::server::Relay;
use anyhow::Context;
use clap::{Parser, Subcommand};

/// The web app on the default web listener (`web`).
const DEFAULT_WEB_URL: &str = "http://127.0.0.1:8080/";

#[derive(Parser)]
#[command(
    name = "ptt-relay",
    version,
    about = "Push-to-talk voice relay over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay (embedded defaults: the durable disk store, a
    /// self-signed certificate and a token secret, all in the data dir).
    Serve(Box<Settings>),
    /// Print a token (JWT) for a user: HS256 with the data dir's token
    /// secret, or EdDSA / ES256 with `--private-key` and `--kid`.
    Token {
        /// Data dir holding token.secret.
        #[arg(long, env = "PTT_DATA_DIR", default_value = "ptt-data")]
        data_dir: PathBuf,
        /// Secret file, when not DATA_DIR/token.secret.
        #[arg(long)]
        secret: Option<PathBuf>,
        /// User id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// How long the token is valid.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A talk channel the user belongs to: NAME (talk) or
        /// NAME:listen|talk|priority. Repeatable.
        #[arg(long = "channel", value_parser = codec::token::parse_grant)]
        channels: Vec<(String, codec::token::Right)>,
        /// Sign with this private key (PKCS#8 PEM, Ed25519 or P-256, as
        /// `ptt-relay keygen` writes) instead of the HS256 secret.
        #[arg(long, requires = "kid")]
        private_key: Option<PathBuf>,
        /// The key id the relay knows the public key by (its JWKS `kid`).
        #[arg(long, requires = "private_key")]
        kid: Option<String>,
        /// Print a sign-in link to the web app instead of the bare token:
        /// the app's URL (default the relay's default web listener) with
        /// the token in the fragment (`#token=...`), which browsers never
        /// send to the web listener.
        #[arg(long, num_args = 0..=1, default_missing_value = DEFAULT_WEB_URL, value_name = "APP_URL")]
        link: Option<String>,
    },
    /// Make a key pair for public-key tokens: the private key (PKCS#8 PEM,
    /// for the app backend that mints tokens) and its public key added to
    /// a JWKS file (for the relay's `token_keys`).
    Keygen {
        /// ed25519 (EdDSA tokens) or es256 (P-256).
        #[arg(long, default_value = "ed25519")]
        alg: codec::token::KeyAlg,
        /// Key id: names the key in the JWKS and in tokens' `kid`.
        #[arg(long)]
        kid: String,
        /// Where to write the private key (must not exist).
        #[arg(long)]
        private_key: PathBuf,
        /// JWKS file the public key is added to (created if missing).
        #[arg(long)]
        jwks: PathBuf,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,quinn=warn,quinn_proto=warn,rustls=warn".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// Runs `ptt-relay` with the process's arguments.
#[tokio::main]
pub async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve(settings) => {
            let config = (*settings).resolve()?;
            init_logs(config.log_format);
            let relay = Relay::start(config).await?;
            print_banner(&relay);
            // Under systemd (Type=notify): ready now, stopping on a signal.
            // Without NOTIFY_SOCKET these do nothing. The handlers go in
            // first: a SIGTERM right after READY=1 must start the drain.
            let signals = crate::signal::Signals::install();
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            relay
                .run_until(async {
                    signals.recv().await;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                })
                .await;
            Ok(())
        }
        Cmd::Token {
            data_dir,
            secret,
            user,
            ttl,
            channels,
            private_key,
            kid,
            link,
        } => {
            let channels = channels.into_iter().collect();
            let print = |token: String| match &link {
                Some(url) => println!("{}", sign_in_link(url, &token)),
                None => println!("{token}"),
            };
            if let (Some(pk), Some(kid)) = (private_key, kid) {
                let pem =
                    std::fs::read(&pk).with_context(|| format!("reading {}", pk.display()))?;
                let key = codec::token::SigningKey::from_pem(&pem, &kid)
                    .with_context(|| format!("{}", pk.display()))?;
                let claims = codec::token::Claims::new(&user, ttl, channels)?;
                print(key.mint_claims(&claims)?);
                return Ok(());
            }
            let path = secret.unwrap_or_else(|| data_dir.join("token.secret"));
            let key =
                codec::token::TokenKey::from_file(&path, Duration::ZERO).with_context(|| {
                    format!(
                        "reading {} (start `ptt-relay serve` once to create it)",
                        path.display()
                    )
                })?;
            print(key.mint_with_channels(&user, ttl, channels)?);
            Ok(())
        }
        Cmd::Keygen {
            alg,
            kid,
            private_key,
            jwks,
        } => keygen(alg, &kid, &private_key, &jwks),
    }
}

/// `ptt-relay keygen`: a new key pair, the private key written (mode 0600,
/// never over an existing file), the public key added to the JWKS.
fn keygen(
    alg: codec::token::KeyAlg,
    kid: &str,
    private_key: &std::path::Path,
    jwks: &std::path::Path,
) -> anyhow::Result<()> {
    let mut set: serde_json::Value = match std::fs::read_to_string(jwks) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", jwks.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({ "keys": [] }),
        Err(e) => return Err(e).with_context(|| format!("reading {}", jwks.display())),
    };
    let keys = set
        .get_mut("keys")
        .and_then(|k| k.as_array_mut())
        .with_context(|| format!("{} has no \"keys\" array", jwks.display()))?;
    anyhow::ensure!(
        !keys.iter().any(|k| k["kid"] == kid),
        "{} already has a key `{kid}`",
        jwks.display()
    );
    let (pem, jwk) = codec::token::generate_key(alg, kid)?;
    crate::tls::write_private(private_key, pem.as_bytes())
        .with_context(|| format!("writing {}", private_key.display()))?;
    keys.push(jwk);
    // Written whole, then renamed: a relay reloading it never reads half.
    let tmp = jwks.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&set)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, jwks).with_context(|| format!("writing {}", jwks.display()))?;
    eprintln!(
        "wrote {} (private: for the token minter) and added `{kid}` to {} (public: the relay's token_keys)",
        private_key.display(),
        jwks.display()
    );
    Ok(())
}

/// The web app's URL with `token` in its fragment (a JWT is URL-safe:
/// base64url and dots).
fn sign_in_link(app: &str, token: &str) -> String {
    let base = app.split('#').next().unwrap_or(app);
    format!("{base}#token={token}")
}

fn print_banner(relay: &Relay) {
    let quic = relay.quic_addr();
    let f = relay.files();
    let dir = f
        .secret
        .parent()
        .map_or_else(|| ".".into(), |p| p.display().to_string());
    let host = if quic.ip().is_unspecified() {
        format!("127.0.0.1:{}", quic.port())
    } else {
        quic.to_string()
    };
    eprintln!(
        "ptt-relay listening on QUIC {quic} (admin http://{admin}/healthz, /readyz, /metrics)\n\
         \x20 certificate {cert}, token secret {secret}\n\
         \x20 mint a token:  ptt-relay token --data-dir {dir} --user alice\n\
         \x20 receive:       client-sim listen --relay {host} --ca {cert} --token \"$(ptt-relay token --data-dir {dir} --user bob)\" --out inbox\n\
         \x20 send:          client-sim send --relay {host} --ca {cert} --token \"$(ptt-relay token --data-dir {dir} --user alice)\" --to bob --opus clip.opus",
        admin = relay.admin_addr(),
        cert = f.cert.display(),
        secret = f.secret.display(),
    );
    if let Some(web) = relay.web_addr() {
        let url = if web.ip().is_unspecified() || web.ip().is_loopback() {
            format!("http://127.0.0.1:{}/", web.port())
        } else {
            format!("http://{web}/")
        };
        let link = if url == DEFAULT_WEB_URL {
            "--link".to_string()
        } else {
            format!("--link {url}")
        };
        eprintln!(
            "  web app:       {url} (WebTransport on QUIC {quic}; sign in with a token, or a link: ptt-relay token --data-dir {dir} --user carol {link})"
        );
    }
}
