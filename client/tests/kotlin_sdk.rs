//! The SDK through its generated Kotlin bindings, compiled with kotlinc
//! (the npm registry's kotlin-compiler, `scripts/kotlin.sh`) together with
//! an app (`client/kotlin/Main.kt`) and run on a JVM with JNA, against a
//! real relay on loopback that the test stops and starts again while the
//! app runs. Needs Java 17, libjna-java, npm, espeak-ng, sox and
//! opus-tools (the README's test command installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run ({e})"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builds the shared library and the Kotlin bindings, compiles them with
/// the app; returns (the directory of libptt_client.so, the classpath).
fn build(dir: &Path) -> (PathBuf, String) {
    let sdk = dir.join("sdk");
    run(
        Command::new("bash")
            .arg(repo().join("scripts/sdk.sh"))
            .arg("kotlin")
            .env("SDK_OUT", &sdk),
        "scripts/sdk.sh kotlin",
    );
    let cp = run(
        Command::new("bash")
            .arg(repo().join("scripts/kotlin.sh"))
            .arg(sdk.join("kotlin"))
            .arg(dir.join("app.jar"))
            .arg(repo().join("client/kotlin/Main.kt")),
        "scripts/kotlin.sh",
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    (
        target.join("debug"),
        cp.lines().last().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kotlin_app_talks_listens_registers_and_survives_a_relay_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (libdir, classpath) = {
        let d = d.to_owned();
        tokio::task::spawn_blocking(move || build(&d))
            .await
            .unwrap()
    };
    // Real speech: a 16 kHz microphone's WAV, and an Ogg Opus recording.
    let text = "Unit seven to base, the north gate is clear.";
    let wav = speech_wav(d, text, 16_000);
    let opus = speech(d, text);
    let relay_dir = d.join("relay");
    let mut relay = Some(start(&relay_dir, None).await);
    let r = relay.as_ref().unwrap();
    let addr = r.quic_addr();
    let key = r.token_key();
    let token = |user: &str| key.mint(user, Duration::from_secs(3600)).unwrap();
    let expired = key
        .mint_claims(&codec::token::Claims {
            sub: "carol".into(),
            exp: relay::testing::now_ms() / 1000 - 3600,
            iat: None,
            channels: Default::default(),
        })
        .unwrap();
    let mut app = Command::new("java")
        .arg(format!("-Djna.library.path={}", libdir.display()))
        .arg("-cp")
        .arg(&classpath)
        .arg("MainKt")
        .arg(addr.to_string())
        .arg(&r.files().cert)
        .arg(d.join("apps"))
        .args([token("alice"), token("bob"), expired, token("carol")])
        .arg(&wav)
        .arg(&opus)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("java (openjdk-17-jdk-headless)");
    let mut to_app = app.stdin.take().unwrap();
    let mut from_app = BufReader::new(app.stdout.take().unwrap()).lines();
    let report = loop {
        let line = tokio::task::block_in_place(|| from_app.next())
            .expect("the app ended without a report")
            .unwrap();
        match line.as_str() {
            "STOP_RELAY" => {
                relay.take().unwrap().shutdown().await;
                writeln!(to_app, "stopped").unwrap();
            }
            "START_RELAY" => {
                relay = Some(start(&relay_dir, Some(addr)).await);
                writeln!(to_app, "started").unwrap();
            }
            l if l.starts_with('{') => {
                break serde_json::from_str::<serde_json::Value>(l).unwrap();
            }
            other => panic!("unexpected line from the app: {other}"),
        }
    };
    let status = tokio::task::block_in_place(|| app.wait()).unwrap();
    assert!(status.success(), "the Kotlin app failed: {status}");
    let r = report;
    eprintln!("{r}");
    // The press was heard live while spoken, and kept whole.
    assert_eq!(r["press_live"], true, "{r}");
    let kept = r["press_kept_ms"].as_u64().unwrap();
    let heard = r["heard_ms"].as_u64().unwrap();
    assert!(kept > 1500, "{r}");
    assert!(heard.abs_diff(kept) <= 80, "{r}");
    assert!(
        r["first_audio_before_release_ms"].as_i64().unwrap() > 500,
        "{r}"
    );
    assert_eq!(
        r["clips_bob"], 2,
        "the press and the clip sent while down, once each: {r}"
    );
    assert_eq!(r["push_devices"], 1);
    assert!(r["bytes_up_today"].as_u64().unwrap() > 1000, "{r}");
    assert!(r["fresh_asked"].as_u64().unwrap() >= 1);
    if let Some(r) = relay {
        r.shutdown().await;
    }
}
