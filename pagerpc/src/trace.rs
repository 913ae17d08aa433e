//! `tracing` spans per call and events per connection (feature `tracing`).
//!
//! Without the feature every hook here is an empty inline function on a
//! zero-sized type: nothing is allocated, measured or recorded.
//!
//! # Call spans
//!
//! Each call gets one span on each side, target `pagerpc`, name `call`,
//! level `DEBUG`, from the moment the call starts (the client opens it; the
//! server is about to run its handler) until it is over on that side (the
//! client got its response or gave up; the server queued its answer). A
//! stream is one call: one span, its sizes summed over its messages. On
//! the server the handler runs inside its call's span, so what a handler
//! logs nests under it. Fields, all recorded when the call ends:
//!
//! - `side`: `"client"` or `"server"`.
//! - `method`: the method name.
//! - `call_id`: the call id on the wire (0 for a call a client interceptor
//!   refused: it never got one).
//! - `request_bytes`: body plus payload bytes of the request, and for a
//!   client-streaming or bidirectional call of every message the client
//!   sent (client side: what it sent; server side: what arrived).
//! - `response_bytes`: body plus payload bytes of the response, or of
//!   every message the server streamed (server side: what it sent; client
//!   side: what arrived).
//! - `mapped_bytes`, `copied_bytes`: of the payload bytes this side
//!   *received* (the server: request payloads; the client: response
//!   payloads), how many the receiver took out of the socket by mapping
//!   their pages (`TCP_ZEROCOPY_RECEIVE` or the patched kernel's `mmap()`)
//!   and how many it copied. Their sum is the payload bytes received on
//!   this side for this call. They are the per-frame share of the
//!   connection's `Counters` (`bytes_mapped` and the `copied_*` counters):
//!   see `Frame::mapped`.
//! - `status`: the call's status code on this side (`Ok`,
//!   `Unauthenticated`, ...; `Cancelled` for a call given up without an
//!   answer, such as a dropped `PendingCall`).
//! - `duration_us`: microseconds from the start of the span to the end of
//!   the call on this side.
//!
//! # Connection events
//!
//! Target `pagerpc`, level `INFO`: `connection_open` when a connection is
//! set up (fields `side`, `peer`) and `connection_close` once when it ends
//! (fields `side`, `peer`, `reason`: why it ended, in words).

#![cfg_attr(not(feature = "tracing"), allow(unused_variables))]

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Instant;

use pagerpc_core::Code;
use pagerpc_receiver::Frame;
use pagerpc_sender::OutFrame;

/// Which end of a call or connection a span or event describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

impl Side {
    #[cfg(feature = "tracing")]
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// The trace of one call: a handle on its span and what it has measured.
/// Cheap to clone (clones share it); the span is recorded and closed when
/// the last clone is dropped. Zero-sized without the feature.
#[derive(Clone, Default)]
pub(crate) struct CallTrace {
    #[cfg(feature = "tracing")]
    inner: Option<std::sync::Arc<imp::Inner>>,
}

impl std::fmt::Debug for CallTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallTrace")
    }
}

impl CallTrace {
    /// Starts the span of call `call_id` to `method` on `side`, its
    /// duration measured from `since` (`call_id` may be set later with
    /// [`set_call_id`](Self::set_call_id)).
    #[inline]
    pub(crate) fn start(side: Side, method: &str, call_id: u64, since: Instant) -> CallTrace {
        CallTrace {
            #[cfg(feature = "tracing")]
            inner: imp::Inner::start(side, method, call_id, since),
        }
    }

    /// The call got its id.
    #[inline]
    pub(crate) fn set_call_id(&self, call_id: u64) {
        #[cfg(feature = "tracing")]
        if let Some(i) = &self.inner {
            i.span.record("call_id", call_id);
        }
    }

    /// This side sent a message of `bytes` bytes, body plus payload (the
    /// request or a client stream message on the client; the response or a
    /// server stream message on the server).
    #[inline]
    pub(crate) fn sent(&self, bytes: u64) {
        #[cfg(feature = "tracing")]
        if let Some(i) = &self.inner {
            i.sent(bytes);
        }
    }

    /// The server answers the call with `frame` (RESPONSE, STREAM_END or
    /// ERROR): counts its size and takes the call's status from it.
    #[inline]
    pub(crate) fn answered(&self, frame: &OutFrame) {
        #[cfg(feature = "tracing")]
        if let Some(i) = &self.inner {
            let h = &frame.header;
            i.sent(h.body.len() as u64 + frame.payload.len() as u64);
            let code = if h.kind == pagerpc_core::Kind::Error as i32 {
                Code::from_u32(h.status_code)
            } else {
                Code::Ok
            };
            let _ = i.status.set(code);
        }
    }

    /// This side received `frame` (the request or a client stream message
    /// on the server; the response or a server stream message on the
    /// client): counts its size and how its payload was placed.
    #[inline]
    pub(crate) fn received(&self, frame: &Frame) {
        #[cfg(feature = "tracing")]
        if let Some(i) = &self.inner {
            i.received(frame);
        }
    }

    /// The call's status on this side (the first one recorded counts).
    #[inline]
    pub(crate) fn status(&self, code: Code) {
        #[cfg(feature = "tracing")]
        if let Some(i) = &self.inner {
            let _ = i.status.set(code);
        }
    }

    /// This handle is done: the span is recorded and closed now if no
    /// clone of it is left (a stream's halves may still hold one).
    #[inline]
    pub(crate) fn end(self) {}

    /// Runs `f` inside the call's span (so what it logs nests under it).
    #[inline]
    pub(crate) fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "tracing")]
        if let Some(i) = &self.inner {
            return i.span.in_scope(f);
        }
        f()
    }
}

/// A connection's open/close events. Emits `connection_open` when made
/// and `connection_close` once: at the first [`closed`](Self::closed), or
/// when dropped. Zero-sized without the feature.
#[derive(Debug)]
pub(crate) struct ConnTrace {
    #[cfg(feature = "tracing")]
    side: Side,
    #[cfg(feature = "tracing")]
    peer: SocketAddr,
    #[cfg(feature = "tracing")]
    closed: std::sync::atomic::AtomicBool,
}

impl ConnTrace {
    /// A connection with `peer` is open on `side`.
    #[inline]
    pub(crate) fn open(side: Side, peer: SocketAddr) -> ConnTrace {
        conn_open(side, peer);
        ConnTrace {
            #[cfg(feature = "tracing")]
            side,
            #[cfg(feature = "tracing")]
            peer,
            #[cfg(feature = "tracing")]
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The connection ended, because of `reason` (only the first call
    /// emits the event).
    #[inline]
    pub(crate) fn closed(&self, reason: &dyn Display) {
        #[cfg(feature = "tracing")]
        if !self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            conn_close(self.side, self.peer, reason);
        }
    }
}

impl Drop for ConnTrace {
    fn drop(&mut self) {
        self.closed(&"the last handle to the connection was dropped");
    }
}

/// Emits `connection_open`.
#[inline]
pub(crate) fn conn_open(side: Side, peer: SocketAddr) {
    #[cfg(feature = "tracing")]
    tracing::info!(
        name: "connection_open",
        target: "pagerpc",
        side = side.name(),
        peer = %peer,
        "connection open"
    );
}

/// Emits `connection_close` (callers make sure it is once per
/// connection).
#[inline]
pub(crate) fn conn_close(side: Side, peer: SocketAddr, reason: &dyn Display) {
    #[cfg(feature = "tracing")]
    tracing::info!(
        name: "connection_close",
        target: "pagerpc",
        side = side.name(),
        peer = %peer,
        reason = %reason,
        "connection closed"
    );
}

#[cfg(feature = "tracing")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::{Arc, OnceLock};
    use std::time::Instant;

    use pagerpc_core::Code;
    use pagerpc_receiver::Frame;
    use tracing::field::Empty;
    use tracing::Span;

    use super::Side;

    pub(super) struct Inner {
        pub(super) span: Span,
        side: Side,
        start: Instant,
        sent: AtomicU64,
        received: AtomicU64,
        mapped: AtomicU64,
        copied: AtomicU64,
        pub(super) status: OnceLock<Code>,
    }

    impl Inner {
        pub(super) fn start(
            side: Side,
            method: &str,
            call_id: u64,
            since: Instant,
        ) -> Option<Arc<Inner>> {
            let span = tracing::debug_span!(
                target: "pagerpc",
                "call",
                side = side.name(),
                method = method,
                call_id = call_id,
                request_bytes = Empty,
                response_bytes = Empty,
                mapped_bytes = Empty,
                copied_bytes = Empty,
                status = Empty,
                duration_us = Empty,
            );
            if span.is_disabled() {
                return None;
            }
            Some(Arc::new(Inner {
                span,
                side,
                start: since,
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                mapped: AtomicU64::new(0),
                copied: AtomicU64::new(0),
                status: OnceLock::new(),
            }))
        }

        pub(super) fn sent(&self, bytes: u64) {
            self.sent.fetch_add(bytes, Relaxed);
        }

        pub(super) fn received(&self, frame: &Frame) {
            let payload = frame.payload.len() as u64;
            let mapped = frame.mapped.min(payload);
            self.received
                .fetch_add(frame.head.header.body.len() as u64 + payload, Relaxed);
            self.mapped.fetch_add(mapped, Relaxed);
            self.copied.fetch_add(payload - mapped, Relaxed);
        }
    }

    impl Drop for Inner {
        fn drop(&mut self) {
            let (request, response) = match self.side {
                Side::Client => (&self.sent, &self.received),
                Side::Server => (&self.received, &self.sent),
            };
            let s = &self.span;
            s.record("request_bytes", request.load(Relaxed));
            s.record("response_bytes", response.load(Relaxed));
            s.record("mapped_bytes", self.mapped.load(Relaxed));
            s.record("copied_bytes", self.copied.load(Relaxed));
            let code = self.status.get().copied().unwrap_or(Code::Cancelled);
            s.record("status", tracing::field::debug(code));
            s.record(
                "duration_us",
                u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX),
            );
        }
    }
}
