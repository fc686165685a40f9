//! Several regions: each its own NATS cluster and JetStream domain, joined
//! by leaf nodes. An accepted clip is written to this region's JetStream
//! and, at once, to every other region's (by its domain); `Accepted` waits
//! for `replicas_in_other_regions` of those copies. A channel's floor is
//! held in its home region. docs/cluster.md "Regions".

use super::*;

/// How often held clips are tried again at the other regions.
const COPY_RETRY: Duration = Duration::from_secs(2);

/// Where a clip goes in each region's JetStream.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind<'a> {
    /// A direct clip, for this recipient (`PTT_CLIPS`).
    Store(&'a str),
    /// A channel clip, in this channel's history (`PTT_HISTORY`).
    History(&'a str),
}

impl Kind<'_> {
    fn subject(self, names: &Names) -> String {
        match self {
            Kind::Store(user) => names.store(user),
            Kind::History(channel) => names.history(channel),
        }
    }
}

/// A clip written to JetStream: its sequence in this region's stream,
/// whether that stream had it already, and its sequences in the other
/// regions that took a copy (by index in `others`).
#[derive(Debug)]
pub(super) struct Copies {
    pub seq: u64,
    pub duplicate: bool,
    pub elsewhere: Vec<(usize, u64)>,
}

/// The region of `regions` (the same list on every relay) that holds
/// `channel`'s floor: picked by a hash of the name, so every relay picks
/// the same one (FNV-1a, stable across builds and machines).
pub(super) fn home_of<'a>(regions: &'a [String], channel: &str) -> Option<&'a str> {
    if regions.is_empty() {
        return None;
    }
    let h = channel.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let i = usize::try_from(h % regions.len() as u64).unwrap_or(0);
    regions.get(i).map(String::as_str)
}

impl Cluster {
    /// Creates the streams of every other region that lacks them (a
    /// region whose relays have not started yet). A region that does not
    /// answer is passed over: its relays, or this one's next link, make
    /// them.
    pub(super) async fn open_other_regions(&self) {
        for r in &self.others {
            for c in &r.configs {
                if let Err(e) = r.js.get_or_create_stream(c.clone()).await {
                    debug!(region = %r.name, stream = %c.name, error = %e,
                        "cluster: another region's stream not reached");
                    break;
                }
            }
        }
    }

    /// Writes `clip` to JetStream in this region and every other one at
    /// once (none with `replicas_in_other_regions` = 0), its id as the message id (a region that has it keeps it
    /// once) and this relay as its origin, and waits for their acks. Cut
    /// off, fails at once instead of holding the caller for JetStream's
    /// timeout; a failure in this region fails the whole; another
    /// region's is left out of `elsewhere`.
    pub(super) async fn publish_copies(
        &self,
        kind: Kind<'_>,
        clip: &StoredClip,
    ) -> Result<Copies, ClusterError> {
        if !self.connected() {
            return Err(ClusterError::NotConnected);
        }
        let payload = Bytes::from(clip.to_record());
        let (id, origin) = (clip.meta.id.to_hex(), format!("{:016x}", self.id));
        let publish = |js: &jetstream::Context, subject: String| {
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(id.as_str())
                .header(ORIGIN_HEADER, origin.as_str());
            let js = js.clone();
            async move {
                js.send_publish(subject, msg)
                    .await
                    .map_err(nats("publishing a clip to JetStream"))?
                    .await
                    .map_err(nats("JetStream's ack of a clip"))
            }
        };
        let here = publish(&self.js, kind.subject(&self.names));
        // No copy elsewhere asked: none made (the clip lives in this
        // region only).
        let others = if self.copies == 0 {
            &[][..]
        } else {
            &self.others[..]
        };
        let there = futures_util::future::join_all(others.iter().enumerate().map(|(i, r)| {
            let p = publish(&r.js, kind.subject(&r.names));
            async move {
                match p.await {
                    Ok(a) => Some((i, a.sequence)),
                    Err(e) => {
                        debug!(region = %r.name, error = %e, "cluster: no copy in another region");
                        None
                    }
                }
            }
        }));
        let (here, there) = self
            .while_linked(futures_util::future::join(here, there))
            .await
            .ok_or(ClusterError::NotConnected)?;
        let here = here?;
        Ok(Copies {
            seq: here.sequence,
            duplicate: here.duplicate,
            elsewhere: there.into_iter().flatten().collect(),
        })
    }

    /// Whether `copies` reached as many other regions as
    /// `replicas_in_other_regions` asks.
    pub(super) fn enough(&self, copies: &Copies) -> Result<(), ClusterError> {
        if copies.elsewhere.len() >= self.copies {
            return Ok(());
        }
        Err(ClusterError::TooFewRegions {
            wanted: self.copies,
            reached: copies.elsewhere.len(),
        })
    }

    /// `channel`'s home region, where its floor is held, when it is
    /// another region (`None`: this one, also with one region).
    pub(super) fn floor_region(&self, channel: &str) -> Option<&Region> {
        let home = home_of(&self.regions, channel)?;
        self.others.iter().find(|r| r.name == home)
    }

    /// The JetStream context and subjects of `home` (`None`: this
    /// region's).
    pub(super) fn jetstream_of<'a>(
        &'a self,
        home: Option<&'a Region>,
    ) -> (&'a jetstream::Context, &'a Names) {
        home.map_or((&self.js, &self.names), |r| (&r.js, &r.names))
    }

    /// Whether held clips are due another try at the other regions (every
    /// [`COPY_RETRY`] while some are held, linked and with nothing else
    /// to do): a region that was unreachable may answer again without
    /// this relay's own link going.
    pub(super) fn copies_due(&self, last: &mut Instant) -> bool {
        if self.others.is_empty() || self.held() == 0 || last.elapsed() < COPY_RETRY {
            return false;
        }
        *last = Instant::now();
        true
    }

    /// Copies the held clips to the regions that lack them (direct clips,
    /// then the channels marked), once another region answers again (one
    /// request to each while none does).
    pub(super) async fn copy_held(&self, shared: &Shared) {
        let mut answers = false;
        for r in &self.others {
            if r.js.get_stream(STREAM).await.is_ok() {
                answers = true;
                break;
            }
        }
        if !answers {
            return;
        }
        let r = async {
            let direct = self.backfill_direct(shared).await?;
            let channel = self.backfill_channels(shared, false).await?;
            Ok::<_, ClusterError>(direct + channel)
        };
        match r.await {
            Ok(n) => debug!(
                n,
                held = self.held(),
                "cluster: held clips copied to other regions"
            ),
            Err(e) => debug!(error = %e, "cluster: held clips not copied yet"),
        }
    }

    /// The JetStream of `region` (`None`: this one).
    pub(super) fn js_of(&self, region: Option<usize>) -> Option<&jetstream::Context> {
        match region {
            None => Some(&self.js),
            Some(i) => self.others.get(i).map(|r| &r.js),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every relay picks the same home region for a channel, from the
    /// list alone; channels spread over the regions.
    #[test]
    fn a_channel_has_one_home_region() {
        let regions: Vec<String> = ["eu", "us", "asia"].map(String::from).to_vec();
        assert_eq!(home_of(&[], "ops"), None);
        assert_eq!(home_of(&regions[..1], "ops"), Some("eu"));
        let homes: Vec<_> = (0..300)
            .map(|i| home_of(&regions, &format!("channel {i}")).unwrap())
            .collect();
        for r in &regions {
            let n = homes.iter().filter(|h| **h == r).count();
            assert!((60..=140).contains(&n), "{r}: {n} of 300");
        }
        // Stable: the same name, the same home, in every build and on
        // every relay (FNV-1a's values, not a per-process hash).
        assert_eq!(home_of(&regions, "ops"), Some("eu"));
        assert_eq!(home_of(&regions, ""), Some("asia"));
    }
}
