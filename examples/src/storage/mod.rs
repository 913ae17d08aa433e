//! A storage node: blobs on disk, written and read with `O_DIRECT` from and
//! into page-aligned payload memory, moved in chunks under credit-based
//! flow control, checked with CRC32C end to end, and placed over several
//! nodes by rendezvous hashing.
//!
//! # Protocol
//! The messages are defined in `examples/proto/storage.proto` (package
//! `pagerpc.examples.storage`, see [`messages`]). A blob is moved in chunks
//! of `chunk_size` bytes (a page multiple chosen by the client, 4 MiB by
//! default; only the last chunk may be shorter), so neither side ever holds
//! more than a few chunks of it.
//!
//! | method | request | payload | response |
//! |---|---|---|---|
//! | `put.begin` | [`PutBegin`] (id, size, chunk size, optional CRC32C) | none | [`PutBeginResponse`] (upload handle, credits W) |
//! | `put.chunk` | [`PutChunk`] (upload, offset, chunk CRC32C) | the chunk | [`PutChunkResponse`] |
//! | `put.commit` | [`PutCommit`] (upload, CRC32C) | none | [`BlobInfo`] |
//! | `put.abort` | [`UploadRef`] | none | [`Empty`] |
//! | `get.begin` | [`BlobRef`] | none | [`BlobInfo`] (size, CRC32C, chunk size, credits W) |
//! | `get.chunk` | [`GetChunk`] (id, offset, len, expected version) | none | [`GetChunkResponse`] (stored chunk CRC32C) + the chunk |
//! | `blob.list` | [`ListRequest`] (start after, limit) | none | [`BlobList`] (one page, `more`) |
//! | `blob.delete` | [`BlobRef`] | none | [`DeleteResponse`] |
//! | `node.stats` | [`Empty`] | none | [`NodeStats`] |
//!
//! **Flow control.** `put.begin` and `get.begin` grant the client W credits:
//! the number of chunk calls it may have in flight on that transfer. The
//! node sizes W from its memory budget and the transfers under way (at
//! least 1, at most `max_credits`), so a node receiving many blobs at once
//! holds at most about `budget` bytes of chunks, and a client at most W
//! chunks per replica, whatever the blob's size.
//!
//! **Limits.** `put.begin` is refused with [`Code::ResourceExhausted`],
//! naming the limit and the value, when the blob is over the node's
//! `max_blob_bytes` or its free disk space (less what uploads under way
//! will still write), or when the connection or the node already has its
//! most uploads under way (`max_uploads_per_conn`, `max_uploads`). Nothing
//! is allocated in proportion to the size a client announces.
//!
//! **Listing.** `blob.list` returns one page of blobs in id order (at most
//! [`MAX_LIST_LIMIT`] entries and [`MAX_LIST_PAGE_BYTES`] bytes); the
//! client asks again with `start_after` set to the last id until `more` is
//! false. Each page costs the node one scan of its directory, so the
//! client asks for the largest pages.
//!
//! **Integrity.** The client sends each chunk's CRC32C with it and the
//! blob's CRC32C with `put.begin` or `put.commit`; the node checks each
//! chunk as it arrives and the whole blob (combining the chunk CRCs) before
//! it acknowledges the commit. A mismatch is [`Code::DataLoss`] and the
//! upload is discarded. The node stores every chunk's CRC and the blob's id
//! in the blob's header, checks each chunk it reads back from disk, refuses
//! to serve a file whose header names another blob, and the client checks
//! each chunk and the whole blob again after a GET.
//!
//! **Durability.** Chunks are written to `DIR/.tmp-<id>-<random>`; the
//! commit writes the header, fsyncs the file, renames it to `DIR/<id>.blob`,
//! and fsyncs the directory, then acknowledges. A blob is visible only
//! whole. Temporary files of a client that went away are removed after
//! `upload_timeout` without activity, and at startup.
//!
//! # Inside the node
//! An upload is an [`upload::UploadSession`] (begin with a size, write
//! chunks, commit or abort) and a download a [`reader::BlobReader`] over an
//! open blob file, so a streaming handler can drive either directly; the
//! unary handlers above are thin adapters over them.
//!
//! [`Code::DataLoss`]: pagerpc::Code::DataLoss
//! [`Code::ResourceExhausted`]: pagerpc::Code::ResourceExhausted

mod cache;
pub mod client;
pub mod format;
pub mod node;
pub mod reader;
pub mod upload;

pub use client::{ClientOptions, GetReport, ListedBlob, PutReport, StorageClient, StorageError};
pub use node::{NodeConfig, StorageNode};

/// Method names.
pub mod method {
    /// Start an upload.
    pub const PUT_BEGIN: &str = "put.begin";
    /// Send one chunk of an upload.
    pub const PUT_CHUNK: &str = "put.chunk";
    /// Verify, persist and publish an upload.
    pub const PUT_COMMIT: &str = "put.commit";
    /// Give up an upload.
    pub const PUT_ABORT: &str = "put.abort";
    /// Look a blob up before reading it.
    pub const GET_BEGIN: &str = "get.begin";
    /// Read one chunk of a blob.
    pub const GET_CHUNK: &str = "get.chunk";
    /// List one page of the node's blobs.
    pub const LIST: &str = "blob.list";
    /// Delete a blob.
    pub const DELETE: &str = "blob.delete";
    /// The node's statistics.
    pub const STATS: &str = "node.stats";
}

/// The default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// The largest chunk size a node accepts: 64 MiB.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// The smallest chunk size a node accepts: 64 KiB.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// The page size chunk sizes are multiples of.
pub const PAGE: u64 = 4096;
/// Entries in a `blob.list` page when the request's limit is 0.
pub const DEFAULT_LIST_LIMIT: u32 = 1000;
/// Most entries in a `blob.list` page, whatever the request asks.
pub const MAX_LIST_LIMIT: u32 = 10_000;
/// Most encoded bytes of a `blob.list` response: a page stops before it
/// would grow past this, a quarter of pagerpc's default 4 MiB limit on a
/// message body (10,000 entries with short ids take about 300 KiB).
pub const MAX_LIST_PAGE_BYTES: usize = 1 << 20;

/// The protocol's messages, generated from `examples/proto/storage.proto`
/// (package `pagerpc.examples.storage`) by `examples/build.rs`; an outside
/// client can compile the same file. Re-exported at the module root.
pub mod messages {
    include!(concat!(env!("OUT_DIR"), "/pagerpc.examples.storage.rs"));
}

pub use messages::{
    BlobInfo, BlobList, BlobRef, DeleteResponse, Empty, GetChunk, GetChunkResponse, ListRequest,
    NodeStats, PutBegin, PutBeginResponse, PutChunk, PutChunkResponse, PutCommit, UploadRef,
};

impl NodeStats {
    /// Percentage of received payload bytes that were mapped.
    pub fn mapped_percent(&self) -> f64 {
        let t = self.bytes_mapped + self.bytes_copied;
        if t == 0 {
            0.0
        } else {
            100.0 * self.bytes_mapped as f64 / t as f64
        }
    }
}

/// Checks a blob id: 1 to 200 characters of `A-Z a-z 0-9 . _ -`, not
/// starting with a dot (ids are file names on the node).
///
/// # Errors
/// A message saying what is wrong.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 200 {
        return Err(format!("blob id '{id}' must be 1 to 200 characters long"));
    }
    if id.starts_with('.') {
        return Err(format!("blob id '{id}' may not start with '.'"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "blob id '{id}' has the character {c:?}; use only A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Rendezvous (highest-random-weight) ranking of `nodes` for blob `id`:
/// every node gets the score `hash(node, id)` and nodes are ranked by
/// score, highest first. A blob's replicas go to the first R nodes; adding
/// or removing a node moves only the blobs it ranks first for.
pub fn rank_nodes<T: std::fmt::Display + Clone>(nodes: &[T], id: &str) -> Vec<T> {
    let mut scored: Vec<(u64, T)> = nodes
        .iter()
        .map(|n| (score(&n.to_string(), id), n.clone()))
        .collect();
    scored.sort_by_key(|s| std::cmp::Reverse(s.0));
    scored.into_iter().map(|(_, n)| n).collect()
}

/// The rendezvous weight of (node, id): the first 8 bytes of
/// SHA-256(node ‖ 0 ‖ id).
fn score(node: &str, id: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Length of the chunk at `offset` of a blob of `size` bytes.
pub fn chunk_len(size: u64, chunk_size: u64, offset: u64) -> u64 {
    chunk_size.min(size.saturating_sub(offset))
}

/// Writes `data` at `pos` (a page multiple): its whole pages through
/// `direct` (a descriptor opened with `O_DIRECT`, or a buffered one when
/// the filesystem refuses it), the rest (`len % 4096`) through `buffered`.
/// `data` must start page-aligned, as [`pagerpc::Pages`] and
/// [`pagerpc::PageBuf`] do. If the kernel refuses direct I/O from these
/// pages (`EFAULT`/`EINVAL`: some memory cannot be pinned), they are
/// copied once into fresh page-aligned memory and written from there.
/// Returns whether that copy was needed.
///
/// # Errors
/// The write's error.
pub fn write_split(
    direct: &std::fs::File,
    buffered: &std::fs::File,
    data: &[u8],
    pos: u64,
) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let whole = data.len() & !(PAGE as usize - 1);
    let mut copied = false;
    if whole > 0 {
        match direct.write_all_at(&data[..whole], pos) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT) | Some(libc::EINVAL)) => {
                copied = true;
                let mut b = pagerpc::PageBuf::new(whole)?;
                b.copy_from_slice(&data[..whole]);
                direct.write_all_at(&b, pos)?;
            }
            r => r?,
        }
    }
    if whole < data.len() {
        buffered.write_all_at(&data[whole..], pos + whole as u64)?;
    }
    Ok(copied)
}

/// Opens `path` for writing twice: once with `O_DIRECT` (or without, if
/// the filesystem refuses it) and once buffered, for [`write_split`].
/// Returns the two descriptors and whether the first is direct.
///
/// # Errors
/// When the file cannot be opened.
pub fn open_split(
    path: &std::path::Path,
    opts: &std::fs::OpenOptions,
    try_direct: bool,
) -> std::io::Result<(std::fs::File, std::fs::File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut direct = true;
    let d = if try_direct {
        match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                direct = false;
                opts.open(path)?
            }
            Err(e) => return Err(e),
        }
    } else {
        direct = false;
        opts.open(path)?
    };
    let b = std::fs::OpenOptions::new().write(true).open(path)?;
    Ok((d, b, direct))
}

/// A status for an I/O error while doing `what`: a full disk or a node out
/// of file descriptors is [`ResourceExhausted`](pagerpc::Code), anything
/// else [`Internal`](pagerpc::Code).
pub(crate) fn io_status(what: impl std::fmt::Display, e: &std::io::Error) -> pagerpc::Status {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            pagerpc::Status::resource_exhausted(format!("{what}: the node's disk is full ({e})"))
        }
        Some(libc::EMFILE) | Some(libc::ENFILE) => pagerpc::Status::resource_exhausted(format!(
            "{what}: the node is out of file descriptors ({e})"
        )),
        _ => pagerpc::Status::internal(format!("{what}: {e}")),
    }
}

/// Fsyncs a directory (after a rename or unlink in it).
pub(crate) fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Rounds `n` up to a whole number of pages.
pub fn round_up_page(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("photo-1.jpg").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id(".tmp").is_err());
        assert!(check_id("a/b").is_err());
        assert!(check_id(&"x".repeat(201)).is_err());
    }

    #[test]
    fn rendezvous_is_stable_and_spreads() {
        let nodes = ["10.0.0.1:7100", "10.0.0.2:7100", "10.0.0.3:7100"];
        let r1 = rank_nodes(&nodes, "blob-1");
        assert_eq!(r1, rank_nodes(&nodes, "blob-1"));
        assert_eq!(r1.len(), 3);
        // Removing a node that is not first keeps the first.
        let rest: Vec<&str> = nodes.iter().copied().filter(|n| *n != r1[2]).collect();
        assert_eq!(rank_nodes(&rest, "blob-1")[0], r1[0]);
        // Every node is first for some ids.
        let mut firsts = std::collections::HashSet::new();
        for i in 0..100 {
            firsts.insert(rank_nodes(&nodes, &format!("b{i}"))[0]);
        }
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn crc_combine_from_empty() {
        let a = b"hello, ";
        let b = b"world";
        let whole = crc32c::crc32c(b"hello, world");
        let c = crc32c::crc32c_combine(0, crc32c::crc32c(a), a.len());
        let c = crc32c::crc32c_combine(c, crc32c::crc32c(b), b.len());
        assert_eq!(c, whole);
    }
}
