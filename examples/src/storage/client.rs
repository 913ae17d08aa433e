//! The storage client: chunked PUT and GET with W chunk calls in flight,
//! CRC32C checks, and rendezvous placement with fallback over several
//! nodes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use pagerpc::prost::Message;
use pagerpc::{CallError, CallOptions, Client, ClientConfig, Code, PageBuf, Payload, PendingCall};

use super::{
    check_id, chunk_len, method, rank_nodes, BlobInfo, BlobList, BlobRef, DeleteResponse, Empty,
    GetChunk, GetChunkResponse, ListRequest, NodeStats, PutBegin, PutBeginResponse, PutChunk,
    PutChunkResponse, PutCommit, UploadRef, DEFAULT_CHUNK_SIZE, MAX_LIST_LIMIT,
};
use super::{open_split, write_split};
use crate::util::{human_bytes, progress_bar};

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The nodes, in any order (placement ranks them per blob).
    pub nodes: Vec<SocketAddr>,
    /// Copies of each blob (capped at the number of nodes).
    pub replicas: usize,
    /// Chunk size for PUTs: a page multiple, 64 KiB to 64 MiB.
    pub chunk_size: u64,
    /// Zero-copy receive and `MSG_ZEROCOPY` send.
    pub zerocopy: bool,
    /// Progress bars on stderr (drawn only when it is a terminal).
    pub progress: bool,
    /// Longest wait for any one call.
    pub call_timeout: Duration,
    /// Longest wait to connect to a node.
    pub connect_timeout: Duration,
    /// Write GET output with `O_DIRECT` (whole pages; falls back to
    /// buffered I/O where the filesystem refuses it).
    pub direct_output: bool,
}

impl ClientOptions {
    /// Defaults for the given nodes: one replica, 4 MiB chunks, zero-copy,
    /// progress bars.
    pub fn new(nodes: Vec<SocketAddr>) -> ClientOptions {
        ClientOptions {
            nodes,
            replicas: 1,
            chunk_size: DEFAULT_CHUNK_SIZE,
            zerocopy: true,
            progress: true,
            call_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(3),
            direct_output: true,
        }
    }
}

/// A failed storage operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageError {
    /// The closest status code: [`Code::DataLoss`] for a checksum failure,
    /// [`Code::NotFound`], [`Code::Unavailable`] when no node could serve,
    /// [`Code::Internal`] for local file errors.
    pub code: Code,
    /// What happened, naming nodes, offsets and checksums.
    pub message: String,
}

impl StorageError {
    fn new(code: Code, message: impl Into<String>) -> StorageError {
        StorageError {
            code,
            message: message.into(),
        }
    }

    fn local(message: impl Into<String>) -> StorageError {
        StorageError::new(Code::Internal, message)
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StorageError {}

/// A node's failure as the client saw it.
#[derive(Clone, Debug)]
struct NodeFailure {
    code: Code,
    message: String,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl From<CallError> for NodeFailure {
    fn from(e: CallError) -> Self {
        NodeFailure {
            code: e.code(),
            message: e.message().to_owned(),
        }
    }
}

/// The outcome of a PUT.
#[derive(Clone, Debug)]
pub struct PutReport {
    /// The blob id.
    pub id: String,
    /// Its size.
    pub size: u64,
    /// Its CRC32C.
    pub crc32c: u32,
    /// Nodes that acknowledged the blob, fsynced.
    pub stored_on: Vec<SocketAddr>,
    /// Replicas asked for (capped at the number of nodes).
    pub wanted: usize,
    /// Nodes that failed, and how.
    pub failures: Vec<(SocketAddr, String)>,
    /// Wall time.
    pub elapsed: Duration,
    /// Payload bytes the storing nodes mapped while receiving (from their
    /// stats before and after; other traffic at the same time counts too).
    pub node_bytes_mapped: u64,
    /// Payload bytes the storing nodes copied.
    pub node_bytes_copied: u64,
}

impl PutReport {
    /// Percentage of the bytes the storing nodes received that they mapped.
    pub fn node_mapped_percent(&self) -> f64 {
        percent(self.node_bytes_mapped, self.node_bytes_copied)
    }

    /// Bytes per second, counting one copy of the blob.
    pub fn bytes_per_sec(&self) -> f64 {
        self.size as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The outcome of a GET.
#[derive(Clone, Debug)]
pub struct GetReport {
    /// The blob id.
    pub id: String,
    /// Its size.
    pub size: u64,
    /// Its CRC32C (checked).
    pub crc32c: u32,
    /// Nodes that served parts of it, with the bytes each served, in order.
    pub served_by: Vec<(SocketAddr, u64)>,
    /// Nodes that failed, and how.
    pub failures: Vec<(SocketAddr, String)>,
    /// Wall time.
    pub elapsed: Duration,
    /// Payload bytes this client mapped while receiving.
    pub bytes_mapped: u64,
    /// Payload bytes this client copied while receiving.
    pub bytes_copied: u64,
}

impl GetReport {
    /// Percentage of received bytes that were mapped.
    pub fn mapped_percent(&self) -> f64 {
        percent(self.bytes_mapped, self.bytes_copied)
    }

    /// Bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        self.size as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A blob as listed over all nodes.
#[derive(Clone, Debug)]
pub struct ListedBlob {
    /// The newest version's description.
    pub info: BlobInfo,
    /// Nodes holding the newest version.
    pub nodes: Vec<SocketAddr>,
    /// Nodes holding an older version.
    pub stale: Vec<SocketAddr>,
    /// Nodes whose copy has a problem (corrupt header), and what.
    pub problems: Vec<(SocketAddr, String)>,
}

fn percent(mapped: u64, copied: u64) -> f64 {
    let t = mapped + copied;
    if t == 0 {
        0.0
    } else {
        100.0 * mapped as f64 / t as f64
    }
}

type Warn = Arc<dyn Fn(&str) + Send + Sync>;
/// How one node fared in an upload pass.
type PassResult = (SocketAddr, Result<(), NodeFailure>);
type Hook = Arc<dyn Fn(&str, u64) + Send + Sync>;

/// A client for one or more storage nodes. Safe to share between threads;
/// it keeps one connection per node.
pub struct StorageClient {
    opts: ClientOptions,
    conns: Mutex<HashMap<SocketAddr, Client>>,
    warn: Warn,
    hook: Option<Hook>,
}

impl std::fmt::Debug for StorageClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageClient")
            .field("opts", &self.opts)
            .finish()
    }
}

/// One replica being written.
struct Target {
    addr: SocketAddr,
    client: Client,
    upload: u64,
    credits: usize,
    queue: VecDeque<PendingCall>,
    failed: Option<NodeFailure>,
    before: Option<NodeStats>,
}

enum ReadFail {
    Node(NodeFailure),
    Local(StorageError),
}

impl StorageClient {
    /// A client with `opts`; warnings go to stderr.
    pub fn new(opts: ClientOptions) -> StorageClient {
        StorageClient {
            opts,
            conns: Mutex::new(HashMap::new()),
            warn: Arc::new(|m: &str| eprintln!("warning: {m}")),
            hook: None,
        }
    }

    /// Sends warnings (a node down, a replica moved, a fallback) to `f`
    /// instead of stderr.
    pub fn on_warning(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> StorageClient {
        self.warn = Arc::new(f);
        self
    }

    /// Calls `f(operation, bytes done)` after every chunk of a transfer
    /// (`operation` is "put" or "get").
    pub fn on_progress(mut self, f: impl Fn(&str, u64) + Send + Sync + 'static) -> StorageClient {
        self.hook = Some(Arc::new(f));
        self
    }

    /// The settings.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// The nodes ranked for blob `id`, best first.
    pub fn ranked(&self, id: &str) -> Vec<SocketAddr> {
        rank_nodes(&self.opts.nodes, id)
    }

    fn say(&self, bar: Option<&ProgressBar>, msg: &str) {
        match bar {
            Some(b) => b.suspend(|| (self.warn)(msg)),
            None => (self.warn)(msg),
        }
    }

    fn conn(&self, addr: SocketAddr) -> Result<Client, NodeFailure> {
        self.conn_cached(addr).map(|(c, _)| c)
    }

    /// The connection to `addr`, and whether it was already open.
    fn conn_cached(&self, addr: SocketAddr) -> Result<(Client, bool), NodeFailure> {
        if let Some(c) = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
        {
            return Ok((c.clone(), true));
        }
        let mut cfg = if self.opts.zerocopy {
            ClientConfig::zerocopy()
        } else {
            ClientConfig::default()
        };
        cfg.connect_timeout = self.opts.connect_timeout;
        let c = Client::connect_with(addr, cfg).map_err(|e| NodeFailure {
            code: Code::Unavailable,
            message: format!("cannot connect: {e}"),
        })?;
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, c.clone());
        Ok((c, false))
    }

    /// Drops the cached connection to `addr` (the next call reconnects).
    fn forget(&self, addr: SocketAddr) {
        let c = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        if let Some(c) = c {
            c.close();
        }
    }

    fn call_opts(&self) -> CallOptions {
        CallOptions {
            timeout: Some(self.opts.call_timeout),
            ..CallOptions::default()
        }
    }

    fn call<Req: Message, Resp: Message + Default>(
        &self,
        addr: SocketAddr,
        method: &str,
        req: &Req,
    ) -> Result<Resp, NodeFailure> {
        loop {
            let (c, cached) = self.conn_cached(addr)?;
            match c.call_with(method, req, Payload::Empty, &self.call_opts()) {
                Ok(r) => return Ok(r.message),
                Err(e) => {
                    if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded) {
                        self.forget(addr);
                        // A connection kept from earlier may have been closed
                        // by the node meanwhile (its idle timeout): try once
                        // more on a fresh one. Every method but the commit
                        // can be repeated safely.
                        if cached && e.code() == Code::Unavailable && method != method::PUT_COMMIT {
                            continue;
                        }
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// A node's statistics.
    ///
    /// # Errors
    /// When the node cannot be reached.
    pub fn node_stats(&self, addr: SocketAddr) -> Result<NodeStats, StorageError> {
        self.call(addr, method::STATS, &Empty {})
            .map_err(|f| StorageError::new(f.code, format!("node {addr}: {f}")))
    }

    /// Stores the file at `path` as blob `id` on the top-ranked
    /// `replicas` nodes. A node that fails (down, or dies mid-transfer) is
    /// reported through the warning callback and its replica is written to
    /// the next-ranked node instead, while there is one.
    ///
    /// # Errors
    /// When no node stored the blob, or the file cannot be read.
    pub fn put_file(&self, path: &Path, id: &str) -> Result<PutReport, StorageError> {
        check_id(id).map_err(|m| StorageError::new(Code::InvalidArgument, m))?;
        let cs = self.opts.chunk_size;
        let file = File::open(path)
            .map_err(|e| StorageError::local(format!("cannot open {}: {e}", path.display())))?;
        let size = file
            .metadata()
            .map_err(|e| StorageError::local(format!("cannot stat {}: {e}", path.display())))?
            .len();
        let version = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let ranked = self.ranked(id);
        if ranked.is_empty() {
            return Err(StorageError::new(Code::InvalidArgument, "no nodes given"));
        }
        let wanted = self.opts.replicas.clamp(1, ranked.len());
        let mut next_spare = wanted;
        let mut pending: Vec<SocketAddr> = ranked[..wanted].to_vec();
        let t0 = Instant::now();
        let mut report = PutReport {
            id: id.to_owned(),
            size,
            crc32c: 0,
            stored_on: Vec::new(),
            wanted,
            failures: Vec::new(),
            elapsed: Duration::ZERO,
            node_bytes_mapped: 0,
            node_bytes_copied: 0,
        };
        while !pending.is_empty() {
            let results = self.upload_pass(&pending, &file, id, size, cs, version, &mut report)?;
            pending.clear();
            for (addr, r) in results {
                match r {
                    Ok(()) => report.stored_on.push(addr),
                    Err(f) => {
                        report.failures.push((addr, f.to_string()));
                        if next_spare < ranked.len() {
                            let spare = ranked[next_spare];
                            next_spare += 1;
                            self.say(
                                None,
                                &format!("writing the replica of '{id}' meant for {addr} to {spare} instead"),
                            );
                            pending.push(spare);
                        } else {
                            self.say(
                                None,
                                &format!("no other node is left to take the replica of '{id}' meant for {addr}"),
                            );
                        }
                    }
                }
            }
        }
        report.elapsed = t0.elapsed();
        if report.stored_on.is_empty() {
            let why: Vec<String> = report
                .failures
                .iter()
                .map(|(a, e)| format!("{a}: {e}"))
                .collect();
            let code = if report
                .failures
                .iter()
                .all(|(_, e)| e.starts_with("DataLoss"))
            {
                Code::DataLoss
            } else {
                Code::Unavailable
            };
            return Err(StorageError::new(
                code,
                format!(
                    "PUT of '{id}' failed on every node tried: {}",
                    why.join("; ")
                ),
            ));
        }
        if report.stored_on.len() < wanted {
            self.say(
                None,
                &format!(
                    "'{id}' is stored on {} of the {wanted} replicas asked for",
                    report.stored_on.len()
                ),
            );
        }
        Ok(report)
    }

    fn begin(
        &self,
        addr: SocketAddr,
        id: &str,
        size: u64,
        cs: u64,
        version: u64,
    ) -> Result<Target, NodeFailure> {
        let r: PutBeginResponse = self.call(
            addr,
            method::PUT_BEGIN,
            &PutBegin {
                id: id.to_owned(),
                size,
                crc32c: None,
                chunk_size: cs,
                version,
            },
        )?;
        // For the report's mapped share; nothing was sent yet.
        let before = self
            .call::<_, NodeStats>(addr, method::STATS, &Empty {})
            .ok();
        Ok(Target {
            addr,
            client: self.conn(addr)?,
            upload: r.upload,
            credits: r.credits.max(1) as usize,
            queue: VecDeque::new(),
            failed: None,
            before,
        })
    }

    fn fail(
        &self,
        t: &mut Target,
        f: NodeFailure,
        id: &str,
        at: u64,
        size: u64,
        bar: &ProgressBar,
    ) {
        self.say(
            Some(bar),
            &format!(
                "node {} failed during PUT of '{id}' at {} of {}: {f}",
                t.addr,
                human_bytes(at),
                human_bytes(size)
            ),
        );
        t.queue.clear(); // dropping the calls cancels them
        t.failed = Some(f);
    }

    /// Writes the file to every node in `addrs` at once, reading each
    /// chunk once and sending the same pages to every node, with at most
    /// W chunk calls in flight per node.
    #[allow(clippy::too_many_arguments)]
    fn upload_pass(
        &self,
        addrs: &[SocketAddr],
        file: &File,
        id: &str,
        size: u64,
        cs: u64,
        version: u64,
        report: &mut PutReport,
    ) -> Result<Vec<PassResult>, StorageError> {
        let mut out = Vec::new();
        let mut targets = Vec::new();
        for &addr in addrs {
            match self.begin(addr, id, size, cs, version) {
                Ok(t) => targets.push(t),
                Err(f) => {
                    self.say(None, &format!("node {addr} cannot take '{id}': {f}"));
                    out.push((addr, Err(f)));
                }
            }
        }
        if targets.is_empty() {
            return Ok(out);
        }
        let names: Vec<String> = targets.iter().map(|t| t.addr.to_string()).collect();
        let bar = progress_bar(
            size,
            self.opts.progress,
            &format!("put {id} -> {}", names.join(",")),
        );
        let opts = self.call_opts();
        let mut whole = 0u32;
        let mut off = 0u64;
        while off < size && targets.iter().any(|t| t.failed.is_none()) {
            let len = chunk_len(size, cs, off);
            let read = PageBuf::for_overwrite(len as usize).and_then(|mut b| {
                file.read_exact_at(&mut b, off)?;
                Ok(b)
            });
            let pages = match read {
                Ok(b) => b.freeze(),
                Err(e) => {
                    self.abort_all(&mut targets);
                    return Err(StorageError::local(format!(
                        "reading the file at {off}: {e}"
                    )));
                }
            };
            let crc = crc32c::crc32c(&pages);
            whole = crc32c::crc32c_combine(whole, crc, pages.len());
            for t in targets.iter_mut().filter(|t| t.failed.is_none()) {
                while t.queue.len() >= t.credits {
                    let call = t.queue.pop_front().expect("queue is not empty");
                    if let Err(e) = call.wait_typed::<PutChunkResponse>() {
                        self.fail(t, e.into(), id, off, size, &bar);
                        break;
                    }
                }
                if t.failed.is_some() {
                    continue;
                }
                let body = PutChunk {
                    upload: t.upload,
                    offset: off,
                    crc32c: Some(crc),
                }
                .encode_to_vec();
                match t
                    .client
                    .start_call(method::PUT_CHUNK, body, pages.clone(), &opts)
                {
                    Ok(call) => t.queue.push_back(call),
                    Err(e) => self.fail(t, e.into(), id, off, size, &bar),
                }
            }
            off += len;
            bar.set_position(off);
            if let Some(h) = &self.hook {
                h("put", off);
            }
        }
        report.crc32c = whole;
        for t in targets.iter_mut().filter(|t| t.failed.is_none()) {
            while let Some(call) = t.queue.pop_front() {
                if let Err(e) = call.wait_typed::<PutChunkResponse>() {
                    self.fail(t, e.into(), id, size, size, &bar);
                    break;
                }
            }
            if t.failed.is_some() {
                continue;
            }
            let commit = PutCommit {
                upload: t.upload,
                crc32c: Some(whole),
            };
            if let Err(f) = self.call::<_, BlobInfo>(t.addr, method::PUT_COMMIT, &commit) {
                self.fail(t, f, id, size, size, &bar);
            }
        }
        bar.finish_and_clear();
        for t in targets {
            match t.failed {
                None => {
                    if let (Some(b), Ok(a)) = (
                        t.before,
                        self.call::<_, NodeStats>(t.addr, method::STATS, &Empty {}),
                    ) {
                        report.node_bytes_mapped += a.bytes_mapped.saturating_sub(b.bytes_mapped);
                        report.node_bytes_copied += a.bytes_copied.saturating_sub(b.bytes_copied);
                    }
                    out.push((t.addr, Ok(())));
                }
                Some(f) => {
                    // Best effort: a node that is still up removes the
                    // temporary file now rather than at its idle timeout.
                    if f.code != Code::Unavailable {
                        let _ = self.call::<_, Empty>(
                            t.addr,
                            method::PUT_ABORT,
                            &UploadRef { upload: t.upload },
                        );
                    } else {
                        self.forget(t.addr);
                    }
                    out.push((t.addr, Err(f)));
                }
            }
        }
        Ok(out)
    }

    fn abort_all(&self, targets: &mut [Target]) {
        for t in targets.iter_mut() {
            t.queue.clear();
            let _ =
                self.call::<_, Empty>(t.addr, method::PUT_ABORT, &UploadRef { upload: t.upload });
        }
    }

    /// Reads blob `id` into the file `out`, from the node holding its
    /// newest version that ranks highest; if that node fails (down, dies
    /// mid-transfer, or its copy fails its checksum), continues from the
    /// same offset on the next replica, and says so through the warning
    /// callback. The data goes to `out.partial` first and is renamed to
    /// `out` only once the whole blob's CRC32C matched.
    ///
    /// # Errors
    /// [`Code::NotFound`] when no node has the blob, [`Code::DataLoss`] when
    /// every copy failed its checksum, [`Code::Unavailable`] when the nodes
    /// holding it failed otherwise, [`Code::Internal`] for local file errors.
    pub fn get_to_file(&self, id: &str, out: &Path) -> Result<GetReport, StorageError> {
        check_id(id).map_err(|m| StorageError::new(Code::InvalidArgument, m))?;
        let t0 = Instant::now();
        let mut failures: Vec<(SocketAddr, String)> = Vec::new();
        let mut holders: Vec<(SocketAddr, BlobInfo)> = Vec::new();
        for addr in self.ranked(id) {
            match self.call::<_, BlobInfo>(addr, method::GET_BEGIN, &BlobRef { id: id.into() }) {
                Ok(info) => holders.push((addr, info)),
                Err(f) if f.code == Code::NotFound => {}
                Err(f) => {
                    self.say(
                        None,
                        &format!("node {addr} cannot serve '{id}': {f}; trying the other replicas"),
                    );
                    failures.push((addr, f.to_string()));
                }
            }
        }
        let Some(newest) = holders.iter().map(|(_, i)| i.version).max() else {
            let (code, msg) = if failures.is_empty() {
                (
                    Code::NotFound,
                    format!(
                        "no blob '{id}' on any of the {} nodes",
                        self.opts.nodes.len()
                    ),
                )
            } else {
                let why: Vec<String> = failures.iter().map(|(a, e)| format!("{a}: {e}")).collect();
                let code = if failures.iter().all(|(_, e)| e.starts_with("DataLoss")) {
                    Code::DataLoss
                } else {
                    Code::Unavailable
                };
                (
                    code,
                    format!(
                        "blob '{id}' was found on no node that answered; failed: {}",
                        why.join("; ")
                    ),
                )
            };
            return Err(StorageError::new(code, msg));
        };
        let mut cands = Vec::new();
        for (addr, info) in holders {
            if info.version == newest {
                cands.push((addr, info));
            } else {
                self.say(
                    None,
                    &format!("node {addr} holds an older version of '{id}'; not reading it"),
                );
            }
        }
        let info = cands[0].1.clone();
        let partial = partial_path(out);
        let mut oo = OpenOptions::new();
        oo.write(true).create(true).truncate(true);
        // Whole pages go to the disk with O_DIRECT straight from the
        // received pages; no page cache is filled with the blob.
        let file = open_split(&partial, &oo, self.opts.direct_output).map_err(|e| {
            StorageError::local(format!("cannot create {}: {e}", partial.display()))
        })?;
        let bar = progress_bar(info.size, self.opts.progress, &format!("get {id}"));
        let mut off = 0u64;
        let mut whole = 0u32;
        let mut served_by = Vec::new();
        let (mut mapped, mut copied) = (0, 0);
        let mut ci = 0;
        while off < info.size {
            let Some((addr, cinfo)) = cands.get(ci) else {
                drop(file);
                let _ = fs::remove_file(&partial);
                let why: Vec<String> = failures.iter().map(|(a, e)| format!("{a}: {e}")).collect();
                let code = if failures.iter().any(|(_, e)| e.starts_with("DataLoss")) {
                    Code::DataLoss
                } else {
                    Code::Unavailable
                };
                bar.finish_and_clear();
                return Err(StorageError::new(
                    code,
                    format!(
                        "GET of '{id}' failed at {} of {}: every replica failed: {}",
                        human_bytes(off),
                        human_bytes(info.size),
                        why.join("; ")
                    ),
                ));
            };
            let start = off;
            let r = match self.conn(*addr) {
                Ok(c) => {
                    let before = c.counters();
                    let r = self.read_from(&c, id, cinfo, &file, &mut off, &mut whole, &bar);
                    let d = c.counters().since(&before);
                    mapped += d.bytes_mapped;
                    copied += d.bytes_copied();
                    r
                }
                Err(f) => Err(ReadFail::Node(f)),
            };
            if off > start {
                served_by.push((*addr, off - start));
            }
            match r {
                Ok(()) => {}
                Err(ReadFail::Local(e)) => {
                    drop(file);
                    let _ = fs::remove_file(&partial);
                    bar.finish_and_clear();
                    return Err(e);
                }
                Err(ReadFail::Node(f)) => {
                    if f.code == Code::Unavailable {
                        self.forget(*addr);
                    }
                    let next = cands
                        .get(ci + 1)
                        .map_or("no replica is left".to_owned(), |(a, _)| {
                            format!("continuing from the replica on {a}")
                        });
                    self.say(
                        Some(&bar),
                        &format!(
                            "node {addr} failed during GET of '{id}' at {} of {}: {f}; {next}",
                            human_bytes(off),
                            human_bytes(info.size)
                        ),
                    );
                    failures.push((*addr, f.to_string()));
                    ci += 1;
                }
            }
        }
        bar.finish_and_clear();
        if whole != info.crc32c {
            drop(file);
            let _ = fs::remove_file(&partial);
            return Err(StorageError::new(
                Code::DataLoss,
                format!(
                    "blob '{id}' failed its checksum after download: CRC32C {whole:#010x}, \
                     expected {:#010x}; {} was removed",
                    info.crc32c,
                    partial.display()
                ),
            ));
        }
        drop(file);
        fs::rename(&partial, out).map_err(|e| {
            StorageError::local(format!(
                "cannot rename {} to {}: {e}",
                partial.display(),
                out.display()
            ))
        })?;
        Ok(GetReport {
            id: id.to_owned(),
            size: info.size,
            crc32c: info.crc32c,
            served_by,
            failures,
            elapsed: t0.elapsed(),
            bytes_mapped: mapped,
            bytes_copied: copied,
        })
    }

    /// Reads chunks from `*off` to the end from one node, W calls in
    /// flight, checking and writing each in order.
    #[allow(clippy::too_many_arguments)]
    fn read_from(
        &self,
        client: &Client,
        id: &str,
        info: &BlobInfo,
        file: &(File, File, bool),
        off: &mut u64,
        whole: &mut u32,
        bar: &ProgressBar,
    ) -> Result<(), ReadFail> {
        let credits = info.credits.max(1) as usize;
        let cs = info.chunk_size.max(1);
        let opts = self.call_opts();
        let mut queue: VecDeque<(u64, u64, PendingCall)> = VecDeque::new();
        let mut next = *off;
        loop {
            while queue.len() < credits && next < info.size {
                let len = chunk_len(info.size, cs, next);
                let body = GetChunk {
                    id: id.to_owned(),
                    offset: next,
                    len,
                    version: info.version,
                }
                .encode_to_vec();
                let call = client
                    .start_call(method::GET_CHUNK, body, Payload::Empty, &opts)
                    .map_err(|e| ReadFail::Node(e.into()))?;
                queue.push_back((next, len, call));
                next += len;
            }
            let Some((o, len, call)) = queue.pop_front() else {
                return Ok(());
            };
            let r = call
                .wait_typed::<GetChunkResponse>()
                .map_err(|e| ReadFail::Node(e.into()))?;
            if r.payload.len() as u64 != len {
                return Err(ReadFail::Node(NodeFailure {
                    code: Code::Internal,
                    message: format!(
                        "chunk at offset {o} came with {} bytes, not {len}",
                        r.payload.len()
                    ),
                }));
            }
            let crc = crc32c::crc32c(&r.payload);
            if crc != r.message.crc32c {
                return Err(ReadFail::Node(NodeFailure {
                    code: Code::DataLoss,
                    message: format!(
                        "chunk at offset {o} failed its checksum in transit: CRC32C \
                         {crc:#010x}, the node stored {:#010x}",
                        r.message.crc32c
                    ),
                }));
            }
            write_split(&file.0, &file.1, &r.payload, o).map_err(|e| {
                ReadFail::Local(StorageError::local(format!(
                    "writing the output at {o}: {e}"
                )))
            })?;
            *whole = crc32c::crc32c_combine(*whole, crc, r.payload.len());
            *off = o + len;
            bar.set_position(*off);
            if let Some(h) = &self.hook {
                h("get", *off);
            }
        }
    }

    /// Lists every blob of one node, page by page, handing each to `f`.
    /// A node that fails midway has had its first pages handed over.
    fn list_node(&self, addr: SocketAddr, f: &mut dyn FnMut(BlobInfo)) -> Result<(), NodeFailure> {
        let mut req = ListRequest {
            start_after: String::new(),
            // The largest pages: each costs the node a directory scan.
            limit: MAX_LIST_LIMIT,
        };
        loop {
            let page: BlobList = self.call(addr, method::LIST, &req)?;
            let Some(last) = page.blobs.last().map(|b| b.id.clone()) else {
                if page.more {
                    return Err(NodeFailure {
                        code: Code::Internal,
                        message: format!(
                            "the listing page after '{}' was empty but said more would follow",
                            req.start_after
                        ),
                    });
                }
                return Ok(());
            };
            if last <= req.start_after {
                return Err(NodeFailure {
                    code: Code::Internal,
                    message: format!(
                        "the listing page after '{}' ended at '{last}', which does not advance",
                        req.start_after
                    ),
                });
            }
            page.blobs.into_iter().for_each(&mut *f);
            if !page.more {
                return Ok(());
            }
            req.start_after = last;
        }
    }

    /// Lists the blobs of every node (each node page by page), merged by id.
    ///
    /// # Errors
    /// When no node answers.
    pub fn list(&self) -> Result<Vec<ListedBlob>, StorageError> {
        let mut merged: BTreeMap<String, Vec<(SocketAddr, BlobInfo)>> = BTreeMap::new();
        let mut answered = 0;
        let mut last = None;
        for &addr in &self.opts.nodes {
            match self.list_node(addr, &mut |b| {
                merged.entry(b.id.clone()).or_default().push((addr, b));
            }) {
                Ok(()) => answered += 1,
                Err(f) => {
                    self.say(
                        None,
                        &format!("node {addr} did not answer the listing: {f}"),
                    );
                    last = Some(f);
                }
            }
        }
        if answered == 0 {
            return Err(StorageError::new(
                Code::Unavailable,
                format!(
                    "no node answered the listing{}",
                    last.map_or(String::new(), |f| format!(" (last: {f})"))
                ),
            ));
        }
        Ok(merged
            .into_values()
            .map(|copies| {
                let newest = copies
                    .iter()
                    .filter(|(_, b)| b.problem.is_empty())
                    .map(|(_, b)| b.version)
                    .max();
                let mut lb = ListedBlob {
                    info: copies[0].1.clone(),
                    nodes: Vec::new(),
                    stale: Vec::new(),
                    problems: Vec::new(),
                };
                for (addr, b) in copies {
                    if !b.problem.is_empty() {
                        lb.problems.push((addr, b.problem));
                    } else if Some(b.version) == newest {
                        lb.info = b;
                        lb.nodes.push(addr);
                    } else {
                        lb.stale.push(addr);
                    }
                }
                lb
            })
            .collect())
    }

    /// Deletes blob `id` from every node; returns the nodes that had it.
    ///
    /// # Errors
    /// [`Code::NotFound`] when no node had it, [`Code::Unavailable`] when
    /// no node answered.
    pub fn delete(&self, id: &str) -> Result<Vec<SocketAddr>, StorageError> {
        check_id(id).map_err(|m| StorageError::new(Code::InvalidArgument, m))?;
        let mut had = Vec::new();
        let mut down = Vec::new();
        for &addr in &self.opts.nodes {
            match self.call::<_, DeleteResponse>(addr, method::DELETE, &BlobRef { id: id.into() }) {
                Ok(r) if r.existed => had.push(addr),
                Ok(_) => {}
                Err(f) => {
                    self.say(
                        None,
                        &format!("node {addr} did not answer the delete of '{id}' and may still hold it: {f}"),
                    );
                    down.push(addr);
                }
            }
        }
        if had.is_empty() {
            return Err(if down.len() == self.opts.nodes.len() {
                StorageError::new(Code::Unavailable, "no node answered the delete")
            } else {
                StorageError::new(
                    Code::NotFound,
                    format!("no blob '{id}' on the nodes that answered"),
                )
            });
        }
        Ok(had)
    }
}

fn partial_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}
