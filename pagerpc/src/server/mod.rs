//! The RPC server.
//!
//! # Threads
//! One pool of `threads` threads does both I/O and handler work. Every pool
//! thread waits on one shared epoll instance. Connections are registered
//! once, edge-triggered (`EPOLLET`: no re-arming per event), and one
//! thread at a time owns a connection's I/O
//! ([`conn`]); readiness keeps its flags: `EPOLLERR` reaps zero-copy
//! completions, `EPOLLOUT` flushes queued responses, `EPOLLIN` reads. No
//! pool thread ever waits on a peer: sends are non-blocking, and a peer
//! that does not read its responses gets no more of its requests read or
//! run (backpressure) until it does, or is closed by the progress timeout.
//!
//! The thread that reads a batch of requests (at most 64, then the
//! connection goes to the back of the queue) runs the first one itself
//! (no hand-off on the latency path) and puts the others on a crossbeam
//! channel, raising an eventfd that wakes idle pool threads to take them.
//! Each connection's protocol state (call table, auth, timeouts) is the
//! sans-IO [`pagerpc_core::conn::ServerConn`]; a sweeper thread asks it
//! which timeouts passed and only marks those connections; their owner
//! closes them.
//!
//! A handler that blocks holds its pool thread; size the pool for the
//! number of handlers that may block at once, plus one.
//!
//! # The async server
//! With the `tokio` feature, [`AsyncServer`] runs the same per-connection
//! turn (`pool.rs`: reap, flush, timeouts, read, classify) from one task per
//! connection that awaits the socket's readiness through tokio's `AsyncFd`,
//! and runs each call's async handler as a task of its own; see
//! `async_server.rs`.
//!
//! # Shutdown
//! [`Server::shutdown`] stops accepting, answers new requests with
//! [`Code::Unavailable`](crate::Code::Unavailable), waits for in-flight calls to finish, then closes
//! every connection.

#[cfg(feature = "tokio")]
mod async_server;
#[cfg(feature = "tokio")]
mod async_stream;
mod batching;
mod budget;
mod config;
mod conn;
mod context;
mod pool;
mod reply;
mod stream;
mod sweep;

use std::collections::HashMap;

use pagerpc_core::FastMap;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as ChanRx, Sender as ChanTx};
use parking_lot::{Condvar, Mutex};
use prost::Message;

use pagerpc_core::{Counters, MetadataEntry, Status};
use pagerpc_pages::{Pages, Payload};

use crate::sys::{self, Poller, Signal, EVENT_FLAGS, LISTEN_FLAGS};

use crate::intercept::{ServerInterceptor, ServerInterceptors};
#[cfg(feature = "tokio")]
pub use async_server::{AsyncServer, AsyncServerBuilder};
#[cfg(feature = "tokio")]
pub use async_stream::{AsyncInStream, AsyncOutStream};
pub use config::ServerConfig;
use conn::{Conn, Events, Job};
use context::Handler;
pub use context::{Context, Reply};
pub use stream::{InStream, OutStream, StreamSendError};
use stream::{Shape, StreamFn, Streams};

const TOKEN_LISTENER: u64 = 0;
const TOKEN_JOBS: u64 = 1;
const TOKEN_STOP: u64 = 2;
const FIRST_CONN_TOKEN: u64 = 16;
/// Requests read from one connection in one turn; then other connections
/// and queued calls get their turn, so a client that keeps sending cannot
/// keep a thread reading forever.
const DISPATCH_BATCH: usize = 64;

/// Collects handlers and settings, then binds a [`Server`].
pub struct ServerBuilder {
    cfg: ServerConfig,
    handlers: HashMap<String, Handler>,
    stream_handlers: HashMap<String, (Shape, StreamFn)>,
    interceptors: ServerInterceptors,
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
            stream_handlers: HashMap::new(),
            interceptors: ServerInterceptors::default(),
        }
    }

    /// Adds an interceptor: it sees every call (unary or streaming) before
    /// its handler runs, and may refuse it with a status, which is then the
    /// caller's answer (the handler never runs). Several run in the order
    /// added; the first refusal wins. See [`crate::intercept`].
    pub fn interceptor(mut self, i: impl ServerInterceptor) -> ServerBuilder {
        self.interceptors.push(Arc::new(i));
        self
    }

    /// Replaces the settings.
    pub fn config(mut self, cfg: ServerConfig) -> ServerBuilder {
        self.cfg = cfg;
        self
    }

    /// Registers a typed handler for `method`. It gets the decoded request
    /// and the request payload, and returns a response message and payload,
    /// or a status. A request that does not decode as `Req` is answered with
    /// [`Code::InvalidArgument`](crate::Code::InvalidArgument) without calling the handler.
    pub fn register<Req, Resp, F>(self, method: &str, f: F) -> ServerBuilder
    where
        Req: Message + Default,
        Resp: Message,
        F: Fn(&Context, Req, Pages) -> Result<(Resp, Payload), Status> + Send + Sync + 'static,
    {
        use crate::typed::WithPayload;
        crate::typed::register_unary::<Req, Resp, WithPayload, WithPayload, _>(self, method, f)
    }

    /// Registers a handler that sees the request body as raw bytes and
    /// controls the reply's metadata.
    pub fn register_raw<F>(mut self, method: &str, f: F) -> ServerBuilder
    where
        F: Fn(&Context, &[u8], Pages) -> Result<Reply, Status> + Send + Sync + 'static,
    {
        self.stream_handlers.remove(method);
        self.handlers
            .insert(method.to_owned(), Handler::Sync(Arc::new(f)));
        self
    }

    /// Registers every method of a service: what `pagerpc-build`
    /// generates from a `.proto` service (`KvServer::new(my_impl)`).
    pub fn add_service<S: crate::typed::Service>(self, service: S) -> ServerBuilder {
        service.register(self)
    }

    fn register_stream(
        mut self,
        method: &str,
        shape: Shape,
        f: Arc<stream::StreamHandler>,
    ) -> Self {
        self.handlers.remove(method);
        self.stream_handlers
            .insert(method.to_owned(), (shape, StreamFn::Sync(f)));
        self
    }

    /// Registers a client-streaming handler for `method`: it reads the
    /// client's messages from the [`InStream`] until `None` (the client
    /// finished) and returns the one response. Its handler runs on a
    /// thread of its own (see [`ServerConfig::max_streams`]).
    pub fn register_client_stream<F>(self, method: &str, f: F) -> ServerBuilder
    where
        F: Fn(&Context, &mut InStream) -> Result<Reply, Status> + Send + Sync + 'static,
    {
        let h = move |ctx: &Context, mut s: Streams| f(ctx, &mut s.rx);
        self.register_stream(method, Shape::Client, Arc::new(h))
    }

    /// Registers a server-streaming handler for `method`: it gets the
    /// request message (raw bytes) and payload, sends its messages on the
    /// [`OutStream`], and returning `Ok` ends the stream with status OK
    /// (the returned metadata travels with the end), `Err` with that
    /// status.
    pub fn register_server_stream<F>(self, method: &str, f: F) -> ServerBuilder
    where
        F: Fn(&Context, &[u8], Pages, &mut OutStream) -> Result<Vec<MetadataEntry>, Status>
            + Send
            + Sync
            + 'static,
    {
        let h = move |ctx: &Context, mut s: Streams| {
            let (body, pages) = s.request.take().unwrap_or_default();
            let metadata = f(ctx, &body, pages, &mut s.tx)?;
            Ok(Reply {
                metadata,
                ..Reply::default()
            })
        };
        self.register_stream(method, Shape::Server, Arc::new(h))
    }

    /// Registers a bidirectional streaming handler for `method`: it reads
    /// the client's messages from the [`InStream`] and sends its own on the
    /// [`OutStream`], in any order; returning ends the server's side as
    /// for [`register_server_stream`](Self::register_server_stream).
    pub fn register_bidi_stream<F>(self, method: &str, f: F) -> ServerBuilder
    where
        F: Fn(&Context, &mut InStream, &mut OutStream) -> Result<Vec<MetadataEntry>, Status>
            + Send
            + Sync
            + 'static,
    {
        let h = move |ctx: &Context, mut s: Streams| {
            let metadata = f(ctx, &mut s.rx, &mut s.tx)?;
            Ok(Reply {
                metadata,
                ..Reply::default()
            })
        };
        self.register_stream(method, Shape::Bidi, Arc::new(h))
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
        let shared = Shared::new(
            self.cfg,
            self.handlers,
            self.stream_handlers,
            self.interceptors,
            Some(listener),
            #[cfg(feature = "tokio")]
            None,
        )?;
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
        let sweeper = shared.start_sweeper()?;
        Ok(Server {
            shared,
            threads,
            local_addr,
            sweeper: Some(sweeper),
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

    /// The server-wide receive budget: payload bytes reserved now, the
    /// limit (`max_receive_bytes`), and connections waiting for room.
    pub fn receive_budget(&self) -> (usize, usize, usize) {
        let b = &self.shared.budget;
        (b.used(), b.limit(), b.waiting())
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
        // Stream handlers waiting for messages or credit learn it now.
        let conns: Vec<_> = s.conns.lock().values().cloned().collect();
        for c in conns {
            let streams: Vec<_> = c.streams.lock().values().cloned().collect();
            for st in streams {
                st.poke();
            }
        }
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
            s.close_because(c, None, false, &"the server is shutting down");
        }
        s.stop_signal.raise();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Stream handlers run on threads of their own; closing cancelled
        // their streams, so they return. Wait for them (within the grace,
        // when there is one: a handler stuck in its own code is left).
        let streams = std::mem::take(&mut *s.stream_threads.lock());
        let give_up = deadline.map(|d| d.max(Instant::now() + Duration::from_millis(100)));
        for t in streams {
            if let Some(d) = give_up {
                while !t.is_finished() && Instant::now() < d {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if !t.is_finished() {
                    continue;
                }
            }
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

/// What the blocking and the async server share: connections, handlers,
/// budgets and the per-connection logic (`pool.rs`: `turn`, `read`,
/// `classify`, `send`, `close`). The two differ only in where readiness
/// comes from and where calls run: the pool waits on `poller` and runs
/// calls on its threads; the async server (`async_io` set) has one task
/// per connection awaiting `AsyncFd` readiness and spawns a task per call.
struct Shared {
    /// The pool's epoll instance (unused by the async server).
    poller: Poller,
    listener: Mutex<Option<TcpListener>>,
    jobs_signal: Signal,
    /// `jobs_signal` is raised and not read yet (`batching.rs`).
    jobs_raised: AtomicBool,
    /// Pool threads waiting for events (`batching.rs`).
    idle: std::sync::atomic::AtomicUsize,
    /// Each method's handler time, to tell quick calls (`batching.rs`).
    costs: batching::JobCosts,
    stop_signal: Signal,
    jobs_tx: ChanTx<Work>,
    jobs_rx: ChanRx<Work>,
    conns: Mutex<FastMap<u64, Arc<Conn>>>,
    next_conn: AtomicU64,
    handlers: FastMap<String, Handler>,
    stream_handlers: HashMap<String, (Shape, StreamFn)>,
    /// Run before every handler (`ServerInterceptors::check`).
    interceptors: ServerInterceptors,
    /// Streams open, server-wide (each has a handler thread).
    streams_open: std::sync::atomic::AtomicUsize,
    /// The stream handler threads not known to be finished; joined at
    /// shutdown.
    stream_threads: Mutex<Vec<JoinHandle<()>>>,
    cfg: ServerConfig,
    shutting_down: AtomicBool,
    inflight: Mutex<usize>,
    drained: Condvar,
    counters: Arc<Counters>,
    /// `accept()` ran out of descriptors; the sweeper re-arms the listener.
    accept_paused: AtomicBool,
    /// Payload bytes being received, server-wide.
    budget: Arc<budget::ReceiveBudget>,
    /// Connections that have not authenticated yet, oldest first.
    unauthenticated: Mutex<std::collections::VecDeque<std::sync::Weak<Conn>>>,
    /// Set for the async server: the runtime its tasks run on.
    #[cfg(feature = "tokio")]
    async_io: Option<async_server::AsyncIo>,
}

impl Shared {
    fn new(
        cfg: ServerConfig,
        handlers: HashMap<String, Handler>,
        stream_handlers: HashMap<String, (Shape, StreamFn)>,
        interceptors: ServerInterceptors,
        listener: Option<TcpListener>,
        #[cfg(feature = "tokio")] async_io: Option<async_server::AsyncIo>,
    ) -> io::Result<Arc<Shared>> {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let costs = batching::JobCosts::new(&handlers);
        let receive_limit = cfg.max_receive_bytes.unwrap_or(usize::MAX);
        let shared = Arc::new(Shared {
            poller: Poller::new()?,
            listener: Mutex::new(listener),
            jobs_signal: Signal::new()?,
            jobs_raised: AtomicBool::new(false),
            idle: std::sync::atomic::AtomicUsize::new(0),
            costs,
            stop_signal: Signal::new()?,
            jobs_tx,
            jobs_rx,
            conns: Mutex::new(FastMap::default()),
            next_conn: AtomicU64::new(FIRST_CONN_TOKEN),
            handlers: handlers.into_iter().collect(),
            stream_handlers,
            interceptors,
            streams_open: std::sync::atomic::AtomicUsize::new(0),
            stream_threads: Mutex::new(Vec::new()),
            cfg,
            shutting_down: AtomicBool::new(false),
            inflight: Mutex::new(0),
            drained: Condvar::new(),
            counters: Arc::new(Counters::new()),
            accept_paused: AtomicBool::new(false),
            budget: Arc::new(budget::ReceiveBudget::new(receive_limit)),
            unauthenticated: Mutex::new(std::collections::VecDeque::new()),
            #[cfg(feature = "tokio")]
            async_io,
        });
        shared.budget.attach(Arc::downgrade(&shared));
        Ok(shared)
    }

    /// Starts the sweeper thread (both servers: it only marks
    /// connections, see `sweep.rs`).
    fn start_sweeper(self: &Arc<Self>) -> io::Result<(JoinHandle<()>, ChanTx<()>)> {
        let (sweep_stop, sweep_rx) = crossbeam_channel::bounded(1);
        let s = self.clone();
        let sweeper = std::thread::Builder::new()
            .name("pagerpc-sweep".into())
            .spawn(move || s.sweep(sweep_rx))?;
        Ok((sweeper, sweep_stop))
    }

    /// Whether this is the async server (connections driven by tasks).
    fn is_async(&self) -> bool {
        #[cfg(feature = "tokio")]
        {
            self.async_io.is_some()
        }
        #[cfg(not(feature = "tokio"))]
        {
            false
        }
    }
}

/// Work for a pool thread besides socket readiness.
enum Work {
    /// Run a call's handler.
    Call(Box<Job>),
    /// Own a connection for these events (resume reading, check timeouts,
    /// continue a batch).
    Conn(Arc<Conn>, Events),
    /// Accept again after running out of descriptors.
    Accept,
}
