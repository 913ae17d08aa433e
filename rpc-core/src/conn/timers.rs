//! The timeouts of one connection, measured as lack of progress.

use std::fmt;
use std::time::{Duration, Instant};

use super::ConnConfig;

/// What the driver knows about the connection's I/O right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoSnapshot {
    /// A frame's prefix or header has started and not finished.
    pub in_head: bool,
    /// A frame (head or payload) has started and not finished.
    pub in_frame: bool,
    /// The driver stopped reading this connection itself (backpressure),
    /// so a stalled frame is not the peer's fault.
    pub read_paused: bool,
    /// Bytes queued for the peer and not yet written.
    pub queued_out: usize,
}

/// Which timeout closed a connection. Each names its setting and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Timeout {
    /// The peer did not authenticate within `handshake_timeout`.
    Handshake {
        /// The setting.
        limit: Duration,
    },
    /// A started prefix and header did not complete within
    /// `header_timeout`.
    Header {
        /// The setting.
        limit: Duration,
    },
    /// The peer sent no byte of a started frame for `progress_timeout`.
    RecvStalled {
        /// The setting.
        limit: Duration,
    },
    /// The peer took no byte of the responses queued for it for
    /// `progress_timeout`.
    SendStalled {
        /// The setting.
        limit: Duration,
        /// Bytes still queued.
        queued: usize,
    },
    /// Nothing happened for `idle_timeout`.
    Idle {
        /// The setting.
        limit: Duration,
    },
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timeout::Handshake { limit } => {
                write!(f, "handshake_timeout: not authenticated within {limit:?}")
            }
            Timeout::Header { limit } => {
                write!(
                    f,
                    "header_timeout: no complete frame header within {limit:?}"
                )
            }
            Timeout::RecvStalled { limit } => write!(
                f,
                "progress_timeout: no byte of a started frame received for {limit:?}"
            ),
            Timeout::SendStalled { limit, queued } => write!(
                f,
                "progress_timeout: the peer read none of {queued} queued bytes for {limit:?}"
            ),
            Timeout::Idle { limit } => write!(f, "idle_timeout: no call for {limit:?}"),
        }
    }
}

/// When things last happened on a connection.
#[derive(Clone, Copy, Debug)]
pub struct Timers {
    opened: Instant,
    last_recv: Instant,
    head_since: Option<Instant>,
    last_sent: Instant,
    last_activity: Instant,
}

impl Timers {
    /// Timers of a connection opened at `now`.
    pub fn new(now: Instant) -> Timers {
        Timers {
            opened: now,
            last_recv: now,
            head_since: None,
            last_sent: now,
            last_activity: now,
        }
    }

    /// Bytes arrived at `now`, completing `frames` frames.
    pub fn received(&mut self, now: Instant, frames: usize) {
        self.last_recv = now;
        if frames > 0 {
            self.last_activity = now;
            self.head_since = None;
        }
    }

    /// The driver saw a head in progress (or none) at `now`.
    pub fn head(&mut self, now: Instant, in_head: bool) {
        if !in_head {
            self.head_since = None;
        } else if self.head_since.is_none() {
            self.head_since = Some(now);
        }
    }

    /// The socket took bytes of ours (or an empty queue got bytes) at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = now;
        self.last_activity = now;
    }

    fn deadlines(
        &self,
        cfg: &ConnConfig,
        io: &IoSnapshot,
        inflight: usize,
        authenticated: bool,
    ) -> [Option<(Instant, Timeout)>; 5] {
        let at = |from: Instant, d: Option<Duration>| d.map(|d| from + d);
        [
            (!authenticated)
                .then(|| at(self.opened, cfg.handshake_timeout))
                .flatten()
                .zip(cfg.handshake_timeout)
                .map(|(t, limit)| (t, Timeout::Handshake { limit })),
            (io.in_head && !io.read_paused)
                .then_some(self.head_since)
                .flatten()
                .zip(cfg.header_timeout)
                .map(|(s, limit)| (s + limit, Timeout::Header { limit })),
            (io.in_frame && !io.read_paused)
                .then_some(cfg.progress_timeout)
                .flatten()
                .map(|limit| (self.last_recv + limit, Timeout::RecvStalled { limit })),
            (io.queued_out > 0)
                .then_some(cfg.progress_timeout)
                .flatten()
                .map(|limit| {
                    (
                        self.last_sent + limit,
                        Timeout::SendStalled {
                            limit,
                            queued: io.queued_out,
                        },
                    )
                }),
            (!io.in_frame && io.queued_out == 0 && inflight == 0 && !io.read_paused)
                .then_some(cfg.idle_timeout)
                .flatten()
                .map(|limit| (self.last_activity + limit, Timeout::Idle { limit })),
        ]
    }

    /// The earliest deadline, if any applies.
    pub fn next(
        &self,
        cfg: &ConnConfig,
        io: &IoSnapshot,
        inflight: usize,
        authenticated: bool,
    ) -> Option<Instant> {
        self.deadlines(cfg, io, inflight, authenticated)
            .into_iter()
            .flatten()
            .map(|(t, _)| t)
            .min()
    }

    /// The first timeout that has passed at `now`.
    pub fn expired(
        &self,
        now: Instant,
        cfg: &ConnConfig,
        io: &IoSnapshot,
        inflight: usize,
        authenticated: bool,
    ) -> Option<Timeout> {
        self.deadlines(cfg, io, inflight, authenticated)
            .into_iter()
            .flatten()
            .find(|(t, _)| now >= *t)
            .map(|(_, why)| why)
    }
}
