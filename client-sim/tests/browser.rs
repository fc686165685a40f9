//! The web app in a real headless Chromium (Debian's `chromium`, driven
//! through `chromedriver` over WebDriver), its microphone fed from a WAV of
//! real speech, against a real relay and real `client-sim` clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// One Chromium (one chromedriver session); pages are its windows.
struct Browser {
    client: Client,
    _driver: Child,
}

fn need_browser() {
    for tool in ["chromium", "chromedriver"] {
        let ok = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "`{tool}` is missing: install Debian's chromium and chromium-driver (the README's test command does)"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    async fn start(mic: &Path) -> Browser {
        need_browser();
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=420,860",
                    "--use-fake-ui-for-media-stream",
                    "--use-fake-device-for-media-stream",
                    format!("--use-file-for-fake-audio-capture={}", mic.display()),
                    "--autoplay-policy=no-user-gesture-required",
                    "--disable-background-timer-throttling",
                    "--disable-renderer-backgrounding",
                    "--disable-backgrounding-occluded-windows",
                ],
            }
        });
        let caps: serde_json::Map<String, Value> = caps.as_object().unwrap().clone();
        let url = format!("http://127.0.0.1:{port}");
        let mut last = None;
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => {
                    return Browser {
                        client,
                        _driver: driver,
                    };
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not start: {last:?}");
    }

    /// Opens the app in a new window signed in by link; returns its handle.
    async fn open(&self, app: &str, token: &str) -> fantoccini::wd::WindowHandle {
        let w = self.client.new_window(false).await.unwrap().handle;
        self.client.switch_to_window(w.clone()).await.unwrap();
        self.client
            .goto(&format!("{app}#token={token}"))
            .await
            .unwrap();
        w
    }

    async fn on(&self, w: &fantoccini::wd::WindowHandle) {
        self.client.switch_to_window(w.clone()).await.unwrap();
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Runs an async script: `done` is the last argument's callback.
    async fn js_async(&self, script: &str) -> Value {
        self.client.execute_async(script, vec![]).await.unwrap()
    }

    /// Polls `expr` (a JavaScript expression) until it is truthy.
    async fn wait(&self, expr: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.js(&format!("return {expr};")).await;
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let state = self.js("return JSON.stringify(window.ptt ?? null);").await;
                panic!("waited {within:?} for `{expr}`; page state: {state}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the page is online (Welcome read) and its microphone open.
    async fn online(&self) {
        self.wait("window.ptt && window.ptt.user", Duration::from_secs(20))
            .await;
        let mic = self
            .js_async("window.ptt.mic.then(ok => arguments[0](ok));")
            .await;
        assert_eq!(mic, json!(true), "microphone did not open");
    }

    /// Holds the button for `ms` of recording (timed in the page), then
    /// waits for the relay's answer; returns the page's talk status.
    async fn talk(&self, ms: u64) -> String {
        self.js_async(&format!(
            "const done = arguments[0]; window.pttPress().then(() => setTimeout(() => window.pttRelease().then(() => done(true)), {ms}));"
        ))
        .await;
        self.wait(
            "/^(sent|not sent|Busy)/.test(window.ptt.talkStatus) && window.ptt.talkStatus",
            Duration::from_secs(20),
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
    }

    /// An array of the page's state, `window.ptt[field]`.
    async fn list(&self, field: &str) -> Vec<Value> {
        self.js(&format!("return window.ptt.{field};"))
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn clips(&self) -> Vec<Value> {
        self.list("clips").await
    }

    /// No error was logged in the page (decoder errors included).
    async fn assert_clean(&self) {
        let errors = self.list("errors").await;
        assert!(errors.is_empty(), "{errors:?}");
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// Mono 48 kHz speech for the fake microphone (looped by Chromium), and
/// its duration.
async fn mic_wav(dir: &Path) -> (PathBuf, f64) {
    let wav = speech_wav(
        dir,
        "mic",
        "Unit seven, come in. The north gate is open and the truck is on its way.",
        &["-r", "48000", "-c", "1", "-b", "16"],
    )
    .await;
    let secs = wav_secs(&wav);
    (wav, secs)
}

/// `text` spoken, as Ogg Opus at the app's settings (48 kHz mono, 16
/// kbit/s).
async fn app_opus(dir: &Path, name: &str, text: &str) -> PathBuf {
    speech_opus(
        dir,
        name,
        text,
        &["-r", "48000", "-c", "1"],
        &["--bitrate", "16"],
    )
    .await
}

/// A relay, and the fake microphone's speech and its duration.
async fn setup() -> (Env, PathBuf, f64) {
    let env = Env::new().await;
    let (wav, secs) = mic_wav(env.dir.path()).await;
    (env, wav, secs)
}

fn wav_secs(path: &Path) -> f64 {
    let r = hound::WavReader::open(path).unwrap();
    r.duration() as f64 / r.spec().sample_rate as f64
}

/// RMS in dBFS of a WAV's samples (any format hound reads), over its
/// frames louder than -50 dBFS (speech, not pauses).
fn speech_db(path: &Path) -> f64 {
    let mut r = hound::WavReader::open(path).unwrap();
    let spec = r.spec();
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => r.samples::<f32>().map(|s| s.unwrap()).collect(),
        hound::SampleFormat::Int => {
            let scale = (1i64 << (spec.bits_per_sample - 1)) as f32;
            r.samples::<i32>()
                .map(|s| s.unwrap() as f32 / scale)
                .collect()
        }
    };
    let frame = (spec.sample_rate / 50) as usize * spec.channels as usize;
    let loud: Vec<f64> = samples
        .chunks(frame)
        .map(|c| c.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / c.len() as f64)
        .filter(|ms| 10.0 * ms.log10() > -50.0)
        .collect();
    assert!(!loud.is_empty(), "{} is silent", path.display());
    10.0 * (loud.iter().sum::<f64>() / loud.len() as f64).log10()
}

/// `client-sim listen` for `count` clips as `user`, running: its inbox
/// and the task that ends with its output.
fn listen(
    env: &Env,
    user: &str,
    count: u32,
) -> (
    PathBuf,
    tokio::task::JoinHandle<std::io::Result<std::process::Output>>,
) {
    let inbox = env.dir.path().join(format!("inbox-{user}"));
    let listener = env
        .cmd(user)
        .args(["listen", "--count", &count.to_string()])
        .args(["--timeout", "60s", "--out"])
        .arg(&inbox)
        .output();
    (inbox, tokio::spawn(listener))
}

/// `client-sim send` as `user` with `flags`, the Ogg Opus file `opus`;
/// the clip id it prints.
async fn send(env: &Env, user: &str, flags: &[&str], opus: &Path) -> String {
    let out = env
        .cmd(user)
        .arg("send")
        .args(flags)
        .arg("--opus")
        .arg(opus)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

fn app(env: &Env) -> String {
    format!("http://{}/", env.relay.web_addr().expect("web listener on"))
}

#[tokio::test]
async fn the_browser_talks_to_client_sim_listen() {
    let (env, wav, secs) = setup().await;
    let (inbox, listener) = listen(&env, "bob", 1);
    let b = Browser::start(&wav).await;
    b.open(&app(&env), &env.token("carol")).await;
    b.online().await;
    b.js("document.getElementById('to-user').value = 'bob'; document.querySelector('input[value=user]').checked = true;")
        .await;
    let ms = (secs * 1000.0).round() as u64;
    let status = b.talk(ms).await;
    assert_eq!(status, "sent to bob");
    let out = listener.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let clip = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "opus"))
        .expect("an Ogg Opus clip");
    // opusdec (an independent decoder) reads it; the speech's length and
    // level came through.
    let decoded = clip.with_extension("dec.wav");
    tool(&[
        "opusdec",
        "--quiet",
        clip.to_str().unwrap(),
        decoded.to_str().unwrap(),
    ])
    .await;
    let got = wav_secs(&decoded);
    assert!(
        (got - secs).abs() <= 0.1,
        "clip plays {got:.3} s, the speech {secs:.3} s"
    );
    let (want_db, got_db) = (speech_db(&wav), speech_db(&decoded));
    assert!(
        (got_db - want_db).abs() < 12.0,
        "speech at {want_db:.1} dBFS arrived at {got_db:.1} dBFS"
    );
    b.assert_clean().await;
    b.close().await;
}

#[tokio::test]
async fn client_sim_send_live_talks_to_the_browser() {
    let (env, wav, _) = setup().await;
    let opus = speech_opus(
        env.dir.path(),
        "said",
        "Dispatch to unit seven. Proceed to the north gate.",
        &["-r", "48000", "-c", "1"],
        &["--bitrate", "16", "--framesize", "20"],
    )
    .await;
    let packets = opus_packets(&opus);
    let b = Browser::start(&wav).await;
    b.open(&app(&env), &env.token("carol")).await;
    b.online().await;
    let id = send(&env, "dave", &["--to", "carol", "--live"], &opus).await;
    let clip = b
        .wait(
            &format!("window.ptt.clips.find(c => c.id === '{id}')"),
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(clip["sender"], "dave");
    assert_eq!(clip["live"], true, "delivered while dave talked");
    assert_eq!(clip["packets"], json!(packets), "every packet, in order");
    assert_eq!(clip["frames"], json!(packets), "each one decoded");
    assert_eq!(clip["decodeErrors"], 0);
    let shown = b
        .js(&format!(
            "return document.querySelector('#clips li[data-id=\"{id}\"]')?.textContent;"
        ))
        .await;
    assert!(shown.as_str().unwrap().starts_with("dave → you"), "{shown}");
    b.assert_clean().await;
    b.close().await;
}

#[tokio::test]
async fn two_pages_in_a_channel_busy_and_heard() {
    let (env, wav, _) = setup().await;
    let (inbox, member) = listen(&env, "dave", 1);
    let b = Browser::start(&wav).await;
    let first = b.open(&app(&env), &env.token("alice")).await;
    b.online().await;
    let second = b.open(&app(&env), &env.token("bob")).await;
    b.online().await;
    // alice holds the floor of #ops for 3 s (timed in her page); bob
    // presses 1 s into it.
    b.on(&first).await;
    b.js("window.pttPress().then(() => setTimeout(() => window.pttRelease(), 3000));")
        .await;
    b.wait(
        "/^talking/.test(window.ptt.talkStatus)",
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    b.on(&second).await;
    let pressed = b.talk(500).await;
    assert_eq!(pressed, "Busy: alice holds the floor of ops");
    // bob's page heard alice live, press to first sound measured on the
    // browser's one clock.
    let clip = b
        .wait(
            "window.ptt.clips.find(c => c.sender === 'alice')",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(clip["channel"], "ops");
    assert_eq!(clip["live"], true);
    assert_eq!(clip["decodeErrors"], 0);
    assert!(clip["frames"].as_u64().unwrap() >= 100, "{clip}");
    let id = clip["id"].as_str().unwrap().to_owned();
    let heard_at = b
        .js(&format!("return window.ptt.sounding['{id}'];"))
        .await
        .as_f64()
        .expect("the clip sounded");
    b.on(&first).await;
    b.wait(
        "window.ptt.talkStatus === 'sent to #ops'",
        Duration::from_secs(20),
    )
    .await;
    let pressed_at = b.js("return window.ptt.pressedAt;").await.as_f64().unwrap();
    eprintln!(
        "mouth-to-ear (press in one page to first sound in the other, loopback): {:.0} ms",
        heard_at - pressed_at
    );
    // The other member (client-sim) got alice's clip.
    let out = member.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(inbox.join(format!("{id}.opus")).exists());
    for w in [&first, &second] {
        b.on(w).await;
        b.assert_clean().await;
    }
    b.close().await;
}

#[tokio::test]
async fn a_page_that_was_closed_gets_its_stored_clips_in_order() {
    let (env, wav, _) = setup().await;
    let mut sent = Vec::new();
    for (i, text) in ["First message.", "Second message.", "Third message."]
        .iter()
        .enumerate()
    {
        let opus = app_opus(env.dir.path(), &format!("stored{i}"), text).await;
        sent.push(send(&env, "dave", &["--to", "erin"], &opus).await);
    }
    let b = Browser::start(&wav).await;
    b.open(&app(&env), &env.token("erin")).await;
    b.online().await;
    b.wait("window.ptt.clips.length === 3", Duration::from_secs(20))
        .await;
    let clips = b.clips().await;
    let ids: Vec<&str> = clips.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, sent, "in the order they were sent");
    for c in &clips {
        assert_eq!(c["live"], false);
        assert_eq!(c["decodeErrors"], 0);
        assert_eq!(c["frames"], c["packets"]);
    }
    // Acked: nothing is left for erin.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while env.relay.shared().store.stats().pending > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "acks did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.close().await;
}

/// Audio packets in an Ogg Opus file (after OpusHead and OpusTags).
fn opus_packets(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut r = ogg::PacketReader::new(f);
    let mut n = 0u64;
    while let Some(_p) = r.read_packet().unwrap() {
        n += 1;
    }
    n - 2
}

#[tokio::test]
async fn the_page_rides_out_a_relay_restart_and_sends_what_it_recorded_meanwhile() {
    let (env, wav, _) = setup().await;
    let b = Browser::start(&wav).await;
    b.open(&app(&env), &env.token("carol")).await;
    b.online().await;
    b.js("document.getElementById('to-user').value = 'bob'; document.querySelector('input[value=user]').checked = true;")
        .await;
    // The relay shuts down (GoAway to every session) and is gone a while.
    let Env { relay, dir } = env;
    let (quic, web) = (relay.quic_addr(), relay.web_addr());
    relay.shutdown().await;
    // The page learns the connection is gone (GoAway first, then the close).
    b.wait("window.ptt.connected === false", Duration::from_secs(10))
        .await;
    // carol talks meanwhile: the page keeps the clip.
    b.js_async(
        "const done = arguments[0]; window.pttPress().then(() => setTimeout(() => window.pttRelease().then(() => done(true)), 1000));",
    )
    .await;
    let kept = b.js("return window.ptt.talkStatus;").await;
    assert_eq!(kept, "kept: will be sent when back online");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Back on the same addresses and data dir (a new web certificate: the
    // page fetches its hash again).
    let mut cfg = relay::Config::for_tests(dir.path().join("relay"));
    cfg.listen = quic;
    cfg.web = relay::config::WebListen(web);
    let env = Env {
        relay: relay::Relay::start(cfg).await.unwrap(),
        dir,
    };
    let (inbox, bob) = listen(&env, "bob", 1);
    b.wait(
        "window.ptt.talkStatus === 'sent to bob'",
        Duration::from_secs(30),
    )
    .await;
    let out = bob.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = b.js("return window.ptt.sent[0].id;").await;
    assert!(
        inbox
            .join(format!("{}.opus", sent.as_str().unwrap()))
            .exists()
    );
    b.assert_clean().await;
    b.close().await;
}

#[tokio::test]
async fn a_press_with_nothing_recorded_sends_nothing_and_holds_no_floor() {
    let (env, wav, _) = setup().await;
    let opus = app_opus(env.dir.path(), "after", "Is the channel free?").await;
    let b = Browser::start(&wav).await;
    b.open(&app(&env), &env.token("alice")).await;
    b.online().await;
    // A tap on the button (to #ops, the token's channel): released before
    // a frame was recorded.
    b.js_async(
        "const done = arguments[0]; window.pttPress().then(() => window.pttRelease()).then(() => done(true));",
    )
    .await;
    b.wait(
        "window.ptt.talkStatus.startsWith('nothing recorded')",
        Duration::from_secs(10),
    )
    .await;
    // The floor is free at once: dave talks in #ops (client-sim send
    // fails with "busy" otherwise) and alice's page hears him.
    send(&env, "dave", &["--channel", "ops"], &opus).await;
    b.wait(
        "window.ptt.clips.find(c => c.sender === 'dave')",
        Duration::from_secs(20),
    )
    .await;
    assert!(b.js("return window.ptt.sent.length;").await == json!(0));
    b.assert_clean().await;
    b.close().await;
}

#[tokio::test]
async fn a_clip_refused_for_now_while_recording_goes_again_by_itself() {
    // carol may start four clips a minute (one more every 15 s).
    let env = Env::with(|c| c.max_clips_per_minute = 4).await;
    let (wav, _) = mic_wav(env.dir.path()).await;
    let opus = app_opus(env.dir.path(), "burst", "Copy that.").await;
    // Her budget is spent from her other device (signed out before the
    // page signs in: one session per user).
    let mut sent = Vec::new();
    for _ in 0..4 {
        sent.push(send(&env, "carol", &["--to", "bob"], &opus).await);
    }
    let b = Browser::start(&wav).await;
    b.open(&app(&env), &env.token("carol")).await;
    b.online().await;
    b.js("document.getElementById('to-user').value = 'bob'; document.querySelector('input[value=user]').checked = true;")
        .await;
    // She presses: the relay refuses the clip for now (rate_limited, with
    // a retry-after hint) while she is still talking.
    b.js_async("const done = arguments[0]; window.pttPress().then(() => done(true));")
        .await;
    let refused = b
        .wait(
            "window.ptt.talkStatus.startsWith('too many clips') && window.ptt.talkStatus",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        refused.as_str().unwrap().contains(" s)"),
        "the page says when: {refused}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.js_async("const done = arguments[0]; window.pttRelease().then(() => done(true));")
        .await;
    // The page sends it again by itself once the budget allows, whole.
    b.wait(
        "window.ptt.talkStatus === 'sent to bob'",
        Duration::from_secs(40),
    )
    .await;
    let page = b.js("return window.ptt.sent[0];").await;
    sent.push(page["id"].as_str().unwrap().to_owned());
    let (inbox, bob) = listen(&env, "bob", 5);
    let out = bob.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in &sent {
        let clip = inbox.join(format!("{id}.opus"));
        assert!(clip.exists(), "{} missing", clip.display());
    }
    let kept = inbox.join(format!("{}.opus", sent[4]));
    assert_eq!(
        json!(opus_packets(&kept)),
        page["packets"],
        "the whole clip"
    );
    b.assert_clean().await;
    b.close().await;
}

/// The page with two relays (`web_relays`): home shuts down (`GoAway`),
/// the page moves to the other relay, where a clip reaches it; home comes
/// back on its addresses and the page goes home.
#[tokio::test]
async fn the_page_moves_to_the_next_relay_and_comes_back_home() {
    let other_web = free_port();
    let env = Env::with(|c| c.web_relays = format!("http://127.0.0.1:{other_web}")).await;
    let (wav, _) = mic_wav(env.dir.path()).await;
    // The other relay of the service: the same keys (browsers get each
    // relay's own short-lived certificate and pin it from its config).
    let other_tmp = tempfile::tempdir().unwrap();
    let other_dir = other_tmp.path().join("relay");
    env.relay.files().share_with(&other_dir).unwrap();
    let mut cfg = relay::Config::for_tests(&other_dir);
    cfg.web = relay::config::WebListen(Some(([127, 0, 0, 1], other_web).into()));
    let other = Env {
        relay: relay::Relay::start(cfg).await.unwrap(),
        dir: other_tmp,
    };
    let on = |r: &relay::Relay| r.shared().router.session("carol").is_some();
    let b = Browser::start(&wav).await;
    b.open(&app(&env), &env.token("carol")).await;
    b.online().await;
    assert!(on(&env.relay) && !on(&other.relay), "home first");

    // Home shuts down: GoAway, and the page moves on.
    let Env { relay, dir } = env;
    let (quic, web) = (relay.quic_addr(), relay.web_addr());
    relay.shutdown().await;
    until("carol on the other relay", || on(&other.relay)).await;
    let opus = app_opus(other.dir.path(), "moved", "Found you on the other relay.").await;
    let id = send(&other, "dave", &["--to", "carol"], &opus).await;
    b.wait("window.ptt.clips.length === 1", Duration::from_secs(20))
        .await;
    assert_eq!(b.clips().await[0]["id"], id.as_str());

    // Home is back on its addresses: the page goes home.
    let mut cfg = relay::Config::for_tests(dir.path().join("relay"));
    cfg.listen = quic;
    cfg.web = relay::config::WebListen(web);
    cfg.web_relays = format!("http://127.0.0.1:{other_web}");
    let home = relay::Relay::start(cfg).await.unwrap();
    until("carol back home", || on(&home) && !on(&other.relay)).await;
    b.wait("window.ptt.connected === true", Duration::from_secs(10))
        .await;
    b.assert_clean().await;
    b.close().await;
    drop(dir);
}

/// Waits (a bound, not a measure) until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
