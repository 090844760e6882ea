//! What the benchmark binaries share: their flags, thread count and timing
//! summaries.
#![allow(dead_code)]

/// Every core of the machine, the default thread count of both sides.
pub fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `body` on a thread of a pool of `n`, as `engine` runs its commands
/// (src/main.rs says why).
pub fn in_pool<R: Send>(n: usize, body: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .unwrap();
    rayon::scope(|_| body())
}

/// Calls `set(flag, value)` for each `--flag value` pair of the command
/// line, skipping the `--bench` that `cargo bench` passes.
pub fn each_flag(mut set: impl FnMut(&str, String)) {
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue;
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        set(&flag, value);
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process in MiB (VmHWM).
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
