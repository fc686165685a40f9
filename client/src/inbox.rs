//! The inbox's memory of clip ids already kept by the app, on disk so it
//! survives restarts: a redelivery (an ack lost with the connection, the
//! app killed before its ack left) is acked again and not passed on twice.
//!
//! An append-only file of 16-byte ids, synced before the ack is sent;
//! rewritten (temporary file, sync, rename) to the newest `capacity` ids
//! when it holds twice as many.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use codec::wire::ClipId;

use crate::SeenIds;

/// Ids kept on disk, and in memory as a [`SeenIds`] the connection uses.
#[derive(Debug)]
pub struct Inbox {
    path: PathBuf,
    file: fs::File,
    seen: SeenIds,
    /// Newest ids, oldest first, at most `2 * capacity`.
    ids: Vec<ClipId>,
    capacity: usize,
}

impl Inbox {
    /// Opens (creating) the inbox file `path`, remembering `capacity` ids.
    /// A torn last record (a crash mid-write) is ignored.
    pub fn open(path: &Path, capacity: usize) -> std::io::Result<Inbox> {
        let capacity = capacity.max(1);
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut ids: Vec<ClipId> = bytes
            .chunks_exact(16)
            .filter_map(|c| c.try_into().ok().map(ClipId))
            .collect();
        let keep = ids.len().saturating_sub(capacity);
        ids.drain(..keep);
        let seen = SeenIds::new(capacity);
        for id in &ids {
            seen.insert(*id);
        }
        Ok(Inbox {
            path: path.to_owned(),
            file: write_ids(path, &ids)?,
            seen,
            ids,
            capacity,
        })
    }

    /// The in-memory view, for [`crate::ClientOptions::seen`].
    pub fn seen(&self) -> SeenIds {
        self.seen.clone()
    }

    /// Whether `id` was kept already.
    pub fn contains(&self, id: &ClipId) -> bool {
        self.seen.contains(id)
    }

    /// Records `id` as kept, on disk, before its ack may go out.
    pub fn keep(&mut self, id: ClipId) -> std::io::Result<()> {
        self.seen.insert(id);
        self.ids.push(id);
        if self.ids.len() >= 2 * self.capacity {
            let keep = self.ids.len() - self.capacity;
            self.ids.drain(..keep);
            self.file = write_ids(&self.path, &self.ids)?;
            return Ok(());
        }
        self.file.write_all(&id.0)?;
        self.file.sync_data()
    }
}

/// Writes `ids` to a new file that replaces `path`; returns it open for
/// appending.
fn write_ids(path: &Path, ids: &[ClipId]) -> std::io::Result<fs::File> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    let mut buf = Vec::with_capacity(ids.len() * 16);
    for id in ids {
        buf.extend_from_slice(&id.0);
    }
    f.write_all(&buf)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    fs::OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_ids_survive_a_restart_and_old_ones_age_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.ids");
        let mut i = Inbox::open(&path, 3).unwrap();
        for n in 1..=5u8 {
            i.keep(ClipId([n; 16])).unwrap();
        }
        // A crash mid-append leaves a torn record.
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[9; 7])
            .unwrap();
        drop(i);
        let i = Inbox::open(&path, 3).unwrap();
        for n in 3..=5u8 {
            assert!(i.contains(&ClipId([n; 16])), "{n} kept");
        }
        assert!(!i.contains(&ClipId([1; 16])), "past the capacity");
        assert!(!i.contains(&ClipId([9; 16])), "torn record ignored");
        assert_eq!(fs::metadata(&path).unwrap().len(), 3 * 16);
    }
}
