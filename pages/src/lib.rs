//! Page-aligned payload memory.
//!
//! - [`Pages`]: an owned, read-only, page-aligned byte region that a receiver
//!   hands to its consumer. It may be memory the kernel mapped straight from
//!   the socket (zero-copy receive) or memory a payload was copied into.
//!   Dropping the last handle unmaps it.
//! - [`PageBuf`]: a writable, page-aligned buffer a sender fills in place and
//!   sends without another copy.
//! - [`Payload`]: what a send takes ownership of, and hands back on failure.
//!
//! A consumer that keeps many small payloads (a key-value store, say)
//! should [`Pages::compact`] them: every zero-copy payload is a mapping of
//! its own, and a process has at most `vm.max_map_count` (65,530 by
//! default) mappings; compacted values share the slabs of one pool.
#![deny(unsafe_op_in_unsafe_fn)]

mod kept;
mod pool;
mod sys;

pub use kept::{KeptMappings, KEPT_MAX_LEN};
pub use pool::POOL_MAX;
/// The one wrapper of the thread CPU clock, shared with the receiver.
pub use sys::thread_cpu_ns;

use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use sys::Region;

/// Payloads up to this size live in one page of a process-wide pool of
/// 4 KiB pages (carved from 2 MiB mappings) instead of a mapping of their
/// own: for small payloads an `mmap`/`munmap` pair costs more than the
/// bytes. Larger payloads get anonymous mappings, recycled through a
/// bounded cache (see [`set_cache_limit`]).
///
/// # Memory cost
/// The pool grows to the largest number of small payloads alive at once
/// (4 KiB each) and keeps that memory for reuse.
pub const HEAP_MAX: usize = pagerpc_core::PAGE_SIZE;

/// Sets how many bytes of dropped anonymous payload mappings the process
/// keeps for reuse (default 64 MiB; 0 unmaps everything cached and turns
/// the cache off).
///
/// Reusing a mapping whose pages are already resident avoids a page fault
/// and a page zeroing for every 4 KiB of every received payload; that is
/// most of the copy backend's cost. Socket mappings are never cached:
/// dropping them always unmaps them.
///
/// # Memory cost
/// Up to `bytes` of resident memory stays mapped while no payload uses it.
pub fn set_cache_limit(bytes: usize) {
    sys::set_cache_limit(bytes);
}

/// Bytes currently held in the recycle cache.
pub fn cached_bytes() -> usize {
    sys::cached_bytes()
}

/// Where the bytes of a [`Pages`] live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// No bytes.
    Empty,
    /// A page of the process-wide small-payload pool (payloads of at most
    /// [`HEAP_MAX`] bytes), or page-aligned memory from the global
    /// allocator when no mapping could be made for the payload (the
    /// process at `vm.max_map_count`, say).
    Heap,
    /// An anonymous mapping the bytes were copied into.
    Anonymous,
    /// A mapping made on the socket: some or all pages were mapped from the
    /// receive queue without a copy. The mapping keeps the socket open until
    /// it is unmapped.
    Socket,
    /// A slot of the compacting pool (see [`Pages::compact`]), shared with
    /// other values' slots in one mapping. Slots of at most half a page
    /// are aligned to their size (a power of two, at least 16 bytes), not
    /// to a page.
    Pooled,
}

/// What the compacting pool behind [`Pages::compact`] holds (see
/// [`pool_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Slabs mapped: each one anonymous mapping of [`PoolStats::SLAB_BYTES`].
    pub slabs: usize,
    /// Compacted values alive.
    pub values: usize,
    /// Bytes of their slots (the sum of their [`Pages::footprint`]).
    pub slot_bytes: usize,
}

impl PoolStats {
    /// Bytes of one slab: 2 MiB.
    pub const SLAB_BYTES: usize = pool::SLAB_BYTES;

    /// Bytes of address space the slabs take (resident only where live
    /// values are).
    pub fn mapped_bytes(&self) -> usize {
        self.slabs * Self::SLAB_BYTES
    }
}

/// What the process-wide compacting pool holds now.
pub fn pool_stats() -> PoolStats {
    stats_of(&sys::POOL)
}

fn stats_of(pool: &sys::Pool) -> PoolStats {
    let c = pool.counts();
    PoolStats {
        slabs: c.slabs,
        values: c.values,
        slot_bytes: c.slot_bytes,
    }
}

/// An owned, read-only, page-aligned byte region.
///
/// Cloning is cheap and shares the region; it is unmapped (or freed) when
/// the last clone is dropped. A consumer may keep it as long as it likes:
/// it stays valid after the connection it came from closes.
///
/// Every `Pages` starts on a page boundary except a compacted one of at
/// most half a page ([`Origin::Pooled`]; see [`Pages::compact`]).
///
/// # Memory cost
/// [`footprint`](Pages::footprint) bytes: `len` rounded up to 4 KiB, or
/// for a compacted value its pool slot. A region mapped from a socket is
/// also one mapping of the process's `vm.max_map_count`, and holds that
/// socket's file open (a few KiB of kernel memory) until it is dropped,
/// even after the connection is closed.
#[derive(Clone)]
pub struct Pages {
    region: Option<Arc<Held>>,
    len: usize,
    origin: Origin,
}

/// A callback run once when the last handle to a [`Pages`] is dropped,
/// with the number of bytes the region occupied.
pub type ReleaseHook = Box<dyn FnOnce(usize) + Send + Sync>;

/// A callback run once when the last handle to a [`Pages`] is dropped,
/// with the CPU time in nanoseconds the dropping thread spent releasing
/// the memory (see [`Pages::time_release`]).
pub type ReleaseTimer = Box<dyn FnOnce(u64) + Send + Sync>;

/// A region plus an optional hook run when it is released (or earlier,
/// by [`Pages::detach_accounting`]), and an optional timer of its release.
/// `region` is `None` only while being dropped.
struct Held {
    region: Option<Region>,
    on_release: Mutex<Option<ReleaseHook>>,
    timer: Mutex<Option<ReleaseTimer>>,
}

impl Held {
    fn new(region: Region) -> Held {
        Held {
            region: Some(region),
            on_release: Mutex::new(None),
            timer: Mutex::new(None),
        }
    }

    fn capacity(&self) -> usize {
        self.region.as_ref().map_or(0, Region::capacity)
    }

    fn slice(&self, len: usize) -> &[u8] {
        self.region.as_ref().map_or(&[], |r| r.slice(len))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let capacity = self.capacity();
        let timer = self
            .timer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let start = timer.as_ref().and_then(|_| sys::thread_cpu_ns());
        // Unmaps, or returns the memory to its cache or pool.
        drop(self.region.take());
        // Only a timed release reads the clock again (a system call: the
        // thread CPU clock has no vDSO fast path).
        if let (Some(timer), Some(t0)) = (timer, start) {
            if let Some(t1) = sys::thread_cpu_ns() {
                timer(t1.saturating_sub(t0));
            }
        }
        // After the memory is released, as `on_release` promises: whoever
        // counts it (a server's held-bytes budget) lets more in only once
        // it is gone.
        let hook = self
            .on_release
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(hook) = hook {
            hook(capacity);
        }
    }
}

impl Pages {
    /// No bytes; allocates nothing.
    pub const fn empty() -> Pages {
        Pages {
            region: None,
            len: 0,
            origin: Origin::Empty,
        }
    }

    /// Copies `bytes` into fresh page-aligned memory.
    ///
    /// # Errors
    /// When the memory cannot be allocated or mapped.
    pub fn copy_from_slice(bytes: &[u8]) -> io::Result<Pages> {
        let mut buf = PageBuf::new(bytes.len())?;
        buf.copy_from_slice(bytes);
        Ok(buf.freeze())
    }

    /// Wraps an existing mapping of `map_len` bytes whose first `len` bytes
    /// are the payload. Used by receive backends that map socket pages.
    ///
    /// # Safety
    /// `ptr` must be the page-aligned start of a mapping of `map_len` bytes
    /// (a multiple of the page size, `len <= map_len`) that is readable in
    /// full and that nothing else owns, writes or unmaps: the returned value
    /// unmaps it when the last clone is dropped.
    pub unsafe fn from_mapping(
        ptr: NonNull<u8>,
        len: usize,
        map_len: usize,
        origin: Origin,
    ) -> Pages {
        assert!(len <= map_len, "len {len} > map_len {map_len}");
        // SAFETY: forwarded from this function's contract.
        let region = unsafe { Region::from_mapping(ptr, map_len) };
        Pages {
            region: Some(Arc::new(Held::new(region))),
            len,
            origin,
        }
    }

    /// As [`from_mapping`](Pages::from_mapping), for a mapping lent by
    /// `home`: when the last clone is dropped, the pages are dropped and the
    /// mapping goes back to `home` under `layout` (or is unmapped, if
    /// `home` is closed or full).
    ///
    /// # Safety
    /// As [`from_mapping`](Pages::from_mapping); and once given back the
    /// mapping may be lent again, so it must be one `home` may hold: a
    /// mapping whose pages read as whatever is mapped there next.
    pub unsafe fn from_kept_mapping(
        ptr: NonNull<u8>,
        len: usize,
        map_len: usize,
        layout: usize,
        home: &Arc<KeptMappings>,
        origin: Origin,
    ) -> Pages {
        assert!(len <= map_len, "len {len} > map_len {map_len}");
        // SAFETY: forwarded from this function's contract.
        let region = unsafe { Region::lent(ptr, map_len, layout, Arc::clone(home)) };
        Pages {
            region: Some(Arc::new(Held::new(region))),
            len,
            origin,
        }
    }

    /// Runs `hook` once the last handle to these pages is dropped (after the
    /// memory is released). Receivers use it to account for memory their
    /// consumers hold. Returns the hook back if these pages are not the
    /// only handle (or are empty), so the caller can release at once.
    ///
    /// # Errors
    /// The hook, when it could not be attached.
    pub fn on_release(&mut self, hook: ReleaseHook) -> Result<(), ReleaseHook> {
        match self.region.as_mut().and_then(Arc::get_mut) {
            Some(held) => {
                let slot = held.on_release.get_mut().unwrap_or_else(|e| e.into_inner());
                if slot.is_some() {
                    return Err(hook);
                }
                *slot = Some(hook);
                Ok(())
            }
            None => Err(hook),
        }
    }

    /// Declares that these pages are kept for good (a store that keeps
    /// received values, say): the release hook runs now instead of at the
    /// last drop, so whatever counted them against the connection they
    /// came from (the server's `max_held_bytes_per_conn`) stops counting
    /// them, and that connection is not held back by them. The memory stays
    /// valid until the last handle is dropped, as always; the keeper is
    /// responsible for bounding it. Does nothing without a hook.
    pub fn detach_accounting(&self) {
        let Some(held) = &self.region else { return };
        let hook = held
            .on_release
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(hook) = hook {
            hook(held.capacity());
        }
    }

    /// Measures the release of this memory: when the last handle is
    /// dropped, `report` gets the CPU time (`CLOCK_THREAD_CPUTIME_ID`, in
    /// nanoseconds) the dropping thread spent releasing it (unmapping it,
    /// with the page-table zap and TLB flush of pages mapped from a socket,
    /// or handing it back to a cache or pool). A receiver uses it to learn
    /// what a receive path costs after its consumer is done with the
    /// payload (`Backend::Auto`). Independent of
    /// [`on_release`](Self::on_release).
    ///
    /// # Errors
    /// The timer back, when these pages are not the only handle, are
    /// empty, or are timed already.
    pub fn time_release(&mut self, report: ReleaseTimer) -> Result<(), ReleaseTimer> {
        match self.region.as_mut().and_then(Arc::get_mut) {
            Some(held) => {
                let slot = held.timer.get_mut().unwrap_or_else(|e| e.into_inner());
                if slot.is_some() {
                    return Err(report);
                }
                *slot = Some(report);
                Ok(())
            }
            None => Err(report),
        }
    }

    /// Number of payload bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the bytes live.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// How many handles (clones, including this one) share the region.
    /// A sender holding a payload until the kernel is done with it shows up
    /// here.
    pub fn shares(&self) -> usize {
        self.region.as_ref().map_or(1, Arc::strong_count)
    }

    /// Bytes of memory this value keeps alive (shared with its clones):
    /// the region's size, `len` rounded up to whole pages, or the slot of
    /// a compacted value (see [`Pages::compact`]). 0 for empty pages.
    ///
    /// This is what a receiver's release hook is given, and what a keeper
    /// of many values should count: a 1-byte payload received on its own
    /// holds a whole page.
    pub fn footprint(&self) -> usize {
        self.region.as_ref().map_or(0, |r| r.capacity())
    }

    /// Makes these pages fit for keeping many of: a payload of at most
    /// `threshold` bytes (and at most [`POOL_MAX`]) is copied into a slot
    /// of the process-wide compacting pool, and the copy is returned;
    /// anything larger (or already compacted) is returned as it is. Either
    /// way the result is detached from receive accounting, as by
    /// [`detach_accounting`](Pages::detach_accounting).
    ///
    /// The pool carves its slots from slabs of 2 MiB, each one anonymous
    /// mapping shared by many values of one size class: powers of two
    /// from 16 bytes to half a page, then whole pages. So 100,000 values
    /// of 4 KiB take 196 mappings rather than 100,000, and a 1-byte value
    /// takes 16 bytes rather than a page. A compacted value holds no
    /// socket open.
    ///
    /// If the pool cannot grow (no memory, or the process is at
    /// `vm.max_map_count`), the pages are returned as they are: check
    /// [`origin`](Pages::origin) for [`Origin::Pooled`].
    ///
    /// # Memory cost
    /// The slot ([`footprint`](Pages::footprint)): less than twice `len`
    /// below half a page, `len` rounded up to whole pages above. Pages no
    /// live slot uses are given back to the kernel as slots are freed,
    /// and a slab is unmapped when its last value is dropped; a page with
    /// one live small slot on it stays resident (up to 4 KiB for a value
    /// whose footprint is 16 bytes, when its neighbours were dropped).
    pub fn compact(self, threshold: usize) -> Pages {
        self.compact_in(threshold, &sys::POOL)
    }

    fn compact_in(self, threshold: usize, pool: &'static sys::Pool) -> Pages {
        self.detach_accounting();
        if self.len == 0 {
            return Pages::empty();
        }
        if self.origin == Origin::Pooled || self.len > threshold.min(POOL_MAX) {
            return self;
        }
        match pool.alloc(self.len) {
            Ok(mut region) => {
                region.slice_mut(self.len).copy_from_slice(&self);
                Pages {
                    region: Some(Arc::new(Held::new(region))),
                    len: self.len,
                    origin: Origin::Pooled,
                }
            }
            Err(_) => self,
        }
    }
}

impl Default for Pages {
    fn default() -> Self {
        Pages::empty()
    }
}

impl Deref for Pages {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.region {
            Some(r) => r.slice(self.len),
            None => &[],
        }
    }
}

impl AsRef<[u8]> for Pages {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for Pages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pages")
            .field("len", &self.len)
            .field("origin", &self.origin)
            .finish()
    }
}

impl PartialEq for Pages {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// A writable, page-aligned buffer for an outgoing payload. Fill it in
/// place, then send it (as a [`Payload`]) or [`freeze`](PageBuf::freeze) it.
///
/// # Memory cost
/// `len` rounded up to 4 KiB, zero-filled on creation (anonymous mappings
/// become resident only as they are written).
pub struct PageBuf {
    region: Option<Region>,
    len: usize,
}

impl PageBuf {
    /// A zero-filled buffer of `len` bytes: a page of the small-payload
    /// pool up to [`HEAP_MAX`], an anonymous mapping above. When no mapping
    /// can be made (`ENOMEM`: out of memory, or the process is at
    /// `vm.max_map_count`), page-aligned memory from the global allocator.
    ///
    /// # Errors
    /// When the memory can be neither mapped nor allocated.
    pub fn new(len: usize) -> io::Result<PageBuf> {
        let region = match len {
            0 => None,
            n if n <= HEAP_MAX => Some(Region::small(n, true)?),
            n => Some(Region::anon_or_heap(n, true)?),
        };
        Ok(PageBuf { region, len })
    }

    /// A zero-filled buffer of `len` bytes in an anonymous mapping of its
    /// own, whatever its size (receive backends use this for payloads they
    /// place page by page).
    ///
    /// # Errors
    /// When the memory cannot be mapped.
    pub fn mapped(len: usize) -> io::Result<PageBuf> {
        let region = if len == 0 {
            None
        } else {
            Some(Region::anon(len)?)
        };
        Ok(PageBuf { region, len })
    }

    /// A buffer of `len` bytes for a receiver that will overwrite every
    /// byte before anyone reads it. Large buffers come from the recycle
    /// cache (see [`set_cache_limit`]), so their pages are already faulted
    /// in; the initial contents are unspecified (zeros or bytes of an
    /// earlier payload of this process). Falls back to the global
    /// allocator as [`PageBuf::new`] does.
    ///
    /// # Errors
    /// When the memory can be neither mapped nor allocated.
    pub fn for_overwrite(len: usize) -> io::Result<PageBuf> {
        let region = match len {
            0 => None,
            n if n <= HEAP_MAX => Some(Region::small(n, false)?),
            n => Some(Region::anon_or_heap(n, false)?),
        };
        Ok(PageBuf { region, len })
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer to `len` bytes (no effect if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Turns the buffer into read-only [`Pages`] without copying.
    pub fn freeze(self) -> Pages {
        let origin = match &self.region {
            None => Origin::Empty,
            Some(r) if r.is_mapped() => Origin::Anonymous,
            Some(_) => Origin::Heap,
        };
        Pages {
            region: self.region.map(|region| Arc::new(Held::new(region))),
            len: self.len,
            origin,
        }
    }
}

impl Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.region {
            Some(r) => r.slice(self.len),
            None => &[],
        }
    }
}

impl DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.region {
            Some(r) => r.slice_mut(self.len),
            None => &mut [],
        }
    }
}

impl fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBuf").field("len", &self.len).finish()
    }
}

/// An outgoing payload. A send takes ownership of it and keeps it alive until
/// the kernel is done with its memory; a failed send hands it back.
#[derive(Debug, Default)]
pub enum Payload {
    /// No payload.
    #[default]
    Empty,
    /// Received or frozen pages; sending them does not consume other clones.
    Pages(Pages),
    /// A page-aligned buffer the caller filled.
    Buf(PageBuf),
    /// Ordinary heap bytes. Not page-aligned, so they are always sent by
    /// copy.
    Vec(Vec<u8>),
}

impl Payload {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Empty => &[],
            Payload::Pages(p) => p,
            Payload::Buf(b) => b,
            Payload::Vec(v) => v,
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes start on a page boundary (so that, sent with
    /// `MSG_ZEROCOPY`, they land in page-aligned socket buffers).
    pub fn is_page_aligned(&self) -> bool {
        (self.as_slice().as_ptr() as usize).is_multiple_of(pagerpc_core::PAGE_SIZE)
    }
}

impl From<Pages> for Payload {
    fn from(p: Pages) -> Self {
        Payload::Pages(p)
    }
}

impl From<PageBuf> for Payload {
    fn from(b: PageBuf) -> Self {
        Payload::Buf(b)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Payload::Vec(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_alignment_and_freeze() {
        for len in [
            0,
            1,
            4095,
            4096,
            4097,
            HEAP_MAX,
            HEAP_MAX + 1,
            (1 << 20) + 13,
        ] {
            let mut b = PageBuf::new(len).unwrap();
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            for (i, x) in b.iter_mut().enumerate() {
                *x = (i % 251) as u8;
            }
            let p = b.freeze();
            assert_eq!(p.len(), len);
            if len > 0 {
                assert_eq!(p.as_ptr() as usize % 4096, 0, "len {len}");
            }
            assert!(p.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
            let expect = match len {
                0 => Origin::Empty,
                n if n <= HEAP_MAX => Origin::Heap,
                _ => Origin::Anonymous,
            };
            assert_eq!(p.origin(), expect);
            let q = p.clone();
            drop(p);
            assert_eq!(q.len(), len, "a clone outlives the original");
        }
    }

    #[test]
    fn release_hook_runs_once_after_the_last_handle() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let released = Arc::new(AtomicUsize::new(0));
        let mut p = Pages::copy_from_slice(&[1u8; 100_000]).unwrap();
        let r = released.clone();
        assert!(p
            .on_release(Box::new(move |n| {
                r.fetch_add(n, Ordering::SeqCst);
            }))
            .is_ok());
        let q = p.clone();
        drop(p);
        assert_eq!(released.load(Ordering::SeqCst), 0);
        drop(q);
        assert_eq!(released.load(Ordering::SeqCst), 102_400);
        // Detaching runs the hook at once, and only once.
        let seen = Arc::new(AtomicUsize::new(0));
        let mut d = Pages::copy_from_slice(&[2u8; 10]).unwrap();
        let s2 = seen.clone();
        d.on_release(Box::new(move |n| {
            s2.fetch_add(n, Ordering::SeqCst);
        }))
        .ok()
        .unwrap();
        d.detach_accounting();
        assert_eq!(seen.load(Ordering::SeqCst), 4096);
        assert_eq!(*d, [2u8; 10][..], "the memory stays valid");
        drop(d);
        assert_eq!(seen.load(Ordering::SeqCst), 4096);
        // A shared region refuses a hook.
        let mut a = Pages::copy_from_slice(&[1u8; 10]).unwrap();
        let _b = a.clone();
        assert!(a.on_release(Box::new(|_| {})).is_err());
    }

    #[test]
    fn release_timer_reports_once_beside_the_hook() {
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        let timed = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let hooked = Arc::new(AtomicUsize::new(0));
        // Large enough for a mapping of its own (unmapped or cached).
        let mut p = Pages::copy_from_slice(&vec![3u8; 32 << 20]).unwrap();
        let (t, c, h) = (timed.clone(), calls.clone(), hooked.clone());
        assert!(p
            .time_release(Box::new(move |ns| {
                t.fetch_add(ns, Ordering::SeqCst);
                c.fetch_add(1, Ordering::SeqCst);
            }))
            .is_ok());
        assert!(p.time_release(Box::new(|_| {})).is_err(), "timed already");
        assert!(p
            .on_release(Box::new(move |n| {
                h.fetch_add(n, Ordering::SeqCst);
            }))
            .is_ok());
        let q = p.clone();
        drop(p);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        drop(q);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(hooked.load(Ordering::SeqCst), 32 << 20);
        // Unmapping 32 MiB of resident pages takes some CPU time.
        assert!(timed.load(Ordering::SeqCst) > 0);
        // Shared or empty pages refuse a timer.
        let mut a = Pages::copy_from_slice(&[1u8; 10]).unwrap();
        let _b = a.clone();
        assert!(a.time_release(Box::new(|_| {})).is_err());
        assert!(Pages::empty().time_release(Box::new(|_| {})).is_err());
    }

    /// A pool of the test's own, so that tests running in parallel do not
    /// see each other's values in its counts.
    fn own_pool() -> &'static sys::Pool {
        Box::leak(Box::new(sys::Pool::new()))
    }

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The footprint a payload of `len` bytes has once compacted.
    fn slot_of(len: usize) -> usize {
        pool::class_size(pool::class_for(len).unwrap())
    }

    #[test]
    fn compact_copies_small_values_and_detaches_them() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let p = own_pool();
        let released = Arc::new(AtomicUsize::new(0));
        let want = bytes(1, 1);
        let mut v = Pages::copy_from_slice(&want).unwrap();
        assert_eq!(v.footprint(), 4096, "a 1-byte payload holds a page");
        let r = released.clone();
        v.on_release(Box::new(move |n| {
            r.fetch_add(n, Ordering::SeqCst);
        }))
        .ok()
        .unwrap();
        let keep_original = v.clone();
        let c = v.compact_in(4096, p);
        assert_eq!(
            released.load(Ordering::SeqCst),
            4096,
            "the receive accounting is released at once, though a clone lives"
        );
        drop(keep_original);
        assert_eq!(released.load(Ordering::SeqCst), 4096, "and only once");
        assert_eq!(c.origin(), Origin::Pooled);
        assert_eq!(c.footprint(), 16);
        assert_eq!(*c, want[..]);
        assert_eq!(
            stats_of(p),
            PoolStats {
                slabs: 1,
                values: 1,
                slot_bytes: 16
            }
        );
        // Compacting again changes nothing.
        let c2 = c.clone().compact_in(4096, p);
        assert_eq!(stats_of(p).values, 1);
        assert_eq!(c2.as_ptr(), c.as_ptr());
        drop((c, c2));
        assert_eq!(stats_of(p), PoolStats::default(), "the slab is unmapped");

        // Over the threshold, or over POOL_MAX: kept as is, but detached.
        let big = Pages::copy_from_slice(&bytes(5000, 2)).unwrap();
        let at = big.as_ptr();
        let same = big.compact_in(4096, p);
        assert_eq!((same.as_ptr(), same.origin()), (at, Origin::Anonymous));
        let huge = Pages::copy_from_slice(&bytes(POOL_MAX + 1, 3)).unwrap();
        assert_eq!(huge.compact_in(usize::MAX, p).origin(), Origin::Anonymous);
        assert!(Pages::empty().compact_in(4096, p).is_empty());
        assert_eq!(stats_of(p), PoolStats::default());
    }

    #[test]
    fn many_compacted_values_share_few_slabs() {
        let p = own_pool();
        let vals: Vec<Pages> = (0..3000u64)
            .map(|i| {
                Pages::copy_from_slice(&bytes(4096, i))
                    .unwrap()
                    .compact_in(4096, p)
            })
            .collect();
        let s = stats_of(p);
        assert_eq!(s.values, 3000);
        assert_eq!(s.slabs, 3000usize.div_ceil(512), "{s:?}");
        assert_eq!(s.slot_bytes, 3000 * 4096);
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(v.as_ptr() as usize % 4096, 0, "page slots stay aligned");
            assert!(**v == bytes(4096, i as u64)[..]);
        }
        drop(vals);
        assert_eq!(stats_of(p), PoolStats::default());
    }

    /// A freed slot's pages go back to the kernel while its slab stays
    /// mapped for the values still in it; the slab goes when they do.
    #[test]
    fn freed_slots_are_given_back_and_empty_slabs_unmapped() {
        let p = own_pool();
        // Page-sized slots: each freed one is discarded at once.
        let a = Pages::copy_from_slice(&bytes(8192, 1))
            .unwrap()
            .compact_in(POOL_MAX, p);
        let b = Pages::copy_from_slice(&bytes(8192, 2))
            .unwrap()
            .compact_in(POOL_MAX, p);
        let (a_at, b_at) = (a.as_ptr() as usize, b.as_ptr() as usize);
        assert_eq!(sys::resident_pages(a_at, 8192), 2);
        drop(a);
        assert_eq!(
            sys::resident_pages(a_at, 8192),
            0,
            "a's pages are given back"
        );
        assert_eq!(sys::resident_pages(b_at, 8192), 2);
        assert!(*b == bytes(8192, 2)[..]);
        drop(b);
        assert!(!sys::is_mapped(b_at), "the empty slab is unmapped");

        // Sub-page slots: a page goes back once all its slots are free.
        let small: Vec<Pages> = (0..300u64)
            .map(|i| {
                Pages::copy_from_slice(&bytes(20, i))
                    .unwrap()
                    .compact_in(64, p)
            })
            .collect();
        assert!(small.iter().all(|v| v.footprint() == 32));
        let first_page = small[0].as_ptr() as usize;
        assert_eq!(first_page % 4096, 0);
        let mut keep = Vec::new();
        for (i, v) in small.into_iter().enumerate() {
            // 128 slots of 32 bytes per page: keep one value on page 1 only.
            if i == 200 {
                keep.push(v);
            }
        }
        assert_eq!(sys::resident_pages(first_page, 4096), 0);
        assert_eq!(sys::resident_pages(first_page + 4096, 4096), 1);
        assert!(*keep[0] == bytes(20, 200)[..]);
        assert_eq!(stats_of(p).slabs, 1);
        drop(keep);
        assert_eq!(stats_of(p), PoolStats::default());
        assert!(!sys::is_mapped(first_page));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any mix of compacting and dropping: every live value keeps its
        /// bytes, its footprint is its slot, the pool's counts are the sum
        /// of the live values, and when the last value goes every slab is
        /// unmapped.
        #[test]
        fn compacted_values_keep_their_bytes_and_accounting(
            ops in proptest::collection::vec(
                (0usize..=POOL_MAX + 100, proptest::prelude::any::<u16>(), 0u8..4),
                1..120,
            ),
            threshold in proptest::prop_oneof![
                proptest::strategy::Just(POOL_MAX),
                0usize..=POOL_MAX + 1
            ],
        ) {
            use proptest::prelude::*;
            let p = own_pool();
            let mut live: Vec<(Pages, Vec<u8>, usize)> = Vec::new();
            for (step, (len, pick, op)) in ops.into_iter().enumerate() {
                // Mostly small sizes: most slabs should hold several values.
                let len = if op == 0 { len } else { len % 600 };
                if op == 3 && !live.is_empty() {
                    live.swap_remove(pick as usize % live.len());
                } else {
                    let want = bytes(len, step as u64);
                    let orig = Pages::copy_from_slice(&want).unwrap();
                    let orig_footprint = orig.footprint();
                    let c = orig.compact_in(threshold, p);
                    prop_assert_eq!(&*c, &want[..]);
                    if len > 0 && len <= threshold.min(POOL_MAX) {
                        prop_assert_eq!(c.origin(), Origin::Pooled);
                        prop_assert_eq!(c.footprint(), slot_of(len));
                        prop_assert_eq!(c.as_ptr() as usize % slot_of(len).min(4096), 0);
                    } else {
                        prop_assert!(c.origin() != Origin::Pooled);
                        prop_assert_eq!(c.footprint(), orig_footprint);
                    }
                    live.push((c, want, len));
                }
                for (v, want, _) in &live {
                    prop_assert_eq!(&**v, &want[..]);
                }
                let pooled: Vec<&Pages> =
                    live.iter().map(|l| &l.0).filter(|v| v.origin() == Origin::Pooled).collect();
                let s = stats_of(p);
                prop_assert_eq!(s.values, pooled.len());
                prop_assert_eq!(s.slot_bytes, pooled.iter().map(|v| v.footprint()).sum::<usize>());
                prop_assert!(s.slabs <= pooled.len());
            }
            drop(live);
            prop_assert_eq!(stats_of(p), PoolStats::default());
        }
    }

    /// The allocator fallback (used when no mapping can be made) gives
    /// page-aligned, zeroed, whole-page memory.
    #[test]
    fn heap_fallback_regions_are_page_aligned_and_zeroed() {
        let mut b = PageBuf {
            region: Some(sys::Region::heap(5000).unwrap()),
            len: 5000,
        };
        assert!(b.iter().all(|&x| x == 0));
        b.copy_from_slice(&bytes(5000, 9));
        let p = b.freeze();
        assert_eq!(p.origin(), Origin::Heap);
        assert_eq!(p.as_ptr() as usize % 4096, 0);
        assert_eq!(p.footprint(), 8192);
        assert!(*p == bytes(5000, 9)[..]);
    }

    #[test]
    fn pages_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pages>();
        check::<PageBuf>();
        check::<Payload>();
    }
}
