//! The async client side of typed calls (feature `tokio`): a unary call,
//! and typed handles over [`AsyncClient`](crate::AsyncClient)'s stream
//! handles. What `pagerpc-build`'s `XAsyncClient` calls into.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use futures_core::Stream;
use pagerpc_core::{Code, MetadataEntry};
use pagerpc_pages::{Pages, Payload};
use prost::Message;

use super::client::check_response;
use super::{unexpected_payload, NoPayload, PayloadMode, WithPayload};
use crate::{
    AsyncClient, AsyncStreamReceiver, AsyncStreamResponse, AsyncStreamSender, CallError,
    CallOptions, Response, StreamMessage,
};

/// Calls a unary `method` through an [`AsyncClient`] and waits for the
/// typed response, whose payload is checked against `POut`.
///
/// # Errors
/// As [`AsyncClient::call`], and [`Code::Internal`] for a response payload
/// on a method whose responses carry none.
pub async fn call_unary_async<Req: Message, Resp: Message + Default, POut: PayloadMode>(
    client: &AsyncClient,
    method: &str,
    req: &Req,
    payload: Payload,
    opts: &CallOptions,
) -> Result<Response<Resp>, CallError> {
    let r = client.call_with(method, req, payload, opts).await?;
    check_response::<Resp, POut>(method, r)
}

/// The client's typed sending half of an async client-streaming or
/// bidirectional call. Dropping it before [`finish`](Self::finish) cancels
/// the call.
#[derive(Debug)]
pub struct AsyncSender<T, P: PayloadMode> {
    inner: AsyncStreamSender,
    _marker: PhantomData<fn(T, P)>,
}

impl<T: Message, P: PayloadMode> AsyncSender<T, P> {
    /// Wraps an untyped sender (generated code does this).
    pub fn new(inner: AsyncStreamSender) -> Self {
        AsyncSender {
            inner,
            _marker: PhantomData,
        }
    }

    /// Ends the client's messages (half-close).
    ///
    /// # Errors
    /// As [`AsyncStreamSender::finish`].
    pub async fn finish(self) -> Result<(), CallError> {
        self.inner.finish().await
    }

    /// Ends the call with an error the server sees as such.
    pub fn abort(self, status: crate::Status) {
        self.inner.abort(status)
    }

    /// The untyped sender underneath.
    pub fn into_inner(self) -> AsyncStreamSender {
        self.inner
    }
}

impl<T: Message> AsyncSender<T, WithPayload> {
    /// Sends one message with its payload, waiting (without holding a
    /// thread) for the server's credit.
    ///
    /// # Errors
    /// As [`AsyncStreamSender::send`].
    pub async fn send(&mut self, msg: &T, payload: impl Into<Payload>) -> Result<(), CallError> {
        self.inner.send(msg, payload).await
    }
}

impl<T: Message> AsyncSender<T, NoPayload> {
    /// Sends one message, waiting (without holding a thread) for the
    /// server's credit.
    ///
    /// # Errors
    /// As [`AsyncStreamSender::send`].
    pub async fn send(&mut self, msg: &T) -> Result<(), CallError> {
        self.inner.send(msg, Payload::Empty).await
    }
}

/// The client's typed receiving half of an async server-streaming or
/// bidirectional call; also a [`Stream`] that ends after the stream's
/// clean end (a stream cut short yields its error last). Dropping it
/// before the end cancels the call.
#[derive(Debug)]
pub struct AsyncReceiver<T, P: PayloadMode> {
    inner: AsyncStreamReceiver,
    method: &'static str,
    failed: bool,
    _marker: PhantomData<fn() -> (T, P)>,
}

impl<T: Message + Default, P: PayloadMode> AsyncReceiver<T, P> {
    /// Wraps an untyped receiver of `method` (generated code does this).
    pub fn new(inner: AsyncStreamReceiver, method: &'static str) -> Self {
        AsyncReceiver {
            inner,
            method,
            failed: false,
            _marker: PhantomData,
        }
    }

    /// The metadata the server ended the stream with (empty before).
    pub fn trailers(&self) -> &[MetadataEntry] {
        self.inner.trailers()
    }

    /// The untyped receiver underneath.
    pub fn into_inner(self) -> AsyncStreamReceiver {
        self.inner
    }

    fn typed(&self, m: StreamMessage) -> Result<(T, P::Received), CallError> {
        let msg = T::decode(m.body.as_slice()).map_err(|e| {
            CallError::new(crate::Status::internal(format!(
                "undecodable stream message: {e}"
            )))
        })?;
        P::receive(m.payload).map(|p| (msg, p)).map_err(|len| {
            CallError::new(unexpected_payload(
                Code::Internal,
                self.method,
                "a stream message",
                len,
            ))
        })
    }

    #[allow(clippy::type_complexity)]
    fn poll_message(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<(T, P::Received), CallError>>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(m))) => Poll::Ready(Some(self.typed(m))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Message + Default> AsyncReceiver<T, WithPayload> {
    /// The next message and its payload, or `None` after the stream's clean
    /// end. A stream cut short is an error, never `None`.
    ///
    /// # Errors
    /// As [`AsyncStreamReceiver::recv`], and [`Code::Internal`] for an
    /// undecodable message.
    pub async fn recv(&mut self) -> Result<Option<(T, Pages)>, CallError> {
        std::future::poll_fn(|cx| self.poll_message(cx))
            .await
            .transpose()
    }
}

impl<T: Message + Default> AsyncReceiver<T, NoPayload> {
    /// The next message, or `None` after the stream's clean end.
    ///
    /// # Errors
    /// As [`AsyncStreamReceiver::recv`], and [`Code::Internal`] for an
    /// undecodable message or one that carries a payload.
    pub async fn recv(&mut self) -> Result<Option<T>, CallError> {
        let m = std::future::poll_fn(|cx| self.poll_message(cx))
            .await
            .transpose()?;
        Ok(m.map(|(m, ())| m))
    }
}

impl<T: Message + Default, P: PayloadMode> Stream for AsyncReceiver<T, P> {
    type Item = Result<(T, P::Received), CallError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        // Fused after an error, as the sync `Receiver`'s `Iterator` is;
        // `recv` never reads this flag, so an error is never followed by a
        // `None` that would look like the stream's clean end.
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        let r = this.poll_message(cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            this.failed = true;
        }
        r
    }
}

/// The typed response of an async client-streaming call. Dropping it
/// before the response arrives cancels the call.
#[derive(Debug)]
pub struct AsyncPendingResponse<T, P: PayloadMode> {
    inner: AsyncStreamResponse,
    method: &'static str,
    _marker: PhantomData<fn() -> (T, P)>,
}

impl<T: Message + Default, P: PayloadMode> AsyncPendingResponse<T, P> {
    /// Wraps an untyped response of `method` (generated code does this).
    pub fn new(inner: AsyncStreamResponse, method: &'static str) -> Self {
        AsyncPendingResponse {
            inner,
            method,
            _marker: PhantomData,
        }
    }

    /// Waits for the response.
    ///
    /// # Errors
    /// As [`AsyncStreamResponse::wait`], and [`Code::Internal`] for a
    /// response payload where the method carries none.
    pub async fn wait(self) -> Result<Response<T>, CallError> {
        let r = self.inner.wait::<T>().await?;
        check_response::<T, P>(self.method, r)
    }
}
