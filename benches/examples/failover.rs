//! How long the SDK takes to move to the next relay when its home relay's
//! path dies, and to come back once home answers again (docs/benchmarks.md,
//! "Failover"). Two relays in this process, each behind a UDP path the
//! example cuts (every datagram dropped both ways, as when a region's
//! network dies: no answer, no error; `relay::testing::Wire`), and one SDK
//! with `relays = [home, other]`. Each round: cut home's path, time until
//! the SDK's session is on the other relay; restore it, time until the SDK
//! is home again (a new home session, none on the other relay).
//!
//! ```sh
//! cargo run --release -p benches --example failover -- --rounds 5 --keep-alive 15s
//! cargo run --release -p benches --example failover -- --rounds 5 --keep-alive 1s
//! ```
//!
//! An idle client notices at its next keep-alive: the move takes up to
//! the keep-alive interval plus half of `failover_after`, then a
//! connection to the other relay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use codec::wire::ClipId;
use ptt_client::sdk::{Config, IncomingClip, Listener, Sdk, Sent, Status};
use relay::Relay;
use relay::testing::Wire;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The SDK's `failover_after`.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    failover_after: Duration,
    /// The SDK's keep-alive interval (`transport.keep_alive`).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    keep_alive: Duration,
}

struct Quiet;

impl Listener for Quiet {
    fn clip(&self, _: IncomingClip) -> bool {
        true
    }
    fn sent(&self, _: ClipId, _: Sent) {}
    fn status(&self, _: Status) {}
}

fn session(r: &Relay) -> Option<u64> {
    r.shared().router.session("alice").map(|s| s.id)
}

/// Polls `f` every 5 ms until it holds (at most a minute); the time taken.
async fn until(f: impl Fn() -> bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !f() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "no change in a minute"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = tempfile::tempdir()?;
    let home = Relay::start(relay::Config::for_tests(dir.path().join("a"))).await?;
    home.files().share_with(&dir.path().join("b"))?;
    let other = Relay::start(relay::Config::for_tests(dir.path().join("b"))).await?;
    let (to_home, to_other) = (
        Wire::start(home.quic_addr()).await?,
        Wire::start(other.quic_addr()).await?,
    );
    let token = home.token_key().mint("alice", Duration::from_secs(3600))?;
    let mut cfg = Config::new(
        "",
        home.files().cert.clone(),
        dir.path().join("app"),
        &token,
    );
    cfg.relays = vec![to_home.addr.to_string(), to_other.addr.to_string()];
    cfg.failover_after = a.failover_after;
    cfg.transport.keep_alive = a.keep_alive;
    let sdk = Sdk::start(cfg, Arc::new(Quiet)).context("SDK")?;
    until(|| session(&home).is_some()).await?;
    let (mut moves, mut backs) = (Vec::new(), Vec::new());
    for round in 1..=a.rounds {
        // Settled a while at home, as a phone between clips.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = session(&home);
        to_home.set_cut(true);
        let moved = until(|| session(&other).is_some()).await?;
        to_home.set_cut(false);
        let back = until(|| {
            session(&home).is_some_and(|s| Some(s) != before) && session(&other).is_none()
        })
        .await?;
        println!(
            "round {round}: moved {moved:.2?} after the cut, home {back:.2?} after it answered"
        );
        moves.push(moved);
        backs.push(back);
    }
    println!(
        "median of {} rounds (failover_after {:?}, keep-alive {:?}): moved {:.2?}, home again {:.2?}",
        a.rounds,
        a.failover_after,
        a.keep_alive,
        median(moves),
        median(backs)
    );
    sdk.stop().await;
    Ok(())
}
