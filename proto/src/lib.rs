//! Wire types of pagerpc: the prost messages carried in every frame's header.
//!
//! The framing around these messages (the fixed prefix, the limits, the
//! payload) lives in `pagerpc-core`; see `docs/wire-format.md`.
#![forbid(unsafe_code)]
#![allow(missing_docs)] // generated code; the .proto file documents each field

/// Messages of package `pagerpc.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/pagerpc.v1.rs"));
}

pub use v1::{Header, Kind, MetadataEntry, PayloadSend, Settings};
