//! Streaming calls on the server.
//!
//! A REQUEST for a method registered as streaming opens a stream (see the
//! client's `stream.rs` for the frames). Its handler runs on a thread of its
//! own, not on a pool thread, because it waits for the client's messages
//! and for credit; `ServerConfig::max_streams` bounds those threads. The
//! pool thread that reads the connection routes STREAM_CHUNK, STREAM_END,
//! CANCEL and CREDIT frames to the stream's [`StreamShared`], and the
//! handler's [`InStream`] / [`OutStream`] wait on it.
//!
//! Credit goes back to the client when the handler drops the [`Pages`] of
//! a message (a release hook), so a handler that stops reading stops its
//! client after one `stream_window`, and the connection's other calls and
//! streams go on.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use prost::Message;

use pagerpc_core::conn::{InCredit, OutCredit};
use pagerpc_core::{Header, Kind, Status};
use pagerpc_pages::{Pages, Payload};
use pagerpc_receiver::Frame;
use pagerpc_sender::OutFrame;

use super::conn::Conn;
use super::context::{Context, Reply};
use super::reply::{error_frame, response_frame};
use super::Shared;
pub(crate) use crate::stream_message::credit_frame;
use crate::stream_message::StreamMessage;
use crate::trace::{CallTrace, Side};

/// The three streaming shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Many client messages, one response.
    Client,
    /// One request, many server messages.
    Server,
    /// Many both ways.
    Bidi,
}

/// What a streaming handler gets: the request message (server-streaming
/// only) and the halves its shape has.
pub(crate) struct Streams {
    pub(crate) request: Option<(Vec<u8>, Pages)>,
    pub(crate) rx: InStream,
    pub(crate) tx: OutStream,
}

/// A registered streaming handler, on raw bytes. For client-streaming
/// methods the `Reply` is the response; for the others its metadata ends
/// the stream (STREAM_END).
pub(crate) type StreamHandler = dyn Fn(&Context, Streams) -> Result<Reply, Status> + Send + Sync;

/// A streaming method's handler: on a thread of its own (blocking server)
/// or a task (async server).
#[derive(Clone)]
pub(crate) enum StreamFn {
    /// A blocking handler.
    Sync(Arc<StreamHandler>),
    /// An async handler.
    #[cfg(feature = "tokio")]
    Async(Arc<super::async_stream::AsyncStreamHandler>),
}

/// One stream's state, shared by the pool thread that reads its frames and
/// the handler thread.
pub(crate) struct StreamShared {
    pub(crate) inner: Mutex<Inner>,
    cv: Condvar,
}

pub(crate) struct Inner {
    pub(crate) queue: VecDeque<Frame>,
    /// How the client's side ended: STREAM_END (`Ok`), CANCEL (`Err`), or
    /// the connection closing.
    pub(crate) client_end: Option<Result<(), Status>>,
    pub(crate) out: OutCredit,
    pub(crate) inc: InCredit,
    /// The handler returned: credit released later is not given back.
    over: bool,
    /// Async halves waiting for a change (woken with the condvar's
    /// waiters).
    pub(crate) wakers: Vec<std::task::Waker>,
}

impl StreamShared {
    fn new(window_out: u64, window_in: u64, client_streams: bool) -> StreamShared {
        StreamShared {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                client_end: (!client_streams).then_some(Ok(())),
                out: OutCredit::new(window_out),
                inc: InCredit::new(window_in),
                over: false,
                wakers: Vec::new(),
            }),
            cv: Condvar::new(),
        }
    }

    /// Wakes the stream's handler to look again (its connection's
    /// outbound queue drained, say).
    pub(crate) fn poke(&self) {
        self.notify(self.inner.lock());
    }

    /// Wakes every waiter, blocking or async. Takes the lock's guard: a
    /// waiter between its check and its wait would miss a bare notify.
    pub(crate) fn notify(&self, mut inner: parking_lot::MutexGuard<'_, Inner>) {
        let wakers = std::mem::take(&mut inner.wakers);
        self.cv.notify_all();
        drop(inner);
        for w in wakers {
            w.wake();
        }
    }

    /// The stream is cut short (CANCEL, or the connection closed).
    pub(crate) fn cancel(&self, status: Status) {
        let mut inner = self.inner.lock();
        if !matches!(inner.client_end, Some(Err(_))) {
            inner.client_end = Some(Err(status));
        }
        self.notify(inner);
    }
}

/// Bytes a stream message costs in credit.
fn cost(frame: &Frame) -> u64 {
    frame.head.header.body.len() as u64 + frame.head.payload_len()
}

impl Shared {
    /// A REQUEST for a streaming method, already admitted to the call
    /// table: starts its handler thread.
    pub(crate) fn open_stream(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        frame: Frame,
        shape: Shape,
        handler: StreamFn,
        cancelled: Arc<std::sync::atomic::AtomicBool>,
        received: Instant,
    ) -> Result<(), Status> {
        let id = frame.head.call_id();
        let client_streams = frame.head.header.client_stream;
        let wants = shape != Shape::Server;
        if client_streams != wants {
            return Err(Status::invalid_argument(format!(
                "method '{}' is {}: the request must {}set client_stream",
                frame.head.header.method,
                match shape {
                    Shape::Client => "client-streaming",
                    Shape::Server => "server-streaming",
                    Shape::Bidi => "bidirectional",
                },
                if wants { "" } else { "not " }
            )));
        }
        let open = self.streams_open.fetch_add(1, Ordering::SeqCst);
        if open >= self.cfg.max_streams {
            self.streams_open.fetch_sub(1, Ordering::SeqCst);
            return Err(Status::resource_exhausted(format!(
                "the server has {open} streams open, its max_streams limit of {}",
                self.cfg.max_streams
            )));
        }
        // What we send is bounded by the client's window and by our own:
        // a client announcing a huge window must not make us queue a huge
        // stream for it.
        let window_out = conn
            .peer_stream_window
            .load(Ordering::SeqCst)
            .min(self.cfg.stream_window);
        let stream = Arc::new(StreamShared::new(
            window_out,
            self.cfg.stream_window,
            client_streams,
        ));
        conn.streams.lock().insert(id, stream.clone());
        // (Without the `tokio` feature there is only the one kind.)
        #[allow(clippy::infallible_destructuring_match)]
        let handler = match handler {
            StreamFn::Sync(h) => h,
            #[cfg(feature = "tokio")]
            StreamFn::Async(h) => {
                let io = self.async_io.as_ref().ok_or_else(|| {
                    Status::internal("an async stream handler on the blocking server")
                })?;
                io.spawn_stream(self.clone().run_stream_async(
                    conn.clone(),
                    frame,
                    shape,
                    h,
                    stream,
                    cancelled,
                    received,
                ));
                return Ok(());
            }
        };
        let this = self.clone();
        let c = conn.clone();
        let spawned = std::thread::Builder::new()
            .name("pagerpc-stream".into())
            .spawn(move || this.run_stream(c, frame, shape, handler, stream, cancelled, received));
        match spawned {
            Ok(t) => {
                let mut threads = self.stream_threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(t);
                Ok(())
            }
            Err(e) => {
                conn.streams.lock().remove(&id);
                self.streams_open.fetch_sub(1, Ordering::SeqCst);
                Err(Status::resource_exhausted(format!(
                    "no thread for the stream's handler: {e}"
                )))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_stream(
        self: Arc<Self>,
        conn: Arc<Conn>,
        frame: Frame,
        shape: Shape,
        handler: Arc<StreamHandler>,
        stream: Arc<StreamShared>,
        cancelled: Arc<std::sync::atomic::AtomicBool>,
        received: Instant,
    ) {
        let (id, deadline, out, trace) = {
            let (ctx, request, half, trace) =
                self.start_stream(&conn, frame, shape, &stream, &cancelled, received);
            let streams = Streams {
                request,
                rx: InStream { half: half() },
                tx: OutStream { half: half() },
            };
            let out = trace.in_scope(|| self.call_sync_stream_handler(&*handler, &ctx, streams));
            (ctx.call_id, ctx.deadline, out, trace)
        };
        self.end_stream(conn, id, shape, stream, cancelled, deadline, out, trace);
    }

    /// Runs a blocking stream handler: the one place one is invoked.
    fn call_sync_stream_handler(
        &self,
        handler: &StreamHandler,
        ctx: &Context,
        streams: Streams,
    ) -> Result<Reply, Status> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.interceptors.check(ctx)?;
            handler(ctx, streams)
        }))
        .unwrap_or_else(|_| Err(Status::internal("the handler panicked")))
    }

    /// What a stream's handler gets, both servers: its context, the request
    /// (server-streaming only), and a maker of stream halves.
    #[allow(clippy::type_complexity)]
    pub(crate) fn start_stream<'a>(
        self: &'a Arc<Self>,
        conn: &'a Arc<Conn>,
        frame: Frame,
        shape: Shape,
        stream: &'a Arc<StreamShared>,
        cancelled: &'a Arc<std::sync::atomic::AtomicBool>,
        received: Instant,
    ) -> (
        Context,
        Option<(Vec<u8>, Pages)>,
        impl Fn() -> Half + 'a,
        CallTrace,
    ) {
        let trace = CallTrace::start(
            Side::Server,
            &frame.head.header.method,
            frame.head.call_id(),
            received,
        );
        trace.received(&frame);
        let h = frame.head.header;
        let id = h.call_id;
        let deadline = (h.deadline_us > 0).then(|| received + Duration::from_micros(h.deadline_us));
        let ctx = Context {
            call_id: id,
            method: h.method,
            deadline,
            metadata: h.metadata,
            cancelled: cancelled.clone(),
            peer: conn.peer,
            path: conn.path,
        };
        let half_trace = trace.clone();
        let half = move || Half {
            shared: Arc::downgrade(self),
            conn: conn.clone(),
            stream: stream.clone(),
            id,
            deadline,
            idle: self.cfg.stream_idle_timeout,
            cancelled: cancelled.clone(),
            trace: half_trace.clone(),
        };
        let request = (shape == Shape::Server).then_some((h.body, frame.payload));
        (ctx, request, half, trace)
    }

    /// Ends a stream whose handler returned `out`, both servers: sends the
    /// response (client-streaming) or the end of the server's messages,
    /// unless the call was cut short, and retires the call.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn end_stream(
        &self,
        conn: Arc<Conn>,
        id: u64,
        shape: Shape,
        stream: Arc<StreamShared>,
        cancelled: Arc<std::sync::atomic::AtomicBool>,
        deadline: Option<Instant>,
        out: Result<Reply, Status>,
        trace: CallTrace,
    ) {
        stream.inner.lock().over = true;
        let cut = stream.inner.lock().client_end.clone();
        let closed = conn.closed.load(Ordering::SeqCst);
        if !closed && !matches!(cut, Some(Err(_))) && !cancelled.load(Ordering::Relaxed) {
            let out = match out {
                Ok(_) if deadline.is_some_and(|d| Instant::now() >= d) => Err(
                    Status::deadline_exceeded("deadline passed while the stream's handler ran"),
                ),
                other => other,
            };
            let frame = match (shape, out) {
                (Shape::Client, result) => response_frame(id, result, &conn.peer_limits.lock()),
                (_, Ok(reply)) => OutFrame {
                    header: Header {
                        call_id: id,
                        kind: Kind::StreamEnd as i32,
                        metadata: reply.metadata,
                        ..Default::default()
                    },
                    payload: Payload::Empty,
                },
                (_, Err(status)) => error_frame(id, &status),
            };
            trace.answered(&frame);
            trace.end();
            self.send(&conn, frame);
        } else if let Some(Err(status)) = cut {
            trace.status(status.code());
        }
        conn.streams.lock().remove(&id);
        self.streams_open.fetch_sub(1, Ordering::SeqCst);
        self.finish_call(&conn, id);
    }

    /// Routes a stream frame read from `conn` (STREAM_CHUNK, STREAM_END,
    /// CREDIT) to its stream. Frames for a stream that is over are
    /// dropped: the call ended while they were on the way.
    pub(crate) fn stream_frame(self: &Arc<Self>, conn: &Arc<Conn>, frame: Frame) {
        let id = frame.head.call_id();
        let kind = frame.head.kind();
        if kind == Kind::Credit && id == 0 {
            // Connection credit: the client read our payloads.
            conn.grant_credit(frame.head.header.credit);
            self.post_work(
                conn,
                super::conn::Events {
                    write: true,
                    ..Default::default()
                },
            );
            return;
        }
        let Some(stream) = conn.streams.lock().get(&id).cloned() else {
            return;
        };
        let mut inner = stream.inner.lock();
        match kind {
            Kind::Credit => inner.out.grant(frame.head.header.credit),
            Kind::StreamEnd => {
                if inner.client_end.is_none() {
                    inner.client_end = Some(Ok(()));
                }
            }
            // The stream already failed (its error was sent): what the
            // client sent meanwhile crossed that error on the wire.
            _ if matches!(inner.client_end, Some(Err(_))) => return,
            _ if inner.client_end.is_some() => {
                // A message after STREAM_END, or on a server-streaming call.
                let status =
                    Status::invalid_argument("stream message after the client ended its messages");
                inner.client_end = Some(Err(status.clone()));
                stream.notify(inner);
                self.send(conn, error_frame(id, &status));
                return;
            }
            _ => match inner.inc.on_message(cost(&frame)) {
                Ok(()) => inner.queue.push_back(frame),
                Err(e) => {
                    let status = Status::resource_exhausted(format!("stream ended: {e}"));
                    inner.client_end = Some(Err(status.clone()));
                    stream.notify(inner);
                    self.send(conn, error_frame(id, &status));
                    return;
                }
            },
        }
        stream.notify(inner);
    }
}

/// What both halves hold (blocking and async).
pub(crate) struct Half {
    pub(crate) shared: Weak<Shared>,
    pub(crate) conn: Arc<Conn>,
    pub(crate) stream: Arc<StreamShared>,
    pub(crate) id: u64,
    pub(crate) deadline: Option<Instant>,
    /// How long one wait for the client (a message, or credit) may last.
    pub(crate) idle: Option<Duration>,
    pub(crate) cancelled: Arc<std::sync::atomic::AtomicBool>,
    /// The call's span (feature `tracing`).
    pub(crate) trace: CallTrace,
}

impl Half {
    /// One look at the stream for a waiter: `Some(Ok)` when `ready`,
    /// `Some(Err)` with the status that ended the call (cut short, the
    /// connection closed, shutdown, the deadline or `idle_end` passed), or
    /// `None` to keep waiting.
    ///
    /// Every change a waiter looks for notifies under the stream's lock
    /// (`StreamShared::notify`): a message, credit, the client's end or
    /// CANCEL, the connection closing (`cancel`), its outbound queue
    /// draining and the server shutting down (`poke`). So a waiter sleeps
    /// until one of them or its deadline; it never polls.
    pub(crate) fn verdict(
        &self,
        inner: &mut Inner,
        ready: &mut impl FnMut(&mut Inner) -> bool,
        idle_end: Option<Instant>,
    ) -> Option<Result<(), Status>> {
        if ready(inner) {
            return Some(Ok(()));
        }
        if let Some(Err(s)) = &inner.client_end {
            return Some(Err(s.clone()));
        }
        if self.conn.closed.load(Ordering::SeqCst) {
            return Some(Err(Status::unavailable("the connection closed")));
        }
        if self
            .shared
            .upgrade()
            .is_none_or(|s| s.shutting_down.load(Ordering::SeqCst))
        {
            return Some(Err(Status::unavailable("the server is shutting down")));
        }
        if self.cancelled.load(Ordering::Relaxed) {
            return Some(Err(Status::cancelled("the client cancelled the call")));
        }
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            return Some(Err(Status::deadline_exceeded(
                "the stream's deadline passed",
            )));
        }
        if idle_end.is_some_and(|d| now >= d) {
            return Some(Err(Status::deadline_exceeded(format!(
                "the client made no progress on the stream for the stream_idle_timeout of {:?}",
                self.idle.unwrap_or_default()
            ))));
        }
        None
    }

    /// When a wait that starts now gives up for lack of progress: each
    /// wait for the client may last `stream_idle_timeout`.
    pub(crate) fn idle_end(&self) -> Option<Instant> {
        self.idle.map(|t| Instant::now() + t)
    }

    /// The earlier of the deadline and `idle_end`.
    pub(crate) fn wake_at(&self, idle_end: Option<Instant>) -> Option<Instant> {
        match (self.deadline, idle_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Waits on the stream until `ready`, the end of the call (its status),
    /// or the deadline.
    fn wait<'a>(
        &'a self,
        mut ready: impl FnMut(&mut Inner) -> bool,
    ) -> Result<parking_lot::MutexGuard<'a, Inner>, Status> {
        let mut inner = self.stream.inner.lock();
        let idle_end = self.idle_end();
        loop {
            if let Some(v) = self.verdict(&mut inner, &mut ready, idle_end) {
                return v.map(|()| inner);
            }
            match self.wake_at(idle_end) {
                Some(d) => {
                    self.stream.cv.wait_until(&mut inner, d);
                }
                None => self.stream.cv.wait(&mut inner),
            }
        }
    }

    /// Whether a client message, or the client's end, is there to take.
    pub(crate) fn message_ready(i: &mut Inner) -> bool {
        !i.queue.is_empty() || matches!(i.client_end, Some(Ok(())))
    }

    /// Takes the next client message once
    /// [`message_ready`](Self::message_ready) (`None`: the client ended its
    /// messages), giving back credit for its body now and for its payload
    /// when the handler drops it.
    pub(crate) fn take_message(
        &self,
        mut inner: parking_lot::MutexGuard<'_, Inner>,
    ) -> Option<StreamMessage> {
        let frame = inner.queue.pop_front()?;
        inner.inc.release(frame.head.header.body.len() as u64);
        let grant = inner.inc.take_grant();
        drop(inner);
        self.trace.received(&frame);
        if let (Some(credit), Some(shared)) = (grant, self.shared.upgrade()) {
            shared.send(&self.conn, credit_frame(self.id, credit));
        }
        let (shared, conn, stream, id) = (
            self.shared.clone(),
            Arc::downgrade(&self.conn),
            Arc::downgrade(&self.stream),
            self.id,
        );
        Some(StreamMessage::releasing(frame, move |n| {
            Half::release(&shared, &conn, &stream, id, n)
        }))
    }

    /// A stream message to send, checked against the client's limits, and
    /// what it costs in credit.
    pub(crate) fn outgoing(
        &self,
        body: Vec<u8>,
        payload: Payload,
    ) -> Result<(OutFrame, u64), StreamSendError> {
        let bytes = body.len() as u64 + payload.len() as u64;
        let limits = *self.conn.peer_limits.lock();
        let header = Header {
            call_id: self.id,
            kind: Kind::StreamChunk as i32,
            body,
            ..Default::default()
        };
        if let Err(e) = pagerpc_core::check_head(&header, payload.len() as u64, &limits) {
            return Err(StreamSendError {
                status: Status::resource_exhausted(format!(
                    "stream message refused by the client's limits: {e}"
                )),
                payload,
            });
        }
        Ok((OutFrame { header, payload }, bytes))
    }

    /// Whether `bytes` may go out now: within the stream's credit, and
    /// within the connection's outbound budget
    /// (`max_outbound_bytes_per_conn`): a client that stops reading its
    /// socket stops the stream, it does not grow our queue.
    pub(crate) fn room_for(&self, bytes: u64) -> impl FnMut(&mut Inner) -> bool + '_ {
        move |i| i.out.can_send(bytes) && !self.conn.outbound_full()
    }

    /// Sends a message that [`room_for`](Self::room_for) let through (its
    /// credit already spent).
    pub(crate) fn send_now(&self, frame: OutFrame) -> Result<(), StreamSendError> {
        let Some(shared) = self.shared.upgrade() else {
            return Err(StreamSendError {
                status: Status::unavailable("the server is shutting down"),
                payload: frame.payload,
            });
        };
        let bytes = frame.header.body.len() as u64 + frame.payload.len() as u64;
        shared.send(&self.conn, frame);
        self.trace.sent(bytes);
        Ok(())
    }

    /// Whether the call is still going (not cancelled, connection open).
    pub(crate) fn is_open(&self) -> bool {
        !self.conn.closed.load(Ordering::SeqCst)
            && !self.cancelled.load(Ordering::Relaxed)
            && !matches!(self.stream.inner.lock().client_end, Some(Err(_)))
    }

    /// The handler released `bytes` of what it was handed.
    fn release(
        shared: &Weak<Shared>,
        conn: &Weak<Conn>,
        stream: &Weak<StreamShared>,
        id: u64,
        bytes: u64,
    ) {
        let (Some(shared), Some(conn), Some(stream)) =
            (shared.upgrade(), conn.upgrade(), stream.upgrade())
        else {
            return;
        };
        let grant = {
            let mut inner = stream.inner.lock();
            // Over, or failed on the client's side (its ERROR is sent or
            // on the way): the client may send no more, so credit would
            // only be noise ahead of that ERROR.
            if inner.over || matches!(inner.client_end, Some(Err(_))) {
                return;
            }
            inner.inc.release(bytes);
            inner.inc.take_grant()
        };
        if let Some(credit) = grant {
            if !conn.closed.load(Ordering::SeqCst) {
                shared.send(&conn, credit_frame(id, credit));
            }
        }
    }
}

/// The client's messages on a client-streaming or bidirectional call, as
/// its handler reads them.
pub struct InStream {
    half: Half,
}

impl std::fmt::Debug for InStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InStream")
            .field("id", &self.half.id)
            .finish()
    }
}

impl InStream {
    /// The next message, or `None` once the client ended its messages
    /// (STREAM_END). A stream the client cut short (CANCEL, a lost
    /// connection, the deadline) is an error, never `None`.
    ///
    /// # Errors
    /// The status that cut the stream short.
    pub fn recv(&mut self) -> Result<Option<StreamMessage>, Status> {
        let inner = self.half.wait(Half::message_ready)?;
        Ok(self.half.take_message(inner))
    }

    /// The next message decoded as `T`, with its payload.
    ///
    /// # Errors
    /// As [`recv`](Self::recv), and [`Code::InvalidArgument`](crate::Code::InvalidArgument) for an
    /// undecodable body.
    pub fn recv_typed<T: Message + Default>(&mut self) -> Result<Option<(T, Pages)>, Status> {
        match self.recv()? {
            Some(m) => Ok(Some((m.decode()?, m.payload))),
            None => Ok(None),
        }
    }
}

/// The server's messages on a server-streaming or bidirectional call, as
/// its handler sends them. The handler returning ends the stream (STREAM_END
/// for `Ok`, ERROR for `Err`).
pub struct OutStream {
    half: Half,
}

impl std::fmt::Debug for OutStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutStream")
            .field("id", &self.half.id)
            .finish()
    }
}

/// A stream message that could not be sent: why, and its payload back.
#[derive(Debug)]
pub struct StreamSendError {
    /// Why.
    pub status: Status,
    /// The payload, handed back.
    pub payload: Payload,
}

impl std::fmt::Display for StreamSendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream message not sent: {}", self.status)
    }
}

impl std::error::Error for StreamSendError {}

impl From<StreamSendError> for Status {
    fn from(e: StreamSendError) -> Status {
        e.status
    }
}

impl OutStream {
    /// Sends one message, waiting while the client has given no credit for
    /// it (its consumer has not released enough of what it got).
    ///
    /// # Errors
    /// When the client cancelled, the connection closed or the deadline
    /// passed; the error hands the payload back.
    pub fn send<T: Message>(
        &mut self,
        msg: &T,
        payload: impl Into<Payload>,
    ) -> Result<(), StreamSendError> {
        self.send_raw(msg.encode_to_vec(), payload.into())
    }

    /// [`send`](Self::send) with an already encoded body.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub fn send_raw(&mut self, body: Vec<u8>, payload: Payload) -> Result<(), StreamSendError> {
        let h = &self.half;
        let (frame, bytes) = h.outgoing(body, payload)?;
        match h.wait(h.room_for(bytes)) {
            Ok(mut inner) => inner.out.spend(bytes),
            Err(status) => {
                return Err(StreamSendError {
                    status,
                    payload: frame.payload,
                })
            }
        }
        h.send_now(frame)
    }

    /// Whether the call is still going (not cancelled, connection open).
    pub fn is_open(&self) -> bool {
        self.half.is_open()
    }
}
