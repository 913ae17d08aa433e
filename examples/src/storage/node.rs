//! The storage node server.
//!
//! Writes go straight from the received payload pages to the disk with
//! `O_DIRECT` (whole pages), the tail of the last chunk (`len % 4096`)
//! through an ordinary buffered descriptor; reads come from the disk with
//! `O_DIRECT` into page-aligned [`PageBuf`]s that are sent as they are.
//!
//! An upload is admitted under the node's limits (blob size, disk space,
//! uploads per connection and per node) as an [`UploadSession`] plus a
//! ticket that holds its place under those limits until it ends; the unary
//! handlers keep it in a table under a handle, a streaming handler would
//! keep it for the life of its stream. Reads go through [`BlobFile`]s kept
//! in a bounded cache that only serves a file while the blob's path still
//! names it.

use std::collections::{BinaryHeap, HashMap};
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagerpc::prost::Message;
use pagerpc::{Context, CountersSnapshot, PageBuf, Pages, Payload, Server, ServerConfig, Status};

use super::cache::OpenBlobs;
use super::format::{chunk_count, header_len};
use super::reader::{read_header, BlobFile, FileIdent};
use super::upload::{clean_temps, probe_direct, ChunkWritten, UploadSession};
use super::{
    check_id, io_status, method, sync_dir, BlobInfo, BlobList, BlobRef, DeleteResponse, Empty,
    GetChunk, GetChunkResponse, ListRequest, NodeStats, PutBegin, PutBeginResponse, PutChunk,
    PutChunkResponse, PutCommit, UploadRef, DEFAULT_LIST_LIMIT, MAX_CHUNK_SIZE, MAX_LIST_LIMIT,
    MAX_LIST_PAGE_BYTES, MIN_CHUNK_SIZE, PAGE,
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
    /// Server pool threads; handlers block on the disk, so more than CPUs.
    pub threads: usize,
    /// Most chunk calls one transfer may have in flight.
    pub max_credits: u32,
    /// Chunk memory the node plans for across transfers; credits shrink
    /// as transfers are added.
    pub memory_budget: u64,
    /// An upload with no chunk for this long is discarded (its client is
    /// presumed dead) and its temporary file removed.
    pub upload_timeout: Duration,
    /// Use `O_DIRECT` (falls back to buffered I/O if the filesystem refuses).
    pub direct_io: bool,
    /// Largest blob `put.begin` accepts; a larger size is refused with
    /// `ResourceExhausted` naming this limit. Default 1 TiB. Independently,
    /// a blob must fit the free space of the node's filesystem, less what
    /// the uploads under way will still write.
    pub max_blob_bytes: u64,
    /// Most uploads under way on the node; `put.begin` past it is refused
    /// with `ResourceExhausted`. Default 128.
    ///
    /// # Cost
    /// Each upload holds two file descriptors (an `O_DIRECT` one and a
    /// buffered one for the last chunk's tail), a temporary file, and about
    /// 300 bytes plus 4 bytes per chunk received. Its chunk memory is
    /// bounded by the credits it was granted (see `memory_budget`), not by
    /// this count. An upload whose client went away counts until
    /// `upload_timeout` removes it.
    pub max_uploads: usize,
    /// Most uploads under way from one connection (one client address and
    /// port); `put.begin` past it is refused with `ResourceExhausted`.
    /// Default 16. A client that needs more opens more connections, up to
    /// `max_uploads` for the node.
    pub max_uploads_per_conn: usize,
    /// Most blob files the node keeps open for reads (a cache, least
    /// recently used closed first). Default 128; 0 opens the file for
    /// every read call.
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
            max_credits: 8,
            memory_budget: 256 << 20,
            upload_timeout: Duration::from_secs(60),
            direct_io: true,
            max_blob_bytes: 1 << 40,
            max_uploads: 128,
            max_uploads_per_conn: 16,
            max_open_blobs: 128,
        }
    }
}

/// Uploads under way, per node and per connection, and the disk bytes
/// each will still write: what `put.begin` checks its limits against.
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
    /// [`UploadSession::write_chunk`], keeping the disk reservation current.
    fn write_chunk(
        &mut self,
        offset: u64,
        data: &[u8],
        crc32c: Option<u32>,
    ) -> Result<ChunkWritten, Status> {
        let r = self.session.write_chunk(offset, data, crc32c);
        self.ticket
            .to_come
            .store(self.session.bytes_to_come(), Ordering::Relaxed);
        r
    }
}

/// An upload in the unary handlers' table.
struct UploadSlot {
    /// `None` once committed, aborted or expired. Chunk writes hold this
    /// lock, so they run one at a time per upload and a commit waits for
    /// the write in progress.
    upload: Mutex<Option<Upload>>,
    last_active: Mutex<Instant>,
}

#[derive(Default)]
struct Tallies {
    direct_write_copies: AtomicU64,
    corrupt_chunks_read: AtomicU64,
    uploads_rejected: AtomicU64,
    uploads_expired: AtomicU64,
    uploads_refused: AtomicU64,
}

struct Node {
    dir: PathBuf,
    cfg: NodeConfig,
    direct_io: bool,
    admissions: Arc<Mutex<Admissions>>,
    /// Uploads of the unary protocol, by handle.
    uploads: Mutex<HashMap<u64, Arc<UploadSlot>>>,
    next_upload: AtomicU64,
    open: OpenBlobs,
    server: Mutex<Option<Server>>,
    tallies: Tallies,
    rng: Mutex<FastRng>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent at each step,
    // so a panic elsewhere does not make the data unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
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
/// request's chunk size is unusable (the session refuses it with a
/// precise message).
fn file_bytes(req: &PutBegin) -> Option<u64> {
    let cs = req.chunk_size;
    if !cs.is_multiple_of(PAGE) || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return None;
    }
    header_len(req.id.len(), chunk_count(req.size, cs)).checked_add(req.size)
}

impl Node {
    fn blob_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{BLOB_SUFFIX}"))
    }

    fn credits_for(&self, chunk_size: u64, transfers: u64) -> u32 {
        let fit = self.cfg.memory_budget / (chunk_size * transfers).max(1);
        fit.clamp(1, u64::from(self.cfg.max_credits.max(1))) as u32
    }

    fn credits(&self, chunk_size: u64) -> u32 {
        let transfers = lock(&self.admissions).total() as u64 + 1;
        self.credits_for(chunk_size, transfers)
    }

    fn slot(&self, handle: u64) -> Result<Arc<UploadSlot>, Status> {
        lock(&self.uploads)
            .get(&handle)
            .cloned()
            .ok_or_else(|| self.gone(handle))
    }

    fn gone(&self, handle: u64) -> Status {
        Status::not_found(format!(
            "no upload {handle} on this node (aborted, committed, expired after {:?} without a \
             chunk, or the node restarted)",
            self.cfg.upload_timeout
        ))
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
    fn begin_upload(&self, peer: SocketAddr, req: &PutBegin) -> Result<Upload, Status> {
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
        // Held while the file is created, so concurrent begins cannot
        // overshoot the limits together.
        let mut adm = lock(&self.admissions);
        let (n, max) = (adm.total(), self.cfg.max_uploads);
        if n >= max {
            return Err(self.refuse(format!(
                "put.begin of '{id}' refused: the node has {n} uploads under way, its limit \
                 (max_uploads) is {max}; retry when some finish"
            )));
        }
        let mine = adm.per_conn.get(&peer).copied().unwrap_or(0);
        let max = self.cfg.max_uploads_per_conn;
        if mine >= max {
            return Err(self.refuse(format!(
                "put.begin of '{id}' refused: this connection ({peer}) has {mine} uploads under \
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

    fn put_begin(&self, peer: SocketAddr, req: PutBegin) -> Result<PutBeginResponse, Status> {
        let upload = self.begin_upload(peer, &req)?;
        let handle = self.next_upload.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(UploadSlot {
            upload: Mutex::new(Some(upload)),
            last_active: Mutex::new(Instant::now()),
        });
        lock(&self.uploads).insert(handle, slot);
        Ok(PutBeginResponse {
            upload: handle,
            // The transfers under way include this one now.
            credits: self.credits_for(req.chunk_size, lock(&self.admissions).total().max(1) as u64),
        })
    }

    fn put_chunk(&self, req: PutChunk, pages: Pages) -> Result<PutChunkResponse, Status> {
        let slot = self.slot(req.upload)?;
        let r = match lock(&slot.upload).as_mut() {
            Some(upload) => upload.write_chunk(req.offset, &pages, req.crc32c),
            None => return Err(self.gone(req.upload)),
        };
        *lock(&slot.last_active) = Instant::now();
        let w = r?;
        if w.copied {
            self.tallies
                .direct_write_copies
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(PutChunkResponse {
            received: w.received,
        })
    }

    /// Commits an upload: verifies it, publishes the blob, and gives the
    /// upload's place under the limits back.
    fn commit_upload(&self, upload: Upload, crc32c: Option<u32>) -> Result<BlobInfo, Status> {
        let Upload { session, ticket } = upload;
        let id = session.id().to_owned();
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

    fn put_commit(&self, req: PutCommit) -> Result<BlobInfo, Status> {
        let slot = self.slot(req.upload)?;
        let upload = {
            let mut u = lock(&slot.upload);
            match u.as_ref() {
                None => return Err(self.gone(req.upload)),
                // Refused, but the upload goes on: the client may send the
                // missing chunks and commit again.
                Some(up) if up.session.missing() > 0 => {
                    return Err(Status::failed_precondition(format!(
                        "commit of '{}' with {} chunks still missing",
                        up.session.id(),
                        up.session.missing()
                    )))
                }
                Some(_) => u.take(),
            }
        };
        lock(&self.uploads).remove(&req.upload);
        match upload {
            Some(up) => self.commit_upload(up, req.crc32c),
            None => Err(self.gone(req.upload)),
        }
    }

    fn put_abort(&self, req: UploadRef) {
        let slot = lock(&self.uploads).remove(&req.upload);
        if let Some(slot) = slot {
            let upload = lock(&slot.upload).take();
            if let Some(up) = upload {
                up.session.abort();
            }
        }
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

    fn get_begin(&self, req: BlobRef) -> Result<BlobInfo, Status> {
        let b = self.open_blob(&req.id)?;
        Ok(BlobInfo {
            credits: self.credits(b.header().chunk_size),
            ..b.info()
        })
    }

    fn get_chunk(&self, req: GetChunk) -> Result<(GetChunkResponse, PageBuf), Status> {
        let b = self.open_blob(&req.id)?;
        let version = b.header().version;
        if version != req.version {
            return Err(Status::aborted(format!(
                "blob '{}' was replaced on this node since the read began (version {version} \
                 now, {} asked); start the read again",
                req.id, req.version
            )));
        }
        let r = b
            .read_chunk(req.offset, req.len)
            .map(|(crc32c, buf)| (GetChunkResponse { crc32c }, buf));
        if matches!(&r, Err(s) if s.code() == pagerpc::Code::DataLoss) {
            self.tallies
                .corrupt_chunks_read
                .fetch_add(1, Ordering::Relaxed);
        }
        r
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
                credits: 0,
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

    /// One page of the listing: the blobs with ids after `start_after`, in
    /// id order, at most `limit` (or [`DEFAULT_LIST_LIMIT`]) and at most
    /// [`MAX_LIST_PAGE_BYTES`] encoded. Each page scans the directory once
    /// and reads the headers of the blobs it returns only.
    fn list_page(&self, req: ListRequest) -> Result<BlobList, Status> {
        let limit = match req.limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        } as usize;
        // The `limit + 1` smallest ids after `start_after` (one more tells
        // whether the listing goes on).
        let mut smallest: BinaryHeap<String> = BinaryHeap::with_capacity(limit + 2);
        for (id, _) in self.blob_entries()? {
            if id.as_str() <= req.start_after.as_str() {
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
        let mut more = ids.len() > limit;
        ids.truncate(limit);
        let mut blobs = Vec::with_capacity(ids.len());
        let mut bytes = 0;
        for id in ids {
            let Some(info) = self.describe(&id) else {
                continue;
            };
            let len = info.encoded_len();
            // Field tag and length prefix of a repeated message.
            let len = 1 + prost::length_delimiter_len(len) + len;
            if bytes + len > MAX_LIST_PAGE_BYTES && !blobs.is_empty() {
                more = true;
                break;
            }
            bytes += len;
            blobs.push(info);
        }
        Ok(BlobList { blobs, more })
    }

    fn delete(&self, req: BlobRef) -> Result<DeleteResponse, Status> {
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
            uploads_expired: t.uploads_expired.load(Ordering::Relaxed),
            uploads_refused: t.uploads_refused.load(Ordering::Relaxed),
            open_blobs: self.open.len() as u64,
        })
    }

    /// Discards unary uploads idle for longer than the timeout. One whose
    /// chunk is being written right now is not idle, and is left alone.
    fn reap(&self) {
        let mut expired = Vec::new();
        {
            let mut ups = lock(&self.uploads);
            let dead: Vec<u64> = ups
                .iter()
                .filter(|(_, s)| lock(&s.last_active).elapsed() > self.cfg.upload_timeout)
                .map(|(h, _)| *h)
                .collect();
            for h in dead {
                let taken = match ups[&h].upload.try_lock() {
                    Ok(mut g) => Some(g.take()),
                    Err(TryLockError::Poisoned(p)) => Some(p.into_inner().take()),
                    Err(TryLockError::WouldBlock) => None,
                };
                if let Some(upload) = taken {
                    ups.remove(&h);
                    expired.extend(upload);
                }
            }
        }
        // Temporary files are removed here, outside the lock.
        for up in expired {
            self.tallies.uploads_expired.fetch_add(1, Ordering::Relaxed);
            up.session.abort();
        }
    }

    /// Takes every unary upload out of the table.
    fn drain_uploads(&self) -> Vec<Upload> {
        let slots: Vec<Arc<UploadSlot>> = lock(&self.uploads).drain().map(|(_, s)| s).collect();
        slots
            .iter()
            .filter_map(|s| lock(&s.upload).take())
            .collect()
    }
}

/// A running storage node. Dropping it shuts it down.
pub struct StorageNode {
    node: Arc<Node>,
    addr: SocketAddr,
    reaper: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
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
    /// When the directory cannot be prepared or the address bound.
    pub fn start(listen: impl ToSocketAddrs, cfg: NodeConfig) -> io::Result<StorageNode> {
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
            uploads: Mutex::new(HashMap::new()),
            next_upload: AtomicU64::new(1),
            open: OpenBlobs::new(cfg.max_open_blobs),
            server: Mutex::new(None),
            tallies: Tallies::default(),
            rng: Mutex::new(FastRng::new(seed)),
            cfg,
        });
        let mut scfg = if node.cfg.zerocopy {
            ServerConfig::zerocopy()
        } else {
            ServerConfig::default()
        };
        scfg.threads = node.cfg.threads.max(2);
        let n = || node.clone();
        let (n1, n2, n3, n4, n5, n6, n7, n8, n9) = (n(), n(), n(), n(), n(), n(), n(), n(), n());
        let server = Server::builder()
            .config(scfg)
            .register(
                method::PUT_BEGIN,
                move |c: &Context, req: PutBegin, _p: Pages| {
                    Ok((n1.put_begin(c.peer(), req)?, Payload::Empty))
                },
            )
            .register(method::PUT_CHUNK, move |_c, req: PutChunk, p: Pages| {
                Ok((n2.put_chunk(req, p)?, Payload::Empty))
            })
            .register(method::PUT_COMMIT, move |_c, req: PutCommit, _p: Pages| {
                Ok((n3.put_commit(req)?, Payload::Empty))
            })
            .register(method::PUT_ABORT, move |_c, req: UploadRef, _p: Pages| {
                n4.put_abort(req);
                Ok::<_, Status>((Empty {}, Payload::Empty))
            })
            .register(method::GET_BEGIN, move |_c, req: BlobRef, _p: Pages| {
                Ok((n5.get_begin(req)?, Payload::Empty))
            })
            .register(method::GET_CHUNK, move |_c, req: GetChunk, _p: Pages| {
                let (resp, buf) = n6.get_chunk(req)?;
                Ok((resp, Payload::Buf(buf)))
            })
            .register(method::LIST, move |_c, req: ListRequest, _p: Pages| {
                Ok((n7.list_page(req)?, Payload::Empty))
            })
            .register(method::DELETE, move |_c, req: BlobRef, _p: Pages| {
                Ok((n8.delete(req)?, Payload::Empty))
            })
            .register(method::STATS, move |_c, _req: Empty, _p: Pages| {
                Ok((n9.stats()?, Payload::Empty))
            })
            .bind(listen)?;
        let addr = server.local_addr();
        *lock(&node.server) = Some(server);
        let (tx, rx) = mpsc::channel::<()>();
        let tick =
            (node.cfg.upload_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let rn = node.clone();
        let reaper = std::thread::Builder::new()
            .name("storage-reaper".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(tick) {
                    rn.reap();
                }
            })?;
        Ok(StorageNode {
            node,
            addr,
            reaper: Some((tx, reaper)),
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

    /// The node's statistics, as `node.stats` returns them.
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

    /// Stops the node gracefully: stops accepting, gives in-flight calls up
    /// to 10 s to finish (a call whose client does not read its response
    /// would otherwise hold the stop for the send timeout), closes every
    /// connection, and discards unfinished uploads.
    pub fn shutdown(mut self) {
        self.stop(Some(Duration::from_secs(10)), true);
    }

    /// Stops the node at once, as a crash would: calls in flight are cut
    /// off, connections closed, and the temporary files of unfinished
    /// uploads are left behind (the next start removes them). For tests and
    /// demonstrations of failover.
    pub fn kill(mut self) {
        self.stop(Some(Duration::ZERO), false);
    }

    fn stop(&mut self, grace: Option<Duration>, discard: bool) {
        // Take the server out first: the stats handler locks this slot and
        // stopping waits for handlers.
        let server = lock(&self.node.server).take();
        if let Some(s) = server {
            match grace {
                Some(g) => {
                    s.shutdown_timeout(g);
                }
                None => s.shutdown(),
            }
        }
        if let Some((tx, h)) = self.reaper.take() {
            drop(tx);
            let _ = h.join();
        }
        for up in self.node.drain_uploads() {
            if discard {
                up.session.abort();
            } else {
                up.session.leave_behind();
            }
        }
        self.node.open.clear();
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        self.stop(Some(Duration::from_secs(10)), true);
    }
}
