//! `Live::load` against `RwLock<Arc<T>>::read` as a hot config is used: two reader threads
//! reading on every "call", a writer replacing the value at 1 kHz. Each design runs alone (the
//! same threads, the same number of reads), alternating, for several rounds; the figure is the
//! median over rounds of the mean time per read across both readers.
//!
//! cargo bench -p keel-core --bench live

use std::{
    hint::black_box,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Barrier, RwLock,
    },
    thread,
    time::{Duration, Instant},
};

use keel_core::Live;

#[derive(Debug, Clone, PartialEq)]
struct Policy {
    timeout_ms: u64,
    retries: u32,
    name: String,
}

fn policy(i: u64) -> Policy {
    Policy {
        timeout_ms: i,
        retries: 3,
        name: "payments".to_owned(),
    }
}

const READS: u64 = 20_000_000;

/// Two reader threads doing `READS` reads each while a writer writes at 1 kHz; ns per read.
/// `reader()` is called once per reader thread and returns that thread's read function.
fn run<F, R, W>(reader: F, write: W) -> f64
where
    F: Fn() -> R,
    R: FnMut() -> u64 + Send + 'static,
    W: Fn(u64) + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(3));
    let writer = {
        let stop = stop.clone();
        let start = start.clone();
        thread::spawn(move || {
            start.wait();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                write(i);
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mut read = reader();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let t = Instant::now();
                let mut sum = 0u64;
                for _ in 0..READS {
                    sum = sum.wrapping_add(read());
                }
                black_box(sum);
                t.elapsed().as_nanos() as f64 / READS as f64
            })
        })
        .collect();
    let per_read: Vec<f64> = readers
        .into_iter()
        .map(|r| r.join().unwrap_or(f64::NAN))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    per_read.iter().sum::<f64>() / per_read.len() as f64
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run once, quickly.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        7
    } else {
        0
    };
    let mut live_ns = Vec::new();
    let mut lock_ns = Vec::new();
    let mut cache_ns = Vec::new();
    for _ in 0..rounds {
        let live = Live::new(policy(0));
        let w = live.clone();
        live_ns.push(run(
            || {
                let r = live.clone();
                move || black_box(r.load().timeout_ms)
            },
            move |i| w.store(policy(i)),
        ));

        let live = Live::new(policy(0));
        let w = live.clone();
        cache_ns.push(run(
            || {
                let mut cache = live.cache();
                move || black_box(cache.load().timeout_ms)
            },
            move |i| w.store(policy(i)),
        ));

        let lock = Arc::new(RwLock::new(Arc::new(policy(0))));
        let w = lock.clone();
        lock_ns.push(run(
            || {
                let r = lock.clone();
                move || black_box(r.read().map(|g| g.timeout_ms).unwrap_or_default())
            },
            move |i| {
                if let Ok(mut g) = w.write() {
                    *g = Arc::new(policy(i));
                }
            },
        ));
    }
    if rounds == 0 {
        return;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (live, lock, cached) = (
        median(&mut live_ns),
        median(&mut lock_ns),
        median(&mut cache_ns),
    );
    println!("hot-config read, 2 reader threads, writer at 1 kHz, {READS} reads per reader, median of {rounds} rounds");
    println!("  Live::load             {live:6.2} ns/read");
    println!("  RwLock<Arc<T>>::read   {lock:6.2} ns/read");
    println!("  LiveCache::load        {cached:6.2} ns/read");
    println!("  RwLock / Live          {:6.2}x", lock / live);
}
