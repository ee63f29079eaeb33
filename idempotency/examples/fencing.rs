//! Why the fencing token exists: a worker that stalls past its lease loses the key to a second
//! worker, and its late write must be refused by the downstream, which the store cannot do.
//!
//! Run: `cargo run -p keel-idempotency --example fencing`
#![allow(missing_docs)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_idempotency::{FencingToken, Idempotent, MemoryStore};

/// A downstream that remembers the highest fencing token per account and refuses lower ones:
/// in a database this is `UPDATE ... WHERE fence < $token` or a unique constraint.
#[derive(Default)]
struct Ledger {
    balances: Mutex<HashMap<&'static str, (i64, u64)>>,
}

impl Ledger {
    fn credit(
        &self,
        account: &'static str,
        amount: i64,
        fence: FencingToken,
    ) -> Result<(), String> {
        let mut b = self.balances.lock().map_err(|e| e.to_string())?;
        let entry = b.entry(account).or_insert((0, 0));
        if fence.0 <= entry.1 {
            return Err(format!(
                "stale fencing token {} (seen {})",
                fence.0, entry.1
            ));
        }
        *entry = (entry.0 + amount, fence.0);
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let store = Arc::new(MemoryStore::new(1_000));
    let once = Idempotent::new(store)
        .scope("payouts")
        .lease(Duration::from_millis(90));
    let ledger = Arc::new(Ledger::default());

    // Worker A claims the key, then stalls (a GC pause, a frozen VM) far past its lease.
    let a = tokio::spawn({
        let (once, ledger) = (once.clone(), ledger.clone());
        async move {
            once.run_fenced("payout-7", |fence, _lost| async move {
                std::thread::sleep(Duration::from_millis(300)); // blocks: cannot even renew
                ledger.credit("acct-1", 100, fence)
            })
            .await
        }
    });

    // The lease (90ms) runs out; worker B claims the same key with a higher token and pays.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let b = once
        .run_fenced("payout-7", |fence, _lost| {
            let ledger = ledger.clone();
            async move { ledger.credit("acct-1", 100, fence) }
        })
        .await;
    println!("worker B: {b:?}");
    println!("worker A: {:?}", a.await);
    println!("ledger:   {:?}", ledger.balances.lock().map(|b| b.clone()));
    // Prints: worker B: Ok(()); worker A: Ok(Err(Failed("stale fencing token 1 (seen 2)")));
    // ledger: {"acct-1": (100, 2)}: paid once, although both workers ran.
}
