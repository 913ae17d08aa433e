//! Building the frames a server sends: responses and errors.

use pagerpc_core::{Code, Header, Kind, Limits, Status};
use pagerpc_pages::Payload;
use pagerpc_sender::OutFrame;

use super::context::Reply;

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
            match pagerpc_core::check_head(&header, reply.payload.len() as u64, limits) {
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
