//! Property test: any sequence of events, on a virtual clock, leaves the
//! connection state machine agreeing with its reference model.

use std::time::Duration;

use pagerpc_core::conn::model::{check, small_config, Op};
use pagerpc_core::conn::IoSnapshot;
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..8).prop_map(Op::Admit),
        (0u64..8).prop_map(Op::Finish),
        (0u64..8).prop_map(Op::Cancel),
        Just(Op::Authenticate),
        (0u64..8000).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
        (0usize..3).prop_map(Op::Received),
        Just(Op::Sent),
        (any::<bool>(), any::<bool>(), any::<bool>(), 0usize..3).prop_map(|(h, f, p, q)| {
            Op::Io(IoSnapshot {
                in_head: h,
                in_frame: f || h,
                read_paused: p,
                queued_out: q * 60_000,
            })
        }),
        Just(Op::CheckTimeout),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_state_machine_agrees_with_its_model(
        auth in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..200),
    ) {
        prop_assert_eq!(check(small_config(auth), &ops), Ok(()));
    }
}

#[test]
fn fuzzer_bytes_decode_to_checkable_ops() {
    let bytes: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let ops = Op::from_bytes(&bytes);
    assert_eq!(ops.len(), 1000);
    assert_eq!(check(small_config(true), &ops), Ok(()));
}
