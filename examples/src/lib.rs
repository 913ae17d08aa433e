//! Example programs built on pagerpc's public API.
#![forbid(unsafe_code)]
