//! The CPU's two matrix products side by side: `matmul_nt` (the `gemm` crate,
//! or its matrix-vector loop for n ≤ 4) and the batch-invariant
//! `matmul_nt_invariant`, at the Linear layers of SmolLM2-135M
//! (d 576, FFN 1536, 3 KV heads of 64) for n = 1, 4, 16, 64, 256 rows, on 1
//! and 2 threads. GFLOP/s counts 2·n·m·k; "inv/gemm" is the invariant
//! product's time over `matmul_nt`'s.
//!
//! As in a forward pass, the weights are cold: each call takes the next of
//! copies of w that together exceed the last-level cache, so a decode step
//! (n ≤ 4) is timed streaming its weights from memory.
//!
//! Then the products with quantized weights (`matmul_q`: 8-bit activations,
//! integer dot products) next to the invariant f32 product at the same
//! shapes, for the types of `--quant` at the shapes whose k they allow
//! (the K types need k a multiple of 256: down only). A decode step (n = 1)
//! reports GB/s of weight bytes streamed (each product's own: 4 bytes a
//! value for f32, the blocks for the quantized type), larger n GFLOP/s
//! (2·n·m·k either way); "f32/q" is the f32 time over the quantized time.
//! The weights are random valid blocks (tests/common/qblocks.rs), cold too.
//!
//! Times are the best of 41 short samples (see `best_seconds`).
//!
//!   cargo bench --bench matmul [-- --threads 1,2] [--n 1,4,16,64,256] [--ms 300]
//!       [--part f32|quant|all] [--quant Q8_0,Q4_0,Q4_K] [--quant-n 1,16,256]
//!       [--quant-isa avx512vnni|avx2|portable]  (default: the fastest here)

mod common;
#[path = "../tests/common/qblocks.rs"]
mod qblocks;

use engine::backend::cpu::matmul_invariant::{matmul_nt_invariant, Isa};
use engine::backend::cpu::quant::{matmul_q_with, Isa as QuantIsa};
use engine::backend::cpu::Cpu;
use engine::backend::{Backend, QTensor};
use engine::quant::{GgmlType, QBytes};
use engine::tensor::DType::F32;
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// (name, m, k): out [n, m] = x [n, k] · w [m, k]ᵀ.
const SHAPES: [(&str, usize, usize); 4] = [
    ("gate/up 576→1536", 1536, 576),
    ("down 1536→576", 576, 1536),
    ("q/o 576→576", 576, 576),
    ("k/v 576→192", 192, 576),
];

/// Bytes of weight copies a case cycles through: past a 32 MiB L3.
const COLD_BYTES: usize = 96 << 20;

fn list(v: &str) -> Vec<usize> {
    v.split(',')
        .map(|s| s.trim().parse().expect("a number"))
        .collect()
}

fn main() {
    let (mut threads, mut ns, mut ms) = (vec![1, 2], vec![1, 4, 16, 64, 256], 300.0);
    let (mut part, mut types, mut quant_ns) = ("all".to_string(), vec![], vec![1, 16, 256]);
    let mut isa = QuantIsa::detect();
    types.extend([GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K]);
    common::each_flag(|flag, value| match flag {
        "--threads" => threads = list(&value),
        "--n" => ns = list(&value),
        "--ms" => ms = value.parse().expect("--ms MILLISECONDS"),
        "--part" => part = value,
        "--quant" => types = value.split(',').map(type_named).collect(),
        "--quant-n" => quant_ns = list(&value),
        "--quant-isa" => {
            isa = match value.as_str() {
                "avx512vnni" => QuantIsa::Avx512Vnni,
                "avx2" => QuantIsa::Avx2,
                "portable" => QuantIsa::Portable,
                other => panic!("unknown --quant-isa {other}"),
            }
        }
        other => panic!("unknown flag {other}"),
    });
    println!("invariant kernel: {:?}", Isa::detect());
    if part != "quant" {
        f32_products(&threads, &ns, ms);
    }
    if part != "f32" {
        quant_products(isa, &threads, &quant_ns, &types, ms);
    }
}

/// matmul_nt (gemm) against matmul_nt_invariant.
fn f32_products(threads: &[usize], ns: &[usize], ms: f64) {
    println!(
        "{:<18} {:>4} {:>3} {:>12} {:>12} {:>8}",
        "shape", "n", "thr", "gemm GF/s", "inv GF/s", "inv/gemm"
    );
    let mut rng = StdRng::seed_from_u64(1);
    for &(name, m, k) in &SHAPES {
        let copies = COLD_BYTES.div_ceil(m * k * 4);
        let ws: Vec<Tensor<Cpu>> = (0..copies).map(|_| tensor(&mut rng, &[m, k])).collect();
        for &n in ns {
            let x = tensor(&mut rng, &[n, k]);
            let mut out = Cpu.zeros(&[n, m], F32).unwrap();
            for &t in threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap();
                let (gemm, inv) = pool.install(|| {
                    let mut i = 0;
                    best_seconds(ms, |invariant| {
                        i = (i + 1) % copies;
                        if invariant {
                            let (o, x, w) = (&mut out.buf[..], &x.buf[..], &ws[i].buf[..]);
                            matmul_nt_invariant(o, x, w, n, m, k);
                        } else {
                            Cpu.matmul_nt(&mut out, &x, &ws[i]).unwrap();
                        }
                    })
                });
                let gflops = |s: f64| 2.0 * (n * m * k) as f64 / s / 1e9;
                println!(
                    "{:<18} {:>4} {:>3} {:>12.1} {:>12.1} {:>8.2}",
                    name,
                    n,
                    t,
                    gflops(gemm),
                    gflops(inv),
                    inv / gemm
                );
            }
        }
    }
}

/// matmul_nt_invariant against matmul_q for each of `types`.
fn quant_products(isa: QuantIsa, threads: &[usize], ns: &[usize], types: &[GgmlType], ms: f64) {
    println!("\nquantized kernel: {isa:?}");
    println!(
        "{:<18} {:<5} {:>4} {:>3} {:>10} {:>10} {:>6} {:>6}",
        "shape", "type", "n", "thr", "f32 inv", "quant", "unit", "f32/q"
    );
    let mut rng = StdRng::seed_from_u64(2);
    for &(name, m, k) in &SHAPES {
        let copies = COLD_BYTES.div_ceil(m * k * 4);
        let ws: Vec<Tensor<Cpu>> = (0..copies).map(|_| tensor(&mut rng, &[m, k])).collect();
        for &ty in types.iter().filter(|ty| k.is_multiple_of(ty.block_size())) {
            let bytes = ty.bytes_for(k).unwrap() * m;
            let qcopies = COLD_BYTES.div_ceil(bytes);
            let qs: Vec<QTensor<Cpu>> = (0..qcopies)
                .map(|_| {
                    let data = QBytes::Owned(qblocks::random_blocks(&mut rng, ty, m, k));
                    Cpu.upload_quant(data, ty, m, k).unwrap()
                })
                .collect();
            for &n in ns {
                let x = tensor(&mut rng, &[n, k]);
                let mut out = Cpu.zeros(&[n, m], F32).unwrap();
                for &t in threads {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(t)
                        .build()
                        .unwrap();
                    let (mut i, mut qi) = (0, 0);
                    let (inv, quant) = pool.install(|| {
                        best_seconds(ms, |quant| {
                            if quant {
                                qi = (qi + 1) % qcopies;
                                let (o, x) = (&mut out.buf[..], &x.buf[..]);
                                matmul_q_with(isa, o, x, &qs[qi].buf, n);
                            } else {
                                i = (i + 1) % copies;
                                let (o, x, w) = (&mut out.buf[..], &x.buf[..], &ws[i].buf[..]);
                                matmul_nt_invariant(o, x, w, n, m, k);
                            }
                        })
                    });
                    let (a, b, unit) = if n == 1 {
                        (
                            (m * k * 4) as f64 / inv / 1e9,
                            bytes as f64 / quant / 1e9,
                            "GB/s",
                        )
                    } else {
                        let flop = 2.0 * (n * m * k) as f64;
                        (flop / inv / 1e9, flop / quant / 1e9, "GF/s")
                    };
                    println!(
                        "{:<18} {:<5} {:>4} {:>3} {:>10.1} {:>10.1} {:>6} {:>6.2}",
                        name,
                        ty.name(),
                        n,
                        t,
                        a,
                        b,
                        unit,
                        inv / quant
                    );
                }
            }
        }
    }
}

fn type_named(name: &str) -> GgmlType {
    (0..40)
        .filter_map(GgmlType::from_id)
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown ggml type {name}"))
}

fn tensor(rng: &mut StdRng, shape: &[usize]) -> Tensor<Cpu> {
    let numel = shape.iter().product();
    let v = (0..numel).map(|_| rng.random_range(-1.0..1.0)).collect();
    Cpu.upload(v, shape, F32).unwrap()
}

/// Seconds per call of `call(false)` (matmul_nt, or the invariant product)
/// and `call(true)` (the invariant product, or the quantized one): the best of 41 short samples of each, taken in turns so that
/// both see the same load from other processes (which only adds time).
fn best_seconds(ms: f64, mut call: impl FnMut(bool)) -> (f64, f64) {
    let t0 = Instant::now();
    let mut calls = 0;
    while calls < 3 || t0.elapsed().as_secs_f64() < ms / 1e3 / 10.0 {
        call(calls % 2 == 1);
        calls += 1;
    }
    let per_call = t0.elapsed().as_secs_f64() / calls as f64;
    let reps = ((ms / 1e3 / 82.0) / per_call).ceil().max(1.0) as usize;
    let mut best = [f64::INFINITY; 2];
    for _ in 0..41 {
        for (invariant, best) in [false, true].into_iter().zip(&mut best) {
            let t = Instant::now();
            for _ in 0..reps {
                call(invariant);
            }
            *best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
    }
    (best[0], best[1])
}
