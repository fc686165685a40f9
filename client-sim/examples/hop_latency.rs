//! Measures the relay's hop latency for live clips: one sender and one
//! listener in this process (one clock), a relay elsewhere. Each packet's
//! latency is the time from the sender handing it to QUIC to the listener
//! reading it, so it covers both QUIC stacks, loopback and the relay.
//!
//! ```sh
//! taskset -c 0 target/release/ptt-relay serve --data-dir /tmp/ptt &
//! taskset -c 1 cargo run --release -p client-sim --example hop_latency -- \
//!     --relay 127.0.0.1:4433 --data-dir /tmp/ptt --clips 20 --seconds 3
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use clap::Parser;
use codec::token::TokenKey;
use codec::wire::{AudioFormat, ClipId, Target};
use ptt_client::client::{Client, ClientOptions, Event, OutgoingClip, Pacing};
use ptt_client::net;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:4433")]
    relay: String,
    /// The relay's data dir (cert.pem, token.secret).
    #[arg(long, default_value = "ptt-data")]
    data_dir: PathBuf,
    /// Clips to send, one after another.
    #[arg(long, default_value_t = 20)]
    clips: usize,
    /// Length of each clip.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Bytes per 20 ms packet (16 kbit/s voice is about 40).
    #[arg(long, default_value_t = 40)]
    packet_bytes: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn show(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name:<14} n={:<6} median {:>8.3} ms   p99 {:>8.3} ms   max {:>8.3} ms",
        v.len(),
        percentile(&v, 0.5).as_secs_f64() * 1e3,
        percentile(&v, 0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let key = TokenKey::from_file(&a.data_dir.join("token.secret"), Duration::ZERO)?;
    let (addr, name) = net::resolve(&a.relay).await?;
    let ep = net::endpoint(addr, &a.data_dir.join("cert.pem"))?;
    let token = |u: &str| key.mint(u, Duration::from_secs(3600)).unwrap();
    let (alice, _alice_ev) = Client::connect(
        &ep,
        addr,
        &name,
        &token("hop-alice"),
        ClientOptions::default(),
    )
    .await?;
    let opts = ClientOptions {
        packet_events: true,
        event_queue: 4096,
        ..ClientOptions::default()
    };
    let (bob, mut ev) = Client::connect(&ep, addr, &name, &token("hop-bob"), opts).await?;

    let packets_per_clip = (a.seconds * 50) as usize;
    let mut packet = vec![0x55u8; a.packet_bytes.max(1)];
    packet[0] = 31 << 3; // CELT fullband 20 ms, one frame
    let packet = Bytes::from(packet);
    let mut per_packet = Vec::new();
    let mut first_packet = Vec::new();
    for _ in 0..a.clips {
        let clip = OutgoingClip {
            id: ClipId(rand::random()),
            target: Target::User("hop-bob".into()),
            format: AudioFormat::default(),
            packets: vec![packet.clone(); packets_per_clip],
            final_granule: packets_per_clip as u64 * 960,
        };
        let id = clip.id;
        let alice = alice.clone();
        let sending = tokio::spawn(async move { alice.send_clip(&clip, Pacing::Live).await });
        let mut arrived: Vec<Option<Instant>> = vec![None; packets_per_clip];
        loop {
            match ev.recv().await.expect("listener gone") {
                Event::Packets {
                    id: got,
                    first,
                    packets,
                    at,
                } if got == id => {
                    for i in first..first + packets.len() as u64 {
                        arrived[i as usize] = Some(at);
                    }
                }
                Event::Complete(c) if c.id() == id => {
                    bob.ack(id).await?;
                    break;
                }
                Event::Cut { code, .. } => anyhow::bail!("clip cut off: {code}"),
                _ => {}
            }
        }
        let sent = sending.await??.sent_at;
        anyhow::ensure!(sent.len() == packets_per_clip, "sender timeline incomplete");
        for (s, r) in sent.iter().zip(&arrived) {
            let r = r.expect("every packet arrived");
            per_packet.push(r.saturating_duration_since(*s));
        }
        first_packet.push(arrived[0].unwrap().saturating_duration_since(sent[0]));
    }
    println!(
        "{} live clips of {} s ({} packets of {} B, 20 ms each) via {}",
        a.clips, a.seconds, packets_per_clip, a.packet_bytes, a.relay
    );
    show("per packet", per_packet);
    show("first packet", first_packet);
    bob.shutdown().await;
    alice.shutdown().await;
    ep.wait_idle().await;
    Ok(())
}
