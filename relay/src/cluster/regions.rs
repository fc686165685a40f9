//! Several regions: each its own NATS cluster and JetStream domain, joined
//! by leaf nodes. An accepted clip is written to this region's JetStream
//! and, at once, to every other region's (by its domain); `Accepted` waits
//! for the first `replicas_in_other_regions` of those copies, and the rest
//! are finished beside ([`Cluster::run_late`]). A channel's floor is held
//! in its home region. docs/cluster.md "Regions".

use futures_util::stream::FuturesUnordered;

use super::*;

/// One copy of a clip into another region: its index in `others` and its
/// sequence there, or `None` if that region did not take it.
pub(super) type Copy = BoxFuture<'static, Option<(usize, u64)>>;

/// Copies still being written when their clip was accepted (more regions
/// than `replicas_in_other_regions`), and the direct clip they are of, if
/// one (its copies are deleted at its ack, so their sequences are noted).
pub(super) struct Late {
    copies: FuturesUnordered<Copy>,
    direct: Option<(Arc<str>, ClipId)>,
}

/// Awaits `copies` until `n` are written or every one has ended: those
/// written, and those still being written.
async fn first_copies<T>(
    mut copies: FuturesUnordered<BoxFuture<'static, Option<T>>>,
    n: usize,
) -> (Vec<T>, FuturesUnordered<BoxFuture<'static, Option<T>>>) {
    let mut written = Vec::new();
    while written.len() < n {
        match copies.next().await {
            Some(Some(c)) => written.push(c),
            Some(None) => {}
            None => break,
        }
    }
    (written, copies)
}

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
/// whether that stream had it already, its sequences in the other regions
/// that took a copy (by index in `others`), and the copies still being
/// written (handed to [`Cluster::finish_late`]).
pub(super) struct Copies {
    pub seq: u64,
    pub duplicate: bool,
    pub elsewhere: Vec<(usize, u64)>,
    pub rest: Option<FuturesUnordered<Copy>>,
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
    /// once (none with `replicas_in_other_regions` = 0), its id as the
    /// message id (a region that has it keeps it once) and this relay as
    /// its origin, and waits for this region's ack and the first
    /// `replicas_in_other_regions` others' (all, if fewer answer): a slow
    /// third region does not hold `Accepted`. Cut off, fails at once
    /// instead of holding the caller for JetStream's timeout; a failure in
    /// this region fails the whole; another region's is left out of
    /// `elsewhere`.
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
        if others.is_empty() {
            // One region (or no copy asked): this region's write alone,
            // with nothing to set up for copies (the clustered relay's
            // common case, per clip).
            let here = self
                .while_linked(here)
                .await
                .ok_or(ClusterError::NotConnected)??;
            return Ok(Copies {
                seq: here.sequence,
                duplicate: here.duplicate,
                elsewhere: Vec::new(),
                rest: None,
            });
        }
        let there: FuturesUnordered<Copy> = others
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let p = publish(&r.js, kind.subject(&r.names));
                let name = r.name.clone(); // an `Arc<str>`: no copy per clip
                Box::pin(async move {
                    match p.await {
                        Ok(a) => Some((i, a.sequence)),
                        Err(e) => {
                            debug!(region = %name, error = %e, "cluster: no copy in another region");
                            None
                        }
                    }
                }) as Copy
            })
            .collect();
        let (here, (elsewhere, rest)) = self
            .while_linked(futures_util::future::join(
                here,
                first_copies(there, self.copies),
            ))
            .await
            .ok_or(ClusterError::NotConnected)?;
        let here = here?;
        Ok(Copies {
            seq: here.sequence,
            duplicate: here.duplicate,
            elsewhere,
            rest: (!rest.is_empty()).then_some(rest),
        })
    }

    /// Hands the copies of an accepted clip still being written to
    /// [`Cluster::run_late`] (or, when it has `cluster_backlog_clips`
    /// already, finishes them here). `direct`: the direct clip they are
    /// of, noted in `kept` already.
    pub(super) async fn finish_late(
        &self,
        rest: Option<FuturesUnordered<Copy>>,
        direct: Option<(Arc<str>, ClipId)>,
    ) {
        let Some(rest) = rest else {
            return;
        };
        let late = Late {
            copies: rest,
            direct,
        };
        if let Err(mpsc::error::TrySendError::Full(l) | mpsc::error::TrySendError::Closed(l)) =
            self.late.try_send(late)
        {
            let written = l.copies.filter_map(std::future::ready).collect().await;
            self.settle_late(l.direct, written);
        }
    }

    /// Finishes the late copies handed to it, all at once, until `stop`.
    pub(super) async fn run_late(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Late>,
        stop: CancellationToken,
    ) {
        let mut running = FuturesUnordered::new();
        loop {
            tokio::select! {
                l = rx.recv() => match l {
                    Some(Late { copies, direct }) => running.push(async move {
                        let written: Vec<_> = copies.filter_map(std::future::ready).collect().await;
                        (direct, written)
                    }),
                    None => return,
                },
                Some((direct, written)) = running.next(), if !running.is_empty() => {
                    self.settle_late(direct, written);
                }
                () = stop.cancelled() => return,
            }
        }
    }

    /// Notes where a direct clip's late copies were written, so its ack
    /// deletes them; if it was acked meanwhile, deletes them now.
    fn settle_late(&self, direct: Option<(Arc<str>, ClipId)>, written: Vec<(usize, u64)>) {
        let Some(key) = direct else {
            return;
        };
        if let Some(mut k) = self.kept.get_mut(&key) {
            k.elsewhere.extend(written);
            return;
        }
        for (i, seq) in written {
            self.chore(Chore::Delete {
                region: Some(i),
                seq,
            });
        }
    }

    /// Whether copies in `reached` other regions are as many as
    /// `replicas_in_other_regions` asks.
    pub(super) fn enough(&self, reached: usize) -> Result<(), ClusterError> {
        if reached >= self.copies {
            return Ok(());
        }
        Err(ClusterError::TooFewRegions {
            wanted: self.copies,
            reached,
        })
    }

    /// `channel`'s home region, where its floor is held, when it is
    /// another region (`None`: this one, also with one region).
    pub(super) fn floor_region(&self, channel: &str) -> Option<&Region> {
        let home = home_of(&self.regions, channel)?;
        self.others.iter().find(|r| &*r.name == home)
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
        let behind = self.held() > 0 || self.push_behind();
        if self.others.is_empty() || !behind || last.elapsed() < COPY_RETRY {
            return false;
        }
        *last = Instant::now();
        true
    }

    /// Copies the held clips to the regions that lack them (direct clips,
    /// then the channels marked) and the push entries they missed, once
    /// another region answers again (one request to each while none
    /// does).
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
            let push = self.copy_push().await?;
            Ok::<_, ClusterError>((direct + channel, push))
        };
        match r.await {
            Ok((n, push)) => debug!(
                n,
                push,
                held = self.held(),
                "cluster: held clips and push entries copied to other regions"
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
    use tokio::sync::oneshot;

    type Told = (
        Vec<oneshot::Sender<Option<u32>>>,
        FuturesUnordered<BoxFuture<'static, Option<u32>>>,
    );

    /// Copies that end when told: `Some(n)` written, `None` refused.
    fn copies(n: usize) -> Told {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..n).map(|_| oneshot::channel()).unzip();
        let futs = rx
            .into_iter()
            .map(|r| {
                Box::pin(async move { r.await.ok().flatten() }) as BoxFuture<'static, Option<u32>>
            })
            .collect();
        (tx, futs)
    }

    /// `Accepted` waits for the first copies it asks for, not for the
    /// slowest region; a refusal does not count; the rest go on.
    #[tokio::test]
    async fn the_first_copies_asked_for_are_enough() {
        let (tx, futs) = copies(3);
        let mut tx = tx.into_iter();
        let (refuses, slow, quick) = (tx.next().unwrap(), tx.next().unwrap(), tx.next().unwrap());
        refuses.send(None).unwrap();
        quick.send(Some(3)).unwrap();
        let (written, rest) = first_copies(futs, 1).await;
        assert_eq!(written, vec![3]);
        assert_eq!(rest.len(), 1, "the slow region's copy goes on");
        slow.send(Some(2)).unwrap();
        let late: Vec<_> = rest.collect().await;
        assert_eq!(late, vec![Some(2)]);

        // More asked for than can be written: every copy's end, and those
        // written.
        let (tx, futs) = copies(2);
        let mut tx = tx.into_iter();
        tx.next().unwrap().send(Some(1)).unwrap();
        tx.next().unwrap().send(None).unwrap();
        let (written, rest) = first_copies(futs, 2).await;
        assert_eq!((written, rest.len()), (vec![1], 0));

        // None asked for: nothing waited for.
        let (_tx, futs) = copies(2);
        let (written, rest) = first_copies(futs, 0).await;
        assert_eq!((written.len(), rest.len()), (0, 2));
    }

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
