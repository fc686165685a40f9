//! Several relays as one service, over NATS (`--cluster nats://...`).
//!
//! Subjects (tokens are hex of the name, [`codec::cluster::subject_token`]):
//!
//! - `ptt.u.<user>`: live clips for a user; a relay subscribes while the
//!   user is connected to it.
//! - `ptt.c.<channel>`: live clips of a talk channel; a relay subscribes
//!   while at least one member is connected to it.
//! - `ptt.r.<relay id>`: acks for direct clips this relay accepted.
//!
//! A live clip is forwarded by its origin once per subject (not per
//! recipient): a reader of the shared [`LiveClip`] publishes `Start`, each
//! run of packet records as it arrives, then `End` or `Cut`
//! ([`codec::cluster::Relayed`]). A receiving relay rebuilds the live clip
//! (validating the records again), offers it to its own connected
//! recipients, and when it ends stores it for them (so a slow or
//! disconnected recipient still gets it from that relay's store) and keeps
//! it in the channel's history. When a recipient acks a direct clip, its
//! relay tells the origin, which drops its stored copy. Core NATS only:
//! what crosses is live traffic; a relay that is cut off keeps serving its
//! own users, and every clip stays stored at the relay that accepted it.
//! `docs/cluster.md` has the design and what each failure loses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use codec::cluster::{Relayed, subject_token};
use codec::wire::{ClipId, Target};
use codec::{ErrorCode, Framer, Message};
use dashmap::DashMap;
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use crate::live::{LiveClip, Next};
use crate::metrics;
use crate::server::Shared;
use crate::store::{Appended, ClipMeta, StoredClip};

/// A clip arriving from another relay.
struct Remote {
    live: Arc<LiveClip>,
    framer: Framer,
    /// This relay's users it was offered to (stored for them at the end).
    recipients: Vec<Arc<str>>,
    channel: Option<String>,
    last: Instant,
}

struct Sub {
    users: usize,
    task: tokio::task::AbortHandle,
    ready: Arc<AtomicBool>,
}

/// The cluster link of one relay.
pub struct Cluster {
    client: async_nats::Client,
    /// This relay's id (random per process).
    pub id: u64,
    /// Subscriptions by subject: (local users needing it, the task
    /// reading it, whether the server has it).
    subs: Mutex<HashMap<String, Sub>>,
    remote: DashMap<ClipId, Remote>,
    /// Direct clips from other relays: whom to tell of the ack.
    acks_to: DashMap<ClipId, (u64, Instant)>,
    connected: Arc<AtomicBool>,
}

pub fn user_subject(user: &str) -> String {
    format!("ptt.u.{}", subject_token(user))
}

pub fn channel_subject(channel: &str) -> String {
    format!("ptt.c.{}", subject_token(channel))
}

pub fn relay_subject(id: u64) -> String {
    format!("ptt.r.{id:016x}")
}

impl Cluster {
    /// Connects to the NATS servers in `urls` (comma-separated), retrying
    /// in the background if none answers yet.
    pub async fn connect(urls: &str) -> anyhow::Result<Arc<Cluster>> {
        let addrs: Vec<async_nats::ServerAddr> = urls
            .split(',')
            .map(|u| {
                u.trim()
                    .parse()
                    .with_context(|| format!("cluster URL {u:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        let connected = Arc::new(AtomicBool::new(false));
        let flag = connected.clone();
        let client = async_nats::ConnectOptions::new()
            .name("ptt-relay")
            // Our own channel publications do not come back to us.
            .no_echo()
            .retry_on_initial_connect()
            .event_callback(move |e| {
                let flag = flag.clone();
                async move {
                    match e {
                        async_nats::Event::Connected => {
                            info!("cluster: connected to NATS");
                            flag.store(true, Ordering::SeqCst);
                        }
                        async_nats::Event::Disconnected => {
                            warn!(
                                "cluster: lost NATS; cross-relay delivery stops until it is back"
                            );
                            flag.store(false, Ordering::SeqCst);
                        }
                        other => debug!(event = %other, "cluster event"),
                    }
                }
            })
            .connect(addrs)
            .await
            .context("connecting to the cluster's NATS")?;
        if client.connection_state() == async_nats::connection::State::Connected {
            connected.store(true, Ordering::SeqCst);
        }
        Ok(Arc::new(Cluster {
            client,
            id: rand::random(),
            subs: Mutex::new(HashMap::new()),
            remote: DashMap::new(),
            acks_to: DashMap::new(),
            connected,
        }))
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Starts listening for acks of the clips this relay accepted, and
    /// sweeping relayed clips that went silent.
    pub fn start(self: &Arc<Self>, shared: &Arc<Shared>) {
        self.want(shared, relay_subject(self.id));
        let me = self.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shared.shutdown.cancelled() => return,
                }
                me.sweep(shared.config.upload_idle_timeout, shared.config.clip_ttl);
            }
        });
    }

    /// One more local user needs `subject`.
    pub fn want(self: &Arc<Self>, shared: &Arc<Shared>, subject: String) {
        let Ok(mut subs) = self.subs.lock() else {
            return;
        };
        if let Some(s) = subs.get_mut(&subject) {
            s.users += 1;
            return;
        }
        let me = self.clone();
        let shared = shared.clone();
        let subj = subject.clone();
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let task = tokio::spawn(async move {
            let mut sub = match me.client.subscribe(subj.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(subject = subj, error = %e, "cluster: cannot subscribe");
                    return;
                }
            };
            // Once flushed, the server routes the subject here.
            if me.client.flush().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
            while let Some(msg) = sub.next().await {
                me.handle(&shared, &msg.payload).await;
            }
        });
        subs.insert(
            subject,
            Sub {
                users: 1,
                task: task.abort_handle(),
                ready,
            },
        );
    }

    /// A local user no longer needs `subject`.
    pub fn unwant(&self, subject: &str) {
        let Ok(mut subs) = self.subs.lock() else {
            return;
        };
        if let Some(s) = subs.get_mut(subject) {
            s.users -= 1;
            if s.users == 0 {
                // Dropping the subscriber unsubscribes.
                s.task.abort();
                subs.remove(subject);
            }
        }
    }

    /// Whether the NATS server routes `subject` to this relay yet.
    pub fn is_subscribed(&self, subject: &str) -> bool {
        self.subs.lock().is_ok_and(|s| {
            s.get(subject)
                .is_some_and(|s| s.ready.load(Ordering::SeqCst))
        })
    }

    /// Publishes a live clip on `subject` as it arrives (one task per
    /// clip and subject).
    pub fn forward(self: &Arc<Self>, shared: &Arc<Shared>, live: Arc<LiveClip>, subject: String) {
        metrics::count(metrics::CLUSTER_CLIPS, "direction", "out");
        let me = self.clone();
        shared.tracker.spawn(async move {
            let clip = live.meta.id;
            let start = Relayed::Start {
                clip,
                origin: me.id,
                header: live.header.clone(),
            };
            if me.publish(&subject, start).await.is_err() {
                return;
            }
            let mut reader = live.reader();
            loop {
                let msg = match reader.next().await {
                    Next::Data(b) => Relayed::Data {
                        clip,
                        packets: b.packets as u32,
                        records: match b.segs.as_slice() {
                            [one] => one.clone(),
                            many => Bytes::from(many.concat()),
                        },
                    },
                    Next::Complete(c) => Relayed::End { clip, end: c.end },
                    Next::Cut(code) => Relayed::Cut { clip, code },
                };
                let last = !matches!(msg, Relayed::Data { .. });
                if me.publish(&subject, msg).await.is_err() || last {
                    return;
                }
            }
        });
    }

    async fn publish(&self, subject: &str, msg: Relayed) -> Result<(), ()> {
        self.client
            .publish(subject.to_owned(), msg.encode())
            .await
            .map_err(|e| debug!(error = %e, "cluster publish failed"))
    }

    /// A local recipient acked `clip`: if it came from another relay as a
    /// direct clip, that relay drops its stored copy.
    pub async fn acked(&self, clip: &ClipId, recipient: &str) {
        if let Some((_, (origin, _))) = self.acks_to.remove(clip) {
            let ack = Relayed::Ack {
                clip: *clip,
                recipient: recipient.to_owned(),
            };
            let _ = self.publish(&relay_subject(origin), ack).await;
        }
    }

    /// Handles one message from another relay.
    async fn handle(&self, shared: &Arc<Shared>, payload: &Bytes) {
        let msg = match Relayed::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cluster: bad message dropped");
                return;
            }
        };
        match msg {
            Relayed::Start {
                clip,
                origin,
                header,
            } => self.started(shared, clip, origin, &header),
            Relayed::Data {
                clip,
                packets,
                records,
            } => {
                let Some(mut r) = self.remote.get_mut(&clip) else {
                    return;
                };
                r.last = Instant::now();
                let ok = r
                    .framer
                    .scan(&records)
                    .is_ok_and(|s| s.records == records.len() && s.end.is_none());
                if ok {
                    r.live.push(records, u64::from(packets));
                } else {
                    drop(r);
                    warn!(clip = %clip, "cluster: bad packet records; clip cut");
                    self.cut(&clip, ErrorCode::CutOff);
                }
            }
            Relayed::End { clip, end } => self.ended(shared, clip, end).await,
            Relayed::Cut { clip, code } => self.cut(&clip, code),
            Relayed::Ack { clip, recipient } => {
                if let Err(e) = shared.store.ack(&recipient, &clip).await {
                    warn!(error = %e, "cluster: store ack failed");
                }
            }
        }
    }

    fn started(&self, shared: &Arc<Shared>, clip: ClipId, origin: u64, header: &[u8]) {
        if origin == self.id || self.remote.contains_key(&clip) {
            return;
        }
        let d = match Message::decode(header, header.len()) {
            Ok(Some((Message::Delivery(d), n))) if n == header.len() && d.clip_id == clip => d,
            _ => {
                warn!(clip = %clip, "cluster: bad clip header dropped");
                return;
            }
        };
        let sender: Arc<str> = Arc::from(d.sender.as_str());
        let (recipients, channel): (Vec<Arc<str>>, Option<String>) = match &d.target {
            Target::User(u) => (
                shared
                    .sessions
                    .get(u.as_str())
                    .map(|s| vec![s.user.clone()])
                    .unwrap_or_default(),
                None,
            ),
            Target::Channel(c) => {
                let mut v: Vec<Arc<str>> = shared.members.get(c).map_or_else(Vec::new, |m| {
                    m.iter()
                        .map(|e| e.value().user.clone())
                        .filter(|u| *u != sender)
                        .collect()
                });
                v.sort();
                v.dedup();
                (v, Some(c.clone()))
            }
        };
        if recipients.is_empty() {
            return;
        }
        metrics::count(metrics::CLUSTER_CLIPS, "direction", "in");
        let meta = Arc::new(ClipMeta {
            id: clip,
            sender,
            target: d.target,
            format: d.format,
            created_ms: d.created_ms,
        });
        let live = LiveClip::new(meta);
        for r in &recipients {
            if let Some(s) = shared.sessions.get(r).map(|s| s.clone())
                && !s.offer_live(live.clone())
            {
                metrics::hot().live_fallbacks.increment(1);
            }
        }
        if channel.is_none() {
            self.acks_to.insert(clip, (origin, Instant::now()));
        }
        self.remote.insert(
            clip,
            Remote {
                live,
                framer: Framer::new(shared.config.frame_limits()),
                recipients,
                channel,
                last: Instant::now(),
            },
        );
    }

    async fn ended(&self, shared: &Arc<Shared>, clip: ClipId, end: codec::ClipEnd) {
        let Some((_, r)) = self.remote.remove(&clip) else {
            return;
        };
        let stored = Arc::new(StoredClip::new(r.live.meta.clone(), r.live.body(), end));
        match shared.store.append(stored.clone(), &r.recipients).await {
            Ok(Appended::New) => {
                if let Some(c) = &r.channel {
                    crate::session::record_history(
                        shared,
                        c,
                        &stored,
                        &r.recipients,
                        &stored.meta.sender,
                    )
                    .await;
                }
                r.live.complete(stored);
                for u in &r.recipients {
                    if let Some(s) = shared.sessions.get(u).map(|s| s.clone()) {
                        s.store_changed();
                    }
                }
            }
            Ok(Appended::Duplicate) => r.live.complete(stored),
            Ok(Appended::Conflict) | Err(_) => {
                // Not kept here: the origin still holds it.
                warn!(clip = %clip, "cluster: a relayed clip could not be stored here");
                r.live.cut(ErrorCode::CutOff);
            }
        }
    }

    fn cut(&self, clip: &ClipId, code: ErrorCode) {
        if let Some((_, r)) = self.remote.remove(clip) {
            r.live.cut(code);
            self.acks_to.remove(clip);
        }
    }

    /// Cuts relayed clips that went silent (their origin died or NATS was
    /// lost mid-clip) and forgets ack routes older than `ttl`.
    pub fn sweep(&self, idle: Duration, ttl: Duration) {
        let quiet: Vec<ClipId> = self
            .remote
            .iter()
            .filter(|r| r.last.elapsed() > idle)
            .map(|r| *r.key())
            .collect();
        for c in quiet {
            self.cut(&c, ErrorCode::CutOff);
        }
        self.acks_to.retain(|_, (_, at)| at.elapsed() < ttl);
    }
}
