//! The test service of `pagerpc-build` (`proto/lab.proto`): every shape of
//! rpc, with and without payloads, generated at build time, and an
//! implementation of it ([`LabImpl`]) that the tests call over loopback.
//!
//! # Types are checked at compile time
//! A method called with the right request type compiles:
//! ```
//! use pagerpc_codegen_tests::lab::{Blob, LabClient, Note};
//! fn call(client: &LabClient) {
//!     let _ = client.say(&Note::default());
//!     let _ = client.store(&Blob::default(), vec![0u8; 4096]);
//! }
//! ```
//! The wrong request type does not:
//! ```compile_fail,E0308
//! use pagerpc_codegen_tests::lab::{Blob, LabClient};
//! fn call(client: &LabClient) {
//!     let _ = client.say(&Blob::default());
//! }
//! ```
//! Nor does a payload given to a method that carries none:
//! ```compile_fail,E0061
//! use pagerpc_codegen_tests::lab::{LabClient, Note};
//! fn call(client: &LabClient) {
//!     let _ = client.say(&Note::default(), vec![0u8; 4096]);
//! }
//! ```
//! Nor a payload-carrying method called without one:
//! ```compile_fail,E0061
//! use pagerpc_codegen_tests::lab::{Blob, LabClient};
//! fn call(client: &LabClient) {
//!     let _ = client.store(&Blob::default());
//! }
//! ```
//! Nor a stream message of the wrong type:
//! ```compile_fail,E0308
//! use pagerpc_codegen_tests::lab::{LabClient, Note};
//! fn call(client: &LabClient) {
//!     let (mut tx, _rx) = client.upload().unwrap();
//!     let _ = tx.send(&Note::default(), vec![0u8; 4096]);
//! }
//! ```
//! Nor a response read as the wrong type:
//! ```compile_fail,E0308
//! use pagerpc_codegen_tests::lab::{Ack, LabClient, Note};
//! fn call(client: &LabClient) {
//!     let r: pagerpc::Response<Ack> = client.say(&Note::default()).unwrap();
//! }
//! ```
//! Nor a handler whose response type differs from the rpc's:
//! ```compile_fail,E0053
//! use pagerpc::{Context, Status};
//! use pagerpc_codegen_tests::lab::{Ack, Note};
//! struct Wrong;
//! impl pagerpc_codegen_tests::lab::Lab for Wrong {
//!     fn say(&self, _: &Context, n: Note) -> Result<Ack, Status> {
//!         Ok(Ack::default())
//!     }
//!     # fn store(&self, _: &Context, _: pagerpc_codegen_tests::lab::Blob, _: pagerpc::Pages) -> Result<Ack, Status> { todo!() }
//! }
//! ```
#![forbid(unsafe_code)]

mod lab_async;
mod lab_impl;

pub use lab_impl::{pattern_bytes, sha256_hex, LabImpl};

/// The generated code for package `pagerpc.test.lab`.
pub mod lab {
    pagerpc::include_proto!("pagerpc.test.lab");
}
