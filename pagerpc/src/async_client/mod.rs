//! The async client on tokio: [`AsyncClient`], many calls in flight from
//! many tasks over one connection.
//!
//! # Tasks
//!
//! One *driver* task per connection (spawned on the runtime by
//! [`AsyncClient::connect`]) owns reading: it waits on the socket through
//! [`tokio::io::unix::AsyncFd`] (readable and error readiness always,
//! writable while bytes wait to be written), reads frames with the
//! receiver's non-blocking `poll_frame`, and hands each one to its call
//! through the sans-IO [`ClientConn`] (see `driver.rs`).
//!
//! Callers send themselves: a call encodes its request into the sender and
//! writes as much as the socket takes at once, without waiting and without
//! a task hop; what the socket does not take is written by the driver when
//! the socket becomes writable (see `send.rs`).
//!
//! # Cancellation
//!
//! Dropping a call's future (or a stream handle) before it completes ends
//! the call: a request of which nothing was written is taken back, and a
//! call the server may have seen gets a CANCEL, so its handler sees
//! `is_cancelled()`. The call's slot is released at once either way.

mod driver;
mod send;
mod stream;

pub use stream::{AsyncStreamReceiver, AsyncStreamResponse, AsyncStreamSender};

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use pagerpc_core::conn::{ClientConn, PeerSettings};
use pagerpc_core::{Counters, CountersSnapshot, Header, Kind, Status};
use pagerpc_pages::Payload;
use pagerpc_receiver::Frame;
use pagerpc_sender::{OutFrame, QueueMark, Sender};

use crate::client::{CallOptions, ClientConfig, Response};
use crate::error::CallError;
use crate::intercept::{ClientInterceptor, ClientInterceptors, OutgoingCall};
use crate::sys;
use crate::trace::{CallTrace, Side};

/// The send half and what waits to go into it.
struct Tx {
    sender: Sender,
    /// Frames not yet handed to the sender (it was busy with another
    /// frame): nothing of them is written, so they can be taken back whole.
    backlog: VecDeque<(u64, OutFrame)>,
    /// The one frame in the sender that may not be fully written yet, and
    /// where it starts: a frame goes into the sender only when no other
    /// frame is left in it, so it can be taken back while untouched.
    last: Option<(u64, QueueMark)>,
}

/// One call's slot in the [`ClientConn`].
struct Slot {
    /// A unary call's answer.
    result: Option<Result<Frame, Status>>,
    /// The payload of a request the sender refused after the caller
    /// handed it over (it is handed back with the error).
    refused: Option<Payload>,
    /// The task waiting for the answer (or, for a stream, for a message).
    waker: Option<Waker>,
    /// A streaming call's state.
    stream: Option<Box<stream::StreamState>>,
    /// Frames of this call handed to the send path.
    submitted: usize,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            result: None,
            refused: None,
            waker: None,
            stream: None,
            submitted: 0,
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        if let Some(s) = self.stream.as_mut() {
            s.wake_sender();
        }
    }
}

struct State {
    calls: ClientConn<Slot>,
    /// What the server announced in its SETTINGS (defaults until then).
    peer: PeerSettings,
    /// CREDIT frames made while the send half was held (a payload's
    /// release hook can run inside the sender, e.g. when a received page
    /// is sent on and its last handle drops there); the driver queues them.
    control: Vec<OutFrame>,
}

struct Shared {
    fd: Arc<OwnedFd>,
    tx: Mutex<Tx>,
    state: Mutex<State>,
    counters: Arc<Counters>,
    cfg: ClientConfig,
    peer: SocketAddr,
    /// Wakes the driver: bytes wait to be written, or the client is gone.
    notify: Notify,
    /// The last [`AsyncClient`] was dropped (or closed).
    closing: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("peer", &self.peer).finish()
    }
}

/// Ends the driver when the last [`AsyncClient`] clone is dropped.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closing.store(true, SeqCst);
        self.shared.notify.notify_one();
    }
}

/// An async connection to a pagerpc server, on tokio (feature `tokio`).
///
/// Cheap to clone; clones share the connection, and many tasks may have
/// calls in flight on it at once. The connection closes when the last
/// clone, and the last stream handle, is dropped.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use pagerpc::proto::MetadataEntry;
/// use pagerpc::AsyncClient;
///
/// let client = AsyncClient::connect("127.0.0.1:7000").await?;
/// let req = MetadataEntry { key: "hello".into(), value: vec![] };
/// let resp = client
///     .call::<_, MetadataEntry>("echo", &req, vec![7u8; 1 << 20])
///     .await?;
/// assert_eq!(resp.payload.len(), 1 << 20);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AsyncClient {
    handle: Arc<Handle>,
    /// Run on every call made through this handle
    /// ([`AsyncClient::with_interceptor`]).
    interceptors: ClientInterceptors,
}

impl AsyncClient {
    /// Connects to `addr` with default settings.
    ///
    /// # Errors
    /// As [`connect_with`](Self::connect_with).
    pub async fn connect(
        addr: impl ToSocketAddrs + Send + 'static,
    ) -> std::io::Result<AsyncClient> {
        AsyncClient::connect_with(addr, ClientConfig::default()).await
    }

    /// Connects to `addr` with `cfg`: the connect, the authentication
    /// handshake and SETTINGS run on a blocking thread
    /// (`spawn_blocking`), as [`Client::connect_with`](crate::Client::connect_with) runs them; then
    /// the connection's driver task is spawned on the current runtime.
    ///
    /// # Errors
    /// When the address does not resolve, the connection or the handshake
    /// fails (as for the blocking client), or the socket cannot be
    /// registered with the runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn connect_with(
        addr: impl ToSocketAddrs + Send + 'static,
        cfg: ClientConfig,
    ) -> std::io::Result<AsyncClient> {
        let c = cfg.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let stream = crate::client::connect_socket(addr, &c)?;
            crate::client::open_stream(stream, &c, true)
        })
        .await
        .map_err(std::io::Error::other)??;
        let afd = sys::register_async(opened.fd.clone())?;
        let shared = Arc::new(Shared {
            fd: opened.fd,
            tx: Mutex::new(Tx {
                sender: opened.sender,
                backlog: VecDeque::new(),
                last: None,
            }),
            state: Mutex::new(State {
                calls: ClientConn::new(),
                peer: PeerSettings::default(),
                control: Vec::new(),
            }),
            counters: opened.counters,
            cfg,
            peer: opened.peer,
            notify: Notify::new(),
            closing: AtomicBool::new(false),
        });
        tokio::spawn(driver::run(shared.clone(), opened.receiver, afd));
        Ok(AsyncClient {
            handle: Arc::new(Handle { shared }),
            interceptors: ClientInterceptors::default(),
        })
    }

    /// This client with `interceptor` added after the ones it has, as
    /// [`Client::with_interceptor`](crate::Client::with_interceptor): it
    /// sees every call (unary and streams) made through the returned
    /// handle and its clones, and may add metadata or refuse the call.
    pub fn with_interceptor(self, interceptor: impl ClientInterceptor) -> AsyncClient {
        AsyncClient {
            interceptors: self.interceptors.with(Arc::new(interceptor)),
            handle: self.handle,
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared().peer
    }

    /// The MSS the connection uses (`TCP_MAXSEG`).
    ///
    /// # Errors
    /// If the socket cannot be queried.
    pub fn mss(&self) -> std::io::Result<u32> {
        sys::current_mss(self.shared().fd.as_fd())
    }

    /// This connection's transfer counters.
    pub fn counters(&self) -> CountersSnapshot {
        self.shared().counters.snapshot()
    }

    /// Zero-copy send statistics of this connection.
    pub fn zerocopy_send_stats(&self) -> pagerpc_sender::ZcSendStats {
        self.shared().tx.lock().sender.zerocopy_stats()
    }

    /// Number of calls (streams included) in flight.
    pub fn pending_calls(&self) -> usize {
        self.shared().state.lock().calls.len()
    }

    /// Closes the connection: every pending call fails with
    /// [`Code::Cancelled`](crate::Code::Cancelled), and so does every
    /// later one.
    pub fn close(&self) {
        let shared = self.shared();
        shared.fail_all(Status::cancelled("client closed the connection"));
        sys::shutdown(shared.fd.as_fd());
        shared.closing.store(true, SeqCst);
        shared.notify.notify_one();
    }

    /// Calls `method` with a typed request and payload, and waits for the
    /// typed response.
    ///
    /// Dropping the future before it completes cancels the call (see the
    /// type's documentation).
    ///
    /// # Errors
    /// A [`CallError`] with the server's status, or with
    /// [`Code::DeadlineExceeded`](crate::Code::DeadlineExceeded),
    /// [`Code::Unavailable`](crate::Code::Unavailable) (connection failed
    /// or closed), [`Code::InvalidArgument`](crate::Code::InvalidArgument)
    /// (the request breaks the server's limits),
    /// [`Code::Internal`](crate::Code::Internal) (undecodable response).
    /// If nothing of the request was written, the error hands the payload
    /// back ([`CallError::take_payload`]).
    pub fn call<'a, Req: Message, Resp: Message + Default + 'a>(
        &'a self,
        method: &'a str,
        req: &Req,
        payload: impl Into<Payload>,
    ) -> impl Future<Output = Result<Response<Resp>, CallError>> + Send + 'a {
        self.typed(method, req.encode_to_vec(), payload.into(), None)
    }

    /// [`call`](Self::call) with per-call options. The timeout is measured
    /// with the runtime's clock ([`tokio::time`]) and sent to the server as
    /// the call's remaining budget, as the blocking client does.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub fn call_with<'a, Req: Message, Resp: Message + Default + 'a>(
        &'a self,
        method: &'a str,
        req: &Req,
        payload: impl Into<Payload>,
        opts: &'a CallOptions,
    ) -> impl Future<Output = Result<Response<Resp>, CallError>> + Send + 'a {
        self.typed(method, req.encode_to_vec(), payload.into(), Some(opts))
    }

    async fn typed<Resp: Message + Default>(
        &self,
        method: &str,
        body: Vec<u8>,
        payload: Payload,
        opts: Option<&CallOptions>,
    ) -> Result<Response<Resp>, CallError> {
        let default = CallOptions::default();
        let frame = self
            .call_raw(method, body, payload, opts.unwrap_or(&default))
            .await?;
        decode_response(frame)
    }

    /// Calls `method` with an already encoded request body and returns the
    /// response frame (its body undecoded).
    ///
    /// # Errors
    /// As [`call`](Self::call), without the decoding.
    pub async fn call_raw(
        &self,
        method: &str,
        body: Vec<u8>,
        payload: impl Into<Payload>,
        opts: &CallOptions,
    ) -> Result<Frame, CallError> {
        let payload = payload.into();
        let trace = CallTrace::start(Side::Client, method, 0, std::time::Instant::now());
        let (id, deadline) = match self.open(method, body, payload, opts, None, &trace) {
            Ok(x) => x,
            Err(e) => {
                trace.status(e.code());
                return Err(e);
            }
        };
        let mut call = CallGuard {
            shared: self.shared().clone(),
            id,
            done: false,
        };
        let mut sleep = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        // A future dropped here leaves the span without a status: the call
        // was given up (the guard sends CANCEL).
        let r = poll_fn(|cx| call.poll_answer(cx, &mut sleep)).await;
        match &r {
            Ok(frame) => {
                trace.received(frame);
                trace.status(crate::Code::Ok);
            }
            Err(e) => trace.status(e.code()),
        }
        r
    }

    /// Starts a call and hands its REQUEST to the sender. `stream` is
    /// `None` for a unary call, `Some(client_stream)` for a streaming one.
    /// Returns the call id and its deadline.
    fn open(
        &self,
        method: &str,
        body: Vec<u8>,
        payload: Payload,
        opts: &CallOptions,
        stream: Option<bool>,
        trace: &CallTrace,
    ) -> Result<(u64, Option<Instant>), CallError> {
        let shared = self.shared();
        let timeout = opts.timeout.or(shared.cfg.default_timeout);
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut metadata = opts.metadata.clone();
        let call = &mut OutgoingCall::new(
            method,
            &mut metadata,
            deadline.map(Instant::into_std),
            stream.is_some(),
        );
        if let Err(status) = self.interceptors.run(call) {
            return Err(CallError::with_payload(status, payload));
        }
        let started = {
            let mut st = shared.state.lock();
            let mut slot = Slot::new();
            if let Some(client_stream) = stream {
                slot.stream = Some(Box::new(stream::StreamState::new(
                    st.peer.stream_window,
                    shared.cfg.stream_window,
                    client_stream,
                )));
            }
            st.calls.start(slot)
        };
        let id = match started {
            Ok(id) => id,
            Err(dead) => return Err(CallError::with_payload(dead, payload)),
        };
        trace.set_call_id(id);
        let bytes = body.len() as u64 + payload.len() as u64;
        let header = Header {
            call_id: id,
            kind: Kind::Request as i32,
            method: method.to_owned(),
            deadline_us: timeout.map_or(0, |t| (t.as_micros() as u64).max(1)),
            metadata,
            body,
            client_stream: stream.unwrap_or(false),
            ..Default::default()
        };
        if let Err(e) = shared.submit(id, OutFrame { header, payload }) {
            shared.state.lock().calls.end(id);
            return Err(e);
        }
        trace.sent(bytes);
        Ok((id, deadline))
    }
}

/// Decodes a response frame's body as `Resp`.
fn decode_response<Resp: Message + Default>(frame: Frame) -> Result<Response<Resp>, CallError> {
    let message = Resp::decode(frame.head.header.body.as_slice()).map_err(|e| {
        CallError::new(Status::internal(format!(
            "undecodable response message: {e}"
        )))
    })?;
    Ok(Response {
        message,
        payload: frame.payload,
        metadata: frame.head.header.metadata,
    })
}

/// A unary call in flight; dropping it before the answer ends the call.
struct CallGuard {
    shared: Arc<Shared>,
    id: u64,
    done: bool,
}

impl CallGuard {
    /// The answer, once it is there; the deadline's error once `sleep`
    /// fires.
    fn poll_answer(
        &mut self,
        cx: &mut Context<'_>,
        sleep: &mut Option<Pin<Box<Sleep>>>,
    ) -> Poll<Result<Frame, CallError>> {
        {
            let mut st = self.shared.state.lock();
            let dead = st.calls.dead().cloned();
            let Some(slot) = st.calls.get_mut(self.id) else {
                self.done = true;
                return Poll::Ready(Err(CallError::new(
                    dead.unwrap_or_else(|| Status::internal("unknown call")),
                )));
            };
            if let Some(r) = slot.result.take() {
                let refused = slot.refused.take();
                st.calls.end(self.id);
                drop(st);
                self.done = true;
                return Poll::Ready(match (r, refused) {
                    (Ok(f), _) => Ok(f),
                    (Err(s), Some(p)) => Err(CallError::with_payload(s, p)),
                    (Err(s), None) => Err(CallError::new(s)),
                });
            }
            if dead.is_none() {
                slot.waker = Some(cx.waker().clone());
            }
            if let Some(dead) = dead {
                drop(st);
                return Poll::Ready(Err(self.give_up(dead)));
            }
        }
        if let Some(s) = sleep.as_mut() {
            if s.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(self.give_up(Status::deadline_exceeded(
                    "deadline exceeded waiting for the response",
                ))));
            }
        }
        Poll::Pending
    }

    /// Ends the call with `status`, taking the request back if nothing of
    /// it was written.
    fn give_up(&mut self, status: Status) -> CallError {
        self.done = true;
        match self.shared.abandon(self.id) {
            Some(p) => CallError::with_payload(status, p),
            None => CallError::new(status),
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.done {
            self.shared.abandon(self.id);
        }
    }
}

impl Shared {
    /// The status the connection died with, if it did.
    fn dead(&self) -> Option<Status> {
        self.state.lock().calls.dead().cloned()
    }

    /// The connection failed: every call fails with `status`.
    fn fail_all(&self, status: Status) {
        let mut st = self.state.lock();
        st.calls.fail(status);
        // Wake every waiting task; each sees the connection dead.
        for slot in st.calls.tokens() {
            if let Some(w) = &slot.waker {
                w.wake_by_ref();
            }
            if let Some(s) = &slot.stream {
                s.wake_sender_by_ref();
            }
        }
    }
}
