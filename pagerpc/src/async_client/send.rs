//! The send path: callers write their own frames without waiting; the
//! driver writes the rest on writable readiness.
//!
//! A frame goes into the [`Sender`] only when no other frame is left in it
//! (`Tx::last`); otherwise it waits in `Tx::backlog`. So until a frame's
//! first byte is written it can be taken back whole
//! ([`Shared::abandon`]): a request whose caller gives up (deadline,
//! dropped future, failed connection) before anything of it was written
//! comes back with its payload, and the server never hears of the call.
//!
//! Control frames (CANCEL, CREDIT) never wait behind requests: they go
//! out at the next frame boundary (`Sender::enqueue_urgent`). A CANCEL is
//! sent only for a call with nothing of its own left unstarted, so it can
//! never overtake its own call's frames.

use pagerpc_sender::{Flush, SendError, SendErrorKind};

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

impl Shared {
    /// Hands frame `frame` of call `id` to the sender and writes what the
    /// socket takes now, without waiting. The driver writes the rest.
    ///
    /// # Errors
    /// The connection is dead, or the sender refused the frame (a limit of
    /// the server's): the error hands the payload back.
    pub(super) fn submit(&self, id: u64, frame: OutFrame) -> Result<(), CallError> {
        let mut tx = self.tx.lock();
        {
            let mut st = self.state.lock();
            if let Some(dead) = st.calls.dead() {
                return Err(CallError::with_payload(dead.clone(), frame.payload));
            }
            match st.calls.get_mut(id) {
                Some(slot) => slot.submitted += 1,
                None => {
                    return Err(CallError::with_payload(
                        Status::cancelled("the call was cancelled"),
                        frame.payload,
                    ))
                }
            }
        }
        if tx.sender.queued_parts() > 0 || !tx.backlog.is_empty() {
            tx.backlog.push_back((id, frame));
            drop(tx);
            self.notify.notify_one();
            return Ok(());
        }
        let mark = tx.sender.mark();
        if let Err(e) = tx.sender.enqueue(vec![frame]) {
            return Err(self.refused(&mut tx, e));
        }
        tx.last = Some((id, mark));
        self.pump_locked(&mut tx);
        let queued = tx.sender.has_queued();
        drop(tx);
        if queued {
            self.notify.notify_one();
        }
        Ok(())
    }

    /// The error for a frame the sender refused at once.
    fn refused(&self, tx: &mut Tx, e: SendError) -> CallError {
        let status = match &e.kind {
            SendErrorKind::Codec(c) => Status::invalid_argument(format!("request refused: {c}")),
            other => self.dead().unwrap_or_else(|| {
                Status::unavailable(format!("sending the request failed: {other}"))
            }),
        };
        if tx.sender.is_broken() {
            self.broken(&e);
        }
        match e.payloads.into_iter().next() {
            Some(p) => CallError::with_payload(status, p),
            None => CallError::new(status),
        }
    }

    /// The stream to the server is broken: the connection fails.
    fn broken(&self, e: &SendError) {
        self.fail_all(Status::unavailable(format!(
            "connection broken: {}",
            e.kind
        )));
        sys::shutdown(self.fd.as_fd());
        self.notify.notify_one();
    }

    /// Writes what the sender holds and moves waiting frames into it, one
    /// at a time, until everything is written or the socket takes no more.
    /// Returns whether the driver must wait for writable readiness (not
    /// when the sender waits for the server's credit or for zero-copy
    /// completions: those come as readable and error readiness).
    pub(super) fn pump(&self) -> bool {
        let mut tx = self.tx.lock();
        let handed = std::mem::take(&mut self.state.lock().control);
        for frame in handed {
            self.control_locked(&mut tx, frame);
        }
        self.pump_locked(&mut tx)
    }

    /// Bytes the socket has taken from the sender, in all.
    pub(super) fn write_progress(&self) -> u64 {
        self.tx.lock().sender.progress()
    }

    pub(super) fn pump_locked(&self, tx: &mut Tx) -> bool {
        loop {
            if tx.sender.has_queued() {
                match tx.sender.flush() {
                    Ok(Flush::Done) => tx.last = None,
                    Ok(Flush::Blocked) => {
                        return !tx.sender.awaiting_credit() && !tx.sender.awaiting_completions()
                    }
                    Err(e) => {
                        tx.last = None;
                        self.broken(&e);
                        return false;
                    }
                }
            }
            let Some((id, frame)) = tx.backlog.pop_front() else {
                return false;
            };
            let mark = tx.sender.mark();
            match tx.sender.enqueue(vec![frame]) {
                Ok(()) => tx.last = Some((id, mark)),
                Err(e) => {
                    let err = self.refused(tx, e);
                    self.refuse_later(tx, id, err);
                }
            }
        }
    }

    /// A frame waiting in the backlog was refused by the sender: the call
    /// fails with the error (a unary caller gets the payload back), and a
    /// stream is ended on the server too.
    fn refuse_later(&self, tx: &mut Tx, id: u64, mut err: CallError) {
        let mut cancel = false;
        {
            let mut st = self.state.lock();
            let Some(slot) = st.calls.get_mut(id) else {
                return;
            };
            match slot.stream.as_mut() {
                Some(stream) => {
                    stream.end(Err(err.status().clone()));
                    cancel = true;
                }
                None => {
                    slot.refused = err.take_payload();
                    slot.result = Some(Err(err.status().clone()));
                }
            }
            slot.wake();
        }
        if cancel {
            // Written by the pump that refused the frame.
            let _ = tx.sender.enqueue_urgent(vec![cancel_frame(id)]);
        }
    }

    /// Queues a control frame (CANCEL, CREDIT) to go out at the next frame
    /// boundary and writes what the socket takes now. Never waits.
    /// Queues a control frame without waiting for the send half: a
    /// payload's release hook may call this while this very thread holds
    /// it (inside the sender, when it drops a sent page), so it never
    /// blocks on the lock; a held lock hands the frame to the driver.
    pub(super) fn send_control(&self, frame: OutFrame) {
        match self.tx.try_lock() {
            Some(mut tx) => self.control_locked(&mut tx, frame),
            None => {
                self.state.lock().control.push(frame);
                self.notify.notify_one();
            }
        }
    }

    pub(super) fn control_locked(&self, tx: &mut Tx, frame: OutFrame) {
        if self.dead().is_some() {
            // The server forgets the calls with the connection.
            return;
        }
        if tx.sender.enqueue_urgent(vec![frame]).is_err() {
            return;
        }
        self.pump_locked(tx);
        if tx.sender.has_queued() {
            self.notify.notify_one();
        }
    }

    /// Takes call `id`'s frames of which nothing was written out of the
    /// send path: returns how many, and the first one's payload.
    pub(super) fn take_unsent(&self, tx: &mut Tx, id: u64) -> (usize, Option<Payload>) {
        let mut n = 0;
        let mut first = None;
        if let Some((fid, mark)) = tx.last {
            if fid == id {
                if let Some(p) = tx.sender.take_back(mark) {
                    tx.last = None;
                    n += 1;
                    first = p.into_iter().next();
                }
            }
        }
        tx.backlog.retain_mut(|(fid, f)| {
            if *fid != id {
                return true;
            }
            n += 1;
            let p = std::mem::take(&mut f.payload);
            if first.is_none() {
                first = Some(p);
            }
            false
        });
        (n, first)
    }

    /// Tells the server call `id` is abandoned (a CANCEL, carrying `status`
    /// unless it is `Cancelled`), unless none of the `submitted` frames of
    /// it went out (`unsent` were taken back).
    pub(super) fn cancel_locked(
        &self,
        tx: &mut Tx,
        id: u64,
        submitted: usize,
        unsent: usize,
        status: Option<&Status>,
    ) {
        if unsent >= submitted {
            return;
        }
        let mut frame = cancel_frame(id);
        if let Some(s) = status.filter(|s| s.code() != crate::Code::Cancelled) {
            frame.header.status_code = s.code().as_u32();
            frame.header.status_message = s.message().to_owned();
        }
        self.control_locked(tx, frame);
    }

    /// Unary call `id` is over on the client's side (its caller gave up,
    /// or dropped the future): its request is taken back if nothing of it
    /// was written (the payload is returned), and otherwise the server
    /// gets a CANCEL. The call's slot is released.
    pub(super) fn abandon(&self, id: u64) -> Option<Payload> {
        let mut tx = self.tx.lock();
        let (unsent, first) = self.take_unsent(&mut tx, id);
        let slot = self.state.lock().calls.end(id);
        if let Some(slot) = &slot {
            self.cancel_locked(&mut tx, id, slot.submitted, unsent, None);
        }
        drop(tx);
        // The slot (and any frame it holds) is dropped outside the locks.
        drop(slot);
        first
    }

    /// Reads zero-copy completions (error readiness) and writes what waited
    /// for them.
    pub(super) fn reap(&self) {
        let mut tx = self.tx.lock();
        // A read error only delays the release.
        let _ = tx.sender.reap_completions();
    }
}
