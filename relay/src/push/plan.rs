//! The push decisions, sans-IO: whom a starting clip wakes, how often a
//! busy channel may wake one device, and what to do with each answer of a
//! provider. Time comes in as an argument.

use relay_core::hash::HashMap;
use std::sync::Arc;
use std::time::Duration;

use codec::wire::{ClipId, PushProvider, Target};

use super::book::Device;

/// One push to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub clip: ClipId,
    pub sender: Arc<str>,
    pub target: Target,
    /// The user whose device this is.
    pub user: Arc<str>,
    pub device: Device,
    /// Channel pushes replace a pending one of the same channel
    /// (`apns-collapse-id`, FCM `collapse_key`); direct ones do not.
    pub collapse: Option<String>,
    /// When the clip's first packet arrived (Unix ms), for the latency.
    pub started_ms: u64,
}

/// Who a device is, for the planner's memory.
type DeviceKey = (PushProvider, String);

/// Remembers what was pushed, to push each device at most once per clip
/// and once per `min_interval` per channel.
#[derive(Debug)]
pub struct Planner {
    min_interval_ms: u64,
    /// How long a clip's pushes are remembered (a sender's retry of the
    /// clip within it wakes nobody twice).
    remember_ms: u64,
    /// (device, clip) → when pushed.
    pushed: HashMap<(DeviceKey, ClipId), u64>,
    /// (device, channel) → when last pushed for the channel.
    channel_pushed: HashMap<(DeviceKey, String), u64>,
    last_sweep_ms: u64,
}

impl Planner {
    pub fn new(min_interval: Duration, remember: Duration) -> Planner {
        Planner {
            min_interval_ms: min_interval.as_millis() as u64,
            remember_ms: remember.as_millis() as u64,
            pushed: HashMap::default(),
            channel_pushed: HashMap::default(),
            last_sweep_ms: 0,
        }
    }

    /// A clip from `sender` to `target` started at `now_ms`; `offline`
    /// are its recipients without a connected session, with their
    /// devices. Returns the pushes to send.
    pub fn handle_clip_start<'a>(
        &mut self,
        clip: ClipId,
        sender: &Arc<str>,
        target: &Target,
        offline: impl IntoIterator<Item = (&'a Arc<str>, &'a [Device])>,
        now_ms: u64,
    ) -> Vec<Push> {
        self.sweep(now_ms);
        let channel = match target {
            Target::Channel(c) => Some(c),
            Target::User(_) => None,
        };
        let mut out = Vec::new();
        for (user, devices) in offline {
            if user == sender {
                continue;
            }
            for d in devices {
                let key = (d.provider, d.token.clone());
                if self.pushed.contains_key(&(key.clone(), clip)) {
                    continue;
                }
                if let Some(c) = channel {
                    let k = (key.clone(), c.clone());
                    if self
                        .channel_pushed
                        .get(&k)
                        .is_some_and(|at| now_ms < at + self.min_interval_ms)
                    {
                        continue;
                    }
                    self.channel_pushed.insert(k, now_ms);
                }
                self.pushed.insert((key, clip), now_ms);
                out.push(Push {
                    clip,
                    sender: sender.clone(),
                    target: target.clone(),
                    user: user.clone(),
                    device: d.clone(),
                    collapse: channel.map(|c| collapse_id(c)),
                    started_ms: now_ms,
                });
            }
        }
        out
    }

    /// Forgets pushes older than what they guard, at most once a second.
    fn sweep(&mut self, now_ms: u64) {
        if now_ms < self.last_sweep_ms + 1000 {
            return;
        }
        self.last_sweep_ms = now_ms;
        let (remember, interval) = (self.remember_ms, self.min_interval_ms);
        self.pushed.retain(|_, at| now_ms < *at + remember);
        self.channel_pushed.retain(|_, at| now_ms < *at + interval);
    }
}

/// The collapse id of a channel's pushes: at most 64 bytes (APNs), the
/// same for every device of the channel.
pub fn collapse_id(channel: &str) -> String {
    let h = ring::digest::digest(&ring::digest::SHA256, channel.as_bytes());
    let hex: String = h.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ptt-ch-{hex}")
}

/// What a provider's answer means for a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Sent,
    /// The token is gone: drop every registration with it.
    Gone,
    /// Refused for now: try again after `after` (the provider's
    /// `Retry-After`) or a backoff.
    Retry {
        after: Option<Duration>,
    },
    /// The relay's credentials were refused as stale: fetch new ones and
    /// try again.
    Reauth,
    /// Refused for good (a bad request, a misconfigured topic): counted
    /// and logged, not retried.
    Failed(String),
}

/// APNs (Apple, "Handling notification responses from APNs"): 200 sent;
/// 410 `Unregistered` and 400 `BadDeviceToken` mean the token is gone;
/// 403 `ExpiredProviderToken` a stale provider JWT; 429, 500 and 503 are
/// retried.
pub fn apns_answer(status: u16, reason: &str, retry_after: Option<Duration>) -> Answer {
    match (status, reason) {
        (200, _) => Answer::Sent,
        (410, _) | (400, "BadDeviceToken") => Answer::Gone,
        (403, "ExpiredProviderToken") => Answer::Reauth,
        (429 | 500 | 503, _) => Answer::Retry { after: retry_after },
        (s, r) => Answer::Failed(format!("APNs {s} {r}")),
    }
}

/// FCM HTTP v1 ("Send errors"): 200 sent; 404 `UNREGISTERED` means the
/// token is gone; 401 a stale access token; 429, 500 and 503 are retried
/// (honouring `Retry-After`).
pub fn fcm_answer(status: u16, error_code: &str, retry_after: Option<Duration>) -> Answer {
    match (status, error_code) {
        (200, _) => Answer::Sent,
        (404, "UNREGISTERED") => Answer::Gone,
        (401, _) => Answer::Reauth,
        (429 | 500 | 503, _) => Answer::Retry { after: retry_after },
        (s, e) => Answer::Failed(format!("FCM {s} {e}")),
    }
}

/// A `Retry-After` header: seconds (HTTP dates are not sent by these
/// providers and count as absent).
pub fn retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(token: &str) -> Device {
        Device {
            provider: PushProvider::Apns,
            device_id: token.into(),
            token: token.into(),
            topic: "t".into(),
            at_ms: 0,
        }
    }

    fn clip(n: u8) -> ClipId {
        ClipId([n; 16])
    }

    #[test]
    fn each_offline_device_once_per_clip_never_the_sender() {
        let mut p = Planner::new(Duration::from_secs(10), Duration::from_secs(600));
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        let bob_devs = [dev("b1"), dev("b2")];
        let alice_devs = [dev("a1")];
        let to = Target::User("bob".into());
        let out = p.handle_clip_start(
            clip(1),
            &alice,
            &to,
            [(&bob, &bob_devs[..]), (&alice, &alice_devs[..])],
            1000,
        );
        let tokens: Vec<&str> = out.iter().map(|p| &*p.device.token).collect();
        assert_eq!(tokens, ["b1", "b2"]);
        assert!(out.iter().all(|p| p.collapse.is_none()));
        // The sender's retry of the same clip (through another upload).
        let again = p.handle_clip_start(clip(1), &alice, &to, [(&bob, &bob_devs[..])], 2000);
        assert!(again.is_empty());
        // A new direct clip pushes again at once.
        let next = p.handle_clip_start(clip(2), &alice, &to, [(&bob, &bob_devs[..])], 2001);
        assert_eq!(next.len(), 2);
    }

    #[test]
    fn a_busy_channel_wakes_a_device_once_per_interval() {
        let mut p = Planner::new(Duration::from_secs(10), Duration::from_secs(600));
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        let devs = [dev("b1")];
        let ops = Target::Channel("ops".into());
        let first = p.handle_clip_start(clip(1), &alice, &ops, [(&bob, &devs[..])], 0);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].collapse.as_deref(), Some(&*collapse_id("ops")));
        for (i, t) in [(2u8, 3_000u64), (3, 9_999)] {
            let out = p.handle_clip_start(clip(i), &alice, &ops, [(&bob, &devs[..])], t);
            assert!(out.is_empty(), "{t} ms after the last push");
        }
        assert_eq!(
            p.handle_clip_start(clip(4), &alice, &ops, [(&bob, &devs[..])], 10_000)
                .len(),
            1
        );
        // Another channel is its own interval.
        let fire = Target::Channel("fire".into());
        assert_eq!(
            p.handle_clip_start(clip(5), &alice, &fire, [(&bob, &devs[..])], 10_001)
                .len(),
            1
        );
    }

    #[test]
    fn remembered_pushes_are_forgotten_after_their_time() {
        let mut p = Planner::new(Duration::from_secs(1), Duration::from_secs(5));
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        let devs = [dev("b1")];
        let to = Target::User("bob".into());
        p.handle_clip_start(clip(1), &alice, &to, [(&bob, &devs[..])], 0);
        p.handle_clip_start(clip(2), &alice, &to, [(&bob, &devs[..])], 6_000);
        assert_eq!(p.pushed.len(), 1, "clip 1's entry swept");
    }

    #[test]
    fn collapse_ids_fit_apns_and_differ_by_channel() {
        let a = collapse_id(&"x".repeat(500));
        assert!(a.len() <= 64);
        assert_ne!(collapse_id("ops"), collapse_id("fire"));
    }

    #[test]
    fn provider_answers() {
        let s = Some(Duration::from_secs(7));
        assert_eq!(apns_answer(200, "", None), Answer::Sent);
        assert_eq!(apns_answer(410, "Unregistered", None), Answer::Gone);
        assert_eq!(apns_answer(400, "BadDeviceToken", None), Answer::Gone);
        assert!(matches!(
            apns_answer(400, "BadTopic", None),
            Answer::Failed(_)
        ));
        assert_eq!(
            apns_answer(429, "TooManyRequests", s),
            Answer::Retry { after: s }
        );
        assert_eq!(
            apns_answer(500, "InternalServerError", None),
            Answer::Retry { after: None }
        );
        assert_eq!(
            apns_answer(403, "ExpiredProviderToken", None),
            Answer::Reauth
        );
        assert_eq!(fcm_answer(200, "", None), Answer::Sent);
        assert_eq!(fcm_answer(404, "UNREGISTERED", None), Answer::Gone);
        assert!(matches!(
            fcm_answer(404, "NOT_FOUND", None),
            Answer::Failed(_)
        ));
        assert_eq!(
            fcm_answer(503, "UNAVAILABLE", s),
            Answer::Retry { after: s }
        );
        assert_eq!(fcm_answer(401, "UNAUTHENTICATED", None), Answer::Reauth);
        assert_eq!(retry_after(Some(" 12 ")), Some(Duration::from_secs(12)));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
    }
}
