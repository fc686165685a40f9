//! The interface the Kotlin, Swift and Python bindings are generated from
//! (uniffi, proc-macro): [`PttClient`] over [`crate::sdk::Sdk`], with its
//! own tokio runtime, and the app's [`ClipListener`] for events. Async
//! calls become coroutines (Kotlin), async/await (Swift) and asyncio
//! (Python).

use std::path::PathBuf;
use std::sync::Arc;

use codec::wire::{ClipId, Target};

use crate::sdk::{self, Sdk, SdkError};

/// What the client needs to run.
#[derive(uniffi::Record)]
pub struct ClientConfig {
    /// The relay, `HOST:PORT`.
    pub relay: String,
    /// PEM file of the relay's certificate (or its CA).
    pub ca_pem: String,
    /// App-private directory that survives restarts: the outbox and the
    /// inbox's ids live here.
    pub data_dir: String,
    /// The access token to sign in with.
    pub token: String,
    /// The microphone's sample rate for `pcm` (mono; 8, 16, 24, 32, 44.1
    /// or 48 kHz).
    #[uniffi(default = 48000)]
    pub mic_rate: u32,
    /// Opus frame length of live talk, ms: 20 (10, 40 or 60).
    #[uniffi(default = 20)]
    pub frame_ms: u32,
    /// Longest the relay may delay its ACKs of what this client sends, ms
    /// (1..=200; it asks for at most the path's RTT). Longer spends fewer
    /// bytes per second of voice; a clip's lost last packet is resent later.
    #[uniffi(default = 25)]
    pub ack_delay_ms: u32,
    /// Several relays of one service, `HOST:PORT` each, the home relay
    /// first (empty: `relay` alone; when set, `relay` is empty or the
    /// first of them). The client moves to the next when one stops
    /// answering and comes back home when home answers again.
    #[uniffi(default)]
    pub relays: Vec<String>,
    /// With several relays: how soon one that stopped answering is left
    /// for the next, ms (3000).
    #[uniffi(default = 3000)]
    pub failover_after_ms: u32,
}

/// Whom a clip is for.
#[derive(uniffi::Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// One person, by user id.
    User,
    /// Every member of a talk channel.
    Channel,
}

fn target(kind: TargetKind, name: String) -> Target {
    match kind {
        TargetKind::User => Target::User(name),
        TargetKind::Channel => Target::Channel(name),
    }
}

/// Who wakes this device (`register_push`).
#[derive(uniffi::Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushKind {
    /// Apple Push Notification service: iOS PushToTalk (`pushtotalk`
    /// pushes to the `<bundle id>.voip-ptt` topic).
    Apns,
    /// Firebase Cloud Messaging: Android high-priority data messages.
    Fcm,
}

/// The relay's answer to a push registration.
#[derive(uniffi::Record, Debug, Clone, PartialEq, Eq)]
pub struct PushAnswer {
    /// Kept by the relay.
    pub kept: bool,
    /// Devices the user has registered now.
    pub devices: u32,
    /// What the relay said (why not kept, or a note such as a dropped
    /// oldest device).
    pub reason: String,
}

/// One UTC day of this user's data use, as the relay counted it.
#[derive(uniffi::Record, Debug, Clone, PartialEq, Eq)]
pub struct DataUse {
    /// The day's start, Unix ms (UTC midnight).
    pub day_start_ms: u64,
    /// UDP payload bytes sent to the relay.
    pub bytes_up: u64,
    /// UDP payload bytes received from the relay.
    pub bytes_down: u64,
}

/// A clip received whole.
#[derive(uniffi::Record)]
pub struct Clip {
    /// Clip id, 32 hex digits.
    pub id: String,
    pub sender: String,
    pub target_kind: TargetKind,
    /// This user's id, or the channel's name.
    pub target: String,
    /// When the relay accepted it, Unix ms.
    pub created_ms: u64,
    /// Relayed while the sender talked (else from the relay's store).
    pub live: bool,
    pub duration_ms: u64,
    /// The clip as an Ogg Opus file.
    pub ogg: Vec<u8>,
}

/// Where the link to the relay stands.
#[derive(uniffi::Enum, Debug)]
pub enum LinkStatus {
    Connecting,
    Connected {
        user: String,
    },
    Offline {
        why: String,
        retry_in_ms: u64,
    },
    /// The token was refused and `fresh_token` gave none: call
    /// `set_token`.
    SignedOut {
        why: String,
    },
    /// `sleep` was called: no connection, nothing on the wire, until `wake`
    /// (or a press, or a clip to send).
    Asleep,
}

/// The relay's final answer to a clip from the outbox.
#[derive(uniffi::Enum, Debug)]
pub enum SendResult {
    /// Stored by the relay; `duplicate` when an earlier try had already
    /// reached it (nobody gets it twice).
    Accepted { duplicate: bool },
    /// Refused for good; `code` is the protocol's error name
    /// (`unknown_recipient`, `forbidden`, ...).
    Refused { code: String, reason: String },
}

/// Live talk as it happens: others' talk as it is heard (decoded), and
/// what became of this user's own press.
#[derive(uniffi::Enum, Debug)]
pub enum Talk {
    /// Someone started talking to this user, or in one of its channels.
    Started {
        clip_id: String,
        sender: String,
        target_kind: TargetKind,
        target: String,
    },
    /// Decoded audio of a live clip: 48 kHz mono 16-bit samples for the
    /// speaker, as they arrive.
    Audio { clip_id: String, pcm: Vec<i16> },
    /// The live clip ended whole.
    Complete { clip_id: String },
    /// The live clip was cut off before its end; `why` in words.
    CutOff { clip_id: String, why: String },
    /// A channel's floor is free again.
    FloorFree { channel: String },
    /// This user's press was refused: `holder` is talking.
    Busy { clip_id: String, holder: String },
    /// This user's press was ended by a priority talker.
    Preempted { clip_id: String },
    /// A clip for this user will never arrive: the relay dropped it unheard
    /// (older than its clip TTL), and `also` older ones with it.
    Expired {
        clip_id: String,
        sender: String,
        target_kind: TargetKind,
        target: String,
        created_ms: u64,
        also: u64,
    },
}

impl From<sdk::TalkEvent> for Talk {
    fn from(e: sdk::TalkEvent) -> Talk {
        use sdk::TalkEvent as T;
        match e {
            T::Started { id, sender, target } => {
                let (target_kind, target) = split(target);
                Talk::Started {
                    clip_id: id.to_string(),
                    sender,
                    target_kind,
                    target,
                }
            }
            T::Audio { id, pcm } => Talk::Audio {
                clip_id: id.to_string(),
                pcm,
            },
            T::Complete { id } => Talk::Complete {
                clip_id: id.to_string(),
            },
            T::CutOff { id, why } => Talk::CutOff {
                clip_id: id.to_string(),
                why,
            },
            T::FloorFree { channel } => Talk::FloorFree { channel },
            T::Busy { id, holder } => Talk::Busy {
                clip_id: id.to_string(),
                holder,
            },
            T::Preempted { id } => Talk::Preempted {
                clip_id: id.to_string(),
            },
            T::Expired {
                id,
                sender,
                target,
                created_ms,
                also,
            } => {
                let (target_kind, target) = split(target);
                Talk::Expired {
                    clip_id: id.to_string(),
                    sender,
                    target_kind,
                    target,
                    created_ms,
                    also,
                }
            }
        }
    }
}

fn split(t: Target) -> (TargetKind, String) {
    match t {
        Target::User(n) => (TargetKind::User, n),
        Target::Channel(n) => (TargetKind::Channel, n),
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum PttError {
    #[error("storage: {msg}")]
    Storage { msg: String },
    #[error("outbox full: {msg}")]
    OutboxFull { msg: String },
    #[error("bad clip: {msg}")]
    BadClip { msg: String },
    #[error("setup: {msg}")]
    Setup { msg: String },
    /// `press` while one is held, `pcm` or `release` with none.
    #[error("talk: {msg}")]
    Talk { msg: String },
    /// The microphone audio could not be encoded.
    #[error("audio: {msg}")]
    Audio { msg: String },
    /// Needs the relay, and there is no connection.
    #[error("offline: {msg}")]
    Offline { msg: String },
}

impl From<SdkError> for PttError {
    fn from(e: SdkError) -> Self {
        let msg = e.to_string();
        match e {
            SdkError::Storage(_) => PttError::Storage { msg },
            SdkError::OutboxFull(_) => PttError::OutboxFull { msg },
            SdkError::BadClip(_) => PttError::BadClip { msg },
            SdkError::Setup(_) => PttError::Setup { msg },
            SdkError::Talk(_) => PttError::Talk { msg },
            SdkError::Audio(_) => PttError::Audio { msg },
            SdkError::Offline(_) => PttError::Offline { msg },
        }
    }
}

/// The app's side, implemented in Kotlin, Swift or Python. Called on the
/// SDK's threads: return quickly, hand work to the app's own threads.
#[uniffi::export(with_foreign)]
pub trait ClipListener: Send + Sync {
    /// A clip arrived whole, in order. Return true once it is kept: only
    /// then is it acknowledged (the relay forgets it); false, and it comes
    /// again on the next connection.
    fn on_clip(&self, clip: Clip) -> bool;
    /// The relay answered a clip sent from the outbox (`id` from
    /// `send_file`).
    fn on_sent(&self, id: String, result: SendResult);
    fn on_status(&self, status: LinkStatus);
    /// The token was refused (expired): a fresh one, or None.
    fn fresh_token(&self) -> Option<String>;
    /// Live talk as it happens (decoded audio for the speaker included).
    fn on_talk(&self, event: Talk);
}

struct Bridge(Arc<dyn ClipListener>);

impl sdk::Listener for Bridge {
    fn clip(&self, c: sdk::IncomingClip) -> bool {
        let (target_kind, target) = split(c.target);
        self.0.on_clip(Clip {
            id: c.id.to_string(),
            sender: c.sender,
            target_kind,
            target,
            created_ms: c.created_ms,
            live: c.live,
            duration_ms: c.duration_ms,
            ogg: c.ogg,
        })
    }

    fn sent(&self, id: ClipId, outcome: sdk::Sent) {
        let result = match outcome {
            sdk::Sent::Accepted { duplicate } => SendResult::Accepted { duplicate },
            sdk::Sent::Refused { code, reason } => SendResult::Refused {
                code: code.name().to_owned(),
                reason,
            },
        };
        self.0.on_sent(id.to_string(), result);
    }

    fn status(&self, s: sdk::Status) {
        self.0.on_status(match s {
            sdk::Status::Connecting => LinkStatus::Connecting,
            sdk::Status::Connected { user } => LinkStatus::Connected { user },
            sdk::Status::Offline { why, retry_in_ms } => LinkStatus::Offline { why, retry_in_ms },
            sdk::Status::SignedOut { why } => LinkStatus::SignedOut { why },
            sdk::Status::Asleep => LinkStatus::Asleep,
        });
    }

    fn fresh_token(&self) -> Option<String> {
        self.0.fresh_token()
    }

    fn talk(&self, event: sdk::TalkEvent) {
        self.0.on_talk(event.into());
    }
}

/// One signed-in user's client. It connects at once and stays connected
/// (reconnecting by itself) until `stop`.
#[derive(uniffi::Object)]
pub struct PttClient {
    rt: Option<tokio::runtime::Runtime>,
    sdk: Sdk,
}

impl PttClient {
    fn rt(&self) -> &tokio::runtime::Runtime {
        // Only `drop` takes the runtime.
        self.rt.as_ref().unwrap_or_else(|| unreachable!())
    }
}

#[uniffi::export]
impl PttClient {
    /// Opens the outbox and inbox in `config.data_dir` and starts
    /// connecting; clips an earlier run left in the outbox are sent once
    /// connected.
    #[uniffi::constructor]
    pub fn new(
        config: ClientConfig,
        listener: Arc<dyn ClipListener>,
    ) -> Result<Arc<Self>, PttError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ptt-client")
            .enable_all()
            .build()
            .map_err(|e| PttError::Setup { msg: e.to_string() })?;
        let mut cfg = sdk::Config::new(
            &config.relay,
            PathBuf::from(config.ca_pem),
            PathBuf::from(config.data_dir),
            &config.token,
        );
        cfg.mic_rate = config.mic_rate;
        cfg.relays = config.relays;
        cfg.failover_after =
            std::time::Duration::from_millis(u64::from(config.failover_after_ms.max(100)));
        cfg.frame_ms = config.frame_ms;
        cfg.transport.ack_delay =
            std::time::Duration::from_millis(u64::from(config.ack_delay_ms.clamp(1, 200)));
        let sdk = {
            let _guard = rt.enter();
            Sdk::start(cfg, Arc::new(Bridge(listener)))?
        };
        Ok(Arc::new(PttClient { rt: Some(rt), sdk }))
    }

    /// Keeps a recorded clip (an Ogg Opus file) in the outbox, durably, and
    /// sends it when the relay is reachable. Returns its clip id; the
    /// outcome arrives through `on_sent`.
    pub fn send_file(
        &self,
        kind: TargetKind,
        to: String,
        ogg: Vec<u8>,
    ) -> Result<String, PttError> {
        let _guard = self.rt().enter();
        Ok(self.sdk.send_file(target(kind, to), &ogg)?.to_string())
    }

    /// The talk button is pressed: a live clip to `to` starts. Returns its
    /// clip id; feed `pcm`, end with `release`.
    pub fn press(&self, kind: TargetKind, to: String) -> Result<String, PttError> {
        let _guard = self.rt().enter();
        Ok(self.sdk.press(target(kind, to))?.to_string())
    }

    /// Microphone audio of the press held: mono 16-bit samples at
    /// `mic_rate`, 10 or 20 ms at a time.
    pub fn pcm(&self, samples: Vec<i16>) -> Result<(), PttError> {
        let _guard = self.rt().enter();
        Ok(self.sdk.pcm(&samples)?)
    }

    /// The talk button is let go: the clip ends. Its outcome arrives
    /// through `on_sent` (and `on_talk` for busy or pre-empted).
    pub fn release(&self) -> Result<String, PttError> {
        let _guard = self.rt().enter();
        Ok(self.sdk.release()?.to_string())
    }

    /// Clips waiting in the outbox.
    pub fn pending(&self) -> u32 {
        self.sdk.pending() as u32
    }

    /// A new token, used from the next connection.
    pub fn set_token(&self, token: String) {
        self.sdk.set_token(&token);
    }

    /// Call when the phone changed networks: the connection moves to a new
    /// socket at once.
    pub fn network_changed(&self) -> Result<(), PttError> {
        let _guard = self.rt().enter();
        Ok(self.sdk.network_changed()?)
    }

    /// This user's data use per UTC day over the last `days` days (1:
    /// today; 0: every day the relay keeps), oldest first, as the relay
    /// counted it (so an app can show what push-to-talk cost).
    pub async fn usage(&self, days: u32) -> Result<Vec<DataUse>, PttError> {
        let sdk = self.sdk.clone();
        let u = self
            .rt()
            .spawn(async move { sdk.usage(u64::from(days)).await })
            .await
            .map_err(|e| PttError::Offline { msg: e.to_string() })??;
        Ok(u.days
            .iter()
            .map(|d| DataUse {
                day_start_ms: d.day.saturating_mul(86_400_000),
                bytes_up: d.bytes_up,
                bytes_down: d.bytes_down,
            })
            .collect())
    }

    /// Tells the relay where this device can be woken while the app sleeps
    /// (the token from APNs PushToTalk or FCM; `topic`: APNs
    /// `<bundle id>.voip-ptt`, FCM empty). Kept and sent again on every
    /// connection; offline it fails with `Offline` and goes with the next.
    pub async fn register_push(
        &self,
        kind: PushKind,
        token: String,
        topic: String,
    ) -> Result<PushAnswer, PttError> {
        let sdk = self.sdk.clone();
        let provider = match kind {
            PushKind::Apns => codec::wire::PushProvider::Apns,
            PushKind::Fcm => codec::wire::PushProvider::Fcm,
        };
        let r = self
            .rt()
            .spawn(async move { sdk.register_push(provider, &token, &topic).await })
            .await
            .map_err(|e| PttError::Offline { msg: e.to_string() })??;
        Ok(PushAnswer {
            kept: r.code == codec::ErrorCode::NoError,
            devices: u32::try_from(r.devices).unwrap_or(u32::MAX),
            reason: r.reason,
        })
    }

    /// The app goes to the background: the outbox is sent (bounded), then
    /// the connection closes and nothing goes on the wire until `wake`.
    pub async fn sleep(&self) {
        let sdk = self.sdk.clone();
        let _ = self.rt().spawn(async move { sdk.sleep().await }).await;
    }

    /// A push arrived (or the app is in the foreground again): connect
    /// now, in 0-RTT with a ticket, and take what waits.
    pub fn wake(&self) {
        self.sdk.wake();
    }

    /// Signs out cleanly: acks sent reach the relay, then the connection
    /// closes. Unsent clips stay in the outbox for the next start.
    pub async fn stop(&self) {
        let sdk = self.sdk.clone();
        let _ = self.rt().spawn(async move { sdk.stop().await }).await;
    }
}

impl Drop for PttClient {
    /// Stops the runtime and waits for its tasks to be dropped, so the
    /// app's listener is released here, on the app's thread, and never
    /// from an SDK thread while the app (a Python interpreter, say) is
    /// shutting down.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}
