//! Every system call of the receive half, behind small safe wrappers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// `setsockopt` of one `c_int` value.
fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a valid c_int of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An anonymous private read-write mapping of `len` bytes: anywhere, or
/// (with `at`) replacing exactly `[at, at+len)`.
///
/// # Safety
/// With `at`, the range must lie inside a mapping the caller owns and
/// nothing may refer to its current contents.
unsafe fn map_anon(
    at: Option<std::ptr::NonNull<u8>>,
    len: usize,
) -> io::Result<std::ptr::NonNull<u8>> {
    let (addr, flags) = match at {
        Some(p) => (
            p.as_ptr().cast(),
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        ),
        None => (
            std::ptr::null_mut(),
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        ),
    };
    // SAFETY: without `at` a fresh mapping touches no existing memory; with
    // it, the caller guarantees the range is its own and unreferenced.
    let p = unsafe { libc::mmap(addr, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    std::ptr::NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

/// How a `recv` may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Never (`MSG_DONTWAIT`).
    No,
    /// Until some bytes arrive (on a socket in blocking mode).
    Some,
    /// Until the whole buffer is filled, the stream ends, or an error
    /// (`MSG_WAITALL`, on a socket in blocking mode).
    All,
}

/// `recv` into `buf`, waiting as `wait` says. `Ok(0)` means end of stream.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], wait: Wait) -> io::Result<usize> {
    let flags = match wait {
        Wait::No => libc::MSG_DONTWAIT,
        Wait::Some => 0,
        Wait::All => libc::MSG_WAITALL,
    };
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the
        // duration of the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until `fd` is readable (or has hung up) or `timeout` passes
/// (`None` = forever). Returns `false` on timeout.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Round up so a sub-millisecond remainder does not spin.
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    });
    loop {
        // SAFETY: one valid pollfd, count 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(rc > 0);
    }
}

/// Sets `SO_RCVLOWAT`: poll/epoll report the socket readable only once this
/// many bytes are queued (or the connection is closing, or the kernel is
/// short of receive memory).
pub(crate) fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes.max(1))
}

/// `struct tcp_zerocopy_receive` from `<linux/tcp.h>` (Linux 5.11+ layout).
/// Older kernels accept a prefix of it; see [`ZC_STRUCT_LENS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TcpZerocopyReceive {
    address: u64,
    length: u32,
    recv_skip_hint: u32,
    inq: u32,
    err: i32,
    copybuf_address: u64,
    copybuf_len: i32,
    flags: u32,
    msg_control: u64,
    msg_controllen: u64,
    msg_flags: u32,
    reserved: u32,
}

/// `TCP_ZEROCOPY_RECEIVE` (Linux 4.18+).
const TCP_ZEROCOPY_RECEIVE: libc::c_int = 35;
/// `TCP_RECEIVE_ZEROCOPY_FLAG_TLB_CLEAN_HINT` (Linux 5.11+).
pub(crate) const ZC_FLAG_TLB_CLEAN_HINT: u32 = 0x1;

/// The struct sizes kernels have accepted, newest first: 5.11+ (64), 5.10
/// (40: copybuf and flags), 5.9 (24: err), 5.4 (20: inq), 4.18 (16).
pub(crate) const ZC_STRUCT_LENS: [usize; 5] = [64, 40, 24, 20, 16];

/// What one `TCP_ZEROCOPY_RECEIVE` call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ZcOut {
    /// Bytes mapped (whole pages).
    pub(crate) mapped: usize,
    /// Bytes at the head of the queue the kernel could not map; read them.
    pub(crate) skip: usize,
    /// Bytes left in the receive queue (0 if the kernel is too old to say).
    pub(crate) inq: usize,
}

/// A payload region: pages `[0, socket_end)` are a mapping of the socket
/// (read-only; `TCP_ZEROCOPY_RECEIVE` maps received pages there), pages
/// `[socket_end, map_len)` are anonymous, writable memory that copied bytes
/// go into. Unmapped on drop unless turned into `Pages`.
#[derive(Debug)]
pub(crate) struct SockRegion {
    ptr: std::ptr::NonNull<u8>,
    map_len: usize,
    socket_end: usize,
    /// Page ranges inside `[0, socket_end)` turned writable for copying.
    holes: Vec<(usize, usize)>,
}

// SAFETY: the region exclusively owns its mappings; moving it between
// threads moves that ownership.
unsafe impl Send for SockRegion {}

impl SockRegion {
    /// A region for a payload of `len` bytes: its whole pages map the
    /// socket, its last partial page (if any) is anonymous.
    pub(crate) fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<SockRegion> {
        let map_len = pagerpc_core::page_round_up(len);
        let aligned = len & !(pagerpc_core::PAGE_SIZE - 1);
        if map_len == 0 || aligned == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no whole page to map",
            ));
        }
        let base = if aligned == map_len {
            // SAFETY: a fresh shared read-only mapping of the socket with no
            // address hint touches no existing memory.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            }
        } else {
            // Reserve the whole range as anonymous memory first, so the
            // socket mapping below replaces only our own pages.
            // SAFETY: no `at`: a fresh mapping.
            let p = unsafe { map_anon(None, map_len)? }
                .as_ptr()
                .cast::<libc::c_void>();
            // SAFETY: [p, p+aligned) lies inside the reservation we just
            // made and own; MAP_FIXED replaces only those pages.
            let q = unsafe {
                libc::mmap(
                    p,
                    aligned,
                    libc::PROT_READ,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if q == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                // SAFETY: the reservation is ours and nothing refers to it.
                unsafe { libc::munmap(p, map_len) };
                return Err(e);
            }
            p
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(base.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(SockRegion {
            ptr,
            map_len,
            socket_end: aligned,
            holes: Vec::new(),
        })
    }

    /// Maps up to `len` received bytes at `offset` (page-aligned, inside the
    /// socket part) with `TCP_ZEROCOPY_RECEIVE`. `struct_len` is the struct
    /// size to pass; the caller steps down [`ZC_STRUCT_LENS`] on `EINVAL`.
    pub(crate) fn zerocopy(
        &self,
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
        flags: u32,
        struct_len: usize,
    ) -> io::Result<ZcOut> {
        assert!(offset.is_multiple_of(pagerpc_core::PAGE_SIZE) && offset + len <= self.socket_end);
        let mut zc = TcpZerocopyReceive {
            address: self.ptr.as_ptr() as u64 + offset as u64,
            length: u32::try_from(len).unwrap_or(!0xfff),
            flags: if struct_len >= 40 { flags } else { 0 },
            ..Default::default()
        };
        let mut optlen =
            struct_len.min(std::mem::size_of::<TcpZerocopyReceive>()) as libc::socklen_t;
        // SAFETY: `zc` is a valid, writable struct of at least `optlen`
        // bytes; the kernel maps pages only inside our socket mapping
        // (checked above), which this region owns.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                TCP_ZEROCOPY_RECEIVE,
                (&mut zc as *mut TcpZerocopyReceive).cast(),
                &mut optlen,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if struct_len >= 24 && zc.err != 0 {
            return Err(io::Error::from_raw_os_error(-zc.err.min(-1)));
        }
        Ok(ZcOut {
            mapped: zc.length as usize,
            skip: zc.recv_skip_hint as usize,
            inq: if struct_len >= 20 { zc.inq as usize } else { 0 },
        })
    }

    /// Turns the socket part from `offset` (page-aligned) on into anonymous
    /// writable memory, so the rest of the payload can be copied in.
    pub(crate) fn make_writable_from(&mut self, offset: usize) -> io::Result<()> {
        let end = self.socket_end;
        self.make_writable(offset, end)?;
        self.socket_end = self.socket_end.min(offset);
        Ok(())
    }

    /// Turns the pages `[from, to)` (page-aligned, inside the socket part)
    /// into anonymous writable memory, so bytes the kernel could not map can
    /// be copied there while the pages around them stay mappable.
    pub(crate) fn make_writable(&mut self, from: usize, to: usize) -> io::Result<()> {
        assert!(
            from.is_multiple_of(pagerpc_core::PAGE_SIZE)
                && to.is_multiple_of(pagerpc_core::PAGE_SIZE)
        );
        let to = to.min(self.socket_end);
        if from >= to {
            return Ok(());
        }
        // SAFETY: [ptr+from, ptr+to) lies inside our own mapping and no
        // Pages has been handed out for this region yet.
        unsafe {
            map_anon(
                std::ptr::NonNull::new(self.ptr.as_ptr().add(from)),
                to - from,
            )?
        };
        self.holes.push((from, to));
        Ok(())
    }

    /// Where the socket part ends (from here on the region is writable).
    pub(crate) fn socket_end(&self) -> usize {
        self.socket_end
    }

    /// The writable bytes `[offset, offset+len)`: past `socket_end()`, or
    /// inside a range made writable with [`make_writable`](Self::make_writable).
    pub(crate) fn writable(&mut self, offset: usize, len: usize) -> &mut [u8] {
        let end = offset + len;
        assert!(
            (offset >= self.socket_end && end <= self.map_len)
                || self.holes.iter().any(|&(a, b)| a <= offset && end <= b),
            "copy into a part of the region that maps the socket"
        );
        // SAFETY: the range is inside the anonymous, writable part of a
        // mapping this region owns exclusively (`&mut self`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) }
    }

    /// Hands the region to a `Pages` of `len` bytes.
    pub(crate) fn into_pages(mut self, len: usize) -> pagerpc_pages::Pages {
        // ManuallyDrop below skips every field's destructor: free the hole
        // list first (forgetting it leaked a little heap per payload).
        drop(std::mem::take(&mut self.holes));
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: ManuallyDrop gives up this value's ownership of the
        // mapping (it will not unmap it); every byte below `len` was mapped
        // or written.
        unsafe { hand_to_pages(me.ptr, len, me.map_len) }
    }
}

impl Drop for SockRegion {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing refers to it any more.
        unsafe { unmap(self.ptr, self.map_len) };
    }
}

/// The socket's receive buffer size (`SO_RCVBUF`), which autotuning grows.
pub(crate) fn rcvbuf(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` is a valid, writable c_int and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v.max(0) as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `TCP_MMAP_CONSUME` of the patched kernel in `kernel-patch/`: once set,
/// `mmap()` on the socket maps and consumes the next received bytes.
const TCP_MMAP_CONSUME: libc::c_int = 100;

/// Opts the socket in to the patched kernel's consuming `mmap()`. Fails
/// (`ENOPROTOOPT`) on kernels without the patch.
pub(crate) fn enable_mmap_consume(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_MMAP_CONSUME, 1)
}

/// Bytes queued for reading (`FIONREAD`).
pub(crate) fn inq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        Ok(n.max(0) as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A payload region for the consuming-`mmap()` backend: reserved as
/// anonymous memory, then filled front to back, each chunk either mapped
/// from the socket (`MAP_FIXED` over the reservation, consuming the bytes)
/// or copied into the still-anonymous memory. Unmapped on drop unless
/// turned into `Pages`.
#[derive(Debug)]
pub(crate) struct ConsumeRegion {
    ptr: std::ptr::NonNull<u8>,
    map_len: usize,
    /// Everything below this offset has been mapped or written; everything
    /// from it on is still the anonymous reservation.
    front: usize,
}

// SAFETY: the region exclusively owns its mappings; moving it between
// threads moves that ownership.
unsafe impl Send for ConsumeRegion {}

impl ConsumeRegion {
    /// Reserves `len` bytes (rounded up to pages) of anonymous memory.
    pub(crate) fn new(len: usize) -> io::Result<ConsumeRegion> {
        let map_len = pagerpc_core::page_round_up(len.max(1));
        // SAFETY: no `at`: a fresh mapping.
        let ptr = unsafe { map_anon(None, map_len)? };
        Ok(ConsumeRegion {
            ptr,
            map_len,
            front: 0,
        })
    }

    /// Maps (and so consumes) the next `len` received bytes (a page
    /// multiple) at `offset`, which must be the region's front. All or
    /// nothing: on `EINVAL`/`EAGAIN`/`EIO` nothing is consumed and the
    /// reservation is untouched.
    pub(crate) fn map_next(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        assert!(offset == self.front && offset.is_multiple_of(pagerpc_core::PAGE_SIZE));
        assert!(len.is_multiple_of(pagerpc_core::PAGE_SIZE) && offset + len <= self.map_len);
        // SAFETY: [ptr+offset, ptr+offset+len) lies inside our reservation,
        // past every byte already handed out or written; MAP_FIXED replaces
        // exactly those anonymous pages. On failure the kernel leaves the
        // old mapping in place (all-or-nothing, checked before the VMA is
        // inserted) or, if the new VMA failed after the old one was
        // removed, the range is unmapped; we re-reserve it below.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            self.rereserve(offset, len)?;
            return Err(e);
        }
        self.front = offset + len;
        Ok(())
    }

    /// Makes sure `[offset, offset+len)` is anonymous writable memory again
    /// (a failed MAP_FIXED may have left a hole).
    fn rereserve(&mut self, offset: usize, len: usize) -> io::Result<()> {
        // SAFETY: the range is inside our reservation, past the front, so
        // nothing refers to it.
        unsafe { map_anon(std::ptr::NonNull::new(self.ptr.as_ptr().add(offset)), len) }.map(|_| ())
    }

    /// The writable bytes `[offset, offset+len)` at or past the front.
    pub(crate) fn writable(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset >= self.front && offset + len <= self.map_len);
        // SAFETY: the range is anonymous memory past the front, owned
        // exclusively by this region (`&mut self`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) }
    }

    /// Records that bytes up to `offset` were written.
    pub(crate) fn advance(&mut self, offset: usize) {
        self.front = self.front.max(offset);
    }

    /// Hands the region to a `Pages` of `len` bytes.
    pub(crate) fn into_pages(self, len: usize) -> pagerpc_pages::Pages {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: ManuallyDrop gives up this value's ownership of the
        // mapping (it will not unmap it); every byte below `len` was mapped
        // or written.
        unsafe { hand_to_pages(me.ptr, len, me.map_len) }
    }
}

impl Drop for ConsumeRegion {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing refers to it any more.
        unsafe { unmap(self.ptr, self.map_len) };
    }
}

/// Hands an owned payload mapping to a `Pages` of `len` bytes, which unmaps
/// it when its last handle is dropped.
///
/// # Safety
/// `(ptr, map_len)` must be a mapping the caller owns exclusively and will
/// neither use nor unmap again, readable in full, with every byte below
/// `len` initialized.
unsafe fn hand_to_pages(
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    map_len: usize,
) -> pagerpc_pages::Pages {
    // SAFETY: forwarded from this function's contract.
    unsafe { pagerpc_pages::Pages::from_mapping(ptr, len, map_len, pagerpc_pages::Origin::Socket) }
}

/// Unmaps an owned payload mapping.
///
/// # Safety
/// `(ptr, map_len)` must be a mapping the caller owns and nothing refers to.
unsafe fn unmap(ptr: std::ptr::NonNull<u8>, map_len: usize) {
    // SAFETY: forwarded from this function's contract; munmap only fails
    // for bad arguments.
    unsafe { libc::munmap(ptr.as_ptr().cast(), map_len) };
}
