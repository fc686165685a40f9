//! The `client-sim` binary against a real relay, with real speech encoded
//! and decoded by opus-tools (an independent Ogg Opus implementation).
//! Needs `espeak-ng`, `sox` and `opus-tools` (the README's test command
//! installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use relay::{Config, Relay};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_client-sim");

fn need(tool: &str) {
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

async fn run(cmd: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("command timed out")
        .expect("command did not start")
}

async fn tool(args: &[&str]) {
    let out = run(Command::new(args[0]).args(&args[1..])).await;
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Real speech as an Ogg Opus file: espeak-ng speaks `text`, sox applies
/// the output options `sox_out` (rate, channels), opusenc encodes with
/// `enc_flags`.
async fn speech_opus(
    dir: &Path,
    name: &str,
    text: &str,
    sox_out: &[&str],
    enc_flags: &[&str],
) -> PathBuf {
    let raw = dir.join(format!("{name}-espeak.wav"));
    let wav = dir.join(format!("{name}.wav"));
    let opus = dir.join(format!("{name}.opus"));
    tool(&["espeak-ng", "-w", raw.to_str().unwrap(), text]).await;
    let mut sox = vec!["sox", raw.to_str().unwrap()];
    sox.extend_from_slice(sox_out);
    sox.push(wav.to_str().unwrap());
    tool(&sox).await;
    let mut enc = vec!["opusenc", "--quiet"];
    enc.extend_from_slice(enc_flags);
    enc.push(wav.to_str().unwrap());
    enc.push(opus.to_str().unwrap());
    tool(&enc).await;
    opus
}

/// PCM as opusdec decodes it (float, so no dither is involved).
async fn pcm(opus: &Path) -> Vec<u8> {
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

struct Env {
    relay: Relay,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new() -> Self {
        need("espeak-ng");
        need("sox");
        need("opusenc");
        need("opusdec");
        need("opusinfo");
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::start(Config::for_tests(dir.path().join("relay")))
            .await
            .unwrap();
        Self { relay, dir }
    }

    fn token(&self, user: &str) -> String {
        self.relay
            .token_key()
            .mint(user, Duration::from_secs(600))
            .unwrap()
    }

    /// client-sim with the connection given through the environment.
    fn cmd(&self, user: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env("PTT_RELAY", self.relay.quic_addr().to_string())
            .env("PTT_CA", &self.relay.files().cert)
            .env("PTT_TOKEN", self.token(user))
            .kill_on_drop(true);
        c
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opusenc_files_through_the_relay_decode_to_identical_pcm() {
    let env = Env::new().await;
    let d = env.dir.path();
    let mono = speech_opus(
        d,
        "mono",
        "Bob, this is Alice. Meet me at the north gate. Over.",
        &[],
        &[],
    )
    .await;
    let stereo = speech_opus(
        d,
        "stereo",
        "Copy that, heading north.",
        &["-r", "44100", "-c", "2"],
        &["--framesize", "60", "--bitrate", "24"],
    )
    .await;
    let inbox = d.join("inbox");
    let listener = env
        .cmd("bob")
        .args([
            "listen",
            "--out",
            inbox.to_str().unwrap(),
            "--count",
            "3",
            "--timeout",
            "60s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Live (paced in real time), upload, and a stereo 60 ms file; flags on
    // the command line this time for the relay.
    let mut ids = Vec::new();
    for (file, live) in [(&mono, true), (&mono, false), (&stereo, false)] {
        let mut c = env.cmd("alice");
        c.args(["send", "--to", "bob", "--opus", file.to_str().unwrap()])
            .args(["--relay", &env.relay.quic_addr().to_string()]);
        if live {
            c.arg("--live");
        }
        let out = run(&mut c).await;
        assert!(
            out.status.success(),
            "send failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = stdout(&out);
        assert_eq!(id.len(), 32, "prints the clip id: {id:?}");
        ids.push((id, file.clone()));
    }
    let out = tokio::time::timeout(Duration::from_secs(60), listener.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "listen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (id, sent) in ids {
        let got = inbox.join(format!("{id}.opus"));
        assert!(got.exists(), "{} missing", got.display());
        tool(&["opusinfo", got.to_str().unwrap()]).await;
        assert!(
            pcm(&got).await == pcm(&sent).await,
            "PCM of {id} differs from the sent file"
        );
        let info = run(Command::new("opusinfo").arg(&got)).await;
        let want = run(Command::new("opusinfo").arg(&sent)).await;
        let facts = |o: &Output| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| {
                    l.contains("Channels")
                        || l.contains("Original sample rate")
                        || l.contains("Pre-skip")
                        || l.contains("Playback length")
                })
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(facts(&info), facts(&want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_and_exit_codes() {
    let env = Env::new().await;
    let d = env.dir.path();
    // Not an Ogg file.
    let junk = d.join("junk.opus");
    std::fs::write(&junk, b"RIFF not really").unwrap();
    let out = run(env
        .cmd("alice")
        .args(["send", "--to", "bob", "--opus", junk.to_str().unwrap()]))
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid Ogg stream"));
    // A bad token.
    let out = run(env.cmd("bob").env("PTT_TOKEN", "garbage").args([
        "listen",
        "--out",
        d.join("x").to_str().unwrap(),
        "--count",
        "1",
    ]))
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token_invalid"));
    // Nothing arrives before the timeout.
    let out = run(env.cmd("bob").args([
        "listen",
        "--out",
        d.join("y").to_str().unwrap(),
        "--count",
        "1",
        "--timeout",
        "1s",
    ]))
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
    // A clip longer than the relay allows is refused with its code.
    let long = speech_opus(
        d,
        "long",
        &"This message is far too long for a walkie talkie. ".repeat(20),
        &[],
        &[],
    )
    .await;
    let env2_dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::for_tests(env2_dir.path());
    cfg.max_clip_duration = Duration::from_secs(5);
    let strict = Relay::start(cfg).await.unwrap();
    let token = strict
        .token_key()
        .mint("alice", Duration::from_secs(60))
        .unwrap();
    let out = run(Command::new(BIN).args([
        "send",
        "--relay",
        &strict.quic_addr().to_string(),
        "--ca",
        strict.files().cert.to_str().unwrap(),
        "--token",
        &token,
        "--to",
        "bob",
        "--opus",
        long.to_str().unwrap(),
    ]))
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("clip_too_long"), "{err}");
}
