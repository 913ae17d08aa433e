//! The send half of pagerpc.
//!
//! A [`Sender`] writes frames to a connected, non-blocking stream socket.
//! Each frame is written as up to two *parts*, each ended with `MSG_EOR`:
//!
//! 1. the prefix and header, plus the payload when it is small enough to be
//!    coalesced ([`SendConfig::inline_max`]); several such small frames may
//!    share one part;
//! 2. a larger payload on its own, starting on a fresh TCP segment, so that a
//!    receiver with page-sized segments can map it.
//!
//! No segment ever mixes header bytes with the bytes of a separate payload.
//!
//! With [`SendConfig::zerocopy`], a separate payload of at least
//! [`SendConfig::zerocopy_min`] bytes that starts on a page boundary is sent
//! with `MSG_ZEROCOPY`: the kernel sends from the payload's own pages. The
//! sender then keeps the [`Payload`] alive until the kernel's completion
//! notification for it arrives on the socket's error queue, and never lets
//! it go earlier: releasing (and so possibly reusing) those pages before
//! then would corrupt data in flight.
#![deny(unsafe_op_in_unsafe_fn)]

mod sys;

use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagerpc_core::{encode_head, CodecError, Counters, Flags, Header, Limits};
pub use pagerpc_pages::Payload;

/// How a [`Sender`] writes.
#[derive(Clone, Debug)]
pub struct SendConfig {
    /// Payloads smaller than this are coalesced with their header into one
    /// part (and read with it by the receiver); the others are sent as their
    /// own part. Default 4096: a payload smaller than a page can never be
    /// mapped anyway, while a whole page can. Must not exceed the peer's
    /// `max_inline_payload_bytes`.
    pub inline_max: usize,
    /// How long one send may wait for room in the socket buffer before the
    /// connection is declared dead. Default 30 s.
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
    /// Most payload bytes kept alive waiting for zero-copy completions;
    /// past it a send first waits for completions.
    ///
    /// # Memory cost
    /// Up to this many bytes of sent payloads stay allocated per connection
    /// after `send` returns. Default 64 MiB.
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

/// Why a send failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SendErrorKind {
    /// The frame breaks a limit; nothing was written.
    Codec(CodecError),
    /// The socket failed.
    Io(io::Error),
    /// No room in the socket buffer within the write timeout.
    TimedOut,
    /// An earlier failure left a partial frame on the wire; the connection
    /// cannot be used for sending any more.
    Broken,
}

impl fmt::Display for SendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendErrorKind::Codec(e) => write!(f, "frame refused before sending: {e}"),
            SendErrorKind::Io(e) => write!(f, "send failed: {e}"),
            SendErrorKind::TimedOut => write!(f, "send timed out waiting for socket buffer space"),
            SendErrorKind::Broken => write!(f, "connection broken by an earlier send failure"),
        }
    }
}

/// A failed send. Like tokio's `SendError(T)`, it hands the caller's payloads
/// back, in the order they were given.
#[derive(Debug)]
pub struct SendError {
    /// What went wrong.
    pub kind: SendErrorKind,
    /// The payloads of the frames that were not (fully) sent.
    pub payloads: Vec<Payload>,
    /// Whether some bytes of a frame reached the socket, so the stream is
    /// now broken (the sender refuses further sends).
    pub partial: bool,
}

impl SendError {
    /// Takes back the first payload (the only one, for [`Sender::send`]).
    pub fn into_payload(mut self) -> Payload {
        if self.payloads.is_empty() {
            Payload::Empty
        } else {
            self.payloads.swap_remove(0)
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

impl std::error::Error for SendError {}

/// One frame to send.
#[derive(Debug)]
pub struct OutFrame {
    /// Its header.
    pub header: Header,
    /// Its payload.
    pub payload: Payload,
}

/// A payload the kernel may still be reading from, with the zero-copy
/// notification ids of the `sendmsg` calls that sent it.
#[derive(Debug)]
struct ZcInflight {
    first: u32,
    last: u32,
    /// Ids in `first..=last` not completed yet.
    left: u32,
    payload: Payload,
}

/// Zero-copy send state of one connection.
#[derive(Debug, Default)]
struct ZcSend {
    /// The id the kernel gives the next `MSG_ZEROCOPY` call that sends data.
    next_id: u32,
    inflight: std::collections::VecDeque<ZcInflight>,
    inflight_bytes: usize,
    scratch: Vec<sys::Completion>,
}

/// Zero-copy send statistics of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZcSendStats {
    /// Payloads sent with `MSG_ZEROCOPY` still held, waiting for completion.
    pub pending_payloads: usize,
    /// Their bytes.
    pub pending_bytes: usize,
    /// Notification ids issued so far (one per `MSG_ZEROCOPY` call).
    pub ids_issued: u32,
}

/// The send half of a connection.
#[derive(Debug)]
pub struct Sender {
    fd: Arc<OwnedFd>,
    cfg: SendConfig,
    counters: Arc<Counters>,
    heads: Vec<u8>,
    broken: bool,
    /// Zero-copy send, when enabled and accepted by the kernel.
    zc: Option<ZcSend>,
    zc_off: Option<String>,
}

impl Sender {
    /// A sender on `fd`, a connected stream socket in non-blocking mode.
    ///
    /// With [`SendConfig::zerocopy`] it sets `SO_ZEROCOPY`; if the kernel
    /// refuses, the sender copies and [`zerocopy_off_reason`](Self::zerocopy_off_reason)
    /// says why.
    pub fn new(fd: Arc<OwnedFd>, cfg: SendConfig, counters: Arc<Counters>) -> Sender {
        let (zc, zc_off) = if cfg.zerocopy {
            match sys::enable_zerocopy(fd.as_fd()) {
                Ok(()) => (Some(ZcSend::default()), None),
                Err(e) => (None, Some(format!("SO_ZEROCOPY refused: {e}"))),
            }
        } else {
            (None, None)
        };
        Sender {
            fd,
            cfg,
            counters,
            heads: Vec::with_capacity(4096),
            broken: false,
            zc,
            zc_off,
        }
    }

    /// Whether `MSG_ZEROCOPY` sends are on.
    pub fn zerocopy_active(&self) -> bool {
        self.zc.is_some()
    }

    /// Why zero-copy send is off although it was asked for.
    pub fn zerocopy_off_reason(&self) -> Option<&str> {
        self.zc_off.as_deref()
    }

    /// Zero-copy send statistics.
    pub fn zerocopy_stats(&self) -> ZcSendStats {
        self.zc
            .as_ref()
            .map_or(ZcSendStats::default(), |z| ZcSendStats {
                pending_payloads: z.inflight.len(),
                pending_bytes: z.inflight_bytes,
                ids_issued: z.next_id,
            })
    }

    /// Reads completion notifications without blocking and releases every
    /// payload the kernel is done with. Returns how many were released.
    ///
    /// # Errors
    /// If reading the socket's error queue fails.
    pub fn reap_completions(&mut self) -> io::Result<usize> {
        let Some(zc) = self.zc.as_mut() else {
            return Ok(0);
        };
        let mut got = std::mem::take(&mut zc.scratch);
        got.clear();
        sys::read_completions(self.fd.as_fd(), &mut got)?;
        Ok(self.apply_completions(got))
    }

    /// Applies completion notifications and releases every payload whose
    /// ids have all completed, wherever it is in the queue.
    fn apply_completions(&mut self, mut got: Vec<sys::Completion>) -> usize {
        let Some(zc) = self.zc.as_mut() else {
            return 0;
        };
        let mut released = 0;
        for c in got.drain(..) {
            let n = c.hi.wrapping_sub(c.lo).wrapping_add(1);
            self.counters
                .zc_completions(u64::from(n), if c.copied { u64::from(n) } else { 0 });
            for e in zc.inflight.iter_mut() {
                let lo = c.lo.max(e.first);
                let hi = c.hi.min(e.last);
                if lo <= hi {
                    e.left = e.left.saturating_sub(hi - lo + 1);
                }
            }
        }
        // Release every payload whose ids have all completed, wherever it is.
        let before = zc.inflight.len();
        let mut bytes = zc.inflight_bytes;
        zc.inflight.retain(|e| {
            if e.left == 0 {
                bytes -= e.payload.len();
                false
            } else {
                true
            }
        });
        zc.inflight_bytes = bytes;
        released += before - zc.inflight.len();
        zc.scratch = got;
        released
    }

    /// Waits (up to `timeout`) until the kernel is done with every payload
    /// sent with `MSG_ZEROCOPY`. Returns whether none is left.
    ///
    /// # Errors
    /// If reading the socket's error queue fails.
    pub fn flush_zerocopy(&mut self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap_completions()?;
            if self.zc.as_ref().is_none_or(|z| z.inflight.is_empty()) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            sys::wait_errqueue(self.fd.as_fd(), left.min(Duration::from_millis(100)))?;
        }
    }

    /// Whether a separate payload part goes out with `MSG_ZEROCOPY`.
    fn use_zerocopy(&self, p: &Payload) -> bool {
        self.zc.is_some() && p.len() >= self.cfg.zerocopy_min && p.is_page_aligned()
    }

    /// Waits for completions while too many bytes are held.
    fn make_room(
        &mut self,
        incoming: usize,
        deadline: Option<Instant>,
    ) -> Result<(), SendErrorKind> {
        loop {
            let Some(zc) = self.zc.as_ref() else {
                return Ok(());
            };
            if zc.inflight.is_empty()
                || zc.inflight_bytes + incoming <= self.cfg.zerocopy_max_inflight
            {
                return Ok(());
            }
            let left = deadline.map_or(Duration::from_millis(100), |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Err(SendErrorKind::TimedOut);
            }
            sys::wait_errqueue(self.fd.as_fd(), left.min(Duration::from_millis(100)))
                .map_err(SendErrorKind::Io)?;
            self.reap_completions().map_err(SendErrorKind::Io)?;
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SendConfig {
        &self.cfg
    }

    /// Whether an earlier failure broke the stream.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Sends one frame, blocking (up to the write timeout) until the kernel
    /// has taken every byte.
    ///
    /// # Errors
    /// A [`SendError`] holding the payload: [`SendErrorKind::Codec`] if the
    /// frame breaks a limit (nothing written), [`SendErrorKind::Io`] or
    /// [`SendErrorKind::TimedOut`] if the socket failed (the stream is then
    /// broken when `partial` is set), [`SendErrorKind::Broken`] after an
    /// earlier partial failure.
    pub fn send(&mut self, header: Header, payload: Payload) -> Result<(), SendError> {
        self.send_batch(vec![OutFrame { header, payload }])
    }

    /// Sends several frames, coalescing small ones into as few `sendmsg`
    /// calls as the part rules allow.
    ///
    /// # Errors
    /// As [`send`](Self::send); the error holds the payloads of every frame
    /// from the first one not fully sent.
    pub fn send_batch(&mut self, frames: Vec<OutFrame>) -> Result<(), SendError> {
        if self.broken {
            return Err(SendError {
                kind: SendErrorKind::Broken,
                payloads: frames.into_iter().map(|f| f.payload).collect(),
                partial: false,
            });
        }
        // Encode every head first, so a frame over a limit fails before any
        // byte of the batch is written.
        self.heads.clear();
        let mut frames = frames;
        if self.cfg.checksum {
            for f in frames.iter_mut().filter(|f| !f.payload.is_empty()) {
                f.header.payload_crc32c = Some(crc32c::crc32c(f.payload.as_slice()));
            }
        }
        let mut spans = Vec::with_capacity(frames.len());
        for f in &frames {
            let inline = f.payload.len() < self.cfg.inline_max;
            let flags = if inline && !f.payload.is_empty() {
                Flags::INLINE_PAYLOAD
            } else {
                Flags::NONE
            };
            let start = self.heads.len();
            if let Err(e) = encode_head(
                &f.header,
                f.payload.len() as u64,
                flags,
                &self.cfg.limits,
                &mut self.heads,
            ) {
                self.heads.truncate(start);
                return Err(SendError {
                    kind: SendErrorKind::Codec(e),
                    payloads: frames.into_iter().map(|f| f.payload).collect(),
                    partial: false,
                });
            }
            spans.push((start, self.heads.len(), inline));
        }

        // Walk the frames, building parts.
        let deadline = self.cfg.write_timeout.map(|t| Instant::now() + t);
        let heads = std::mem::take(&mut self.heads);
        let lens: Vec<u64> = frames.iter().map(|f| f.payload.len() as u64).collect();
        let mut frames: Vec<Option<OutFrame>> = frames.into_iter().map(Some).collect();
        let mut wrote_any = false;
        let mut result = Ok(());
        // Frames [done, i) are in `iov`, waiting to be written as one part.
        let mut done = 0;
        let mut i = 0;
        while i < frames.len() {
            let (s, e, inline) = spans[i];
            if inline {
                i += 1;
                continue;
            }
            // Frame i has a separate payload: write the pending heads (and
            // inline payloads) plus frame i's head as one part, then the
            // payload as its own part.
            let head_part: Vec<IoSlice<'_>> = head_iov(&heads, &spans, &frames, done, i, (s, e));
            result = write_part(
                &self.fd,
                head_part,
                0,
                deadline,
                &mut wrote_any,
                &mut Vec::new(),
            )
            .map(|_| ());
            if result.is_err() {
                break;
            }
            done = i + 1;
            let Some(frame) = frames[i].take() else { break };
            result = self.write_payload(frame, deadline, &mut wrote_any);
            if result.is_err() {
                break;
            }
            i += 1;
        }
        if result.is_ok() && done < frames.len() {
            let last = spans.len() - 1;
            let tail: Vec<IoSlice<'_>> = head_iov(&heads, &spans, &frames, done, last + 1, (0, 0));
            result = write_part(&self.fd, tail, 0, deadline, &mut wrote_any, &mut Vec::new())
                .map(|_| ());
            if result.is_ok() {
                done = frames.len();
            }
        }
        self.heads = heads;
        match result {
            Ok(()) => {
                for len in lens {
                    self.counters.frame_sent(len);
                }
                if self.zc.is_some() {
                    // Release what the kernel is done with; errors here only
                    // delay the release.
                    let _ = self.reap_completions();
                }
                Ok(())
            }
            Err(kind) => {
                self.broken |= wrote_any;
                Err(SendError {
                    kind,
                    payloads: frames
                        .into_iter()
                        .skip(done)
                        .flatten()
                        .map(|f| f.payload)
                        .collect(),
                    partial: wrote_any,
                })
            }
        }
    }

    /// Writes one separate payload as its own part, with `MSG_ZEROCOPY`
    /// when it qualifies (then keeping it until its completion arrives).
    fn write_payload(
        &mut self,
        frame: OutFrame,
        deadline: Option<Instant>,
        wrote_any: &mut bool,
    ) -> Result<(), SendErrorKind> {
        let payload = frame.payload;
        if !self.use_zerocopy(&payload) {
            let iov = vec![IoSlice::new(payload.as_slice())];
            return write_part(&self.fd, iov, 0, deadline, wrote_any, &mut Vec::new()).map(|_| ());
        }
        self.make_room(payload.len(), deadline)?;
        let first = self.zc.as_ref().map_or(0, |z| z.next_id);
        let iov = vec![IoSlice::new(payload.as_slice())];
        let mut got = Vec::new();
        // Cork while the payload goes out: at the edge of the receive
        // window TCP would otherwise send a segment shorter than the MSS,
        // every segment after it would be off page boundaries, and the
        // receiver could map none of the rest. Uncorking pushes the tail.
        let corked = sys::set_cork(self.fd.as_fd(), true).is_ok();
        let written = write_part(
            &self.fd,
            iov,
            sys::MSG_ZEROCOPY,
            deadline,
            wrote_any,
            &mut got,
        );
        if corked {
            let _ = sys::set_cork(self.fd.as_fd(), false);
        }
        self.apply_completions(got);
        let calls = match written {
            Ok(calls) => calls,
            Err(e) => {
                // Whatever was handed to the kernel may still be read from:
                // keep the memory alive by keeping the payload until the
                // connection's completions arrive (or forever, if they never
                // do: a leak is better than corrupting data in flight).
                if *wrote_any {
                    self.hold_until_complete(first, u32::MAX, payload);
                }
                return Err(e);
            }
        };
        self.counters.zc_send();
        if calls == 0 {
            return Ok(());
        }
        self.hold_until_complete(first, first.wrapping_add(calls - 1), payload);
        Ok(())
    }

    fn hold_until_complete(&mut self, first: u32, last: u32, payload: Payload) {
        let Some(zc) = self.zc.as_mut() else {
            return;
        };
        let n = if last == u32::MAX {
            u32::MAX
        } else {
            last.wrapping_sub(first).wrapping_add(1)
        };
        if last != u32::MAX {
            zc.next_id = last.wrapping_add(1);
        }
        zc.inflight_bytes += payload.len();
        zc.inflight.push_back(ZcInflight {
            first,
            last,
            left: n,
            payload,
        });
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if self.zc.as_ref().is_some_and(|z| !z.inflight.is_empty()) {
            // The kernel may still read from payloads sent with
            // MSG_ZEROCOPY. Give it a moment, then leak what is left rather
            // than release memory that may be reused while in flight.
            let _ = self.flush_zerocopy(Duration::from_secs(2));
            if let Some(zc) = self.zc.as_mut() {
                for e in zc.inflight.drain(..) {
                    std::mem::forget(e.payload);
                }
            }
        }
    }
}

/// The iovecs of one head part: frames `from..to` (heads and inline
/// payloads), then the head span `extra` (the head of the frame whose
/// separate payload follows), if non-empty.
fn head_iov<'a>(
    heads: &'a [u8],
    spans: &[(usize, usize, bool)],
    frames: &'a [Option<OutFrame>],
    from: usize,
    to: usize,
    extra: (usize, usize),
) -> Vec<IoSlice<'a>> {
    let mut iov = Vec::with_capacity((to - from) * 2 + 1);
    for j in from..to.min(frames.len()) {
        let (s, e, inline) = spans[j];
        iov.push(IoSlice::new(&heads[s..e]));
        if inline {
            if let Some(f) = &frames[j] {
                if !f.payload.is_empty() {
                    iov.push(IoSlice::new(f.payload.as_slice()));
                }
            }
        }
    }
    if extra.1 > extra.0 {
        iov.push(IoSlice::new(&heads[extra.0..extra.1]));
    }
    iov
}

/// Writes every byte of `iov` as one part ending in `MSG_EOR` (plus
/// `extra` flags), retrying on partial writes and waiting for buffer space
/// until `deadline`. Returns how many `sendmsg` calls sent data (each
/// `MSG_ZEROCOPY` call that sends data gets one notification id). With
/// `MSG_ZEROCOPY`, `ENOBUFS` (too much memory pinned) is answered by
/// waiting for completions of earlier sends.
fn write_part(
    fd: &OwnedFd,
    mut iov: Vec<IoSlice<'_>>,
    extra: i32,
    deadline: Option<Instant>,
    wrote_any: &mut bool,
    completions: &mut Vec<sys::Completion>,
) -> Result<u32, SendErrorKind> {
    let mut slices: &mut [IoSlice<'_>] = &mut iov[..];
    IoSlice::advance_slices(&mut slices, 0);
    let mut calls = 0;
    while !slices.is_empty() {
        match sys::sendmsg(fd.as_fd(), slices, sys::MSG_EOR | extra) {
            Ok(n) => {
                if n > 0 {
                    calls += 1;
                    *wrote_any = true;
                }
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOBUFS) =>
            {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    return Err(SendErrorKind::TimedOut);
                }
                let ready = if e.kind() == io::ErrorKind::WouldBlock {
                    sys::wait_writable(fd.as_fd(), left)
                } else {
                    // ENOBUFS: the notifications queued on the error queue
                    // hold the memory the kernel wants; reading them frees
                    // it. The caller applies what was read.
                    let before = completions.len();
                    sys::read_completions(fd.as_fd(), completions).map_err(SendErrorKind::Io)?;
                    if completions.len() == before {
                        let wait = left
                            .unwrap_or(Duration::from_millis(10))
                            .min(Duration::from_millis(10));
                        sys::wait_errqueue(fd.as_fd(), wait).map_err(SendErrorKind::Io)?;
                    }
                    Ok(true)
                };
                match ready {
                    Ok(true) => {}
                    Ok(false) => return Err(SendErrorKind::TimedOut),
                    Err(e) => return Err(SendErrorKind::Io(e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SendErrorKind::Io(e)),
        }
    }
    Ok(calls)
}
