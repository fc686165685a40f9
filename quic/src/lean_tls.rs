//! A server-side QUIC crypto session that keeps less per connection than
//! quinn's own (`quinn::crypto::rustls`), for servers holding many idle
//! connections (issue "Per-clip cost", part 3; docs/benchmarks.md):
//!
//! - rustls runs the handshake as usual (the same `rustls::ServerConfig`:
//!   certificates, ALPN, 0-RTT tickets), and its connection state (its
//!   buffers, key schedule and handshake queue) is dropped once the
//!   handshake is over and its last message written; what is asked of the
//!   session later (the ALPN and server name) is kept, nothing else;
//! - the keys of the next key phase, which quinn asks for as soon as the
//!   1-RTT keys exist, are derived when first used (at a key update), not
//!   held ready: until then the next phase is its two traffic secrets.
//!   Each phase is derived once, and the secrets of the phase after it
//!   come out of that derivation (quinn reads the following phase's
//!   limits at each update, so from the first update on it is derived
//!   then).
//!
//! What is given up after the handshake: `export_keying_material` (an
//! error), the peer's certificates (`peer_identity` is `None`; these
//! servers ask for none) and TLS messages from the client (none are
//! allowed in QUIC after its `Finished`: the connection is closed with
//! TLS's `unexpected_message`).

use std::any::Any;
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use quinn::crypto::{
    self, CryptoError, ExportKeyingMaterialError, KeyPair, Keys, ServerConfig as _,
    UnsupportedVersion,
};
use quinn::{ConnectionId, Side, TransportErrorCode};
use quinn_proto::TransportError;
use quinn_proto::transport_parameters::TransportParameters;
use rustls::quic::{Connection, KeyChange, PacketKeySet, Secrets, ServerConnection, Version};

use crate::TlsError;

/// TLS's `unexpected_message` alert, as a QUIC crypto error.
const UNEXPECTED_MESSAGE: u8 = 10;
/// TLS's `internal_error` alert.
const INTERNAL_ERROR: u8 = 80;

/// A QUIC server crypto configuration whose sessions drop their TLS state
/// after the handshake (see the module's documentation).
pub struct LeanServerConfig {
    tls: Arc<rustls::ServerConfig>,
    /// quinn's configuration of the same TLS setup: the Initial keys and
    /// Retry tags, which hold no per-connection state.
    quinn: QuicServerConfig,
}

impl LeanServerConfig {
    /// For `tls`, which must offer TLS 1.3 and, for 0-RTT, set
    /// `max_early_data_size` to `u32::MAX` (as quinn's own requires).
    pub fn new(tls: Arc<rustls::ServerConfig>) -> Result<Self, TlsError> {
        let quinn = QuicServerConfig::try_from(tls.clone()).map_err(|e| TlsError(e.to_string()))?;
        Ok(Self { tls, quinn })
    }
}

/// The TLS version rustls speaks for a QUIC version quinn supports.
fn tls_version(quic_version: u32) -> Result<Version, UnsupportedVersion> {
    match quic_version {
        1 | 0xff00_0021..=0xff00_0022 => Ok(Version::V1),
        0xff00_001d..=0xff00_0020 => Ok(Version::V1Draft),
        _ => Err(UnsupportedVersion),
    }
}

impl crypto::ServerConfig for LeanServerConfig {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.quinn.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.quinn.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        // quinn starts a session only for a version `initial_keys` took,
        // and rustls refuses a server config only without TLS 1.3, which
        // `new` checked (through quinn's own conversion).
        let tls = tls_version(version).ok().and_then(|v| {
            ServerConnection::new(self.tls.clone(), v, encoded)
                .ok()
                .map(|c| Box::new(Connection::Server(c)))
        });
        Box::new(LeanSession {
            config: self,
            version,
            tls,
            got_handshake_data: false,
            handshake_data: None,
            next: None,
        })
    }
}

/// One connection's crypto session: rustls until the handshake is over,
/// then the next key phase's secrets and the handshake's outcome.
struct LeanSession {
    config: Arc<LeanServerConfig>,
    version: u32,
    /// rustls, while the handshake runs; `None` with no `handshake_data`
    /// when it could not start (every handshake message is refused).
    tls: Option<Box<Connection>>,
    got_handshake_data: bool,
    /// The ALPN and server name, kept when `tls` goes.
    handshake_data: Option<Box<Negotiated>>,
    /// Where the next key phase quinn asks for comes from.
    next: Option<Next>,
}

/// The source of the next key phase handed to quinn.
enum Next {
    /// The 1-RTT handshake's: no phase handed out yet.
    Secrets(Secrets),
    /// The last phase handed out: the next follows from it.
    After(Arc<NextPhase>),
}

/// What the handshake settled that is asked of a session later.
#[derive(Clone)]
struct Negotiated {
    alpn: Option<Vec<u8>>,
    server_name: Option<String>,
}

impl LeanSession {
    fn negotiated(&self) -> Option<Negotiated> {
        match (&self.tls, &self.handshake_data) {
            (Some(tls), _) => Some(Negotiated {
                alpn: tls.alpn_protocol().map(<[u8]>::to_vec),
                server_name: server_name(tls).map(str::to_owned),
            }),
            (None, Some(d)) => Some((**d).clone()),
            (None, None) => None,
        }
    }
}

fn server_name(tls: &Connection) -> Option<&str> {
    match tls {
        Connection::Server(s) => s.server_name(),
        Connection::Client(_) => None,
    }
}

fn unexpected(reason: impl Into<String>) -> TransportError {
    TransportError {
        code: TransportErrorCode::crypto(UNEXPECTED_MESSAGE),
        frame: None,
        reason: reason.into(),
    }
}

fn boxed(keys: rustls::quic::Keys) -> Keys {
    Keys {
        header: KeyPair {
            local: Box::new(keys.local.header),
            remote: Box::new(keys.remote.header),
        },
        packet: KeyPair {
            local: Box::new(keys.local.packet),
            remote: Box::new(keys.remote.packet),
        },
    }
}

impl crypto::Session for LeanSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, _side: Side) -> Keys {
        // Asked as the connection starts: the configuration's, for the
        // version it took (test `versions_are_those_quinn_takes`).
        match self.config.quinn.initial_keys(self.version, dst_cid) {
            Ok(k) => k,
            Err(UnsupportedVersion) => unreachable!("QUIC version {} taken before", self.version),
        }
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        if !self.got_handshake_data {
            return None;
        }
        let n = self.negotiated()?;
        Some(Box::new(HandshakeData {
            protocol: n.alpn,
            server_name: n.server_name,
        }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        let certs = self.tls.as_ref()?.peer_certificates()?;
        Some(Box::new(
            certs
                .iter()
                .map(|c| c.clone().into_owned())
                .collect::<Vec<_>>(),
        ))
    }

    fn early_crypto(&self) -> Option<(Box<dyn crypto::HeaderKey>, Box<dyn crypto::PacketKey>)> {
        let keys = self.tls.as_ref()?.zero_rtt_keys()?;
        Some((Box::new(keys.header), Box::new(keys.packet)))
    }

    fn early_data_accepted(&self) -> Option<bool> {
        // A client's question.
        None
    }

    fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let Some(tls) = self.tls.as_mut() else {
            if self.handshake_data.is_none() {
                return Err(TransportError {
                    code: TransportErrorCode::crypto(INTERNAL_ERROR),
                    frame: None,
                    reason: "TLS session could not start".into(),
                });
            }
            return Err(unexpected("TLS message after the handshake"));
        };
        tls.read_hs(buf).map_err(|e| match tls.alert() {
            Some(alert) => TransportError {
                code: TransportErrorCode::crypto(alert.into()),
                frame: None,
                reason: e.to_string(),
            },
            None => TransportError {
                code: TransportErrorCode::PROTOCOL_VIOLATION,
                frame: None,
                reason: format!("TLS error: {e}"),
            },
        })?;
        // The ClientHello is whole once rustls knows the ALPN or the
        // server name (or the handshake is over): quinn then reports the
        // handshake data ready, once.
        if !self.got_handshake_data
            && (tls.alpn_protocol().is_some()
                || server_name(tls).is_some()
                || !tls.is_handshaking())
        {
            self.got_handshake_data = true;
            return Ok(true);
        }
        Ok(false)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        // Read by a server from the client's first flight, during the
        // handshake.
        let Some(buf) = self
            .tls
            .as_ref()
            .and_then(|t| t.quic_transport_parameters())
        else {
            return Ok(None);
        };
        TransportParameters::read(Side::Server, &mut std::io::Cursor::new(buf))
            .map(Some)
            .map_err(Into::into)
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let tls = self.tls.as_mut()?;
        let keys = match tls.write_hs(buf) {
            Some(KeyChange::Handshake { keys }) => Some(boxed(keys)),
            Some(KeyChange::OneRtt { keys, next }) => {
                self.next = Some(Next::Secrets(next));
                Some(boxed(keys))
            }
            None => None,
        };
        // Over, and its last message (a resumption ticket, if any) written
        // into `buf`: the TLS state is no longer needed.
        if !tls.is_handshaking() && keys.is_none() {
            self.handshake_data = self.negotiated().map(Box::new);
            self.tls = None;
        }
        keys
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn crypto::PacketKey>>> {
        let secrets = match self.next.take()? {
            Next::Secrets(s) => s,
            // rustls moves secrets on only by deriving a phase's keys: the
            // phase before this one was derived (it is in use) and kept
            // what followed.
            Next::After(before) => before.derived().1.clone(),
        };
        let phase = Arc::new(NextPhase {
            secrets,
            derived: OnceLock::new(),
        });
        self.next = Some(Next::After(phase.clone()));
        Some(KeyPair {
            local: Box::new(PhaseKey {
                phase: phase.clone(),
                local: true,
            }),
            remote: Box::new(PhaseKey {
                phase,
                local: false,
            }),
        })
    }

    fn is_valid_retry(
        &self,
        _orig_dst_cid: &ConnectionId,
        _header: &[u8],
        _payload: &[u8],
    ) -> bool {
        // Retry packets are for clients.
        false
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        let tls = self.tls.as_ref().ok_or(ExportKeyingMaterialError)?;
        tls.export_keying_material(output, label, Some(context))
            .map(|_| ())
            .map_err(|_| ExportKeyingMaterialError)
    }
}

/// A key phase handed to quinn before its use: its secrets, then, once
/// first asked for, its keys and the secrets of the phase after it.
struct NextPhase {
    secrets: Secrets,
    derived: OnceLock<(PacketKeySet, Secrets)>,
}

/// Key phases derived, for the tests to see that key updates happened.
#[cfg(test)]
static DERIVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl NextPhase {
    fn derived(&self) -> &(PacketKeySet, Secrets) {
        self.derived.get_or_init(|| {
            #[cfg(test)]
            DERIVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut s = self.secrets.clone();
            let keys = s.next_packet_keys();
            (keys, s)
        })
    }
}

/// One direction of a [`NextPhase`].
struct PhaseKey {
    phase: Arc<NextPhase>,
    local: bool,
}

impl PhaseKey {
    // quinn's `crypto::PacketKey` is implemented for the box.
    #[allow(clippy::borrowed_box)]
    fn key(&self) -> &Box<dyn rustls::quic::PacketKey> {
        let (k, _) = self.phase.derived();
        if self.local { &k.local } else { &k.remote }
    }
}

impl crypto::PacketKey for PhaseKey {
    fn encrypt(&self, packet: u64, buf: &mut [u8], header_len: usize) {
        crypto::PacketKey::encrypt(self.key(), packet, buf, header_len)
    }

    fn decrypt(
        &self,
        packet: u64,
        header: &[u8],
        payload: &mut BytesMut,
    ) -> Result<(), CryptoError> {
        crypto::PacketKey::decrypt(self.key(), packet, header, payload)
    }

    fn tag_len(&self) -> usize {
        crypto::PacketKey::tag_len(self.key())
    }

    fn confidentiality_limit(&self) -> u64 {
        crypto::PacketKey::confidentiality_limit(self.key())
    }

    fn integrity_limit(&self) -> u64 {
        crypto::PacketKey::integrity_limit(self.key())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use quinn::crypto::rustls::QuicClientConfig;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// A lean server config with a fresh self-signed certificate for
    /// `localhost` (0-RTT tickets kept: 8), and the certificate.
    fn lean_config() -> (super::LeanServerConfig, CertificateDer<'static>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let certified =
            rustls::sign::CertifiedKey::from_der(vec![der.clone()], key, &provider).unwrap();
        let single = rustls::sign::SingleCertAndKey::from(certified);
        let lean =
            crate::lean_server_crypto_with(Arc::new(single), vec![codec::wire::ALPN.to_vec()], 8)
                .unwrap();
        (lean, der)
    }

    /// A lean server on loopback, and a client endpoint that trusts it.
    fn pair() -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
        let (lean, der) = lean_config();
        let provider = rustls::crypto::ring::default_provider();
        let server = quinn::ServerConfig::with_crypto(Arc::new(lean));
        let server = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![codec::wire::ALPN.to_vec()];
        tls.enable_early_data = true;
        let client_cfg =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_cfg);
        (server, client, addr)
    }

    /// Echoes every bidirectional stream of every connection, and hands
    /// the connections out.
    fn echo(server: &quinn::Endpoint) -> tokio::sync::mpsc::UnboundedReceiver<quinn::Connection> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(inc) = server.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    let _ = tx.send(conn.clone());
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            let data = recv.read_to_end(1 << 20).await.unwrap();
                            send.write_all(&data).await.unwrap();
                            send.finish().unwrap();
                        });
                    }
                });
            }
        });
        rx
    }

    async fn round_trip(conn: &quinn::Connection, data: &[u8]) -> Vec<u8> {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(data).await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(1 << 20).await.unwrap()
    }

    #[test]
    fn versions_are_those_quinn_takes() {
        use quinn::crypto::ServerConfig as _;
        let (lean, _) = lean_config();
        let cid = quinn::ConnectionId::new(&[7; 8]);
        for v in [0u32, 1, 2, 0x6b33_43cf]
            .into_iter()
            .chain(0xff00_0000..0xff00_0030)
        {
            assert_eq!(
                super::tls_version(v).is_ok(),
                lean.initial_keys(v, &cid).is_ok(),
                "QUIC version {v:#x}"
            );
        }
    }

    #[tokio::test]
    async fn a_lean_session_carries_data_across_key_updates_from_both_sides() {
        let (server, client, addr) = pair();
        let mut conns = echo(&server);
        let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
        let at_server = conns.recv().await.unwrap();
        // What the relay reads of a handshake: the ALPN.
        let data = at_server
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap();
        assert_eq!(data.protocol.as_deref(), Some(codec::wire::ALPN));
        assert_eq!(data.server_name.as_deref(), Some("localhost"));
        let before = super::DERIVED.load(std::sync::atomic::Ordering::Relaxed);
        for round in 0..8u8 {
            // Every key phase derived when it is first used, by either
            // side's update; 100 KB a round, so each phase carries many
            // packets. quinn ignores an update until the keys before the
            // last one are dropped (three PTOs after it is acknowledged):
            // a pause between rounds lets each one happen.
            if round % 2 == 0 {
                conn.force_key_update();
            } else {
                at_server.force_key_update();
            }
            let data = vec![round; 100_000];
            assert_eq!(round_trip(&conn, &data).await, data, "round {round}");
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        }
        // Each update made the server derive a phase (tests running at
        // once in this process may add theirs).
        let derived = super::DERIVED.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(derived >= 8, "{derived} key phases derived in 8 updates");
        // The server's TLS state is gone after the handshake.
        let mut out = [0u8; 32];
        assert!(
            at_server
                .export_keying_material(&mut out, b"label", b"")
                .is_err()
        );
        assert!(conn.export_keying_material(&mut out, b"label", b"").is_ok());
        conn.close(0u32.into(), b"done");
        server.close(0u32.into(), b"done");
    }

    #[tokio::test]
    async fn a_lean_server_writes_its_resumption_ticket_and_takes_0rtt() {
        let (server, client, addr) = pair();
        let _conns = echo(&server);
        let first = client.connect(addr, "localhost").unwrap().await.unwrap();
        // The ticket comes after the handshake, in the last message the
        // server's rustls writes before it is dropped.
        assert_eq!(round_trip(&first, b"first").await, b"first");
        first.close(0u32.into(), b"done");
        let connecting = client.connect(addr, "localhost").unwrap();
        let (conn, accepted) = match connecting.into_0rtt() {
            Ok(c) => c,
            Err(_) => panic!("no ticket from the lean server: no 0-RTT"),
        };
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"early").await.unwrap();
        send.finish().unwrap();
        assert!(accepted.await, "0-RTT refused");
        assert_eq!(recv.read_to_end(1 << 10).await.unwrap(), b"early");
        conn.close(0u32.into(), b"done");
        server.close(0u32.into(), b"done");
    }
}
