//! The `client-sim` binary against a real relay, with real speech encoded
//! and decoded by opus-tools (an independent Ogg Opus implementation).
//! Needs `espeak-ng`, `sox` and `opus-tools` (the README's test command
//! installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;
use relay::{Config, Relay};
use tokio::process::Command;

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
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("token_invalid"), "{err}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_talker_in_a_channel_is_told_busy() {
    let env = Env::new().await;
    let d = env.dir.path();
    let opus = speech_opus(d, "talk", "Unit two, report your position. Over.", &[], &[]).await;
    let inbox = d.join("inbox");
    let listener = tokio::spawn(
        env.cmd("carol")
            .args(["listen", "--out", inbox.to_str().unwrap(), "--count", "1"])
            .output(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let send = |who: &str| {
        env.cmd(who)
            .args([
                "send",
                "--channel",
                "ops",
                "--live",
                "--opus",
                opus.to_str().unwrap(),
            ])
            .output()
    };
    let first = tokio::spawn(send("alice"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second =
        run(env
            .cmd("bob")
            .args(["send", "--channel", "ops", "--opus", opus.to_str().unwrap()]))
        .await;
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("busy") && err.contains("alice"), "{err}");
    let first = first.await.unwrap().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let got = listener.await.unwrap().unwrap();
    assert!(got.status.success());
    let line = stdout(&got);
    assert!(line.contains("from alice in #ops"), "{line}");
}

/// A recording of exactly 60.000 s fits the default 60 s limit: opusenc's
/// file has 3,001 packets (60.02 s of samples, with the pre-skip and the
/// last packet's padding) but plays 60.000 s, which is what the limit
/// counts. A recording 100 ms longer is refused with `clip_too_long`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_second_recording_fits_the_sixty_second_limit() {
    let env = Env::new().await;
    assert_eq!(
        env.relay.shared().config.max_clip_duration,
        Duration::from_secs(60)
    );
    let d = env.dir.path();
    for (secs, fits) in [("60", true), ("60.1", false)] {
        let wav = d.join(format!("{secs}.wav"));
        let opus = d.join(format!("{secs}.opus"));
        tool(&[
            "sox",
            "-R",
            "-n",
            "-r",
            "48000",
            "-c",
            "1",
            "-b",
            "16",
            wav.to_str().unwrap(),
            "synth",
            secs,
            "sine",
            "440",
        ])
        .await;
        tool(&[
            "opusenc",
            "--quiet",
            "--bitrate",
            "16",
            wav.to_str().unwrap(),
            opus.to_str().unwrap(),
        ])
        .await;
        let out =
            run(env
                .cmd("alice")
                .args(["send", "--to", "bob", "--opus", opus.to_str().unwrap()]))
            .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), fits, "{secs} s: {err}");
        if !fits {
            assert!(err.contains("clip_too_long"), "{err}");
        }
    }
}

/// `client-sim usage` prints the user's own figures: the sender's bytes up
/// hold the clip it sent, the recipient (who never connected before) has
/// only its own query's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_prints_each_users_own_figures() {
    let env = Env::new().await;
    let d = env.dir.path();
    let said = speech_opus(d, "said", "Usage check, one two three. Over.", &[], &[]).await;
    let opus: u64 = codec::ogg_opus::OggOpus::read_file(&said)
        .unwrap()
        .packets
        .iter()
        .map(|p| p.len() as u64)
        .sum();
    let out = run(env
        .cmd("alice")
        .args(["send", "--to", "bob", "--opus", said.to_str().unwrap()]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let usage = |user: &'static str| {
        let mut c = env.cmd(user);
        c.args(["usage", "--days", "1", "--json"]);
        async move {
            let out = run(&mut c).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()
        }
    };
    let alice = usage("alice").await;
    assert_eq!(alice["user"], "alice");
    let up = alice["bytes_up"].as_u64().unwrap();
    assert!(
        up > opus && up < opus * 2 + 20_000,
        "{up} bytes up for {opus} of Opus"
    );
    assert_eq!(alice["days"][0]["date"], alice["today"]);
    let bob = usage("bob").await;
    assert_eq!(bob["user"], "bob");
    let bob_up = bob["bytes_up"].as_u64().unwrap();
    assert!(
        bob_up < opus.min(10_000),
        "bob sent nothing but his query: {bob_up}"
    );
    // The table.
    let out = run(env.cmd("alice").args(["usage"])).await;
    let table = stdout(&out);
    assert!(
        table.contains("data use of alice") && table.contains("total"),
        "{table}"
    );
}

/// `client-sim push-register` registers a device (the relay says how many
/// the user has), refuses an APNs topic that is not PushToTalk's with the
/// relay's reason and exit 1, and removes the device with `--remove`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_register_registers_refuses_and_removes() {
    let env = Env::new().await;
    let reg = |args: &[&str]| {
        let mut c = env.cmd("bob");
        c.arg("push-register").args(args);
        async move { run(&mut c).await }
    };
    let out = reg(&[
        "--provider",
        "apns",
        "--push-token",
        "a1b2c3",
        "--topic",
        "com.example.ptt.voip-ptt",
        "--device-id",
        "phone",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = stdout(&out);
    assert!(
        said.contains("device phone registered (1 device(s) registered for bob)"),
        "{said}"
    );
    let out = reg(&[
        "--provider",
        "apns",
        "--push-token",
        "a1",
        "--topic",
        "com.example.ptt",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("protocol_violation") && err.contains(".voip-ptt"),
        "{err}"
    );
    let out = reg(&["--provider", "apns", "--device-id", "phone", "--remove"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("removed (0 device(s)"),
        "{}",
        stdout(&out)
    );
}

/// `send` and `listen` with two relays of one service (`--relay A,B`): the
/// home relay's path dies (every datagram dropped), `listen` moves to the
/// other relay and `send` goes there after no answer from home; once home
/// answers again, `listen` goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_listen_move_to_the_next_relay_and_back() {
    let env = Env::new().await;
    let d = env.dir.path();
    let other_dir = d.join("other");
    env.relay.files().share_with(&other_dir).unwrap();
    let other = Relay::start(Config::for_tests(&other_dir)).await.unwrap();
    let home_wire = relay::testing::Wire::start(env.relay.quic_addr())
        .await
        .unwrap();
    let other_wire = relay::testing::Wire::start(other.quic_addr())
        .await
        .unwrap();
    let relays = format!("{},{}", home_wire.addr, other_wire.addr);
    let opus = speech_opus(d, "move", "Moving to the next relay. Over.", &[], &[]).await;
    let cmd = |user: &str| {
        let mut c = env.cmd(user);
        c.env("PTT_RELAY", &relays);
        c
    };
    let inbox = d.join("inbox");
    let mut listen = cmd("carol");
    listen.args(["listen", "--out", inbox.to_str().unwrap(), "--count", "3"]);
    listen.args([
        "--timeout",
        "60s",
        "--failover-after",
        "2s",
        "--keep-alive",
        "1s",
    ]);
    let listener = tokio::spawn(listen.output());
    let on = |r: &Relay| r.shared().router.session("carol").is_some();
    let send = || async {
        let mut c = cmd("alice");
        c.args(["send", "--to", "carol", "--opus", opus.to_str().unwrap()]);
        c.args(["--failover-after", "2s"]);
        let out = run(&mut c).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    until("carol at home", || on(&env.relay)).await;
    send().await;

    home_wire.set_cut(true);
    let warned = send().await;
    assert!(
        warned.contains("no answer"),
        "sent after home did not answer: {warned}"
    );
    until("carol on the other relay", || on(&other)).await;

    home_wire.set_cut(false);
    until("carol back home", || !on(&other)).await;
    send().await;
    let got = listener.await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&got.stderr);
    assert!(got.status.success(), "{err}");
    assert_eq!(stdout(&got).lines().count(), 3, "three clips, once each");
    let at_other = format!("at {}", other_wire.addr);
    assert!(
        err.contains(&at_other),
        "listened at the other relay: {err}"
    );
}

/// Waits (a bound, not a measure) until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
