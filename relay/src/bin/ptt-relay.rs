//! `ptt-relay serve` runs the relay; `ptt-relay token` mints access tokens.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relay::config::LogFormat;
use relay::{Relay, Settings};

/// mimalloc: the relay allocates and frees small buffers on several threads
/// (tokio workers, the store's committer) at a high rate; glibc's arenas
/// made that a measurable share of its CPU (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run the relay (embedded defaults: memory store, self-signed
    /// certificate and token secret created in the data dir).
    Serve(Box<Settings>),
    /// Print a token (JWT, HS256) for a user, signed with the data dir's
    /// token secret.
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve(settings) => {
            let config = (*settings).resolve()?;
            init_logs(config.log_format);
            let relay = Relay::start(config).await?;
            print_banner(&relay);
            // Under systemd (Type=notify): ready now, stopping on a signal.
            // Without NOTIFY_SOCKET these do nothing. The handlers go in
            // first: a SIGTERM right after READY=1 must start the drain.
            let signals = relay::signal::Signals::install();
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
        } => {
            let path = secret.unwrap_or_else(|| data_dir.join("token.secret"));
            let key =
                codec::token::TokenKey::from_file(&path, Duration::ZERO).with_context(|| {
                    format!(
                        "reading {} (start `ptt-relay serve` once to create it)",
                        path.display()
                    )
                })?;
            println!(
                "{}",
                key.mint_with_channels(&user, ttl, channels.into_iter().collect())?
            );
            Ok(())
        }
    }
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
}
