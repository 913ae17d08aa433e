//! Every system call of the receive half, behind small safe wrappers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use pagerpc_pages::KeptMappings;

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

/// CPU time the calling thread has used (the pages crate holds the one
/// wrapper of `CLOCK_THREAD_CPUTIME_ID`).
pub(crate) use pagerpc_pages::thread_cpu_ns;

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

/// Maps anonymous private read-write memory at exactly `[at, at+len)`,
/// but only where nothing is mapped (`MAP_FIXED_NOREPLACE`): it never
/// replaces a mapping, so it is safe whoever owns the range now.
///
/// # Errors
/// `EEXIST` (`ErrorKind::AlreadyExists`) if any page of the range is
/// mapped; then nothing was mapped. Other `mmap` errors as they come.
fn map_anon_noreplace(at: std::ptr::NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: MAP_FIXED_NOREPLACE only creates a new mapping in address
    // space nothing occupies (or fails): no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            at.as_ptr().cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if p != at.as_ptr().cast() {
        // A kernel before 4.17 ignores the flag and takes `at` as a mere
        // hint: it mapped elsewhere because something occupies `at`.
        // SAFETY: `p` is the mapping just created here; nothing refers to it.
        unsafe { libc::munmap(p, len) };
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(())
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
    /// Bytes the kernel copied into the copy buffer offered with the call
    /// (`copybuf`, Linux 5.10+): the bytes that follow the mapped ones in
    /// the stream.
    pub(crate) copied: usize,
    /// A socket error (an errno) the kernel reported with this call (the
    /// `err` field, Linux 5.9+: a pending `sk_err`, which the call consumed).
    /// Only set together with `mapped > 0`: the kernel mapped and consumed
    /// those bytes first, so they are part of the stream and must be
    /// accounted before the error is acted on. With nothing mapped the
    /// error comes back as `Err` instead.
    pub(crate) err: Option<i32>,
}

/// What the kernel's answer to one successful `TCP_ZEROCOPY_RECEIVE` call
/// (`zc`, of which `struct_len` bytes were exchanged) means.
///
/// The kernel fills `err` with a pending socket error (`sock_error()`, which
/// clears it) after `tcp_zerocopy_receive()` succeeded, and that succeeds
/// whenever it mapped anything: `length > 0` and `err != 0` come together
/// (a reset that arrived right behind the data). The mapped bytes are
/// already consumed from the socket and sit in the region, so they are
/// reported (`mapped`, with the error in `err`) rather than dropped: the
/// caller accounts them, then fails. Dropping them lost them from the
/// payload's accounting, and a caller that carried on (copying the rest)
/// filled the payload with the bytes that followed them instead.
fn zc_outcome(zc: &TcpZerocopyReceive, struct_len: usize) -> io::Result<ZcOut> {
    let err = (struct_len >= 24 && zc.err != 0).then(|| -zc.err.min(-1));
    let out = ZcOut {
        mapped: zc.length as usize,
        skip: zc.recv_skip_hint as usize,
        inq: if struct_len >= 20 { zc.inq as usize } else { 0 },
        copied: if struct_len >= 40 {
            usize::try_from(zc.copybuf_len).unwrap_or(0)
        } else {
            0
        },
        err,
    };
    match err {
        Some(errno) if out.mapped == 0 => Err(io::Error::from_raw_os_error(errno)),
        _ => Ok(out),
    }
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
    /// Where the mapping goes back when its payload is dropped, if it is
    /// still laid out as made (no holes, socket part whole).
    home: Option<Arc<KeptMappings>>,
    /// Taken from `home` rather than made for this payload.
    reused: bool,
}

// SAFETY: the region exclusively owns its mappings; moving it between
// threads moves that ownership.
unsafe impl Send for SockRegion {}

impl SockRegion {
    /// A region for a payload of `len` bytes: its whole pages map the
    /// socket, its last partial page (if any) is anonymous. Taken from
    /// `home` if it keeps one of that layout (made by this function for
    /// this socket, its pages dropped), otherwise made; either way it goes
    /// back to `home` when its payload is dropped.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        home: Option<&Arc<KeptMappings>>,
    ) -> io::Result<SockRegion> {
        let map_len = pagerpc_core::page_round_up(len);
        let aligned = len & !(pagerpc_core::PAGE_SIZE - 1);
        if map_len == 0 || aligned == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no whole page to map",
            ));
        }
        if let Some(ptr) = home.and_then(|h| h.take(map_len, aligned)) {
            return Ok(SockRegion {
                ptr,
                map_len,
                socket_end: aligned,
                holes: Vec::new(),
                home: home.cloned(),
                reused: true,
            });
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
                // A failed MAP_FIXED file mapping may have left
                // [p, p+aligned) unmapped (Linux 6.12+ does when the file's
                // ->mmap() fails), and another thread may have mapped
                // something there since: re-reserve it without replacing
                // anything. If that fails, something occupies it that may
                // not be ours: give that range up (at worst leaking our own
                // untouched reservation) and unmap only the tail.
                let head = std::ptr::NonNull::new(p.cast::<u8>())
                    .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
                let (from, len) = match map_anon_noreplace(head, aligned) {
                    Ok(()) => (0, map_len),
                    Err(_) => (aligned, map_len - aligned),
                };
                if len > 0 {
                    // SAFETY: [p+from, p+from+len) is our reservation (the
                    // tail, untouched by the failed mapping, and the head
                    // only if re-reserved just now); nothing refers to it.
                    unsafe { libc::munmap(p.cast::<u8>().add(from).cast(), len) };
                }
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
            home: home.cloned(),
            reused: false,
        })
    }

    /// Maps up to `len` received bytes at `offset` (page-aligned, inside the
    /// socket part) with `TCP_ZEROCOPY_RECEIVE`. `struct_len` is the struct
    /// size to pass; the caller steps down [`ZC_STRUCT_LENS`] on `EINVAL`.
    /// With `copybuf` > 0 (and a struct of 40 bytes or more) the first
    /// `copybuf` bytes of the anonymous part are offered as the copy
    /// buffer: the kernel may copy there up to that many bytes that follow
    /// the mapped ones ([`ZcOut::copied`]), read with [`copybuf`](Self::copybuf).
    pub(crate) fn zerocopy(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
        flags: u32,
        struct_len: usize,
        copybuf: usize,
    ) -> io::Result<ZcOut> {
        assert!(offset.is_multiple_of(pagerpc_core::PAGE_SIZE) && offset + len <= self.socket_end);
        assert!(self.socket_end + copybuf <= self.map_len);
        let mut zc = TcpZerocopyReceive {
            address: self.ptr.as_ptr() as u64 + offset as u64,
            length: u32::try_from(len).unwrap_or(!0xfff),
            flags: if struct_len >= 40 { flags } else { 0 },
            ..Default::default()
        };
        if struct_len >= 40 && copybuf > 0 {
            // The anonymous part after the socket part: writable, ours.
            zc.copybuf_address = self.ptr.as_ptr() as u64 + self.socket_end as u64;
            zc.copybuf_len = i32::try_from(copybuf).unwrap_or(0);
        }
        let mut optlen =
            struct_len.min(std::mem::size_of::<TcpZerocopyReceive>()) as libc::socklen_t;
        // SAFETY: `zc` is a valid, writable struct of at least `optlen`
        // bytes; the kernel maps pages only inside our socket mapping
        // (checked above), and copies at most `copybuf` bytes to the start
        // of our anonymous part (checked above), both owned by this region,
        // borrowed mutably here.
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
        // Never more than offered, whatever the kernel says.
        zc_outcome(&zc, struct_len).map(|out| ZcOut {
            copied: out.copied.min(copybuf),
            ..out
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
        // No longer the layout it would be kept under.
        self.home = None;
        Ok(())
    }

    /// The first `n` bytes of the copy buffer a [`zerocopy`](Self::zerocopy)
    /// call offered (the anonymous part, from `socket_end()`), which the
    /// kernel wrote.
    pub(crate) fn copybuf(&self, n: usize) -> &[u8] {
        assert!(self.socket_end + n <= self.map_len);
        // SAFETY: the range lies inside the anonymous, readable part of a
        // mapping this region owns; writes need `&mut self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.socket_end), n) }
    }

    /// Whether the region was taken from the connection's kept mappings.
    pub(crate) fn reused(&self) -> bool {
        self.reused
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

    /// The first `len` bytes, which must all have been mapped or written
    /// already (a socket page the kernel has not mapped yet would fault
    /// with `SIGBUS` when read).
    pub(crate) fn received(&self, len: usize) -> &[u8] {
        assert!(len <= self.map_len);
        // SAFETY: the range lies inside this region, which owns it; its
        // pages are mapped readable (socket pages read-only, the rest
        // read-write) and, below `len`, hold placed bytes. Writes need
        // `&mut self`, so none happen while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    /// Hands the region to a `Pages` of `len` bytes.
    pub(crate) fn into_pages(mut self, len: usize) -> pagerpc_pages::Pages {
        // ManuallyDrop below skips every field's destructor: free the hole
        // list first (forgetting it leaked a little heap per payload).
        drop(std::mem::take(&mut self.holes));
        let home = self.home.take();
        let me = std::mem::ManuallyDrop::new(self);
        match home {
            // SAFETY: ManuallyDrop gives up this value's ownership of the
            // mapping (it will not unmap it); every byte below `len` was
            // mapped or written. The mapping is laid out as `new` makes
            // them (no hole was made, so its socket part is whole), which
            // is what `home` keeps under this layout.
            Some(home) => unsafe {
                pagerpc_pages::Pages::from_kept_mapping(
                    me.ptr,
                    len,
                    me.map_len,
                    me.socket_end,
                    &home,
                    pagerpc_pages::Origin::Socket,
                )
            },
            // SAFETY: as above, without a home: the Pages unmaps it.
            None => unsafe { hand_to_pages(me.ptr, len, me.map_len) },
        }
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
    /// A range `[from, to)` that a failed mapping took out of the region and
    /// that could not be re-reserved without replacing whatever occupies it
    /// now. It is no longer ours: never mapped over, written or unmapped by
    /// this region, which is unusable from then on.
    lost: Option<(usize, usize)>,
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
            lost: None,
        })
    }

    /// Maps (and so consumes) the next `len` received bytes (a page
    /// multiple) at `offset`, which must be the region's front. All or
    /// nothing: on `EINVAL`/`EAGAIN`/`EIO` nothing is consumed, and the
    /// range is anonymous reservation again.
    ///
    /// # Errors
    /// The `mmap` error. If the failed mapping left a hole that cannot be
    /// re-reserved (see [`lost`](Self::lost)), that error instead, and the
    /// region is unusable.
    pub(crate) fn map_next(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        if let Some((from, to)) = self.lost {
            return Err(io::Error::other(format!(
                "payload region lost its pages {from}..{to} to another mapping"
            )));
        }
        assert!(offset == self.front && offset.is_multiple_of(pagerpc_core::PAGE_SIZE));
        assert!(len.is_multiple_of(pagerpc_core::PAGE_SIZE) && offset + len <= self.map_len);
        // SAFETY: [ptr+offset, ptr+offset+len) lies inside our reservation,
        // past every byte already handed out or written; MAP_FIXED replaces
        // exactly those anonymous pages. On failure the kernel may leave
        // the old mapping in place (errors before the range is taken apart)
        // or leave the range unmapped (Linux 6.12+ whenever the socket's
        // ->mmap() fails, as EINVAL/EAGAIN/EIO do); we re-reserve it below,
        // without MAP_FIXED.
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
            self.rereserve(offset, len).map_err(|re| {
                io::Error::new(
                    re.kind(),
                    format!(
                        "consuming mmap() failed ({e}) and its range \
                         {offset}..{} could not be re-reserved ({re})",
                        offset + len
                    ),
                )
            })?;
            return Err(e);
        }
        self.front = offset + len;
        Ok(())
    }

    /// Makes sure `[offset, offset+len)` (past the front, where a mapping
    /// just failed) is anonymous writable memory again.
    ///
    /// Only a hole is filled (`MAP_FIXED_NOREPLACE`): a failed `MAP_FIXED`
    /// may have unmapped the range, and another thread's `mmap` may have
    /// been placed there since; `MAP_FIXED` here replaced that mapping
    /// under its owner. `EEXIST` means some page of the range is mapped:
    /// our reservation if the kernel left it in place, or someone else's
    /// mapping. The two cannot be told apart, so the range is given up
    /// ([`lost`](Self::lost)): at worst our untouched reservation leaks
    /// (address space only; the connection fails anyway), never someone
    /// else's memory is replaced or unmapped.
    ///
    /// # Errors
    /// Why the range could not be re-reserved; the region is then lost.
    fn rereserve(&mut self, offset: usize, len: usize) -> io::Result<()> {
        // SAFETY: `offset + len <= map_len` (checked by the caller), so the
        // pointer stays inside our address range.
        let at = unsafe { self.ptr.add(offset) };
        map_anon_noreplace(at, len).inspect_err(|_| self.lost = Some((offset, offset + len)))
    }

    /// Whether a failed mapping cost the region a range it could not get
    /// back: it is unusable, and the payload must be abandoned.
    pub(crate) fn lost(&self) -> bool {
        self.lost.is_some()
    }

    /// The writable bytes `[offset, offset+len)` at or past the front.
    pub(crate) fn writable(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset >= self.front && offset + len <= self.map_len);
        assert!(
            self.lost
                .is_none_or(|(from, to)| offset + len <= from || offset >= to),
            "copy into pages the region lost"
        );
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
        // Unreachable: every page below `len` was mapped or written, which
        // a lost range forbids.
        assert!(self.lost.is_none(), "a region with lost pages handed out");
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: ManuallyDrop gives up this value's ownership of the
        // mapping (it will not unmap it); every byte below `len` was mapped
        // or written.
        unsafe { hand_to_pages(me.ptr, len, me.map_len) }
    }
}

impl Drop for ConsumeRegion {
    fn drop(&mut self) {
        let Some((from, to)) = self.lost else {
            // SAFETY: we own this mapping and nothing refers to it any more.
            unsafe { unmap(self.ptr, self.map_len) };
            return;
        };
        // Unmap around the lost range, which may be someone else's now.
        if from > 0 {
            // SAFETY: [0, from) is ours (mapped or reserved, never lost) and
            // nothing refers to it any more.
            unsafe { unmap(self.ptr, from) };
        }
        if to < self.map_len {
            // SAFETY: as above for [to, map_len); `to < map_len`, so the
            // pointer is inside the region.
            unsafe { unmap(self.ptr.add(to), self.map_len - to) };
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use pagerpc_core::PAGE_SIZE;
    use std::os::fd::AsFd;

    /// Regression: the kernel reports a pending socket error in `err`
    /// together with the bytes it has already mapped and consumed
    /// (`length > 0`). Those bytes must not be dropped from the accounting.
    #[test]
    fn zerocopy_error_after_mapping_keeps_the_mapped_bytes() {
        let zc = TcpZerocopyReceive {
            length: 3 * PAGE_SIZE as u32,
            inq: 100,
            err: -libc::ECONNRESET,
            ..Default::default()
        };
        let out = zc_outcome(&zc, 64).expect("mapped bytes are reported, not dropped");
        assert_eq!(out.mapped, 3 * PAGE_SIZE);
        assert_eq!(out.inq, 100);
        assert_eq!(out.err, Some(libc::ECONNRESET));

        // Nothing mapped: the error alone.
        let zc = TcpZerocopyReceive {
            err: -libc::ETIMEDOUT,
            ..Default::default()
        };
        let e = zc_outcome(&zc, 64).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT));

        // A struct too short to carry `err`: whatever is there is ignored.
        let zc = TcpZerocopyReceive {
            length: PAGE_SIZE as u32,
            err: -libc::ECONNRESET,
            ..Default::default()
        };
        let out = zc_outcome(&zc, 20).unwrap();
        assert_eq!((out.mapped, out.err), (PAGE_SIZE, None));

        // No error.
        let zc = TcpZerocopyReceive {
            length: PAGE_SIZE as u32,
            recv_skip_hint: 7,
            ..Default::default()
        };
        let out = zc_outcome(&zc, 64).unwrap();
        assert_eq!((out.mapped, out.skip, out.err), (PAGE_SIZE, 7, None));
    }

    /// Maps one anonymous page exactly at `at`, never replacing anything,
    /// and fills it with `byte`.
    fn foreign_page_at(at: *mut u8, byte: u8) {
        // SAFETY: MAP_FIXED_NOREPLACE maps only into unmapped address space
        // (or fails); nothing refers to the new page yet.
        let p = unsafe {
            libc::mmap(
                at.cast(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(p.cast::<u8>(), at, "{}", io::Error::last_os_error());
        // SAFETY: the page was just mapped read-write and is ours.
        unsafe { std::ptr::write_bytes(at, byte, PAGE_SIZE) };
    }

    /// Whether the page at `at` is mapped (`mincore` fails with `ENOMEM`
    /// on an unmapped page).
    fn is_mapped(at: *mut u8) -> bool {
        let mut vec = 0u8;
        // SAFETY: `vec` has room for the one page asked about; mincore only
        // inspects the address space.
        unsafe { libc::mincore(at.cast(), PAGE_SIZE, &mut vec) == 0 }
    }

    /// Regression: when a failed consuming `mmap()` left a hole in the
    /// region (Linux 6.12+ leaves one whenever the socket's `->mmap()`
    /// fails) and another thread's mapping landed in it, re-reserving the
    /// range with `MAP_FIXED` replaced that mapping (its contents turned to
    /// zeros) and dropping the region unmapped it.
    #[test]
    fn rereserve_never_replaces_a_mapping_in_the_hole() {
        let mut region = ConsumeRegion::new(4 * PAGE_SIZE).unwrap();
        let base = region.ptr.as_ptr();
        // SAFETY: inside the region.
        let hole = unsafe { base.add(PAGE_SIZE) };
        // The hole a failed MAP_FIXED leaves...
        // SAFETY: page 1 of our own reservation, past the front; nothing
        // refers to it.
        assert_eq!(unsafe { libc::munmap(hole.cast(), PAGE_SIZE) }, 0);
        // ... and someone else's page in it.
        foreign_page_at(hole, 0xAB);

        let err = region
            .rereserve(PAGE_SIZE, PAGE_SIZE)
            .expect_err("re-reserving over another mapping must fail");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        // SAFETY: the foreign page is still mapped read-write (checked by
        // this very read not faulting, and by the value).
        let seen = unsafe { std::ptr::read_volatile(hole) };
        assert_eq!(seen, 0xAB, "the other mapping was replaced");
        assert_eq!(region.lost, Some((PAGE_SIZE, 2 * PAGE_SIZE)));

        // The region gives the range up: no mapping, no writing there.
        let udp = cursed_udp();
        let e = region.map_next(udp.as_fd(), 0, PAGE_SIZE).unwrap_err();
        assert!(e.to_string().contains("lost"), "{e}");

        drop(region);
        assert!(
            is_mapped(hole),
            "dropping the region unmapped the other mapping"
        );
        // SAFETY: still mapped (checked just above).
        assert_eq!(unsafe { std::ptr::read_volatile(hole) }, 0xAB);
        // The region's own pages are gone.
        assert!(!is_mapped(base));
        // SAFETY: inside the former region.
        assert!(!is_mapped(unsafe { base.add(2 * PAGE_SIZE) }));
        // SAFETY: the foreign page is this test's own; nothing refers to it.
        assert_eq!(unsafe { libc::munmap(hole.cast(), PAGE_SIZE) }, 0);
    }

    /// A UDP socket: its `mmap()` fails in the socket's `->mmap()` (ENODEV),
    /// after the kernel has taken the target range apart.
    fn cursed_udp() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    /// The ordinary failure path still works: a mapping that fails in the
    /// file's `->mmap()` leaves a hole, which is re-reserved, so the pages
    /// can be copied into and the region stays usable.
    #[test]
    fn failed_consume_map_leaves_a_usable_region() {
        let mut region = ConsumeRegion::new(3 * PAGE_SIZE).unwrap();
        let udp = cursed_udp();
        let e = region.map_next(udp.as_fd(), 0, 2 * PAGE_SIZE).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
        assert_eq!(region.lost, None);
        let w = region.writable(0, 3 * PAGE_SIZE);
        w.fill(0x5A);
        assert!(w.iter().all(|&b| b == 0x5A));
        region.advance(3 * PAGE_SIZE);
        let pages = region.into_pages(3 * PAGE_SIZE - 10);
        assert_eq!(pages.len(), 3 * PAGE_SIZE - 10);
        assert!(pages.iter().all(|&b| b == 0x5A));
    }
}
