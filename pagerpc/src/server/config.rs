//! Server settings.

use std::sync::Arc;
use std::time::Duration;

use pagerpc_core::Limits;
use pagerpc_receiver::RecvConfig;
use pagerpc_sender::SendConfig;

use crate::segments::SegmentAlign;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Limits for incoming frames.
    pub limits: Limits,
    /// Send settings (inline threshold, clients' limits, zero-copy).
    pub send: SendConfig,
    /// Receive settings (backend, read buffer).
    pub recv: RecvConfig,
    /// Pool threads doing I/O and running handlers. Default: the number of
    /// CPUs, at least 2.
    pub threads: usize,
    /// Most connections open at once; further ones are refused with a
    /// [`Code::ResourceExhausted`](crate::Code) error frame. Default 1024,
    /// lowered to fit the process's open-file limit (`RLIMIT_NOFILE`, less
    /// 64 descriptors for everything else) when that is lower.
    ///
    /// # Memory cost
    /// Each connection holds its read buffer (`recv.read_buf`, 64 KiB by
    /// default) plus the payloads it is receiving, plus up to
    /// `max_outbound_bytes_per_conn` of queued responses.
    pub max_connections: usize,
    /// TCP segment sizing, applied to the listener (page-aligned segments
    /// when bound to loopback, by default).
    pub segments: SegmentAlign,
    /// Most calls in flight on one connection; a request beyond it is
    /// answered with [`Code::ResourceExhausted`](crate::Code) naming this
    /// limit, without running a handler. Default 1024.
    ///
    /// # Memory cost
    /// Each call in flight holds its request payload until its handler
    /// returns: up to this many payloads per connection.
    pub max_inflight_per_conn: usize,
    /// Most response bytes queued for one connection and not yet taken by
    /// its socket. Once reached, the server stops reading that connection's
    /// requests and runs none of its queued calls until the peer reads
    /// (backpressure); a peer that reads nothing for `progress_timeout` is
    /// closed. Other connections are not affected. Default 16 MiB.
    ///
    /// # Memory cost
    /// Up to this much per connection, plus one response per pool thread
    /// (the responses of handlers already running when it filled).
    pub max_outbound_bytes_per_conn: usize,
    /// Time a peer has to finish a frame's prefix and header once it has
    /// started one; a slower peer (one that dribbles a header) is sent an
    /// error and disconnected. Default 10 s. `None` disables it.
    pub header_timeout: Option<Duration>,
    /// Time a peer may make no progress at all while it owes us the rest of
    /// a frame, or while responses are queued for it that it does not read;
    /// it is then disconnected. A slow peer that keeps moving is never cut
    /// off, however long a transfer takes. Default 30 s. `None` disables
    /// it.
    pub progress_timeout: Option<Duration>,
    /// A connection with no call in flight, nothing queued and no frame
    /// received for this long is closed. Default 5 minutes. `None`
    /// disables it.
    pub idle_timeout: Option<Duration>,
    /// With [`auth_key`](Self::auth_key): time a new connection has to
    /// authenticate before it is closed. Default 10 s.
    pub handshake_timeout: Option<Duration>,
    /// Most payload bytes (rounded up to pages) the consumers of one
    /// connection's requests may hold at once. Past it, the server stops
    /// reading that connection (backpressure: the peer's sends block once
    /// the socket buffers fill) until handlers or whoever kept the `Pages`
    /// drop enough of them. Other connections are not affected. A consumer
    /// that keeps payloads for good (a store) calls
    /// [`Pages::detach_accounting`](crate::Pages::detach_accounting) on them
    /// and bounds that memory itself. Default 256 MiB. `None` disables it.
    ///
    /// # Memory cost
    /// Up to this much per connection, plus one payload (the one whose
    /// arrival crossed the cap), plus what sits in socket buffers.
    pub max_held_bytes_per_conn: Option<usize>,
    /// Most payload bytes being received at once, over all connections.
    /// Each separate request payload is reserved from it when its header
    /// announces it, before anything is allocated; while it is spent, the
    /// connections whose next payload does not fit stop reading (their
    /// peers' sends block once the socket buffers fill) until payloads
    /// complete. A peer that stops mid-payload holds its share only until
    /// `progress_timeout` closes it. A single payload larger than the whole
    /// budget is still received, alone. Default: a quarter of the
    /// machine's memory (1 GiB if it cannot be read). `None` disables it.
    ///
    /// # Memory cost
    /// Up to this much, plus one read buffer per connection.
    pub max_receive_bytes: Option<usize>,
    /// Most connections that have not authenticated yet (with
    /// [`auth_key`](Self::auth_key)). When a new connection would exceed
    /// it, the oldest unauthenticated connection is closed, so peers that
    /// connect and never authenticate cannot lock authenticated clients
    /// out. Default: a quarter of `max_connections`, at least 1.
    pub max_unauthenticated: usize,
    /// A pre-shared key: every connection must prove it holds the same key
    /// (HMAC-SHA256 challenge-response, see `docs/wire-format.md`) before
    /// any request is dispatched; a peer that fails is told so
    /// ([`Code::Unauthenticated`](crate::Code)) and disconnected. Default
    /// none.
    pub auth_key: Option<Arc<[u8]>>,
    /// Most streams open at once, server-wide. Each streaming call's
    /// handler runs on a thread of its own while the stream is open (a
    /// task, on the async server); a
    /// stream beyond this is refused with
    /// [`Code::ResourceExhausted`](crate::Code) naming the limit. Default
    /// 256.
    ///
    /// # Memory cost
    /// A thread (its stack, 2 MiB of address space, a few KiB resident) per
    /// open stream, plus what its messages hold (see `stream_window`).
    pub max_streams: usize,
    /// How long a stream handler may wait for the client in one go — for
    /// its next message, or for credit to send more — before the stream
    /// ends with [`Code::DeadlineExceeded`](crate::Code) naming this
    /// setting. It measures lack of progress: a stream that keeps moving
    /// never hits it. Default 300 s; `None` waits as long as the stream's
    /// deadline (if any) allows.
    ///
    /// # Memory cost
    /// Bounds how long a silent client holds a stream thread and what its
    /// stream holds (`stream_window`).
    pub stream_idle_timeout: Option<Duration>,
    /// Bytes of stream messages a client may send on one stream before the
    /// handler releases some (announced in SETTINGS). Default 8 MiB.
    ///
    /// # Memory cost
    /// A handler that stops reading holds at most this much (plus one
    /// message larger than the window) per stream.
    pub stream_window: u64,
    /// Bytes of separate payloads a client may have sent on one connection
    /// that the server has not read out of its socket yet (announced in
    /// SETTINGS; the server gives credit back as it reads). Keeping the
    /// socket from filling keeps TCP's receive window open, so segments
    /// stay on page boundaries and zero-copy receive maps them. Default
    /// 2 MiB; 0 announces none (no limit). The client's own
    /// `ClientConfig::conn_window` limits the server's responses the same
    /// way.
    ///
    /// # Memory cost
    /// None of its own: it bounds what sits in the kernel's socket buffer.
    pub conn_window: u64,
}

impl ServerConfig {
    /// Settings for zero-copy both ways: `TCP_ZEROCOPY_RECEIVE` receives
    /// and `MSG_ZEROCOPY` sends.
    pub fn zerocopy() -> ServerConfig {
        let mut c = ServerConfig::default();
        c.send.zerocopy = true;
        c.recv.backend = pagerpc_receiver::Backend::ZeroCopy;
        c
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        let max_connections =
            crate::sys::fd_limit().map_or(1024, |n| n.saturating_sub(64).clamp(1, 1024));
        ServerConfig {
            limits: Limits::default(),
            send: SendConfig::default(),
            recv: RecvConfig::default(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            max_connections,
            segments: SegmentAlign::Auto,
            max_inflight_per_conn: 1024,
            max_outbound_bytes_per_conn: 16 << 20,
            header_timeout: Some(Duration::from_secs(10)),
            progress_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(300)),
            handshake_timeout: Some(Duration::from_secs(10)),
            max_held_bytes_per_conn: Some(256 << 20),
            max_receive_bytes: Some(crate::sys::mem_total().map_or(1 << 30, |m| m / 4)),
            max_unauthenticated: (max_connections / 4).max(1),
            auth_key: None,
            max_streams: 256,
            stream_idle_timeout: Some(Duration::from_secs(300)),
            stream_window: pagerpc_core::conn::DEFAULT_STREAM_WINDOW,
            conn_window: pagerpc_core::conn::DEFAULT_CONN_WINDOW,
        }
    }
}
