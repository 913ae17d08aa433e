//! The pool threads: readiness events, reading requests, running calls.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagerpc_core::conn::{ConnConfig, IoSnapshot, PeerSettings, Refusal, ServerConn, Timeout};
use pagerpc_core::{Code, CodecError, Counters, Kind, Status};

use super::stream::credit_frame;
use pagerpc_pages::Pages;
use pagerpc_receiver::{Frame, Receiver, RecvError};
use pagerpc_sender::Sender;

use super::conn::{Conn, Events, Job};
use super::context::{Context, Handler, RawHandler, Reply};
use super::reply::{control_frame, error_frame, response_frame};
use super::{Shared, Work, DISPATCH_BATCH, TOKEN_JOBS, TOKEN_LISTENER, TOKEN_STOP};
use crate::auth;
use crate::sys;
use crate::trace::{self, CallTrace, Side};

impl Shared {
    pub(crate) fn run(self: Arc<Self>) {
        // Whether readiness was polled since queued work last ran: work
        // that queues itself again (a connection with more to read) must
        // not keep this thread from the other sockets' readiness.
        let mut polled = true;
        loop {
            let queued = self.going_idle();
            if queued && polled {
                // Work queued while this thread was busy: no need to wait.
                polled = false;
                self.run_queued();
                continue;
            }
            // With work queued, only a look at what is ready.
            let r = self
                .poller
                .wait_one(queued.then_some(std::time::Duration::ZERO));
            if !queued {
                self.woke();
            }
            polled = true;
            let ready = match r {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(_) => return,
            };
            match ready.token {
                TOKEN_STOP => return,
                TOKEN_LISTENER => self.accept_all(),
                TOKEN_JOBS => {
                    self.wake_taken();
                    self.run_queued();
                }
                t => {
                    let conn = self.conns.lock().get(&t).cloned();
                    if let Some(conn) = conn {
                        if ready.read_closed {
                            // Reported once (edge-triggered): remembered
                            // until the end is read.
                            conn.peer_closed.store(true, Ordering::SeqCst);
                        }
                        let ev = Events {
                            read: ready.readable,
                            write: ready.writable,
                            error: ready.error,
                            hangup: ready.hangup,
                            timeout: false,
                        };
                        self.drive(&conn, ev);
                    }
                }
            }
        }
    }

    /// Takes queued work, one item at a time, waking another idle thread
    /// while more is queued, so one blocking handler never holds up the
    /// jobs behind it. At most what is queued now: work that queues itself
    /// again (a connection with more to read) must not keep this thread
    /// from the sockets' readiness. Answers of quick calls run back to
    /// back are written together (`batching.rs`).
    fn run_queued(self: &Arc<Self>) {
        if self.cfg.threads >= 2 {
            // With one thread, nobody could write answers held behind a
            // call that blocks (see `batching.rs`).
            self.hold_answers();
        }
        let mut budget = self.jobs_rx.len().max(1);
        while budget > 0 {
            let Ok(work) = self.jobs_rx.try_recv() else {
                break;
            };
            budget -= 1;
            if !self.jobs_rx.is_empty() {
                self.wake_pool();
            }
            match work {
                Work::Call(job) => self.run_job(*job),
                Work::Conn(conn, ev) => {
                    self.write_held();
                    self.drive(&conn, ev);
                }
                Work::Accept => self.rearm_listener(),
            }
        }
        self.release_answers();
    }

    /// Hands work for a connection to a pool thread.
    pub(crate) fn post_work(&self, conn: &Arc<Conn>, ev: Events) {
        if conn.has_task() {
            // The async server: the connection's task takes them.
            conn.post(&self.poller, ev);
            return;
        }
        if !conn.closed.load(Ordering::SeqCst) {
            let _ = self.jobs_tx.send(Work::Conn(conn.clone(), ev));
            self.wake_pool();
        }
    }

    /// Owns the connection for `ev` (and whatever is posted meanwhile),
    /// then runs the first call read, if any.
    pub(crate) fn drive(self: &Arc<Self>, conn: &Arc<Conn>, ev: Events) {
        // (The async server's connection task calls this too.)
        if conn.claim(ev) {
            self.drive_owned(conn, ev);
        }
    }

    /// As [`drive`](Self::drive), for a thread that already owns `conn`.
    fn drive_owned(self: &Arc<Self>, conn: &Arc<Conn>, ev: Events) {
        if let Some(job) = self.drive_owned_turns(conn, ev) {
            self.run_job(job);
        }
    }

    /// The turns of [`drive_owned`](Self::drive_owned), until the
    /// connection is let go; returns the first call read, for the caller
    /// to run or queue.
    fn drive_owned_turns(self: &Arc<Self>, conn: &Arc<Conn>, ev: Events) -> Option<Job> {
        let mut ev = ev;
        let mut mine = None;
        loop {
            if !conn.closed.load(Ordering::SeqCst) {
                self.turn(conn, ev, &mut mine);
            }
            match conn.release(&self.poller) {
                Some(more) => ev = more,
                None => break,
            }
        }
        mine
    }

    /// One turn of the owner: completions, writes, timeouts, reads.
    fn turn(self: &Arc<Self>, conn: &Arc<Conn>, ev: Events, mine: &mut Option<Job>) {
        let now = Instant::now();
        if ev.error {
            if let Some(e) = conn.reap() {
                self.close_because(conn, None, true, &format_args!("socket error: {e}"));
                return;
            }
        }
        // Frames that reached the outbox while the sender was held above
        // (reaping) are written here, or nobody would write them.
        if ev.write || conn.queued_out.load(Ordering::SeqCst) > 0 || conn.outbox_pending() {
            let out = conn.flush();
            if out.failed {
                self.close_because(conn, None, true, &"sending to the peer failed");
                return;
            }
            if out.drained {
                self.undefer(conn);
            }
        }
        if conn.evicted.load(Ordering::SeqCst) {
            let status = Status::unavailable(format!(
                "closed to make room: more than max_unauthenticated = {} connections had not authenticated",
                self.cfg.max_unauthenticated.min(self.cfg.max_connections)
            ));
            self.close(conn, Some(status), false);
            return;
        }
        if ev.timeout {
            conn.timeout_posted.store(false, Ordering::SeqCst);
            let fired = {
                let mut core = conn.core.lock();
                core.io.queued_out = conn.queued_out.load(Ordering::SeqCst);
                let io = core.io;
                core.sm.handle_timeout(now, &io)
            };
            if let Some(t) = fired {
                let status = match t {
                    Timeout::Idle { .. } => Status::unavailable(format!("{t}, closing")),
                    _ => Status::deadline_exceeded(format!("{t}, closing")),
                };
                let abort = matches!(t, Timeout::SendStalled { .. });
                self.close(conn, Some(status), abort);
                return;
            }
        }
        if ev.hangup && !ev.read {
            self.close_because(conn, None, true, &"the peer hung up");
            return;
        }
        if ev.read || ev.hangup {
            self.read(conn, now, mine);
        }
    }

    /// Reads up to a batch of frames, classifying each.
    fn read(self: &Arc<Self>, conn: &Arc<Conn>, now: Instant, mine: &mut Option<Job>) {
        let mut failure = None;
        let mut frames = 0;
        let mut dispatched = 0;
        let mut more = false;
        let mut drained = false;
        let mut eof_tried = false;
        let mut rx = conn.receiver.lock();
        // Edge-triggered readiness (both servers): this turn must read what
        // arrived, even if the last read came back short.
        rx.readable();
        conn.budget_wait.store(false, Ordering::SeqCst);
        // Separate payload bytes taken out of the socket this turn: given
        // back to the client as connection credit when the turn ends.
        let mut credit = 0u64;
        loop {
            if conn.held_paused.load(Ordering::SeqCst) || conn.outbound_blocks_reading() {
                break;
            }
            if frames == DISPATCH_BATCH {
                // Fairness: let other connections and queued calls run
                // before reading more of this one. What is still in the
                // socket makes epoll report it again; what the receiver
                // already buffered needs a turn of its own.
                more = rx.buffered_bytes() > 0;
                if conn.has_task() {
                    // The task's readiness is edge-triggered: it keeps
                    // the read readiness and comes back after a yield.
                    conn.read_more.store(true, Ordering::SeqCst);
                    more = false;
                }
                break;
            }
            match rx.poll_frame() {
                Ok(Some(frame)) => {
                    frames += 1;
                    if !frame.head.inline_payload() {
                        credit += frame.head.payload_len();
                    }
                    let job = self.classify(conn, frame, now);
                    if conn.open_limits.swap(false, Ordering::SeqCst) {
                        rx.set_limits(self.cfg.limits);
                    }
                    if let Some(job) = job {
                        if self.over_held_cap(conn) {
                            // Backpressure: stop reading this connection
                            // until its consumers release pages (a release
                            // that came first is caught by the re-check).
                            conn.held_paused.store(true, Ordering::SeqCst);
                            if !self.over_held_cap(conn) {
                                conn.held_paused.store(false, Ordering::SeqCst);
                            }
                        }
                        if mine.is_none() && !self.is_async() {
                            *mine = Some(job);
                        } else {
                            self.queue_call(job);
                            dispatched += 1;
                        }
                    }
                    if conn.closed.load(Ordering::SeqCst) {
                        return;
                    }
                }
                Ok(None) if conn.peer_closed.load(Ordering::SeqCst) && !eof_tried => {
                    // A short read says nothing more is there for now, but
                    // the peer's end is: read once more to see it (its
                    // edge-triggered report came already).
                    eof_tried = true;
                    rx.readable();
                }
                Ok(None) => {
                    drained = true;
                    break;
                }
                Err(RecvError::ChecksumMismatch {
                    head,
                    expected,
                    got,
                }) => {
                    // The payload is discarded, never handed to a handler;
                    // the stream is still in sync.
                    frames += 1;
                    if head.kind() == Kind::Request {
                        self.send(
                            conn,
                            error_frame(
                                head.call_id(),
                                &Status::data_loss(format!(
                                    "request payload failed its checksum (CRC32C {got:#010x}, expected {expected:#010x})"
                                )),
                            ),
                        );
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if dispatched > 0 && !self.is_async() {
            self.wake_pool();
        }
        if failure.is_none() {
            rx.wait_lowat();
        }
        if credit > 0 && self.cfg.conn_window > 0 && !conn.closed.load(Ordering::SeqCst) {
            self.send(conn, credit_frame(0, credit));
        } else if rx.has_payload_send_request() && !conn.closed.load(Ordering::SeqCst) {
            // Backend::Auto asks the client to write its payloads another
            // way: the sender writes the request when it flushes.
            self.flush_out(conn);
        }
        let awaiting = rx.awaiting_budget();
        conn.read_drained
            .store(drained && !awaiting, Ordering::SeqCst);
        if awaiting {
            // The next payload does not fit the server's receive budget:
            // stop reading until a release wakes this connection.
            conn.budget_wait.store(true, Ordering::SeqCst);
            self.budget.wait(conn);
        }
        let read_now = rx.progress();
        let io = IoSnapshot {
            in_head: rx.in_head(),
            in_frame: !rx.is_idle(),
            read_paused: conn.read_paused(),
            queued_out: conn.queued_out.load(Ordering::SeqCst),
        };
        drop(rx);
        {
            let mut core = conn.core.lock();
            if read_now != core.bytes_read || frames > 0 {
                core.bytes_read = read_now;
                core.sm.on_received(now, frames);
            }
            core.sm.on_head(now, io.in_head);
            core.io = io;
        }
        if more {
            self.post_work(
                conn,
                Events {
                    read: true,
                    ..Events::default()
                },
            );
        }
        if let Some(e) = failure {
            if let RecvError::Codec(CodecError::UnsupportedVersion { got: 1, supported }) = &e {
                // A version-1 peer cannot read a version-2 ERROR: answer in
                // its own framing, so it reports why instead of waiting.
                let why = format!(
                    "this server speaks pagerpc wire version {supported}, not version 1; upgrade the client"
                );
                sys::send_now(
                    conn.fd.as_fd(),
                    &pagerpc_core::encode_v1_error(Code::FailedPrecondition.as_u32(), &why),
                );
                self.close(conn, None, false);
                return;
            }
            let notice = match &e {
                RecvError::Codec(c) if !matches!(c, CodecError::Truncated { .. }) => Some(
                    Status::invalid_argument(format!("protocol error, closing: {c}")),
                ),
                _ => None,
            };
            self.close_because(conn, notice, false, &e);
        }
    }

    /// Queues a frame for the peer and makes sure it goes out.
    pub(crate) fn send(&self, conn: &Arc<Conn>, frame: pagerpc_sender::OutFrame) {
        let out = conn.send(frame);
        self.after_write(conn, out);
    }

    /// Writes what the connection's outbox holds.
    pub(crate) fn flush_out(&self, conn: &Arc<Conn>) {
        let out = conn.flush();
        self.after_write(conn, out);
    }

    /// What follows a write: a failed socket is shut, a queue that
    /// drained lets deferred calls run, and what is left waits for
    /// `EPOLLOUT`.
    fn after_write(&self, conn: &Arc<Conn>, out: super::conn::SendOutcome) {
        if out.failed {
            // Nothing more can be sent: the owner sees the socket close.
            sys::shutdown(conn.fd.as_fd());
        }
        if out.drained {
            self.undefer(conn);
        }
        if out.blocked || out.drained {
            conn.post(
                &self.poller,
                Events {
                    write: true,
                    ..Events::default()
                },
            );
        }
    }

    /// Turns a frame into a job (requests) or handles it on the spot.
    fn classify(self: &Arc<Self>, conn: &Arc<Conn>, mut frame: Frame, now: Instant) -> Option<Job> {
        let id = frame.head.call_id();
        let challenge = conn.core.lock().challenge;
        if let (Some(nonce), Some(key)) = (challenge, &self.cfg.auth_key) {
            // Nothing is dispatched before the peer proves it holds the key.
            let refusal = if frame.head.kind() != Kind::Auth {
                Some(format!(
                    "this server requires pre-shared-key authentication; the client sent a {:?} frame instead",
                    frame.head.kind()
                ))
            } else if let Some(client_nonce) =
                auth::verify_client(key, &nonce, &frame.head.header.body)
            {
                let proof = auth::server_proof(key, &nonce, client_nonce);
                {
                    let mut core = conn.core.lock();
                    core.challenge = None;
                    core.sm.authenticated();
                }
                conn.open_limits.store(true, Ordering::SeqCst);
                self.unauthenticated
                    .lock()
                    .retain(|w| w.upgrade().is_some_and(|c| !Arc::ptr_eq(&c, conn)));
                self.send(conn, control_frame(0, Kind::Auth, proof));
                self.send(conn, self.settings_frame());
                None
            } else {
                Some(
                    "authentication failed: the client's proof does not match the pre-shared key"
                        .into(),
                )
            };
            if let Some(why) = refusal {
                self.close(conn, Some(Status::unauthenticated(why)), false);
            }
            return None;
        }
        match frame.head.kind() {
            Kind::Request => {
                if self.shutting_down.load(Ordering::SeqCst) {
                    self.send(
                        conn,
                        error_frame(id, &Status::unavailable("server is shutting down")),
                    );
                    return None;
                }
                let cancelled = Arc::new(AtomicBool::new(false));
                let admitted = conn.core.lock().sm.admit(id, cancelled.clone());
                if let Err(r) = admitted {
                    let status = match r {
                        Refusal::TooManyInflight { .. } => {
                            Status::resource_exhausted(r.to_string())
                        }
                        Refusal::NotAuthenticated => Status::unauthenticated(r.to_string()),
                        _ => Status::invalid_argument(format!("request refused: {r}")),
                    };
                    // A refused id-0 request is answered on id 0, which the
                    // client reads as a connection-level error: close.
                    if id == 0 {
                        self.close(conn, Some(status), false);
                    } else {
                        self.send(conn, error_frame(id, &status));
                    }
                    return None;
                }
                *self.inflight.lock() += 1;
                if let Some((shape, handler)) = self.stream_handlers.get(&frame.head.header.method)
                {
                    let opened =
                        self.open_stream(conn, frame, *shape, handler.clone(), cancelled, now);
                    if let Err(status) = opened {
                        self.send(conn, error_frame(id, &status));
                        self.finish_call(conn, id);
                    }
                    return None;
                }
                if frame.head.header.client_stream {
                    let method = frame.head.header.method.clone();
                    let status = if self.handlers.contains_key(&method) {
                        Status::invalid_argument(format!(
                            "method '{method}' is unary: the request must not set client_stream"
                        ))
                    } else {
                        Status::unimplemented(format!("unknown method '{method}'"))
                    };
                    self.send(conn, error_frame(id, &status));
                    self.finish_call(conn, id);
                    return None;
                }
                self.charge(conn, &mut frame.payload);
                Some(Job {
                    conn: conn.clone(),
                    frame,
                    received: now,
                    cancelled,
                })
            }
            Kind::Cancel => {
                if let Some(flag) = conn.core.lock().sm.cancel(id) {
                    flag.store(true, Ordering::Relaxed);
                }
                let stream = conn.streams.lock().get(&id).cloned();
                if let Some(stream) = stream {
                    let h = &frame.head.header;
                    stream.cancel(if h.status_code == 0 {
                        Status::cancelled("the client cancelled the stream")
                    } else {
                        Status::new(Code::from_u32(h.status_code), h.status_message.clone())
                    });
                }
                None
            }
            Kind::Settings => {
                match PeerSettings::decode(&frame.head.header.body) {
                    Ok(peer) => {
                        conn.peer_stream_window
                            .store(peer.stream_window, Ordering::SeqCst);
                        conn.set_peer_limits(peer.limits, peer.conn_window);
                    }
                    Err(e) => self.close(
                        conn,
                        Some(Status::invalid_argument(format!(
                            "protocol error, closing: undecodable SETTINGS: {e}"
                        ))),
                        false,
                    ),
                }
                None
            }
            Kind::Ping => {
                self.send(conn, control_frame(id, Kind::Pong, Vec::new()));
                None
            }
            Kind::StreamChunk | Kind::StreamEnd | Kind::Credit => {
                self.stream_frame(conn, frame);
                None
            }
            Kind::Response | Kind::Error | Kind::Pong | Kind::Auth | Kind::Unspecified => {
                // Frames only a server sends: the peer is confused. Answer and
                // carry on; this does not desynchronise the stream.
                self.send(
                    conn,
                    error_frame(
                        id,
                        &Status::invalid_argument(format!(
                            "a client may not send {:?} frames",
                            frame.head.kind()
                        )),
                    ),
                );
                None
            }
        }
    }

    /// Runs a call: on a pool thread (blocking server) or, for the async
    /// server, as a task (`run_job_async`).
    pub(crate) fn run_job(&self, job: Job) {
        let Some((call, start)) = self.start_call(job) else {
            return;
        };
        let result = match start {
            CallStart::Answer(result) => result,
            CallStart::Run(Handler::Sync(handler), ctx, body, pages) => {
                if !self.costs.quick(&ctx.method) || !self.pool_thread_idle() {
                    // It may take long, or nobody else could write what is
                    // held back if it blocked: what is held goes first.
                    self.write_held();
                }
                let t0 = Instant::now();
                let out = call
                    .trace
                    .in_scope(|| self.call_sync_handler(&*handler, &ctx, &body, pages));
                self.costs.record(&ctx.method, t0.elapsed());
                self.after_handler(&call, out)
            }
            #[cfg(feature = "tokio")]
            CallStart::Run(Handler::Async(_), ..) => Some(Err(Status::internal(
                "an async handler cannot run on the blocking server",
            ))),
        };
        self.end_call(call, result);
    }

    /// Runs a blocking handler: the one place a sync unary handler is
    /// invoked.
    pub(crate) fn call_sync_handler(
        &self,
        handler: &RawHandler,
        ctx: &Context,
        body: &[u8],
        pages: Pages,
    ) -> Result<Reply, Status> {
        catch_unwind(AssertUnwindSafe(|| handler(ctx, body, pages)))
            .unwrap_or_else(|_| Err(Status::internal("the handler panicked")))
    }

    /// Queues a call to run: on the pool's queue (the caller raises
    /// `jobs_signal`), or as a task of the async server.
    pub(crate) fn queue_call(&self, job: Job) {
        #[cfg(feature = "tokio")]
        if let Some(io) = &self.async_io {
            io.spawn_call(job);
            return;
        }
        let _ = self.jobs_tx.send(Work::Call(Box::new(job)));
    }

    /// What happens to a call before any handler runs: deferred (`None`:
    /// the connection's outbound queue is full), answered at once
    /// (cancelled, deadline passed, unknown method), or to be run.
    pub(crate) fn start_call(&self, job: Job) -> Option<(CallInfo, CallStart)> {
        if job.conn.outbound_full() && !job.conn.closed.load(Ordering::SeqCst) {
            // The peer is not reading its responses: run none of its calls
            // until it does (the queue draining puts this one back).
            let conn = job.conn.clone();
            conn.core.lock().deferred.push(job);
            if !conn.outbound_full() {
                self.undefer(&conn);
            }
            return None;
        }
        let Job {
            conn,
            frame,
            received,
            cancelled,
        } = job;
        let trace = CallTrace::start(
            Side::Server,
            &frame.head.header.method,
            frame.head.call_id(),
            received,
        );
        trace.received(&frame);
        let h = frame.head.header;
        let deadline = (h.deadline_us > 0).then(|| received + Duration::from_micros(h.deadline_us));
        let info = CallInfo {
            conn: conn.clone(),
            call_id: h.call_id,
            deadline,
            cancelled: cancelled.clone(),
            trace,
        };
        let start = if cancelled.load(Ordering::Relaxed) || conn.closed.load(Ordering::SeqCst) {
            CallStart::Answer(None)
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            CallStart::Answer(Some(Err(Status::deadline_exceeded(
                "deadline passed before the handler ran",
            ))))
        } else if let Some(handler) = self.handlers.get(&h.method) {
            let ctx = Context {
                call_id: h.call_id,
                method: h.method,
                deadline,
                metadata: h.metadata,
                cancelled,
                peer: conn.peer,
                path: conn.path,
            };
            // Interceptors decide before any handler runs (both servers,
            // every kind of call start here); a panicking one fails the
            // call, not the server.
            match self.interceptors.check(&ctx) {
                Ok(()) => CallStart::Run(handler.clone(), ctx, h.body, frame.payload),
                Err(status) => CallStart::Answer(Some(Err(status))),
            }
        } else {
            CallStart::Answer(Some(Err(Status::unimplemented(format!(
                "unknown method '{}'",
                h.method
            )))))
        };
        Some((info, start))
    }

    /// What a handler's result becomes: nothing if the call was cancelled
    /// meanwhile, an error if its deadline passed.
    pub(crate) fn after_handler(
        &self,
        call: &CallInfo,
        out: Result<Reply, Status>,
    ) -> Option<Result<Reply, Status>> {
        if call.cancelled.load(Ordering::Relaxed) {
            None
        } else if call.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(Err(Status::deadline_exceeded(
                "deadline passed while the handler ran",
            )))
        } else {
            Some(out)
        }
    }

    /// Sends a call's answer (if any) without waiting and retires the call.
    pub(crate) fn end_call(&self, call: CallInfo, result: Option<Result<Reply, Status>>) {
        let conn = call.conn;
        if let Some(result) = result {
            if !conn.closed.load(Ordering::SeqCst) {
                let frame = response_frame(call.call_id, result, &conn.peer_limits.lock());
                call.trace.answered(&frame);
                call.trace.end();
                self.send_answer(&conn, frame);
            }
        }
        self.finish_call(&conn, call.call_id);
    }

    /// The SETTINGS frame announcing this server's limits.
    fn settings_frame(&self) -> pagerpc_sender::OutFrame {
        let ours = PeerSettings::new(
            self.cfg.limits,
            u32::try_from(self.cfg.max_inflight_per_conn).ok(),
            self.cfg.stream_window,
        )
        .with_conn_window(self.cfg.conn_window);
        control_frame(0, Kind::Settings, ours.encode())
    }

    pub(crate) fn finish_call(&self, conn: &Conn, call_id: u64) {
        conn.core.lock().sm.finish(call_id);
        let mut n = self.inflight.lock();
        *n -= 1;
        if *n == 0 {
            self.drained.notify_all();
            #[cfg(feature = "tokio")]
            if let Some(io) = &self.async_io {
                io.drained.notify_waiters();
            }
        }
    }

    /// Puts calls deferred by a full outbound queue back to run, and wakes
    /// streams waiting for room in it.
    fn undefer(&self, conn: &Arc<Conn>) {
        let streams: Vec<_> = conn.streams.lock().values().cloned().collect();
        for s in streams {
            s.poke();
        }
        let jobs = std::mem::take(&mut conn.core.lock().deferred);
        if jobs.is_empty() {
            return;
        }
        for job in jobs {
            self.queue_call(job);
        }
        if !self.is_async() {
            self.wake_pool();
        }
    }

    /// Closes a connection, first telling the peer why (an ERROR frame with
    /// call id 0) if there is something to say. With `abort`, or when the
    /// peer is not taking what is queued, the connection is reset, so the
    /// kernel lets go of queued data (and zero-copy pages) at once.
    pub(crate) fn close(&self, conn: &Arc<Conn>, notice: Option<Status>, abort: bool) {
        let why = if abort {
            "the connection failed (socket error, hang-up or failed send); reset"
        } else {
            "closed by the server"
        };
        self.close_because(conn, notice, abort, &why);
    }

    /// [`close`](Self::close), saying why (for the `connection_close`
    /// event; the notice, if any, says it instead).
    pub(crate) fn close_because(
        &self,
        conn: &Arc<Conn>,
        notice: Option<Status>,
        abort: bool,
        why: &dyn std::fmt::Display,
    ) {
        if conn.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Some(status) = &notice {
            // Best effort, never waiting: if the socket takes it now, the
            // peer learns why.
            let _ = conn.send(error_frame(0, status));
        }
        if conn.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        match &notice {
            Some(status) => trace::conn_close(Side::Server, conn.peer, status),
            None => trace::conn_close(Side::Server, conn.peer, why),
        }
        if conn.has_task() {
            // Its task sees `closed` and ends (deregistering the socket).
            conn.wake_task();
        } else {
            self.poller.delete(conn.fd.as_fd());
        }
        self.conns.lock().remove(&conn.token);
        let deferred = {
            let mut core = conn.core.lock();
            for flag in core.sm.tokens() {
                flag.store(true, Ordering::Relaxed);
            }
            std::mem::take(&mut core.deferred)
        };
        for job in deferred {
            self.finish_call(conn, job.frame.head.call_id());
        }
        let streams: Vec<_> = conn.streams.lock().values().cloned().collect();
        for s in streams {
            s.cancel(Status::unavailable("the connection closed"));
        }
        conn.shut(abort);
    }

    fn accept_all(self: &Arc<Self>) {
        loop {
            // The listener is held only around `accept`: shutdown takes it
            // to close it, and must not wait for a new connection's setup.
            let accepted = match self.listener.lock().as_ref() {
                Some(listener) => listener.accept(),
                None => return,
            };
            match accepted {
                Ok((stream, peer)) => self.add_conn(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if sys::is_fd_exhaustion(&e) => {
                    // Out of descriptors: the backlog stays full, so
                    // re-arming now would wake us again at once (a busy
                    // loop). The sweeper re-arms the listener shortly.
                    self.accept_paused.store(true, Ordering::SeqCst);
                    return;
                }
                Err(_) => break,
            }
        }
        self.rearm_listener();
    }

    pub(crate) fn rearm_listener(&self) {
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        if let Some(l) = self.listener.lock().as_ref() {
            let _ = self
                .poller
                .rearm(l.as_fd(), TOKEN_LISTENER, sys::LISTEN_FLAGS);
        }
    }

    pub(crate) fn add_conn(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        if sys::prepare_stream(&stream, true).is_err() {
            return;
        }
        trace::conn_open(Side::Server, peer);
        let fd = Arc::new(OwnedFd::from(stream));
        let counters = Arc::new(Counters::with_parent(self.counters.clone()));
        let mut recv_cfg = self.cfg.recv.clone();
        recv_cfg.limits = self.cfg.limits;
        let token = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut receiver = Receiver::new(fd.clone(), recv_cfg, counters.clone());
        receiver.set_budget(self.budget.clone());
        if self.cfg.auth_key.is_some() {
            // Until the peer authenticates it may send one small AUTH
            // frame and nothing else: a prefix announcing a payload is
            // refused before anything is allocated.
            receiver.set_limits(pre_auth_limits(&self.cfg.limits));
        }
        let mut sender = Sender::new(fd.clone(), self.cfg.send.clone(), counters);
        // Payload send requests (Backend::Auto) pass between the halves.
        let link = Arc::new(pagerpc_core::PayloadSendLink::new());
        receiver.set_payload_send_link(link.clone());
        sender.set_payload_send_link(link);
        let mut cc = ConnConfig::default();
        cc.max_inflight = self.cfg.max_inflight_per_conn;
        cc.outbound_max_bytes = self.cfg.max_outbound_bytes_per_conn;
        cc.header_timeout = self.cfg.header_timeout;
        cc.progress_timeout = self.cfg.progress_timeout;
        cc.idle_timeout = self.cfg.idle_timeout;
        cc.handshake_timeout = self.cfg.handshake_timeout;
        cc.auth_required = self.cfg.auth_key.is_some();
        let sm = ServerConn::new(cc, Instant::now());
        #[allow(unused_mut)]
        let mut conn = Conn::new(
            token,
            fd,
            peer,
            receiver,
            sender,
            sm,
            self.cfg.max_outbound_bytes_per_conn,
        );
        #[cfg(feature = "tokio")]
        if self.async_io.is_some() {
            conn.task = Some(Arc::new(tokio::sync::Notify::new()));
        }
        let conn = Arc::new(conn);
        let mut conns = self.conns.lock();
        if conns.len() >= self.cfg.max_connections {
            drop(conns);
            let _ = conn.send(error_frame(
                0,
                &Status::resource_exhausted(format!(
                    "server is at its max_connections limit of {}",
                    self.cfg.max_connections
                )),
            ));
            conn.closed.store(true, Ordering::SeqCst);
            trace::conn_close(Side::Server, peer, &"refused: max_connections reached");
            conn.shut(false);
            return;
        }
        conns.insert(token, conn.clone());
        drop(conns);
        if self.cfg.auth_key.is_some() {
            let Ok(nonce) = auth::nonce() else {
                self.close(
                    &conn,
                    Some(Status::internal("no randomness for the challenge")),
                    false,
                );
                return;
            };
            conn.core.lock().challenge = Some(nonce);
            self.admit_unauthenticated(&conn);
            let _ = conn.send(control_frame(0, Kind::Auth, nonce.to_vec()));
        } else {
            let _ = conn.send(self.settings_frame());
        }
        #[cfg(feature = "tokio")]
        if let Some(io) = &self.async_io {
            // Its task registers the socket and drives it.
            io.spawn_conn(self, conn);
            return;
        }
        // Registered while owned, so the first readiness event waits for
        // the release below.
        if !conn.claim(Events::default()) {
            return;
        }
        if self
            .poller
            .add(conn.fd.as_fd(), token, sys::CONN_FLAGS)
            .is_err()
        {
            self.close(&conn, None, false);
        }
        // A request already in the socket may be read here (another thread
        // takes its readiness and posts it to us). It is queued, never run
        // on this thread: a slow handler would keep the listener from
        // being re-armed, so no other connection would be accepted, and
        // shutdown would wait for it before closing the listener.
        if let Some(job) = self.drive_owned_turns(&conn, Events::default()) {
            self.queue_call(job);
            self.wake_pool();
        }
    }

    /// Records a new unauthenticated connection; past
    /// `max_unauthenticated`, marks the oldest for closing (its owner
    /// closes it).
    fn admit_unauthenticated(self: &Arc<Self>, conn: &Arc<Conn>) {
        let limit = self
            .cfg
            .max_unauthenticated
            .min(self.cfg.max_connections)
            .max(1);
        let mut list = self.unauthenticated.lock();
        list.retain(|w| {
            w.upgrade().is_some_and(|c| {
                !c.closed.load(Ordering::SeqCst)
                    && c.core.lock().challenge.is_some()
                    && !c.evicted.load(Ordering::SeqCst)
            })
        });
        list.push_back(Arc::downgrade(conn));
        while list.len() > limit {
            let Some(old) = list.pop_front().and_then(|w| w.upgrade()) else {
                continue;
            };
            old.evicted.store(true, Ordering::SeqCst);
            self.post_work(
                &old,
                Events {
                    timeout: true,
                    ..Events::default()
                },
            );
        }
    }

    /// Counts a request payload against its connection's cap until the
    /// last handle to it is dropped.
    fn charge(self: &Arc<Self>, conn: &Arc<Conn>, pages: &mut Pages) {
        let Some(cap) = self.cfg.max_held_bytes_per_conn else {
            return;
        };
        let bytes = pages.footprint();
        if bytes == 0 {
            return;
        }
        conn.held.fetch_add(bytes, Ordering::SeqCst);
        let shared = Arc::downgrade(self);
        let c = Arc::downgrade(conn);
        let hook: pagerpc_pages::ReleaseHook = Box::new(move |n| {
            let Some(conn) = c.upgrade() else { return };
            let left = conn.held.fetch_sub(n, Ordering::SeqCst).saturating_sub(n);
            if left <= cap && conn.held_paused.swap(false, Ordering::SeqCst) {
                if let Some(s) = shared.upgrade() {
                    s.post_work(
                        &conn,
                        Events {
                            read: true,
                            ..Events::default()
                        },
                    );
                }
            }
        });
        if let Err(hook) = pages.on_release(hook) {
            // Not attachable (a fresh payload always is): do not count it.
            hook(bytes);
        }
    }

    fn over_held_cap(&self, conn: &Conn) -> bool {
        self.cfg
            .max_held_bytes_per_conn
            .is_some_and(|cap| conn.held.load(Ordering::SeqCst) > cap)
    }
}

/// The limits of a connection that has not authenticated: one small AUTH
/// frame, no payload, no metadata.
fn pre_auth_limits(full: &pagerpc_core::Limits) -> pagerpc_core::Limits {
    let mut l = *full;
    l.max_header_bytes = full.max_header_bytes.min(1024);
    l.max_payload_bytes = 0;
    l.max_inline_payload_bytes = 0;
    l.max_metadata_entries = 0;
    l
}

/// A call being run: what is needed to answer it and retire it.
pub(crate) struct CallInfo {
    pub(crate) conn: Arc<Conn>,
    pub(crate) call_id: u64,
    pub(crate) deadline: Option<Instant>,
    pub(crate) cancelled: Arc<AtomicBool>,
    /// The call's span (feature `tracing`), ended when it is answered.
    pub(crate) trace: CallTrace,
}

/// How a call starts.
pub(crate) enum CallStart {
    /// Answered without a handler (`None`: not at all, it was cancelled).
    Answer(Option<Result<Reply, Status>>),
    /// Run this handler with this context, request body and payload.
    Run(Handler, Context, Vec<u8>, Pages),
}
