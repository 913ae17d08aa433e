//! Stream and connection credit (`conn::flow`) under any interleaving of
//! sends, releases and credit frames in flight: a sender that follows
//! `OutCredit` is never refused by `InCredit`, never holds more than the
//! window outstanding (save one message alone), and is never left stuck
//! once the consumer has released everything and the credit arrived.

use std::collections::VecDeque;

use pagerpc_core::conn::{InCredit, OutCredit};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    /// The sender tries to send a message of this size.
    Send(u64),
    /// The consumer releases the oldest message it holds.
    Release,
    /// The oldest credit frame in flight arrives at the sender.
    DeliverCredit,
    /// The oldest message in flight arrives at the receiver.
    DeliverMessage,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u64..3000).prop_map(Step::Send),
        Just(Step::Release),
        Just(Step::DeliverCredit),
        Just(Step::DeliverMessage),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn credit_never_refuses_a_well_behaved_sender(
        window in 1u64..5000,
        steps in prop::collection::vec(step(), 0..300),
    ) {
        let mut out = OutCredit::new(window);
        let mut inc = InCredit::new(window);
        let mut wire: VecDeque<u64> = VecDeque::new();
        let mut credits: VecDeque<u64> = VecDeque::new();
        let mut held: VecDeque<u64> = VecDeque::new();
        for s in steps {
            match s {
                Step::Send(n) => {
                    if out.can_send(n) {
                        prop_assert!(out.outstanding() == 0 || out.outstanding() + n <= window);
                        out.spend(n);
                        wire.push_back(n);
                    }
                }
                Step::DeliverMessage => {
                    if let Some(n) = wire.pop_front() {
                        prop_assert!(inc.on_message(n).is_ok(), "a well-behaved sender was refused");
                        held.push_back(n);
                    }
                }
                Step::Release => {
                    if let Some(n) = held.pop_front() {
                        inc.release(n);
                        if let Some(g) = inc.take_grant() {
                            credits.push_back(g);
                        }
                    }
                }
                Step::DeliverCredit => {
                    if let Some(g) = credits.pop_front() {
                        out.grant(g);
                    }
                }
            }
        }
        // Drain: everything arrives, is released, and credit flows back.
        while let Some(n) = wire.pop_front() {
            prop_assert!(inc.on_message(n).is_ok());
            held.push_back(n);
        }
        while let Some(n) = held.pop_front() {
            inc.release(n);
            if let Some(g) = inc.take_grant() {
                credits.push_back(g);
            }
        }
        while let Some(g) = credits.pop_front() {
            out.grant(g);
        }
        prop_assert_eq!(out.outstanding(), 0, "credit was withheld: the sender is stuck");
        prop_assert_eq!(inc.held(), 0);
    }
}
