//! Join codes: generated with a CSPRNG, stored only as a salted hash, compared in constant time.
//!
//! The original server kept codes in plain text beside an unsalted SHA-256 and compared them
//! naively (protocol.md §7.4). Here the store never sees the code itself. A 6-digit code has only
//! 20 bits, so hashing alone cannot protect it: wrong guesses are also counted per session and
//! refused past a limit (see `crate::engine::EngineConfig::max_code_failures`).

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Six random ASCII digits (generation 1 accepts nothing else).
pub fn generate() -> String {
    let n: u32 = rand::rng().random_range(0..1_000_000);
    format!("{n:06}")
}

/// A salted SHA-256 of a join code, as stored with the session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeHash {
    pub salt: String,
    pub hash: String,
}

impl CodeHash {
    pub fn new(code: &str) -> Self {
        let salt: [u8; 16] = rand::rng().random();
        let salt = hex::encode(salt);
        let hash = digest(&salt, code);
        Self { salt, hash }
    }

    /// Constant-time comparison of `code` against the stored hash.
    pub fn matches(&self, code: &str) -> bool {
        let candidate = digest(&self.salt, code);
        candidate.as_bytes().ct_eq(self.hash.as_bytes()).into()
    }
}

fn digest(salt: &str, code: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0u8]);
    h.update(code.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_codes_are_six_digits() {
        for _ in 0..1000 {
            let c = generate();
            assert_eq!(c.len(), 6);
            assert!(c.bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn hash_matches_only_the_code() {
        let h = CodeHash::new("042917");
        assert!(h.matches("042917"));
        assert!(!h.matches("042918"));
        assert!(!h.matches(""));
        assert_ne!(CodeHash::new("042917").salt, h.salt, "salts differ");
        assert!(!h.hash.contains("042917"));
    }
}
