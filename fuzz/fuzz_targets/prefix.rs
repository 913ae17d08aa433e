//! `Prefix::decode` on arbitrary bytes, under several limit sets.
//!
//! Invariants: never panics; bytes shorter than the prefix are `Truncated`;
//! an accepted prefix re-encodes to exactly the 20 input bytes and decodes
//! to itself; whatever tighter limits accept, looser limits accept too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagerpc_core::{CodecError, Prefix, PREFIX_LEN};
use pagerpc_fuzz::{all_limits, tighter_or_equal};

fuzz_target!(|data: &[u8]| {
    let limits = all_limits();
    let results = limits.map(|l| Prefix::decode(data, &l));
    for (l, r) in limits.iter().zip(&results) {
        match r {
            Ok(p) => {
                assert!(data.len() >= PREFIX_LEN);
                assert_eq!(&p.encode()[..], &data[..PREFIX_LEN], "re-encoding differs");
                assert_eq!(Prefix::decode(&p.encode(), l).as_ref(), Ok(p));
                // Trailing bytes never matter.
                assert_eq!(Prefix::decode(&data[..PREFIX_LEN], l).as_ref(), Ok(p));
            }
            Err(CodecError::Truncated { expected, got, .. }) => {
                assert!(data.len() < PREFIX_LEN, "Truncated on a full prefix");
                assert_eq!(*expected, PREFIX_LEN as u64);
                assert_eq!(*got, data.len() as u64);
            }
            Err(e) => {
                // Every error message formats without panicking.
                let _ = e.to_string();
            }
        }
    }
    for (i, a) in limits.iter().enumerate() {
        for (j, b) in limits.iter().enumerate() {
            if tighter_or_equal(a, b) {
                if let Ok(p) = &results[i] {
                    assert_eq!(results[j].as_ref(), Ok(p), "looser limits refused a prefix");
                }
            }
        }
    }
});
