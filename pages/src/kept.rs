//! Socket mappings a connection keeps for its next payloads.
//!
//! A zero-copy receiver maps each payload's pages into a mapping of the
//! socket. Making that mapping (`mmap`) and removing it (`munmap`, which
//! also frees the VMA and its page tables) costs a pair of system calls per
//! payload on top of the page-table work itself. A [`KeptMappings`] lets the
//! receiver lend a mapping to the payload's [`Pages`](crate::Pages) and take
//! it back when the consumer drops them: the pages are dropped
//! (`MADV_DONTNEED`, the same zap and TLB flush `munmap` does) but the
//! mapping stays, ready for the next payload of the same layout.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::sys;

/// Mappings larger than this (16 MiB) are never kept: a kept mapping
/// keeps its page tables (2 KiB per MiB), and for payloads this large the
/// `mmap`/`munmap` pair is a small part of their cost.
pub const KEPT_MAX_LEN: usize = 16 << 20;

/// The socket mappings one connection keeps for reuse (see the module
/// documentation). Made by the receiver, shared with every [`Pages`]
/// lent one of its mappings, and [closed](KeptMappings::close) when the
/// connection ends.
///
/// # Memory cost
/// At most `max` mappings of at most [`KEPT_MAX_LEN`] are kept. A kept
/// mapping holds no pages (they were dropped when its last payload was),
/// only its address range, one VMA of the process's `vm.max_map_count`,
/// its page tables (about 2 KiB per MiB mapped, so at most 32 KiB) and a
/// reference to the socket's file, which is why a closed connection's
/// mappings are unmapped at once.
///
/// [`Pages`]: crate::Pages
#[derive(Debug)]
pub struct KeptMappings {
    max: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    free: Vec<Kept>,
    closed: bool,
    reused: u64,
}

#[derive(Clone, Copy, Debug)]
struct Kept {
    addr: usize,
    map_len: usize,
    layout: usize,
}

impl KeptMappings {
    /// A home for at most `max` mappings at a time.
    pub fn new(max: usize) -> Arc<KeptMappings> {
        Arc::new(KeptMappings {
            max,
            state: Mutex::new(State::default()),
        })
    }

    /// Takes a kept mapping of `map_len` bytes made with `layout` (a tag
    /// the caller chooses: how the mapping is laid out, say where its
    /// socket part ends). The caller owns it from now on: it lends it to
    /// [`Pages::from_kept_mapping`](crate::Pages::from_kept_mapping) or
    /// unmaps it. Its pages were dropped: reading them before mapping or
    /// writing something there is an error (a socket page faults).
    pub fn take(&self, map_len: usize, layout: usize) -> Option<NonNull<u8>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let i = s
            .free
            .iter()
            .rposition(|k| k.map_len == map_len && k.layout == layout)?;
        let k = s.free.swap_remove(i);
        s.reused += 1;
        NonNull::new(k.addr as *mut u8)
    }

    /// Unmaps every kept mapping; from now on mappings given back are
    /// unmapped too. A receiver calls it when its connection ends, so kept
    /// mappings do not hold the socket open.
    pub fn close(&self) {
        let free = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.closed = true;
            std::mem::take(&mut s.free)
        };
        for k in free {
            // SAFETY: taken out of the free list, which owned it alone;
            // nothing refers to a kept mapping.
            unsafe { sys::unmap(k.addr, k.map_len) };
        }
    }

    /// Mappings kept now.
    pub fn kept(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
            .len()
    }

    /// How many times [`take`](Self::take) handed out a kept mapping.
    pub fn reused(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).reused
    }

    /// Whether a mapping of `map_len` bytes given back now would be kept
    /// (open, room left, not over [`KEPT_MAX_LEN`]): if not, the caller
    /// unmaps it without dropping its pages first.
    pub(crate) fn takes_back(&self, map_len: usize) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::room(&s, self.max, map_len)
    }

    fn room(s: &State, max: usize, map_len: usize) -> bool {
        !s.closed && s.free.len() < max && map_len <= KEPT_MAX_LEN
    }

    /// Keeps a mapping whose pages were dropped; `false` if it is not kept
    /// (closed, `max` kept already, or too large): the caller unmaps it.
    pub(crate) fn put(&self, addr: usize, map_len: usize, layout: usize) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !Self::room(&s, self.max, map_len) {
            return false;
        }
        s.free.push(Kept {
            addr,
            map_len,
            layout,
        });
        true
    }
}

impl Drop for KeptMappings {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{is_mapped, resident_pages, Region};
    use crate::{Origin, Pages};

    const LEN: usize = 8 * pagerpc_core::PAGE_SIZE;

    /// Lends a fresh anonymous mapping filled with `byte` to a `Pages`.
    fn lend(home: &Arc<KeptMappings>, layout: usize, byte: u8) -> (Pages, usize) {
        let mut r = Region::anon(LEN).unwrap();
        r.slice_mut(LEN).fill(byte);
        let ptr = r.ptr();
        std::mem::forget(r);
        // SAFETY: the mapping was just made, is LEN bytes, readable, filled,
        // and owned by nothing else now (its Region was forgotten); private
        // anonymous memory reads as zeros once its pages are dropped.
        let pages =
            unsafe { Pages::from_kept_mapping(ptr, LEN, LEN, layout, home, Origin::Anonymous) };
        (pages, ptr.as_ptr() as usize)
    }

    #[test]
    fn a_dropped_payload_mapping_is_kept_without_its_pages_and_lent_again() {
        let home = KeptMappings::new(2);
        let (pages, addr) = lend(&home, 7, 0xab);
        let clone = pages.clone();
        drop(pages);
        assert_eq!(home.kept(), 0, "a clone still holds it");
        assert!(clone.iter().all(|&b| b == 0xab));
        drop(clone);
        assert_eq!(home.kept(), 1);
        assert!(is_mapped(addr), "kept, not unmapped");
        assert_eq!(resident_pages(addr, LEN), 0, "its pages were dropped");
        assert!(home.take(LEN, 8).is_none(), "another layout");
        assert!(home.take(2 * LEN, 7).is_none(), "another size");
        let again = home.take(LEN, 7).expect("kept under its layout");
        assert_eq!(again.as_ptr() as usize, addr);
        assert_eq!(home.kept(), 0);
        assert_eq!(home.reused(), 1);
        // SAFETY: taken from the home: ours, LEN bytes, readable.
        let back =
            unsafe { Pages::from_kept_mapping(again, LEN, LEN, 7, &home, Origin::Anonymous) };
        assert!(back.iter().all(|&b| b == 0), "nothing of the last payload");
        drop(back);
        assert_eq!(home.kept(), 1);
    }

    /// Regression: the release hook ran before the memory was released
    /// (`on_release` promises after), so a budget it fed could let more
    /// in while the old pages were still there.
    #[test]
    fn the_release_hook_runs_once_the_memory_is_released() {
        let home = KeptMappings::new(2);
        let (mut pages, _) = lend(&home, 1, 5);
        let h = Arc::clone(&home);
        let seen = Arc::new(Mutex::new(None));
        let s = Arc::clone(&seen);
        let attached = pages.on_release(Box::new(move |bytes| {
            *s.lock().unwrap() = Some((bytes, h.kept()));
        }));
        assert!(attached.is_ok(), "the only handle takes a hook");
        drop(pages);
        assert_eq!(
            *seen.lock().unwrap(),
            Some((LEN, 1)),
            "the hook saw the mapping given back already"
        );
    }

    // Unmapping is not checked by address here: another test's `mmap`
    // may take a freed range at once. `tests/kept_mappings.rs` counts
    // socket mappings in a process that runs one such test at a time.
    #[test]
    fn at_most_max_are_kept_and_closing_lets_go_of_them_all() {
        let home = KeptMappings::new(2);
        let lent: Vec<_> = (0..3).map(|i| lend(&home, 1, i)).collect();
        drop(lent);
        assert_eq!(home.kept(), 2, "the one over the bound was not kept");
        let (late, _) = lend(&home, 1, 9);
        home.close();
        assert_eq!(home.kept(), 0);
        assert!(home.take(LEN, 1).is_none());
        // A payload still held when its home closes stays readable, and
        // is not kept when dropped.
        assert!(late.iter().all(|&b| b == 9));
        drop(late);
        assert_eq!(home.kept(), 0);
    }
}
