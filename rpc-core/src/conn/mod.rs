//! The connection state machines, without I/O.
//!
//! [`ClientConn`] holds a client connection's calls: ids, the calls
//! waiting for an answer, what each frame from the server means, and the
//! status the connection died with; the blocking client drives it from
//! whichever caller holds the reader role.
//!
//! [`ServerConn`] holds everything one server connection decides: which
//! calls are in flight (duplicate and zero ids refused, the in-flight
//! limit), whether the peer has authenticated, whether reading must pause
//! because responses are piling up, and which timeout fires next. It makes
//! no system call and reads no clock: the driver (a thread pool, or an
//! async runtime) feeds it events with the time they happened (`now`) and
//! asks [`ServerConn::poll_timeout`] when to call
//! [`ServerConn::handle_timeout`] next, the way quinn-proto's `Connection`
//! is driven. Tests drive it with a virtual clock.

mod calls;
mod client;
pub mod flow;
#[cfg(feature = "model")]
pub mod model;
pub mod settings;
mod timers;

use std::time::{Duration, Instant};

pub use calls::{CallTable, Refusal};
pub use client::{ClientConn, Incoming};
pub use flow::{InCredit, OutCredit, WindowExceeded};
pub use settings::{PeerSettings, DEFAULT_CONN_WINDOW, DEFAULT_STREAM_WINDOW};
pub use timers::{IoSnapshot, Timeout, Timers};

/// Settings of one connection's state machine.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct ConnConfig {
    /// Most calls in flight at once (see `ServerConfig::max_inflight_per_conn`).
    pub max_inflight: usize,
    /// Most response bytes queued for the peer before the connection stops
    /// reading requests.
    pub outbound_max_bytes: usize,
    /// Time a started prefix+header may take in all.
    pub header_timeout: Option<Duration>,
    /// Time the peer may make no progress while it owes us bytes (inside a
    /// frame) or we have bytes for it (queued responses it does not read).
    pub progress_timeout: Option<Duration>,
    /// Time a connection with nothing to do may stay open.
    pub idle_timeout: Option<Duration>,
    /// Time a peer has to authenticate, when authentication is required.
    pub handshake_timeout: Option<Duration>,
    /// Whether the peer must authenticate before anything is dispatched.
    pub auth_required: bool,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            max_inflight: 1024,
            outbound_max_bytes: 16 << 20,
            header_timeout: Some(Duration::from_secs(10)),
            progress_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(300)),
            handshake_timeout: Some(Duration::from_secs(10)),
            auth_required: false,
        }
    }
}

/// One server connection's protocol state.
#[derive(Debug)]
pub struct ServerConn<C> {
    cfg: ConnConfig,
    calls: CallTable<C>,
    authenticated: bool,
    timers: Timers,
}

impl<C> ServerConn<C> {
    /// A connection accepted at `now`.
    pub fn new(cfg: ConnConfig, now: Instant) -> Self {
        ServerConn {
            cfg,
            calls: CallTable::new(cfg.max_inflight),
            authenticated: !cfg.auth_required,
            timers: Timers::new(now),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ConnConfig {
        &self.cfg
    }

    /// Whether the peer may call (authenticated, or no key required).
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// The peer proved it holds the key.
    pub fn authenticated(&mut self) {
        self.authenticated = true;
    }

    /// Admits a request with `call_id`, keeping `token` (the driver's
    /// per-call state, such as a cancellation flag) until
    /// [`finish`](Self::finish).
    ///
    /// # Errors
    /// A [`Refusal`] naming the rule broken; nothing is recorded then.
    pub fn admit(&mut self, call_id: u64, token: C) -> Result<(), Refusal> {
        if !self.authenticated {
            return Err(Refusal::NotAuthenticated);
        }
        self.calls.admit(call_id, token)
    }

    /// A CANCEL for `call_id`: the token of the call, if it is in flight.
    pub fn cancel(&self, call_id: u64) -> Option<&C> {
        self.calls.get(call_id)
    }

    /// The call's response is queued (or it needs none): it leaves the
    /// table.
    pub fn finish(&mut self, call_id: u64) -> Option<C> {
        self.calls.finish(call_id)
    }

    /// Calls in flight.
    pub fn inflight(&self) -> usize {
        self.calls.len()
    }

    /// Every in-flight call's token (to cancel them all when closing).
    pub fn tokens(&self) -> impl Iterator<Item = &C> {
        self.calls.tokens()
    }

    /// Whether reading requests must pause: the peer is not taking the
    /// responses already queued for it (backpressure), so reading more
    /// would let the queue grow without bound.
    pub fn outbound_full(&self, queued_bytes: usize) -> bool {
        queued_bytes >= self.cfg.outbound_max_bytes
    }

    /// Bytes of a frame arrived at `now` (`frames` complete frames among
    /// them).
    pub fn on_received(&mut self, now: Instant, frames: usize) {
        self.timers.received(now, frames);
    }

    /// After reading: whether a frame head is in progress at `now` (the
    /// header timeout counts from when one was first seen).
    pub fn on_head(&mut self, now: Instant, in_head: bool) {
        self.timers.head(now, in_head);
    }

    /// The socket took bytes of ours at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        self.timers.sent(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called,
    /// given the connection's I/O state.
    pub fn poll_timeout(&self, io: &IoSnapshot) -> Option<Instant> {
        self.timers
            .next(&self.cfg, io, self.calls.len(), self.authenticated)
    }

    /// Checks the timeouts at `now`: `Some` names the one that fired, and
    /// the connection must then be closed.
    pub fn handle_timeout(&mut self, now: Instant, io: &IoSnapshot) -> Option<Timeout> {
        self.timers
            .expired(now, &self.cfg, io, self.calls.len(), self.authenticated)
    }
}

#[cfg(test)]
mod tests;
