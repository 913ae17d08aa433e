//! The system calls of the RPC layer (epoll, eventfd, socket options),
//! through nix's safe wrappers.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
#[cfg(feature = "tokio")]
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, connect, getsockopt, listen, setsockopt, shutdown as nix_shutdown, socket, sockopt,
    AddressFamily, Backlog, Shutdown, SockFlag, SockType, SockaddrStorage,
};

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Puts a stream in the mode pagerpc uses: `TCP_NODELAY`, and non-blocking
/// for event loops. A client's socket stays in blocking mode so that a
/// caller waiting without a deadline can sleep in `recv` itself; every
/// operation that must not block passes `MSG_DONTWAIT`.
pub(crate) fn prepare_stream(s: &TcpStream, nonblocking: bool) -> io::Result<()> {
    s.set_nonblocking(nonblocking)?;
    s.set_nodelay(true)
}

/// Shuts both directions of a socket down, waking any thread blocked on it.
pub(crate) fn shutdown(fd: BorrowedFd<'_>) {
    // ENOTCONN after the peer already went away is fine.
    let _ = nix_shutdown(fd.as_raw_fd(), Shutdown::Both);
}

/// Writes `bytes` if the socket takes them now, never waiting: a best-effort
/// last word before closing. Whatever does not fit is dropped.
pub(crate) fn send_now(fd: BorrowedFd<'_>, bytes: &[u8]) {
    let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
    let _ = nix::sys::socket::send(fd.as_raw_fd(), bytes, flags);
}

/// One epoll instance shared by a pool of threads.
#[derive(Debug)]
pub(crate) struct Poller {
    ep: Epoll,
}

/// What a connection's registration reports: every change of its
/// readiness, once (`EPOLLET`): bytes or the peer's FIN to read, room to
/// write, and (always) `EPOLLERR` (zero-copy completions, socket errors)
/// and `EPOLLHUP`. Registered once; never re-armed after an event (the
/// server's `Conn::release` says when it must be looked at again).
pub(crate) const CONN_FLAGS: EpollFlags = EpollFlags::EPOLLET
    .union(EpollFlags::EPOLLIN)
    .union(EpollFlags::EPOLLRDHUP)
    .union(EpollFlags::EPOLLOUT);

/// One readiness event, with what the kernel reported.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ready {
    pub(crate) token: u64,
    /// Bytes (or the peer's FIN) to read.
    pub(crate) readable: bool,
    /// Room in the send buffer.
    pub(crate) writable: bool,
    /// Something on the error queue (zero-copy completions) or a pending
    /// socket error; reported until it is read.
    pub(crate) error: bool,
    /// Both directions are shut (reset, or closed both ways).
    pub(crate) hangup: bool,
    /// The peer shut its sending side (`EPOLLRDHUP`): after the bytes
    /// still to read comes the end.
    pub(crate) read_closed: bool,
}

/// Takes the socket's pending error (`SO_ERROR`), if any, clearing it.
pub(crate) fn take_socket_error(fd: BorrowedFd<'_>) -> Option<io::Error> {
    match getsockopt(&fd, sockopt::SocketError) {
        Ok(0) => None,
        Ok(e) => Some(io::Error::from_raw_os_error(e)),
        Err(e) => Some(io_err(e)),
    }
}
/// Flags for the listener: one waiter woken per connection.
pub(crate) const LISTEN_FLAGS: EpollFlags = EpollFlags::EPOLLIN.union(EpollFlags::EPOLLONESHOT);
/// Flags for an eventfd: level-triggered readable.
pub(crate) const EVENT_FLAGS: EpollFlags = EpollFlags::EPOLLIN;

impl Poller {
    pub(crate) fn new() -> io::Result<Poller> {
        Ok(Poller {
            ep: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io_err)?,
        })
    }

    pub(crate) fn add(&self, fd: BorrowedFd<'_>, token: u64, flags: EpollFlags) -> io::Result<()> {
        self.ep
            .add(fd, EpollEvent::new(flags, token))
            .map_err(io_err)
    }

    pub(crate) fn rearm(
        &self,
        fd: BorrowedFd<'_>,
        token: u64,
        flags: EpollFlags,
    ) -> io::Result<()> {
        let mut ev = EpollEvent::new(flags, token);
        self.ep.modify(fd, &mut ev).map_err(io_err)
    }

    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) {
        // Fails only if the fd was never added or is already gone.
        let _ = self.ep.delete(fd);
    }

    /// Waits for one event; returns it with its flags, or `None` on
    /// timeout.
    pub(crate) fn wait_one(&self, timeout: Option<Duration>) -> io::Result<Option<Ready>> {
        let mut evs = [EpollEvent::empty()];
        let t = match timeout {
            None => EpollTimeout::NONE,
            Some(d) => EpollTimeout::try_from(d).unwrap_or(EpollTimeout::MAX),
        };
        loop {
            match self.ep.wait(&mut evs, t) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    let f = evs[0].events();
                    return Ok(Some(Ready {
                        token: evs[0].data(),
                        readable: f.intersects(
                            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP,
                        ),
                        writable: f.contains(EpollFlags::EPOLLOUT),
                        error: f.contains(EpollFlags::EPOLLERR),
                        hangup: f.contains(EpollFlags::EPOLLHUP),
                        read_closed: f.contains(EpollFlags::EPOLLRDHUP),
                    }));
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
    }
}

/// A non-blocking eventfd used as a wake-up signal.
#[derive(Debug)]
pub(crate) struct Signal {
    fd: EventFd,
}

impl Signal {
    pub(crate) fn new() -> io::Result<Signal> {
        Ok(Signal {
            fd: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(io_err)?,
        })
    }

    /// Makes the eventfd readable.
    pub(crate) fn raise(&self) {
        // Only fails if the counter would overflow, which leaves it readable.
        let _ = self.fd.write(1);
    }

    /// Makes it unreadable again.
    pub(crate) fn clear(&self) {
        let _ = self.fd.read();
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The machine's memory (`MemTotal` in /proc/meminfo), in bytes.
pub(crate) fn mem_total() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The soft limit on open files (`RLIMIT_NOFILE`).
pub(crate) fn fd_limit() -> Option<usize> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
}

/// Whether an `accept()` error means the process or system is out of
/// descriptors (or memory for them), so accepting again at once would only
/// fail again.
pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(nix::Error::from_raw),
        Some(nix::Error::EMFILE | nix::Error::ENFILE | nix::Error::ENOBUFS | nix::Error::ENOMEM)
    )
}

/// Whether the kernel adds the 12-byte TCP timestamp option to segments.
pub(crate) fn tcp_timestamps_on() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_timestamps")
        .map(|v| v.trim() != "0")
        .unwrap_or(true)
}

fn new_socket(addr: &SocketAddr, mss: Option<u32>) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(io_err)?;
    if let Some(mss) = mss {
        // Must be set before the handshake: it clamps the MSS both ends use.
        setsockopt(&fd, sockopt::TcpMaxSeg, &mss).map_err(io_err)?;
    }
    Ok(fd)
}

/// Connects a TCP socket to `addr`, setting `TCP_MAXSEG` first if asked,
/// within `timeout`.
pub(crate) fn connect_with_mss(
    addr: &SocketAddr,
    mss: Option<u32>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fd = new_socket(addr, mss)?;
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    let sa = SockaddrStorage::from(*addr);
    match connect(stream.as_raw_fd(), &sa) {
        Ok(()) => {}
        Err(nix::Error::EINPROGRESS) => {
            let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
            let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX);
            if poll(&mut fds, ms).map_err(io_err)? == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            let err = getsockopt(&stream, sockopt::SocketError).map_err(io_err)?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        Err(e) => return Err(io_err(e)),
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Binds and listens on `addr`, setting `TCP_MAXSEG` first if asked (every
/// accepted connection inherits it).
pub(crate) fn listen_with_mss(addr: &SocketAddr, mss: Option<u32>) -> io::Result<TcpListener> {
    let fd = new_socket(addr, mss)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io_err)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(*addr)).map_err(io_err)?;
    listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN)).map_err(io_err)?;
    Ok(TcpListener::from(fd))
}

/// The MSS a connected socket uses (`TCP_MAXSEG`).
pub(crate) fn current_mss(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt(&fd, sockopt::TcpMaxSeg).map_err(io_err)
}

/// What [`wait_send_ready`] saw (all `false` on timeout or interruption).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SendReady {
    /// Bytes (or the peer's FIN) to read; only reported when asked for.
    pub(crate) readable: bool,
    /// Room in the send buffer, or the send side is shut (a write then
    /// fails at once).
    pub(crate) writable: bool,
    /// Something on the error queue (zero-copy completions) or a pending
    /// socket error.
    pub(crate) error: bool,
    /// `wake` is readable.
    pub(crate) woken: bool,
}

/// Waits until `sock` is writable (only when `write`), or readable (only when `read`), or
/// reports an error, or `wake` (an eventfd) is raised, or `timeout` passes
/// (`None`: no limit; rounded up to whole milliseconds). An interrupted
/// wait returns as a timeout does, so the caller re-checks its deadline.
pub(crate) fn wait_send_ready(
    sock: BorrowedFd<'_>,
    write: bool,
    read: bool,
    wake: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> io::Result<SendReady> {
    // Without `write` (the sender waits for zero-copy completions), only
    // POLLERR, which poll always reports, ends the wait on the socket.
    let mut events = if write {
        PollFlags::POLLOUT
    } else {
        PollFlags::empty()
    };
    if read {
        events |= PollFlags::POLLIN;
    }
    let mut fds = [
        PollFd::new(sock, events),
        PollFd::new(wake, PollFlags::POLLIN),
    ];
    let t = match timeout {
        None => PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    };
    match poll(&mut fds, t) {
        Ok(0) | Err(nix::Error::EINTR) => return Ok(SendReady::default()),
        Ok(_) => {}
        Err(e) => return Err(io_err(e)),
    }
    let s = fds[0].revents().unwrap_or(PollFlags::empty());
    let w = fds[1].revents().unwrap_or(PollFlags::empty());
    Ok(SendReady {
        readable: read && s.intersects(PollFlags::POLLIN | PollFlags::POLLHUP),
        writable: s.intersects(PollFlags::POLLOUT | PollFlags::POLLHUP),
        error: s.contains(PollFlags::POLLERR),
        woken: w.contains(PollFlags::POLLIN),
    })
}

/// A socket as tokio's `AsyncFd` wants it (feature `tokio`), shared with
/// its sender and receiver.
#[cfg(feature = "tokio")]
pub(crate) struct SockFd(Arc<OwnedFd>);

#[cfg(feature = "tokio")]
impl SockFd {
    /// The socket, to register again.
    pub(crate) fn into_fd(self) -> Arc<OwnedFd> {
        self.0
    }
}

#[cfg(feature = "tokio")]
impl std::os::fd::AsRawFd for SockFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Registers a socket with the current runtime's reactor for every
/// readiness both async drivers use (readable, writable, error: zero-copy
/// completions). One wrapper for the client's driver and the server's
/// connection tasks.
///
/// tokio 1.54 deprecates the safe `AsyncFd::with_interest` in favour of an
/// `unsafe` constructor whose contract is that the descriptor stays open,
/// and the same, while registered. pagerpc forbids `unsafe` outside its
/// `sys` wrappers and needs none here: `SockFd` owns an `Arc<OwnedFd>`, so
/// the descriptor cannot close or be reused while the `AsyncFd` exists,
/// and `as_raw_fd` always returns that one descriptor.
///
/// # Errors
/// Outside a runtime, or when the reactor refuses the descriptor.
#[cfg(feature = "tokio")]
#[allow(deprecated)]
pub(crate) fn register_async(fd: Arc<OwnedFd>) -> io::Result<tokio::io::unix::AsyncFd<SockFd>> {
    use tokio::io::Interest;
    tokio::io::unix::AsyncFd::with_interest(
        SockFd(fd),
        Interest::READABLE | Interest::WRITABLE | Interest::ERROR,
    )
}
