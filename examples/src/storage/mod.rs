//! A storage node: blobs on disk, written and read with `O_DIRECT` from and
//! into page-aligned payload memory, moved as pagerpc streams under the
//! library's per-stream credit, checked with CRC32C end to end, and placed
//! over several nodes by rendezvous hashing.
//!
//! # Protocol
//! The protocol is the `Storage` service of `examples/proto/storage.proto`
//! (package `pagerpc.examples.storage`), compiled by pagerpc-build into
//! [`messages`]: the messages, the typed client
//! [`messages::StorageClient`] (which [`client::StorageClient`] uses on
//! each node), the server trait [`messages::Storage`] (which the node
//! implements, registered with [`messages::StorageServer`]) and the wire
//! names in [`storage_methods`]. A blob moves as one stream: a PUT is one
//! client-streaming call, a GET one server-streaming call, each message
//! carrying one chunk of `chunk_size` bytes (a page multiple chosen by the
//! writer, 4 MiB by default; only the last chunk may be shorter) as its
//! payload.
//!
//! | rpc (`pagerpc.examples.storage.Storage/…`) | shape | request | response |
//! |---|---|---|---|
//! | `Put` | client stream | [`PutMessage`]s: a [`PutHeader`] (id, size, chunk size, optional CRC32C), a [`PutChunk`] per chunk (payload: the chunk), a [`PutEnd`] (CRC32C) | [`BlobInfo`] |
//! | `Get` | server stream | [`GetRequest`] (id, offset, version) | [`GetMessage`]s: the [`BlobInfo`], then a [`GetChunk`] per chunk (payload: the chunk) |
//! | `List` | server stream | [`ListRequest`] (start after, limit) | [`BlobList`]s: pages of blobs in id order |
//! | `Stat` | unary | [`BlobRef`] | [`BlobInfo`] |
//! | `Delete` | unary | [`BlobRef`] | [`DeleteResponse`] |
//! | `NodeStats` | unary | [`Empty`] | [`NodeStats`] |
//!
//! **Flow control** is pagerpc's per-stream credit: a sender has at most
//! the receiver's `stream_window` bytes of messages outstanding, and gets
//! credit back as the receiver drops the payloads it was handed (the node
//! once a chunk is on disk, the client once it is in the output file). The
//! node keeps no window of its own; a transfer of any size holds about one
//! window of chunks on each side.
//!
//! **Uploads.** The node admits an upload when the stream's header arrives,
//! writes chunks in order as they come, and commits when the client
//! half-closes the stream. It refuses the header with
//! [`Code::ResourceExhausted`], naming the limit and the value, when the
//! blob is over the node's `max_blob_bytes` or its free disk space (less
//! what uploads under way will still write), or when the connection or the
//! node already has its most uploads under way (`max_uploads_per_conn`,
//! `max_uploads`); beyond `max_streams` streams the library refuses the
//! call itself. Nothing is allocated in proportion to the size a client
//! announces. An upload belongs to its stream: no other call can add to it
//! or commit it, and a stream that ends any other way than the client's
//! half-close (an error, the client's abort or cancel, a lost connection,
//! the deadline) discards it and its temporary file.
//!
//! **Listing.** `List` streams the blobs in id order, in pages of at
//! most [`MAX_LIST_PAGE_ENTRIES`] entries and [`MAX_LIST_PAGE_BYTES`]
//! bytes. The node scans its directory once per [`LIST_SCAN_BATCH`] ids,
//! so a listing of any length holds a bounded number of ids in memory.
//!
//! **Integrity.** The client sends each chunk's CRC32C with it and the
//! blob's CRC32C in the header or the end message; the node checks each
//! chunk as it arrives and the whole blob (combining the chunk CRCs) before
//! it acknowledges. A mismatch is [`Code::DataLoss`] and the upload is
//! discarded. The node stores every chunk's CRC and the blob's id in the
//! blob's header, checks each chunk it reads back from disk, refuses to
//! serve a file whose header names another blob, and the client checks
//! each chunk and the whole blob again after a GET.
//!
//! **Durability.** Chunks are written to `DIR/.tmp-<id>-<random>`; the
//! commit writes the header, fsyncs the file, renames it to `DIR/<id>.blob`,
//! and fsyncs the directory, then acknowledges. A blob is visible only
//! whole. Temporary files of uploads a crash interrupted are removed at
//! startup.
//!
//! # Inside the node
//! An upload is an [`upload::UploadSession`] (begin with a size, append
//! chunks, commit or abort) owned by its stream's handler, and a download a
//! [`reader::BlobReader`] over one open blob file.
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

/// The default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// The largest chunk size a node accepts: 64 MiB.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// The smallest chunk size a node accepts: 64 KiB.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// The page size chunk sizes are multiples of.
pub const PAGE: u64 = 4096;
/// Most entries in one `List` stream message.
pub const MAX_LIST_PAGE_ENTRIES: usize = 10_000;
/// Most encoded bytes of one `List` stream message: a page stops before it
/// would grow past this, a quarter of pagerpc's default 4 MiB limit on a
/// message body (10,000 entries with short ids take about 300 KiB).
pub const MAX_LIST_PAGE_BYTES: usize = 1 << 20;
/// Ids a `List` stream takes from one scan of the node's directory (the
/// smallest ones after the last sent): a listing holds at most this many
/// ids in memory (a few MiB), and scans the directory once per this many
/// blobs.
pub const LIST_SCAN_BATCH: usize = 100_000;

/// The protocol, generated from `examples/proto/storage.proto` (package
/// `pagerpc.examples.storage`) by `examples/build.rs` with pagerpc-build:
/// the messages (re-exported at the module root), the typed client
/// `StorageClient` (not re-exported: [`client::StorageClient`] is the
/// multi-node client built on it), the server trait `Storage` and its
/// registration `StorageServer`, and the wire names `storage_methods`
/// (re-exported). An outside client can compile the same file.
pub mod messages {
    include!(concat!(env!("OUT_DIR"), "/pagerpc.examples.storage.rs"));
}

pub use messages::{
    get_message, put_message, storage_methods, BlobInfo, BlobList, BlobRef, DeleteResponse, Empty,
    GetChunk, GetMessage, GetRequest, ListRequest, NodeStats, PutChunk, PutEnd, PutHeader,
    PutMessage,
};

impl PutMessage {
    /// The header message.
    pub fn header(h: PutHeader) -> PutMessage {
        PutMessage {
            kind: Some(put_message::Kind::Header(h)),
        }
    }

    /// A chunk message (the chunk goes as its payload).
    pub fn chunk(crc32c: Option<u32>) -> PutMessage {
        PutMessage {
            kind: Some(put_message::Kind::Chunk(PutChunk { crc32c })),
        }
    }

    /// The end message, with the blob's CRC32C.
    pub fn end(crc32c: Option<u32>) -> PutMessage {
        PutMessage {
            kind: Some(put_message::Kind::End(PutEnd { crc32c })),
        }
    }
}

impl GetMessage {
    /// The info message that starts a `Get` stream.
    pub fn info(info: BlobInfo) -> GetMessage {
        GetMessage {
            kind: Some(get_message::Kind::Info(info)),
        }
    }

    /// A chunk message (the chunk goes as its payload).
    pub fn chunk(offset: u64, crc32c: u32) -> GetMessage {
        GetMessage {
            kind: Some(get_message::Kind::Chunk(GetChunk { offset, crc32c })),
        }
    }
}

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
