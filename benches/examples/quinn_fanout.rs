//! quinn's own fan-out floor on this machine: how long one packet takes to
//! reach every one of N connections, with nothing of the relay in the way.
//!
//! One process, two threads, each pinned to its own core and running its
//! own single-threaded tokio runtime: the "relay" thread (core 0) holds N
//! server connections, the "members" thread (core 1) holds the N client
//! connections (over `--endpoints` UDP sockets, as `client-sim load`
//! spreads them). Each round the relay thread writes one `--payload`-byte
//! chunk (one shared `Bytes`) to every member from a single task, in one
//! pass, and the members' thread notes when each chunk arrived; both read
//! the same clock. Modes:
//!
//! - `stream`: one long-lived uni stream per member, opened before the
//!   rounds (the cheapest case quinn allows);
//! - `streams`: a new uni stream per member per round (the relay's one
//!   stream per delivery), written and finished.
//!
//! ```sh
//! cargo run --release -p benches --example quinn_fanout -- --members 10000 --mode stream
//! ```
//!
//! Prints, per round, the time until the median and the last member had
//! the chunk, then the medians over the rounds and each thread's CPU per
//! member per round.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, ValueEnum};

#[derive(Parser)]
struct Args {
    /// Connections to write to each round.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// UDP sockets the members' connections are spread over.
    #[arg(long, default_value_t = 16)]
    endpoints: usize,
    /// Bytes written to each member per round.
    #[arg(long, default_value_t = 60)]
    payload: usize,
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One long-lived stream per member, opened before the rounds.
    Stream,
    /// A new stream per member per round.
    Streams,
}

/// Arrival times of the current round, nanoseconds after `base`.
struct Arrivals {
    base: Instant,
    at: Vec<AtomicU64>,
    count: AtomicUsize,
}

impl Arrivals {
    fn note(&self, member: usize) {
        let ns = self.base.elapsed().as_nanos() as u64;
        if self.at[member].swap(ns, Ordering::Relaxed) == 0 {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// CPU time of each of this process's threads, nanoseconds
/// (`/proc/self/task/*/schedstat`; Linux).
fn thread_cpu() -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
            Some((tid, stat.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

fn pin(core: usize) {
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    if let Some(id) = ids.get(core) {
        core_affinity::set_for_current(*id);
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let per_stream = a.mode == Mode::Streams;
    let dir = tempfile::tempdir()?;
    let (files, _) = relay::testing::ensure_data_dir(dir.path(), None)?;
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(relay::testing::server_crypto(&files, None, 0)?));
    // The relay's own transport settings (ACK frequency, no MTU probes).
    let t = relay::testing::transport(&relay::Config::default())?;
    server.transport_config(Arc::new(t));
    let cert = files.cert.clone();

    let arrivals = Arc::new(Arrivals {
        base: Instant::now(),
        at: (0..a.members).map(|_| AtomicU64::new(0)).collect(),
        count: AtomicUsize::new(0),
    });
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();

    // The members: N client connections on core 1.
    let members = {
        let arrivals = arrivals.clone();
        let (n, endpoints) = (a.members, a.endpoints);
        std::thread::spawn(move || -> anyhow::Result<()> {
            pin(1);
            let addr = addr_rx.recv()?;
            runtime()?.block_on(async move {
                let eps = (0..endpoints)
                    .map(|_| ptt_client::net::endpoint(addr, &cert))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut conns = Vec::with_capacity(n);
                for i in 0..n {
                    let c = eps[i % eps.len()].connect(addr, "localhost")?.await?;
                    conns.push(c);
                }
                for (i, c) in conns.into_iter().enumerate() {
                    let arrivals = arrivals.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        if per_stream {
                            while let Ok(mut s) = c.accept_uni().await {
                                if let Ok(Some(_)) = s.read(&mut buf).await {
                                    arrivals.note(i);
                                }
                            }
                        } else if let Ok(mut s) = c.accept_uni().await {
                            // The stream's opening byte is not a round.
                            let _ = s.read_exact(&mut buf[..1]).await;
                            while let Ok(Some(_)) = s.read(&mut buf).await {
                                arrivals.note(i);
                            }
                        }
                    });
                }
                ready_tx.send(())?;
                std::future::pending::<()>().await;
                #[allow(unreachable_code)]
                Ok::<(), anyhow::Error>(())
            })
        })
    };

    // The relay side: N server connections on core 0.
    pin(0);
    let rt = runtime()?;
    rt.block_on(async move {
        let (sock, _, _) = quic::udp_socket(
            (Ipv4Addr::LOCALHOST, 0).into(),
            16 << 20,
            16 << 20,
        )?;
        let ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            sock,
            Arc::new(quinn::TokioRuntime),
        )?;
        addr_tx.send(ep.local_addr()?)?;
        let started = Instant::now();
        let mut conns = Vec::with_capacity(a.members);
        while conns.len() < a.members {
            let inc = ep.accept().await.context("endpoint closed")?;
            conns.push(inc.await?);
        }
        let mut streams = Vec::new();
        if !per_stream {
            for c in &conns {
                let mut s = c.open_uni().await?;
                s.write_all(&[0]).await?;
                streams.push(s);
            }
        }
        tokio::task::spawn_blocking(move || ready_rx.recv()).await??;
        println!(
            "{} members connected in {:.1} s; mode {}, {} B per member per round",
            a.members,
            started.elapsed().as_secs_f64(),
            if per_stream { "streams" } else { "stream" },
            a.payload
        );
        let payload = Bytes::from(vec![0x5a; a.payload]);
        let cpu_before = thread_cpu();
        let (mut lasts, mut medians) = (Vec::new(), Vec::new());
        for round in 0..a.rounds {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for x in &arrivals.at {
                x.store(0, Ordering::Relaxed);
            }
            arrivals.count.store(0, Ordering::Relaxed);
            let t0 = arrivals.base.elapsed().as_nanos() as u64;
            if per_stream {
                for c in &conns {
                    let mut s = c.open_uni().await?;
                    s.write_chunk(payload.clone()).await?;
                    let _ = s.finish();
                }
            } else {
                for s in &mut streams {
                    s.write_chunk(payload.clone()).await?;
                }
            }
            let written = arrivals.base.elapsed().as_nanos() as u64 - t0;
            let deadline = Instant::now() + Duration::from_secs(10);
            while arrivals.count.load(Ordering::Relaxed) < a.members && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut d: Vec<u64> = arrivals
                .at
                .iter()
                .map(|x| x.load(Ordering::Relaxed).saturating_sub(t0))
                .collect();
            d.sort_unstable();
            let got = arrivals.count.load(Ordering::Relaxed);
            let ms = |ns: u64| ns as f64 / 1e6;
            let (median, last) = (ms(d[d.len() / 2]), ms(d[d.len() - 1]));
            println!(
                "round {round}: {got}/{} members; written in {:.1} ms; median member {median:.1} ms, last member {last:.1} ms",
                a.members,
                ms(written)
            );
            medians.push(median);
            lasts.push(last);
        }
        let mid = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "median over {} rounds: median member {:.1} ms, last member {:.1} ms",
            a.rounds,
            mid(&mut medians),
            mid(&mut lasts)
        );
        // CPU of each thread over the rounds (pauses and keep-alives
        // included), per member per round.
        let per = (a.rounds * a.members) as f64;
        for (tid, after) in thread_cpu() {
            let before = cpu_before.iter().find(|(t, _)| *t == tid).map_or(0, |c| c.1);
            let ns = after.saturating_sub(before);
            if ns > 0 {
                let who = if tid == std::process::id() { "relay thread" } else { "other thread" };
                println!(
                    "{who} {tid}: {:.0} ms CPU over the rounds, {:.1} µs per member per round",
                    ns as f64 / 1e6,
                    ns as f64 / 1e3 / per
                );
            }
        }
        Ok::<(), anyhow::Error>(())
    })?;
    drop(members);
    Ok(())
}
