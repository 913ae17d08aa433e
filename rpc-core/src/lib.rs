//! The sans-IO heart of pagerpc: the frame codec, its limits and errors, the
//! receive state machine, status codes, transfer counters, and the
//! bookkeeping of `MSG_ZEROCOPY` completions.
//!
//! Nothing in this crate performs a system call. The send and receive halves
//! (`pagerpc-sender`, `pagerpc-receiver`) drive it from real sockets; tests,
//! property tests and fuzzers drive it from byte slices.
//!
//! A frame on the wire is `prefix | header | payload`; see
//! `docs/wire-format.md` and [`prefix`].
#![forbid(unsafe_code)]

pub mod conn;
pub mod counters;
pub mod decoder;
pub mod error;
pub mod frame;
pub mod limits;
pub mod prefix;
pub mod reader;
pub mod send_mode;
pub mod status;
pub mod zc_tracker;

pub use counters::{AutoChoice, AutoCounts, CopyReason, Counters, CountersSnapshot};
pub use decoder::{decode_stream, DecodedFrame, FrameDecoder, Need, Section, StreamOutcome};
pub use error::CodecError;
pub use frame::{check_head, encode_head, validate_header, FrameHead};
pub use limits::Limits;
pub use pagerpc_proto::{Header, Kind, MetadataEntry, PayloadSend};
pub use prefix::{encode_v1_error, Flags, Prefix, MAGIC, PREFIX_LEN, V1_PREFIX_LEN, VERSION};
pub use send_mode::PayloadSendLink;
pub use status::{Code, Status};
pub use zc_tracker::{ZcIds, ZcTracker};

/// A hash map with a fast hasher (foldhash), for tables looked up on every
/// frame: call ids, connection tokens, method names. Seeded per process,
/// which is enough for tables whose size a peer cannot grow past a limit.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The page size pagerpc aligns payloads to. Payload chunks are sent in
/// multiples of this size so that a receiver can map them.
pub const PAGE_SIZE: usize = 4096;

/// Rounds `n` up to a whole number of pages.
pub const fn page_round_up(n: usize) -> usize {
    n.div_ceil(PAGE_SIZE) * PAGE_SIZE
}
