//! Async stream handles: client-streaming, server-streaming and
//! bidirectional calls, with the same wire protocol and flow control as
//! the blocking client's (see `client/stream.rs`).
//!
//! A sender waits for per-stream credit as a future (no thread blocks);
//! the receiving half gives credit back when its consumer drops the
//! [`Pages`](crate::Pages) of a message, through the same release hook the
//! blocking client uses. Dropping a handle before its end cancels the
//! call on the server, as the blocking handles do.

use std::collections::VecDeque;

use futures_core::Stream;
use futures_sink::Sink;

use pagerpc_core::conn::{InCredit, OutCredit};
use pagerpc_core::MetadataEntry;

use crate::stream_message::credit_frame;
pub use crate::stream_message::StreamMessage;

use super::*;

/// A streaming call's state in its slot.
pub(super) struct StreamState {
    /// Messages from the server not yet handed out.
    queue: VecDeque<Frame>,
    /// How the server ended the call (STREAM_END or RESPONSE: `Ok`), or a
    /// local failure.
    end: Option<Result<Frame, Status>>,
    /// Our credit for sending on this stream.
    out: OutCredit,
    /// The server's credit for sending to us.
    inc: InCredit,
    /// The sender handle is alive and has not finished.
    tx_open: bool,
    /// The receiving handle is alive and has not seen the end.
    rx_open: bool,
    /// The sender handle waiting for credit.
    tx_waker: Option<Waker>,
}

impl StreamState {
    pub(super) fn new(window_out: u64, window_in: u64, sends: bool) -> StreamState {
        StreamState {
            queue: VecDeque::new(),
            end: None,
            out: OutCredit::new(window_out),
            inc: InCredit::new(window_in),
            tx_open: sends,
            rx_open: true,
            tx_waker: None,
        }
    }

    /// Records how the call ended (the first end counts).
    pub(super) fn end(&mut self, r: Result<Frame, Status>) {
        if self.end.is_none() {
            self.end = Some(r);
        }
    }

    pub(super) fn wake_sender(&mut self) {
        if let Some(w) = self.tx_waker.take() {
            w.wake();
        }
    }

    pub(super) fn wake_sender_by_ref(&self) {
        if let Some(w) = &self.tx_waker {
            w.wake_by_ref();
        }
    }
}

/// Bytes a stream message costs in credit: its body and its payload.
fn cost(frame: &Frame) -> u64 {
    frame.head.header.body.len() as u64 + frame.head.payload_len()
}

/// Which handle of a stream is letting go.
#[derive(Clone, Copy)]
enum Half {
    Tx,
    Rx,
}

impl AsyncClient {
    /// Opens a bidirectional stream: messages flow both ways until each
    /// side ends its own (the client with [`AsyncStreamSender::finish`],
    /// the server with its status). `opts.timeout` bounds the whole
    /// stream. Opening never waits: the REQUEST is written as far as the
    /// socket takes it, and the driver writes the rest.
    ///
    /// # Errors
    /// As [`AsyncClient::call`], for failures before the stream is open.
    ///
    /// # Panics
    /// With a timeout, outside a tokio runtime (the deadline is a
    /// [`tokio::time::Sleep`]).
    pub fn bidi_stream(
        &self,
        method: &str,
        opts: &CallOptions,
    ) -> Result<(AsyncStreamSender, AsyncStreamReceiver), CallError> {
        let (id, deadline) = self.open(
            method,
            Vec::new(),
            Payload::Empty,
            opts,
            Some(true),
            &CallTrace::default(),
        )?;
        Ok((
            AsyncStreamSender::new(self.clone(), id, deadline),
            AsyncStreamReceiver::new(self.clone(), id, deadline),
        ))
    }

    /// Opens a client-streaming call: send messages with the
    /// [`AsyncStreamSender`], [`finish`](AsyncStreamSender::finish) it,
    /// then await the one response with [`AsyncStreamResponse::wait`].
    ///
    /// # Errors
    /// As [`bidi_stream`](Self::bidi_stream).
    ///
    /// # Panics
    /// As [`bidi_stream`](Self::bidi_stream).
    pub fn client_stream(
        &self,
        method: &str,
        opts: &CallOptions,
    ) -> Result<(AsyncStreamSender, AsyncStreamResponse), CallError> {
        let (id, deadline) = self.open(
            method,
            Vec::new(),
            Payload::Empty,
            opts,
            Some(true),
            &CallTrace::default(),
        )?;
        Ok((
            AsyncStreamSender::new(self.clone(), id, deadline),
            AsyncStreamResponse {
                rx: AsyncStreamReceiver::new(self.clone(), id, deadline),
            },
        ))
    }

    /// Opens a server-streaming call with one request message and payload,
    /// and returns the stream of the server's messages.
    ///
    /// # Errors
    /// As [`bidi_stream`](Self::bidi_stream).
    ///
    /// # Panics
    /// As [`bidi_stream`](Self::bidi_stream).
    pub fn server_stream<Req: Message>(
        &self,
        method: &str,
        req: &Req,
        payload: impl Into<Payload>,
        opts: &CallOptions,
    ) -> Result<AsyncStreamReceiver, CallError> {
        let (id, deadline) = self.open(
            method,
            req.encode_to_vec(),
            payload.into(),
            opts,
            Some(false),
            &CallTrace::default(),
        )?;
        Ok(AsyncStreamReceiver::new(self.clone(), id, deadline))
    }
}

impl Shared {
    /// A STREAM_CHUNK arrived for call `id` (from the driver).
    pub(super) fn stream_message(&self, id: u64, frame: Frame) {
        let mut violation = false;
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
                        stream.end(Err(Status::resource_exhausted(format!(
                            "stream ended: {e}"
                        ))));
                        violation = true;
                    }
                },
                None => {
                    slot.result = Some(Err(Status::internal(
                        "protocol error: the server sent a stream message for a unary call",
                    )));
                    violation = true;
                }
            }
            slot.wake();
        }
        if violation {
            self.send_control(super::send::cancel_frame(id));
        }
    }

    /// A CREDIT frame arrived for stream `id` (from the driver).
    pub(super) fn stream_credit(&self, id: u64, credit: u64) {
        let mut st = self.state.lock();
        if let Some(stream) = st.calls.get_mut(id).and_then(|s| s.stream.as_mut()) {
            stream.out.grant(credit);
            stream.wake_sender();
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

    /// Turns a received frame into a message whose payload gives its
    /// credit back when dropped (the blocking client's mechanism).
    fn hand_out(self: &Arc<Self>, id: u64, frame: Frame) -> StreamMessage {
        let weak = Arc::downgrade(self);
        StreamMessage::releasing(frame, move |n| {
            if let Some(shared) = weak.upgrade() {
                shared.release_stream_bytes(id, n);
            }
        })
    }

    /// The client is done with one half of stream `id`. `cancel` says the
    /// stream is cut short (a handle dropped early, aborted, or past its
    /// deadline): frames of it not yet written are taken back, the server
    /// gets a CANCEL (carrying `status` unless `Cancelled`), and the other
    /// half sees `status`.
    fn stream_close(&self, id: u64, half: Half, cancel: Option<Status>) {
        let mut tx = self.tx.lock();
        let (notify_server, submitted, ended) = {
            let mut st = self.state.lock();
            let Some(slot) = st.calls.get_mut(id) else {
                return;
            };
            let submitted = slot.submitted;
            let Some(stream) = slot.stream.as_mut() else {
                return;
            };
            match half {
                Half::Tx => stream.tx_open = false,
                Half::Rx => stream.rx_open = false,
            }
            let mut notify_server = None;
            if let Some(status) = cancel {
                if stream.end.is_none() {
                    stream.end(Err(status.clone()));
                    notify_server = Some(status);
                }
            }
            let over = !stream.tx_open && !stream.rx_open;
            slot.wake();
            // Queued frames carry no release hook yet, but drop them
            // outside the locks anyway.
            let ended = if over { st.calls.end(id) } else { None };
            (notify_server, submitted, ended)
        };
        if let Some(status) = notify_server {
            let (unsent, _) = self.take_unsent(&mut tx, id);
            self.cancel_locked(&mut tx, id, submitted, unsent, Some(&status));
        }
        drop(tx);
        drop(ended);
    }
}

/// Whether `sleep` (a stream's deadline) has passed; registers the waker.
fn expired(sleep: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    sleep
        .as_mut()
        .is_some_and(|s| s.as_mut().poll(cx).is_ready())
}

/// The client's sending half of a stream. `Send`; dropping it before
/// [`finish`](Self::finish) cancels the call.
///
/// It is also a [`Sink`] of `(body, payload)` items, the body an already
/// encoded message: `poll_ready` and `poll_flush` wait until the buffered
/// item had credit and was handed to the connection, `poll_close`
/// finishes the stream (half-close).
///
/// A [`send`](Self::send) future dropped while it waits for credit leaves
/// its message buffered in the handle: it goes out before the next
/// message (or at `finish`), and is discarded if the handle is dropped.
#[derive(Debug)]
pub struct AsyncStreamSender {
    client: AsyncClient,
    id: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The message waiting for credit.
    pending: Option<(Vec<u8>, Payload)>,
    open: bool,
}

enum Push {
    Go,
    Fail(Status),
    Wait,
}

impl AsyncStreamSender {
    fn new(client: AsyncClient, id: u64, deadline: Option<Instant>) -> AsyncStreamSender {
        AsyncStreamSender {
            client,
            id,
            sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            pending: None,
            open: true,
        }
    }

    /// The call id on the wire.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Hands the buffered message to the connection once the stream has
    /// credit for it.
    fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        let Some((body, payload)) = &self.pending else {
            return Poll::Ready(Ok(()));
        };
        let bytes = (body.len() + payload.len()) as u64;
        let shared = self.client.shared().clone();
        let push = {
            let mut st = shared.state.lock();
            let dead = st.calls.dead().cloned();
            match st.calls.get_mut(self.id).and_then(|s| s.stream.as_mut()) {
                None => Push::Fail(
                    dead.unwrap_or_else(|| Status::cancelled("the stream was cancelled")),
                ),
                Some(stream) => match (&stream.end, dead) {
                    (Some(Err(s)), _) => Push::Fail(s.clone()),
                    (Some(Ok(_)), _) => Push::Fail(Status::failed_precondition(
                        "the server already ended the call; no more messages can be sent",
                    )),
                    (None, Some(d)) => Push::Fail(d),
                    (None, None) if stream.out.can_send(bytes) => {
                        stream.out.spend(bytes);
                        Push::Go
                    }
                    (None, None) => {
                        stream.tx_waker = Some(cx.waker().clone());
                        Push::Wait
                    }
                },
            }
        };
        let status = match push {
            Push::Go => None,
            Push::Fail(s) => Some(s),
            Push::Wait if expired(&mut self.sleep, cx) => {
                let status = Status::deadline_exceeded("deadline exceeded during the stream");
                self.open = false;
                shared.stream_close(self.id, Half::Tx, Some(status.clone()));
                Some(status)
            }
            Push::Wait => return Poll::Pending,
        };
        let Some((body, payload)) = self.pending.take() else {
            return Poll::Ready(Ok(()));
        };
        if let Some(status) = status {
            return Poll::Ready(Err(CallError::with_payload(status, payload)));
        }
        let header = Header {
            call_id: self.id,
            kind: Kind::StreamChunk as i32,
            body,
            ..Default::default()
        };
        let r = shared.submit(self.id, OutFrame { header, payload });
        if r.is_err() {
            if let Some(stream) = shared
                .state
                .lock()
                .calls
                .get_mut(self.id)
                .and_then(|s| s.stream.as_mut())
            {
                stream.out.grant(bytes);
            }
        }
        Poll::Ready(r)
    }

    /// Sends one message with a payload, waiting (as a future, no thread
    /// blocks) while the server has given no credit for it: its consumer
    /// has not released enough of what it got. Returns once the message
    /// is handed to the connection.
    ///
    /// # Errors
    /// The server's status if it ended the call, `DeadlineExceeded` at the
    /// stream's deadline, `Unavailable` when the connection fails. The
    /// error hands the payload back when none of it was written.
    pub async fn send<T: Message>(
        &mut self,
        msg: &T,
        payload: impl Into<Payload>,
    ) -> Result<(), CallError> {
        let body = msg.encode_to_vec();
        self.send_raw(body, payload.into()).await
    }

    /// [`send`](Self::send) with an already encoded body.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn send_raw(&mut self, body: Vec<u8>, payload: Payload) -> Result<(), CallError> {
        if !self.open {
            return Err(CallError::with_payload(
                Status::failed_precondition("the stream was already finished"),
                payload,
            ));
        }
        // A message left buffered by a dropped `send` future goes first.
        poll_fn(|cx| self.poll_push(cx)).await?;
        self.pending = Some((body, payload));
        poll_fn(|cx| self.poll_push(cx)).await
    }

    /// Hands STREAM_END to the connection after every buffered message.
    fn close_now(&mut self) -> Result<(), CallError> {
        self.open = false;
        let shared = self.client.shared();
        let header = Header {
            call_id: self.id,
            kind: Kind::StreamEnd as i32,
            ..Default::default()
        };
        let r = shared.submit(
            self.id,
            OutFrame {
                header,
                payload: Payload::Empty,
            },
        );
        match &r {
            Ok(()) => shared.stream_close(self.id, Half::Tx, None),
            Err(e) => shared.stream_close(self.id, Half::Tx, Some(e.status().clone())),
        }
        r
    }

    /// Ends the client's messages (half-close). The server's messages, or
    /// its response, still arrive on the receiving half.
    ///
    /// # Errors
    /// As [`send`](Self::send), for a buffered message or the end itself.
    pub async fn finish(mut self) -> Result<(), CallError> {
        if let Err(e) = poll_fn(|cx| self.poll_push(cx)).await {
            self.open = false;
            self.client
                .shared()
                .stream_close(self.id, Half::Tx, Some(e.status().clone()));
            return Err(e);
        }
        self.close_now()
    }

    /// Ends the call with an error the server sees as such (a CANCEL
    /// carrying `status`); the receiving half fails with it too.
    pub fn abort(mut self, status: Status) {
        self.open = false;
        self.pending = None;
        self.client
            .shared()
            .stream_close(self.id, Half::Tx, Some(status));
    }
}

impl Drop for AsyncStreamSender {
    fn drop(&mut self) {
        if self.open {
            self.client.shared().stream_close(
                self.id,
                Half::Tx,
                Some(Status::cancelled(
                    "the client dropped the stream's sender before finishing it",
                )),
            );
        }
    }
}

impl Sink<(Vec<u8>, Payload)> for AsyncStreamSender {
    type Error = CallError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        let this = self.get_mut();
        if !this.open {
            return Poll::Ready(Err(CallError::new(Status::failed_precondition(
                "the stream was already finished",
            ))));
        }
        this.poll_push(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: (Vec<u8>, Payload)) -> Result<(), CallError> {
        let this = self.get_mut();
        if !this.open {
            return Err(CallError::with_payload(
                Status::failed_precondition("the stream was already finished"),
                item.1,
            ));
        }
        this.pending = Some(item);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.get_mut().poll_push(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        let this = self.get_mut();
        if !this.open {
            return Poll::Ready(Ok(()));
        }
        if let Err(e) = std::task::ready!(this.poll_push(cx)) {
            this.open = false;
            this.client
                .shared()
                .stream_close(this.id, Half::Tx, Some(e.status().clone()));
            return Poll::Ready(Err(e));
        }
        Poll::Ready(this.close_now())
    }
}

/// The client's receiving half of a server-streaming or bidirectional
/// call: a [`Stream`] of messages. `Send`; dropping it before the end
/// cancels the call.
///
/// The stream yields `Ok` messages and ends (`None`) when the server ends
/// it with status OK; a stream cut short (server error, cancellation,
/// deadline, lost connection) yields one `Err` and then ends.
#[derive(Debug)]
pub struct AsyncStreamReceiver {
    client: AsyncClient,
    id: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The end was seen (or the handle gave up).
    done: bool,
    trailers: Vec<MetadataEntry>,
}

enum Got {
    Msg(Frame, Option<u64>),
    End(Result<Frame, Status>),
    Wait,
}

impl AsyncStreamReceiver {
    fn new(client: AsyncClient, id: u64, deadline: Option<Instant>) -> AsyncStreamReceiver {
        AsyncStreamReceiver {
            client,
            id,
            sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            done: false,
            trailers: Vec::new(),
        }
    }

    /// The call id on the wire.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The metadata the server ended the stream with, once the stream
    /// ended with status OK (empty before).
    pub fn trailers(&self) -> &[MetadataEntry] {
        &self.trailers
    }

    /// The next message, or `None` once the server ended the stream with
    /// status OK.
    ///
    /// # Errors
    /// The status that ended the stream.
    pub async fn recv(&mut self) -> Result<Option<StreamMessage>, CallError> {
        poll_fn(|cx| self.poll_recv(cx)).await.transpose()
    }

    /// What the slot holds for us: a message, the end (`only_end`: a
    /// message is a protocol error), or nothing yet.
    fn take(&mut self, cx: &mut Context<'_>, only_end: bool) -> Got {
        let shared = self.client.shared();
        let mut st = shared.state.lock();
        let dead = st.calls.dead().cloned();
        let Some(Slot { stream, waker, .. }) = st.calls.get_mut(self.id) else {
            return Got::End(Err(
                dead.unwrap_or_else(|| Status::cancelled("the stream was cancelled"))
            ));
        };
        let Some(stream) = stream.as_mut() else {
            return Got::End(Err(Status::internal("not a stream")));
        };
        if only_end && !stream.queue.is_empty() {
            return Got::End(Err(Status::internal(
                "protocol error: the server streamed messages in answer to a client-streaming call",
            )));
        }
        if let Some(frame) = stream.queue.pop_front() {
            // The body is the consumer's now: its credit goes back at once.
            stream.inc.release(frame.head.header.body.len() as u64);
            return Got::Msg(frame, stream.inc.take_grant());
        }
        match stream.end.take() {
            Some(Ok(f)) => {
                // The end is handed out once; what stays behind tells the
                // sending half the call is over (it must not send on, or
                // wait for credit that never comes).
                stream.end = Some(Err(Status::failed_precondition(
                    "the server already ended the call; no more messages can be sent",
                )));
                Got::End(Ok(f))
            }
            Some(Err(s)) => {
                stream.end = Some(Err(s.clone()));
                Got::End(Err(s))
            }
            None => match dead {
                Some(d) => Got::End(Err(d)),
                None => {
                    *waker = Some(cx.waker().clone());
                    Got::Wait
                }
            },
        }
    }

    /// Acts on what [`take`](Self::take) found that is not a message: the
    /// end (the receiving half closes), or nothing yet (the deadline is
    /// checked).
    fn settle(&mut self, got: Got, cx: &mut Context<'_>) -> Poll<Result<Frame, CallError>> {
        let end = match got {
            Got::Msg(..) => {
                return Poll::Ready(Err(CallError::new(Status::internal(
                    "a stream message where the end was expected",
                ))))
            }
            Got::End(r) => r,
            Got::Wait if expired(&mut self.sleep, cx) => Err(Status::deadline_exceeded(
                "deadline exceeded during the stream",
            )),
            Got::Wait => return Poll::Pending,
        };
        self.done = true;
        let shared = self.client.shared();
        match end {
            Ok(f) => {
                shared.stream_close(self.id, Half::Rx, None);
                Poll::Ready(Ok(f))
            }
            Err(s) => {
                shared.stream_close(self.id, Half::Rx, Some(s.clone()));
                Poll::Ready(Err(CallError::new(s)))
            }
        }
    }

    /// The end of the stream: `Ok(frame)` for the server's STREAM_END or
    /// RESPONSE, `Pending` while it has not come.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, CallError>> {
        if self.done {
            return Poll::Ready(Err(CallError::new(Status::failed_precondition(
                "the stream already ended",
            ))));
        }
        let got = self.take(cx, true);
        self.settle(got, cx)
    }

    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<StreamMessage, CallError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let got = match self.take(cx, false) {
            Got::Msg(frame, grant) => {
                let shared = self.client.shared().clone();
                if let Some(credit) = grant {
                    shared.send_control(credit_frame(self.id, credit));
                }
                return Poll::Ready(Some(Ok(shared.hand_out(self.id, frame))));
            }
            other => other,
        };
        match self.settle(got, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(f)) => {
                self.trailers = f.head.header.metadata;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl Stream for AsyncStreamReceiver {
    type Item = Result<StreamMessage, CallError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

impl Drop for AsyncStreamReceiver {
    fn drop(&mut self) {
        if !self.done {
            self.client.shared().stream_close(
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
pub struct AsyncStreamResponse {
    rx: AsyncStreamReceiver,
}

impl AsyncStreamResponse {
    /// The call id on the wire.
    pub fn id(&self) -> u64 {
        self.rx.id
    }

    /// Waits for the response (after [`AsyncStreamSender::finish`], or
    /// earlier if the server answers before reading everything).
    ///
    /// # Errors
    /// The server's status; as [`AsyncStreamReceiver::recv`].
    pub async fn wait<Resp: Message + Default>(mut self) -> Result<Response<Resp>, CallError> {
        let frame = poll_fn(|cx| self.rx.poll_end(cx)).await?;
        decode_response(frame)
    }
}
