//! The table of calls in flight on one connection.

use std::fmt;

/// Why a request was not admitted. Each names the rule and the value seen.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Call id 0 is reserved for connection-level errors.
    ZeroCallId,
    /// A call with this id is already in flight on the connection.
    DuplicateCallId {
        /// The id.
        id: u64,
    },
    /// The connection is at its in-flight limit.
    TooManyInflight {
        /// The limit (`max_inflight_per_conn`).
        limit: usize,
        /// Calls in flight when the request arrived.
        got: usize,
    },
    /// The peer has not authenticated yet.
    NotAuthenticated,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ZeroCallId => {
                write!(f, "call id 0 is reserved for connection-level errors")
            }
            Refusal::DuplicateCallId { id } => {
                write!(f, "call id {id} is already in flight on this connection")
            }
            Refusal::TooManyInflight { limit, got } => write!(
                f,
                "the connection already has {got} calls in flight, the max_inflight_per_conn limit of {limit}"
            ),
            Refusal::NotAuthenticated => write!(f, "the peer has not authenticated"),
        }
    }
}

impl std::error::Error for Refusal {}

/// Calls in flight, by id, each with the driver's token.
#[derive(Debug)]
pub struct CallTable<C> {
    calls: crate::FastMap<u64, C>,
    limit: usize,
}

impl<C> CallTable<C> {
    /// An empty table admitting at most `limit` calls at once.
    pub fn new(limit: usize) -> Self {
        CallTable {
            calls: crate::FastMap::default(),
            limit,
        }
    }

    /// Admits call `id`.
    ///
    /// # Errors
    /// [`Refusal::ZeroCallId`], [`Refusal::DuplicateCallId`] (the call in
    /// flight keeps its entry), [`Refusal::TooManyInflight`].
    pub fn admit(&mut self, id: u64, token: C) -> Result<(), Refusal> {
        if let Some(r) = self.refusal(id) {
            return Err(r);
        }
        self.calls.insert(id, token);
        Ok(())
    }

    /// Why call `id` would not be admitted now, if it would not.
    fn refusal(&self, id: u64) -> Option<Refusal> {
        if id == 0 {
            Some(Refusal::ZeroCallId)
        } else if self.calls.contains_key(&id) {
            Some(Refusal::DuplicateCallId { id })
        } else if self.calls.len() >= self.limit {
            Some(Refusal::TooManyInflight {
                limit: self.limit,
                got: self.calls.len(),
            })
        } else {
            None
        }
    }

    /// As [`admit`](Self::admit), but hands the token back on refusal.
    ///
    /// # Errors
    /// The token, when [`admit`](Self::admit) would refuse the call.
    pub fn admit_or_return(&mut self, id: u64, token: C) -> Result<(), C> {
        if self.refusal(id).is_some() {
            return Err(token);
        }
        self.calls.insert(id, token);
        Ok(())
    }

    /// The token of call `id`.
    pub fn get(&self, id: u64) -> Option<&C> {
        self.calls.get(&id)
    }

    /// The token of call `id`, to update it.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut C> {
        self.calls.get_mut(&id)
    }

    /// Removes call `id`.
    pub fn finish(&mut self, id: u64) -> Option<C> {
        self.calls.remove(&id)
    }

    /// Calls in flight.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Every token.
    pub fn tokens(&self) -> impl Iterator<Item = &C> {
        self.calls.values()
    }
}
