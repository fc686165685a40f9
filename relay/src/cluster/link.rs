//! The link to NATS: connecting, noticing a lost link, and the work at
//! each link-up (streams recreated, backfill, reconcile, catch-up).

use super::*;

impl Cluster {
    /// Connects to the NATS servers in `urls` (comma-separated), retrying
    /// in the background if none answers yet, and opens (or creates) the
    /// JetStream streams.
    pub async fn connect(cfg: &crate::Config) -> Result<Arc<Cluster>, ClusterError> {
        let urls = cfg.cluster.as_str();
        let addrs: Vec<async_nats::ServerAddr> = urls
            .split(',')
            .map(|u| {
                u.trim()
                    .parse()
                    .map_err(|e: std::io::Error| ClusterError::Url {
                        url: u.to_owned(),
                        source: Box::new(e),
                    })
            })
            .collect::<Result<_, _>>()?;
        let link = Arc::new(watch::Sender::new(LinkState::default()));
        let client = Self::options(cfg, link.clone())
            .connect(addrs)
            .await
            .map_err(nats("connecting to the cluster's NATS"))?;
        if client.connection_state() == async_nats::connection::State::Connected {
            link.send_if_modified(|s| {
                let first = !s.up && s.links == 0;
                if first {
                    s.up = true;
                    s.links = 1;
                }
                first
            });
        }
        // This region's JetStream is the one of the NATS the relay
        // connects to; another region's is reached by its domain.
        let js = jetstream::new(client.clone());
        let region = (!cfg.region.is_empty()).then_some(cfg.region.as_str());
        let names = Names::of(region);
        let regions = cfg.region_list();
        let others = regions
            .iter()
            .filter(|r| Some(r.as_str()) != region)
            .map(|r| {
                let names = Names::of(Some(r));
                Region {
                    name: Arc::from(r.as_str()),
                    configs: stream_configs(cfg, &names),
                    names,
                    js: jetstream::with_domain(client.clone(), r),
                }
            })
            .collect();
        let configs = stream_configs(cfg, &names);
        let mut opened = Vec::with_capacity(configs.len());
        for c in &configs {
            opened.push(open_stream(&js, c).await?);
        }
        let [stream, floors, push, _pushed, history]: [stream::Stream; 5] =
            opened.try_into().map_err(|_| ClusterError::NotConnected)?;
        let (chores, chores_rx) = mpsc::channel(cfg.cluster_backlog_clips.max(1));
        let (late, late_rx) = mpsc::channel(cfg.cluster_backlog_clips.max(1));
        Ok(Arc::new(Cluster {
            client,
            js,
            configs,
            stream,
            floors,
            push,
            push_unshared: Mutex::new(HashMap::default()),
            push_elsewhere: Mutex::new(HashSet::default()),
            history,
            names,
            others,
            regions,
            copies: cfg.copies_in_other_regions(),
            kept: DashMap::default(),
            id: rand::random(),
            subs: Mutex::new(HashMap::default()),
            remote: DashMap::default(),
            acks_to: DashMap::default(),
            link,
            chores,
            chores_rx: Mutex::new(Some(chores_rx)),
            late,
            late_rx: Mutex::new(Some(late_rx)),
            held: Mutex::new(HashMap::default()),
            dirty: Mutex::new(BTreeSet::new()),
            adopting: DashMap::default(),
            awaiting: DashMap::default(),
            keep_wait: cfg.cluster_keep_wait,
            ping_interval: cfg.cluster_ping_interval,
        }))
    }

    /// The NATS client's options: its reconnects and pings, and link
    /// events told to `link`.
    fn options(
        cfg: &crate::Config,
        link: Arc<watch::Sender<LinkState>>,
    ) -> async_nats::ConnectOptions {
        // Reconnects: at once, then the shared backoff up to
        // `cluster_reconnect_max`, so cross-relay talk resumes within about
        // that much of NATS coming back.
        let backoff = codec::retry::Backoff {
            min: Duration::from_millis(100),
            max: cfg.cluster_reconnect_max,
        };
        async_nats::ConnectOptions::new()
            .name("ptt-relay")
            // Our own channel publications do not come back to us.
            .no_echo()
            .retry_on_initial_connect()
            // A silent NATS (no FIN: a dead host, a partition) is given up
            // after three unanswered pings.
            .ping_interval(cfg.cluster_ping_interval)
            .reconnect_delay_callback(move |attempts| match attempts {
                0 | 1 => Duration::ZERO,
                n => backoff.delay(n.saturating_sub(2) as u32, rand::random()),
            })
            .event_callback(move |e| {
                let link = link.clone();
                async move {
                    match e {
                        async_nats::Event::Connected => {
                            info!("cluster: connected to NATS");
                            link.send_modify(|s| {
                                s.up = true;
                                s.links += 1;
                            });
                        }
                        async_nats::Event::Disconnected => {
                            warn!(
                                "cluster: lost NATS; clips for other relays are held until it is back"
                            );
                            metrics::count1(metrics::CLUSTER_LINK_LOST);
                            link.send_modify(|s| {
                                s.up = false;
                                s.lost_at = Some(SystemTime::now());
                            });
                        }
                        other => debug!(event = %other, "cluster event"),
                    }
                }
            })
    }

    pub fn connected(&self) -> bool {
        self.link.borrow().up
    }

    /// The link's state now.
    pub fn link_state(&self) -> LinkState {
        *self.link.borrow()
    }

    /// Clips accepted here that the cluster does not have yet.
    pub fn held(&self) -> usize {
        self.held.lock().map_or(0, |h| h.len())
    }

    /// Starts listening for acks of the clips this relay accepted, the
    /// chores' runner, and the loop that sweeps relayed clips that went
    /// silent and does the link-up work after every (re)connection.
    pub fn start(self: &Arc<Self>, shared: &Arc<Shared>) {
        self.want(shared, relay_subject(self.id));
        if let Some(rx) = self.chores_rx.lock().ok().and_then(|mut r| r.take()) {
            let me = self.clone();
            shared
                .tracker
                .spawn(me.run_chores(rx, shared.shutdown.clone()));
        }
        if let Some(rx) = self.late_rx.lock().ok().and_then(|mut r| r.take()) {
            let me = self.clone();
            shared
                .tracker
                .spawn(me.run_late(rx, shared.shutdown.clone()));
        }
        let me = self.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut link = me.link.subscribe();
            let mut relink = Relink::default();
            let mut copy_at = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    r = link.changed() => if r.is_err() { return },
                    () = shared.shutdown.cancelled() => return,
                }
                let (lost, work) = relink.handle_state(me.link_state());
                if lost {
                    // What was arriving from other relays cannot complete
                    // now: its listeners see a cut at once, and get the
                    // clip when the link is back.
                    me.cut_all_remote(&shared);
                }
                me.sweep(&shared);
                if let Some(w) = work
                    && me.while_linked(me.link_up(&shared, w)).await == Some(true)
                {
                    relink.handle_done(w);
                } else if work.is_none() && me.copies_due(&mut copy_at) {
                    me.while_linked(me.copy_held(&shared)).await;
                }
            }
        });
    }

    /// Runs `f` while the link stays up (the same connection): `None` if
    /// the link went first. JetStream requests lost with a connection
    /// would otherwise wait out their timeouts (5 s; 30 s for a publish
    /// ack), holding a sender's `Accepted` or the link-up work.
    pub(super) async fn while_linked<T>(
        &self,
        f: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let mut link = self.link.subscribe();
        let at = *link.borrow_and_update();
        if !at.up {
            return None;
        }
        tokio::select! {
            r = f => Some(r),
            _ = link.wait_for(|s| !s.up || s.links != at.links) => None,
        }
    }

    /// After every (re)connection to NATS: makes sure the streams exist
    /// (a NATS that restarted alone lost the memory stream of floors),
    /// writes to JetStream what this relay holds that the cluster lacks,
    /// and, after an outage, reads what was kept for its users and
    /// channels since it began (announcements it may have missed). True
    /// once all of it is done; on a failure it is tried again at the next
    /// tick, and a link lost meanwhile abandons it (see [`Relink`]).
    pub(super) async fn link_up(self: &Arc<Self>, shared: &Arc<Shared>, w: LinkWork) -> bool {
        let started = Instant::now();
        let r = async {
            for c in &self.configs {
                self.js
                    .get_or_create_stream(c.clone())
                    .await
                    .map_err(nats(format!("opening JetStream stream {}", c.name)))?;
            }
            self.open_other_regions().await;
            self.share_unshared().await?;
            let direct = self.backfill_direct(shared).await?;
            let channel = self.backfill_channels(shared, w.all_channels).await?;
            let caught = match w.since {
                Some(t) => self.catch_up(shared, t).await?,
                None => 0,
            };
            Ok::<_, ClusterError>((direct, channel, caught))
        }
        .await;
        match r {
            Ok((direct, channel, caught)) => {
                if direct + channel + caught > 0 {
                    info!(
                        direct,
                        channel,
                        scanned = caught,
                        ms = started.elapsed().as_millis() as u64,
                        "cluster: linked again; backlog written and missed clips read"
                    );
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "cluster: link-up work stopped; tried again shortly");
                false
            }
        }
    }

    /// Keeps in JetStream every undelivered direct clip of this relay's
    /// store that it has not kept there yet (clips accepted while NATS
    /// was unreachable, and after a restart everything: JetStream's
    /// message-id window answers a clip it has as a duplicate). Returns
    /// how many JetStream did not have.
    pub(super) async fn backfill_direct(&self, shared: &Shared) -> Result<u64, ClusterError> {
        let mut n = 0;
        for (recipient, clip) in shared.cache.pending_direct() {
            if self.kept_enough(&recipient, clip.meta.id) {
                continue;
            }
            let elsewhere = !shared.router.is_online(&recipient);
            let r = self.keep_direct(&clip, &recipient, elsewhere).await;
            // Another region still missing (`None`): held, tried again later.
            if self.backfilled(r, clip.meta.id, "direct")? == Some(true) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Settles one backfill write of clip `id` (`kind`: `direct` or
    /// `channel`, as counted in `ptt_cluster_backfilled_total`):
    /// `Some(new)` once the cluster has it wherever it should (`new`: it
    /// lacked it, and it is counted), so it is held no more; `None` while
    /// another region still lacks it (it stays held).
    fn backfilled(
        &self,
        written: Result<bool, ClusterError>,
        id: ClipId,
        kind: &'static str,
    ) -> Result<Option<bool>, ClusterError> {
        match written {
            Ok(had) => {
                if !had {
                    metrics::count(metrics::CLUSTER_BACKFILLED, "kind", kind);
                }
                self.note_held(id, None);
                Ok(Some(!had))
            }
            Err(ClusterError::TooFewRegions { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Compares this relay's channel histories with the cluster's and
    /// writes (and announces) the clips the cluster lacks: every channel's
    /// at the first link (a restart may follow a crash during an outage),
    /// the channels marked while cut off after that. Returns how many.
    pub(super) async fn backfill_channels(
        &self,
        shared: &Shared,
        all: bool,
    ) -> Result<u64, ClusterError> {
        let channels: Vec<String> = if all {
            shared.history.iter().map(|h| h.key().clone()).collect()
        } else {
            self.dirty
                .lock()
                .map(|mut d| std::mem::take(&mut *d).into_iter().collect())
                .unwrap_or_default()
        };
        let mut n = 0;
        for (i, c) in channels.iter().enumerate() {
            match self.reconcile(shared, c).await {
                Ok(k) => n += k,
                Err(e) => {
                    // Marked again, with the ones not done yet.
                    if let Ok(mut d) = self.dirty.lock() {
                        d.extend(channels[i..].iter().cloned());
                    }
                    return Err(e);
                }
            }
        }
        Ok(n)
    }

    /// Writes the clips of `channel`'s history here that the cluster's
    /// lacks, oldest first, and announces each. A clip older than the
    /// cluster's oldest when the cluster's is full fell out of it (it is
    /// not brought back), as does one past `channel_history_age`.
    pub(super) async fn reconcile(
        &self,
        shared: &Shared,
        channel: &str,
    ) -> Result<u64, ClusterError> {
        let local: Vec<Arc<StoredClip>> = shared
            .history
            .get(channel)
            .map(|h| h.clips.iter().map(|(_, c)| c.clone()).collect())
            .unwrap_or_default();
        if local.is_empty() {
            return Ok(0);
        }
        let theirs = self
            .read(&self.history, Some(self.names.history(channel)))
            .await?;
        let cfg = &shared.config;
        let ids: HashSet<ClipId> = theirs.iter().map(|(_, _, c)| c.meta.id).collect();
        let full = theirs.len() >= cfg.channel_history_depth.max(1);
        let oldest = theirs.iter().map(|(_, _, c)| c.meta.created_ms).min();
        let too_old = cfg.history_cutoff_ms(crate::now_ms());
        let mut n = 0;
        let mut short = false;
        for clip in local {
            let at = clip.meta.created_ms;
            // Held: this region may have it, another not yet.
            let held = self.is_held(clip.meta.id);
            if (ids.contains(&clip.meta.id) && !held)
                || at < too_old
                || (full && oldest.is_some_and(|o| at < o))
            {
                self.note_held(clip.meta.id, None);
                continue;
            }
            let r = self.put_history(channel, &clip).await;
            match self.backfilled(r, clip.meta.id, "channel")? {
                Some(true) => n += 1,
                Some(false) => {}
                None => short = true,
            }
        }
        if short && let Ok(mut d) = self.dirty.lock() {
            // Compared again when the other regions answer.
            d.insert(channel.to_owned());
        }
        Ok(n)
    }

    /// Scans what was kept in the cluster from `since` (less the time a
    /// lost link takes to notice), headers only, and takes the clips for
    /// this relay's users and channels as announced ones: the
    /// announcements sent while this relay was cut off never reached it.
    /// Returns how many were for its users (those it did not have yet are
    /// counted in `ptt_cluster_caught_up_total` as they are queued).
    pub(super) async fn catch_up(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        since: SystemTime,
    ) -> Result<u64, ClusterError> {
        let from = since
            .checked_sub(self.ping_interval * 3 + Duration::from_secs(2))
            .unwrap_or(since);
        let mut n = 0;
        for stream in [&self.stream, &self.history] {
            for (seq, subject, headers) in self.scan(stream, from).await? {
                let Some(clip) = headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .and_then(|v| ClipId::from_hex(v.as_str()))
                else {
                    continue;
                };
                let (at, kind): (_, &'static str) = match self.names.target(&subject) {
                    Some(CaughtUp::User(user)) if shared.router.is_online(&user) => (
                        Announced::Direct {
                            seq,
                            origin: origin_of(Some(&headers)),
                            recipient: user,
                        },
                        "direct",
                    ),
                    Some(CaughtUp::Channel(c)) if !shared.router.channel_members(&c).is_empty() => {
                        (Announced::History { seq, channel: c }, "channel")
                    }
                    _ => continue,
                };
                self.announced(shared, clip, at, Some(kind));
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every message of `stream` from `since`: sequence, subject and
    /// headers (not the clips: a relay takes only its users').
    pub(super) async fn scan(
        &self,
        stream: &stream::Stream,
        since: SystemTime,
    ) -> Result<Vec<(u64, String, async_nats::HeaderMap)>, ClusterError> {
        let mut out = Vec::new();
        self.consume(stream, None, Some(since), true, |seq, m| {
            out.push((
                seq,
                m.subject.to_string(),
                m.headers.clone().unwrap_or_default(),
            ));
        })
        .await?;
        Ok(out)
    }

    /// A direct clip kept in JetStream (at `seq`) for `session`'s user,
    /// connected here: queued for it unless this relay knows the clip
    /// (then its own copy, if still owed, delivers it). Noted either way,
    /// so the user's ack deletes JetStream's copy and reaches the origin.
    /// True if queued.
    pub(super) async fn take_kept(
        &self,
        shared: &Shared,
        session: &Session,
        seq: u64,
        origin: Option<u64>,
        clip: Arc<StoredClip>,
    ) -> bool {
        let id = clip.meta.id;
        let user = session.user.clone();
        // Read from this region's JetStream: its copies elsewhere are its
        // origin's to make.
        let read = Kept {
            seq,
            elsewhere: Vec::new(),
            ours: false,
            at: Instant::now(),
        };
        self.kept.insert((user.clone(), id), read);
        if let Some(o) = origin.filter(|o| *o != self.id) {
            self.acks_to.insert(id, (o, Instant::now()));
        }
        if self.remote.contains_key(&id) || known(shared, &id).await {
            return false;
        }
        let queued = shared.cache.queue_cached(user, clip);
        if queued {
            session.store_changed();
        }
        queued
    }

    /// Takes a channel clip of the cluster's history into this relay's
    /// (unless it has it, or its live run is arriving): every member
    /// online here gets it now, and those who connect later from this
    /// history, as for a clip said here. True if taken.
    pub(super) async fn adopt(
        &self,
        shared: &Shared,
        channel: &str,
        clip: Arc<StoredClip>,
    ) -> bool {
        let id = clip.meta.id;
        let in_history = |s: &Shared| {
            s.history
                .get(channel)
                .is_some_and(|h| h.clips.iter().any(|(_, c)| c.meta.id == id))
        };
        if self.remote.contains_key(&id) || in_history(shared) || known(shared, &id).await {
            return false;
        }
        if self.adopting.insert(id, ()).is_some() {
            return false;
        }
        // Looked at again under the claim: another adoption may have
        // finished between the first look and the claim.
        let taken = !in_history(shared);
        if taken {
            let sender = clip.meta.sender.clone();
            record_history(shared, channel, &clip, &[], &sender).await;
        }
        self.adopting.remove(&id);
        taken
    }
}

/// How long a starting relay keeps trying to open its streams: a NATS
/// cluster that has just formed elects its JetStream leaders first, and a
/// loaded one answers slowly.
const OPEN_FOR: Duration = Duration::from_secs(60);

/// Opens (or creates) stream `c`, trying again by the shared backoff while
/// JetStream does not answer, for [`OPEN_FOR`].
async fn open_stream(
    js: &jetstream::Context,
    c: &stream::Config,
) -> Result<stream::Stream, ClusterError> {
    let backoff = codec::retry::Backoff {
        min: Duration::from_millis(250),
        max: Duration::from_secs(4),
    };
    let started = Instant::now();
    let mut tries = 0;
    loop {
        match js.get_or_create_stream(c.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if started.elapsed() < OPEN_FOR => {
                warn!(stream = %c.name, error = %e, "cluster: JetStream not ready; trying again");
                tokio::time::sleep(backoff.delay(tries, rand::random())).await;
                tries += 1;
            }
            Err(e) => {
                return Err(nats(format!(
                    "opening JetStream stream {} (is nats-server running with -js?)",
                    c.name
                ))(e));
            }
        }
    }
}
