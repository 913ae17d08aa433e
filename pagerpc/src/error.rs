//! The error a caller gets from a failed call.

use std::fmt;

use pagerpc_core::{Code, Status};
use pagerpc_pages::Payload;

/// A failed call: a status (code and message) and, when the request never
/// fully left this process, the caller's payload handed back.
#[derive(Debug)]
pub struct CallError {
    status: Status,
    payload: Option<Payload>,
}

impl CallError {
    /// An error with `status` and no payload to return.
    pub fn new(status: Status) -> CallError {
        CallError {
            status,
            payload: None,
        }
    }

    pub(crate) fn with_payload(status: Status, payload: Payload) -> CallError {
        CallError {
            status,
            payload: Some(payload),
        }
    }

    /// The status code.
    pub fn code(&self) -> Code {
        self.status.code()
    }

    /// The status message.
    pub fn message(&self) -> &str {
        self.status.message()
    }

    /// The whole status.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Takes back the request payload, if the request was not sent.
    pub fn take_payload(&mut self) -> Option<Payload> {
        self.payload.take()
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.status.fmt(f)
    }
}

impl std::error::Error for CallError {}

impl From<Status> for CallError {
    fn from(s: Status) -> Self {
        CallError::new(s)
    }
}
