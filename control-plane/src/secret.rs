//! Random secrets (API keys, session tokens, ids) and the SHA-256 the store keeps of a
//! bearer secret instead of the secret itself.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// The hex SHA-256 of a bearer secret: what the store keeps and looks keys up by.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `n` random bytes, hex encoded.
pub fn random_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}
