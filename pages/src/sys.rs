//! Every system call and raw-memory operation of this crate, behind small
//! safe wrappers.

use std::alloc::Layout;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pagerpc_core::PAGE_SIZE;

use crate::kept::KeptMappings;
use crate::pool::{self, Slots, CLASSES, SLAB_BYTES};

/// An owned memory region that is unmapped or freed on drop.
#[derive(Debug)]
pub(crate) enum Region {
    /// A mapping made with `mmap` (anonymous, or of a socket), `map_len`
    /// bytes long, possibly made of several adjacent VMAs.
    Mapped {
        ptr: NonNull<u8>,
        map_len: usize,
        /// Whether the mapping is plain anonymous memory that may be reused
        /// for another payload once dropped (socket mappings never are).
        recyclable: bool,
    },
    /// One 4 KiB page from the process-wide small-page pool, for payloads
    /// of at most a page (an `mmap` plus `munmap` costs more than the
    /// bytes, and glibc's `memalign` fragments its heaps when such blocks
    /// are freed on another thread).
    Slab { ptr: NonNull<u8> },
    /// Page-aligned memory from the global allocator, `size` bytes (a page
    /// multiple): the fallback when no mapping can be made (the process is
    /// at `vm.max_map_count`, say) but the allocator still has room.
    Heap { ptr: NonNull<u8>, size: usize },
    /// A mapping lent by a connection's [`KeptMappings`]: on drop its
    /// pages are dropped and the mapping goes back to be lent again (or is
    /// unmapped if it is not taken back). `layout` is the tag it is kept
    /// under.
    Lent {
        ptr: NonNull<u8>,
        map_len: usize,
        layout: usize,
        home: Arc<KeptMappings>,
    },
    /// One slot of a slab of a compacting [`Pool`]: `class_size(class)`
    /// bytes shared with no one (other slots of the slab belong to other
    /// values).
    Pooled {
        ptr: NonNull<u8>,
        pool: &'static Pool,
        /// The slab's base address.
        slab: usize,
        class: u8,
    },
}

// SAFETY: a Region exclusively owns its memory; nothing else aliases it, so
// moving it to another thread is sound.
unsafe impl Send for Region {}
// SAFETY: shared access only ever reads (writes need &mut through PageBuf),
// so sharing between threads is sound.
unsafe impl Sync for Region {}

impl Region {
    /// An anonymous private mapping of at least `len` bytes, rounded up to
    /// whole pages, taken from the recycle cache if one of that size is
    /// there. Its contents are unspecified (zero, or an earlier payload of
    /// this process): callers overwrite every byte they expose.
    pub(crate) fn recycled(len: usize) -> io::Result<Region> {
        let map_len = pagerpc_core::page_round_up(len.max(1));
        if let Some(r) = cache_take(map_len) {
            return Ok(r);
        }
        Region::anon(len)
    }

    /// A zero-filled anonymous private mapping of at least `len` bytes
    /// (rounded up to whole pages). `len` must not be zero.
    pub(crate) fn anon(len: usize) -> io::Result<Region> {
        let map_len = pagerpc_core::page_round_up(len.max(1));
        // SAFETY: a fresh anonymous mapping with no address hint touches no
        // existing memory; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Region::Mapped {
            ptr,
            map_len,
            recyclable: true,
        })
    }

    /// As [`Region::anon`] (zeroed) or [`Region::recycled`] (not), falling
    /// back to page-aligned memory from the global allocator when no
    /// mapping can be made (`ENOMEM`: out of memory, or the process is at
    /// `vm.max_map_count`), which may still have room in memory it already
    /// mapped.
    pub(crate) fn anon_or_heap(len: usize, zero: bool) -> io::Result<Region> {
        let r = if zero {
            Region::anon(len)
        } else {
            Region::recycled(len)
        };
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => Region::heap(len).ok_or(e),
            r => r,
        }
    }

    /// `len` bytes rounded up to whole pages, page-aligned and zeroed,
    /// from the global allocator. `None` if the allocator has no room.
    pub(crate) fn heap(len: usize) -> Option<Region> {
        let size = pagerpc_core::page_round_up(len.max(1));
        let layout = Layout::from_size_align(size, PAGE_SIZE).ok()?;
        // SAFETY: the layout has a non-zero size; the result is checked.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Region::Heap { ptr, size })
    }

    /// One page from the small-page pool; its first `len` bytes are zeroed
    /// if `zero` (the rest is never exposed). `len <= PAGE_SIZE`. When the
    /// pool is empty and cannot grow by a mapping, the page comes from the
    /// global allocator instead.
    pub(crate) fn small(len: usize, zero: bool) -> io::Result<Region> {
        assert!(len <= PAGE_SIZE);
        let ptr = match slab_take() {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                return Region::heap(PAGE_SIZE).ok_or(e);
            }
            Err(e) => return Err(e),
        };
        if zero {
            // SAFETY: the page is ours (taken from the pool) and PAGE_SIZE
            // bytes long.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        }
        Ok(Region::Slab { ptr })
    }

    /// Takes ownership of an existing mapping.
    ///
    /// # Safety
    /// `ptr` must be the start of a mapping of `map_len` bytes (page
    /// multiple) that nothing else owns or unmaps, readable in full.
    pub(crate) unsafe fn from_mapping(ptr: NonNull<u8>, map_len: usize) -> Region {
        Region::Mapped {
            ptr,
            map_len,
            recyclable: false,
        }
    }

    /// Takes ownership of a mapping lent by `home`, kept there under
    /// `layout` when it comes back.
    ///
    /// # Safety
    /// As [`Region::from_mapping`]; and `home` may lend the mapping again
    /// once this region gives it back.
    pub(crate) unsafe fn lent(
        ptr: NonNull<u8>,
        map_len: usize,
        layout: usize,
        home: Arc<KeptMappings>,
    ) -> Region {
        Region::Lent {
            ptr,
            map_len,
            layout,
            home,
        }
    }

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        match self {
            Region::Lent { ptr, .. }
            | Region::Mapped { ptr, .. }
            | Region::Slab { ptr }
            | Region::Heap { ptr, .. }
            | Region::Pooled { ptr, .. } => *ptr,
        }
    }

    /// Usable bytes: the memory this region keeps alive.
    pub(crate) fn capacity(&self) -> usize {
        match self {
            Region::Mapped { map_len, .. } | Region::Lent { map_len, .. } => *map_len,
            Region::Slab { .. } => PAGE_SIZE,
            Region::Heap { size, .. } => *size,
            Region::Pooled { class, .. } => pool::class_size(usize::from(*class)),
        }
    }

    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self, Region::Mapped { .. } | Region::Lent { .. })
    }

    /// The first `len` bytes.
    pub(crate) fn slice(&self, len: usize) -> &[u8] {
        assert!(len <= self.capacity());
        // SAFETY: the region owns `capacity()` readable bytes (asserted above)
        // for as long as `self` lives, and only `&mut self` can write them.
        unsafe { std::slice::from_raw_parts(self.ptr().as_ptr(), len) }
    }

    /// The first `len` bytes, writable. Socket mappings are never handed out
    /// as `PageBuf`, so every region reached here is writable.
    pub(crate) fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity());
        // SAFETY: as in `slice`, and `&mut self` guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr().as_ptr(), len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        match *self {
            Region::Mapped {
                recyclable: true, ..
            } if cache_put(self) => {}
            // SAFETY: we own this mapping and nothing borrows it any more
            // (drop has &mut self).
            Region::Mapped { ptr, map_len, .. } => unsafe { unmap(ptr.as_ptr() as usize, map_len) },
            Region::Lent {
                ptr,
                map_len,
                layout,
                ref home,
            } => {
                let addr = ptr.as_ptr() as usize;
                if home.takes_back(map_len) {
                    // SAFETY: as above; its pages are dropped before `home`
                    // can lend it again, so they read as what the socket
                    // maps next.
                    unsafe { discard(addr, map_len) };
                    if home.put(addr, map_len, layout) {
                        return;
                    }
                }
                // SAFETY: as above, and `home` did not take it.
                unsafe { unmap(addr, map_len) };
            }
            Region::Slab { ptr } => slab_put(ptr),
            Region::Heap { ptr, size } => {
                // SAFETY: allocated in `Region::heap` with this very layout
                // (which was valid then, so it is now); nothing borrows it.
                unsafe {
                    std::alloc::dealloc(
                        ptr.as_ptr(),
                        Layout::from_size_align_unchecked(size, PAGE_SIZE),
                    )
                }
            }
            Region::Pooled {
                ptr,
                pool,
                slab,
                class,
            } => pool.free(slab, usize::from(class), ptr),
        }
    }
}

/// CPU time the calling thread has used, in nanoseconds
/// (`CLOCK_THREAD_CPUTIME_ID`: user and system time, not time asleep);
/// `None` if the clock cannot be read. A real system call: this clock has
/// no vDSO fast path.
pub fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that clock_gettime only
    // writes; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// Bytes of anonymous mappings kept for reuse, at most.
static CACHE_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_CACHE_LIMIT);
/// The default cache limit: 64 MiB.
pub(crate) const DEFAULT_CACHE_LIMIT: usize = 64 << 20;
/// Mappings larger than this are never cached.
const CACHE_MAX_REGION: usize = 16 << 20;

struct Cache {
    bytes: usize,
    by_len: HashMap<usize, Vec<(usize, usize)>>,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

pub(crate) fn set_cache_limit(bytes: usize) {
    CACHE_LIMIT.store(bytes, Ordering::Relaxed);
    if bytes == 0 {
        // Unmap whatever is cached.
        let drained: Vec<(usize, usize)> = {
            let mut g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
            match g.as_mut() {
                Some(c) => {
                    c.bytes = 0;
                    c.by_len.drain().flat_map(|(_, v)| v).collect()
                }
                None => Vec::new(),
            }
        };
        for (addr, len) in drained {
            // SAFETY: taken out of the cache, which owned it alone.
            unsafe { unmap(addr, len) };
        }
    }
}

pub(crate) fn cached_bytes() -> usize {
    let g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref().map_or(0, |c| c.bytes)
}

fn cache_take(map_len: usize) -> Option<Region> {
    let mut g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let c = g.as_mut()?;
    let (addr, len) = c.by_len.get_mut(&map_len)?.pop()?;
    c.bytes -= len;
    drop(g);
    let ptr = NonNull::new(addr as *mut u8)?;
    Some(Region::Mapped {
        ptr,
        map_len: len,
        recyclable: true,
    })
}

/// Puts a dropped anonymous mapping in the cache; `false` if it does not
/// fit (the caller unmaps it).
fn cache_put(r: &Region) -> bool {
    let Region::Mapped {
        ptr,
        map_len,
        recyclable: true,
    } = *r
    else {
        return false;
    };
    if map_len > CACHE_MAX_REGION {
        return false;
    }
    let limit = CACHE_LIMIT.load(Ordering::Relaxed);
    let mut g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let c = g.get_or_insert_with(|| Cache {
        bytes: 0,
        by_len: HashMap::new(),
    });
    if c.bytes + map_len > limit {
        return false;
    }
    c.bytes += map_len;
    c.by_len
        .entry(map_len)
        .or_default()
        .push((ptr.as_ptr() as usize, map_len));
    true
}

/// Unmaps `(addr, len)`.
///
/// # Safety
/// A whole mapping the caller owns alone (the recycle cache's or a
/// [`KeptMappings`]'s, already taken out of it, or a dropped region's)
/// that nothing refers to any more.
pub(crate) unsafe fn unmap(addr: usize, len: usize) {
    // SAFETY: forwarded from this function's contract; munmap only fails
    // for bad arguments.
    let rc = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    debug_assert_eq!(rc, 0, "munmap: {}", io::Error::last_os_error());
}

/// Free pages of the small-page pool, as addresses.
static SLAB: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// The pool grows by this much at a time (one mapping).
const SLAB_CHUNK: usize = 2 << 20;

fn slab_take() -> io::Result<NonNull<u8>> {
    let mut free = SLAB.lock().unwrap_or_else(|e| e.into_inner());
    if free.is_empty() {
        // SAFETY: a fresh anonymous mapping with no address hint touches no
        // existing memory; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SLAB_CHUNK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = p as usize;
        free.extend(
            (0..SLAB_CHUNK / PAGE_SIZE)
                .rev()
                .map(|i| base + i * PAGE_SIZE),
        );
    }
    let addr = free
        .pop()
        .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
    NonNull::new(addr as *mut u8).ok_or_else(|| io::Error::other("null slab page"))
}

fn slab_put(ptr: NonNull<u8>) {
    SLAB.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ptr.as_ptr() as usize);
}

/// A compacting pool: slabs of [`SLAB_BYTES`] (one anonymous mapping each),
/// each cut into slots of one size class, shared by many small values.
///
/// - A slot goes to the lowest-addressed slab of its class with room, so
///   live values stay packed and the highest slabs drain first.
/// - When a slot is freed, the pages only it used (a whole slot of a page
///   or more; a page all of whose sub-page slots are free) are given back
///   to the kernel (`MADV_DONTNEED`): resident memory follows live values.
/// - When the last slot of a slab is freed, the slab is unmapped.
#[derive(Debug)]
pub(crate) struct Pool {
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    /// Every slab by its base address.
    slabs: BTreeMap<usize, PoolSlab>,
    /// Per class: the slabs with a free slot.
    partial: [BTreeSet<usize>; CLASSES],
    /// Slots in use, and their bytes.
    values: usize,
    slot_bytes: usize,
}

#[derive(Debug)]
struct PoolSlab {
    class: usize,
    slots: Slots,
}

/// What a pool holds (see [`crate::PoolStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PoolCounts {
    pub(crate) slabs: usize,
    pub(crate) values: usize,
    pub(crate) slot_bytes: usize,
}

/// The process-wide pool [`crate::Pages::compact`] uses.
pub(crate) static POOL: Pool = Pool::new();

impl Pool {
    pub(crate) const fn new() -> Pool {
        Pool {
            state: Mutex::new(PoolState {
                slabs: BTreeMap::new(),
                partial: [const { BTreeSet::new() }; CLASSES],
                values: 0,
                slot_bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // Every update below keeps the state consistent at each step that
        // can panic (none do after a change), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `len` bytes (`1..=POOL_MAX`); its contents are
    /// unspecified (zeros, or bytes of an earlier value of this process)
    /// and the caller overwrites the `len` bytes it exposes.
    ///
    /// # Errors
    /// `InvalidInput` for a size the pool does not take; the `mmap` error
    /// when a new slab is needed and cannot be mapped.
    pub(crate) fn alloc(&'static self, len: usize) -> io::Result<Region> {
        let class = pool::class_for(len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the pool takes 1..={} bytes, not {len}", pool::POOL_MAX),
            )
        })?;
        let size = pool::class_size(class);
        let mut st = self.lock();
        let base = match st.partial[class].first() {
            Some(&b) => b,
            None => {
                let b = map_slab()?;
                st.slabs.insert(
                    b,
                    PoolSlab {
                        class,
                        slots: Slots::new(pool::slots_per_slab(class)),
                    },
                );
                st.partial[class].insert(b);
                b
            }
        };
        let Some(slab) = st.slabs.get_mut(&base) else {
            return Err(io::Error::other("pool: a partial slab is missing"));
        };
        let Some(i) = slab.slots.alloc() else {
            return Err(io::Error::other("pool: a partial slab is full"));
        };
        if slab.slots.is_full() {
            st.partial[class].remove(&base);
        }
        st.values += 1;
        st.slot_bytes += size;
        drop(st);
        let ptr = NonNull::new((base + i * size) as *mut u8)
            .ok_or_else(|| io::Error::other("pool: null slot"))?;
        Ok(Region::Pooled {
            ptr,
            pool: self,
            slab: base,
            class: class as u8,
        })
    }

    /// Gives back the slot at `ptr` of slab `base` (from [`Pool::alloc`]),
    /// whose region is being dropped.
    fn free(&self, base: usize, class: usize, ptr: NonNull<u8>) {
        let size = pool::class_size(class);
        let addr = ptr.as_ptr() as usize;
        let i = (addr - base) / size;
        let mut st = self.lock();
        let Some(slab) = st.slabs.get_mut(&base) else {
            debug_assert!(false, "pool: freeing into an unknown slab");
            return;
        };
        debug_assert_eq!(slab.class, class, "pool: slot of another class");
        let was_full = slab.slots.is_full();
        if !slab.slots.free(i) {
            debug_assert!(false, "pool: slot {i} freed twice");
            return;
        }
        // Give back the pages no live slot uses any more. The lock is held,
        // so no slot on them is handed out until this is done.
        if size >= PAGE_SIZE {
            // SAFETY: the freed slot's own pages, in a slab of this pool.
            unsafe { discard(addr, size) };
        } else {
            let per_page = PAGE_SIZE / size;
            let first = i / per_page * per_page;
            if slab.slots.all_free(first, per_page) {
                // SAFETY: a page of this pool's slab all of whose slots
                // are free (checked just above).
                unsafe { discard(base + first * size, PAGE_SIZE) };
            }
        }
        let empty = slab.slots.live() == 0;
        st.values -= 1;
        st.slot_bytes -= size;
        // SAFETY: only when no slot of the slab is in use.
        if empty && unsafe { unmap_slab(base) } {
            st.slabs.remove(&base);
            st.partial[class].remove(&base);
        } else if was_full || empty {
            // Unmapping can fail (splitting a merged mapping at
            // vm.max_map_count): the slab, already given back page by
            // page, stays for reuse.
            st.partial[class].insert(base);
        }
    }

    pub(crate) fn counts(&self) -> PoolCounts {
        let st = self.lock();
        PoolCounts {
            slabs: st.slabs.len(),
            values: st.values,
            slot_bytes: st.slot_bytes,
        }
    }
}

/// Maps a fresh slab of [`SLAB_BYTES`]; returns its base address.
fn map_slab() -> io::Result<usize> {
    // SAFETY: a fresh anonymous mapping with no address hint touches no
    // existing memory; the result is checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLAB_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // Slots are given back page by page; a transparent huge page would
    // keep 2 MiB resident for one live slot. Advisory: ignore failure.
    // SAFETY: `p` is the mapping just made; madvise only changes its
    // paging policy.
    unsafe { libc::madvise(p, SLAB_BYTES, libc::MADV_NOHUGEPAGE) };
    Ok(p as usize)
}

/// Unmaps an empty slab. `false` if the kernel refused (then it is still
/// mapped).
///
/// # Safety
/// `base` must be a slab of a pool (mapped by [`map_slab`]) none of whose
/// slots is in use, so that no region refers to it.
unsafe fn unmap_slab(base: usize) -> bool {
    // SAFETY: forwarded from this function's contract.
    unsafe { libc::munmap(base as *mut libc::c_void, SLAB_BYTES) == 0 }
}

/// Drops the pages of `[addr, addr+len)` (`MADV_DONTNEED`) and keeps the
/// mapping: the kernel zaps them (the page-table work and TLB flush
/// `munmap` does) and frees them if nothing else holds them. Anonymous
/// memory then reads as zeros, a socket mapping as what is mapped there
/// next.
///
/// # Safety
/// Whole pages the caller owns that no region refers to: pages of a slab
/// no live slot uses, with the pool's lock held so that none is handed
/// out meanwhile, or a whole lent mapping being dropped.
unsafe fn discard(addr: usize, len: usize) {
    debug_assert!(addr.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE));
    // SAFETY: forwarded from this function's contract.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    debug_assert_eq!(rc, 0, "madvise: {}", io::Error::last_os_error());
}

/// How many of the pages of `[addr, addr+len)` (page-aligned, mapped) are
/// resident.
#[cfg(test)]
pub(crate) fn resident_pages(addr: usize, len: usize) -> usize {
    let pages = len.div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page asked about; mincore only
    // inspects the address space (it fails with ENOMEM on unmapped pages,
    // which the assertion reports).
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// Whether the page at `addr` is mapped at all.
#[cfg(test)]
pub(crate) fn is_mapped(addr: usize) -> bool {
    let mut b = 0u8;
    // SAFETY: one byte for the one page asked about; mincore only inspects
    // the address space.
    unsafe {
        libc::mincore(
            (addr & !(PAGE_SIZE - 1)) as *mut libc::c_void,
            PAGE_SIZE,
            &mut b,
        ) == 0
    }
}
