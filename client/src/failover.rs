//! Which relay a client talks to, and when it gives one up: the failover
//! rule of `docs/protocol.md` ("Several relays"). [`Relays`] and
//! [`Liveness`] decide, sans-IO (what happened and `now` in, where to go
//! and how long to wait out); [`watch`] is the thin loop that carries them
//! out beside a served connection. The SDK and `client-sim send`/`listen`
//! use them.
//!
//! A client has a list of relays, its home first. It stays where it is
//! while the relay answers. A relay that does not answer (a connection
//! attempt that times out, a connection that heard nothing back for
//! [`Liveness`]'s limit) is left at once for the next in the list; a
//! connection the relay closed or reset (it restarted, it is going away)
//! is tried once more at the same relay first. Once every relay was tried
//! in a row without success, the client waits by the shared backoff
//! ([`codec::retry`]) and starts again from home. Away from home it tries
//! home again now and then (the same backoff) and goes back once home
//! answers.

use std::future::Future;
use std::time::{Duration, Instant};

use codec::retry::{Attempts, Backoff};

use crate::ClientError;

/// Why the connection to the current relay ended, or never began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// It did not answer: an attempt timed out, or the connection heard
    /// nothing back within the liveness limit (or QUIC's idle timeout).
    Unanswered,
    /// It answered and then ended the connection: a stateless reset (it
    /// restarted), a close, a refusal worth retrying. Tried once more.
    Closed,
    /// It said it is going away (`GoAway`): the next relay, after `hint`.
    GoingAway { hint: Duration },
}

/// What to do next: connect to `relays()[index]` after `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    pub index: usize,
    pub wait: Duration,
}

/// The relays of one client and where it is among them.
#[derive(Debug, Clone)]
pub struct Relays {
    list: Vec<String>,
    /// The shared backoff, for waits between rounds and tries of home.
    rule: Backoff,
    /// How soon a relay that stopped answering is left (docs/protocol.md).
    failover_after: Duration,
    current: usize,
    /// Relays tried in a row without a connection (this round).
    failed_in_row: usize,
    /// The last failure was `Closed` at `current` (one more try there).
    retry_here: bool,
    rounds: Attempts,
    /// Away from home: tries of home so far, and when the next is due.
    home_tries: Attempts,
    home_due: Option<Instant>,
}

impl Relays {
    /// `list`: the relays, home first (at least one). `backoff`: the
    /// shared rule for waits between rounds and between tries of home.
    /// `failover_after`: how soon one that stopped answering is left.
    pub fn new(list: Vec<String>, backoff: Backoff, failover_after: Duration) -> Relays {
        Relays {
            list,
            rule: backoff,
            failover_after,
            current: 0,
            failed_in_row: 0,
            retry_here: false,
            rounds: backoff.attempts(),
            home_tries: backoff.attempts(),
            home_due: None,
        }
    }

    pub fn relays(&self) -> &[String] {
        &self.list
    }

    /// The relay to connect to now.
    pub fn current(&self) -> &str {
        &self.list[self.current]
    }

    pub fn at_home(&self) -> bool {
        self.current == 0
    }

    /// Whether there is another relay to go to.
    pub fn several(&self) -> bool {
        self.list.len() > 1
    }

    /// How long one connection attempt may wait for an answer before the
    /// next relay is tried: `failover_after`, with another relay to try
    /// (`None`: one relay, the caller's own limit holds).
    pub fn attempt_limit(&self) -> Option<Duration> {
        self.several().then_some(self.failover_after)
    }

    /// Starts over from home, as a client that was away (asleep) does.
    pub fn start_over(&mut self) {
        self.current = 0;
        self.failed_in_row = 0;
        self.retry_here = false;
        self.rounds.reset();
        self.home_tries.reset();
        self.home_due = None;
    }

    /// Connected to the current relay (signed in).
    pub fn connected(&mut self, now: Instant, unit: f64) {
        self.failed_in_row = 0;
        self.retry_here = false;
        self.rounds.reset();
        if self.at_home() {
            self.home_due = None;
            self.home_tries.reset();
        } else if self.home_due.is_none() {
            self.home_due = Some(now + self.home_tries.next(unit));
        }
    }

    /// The connection to the current relay ended, or could not be made
    /// (`hint`: the relay's `retry_after`, if it gave one). `unit`:
    /// uniform random in 0..1 for the jitter.
    pub fn lost(&mut self, why: Lost, hint: Duration, unit: f64) -> Next {
        let min = codec::retry::jitter(self.rule.min, unit);
        match why {
            Lost::Closed if !self.retry_here => {
                // Once more here: it answered, it may be back at once.
                self.retry_here = true;
                return Next {
                    index: self.current,
                    wait: min.max(hint),
                };
            }
            Lost::GoingAway { hint } if self.list.len() == 1 => {
                return Next {
                    index: 0,
                    wait: codec::retry::jitter(hint, unit).max(min),
                };
            }
            _ => {}
        }
        self.retry_here = false;
        self.failed_in_row += 1;
        if self.failed_in_row >= self.list.len() {
            // Every relay tried: wait, then from home again.
            self.failed_in_row = 0;
            self.current = 0;
            return Next {
                index: 0,
                wait: self.rounds.next_after(hint, unit),
            };
        }
        self.current = (self.current + 1) % self.list.len();
        let wait = match why {
            Lost::GoingAway { hint } => codec::retry::jitter(hint, unit),
            _ => Duration::ZERO,
        };
        Next {
            index: self.current,
            wait,
        }
    }

    /// [`Relays::lost`] for a request that failed with `e`: no answer (an
    /// attempt timed out, the relay cannot be reached, QUIC's idle
    /// timeout), else an answer that was no (a close, a reset, a refusal,
    /// with its `retry_after`).
    pub fn lost_by(&mut self, e: &ClientError, unit: f64) -> Next {
        let (why, hint) = match e {
            ClientError::Connect(_) | ClientError::Unanswered(_) => (Lost::Unanswered, 0),
            ClientError::Rejected { retry_after_ms, .. } => (Lost::Closed, *retry_after_ms),
            _ => (Lost::Closed, 0),
        };
        self.lost(why, Duration::from_millis(hint), unit)
    }

    /// Away from home: when to try home again (`None` at home).
    pub fn home_due(&self) -> Option<Instant> {
        self.home_due.filter(|_| !self.at_home())
    }

    /// Home answered a try while away: it is current now.
    pub fn home_answered(&mut self, now: Instant, unit: f64) {
        self.current = 0;
        self.connected(now, unit);
    }

    /// Home did not answer a try: the next is later (the shared backoff).
    pub fn home_silent(&mut self, now: Instant, unit: f64) {
        self.home_due = Some(now + self.home_tries.next(unit));
    }
}

/// Whether a connection's relay still answers, from the connection's
/// counters: a relay that has left what this client sent (a keep-alive
/// PING, a clip's data, an ack) unanswered for `limit` is taken for gone.
/// Nothing is spent on it: it reads what the connection sends anyway.
#[derive(Debug, Clone)]
pub struct Liveness {
    limit: Duration,
    /// Datagrams received when last looked.
    heard: u64,
    /// Frames that ask for an answer, sent by then.
    asked: u64,
    /// Since when something asked has had no answer.
    unanswered_since: Option<Instant>,
}

impl Liveness {
    pub fn new(limit: Duration) -> Liveness {
        Liveness {
            limit,
            heard: 0,
            asked: 0,
            unanswered_since: None,
        }
    }

    /// Looks at the counters now (`heard`: datagrams received so far;
    /// `asked`: ack-eliciting frames sent so far). True: the relay is gone.
    pub fn observe(&mut self, now: Instant, heard: u64, asked: u64) -> bool {
        if heard != self.heard {
            self.heard = heard;
            self.asked = asked;
            self.unanswered_since = None;
            return false;
        }
        if asked != self.asked && self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
        self.unanswered_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.limit)
    }
}

/// Frames sent that ask the relay for an answer (every frame but ACK,
/// PADDING and CONNECTION_CLOSE elicits an ACK). Not only PINGs and
/// STREAM frames: a probe after a lost packet carries IMMEDIATE_ACK (with
/// the ACK frequency extension), a flow-control update MAX_STREAMS or
/// MAX_DATA; a client that had just received clips when its relay died
/// sends those first, and its keep-alive PING only after them.
fn asking(f: &quinn::FrameStats) -> u64 {
    f.ping
        + f.stream
        + f.immediate_ack
        + f.ack_frequency
        + f.crypto
        + f.datagram
        + f.max_data
        + f.max_stream_data
        + f.max_streams_bidi
        + f.max_streams_uni
        + f.new_connection_id
        + f.retire_connection_id
        + f.reset_stream
        + f.stop_sending
        + f.data_blocked
        + f.stream_data_blocked
        + f.streams_blocked_bidi
        + f.streams_blocked_uni
        + f.path_challenge
        + f.path_response
}

/// How often [`watch`] reads a connection's counters.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Why a connection [`watch`] found silent was given up, as the error a
/// request on it ends with.
pub fn silent() -> ClientError {
    ClientError::Unanswered("what was sent had no answer within half of failover_after".into())
}

/// What [`watch`] saw.
pub enum Watched {
    /// The relay left what was sent unanswered for the limit: give it up.
    Silent,
    /// Away from home, home answered a try: its connection.
    Home(Connected),
}

/// A signed-in connection and its events.
pub type Connected = (
    std::sync::Arc<crate::Client>,
    tokio::sync::mpsc::Receiver<crate::Event>,
);

/// Watches a served connection: resolves once its relay has been silent
/// for half of `failover_after` ([`Liveness`]), or, away from home, once
/// home answered a try. With one relay it never resolves (nowhere to go:
/// QUIC's idle timeout ends a dead connection). A try starts when one is
/// due ([`Relays::home_due`]) and `may_leave` says nothing would be cut
/// (asked again when home answered: if something started meanwhile, the
/// new connection is closed and home tried later); `try_home` connects to
/// the relay given (`None`: no answer). Pin it
/// once per connection and poll it beside the connection's events.
pub async fn watch<Fut>(
    conn: &quinn::Connection,
    relays: &mut Relays,
    may_leave: impl Fn() -> bool,
    mut try_home: impl FnMut(String) -> Fut,
) -> Watched
where
    Fut: Future<Output = Option<Connected>>,
{
    if !relays.several() {
        return std::future::pending().await;
    }
    let mut liveness = Liveness::new(relays.failover_after / 2);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let silent = |l: &mut Liveness| {
        let s = conn.stats();
        l.observe(Instant::now(), s.udp_rx.datagrams, asking(&s.frame_tx))
    };
    loop {
        tick.tick().await;
        if silent(&mut liveness) {
            return Watched::Silent;
        }
        let due = relays.home_due().is_some_and(|t| t <= Instant::now());
        if !due || !may_leave() {
            continue;
        }
        let attempt = try_home(relays.relays()[0].clone());
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                got = &mut attempt => match got {
                    // Something started meanwhile (a press, a clip to
                    // send): home is left for the next try.
                    Some(c) if !may_leave() => {
                        c.0.close();
                        relays.home_silent(Instant::now(), rand::random());
                        break;
                    }
                    Some(c) => return Watched::Home(c),
                    None => {
                        relays.home_silent(Instant::now(), rand::random());
                        break;
                    }
                },
                _ = tick.tick() => if silent(&mut liveness) {
                    return Watched::Silent;
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn next(index: usize, wait: Duration) -> Next {
        Next { index, wait }
    }

    fn relays(n: usize) -> Relays {
        let list = (0..n).map(|i| format!("r{i}:4433")).collect();
        Relays::new(
            list,
            Backoff {
                min: 250 * MS,
                max: 30 * 1000 * MS,
            },
            3000 * MS,
        )
    }

    #[test]
    fn an_unanswering_relay_is_left_at_once_for_the_next() {
        let mut r = relays(3);
        assert_eq!(r.current(), "r0:4433");
        let n = r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        assert_eq!(n, next(1, Duration::ZERO));
        assert_eq!(r.current(), "r1:4433");
        let n = r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        assert_eq!(n, next(2, Duration::ZERO));
    }

    #[test]
    fn after_a_whole_round_it_waits_and_starts_from_home() {
        let mut r = relays(2);
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        let n = r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        assert_eq!(n, next(0, 250 * MS));
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        // The second round waits twice as long (the shared backoff).
        let n = r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        assert_eq!(n, next(0, 500 * MS));
        // A connection resets the backoff.
        r.connected(Instant::now(), 0.5);
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        let n = r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        assert_eq!(n.wait, 250 * MS);
    }

    #[test]
    fn a_closed_connection_is_tried_once_more_where_it_was() {
        let mut r = relays(2);
        r.connected(Instant::now(), 0.5);
        let n = r.lost(Lost::Closed, Duration::ZERO, 0.5);
        assert_eq!(n, next(0, 250 * MS));
        // The retry does not connect (a reset with no reconnect): next.
        let n = r.lost(Lost::Closed, Duration::ZERO, 0.5);
        assert_eq!(n, next(1, Duration::ZERO));
    }

    #[test]
    fn going_away_moves_on_after_the_hint_or_waits_with_one_relay() {
        let mut r = relays(2);
        let n = r.lost(Lost::GoingAway { hint: 2000 * MS }, Duration::ZERO, 0.5);
        assert_eq!(n, next(1, 2000 * MS));
        let mut one = relays(1);
        let n = one.lost(Lost::GoingAway { hint: 2000 * MS }, Duration::ZERO, 0.5);
        assert_eq!(n, next(0, 2000 * MS));
        // One relay: every failure waits by the backoff, never sooner
        // than the relay's hint.
        let n = one.lost(Lost::Unanswered, 900 * MS, 0.5);
        assert_eq!(n, next(0, 900 * MS));
        let n = one.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        assert_eq!(n, next(0, 500 * MS));
    }

    #[test]
    fn away_from_home_it_tries_home_by_the_backoff_and_goes_back() {
        let t0 = Instant::now();
        let mut r = relays(2);
        assert_eq!(r.home_due(), None);
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        r.connected(t0, 0.5);
        assert!(!r.at_home());
        assert_eq!(r.home_due(), Some(t0 + 250 * MS));
        r.home_silent(t0 + 250 * MS, 0.5);
        assert_eq!(r.home_due(), Some(t0 + 750 * MS));
        r.home_answered(t0 + 750 * MS, 0.5);
        assert!(r.at_home());
        assert_eq!(r.current(), "r0:4433");
        assert_eq!(r.home_due(), None);
        // Away again: the tries of home start over.
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        r.connected(t0 + 1000 * MS, 0.5);
        assert_eq!(r.home_due(), Some(t0 + 1250 * MS));
    }

    #[test]
    fn an_attempt_waits_failover_after_only_with_somewhere_else_to_go() {
        assert_eq!(relays(1).attempt_limit(), None);
        assert_eq!(relays(2).attempt_limit(), Some(3000 * MS));
    }

    #[test]
    fn starting_over_goes_home_with_fresh_backoffs() {
        let mut r = relays(2);
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        r.connected(Instant::now(), 0.5);
        assert!(!r.at_home() && r.home_due().is_some());
        r.start_over();
        assert!(r.at_home());
        assert_eq!(r.home_due(), None);
        r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        let n = r.lost(Lost::Unanswered, Duration::ZERO, 0.5);
        assert_eq!(n, next(0, 250 * MS), "the first round's wait again");
    }

    #[test]
    fn a_relay_is_gone_once_what_was_sent_is_unanswered_for_the_limit() {
        let t0 = Instant::now();
        let mut l = Liveness::new(1500 * MS);
        // Quiet both ways: alive however long.
        assert!(!l.observe(t0, 10, 5));
        assert!(!l.observe(t0 + 60_000 * MS, 10, 5));
        // A keep-alive goes out, no answer yet.
        assert!(!l.observe(t0 + 60_100 * MS, 10, 6));
        assert!(!l.observe(t0 + 61_000 * MS, 10, 7));
        assert!(l.observe(t0 + 61_600 * MS, 10, 7));
        // An answer: alive again.
        let mut l = Liveness::new(1500 * MS);
        l.observe(t0, 10, 5);
        l.observe(t0 + 100 * MS, 10, 6);
        assert!(!l.observe(t0 + 1000 * MS, 11, 6));
        assert!(!l.observe(t0 + 2000 * MS, 11, 6));
    }
}
