//! The client side of a connection, without I/O: call ids, the calls
//! waiting for an answer, what each frame from the server means, and when
//! the connection is dead.

use super::CallTable;
use crate::{Code, FrameHead, Kind, Status};

/// What one frame from the server means for the client.
#[derive(Debug)]
#[non_exhaustive]
pub enum Incoming {
    /// The answer to call `call_id`: `Ok` for a RESPONSE or PONG, the
    /// server's status for an ERROR. A call that gave up is no longer in
    /// the table; its answer is dropped by the driver.
    Answer {
        /// The call.
        call_id: u64,
        /// `Ok(())` for a response, `Err` with the server's status.
        result: Result<(), Status>,
    },
    /// A message of stream `call_id` (STREAM_CHUNK).
    StreamMessage {
        /// The call.
        call_id: u64,
    },
    /// The server ended stream `call_id`: `Ok` for STREAM_END with status
    /// OK, `Err` with its status otherwise.
    StreamEnd {
        /// The call.
        call_id: u64,
        /// How it ended.
        result: Result<(), Status>,
    },
    /// The server gave `credit` bytes back on stream `call_id`.
    Credit {
        /// The call (0: the whole connection).
        call_id: u64,
        /// Bytes granted.
        credit: u64,
    },
    /// The server announced its limits (the frame's body holds them).
    Settings,
    /// The connection is over: every call fails with this status. With
    /// `shutdown`, the frame broke the protocol and the driver must shut
    /// the socket down too.
    Dead {
        /// Why.
        status: Status,
        /// Whether the driver must shut the socket down.
        shutdown: bool,
    },
}

/// One client connection's calls: ids, waiting calls (each with the
/// driver's token, such as a slot and a condition variable), and the
/// status the connection died with.
#[derive(Debug)]
pub struct ClientConn<C> {
    next_id: u64,
    calls: CallTable<C>,
    dead: Option<Status>,
}

impl<C> Default for ClientConn<C> {
    fn default() -> Self {
        ClientConn::new()
    }
}

impl<C> ClientConn<C> {
    /// A new connection; call ids start at 1 (0 is the connection's own).
    pub fn new() -> Self {
        ClientConn {
            next_id: 1,
            // The client bounds its calls itself; the table refuses id 0
            // and ids still waiting.
            calls: CallTable::new(usize::MAX),
            dead: None,
        }
    }

    /// Starts a call: a fresh id, with `token` kept until the call ends.
    ///
    /// # Errors
    /// The status the connection died with.
    pub fn start(&mut self, token: C) -> Result<u64, Status> {
        if let Some(dead) = &self.dead {
            return Err(dead.clone());
        }
        let mut token = token;
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            // Id 0, or (after 2^64 calls) an id still waiting: the next one.
            match self.calls.admit_or_return(id, token) {
                Ok(()) => return Ok(id),
                Err(t) => token = t,
            }
        }
    }

    /// The token of a waiting call.
    pub fn get(&self, id: u64) -> Option<&C> {
        self.calls.get(id)
    }

    /// The token of a waiting call, to update it.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut C> {
        self.calls.get_mut(id)
    }

    /// Ends a call (answered, gave up, or cancelled); its token.
    pub fn end(&mut self, id: u64) -> Option<C> {
        self.calls.finish(id)
    }

    /// Calls waiting.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether no call is waiting.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Every waiting call's token.
    pub fn tokens(&self) -> impl Iterator<Item = &C> {
        self.calls.tokens()
    }

    /// The status the connection died with, if it did.
    pub fn dead(&self) -> Option<&Status> {
        self.dead.as_ref()
    }

    /// The connection failed: every waiting call, and every later one,
    /// fails with `status` (the first failure is kept).
    pub fn fail(&mut self, status: Status) {
        if self.dead.is_none() {
            self.dead = Some(status);
        }
    }

    /// What a frame from the server means. A frame that ends the
    /// connection also marks it dead.
    pub fn on_frame(&mut self, head: &FrameHead) -> Incoming {
        let id = head.call_id();
        let h = &head.header;
        let out = match head.kind() {
            Kind::Response | Kind::Pong => Incoming::Answer {
                call_id: id,
                result: Ok(()),
            },
            Kind::Error if id != 0 => Incoming::Answer {
                call_id: id,
                result: Err(Status::new(
                    Code::from_u32(h.status_code),
                    h.status_message.clone(),
                )),
            },
            Kind::Error => Incoming::Dead {
                // A connection-level error: the server closes after it.
                status: Status::new(Code::from_u32(h.status_code), h.status_message.clone()),
                shutdown: false,
            },
            Kind::StreamChunk if id != 0 => Incoming::StreamMessage { call_id: id },
            Kind::StreamEnd if id != 0 => Incoming::StreamEnd {
                call_id: id,
                result: match Code::from_u32(h.status_code) {
                    Code::Ok => Ok(()),
                    code => Err(Status::new(code, h.status_message.clone())),
                },
            },
            Kind::Credit => Incoming::Credit {
                call_id: id,
                credit: h.credit,
            },
            Kind::Settings if id == 0 => Incoming::Settings,
            Kind::Auth => Incoming::Dead {
                status: Status::unauthenticated(
                    "the server requires pre-shared-key authentication; set ClientConfig::auth_key",
                ),
                shutdown: true,
            },
            other => Incoming::Dead {
                status: Status::internal(format!("protocol error: server sent a {other:?} frame")),
                shutdown: true,
            },
        };
        if let Incoming::Dead { status, .. } = &out {
            self.fail(status.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Flags, Header, Prefix};

    fn head(kind: Kind, call_id: u64, code: Code) -> FrameHead {
        FrameHead {
            prefix: Prefix {
                flags: Flags::NONE,
                header_len: 0,
                body_len: 0,
                payload_len: 0,
            },
            header: Header {
                call_id,
                kind: kind as i32,
                status_code: code.as_u32(),
                status_message: "why".into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn ids_start_at_one_and_answers_go_to_their_call() {
        let mut c = ClientConn::new();
        let a = c.start('a').unwrap();
        let b = c.start('b').unwrap();
        assert_eq!((a, b), (1, 2));
        match c.on_frame(&head(Kind::Error, 2, Code::NotFound)) {
            Incoming::Answer {
                call_id: 2,
                result: Err(s),
            } => {
                assert_eq!(s.code(), Code::NotFound)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.on_frame(&head(Kind::Response, 1, Code::Ok)),
            Incoming::Answer {
                call_id: 1,
                result: Ok(())
            }
        ));
        assert_eq!(c.end(1), Some('a'));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_connection_level_error_kills_every_call_and_later_ones() {
        let mut c = ClientConn::new();
        c.start(()).unwrap();
        match c.on_frame(&head(Kind::Error, 0, Code::ResourceExhausted)) {
            Incoming::Dead { status, shutdown } => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(!shutdown);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.start(()).unwrap_err().code(), Code::ResourceExhausted);
        // The first failure is the one kept.
        c.fail(Status::cancelled("later"));
        assert_eq!(c.dead().map(Status::code), Some(Code::ResourceExhausted));
    }

    #[test]
    fn frames_a_server_may_not_send_break_the_connection() {
        for kind in [Kind::Request, Kind::Cancel, Kind::Ping, Kind::Auth] {
            let mut c: ClientConn<()> = ClientConn::new();
            assert!(matches!(
                c.on_frame(&head(kind, 1, Code::Ok)),
                Incoming::Dead { shutdown: true, .. }
            ));
            assert!(c.dead().is_some());
        }
    }
}
