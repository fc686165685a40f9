//! The thin I/O layer between quinn and the sans-IO protocol in `codec`:
//! read whole messages from a stream, write them, and carry protocol error
//! codes in QUIC's close, reset and stop frames.

pub mod lean_tls;
mod turns;

pub use turns::{Turn, Turns};

use bytes::BytesMut;
use codec::wire::Message;
use codec::{ErrorCode, WireError};
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
use thiserror::Error;

/// Largest chunk asked of quinn per read.
const READ_CHUNK: usize = 64 * 1024;

/// Why a message could not be read from a stream.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The peer broke the protocol; close or reset with `e.code()`.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The stream or connection failed (reset, lost, closed).
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
    /// The stream finished in the middle of a message.
    #[error("stream ended inside a message")]
    Truncated,
}

impl StreamError {
    /// The code to send the peer, when it is the peer's fault.
    pub fn code(&self) -> ErrorCode {
        match self {
            StreamError::Wire(e) => e.code(),
            _ => ErrorCode::ProtocolViolation,
        }
    }
}

/// Reads framed messages from a receive stream.
pub struct MessageReader {
    recv: RecvStream,
    buf: BytesMut,
    max_body: usize,
}

impl MessageReader {
    pub fn new(recv: RecvStream, max_body: usize) -> Self {
        Self::with_capacity(recv, max_body, 0)
    }

    /// A reader whose buffer starts with room for `capacity` bytes: a
    /// stream that is read whole (a clip's upload) then fills one
    /// allocation instead of growing one per chunk. Messages taken from it
    /// (`split_to`) share that allocation; a new one is made only once it
    /// is used up.
    pub fn with_capacity(recv: RecvStream, max_body: usize, capacity: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::with_capacity(capacity),
            max_body,
        }
    }

    /// The next message; `Ok(None)` when the stream finished cleanly between
    /// messages.
    pub async fn next(&mut self) -> Result<Option<Message>, StreamError> {
        loop {
            if let Some((msg, used)) = Message::decode(&self.buf, self.max_body)? {
                let _ = self.buf.split_to(used);
                return Ok(Some(msg));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(StreamError::Truncated)
                };
            }
        }
    }

    /// Reads one more chunk into the buffer; false at the end of the stream.
    pub async fn fill(&mut self) -> Result<bool, quinn::ReadError> {
        match self.recv.read_chunk(READ_CHUNK, true).await? {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Bytes read but not yet taken as messages.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    pub fn stream(&mut self) -> &mut RecvStream {
        &mut self.recv
    }
}

/// Takes a stream's FIN if it is already in, without waiting (one poll):
/// the stream then ends read to its end. A stream dropped before its FIN
/// was read sends STOP_SENDING, a frame (and the ACK it asks for) of no use
/// when the peer had finished anyway; after an upload's answer that was a
/// datagram each way per clip (docs/protocol.md §5, "Sending").
pub fn take_end(recv: &mut RecvStream) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = recv.poll_read(&mut cx, &mut [0u8; 1]);
}

/// Writes one message.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), quinn::WriteError> {
    send.write_all(&msg.to_bytes()).await
}

/// An error code as a QUIC application error code.
pub fn varint(code: ErrorCode) -> VarInt {
    VarInt::from_u64(code.to_u64()).unwrap_or(VarInt::MAX)
}

/// Closes a connection with a protocol code and a human-readable reason.
pub fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    conn.close(varint(code), reason.as_bytes());
}

/// The protocol code and reason when the peer (or we) closed the connection
/// at the application level.
pub fn close_reason(e: &ConnectionError) -> Option<(ErrorCode, String)> {
    match e {
        ConnectionError::ApplicationClosed(c) => Some((
            ErrorCode::from_u64(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason).into_owned(),
        )),
        _ => None,
    }
}

/// The protocol code in a stream reset or stop, if any.
pub fn reset_code(e: &quinn::ReadError) -> Option<ErrorCode> {
    match e {
        quinn::ReadError::Reset(code) => Some(ErrorCode::from_u64(code.into_inner())),
        _ => None,
    }
}

/// A TLS 1.3 server configuration for QUIC with our ALPN, from PEM files
/// (the certificate chain and its private key). See [`server_crypto_with`].
pub fn server_crypto(
    cert: &std::path::Path,
    key: &std::path::Path,
    zero_rtt_tickets: usize,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let single = rustls::sign::SingleCertAndKey::from(certified_key(cert, key)?);
    server_crypto_with(
        std::sync::Arc::new(single),
        vec![codec::wire::ALPN.to_vec()],
        zero_rtt_tickets,
    )
}

/// A certificate chain and its private key from PEM files, checked to
/// belong together.
pub fn certified_key(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad =
        |p: &std::path::Path, e: &dyn std::fmt::Display| TlsError(format!("{}: {e}", p.display()));
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    if certs.is_empty() {
        return Err(bad(cert, &"holds no certificate"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    rustls::sign::CertifiedKey::from_der(certs, key_der, &rustls::crypto::ring::default_provider())
        .map_err(|e| TlsError(format!("certificate and key do not match: {e}")))
}

/// A TLS 1.3 server configuration for QUIC offering `alpn` (in order of
/// preference), its certificate chosen per handshake by `certs`.
///
/// With `zero_rtt_tickets` above 0 it accepts QUIC 0-RTT: every connection
/// gets one resumption ticket, kept in a memory cache of that many (the
/// oldest forgotten first), and a ticket resumes one connection only: the
/// server takes it out of the cache on use, so a replayed 0-RTT flight
/// finds no ticket and gets a full handshake, its early data dropped.
/// Tickets die with the process (a restarted server does full handshakes).
pub fn server_crypto_with(
    certs: std::sync::Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: Vec<Vec<u8>>,
    zero_rtt_tickets: usize,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let tls = server_tls_with(certs, alpn, zero_rtt_tickets)?;
    quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError(e.to_string()))
}

/// As [`server_crypto_with`], with sessions that drop their TLS state
/// after the handshake and derive the next key phase's keys when used
/// ([`lean_tls`]): for servers holding many connections.
pub fn lean_server_crypto_with(
    certs: std::sync::Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: Vec<Vec<u8>>,
    zero_rtt_tickets: usize,
) -> Result<lean_tls::LeanServerConfig, TlsError> {
    let tls = server_tls_with(certs, alpn, zero_rtt_tickets)?;
    lean_tls::LeanServerConfig::new(std::sync::Arc::new(tls))
}

/// The rustls side of [`server_crypto_with`].
fn server_tls_with(
    certs: std::sync::Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: Vec<Vec<u8>>,
    zero_rtt_tickets: usize,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    tls.alpn_protocols = alpn;
    if zero_rtt_tickets == 0 {
        tls.max_early_data_size = 0;
        tls.send_tls13_tickets = 0;
    } else {
        // QUIC takes all or nothing: quinn requires u32::MAX here, and the
        // peer's transport parameters bound what 0-RTT may carry.
        tls.max_early_data_size = u32::MAX;
        tls.send_tls13_tickets = 1;
        // Stateful tickets (rustls never uses the stateless ticketer
        // unless one is set): single use, which is what makes 0-RTT
        // replay-safe.
        tls.session_storage = rustls::server::ServerSessionMemoryCache::new(zero_rtt_tickets);
    }
    Ok(tls)
}

/// The TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsError(pub String);

/// A UDP socket bound to `addr` with the receive and send buffers asked for
/// (0: the kernel's default). Returns the socket and what the kernel
/// granted (Linux reports twice the usable size and caps the request at
/// `net.core.rmem_max` / `wmem_max`). Bursts (a reconnect storm, a channel
/// fan-out) overflow the default buffers and turn into QUIC
/// retransmissions.
pub fn udp_socket(
    addr: std::net::SocketAddr,
    recv_buffer: usize,
    send_buffer: usize,
) -> std::io::Result<(std::net::UdpSocket, usize, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // [::] takes IPv4 as well, as quinn's own bind does.
        let _ = sock.set_only_v6(false);
    }
    if recv_buffer > 0 {
        let _ = sock.set_recv_buffer_size(recv_buffer);
    }
    if send_buffer > 0 {
        let _ = sock.set_send_buffer_size(send_buffer);
    }
    let granted_recv = sock.recv_buffer_size().unwrap_or(0);
    let granted_send = sock.send_buffer_size().unwrap_or(0);
    sock.bind(&addr.into())?;
    Ok((sock.into(), granted_recv, granted_send))
}
