//! What the engine counts while it serves: shared with the API thread, which
//! reads it for `/metrics`; only the engine thread writes it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A latency histogram with fixed bucket bounds (seconds), Prometheus style:
/// `counts[i]` counts observations ≤ `bounds[i]` (not cumulative here).
pub struct Histogram {
    pub bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Observations past the last bound.
    over: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            over: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        match self.bounds.iter().position(|&b| s <= b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.over.fetch_add(1, Relaxed),
        };
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Cumulative counts per bound, then the total count and the sum (s).
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                acc += c.load(Relaxed);
                acc
            })
            .collect();
        let total = acc + self.over.load(Relaxed);
        (
            cumulative,
            total,
            self.sum_micros.load(Relaxed) as f64 / 1e6,
        )
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5];

pub struct Metrics {
    pub requests_running: AtomicU64,
    pub requests_waiting: AtomicU64,
    pub requests_finished: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_free: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and those it held.
    pub prefix_queried_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_running: AtomicU64::new(0),
            requests_waiting: AtomicU64::new(0),
            requests_finished: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            kv_blocks_free: AtomicU64::new(0),
            prefix_queried_tokens: AtomicU64::new(0),
            prefix_hit_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            inter_token_latency: Histogram::new(ITL_BOUNDS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_the_overflow_in_the_total() {
        let h = Histogram::new(&[0.1, 1.0]);
        for ms in [50, 100, 500, 2000] {
            h.observe(Duration::from_millis(ms));
        }
        let (cum, total, sum) = h.snapshot();
        assert_eq!(cum, [2, 3]);
        assert_eq!(total, 4);
        assert!((sum - 2.65).abs() < 1e-9);
    }
}
