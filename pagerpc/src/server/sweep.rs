//! The sweeper: finds connections whose timeouts passed, and marks them.
//!
//! It does no I/O itself: a marked connection is handed to a pool thread,
//! which owns it and asks its state machine what fired
//! ([`pagerpc_core::conn::ServerConn::handle_timeout`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver as ChanRx;

use super::conn::Events;
use super::{Shared, Work};

/// How often the sweeper looks.
const TICK_MAX: Duration = Duration::from_millis(100);

impl Shared {
    /// Runs on its own thread until the server stops.
    pub(crate) fn sweep(self: Arc<Self>, stop: ChanRx<()>) {
        let c = &self.cfg;
        let shortest = [
            c.header_timeout,
            c.idle_timeout,
            c.progress_timeout,
            c.handshake_timeout,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(TICK_MAX);
        let tick = (shortest / 4).clamp(Duration::from_millis(10), TICK_MAX);
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
            if self.accept_paused.swap(false, Ordering::SeqCst) {
                let _ = self.jobs_tx.send(Work::Accept);
                self.wake_pool();
            }
            let now = Instant::now();
            let conns: Vec<_> = self.conns.lock().values().cloned().collect();
            for conn in conns {
                let due = {
                    let mut core = conn.core.lock();
                    core.io.queued_out = conn.queued_out.load(Ordering::SeqCst);
                    let io = core.io;
                    core.sm.poll_timeout(&io).is_some_and(|t| t <= now)
                };
                if conn.outbox_pending() {
                    // Answers a pool thread held back while running calls
                    // back to back (`batching.rs`), and that thread is still
                    // in a call: any other thread writes them on a turn.
                    self.post_work(
                        &conn,
                        Events {
                            write: true,
                            ..Events::default()
                        },
                    );
                }
                if due && !conn.timeout_posted.swap(true, Ordering::SeqCst) {
                    self.post_work(
                        &conn,
                        Events {
                            timeout: true,
                            ..Events::default()
                        },
                    );
                }
            }
        }
    }
}
