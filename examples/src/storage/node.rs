//! The storage node server: an implementation of the generated
//! [`Storage`] trait, registered with [`StorageServer`].
//!
//! Writes go straight from the received payload pages to the disk with
//! `O_DIRECT` (whole pages), the tail of the last chunk (`len % 4096`)
//! through an ordinary buffered descriptor; reads come from the disk with
//! `O_DIRECT` into page-aligned [`PageBuf`]s that are sent as they are.
//!
//! A PUT is one client-streaming call: its handler admits the upload under
//! the node's limits (blob size, disk space, uploads per connection and per
//! node) as an [`UploadSession`] plus a ticket that holds its place under
//! those limits, appends the chunks as they arrive, and commits when the
//! client half-closes. The upload lives in the handler, so nothing else
//! can reach it, and however the stream ends short, it is discarded. A GET
//! is one server-streaming call whose handler walks a [`BlobReader`] over
//! one open [`BlobFile`], taken from a bounded cache that only serves a
//! file while the blob's path still names it.
//!
//! Flow control is pagerpc's per-stream credit (`stream_window`); each
//! streaming handler runs on a thread of its own, at most `max_streams` at
//! once.
//!
//! [`PageBuf`]: pagerpc::PageBuf

use std::collections::{BinaryHeap, HashMap};
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use pagerpc::prost::Message;
use pagerpc::typed::{Inbound, NoPayload, Outbound, WithPayload};
use pagerpc::{Context, CountersSnapshot, InStream, Payload, Server, ServerConfig, Status};

use super::cache::OpenBlobs;
use super::format::{chunk_count, header_len};
use super::messages::{Storage, StorageServer};
use super::reader::{read_header, BlobFile, BlobReader, FileIdent};
use super::upload::{clean_temps, probe_direct, ChunkWritten, UploadSession};
use super::{
    check_id, io_status, put_message, sync_dir, BlobInfo, BlobList, BlobRef, DeleteResponse, Empty,
    GetMessage, GetRequest, ListRequest, NodeStats, PutHeader, PutMessage, LIST_SCAN_BATCH,
    MAX_CHUNK_SIZE, MAX_LIST_PAGE_BYTES, MAX_LIST_PAGE_ENTRIES, MIN_CHUNK_SIZE, PAGE,
};
use crate::util::FastRng;

pub use super::upload::TMP_PREFIX;
/// Suffix of blob files.
pub const BLOB_SUFFIX: &str = ".blob";

/// Node settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Directory holding the blobs (created if missing).
    pub dir: PathBuf,
    /// Zero-copy receive and `MSG_ZEROCOPY` send.
    pub zerocopy: bool,
    /// Server pool threads (connection I/O and the unary calls). Streams
    /// run on threads of their own, see `max_streams`.
    pub threads: usize,
    /// Bytes of stream messages a peer may send on one stream before the
    /// node releases some (pagerpc's `ServerConfig::stream_window`,
    /// announced to clients): the node's flow control for uploads. Default
    /// 16 MiB, four 4 MiB chunks in flight: on loopback 8 MiB made a 1 GiB
    /// PUT about 20 % slower, 32 MiB was no faster. A chunk larger than the
    /// window still goes, alone.
    ///
    /// # Cost
    /// An upload holds at most this much (or one chunk, if larger) of
    /// received chunks until they are on disk: `max_uploads ×
    /// stream_window` in all (2 GiB with the defaults), at most
    /// `max_uploads_per_conn × stream_window` (256 MiB) per connection.
    /// Lower it, or `max_uploads`, on a small machine.
    pub stream_window: u64,
    /// Most streams open at once (pagerpc's `ServerConfig::max_streams`):
    /// uploads, reads and listings together; a stream past it is refused by
    /// the library with `ResourceExhausted` naming `max_streams`. Must be
    /// larger than `max_uploads`, so that reads still get streams when
    /// every upload slot is taken. Default 256: 128 uploads leave at least
    /// 128 streams for reads and listings.
    ///
    /// # Cost
    /// A thread each (2 MiB of address space, a few KiB resident); a read
    /// holds one file descriptor (its blob file, even after the cache
    /// evicted it) and at most the client's stream window of chunks.
    pub max_streams: usize,
    /// Use `O_DIRECT` (falls back to buffered I/O if the filesystem refuses).
    pub direct_io: bool,
    /// Largest blob a put stream may announce; a larger size is refused
    /// with `ResourceExhausted` naming this limit. Default 1 TiB.
    /// Independently, a blob must fit the free space of the node's
    /// filesystem, less what the uploads under way will still write.
    pub max_blob_bytes: u64,
    /// Most uploads under way on the node; a put stream past it is refused
    /// with `ResourceExhausted`. Default 128.
    ///
    /// # Cost
    /// Each upload holds a stream (see `max_streams`), two file descriptors
    /// (an `O_DIRECT` one and a buffered one for the last chunk's tail), a
    /// temporary file, about 300 bytes plus 4 bytes per chunk received, and
    /// at most `stream_window` of received chunks.
    pub max_uploads: usize,
    /// Most uploads under way from one connection (one client address and
    /// port); a put stream past it is refused with `ResourceExhausted`.
    /// Default 16. A client that needs more opens more connections, up to
    /// `max_uploads` for the node.
    pub max_uploads_per_conn: usize,
    /// Most blob files the node keeps open for reads (a cache, least
    /// recently used closed first). Default 128; 0 opens the file for
    /// every read.
    ///
    /// # Cost
    /// One file descriptor each, and its header in memory (4 bytes per
    /// chunk; the cache keeps at most 64 MiB of them). Reads in progress
    /// keep their file open even after it is evicted.
    pub max_open_blobs: usize,
}

impl NodeConfig {
    /// Defaults for a node storing into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            dir: dir.into(),
            zerocopy: true,
            threads: std::thread::available_parallelism().map_or(4, |n| n.get().max(4)),
            stream_window: 16 << 20,
            max_streams: 256,
            direct_io: true,
            max_blob_bytes: 1 << 40,
            max_uploads: 128,
            max_uploads_per_conn: 16,
            max_open_blobs: 128,
        }
    }
}

/// Uploads under way, per node and per connection, and the disk bytes
/// each will still write: what a put stream's header is checked against.
#[derive(Default)]
struct Admissions {
    per_conn: HashMap<SocketAddr, usize>,
    to_come: HashMap<u64, Arc<AtomicU64>>,
    next_key: u64,
}

impl Admissions {
    fn total(&self) -> usize {
        self.to_come.len()
    }

    fn promised(&self) -> u64 {
        self.to_come
            .values()
            .map(|t| t.load(Ordering::Relaxed))
            .sum()
    }
}

/// An upload's place under the node's limits; dropping it gives it back.
struct Ticket {
    admissions: Arc<Mutex<Admissions>>,
    peer: SocketAddr,
    key: u64,
    /// Bytes the blob's file will still grow by (for the disk-space check).
    to_come: Arc<AtomicU64>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut a = lock(&self.admissions);
        a.to_come.remove(&self.key);
        if let Some(n) = a.per_conn.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                a.per_conn.remove(&self.peer);
            }
        }
    }
}

/// An admitted upload: the session and its place under the node's limits,
/// given back when it is committed, aborted or dropped.
struct Upload {
    session: UploadSession,
    ticket: Ticket,
}

impl Upload {
    /// [`UploadSession::append`], keeping the disk reservation current.
    fn append(&mut self, data: &[u8], crc32c: Option<u32>) -> Result<ChunkWritten, Status> {
        let r = self.session.append(data, crc32c);
        self.ticket
            .to_come
            .store(self.session.bytes_to_come(), Ordering::Relaxed);
        r
    }
}

/// Why a put stream's messages stopped before the client's half-close.
enum PutFail {
    /// The stream was cut short: the client cancelled or aborted it, its
    /// connection was lost, or its deadline passed.
    Cut(Status),
    /// The node refused a message (out of order, wrong length, checksum).
    Refused(Status),
}

#[derive(Default)]
struct Tallies {
    direct_write_copies: AtomicU64,
    corrupt_chunks_read: AtomicU64,
    uploads_rejected: AtomicU64,
    uploads_refused: AtomicU64,
    uploads_cut_short: AtomicU64,
}

struct Node {
    dir: PathBuf,
    cfg: NodeConfig,
    direct_io: bool,
    admissions: Arc<Mutex<Admissions>>,
    open: OpenBlobs,
    server: Mutex<Option<Server>>,
    tallies: Tallies,
    rng: Mutex<FastRng>,
    /// Set by [`StorageNode::kill`]: uploads cut short leave their
    /// temporary files behind, as a crash would.
    killed: AtomicBool,
    /// Streaming handlers running (the server does not join their threads).
    handlers: Mutex<usize>,
    handlers_done: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent at each step,
    // so a panic elsewhere does not make the data unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A streaming handler at work; counted so that stopping the node can wait
/// for every handler to let its upload or file go.
struct Running<'a>(&'a Node);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut n = lock(&self.0.handlers);
        *n -= 1;
        if *n == 0 {
            self.0.handlers_done.notify_all();
        }
    }
}

/// Bytes of the filesystem holding `dir` that an unprivileged writer may
/// still use: `statvfs(2)`'s `f_bavail × f_frsize`, through nix's safe
/// wrapper (no `unsafe` here).
fn free_bytes(dir: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    // Both are u64 on 64-bit Linux, narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let (avail, frsize) = (s.blocks_available() as u64, s.fragment_size() as u64);
    Ok(avail.saturating_mul(frsize))
}

/// The bytes a blob file will take: header and data. `None` when the
/// header's chunk size is unusable (the session refuses it with a precise
/// message).
fn file_bytes(req: &PutHeader) -> Option<u64> {
    let cs = req.chunk_size;
    if !cs.is_multiple_of(PAGE) || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return None;
    }
    header_len(req.id.len(), chunk_count(req.size, cs)).checked_add(req.size)
}

/// Bytes `info` adds to an encoded [`BlobList`]: its field tag, length
/// prefix and body.
fn list_entry_len(info: &BlobInfo) -> usize {
    let len = info.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

impl Node {
    fn blob_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{BLOB_SUFFIX}"))
    }

    fn running(&self) -> Running<'_> {
        *lock(&self.handlers) += 1;
        Running(self)
    }

    /// Waits (at most `limit`) until no streaming handler runs.
    fn wait_handlers(&self, limit: Duration) -> bool {
        let n = lock(&self.handlers);
        let (n, _) = self
            .handlers_done
            .wait_timeout_while(n, limit, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *n == 0
    }

    fn refuse(&self, msg: String) -> Status {
        self.tallies.uploads_refused.fetch_add(1, Ordering::Relaxed);
        Status::resource_exhausted(msg)
    }

    /// Admits an upload under the node's limits and begins its session.
    /// Nothing is allocated in proportion to `req.size`.
    ///
    /// # Errors
    /// `ResourceExhausted` naming the limit and the value when the blob is
    /// over `max_blob_bytes` or the free disk space (less what uploads
    /// under way will still write), or when the node or the connection
    /// `peer` has its most uploads under way; the session's errors.
    fn begin_upload(&self, peer: SocketAddr, req: &PutHeader) -> Result<Upload, Status> {
        check_id(&req.id).map_err(Status::invalid_argument)?;
        let id = &req.id;
        let max = self.cfg.max_blob_bytes;
        if req.size > max {
            return Err(self.refuse(format!(
                "blob '{id}' of {} bytes is over this node's limit of {max} bytes per blob \
                 (max_blob_bytes); nothing was allocated",
                req.size
            )));
        }
        // Held while the file is created, so concurrent uploads cannot
        // overshoot the limits together.
        let mut adm = lock(&self.admissions);
        let (n, max) = (adm.total(), self.cfg.max_uploads);
        if n >= max {
            return Err(self.refuse(format!(
                "upload of '{id}' refused: the node has {n} uploads under way, its limit \
                 (max_uploads) is {max}; retry when some finish"
            )));
        }
        let mine = adm.per_conn.get(&peer).copied().unwrap_or(0);
        let max = self.cfg.max_uploads_per_conn;
        if mine >= max {
            return Err(self.refuse(format!(
                "upload of '{id}' refused: this connection ({peer}) has {mine} uploads under \
                 way, the limit per connection (max_uploads_per_conn) is {max}; finish or abort \
                 some first"
            )));
        }
        if let Some(need) = file_bytes(req) {
            let free = free_bytes(&self.dir)
                .map_err(|e| io_status(format_args!("statvfs {}", self.dir.display()), &e))?;
            let promised = adm.promised();
            if need > free.saturating_sub(promised) {
                return Err(self.refuse(format!(
                    "blob '{id}' of {} bytes ({need} on disk with its header) does not fit: the \
                     filesystem of {} has {free} bytes free, {promised} of them promised to the \
                     {n} uploads under way",
                    req.size,
                    self.dir.display()
                )));
            }
        }
        let tag = lock(&self.rng).next_u64();
        let session = UploadSession::begin(&self.dir, req, tag, self.direct_io)?;
        let key = adm.next_key;
        adm.next_key += 1;
        let to_come = Arc::new(AtomicU64::new(session.bytes_to_come()));
        adm.to_come.insert(key, to_come.clone());
        *adm.per_conn.entry(peer).or_default() += 1;
        drop(adm);
        Ok(Upload {
            session,
            ticket: Ticket {
                admissions: self.admissions.clone(),
                peer,
                key,
                to_come,
            },
        })
    }

    /// Appends the stream's chunks to `upload` until the client's
    /// half-close; returns the CRC32C of the end message, if any. Each
    /// chunk's pages are dropped once written, which gives their credit
    /// back to the client.
    ///
    /// Reads the untyped stream under the handler's typed one
    /// ([`Inbound::inner`]) and decodes each message itself: the typed
    /// stream reports an undecodable message and a stream cut short as the
    /// same `Status`, and here the first is the node's refusal while only
    /// the second counts as an upload cut short (and, after a kill, leaves
    /// its temporary file behind).
    fn receive(&self, upload: &mut Upload, rx: &mut InStream) -> Result<Option<u32>, PutFail> {
        let id = upload.session.id().to_owned();
        let mut end: Option<Option<u32>> = None;
        loop {
            let m = match rx.recv() {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(end.flatten()),
                Err(status) => return Err(PutFail::Cut(status)),
            };
            let kind = m.decode::<PutMessage>().map_err(PutFail::Refused)?.kind;
            let refuse = |msg: String| Err(PutFail::Refused(Status::invalid_argument(msg)));
            match (kind, end) {
                (Some(put_message::Kind::Chunk(c)), None) => {
                    let w = upload
                        .append(&m.payload, c.crc32c)
                        .map_err(PutFail::Refused)?;
                    if w.copied {
                        self.tallies
                            .direct_write_copies
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                (Some(put_message::Kind::End(e)), None) if m.payload.is_empty() => {
                    end = Some(e.crc32c);
                }
                (Some(put_message::Kind::End(_)), None) => {
                    return refuse(format!(
                        "the end message of the put stream of '{id}' came with a payload of {} \
                         bytes",
                        m.payload.len()
                    ))
                }
                (Some(_), Some(_)) => {
                    return refuse(format!(
                        "a message after the end message of the put stream of '{id}'"
                    ))
                }
                (Some(put_message::Kind::Header(_)), None) => {
                    return refuse(format!("a second header in the put stream of '{id}'"))
                }
                (None, _) => {
                    return refuse(format!(
                        "an empty message (no header, chunk or end) in the put stream of '{id}'"
                    ))
                }
            }
        }
    }

    /// Commits an upload: verifies it, publishes the blob, and gives the
    /// upload's place under the limits back.
    fn commit_upload(&self, upload: Upload, crc32c: Option<u32>) -> Result<BlobInfo, Status> {
        let Upload { session, ticket } = upload;
        let id = session.id().to_owned();
        let missing = session.missing();
        if missing > 0 {
            let msg = format!(
                "the put stream of '{id}' ended after {} of its {} bytes ({missing} chunks \
                 missing); the upload was discarded",
                session.received(),
                session.size()
            );
            return Err(Status::failed_precondition(msg));
        }
        let r = session.commit(&self.blob_path(&id), crc32c);
        drop(ticket);
        match &r {
            Ok(_) => self.open.remove(&id),
            Err(s) if s.code() == pagerpc::Code::DataLoss => {
                self.tallies
                    .uploads_rejected
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        r
    }

    /// The open file of blob `id`, from the cache if the cached descriptor
    /// is still the file at the blob's path, otherwise opened afresh (and
    /// cached).
    fn open_blob(&self, id: &str) -> Result<Arc<BlobFile>, Status> {
        check_id(id).map_err(Status::invalid_argument)?;
        let path = self.blob_path(id);
        let now = match fs::metadata(&path) {
            Ok(m) => FileIdent::of(&m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.open.remove(id);
                return Err(Status::not_found(format!("no blob '{id}' on this node")));
            }
            Err(e) => {
                return Err(io_status(
                    format_args!("cannot stat {}", path.display()),
                    &e,
                ))
            }
        };
        if let Some(b) = self.open.get(id, &now) {
            return Ok(b);
        }
        let b = Arc::new(BlobFile::open(&path, id, self.direct_io)?);
        self.open.insert(b.clone());
        Ok(b)
    }

    /// Blob ids in the directory, as `(id, DirEntry)`, in no order.
    fn blob_entries(&self) -> Result<impl Iterator<Item = (String, fs::DirEntry)>, Status> {
        let rd = fs::read_dir(&self.dir)
            .map_err(|e| io_status(format_args!("listing {}", self.dir.display()), &e))?;
        Ok(rd.flatten().filter_map(|ent| {
            let name = ent.file_name().into_string().ok()?;
            let id = name.strip_suffix(BLOB_SUFFIX)?;
            check_id(id).ok()?;
            Some((id.to_owned(), ent))
        }))
    }

    /// The `limit` smallest blob ids after `after`, in order, from one scan
    /// of the directory, and whether more follow.
    fn ids_after(&self, after: &str, limit: usize) -> Result<(Vec<String>, bool), Status> {
        // The `limit + 1` smallest (one more tells whether more follow),
        // in a max-heap.
        let mut smallest: BinaryHeap<String> = BinaryHeap::with_capacity(limit + 2);
        for (id, _) in self.blob_entries()? {
            if id.as_str() <= after {
                continue;
            }
            if smallest.len() <= limit {
                smallest.push(id);
            } else if smallest.peek().is_some_and(|top| id < *top) {
                smallest.pop();
                smallest.push(id);
            }
        }
        let mut ids = smallest.into_sorted_vec();
        let more = ids.len() > limit;
        ids.truncate(limit);
        Ok((ids, more))
    }

    /// Describes blob `id` for a listing from its header, read through a
    /// descriptor of its own that is closed at once (a listing never fills
    /// the open-file cache). `None` if it is gone.
    fn describe(&self, id: &str) -> Option<BlobInfo> {
        let path = self.blob_path(id);
        let header = File::open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    None
                } else {
                    Some(io_status(
                        format_args!("cannot open {}", path.display()),
                        &e,
                    ))
                }
            })
            .and_then(|f| read_header(&f, id).map_err(Some));
        match header {
            Ok(h) => Some(BlobInfo {
                id: id.to_owned(),
                size: h.size,
                crc32c: h.crc32c,
                chunk_size: h.chunk_size,
                version: h.version,
                problem: String::new(),
            }),
            Err(None) => None,
            Err(Some(s)) => Some(BlobInfo {
                id: id.to_owned(),
                size: fs::metadata(&path).map_or(0, |m| m.len()),
                problem: s.message().to_owned(),
                ..BlobInfo::default()
            }),
        }
    }

    fn counters(&self) -> CountersSnapshot {
        lock(&self.server)
            .as_ref()
            .map(Server::counters)
            .unwrap_or_default()
    }

    /// The statistics; blobs are counted from the directory (one `stat`
    /// each, no header read).
    fn stats(&self) -> Result<NodeStats, Status> {
        let (mut blobs, mut bytes) = (0, 0);
        for (_, ent) in self.blob_entries()? {
            if let Ok(m) = ent.metadata() {
                blobs += 1;
                bytes += m.len();
            }
        }
        let c = self.counters();
        let t = &self.tallies;
        Ok(NodeStats {
            blobs,
            bytes,
            uploads: lock(&self.admissions).total() as u64,
            direct_io: self.direct_io,
            payload_bytes_received: c.payload_bytes_received,
            payload_bytes_sent: c.payload_bytes_sent,
            bytes_mapped: c.bytes_mapped,
            bytes_copied: c.bytes_copied(),
            direct_write_copies: t.direct_write_copies.load(Ordering::Relaxed),
            corrupt_chunks_read: t.corrupt_chunks_read.load(Ordering::Relaxed),
            uploads_rejected: t.uploads_rejected.load(Ordering::Relaxed),
            uploads_refused: t.uploads_refused.load(Ordering::Relaxed),
            open_blobs: self.open.len() as u64,
            uploads_cut_short: t.uploads_cut_short.load(Ordering::Relaxed),
        })
    }
}

/// The node's side of the protocol: the generated [`Storage`] trait,
/// registered with [`StorageServer`].
impl Storage for Node {
    /// The header, the chunks in order, an optional end message, then the
    /// client's half-close, which commits.
    fn put(
        &self,
        ctx: &Context,
        mut requests: Inbound<'_, PutMessage, WithPayload>,
    ) -> Result<BlobInfo, Status> {
        let _running = self.running();
        let (first, payload) = requests
            .recv()?
            .ok_or_else(|| Status::invalid_argument("the put stream ended before its header"))?;
        let header = match first.kind {
            Some(put_message::Kind::Header(h)) if payload.is_empty() => h,
            Some(put_message::Kind::Header(_)) => {
                return Err(Status::invalid_argument(format!(
                    "the put header came with a payload of {} bytes; chunks go in the messages \
                     after it",
                    payload.len()
                )))
            }
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a put stream must be its header (PutMessage.header)",
                ))
            }
        };
        drop(payload);
        let mut upload = self.begin_upload(ctx.peer(), &header)?;
        match self.receive(&mut upload, requests.inner()) {
            Ok(crc32c) => self.commit_upload(upload, crc32c),
            Err(PutFail::Refused(status)) => {
                if status.code() == pagerpc::Code::DataLoss {
                    self.tallies
                        .uploads_rejected
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(status) // dropping the upload removes its file
            }
            Err(PutFail::Cut(status)) => {
                self.tallies
                    .uploads_cut_short
                    .fetch_add(1, Ordering::Relaxed);
                if self.killed.load(Ordering::SeqCst) {
                    upload.session.leave_behind();
                }
                Err(status)
            }
        }
    }

    /// The blob's info, then its chunks from the offset asked for, all read
    /// from one open file.
    fn get(
        &self,
        _ctx: &Context,
        req: GetRequest,
        mut responses: Outbound<'_, GetMessage, WithPayload>,
    ) -> Result<(), Status> {
        let _running = self.running();
        let blob = self.open_blob(&req.id)?;
        let version = blob.header().version;
        if req.version != 0 && version != req.version {
            return Err(Status::aborted(format!(
                "blob '{}' on this node is version {version}, not the version {} asked for (it \
                 was replaced); read it again from the start",
                req.id, req.version
            )));
        }
        let mut reader = BlobReader::starting_at(blob, req.offset)?;
        responses.send(&GetMessage::info(reader.blob().info()), Payload::Empty)?;
        while let Some(r) = reader.next_chunk() {
            let (chunk, buf) = r.inspect_err(|s| {
                if s.code() == pagerpc::Code::DataLoss {
                    self.tallies
                        .corrupt_chunks_read
                        .fetch_add(1, Ordering::Relaxed);
                }
            })?;
            responses.send(&GetMessage::chunk(chunk.offset, chunk.crc32c), buf)?;
        }
        Ok(())
    }

    /// The blobs after `start_after` in id order (at most
    /// `limit`, 0 for all), in pages of at most [`MAX_LIST_PAGE_ENTRIES`]
    /// entries and [`MAX_LIST_PAGE_BYTES`] bytes. The directory is scanned
    /// once per [`LIST_SCAN_BATCH`] ids; only the headers of the blobs sent
    /// are read.
    fn list(
        &self,
        _ctx: &Context,
        req: ListRequest,
        mut responses: Outbound<'_, BlobList, NoPayload>,
    ) -> Result<(), Status> {
        let _running = self.running();
        let mut left = match req.limit {
            0 => usize::MAX,
            n => n as usize,
        };
        let mut after = req.start_after;
        let mut page = Vec::new();
        let mut bytes = 0;
        while left > 0 {
            let (ids, more) = self.ids_after(&after, LIST_SCAN_BATCH.min(left))?;
            if let Some(last) = ids.last() {
                after.clone_from(last);
            }
            for id in ids {
                let Some(info) = self.describe(&id) else {
                    continue; // deleted since the scan
                };
                let len = list_entry_len(&info);
                if !page.is_empty()
                    && (bytes + len > MAX_LIST_PAGE_BYTES || page.len() >= MAX_LIST_PAGE_ENTRIES)
                {
                    let blobs = std::mem::take(&mut page);
                    responses.send(&BlobList { blobs })?;
                    bytes = 0;
                }
                bytes += len;
                page.push(info);
                left -= 1;
            }
            if !more {
                break;
            }
        }
        if !page.is_empty() {
            responses.send(&BlobList { blobs: page })?;
        }
        Ok(())
    }

    fn stat(&self, _ctx: &Context, req: BlobRef) -> Result<BlobInfo, Status> {
        Ok(self.open_blob(&req.id)?.info())
    }

    fn delete(&self, _ctx: &Context, req: BlobRef) -> Result<DeleteResponse, Status> {
        check_id(&req.id).map_err(Status::invalid_argument)?;
        self.open.remove(&req.id);
        let path = self.blob_path(&req.id);
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.dir).map_err(|e| io_status("fsync of the directory", &e))?;
                Ok(DeleteResponse { existed: true })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(DeleteResponse { existed: false }),
            Err(e) => Err(io_status(format_args!("deleting {}", path.display()), &e)),
        }
    }

    fn node_stats(&self, _ctx: &Context, _req: Empty) -> Result<NodeStats, Status> {
        self.stats()
    }
}

/// A running storage node. Dropping it shuts it down.
pub struct StorageNode {
    node: Arc<Node>,
    addr: SocketAddr,
    temps_removed: usize,
}

impl std::fmt::Debug for StorageNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageNode")
            .field("addr", &self.addr)
            .field("dir", &self.node.dir)
            .finish()
    }
}

impl StorageNode {
    /// Prepares the directory (creates it, removes temporary files of
    /// uploads that never committed), binds `listen` and serves.
    ///
    /// # Errors
    /// When the directory cannot be prepared or the address bound, and
    /// `InvalidInput` when `max_streams` is not larger than `max_uploads`.
    pub fn start(listen: impl ToSocketAddrs, cfg: NodeConfig) -> io::Result<StorageNode> {
        if cfg.max_streams <= cfg.max_uploads {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "max_streams ({}) must be larger than max_uploads ({}): every upload holds a \
                     stream, and reads and listings need streams too",
                    cfg.max_streams, cfg.max_uploads
                ),
            ));
        }
        fs::create_dir_all(&cfg.dir)?;
        let temps_removed = clean_temps(&cfg.dir)?;
        let direct_io = cfg.direct_io && probe_direct(&cfg.dir);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        let node = Arc::new(Node {
            dir: cfg.dir.clone(),
            direct_io,
            admissions: Arc::new(Mutex::new(Admissions::default())),
            open: OpenBlobs::new(cfg.max_open_blobs),
            server: Mutex::new(None),
            tallies: Tallies::default(),
            rng: Mutex::new(FastRng::new(seed)),
            killed: AtomicBool::new(false),
            handlers: Mutex::new(0),
            handlers_done: Condvar::new(),
            cfg,
        });
        let mut scfg = if node.cfg.zerocopy {
            ServerConfig::zerocopy()
        } else {
            ServerConfig::default()
        };
        scfg.threads = node.cfg.threads.max(2);
        scfg.max_streams = node.cfg.max_streams;
        scfg.stream_window = node.cfg.stream_window;
        let server = Server::builder()
            .config(scfg)
            .add_service(StorageServer::from_arc(node.clone()))
            .bind(listen)?;
        let addr = server.local_addr();
        *lock(&node.server) = Some(server);
        Ok(StorageNode {
            node,
            addr,
            temps_removed,
        })
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The blob directory.
    pub fn dir(&self) -> &Path {
        &self.node.dir
    }

    /// The settings the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.node.cfg
    }

    /// Whether the node uses `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.node.direct_io
    }

    /// Temporary files of unfinished uploads removed at startup.
    pub fn temps_removed_at_start(&self) -> usize {
        self.temps_removed
    }

    /// The server's transfer counters.
    pub fn counters(&self) -> CountersSnapshot {
        self.node.counters()
    }

    /// The node's statistics, as the `NodeStats` rpc returns them.
    ///
    /// # Errors
    /// When the directory cannot be listed.
    pub fn stats(&self) -> Result<NodeStats, Status> {
        self.node.stats()
    }

    /// Path of the file holding blob `id`.
    pub fn blob_path(&self, id: &str) -> PathBuf {
        self.node.blob_path(id)
    }

    /// Stops the node gracefully: stops accepting, gives calls and streams
    /// in progress up to 10 s to finish (an upload finishes when its client
    /// half-closes it), closes every connection, and returns once every
    /// unfinished upload is discarded.
    pub fn shutdown(mut self) {
        self.stop(Duration::from_secs(10), false);
    }

    /// Stops the node at once, as a crash would: calls and streams in
    /// progress are cut off, connections closed, and the temporary files of
    /// unfinished uploads are left behind (the next start removes them).
    /// For tests and demonstrations of failover.
    pub fn kill(mut self) {
        self.stop(Duration::ZERO, true);
    }

    fn stop(&mut self, grace: Duration, crash: bool) {
        if crash {
            self.node.killed.store(true, Ordering::SeqCst);
        }
        // Take the server out first: the stats handler locks this slot and
        // stopping waits for handlers.
        let server = lock(&self.node.server).take();
        if let Some(s) = server {
            s.shutdown_timeout(grace);
        }
        // Streaming handlers run on threads the server does not join; with
        // their connections closed they return promptly, discarding (or,
        // after a kill, leaving behind) their uploads. Wait for them, so
        // nothing writes into the directory after this returns.
        self.node.wait_handlers(Duration::from_secs(30));
        self.node.open.clear();
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10), false);
    }
}
