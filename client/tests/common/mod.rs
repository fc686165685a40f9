//! What the SDK's binding tests share: the repository, real speech from
//! espeak-ng (and opusenc), and a relay on loopback that can be started
//! again on the same address.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use relay::{Config, Relay};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `script` (an ES module, which may import from web/) with node;
/// what it printed.
pub fn run_node(script: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.mjs");
    std::fs::write(&file, script).unwrap();
    let out = Command::new("node")
        .arg(&file)
        .output()
        .expect("node (the README's test command installs it with npm)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs each tool with its arguments; all must succeed.
pub fn run_tools(steps: &[(&str, Vec<&str>)]) {
    for (tool, args) in steps {
        let st = Command::new(tool).args(args).status().unwrap_or_else(|e| {
            panic!("`{tool}` is missing ({e}): install espeak-ng, sox and opus-tools (the README's test command does)")
        });
        assert!(st.success(), "{tool} failed");
    }
}

/// Real speech (espeak-ng) as a mono 16-bit WAV at `rate`: a microphone's
/// output.
pub fn speech_wav(dir: &Path, text: &str, rate: u32) -> PathBuf {
    let raw = dir.join(format!("speech-espeak-{rate}.wav"));
    let wav = dir.join(format!("speech-{rate}.wav"));
    let rate = rate.to_string();
    run_tools(&[
        ("espeak-ng", vec!["-w", raw.to_str().unwrap(), text]),
        (
            "sox",
            vec![
                "-R",
                raw.to_str().unwrap(),
                "-r",
                &rate,
                "-c",
                "1",
                "-b",
                "16",
                wav.to_str().unwrap(),
            ],
        ),
    ]);
    wav
}

/// Real speech, encoded by opusenc (opus-tools) at voice settings.
pub fn speech(dir: &Path, text: &str) -> PathBuf {
    let wav = speech_wav(dir, text, 48_000);
    let opus = dir.join("speech.opus");
    run_tools(&[(
        "opusenc",
        vec![
            "--quiet",
            "--bitrate",
            "16",
            "--framesize",
            "20",
            wav.to_str().unwrap(),
            opus.to_str().unwrap(),
        ],
    )]);
    opus
}

pub async fn start(dir: &Path, listen: Option<SocketAddr>) -> Relay {
    let mut cfg = Config::for_tests(dir);
    if let Some(l) = listen {
        cfg.listen = l;
    }
    Relay::start(cfg).await.unwrap()
}

pub fn token(relay: &Relay, user: &str) -> String {
    relay
        .token_key()
        .mint(user, Duration::from_secs(3600))
        .unwrap()
}
