//! The on-disk blob format.
//!
//! A blob file `DIR/<id>.blob` is a header of `header_len` bytes (a page
//! multiple, so the data that follows starts page-aligned for `O_DIRECT`)
//! followed by the blob's bytes:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "PGRPCBLB"
//!      8     4  format version (1), little-endian like every field
//!     12     4  header_len
//!     16     8  blob size
//!     24     4  blob CRC32C
//!     28     4  number of chunks n
//!     32     8  chunk size
//!     40     8  writer's version stamp
//!     48    4n  CRC32C of each chunk
//!  48+4n     4  CRC32C of bytes 0 .. 48+4n (the header's own checksum)
//!           ..  zero padding to header_len
//! ```

use pagerpc::PageBuf;

use super::round_up_page;

/// The magic bytes a blob file starts with.
pub const MAGIC: &[u8; 8] = b"PGRPCBLB";
/// The format version written.
pub const FORMAT: u32 = 1;
const FIXED: usize = 48;

/// A blob's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    /// Blob size in bytes.
    pub size: u64,
    /// CRC32C of the blob.
    pub crc32c: u32,
    /// Chunk size.
    pub chunk_size: u64,
    /// The writer's version stamp.
    pub version: u64,
    /// CRC32C of each chunk.
    pub chunk_crcs: Vec<u32>,
}

/// Number of chunks of a blob.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// Header length for a blob of `n` chunks.
pub fn header_len(n: u64) -> u64 {
    round_up_page(FIXED as u64 + 4 * n + 4)
}

impl BlobHeader {
    /// The header's length on disk.
    pub fn len(&self) -> u64 {
        header_len(self.chunk_crcs.len() as u64)
    }

    /// Whether the header describes an empty blob.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Encodes the header into page-aligned memory of [`len`](Self::len)
    /// bytes, ready for an `O_DIRECT` write.
    ///
    /// # Errors
    /// When the memory cannot be allocated.
    pub fn encode(&self) -> std::io::Result<PageBuf> {
        let len = self.len() as usize;
        let mut b = PageBuf::new(len)?;
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        b[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc32c.to_le_bytes());
        b[28..32].copy_from_slice(&(self.chunk_crcs.len() as u32).to_le_bytes());
        b[32..40].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.version.to_le_bytes());
        let mut at = FIXED;
        for c in &self.chunk_crcs {
            b[at..at + 4].copy_from_slice(&c.to_le_bytes());
            at += 4;
        }
        let own = crc32c::crc32c(&b[..at]);
        b[at..at + 4].copy_from_slice(&own.to_le_bytes());
        Ok(b)
    }

    /// The header length a file declares, from its first bytes (at least
    /// 16), so a reader knows how much to read before [`decode`].
    ///
    /// [`decode`]: Self::decode
    ///
    /// # Errors
    /// When the bytes are not the start of a blob header.
    pub fn declared_len(first: &[u8]) -> Result<u64, String> {
        if first.len() < 16 || &first[0..8] != MAGIC {
            return Err("not a blob file (bad magic)".into());
        }
        let format = u32_at(first, 8);
        if format != FORMAT {
            return Err(format!("unknown blob format version {format}"));
        }
        Ok(u64::from(u32_at(first, 12)))
    }

    /// Decodes and checks a header.
    ///
    /// # Errors
    /// A message naming what is wrong: magic, version, lengths, or the
    /// header's own checksum.
    pub fn decode(b: &[u8]) -> Result<BlobHeader, String> {
        let declared = Self::declared_len(b)?;
        if b.len() < FIXED || (b.len() as u64) < declared {
            return Err(format!(
                "header truncated: {} bytes, declares {declared}",
                b.len()
            ));
        }
        let size = u64_at(b, 16);
        let crc = u32_at(b, 24);
        let n = u64::from(u32_at(b, 28));
        let chunk_size = u64_at(b, 32);
        let version = u64_at(b, 40);
        if header_len(n) != declared {
            return Err(format!("header length {declared} does not fit {n} chunks"));
        }
        if chunk_size == 0 || chunk_count(size, chunk_size) != n {
            return Err(format!(
                "header says {n} chunks of {chunk_size} bytes for {size} bytes"
            ));
        }
        let end = FIXED + 4 * n as usize;
        let own = u32_at(b, end);
        let computed = crc32c::crc32c(&b[..end]);
        if own != computed {
            return Err(format!(
                "header checksum mismatch: stored {own:#010x}, computed {computed:#010x}"
            ));
        }
        let chunk_crcs = (0..n as usize).map(|i| u32_at(b, FIXED + 4 * i)).collect();
        Ok(BlobHeader {
            size,
            crc32c: crc,
            chunk_size,
            version,
            chunk_crcs,
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let h = BlobHeader {
            size: 10 << 20,
            crc32c: 0xdead_beef,
            chunk_size: 4 << 20,
            version: 42,
            chunk_crcs: vec![1, 2, 3],
        };
        let b = h.encode().unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(BlobHeader::declared_len(&b).unwrap(), 4096);
        assert_eq!(BlobHeader::decode(&b).unwrap(), h);
        let mut bad = b.to_vec();
        bad[50] ^= 1;
        assert!(BlobHeader::decode(&bad)
            .unwrap_err()
            .contains("checksum mismatch"));
        // Many chunks spill over one page.
        assert_eq!(header_len(2000), 8192);
    }
}
