//! How a connection's two halves agree with the peer on the way separate
//! payloads are written: by copy, or with `MSG_ZEROCOPY`.
//!
//! A receiver with `Backend::Auto` may find that copying costs it less CPU
//! than mapping; data written with `MSG_ZEROCOPY` and then copied costs a
//! receiver more than data written by copy, so it asks its peer to write by
//! copy (and later to write with `MSG_ZEROCOPY` again). The request is a
//! CREDIT frame on call 0 carrying the header field `payload_send`
//! (`docs/wire-format.md`).
//!
//! The receive half sees the frames the peer sends, and the send half
//! writes frames: a [`PayloadSendLink`] shared by the two halves of one
//! connection carries what the peer asked for to the send half, and what
//! the receive half wants to ask for to the send half, which writes it.

use std::sync::atomic::{AtomicU8, Ordering::SeqCst};

use pagerpc_proto::PayloadSend;

/// What the two halves of one connection share about payload send modes.
/// See the [module documentation](self).
#[derive(Debug, Default)]
pub struct PayloadSendLink {
    /// What the peer asked this side to do (a `PayloadSend` value; 0:
    /// nothing asked).
    peer_asked: AtomicU8,
    /// A request for the peer not yet written (0: none).
    to_ask: AtomicU8,
}

fn encode(mode: PayloadSend) -> u8 {
    match mode {
        PayloadSend::Unspecified => 0,
        PayloadSend::Copy => 1,
        PayloadSend::Zerocopy => 2,
    }
}

fn decode(v: u8) -> Option<PayloadSend> {
    match v {
        1 => Some(PayloadSend::Copy),
        2 => Some(PayloadSend::Zerocopy),
        _ => None,
    }
}

impl PayloadSendLink {
    /// Nothing asked either way.
    pub fn new() -> PayloadSendLink {
        PayloadSendLink::default()
    }

    /// The receive half read a request from the peer: write separate
    /// payloads as `mode` says from now on. An unspecified mode changes
    /// nothing.
    pub fn peer_asked(&self, mode: PayloadSend) {
        if mode != PayloadSend::Unspecified {
            self.peer_asked.store(encode(mode), SeqCst);
        }
    }

    /// How the peer asked this side to write separate payloads; `None` if
    /// it never asked (then the send configuration alone decides).
    pub fn peer_wants(&self) -> Option<PayloadSend> {
        decode(self.peer_asked.load(SeqCst))
    }

    /// The receive half wants the peer to write its separate payloads as
    /// `mode` says. Replaces a request not yet written.
    pub fn ask_peer(&self, mode: PayloadSend) {
        self.to_ask.store(encode(mode), SeqCst);
    }

    /// Whether a request waits to be written.
    pub fn has_request(&self) -> bool {
        self.to_ask.load(SeqCst) != 0
    }

    /// For the send half: takes the request to write, if any.
    pub fn take_request(&self) -> Option<PayloadSend> {
        if self.to_ask.load(SeqCst) == 0 {
            return None;
        }
        decode(self.to_ask.swap(0, SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_both_ways() {
        let l = PayloadSendLink::new();
        assert_eq!(l.peer_wants(), None);
        assert_eq!(l.take_request(), None);
        l.peer_asked(PayloadSend::Copy);
        l.peer_asked(PayloadSend::Unspecified);
        assert_eq!(l.peer_wants(), Some(PayloadSend::Copy));
        l.peer_asked(PayloadSend::Zerocopy);
        assert_eq!(l.peer_wants(), Some(PayloadSend::Zerocopy));
        l.ask_peer(PayloadSend::Copy);
        l.ask_peer(PayloadSend::Zerocopy);
        assert!(l.has_request());
        assert_eq!(l.take_request(), Some(PayloadSend::Zerocopy));
        assert_eq!(l.take_request(), None);
        assert!(!l.has_request());
    }
}
