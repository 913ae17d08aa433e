//! A bounded reader over a byte slice, in the style of rustls' `codec::Reader`:
//! every read says how many bytes it needs and fails cleanly when they are
//! not there.

/// A cursor over a borrowed byte slice that never reads past its end.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    cursor: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, cursor: 0 }
    }

    /// Takes the next `n` bytes, or `None` if fewer than `n` remain (in which
    /// case nothing is consumed).
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.cursor.checked_add(n)?;
        let out = self.buf.get(self.cursor..end)?;
        self.cursor = end;
        Some(out)
    }

    /// Takes exactly `N` bytes as an array.
    pub fn take_array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }

    /// Reads a little-endian `u8`.
    pub fn u8(&mut self) -> Option<u8> {
        self.take_array::<1>().map(|[b]| b)
    }

    /// Reads a little-endian `u16`.
    pub fn u16_le(&mut self) -> Option<u16> {
        self.take_array().map(u16::from_le_bytes)
    }

    /// Reads a little-endian `u32`.
    pub fn u32_le(&mut self) -> Option<u32> {
        self.take_array().map(u32::from_le_bytes)
    }

    /// Reads a little-endian `u64`.
    pub fn u64_le(&mut self) -> Option<u64> {
        self.take_array().map(u64::from_le_bytes)
    }

    /// How many bytes have been consumed.
    pub fn used(&self) -> usize {
        self.cursor
    }

    /// How many bytes are left.
    pub fn left(&self) -> usize {
        self.buf.len() - self.cursor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_reads_past_end() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16_le(), Some(0x0201));
        assert_eq!(r.u16_le(), None);
        assert_eq!(r.left(), 1);
        assert_eq!(r.u8(), Some(3));
        assert_eq!(r.take(0), Some(&[][..]));
        assert_eq!(r.take(usize::MAX), None);
        assert_eq!(r.used(), 3);
    }
}
