//! Example programs built on pagerpc's public API.
//!
//! - [`kv`]: an in-memory key-value server that keeps the payload pages it
//!   receives as its values (`kv-server`, `kv` binaries).
//! - [`storage`]: a storage node that writes received pages to disk with
//!   `O_DIRECT`, PUT and GET as client and server streams (flow control is
//!   the library's per-stream credit), CRC32C end to end, and rendezvous
//!   placement over several nodes (`storage-node` binary).
//! - [`util`]: helpers the binaries share.
#![forbid(unsafe_code)]

pub mod kv;
pub mod storage;
pub mod util;
