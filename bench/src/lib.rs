//! What `pagerpc-bench` and `pagerpc doctor` share: measuring a transfer in
//! the process that receives it ([`meter`]).
#![forbid(unsafe_code)]

pub mod meter;
