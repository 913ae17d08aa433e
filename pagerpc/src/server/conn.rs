//! One server connection: its socket halves, its protocol state, and who
//! may do its I/O.
//!
//! Exactly one pool thread at a time *owns* a connection's I/O: the one
//! that claimed it (`claim`) for a readiness event, a timeout mark or a
//! resume. Events that arrive for a connection while it is owned are
//! posted to the owner, which handles them before letting go. The pool's
//! registration is edge-triggered (`EPOLLET`, registered once with
//! `EPOLLIN | EPOLLRDHUP | EPOLLOUT`): a read turn reads until the socket
//! is dry (`Receiver::readable` at every read event), and letting go asks
//! epoll to look again (`EPOLL_CTL_MOD`, which reports the current
//! readiness) only when the turn left bytes unread that it may read now:
//! stopped by the batch cap, or reading paused by backpressure and allowed
//! again, or the peer's end (`EPOLLRDHUP`, reported once) still to be
//! read. Threads that finish a handler queue their response and flush
//! what the socket takes without waiting; what is left goes out on the
//! next `EPOLLOUT` edge (the socket reports one when a full send buffer
//! drains).
//!
//! Under the async server the same ownership rules hold, with one task per
//! connection as the only claimant: where the pool re-arms epoll, the
//! connection's task is woken instead (`task`), and events posted while
//! nobody owns the connection wait in `posted` for that task.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use pagerpc_core::conn::{IoSnapshot, ServerConn};
use pagerpc_receiver::{Frame, ReceivePath, Receiver};
use pagerpc_sender::{Flush, OutFrame, Sender};

use crate::auth;
use crate::sys::{self, Poller};

/// What a connection's owner is asked to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Events {
    /// Read requests.
    pub(crate) read: bool,
    /// Flush queued responses.
    pub(crate) write: bool,
    /// Reap zero-copy completions / take the socket's error.
    pub(crate) error: bool,
    /// The peer is gone both ways.
    pub(crate) hangup: bool,
    /// A timeout may have passed (posted by the sweeper).
    pub(crate) timeout: bool,
}

impl Events {
    pub(crate) fn merge(&mut self, o: Events) {
        self.read |= o.read;
        self.write |= o.write;
        self.error |= o.error;
        self.hangup |= o.hangup;
        self.timeout |= o.timeout;
    }

    fn any(&self) -> bool {
        self.read || self.write || self.error || self.hangup || self.timeout
    }
}

/// A call waiting to run.
pub(crate) struct Job {
    pub(crate) conn: Arc<Conn>,
    pub(crate) frame: Frame,
    pub(crate) received: Instant,
    pub(crate) cancelled: Arc<AtomicBool>,
}

/// Protocol state, behind one lock.
pub(crate) struct Core {
    /// The sans-IO state machine: calls, auth, timeouts.
    pub(crate) sm: ServerConn<Arc<AtomicBool>>,
    /// With a pre-shared key: the nonce this connection was challenged
    /// with, until it has authenticated.
    pub(crate) challenge: Option<[u8; auth::NONCE_LEN]>,
    /// The I/O state as of the owner's last turn.
    pub(crate) io: IoSnapshot,
    /// Calls read but not run because the outbound queue is full.
    pub(crate) deferred: Vec<Job>,
    /// Bytes the receiver had read at the owner's last turn.
    pub(crate) bytes_read: u64,
}

#[derive(Default)]
struct Owner {
    busy: bool,
    posted: Events,
}

pub(crate) struct Conn {
    pub(crate) token: u64,
    pub(crate) path: ReceivePath,
    pub(crate) fd: Arc<OwnedFd>,
    pub(crate) peer: SocketAddr,
    pub(crate) receiver: Mutex<Receiver>,
    sender: Mutex<Sender>,
    /// Frames queued by threads that found the sender in use; its holder
    /// writes them before letting go.
    outbox: Mutex<Vec<OutFrame>>,
    pub(crate) core: Mutex<Core>,
    owner: Mutex<Owner>,
    /// Response bytes queued in the sender (a copy, for lock-free checks).
    pub(crate) queued_out: AtomicUsize,
    /// The sender's next payload waits for zero-copy completions
    /// (`EPOLLERR`), not for room in the socket (`EPOLLOUT`).
    awaiting_zc: AtomicBool,
    /// The sender's next payload waits for the client's credit (a CREDIT
    /// frame): keep reading, do not wait for `EPOLLOUT`.
    pub(crate) awaiting_credit: AtomicBool,
    pub(crate) outbound_max: usize,
    pub(crate) closed: AtomicBool,
    /// Payload bytes of this connection's requests that consumers still hold.
    pub(crate) held: AtomicUsize,
    /// Reading is paused because `held` is over the cap.
    pub(crate) held_paused: AtomicBool,
    /// The sweeper posted a timeout check not yet handled.
    pub(crate) timeout_posted: AtomicBool,
    /// Reading waits for room in the server's receive budget.
    pub(crate) budget_wait: AtomicBool,
    /// The peer authenticated: the receiver's full limits apply from the
    /// next frame (set by the owner, which holds the receiver).
    pub(crate) open_limits: AtomicBool,
    /// Closed to make room for newer unauthenticated connections.
    pub(crate) evicted: AtomicBool,
    /// Open streams, by call id.
    pub(crate) streams: Mutex<std::collections::HashMap<u64, Arc<super::stream::StreamShared>>>,
    /// The client's limits (from its SETTINGS; defaults until then), which
    /// replies are checked against.
    pub(crate) peer_limits: Mutex<pagerpc_core::Limits>,
    /// The client's stream window (from its SETTINGS).
    pub(crate) peer_stream_window: std::sync::atomic::AtomicU64,
    /// Under the async server: wakes the connection's task, which is
    /// where the pool would re-arm epoll.
    #[cfg(feature = "tokio")]
    pub(crate) task: Option<Arc<tokio::sync::Notify>>,
    /// Under the async server: a turn stopped reading at the batch cap
    /// with frames left, so its task keeps the read readiness.
    pub(crate) read_more: AtomicBool,
    /// The last read turn stopped because the socket had no more of what
    /// the receiver needs (`poll_frame` said so, not a pause, a cap or the
    /// receive budget): only then may an edge-triggered driver clear its
    /// read readiness.
    pub(crate) read_drained: AtomicBool,
    /// The pool saw `EPOLLRDHUP` (reported once, edge-triggered): the
    /// peer's end is still to be read.
    pub(crate) peer_closed: AtomicBool,
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        token: u64,
        fd: Arc<OwnedFd>,
        peer: SocketAddr,
        receiver: Receiver,
        sender: Sender,
        sm: ServerConn<Arc<AtomicBool>>,
        outbound_max: usize,
    ) -> Conn {
        Conn {
            token,
            path: receiver.path(),
            fd,
            peer,
            receiver: Mutex::new(receiver),
            sender: Mutex::new(sender),
            outbox: Mutex::new(Vec::new()),
            core: Mutex::new(Core {
                sm,
                challenge: None,
                io: IoSnapshot::default(),
                deferred: Vec::new(),
                bytes_read: 0,
            }),
            owner: Mutex::new(Owner::default()),
            queued_out: AtomicUsize::new(0),
            awaiting_zc: AtomicBool::new(false),
            awaiting_credit: AtomicBool::new(false),
            outbound_max,
            closed: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            held_paused: AtomicBool::new(false),
            timeout_posted: AtomicBool::new(false),
            budget_wait: AtomicBool::new(false),
            open_limits: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            streams: Mutex::new(std::collections::HashMap::new()),
            peer_limits: Mutex::new(pagerpc_core::Limits::default()),
            peer_stream_window: std::sync::atomic::AtomicU64::new(
                pagerpc_core::conn::DEFAULT_STREAM_WINDOW,
            ),
            #[cfg(feature = "tokio")]
            task: None,
            read_more: AtomicBool::new(false),
            read_drained: AtomicBool::new(false),
            peer_closed: AtomicBool::new(false),
        }
    }

    /// Whether a task drives this connection (the async server).
    pub(crate) fn has_task(&self) -> bool {
        #[cfg(feature = "tokio")]
        {
            self.task.is_some()
        }
        #[cfg(not(feature = "tokio"))]
        {
            false
        }
    }

    /// Wakes the connection's task, if it has one.
    pub(crate) fn wake_task(&self) {
        #[cfg(feature = "tokio")]
        if let Some(n) = &self.task {
            n.notify_one();
        }
    }

    /// What the connection waits for now: `(read, write)`. Zero-copy
    /// completions and socket errors are always waited for. (The async
    /// server's task asks; the pool's edge-triggered readiness needs no
    /// interest set.)
    #[cfg(feature = "tokio")]
    pub(crate) fn interest(&self) -> (bool, bool) {
        // Waiting for completions: EPOLLERR (always reported) wakes us;
        // EPOLLOUT would report at once, again and again.
        let write = self.queued_out.load(Ordering::SeqCst) > 0
            && !self.awaiting_zc.load(Ordering::SeqCst)
            && !self.awaiting_credit.load(Ordering::SeqCst);
        (self.wants_read(), write)
    }

    /// Takes the events posted while nobody owned the connection (the
    /// async server's task, before it claims it).
    #[cfg(feature = "tokio")]
    pub(crate) fn take_posted(&self) -> Events {
        std::mem::take(&mut self.owner.lock().posted)
    }

    /// Whether the peer is not taking the responses queued for it.
    pub(crate) fn outbound_full(&self) -> bool {
        self.queued_out.load(Ordering::SeqCst) >= self.outbound_max
    }

    /// Whether reading is paused by this server's own budgets (so a frame
    /// stalled meanwhile is not the peer's fault).
    pub(crate) fn read_paused(&self) -> bool {
        self.held_paused.load(Ordering::SeqCst)
            || self.budget_wait.load(Ordering::SeqCst)
            || self.outbound_blocks_reading()
    }

    /// Whether queued responses stop reading: the queue is full and the
    /// peer is not taking it. While the queue waits for the peer's credit,
    /// reading goes on, since the credit arrives by reading (the calls read
    /// meanwhile are deferred, not run).
    pub(crate) fn outbound_blocks_reading(&self) -> bool {
        self.outbound_full() && !self.awaiting_credit.load(Ordering::SeqCst)
    }

    /// Whether the owner should read requests now.
    pub(crate) fn wants_read(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
            && !self.held_paused.load(Ordering::SeqCst)
            && !self.budget_wait.load(Ordering::SeqCst)
            && !self.outbound_blocks_reading()
    }

    /// Takes ownership of the connection's I/O for `ev`; if another thread
    /// owns it, hands `ev` to that thread and returns `false`.
    pub(crate) fn claim(&self, ev: Events) -> bool {
        let mut o = self.owner.lock();
        if o.busy {
            o.posted.merge(ev);
            false
        } else {
            o.busy = true;
            true
        }
    }

    /// Lets go of the connection, unless events were posted meanwhile
    /// (then returns them, and the caller keeps ownership). The pool's
    /// registration is edge-triggered and is touched again only when the
    /// turn left bytes in the socket that it may read now.
    pub(crate) fn release(&self, poller: &Poller) -> Option<Events> {
        let mut o = self.owner.lock();
        if o.posted.any() {
            return Some(std::mem::take(&mut o.posted));
        }
        o.busy = false;
        // (A task recomputes what it waits for after its turn.)
        if !self.has_task()
            && self.wants_read()
            && (!self.read_drained.swap(true, Ordering::SeqCst)
                || self.peer_closed.load(Ordering::SeqCst))
        {
            // The edge that brought this turn is used up, and the turn did
            // not read the socket dry (stopped by the batch cap, or
            // reading was paused and is allowed again), or the peer's end
            // is still to be read: have epoll report the socket's
            // readiness afresh. Once: what that reports (or a later edge)
            // brings the next read turn; a drained socket reports new
            // bytes with a new edge without this.
            self.arm(poller);
        }
        None
    }

    /// Asks for `ev` to be handled: by the owner if there is one, else by
    /// having epoll report the socket's readiness afresh, so that a pool
    /// thread is woken if it is ready.
    pub(crate) fn post(&self, poller: &Poller, ev: Events) {
        let mut o = self.owner.lock();
        if o.busy {
            o.posted.merge(ev);
        } else {
            if self.has_task() {
                // The task claims the connection and takes these.
                o.posted.merge(ev);
            }
            self.arm(poller);
        }
    }

    fn arm(&self, poller: &Poller) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        if self.has_task() {
            // The task recomputes its interest when woken.
            self.wake_task();
            return;
        }
        // Edge-triggered: modifying the registration makes epoll report
        // the socket's current readiness again.
        if poller
            .rearm(self.fd.as_fd(), self.token, sys::CONN_FLAGS)
            .is_err()
        {
            // Gone from the poller (closing): nothing to wait for.
        }
    }

    /// Queues a frame and writes what the socket takes now, unless
    /// another thread is writing (it takes this frame along). Never waits.
    /// Returns whether the connection must be woken for `EPOLLOUT` or
    /// because the queue fell below its budget.
    /// Puts a frame in the outbox without writing it: the next flush
    /// (of whichever thread) writes it with whatever else is there.
    pub(crate) fn hold(&self, frame: OutFrame) {
        self.outbox.lock().push(frame);
    }

    pub(crate) fn send(&self, frame: OutFrame) -> SendOutcome {
        self.outbox.lock().push(frame);
        self.flush()
    }

    /// Writes queued frames as far as the socket takes them.
    pub(crate) fn flush(&self) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        loop {
            let Some(mut tx) = self.sender.try_lock() else {
                return outcome;
            };
            let batch = std::mem::take(&mut *self.outbox.lock());
            let was_full = self.outbound_full();
            let before = tx.queued_bytes();
            if !batch.is_empty() {
                // Credit goes ahead of frames not started (one of which
                // may wait for the client's credit).
                let (urgent, batch): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|f| f.header.kind == pagerpc_core::Kind::Credit as i32);
                // Replies were checked against the client's limits, so a
                // failure here is the socket's (the sender is broken).
                if (!urgent.is_empty() && tx.enqueue_urgent(urgent).is_err())
                    || (!batch.is_empty() && tx.enqueue(batch).is_err())
                {
                    outcome.failed = true;
                }
            }
            let r = tx.flush();
            let after = tx.queued_bytes();
            self.queued_out.store(after, Ordering::SeqCst);
            self.awaiting_zc
                .store(tx.awaiting_completions(), Ordering::SeqCst);
            self.awaiting_credit
                .store(tx.awaiting_credit(), Ordering::SeqCst);
            drop(tx);
            match r {
                Ok(Flush::Done) => {}
                Ok(Flush::Blocked) => outcome.blocked = true,
                Err(_) => outcome.failed = true,
            }
            // The stall clock matters only while bytes wait: it starts when
            // the queue stops emptying at once, and moves with progress.
            if after > 0 && (after < before || before == 0) {
                self.core.lock().sm.on_sent(Instant::now());
            }
            if was_full && !self.outbound_full() {
                outcome.drained = true;
            }
            if self.outbox.lock().is_empty() {
                return outcome;
            }
        }
    }

    /// Whether frames wait in the outbox: queued by a thread that found
    /// the sender in use by someone who does not flush (the owner reaping
    /// completions). The owner flushes them.
    pub(crate) fn outbox_pending(&self) -> bool {
        !self.outbox.lock().is_empty()
    }

    /// Reads zero-copy completions; when there were none, takes the
    /// socket's pending error, if any. Frames queued meanwhile wait in
    /// the outbox (see [`outbox_pending`](Self::outbox_pending)).
    pub(crate) fn reap(&self) -> Option<std::io::Error> {
        let reaped = self.sender.lock().reap_completions();
        match reaped {
            Ok(n) if n > 0 => None,
            Ok(_) => sys::take_socket_error(self.fd.as_fd()),
            Err(e) => Some(e),
        }
    }

    /// The client announced its limits: replies and stream messages are
    /// checked against them from now on.
    pub(crate) fn set_peer_limits(&self, limits: pagerpc_core::Limits, conn_window: u64) {
        *self.peer_limits.lock() = limits;
        let mut tx = self.sender.lock();
        tx.set_limits(limits);
        if conn_window > 0 {
            tx.set_payload_window(conn_window);
        }
    }

    /// The client read `bytes` more of our payloads out of its socket.
    pub(crate) fn grant_credit(&self, bytes: u64) {
        self.sender.lock().grant_credit(bytes);
    }

    /// Closes the socket: aborts it (reset; the kernel drops queued data
    /// and lets go of zero-copy pages) when `abort` or when data is still
    /// queued, else shuts it down.
    pub(crate) fn shut(&self, abort: bool) {
        let mut tx = self.sender.lock();
        if abort || tx.has_queued() || tx.zerocopy_stats().pending_payloads > 0 {
            tx.abort();
        } else {
            sys::shutdown(self.fd.as_fd());
        }
        self.queued_out.store(0, Ordering::SeqCst);
    }
}

/// What a flush found.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SendOutcome {
    /// Bytes remain queued: wait for `EPOLLOUT`.
    pub(crate) blocked: bool,
    /// The queue fell below its budget: reading and deferred calls resume.
    pub(crate) drained: bool,
    /// The socket failed.
    pub(crate) failed: bool,
}
