//! The CPU's batch-invariant matrix product (`Backend::matmul_nt_invariant`,
//! src/backend/cpu/matmul_invariant.rs): a row's output bits depend on that
//! row of x and on w only — not on the other rows, their order or number,
//! the thread count or the instruction set — and they are the module's
//! defined arithmetic, re-implemented here lane by lane.
//!
//! Shapes: SmolLM2-135M's layers (k 576 and 1536; m 576, 192, 1536, and a
//! slice of the 49152-wide logits), and small odd ones where k is no
//! multiple of 16 and m, n fit no tile. Inputs span several binary orders of
//! magnitude, so that a change of summation order changes bits (checked).
//! Seeds are printed; replay one with BATCH_INVARIANCE_SEED=SEED.

mod common;

use common::{assert_close_to_scale, assert_spare_untouched, cpu_input, cpu_poisoned, seeded_rng};
use engine::backend::cpu::matmul_invariant::{matmul_nt_invariant_with, Isa, LANES};
use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use rand::rngs::StdRng;
use rand::Rng;

/// (m, k): the model's layers, a logits slice, then shapes that fit no tile
/// and k that is no multiple of 16 (k < 16: a partial chunk only).
const SHAPES: [(usize, usize); 10] = [
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (3001, 576),
    (37, 575),
    (13, 1537),
    (66, 100),
    (5, 7),
    (1, 1),
];

fn rng() -> StdRng {
    seeded_rng("BATCH_INVARIANCE_SEED")
}

/// Values in ±[2⁻⁴, 2⁴), with random signs and exponents.
fn data(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| rng.random_range(-1.0f32..1.0) * (rng.random_range(-4..4) as f32).exp2())
        .collect()
}

/// out [n, m] through the Backend method (global rayon pool).
fn product(x: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    let (xt, wt) = (cpu_input(x, &[n, k]), cpu_input(w, &[m, k]));
    let mut out = cpu_poisoned(&[n, m]);
    Cpu.matmul_nt_invariant(&mut out, &xt, &wt).unwrap();
    assert_spare_untouched("matmul_nt_invariant", &out);
    out.buf[..n * m].to_vec()
}

/// out [n, m] with one instruction set.
fn product_with(isa: Isa, x: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * m];
    matmul_nt_invariant_with(isa, &mut out, x, w, n, m, k);
    out
}

/// The module's definition, written independently of it: lane l sums
/// fma(a[16c + l], b[16c + l], ·) over the chunks c in order (elements past
/// k are zeros), then lanes l + 8, l + 4, l + 2, l + 1 are added pairwise.
fn defined_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (i, (&a, &b)) in a.iter().zip(b).enumerate() {
        acc[i % LANES] = a.mul_add(b, acc[i % LANES]);
    }
    for half in [8, 4, 2, 1] {
        for l in 0..half {
            acc[l] += acc[l + half];
        }
    }
    acc[0]
}

/// Bit-for-bit equality, naming the first element that differs.
fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i} is {:e}, want {:e}", got[i], want[i]);
    }
}

/// The inputs are sensitive to the order of summation: a plain sequential
/// sum differs from the defined one somewhere, so equal bits mean the same
/// order was used, not that any order would do.
fn assert_order_matters(x: &[f32], w: &[f32], n: usize, m: usize, k: usize) {
    let differs = (0..n * m).any(|e| {
        let (a, b) = (&x[e / m * k..][..k], &w[e % m * k..][..k]);
        let sequential = a.iter().zip(b).fold(0.0f32, |s, (&a, &b)| a.mul_add(b, s));
        sequential.to_bits() != defined_dot(a, b).to_bits()
    });
    assert!(differs, "n{n} m{m} k{k}: test data insensitive to order");
}

#[test]
fn each_row_of_a_batch_equals_the_row_alone() {
    let mut rng = rng();
    for (m, k) in SHAPES {
        let n = rng.random_range(1..=70);
        let (x, w) = (data(&mut rng, n * k), data(&mut rng, m * k));
        let batch = product(&x, &w, n, m, k);
        for i in 0..n {
            let alone = product(&x[i * k..(i + 1) * k], &w, 1, m, k);
            let what = format!("row {i} of {n} (m{m} k{k})");
            assert_same_bits(&what, &batch[i * m..(i + 1) * m], &alone);
        }
        // And inside a batch of another size: the last rows, from n/2.
        let from = n / 2;
        let tail = product(&x[from * k..], &w, n - from, m, k);
        assert_same_bits(
            &format!("rows {from}.. of {n} (m{m} k{k})"),
            &batch[from * m..],
            &tail,
        );
    }
}

#[test]
fn permuted_rows_give_permuted_outputs() {
    let mut rng = rng();
    for (m, k) in SHAPES {
        let n = rng.random_range(2..=70);
        let (x, w) = (data(&mut rng, n * k), data(&mut rng, m * k));
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        let xp: Vec<f32> = perm
            .iter()
            .flat_map(|&p| x[p * k..(p + 1) * k].to_vec())
            .collect();
        let (out, outp) = (product(&x, &w, n, m, k), product(&xp, &w, n, m, k));
        for (i, &p) in perm.iter().enumerate() {
            let what = format!("row {p} at {i} of {n} (m{m} k{k})");
            assert_same_bits(&what, &outp[i * m..(i + 1) * m], &out[p * m..(p + 1) * m]);
        }
    }
}

#[test]
fn bits_are_the_defined_arithmetic_on_every_instruction_set() {
    let mut rng = rng();
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|isa| isa.available())
        .collect();
    eprintln!("instruction sets here: {isas:?}");
    for (m, k) in SHAPES {
        // Every row count to 9 (the tiles' row tails), then a few more.
        for n in (1..=9).chain([16, 33, 67]) {
            let (x, w) = (data(&mut rng, n * k), data(&mut rng, m * k));
            let want: Vec<f32> = (0..n * m)
                .map(|e| defined_dot(&x[e / m * k..][..k], &w[e % m * k..][..k]))
                .collect();
            for &isa in &isas {
                let got = product_with(isa, &x, &w, n, m, k);
                assert_same_bits(&format!("{isa:?} n{n} m{m} k{k}"), &got, &want);
            }
            if n * k >= 64 && m >= 5 {
                assert_order_matters(&x, &w, n, m, k);
            }
        }
    }
}

#[test]
fn one_and_two_threads_give_the_same_bits() {
    let mut rng = rng();
    let pool = |t| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    };
    let (one, two) = (pool(1), pool(2));
    for (m, k) in SHAPES {
        for n in [1, 4, rng.random_range(5..=70)] {
            let (x, w) = (data(&mut rng, n * k), data(&mut rng, m * k));
            let a = one.install(|| product(&x, &w, n, m, k));
            let b = two.install(|| product(&x, &w, n, m, k));
            assert_same_bits(&format!("1 vs 2 threads, n{n} m{m} k{k}"), &b, &a);
        }
    }
}

#[test]
fn accurate_to_f32_against_f64() {
    let mut rng = rng();
    for (m, k) in SHAPES {
        let n = rng.random_range(1..=70);
        let (x, w) = (data(&mut rng, n * k), data(&mut rng, m * k));
        let got = product(&x, &w, n, m, k);
        for i in 0..n {
            let a = &x[i * k..(i + 1) * k];
            let want: Vec<f64> = w
                .chunks_exact(k)
                .map(|b| a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum())
                .collect();
            // The row's scale: its largest |Σ| (the project's f32 tolerance
            // is relative to the largest reference value).
            let scale = want.iter().fold(0.0f64, |s, v| s.max(v.abs()));
            let what = format!("row {i} of {n} (m{m} k{k})");
            assert_close_to_scale(&what, &got[i * m..(i + 1) * m], &want, scale, 1e-5);
        }
    }
}
