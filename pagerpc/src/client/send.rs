//! The send path: requests bounded by their call's deadline, reading
//! responses while the socket takes no more, and CANCEL frames that never
//! wait.
//!
//! A request is sent by its caller, holding the sender lock throughout
//! ([`Shared::send_request`]). The sender writes without blocking; while
//! the socket takes no more, the caller waits for `POLLOUT`, and also for
//! `POLLIN` when nobody holds the reader role (then it reads what is there,
//! see `read.rs`), or for the `wake` eventfd when somebody does (raised
//! when the role is given back). `POLLERR` is reported regardless: the
//! caller then reads zero-copy completions.
//!
//! CANCEL and CREDIT frames are handed over in `State::control` and queued by whoever
//! holds the sender lock: the thread that cancels, if the lock is free;
//! otherwise the holder, when it lets go ([`Shared::release_sender`]). What
//! the socket does not take at once stays queued (`Shared::backlog`) for
//! the next request, or for the reader, which writes it after each frame it
//! reads.

use std::sync::atomic::Ordering::SeqCst;

use pagerpc_sender::{Flush, QueueMark, SendError, SendErrorKind};
use parking_lot::MutexGuard;

use super::*;

/// A CANCEL frame for call `id`.
pub(super) fn cancel_frame(id: u64) -> OutFrame {
    OutFrame {
        header: Header {
            call_id: id,
            kind: Kind::Cancel as i32,
            ..Default::default()
        },
        payload: Payload::Empty,
    }
}

/// Requests that were not sent, and why: the status, and the payloads
/// handed back.
pub(super) struct Unsent {
    pub(super) status: Status,
    pub(super) back: Back,
}

/// The payloads handed back with an [`Unsent`].
pub(super) enum Back {
    /// One per frame, in order (nothing was queued).
    All(Vec<Payload>),
    /// The non-empty payloads of the last frames that carry one, in
    /// order: frames are written in order, so what is not written is
    /// always the end of the batch.
    Tail(Vec<Payload>),
}

impl Unsent {
    /// The error for a batch of one frame.
    fn into_call_error(self) -> CallError {
        let p = match self.back {
            Back::All(mut v) | Back::Tail(mut v) => v.pop(),
        };
        match p {
            Some(p) => CallError::with_payload(self.status, p),
            None => CallError::new(self.status),
        }
    }

    /// One error per frame of a batch of `n` frames, whose payloads were
    /// empty where `empty[i]`: each with its own payload, if it came back.
    pub(super) fn split(self, empty: &[bool]) -> Vec<CallError> {
        let mut out: Vec<Option<Payload>> = Vec::with_capacity(empty.len());
        match self.back {
            Back::All(v) => out.extend(v.into_iter().map(Some)),
            Back::Tail(mut v) => {
                out.resize_with(empty.len(), || None);
                for (i, e) in empty.iter().enumerate().rev() {
                    if !e {
                        match v.pop() {
                            Some(p) => out[i] = Some(p),
                            None => break,
                        }
                    }
                }
            }
        }
        out.resize_with(empty.len(), || None);
        out.into_iter()
            .map(|p| match p {
                Some(p) => CallError::with_payload(self.status.clone(), p),
                None => CallError::new(self.status.clone()),
            })
            .collect()
    }
}

/// Why a send gives up before its request is written.
enum GiveUp {
    /// The call's deadline passed.
    Deadline,
    /// The socket took no byte for the write timeout.
    Stalled(Duration),
    /// The connection failed, with this status.
    Failed(Status),
}

impl Shared {
    /// Sends one request (or PING), giving up at `deadline`, including
    /// while waiting for another thread's send to finish.
    ///
    /// # Errors
    /// A [`CallError`] that hands the payload back when nothing of the
    /// frame was written ([`Code::DeadlineExceeded`](crate::Code::DeadlineExceeded) at the deadline, the
    /// connection staying usable), and fails the connection when the frame
    /// was cut short.
    pub(super) fn send_request(
        &self,
        frame: OutFrame,
        deadline: Option<Instant>,
    ) -> Result<(), CallError> {
        self.send_frames(vec![frame], deadline)
            .map_err(Unsent::into_call_error)
    }

    /// Sends `frames` (requests, PINGs, stream messages) as one batch,
    /// in order: queued together, so the socket gets them in as few
    /// writes as it takes (each separate payload still in its own
    /// `MSG_EOR` part). Gives up at `deadline`, including while waiting
    /// for another thread's send to finish.
    ///
    /// # Errors
    /// The status and the payloads handed back, as
    /// [`send_request`](Self::send_request).
    pub(super) fn send_frames(
        &self,
        frames: Vec<OutFrame>,
        deadline: Option<Instant>,
    ) -> Result<(), Unsent> {
        let mut tx = match deadline {
            None => self.sender.lock(),
            Some(d) => match self.sender.try_lock_until(d) {
                Some(tx) => tx,
                None => {
                    return Err(Unsent {
                        status: Status::deadline_exceeded(
                            "deadline exceeded before the request could be sent (another request was being sent)",
                        ),
                        back: Back::All(frames.into_iter().map(|f| f.payload).collect()),
                    })
                }
            },
        };
        let r = self.send_locked(&mut tx, frames, deadline);
        self.release_sender(tx);
        r
    }

    fn send_locked(
        &self,
        tx: &mut Sender,
        frames: Vec<OutFrame>,
        deadline: Option<Instant>,
    ) -> Result<(), Unsent> {
        // What is queued (CANCEL frames) goes first, as part of this send.
        self.backlog.store(false, SeqCst);
        self.drain_cancels(tx);
        self.update_limits(tx);
        let write_timeout = tx.config().write_timeout;
        // The request while it is not queued yet. Once queued, it can still
        // be taken back whole (`Sender::take_back`) until a byte of it is
        // written.
        let mut mine = Some(frames);
        let mark = tx.mark();
        let mut progress = Instant::now();
        loop {
            if let Some(f) = mine.take() {
                if let Err(e) = tx.enqueue(f) {
                    return Err(self.send_failed(tx, e, true));
                }
            }
            if tx.has_queued() {
                // Control frames handed over while we waited (credit owed
                // to the server goes ahead of our frame if it waits).
                self.drain_cancels(tx);
                self.update_limits(tx);
                let before = tx.queued_bytes();
                let r = tx.flush();
                if tx.queued_bytes() < before {
                    progress = Instant::now();
                }
                match r {
                    Ok(Flush::Done) if mine.is_none() => return Ok(()),
                    Ok(Flush::Done) if deadline.is_none() => continue,
                    Ok(_) => {}
                    Err(e) => return Err(self.send_failed(tx, e, false)),
                }
            } else if mine.is_none() {
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(self.give_up(tx, mark, mine, GiveUp::Deadline));
            }
            let stall = write_timeout.map(|t| (progress + t, t));
            if let Some((at, t)) = stall {
                if now >= at {
                    return Err(self.give_up(tx, mark, mine, GiveUp::Stalled(t)));
                }
            }
            let until = match (deadline, stall.map(|s| s.0)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if tx.awaiting_credit() {
                // The server's credit may already be read into the
                // receiver's buffer (behind a response another caller was
                // reading): hand out what is buffered before waiting for
                // the socket, which may never become readable again.
                self.read_available();
                if self.state.lock().conn_granted > 0 {
                    continue;
                }
            }
            match self.wait_socket(tx, until) {
                Ok(_) => {}
                Err(status) => return Err(self.give_up(tx, mark, mine, GiveUp::Failed(status))),
            }
        }
    }

    /// Waits until the socket is writable or `until` passes. Meanwhile:
    /// reads what arrives when nobody else holds the reader role, and
    /// zero-copy completions when the socket reports `POLLERR`.
    ///
    /// # Errors
    /// The status the connection failed with.
    fn wait_socket(
        &self,
        tx: &mut Sender,
        until: Option<Instant>,
    ) -> Result<sys::SendReady, Status> {
        let read = {
            let mut st = self.state.lock();
            if let Some(dead) = st.calls.dead() {
                return Err(dead.clone());
            }
            if self.control_waiting.load(SeqCst) {
                // Handed over before we set send_waiting: queue them now.
                return Ok(sys::SendReady::default());
            }
            st.send_waiting = true;
            !st.reader_active
        };
        // Without the reader role, wait for `wake` rather than POLLIN: the
        // socket stays readable until the reader reads, and the reader
        // raises `wake` when it gives the role back.
        let timeout = until.map(|u| u.saturating_duration_since(Instant::now()));
        // Waiting for completions (POLLERR) or for the server's credit
        // (read, or be woken by the reader that gets it): POLLOUT would
        // report at once, again and again.
        let write = !tx.awaiting_completions() && !tx.awaiting_credit();
        let r = sys::wait_send_ready(self.fd.as_fd(), write, read, self.wake.as_fd(), timeout);
        self.state.lock().send_waiting = false;
        let ready =
            r.map_err(|e| Status::unavailable(format!("waiting for the socket failed: {e}")))?;
        if ready.woken {
            self.wake.clear();
        }
        if ready.error {
            // Until the completions are read, the socket keeps reporting
            // POLLERR. A read error only delays their release.
            let _ = tx.reap_completions();
            if let Some(e) = sys::take_socket_error(self.fd.as_fd()) {
                return Err(Status::unavailable(format!("connection failed: {e}")));
            }
        }
        if ready.readable && !ready.writable {
            self.read_available();
        }
        Ok(ready)
    }

    /// Gives up on a request that is not fully written.
    fn give_up(
        &self,
        tx: &mut Sender,
        mark: QueueMark,
        mine: Option<Vec<OutFrame>>,
        why: GiveUp,
    ) -> Unsent {
        let (status, failed) = match why {
            GiveUp::Deadline => (
                Status::deadline_exceeded(
                    "deadline exceeded while sending the request (the server is not reading)",
                ),
                false,
            ),
            GiveUp::Stalled(t) => (
                Status::unavailable(format!(
                    "sending the request failed: the socket took no data for {t:?}"
                )),
                false,
            ),
            GiveUp::Failed(s) => (s, true),
        };
        if let Some(f) = mine {
            // Never queued, so nothing of it was written.
            if failed {
                self.fail_all(status.clone());
                sys::shutdown(self.fd.as_fd());
            } else if tx.has_queued() {
                self.backlog.store(true, SeqCst);
            }
            return Unsent {
                status,
                back: Back::All(f.into_iter().map(|f| f.payload).collect()),
            };
        }
        if !failed {
            if let Some(payloads) = tx.take_back(mark) {
                // Queued, but the kernel took none of it: out of the queue
                // again, whole, and the stream stays intact.
                if tx.has_queued() {
                    self.backlog.store(true, SeqCst);
                }
                return Unsent {
                    status,
                    back: Back::Tail(payloads),
                };
            }
        }
        // Part of it was written: the stream is broken.
        let broken = if failed {
            status.clone()
        } else {
            Status::unavailable(format!("connection broken: {}", status.message()))
        };
        Unsent {
            status,
            back: Back::Tail(self.break_stream(tx, broken)),
        }
    }

    /// The error for requests the sender refused (`queuing`: nothing of
    /// them was queued) or failed to write.
    fn send_failed(&self, tx: &mut Sender, e: SendError, queuing: bool) -> Unsent {
        let status = match &e.kind {
            SendErrorKind::Codec(c) => Status::invalid_argument(format!("request refused: {c}")),
            other => self.state.lock().calls.dead().cloned().unwrap_or_else(|| {
                Status::unavailable(format!("sending the request failed: {other}"))
            }),
        };
        if tx.is_broken() {
            self.fail_all(Status::unavailable(format!(
                "connection broken: {}",
                e.kind
            )));
            sys::shutdown(self.fd.as_fd());
        }
        // Refused while queuing: one payload per frame. Failed while
        // writing: what was not written, the end of the queue.
        let back = if queuing {
            Back::All(e.payloads)
        } else {
            Back::Tail(e.payloads.into_iter().filter(|p| !p.is_empty()).collect())
        };
        Unsent { status, back }
    }

    /// Fails the connection after a frame was cut short, and takes back
    /// what the sender still holds of the request (queued alone, so any
    /// payload is its own; a zero-copy payload the kernel may still read
    /// stays with the sender).
    fn break_stream(&self, tx: &mut Sender, status: Status) -> Vec<Payload> {
        self.fail_all(status);
        // The peer and a blocked reader see the end at once, and the next
        // write fails, which makes the sender hand back what it holds.
        sys::shutdown(self.fd.as_fd());
        match tx.flush() {
            Err(e) => e.payloads.into_iter().filter(|p| !p.is_empty()).collect(),
            Ok(_) => Vec::new(),
        }
    }

    /// Queues the CANCEL and CREDIT frames handed over in
    /// `State::control`.
    fn drain_cancels(&self, tx: &mut Sender) {
        if !self.control_waiting.swap(false, SeqCst) {
            return;
        }
        let (frames, credit) = {
            let mut st = self.state.lock();
            (
                std::mem::take(&mut st.control),
                std::mem::take(&mut st.conn_unreported),
            )
        };
        // Credit goes ahead of frames not started: one waiting for the
        // server's credit must not hold back the credit we owe it.
        let (urgent, frames): (Vec<_>, Vec<_>) = frames
            .into_iter()
            .chain((credit > 0).then(|| super::stream::credit_frame(0, credit)))
            .partition(|f| f.header.kind == Kind::Credit as i32);
        if !urgent.is_empty() {
            let _ = tx.enqueue_urgent(urgent);
        }
        if !frames.is_empty() {
            // Refused only once the stream is broken; the server then
            // forgets the calls anyway.
            let _ = tx.enqueue(frames);
        }
    }

    /// Checks what is sent from now on against the limits the server
    /// announced, once they arrived.
    fn update_limits(&self, tx: &mut Sender) {
        let mut st = self.state.lock();
        if std::mem::take(&mut st.peer_changed) {
            tx.set_limits(st.peer.limits);
            if st.peer.conn_window > 0 {
                tx.set_payload_window(st.peer.conn_window);
            }
        }
        let granted = std::mem::take(&mut st.conn_granted);
        if granted > 0 {
            tx.grant_credit(granted);
        }
    }

    /// Queues handed-over CANCEL frames and writes what is queued as far
    /// as the socket takes it, without waiting. For a holder of the sender
    /// lock that is not sending a request.
    fn flush_backlog(&self, tx: &mut Sender) {
        self.backlog.store(false, SeqCst);
        self.drain_cancels(tx);
        self.update_limits(tx);
        if !tx.has_queued() {
            return;
        }
        match tx.flush() {
            Ok(Flush::Done) => {}
            Ok(Flush::Blocked) => self.backlog.store(true, SeqCst),
            Err(e) => {
                if tx.is_broken() {
                    self.fail_all(Status::unavailable(format!(
                        "connection broken: {}",
                        e.kind
                    )));
                    sys::shutdown(self.fd.as_fd());
                }
            }
        }
    }

    /// Lets go of the sender lock. A CANCEL handed over while it was held
    /// is written now, unless another thread took the lock meanwhile (it
    /// does the same when it lets go).
    pub(super) fn release_sender(&self, tx: MutexGuard<'_, Sender>) {
        drop(tx);
        while self.control_waiting.load(SeqCst) {
            let Some(mut tx) = self.sender.try_lock() else {
                break;
            };
            self.flush_backlog(&mut tx);
        }
    }

    /// For the reader: writes queued CANCEL frames if the sender lock is
    /// free (never waits for it: the reader may hold the receiver).
    pub(super) fn poke_backlog(&self) {
        if !self.backlog.load(SeqCst) && !self.control_waiting.load(SeqCst) {
            return;
        }
        if let Some(mut tx) = self.sender.try_lock() {
            self.flush_backlog(&mut tx);
            self.release_sender(tx);
        } else {
            self.wake_sender();
        }
    }

    /// The sender lock is held by a thread that may be waiting for the
    /// socket (or for the server's credit): wake it, so it queues the
    /// control frames handed over (credit we owe the server must not wait
    /// behind a request that waits for the server's credit).
    fn wake_sender(&self) {
        if self.state.lock().send_waiting {
            self.wake.raise();
        }
    }

    /// Tells the server that call `id` is abandoned. Best effort, and never
    /// waits: the frame is written as far as the socket takes it now, and
    /// the rest later (see the module documentation).
    pub(super) fn send_cancel(&self, id: u64) {
        self.send_control(cancel_frame(id));
    }

    /// Hands a control frame (CANCEL, CREDIT, STREAM_END) over to be
    /// written without waiting, as [`send_cancel`](Self::send_cancel)
    /// does.
    pub(super) fn send_control(&self, frame: OutFrame) {
        {
            let mut st = self.state.lock();
            if st.calls.dead().is_some() {
                // The server forgets the call with the connection.
                return;
            }
            st.control.push(frame);
        }
        self.control_waiting.store(true, SeqCst);
        if let Some(mut tx) = self.sender.try_lock() {
            self.flush_backlog(&mut tx);
            self.release_sender(tx);
        } else {
            self.wake_sender();
        }
    }
}
