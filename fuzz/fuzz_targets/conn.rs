//! Fuzzes the connection state machine: any byte string decodes to a
//! sequence of events (requests, cancels, finishes, authentication, clock
//! steps, I/O progress, timeout checks), and the state machine must agree
//! with its reference model at every step (`pagerpc_core::conn::model`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagerpc_core::conn::model::{check, small_config, Op};

fuzz_target!(|data: &[u8]| {
    let auth = data.first().is_some_and(|b| b & 1 == 1);
    let ops = Op::from_bytes(data.get(1..).unwrap_or_default());
    if let Err(e) = check(small_config(auth), &ops) {
        panic!("{e}");
    }
});
