//! Endpoints and TLS for clients: trust the relay's certificate (or CA)
//! from a PEM file, speak our ALPN, keep connections alive.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why a client endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The CA file could not be read or holds no usable certificate.
    #[error("{path}: {why}")]
    Ca { path: String, why: String },
    /// TLS or QUIC refused the configuration.
    #[error("client TLS/QUIC configuration: {0}")]
    Config(String),
    /// The UDP socket or the endpoint could not be created.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `--relay` is not `HOST:PORT`, or does not resolve.
    #[error("relay address {addr}: {why}")]
    Address { addr: String, why: String },
}

/// Concurrent deliveries a client accepts (QUIC uni stream limit).
pub const MAX_DELIVERY_STREAMS: u32 = 256;

/// How a client's connections behave on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    /// Reconnects resume TLS and send `Auth` in 0-RTT (false: no
    /// resumption either, every connection does a full handshake).
    pub zero_rtt: bool,
    /// Packets the relay may receive from this client before it must ACK
    /// them (QUIC ACK frequency extension; 1: plain QUIC, every other
    /// packet).
    pub ack_threshold: u32,
    /// Longest the relay may delay an ACK of what this client sends. A gap
    /// (a lost packet) is still acked at once, so loss recovery in the
    /// middle of a clip does not wait for it.
    pub ack_delay: Duration,
    /// A silent connection sends a QUIC PING this often, to keep its NAT
    /// mapping and the relay's idle timeout (30 s) from ending it. Each
    /// costs a small packet both ways (its ACK): at 15 s about 5 bytes a
    /// second, 0.4 MB a day of an idle phone's data; at 5 s three times
    /// that. Carrier NATs keep UDP mappings 30 s or more.
    pub keep_alive: Duration,
}

/// Longest keep-alive interval: below the relay's default idle timeout
/// (30 s) with room for one lost PING's retransmission.
pub const MAX_KEEP_ALIVE: Duration = Duration::from_secs(25);

impl Default for Transport {
    fn default() -> Self {
        Self {
            zero_rtt: true,
            ack_threshold: 4,
            ack_delay: Duration::from_millis(25),
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// A quinn client config that trusts the certificates in `ca_pem`, and
/// resumes with 0-RTT.
pub fn client_config(ca_pem: &Path) -> Result<quinn::ClientConfig, NetError> {
    client_config_with(ca_pem, &Transport::default())
}

/// [`client_config`] with `transport`'s choices.
pub fn client_config_with(
    ca_pem: &Path,
    transport: &Transport,
) -> Result<quinn::ClientConfig, NetError> {
    let zero_rtt = transport.zero_rtt;
    let ca = |why: String| NetError::Ca {
        path: ca_pem.display().to_string(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_pem).map_err(|e| ca(format!("reading: {e}")))?;
    for c in certs {
        let c = c.map_err(|e| ca(format!("parsing: {e}")))?;
        roots
            .add(c)
            .map_err(|e| ca(format!("adding as trusted: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ca("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = |e: &dyn std::fmt::Display| NetError::Config(e.to_string());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![codec::wire::ALPN.to_vec()];
    // Reconnects resume with a ticket from the last connection (rustls
    // keeps them in memory, per relay name) and send `Auth` in 0-RTT.
    tls.enable_early_data = zero_rtt;
    if !zero_rtt {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    let quic = QuicClientConfig::try_from(tls).map_err(|e| config(&e))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(MAX_DELIVERY_STREAMS.into());
    t.max_concurrent_bidi_streams(0u32.into());
    t.keep_alive_interval(Some(
        transport
            .keep_alive
            .clamp(Duration::from_secs(1), MAX_KEEP_ALIVE),
    ));
    // Ask the relay for fewer ACKs of what we send (QUIC ACK frequency
    // extension): by default one per 4 packets or 25 ms.
    if transport.ack_threshold > 1 {
        let mut af = quinn::AckFrequencyConfig::default();
        af.ack_eliciting_threshold(transport.ack_threshold.into())
            .max_ack_delay(Some(transport.ack_delay));
        t.ack_frequency_config(Some(af));
    }
    // Voice packets are far below the 1200-byte QUIC minimum MTU: path MTU
    // probes (padded to ~1450 bytes) would only cost the user data.
    t.mtu_discovery_config(None);
    t.max_idle_timeout(Some(
        Duration::from_secs(30).try_into().map_err(|e| config(&e))?,
    ));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// UDP buffers a client endpoint asks for: one load-generator endpoint
/// carries hundreds of connections, whose packets arrive in bursts (a
/// channel's fan-out reaches every member at once).
pub const CLIENT_UDP_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket on an ephemeral port of the same address family as
/// `peer`, with [`CLIENT_UDP_BUFFER`] buffers: for a new endpoint, or to
/// move an endpoint to a new network (`Endpoint::rebind`).
pub fn client_socket(peer: SocketAddr) -> Result<std::net::UdpSocket, NetError> {
    let bind: SocketAddr = if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let (sock, _, _) =
        quic::udp_socket(bind, CLIENT_UDP_BUFFER, CLIENT_UDP_BUFFER).map_err(|source| {
            NetError::Io {
                what: "binding a UDP socket",
                source,
            }
        })?;
    Ok(sock)
}

/// Length of the connection ids a client gives the relay: every datagram
/// the relay sends it carries one. 4 random bytes tell apart the
/// connections of one endpoint (a load generator's hundreds) and spend 4
/// bytes less per voice packet than quinn's 8.
pub const CLIENT_CID_BYTES: usize = 4;

struct ClientCids;

impl quinn::ConnectionIdGenerator for ClientCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; CLIENT_CID_BYTES]>())
    }

    fn cid_len(&self) -> usize {
        CLIENT_CID_BYTES
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The endpoint config of a client: [`CLIENT_CID_BYTES`]-byte connection
/// ids.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::default();
    cfg.cid_generator(|| Box::new(ClientCids));
    cfg
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn endpoint(relay: SocketAddr, ca_pem: &Path) -> Result<quinn::Endpoint, NetError> {
    endpoint_with(relay, ca_pem, &Transport::default())
}

/// [`endpoint`] whose connections follow `transport`.
pub fn endpoint_with(
    relay: SocketAddr,
    ca_pem: &Path,
    transport: &Transport,
) -> Result<quinn::Endpoint, NetError> {
    let sock = client_socket(relay)?;
    let mut ep = quinn::Endpoint::new(endpoint_config(), None, sock, Arc::new(quinn::TokioRuntime))
        .map_err(|source| NetError::Io {
            what: "starting a QUIC endpoint",
            source,
        })?;
    ep.set_default_client_config(client_config_with(ca_pem, transport)?);
    Ok(ep)
}

/// Resolves `HOST:PORT` to an address and the name to check in the
/// relay's certificate.
pub async fn resolve(relay: &str) -> Result<(SocketAddr, String), NetError> {
    let bad = |why: String| NetError::Address {
        addr: relay.to_owned(),
        why,
    };
    let (host, _) = relay
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addr = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| bad(format!("resolving: {e}")))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))?;
    Ok((addr, host))
}
