//! Join codes: generated with a CSPRNG, stored only as an HMAC under the server secret.
//!
//! A 6-digit code has 20 bits: any unkeyed hash of it, salted or not, is reversed by trying all
//! 10^6 codes (0.08 s for salt + SHA-256). The store therefore only ever sees
//! HMAC-SHA-256(secret, session id ‖ 0 ‖ code), and the secret is not in the store: it comes from
//! configuration (`--secret`, `--secret-file`), the same on every instance. Guessing through the
//! server is bounded separately (`crate::access`, counted atomically by the engine).

use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

/// Six random ASCII digits (generation 1 accepts nothing else).
pub fn generate() -> String {
    let n: u32 = rand::rng().random_range(0..1_000_000);
    format!("{n:06}")
}

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// The server secret keying code digests. Never logged, never stored in Redis.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret of at least [`MIN_SECRET_LEN`] bytes (surrounding whitespace, e.g. a file's
    /// trailing newline, is ignored).
    pub fn new(bytes: &[u8]) -> Result<Secret, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the secret must have at least {MIN_SECRET_LEN} bytes (got {})",
                trimmed.len()
            ));
        }
        Ok(Secret(Arc::from(trimmed)))
    }

    /// A random secret: right for one instance, wrong for several (their digests differ).
    pub fn random() -> Secret {
        let bytes: [u8; 32] = rand::rng().random();
        Secret(Arc::from(hex::encode(bytes).as_bytes()))
    }

    /// The digest stored for, and compared with, `code` of `session` (hex).
    pub fn digest(&self, session: &str, code: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(session.as_bytes());
        mac.update(&[0]);
        mac.update(code.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Constant-time equality of two digests (the in-process engine's comparison).
pub fn digests_match(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
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
    fn digest_is_keyed_and_bound_to_the_session() {
        let a = Secret::new(&[b'a'; 32]).unwrap();
        let b = Secret::new(&[b'b'; 32]).unwrap();
        let d = a.digest("s1", "042917");
        assert!(digests_match(&d, &a.digest("s1", "042917")));
        assert!(!digests_match(&d, &a.digest("s1", "042918")));
        assert!(!digests_match(&d, &a.digest("s2", "042917")));
        assert!(!digests_match(&d, &b.digest("s1", "042917")));
        assert!(!d.contains("042917"));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Secret::new(b"short").is_err());
        assert!(Secret::new(format!("{}\n", "x".repeat(32)).as_bytes()).is_ok());
    }
}
