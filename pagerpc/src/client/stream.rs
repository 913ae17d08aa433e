//! Streaming calls: client-streaming, server-streaming and bidirectional.
//!
//! A streaming call is a call id like any other. The client opens it with a
//! REQUEST: with `client_stream` set, its own messages follow as
//! STREAM_CHUNK frames and end with STREAM_END (half-close); without it,
//! the REQUEST carries the one request message. The server answers a
//! client-streaming call with one RESPONSE, and a server-streaming or
//! bidirectional one with STREAM_CHUNK frames ended by STREAM_END (status
//! OK) or by ERROR. Either side may end the call early: the client with
//! CANCEL (optionally carrying its status), the server with ERROR.
//!
//! Every message is a body plus an optional payload, sent as its own part
//! like a unary payload, so it maps with zero-copy receive. Flow control
//! (`pagerpc_core::conn::flow`) is in bytes per stream: a sender waits for
//! credit; the receiving side gives credit back when its consumer drops the
//! [`Pages`] it was handed, not when they arrive.
//!
//! Handles are `Send`. Dropping a [`StreamSender`] before
//! [`finish`](StreamSender::finish), or a [`StreamReceiver`] /
//! [`StreamResponse`] before the end, cancels the call on the server.

use std::collections::VecDeque;

use pagerpc_core::conn::{InCredit, OutCredit};

use super::send::cancel_frame;
use super::*;

pub(super) use crate::stream_message::credit_frame;
pub use crate::stream_message::StreamMessage;

/// A streaming call's state in its slot.
pub(super) struct StreamSlot {
    /// Messages from the server not yet handed out.
    queue: VecDeque<Frame>,
    /// How the server ended the call: STREAM_END or RESPONSE (`Ok`), ERROR,
    /// or a local failure.
    end: Option<Result<Frame, Status>>,
    /// Our credit for sending on this stream.
    out: OutCredit,
    /// The server's credit for sending to us.
    inc: InCredit,
    /// The sender handle is alive and has not finished.
    tx_open: bool,
    /// The receiving handle is alive and has not seen the end.
    rx_open: bool,
}

impl StreamSlot {
    pub(super) fn new(window_out: u64, window_in: u64, sends: bool) -> StreamSlot {
        StreamSlot {
            queue: VecDeque::new(),
            end: None,
            out: OutCredit::new(window_out),
            inc: InCredit::new(window_in),
            tx_open: sends,
            rx_open: true,
        }
    }

    /// Whether a waiting receiver has something to act on.
    pub(super) fn ready(&self) -> bool {
        !self.queue.is_empty() || self.end.is_some()
    }

    /// Records how the call ended (the first end counts).
    pub(super) fn end(&mut self, r: Result<Frame, Status>) {
        if self.end.is_none() {
            self.end = Some(r);
        }
    }
}

/// Bytes a stream message costs in credit: its body and its payload.
fn cost(frame: &Frame) -> u64 {
    frame.head.header.body.len() as u64 + frame.head.payload_len()
}

impl Client {
    /// Opens a bidirectional stream: messages flow both ways until each
    /// side ends its own (the client with [`StreamSender::finish`], the
    /// server with its status). `opts.timeout` bounds the whole stream.
    ///
    /// # Errors
    /// As [`Client::call`], for failures before the stream is open.
    pub fn bidi_stream(
        &self,
        method: &str,
        opts: &CallOptions,
    ) -> Result<(StreamSender, StreamReceiver), CallError> {
        let (id, deadline, trace) =
            self.open_call(method, Vec::new(), Payload::Empty, opts, Some(true))?;
        Ok((
            StreamSender::new(self.shared.clone(), id, deadline, trace.clone()),
            StreamReceiver::new(self.shared.clone(), id, deadline, trace),
        ))
    }

    /// Opens a client-streaming call: send messages with the
    /// [`StreamSender`], [`finish`](StreamSender::finish) it, then wait for
    /// the one response with [`StreamResponse::wait`].
    ///
    /// # Errors
    /// As [`Client::call`], for failures before the stream is open.
    pub fn client_stream(
        &self,
        method: &str,
        opts: &CallOptions,
    ) -> Result<(StreamSender, StreamResponse), CallError> {
        let (id, deadline, trace) =
            self.open_call(method, Vec::new(), Payload::Empty, opts, Some(true))?;
        Ok((
            StreamSender::new(self.shared.clone(), id, deadline, trace.clone()),
            StreamResponse {
                rx: StreamReceiver::new(self.shared.clone(), id, deadline, trace),
            },
        ))
    }

    /// Opens a server-streaming call with one request message and payload,
    /// and returns the stream of the server's messages.
    ///
    /// # Errors
    /// As [`Client::call`], for failures before the request is sent.
    pub fn server_stream<Req: Message>(
        &self,
        method: &str,
        req: &Req,
        payload: impl Into<Payload>,
        opts: &CallOptions,
    ) -> Result<StreamReceiver, CallError> {
        let (id, deadline, trace) = self.open_call(
            method,
            req.encode_to_vec(),
            payload.into(),
            opts,
            Some(false),
        )?;
        Ok(StreamReceiver::new(
            self.shared.clone(),
            id,
            deadline,
            trace,
        ))
    }
}

/// Which handle of a stream is letting go.
#[derive(Clone, Copy)]
enum Half {
    Tx,
    Rx,
}

impl Shared {
    /// A STREAM_CHUNK arrived for call `id`.
    pub(super) fn stream_message(&self, id: u64, frame: Frame) {
        let mut violation = None;
        {
            let mut st = self.state.lock();
            let Some(slot) = st.calls.get_mut(id) else {
                // The call is over (cancelled, or it gave up): drop it.
                return;
            };
            match slot.stream.as_mut() {
                Some(stream) => match stream.inc.on_message(cost(&frame)) {
                    Ok(()) => stream.queue.push_back(frame),
                    Err(e) => {
                        let status = Status::resource_exhausted(format!("stream ended: {e}"));
                        stream.end(Err(status.clone()));
                        violation = Some(status);
                    }
                },
                None => {
                    let status = Status::internal(
                        "protocol error: the server sent a stream message for a unary call",
                    );
                    slot.result = Some(Err(status.clone()));
                    violation = Some(status);
                }
            }
            slot.cv.notify_one();
        }
        if violation.is_some() {
            self.send_cancel(id);
        }
    }

    /// A CREDIT frame arrived for call `id`.
    pub(super) fn stream_credit(&self, id: u64, credit: u64) {
        let mut st = self.state.lock();
        if id == 0 {
            // Connection credit: the server read our payloads. The thread
            // holding the sender applies it; wake it if it waits.
            st.conn_granted = st.conn_granted.saturating_add(credit);
            if st.send_waiting {
                self.wake.raise();
            }
            return;
        }
        if let Some(slot) = st.calls.get_mut(id) {
            if let Some(stream) = slot.stream.as_mut() {
                stream.out.grant(credit);
                slot.cv.notify_one();
            }
        }
    }

    /// The consumer released `bytes` of stream `id`'s messages: give credit
    /// back when enough is released.
    fn release_stream_bytes(&self, id: u64, bytes: u64) {
        let grant = {
            let mut st = self.state.lock();
            let Some(stream) = st.calls.get_mut(id).and_then(|s| s.stream.as_mut()) else {
                return;
            };
            if !stream.rx_open {
                return;
            }
            stream.inc.release(bytes);
            stream.inc.take_grant()
        };
        if let Some(credit) = grant {
            self.send_control(credit_frame(id, credit));
        }
    }

    /// Waits on call `id`'s slot until `done` says there is something to
    /// act on, reading the socket when nobody else does. Returns the state
    /// lock with the slot ready, or the status to fail with.
    fn wait_slot<'a>(
        &'a self,
        id: u64,
        deadline: Option<Instant>,
        mut done: impl FnMut(&mut StreamSlot) -> bool,
    ) -> Result<parking_lot::MutexGuard<'a, State>, Status> {
        let mut st = self.state.lock();
        loop {
            let State {
                calls,
                reader_active,
                ..
            } = &mut *st;
            let dead = calls.dead().cloned();
            let Some(slot) = calls.get_mut(id) else {
                return Err(dead.unwrap_or_else(|| Status::cancelled("the stream was cancelled")));
            };
            let Some(stream) = slot.stream.as_mut() else {
                return Err(Status::internal("not a stream"));
            };
            if done(stream) {
                return Ok(st);
            }
            if let Some(dead) = dead {
                stream.end(Err(dead.clone()));
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let status = Status::deadline_exceeded("deadline exceeded during the stream");
                stream.end(Err(status.clone()));
                drop(st);
                self.send_cancel(id);
                return Err(status);
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

    /// Sends one message on stream `id`, waiting for credit.
    fn stream_send(
        self: &Arc<Self>,
        id: u64,
        body: Vec<u8>,
        metadata: Vec<MetadataEntry>,
        payload: Payload,
        deadline: Option<Instant>,
    ) -> Result<(), CallError> {
        let bytes = body.len() as u64 + payload.len() as u64;
        let ready = self.wait_slot(id, deadline, |s| s.end.is_some() || s.out.can_send(bytes));
        let mut st = match ready {
            Ok(st) => st,
            Err(status) => return Err(CallError::with_payload(status, payload)),
        };
        let Some(stream) = st.calls.get_mut(id).and_then(|s| s.stream.as_mut()) else {
            return Err(CallError::with_payload(
                Status::cancelled("the stream was cancelled"),
                payload,
            ));
        };
        if let Some(end) = &stream.end {
            let status = match end {
                Err(s) => s.clone(),
                Ok(_) => Status::failed_precondition(
                    "the server already ended the call; no more messages can be sent",
                ),
            };
            return Err(CallError::with_payload(status, payload));
        }
        stream.out.spend(bytes);
        drop(st);
        let header = Header {
            call_id: id,
            kind: Kind::StreamChunk as i32,
            metadata,
            body,
            ..Default::default()
        };
        let r = self.send_request(OutFrame { header, payload }, deadline);
        if r.is_err() {
            if let Some(stream) = self
                .state
                .lock()
                .calls
                .get_mut(id)
                .and_then(|s| s.stream.as_mut())
            {
                stream.out.grant(bytes);
            }
        }
        r
    }

    /// Hands out the next message of stream `id`, or its end.
    /// `Ok(Err(trailers))` is the end with status OK.
    fn stream_recv(
        self: &Arc<Self>,
        id: u64,
        deadline: Option<Instant>,
        trace: &CallTrace,
    ) -> Result<Result<StreamMessage, Vec<MetadataEntry>>, CallError> {
        let mut st = self
            .wait_slot(id, deadline, |s| s.ready())
            .map_err(CallError::new)?;
        let Some(stream) = st.calls.get_mut(id).and_then(|s| s.stream.as_mut()) else {
            return Err(CallError::new(Status::cancelled(
                "the stream was cancelled",
            )));
        };
        if let Some(frame) = stream.queue.pop_front() {
            // The body is the consumer's now: its credit goes back at once.
            stream.inc.release(frame.head.header.body.len() as u64);
            let grant = stream.inc.take_grant();
            drop(st);
            if let Some(credit) = grant {
                self.send_control(credit_frame(id, credit));
            }
            trace.received(&frame);
            return Ok(Ok(self.hand_out(id, frame)));
        }
        let end = match stream.end.as_ref() {
            Some(Ok(f)) => Ok(Err(f.head.header.metadata.clone())),
            Some(Err(s)) => Err(CallError::new(s.clone())),
            None => Err(CallError::new(Status::internal(
                "stream woke without an end",
            ))),
        };
        end
    }

    /// Turns a received frame into a message whose payload gives its
    /// credit back when dropped.
    fn hand_out(self: &Arc<Self>, id: u64, frame: Frame) -> StreamMessage {
        let weak = Arc::downgrade(self);
        StreamMessage::releasing(frame, move |n| {
            if let Some(shared) = weak.upgrade() {
                shared.release_stream_bytes(id, n);
            }
        })
    }

    /// The client is done with one half of stream `id`. `cancel` says the
    /// stream is cut short (the handle was dropped early, or aborted with
    /// `status`): the server is told, and the other half sees `status`.
    fn stream_close(&self, id: u64, half: Half, cancel: Option<Status>) {
        let mut notify_server = None;
        {
            let mut st = self.state.lock();
            let Some(slot) = st.calls.get_mut(id) else {
                return;
            };
            let Some(stream) = slot.stream.as_mut() else {
                return;
            };
            match half {
                Half::Tx => stream.tx_open = false,
                Half::Rx => stream.rx_open = false,
            }
            if let Some(status) = cancel {
                if stream.end.is_none() {
                    stream.end(Err(status.clone()));
                    notify_server = Some(status);
                }
            }
            let over = !stream.tx_open && !stream.rx_open;
            slot.cv.notify_all();
            if over {
                // Queued frames carry no release hook yet: dropping them
                // here runs no callback under the lock.
                st.calls.end(id);
            }
        }
        if let Some(status) = notify_server {
            let mut frame = cancel_frame(id);
            if status.code() != crate::Code::Cancelled {
                frame.header.status_code = status.code().as_u32();
                frame.header.status_message = status.message().to_owned();
            }
            self.send_control(frame);
        }
    }

    /// Half-closes stream `id`: STREAM_END, sent like any message (after
    /// the ones before it).
    fn stream_finish(&self, id: u64, deadline: Option<Instant>) -> Result<(), CallError> {
        let header = Header {
            call_id: id,
            kind: Kind::StreamEnd as i32,
            ..Default::default()
        };
        self.send_request(
            OutFrame {
                header,
                payload: Payload::Empty,
            },
            deadline,
        )
    }
}

/// The client's sending half of a stream. `Send`; dropping it before
/// [`finish`](Self::finish) cancels the call.
#[derive(Debug)]
pub struct StreamSender {
    shared: Arc<Shared>,
    id: u64,
    deadline: Option<Instant>,
    open: bool,
    trace: CallTrace,
}

impl StreamSender {
    fn new(
        shared: Arc<Shared>,
        id: u64,
        deadline: Option<Instant>,
        trace: CallTrace,
    ) -> StreamSender {
        StreamSender {
            shared,
            id,
            deadline,
            open: true,
            trace,
        }
    }

    /// The call id on the wire.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends one message with a payload, waiting while the server has
    /// given no credit for it (its consumer has not released enough of
    /// what it got).
    ///
    /// # Errors
    /// The server's status if it ended the call, `DeadlineExceeded` at the
    /// stream's deadline, `Unavailable` when the connection fails. The
    /// error hands the payload back when none of it was written.
    pub fn send<T: Message>(
        &mut self,
        msg: &T,
        payload: impl Into<Payload>,
    ) -> Result<(), CallError> {
        self.send_raw(msg.encode_to_vec(), payload.into())
    }

    /// [`send`](Self::send) with an already encoded body.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub fn send_raw(&mut self, body: Vec<u8>, payload: Payload) -> Result<(), CallError> {
        if !self.open {
            return Err(CallError::with_payload(
                Status::failed_precondition("the stream was already finished"),
                payload,
            ));
        }
        let bytes = body.len() as u64 + payload.len() as u64;
        let r = self
            .shared
            .stream_send(self.id, body, Vec::new(), payload, self.deadline);
        if r.is_ok() {
            self.trace.sent(bytes);
        }
        r
    }

    /// Ends the client's messages (half-close). The server's messages, or
    /// its response, still arrive on the receiving half.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub fn finish(mut self) -> Result<(), CallError> {
        self.open = false;
        let r = self.shared.stream_finish(self.id, self.deadline);
        match &r {
            Ok(()) => self.shared.stream_close(self.id, Half::Tx, None),
            Err(e) => self
                .shared
                .stream_close(self.id, Half::Tx, Some(e.status().clone())),
        }
        r
    }

    /// Ends the call with an error the server sees as such (a CANCEL
    /// carrying `status`); the receiving half fails with it too.
    pub fn abort(mut self, status: Status) {
        self.open = false;
        self.trace.status(status.code());
        self.shared.stream_close(self.id, Half::Tx, Some(status));
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        if self.open {
            self.trace.status(crate::Code::Cancelled);
            self.shared.stream_close(
                self.id,
                Half::Tx,
                Some(Status::cancelled(
                    "the client dropped the stream's sender before finishing it",
                )),
            );
        }
    }
}

/// The client's receiving half of a server-streaming or bidirectional
/// call. `Send`; dropping it before the end cancels the call.
#[derive(Debug)]
pub struct StreamReceiver {
    shared: Arc<Shared>,
    id: u64,
    deadline: Option<Instant>,
    /// The end was seen (or the handle gave up).
    done: bool,
    /// The metadata the server ended the stream with (status OK).
    trailers: Vec<MetadataEntry>,
    trace: CallTrace,
}

impl StreamReceiver {
    fn new(
        shared: Arc<Shared>,
        id: u64,
        deadline: Option<Instant>,
        trace: CallTrace,
    ) -> StreamReceiver {
        StreamReceiver {
            shared,
            id,
            deadline,
            done: false,
            trailers: Vec::new(),
            trace,
        }
    }

    /// The call id on the wire.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next message, or `None` once the server ended the stream with
    /// status OK. A stream cut short (server error, cancellation, deadline,
    /// lost connection) is an error, never `None`.
    ///
    /// # Errors
    /// The status that ended the stream.
    pub fn recv(&mut self) -> Result<Option<StreamMessage>, CallError> {
        if self.done {
            return Ok(None);
        }
        match self.shared.stream_recv(self.id, self.deadline, &self.trace) {
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(trailers)) => {
                self.done = true;
                self.trace.status(crate::Code::Ok);
                self.trailers = trailers;
                self.shared.stream_close(self.id, Half::Rx, None);
                Ok(None)
            }
            Err(e) => {
                self.done = true;
                self.trace.status(e.code());
                self.shared
                    .stream_close(self.id, Half::Rx, Some(e.status().clone()));
                Err(e)
            }
        }
    }

    /// The metadata the server ended the stream with, once
    /// [`recv`](Self::recv) returned `None` (empty before).
    pub fn trailers(&self) -> &[MetadataEntry] {
        &self.trailers
    }

    /// The next message decoded as `T`, with its payload.
    ///
    /// # Errors
    /// As [`recv`](Self::recv), and `Internal` for an undecodable body.
    pub fn recv_typed<T: Message + Default>(&mut self) -> Result<Option<(T, Pages)>, CallError> {
        match self.recv()? {
            Some(m) => {
                let msg = T::decode(m.body.as_slice()).map_err(|e| {
                    CallError::new(Status::internal(format!("undecodable stream message: {e}")))
                })?;
                Ok(Some((msg, m.payload)))
            }
            None => Ok(None),
        }
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        if !self.done {
            self.trace.status(crate::Code::Cancelled);
            self.shared.stream_close(
                self.id,
                Half::Rx,
                Some(Status::cancelled(
                    "the client dropped the stream's receiver before the end",
                )),
            );
        }
    }
}

/// The response of a client-streaming call. Dropping it before the
/// response arrives cancels the call.
#[derive(Debug)]
pub struct StreamResponse {
    rx: StreamReceiver,
}

impl StreamResponse {
    /// Waits for the response (after [`StreamSender::finish`], or earlier
    /// if the server answers before reading everything).
    ///
    /// # Errors
    /// The server's status; as [`StreamReceiver::recv`].
    pub fn wait<Resp: Message + Default>(mut self) -> Result<Response<Resp>, CallError> {
        let r = self.wait_frame().and_then(|frame| {
            self.rx.trace.received(&frame);
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
        let code = r.as_ref().map_or_else(CallError::code, |_| crate::Code::Ok);
        self.rx.trace.status(code);
        r
    }

    fn wait_frame(&mut self) -> Result<Frame, CallError> {
        let rx = &mut self.rx;
        let shared = rx.shared.clone();
        let r = shared
            .wait_slot(rx.id, rx.deadline, |s| s.end.is_some() || !s.queue.is_empty())
            .map_err(CallError::new)
            .and_then(|mut st| {
                let stream = st
                    .calls
                    .get_mut(rx.id)
                    .and_then(|s| s.stream.as_mut())
                    .ok_or_else(|| CallError::new(Status::cancelled("the stream was cancelled")))?;
                if !stream.queue.is_empty() {
                    return Err(CallError::new(Status::internal(
                        "protocol error: the server streamed messages in answer to a client-streaming call",
                    )));
                }
                match stream.end.take() {
                    Some(Ok(f)) => {
                        // What stays behind tells the sending half the
                        // call is over.
                        stream.end = Some(Err(Status::failed_precondition(
                            "the server already ended the call; no more messages can be sent",
                        )));
                        Ok(f)
                    }
                    Some(Err(s)) => {
                        stream.end = Some(Err(s.clone()));
                        Err(CallError::new(s))
                    }
                    None => Err(CallError::new(Status::internal("no response"))),
                }
            });
        rx.done = true;
        match &r {
            Ok(_) => shared.stream_close(rx.id, Half::Rx, None),
            Err(e) => shared.stream_close(rx.id, Half::Rx, Some(e.status().clone())),
        }
        r
    }
}
