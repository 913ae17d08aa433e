//! The send half of pagerpc.
//!
//! A [`Sender`] writes frames to a connected stream socket, never blocking
//! inside the kernel: every `sendmsg` is `MSG_DONTWAIT`. Frames are first
//! queued ([`Sender::enqueue`]) and then written as far as the socket takes
//! them ([`Sender::flush`]); an event loop flushes again when the socket is
//! writable (`EPOLLOUT`). [`Sender::send`] and [`Sender::send_batch`] wrap
//! both for callers that may wait, bounded by a progress timeout.
//!
//! Each frame is written as up to two *parts*, each ended with `MSG_EOR`:
//!
//! 1. the prefix and header, plus the payload when it is small enough to be
//!    coalesced ([`SendConfig::inline_max`]); several such small frames
//!    share one part;
//! 2. a larger payload on its own, starting on a fresh TCP segment, so that a
//!    receiver with page-sized segments can map it.
//!
//! No segment ever mixes header bytes with the bytes of a separate payload.
//!
//! With [`SendConfig::zerocopy`], a separate payload of at least
//! [`SendConfig::zerocopy_min`] bytes that starts on a page boundary is sent
//! with `MSG_ZEROCOPY`: the kernel sends from the payload's own pages. The
//! sender keeps the [`Payload`] in a [`ZcTracker`] until the kernel's
//! completion notifications for it arrive on the socket's error queue
//! ([`Sender::reap_completions`], to be called when the socket reports
//! `EPOLLERR`), and never lets it go earlier. A sender dropped with
//! payloads still in flight aborts its connection so the kernel lets go of
//! them, and hands any stragglers to a background [`graveyard`]: dropping
//! never waits.
//!
//! A peer whose receive backend is `Auto` may ask this side to write its
//! separate payloads by copy, and later with `MSG_ZEROCOPY` again (a CREDIT
//! frame on call 0 with the header field `payload_send`). A sender linked
//! to its connection's receiver ([`Sender::set_payload_send_link`]) honours
//! those requests for the payloads queued after them, says in each such
//! payload's header how it is written, and writes the requests its own
//! receiver makes.
#![deny(unsafe_op_in_unsafe_fn)]

mod config;
mod error;
pub mod graveyard;
mod parts;
mod sys;

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagerpc_core::{
    encode_head, Counters, Flags, Header, Kind, PayloadSend, PayloadSendLink, ZcIds, ZcTracker,
};
pub use pagerpc_pages::Payload;

pub use config::SendConfig;
pub use error::{SendError, SendErrorKind};
use parts::{Part, PartQueue, ZcPart};

/// One frame to send.
#[derive(Debug)]
pub struct OutFrame {
    /// Its header.
    pub header: Header,
    /// Its payload.
    pub payload: Payload,
}

/// A place in a [`Sender`]'s queue: the frames enqueued after it can be
/// taken back as long as none of their bytes were written
/// ([`Sender::take_back`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueMark {
    index: usize,
    popped: u64,
}

/// What [`Sender::flush`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Flush {
    /// Everything queued has been written.
    Done,
    /// The socket took what it could; call again once it is writable
    /// (`EPOLLOUT`), or once a zero-copy completion arrives (`EPOLLERR`).
    Blocked,
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
    queue: PartQueue,
    broken: bool,
    corked: bool,
    /// Zero-copy send, when enabled and accepted by the kernel.
    zc: Option<ZcTracker<Payload>>,
    zc_off: Option<String>,
    scratch: Vec<sys::Completion>,
    /// The next payload waits for zero-copy completions to free room
    /// under `zerocopy_max_inflight`.
    awaiting: bool,
    /// The peer's payload credit (its announced `conn_window`), once it
    /// announced one: separate payloads written and not yet read out of
    /// its socket.
    credit: Option<pagerpc_core::conn::OutCredit>,
    /// The next frame's payload waits for credit from the peer.
    awaiting_credit: bool,
    /// The payload at the front of the queue was charged to `credit`.
    charged_front: bool,
    /// Encoded control frames (CREDIT) that go out at the next frame
    /// boundary, ahead of frames queued but not started: a frame waiting
    /// for the peer's credit must not hold back the credit we owe the
    /// peer, or both sides would wait for each other.
    urgent: Vec<u8>,
    /// Bytes of `urgent` written.
    urgent_written: usize,
    /// Bytes the socket has taken, in all (see [`progress`](Self::progress)).
    written: u64,
    /// Shared with the connection's receiver: the peer's requests about how
    /// to write payloads, and ours to it. `None`: requests are neither
    /// honoured nor made, and payloads are not marked.
    link: Option<Arc<PayloadSendLink>>,
}

impl Sender {
    /// A sender on `fd`, a connected stream socket.
    ///
    /// With [`SendConfig::zerocopy`] it sets `SO_ZEROCOPY`; if the kernel
    /// refuses, the sender copies and [`zerocopy_off_reason`](Self::zerocopy_off_reason)
    /// says why.
    pub fn new(fd: Arc<OwnedFd>, cfg: SendConfig, counters: Arc<Counters>) -> Sender {
        let (zc, zc_off) = if cfg.zerocopy {
            match sys::enable_zerocopy(fd.as_fd()) {
                Ok(()) => (Some(ZcTracker::new(0)), None),
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
            queue: PartQueue::default(),
            broken: false,
            corked: false,
            zc,
            zc_off,
            scratch: Vec::new(),
            awaiting: false,
            credit: None,
            awaiting_credit: false,
            charged_front: false,
            urgent: Vec::new(),
            urgent_written: 0,
            written: 0,
            link: None,
        }
    }

    /// Links this sender with its connection's receiver (the same `link`
    /// goes to `Receiver::set_payload_send_link`): from now on it honours
    /// the peer's requests to write separate payloads by copy or with
    /// `MSG_ZEROCOPY` (for payloads queued after a request arrived), says
    /// in every separate payload's header how it is written
    /// (`payload_send`), and writes the requests its receiver makes (as a
    /// CREDIT frame on call 0, at the next frame boundary). A request
    /// waiting to be written goes out with the next
    /// [`enqueue`](Self::enqueue), [`enqueue_urgent`](Self::enqueue_urgent)
    /// or [`flush`](Self::flush).
    pub fn set_payload_send_link(&mut self, link: Arc<PayloadSendLink>) {
        self.link = Some(link);
    }

    /// Whether the peer asked this side to write its separate payloads by
    /// copy (and has not asked for `MSG_ZEROCOPY` again since): payloads
    /// queued now go by copy even with [`SendConfig::zerocopy`].
    pub fn peer_wants_copy(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.peer_wants() == Some(PayloadSend::Copy))
    }

    /// Whether a separate payload queued now would be written with
    /// `MSG_ZEROCOPY`.
    fn zc_for(&self, payload: &Payload) -> bool {
        let len = payload.len();
        self.zc.is_some()
            && len >= self.cfg.zerocopy_min
            && len <= self.cfg.zerocopy_max_inflight
            && payload.is_page_aligned()
            && !self.peer_wants_copy()
    }

    /// Queues the request our receiver made of the peer, if any, ahead of
    /// frames not started.
    fn queue_request(&mut self) {
        let Some(mode) = self.link.as_ref().and_then(|l| l.take_request()) else {
            return;
        };
        if self.broken {
            return;
        }
        let h = Header {
            kind: Kind::Credit as i32,
            payload_send: mode as i32,
            ..Header::default()
        };
        // A CREDIT frame of a few bytes fits any limits a peer announces.
        if encode_head(&h, 0, Flags::NONE, &self.cfg.limits, &mut self.urgent).is_ok() {
            self.counters.frame_sent(0);
            self.counters.asked_peer(mode == PayloadSend::Zerocopy);
        }
    }

    /// Bytes the socket has taken from this sender, in all: an event loop
    /// measures a write timeout as this not growing while bytes are queued.
    pub fn progress(&self) -> u64 {
        self.written
    }

    /// Limits separate payloads written and not yet read by the peer to
    /// `window` bytes (its announced `conn_window`): a frame whose payload
    /// does not fit waits, head and all, until the peer gives credit back
    /// ([`grant_credit`](Self::grant_credit)). One payload larger than the
    /// window goes when nothing is outstanding. Keeping the peer's socket
    /// from filling keeps TCP's receive window open, so segments stay on
    /// page boundaries and the peer can map them.
    pub fn set_payload_window(&mut self, window: u64) {
        self.credit = Some(pagerpc_core::conn::OutCredit::new(window));
    }

    /// The peer read `bytes` more payload bytes out of its socket.
    pub fn grant_credit(&mut self, bytes: u64) {
        if let Some(c) = self.credit.as_mut() {
            c.grant(bytes);
        }
    }

    /// Whether the next frame waits for payload credit from the peer (the
    /// driver must read, not wait for the socket to become writable).
    pub fn awaiting_credit(&self) -> bool {
        self.awaiting_credit
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
                pending_payloads: z.held_items(),
                pending_bytes: z.held_bytes(),
                ids_issued: z.next_id(),
            })
    }

    /// The configuration.
    pub fn config(&self) -> &SendConfig {
        &self.cfg
    }

    /// Checks frames enqueued from now on against `limits` (the peer's, as
    /// it announced them in its SETTINGS).
    pub fn set_limits(&mut self, limits: pagerpc_core::Limits) {
        self.cfg.limits = limits;
    }

    /// Whether an earlier failure broke the stream.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes + self.urgent.len() - self.urgent_written
    }

    /// Parts queued and not yet (fully) written.
    pub fn queued_parts(&self) -> usize {
        self.queue.parts.len()
    }

    /// Whether the last [`flush`](Self::flush) stopped because the next
    /// payload waits for zero-copy completions (the held bytes would pass
    /// [`SendConfig::zerocopy_max_inflight`]), not for room in the socket:
    /// wait for `EPOLLERR`/`POLLERR` then, not for writability, which
    /// would report at once.
    pub fn awaiting_completions(&self) -> bool {
        self.awaiting
    }

    /// Whether anything is queued.
    pub fn has_queued(&self) -> bool {
        !self.queue.parts.is_empty() || !self.urgent.is_empty()
    }

    /// Queues payload-less control frames (CREDIT) to go out at the next
    /// frame boundary, ahead of frames queued and not started. Nothing is
    /// written here.
    ///
    /// # Errors
    /// As [`enqueue`](Self::enqueue); a frame with a payload is refused
    /// as [`SendErrorKind::Codec`] would be, holding it.
    pub fn enqueue_urgent(&mut self, frames: Vec<OutFrame>) -> Result<(), SendError> {
        if self.broken || frames.iter().any(|f| !f.payload.is_empty()) {
            return Err(SendError {
                kind: SendErrorKind::Broken,
                payloads: frames.into_iter().map(|f| f.payload).collect(),
                partial: false,
            });
        }
        self.queue_request();
        let start = self.urgent.len();
        for f in &frames {
            if let Err(e) = encode_head(
                &f.header,
                0,
                Flags::NONE,
                &self.cfg.limits,
                &mut self.urgent,
            ) {
                self.urgent.truncate(start);
                return Err(SendError {
                    kind: SendErrorKind::Codec(e),
                    payloads: frames.into_iter().map(|f| f.payload).collect(),
                    partial: false,
                });
            }
            self.counters.frame_sent(0);
        }
        Ok(())
    }

    /// Writes urgent control frames if the stream is at a frame boundary.
    /// `Ok(false)` if the socket took no more.
    fn write_urgent(&mut self) -> io::Result<bool> {
        let boundary = self.urgent_written > 0
            || (self.queue.written == 0
                && !matches!(self.queue.parts.front(), Some(Part::Payload { .. })));
        while boundary && self.urgent_written < self.urgent.len() {
            match sys::sendmsg(
                self.fd.as_fd(),
                &[IoSlice::new(&self.urgent[self.urgent_written..])],
                sys::MSG_EOR,
            ) {
                Ok(n) => {
                    self.urgent_written += n;
                    self.written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.urgent_written == self.urgent.len() {
            self.urgent.clear();
            self.urgent_written = 0;
        }
        Ok(true)
    }

    /// Reads completion notifications without blocking and releases every
    /// payload the kernel is done with. Returns how many were released.
    /// Call it whenever the socket reports an error-queue event
    /// (`EPOLLERR`/`POLLERR`): until the queue is read, the socket keeps
    /// reporting it.
    ///
    /// # Errors
    /// If reading the socket's error queue fails.
    pub fn reap_completions(&mut self) -> io::Result<usize> {
        let Some(zc) = self.zc.as_mut() else {
            return Ok(0);
        };
        self.scratch.clear();
        sys::read_completions(self.fd.as_fd(), &mut self.scratch)?;
        for c in &self.scratch {
            let n = c.hi.wrapping_sub(c.lo).wrapping_add(1);
            self.counters
                .zc_completions(u64::from(n), if c.copied { u64::from(n) } else { 0 });
            zc.complete(c.lo, c.hi);
        }
        Ok(zc.take_released().len())
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
            if self.zc.as_ref().is_none_or(|z| z.held_items() == 0) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            sys::wait_errqueue(self.fd.as_fd(), left.min(Duration::from_millis(100)))?;
        }
    }

    /// Encodes frames and queues them behind whatever is queued, without
    /// writing anything. Small frames coalesce with the frames before them.
    ///
    /// # Errors
    /// [`SendErrorKind::Codec`] if a frame breaks a limit (then nothing of
    /// the batch is queued), [`SendErrorKind::Broken`] after an earlier
    /// failure; the error holds every payload.
    pub fn enqueue(&mut self, mut frames: Vec<OutFrame>) -> Result<(), SendError> {
        if self.broken {
            return Err(SendError {
                kind: SendErrorKind::Broken,
                payloads: frames.into_iter().map(|f| f.payload).collect(),
                partial: false,
            });
        }
        self.queue_request();
        if self.cfg.checksum {
            for f in frames.iter_mut().filter(|f| !f.payload.is_empty()) {
                f.header.payload_crc32c = Some(crc32c::crc32c(f.payload.as_slice()));
            }
        }
        // Encode every head first, so a frame over a limit fails before any
        // of the batch is queued. How each separate payload goes is decided
        // here too: a linked sender says so in its header.
        self.heads.clear();
        let mut spans = Vec::with_capacity(frames.len());
        for f in &mut frames {
            let inline = f.payload.len() < self.cfg.inline_max;
            let separate = !inline && !f.payload.is_empty();
            let zc_ok = separate && self.zc_for(&f.payload);
            if self.link.is_some() && separate {
                f.header.payload_send = if zc_ok {
                    PayloadSend::Zerocopy
                } else {
                    PayloadSend::Copy
                } as i32;
            }
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
                return Err(SendError {
                    kind: SendErrorKind::Codec(e),
                    payloads: frames.into_iter().map(|f| f.payload).collect(),
                    partial: false,
                });
            }
            spans.push((start, self.heads.len(), inline, zc_ok));
        }
        for (f, (s, e, inline, zc_ok)) in frames.into_iter().zip(spans) {
            self.counters.frame_sent(f.payload.len() as u64);
            if inline {
                let p = (!f.payload.is_empty()).then_some(f.payload);
                self.queue.push_head(&self.heads[s..e], p);
            } else {
                self.queue.push_head(&self.heads[s..e], None);
                self.queue.seal();
                if !f.payload.is_empty() {
                    self.queue.push_payload(f.payload, zc_ok);
                }
            }
        }
        Ok(())
    }

    /// Marks the end of the queue: frames enqueued from now on start a part
    /// of their own and can be taken back whole with
    /// [`take_back`](Self::take_back) while none of their bytes are written.
    pub fn mark(&mut self) -> QueueMark {
        self.queue.seal();
        QueueMark {
            index: self.queue.parts.len(),
            popped: self.queue.popped,
        }
    }

    /// Takes the frames enqueued after `mark` out of the queue and returns
    /// their payloads, if no byte of them was written; otherwise leaves
    /// the queue as it is and returns `None`.
    pub fn take_back(&mut self, mark: QueueMark) -> Option<Vec<Payload>> {
        let gone = usize::try_from(self.queue.popped - mark.popped).ok()?;
        let idx = mark.index.checked_sub(gone)?;
        if idx > self.queue.parts.len() || !self.queue.untouched(idx) {
            return None;
        }
        let mut payloads = Vec::new();
        self.queue.truncate(idx, &mut payloads);
        Some(payloads)
    }

    /// Writes queued parts until the queue is empty or the socket takes no
    /// more. Never waits.
    ///
    /// # Errors
    /// When the socket fails. The stream is then broken; the error holds
    /// the payloads of which no byte was written, and of a payload written
    /// in part by copy.
    pub fn flush(&mut self) -> Result<Flush, SendError> {
        if self.broken {
            return Err(self.fail(SendErrorKind::Broken));
        }
        self.queue_request();
        let r = self.write_queued();
        if self.zc.as_ref().is_some_and(|z| z.held_items() > 0) {
            // Release what the kernel is done with (as EPOLLERR would), so
            // held bytes do not pile up to the zero-copy cap; errors here
            // only delay the release.
            let _ = self.reap_completions();
        }
        match r {
            Ok(f) => Ok(f),
            Err(e) => Err(self.fail(SendErrorKind::Io(e))),
        }
    }

    /// Marks the stream broken and empties the queue into an error.
    fn fail(&mut self, kind: SendErrorKind) -> SendError {
        let partial = self.broken || self.queue.written > 0;
        self.broken = true;
        self.uncork();
        // A zero-copy payload partly handed to the kernel stays with the
        // tracker until the kernel is done with it.
        if let Some(Part::Payload { zc: Some(ids), .. }) = self.queue.parts.front() {
            let ids = *ids;
            if ids.count > 0 {
                if let Some(Part::Payload { payload, .. }) = self.queue.parts.pop_front() {
                    self.queue.bytes -= payload.len() - self.queue.written;
                    self.queue.written = 0;
                    self.hold(ids, payload);
                }
            }
        }
        let mut payloads = Vec::new();
        self.queue.truncate(0, &mut payloads);
        SendError {
            kind,
            payloads,
            partial,
        }
    }

    fn hold(&mut self, ids: ZcPart, payload: Payload) {
        if let Some(zc) = self.zc.as_mut() {
            let bytes = payload.len();
            zc.hold(
                ZcIds {
                    first: ids.first,
                    count: ids.count,
                },
                payload,
                bytes,
            );
            drop(zc.take_released());
        }
    }

    fn uncork(&mut self) {
        if self.corked {
            self.corked = false;
            let _ = sys::set_cork(self.fd.as_fd(), false);
        }
    }

    fn write_queued(&mut self) -> io::Result<Flush> {
        loop {
            if !self.urgent.is_empty() && !self.write_urgent()? {
                return Ok(Flush::Blocked);
            }
            let written = self.queue.written;
            // Decide once per payload, before its first byte, whether it
            // goes out with MSG_ZEROCOPY: it must qualify (a payload larger
            // than the whole cap goes by copy), and the bytes held for
            // completions must leave room for it; if they do not, wait for
            // completions rather than copy (data sent by copy lands in the
            // socket at arbitrary offsets, so the peer cannot map it).
            // (Whether it qualifies was decided when it was queued.)
            let mut go_zc = false;
            if let (
                Some(Part::Payload {
                    payload,
                    zc: None,
                    zc_ok,
                }),
                0,
            ) = (self.queue.parts.front(), written)
            {
                let cap = self.cfg.zerocopy_max_inflight;
                let len = payload.len();
                go_zc = *zc_ok && self.zc.is_some();
                let held = |s: &Self| s.zc.as_ref().map_or(0, ZcTracker::held_bytes);
                if go_zc && held(self) + len > cap {
                    self.reap_completions()?;
                    if held(self) + len > cap {
                        self.awaiting = true;
                        return Ok(Flush::Blocked);
                    }
                }
            }
            // A frame with a separate payload starts only when the peer
            // has credit for its payload (the head goes with it, so the
            // peer is never left inside a frame waiting for credit).
            if written == 0 {
                if let (
                    Some(Part::Head { .. }),
                    Some(Part::Payload {
                        payload, zc: None, ..
                    }),
                ) = (self.queue.parts.front(), self.queue.parts.get(1))
                {
                    let len = payload.len() as u64;
                    if self.credit.is_some_and(|c| !c.can_send(len)) {
                        self.awaiting_credit = true;
                        return Ok(Flush::Blocked);
                    }
                    self.awaiting_credit = false;
                }
            }
            let Some(front) = self.queue.parts.front_mut() else {
                return Ok(Flush::Done);
            };
            let n = match front {
                Part::Head { buf, .. } => {
                    match sys::sendmsg(
                        self.fd.as_fd(),
                        &[IoSlice::new(&buf[written..])],
                        sys::MSG_EOR,
                    ) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Ok(Flush::Blocked)
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
                Part::Payload { payload, zc, .. } => {
                    if written == 0 && !self.charged_front {
                        // Checked with its head; charged once, here.
                        self.charged_front = true;
                        if let Some(c) = self.credit.as_mut() {
                            c.spend(payload.len() as u64);
                        }
                    }
                    if written == 0 && zc.is_none() {
                        self.awaiting = false;
                        if go_zc {
                            let first = self.zc.as_ref().map_or(0, ZcTracker::next_id);
                            *zc = Some(ZcPart {
                                first,
                                count: 0,
                                copy_rest: false,
                            });
                            // Cork while the payload goes out: at the edge
                            // of the receive window TCP would otherwise send
                            // a segment shorter than the MSS, every segment
                            // after it would be off page boundaries, and the
                            // receiver could map none of the rest.
                            self.corked = sys::set_cork(self.fd.as_fd(), true).is_ok();
                            self.counters.zc_send();
                        }
                    }
                    let flags = if zc.is_some_and(|z| !z.copy_rest) {
                        sys::MSG_EOR | sys::MSG_ZEROCOPY
                    } else {
                        sys::MSG_EOR
                    };
                    let iov = [IoSlice::new(&payload.as_slice()[written..])];
                    match sys::sendmsg(self.fd.as_fd(), &iov, flags) {
                        Ok(n) => {
                            if n > 0 {
                                if let (Some(part), Some(t)) = (zc.as_mut(), self.zc.as_mut()) {
                                    if !part.copy_rest {
                                        t.issue();
                                        part.count += 1;
                                    }
                                }
                            }
                            n
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Ok(Flush::Blocked)
                        }
                        Err(e)
                            if e.raw_os_error() == Some(libc::ENOBUFS)
                                && zc.is_some_and(|z| !z.copy_rest) =>
                        {
                            // Too much memory pinned for notifications: the
                            // completions on the error queue hold it.
                            // Reading them frees it; if none is pending,
                            // send the rest of this payload by copy.
                            let outstanding = self.zc.as_ref().map_or(0, |t| t.outstanding_ids());
                            if outstanding == 0 {
                                // Nothing of ours pins memory: send the
                                // rest by copy (bytes already sent with
                                // MSG_ZEROCOPY keep the payload held).
                                if let Some(z) = zc.as_mut() {
                                    z.copy_rest = true;
                                }
                                continue;
                            }
                            let before = self.zc.as_ref().map_or(0, |t| t.outstanding_ids());
                            self.reap_completions()?;
                            let after = self.zc.as_ref().map_or(0, |t| t.outstanding_ids());
                            if after == before {
                                // Wait for EPOLLERR: a completion is coming.
                                return Ok(Flush::Blocked);
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
            };
            self.written += n as u64;
            if let Some(done) = self.queue.advance(n) {
                if let Part::Payload { payload, zc, .. } = done {
                    self.charged_front = false;
                    self.uncork();
                    match zc {
                        Some(ids) if ids.count > 0 => self.hold(ids, payload),
                        _ => drop(payload),
                    }
                }
            } else if n == 0 {
                return Ok(Flush::Blocked);
            }
        }
    }

    /// Sends one frame, waiting while the socket takes no more, up to the
    /// write timeout without progress.
    ///
    /// # Errors
    /// A [`SendError`] holding the payload: [`SendErrorKind::Codec`] if the
    /// frame breaks a limit (nothing written), [`SendErrorKind::Io`] or
    /// [`SendErrorKind::TimedOut`] if the socket failed or stalled (the
    /// stream is then broken when `partial` is set), and
    /// [`SendErrorKind::Broken`] after an earlier partial failure.
    pub fn send(&mut self, header: Header, payload: Payload) -> Result<(), SendError> {
        self.send_batch(vec![OutFrame { header, payload }])
    }

    /// Sends several frames, coalescing small ones into as few `sendmsg`
    /// calls as the part rules allow; waits as [`send`](Self::send) does.
    ///
    /// # Errors
    /// As [`send`](Self::send); the error holds the payloads of every frame
    /// of which no byte was written.
    pub fn send_batch(&mut self, frames: Vec<OutFrame>) -> Result<(), SendError> {
        self.send_batch_until(frames, None)
    }

    /// As [`send_batch`](Self::send_batch), but gives up at `deadline` too.
    /// If none of these frames' bytes were written by then, they are taken
    /// out of the queue and handed back, and the stream stays usable.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub fn send_batch_until(
        &mut self,
        frames: Vec<OutFrame>,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        // These frames start a part of their own, so they can be taken back
        // whole if nothing of them was written.
        let mark = self.mark();
        self.enqueue(frames)?;
        self.queue.seal();
        let mut progress = Instant::now();
        let mut left = self.queue.bytes;
        loop {
            match self.flush()? {
                Flush::Done => return Ok(()),
                Flush::Blocked => {}
            }
            if self.queue.bytes < left {
                left = self.queue.bytes;
                progress = Instant::now();
            }
            let stall = self.cfg.write_timeout.map(|t| progress + t);
            let until = match (stall, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = until.map(|u| u.saturating_duration_since(Instant::now()));
            let ready = if wait == Some(Duration::ZERO) {
                false
            } else {
                // POLLOUT, and POLLERR when completions are queued; only
                // POLLERR while the next payload waits for completions.
                let r = if self.awaiting {
                    sys::wait_errqueue(self.fd.as_fd(), wait.unwrap_or(Duration::from_secs(1)))
                } else {
                    sys::wait_writable(self.fd.as_fd(), wait)
                };
                let _ = self.reap_completions();
                r.map_err(|e| self.fail(SendErrorKind::Io(e)))?
            };
            if !ready && until.is_some_and(|u| Instant::now() >= u) {
                // None of ours written: take them back, the stream is intact.
                if let Some(payloads) = self.take_back(mark) {
                    return Err(SendError {
                        kind: SendErrorKind::TimedOut,
                        payloads,
                        partial: false,
                    });
                }
                return Err(self.fail(SendErrorKind::TimedOut));
            }
        }
    }

    /// Aborts the connection (the peer sees a reset) so that the kernel
    /// drops its send queue and lets go of every zero-copy payload, then
    /// releases them. Used when a connection is closed for cause.
    /// Everything still queued is dropped (a zero-copy payload partly
    /// handed to the kernel stays held until its completions arrive).
    pub fn abort(&mut self) {
        let _ = sys::abort(self.fd.as_fd());
        drop(self.fail(SendErrorKind::Broken));
        let _ = self.reap_completions();
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let Some(zc) = self.zc.as_ref() else {
            return;
        };
        if zc.held_items() == 0 {
            return;
        }
        // The kernel may still read from payloads sent with MSG_ZEROCOPY.
        let _ = self.reap_completions();
        if self.zc.as_ref().is_some_and(|z| z.held_items() > 0) {
            // Make the kernel let go of them now, instead of when (if ever)
            // the peer reads them.
            self.abort();
        }
        if let Some(zc) = self.zc.take() {
            if zc.held_items() > 0 {
                graveyard::bury(self.fd.clone(), zc);
            }
        }
    }
}
