//! Memory read bandwidth: the bound on decode speed, which reads every
//! weight once a token. T threads each sum their share of a 1 GiB buffer
//! (far past any cache) as 64-bit words; the best of --repeats passes.
//! Prints one JSON line.
//!
//!   cargo bench --bench bandwidth -- [--threads T] [--repeats R]
//! benches/quantized.sh divides each file's bytes by it.

mod common;

use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let (mut threads, mut repeats) = (common::all_cores(), 5);
    common::each_flag(|flag, value| match flag {
        "--threads" => threads = value.parse().expect("--threads"),
        "--repeats" => repeats = value.parse().expect("--repeats"),
        other => panic!("unknown argument {other}"),
    });
    common::in_pool(threads, || {
        let words = (1usize << 30) / 8;
        // Written in parallel, so each thread's pages are near it.
        let mut buf = vec![0u64; words];
        buf.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(i, c)| c.fill(i as u64));
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            let sum: u64 = buf
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |s, &w| s.wrapping_add(w)))
                .reduce(|| 0, u64::wrapping_add);
            black_box(sum);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gb_s = (words * 8) as f64 / best / 1e9;
        println!(
            "{}",
            serde_json::json!({ "read_gb_s": (gb_s * 10.0).round() / 10.0, "threads": threads })
        );
    });
}
