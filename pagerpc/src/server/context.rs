//! What a handler gets and returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pagerpc_core::{MetadataEntry, Status};
use pagerpc_pages::{Pages, Payload};
use pagerpc_receiver::ReceivePath;

/// What a handler returns on success.
#[derive(Debug, Default)]
pub struct Reply {
    /// The encoded response message.
    pub body: Vec<u8>,
    /// The response payload.
    pub payload: Payload,
    /// Metadata to send back.
    pub metadata: Vec<MetadataEntry>,
}

/// What a handler learns about its call.
///
/// A blocking handler borrows it; an async handler (feature `tokio`) owns
/// it, so it can hold it across `.await`. Clones share the call's
/// cancellation flag.
#[derive(Clone, Debug)]
pub struct Context {
    pub(crate) call_id: u64,
    pub(crate) method: String,
    pub(crate) deadline: Option<Instant>,
    pub(crate) metadata: Vec<MetadataEntry>,
    pub(crate) cancelled: Arc<AtomicBool>,
    pub(crate) peer: SocketAddr,
    pub(crate) path: ReceivePath,
}

impl Context {
    /// How this connection's payloads were placed when it was set up
    /// (copy, `TCP_ZEROCOPY_RECEIVE`, or the patched kernel's `mmap()`).
    pub fn receive_path(&self) -> ReceivePath {
        self.path
    }

    /// The call id.
    pub fn call_id(&self) -> u64 {
        self.call_id
    }
    /// The method called.
    pub fn method(&self) -> &str {
        &self.method
    }
    /// When the caller stops waiting, if it set a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    /// The request's metadata.
    pub fn metadata(&self) -> &[MetadataEntry] {
        &self.metadata
    }
    /// Whether the caller cancelled the call (or its connection closed).
    /// Long handlers should check this and stop early.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
    /// The caller's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

/// A registered handler, on raw bytes.
pub(crate) type RawHandler = dyn Fn(&Context, &[u8], Pages) -> Result<Reply, Status> + Send + Sync;

/// The future an async handler returns.
#[cfg(feature = "tokio")]
pub(crate) type HandlerFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, Status>> + Send>>;

/// A registered async handler, on raw bytes (feature `tokio`).
#[cfg(feature = "tokio")]
pub(crate) type AsyncRawHandler = dyn Fn(Context, Vec<u8>, Pages) -> HandlerFuture + Send + Sync;

/// A unary method's handler: run on a pool thread (blocking server) or as
/// a task on the runtime (async server).
#[derive(Clone)]
pub(crate) enum Handler {
    /// A blocking handler.
    Sync(std::sync::Arc<RawHandler>),
    /// An async handler.
    #[cfg(feature = "tokio")]
    Async(std::sync::Arc<AsyncRawHandler>),
}
