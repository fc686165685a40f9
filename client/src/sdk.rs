//! The client as an app uses it: sign in once, and the SDK stays
//! connected (reconnecting with backoff, following `GoAway`, surviving a
//! network change), sends live presses from the microphone and recorded
//! clips through a durable outbox, decodes others' live talk for the
//! speaker, and hands incoming clips to the app in order, acking each one
//! only after the app says it is kept. `docs/sdk.md` describes it for app teams; the
//! uniffi bindings (`ffi.rs`) wrap this module.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use codec::ErrorCode;
use codec::audio::decode::Decoder;
use codec::audio::encode::EncoderConfig;
use codec::audio::live::LiveEncoder;
use codec::ogg_opus::OggOpus;
use codec::wire::{AudioFormat, ClipId, Target};
use quinn::Endpoint;
use tokio::sync::{Notify, mpsc};

use crate::client::LiveUpload;
use crate::failover::{self, Connected, Lost, Relays, Watched};
use crate::inbox::Inbox;
use crate::outbox::{Outbox, OutboxError};
use crate::{Client, ClientError, ClientOptions, Event, OutgoingClip, Pacing, ReceivedClip};

/// What the SDK needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The relay, `HOST:PORT` (the home relay, when `relays` is empty).
    pub relay: String,
    /// Several relays of one service, `HOST:PORT` each, the home relay
    /// first (empty: `relay` alone; when set, `relay` is empty or the
    /// first of them). The SDK stays on one while it answers, moves to
    /// the next when it does not (see `failover_after`), and goes back
    /// home once home answers again (docs/sdk.md, "Several relays").
    pub relays: Vec<String>,
    /// With several relays, how soon a relay that stopped answering is
    /// left for the next: a connection that has had no answer to what it
    /// sent (a clip, an ack, its keep-alive) for half of it is given up,
    /// and a connection attempt for all of it: 3 s. An idle connection
    /// sends its keep-alive every `transport.keep_alive`, so an idle
    /// client notices a dead relay within that plus this.
    pub failover_after: Duration,
    /// PEM file of the certificate (or CA) the relay's certificate is
    /// checked against.
    pub ca_pem: PathBuf,
    /// Where the outbox and the inbox's ids live: app-private storage that
    /// survives restarts.
    pub data_dir: PathBuf,
    /// The access token to sign in with.
    pub token: String,
    /// Most bytes of recordings the outbox holds (`send_file` refuses
    /// beyond): 64 MiB by default, about nine hours of 16 kbit/s voice.
    pub outbox_max_bytes: u64,
    /// Clip ids the inbox remembers, to drop redeliveries: 4096.
    pub inbox_ids: usize,
    /// First wait before reconnecting; doubled after each failure up to
    /// `reconnect_max` (with jitter): 250 ms and 30 s.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// A connection attempt that has not completed its handshake and
    /// sign-in by then counts as failed (the relay is unreachable): 5 s.
    pub connect_timeout: Duration,
    /// [`Sdk::sleep`] waits at most this long for the outbox to empty
    /// before it closes the connection (what is left goes at the next
    /// wake): 10 s.
    pub sleep_drain: Duration,
    /// The microphone's sample rate for [`Sdk::pcm`] (mono; a multiple of
    /// 100 Hz: 8, 16, 24, 32, 44.1 or 48 kHz): 48 kHz.
    pub mic_rate: u32,
    /// Longest press, in microphone audio given to [`Sdk::pcm`]: the
    /// press is released by the SDK once it has that much (the relay
    /// refuses a clip longer than its `max_clip_duration`, 60 s by
    /// default, counted in audio too): 60 s.
    pub max_press: Duration,
    /// Opus frame length of live talk, ms: 20 (10, 40 or 60: longer frames
    /// mean fewer packets, so fewer header and ACK bytes per second of
    /// voice, but each packet leaves that much later and a lost one loses
    /// that much audio).
    pub frame_ms: u32,
    /// How the connection behaves on the wire: 0-RTT reconnects, and the
    /// ACK frequency asked of the relay (4 packets / 25 ms; a longer delay,
    /// up to the path's RTT, spends fewer bytes per second of voice and
    /// recovers a clip's lost last packet later: docs/benchmarks.md).
    pub transport: crate::net::Transport,
}

impl Config {
    pub fn new(relay: &str, ca_pem: PathBuf, data_dir: PathBuf, token: &str) -> Config {
        Config {
            relay: relay.to_owned(),
            relays: Vec::new(),
            failover_after: Duration::from_secs(3),
            ca_pem,
            data_dir,
            token: token.to_owned(),
            outbox_max_bytes: 64 << 20,
            inbox_ids: 4096,
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            sleep_drain: Duration::from_secs(10),
            mic_rate: 48_000,
            max_press: Duration::from_secs(60),
            frame_ms: 20,
            transport: crate::net::Transport::default(),
        }
    }

    /// The relays in order of preference, home first.
    pub fn relay_list(&self) -> Result<Vec<String>, SdkError> {
        if self.relays.is_empty() {
            return Ok(vec![self.relay.clone()]);
        }
        if !self.relay.is_empty() && self.relay != self.relays[0] {
            return Err(SdkError::Setup(format!(
                "relay {} is not the first of relays ({}): set one or the other",
                self.relay,
                self.relays.join(",")
            )));
        }
        Ok(self.relays.clone())
    }
}

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The data dir (outbox, inbox) could not be used.
    #[error("storage: {0}")]
    Storage(String),
    /// The outbox is full: wait until clips are sent.
    #[error("{0}")]
    OutboxFull(String),
    /// The recording is not an Ogg Opus file the relay would take.
    #[error("not a usable Ogg Opus recording: {0}")]
    BadClip(String),
    /// The relay address or its certificate file is wrong.
    #[error("setup: {0}")]
    Setup(String),
    /// `press` while a press is held, or `pcm`/`release` with none.
    #[error("{0}")]
    Talk(String),
    /// The microphone audio could not be encoded (an unsupported rate).
    #[error("audio: {0}")]
    Audio(String),
    /// Needs the relay, and there is no connection (or it was lost).
    #[error("offline: {0}")]
    Offline(String),
}

impl From<OutboxError> for SdkError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Full { .. } => SdkError::OutboxFull(e.to_string()),
            OutboxError::Io { .. } => SdkError::Storage(e.to_string()),
        }
    }
}

/// A clip received whole.
#[derive(Debug, Clone)]
pub struct IncomingClip {
    pub id: ClipId,
    /// Who sent it (from the sender's token).
    pub sender: String,
    /// To whom: this user, or a channel this user is a member of.
    pub target: Target,
    /// When the relay accepted it, Unix ms.
    pub created_ms: u64,
    /// Relayed while the sender was talking (else from the relay's store).
    pub live: bool,
    pub duration_ms: u64,
    /// The clip as an Ogg Opus file.
    pub ogg: Vec<u8>,
}

impl IncomingClip {
    fn from_received(c: &ReceivedClip) -> IncomingClip {
        let file = c.to_ogg();
        IncomingClip {
            id: c.id(),
            sender: c.delivery.sender.clone(),
            target: c.delivery.target.clone(),
            created_ms: c.delivery.created_ms,
            live: c.delivery.live,
            duration_ms: file.duration_ms(),
            ogg: file.to_vec(rand::random()),
        }
    }
}

/// Where the SDK's link to the relay stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Connecting,
    /// Signed in as `user`.
    Connected {
        user: String,
    },
    /// Not connected; the next try is in `retry_in_ms`.
    Offline {
        why: String,
        retry_in_ms: u64,
    },
    /// The token was refused and no fresh one came: call
    /// [`Sdk::set_token`] to go on.
    SignedOut {
        why: String,
    },
    /// [`Sdk::sleep`]: no connection and nothing on the wire until
    /// [`Sdk::wake`] (or a press, or a clip to send).
    Asleep,
}

/// The relay's final answer to a clip from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Stored by the relay (`duplicate`: it had it already from an earlier
    /// try; nobody gets it twice).
    Accepted { duplicate: bool },
    /// Refused for good (unknown recipient, not allowed, too long...): the
    /// clip was moved to the outbox's `failed/` directory.
    Refused { code: ErrorCode, reason: String },
}

/// Live talk as it happens: others' talk as it is heard (decoded for the
/// speaker), and what became of this user's own press. The whole clips
/// still come through [`Listener::clip`], in order, to be kept.
#[derive(Debug, Clone, PartialEq)]
pub enum TalkEvent {
    /// Someone started talking to this user, or in one of its channels.
    Started {
        id: ClipId,
        sender: String,
        target: Target,
    },
    /// Decoded audio of a live clip: 48 kHz mono 16-bit PCM, for the
    /// speaker, as it arrives (every 20 ms or so).
    Audio { id: ClipId, pcm: Vec<i16> },
    /// The live clip ended whole.
    Complete { id: ClipId },
    /// The live clip was cut off before its end (the sender lost its
    /// connection or gave up, a priority talker took over, the relay
    /// refused it): what was heard is all there is.
    CutOff { id: ClipId, why: String },
    /// A channel's floor is free again: its talker finished or was cut.
    FloorFree { channel: String },
    /// This user's press was refused: `holder` is talking in the channel.
    Busy { id: ClipId, holder: String },
    /// This user's press was ended by a priority talker.
    Preempted { id: ClipId },
    /// A clip for this user will never arrive: the relay dropped it unheard
    /// (older than its `clip_ttl`), and `also` older ones with it. Acked
    /// by the SDK once told.
    Expired {
        id: ClipId,
        sender: String,
        target: Target,
        created_ms: u64,
        also: u64,
    },
}

/// The app's side: the SDK calls these from its own threads; each should
/// return quickly.
pub trait Listener: Send + Sync + 'static {
    /// A clip arrived whole, in order. Return true once it is kept (on
    /// disk, or played if the app keeps nothing): only then is it acked,
    /// and the relay forgets it. False: the relay delivers it again on the
    /// next connection.
    fn clip(&self, clip: IncomingClip) -> bool;
    /// The relay answered a clip sent from the outbox.
    fn sent(&self, id: ClipId, outcome: Sent);
    fn status(&self, status: Status);
    /// The relay refused the token (expired, revoked): a fresh one, if the
    /// app can get one now.
    fn fresh_token(&self) -> Option<String> {
        None
    }
    /// Live talk as it happens ([`TalkEvent`]).
    fn talk(&self, _event: TalkEvent) {}
}

struct Inner {
    cfg: Config,
    listener: Arc<dyn Listener>,
    outbox: Mutex<Outbox>,
    inbox: Mutex<Inbox>,
    token: Mutex<String>,
    /// Something changed: a new clip in the outbox, a new token, stop.
    wake: Notify,
    stopping: AtomicBool,
    stopped: Notify,
    /// [`Sdk::sleep`] was called and no [`Sdk::wake`] since.
    asleep: AtomicBool,
    /// Sleep was asked for (the connection's loop leaves).
    sleep_asked: Notify,
    /// Woken (the driver connects again).
    woken: Notify,
    /// The connection of a sleep request has closed.
    slept: Notify,
    endpoint: Mutex<Option<Endpoint>>,
    /// The client config of each relay of the list (by its `HOST:PORT`),
    /// with that relay's resumption tickets.
    tls: Mutex<HashMap<String, quinn::ClientConfig>>,
    client: Mutex<Option<Arc<Client>>>,
    /// The press being held.
    talk: Mutex<Option<Press>>,
}

/// A press being held: microphone audio is encoded here and handed to
/// the press's task, which sends it live.
struct Press {
    id: ClipId,
    target: Target,
    enc: LiveEncoder,
    tx: mpsc::UnboundedSender<Spoken>,
    /// Made while offline: the next connection starts the press's upload
    /// with its handshake (in 0-RTT when resuming) and hands it over here.
    handoff: Option<tokio::sync::oneshot::Sender<LiveUpload>>,
}

/// What a press hands its task.
enum Spoken {
    Packets(Vec<Bytes>),
    End { packets: Vec<Bytes>, granule: u64 },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data whole.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running SDK: one signed-in user.
#[derive(Clone)]
pub struct Sdk {
    inner: Arc<Inner>,
}

impl Sdk {
    /// Opens the outbox and inbox in `cfg.data_dir` and starts connecting
    /// (in the current tokio runtime). Clips left in the outbox by an
    /// earlier run are sent once connected.
    pub fn start(cfg: Config, listener: Arc<dyn Listener>) -> Result<Sdk, SdkError> {
        let relays = cfg.relay_list()?;
        let outbox = Outbox::open(&cfg.data_dir.join("outbox"), cfg.outbox_max_bytes)?;
        let inbox = Inbox::open(&cfg.data_dir.join("inbox.ids"), cfg.inbox_ids)
            .map_err(|e| SdkError::Storage(format!("inbox: {e}")))?;
        let inner = Arc::new(Inner {
            token: Mutex::new(cfg.token.clone()),
            cfg,
            listener,
            outbox: Mutex::new(outbox),
            inbox: Mutex::new(inbox),
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
            asleep: AtomicBool::new(false),
            sleep_asked: Notify::new(),
            woken: Notify::new(),
            slept: Notify::new(),
            endpoint: Mutex::new(None),
            tls: Mutex::new(HashMap::new()),
            client: Mutex::new(None),
            talk: Mutex::new(None),
        });
        tokio::spawn(drive(inner.clone(), relays));
        Ok(Sdk { inner })
    }

    /// Keeps a recorded clip (an Ogg Opus file) in the outbox and sends it
    /// as soon as the relay is reachable. Returns its clip id; the outcome
    /// comes through [`Listener::sent`].
    pub fn send_file(&self, target: Target, ogg: &[u8]) -> Result<ClipId, SdkError> {
        let file = OggOpus::read(ogg).map_err(|e| SdkError::BadClip(e.to_string()))?;
        if file.packets.is_empty() {
            return Err(SdkError::BadClip("no audio packets".into()));
        }
        let id = ClipId(rand::random());
        lock(&self.inner.outbox).put(id, &target, ogg)?;
        self.inner.wake.notify_one();
        // Asleep: a clip to send wakes the SDK.
        wake_up(&self.inner);
        Ok(id)
    }

    /// The user presses the talk button: a live clip to `target` starts
    /// now (its header leaves at once when connected). Feed the microphone
    /// with [`Sdk::pcm`] and end with [`Sdk::release`]. What becomes of it
    /// comes through [`Listener::sent`] (and [`TalkEvent::Busy`] or
    /// [`TalkEvent::Preempted`]); a press made offline, or whose
    /// connection is lost while talking, is kept in the outbox and sent as
    /// a recorded clip when the link is back.
    pub fn press(&self, target: Target) -> Result<ClipId, SdkError> {
        let mut talk = lock(&self.inner.talk);
        if talk.is_some() {
            return Err(SdkError::Talk("a press is already held".into()));
        }
        let config = EncoderConfig {
            frame_ms: self.inner.cfg.frame_ms,
            ..EncoderConfig::default()
        };
        let enc = LiveEncoder::new(config, self.inner.cfg.mic_rate)
            .map_err(|e| SdkError::Audio(e.to_string()))?;
        let id = ClipId(rand::random());
        let (tx, rx) = mpsc::unbounded_channel();
        let (handoff, handed) = tokio::sync::oneshot::channel();
        let format = enc.format();
        tokio::spawn(talk_task(
            self.inner.clone(),
            id,
            target.clone(),
            format,
            rx,
            handed,
        ));
        *talk = Some(Press {
            id,
            target,
            enc,
            tx,
            handoff: Some(handoff),
        });
        // Offline: try to connect now rather than at the end of a backoff
        // (asleep: a press wakes the SDK).
        self.inner.wake.notify_one();
        wake_up(&self.inner);
        Ok(id)
    }

    /// Microphone audio of the press held: mono 16-bit samples at
    /// `Config::mic_rate`, any count at a time (10 or 20 ms is usual).
    /// Each 20 ms leaves as an Opus packet as soon as it is complete.
    pub fn pcm(&self, samples: &[i16]) -> Result<(), SdkError> {
        let over = {
            let mut talk = lock(&self.inner.talk);
            let Some(p) = talk.as_mut() else {
                return Err(SdkError::Talk("no press is held".into()));
            };
            let packets = p
                .enc
                .push_i16(samples)
                .map_err(|e| SdkError::Audio(e.to_string()))?;
            if !packets.is_empty() {
                let _ = p.tx.send(Spoken::Packets(packets));
            }
            p.enc.duration() >= self.inner.cfg.max_press
        };
        if over {
            self.release()?;
        }
        Ok(())
    }

    /// The user lets go: the clip ends with the audio given so far.
    pub fn release(&self) -> Result<ClipId, SdkError> {
        let Some(p) = lock(&self.inner.talk).take() else {
            return Err(SdkError::Talk("no press is held".into()));
        };
        let (packets, granule) = p.enc.finish().map_err(|e| SdkError::Audio(e.to_string()))?;
        let _ = p.tx.send(Spoken::End { packets, granule });
        Ok(p.id)
    }

    /// Clips waiting in the outbox.
    pub fn pending(&self) -> usize {
        lock(&self.inner.outbox).len()
    }

    /// This user's data use as the relay counted it (UDP payload bytes
    /// both ways, per UTC day, oldest first) over the last `days` days (1:
    /// today; 0: every day the relay keeps). Needs a connection.
    pub async fn usage(&self, days: u64) -> Result<codec::wire::Usage, SdkError> {
        let client = lock(&self.inner.client).clone();
        let Some(client) = client else {
            return Err(SdkError::Offline("not connected to the relay".into()));
        };
        client
            .usage(days)
            .await
            .map_err(|e| SdkError::Offline(e.to_string()))
    }

    /// Tells the relay where this device can be woken (APNs or FCM, the
    /// provider's token for it, and for APNs the PushToTalk topic
    /// `<bundle id>.voip-ptt`): when a clip starts for this user while it
    /// has no connected session, the relay pushes to it. Kept in the data
    /// dir and sent again on every connection (call again with a new
    /// token). Returns the relay's answer; offline, the registration goes
    /// with the next connection and this says so.
    pub async fn register_push(
        &self,
        provider: codec::wire::PushProvider,
        token: &str,
        topic: &str,
    ) -> Result<codec::wire::PushResult, SdkError> {
        let dir = &self.inner.cfg.data_dir;
        let r = codec::wire::PushRegister {
            provider,
            device_id: crate::push::device_id(dir).map_err(|e| SdkError::Storage(e.to_string()))?,
            token: token.to_owned(),
            topic: topic.to_owned(),
        };
        crate::push::save(dir, &r).map_err(|e| SdkError::Storage(e.to_string()))?;
        let client = lock(&self.inner.client).clone();
        let Some(client) = client else {
            return Err(SdkError::Offline(
                "kept: the registration goes with the next connection".into(),
            ));
        };
        client
            .register_push(r)
            .await
            .map_err(|e| SdkError::Offline(e.to_string()))
    }

    /// The app goes to the background: what is in the outbox is sent (for
    /// at most `Config::sleep_drain`), then the connection closes, cleanly
    /// (acks sent reach the relay), and nothing more goes on the wire (no
    /// keep-alives, no reconnects) until [`Sdk::wake`]. Clips for this user
    /// wait in the relay, which pushes the device (`register_push`) when
    /// one starts. Returns once the connection is closed.
    pub async fn sleep(&self) {
        let slept = self.inner.slept.notified();
        tokio::pin!(slept);
        slept.as_mut().enable();
        self.inner.asleep.store(true, Ordering::SeqCst);
        self.inner.sleep_asked.notify_one();
        // Offline, the driver waits out a backoff: it sleeps now instead of
        // trying once more.
        self.inner.wake.notify_one();
        let connected = lock(&self.inner.client).is_some();
        if connected {
            let _ =
                tokio::time::timeout(self.inner.cfg.sleep_drain + Duration::from_secs(3), slept)
                    .await;
        }
    }

    /// A push arrived, or the app came to the foreground: connects at once
    /// (in 0-RTT when it holds a ticket from the last connection), takes
    /// the clips stored meanwhile and joins a live one still being spoken.
    pub fn wake(&self) {
        wake_up(&self.inner);
    }

    /// A new token (after [`Status::SignedOut`], or ahead of expiry: used
    /// from the next connection).
    pub fn set_token(&self, token: &str) {
        *lock(&self.inner.token) = token.to_owned();
        self.inner.wake.notify_one();
    }

    /// The phone moved to another network (Wi-Fi to cellular): the
    /// connection moves to a new local socket at once instead of waiting
    /// for the old path to time out. QUIC keeps it alive across the new
    /// address; nothing in flight is lost.
    pub fn network_changed(&self) -> Result<(), SdkError> {
        let ep = lock(&self.inner.endpoint).clone();
        let Some(ep) = ep else { return Ok(()) };
        let family = ep
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)));
        let sock = crate::net::client_socket(family)
            .map_err(|e| SdkError::Setup(format!("new socket: {e}")))?;
        ep.rebind(sock)
            .map_err(|e| SdkError::Setup(format!("rebinding: {e}")))
    }

    /// Leaves: acks already sent reach the relay, the connection closes,
    /// the driver stops. The outbox keeps what was not sent.
    pub async fn stop(&self) {
        let done = self.inner.stopped.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        self.inner.woken.notify_one();
        let client = lock(&self.inner.client).clone();
        if let Some(c) = client {
            c.shutdown().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
    }
}

/// The connection loop: connect, serve, and on any loss wait and connect
/// again, to the relay the failover rule names ([`crate::failover`]).
async fn drive(inner: Arc<Inner>, relays: Vec<String>) {
    let rule = codec::retry::Backoff {
        min: inner.cfg.reconnect_min,
        max: inner.cfg.reconnect_max,
    };
    let mut relays = Relays::new(relays, rule, inner.cfg.failover_after);
    while !inner.stopping.load(Ordering::SeqCst) {
        if inner.asleep.load(Ordering::SeqCst) {
            // Nothing on the wire until `wake` (or a press, or a clip).
            inner.slept.notify_waiters();
            inner.listener.status(Status::Asleep);
            while inner.asleep.load(Ordering::SeqCst) && !inner.stopping.load(Ordering::SeqCst) {
                inner.woken.notified().await;
            }
            relays.start_over();
            continue;
        }
        inner.listener.status(Status::Connecting);
        let mut attempt = connect(&inner, relays.current(), attempt_limit(&inner, &relays)).await;
        let wait = loop {
            let (client, events) = match attempt {
                Ok(c) => c,
                Err(e) => {
                    if refused_token(&inner, &e).await {
                        break None;
                    }
                    let next = relays.lost_by(&e, rand::random());
                    inner.listener.status(Status::Offline {
                        why: e.to_string(),
                        retry_in_ms: next.wait.as_millis() as u64,
                    });
                    break Some(next.wait);
                }
            };
            relays.connected(Instant::now(), rand::random());
            inner.listener.status(Status::Connected {
                user: client.user().to_owned(),
            });
            *lock(&inner.client) = Some(client.clone());
            let end = serve(&inner, &client, events, &mut relays).await;
            *lock(&inner.client) = None;
            let replaced = client
                .connection()
                .close_reason()
                .and_then(|r| quic::close_reason(&r))
                .filter(|(code, _)| *code == ErrorCode::SessionReplaced);
            if let Some((_, reason)) = replaced {
                client.close();
                // The user signed in on another device: coming back
                // would push that one out, and so on forever.
                inner.listener.status(Status::SignedOut { why: reason });
                inner.wake.notified().await;
                break None;
            }
            match end {
                Served::Home(next) => {
                    // Home answered while this one still served: the
                    // acks sent here reach this relay, then it is left.
                    client.shutdown().await;
                    relays.home_answered(Instant::now(), rand::random());
                    attempt = Ok(next);
                }
                Served::Ended(why) => {
                    client.close();
                    let hint = match why {
                        Lost::GoingAway { hint } => hint,
                        _ => Duration::ZERO,
                    };
                    break Some(relays.lost(why, hint, rand::random()).wait);
                }
            }
        };
        let Some(wait) = wait else { continue };
        if inner.stopping.load(Ordering::SeqCst) {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = inner.wake.notified() => {}
        }
    }
    inner.stopped.notify_waiters();
}

/// A connection refused for its token: a fresh one from the app, or
/// signed out until `set_token`; true once the next connection may go (at
/// once). False: not a token refusal.
async fn refused_token(inner: &Inner, e: &ClientError) -> bool {
    let refused = matches!(
        e,
        ClientError::Closed { code, .. }
            if matches!(code, ErrorCode::TokenExpired | ErrorCode::TokenInvalid)
    );
    if !refused {
        return false;
    }
    let listener = inner.listener.clone();
    let fresh = tokio::task::spawn_blocking(move || listener.fresh_token())
        .await
        .ok()
        .flatten();
    match fresh {
        Some(t) => *lock(&inner.token) = t,
        None => {
            inner
                .listener
                .status(Status::SignedOut { why: e.to_string() });
            // Wait for `set_token` (or stop).
            inner.wake.notified().await;
        }
    }
    true
}

/// How long one connection attempt may take: `connect_timeout`, or less
/// when there is another relay to try (the failover rule's limit).
fn attempt_limit(inner: &Inner, relays: &Relays) -> Duration {
    let own = inner.cfg.connect_timeout;
    relays.attempt_limit().map_or(own, |l| l.min(own))
}

/// Connects and signs in to `relay` within the attempt limit.
async fn connect(inner: &Inner, relay: &str, limit: Duration) -> Result<Connected, ClientError> {
    let (addr, name) = crate::net::resolve(relay)
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let ep = {
        let mut ep = lock(&inner.endpoint);
        match &*ep {
            Some(e) => e.clone(),
            None => {
                let e = crate::net::endpoint_with(addr, &inner.cfg.ca_pem, &inner.cfg.transport)
                    .map_err(|e| ClientError::Connect(e.to_string()))?;
                *ep = Some(e.clone());
                e
            }
        }
    };
    // Each relay of the list has its own client config, so its resumption
    // tickets are its own: a move to a relay this app was connected to
    // before resumes in 0-RTT, even where the relays share a name (rustls
    // keeps tickets by name).
    let config = {
        let mut tls = lock(&inner.tls);
        match tls.get(relay) {
            Some(c) => c.clone(),
            None => {
                let c = crate::net::client_config_with(&inner.cfg.ca_pem, &inner.cfg.transport)
                    .map_err(|e| ClientError::Connect(e.to_string()))?;
                tls.insert(relay.to_owned(), c.clone());
                c
            }
        }
    };
    let token = lock(&inner.token).clone();
    let seen = lock(&inner.inbox).seen();
    let opts = ClientOptions {
        seen: Some(seen),
        in_order: true,
        // Live clips are decoded for the speaker as they come.
        packet_events: true,
        ..ClientOptions::default()
    };
    let attempt = async {
        let connecting = Client::begin_with(&ep, Some(config), addr, &name, &token).await?;
        // A press held while offline starts its upload now, right behind
        // `Auth`: with 0-RTT its first audio rides with the handshake.
        let held = lock(&inner.talk).as_mut().and_then(|p| {
            let h = p.handoff.take()?;
            Some((p.id, p.target.clone(), p.enc.format(), h))
        });
        if let Some((id, target, format, handoff)) = held
            && let Ok(up) = connecting.upload(id, target, format).await
        {
            let _ = handoff.send(up);
        }
        connecting.finish(opts).await
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| ClientError::Connect(format!("{relay}: no answer within {limit:?}")))?
}

/// How serving a connection ended.
enum Served {
    /// The connection ended (or was given up): why.
    Ended(Lost),
    /// Home answered a try while this connection served: go there.
    Home(Connected),
}

/// Serves one connection until it ends. With several relays it also
/// watches that the relay answers (within half of `failover_after`), and
/// away from home tries home when due ([`failover::watch`]).
async fn serve(
    inner: &Arc<Inner>,
    client: &Arc<Client>,
    mut events: mpsc::Receiver<Event>,
    relays: &mut Relays,
) -> Served {
    let sender = tokio::spawn(send_outbox(inner.clone(), client.clone()));
    // The push registration kept, again on every connection.
    if let Some(r) = crate::push::load(&inner.cfg.data_dir) {
        let client = client.clone();
        tokio::spawn(async move { client.register_push(r).await });
    }
    let limit = attempt_limit(inner, relays);
    let watch = failover::watch(
        client.connection(),
        relays,
        || leaving_cuts_nothing(inner),
        |home| async move { connect(inner, &home, limit).await.ok() },
    );
    tokio::pin!(watch);
    let mut end = Lost::Closed;
    let mut hearing = Hearing::default();
    loop {
        let ev = tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => ev,
                None => {
                    if !matches!(end, Lost::GoingAway { .. }) {
                        end = closed_by(client);
                    }
                    break;
                }
            },
            () = wait_asleep(inner) => {
                drain_then_leave(inner, client).await;
                break;
            }
            w = &mut watch => match w {
                Watched::Silent => {
                    // Gone quiet: given up, for the next relay.
                    client.close();
                    end = Lost::Unanswered;
                    break;
                }
                Watched::Home(next) => {
                    sender.abort();
                    return Served::Home(next);
                }
            },
        };
        hearing.event(inner, &ev);
        match ev {
            Event::Complete(c) => keep(inner, client, &c).await,
            Event::Expired(x) => {
                let listener = inner.listener.clone();
                let id = x.clip_id;
                let told = tokio::task::spawn_blocking(move || {
                    listener.talk(TalkEvent::Expired {
                        id: x.clip_id,
                        sender: x.sender,
                        target: x.target,
                        created_ms: x.created_ms,
                        also: x.also,
                    })
                })
                .await;
                if told.is_ok() {
                    let _ = client.ack(id).await;
                }
            }
            Event::GoAway { retry_after_ms, .. } => {
                // Clips being sent may finish; the relay closes soon.
                end = Lost::GoingAway {
                    hint: Duration::from_millis(retry_after_ms),
                };
            }
            _ => {}
        }
        if inner.stopping.load(Ordering::SeqCst) {
            break;
        }
    }
    sender.abort();
    Served::Ended(end)
}

/// Why a connection ended, from its close reason: the relay stopped
/// answering (QUIC's idle timeout), or it ended it (a close, a reset).
fn closed_by(client: &Client) -> Lost {
    match client.connection().close_reason() {
        Some(quinn::ConnectionError::TimedOut) => Lost::Unanswered,
        _ => Lost::Closed,
    }
}

/// Whether leaving this relay now cuts nothing: no press held, the
/// outbox empty.
fn leaving_cuts_nothing(inner: &Inner) -> bool {
    lock(&inner.talk).is_none() && lock(&inner.outbox).is_empty()
}

/// Resolves once [`Sdk::sleep`] asked for sleep.
async fn wait_asleep(inner: &Inner) {
    while !inner.asleep.load(Ordering::SeqCst) {
        inner.sleep_asked.notified().await;
    }
}

/// Ends a sleep (a wake, a press, a clip to send): the driver connects.
fn wake_up(inner: &Inner) {
    inner.asleep.store(false, Ordering::SeqCst);
    inner.woken.notify_one();
}

/// Going to sleep: lets the outbox empty (at most `sleep_drain`), then
/// leaves cleanly (the control stream finished, acks applied, the relay's
/// close awaited).
async fn drain_then_leave(inner: &Inner, client: &Client) {
    let deadline = tokio::time::Instant::now() + inner.cfg.sleep_drain;
    while !lock(&inner.outbox).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.shutdown().await;
}

/// Hands a clip to the app; acks it once the app kept it and its id is on
/// disk, so a redelivery after a crash is dropped.
async fn keep(inner: &Arc<Inner>, client: &Client, c: &ReceivedClip) {
    let clip = IncomingClip::from_received(c);
    let id = clip.id;
    let listener = inner.listener.clone();
    let kept = tokio::task::spawn_blocking(move || listener.clip(clip))
        .await
        .unwrap_or(false);
    if !kept {
        // Not acked: the relay delivers it again on the next connection.
        lock(&inner.inbox).seen().forget(&id);
        return;
    }
    let stored = lock(&inner.inbox).keep(id);
    if stored.is_ok() {
        let _ = client.ack(id).await;
    }
}

/// Sends one press live while it is held, then settles it: accepted;
/// refused (busy, pre-empted, a limit: reported, not retried); or, when it
/// could not go live whole (offline, connection lost), kept in the outbox
/// as a recording with the same clip id, so the relay delivers it once
/// whichever copy reaches it.
async fn talk_task(
    inner: Arc<Inner>,
    id: ClipId,
    target: Target,
    format: AudioFormat,
    mut rx: mpsc::UnboundedReceiver<Spoken>,
    handed: tokio::sync::oneshot::Receiver<LiveUpload>,
) {
    // Everything said so far: sent again when the press goes live late,
    // kept in the outbox when it never does.
    let mut said: Vec<Bytes> = Vec::new();
    let mut live = Live {
        upload: None,
        handed: Some(handed),
    };
    live.go_on(&inner, id, &target, format, &said).await;
    // The relay's answer when it came before the end.
    let mut early: Option<Result<bool, ClientError>> = None;
    let granule = loop {
        let msg = match live.upload.as_mut() {
            Some(u) if early.is_none() => tokio::select! {
                m = rx.recv() => m,
                a = u.answer() => {
                    refused_early(&inner, id, &a);
                    early = Some(a);
                    continue;
                }
            },
            Some(_) => rx.recv().await,
            // Offline: the reconnect may hand over the upload it started.
            None => {
                let got = tokio::select! {
                    m = rx.recv() => Ok(m),
                    Some(u) = handed_over(&mut live.handed) => Err(u),
                };
                match got {
                    Ok(m) => m,
                    Err(u) => {
                        live.take(&inner, id, u, &said).await;
                        continue;
                    }
                }
            }
        };
        // Offline at the press: the connection may be back by now.
        live.go_on(&inner, id, &target, format, &said).await;
        let (packets, end) = match msg {
            Some(Spoken::Packets(p)) => (p, None),
            Some(Spoken::End { packets, granule }) => (packets, Some(granule)),
            // The SDK is gone while the press was held.
            None => {
                if let Some(u) = live.upload.as_mut() {
                    u.abort();
                }
                return;
            }
        };
        if early.is_none()
            && let Some(u) = live.upload.as_mut()
        {
            // A failed write means the stream is gone: the answer (or its
            // absence) settles the clip at the end.
            let _ = u.send(&packets).await;
        }
        said.extend(packets);
        if let Some(g) = end {
            break g;
        }
    };
    let outcome = match (early, live.upload.as_mut()) {
        (Some(a), _) => Some(a),
        (None, Some(u)) => {
            let _ = u.finish(granule).await;
            Some(u.answer().await)
        }
        (None, None) => None,
    };
    match outcome {
        Some(Ok(duplicate)) => inner.listener.sent(id, Sent::Accepted { duplicate }),
        Some(Err(e @ ClientError::Rejected { .. })) if !e.is_retryable() => {
            if let ClientError::Rejected { code, reason, .. } = e {
                inner.listener.sent(id, Sent::Refused { code, reason });
            }
        }
        // Offline at the press, or the link (or the relay's room) failed
        // while talking: the recording goes out from the outbox.
        _ => {
            let mut file = OggOpus::new(format, said);
            file.final_granule = granule;
            let kept = lock(&inner.outbox).put(id, &target, &file.to_vec(rand::random()));
            match kept {
                Ok(()) => inner.wake.notify_one(),
                Err(e) => inner.listener.sent(
                    id,
                    Sent::Refused {
                        code: ErrorCode::StorageFull,
                        reason: format!("not sent live, and the outbox cannot keep it: {e}"),
                    },
                ),
            }
        }
    }
}

/// How a press reaches the relay while it is held.
struct Live {
    /// Its upload, once it is live.
    upload: Option<LiveUpload>,
    /// Made offline: the upload the next connection starts for it, right
    /// behind `Auth` (None once live, or once none can come).
    handed: Option<tokio::sync::oneshot::Receiver<LiveUpload>>,
}

impl Live {
    /// Not live yet: takes the upload a reconnect handed over, or starts
    /// one if the SDK is connected again.
    async fn go_on(
        &mut self,
        inner: &Inner,
        id: ClipId,
        target: &Target,
        format: AudioFormat,
        said: &[Bytes],
    ) {
        if self.upload.is_some() {
            return;
        }
        let mut up = self.handed.as_mut().and_then(|r| r.try_recv().ok());
        if up.is_none() {
            let client = lock(&inner.client).clone();
            if let Some(c) = client {
                up = c.start_upload(id, target.clone(), format).await.ok();
            }
        }
        if let Some(u) = up {
            self.take(inner, id, u, said).await;
        }
    }

    /// The press is live on `u`, which gets what was said so far; a later
    /// reconnect must not start its upload again.
    async fn take(&mut self, inner: &Inner, id: ClipId, mut u: LiveUpload, said: &[Bytes]) {
        if let Some(p) = lock(&inner.talk).as_mut()
            && p.id == id
        {
            p.handoff = None;
        }
        self.handed = None;
        if !said.is_empty() {
            let _ = u.send(said).await;
        }
        self.upload = Some(u);
    }
}

/// The upload a reconnect hands over, if one comes (pending while none
/// can).
async fn handed_over(
    handed: &mut Option<tokio::sync::oneshot::Receiver<LiveUpload>>,
) -> Option<LiveUpload> {
    let Some(r) = handed.as_mut() else {
        return std::future::pending().await;
    };
    let got = r.await.ok();
    *handed = None;
    got
}

/// Tells the app at once when the relay refused its press while talking.
fn refused_early(inner: &Inner, id: ClipId, answer: &Result<bool, ClientError>) {
    let Err(ClientError::Rejected { code, reason, .. }) = answer else {
        return;
    };
    match code {
        ErrorCode::FloorBusy => {
            // "busy: HOLDER holds the floor of CHANNEL"
            let holder = reason
                .strip_prefix("busy: ")
                .and_then(|r| r.split(" holds the floor").next())
                .unwrap_or(reason)
                .to_owned();
            inner.listener.talk(TalkEvent::Busy { id, holder });
        }
        ErrorCode::Preempted => inner.listener.talk(TalkEvent::Preempted { id }),
        _ => {}
    }
}

/// Others' live talk, decoded for the speaker as it arrives.
#[derive(Default)]
struct Hearing {
    /// Live clips being heard: their decoder and channel.
    live: std::collections::HashMap<ClipId, (Decoder, Option<String>)>,
}

impl Hearing {
    fn event(&mut self, inner: &Inner, ev: &Event) {
        let l = &inner.listener;
        match ev {
            Event::Started { delivery, .. } if delivery.live => {
                let Ok(dec) = Decoder::new(&delivery.format) else {
                    return;
                };
                let channel = match &delivery.target {
                    Target::Channel(c) => Some(c.clone()),
                    _ => None,
                };
                self.live.insert(delivery.clip_id, (dec, channel));
                l.talk(TalkEvent::Started {
                    id: delivery.clip_id,
                    sender: delivery.sender.clone(),
                    target: delivery.target.clone(),
                });
            }
            Event::Packets { id, packets, .. } => {
                let Some((dec, _)) = self.live.get_mut(id) else {
                    return;
                };
                let mut pcm = Vec::new();
                for p in packets {
                    // A packet that does not decode is concealed.
                    match dec.decode_i16(Some(p)) {
                        Ok(s) => pcm.extend(s),
                        Err(_) => pcm.extend(dec.decode_i16(None).unwrap_or_default()),
                    }
                }
                if !pcm.is_empty() {
                    l.talk(TalkEvent::Audio { id: *id, pcm });
                }
            }
            Event::Complete(c) => self.ended(inner, c.id(), TalkEvent::Complete { id: c.id() }),
            Event::Cut { id, code } => {
                let why = match code {
                    ErrorCode::Preempted => "a priority talker took over".to_owned(),
                    ErrorCode::CutOff => "the sender stopped or lost its connection".to_owned(),
                    other => format!("the relay refused it ({})", other.name()),
                };
                self.ended(inner, *id, TalkEvent::CutOff { id: *id, why });
            }
            Event::Redelivered { id } => {
                self.live.remove(id);
            }
            _ => {}
        }
    }

    /// A live clip being heard ended (`how`); its channel's floor is free.
    fn ended(&mut self, inner: &Inner, id: ClipId, how: TalkEvent) {
        if let Some((_, channel)) = self.live.remove(&id) {
            inner.listener.talk(how);
            if let Some(channel) = channel {
                inner.listener.talk(TalkEvent::FloorFree { channel });
            }
        }
    }
}

/// Sends the outbox's clips, oldest first, whenever there are any. A clip
/// refused for now (the protocol's retryable codes: the relay busy, the
/// upload behind real time on a poor link, ...) stays and goes again after
/// the relay's hint or the shared backoff.
async fn send_outbox(inner: Arc<Inner>, client: Arc<Client>) {
    let mut retries = codec::retry::Backoff {
        min: inner.cfg.reconnect_min,
        max: inner.cfg.reconnect_max,
    }
    .attempts();
    loop {
        let entries = lock(&inner.outbox).entries().unwrap_or_default();
        for e in entries {
            let Ok(file) = OggOpus::read(&e.ogg) else {
                lock(&inner.outbox).set_aside(&e.id);
                continue;
            };
            let mut clip = OutgoingClip::from_ogg(&file, e.target.clone());
            clip.id = e.id;
            match client.send_clip(&clip, Pacing::Upload).await {
                Ok(o) => {
                    retries.reset();
                    lock(&inner.outbox).remove(&e.id);
                    inner.listener.sent(
                        e.id,
                        Sent::Accepted {
                            duplicate: o.duplicate,
                        },
                    );
                }
                Err(err) if err.is_retryable() => {
                    // The connection is failing or the relay is busy: the
                    // clip stays; a later connection (or wake) sends it.
                    let hint = match &err {
                        ClientError::Rejected { retry_after_ms, .. } => *retry_after_ms,
                        _ => 0,
                    };
                    let pause = retries.next_after(Duration::from_millis(hint), rand::random());
                    tokio::time::sleep(pause).await;
                    break;
                }
                Err(ClientError::Rejected { code, reason, .. }) => {
                    lock(&inner.outbox).set_aside(&e.id);
                    inner.listener.sent(e.id, Sent::Refused { code, reason });
                }
                Err(_) => return,
            }
        }
        if lock(&inner.outbox).is_empty() {
            inner.wake.notified().await;
        }
    }
}
