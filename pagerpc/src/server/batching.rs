//! How the pool batches its own work: one wake-up for many queued jobs, and
//! the answers of calls run back to back written together.
//!
//! **Wake-ups.** Queuing work wakes a pool thread only when one is waiting
//! in `epoll_wait` and none is being woken already (`Shared::wake_pool`).
//! A thread about to wait looks at the queue first, so work queued while
//! every thread was busy is never left behind; the fences make the
//! queuer's check of `idle` and the waiter's check of the queue see at
//! least one another.
//!
//! **Answers.** A pool thread that runs queued calls one after another
//! holds back the small answers (no separate payload) of the calls it ran
//! (they wait in their connection's outbox) and writes them when it stops
//! running calls back to back: before a call whose method is not known to
//! be quick, before other work, after 64 answers, and before it waits for
//! events. So the answers to a batch of requests leave in one `sendmsg`
//! instead of one each. The cost: when a call of a method that is usually
//! quick takes long, the answers held before it wait for it. A method is
//! "quick" when its handler's running average is under [`QUICK`]; a method
//! not measured yet is not. So that such a call can never hold answers back
//! for good (say it waits for something the client does only once it has
//! an earlier answer), answers are held across a call only while another
//! pool thread waits for events, and the sweeper hands a connection whose
//! outbox still holds frames at its tick to a pool thread, whose turn
//! writes them: at most one tick (100 ms at most) late. A pool of one
//! thread never holds answers.

use std::cell::RefCell;
use std::collections::HashMap;

use pagerpc_core::FastMap;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pagerpc_sender::OutFrame;

use super::conn::Conn;
use super::context::Handler;
use super::Shared;

/// A handler whose running average is under this is run with the answers
/// before it held back.
pub(crate) const QUICK: Duration = Duration::from_micros(20);

/// Answers one thread holds back at most before writing them.
const HOLD_MAX: usize = 64;

/// Payloads smaller than this travel inline, in the head's part: such an
/// answer can share a write with others.
const HOLD_PAYLOAD_MAX: usize = 4096;

/// Each method's handler time, a running average in nanoseconds (0: not
/// measured yet).
pub(crate) struct JobCosts {
    ns: FastMap<String, AtomicU64>,
}

impl JobCosts {
    pub(crate) fn new(handlers: &HashMap<String, Handler>) -> JobCosts {
        JobCosts {
            ns: handlers
                .keys()
                .map(|k| (k.clone(), AtomicU64::new(0)))
                .collect(),
        }
    }

    /// Whether `method`'s handler is known to be quick.
    pub(crate) fn quick(&self, method: &str) -> bool {
        self.ns.get(method).is_some_and(|a| {
            let ns = a.load(Ordering::Relaxed);
            ns > 0 && u128::from(ns) < QUICK.as_nanos()
        })
    }

    /// One run of `method`'s handler took `took`.
    pub(crate) fn record(&self, method: &str, took: Duration) {
        if let Some(a) = self.ns.get(method) {
            let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
            let old = a.load(Ordering::Relaxed);
            // Lost updates between threads only blur the average.
            let new = if old == 0 { ns } else { old - old / 8 + ns / 8 };
            a.store(new.max(1), Ordering::Relaxed);
        }
    }
}

thread_local! {
    /// The connections this pool thread holds answers back for, while it
    /// runs calls back to back (`None` outside such a run).
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

#[derive(Default)]
struct Held {
    conns: Vec<Arc<Conn>>,
    answers: usize,
}

impl Shared {
    /// Work was queued: wakes a pool thread waiting for events, if one
    /// waits and none is being woken already.
    pub(crate) fn wake_pool(&self) {
        fence(Ordering::SeqCst);
        if self.idle.load(Ordering::SeqCst) > 0 && !self.jobs_raised.swap(true, Ordering::SeqCst) {
            self.jobs_signal.raise();
        }
    }

    /// This thread is about to wait for events: returns whether work is
    /// queued instead (then it is no longer counted as waiting).
    pub(crate) fn going_idle(&self) -> bool {
        self.idle.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.jobs_rx.is_empty() {
            return false;
        }
        self.idle.fetch_sub(1, Ordering::SeqCst);
        true
    }

    /// Whether a pool thread waits for events (and could write answers
    /// held back by a thread stuck in a call, see the module docs).
    pub(crate) fn pool_thread_idle(&self) -> bool {
        self.idle.load(Ordering::SeqCst) > 0
    }

    /// The thread woke from waiting for events.
    pub(crate) fn woke(&self) {
        self.idle.fetch_sub(1, Ordering::SeqCst);
    }

    /// The wake-up signal was read: later work raises it again.
    pub(crate) fn wake_taken(&self) {
        self.jobs_signal.clear();
        // After the read: a raise between the two is either read above
        // (and its work is taken next) or sees the flag still set and
        // leaves its work to this thread, which takes the queue next.
        self.jobs_raised.store(false, Ordering::SeqCst);
    }

    /// Starts holding back answers on this thread.
    pub(crate) fn hold_answers(&self) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if h.is_none() {
                *h = Some(Held::default());
            }
        });
    }

    /// Writes the answers held back, and stops holding them.
    pub(crate) fn release_answers(&self) {
        self.write_held();
        HELD.with(|h| *h.borrow_mut() = None);
    }

    /// Writes the answers held back so far (still holding later ones).
    pub(crate) fn write_held(&self) {
        let conns = HELD.with(|h| {
            h.borrow_mut()
                .as_mut()
                .map(|h| {
                    h.answers = 0;
                    std::mem::take(&mut h.conns)
                })
                .unwrap_or_default()
        });
        for conn in conns {
            self.flush_out(&conn);
        }
    }

    /// Sends a call's answer: held back if this thread holds answers and
    /// the answer is small, written now otherwise.
    pub(crate) fn send_answer(&self, conn: &Arc<Conn>, frame: OutFrame) {
        if frame.payload.len() >= HOLD_PAYLOAD_MAX {
            // A separate payload has a write of its own anyway: it goes
            // now, after what is held (the order on the wire is kept).
            self.write_held();
            self.send(conn, frame);
            return;
        }
        // The frame comes back when this thread holds nothing.
        let (rest, full) = HELD.with(|h| match h.borrow_mut().as_mut() {
            None => (Some(frame), false),
            Some(h) => {
                conn.hold(frame);
                if !h.conns.iter().any(|c| Arc::ptr_eq(c, conn)) {
                    h.conns.push(conn.clone());
                }
                h.answers += 1;
                (None, h.answers >= HOLD_MAX)
            }
        });
        match rest {
            Some(frame) => self.send(conn, frame),
            None if full => self.write_held(),
            None => {}
        }
    }
}
