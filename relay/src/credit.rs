//! What a connection may send the relay before and after `Auth`: the
//! QUIC credit the relay grants. Depends only on the settings, so both the
//! native and the WebTransport paths use it without depending on each
//! other.

use crate::config::Config;

/// Connection-level receive window before `Auth`: the largest message and
/// its type and length varints, and `early_upload_bytes` for one upload.
pub fn auth_window(cfg: &Config) -> quinn::VarInt {
    quinn::VarInt::from_u64(cfg.max_message_bytes as u64 + 16 + cfg.early_upload_bytes)
        .unwrap_or(quinn::VarInt::MAX)
}

/// Bytes one stream may have in flight to the relay (quinn's default,
/// named: the connection window is counted in it).
pub const STREAM_WINDOW: u32 = 1_250_000;

/// How many times `max_clip_streams` the QUIC stream credit of a
/// connection that uploads is. quinn announces new credit (MAX_STREAMS)
/// once an eighth of it was used: with credit for just the streams
/// allowed (9 by default) that is a frame, mostly in a datagram of its
/// own, every other clip; with four times as many, every fifth. The relay
/// itself reads at most `max_clip_streams` uploads at once
/// ([`upload_slots`]), and the connection's window still holds what those
/// streams and the control stream may have in flight. quinn keeps an
/// entry per stream it allows (~60 bytes), so the larger credit is given
/// at the first upload ([`upload_credit`]), not to every idle session.
pub const STREAM_CREDIT_FACTOR: u32 = 4;

/// Gives an authenticated connection its full credit: the control stream
/// plus `max_clip_streams` uploads. `extra_bidi`: streams the transport
/// keeps open besides ptt/1's (a WebTransport session's CONNECT stream).
pub fn open_credit(cfg: &Config, conn: &quinn::Connection, extra_bidi: u32) {
    let streams = cfg.max_clip_streams + 1 + extra_bidi;
    conn.set_max_concurrent_bi_streams(streams.into());
    conn.set_receive_window(
        quinn::VarInt::from_u64(u64::from(streams) * u64::from(STREAM_WINDOW))
            .unwrap_or(quinn::VarInt::MAX),
    );
}

/// A connection that uploads gets [`STREAM_CREDIT_FACTOR`] times the
/// streams (not the bytes) of [`open_credit`].
pub fn upload_credit(cfg: &Config, conn: &quinn::Connection, extra_bidi: u32) {
    let streams = (cfg.max_clip_streams + 1) * STREAM_CREDIT_FACTOR + extra_bidi;
    conn.set_max_concurrent_bi_streams(streams.into());
}

/// The uploads one connection may have read at once: `max_clip_streams`
/// (more streams may be open, [`STREAM_CREDIT_FACTOR`]; they wait).
pub fn upload_slots(cfg: &Config) -> std::sync::Arc<tokio::sync::Semaphore> {
    std::sync::Arc::new(tokio::sync::Semaphore::new(cfg.max_clip_streams as usize))
}
