//! The server-wide budget of payload bytes being received.
//!
//! Every separate request payload is reserved from it when its prefix and
//! header announce it, before anything is allocated, and given back when
//! the payload is complete (it then counts against its connection's
//! `max_held_bytes_per_conn`) or abandoned. While the budget is spent,
//! connections whose next payload does not fit stop reading (they are
//! not armed for `EPOLLIN`) and wait here; a release wakes them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use pagerpc_receiver::PayloadBudget;

use super::conn::{Conn, Events};
use super::Shared;

pub(crate) struct ReceiveBudget {
    limit: usize,
    used: AtomicUsize,
    waiters: Mutex<Vec<Weak<Conn>>>,
    shared: OnceLock<Weak<Shared>>,
}

impl std::fmt::Debug for ReceiveBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveBudget")
            .field("limit", &self.limit)
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish()
    }
}

impl ReceiveBudget {
    pub(crate) fn new(limit: usize) -> ReceiveBudget {
        ReceiveBudget {
            limit,
            used: AtomicUsize::new(0),
            waiters: Mutex::new(Vec::new()),
            shared: OnceLock::new(),
        }
    }

    pub(crate) fn attach(&self, shared: Weak<Shared>) {
        let _ = self.shared.set(shared);
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiters.lock().len()
    }

    /// Parks `conn` until bytes are released. If room appeared meanwhile,
    /// wakes it at once (no lost wake-up).
    pub(crate) fn wait(&self, conn: &Arc<Conn>) {
        self.waiters.lock().push(Arc::downgrade(conn));
        if self.used() < self.limit {
            self.wake();
        }
    }

    fn wake(&self) {
        let waiters = std::mem::take(&mut *self.waiters.lock());
        if waiters.is_empty() {
            return;
        }
        let Some(shared) = self.shared.get().and_then(Weak::upgrade) else {
            return;
        };
        for conn in waiters.iter().filter_map(Weak::upgrade) {
            shared.post_work(
                &conn,
                Events {
                    read: true,
                    ..Events::default()
                },
            );
        }
    }
}

impl PayloadBudget for ReceiveBudget {
    fn try_reserve(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::SeqCst);
        loop {
            // One payload larger than the whole budget may still come in
            // alone, or it could never be received.
            if used > 0 && used.saturating_add(bytes) > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(u) => used = u,
            }
        }
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
        self.wake();
    }
}
