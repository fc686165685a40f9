//! Push registrations shared between relays (PTT_PUSH), and the
//! presence and dedupe a cluster needs before pushing.

use super::*;

impl Cluster {
    /// Shares the push entries held while cut off.
    pub(super) async fn share_unshared(&self) -> Result<(), ClusterError> {
        let held: Vec<(String, crate::push::book::Record)> = self
            .push_unshared
            .lock()
            .map(|mut h| h.drain().collect())
            .unwrap_or_default();
        for (i, (user, entry)) in held.iter().enumerate() {
            if let Err(e) = self.put_push(user, entry).await {
                if let Ok(mut h) = self.push_unshared.lock() {
                    for (u, e) in &held[i..] {
                        h.entry(u.clone()).or_insert_with(|| e.clone());
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes `user`'s entry to this region's [`PUSH`] and, at once, to
    /// every other region's (a sleeping phone is then woken by whichever
    /// region serves its user when its own is gone). This region's write
    /// decides; a region that did not take it is noted, and copied to
    /// when it answers again ([`Cluster::copy_push`]).
    pub(super) async fn put_push(
        &self,
        user: &str,
        entry: &crate::push::book::Record,
    ) -> Result<(), ClusterError> {
        let payload = Bytes::from(serde_json::to_vec(entry).map_err(|e| ClusterError::Nats {
            what: "encoding a push entry".into(),
            source: Box::new(e),
        })?);
        let here = publish_push(&self.js, self.names.push(user), payload.clone());
        let there = futures_util::future::join_all(
            self.others
                .iter()
                .map(|r| publish_push(&r.js, r.names.push(user), payload.clone())),
        );
        let (here, there) = self
            .while_linked(futures_util::future::join(here, there))
            .await
            .ok_or(ClusterError::NotConnected)?;
        here?;
        if there.iter().any(Result::is_err)
            && let Ok(mut u) = self.push_elsewhere.lock()
        {
            u.insert(user.to_owned());
        }
        Ok(())
    }

    /// Whether some push entries wait for another region.
    pub(super) fn push_behind(&self) -> bool {
        self.push_elsewhere.lock().is_ok_and(|u| !u.is_empty())
    }

    /// Copies the push entries other regions missed to every other
    /// region, each as this region's [`PUSH`] holds it now (the newest,
    /// whatever was written meanwhile); what fails is kept for the next
    /// try.
    pub(super) async fn copy_push(&self) -> Result<usize, ClusterError> {
        let users: Vec<String> = self
            .push_elsewhere
            .lock()
            .map(|mut u| u.drain().collect())
            .unwrap_or_default();
        for (i, user) in users.iter().enumerate() {
            let copied = async {
                let last = self
                    .push
                    .get_last_raw_message_by_subject(&self.names.push(user))
                    .await
                    .map_err(nats("reading a push entry"))?;
                for r in &self.others {
                    publish_push(&r.js, r.names.push(user), last.payload.clone()).await?;
                }
                Ok::<_, ClusterError>(())
            };
            if let Err(e) = copied.await {
                if let Ok(mut u) = self.push_elsewhere.lock() {
                    u.extend(users[i..].iter().cloned());
                }
                return Err(e);
            }
        }
        Ok(users.len())
    }

    /// Keeps `pusher`'s book in step with every relay's registrations: the
    /// last entry of each user from [`PUSH`], then each change as it comes;
    /// again from the start after every lost link.
    pub fn mirror_push(
        self: &Arc<Self>,
        pusher: Arc<crate::push::Pusher>,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut link = me.link.subscribe();
            let mut waits = codec::retry::Backoff {
                min: Duration::from_millis(200),
                max: Duration::from_secs(5),
            }
            .attempts();
            loop {
                tokio::select! {
                    r = link.wait_for(|s| s.up) => if r.is_err() { return },
                    () = stop.cancelled() => return,
                }
                let read = me.while_linked(me.follow_push(&pusher, &mut waits));
                tokio::select! {
                    r = read => {
                        if let Some(Err(e)) = r {
                            debug!(error = %e, "cluster: push entries not followed; again shortly");
                        }
                    }
                    () = stop.cancelled() => return,
                }
                tokio::time::sleep(waits.next(rand::random())).await;
            }
        });
    }

    pub(super) async fn follow_push(
        &self,
        pusher: &crate::push::Pusher,
        waits: &mut codec::retry::Attempts,
    ) -> Result<(), ClusterError> {
        use consumer::{DeliverPolicy, push};
        let consumer = self
            .push
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: self.names.all("push"),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(nats("following push entries"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(nats("following push entries"))?;
        waits.reset();
        while let Some(m) = messages.next().await {
            let m = m.map_err(nats("following push entries"))?;
            match serde_json::from_slice::<crate::push::book::Record>(&m.payload) {
                Ok(r @ crate::push::book::Record::User { .. }) => pusher.apply_shared(r).await,
                _ => warn!(subject = %m.subject, "cluster: unreadable push entry skipped"),
            }
        }
        Ok(())
    }
}

/// One push entry into a region's [`PUSH`], acked.
async fn publish_push(
    js: &jetstream::Context,
    subject: String,
    payload: Bytes,
) -> Result<(), ClusterError> {
    js.publish(subject, payload)
        .await
        .map_err(nats("sharing a push entry"))?
        .await
        .map_err(nats("JetStream's ack of a push entry"))
        .map(|_| ())
}

#[async_trait::async_trait]
impl crate::push::PushCluster for Cluster {
    /// Asks on the user's subject: a relay with a session of the user
    /// answers; "no responders" (or no answer) means nowhere. Cut off, the
    /// relay cannot tell and pushes (a woken phone finds itself connected).
    async fn present(&self, user: &str) -> bool {
        if !self.connected() {
            return false;
        }
        let ask = self
            .client
            .request(user_subject(user), Relayed::Present.encode());
        matches!(
            tokio::time::timeout(Duration::from_millis(500), ask).await,
            Ok(Ok(_))
        )
    }

    /// Takes the push of `device` for `clip` for this relay: the first
    /// relay to write it to [`PUSHED`] (message id = clip and device)
    /// pushes; a duplicate means another did. Cut off: this relay pushes.
    async fn first_push(&self, clip: ClipId, device: &str) -> bool {
        let h = ring::digest::digest(&ring::digest::SHA256, device.as_bytes());
        let key: String = h.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let msg = jetstream::message::PublishMessage::build()
            .payload(Bytes::new())
            .message_id(format!("{}-{key}", clip.to_hex()));
        let publish = async {
            self.js
                .send_publish(self.names.pushed(&clip), msg)
                .await
                .map_err(nats("claiming a push"))?
                .await
                .map_err(nats("claiming a push"))
        };
        match self.while_linked(publish).await {
            Some(Ok(ack)) => !ack.duplicate,
            _ => true,
        }
    }

    /// Writes the user's whole entry for every relay (held while cut off).
    async fn share(&self, user: &str, entry: crate::push::book::Record) {
        if self.put_push(user, &entry).await.is_err()
            && let Ok(mut h) = self.push_unshared.lock()
        {
            h.insert(user.to_owned(), entry);
        }
    }
}
