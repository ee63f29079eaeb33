//! Eight threads pick while instances come and go: no panic, and never an instance after the
//! `store` that removed it has returned.

mod common;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::*;
use keel_balance::{Outcome, RequestInfo, Strategy};

#[test]
fn eight_pickers_while_instances_churn() {
    for strategy in [
        Strategy::P2cEwma,
        Strategy::RoundRobin,
        Strategy::Maglev,
        Strategy::LeastConn,
    ] {
        let mut conf = cfg(strategy);
        // A small table: this test rebuilds it 300 times in a debug build.
        conf.maglev_table_size = 1_009;
        let (b, live, _) = balancer(weighted(&[1, 1, 1, 1]), conf);
        // id -> the version whose store removed it. Ids are never reused.
        let removed: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let published = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let pickers: Vec<_> = (0..8)
            .map(|t| {
                let (b, removed, published, stop) =
                    (b.clone(), removed.clone(), published.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut picks = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let seen = published.load(Ordering::Acquire);
                        let key = picks.wrapping_mul(31).wrapping_add(t);
                        if let Some(p) = b.pick(&RequestInfo::default().with_hash_key(key)) {
                            if let Some(&r) = removed.lock().unwrap().get(p.id().as_str()) {
                                assert!(
                                    r > seen,
                                    "{} picked at version {seen}, removed at {r}",
                                    p.id()
                                );
                            }
                            p.complete_with(Outcome::Success, Duration::from_micros(picks % 500));
                        }
                        picks += 1;
                    }
                    picks
                })
            })
            .collect();
        let mut current = weighted(&[1, 1, 1, 1]);
        for v in 1..=300u64 {
            // Remove the oldest, add a new one (every few rounds remove two or add two).
            let mut next = current.clone();
            let gone: Vec<_> = if v % 7 == 0 && next.len() > 2 {
                next.drain(..2).collect()
            } else {
                next.drain(..1).collect()
            };
            for k in 0..(if v % 5 == 0 { 2 } else { 1 }) {
                next.push(inst(
                    &format!("v{v}-{k}"),
                    30_000 + (v as u16 % 1000) * 2 + k,
                    1 + (v % 3) as u32,
                ));
            }
            {
                let mut r = removed.lock().unwrap();
                for g in &gone {
                    r.insert(g.id.to_string(), v);
                }
            }
            live.store(next.clone());
            published.store(v, Ordering::Release);
            current = next;
            std::thread::sleep(Duration::from_micros(300));
        }
        stop.store(true, Ordering::Relaxed);
        let total: u64 = pickers.into_iter().map(|p| p.join().unwrap()).sum();
        assert!(total > 1_000, "{strategy:?}: only {total} picks");
        let snap = b.snapshot();
        assert_eq!(snap.instances.len(), current.len());
        assert!(snap.instances.iter().all(|i| i.in_flight == 0));
    }
}
