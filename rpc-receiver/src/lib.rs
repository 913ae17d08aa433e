//! The receive half of pagerpc.
//!
//! A [`Receiver`] reads each frame's prefix and header from a non-blocking
//! stream socket, then places the payload in page-aligned memory through a
//! receive *backend*, and hands the complete frame to its consumer as a
//! [`Frame`] whose payload is owned [`Pages`]. A payload is delivered only
//! when every byte of it has arrived; a connection that ends early yields
//! [`RecvError::Codec`] with [`CodecError::Truncated`], never a short
//! payload.
//!
//! Backends (see [`Backend`]):
//! - **copy**: the payload is read into page-aligned memory (an anonymous
//!   mapping for large payloads). Always available.
//! - **zero-copy** (`TCP_ZEROCOPY_RECEIVE`, Linux 4.18+): each payload's
//!   whole pages are mapped from the socket's receive queue into a mapping
//!   made on the socket; only what the kernel cannot map (its
//!   `recv_skip_hint`) and the payload's tail (`len % 4096`) are copied. The
//!   receiver waits with `SO_RCVLOWAT` and poll, and never `read()`s while
//!   nothing is mappable. If the kernel or the socket cannot do it, the
//!   connection falls back to copy without losing, duplicating or
//!   reordering a byte.
//!
//! - **mmap** (patched kernel, `kernel-patch/`): `mmap()` on the socket maps
//!   and consumes the next received bytes; detected at connection setup.
//! - **auto**: per connection, whichever of copy and zero-copy costs this
//!   receiver less CPU per byte, measured as payloads arrive (see
//!   [`Backend::Auto`]).
//!
//! All hand out the same [`Pages`], so callers do not change when a
//! connection maps instead of copies. A mapped [`Pages`] holds the socket's
//! file open until it is dropped (that is how the kernel keeps the pages
//! valid): keeping payloads keeps their connections' sockets allocated
//! even after the connection is closed.
#![deny(unsafe_op_in_unsafe_fn)]

mod auto;
mod sys;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use pagerpc_core::{
    CodecError, CopyReason, Counters, FrameDecoder, FrameHead, Kind, Limits, Need, PayloadSend,
    PayloadSendLink,
};
pub use pagerpc_pages::{Origin, PageBuf, Pages};

/// Which receive backend a connection uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// Copy every payload into page-aligned memory.
    #[default]
    Copy,
    /// Map payload pages with `TCP_ZEROCOPY_RECEIVE`, falling back to copy
    /// for what cannot be mapped. Prefixes and headers are then read with
    /// exact-length reads, so that no payload byte is pulled into the
    /// read buffer.
    ZeroCopy,
    /// Map each payload with the consuming `mmap()` of the patched kernel in
    /// `kernel-patch/` (`TCP_MMAP_CONSUME`): one `mmap()` per chunk of
    /// queued whole pages, falling back to copy for pages it refuses. On a
    /// kernel without the patch, detection fails at connection setup and
    /// the connection uses [`Backend::ZeroCopy`] instead.
    Mmap,
    /// Per connection, receive each payload by whichever of copying and
    /// mapping (`TCP_ZEROCOPY_RECEIVE`) costs this receiver less CPU per
    /// byte, measured with `CLOCK_THREAD_CPUTIME_ID` around the receive of
    /// payloads, sampling the other path for about one byte in 16, and
    /// moving only when the other path is more than 10 % cheaper on an
    /// average of several samples. Payloads below
    /// [`RecvConfig::auto_floor`] (and below a page, and inline ones) are
    /// copied without measuring. When the connection's sender is linked
    /// ([`Receiver::set_payload_send_link`], as every pagerpc client and
    /// server does), the peer is asked to write its payloads by copy while
    /// copying is cheaper (data written with `MSG_ZEROCOPY` costs more to
    /// copy), and with `MSG_ZEROCOPY` while mapping is. A connection starts
    /// on copying. Each payload is received whole by one path; the
    /// counters say which and why ([`pagerpc_core::AutoChoice`]). See
    /// `docs/zero-copy.md`.
    Auto,
}

/// Test hook: multiplies the CPU time `Backend::Auto` measures for each
/// path, to make one path look costlier than it is. Not for production
/// use; share one between a test and the receivers it configures.
#[doc(hidden)]
#[derive(Debug)]
pub struct AutoCostBias {
    map_percent: std::sync::atomic::AtomicU32,
    copy_percent: std::sync::atomic::AtomicU32,
}

impl Default for AutoCostBias {
    fn default() -> Self {
        AutoCostBias {
            map_percent: 100.into(),
            copy_percent: 100.into(),
        }
    }
}

impl AutoCostBias {
    /// Measured costs count `map_percent` % (mapping) and `copy_percent` %
    /// (copying) of what was measured, from now on.
    pub fn set(&self, map_percent: u32, copy_percent: u32) {
        use std::sync::atomic::Ordering::SeqCst;
        self.map_percent.store(map_percent, SeqCst);
        self.copy_percent.store(copy_percent, SeqCst);
    }

    fn apply(&self, path: auto::Path, ns: u64) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        let pct = match path {
            auto::Path::Map => self.map_percent.load(SeqCst),
            auto::Path::Copy => self.copy_percent.load(SeqCst),
        };
        ns.saturating_mul(u64::from(pct)) / 100
    }
}

/// How a connection's payloads are placed right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceivePath {
    /// Copied.
    Copy,
    /// Mapped with `TCP_ZEROCOPY_RECEIVE` (copied where it cannot map).
    ZeroCopy,
    /// Mapped with the patched kernel's consuming `mmap()` (copied where it
    /// cannot map).
    Mmap,
}

/// How a [`Receiver`] reads.
///
/// Build it from [`RecvConfig::default`] and set the fields you need (it
/// is `#[non_exhaustive]`, so fields can be added).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RecvConfig {
    /// Limits every incoming frame must respect.
    pub limits: Limits,
    /// The backend to use.
    pub backend: Backend,
    /// Size of the connection's read buffer for prefixes, headers and small
    /// payloads. Default 64 KiB.
    ///
    /// # Memory cost
    /// One buffer of this size per connection, for the connection's life.
    pub read_buf: usize,
    /// Pass `TCP_RECEIVE_ZEROCOPY_FLAG_TLB_CLEAN_HINT` (Linux 5.11+) so the
    /// kernel batches TLB flushes when it replaces mapped pages. Default on;
    /// see `docs/zero-copy.md` for the measurements.
    pub zc_tlb_clean_hint: bool,
    /// With [`Backend::Auto`]: payloads smaller than this are copied
    /// without measuring or sampling mapping. Default 256 KiB: on the
    /// 2-vCPU VM of `docs/zero-copy.md`, mapping cost the receiver 1.3–1.5×
    /// copying at 64 KiB and 1.1–1.2× at 128 KiB, and broke even between
    /// about 300 and 800 KiB (`pagerpc doctor --cost`). On a host where
    /// `doctor --cost` finds mapping paying from a smaller size (a real
    /// NIC delivers cold data), lower it below that size. Sizes under a
    /// page are always copied.
    pub auto_floor: usize,
    /// With `TCP_ZEROCOPY_RECEIVE` ([`Backend::ZeroCopy`], and
    /// [`Backend::Auto`] while it maps): how many socket mappings a
    /// connection keeps for its next payloads. A mapped payload's mapping
    /// is lent to its [`Pages`]; when the consumer drops them, the pages are
    /// dropped (`MADV_DONTNEED`) but the mapping is kept, and the next
    /// payload of the same size is mapped into it instead of a new one:
    /// an `mmap` and a `munmap` fewer per payload. 0 makes and unmaps a
    /// mapping per payload. Default 4; see `docs/zero-copy.md`.
    ///
    /// # Memory cost
    /// Per connection, up to this many mappings without pages, each of at
    /// most 16 MiB (`pagerpc_pages::KEPT_MAX_LEN`; larger ones are never
    /// kept): address space, one VMA each of the process's
    /// `vm.max_map_count`, and their page tables (about 2 KiB per MiB, so
    /// at most 32 KiB each). They are unmapped when the connection's
    /// receiver is dropped.
    pub kept_mappings: usize,
    /// Test hook for [`Backend::Auto`] (see [`AutoCostBias`]).
    #[doc(hidden)]
    pub auto_cost_bias: Option<Arc<AutoCostBias>>,
}

/// The default [`RecvConfig::kept_mappings`]: 4.
pub const DEFAULT_KEPT_MAPPINGS: usize = 4;

/// The default [`RecvConfig::auto_floor`]: 256 KiB.
pub const DEFAULT_AUTO_FLOOR: usize = 256 << 10;

impl Default for RecvConfig {
    fn default() -> Self {
        RecvConfig {
            limits: Limits::default(),
            backend: Backend::Copy,
            read_buf: 64 * 1024,
            zc_tlb_clean_hint: true,
            auto_floor: DEFAULT_AUTO_FLOOR,
            kept_mappings: DEFAULT_KEPT_MAPPINGS,
            auto_cost_bias: None,
        }
    }
}

/// A shared budget of payload bytes being received, reserved when a
/// frame's prefix and header announce a payload, before anything is
/// allocated for it, and released when the frame is complete (or
/// abandoned). A server shares one among all its connections.
pub trait PayloadBudget: Send + Sync + fmt::Debug {
    /// Reserves `bytes`; `false` if the budget cannot take them now.
    fn try_reserve(&self, bytes: usize) -> bool;
    /// Gives back `bytes` reserved earlier.
    fn release(&self, bytes: usize);
}

/// Bytes reserved from a [`PayloadBudget`], given back when dropped.
#[derive(Debug)]
struct Reservation {
    budget: Arc<dyn PayloadBudget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// One complete frame.
#[derive(Debug)]
pub struct Frame {
    /// Prefix and decoded header.
    pub head: FrameHead,
    /// The whole payload (empty if the frame has none).
    pub payload: Pages,
    /// How many of the payload's bytes the receiver took out of the socket
    /// by mapping them (`TCP_ZEROCOPY_RECEIVE` or the patched kernel's
    /// consuming `mmap()`), exactly as added to
    /// [`Counters`]' `bytes_mapped` for this frame. The other
    /// `payload.len() - mapped` bytes were copied (counted as copied, by
    /// reason). 0 with the copy backend and for empty payloads. (In the
    /// rare case where a mapping region ran out of memory mid-payload the
    /// bytes mapped so far were then copied into ordinary memory; they are
    /// still counted here, as in the counters.)
    pub mapped: u64,
}

/// Why a receive failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RecvError {
    /// The peer closed the connection cleanly, between frames.
    Closed,
    /// The peer sent something malformed or over a limit, or closed the
    /// connection inside a frame ([`CodecError::Truncated`]).
    Codec(CodecError),
    /// The socket failed (for example `ECONNRESET`), or memory for a payload
    /// could not be allocated.
    Io(io::Error),
    /// The deadline passed first. The receiver keeps its place; a later call
    /// resumes the same frame.
    TimedOut,
    /// A frame arrived whole but its payload does not match the CRC32C in
    /// its header. The payload was discarded; the stream is still in sync,
    /// so the connection may go on.
    ChecksumMismatch {
        /// The frame's head (call id, kind, ...).
        head: Box<FrameHead>,
        /// The CRC32C the header declared.
        expected: u32,
        /// The CRC32C of the bytes received.
        got: u32,
    },
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Closed => write!(f, "connection closed by peer"),
            RecvError::Codec(e) => write!(f, "bad frame from peer: {e}"),
            RecvError::Io(e) => write!(f, "receive failed: {e}"),
            RecvError::TimedOut => write!(f, "receive timed out"),
            RecvError::ChecksumMismatch { expected, got, .. } => write!(
                f,
                "payload checksum mismatch: header says CRC32C {expected:#010x}, bytes give {got:#010x}"
            ),
        }
    }
}

impl std::error::Error for RecvError {}

impl From<CodecError> for RecvError {
    fn from(e: CodecError) -> Self {
        RecvError::Codec(e)
    }
}

/// Checks a whole frame's payload against the CRC32C in its header, if any.
fn verify_checksum(frame: Frame) -> Result<Frame, RecvError> {
    let Some(expected) = frame.head.header.payload_crc32c else {
        return Ok(frame);
    };
    let got = crc32c::crc32c(&frame.payload);
    if got == expected {
        Ok(frame)
    } else {
        Err(RecvError::ChecksumMismatch {
            head: Box::new(frame.head),
            expected,
            got,
        })
    }
}

/// Whether a mapping failed for want of memory or of mappings (`ENOMEM`:
/// the process is out of memory or at `vm.max_map_count`): a shortage that
/// passes, unlike a socket that cannot be mapped at all.
fn is_enomem(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOMEM)
}

/// A zero-copy payload region could not be made writable where the kernel
/// could not map (`e`): with `ENOMEM` (no mapping can be made now), move
/// the payload into page-aligned memory (which falls back to the
/// allocator), keeping the bytes already mapped, and copy the rest of it
/// there instead of failing the connection. Other errors are returned.
fn zc_to_buf(p: &mut Partial, e: io::Error) -> Result<(), RecvError> {
    let Sink::Zc(region) = &p.sink else {
        return Err(RecvError::Io(e));
    };
    if !is_enomem(&e) {
        return Err(RecvError::Io(e));
    }
    let len = p.head.payload_len() as usize;
    let Ok(mut buf) = PageBuf::for_overwrite(len) else {
        return Err(RecvError::Io(e));
    };
    buf[..p.filled].copy_from_slice(region.received(p.filled));
    // Unmaps the region.
    p.sink = Sink::Buf(buf);
    p.copy_until = len;
    Ok(())
}

/// Why a stretch the kernel could not map is copied, given the bytes it
/// said were queued (`inq`): less than a page queued at all, or a segment
/// that is not whole, aligned pages.
fn stretch_reason(inq: usize) -> CopyReason {
    if inq > 0 && inq < pagerpc_core::PAGE_SIZE {
        CopyReason::NotQueued
    } else {
        CopyReason::Unmappable
    }
}

/// What one step of [`Receiver::poll_frame`] achieved.
enum Step {
    Frame(Frame),
    Progress,
    Blocked,
}

/// Where a payload's bytes go.
enum Sink {
    /// Copied into page-aligned memory.
    Buf(PageBuf),
    /// Mapped from the socket where possible, copied into the region's
    /// writable part otherwise.
    Zc(sys::SockRegion),
    /// Mapped chunk by chunk with the consuming `mmap()`, copied where the
    /// kernel refuses.
    Consume(sys::ConsumeRegion),
}

/// A payload being filled.
struct Partial {
    head: FrameHead,
    sink: Sink,
    /// Bytes held from the receive budget until the payload is complete.
    _reserved: Option<Reservation>,
    filled: usize,
    /// Why bytes of this payload before its tail are copied, once the
    /// zero-copy backend gave up on part of it.
    copy_reason: CopyReason,
    /// Bytes up to here are copied (pages the kernel could not map) before
    /// mapping resumes.
    copy_until: usize,
    /// Bytes of this payload mapped from the socket so far.
    mapped: u64,
    /// Consuming `mmap()`: try one page at a time (after a refused chunk).
    single_page: bool,
    /// Consuming `mmap()`: pages refused in a row.
    refusals: u32,
    /// [`Backend::Auto`]: the path chosen and the CPU time measured.
    auto: Option<AutoRecv>,
}

/// What [`Backend::Auto`] keeps of a payload being received.
struct AutoRecv {
    plan: auto::Plan,
    /// CPU time spent on it so far (ns).
    cpu_ns: u64,
    /// The thread CPU clock when the current stretch of work on it began.
    since: Option<u64>,
}

/// Zero-copy receive state of one connection.
#[derive(Debug)]
struct ZcState {
    /// Index into `sys::ZC_STRUCT_LENS` of the struct size the kernel takes.
    struct_idx: usize,
    flags: u32,
}

/// The receive half of a connection.
pub struct Receiver {
    fd: Arc<OwnedFd>,
    cfg: RecvConfig,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    partial: Option<Partial>,
    counters: Arc<Counters>,
    /// The last read returned fewer bytes than asked for, so the socket is
    /// probably empty: the next `poll_frame` that would read reports
    /// "nothing more" instead, saving a syscall that would say `EAGAIN`.
    /// Readiness is level-triggered, so nothing is missed.
    drained: bool,
    /// Grows with every byte read or placed (see [`Receiver::progress`]).
    progress: u64,
    /// Where payload bytes are reserved from, if anywhere.
    budget: Option<Arc<dyn PayloadBudget>>,
    /// A head whose payload waits for room in the budget.
    awaiting: Option<FrameHead>,
    /// The body of the frame being read is reserved from the budget (from
    /// its prefix until the frame is delivered).
    body_reserved: Option<Reservation>,
    /// A prefix's body waits for room in the budget.
    awaiting_body: bool,
    /// The `SO_RCVLOWAT` currently set (1 = the kernel default).
    lowat: i32,
    /// The largest mark for the current payload (a quarter of the receive
    /// buffer), 0 until read.
    lowat_cap: usize,
    /// Reads may block (inside [`Receiver::recv_frame`] without a deadline,
    /// on a socket in blocking mode).
    block: bool,
    /// The stream error that ended this connection; every later call
    /// returns it again.
    dead: Option<CodecError>,
    /// Zero-copy receive, while it is on for this connection.
    zc: Option<ZcState>,
    /// The patched kernel's consuming `mmap()` is on for this connection.
    mmap_on: bool,
    /// Why zero-copy receive was switched off for this connection.
    zc_off: Option<String>,
    /// [`Backend::Auto`]'s choice for this connection.
    auto: Option<auto::Chooser>,
    /// Shared with the connection's sender (payload send requests).
    link: Option<Arc<PayloadSendLink>>,
    /// CPU time spent releasing measured payloads, reported by their
    /// [`Pages`] when the consumer drops them ([`Backend::Auto`]).
    released: Arc<ReleaseCosts>,
    /// Socket mappings kept for the next payloads
    /// ([`RecvConfig::kept_mappings`]); closed when the receiver is dropped.
    kept: Option<Arc<pagerpc_pages::KeptMappings>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Kept mappings hold the socket's file: unmap them with the
        // connection. Payloads still held give theirs back to a closed
        // home, which unmaps them.
        if let Some(kept) = &self.kept {
            kept.close();
        }
    }
}

/// What releasing measured payloads cost, per path (map, copy), since the
/// receiver last looked.
#[derive(Debug, Default)]
struct ReleaseCosts {
    ns: [std::sync::atomic::AtomicU64; 2],
    bytes: [std::sync::atomic::AtomicU64; 2],
}

impl ReleaseCosts {
    fn add(&self, path: auto::Path, ns: u64, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = usize::from(path == auto::Path::Copy);
        self.ns[i].fetch_add(ns, Relaxed);
        self.bytes[i].fetch_add(bytes, Relaxed);
    }

    fn take(&self, path: auto::Path) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = usize::from(path == auto::Path::Copy);
        (self.ns[i].swap(0, Relaxed), self.bytes[i].swap(0, Relaxed))
    }
}

/// Most `SO_RCVLOWAT` is set to while waiting for a payload.
const MAX_LOWAT: usize = 256 * 1024;

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("backend", &self.cfg.backend)
            .field("need", &self.decoder.need())
            .field("buffered", &(self.end - self.start))
            .finish()
    }
}

impl Receiver {
    /// A receiver on `fd`, a connected stream socket in non-blocking mode.
    pub fn new(fd: Arc<OwnedFd>, cfg: RecvConfig, counters: Arc<Counters>) -> Receiver {
        let buf = vec![0u8; cfg.read_buf.max(pagerpc_core::PREFIX_LEN)].into_boxed_slice();
        let mut r = Receiver {
            decoder: FrameDecoder::new(cfg.limits),
            fd,
            buf,
            start: 0,
            end: 0,
            partial: None,
            counters,
            drained: false,
            progress: 0,
            budget: None,
            awaiting: None,
            body_reserved: None,
            awaiting_body: false,
            lowat: 1,
            lowat_cap: 0,
            block: false,
            dead: None,
            zc: matches!(cfg.backend, Backend::ZeroCopy | Backend::Auto).then_some(ZcState {
                struct_idx: 0,
                flags: if cfg.zc_tlb_clean_hint {
                    sys::ZC_FLAG_TLB_CLEAN_HINT
                } else {
                    0
                },
            }),
            zc_off: None,
            mmap_on: false,
            auto: (cfg.backend == Backend::Auto).then(|| auto::Chooser::new(cfg.auto_floor)),
            link: None,
            released: Arc::default(),
            kept: (cfg.kept_mappings > 0 && cfg.backend != Backend::Copy)
                .then(|| pagerpc_pages::KeptMappings::new(cfg.kept_mappings)),
            cfg,
        };
        if r.cfg.backend == Backend::Mmap {
            match sys::enable_mmap_consume(r.fd.as_fd()) {
                Ok(()) => r.mmap_on = true,
                Err(e) => {
                    // A stock kernel: use TCP_ZEROCOPY_RECEIVE instead.
                    r.zc_off = Some(format!(
                        "TCP_MMAP_CONSUME not available ({e}); using TCP_ZEROCOPY_RECEIVE"
                    ));
                    r.zc = Some(ZcState {
                        struct_idx: 0,
                        flags: if r.cfg.zc_tlb_clean_hint {
                            sys::ZC_FLAG_TLB_CLEAN_HINT
                        } else {
                            0
                        },
                    });
                }
            }
        }
        r
    }

    /// The backend configured.
    pub fn backend(&self) -> Backend {
        self.cfg.backend
    }

    /// Whether zero-copy receive (either kind) is on for this connection
    /// right now.
    pub fn zerocopy_active(&self) -> bool {
        self.zc.is_some() || self.mmap_on
    }

    /// How payloads are placed right now.
    /// With [`Backend::Auto`], the path the connection is settled on.
    pub fn path(&self) -> ReceivePath {
        if self.mmap_on {
            ReceivePath::Mmap
        } else if let Some(a) = &self.auto {
            if a.settled() == auto::Path::Map && self.zc.is_some() {
                ReceivePath::ZeroCopy
            } else {
                ReceivePath::Copy
            }
        } else if self.zc.is_some() {
            ReceivePath::ZeroCopy
        } else {
            ReceivePath::Copy
        }
    }

    /// Whether the patched kernel's consuming `mmap()` is in use.
    pub fn mmap_active(&self) -> bool {
        self.mmap_on
    }

    /// Why zero-copy receive was switched off for this connection, if it
    /// was configured and then given up.
    pub fn zerocopy_off_reason(&self) -> Option<&str> {
        self.zc_off.as_deref()
    }

    /// This connection's counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Links this receiver with its connection's sender (the same `link`
    /// goes to the sender's `set_payload_send_link`). The receiver then
    /// passes on the peer's requests to write payloads by copy or with
    /// `MSG_ZEROCOPY` (CREDIT frames on call 0 with `payload_send`, still
    /// delivered as frames), and, with [`Backend::Auto`], makes its own
    /// requests through it.
    pub fn set_payload_send_link(&mut self, link: Arc<PayloadSendLink>) {
        self.link = Some(link);
    }

    /// Whether a request of this receiver's for the peer waits for the
    /// linked sender to write it (at its next enqueue or flush).
    pub fn has_payload_send_request(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.has_request())
    }

    /// Whether a frame's prefix or header has started but not finished
    /// (a peer that dribbles a header is caught by this).
    pub fn in_head(&self) -> bool {
        match self.decoder.need() {
            Need::Prefix(n) => n < pagerpc_core::PREFIX_LEN || self.start < self.end,
            Need::Header { .. } => true,
            Need::Payload { .. } | Need::Failed => false,
        }
    }

    /// Reserves every separate payload, and every body larger than the
    /// read buffer, from `budget` before allocating anything for it (a body
    /// when its prefix arrives, a payload when its header completes). While
    /// the budget has no room, the receiver stops at that frame's prefix or
    /// header ([`poll_frame`](Self::poll_frame) returns `None` and
    /// [`awaiting_budget`](Self::awaiting_budget) is true) and reads nothing
    /// more until a later call finds room.
    pub fn set_budget(&mut self, budget: Arc<dyn PayloadBudget>) {
        self.budget = Some(budget);
    }

    /// Whether the receiver is stopped at a header whose payload waits for
    /// room in the budget.
    pub fn awaiting_budget(&self) -> bool {
        self.awaiting.is_some() || self.awaiting_body
    }

    /// Reserves the body of the frame whose prefix was just decoded, if
    /// there is a budget and it is not reserved yet. `false` if the budget
    /// has no room now.
    fn reserve_body(&mut self) -> bool {
        let (Some(budget), Some(prefix)) = (&self.budget, self.decoder.pending_prefix()) else {
            return true;
        };
        // A body no larger than the read buffer costs what a header or an
        // inline payload costs (bounded per connection, like them): only
        // larger ones are reserved. Reserving every body would stop a
        // connection at its first small frame (a SETTINGS) whenever other
        // connections hold the whole budget.
        if prefix.body_len as usize <= self.cfg.read_buf || self.body_reserved.is_some() {
            return true;
        }
        let bytes = prefix.body_len as usize;
        self.awaiting_body = !budget.try_reserve(bytes);
        if !self.awaiting_body {
            self.body_reserved = Some(Reservation {
                budget: budget.clone(),
                bytes,
            });
        }
        !self.awaiting_body
    }

    /// Changes the limits for frames from the next prefix on (a server
    /// keeps them tiny until the peer authenticates).
    pub fn set_limits(&mut self, limits: Limits) {
        self.cfg.limits = limits;
        self.decoder.set_limits(limits);
    }

    /// A counter that grows whenever bytes of the peer's arrive (read into
    /// the buffer, or placed into a payload): an event loop compares it
    /// between turns to tell a slow peer from a stalled one.
    pub fn progress(&self) -> u64 {
        self.progress
    }

    /// Bytes read from the socket and not yet consumed: frames an event
    /// loop can get without the socket becoming readable again.
    pub fn buffered_bytes(&self) -> usize {
        self.end - self.start
    }

    /// Whether the receiver is between frames with nothing buffered.
    pub fn is_idle(&self) -> bool {
        self.decoder.at_boundary() && self.start == self.end
    }

    /// The socket reported new readable readiness: the next
    /// [`poll_frame`](Self::poll_frame) reads from it even if the last read
    /// came up short. A short read normally lets the next `poll_frame`
    /// report "nothing more" without a system call, which relies on
    /// level-triggered readiness to report bytes that arrived since; a
    /// driver with edge-triggered readiness (tokio's `AsyncFd`) calls this
    /// for every readable event, or bytes that arrived after a short read
    /// would wait for the next edge.
    pub fn readable(&mut self) {
        self.drained = false;
    }

    /// Makes as much progress as the socket allows without blocking, and
    /// returns the next complete frame, or `None` if the socket has no more
    /// bytes for now.
    ///
    /// # Errors
    /// [`RecvError::Closed`] at a clean end of stream, [`RecvError::Codec`]
    /// for bad or truncated frames (sticky: the connection is unusable), and
    /// [`RecvError::Io`] for socket failures.
    ///
    /// A frame whose payload fails its CRC32C (when the header carries one)
    /// is returned as [`RecvError::ChecksumMismatch`] instead, and the
    /// connection stays usable.
    pub fn poll_frame(&mut self) -> Result<Option<Frame>, RecvError> {
        if let Some(e) = &self.dead {
            return Err(RecvError::Codec(e.clone()));
        }
        self.auto_resume();
        let r = self.poll_inner().and_then(|f| match f {
            Some(frame) => verify_checksum(frame).map(Some),
            None => Ok(None),
        });
        self.auto_pause();
        if let Err(RecvError::Codec(e)) = &r {
            self.dead = Some(e.clone());
            self.partial = None;
        }
        r
    }

    fn poll_inner(&mut self) -> Result<Option<Frame>, RecvError> {
        if let Some(head) = self.awaiting.take() {
            if !self.start_payload(head)? {
                return Ok(None);
            }
        }
        loop {
            let step = match self.decoder.need() {
                Need::Failed => {
                    return Err(self
                        .decoder
                        .finish()
                        .err()
                        .map_or(RecvError::Closed, RecvError::Codec))
                }
                Need::Prefix(n) => self.step_meta(n)?,
                Need::Header {
                    remaining,
                    inline_payload,
                } => {
                    if !self.reserve_body() {
                        return Ok(None);
                    }
                    self.step_meta(remaining.saturating_add(inline_payload as usize))?
                }
                Need::Payload { remaining, .. } => self.step_payload(remaining)?,
            };
            match step {
                Step::Frame(f) => return Ok(Some(f)),
                Step::Progress => {}
                Step::Blocked => {
                    self.drained = false;
                    return Ok(None);
                }
            }
        }
    }

    /// Blocks until the next complete frame arrives or `deadline` passes.
    ///
    /// # Errors
    /// As [`poll_frame`](Self::poll_frame), plus [`RecvError::TimedOut`].
    ///
    /// Without a deadline, on a socket in blocking mode, this blocks in
    /// `recv` itself rather than in `poll` followed by `recv`: one syscall
    /// per wake-up instead of two, which is most of a small call's cost.
    pub fn recv_frame(&mut self, deadline: Option<Instant>) -> Result<Frame, RecvError> {
        if deadline.is_none() {
            self.block = true;
            let r = self.poll_frame();
            self.block = false;
            match r {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {} // the socket is non-blocking: wait below
                Err(e) => return Err(e),
            }
        }
        loop {
            if let Some(f) = self.poll_frame()? {
                return Ok(f);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(RecvError::TimedOut);
            }
            self.wait_lowat();
            if !sys::wait_readable(self.fd.as_fd(), left).map_err(RecvError::Io)? {
                return Err(RecvError::TimedOut);
            }
        }
    }

    /// Before waiting for readiness: while a large payload is missing bytes,
    /// ask the kernel not to report the socket readable until a good chunk
    /// of them is there, so a waiter wakes once per chunk rather than once
    /// per segment. Restores the default between payloads. Event loops call
    /// this before re-arming the socket.
    pub fn wait_lowat(&mut self) {
        let want = match self.decoder.need() {
            // A blocked recv is woken only when the bytes still queued reach
            // the mark, not counting what it already copied: with a mark
            // above 1 it can sleep forever with the rest of a frame queued.
            // Blocking reads use MSG_WAITALL for payloads instead.
            _ if self.block => 1,
            Need::Payload { remaining, .. } if self.start == self.end => {
                // Never more than a quarter of the receive buffer: a larger
                // mark makes the kernel clamp the receive window to it, the
                // window then closes, and the sender splits segments at the
                // window edge, off page boundaries, which makes the rest of
                // the payload unmappable.
                if self.lowat_cap == 0 {
                    self.lowat_cap =
                        sys::rcvbuf(self.fd.as_fd()).map_or(MAX_LOWAT, |b| (b / 4).max(4096));
                }
                remaining.min(MAX_LOWAT.min(self.lowat_cap) as u64) as i32
            }
            _ => {
                // Between payloads: re-read the (autotuned) buffer size
                // before the next large wait.
                self.lowat_cap = 0;
                1
            }
        };
        if want != self.lowat && sys::set_rcvlowat(self.fd.as_fd(), want).is_ok() {
            self.lowat = want;
        }
    }

    /// Feeds prefix/header bytes (reading more if none are buffered) and
    /// starts a payload when a head completes.
    fn step_meta(&mut self, want: usize) -> Result<Step, RecvError> {
        if self.block {
            // A blocking recv honours SO_RCVLOWAT: make sure the mark left
            // by a previous payload does not make it wait for bytes that are
            // not coming.
            self.wait_lowat();
        }
        if self.start == self.end && ((self.drained && !self.block) || !self.fill_buf(want)?) {
            return Ok(Step::Blocked);
        }
        // A prefix alone first: a body is reserved from the budget before
        // any of it is taken in.
        let end = match self.decoder.need() {
            Need::Prefix(n) => self.end.min(self.start + n),
            _ => self.end,
        };
        let (used, head) = self.decoder.feed(&self.buf[self.start..end])?;
        self.start += used;
        let Some(head) = head else {
            return Ok(Step::Progress);
        };
        self.body_reserved = None;
        self.peek_request(&head);
        let len = head.payload_len();
        if len == 0 {
            self.counters.frame_received(0);
            return Ok(Step::Frame(Frame {
                head,
                payload: Pages::empty(),
                mapped: 0,
            }));
        }
        if self.start_payload(head)? {
            Ok(Step::Progress)
        } else {
            Ok(Step::Blocked)
        }
    }

    /// Reserves room for a head's payload and creates its destination.
    /// Returns `false` (keeping the head) if the budget has no room now.
    fn start_payload(&mut self, head: FrameHead) -> Result<bool, RecvError> {
        let len = head.payload_len();
        // The decoder checked the length against max_payload_bytes.
        let len = usize::try_from(len).map_err(|_| {
            RecvError::Codec(CodecError::PayloadTooLarge {
                limit: self.cfg.limits.max_payload_bytes,
                got: len,
            })
        })?;
        // Inline payloads come with their header, bounded by the read
        // buffer; only separate payloads are reserved.
        let reserved = match &self.budget {
            Some(b) if !head.inline_payload() => {
                let bytes = pagerpc_core::page_round_up(len);
                if !b.try_reserve(bytes) {
                    self.awaiting = Some(head);
                    return Ok(false);
                }
                Some(Reservation {
                    budget: b.clone(),
                    bytes,
                })
            }
            _ => None,
        };
        let plan = self.auto_plan(&head, len);
        // A measured receive includes making the payload's memory (a
        // mapping on the socket, or pages to copy into).
        let since = match plan {
            Some(p) if p.measure => sys::thread_cpu_ns(),
            _ => None,
        };
        let map = plan.is_none_or(|p| p.path == auto::Path::Map);
        let sink = self.new_sink(&head, len, map)?;
        let copy_reason = if plan.is_some_and(|p| p.path == auto::Path::Copy) {
            CopyReason::Auto
        } else if self.zc.is_some() || self.mmap_on {
            CopyReason::PayloadTail
        } else {
            CopyReason::BackendOff
        };
        self.partial = Some(Partial {
            head,
            sink,
            _reserved: reserved,
            filled: 0,
            copy_reason,
            copy_until: 0,
            mapped: 0,
            single_page: false,
            refusals: 0,
            auto: plan.map(|plan| AutoRecv {
                plan,
                cpu_ns: 0,
                since,
            }),
        });
        Ok(true)
    }

    /// A frame's head arrived: pass on a request of the peer's about how
    /// to write payloads (CREDIT on call 0 with `payload_send`).
    fn peek_request(&mut self, head: &FrameHead) {
        if head.kind() != Kind::Credit || head.call_id() != 0 {
            return;
        }
        let Some(link) = &self.link else {
            return;
        };
        let mode = PayloadSend::try_from(head.header.payload_send).unwrap_or_default();
        if mode != PayloadSend::Unspecified {
            link.peer_asked(mode);
            self.counters.peer_asked(mode == PayloadSend::Zerocopy);
        }
    }

    /// With [`Backend::Auto`]: the path of a payload of `len` bytes whose
    /// head just arrived (and what to ask the peer now).
    fn auto_plan(&mut self, head: &FrameHead, len: usize) -> Option<auto::Plan> {
        let chooser = self.auto.as_mut()?;
        let sent = match PayloadSend::try_from(head.header.payload_send) {
            Ok(PayloadSend::Zerocopy) => auto::SentAs::ZeroCopy,
            Ok(PayloadSend::Copy) => auto::SentAs::Copy,
            _ => auto::SentAs::Unknown,
        };
        // Mappable only if none of it was read into the buffer with its
        // header.
        let can_map = self.zc.is_some() && self.start == self.end;
        let plan = chooser.plan(len as u64, !head.inline_payload(), sent, can_map);
        self.auto_requests();
        Some(plan)
    }

    /// Hands the chooser's request for the peer, if any, to the sender.
    fn auto_requests(&mut self) {
        let Some(chooser) = self.auto.as_mut() else {
            return;
        };
        if let Some(path) = chooser.take_request() {
            if let Some(link) = &self.link {
                link.ask_peer(match path {
                    auto::Path::Map => PayloadSend::Zerocopy,
                    auto::Path::Copy => PayloadSend::Copy,
                });
            }
        }
    }

    /// Before working on the socket: restart the CPU clock of a payload
    /// being measured.
    fn auto_resume(&mut self) {
        if let Some(a) = self.partial.as_mut().and_then(|p| p.auto.as_mut()) {
            if a.plan.measure && a.since.is_none() {
                a.since = sys::thread_cpu_ns();
            }
        }
    }

    /// After working on the socket: add the CPU time spent on a payload
    /// being measured.
    fn auto_pause(&mut self) {
        if let Some(a) = self.partial.as_mut().and_then(|p| p.auto.as_mut()) {
            // The clock only for a payload being measured (each read is a
            // system call).
            if let Some(t0) = a.since.take() {
                if let Some(t1) = sys::thread_cpu_ns() {
                    a.cpu_ns += t1.saturating_sub(t0);
                }
            }
        }
    }

    /// A payload received with [`Backend::Auto`]: count it, and tell the
    /// chooser what it cost.
    fn auto_finish(&mut self, a: AutoRecv, len: u64, mapped: u64) {
        self.counters.auto_payload(a.plan.choice(), len);
        let Some(chooser) = self.auto.as_mut() else {
            return;
        };
        let cpu = if a.plan.measure {
            let mut ns = a.cpu_ns;
            if let Some(t0) = a.since {
                if let Some(t1) = sys::thread_cpu_ns() {
                    ns += t1.saturating_sub(t0);
                }
            }
            let ns = match &self.cfg.auto_cost_bias {
                Some(bias) => bias.apply(a.plan.path, ns),
                None => ns,
            };
            Some(ns)
        } else {
            None
        };
        for path in [auto::Path::Map, auto::Path::Copy] {
            let (ns, bytes) = self.released.take(path);
            if bytes > 0 {
                let ns = match &self.cfg.auto_cost_bias {
                    Some(bias) => bias.apply(path, ns),
                    None => ns,
                };
                chooser.released(path, ns, bytes);
            }
        }
        chooser.finish(a.plan, len, mapped, cpu);
        self.auto_requests();
    }

    /// Chooses where a payload of `len` bytes goes.
    /// `map`: mapping is allowed for it (with [`Backend::Auto`], only when
    /// the chooser says so).
    fn new_sink(&mut self, head: &FrameHead, len: usize, map: bool) -> Result<Sink, RecvError> {
        if self.mmap_on && !head.inline_payload() && len >= pagerpc_core::PAGE_SIZE {
            match sys::ConsumeRegion::new(len) {
                Ok(r) => return Ok(Sink::Consume(r)),
                // No mapping can be made now (out of memory, or the process
                // is at vm.max_map_count): copy this payload; the next one
                // tries mapping again.
                Err(e) if is_enomem(&e) => {}
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
        if map && self.zc.is_some() && !head.inline_payload() && len >= pagerpc_core::PAGE_SIZE {
            match sys::SockRegion::new(self.fd.as_fd(), len, self.kept.as_ref()) {
                Ok(r) => {
                    self.counters.socket_map(r.reused());
                    return Ok(Sink::Zc(r));
                }
                // No mapping can be made now (out of memory, or the process
                // is at vm.max_map_count, which kept payloads fill): copy
                // this payload, and keep zero-copy on for the next ones.
                Err(e) if is_enomem(&e) => {}
                // The socket cannot be mapped (no zero-copy support here):
                // copy from now on.
                Err(e) => self.zc_disable(format!("mmap() on the socket failed: {e}")),
            }
        }
        // Every byte is written before the payload is delivered.
        Ok(Sink::Buf(
            PageBuf::for_overwrite(len).map_err(RecvError::Io)?,
        ))
    }

    fn zc_disable(&mut self, why: String) {
        self.zc = None;
        self.zc_off.get_or_insert(why);
        if let Some(chooser) = self.auto.as_mut() {
            chooser.map_unavailable();
            self.auto_requests();
        }
    }

    /// Moves payload bytes into the partial payload: mapped from the socket
    /// where possible, otherwise copied from the buffer or the socket.
    /// Returns the frame once it is complete.
    fn step_payload(&mut self, remaining: u64) -> Result<Step, RecvError> {
        let rem = usize::try_from(remaining).unwrap_or(usize::MAX);
        let Some(p) = self.partial.as_mut() else {
            // Unreachable: the decoder enters the payload state only through
            // step_meta, which creates the partial payload.
            return Err(RecvError::Io(io::Error::other(
                "payload state without a destination",
            )));
        };
        let mut rem = rem;
        let aligned = p.head.payload_len() as usize & !(pagerpc_core::PAGE_SIZE - 1);
        if p.filled < p.copy_until {
            // Copy the pages the kernel could not map, then map again.
            rem = rem.min(p.copy_until - p.filled);
        } else {
            match &p.sink {
                Sink::Zc(region) if p.filled < region.socket_end() => return self.step_zerocopy(),
                Sink::Consume(_) if p.filled < aligned && self.mmap_on => {
                    return self.step_consume(aligned)
                }
                _ => {}
            }
        }
        let buffered = self.end - self.start;
        if buffered == 0 {
            if self.drained && !self.block {
                return Ok(Step::Blocked);
            }
            if self.block {
                self.wait_lowat();
            }
            let Some(p) = self.partial.as_ref() else {
                return Ok(Step::Blocked);
            };
            if rem < self.buf.len() / 2 && matches!(p.sink, Sink::Buf(_)) {
                // A small remainder: read it (and, with the copy backend,
                // what follows) into the buffer.
                return Ok(if self.fill_buf(rem)? {
                    Step::Progress
                } else {
                    Step::Blocked
                });
            }
        }
        let Some(p) = self.partial.as_mut() else {
            return Ok(Step::Blocked);
        };
        let dest: &mut [u8] = match &mut p.sink {
            Sink::Buf(b) => &mut b[p.filled..p.filled + rem],
            Sink::Zc(r) => r.writable(p.filled, rem),
            Sink::Consume(r) => r.writable(p.filled, rem),
        };
        let n = if buffered > 0 {
            let n = rem.min(buffered);
            dest[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            n
        } else {
            // Read straight into the payload's pages.
            let wait = if self.block {
                sys::Wait::All
            } else {
                sys::Wait::No
            };
            match sys::recv(self.fd.as_fd(), dest, wait) {
                Ok(0) => return Err(self.eof()),
                Ok(n) => {
                    self.drained = n < rem;
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Blocked),
                Err(e) => return Err(RecvError::Io(e)),
            }
        };
        self.copied(n);
        self.payload_progress(n)
    }

    /// Counts `n` bytes copied at the current position of the partial
    /// payload, splitting off those that belong to its tail.
    fn copied(&self, n: usize) {
        let Some(p) = self.partial.as_ref() else {
            return;
        };
        let len = p.head.payload_len() as usize;
        let tail_start = if matches!(p.copy_reason, CopyReason::BackendOff | CopyReason::Auto) {
            len
        } else {
            len & !(pagerpc_core::PAGE_SIZE - 1)
        };
        let body = tail_start.saturating_sub(p.filled).min(n);
        if body > 0 {
            self.counters.copied(p.copy_reason, body as u64);
        }
        if n > body {
            self.counters
                .copied(CopyReason::PayloadTail, (n - body) as u64);
        }
    }

    /// Records `n` more payload bytes placed; delivers the frame when done.
    fn payload_progress(&mut self, n: usize) -> Result<Step, RecvError> {
        self.progress += n as u64;
        let Some(p) = self.partial.as_mut() else {
            return Ok(Step::Progress);
        };
        p.filled += n;
        if let Sink::Consume(r) = &mut p.sink {
            r.advance(p.filled);
        }
        if !self.decoder.payload_received(n as u64) {
            return Ok(Step::Progress);
        }
        let Some(mut p) = self.partial.take() else {
            return Ok(Step::Progress);
        };
        self.counters.frame_received(p.filled as u64);
        let mut measured = None;
        if let Some(a) = p.auto.take() {
            if a.plan.measure {
                measured = Some(a.plan.path);
            }
            self.auto_finish(a, p.filled as u64, p.mapped);
        }
        let mut payload = match p.sink {
            Sink::Buf(b) => b.freeze(),
            Sink::Zc(r) => r.into_pages(p.filled),
            Sink::Consume(r) => r.into_pages(p.filled),
        };
        if let Some(path) = measured {
            // What releasing it costs (unmapping socket pages, say) counts
            // toward its path too, once the consumer drops it.
            let costs = self.released.clone();
            let bytes = p.filled as u64;
            let _ = payload.time_release(Box::new(move |ns| costs.add(path, ns, bytes)));
        }
        Ok(Step::Frame(Frame {
            head: p.head,
            payload,
            mapped: p.mapped,
        }))
    }

    /// One consuming-`mmap()` step inside the whole-page part of a payload:
    /// map as many whole pages as are queued (all or nothing), one page at a
    /// time after a refusal, copying pages the kernel refuses.
    fn step_consume(&mut self, aligned: usize) -> Result<Step, RecvError> {
        let fd = self.fd.clone();
        let queued = sys::inq(fd.as_fd()).map_err(RecvError::Io)?;
        let Some(p) = self.partial.as_mut() else {
            return Ok(Step::Blocked);
        };
        let Sink::Consume(region) = &mut p.sink else {
            return Ok(Step::Blocked);
        };
        let want = aligned - p.filled;
        let mut chunk = want.min(queued & !(pagerpc_core::PAGE_SIZE - 1));
        if p.single_page || chunk == 0 {
            // One page: after a refusal, or to learn whether a short queue
            // means "wait" (EAGAIN) or "closed" (EIO).
            chunk = pagerpc_core::PAGE_SIZE;
        }
        match region.map_next(fd.as_fd(), p.filled, chunk) {
            Ok(()) => {
                p.refusals = 0;
                p.single_page = false;
                self.counters.mapped(chunk as u64);
                p.mapped += chunk as u64;
                self.payload_progress(chunk)
            }
            // The failed mapping left a hole that could not be re-reserved
            // without replacing whatever occupies it now: the region can
            // neither map nor copy there. Abandon the payload (the region
            // unmaps only what is still its own) and fail.
            Err(e) if region.lost() => {
                self.partial = None;
                Err(RecvError::Io(e))
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(Step::Blocked),
                Some(libc::EIO) => Err(self.eof()),
                Some(libc::EINVAL) if chunk > pagerpc_core::PAGE_SIZE => {
                    // Some page of the chunk is not mappable: find it.
                    p.single_page = true;
                    Ok(Step::Progress)
                }
                Some(libc::EINVAL) => {
                    // This page is not a whole, aligned page in the queue:
                    // copy it. After several in a row the stream is no
                    // longer page-aligned relative to the payload: copy the
                    // rest.
                    p.refusals += 1;
                    p.copy_reason = CopyReason::Unmappable;
                    p.copy_until = if p.refusals >= 8 {
                        p.head.payload_len() as usize
                    } else {
                        p.filled + pagerpc_core::PAGE_SIZE
                    };
                    Ok(Step::Progress)
                }
                Some(libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT) => Err(RecvError::Io(e)),
                _ => {
                    // The kernel refuses the mapping outright: copy from now on.
                    self.mmap_on = false;
                    self.zc_off
                        .get_or_insert(format!("consuming mmap() failed: {e}"));
                    if let Some(p) = self.partial.as_mut() {
                        p.copy_reason = CopyReason::BackendOff;
                        p.copy_until = p.head.payload_len() as usize;
                    }
                    Ok(Step::Progress)
                }
            },
        }
    }

    /// One `TCP_ZEROCOPY_RECEIVE` step inside the whole-page part of a
    /// payload.
    fn step_zerocopy(&mut self) -> Result<Step, RecvError> {
        let fd = self.fd.clone();
        let Some(p) = self.partial.as_mut() else {
            return Ok(Step::Blocked);
        };
        let Sink::Zc(region) = &mut p.sink else {
            return Ok(Step::Blocked);
        };
        let Some(zc) = self.zc.as_mut() else {
            // Switched off mid-payload: copy the rest.
            if let Err(e) = region.make_writable_from(p.filled) {
                zc_to_buf(p, e)?;
            }
            p.copy_reason = CopyReason::BackendOff;
            return Ok(Step::Progress);
        };
        let want = region.socket_end() - p.filled;
        let struct_len = sys::ZC_STRUCT_LENS[zc.struct_idx];
        // Offer the payload's tail page as the copy buffer for its
        // sub-page tail: the kernel copies the bytes that follow the
        // mapped pages there in the same call, saving a `recv`, whenever
        // they are queued right behind them (in the same buffer).
        let tail = (p.head.payload_len() as usize).saturating_sub(region.socket_end());
        let copybuf = if tail < pagerpc_core::PAGE_SIZE {
            tail
        } else {
            0
        };
        match region.zerocopy(fd.as_fd(), p.filled, want, zc.flags, struct_len, copybuf) {
            Ok(out) if out.copied > 0 && out.err.is_none() => self.zc_mapped_and_copied(out),
            Ok(out) if out.mapped > 0 => {
                self.counters.mapped(out.mapped as u64);
                p.mapped += out.mapped as u64;
                let step = self.payload_progress(out.mapped)?;
                let Some(errno) = out.err else {
                    return Ok(step);
                };
                // The kernel mapped and consumed these bytes, then reported
                // a socket error (and cleared it). They are accounted above,
                // so the payload's offsets stay true and the region, which
                // holds them, unmaps them when dropped. The connection is
                // broken: fail with its error instead of carrying on (the
                // old code dropped the bytes from the accounting and, for
                // errors it did not treat as fatal, copied what followed
                // them into their place). The payload, partial or just
                // completed, is dropped, never delivered.
                drop(step);
                self.partial = None;
                Err(RecvError::Io(io::Error::from_raw_os_error(errno)))
            }
            Ok(out) if out.skip > 0 => {
                // The kernel cannot map what is at the head of the queue: a
                // segment that is not whole, aligned pages, or fewer than a
                // page queued. Copy exactly those bytes. If they are whole
                // pages, the data after them is still page-aligned relative
                // to the payload and mapping resumes; otherwise the rest of
                // the payload is misaligned and is copied too.
                p.copy_reason = stretch_reason(out.inq);
                let skip = out.skip.min(want);
                if skip.is_multiple_of(pagerpc_core::PAGE_SIZE) {
                    match region.make_writable(p.filled, p.filled + skip) {
                        Ok(()) => p.copy_until = p.filled + skip,
                        Err(e) => zc_to_buf(p, e)?,
                    }
                } else if let Err(e) = region.make_writable_from(p.filled) {
                    zc_to_buf(p, e)?;
                } else {
                    p.copy_until = p.head.payload_len() as usize;
                }
                Ok(Step::Progress)
            }
            // Nothing queued yet: wait (SO_RCVLOWAT + poll), never read().
            Ok(_) => Ok(Step::Blocked),
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(Step::Blocked),
                Some(libc::EIO) => Err(self.eof()),
                Some(libc::EINVAL) if zc.struct_idx + 1 < sys::ZC_STRUCT_LENS.len() => {
                    // An older kernel: try the next shorter struct.
                    zc.struct_idx += 1;
                    Ok(Step::Progress)
                }
                Some(libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT) => Err(RecvError::Io(e)),
                _ => {
                    self.zc_disable(format!("TCP_ZEROCOPY_RECEIVE failed: {e}"));
                    Ok(Step::Progress)
                }
            },
        }
    }

    /// A `TCP_ZEROCOPY_RECEIVE` that mapped `out.mapped` bytes (maybe none)
    /// and then copied `out.copied` bytes, those that follow them in the
    /// stream, into the copy buffer: the anonymous page after the region's
    /// socket part. That is where they belong when the mapped pages were
    /// the payload's last whole ones (the tail). Otherwise the kernel
    /// could not map what follows the mapped pages whole (a segment off
    /// page boundaries, or less than a page queued): the copied bytes go
    /// where they belong, and the rest of the payload is copied, as after
    /// any misaligned stretch.
    fn zc_mapped_and_copied(&mut self, out: sys::ZcOut) -> Result<Step, RecvError> {
        let n = out.copied;
        let Some(p) = self.partial.as_mut() else {
            return Ok(Step::Blocked);
        };
        let Sink::Zc(region) = &mut p.sink else {
            return Ok(Step::Blocked);
        };
        // The bytes to move (rare: a misaligned stream), read before the
        // region changes.
        let misplaced =
            (p.filled + out.mapped != region.socket_end()).then(|| region.copybuf(n).to_vec());
        if misplaced.is_none() {
            self.counters.tail_copied_with_map();
        }
        if out.mapped > 0 {
            self.counters.mapped(out.mapped as u64);
            p.mapped += out.mapped as u64;
            // Never completes the payload: the copied bytes follow.
            if let Step::Frame(_) = self.payload_progress(out.mapped)? {
                return Err(RecvError::Io(io::Error::other(
                    "the kernel copied bytes past a payload's end",
                )));
            }
        }
        let Some(p) = self.partial.as_mut() else {
            return Ok(Step::Blocked);
        };
        if let Some(bytes) = misplaced {
            p.copy_reason = stretch_reason(out.inq);
            p.copy_until = p.head.payload_len() as usize;
            if let Sink::Zc(region) = &mut p.sink {
                if let Err(e) = region.make_writable_from(p.filled) {
                    zc_to_buf(p, e)?;
                }
            }
            let at = p.filled;
            let dest: &mut [u8] = match &mut p.sink {
                Sink::Buf(b) => &mut b[at..at + n],
                Sink::Zc(r) => r.writable(at, n),
                Sink::Consume(r) => r.writable(at, n),
            };
            dest.copy_from_slice(&bytes);
        }
        self.copied(n);
        self.payload_progress(n)
    }

    /// Reads into the (compacted) buffer. With the copy backend it reads as
    /// much as fits; with zero-copy it reads exactly `want` bytes at most
    /// (the rest of the current section), so as never to pull a mappable
    /// payload into the buffer. Returns `false` if the socket had nothing.
    fn fill_buf(&mut self, want: usize) -> Result<bool, RecvError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let exact = match self.cfg.backend {
            Backend::Copy => false,
            Backend::Auto => self.auto.as_ref().is_some_and(auto::Chooser::exact_reads),
            _ => true,
        };
        let room = &mut self.buf[self.end..];
        let room = if exact {
            let n = want.clamp(1, room.len());
            &mut room[..n]
        } else {
            room
        };
        let asked = room.len();
        let wait = if self.block {
            sys::Wait::Some
        } else {
            sys::Wait::No
        };
        match sys::recv(self.fd.as_fd(), room, wait) {
            Ok(0) => Err(self.eof()),
            Ok(n) => {
                self.end += n;
                self.progress += n as u64;
                self.drained = n < asked;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(RecvError::Io(e)),
        }
    }

    /// The error for an end of stream here: clean between frames, truncation
    /// inside one. Only reached with an empty buffer.
    fn eof(&mut self) -> RecvError {
        self.partial = None;
        match self.decoder.finish() {
            Ok(()) => RecvError::Closed,
            Err(e) => RecvError::Codec(e),
        }
    }
}
