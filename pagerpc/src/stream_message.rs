//! One message of a stream, as either side receives it, and the frames
//! both sides build for streams.

use pagerpc_core::{Header, Kind, MetadataEntry, Status};
use pagerpc_pages::{Pages, Payload};
use pagerpc_sender::OutFrame;
use prost::Message;

/// One message of a stream: its body (the application's encoded message)
/// and its payload.
#[derive(Debug)]
pub struct StreamMessage {
    /// The encoded message.
    pub body: Vec<u8>,
    /// The payload (empty if none). Credit for it goes back to the sender
    /// when the last handle to it is dropped.
    pub payload: Pages,
    /// Metadata sent with this message.
    pub metadata: Vec<MetadataEntry>,
}

impl StreamMessage {
    /// Decodes the body as `T`.
    ///
    /// # Errors
    /// [`Code::InvalidArgument`](crate::Code::InvalidArgument) when the
    /// body is not a `T`.
    pub fn decode<T: Message + Default>(&self) -> Result<T, Status> {
        T::decode(self.body.as_slice())
            .map_err(|e| Status::invalid_argument(format!("undecodable stream message: {e}")))
    }
}

impl StreamMessage {
    /// A received stream frame as the message its consumer is handed: its
    /// payload's credit goes back (`release(bytes)`) when the last handle
    /// to the pages is dropped, or at once when the pages cannot carry a
    /// hook (shared). One mechanism for both clients and the server.
    pub(crate) fn releasing(
        frame: pagerpc_receiver::Frame,
        release: impl FnOnce(u64) + Send + Sync + 'static,
    ) -> StreamMessage {
        let mut payload = frame.payload;
        let n = payload.len() as u64;
        if n > 0 {
            let hook: pagerpc_pages::ReleaseHook = Box::new(move |_| release(n));
            if let Err(hook) = payload.on_release(hook) {
                hook(0);
            }
        }
        StreamMessage {
            body: frame.head.header.body,
            payload,
            metadata: frame.head.header.metadata,
        }
    }
}

/// A CREDIT frame giving `credit` bytes back on stream `id` (0: the whole
/// connection).
pub(crate) fn credit_frame(id: u64, credit: u64) -> OutFrame {
    OutFrame {
        header: Header {
            call_id: id,
            kind: Kind::Credit as i32,
            credit,
            ..Default::default()
        },
        payload: Payload::Empty,
    }
}
