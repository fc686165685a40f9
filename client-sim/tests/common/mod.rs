//! Helpers shared by the client-sim tests: external tools, real speech,
//! a relay on loopback, and the client-sim binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use relay::{Config, Relay};
use tokio::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_client-sim");

pub fn need(tool: &str) {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is missing: install espeak-ng, sox and opus-tools (the README's test command does)"
    );
}

pub async fn run(cmd: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("command timed out")
        .expect("command did not start")
}

pub async fn tool(args: &[&str]) {
    let out = run(Command::new(args[0]).args(&args[1..])).await;
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Real speech as a WAV file: espeak-ng speaks `text` (22050 Hz mono), sox
/// applies the output options `sox_out` (rate, channels).
pub async fn speech_wav(dir: &Path, name: &str, text: &str, sox_out: &[&str]) -> PathBuf {
    let raw = dir.join(format!("{name}-espeak.wav"));
    let wav = dir.join(format!("{name}.wav"));
    tool(&["espeak-ng", "-w", raw.to_str().unwrap(), text]).await;
    // -R: repeatable dither, so every run tests the same samples.
    let mut sox = vec!["sox", "-R", raw.to_str().unwrap()];
    sox.extend_from_slice(sox_out);
    sox.push(wav.to_str().unwrap());
    tool(&sox).await;
    wav
}

/// Real speech as an Ogg Opus file made by opusenc with `enc_flags`.
pub async fn speech_opus(
    dir: &Path,
    name: &str,
    text: &str,
    sox_out: &[&str],
    enc_flags: &[&str],
) -> PathBuf {
    let wav = speech_wav(dir, name, text, sox_out).await;
    let opus = dir.join(format!("{name}.opus"));
    let mut enc = vec!["opusenc", "--quiet"];
    enc.extend_from_slice(enc_flags);
    enc.push(wav.to_str().unwrap());
    enc.push(opus.to_str().unwrap());
    tool(&enc).await;
    opus
}

/// PCM as opusdec decodes it (float, so no dither is involved).
pub async fn pcm(opus: &Path) -> Vec<u8> {
    let wav = opus.with_extension("dec.wav");
    tool(&[
        "opusdec",
        "--quiet",
        "--float",
        opus.to_str().unwrap(),
        wav.to_str().unwrap(),
    ])
    .await;
    std::fs::read(wav).unwrap()
}

pub struct Env {
    pub relay: Relay,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// A relay with `tweak` applied to the test config.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        need("espeak-ng");
        need("sox");
        need("opusenc");
        need("opusdec");
        need("opusinfo");
        // RUST_LOG=... shows the in-process relay's log (nextest shows a
        // test's output when it fails).
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::for_tests(dir.path().join("relay"));
        tweak(&mut cfg);
        let relay = Relay::start(cfg).await.unwrap();
        Self { relay, dir }
    }

    /// A token for `user`, a talker in channel `ops`.
    pub fn token(&self, user: &str) -> String {
        let ops = [("ops".to_owned(), codec::token::Right::Talk)];
        self.relay
            .token_key()
            .mint_with_channels(user, Duration::from_secs(600), ops.into_iter().collect())
            .unwrap()
    }

    /// client-sim with the connection given through the environment.
    pub fn cmd(&self, user: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env("PTT_RELAY", self.relay.quic_addr().to_string())
            .env("PTT_CA", &self.relay.files().cert)
            .env("PTT_TOKEN", self.token(user))
            .kill_on_drop(true);
        c
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}
