//! One connection, from handshake to close, as thin I/O: each step asks
//! the shared state (and its sans-IO parts) and carries out the answer.
//! `handshake` (ALPN, 0-RTT, WebTransport, `Auth`), `control` (the control
//! stream), `upload` (a clip in: header, admission, live fan-out, store)
//! and `deliver` (the pump, live and stored writers).

use std::sync::Arc;

use bytes::Bytes;
use codec::token::Right;
use codec::wire::{Accepted, ClipHeader, ClipId, Message, Rejected, Target, Welcome};
use codec::{ClipEnd, ErrorCode, Framer};
use futures_util::FutureExt;
use quic::{MessageReader, StreamError};
use quinn::{Connection, RecvStream, SendStream};
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep, timeout, timeout_at};
use tracing::{debug, info, warn};

mod control;
mod deliver;
mod handshake;
mod upload;

use control::{control_loop, replay_history};
use deliver::pump;
use handshake::{Handshake, authenticate, web_session};
use upload::accept_uploads;

use crate::faults::{self, Fault};
use crate::live::{LiveClip, Next};
use crate::metrics;
use crate::state::{Session, Shared, Stop, stored_new};
use crate::store::{Appended, ClipMeta, CommitReport, StoreError, StoredClip};
use crate::webtransport::{Gone, Link};
use relay_core::refusal::Refusal;

/// Runs one connection from handshake to close.
pub async fn run(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    unauthenticated: crate::state::Unauthenticated,
) {
    // The steps before the session starts are boxed, freed once done: the
    // task keeps only what an idle session needs (docs/benchmarks.md,
    // memory per session).
    let Some((conn, link, mut handshake)) = Box::pin(connect(&shared, incoming)).await else {
        return;
    };
    let remote = conn.remote_address();
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
    let subjects = Box::pin(start(&shared, &session, &welcome)).await;
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

/// The handshake up to the transport: the connection (0-RTT when the
/// client has a ticket), how ptt/1 runs on it, and where its handshake is.
/// `None`: it failed (counted and logged).
async fn connect(
    shared: &Shared,
    incoming: quinn::Incoming,
) -> Option<(Connection, Link, Handshake)> {
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
    let link = if h3 {
        Box::pin(web_session(shared, &conn, &mut handshake)).await?
    } else {
        Link::Quic
    };
    Some((conn, link, handshake))
}

/// A session starts: it joins its channels here and in the cluster (the
/// subjects it now wants, returned), clips being spoken to it join it live,
/// then `Welcome`, the channels' recent history, its pushes' bookkeeping
/// and its expiry notices.
async fn start(shared: &Arc<Shared>, session: &Arc<Session>, welcome: &[Message]) -> Vec<String> {
    shared.router.join(session, session.channels.keys());
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
        Some(c) => c.join(shared, session),
        None => Vec::new(),
    };
    // `Welcome` only now: from the moment a client has it, it is online
    // (live clips to it and its channels reach it). `AckPolicy` rides
    // with it.
    if let Err(e) = session.send_controls(welcome).await {
        debug!(error = %e, "Welcome not sent");
    }
    replay_history(shared, session).await;
    shared
        .push
        .session_started(&session.user, session.channels.keys())
        .await;
    session
        .send_expired(shared.expired.notices(&session.user))
        .await;
    subjects
}

/// A stream's failure as the refusal it ends the stream (or session) with.
fn refused(e: StreamError) -> Refusal {
    Refusal::new(e.code(), e.to_string())
}

fn handshake_failed<T>(error: &dyn std::fmt::Display) -> Option<T> {
    metrics::count(metrics::HANDSHAKES, "outcome", "failed");
    debug!(%error, "handshake failed");
    None
}

/// How long an upload's task waits for the sender to have its answer.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn reply(send: &mut SendStream, msg: Message) {
    let timer = std::pin::pin!(tokio::time::sleep(ANSWER_WAIT));
    reply_within(send, msg, timer).await;
}

/// Sends an upload's answer and waits until the sender has it (so a
/// shutdown that drains uploads does not close the connection under it),
/// at most [`ANSWER_WAIT`], on the upload's own `timer` (moved, not a
/// second timer).
async fn reply_within(send: &mut SendStream, msg: Message, mut timer: Pin<&mut Sleep>) {
    if quic::write_message(send, &msg).await.is_ok() && send.finish().is_ok() {
        timer.as_mut().reset(Instant::now() + ANSWER_WAIT);
        tokio::select! {
            biased;
            _ = send.stopped() => {}
            () = timer => {}
        }
    }
}
