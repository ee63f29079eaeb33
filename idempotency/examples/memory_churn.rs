//! Churns claims and completions of new keys through a full memory store and reports the
//! slowest pairs of them: the pauses a hash table's rebuild causes (see the memory store's
//! "Parts").
//!
//! ```sh
//! cargo run --release -p keel-idempotency --example memory_churn [pairs] [capacity]
//! ```
//!
//! Each pair is a claim and a completion of a new 64-character key with an 80-byte answer;
//! the store keeps answers 24 hours, so once its 64 MiB are full every claim evicts the oldest
//! answer of its key's part.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_idempotency::{IdempotencyStore, MemoryStore};

fn main() {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (pairs, capacity) = (arg(1, 1_500_000).max(1), arg(2, 10_000_000));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::new(usize::try_from(capacity).unwrap());
        let answer = Bytes::from(vec![b'x'; 80]);
        let fingerprint = "f".repeat(64);
        let mut times = Vec::with_capacity(usize::try_from(pairs).unwrap());
        let start = Instant::now();
        for i in 0..pairs {
            let key = format!("{:064x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let owner = format!("{i:032x}");
            let t = Instant::now();
            store
                .claim(&key, &owner, &fingerprint, Duration::from_secs(30))
                .await
                .unwrap();
            store
                .complete(&key, &owner, answer.clone(), Duration::from_secs(86_400))
                .await
                .unwrap();
            times.push(t.elapsed());
        }
        let total = start.elapsed();
        let over = times
            .iter()
            .filter(|d| **d > Duration::from_micros(500))
            .count();
        times.sort_unstable();
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        println!(
            "{pairs} pairs in {total:.2?} ({} keys held, {store:?}): p50 {:?}, p99.99 {:?}, \
             slowest {:?}, {over} over 0.5 ms",
            store.len(),
            at(0.5),
            at(0.9999),
            times[times.len() - 1],
        );
    });
}
