//! Interceptors: hooks that see every call before it goes out (client) or
//! before its handler runs (server).
//!
//! A [`ClientInterceptor`] is attached to a [`Client`](crate::Client) with
//! [`Client::with_interceptor`](crate::Client::with_interceptor). It sees
//! each outgoing call, unary or streaming, as an [`OutgoingCall`]: the
//! method, the metadata about to be sent (which it may change, for example
//! to add an auth token) and the deadline. Returning an error refuses the
//! call locally: nothing is sent, and the caller gets a
//! [`CallError`](crate::CallError) with that status and its payload back.
//!
//! A [`ServerInterceptor`] is added to a server with
//! [`ServerBuilder::interceptor`](crate::ServerBuilder::interceptor). It
//! sees each call's [`Context`] (method, metadata, peer, deadline) before
//! the handler runs, unary or streaming. Returning an error refuses the
//! call: the handler never runs, and the caller gets exactly that status.
//!
//! Several interceptors run in the order they were added; the first refusal
//! stops the call. Both traits are implemented for closures of the right
//! shape, so a plain `|call: &mut OutgoingCall<'_>| { ... }` or
//! `|ctx: &Context| { ... }` is an interceptor.
//!
//! ```no_run
//! use pagerpc::{Client, Context, OutgoingCall, Server, Status};
//!
//! let server = Server::builder()
//!     .interceptor(|ctx: &Context| {
//!         match ctx.metadata().iter().find(|m| m.key == "authorization") {
//!             Some(m) if m.value == b"secret" => Ok(()),
//!             _ => Err(Status::unauthenticated("no valid token")),
//!         }
//!     })
//!     .bind("127.0.0.1:0")?;
//! let client = Client::connect(server.local_addr())?.with_interceptor(
//!     |call: &mut OutgoingCall<'_>| {
//!         call.insert_metadata("authorization", b"secret".to_vec());
//!         Ok(())
//!     },
//! );
//! # let _ = client;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use pagerpc_core::{MetadataEntry, Status};

use crate::server::Context;

/// An outgoing call as a [`ClientInterceptor`] sees it, before anything is
/// sent.
#[derive(Debug)]
pub struct OutgoingCall<'a> {
    method: &'a str,
    metadata: &'a mut Vec<MetadataEntry>,
    deadline: Option<Instant>,
    stream: bool,
}

impl<'a> OutgoingCall<'a> {
    /// A call of `method` about to be sent with `metadata`. Front ends
    /// (blocking or async) build one per call and hand it to
    /// [`ClientInterceptors::run`].
    pub(crate) fn new(
        method: &'a str,
        metadata: &'a mut Vec<MetadataEntry>,
        deadline: Option<Instant>,
        stream: bool,
    ) -> OutgoingCall<'a> {
        OutgoingCall {
            method,
            metadata,
            deadline,
            stream,
        }
    }

    /// The method called.
    pub fn method(&self) -> &str {
        self.method
    }

    /// The metadata that will be sent with the request.
    pub fn metadata(&self) -> &[MetadataEntry] {
        self.metadata
    }

    /// The metadata that will be sent, to change as a whole.
    pub fn metadata_mut(&mut self) -> &mut Vec<MetadataEntry> {
        self.metadata
    }

    /// Sets metadata `key` to `value`: replaces the value of every entry
    /// with that key already there (keeping the first, dropping the
    /// others), or appends one.
    pub fn insert_metadata(&mut self, key: &str, value: impl Into<Vec<u8>>) {
        let value = value.into();
        let mut seen = false;
        self.metadata.retain_mut(|m| {
            if m.key != key {
                return true;
            }
            if seen {
                return false;
            }
            seen = true;
            m.value.clone_from(&value);
            true
        });
        if !seen {
            self.metadata.push(MetadataEntry {
                key: key.to_owned(),
                value,
            });
        }
    }

    /// When the caller stops waiting, if the call has a deadline (its own
    /// timeout or the client's default).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether this opens a stream (client-streaming, server-streaming or
    /// bidirectional) rather than a unary call.
    pub fn is_stream(&self) -> bool {
        self.stream
    }
}

/// A hook that sees every call a [`Client`](crate::Client) sends (unary
/// calls and the three kinds of stream), in the calling thread, before
/// anything is sent.
///
/// Implemented for every `Fn(&mut OutgoingCall<'_>) -> Result<(), Status>`
/// closure that is `Send + Sync + 'static` (annotate the argument's type:
/// `|call: &mut OutgoingCall<'_>| ...`).
pub trait ClientInterceptor: Send + Sync + 'static {
    /// Looks at (and may change the metadata of) one outgoing call.
    ///
    /// # Errors
    /// A status refuses the call: it fails locally with that status,
    /// nothing is sent, and the caller gets its payload back
    /// ([`CallError::take_payload`](crate::CallError::take_payload)).
    fn intercept(&self, call: &mut OutgoingCall<'_>) -> Result<(), Status>;
}

impl<F> ClientInterceptor for F
where
    F: Fn(&mut OutgoingCall<'_>) -> Result<(), Status> + Send + Sync + 'static,
{
    fn intercept(&self, call: &mut OutgoingCall<'_>) -> Result<(), Status> {
        self(call)
    }
}

/// A hook that sees every call a server receives, after its request
/// arrived and before its handler runs (unary and streaming handlers
/// alike), on the thread that would run the handler.
///
/// It guards handlers: a call the server answers without one (an unknown
/// method, a deadline already passed, a request refused by the server's
/// limits) is answered as before, without running the interceptors.
///
/// Implemented for every `Fn(&Context) -> Result<(), Status>` closure that
/// is `Send + Sync + 'static`.
pub trait ServerInterceptor: Send + Sync + 'static {
    /// Looks at one call (its method, metadata, peer and deadline).
    ///
    /// # Errors
    /// A status refuses the call: its handler never runs, and the caller
    /// gets exactly this status.
    fn intercept(&self, ctx: &Context) -> Result<(), Status>;
}

impl<F> ServerInterceptor for F
where
    F: Fn(&Context) -> Result<(), Status> + Send + Sync + 'static,
{
    fn intercept(&self, ctx: &Context) -> Result<(), Status> {
        self(ctx)
    }
}

/// The interceptors of one client handle, in order. Cheap to clone
/// (shared); empty costs nothing but a null check.
#[derive(Clone, Default)]
pub(crate) struct ClientInterceptors {
    list: Option<Arc<[Arc<dyn ClientInterceptor>]>>,
}

impl ClientInterceptors {
    /// These interceptors, then `i`.
    pub(crate) fn with(&self, i: Arc<dyn ClientInterceptor>) -> ClientInterceptors {
        let mut v: Vec<Arc<dyn ClientInterceptor>> =
            self.list.as_deref().map(<[_]>::to_vec).unwrap_or_default();
        v.push(i);
        ClientInterceptors {
            list: Some(v.into()),
        }
    }

    /// Runs every interceptor on `call`, in order, up to the first refusal.
    pub(crate) fn run(&self, call: &mut OutgoingCall<'_>) -> Result<(), Status> {
        for i in self.list.as_deref().unwrap_or_default() {
            i.intercept(call)?;
        }
        Ok(())
    }
}

impl fmt::Debug for ClientInterceptors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} interceptors",
            self.list.as_deref().map_or(0, <[_]>::len)
        )
    }
}

/// A server's interceptors, in order.
#[derive(Clone, Default)]
pub(crate) struct ServerInterceptors {
    list: Vec<Arc<dyn ServerInterceptor>>,
}

impl ServerInterceptors {
    pub(crate) fn push(&mut self, i: Arc<dyn ServerInterceptor>) {
        self.list.push(i);
    }

    /// Runs every interceptor on the call `ctx`, in order, up to the first
    /// refusal. Every server front end calls this once per call, right
    /// before it would run the call's handler, and runs the handler only on
    /// `Ok`; on `Err` the status is the call's answer.
    /// A panicking interceptor fails the call with `Internal`, not the
    /// server.
    pub(crate) fn check(&self, ctx: &Context) -> Result<(), Status> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.list.iter().try_for_each(|i| i.intercept(ctx))
        }))
        .unwrap_or_else(|_| Err(Status::internal("an interceptor panicked")))
    }
}

impl fmt::Debug for ServerInterceptors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} interceptors", self.list.len())
    }
}
