//! Page-aligned payload memory.
//!
//! - [`Pages`]: an owned, read-only, page-aligned byte region that a receiver
//!   hands to its consumer. It may be memory the kernel mapped straight from
//!   the socket (zero-copy receive) or memory a payload was copied into.
//!   Dropping the last handle unmaps it.
//! - [`PageBuf`]: a writable, page-aligned buffer a sender fills in place and
//!   sends without another copy.
//! - [`Payload`]: what a send takes ownership of, and hands back on failure.
#![deny(unsafe_op_in_unsafe_fn)]

mod sys;

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
    /// [`HEAP_MAX`] bytes).
    Heap,
    /// An anonymous mapping the bytes were copied into.
    Anonymous,
    /// A mapping made on the socket: some or all pages were mapped from the
    /// receive queue without a copy. The mapping keeps the socket open until
    /// it is unmapped.
    Socket,
}

/// An owned, read-only, page-aligned byte region.
///
/// Cloning is cheap and shares the region; it is unmapped (or freed) when
/// the last clone is dropped. A consumer may keep it as long as it likes:
/// it stays valid after the connection it came from closes.
///
/// # Memory cost
/// The region occupies `len` rounded up to 4 KiB. A region mapped from a
/// socket also holds that socket's file open (a few KiB of kernel memory)
/// until it is dropped, even after the connection is closed.
#[derive(Clone)]
pub struct Pages {
    region: Option<Arc<Held>>,
    len: usize,
    origin: Origin,
}

/// A callback run once when the last handle to a [`Pages`] is dropped,
/// with the number of bytes the region occupied.
pub type ReleaseHook = Box<dyn FnOnce(usize) + Send + Sync>;

/// A region plus an optional hook run after it is released (or earlier,
/// by [`Pages::detach_accounting`]).
struct Held {
    region: Region,
    on_release: Mutex<Option<ReleaseHook>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let hook = self
            .on_release
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(hook) = hook {
            hook(self.region.capacity());
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
            region: Some(Arc::new(Held {
                region,
                on_release: Mutex::new(None),
            })),
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
            hook(held.region.capacity());
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

    /// Bytes of memory this value keeps alive (the region's size).
    pub fn footprint(&self) -> usize {
        self.region.as_ref().map_or(0, |r| r.region.capacity())
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
            Some(r) => r.region.slice(self.len),
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
    /// A zero-filled buffer of `len` bytes.
    ///
    /// # Errors
    /// When the memory cannot be allocated or mapped.
    pub fn new(len: usize) -> io::Result<PageBuf> {
        let region = match len {
            0 => None,
            n if n <= HEAP_MAX => Some(Region::small(n, true)?),
            n => Some(Region::anon(n)?),
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
    /// earlier payload of this process).
    ///
    /// # Errors
    /// When the memory cannot be allocated or mapped.
    pub fn for_overwrite(len: usize) -> io::Result<PageBuf> {
        let region = match len {
            0 => None,
            n if n <= HEAP_MAX => Some(Region::small(n, false)?),
            n => Some(Region::recycled(n)?),
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
            region: self.region.map(|region| {
                Arc::new(Held {
                    region,
                    on_release: Mutex::new(None),
                })
            }),
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
    fn pages_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pages>();
        check::<PageBuf>();
        check::<Payload>();
    }
}
