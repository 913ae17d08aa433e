//! Every system call of the send half, behind small safe wrappers.

use std::io::{self, IoSlice};
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

/// `sendmsg(fd, iov, flags | MSG_NOSIGNAL | MSG_DONTWAIT)`. Returns the number
/// of bytes the kernel took.
pub(crate) fn sendmsg(fd: BorrowedFd<'_>, iov: &[IoSlice<'_>], flags: i32) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with struct iovec on Unix.
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len().min(libc::UIO_MAXIOV as usize) as _;
    // SAFETY: msg points at `iov`, which outlives the call; the kernel only
    // reads from the iovecs for a send.
    let n = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Waits until `fd` is writable or `timeout` passes (`None` = forever).
/// Returns `false` on timeout.
pub(crate) fn wait_writable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
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

/// `MSG_EOR`: ends a part, so the next bytes start a new TCP segment.
pub(crate) const MSG_EOR: i32 = libc::MSG_EOR;

/// `MSG_ZEROCOPY`: send from the caller's pages; completion is reported on
/// the socket's error queue.
pub(crate) const MSG_ZEROCOPY: i32 = libc::MSG_ZEROCOPY;
/// `SO_ZEROCOPY` (asm-generic value).
const SO_ZEROCOPY: libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY`.
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied the data after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Enables `MSG_ZEROCOPY` sends on a socket.
pub(crate) fn enable_zerocopy(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, SO_ZEROCOPY, 1)
}

/// One zero-copy completion notification: ids `lo..=hi` are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub(crate) lo: u32,
    pub(crate) hi: u32,
    pub(crate) copied: bool,
}

/// Reads every zero-copy completion queued on the socket's error queue,
/// without blocking.
pub(crate) fn read_completions(fd: BorrowedFd<'_>, out: &mut Vec<Completion>) -> io::Result<()> {
    loop {
        // Room for a few cmsgs; each holds one sock_extended_err.
        let mut control = [0u64; 64];
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: msg points at `control`, which outlives the call and is
        // writable for msg_controllen bytes; no data iovecs are given.
        let rc = unsafe {
            libc::recvmsg(
                fd.as_raw_fd(),
                &mut msg,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(()),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        // SAFETY: the kernel filled msg_control with msg_controllen bytes of
        // well-formed cmsgs; CMSG_FIRSTHDR/NXTHDR stay inside them.
        let mut cm = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cm.is_null() {
            // SAFETY: `cm` points at a cmsghdr inside `control`.
            let hdr = unsafe { &*cm };
            let is_err = (hdr.cmsg_level == libc::SOL_IP && hdr.cmsg_type == libc::IP_RECVERR)
                || (hdr.cmsg_level == libc::SOL_IPV6 && hdr.cmsg_type == libc::IPV6_RECVERR);
            let need = std::mem::size_of::<libc::sock_extended_err>();
            // SAFETY: CMSG_LEN is pure arithmetic.
            let full = unsafe { libc::CMSG_LEN(need as u32) } as usize;
            if is_err && hdr.cmsg_len as usize >= full {
                // SAFETY: the cmsg is long enough to hold a
                // sock_extended_err (checked above); read it unaligned.
                let ee: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast()) };
                if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0 {
                    out.push(Completion {
                        lo: ee.ee_info,
                        hi: ee.ee_data,
                        copied: ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
                    });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cm = unsafe { libc::CMSG_NXTHDR(&msg, cm) };
        }
    }
}

/// Waits until the socket's error queue has something (POLLERR) or
/// `timeout` passes. Returns `false` on timeout.
pub(crate) fn wait_errqueue(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0, // POLLERR is always reported
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(true);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

/// Sets or clears `TCP_CORK`. While corked, TCP sends only full-sized
/// segments, even at the edge of the receive window; clearing it pushes
/// what is pending at once.
pub(crate) fn set_cork(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_CORK, on.into())
}

/// Aborts a TCP connection at once: `connect()` to `AF_UNSPEC` runs the
/// kernel's `tcp_disconnect()`, which drops the send queue (so the kernel
/// lets go of every page sent with `MSG_ZEROCOPY` and reports their
/// completions) and resets the connection, even while other descriptors
/// or mappings still refer to the socket.
pub(crate) fn abort(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: sockaddr is plain data; all-zero with family AF_UNSPEC is the
    // documented way to dissolve a connection.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: `sa` is a valid sockaddr of the size passed, alive for the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sa,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
