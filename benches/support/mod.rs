//! What the facade's benches share: their settings from the environment, their runtime, and how
//! they read the CPU the process has used.

/// `name` from the environment as a number, or `default`.
pub(crate) fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The runtime every bench runs in: two workers, as the machine has two cores.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// CPU seconds this process's threads have run, in nanoseconds' resolution: the sum of the first
/// field of `/proc/self/task/*/schedstat` (`/proc/self/stat` counts 10 ms ticks, too coarse for
/// a process that is mostly asleep).
pub(crate) fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}
