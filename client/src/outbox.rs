//! The durable outbox: clips recorded while offline (or not yet
//! acknowledged by the relay) kept on disk, each with its clip id, until
//! the relay answers `Accepted`. A retry after any failure, or after the
//! app was killed and started again, sends the same id, so the relay
//! delivers the clip once (its dedupe window covers the retry).
//!
//! One file per clip, `<order>-<clip id>.clip`, written to a temporary
//! name, synced and renamed: a crash leaves either the whole entry or
//! none. `order` keeps clips in the order they were recorded.

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

/// The outbox directory.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    next: u64,
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
    /// do not parse are moved to `dir/damaged/`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Outbox, OutboxError> {
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let mut next = 0;
        for e in fs::read_dir(dir).map_err(io("reading", dir))? {
            let path = e.map_err(io("reading", dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
            } else if let Some((order, _)) = parse_name(name) {
                next = next.max(order + 1);
            }
        }
        Ok(Outbox {
            dir: dir.to_owned(),
            max_bytes,
            next,
        })
    }

    /// Keeps a clip (synced to disk before this returns).
    pub fn put(&mut self, id: ClipId, target: &Target, ogg: &[u8]) -> Result<(), OutboxError> {
        let used = self.bytes();
        let size = ogg.len() as u64 + 64;
        if used + size > self.max_bytes {
            return Err(OutboxError::Full {
                used,
                limit: self.max_bytes,
            });
        }
        let order = self.next;
        self.next += 1;
        let name = format!("{order:020}-{id}{SUFFIX}");
        let tmp = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(&name);
        let mut f = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&encode(target, ogg))
            .and_then(|()| f.sync_all())
            .map_err(io("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
        sync_dir(&self.dir);
        Ok(())
    }

    /// The clips waiting, oldest first.
    pub fn entries(&self) -> Result<Vec<Entry>, OutboxError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io("reading", &self.dir))? {
            let path = e.map_err(io("reading", &self.dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some((order, id)) = parse_name(name) else {
                continue;
            };
            let bytes = fs::read(&path).map_err(io("reading", &path))?;
            match decode(&bytes) {
                Some((target, ogg)) => out.push(Entry {
                    id,
                    target,
                    ogg: ogg.to_vec(),
                    order,
                }),
                None => self.move_aside(&path, "damaged"),
            }
        }
        out.sort_by_key(|e| e.order);
        Ok(out)
    }

    /// The relay has the clip: forget it.
    pub fn remove(&self, id: &ClipId) {
        for path in self.paths_of(id) {
            let _ = fs::remove_file(path);
        }
        sync_dir(&self.dir);
    }

    /// The relay refused the clip for good (an unknown recipient, a clip
    /// too long): keep it out of the way in `failed/`, for the app to show.
    pub fn set_aside(&self, id: &ClipId) {
        for path in self.paths_of(id) {
            self.move_aside(&path, "failed");
        }
    }

    /// Bytes of the clips waiting.
    pub fn bytes(&self) -> u64 {
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(SUFFIX)))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn paths_of(&self, id: &ClipId) -> Vec<PathBuf> {
        let tail = format!("-{id}{SUFFIX}");
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.ends_with(&tail))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn move_aside(&self, path: &Path, sub: &str) {
        let dir = self.dir.join(sub);
        if fs::create_dir_all(&dir).is_ok()
            && let Some(name) = path.file_name()
        {
            let _ = fs::rename(path, dir.join(name));
        }
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
        assert_eq!(o.entries().unwrap().len(), 1);
        assert_eq!(fs::read_dir(dir.path().join("damaged")).unwrap().count(), 1);
    }
}
