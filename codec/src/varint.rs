//! QUIC variable-length integers (RFC 9000 §16) and a cursor over a byte
//! slice that reads them.
//!
//! Every integer on the wire is one of these unless the spec says otherwise:
//! the two top bits of the first byte give the length (1, 2, 4 or 8 bytes),
//! the rest is the value in network byte order.

use bytes::BufMut;

use crate::error::WireError;

/// Largest value a varint can carry (2^62 - 1).
pub const MAX: u64 = (1 << 62) - 1;

/// Number of bytes `v` takes on the wire.
pub fn len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Appends `v`. Values above [`MAX`] are a programming error on our side and
/// are clamped (they cannot come from a peer: every decoded value fits).
pub fn put(buf: &mut impl BufMut, v: u64) {
    let v = v.min(MAX);
    match len(v) {
        1 => buf.put_u8(v as u8),
        2 => buf.put_u16(0x4000 | v as u16),
        4 => buf.put_u32(0x8000_0000 | v as u32),
        _ => buf.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// Reads one varint from the front of `buf`: `Ok(Some((value, used)))`,
/// `Ok(None)` when `buf` ends before the varint does.
pub fn get(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let n = 1usize << (first >> 6);
    if buf.len() < n {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..n] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, n))
}

/// A cursor over a complete message body. Running out of bytes inside a body
/// is malformed input (the framing said how long the body is), so every read
/// returns [`WireError::Truncated`] rather than "need more".
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn varint(&mut self) -> Result<u64, WireError> {
        let (v, n) = get(self.buf).ok_or(WireError::Truncated(self.what))?;
        self.buf = &self.buf[n..];
        Ok(v)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    /// A varint length then that many bytes of UTF-8, at most `max` bytes.
    pub fn string(&mut self, field: &'static str, max: usize) -> Result<&'a str, WireError> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(WireError::FieldTooLong { field, max });
        }
        let raw = self.bytes(n as usize)?;
        std::str::from_utf8(raw).map_err(|_| WireError::InvalidUtf8(field))
    }

    /// Fails unless every byte of the body was used.
    pub fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes(self.what))
        }
    }
}

/// Appends a varint length then the bytes of `s`.
pub fn put_str(buf: &mut impl BufMut, s: &str) {
    put(buf, s.len() as u64);
    buf.put_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 Appendix A.1.
        assert_eq!(
            get(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(get(&[0x9d, 0x7f, 0x3e, 0x7d]), Some((494_878_333, 4)));
        assert_eq!(get(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(get(&[0x25]), Some((37, 1)));
        assert_eq!(get(&[0x40, 0x25]), Some((37, 2)));
        assert_eq!(get(&[0x7b]), None);
        assert_eq!(get(&[]), None);
    }

    proptest! {
        #[test]
        fn round_trip(v in 0..=MAX) {
            let mut buf = Vec::new();
            put(&mut buf, v);
            prop_assert_eq!(buf.len(), len(v));
            prop_assert_eq!(get(&buf), Some((v, buf.len())));
            // Every proper prefix is "need more".
            for cut in 0..buf.len() {
                prop_assert_eq!(get(&buf[..cut]), None);
            }
        }
    }
}
