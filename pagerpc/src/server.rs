//! The RPC server.
//!
//! # Threads
//! One pool of `threads` threads does both I/O and handler work. Every pool
//! thread waits on one shared epoll instance. Connections are armed with
//! `EPOLLONESHOT`, so one thread at a time reads a connection. The thread
//! that reads a batch of requests re-arms the connection, keeps the first
//! request and runs its handler itself (no hand-off on the latency path),
//! and puts the others on a crossbeam channel, raising an eventfd that wakes
//! idle pool threads to take them. Responses go through a combining writer:
//! whichever thread holds a connection's send lock flushes every queued
//! response in as few `sendmsg` calls as the framing rules allow.
//!
//! A handler that blocks holds its pool thread; size the pool for the
//! number of handlers that may block at once, plus one.
//!
//! # Shutdown
//! [`Server::shutdown`] stops accepting, answers new requests with
//! [`Code::Unavailable`], waits for in-flight calls to finish, then closes
//! every connection.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as ChanRx, Sender as ChanTx};
use parking_lot::{Condvar, Mutex};
use prost::Message;

use pagerpc_core::{Code, CodecError, Counters, Header, Kind, Limits, MetadataEntry, Status};
use pagerpc_pages::{Pages, Payload};
use pagerpc_receiver::{Frame, ReceivePath, Receiver, RecvConfig, RecvError};
use pagerpc_sender::{OutFrame, SendConfig, Sender};

use crate::auth;
use crate::segments::SegmentAlign;
use crate::sys::{self, Poller, Signal, CONN_FLAGS, EVENT_FLAGS, LISTEN_FLAGS};

const TOKEN_LISTENER: u64 = 0;
const TOKEN_JOBS: u64 = 1;
const TOKEN_STOP: u64 = 2;
const FIRST_CONN_TOKEN: u64 = 16;
/// Requests read in one go before they are handed out, so a client that
/// keeps sending cannot keep a thread reading forever.
const DISPATCH_BATCH: usize = 64;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Limits for incoming frames.
    pub limits: Limits,
    /// Send settings (inline threshold, write timeout, clients' limits).
    pub send: SendConfig,
    /// Receive settings (backend, read buffer).
    pub recv: RecvConfig,
    /// Pool threads doing I/O and running handlers. Default: the number of
    /// CPUs, at least 2.
    pub threads: usize,
    /// Most connections open at once; further ones are refused with a
    /// [`Code::ResourceExhausted`] error frame. Default 1024.
    ///
    /// # Memory cost
    /// Each connection holds its read buffer (`recv.read_buf`, 64 KiB by
    /// default) plus the payloads it is receiving.
    pub max_connections: usize,
    /// TCP segment sizing, applied to the listener (page-aligned segments
    /// when bound to loopback, by default).
    pub segments: SegmentAlign,
    /// Most calls in flight on one connection; a request beyond it is
    /// answered with [`Code::ResourceExhausted`] naming this limit, without
    /// running a handler. Default 1024.
    ///
    /// # Memory cost
    /// Each call in flight holds its request payload until its handler
    /// returns: up to this many payloads per connection.
    pub max_inflight_per_conn: usize,
    /// Time a peer has to finish a frame's prefix and header once it has
    /// started one; a slower peer (one that dribbles a header) is sent an
    /// error and disconnected. Default 10 s. `None` disables it.
    pub header_timeout: Option<Duration>,
    /// A connection with no call in flight and no frame received for this
    /// long is closed. Default 5 minutes. `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Most payload bytes (rounded up to pages) the consumers of one
    /// connection's requests may hold at once. Past it, the server stops
    /// reading that connection (backpressure: the peer's sends block once
    /// the socket buffers fill) until handlers or whoever kept the `Pages`
    /// drop enough of them. Other connections are not affected. A consumer
    /// that keeps payloads for good (a store) calls
    /// [`Pages::detach_accounting`] on them and bounds that memory itself.
    /// Default 256 MiB. `None` disables it.
    ///
    /// # Memory cost
    /// Up to this much per connection, plus one payload (the one whose
    /// arrival crossed the cap), plus what sits in socket buffers.
    pub max_held_bytes_per_conn: Option<usize>,
    /// A pre-shared key: every connection must prove it holds the same key
    /// (HMAC-SHA256 challenge-response, see `docs/wire-format.md`) before
    /// any request is dispatched; a peer that fails is told so
    /// ([`Code::Unauthenticated`]) and disconnected. Default none.
    pub auth_key: Option<Arc<[u8]>>,
}

impl ServerConfig {
    /// Settings for zero-copy both ways: `TCP_ZEROCOPY_RECEIVE` receives
    /// and `MSG_ZEROCOPY` sends.
    pub fn zerocopy() -> ServerConfig {
        let mut c = ServerConfig::default();
        c.send.zerocopy = true;
        c.recv.backend = pagerpc_receiver::Backend::ZeroCopy;
        c
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            send: SendConfig::default(),
            recv: RecvConfig::default(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            max_connections: 1024,
            segments: SegmentAlign::Auto,
            max_inflight_per_conn: 1024,
            header_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(300)),
            max_held_bytes_per_conn: Some(256 << 20),
            auth_key: None,
        }
    }
}

/// What a handler returns on success.
#[derive(Debug, Default)]
pub struct Reply {
    /// The encoded response message.
    pub body: Vec<u8>,
    /// The response payload.
    pub payload: Payload,
    /// Metadata to send back.
    pub metadata: Vec<MetadataEntry>,
}

/// What a handler learns about its call.
#[derive(Debug)]
pub struct Context {
    call_id: u64,
    method: String,
    deadline: Option<Instant>,
    metadata: Vec<MetadataEntry>,
    cancelled: Arc<AtomicBool>,
    peer: SocketAddr,
    path: ReceivePath,
}

impl Context {
    /// How this connection's payloads were placed when it was set up
    /// (copy, `TCP_ZEROCOPY_RECEIVE`, or the patched kernel's `mmap()`).
    pub fn receive_path(&self) -> ReceivePath {
        self.path
    }

    /// The call id.
    pub fn call_id(&self) -> u64 {
        self.call_id
    }
    /// The method called.
    pub fn method(&self) -> &str {
        &self.method
    }
    /// When the caller stops waiting, if it set a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    /// The request's metadata.
    pub fn metadata(&self) -> &[MetadataEntry] {
        &self.metadata
    }
    /// Whether the caller cancelled the call (or its connection closed).
    /// Long handlers should check this and stop early.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
    /// The caller's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

type RawHandler = dyn Fn(&Context, &[u8], Pages) -> Result<Reply, Status> + Send + Sync;

/// Collects handlers and settings, then binds a [`Server`].
pub struct ServerBuilder {
    cfg: ServerConfig,
    handlers: HashMap<String, Arc<RawHandler>>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder::new()
    }
}

impl ServerBuilder {
    /// A builder with default settings and no handlers.
    pub fn new() -> ServerBuilder {
        ServerBuilder {
            cfg: ServerConfig::default(),
            handlers: HashMap::new(),
        }
    }

    /// Replaces the settings.
    pub fn config(mut self, cfg: ServerConfig) -> ServerBuilder {
        self.cfg = cfg;
        self
    }

    /// Registers a typed handler for `method`. It gets the decoded request
    /// and the request payload, and returns a response message and payload,
    /// or a status. A request that does not decode as `Req` is answered with
    /// [`Code::InvalidArgument`] without calling the handler.
    pub fn register<Req, Resp, F>(self, method: &str, f: F) -> ServerBuilder
    where
        Req: Message + Default,
        Resp: Message,
        F: Fn(&Context, Req, Pages) -> Result<(Resp, Payload), Status> + Send + Sync + 'static,
    {
        self.register_raw(method, move |ctx, body, pages| {
            let req = Req::decode(body).map_err(|e| {
                Status::invalid_argument(format!("undecodable request message: {e}"))
            })?;
            let (resp, payload) = f(ctx, req, pages)?;
            Ok(Reply {
                body: resp.encode_to_vec(),
                payload,
                metadata: Vec::new(),
            })
        })
    }

    /// Registers a handler that sees the request body as raw bytes and
    /// controls the reply's metadata.
    pub fn register_raw<F>(mut self, method: &str, f: F) -> ServerBuilder
    where
        F: Fn(&Context, &[u8], Pages) -> Result<Reply, Status> + Send + Sync + 'static,
    {
        self.handlers.insert(method.to_owned(), Arc::new(f));
        self
    }

    /// Binds `addr`, starts the pool, and serves.
    ///
    /// # Errors
    /// When the address cannot be bound or the pool cannot start.
    pub fn bind(self, addr: impl ToSocketAddrs) -> io::Result<Server> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match sys::listen_with_mss(&a, self.cfg.segments.mss_for(&a)) {
                Ok(l) => return self.serve(l),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("address resolved to nothing")))
    }

    /// Serves on an already bound listener.
    ///
    /// # Errors
    /// When the pool cannot start.
    pub fn serve(self, listener: TcpListener) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            poller: Poller::new()?,
            listener: Mutex::new(Some(listener)),
            jobs_signal: Signal::new()?,
            stop_signal: Signal::new()?,
            jobs_tx,
            jobs_rx,
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(FIRST_CONN_TOKEN),
            handlers: self.handlers,
            cfg: self.cfg,
            shutting_down: AtomicBool::new(false),
            inflight: Mutex::new(0),
            drained: Condvar::new(),
            counters: Arc::new(Counters::new()),
            epoch: Instant::now(),
        });
        if let Some(l) = shared.listener.lock().as_ref() {
            shared.poller.add(l.as_fd(), TOKEN_LISTENER, LISTEN_FLAGS)?;
        }
        shared
            .poller
            .add(shared.jobs_signal.as_fd(), TOKEN_JOBS, EVENT_FLAGS)?;
        shared
            .poller
            .add(shared.stop_signal.as_fd(), TOKEN_STOP, EVENT_FLAGS)?;
        let mut threads = Vec::new();
        for i in 0..shared.cfg.threads.max(1) {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("pagerpc-{i}"))
                    .spawn(move || s.run())?,
            );
        }
        let (sweep_stop, sweep_rx) = crossbeam_channel::bounded(1);
        let s = shared.clone();
        let sweeper = std::thread::Builder::new()
            .name("pagerpc-sweep".into())
            .spawn(move || s.sweep(sweep_rx))?;
        Ok(Server {
            shared,
            threads,
            local_addr,
            sweeper: Some((sweeper, sweep_stop)),
        })
    }
}

/// A running server. Dropping it shuts it down gracefully.
pub struct Server {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
    sweeper: Option<(JoinHandle<()>, ChanTx<()>)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl Server {
    /// A builder.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// Transfer counters summed over every connection this server has had.
    pub fn counters(&self) -> pagerpc_core::CountersSnapshot {
        self.shared.counters.snapshot()
    }

    /// Payload bytes (rounded up to pages) that consumers of each open
    /// connection's requests still hold, summed.
    pub fn held_payload_bytes(&self) -> usize {
        self.shared
            .conns
            .lock()
            .values()
            .map(|c| c.held.load(Ordering::SeqCst))
            .sum()
    }

    /// Calls being handled now.
    pub fn inflight(&self) -> usize {
        *self.shared.inflight.lock()
    }

    /// Stops accepting, lets in-flight calls finish, then closes every
    /// connection and joins the pool.
    pub fn shutdown(mut self) {
        self.stop(None);
    }

    /// As [`shutdown`](Self::shutdown), but gives in-flight calls at most
    /// `grace`; calls still running then are cancelled and their callers
    /// see the connection close. Returns whether every call finished.
    pub fn shutdown_timeout(mut self, grace: Duration) -> bool {
        self.stop(Some(grace))
    }

    fn stop(&mut self, grace: Option<Duration>) -> bool {
        let s = &self.shared;
        s.shutting_down.store(true, Ordering::SeqCst);
        if let Some(l) = s.listener.lock().take() {
            s.poller.delete(l.as_fd());
        }
        let deadline = grace.map(|g| Instant::now() + g);
        let mut n = s.inflight.lock();
        while *n > 0 {
            match deadline {
                Some(d) => {
                    if s.drained.wait_until(&mut n, d).timed_out() {
                        break;
                    }
                }
                None => s.drained.wait(&mut n),
            }
        }
        let clean = *n == 0;
        drop(n);
        // Cancel what is still running and close every connection before
        // joining the pool: a handler that honours is_cancelled() then
        // returns, and its caller sees the connection close.
        let conns: Vec<_> = s.conns.lock().drain().map(|(_, c)| c).collect();
        for c in &conns {
            c.closed.store(true, Ordering::SeqCst);
            s.poller.delete(c.fd.as_fd());
            c.cancel_all();
            sys::shutdown(c.fd.as_fd());
        }
        s.stop_signal.raise();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some((t, stop)) = self.sweeper.take() {
            let _ = stop.send(());
            let _ = t.join();
        }
        clean
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop(None);
        }
    }
}

struct Shared {
    poller: Poller,
    listener: Mutex<Option<TcpListener>>,
    jobs_signal: Signal,
    stop_signal: Signal,
    jobs_tx: ChanTx<Work>,
    jobs_rx: ChanRx<Work>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_conn: AtomicU64,
    handlers: HashMap<String, Arc<RawHandler>>,
    cfg: ServerConfig,
    shutting_down: AtomicBool,
    inflight: Mutex<usize>,
    drained: Condvar,
    counters: Arc<Counters>,
    epoch: Instant,
}

struct Job {
    conn: Arc<Conn>,
    frame: Frame,
    received: Instant,
    cancelled: Arc<AtomicBool>,
}

struct Conn {
    token: u64,
    path: ReceivePath,
    fd: Arc<OwnedFd>,
    peer: SocketAddr,
    receiver: Mutex<Receiver>,
    queue: Mutex<Vec<OutFrame>>,
    sender: Mutex<Sender>,
    calls: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    closed: AtomicBool,
    /// Milliseconds since the server's epoch when the peer started the head
    /// it has not finished; 0 when not inside a head.
    head_since: AtomicU64,
    /// Milliseconds since the server's epoch of the last frame received.
    last_active: AtomicU64,
    /// With a pre-shared key: the nonce this connection was challenged
    /// with, until it has authenticated.
    challenge: Mutex<Option<[u8; auth::NONCE_LEN]>>,
    /// Payload bytes of this connection's requests that consumers still hold.
    held: AtomicUsize,
    /// Reading is paused because `held` is over the cap.
    paused: AtomicBool,
}

/// Work for a pool thread besides socket readiness.
enum Work {
    /// Run a call's handler.
    Call(Job),
    /// Read a connection again after its consumers released enough pages.
    Resume(Arc<Conn>),
}

impl Conn {
    /// Queues a frame and flushes the queue unless another thread is
    /// already flushing (it will pick this frame up).
    fn send(&self, frame: OutFrame) {
        self.queue.lock().push(frame);
        loop {
            let Some(mut sender) = self.sender.try_lock() else {
                return;
            };
            loop {
                let batch = std::mem::take(&mut *self.queue.lock());
                if batch.is_empty() {
                    break;
                }
                // Replies are checked against the client's limits in
                // `respond`, so a failure here is the socket's: nothing more
                // can be sent. Readers see the connection close and clean up.
                if sender.send_batch(batch).is_err() {
                    self.queue.lock().clear();
                    sys::shutdown(self.fd.as_fd());
                    return;
                }
            }
            drop(sender);
            if self.queue.lock().is_empty() {
                return;
            }
        }
    }

    fn cancel_all(&self) {
        for flag in self.calls.lock().values() {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

impl Shared {
    fn run(self: Arc<Self>) {
        loop {
            let token = match self.poller.wait_one(None) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(_) => return,
            };
            match token {
                TOKEN_STOP => return,
                TOKEN_LISTENER => self.accept_all(),
                TOKEN_JOBS => {
                    self.jobs_signal.clear();
                    // Take one job at a time, and wake another idle thread
                    // while more are queued, so one blocking handler never
                    // holds up the jobs behind it.
                    while let Ok(work) = self.jobs_rx.try_recv() {
                        if !self.jobs_rx.is_empty() {
                            self.jobs_signal.raise();
                        }
                        match work {
                            Work::Call(job) => self.run_job(job),
                            Work::Resume(conn) => self.serve_conn(conn),
                        }
                    }
                }
                t => {
                    let conn = self.conns.lock().get(&t).cloned();
                    if let Some(conn) = conn {
                        self.serve_conn(conn);
                    }
                }
            }
        }
    }

    fn accept_all(&self) {
        let guard = self.listener.lock();
        let Some(listener) = guard.as_ref() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, peer)) => self.add_conn(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EMFILE, ENFILE, ENOBUFS...: leave the connection in the
                // backlog; the listener is re-armed and we try again.
                Err(_) => break,
            }
        }
        if !self.shutting_down.load(Ordering::SeqCst) {
            let _ = self
                .poller
                .rearm(listener.as_fd(), TOKEN_LISTENER, LISTEN_FLAGS);
        }
    }

    fn add_conn(&self, stream: TcpStream, peer: SocketAddr) {
        if sys::prepare_stream(&stream, true).is_err() {
            return;
        }
        let fd = Arc::new(OwnedFd::from(stream));
        let counters = Arc::new(Counters::with_parent(self.counters.clone()));
        let mut recv_cfg = self.cfg.recv.clone();
        recv_cfg.limits = self.cfg.limits;
        let token = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let receiver = Receiver::new(fd.clone(), recv_cfg, counters.clone());
        let conn = Arc::new(Conn {
            token,
            path: receiver.path(),
            receiver: Mutex::new(receiver),
            queue: Mutex::new(Vec::new()),
            sender: Mutex::new(Sender::new(fd.clone(), self.cfg.send.clone(), counters)),
            calls: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            head_since: AtomicU64::new(0),
            last_active: AtomicU64::new(self.now_ms()),
            challenge: Mutex::new(None),
            held: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            fd,
            peer,
        });
        let mut conns = self.conns.lock();
        if conns.len() >= self.cfg.max_connections {
            drop(conns);
            conn.send(error_frame(
                0,
                &Status::resource_exhausted(format!(
                    "server is at its max_connections limit of {}",
                    self.cfg.max_connections
                )),
            ));
            sys::shutdown(conn.fd.as_fd());
            return;
        }
        conns.insert(token, conn.clone());
        drop(conns);
        if self.cfg.auth_key.is_some() {
            let Ok(nonce) = auth::nonce() else {
                self.close_with(
                    &conn,
                    Some(Status::internal("no randomness for the challenge")),
                );
                return;
            };
            *conn.challenge.lock() = Some(nonce);
            conn.send(OutFrame {
                header: Header {
                    kind: Kind::Auth as i32,
                    body: nonce.to_vec(),
                    ..Default::default()
                },
                payload: Payload::Empty,
            });
        }
        if self.poller.add(conn.fd.as_fd(), token, CONN_FLAGS).is_err() {
            self.conns.lock().remove(&token);
        }
    }

    /// Reads every complete request the connection has, dispatches them, and
    /// runs the first one on this thread.
    fn serve_conn(self: &Arc<Self>, conn: Arc<Conn>) {
        let mut mine: Option<Job> = None;
        let mut failure = None;
        let mut got_frames = false;
        {
            let mut rx = conn.receiver.lock();
            let mut batch = 0;
            loop {
                if conn.paused.load(Ordering::SeqCst) {
                    break;
                }
                match rx.poll_frame() {
                    Ok(Some(frame)) => {
                        got_frames = true;
                        let job = self.classify(&conn, frame);
                        if self.over_cap(&conn) {
                            // Backpressure: stop reading this connection
                            // until its consumers release pages.
                            conn.paused.store(true, Ordering::SeqCst);
                        }
                        if let Some(job) = job {
                            if mine.is_none() {
                                mine = Some(job);
                            } else {
                                let _ = self.jobs_tx.send(Work::Call(job));
                                batch += 1;
                                if batch % DISPATCH_BATCH == 0 {
                                    self.jobs_signal.raise();
                                }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(RecvError::ChecksumMismatch {
                        head,
                        expected,
                        got,
                    }) => {
                        // The payload is discarded, never handed to a
                        // handler; the stream is still in sync.
                        if head.kind() == Kind::Request {
                            conn.send(error_frame(
                                head.call_id(),
                                &Status::data_loss(format!(
                                    "request payload failed its checksum (CRC32C {got:#010x}, expected {expected:#010x})"
                                )),
                            ));
                        }
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if batch % DISPATCH_BATCH != 0 {
                self.jobs_signal.raise();
            }
            if failure.is_none() {
                rx.wait_lowat();
            }
            let now = self.now_ms();
            if got_frames {
                conn.last_active.store(now, Ordering::Relaxed);
            }
            if rx.in_head() {
                let _ = conn.head_since.compare_exchange(
                    0,
                    now.max(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            } else {
                conn.head_since.store(0, Ordering::Relaxed);
            }
        }
        match failure {
            None if conn.paused.load(Ordering::SeqCst) => {
                // Not re-armed: a release re-reads it. If pages were released
                // between the check and now, resume here.
                if !self.over_cap(&conn) && conn.paused.swap(false, Ordering::SeqCst) {
                    self.resume(conn.clone());
                }
            }
            None => {
                if self
                    .poller
                    .rearm(conn.fd.as_fd(), conn.token, CONN_FLAGS)
                    .is_err()
                {
                    self.close_conn(&conn, None);
                }
            }
            Some(e) => self.close_conn(&conn, Some(e)),
        }
        if let Some(job) = mine {
            self.run_job(job);
        }
    }

    /// Turns a frame into a job (requests) or handles it on the spot.
    fn classify(self: &Arc<Self>, conn: &Arc<Conn>, mut frame: Frame) -> Option<Job> {
        let id = frame.head.call_id();
        let challenge = *conn.challenge.lock();
        if let (Some(nonce), Some(key)) = (challenge, &self.cfg.auth_key) {
            // Nothing is dispatched before the peer proves it holds the key.
            let refusal = if frame.head.kind() != Kind::Auth {
                Some(format!(
                    "this server requires pre-shared-key authentication; the client sent a {:?} frame instead",
                    frame.head.kind()
                ))
            } else if let Some(client_nonce) =
                auth::verify_client(key, &nonce, &frame.head.header.body)
            {
                let proof = auth::server_proof(key, &nonce, client_nonce);
                *conn.challenge.lock() = None;
                conn.send(OutFrame {
                    header: Header {
                        kind: Kind::Auth as i32,
                        body: proof,
                        ..Default::default()
                    },
                    payload: Payload::Empty,
                });
                None
            } else {
                Some(
                    "authentication failed: the client's proof does not match the pre-shared key"
                        .into(),
                )
            };
            if let Some(why) = refusal {
                self.close_with(conn, Some(Status::unauthenticated(why)));
            }
            return None;
        }
        match frame.head.kind() {
            Kind::Request => {
                if self.shutting_down.load(Ordering::SeqCst) {
                    conn.send(error_frame(
                        id,
                        &Status::unavailable("server is shutting down"),
                    ));
                    return None;
                }
                self.charge(conn, &mut frame.payload);
                let cancelled = Arc::new(AtomicBool::new(false));
                {
                    let mut calls = conn.calls.lock();
                    if calls.len() >= self.cfg.max_inflight_per_conn {
                        drop(calls);
                        conn.send(error_frame(
                            id,
                            &Status::resource_exhausted(format!(
                                "the connection already has {} calls in flight, the max_inflight_per_conn limit",
                                self.cfg.max_inflight_per_conn
                            )),
                        ));
                        return None;
                    }
                    calls.insert(id, cancelled.clone());
                }
                *self.inflight.lock() += 1;
                Some(Job {
                    conn: conn.clone(),
                    frame,
                    received: Instant::now(),
                    cancelled,
                })
            }
            Kind::Cancel => {
                if let Some(flag) = conn.calls.lock().get(&id) {
                    flag.store(true, Ordering::Relaxed);
                }
                None
            }
            Kind::Ping => {
                conn.send(OutFrame {
                    header: Header {
                        call_id: id,
                        kind: Kind::Pong as i32,
                        ..Default::default()
                    },
                    payload: Payload::Empty,
                });
                None
            }
            Kind::StreamChunk | Kind::StreamEnd => {
                conn.send(error_frame(
                    id,
                    &Status::unimplemented("streams are not supported by this server"),
                ));
                None
            }
            Kind::Response | Kind::Error | Kind::Pong | Kind::Auth | Kind::Unspecified => {
                // Frames only a server sends: the peer is confused. Answer and
                // carry on; this does not desynchronise the stream.
                conn.send(error_frame(
                    id,
                    &Status::invalid_argument(format!(
                        "a client may not send {:?} frames",
                        frame.head.kind()
                    )),
                ));
                None
            }
        }
    }

    fn run_job(&self, job: Job) {
        let Job {
            conn,
            frame,
            received,
            cancelled,
        } = job;
        let h = frame.head.header;
        let deadline = (h.deadline_us > 0).then(|| received + Duration::from_micros(h.deadline_us));
        let result = if cancelled.load(Ordering::Relaxed) {
            None
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            Some(Err(Status::deadline_exceeded(
                "deadline passed before the handler ran",
            )))
        } else if let Some(handler) = self.handlers.get(&h.method) {
            let ctx = Context {
                call_id: h.call_id,
                method: h.method,
                deadline,
                metadata: h.metadata,
                cancelled: cancelled.clone(),
                peer: conn.peer,
                path: conn.path,
            };
            let out = catch_unwind(AssertUnwindSafe(|| handler(&ctx, &h.body, frame.payload)))
                .unwrap_or_else(|_| Err(Status::internal("the handler panicked")));
            if cancelled.load(Ordering::Relaxed) {
                None
            } else if deadline.is_some_and(|d| Instant::now() >= d) {
                Some(Err(Status::deadline_exceeded(
                    "deadline passed while the handler ran",
                )))
            } else {
                Some(out)
            }
        } else {
            Some(Err(Status::unimplemented(format!(
                "unknown method '{}'",
                h.method
            ))))
        };
        if let Some(result) = result {
            conn.send(self.respond(h.call_id, result));
        }
        conn.calls.lock().remove(&h.call_id);
        let mut n = self.inflight.lock();
        *n -= 1;
        if *n == 0 {
            self.drained.notify_all();
        }
    }

    /// Builds the response frame, replacing a reply that breaks the
    /// client's limits with an error that says which limit.
    fn respond(&self, call_id: u64, result: Result<Reply, Status>) -> OutFrame {
        match result {
            Ok(reply) => {
                let header = Header {
                    call_id,
                    kind: Kind::Response as i32,
                    metadata: reply.metadata,
                    body: reply.body,
                    ..Default::default()
                };
                let limits = &self.cfg.send.limits;
                let check = check_reply(&header, reply.payload.len() as u64, limits);
                match check {
                    Ok(()) => OutFrame {
                        header,
                        payload: reply.payload,
                    },
                    Err(e) => error_frame(
                        call_id,
                        &Status::resource_exhausted(format!("the response was not sent: {e}")),
                    ),
                }
            }
            Err(status) => error_frame(call_id, &status),
        }
    }

    fn close_conn(&self, conn: &Arc<Conn>, why: Option<RecvError>) {
        let notice = match &why {
            Some(RecvError::Codec(e)) if !matches!(e, CodecError::Truncated { .. }) => Some(
                Status::invalid_argument(format!("protocol error, closing: {e}")),
            ),
            _ => None,
        };
        self.close_with(conn, notice);
    }

    /// Closes a connection, first telling the peer why (an ERROR frame with
    /// call id 0) if there is something to say.
    fn close_with(&self, conn: &Arc<Conn>, notice: Option<Status>) {
        if conn.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.poller.delete(conn.fd.as_fd());
        self.conns.lock().remove(&conn.token);
        conn.cancel_all();
        if let Some(status) = notice {
            conn.send(error_frame(0, &status));
        }
        sys::shutdown(conn.fd.as_fd());
    }

    /// Counts a request payload against its connection's cap until the
    /// last handle to it is dropped.
    fn charge(self: &Arc<Self>, conn: &Arc<Conn>, pages: &mut Pages) {
        let Some(cap) = self.cfg.max_held_bytes_per_conn else {
            return;
        };
        let bytes = pages.footprint();
        if bytes == 0 {
            return;
        }
        conn.held.fetch_add(bytes, Ordering::SeqCst);
        let shared = Arc::downgrade(self);
        let c = Arc::downgrade(conn);
        let hook: pagerpc_pages::ReleaseHook = Box::new(move |n| {
            let Some(conn) = c.upgrade() else { return };
            let left = conn.held.fetch_sub(n, Ordering::SeqCst).saturating_sub(n);
            if left <= cap && conn.paused.swap(false, Ordering::SeqCst) {
                if let Some(s) = shared.upgrade() {
                    s.resume(conn);
                }
            }
        });
        if let Err(hook) = pages.on_release(hook) {
            // Not attachable (a fresh payload always is): do not count it.
            hook(bytes);
        }
    }

    fn over_cap(&self, conn: &Conn) -> bool {
        self.cfg
            .max_held_bytes_per_conn
            .is_some_and(|cap| conn.held.load(Ordering::SeqCst) > cap)
    }

    /// Has a pool thread read a paused connection again.
    fn resume(&self, conn: Arc<Conn>) {
        if !conn.closed.load(Ordering::SeqCst) {
            let _ = self.jobs_tx.send(Work::Resume(conn));
            self.jobs_signal.raise();
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Closes connections that broke the header or idle timeouts. Runs on
    /// its own thread until the server stops.
    fn sweep(self: Arc<Self>, stop: ChanRx<()>) {
        let timeouts = [self.cfg.header_timeout, self.cfg.idle_timeout];
        let Some(shortest) = timeouts.iter().flatten().min().copied() else {
            return;
        };
        let tick = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
            let now = self.now_ms();
            let conns: Vec<Arc<Conn>> = self.conns.lock().values().cloned().collect();
            for c in conns {
                let head = c.head_since.load(Ordering::Relaxed);
                if let Some(t) = self.cfg.header_timeout {
                    if head != 0 && now.saturating_sub(head) > t.as_millis() as u64 {
                        self.close_with(
                            &c,
                            Some(Status::deadline_exceeded(format!(
                                "header_timeout: no complete frame header within {t:?}, closing"
                            ))),
                        );
                        continue;
                    }
                }
                if let Some(t) = self.cfg.idle_timeout {
                    let idle = now.saturating_sub(c.last_active.load(Ordering::Relaxed));
                    let paused = c.paused.load(Ordering::SeqCst);
                    if head == 0
                        && !paused
                        && c.calls.lock().is_empty()
                        && idle > t.as_millis() as u64
                    {
                        self.close_with(
                            &c,
                            Some(Status::unavailable(format!(
                                "idle_timeout: no call for {t:?}, closing"
                            ))),
                        );
                    }
                }
            }
        }
    }
}

/// The size checks the encoder would make, done before the frame is queued
/// so a too-large reply becomes an error for its own call only.
fn check_reply(header: &Header, payload_len: u64, limits: &Limits) -> Result<(), CodecError> {
    pagerpc_core::validate_header(header, limits)?;
    let hlen = header.encoded_len() as u64;
    if hlen > u64::from(limits.max_header_bytes) {
        return Err(CodecError::HeaderTooLarge {
            limit: limits.max_header_bytes,
            got: u32::try_from(hlen).unwrap_or(u32::MAX),
        });
    }
    if payload_len > limits.max_payload_bytes {
        return Err(CodecError::PayloadTooLarge {
            limit: limits.max_payload_bytes,
            got: payload_len,
        });
    }
    Ok(())
}

fn error_frame(call_id: u64, status: &Status) -> OutFrame {
    let mut message = status.message().to_owned();
    // Keep the header far below any sane header limit.
    if message.len() > 1024 {
        let mut cut = 1024;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    OutFrame {
        header: Header {
            call_id,
            kind: Kind::Error as i32,
            status_code: if status.code() == Code::Ok {
                Code::Unknown.as_u32()
            } else {
                status.code().as_u32()
            },
            status_message: message,
            ..Default::default()
        },
        payload: Payload::Empty,
    }
}
