//! The relay's insides that its own tests, benchmarks and fuzz targets
//! reach into (`Relay::shared`, the stores, the log format). Not an
//! interface for applications: it changes with the relay.

pub use crate::admin::UserUsage;
pub use crate::cluster::{Cluster, channel_subject, user_subject};
pub use crate::credit::{STREAM_CREDIT_FACTOR, STREAM_WINDOW};
pub use crate::disk_store::{DiskStore, LogOptions};
pub use crate::live::{LiveClip, Next};
pub use crate::metrics::{CATALOGUE, handle as metrics_handle};
pub use crate::segment_log::{LogDir, LogFile, SEGMENT_MAGIC, parse as parse_segment};
pub use crate::server::transport;
pub use crate::state::Shared;
pub use crate::store::{Appended, ClipMeta, ClipStore, MemoryStore, StoredClip};
pub use crate::tls::{DataFiles, crypto_provider, ensure_data_dir, server_crypto};
pub use crate::usage::today;
pub use crate::web::PageConfig;

/// Wall-clock time, Unix milliseconds, as the relay reads it.
pub fn now_ms() -> u64 {
    crate::now_ms()
}

/// A UDP forwarder on loopback in front of a relay, which the test can cut
/// (every datagram dropped both ways, as when a region's network dies:
/// no answer, no error) and restore. One upstream socket per client
/// address; bounded by the test's own clients.
pub struct Wire {
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Wire {
    pub async fn start(to: std::net::SocketAddr) -> std::io::Result<Wire> {
        use std::collections::HashMap;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::net::UdpSocket;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        tokio::spawn(async move {
            let mut ups: HashMap<std::net::SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let up = match ups.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        if u.connect(to).await.is_err() {
                            continue;
                        }
                        let u = Arc::new(u);
                        let (u2, f2, c2) = (u.clone(), front.clone(), c.clone());
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 65_536];
                            while let Ok(n) = u2.recv(&mut b).await {
                                if !c2.load(Ordering::SeqCst) {
                                    let _ = f2.send_to(&b[..n], from).await;
                                }
                            }
                        });
                        ups.insert(from, u.clone());
                        u
                    }
                };
                let _ = up.send(&buf[..n]).await;
            }
        });
        Ok(Wire { addr, cut })
    }

    /// Drops everything from now on (`true`), or forwards again.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}
