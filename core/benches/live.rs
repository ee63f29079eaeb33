//! `Live::load` against `RwLock<Arc<T>>::read`, with a second reader thread and a writer
//! replacing the value at 1 kHz, as a hot config is used: read on every call, written rarely.
//!
//! cargo bench -p keel-core --bench live -- --warm-up-time 1 --measurement-time 3

use std::{
    hint::black_box,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    thread,
    time::Duration,
};

use criterion::{criterion_group, criterion_main, Criterion};
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

/// Runs `reader` on one background thread and `writer` at 1 kHz until the returned guard drops.
struct Background {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn background(
    reader: impl Fn() + Send + 'static,
    writer: impl Fn(u64) + Send + 'static,
) -> Background {
    let stop = Arc::new(AtomicBool::new(false));
    let (s1, s2) = (stop.clone(), stop.clone());
    let r = thread::spawn(move || {
        while !s1.load(Ordering::Relaxed) {
            reader();
        }
    });
    let w = thread::spawn(move || {
        let mut i = 0;
        while !s2.load(Ordering::Relaxed) {
            i += 1;
            writer(i);
            thread::sleep(Duration::from_millis(1));
        }
    });
    Background {
        stop,
        threads: vec![r, w],
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot-config-read");

    let live = Live::new(policy(0));
    {
        let (l1, l2) = (live.clone(), live.clone());
        let _bg = background(
            move || {
                black_box(l1.load().timeout_ms);
            },
            move |i| l2.store(policy(i)),
        );
        g.bench_function("Live::load", |b| {
            b.iter(|| black_box(live.load().timeout_ms))
        });
    }

    let lock = Arc::new(RwLock::new(Arc::new(policy(0))));
    {
        let (l1, l2) = (lock.clone(), lock.clone());
        let _bg = background(
            move || {
                if let Ok(g) = l1.read() {
                    black_box(g.timeout_ms);
                }
            },
            move |i| {
                if let Ok(mut g) = l2.write() {
                    *g = Arc::new(policy(i));
                }
            },
        );
        g.bench_function("RwLock<Arc<T>>::read", |b| {
            b.iter(|| black_box(lock.read().map(|g| g.timeout_ms).unwrap_or_default()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
