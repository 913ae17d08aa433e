//! Why a send failed, with the payloads handed back.

use std::fmt;
use std::io;

use pagerpc_core::CodecError;
use pagerpc_pages::Payload;

/// Why a send failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SendErrorKind {
    /// The frame breaks a limit; nothing was written.
    Codec(CodecError),
    /// The socket failed.
    Io(io::Error),
    /// The socket took no byte for the write timeout (or the caller's
    /// deadline passed first).
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
            SendErrorKind::TimedOut => write!(f, "send timed out: the socket took no data in time"),
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
    /// The payloads of the frames of which no byte was written. A payload
    /// whose bytes were partly written is not here when it was sent with
    /// `MSG_ZEROCOPY` (the kernel may still read it; the sender keeps it
    /// until the kernel is done), and is here otherwise.
    pub payloads: Vec<Payload>,
    /// Whether some bytes of a frame reached the socket, so the stream is
    /// now broken (the sender refuses further sends).
    pub partial: bool,
}

impl SendError {
    /// Takes back the first payload (the only one, for
    /// [`Sender::send`](crate::Sender::send)).
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
