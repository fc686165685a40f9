//! A connection's first steps: the ClientHello's ALPN, 0-RTT, the
//! WebTransport session for browsers, and `Auth` (with only the credit
//! granted before it) answered by `Welcome` or a refusal.

use super::*;

/// A browser's connection: the HTTP/3 handshake up to its WebTransport
/// session, on a complete TLS handshake. `None`: refused (closed).
pub(super) async fn web_session(
    shared: &Shared,
    conn: &Connection,
    handshake: &mut Handshake,
) -> Option<Link> {
    let deadline = Instant::now() + shared.config.auth_timeout;
    if !handshake.complete(conn, deadline).await {
        return None;
    }
    match crate::webtransport::accept(conn, &shared.config, deadline).await {
        Ok(link) => Some(link),
        Err(r) => {
            debug!(remote = %conn.remote_address(), why = %r.reason, "WebTransport session refused");
            metrics::count(metrics::CONNECTIONS_REJECTED, "reason", "webtransport");
            quic::close(conn, r.code, &r.reason);
            None
        }
    }
}

/// A session registered, its live queue, the control stream's reader, and
/// the `Welcome` (and `AckPolicy`) to send once it has joined its
/// channels.
pub(super) type Authenticated = (
    Arc<Session>,
    mpsc::Receiver<Arc<LiveClip>>,
    MessageReader,
    Vec<Message>,
);

/// A connection's TLS handshake, for a connection served before it is
/// complete (0-RTT data read, 0.5-RTT data sent). Counted in
/// `ptt_handshakes_total` once it settles.
pub(super) enum Handshake {
    /// quinn's future resolves when the handshake ends either way (its
    /// value means nothing on a server): a connection still open then has
    /// completed it.
    Pending(quinn::ZeroRttAccepted),
    Complete,
    Failed,
}

impl Handshake {
    /// Whether it is complete, without waiting.
    pub(super) fn check(&mut self, conn: &Connection) -> bool {
        if let Handshake::Pending(done) = self {
            if done.now_or_never().is_none() {
                return false;
            }
            self.end(conn);
        }
        matches!(self, Handshake::Complete)
    }

    /// Waits until it is complete, at most until `deadline`.
    pub(super) async fn complete(&mut self, conn: &Connection, deadline: Instant) -> bool {
        if let Handshake::Pending(done) = self {
            match timeout_at(deadline, done).await {
                Ok(_) => self.end(conn),
                Err(_) => self.fail(),
            }
        }
        matches!(self, Handshake::Complete)
    }

    pub(super) fn is_pending(&self) -> bool {
        matches!(self, Handshake::Pending(_))
    }

    /// Settles one still pending (the connection is given up).
    pub(super) fn settle(&mut self, conn: &Connection) {
        if !self.check(conn) && self.is_pending() {
            self.fail();
        }
    }

    /// It ended: completed if the connection is still open.
    pub(super) fn end(&mut self, conn: &Connection) {
        if conn.close_reason().is_some() {
            return self.fail();
        }
        metrics::count(metrics::HANDSHAKES, "outcome", "completed");
        *self = Handshake::Complete;
    }

    pub(super) fn fail(&mut self) {
        metrics::count(metrics::HANDSHAKES, "outcome", "failed");
        *self = Handshake::Failed;
    }
}

pub(super) fn late(cfg: &crate::Config) -> Refusal {
    Refusal::new(
        ErrorCode::Unauthenticated,
        format!("no Auth within {:?}", cfg.auth_timeout),
    )
}

/// Reads the first message, which must be `Auth`, and checks its token.
pub(super) async fn check_auth(
    shared: &Shared,
    rd: &mut MessageReader,
    deadline: Instant,
) -> Result<codec::token::Claims, Refusal> {
    let msg = timeout_at(deadline, rd.next())
        .await
        .map_err(|_| late(&shared.config))?
        .map_err(refused)?;
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

pub(super) async fn authenticate(
    shared: &Arc<Shared>,
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
    let mut welcome = vec![Message::Welcome(Welcome {
        user: claims.sub.clone(),
        session_id: id,
        limits: cfg.limits(),
    })];
    welcome.extend(cfg.ack_policy().map(Message::AckPolicy));
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
