//! Every system call and raw-memory operation of this crate, behind small
//! safe wrappers.

use std::collections::HashMap;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use pagerpc_core::PAGE_SIZE;

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

    /// One page from the small-page pool; its first `len` bytes are zeroed
    /// if `zero` (the rest is never exposed). `len <= PAGE_SIZE`.
    pub(crate) fn small(len: usize, zero: bool) -> io::Result<Region> {
        assert!(len <= PAGE_SIZE);
        let ptr = slab_take()?;
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

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        match self {
            Region::Mapped { ptr, .. } | Region::Slab { ptr } => *ptr,
        }
    }

    /// Usable bytes.
    pub(crate) fn capacity(&self) -> usize {
        match self {
            Region::Mapped { map_len, .. } => *map_len,
            Region::Slab { .. } => PAGE_SIZE,
        }
    }

    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self, Region::Mapped { .. })
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
            Region::Mapped { ptr, map_len, .. } => {
                // SAFETY: we own this mapping and nothing borrows it any more
                // (drop has &mut self). munmap only fails for bad arguments.
                let rc = unsafe { libc::munmap(ptr.as_ptr().cast(), map_len) };
                debug_assert_eq!(rc, 0, "munmap: {}", io::Error::last_os_error());
            }
            Region::Slab { ptr } => slab_put(ptr),
        }
    }
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
            unmap(addr, len);
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

fn unmap(addr: usize, len: usize) {
    // SAFETY: (addr, len) is a mapping the cache owned exclusively; it was
    // removed from the cache before this call, so nothing else refers to it.
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
