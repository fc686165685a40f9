//! The durable store's on-disk format: append-only segment files of
//! checksummed records, and the little file-system surface the store needs
//! ([`LogDir`]), so tests can run it on a simulated disk that loses what
//! was not synced.
//!
//! A file starts with an 8-byte magic. A record is
//! `len: u32 LE | crc32: u32 LE | kind: u8 | payload`, where `len` counts
//! `kind` and `payload`. In a segment the CRC-32 (IEEE) covers the
//! segment's number (`u64 LE`, the `N` of `seg-N.log`) and then `kind` and
//! `payload`; in an ids file (and in a segment written by the first
//! version, magic `PTTSEG1`) it covers `kind` and `payload` only. Strings
//! are `u16 LE` length + UTF-8; integers little-endian.
//!
//! Why the number is in the checksum: segment files are recycled. A
//! deleted segment is renamed (`free-N.log`) and later written again from
//! its start under a new number, so an fdatasync overwrites blocks the
//! file already has instead of growing it (one I/O instead of a data write
//! plus a metadata update). The bytes of its earlier life after the new
//! records fail their checksums under the new number, so they read as the
//! end of the file; a closed segment ends with a `Seal` record, after
//! which nothing is read.
//!
//! | kind | payload |
//! |---|---|
//! | 1 `Put` | `id[16] accepted_ms:u64 sender:str n:u32 (order:u64 recipient:str)×n clip` — a clip and the recipients still owed it. A later `Put` of the same id replaces the earlier state (compaction rewrites live clips this way). `clip` is [`StoredClip::to_record`] and runs to the end of the record. |
//! | 2 `AddCopy` | `id[16] order:u64 recipient:str` — one more recipient for a clip put earlier. |
//! | 3 `Ack` | `id[16] recipient:str` — the recipient has the clip (or its copy expired). |
//! | 4 `Id` | `id[16] accepted_ms:u64 sender:str` — a clip id to remember for the dedupe window (a clip with no recipient, or ids carried out of a deleted segment). |
//! | 5 `Seal` | empty — the segment was closed here; what follows is an earlier life's bytes. |
//!
//! Parsing is total: any byte string gives records up to the first one that
//! is cut short or fails its checksum, and says where that happened.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use codec::wire::ClipId;

use crate::store::StoredClip;

/// Magic at the start of a segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"PTTSEG2\n";
/// Magic of the first version's segments (checksums without the number);
/// still read.
pub const SEGMENT_MAGIC_V1: &[u8; 8] = b"PTTSEG1\n";
/// Magic at the start of an ids file.
pub const IDS_MAGIC: &[u8; 8] = b"PTTIDS1\n";
/// Largest record accepted when reading (bigger lengths are damage).
pub const MAX_RECORD: usize = 256 * 1024 * 1024;

const PUT: u8 = 1;
const ADD_COPY: u8 = 2;
const ACK: u8 = 3;
const ID: u8 = 4;
const SEAL: u8 = 5;

/// What a file's checksums cover besides each record: a segment's number,
/// or nothing (ids files, first-version segments).
pub type Seed = Option<u64>;

fn hasher(seed: Seed) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    if let Some(n) = seed {
        h.update(&n.to_le_bytes());
    }
    h
}

/// One decoded record.
#[derive(Debug)]
pub enum Record {
    Put {
        id: ClipId,
        accepted_ms: u64,
        sender: Arc<str>,
        copies: Vec<(Arc<str>, u64)>,
        clip: Arc<StoredClip>,
    },
    AddCopy {
        id: ClipId,
        order: u64,
        recipient: Arc<str>,
    },
    Ack {
        id: ClipId,
        recipient: Arc<str>,
    },
    Id {
        id: ClipId,
        accepted_ms: u64,
        sender: Arc<str>,
    },
    Seal,
}

/// Appends records to a buffer (one write per batch).
pub struct Encoder<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    seed: Seed,
}

impl<'a> Encoder<'a> {
    fn begin(out: &'a mut Vec<u8>, seed: Seed, kind: u8) -> Self {
        let start = out.len();
        out.extend_from_slice(&[0; 8]);
        out.push(kind);
        Encoder { out, start, seed }
    }

    fn id(self, id: &ClipId) -> Self {
        self.out.extend_from_slice(&id.0);
        self
    }

    fn u64(self, v: u64) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u32(self, v: u32) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn str(self, s: &str) -> Self {
        // Names are at most a few hundred bytes (tokens bound them).
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.out.extend_from_slice(b);
        self
    }

    fn finish(self) -> usize {
        let body = &self.out[self.start + 8..];
        let len = body.len() as u32;
        let mut h = hasher(self.seed);
        h.update(body);
        let crc = h.finalize();
        self.out[self.start..self.start + 4].copy_from_slice(&len.to_le_bytes());
        self.out[self.start + 4..self.start + 8].copy_from_slice(&crc.to_le_bytes());
        self.out.len() - self.start
    }
}

/// Appends a `Put`; returns the record's size (tests write records whole;
/// the store writes them with `put_split`).
#[cfg(test)]
pub fn put(
    out: &mut Vec<u8>,
    seed: Seed,
    accepted_ms: u64,
    copies: &[(Arc<str>, u64)],
    clip: &StoredClip,
) -> usize {
    let mut bodies = Vec::new();
    let n = put_split(out, &mut bodies, seed, accepted_ms, copies, clip);
    for (at, body) in bodies.into_iter().rev() {
        out.splice(at..at, body.iter().copied());
    }
    n
}

/// Appends a `Put` without copying the clip's packet records: they are
/// noted in `bodies` as (offset in `out`, bytes) to be written there
/// (`writev`). The checksum covers them. Returns the record's size.
pub fn put_split(
    out: &mut Vec<u8>,
    bodies: &mut Vec<(usize, bytes::Bytes)>,
    seed: Seed,
    accepted_ms: u64,
    copies: &[(Arc<str>, u64)],
    clip: &StoredClip,
) -> usize {
    let mut e = Encoder::begin(out, seed, PUT)
        .id(&clip.meta.id)
        .u64(accepted_ms)
        .str(&clip.meta.sender)
        .u32(copies.len() as u32);
    for (r, order) in copies {
        e = e.u64(*order).str(r);
    }
    let start = e.start;
    let out = e.out;
    // StoredClip::write_record, with the body left out.
    out.extend_from_slice(&(clip.header.len() as u32).to_be_bytes());
    out.extend_from_slice(&clip.header);
    out.extend_from_slice(&(clip.body.len() as u32).to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&clip.end_bytes);
    let mut h = hasher(seed);
    h.update(&out[start + 8..at]);
    h.update(&clip.body);
    h.update(&out[at..]);
    let len = (out.len() - start - 8 + clip.body.len()) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&h.finalize().to_le_bytes());
    bodies.push((at, clip.body.clone()));
    8 + len as usize
}

pub fn add_copy(out: &mut Vec<u8>, seed: Seed, id: &ClipId, order: u64, recipient: &str) -> usize {
    Encoder::begin(out, seed, ADD_COPY)
        .id(id)
        .u64(order)
        .str(recipient)
        .finish()
}

pub fn ack(out: &mut Vec<u8>, seed: Seed, id: &ClipId, recipient: &str) -> usize {
    Encoder::begin(out, seed, ACK)
        .id(id)
        .str(recipient)
        .finish()
}

pub fn id(out: &mut Vec<u8>, seed: Seed, id: &ClipId, accepted_ms: u64, sender: &str) -> usize {
    Encoder::begin(out, seed, ID)
        .id(id)
        .u64(accepted_ms)
        .str(sender)
        .finish()
}

/// Appends a `Seal`: the segment ends here.
pub fn seal(out: &mut Vec<u8>, seed: Seed) -> usize {
    Encoder::begin(out, seed, SEAL).finish()
}

/// A cursor over a record's payload.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn id(&mut self) -> Option<ClipId> {
        Some(ClipId(self.take(16)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<Arc<str>> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(n)?).ok().map(Arc::from)
    }
}

fn decode(kind: u8, payload: &[u8]) -> Option<Record> {
    let mut r = Rd(payload);
    let rec = match kind {
        PUT => {
            let id = r.id()?;
            let accepted_ms = r.u64()?;
            let sender = r.str()?;
            let n = r.u32()? as usize;
            // Each copy takes at least 10 bytes: no huge allocation from a
            // bogus count.
            let mut copies = Vec::with_capacity(n.min(r.0.len() / 10));
            for _ in 0..n {
                let order = r.u64()?;
                copies.push((r.str()?, order));
            }
            let clip = StoredClip::from_record(r.0)?;
            if clip.meta.id != id {
                return None;
            }
            r.0 = &[];
            Record::Put {
                id,
                accepted_ms,
                sender,
                copies,
                clip: Arc::new(clip),
            }
        }
        ADD_COPY => Record::AddCopy {
            id: r.id()?,
            order: r.u64()?,
            recipient: r.str()?,
        },
        ACK => Record::Ack {
            id: r.id()?,
            recipient: r.str()?,
        },
        ID => Record::Id {
            id: r.id()?,
            accepted_ms: r.u64()?,
            sender: r.str()?,
        },
        SEAL => Record::Seal,
        _ => return None,
    };
    r.0.is_empty().then_some(rec)
}

/// What reading a file found.
#[derive(Debug, Default)]
pub struct Parsed {
    pub records: Vec<Record>,
    /// Records whose checksum held but whose content did not parse.
    pub bad_records: u64,
    /// Where the valid prefix ends (bytes), when something after it was
    /// cut short or failed its checksum; `None` when the whole file is
    /// valid or ends with a `Seal`.
    pub valid_until: Option<usize>,
    /// The file ended with a `Seal` (not included in `records`); bytes
    /// after it (an earlier life's) were not read.
    pub sealed: bool,
    /// Written by the first version (magic `PTTSEG1`).
    pub v1: bool,
}

/// Reads a whole file: its magic, then records until the end, a `Seal`, or
/// the first torn or damaged one. `None` when the magic is wrong (not our
/// file, or damaged from its first byte). `seed` is the file's number for
/// a segment (ignored for a first-version one), `None` for an ids file.
pub fn parse(bytes: &[u8], magic: &[u8; 8], seed: Seed) -> Option<Parsed> {
    if bytes.len() < 8 {
        // A file created and cut before its magic reached the disk.
        return Some(Parsed {
            valid_until: (!bytes.is_empty()).then_some(0),
            ..Parsed::default()
        })
        .filter(|_| magic.starts_with(bytes));
    }
    let mut out = Parsed::default();
    let seed = if &bytes[..8] == magic {
        seed
    } else if magic == SEGMENT_MAGIC && &bytes[..8] == SEGMENT_MAGIC_V1 {
        out.v1 = true;
        None
    } else {
        return None;
    };
    let mut at = 8;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 8) else {
            out.valid_until = Some(at);
            break;
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let Some(body) = bytes
            .get(at + 8..at + 8 + len)
            .filter(|_| (1..=MAX_RECORD).contains(&len))
        else {
            out.valid_until = Some(at);
            break;
        };
        let mut h = hasher(seed);
        h.update(body);
        if h.finalize() != crc {
            out.valid_until = Some(at);
            break;
        }
        match decode(body[0], &body[1..]) {
            Some(Record::Seal) => {
                out.sealed = true;
                break;
            }
            Some(r) => out.records.push(r),
            None => out.bad_records += 1,
        }
        at += 8 + len;
    }
    Some(out)
}

/// A file the log appends to.
pub trait LogFile: Send {
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Appends `parts` in order, as one write where the file allows.
    fn append_parts(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        self.append(&parts.concat())
    }
    /// Makes what was appended durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
}

/// The directory holding the log's files.
pub trait LogDir: Send + Sync {
    /// File names in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Creates an empty file (replacing one of the same name).
    fn create(&self, name: &str) -> io::Result<Box<dyn LogFile>>;
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Renames `from` to `to` and opens it to be written again from its
    /// first byte (overwriting, the file keeping its size and blocks).
    fn reuse(&self, from: &str, to: &str) -> io::Result<Box<dyn LogFile>>;
    /// Makes creations, removals and renames durable (fsync of the
    /// directory).
    fn sync(&self) -> io::Result<()>;
}

/// The real thing: a directory on the local file system.
pub struct FsDir(PathBuf);

impl FsDir {
    pub fn open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        Ok(FsDir(path.to_owned()))
    }
}

struct FsFile(std::fs::File);

impl LogFile for FsFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        self.0.write_all(data)
    }
    fn append_parts(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        use std::io::{IoSlice, Write};
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.0.write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl LogDir for FsDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.0)? {
            if let Some(n) = e?.file_name().to_str() {
                out.push(n.to_owned());
            }
        }
        Ok(out)
    }
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.0.join(name))
    }
    fn create(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.0.join(name))?;
        Ok(Box::new(FsFile(f)))
    }
    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.0.join(name))?;
        f.set_len(len)?;
        f.sync_all()
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.0.join(name))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.0.join(from), self.0.join(to))
    }
    fn reuse(&self, from: &str, to: &str) -> io::Result<Box<dyn LogFile>> {
        self.rename(from, to)?;
        // Opened without truncation: writes start at offset 0.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.0.join(to))?;
        Ok(Box::new(FsFile(f)))
    }
    fn sync(&self) -> io::Result<()> {
        std::fs::File::open(&self.0)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ClipMeta;
    use bytes::Bytes;
    use codec::ClipEnd;
    use codec::wire::{AudioFormat, Target};

    fn clip(n: u8) -> StoredClip {
        StoredClip::new(
            Arc::new(ClipMeta {
                id: ClipId([n; 16]),
                sender: "alice".into(),
                target: Target::User("bob".into()),
                format: AudioFormat::default(),
                created_ms: 1234,
            }),
            Bytes::from(vec![2, 0xf8, n]),
            ClipEnd {
                packet_count: 1,
                final_granule: 960,
            },
        )
    }

    const N: Seed = Some(7);

    fn records(b: &mut Vec<u8>, seed: Seed) {
        let copies = vec![(Arc::<str>::from("bob"), 7), (Arc::from("carol"), 8)];
        put(b, seed, 99, &copies, &clip(1));
        add_copy(b, seed, &ClipId([1; 16]), 9, "dave");
        ack(b, seed, &ClipId([1; 16]), "bob");
        id(b, seed, &ClipId([2; 16]), 100, "erin");
    }

    fn file() -> Vec<u8> {
        let mut b = SEGMENT_MAGIC.to_vec();
        records(&mut b, N);
        b
    }

    #[test]
    fn records_round_trip() {
        let p = parse(&file(), SEGMENT_MAGIC, N).unwrap();
        assert_eq!(p.valid_until, None);
        assert_eq!(p.bad_records, 0);
        assert_eq!(p.records.len(), 4);
        match &p.records[0] {
            Record::Put {
                id,
                accepted_ms,
                sender,
                copies,
                clip,
            } => {
                assert_eq!((id.0[0], *accepted_ms, &**sender), (1, 99, "alice"));
                assert_eq!(copies[1], (Arc::from("carol"), 8));
                assert_eq!(clip.body, Bytes::from(vec![2, 0xf8, 1]));
            }
            r => panic!("{r:?}"),
        }
        assert!(
            matches!(&p.records[1], Record::AddCopy { order: 9, recipient, .. } if &**recipient == "dave")
        );
        assert!(matches!(&p.records[2], Record::Ack { recipient, .. } if &**recipient == "bob"));
        assert!(matches!(
            &p.records[3],
            Record::Id {
                accepted_ms: 100,
                ..
            }
        ));
    }

    #[test]
    fn a_cut_anywhere_keeps_the_whole_records_before_it() {
        let f = file();
        let full = parse(&f, SEGMENT_MAGIC, N).unwrap().records.len();
        let mut last = 0;
        for cut in 8..f.len() {
            let p = parse(&f[..cut], SEGMENT_MAGIC, N).unwrap();
            assert!(p.records.len() >= last && p.records.len() < full);
            last = p.records.len();
            assert!(p.valid_until.is_none_or(|v| v < cut));
        }
    }

    #[test]
    fn a_flipped_byte_stops_the_valid_prefix_there() {
        let f = file();
        for at in 8..f.len() {
            let mut g = f.clone();
            g[at] ^= 0x40;
            let p = parse(&g, SEGMENT_MAGIC, N).unwrap();
            assert!(p.valid_until.is_some_and(|v| v <= at), "flip at {at}");
        }
        assert!(parse(b"PTTIDS1\n", SEGMENT_MAGIC, N).is_none());
        assert!(parse(b"garbage!garbage", SEGMENT_MAGIC, N).is_none());
        assert_eq!(
            parse(b"PTT", SEGMENT_MAGIC, N).unwrap().valid_until,
            Some(0)
        );
    }

    #[test]
    fn records_of_another_segment_number_do_not_read() {
        let p = parse(&file(), SEGMENT_MAGIC, Some(8)).unwrap();
        assert_eq!((p.records.len(), p.valid_until), (0, Some(8)));
    }

    #[test]
    fn a_recycled_file_reads_up_to_its_new_end() {
        // Its first life: sealed after the records.
        let mut old = file();
        seal(&mut old, N);
        // Its second life, under number 9: one record over the start.
        let mut new = SEGMENT_MAGIC.to_vec();
        ack(&mut new, Some(9), &ClipId([3; 16]), "zed");
        let mut f = old.clone();
        f[..new.len()].copy_from_slice(&new);
        let p = parse(&f, SEGMENT_MAGIC, Some(9)).unwrap();
        assert_eq!(p.records.len(), 1);
        assert!(!p.sealed);
        assert_eq!(p.valid_until, Some(new.len()));
        // Sealed in its second life: the old bytes after the seal are not
        // read, and it is whole.
        seal(&mut new, Some(9));
        f[..new.len()].copy_from_slice(&new);
        let p = parse(&f, SEGMENT_MAGIC, Some(9)).unwrap();
        assert_eq!((p.records.len(), p.sealed, p.valid_until), (1, true, None));
        // The first life read alone.
        let p = parse(&old, SEGMENT_MAGIC, N).unwrap();
        assert_eq!((p.records.len(), p.sealed, p.valid_until), (4, true, None));
    }

    #[test]
    fn a_reused_file_is_written_from_its_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = FsDir::open(tmp.path()).unwrap();
        let mut f = dir.create("a").unwrap();
        f.append(b"abcdef").unwrap();
        f.sync().unwrap();
        let mut f = dir.reuse("a", "b").unwrap();
        f.append_parts(&[b"X", b"Y"]).unwrap();
        f.sync().unwrap();
        assert_eq!(dir.read("b").unwrap(), b"XYcdef");
        assert_eq!(dir.list().unwrap(), vec!["b".to_owned()]);
    }

    #[test]
    fn first_version_segments_still_read() {
        let mut b = SEGMENT_MAGIC_V1.to_vec();
        records(&mut b, None);
        let p = parse(&b, SEGMENT_MAGIC, Some(42)).unwrap();
        assert_eq!((p.records.len(), p.valid_until), (4, None));
        assert!(parse(&b, IDS_MAGIC, None).is_none());
    }
}
