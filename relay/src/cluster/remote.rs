//! Live clips between relays: subscriptions by interest, forwarding a
//! local clip's packets, and taking other relays' clips to local
//! sessions.

use super::*;

impl Cluster {
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
                me.handle(&shared, &msg.subject, &msg.payload, msg.reply.as_ref());
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
    /// clip and subject). Cut off from NATS, it publishes nothing (queued
    /// publications would reach other relays late, as if live); if the
    /// link comes back while the clip is still open, the run starts again
    /// from its first packet (receivers skip what they have) and goes on
    /// live. A clip that ends while the link is down is left to the
    /// link-up work ([`Cluster::link_up`]).
    pub fn forward(self: &Arc<Self>, shared: &Arc<Shared>, live: Arc<LiveClip>, subject: String) {
        metrics::count(metrics::CLUSTER_CLIPS, "direction", "out");
        let me = self.clone();
        shared.tracker.spawn(async move {
            let clip = live.meta.id;
            let mut link = me.link.subscribe();
            'run: loop {
                if !link.borrow_and_update().up && !wait_link_while_open(&mut link, &live).await {
                    return;
                }
                // The connection this run goes out on: a run whose link
                // went and came back (even between two of its messages)
                // starts again.
                let on = link.borrow().links;
                let start = Relayed::Start {
                    clip,
                    origin: me.id,
                    header: live.header.clone(),
                };
                match me.publish_live(&subject, start.encode(), on).await {
                    Sent::Done => {}
                    Sent::LinkDown => continue 'run,
                    Sent::Failed => return,
                }
                let mut reader = live.reader();
                let mut offset = 0u64;
                loop {
                    let (payload, last) = match reader.next().await {
                        // Encoded straight from the segments: one copy.
                        Next::Data(b) => {
                            let at = offset;
                            offset += b.packets;
                            let n = b.packets as u32;
                            (Relayed::encode_data(clip, at, n, &b.segs), false)
                        }
                        Next::Complete(c) => (Relayed::End { clip, end: c.end }.encode(), true),
                        Next::Cut(code) => (Relayed::Cut { clip, code }.encode(), true),
                    };
                    match me.publish_live(&subject, payload, on).await {
                        Sent::Done if last => return,
                        Sent::Done => {}
                        Sent::LinkDown => continue 'run,
                        Sent::Failed => return,
                    }
                }
            }
        });
    }

    /// Publishes one message of a live run going out on connection `on`.
    /// With that connection gone nothing is published (the run waits for
    /// the link and starts again).
    pub(super) async fn publish_live(&self, subject: &str, payload: Bytes, on: u64) -> Sent {
        let same = |s: &LinkState| s.up && s.links == on;
        if !same(&self.link_state()) {
            return Sent::LinkDown;
        }
        match self.publish_bytes(subject, payload).await {
            Ok(()) => Sent::Done,
            Err(_) if !same(&self.link_state()) => Sent::LinkDown,
            // Refused while linked (too large: not within the clip limits).
            Err(_) => Sent::Failed,
        }
    }

    pub(super) async fn publish(&self, subject: &str, msg: Relayed) -> Result<(), ClusterError> {
        self.publish_bytes(subject, msg.encode()).await
    }

    pub(super) async fn publish_bytes(
        &self,
        subject: &str,
        payload: Bytes,
    ) -> Result<(), ClusterError> {
        let r = self
            .client
            .publish(subject.to_owned(), payload)
            .await
            .map_err(nats("publishing"));
        if let Err(e) = &r {
            debug!(error = %e, "cluster publish failed");
        }
        r
    }

    /// A relayed clip's `End`: stored and finished beside.
    fn end(self: &Arc<Self>, shared: &Arc<Shared>, clip: ClipId, end: codec::ClipEnd) {
        if !self.remote.contains_key(&clip) {
            return;
        }
        // Claimed before it leaves `remote`, so no adoption of its
        // announcement stores it a second time meanwhile.
        let mine = self.adopting.insert(clip, ()).is_none();
        // Taken now, so a late Data for it finds nothing.
        let Some((_, r)) = self.remote.remove(&clip) else {
            if mine {
                self.adopting.remove(&clip);
            }
            return;
        };
        let (me, shared2) = (self.clone(), shared.clone());
        shared.tracker.spawn(async move {
            me.ended(&shared2, r, end).await;
            if mine {
                me.adopting.remove(&clip);
            }
        });
    }

    /// Handles one message from another relay, in order and without
    /// waiting: what waits on the store or JetStream (End, Ack, Kept,
    /// HistoryKept) runs beside, so the next clip on this subject is not
    /// held behind a disk sync.
    pub(super) fn handle(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        subject: &str,
        payload: &Bytes,
        reply: Option<&async_nats::Subject>,
    ) {
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
                offset,
                packets,
                records,
            } => self.data(shared, clip, offset, packets, &records),
            Relayed::End { clip, end } => self.end(shared, clip, end),
            Relayed::Cut { clip, code } => {
                if !self.cut(shared, &clip, code) && code == ErrorCode::Preempted {
                    // A talker here lost the floor to a priority talker on
                    // another relay.
                    shared.stop_upload(
                        &clip,
                        ErrorCode::Preempted,
                        "a priority talker took the floor",
                    );
                }
            }
            Relayed::Ack { clip, recipient } => {
                let (me, shared2) = (self.clone(), shared.clone());
                shared.tracker.spawn(async move {
                    if let Err(e) = shared2.store.ack(&recipient, &clip).await {
                        warn!(error = %e, "cluster: store ack failed");
                    }
                    me.acked(&clip, &Arc::from(recipient));
                });
            }
            Relayed::Kept {
                clip,
                seq,
                origin,
                recipient,
            } => self.announced(
                shared,
                clip,
                Announced::Direct {
                    seq,
                    origin: Some(origin),
                    recipient,
                },
                None,
            ),
            Relayed::HistoryKept { clip, seq } => {
                // Announced on the channel's subject.
                if let Some(channel) = channel_of(subject) {
                    self.announced(shared, clip, Announced::History { seq, channel }, None);
                }
            }
            // Asked on a user's subject: this relay has the user (it is
            // subscribed for a session of it), so it answers.
            Relayed::Present => {
                if let Some(to) = reply {
                    let (client, to) = (self.client.clone(), to.clone());
                    tokio::spawn(async move { client.publish(to, Bytes::new()).await });
                }
            }
        }
    }

    /// The cluster keeps `clip` (`at`): while its live run is arriving
    /// here that run delivers and stores it (noted, in case it breaks);
    /// otherwise it is fetched and queued beside.
    /// `caught_up` names the kind counted in `ptt_cluster_caught_up_total`
    /// when the link-up work found the clip (and this relay takes it).
    pub(super) fn announced(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        clip: ClipId,
        at: Announced,
        caught_up: Option<&'static str>,
    ) {
        if let Some(mut r) = self.remote.get_mut(&clip) {
            r.kept = Some(at);
            return;
        }
        self.fetch_announced(shared, clip, at, caught_up);
    }

    /// Reads announced clip `clip` from `stream`: at `seq` when the
    /// announcement came from this region (the sequence is its origin
    /// region's), else found by id on `subject`. `None` when it is gone
    /// (delivered and deleted, or expired) or unreadable.
    async fn read_announced(
        &self,
        stream: &stream::Stream,
        seq: u64,
        subject: String,
        clip: ClipId,
    ) -> Option<(u64, StoredClip)> {
        if let Ok(m) = stream.get_raw_message(seq).await {
            match StoredClip::from_record(&m.payload) {
                Some(c) if c.meta.id == clip => return Some((seq, c)),
                // Another clip at that sequence: the announcement came from
                // another region.
                Some(_) => {}
                None => warn!(seq, "cluster: unreadable stored clip skipped"),
            }
        }
        if self.others.is_empty() {
            debug!(
                seq,
                "cluster: announced clip not read (delivered, or expired)"
            );
            return None;
        }
        match self.read(stream, Some(subject)).await {
            Ok(all) => all
                .into_iter()
                .find(|(_, _, c)| c.meta.id == clip)
                .map(|(seq, _, c)| (seq, c)),
            Err(e) => {
                debug!(error = %e, "cluster: announced clip not read");
                None
            }
        }
    }

    /// Fetches an announced clip from its stream and queues it here (the
    /// direct recipient, or the channel's members), beside.
    pub(super) fn fetch_announced(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        clip: ClipId,
        at: Announced,
        caught_up: Option<&'static str>,
    ) {
        let (me, shared) = (self.clone(), shared.clone());
        shared.clone().tracker.spawn(async move {
            let (stream, seq, subject) = match &at {
                Announced::Direct { seq, recipient, .. } => {
                    // Not connected here (any more): its next relay reads
                    // the stream when it connects.
                    if shared.router.session(recipient).is_none() || known(&shared, &clip).await {
                        return;
                    }
                    (&me.stream, *seq, me.names.store(recipient))
                }
                Announced::History { seq, channel } => {
                    (&me.history, *seq, me.names.history(channel))
                }
            };
            let Some((seq, stored)) = me.read_announced(stream, seq, subject, clip).await else {
                return;
            };
            let stored = Arc::new(stored);
            let taken = match (&at, &stored.meta.target) {
                (
                    Announced::Direct {
                        origin, recipient, ..
                    },
                    Target::User(to),
                ) if to == recipient => match shared.router.session(recipient) {
                    Some(s) => me.take_kept(&shared, &s, seq, *origin, stored).await,
                    None => false,
                },
                (Announced::History { .. }, Target::Channel(c)) => {
                    let c = c.clone();
                    me.adopt(&shared, &c, stored).await
                }
                _ => {
                    warn!(seq, "cluster: announced clip has another target; skipped");
                    false
                }
            };
            if let (true, Some(kind)) = (taken, caught_up) {
                metrics::count(metrics::CLUSTER_CAUGHT_UP, "kind", kind);
            }
        });
    }

    pub(super) fn started(&self, shared: &Arc<Shared>, clip: ClipId, origin: u64, header: &[u8]) {
        // A run sent again after the origin's link came back: the one
        // arriving goes on (its `Data` skips what it has).
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
        let recipients = shared.router.local_recipients(&d.target, &sender);
        let channel = match &d.target {
            Target::Channel(c) => Some(c.clone()),
            Target::User(_) => None,
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
        let pre_skip = meta.format.pre_skip;
        let live = LiveClip::new(meta);
        // Local recipients only: none is elsewhere.
        shared.offer_live(&live, &recipients, |_| {});
        if channel.is_none() {
            self.acks_to.insert(clip, (origin, Instant::now()));
        }
        self.remote.insert(
            clip,
            Remote {
                live,
                framer: Framer::for_clip(shared.config.frame_limits(), pre_skip),
                run: Run::default(),
                recipients,
                channel,
                kept: None,
                last: Instant::now(),
            },
        );
    }

    /// A run of a relayed clip's packet records: what is new is validated
    /// again and goes to its listeners; a repeat is skipped; a gap or bad
    /// records cut the live run (the clip then comes from the cluster's
    /// store, announced).
    pub(super) fn data(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        clip: ClipId,
        offset: u64,
        packets: u32,
        records: &Bytes,
    ) {
        let Some(mut r) = self.remote.get_mut(&clip) else {
            return;
        };
        r.last = Instant::now();
        let (new, n) = match r.run.take(offset, packets, records) {
            Take::New { records, packets } => (records, packets),
            Take::Repeat => return,
            Take::Gap { have, offset } => {
                drop(r);
                debug!(clip = %clip, have, offset, "cluster: relayed run has a gap; clip cut");
                self.cut(shared, &clip, ErrorCode::CutOff);
                return;
            }
            Take::Malformed => {
                drop(r);
                warn!(clip = %clip, "cluster: bad packet records; clip cut");
                self.cut(shared, &clip, ErrorCode::CutOff);
                return;
            }
        };
        let ok = r
            .framer
            .scan(&new)
            .is_ok_and(|s| s.records == new.len() && s.end.is_none());
        if !ok {
            drop(r);
            warn!(clip = %clip, "cluster: bad packet records; clip cut");
            self.cut(shared, &clip, ErrorCode::CutOff);
            return;
        }
        if let Err(e) = r.live.push(new, n) {
            warn!(clip = %clip, error = %e, "cluster: relayed clip lost");
            r.live.cut(ErrorCode::Internal);
        }
    }

    /// A relayed clip's end: kept here for its recipients, then the step
    /// after storing every new clip (`stored_new`, as for an upload). Not
    /// the upload's `store_clip`: a clip the store already has completes
    /// the live copy here (it came twice, from the run and the cluster's
    /// announcement), where an upload's duplicate is cut; and the cluster
    /// already keeps it (the origin's `Accepted` waited for that).
    pub(super) async fn ended(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        r: Remote,
        end: codec::ClipEnd,
    ) {
        let clip = r.live.meta.id;
        // The end must match what arrived (a run that lost packets on the
        // way without a gap showing could end short).
        let mut framer = r.framer.clone();
        let whole = framer.scan(&end.to_bytes()).is_ok_and(|s| s.end.is_some());
        let body = match r.live.body() {
            Ok(b) if whole => b,
            Ok(_) => {
                debug!(clip = %clip, "cluster: relayed clip ended short; taken from the store");
                return self.broken(shared, r, ErrorCode::CutOff);
            }
            Err(e) => {
                warn!(clip = %clip, error = %e, "cluster: relayed clip lost");
                return self.broken(shared, r, ErrorCode::Internal);
            }
        };
        let stored = Arc::new(StoredClip::new(r.live.meta.clone(), body, end));
        match shared.store.append(stored.clone(), &r.recipients).await {
            Ok(Appended::New) => {
                let channel = r.channel.as_deref();
                crate::state::stored_new(shared, &r.live, stored, &r.recipients, channel).await;
            }
            Ok(Appended::Duplicate) => r.live.complete(stored),
            Ok(Appended::Conflict) | Err(_) => {
                // Not kept here: the origin still holds it.
                warn!(clip = %clip, "cluster: a relayed clip could not be stored here");
                r.live.cut(ErrorCode::CutOff);
            }
        }
    }

    /// Cuts a relayed clip; false if there is none of that id.
    pub(super) fn cut(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        clip: &ClipId,
        code: ErrorCode,
    ) -> bool {
        match self.remote.remove(clip) {
            Some((_, r)) => {
                self.broken(shared, r, code);
                true
            }
            None => false,
        }
    }

    /// A relayed clip's live run ended without the clip: its listeners
    /// see `code`; if the cluster announced it keeps the clip, it is taken
    /// from there (otherwise its announcement, or the link-up work, brings
    /// it).
    pub(super) fn broken(self: &Arc<Self>, shared: &Arc<Shared>, r: Remote, code: ErrorCode) {
        let clip = r.live.meta.id;
        r.live.cut(code);
        if let Some(at) = r.kept {
            self.fetch_announced(shared, clip, at, None);
        } else if r.channel.is_none() {
            // Its `Kept` may follow; a later one is fetched as usual, and
            // the ack route is noted again from it.
            self.acks_to.remove(&clip);
        }
    }

    /// The link went down: every relayed clip is cut for its listeners.
    pub(super) fn cut_all_remote(self: &Arc<Self>, shared: &Arc<Shared>) {
        let all: Vec<ClipId> = self.remote.iter().map(|r| *r.key()).collect();
        for c in all {
            self.cut(shared, &c, ErrorCode::CutOff);
        }
    }

    /// Cuts relayed clips that went silent (their origin died mid-clip)
    /// and forgets ack routes and stored-clip notes older than `clip_ttl`.
    pub(super) fn sweep(self: &Arc<Self>, shared: &Arc<Shared>) {
        let idle = shared.config.upload_idle_timeout;
        let ttl = shared.config.clip_ttl;
        let quiet: Vec<ClipId> = self
            .remote
            .iter()
            .filter(|r| r.last.elapsed() > idle)
            .map(|r| *r.key())
            .collect();
        for c in quiet {
            self.cut(shared, &c, ErrorCode::CutOff);
        }
        self.acks_to.retain(|_, (_, at)| at.elapsed() < ttl);
        self.kept.retain(|_, k| k.at.elapsed() < ttl);
    }

    /// A session starts here: subscribes to its user's and channels'
    /// subjects (returned, to be let go when it ends) and, beside it,
    /// queues for it the clips the cluster keeps for it (accepted by any
    /// relay) and its channels' history said elsewhere.
    pub fn join(self: &Arc<Self>, shared: &Arc<Shared>, session: &Arc<Session>) -> Vec<String> {
        let subjects: Vec<String> = std::iter::once(user_subject(&session.user))
            .chain(session.channels.keys().map(|ch| channel_subject(ch)))
            .collect();
        for subj in &subjects {
            self.want(shared, subj.clone());
        }
        let (me, shared, session) = (self.clone(), shared.clone(), session.clone());
        shared
            .tracker
            .clone()
            .spawn(async move { me.load_for(&shared, &session).await });
        subjects
    }

    /// Loads what the cluster keeps for a session that just started: as
    /// soon as the link is up (at once, or when an outage ends), tried
    /// again with the shared backoff while JetStream cannot answer (a NATS
    /// node just died, a leader is being elected), for as long as the
    /// session lasts.
    pub(super) async fn load_for(&self, shared: &Shared, session: &Session) {
        let mut attempts = codec::retry::Backoff {
            min: Duration::from_millis(300),
            max: Duration::from_secs(5),
        }
        .attempts();
        let mut link = self.link.subscribe();
        loop {
            tokio::select! {
                r = link.wait_for(|s| s.up) => if r.is_err() { return },
                _ = session.conn.closed() => return,
            }
            // Subscribed first: a clip kept after the reads below is
            // announced on the user's subject (`Kept`).
            let subject = user_subject(&session.user);
            tokio::select! {
                ok = self.subscribed(&subject, Duration::from_secs(5)) => if !ok {
                    warn!(user = %session.user, "cluster: subscription not confirmed");
                },
                _ = session.conn.closed() => return,
            }
            let load = async {
                let n = self.load_kept(shared, session).await?;
                Ok::<_, ClusterError>(n + self.load_history(shared, session).await?)
            };
            let Some(loaded) = self.while_linked(load).await else {
                // The link went meanwhile: again once it is back.
                continue;
            };
            match loaded {
                Ok(n) => {
                    if n > 0 {
                        session.store_changed();
                    }
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "cluster: stored clips not loaded yet");
                    tokio::select! {
                        () = tokio::time::sleep(attempts.next(rand::random())) => {}
                        _ = session.conn.closed() => return,
                    }
                }
            }
        }
    }

    /// Waits (a bounded time) until the server routes `subject` here.
    pub(super) async fn subscribed(&self, subject: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.is_subscribed(subject) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}
