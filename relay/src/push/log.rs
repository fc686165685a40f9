//! The push book on disk: `DATA_DIR/push.log`, one JSON [`Record`] per
//! line, each appended and synced before the device hears its
//! registration was kept. Read back at start through the book's fold,
//! and rewritten short (the book's records, to a temporary file, synced,
//! renamed) when it has grown to several times the book.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::book::{PushBook, Record};

pub struct PushLog {
    file: File,
    path: PathBuf,
    /// Lines in the file (its records, kept or not).
    lines: usize,
}

impl PushLog {
    /// Opens (creating) the log at `path`, applying every record to
    /// `book`. A line that does not parse (a torn last write) is skipped.
    pub fn open(path: &Path, book: &mut PushBook) -> std::io::Result<PushLog> {
        let mut lines = 0;
        match File::open(path) {
            Ok(f) => {
                for (n, line) in BufReader::new(f).lines().enumerate() {
                    let line = line?;
                    match serde_json::from_str::<Record>(&line) {
                        Ok(r) => {
                            book.apply(&r);
                            lines += 1;
                        }
                        Err(e) => warn!(line = n + 1, error = %e, "push log: line skipped"),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut log = PushLog {
            file: OpenOptions::new().create(true).append(true).open(path)?,
            path: path.to_owned(),
            lines,
        };
        log.compact_if_long(book)?;
        Ok(log)
    }

    /// Appends `r` and syncs it.
    pub fn append(&mut self, r: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.lines += 1;
        Ok(())
    }

    /// Rewrites the log as the book's records when it holds over twice
    /// as many lines (and some), so it stays about the book's size.
    pub fn compact_if_long(&mut self, book: &PushBook) -> std::io::Result<()> {
        let records = book.records();
        if self.lines <= 2 * records.len() + 64 {
            return Ok(());
        }
        let tmp = self.path.with_extension("log.tmp");
        let mut f = File::create(&tmp)?;
        for r in &records {
            let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
            line.push(b'\n');
            f.write_all(&line)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = records.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::book::Device;
    use codec::wire::PushProvider;

    fn reg(user: &str, id: &str, token: &str) -> Record {
        Record::Register {
            user: user.into(),
            device: Device {
                provider: PushProvider::Fcm,
                device_id: id.into(),
                token: token.into(),
                topic: String::new(),
                at_ms: 1,
            },
        }
    }

    #[test]
    fn registrations_survive_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("push.log");
        let mut book = PushBook::new(5);
        let mut log = PushLog::open(&path, &mut book).unwrap();
        for r in [reg("alice", "phone", "t1"), reg("bob", "phone", "t2")] {
            book.apply(&r);
            log.append(&r).unwrap();
        }
        drop(log);
        // A write cut short by a crash.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"op\":\"register\",\"us").unwrap();
        drop(f);
        let mut again = PushBook::new(5);
        PushLog::open(&path, &mut again).unwrap();
        assert_eq!(again.devices("alice")[0].token, "t1");
        assert_eq!(again.devices("bob")[0].token, "t2");
    }

    #[test]
    fn a_long_log_is_rewritten_as_the_book() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("push.log");
        let mut book = PushBook::new(5);
        let mut log = PushLog::open(&path, &mut book).unwrap();
        for i in 0..200 {
            // One device re-registered with a new token again and again.
            let r = reg("alice", "phone", &format!("t{i}"));
            book.apply(&r);
            log.append(&r).unwrap();
        }
        drop(log);
        let mut again = PushBook::new(5);
        let log = PushLog::open(&path, &mut again).unwrap();
        assert_eq!(log.lines, 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(again.devices("alice")[0].token, "t199");
    }
}
