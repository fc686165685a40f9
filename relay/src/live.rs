//! A clip in flight: its validated packet records as they arrive, shared by
//! every live recipient. Each recipient's writer keeps only an index into
//! the shared segments, so fan-out costs no copy and no per-recipient
//! queue: a slow recipient just reads further behind, and its memory is the
//! clip's own (bounded by `max_clip_bytes`).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use codec::ErrorCode;
use tokio::sync::watch;

use crate::store::{ClipMeta, StoredClip};

/// A live clip's lock was poisoned (a thread panicked while holding it):
/// its bytes cannot be trusted whole, so the clip is refused rather than
/// stored short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("live clip state lost (a thread panicked while holding its lock)")]
pub struct Poisoned;

/// How a live clip ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Still arriving.
    Open,
    /// Stored; recipients may finish their streams.
    Complete(Arc<StoredClip>),
    /// Refused or abandoned: recipients reset their streams with this code.
    Cut(ErrorCode),
}

/// A run of validated packet records, as it arrived.
struct Segment {
    bytes: Bytes,
    packets: u64,
    /// When it was read off the sender's stream (for the hop latency).
    at: std::time::Instant,
}

struct Inner {
    segments: Vec<Segment>,
    outcome: Outcome,
}

pub struct LiveClip {
    pub meta: Arc<ClipMeta>,
    /// `Delivery` header with `live = true`, encoded once.
    pub header: Bytes,
    inner: Mutex<Inner>,
    /// Bumped on every change; writers wait on it.
    version: watch::Sender<u64>,
}

impl LiveClip {
    pub fn new(meta: Arc<ClipMeta>) -> Arc<Self> {
        Arc::new(Self {
            header: meta.delivery_header(true),
            meta,
            inner: Mutex::new(Inner {
                segments: Vec::new(),
                outcome: Outcome::Open,
            }),
            version: watch::Sender::new(0),
        })
    }

    /// Applies a change while the clip is open; once it has an outcome
    /// (complete or cut) that outcome is final and later changes are
    /// ignored, without waking the writers.
    fn update(&self, f: impl FnOnce(&mut Inner)) -> Result<(), Poisoned> {
        let mut g = self.inner.lock().map_err(|_| Poisoned)?;
        if matches!(g.outcome, Outcome::Open) {
            f(&mut g);
            drop(g);
            self.version.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    /// Appends validated packet records (`packets` of them). An error
    /// means the clip is lost: refuse its upload (its readers see a cut).
    pub fn push(&self, segment: Bytes, packets: u64) -> Result<(), Poisoned> {
        let seg = Segment {
            bytes: segment,
            packets,
            at: std::time::Instant::now(),
        };
        self.update(|g| g.segments.push(seg))
    }

    /// The clip is whole (stored, or being stored by a store that keeps
    /// early acks): writers send the end record.
    /// (With a poisoned lock the readers already see a cut.)
    pub fn complete(&self, clip: Arc<StoredClip>) {
        let _ = self.update(|g| g.outcome = Outcome::Complete(clip));
    }

    /// The clip will not complete.
    pub fn cut(&self, code: ErrorCode) {
        let _ = self.update(|g| g.outcome = Outcome::Cut(code));
    }

    /// All packet records so far, concatenated (one copy, at store time).
    pub fn body(&self) -> Result<Bytes, Poisoned> {
        let g = self.inner.lock().map_err(|_| Poisoned)?;
        Ok(match g.segments.as_slice() {
            [] => Bytes::new(),
            [one] => one.bytes.clone(),
            many => {
                let mut b =
                    bytes::BytesMut::with_capacity(many.iter().map(|s| s.bytes.len()).sum());
                for s in many {
                    b.extend_from_slice(&s.bytes);
                }
                b.freeze()
            }
        })
    }

    /// A reader positioned at the first segment.
    pub fn reader(self: &Arc<Self>) -> LiveReader {
        LiveReader {
            clip: self.clone(),
            next: 0,
            changes: self.version.subscribe(),
        }
    }
}

/// One recipient's position in a [`LiveClip`].
pub struct LiveReader {
    clip: Arc<LiveClip>,
    next: usize,
    changes: watch::Receiver<u64>,
}

/// Segments a reader has not written yet.
pub struct Batch {
    /// Cheap clones of the shared bytes.
    pub segs: Vec<Bytes>,
    /// Opus packets in them.
    pub packets: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// When the oldest of them arrived.
    pub since: std::time::Instant,
}

/// What a [`LiveReader`] has next.
pub enum Next {
    /// New segments to write.
    Data(Batch),
    Complete(Arc<StoredClip>),
    Cut(ErrorCode),
}

impl LiveReader {
    /// Waits for new segments or the end.
    pub async fn next(&mut self) -> Next {
        loop {
            self.changes.borrow_and_update();
            {
                let Ok(g) = self.clip.inner.lock() else {
                    return Next::Cut(ErrorCode::Internal);
                };
                if let Some(first) = g.segments.get(self.next) {
                    let mut b = Batch {
                        // Room for the header the writer may put first.
                        segs: Vec::with_capacity(g.segments.len() - self.next + 1),
                        packets: 0,
                        bytes: 0,
                        since: first.at,
                    };
                    for s in &g.segments[self.next..] {
                        b.segs.push(s.bytes.clone());
                        b.packets += s.packets;
                        b.bytes += s.bytes.len() as u64;
                    }
                    self.next = g.segments.len();
                    return Next::Data(b);
                }
                match &g.outcome {
                    Outcome::Open => {}
                    Outcome::Complete(c) => return Next::Complete(c.clone()),
                    Outcome::Cut(code) => return Next::Cut(*code),
                }
            }
            if self.changes.changed().await.is_err() {
                // The clip was dropped without an outcome: treat as cut.
                return Next::Cut(ErrorCode::Internal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codec::ClipEnd;
    use codec::wire::{AudioFormat, ClipId, Target};

    fn meta() -> Arc<ClipMeta> {
        Arc::new(ClipMeta {
            id: ClipId([1; 16]),
            sender: "alice".into(),
            target: Target::User("bob".into()),
            format: AudioFormat::default(),
            created_ms: 0,
        })
    }

    #[tokio::test]
    async fn readers_see_every_segment_then_the_end() {
        let clip = LiveClip::new(meta());
        let mut early = clip.reader();
        clip.push(Bytes::from_static(b"a"), 1).unwrap();
        clip.push(Bytes::from_static(b"b"), 2).unwrap();
        let Next::Data(d) = early.next().await else {
            panic!()
        };
        assert_eq!(d.segs, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        assert_eq!((d.packets, d.bytes), (3, 2));
        let mut late = clip.reader();
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match early.next().await {
                    Next::Data(d) => got.extend(d.segs),
                    Next::Complete(_) => return (got, true),
                    Next::Cut(_) => return (got, false),
                }
            }
        });
        tokio::task::yield_now().await;
        clip.push(Bytes::from_static(b"c"), 1).unwrap();
        let stored = Arc::new(StoredClip::new(
            clip.meta.clone(),
            clip.body().unwrap(),
            ClipEnd {
                packet_count: 0,
                final_granule: 0,
            },
        ));
        assert_eq!(&stored.body[..], b"abc");
        clip.complete(stored);
        assert_eq!(
            waiter.await.unwrap(),
            (vec![Bytes::from_static(b"c")], true)
        );
        // A reader that joins late gets everything from the start.
        let Next::Data(d) = late.next().await else {
            panic!()
        };
        assert_eq!(d.segs.len(), 3);
        assert!(matches!(late.next().await, Next::Complete(_)));
    }

    /// The relay may complete a clip before its store append and then
    /// complete or cut it again by the usual path: the first outcome holds.
    #[tokio::test]
    async fn the_first_outcome_holds() {
        let clip = LiveClip::new(meta());
        let mut r = clip.reader();
        let whole = Arc::new(StoredClip::new(
            clip.meta.clone(),
            clip.body().unwrap(),
            ClipEnd {
                packet_count: 0,
                final_granule: 0,
            },
        ));
        clip.complete(whole.clone());
        clip.cut(ErrorCode::CutOff);
        clip.complete(whole);
        assert!(matches!(r.next().await, Next::Complete(_)));
    }

    #[tokio::test]
    async fn cut_is_final() {
        let clip = LiveClip::new(meta());
        let mut r = clip.reader();
        clip.cut(ErrorCode::CutOff);
        clip.push(Bytes::from_static(b"late"), 1).unwrap();
        assert!(matches!(r.next().await, Next::Cut(ErrorCode::CutOff)));
    }

    /// A lock poisoned by a panicking thread: the clip's bytes are an
    /// error, never an empty or short clip; readers see a cut.
    #[tokio::test]
    async fn a_poisoned_clip_is_an_error_not_an_empty_clip() {
        let clip = LiveClip::new(meta());
        clip.push(Bytes::from_static(b"a"), 1).unwrap();
        let c = clip.clone();
        let _ = std::thread::spawn(move || {
            let _g = c.inner.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert_eq!(clip.body(), Err(Poisoned));
        assert_eq!(clip.push(Bytes::from_static(b"b"), 1), Err(Poisoned));
        assert!(matches!(
            clip.reader().next().await,
            Next::Cut(ErrorCode::Internal)
        ));
    }
}
