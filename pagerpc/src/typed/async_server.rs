//! Typed async handlers on the [`AsyncServer`](crate::AsyncServer)
//! (feature `tokio`): what `pagerpc-build` generates for a service's async
//! server trait calls into.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use pagerpc_core::{Code, MetadataEntry, Status};
use pagerpc_pages::{Pages, Payload};
use parking_lot::Mutex;
use prost::Message;

use super::{typed_reply, typed_request, unexpected_payload, NoPayload, PayloadMode, WithPayload};
use crate::{AsyncInStream, AsyncOutStream, AsyncServerBuilder, Context, StreamSendError};

/// A set of methods registered together on an
/// [`AsyncServerBuilder`]: what `pagerpc-build` generates for a `.proto`
/// service's async trait (`KvAsyncServer::new(my_impl)`), given to
/// [`AsyncServerBuilder::add_service`].
pub trait AsyncService {
    /// The service's full name, `package.Service`.
    const NAME: &'static str;

    /// Registers every method of the service on `builder`.
    fn register(self, builder: AsyncServerBuilder) -> AsyncServerBuilder;
}

/// Registers a typed async unary handler: a request that does not decode
/// as `Req`, or that carries a payload where `PIn` says none, is answered
/// with [`Code::InvalidArgument`] without calling `f`.
pub fn register_async_unary<Req, Resp, PIn, POut, F, Fut>(
    builder: AsyncServerBuilder,
    method: &str,
    f: F,
) -> AsyncServerBuilder
where
    Req: Message + Default,
    Resp: Message,
    PIn: PayloadMode,
    POut: PayloadMode,
    POut::ToSend: Send,
    F: Fn(Context, Req, PIn::Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(Resp, POut::ToSend), Status>> + Send + 'static,
{
    builder.register_raw(method, move |ctx, body, pages| {
        let fut = typed_request::<Req, PIn>(&ctx, &body, pages)
            .map(|(req, payload)| f(ctx, req, payload));
        async move {
            let (resp, out) = fut?.await?;
            Ok(typed_reply::<Resp, POut>(resp, out))
        }
    })
}

/// Registers a typed async client-streaming handler.
pub fn register_async_client_stream<Req, Resp, PIn, POut, F, Fut>(
    builder: AsyncServerBuilder,
    method: &str,
    f: F,
) -> AsyncServerBuilder
where
    Req: Message + Default + Send + 'static,
    Resp: Message,
    PIn: PayloadMode,
    POut: PayloadMode,
    POut::ToSend: Send,
    F: Fn(Context, AsyncInbound<Req, PIn>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(Resp, POut::ToSend), Status>> + Send + 'static,
{
    builder.register_client_stream(method, move |ctx, rx| {
        let inbound = AsyncInbound::new(ctx.method(), rx);
        let fut = f(ctx, inbound);
        async move {
            let (resp, out) = fut.await?;
            Ok(typed_reply::<Resp, POut>(resp, out))
        }
    })
}

/// Registers a typed async server-streaming handler: the request is
/// checked as for [`register_async_unary`]; `Ok` ends the stream with
/// status OK and the trailers set with [`AsyncOutbound::set_trailers`].
pub fn register_async_server_stream<Req, Resp, PIn, POut, F, Fut>(
    builder: AsyncServerBuilder,
    method: &str,
    f: F,
) -> AsyncServerBuilder
where
    Req: Message + Default,
    Resp: Message + Send + 'static,
    PIn: PayloadMode,
    POut: PayloadMode,
    F: Fn(Context, Req, PIn::Received, AsyncOutbound<Resp, POut>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    builder.register_server_stream(method, move |ctx, body, pages, tx| {
        let trailers = Arc::new(Mutex::new(Vec::new()));
        let outbound = AsyncOutbound::new(tx, trailers.clone());
        let fut = typed_request::<Req, PIn>(&ctx, &body, pages)
            .map(|(req, payload)| f(ctx, req, payload, outbound));
        async move {
            fut?.await?;
            let t = std::mem::take(&mut *trailers.lock());
            Ok(t)
        }
    })
}

/// Registers a typed async bidirectional streaming handler.
pub fn register_async_bidi_stream<Req, Resp, PIn, POut, F, Fut>(
    builder: AsyncServerBuilder,
    method: &str,
    f: F,
) -> AsyncServerBuilder
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
    PIn: PayloadMode,
    POut: PayloadMode,
    F: Fn(Context, AsyncInbound<Req, PIn>, AsyncOutbound<Resp, POut>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    builder.register_bidi_stream(method, move |ctx, rx, tx| {
        let trailers = Arc::new(Mutex::new(Vec::new()));
        let inbound = AsyncInbound::new(ctx.method(), rx);
        let fut = f(ctx, inbound, AsyncOutbound::new(tx, trailers.clone()));
        async move {
            fut.await?;
            let t = std::mem::take(&mut *trailers.lock());
            Ok(t)
        }
    })
}

/// The client's messages of a client-streaming or bidirectional call, as
/// a typed async handler reads them: `Req`, with their [`Pages`] if `P`
/// is [`WithPayload`]. Also a [`futures_core::Stream`] that ends at the
/// client's clean end; a stream cut short yields its error last.
pub struct AsyncInbound<Req, P: PayloadMode> {
    rx: AsyncInStream,
    method: String,
    failed: bool,
    _marker: PhantomData<fn() -> (Req, P)>,
}

impl<Req, P: PayloadMode> std::fmt::Debug for AsyncInbound<Req, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncInbound")
            .field("rx", &self.rx)
            .finish()
    }
}

impl<Req: Message + Default, P: PayloadMode> AsyncInbound<Req, P> {
    fn new(method: &str, rx: AsyncInStream) -> Self {
        AsyncInbound {
            rx,
            method: method.to_owned(),
            failed: false,
            _marker: PhantomData,
        }
    }

    /// The untyped stream underneath.
    pub fn inner(&mut self) -> &mut AsyncInStream {
        &mut self.rx
    }

    fn typed(&self, m: crate::StreamMessage) -> Result<(Req, P::Received), Status> {
        let msg = m.decode::<Req>()?;
        P::receive(m.payload).map(|p| (msg, p)).map_err(|len| {
            unexpected_payload(Code::InvalidArgument, &self.method, "a stream message", len)
        })
    }

    #[allow(clippy::type_complexity)]
    fn poll_message(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<Option<(Req, P::Received)>, Status>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Ok(Some(m))) => Poll::Ready(self.typed(m).map(Some)),
            Poll::Ready(Ok(None)) => Poll::Ready(Ok(None)),
            Poll::Ready(Err(s)) => Poll::Ready(Err(s)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Req: Message + Default> AsyncInbound<Req, WithPayload> {
    /// The next message and its payload, or `None` once the client ended
    /// its messages. A stream the client cut short is an error.
    ///
    /// # Errors
    /// As [`AsyncInStream::recv`], and [`Code::InvalidArgument`] for an
    /// undecodable message.
    pub async fn recv(&mut self) -> Result<Option<(Req, Pages)>, Status> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }
}

impl<Req: Message + Default> AsyncInbound<Req, NoPayload> {
    /// The next message, or `None` once the client ended its messages.
    ///
    /// # Errors
    /// As [`AsyncInStream::recv`], and [`Code::InvalidArgument`] for an
    /// undecodable message or one that carries a payload.
    pub async fn recv(&mut self) -> Result<Option<Req>, Status> {
        let m = std::future::poll_fn(|cx| self.poll_message(cx)).await?;
        Ok(m.map(|(m, ())| m))
    }
}

impl<Req: Message + Default, P: PayloadMode> futures_core::Stream for AsyncInbound<Req, P> {
    type Item = Result<(Req, P::Received), Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match this.poll_message(cx) {
            Poll::Ready(Ok(Some(m))) => Poll::Ready(Some(Ok(m))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => {
                this.failed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The server's messages of a server-streaming or bidirectional call, as a
/// typed async handler sends them: `Resp`, with a payload each if `P` is
/// [`WithPayload`].
pub struct AsyncOutbound<Resp, P: PayloadMode> {
    tx: AsyncOutStream,
    trailers: Arc<Mutex<Vec<MetadataEntry>>>,
    _marker: PhantomData<fn(Resp, P)>,
}

impl<Resp, P: PayloadMode> std::fmt::Debug for AsyncOutbound<Resp, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncOutbound")
            .field("tx", &self.tx)
            .finish()
    }
}

impl<Resp: Message, P: PayloadMode> AsyncOutbound<Resp, P> {
    fn new(tx: AsyncOutStream, trailers: Arc<Mutex<Vec<MetadataEntry>>>) -> Self {
        AsyncOutbound {
            tx,
            trailers,
            _marker: PhantomData,
        }
    }

    /// Whether the call is still going (not cancelled, connection open).
    pub fn is_open(&self) -> bool {
        self.tx.is_open()
    }

    /// Metadata to end the stream with when the handler returns `Ok`.
    pub fn set_trailers(&mut self, trailers: Vec<MetadataEntry>) {
        *self.trailers.lock() = trailers;
    }

    /// The untyped stream underneath.
    pub fn inner(&mut self) -> &mut AsyncOutStream {
        &mut self.tx
    }
}

impl<Resp: Message> AsyncOutbound<Resp, WithPayload> {
    /// Sends one message with its payload, waiting (without holding a
    /// thread) for the client's credit.
    ///
    /// # Errors
    /// As [`AsyncOutStream::send`]; the error hands the payload back.
    pub async fn send(
        &mut self,
        msg: &Resp,
        payload: impl Into<Payload>,
    ) -> Result<(), StreamSendError> {
        self.tx.send(msg, payload).await
    }
}

impl<Resp: Message> AsyncOutbound<Resp, NoPayload> {
    /// Sends one message, waiting (without holding a thread) for the
    /// client's credit.
    ///
    /// # Errors
    /// As [`AsyncOutStream::send`].
    pub async fn send(&mut self, msg: &Resp) -> Result<(), StreamSendError> {
        self.tx.send(msg, Payload::Empty).await
    }
}
