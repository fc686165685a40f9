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

    pub(super) async fn put_push(
        &self,
        user: &str,
        entry: &crate::push::book::Record,
    ) -> Result<(), ClusterError> {
        let payload = serde_json::to_vec(entry).map_err(|e| ClusterError::Nats {
            what: "encoding a push entry".into(),
            source: Box::new(e),
        })?;
        let publish = async {
            self.js
                .publish(self.names.push(user), Bytes::from(payload))
                .await
                .map_err(nats("sharing a push entry"))?
                .await
                .map_err(nats("JetStream's ack of a push entry"))
        };
        self.while_linked(publish)
            .await
            .unwrap_or(Err(ClusterError::NotConnected))
            .map(|_| ())
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
