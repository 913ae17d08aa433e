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
    /// Payloads of at most this many bytes are coalesced with their header
    /// into one part (and read with it by the receiver); larger ones are
    /// sent as their own part. Default 4096: anything smaller than a page
    /// can never be mapped anyway. Must not exceed the peer's
    /// `max_inline_payload_bytes`.
    pub inline_max: usize,
    /// How long one send may wait for room in the socket buffer before the
    /// connection is declared dead. Default 30 s.
    pub write_timeout: Option<Duration>,
    /// The limits to check outgoing frames against (the peer's limits).
    pub limits: Limits,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            inline_max: 4096,
            write_timeout: Some(Duration::from_secs(30)),
            limits: Limits::default(),
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

/// The send half of a connection.
#[derive(Debug)]
pub struct Sender {
    fd: Arc<OwnedFd>,
    cfg: SendConfig,
    counters: Arc<Counters>,
    heads: Vec<u8>,
    broken: bool,
}

impl Sender {
    /// A sender on `fd`, a connected stream socket in non-blocking mode.
    pub fn new(fd: Arc<OwnedFd>, cfg: SendConfig, counters: Arc<Counters>) -> Sender {
        Sender {
            fd,
            cfg,
            counters,
            heads: Vec::with_capacity(4096),
            broken: false,
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
    pub fn send(&mut self, header: &Header, payload: Payload) -> Result<(), SendError> {
        self.send_batch(vec![OutFrame {
            header: header.clone(),
            payload,
        }])
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
        let mut spans = Vec::with_capacity(frames.len());
        for f in &frames {
            let inline = f.payload.len() <= self.cfg.inline_max;
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
        let mut first_unsent = 0;
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(frames.len() * 2);
        let mut wrote_any = false;
        let deadline = self.cfg.write_timeout.map(|t| Instant::now() + t);
        let heads = std::mem::take(&mut self.heads);
        let mut result = Ok(());
        for (i, (f, &(s, e, inline))) in frames.iter().zip(&spans).enumerate() {
            iov.push(IoSlice::new(&heads[s..e]));
            if inline {
                if !f.payload.is_empty() {
                    iov.push(IoSlice::new(f.payload.as_slice()));
                }
                continue;
            }
            // A separate payload: end the head part here, then the payload part.
            result = write_part(&self.fd, &mut iov, deadline, &mut wrote_any).and_then(|()| {
                let mut p = vec![IoSlice::new(f.payload.as_slice())];
                write_part(&self.fd, &mut p, deadline, &mut wrote_any)
            });
            if result.is_err() {
                break;
            }
            first_unsent = i + 1;
        }
        if result.is_ok() && !iov.is_empty() {
            result = write_part(&self.fd, &mut iov, deadline, &mut wrote_any);
            if result.is_ok() {
                first_unsent = frames.len();
            }
        }
        drop(iov);
        self.heads = heads;
        match result {
            Ok(()) => {
                for f in &frames {
                    self.counters.frame_sent(f.payload.len() as u64);
                }
                Ok(())
            }
            Err(kind) => {
                self.broken |= wrote_any;
                Err(SendError {
                    kind,
                    payloads: frames
                        .into_iter()
                        .skip(first_unsent)
                        .map(|f| f.payload)
                        .collect(),
                    partial: wrote_any,
                })
            }
        }
    }
}

/// Writes every byte of `iov` as one part ending in `MSG_EOR`, retrying on
/// partial writes and waiting for buffer space until `deadline`. Empties
/// `iov`.
fn write_part(
    fd: &OwnedFd,
    iov: &mut Vec<IoSlice<'_>>,
    deadline: Option<Instant>,
    wrote_any: &mut bool,
) -> Result<(), SendErrorKind> {
    let mut slices: &mut [IoSlice<'_>] = &mut iov[..];
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match sys::sendmsg(fd.as_fd(), slices, sys::MSG_EOR) {
            Ok(n) => {
                *wrote_any |= n > 0;
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    return Err(SendErrorKind::TimedOut);
                }
                match sys::wait_writable(fd.as_fd(), left) {
                    Ok(true) => {}
                    Ok(false) => return Err(SendErrorKind::TimedOut),
                    Err(e) => return Err(SendErrorKind::Io(e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SendErrorKind::Io(e)),
        }
    }
    iov.clear();
    Ok(())
}
