//! Quantized weights on the CUDA device (kernels/quant.cu) in the CPU
//! emulator, through `Backend::upload_quant`, `matmul_q` and `embedding_q`,
//! against the CPU device on the same bytes and the same (bf16) x. Weights
//! are random valid blocks (tests/common/qblocks.rs).
//! Shapes fit no tile: m = 37, n from a decode row (version 1, dp4a) to 64
//! (version 2, int8 tensor cores). Outputs are poisoned with NaN and have a
//! spare row past their shape that must keep its sentinel; x has a NaN row
//! past its shape that no kernel may read. Run with
//! `ENGINE_EMU_REVERSE_LANES=1` as well (the emulator's lane order).
//!
//! Tolerances are bounds derived per element, not one relative number, as
//! the device quantizes x to int8 per 32 values (see kernels/quant.cu):
//!
//! - tight: against r̃ = Σ x̃·w in f64, x̃ the quantized x computed here as
//!   the kernel does (d = max|x|/127 in f32, q = x/d rounded to even), only
//!   the kernel's f32 roundings may remain: (units/8 + 8)·2⁻²⁴ · S with
//!   S = Σ (|w| + 3|b|)·|x̃|, b the weight's offset (w = a·q + b). A unit's
//!   terms are rounded in b·Σq and fma(a, isum, ·) (up to |b·Σq| apart from
//!   their sum), then by each of their partial's ≤ units/8 updates and the
//!   three additions of the tree;
//! - against the CPU op: that, plus |r̃ − y| (y = Σ x·w exactly, computed
//!   here), plus the CPU's own distance from y, which the trait allows: it
//!   may quantize x in blocks of the weight type's size, each value off by
//!   at most (max|x|/127)·(1/2 + 127·2⁻¹¹) (d kept in f16 by ggml's Q8_0),
//!   and sums in f32, (k/16 + 8)·2⁻²⁴ · Σ (|w| + 3|b|)·|x|.
//!
//! A bf16 output adds its rounding, 2⁻⁸ of the f32 value. Types without a
//! kernel of their own are dequantized to bf16 (w̃, each weight rounded
//! once) and multiplied by `matmul_nt_invariant` with x as it is: its
//! emulated mma rounds k + a few times, so (k + 16)·2⁻²⁴ · Σ |w̃|·|x|.
#![cfg(feature = "emu")]

mod common;

use common::emu::{data, gpu};
use common::qblocks::random_blocks;
use common::seeded_rng;
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::Emu;
use engine::backend::cuda::Cuda;
use engine::backend::{Backend, QTensor};
use engine::quant::dequant::{dequantize_vec, SUPPORTED};
use engine::quant::{GgmlType, QBytes};
use engine::tensor::DType::{self, BF16, F32};
use engine::tensor::Tensor;
use engine::Error;
use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;
use std::ops::Range;
use std::time::Instant;

const U: f64 = 1.0 / (1u64 << 24) as f64; // f32's unit roundoff
const BF16_U: f64 = 1.0 / 256.0; // bf16's
const SENTINEL: f32 = 12288.0; // bf16-representable
const M: usize = 37; // weight rows: no multiple of either kernel's tile

/// The types with product kernels of their own; the rest go through bf16.
const KERNEL_TYPES: [GgmlType; 4] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4_K,
];

/// Which bytes of a block of `ty` are its quants.
fn quant_bytes(ty: GgmlType) -> Range<usize> {
    match ty {
        GgmlType::Q8_0 => 2..34,
        GgmlType::Q4_0 => 2..18,
        GgmlType::Q4_1 => 4..20,
        GgmlType::Q5_0 => 2..22,
        GgmlType::Q5_1 => 4..24,
        GgmlType::Q4_K => 16..144,
        GgmlType::Q5_K => 16..176,
        GgmlType::Q6_K => 0..192,
        other => panic!("no block layout for {other}"),
    }
}

/// Each weight's offset b (w = a·q + b): the blocks dequantized with every
/// quant zero.
fn offsets(ty: GgmlType, bytes: &[u8], values: usize) -> Vec<f32> {
    if let GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 = ty {
        return vec![0.0; values];
    }
    let mut zeroed = bytes.to_vec();
    let quants = quant_bytes(ty);
    for block in zeroed.chunks_exact_mut(ty.type_size()) {
        block[quants.clone()].fill(0);
    }
    dequantize_vec(ty, &zeroed, values).unwrap()
}

/// x as the device quantizes it: per 32 values d = max|x|/127 (in f32) and
/// q = x/d rounded to even; returns d·q.
fn quantized(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for unit in x.chunks_exact(32) {
        let amax = unit.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        for &v in unit {
            let q = if amax > 0.0 {
                (v / d).round_ties_even().clamp(-127.0, 127.0)
            } else {
                0.0
            };
            out.push(d * q);
        }
    }
    out
}

/// The largest distance each CPU output may have from the exact product: its
/// quantization of x in blocks of `block` values (none for 1: float weights)
/// and its f32 sums.
fn cpu_bound(x: &[f32], w: &[f32], b: &[f32], block: usize) -> f64 {
    let mut bound = 0.0;
    for ((xb, wb), bb) in x.chunks(block).zip(w.chunks(block)).zip(b.chunks(block)) {
        let amax = xb.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let dx = if block == 1 {
            0.0
        } else {
            amax / 127.0 * (0.5 + 127.0 / 2048.0)
        };
        let k = x.len() as f64;
        for ((&xv, &wv), &bv) in xb.iter().zip(wb).zip(bb) {
            let mag = wv.abs() as f64 + 3.0 * bv.abs() as f64;
            bound += dx * wv.abs() as f64 + (k / 16.0 + 8.0) * U * (xv.abs() as f64 + dx) * mag;
        }
    }
    bound
}

/// One product's inputs and what the device must give for them.
struct Case {
    ty: GgmlType,
    n: usize,
    k: usize,
    x: Vec<f32>,
    bytes: Vec<u8>,
}

impl Case {
    fn new(rng: &mut StdRng, ty: GgmlType, n: usize, k: usize) -> Self {
        let mut x = data(rng, n * k, 1.0);
        // A unit of zeros (d = 0) in the last row.
        x[(n - 1) * k..][..32].fill(0.0);
        let bytes = random_blocks(rng, ty, M, k);
        Case { ty, n, k, x, bytes }
    }

    fn upload<B: Backend>(&self, dev: &B) -> QTensor<B> {
        let data = QBytes::Owned(self.bytes.clone());
        dev.upload_quant(data, self.ty, M, self.k).unwrap()
    }

    /// The CPU device's output, in f32.
    fn cpu(&self) -> Vec<f32> {
        let w = self.upload(&Cpu);
        let x = Cpu.upload(self.x.clone(), &[self.n, self.k], F32).unwrap();
        let mut out = Cpu.zeros(&[self.n, M], F32).unwrap();
        Cpu.matmul_q(&mut out, &x, &w).unwrap();
        Cpu.download(&out).unwrap()
    }

    /// The device's output [n, M] in `dtype`, checking its spare row.
    fn gpu(&self, g: &Cuda<Emu>, dtype: DType) -> Vec<f32> {
        let w = self.upload(g);
        let (n, k) = (self.n, self.k);
        let x = with_spare_row(g, &self.x, k, f32::NAN, BF16);
        let mut out = with_spare_row(g, &vec![f32::NAN; n * M], M, SENTINEL, dtype);
        g.matmul_q(&mut out, &x, &w).unwrap();
        out.shape[0] = n + 1;
        let mut all = g.download(&out).unwrap();
        let spare = all.split_off(n * M);
        let what = format!("{} n {n} k {k} {dtype}", self.ty);
        assert!(
            spare.iter().all(|&v| v == SENTINEL),
            "{what}: spare row written"
        );
        all
    }

    /// `got` (the device's, in `dtype`) against the bounds of the header.
    fn check(&self, got: &[f32], cpu: &[f32], dtype: DType) {
        let (ty, n, k) = (self.ty, self.n, self.k);
        let w = dequantize_vec(ty, &self.bytes, M * k).unwrap();
        let b = offsets(ty, &self.bytes, M * k);
        // What the device multiplies (x̃, w̃), its f32 roundings per unit of
        // S, and the weight of the offsets in S.
        let (xd, wd, gamma, b_weight) = if KERNEL_TYPES.contains(&ty) {
            let units = (k / 32) as f64;
            (quantized(&self.x), w.clone(), (units / 8.0 + 8.0) * U, 3.0)
        } else {
            let wb = w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            (self.x.clone(), wb, (k as f64 + 16.0) * U, 0.0)
        };
        for i in 0..n {
            let (xr, xdr) = (&self.x[i * k..][..k], &xd[i * k..][..k]);
            for j in 0..M {
                let (wr, wdr, br) = (&w[j * k..][..k], &wd[j * k..][..k], &b[j * k..][..k]);
                let (mut exact, mut tilde, mut s) = (0f64, 0f64, 0f64);
                for e in 0..k {
                    exact += xr[e] as f64 * wr[e] as f64;
                    tilde += xdr[e] as f64 * wdr[e] as f64;
                    let wmag = wdr[e].abs() as f64 + b_weight * br[e].abs() as f64;
                    s += wmag * xdr[e].abs() as f64;
                }
                let mut tight = gamma * s;
                if dtype == BF16 {
                    tight += BF16_U * (tilde.abs() + tight);
                }
                let to_cpu = tight + (tilde - exact).abs() + cpu_bound(xr, wr, br, ty.block_size());
                let (got, cpu) = (got[i * M + j] as f64, cpu[i * M + j] as f64);
                let what = || format!("{ty} n {n} k {k} {dtype}: out[{i}, {j}] = {got}");
                let err = (got - tilde).abs();
                assert!(
                    err <= tight,
                    "{}, want {tilde} ± {tight:e} (off {err:e})",
                    what()
                );
                let err = (got - cpu).abs();
                assert!(
                    err <= to_cpu,
                    "{}, the CPU's {cpu} ± {to_cpu:e} (off {err:e})",
                    what()
                );
            }
        }
    }
}

/// `v` [rows, cols] on the device in `dtype` with one more row holding
/// `spare` past the shape.
fn with_spare_row(
    g: &Cuda<Emu>,
    v: &[f32],
    cols: usize,
    spare: f32,
    dtype: DType,
) -> Tensor<Cuda<Emu>> {
    let rows = v.len() / cols;
    let mut all = v.to_vec();
    all.extend(std::iter::repeat_n(spare, cols));
    let mut t = g.upload(all, &[rows + 1, cols], dtype).unwrap();
    t.shape[0] = rows;
    t
}

/// The inner sizes each kernel type is checked at: a few blocks, SmolLM2's
/// hidden size 576 for the 32-value blocks, one and two Q4_K blocks.
fn widths(ty: GgmlType) -> &'static [usize] {
    match ty.block_size() {
        32 => &[64, 576],
        _ => &[256, 512],
    }
}

#[test]
fn products_match_cpu() {
    let (g, mut rng) = (gpu(), seeded_rng("QUANT_SEED"));
    let t = Instant::now();
    for ty in KERNEL_TYPES {
        for &k in widths(ty) {
            for n in [1, 3, 17, 64] {
                let case = Case::new(&mut rng, ty, n, k);
                let cpu = case.cpu();
                case.check(&case.gpu(&g, BF16), &cpu, BF16);
                if n == 3 || n == 17 {
                    case.check(&case.gpu(&g, F32), &cpu, F32);
                }
            }
        }
    }
    eprintln!("products: {:.2?}", t.elapsed());
}

#[test]
fn other_types_multiply_through_bf16() {
    let (g, mut rng) = (gpu(), seeded_rng("QUANT_SEED"));
    let t = Instant::now();
    for ty in SUPPORTED
        .iter()
        .copied()
        .filter(|t| !KERNEL_TYPES.contains(t))
    {
        let k = if ty.block_size() == 256 { 256 } else { 96 };
        for n in [1, 17] {
            let case = Case::new(&mut rng, ty, n, k);
            let cpu = case.cpu();
            case.check(&case.gpu(&g, BF16), &cpu, BF16);
            case.check(&case.gpu(&g, F32), &cpu, F32);
        }
    }
    eprintln!("other types: {:.2?}", t.elapsed());
}

/// A row's bits do not depend on the batch: rows alone and in threes
/// (version 1) equal the same rows among 19 (version 2), in f32.
#[test]
fn rows_alone_equal_rows_in_a_batch() {
    let (g, mut rng) = (gpu(), seeded_rng("QUANT_SEED"));
    for ty in KERNEL_TYPES {
        let k = widths(ty)[1];
        let case = Case::new(&mut rng, ty, 19, k);
        let batch = case.gpu(&g, F32);
        for (first, rows) in [(0, 1), (5, 3), (18, 1)] {
            let part = Case {
                n: rows,
                x: case.x[first * k..(first + rows) * k].to_vec(),
                bytes: case.bytes.clone(),
                ..case
            };
            let got = part.gpu(&g, F32);
            let want = &batch[first * M..(first + rows) * M];
            let same = got
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ty}: rows {first}..{} differ alone", first + rows);
        }
    }
}

/// Every type the CPU dequantizes, gathered bit for bit as the CPU does
/// (f32), and rounded once (bf16): ids with repeats and the last row.
#[test]
fn embeddings_match_cpu_bit_for_bit() {
    let (g, mut rng) = (gpu(), seeded_rng("QUANT_SEED"));
    let vocab = 23;
    for &ty in SUPPORTED {
        let d = match ty.block_size() {
            1 => 40,
            32 => 96,
            _ => 512,
        };
        let bytes = random_blocks(&mut rng, ty, vocab, d);
        let mut ids: Vec<u32> = (0..9).map(|_| rng.random_range(0..vocab as u32)).collect();
        ids.extend([vocab as u32 - 1, ids[0]]);
        let n = ids.len();

        let table = Cpu
            .upload_quant(QBytes::Owned(bytes.clone()), ty, vocab, d)
            .unwrap();
        let mut out = Cpu.zeros(&[n, d], F32).unwrap();
        Cpu.embedding_q(&mut out, &ids, &table).unwrap();
        let want = Cpu.download(&out).unwrap();

        let table = g.upload_quant(QBytes::Owned(bytes), ty, vocab, d).unwrap();
        for dtype in [F32, BF16] {
            let mut out = with_spare_row(&g, &vec![f32::NAN; n * d], d, SENTINEL, dtype);
            g.embedding_q(&mut out, &ids, &table).unwrap();
            out.shape[0] = n + 1;
            let mut got = g.download(&out).unwrap();
            let spare = got.split_off(n * d);
            assert!(
                spare.iter().all(|&v| v == SENTINEL),
                "{ty} {dtype}: spare row written"
            );
            let rounded = |v: f32| match dtype {
                BF16 => bf16::from_f32(v).to_f32(),
                _ => v,
            };
            for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                let b = rounded(*b);
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{ty} {dtype}: element {e}: {a} vs {b}"
                );
            }
        }
    }
}

/// Bad bytes and ids are errors, not panics, and leave outputs untouched.
#[test]
fn bad_input_is_an_error() {
    let g = gpu();
    let upload = |len: usize, ty: GgmlType, rows: usize, cols: usize| {
        g.upload_quant(QBytes::Owned(vec![0; len]), ty, rows, cols)
            .map(|_| ())
            .unwrap_err()
    };
    let err = upload(3 * 34 - 1, GgmlType::Q8_0, 3, 32);
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(err.to_string().contains("101 bytes"), "{err}");
    let err = upload(3 * 34, GgmlType::Q8_0, 1, 96 + 16);
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let err = upload(144, GgmlType::Q4_K, 1, 128);
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let err = upload(84, GgmlType::Q2_K, 1, 256);
    assert!(matches!(err, Error::Unsupported(_)), "{err}");

    let table = g
        .upload_quant(QBytes::Owned(vec![0; 2 * 34]), GgmlType::Q8_0, 2, 32)
        .unwrap();
    let mut out = g.upload(vec![SENTINEL; 2 * 32], &[2, 32], BF16).unwrap();
    let err = g.embedding_q(&mut out, &[1, 2], &table).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let after = g.download(&out).unwrap();
    assert!(after.iter().all(|&v| v == SENTINEL), "output written");
}

/// LoRA's backward through a frozen quantized weight: dx += dy · deq(W) on
/// the emulated GPU against the CPU op, for a type with an integer kernel
/// and one without, dx in f32 and bf16.
#[test]
fn backward_matches_cpu() {
    let (g, mut rng) = (gpu(), seeded_rng("QUANT_SEED"));
    for (ty, n, k) in [(GgmlType::Q4_1, 5, 96), (GgmlType::Q6_K, 3, 256)] {
        let bytes = random_blocks(&mut rng, ty, M, k);
        let dy = data(&mut rng, n * M, 1.0);
        let dx0 = data(&mut rng, n * k, 1.0);
        let wc = Cpu
            .upload_quant(QBytes::Owned(bytes.clone()), ty, M, k)
            .unwrap();
        let mut want = Cpu.upload(dx0.clone(), &[n, k], F32).unwrap();
        let dyc = Cpu.upload(dy.clone(), &[n, M], F32).unwrap();
        Cpu.matmul_q_backward(&mut want, &dyc, &wc).unwrap();
        let want = Cpu.download(&want).unwrap();
        let w = dequantize_vec(ty, &bytes, M * k).unwrap();
        let wg = g.upload_quant(QBytes::Owned(bytes), ty, M, k).unwrap();
        for dx_t in [F32, BF16] {
            let mut dx = g.upload(dx0.clone(), &[n, k], dx_t).unwrap();
            let dyg = g.upload(dy.clone(), &[n, M], BF16).unwrap();
            g.matmul_q_backward(&mut dx, &dyg, &wg).unwrap();
            let got = g.download(&dx).unwrap();
            for i in 0..n {
                for c in 0..k {
                    // The weight rounds to bf16 once (half an ulp: up to
                    // 2⁻⁸ of each product), the sum is f32, the output may
                    // round once more.
                    let mag: f64 = (0..M)
                        .map(|j| (dy[i * M + j] as f64 * w[j * k + c] as f64).abs())
                        .sum::<f64>()
                        + dx0[i * k + c].abs() as f64;
                    let out_round = if dx_t == BF16 { BF16_U } else { 0.0 };
                    let tol = mag * (BF16_U + 64.0 * U + out_round);
                    let e = i * k + c;
                    assert!(
                        (got[e] as f64 - want[e] as f64).abs() <= tol,
                        "{ty} dx {dx_t} [{i}, {c}]: {} vs {}",
                        got[e],
                        want[e]
                    );
                }
            }
        }
    }
}
