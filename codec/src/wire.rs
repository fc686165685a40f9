//! Messages of the relay protocol and their byte layout.
//!
//! A message is `type (varint) | length (varint) | body (length bytes)`.
//! `docs/protocol.md` is the normative description; the tests here check the
//! code against the byte examples given there.

use std::fmt;

use bytes::{BufMut, BytesMut};

use crate::code::ErrorCode;
use crate::error::WireError;
use crate::varint::{self, Reader};

/// ALPN protocol id: the protocol name and its major version.
pub const ALPN: &[u8] = b"ptt/1";

/// Largest user id, channel name or reason string, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Largest reason string in `Rejected` / `GoAway`.
pub const MAX_REASON_BYTES: usize = 1024;
/// Default largest message body accepted on any stream (tokens can be long).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

pub mod kind {
    pub const AUTH: u64 = 0x01;
    pub const WELCOME: u64 = 0x02;
    pub const ACK: u64 = 0x03;
    pub const GO_AWAY: u64 = 0x04;
    pub const USAGE_QUERY: u64 = 0x05;
    pub const USAGE: u64 = 0x06;
    pub const EXPIRED: u64 = 0x07;
    pub const PUSH_REGISTER: u64 = 0x08;
    pub const PUSH_UNREGISTER: u64 = 0x09;
    pub const PUSH_RESULT: u64 = 0x0a;
    pub const ACK_POLICY: u64 = 0x0b;
    pub const CLIP_HEADER: u64 = 0x10;
    pub const ACCEPTED: u64 = 0x11;
    pub const REJECTED: u64 = 0x12;
    pub const DELIVERY: u64 = 0x20;
}

/// A clip id: 128 random bits chosen by the sending client, so that a retry
/// of the same clip carries the same id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClipId(pub [u8; 16]);

impl ClipId {
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ClipId(out))
    }
}

impl fmt::Display for ClipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ClipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClipId({self})")
    }
}

/// Who a clip is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// One user, by the user id in their token's `sub`.
    User(String),
    /// Every member of a talk channel.
    Channel(String),
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::User(n) | Target::Channel(n) => n,
        }
    }

    fn put(&self, buf: &mut BytesMut) {
        let (k, n) = match self {
            Target::User(n) => (0u8, n),
            Target::Channel(n) => (1u8, n),
        };
        buf.put_u8(k);
        varint::put_str(buf, n);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let k = r.u8()?;
        let name = r.string("target", MAX_NAME_BYTES)?;
        check_name("target", name)?;
        match k {
            0 => Ok(Target::User(name.to_owned())),
            1 => Ok(Target::Channel(name.to_owned())),
            _ => Err(WireError::Invalid {
                field: "target kind",
                why: "not 0 (user) or 1 (channel)",
            }),
        }
    }
}

/// Names (user ids, channels) are 1..=128 bytes of UTF-8 without control
/// characters.
pub fn check_name(field: &'static str, name: &str) -> Result<(), WireError> {
    if name.is_empty() {
        return Err(WireError::Invalid {
            field,
            why: "empty",
        });
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(WireError::FieldTooLong {
            field,
            max: MAX_NAME_BYTES,
        });
    }
    if name.chars().any(char::is_control) {
        return Err(WireError::Invalid {
            field,
            why: "contains control characters",
        });
    }
    Ok(())
}

/// What a decoder needs to play a clip: the OpusHead facts of RFC 7845 §5.1
/// for channel mapping family 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFormat {
    /// 1 (mono) or 2 (stereo).
    pub channels: u8,
    /// Samples at 48 kHz to drop from the start of the decoded audio.
    pub pre_skip: u16,
    /// Sample rate of the original input, for information and playback.
    pub input_rate: u32,
    /// Gain to apply when decoding, Q7.8 dB.
    pub output_gain: i16,
}

impl Default for AudioFormat {
    fn default() -> Self {
        Self {
            channels: 1,
            pre_skip: 312,
            input_rate: 48_000,
            output_gain: 0,
        }
    }
}

/// Codec byte in `AudioFormat`: the only codec this version carries.
pub const CODEC_OPUS: u8 = 0;

impl AudioFormat {
    fn put(&self, buf: &mut BytesMut) {
        buf.put_u8(CODEC_OPUS);
        buf.put_u8(self.channels);
        buf.put_u16(self.pre_skip);
        buf.put_u32(self.input_rate);
        buf.put_i16(self.output_gain);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        if r.u8()? != CODEC_OPUS {
            return Err(WireError::Invalid {
                field: "codec",
                why: "only Opus (0) is supported",
            });
        }
        let channels = r.u8()?;
        if !(1..=2).contains(&channels) {
            return Err(WireError::Invalid {
                field: "channels",
                why: "must be 1 or 2",
            });
        }
        Ok(Self {
            channels,
            pre_skip: u16::from_be_bytes(r.array()?),
            input_rate: u32::from_be_bytes(r.array()?),
            output_gain: i16::from_be_bytes(r.array()?),
        })
    }
}

/// Limits the relay enforces, announced in `Welcome` so a client can stay
/// inside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_clip_ms: u64,
    pub max_clip_bytes: u64,
    pub max_packet_bytes: u64,
    pub max_clip_streams: u64,
    pub upload_idle_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// A JWT (HS256) whose `sub` is the user id.
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The authenticated user id (the token's `sub`).
    pub user: String,
    /// Relay-chosen id of this session, for logs and support.
    pub session_id: u64,
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    pub code: ErrorCode,
    /// How long to wait before reconnecting, in ms (0: at once).
    pub retry_after_ms: u64,
    pub reason: String,
}

/// Longest push token (`PushRegister`): APNs device tokens are 64 hex
/// digits, FCM registration tokens a few hundred characters.
pub const MAX_PUSH_TOKEN_BYTES: usize = 4096;

/// Who wakes a device when a clip waits for its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushProvider {
    /// Apple Push Notification service (iOS PushToTalk, `pushtotalk`).
    Apns,
    /// Firebase Cloud Messaging (Android, high-priority data messages).
    Fcm,
}

impl PushProvider {
    pub fn to_u64(self) -> u64 {
        match self {
            PushProvider::Apns => 1,
            PushProvider::Fcm => 2,
        }
    }

    pub fn from_u64(v: u64) -> Option<Self> {
        match v {
            1 => Some(PushProvider::Apns),
            2 => Some(PushProvider::Fcm),
            _ => None,
        }
    }

    /// `apns` or `fcm` (settings, metrics labels, CLI).
    pub fn name(self) -> &'static str {
        match self {
            PushProvider::Apns => "apns",
            PushProvider::Fcm => "fcm",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "apns" => Some(PushProvider::Apns),
            "fcm" => Some(PushProvider::Fcm),
            _ => None,
        }
    }
}

/// A device tells the relay where it can be woken (`PushRegister`): the
/// relay pushes to it when a clip starts for its user while the user has
/// no connected session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRegister {
    pub provider: PushProvider,
    /// The app's id of this device (stable across app runs): a new
    /// registration of the same device replaces the old one.
    pub device_id: String,
    /// The provider's token for the device (APNs device token, FCM
    /// registration token).
    pub token: String,
    /// APNs: the push topic, `<bundle id>.voip-ptt`; FCM: empty (or the
    /// app's package name, kept for the operator).
    pub topic: String,
}

/// The relay's answer to `PushRegister` and `PushUnregister`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushResult {
    pub device_id: String,
    /// `no_error`: kept (or removed); otherwise why not (`not_allowed`:
    /// the relay sends no pushes for this provider; `protocol_violation`:
    /// a malformed registration).
    pub code: ErrorCode,
    /// Devices the user has registered now.
    pub devices: u64,
    pub reason: String,
}

/// A client asks for its own data use (`UsageQuery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageQuery {
    /// How many days, counting back from today (UTC): 1 is today only; 0
    /// (or more than the relay keeps) is every day the relay keeps.
    pub days: u64,
}

/// One UTC day of a user's data use, as the relay counted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayUsage {
    /// Days since 1970-01-01 (UTC).
    pub day: u64,
    /// UDP payload bytes the relay received from the user's connections.
    pub bytes_up: u64,
    /// UDP payload bytes the relay sent to the user's connections.
    pub bytes_down: u64,
}

/// The relay's answer to `UsageQuery`: the asking user's figures only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The relay's current day (days since 1970-01-01, UTC).
    pub today: u64,
    /// Days with traffic, oldest first.
    pub days: Vec<DayUsage>,
}

/// Most days a `Usage` answer holds: even with every number at its
/// largest, it fits the default message limit every client accepts.
pub const MAX_USAGE_DAYS: u64 = 2000;

impl Usage {
    /// Bytes up and down over all its days.
    pub fn totals(&self) -> (u64, u64) {
        self.days
            .iter()
            .fold((0, 0), |(u, d), x| (u + x.bytes_up, d + x.bytes_down))
    }
}

/// The UTC day (days since 1970-01-01) of Unix time `ms`.
pub fn day_of(ms: u64) -> u64 {
    ms / 86_400_000
}

/// `day` (days since 1970-01-01, UTC) as `YYYY-MM-DD`.
pub fn date(day: u64) -> String {
    let secs = i64::try_from(day.saturating_mul(86_400)).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| format!("day {day}"))
}

/// The relay dropped its copy of a clip for this user without an ack:
/// the clip was older than the relay's `clip_ttl`. The client acks it
/// with `Ack(clip_id)` once the app was told, as it acks a clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub clip_id: ClipId,
    /// The sender's user id, from its token.
    pub sender: String,
    /// As the sender addressed it (this user, or a channel).
    pub target: Target,
    /// When the relay received the clip header, Unix time in ms.
    pub created_ms: u64,
    /// How many more of this user's copies, older than this one, expired
    /// and are not itemized (the relay keeps a bounded list per user).
    pub also: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipHeader {
    pub clip_id: ClipId,
    pub target: Target,
    pub format: AudioFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub clip_id: ClipId,
    /// True when the relay already had this clip (a retry): nothing new was
    /// delivered.
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub clip_id: ClipId,
    pub code: ErrorCode,
    /// When non-zero, the earliest time to retry, in ms.
    pub retry_after_ms: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub clip_id: ClipId,
    /// The sender's user id (from its token, never from the client).
    pub sender: String,
    pub target: Target,
    pub format: AudioFormat,
    /// When the relay received the clip header, Unix time in ms.
    pub created_ms: u64,
    /// True when the clip is being relayed as the sender talks.
    pub live: bool,
}

/// A clip id and its sender's name, as `Delivery` and `Expired` begin.
fn put_id_and_sender(body: &mut BytesMut, id: &ClipId, sender: &str) {
    body.put_slice(&id.0);
    varint::put_str(body, sender);
}

fn read_id_and_sender(r: &mut Reader<'_>) -> Result<(ClipId, String), WireError> {
    let clip_id = ClipId(r.array()?);
    let sender = r.string("sender", MAX_NAME_BYTES)?;
    check_name("sender", sender)?;
    Ok((clip_id, sender.to_owned()))
}

/// How a relay takes acks (`AckPolicy`, sent right after `Welcome`): a
/// client may then put up to `max_ids` clip ids in one `Ack` and hold an
/// ack up to `hold_ms` to gather others with it. A relay that sends none
/// takes one id per `Ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckPolicy {
    pub max_ids: u64,
    pub hold_ms: u64,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Auth(Auth),
    Welcome(Welcome),
    /// An `Ack` of one clip.
    Ack(ClipId),
    /// An `Ack` of several clips (type 0x03 too, its body one id after
    /// another): only to a relay that sent [`AckPolicy`], at most its
    /// `max_ids`. Decoded from a body of two ids or more.
    Acks(Vec<ClipId>),
    AckPolicy(AckPolicy),
    GoAway(GoAway),
    UsageQuery(UsageQuery),
    Usage(Usage),
    Expired(Expired),
    PushRegister(PushRegister),
    /// A device no longer wants pushes (its `device_id`).
    PushUnregister(String),
    PushResult(PushResult),
    ClipHeader(ClipHeader),
    Accepted(Accepted),
    Rejected(Rejected),
    Delivery(Delivery),
    /// A type this version does not know; receivers skip it.
    Unknown(u64),
}

impl Message {
    pub fn kind(&self) -> u64 {
        match self {
            Message::Auth(_) => kind::AUTH,
            Message::Welcome(_) => kind::WELCOME,
            Message::Ack(_) | Message::Acks(_) => kind::ACK,
            Message::AckPolicy(_) => kind::ACK_POLICY,
            Message::GoAway(_) => kind::GO_AWAY,
            Message::UsageQuery(_) => kind::USAGE_QUERY,
            Message::Usage(_) => kind::USAGE,
            Message::Expired(_) => kind::EXPIRED,
            Message::PushRegister(_) => kind::PUSH_REGISTER,
            Message::PushUnregister(_) => kind::PUSH_UNREGISTER,
            Message::PushResult(_) => kind::PUSH_RESULT,
            Message::ClipHeader(_) => kind::CLIP_HEADER,
            Message::Accepted(_) => kind::ACCEPTED,
            Message::Rejected(_) => kind::REJECTED,
            Message::Delivery(_) => kind::DELIVERY,
            Message::Unknown(k) => *k,
        }
    }

    /// Appends the framed message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        // The body is written in place, after room for the type and length
        // (two varints, at most 8 bytes each); they then go right before
        // it and the body moves down to meet them: one buffer, where a
        // body of its own cost an allocation and a copy per message.
        const ROOM: usize = 16;
        let start = buf.len();
        buf.put_bytes(0, ROOM);
        self.put_body(buf);
        let body_len = buf.len() - start - ROOM;
        let head = varint::len(self.kind()) + varint::len(body_len as u64);
        let mut at = &mut buf[start..start + head];
        varint::put(&mut at, self.kind());
        varint::put(&mut at, body_len as u64);
        buf.copy_within(start + ROOM.., start + head);
        buf.truncate(start + head + body_len);
    }

    /// The message's body, appended to `body`.
    fn put_body(&self, body: &mut BytesMut) {
        match self {
            Message::Auth(m) => body.put_slice(m.token.as_bytes()),
            Message::Welcome(m) => {
                varint::put_str(body, &m.user);
                varint::put(body, m.session_id);
                let l = &m.limits;
                for v in [
                    l.max_clip_ms,
                    l.max_clip_bytes,
                    l.max_packet_bytes,
                    l.max_clip_streams,
                    l.upload_idle_ms,
                ] {
                    varint::put(body, v);
                }
            }
            Message::Ack(id) => body.put_slice(&id.0),
            Message::Acks(ids) => {
                for id in ids {
                    body.put_slice(&id.0);
                }
            }
            Message::AckPolicy(p) => {
                varint::put(body, p.max_ids);
                varint::put(body, p.hold_ms);
            }
            Message::GoAway(m) => {
                varint::put(body, m.code.to_u64());
                varint::put(body, m.retry_after_ms);
                varint::put_str(body, &m.reason);
            }
            Message::UsageQuery(m) => varint::put(body, m.days),
            Message::Usage(m) => {
                varint::put(body, m.today);
                varint::put(body, m.days.len() as u64);
                for d in &m.days {
                    varint::put(body, d.day);
                    varint::put(body, d.bytes_up);
                    varint::put(body, d.bytes_down);
                }
            }
            Message::Expired(m) => {
                put_id_and_sender(body, &m.clip_id, &m.sender);
                m.target.put(body);
                varint::put(body, m.created_ms);
                varint::put(body, m.also);
            }
            Message::PushRegister(m) => {
                varint::put(body, m.provider.to_u64());
                varint::put_str(body, &m.device_id);
                varint::put_str(body, &m.token);
                varint::put_str(body, &m.topic);
            }
            Message::PushUnregister(device_id) => varint::put_str(body, device_id),
            Message::PushResult(m) => {
                varint::put_str(body, &m.device_id);
                varint::put(body, m.code.to_u64());
                varint::put(body, m.devices);
                varint::put_str(body, &m.reason);
            }
            Message::ClipHeader(m) => {
                body.put_slice(&m.clip_id.0);
                m.target.put(body);
                m.format.put(body);
            }
            Message::Accepted(m) => {
                body.put_slice(&m.clip_id.0);
                body.put_u8(u8::from(m.duplicate));
            }
            Message::Rejected(m) => {
                body.put_slice(&m.clip_id.0);
                varint::put(body, m.code.to_u64());
                varint::put(body, m.retry_after_ms);
                varint::put_str(body, &m.reason);
            }
            Message::Delivery(m) => {
                put_id_and_sender(body, &m.clip_id, &m.sender);
                m.target.put(body);
                m.format.put(body);
                varint::put(body, m.created_ms);
                body.put_u8(u8::from(m.live));
            }
            Message::Unknown(_) => {}
        }
    }

    pub fn to_bytes(&self) -> bytes::Bytes {
        let mut buf = BytesMut::with_capacity(64);
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Decodes one message from the front of `buf`.
    ///
    /// `Ok(None)`: `buf` holds only part of a message; read more and call
    /// again. `Ok(Some((msg, used)))`: a message and how many bytes it took.
    /// An error means the peer broke the protocol: close with
    /// [`WireError::code`].
    pub fn decode(buf: &[u8], max_body: usize) -> Result<Option<(Message, usize)>, WireError> {
        let Some((kind, n1)) = varint::get(buf) else {
            return Ok(None);
        };
        let Some((len, n2)) = varint::get(&buf[n1..]) else {
            return Ok(None);
        };
        if len > max_body as u64 {
            return Err(WireError::MessageTooLong { len, max: max_body });
        }
        let start = n1 + n2;
        let end = start + len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let msg = Self::decode_body(kind, &buf[start..end])?;
        Ok(Some((msg, end)))
    }

    fn decode_body(kind: u64, body: &[u8]) -> Result<Message, WireError> {
        let what = match kind {
            kind::AUTH => "Auth",
            kind::WELCOME => "Welcome",
            kind::ACK => "Ack",
            kind::GO_AWAY => "GoAway",
            kind::USAGE_QUERY => "UsageQuery",
            kind::USAGE => "Usage",
            kind::EXPIRED => "Expired",
            kind::PUSH_REGISTER => "PushRegister",
            kind::PUSH_UNREGISTER => "PushUnregister",
            kind::PUSH_RESULT => "PushResult",
            kind::ACK_POLICY => "AckPolicy",
            kind::CLIP_HEADER => "ClipHeader",
            kind::ACCEPTED => "Accepted",
            kind::REJECTED => "Rejected",
            kind::DELIVERY => "Delivery",
            other => return Ok(Message::Unknown(other)),
        };
        let mut r = Reader::new(body, what);
        let msg = match kind {
            kind::AUTH => {
                let token =
                    std::str::from_utf8(body).map_err(|_| WireError::InvalidUtf8("token"))?;
                r.bytes(body.len())?;
                Message::Auth(Auth {
                    token: token.to_owned(),
                })
            }
            kind::WELCOME => {
                let user = r.string("user", MAX_NAME_BYTES)?.to_owned();
                let session_id = r.varint()?;
                let limits = Limits {
                    max_clip_ms: r.varint()?,
                    max_clip_bytes: r.varint()?,
                    max_packet_bytes: r.varint()?,
                    max_clip_streams: r.varint()?,
                    upload_idle_ms: r.varint()?,
                };
                Message::Welcome(Welcome {
                    user,
                    session_id,
                    limits,
                })
            }
            kind::ACK if body.len() == 16 => Message::Ack(ClipId(r.array()?)),
            kind::ACK => {
                // One id after another: at least one, and nothing else.
                if body.is_empty() || !body.len().is_multiple_of(16) {
                    return Err(WireError::Invalid {
                        field: "clip ids",
                        why: "an Ack body is one or more 16-byte ids",
                    });
                }
                let mut ids = Vec::with_capacity(body.len() / 16);
                while r.remaining() > 0 {
                    ids.push(ClipId(r.array()?));
                }
                Message::Acks(ids)
            }
            kind::ACK_POLICY => Message::AckPolicy(AckPolicy {
                max_ids: r.varint()?,
                hold_ms: r.varint()?,
            }),
            kind::GO_AWAY => Message::GoAway(GoAway {
                code: ErrorCode::from_u64(r.varint()?),
                retry_after_ms: r.varint()?,
                reason: r.string("reason", MAX_REASON_BYTES)?.to_owned(),
            }),
            kind::USAGE_QUERY => Message::UsageQuery(UsageQuery { days: r.varint()? }),
            kind::USAGE => {
                let today = r.varint()?;
                let n = r.varint()?;
                // Each entry takes at least three bytes: a count beyond
                // what the body holds is refused before any allocation.
                if n > (r.remaining() / 3) as u64 {
                    return Err(WireError::Truncated("Usage"));
                }
                let mut days = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    days.push(DayUsage {
                        day: r.varint()?,
                        bytes_up: r.varint()?,
                        bytes_down: r.varint()?,
                    });
                }
                Message::Usage(Usage { today, days })
            }
            kind::EXPIRED => {
                let (clip_id, sender) = read_id_and_sender(&mut r)?;
                Message::Expired(Expired {
                    clip_id,
                    sender,
                    target: Target::read(&mut r)?,
                    created_ms: r.varint()?,
                    also: r.varint()?,
                })
            }
            kind::PUSH_REGISTER => Message::PushRegister(PushRegister {
                provider: PushProvider::from_u64(r.varint()?).ok_or(WireError::Invalid {
                    field: "provider",
                    why: "not 1 (apns) or 2 (fcm)",
                })?,
                device_id: r.string("device_id", MAX_NAME_BYTES)?.to_owned(),
                token: r.string("token", MAX_PUSH_TOKEN_BYTES)?.to_owned(),
                topic: r.string("topic", MAX_NAME_BYTES)?.to_owned(),
            }),
            kind::PUSH_UNREGISTER => {
                Message::PushUnregister(r.string("device_id", MAX_NAME_BYTES)?.to_owned())
            }
            kind::PUSH_RESULT => Message::PushResult(PushResult {
                device_id: r.string("device_id", MAX_NAME_BYTES)?.to_owned(),
                code: ErrorCode::from_u64(r.varint()?),
                devices: r.varint()?,
                reason: r.string("reason", MAX_REASON_BYTES)?.to_owned(),
            }),
            kind::CLIP_HEADER => Message::ClipHeader(ClipHeader {
                clip_id: ClipId(r.array()?),
                target: Target::read(&mut r)?,
                format: AudioFormat::read(&mut r)?,
            }),
            kind::ACCEPTED => Message::Accepted(Accepted {
                clip_id: ClipId(r.array()?),
                duplicate: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(WireError::Invalid {
                            field: "duplicate",
                            why: "not 0 or 1",
                        });
                    }
                },
            }),
            kind::REJECTED => Message::Rejected(Rejected {
                clip_id: ClipId(r.array()?),
                code: ErrorCode::from_u64(r.varint()?),
                retry_after_ms: r.varint()?,
                reason: r.string("reason", MAX_REASON_BYTES)?.to_owned(),
            }),
            _ => {
                let (clip_id, sender) = read_id_and_sender(&mut r)?;
                Message::Delivery(Delivery {
                    clip_id,
                    sender,
                    target: Target::read(&mut r)?,
                    format: AudioFormat::read(&mut r)?,
                    created_ms: r.varint()?,
                    live: r.u8()? != 0,
                })
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(b: u8) -> ClipId {
        ClipId([b; 16])
    }

    #[test]
    fn messages_encode_after_what_the_buffer_holds_with_every_length_size() {
        // Bodies of 1-, 2- and 4-byte length varints, one after another in
        // one buffer, each as it encodes alone.
        let msgs: Vec<Message> = [2, 60, 1_100]
            .into_iter()
            .map(|n| Message::Acks((0..n).map(|i| id(i as u8)).collect()))
            .collect();
        let mut buf = BytesMut::from(&b"before"[..]);
        for m in &msgs {
            m.encode(&mut buf);
        }
        assert_eq!(&buf[..6], b"before");
        let mut at = 6;
        for m in &msgs {
            let alone = m.to_bytes();
            assert_eq!(&buf[at..at + alone.len()], &alone[..]);
            let (back, used) = Message::decode(&buf[at..], 1 << 20).unwrap().unwrap();
            assert_eq!((&back, used), (m, alone.len()));
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(msgs[0].to_bytes()[1], 32, "one-byte length");
        assert_eq!(msgs[1].to_bytes()[1] >> 6, 1, "two-byte length");
        assert_eq!(msgs[2].to_bytes()[1] >> 6, 2, "four-byte length");
    }

    #[test]
    fn clip_id_hex() {
        let c = ClipId([0xab; 16]);
        assert_eq!(ClipId::from_hex(&c.to_hex()), Some(c));
        assert_eq!(ClipId::from_hex("zz"), None);
        assert_eq!(ClipId::from_hex(&"é".repeat(16)), None);
    }

    /// The byte example in docs/protocol.md ("Ack").
    #[test]
    fn ack_bytes_match_spec() {
        let b = Message::Ack(ClipId([0x11; 16])).to_bytes();
        let mut expect = vec![0x03, 0x10];
        expect.extend([0x11; 16]);
        assert_eq!(&b[..], &expect[..]);
    }

    /// The byte examples in docs/protocol.md ("AckPolicy", an `Ack` of
    /// two clips), and what an `Ack` body may not be.
    #[test]
    fn ack_policy_and_several_acks_match_spec() {
        let p = Message::AckPolicy(AckPolicy {
            max_ids: 32,
            hold_ms: 20,
        });
        assert_eq!(&p.to_bytes()[..], &[0x0b, 0x02, 0x20, 0x14]);
        let b = Message::Acks(vec![ClipId([0x11; 16]), ClipId([0x22; 16])]).to_bytes();
        let mut expect = vec![0x03, 0x20];
        expect.extend([0x11; 16]);
        expect.extend([0x22; 16]);
        assert_eq!(&b[..], &expect[..]);
        assert_eq!(
            Message::decode(&b, 1024).unwrap(),
            Some((
                Message::Acks(vec![ClipId([0x11; 16]), ClipId([0x22; 16])]),
                b.len()
            ))
        );
        // One id: the plain `Ack`, whichever way it was built.
        let one = Message::Acks(vec![ClipId([0x11; 16])]).to_bytes();
        assert_eq!(one, Message::Ack(ClipId([0x11; 16])).to_bytes());
        assert!(Message::decode(&[0x03, 0x00], 1024).is_err());
    }

    /// The byte examples in docs/protocol.md ("PushRegister", "PushResult").
    #[test]
    fn push_bytes_match_spec() {
        let reg = Message::PushRegister(PushRegister {
            provider: PushProvider::Fcm,
            device_id: "d1".into(),
            token: "t".into(),
            topic: String::new(),
        });
        assert_eq!(
            &reg.to_bytes()[..],
            [0x08, 0x07, 0x02, 0x02, 0x64, 0x31, 0x01, 0x74, 0x00]
        );
        let res = Message::PushResult(PushResult {
            device_id: "d1".into(),
            code: ErrorCode::NoError,
            devices: 1,
            reason: "kept".into(),
        });
        assert_eq!(
            &res.to_bytes()[..],
            [
                0x0a, 0x0a, 0x02, 0x64, 0x31, 0x00, 0x01, 0x04, 0x6b, 0x65, 0x70, 0x74
            ]
        );
        // A provider this version does not know is malformed.
        let bad = [0x08, 0x03, 0x03, 0x00, 0x00];
        assert!(Message::decode(&bad, 1024).is_err());
    }

    /// The byte example in docs/protocol.md ("ClipHeader").
    #[test]
    fn clip_header_bytes_match_spec() {
        let m = Message::ClipHeader(ClipHeader {
            clip_id: ClipId([0; 16]),
            target: Target::User("bob".into()),
            format: AudioFormat {
                channels: 1,
                pre_skip: 312,
                input_rate: 48_000,
                output_gain: 0,
            },
        });
        let b = m.to_bytes();
        let mut expect = vec![0x10, 0x1f];
        expect.extend([0; 16]);
        expect.extend([0x00, 0x03, b'b', b'o', b'b']);
        expect.extend([0x00, 0x01, 0x01, 0x38, 0x00, 0x00, 0xbb, 0x80, 0x00, 0x00]);
        assert_eq!(&b[..], &expect[..]);
    }

    /// The byte example in docs/protocol.md ("Expired").
    #[test]
    fn expired_bytes_match_spec() {
        let m = Message::Expired(Expired {
            clip_id: ClipId([0x22; 16]),
            sender: "alice".into(),
            target: Target::User("bob".into()),
            created_ms: 1_795_000_000_000,
            also: 2,
        });
        let mut want = vec![0x07, 0x24];
        want.extend([0x22; 16]);
        want.extend([0x05, b'a', b'l', b'i', b'c', b'e']);
        want.extend([0x00, 0x03, b'b', b'o', b'b']);
        want.extend([0xc0, 0x00, 0x01, 0xa1, 0xee, 0x56, 0x5e, 0x00]);
        want.push(0x02);
        assert_eq!(&m.to_bytes()[..], &want[..]);
        assert_eq!(Message::decode(&want, 64).unwrap(), Some((m, want.len())));
        // A sender name that breaks the name rule is refused.
        let mut bad = want.clone();
        bad[18] = b' ';
        assert!(Message::decode(&bad, 64).is_err());
    }

    /// The byte examples in docs/protocol.md ("UsageQuery", "Usage").
    #[test]
    fn usage_bytes_match_spec() {
        let q = Message::UsageQuery(UsageQuery { days: 7 }).to_bytes();
        assert_eq!(&q[..], &[0x05, 0x01, 0x07]);
        let day = 20_784; // 2026-11-27
        let u = Message::Usage(Usage {
            today: day,
            days: vec![DayUsage {
                day,
                bytes_up: 52_000,
                bytes_down: 1_200,
            }],
        })
        .to_bytes();
        let expect = [
            0x06, 0x0f, 0x80, 0x00, 0x51, 0x30, 0x01, 0x80, 0x00, 0x51, 0x30, 0x80, 0x00, 0xcb,
            0x20, 0x44, 0xb0,
        ];
        assert_eq!(&u[..], &expect);
        // A count larger than the body could hold is refused at once.
        let lie = [0x06, 0x03, 0x00, 0x3f, 0x00];
        assert!(Message::decode(&lie, 1024).is_err());
        // The largest answer a relay sends fits the default limit.
        let max = varint::MAX;
        let big = Message::Usage(Usage {
            today: max,
            days: vec![
                DayUsage {
                    day: max,
                    bytes_up: max,
                    bytes_down: max,
                };
                MAX_USAGE_DAYS as usize
            ],
        })
        .to_bytes();
        assert!(
            Message::decode(&big, DEFAULT_MAX_MESSAGE_BYTES)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            (date(20_784), day_of(1_795_737_600_000)),
            ("2026-11-27".to_owned(), 20_784)
        );
    }

    #[test]
    fn unknown_type_is_skipped() {
        let mut b = BytesMut::new();
        varint::put(&mut b, 0x3f00);
        varint::put(&mut b, 3);
        b.put_slice(b"xyz");
        let (m, used) = Message::decode(&b, 1024).unwrap().unwrap();
        assert_eq!(m, Message::Unknown(0x3f00));
        assert_eq!(used, b.len());
    }

    #[test]
    fn rejects_bad_input() {
        // Too long for the limit.
        let big = Message::Auth(Auth {
            token: "x".repeat(100),
        })
        .to_bytes();
        assert!(matches!(
            Message::decode(&big, 50),
            Err(WireError::MessageTooLong { .. })
        ));
        // An Ack body not made of whole ids: a trailing byte, too short.
        let mut b = vec![0x03, 0x11];
        b.extend([0; 17]);
        let b2 = [0x03, 0x02, 1, 2];
        for b in [&b[..], &b2[..]] {
            assert!(matches!(
                Message::decode(b, 1024),
                Err(WireError::Invalid {
                    field: "clip ids",
                    ..
                })
            ));
        }
        // Bad target kind.
        let mut m = Message::ClipHeader(ClipHeader {
            clip_id: id(1),
            target: Target::User("bob".into()),
            format: AudioFormat::default(),
        })
        .to_bytes()
        .to_vec();
        m[2 + 16] = 7;
        assert!(matches!(
            Message::decode(&m, 1024),
            Err(WireError::Invalid { .. })
        ));
        // Three channels.
        let mut m = Message::ClipHeader(ClipHeader {
            clip_id: id(1),
            target: Target::User("bob".into()),
            format: AudioFormat::default(),
        })
        .to_bytes()
        .to_vec();
        m[2 + 16 + 5 + 1] = 3;
        assert!(Message::decode(&m, 1024).is_err());
        // Invalid UTF-8 token.
        assert!(Message::decode(&[0x01, 0x02, 0xff, 0xfe], 1024).is_err());
        // Empty and control-character names.
        assert!(check_name("t", "").is_err());
        assert!(check_name("t", "a\nb").is_err());
        assert!(check_name("t", &"a".repeat(129)).is_err());
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._@-]{1,40}"
    }

    fn arb_format() -> impl Strategy<Value = AudioFormat> {
        (1u8..=2, any::<u16>(), any::<u32>(), any::<i16>()).prop_map(|(c, p, r, g)| AudioFormat {
            channels: c,
            pre_skip: p,
            input_rate: r,
            output_gain: g,
        })
    }

    fn arb_target() -> impl Strategy<Value = Target> {
        prop_oneof![
            arb_name().prop_map(Target::User),
            arb_name().prop_map(Target::Channel)
        ]
    }

    fn arb_code() -> impl Strategy<Value = ErrorCode> {
        (0u64..0x40).prop_map(ErrorCode::from_u64)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let id = any::<[u8; 16]>().prop_map(ClipId);
        let v = 0..=varint::MAX;
        prop_oneof![
            "[ -~]{0,300}".prop_map(|token| Message::Auth(Auth { token })),
            (
                arb_name(),
                v.clone(),
                v.clone(),
                v.clone(),
                v.clone(),
                v.clone(),
                v.clone()
            )
                .prop_map(|(user, session_id, a, b, c, d, e)| Message::Welcome(
                    Welcome {
                        user,
                        session_id,
                        limits: Limits {
                            max_clip_ms: a,
                            max_clip_bytes: b,
                            max_packet_bytes: c,
                            max_clip_streams: d,
                            upload_idle_ms: e
                        }
                    }
                )),
            id.clone().prop_map(Message::Ack),
            proptest::collection::vec(id.clone(), 2..40).prop_map(Message::Acks),
            (v.clone(), v.clone())
                .prop_map(|(max_ids, hold_ms)| Message::AckPolicy(AckPolicy { max_ids, hold_ms })),
            (arb_code(), v.clone(), "[ -~]{0,100}").prop_map(|(code, retry_after_ms, reason)| {
                Message::GoAway(GoAway {
                    code,
                    retry_after_ms,
                    reason,
                })
            }),
            v.clone()
                .prop_map(|days| Message::UsageQuery(UsageQuery { days })),
            (
                v.clone(),
                proptest::collection::vec((v.clone(), v.clone(), v.clone()), 0..8)
            )
                .prop_map(|(today, days)| Message::Usage(Usage {
                    today,
                    days: days
                        .into_iter()
                        .map(|(day, bytes_up, bytes_down)| DayUsage {
                            day,
                            bytes_up,
                            bytes_down
                        })
                        .collect()
                })),
            (id.clone(), arb_name(), arb_target(), v.clone(), v.clone()).prop_map(
                |(clip_id, sender, target, created_ms, also)| Message::Expired(Expired {
                    clip_id,
                    sender,
                    target,
                    created_ms,
                    also
                })
            ),
            (any::<bool>(), arb_name(), "[0-9a-f]{0,200}", "[ -~]{0,100}").prop_map(
                |(apns, device_id, token, topic)| Message::PushRegister(PushRegister {
                    provider: if apns {
                        PushProvider::Apns
                    } else {
                        PushProvider::Fcm
                    },
                    device_id,
                    token,
                    topic
                })
            ),
            arb_name().prop_map(Message::PushUnregister),
            (arb_name(), arb_code(), v.clone(), "[ -~]{0,100}").prop_map(
                |(device_id, code, devices, reason)| Message::PushResult(PushResult {
                    device_id,
                    code,
                    devices,
                    reason
                })
            ),
            (id.clone(), arb_target(), arb_format()).prop_map(|(clip_id, target, format)| {
                Message::ClipHeader(ClipHeader {
                    clip_id,
                    target,
                    format,
                })
            }),
            (id.clone(), any::<bool>()).prop_map(|(clip_id, duplicate)| Message::Accepted(
                Accepted { clip_id, duplicate }
            )),
            (id.clone(), arb_code(), v.clone(), "[ -~]{0,100}").prop_map(
                |(clip_id, code, retry_after_ms, reason)| Message::Rejected(Rejected {
                    clip_id,
                    code,
                    retry_after_ms,
                    reason
                })
            ),
            (id, arb_name(), arb_target(), arb_format(), v, any::<bool>()).prop_map(
                |(clip_id, sender, target, format, created_ms, live)| {
                    Message::Delivery(Delivery {
                        clip_id,
                        sender,
                        target,
                        format,
                        created_ms,
                        live,
                    })
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(m in arb_message()) {
            let b = m.to_bytes();
            let (d, used) = Message::decode(&b, DEFAULT_MAX_MESSAGE_BYTES).unwrap().unwrap();
            prop_assert_eq!(used, b.len());
            prop_assert_eq!(&d, &m);
            // Every prefix is "need more" or (when the length varint is cut) still need more.
            for cut in 0..b.len() {
                prop_assert_eq!(Message::decode(&b[..cut], DEFAULT_MAX_MESSAGE_BYTES), Ok(None));
            }
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&b, 1024);
        }

        #[test]
        fn body_corruption_never_panics(m in arb_message(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut b = m.to_bytes().to_vec();
            let i = pos.index(b.len());
            b[i] = byte;
            let _ = Message::decode(&b, DEFAULT_MAX_MESSAGE_BYTES);
        }
    }
}
