//! Hashing and randomness for picks.
//!
//! Keys are hashed with a small multiply-rotate mix per 8-byte word finished by MurmurHash3's
//! `fmix64` avalanche: fast for short keys (user ids, session cookies), well spread for the ring
//! and the Maglev table, and stable across processes and releases (unlike `std`'s `RandomState`),
//! so every client of a service maps a key to the same instance. (ketama used MD5; what matters is
//! that all clients agree, not which hash.)
//!
//! The random source is splitmix64 over one atomic word: lock-free under concurrent picks,
//! seedable for deterministic tests (like tower's `Balance::from_rng`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Request extension: an explicit hash key for `ring-hash` and `maglev`, set by the caller. It
/// wins over the configured [`HashKeySource`](crate::HashKeySource).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashKey(pub u64);

impl HashKey {
    /// The key of these bytes (the same hash the balancer applies to headers and cookies).
    pub fn new(key: impl AsRef<[u8]>) -> Self {
        Self(hash_bytes(key.as_ref(), 0))
    }
}

#[inline]
pub(crate) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// A stable 64-bit hash of `bytes` with a `seed`.
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    const M: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(M);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(M).rotate_left(31);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(M).rotate_left(31);
    }
    fmix64(h)
}

/// splitmix64 over an atomic: each call takes the next point of the sequence.
#[derive(Debug)]
pub(crate) struct Rng(AtomicU64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed))
    }

    /// The next value. A relaxed load and store rather than a read-modify-write: two threads
    /// racing may draw the same value (harmless for balancing), and a single thread gets the
    /// exact seeded sequence, at a fraction of the cost of a locked instruction.
    #[inline]
    pub(crate) fn next_u64(&self) -> u64 {
        let x = self
            .0
            .load(Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.0.store(x, Ordering::Relaxed);
        fmix64(x ^ (x >> 31))
    }

    /// Uniform in `0..n` (`n > 0`), by Lemire's multiply-shift.
    #[inline]
    pub(crate) fn below(&self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub(crate) fn unit(&self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_spread() {
        assert_eq!(hash_bytes(b"user-42", 0), hash_bytes(b"user-42", 0));
        assert_ne!(hash_bytes(b"user-42", 0), hash_bytes(b"user-42", 1));
        assert_ne!(hash_bytes(b"", 0), hash_bytes(b"\0", 0));
        let mut buckets = [0u32; 16];
        for i in 0..16_000u32 {
            buckets[(hash_bytes(format!("k{i}").as_bytes(), 7) % 16) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (850..1150).contains(&b)),
            "{buckets:?}"
        );
    }

    #[test]
    fn rng_is_uniform_and_seeded() {
        let a = Rng::new(1);
        let b = Rng::new(1);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut c = [0u32; 10];
        for _ in 0..100_000 {
            c[a.below(10)] += 1;
        }
        assert!(c.iter().all(|&x| (9_500..10_500).contains(&x)), "{c:?}");
        let u = a.unit();
        assert!((0.0..1.0).contains(&u));
    }
}
