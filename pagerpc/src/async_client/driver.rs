//! The driver task: one per connection, it owns reading.
//!
//! It waits on the socket's [`AsyncFd`] for readable and error readiness
//! always, and for writable readiness while the sender holds bytes the
//! socket did not take. Readiness keeps its flags:
//!
//! - **error**: zero-copy completions are reaped (or the socket's error
//!   taken, which fails the connection);
//! - **readable**: frames are read with `Receiver::poll_frame` (at most
//!   64 per turn) and handed to their calls through the sans-IO
//!   [`ClientConn`] exactly as the blocking client's reader does; once
//!   `poll_frame` says it needs more bytes, `Receiver::wait_lowat` sets
//!   `SO_RCVLOWAT` for what comes next and the readiness is cleared;
//! - **writable**: what callers left queued is written.
//!
//! tokio's readiness is edge-triggered: it is cleared only after an
//! operation found the socket drained (or full) *after* the event was
//! observed, never after a turn cut short by the batch cap. The receiver
//! skips a read that would find nothing when its last read came back short
//! (`Receiver::readable` makes it forget that at each event), or
//! bytes that arrived since would never be reported again. One more trap: mio reports `EPOLLOUT|EPOLLERR`
//! (a zero-copy completion on a writable socket) as *write closed*, which
//! tokio never clears; waiting for writable readiness would then return at
//! once forever. When the socket is full and that flag is set, the driver
//! registers the socket afresh, which resets it (epoll reports the
//! current state on registration, so nothing is missed).
//!
//! While it waits for writable readiness, the driver also watches the
//! write timeout (`SendConfig::write_timeout`, lack of progress as on the
//! blocking client): when the socket takes no byte of what is queued for
//! that long (the server stopped reading), the connection fails with
//! `Unavailable` and every call is told, instead of waiting for ever.

use std::sync::atomic::Ordering::SeqCst;

use tokio::io::Ready;

use pagerpc_core::conn::Incoming;
use pagerpc_receiver::{Receiver, RecvError};

use crate::stream_message::credit_frame;

use super::*;

/// Frames read per turn before the driver yields to other tasks.
const BATCH: usize = 64;

/// Connection credit owed to the server is sent once this much is owed
/// within one turn (and at the end of every turn).
const CREDIT_BATCH: u64 = 256 << 10;

/// What a read turn achieved.
enum Turn {
    /// The socket has no more bytes for now.
    Drained,
    /// The batch cap was reached; more may be there.
    More,
    /// The connection is over.
    Dead,
}

/// Runs the connection until it fails or the last client handle is
/// dropped; then every pending call fails and the socket is shut down.
pub(super) async fn run(shared: Arc<Shared>, mut rx: Receiver, afd: AsyncFd<sys::SockFd>) {
    let mut afd = Some(afd);
    let write_timeout = shared.cfg.send.write_timeout;
    // Bytes written in all when the socket last took some, and when.
    let mut progress: Option<(u64, tokio::time::Instant)> = None;
    let why = loop {
        if shared.closing.load(SeqCst) {
            break Status::cancelled("the AsyncClient was dropped");
        }
        if let Some(dead) = shared.dead() {
            break dead;
        }
        let want_write = shared.pump();
        let stall_at = match (want_write, write_timeout) {
            (true, Some(t)) => {
                let written = shared.write_progress();
                let now = tokio::time::Instant::now();
                let since = match progress {
                    Some((w, at)) if w == written => at,
                    _ => now,
                };
                progress = Some((written, since));
                if now >= since + t {
                    break Status::unavailable(format!(
                        "sending to the server failed: the socket took no data for {t:?}"
                    ));
                }
                Some(since + t)
            }
            _ => {
                progress = None;
                None
            }
        };
        let interest = if want_write {
            Interest::READABLE | Interest::WRITABLE | Interest::ERROR
        } else {
            Interest::READABLE | Interest::ERROR
        };
        let Some(fd) = afd.as_ref() else {
            break Status::unavailable("the socket could not be registered with the runtime");
        };
        let event = {
            let mut notified = std::pin::pin!(shared.notify.notified());
            let mut ready = std::pin::pin!(fd.ready(interest));
            let mut stall = std::pin::pin!(stall_at.map(tokio::time::sleep_until));
            poll_fn(|cx| {
                if notified.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                if let Some(s) = stall.as_mut().as_pin_mut() {
                    if s.poll(cx).is_ready() {
                        // Looked at again at the top of the loop.
                        return Poll::Ready(None);
                    }
                }
                ready.as_mut().poll(cx).map(Some)
            })
            .await
        };
        let mut guard = match event {
            None => continue,
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                break Status::unavailable(format!("waiting for the socket failed: {e}"))
            }
        };
        let ready = guard.ready();
        if ready.is_error() {
            shared.reap();
            if let Some(e) = sys::take_socket_error(shared.fd.as_fd()) {
                break Status::unavailable(format!("connection failed: {e}"));
            }
            guard.clear_ready_matching(Ready::ERROR);
        }
        let mut more = false;
        if ready.is_readable() || ready.is_read_closed() {
            // `poll_frame` returning `None` must mean the socket was found
            // empty after this event, not before it (see the module
            // documentation).
            rx.readable();
            match read_turn(&shared, &mut rx) {
                Turn::Drained => {
                    rx.wait_lowat();
                    guard.clear_ready_matching(Ready::READABLE);
                }
                Turn::More => more = true,
                Turn::Dead => continue,
            }
        }
        let mut reregister = false;
        if want_write && (ready.is_writable() || ready.is_write_closed()) && shared.pump() {
            // Still blocked: the socket is full.
            guard.clear_ready_matching(Ready::WRITABLE);
            reregister = ready.is_write_closed();
        }
        drop(guard);
        if reregister {
            // See the module documentation: reset the sticky flag.
            if let Some(old) = afd.take() {
                afd = sys::register_async(old.into_inner().into_fd()).ok();
            }
        }
        if more {
            tokio::task::yield_now().await;
        }
    };
    shared.fail_all(why);
    sys::shutdown(shared.fd.as_fd());
    drop(afd);
}

/// Reads and hands out up to [`BATCH`] frames.
fn read_turn(shared: &Shared, rx: &mut Receiver) -> Turn {
    let mut owed = 0;
    let mut turn = Turn::More;
    for _ in 0..BATCH {
        let r = match rx.poll_frame() {
            Ok(None) => {
                turn = Turn::Drained;
                break;
            }
            Ok(Some(f)) => Ok(f),
            Err(e) => Err(e),
        };
        if !shared.dispatch(r, &mut owed) {
            turn = Turn::Dead;
            break;
        }
        if owed >= CREDIT_BATCH {
            shared.send_control(credit_frame(0, std::mem::take(&mut owed)));
        }
    }
    if owed > 0 {
        shared.send_control(credit_frame(0, owed));
    }
    turn
}

impl Shared {
    /// Hands one received frame (or receive error) to its call; `false`
    /// once the connection is over. Separate payload bytes read are added
    /// to `owed` (connection credit for the server).
    fn dispatch(&self, r: Result<Frame, RecvError>, owed: &mut u64) -> bool {
        let frame = match r {
            Ok(frame) => frame,
            Err(RecvError::ChecksumMismatch {
                head,
                expected,
                got,
            }) => {
                // The stream is still in sync: fail just this call.
                self.deliver(
                    head.call_id(),
                    Err(Status::data_loss(format!(
                        "response payload failed its checksum (CRC32C {got:#010x}, expected {expected:#010x})"
                    ))),
                );
                return true;
            }
            Err(e) => {
                let status = match &e {
                    RecvError::Closed => Status::unavailable("connection closed by the server"),
                    RecvError::Codec(c @ pagerpc_core::CodecError::Truncated { .. }) => {
                        Status::unavailable(format!("connection lost: {c}"))
                    }
                    RecvError::Codec(c) => {
                        Status::internal(format!("protocol error from server: {c}"))
                    }
                    other => Status::unavailable(format!("connection failed: {other}")),
                };
                self.fail_all(status);
                return false;
            }
        };
        if self.cfg.conn_window > 0 && !frame.head.inline_payload() {
            *owed += frame.head.payload_len();
        }
        // What the frame means is the state machine's call.
        let incoming = self.state.lock().calls.on_frame(&frame.head);
        match incoming {
            Incoming::Answer { call_id, result } | Incoming::StreamEnd { call_id, result } => {
                self.deliver(call_id, result.map(|()| frame));
            }
            Incoming::StreamMessage { call_id } => self.stream_message(call_id, frame),
            Incoming::Credit { call_id: 0, credit } => {
                // The server read our payloads: what waited for its credit
                // may go now.
                let mut tx = self.tx.lock();
                tx.sender.grant_credit(credit);
                self.pump_locked(&mut tx);
            }
            Incoming::Credit { call_id, credit } => self.stream_credit(call_id, credit),
            Incoming::Settings => match PeerSettings::decode(&frame.head.header.body) {
                Ok(peer) => {
                    let mut tx = self.tx.lock();
                    tx.sender.set_limits(peer.limits);
                    if peer.conn_window > 0 {
                        tx.sender.set_payload_window(peer.conn_window);
                    }
                    self.state.lock().peer = peer;
                }
                Err(e) => {
                    self.fail_all(Status::internal(format!(
                        "protocol error: undecodable SETTINGS from the server: {e}"
                    )));
                    return false;
                }
            },
            Incoming::Dead { status, shutdown } => {
                self.fail_all(status);
                if shutdown {
                    sys::shutdown(self.fd.as_fd());
                }
                return false;
            }
            // Incoming is non_exhaustive.
            _ => {
                self.fail_all(Status::internal("protocol error: unexpected frame"));
                return false;
            }
        }
        true
    }

    /// Hands a call its answer (a unary call's response, or how a stream
    /// ended). Answers to calls that gave up are dropped.
    fn deliver(&self, id: u64, r: Result<Frame, Status>) {
        let mut st = self.state.lock();
        let Some(slot) = st.calls.get_mut(id) else {
            drop(st);
            return;
        };
        match slot.stream.as_mut() {
            Some(stream) => stream.end(r),
            None => slot.result = Some(r),
        }
        slot.wake();
    }
}
