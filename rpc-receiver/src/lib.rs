//! The receive half of pagerpc.
//!
//! A [`Receiver`] reads each frame's prefix and header from a non-blocking
//! stream socket, then places the payload in page-aligned memory through a
//! receive *backend*, and hands the complete frame to its consumer as a
//! [`Frame`] whose payload is owned [`Pages`]. A payload is delivered only
//! when every byte of it has arrived; a connection that ends early yields
//! [`RecvError::Codec`] with [`CodecError::Truncated`], never a short
//! payload.
//!
//! Backends (see [`Backend`]):
//! - **copy**: the payload is read into freshly allocated page-aligned
//!   memory (an anonymous mapping for large payloads). Always available.
//!
//! The zero-copy backends plug in behind the same seam, so callers do not
//! change when a connection maps instead of copies.
#![deny(unsafe_op_in_unsafe_fn)]

mod sys;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use pagerpc_core::{CodecError, CopyReason, Counters, FrameDecoder, FrameHead, Limits, Need};
pub use pagerpc_pages::{Origin, PageBuf, Pages};

/// Which receive backend a connection uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// Copy every payload into fresh page-aligned memory.
    #[default]
    Copy,
}

/// How a [`Receiver`] reads.
#[derive(Clone, Debug)]
pub struct RecvConfig {
    /// Limits every incoming frame must respect.
    pub limits: Limits,
    /// The backend to use.
    pub backend: Backend,
    /// Size of the connection's read buffer for prefixes, headers and small
    /// payloads. Default 64 KiB.
    ///
    /// # Memory cost
    /// One buffer of this size per connection, for the connection's life.
    pub read_buf: usize,
}

impl Default for RecvConfig {
    fn default() -> Self {
        RecvConfig {
            limits: Limits::default(),
            backend: Backend::Copy,
            read_buf: 64 * 1024,
        }
    }
}

/// One complete frame.
#[derive(Debug)]
pub struct Frame {
    /// Prefix and decoded header.
    pub head: FrameHead,
    /// The whole payload (empty if the frame has none).
    pub payload: Pages,
}

/// Why a receive failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RecvError {
    /// The peer closed the connection cleanly, between frames.
    Closed,
    /// The peer sent something malformed or over a limit, or closed the
    /// connection inside a frame ([`CodecError::Truncated`]).
    Codec(CodecError),
    /// The socket failed (for example `ECONNRESET`), or memory for a payload
    /// could not be allocated.
    Io(io::Error),
    /// The deadline passed first. The receiver keeps its place; a later call
    /// resumes the same frame.
    TimedOut,
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Closed => write!(f, "connection closed by peer"),
            RecvError::Codec(e) => write!(f, "bad frame from peer: {e}"),
            RecvError::Io(e) => write!(f, "receive failed: {e}"),
            RecvError::TimedOut => write!(f, "receive timed out"),
        }
    }
}

impl std::error::Error for RecvError {}

impl From<CodecError> for RecvError {
    fn from(e: CodecError) -> Self {
        RecvError::Codec(e)
    }
}

/// What one step of [`Receiver::poll_frame`] achieved.
enum Step {
    Frame(Frame),
    Progress,
    Blocked,
}

/// A payload being filled.
struct Partial {
    head: FrameHead,
    dest: PageBuf,
    filled: usize,
}

/// The receive half of a connection.
pub struct Receiver {
    fd: Arc<OwnedFd>,
    cfg: RecvConfig,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    partial: Option<Partial>,
    counters: Arc<Counters>,
    /// The last read returned fewer bytes than asked for, so the socket is
    /// probably empty: the next `poll_frame` that would read reports
    /// "nothing more" instead, saving a syscall that would say `EAGAIN`.
    /// Readiness is level-triggered, so nothing is missed.
    drained: bool,
    /// The `SO_RCVLOWAT` currently set (1 = the kernel default).
    lowat: i32,
    /// Reads may block (inside [`Receiver::recv_frame`] without a deadline,
    /// on a socket in blocking mode).
    block: bool,
    /// The stream error that ended this connection; every later call
    /// returns it again.
    dead: Option<CodecError>,
}

/// Most `SO_RCVLOWAT` is set to while waiting for a payload.
const MAX_LOWAT: usize = 256 * 1024;

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("backend", &self.cfg.backend)
            .field("need", &self.decoder.need())
            .field("buffered", &(self.end - self.start))
            .finish()
    }
}

impl Receiver {
    /// A receiver on `fd`, a connected stream socket in non-blocking mode.
    pub fn new(fd: Arc<OwnedFd>, cfg: RecvConfig, counters: Arc<Counters>) -> Receiver {
        let buf = vec![0u8; cfg.read_buf.max(pagerpc_core::PREFIX_LEN)].into_boxed_slice();
        Receiver {
            decoder: FrameDecoder::new(cfg.limits),
            fd,
            cfg,
            buf,
            start: 0,
            end: 0,
            partial: None,
            counters,
            drained: false,
            lowat: 1,
            block: false,
            dead: None,
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.cfg.backend
    }

    /// This connection's counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Whether the receiver is between frames with nothing buffered.
    pub fn is_idle(&self) -> bool {
        self.decoder.at_boundary() && self.start == self.end
    }

    /// Makes as much progress as the socket allows without blocking, and
    /// returns the next complete frame, or `None` if the socket has no more
    /// bytes for now.
    ///
    /// # Errors
    /// [`RecvError::Closed`] at a clean end of stream, [`RecvError::Codec`]
    /// for bad or truncated frames (sticky: the connection is unusable), and
    /// [`RecvError::Io`] for socket failures.
    pub fn poll_frame(&mut self) -> Result<Option<Frame>, RecvError> {
        if let Some(e) = &self.dead {
            return Err(RecvError::Codec(e.clone()));
        }
        let r = self.poll_inner();
        if let Err(RecvError::Codec(e)) = &r {
            self.dead = Some(e.clone());
            self.partial = None;
        }
        r
    }

    fn poll_inner(&mut self) -> Result<Option<Frame>, RecvError> {
        loop {
            let step = match self.decoder.need() {
                Need::Failed => {
                    return Err(self
                        .decoder
                        .finish()
                        .err()
                        .map_or(RecvError::Closed, RecvError::Codec))
                }
                Need::Prefix(n) => self.step_meta(n)?,
                Need::Header {
                    remaining,
                    inline_payload,
                } => self.step_meta(remaining.saturating_add(inline_payload as usize))?,
                Need::Payload { remaining, .. } => self.step_payload(remaining)?,
            };
            match step {
                Step::Frame(f) => return Ok(Some(f)),
                Step::Progress => {}
                Step::Blocked => {
                    self.drained = false;
                    return Ok(None);
                }
            }
        }
    }

    /// Blocks until the next complete frame arrives or `deadline` passes.
    ///
    /// # Errors
    /// As [`poll_frame`](Self::poll_frame), plus [`RecvError::TimedOut`].
    ///
    /// Without a deadline, on a socket in blocking mode, this blocks in
    /// `recv` itself rather than in `poll` followed by `recv`: one syscall
    /// per wake-up instead of two, which is most of a small call's cost.
    pub fn recv_frame(&mut self, deadline: Option<Instant>) -> Result<Frame, RecvError> {
        if deadline.is_none() {
            self.block = true;
            let r = self.poll_frame();
            self.block = false;
            match r {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {} // the socket is non-blocking: wait below
                Err(e) => return Err(e),
            }
        }
        loop {
            if let Some(f) = self.poll_frame()? {
                return Ok(f);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(RecvError::TimedOut);
            }
            self.wait_lowat();
            if !sys::wait_readable(self.fd.as_fd(), left).map_err(RecvError::Io)? {
                return Err(RecvError::TimedOut);
            }
        }
    }

    /// Before waiting for readiness: while a large payload is missing bytes,
    /// ask the kernel not to report the socket readable until a good chunk
    /// of them is there, so a waiter wakes once per chunk rather than once
    /// per segment. Restores the default between payloads. Event loops call
    /// this before re-arming the socket.
    pub fn wait_lowat(&mut self) {
        let want = match self.decoder.need() {
            Need::Payload { remaining, .. } if self.start == self.end => {
                remaining.min(MAX_LOWAT as u64) as i32
            }
            _ => 1,
        };
        if want != self.lowat && sys::set_rcvlowat(self.fd.as_fd(), want).is_ok() {
            self.lowat = want;
        }
    }

    /// Feeds prefix/header bytes (reading more if none are buffered) and
    /// starts a payload when a head completes.
    fn step_meta(&mut self, want: usize) -> Result<Step, RecvError> {
        if self.start == self.end && ((self.drained && !self.block) || !self.fill_buf(want)?) {
            return Ok(Step::Blocked);
        }
        let (used, head) = self.decoder.feed(&self.buf[self.start..self.end])?;
        self.start += used;
        let Some(head) = head else {
            return Ok(Step::Progress);
        };
        let len = head.payload_len();
        if len == 0 {
            self.counters.frame_received(0);
            return Ok(Step::Frame(Frame {
                head,
                payload: Pages::empty(),
            }));
        }
        // The decoder checked the length against max_payload_bytes.
        let len = usize::try_from(len).map_err(|_| {
            RecvError::Codec(CodecError::PayloadTooLarge {
                limit: self.cfg.limits.max_payload_bytes,
                got: len,
            })
        })?;
        // Every byte is written before the payload is delivered.
        let dest = PageBuf::for_overwrite(len).map_err(RecvError::Io)?;
        self.partial = Some(Partial {
            head,
            dest,
            filled: 0,
        });
        Ok(Step::Progress)
    }

    /// Moves payload bytes into the partial payload: first from the buffer,
    /// then from the socket. Returns the frame once it is complete.
    fn step_payload(&mut self, remaining: u64) -> Result<Step, RecvError> {
        let rem = usize::try_from(remaining).unwrap_or(usize::MAX);
        let buffered = self.end - self.start;
        if buffered == 0 {
            if self.drained && !self.block {
                return Ok(Step::Blocked);
            }
            if rem < self.buf.len() / 2 {
                // A small remainder: read it (and what follows) into the buffer.
                return Ok(if self.fill_buf(rem)? {
                    Step::Progress
                } else {
                    Step::Blocked
                });
            }
            if self.block {
                self.wait_lowat();
            }
        }
        let Some(p) = self.partial.as_mut() else {
            // Unreachable: the decoder enters the payload state only through
            // step_meta, which creates the partial payload.
            return Err(RecvError::Io(io::Error::other(
                "payload state without a destination",
            )));
        };
        let n = if buffered > 0 {
            let n = rem.min(buffered);
            p.dest[p.filled..p.filled + n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            n
        } else {
            // A large remainder: read straight into the payload's pages.
            match sys::recv(
                self.fd.as_fd(),
                &mut p.dest[p.filled..p.filled + rem],
                self.block,
            ) {
                Ok(0) => return Err(self.eof()),
                Ok(n) => {
                    self.drained = n < rem;
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Blocked),
                Err(e) => return Err(RecvError::Io(e)),
            }
        };
        p.filled += n;
        self.counters.copied(CopyReason::BackendOff, n as u64);
        if !self.decoder.payload_received(n as u64) {
            return Ok(Step::Progress);
        }
        let Some(p) = self.partial.take() else {
            return Ok(Step::Progress);
        };
        self.counters.frame_received(p.filled as u64);
        Ok(Step::Frame(Frame {
            head: p.head,
            payload: p.dest.freeze(),
        }))
    }

    /// Reads into the (compacted) buffer. With the copy backend it reads as
    /// much as fits; `_exact` is the number of bytes the decoder knows are
    /// part of the current section, which zero-copy backends read exactly
    /// so as never to pull a mappable payload into the buffer.
    /// Returns `false` if the socket had nothing.
    fn fill_buf(&mut self, _exact: usize) -> Result<bool, RecvError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = &mut self.buf[self.end..];
        let asked = room.len();
        match sys::recv(self.fd.as_fd(), room, self.block) {
            Ok(0) => Err(self.eof()),
            Ok(n) => {
                self.end += n;
                self.drained = n < asked;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(RecvError::Io(e)),
        }
    }

    /// The error for an end of stream here: clean between frames, truncation
    /// inside one. Only reached with an empty buffer.
    fn eof(&mut self) -> RecvError {
        self.partial = None;
        match self.decoder.finish() {
            Ok(()) => RecvError::Closed,
            Err(e) => RecvError::Codec(e),
        }
    }
}
