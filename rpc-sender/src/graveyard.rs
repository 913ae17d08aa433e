//! Where the zero-copy payloads of dropped connections wait for the kernel.
//!
//! A [`Sender`](crate::Sender) dropped while the kernel may still read
//! payloads it sent with `MSG_ZEROCOPY` aborts its connection (which makes
//! the kernel drop its send queue and report completions at once) and
//! releases what completed. Whatever is still outstanding (data a NIC is
//! still transmitting) is handed here: one process-wide thread reads the
//! completions and releases the payloads, so no thread that drops a
//! connection ever waits for the kernel. A payload whose completion never
//! arrives within [`GRACE`] is leaked rather than reused while in flight,
//! and counted ([`leaked_bytes`]).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pagerpc_core::ZcTracker;
use pagerpc_pages::Payload;

use crate::sys;

/// How long the graveyard waits for a dropped connection's completions.
pub const GRACE: Duration = Duration::from_secs(10);

struct Grave {
    fd: Arc<OwnedFd>,
    tracker: ZcTracker<Payload>,
    since: Instant,
}

#[derive(Default)]
struct Yard {
    graves: Mutex<Vec<Grave>>,
    wake: Condvar,
}

static YARD: OnceLock<Arc<Yard>> = OnceLock::new();
static HELD: AtomicUsize = AtomicUsize::new(0);
static LEAKED: AtomicUsize = AtomicUsize::new(0);

/// Payload bytes the graveyard holds now.
pub fn held_bytes() -> usize {
    HELD.load(Ordering::Relaxed)
}

/// Payload bytes leaked because the kernel never reported them complete
/// within [`GRACE`].
pub fn leaked_bytes() -> usize {
    LEAKED.load(Ordering::Relaxed)
}

/// Hands over what a dropped connection still has in flight.
pub(crate) fn bury(fd: Arc<OwnedFd>, tracker: ZcTracker<Payload>) {
    let yard = YARD.get_or_init(|| {
        let yard = Arc::new(Yard::default());
        let y = yard.clone();
        // If the thread cannot start, the graves are never visited: their
        // payloads are leaked, which is safe.
        let _ = std::thread::Builder::new()
            .name("pagerpc-zc-graveyard".into())
            .spawn(move || tend(&y));
        yard
    });
    HELD.fetch_add(tracker.held_bytes(), Ordering::Relaxed);
    let mut graves = yard.graves.lock().unwrap_or_else(|e| e.into_inner());
    graves.push(Grave {
        fd,
        tracker,
        since: Instant::now(),
    });
    yard.wake.notify_one();
}

fn tend(yard: &Yard) {
    let mut got = Vec::new();
    let mut graves = yard.graves.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        while graves.is_empty() {
            graves = yard.wake.wait(graves).unwrap_or_else(|e| e.into_inner());
        }
        graves.retain_mut(|g| {
            got.clear();
            let _ = sys::read_completions(g.fd.as_fd(), &mut got);
            for c in &got {
                g.tracker.complete(c.lo, c.hi);
            }
            let before = g.tracker.held_bytes();
            drop(g.tracker.take_released());
            HELD.fetch_sub(before - g.tracker.held_bytes(), Ordering::Relaxed);
            if g.tracker.held_items() == 0 {
                return false;
            }
            if g.since.elapsed() > GRACE {
                let left = g.tracker.held_bytes();
                HELD.fetch_sub(left, Ordering::Relaxed);
                LEAKED.fetch_add(left, Ordering::Relaxed);
                for p in g.tracker.drain_all() {
                    std::mem::forget(p);
                }
                return false;
            }
            true
        });
        if !graves.is_empty() {
            let (g, _) = yard
                .wake
                .wait_timeout(graves, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner());
            graves = g;
        }
    }
}
