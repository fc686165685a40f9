//! Who can be woken, and where: each user's push devices and the channels
//! they listen in. Sans-IO: every change is a [`Record`] applied by one
//! fold ([`PushBook::apply`]), the same at run time and when the log is
//! read back at start.

use relay_core::hash::HashMap;
use std::collections::BTreeSet;
use std::sync::Arc;

use codec::wire::PushProvider;
use serde::{Deserialize, Serialize};

/// One device a user registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    #[serde(with = "provider_name")]
    pub provider: PushProvider,
    pub device_id: String,
    /// The provider's token for the device.
    pub token: String,
    /// APNs topic (`<bundle id>.voip-ptt`); FCM: as registered.
    pub topic: String,
    /// When registered (Unix ms): the oldest goes first past the bound.
    pub at_ms: u64,
}

/// One change to the book: what the log holds, line by line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// `user` registered `device` (replacing one of the same id, and any
    /// other registration of the same provider token).
    Register { user: String, device: Device },
    /// `user`'s device `device_id` wants no more pushes.
    Unregister { user: String, device_id: String },
    /// `user`'s talk channels, as its token grants them (members of a
    /// channel are pushed for its clips).
    Channels { user: String, channels: Vec<String> },
    /// The provider said this token is gone (the app was uninstalled, the
    /// token rotated): every registration with it is dropped.
    Gone {
        #[serde(with = "provider_name")]
        provider: PushProvider,
        token: String,
    },
    /// `user`'s whole entry as another relay of the cluster has it (its
    /// devices and channels replace these).
    User {
        user: String,
        devices: Vec<Device>,
        channels: Vec<String>,
    },
}

/// What applying a record changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Whether the book changed (a record that changed nothing need not be
    /// written).
    pub changed: bool,
    /// Devices dropped to stay within `max_push_devices_per_user` (the
    /// oldest).
    pub evicted: Vec<String>,
    /// Users whose entry changed (a cluster shares their new entries).
    pub users: Vec<String>,
}

#[derive(Debug, Default)]
struct User {
    devices: Vec<Device>,
    channels: BTreeSet<String>,
}

/// Every user's devices, and the users of each channel who have devices.
#[derive(Debug)]
pub struct PushBook {
    users: HashMap<Arc<str>, User>,
    /// Channel → users with at least one device who listen in it.
    members: HashMap<String, BTreeSet<Arc<str>>>,
    max_devices: usize,
}

impl PushBook {
    pub fn new(max_devices: usize) -> PushBook {
        PushBook {
            users: HashMap::default(),
            members: HashMap::default(),
            max_devices: max_devices.max(1),
        }
    }

    /// Applies one change (at run time, or read back from the log).
    pub fn apply(&mut self, r: &Record) -> Applied {
        let mut out = Applied::default();
        match r {
            Record::Register { user, device } => {
                let others = self.drop_token(device.provider, &device.token, Some(user));
                out.changed |= !others.is_empty();
                out.users.extend(others.iter().map(|u| u.to_string()));
                let max = self.max_devices;
                let u = self.user(user);
                match u
                    .devices
                    .iter_mut()
                    .find(|d| d.device_id == device.device_id)
                {
                    Some(d) if d == device => {}
                    Some(d) => {
                        *d = device.clone();
                        out.changed = true;
                    }
                    None => {
                        u.devices.push(device.clone());
                        out.changed = true;
                    }
                }
                while u.devices.len() > max {
                    let oldest = (0..u.devices.len())
                        .min_by_key(|&i| u.devices[i].at_ms)
                        .unwrap_or(0);
                    out.evicted.push(u.devices.remove(oldest).device_id);
                }
                self.index(user);
            }
            Record::Unregister { user, device_id } => {
                if let Some(u) = self.users.get_mut(user.as_str()) {
                    let before = u.devices.len();
                    u.devices.retain(|d| &d.device_id != device_id);
                    out.changed = u.devices.len() != before;
                }
                self.index(user);
            }
            Record::Channels { user, channels } => {
                let new: BTreeSet<String> = channels.iter().cloned().collect();
                let u = self.user(user);
                if u.channels != new {
                    u.channels = new;
                    out.changed = true;
                }
                self.index(user);
            }
            Record::Gone { provider, token } => {
                let gone = self.drop_token(*provider, token, None);
                out.changed = !gone.is_empty();
                out.users = gone.iter().map(|u| u.to_string()).collect();
                return out;
            }
            Record::User {
                user,
                devices,
                channels,
            } => {
                let u = self.user(user);
                let channels: BTreeSet<String> = channels.iter().cloned().collect();
                if u.devices != *devices || u.channels != channels {
                    u.devices = devices.clone();
                    u.channels = channels;
                    out.changed = true;
                }
                self.index(user);
            }
        }
        if out.changed
            && let Record::Register { user, .. }
            | Record::Unregister { user, .. }
            | Record::Channels { user, .. }
            | Record::User { user, .. } = r
        {
            out.users.push(user.clone());
        }
        out
    }

    /// `user`'s whole entry, as a record (what a cluster shares).
    pub fn entry(&self, user: &str) -> Record {
        let u = self.users.get(user);
        Record::User {
            user: user.to_owned(),
            devices: u.map(|u| u.devices.clone()).unwrap_or_default(),
            channels: u
                .map(|u| u.channels.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// `user`'s devices.
    pub fn devices(&self, user: &str) -> &[Device] {
        self.users.get(user).map_or(&[], |u| &u.devices)
    }

    /// Users with devices who listen in `channel`.
    pub fn members(&self, channel: &str) -> impl Iterator<Item = &Arc<str>> {
        self.members.get(channel).into_iter().flatten()
    }

    /// `user`'s channels as last recorded.
    pub fn channels(&self, user: &str) -> Option<&BTreeSet<String>> {
        self.users.get(user).map(|u| &u.channels)
    }

    /// Users with at least one device.
    pub fn users(&self) -> usize {
        self.users
            .values()
            .filter(|u| !u.devices.is_empty())
            .count()
    }

    /// The whole book as records (the log rewritten short).
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        for (user, u) in &self.users {
            if u.devices.is_empty() {
                continue;
            }
            if !u.channels.is_empty() {
                out.push(Record::Channels {
                    user: user.to_string(),
                    channels: u.channels.iter().cloned().collect(),
                });
            }
            for d in &u.devices {
                out.push(Record::Register {
                    user: user.to_string(),
                    device: d.clone(),
                });
            }
        }
        out
    }

    fn user(&mut self, user: &str) -> &mut User {
        self.users.entry(Arc::from(user)).or_default()
    }

    /// Drops registrations of `token` (except `keep`'s own: a user
    /// registering again keeps its entry, replaced by device id); returns
    /// the users who lost one.
    fn drop_token(
        &mut self,
        provider: PushProvider,
        token: &str,
        keep: Option<&str>,
    ) -> Vec<Arc<str>> {
        let mut changed = Vec::new();
        for (name, u) in &mut self.users {
            if keep == Some(&**name) {
                continue;
            }
            let before = u.devices.len();
            u.devices
                .retain(|d| !(d.provider == provider && d.token == token));
            if u.devices.len() != before {
                changed.push(name.clone());
            }
        }
        for name in &changed {
            self.index(name);
        }
        changed
    }

    /// Keeps `members` true to `user`'s devices and channels; forgets a
    /// user left with neither.
    fn index(&mut self, user: &str) {
        let Some((name, u)) = self.users.get_key_value(user) else {
            return;
        };
        let name = name.clone();
        let listed = !u.devices.is_empty();
        let channels = u.channels.clone();
        for (c, m) in self.members.iter_mut() {
            if !(listed && channels.contains(c)) {
                m.remove(&name);
            }
        }
        self.members.retain(|_, m| !m.is_empty());
        if listed {
            for c in channels {
                self.members.entry(c).or_default().insert(name.clone());
            }
        } else if channels.is_empty() {
            self.users.remove(user);
        }
    }
}

mod provider_name {
    use codec::wire::PushProvider;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &PushProvider, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PushProvider, D::Error> {
        let s = String::deserialize(d)?;
        PushProvider::from_name(&s).ok_or_else(|| serde::de::Error::custom("apns or fcm"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, token: &str, at_ms: u64) -> Device {
        Device {
            provider: PushProvider::Apns,
            device_id: id.into(),
            token: token.into(),
            topic: "com.example.ptt.voip-ptt".into(),
            at_ms,
        }
    }

    fn reg(user: &str, d: Device) -> Record {
        Record::Register {
            user: user.into(),
            device: d,
        }
    }

    fn channels(user: &str, cs: &[&str]) -> Record {
        Record::Channels {
            user: user.into(),
            channels: cs.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn members(b: &PushBook, c: &str) -> Vec<String> {
        b.members(c).map(|u| u.to_string()).collect()
    }

    #[test]
    fn a_device_registered_again_is_replaced_not_added() {
        let mut b = PushBook::new(5);
        assert!(b.apply(&reg("alice", dev("phone", "t1", 1))).changed);
        assert!(!b.apply(&reg("alice", dev("phone", "t1", 1))).changed);
        assert!(b.apply(&reg("alice", dev("phone", "t2", 2))).changed);
        assert_eq!(b.devices("alice").len(), 1);
        assert_eq!(b.devices("alice")[0].token, "t2");
    }

    #[test]
    fn past_the_bound_the_oldest_device_goes() {
        let mut b = PushBook::new(2);
        b.apply(&reg("alice", dev("a", "ta", 10)));
        b.apply(&reg("alice", dev("b", "tb", 5)));
        let out = b.apply(&reg("alice", dev("c", "tc", 20)));
        assert_eq!(out.evicted, ["b"]);
        let ids: Vec<&str> = b.devices("alice").iter().map(|d| &*d.device_id).collect();
        assert_eq!(ids, ["a", "c"]);
    }

    /// A phone signed in as another user: its token no longer wakes the
    /// first one.
    #[test]
    fn a_token_belongs_to_its_last_registration() {
        let mut b = PushBook::new(5);
        b.apply(&reg("alice", dev("phone", "shared", 1)));
        b.apply(&reg("bob", dev("phone", "shared", 2)));
        assert!(b.devices("alice").is_empty());
        assert_eq!(b.devices("bob").len(), 1);
    }

    #[test]
    fn a_gone_token_leaves_every_user_and_channel() {
        let mut b = PushBook::new(5);
        b.apply(&channels("alice", &["ops", "fire"]));
        b.apply(&reg("alice", dev("phone", "t1", 1)));
        b.apply(&reg("alice", dev("tablet", "t2", 2)));
        assert_eq!(members(&b, "ops"), ["alice"]);
        let gone = Record::Gone {
            provider: PushProvider::Apns,
            token: "t1".into(),
        };
        assert!(b.apply(&gone).changed);
        assert_eq!(b.devices("alice").len(), 1);
        assert_eq!(members(&b, "ops"), ["alice"], "the tablet still listens");
        let gone = Record::Gone {
            provider: PushProvider::Apns,
            token: "t2".into(),
        };
        b.apply(&gone);
        assert!(members(&b, "ops").is_empty());
        assert!(!b.apply(&gone).changed, "twice changes nothing");
        // The same token at the other provider is another token.
        b.apply(&reg("alice", dev("phone", "t3", 3)));
        let fcm = Record::Gone {
            provider: PushProvider::Fcm,
            token: "t3".into(),
        };
        assert!(!b.apply(&fcm).changed);
    }

    /// Another relay's whole entry for a user replaces this one's, and a
    /// change says whom it touched.
    #[test]
    fn a_whole_entry_replaces_and_changes_say_whom() {
        let mut b = PushBook::new(5);
        let out = b.apply(&reg("alice", dev("phone", "t1", 1)));
        assert_eq!(out.users, ["alice"]);
        let moved = b.apply(&reg("bob", dev("phone", "t1", 2)));
        let mut whom = moved.users.clone();
        whom.sort();
        assert_eq!(whom, ["alice", "bob"], "the token moved from alice");
        let theirs = Record::User {
            user: "carol".into(),
            devices: vec![dev("tablet", "t9", 3)],
            channels: vec!["ops".into()],
        };
        assert_eq!(b.apply(&theirs).users, ["carol"]);
        assert_eq!(members(&b, "ops"), ["carol"]);
        assert!(!b.apply(&theirs).changed, "the same entry again");
        assert_eq!(b.entry("carol"), theirs);
        let empty = Record::User {
            user: "carol".into(),
            devices: vec![],
            channels: vec![],
        };
        b.apply(&empty);
        assert!(members(&b, "ops").is_empty());
        assert_eq!(b.users(), 1);
    }

    #[test]
    fn channel_members_follow_grants_and_devices() {
        let mut b = PushBook::new(5);
        b.apply(&channels("alice", &["ops"]));
        assert!(members(&b, "ops").is_empty(), "no device: nobody to wake");
        b.apply(&reg("alice", dev("phone", "t1", 1)));
        b.apply(&reg("bob", dev("phone", "t2", 1)));
        b.apply(&channels("bob", &["ops", "fire"]));
        assert_eq!(members(&b, "ops"), ["alice", "bob"]);
        assert!(b.apply(&channels("alice", &["fire"])).changed);
        assert_eq!(members(&b, "ops"), ["bob"]);
        assert_eq!(members(&b, "fire"), ["alice", "bob"]);
        let un = Record::Unregister {
            user: "bob".into(),
            device_id: "phone".into(),
        };
        assert!(b.apply(&un).changed);
        assert_eq!(members(&b, "fire"), ["alice"]);
        assert_eq!(b.users(), 1);
    }

    /// The log read back gives the same book as the changes made.
    #[test]
    fn the_book_rewritten_as_records_is_the_same_book() {
        let mut b = PushBook::new(3);
        for r in [
            channels("alice", &["ops"]),
            reg("alice", dev("phone", "t1", 1)),
            reg("bob", dev("phone", "t2", 2)),
            channels("bob", &["fire"]),
            reg("carol", dev("x", "t3", 3)),
            Record::Unregister {
                user: "carol".into(),
                device_id: "x".into(),
            },
        ] {
            let line = serde_json::to_string(&r).unwrap();
            let back: Record = serde_json::from_str(&line).unwrap();
            assert_eq!(back, r);
            b.apply(&back);
        }
        let mut again = PushBook::new(3);
        for r in b.records() {
            again.apply(&r);
        }
        for u in ["alice", "bob", "carol"] {
            assert_eq!(again.devices(u), b.devices(u), "{u}");
        }
        assert_eq!(members(&again, "ops"), ["alice"]);
        assert_eq!(members(&again, "fire"), ["bob"]);
    }
}
