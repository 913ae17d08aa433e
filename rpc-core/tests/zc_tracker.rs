//! Property tests of `ZcTracker`: ids issued near `u32::MAX` (so they wrap),
//! grouped into items, completed by random coalesced ranges delivered in
//! random order, some duplicated, some before the item is held, mixed with
//! ranges of ids never issued.

use std::collections::HashSet;

use pagerpc_core::{ZcIds, ZcTracker};
use proptest::prelude::*;

/// A small deterministic generator (splitmix64) for the simulation's
/// choices; proptest picks its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

struct Item {
    ids: Vec<u32>,
    bytes: usize,
    held: bool,
    released: bool,
}

struct Sim {
    t: ZcTracker<usize>,
    rng: Rng,
    first_id: u32,
    issued: u64,
    /// Issued ids the kernel has reported complete.
    truth: HashSet<u32>,
    items: Vec<Item>,
    /// Completion ranges not yet delivered: (lo, hi, may be duplicated).
    queue: Vec<(u32, u32, bool)>,
    /// The range being coalesced.
    open: Option<(u32, u32)>,
    held_bytes: usize,
}

impl Sim {
    fn issue(&mut self) -> u32 {
        let expected = self.t.next_id();
        let id = self.t.issue();
        assert_eq!(id, expected);
        assert_eq!(id, self.first_id.wrapping_add(self.issued as u32));
        self.issued += 1;
        self.open = Some(match self.open {
            Some((lo, _)) => (lo, id),
            None => (id, id),
        });
        if self.rng.one_in(3) {
            self.close();
        }
        id
    }

    fn close(&mut self) {
        if let Some((lo, hi)) = self.open.take() {
            self.queue.push((lo, hi, true));
        }
    }

    /// Delivers up to `n` queued completions (and maybe bogus ranges).
    fn deliver(&mut self, n: u64) {
        for _ in 0..n {
            if self.rng.one_in(5) {
                self.deliver_bogus();
            }
            if self.queue.is_empty() {
                return;
            }
            let i = self.rng.below(self.queue.len() as u64) as usize;
            let (lo, hi, may_dup) = self.queue.swap_remove(i);
            if may_dup && self.rng.one_in(4) {
                self.queue.push((lo, hi, false));
            }
            self.t.complete(lo, hi);
            let mut id = lo;
            loop {
                self.truth.insert(id);
                if id == hi {
                    break;
                }
                id = id.wrapping_add(1);
            }
            self.check();
        }
    }

    /// A range of ids not issued (yet, or ever): must change nothing.
    fn deliver_bogus(&mut self) {
        let (lo, hi) = if self.rng.one_in(2) {
            let lo = self.t.next_id().wrapping_add(self.rng.below(3) as u32);
            (lo, lo.wrapping_add(self.rng.below(4) as u32))
        } else {
            let hi = self.first_id.wrapping_sub(1 + self.rng.below(3) as u32);
            (hi.wrapping_sub(self.rng.below(4) as u32), hi)
        };
        let before = (self.t.outstanding_ids(), self.t.held_items());
        self.t.complete(lo, hi);
        assert_eq!((self.t.outstanding_ids(), self.t.held_items()), before);
        self.check();
    }

    fn hold(&mut self, idx: usize, ids: ZcIds) {
        let bytes = self.items[idx].bytes;
        self.t.hold(ids, idx, bytes);
        self.items[idx].held = true;
        self.held_bytes += bytes;
        self.check();
    }

    /// Takes what was released and checks it against the truth.
    fn check(&mut self) {
        assert_eq!(self.t.held_bytes(), self.held_bytes);
        for idx in self.t.take_released() {
            let item = &mut self.items[idx];
            assert!(item.held, "item {idx} released before hold");
            assert!(!item.released, "item {idx} released twice");
            for id in &item.ids {
                assert!(self.truth.contains(id), "item {idx} released early: {id}");
            }
            item.released = true;
            self.held_bytes -= item.bytes;
        }
        // Every held item whose ids have all completed was released.
        let mut held = 0;
        for (idx, item) in self.items.iter().enumerate() {
            if item.held && !item.released {
                held += 1;
                assert!(
                    !item.ids.iter().all(|id| self.truth.contains(id)),
                    "item {idx} complete but not released"
                );
            }
        }
        assert_eq!(self.t.held_items(), held);
        assert_eq!(self.t.held_bytes(), self.held_bytes);
        assert_eq!(
            self.t.outstanding_ids(),
            self.issued - self.truth.len() as u64
        );
    }
}

fn run(k: u32, counts: &[u32], seed: u64) {
    let first_id = u32::MAX - k;
    let mut sim = Sim {
        t: ZcTracker::new(first_id),
        rng: Rng(seed),
        first_id,
        issued: 0,
        truth: HashSet::new(),
        items: Vec::new(),
        queue: Vec::new(),
        open: None,
        held_bytes: 0,
    };
    for (idx, &count) in counts.iter().enumerate() {
        let first = sim.t.next_id();
        let mut ids = Vec::new();
        for _ in 0..count {
            ids.push(sim.issue());
            let n = sim.rng.below(2);
            sim.deliver(n);
        }
        sim.items.push(Item {
            ids,
            bytes: 1 + idx * 7,
            held: false,
            released: false,
        });
        let n = sim.rng.below(3);
        sim.deliver(n);
        sim.hold(idx, ZcIds { first, count });
        let n = sim.rng.below(3);
        sim.deliver(n);
    }
    sim.close();
    sim.deliver(u64::MAX);
    sim.check();
    for (idx, item) in sim.items.iter().enumerate() {
        assert!(item.released, "item {idx} never released");
    }
    assert_eq!(sim.t.held_bytes(), 0);
    assert_eq!(sim.t.held_items(), 0);
    assert_eq!(sim.t.outstanding_ids(), 0);
    assert!(sim.t.is_idle());
}

proptest! {
    #[test]
    fn releases_each_item_once_after_all_its_ids(
        k in 0u32..8,
        counts in prop::collection::vec(0u32..5, 0..40),
        seed in any::<u64>(),
    ) {
        run(k, &counts, seed);
    }

    #[test]
    fn large_items(
        k in 0u32..64,
        counts in prop::collection::vec(0u32..60, 0..12),
        seed in any::<u64>(),
    ) {
        run(k, &counts, seed);
    }
}

/// `drain_all` hands back everything and leaves the tracker idle, whatever
/// completed before.
#[test]
fn drain_all_mid_flight() {
    let mut t = ZcTracker::new(u32::MAX);
    let mut all = Vec::new();
    for idx in 0..5usize {
        let first = t.next_id();
        for _ in 0..idx {
            t.issue();
        }
        t.hold(
            ZcIds {
                first,
                count: idx as u32,
            },
            idx,
            idx * 10,
        );
        all.push(idx);
    }
    t.complete(u32::MAX, 1);
    let mut got = t.take_released();
    got.extend(t.drain_all());
    got.sort_unstable();
    assert_eq!(got, all);
    assert_eq!(t.held_bytes(), 0);
    assert!(t.is_idle());
}
