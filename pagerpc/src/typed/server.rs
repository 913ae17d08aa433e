//! The server side of typed calls: registering typed handlers, and typed
//! views of a handler's streams.

use std::marker::PhantomData;

use pagerpc_core::{Code, MetadataEntry, Status};
use pagerpc_pages::Pages;
use prost::Message;

use super::{typed_reply, typed_request, unexpected_payload, NoPayload, PayloadMode, WithPayload};
use crate::{Context, InStream, OutStream, ServerBuilder, StreamSendError};

/// A set of methods registered together: what `pagerpc-build` generates
/// for a `.proto` service (`KvServer::new(my_impl)`), given to
/// [`ServerBuilder::add_service`].
pub trait Service {
    /// The service's full name, `package.Service`.
    const NAME: &'static str;

    /// Registers every method of the service on `builder`.
    fn register(self, builder: ServerBuilder) -> ServerBuilder;
}

/// Registers a typed unary handler: a request that does not decode as
/// `Req`, or that carries a payload where `PIn` says none, is answered
/// with [`Code::InvalidArgument`] without calling `f`.
pub fn register_unary<Req, Resp, PIn, POut, F>(
    builder: ServerBuilder,
    method: &str,
    f: F,
) -> ServerBuilder
where
    Req: Message + Default,
    Resp: Message,
    PIn: PayloadMode,
    POut: PayloadMode,
    F: Fn(&Context, Req, PIn::Received) -> Result<(Resp, POut::ToSend), Status>
        + Send
        + Sync
        + 'static,
{
    builder.register_raw(method, move |ctx, body, pages| {
        let (req, payload) = typed_request::<Req, PIn>(ctx, body, pages)?;
        let (resp, out) = f(ctx, req, payload)?;
        Ok(typed_reply::<Resp, POut>(resp, out))
    })
}

/// Registers a typed client-streaming handler (see
/// [`ServerBuilder::register_client_stream`]).
pub fn register_client_stream<Req, Resp, PIn, POut, F>(
    builder: ServerBuilder,
    method: &str,
    f: F,
) -> ServerBuilder
where
    Req: Message + Default,
    Resp: Message,
    PIn: PayloadMode,
    POut: PayloadMode,
    F: Fn(&Context, Inbound<'_, Req, PIn>) -> Result<(Resp, POut::ToSend), Status>
        + Send
        + Sync
        + 'static,
{
    builder.register_client_stream(method, move |ctx, rx| {
        let (resp, out) = f(ctx, Inbound::new(ctx, rx))?;
        Ok(typed_reply::<Resp, POut>(resp, out))
    })
}

/// Registers a typed server-streaming handler (see
/// [`ServerBuilder::register_server_stream`]): the request is checked as
/// for [`register_unary`]; `Ok` ends the stream with status OK and the
/// trailers set with [`Outbound::set_trailers`].
pub fn register_server_stream<Req, Resp, PIn, POut, F>(
    builder: ServerBuilder,
    method: &str,
    f: F,
) -> ServerBuilder
where
    Req: Message + Default,
    Resp: Message,
    PIn: PayloadMode,
    POut: PayloadMode,
    F: Fn(&Context, Req, PIn::Received, Outbound<'_, Resp, POut>) -> Result<(), Status>
        + Send
        + Sync
        + 'static,
{
    builder.register_server_stream(method, move |ctx, body, pages, tx| {
        let (req, payload) = typed_request::<Req, PIn>(ctx, body, pages)?;
        let mut trailers = Vec::new();
        f(ctx, req, payload, Outbound::new(tx, &mut trailers))?;
        Ok(trailers)
    })
}

/// Registers a typed bidirectional streaming handler (see
/// [`ServerBuilder::register_bidi_stream`]).
pub fn register_bidi_stream<Req, Resp, PIn, POut, F>(
    builder: ServerBuilder,
    method: &str,
    f: F,
) -> ServerBuilder
where
    Req: Message + Default,
    Resp: Message,
    PIn: PayloadMode,
    POut: PayloadMode,
    F: Fn(&Context, Inbound<'_, Req, PIn>, Outbound<'_, Resp, POut>) -> Result<(), Status>
        + Send
        + Sync
        + 'static,
{
    builder.register_bidi_stream(method, move |ctx, rx, tx| {
        let mut trailers = Vec::new();
        f(ctx, Inbound::new(ctx, rx), Outbound::new(tx, &mut trailers))?;
        Ok(trailers)
    })
}

/// The client's messages of a client-streaming or bidirectional call, as
/// a typed handler reads them: `Req`, with their [`Pages`] if `P` is
/// [`WithPayload`]. As an [`Iterator`] it yields each message and ends at
/// the client's clean end; a stream cut short yields its error last.
pub struct Inbound<'a, Req, P: PayloadMode> {
    rx: &'a mut InStream,
    method: &'a str,
    failed: bool,
    _marker: PhantomData<fn() -> (Req, P)>,
}

impl<Req, P: PayloadMode> std::fmt::Debug for Inbound<'_, Req, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").field("rx", &self.rx).finish()
    }
}

impl<'a, Req: Message + Default, P: PayloadMode> Inbound<'a, Req, P> {
    fn new(ctx: &'a Context, rx: &'a mut InStream) -> Self {
        Inbound {
            rx,
            method: ctx.method(),
            failed: false,
            _marker: PhantomData,
        }
    }

    /// The untyped stream underneath.
    pub fn inner(&mut self) -> &mut InStream {
        self.rx
    }

    fn next_message(&mut self) -> Result<Option<(Req, P::Received)>, Status> {
        let Some((msg, pages)) = self.rx.recv_typed::<Req>()? else {
            return Ok(None);
        };
        match P::receive(pages) {
            Ok(p) => Ok(Some((msg, p))),
            Err(len) => Err(unexpected_payload(
                Code::InvalidArgument,
                self.method,
                "a stream message",
                len,
            )),
        }
    }
}

impl<Req: Message + Default> Inbound<'_, Req, WithPayload> {
    /// The next message and its payload, or `None` once the client ended
    /// its messages. A stream the client cut short is an error.
    ///
    /// # Errors
    /// As [`InStream::recv_typed`].
    pub fn recv(&mut self) -> Result<Option<(Req, Pages)>, Status> {
        self.next_message()
    }
}

impl<Req: Message + Default> Inbound<'_, Req, NoPayload> {
    /// The next message, or `None` once the client ended its messages. A
    /// stream the client cut short is an error.
    ///
    /// # Errors
    /// As [`InStream::recv_typed`], and [`Code::InvalidArgument`] for a
    /// message that carries a payload.
    pub fn recv(&mut self) -> Result<Option<Req>, Status> {
        Ok(self.next_message()?.map(|(m, ())| m))
    }
}

impl<Req: Message + Default, P: PayloadMode> Iterator for Inbound<'_, Req, P> {
    type Item = Result<(Req, P::Received), Status>;

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

/// The server's messages of a server-streaming or bidirectional call, as
/// a typed handler sends them: `Resp`, with a payload each if `P` is
/// [`WithPayload`].
pub struct Outbound<'a, Resp, P: PayloadMode> {
    tx: &'a mut OutStream,
    trailers: &'a mut Vec<MetadataEntry>,
    _marker: PhantomData<fn(Resp, P)>,
}

impl<Resp, P: PayloadMode> std::fmt::Debug for Outbound<'_, Resp, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").field("tx", &self.tx).finish()
    }
}

impl<'a, Resp: Message, P: PayloadMode> Outbound<'a, Resp, P> {
    fn new(tx: &'a mut OutStream, trailers: &'a mut Vec<MetadataEntry>) -> Self {
        Outbound {
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
        *self.trailers = trailers;
    }

    /// The untyped stream underneath.
    pub fn inner(&mut self) -> &mut OutStream {
        self.tx
    }
}

impl<Resp: Message> Outbound<'_, Resp, WithPayload> {
    /// Sends one message with its payload, waiting for the client's
    /// credit.
    ///
    /// # Errors
    /// As [`OutStream::send`]; the error hands the payload back.
    pub fn send(
        &mut self,
        msg: &Resp,
        payload: impl Into<crate::Payload>,
    ) -> Result<(), StreamSendError> {
        self.tx.send(msg, payload)
    }
}

impl<Resp: Message> Outbound<'_, Resp, NoPayload> {
    /// Sends one message, waiting for the client's credit.
    ///
    /// # Errors
    /// As [`OutStream::send`].
    pub fn send(&mut self, msg: &Resp) -> Result<(), StreamSendError> {
        self.tx.send(msg, crate::Payload::Empty)
    }
}
