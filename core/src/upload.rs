//! Uploads of clips: which attempt of a clip id runs, how far behind real
//! time an upload may fall, and how its stream must end.

use std::sync::Arc;
use std::time::Duration;

use crate::hash::DashMap;
use codec::ErrorCode;
use codec::wire::ClipId;

use crate::refusal::Refusal;

/// The uploads running now, by clip id. Generic over what stops one (`T`):
/// the caller stops what `begin` hands back.
pub struct Uploads<T> {
    running: DashMap<ClipId, Running<T>>,
}

struct Running<T> {
    sender: Arc<str>,
    upload_no: u64,
    stop: T,
}

/// The answer to [`Uploads::begin`].
#[derive(Debug, PartialEq, Eq)]
pub enum Begin<T> {
    /// No other attempt of this id runs: this one does.
    Started,
    /// An attempt of this id by the same sender was running: a stale one
    /// (its connection is dying, the client retried). This one takes over;
    /// the caller stops the old one with [`Refusal::superseded`].
    TookOver(T),
    /// Another sender's upload holds this id: refused
    /// ([`Refusal::conflict`]).
    Conflict,
}

impl<T: Clone> Default for Uploads<T> {
    fn default() -> Self {
        Self {
            running: DashMap::default(),
        }
    }
}

impl<T: Clone> Uploads<T> {
    /// Upload `upload_no` of `id` by `sender` begins, stopped through
    /// `stop`.
    pub fn begin(&self, id: ClipId, sender: &Arc<str>, upload_no: u64, stop: T) -> Begin<T> {
        let new = Running {
            sender: sender.clone(),
            upload_no,
            stop,
        };
        match self.running.entry(id) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().sender != *sender {
                    return Begin::Conflict;
                }
                let old = e.insert(new);
                Begin::TookOver(old.stop)
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(new);
                Begin::Started
            }
        }
    }

    /// What stops the running upload of `id`, if one runs.
    pub fn stop_of(&self, id: &ClipId) -> Option<T> {
        self.running.get(id).map(|r| r.stop.clone())
    }

    /// Upload `upload_no` of `id` ended; a newer attempt that took over
    /// stays.
    pub fn end(&self, id: ClipId, upload_no: u64) {
        self.running.remove_if(&id, |_, r| r.upload_no == upload_no);
    }
}

/// An upload must keep up with real time: once the time since its start
/// passes its audio so far plus `max_lag`, it is refused (a trickle cannot
/// hold a floor or a listener).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub max_lag: Duration,
}

impl Pace {
    /// The time since the start at which an upload with `samples` of audio
    /// (48 kHz) is too far behind.
    pub fn allowed(&self, samples: u64) -> Duration {
        Duration::from_millis(samples / 48) + self.max_lag
    }

    /// `elapsed` since the start with `samples` of audio in: on time, or
    /// refused (`upload_idle_timeout`).
    pub fn check(&self, elapsed: Duration, samples: u64) -> Result<(), Refusal> {
        if elapsed < self.allowed(samples) {
            return Ok(());
        }
        Err(Refusal::new(
            ErrorCode::UploadIdleTimeout,
            format!(
                "upload more than {:?} behind real time ({} ms of audio in {elapsed:?})",
                self.max_lag,
                samples / 48,
            ),
        ))
    }
}

/// An upload's stream finished: whole only if its end record came and
/// nothing followed it (`leftover` bytes after the end).
pub fn finished<E>(end: Option<E>, leftover: usize) -> Result<E, Refusal> {
    match end {
        Some(e) if leftover == 0 => Ok(e),
        Some(_) => Err(Refusal::new(
            ErrorCode::ProtocolViolation,
            "bytes after the clip end",
        )),
        None => Err(Refusal::new(
            ErrorCode::ProtocolViolation,
            "stream finished before the clip end",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: ClipId = ClipId([7; 16]);

    /// A retry by the same sender takes over the running attempt (whose
    /// stop comes back to be used); the stale attempt's end leaves the new
    /// one registered.
    #[test]
    fn a_retry_by_the_same_sender_takes_over() {
        let u = Uploads::default();
        let alice: Arc<str> = "alice".into();
        assert_eq!(u.begin(ID, &alice, 1, "stop-1"), Begin::Started);
        assert_eq!(u.begin(ID, &alice, 2, "stop-2"), Begin::TookOver("stop-1"));
        u.end(ID, 1);
        assert_eq!(u.stop_of(&ID), Some("stop-2"), "the newer attempt stays");
        u.end(ID, 2);
        assert_eq!(u.stop_of(&ID), None, "nothing runs");
    }

    /// Another sender cannot take an id in use, and the one running is not
    /// disturbed.
    #[test]
    fn another_senders_id_is_a_conflict() {
        let u = Uploads::default();
        let (alice, mallory): (Arc<str>, Arc<str>) = ("alice".into(), "mallory".into());
        assert_eq!(u.begin(ID, &alice, 1, 1), Begin::Started);
        assert_eq!(u.begin(ID, &mallory, 2, 2), Begin::Conflict);
        assert_eq!(u.stop_of(&ID), Some(1));
        u.end(ID, 2);
        assert_eq!(u.stop_of(&ID), Some(1), "a refused attempt ends nothing");
    }

    /// The lag rule: the audio so far plus `max_lag`, and not a
    /// millisecond more.
    #[test]
    fn an_upload_behind_real_time_by_more_than_the_lag_is_refused() {
        let pace = Pace {
            max_lag: Duration::from_secs(2),
        };
        let s = |ms: u64| ms * 48;
        assert!(pace.check(Duration::from_millis(2_999), s(1_000)).is_ok());
        let r = pace.check(Duration::from_secs(3), s(1_000)).unwrap_err();
        assert_eq!(r.code, ErrorCode::UploadIdleTimeout);
        assert!(r.reason.contains("1000 ms of audio"), "{}", r.reason);
        // A burst ahead of real time is never refused for it.
        assert!(pace.check(Duration::ZERO, s(60_000)).is_ok());
        assert_eq!(pace.allowed(s(500)), Duration::from_millis(2_500));
    }

    #[test]
    fn a_stream_is_whole_only_with_its_end_and_nothing_after() {
        assert_eq!(finished(Some(3), 0), Ok(3));
        let after = finished(Some(3), 1).unwrap_err();
        assert_eq!(after.code, ErrorCode::ProtocolViolation);
        assert!(after.reason.contains("after the clip end"));
        let early = finished::<u8>(None, 0).unwrap_err();
        assert!(early.reason.contains("before the clip end"));
    }
}
