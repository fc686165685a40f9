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

/// Gives an authenticated connection its full credit: the control stream
/// plus `max_clip_streams` uploads, and quinn's usual connection window.
/// `extra_bidi`: streams the transport keeps open besides ptt/1's (a
/// WebTransport session's CONNECT stream).
pub fn open_credit(cfg: &Config, conn: &quinn::Connection, extra_bidi: u32) {
    conn.set_max_concurrent_bi_streams((cfg.max_clip_streams + 1 + extra_bidi).into());
    conn.set_receive_window(quinn::VarInt::MAX);
}
