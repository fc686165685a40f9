//! A clip coming in: its header checked and admitted, floors taken, the
//! live fan-out, its packets read and validated, then stored and answered.

use relay_core::upload::{Pace, finished};

use crate::state::{ClusterFloor, To};

use super::*;

pub(super) async fn accept_uploads(shared: &Arc<Shared>, session: &Arc<Session>) {
    // The transport parameters allow a browser's HTTP/3 streams; a native
    // client opening a unidirectional stream is told no at once.
    let native = matches!(session.link, Link::Quic);
    let slots = crate::credit::upload_slots(&shared.config);
    let mut first = true;
    loop {
        // At most `max_clip_streams` read at once; further ones wait in
        // QUIC's buffers, bounded by the connection's window.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
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
        if std::mem::take(&mut first) {
            let extra = session.link.extra_bidi();
            crate::credit::upload_credit(&shared.config, &session.conn, extra);
        }
        let shared = shared.clone();
        let session = session.clone();
        shared.clone().tracker.spawn(async move {
            let _slot = slot;
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

/// An upload's read buffer: about two seconds of voice at 16 kbit/s and
/// the header, filled chunk by chunk; the packets taken from it for the
/// live clip share it (docs/benchmarks.md, "The relay's own CPU per clip,
/// part 2").
const UPLOAD_BUFFER: usize = 4096;

/// One clip upload: header, packets relayed live as they arrive, stored,
/// then "accepted".
pub(super) async fn upload(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    mut send: SendStream,
    recv: RecvStream,
) {
    let mut rd = MessageReader::with_capacity(recv, shared.config.max_message_bytes, UPLOAD_BUFFER);
    let Some((header, recipients)) = opening(shared, session, &mut send, &mut rd).await else {
        return;
    };
    let id = header.clip_id;
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
    // One timer for the upload's waits (each read, then its answer),
    // moved forward as it goes rather than one registered per wait.
    let mut timer = std::pin::pin!(tokio::time::sleep(shared.config.upload_idle_timeout));
    let result = receive(shared, session, &mut rd, &live, &stop, timer.as_mut()).await;
    // Ok(duplicate?) once stored; the live clip completes only if new.
    let ended = std::time::Instant::now();
    let outcome = match result {
        Ok((body, end)) => {
            let clip = Arc::new(StoredClip::new(meta, body, end));
            store_clip(shared, &live, clip, &recipients, channel.as_deref()).await
        }
        Err(r) => {
            let code = relay_core::refusal::heard_as(r.code);
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
            cl.release_floor(c, rev);
        }
    }
    // The answer is ready (stored, or refused): what the sender waits for
    // beyond its own upload, without the round trip of the reply itself.
    metrics::hot().sender_ack.record(ended.elapsed());
    answer(&mut send, id, outcome, channel.is_some(), timer).await;
}

/// A clip's opening: its header read and admitted (a new clip charged to
/// the sender's budget). `None` when it was answered already: refused, or
/// a retry of a clip accepted before (`Accepted`, duplicate).
async fn opening(
    shared: &Shared,
    session: &Session,
    send: &mut SendStream,
    rd: &mut MessageReader,
) -> Option<(ClipHeader, Vec<Arc<str>>)> {
    let header = match read_clip_header(shared, rd).await {
        Ok(h) => h,
        Err(r) => {
            // No clip id could be read: the answer carries the all-zero id.
            debug!(code = r.code.name(), reason = %r.reason, "bad clip header");
            refuse(&session.link, send, rd, ClipId([0; 16]), r).await;
            return None;
        }
    };
    let id = header.clip_id;
    let refused = match admit(shared, session, &header).await {
        // A retry of an accepted clip is answered without charging the
        // user's budget; a new clip must fit it.
        Ok(Admit::New(r)) => match budget(shared, session) {
            Ok(()) => return Some((header, r)),
            Err(r) => r,
        },
        Ok(Admit::Duplicate) => {
            metrics::hot().duplicate.increment(1);
            let _ = rd.stream().stop(session.link.code(ErrorCode::NoError));
            let clip_id = id;
            let duplicate = true;
            reply(send, Message::Accepted(Accepted { clip_id, duplicate })).await;
            return None;
        }
        Err(r) => r,
    };
    refuse(&session.link, send, rd, id, refused).await;
    None
}

/// Receives the clip's packets into `live` until its end, or until the
/// upload is stopped (taken over, pre-empted); the bytes it held are given
/// back and charged to the sender. The clip's body and end when whole.
async fn receive(
    shared: &Shared,
    session: &Session,
    rd: &mut MessageReader,
    live: &LiveClip,
    stop: &Stop,
    timer: Pin<&mut Sleep>,
) -> Result<(Bytes, ClipEnd), Refusal> {
    let mut held = 0u64;
    let result = tokio::select! {
        r = receive_packets(shared, rd, live, &mut held, timer) => r,
        r = stop.stopped() => Err(r),
    };
    shared
        .inflight
        .fetch_sub(held, std::sync::atomic::Ordering::Relaxed);
    if let Some(mut b) = shared.budgets.get_mut(&session.user) {
        b.charge_bytes(held, std::time::Instant::now());
    }
    let end = result?;
    let body = live
        .body()
        .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
    Ok((body, end))
}

/// Takes channel `c`'s floor for upload `upload_no`: in a cluster
/// cluster-wide first (one truth for every relay; its JetStream revision is
/// returned, to release it), then in this relay's router (local
/// pre-emption). A cluster that cannot answer leaves the decision to this
/// relay alone.
pub(super) async fn take_floors(
    shared: &Shared,
    session: &Session,
    c: &str,
    id: ClipId,
    upload_no: u64,
    stop: &Stop,
) -> Result<Option<u64>, Refusal> {
    let mut cluster_floor = None;
    if let Some(cl) = &shared.cluster {
        let priority = session.channels.get(c) == Some(&Right::Priority);
        match cl.take_floor(c, &session.user, id, priority).await {
            Ok(ClusterFloor::Granted { seq }) => cluster_floor = Some(seq),
            Ok(ClusterFloor::Busy { holder }) => {
                metrics::count1(metrics::FLOOR_BUSY);
                return Err(Refusal::floor_busy(&holder, c));
            }
            Err(e) => {
                warn!(error = %e, channel = %c, "cluster floor unavailable: this relay decides alone");
            }
        }
    }
    if let Err(r) = take_floor(shared, session, c, upload_no, stop) {
        if let (Some(cl), Some(rev)) = (&shared.cluster, cluster_floor) {
            cl.release_floor(c, rev);
        }
        return Err(r);
    }
    Ok(cluster_floor)
}

/// Offers a starting clip to its recipients online here, and publishes it
/// once for those on other relays (each user not online here; a channel's
/// members elsewhere, once for all).
pub(super) fn fan_out(
    shared: &Arc<Shared>,
    live: &Arc<LiveClip>,
    recipients: &[Arc<str>],
    channel: Option<&str>,
) {
    shared.offer_live(live, recipients, |r| {
        // Maybe on another relay: published once for it.
        if let Some(c) = &shared.cluster {
            c.forward(shared, live.clone(), To::User(r));
        }
    });
    if let (Some(c), Some(ch)) = (&shared.cluster, channel) {
        c.forward(shared, live.clone(), To::Channel(ch));
    }
}

/// Stores a whole clip for its recipients; `Ok(duplicate)` once it counts
/// as accepted. The relay holds the clip whole: a store that keeps early
/// acks lets the live recipients have the end now, with the last audio,
/// rather than after the disk commit that `Accepted` waits for, and only
/// once it keeps their acks (so none is lost). In a cluster too, for a
/// direct clip: a live recipient's ack may then come before the
/// cluster's copy is written, and spares it
/// ([`crate::state::ClusterLink::keep`]). The live clip's first outcome
/// holds: a later `complete` or `cut` is a no-op.
pub(super) async fn store_clip(
    shared: &Shared,
    live: &LiveClip,
    clip: Arc<StoredClip>,
    recipients: &[Arc<str>],
    channel: Option<&str>,
) -> Result<bool, Refusal> {
    // Live recipients get the end as soon as the store keeps their acks
    // (it reports the clip committing), not after the commit. A channel
    // clip in a cluster ends once the cluster's history has it too.
    let end_early = shared.cluster.is_none() || channel.is_none();
    let appended = if end_early {
        let (committing, reported) = CommitReport::new();
        let append = shared
            .store
            .append_reporting(clip.clone(), recipients, committing);
        let end_when_reported = async {
            if reported.await.is_ok() {
                live.complete(clip.clone());
            }
        };
        tokio::join!(append, end_when_reported).0
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
    // A direct clip's live recipient has it whole once it is stored, if
    // the store did not say so earlier: its ack may come before the
    // cluster's copy. Channel clips end in `stored_new`, after their
    // history.
    if channel.is_none() && matches!(stored, Ok(false)) {
        live.complete(clip.clone());
    }
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
                    if let Err(e) = c.keep(shared, &clip, r, elsewhere).await {
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
pub(super) async fn answer(
    send: &mut SendStream,
    id: ClipId,
    outcome: Result<bool, Refusal>,
    channel: bool,
    timer: Pin<&mut Sleep>,
) {
    match outcome {
        Ok(duplicate) => {
            let hot = metrics::hot();
            match (duplicate, channel) {
                (true, _) => hot.duplicate.increment(1),
                (false, false) => hot.accepted_user.increment(1),
                (false, true) => hot.accepted_channel.increment(1),
            }
            let msg = Message::Accepted(Accepted {
                clip_id: id,
                duplicate,
            });
            reply_within(send, msg, timer).await;
        }
        Err(r) => {
            debug!(clip = %id, code = r.code.name(), reason = %r.reason, "clip refused");
            metrics::count(metrics::CLIPS_REJECTED, "reason", r.code.name());
            reply_within(send, rejected(id, r), timer).await;
        }
    }
}

pub(super) fn rejected(clip_id: ClipId, r: Refusal) -> Message {
    Message::Rejected(Rejected {
        clip_id,
        code: r.code,
        retry_after_ms: r.retry_after_ms(),
        reason: r.reason,
    })
}

/// Refuses an upload before it starts: stops the stream, answers why.
pub(super) async fn refuse(
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
pub(super) fn budget(shared: &Shared, session: &Session) -> Result<(), Refusal> {
    let cfg = &shared.config;
    let inflight = shared.inflight.load(std::sync::atomic::Ordering::Relaxed);
    if inflight >= cfg.max_inflight_bytes {
        return Err(Refusal::inflight_full(cfg.max_inflight_bytes));
    }
    if cfg.max_clips_per_minute == 0 && cfg.max_clip_bytes_per_minute == 0 {
        return Ok(());
    }
    let now = std::time::Instant::now();
    let mut b = shared
        .budgets
        .entry(session.user.clone())
        .or_insert_with(|| {
            relay_core::limits::UserBudget::new(
                cfg.max_clips_per_minute,
                cfg.max_clip_bytes_per_minute,
                now,
            )
        });
    b.admit(now).map_err(|wait| {
        Refusal::rate_limited(
            cfg.max_clips_per_minute,
            cfg.max_clip_bytes_per_minute,
            wait,
        )
    })
}

/// Takes channel `c`'s floor for this upload: free, or held by the same
/// user (a retry), or pre-empted by a priority talker. Otherwise
/// `floor_busy` naming the holder.
pub(super) fn take_floor(
    shared: &Shared,
    session: &Session,
    c: &str,
    upload_no: u64,
    stop: &Stop,
) -> Result<(), Refusal> {
    use relay_core::router::{FloorClaim, FloorDecision};
    let claim = FloorClaim {
        user: session.user.clone(),
        upload_no,
        priority: session.channels.get(c) == Some(&Right::Priority),
        stop: stop.clone(),
    };
    // The holder's clip, when displaced, is cut for its listeners.
    match shared.router.take_floor(c, claim) {
        FloorDecision::Granted => {}
        FloorDecision::Superseded(old) => old.refuse(Refusal::superseded_by_newer()),
        FloorDecision::Preempted { stop: old, .. } => {
            old.refuse(Refusal::preempted(&session.user, c));
            metrics::count1(metrics::FLOOR_PREEMPTIONS);
        }
        FloorDecision::Busy { holder } => {
            metrics::count1(metrics::FLOOR_BUSY);
            return Err(Refusal::floor_busy(&holder, c));
        }
    }
    metrics::count1(metrics::FLOOR_GRANTS);
    Ok(())
}

pub(super) enum Admit {
    New(Vec<Arc<str>>),
    Duplicate,
}

/// Checks the header: target, and whether this id was seen.
pub(super) async fn admit(
    shared: &Shared,
    session: &Session,
    h: &ClipHeader,
) -> Result<Admit, Refusal> {
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
pub(super) async fn read_clip_header(
    shared: &Shared,
    rd: &mut MessageReader,
) -> Result<ClipHeader, Refusal> {
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
            Ok(Err(e)) => return Err(refused(e)),
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
pub(super) async fn receive_packets(
    shared: &Shared,
    rd: &mut MessageReader,
    live: &LiveClip,
    held: &mut u64,
    mut timer: Pin<&mut Sleep>,
) -> Result<ClipEnd, Refusal> {
    let cfg = &shared.config;
    let mut framer = Framer::for_clip(cfg.frame_limits(), live.meta.format.pre_skip);
    let mut end = None;
    let hot = metrics::hot();
    // The upload must keep up with real time (`Pace`, the lag rule).
    let pace = Pace {
        max_lag: cfg.max_upload_lag,
    };
    let started = Instant::now();
    let behind = |f: &Framer| started + pace.allowed(f.samples());
    loop {
        pace.check(started.elapsed(), framer.samples())?;
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
                return Err(Refusal::inflight_full(cfg.max_inflight_bytes));
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
        // Both deadlines only move on: the reset is an atomic store.
        timer.as_mut().reset(idle.min(behind));
        let filled = tokio::select! {
            biased;
            r = rd.fill() => Ok(r),
            () = timer.as_mut() => Err(()),
        };
        match filled {
            // Behind real time: refused at the top of the loop.
            Err(()) if Instant::now() >= behind => {}
            Err(()) => {
                return Err(Refusal::new(
                    ErrorCode::UploadIdleTimeout,
                    format!("no data for {:?}", cfg.upload_idle_timeout),
                ));
            }
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return finished(end, rd.buffer().len()),
            Ok(Err(e)) => {
                return Err(Refusal::new(
                    ErrorCode::CutOff,
                    format!("upload aborted: {e}"),
                ));
            }
        }
    }
}
