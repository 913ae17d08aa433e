//! pagerpc: RPC over TCP for Linux, built around page-aligned framing so that
//! bulk payloads can be received without a copy.
//!
//! Each message is a small header followed by a payload sent as its own
//! `MSG_EOR`-ended part, so no TCP segment mixes header bytes with payload
//! bytes. The receiver reads the header, places the payload in page-aligned
//! memory, and hands it to the consumer as owned [`Pages`].
//!
//! ```no_run
//! use pagerpc::{Client, Payload, Server, Status};
//! use pagerpc::proto::MetadataEntry; // any prost message works as a body
//!
//! let server = Server::builder()
//!     .register("echo", |_ctx, req: MetadataEntry, pages| {
//!         Ok::<_, Status>((req, Payload::Pages(pages)))
//!     })
//!     .bind("127.0.0.1:0")?;
//! let client = Client::connect(server.local_addr())?;
//! let req = MetadataEntry { key: "hello".into(), value: vec![] };
//! let resp = client.call::<_, MetadataEntry>("echo", &req, vec![7u8; 1 << 20])?;
//! assert_eq!(resp.message.key, "hello");
//! assert_eq!(resp.payload.len(), 1 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Interceptors (see [`intercept`]) add metadata to outgoing calls and can
//! refuse calls before they are sent or handled. With the `tracing` cargo
//! feature, every call gets a `tracing` span on each side and every
//! connection open and close events (target `pagerpc`; the fields are
//! listed in the README's "Interceptors and tracing").
#![forbid(unsafe_code)]

#[cfg(feature = "tokio")]
mod async_client;
mod auth;
mod client;
mod error;
pub mod intercept;
pub mod netns;
mod segments;
mod server;
mod stream_message;
mod sys;
mod trace;
pub mod typed;

#[cfg(feature = "tokio")]
pub use async_client::{AsyncClient, AsyncStreamReceiver, AsyncStreamResponse, AsyncStreamSender};
pub use client::{
    CallBatch, CallOptions, Client, ClientConfig, PendingCall, Response, StreamMessage,
    StreamReceiver, StreamResponse, StreamSender,
};
pub use error::CallError;
pub use intercept::{ClientInterceptor, OutgoingCall, ServerInterceptor};
pub use segments::SegmentAlign;
#[cfg(feature = "tokio")]
pub use server::{AsyncInStream, AsyncOutStream, AsyncServer, AsyncServerBuilder};
pub use server::{
    Context, InStream, OutStream, Reply, Server, ServerBuilder, ServerConfig, StreamSendError,
};

pub use pagerpc_core::{
    AutoChoice, AutoCounts, Code, CodecError, Counters, CountersSnapshot, Limits, MetadataEntry,
    Status,
};
pub use pagerpc_pages::{cached_bytes, set_cache_limit, Origin, PageBuf, Pages, Payload};
#[doc(hidden)]
pub use pagerpc_receiver::AutoCostBias;
pub use pagerpc_receiver::{
    Backend, Frame, ReceivePath, RecvConfig, RecvError, DEFAULT_AUTO_FLOOR, DEFAULT_KEPT_MAPPINGS,
};
pub use pagerpc_sender::{SendConfig, SendError, ZcSendStats};

/// Includes the code `pagerpc-build` generated for a protobuf package
/// (`$OUT_DIR/<package>.rs`): its messages, and for each service a client,
/// a server trait and its registration.
///
/// ```ignore
/// pub mod kv {
///     pagerpc::include_proto!("pagerpc.examples.kv");
/// }
/// ```
#[macro_export]
macro_rules! include_proto {
    ($package:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
    };
}

/// The prost crate, for encoding request and response messages.
pub use prost;

/// The wire header messages.
pub mod proto {
    pub use pagerpc_proto::*;
}
/// The sans-IO codec, for tools that speak the wire format directly.
pub mod codec {
    pub use pagerpc_core::*;
}
