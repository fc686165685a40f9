//! The control stream once a session is up: acks, usage, push
//! registrations and the channels' recent history at connect.

use super::*;

/// Reads acks until the control stream ends.
pub(super) async fn control_loop(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    mut ctl: MessageReader,
) -> Result<(), Refusal> {
    let max_ids = shared.config.ack_policy().map_or(1, |p| p.max_ids as usize);
    loop {
        match ctl.next().await {
            Ok(Some(Message::Ack(id))) => ack(shared, session, &id).await,
            Ok(Some(Message::Acks(ids))) => {
                if ids.len() > max_ids {
                    return Err(Refusal::new(
                        ErrorCode::ProtocolViolation,
                        format!("an Ack of {} clips; AckPolicy allows {max_ids}", ids.len()),
                    ));
                }
                for id in &ids {
                    ack(shared, session, id).await;
                }
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
            Err(e) => return Err(refused(e)),
        }
    }
}

/// The user holds clip `id` whole (or was told it expired): its copy goes.
async fn ack(shared: &Shared, session: &Session, id: &ClipId) {
    if shared.expired.ack(&session.user, id) {
        // An `Expired` notice read: its clip has no copy left (a delivery
        // of it still open frees its place).
        session.finish(id);
        return;
    }
    if release(shared, session, id).await {
        metrics::hot().delivered.increment(1);
    }
    session.acked(id);
}

/// Releases the user's copy of `id`, here and in the cluster; false if
/// the store failed.
pub(super) async fn release(shared: &Shared, session: &Session, id: &ClipId) -> bool {
    let kept = match shared.store.ack(&session.user, id).await {
        Ok(_) => true,
        Err(e) => {
            warn!(error = %e, "store ack failed");
            false
        }
    };
    if let Some(c) = &shared.cluster {
        // Never waits on NATS (held while cut off).
        c.acked(id, &session.user);
    }
    kept
}

/// Gives a member who connects what its channels said while it was away
/// (within the history's depth and age), once, merged with the clips
/// already waiting for it in the order the relay accepted them.
pub(super) async fn replay_history(shared: &Shared, session: &Arc<Session>) {
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
    missed.retain(|(seq, c, _)| shared.history_seen.claim(&session.user, c, *seq));
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
                shared.history_seen.unclaim(&session.user, c, *seq);
            }
        }
    }
}
