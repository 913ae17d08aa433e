//! Transfer counters, per connection and process-wide.
//!
//! Every receive and send half owns an `Arc<Counters>`; each update is also
//! added to its parent (for example the server the connection belongs to),
//! if it has one, and to [`Counters::global`], so every view is exact.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Why payload bytes were copied rather than mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyReason {
    /// The part of a payload after its last whole page (`len % 4096`),
    /// including payloads smaller than a page and inline payloads.
    PayloadTail,
    /// The kernel said these bytes could not be mapped (`recv_skip_hint`):
    /// a segment that does not hold whole, aligned pages.
    Unmappable,
    /// Less than a page was queued at the head of the receive queue when
    /// the payload needed mapping (a segment smaller than a page, or the
    /// last bytes of a closing connection); the kernel maps whole pages
    /// only.
    NotQueued,
    /// Zero-copy receive was off for this connection (not requested, not
    /// supported by the kernel, or switched off after a failure).
    BackendOff,
}

/// A set of counters. All updates are relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Counters {
    frames_received: AtomicU64,
    frames_sent: AtomicU64,
    payload_bytes_received: AtomicU64,
    payload_bytes_sent: AtomicU64,
    bytes_mapped: AtomicU64,
    copied_tail: AtomicU64,
    copied_unmappable: AtomicU64,
    copied_not_queued: AtomicU64,
    copied_backend_off: AtomicU64,
    zc_sends: AtomicU64,
    zc_send_completions: AtomicU64,
    zc_send_copied: AtomicU64,
    parent: Option<Arc<Counters>>,
}

static GLOBAL: Counters = Counters::new();

macro_rules! both {
    ($self:ident . $field:ident += $n:expr) => {{
        let n = $n;
        $self.$field.fetch_add(n, Relaxed);
        if let Some(p) = &$self.parent {
            p.$field.fetch_add(n, Relaxed);
        }
        if !std::ptr::eq($self, &GLOBAL) {
            GLOBAL.$field.fetch_add(n, Relaxed);
        }
    }};
}

impl Counters {
    /// All zero.
    pub const fn new() -> Counters {
        Counters {
            frames_received: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            payload_bytes_received: AtomicU64::new(0),
            payload_bytes_sent: AtomicU64::new(0),
            bytes_mapped: AtomicU64::new(0),
            copied_tail: AtomicU64::new(0),
            copied_unmappable: AtomicU64::new(0),
            copied_not_queued: AtomicU64::new(0),
            copied_backend_off: AtomicU64::new(0),
            zc_sends: AtomicU64::new(0),
            zc_send_completions: AtomicU64::new(0),
            zc_send_copied: AtomicU64::new(0),
            parent: None,
        }
    }

    /// All zero, adding every update to `parent` too (one level: the
    /// parent's own parent is not updated).
    pub fn with_parent(parent: Arc<Counters>) -> Counters {
        Counters {
            parent: Some(parent),
            ..Counters::new()
        }
    }

    /// The process-wide counters, the sum over every connection.
    pub fn global() -> &'static Counters {
        &GLOBAL
    }

    /// A whole frame (head and payload) was received.
    pub fn frame_received(&self, payload_len: u64) {
        both!(self.frames_received += 1);
        both!(self.payload_bytes_received += payload_len);
    }

    /// A whole frame was handed to the socket.
    pub fn frame_sent(&self, payload_len: u64) {
        both!(self.frames_sent += 1);
        both!(self.payload_bytes_sent += payload_len);
    }

    /// `n` payload bytes were mapped instead of copied.
    pub fn mapped(&self, n: u64) {
        both!(self.bytes_mapped += n);
    }

    /// `n` payload bytes were copied, for `reason`.
    pub fn copied(&self, reason: CopyReason, n: u64) {
        match reason {
            CopyReason::PayloadTail => both!(self.copied_tail += n),
            CopyReason::Unmappable => both!(self.copied_unmappable += n),
            CopyReason::NotQueued => both!(self.copied_not_queued += n),
            CopyReason::BackendOff => both!(self.copied_backend_off += n),
        }
    }

    /// A `MSG_ZEROCOPY` send was issued.
    pub fn zc_send(&self) {
        both!(self.zc_sends += 1);
    }

    /// `completed` zero-copy sends completed, `copied` of which the kernel
    /// reported as copied (`SO_EE_CODE_ZEROCOPY_COPIED`).
    pub fn zc_completions(&self, completed: u64, copied: u64) {
        both!(self.zc_send_completions += completed);
        both!(self.zc_send_copied += copied);
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            frames_received: self.frames_received.load(Relaxed),
            frames_sent: self.frames_sent.load(Relaxed),
            payload_bytes_received: self.payload_bytes_received.load(Relaxed),
            payload_bytes_sent: self.payload_bytes_sent.load(Relaxed),
            bytes_mapped: self.bytes_mapped.load(Relaxed),
            copied_tail: self.copied_tail.load(Relaxed),
            copied_unmappable: self.copied_unmappable.load(Relaxed),
            copied_not_queued: self.copied_not_queued.load(Relaxed),
            copied_backend_off: self.copied_backend_off.load(Relaxed),
            zc_sends: self.zc_sends.load(Relaxed),
            zc_send_completions: self.zc_send_completions.load(Relaxed),
            zc_send_copied: self.zc_send_copied.load(Relaxed),
        }
    }
}

/// A plain copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // each field mirrors the Counters method that feeds it
pub struct CountersSnapshot {
    pub frames_received: u64,
    pub frames_sent: u64,
    pub payload_bytes_received: u64,
    pub payload_bytes_sent: u64,
    pub bytes_mapped: u64,
    pub copied_tail: u64,
    pub copied_unmappable: u64,
    pub copied_not_queued: u64,
    pub copied_backend_off: u64,
    pub zc_sends: u64,
    pub zc_send_completions: u64,
    pub zc_send_copied: u64,
}

impl CountersSnapshot {
    /// Payload bytes copied, for any reason.
    pub fn bytes_copied(&self) -> u64 {
        self.copied_tail + self.copied_unmappable + self.copied_not_queued + self.copied_backend_off
    }

    /// Percentage of received payload bytes that were mapped (0 when none).
    pub fn mapped_percent(&self) -> f64 {
        let total = self.bytes_mapped + self.bytes_copied();
        if total == 0 {
            0.0
        } else {
            100.0 * self.bytes_mapped as f64 / total as f64
        }
    }

    /// The difference `self - earlier`, field by field.
    pub fn since(&self, earlier: &CountersSnapshot) -> CountersSnapshot {
        CountersSnapshot {
            frames_received: self.frames_received - earlier.frames_received,
            frames_sent: self.frames_sent - earlier.frames_sent,
            payload_bytes_received: self.payload_bytes_received - earlier.payload_bytes_received,
            payload_bytes_sent: self.payload_bytes_sent - earlier.payload_bytes_sent,
            bytes_mapped: self.bytes_mapped - earlier.bytes_mapped,
            copied_tail: self.copied_tail - earlier.copied_tail,
            copied_unmappable: self.copied_unmappable - earlier.copied_unmappable,
            copied_not_queued: self.copied_not_queued - earlier.copied_not_queued,
            copied_backend_off: self.copied_backend_off - earlier.copied_backend_off,
            zc_sends: self.zc_sends - earlier.zc_sends,
            zc_send_completions: self.zc_send_completions - earlier.zc_send_completions,
            zc_send_copied: self.zc_send_copied - earlier.zc_send_copied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_connection_updates_reach_global() {
        let c = Counters::new();
        let g0 = Counters::global().snapshot();
        c.mapped(8192);
        c.copied(CopyReason::PayloadTail, 100);
        c.copied(CopyReason::Unmappable, 4096);
        let s = c.snapshot();
        assert_eq!(s.bytes_mapped, 8192);
        assert_eq!(s.bytes_copied(), 4196);
        assert!((s.mapped_percent() - 100.0 * 8192.0 / 12388.0).abs() < 1e-9);
        let g = Counters::global().snapshot().since(&g0);
        assert!(g.bytes_mapped >= 8192 && g.copied_unmappable >= 4096);
    }
}
