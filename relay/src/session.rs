//! One authenticated connection: its control stream (auth, acks), its clip
//! uploads and the delivery of clips to it, live and stored.

use std::sync::Arc;

use bytes::Bytes;
use codec::token::Right;
use codec::wire::{Accepted, ClipHeader, ClipId, Message, Rejected, Target, Welcome};
use codec::{ClipEnd, ErrorCode, Framer};
use futures_util::FutureExt;
use quic::{MessageReader, StreamError};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::cluster;
use crate::faults::{self, Fault};
use crate::live::{LiveClip, Next};
use crate::metrics;
use crate::refusal::Refusal;
use crate::state::{Session, Shared, Stop, claim_seen, stored_new, unclaim_seen};
use crate::store::{Appended, ClipMeta, StoreError, StoredClip};
use crate::webtransport::{Gone, Link};

/// This relay as a connection sees it: the state every connection shares
/// and, in a cluster, the link to the other relays.
pub struct Node {
    pub state: Arc<Shared>,
    /// The cluster link (`--cluster`); `None` for a relay on its own.
    pub cluster: Option<Arc<cluster::Cluster>>,
    /// Push registrations, and the pushes that wake sleeping devices.
    pub push: Arc<crate::push::Pusher>,
}

impl std::ops::Deref for Node {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.state
    }
}

/// Runs one connection from handshake to close.
pub async fn run(
    shared: Arc<Node>,
    incoming: quinn::Incoming,
    unauthenticated: crate::state::Unauthenticated,
) {
    let mut connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => return handshake_failed(&e),
    };
    // The ALPN is known once the whole ClientHello is in, which can take
    // more than the first packet (Chromium spreads its ClientHello over
    // two Initial packets): deciding before would take a browser for a
    // native client. A ClientHello not whole within `auth_timeout` is
    // given up like a missing `Auth`.
    let h3 = match timeout(shared.config.auth_timeout, connecting.handshake_data()).await {
        Ok(Ok(data)) => crate::webtransport::is_h3(data),
        Ok(Err(e)) => return handshake_failed(&e),
        Err(_) => return handshake_failed(&"no whole ClientHello in time"),
    };
    // Reads the client's 0-RTT data (its `Auth`) as it comes, and answers
    // in 0.5-RTT, before the client has finished the handshake.
    let (conn, mut handshake) = match connecting.into_0rtt() {
        Ok((conn, done)) => (conn, Handshake::Pending(done)),
        Err(connecting) => match Box::pin(connecting).await {
            Ok(conn) => (conn, Handshake::Complete),
            Err(e) => return handshake_failed(&e),
        },
    };
    let remote = conn.remote_address();
    let link = if h3 {
        match Box::pin(web_session(&shared, &conn, &mut handshake)).await {
            Some(link) => link,
            None => return,
        }
    } else {
        Link::Quic
    };
    // The steps before the session starts are boxed, freed once done: the
    // task keeps only what an idle session needs (docs/benchmarks.md,
    // memory per session).
    let authenticated = Box::pin(authenticate(&shared, &conn, &link, &mut handshake)).await;
    if authenticated.is_ok() && handshake.is_pending() {
        // A session from 0-RTT is served at once (its `Welcome` means
        // "online", as on any connection); its handshake completes about a
        // round trip later, or the connection fails and the session ends.
        let deadline = Instant::now() + shared.config.auth_timeout;
        let conn = conn.clone();
        tokio::spawn(async move { handshake.complete(&conn, deadline).await });
    } else {
        handshake.settle(&conn);
    }
    drop(unauthenticated);
    let (session, mut live_rx, ctl, welcome) = match authenticated {
        Ok(x) => {
            metrics::count(metrics::CONNECTIONS_ACCEPTED, "transport", link.transport());
            x
        }
        Err(Refusal { code, reason, .. }) => {
            if code != ErrorCode::NoError {
                metrics::count(metrics::AUTH_FAILURES, "reason", code.name());
                metrics::count(metrics::CONNECTIONS_REJECTED, "reason", "auth");
            }
            debug!(%remote, code = code.name(), %reason, "connection refused");
            link.close(&conn, code, &reason);
            return;
        }
    };
    shared.router.join(&session, session.channels.keys());
    // Clips being spoken to this user now (a phone woken by their push):
    // joined live from their first packet.
    for clip in shared
        .speaking
        .for_session(&session.user, session.channels.keys())
    {
        session.offer_live(clip);
    }
    // Other relays' live clips for this user and its channels.
    let subjects = match &shared.cluster {
        Some(c) => c.join(&shared.state, &session),
        None => Vec::new(),
    };
    // `Welcome` only now: from the moment a client has it, it is online
    // (live clips to it and its channels reach it).
    if let Err(e) = Box::pin(session.send_control(&welcome)).await {
        debug!(error = %e, "Welcome not sent");
    }
    Box::pin(replay_history(&shared, &session)).await;
    Box::pin(
        shared
            .push
            .session_started(&session.user, session.channels.keys()),
    )
    .await;
    Box::pin(session.send_expired(shared.expired.notices(&session.user))).await;
    info!(%remote, user = %session.user, session = session.id, "session start");
    let cancel = shared.shutdown.child_token();
    tokio::select! {
        r = control_loop(&shared, &session, ctl) => {
            if let Err(r) = r {
                session.link.close(&conn, r.code, &r.reason);
            }
        }
        () = accept_uploads(&shared, &session) => {}
        () = pump(&shared, &session, &mut live_rx) => {}
        () = cancel.cancelled() => {}
    }
    shared.router.leave(&session, session.channels.keys());
    session.count_usage(&shared.usage);
    if let Some(c) = &shared.cluster {
        for subj in &subjects {
            c.unwant(subj);
        }
    }
    let why = conn.close_reason();
    info!(user = %session.user, session = session.id, reason = ?why, "session end");
}

fn handshake_failed(error: &dyn std::fmt::Display) {
    metrics::count(metrics::HANDSHAKES, "outcome", "failed");
    debug!(%error, "handshake failed");
}

/// A browser's connection: the HTTP/3 handshake up to its WebTransport
/// session, on a complete TLS handshake. `None`: refused (closed).
async fn web_session(shared: &Node, conn: &Connection, handshake: &mut Handshake) -> Option<Link> {
    let deadline = Instant::now() + shared.config.auth_timeout;
    if !handshake.complete(conn, deadline).await {
        return None;
    }
    match crate::webtransport::accept(conn, &shared.config, deadline).await {
        Ok(link) => Some(link),
        Err(why) => {
            debug!(remote = %conn.remote_address(), %why, "WebTransport session refused");
            metrics::count(metrics::CONNECTIONS_REJECTED, "reason", "webtransport");
            quic::close(conn, ErrorCode::ProtocolViolation, &why);
            None
        }
    }
}

/// A session registered, its live queue, the control stream's reader, and
/// the `Welcome` to send once it has joined its channels.
type Authenticated = (
    Arc<Session>,
    mpsc::Receiver<Arc<LiveClip>>,
    MessageReader,
    Message,
);

/// A connection's TLS handshake, for a connection served before it is
/// complete (0-RTT data read, 0.5-RTT data sent). Counted in
/// `ptt_handshakes_total` once it settles.
enum Handshake {
    /// quinn's future resolves when the handshake ends either way (its
    /// value means nothing on a server): a connection still open then has
    /// completed it.
    Pending(quinn::ZeroRttAccepted),
    Complete,
    Failed,
}

impl Handshake {
    /// Whether it is complete, without waiting.
    fn check(&mut self, conn: &Connection) -> bool {
        if let Handshake::Pending(done) = self {
            if done.now_or_never().is_none() {
                return false;
            }
            self.end(conn);
        }
        matches!(self, Handshake::Complete)
    }

    /// Waits until it is complete, at most until `deadline`.
    async fn complete(&mut self, conn: &Connection, deadline: Instant) -> bool {
        if let Handshake::Pending(done) = self {
            match timeout_at(deadline, done).await {
                Ok(_) => self.end(conn),
                Err(_) => self.fail(),
            }
        }
        matches!(self, Handshake::Complete)
    }

    fn is_pending(&self) -> bool {
        matches!(self, Handshake::Pending(_))
    }

    /// Settles one still pending (the connection is given up).
    fn settle(&mut self, conn: &Connection) {
        if !self.check(conn) && self.is_pending() {
            self.fail();
        }
    }

    /// It ended: completed if the connection is still open.
    fn end(&mut self, conn: &Connection) {
        if conn.close_reason().is_some() {
            return self.fail();
        }
        metrics::count(metrics::HANDSHAKES, "outcome", "completed");
        *self = Handshake::Complete;
    }

    fn fail(&mut self) {
        metrics::count(metrics::HANDSHAKES, "outcome", "failed");
        *self = Handshake::Failed;
    }
}

fn late(cfg: &crate::Config) -> Refusal {
    Refusal::new(
        ErrorCode::Unauthenticated,
        format!("no Auth within {:?}", cfg.auth_timeout),
    )
}

/// Reads the first message, which must be `Auth`, and checks its token.
async fn check_auth(
    shared: &Node,
    rd: &mut MessageReader,
    deadline: Instant,
) -> Result<codec::token::Claims, Refusal> {
    let msg = timeout_at(deadline, rd.next())
        .await
        .map_err(|_| late(&shared.config))?
        .map_err(Refusal::from)?;
    let token = match msg {
        Some(Message::Auth(a)) => a.token,
        _ => {
            return Err(Refusal::new(
                ErrorCode::Unauthenticated,
                "the first message must be Auth",
            ));
        }
    };
    shared.verify_token(&token).map_err(|e| match e {
        codec::token::TokenError::Expired => Refusal::new(ErrorCode::TokenExpired, e.to_string()),
        codec::token::TokenError::Invalid(_) => {
            Refusal::new(ErrorCode::TokenInvalid, e.to_string())
        }
    })
}

async fn authenticate(
    shared: &Arc<Node>,
    conn: &Connection,
    link: &Link,
    handshake: &mut Handshake,
) -> Result<Authenticated, Refusal> {
    let cfg = &shared.config;
    let deadline = Instant::now() + cfg.auth_timeout;
    let (send, mut recv) = timeout_at(deadline, conn.accept_bi())
        .await
        .map_err(|_| late(cfg))?
        .map_err(|e| Refusal::new(ErrorCode::NoError, e.to_string()))?;
    timeout_at(deadline, link.enter(&mut recv))
        .await
        .map_err(|_| late(cfg))?
        .map_err(|e| Refusal::new(ErrorCode::ProtocolViolation, e.to_string()))?;
    let mut rd = MessageReader::new(recv, cfg.max_message_bytes);
    let claims = match check_auth(shared, &mut rd, deadline).await {
        Ok(c) => c,
        Err(refusal) => {
            // A refusal of an `Auth` read from 0-RTT waits for the
            // handshake (the control stream kept open meanwhile): a close
            // sent before it carries no application code (RFC 9000
            // §10.2.3), and the client must learn `token_invalid` or
            // `token_expired`.
            handshake.complete(conn, deadline).await;
            return Err(refusal);
        }
    };
    crate::credit::open_credit(cfg, conn, link.extra_bidi());
    let id = shared.next_session_id();
    let welcome = Message::Welcome(Welcome {
        user: claims.sub.clone(),
        session_id: id,
        limits: cfg.limits(),
    });
    // Read before the handshake completed: it came in 0-RTT.
    if !handshake.check(conn) && handshake.is_pending() {
        metrics::count1(metrics::ZERO_RTT_AUTHS);
    }
    let (live_tx, live_rx) = mpsc::channel(cfg.live_queue);
    // The control stream's send side is kept open for a later `GoAway`.
    let session = Arc::new(Session::new(
        id,
        Arc::from(claims.sub.as_str()),
        conn.clone(),
        live_tx,
        send,
        claims.channels,
        link.clone(),
    ));
    if let Some(old) = shared.router.register(session.clone()) {
        old.link.close(
            &old.conn,
            ErrorCode::SessionReplaced,
            "replaced by a newer connection of the same user",
        );
    }
    Ok((session, live_rx, rd, welcome))
}

/// Reads acks until the control stream ends.
async fn control_loop(
    shared: &Arc<Node>,
    session: &Arc<Session>,
    mut ctl: MessageReader,
) -> Result<(), Refusal> {
    loop {
        match ctl.next().await {
            Ok(Some(Message::Ack(id))) => {
                if shared.expired.ack(&session.user, &id) {
                    // An `Expired` notice read: its clip has no copy left
                    // (a delivery of it still open frees its place).
                    session.finish(&id);
                    continue;
                }
                match shared.store.ack(&session.user, &id).await {
                    Ok(_) => metrics::hot().delivered.increment(1),
                    Err(e) => warn!(error = %e, "store ack failed"),
                }
                if let Some(c) = &shared.cluster {
                    // Never waits on NATS (held while cut off).
                    c.acked(&id, &session.user);
                }
                session.finish(&id);
            }
            Ok(Some(Message::UsageQuery(q))) => {
                // This user's figures only, current to this answer.
                session.count_usage(&shared.usage);
                let today = crate::usage::today();
                let usage = Message::Usage(codec::wire::Usage {
                    today,
                    days: shared.usage.days(&session.user, q.days, today),
                });
                if let Err(e) = Box::pin(session.send_control(&usage)).await {
                    debug!(error = %e, "Usage not sent");
                }
            }
            Ok(Some(Message::PushRegister(r))) => {
                let push = &shared.push;
                let result =
                    Box::pin(push.register(&session.user, session.channels.keys(), r)).await;
                if let Err(e) = Box::pin(session.send_control(&Message::PushResult(result))).await {
                    debug!(error = %e, "PushResult not sent");
                }
            }
            Ok(Some(Message::PushUnregister(device_id))) => {
                let result = Box::pin(shared.push.unregister(&session.user, device_id)).await;
                if let Err(e) = Box::pin(session.send_control(&Message::PushResult(result))).await {
                    debug!(error = %e, "PushResult not sent");
                }
            }
            Ok(Some(Message::Unknown(_))) => {}
            Ok(Some(other)) => {
                return Err(Refusal::new(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "message type 0x{:x} not allowed on the control stream",
                        other.kind()
                    ),
                ));
            }
            Ok(None) => return Err(Refusal::new(ErrorCode::NoError, "control stream finished")),
            Err(StreamError::Read(_)) => return Ok(()),
            Err(e) => return Err(Refusal::from(e)),
        }
    }
}

async fn accept_uploads(shared: &Arc<Node>, session: &Arc<Session>) {
    // The transport parameters allow a browser's HTTP/3 streams; a native
    // client opening a unidirectional stream is told no at once.
    let native = matches!(session.link, Link::Quic);
    loop {
        let (send, mut recv) = tokio::select! {
            r = session.conn.accept_bi() => match r {
                Ok(s) => s,
                Err(_) => return,
            },
            r = session.conn.accept_uni(), if native => {
                match r {
                    Ok(mut s) => {
                        let _ = s.stop(session.link.code(ErrorCode::ProtocolViolation));
                    }
                    Err(_) => return,
                }
                continue;
            }
        };
        let shared = shared.clone();
        let session = session.clone();
        shared.clone().tracker.spawn(async move {
            let idle = shared.config.upload_idle_timeout;
            if !matches!(
                timeout(idle, session.link.enter(&mut recv)).await,
                Ok(Ok(()))
            ) {
                let _ = recv.stop(session.link.code(ErrorCode::ProtocolViolation));
                return;
            }
            upload(&shared, &session, send, recv).await;
        });
    }
}

async fn reply(send: &mut SendStream, msg: Message) {
    if quic::write_message(send, &msg).await.is_ok() && send.finish().is_ok() {
        // Until the sender has the answer (so a shutdown that drains
        // uploads does not close the connection under it), bounded.
        let _ = timeout(std::time::Duration::from_secs(2), send.stopped()).await;
    }
}

/// One clip upload: header, packets relayed live as they arrive, stored,
/// then "accepted".
async fn upload(
    shared: &Arc<Node>,
    session: &Arc<Session>,
    mut send: SendStream,
    recv: RecvStream,
) {
    let cfg = &shared.config;
    let mut rd = MessageReader::new(recv, cfg.max_message_bytes);
    let header = match read_clip_header(shared, &mut rd).await {
        Ok(h) => h,
        Err(r) => {
            // No clip id could be read: the answer carries the all-zero id.
            debug!(code = r.code.name(), reason = %r.reason, "bad clip header");
            return refuse(&session.link, &mut send, &mut rd, ClipId([0; 16]), r).await;
        }
    };
    let id = header.clip_id;
    let recipients = match admit(shared, session, &header).await {
        // A retry of an accepted clip is answered without charging the
        // user's budget; a new clip must fit it.
        Ok(Admit::New(r)) => match budget(shared, session) {
            Ok(()) => r,
            Err(r) => return refuse(&session.link, &mut send, &mut rd, id, r).await,
        },
        Ok(Admit::Duplicate) => {
            metrics::hot().duplicate.increment(1);
            let _ = rd.stream().stop(session.link.code(ErrorCode::NoError));
            reply(
                &mut send,
                Message::Accepted(Accepted {
                    clip_id: id,
                    duplicate: true,
                }),
            )
            .await;
            return;
        }
        Err(r) => return refuse(&session.link, &mut send, &mut rd, id, r).await,
    };
    let Some((upload_no, stop)) = shared.begin_upload(id, &session.user) else {
        return refuse(&session.link, &mut send, &mut rd, id, Refusal::conflict()).await;
    };
    let channel = match &header.target {
        Target::Channel(c) => Some(c.clone()),
        Target::User(_) => None,
    };
    let cluster_floor = match &channel {
        Some(c) => match take_floors(shared, session, c, id, upload_no, &stop).await {
            Ok(rev) => rev,
            Err(r) => {
                shared.end_upload(id, upload_no);
                return refuse(&session.link, &mut send, &mut rd, id, r).await;
            }
        },
        None => None,
    };
    let meta = Arc::new(ClipMeta {
        id,
        sender: session.user.clone(),
        target: header.target,
        format: header.format,
        created_ms: crate::now_ms(),
    });
    let live = LiveClip::new(meta.clone());
    fan_out(shared, &live, &recipients, channel.as_deref());
    shared.speaking.begin(&live);
    let mut held = 0u64;
    let result = tokio::select! {
        r = receive_packets(shared, &mut rd, &live, &mut held) => r,
        (code, reason) = stop.stopped() => Err(Refusal::new(code, reason)),
    };
    shared
        .inflight
        .fetch_sub(held, std::sync::atomic::Ordering::Relaxed);
    if let Some(mut b) = shared.budgets.get_mut(&session.user) {
        b.charge_bytes(held, std::time::Instant::now());
    }
    // Ok(duplicate?) once stored; the live clip completes only if new.
    let ended = std::time::Instant::now();
    let result = result.and_then(|end| match live.body() {
        Ok(body) => Ok((body, end)),
        Err(e) => Err(Refusal::new(ErrorCode::Internal, e.to_string())),
    });
    let outcome = match result {
        Ok((body, end)) => {
            let clip = Arc::new(StoredClip::new(meta, body, end));
            store_clip(shared, &live, clip, &recipients, channel.as_deref()).await
        }
        Err(r) => {
            // Listeners learn a pre-emption as such; anything else is a cut.
            let code = if r.code == ErrorCode::Preempted {
                ErrorCode::Preempted
            } else {
                ErrorCode::CutOff
            };
            live.cut(code);
            metrics::count(metrics::CLIPS_CUT, "reason", code.name());
            let _ = rd.stream().stop(session.link.code(r.code));
            Err(r)
        }
    };
    shared.end_upload(id, upload_no);
    shared.speaking.end(&live);
    if let Some(c) = &channel {
        shared.router.release_floor(c, upload_no);
        if let (Some(cl), Some(rev)) = (&shared.cluster, cluster_floor) {
            cl.release_floor(rev);
        }
    }
    // The answer is ready (stored, or refused): what the sender waits for
    // beyond its own upload, without the round trip of the reply itself.
    metrics::hot().sender_ack.record(ended.elapsed());
    answer(&mut send, id, outcome, channel.is_some()).await;
}

/// Takes channel `c`'s floor for upload `upload_no`: in a cluster
/// cluster-wide first (one truth for every relay; its JetStream revision is
/// returned, to release it), then in this relay's router (local
/// pre-emption). A cluster that cannot answer leaves the decision to this
/// relay alone.
async fn take_floors(
    shared: &Node,
    session: &Session,
    c: &str,
    id: ClipId,
    upload_no: u64,
    stop: &Stop,
) -> Result<Option<u64>, Refusal> {
    let mut cluster_floor = None;
    if let Some(cl) = &shared.cluster {
        let me = cluster::FloorHolder {
            priority: session.channels.get(c) == Some(&Right::Priority),
            relay: cl.id,
            clip: id,
            user: session.user.to_string(),
        };
        match cl.take_floor(c, me).await {
            Ok(cluster::FloorAnswer::Granted(rev)) => cluster_floor = Some(rev),
            Ok(cluster::FloorAnswer::Busy(holder)) => {
                metrics::count1(metrics::FLOOR_BUSY);
                return Err(Refusal::new(
                    ErrorCode::FloorBusy,
                    format!("busy: {holder} holds the floor of {c}"),
                ));
            }
            Err(e) => {
                warn!(error = %e, channel = %c, "cluster floor unavailable: this relay decides alone");
            }
        }
    }
    if let Err(r) = take_floor(shared, session, c, upload_no, stop) {
        if let (Some(cl), Some(rev)) = (&shared.cluster, cluster_floor) {
            cl.release_floor(rev);
        }
        return Err(r);
    }
    Ok(cluster_floor)
}

/// Offers a starting clip to its recipients online here, and publishes it
/// once for those on other relays (each user not online here; a channel's
/// members elsewhere, once for all).
fn fan_out(
    shared: &Arc<Node>,
    live: &Arc<LiveClip>,
    recipients: &[Arc<str>],
    channel: Option<&str>,
) {
    for r in recipients {
        match shared.router.session(r) {
            Some(s) if !s.offer_live(live.clone()) => {
                metrics::hot().live_fallbacks.increment(1);
                debug!(recipient = %r, "live queue full; recipient gets the clip from the store");
            }
            Some(_) => {}
            // Maybe on another relay: published once for it.
            None => {
                if let Some(c) = &shared.cluster {
                    c.forward(&shared.state, live.clone(), cluster::user_subject(r));
                }
            }
        }
    }
    if let (Some(c), Some(ch)) = (&shared.cluster, channel) {
        c.forward(&shared.state, live.clone(), cluster::channel_subject(ch));
    }
}

/// Stores a whole clip for its recipients; `Ok(duplicate)` once it counts
/// as accepted. The relay holds the clip whole: a store that keeps early
/// acks lets the live recipients have the end now, with the last audio,
/// rather than after the disk commit that `Accepted` waits for, and only
/// once it keeps their acks (so none is lost). Not in a cluster, whose
/// copies for other relays are kept first. The live clip's first outcome
/// holds: a later `complete` or `cut` is a no-op.
async fn store_clip(
    shared: &Node,
    live: &LiveClip,
    clip: Arc<StoredClip>,
    recipients: &[Arc<str>],
    channel: Option<&str>,
) -> Result<bool, Refusal> {
    let appended = if shared.cluster.is_none() {
        let end_now = || live.complete(clip.clone());
        shared
            .store
            .append_ending_early(clip.clone(), recipients, &end_now)
            .await
    } else {
        shared.store.append(clip.clone(), recipients).await
    };
    let stored = match appended {
        Ok(Appended::New) => Ok(false),
        Ok(Appended::Duplicate) => Ok(true),
        Ok(Appended::Conflict) => Err(Refusal::conflict()),
        Err(StoreError::Full { limit }) => Err(Refusal::new(
            ErrorCode::StorageFull,
            format!("relay store full ({limit} bytes)"),
        )),
        Err(e) => Err(Refusal::new(ErrorCode::Internal, e.to_string())),
    };
    // A direct clip is also kept in the cluster before it counts as
    // accepted: any relay can deliver it, and it outlives this one. A
    // channel clip goes into the cluster's channel history.
    if let (Some(c), Ok(false)) = (&shared.cluster, &stored) {
        match channel {
            None => {
                for r in recipients {
                    let elsewhere = !shared.router.is_online(r);
                    // Cut off: held here, written when the link is back
                    // (counted in ptt_cluster_held_clips; the loss of the
                    // link is logged once).
                    if let Err(e) = c.keep(&clip, r, elsewhere).await {
                        debug!(error = %e, "cluster: clip held on this relay until the link is back");
                    }
                }
            }
            Some(ch) => {
                if let Err(e) = c.keep_history(ch, &clip).await {
                    debug!(error = %e, "cluster: channel clip held on this relay until the link is back");
                }
            }
        }
    }
    if matches!(stored, Ok(false)) {
        stored_new(shared, live, clip, recipients, channel).await;
    } else {
        live.cut(ErrorCode::CutOff);
    }
    stored
}

/// Counts and sends an upload's one answer.
async fn answer(send: &mut SendStream, id: ClipId, outcome: Result<bool, Refusal>, channel: bool) {
    match outcome {
        Ok(duplicate) => {
            let hot = metrics::hot();
            match (duplicate, channel) {
                (true, _) => hot.duplicate.increment(1),
                (false, false) => hot.accepted_user.increment(1),
                (false, true) => hot.accepted_channel.increment(1),
            }
            reply(
                send,
                Message::Accepted(Accepted {
                    clip_id: id,
                    duplicate,
                }),
            )
            .await;
        }
        Err(r) => {
            debug!(clip = %id, code = r.code.name(), reason = %r.reason, "clip refused");
            metrics::count(metrics::CLIPS_REJECTED, "reason", r.code.name());
            reply(send, rejected(id, r)).await;
        }
    }
}

fn rejected(clip_id: ClipId, r: Refusal) -> Message {
    Message::Rejected(Rejected {
        clip_id,
        code: r.code,
        retry_after_ms: r.retry_after_ms(),
        reason: r.reason,
    })
}

/// Refuses an upload before it starts: stops the stream, answers why.
async fn refuse(
    link: &Link,
    send: &mut SendStream,
    rd: &mut MessageReader,
    id: ClipId,
    r: Refusal,
) {
    metrics::count(metrics::CLIPS_REJECTED, "reason", r.code.name());
    let _ = rd.stream().stop(link.code(r.code));
    reply(send, rejected(id, r)).await;
}

/// The user's clip budget and the relay's in-flight memory budget.
fn budget(shared: &Node, session: &Session) -> Result<(), Refusal> {
    let cfg = &shared.config;
    let inflight = shared.inflight.load(std::sync::atomic::Ordering::Relaxed);
    if inflight >= cfg.max_inflight_bytes {
        return Err(Refusal::new(
            ErrorCode::ServerBusy,
            format!("relay at max_inflight_bytes ({})", cfg.max_inflight_bytes),
        )
        .retry_after(std::time::Duration::from_millis(500)));
    }
    if cfg.max_clips_per_minute == 0 && cfg.max_clip_bytes_per_minute == 0 {
        return Ok(());
    }
    let now = std::time::Instant::now();
    let mut b = shared
        .budgets
        .entry(session.user.clone())
        .or_insert_with(|| {
            crate::limits::UserBudget::new(
                cfg.max_clips_per_minute,
                cfg.max_clip_bytes_per_minute,
                now,
            )
        });
    b.admit(now).map_err(|wait| {
        Refusal::new(
            ErrorCode::RateLimited,
            format!(
                "over {} clips or {} bytes per minute",
                cfg.max_clips_per_minute, cfg.max_clip_bytes_per_minute
            ),
        )
        .retry_after(wait)
    })
}

/// Gives a member who connects what its channels said while it was away
/// (within the history's depth and age), once, merged with the clips
/// already waiting for it in the order the relay accepted them.
async fn replay_history(shared: &Node, session: &Arc<Session>) {
    let oldest = shared.config.history_cutoff_ms(crate::now_ms());
    let mut missed: Vec<(u64, &String, Arc<StoredClip>)> = Vec::new();
    for c in session.channels.keys() {
        if let Some(h) = shared.history.get(c) {
            missed.extend(
                h.clips
                    .iter()
                    .filter(|(_, clip)| {
                        clip.meta.sender != session.user && clip.meta.created_ms >= oldest
                    })
                    .map(|(seq, clip)| (*seq, c, clip.clone())),
            );
        }
    }
    // Whoever claims an entry first gives the copy: once.
    missed.retain(|(seq, c, _)| claim_seen(shared, &session.user, c, *seq));
    if missed.is_empty() {
        return;
    }
    let clips = missed.iter().map(|(_, _, clip)| clip.clone()).collect();
    match shared
        .store
        .queue_history(session.user.clone(), clips)
        .await
    {
        Ok(_) => session.store_changed(),
        Err(e) => {
            // Not given: offered again at the next connection.
            warn!(error = %e, "channel history replay failed");
            for (seq, c, _) in &missed {
                unclaim_seen(shared, &session.user, c, *seq);
            }
        }
    }
}

/// Takes channel `c`'s floor for this upload: free, or held by the same
/// user (a retry), or pre-empted by a priority talker. Otherwise
/// `floor_busy` naming the holder.
fn take_floor(
    shared: &Node,
    session: &Session,
    c: &str,
    upload: u64,
    stop: &Stop,
) -> Result<(), Refusal> {
    use crate::router::{FloorClaim, FloorDecision};
    let claim = FloorClaim {
        user: session.user.clone(),
        upload,
        priority: session.channels.get(c) == Some(&Right::Priority),
        stop: stop.clone(),
    };
    // The holder's clip, when displaced, is cut for its listeners.
    match shared.router.take_floor(c, claim) {
        FloorDecision::Granted => {}
        FloorDecision::Superseded(old) => old.stop(ErrorCode::CutOff, "superseded by a newer clip"),
        FloorDecision::Preempted { stop: old, .. } => {
            old.stop(
                ErrorCode::Preempted,
                format!("{} (priority) took the floor of {c}", session.user),
            );
            metrics::count1(metrics::FLOOR_PREEMPTIONS);
        }
        FloorDecision::Busy { holder } => {
            metrics::count1(metrics::FLOOR_BUSY);
            return Err(Refusal::new(
                ErrorCode::FloorBusy,
                format!("busy: {holder} holds the floor of {c}"),
            ));
        }
    }
    metrics::count1(metrics::FLOOR_GRANTS);
    Ok(())
}

enum Admit {
    New(Vec<Arc<str>>),
    Duplicate,
}

/// Checks the header: target, and whether this id was seen.
async fn admit(shared: &Node, session: &Session, h: &ClipHeader) -> Result<Admit, Refusal> {
    if let Target::Channel(c) = &h.target
        && session.channels.get(c).is_none_or(|r| *r < Right::Talk)
    {
        return Err(Refusal::new(
            ErrorCode::NotAllowed,
            format!("no talk right in channel {c}"),
        ));
    }
    // The user, or every other online member (each has at least listen).
    let recipients = shared.router.recipients(&h.target, &session.user);
    match shared.store.sender_of(&h.clip_id).await {
        Ok(Some(s)) => match Appended::for_known(&s, &session.user) {
            Appended::Duplicate => Ok(Admit::Duplicate),
            _ => Err(Refusal::conflict()),
        },
        Ok(None) => Ok(Admit::New(recipients)),
        Err(e) => Err(Refusal::new(ErrorCode::Internal, e.to_string())),
    }
}

/// Reads an upload's first message, its `ClipHeader`, skipping messages
/// of unknown types before it (as everywhere in ptt/1). Anything else, a
/// header that breaks its rules, a stream that ends first or nothing for
/// `upload_idle_timeout` is refused.
async fn read_clip_header(shared: &Node, rd: &mut MessageReader) -> Result<ClipHeader, Refusal> {
    let idle = shared.config.upload_idle_timeout;
    loop {
        match timeout(idle, rd.next()).await {
            Ok(Ok(Some(Message::ClipHeader(h)))) => return Ok(h),
            Ok(Ok(Some(Message::Unknown(_)))) => {}
            Ok(Ok(Some(other))) => {
                return Err(Refusal::new(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "an upload starts with ClipHeader, not message type 0x{:x}",
                        other.kind()
                    ),
                ));
            }
            Ok(Ok(None)) => {
                return Err(Refusal::new(
                    ErrorCode::ProtocolViolation,
                    "upload stream finished before its ClipHeader",
                ));
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(Refusal::new(
                    ErrorCode::UploadIdleTimeout,
                    format!("no ClipHeader within {idle:?}"),
                ));
            }
        }
    }
}

/// Reads packet records until the end record and FIN, pushing each
/// validated run of records to the live clip as it arrives.
async fn receive_packets(
    shared: &Node,
    rd: &mut MessageReader,
    live: &LiveClip,
    held: &mut u64,
) -> Result<ClipEnd, Refusal> {
    let cfg = &shared.config;
    let mut framer = Framer::for_clip(cfg.frame_limits(), live.meta.format.pre_skip);
    let mut end = None;
    let hot = metrics::hot();
    // The upload must keep up with real time: it is refused once the time
    // since its start passes its audio so far plus `max_upload_lag` (a
    // trickle cannot hold a floor).
    let started = Instant::now();
    let behind = |f: &Framer| {
        started + std::time::Duration::from_millis(f.samples() / 48) + cfg.max_upload_lag
    };
    loop {
        if Instant::now() >= behind(&framer) {
            return Err(Refusal::new(
                ErrorCode::UploadIdleTimeout,
                format!(
                    "upload more than {:?} behind real time ({} ms of audio in {:?})",
                    cfg.max_upload_lag,
                    framer.samples() / 48,
                    started.elapsed()
                ),
            ));
        }
        let buf = rd.buffer();
        let before = framer.packets();
        let scan = framer
            .scan(buf)
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        if scan.records > 0 {
            let n = scan.records as u64;
            let packets = framer.packets() - before;
            hot.packets_in.increment(packets);
            hot.bytes_in.increment(n);
            let inflight = shared
                .inflight
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed)
                + n;
            *held += n;
            if inflight > cfg.max_inflight_bytes {
                return Err(Refusal::new(
                    ErrorCode::ServerBusy,
                    format!("relay at max_inflight_bytes ({})", cfg.max_inflight_bytes),
                )
                .retry_after(std::time::Duration::from_millis(500)));
            }
            live.push(buf.split_to(scan.records).freeze(), packets)
                .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
            if before == 0 {
                // The clip's first packet: wake its recipients who have no
                // connected session (never waits).
                let m = &live.meta;
                shared
                    .push
                    .clip_started(m.id, &m.sender, &m.target, |u| shared.router.is_online(u));
            }
        }
        if let Some((e, n)) = scan.end {
            let _ = buf.split_to(n);
            end = Some(e);
        }
        let idle = Instant::now() + cfg.upload_idle_timeout;
        let behind = behind(&framer);
        match timeout_at(idle.min(behind), rd.fill()).await {
            // Behind real time: refused at the top of the loop.
            Err(_) if Instant::now() >= behind => {}
            Err(_) => {
                return Err(Refusal::new(
                    ErrorCode::UploadIdleTimeout,
                    format!("no data for {:?}", cfg.upload_idle_timeout),
                ));
            }
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                return match end {
                    Some(e) if rd.buffer().is_empty() => Ok(e),
                    Some(_) => Err(Refusal::new(
                        ErrorCode::ProtocolViolation,
                        "bytes after the clip end",
                    )),
                    None => Err(Refusal::new(
                        ErrorCode::ProtocolViolation,
                        "stream finished before the clip end",
                    )),
                };
            }
            Ok(Err(e)) => {
                return Err(Refusal::new(
                    ErrorCode::CutOff,
                    format!("upload aborted: {e}"),
                ));
            }
        }
    }
}

/// Starts deliveries: live clips as they are offered, stored clips from the
/// store within the window. Returns when the connection closes.
async fn pump(
    shared: &Arc<Node>,
    session: &Arc<Session>,
    live_rx: &mut mpsc::Receiver<Arc<LiveClip>>,
) {
    let window = shared.config.max_unacked_deliveries;
    let mut cursor = 0;
    let mut scan = true;
    let mut order = StoredOrder::default();
    loop {
        // Live offers first: an offer always precedes the store's change for
        // the same clip, so draining them here keeps a clip relayed live
        // from being sent again from the store.
        while let Ok(live) = live_rx.try_recv() {
            if start_live(shared, session, live).await.is_err() {
                return;
            }
        }
        while scan {
            let room = window.saturating_sub(session.stored_open());
            if room == 0 {
                break;
            }
            let batch = match shared.store.read(&session.user, cursor, room).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "store read failed");
                    break;
                }
            };
            if batch.is_empty() {
                scan = false;
            }
            for (c, clip) in batch {
                // A live clip that starts meanwhile is not held behind
                // the batch (it goes out at a higher send priority).
                while let Ok(live) = live_rx.try_recv() {
                    if start_live(shared, session, live).await.is_err() {
                        return;
                    }
                }
                cursor = c;
                let id = clip.meta.id;
                if session.begin_stored(id, || shared.store.holds(&session.user, &id))
                    && start_stored(shared, session, clip, &mut order)
                        .await
                        .is_err()
                {
                    return;
                }
            }
        }
        tokio::select! {
            live = live_rx.recv() => {
                let Some(live) = live else { return };
                if start_live(shared, session, live).await.is_err() {
                    return;
                }
            }
            () = session.dirty.notified() => scan = true,
            () = session.window.notified() => {}
            _ = session.conn.closed() => return,
        }
    }
}

async fn start_live(
    shared: &Arc<Node>,
    session: &Arc<Session>,
    live: Arc<LiveClip>,
) -> Result<(), Gone> {
    let id = live.meta.id;
    if !session.begin_live(id) {
        return Ok(());
    }
    let send = match session.link.open_uni(&session.conn).await {
        Ok(s) => s,
        Err(_) => return Err(Gone),
    };
    metrics::hot().deliveries_live.increment(1);
    let session = session.clone();
    let fault = shared.faults.pick();
    let shared2 = shared.clone();
    shared.tracker.spawn(async move {
        if !write_live(send, live, fault, &shared2, &session).await {
            session.finish(&id);
        }
    });
    Ok(())
}

/// Writes a live clip as it arrives. Returns true when the clip completed
/// (it then waits for the recipient's ack), false when it was cut.
async fn write_live(
    mut send: SendStream,
    live: Arc<LiveClip>,
    mut fault: Fault,
    shared: &Arc<Node>,
    session: &Arc<Session>,
) -> bool {
    let mut reader = live.reader();
    // The header goes out with the first packets (or the end), not ahead of
    // them: one QUIC packet per recipient at a clip's start instead of two,
    // which halves a channel's fan-out burst.
    let mut header = Some(live.header.clone());
    let hot = metrics::hot();
    loop {
        match reader.next().await {
            Next::Data(crate::live::Batch {
                mut segs,
                packets,
                bytes,
                since,
            }) => {
                if matches!(fault, Fault::DropPacket | Fault::Corrupt)
                    && let Some(first) = segs.first_mut()
                {
                    *first = faults::mangle(fault, first.clone());
                    fault = Fault::None;
                }
                if let Some(h) = header.take() {
                    segs.insert(0, h);
                }
                if send.write_all_chunks(&mut segs).await.is_err() {
                    return true;
                }
                hot.hop.record(since.elapsed());
                hot.packets_out.increment(packets);
                hot.bytes_out.increment(bytes);
            }
            Next::Complete(clip) => {
                // (An empty chunk where the header went out already.)
                let mut last = [header.take().unwrap_or_default(), clip.end_bytes.clone()];
                if send.write_all_chunks(&mut last).await.is_ok() {
                    let _ = send.finish();
                }
                if fault == Fault::Duplicate {
                    let _ = start_stored_copy(shared, session, clip, Fault::None, None).await;
                }
                return true;
            }
            Next::Cut(code) => {
                let _ = send.reset(session.link.code(code));
                return false;
            }
        }
    }
}

/// The order of one connection's stored deliveries. They are opened oldest
/// first (so stream ids rise with acceptance order), each is written only
/// after the one before it is wholly handed to QUIC, and each has a lower
/// send priority than the one before (live deliveries keep quinn's default
/// 0, above them all): the older clip's bytes leave first, and a live clip
/// is never held behind a backlog.
#[derive(Default)]
struct StoredOrder {
    /// Stored deliveries started on this connection.
    started: u32,
    turns: quic::Turns,
}

impl StoredOrder {
    /// The next delivery's send priority, and its turn to write.
    fn next(&mut self) -> (i32, quic::Turn) {
        self.started = self.started.saturating_add(1);
        let priority = i32::try_from(self.started).map_or(i32::MIN + 1, |n| -n);
        (priority, self.turns.next_turn())
    }
}

async fn start_stored(
    shared: &Arc<Node>,
    session: &Arc<Session>,
    clip: Arc<StoredClip>,
    order: &mut StoredOrder,
) -> Result<(), Gone> {
    let fault = shared.faults.pick();
    if fault == Fault::Duplicate {
        start_stored_copy(shared, session, clip.clone(), Fault::None, None).await?;
    }
    start_stored_copy(shared, session, clip, fault, Some(order)).await
}

/// Writes one stored clip on a new stream, in `order` (the deliberate
/// duplicate of the fault injector takes none).
async fn start_stored_copy(
    shared: &Arc<Node>,
    session: &Arc<Session>,
    clip: Arc<StoredClip>,
    fault: Fault,
    order: Option<&mut StoredOrder>,
) -> Result<(), Gone> {
    let mut send = match session.link.open_uni(&session.conn).await {
        Ok(s) => s,
        Err(_) => return Err(Gone),
    };
    let mut turn = match order {
        Some(o) => {
            let (priority, turn) = o.next();
            let _ = send.set_priority(priority);
            turn
        }
        None => quic::Turn::default(),
    };
    let hot = metrics::hot();
    hot.deliveries_stored.increment(1);
    shared.tracker.spawn(async move {
        turn.wait().await;
        let body = match fault {
            Fault::None | Fault::Duplicate => clip.body.clone(),
            f => faults::mangle(f, clip.body.clone()),
        };
        let mut chunks: [Bytes; 3] = [clip.header.clone(), body, clip.end_bytes.clone()];
        let written = send.write_all_chunks(&mut chunks).await.is_ok();
        // Handed to QUIC: the next stored delivery may write now.
        drop(turn);
        if written {
            let _ = send.finish();
            hot.packets_out.increment(clip.end.packet_count);
            hot.bytes_out.increment(clip.body.len() as u64);
        }
    });
    Ok(())
}
