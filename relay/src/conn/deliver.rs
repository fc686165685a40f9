//! Clips going out to one session: the pump's live-first order and
//! window, live writers and stored copies.

use relay_core::deliver::{Step, next_step};

use super::*;

/// Starts deliveries: live clips as they are offered, stored clips from the
/// store within the window. Returns when the connection closes.
pub(super) async fn pump(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    live_rx: &mut mpsc::Receiver<Arc<LiveClip>>,
) {
    let window = shared.config.max_unacked_deliveries;
    let mut cursor = 0;
    let mut scan = true;
    let mut order = StoredOrder::default();
    // A failed store read waits for the next event before reading again.
    let mut stalled = false;
    // What to do next is the core's rule (`next_step`: live first, stored
    // clips within the window); this loop carries it out.
    loop {
        let live_waiting = !live_rx.is_empty();
        match next_step(
            live_waiting,
            scan && !stalled,
            window,
            session.stored_open(),
        ) {
            Step::Live => {
                let Ok(live) = live_rx.try_recv() else {
                    continue;
                };
                if start_live(shared, session, live).await.is_err() {
                    return;
                }
            }
            Step::Stored(room) => {
                let batch = match shared.store.read(&session.user, cursor, room).await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(error = %e, "store read failed");
                        stalled = true;
                        continue;
                    }
                };
                scan = !batch.is_empty();
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
                    if session.acked_here(&id) {
                        // Heard live and acked on this connection before
                        // this copy was queued (a member who joined while
                        // it was spoken): released, not sent again.
                        super::control::release(shared, session, &id).await;
                        continue;
                    }
                    if session.begin_stored(id, || shared.store.holds(&session.user, &id))
                        && start_stored(shared, session, clip, &mut order)
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            }
            Step::Wait => {
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
                stalled = false;
            }
        }
    }
}

pub(super) async fn start_live(
    shared: &Arc<Shared>,
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
pub(super) async fn write_live(
    mut send: SendStream,
    live: Arc<LiveClip>,
    mut fault: Fault,
    shared: &Arc<Shared>,
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
pub(super) struct StoredOrder {
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

pub(super) async fn start_stored(
    shared: &Arc<Shared>,
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
pub(super) async fn start_stored_copy(
    shared: &Arc<Shared>,
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
