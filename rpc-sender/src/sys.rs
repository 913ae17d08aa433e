//! Every system call of the send half, behind small safe wrappers.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

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
