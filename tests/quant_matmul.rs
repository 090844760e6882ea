//! The CPU's products with quantized weights (`Backend::matmul_q`,
//! src/backend/cpu/quant/): every weight type against an f64 product of
//! the dequantized weights and the unquantized activations, within the
//! error that quantizing the activations to 8 bits allows; batch invariance
//! (a row's bits alone, in any batch, on 1 or 2 threads); the same bits on
//! every instruction set and from rows packed at load or as the file lays
//! them out, and the documented arithmetic re-implemented here for Q8_0 and
//! Q4_0; bad uploads refused.
//!
//! Weights are random valid blocks (tests/common/qblocks.rs). Seeds are
//! printed; replay one with QUANT_MATMUL_SEED=SEED.

mod common;

use common::qblocks::random_blocks;
use common::{assert_spare_untouched, cpu_input, cpu_poisoned, seeded_rng};
use engine::backend::cpu::quant::{matmul_q_with, Isa, QWeight};
use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::quant::dequant::dequantize_vec;
use engine::quant::{GgmlType, QBytes};
use engine::Error;
use rand::rngs::StdRng;
use rand::Rng;

/// Every type `matmul_q` takes.
const TYPES: [GgmlType; 11] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F32,
];

const NS: [usize; 5] = [1, 3, 17, 64, 130];
const MS: [usize; 4] = [1, 7, 33, 100];

/// Values of k for `ty`: a single block, an odd number of 32-blocks (the
/// kernels' last block alone), SmolLM2's 576 and 1536, as the type allows.
fn ks(ty: GgmlType) -> &'static [usize] {
    match ty.block_size() {
        256 => &[256, 512, 1536],
        32 => &[32, 96, 256, 576, 1536],
        _ => &[1, 7, 100, 576],
    }
}

fn rng() -> StdRng {
    seeded_rng("QUANT_MATMUL_SEED")
}

/// Activations in ±1, with a block of zeros and a block with one large
/// value (a block's codes then use little of their range).
fn activations(rng: &mut StdRng, n: usize, k: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    if k >= 64 {
        x[..32].fill(0.0);
        x[32 + 5] = 40.0;
    }
    x
}

/// out [n, m] through the Backend (global pool, fastest set), checking
/// that nothing past out's elements is written.
fn product(ty: GgmlType, x: &[f32], w: &[u8], n: usize, m: usize, k: usize) -> Vec<f32> {
    let wq = Cpu
        .upload_quant(QBytes::Owned(w.to_vec()), ty, m, k)
        .unwrap();
    let xt = cpu_input(x, &[n, k]);
    let mut out = cpu_poisoned(&[n, m]);
    Cpu.matmul_q(&mut out, &xt, &wq).unwrap();
    assert_spare_untouched("matmul_q", &out);
    out.buf[..n * m].to_vec()
}

/// out [n, m] on the set `isa`, from `w` as the CPU keeps it (`packed`:
/// `QWeight::new`, which packs Q4_0 and Q8_0) or in the file's layout.
#[allow(clippy::too_many_arguments)]
fn product_with(
    isa: Isa,
    packed: bool,
    ty: GgmlType,
    x: &[f32],
    w: &[u8],
    n: usize,
    m: usize,
    k: usize,
) -> Vec<f32> {
    let bytes = QBytes::Owned(w.to_vec());
    let w = match packed {
        true => QWeight::new(ty, bytes, m, k),
        false => QWeight::file_layout(ty, bytes, m, k),
    };
    let mut out = vec![f32::NAN; n * m];
    matmul_q_with(isa, &mut out, x, &w.unwrap(), n);
    out
}

/// Bit-for-bit equality, naming the first element that differs.
fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i} is {:e}, want {:e}", got[i], want[i]);
    }
}

/// The bound on |out − x·deq(w)ᵀ| for one element, a = x row, w = its
/// dequantized weight row:
/// - quantizing a block of a to codes q = rne(a · 127/amax) with d = amax/127
///   moves each value by at most d/2 (plus the rounding of a · 127/amax,
///   under 127 · 2⁻²³ of a code: 0.5001 d covers it), so the products
///   move by at most Σ_blocks 0.5001 d Σ |w| — the whole error allowance;
/// - f32 rounding: each lane adds k/128 steps (three roundings each) and
///   the tree four more, and the kernel's weights sw·v + mw differ from
///   dequant's by an f32 rounding or two: (3k/128 + 8) · 2⁻²⁴ Σ |a||w|
///   bounds it with room (the float types take this term alone, with k/16).
fn bound(ty: GgmlType, a: &[f32], w: &[f32]) -> f64 {
    let k = a.len();
    let abs_dot: f64 = a
        .iter()
        .zip(w)
        .map(|(&a, &w)| (a as f64 * w as f64).abs())
        .sum();
    let steps = if ty.block_size() == 1 {
        k.div_ceil(16)
    } else {
        3 * k / 128
    };
    let rounding = (steps + 8) as f64 * 2f64.powi(-24) * abs_dot;
    if ty.block_size() == 1 {
        return rounding;
    }
    let quant: f64 = a
        .chunks(32)
        .zip(w.chunks(32))
        .map(|(a, w)| {
            let amax = a.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            0.5001 * amax / 127.0 * w.iter().map(|&w| (w as f64).abs()).sum::<f64>()
        })
        .sum();
    quant + rounding
}

/// Every type, ragged shapes (each n with each m over the values of k),
/// against f64 on the dequantized weights, within `bound`.
#[test]
fn each_type_matches_f64_within_the_activation_quantization_error() {
    let mut rng = rng();
    for ty in TYPES {
        for (ki, &k) in ks(ty).iter().enumerate() {
            for (ni, &n) in NS.iter().enumerate() {
                let m = MS[(ni + ki) % MS.len()];
                let (x, w) = (
                    activations(&mut rng, n, k),
                    random_blocks(&mut rng, ty, m, k),
                );
                let wf = dequantize_vec(ty, &w, m * k).unwrap();
                let got = product(ty, &x, &w, n, m, k);
                for (e, &got) in got.iter().enumerate() {
                    let (a, b) = (&x[e / m * k..][..k], &wf[e % m * k..][..k]);
                    let want: f64 = a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let err = (got as f64 - want).abs();
                    let tol = bound(ty, a, b);
                    assert!(
                        err <= tol,
                        "{ty} n{n} m{m} k{k} [{}, {}]: {got:e} vs f64 {want:e}, error {err:e} > bound {tol:e}",
                        e / m,
                        e % m
                    );
                }
            }
        }
    }
}

/// Row i of a batch is bit-identical to the row alone and to the row in
/// another batch (the rows reversed), and 1 and 2 threads agree.
#[test]
fn each_row_of_a_batch_equals_the_row_alone_on_any_thread_count() {
    let mut rng = rng();
    let (n, m) = (130, 100);
    for ty in TYPES {
        let k = if ty.block_size() == 256 { 512 } else { 96 };
        let (x, w) = (
            activations(&mut rng, n, k),
            random_blocks(&mut rng, ty, m, k),
        );
        let all = product(ty, &x, &w, n, m, k);
        for i in [0, 1, 63, 64, 129] {
            let alone = product(ty, &x[i * k..(i + 1) * k], &w, 1, m, k);
            assert_same_bits(
                &format!("{ty} row {i} alone"),
                &alone,
                &all[i * m..(i + 1) * m],
            );
        }
        let reversed: Vec<f32> = x.chunks(k).rev().flatten().copied().collect();
        let rev = product(ty, &reversed, &w, n, m, k);
        for i in 0..n {
            let what = format!("{ty} row {i} reversed");
            assert_same_bits(&what, &rev[(n - 1 - i) * m..][..m], &all[i * m..][..m]);
        }
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| product(ty, &x, &w, n, m, k));
            assert_same_bits(&format!("{ty} on {threads} threads"), &got, &all);
        }
    }
}

/// AVX-512 VNNI, AVX2 and the portable build give the same bits, from rows
/// packed at load or as the file lays them out (the sets this processor
/// lacks are skipped, and named).
#[test]
fn every_instruction_set_and_layout_gives_the_same_bits() {
    let mut rng = rng();
    let sets: Vec<Isa> = [Isa::Avx512Vnni, Isa::Avx2]
        .into_iter()
        .filter(|isa| {
            if !isa.available() {
                eprintln!("{isa:?} not available here: skipped");
            }
            isa.available()
        })
        .collect();
    for ty in TYPES {
        for &k in ks(ty) {
            for (n, m) in [(1, 33), (17, 7), (64, 100)] {
                let (x, w) = (
                    activations(&mut rng, n, k),
                    random_blocks(&mut rng, ty, m, k),
                );
                let want = product_with(Isa::Portable, false, ty, &x, &w, n, m, k);
                for isa in sets.iter().copied().chain([Isa::Portable]) {
                    for packed in [true, false] {
                        let got = product_with(isa, packed, ty, &x, &w, n, m, k);
                        let what = format!("{ty} {isa:?} packed {packed} n{n} m{m} k{k}");
                        assert_same_bits(&what, &got, &want);
                    }
                }
            }
        }
    }
}

/// The module doc's arithmetic for Q8_0 and Q4_0, written here from the
/// doc: activations per 32-block (d = amax/127, q = rne(a · 127/amax)),
/// lane 4·(b mod 4) + g takes fma(sw · d, f32(Σ v·q over values 8g..8g+8), ·)
/// per block b in order, then lanes l + 8, l + 4, l + 2, l + 1.
#[test]
fn bits_are_the_documented_arithmetic() {
    let mut rng = rng();
    let (n, m, k) = (3, 5, 96);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
        let (x, w) = (
            activations(&mut rng, n, k),
            random_blocks(&mut rng, ty, m, k),
        );
        let got = product(ty, &x, &w, n, m, k);
        let size = ty.type_size();
        for e in 0..n * m {
            let a = &x[e / m * k..][..k];
            let row = &w[e % m * (k / 32 * size)..][..k / 32 * size];
            let mut acc = [0f32; 16];
            for (b, (a, blk)) in a.chunks(32).zip(row.chunks(size)).enumerate() {
                let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if amax == 0.0 { 0.0 } else { 127.0 / amax };
                let q: Vec<i32> = a
                    .iter()
                    .map(|v| (v * inv).round_ties_even() as i32)
                    .collect();
                let sw = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
                let v: Vec<i32> = (0..32)
                    .map(|e| match ty {
                        GgmlType::Q8_0 => blk[2 + e] as i8 as i32,
                        _ => ((blk[2 + e % 16] >> (4 * (e / 16))) & 15) as i32 - 8,
                    })
                    .collect();
                for g in 0..4 {
                    let p: i32 = (8 * g..8 * g + 8).map(|e| v[e] * q[e]).sum();
                    let l = 4 * (b % 4) + g;
                    acc[l] = (sw * d).mul_add(p as f32, acc[l]);
                }
            }
            for half in [8, 4, 2, 1] {
                for l in 0..half {
                    acc[l] += acc[l + half];
                }
            }
            assert_eq!(got[e].to_bits(), acc[0].to_bits(), "{ty} element {e}");
        }
    }
}

/// Rows of a quantized table are its dequantized rows.
#[test]
fn embedding_rows_are_dequantized_rows() {
    let mut rng = rng();
    let (vocab, d) = (10, 64);
    for ty in TYPES.into_iter().filter(|t| t.block_size() == 32) {
        let w = random_blocks(&mut rng, ty, vocab, d);
        let table = Cpu
            .upload_quant(QBytes::Owned(w.clone()), ty, vocab, d)
            .unwrap();
        let packs = ty.block_size() == 32;
        assert_eq!(table.buf.is_packed(), packs, "{ty} packed at upload");
        let mut out = cpu_poisoned(&[3, d]);
        Cpu.embedding_q(&mut out, &[7, 0, 7], &table).unwrap();
        let all = dequantize_vec(ty, &w, vocab * d).unwrap();
        for (r, id) in [7, 0, 7].into_iter().enumerate() {
            assert_same_bits(
                &format!("{ty} row {r}"),
                &out.buf[r * d..][..d],
                &all[id * d..][..d],
            );
        }
    }
}

/// Uploads that do not hold the matrix they claim are errors, not panics.
#[test]
fn bad_uploads_are_refused() {
    let upload = |bytes: usize, ty, rows, cols| {
        Cpu.upload_quant(QBytes::Owned(vec![0; bytes]), ty, rows, cols)
    };
    let q4 = GgmlType::Q4_0;
    assert!(upload(2 * 18, q4, 2, 32).is_ok());
    for (bytes, ty, rows, cols, says) in [
        (2 * 18 - 1, q4, 2, 32, "do not hold 2 rows"),
        (3 * 18, q4, 2, 32, "do not hold 2 rows"),
        (2 * 18, q4, 1, 48, "not a whole number of 32-value blocks"),
        (
            144,
            GgmlType::Q4_K,
            1,
            576 / 2,
            "not a whole number of 256-value blocks",
        ),
    ] {
        match upload(bytes, ty, rows, cols) {
            Err(Error::Invalid(msg)) => assert!(msg.contains(says), "{msg}"),
            other => panic!(
                "{ty} {bytes} bytes [{rows}, {cols}]: {:?}",
                other.map(|_| ())
            ),
        }
    }
    match upload(84, GgmlType::Q2_K, 1, 256) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("Q2_K"), "{msg}"),
        other => panic!("Q2_K: {:?}", other.map(|_| ())),
    }
}

/// An empty inner dimension (k = 0, which `check` accepts): every output is
/// an empty sum, +0, on every set.
#[test]
fn empty_rows_give_zeros() {
    for ty in TYPES {
        for isa in [Isa::Avx512Vnni, Isa::Avx2, Isa::Portable] {
            if isa.available() {
                let got = product_with(isa, true, ty, &[], &[], 3, 2, 0);
                assert!(
                    got.iter().all(|v| v.to_bits() == 0),
                    "{ty} {isa:?}: {got:?}"
                );
            }
        }
    }
}
