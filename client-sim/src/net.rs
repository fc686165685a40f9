//! Endpoints and TLS for clients: trust the relay's certificate (or CA)
//! from a PEM file, speak our ALPN, keep connections alive.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Concurrent deliveries a client accepts (QUIC uni stream limit).
pub const MAX_DELIVERY_STREAMS: u32 = 256;

/// A quinn client config that trusts the certificates in `ca_pem`.
pub fn client_config(ca_pem: &Path) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("reading {}", ca_pem.display()))?;
    for c in certs {
        roots
            .add(c.with_context(|| format!("parsing {}", ca_pem.display()))?)
            .with_context(|| format!("adding {} as trusted", ca_pem.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{} holds no certificate",
        ca_pem.display()
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![codec::wire::ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(MAX_DELIVERY_STREAMS.into());
    t.max_concurrent_bidi_streams(0u32.into());
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    // Ask the relay for fewer ACKs of what we send (QUIC ACK frequency
    // extension): one per 4 packets or 25 ms.
    let mut af = quinn::AckFrequencyConfig::default();
    af.ack_eliciting_threshold(4u32.into())
        .max_ack_delay(Some(Duration::from_millis(25)));
    t.ack_frequency_config(Some(af));
    // Voice packets are far below the 1200-byte QUIC minimum MTU: path MTU
    // probes (padded to ~1450 bytes) would only cost the user data.
    t.mtu_discovery_config(None);
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// UDP buffers a client endpoint asks for: one load-generator endpoint
/// carries hundreds of connections, whose packets arrive in bursts (a
/// channel's fan-out reaches every member at once).
pub const CLIENT_UDP_BUFFER: usize = 4 * 1024 * 1024;

/// A client endpoint on an ephemeral port of the right address family.
pub fn endpoint(relay: SocketAddr, ca_pem: &Path) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = if relay.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let (sock, _, _) = quic::udp_socket(bind, CLIENT_UDP_BUFFER, CLIENT_UDP_BUFFER)
        .context("binding a UDP socket")?;
    let mut ep = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        sock,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting a QUIC endpoint")?;
    ep.set_default_client_config(client_config(ca_pem)?);
    Ok(ep)
}

/// Resolves `HOST:PORT` to an address and the name to check in the
/// relay's certificate.
pub async fn resolve(relay: &str) -> anyhow::Result<(SocketAddr, String)> {
    let (host, _) = relay
        .rsplit_once(':')
        .with_context(|| format!("--relay {relay}: expected HOST:PORT"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addr = tokio::net::lookup_host(relay)
        .await
        .with_context(|| format!("resolving {relay}"))?
        .next()
        .with_context(|| format!("{relay} resolves to no address"))?;
    Ok((addr, host))
}
