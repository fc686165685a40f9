//! Waking sleeping phones: devices register where they can be woken
//! (`PushRegister`, kept in [`book`] and on disk in [`log`]); when a clip
//! starts for a user with no connected session, the relay pushes to each
//! of the user's devices ([`plan`] decides whom and how often; [`provider`]
//! speaks APNs and FCM). A push never holds, delays or loses a clip: the
//! decision is a few map lookups at the clip's first packet, and the
//! sending runs in its own task behind a bounded queue.

pub mod book;
pub mod log;
pub mod plan;
pub mod provider;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use codec::ErrorCode;
use codec::wire::{ClipId, PushProvider, PushRegister, PushResult, Target};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use book::{Device, PushBook, Record};
use plan::{Answer, Planner, Push};
use provider::{Apns, Fcm, Https, PushError};

/// What pushing asks of the cluster (`cluster.rs` answers): whether a
/// user is connected to any relay, whether this relay is the first to push
/// a device for a clip, and sharing a user's entry with every relay.
#[async_trait::async_trait]
pub trait PushCluster: Send + Sync {
    /// Whether `user` has a connected session on any relay.
    async fn present(&self, user: &str) -> bool;
    /// Whether no relay pushed `device` for `clip` yet (this one takes it).
    async fn first_push(&self, clip: ClipId, device: &str) -> bool;
    /// `entry` (a [`Record::User`]) for every relay's book.
    async fn share(&self, user: &str, entry: Record);
}

/// Counts one push outcome (`ptt_push_sent_total`).
fn count(provider: PushProvider, outcome: &'static str) {
    metrics::counter!(crate::metrics::PUSH_SENT, "provider" => provider.name(), "outcome" => outcome)
        .increment(1);
}

/// The relay's push side.
pub struct Pusher {
    /// Read at every clip's first packet, written at registrations.
    book: RwLock<PushBook>,
    /// The book on disk (with the disk store; memory-only relays forget
    /// registrations at restart, as they forget clips).
    log: Option<Arc<Mutex<log::PushLog>>>,
    planner: Mutex<Planner>,
    jobs: mpsc::Sender<Push>,
    queue: Mutex<Option<mpsc::Receiver<Push>>>,
    http: Option<Https>,
    apns: Option<Apns>,
    fcm: Option<Fcm>,
    ttl: Duration,
    concurrency: usize,
    /// In a cluster: presence, dedupe across relays, shared entries.
    cluster: std::sync::OnceLock<Arc<dyn PushCluster>>,
}

impl Pusher {
    /// Opens the push book (reading its log back) and the providers the
    /// settings name.
    pub fn open(cfg: &crate::Config) -> Result<Pusher, PushError> {
        let mut book = PushBook::new(cfg.max_push_devices_per_user);
        let log = if cfg.store == crate::config::StoreKind::Disk {
            let path = cfg.data_dir.join("push.log");
            let log = log::PushLog::open(&path, &mut book).map_err(|e| PushError::Config {
                what: "data_dir",
                why: format!("{}: {e}", path.display()),
            })?;
            Some(Arc::new(Mutex::new(log)))
        } else {
            None
        };
        let apns = Apns::from_config(cfg)?;
        let fcm = Fcm::from_config(cfg)?;
        let http = match (&apns, &fcm) {
            (None, None) => None,
            _ => Some(provider::https(&cfg.push_ca)?),
        };
        if apns.is_some() || fcm.is_some() {
            info!(
                apns = apns.is_some(),
                fcm = fcm.is_some(),
                users = book.users(),
                "push: waking devices"
            );
        }
        let (jobs, queue) = mpsc::channel(cfg.push_queue);
        Ok(Pusher {
            book: RwLock::new(book),
            log,
            planner: Mutex::new(Planner::new(cfg.push_min_interval, cfg.dedupe_window)),
            jobs,
            queue: Mutex::new(Some(queue)),
            http,
            apns,
            fcm,
            ttl: cfg.push_ttl,
            concurrency: cfg.push_concurrency,
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// Joins the cluster: pushes follow users across relays.
    pub fn set_cluster(&self, c: Arc<dyn PushCluster>) {
        let _ = self.cluster.set(c);
    }

    /// Another relay's entry for a user (the cluster's copy of its book).
    pub async fn apply_shared(&self, entry: Record) {
        if let Err(why) = self.record_here(vec![entry]).await {
            warn!(%why, "push: a shared entry not kept");
        }
    }

    /// Whether the relay can send pushes of `p`.
    fn sends(&self, p: PushProvider) -> bool {
        match p {
            PushProvider::Apns => self.apns.is_some(),
            PushProvider::Fcm => self.fcm.is_some(),
        }
    }

    /// Users with at least one device.
    pub fn users(&self) -> usize {
        self.book.read().map_or(0, |b| b.users())
    }

    /// Starts the sending task (once).
    pub fn start(
        self: &Arc<Self>,
        tracker: &tokio_util::task::TaskTracker,
        stop: CancellationToken,
    ) {
        if let Some(rx) = self.queue.lock().ok().and_then(|mut q| q.take()) {
            tracker.spawn(self.clone().run(rx, stop));
        }
    }

    /// Applies records and writes them (synced) before returning; in a
    /// cluster, then shares each changed user's whole entry.
    async fn record(&self, records: Vec<Record>) -> Result<Vec<String>, String> {
        let (evicted, users) = self.record_here(records).await?;
        if let Some(c) = self.cluster.get() {
            for u in users {
                let entry = match self.book.read() {
                    Ok(b) => b.entry(&u),
                    Err(_) => continue,
                };
                c.share(&u, entry).await;
            }
        }
        Ok(evicted)
    }

    /// [`Pusher::record`] on this relay only: returns the devices evicted
    /// and the users changed.
    async fn record_here(
        &self,
        records: Vec<Record>,
    ) -> Result<(Vec<String>, Vec<String>), String> {
        let mut evicted = Vec::new();
        let mut changed = Vec::new();
        let mut users = Vec::new();
        {
            let mut book = self.book.write().map_err(|_| "push book poisoned")?;
            for r in records {
                let a = book.apply(&r);
                evicted.extend(a.evicted);
                users.extend(a.users);
                if a.changed {
                    changed.push(r);
                }
            }
        }
        users.sort();
        users.dedup();
        if let Some(log) = &self.log
            && !changed.is_empty()
        {
            let log = log.clone();
            tokio::task::spawn_blocking(move || {
                let mut log = log.lock().map_err(|_| "push log poisoned".to_owned())?;
                for r in &changed {
                    log.append(r).map_err(|e| format!("push log: {e}"))?;
                }
                Ok::<_, String>(())
            })
            .await
            .map_err(|e| e.to_string())??;
        }
        Ok((evicted, users))
    }

    /// A device of `user` (whose token grants `channels`) registers.
    pub async fn register(
        &self,
        user: &str,
        channels: impl Iterator<Item = &String>,
        r: PushRegister,
    ) -> PushResult {
        let refuse = |code, reason: String| PushResult {
            device_id: r.device_id.clone(),
            code,
            devices: self.devices(user),
            reason,
        };
        if r.device_id.is_empty() || r.token.is_empty() {
            return refuse(
                ErrorCode::ProtocolViolation,
                "a push registration needs a device id and a token".into(),
            );
        }
        if r.provider == PushProvider::Apns && !r.topic.ends_with(".voip-ptt") {
            return refuse(
                ErrorCode::ProtocolViolation,
                format!(
                    "APNs PushToTalk pushes go to the topic <bundle id>.voip-ptt, not {:?}",
                    r.topic
                ),
            );
        }
        let device = Device {
            provider: r.provider,
            device_id: r.device_id.clone(),
            token: r.token,
            topic: r.topic,
            at_ms: crate::now_ms(),
        };
        let records = vec![
            Record::Channels {
                user: user.to_owned(),
                channels: channels.cloned().collect(),
            },
            Record::Register {
                user: user.to_owned(),
                device,
            },
        ];
        match self.record(records).await {
            Ok(evicted) => {
                let mut reason = if evicted.is_empty() {
                    "kept".to_owned()
                } else {
                    format!(
                        "kept; the oldest device ({}) was dropped (max_push_devices_per_user)",
                        evicted.join(", ")
                    )
                };
                if !self.sends(r.provider) {
                    reason.push_str(&format!(
                        "; this relay has no {} credentials and sends no such pushes",
                        r.provider.name()
                    ));
                }
                PushResult {
                    device_id: r.device_id,
                    code: ErrorCode::NoError,
                    devices: self.devices(user),
                    reason,
                }
            }
            Err(why) => {
                warn!(%why, "push registration not kept");
                refuse(ErrorCode::Internal, why)
            }
        }
    }

    /// `user`'s device `device_id` wants no more pushes.
    pub async fn unregister(&self, user: &str, device_id: String) -> PushResult {
        let r = Record::Unregister {
            user: user.to_owned(),
            device_id: device_id.clone(),
        };
        let (code, reason) = match self.record(vec![r]).await {
            Ok(_) => (ErrorCode::NoError, "removed".to_owned()),
            Err(why) => (ErrorCode::Internal, why),
        };
        PushResult {
            device_id,
            code,
            devices: self.devices(user),
            reason,
        }
    }

    fn devices(&self, user: &str) -> u64 {
        self.book.read().map_or(0, |b| b.devices(user).len() as u64)
    }

    /// A session of `user` started with these channel grants: a user with
    /// devices is a member of them from now on (grants change with tokens).
    pub async fn session_started(&self, user: &str, channels: impl Iterator<Item = &String>) {
        let channels: Vec<String> = channels.cloned().collect();
        let same = self.book.read().is_ok_and(|b| {
            b.devices(user).is_empty()
                || b.channels(user)
                    .is_some_and(|c| c.iter().eq(channels.iter()))
        });
        if same {
            return;
        }
        let r = Record::Channels {
            user: user.to_owned(),
            channels,
        };
        if let Err(why) = self.record(vec![r]).await {
            warn!(%why, "push: channels not kept");
        }
    }

    /// A clip's first packet arrived: every device of each recipient
    /// without a connected session (`online` says who has one) is pushed,
    /// at most once per clip, channel pushes at most once per
    /// `push_min_interval`. Never waits: a full queue drops the push
    /// (counted).
    /// In a cluster the relay first asks whether each candidate is
    /// connected elsewhere, and takes each device's push for the clip from
    /// the cluster (beside, so the clip never waits).
    pub fn clip_started(
        self: &Arc<Self>,
        clip: ClipId,
        sender: &Arc<str>,
        target: &Target,
        online: impl Fn(&str) -> bool,
    ) {
        if let Some(c) = self.cluster.get() {
            let candidates: Vec<Arc<str>> = match self.book.read() {
                Ok(book) => match target {
                    Target::User(u) if !book.devices(u).is_empty() && !online(u) => {
                        vec![Arc::from(u.as_str())]
                    }
                    Target::User(_) => return,
                    Target::Channel(ch) => book
                        .members(ch)
                        .filter(|u| ***u != **sender && !online(u))
                        .cloned()
                        .collect(),
                },
                Err(_) => return,
            };
            if candidates.is_empty() {
                return;
            }
            let (me, c, sender, target) = (self.clone(), c.clone(), sender.clone(), target.clone());
            tokio::spawn(async move {
                let mut away = Vec::new();
                for u in candidates {
                    if !c.present(&u).await {
                        away.push(u);
                    }
                }
                for p in me.plan(clip, &sender, &target, |u| !away.iter().any(|a| **a == *u)) {
                    let key = format!("{}:{}", p.device.provider.name(), p.device.token);
                    if c.first_push(clip, &key).await {
                        me.enqueue(p);
                    }
                }
            });
            return;
        }
        for p in self.plan(clip, sender, target, online) {
            self.enqueue(p);
        }
    }

    /// The pushes a clip start asks for, `online` saying who has a session.
    fn plan(
        &self,
        clip: ClipId,
        sender: &Arc<str>,
        target: &Target,
        online: impl Fn(&str) -> bool,
    ) -> Vec<Push> {
        let Ok(book) = self.book.read() else {
            return Vec::new();
        };
        let offline: Vec<(Arc<str>, &[Device])> = match target {
            Target::User(u) => {
                let d = book.devices(u);
                if d.is_empty() || online(u) {
                    return Vec::new();
                }
                vec![(Arc::from(u.as_str()), d)]
            }
            Target::Channel(c) => book
                .members(c)
                .filter(|u| ***u != **sender && !online(u))
                .map(|u| (u.clone(), book.devices(u)))
                .collect(),
        };
        if offline.is_empty() {
            return Vec::new();
        }
        match self.planner.lock() {
            Ok(mut p) => p.handle_clip_start(
                clip,
                sender,
                target,
                offline.iter().map(|(u, d)| (u, *d)),
                crate::now_ms(),
            ),
            Err(_) => Vec::new(),
        }
    }

    /// Queues a push for the sending task (never waits).
    fn enqueue(&self, p: Push) {
        let provider = p.device.provider;
        if !self.sends(provider) {
            count(provider, "unconfigured");
        } else if self.jobs.try_send(p).is_err() {
            count(provider, "dropped");
        }
    }

    /// Sends queued pushes, `push_concurrency` at a time.
    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Push>, stop: CancellationToken) {
        let mut inflight = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                p = rx.recv(), if inflight.len() < self.concurrency => match p {
                    Some(p) => { inflight.spawn(self.clone().deliver(p)); }
                    None => return,
                },
                Some(_) = inflight.join_next() => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One push, retried while the provider says "later" and it is worth
    /// sending (`push_ttl` from the clip's start).
    async fn deliver(self: Arc<Self>, p: Push) {
        let Some(http) = &self.http else { return };
        let provider = p.device.provider;
        let deadline = p.started_ms + self.ttl.as_millis() as u64;
        let mut waits = codec::retry::Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(8),
        }
        .attempts();
        let mut fresh = false;
        let delay = Duration::from_millis(crate::now_ms().saturating_sub(p.started_ms));
        metrics::histogram!(crate::metrics::PUSH_DELAY).record(delay.as_secs_f64());
        loop {
            let answer = match (provider, &self.apns, &self.fcm) {
                (PushProvider::Apns, Some(a), _) => a.send(http, &p, fresh).await,
                (PushProvider::Fcm, _, Some(f)) => f.send(http, &p, fresh, self.ttl).await,
                _ => return,
            };
            let answer = answer.unwrap_or_else(|e| {
                debug!(error = %e, "push not answered");
                Answer::Retry { after: None }
            });
            match answer {
                Answer::Sent => return count(provider, "sent"),
                Answer::Gone => {
                    count(provider, "unregistered");
                    let gone = Record::Gone {
                        provider,
                        token: p.device.token.clone(),
                    };
                    if let Err(why) = self.record(vec![gone]).await {
                        warn!(%why, "push: a gone token not dropped");
                    }
                    return;
                }
                Answer::Reauth if !fresh => {
                    fresh = true;
                    continue;
                }
                Answer::Retry { after } => {
                    let wait = waits.next_after(after.unwrap_or_default(), rand::random());
                    if crate::now_ms() + wait.as_millis() as u64 > deadline {
                        return count(provider, "expired");
                    }
                    count(provider, "retried");
                    tokio::time::sleep(wait).await;
                }
                Answer::Reauth | Answer::Failed(_) => {
                    if let Answer::Failed(why) = &answer {
                        warn!(provider = provider.name(), %why, "push refused");
                    }
                    return count(provider, "failed");
                }
            }
        }
    }
}
