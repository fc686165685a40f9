//! Network impairment for virtual users, in the process: a wrapper around
//! quinn's UDP socket that drops, delays, jitters and reorders datagrams in
//! both directions. Queues are bounded: a full queue drops, as a router
//! would. Transmit batching (GSO) is off on an impaired socket so every
//! datagram is impaired on its own.

use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

/// What to do to every datagram, each direction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// Probability (0..1) that a datagram is dropped.
    pub loss: f64,
    pub delay: Duration,
    /// Extra delay uniform in 0..jitter.
    pub jitter: Duration,
    /// Probability (0..1) that a datagram is held back an extra 10 ms.
    pub reorder: f64,
}

impl Impairment {
    pub fn is_none(&self) -> bool {
        self.loss <= 0.0 && self.delay.is_zero() && self.jitter.is_zero() && self.reorder <= 0.0
    }

    fn only_loss(&self) -> bool {
        self.delay.is_zero() && self.jitter.is_zero() && self.reorder <= 0.0
    }

    /// None: drop it. Some(due): deliver then.
    fn fate(&self, now: Instant) -> Option<Instant> {
        let mut rng = rand::rng();
        if self.loss > 0.0 && rng.random_bool(self.loss.min(1.0)) {
            return None;
        }
        let mut d = self.delay;
        if !self.jitter.is_zero() {
            d += self.jitter.mul_f64(rng.random::<f64>());
        }
        if self.reorder > 0.0 && rng.random_bool(self.reorder.min(1.0)) {
            d += Duration::from_millis(10);
        }
        Some(now + d)
    }
}

/// Datagrams held at most per direction before more are dropped.
const QUEUE: usize = 4096;

struct Datagram {
    due: Instant,
    seq: u64,
    addr: SocketAddr,
    ecn: Option<EcnCodepoint>,
    ip: Option<IpAddr>,
    data: Vec<u8>,
}

impl PartialEq for Datagram {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Datagram {}
impl PartialOrd for Datagram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Datagram {
    /// Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Default)]
struct Ready {
    queue: VecDeque<Datagram>,
    waker: Option<Waker>,
}

/// A UDP socket whose traffic is impaired.
pub struct ImpairedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    imp: Impairment,
    outbound: mpsc::Sender<Datagram>,
    ready: Arc<Mutex<Ready>>,
    stop: CancellationToken,
}

impl fmt::Debug for ImpairedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImpairedSocket")
            .field("imp", &self.imp)
            .finish()
    }
}

impl Drop for ImpairedSocket {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A client socket bound to `bind`, impaired when `imp` says so.
pub fn socket(bind: SocketAddr, imp: Impairment) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    let (std, _, _) = quic::udp_socket(
        bind,
        ptt_client::net::CLIENT_UDP_BUFFER,
        ptt_client::net::CLIENT_UDP_BUFFER,
    )?;
    let inner = quinn::TokioRuntime.wrap_udp_socket(std)?;
    if imp.is_none() {
        return Ok(inner);
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let ready = Arc::new(Mutex::new(Ready::default()));
    let stop = CancellationToken::new();
    tokio::spawn(send_loop(inner.clone(), rx, stop.clone()));
    tokio::spawn(recv_loop(inner.clone(), imp, ready.clone(), stop.clone()));
    Ok(Arc::new(ImpairedSocket {
        inner,
        imp,
        outbound: tx,
        ready,
        stop,
    }))
}

async fn send_loop(
    inner: Arc<dyn AsyncUdpSocket>,
    mut rx: mpsc::Receiver<Datagram>,
    stop: CancellationToken,
) {
    let mut heap = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|d: &Datagram| d.due);
        tokio::select! {
            d = rx.recv() => match d {
                Some(d) => heap.push(d),
                None => return,
            },
            () = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|d| d.due <= now) {
                    let Some(d) = heap.pop() else { break };
                    // A full kernel buffer drops the datagram, like a
                    // congested link.
                    let _ = inner.try_send(&Transmit {
                        destination: d.addr,
                        ecn: d.ecn,
                        contents: &d.data,
                        segment_size: None,
                        src_ip: d.ip,
                    });
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

async fn recv_loop(
    inner: Arc<dyn AsyncUdpSocket>,
    imp: Impairment,
    ready: Arc<Mutex<Ready>>,
    stop: CancellationToken,
) {
    let mut heap: BinaryHeap<Datagram> = BinaryHeap::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut seq = 0u64;
    let release = |heap: &mut BinaryHeap<Datagram>| {
        let now = Instant::now();
        let Ok(mut r) = ready.lock() else { return };
        while heap.peek().is_some_and(|d| d.due <= now) {
            let Some(d) = heap.pop() else { break };
            if r.queue.len() < QUEUE {
                r.queue.push_back(d);
            }
        }
        if let Some(w) = r.waker.take() {
            w.wake();
        }
    };
    loop {
        let next = heap.peek().map(|d| d.due);
        let recv = std::future::poll_fn(|cx| {
            let mut meta = [RecvMeta::default()];
            let mut bufs = [IoSliceMut::new(&mut buf)];
            match inner.poll_recv(cx, &mut bufs, &mut meta) {
                Poll::Ready(Ok(n)) => Poll::Ready(Ok(if n > 0 { Some(meta[0]) } else { None })),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        });
        tokio::select! {
            r = recv => {
                let meta = match r {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(_) => return,
                };
                let now = Instant::now();
                let stride = meta.stride.max(1);
                for chunk in buf[..meta.len].chunks(stride) {
                    let Some(due) = imp.fate(now) else { continue };
                    if heap.len() >= QUEUE {
                        continue;
                    }
                    seq += 1;
                    heap.push(Datagram {
                        due,
                        seq,
                        addr: meta.addr,
                        ecn: meta.ecn,
                        ip: meta.dst_ip,
                        data: chunk.to_vec(),
                    });
                }
                release(&mut heap);
            }
            () = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => release(&mut heap),
            () = stop.cancelled() => return,
        }
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        // Sends go to a queue that drops when full.
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for ImpairedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let now = Instant::now();
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for chunk in t.contents.chunks(seg) {
            let Some(due) = self.imp.fate(now) else {
                continue;
            };
            if self.imp.only_loss() {
                let _ = self.inner.try_send(&Transmit {
                    destination: t.destination,
                    ecn: t.ecn,
                    contents: chunk,
                    segment_size: None,
                    src_ip: t.src_ip,
                });
                continue;
            }
            let _ = self.outbound.try_send(Datagram {
                due,
                seq: 0,
                addr: t.destination,
                ecn: t.ecn,
                ip: t.src_ip,
                data: chunk.to_vec(),
            });
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut r) = self.ready.lock() else {
            return Poll::Ready(Err(io::Error::other("impairment state poisoned")));
        };
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some(d) = r.queue.pop_front() else { break };
            let len = d.data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&d.data[..len]);
            meta[n] = RecvMeta {
                addr: d.addr,
                len,
                stride: len,
                ecn: d.ecn,
                dst_ip: d.ip,
            };
            n += 1;
        }
        if n == 0 {
            r.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
