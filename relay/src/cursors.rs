//! Channel members' history cursors on disk (`DATA_DIR/cursors.json`):
//! for each (user, channel), the newest history entry the user was given.
//! With the disk store the history itself is in the log; these cursors let
//! a restarted relay give each member only what it missed, once.
//!
//! The file is rewritten whole (to a temporary file, synced, renamed over
//! the old one, directory synced) every few seconds when something changed
//! and at shutdown. After a crash, a member may be given again what it got
//! in the last seconds before it; the client drops repeats by clip id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One member's cursor in one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub user: String,
    pub channel: String,
    /// The newest history entry given (its sequence number).
    pub seq: u64,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("cursors.json")
}

/// Reads the cursors; a missing file is none, a damaged one is reported and
/// treated as none (members may then get history entries again).
pub fn load(path: &Path) -> Vec<Cursor> {
    crate::json_file::load(path, "history cursors")
}

/// The cursors as their file lists them.
pub fn to_list(cursors: &BTreeMap<(String, String), u64>) -> Vec<Cursor> {
    cursors
        .iter()
        .map(|((user, channel), seq)| Cursor {
            user: user.clone(),
            channel: channel.clone(),
            seq: *seq,
        })
        .collect()
}

/// Writes the cursors atomically and durably (the relay writes its
/// snapshot through `to_list` off its loop).
#[cfg(test)]
pub fn save(path: &Path, cursors: &BTreeMap<(String, String), u64>) -> std::io::Result<()> {
    crate::json_file::save(path, &to_list(cursors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert!(load(&p).is_empty());
        let mut m = BTreeMap::new();
        m.insert(("bob".to_owned(), "ops".to_owned()), 7);
        m.insert(("carol".to_owned(), "ops".to_owned()), 9);
        save(&p, &m).unwrap();
        let back = load(&p);
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].seq, 9);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(load(&p).is_empty());
    }
}
