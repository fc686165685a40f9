//! The SDK through its generated Python bindings (`scripts/sdk.sh`, not a
//! hand-written wrapper), each client a real Python process
//! (`client/python/sdk_e2e.py`), against a real relay on loopback. Needs
//! python3, espeak-ng, sox and opus-tools (the README's test command
//! installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use codec::ogg_opus::OggOpus;
use codec::wire::{ClipId, Target};
use common::*;
use ptt_client::{Client, ClientOptions, OutgoingClip, Pacing};
use relay::Relay;
use serde_json::Value;

/// Builds the shared library and the Python bindings into `out`.
fn bindings(out: &Path) -> PathBuf {
    let st = Command::new("bash")
        .arg(repo().join("scripts/sdk.sh"))
        .arg("python")
        .env("SDK_OUT", out)
        .status()
        .expect("running scripts/sdk.sh");
    assert!(st.success(), "scripts/sdk.sh python failed");
    out.join("python")
}

struct App<'a> {
    python: &'a Path,
    relay: SocketAddr,
    ca: PathBuf,
}

impl App<'_> {
    fn new<'a>(python: &'a Path, relay: &Relay) -> App<'a> {
        App {
            python,
            relay: relay.quic_addr(),
            ca: relay.files().cert.clone(),
        }
    }

    /// Runs one app process; returns its JSON report.
    fn run(&self, data: &Path, token: &str, args: &[&str]) -> Value {
        let out = self.spawn(data, token, args).wait_with_output().unwrap();
        report(out)
    }

    fn spawn(&self, data: &Path, token: &str, args: &[&str]) -> std::process::Child {
        Command::new("python3")
            .arg(repo().join("client/python/sdk_e2e.py"))
            .arg(args[0])
            .arg(self.relay.to_string())
            .arg(&self.ca)
            .arg(data)
            .arg(token)
            .args(&args[1..])
            .env("PYTHONPATH", self.python)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3")
    }
}

fn report(out: Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python app failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON report")
}

/// Where a receiving app writes the clips it keeps.
fn inbox(dir: &Path) -> PathBuf {
    let p = dir.join("inbox");
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn ids(v: &Value) -> Vec<String> {
    v["clips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speech_clip_goes_through_the_python_bindings_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let python = bindings(&dir.path().join("sdk"));
    let opus = speech(dir.path(), "Unit seven to base, the north gate is clear.");
    let relay = start(&dir.path().join("relay"), None).await;
    let app = App::new(&python, &relay);
    let inbox = inbox(dir.path());
    let bob = app.spawn(
        &dir.path().join("bob"),
        &token(&relay, "bob"),
        &["receive", "1", inbox.to_str().unwrap()],
    );
    let sent = app.run(
        &dir.path().join("alice"),
        &token(&relay, "alice"),
        &[
            "send",
            "user",
            "bob",
            opus.to_str().unwrap(),
            "--wait",
            "--usage",
        ],
    );
    assert_eq!(sent["sent"][0]["accepted"], true, "{sent}");
    assert_eq!(sent["sent"][0]["duplicate"], false, "{sent}");
    // The app can show what it cost: today's bytes up hold the clip.
    let opus_bytes: usize = OggOpus::read_file(&opus)
        .unwrap()
        .packets
        .iter()
        .map(|p| p.len())
        .sum();
    let today = &sent["usage"][0];
    let up = today["bytes_up"].as_u64().unwrap() as usize;
    assert!(up > opus_bytes && up < 2 * opus_bytes + 20_000, "{sent}");
    let start = today["day_start_ms"].as_u64().unwrap();
    assert!(start.is_multiple_of(86_400_000), "{sent}");
    let got = tokio::task::spawn_blocking(move || report(bob.wait_with_output().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        ids(&got),
        [sent["id"].as_str().unwrap()],
        "exactly once: {got}"
    );
    assert_eq!(got["clips"][0]["sender"], "alice");
    // Same Opus packets, so the same PCM at the speaker.
    let file = std::fs::read_dir(&inbox)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let (a, b) = (
        OggOpus::read_file(&opus).unwrap(),
        OggOpus::read_file(&file).unwrap(),
    );
    assert_eq!(a.packets, b.packets);
    assert_eq!(a.final_granule, b.final_granule);
    let (pa, pb) = (
        codec::audio::decode::decode(&a).unwrap(),
        codec::audio::decode::decode(&b).unwrap(),
    );
    assert!(pa.frames() > 48_000, "over a second of speech");
    assert_eq!(pa.samples, pb.samples, "same PCM as sent");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clip_recorded_offline_waits_in_the_outbox_and_arrives_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let python = bindings(&dir.path().join("sdk"));
    let opus = speech(dir.path(), "Checking in from the tunnel.");
    let relay_dir = dir.path().join("relay");
    let relay = start(&relay_dir, None).await;
    let (addr, ca) = (relay.quic_addr(), relay.files().cert.clone());
    let (alice_t, bob_t) = (token(&relay, "alice"), token(&relay, "bob"));
    relay.shutdown().await;
    let app = App {
        python: &python,
        relay: addr,
        ca,
    };
    let alice = dir.path().join("alice");
    // The relay is down: the clip is kept on disk, and the app exits.
    let first = app.run(
        &alice,
        &alice_t,
        &["send", "user", "bob", opus.to_str().unwrap()],
    );
    assert_eq!(first["pending"], 1, "{first}");
    assert_eq!(first["sent"].as_array().unwrap().len(), 0, "{first}");
    // The relay comes back (same address, same store); a new app process
    // sends what the first one left.
    let relay = start(&relay_dir, Some(addr)).await;
    let second = app.run(&alice, &alice_t, &["flush"]);
    assert_eq!(second["sent"].as_array().unwrap().len(), 1, "{second}");
    assert_eq!(second["sent"][0]["id"], first["id"]);
    assert_eq!(second["sent"][0]["accepted"], true);
    let inbox = inbox(dir.path());
    let got = app.run(
        &dir.path().join("bob"),
        &bob_t,
        &["receive", "1", inbox.to_str().unwrap()],
    );
    assert_eq!(ids(&got), [first["id"].as_str().unwrap()], "once: {got}");
    // Bob starts again: the clip was acked, and his inbox remembers it.
    let again = app.run(
        &dir.path().join("bob"),
        &bob_t,
        &["receive", "0", "/nonexistent"],
    );
    assert_eq!(ids(&again).len(), 0, "{again}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clips_stored_while_offline_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let python = bindings(&dir.path().join("sdk"));
    let opus = speech(dir.path(), "One two three.");
    let file = OggOpus::read_file(&opus).unwrap();
    let relay = start(&dir.path().join("relay"), None).await;
    let ep = ptt_client::net::endpoint(relay.quic_addr(), &relay.files().cert).unwrap();
    let (alice, _events) = Client::connect(
        &ep,
        relay.quic_addr(),
        "localhost",
        &token(&relay, "alice"),
        ClientOptions::default(),
    )
    .await
    .unwrap();
    // Bob is offline: clips of different lengths, stored in this order.
    let mut sent: Vec<ClipId> = Vec::new();
    for n in 0..8usize {
        let mut clip = OutgoingClip::from_ogg(&file, Target::User("bob".into()));
        let keep = 5 + (n * 37) % file.packets.len().max(6);
        clip.packets.truncate(keep.min(file.packets.len()));
        clip.final_granule = (clip.packets.len() as u64) * 960;
        alice.send_clip(&clip, Pacing::Upload).await.unwrap();
        sent.push(clip.id);
    }
    let app = App::new(&python, &relay);
    let inbox = inbox(dir.path());
    let got = app.run(
        &dir.path().join("bob"),
        &token(&relay, "bob"),
        &["receive", "8", inbox.to_str().unwrap()],
    );
    let want: Vec<String> = sent.iter().map(ToString::to_string).collect();
    assert_eq!(ids(&got), want, "acceptance order");
    relay.shutdown().await;
}

/// A Python app presses, speaks a 16 kHz microphone's speech in real time
/// (moving to a new UDP socket halfway, as a phone changing networks
/// does), and releases; another Python app hears it decoded while it is
/// spoken, then keeps the whole clip, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_press_is_heard_while_spoken_across_a_network_change() {
    let dir = tempfile::tempdir().unwrap();
    let python = bindings(&dir.path().join("sdk"));
    let wav = speech_wav(
        dir.path(),
        "Base to unit seven, hold your position.",
        16_000,
    );
    let spoken_ms = {
        let r = hound::WavReader::open(&wav).unwrap();
        u64::from(r.duration()) * 1000 / u64::from(r.spec().sample_rate)
    };
    assert!(spoken_ms > 1000, "{spoken_ms} ms of speech");
    let relay = start(&dir.path().join("relay"), None).await;
    let app = App::new(&python, &relay);
    let inbox = inbox(dir.path());
    let bob = app.spawn(
        &dir.path().join("bob"),
        &token(&relay, "bob"),
        &["receive", "1", inbox.to_str().unwrap()],
    );
    // Bob is connected before Alice presses (his app reports the status
    // on stderr; a second is plenty on loopback).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alice = app.run(
        &dir.path().join("alice"),
        &token(&relay, "alice"),
        &[
            "talk",
            "user",
            "bob",
            wav.to_str().unwrap(),
            "--network-change",
        ],
    );
    assert_eq!(alice["moved"], true);
    assert_eq!(alice["sent"][0]["accepted"], true, "{alice}");
    let id = alice["id"].as_str().unwrap().to_owned();
    let got = tokio::task::spawn_blocking(move || report(bob.wait_with_output().unwrap()))
        .await
        .unwrap();
    assert_eq!(ids(&got), std::slice::from_ref(&id), "exactly once: {got}");
    let clip = &got["clips"][0];
    assert_eq!(clip["live"], true, "{got}");
    let ms = clip["duration_ms"].as_u64().unwrap();
    assert!(
        ms.abs_diff(spoken_ms) <= 40,
        "{ms} ms kept, {spoken_ms} spoken"
    );
    let talk = &got["talk"];
    assert_eq!(talk["started"][0]["id"], id.as_str(), "{talk}");
    assert_eq!(talk["started"][0]["sender"], "alice");
    assert_eq!(talk["complete"][0], id.as_str());
    // Heard while Alice still talked, and all of it, at 48 kHz.
    let first = talk["first_audio_at"].as_f64().unwrap();
    let released = alice["released_at"].as_f64().unwrap();
    assert!(
        first < released - 0.5,
        "first audio {first}, release {released}"
    );
    let heard_ms = talk["audio_samples"].as_u64().unwrap() / 48;
    assert!(
        heard_ms.abs_diff(spoken_ms) <= 60,
        "{heard_ms} ms heard, {spoken_ms} spoken"
    );
    relay.shutdown().await;
}
