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
