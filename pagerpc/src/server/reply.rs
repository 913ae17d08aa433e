//! Building the frames a server sends: responses and errors.

use pagerpc_core::{Code, CodecError, Header, Kind, Limits, Status};
use pagerpc_pages::Payload;
use pagerpc_sender::OutFrame;
use prost::Message;

use super::context::Reply;

/// The size checks the encoder would make, done before the frame is queued
/// so a too-large reply becomes an error for its own call only.
pub(crate) fn check_reply(
    header: &Header,
    payload_len: u64,
    limits: &Limits,
) -> Result<(), CodecError> {
    pagerpc_core::validate_header(header, limits)?;
    let hlen = header.encoded_len() as u64;
    if hlen > u64::from(limits.max_header_bytes) {
        return Err(CodecError::HeaderTooLarge {
            limit: limits.max_header_bytes,
            got: u32::try_from(hlen).unwrap_or(u32::MAX),
        });
    }
    if payload_len > limits.max_payload_bytes {
        return Err(CodecError::PayloadTooLarge {
            limit: limits.max_payload_bytes,
            got: payload_len,
        });
    }
    Ok(())
}

pub(crate) fn error_frame(call_id: u64, status: &Status) -> OutFrame {
    let mut message = status.message().to_owned();
    // Keep the header far below any sane header limit.
    if message.len() > 1024 {
        let mut cut = 1024;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    OutFrame {
        header: Header {
            call_id,
            kind: Kind::Error as i32,
            status_code: if status.code() == Code::Ok {
                Code::Unknown.as_u32()
            } else {
                status.code().as_u32()
            },
            status_message: message,
            ..Default::default()
        },
        payload: Payload::Empty,
    }
}

/// The frame answering call `call_id` with `result`, replacing a reply
/// that breaks the client's limits with an error that says which limit.
pub(crate) fn response_frame(
    call_id: u64,
    result: Result<Reply, Status>,
    limits: &Limits,
) -> OutFrame {
    match result {
        Ok(reply) => {
            let header = Header {
                call_id,
                kind: Kind::Response as i32,
                metadata: reply.metadata,
                body: reply.body,
                ..Default::default()
            };
            match check_reply(&header, reply.payload.len() as u64, limits) {
                Ok(()) => OutFrame {
                    header,
                    payload: reply.payload,
                },
                Err(e) => error_frame(
                    call_id,
                    &Status::resource_exhausted(format!("the response was not sent: {e}")),
                ),
            }
        }
        Err(status) => error_frame(call_id, &status),
    }
}

/// A frame with only a header of `kind` (PONG, AUTH).
pub(crate) fn control_frame(call_id: u64, kind: Kind, body: Vec<u8>) -> OutFrame {
    OutFrame {
        header: Header {
            call_id,
            kind: kind as i32,
            body,
            ..Default::default()
        },
        payload: Payload::Empty,
    }
}
