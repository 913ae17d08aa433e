//! Streaming calls on the async server (feature `tokio`).
//!
//! The same stream state as the blocking server's (`stream.rs`: the
//! queue of client messages, credit both ways, the client's end), the same
//! routing of STREAM_CHUNK / STREAM_END / CANCEL / CREDIT frames by the
//! connection's turn, and the same checks (`Half::verdict`); only the
//! waiting differs. A stream's handler is a task, and its halves wait
//! without holding a thread: a waiting half leaves its task's waker in the
//! stream, and everything that notifies the blocking halves' condvar wakes
//! it too (`StreamShared::notify`). The deadline and `stream_idle_timeout`
//! are a tokio timer armed only while a half waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use prost::Message;

use pagerpc_core::Status;
use pagerpc_pages::{Pages, Payload};
use pagerpc_receiver::Frame;
use pagerpc_sender::OutFrame;

use super::async_server::run_catching;
use super::conn::Conn;
use super::context::{Context, HandlerFuture, Reply};
use super::stream::{Half, Inner, Shape, StreamShared};
use super::{Shared, StreamSendError};
use crate::stream_message::StreamMessage;
use crate::trace::CallTrace;

/// A registered async streaming handler, on raw bytes. For
/// client-streaming methods the `Reply` is the response; for the others
/// its metadata ends the stream (STREAM_END).
pub(crate) type AsyncStreamHandler = dyn Fn(Context, AsyncStreams) -> HandlerFuture + Send + Sync;

/// What an async streaming handler gets: the request message
/// (server-streaming only) and both halves.
pub(crate) struct AsyncStreams {
    pub(crate) request: Option<(Vec<u8>, Pages)>,
    pub(crate) rx: AsyncInStream,
    pub(crate) tx: AsyncOutStream,
}

impl Shared {
    /// Runs an async stream's handler as a task, then ends the stream as
    /// the blocking server does.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_stream_async(
        self: Arc<Self>,
        conn: Arc<Conn>,
        frame: Frame,
        shape: Shape,
        handler: Arc<AsyncStreamHandler>,
        stream: Arc<StreamShared>,
        cancelled: Arc<AtomicBool>,
        received: Instant,
    ) {
        let (ctx, streams, trace) =
            self.async_streams(&conn, frame, shape, &stream, &cancelled, received);
        let (id, deadline) = (ctx.call_id, ctx.deadline);
        let out = match self.interceptors.check(&ctx) {
            Ok(()) => call_async_stream_handler(&*handler, ctx, streams, &trace).await,
            Err(status) => Err(status),
        };
        self.end_stream(conn, id, shape, stream, cancelled, deadline, out, trace);
    }

    fn async_streams(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        frame: Frame,
        shape: Shape,
        stream: &Arc<StreamShared>,
        cancelled: &Arc<AtomicBool>,
        received: Instant,
    ) -> (Context, AsyncStreams, CallTrace) {
        let (ctx, request, half, trace) =
            self.start_stream(conn, frame, shape, stream, cancelled, received);
        let streams = AsyncStreams {
            request,
            rx: AsyncInStream {
                half: half(),
                wait: Waiting::default(),
                done: false,
            },
            tx: AsyncOutStream {
                half: half(),
                wait: Waiting::default(),
                pending: None,
            },
        };
        (ctx, streams, trace)
    }
}

/// Runs an async stream handler: the one place one is invoked.
async fn call_async_stream_handler(
    handler: &AsyncStreamHandler,
    ctx: Context,
    streams: AsyncStreams,
    trace: &CallTrace,
) -> Result<Reply, Status> {
    run_catching(trace, || handler(ctx, streams)).await
}

/// One half's wait in progress: when it gives up for lack of progress,
/// and the timer for that (or the deadline).
#[derive(Default)]
struct Waiting {
    idle_end: Option<Option<Instant>>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Waiting {
    /// Polls a wait on `half` until `ready`, the end of the call, or a
    /// deadline. Registers the task's waker with the stream (under its
    /// lock, so no notification is lost) and a timer for the deadline.
    fn poll_wait<'a>(
        &mut self,
        half: &'a Half,
        cx: &mut TaskContext<'_>,
        mut ready: impl FnMut(&mut Inner) -> bool,
    ) -> Poll<Result<parking_lot::MutexGuard<'a, Inner>, Status>> {
        // Lack of progress is measured from the first poll of this wait.
        let idle_end = *self.idle_end.get_or_insert_with(|| half.idle_end());
        let mut inner = half.stream.inner.lock();
        if let Some(v) = half.verdict(&mut inner, &mut ready, idle_end) {
            self.idle_end = None;
            return Poll::Ready(v.map(|()| inner));
        }
        if !inner.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            inner.wakers.push(cx.waker().clone());
        }
        drop(inner);
        if let Some(at) = half.wake_at(idle_end) {
            let at = tokio::time::Instant::from_std(at);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_ready() {
                // The time passed: the next look says so.
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}

/// The client's messages on a client-streaming or bidirectional call, as
/// its async handler reads them (feature `tokio`). Also a
/// [`futures_core::Stream`] of messages, which ends after the client's
/// last message or after the error that cut the stream short.
///
/// A message's payload gives its credit back to the client when the
/// handler drops its [`Pages`], so a handler that stops reading stops its
/// client after one `stream_window`.
pub struct AsyncInStream {
    half: Half,
    wait: Waiting,
    done: bool,
}

impl std::fmt::Debug for AsyncInStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncInStream")
            .field("id", &self.half.id)
            .finish()
    }
}

impl AsyncInStream {
    /// Polls for the next message: `None` once the client ended its
    /// messages (STREAM_END).
    ///
    /// # Errors
    /// The status that cut the stream short (CANCEL, a lost connection,
    /// the deadline, `stream_idle_timeout`).
    pub fn poll_recv(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<Option<StreamMessage>, Status>> {
        match self.wait.poll_wait(&self.half, cx, Half::message_ready) {
            Poll::Ready(Ok(inner)) => Poll::Ready(Ok(self.half.take_message(inner))),
            Poll::Ready(Err(status)) => Poll::Ready(Err(status)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The next message, or `None` once the client ended its messages
    /// (STREAM_END). A stream the client cut short is an error, never
    /// `None`. Waits without holding a thread.
    ///
    /// # Errors
    /// As [`poll_recv`](Self::poll_recv).
    pub async fn recv(&mut self) -> Result<Option<StreamMessage>, Status> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next message decoded as `T`, with its payload.
    ///
    /// # Errors
    /// As [`recv`](Self::recv), and
    /// [`Code::InvalidArgument`](crate::Code::InvalidArgument) for an
    /// undecodable body.
    pub async fn recv_typed<T: Message + Default>(&mut self) -> Result<Option<(T, Pages)>, Status> {
        match self.recv().await? {
            Some(m) => Ok(Some((m.decode()?, m.payload))),
            None => Ok(None),
        }
    }
}

impl futures_core::Stream for AsyncInStream {
    type Item = Result<StreamMessage, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match this.poll_recv(cx) {
            Poll::Ready(Ok(Some(m))) => Poll::Ready(Some(Ok(m))),
            Poll::Ready(Ok(None)) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(status)) => {
                this.done = true;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The server's messages on a server-streaming or bidirectional call, as
/// its async handler sends them (feature `tokio`). The handler returning
/// ends the stream (STREAM_END for `Ok`, ERROR for `Err`).
///
/// [`send`](Self::send) waits, without holding a thread, while the client
/// has given no credit for the message or the connection's outbound queue
/// is full. It is also a [`futures_sink::Sink`] of encoded messages
/// (`(body, payload)`): `start_send` holds one message, `poll_flush` sends
/// it once there is room. A message held when a `send` future is dropped,
/// or not flushed before the handler returns, is not sent.
pub struct AsyncOutStream {
    half: Half,
    wait: Waiting,
    pending: Option<(OutFrame, u64)>,
}

impl std::fmt::Debug for AsyncOutStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncOutStream")
            .field("id", &self.half.id)
            .finish()
    }
}

impl AsyncOutStream {
    /// Sends one message, waiting while the client has given no credit for
    /// it (its consumer has not released enough of what it got).
    ///
    /// # Errors
    /// When the client cancelled, the connection closed or the deadline
    /// passed; the error hands the payload back.
    pub async fn send<T: Message>(
        &mut self,
        msg: &T,
        payload: impl Into<Payload>,
    ) -> Result<(), StreamSendError> {
        self.send_raw(msg.encode_to_vec(), payload.into()).await
    }

    /// [`send`](Self::send) with an already encoded body.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn send_raw(
        &mut self,
        body: Vec<u8>,
        payload: Payload,
    ) -> Result<(), StreamSendError> {
        std::future::poll_fn(|cx| self.poll_flush_pending(cx)).await?;
        self.pending = Some(self.half.outgoing(body, payload)?);
        std::future::poll_fn(|cx| self.poll_flush_pending(cx)).await
    }

    /// Sends the held message once there is room for it.
    fn poll_flush_pending(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<(), StreamSendError>> {
        let Some((_, bytes)) = &self.pending else {
            return Poll::Ready(Ok(()));
        };
        let bytes = *bytes;
        let waited = match self
            .wait
            .poll_wait(&self.half, cx, self.half.room_for(bytes))
        {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(mut inner)) => {
                inner.out.spend(bytes);
                Ok(())
            }
            Poll::Ready(Err(status)) => Err(status),
        };
        let Some((frame, _)) = self.pending.take() else {
            return Poll::Ready(Ok(()));
        };
        Poll::Ready(match waited {
            Ok(()) => self.half.send_now(frame),
            Err(status) => Err(StreamSendError {
                status,
                payload: frame.payload,
            }),
        })
    }

    /// Whether the call is still going (not cancelled, connection open).
    pub fn is_open(&self) -> bool {
        self.half.is_open()
    }
}

impl futures_sink::Sink<(Vec<u8>, Payload)> for AsyncOutStream {
    type Error = StreamSendError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().poll_flush_pending(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: (Vec<u8>, Payload)) -> Result<(), Self::Error> {
        let this = self.get_mut();
        if this.pending.is_some() {
            // poll_ready was not awaited: refuse rather than drop one.
            return Err(StreamSendError {
                status: Status::failed_precondition(
                    "start_send without poll_ready: a message is still held",
                ),
                payload: item.1,
            });
        }
        this.pending = Some(this.half.outgoing(item.0, item.1)?);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().poll_flush_pending(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().poll_flush_pending(cx)
    }
}
