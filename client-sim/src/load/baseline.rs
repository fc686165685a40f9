//! `client-sim baseline`: the same clip workload sent straight to a bare
//! quinn sink (no relay), so the relay's clip rate can be given as a ratio
//! measured side by side. The sink reads each clip stream to its end and
//! answers one byte, as the relay answers `Accepted`; senders run closed
//! loops (next clip when the last was answered), like `load --mode upload`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use codec::wire::{ClipId, Target};
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use super::source::Source;
use super::stats::{Latency, Percentiles};
use super::workload::Workload;
use ptt_client::client::OutgoingClip;
use ptt_client::net;

/// Largest clip a sink reads (bounds its memory per stream).
const MAX_CLIP_BYTES: usize = 4 * 1024 * 1024;

/// Starts a sink on `listen` with the certificate and key in PEM files.
pub fn sink(listen: SocketAddr, cert: &Path, key: &Path) -> anyhow::Result<quinn::Endpoint> {
    let crypto = quic::server_crypto(cert, key, 0)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    server.transport_config(Arc::new(t));
    let ep =
        quinn::Endpoint::server(server, listen).with_context(|| format!("binding {listen}"))?;
    let e = ep.clone();
    tokio::spawn(async move {
        while let Some(inc) = e.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        if recv.read_to_end(MAX_CLIP_BYTES).await.is_ok() {
                            let _ = send.write_all(&[1]).await;
                            let _ = send.finish();
                        }
                    });
                }
            });
        }
    });
    Ok(ep)
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineReport {
    pub clips: u64,
    pub clips_per_s: f64,
    pub bytes_per_s: f64,
    pub voice_s_per_s: f64,
    /// Clip written → the sink's answer.
    pub ack_ms: Percentiles,
    pub workload: Workload,
}

impl BaselineReport {
    pub fn table(&self) -> String {
        format!(
            "baseline (bare quinn sink): {} clips, {:.1} clips/s, {:.1} MB/s, {:.1} voice-s/s; answer p50 {:.2} ms p99 {:.2} ms\n",
            self.clips,
            self.clips_per_s,
            self.bytes_per_s / 1e6,
            self.voice_s_per_s,
            self.ack_ms.p50,
            self.ack_ms.p99
        )
    }
}

/// Sends the workload's clips (upload, closed loop per user) to a sink.
pub async fn run(
    sink: SocketAddr,
    server_name: &str,
    ca: &Path,
    w: &Workload,
    source: &Source,
) -> anyhow::Result<BaselineReport> {
    w.validate()?;
    let cfg = net::client_config(ca)?;
    let mut endpoints = Vec::new();
    for _ in 0..w.endpoints {
        let mut ep = net::endpoint(sink, ca)?;
        ep.set_default_client_config(cfg.clone());
        endpoints.push(ep);
    }
    let clips = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let voice_ms = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + w.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..w.users {
        let conn = endpoints[i % endpoints.len()]
            .connect(sink, server_name)?
            .await
            .context("connecting to the sink")?;
        let (clips, bytes, voice_ms) = (clips.clone(), bytes.clone(), voice_ms.clone());
        let source = source.clone();
        let w = w.clone();
        tasks.spawn(async move {
            let mut lat = Latency::new();
            while Instant::now() < end {
                let (data, ms) = {
                    let mut rng = rand::rng();
                    let (packets, samples) = source.random_clip(w.clip_min, w.clip_max, &mut rng);
                    let clip = OutgoingClip {
                        id: ClipId(rng.random()),
                        target: Target::User("sink".into()),
                        format: source.format,
                        final_granule: samples,
                        packets,
                    };
                    (clip.upload_bytes(), samples / 48)
                };
                let Ok((mut send, mut recv)) = conn.open_bi().await else {
                    break;
                };
                let n = data.len() as u64;
                if send.write_chunk(data).await.is_err() {
                    break;
                }
                let _ = send.finish();
                let written = Instant::now();
                let mut answer = [0u8; 1];
                if recv.read_exact(&mut answer).await.is_err() {
                    break;
                }
                // Its end too, as the SDK takes the relay's.
                quic::take_end(&mut recv);
                lat.record(written.elapsed());
                clips.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(n, Ordering::Relaxed);
                voice_ms.fetch_add(ms, Ordering::Relaxed);
            }
            conn.close(0u32.into(), b"done");
            lat
        });
    }
    let mut lat = Latency::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(l) = r {
            lat.add(&l);
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    for ep in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
    }
    let clips = clips.load(Ordering::Relaxed);
    Ok(BaselineReport {
        clips,
        clips_per_s: clips as f64 / secs,
        bytes_per_s: bytes.load(Ordering::Relaxed) as f64 / secs,
        voice_s_per_s: voice_ms.load(Ordering::Relaxed) as f64 / 1000.0 / secs,
        ack_ms: lat.summary(),
        workload: w.clone(),
    })
}
