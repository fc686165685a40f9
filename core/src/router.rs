//! Routing decisions, sans-IO: who is online, who belongs to which talk
//! channel, who receives a clip, and who holds a channel's floor. No
//! sockets, no tasks, no clock: the session and cluster code tell it what
//! happened and act on what it answers (close a replaced connection, stop
//! a pre-empted upload, count a metric). It is generic over the session
//! handle (`M`) and over what stops a floor holder's upload (`T`), so every
//! rule is unit-tested here without QUIC.

use std::sync::Arc;

use crate::hash::DashMap;
use codec::wire::Target;

/// What the router needs of a session (its handle, `M`, is a `Member`
/// that is `Clone`, such as an `Arc` of one).
pub trait Member {
    /// Unique per connection (a user's newer connection has a new id).
    fn session_id(&self) -> u64;
    /// The authenticated user id.
    fn user(&self) -> &Arc<str>;
}

impl<S: Member + ?Sized> Member for Arc<S> {
    fn session_id(&self) -> u64 {
        (**self).session_id()
    }

    fn user(&self) -> &Arc<str> {
        (**self).user()
    }
}

/// A talker asking for a channel's floor.
pub struct FloorClaim<T> {
    pub user: Arc<str>,
    /// The upload's number (unique per upload).
    pub upload_no: u64,
    /// The talker has `priority` in the channel.
    pub priority: bool,
    /// What stops this upload if another claim displaces it.
    pub stop: T,
}

/// The floor rule, in one place for this relay's router and the
/// cluster's floor: what a claim by `user` (with `priority` or not) does
/// against the floor's holder (its user and priority), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorRule {
    /// No holder: the claim takes the floor.
    Free,
    /// The same user holds it with an older upload (a retry, or a new press
    /// before the old clip ended): the claim takes over.
    SameUser,
    /// A talker without priority holds it and the claim has priority: the
    /// claim pre-empts it.
    Preempts,
    /// Someone else holds it: refused (`floor_busy`).
    Busy,
}

impl FloorRule {
    pub fn of(holder: Option<(&str, bool)>, user: &str, priority: bool) -> Self {
        match holder {
            None => FloorRule::Free,
            Some((h, _)) if h == user => FloorRule::SameUser,
            Some((_, false)) if priority => FloorRule::Preempts,
            Some(_) => FloorRule::Busy,
        }
    }
}

/// The router's answer to a [`FloorClaim`]. The caller stops the displaced
/// upload with the matching code (`cut_off` for a superseded one,
/// `preempted` for a pre-empted one) and answers a busy claim
/// `floor_busy`.
#[derive(Debug, PartialEq, Eq)]
pub enum FloorDecision<T> {
    /// The floor was free: the claim holds it.
    Granted,
    /// The same user held it with an older upload (a retry, or a new press
    /// before the old clip ended): the claim holds it now; stop the old one.
    Superseded(T),
    /// A talker without priority held it and the claim has priority: the
    /// claim holds it now; stop the old holder's upload.
    Preempted { holder: Arc<str>, stop: T },
    /// Someone else holds it: refused.
    Busy { holder: Arc<str> },
}

struct Floor<T> {
    user: Arc<str>,
    upload_no: u64,
    priority: bool,
    stop: T,
}

/// Sessions by user, channel members and channel floors.
pub struct Router<M, T> {
    /// The live session of each connected user (the newest connection wins).
    sessions: DashMap<Arc<str>, M>,
    /// Online members of each talk channel, by session id.
    members: DashMap<String, DashMap<u64, M>>,
    /// Who holds each channel's floor.
    floors: DashMap<String, Floor<T>>,
}

impl<M: Member + Clone, T: Clone> Default for Router<M, T> {
    fn default() -> Self {
        Self {
            sessions: DashMap::default(),
            members: DashMap::default(),
            floors: DashMap::default(),
        }
    }
}

impl<M: Member + Clone, T: Clone> Router<M, T> {
    /// `m` is its user's session from now on. Returns the session it
    /// replaced (an older connection of the same user), which the caller
    /// closes with `session_replaced`.
    pub fn register(&self, m: M) -> Option<M> {
        self.sessions.insert(m.user().clone(), m)
    }

    /// `m` joins its talk channels (it receives their clips from now on).
    pub fn join<'a>(&self, m: &M, channels: impl IntoIterator<Item = &'a String>) {
        for c in channels {
            self.members
                .entry(c.clone())
                .or_default()
                .insert(m.session_id(), m.clone());
        }
    }

    /// `m`'s connection ended: it leaves its channels, and its user is
    /// offline unless a newer connection already took over.
    pub fn leave<'a>(&self, m: &M, channels: impl IntoIterator<Item = &'a String>) {
        self.sessions
            .remove_if(m.user(), |_, s| s.session_id() == m.session_id());
        for c in channels {
            if let Some(members) = self.members.get(c) {
                members.remove(&m.session_id());
            }
            self.members.remove_if(c, |_, members| members.is_empty());
        }
    }

    /// `user`'s session, if connected here.
    pub fn session(&self, user: &str) -> Option<M> {
        self.sessions.get(user).map(|s| s.clone())
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.sessions.contains_key(user)
    }

    /// Connected users.
    pub fn online(&self) -> usize {
        self.sessions.len()
    }

    /// Every session, for a pass over all of them (shutdown, metrics).
    pub fn sessions(&self) -> Vec<M> {
        self.sessions.iter().map(|e| e.value().clone()).collect()
    }

    /// Calls `f` on every session, without collecting them.
    pub fn for_each_session(&self, mut f: impl FnMut(&M)) {
        for e in &self.sessions {
            f(e.value());
        }
    }

    /// The online members of channel `c`.
    pub fn channel_members(&self, c: &str) -> Vec<M> {
        self.members
            .get(c)
            .map_or_else(Vec::new, |m| m.iter().map(|e| e.value().clone()).collect())
    }

    /// Who receives a clip `sender` sends to `target` on this relay: the
    /// addressed user (online or not: the store keeps it), or every other
    /// online member of the channel, each once, sorted.
    pub fn recipients(&self, target: &Target, sender: &str) -> Vec<Arc<str>> {
        match target {
            Target::User(u) => vec![Arc::from(u.as_str())],
            Target::Channel(c) => self.channel_recipients(c, sender),
        }
    }

    /// Who on this relay receives a clip another relay forwards: the
    /// addressed user if connected here (the other relay stores it), or
    /// the channel's other members online here.
    pub fn local_recipients(&self, target: &Target, sender: &str) -> Vec<Arc<str>> {
        match target {
            Target::User(u) => self
                .sessions
                .get(u.as_str())
                .map(|s| vec![s.user().clone()])
                .unwrap_or_default(),
            Target::Channel(c) => self.channel_recipients(c, sender),
        }
    }

    fn channel_recipients(&self, c: &str, sender: &str) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self.members.get(c).map_or_else(Vec::new, |m| {
            m.iter()
                .map(|e| e.value().user().clone())
                .filter(|u| **u != *sender)
                .collect()
        });
        v.sort();
        v.dedup();
        v
    }

    /// Decides a claim on channel `c`'s floor: free, held by the same user
    /// (superseded), held by a talker without priority when the claim has
    /// it (pre-empted), or busy.
    pub fn take_floor(&self, c: &str, claim: FloorClaim<T>) -> FloorDecision<T> {
        let mine = Floor {
            user: claim.user,
            upload_no: claim.upload_no,
            priority: claim.priority,
            stop: claim.stop,
        };
        match self.floors.entry(c.to_owned()) {
            dashmap::Entry::Vacant(v) => {
                v.insert(mine);
                FloorDecision::Granted
            }
            dashmap::Entry::Occupied(mut o) => {
                let held = o.get();
                match FloorRule::of(Some((&held.user, held.priority)), &mine.user, mine.priority) {
                    FloorRule::Busy => FloorDecision::Busy {
                        holder: held.user.clone(),
                    },
                    FloorRule::Preempts => {
                        let old = o.insert(mine);
                        FloorDecision::Preempted {
                            holder: old.user,
                            stop: old.stop,
                        }
                    }
                    // (`Free` cannot be: the floor has a holder.)
                    FloorRule::Free | FloorRule::SameUser => {
                        let old = o.insert(mine);
                        FloorDecision::Superseded(old.stop)
                    }
                }
            }
        }
    }

    /// Upload `upload_no` ended: it releases channel `c`'s floor if it still
    /// holds it (a later holder keeps it).
    pub fn release_floor(&self, c: &str, upload_no: u64) {
        self.floors.remove_if(c, |_, f| f.upload_no == upload_no);
    }

    /// Who holds channel `c`'s floor.
    pub fn floor_holder(&self, c: &str) -> Option<Arc<str>> {
        self.floors.get(c).map(|f| f.user.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct S(u64, Arc<str>);

    impl Member for S {
        fn session_id(&self) -> u64 {
            self.0
        }
        fn user(&self) -> &Arc<str> {
            &self.1
        }
    }

    fn s(id: u64, user: &str) -> S {
        S(id, user.into())
    }

    fn claim(user: &str, upload_no: u64, priority: bool) -> FloorClaim<u64> {
        FloorClaim {
            user: user.into(),
            upload_no,
            priority,
            stop: upload_no,
        }
    }

    /// The rule alone: free, the same user, pre-emption only of a holder
    /// without priority by a claim with it, otherwise busy.
    #[test]
    fn the_floor_rule() {
        use FloorRule::*;
        assert_eq!(FloorRule::of(None, "a", false), Free);
        assert_eq!(FloorRule::of(Some(("a", true)), "a", false), SameUser);
        assert_eq!(FloorRule::of(Some(("a", false)), "b", true), Preempts);
        assert_eq!(FloorRule::of(Some(("a", true)), "b", true), Busy);
        assert_eq!(FloorRule::of(Some(("a", false)), "b", false), Busy);
        assert_eq!(FloorRule::of(Some(("a", true)), "b", false), Busy);
    }

    fn names(v: &[Arc<str>]) -> Vec<&str> {
        v.iter().map(|u| &**u).collect()
    }

    fn ch(c: &str) -> Vec<String> {
        vec![c.to_owned()]
    }

    #[test]
    fn the_newest_connection_is_the_users_session() {
        let r: Router<S, u64> = Router::default();
        assert_eq!(r.register(s(1, "alice")), None);
        assert_eq!(r.register(s(2, "alice")), Some(s(1, "alice")), "replaced");
        // The old connection's end does not take the new one offline.
        r.leave(&s(1, "alice"), &[]);
        assert_eq!(r.session("alice"), Some(s(2, "alice")));
        r.leave(&s(2, "alice"), &[]);
        assert!(!r.is_online("alice"));
        assert_eq!(r.online(), 0);
    }

    #[test]
    fn a_direct_clip_goes_to_its_user_online_or_not() {
        let r: Router<S, u64> = Router::default();
        let bob = Target::User("bob".into());
        assert_eq!(names(&r.recipients(&bob, "alice")), ["bob"]);
        // Forwarded by another relay: only if bob is connected here.
        assert!(r.local_recipients(&bob, "alice").is_empty());
        r.register(s(1, "bob"));
        assert_eq!(names(&r.local_recipients(&bob, "alice")), ["bob"]);
    }

    #[test]
    fn a_channel_clip_goes_to_every_other_online_member_once() {
        let r: Router<S, u64> = Router::default();
        for (id, u) in [(1, "carol"), (2, "alice"), (3, "bob"), (4, "bob")] {
            r.join(&s(id, u), &ch("ops"));
        }
        r.join(&s(5, "dave"), &ch("news"));
        let ops = Target::Channel("ops".into());
        // Sorted, the sender left out, bob once for his two connections.
        assert_eq!(names(&r.recipients(&ops, "alice")), ["bob", "carol"]);
        assert_eq!(names(&r.local_recipients(&ops, "alice")), ["bob", "carol"]);
        r.leave(&s(3, "bob"), &ch("ops"));
        r.leave(&s(4, "bob"), &ch("ops"));
        assert_eq!(names(&r.recipients(&ops, "alice")), ["carol"]);
        assert_eq!(r.channel_members("ops").len(), 2);
        r.leave(&s(1, "carol"), &ch("ops"));
        r.leave(&s(2, "alice"), &ch("ops"));
        assert!(r.recipients(&ops, "alice").is_empty());
        assert!(
            r.members.get("ops").is_none(),
            "an empty channel is dropped"
        );
    }

    #[test]
    fn floor_rules() {
        let r: Router<S, u64> = Router::default();
        assert_eq!(
            r.take_floor("ops", claim("alice", 1, false)),
            FloorDecision::Granted
        );
        // Another talker: busy, naming the holder.
        assert_eq!(
            r.take_floor("ops", claim("bob", 2, false)),
            FloorDecision::Busy {
                holder: "alice".into()
            }
        );
        // The same user again: the older upload is superseded.
        assert_eq!(
            r.take_floor("ops", claim("alice", 3, false)),
            FloorDecision::Superseded(1)
        );
        // Priority over no priority: pre-empted.
        assert_eq!(
            r.take_floor("ops", claim("disp", 4, true)),
            FloorDecision::Preempted {
                holder: "alice".into(),
                stop: 3
            }
        );
        // Priority against priority: the floor rule (busy).
        assert_eq!(
            r.take_floor("ops", claim("chief", 5, true)),
            FloorDecision::Busy {
                holder: "disp".into()
            }
        );
        // No priority against priority: busy.
        assert_eq!(
            r.take_floor("ops", claim("alice", 6, false)),
            FloorDecision::Busy {
                holder: "disp".into()
            }
        );
        // Only the holding upload releases it.
        r.release_floor("ops", 3);
        assert_eq!(r.floor_holder("ops").as_deref(), Some("disp"));
        r.release_floor("ops", 4);
        assert_eq!(r.floor_holder("ops"), None);
        assert_eq!(
            r.take_floor("ops", claim("bob", 7, false)),
            FloorDecision::Granted
        );
        // Channels are independent.
        assert_eq!(
            r.take_floor("news", claim("alice", 8, false)),
            FloorDecision::Granted
        );
    }
}
