//! Sans-IO bookkeeping of `MSG_ZEROCOPY` completion notifications.
//!
//! With Linux `MSG_ZEROCOPY`, every `sendmsg` call that sends data gets the
//! next notification id of its socket: a wrapping `u32` counter starting at
//! 0. The kernel later reports completions on the socket's error queue as
//! inclusive, wrapping ranges `[lo, hi]`, possibly coalesced across many
//! calls and in any order. Memory handed to such calls must stay alive
//! until every one of its ids has completed.
//!
//! [`ZcTracker`] keeps that state without performing any I/O:
//!
//! 1. before a payload goes out, note [`ZcTracker::next_id`];
//! 2. after every `MSG_ZEROCOPY` `sendmsg` that sent data (returned more
//!    than 0 bytes), call [`ZcTracker::issue`] — before reading the error
//!    queue again;
//! 3. hand the payload to [`ZcTracker::hold`] with the [`ZcIds`] it used;
//! 4. feed every completion read from the error queue to
//!    [`ZcTracker::complete`], and drop or recycle what
//!    [`ZcTracker::take_released`] returns.
//!
//! Completions may arrive before the payload is held (step 4 may run
//! between 2 and 3); they count.
//!
//! # Limits
//!
//! Internally ids are mapped to 64-bit sequence numbers relative to the
//! oldest id not yet known complete. This is unambiguous while fewer than
//! 2<sup>31</sup> issued ids are outstanding; [`ZcTracker::issue`] panics
//! beyond that (a socket cannot get there: the kernel limits the memory
//! pinned by pending zero-copy sends long before). A completion naming ids
//! that were never issued, or that already completed, is clipped to the
//! issued, outstanding ids, so it can never release anything early.
//!
//! Memory is bounded by outstanding work: one entry per held item and one
//! per gap-separated run of out-of-order completed ids, never one per id.

use std::collections::BTreeMap;

/// The most issued ids that may be outstanding at once.
const MAX_OUTSTANDING: u64 = 1 << 31;

/// A range of notification ids issued to one payload: `first`, `first + 1`,
/// ... (`count` ids, wrapping past `u32::MAX` to 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZcIds {
    /// The id of the payload's first `MSG_ZEROCOPY` call.
    pub first: u32,
    /// How many calls (ids) the payload took; 0 if none sent data.
    pub count: u32,
}

/// A held item waiting for its ids.
#[derive(Debug)]
struct Held<T> {
    /// Sequence number of its first id.
    start: u64,
    item: T,
    bytes: usize,
}

/// Keeps items (payloads) sent with `MSG_ZEROCOPY` until the kernel has
/// completed every notification id they were sent with, then releases each
/// exactly once. See the [module documentation](self) for the protocol.
///
/// Dropping the tracker drops the items it still holds; a caller whose
/// items may still be read by the kernel must decide what to do with them
/// first (e.g. [`drain_all`](Self::drain_all) and leak them).
#[derive(Debug)]
pub struct ZcTracker<T> {
    /// The id of sequence number 0.
    origin: u32,
    /// Sequence number of the oldest id not known complete.
    base: u64,
    /// Sequence number of the next id to issue.
    next: u64,
    /// Completed runs beyond `base`: start -> end (exclusive) sequence
    /// numbers. Disjoint, never touching, every start > `base`, every end
    /// <= `next`.
    done: BTreeMap<u64, u64>,
    /// How many ids `done` covers.
    done_len: u64,
    /// Items waiting for completions, keyed by (end sequence number
    /// (exclusive), serial).
    pending: BTreeMap<(u64, u64), Held<T>>,
    /// Tie-breaker of `pending` keys.
    serial: u64,
    /// Items whose ids have all completed, not yet taken.
    ready: Vec<T>,
    /// Bytes of `ready`.
    ready_bytes: usize,
    /// Bytes of `pending` and `ready`.
    held_bytes: usize,
}

impl<T> Default for ZcTracker<T> {
    /// A tracker for a new socket: its first id is 0.
    fn default() -> Self {
        Self::new(0)
    }
}

impl<T> ZcTracker<T> {
    /// A tracker whose first id will be `first_id` (0 for a new socket).
    pub fn new(first_id: u32) -> Self {
        ZcTracker {
            origin: first_id,
            base: 0,
            next: 0,
            done: BTreeMap::new(),
            done_len: 0,
            pending: BTreeMap::new(),
            serial: 0,
            ready: Vec::new(),
            ready_bytes: 0,
            held_bytes: 0,
        }
    }

    /// The id of sequence number `seq`.
    fn id_of(&self, seq: u64) -> u32 {
        // Truncation intended: ids wrap every 2^32 sequence numbers.
        self.origin.wrapping_add(seq as u32)
    }

    /// The id the kernel will give the next `MSG_ZEROCOPY` call that sends
    /// data.
    pub fn next_id(&self) -> u32 {
        self.id_of(self.next)
    }

    /// Records that one `MSG_ZEROCOPY` `sendmsg` sent data; returns its id.
    ///
    /// # Panics
    /// If 2<sup>31</sup> issued ids are already outstanding (see the
    /// [module documentation](self)).
    pub fn issue(&mut self) -> u32 {
        assert!(
            self.next - self.base < MAX_OUTSTANDING,
            "ZcTracker: 2^31 MSG_ZEROCOPY ids outstanding"
        );
        let id = self.next_id();
        self.next += 1;
        id
    }

    /// Keeps `item` (of `bytes` bytes) until every id in `ids` has
    /// completed; then the next [`take_released`](Self::take_released)
    /// returns it. Completions for these ids that arrived before `hold`
    /// count, so an item whose ids have all completed already (or with
    /// `ids.count == 0`) is returned by the next `take_released`.
    ///
    /// `ids` must have been issued (and are taken to be the most recently
    /// issued ids with these numbers).
    ///
    /// # Panics
    /// If `ids.count > 0` and some id in `ids` was not issued by this
    /// tracker.
    pub fn hold(&mut self, ids: ZcIds, item: T, bytes: usize) {
        self.held_bytes += bytes;
        if ids.count == 0 {
            self.push_ready(item, bytes);
            return;
        }
        // How far back from the next id the first one is.
        let back = u64::from(self.next_id().wrapping_sub(ids.first));
        assert!(
            u64::from(ids.count) <= back && back <= self.next,
            "ZcTracker::hold: {ids:?} not all issued (next id {})",
            self.next_id()
        );
        let start = self.next - back;
        let end = start + u64::from(ids.count);
        if self.is_done(start, end) {
            self.push_ready(item, bytes);
        } else {
            self.pending
                .insert((end, self.serial), Held { start, item, bytes });
            self.serial += 1;
        }
    }

    /// Whether sequence numbers `start..end` have all completed.
    fn is_done(&self, start: u64, end: u64) -> bool {
        end <= self.base
            || self
                .done
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| e >= end)
    }

    fn push_ready(&mut self, item: T, bytes: usize) {
        self.ready.push(item);
        self.ready_bytes += bytes;
    }

    /// Applies a kernel completion of ids `lo..=hi` (wrapping: `lo > hi`
    /// when the range crosses `u32::MAX`). Ids not issued or already
    /// completed are ignored, so duplicates and bogus ranges are harmless.
    ///
    /// Costs O(log n) in the number of out-of-order runs plus O(log m) per
    /// item it releases; completing the oldest ids in order is the cheap
    /// case.
    pub fn complete(&mut self, lo: u32, hi: u32) {
        let n = self.next - self.base;
        if n == 0 {
            return;
        }
        let base_id = self.id_of(self.base);
        let lo_off = u64::from(lo.wrapping_sub(base_id));
        let hi_off = u64::from(hi.wrapping_sub(base_id));
        // Sequence-number ranges (exclusive ends), clipped to outstanding ids.
        let clip = |a: u64, b: u64| (self.base + a.min(n), self.base + b.min(n));
        let (first, second) = if lo_off <= hi_off {
            (clip(lo_off, hi_off + 1), (0, 0))
        } else {
            // Wraps in offset space: the tail [lo_off, 2^32) and the head
            // [0, hi_off]. Offsets >= n are not outstanding.
            (clip(lo_off, n), clip(0, hi_off + 1))
        };
        self.mark(first.0, first.1);
        self.mark(second.0, second.1);
    }

    /// Marks sequence numbers `a..b` complete (those below `base` already
    /// are) and releases the items this completes.
    fn mark(&mut self, a: u64, b: u64) {
        let a = a.max(self.base);
        if a >= b {
            return;
        }
        let (mut s, mut e) = (a, b);
        if let Some((&ps, &pe)) = self.done.range(..=a).next_back() {
            if pe >= b {
                return; // Already complete.
            }
            if pe >= a {
                s = ps;
                self.done.remove(&ps);
                self.done_len -= pe - ps;
            }
        }
        while let Some((&ns, &ne)) = self.done.range(s..).next() {
            if ns > e {
                break;
            }
            e = e.max(ne);
            self.done.remove(&ns);
            self.done_len -= ne - ns;
        }
        if s == self.base {
            // Runs never start at `base`, so this run begins at `a`: the
            // oldest outstanding ids completed, and `base` moves past every
            // run touching them (merged above).
            self.base = e;
            while let Some(entry) = self.pending.first_entry() {
                if entry.key().0 > self.base {
                    break;
                }
                let h = entry.remove();
                self.push_ready(h.item, h.bytes);
            }
        } else {
            self.done.insert(s, e);
            self.done_len += e - s;
            // An item completed now lies wholly in s..e, so it ends in
            // (s, e]. Items that end there but start before `s` stay.
            let mut from = (s + 1, 0);
            loop {
                let found = self
                    .pending
                    .range(from..=(e, u64::MAX))
                    .find(|(_, h)| h.start >= s)
                    .map(|(&k, _)| k);
                let Some(k) = found else { break };
                if let Some(h) = self.pending.remove(&k) {
                    self.push_ready(h.item, h.bytes);
                }
                from = k;
            }
        }
    }

    /// Removes and returns every held item whose ids have all completed,
    /// wherever it is in the queue, in the order they completed.
    pub fn take_released(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        self.take_released_into(&mut out);
        out
    }

    /// Like [`take_released`](Self::take_released), but appends to `out`
    /// (which lets a caller reuse one buffer).
    pub fn take_released_into(&mut self, out: &mut Vec<T>) {
        self.held_bytes -= self.ready_bytes;
        self.ready_bytes = 0;
        if out.is_empty() {
            std::mem::swap(out, &mut self.ready);
        } else {
            out.append(&mut self.ready);
        }
    }

    /// How many items are held, including released ones not yet taken.
    pub fn held_items(&self) -> usize {
        self.pending.len() + self.ready.len()
    }

    /// The bytes of the items held, including released ones not yet taken.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// How many issued ids have not completed.
    pub fn outstanding_ids(&self) -> u64 {
        self.next - self.base - self.done_len
    }

    /// Whether nothing is held and no issued id is outstanding.
    pub fn is_idle(&self) -> bool {
        self.held_items() == 0 && self.outstanding_ids() == 0
    }

    /// Takes every held item regardless of completion, and counts every
    /// issued id as completed (later completions for them are ignored).
    ///
    /// Only for when the kernel no longer references the items, e.g. after
    /// the socket was aborted and closed. Afterwards the tracker is idle;
    /// ids issued later continue the same numbering.
    pub fn drain_all(&mut self) -> Vec<T> {
        let mut out = std::mem::take(&mut self.ready);
        out.extend(
            std::mem::take(&mut self.pending)
                .into_values()
                .map(|h| h.item),
        );
        self.ready_bytes = 0;
        self.held_bytes = 0;
        self.base = self.next;
        self.done.clear();
        self.done_len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issues `count` ids and returns them as a `ZcIds`.
    fn issue(t: &mut ZcTracker<u32>, count: u32) -> ZcIds {
        let first = t.next_id();
        for i in 0..count {
            assert_eq!(t.issue(), first.wrapping_add(i));
        }
        ZcIds { first, count }
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn in_order() {
        let mut t = ZcTracker::new(0);
        let a = issue(&mut t, 2);
        t.hold(a, 1, 100);
        let b = issue(&mut t, 1);
        t.hold(b, 2, 10);
        assert_eq!(t.held_bytes(), 110);
        assert_eq!(t.outstanding_ids(), 3);
        t.complete(0, 0);
        assert!(t.take_released().is_empty());
        t.complete(1, 1);
        assert_eq!(t.take_released(), vec![1]);
        assert_eq!(t.held_bytes(), 10);
        t.complete(2, 2);
        assert_eq!(t.take_released(), vec![2]);
        assert!(t.is_idle());
        assert_eq!(t.held_bytes(), 0);
    }

    #[test]
    fn out_of_order() {
        let mut t = ZcTracker::new(0);
        let a = issue(&mut t, 2);
        t.hold(a, 1, 1);
        let b = issue(&mut t, 2);
        t.hold(b, 2, 1);
        let c = issue(&mut t, 1);
        t.hold(c, 3, 1);
        t.complete(4, 4);
        assert_eq!(t.take_released(), vec![3]);
        t.complete(3, 3);
        assert!(t.take_released().is_empty());
        t.complete(2, 2);
        assert_eq!(t.take_released(), vec![2]);
        assert_eq!(t.outstanding_ids(), 2);
        t.complete(1, 1);
        assert!(t.take_released().is_empty());
        assert_eq!(t.outstanding_ids(), 1);
        t.complete(0, 0);
        assert_eq!(t.take_released(), vec![1]);
        assert!(t.is_idle());
    }

    #[test]
    fn coalesced_across_items() {
        let mut t = ZcTracker::new(10);
        let a = issue(&mut t, 3);
        t.hold(a, 1, 1);
        let b = issue(&mut t, 3);
        t.hold(b, 2, 1);
        let c = issue(&mut t, 3);
        t.hold(c, 3, 1);
        // Completes the tail of `a`, all of `b` and the head of `c`.
        t.complete(12, 16);
        assert_eq!(t.take_released(), vec![2]);
        t.complete(10, 11);
        assert_eq!(t.take_released(), vec![1]);
        t.complete(17, 18);
        assert_eq!(t.take_released(), vec![3]);
        assert!(t.is_idle());
    }

    #[test]
    fn completion_before_hold() {
        let mut t = ZcTracker::new(0);
        let a = issue(&mut t, 2);
        t.complete(0, 1);
        assert_eq!(t.outstanding_ids(), 0);
        t.hold(a, 1, 5);
        assert_eq!(t.held_items(), 1);
        assert_eq!(t.take_released(), vec![1]);
        // Out of order, before hold: the item's ids sit in a run.
        let b = issue(&mut t, 1);
        let c = issue(&mut t, 2);
        t.complete(3, 4);
        t.hold(c, 3, 1);
        t.hold(b, 2, 1);
        assert_eq!(t.take_released(), vec![3]);
        t.complete(2, 2);
        assert_eq!(t.take_released(), vec![2]);
        assert!(t.is_idle());
    }

    #[test]
    fn partly_completed_before_hold() {
        let mut t = ZcTracker::new(0);
        let a = issue(&mut t, 3);
        t.complete(0, 0);
        t.complete(2, 2);
        t.hold(a, 1, 1);
        assert!(t.take_released().is_empty());
        t.complete(1, 1);
        assert_eq!(t.take_released(), vec![1]);
        assert!(t.is_idle());
    }

    #[test]
    fn empty_ids_released_at_once() {
        let mut t = ZcTracker::new(7);
        t.hold(
            ZcIds {
                first: 123,
                count: 0,
            },
            1,
            9,
        );
        assert_eq!(t.held_items(), 1);
        assert_eq!(t.held_bytes(), 9);
        assert_eq!(t.take_released(), vec![1]);
        assert!(t.is_idle());
    }

    #[test]
    fn wraps_across_u32_max() {
        let mut t = ZcTracker::new(u32::MAX - 1);
        let a = issue(&mut t, 4); // MAX-1, MAX, 0, 1
        assert_eq!(a.first, u32::MAX - 1);
        t.hold(a, 1, 1);
        let b = issue(&mut t, 1); // 2
        t.hold(b, 2, 1);
        assert_eq!(t.next_id(), 3);
        t.complete(2, 2);
        assert_eq!(t.take_released(), vec![2]);
        t.complete(0, 1);
        assert!(t.take_released().is_empty());
        t.complete(u32::MAX - 1, u32::MAX);
        assert_eq!(t.take_released(), vec![1]);
        assert!(t.is_idle());

        // One wrapping range covering everything.
        let mut t = ZcTracker::new(u32::MAX - 2);
        let a = issue(&mut t, 2);
        t.hold(a, 1, 1);
        let b = issue(&mut t, 3);
        t.hold(b, 2, 1);
        t.complete(u32::MAX - 2, 1);
        assert_eq!(sorted(t.take_released()), vec![1, 2]);
        assert!(t.is_idle());
    }

    #[test]
    fn never_issued_ids_ignored() {
        let mut t = ZcTracker::new(100);
        let a = issue(&mut t, 2); // 100, 101
        t.hold(a, 1, 1);
        t.complete(102, 200); // Future ids.
        t.complete(0, 99); // Before the first id.
        t.complete(101, 101);
        assert!(t.take_released().is_empty());
        assert_eq!(t.outstanding_ids(), 1);
        // A range that spills over both ends completes only issued ids.
        t.complete(50, 150);
        assert_eq!(t.take_released(), vec![1]);
        assert!(t.is_idle());
        // Those future ids must still count as outstanding once issued.
        let b = issue(&mut t, 1);
        t.hold(b, 2, 1);
        assert_eq!(t.outstanding_ids(), 1);
        assert!(t.take_released().is_empty());
        t.complete(102, 102);
        assert_eq!(t.take_released(), vec![2]);
        // A wrapping range whose tail is stale and head is in the future.
        let c = issue(&mut t, 1); // 103
        t.hold(c, 3, 1);
        t.complete(u32::MAX - 5, 99);
        assert!(t.take_released().is_empty());
        // 104..=MAX, 0..=102: everything but 103.
        t.complete(104, 102);
        assert!(t.take_released().is_empty());
        // 104..=MAX, 0..=103.
        t.complete(104, 103);
        assert_eq!(t.take_released(), vec![3]);
        // Nothing issued at all.
        let mut t: ZcTracker<u32> = ZcTracker::new(0);
        t.complete(0, u32::MAX);
        assert!(t.is_idle());
        assert_eq!(t.next_id(), 0);
    }

    #[test]
    fn duplicate_completions() {
        let mut t = ZcTracker::new(0);
        let a = issue(&mut t, 2);
        t.hold(a, 1, 1);
        let b = issue(&mut t, 2);
        t.hold(b, 2, 1);
        t.complete(3, 3);
        t.complete(3, 3);
        t.complete(0, 0);
        t.complete(0, 0);
        assert_eq!(t.outstanding_ids(), 2);
        assert!(t.take_released().is_empty());
        t.complete(1, 1);
        t.complete(0, 1);
        assert_eq!(t.take_released(), vec![1]);
        t.complete(2, 3);
        t.complete(2, 3);
        assert_eq!(t.take_released(), vec![2]);
        assert!(t.is_idle());
        assert!(t.take_released().is_empty());
    }

    #[test]
    fn merges_runs() {
        let mut t = ZcTracker::new(0);
        let a = issue(&mut t, 10);
        t.hold(a, 1, 1);
        for id in [2, 4, 6, 8] {
            t.complete(id, id);
        }
        assert_eq!(t.done.len(), 4);
        t.complete(3, 7);
        assert_eq!(t.done.len(), 1);
        assert_eq!(t.outstanding_ids(), 10 - 7);
        t.complete(9, 9);
        t.complete(1, 1);
        assert_eq!(t.outstanding_ids(), 1);
        assert!(t.take_released().is_empty());
        t.complete(0, 0);
        assert!(t.done.is_empty());
        assert_eq!(t.take_released(), vec![1]);
        assert!(t.is_idle());
    }

    #[test]
    fn drain_all_takes_everything() {
        let mut t = ZcTracker::new(0);
        let a = issue(&mut t, 2);
        t.hold(a, 1, 3);
        let b = issue(&mut t, 1);
        t.hold(b, 2, 4);
        t.complete(2, 2);
        assert_eq!(sorted(t.drain_all()), vec![1, 2]);
        assert_eq!(t.held_bytes(), 0);
        assert!(t.is_idle());
        t.complete(0, 1);
        assert!(t.is_idle());
        let c = issue(&mut t, 1);
        assert_eq!(c.first, 3);
        t.hold(c, 3, 1);
        t.complete(3, 3);
        assert_eq!(t.take_released(), vec![3]);
    }

    #[test]
    fn take_released_into_appends() {
        let mut t = ZcTracker::new(0);
        let a = issue(&mut t, 1);
        t.hold(a, 1, 1);
        t.complete(0, 0);
        let mut out = vec![9];
        t.take_released_into(&mut out);
        assert_eq!(out, vec![9, 1]);
        assert_eq!(t.held_bytes(), 0);
    }

    #[test]
    #[should_panic(expected = "not all issued")]
    fn hold_of_unissued_ids_panics() {
        let mut t = ZcTracker::new(0);
        let _ = issue(&mut t, 1);
        t.hold(ZcIds { first: 0, count: 2 }, 1, 1);
    }
}
