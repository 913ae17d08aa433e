//! The storage client. It talks to each node through the generated typed
//! client ([`messages::StorageClient`](super::messages::StorageClient)). A
//! PUT is one client-streaming call per replica (the file is read once and
//! the same pages go to every replica), a GET is one server-streaming call,
//! resumed from the same offset on another replica if its node fails, and a
//! listing is one server stream per node, merged by id as the pages arrive.
//! CRC32C is checked end to end; placement is rendezvous hashing with
//! fallback over several nodes. Flow control is pagerpc's per-stream
//! credit: the client keeps no window of its own.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use pagerpc::typed::{NoPayload, PendingResponse, Receiver, Sender, WithPayload};
use pagerpc::{CallError, CallOptions, ClientConfig, Code, PageBuf, Payload, Response};

// The generated typed client of one node.
use super::messages::StorageClient as NodeClient;
use super::{
    check_id, chunk_len, get_message, rank_nodes, BlobInfo, BlobList, BlobRef, Empty, GetMessage,
    GetRequest, ListRequest, NodeStats, PutHeader, PutMessage, DEFAULT_CHUNK_SIZE,
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
    /// Chunk size for PUTs: a page multiple, 64 KiB to 64 MiB. Each chunk
    /// is one stream message.
    pub chunk_size: u64,
    /// Zero-copy receive and `MSG_ZEROCOPY` send.
    pub zerocopy: bool,
    /// Progress bars on stderr (drawn only when it is a terminal).
    pub progress: bool,
    /// Longest wait for any one unary call (stat, delete, stats).
    pub call_timeout: Duration,
    /// Longest a whole PUT, GET or listing stream may take on one node.
    /// `None` (the default): no limit, since a blob may be of any size; a
    /// node that dies or whose connection breaks fails the stream at once
    /// either way.
    pub stream_timeout: Option<Duration>,
    /// Longest wait to connect to a node.
    pub connect_timeout: Duration,
    /// Bytes of stream messages a node may send on one GET or listing
    /// stream before this client releases some (pagerpc's
    /// `ClientConfig::stream_window`). Default 16 MiB: a GET holds at most
    /// that much (or one chunk, if larger) of received chunks.
    pub stream_window: u64,
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
            stream_timeout: None,
            connect_timeout: Duration::from_secs(3),
            stream_window: 16 << 20,
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
/// it keeps one connection per node, used through the generated
/// [`messages::StorageClient`](super::messages::StorageClient).
pub struct StorageClient {
    opts: ClientOptions,
    conns: Mutex<HashMap<SocketAddr, NodeClient>>,
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

/// One replica being written: its put stream.
struct Target {
    addr: SocketAddr,
    tx: Option<Sender<PutMessage, WithPayload>>,
    resp: Option<PendingResponse<BlobInfo, NoPayload>>,
    failed: Option<NodeFailure>,
    before: NodeStats,
}

/// One node's listing stream in a merged listing.
struct NodeListing {
    addr: SocketAddr,
    rx: Receiver<BlobList, NoPayload>,
    /// Entries received and not merged yet, in id order.
    page: VecDeque<BlobInfo>,
    /// The last id received (the node's ids must increase).
    last: Option<String>,
    received: u64,
}

enum ReadFail {
    Node(NodeFailure),
    Local(StorageError),
}

fn node_err(code: Code, message: String) -> ReadFail {
    ReadFail::Node(NodeFailure { code, message })
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

    fn conn(&self, addr: SocketAddr) -> Result<NodeClient, NodeFailure> {
        self.conn_cached(addr).map(|(c, _)| c)
    }

    /// The connection to `addr`, and whether it was already open.
    fn conn_cached(&self, addr: SocketAddr) -> Result<(NodeClient, bool), NodeFailure> {
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
        cfg.stream_window = self.opts.stream_window;
        let c = NodeClient::connect_with(addr, cfg).map_err(|e| NodeFailure {
            code: Code::Unavailable,
            message: format!("cannot connect: {e}"),
        })?;
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, c.clone());
        Ok((c, false))
    }

    /// A connection to `addr` known to be up: a kept one that still answers
    /// a ping (the node may have closed it as idle meanwhile), or a new one.
    fn live_conn(&self, addr: SocketAddr) -> Result<NodeClient, NodeFailure> {
        let (c, cached) = self.conn_cached(addr)?;
        if !cached || c.inner().ping(self.opts.call_timeout).is_ok() {
            return Ok(c);
        }
        self.forget(addr);
        self.conn(addr)
    }

    /// Drops the cached connection to `addr` (the next call reconnects).
    fn forget(&self, addr: SocketAddr) {
        let c = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        if let Some(c) = c {
            c.inner().close();
        }
    }

    fn call_opts(&self) -> CallOptions {
        CallOptions {
            timeout: Some(self.opts.call_timeout),
            ..CallOptions::default()
        }
    }

    fn stream_opts(&self) -> CallOptions {
        CallOptions {
            timeout: self.opts.stream_timeout,
            ..CallOptions::default()
        }
    }

    /// A unary call, `rpc` on the node's typed client with the call
    /// options; a kept connection the node closed meanwhile (its idle
    /// timeout) is replaced once. Every unary method can be repeated.
    fn call<Resp>(
        &self,
        addr: SocketAddr,
        rpc: impl Fn(&NodeClient, &CallOptions) -> Result<Response<Resp>, CallError>,
    ) -> Result<Resp, NodeFailure> {
        loop {
            let (c, cached) = self.conn_cached(addr)?;
            match rpc(&c, &self.call_opts()) {
                Ok(r) => return Ok(r.message),
                Err(e) => {
                    if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded) {
                        self.forget(addr);
                        if cached && e.code() == Code::Unavailable {
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
        self.call(addr, |c, o| c.node_stats_with(&Empty {}, o))
            .map_err(|f| StorageError::new(f.code, format!("node {addr}: {f}")))
    }

    /// Stores the file at `path` as blob `id` on the top-ranked
    /// `replicas` nodes. A node that fails (down, refuses, or dies
    /// mid-transfer) is reported through the warning callback and its
    /// replica is written to the next-ranked node instead, while there is
    /// one.
    ///
    /// # Errors
    /// When no node stored the blob, or the file cannot be read.
    pub fn put_file(&self, path: &Path, id: &str) -> Result<PutReport, StorageError> {
        check_id(id).map_err(|m| StorageError::new(Code::InvalidArgument, m))?;
        let file = File::open(path)
            .map_err(|e| StorageError::local(format!("cannot open {}: {e}", path.display())))?;
        let size = file
            .metadata()
            .map_err(|e| StorageError::local(format!("cannot stat {}: {e}", path.display())))?
            .len();
        let header = PutHeader {
            id: id.to_owned(),
            size,
            crc32c: None,
            chunk_size: self.opts.chunk_size,
            version: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        };
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
            let results = self.upload_pass(&pending, &file, &header, &mut report)?;
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

    /// Opens a put stream to `addr` and sends the header.
    fn open_put(&self, addr: SocketAddr, header: &PutHeader) -> Result<Target, NodeFailure> {
        // For the report's mapped share; it also makes sure the kept
        // connection is still up before a stream is opened on it.
        let before = self.call(addr, |c, o| c.node_stats_with(&Empty {}, o))?;
        let c = self.conn(addr)?;
        let (mut tx, resp) = c.put_with(&self.stream_opts())?;
        tx.send(&PutMessage::header(header.clone()), Payload::Empty)?;
        Ok(Target {
            addr,
            tx: Some(tx),
            resp: Some(resp),
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
        // Dropping the unfinished stream cancels it: the node discards the
        // upload and its temporary file.
        t.tx = None;
        t.resp = None;
        if f.code == Code::Unavailable {
            self.forget(t.addr);
        }
        t.failed = Some(f);
    }

    /// Writes the file to every node in `addrs` at once, one put stream
    /// each, reading each chunk once and sending the same pages to every
    /// node. A stream's `send` waits for the node's credit, so the slowest
    /// replica sets the pace and no node is sent more than its window.
    fn upload_pass(
        &self,
        addrs: &[SocketAddr],
        file: &File,
        header: &PutHeader,
        report: &mut PutReport,
    ) -> Result<Vec<PassResult>, StorageError> {
        let (id, size, cs) = (header.id.as_str(), header.size, header.chunk_size);
        let mut out = Vec::new();
        let mut targets = Vec::new();
        for &addr in addrs {
            match self.open_put(addr, header) {
                Ok(t) => targets.push(t),
                Err(f) => {
                    self.say(None, &format!("node {addr} cannot take '{id}': {f}"));
                    if f.code == Code::Unavailable {
                        self.forget(addr);
                    }
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
                    bar.finish_and_clear();
                    // Dropping the targets cancels their streams.
                    return Err(StorageError::local(format!(
                        "reading the file at {off}: {e}"
                    )));
                }
            };
            let crc = crc32c::crc32c(&pages);
            whole = crc32c::crc32c_combine(whole, crc, pages.len());
            let msg = PutMessage::chunk(Some(crc));
            for t in targets.iter_mut().filter(|t| t.failed.is_none()) {
                let tx = t.tx.as_mut().expect("a live target has its stream");
                if let Err(e) = tx.send(&msg, Payload::Pages(pages.clone())) {
                    self.fail(t, e.into(), id, off, size, &bar);
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
            let (Some(mut tx), Some(resp)) = (t.tx.take(), t.resp.take()) else {
                continue;
            };
            // The end message, then the half-close that commits; the
            // response says how the commit went (or why the node ended the
            // stream earlier).
            if tx
                .send(&PutMessage::end(Some(whole)), Payload::Empty)
                .is_ok()
            {
                let _ = tx.finish();
            }
            match resp.wait() {
                Ok(r) if r.message.size == size && r.message.crc32c == whole => {}
                Ok(r) => {
                    let f = NodeFailure {
                        code: Code::Internal,
                        message: format!(
                            "the node acknowledged {} bytes with CRC32C {:#010x}; {size} bytes \
                             with {whole:#010x} were sent",
                            r.message.size, r.message.crc32c
                        ),
                    };
                    self.fail(t, f, id, size, size, &bar);
                }
                Err(e) => self.fail(t, e.into(), id, size, size, &bar),
            }
        }
        bar.finish_and_clear();
        for t in targets {
            match t.failed {
                None => {
                    if let Ok(a) = self.call(t.addr, |c, o| c.node_stats_with(&Empty {}, o)) {
                        let b = &t.before;
                        report.node_bytes_mapped += a.bytes_mapped.saturating_sub(b.bytes_mapped);
                        report.node_bytes_copied += a.bytes_copied.saturating_sub(b.bytes_copied);
                    }
                    out.push((t.addr, Ok(())));
                }
                Some(f) => out.push((t.addr, Err(f))),
            }
        }
        Ok(out)
    }

    /// Reads blob `id` into the file `out`, from the node holding its
    /// newest version that ranks highest (every node is asked with
    /// `Stat`), as one `Get` stream; if that node fails (down,
    /// dies mid-transfer, its copy fails its checksum, or its stream ends
    /// early), continues from the same offset on the next replica, and says
    /// so through the warning callback. The data goes to `out.partial` first and is renamed to
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
            match self.call(addr, |c, o| c.stat_with(&BlobRef { id: id.into() }, o)) {
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
                    let before = c.inner().counters();
                    let r = self.read_from(&c, id, cinfo, &file, &mut off, &mut whole, &bar);
                    let d = c.inner().counters().since(&before);
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

    /// Reads blob `info` from `*off` to the end from one node, as one
    /// `Get` stream, checking each chunk and writing it in place; each
    /// chunk's pages are dropped once written, which gives their credit
    /// back to the node. A stream that ends before the last byte is an
    /// error.
    #[allow(clippy::too_many_arguments)]
    fn read_from(
        &self,
        client: &NodeClient,
        id: &str,
        info: &BlobInfo,
        file: &(File, File, bool),
        off: &mut u64,
        whole: &mut u32,
        bar: &ProgressBar,
    ) -> Result<(), ReadFail> {
        let cs = info.chunk_size.max(1);
        let req = GetRequest {
            id: id.to_owned(),
            offset: *off,
            version: info.version,
        };
        let node = |e: CallError| ReadFail::Node(e.into());
        let mut rx = client.get_with(&req, &self.stream_opts()).map_err(node)?;
        // The stream starts with the blob's description: it must be the
        // version chosen.
        match rx.recv().map_err(node)? {
            Some((
                GetMessage {
                    kind: Some(get_message::Kind::Info(i)),
                },
                _,
            )) => {
                if (i.size, i.crc32c, i.chunk_size, i.version)
                    != (info.size, info.crc32c, info.chunk_size, info.version)
                {
                    return Err(node_err(
                        Code::Internal,
                        format!(
                            "the node's stream describes {} bytes with CRC32C {:#010x} in chunks \
                             of {}, version {}; its Stat said {} bytes, {:#010x}, {}, {}",
                            i.size,
                            i.crc32c,
                            i.chunk_size,
                            i.version,
                            info.size,
                            info.crc32c,
                            info.chunk_size,
                            info.version
                        ),
                    ));
                }
            }
            Some(_) => {
                return Err(node_err(
                    Code::Internal,
                    "the get stream did not start with the blob's info".into(),
                ))
            }
            None => {
                return Err(node_err(
                    Code::Internal,
                    "the node ended the get stream before sending anything".into(),
                ))
            }
        }
        while let Some((msg, pages)) = rx.recv().map_err(node)? {
            let Some(get_message::Kind::Chunk(c)) = msg.kind else {
                return Err(node_err(
                    Code::Internal,
                    format!("a message other than a chunk at offset {}", *off),
                ));
            };
            let o = *off;
            let len = chunk_len(info.size, cs, o);
            if c.offset != o || pages.len() as u64 != len || len == 0 {
                return Err(node_err(
                    Code::Internal,
                    format!(
                        "the node sent {} bytes at offset {} where the chunk at offset {o} of \
                         {len} bytes was due",
                        pages.len(),
                        c.offset
                    ),
                ));
            }
            let crc = crc32c::crc32c(&pages);
            if crc != c.crc32c {
                return Err(node_err(
                    Code::DataLoss,
                    format!(
                        "chunk at offset {o} failed its checksum in transit: CRC32C {crc:#010x}, \
                         the node stored {:#010x}",
                        c.crc32c
                    ),
                ));
            }
            write_split(&file.0, &file.1, &pages, o).map_err(|e| {
                ReadFail::Local(StorageError::local(format!(
                    "writing the output at {o}: {e}"
                )))
            })?;
            drop(pages);
            *whole = crc32c::crc32c_combine(*whole, crc, len as usize);
            *off = o + len;
            bar.set_position(*off);
            if let Some(h) = &self.hook {
                h("get", *off);
            }
        }
        if *off < info.size {
            return Err(node_err(
                Code::Internal,
                format!(
                    "the node ended the get stream at {} of {} bytes",
                    *off, info.size
                ),
            ));
        }
        Ok(())
    }

    /// Opens the listing stream of one node.
    fn open_list(&self, addr: SocketAddr) -> Result<Receiver<BlobList, NoPayload>, NodeFailure> {
        let c = self.live_conn(addr)?;
        let req = ListRequest {
            start_after: String::new(),
            limit: 0,
        };
        Ok(c.list_with(&req, &self.stream_opts())?)
    }

    /// Lists the blobs of every node, merged by id, handing each to `f` in
    /// id order as the nodes' streams deliver them: the client holds about
    /// one page per node, however many blobs there are. A node that fails
    /// midway is reported through the warning callback; the blobs it listed
    /// before have been handed over. Returns the number of blobs.
    ///
    /// # Errors
    /// [`Code::Unavailable`] when no node completed its listing.
    pub fn list_each(&self, mut f: impl FnMut(ListedBlob)) -> Result<u64, StorageError> {
        let mut streams = Vec::new();
        let mut last_failure = None;
        for &addr in &self.opts.nodes {
            match self.open_list(addr) {
                Ok(rx) => streams.push(NodeListing {
                    addr,
                    rx,
                    page: VecDeque::new(),
                    last: None,
                    received: 0,
                }),
                Err(fl) => {
                    self.say(
                        None,
                        &format!("node {addr} did not answer the listing: {fl}"),
                    );
                    if fl.code == Code::Unavailable {
                        self.forget(addr);
                    }
                    last_failure = Some(fl);
                }
            }
        }
        let mut completed = 0;
        let mut count = 0;
        loop {
            // Every node with nothing buffered fetches its next page; nodes
            // that finished or failed leave the merge.
            streams.retain_mut(|s| {
                while s.page.is_empty() {
                    let failure = match s.rx.recv() {
                        Ok(Some(page)) => {
                            let bad = page.blobs.iter().find(|b| {
                                let ok = s.last.as_ref().is_none_or(|l| b.id > *l);
                                s.last = Some(b.id.clone());
                                !ok
                            });
                            match bad {
                                Some(b) => NodeFailure {
                                    code: Code::Internal,
                                    message: format!("the listing is out of order at '{}'", b.id),
                                },
                                None => {
                                    s.received += page.blobs.len() as u64;
                                    s.page.extend(page.blobs);
                                    continue;
                                }
                            }
                        }
                        Ok(None) => {
                            completed += 1;
                            return false;
                        }
                        Err(e) => e.into(),
                    };
                    self.say(
                        None,
                        &format!(
                            "node {} failed during the listing after {} blobs: {failure}",
                            s.addr, s.received
                        ),
                    );
                    if failure.code == Code::Unavailable {
                        self.forget(s.addr);
                    }
                    last_failure = Some(failure);
                    return false;
                }
                true
            });
            let Some(first) = streams.iter().map(|s| &s.page[0].id).min().cloned() else {
                break;
            };
            let copies: Vec<(SocketAddr, BlobInfo)> = streams
                .iter_mut()
                .filter(|s| s.page[0].id == first)
                .filter_map(|s| s.page.pop_front().map(|b| (s.addr, b)))
                .collect();
            f(merge_copies(copies));
            count += 1;
        }
        if completed == 0 {
            return Err(StorageError::new(
                Code::Unavailable,
                format!(
                    "no node completed the listing{}",
                    last_failure.map_or(String::new(), |f| format!(" (last failure: {f})"))
                ),
            ));
        }
        Ok(count)
    }

    /// Lists the blobs of every node, merged by id, in id order (see
    /// [`list_each`](Self::list_each), which does not collect them).
    ///
    /// # Errors
    /// When no node completed its listing.
    pub fn list(&self) -> Result<Vec<ListedBlob>, StorageError> {
        let mut all = Vec::new();
        self.list_each(|b| all.push(b))?;
        Ok(all)
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
            match self.call(addr, |c, o| c.delete_with(&BlobRef { id: id.into() }, o)) {
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

/// One blob's copies on several nodes, as listed: the newest readable
/// version, the nodes holding it, older copies, and copies with problems.
fn merge_copies(copies: Vec<(SocketAddr, BlobInfo)>) -> ListedBlob {
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
}
