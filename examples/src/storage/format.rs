//! The on-disk blob format.
//!
//! A blob file `DIR/<id>.blob` is a header of `header_len` bytes (a page
//! multiple, so the data that follows starts page-aligned for `O_DIRECT`)
//! followed by the blob's bytes. Every field is little-endian.
//!
//! # Format 2 (written since the header records the blob's id)
//!
//! ```text
//! offset  size  field
//!      0     8  magic "PGRPCBLB"
//!      8     4  format version (2)
//!     12     4  header_len
//!     16     8  blob size
//!     24     4  blob CRC32C
//!     28     4  number of chunks n (at most MAX_CHUNKS)
//!     32     8  chunk size
//!     40     8  writer's version stamp
//!     48     4  length L of the blob id (1 to 200)
//!     52     L  the blob id (ASCII, as check_id allows)
//!   52+L    4n  CRC32C of each chunk
//! 52+L+4n    4  CRC32C of bytes 0 .. 52+L+4n (the header's own checksum)
//!           ..  zero padding to header_len
//! ```
//!
//! The id lets a node refuse to serve a file that was renamed or copied
//! to another blob's name: `DIR/b.blob` whose header says `a` is not blob
//! `b`.
//!
//! # Format 1 (still read)
//!
//! The same without the id: the chunk CRCs start at offset 48. A node
//! still reads these files (decoding them costs nothing extra); they have
//! no id to check, so such a file is trusted to be the blob its name says.
//! (Format-1 files of more than [`MAX_CHUNKS`] chunks, which old nodes
//! allowed, are not read.) Every commit writes format 2.

use pagerpc::PageBuf;

use super::round_up_page;

/// The magic bytes a blob file starts with.
pub const MAGIC: &[u8; 8] = b"PGRPCBLB";
/// The format version written.
pub const FORMAT: u32 = 2;
/// The first format, without the blob id; still read.
pub const FORMAT_V1: u32 = 1;
/// Most chunks a blob may have: its header then holds at most 4 MiB of
/// chunk CRCs.
pub const MAX_CHUNKS: u64 = 1 << 20;
/// Longest blob id, in bytes (as [`check_id`](super::check_id) allows).
pub const MAX_ID_LEN: usize = 200;
/// Fixed part of a format-1 header.
const FIXED_V1: usize = 48;
/// Fixed part of a format-2 header, before the id.
const FIXED: usize = 52;

/// A blob's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    /// The blob id the file was written for; `None` for a format-1 file,
    /// which does not record it ([`encode`](Self::encode) then writes
    /// format 1).
    pub id: Option<String>,
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

/// Header length (where the data starts) of a format-2 file for a blob
/// whose id has `id_len` bytes and which has `n` chunks. Plain arithmetic:
/// nothing is allocated.
pub fn header_len(id_len: usize, n: u64) -> u64 {
    round_up_page(FIXED as u64 + id_len as u64 + 4 * n + 4)
}

/// Header length of a format-1 file of `n` chunks.
pub fn header_len_v1(n: u64) -> u64 {
    round_up_page(FIXED_V1 as u64 + 4 * n + 4)
}

/// The longest header a file may declare (about 4 MiB); a longer
/// declaration is treated as corruption, and nothing is allocated for it.
pub fn max_header_len() -> u64 {
    header_len(MAX_ID_LEN, MAX_CHUNKS)
}

impl BlobHeader {
    /// The header's length on disk (a page multiple).
    pub fn len(&self) -> u64 {
        let n = self.chunk_crcs.len() as u64;
        match &self.id {
            Some(id) => header_len(id.len(), n),
            None => header_len_v1(n),
        }
    }

    /// Whether the header describes an empty blob.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Encodes the header into page-aligned memory of [`len`](Self::len)
    /// bytes, ready for an `O_DIRECT` write: format 2 when it has an id,
    /// format 1 otherwise.
    ///
    /// # Errors
    /// When the memory cannot be allocated, or the id is longer than
    /// [`MAX_ID_LEN`] (`InvalidInput`).
    pub fn encode(&self) -> std::io::Result<PageBuf> {
        if self.id.as_ref().is_some_and(|id| id.len() > MAX_ID_LEN) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("blob id longer than {MAX_ID_LEN} bytes"),
            ));
        }
        let len = self.len() as usize;
        let mut b = PageBuf::new(len)?;
        b[0..8].copy_from_slice(MAGIC);
        let format = if self.id.is_some() { FORMAT } else { FORMAT_V1 };
        b[8..12].copy_from_slice(&format.to_le_bytes());
        b[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc32c.to_le_bytes());
        b[28..32].copy_from_slice(&(self.chunk_crcs.len() as u32).to_le_bytes());
        b[32..40].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.version.to_le_bytes());
        let mut at = FIXED_V1;
        if let Some(id) = &self.id {
            b[48..52].copy_from_slice(&(id.len() as u32).to_le_bytes());
            b[52..52 + id.len()].copy_from_slice(id.as_bytes());
            at = FIXED + id.len();
        }
        for c in &self.chunk_crcs {
            b[at..at + 4].copy_from_slice(&c.to_le_bytes());
            at += 4;
        }
        let own = crc32c::crc32c(&b[..at]);
        b[at..at + 4].copy_from_slice(&own.to_le_bytes());
        Ok(b)
    }

    /// The header length a file declares, from its first bytes (at least
    /// 16), so a reader knows how much to read before [`decode`]. A
    /// declaration over [`max_header_len`] is refused, so a corrupt file
    /// cannot make the reader allocate much.
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
        if format != FORMAT && format != FORMAT_V1 {
            return Err(format!(
                "unknown blob format version {format} (this node reads {FORMAT_V1} and {FORMAT})"
            ));
        }
        let declared = u64::from(u32_at(first, 12));
        if declared > max_header_len() {
            return Err(format!(
                "header length {declared} is over the largest possible, {}",
                max_header_len()
            ));
        }
        Ok(declared)
    }

    /// Decodes and checks a header (format 1 or 2).
    ///
    /// # Errors
    /// A message naming what is wrong: magic, version, lengths, the id, or
    /// the header's own checksum.
    pub fn decode(b: &[u8]) -> Result<BlobHeader, String> {
        let declared = Self::declared_len(b)?;
        let format = u32_at(b, 8);
        let fixed = if format == FORMAT { FIXED } else { FIXED_V1 };
        if b.len() < fixed || (b.len() as u64) < declared {
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
        let (id, start, want_len) = if format == FORMAT {
            let l = u32_at(b, 48) as usize;
            if l == 0 || l > MAX_ID_LEN {
                return Err(format!("id length {l} is not 1 to {MAX_ID_LEN}"));
            }
            if b.len() < FIXED + l {
                return Err(format!("header truncated inside the id ({l} bytes)"));
            }
            let id = std::str::from_utf8(&b[FIXED..FIXED + l])
                .map_err(|_| "the id is not UTF-8".to_owned())?;
            (Some(id.to_owned()), FIXED + l, header_len(l, n))
        } else {
            (None, FIXED_V1, header_len_v1(n))
        };
        if want_len != declared {
            return Err(format!("header length {declared} does not fit {n} chunks"));
        }
        if chunk_size == 0 || chunk_count(size, chunk_size) != n {
            return Err(format!(
                "header says {n} chunks of {chunk_size} bytes for {size} bytes"
            ));
        }
        // `declared` covers start + 4n + 4 (checked just above), and `b`
        // holds `declared` bytes.
        let end = start + 4 * n as usize;
        let own = u32_at(b, end);
        let computed = crc32c::crc32c(&b[..end]);
        if own != computed {
            return Err(format!(
                "header checksum mismatch: stored {own:#010x}, computed {computed:#010x}"
            ));
        }
        let chunk_crcs = (0..n as usize).map(|i| u32_at(b, start + 4 * i)).collect();
        Ok(BlobHeader {
            id,
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

    fn header(id: Option<&str>) -> BlobHeader {
        BlobHeader {
            id: id.map(str::to_owned),
            size: 10 << 20,
            crc32c: 0xdead_beef,
            chunk_size: 4 << 20,
            version: 42,
            chunk_crcs: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let h = header(Some("photo-1.jpg"));
        let b = h.encode().unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(BlobHeader::declared_len(&b).unwrap(), 4096);
        assert_eq!(BlobHeader::decode(&b).unwrap(), h);
        let mut bad = b.to_vec();
        bad[70] ^= 1;
        assert!(BlobHeader::decode(&bad)
            .unwrap_err()
            .contains("checksum mismatch"));
        // Many chunks spill over one page; the id takes its room.
        assert_eq!(header_len(10, 2000), 8192);
        assert_eq!(header_len(200, 1000), 8192);
        assert_eq!(header_len_v1(1000), 4096);
    }

    #[test]
    fn format_1_files_still_decode() {
        let h = header(None);
        let b = h.encode().unwrap();
        assert_eq!(u32_at(&b, 8), FORMAT_V1);
        assert_eq!(BlobHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn absurd_lengths_are_refused_before_allocating() {
        let mut b = header(Some("x")).encode().unwrap().to_vec();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(BlobHeader::declared_len(&b)
            .unwrap_err()
            .contains("largest possible"));
        let mut b = header(Some("x")).encode().unwrap().to_vec();
        b[48..52].copy_from_slice(&5000u32.to_le_bytes());
        assert!(BlobHeader::decode(&b).unwrap_err().contains("id length"));
    }
}
