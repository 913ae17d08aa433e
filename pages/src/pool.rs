//! Bookkeeping of the compacting pool ([`Pages::compact`](crate::Pages::compact)):
//! size classes and the slot map of one slab. Index arithmetic only; the
//! memory itself (the slabs' mappings) is handled in `sys`.

use pagerpc_core::PAGE_SIZE;

/// Bytes in one slab: one anonymous mapping that the slots of one size
/// class are carved from.
pub(crate) const SLAB_BYTES: usize = 2 << 20;

/// The largest payload the pool takes: 64 KiB.
pub const POOL_MAX: usize = 64 << 10;

/// The smallest slot: 16 bytes.
const MIN_SLOT: usize = 16;

/// Classes smaller than a page: 16, 32, ..., 2048 bytes.
const SUB_PAGE_CLASSES: usize = (PAGE_SIZE / 2 / MIN_SLOT).trailing_zeros() as usize + 1;

/// Number of size classes: the sub-page powers of two, then every whole
/// number of pages up to [`POOL_MAX`].
pub(crate) const CLASSES: usize = SUB_PAGE_CLASSES + POOL_MAX / PAGE_SIZE;

/// The slot size of `class`.
pub(crate) const fn class_size(class: usize) -> usize {
    if class < SUB_PAGE_CLASSES {
        MIN_SLOT << class
    } else {
        (class - SUB_PAGE_CLASSES + 1) * PAGE_SIZE
    }
}

/// The class whose slots hold `len` bytes with the least waste, or `None`
/// for 0 bytes and for more than [`POOL_MAX`].
///
/// A value of at most half a page gets the next power of two (at least 16
/// bytes), so it wastes less than half its slot; a larger one gets whole
/// pages, so it wastes less than a page and, starting on a page boundary,
/// stays page-aligned.
pub(crate) fn class_for(len: usize) -> Option<usize> {
    if len == 0 || len > POOL_MAX {
        return None;
    }
    if len <= PAGE_SIZE / 2 {
        let slot = len.max(MIN_SLOT).next_power_of_two();
        Some((slot / MIN_SLOT).trailing_zeros() as usize)
    } else {
        Some(SUB_PAGE_CLASSES + len.div_ceil(PAGE_SIZE) - 1)
    }
}

/// Slots of `class` in one slab.
pub(crate) const fn slots_per_slab(class: usize) -> usize {
    SLAB_BYTES / class_size(class)
}

/// Which slots of one slab are in use: a bitmap, a count, and a hint
/// where the first free slot may be.
#[derive(Debug)]
pub(crate) struct Slots {
    used: Vec<u64>,
    slots: usize,
    live: usize,
    /// No word before this one has a free bit.
    hint: usize,
}

impl Slots {
    /// `slots` free slots.
    pub(crate) fn new(slots: usize) -> Slots {
        Slots {
            used: vec![0; slots.div_ceil(64)],
            slots,
            live: 0,
            hint: 0,
        }
    }

    /// Takes the lowest free slot (low slots first, so that a slab's
    /// resident pages stay packed at its start).
    pub(crate) fn alloc(&mut self) -> Option<usize> {
        while self.hint < self.used.len() {
            let w = self.used[self.hint];
            if w != u64::MAX {
                let i = self.hint * 64 + (!w).trailing_zeros() as usize;
                if i >= self.slots {
                    return None;
                }
                self.used[self.hint] |= 1 << (i % 64);
                self.live += 1;
                return Some(i);
            }
            self.hint += 1;
        }
        None
    }

    /// Gives slot `i` back. Returns `false` (and changes nothing) if it
    /// was not in use.
    pub(crate) fn free(&mut self, i: usize) -> bool {
        if i >= self.slots || !self.is_used(i) {
            return false;
        }
        self.used[i / 64] &= !(1 << (i % 64));
        self.live -= 1;
        self.hint = self.hint.min(i / 64);
        true
    }

    /// Whether slot `i` is in use.
    pub(crate) fn is_used(&self, i: usize) -> bool {
        i < self.slots && self.used[i / 64] & (1 << (i % 64)) != 0
    }

    /// Whether every slot of `[first, first + count)` is free.
    pub(crate) fn all_free(&self, first: usize, count: usize) -> bool {
        (first..(first + count).min(self.slots)).all(|i| !self.is_used(i))
    }

    /// Slots in use.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Whether every slot is in use.
    pub(crate) fn is_full(&self) -> bool {
        self.live == self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classes_cover_every_size_tightly() {
        assert_eq!(class_size(0), 16);
        assert_eq!(class_size(SUB_PAGE_CLASSES - 1), PAGE_SIZE / 2);
        assert_eq!(class_size(SUB_PAGE_CLASSES), PAGE_SIZE);
        assert_eq!(class_size(CLASSES - 1), POOL_MAX);
        assert_eq!(class_for(0), None);
        assert_eq!(class_for(POOL_MAX + 1), None);
        let mut last = 0;
        for len in 1..=POOL_MAX {
            let c = class_for(len).unwrap();
            let size = class_size(c);
            assert!(size >= len, "{len} in {size}");
            // The next smaller class would not hold it.
            assert!(
                c == 0 || class_size(c - 1) < len,
                "{len}: class {c} too big"
            );
            assert!(c >= last);
            last = c;
            if size >= PAGE_SIZE {
                assert_eq!(size % PAGE_SIZE, 0);
            } else {
                assert_eq!(PAGE_SIZE % size, 0, "sub-page slots tile a page");
            }
        }
        assert!(slots_per_slab(CLASSES - 1) >= 32);
    }

    proptest! {
        /// The bitmap agrees with a plain set of slot numbers.
        #[test]
        fn slots_match_a_model(slots in 1usize..300, ops in proptest::collection::vec(any::<(bool, u16)>(), 0..600)) {
            let mut s = Slots::new(slots);
            let mut model = std::collections::BTreeSet::new();
            for (take, n) in ops {
                if take {
                    let got = s.alloc();
                    let want = (0..slots).find(|i| !model.contains(i));
                    prop_assert_eq!(got, want);
                    if let Some(i) = got {
                        model.insert(i);
                    }
                } else {
                    let i = n as usize % (slots + 2);
                    prop_assert_eq!(s.free(i), model.remove(&i));
                }
                prop_assert_eq!(s.live(), model.len());
                prop_assert_eq!(s.is_full(), model.len() == slots);
                for i in 0..slots {
                    prop_assert_eq!(s.is_used(i), model.contains(&i));
                }
                let a = n as usize % slots;
                prop_assert_eq!(s.all_free(a, 7), (a..(a + 7).min(slots)).all(|i| !model.contains(&i)));
            }
        }
    }
}
