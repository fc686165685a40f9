//! Channel floors cluster-wide: one holder per channel in a JetStream
//! key-value bucket, taken by compare-and-set.

use relay_core::router::FloorRule;

use super::*;

impl Cluster {
    /// Takes channel `channel`'s floor cluster-wide for `me`: free, held by
    /// the same user (a retry or a newer clip), or pre-empted by a
    /// priority talker (the holder's relay is told to cut its clip).
    pub(crate) async fn take_floor(
        &self,
        channel: &str,
        me: FloorRecord,
    ) -> Result<ClusterFloor, ClusterError> {
        // Cut off (or cut off meanwhile): fail at once (the relay then
        // decides alone) instead of holding the talker for JetStream's
        // timeout.
        self.while_linked(self.floor_cas(channel, me))
            .await
            .unwrap_or(Err(ClusterError::NotConnected))
    }

    pub(super) async fn floor_cas(
        &self,
        channel: &str,
        me: FloorRecord,
    ) -> Result<ClusterFloor, ClusterError> {
        let home = self.floor_region(channel);
        let (js, names) = self.jetstream_of(home);
        let subject = names.floor(channel);
        for _ in 0..8 {
            if let Some(seq) = self.put_floor(js, &subject, &me, 0).await? {
                return Ok(ClusterFloor::Granted { seq });
            }
            let cur = match self.last_floor(home, &subject).await {
                Ok(m) => m,
                // Released (or expired) meanwhile: try again.
                Err(_) => continue,
            };
            let held = FloorRecord::decode(&cur.payload);
            let holder = held.as_ref().map(|h| (h.user.as_str(), h.priority));
            let rule = FloorRule::of(holder, &me.user, me.priority);
            if let (FloorRule::Busy, Some(h)) = (rule, &held) {
                let holder = h.user.clone();
                return Ok(ClusterFloor::Busy { holder });
            }
            if let Some(seq) = self.put_floor(js, &subject, &me, cur.sequence).await? {
                if let (FloorRule::Preempts, Some(h)) = (rule, held)
                    && h.relay != self.id
                {
                    // Pre-empted on another relay: it cuts the clip there.
                    let cut = Relayed::Cut {
                        clip: h.clip,
                        code: ErrorCode::Preempted,
                    };
                    let _ = self.publish(&relay_subject(h.relay), cut).await;
                }
                return Ok(ClusterFloor::Granted { seq });
            }
        }
        Err(ClusterError::Contended(channel.to_owned()))
    }

    /// Publishes `me` as the floor's holder if the subject's last message
    /// is still `expect` (0: none). `None` when someone else got there
    /// first.
    pub(super) async fn put_floor(
        &self,
        js: &jetstream::Context,
        subject: &str,
        me: &FloorRecord,
        expect: u64,
    ) -> Result<Option<u64>, ClusterError> {
        use async_nats::jetstream::context::PublishErrorKind;
        let msg = jetstream::message::PublishMessage::build()
            .payload(me.encode())
            .expected_last_subject_sequence(expect);
        let ack = match js.send_publish(subject.to_owned(), msg).await {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(a) => Ok(Some(a.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(nats("taking a floor")(e)),
        }
    }

    /// Releases a floor taken at stream sequence `seq` (if it was taken
    /// over since, that message is gone already and this does nothing).
    /// Never waits: done by the chores' runner, when the link is up.
    pub fn release_floor(&self, channel: &str, seq: u64) {
        self.chore(Chore::ReleaseFloor {
            channel: channel.to_owned(),
            seq,
        });
    }

    /// The holder's message of a floor (`subject`) in the channel's home
    /// region (`None`: this one, whose stream is open already): `Err` when
    /// the floor is free.
    async fn last_floor(
        &self,
        home: Option<&Region>,
        subject: &str,
    ) -> Result<async_nats::jetstream::message::StreamMessage, ClusterError> {
        let opened;
        let floors = match home {
            None => &self.floors,
            Some(r) => {
                opened =
                    r.js.get_stream(FLOORS)
                        .await
                        .map_err(nats("opening a region's floors"))?;
                &opened
            }
        };
        floors
            .get_last_raw_message_by_subject(subject)
            .await
            .map_err(nats("reading a floor"))
    }
}
