//! ptt/1 inside a WebTransport session (browsers): the HTTP/3 handshake
//! (SETTINGS, extended CONNECT to `/ptt`) is `web-transport-quinn`'s; after
//! it every ptt/1 stream is a QUIC stream behind a two-varint WebTransport
//! header, and error codes live in HTTP/3's WebTransport range. [`Link`]
//! hides both from the session, which otherwise runs ptt/1 unchanged on
//! the same quinn connection (docs/protocol.md, "WebTransport").

use std::sync::Arc;

use bytes::Bytes;
use codec::ErrorCode;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use relay_core::refusal::Refusal;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

/// The path of the WebTransport session a page opens:
/// `https://HOST:PORT/ptt`.
pub const PATH: &str = "/ptt";

/// The session id: the stream id of the CONNECT request, the client's
/// first bidirectional stream (web-transport-quinn accepts it as the
/// connection's first, and quinn hands streams out in id order).
const SESSION_ID: u64 = 0;
/// WebTransport's stream types (draft-ietf-webtrans-http3 §4.2, §4.3).
const BIDI_STREAM: u64 = 0x41;
const UNI_STREAM: u64 = 0x54;
/// Unidirectional streams a client may open: HTTP/3's control, QPACK
/// encoder and decoder streams (ptt/1 itself has none).
pub const H3_UNI_STREAMS: u32 = 3;
/// Connection credit before `Auth` for the HTTP/3 handshake (SETTINGS and
/// the CONNECT request's headers), on top of the ptt/1 credit.
const H3_HANDSHAKE_BYTES: u64 = 16 * 1024;

/// How a session's streams are carried.
#[derive(Clone, Default)]
pub enum Link {
    /// Native ptt/1 (ALPN `ptt/1`): streams and codes as they are.
    #[default]
    Quic,
    /// A WebTransport session (ALPN `h3`).
    Web(Arc<web_transport_quinn::Session>),
}

/// A stream header that is not this session's.
#[derive(Debug, thiserror::Error)]
#[error("not a WebTransport stream of this session")]
pub struct BadHeader;

/// The connection is gone (a stream could not be opened or written): the
/// session is ending; nothing more to do for this delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection is gone")]
pub struct Gone;

impl Link {
    /// For metrics: `quic` or `webtransport`.
    pub fn transport(&self) -> &'static str {
        match self {
            Link::Quic => "quic",
            Link::Web(_) => "webtransport",
        }
    }

    /// Bidirectional streams beyond ptt/1's (the CONNECT stream).
    pub fn extra_bidi(&self) -> u32 {
        match self {
            Link::Quic => 0,
            Link::Web(_) => 1,
        }
    }

    /// Reads a client stream's WebTransport header, if any (in the stream's
    /// own task: one slow stream must not hold the others back).
    pub async fn enter(&self, recv: &mut RecvStream) -> Result<(), BadHeader> {
        match self {
            Link::Quic => Ok(()),
            Link::Web(_) => {
                let ty = read_varint(recv).await?;
                let id = read_varint(recv).await?;
                if ty == BIDI_STREAM && id == SESSION_ID {
                    Ok(())
                } else {
                    Err(BadHeader)
                }
            }
        }
    }

    /// Opens a unidirectional stream to the client, header written; `Err`
    /// when the connection is gone.
    pub async fn open_uni(&self, conn: &Connection) -> Result<SendStream, Gone> {
        let mut send = conn.open_uni().await.map_err(|_| Gone)?;
        if let Link::Web(_) = self {
            send.write_chunk(Bytes::from_static(&UNI_HEADER))
                .await
                .map_err(|_| Gone)?;
        }
        Ok(send)
    }

    /// A ptt/1 code as this link carries it in RESET_STREAM and
    /// STOP_SENDING.
    pub fn code(&self, code: ErrorCode) -> VarInt {
        match self {
            Link::Quic => quic::varint(code),
            Link::Web(_) => web_code(code),
        }
    }

    /// Closes the connection with a ptt/1 code and reason: in a
    /// WebTransport session as a CLOSE_WEBTRANSPORT_SESSION capsule, which
    /// the page reads from `WebTransport.closed` (`closeCode`, `reason`).
    pub fn close(&self, conn: &Connection, code: ErrorCode, reason: &str) {
        match self {
            Link::Quic => quic::close(conn, code, reason),
            Link::Web(s) => {
                let wt = u32::try_from(code.to_u64()).unwrap_or(u32::MAX);
                s.close(wt, reason.as_bytes());
            }
        }
    }
}

/// A ptt/1 code in HTTP/3's WebTransport range (what the page reads as
/// `WebTransportError.streamErrorCode` is the ptt/1 code again).
fn web_code(code: ErrorCode) -> VarInt {
    let wt = u32::try_from(code.to_u64()).unwrap_or(u32::MAX);
    VarInt::from_u64(web_transport_quinn::proto::error_to_http3(wt)).unwrap_or(VarInt::MAX)
}

/// The header of every stream the relay opens: `0x54` (a 2-byte varint)
/// then the session id (0), written without an allocation per delivery.
const UNI_HEADER: [u8; 3] = [0x40, UNI_STREAM as u8, SESSION_ID as u8];

/// One varint from the stream: its first byte gives its length, and
/// `codec::varint` decodes it.
async fn read_varint(recv: &mut RecvStream) -> Result<u64, BadHeader> {
    let mut buf = [0u8; 8];
    recv.read_exact(&mut buf[..1])
        .await
        .map_err(|_| BadHeader)?;
    let len = 1usize << (buf[0] >> 6);
    recv.read_exact(&mut buf[1..len])
        .await
        .map_err(|_| BadHeader)?;
    codec::varint::get(&buf[..len])
        .map(|(v, _)| v)
        .ok_or(BadHeader)
}

/// Whether the handshake chose ALPN `h3` (`data`: the connection's
/// handshake data, once the whole ClientHello is in).
pub fn is_h3(data: Box<dyn std::any::Any>) -> bool {
    data.downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == web_transport_quinn::ALPN.as_bytes())
}

/// Runs the HTTP/3 side of a browser's connection up to an accepted
/// WebTransport session at [`PATH`] (others get 404), by `deadline`. The
/// connection gets just the stream credit the handshake needs, plus
/// ptt/1's before `Auth`.
pub async fn accept(
    conn: &Connection,
    cfg: &crate::Config,
    deadline: Instant,
) -> Result<Link, Refusal> {
    let refused = |why: String| Refusal::new(ErrorCode::ProtocolViolation, why);
    let early = u32::from(cfg.early_upload_bytes > 0);
    conn.set_max_concurrent_uni_streams(H3_UNI_STREAMS.into());
    // CONNECT, then ptt/1's control stream and early upload.
    conn.set_max_concurrent_bi_streams((2 + early).into());
    let window = crate::credit::auth_window(cfg).into_inner() + H3_HANDSHAKE_BYTES;
    conn.set_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
    let request = timeout_at(deadline, web_transport_quinn::Request::accept(conn.clone()))
        .await
        .map_err(|_| refused("no WebTransport CONNECT in time".into()))?
        .map_err(|e| refused(format!("HTTP/3: {e}")))?;
    if request.url.path() != PATH {
        let path = request.url.path().to_string();
        let _ = request.reject(http_not_found()).await;
        return Err(refused(format!("WebTransport path {path} is not {PATH}")));
    }
    let session = request
        .ok()
        .await
        .map_err(|e| refused(format!("WebTransport response: {e}")))?;
    tokio::spawn(drain_h3_streams(conn.clone()));
    Ok(Link::Web(Arc::new(session)))
}

fn http_not_found() -> web_transport_quinn::http::StatusCode {
    web_transport_quinn::http::StatusCode::NOT_FOUND
}

/// A browser's other unidirectional streams (QPACK's; ptt/1 has none
/// from the client): kept open, as HTTP/3 requires, and read to nothing.
/// A WebTransport stream from the client is refused.
async fn drain_h3_streams(conn: Connection) {
    while let Ok(mut recv) = conn.accept_uni().await {
        tokio::spawn(async move {
            match read_varint(&mut recv).await {
                Ok(UNI_STREAM) => {
                    let _ = recv.stop(web_code(ErrorCode::ProtocolViolation));
                }
                Ok(_) => while let Ok(Some(_)) = recv.read_chunk(4096, true).await {},
                Err(_) => debug!("a browser stream closed before its type"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_stream_header_is_type_0x54_then_session_0() {
        let mut want = Vec::new();
        codec::varint::put(&mut want, super::UNI_STREAM);
        codec::varint::put(&mut want, super::SESSION_ID);
        assert_eq!(super::UNI_HEADER.as_slice(), want.as_slice());
    }
}
