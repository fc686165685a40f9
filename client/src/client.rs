//! A relay client: connect and authenticate, send clips, receive clips with
//! acknowledgements and duplicate suppression.
//!
//! Made for thousands of clients in one process: connections share a quinn
//! [`Endpoint`](quinn::Endpoint), and each client costs one task that accepts
//! delivery streams plus one short task per clip in flight.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use codec::framing::{self, FrameLimits};
use codec::ogg_opus::OggOpus;
use codec::wire::{
    AudioFormat, Auth, ClipHeader, ClipId, Delivery, Limits, Message, PushRegister, PushResult,
    Target, Usage, UsageQuery,
};
use codec::{ClipEnd, ErrorCode, Framer};
use quic::{MessageReader, StreamError, Turn, Turns};

use crate::acks::{AckBatch, Push};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

/// Why a client operation failed, and what to do about it.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The relay could not be reached or the handshake failed: retry later.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The relay closed the connection with a protocol code (bad token,
    /// busy, going away...). See `docs/protocol.md` for each code.
    #[error("relay closed the connection: {code}: {reason}")]
    Closed { code: ErrorCode, reason: String },
    /// The connection was lost (network, reset): reconnect and retry; a
    /// clip retried with the same id is delivered once.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The relay stopped answering (QUIC's idle timeout): retry, at
    /// another relay if there is one.
    #[error("the relay stopped answering: {0}")]
    Unanswered(String),
    /// The relay refused the clip. Retrying is useful only when
    /// `retry_after_ms` is non-zero or the code says so.
    #[error("relay rejected the clip: {code}: {reason}")]
    Rejected {
        code: ErrorCode,
        reason: String,
        retry_after_ms: u64,
    },
    /// The relay sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether the same request may succeed on a new connection (the
    /// protocol's one rule: [`ErrorCode::is_retryable`] for a refused
    /// clip, [`ErrorCode::reconnects`] for a closed connection).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect(_) | ClientError::Lost(_) | ClientError::Unanswered(_) => true,
            ClientError::Closed { code, .. } => code.reconnects(),
            ClientError::Rejected { code, .. } => code.is_retryable(),
            ClientError::Protocol(_) => false,
        }
    }
}

fn from_conn(e: ConnectionError) -> ClientError {
    match quic::close_reason(&e) {
        Some((code, reason)) => ClientError::Closed { code, reason },
        None if e == ConnectionError::TimedOut => ClientError::Unanswered(e.to_string()),
        None => ClientError::Lost(e.to_string()),
    }
}

fn from_stream(conn: &Connection, e: StreamError) -> ClientError {
    if let Some(reason) = conn.close_reason() {
        return from_conn(reason);
    }
    match e {
        StreamError::Read(r) => ClientError::Lost(r.to_string()),
        other => ClientError::Protocol(other.to_string()),
    }
}

/// A clip to send.
#[derive(Debug, Clone)]
pub struct OutgoingClip {
    pub id: ClipId,
    pub target: Target,
    pub format: AudioFormat,
    pub packets: Vec<Bytes>,
    /// Granule position of the end (see [`ClipEnd::final_granule`]).
    pub final_granule: u64,
}

impl OutgoingClip {
    /// A clip of an Ogg Opus file's packets, with a fresh random id.
    pub fn from_ogg(file: &OggOpus, target: Target) -> Self {
        Self {
            id: ClipId(rand::random()),
            target,
            format: file.format,
            packets: file.packets.clone(),
            final_granule: file.final_granule,
        }
    }

    /// The `ClipHeader` that opens its upload stream.
    pub fn header(&self) -> Message {
        Message::ClipHeader(ClipHeader {
            clip_id: self.id,
            target: self.target.clone(),
            format: self.format,
        })
    }

    /// Its end record.
    pub fn end(&self) -> ClipEnd {
        ClipEnd {
            packet_count: self.packets.len() as u64,
            final_granule: self.final_granule,
        }
    }

    /// A whole upload stream's bytes: header, packet records, end record.
    pub fn upload_bytes(&self) -> Bytes {
        let mut buf =
            BytesMut::with_capacity(64 + self.packets.iter().map(|p| p.len() + 2).sum::<usize>());
        self.header().encode(&mut buf);
        for p in &self.packets {
            framing::put_packet(&mut buf, p);
        }
        self.end().encode(&mut buf);
        buf.freeze()
    }

    /// Duration of each packet, for live pacing.
    fn packet_durations(&self) -> Vec<Duration> {
        self.packets
            .iter()
            .map(|p| {
                let samples = codec::opus_packet::parse(p).map_or(0, |i| i.samples());
                Duration::from_micros(u64::from(samples) * 1_000_000 / 48_000)
            })
            .collect()
    }
}

/// How the packets of a clip go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// In real time, each packet when a microphone would have produced it.
    Live,
    /// As fast as the connection allows.
    Upload,
}

/// The relay's answer to a sent clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    pub id: ClipId,
    /// The relay already had it (this was a retry); nobody got it twice.
    pub duplicate: bool,
    /// With [`Pacing::Live`]: when each packet was handed to QUIC, for
    /// latency measurements. With [`Pacing::Upload`]: one entry, when the
    /// whole clip was.
    pub sent_at: Vec<Instant>,
    /// When the upload stream was opened.
    pub opened_at: Instant,
    /// When the end record was handed to QUIC.
    pub finished_at: Instant,
}

impl SendOutcome {
    /// The outcome of clip `id` whose stream opened at `opened_at` and
    /// whose packets went at `sent_at` (the last one with the end record).
    pub fn new(id: ClipId, duplicate: bool, opened_at: Instant, sent_at: Vec<Instant>) -> Self {
        Self {
            id,
            duplicate,
            finished_at: sent_at.last().copied().unwrap_or(opened_at),
            sent_at,
            opened_at,
        }
    }
}

/// A clip received whole.
#[derive(Debug, Clone)]
pub struct ReceivedClip {
    pub delivery: Delivery,
    pub packets: Vec<Bytes>,
    pub end: ClipEnd,
    /// When the clip was complete (end record and FIN read).
    pub received_at: Instant,
}

impl ReceivedClip {
    pub fn id(&self) -> ClipId {
        self.delivery.clip_id
    }

    /// The clip as an Ogg Opus file.
    pub fn to_ogg(&self) -> OggOpus {
        let mut f = OggOpus::new(self.delivery.format, self.packets.clone());
        f.final_granule = self.end.final_granule;
        f.comments
            .push(format!("PTT_SENDER={}", self.delivery.sender));
        f.comments
            .push(format!("PTT_CLIP_ID={}", self.delivery.clip_id));
        f
    }
}

/// What a client hears from the relay.
#[derive(Debug)]
pub enum Event {
    /// A delivery began: the header arrived.
    Started {
        delivery: Delivery,
        at: Instant,
        /// Index of the delivery stream on this connection: the order in
        /// which the relay started deliveries (stored clips oldest first).
        seq: u64,
    },
    /// The first packet of a clip arrived.
    FirstPacket { id: ClipId, at: Instant },
    /// Packets `first..first + packets.len()` of a clip arrived (only
    /// with [`ClientOptions::packet_events`]): for playing a clip as it
    /// comes.
    Packets {
        id: ClipId,
        first: u64,
        packets: Vec<Bytes>,
        at: Instant,
    },
    /// A clip arrived whole. Ack it ([`Client::ack`]) once it is safe.
    Complete(ReceivedClip),
    /// A clip was cut off before its end (the sender stopped, or the relay
    /// refused it); nothing of it should be kept.
    Cut { id: ClipId, code: ErrorCode },
    /// The relay asks this client to reconnect (to another relay) after
    /// `retry_after_ms`: it is shutting down or shedding load. Clips being
    /// sent may still finish; the connection closes soon.
    GoAway {
        code: ErrorCode,
        retry_after_ms: u64,
        reason: String,
    },
    /// The relay dropped a clip for this user without its ack (older than
    /// the relay's `clip_ttl`): it will never arrive. Ack it
    /// ([`Client::ack`] with its `clip_id`) once the app was told; until
    /// then it comes again on every connection. Not passed on for a clip
    /// this client already has (acked again instead).
    Expired(codec::wire::Expired),
    /// A clip this client already had arrived again whole (its ack was
    /// lost, or the relay misbehaved). It was acked again and not passed on
    /// as `Complete`; reported for verification tools.
    Redelivered { id: ClipId },
}

/// Remembers the most recent clip ids received, to drop redeliveries.
/// Share one between the connections of a user (reconnects) so a clip
/// whose ack was lost reaches the application once.
#[derive(Clone)]
pub struct SeenIds(Arc<Mutex<Seen>>);

impl std::fmt::Debug for SeenIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeenIds(..)")
    }
}

impl SeenIds {
    pub fn new(capacity: usize) -> Self {
        Self(Arc::new(Mutex::new(Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: capacity.max(1),
        })))
    }

    /// Records `id`; false if it was already there.
    pub fn insert(&self, id: ClipId) -> bool {
        self.0.lock().map(|mut s| s.insert(id)).unwrap_or(true)
    }

    /// Forgets `id` (the application did not keep it after all), so its
    /// redelivery is passed on again.
    pub fn forget(&self, id: &ClipId) {
        if let Ok(mut s) = self.0.lock()
            && s.set.remove(id)
        {
            s.order.retain(|x| x != id);
        }
    }

    pub fn contains(&self, id: &ClipId) -> bool {
        self.0.lock().map(|s| s.set.contains(id)).unwrap_or(false)
    }
}

struct Seen {
    set: HashSet<ClipId>,
    order: VecDeque<ClipId>,
    cap: usize,
}

impl Seen {
    fn insert(&mut self, id: ClipId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Events waiting for the application; delivery streams pause when full.
    pub event_queue: usize,
    /// Clip ids already received; by default a fresh memory of 4096 ids.
    pub seen: Option<SeenIds>,
    /// Report every run of packets as it arrives ([`Event::Packets`]), for
    /// per-packet latency measurements.
    pub packet_events: bool,
    /// Pass clips on ([`Event::Complete`]) in the order the relay started
    /// their deliveries (stream order: stored clips in acceptance order),
    /// holding a clip that finished early until the ones before it have
    /// finished or been cut. Off for load generators, which measure each
    /// clip's own timing.
    pub in_order: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            event_queue: 256,
            seen: None,
            packet_events: false,
            in_order: false,
        }
    }
}

/// An authenticated connection to a relay.
pub struct Client {
    conn: Connection,
    user: String,
    session_id: u64,
    limits: Limits,
    control: tokio::sync::Mutex<SendStream>,
    zero_rtt: bool,
    seen: SeenIds,
    packet_events: bool,
    in_order: bool,
    /// Acks held to go together (the relay's `AckPolicy`).
    acks: Mutex<AckBatch>,
    /// A batch of acks started: the holding task sends it when due.
    acks_due: tokio::sync::Notify,
    /// Callers waiting for a `Usage` answer, in the order they asked.
    usage_waiters: Waiters<Usage>,
    /// Callers waiting for a `PushResult`, in the order they asked.
    push_waiters: Waiters<PushResult>,
}

/// Callers waiting for the relay's answers of one kind, in the order the
/// questions went out on the control stream.
type Waiters<T> = Mutex<VecDeque<oneshot::Sender<T>>>;

/// How long [`Client::usage`] and [`Client::register_push`] wait for the
/// relay's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the control stream and sends `Auth`.
async fn send_auth(
    conn: &Connection,
    token: &str,
) -> Result<(SendStream, RecvStream), ClientError> {
    let (mut send, recv) = conn.open_bi().await.map_err(from_conn)?;
    let auth = Message::Auth(Auth {
        token: token.to_owned(),
    });
    // A refused Auth (too large, say) may close the connection while it
    // is still being written: report the relay's code then.
    quic::write_message(&mut send, &auth)
        .await
        .map_err(|e| match conn.close_reason() {
            Some(why) => from_conn(why),
            None => ClientError::Lost(e.to_string()),
        })?;
    Ok((send, recv))
}

/// Reads the relay's `Welcome` on the control stream.
async fn read_welcome(
    conn: &Connection,
    send: SendStream,
    recv: RecvStream,
) -> Result<(SendStream, MessageReader, codec::wire::Welcome), ClientError> {
    let mut rd = MessageReader::new(recv, codec::wire::DEFAULT_MAX_MESSAGE_BYTES);
    match rd.next().await {
        Ok(Some(Message::Welcome(w))) => Ok((send, rd, w)),
        Ok(Some(m)) => Err(ClientError::Protocol(format!(
            "expected Welcome, got type 0x{:x}",
            m.kind()
        ))),
        Ok(None) => Err(ClientError::Protocol("control stream ended".into())),
        // A refused token closes the connection: the error carries the
        // relay's code and reason.
        Err(e) => Err(from_stream(conn, e)),
    }
}

/// A connection on its way ([`Client::begin`]): `Auth` sent (in 0-RTT
/// when resuming), `Welcome` not read yet.
pub struct Connecting {
    conn: Connection,
    token: String,
    /// Resuming in 0-RTT: resolves, once the handshake is done, to whether
    /// the relay took the early data.
    early: Option<quinn::ZeroRttAccepted>,
    control: Result<(SendStream, RecvStream), ClientError>,
}

impl Connecting {
    /// Whether what is sent now rides in 0-RTT, with the handshake.
    pub fn is_early(&self) -> bool {
        self.early.is_some()
    }

    /// Starts an upload before `Welcome` ([`Client::start_upload`]). The
    /// relay lets a client that has not authenticated yet open this one
    /// upload and send up to its `early_upload_bytes` (8 KiB by default:
    /// seconds of voice; more waits for `Welcome`), and reads it once the
    /// token is good. If the relay refuses the 0-RTT data, the stream is
    /// gone: [`LiveUpload::answer`] says so and the clip must be sent
    /// again on the connection.
    pub async fn upload(
        &self,
        id: ClipId,
        target: Target,
        format: AudioFormat,
    ) -> Result<LiveUpload, ClientError> {
        start_upload(&self.conn, id, target, format).await
    }

    /// Reads `Welcome` (authenticating again if the relay refused the
    /// 0-RTT data) and starts receiving.
    pub async fn finish(
        self,
        opts: ClientOptions,
    ) -> Result<(Arc<Client>, mpsc::Receiver<Event>), ClientError> {
        let conn = self.conn;
        let first = match self.control {
            Ok((send, recv)) => read_welcome(&conn, send, recv).await,
            Err(e) => Err(e),
        };
        let mut zero_rtt = false;
        let (send, rd, welcome) = match (first, self.early) {
            (Ok(x), None) => x,
            (Ok(x), Some(accepted)) => {
                zero_rtt = accepted.await;
                x
            }
            (Err(e), None) => return Err(e),
            // The relay refused the 0-RTT data (it forgot the ticket,
            // restarted, or a replay took it): what was sent is gone, so
            // authenticate again on the established connection.
            (Err(e), Some(accepted)) => {
                if accepted.await {
                    return Err(e);
                }
                let (send, recv) = send_auth(&conn, &self.token).await?;
                read_welcome(&conn, send, recv).await?
            }
        };
        let client = Arc::new(Client {
            conn: conn.clone(),
            user: welcome.user,
            session_id: welcome.session_id,
            limits: welcome.limits,
            control: tokio::sync::Mutex::new(send),
            zero_rtt,
            seen: opts.seen.unwrap_or_else(|| SeenIds::new(4096)),
            packet_events: opts.packet_events,
            in_order: opts.in_order,
            acks: Mutex::new(AckBatch::default()),
            acks_due: tokio::sync::Notify::new(),
            usage_waiters: Mutex::new(VecDeque::new()),
            push_waiters: Mutex::new(VecDeque::new()),
        });
        let (tx, rx) = mpsc::channel(opts.event_queue.max(1));
        tokio::spawn(read_control(client.clone(), rd, tx.clone()));
        tokio::spawn(accept_deliveries(client.clone(), tx));
        Ok((client, rx))
    }
}

impl Client {
    /// Connects, authenticates with `token`, and starts receiving. Events
    /// arrive on the returned channel.
    pub async fn connect(
        endpoint: &Endpoint,
        addr: SocketAddr,
        server_name: &str,
        token: &str,
        opts: ClientOptions,
    ) -> Result<(Arc<Client>, mpsc::Receiver<Event>), ClientError> {
        Client::begin(endpoint, addr, server_name, token)
            .await?
            .finish(opts)
            .await
    }

    /// The first half of [`Client::connect`]: connects and sends `Auth`,
    /// without waiting for `Welcome`. With a resumption ticket from an
    /// earlier connection to this relay (kept by the endpoint's TLS
    /// config) this returns at once and `Auth` rides in 0-RTT with the
    /// handshake, as does an upload started now ([`Connecting::upload`]):
    /// a press's first audio leaves with the reconnect.
    pub async fn begin(
        endpoint: &Endpoint,
        addr: SocketAddr,
        server_name: &str,
        token: &str,
    ) -> Result<Connecting, ClientError> {
        Client::begin_with(endpoint, None, addr, server_name, token).await
    }

    /// [`Client::begin`] with `config` instead of the endpoint's default
    /// (`None`: the default): its own TLS session store, so tickets are
    /// kept per relay even where relays share a name.
    pub async fn begin_with(
        endpoint: &Endpoint,
        config: Option<quinn::ClientConfig>,
        addr: SocketAddr,
        server_name: &str,
        token: &str,
    ) -> Result<Connecting, ClientError> {
        let connecting = match config {
            Some(c) => endpoint.connect_with(c, addr, server_name),
            None => endpoint.connect(addr, server_name),
        }
        .map_err(|e| ClientError::Connect(e.to_string()))?;
        let handshake_failed = |e: quinn::ConnectionError| match quic::close_reason(&e) {
            Some((code, reason)) => ClientError::Closed { code, reason },
            None => ClientError::Connect(e.to_string()),
        };
        let (conn, early) = match connecting.into_0rtt() {
            Ok((conn, accepted)) => (conn, Some(accepted)),
            Err(connecting) => (connecting.await.map_err(handshake_failed)?, None),
        };
        let control = send_auth(&conn, token).await;
        Ok(Connecting {
            conn,
            token: token.to_owned(),
            early,
            control,
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Whether this connection resumed an earlier one with QUIC 0-RTT
    /// (its `Auth` went out with the handshake and the relay took it).
    pub fn zero_rtt(&self) -> bool {
        self.zero_rtt
    }

    /// The relay's limits, from its Welcome.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Why the connection ended, once it has.
    pub async fn closed(&self) -> ClientError {
        from_conn(self.conn.closed().await)
    }

    /// Closes at once; acks still buffered may be lost (the relay then
    /// redelivers those clips, and the duplicate memory drops them).
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }

    /// Leaves cleanly: sends the acks held, finishes the control stream,
    /// so the relay handles every ack before it and then closes the
    /// connection.
    pub async fn shutdown(&self) {
        let _ = self.flush_acks().await;
        let _ = self.control.lock().await.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.closed()).await;
        self.close();
    }

    /// Tells the relay the clip is safely received; it releases its copy.
    /// Where the relay announced `AckPolicy`, the ack may be held (up to
    /// its `hold_ms`) to go with others: [`Client::shutdown`] sends what
    /// is held, [`Client::close`] drops it (those clips come again).
    pub async fn ack(&self, id: ClipId) -> Result<(), ClientError> {
        let push = match self.acks.lock() {
            Ok(mut b) => b.push(id),
            Err(_) => Push::Send(Message::Ack(id)),
        };
        match push {
            Push::Send(m) => self.send_acks(&m).await,
            Push::First => {
                self.acks_due.notify_one();
                Ok(())
            }
            Push::Held => Ok(()),
        }
    }

    /// Sends the acks held now.
    pub async fn flush_acks(&self) -> Result<(), ClientError> {
        let held = self.acks.lock().ok().and_then(|mut b| b.take());
        match held {
            Some(m) => self.send_acks(&m).await,
            None => Ok(()),
        }
    }

    async fn send_acks(&self, m: &Message) -> Result<(), ClientError> {
        let mut ctl = self.control.lock().await;
        quic::write_message(&mut ctl, m)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// This user's data use as the relay counted it (UDP payload bytes both
    /// ways, per UTC day, oldest first) over the last `days` days (1:
    /// today; 0: every day the relay keeps). Current to the answer.
    pub async fn usage(&self, days: u64) -> Result<Usage, ClientError> {
        let q = Message::UsageQuery(UsageQuery { days });
        self.ask(&self.usage_waiters, q, "UsageQuery").await
    }

    /// Tells the relay where this device can be woken when a clip starts
    /// for its user while it has no connected session (the relay keeps it
    /// durably, for this user, until removed or the provider says the
    /// token is gone). The answer says whether it was kept.
    pub async fn register_push(&self, r: PushRegister) -> Result<PushResult, ClientError> {
        self.ask(&self.push_waiters, Message::PushRegister(r), "PushRegister")
            .await
    }

    /// This device (`device_id`) wants no more pushes.
    pub async fn unregister_push(&self, device_id: &str) -> Result<PushResult, ClientError> {
        let m = Message::PushUnregister(device_id.to_owned());
        self.ask(&self.push_waiters, m, "PushUnregister").await
    }

    /// Sends `msg` on the control stream and waits (a bounded time) for
    /// its answer, which comes through `waiters` in the order asked.
    async fn ask<T>(
        &self,
        waiters: &Waiters<T>,
        msg: Message,
        what: &str,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            // Queued under the control stream's lock: answers come in the
            // order the questions were written.
            let mut ctl = self.control.lock().await;
            waiters
                .lock()
                .map_err(|_| ClientError::Protocol("answer waiters poisoned".into()))?
                .push_back(tx);
            quic::write_message(&mut ctl, &msg)
                .await
                .map_err(|e| ClientError::Lost(e.to_string()))?;
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(u)) => Ok(u),
            Ok(Err(_)) => Err(ClientError::Lost(format!(
                "connection ended before the answer to {what}"
            ))),
            Err(_) => Err(ClientError::Protocol(format!(
                "no answer to {what} (the relay may not support it)"
            ))),
        }
    }

    /// Marks `id` as already held by the application (e.g. found on disk),
    /// so a redelivery is acked and dropped.
    pub fn mark_seen(&self, id: ClipId) {
        self.seen.insert(id);
    }

    /// Sends a clip and waits for the relay's answer: `Ok` only once the
    /// relay has stored the whole clip.
    pub async fn send_clip(
        &self,
        clip: &OutgoingClip,
        pacing: Pacing,
    ) -> Result<SendOutcome, ClientError> {
        // A write fails when the relay answered early (duplicate, refusal)
        // and stopped the stream; its answer is read either way.
        let (opened_at, sent_at, duplicate) = match pacing {
            Pacing::Upload => {
                let (mut send, recv) = self.conn.open_bi().await.map_err(from_conn)?;
                let opened_at = Instant::now();
                // Header, records and end in one write.
                if send.write_chunk(clip.upload_bytes()).await.is_ok() {
                    let _ = send.finish();
                }
                let sent_at = vec![Instant::now()];
                (
                    opened_at,
                    sent_at,
                    read_answer(&self.conn, recv, clip.id).await?,
                )
            }
            Pacing::Live => {
                let mut up = self
                    .start_upload(clip.id, clip.target.clone(), clip.format)
                    .await?;
                let opened_at = Instant::now();
                let sent_at = up.send_paced(clip).await;
                (opened_at, sent_at, up.answer().await?)
            }
        };
        Ok(SendOutcome::new(clip.id, duplicate, opened_at, sent_at))
    }

    /// Starts a clip whose packets are not all there yet (live talk from a
    /// microphone): opens its upload stream and sends the header at once.
    /// The relay may answer before the end (`floor_busy`, `preempted`, a
    /// limit): [`LiveUpload::answer`] has it.
    pub async fn start_upload(
        &self,
        id: ClipId,
        target: Target,
        format: AudioFormat,
    ) -> Result<LiveUpload, ClientError> {
        start_upload(&self.conn, id, target, format).await
    }
}

/// Opens an upload stream and writes the clip's header; a task waits for
/// the relay's answer.
async fn start_upload(
    conn: &Connection,
    id: ClipId,
    target: Target,
    format: AudioFormat,
) -> Result<LiveUpload, ClientError> {
    let (mut send, recv) = conn.open_bi().await.map_err(from_conn)?;
    let early = recv.is_0rtt();
    let header = Message::ClipHeader(ClipHeader {
        clip_id: id,
        target,
        format,
    });
    // A failed write shows in the answer (the relay stopped the stream
    // after answering, or the connection is gone).
    let _ = send.write_chunk(header.to_bytes()).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let conn = conn.clone();
    tokio::spawn(async move {
        let _ = tx.send(read_answer(&conn, recv, id).await);
    });
    Ok(LiveUpload {
        send,
        answer: rx,
        packets: 0,
        early,
    })
}

/// A clip being uploaded as it is spoken ([`Client::start_upload`]).
pub struct LiveUpload {
    send: SendStream,
    answer: tokio::sync::oneshot::Receiver<Result<bool, ClientError>>,
    packets: u64,
    early: bool,
}

impl LiveUpload {
    /// Sends packets as records. An error means the stream is gone (the
    /// relay answered early, or the connection was lost): see
    /// [`LiveUpload::answer`].
    pub async fn send(&mut self, packets: &[Bytes]) -> Result<(), ClientError> {
        let mut buf = BytesMut::with_capacity(packets.iter().map(|p| p.len() + 2).sum());
        for p in packets {
            framing::put_packet(&mut buf, p);
        }
        self.packets += packets.len() as u64;
        self.send
            .write_chunk(buf.freeze())
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// Whether the stream was opened in 0-RTT, riding with the handshake.
    pub fn is_early(&self) -> bool {
        self.early
    }

    /// Sends `clip`'s packets in real time, each when a microphone would
    /// have made it, then its end record and FIN. Returns when each packet
    /// was handed to QUIC; stops at the first failed write (the relay
    /// answered early, or the connection is gone: see
    /// [`LiveUpload::answer`]).
    pub async fn send_paced(&mut self, clip: &OutgoingClip) -> Vec<Instant> {
        let mut sent_at = Vec::with_capacity(clip.packets.len());
        let mut due = Instant::now();
        for (p, d) in clip.packets.iter().zip(clip.packet_durations()) {
            due += d;
            sleep_until(due).await;
            if self.send(std::slice::from_ref(p)).await.is_err() {
                return sent_at;
            }
            sent_at.push(Instant::now());
        }
        // Right behind the last packet: its time stands for the end.
        let _ = self.finish(clip.final_granule).await;
        sent_at
    }

    /// Ends the clip: the end record (`final_granule` as the encoder gave
    /// it) and FIN.
    pub async fn finish(&mut self, final_granule: u64) -> Result<(), ClientError> {
        let end = ClipEnd {
            packet_count: self.packets,
            final_granule,
        };
        self.send
            .write_chunk(end.to_bytes())
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        self.send
            .finish()
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// Gives up the clip (the app cancelled): the relay cuts it off for
    /// its listeners and keeps nothing.
    pub fn abort(&mut self) {
        let _ = self.send.reset(quic::varint(ErrorCode::CutOff));
    }

    /// Waits for the relay's answer.
    pub async fn answer(&mut self) -> Result<bool, ClientError> {
        (&mut self.answer)
            .await
            .unwrap_or_else(|_| Err(ClientError::Lost("upload answer lost".into())))
    }
}

/// Reads the relay's one answer on an upload stream: `Ok(duplicate)` for
/// `Accepted`.
async fn read_answer(conn: &Connection, recv: RecvStream, id: ClipId) -> Result<bool, ClientError> {
    let mut rd = MessageReader::new(recv, codec::wire::DEFAULT_MAX_MESSAGE_BYTES);
    let answer = rd.next().await;
    // The relay ends the stream with its answer, usually in the same packet.
    if matches!(answer, Ok(Some(_))) {
        quic::take_end(rd.stream());
    }
    match answer {
        Ok(Some(Message::Accepted(a))) if a.clip_id == id => Ok(a.duplicate),
        Ok(Some(Message::Rejected(r))) => Err(ClientError::Rejected {
            code: r.code,
            reason: r.reason,
            retry_after_ms: r.retry_after_ms,
        }),
        Ok(Some(m)) => Err(ClientError::Protocol(format!(
            "unexpected answer type 0x{:x}",
            m.kind()
        ))),
        Ok(None) => Err(ClientError::Lost(
            "relay ended the stream without an answer".into(),
        )),
        Err(e) => Err(from_stream(conn, e)),
    }
}

/// Reads what the relay sends on the control stream after `Welcome`.
async fn read_control(client: Arc<Client>, mut rd: MessageReader, events: mpsc::Sender<Event>) {
    while let Ok(Some(msg)) = rd.next().await {
        match msg {
            Message::GoAway(g) => {
                let _ = events
                    .send(Event::GoAway {
                        code: g.code,
                        retry_after_ms: g.retry_after_ms,
                        reason: g.reason,
                    })
                    .await;
            }
            Message::Expired(x) => {
                if client.seen.contains(&x.clip_id) {
                    // Acked just before it expired: nothing was missed.
                    let _ = client.ack(x.clip_id).await;
                } else {
                    let _ = events.send(Event::Expired(x)).await;
                }
            }
            Message::Usage(u) => answered(&client.usage_waiters, u),
            Message::PushResult(r) => answered(&client.push_waiters, r),
            // The relay takes acks together: one task sends them when due.
            Message::AckPolicy(p) if client.acks.lock().is_ok_and(|mut b| b.set_policy(p)) => {
                tokio::spawn(hold_acks(client.clone()));
            }
            _ => {}
        }
    }
    // The control stream ended: nobody waits for an answer in vain.
    if let Ok(mut w) = client.usage_waiters.lock() {
        w.clear();
    }
    if let Ok(mut w) = client.push_waiters.lock() {
        w.clear();
    }
}

/// Sends each batch of held acks when its hold is over (one task per
/// connection whose relay announced `AckPolicy`), until the connection
/// ends.
async fn hold_acks(client: Arc<Client>) {
    loop {
        tokio::select! {
            () = client.acks_due.notified() => {}
            _ = client.conn.closed() => return,
        }
        let hold = client.acks.lock().map(|b| b.hold()).unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            _ = client.conn.closed() => return,
        }
        if client.flush_acks().await.is_err() {
            return;
        }
    }
}

/// Hands an answer to the first caller waiting for one of its kind.
fn answered<T>(waiters: &Waiters<T>, answer: T) {
    let waiter = waiters.lock().ok().and_then(|mut w| w.pop_front());
    if let Some(w) = waiter {
        let _ = w.send(answer);
    }
}

async fn accept_deliveries(client: Arc<Client>, events: mpsc::Sender<Event>) {
    let mut turns = Turns::default();
    while let Ok(recv) = client.conn.accept_uni().await {
        let client = client.clone();
        let events = events.clone();
        // In order: each delivery passes its clip on after the one before.
        let turn = if client.in_order {
            turns.next_turn()
        } else {
            Turn::default()
        };
        tokio::spawn(async move {
            receive(client, recv, events, turn).await;
        });
    }
}

/// Reads one delivery stream into a clip.
async fn receive(
    client: Arc<Client>,
    recv: RecvStream,
    events: mpsc::Sender<Event>,
    mut turn: Turn,
) {
    let seq = recv.id().index();
    let mut rd = MessageReader::new(recv, codec::wire::DEFAULT_MAX_MESSAGE_BYTES);
    let delivery = match rd.next().await {
        Ok(Some(Message::Delivery(d))) => d,
        _ => return,
    };
    let id = delivery.clip_id;
    let _ = events
        .send(Event::Started {
            delivery: delivery.clone(),
            at: Instant::now(),
            seq,
        })
        .await;
    let mut framer = Framer::new(FrameLimits::permissive());
    let mut packets = Vec::new();
    let mut end = None;
    // Where each packet of the current read starts and its length; reused.
    let mut spans = Vec::new();
    loop {
        let buf = rd.buffer();
        spans.clear();
        let scan = match framer.scan_with(buf, |off, p| spans.push((off, p.len()))) {
            Ok(s) => s,
            Err(e) => {
                let _ = rd.stream().stop(quic::varint(e.code()));
                let _ = events.send(Event::Cut { id, code: e.code() }).await;
                return;
            }
        };
        if scan.records > 0 {
            let at = Instant::now();
            if packets.is_empty() {
                let _ = events.send(Event::FirstPacket { id, at }).await;
            }
            let records = buf.split_to(scan.records).freeze();
            let first = packets.len();
            packets.extend(spans.drain(..).map(|(o, n)| records.slice(o..o + n)));
            if client.packet_events {
                let _ = events
                    .send(Event::Packets {
                        id,
                        first: first as u64,
                        packets: packets[first..].to_vec(),
                        at,
                    })
                    .await;
            }
        }
        if let Some((e, n)) = scan.end {
            let _ = buf.split_to(n);
            end = Some(e);
        }
        match rd.fill().await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let code = quic::reset_code(&e).unwrap_or(ErrorCode::CutOff);
                let _ = events.send(Event::Cut { id, code }).await;
                return;
            }
        }
    }
    let Some(end) = end else {
        let _ = events
            .send(Event::Cut {
                id,
                code: ErrorCode::ProtocolViolation,
            })
            .await;
        return;
    };
    turn.wait().await;
    if !client.seen.insert(id) {
        // A redelivery of a clip we already have (our ack was lost): ack
        // again, and do not pass it on as a new clip.
        let _ = client.ack(id).await;
        let _ = events.send(Event::Redelivered { id }).await;
        return;
    }
    let _ = events
        .send(Event::Complete(ReceivedClip {
            delivery,
            packets,
            end,
            received_at: Instant::now(),
        }))
        .await;
}
