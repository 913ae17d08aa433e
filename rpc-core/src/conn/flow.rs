//! Stream flow control in bytes: the sending side's view ([`OutCredit`])
//! and the receiving side's ([`InCredit`]) of one stream's window.
//!
//! A stream message costs its body plus its payload in bytes. The receiver
//! announces a window (`stream_window` in its SETTINGS); the sender may have
//! at most that many bytes outstanding, not yet given back. The receiver
//! gives bytes back (a CREDIT frame on the stream's call id) as its consumer
//! *releases* messages: drops the `Pages` it was handed. Arrival does not
//! count, so a consumer that stalls stops its sender after one window, and
//! other streams and calls on the connection go on.
//!
//! A message larger than the whole window may be sent when nothing is
//! outstanding, alone, so a window smaller than the largest message cannot
//! deadlock a stream.

use std::fmt;

/// The sending side of one stream's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutCredit {
    window: u64,
    outstanding: u64,
}

impl OutCredit {
    /// A stream whose receiver announced `window` bytes.
    pub fn new(window: u64) -> OutCredit {
        OutCredit {
            window,
            outstanding: 0,
        }
    }

    /// Whether a message of `bytes` may be sent now.
    pub fn can_send(&self, bytes: u64) -> bool {
        self.outstanding == 0 || self.outstanding.saturating_add(bytes) <= self.window
    }

    /// A message of `bytes` was sent.
    pub fn spend(&mut self, bytes: u64) {
        self.outstanding = self.outstanding.saturating_add(bytes);
    }

    /// The receiver gave `bytes` back.
    pub fn grant(&mut self, bytes: u64) {
        self.outstanding = self.outstanding.saturating_sub(bytes);
    }

    /// Bytes sent and not given back.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// The window.
    pub fn window(&self) -> u64 {
        self.window
    }
}

/// The peer sent more than its window allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowExceeded {
    /// The window (`stream_window`).
    pub window: u64,
    /// Bytes held (received and not released), counting the new message.
    pub got: u64,
}

impl fmt::Display for WindowExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the peer sent {} bytes of stream messages without credit, over the stream_window of {}",
            self.got, self.window
        )
    }
}

impl std::error::Error for WindowExceeded {}

/// The receiving side of one stream's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InCredit {
    window: u64,
    /// Received and not released.
    held: u64,
    /// Released and not yet given back in a CREDIT frame.
    unreported: u64,
}

impl InCredit {
    /// A stream for which this side announced `window` bytes.
    pub fn new(window: u64) -> InCredit {
        InCredit {
            window,
            held: 0,
            unreported: 0,
        }
    }

    /// A message of `bytes` arrived.
    ///
    /// # Errors
    /// [`WindowExceeded`] if the peer had no credit for it (the stream must
    /// then be ended with an error: the peer is not flow-controlled).
    pub fn on_message(&mut self, bytes: u64) -> Result<(), WindowExceeded> {
        // What the peer may have outstanding: everything held plus what was
        // released but not yet reported (the peer still counts it).
        let outstanding = self.held.saturating_add(self.unreported);
        if outstanding != 0 && outstanding.saturating_add(bytes) > self.window {
            return Err(WindowExceeded {
                window: self.window,
                got: outstanding.saturating_add(bytes),
            });
        }
        self.held = self.held.saturating_add(bytes);
        Ok(())
    }

    /// The consumer released `bytes` of what arrived.
    pub fn release(&mut self, bytes: u64) {
        let bytes = bytes.min(self.held);
        self.held -= bytes;
        self.unreported += bytes;
    }

    /// The credit to give back now, if any: once a quarter of the window
    /// is released, or once everything is (so a sender waiting with a
    /// large message is never left short).
    pub fn take_grant(&mut self) -> Option<u64> {
        if self.unreported == 0 || (self.unreported < self.window / 4 && self.held != 0) {
            return None;
        }
        Some(std::mem::take(&mut self.unreported))
    }

    /// Bytes received and not released.
    pub fn held(&self) -> u64 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_stops_at_the_window_and_resumes_on_credit() {
        let mut out = OutCredit::new(100);
        assert!(out.can_send(60));
        out.spend(60);
        assert!(out.can_send(40));
        assert!(!out.can_send(41));
        out.grant(10);
        assert!(out.can_send(50));
        out.grant(1000);
        assert_eq!(out.outstanding(), 0);
    }

    #[test]
    fn a_message_over_the_window_goes_alone() {
        let mut out = OutCredit::new(100);
        assert!(out.can_send(500));
        out.spend(500);
        assert!(!out.can_send(1));
        out.grant(500);
        assert!(out.can_send(1));
    }

    #[test]
    fn the_receiver_refuses_what_had_no_credit() {
        let mut inc = InCredit::new(100);
        inc.on_message(500).unwrap(); // alone: allowed
        assert!(inc.on_message(1).is_err());
        inc.release(500);
        // Released but not reported: the peer still counts it.
        assert_eq!(inc.on_message(1).unwrap_err().got, 501);
        assert_eq!(inc.take_grant(), Some(500));
        inc.on_message(100).unwrap();
        assert_eq!(
            inc.on_message(1),
            Err(WindowExceeded {
                window: 100,
                got: 101
            })
        );
    }

    #[test]
    fn grants_are_batched_but_never_withheld_when_all_is_released() {
        let mut inc = InCredit::new(100);
        for _ in 0..4 {
            inc.on_message(10).unwrap();
        }
        inc.release(10);
        assert_eq!(inc.take_grant(), None, "10 < a quarter, 30 still held");
        inc.release(20);
        assert_eq!(inc.take_grant(), Some(30));
        inc.release(10);
        assert_eq!(inc.take_grant(), Some(10), "everything released");
        assert_eq!(inc.take_grant(), None);
    }
}
