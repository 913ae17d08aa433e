//! Pre-shared-key authentication: an HMAC-SHA256 challenge-response at
//! connection start, mutual, with a fresh nonce from each side.
//!
//! ```text
//! server -> client  AUTH body = server_nonce (32 B)
//! client -> server  AUTH body = client_nonce (32 B) || HMAC(key, "pagerpc-v1 client" || server_nonce || client_nonce)
//! server -> client  AUTH body = HMAC(key, "pagerpc-v1 server" || client_nonce || server_nonce)
//! ```
//!
//! The server refuses any other frame before the handshake completes. A
//! recorded client response is useless on another connection because the
//! server's nonce is fresh. MACs are compared in constant time
//! (`Mac::verify_slice`).

use std::io::{self, Read};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Nonce length in bytes.
pub(crate) const NONCE_LEN: usize = 32;
/// MAC length in bytes.
pub(crate) const MAC_LEN: usize = 32;

/// A fresh random nonce from the kernel.
pub(crate) fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

fn mac(key: &[u8], label: &[u8], a: &[u8], b: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut m = HmacSha256::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(label);
    m.update(a);
    m.update(b);
    m
}

/// The client's proof for `server_nonce`, with its own nonce.
pub(crate) fn client_response(key: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Vec<u8> {
    let tag = mac(key, b"pagerpc-v1 client", server_nonce, client_nonce)
        .finalize()
        .into_bytes();
    let mut out = client_nonce.to_vec();
    out.extend_from_slice(&tag);
    out
}

/// Checks a client response (constant time); returns the client's nonce.
pub(crate) fn verify_client<'a>(
    key: &[u8],
    server_nonce: &[u8],
    response: &'a [u8],
) -> Option<&'a [u8]> {
    if response.len() != NONCE_LEN + MAC_LEN {
        return None;
    }
    let (client_nonce, tag) = response.split_at(NONCE_LEN);
    mac(key, b"pagerpc-v1 client", server_nonce, client_nonce)
        .verify_slice(tag)
        .ok()
        .map(|()| client_nonce)
}

/// The server's proof that it holds the key too.
pub(crate) fn server_proof(key: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Vec<u8> {
    mac(key, b"pagerpc-v1 server", client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Checks the server's proof (constant time).
pub(crate) fn verify_server(
    key: &[u8],
    server_nonce: &[u8],
    client_nonce: &[u8],
    proof: &[u8],
) -> bool {
    mac(key, b"pagerpc-v1 server", client_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}
