//! The RPC client: many concurrent calls multiplexed on one connection.
//!
//! There is no background thread. A caller that waits for its response and
//! finds nobody reading the socket becomes the *reader*: it reads frames and
//! hands each response to the caller waiting for it, until its own response
//! arrives; then it passes the reader role to another waiting caller. A
//! single caller therefore reads its own response with no thread hand-off,
//! and many callers share one reader.
//!
//! # Sending
//!
//! A caller sends its request itself, holding the sender lock for the whole
//! request. The sender never blocks in the kernel (`MSG_DONTWAIT`); while
//! the socket takes no more, the caller waits for it to become writable
//! *or readable*, and when it is readable and nobody holds the reader role,
//! it takes the role, reads what is there without blocking, hands the
//! frames out as the reader does, and gives the role back (see
//! `send.rs`). So one thread that starts many large calls before waiting on
//! any cannot deadlock with a server that stops reading until its responses
//! are read. When another thread holds the reader role, the sending caller
//! waits for the socket to become writable or for the `wake` eventfd, which
//! is raised when the role is given back or the connection fails.
//!
//! The call's deadline bounds the send, including the wait for the sender
//! lock. A request of which nothing was written by then is handed back
//! ([`CallError::take_payload`]) and the connection stays usable; one cut
//! short fails the connection, since the stream is then broken. CANCEL
//! frames never wait: they are queued, written as far as the socket takes
//! them, and the rest is written by the next send, or by the reader after
//! each frame it reads.
//!
//! # Lock order
//!
//! `sender` → `receiver` → `state`:
//!
//! - `state` is taken last, only briefly, and never held across a blocking
//!   call (condition variables release it while they wait).
//! - `receiver` is locked only by the holder of the reader role, a flag in
//!   `state` (not a lock: taking it never waits), and briefly by
//!   [`Client::zerocopy_receive`], which holds nothing else.
//! - A thread holding `receiver` takes `sender` only with `try_lock`, so a
//!   sender that reads (holding `sender`, then `receiver`) cannot deadlock
//!   with a reader that writes queued CANCEL frames.

mod batch;
mod read;
mod send;
mod stream;

pub use batch::CallBatch;
pub use stream::{StreamMessage, StreamReceiver, StreamResponse, StreamSender};

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use prost::Message;

use pagerpc_core::conn::{ClientConn, Incoming, PeerSettings};
use pagerpc_core::{Code, Counters, CountersSnapshot, Header, Kind, Limits, MetadataEntry, Status};
use pagerpc_pages::{Pages, Payload};
use pagerpc_receiver::{Frame, Receiver, RecvConfig, RecvError};
use pagerpc_sender::{OutFrame, SendConfig, Sender};

use crate::error::CallError;
use crate::intercept::{ClientInterceptor, ClientInterceptors, OutgoingCall};
use crate::segments::SegmentAlign;
use crate::sys;
use crate::trace::{CallTrace, ConnTrace, Side};

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Limits for frames from the server.
    pub limits: Limits,
    /// Send settings (inline threshold, write timeout, the server's limits).
    pub send: SendConfig,
    /// Receive settings (backend, read buffer).
    pub recv: RecvConfig,
    /// Deadline applied to calls that set none. Default: none.
    pub default_timeout: Option<Duration>,
    /// How long `connect` may take. Default 10 s.
    pub connect_timeout: Duration,
    /// TCP segment sizing (page-aligned segments on loopback by default).
    pub segments: SegmentAlign,
    /// The pre-shared key of a server that requires authentication
    /// (`ServerConfig::auth_key`); the handshake runs inside `connect`.
    pub auth_key: Option<Arc<[u8]>>,
    /// Bytes of stream messages the server may send on one stream before
    /// this client gives credit back (announced in SETTINGS). Default
    /// 8 MiB.
    ///
    /// # Memory cost
    /// A stream whose consumer stops reading holds at most this much (plus
    /// one message larger than the window) on the client.
    pub stream_window: u64,
    /// Bytes of separate payloads the server may have sent that this
    /// client has not read out of its socket yet (announced in SETTINGS;
    /// credit goes back as the client reads). Keeps the client's receive
    /// window open so segments stay page-aligned and mappable. Default
    /// 2 MiB; 0 announces none.
    pub conn_window: u64,
}

impl ClientConfig {
    /// Settings for zero-copy both ways: `MSG_ZEROCOPY` sends and
    /// `TCP_ZEROCOPY_RECEIVE` receives.
    pub fn zerocopy() -> ClientConfig {
        let mut c = ClientConfig::default();
        c.send.zerocopy = true;
        c.recv.backend = pagerpc_receiver::Backend::ZeroCopy;
        c
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            limits: Limits::default(),
            send: SendConfig::default(),
            recv: RecvConfig::default(),
            default_timeout: None,
            connect_timeout: Duration::from_secs(10),
            segments: SegmentAlign::Auto,
            auth_key: None,
            stream_window: pagerpc_core::conn::DEFAULT_STREAM_WINDOW,
            conn_window: pagerpc_core::conn::DEFAULT_CONN_WINDOW,
        }
    }
}

/// Per-call options.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// Give up after this long; the server is told the remaining budget.
    pub timeout: Option<Duration>,
    /// Metadata sent with the request.
    pub metadata: Vec<MetadataEntry>,
}

/// A successful response.
#[derive(Debug)]
pub struct Response<T> {
    /// The decoded response message.
    pub message: T,
    /// The response payload.
    pub payload: Pages,
    /// Metadata the server sent.
    pub metadata: Vec<MetadataEntry>,
}

type CallResult = Result<Frame, Status>;

struct Slot {
    result: Option<CallResult>,
    /// Whether a caller is blocked on `cv` (so the reader role can be passed
    /// to it).
    waiting: bool,
    cv: Arc<Condvar>,
    /// A streaming call's state; `None` for unary calls and pings.
    stream: Option<Box<stream::StreamSlot>>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            result: None,
            waiting: false,
            cv: Arc::new(Condvar::new()),
            stream: None,
        }
    }
}

#[derive(Default)]
struct State {
    /// Call ids, waiting calls and the connection's death: the sans-IO
    /// client state machine.
    calls: ClientConn<Slot>,
    reader_active: bool,
    /// The thread holding the sender lock waits for the socket while
    /// another thread holds the reader role: raise `Shared::wake` when the
    /// role is given back or the connection fails.
    send_waiting: bool,
    /// CANCEL and CREDIT frames not yet queued in the sender (its lock was
    /// busy).
    control: Vec<OutFrame>,
    /// What the server announced in its SETTINGS (defaults until then).
    peer: PeerSettings,
    /// `peer` changed and the sender's limits are not updated yet.
    peer_changed: bool,
    /// Connection credit the server gave back, not yet handed to the
    /// sender.
    conn_granted: u64,
    /// Separate payload bytes read and not yet given back to the server
    /// as connection credit.
    conn_unreported: u64,
}

struct Shared {
    fd: Arc<OwnedFd>,
    sender: Mutex<Sender>,
    receiver: Mutex<Receiver>,
    state: Mutex<State>,
    counters: Arc<Counters>,
    cfg: ClientConfig,
    peer: SocketAddr,
    /// Wakes a sending thread that waits for the socket while another
    /// thread reads (see `State::send_waiting`).
    wake: sys::Signal,
    /// `State::control` may hold frames: whoever lets go of the sender lock
    /// queues and writes them.
    control_waiting: AtomicBool,
    /// The sender holds bytes (CANCEL frames) that no sending thread is
    /// waiting to write; the reader writes them when it can.
    backlog: AtomicBool,
    /// Connection open/close events (feature `tracing`).
    trace: ConnTrace,
}

/// A connection to a pagerpc server. Cheap to clone; clones share the
/// connection. Safe to use from many threads at once.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    /// Run on every call made through this handle
    /// ([`Client::with_interceptor`]).
    interceptors: ClientInterceptors,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.shared.peer)
            .finish()
    }
}

impl Client {
    /// Connects to `addr` with default settings.
    ///
    /// # Errors
    /// When the address does not resolve or the connection fails.
    pub fn connect(addr: impl ToSocketAddrs) -> std::io::Result<Client> {
        Client::connect_with(addr, ClientConfig::default())
    }

    /// Connects to `addr` with `cfg`.
    ///
    /// # Errors
    /// When the address does not resolve or the connection fails.
    pub fn connect_with(addr: impl ToSocketAddrs, cfg: ClientConfig) -> std::io::Result<Client> {
        let stream = connect_socket(addr, &cfg)?;
        Client::from_stream(stream, cfg)
    }

    /// Wraps an already connected stream.
    ///
    /// # Errors
    /// When the socket cannot be configured, or (with
    /// [`ClientConfig::auth_key`]) the handshake fails: the server refused
    /// the key, offered no challenge, or could not prove it holds the key
    /// ([`std::io::ErrorKind::PermissionDenied`], with the reason).
    pub fn from_stream(stream: TcpStream, cfg: ClientConfig) -> std::io::Result<Client> {
        let Opened {
            fd,
            peer,
            counters,
            sender,
            receiver,
        } = open_stream(stream, &cfg, false)?;
        let shared = Shared {
            sender: Mutex::new(sender),
            receiver: Mutex::new(receiver),
            fd,
            state: Mutex::new(State::default()),
            counters,
            cfg,
            peer,
            wake: sys::Signal::new()?,
            control_waiting: AtomicBool::new(false),
            backlog: AtomicBool::new(false),
            trace: ConnTrace::open(Side::Client, peer),
        };
        Ok(Client {
            shared: Arc::new(shared),
            interceptors: ClientInterceptors::default(),
        })
    }

    /// This client with `interceptor` added after the ones it has: it sees
    /// every call made through the returned handle and the handles cloned
    /// from it (unary calls and all three kinds of stream), and may add
    /// metadata or refuse the call (see [`crate::intercept`]). The handle
    /// shares the connection with `self`; calls made through handles
    /// without the interceptor do not run it. Generated clients built on
    /// the returned handle run it too.
    pub fn with_interceptor(self, interceptor: impl ClientInterceptor) -> Client {
        Client {
            interceptors: self.interceptors.with(Arc::new(interceptor)),
            shared: self.shared,
        }
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.peer
    }

    /// The MSS the connection uses (`TCP_MAXSEG`).
    ///
    /// # Errors
    /// If the socket cannot be queried.
    pub fn mss(&self) -> std::io::Result<u32> {
        sys::current_mss(self.shared.fd.as_fd())
    }

    /// Waits (up to `timeout`) until the kernel is done with every payload
    /// this connection sent with `MSG_ZEROCOPY`, releasing them. Returns
    /// whether none is left.
    ///
    /// # Errors
    /// If reading the socket's error queue fails.
    pub fn flush_zerocopy(&self, timeout: Duration) -> std::io::Result<bool> {
        let mut tx = self.shared.sender.lock();
        let r = tx.flush_zerocopy(timeout);
        self.shared.release_sender(tx);
        r
    }

    /// Zero-copy send statistics of this connection.
    pub fn zerocopy_send_stats(&self) -> pagerpc_sender::ZcSendStats {
        let tx = self.shared.sender.lock();
        let stats = tx.zerocopy_stats();
        self.shared.release_sender(tx);
        stats
    }

    /// Whether zero-copy receive is on for this connection, and if it was
    /// configured but given up, why.
    pub fn zerocopy_receive(&self) -> (bool, Option<String>) {
        let rx = self.shared.receiver.lock();
        (
            rx.zerocopy_active(),
            rx.zerocopy_off_reason().map(str::to_owned),
        )
    }

    /// This connection's transfer counters.
    pub fn counters(&self) -> CountersSnapshot {
        self.shared.counters.snapshot()
    }

    /// Calls `method` with a typed request and payload, and waits for the
    /// typed response.
    ///
    /// # Errors
    /// A [`CallError`] with the server's status, or with
    /// [`Code::DeadlineExceeded`](crate::Code::DeadlineExceeded), [`Code::Unavailable`](crate::Code::Unavailable) (connection failed
    /// or closed), [`Code::Internal`](crate::Code::Internal) (undecodable response). If the request
    /// was not sent, the error hands the payload back.
    pub fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
        payload: impl Into<Payload>,
    ) -> Result<Response<Resp>, CallError> {
        self.call_with(method, req, payload, &CallOptions::default())
    }

    /// [`call`](Self::call) with per-call options.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub fn call_with<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
        payload: impl Into<Payload>,
        opts: &CallOptions,
    ) -> Result<Response<Resp>, CallError> {
        self.start_call(method, req.encode_to_vec(), payload, opts)?
            .wait_typed()
    }

    /// Sends a request with an already-encoded body and returns a handle to
    /// wait on, so one thread can keep many calls in flight.
    ///
    /// # Errors
    /// As [`call`](Self::call), for failures before the request is sent.
    pub fn start_call(
        &self,
        method: &str,
        body: Vec<u8>,
        payload: impl Into<Payload>,
        opts: &CallOptions,
    ) -> Result<PendingCall, CallError> {
        let (id, deadline, trace) = self.open_call(method, body, payload.into(), opts, None)?;
        Ok(PendingCall {
            shared: self.shared.clone(),
            id,
            deadline,
            done: false,
            trace,
        })
    }

    /// Starts a call and sends its REQUEST. `stream` is `None` for a
    /// unary call, `Some(client_stream)` for a streaming one (its slot gets
    /// the stream's state; `client_stream` says whether the client sends
    /// messages after the REQUEST). Runs the interceptors first. Returns
    /// the call id, its deadline and its trace.
    fn open_call(
        &self,
        method: &str,
        body: Vec<u8>,
        payload: Payload,
        opts: &CallOptions,
        stream: Option<bool>,
    ) -> Result<(u64, Option<Instant>, CallTrace), CallError> {
        let call = self.prepare_call(method, body, payload, opts, stream)?;
        let bytes = call.bytes;
        if let Err(e) = self.shared.send_request(call.frame, call.deadline) {
            self.shared.state.lock().calls.end(call.id);
            call.trace.status(e.code());
            return Err(e);
        }
        call.trace.sent(bytes);
        Ok((call.id, call.deadline, call.trace))
    }

    /// Runs the interceptors, takes a call id and builds the REQUEST
    /// frame, without sending it.
    fn prepare_call(
        &self,
        method: &str,
        body: Vec<u8>,
        payload: Payload,
        opts: &CallOptions,
        stream: Option<bool>,
    ) -> Result<Prepared, CallError> {
        let now = Instant::now();
        let timeout = opts.timeout.or(self.shared.cfg.default_timeout);
        let deadline = timeout.map(|t| now + t);
        let trace = CallTrace::start(Side::Client, method, 0, now);
        let mut metadata = opts.metadata.clone();
        let call = &mut OutgoingCall::new(method, &mut metadata, deadline, stream.is_some());
        if let Err(status) = self.interceptors.run(call) {
            trace.status(status.code());
            return Err(CallError::with_payload(status, payload));
        }
        let started = {
            let mut st = self.shared.state.lock();
            let mut slot = Slot::new();
            if let Some(client_stream) = stream {
                slot.stream = Some(Box::new(stream::StreamSlot::new(
                    st.peer.stream_window,
                    self.shared.cfg.stream_window,
                    client_stream,
                )));
            }
            st.calls.start(slot)
        };
        let id = match started {
            Ok(id) => id,
            Err(dead) => {
                trace.status(dead.code());
                return Err(CallError::with_payload(dead, payload));
            }
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
        Ok(Prepared {
            id,
            deadline,
            trace,
            bytes,
            frame: OutFrame { header, payload },
        })
    }

    /// Sends a PING and waits for the PONG; returns the round-trip time.
    /// `timeout` bounds the whole exchange, sending included.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub fn ping(&self, timeout: Duration) -> Result<Duration, CallError> {
        let t0 = Instant::now();
        let started = self.shared.state.lock().calls.start(Slot::new());
        let id = started.map_err(CallError::new)?;
        let header = Header {
            call_id: id,
            kind: Kind::Ping as i32,
            ..Default::default()
        };
        let deadline = t0 + timeout;
        let frame = OutFrame {
            header,
            payload: Payload::Empty,
        };
        if let Err(e) = self.shared.send_request(frame, Some(deadline)) {
            self.shared.state.lock().calls.end(id);
            return Err(CallError::new(e.status().clone()));
        }
        let call = PendingCall {
            shared: self.shared.clone(),
            id,
            deadline: Some(deadline),
            done: false,
            trace: CallTrace::default(),
        };
        call.wait()?;
        Ok(t0.elapsed())
    }

    /// Number of calls waiting for a response.
    pub fn pending_calls(&self) -> usize {
        self.shared.state.lock().calls.len()
    }

    /// Closes the connection: every pending call fails with
    /// [`Code::Cancelled`](crate::Code::Cancelled).
    pub fn close(&self) {
        self.shared
            .fail_all(Status::cancelled("client closed the connection"));
        sys::shutdown(self.shared.fd.as_fd());
    }
}

/// A REQUEST built and given its call id, not sent yet.
struct Prepared {
    id: u64,
    deadline: Option<Instant>,
    trace: CallTrace,
    /// Body and payload bytes, for the trace.
    bytes: u64,
    frame: OutFrame,
}

/// A call in flight. Dropping it without waiting cancels the call.
#[derive(Debug)]
pub struct PendingCall {
    shared: Arc<Shared>,
    id: u64,
    deadline: Option<Instant>,
    done: bool,
    /// The call's span (feature `tracing`).
    trace: CallTrace,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("peer", &self.peer).finish()
    }
}

impl PendingCall {
    /// The call id on the wire.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the response (or the call's failure) is here, so
    /// [`wait`](Self::wait) returns without blocking. Never reads the
    /// socket itself: responses are read by whoever waits.
    pub fn is_ready(&self) -> bool {
        let st = self.shared.state.lock();
        st.calls.dead().is_some()
            || st
                .calls
                .get(self.id)
                .is_none_or(|slot| slot.result.is_some())
    }

    /// Waits for the response and decodes its message as `Resp`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn wait_typed<Resp: Message + Default>(mut self) -> Result<Response<Resp>, CallError> {
        let r = self.wait_frame().and_then(|frame| {
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
        });
        self.trace
            .status(r.as_ref().map_or_else(CallError::code, |_| Code::Ok));
        r
    }

    /// Waits for the response frame.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn wait(mut self) -> Result<Frame, CallError> {
        let r = self.wait_frame();
        self.trace
            .status(r.as_ref().map_or_else(CallError::code, |_| Code::Ok));
        r
    }

    fn wait_frame(&mut self) -> Result<Frame, CallError> {
        self.done = true;
        let r = self.shared.wait(self.id, self.deadline);
        if let Ok(frame) = &r {
            self.trace.received(frame);
        }
        r.map_err(CallError::new)
    }

    /// Gives up on the call and tells the server so.
    pub fn cancel(mut self) {
        self.done = true;
        self.trace.status(Code::Cancelled);
        self.shared.cancel(self.id);
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if !self.done {
            self.shared.cancel(self.id);
        }
    }
}

impl Shared {
    fn wait(&self, id: u64, deadline: Option<Instant>) -> Result<Frame, Status> {
        let mut st = self.state.lock();
        loop {
            let State {
                calls,
                reader_active,
                ..
            } = &mut *st;
            let dead = calls.dead().cloned();
            let Some(slot) = calls.get_mut(id) else {
                // Removed by a cancel, or never existed.
                return Err(dead.unwrap_or_else(|| Status::internal("unknown call")));
            };
            if let Some(r) = slot.result.take() {
                calls.end(id);
                return r;
            }
            if let Some(dead) = dead {
                calls.end(id);
                return Err(dead);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                calls.end(id);
                drop(st);
                self.send_cancel(id);
                return Err(Status::deadline_exceeded(
                    "deadline exceeded waiting for the response",
                ));
            }
            if !*reader_active {
                *reader_active = true;
                drop(st);
                self.read_until(id, deadline);
                st = self.state.lock();
                self.release_reader(&mut st);
                continue;
            }
            let cv = slot.cv.clone();
            slot.waiting = true;
            match deadline {
                Some(d) => {
                    cv.wait_until(&mut st, d);
                }
                None => cv.wait(&mut st),
            }
            if let Some(slot) = st.calls.get_mut(id) {
                slot.waiting = false;
            }
        }
    }

    fn deliver(&self, id: u64, r: CallResult) {
        let mut st = self.state.lock();
        // Responses to calls that gave up (deadline, cancel) are dropped here.
        if let Some(slot) = st.calls.get_mut(id) {
            match slot.stream.as_mut() {
                Some(stream) => stream.end(r),
                None => slot.result = Some(r),
            }
            slot.cv.notify_one();
        }
    }

    fn fail_all(&self, status: Status) {
        self.trace.closed(&status);
        let mut st = self.state.lock();
        st.calls.fail(status);
        for slot in st.calls.tokens() {
            slot.cv.notify_one();
        }
        if st.send_waiting {
            self.wake.raise();
        }
    }

    fn cancel(&self, id: u64) {
        if self.state.lock().calls.end(id).is_some() {
            self.send_cancel(id);
        }
    }
}

/// Connects a TCP socket to the first address of `addr` that accepts,
/// with `cfg`'s segment sizing and connect timeout (shared by [`Client`]
/// and the async client).
pub(crate) fn connect_socket(
    addr: impl ToSocketAddrs,
    cfg: &ClientConfig,
) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match sys::connect_with_mss(&a, cfg.segments.mss_for(&a), cfg.connect_timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("address resolved to nothing")))
}

/// A connected client socket after the handshake: authenticated (with a
/// key) and our SETTINGS sent.
pub(crate) struct Opened {
    pub(crate) fd: Arc<OwnedFd>,
    pub(crate) peer: SocketAddr,
    pub(crate) counters: Arc<Counters>,
    pub(crate) sender: Sender,
    pub(crate) receiver: Receiver,
}

/// Configures a connected stream (non-blocking or not), runs the
/// authentication handshake when `cfg` has a key, and sends our SETTINGS
/// (shared by [`Client`] and the async client).
pub(crate) fn open_stream(
    stream: TcpStream,
    cfg: &ClientConfig,
    nonblocking: bool,
) -> std::io::Result<Opened> {
    sys::prepare_stream(&stream, nonblocking)?;
    let peer = stream.peer_addr()?;
    let fd = Arc::new(OwnedFd::from(stream));
    let counters = Arc::new(Counters::new());
    let mut recv_cfg = cfg.recv.clone();
    recv_cfg.limits = cfg.limits;
    let mut sender = Sender::new(fd.clone(), cfg.send.clone(), counters.clone());
    let mut receiver = Receiver::new(fd.clone(), recv_cfg, counters.clone());
    // Payload send requests (Backend::Auto) pass between the halves.
    let link = Arc::new(pagerpc_core::PayloadSendLink::new());
    receiver.set_payload_send_link(link.clone());
    sender.set_payload_send_link(link);
    if let Some(key) = &cfg.auth_key {
        authenticate(key, &mut sender, &mut receiver, cfg.connect_timeout)?;
    }
    // Our limits, for the server to check its responses against. Its
    // own arrive with the first frames we read; until then, calls are
    // checked against the documented defaults.
    let ours =
        PeerSettings::new(cfg.limits, None, cfg.stream_window).with_conn_window(cfg.conn_window);
    let settings = Header {
        kind: Kind::Settings as i32,
        body: ours.encode(),
        ..Default::default()
    };
    sender
        .send(settings, Payload::Empty)
        .map_err(|e| std::io::Error::other(format!("sending SETTINGS failed: {e}")))?;
    Ok(Opened {
        fd,
        peer,
        counters,
        sender,
        receiver,
    })
}

/// Runs the client side of the pre-shared-key handshake (see `auth`).
fn authenticate(
    key: &[u8],
    tx: &mut Sender,
    rx: &mut Receiver,
    timeout: Duration,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let deadline = Some(Instant::now() + timeout);
    let refused = |why: String| Error::new(ErrorKind::PermissionDenied, why);
    let expect_auth = |rx: &mut Receiver, what: &str| -> std::io::Result<Vec<u8>> {
        match rx.recv_frame(deadline) {
            Ok(f) if f.head.kind() == Kind::Auth => Ok(f.head.header.body),
            Ok(f) if f.head.kind() == Kind::Error => Err(refused(format!(
                "authentication refused by the server: {}",
                f.head.header.status_message
            ))),
            Ok(f) if f.head.kind() == Kind::Settings => Err(refused(format!(
                "no {what} from the server: it does not require authentication (it sent its SETTINGS instead)"
            ))),
            Ok(f) => Err(refused(format!(
                "expected the server's {what}, got a {:?} frame",
                f.head.kind()
            ))),
            Err(RecvError::TimedOut) => Err(Error::new(
                ErrorKind::TimedOut,
                format!("no {what} from the server (is it configured with a key?)"),
            )),
            Err(e) => Err(refused(format!("authentication failed: {e}"))),
        }
    };
    let challenge = expect_auth(rx, "authentication challenge")?;
    if challenge.len() != crate::auth::NONCE_LEN {
        return Err(refused("malformed authentication challenge".into()));
    }
    let client_nonce = crate::auth::nonce()?;
    let response = crate::auth::client_response(key, &challenge, &client_nonce);
    let header = Header {
        kind: Kind::Auth as i32,
        body: response,
        ..Default::default()
    };
    tx.send(header, Payload::Empty)
        .map_err(|e| refused(format!("sending the authentication response failed: {e}")))?;
    let proof = expect_auth(rx, "authentication proof")?;
    if crate::auth::verify_server(key, &challenge, &client_nonce, &proof) {
        Ok(())
    } else {
        Err(refused(
            "the server could not prove it holds the pre-shared key".into(),
        ))
    }
}
