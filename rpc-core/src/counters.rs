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
    /// `Backend::Auto` chose to copy the whole payload; why is counted per
    /// payload in [`AutoChoice`].
    Auto,
}

/// Which receive path `Backend::Auto` took for a payload, and why.
///
/// Every non-empty payload an `Auto` receiver receives (inline ones too)
/// is counted once, with its bytes, under one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AutoChoice {
    /// Mapped: mapping is the path the connection is settled on.
    MapChosen,
    /// Mapped although the connection is settled on copying: a sample that
    /// keeps the mapping estimate current (or a payload the peer wrote
    /// with `MSG_ZEROCOPY` before it honoured a request to copy).
    MapSample,
    /// Copied: copying is the path the connection is settled on.
    CopyChosen,
    /// Copied although the connection is settled on mapping: a sample that
    /// keeps the copying estimate current, or a payload that could not be
    /// mapped this time (its first bytes were already read with a header,
    /// or the peer wrote it by copy before it honoured a request).
    CopySample,
    /// Copied without measuring: smaller than a page, inline, or below
    /// `RecvConfig::auto_floor`.
    CopyBelowFloor,
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
    copied_auto: AtomicU64,
    auto: [AtomicU64; 10],
    asked_peer: [AtomicU64; 2],
    peer_asked: [AtomicU64; 2],
    zc_sends: AtomicU64,
    zc_send_completions: AtomicU64,
    zc_send_copied: AtomicU64,
    socket_maps: [AtomicU64; 2],
    tails_copied_with_map: AtomicU64,
    parent: Option<Arc<Counters>>,
}

static GLOBAL: Counters = Counters::new();

macro_rules! both {
    ($self:ident . $field:ident [ $i:expr ] += $n:expr) => {{
        let (i, n) = ($i, $n);
        $self.$field[i].fetch_add(n, Relaxed);
        if let Some(p) = &$self.parent {
            p.$field[i].fetch_add(n, Relaxed);
        }
        if !std::ptr::eq($self, &GLOBAL) {
            GLOBAL.$field[i].fetch_add(n, Relaxed);
        }
    }};
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
            copied_auto: AtomicU64::new(0),
            auto: [const { AtomicU64::new(0) }; 10],
            asked_peer: [const { AtomicU64::new(0) }; 2],
            peer_asked: [const { AtomicU64::new(0) }; 2],
            zc_sends: AtomicU64::new(0),
            zc_send_completions: AtomicU64::new(0),
            zc_send_copied: AtomicU64::new(0),
            socket_maps: [const { AtomicU64::new(0) }; 2],
            tails_copied_with_map: AtomicU64::new(0),
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
            CopyReason::Auto => both!(self.copied_auto += n),
        }
    }

    /// `Backend::Auto` received a payload of `bytes` by the path and for
    /// the reason `choice` says.
    pub fn auto_payload(&self, choice: AutoChoice, bytes: u64) {
        let i = choice as usize * 2;
        both!(self.auto[i] += 1);
        both!(self.auto[i + 1] += bytes);
    }

    /// This side asked its peer to write its separate payloads by copy
    /// (`zerocopy` false) or with `MSG_ZEROCOPY` (true): a CREDIT frame
    /// with `payload_send` was queued.
    pub fn asked_peer(&self, zerocopy: bool) {
        both!(self.asked_peer[usize::from(zerocopy)] += 1);
    }

    /// The peer asked this side to write its separate payloads by copy
    /// (`zerocopy` false) or with `MSG_ZEROCOPY` (true).
    pub fn peer_asked(&self, zerocopy: bool) {
        both!(self.peer_asked[usize::from(zerocopy)] += 1);
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

    /// A zero-copy receive made a mapping of the socket for a payload
    /// (`reused` false), or took one its connection kept from an earlier
    /// payload (`reused` true; see `RecvConfig::kept_mappings`).
    pub fn socket_map(&self, reused: bool) {
        both!(self.socket_maps[usize::from(reused)] += 1);
    }

    /// The kernel copied a payload's sub-page tail in the same
    /// `TCP_ZEROCOPY_RECEIVE` call that mapped its last whole pages (its
    /// copy buffer), instead of a `recv` of its own.
    pub fn tail_copied_with_map(&self) {
        both!(self.tails_copied_with_map += 1);
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
            copied_auto: self.copied_auto.load(Relaxed),
            auto: AutoCounts {
                map_chosen: self.auto[0].load(Relaxed),
                map_chosen_bytes: self.auto[1].load(Relaxed),
                map_sample: self.auto[2].load(Relaxed),
                map_sample_bytes: self.auto[3].load(Relaxed),
                copy_chosen: self.auto[4].load(Relaxed),
                copy_chosen_bytes: self.auto[5].load(Relaxed),
                copy_sample: self.auto[6].load(Relaxed),
                copy_sample_bytes: self.auto[7].load(Relaxed),
                below_floor: self.auto[8].load(Relaxed),
                below_floor_bytes: self.auto[9].load(Relaxed),
            },
            asked_peer_copy: self.asked_peer[0].load(Relaxed),
            asked_peer_zerocopy: self.asked_peer[1].load(Relaxed),
            peer_asked_copy: self.peer_asked[0].load(Relaxed),
            peer_asked_zerocopy: self.peer_asked[1].load(Relaxed),
            zc_sends: self.zc_sends.load(Relaxed),
            zc_send_completions: self.zc_send_completions.load(Relaxed),
            zc_send_copied: self.zc_send_copied.load(Relaxed),
            socket_maps_made: self.socket_maps[0].load(Relaxed),
            socket_maps_reused: self.socket_maps[1].load(Relaxed),
            tails_copied_with_map: self.tails_copied_with_map.load(Relaxed),
        }
    }
}

/// A plain copy of [`Counters`]. Fields are added as counters are
/// (`#[non_exhaustive]`): build one with `Default` or take it from
/// [`Counters::snapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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
    pub copied_auto: u64,
    /// Payloads (and their bytes) received by `Backend::Auto`, by path and
    /// reason.
    pub auto: AutoCounts,
    pub asked_peer_copy: u64,
    pub asked_peer_zerocopy: u64,
    pub peer_asked_copy: u64,
    pub peer_asked_zerocopy: u64,
    pub zc_sends: u64,
    pub zc_send_completions: u64,
    pub zc_send_copied: u64,
    pub socket_maps_made: u64,
    pub socket_maps_reused: u64,
    pub tails_copied_with_map: u64,
}

impl CountersSnapshot {
    /// Payload bytes copied, for any reason.
    pub fn bytes_copied(&self) -> u64 {
        self.copied_tail
            + self.copied_unmappable
            + self.copied_not_queued
            + self.copied_backend_off
            + self.copied_auto
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
            copied_auto: self.copied_auto - earlier.copied_auto,
            auto: self.auto.since(&earlier.auto),
            asked_peer_copy: self.asked_peer_copy - earlier.asked_peer_copy,
            asked_peer_zerocopy: self.asked_peer_zerocopy - earlier.asked_peer_zerocopy,
            peer_asked_copy: self.peer_asked_copy - earlier.peer_asked_copy,
            peer_asked_zerocopy: self.peer_asked_zerocopy - earlier.peer_asked_zerocopy,
            zc_sends: self.zc_sends - earlier.zc_sends,
            zc_send_completions: self.zc_send_completions - earlier.zc_send_completions,
            zc_send_copied: self.zc_send_copied - earlier.zc_send_copied,
            socket_maps_made: self.socket_maps_made - earlier.socket_maps_made,
            socket_maps_reused: self.socket_maps_reused - earlier.socket_maps_reused,
            tails_copied_with_map: self.tails_copied_with_map - earlier.tails_copied_with_map,
        }
    }
}

/// What `Backend::Auto` did with the payloads it received: how many took
/// each path, for which reason, and their bytes (see [`AutoChoice`]).
/// The byte fields add up to the payload bytes an `Auto` receiver
/// received; how those bytes were placed (mapped, or copied and why) is in
/// the other counters, as for every backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)] // named after AutoChoice's variants
pub struct AutoCounts {
    pub map_chosen: u64,
    pub map_chosen_bytes: u64,
    pub map_sample: u64,
    pub map_sample_bytes: u64,
    pub copy_chosen: u64,
    pub copy_chosen_bytes: u64,
    pub copy_sample: u64,
    pub copy_sample_bytes: u64,
    pub below_floor: u64,
    pub below_floor_bytes: u64,
}

impl AutoCounts {
    /// Payloads counted.
    pub fn payloads(&self) -> u64 {
        self.map_chosen + self.map_sample + self.copy_chosen + self.copy_sample + self.below_floor
    }

    /// Their bytes.
    pub fn bytes(&self) -> u64 {
        self.map_chosen_bytes
            + self.map_sample_bytes
            + self.copy_chosen_bytes
            + self.copy_sample_bytes
            + self.below_floor_bytes
    }

    /// The difference `self - earlier`, field by field.
    pub fn since(&self, e: &AutoCounts) -> AutoCounts {
        AutoCounts {
            map_chosen: self.map_chosen - e.map_chosen,
            map_chosen_bytes: self.map_chosen_bytes - e.map_chosen_bytes,
            map_sample: self.map_sample - e.map_sample,
            map_sample_bytes: self.map_sample_bytes - e.map_sample_bytes,
            copy_chosen: self.copy_chosen - e.copy_chosen,
            copy_chosen_bytes: self.copy_chosen_bytes - e.copy_chosen_bytes,
            copy_sample: self.copy_sample - e.copy_sample,
            copy_sample_bytes: self.copy_sample_bytes - e.copy_sample_bytes,
            below_floor: self.below_floor - e.below_floor,
            below_floor_bytes: self.below_floor_bytes - e.below_floor_bytes,
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

    #[test]
    fn auto_choices_and_requests_are_counted_apart() {
        let parent = Arc::new(Counters::new());
        let c = Counters::with_parent(parent.clone());
        c.auto_payload(AutoChoice::MapChosen, 1 << 20);
        c.auto_payload(AutoChoice::MapSample, 300);
        c.auto_payload(AutoChoice::CopyChosen, 2 << 20);
        c.auto_payload(AutoChoice::CopyChosen, 5);
        c.auto_payload(AutoChoice::CopySample, 7);
        c.auto_payload(AutoChoice::CopyBelowFloor, 11);
        c.copied(CopyReason::Auto, 100);
        c.asked_peer(false);
        c.asked_peer(true);
        c.asked_peer(true);
        c.peer_asked(false);
        let s = c.snapshot();
        let want = AutoCounts {
            map_chosen: 1,
            map_chosen_bytes: 1 << 20,
            map_sample: 1,
            map_sample_bytes: 300,
            copy_chosen: 2,
            copy_chosen_bytes: (2 << 20) + 5,
            copy_sample: 1,
            copy_sample_bytes: 7,
            below_floor: 1,
            below_floor_bytes: 11,
        };
        assert_eq!(s.auto, want);
        assert_eq!(s.auto.payloads(), 6);
        assert_eq!(s.auto.bytes(), (3 << 20) + 323);
        assert_eq!(s.copied_auto, 100);
        assert_eq!(s.bytes_copied(), 100);
        assert_eq!((s.asked_peer_copy, s.asked_peer_zerocopy), (1, 2));
        assert_eq!((s.peer_asked_copy, s.peer_asked_zerocopy), (1, 0));
        assert_eq!(parent.snapshot().auto, want);
        assert_eq!(s.since(&s), CountersSnapshot::default());
    }
}
