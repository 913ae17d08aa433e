//! The storage node server.
//!
//! Writes go straight from the received payload pages to the disk with
//! `O_DIRECT` (whole pages), the tail of the last chunk (`len % 4096`)
//! through an ordinary buffered descriptor; reads come from the disk with
//! `O_DIRECT` into page-aligned [`PageBuf`]s that are sent as they are.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagerpc::{CountersSnapshot, PageBuf, Pages, Payload, Server, ServerConfig, Status};

use super::format::{chunk_count, header_len, BlobHeader};
use super::{
    check_id, chunk_len, method, open_split, round_up_page, write_split, BlobInfo, BlobList,
    BlobRef, DeleteResponse, Empty, GetChunk, GetChunkResponse, NodeStats, PutBegin,
    PutBeginResponse, PutChunk, PutChunkResponse, PutCommit, UploadRef, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE, PAGE,
};
use crate::util::FastRng;

/// Prefix of temporary upload files in the node's directory.
pub const TMP_PREFIX: &str = ".tmp-";
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
        }
    }
}

struct Upload {
    id: String,
    tmp: PathBuf,
    size: u64,
    chunk_size: u64,
    version: u64,
    crc: Option<u32>,
    header_len: u64,
    /// `O_DIRECT` descriptor for whole pages (buffered if direct I/O is off).
    direct: File,
    /// Buffered descriptor for tails.
    buffered: File,
    chunk_crcs: Mutex<Vec<Option<u32>>>,
    received: AtomicU64,
    last_active: Mutex<Instant>,
    busy: AtomicUsize,
}

struct OpenBlob {
    file: File,
    header: BlobHeader,
}

#[derive(Default)]
struct Tallies {
    direct_write_copies: AtomicU64,
    corrupt_chunks_read: AtomicU64,
    uploads_rejected: AtomicU64,
    uploads_expired: AtomicU64,
}

struct Node {
    dir: PathBuf,
    cfg: NodeConfig,
    direct_io: bool,
    uploads: Mutex<HashMap<u64, Arc<Upload>>>,
    next_upload: AtomicU64,
    open: Mutex<HashMap<String, Arc<OpenBlob>>>,
    server: Mutex<Option<Server>>,
    tallies: Tallies,
    rng: Mutex<FastRng>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent at each step,
    // so a panic elsewhere does not make the data unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_status(what: impl std::fmt::Display, e: &io::Error) -> Status {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Status::resource_exhausted(format!("{what}: the node's disk is full ({e})"))
    } else {
        Status::internal(format!("{what}: {e}"))
    }
}

fn open_flags(direct: bool) -> i32 {
    if direct {
        libc::O_DIRECT
    } else {
        0
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads `buf.len()` bytes at `pos` (fewer at end of file), page by page
/// aligned as `O_DIRECT` needs; returns the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Node {
    fn blob_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{BLOB_SUFFIX}"))
    }

    fn credits(&self, chunk_size: u64) -> u32 {
        let transfers = lock(&self.uploads).len() as u64 + 1;
        let fit = self.cfg.memory_budget / (chunk_size * transfers).max(1);
        fit.clamp(1, u64::from(self.cfg.max_credits.max(1))) as u32
    }

    fn upload(&self, handle: u64) -> Result<Arc<Upload>, Status> {
        lock(&self.uploads).get(&handle).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "no upload {handle} on this node (aborted, committed, expired after {:?} \
                 without a chunk, or the node restarted)",
                self.cfg.upload_timeout
            ))
        })
    }

    fn discard(&self, up: &Upload) {
        let _ = fs::remove_file(&up.tmp);
    }

    fn put_begin(&self, req: PutBegin) -> Result<PutBeginResponse, Status> {
        check_id(&req.id).map_err(Status::invalid_argument)?;
        let cs = req.chunk_size;
        if !cs.is_multiple_of(PAGE) || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(Status::invalid_argument(format!(
                "chunk size {cs} must be a multiple of {PAGE} between {MIN_CHUNK_SIZE} and \
                 {MAX_CHUNK_SIZE}"
            )));
        }
        let n = chunk_count(req.size, cs);
        if n > u64::from(u32::MAX) {
            return Err(Status::invalid_argument(format!(
                "{} bytes in chunks of {cs} is too many chunks",
                req.size
            )));
        }
        let tag = lock(&self.rng).next_u64();
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}-{tag:016x}", req.id));
        let mut oo = OpenOptions::new();
        oo.write(true).create_new(true).mode(0o644);
        let (direct, buffered, _) = open_split(&tmp, &oo, self.direct_io).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_status(format_args!("cannot create {}", tmp.display()), &e)
        })?;
        let handle = self.next_upload.fetch_add(1, Ordering::Relaxed);
        let up = Arc::new(Upload {
            id: req.id,
            tmp,
            size: req.size,
            chunk_size: cs,
            version: req.version,
            crc: req.crc32c,
            header_len: header_len(n),
            direct,
            buffered,
            chunk_crcs: Mutex::new(vec![None; n as usize]),
            received: AtomicU64::new(0),
            last_active: Mutex::new(Instant::now()),
            busy: AtomicUsize::new(0),
        });
        let credits = self.credits(cs);
        lock(&self.uploads).insert(handle, up);
        Ok(PutBeginResponse {
            upload: handle,
            credits,
        })
    }

    /// [`write_split`], counting the chunks that had to be copied first.
    fn write(&self, up: &Upload, data: &[u8], pos: u64) -> io::Result<()> {
        if write_split(&up.direct, &up.buffered, data, pos)? {
            self.tallies
                .direct_write_copies
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn put_chunk(&self, req: PutChunk, pages: Pages) -> Result<PutChunkResponse, Status> {
        let up = self.upload(req.upload)?;
        up.busy.fetch_add(1, Ordering::SeqCst);
        let r = self.put_chunk_inner(&up, &req, &pages);
        *lock(&up.last_active) = Instant::now();
        up.busy.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn put_chunk_inner(
        &self,
        up: &Upload,
        req: &PutChunk,
        pages: &Pages,
    ) -> Result<PutChunkResponse, Status> {
        let off = req.offset;
        if !off.is_multiple_of(up.chunk_size) || off >= up.size {
            return Err(Status::invalid_argument(format!(
                "offset {off} is not a chunk boundary of '{}' ({} bytes in chunks of {})",
                up.id, up.size, up.chunk_size
            )));
        }
        let want = chunk_len(up.size, up.chunk_size, off);
        if pages.len() as u64 != want {
            return Err(Status::invalid_argument(format!(
                "chunk at offset {off} of '{}' has {} bytes; it must have {want}",
                up.id,
                pages.len()
            )));
        }
        let crc = crc32c::crc32c(pages);
        if let Some(sent) = req.crc32c {
            if sent != crc {
                return Err(Status::data_loss(format!(
                    "chunk at offset {off} of '{}' arrived with CRC32C {crc:#010x}, but the \
                     client computed {sent:#010x}; it was not stored",
                    up.id
                )));
            }
        }
        self.write(up, pages, up.header_len + off)
            .map_err(|e| io_status(format_args!("writing '{}' at {off}", up.id), &e))?;
        let idx = (off / up.chunk_size) as usize;
        let first = lock(&up.chunk_crcs)[idx].replace(crc).is_none();
        let received = if first {
            up.received.fetch_add(want, Ordering::Relaxed) + want
        } else {
            up.received.load(Ordering::Relaxed)
        };
        Ok(PutChunkResponse { received })
    }

    fn put_commit(&self, req: PutCommit) -> Result<BlobInfo, Status> {
        let up = {
            let mut uploads = lock(&self.uploads);
            let Some(up) = uploads.get(&req.upload) else {
                drop(uploads);
                return Err(self
                    .upload(req.upload)
                    .err()
                    .unwrap_or_else(|| Status::not_found(format!("no upload {}", req.upload))));
            };
            if up.busy.load(Ordering::SeqCst) > 0 {
                return Err(Status::failed_precondition(format!(
                    "commit of '{}' while chunks are still being written",
                    up.id
                )));
            }
            let crcs = lock(&up.chunk_crcs);
            let missing = crcs.iter().filter(|c| c.is_none()).count();
            if missing > 0 {
                return Err(Status::failed_precondition(format!(
                    "commit of '{}' with {missing} of {} chunks still missing",
                    up.id,
                    crcs.len()
                )));
            }
            drop(crcs);
            uploads
                .remove(&req.upload)
                .expect("the upload was just found")
        };
        match self.commit(&up, req.crc32c) {
            Ok(info) => Ok(info),
            Err(s) => {
                self.discard(&up);
                Err(s)
            }
        }
    }

    fn commit(&self, up: &Upload, commit_crc: Option<u32>) -> Result<BlobInfo, Status> {
        let expected = match (up.crc, commit_crc) {
            (Some(a), Some(b)) if a != b => {
                return Err(Status::invalid_argument(format!(
                    "'{}': put.begin gave CRC32C {a:#010x} but put.commit gave {b:#010x}",
                    up.id
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(Status::invalid_argument(format!(
                    "'{}': no CRC32C given in put.begin or put.commit",
                    up.id
                )))
            }
        };
        let crcs: Vec<u32> = lock(&up.chunk_crcs)
            .iter()
            .map(|c| c.unwrap_or(0))
            .collect();
        let mut whole = 0u32;
        let mut off = 0;
        for c in &crcs {
            let len = chunk_len(up.size, up.chunk_size, off);
            whole = crc32c::crc32c_combine(whole, *c, len as usize);
            off += len;
        }
        if whole != expected {
            self.tallies
                .uploads_rejected
                .fetch_add(1, Ordering::Relaxed);
            return Err(Status::data_loss(format!(
                "blob '{}' ({} bytes) failed its checksum: the client's CRC32C is \
                 {expected:#010x}, the data received has {whole:#010x}; the upload was discarded",
                up.id, up.size
            )));
        }
        let header = BlobHeader {
            size: up.size,
            crc32c: whole,
            chunk_size: up.chunk_size,
            version: up.version,
            chunk_crcs: crcs,
        };
        let what = |step: &str| format!("committing '{}': {step}", up.id);
        let hb = header
            .encode()
            .map_err(|e| io_status(what("header memory"), &e))?;
        self.write(up, &hb, 0)
            .map_err(|e| io_status(what("writing the header"), &e))?;
        up.direct
            .sync_all()
            .map_err(|e| io_status(what("fsync"), &e))?;
        let path = self.blob_path(&up.id);
        fs::rename(&up.tmp, &path).map_err(|e| io_status(what("rename"), &e))?;
        lock(&self.open).remove(&up.id);
        sync_dir(&self.dir).map_err(|e| io_status(what("fsync of the directory"), &e))?;
        Ok(BlobInfo {
            id: up.id.clone(),
            size: up.size,
            crc32c: whole,
            chunk_size: up.chunk_size,
            version: up.version,
            credits: 0,
            problem: String::new(),
        })
    }

    fn put_abort(&self, req: UploadRef) {
        let up = lock(&self.uploads).remove(&req.upload);
        if let Some(up) = up {
            self.discard(&up);
        }
    }

    fn open_blob(&self, id: &str) -> Result<Arc<OpenBlob>, Status> {
        check_id(id).map_err(Status::invalid_argument)?;
        if let Some(b) = lock(&self.open).get(id) {
            return Ok(b.clone());
        }
        let path = self.blob_path(id);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(open_flags(self.direct_io))
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Status::not_found(format!("no blob '{id}' on this node"))
                } else {
                    io_status(format_args!("cannot open {}", path.display()), &e)
                }
            })?;
        let read_err = |e: io::Error| io_status(format_args!("reading the header of '{id}'"), &e);
        let mut first = PageBuf::new(PAGE as usize).map_err(read_err)?;
        let n = read_full_at(&file, &mut first, 0).map_err(read_err)?;
        let corrupt = |e: String| {
            Status::data_loss(format!(
                "blob '{id}' is corrupt on this node: its header is unreadable: {e}"
            ))
        };
        let declared = BlobHeader::declared_len(&first[..n]).map_err(corrupt)?;
        let header = if declared <= PAGE {
            BlobHeader::decode(&first[..n]).map_err(corrupt)?
        } else {
            let mut all = PageBuf::new(round_up_page(declared) as usize).map_err(read_err)?;
            let n = read_full_at(&file, &mut all, 0).map_err(read_err)?;
            BlobHeader::decode(&all[..n]).map_err(corrupt)?
        };
        let b = Arc::new(OpenBlob { file, header });
        let mut open = lock(&self.open);
        if open.len() >= 1024 {
            open.clear();
        }
        open.insert(id.to_owned(), b.clone());
        Ok(b)
    }

    fn info(&self, id: &str, b: &OpenBlob) -> BlobInfo {
        BlobInfo {
            id: id.to_owned(),
            size: b.header.size,
            crc32c: b.header.crc32c,
            chunk_size: b.header.chunk_size,
            version: b.header.version,
            credits: self.credits(b.header.chunk_size),
            problem: String::new(),
        }
    }

    fn get_begin(&self, req: BlobRef) -> Result<BlobInfo, Status> {
        let b = self.open_blob(&req.id)?;
        Ok(self.info(&req.id, &b))
    }

    fn get_chunk(&self, req: GetChunk) -> Result<(GetChunkResponse, PageBuf), Status> {
        let b = self.open_blob(&req.id)?;
        let h = &b.header;
        if h.version != req.version {
            return Err(Status::aborted(format!(
                "blob '{}' was replaced on this node since the read began (version {} now, {} \
                 asked); start the read again",
                req.id, h.version, req.version
            )));
        }
        let off = req.offset;
        if !off.is_multiple_of(h.chunk_size)
            || off >= h.size
            || req.len != chunk_len(h.size, h.chunk_size, off)
        {
            return Err(Status::invalid_argument(format!(
                "bytes {off}+{} are not a chunk of '{}' ({} bytes in chunks of {})",
                req.len, req.id, h.size, h.chunk_size
            )));
        }
        let len = req.len as usize;
        let read_err = |e: io::Error| io_status(format_args!("reading '{}' at {off}", req.id), &e);
        let mut buf = PageBuf::for_overwrite(round_up_page(req.len) as usize).map_err(read_err)?;
        let n = read_full_at(&b.file, &mut buf, h.len() + off).map_err(read_err)?;
        if n < len {
            return Err(Status::data_loss(format!(
                "blob '{}' is corrupt on this node: the file ends {} bytes into chunk at offset \
                 {off}, which has {len}",
                req.id, n
            )));
        }
        buf.truncate(len);
        let idx = (off / h.chunk_size) as usize;
        let stored = h.chunk_crcs[idx];
        let crc = crc32c::crc32c(&buf);
        if crc != stored {
            self.tallies
                .corrupt_chunks_read
                .fetch_add(1, Ordering::Relaxed);
            return Err(Status::data_loss(format!(
                "blob '{}' is corrupt on this node: chunk {idx} (bytes {off}..{}) read from disk \
                 has CRC32C {crc:#010x}, but {stored:#010x} was stored when it was written",
                req.id,
                off + req.len
            )));
        }
        Ok((GetChunkResponse { crc32c: stored }, buf))
    }

    fn list(&self) -> Result<BlobList, Status> {
        let rd = fs::read_dir(&self.dir)
            .map_err(|e| io_status(format_args!("listing {}", self.dir.display()), &e))?;
        let mut blobs = Vec::new();
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(id) = name.strip_suffix(BLOB_SUFFIX) else {
                continue;
            };
            if check_id(id).is_err() {
                continue;
            }
            match self.open_blob(id) {
                Ok(b) => blobs.push(BlobInfo {
                    credits: 0,
                    ..self.info(id, &b)
                }),
                Err(s) if s.code() == pagerpc::Code::NotFound => {}
                Err(s) => blobs.push(BlobInfo {
                    id: id.to_owned(),
                    size: ent.metadata().map_or(0, |m| m.len()),
                    problem: s.message().to_owned(),
                    ..BlobInfo::default()
                }),
            }
        }
        blobs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(BlobList { blobs })
    }

    fn delete(&self, req: BlobRef) -> Result<DeleteResponse, Status> {
        check_id(&req.id).map_err(Status::invalid_argument)?;
        lock(&self.open).remove(&req.id);
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

    fn stats(&self) -> Result<NodeStats, Status> {
        let list = self.list()?;
        let c = self.counters();
        let t = &self.tallies;
        Ok(NodeStats {
            blobs: list.blobs.len() as u64,
            bytes: list.blobs.iter().map(|b| b.size).sum(),
            uploads: lock(&self.uploads).len() as u64,
            direct_io: self.direct_io,
            payload_bytes_received: c.payload_bytes_received,
            payload_bytes_sent: c.payload_bytes_sent,
            bytes_mapped: c.bytes_mapped,
            bytes_copied: c.bytes_copied(),
            direct_write_copies: t.direct_write_copies.load(Ordering::Relaxed),
            corrupt_chunks_read: t.corrupt_chunks_read.load(Ordering::Relaxed),
            uploads_rejected: t.uploads_rejected.load(Ordering::Relaxed),
            uploads_expired: t.uploads_expired.load(Ordering::Relaxed),
        })
    }

    /// Discards uploads idle for longer than the timeout.
    fn reap(&self) {
        let expired: Vec<Arc<Upload>> = {
            let mut uploads = lock(&self.uploads);
            let dead: Vec<u64> = uploads
                .iter()
                .filter(|(_, u)| {
                    u.busy.load(Ordering::SeqCst) == 0
                        && lock(&u.last_active).elapsed() > self.cfg.upload_timeout
                })
                .map(|(h, _)| *h)
                .collect();
            dead.iter().filter_map(|h| uploads.remove(h)).collect()
        };
        for up in expired {
            self.tallies.uploads_expired.fetch_add(1, Ordering::Relaxed);
            self.discard(&up);
        }
    }
}

/// Removes temporary files left by uploads that never committed (a crash
/// or kill of the node); returns how many.
fn clean_temps(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        if ent.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            fs::remove_file(ent.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether `dir`'s filesystem accepts `O_DIRECT` writes from page-aligned
/// memory.
fn probe_direct(dir: &Path) -> bool {
    let p = dir.join(format!("{TMP_PREFIX}probe-{}", std::process::id()));
    let ok = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .and_then(|f| {
            let b = PageBuf::new(PAGE as usize)?;
            f.write_all_at(&b, 0)
        })
        .is_ok();
    let _ = fs::remove_file(&p);
    ok
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
            uploads: Mutex::new(HashMap::new()),
            next_upload: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
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
            .register(method::PUT_BEGIN, move |_c, req: PutBegin, _p: Pages| {
                Ok((n1.put_begin(req)?, Payload::Empty))
            })
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
            .register(method::LIST, move |_c, _req: Empty, _p: Pages| {
                Ok((n7.list()?, Payload::Empty))
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
        let ups: Vec<Arc<Upload>> = lock(&self.node.uploads).drain().map(|(_, u)| u).collect();
        if discard {
            for up in ups {
                self.node.discard(&up);
            }
        }
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        self.stop(Some(Duration::from_secs(10)), true);
    }
}
