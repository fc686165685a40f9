//! Clips kept in JetStream for recipients on other relays, and the
//! chores (acks, deletions, floor releases) done off the control loop.

use super::*;

/// Deletes message `seq` of `stream` in the JetStream `js`. Without
/// `no_erase` (the client library's `delete_message`) the server
/// overwrites the message on disk with random bytes: measured, that held
/// a clustered relay to a quarter of its clip rate.
async fn delete_message(
    js: &jetstream::Context,
    stream: &str,
    seq: u64,
) -> Result<serde_json::Value, jetstream::context::RequestError> {
    let req = serde_json::json!({ "seq": seq, "no_erase": true });
    js.request(format!("STREAM.MSG.DELETE.{stream}"), &req)
        .await
}

impl Cluster {
    /// Queues a chore; when `cluster_backlog_clips` are waiting already it
    /// is dropped (counted): an ack or a deletion not made costs a clip
    /// offered once more (and dropped by id), a floor not released expires.
    pub(super) fn chore(&self, c: Chore) {
        if self.chores.try_send(c).is_err() {
            metrics::count1(metrics::CLUSTER_CHORES_DROPPED);
        }
    }

    /// Runs chores, a batch at a time, whenever the link is up.
    pub(super) async fn run_chores(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Chore>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut link = self.link.subscribe();
        let mut batch = Vec::with_capacity(CHORE_BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, CHORE_BATCH) => if n == 0 { return },
                () = stop.cancelled() => return,
            }
            tokio::select! {
                r = link.wait_for(|s| s.up) => if r.is_err() { return },
                () = stop.cancelled() => return,
            }
            futures_util::future::join_all(batch.drain(..).map(|c| self.do_chore(c))).await;
        }
    }

    pub(super) async fn do_chore(&self, c: Chore) {
        match c {
            Chore::Ack {
                origin,
                clip,
                recipient,
            } => {
                let ack = Relayed::Ack {
                    clip,
                    recipient: recipient.to_string(),
                };
                let _ = self.publish(&relay_subject(origin), ack).await;
            }
            Chore::Delete { region, seq } => self.delete_kept(region, seq).await,
            Chore::ReleaseFloor { channel, seq } => {
                let (js, _) = self.jetstream_of(self.floor_region(&channel));
                if let Err(e) = delete_message(js, FLOORS, seq).await {
                    debug!(seq, error = %e, "cluster: floor not released (it expires)");
                }
            }
        }
    }

    /// Keeps an accepted direct clip in JetStream for `recipient`, so any
    /// relay can deliver it (and it outlives this one, and with regions
    /// this region). Returns once JetStream has it (its publish acks:
    /// this region's and `replicas_in_other_regions` others'). With
    /// `elsewhere` (the recipient is not connected here) the relay it is
    /// connected to is told, so it queues the clip even if it missed the
    /// live run. Cut off, the clip is held: written when the link is back.
    ///
    /// A recipient hearing the clip live here is given `cluster_keep_wait`
    /// to ack it first: a clip its recipient has needs no copy (nor its
    /// deletion), which spares JetStream two requests per clip.
    pub async fn keep(
        &self,
        shared: &Shared,
        clip: &StoredClip,
        recipient: &Arc<str>,
        elsewhere: bool,
    ) -> Result<(), ClusterError> {
        let id = clip.meta.id;
        if !elsewhere && self.delivered_within(shared, id, recipient).await {
            metrics::count(metrics::CLUSTER_KEPT, "outcome", "delivered");
            return Ok(());
        }
        let r = self.keep_direct(clip, recipient, elsewhere).await;
        metrics::count(metrics::CLUSTER_KEPT, "outcome", "written");
        self.note_held(id, r.is_err().then_some(true));
        // Looked at after the note: acked while it was being written, its
        // copies go now and it is held no more.
        if !shared.store.holds(recipient, &id) {
            self.acked(&id, recipient);
        }
        r.map(|_| ())
    }

    /// Whether `recipient` acks clip `id` within `cluster_keep_wait`
    /// (or has already). Never with a wait of 0: every clip is written.
    async fn delivered_within(&self, shared: &Shared, id: ClipId, recipient: &str) -> bool {
        if self.keep_wait.is_zero() {
            return false;
        }
        let has = || !shared.store.holds(recipient, &id);
        if has() {
            return true;
        }
        let woken = self.awaiting.entry(id).or_default().clone();
        let acked = woken.notified();
        tokio::pin!(acked);
        // Registered before looking again: an ack between the two wakes it.
        acked.as_mut().enable();
        if !has() {
            let _ = tokio::time::timeout(self.keep_wait, acked).await;
        }
        self.awaiting.remove(&id);
        has()
    }

    /// [`Cluster::keep`] without the bookkeeping of held clips; returns
    /// whether this region's JetStream had it already. Fails when fewer
    /// other regions than wanted took it (it is then noted as kept here
    /// all the same, and announced).
    pub(super) async fn keep_direct(
        &self,
        clip: &StoredClip,
        recipient: &Arc<str>,
        elsewhere: bool,
    ) -> Result<bool, ClusterError> {
        // Cut off, this fails at once: this relay's own store has the clip.
        let Copies {
            seq,
            duplicate,
            elsewhere: copied,
            rest,
        } = self.publish_copies(Kind::Store(recipient), clip).await?;
        let reached = copied.len();
        self.kept.insert(
            (recipient.clone(), clip.meta.id),
            Kept {
                seq,
                elsewhere: copied,
                ours: true,
                at: Instant::now(),
            },
        );
        self.finish_late(rest, Some((recipient.clone(), clip.meta.id)))
            .await;
        if elsewhere {
            let kept = Relayed::Kept {
                clip: clip.meta.id,
                seq,
                origin: self.id,
                recipient: recipient.to_string(),
            };
            let _ = self.publish(&user_subject(recipient), kept).await;
        }
        self.enough(reached)?;
        Ok(duplicate)
    }

    /// Whether JetStream has the direct clip `id` for `recipient` in as
    /// many regions as wanted (written from here, or read from it).
    pub(super) fn kept_enough(&self, recipient: &Arc<str>, id: ClipId) -> bool {
        self.kept
            .get(&(recipient.clone(), id))
            .is_some_and(|k| !k.ours || self.enough(k.elsewhere.len()).is_ok())
    }

    /// Keeps an accepted channel clip in the cluster's channel history, so
    /// members who were offline get it from any relay, and announces it to
    /// the relays of the channel's members (any whose live run broke take
    /// it from there). Cut off, the channel is marked: its history here is
    /// compared with the cluster's when the link is back.
    pub async fn keep_history(
        &self,
        channel: &str,
        clip: &Arc<StoredClip>,
    ) -> Result<(), ClusterError> {
        let r = self.put_history(channel, clip).await;
        self.note_held(clip.meta.id, r.is_err().then_some(false));
        if r.is_err()
            && let Ok(mut d) = self.dirty.lock()
        {
            d.insert(channel.to_owned());
        }
        r.map(|_| ())
    }

    /// Publishes a channel clip to the cluster history and announces it;
    /// returns whether the history had it already.
    pub(super) async fn put_history(
        &self,
        channel: &str,
        clip: &StoredClip,
    ) -> Result<bool, ClusterError> {
        let Copies {
            seq,
            duplicate,
            elsewhere,
            rest,
        } = self.publish_copies(Kind::History(channel), clip).await?;
        self.finish_late(rest, None).await;
        let kept = Relayed::HistoryKept {
            clip: clip.meta.id,
            seq,
        };
        let _ = self.publish(&channel_subject(channel), kept).await;
        self.enough(elsewhere.len())?;
        Ok(duplicate)
    }

    /// Whether `id` is held here (not everywhere it should be).
    pub(super) fn is_held(&self, id: ClipId) -> bool {
        self.held.lock().is_ok_and(|h| h.contains_key(&id))
    }

    /// Counts `id` as held here only (`Some(direct)`: JetStream could not
    /// take it) or no longer (`None`).
    pub(super) fn note_held(&self, id: ClipId, held: Option<bool>) {
        let Ok(mut h) = self.held.lock() else {
            return;
        };
        match held {
            Some(direct) => {
                h.insert(id, direct);
            }
            None => {
                h.remove(&id);
            }
        }
    }

    /// Every clip of `stream` on `subject` (all subjects: `None`), in
    /// order.
    pub(super) async fn read(
        &self,
        stream: &stream::Stream,
        subject: Option<String>,
    ) -> Result<Vec<Read>, ClusterError> {
        let mut out = Vec::new();
        self.consume(
            stream,
            subject,
            None,
            false,
            |seq, m| match StoredClip::from_record(&m.payload) {
                Some(c) => out.push((seq, origin_of(m.headers.as_ref()), c)),
                None => warn!(seq, "cluster: unreadable stored clip skipped"),
            },
        )
        .await?;
        Ok(out)
    }

    /// Feeds `each` every message of `stream` on `subject` (all: `None`),
    /// from its start or from `since`, in order, with its sequence; with
    /// `headers_only` the messages carry no payload.
    pub(super) async fn consume(
        &self,
        stream: &stream::Stream,
        subject: Option<String>,
        since: Option<SystemTime>,
        headers_only: bool,
        mut each: impl FnMut(u64, &async_nats::Message),
    ) -> Result<(), ClusterError> {
        use consumer::{AckPolicy, DeliverPolicy, pull};
        let deliver_policy = match since {
            Some(t) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from(t),
            },
            None => DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: subject.unwrap_or_default(),
                deliver_policy,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                headers_only,
                ..Default::default()
            })
            .await
            .map_err(nats("reading a JetStream stream"))?;
        let mut left = consumer.cached_info().num_pending;
        while left > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(left.min(256) as usize)
                .messages()
                .await
                .map_err(nats("fetching from JetStream"))?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| ClusterError::Nats {
                    what: "fetching from JetStream".into(),
                    source: e,
                })?;
                got += 1;
                let seq = m
                    .info()
                    .map_err(|e| ClusterError::Nats {
                        what: "a JetStream message's info".into(),
                        source: e,
                    })?
                    .stream_sequence;
                each(seq, &m.message);
            }
            if got == 0 {
                break;
            }
            left = left.saturating_sub(got);
        }
        Ok(())
    }

    /// Loads what JetStream holds for `session`'s user into this relay's
    /// store (in memory: JetStream keeps it durably); returns how many
    /// were new here.
    pub(super) async fn load_kept(
        &self,
        shared: &Shared,
        session: &Session,
    ) -> Result<usize, ClusterError> {
        let mut new = 0;
        for (seq, origin, clip) in self
            .read(&self.stream, Some(self.names.store(&session.user)))
            .await?
        {
            if self
                .take_kept(shared, session, seq, origin, Arc::new(clip))
                .await
            {
                new += 1;
            }
        }
        Ok(new)
    }

    /// Takes into this relay's history the clips of `session`'s channels'
    /// cluster history it does not have (said on other relays while the
    /// user was away); returns how many.
    pub(super) async fn load_history(
        &self,
        shared: &Shared,
        session: &Session,
    ) -> Result<usize, ClusterError> {
        let mut new = 0;
        for ch in session.channels.keys() {
            for (_, _, clip) in self
                .read(&self.history, Some(self.names.history(ch)))
                .await?
            {
                if self.adopt(shared, ch, Arc::new(clip)).await {
                    new += 1;
                }
            }
        }
        Ok(new)
    }

    /// A local recipient acked `clip`: JetStream's copy for it goes; if it
    /// came from another relay as a direct clip, that relay drops its
    /// stored copy too. Never waits (see [`Cluster::chore`]).
    pub fn acked(&self, clip: &ClipId, recipient: &Arc<str>) {
        if let Some(w) = self.awaiting.get(clip) {
            w.notify_waiters();
        }
        // A direct clip held here only, delivered here: the cluster needs
        // it no more.
        if let Ok(mut h) = self.held.lock()
            && h.get(clip) == Some(&true)
        {
            h.remove(clip);
        }
        if let Some((_, k)) = self.kept.remove(&(recipient.clone(), *clip)) {
            let seq = k.seq;
            self.chore(Chore::Delete { region: None, seq });
            for (i, seq) in k.elsewhere {
                self.chore(Chore::Delete {
                    region: Some(i),
                    seq,
                });
            }
        }
        if let Some((_, (origin, _))) = self.acks_to.remove(clip) {
            self.chore(Chore::Ack {
                origin,
                clip: *clip,
                recipient: recipient.clone(),
            });
        }
    }

    /// Deletes a delivered clip from the stream of `region` (`None`: this
    /// one).
    pub(super) async fn delete_kept(&self, region: Option<usize>, seq: u64) {
        let Some(js) = self.js_of(region) else {
            return;
        };
        match delete_message(js, STREAM, seq).await {
            Ok(v) if v.get("error").is_none() => {}
            Ok(v) => debug!(seq, error = %v["error"], "cluster: stored clip already gone"),
            Err(e) => debug!(seq, error = %e, "cluster: stored clip not deleted (it expires)"),
        }
    }
}
