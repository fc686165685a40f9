//! Issue "Per-clip cost", part 3: a prototype that drives `quinn-proto`
//! directly, to measure what the relay would gain by leaving quinn's
//! runtime layer (its per-connection task, channel and waker state) for
//! one loop per core. Not a relay: it serves what the measurements need.
//!
//! - One thread, one loop, one UDP socket: `quinn-udp` receives in
//!   batches (`recvmmsg`, GRO) into one buffer and sends with GSO from
//!   one buffer, across connections.
//! - No task or channel per connection: each connection is a boxed
//!   `quinn_proto::Connection` in a slab indexed by its handle, driven
//!   in place when a datagram or its timer comes; one heap of timers.
//! - `--mode sink`: every bidirectional stream is a clip, read to its end
//!   and answered with one byte, as `client-sim sink` (quinn) answers:
//!   the clip rate of `client-sim baseline` against both, side by side.
//! - `--mode ptt`: the first bidirectional stream carries ptt/1's `Auth`,
//!   checked with the relay's secret, and is answered with `Welcome`:
//!   enough for `client-sim load` to hold idle sessions, whose RSS per
//!   connection is measured against the relay's (docs/benchmarks.md).
//!
//! - `--crypto lean`: the relay's crypto session (`quic::lean_tls`),
//!   against quinn's (`rustls`, the default).
//!
//! ```text
//! cargo run --release -p benches --example proto_loop -- --mode sink \
//!     --listen 127.0.0.1:4460 --cert cert.pem --key key.pem
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use clap::Parser;
use codec::wire::{Limits, Message, Welcome};
use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event,
    ServerConfig, StreamEvent, StreamId, TransportConfig, VarInt,
};
use rustix::event::{PollFd, PollFlags, Timespec, poll};

#[derive(Parser)]
struct Args {
    /// `sink` (each stream a clip, answered with one byte) or `ptt`
    /// (`Auth` → `Welcome` on the first stream, for idle sessions).
    #[arg(long, default_value = "sink")]
    mode: String,
    #[arg(long, default_value = "127.0.0.1:4460")]
    listen: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The relay's token secret (`--mode ptt`).
    #[arg(long)]
    secret: Option<PathBuf>,
    /// `rustls`: quinn's crypto session (rustls's state and both key
    /// phases held for the connection's life); `lean`: the relay's
    /// (`quic::lean_tls`: rustls's state dropped after the handshake, the
    /// next key phase derived when used).
    #[arg(long, default_value = "rustls")]
    crypto: String,
}

/// A connection and what the loop knows of it.
struct Conn {
    conn: Connection,
    /// When its timer was last set (a heap entry with another time is
    /// stale).
    timer: Option<Instant>,
    /// `--mode ptt`: the control stream's bytes until `Auth` is whole.
    control: Option<(StreamId, Vec<u8>)>,
    authed: bool,
}

struct Loop {
    socket: UdpSocket,
    udp: quinn_udp::UdpSocketState,
    endpoint: Endpoint,
    server: Arc<ServerConfig>,
    conns: Vec<Option<Box<Conn>>>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    send_buf: Vec<u8>,
    key: Option<codec::token::TokenKey>,
    clips: u64,
    sessions: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut server = match args.crypto.as_str() {
        "rustls" => {
            ServerConfig::with_crypto(Arc::new(quic::server_crypto(&args.cert, &args.key, 0)?))
        }
        "lean" => {
            let key = quinn::rustls::sign::SingleCertAndKey::from(quic::certified_key(
                &args.cert, &args.key,
            )?);
            let alpn = vec![codec::wire::ALPN.to_vec()];
            ServerConfig::with_crypto(Arc::new(quic::lean_server_crypto_with(
                Arc::new(key),
                alpn,
                0,
            )?))
        }
        other => anyhow::bail!("--crypto is rustls or lean, not {other}"),
    };
    let mut t = TransportConfig::default();
    // As the quinn sink (sink) or as the relay after `Auth` (ptt).
    let ptt = args.mode == "ptt";
    t.max_concurrent_bidi_streams(VarInt::from_u32(if ptt { 9 } else { 64 }));
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    if ptt {
        t.mtu_discovery_config(None);
    }
    server.transport_config(Arc::new(t));
    let key = match (&args.secret, ptt) {
        (Some(p), true) => Some(codec::token::TokenKey::from_file(
            p,
            Duration::from_secs(60),
        )?),
        (None, true) => anyhow::bail!("--mode ptt needs --secret"),
        _ => None,
    };
    let socket =
        UdpSocket::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    socket.set_nonblocking(true)?;
    let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
    let _ = udp.set_recv_buffer_size((&socket).into(), 8 << 20);
    let _ = udp.set_send_buffer_size((&socket).into(), 8 << 20);
    let server = Arc::new(server);
    let endpoint = Endpoint::new(
        Arc::new(EndpointConfig::default()),
        Some(server.clone()),
        false,
        None,
    );
    let mut l = Loop {
        socket,
        udp,
        endpoint,
        server,
        conns: Vec::new(),
        timers: BinaryHeap::new(),
        send_buf: Vec::with_capacity(64 * 1024),
        key,
        clips: 0,
        sessions: 0,
    };
    println!(
        "listening on {} ({}, {})",
        args.listen, args.mode, args.crypto
    );
    l.run()
}

impl Loop {
    fn run(&mut self) -> anyhow::Result<()> {
        let gro = self.udp.gro_segments().max(1);
        let size = 1500 * gro;
        let mut bufs = vec![vec![0u8; size]; quinn_udp::BATCH_SIZE];
        let mut metas = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        let mut resp = Vec::new();
        let mut report = Instant::now() + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            let next = self
                .timers
                .peek()
                .map(|t| t.0.0)
                .unwrap_or(now + Duration::from_secs(1));
            let wait = next.min(report).saturating_duration_since(now);
            let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
            let timeout = Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            let _ = poll(&mut fds, Some(&timeout));
            let now = Instant::now();
            loop {
                let mut iovs: Vec<IoSliceMut> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let n = match self.udp.recv((&self.socket).into(), &mut iovs, &mut metas) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                };
                for (meta, buf) in metas.iter().zip(bufs.iter()).take(n) {
                    for seg in buf[..meta.len].chunks(meta.stride.max(1)) {
                        let ecn = meta
                            .ecn
                            .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                        let data = BytesMut::from(seg);
                        match self.endpoint.handle(
                            now,
                            meta.addr,
                            meta.dst_ip,
                            ecn,
                            data,
                            &mut resp,
                        ) {
                            Some(DatagramEvent::ConnectionEvent(h, ev)) => {
                                if let Some(c) = self.conn(h) {
                                    c.conn.handle_event(ev);
                                }
                                self.drive(h, now);
                            }
                            Some(DatagramEvent::NewConnection(inc)) => {
                                match self.endpoint.accept(
                                    inc,
                                    now,
                                    &mut resp,
                                    Some(self.server.clone()),
                                ) {
                                    Ok((h, conn)) => {
                                        if self.conns.len() <= h.0 {
                                            self.conns.resize_with(h.0 + 1, || None);
                                        }
                                        self.conns[h.0] = Some(Box::new(Conn {
                                            conn,
                                            timer: None,
                                            control: None,
                                            authed: false,
                                        }));
                                        self.drive(h, now);
                                    }
                                    Err(e) => {
                                        if let Some(t) = e.response {
                                            self.send(&t, &resp);
                                        }
                                    }
                                }
                            }
                            Some(DatagramEvent::Response(t)) => self.send(&t, &resp),
                            None => {}
                        }
                        resp.clear();
                    }
                }
            }
            while let Some(&Reverse((t, h))) = self.timers.peek() {
                if t > now {
                    break;
                }
                self.timers.pop();
                let h = ConnectionHandle(h);
                match self.conn(h) {
                    Some(c) if c.timer == Some(t) => {
                        c.timer = None;
                        c.conn.handle_timeout(now);
                    }
                    _ => continue,
                }
                self.drive(h, now);
            }
            if now >= report {
                report = now + Duration::from_secs(1);
                let open = self.conns.iter().filter(|c| c.is_some()).count();
                println!(
                    "connections {open} sessions {} clips {} timers {}",
                    self.sessions,
                    self.clips,
                    self.timers.len()
                );
            }
        }
    }

    fn conn(&mut self, h: ConnectionHandle) -> Option<&mut Conn> {
        self.conns.get_mut(h.0).and_then(|c| c.as_deref_mut())
    }

    fn send(&self, t: &quinn_proto::Transmit, buf: &[u8]) {
        let tx = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t
                .ecn
                .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
            contents: &buf[..t.size],
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        // A full socket buffer drops the datagram: QUIC sends it again.
        let _ = self.udp.send((&self.socket).into(), &tx);
    }

    /// Carries out what connection `h` has to do now: events between it
    /// and the endpoint, its streams, its datagrams, its next timer.
    fn drive(&mut self, h: ConnectionHandle, now: Instant) {
        let Some(mut c) = self.conns.get_mut(h.0).and_then(Option::take) else {
            return;
        };
        while let Some(ev) = c.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(h, ev) {
                c.conn.handle_event(back);
            }
        }
        while let Some(ev) = c.conn.poll() {
            if let Event::Stream(StreamEvent::Readable { id }) = ev {
                self.read(&mut c, id);
            }
        }
        while let Some(id) = c.conn.streams().accept(Dir::Bi) {
            self.read(&mut c, id);
        }
        let max = self.udp.max_gso_segments();
        loop {
            self.send_buf.clear();
            match c.conn.poll_transmit(now, max, &mut self.send_buf) {
                Some(t) => self.send(&t, &self.send_buf),
                None => break,
            }
        }
        let next = c.conn.poll_timeout();
        if next != c.timer {
            c.timer = next;
            if let Some(t) = next {
                self.timers.push(Reverse((t, h.0)));
            }
        }
        if c.conn.is_drained() {
            if c.authed {
                self.sessions -= 1;
            }
            return;
        }
        self.conns[h.0] = Some(c);
    }

    /// Reads what stream `id` has; at its end, answers.
    fn read(&mut self, c: &mut Conn, id: StreamId) {
        let ptt = self.key.is_some();
        if ptt && !c.authed && c.control.is_none() {
            c.control = Some((id, Vec::new()));
        }
        let control = c.control.as_ref().is_some_and(|(s, _)| *s == id);
        let mut fin = false;
        {
            let mut rs = c.conn.recv_stream(id);
            let Ok(mut chunks) = rs.read(true) else {
                return;
            };
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => {
                        if control
                            && !c.authed
                            && let Some((_, b)) = &mut c.control
                        {
                            b.extend_from_slice(&chunk.bytes);
                        }
                    }
                    Ok(None) => {
                        fin = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let _ = chunks.finalize();
        }
        if control {
            if !c.authed {
                self.authenticate(c);
            }
        } else if fin {
            self.clips += 1;
            let mut s = c.conn.send_stream(id);
            let _ = s.write(&[1]);
            let _ = s.finish();
        }
    }

    /// `--mode ptt`: `Auth` whole on the control stream, checked, is
    /// answered with `Welcome`; a bad one closes the connection.
    fn authenticate(&mut self, c: &mut Conn) {
        let Some((id, buf)) = &c.control else { return };
        let id = *id;
        let token = match Message::decode(buf, 65_536) {
            Ok(Some((Message::Auth(a), _))) => a.token,
            Ok(None) => return,
            _ => {
                let code = quic::varint(codec::ErrorCode::ProtocolViolation);
                c.conn.close(Instant::now(), code, "expected Auth".into());
                return;
            }
        };
        let Some(claims) = self.key.as_ref().and_then(|k| k.verify(&token).ok()) else {
            let code = quic::varint(codec::ErrorCode::TokenInvalid);
            c.conn.close(Instant::now(), code, "token invalid".into());
            return;
        };
        self.sessions += 1;
        let welcome = Message::Welcome(Welcome {
            user: claims.sub,
            session_id: self.sessions,
            limits: Limits {
                max_clip_ms: 60_000,
                max_clip_bytes: 256 * 1024,
                max_packet_bytes: 1275,
                max_clip_streams: 8,
                upload_idle_ms: 10_000,
            },
        });
        let _ = c.conn.send_stream(id).write(&welcome.to_bytes());
        // Kept open, as the relay keeps it; the buffer is freed.
        c.control = Some((id, Vec::new()));
        c.authed = true;
    }
}
