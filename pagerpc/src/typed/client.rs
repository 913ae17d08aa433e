//! The client side of typed calls: a unary call, and typed handles over
//! the stream handles of [`Client`](crate::Client).

use std::marker::PhantomData;

use pagerpc_core::{Code, MetadataEntry};
use pagerpc_pages::{Pages, Payload};
use prost::Message;

use super::{unexpected_payload, NoPayload, PayloadMode, WithPayload};
use crate::{
    CallError, CallOptions, Client, Response, StreamReceiver, StreamResponse, StreamSender,
};

/// Checks a response's payload against the method's response mode.
pub(super) fn check_response<T, P: PayloadMode>(
    method: &str,
    r: Response<T>,
) -> Result<Response<T>, CallError> {
    if !P::CARRIES_PAYLOAD && !r.payload.is_empty() {
        return Err(CallError::new(unexpected_payload(
            Code::Internal,
            method,
            "the response",
            r.payload.len(),
        )));
    }
    Ok(r)
}

/// Calls a unary `method` with a typed request and payload and waits for
/// the typed response, whose payload is checked against `POut`.
///
/// # Errors
/// As [`Client::call`], and [`Code::Internal`] for a response payload on a
/// method whose responses carry none.
pub fn call_unary<Req: Message, Resp: Message + Default, POut: PayloadMode>(
    client: &Client,
    method: &str,
    req: &Req,
    payload: Payload,
    opts: &CallOptions,
) -> Result<Response<Resp>, CallError> {
    let r = client.call_with(method, req, payload, opts)?;
    check_response::<Resp, POut>(method, r)
}

/// The client's typed sending half of a client-streaming or bidirectional
/// call: messages of type `T`, with payloads if `P` is [`WithPayload`].
/// Dropping it before [`finish`](Self::finish) cancels the call.
#[derive(Debug)]
pub struct Sender<T, P: PayloadMode> {
    inner: StreamSender,
    _marker: PhantomData<fn(T, P)>,
}

impl<T: Message, P: PayloadMode> Sender<T, P> {
    /// Wraps an untyped sender (generated code does this).
    pub fn new(inner: StreamSender) -> Self {
        Sender {
            inner,
            _marker: PhantomData,
        }
    }

    /// The call id on the wire.
    pub fn id(&self) -> u64 {
        self.inner.id()
    }

    /// Ends the client's messages (half-close).
    ///
    /// # Errors
    /// As [`StreamSender::finish`].
    pub fn finish(self) -> Result<(), CallError> {
        self.inner.finish()
    }

    /// Ends the call with an error the server sees as such.
    pub fn abort(self, status: crate::Status) {
        self.inner.abort(status)
    }

    /// The untyped sender underneath.
    pub fn into_inner(self) -> StreamSender {
        self.inner
    }
}

impl<T: Message> Sender<T, WithPayload> {
    /// Sends one message with its payload, waiting for the server's credit.
    ///
    /// # Errors
    /// As [`StreamSender::send`]; the error hands the payload back when
    /// none of it was written.
    pub fn send(&mut self, msg: &T, payload: impl Into<Payload>) -> Result<(), CallError> {
        self.inner.send(msg, payload)
    }
}

impl<T: Message> Sender<T, NoPayload> {
    /// Sends one message, waiting for the server's credit.
    ///
    /// # Errors
    /// As [`StreamSender::send`].
    pub fn send(&mut self, msg: &T) -> Result<(), CallError> {
        self.inner.send(msg, Payload::Empty)
    }
}

/// The client's typed receiving half of a server-streaming or
/// bidirectional call: messages of type `T`, with their [`Pages`] if `P`
/// is [`WithPayload`]. Dropping it before the end cancels the call. As an
/// [`Iterator`] it yields each message and ends after the stream's clean
/// end; a stream cut short yields its error last.
#[derive(Debug)]
pub struct Receiver<T, P: PayloadMode> {
    inner: StreamReceiver,
    method: &'static str,
    /// An error was yielded: the iterator is over.
    failed: bool,
    _marker: PhantomData<fn() -> (T, P)>,
}

impl<T: Message + Default, P: PayloadMode> Receiver<T, P> {
    /// Wraps an untyped receiver of `method` (generated code does this).
    pub fn new(inner: StreamReceiver, method: &'static str) -> Self {
        Receiver {
            inner,
            method,
            failed: false,
            _marker: PhantomData,
        }
    }

    /// The call id on the wire.
    pub fn id(&self) -> u64 {
        self.inner.id()
    }

    /// The metadata the server ended the stream with, once the stream
    /// ended cleanly (empty before).
    pub fn trailers(&self) -> &[MetadataEntry] {
        self.inner.trailers()
    }

    /// The untyped receiver underneath.
    pub fn into_inner(self) -> StreamReceiver {
        self.inner
    }

    fn next_message(&mut self) -> Result<Option<(T, P::Received)>, CallError> {
        let Some((msg, pages)) = self.inner.recv_typed::<T>()? else {
            return Ok(None);
        };
        match P::receive(pages) {
            Ok(p) => Ok(Some((msg, p))),
            Err(len) => {
                let status =
                    unexpected_payload(Code::Internal, self.method, "a stream message", len);
                Err(CallError::new(status))
            }
        }
    }
}

impl<T: Message + Default> Receiver<T, WithPayload> {
    /// The next message and its payload, or `None` after the stream's
    /// clean end. A stream cut short is an error, never `None`.
    ///
    /// # Errors
    /// As [`StreamReceiver::recv_typed`].
    pub fn recv(&mut self) -> Result<Option<(T, Pages)>, CallError> {
        self.next_message()
    }
}

impl<T: Message + Default> Receiver<T, NoPayload> {
    /// The next message, or `None` after the stream's clean end. A stream
    /// cut short is an error, never `None`.
    ///
    /// # Errors
    /// As [`StreamReceiver::recv_typed`], and [`Code::Internal`] for a
    /// message that carries a payload.
    pub fn recv(&mut self) -> Result<Option<T>, CallError> {
        Ok(self.next_message()?.map(|(m, ())| m))
    }
}

impl<T: Message + Default, P: PayloadMode> Iterator for Receiver<T, P> {
    type Item = Result<(T, P::Received), CallError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_message() {
            Ok(Some(m)) => Some(Ok(m)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The typed response of a client-streaming call. Dropping it before the
/// response arrives cancels the call.
#[derive(Debug)]
pub struct PendingResponse<T, P: PayloadMode> {
    inner: StreamResponse,
    method: &'static str,
    _marker: PhantomData<fn() -> (T, P)>,
}

impl<T: Message + Default, P: PayloadMode> PendingResponse<T, P> {
    /// Wraps an untyped response of `method` (generated code does this).
    pub fn new(inner: StreamResponse, method: &'static str) -> Self {
        PendingResponse {
            inner,
            method,
            _marker: PhantomData,
        }
    }

    /// Waits for the response (after [`Sender::finish`], or earlier if the
    /// server answers before reading everything).
    ///
    /// # Errors
    /// As [`StreamResponse::wait`], and [`Code::Internal`] for a response
    /// payload where the method carries none.
    pub fn wait(self) -> Result<Response<T>, CallError> {
        let r = self.inner.wait::<T>()?;
        check_response::<T, P>(self.method, r)
    }
}
