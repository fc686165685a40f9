//! The durable outbox: clips recorded while offline (or not yet
//! acknowledged by the relay) kept on disk, each with its clip id, until
//! the relay answers `Accepted`. A retry after any failure, or after the
//! app was killed and started again, sends the same id, so the relay
//! delivers the clip once (its dedupe window covers the retry).
//!
//! One file per clip, `<order>-<clip id>.clip`, written to a temporary
//! name, synced and renamed: a crash leaves either the whole entry or
//! none. `order` keeps clips in the order they were recorded.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use codec::wire::{ClipId, Target};

const MAGIC: &[u8; 8] = b"PTTOUT1\n";
const SUFFIX: &str = ".clip";

/// Why the outbox could not keep or read a clip.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The outbox holds `limit` bytes already: send (or drop) some first.
    #[error("outbox full: {used} of {limit} bytes used")]
    Full { used: u64, limit: u64 },
    #[error("outbox {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A clip waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: ClipId,
    pub target: Target,
    /// The recording, an Ogg Opus file.
    pub ogg: Vec<u8>,
    order: u64,
}

/// The outbox directory, and an index of it (read once at open; this
/// process is the directory's only writer).
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    next: u64,
    /// Entries by order: clip id and file size.
    index: BTreeMap<u64, (ClipId, u64)>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> OutboxError + 'a {
    move |source| OutboxError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl Outbox {
    /// Opens (creating) the outbox in `dir`, holding at most `max_bytes`.
    /// Temporary files of an interrupted write are removed; entries that
    /// do not parse are moved to `dir/damaged/` when read.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Outbox, OutboxError> {
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let mut index = BTreeMap::new();
        for e in fs::read_dir(dir).map_err(io("reading", dir))? {
            let e = e.map_err(io("reading", dir))?;
            let name = e.file_name();
            let name = name.to_str().unwrap_or("");
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            } else if let Some((order, id)) = parse_name(name) {
                let size = e.metadata().map_or(0, |m| m.len());
                index.insert(order, (id, size));
            }
        }
        Ok(Outbox {
            dir: dir.to_owned(),
            max_bytes,
            next: index.last_key_value().map_or(0, |(o, _)| o + 1),
            index,
        })
    }

    /// Keeps a clip (synced to disk before this returns).
    pub fn put(&mut self, id: ClipId, target: &Target, ogg: &[u8]) -> Result<(), OutboxError> {
        let used = self.bytes();
        let bytes = encode(target, ogg);
        if used + bytes.len() as u64 > self.max_bytes {
            return Err(OutboxError::Full {
                used,
                limit: self.max_bytes,
            });
        }
        let order = self.next;
        let path = self.path(order, &id);
        let tmp = path.with_extension("clip.tmp");
        let mut f = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
        sync_dir(&self.dir);
        self.next += 1;
        self.index.insert(order, (id, bytes.len() as u64));
        Ok(())
    }

    /// The clips waiting, oldest first.
    pub fn entries(&mut self) -> Result<Vec<Entry>, OutboxError> {
        let mut out = Vec::with_capacity(self.index.len());
        let mut damaged = Vec::new();
        for (&order, &(id, _)) in &self.index {
            let path = self.path(order, &id);
            let bytes = fs::read(&path).map_err(io("reading", &path))?;
            match decode(&bytes) {
                Some((target, ogg)) => out.push(Entry {
                    id,
                    target,
                    ogg: ogg.to_vec(),
                    order,
                }),
                None => damaged.push(order),
            }
        }
        for order in damaged {
            self.take(order, Some("damaged"));
        }
        Ok(out)
    }

    /// Clips waiting.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The relay has the clip: forget it.
    pub fn remove(&mut self, id: &ClipId) {
        if let Some(order) = self.order_of(id) {
            self.take(order, None);
        }
    }

    /// The relay refused the clip for good (an unknown recipient, a clip
    /// too long): keep it out of the way in `failed/`, for the app to show.
    pub fn set_aside(&mut self, id: &ClipId) {
        if let Some(order) = self.order_of(id) {
            self.take(order, Some("failed"));
        }
    }

    /// Bytes of the clips waiting.
    pub fn bytes(&self) -> u64 {
        self.index.values().map(|(_, n)| n).sum()
    }

    fn order_of(&self, id: &ClipId) -> Option<u64> {
        self.index
            .iter()
            .find_map(|(o, (x, _))| (x == id).then_some(*o))
    }

    fn path(&self, order: u64, id: &ClipId) -> PathBuf {
        self.dir.join(format!("{order:020}-{id}{SUFFIX}"))
    }

    /// Takes entry `order` out: deleted, or moved to the subdirectory
    /// `aside`.
    fn take(&mut self, order: u64, aside: Option<&str>) {
        let Some((id, _)) = self.index.remove(&order) else {
            return;
        };
        let path = self.path(order, &id);
        match aside {
            None => {
                let _ = fs::remove_file(&path);
            }
            Some(sub) => {
                let dir = self.dir.join(sub);
                if fs::create_dir_all(&dir).is_ok()
                    && let Some(name) = path.file_name()
                {
                    let _ = fs::rename(&path, dir.join(name));
                }
            }
        }
        sync_dir(&self.dir);
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn parse_name(name: &str) -> Option<(u64, ClipId)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (order, id) = stem.split_once('-')?;
    Some((order.parse().ok()?, ClipId::from_hex(id)?))
}

/// Entry bytes: magic, target kind (0 user, 1 channel), name length (u16
/// big-endian), name, then the Ogg Opus file.
fn encode(target: &Target, ogg: &[u8]) -> Vec<u8> {
    let (kind, name) = match target {
        Target::User(n) => (0u8, n),
        Target::Channel(n) => (1u8, n),
    };
    let mut v = Vec::with_capacity(MAGIC.len() + 3 + name.len() + ogg.len());
    v.extend_from_slice(MAGIC);
    v.push(kind);
    v.extend_from_slice(&(name.len().min(u16::MAX as usize) as u16).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(ogg);
    v
}

fn decode(b: &[u8]) -> Option<(Target, &[u8])> {
    let rest = b.strip_prefix(MAGIC)?;
    let (&kind, rest) = rest.split_first()?;
    let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let name = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
    let target = match kind {
        0 => Target::User(name),
        1 => Target::Channel(name),
        _ => return None,
    };
    Some((target, rest.get(2 + len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ClipId {
        ClipId([n; 16])
    }

    #[test]
    fn entries_survive_reopen_in_order_and_leave_once_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 1 << 20).unwrap();
        o.put(id(2), &Target::User("bob".into()), b"OggS-two")
            .unwrap();
        o.put(id(1), &Target::Channel("ops".into()), b"OggS-one")
            .unwrap();
        // A write interrupted by a crash leaves a temporary file only.
        fs::write(dir.path().join("00000000000000000009-x.clip.tmp"), b"junk").unwrap();
        drop(o);
        let mut o = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(o.len(), 2);
        let e = o.entries().unwrap();
        assert_eq!(
            e.iter().map(|e| e.id).collect::<Vec<_>>(),
            [id(2), id(1)],
            "recording order, not id order"
        );
        assert_eq!(e[1].target, Target::Channel("ops".into()));
        assert_eq!(e[1].ogg, b"OggS-one");
        o.put(id(3), &Target::User("carol".into()), b"OggS-three")
            .unwrap();
        assert_eq!(o.entries().unwrap().last().unwrap().id, id(3), "after");
        o.remove(&id(2));
        o.set_aside(&id(1));
        assert_eq!(o.entries().unwrap().len(), 1);
        assert_eq!(fs::read_dir(dir.path().join("failed")).unwrap().count(), 1);
    }

    #[test]
    fn a_full_outbox_refuses_and_a_damaged_entry_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 200).unwrap();
        o.put(id(1), &Target::User("bob".into()), &[0; 100])
            .unwrap();
        assert!(matches!(
            o.put(id(2), &Target::User("bob".into()), &[0; 100]),
            Err(OutboxError::Full { .. })
        ));
        fs::write(
            dir.path()
                .join(format!("00000000000000000005-{}.clip", id(7))),
            b"not an entry",
        )
        .unwrap();
        let mut o = Outbox::open(dir.path(), 200).unwrap();
        assert_eq!(o.entries().unwrap().len(), 1);
        assert_eq!(fs::read_dir(dir.path().join("damaged")).unwrap().count(), 1);
    }
}
