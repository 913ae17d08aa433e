//! The async server (feature `tokio`): the same connections, budgets and
//! per-connection logic as the blocking [`Server`](super::Server), driven
//! by tasks on a tokio runtime instead of a thread pool.
//!
//! # Tasks
//! - One task per connection owns its I/O. It awaits the socket's
//!   readiness through [`tokio::io::unix::AsyncFd`] with the interest the
//!   connection wants now (readable unless reading is paused by
//!   backpressure or a budget, writable while responses are queued and not
//!   waiting for zero-copy completions or credit, errors always: an error
//!   readiness reaps `MSG_ZEROCOPY` completions), then runs the pool's turn
//!   (`Shared::drive`: completions, flush, timeouts, reads, classify). Where
//!   the pool re-arms epoll, the task is woken (a [`Notify`]) to look again.
//! - Each call runs as a task of its own ([`tokio::spawn`]) running the
//!   async handler; its response goes out through the same non-blocking
//!   enqueue-and-flush as the pool's, and the connection's task writes the
//!   rest when the socket has room.
//! - Accepting is a task on a tokio listener, feeding the same
//!   add-connection code (`max_connections`, auth, SETTINGS).
//! - Timeouts: the same sweeper thread as the blocking server. It never
//!   does I/O and wakes at most every 100 ms (less often with long
//!   timeouts); it only marks connections whose timeouts passed, and their
//!   tasks close them. Keeping it a thread keeps one timeout code path for
//!   both servers.
//!
//! # Readiness is edge-triggered
//! A task clears a readiness only after the operation it stands for ran
//! out of work (reads: the receiver needs more bytes; writes: the flush was
//! blocked; errors: completions reaped), using the tick of the readiness it
//! acted on, so an event that arrived meanwhile is kept. Reading stopped by
//! the per-turn batch cap or by backpressure keeps its readiness.
//!
//! tokio (through mio) reports an `EPOLLERR` that comes with `EPOLLOUT` as
//! "write closed", and keeps that state for good; a zero-copy completion
//! would then make every wait for writability return at once. When a task
//! has seen it on a connection that is not closed, it registers the socket
//! again (a fresh registration reports the socket's real state).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prost::Message;
use tokio::io::{Interest, Ready};
use tokio::sync::Notify;

use pagerpc_core::Status;
use pagerpc_pages::{Pages, Payload};

use super::async_stream::{AsyncInStream, AsyncOutStream, AsyncStreams};
use super::conn::{Conn, Events, Job};
use super::context::{AsyncRawHandler, Context, Handler, HandlerFuture, Reply};
use super::pool::CallStart;
use super::stream::{Shape, StreamFn};
use super::{ServerConfig, Shared};
use crate::intercept::{ServerInterceptor, ServerInterceptors};
use crate::sys;
use crate::trace::CallTrace;

/// What the async server adds to the shared state: its runtime and tasks.
pub(crate) struct AsyncIo {
    handle: tokio::runtime::Handle,
    shared: OnceLock<Weak<Shared>>,
    /// Notified when the last call in flight finishes.
    pub(crate) drained: Notify,
    /// Connection tasks not known to be finished; awaited at shutdown.
    conn_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl AsyncIo {
    /// Runs a call as a task.
    pub(crate) fn spawn_call(&self, job: Job) {
        let Some(shared) = self.shared.get().and_then(Weak::upgrade) else {
            return;
        };
        self.handle.spawn(shared.run_job_async(job));
    }

    /// Runs a stream's handler as a task.
    pub(crate) fn spawn_stream(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.handle.spawn(task);
    }

    /// Starts the task that drives a new connection.
    pub(crate) fn spawn_conn(&self, shared: &Arc<Shared>, conn: Arc<Conn>) {
        let task = self.handle.spawn(conn_task(shared.clone(), conn));
        let mut tasks = self.conn_tasks.lock();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

impl Shared {
    /// Runs a call of the async server, as its own task.
    async fn run_job_async(self: Arc<Self>, job: Job) {
        let Some((call, start)) = self.start_call(job) else {
            return;
        };
        let result = match start {
            CallStart::Answer(result) => result,
            CallStart::Run(Handler::Async(handler), ctx, body, pages) => {
                let out = call_async_handler(&*handler, ctx, body, pages, &call.trace).await;
                self.after_handler(&call, out)
            }
            CallStart::Run(Handler::Sync(handler), ctx, body, pages) => {
                // The async builder registers only async handlers; a
                // blocking one would still be answered correctly.
                let out = call
                    .trace
                    .in_scope(|| self.call_sync_handler(&*handler, &ctx, &body, pages));
                self.after_handler(&call, out)
            }
        };
        self.end_call(call, result);
    }
}

/// Runs an async handler: the one place an async unary handler is invoked.
async fn call_async_handler(
    handler: &AsyncRawHandler,
    ctx: Context,
    body: Vec<u8>,
    pages: Pages,
    trace: &CallTrace,
) -> Result<Reply, Status> {
    run_catching(trace, || handler(ctx, body, pages)).await
}

/// Makes a handler's future and runs it, inside the call's span (feature
/// `tracing`) at every poll, as the blocking server runs its handlers; a
/// panic, while making or polling it, becomes
/// [`Code::Internal`](crate::Code::Internal).
pub(crate) async fn run_catching(
    trace: &CallTrace,
    make: impl FnOnce() -> HandlerFuture,
) -> Result<Reply, Status> {
    let Ok(mut fut) = trace.in_scope(|| catch_unwind(AssertUnwindSafe(make))) else {
        return Err(Status::internal("the handler panicked"));
    };
    std::future::poll_fn(move |cx| {
        trace
            .in_scope(|| catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))))
            .unwrap_or_else(|_| Poll::Ready(Err(Status::internal("the handler panicked"))))
    })
    .await
}

/// Drives one connection until it closes: waits for what it wants now,
/// then runs the shared turn.
async fn conn_task(shared: Arc<Shared>, conn: Arc<Conn>) {
    let Some(notify) = conn.task.clone() else {
        return;
    };
    let mut afd = match sys::register_async(conn.fd.clone()) {
        Ok(a) => a,
        Err(_) => {
            shared.close(&conn, None, true);
            return;
        }
    };
    let mut stale_write = false;
    loop {
        if conn.closed.load(Ordering::SeqCst) {
            break;
        }
        if std::mem::take(&mut stale_write) {
            drop(afd);
            afd = match sys::register_async(conn.fd.clone()) {
                Ok(a) => a,
                Err(_) => {
                    shared.close(&conn, None, true);
                    break;
                }
            };
        }
        let (read, write) = conn.interest();
        let mut interest = Interest::ERROR;
        if read {
            interest = interest.add(Interest::READABLE);
        }
        if write {
            interest = interest.add(Interest::WRITABLE);
        }
        let woke = {
            let mut notified = pin!(notify.notified());
            let mut ready = pin!(afd.ready(interest));
            std::future::poll_fn(|cx| {
                if notified.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                ready.as_mut().poll(cx).map(Some)
            })
            .await
        };
        let mut ev = conn.take_posted();
        match woke {
            // Woken (a response queued, a resume, a timeout mark, close):
            // a turn with what was posted.
            None => shared.drive(&conn, ev),
            Some(Err(_)) => {
                shared.close(&conn, None, true);
                break;
            }
            Some(Ok(mut guard)) => {
                let r = guard.ready();
                ev.merge(Events {
                    read: r.is_readable(),
                    write: r.is_writable(),
                    error: r.is_error(),
                    hangup: r.is_read_closed() && r.is_write_closed(),
                    timeout: false,
                });
                shared.drive(&conn, ev);
                // Clear what the turn used up, with the tick it saw.
                let mut clear = Ready::EMPTY;
                if r.is_error() {
                    clear |= Ready::ERROR;
                }
                if r.is_writable() && conn.interest().1 {
                    // Bytes still wait for room: the flush was blocked.
                    clear |= Ready::WRITABLE;
                }
                let more = conn.read_more.swap(false, Ordering::SeqCst);
                // Only a read turn that drained the socket may clear the
                // read readiness (edge-triggered): one stopped by a pause,
                // a full outbound queue, the batch cap or the receive
                // budget left bytes there, and no new edge would come for
                // them. (Clearing when reading was merely allowed again by
                // the time of this check lost those bytes.)
                if r.is_readable() && conn.read_drained.swap(false, Ordering::SeqCst) {
                    clear |= Ready::READABLE;
                }
                if r.is_write_closed() && !conn.closed.load(Ordering::SeqCst) {
                    stale_write = true;
                }
                guard.clear_ready_matching(clear);
                drop(guard);
                if more {
                    // The batch cap: let other tasks run first.
                    tokio::task::yield_now().await;
                }
            }
        }
    }
}

/// Accepts connections until the server stops (the task is aborted).
async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if shared.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(s) = stream.into_std() {
                    shared.add_conn(s, peer);
                }
            }
            Err(e) if sys::is_fd_exhaustion(&e) => {
                // Out of descriptors: the backlog stays full, so accepting
                // again now would fail again at once.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => {
                // A connection that went away before it was accepted.
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Collects async handlers and settings, then binds an [`AsyncServer`]
/// (feature `tokio`).
///
/// (The README's example.)
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use pagerpc::{AsyncServer, Payload, Status};
/// use pagerpc::proto::MetadataEntry;
///
/// let server = AsyncServer::builder()
///     // An async handler: owns its Context, may .await anything.
///     .register("blob.echo", |ctx, req: MetadataEntry, pages| async move {
///         tokio::time::sleep(std::time::Duration::from_millis(1)).await;
///         if ctx.is_cancelled() {
///             return Err(Status::cancelled("caller gave up"));
///         }
///         Ok((req, Payload::Pages(pages)))
///     })
///     // Stream halves are async: recv().await (or a futures Stream),
///     // send().await waits for credit without holding a thread.
///     .register_server_stream("blob.get", |_ctx, _req, _pages, mut tx| async move {
///         for i in 0..4u8 {
///             let msg = MetadataEntry { key: i.to_string(), value: vec![] };
///             tx.send(&msg, vec![i; 1 << 20]).await?;
///         }
///         Ok(vec![])
///     })
///     .bind("127.0.0.1:7002")
///     .await?;
/// // Any client (the blocking Client too) talks to it.
/// server.shutdown().await; // stops accepting, finishes in-flight calls, closes
/// # Ok(())
/// # }
/// ```
pub struct AsyncServerBuilder {
    cfg: ServerConfig,
    handlers: std::collections::HashMap<String, Handler>,
    stream_handlers: std::collections::HashMap<String, (Shape, StreamFn)>,
    interceptors: ServerInterceptors,
}

impl Default for AsyncServerBuilder {
    fn default() -> Self {
        AsyncServerBuilder::new()
    }
}

impl std::fmt::Debug for AsyncServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncServerBuilder")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl AsyncServerBuilder {
    /// A builder with default settings and no handlers.
    pub fn new() -> AsyncServerBuilder {
        AsyncServerBuilder {
            cfg: ServerConfig::default(),
            handlers: std::collections::HashMap::new(),
            stream_handlers: std::collections::HashMap::new(),
            interceptors: ServerInterceptors::default(),
        }
    }

    /// Adds an interceptor, as [`ServerBuilder::interceptor`](crate::ServerBuilder::interceptor):
    /// it sees every call before its handler runs and may refuse it.
    pub fn interceptor(mut self, i: impl ServerInterceptor) -> AsyncServerBuilder {
        self.interceptors.push(std::sync::Arc::new(i));
        self
    }

    /// Registers every method of a service: what `pagerpc-build`
    /// generates from a `.proto` service's async trait
    /// (`KvAsyncServer::new(my_impl)`).
    pub fn add_service<S: crate::typed::AsyncService>(self, service: S) -> AsyncServerBuilder {
        service.register(self)
    }

    /// Replaces the settings. Every budget and timeout applies as on the
    /// blocking server; `threads` is unused (tasks run on the runtime's
    /// workers).
    pub fn config(mut self, cfg: ServerConfig) -> AsyncServerBuilder {
        self.cfg = cfg;
        self
    }

    /// Registers a typed async handler for `method`. It gets the call's
    /// [`Context`] (owned, so it can be held across `.await`), the decoded
    /// request and the request payload, and resolves to a response message
    /// and payload, or a status. A request that does not decode as `Req` is
    /// answered with [`Code::InvalidArgument`](crate::Code::InvalidArgument)
    /// without calling the handler.
    pub fn register<Req, Resp, F, Fut>(self, method: &str, f: F) -> AsyncServerBuilder
    where
        Req: Message + Default,
        Resp: Message,
        F: Fn(Context, Req, Pages) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(Resp, Payload), Status>> + Send + 'static,
    {
        use crate::typed::WithPayload;
        crate::typed::register_async_unary::<Req, Resp, WithPayload, WithPayload, _, _>(
            self, method, f,
        )
    }

    /// Registers an async handler that sees the request body as raw bytes
    /// and controls the reply's metadata.
    pub fn register_raw<F, Fut>(mut self, method: &str, f: F) -> AsyncServerBuilder
    where
        F: Fn(Context, Vec<u8>, Pages) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, Status>> + Send + 'static,
    {
        self.stream_handlers.remove(method);
        let h = move |ctx, body, pages| Box::pin(f(ctx, body, pages)) as HandlerFuture;
        self.handlers
            .insert(method.to_owned(), Handler::Async(Arc::new(h)));
        self
    }

    fn register_stream(
        mut self,
        method: &str,
        shape: Shape,
        f: Arc<super::async_stream::AsyncStreamHandler>,
    ) -> Self {
        self.handlers.remove(method);
        self.stream_handlers
            .insert(method.to_owned(), (shape, StreamFn::Async(f)));
        self
    }

    /// Registers an async client-streaming handler for `method`: it reads
    /// the client's messages from the [`AsyncInStream`] until `None` (the
    /// client finished) and resolves to the one response. It runs as a
    /// task; [`ServerConfig::max_streams`] bounds the streams open at once.
    pub fn register_client_stream<F, Fut>(self, method: &str, f: F) -> AsyncServerBuilder
    where
        F: Fn(Context, AsyncInStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, Status>> + Send + 'static,
    {
        let h = move |ctx, s: AsyncStreams| Box::pin(f(ctx, s.rx)) as HandlerFuture;
        self.register_stream(method, Shape::Client, Arc::new(h))
    }

    /// Registers an async server-streaming handler for `method`: it gets
    /// the request message (raw bytes) and payload, sends its messages on
    /// the [`AsyncOutStream`], and resolving to `Ok` ends the stream with
    /// status OK (the metadata travels with the end), `Err` with that
    /// status.
    pub fn register_server_stream<F, Fut>(self, method: &str, f: F) -> AsyncServerBuilder
    where
        F: Fn(Context, Vec<u8>, Pages, AsyncOutStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<pagerpc_core::MetadataEntry>, Status>> + Send + 'static,
    {
        let h = move |ctx, s: AsyncStreams| {
            let (body, pages) = s.request.unwrap_or_default();
            let fut = f(ctx, body, pages, s.tx);
            Box::pin(async move {
                let metadata = fut.await?;
                Ok(Reply {
                    metadata,
                    ..Reply::default()
                })
            }) as HandlerFuture
        };
        self.register_stream(method, Shape::Server, Arc::new(h))
    }

    /// Registers an async bidirectional streaming handler for `method`: it
    /// reads the client's messages from the [`AsyncInStream`] and sends its
    /// own on the [`AsyncOutStream`], in any order (or from two tasks);
    /// resolving ends the server's side as for
    /// [`register_server_stream`](Self::register_server_stream).
    pub fn register_bidi_stream<F, Fut>(self, method: &str, f: F) -> AsyncServerBuilder
    where
        F: Fn(Context, AsyncInStream, AsyncOutStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<pagerpc_core::MetadataEntry>, Status>> + Send + 'static,
    {
        let h = move |ctx, s: AsyncStreams| {
            let fut = f(ctx, s.rx, s.tx);
            Box::pin(async move {
                let metadata = fut.await?;
                Ok(Reply {
                    metadata,
                    ..Reply::default()
                })
            }) as HandlerFuture
        };
        self.register_stream(method, Shape::Bidi, Arc::new(h))
    }

    /// Binds `addr` (with the listener's segment sizing, as the blocking
    /// server does) and serves on the current tokio runtime.
    ///
    /// # Errors
    /// When the address cannot be bound, or when called outside a tokio
    /// runtime.
    pub async fn bind(self, addr: impl tokio::net::ToSocketAddrs) -> io::Result<AsyncServer> {
        let mut last = None;
        for a in tokio::net::lookup_host(addr).await? {
            match sys::listen_with_mss(&a, self.cfg.segments.mss_for(&a)) {
                Ok(l) => return self.serve(l),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("address resolved to nothing")))
    }

    /// Serves on an already bound listener, on the current tokio runtime.
    ///
    /// # Errors
    /// When called outside a tokio runtime, or when the listener cannot be
    /// registered with it.
    pub fn serve(self, listener: std::net::TcpListener) -> io::Result<AsyncServer> {
        let handle = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let listener = {
            let _guard = handle.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let shared = Shared::new(
            self.cfg,
            self.handlers,
            self.stream_handlers,
            self.interceptors,
            None,
            Some(AsyncIo {
                handle: handle.clone(),
                shared: OnceLock::new(),
                drained: Notify::new(),
                conn_tasks: Mutex::new(Vec::new()),
            }),
        )?;
        let io = shared.async_io.as_ref().expect("just set");
        let _ = io.shared.set(Arc::downgrade(&shared));
        let sweeper = shared.start_sweeper()?;
        let accept = handle.spawn(accept_loop(shared.clone(), listener));
        Ok(AsyncServer {
            shared,
            local_addr,
            accept: Some(accept),
            sweeper: Some(sweeper),
        })
    }
}

/// A running async server (feature `tokio`). Its connections and calls
/// are tasks on the runtime it was bound on.
///
/// Shut it down with [`shutdown`](Self::shutdown) to let in-flight calls
/// finish; dropping it stops accepting and closes every connection at
/// once (calls still running see
/// [`Context::is_cancelled`]).
pub struct AsyncServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<tokio::task::JoinHandle<()>>,
    sweeper: Option<(std::thread::JoinHandle<()>, crossbeam_channel::Sender<()>)>,
}

impl std::fmt::Debug for AsyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncServer")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl AsyncServer {
    /// A builder.
    pub fn builder() -> AsyncServerBuilder {
        AsyncServerBuilder::new()
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

    /// Calls being handled now.
    pub fn inflight(&self) -> usize {
        *self.shared.inflight.lock()
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

    /// Stops accepting, answers new requests with
    /// [`Code::Unavailable`](crate::Code::Unavailable), waits for in-flight
    /// calls to finish, then closes every connection.
    pub async fn shutdown(mut self) {
        self.stop(None).await;
    }

    /// As [`shutdown`](Self::shutdown), but gives in-flight calls at most
    /// `grace`; calls still running then see
    /// [`Context::is_cancelled`] and their callers see the connection
    /// close. Returns whether every call finished.
    pub async fn shutdown_timeout(mut self, grace: Duration) -> bool {
        self.stop(Some(grace)).await
    }

    /// Stops accepting and wakes what waits on the server.
    fn begin_stop(&mut self) {
        let s = &self.shared;
        s.shutting_down.store(true, Ordering::SeqCst);
        let conns: Vec<_> = s.conns.lock().values().cloned().collect();
        for c in conns {
            let streams: Vec<_> = c.streams.lock().values().cloned().collect();
            for st in streams {
                st.poke();
            }
        }
        if let Some(a) = self.accept.take() {
            a.abort();
        }
    }

    /// Closes every connection and stops the sweeper.
    fn close_all(&mut self) {
        let s = &self.shared;
        let conns: Vec<_> = s.conns.lock().drain().map(|(_, c)| c).collect();
        for c in &conns {
            s.close(c, None, false);
        }
        if let Some((t, stop)) = self.sweeper.take() {
            let _ = stop.send(());
            // It waits on that channel, so it ends at once.
            let _ = t.join();
        }
    }

    async fn stop(&mut self, grace: Option<Duration>) -> bool {
        self.begin_stop();
        let s = self.shared.clone();
        let io = s.async_io.as_ref().expect("the async server");
        let deadline = grace.map(|g| Instant::now() + g);
        let clean = loop {
            let mut drained = pin!(io.drained.notified());
            drained.as_mut().enable();
            if *s.inflight.lock() == 0 {
                break true;
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d.into(), drained).await.is_err() {
                        break *s.inflight.lock() == 0;
                    }
                }
                None => drained.await,
            }
        };
        self.close_all();
        let tasks = std::mem::take(&mut *io.conn_tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        clean
    }
}

impl Drop for AsyncServer {
    fn drop(&mut self) {
        if self.sweeper.is_some() {
            self.begin_stop();
            self.close_all();
        }
    }
}
