//! ptt/1 inside WebTransport (what the browser app speaks), from a Rust
//! WebTransport client (`web-transport-quinn`, pinning the certificate
//! hash the web listener serves), against native ptt/1 clients on the same
//! relay port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use codec::wire::{AudioFormat, ClipHeader, ClipId, Message, Target};
use codec::{ClipEnd, ErrorCode};
use common::*;
use relay::testing::PageConfig;

/// What the page reads from `/config.json`.
async fn page_config(t: &TestRelay) -> PageConfig {
    let web = t.relay.web_addr().expect("web listener on");
    let (status, body) = http_get(web, "/config.json").await;
    assert_eq!(status, 200, "{body}");
    let cfg: PageConfig = serde_json::from_str(&body).unwrap();
    assert_eq!(cfg.port, t.relay.quic_addr().port());
    cfg
}

/// What the page reads from `/config.json`, and a WebTransport client
/// that pins its hash.
async fn web_client(t: &TestRelay) -> (PageConfig, web_transport_quinn::Client) {
    let cfg = page_config(t).await;
    assert_eq!(cfg.certificate_hashes.len(), 1);
    let hash: Vec<u8> = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&cfg.certificate_hashes[0][i..i + 2], 16).unwrap())
        .collect();
    let client = web_transport_quinn::ClientBuilder::new()
        .with_server_certificate_hashes(vec![hash])
        .unwrap();
    (cfg, client)
}

async fn open_session(
    client: &web_transport_quinn::Client,
    cfg: &PageConfig,
    path: &str,
) -> Result<web_transport_quinn::Session, web_transport_quinn::ClientError> {
    let url: url::Url = format!("https://127.0.0.1:{}{path}", cfg.port)
        .parse()
        .unwrap();
    client.connect(url).await
}

/// Reads messages and records from a stream into a buffer.
struct Reader {
    recv: web_transport_quinn::RecvStream,
    buf: BytesMut,
}

impl Reader {
    async fn fill(&mut self) -> bool {
        match tokio::time::timeout(Duration::from_secs(10), self.recv.read_chunk(65536, true))
            .await
            .expect("read in time")
        {
            Ok(Some(c)) => {
                self.buf.extend_from_slice(&c.bytes);
                true
            }
            _ => false,
        }
    }

    async fn message(&mut self) -> Message {
        loop {
            if let Some((m, n)) = Message::decode(&self.buf, 65536).unwrap() {
                let _ = self.buf.split_to(n);
                return m;
            }
            assert!(self.fill().await, "stream ended before a message");
        }
    }

    /// The packet records and the end record, up to FIN.
    async fn clip(&mut self) -> (Vec<Bytes>, ClipEnd) {
        while self.fill().await {}
        let mut at = &self.buf[..];
        let mut packets = Vec::new();
        loop {
            let (len, n) = codec::varint::get(at).unwrap();
            at = &at[n..];
            if len == 0 {
                let (packet_count, n) = codec::varint::get(at).unwrap();
                let (final_granule, m) = codec::varint::get(&at[n..]).unwrap();
                assert_eq!(n + m, at.len(), "nothing after the end record");
                return (
                    packets,
                    ClipEnd {
                        packet_count,
                        final_granule,
                    },
                );
            }
            packets.push(Bytes::copy_from_slice(&at[..len as usize]));
            at = &at[len as usize..];
        }
    }
}

/// `Auth` on a new control stream; the `Welcome`.
async fn sign_in(
    session: &web_transport_quinn::Session,
    token: &str,
) -> (web_transport_quinn::SendStream, Reader, Message) {
    let (mut send, recv) = session.open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    Message::Auth(codec::wire::Auth {
        token: token.into(),
    })
    .encode(&mut buf);
    send.write_all(&buf).await.unwrap();
    let mut rd = Reader {
        recv,
        buf: BytesMut::new(),
    };
    let welcome = rd.message().await;
    (send, rd, welcome)
}

#[tokio::test]
async fn a_browser_session_talks_and_listens_beside_native_clients() {
    let t = start(|_| {}).await;
    let (cfg, client) = web_client(&t).await;
    let web = open_session(&client, &cfg, "/ptt").await.unwrap();
    let (mut ctl, mut ctl_rd, welcome) = sign_in(&web, &t.token("carol")).await;
    match welcome {
        Message::Welcome(w) => assert_eq!(w.user, "carol"),
        m => panic!("expected Welcome, got {m:?}"),
    }
    let (bob, mut bob_events) = t.connect("bob").await;

    // Browser -> native: one upload stream, answered `Accepted`.
    let id = ClipId(rand::random());
    let packets: Vec<Bytes> = (0..25).map(|i| packet(i, 30 + i as usize)).collect();
    let (mut send, recv) = web.open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    Message::ClipHeader(ClipHeader {
        clip_id: id,
        target: Target::User("bob".into()),
        format: AudioFormat::default(),
    })
    .encode(&mut buf);
    for p in &packets {
        codec::framing::put_packet(&mut buf, p);
    }
    ClipEnd {
        packet_count: packets.len() as u64,
        final_granule: 25 * 960,
    }
    .encode(&mut buf);
    send.write_all(&buf).await.unwrap();
    send.finish().unwrap();
    let mut up = Reader {
        recv,
        buf: BytesMut::new(),
    };
    match up.message().await {
        Message::Accepted(a) => assert_eq!((a.clip_id, a.duplicate), (id, false)),
        m => panic!("expected Accepted, got {m:?}"),
    }
    let got = next_complete(&mut bob_events).await;
    assert_eq!(got.id(), id);
    assert_eq!(got.delivery.sender, "carol");
    assert_eq!(got.packets, packets);
    bob.ack(id).await.unwrap();
    assert_eq!(t.settle_pending(0).await, 0, "bob acked carol's clip");

    // Native -> browser: a delivery stream with the WebTransport header
    // taken off by the browser's stack, ptt/1 inside unchanged.
    let clip = clip("carol", 30);
    let (clip_id, sent) = (clip.id, clip.packets.clone());
    bob.send_clip(&clip, ptt_client::Pacing::Upload)
        .await
        .unwrap();
    let recv = tokio::time::timeout(Duration::from_secs(10), web.accept_uni())
        .await
        .expect("a delivery in time")
        .unwrap();
    let mut rd = Reader {
        recv,
        buf: BytesMut::new(),
    };
    match rd.message().await {
        Message::Delivery(d) => {
            assert_eq!((d.clip_id, d.sender.as_str()), (clip_id, "bob"));
        }
        m => panic!("expected Delivery, got {m:?}"),
    }
    let (got, end) = rd.clip().await;
    assert_eq!(got, sent);
    assert_eq!(end.packet_count, 30);
    // Acked on the control stream, as any client: the copy is released.
    let mut ack = BytesMut::new();
    Message::Ack(clip_id).encode(&mut ack);
    ctl.write_all(&ack).await.unwrap();
    assert_eq!(t.settle_pending(0).await, 0);
    drop(ctl_rd.buf.split());
}

#[tokio::test]
async fn refusals_reach_the_page_as_codes_and_words() {
    let t = start(|_| {}).await;
    let (cfg, client) = web_client(&t).await;
    // Another path: 404, no session.
    assert!(open_session(&client, &cfg, "/other").await.is_err());
    // A bad token: the session closes with token_invalid and the reason,
    // as WebTransport's close (code and reason), not a bare QUIC close.
    let web = open_session(&client, &cfg, "/ptt").await.unwrap();
    let (mut send, _recv) = web.open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    Message::Auth(codec::wire::Auth {
        token: "not-a-token".into(),
    })
    .encode(&mut buf);
    send.write_all(&buf).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), web.closed())
        .await
        .expect("closed in time");
    match err {
        web_transport_quinn::SessionError::WebTransportError(
            web_transport_quinn::WebTransportError::Closed(code, reason),
        ) => {
            assert_eq!(u64::from(code), ErrorCode::TokenInvalid.to_u64());
            assert!(reason.contains("invalid token"), "{reason}");
        }
        e => panic!("expected a WebTransport close, got {e:?}"),
    }
}

/// Accepts any server certificate (the handshake's signature is still
/// checked): the test below is about the relay's choice of protocol.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A WebTransport client whose ClientHello spans two Initial packets:
/// after h3 it offers protocols the relay does not speak, long enough to
/// push the ClientHello past one 1200-byte packet.
fn two_packet_hello_client() -> web_transport_quinn::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    crypto.alpn_protocols = std::iter::once(web_transport_quinn::ALPN.as_bytes().to_vec())
        .chain((0..5u8).map(|i| vec![b'a' + i; 250]))
        .collect();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    web_transport_quinn::Client::new(endpoint, quinn::ClientConfig::new(Arc::new(quic)))
}

fn url(to: &Tap) -> url::Url {
    format!("https://127.0.0.1:{}/ptt", to.addr.port())
        .parse()
        .unwrap()
}

/// A browser's ClientHello can span two packets (Chromium spreads it over
/// two Initial packets), which can come apart: the relay must wait for all
/// of it before it reads the ALPN, or it takes the browser for a native
/// ptt/1 client and the page's session never opens (seen as a page stuck
/// "connecting" for 10 s, then "Opening handshake failed").
#[tokio::test]
async fn a_client_hello_in_two_packets_still_opens_a_browser_session() {
    let t = start(|_| {}).await;
    // Its second half is lost: the relay sees the first alone, and the
    // rest only when the client sends it again.
    let via = Tap::losing(t.relay.quic_addr(), |n| n == 2).await;
    let web = tokio::time::timeout(
        Duration::from_secs(5),
        two_packet_hello_client().connect(url(&via)),
    )
    .await
    .expect("a WebTransport session in time")
    .unwrap();
    match sign_in(&web, &t.token("carol")).await.2 {
        Message::Welcome(w) => assert_eq!(w.user, "carol"),
        m => panic!("expected Welcome, got {m:?}"),
    }
}

/// A ClientHello that never comes whole holds the relay's connection (and
/// its place among the unauthenticated ones) for `auth_timeout`, not until
/// the connection idles out.
#[tokio::test]
async fn a_client_hello_never_completed_is_given_up_after_auth_timeout() {
    let t = start(|c| {
        c.auth_timeout = Duration::from_millis(300);
        c.idle_timeout = Duration::from_secs(30);
    })
    .await;
    let via = Tap::losing(t.relay.quic_addr(), |n| n >= 2).await;
    let client = two_packet_hello_client();
    let connecting = tokio::spawn(async move { client.connect(url(&via)).await });
    let failed = |body: &str| {
        body.lines()
            .any(|l| l.starts_with("ptt_handshakes_total{outcome=\"failed\"} 1"))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get(t.relay.admin_addr(), "/metrics").await;
        if failed(&body) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the half ClientHello was not given up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    connecting.abort();
}

/// A certificate authority and a leaf for 127.0.0.1 it signed, as an
/// operator's `cert`/`key` files (chain, key) in `dir`; the CA's DER.
fn operator_files(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    rustls::pki_types::CertificateDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ptt test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let cert = dir.join("operator-cert.pem");
    let key = dir.join("operator-key.pem");
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (cert, key, ca_cert.der().clone())
}

/// A WebTransport client that verifies the relay's certificate as a
/// browser does for any site: a chain to `root`, for the URL's host.
fn verifying_client(
    root: rustls::pki_types::CertificateDer<'static>,
) -> web_transport_quinn::Client {
    let mut store = rustls::RootCertStore::empty();
    store.add(root).unwrap();
    let mut crypto = rustls::ClientConfig::builder_with_provider(relay::testing::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![web_transport_quinn::ALPN.as_bytes().to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    web_transport_quinn::Client::new(endpoint, config)
}

#[tokio::test]
async fn with_an_operator_certificate_the_page_connects_like_any_site() {
    let files = tempfile::tempdir().unwrap();
    let (cert, key, ca) = operator_files(files.path());
    let t = start(|c| {
        c.cert = cert;
        c.key = key;
    })
    .await;
    // The page is told to pin nothing: the browser verifies the chain.
    let cfg = page_config(&t).await;
    assert!(cfg.certificate_hashes.is_empty(), "{cfg:?}");
    assert_eq!(cfg.certificate_expires_ms, 0);

    // A client that trusts the operator's CA gets a session and a Welcome.
    let session = open_session(&verifying_client(ca), &cfg, "/ptt")
        .await
        .expect("a WebTransport session with the operator's certificate");
    let (_ctl, _rd, welcome) = sign_in(&session, &t.token("dora")).await;
    match welcome {
        Message::Welcome(w) => assert_eq!(w.user, "dora"),
        m => panic!("expected Welcome, got {m:?}"),
    }

    // One that trusts another certificate is refused: the certificate is
    // checked, and it is the operator's, not the development one.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let refused = open_session(&verifying_client(other.cert.der().clone()), &cfg, "/ptt").await;
    assert!(refused.is_err(), "an untrusted certificate was accepted");
}
