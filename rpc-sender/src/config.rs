//! Send settings.

use std::time::Duration;

use pagerpc_core::Limits;

/// How a [`Sender`](crate::Sender) writes.
#[derive(Clone, Debug)]
pub struct SendConfig {
    /// Payloads smaller than this are coalesced with their header into one
    /// part (and read with it by the receiver); the others are sent as their
    /// own part. Default 4096: a payload smaller than a page can never be
    /// mapped anyway, while a whole page can. Must not exceed the peer's
    /// `max_inline_payload_bytes`.
    pub inline_max: usize,
    /// For the blocking calls ([`Sender::send`](crate::Sender::send),
    /// [`Sender::send_batch`](crate::Sender::send_batch)) only: how long the
    /// socket may take no byte at all before the send fails. It measures
    /// lack of progress, not the whole send: a slow peer that keeps reading
    /// is never cut off. Default 30 s. Event loops use
    /// [`Sender::flush`](crate::Sender::flush), which never waits.
    pub write_timeout: Option<Duration>,
    /// The limits to check outgoing frames against (the peer's limits).
    pub limits: Limits,
    /// Send large page-aligned payloads with `MSG_ZEROCOPY`. Default off.
    pub zerocopy: bool,
    /// Smallest payload sent with `MSG_ZEROCOPY`. Default 4096 (one page):
    /// over loopback and veth, data sent by copy lands in socket buffers at
    /// arbitrary offsets and the receiver cannot map it, while zero-copy
    /// data stays page-aligned; measured with 8 KiB payloads, a 4 KiB
    /// threshold mapped 100 % at 2307 µs/MB of receiver CPU against 0 % at
    /// 2746 with 16 KiB (`docs/zero-copy.md`).
    pub zerocopy_min: usize,
    /// Compute a CRC32C of every non-empty payload and send it in the
    /// header (`payload_crc32c`), so the receiver can refuse a corrupted
    /// payload. Hardware-accelerated (SSE4.2) where the CPU has it; costs a
    /// read of every payload byte. Default off.
    pub checksum: bool,
    /// Most payload bytes kept alive waiting for zero-copy completions.
    /// A payload that would pass it waits until completions free room
    /// ([`Sender::awaiting_completions`](crate::Sender::awaiting_completions):
    /// wait for `EPOLLERR`, not `EPOLLOUT`); a payload larger than the
    /// whole cap goes out by copy.
    ///
    /// # Memory cost
    /// Up to this many bytes of sent payloads stay allocated per connection
    /// after they were written. Default 64 MiB.
    pub zerocopy_max_inflight: usize,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            inline_max: 4096,
            write_timeout: Some(Duration::from_secs(30)),
            limits: Limits::default(),
            zerocopy: false,
            checksum: false,
            zerocopy_min: 4096,
            zerocopy_max_inflight: 64 << 20,
        }
    }
}
