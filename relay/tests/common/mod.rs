//! Test harness: a real relay on loopback (ephemeral ports, temp data dir)
//! and real clients over QUIC.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use codec::wire::{AudioFormat, ClipHeader, ClipId, Message, Target};
use ptt_client::{Client, ClientError, ClientOptions, Event, OutgoingClip, net};
use relay::{Config, Relay};
use tokio::sync::mpsc;

pub mod nats;
pub mod push;

pub struct TestRelay {
    pub relay: Relay,
    pub endpoint: quinn::Endpoint,
    _dir: Option<tempfile::TempDir>,
}

/// Starts a relay with `tweak` applied to the test config.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let mut t = start_in(dir.path(), tweak).await;
    t._dir = Some(dir);
    t
}

/// Starts a relay on data dir `dir` (kept by the caller, for restarts).
pub async fn start_in(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> TestRelay {
    // RUST_LOG=... shows the in-process relays' log (nextest shows a
    // failed test's output).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let mut cfg = Config::for_tests(dir);
    tweak(&mut cfg);
    wrap(Relay::start(cfg).await.unwrap())
}

/// A running relay with a client endpoint that trusts it.
pub fn wrap(relay: Relay) -> TestRelay {
    let endpoint = net::endpoint(relay.quic_addr(), &relay.files().cert).unwrap();
    TestRelay {
        relay,
        endpoint,
        _dir: None,
    }
}

impl TestRelay {
    pub fn token(&self, user: &str) -> String {
        self.relay
            .token_key()
            .mint(user, Duration::from_secs(3600))
            .unwrap()
    }

    /// A token with talk-channel grants.
    pub fn token_with(&self, user: &str, channels: &[(&str, codec::token::Right)]) -> String {
        self.relay
            .token_key()
            .mint_with_channels(
                user,
                Duration::from_secs(3600),
                channels.iter().map(|(c, r)| (c.to_string(), *r)).collect(),
            )
            .unwrap()
    }

    /// Connects with a token granting `channels`.
    pub async fn member(
        &self,
        user: &str,
        channels: &[(&str, codec::token::Right)],
    ) -> (Arc<Client>, mpsc::Receiver<Event>) {
        self.try_connect_with(&self.token_with(user, channels), ClientOptions::default())
            .await
            .unwrap()
    }

    pub async fn try_connect_with(
        &self,
        token: &str,
        opts: ClientOptions,
    ) -> Result<(Arc<Client>, mpsc::Receiver<Event>), ClientError> {
        Client::connect(
            &self.endpoint,
            self.relay.quic_addr(),
            "localhost",
            token,
            opts,
        )
        .await
    }

    pub async fn connect(&self, user: &str) -> (Arc<Client>, mpsc::Receiver<Event>) {
        self.try_connect_with(&self.token(user), ClientOptions::default())
            .await
            .unwrap()
    }

    pub fn pending(&self) -> u64 {
        self.relay.shared().store.stats().pending
    }

    /// Waits (up to 5 s) for the stored copies to drop to `n` (acks in
    /// flight); returns how many are left.
    pub async fn settle_pending(&self, n: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.pending() > n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.pending()
    }
}

/// A valid 20 ms CELT packet of `len` bytes whose payload encodes `seq`.
pub fn packet(seq: u32, len: usize) -> Bytes {
    let mut p = vec![0u8; len.max(5)];
    p[0] = 31 << 3;
    p[1..5].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(p)
}

/// A clip of `n` packets of 20 ms for `to`.
pub fn clip(to: &str, n: u32) -> OutgoingClip {
    OutgoingClip {
        id: ClipId(rand::random()),
        target: Target::User(to.into()),
        format: AudioFormat::default(),
        packets: (0..n).map(|i| packet(i, 40 + (i as usize % 30))).collect(),
        final_granule: u64::from(n) * 960 - 100,
    }
}

/// A clip of `n` packets for talk channel `ch`.
pub fn channel_clip(ch: &str, n: u32) -> OutgoingClip {
    let mut c = clip("x", n);
    c.target = Target::Channel(ch.into());
    c
}

/// The code and reason of a refused upload (panics if it was not).
pub fn rejected(r: Result<ptt_client::SendOutcome, ClientError>) -> (codec::ErrorCode, String) {
    match r {
        Err(ClientError::Rejected { code, reason, .. }) => (code, reason),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Waits for the next event matching `f`, up to 10 s.
pub async fn next_matching<T>(
    events: &mut mpsc::Receiver<Event>,
    mut f: impl FnMut(Event) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = events.recv().await.expect("event channel closed");
            if let Some(t) = f(ev) {
                return t;
            }
        }
    })
    .await
    .expect("timed out waiting for an event")
}

pub async fn next_complete(events: &mut mpsc::Receiver<Event>) -> ptt_client::ReceivedClip {
    next_matching(events, |e| match e {
        Event::Complete(c) => Some(c),
        _ => None,
    })
    .await
}

/// Asserts that no complete clip arrives within `wait`.
pub async fn assert_no_clip(events: &mut mpsc::Receiver<Event>, wait: Duration) {
    let r = tokio::time::timeout(wait, async {
        loop {
            match events.recv().await {
                Some(Event::Complete(c)) => return Some(c),
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await;
    if let Ok(Some(c)) = r {
        panic!("unexpected clip {}", c.id());
    }
}

impl TestRelay {
    /// Waits (up to 5 s) for the bytes of uploads in flight to drop to 0;
    /// returns what is left.
    pub async fn settle_inflight(&self) -> u64 {
        let inflight = || {
            self.relay
                .shared()
                .inflight
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while inflight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        inflight()
    }

    /// A QUIC connection to the relay with nothing said on it yet.
    pub async fn raw_connection(&self) -> quinn::Connection {
        self.endpoint
            .connect(self.relay.quic_addr(), "localhost")
            .unwrap()
            .await
            .unwrap()
    }
}

/// Waits (up to 5 s) for `conn` to close; the relay's close code, if it
/// closed with one.
pub async fn close_code(conn: &quinn::Connection) -> Option<codec::ErrorCode> {
    let why = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed within 5 s");
    quic::close_reason(&why).map(|(c, _)| c)
}

/// Opens a clip stream by hand and writes the header plus `packets`
/// records, without an end: for partial and malformed uploads.
pub async fn raw_upload(
    client: &Client,
    id: ClipId,
    to: &str,
    packets: &[Bytes],
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = client.connection().open_bi().await.unwrap();
    let mut buf = BytesMut::new();
    Message::ClipHeader(ClipHeader {
        clip_id: id,
        target: Target::User(to.into()),
        format: AudioFormat::default(),
    })
    .encode(&mut buf);
    for p in packets {
        codec::framing::put_packet(&mut buf, p);
    }
    send.write_all(&buf).await.unwrap();
    (send, recv)
}

/// Reads the relay's answer on a clip stream.
pub async fn answer(recv: quinn::RecvStream) -> Message {
    let mut rd = quic::MessageReader::new(recv, 65536);
    tokio::time::timeout(Duration::from_secs(10), rd.next())
        .await
        .expect("no answer in time")
        .expect("answer unreadable")
        .expect("stream ended without an answer")
}

/// `GET path` over HTTP/1.0 (no chunking): (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Starts the `ptt-relay` binary on ephemeral ports with data dir `dir` and
/// `extra` flags; returns it (killed on drop) and its QUIC address, read
/// from its banner. Its log is drained so it never blocks on a full pipe.
pub async fn start_binary(
    dir: &std::path::Path,
    extra: &[&str],
) -> (tokio::process::Child, std::net::SocketAddr) {
    start_binary_at(dir, "127.0.0.1:0", extra).await
}

/// [`start_binary`] with QUIC on `listen` (a restart on the same address).
pub async fn start_binary_at(
    dir: &std::path::Path,
    listen: &str,
    extra: &[&str],
) -> (tokio::process::Child, std::net::SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ptt-relay"))
        .args([
            "serve",
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
            "--web",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on QUIC ").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("the relay exited before listening");
    })
    .await
    .expect("relay did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// A UDP forwarder between one client socket and the relay that can keep
/// a copy of what the client sends, and lose some of the client's datagrams.
pub struct Tap {
    pub addr: std::net::SocketAddr,
    recording: Arc<std::sync::Mutex<Option<Vec<Vec<u8>>>>>,
}

impl Tap {
    pub async fn start(relay: std::net::SocketAddr) -> Tap {
        Tap::losing(relay, |_| false).await
    }

    /// A forwarder that holds every datagram `delay` in each direction
    /// (a path with 2 x `delay` of round trip).
    pub async fn delayed(relay: std::net::SocketAddr, delay: Duration) -> Tap {
        Tap::with(relay, |_| false, delay).await
    }

    /// Loses the client's datagrams whose number (1 is the first) `lose`
    /// picks.
    pub async fn losing(
        relay: std::net::SocketAddr,
        lose: impl Fn(usize) -> bool + Send + 'static,
    ) -> Tap {
        Tap::with(relay, lose, Duration::ZERO).await
    }

    async fn with(
        relay: std::net::SocketAddr,
        lose: impl Fn(usize) -> bool + Send + 'static,
        delay: Duration,
    ) -> Tap {
        use tokio::net::UdpSocket;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(relay).await.unwrap();
        let addr = front.local_addr().unwrap();
        let recording: Arc<std::sync::Mutex<Option<Vec<Vec<u8>>>>> = Arc::default();
        let client: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let (f, b, rec, cl) = (
            front.clone(),
            back.clone(),
            recording.clone(),
            client.clone(),
        );
        // Delayed datagrams leave in the order they came (one queue and
        // one sender per direction: a timer per datagram would reorder
        // those that came within a millisecond).
        let (to_relay, mut relay_q) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let (to_client, mut client_q) = tokio::sync::mpsc::unbounded_channel::<(
            tokio::time::Instant,
            Vec<u8>,
            std::net::SocketAddr,
        )>();
        let b2 = back.clone();
        tokio::spawn(async move {
            while let Some((at, d)) = relay_q.recv().await {
                tokio::time::sleep_until(at).await;
                let _ = b2.send(&d).await;
            }
        });
        let f2 = front.clone();
        tokio::spawn(async move {
            while let Some((at, d, to)) = client_q.recv().await {
                tokio::time::sleep_until(at).await;
                let _ = f2.send_to(&d, to).await;
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut count = 0;
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *cl.lock().unwrap() = Some(from);
                count += 1;
                if lose(count) {
                    continue;
                }
                if let Some(r) = rec.lock().unwrap().as_mut() {
                    r.push(buf[..n].to_vec());
                }
                if delay.is_zero() {
                    let _ = b.send(&buf[..n]).await;
                } else {
                    let _ = to_relay.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
                }
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let Some(to) = to {
                    if delay.is_zero() {
                        let _ = front.send_to(&buf[..n], to).await;
                    } else {
                        let _ = to_client.send((
                            tokio::time::Instant::now() + delay,
                            buf[..n].to_vec(),
                            to,
                        ));
                    }
                }
            }
        });
        Tap { addr, recording }
    }

    pub fn record(&self) {
        *self.recording.lock().unwrap() = Some(Vec::new());
    }

    pub fn take(&self) -> Vec<Vec<u8>> {
        self.recording.lock().unwrap().take().unwrap_or_default()
    }
}

/// The value of series `name` in the relay's /metrics (0 when absent).
pub async fn metric(t: &TestRelay, name: &str) -> f64 {
    let (status, body) = http_get(t.relay.admin_addr(), "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}
