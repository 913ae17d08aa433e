//! Calls started together and written together ([`CallBatch`]).
//!
//! A thread that keeps many calls in flight starts them one at a time;
//! each [`Client::start_call`] writes its own request, one `sendmsg` (and
//! one TCP segment on loopback) per call. A batch queues its requests and
//! writes them all at once: their heads share a write, and each separate
//! payload still goes in its own `MSG_EOR` part, so the server can map it.

use super::send::Unsent;
use super::*;

/// Requests queued to be written together, in the order they were added
/// (from [`Client::batch`]).
///
/// Nothing is written before [`send`](Self::send), and a
/// [`PendingCall`] is only handed out then, so nobody can wait for the
/// response to a request that is still in the batch. Dropping a batch
/// without sending it drops its requests: the server never sees them.
///
/// ```no_run
/// # fn demo(client: &pagerpc::Client) -> Result<(), pagerpc::CallError> {
/// let mut batch = client.batch();
/// for i in 0..16u8 {
///     batch.add("echo", Vec::new(), vec![i; 64], &pagerpc::CallOptions::default())?;
/// }
/// // One write for the 16 requests; each call answers on its own.
/// for call in batch.send() {
///     let frame = call?.wait()?;
///     assert_eq!(frame.payload.len(), 64);
/// }
/// # Ok(())
/// # }
/// ```
pub struct CallBatch<'c> {
    client: &'c Client,
    calls: Vec<Prepared>,
}

impl std::fmt::Debug for CallBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBatch")
            .field("calls", &self.calls.len())
            .finish()
    }
}

impl Client {
    /// An empty batch of calls on this connection: requests added to it
    /// are written together by [`CallBatch::send`], in the order added.
    pub fn batch(&self) -> CallBatch<'_> {
        CallBatch {
            client: self,
            calls: Vec::new(),
        }
    }
}

impl CallBatch<'_> {
    /// Adds a call, as [`Client::start_call`] would start it: the
    /// interceptors run and the call gets its id now; its request is
    /// written by [`send`](Self::send).
    ///
    /// # Errors
    /// When an interceptor refuses the call or the connection has failed:
    /// the payload comes back in the error, and the batch is unchanged.
    pub fn add(
        &mut self,
        method: &str,
        body: Vec<u8>,
        payload: impl Into<Payload>,
        opts: &CallOptions,
    ) -> Result<(), CallError> {
        let call = self
            .client
            .prepare_call(method, body, payload.into(), opts, None)?;
        self.calls.push(call);
        Ok(())
    }

    /// Calls in the batch.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether the batch holds no call.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Writes every request in the batch, in order, in as few writes as
    /// the socket takes, and hands out one result per call, in the order
    /// they were added.
    ///
    /// The batch is sent as a whole: it gives up at the earliest deadline
    /// among its calls (the calls then fail with
    /// [`Code::DeadlineExceeded`](crate::Code::DeadlineExceeded)), and
    /// when it fails, every call in it fails, each handing back its own
    /// payload if none of it was written. A request the server's limits
    /// refuse fails the batch before any of it is written.
    pub fn send(mut self) -> Vec<Result<PendingCall, CallError>> {
        let calls = std::mem::take(&mut self.calls);
        if calls.is_empty() {
            return Vec::new();
        }
        let shared = &self.client.shared;
        let deadline = calls.iter().filter_map(|c| c.deadline).min();
        let mut frames = Vec::with_capacity(calls.len());
        let mut rest = Vec::with_capacity(calls.len());
        for c in calls {
            frames.push(c.frame);
            rest.push((c.id, c.deadline, c.trace, c.bytes));
        }
        let empty: Vec<bool> = frames.iter().map(|f| f.payload.is_empty()).collect();
        match shared.send_frames(frames, deadline) {
            Ok(()) => rest
                .into_iter()
                .map(|(id, deadline, trace, bytes)| {
                    trace.sent(bytes);
                    Ok(PendingCall {
                        shared: shared.clone(),
                        id,
                        deadline,
                        done: false,
                        trace,
                    })
                })
                .collect(),
            Err(unsent) => {
                let errors = Unsent::split(unsent, &empty);
                let mut st = shared.state.lock();
                rest.into_iter()
                    .zip(errors)
                    .map(|((id, _, trace, _), e)| {
                        st.calls.end(id);
                        trace.status(e.code());
                        Err(e)
                    })
                    .collect()
            }
        }
    }
}

impl Drop for CallBatch<'_> {
    fn drop(&mut self) {
        if self.calls.is_empty() {
            return;
        }
        // Never sent: the ids go back, and the server never hears of them.
        let mut st = self.client.shared.state.lock();
        for c in self.calls.drain(..) {
            st.calls.end(c.id);
            c.trace.status(Code::Cancelled);
        }
    }
}
