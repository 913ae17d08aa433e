//! The reader role: reading frames and handing them to their calls.
//!
//! One thread at a time holds the role (`State::reader_active`) and with it
//! the receiver. A waiting caller reads, blocking, until its own response
//! arrives ([`Shared::read_until`]); a sending caller whose socket is full
//! reads only what is there, without blocking ([`Shared::read_available`]).
//! Both hand frames out the same way ([`Shared::dispatch`]) and give the
//! role back the same way ([`Shared::release_reader`]).

use super::*;
use pagerpc_core::conn::PeerSettings;

/// What became of one frame (or receive error).
pub(super) enum Dispatched {
    /// It went to (or was dropped for) the call with this id; the
    /// connection goes on.
    Call(u64),
    /// Nothing more to read now: the read timed out, or the connection
    /// failed (every call was told).
    Stop,
}

impl Shared {
    /// Reads frames and hands them out until call `id` has its result, the
    /// deadline passes, or the connection fails. The caller holds the
    /// reader role.
    pub(super) fn read_until(&self, id: u64, deadline: Option<Instant>) {
        let mut rx = self.receiver.lock();
        // CANCEL frames left queued while the socket was full: the socket
        // may take them now.
        self.poke_backlog();
        loop {
            let r = rx.recv_frame(deadline);
            match self.dispatch(r) {
                Dispatched::Call(fid) => {
                    self.poke_backlog();
                    if fid == id {
                        // Hand out the responses already read along with
                        // ours (never another syscall for them), so a
                        // thread with many calls in flight finds them
                        // ready and starts the next ones together.
                        while rx.buffered_bytes() > 0 {
                            let r = match rx.poll_frame() {
                                Ok(None) => break,
                                Ok(Some(frame)) => Ok(frame),
                                Err(e) => Err(e),
                            };
                            if let Dispatched::Stop = self.dispatch(r) {
                                return;
                            }
                        }
                        self.poke_backlog();
                        return;
                    }
                }
                Dispatched::Stop => return,
            }
        }
    }

    /// Takes the reader role if nobody holds it, and reads and hands out
    /// what the socket has, without blocking. For a sending thread whose
    /// socket is full: the peer may be waiting for its responses to be read
    /// before it reads any more requests.
    pub(super) fn read_available(&self) {
        {
            let mut st = self.state.lock();
            if st.reader_active || st.calls.dead().is_some() {
                return;
            }
            st.reader_active = true;
        }
        {
            let mut rx = self.receiver.lock();
            loop {
                let r = match rx.poll_frame() {
                    Ok(None) => break,
                    Ok(Some(frame)) => Ok(frame),
                    Err(e) => Err(e),
                };
                if let Dispatched::Stop = self.dispatch(r) {
                    break;
                }
            }
            // Set SO_RCVLOWAT for what the receiver needs next, so the
            // socket reports readable once that much is there.
            rx.wait_lowat();
        }
        let mut st = self.state.lock();
        self.release_reader(&mut st);
    }

    /// Gives the reader role back and hands it on: wakes every blocked
    /// caller, and the first to run takes it. Waking just one is not
    /// enough: it may be giving up at this very moment (its deadline
    /// passed) and would leave the others with nobody reading. A sending
    /// thread waiting for the socket is woken too: it may read now.
    pub(super) fn release_reader(&self, st: &mut State) {
        st.reader_active = false;
        for other in st.calls.tokens().filter(|s| s.waiting) {
            other.cv.notify_one();
        }
        if st.send_waiting {
            self.wake.raise();
        }
    }

    /// A separate payload of `bytes` was read out of the socket: give the
    /// server connection credit for it (queued like a CANCEL, written by
    /// whoever holds the sender lock).
    fn payload_read(&self, bytes: u64) {
        if self.cfg.conn_window == 0 {
            return;
        }
        self.state.lock().conn_unreported += bytes;
        self.control_waiting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.poke_backlog();
    }

    /// Hands one received frame (or receive error) to its call, or fails
    /// the connection.
    pub(super) fn dispatch(&self, r: Result<Frame, RecvError>) -> Dispatched {
        match r {
            Ok(frame) => {
                if !frame.head.inline_payload() && frame.head.payload_len() > 0 {
                    self.payload_read(frame.head.payload_len());
                }
                // What the frame means is the state machine's call.
                let incoming = self.state.lock().calls.on_frame(&frame.head);
                match incoming {
                    Incoming::Answer { call_id, result } => {
                        self.deliver(call_id, result.map(|()| frame));
                        Dispatched::Call(call_id)
                    }
                    Incoming::StreamMessage { call_id } => {
                        self.stream_message(call_id, frame);
                        Dispatched::Call(call_id)
                    }
                    Incoming::StreamEnd { call_id, result } => {
                        self.deliver(call_id, result.map(|()| frame));
                        Dispatched::Call(call_id)
                    }
                    Incoming::Credit { call_id, credit } => {
                        self.stream_credit(call_id, credit);
                        Dispatched::Call(call_id)
                    }
                    Incoming::Settings => {
                        match PeerSettings::decode(&frame.head.header.body) {
                            Ok(peer) => {
                                let mut st = self.state.lock();
                                st.peer = peer;
                                st.peer_changed = true;
                            }
                            Err(e) => {
                                self.fail_all(Status::internal(format!(
                                    "protocol error: undecodable SETTINGS from the server: {e}"
                                )));
                                sys::shutdown(self.fd.as_fd());
                                return Dispatched::Stop;
                            }
                        }
                        Dispatched::Call(0)
                    }
                    Incoming::Dead { status, shutdown } => {
                        self.fail_all(status);
                        if shutdown {
                            sys::shutdown(self.fd.as_fd());
                        }
                        Dispatched::Stop
                    }
                    // Incoming is non_exhaustive.
                    _ => Dispatched::Stop,
                }
            }
            Err(RecvError::TimedOut) => Dispatched::Stop,
            Err(RecvError::ChecksumMismatch {
                head,
                expected,
                got,
            }) => {
                // The stream is still in sync: fail just this call.
                let fid = head.call_id();
                self.deliver(
                    fid,
                    Err(Status::data_loss(format!(
                        "response payload failed its checksum (CRC32C {got:#010x}, expected {expected:#010x})"
                    ))),
                );
                Dispatched::Call(fid)
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
                Dispatched::Stop
            }
        }
    }
}
