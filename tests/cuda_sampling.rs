//! The sampling kernels of kernels/sampling.cu, run in the CPU emulator,
//! against `sampler::choose` / `sampler::argmax`: the same token, exactly, for
//! random logits with ties, repeated values, -inf, NaN and ±0, over
//! temperatures, top-k, top-p and draws, in both lane orders.
#![cfg(feature = "emu")]

use engine::backend::cuda::driver::Emu;
use engine::backend::cuda::emu::{self, LaneOrder};
use engine::backend::cuda::Cuda;
use engine::backend::sample::{self as sampler, SamplerConfig};
use engine::backend::Backend;
use engine::tensor::DType::F32;
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::c_void;

/// The block size the launchers use.
const THREADS: u32 = 1024;

fn gpu() -> Cuda<Emu> {
    Cuda::new(Emu::new())
}

fn rng() -> StdRng {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// One row of logits of a given flavour.
fn logits(r: &mut StdRng, vocab: usize, flavour: usize) -> Vec<f32> {
    let normal = |r: &mut StdRng| -> f32 {
        // Sum of uniforms: roughly normal, cheap.
        (0..4).map(|_| r.random_range(-1.0f32..1.0)).sum::<f32>() * 1.7
    };
    let mut v: Vec<f32> = match flavour {
        // Plain: spread out, mostly distinct.
        0 => (0..vocab).map(|_| normal(r) * 3.0).collect(),
        // Few distinct values: ties everywhere, also at the maximum.
        1 => (0..vocab)
            .map(|_| r.random_range(0..6) as f32 * 0.5)
            .collect(),
        // bf16-rounded: many repeats among close values.
        2 => (0..vocab)
            .map(|_| half::bf16::from_f32(normal(r)).to_f32())
            .collect(),
        // All equal.
        3 => vec![1.25; vocab],
        // A peaked distribution over a flat tail of repeated values.
        _ => (0..vocab)
            .map(|_| {
                if r.random_range(0..50) == 0 {
                    8.0 + normal(r)
                } else {
                    -2.0
                }
            })
            .collect(),
    };
    // Sprinkle special values (never all of a small row).
    if vocab >= 5 {
        for _ in 0..(vocab / 40).max(1) {
            let i = r.random_range(0..vocab);
            v[i] = match r.random_range(0..5) {
                0 => f32::NEG_INFINITY,
                1 => f32::NAN,
                2 => -0.0,
                3 => 0.0,
                _ => v[r.random_range(0..vocab)], // a repeat
            };
        }
    }
    v
}

/// Device memory for `n` token ids, poisoned.
fn out_ids(g: &Cuda<Emu>, n: usize) -> Tensor<Cuda<Emu>> {
    g.upload(vec![f32::NAN; n], &[n], F32).unwrap()
}

fn ids(g: &Cuda<Emu>, t: &Tensor<Cuda<Emu>>) -> Vec<u32> {
    g.download(t).unwrap().iter().map(|v| v.to_bits()).collect()
}

/// `sample_f32` on every row of `x` ([rows, vocab]).
fn sample(
    g: &Cuda<Emu>,
    x: &Tensor<Cuda<Emu>>,
    cfg: &SamplerConfig,
    u: f32,
    order: LaneOrder,
) -> Vec<u32> {
    let (rows, vocab) = (x.shape[0], x.shape[1]);
    let out = out_ids(g, rows);
    let mut out_ptr: u64 = out.buf.ptr;
    let mut x_ptr: u64 = x.buf.ptr;
    let mut vocab_i = i32::try_from(vocab).unwrap();
    let mut temperature: f32 = cfg.temperature;
    let mut top_k = i32::try_from(cfg.top_k).unwrap();
    let mut top_p: f32 = cfg.top_p;
    let mut u = u;
    let mut args: [*mut c_void; 7] = [
        (&mut out_ptr as *mut u64).cast(),
        (&mut x_ptr as *mut u64).cast(),
        (&mut vocab_i as *mut i32).cast(),
        (&mut temperature as *mut f32).cast(),
        (&mut top_k as *mut i32).cast(),
        (&mut top_p as *mut f32).cast(),
        (&mut u as *mut f32).cast(),
    ];
    // SAFETY: the arguments are sample_f32's parameters in order, with their
    // types; one block per row of `x`, one output per block in `out`.
    unsafe {
        emu::launch_ordered(
            "sample_f32",
            (rows as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            &mut args,
            order,
        )
    }
    .unwrap();
    ids(g, &out)
}

/// `sample_argmax_f32` on every row of `x`.
fn argmax(g: &Cuda<Emu>, x: &Tensor<Cuda<Emu>>, order: LaneOrder) -> Vec<u32> {
    let (rows, vocab) = (x.shape[0], x.shape[1]);
    let out = out_ids(g, rows);
    let mut out_ptr: u64 = out.buf.ptr;
    let mut x_ptr: u64 = x.buf.ptr;
    let mut vocab_i = i32::try_from(vocab).unwrap();
    let mut args: [*mut c_void; 3] = [
        (&mut out_ptr as *mut u64).cast(),
        (&mut x_ptr as *mut u64).cast(),
        (&mut vocab_i as *mut i32).cast(),
    ];
    // SAFETY: as in `sample`.
    unsafe {
        emu::launch_ordered(
            "sample_argmax_f32",
            (rows as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            &mut args,
            order,
        )
    }
    .unwrap();
    ids(g, &out)
}

fn cfg(temperature: f32, top_k: usize, top_p: f32) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k,
        top_p,
        seed: 0,
    }
}

/// The lane order of most launches: the process-wide one, so that running the
/// tests with `ENGINE_EMU_REVERSE_LANES=1` runs them all in reverse.
const DEFAULT: &[LaneOrder] = &[LaneOrder::Default];
/// Both, whatever the environment says.
const BOTH: &[LaneOrder] = &[LaneOrder::Forward, LaneOrder::Reverse];

/// Launches `sample_f32` on `data` ([rows, vocab]) with each configuration
/// and draw, in each lane order, and compares every row with `choose`.
fn compare(
    g: &Cuda<Emu>,
    data: &[f32],
    vocab: usize,
    cases: &[(SamplerConfig, f32)],
    orders: &[LaneOrder],
) {
    let rows = data.len() / vocab;
    let x = g.upload(data.to_vec(), &[rows, vocab], F32).unwrap();
    for (c, u) in cases {
        let want: Vec<u32> = data
            .chunks(vocab)
            .map(|row| sampler::choose(row, c, *u))
            .collect();
        for &order in orders {
            let got = sample(g, &x, c, *u, order);
            for (row, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "vocab {vocab}, row {row}, {c:?}, u = {u}, {order:?}: kernel {g}, CPU {w}\n\
                     logits {:?}",
                    if vocab <= 320 {
                        &data[row * vocab..(row + 1) * vocab]
                    } else {
                        &[][..]
                    }
                );
            }
        }
    }
}

/// A random configuration: temperatures from tiny to huge, k from 1 past the
/// vocabulary, p from 0 to 1, draws including 0 and the largest below 1.
fn random_case(r: &mut StdRng, vocab: usize) -> (SamplerConfig, f32) {
    let t = [0.0, 1e-6, 0.05, 0.3, 0.7, 1.0, 1.0, 1.7, 4.0, 1e4][r.random_range(0..10)];
    let k = match r.random_range(0..6) {
        0 | 1 => 0,
        2 => 1,
        3 => r.random_range(1..=vocab),
        4 => r.random_range(1..=vocab.min(64)),
        _ => vocab + r.random_range(0..3),
    };
    let p = match r.random_range(0..6) {
        0 | 1 => 1.0,
        2 => 0.0,
        3 => 1e-6,
        _ => r.random_range(0.05f32..1.0),
    };
    let u = match r.random_range(0..6) {
        0 => 0.0,
        1 => 1.0 - f32::EPSILON / 2.0,
        _ => r.random::<f32>(),
    };
    (cfg(t, k, p), u)
}

/// Rows of `vocab` logits, cycling through the flavours.
fn rows(r: &mut StdRng, vocab: usize, rows: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|row| logits(r, vocab, row % 5))
        .collect()
}

#[test]
fn small_vocabularies_match_the_cpu_sampler() {
    let (g, mut r) = (gpu(), rng());
    for (vocab, n_rows, n_cases) in [(1, 3, 6), (5, 20, 30), (320, 10, 30)] {
        let data = rows(&mut r, vocab, n_rows);
        let cases: Vec<_> = (0..n_cases).map(|_| random_case(&mut r, vocab)).collect();
        compare(&g, &data, vocab, &cases, DEFAULT);
    }
}

#[test]
fn both_lane_orders_match_the_cpu_sampler() {
    let (g, mut r) = (gpu(), rng());
    for (vocab, n_rows, n_cases) in [(5, 10, 6), (320, 5, 6), (4099, 3, 3)] {
        let data = rows(&mut r, vocab, n_rows);
        let mut cases = vec![(cfg(0.8, vocab / 3, 0.7), r.random())];
        cases.extend((1..n_cases).map(|_| random_case(&mut r, vocab)));
        compare(&g, &data, vocab, &cases, BOTH);
    }
}

#[test]
fn a_model_sized_vocabulary_matches_the_cpu_sampler() {
    let (g, mut r) = (gpu(), rng());
    let vocab = 49152;
    let data = rows(&mut r, vocab, 5);
    let mut cases = vec![
        (cfg(1.0, 0, 1.0), 0.37),
        (cfg(0.7, 50, 0.9), r.random()),
        (cfg(1.0, 0, 0.95), r.random()),
        (cfg(1.3, 1000, 1.0), r.random()),
    ];
    cases.extend((0..3).map(|_| random_case(&mut r, vocab)));
    compare(&g, &data, vocab, &cases, DEFAULT);
}

#[test]
fn hand_made_edge_cases() {
    let g = gpu();
    let inf = f32::INFINITY;
    let rows: [&[f32]; 7] = [
        &[1.0, 3.0, 0.5, 3.0, 3.0],
        &[-inf, 1.0, f32::NAN, 1.0, -inf],
        &[-inf, -inf, -inf, -inf, -inf],
        &[1.0, inf, 3.0, inf, -inf],
        &[0.0, -0.0, 0.0, -100.0, -1e30],
        &[f32::NAN, f32::NAN, f32::NAN, f32::NAN, -3e38],
        &[2.0, 2.0, 2.0, 2.0, 2.0],
    ];
    let data: Vec<f32> = rows.concat();
    let mut cases = Vec::new();
    for t in [0.0, f32::from_bits(1), 1e-30, 1.0, 1e30, inf] {
        for (k, p) in [(1, 1.0), (2, 1.0), (4, 1.0), (0, 1e-9), (0, 0.5), (3, 0.6)] {
            for u in [0.0, 0.45, 1.0 - f32::EPSILON / 2.0] {
                cases.push((cfg(t, k, p), u));
            }
        }
        for u in [0.0, 0.2, 0.3, 0.5, 0.8, 1.0 - f32::EPSILON / 2.0] {
            cases.push((cfg(t, 0, 1.0), u));
        }
    }
    compare(&g, &data, 5, &cases, DEFAULT);
}

#[test]
fn argmax_matches_the_cpu() {
    let (g, mut r) = (gpu(), rng());
    for (vocab, n_rows) in [(1, 3), (5, 20), (320, 10), (2049, 5), (49152, 5)] {
        let data = rows(&mut r, vocab, n_rows);
        let x = g.upload(data.clone(), &[n_rows, vocab], F32).unwrap();
        let want: Vec<u32> = data.chunks(vocab).map(sampler::argmax).collect();
        for &order in BOTH {
            assert_eq!(argmax(&g, &x, order), want, "vocab {vocab}, {order:?}");
        }
        // sample_f32 at temperature 0 is the same argmax.
        compare(&g, &data, vocab, &[(cfg(0.0, 5, 0.5), 0.5)], DEFAULT);
    }
}

/// `sample_weights_f32`: the fixed-point weights, bit for bit, so that the
/// exactness of the draws does not rest on luck.
#[test]
fn weights_match_the_cpu_bit_for_bit() {
    let (g, mut r) = (gpu(), rng());
    let (vocab, n_rows) = (4099, 5);
    let mut data = rows(&mut r, vocab, n_rows);
    // Values close to the maximum, for differences of every size.
    for v in &mut data[..vocab] {
        *v = 10.0 - r.random::<f32>().powi(8) * 40.0;
    }
    let x = g.upload(data.clone(), &[n_rows, vocab], F32).unwrap();
    for t in [1e-3, 0.05, 0.3, 1.0, 1.7, 1e3, 1e30] {
        let out = out_ids(&g, 2 * n_rows * vocab);
        let mut out_ptr: u64 = out.buf.ptr;
        let mut x_ptr: u64 = x.buf.ptr;
        let mut vocab_i = vocab as i32;
        let mut temperature: f32 = t;
        let mut args: [*mut c_void; 4] = [
            (&mut out_ptr as *mut u64).cast(),
            (&mut x_ptr as *mut u64).cast(),
            (&mut vocab_i as *mut i32).cast(),
            (&mut temperature as *mut f32).cast(),
        ];
        // SAFETY: sample_weights_f32's parameters in order, with their types;
        // one block per row, `out` holds n_rows * vocab u64.
        unsafe {
            emu::launch(
                "sample_weights_f32",
                (n_rows as u32, 1, 1),
                (THREADS, 1, 1),
                0,
                &mut args,
            )
        }
        .unwrap();
        let words = ids(&g, &out);
        let got: Vec<u64> = words
            .chunks(2)
            .map(|w| w[0] as u64 | (w[1] as u64) << 32)
            .collect();
        for (row, (xs, ws)) in data.chunks(vocab).zip(got.chunks(vocab)).enumerate() {
            let max = sampler::canonical(xs[sampler::argmax(xs) as usize]);
            for (i, (&x, &w)) in xs.iter().zip(ws).enumerate() {
                let want = sampler::weight(sampler::canonical(x), max, t);
                assert_eq!(
                    w, want,
                    "T = {t}, row {row}, logit {i} = {x:e}, max {max:e}"
                );
            }
        }
    }
}
