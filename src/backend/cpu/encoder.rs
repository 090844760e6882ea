//! The ops of BERT-family encoders on the CPU: LayerNorm, exact GELU, a
//! Linear layer's bias, and bidirectional attention over padded sequences.
//! The matrix products of attention go through `attention::mm` (the `gemm`
//! crate), as the causal attention's do.
//!
//! The element-wise loops are written so that the compiler can vectorize them
//! (no calls in the loop bodies: erf and exp are polynomials here; sums kept
//! in lanes of independent partial sums) and are compiled three times by
//! `simd_versions!`: for AVX-512, for AVX2 and for the baseline, picked at run
//! time. With libm's scalar erf, GELU alone took as long as the matrix
//! product before it. The versions differ only in fused multiply-adds, far
//! below the ops' tolerances; a given machine always takes the same one, and
//! the results never depend on the thread count.

use super::attention::{mm, EXP_TAYLOR, LN2_HI, LN2_LO};
use super::matmul_invariant::MAGIC;
use rayon::prelude::*;

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// `fn $name(args)` that runs the `#[inline(always)]` function
/// `$kernel::<FMA>` compiled for AVX-512 where the processor has it, else for
/// AVX2 + FMA, else for the baseline of the build. FMA says whether the
/// kernel may use fused multiply-adds (`mul_add`): yes wherever the processor
/// has them, no on an x86-64 baseline build, where `mul_add` is a call.
macro_rules! simd_versions {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) = $kernel:ident) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $kernel::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $kernel::<true>($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
                    // SAFETY: the processor has these features, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $kernel::<BASELINE_FMA>($($arg),*)
        }
    };
}

/// Whether the build's baseline has fused multiply-adds as instructions.
const BASELINE_FMA: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));

/// a·b + c, fused (one rounding) when FMA.
#[inline(always)]
fn fma<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// a·b + c in f32, fused when FMA.
#[inline(always)]
fn fma32<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Partial sums per row: eight f64 lanes, one vector register on AVX-512.
const LANES: usize = 8;

/// Σ f(x) over a row in f64, in `LANES` independent partial sums.
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += f(c[l] as f64);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    acc.iter().sum::<f64>() + tail
}

/// out = (x − mean) / sqrt(var + eps) · w + b, per row of width d, with the
/// biased variance (see `Backend::layernorm`). The row statistics take two
/// passes in f64 (a row's cost is small next to the matmuls around it), so
/// neither a large mean nor a wide row costs precision.
pub fn layernorm(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], d: usize, eps: f32) {
    let chunk = rows_per_task(d) * d;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| layernorm_rows(out, x, w, b, d, eps));
}

simd_versions! {
    fn layernorm_rows(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], d: usize, eps: f32)
        = layernorm_rows_kernel
}

/// (FMA unused: LayerNorm gives the same bits in every version.)
#[inline(always)]
fn layernorm_rows_kernel<const FMA: bool>(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    d: usize,
    eps: f32,
) {
    for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean = sum_f64(x, |v| v) / d as f64;
        let var = sum_f64(x, |v| (v - mean) * (v - mean)) / d as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
            *o = ((x as f64 - mean) * inv) as f32 * w + b;
        }
    }
}

/// out = x · Φ(x) = x · ½ (1 + erf(x / √2)), element-wise, evaluated in f64
/// (see `erfc`) and rounded once to f32.
pub fn gelu(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(16384)
        .zip(x.par_chunks(16384))
        .for_each(|(o, x)| gelu_chunk(o, x));
}

simd_versions! {
    fn gelu_chunk(out: &mut [f32], x: &[f32]) = gelu_chunk_kernel
}

#[inline(always)]
fn gelu_chunk_kernel<const FMA: bool>(out: &mut [f32], x: &[f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        let x = x as f64;
        // Φ(x) = 1 − ½ erfc(x/√2) for x ≥ 0, ½ erfc(|x|/√2) below: the small
        // tail Φ(x) for negative x keeps its relative precision.
        let tail = 0.5 * erfc::<FMA>(x.abs(), x * x);
        let phi = if x >= 0.0 { 1.0 - tail } else { tail };
        *o = (x * phi) as f32;
    }
}

/// erfc(z) for z = |x|/√2 ≥ 0, given |x| and x² (exact in f64 for an f32 x):
/// erfc(z) = t · exp(−z² + P(t)) with t = 1 / (1 + z/2), where P is a
/// polynomial of degree 10 fitted to log(erfc(z)/t) + z² for z in [0, 7]
/// (relative error of erfc below 1.4e-9, plus the exp's 1e-11), so that
/// GELU's f32 result is off by its own rounding only. Past z = 7 (|x| > 9.9)
/// P stays at its value for z = 7: the factor exp(−z²) < 6e-22 makes the
/// error immaterial (GELU is 0 or x to f32 precision there).
#[inline(always)]
fn erfc<const FMA: bool>(abs_x: f64, x2: f64) -> f64 {
    let t = 1.0 / fma::<FMA>(0.5 * std::f64::consts::FRAC_1_SQRT_2, abs_x, 1.0);
    let w = fma::<FMA>(ERFC_W.0, t.max(ERFC_T_MIN), ERFC_W.1);
    let mut p = 0.0;
    for c in ERFC_P {
        p = fma::<FMA>(p, w, c);
    }
    t * exp::<FMA>(fma::<FMA>(-0.5, x2, p))
}

/// The t of z = 7, where P's fit ends.
const ERFC_T_MIN: f64 = 1.0 / 4.5;

/// P is a polynomial in w = A·t + B, which maps t in [ERFC_T_MIN, 1] onto
/// [−1, 1]: (A, B).
const ERFC_W: (f64, f64) = (2.571428571428571, -1.5714285714285714);

/// P's coefficients, highest power of w first: a least-squares fit in the
/// Chebyshev basis of w at 300 Chebyshev nodes, to targets computed with
/// mpmath at 40 digits, converted to powers of w (numpy's chebfit and
/// cheb2poly). Largest error on a grid of 1000 points: 1.36e-9.
const ERFC_P: [f64; 11] = [
    -1.3447372908882877e-05,
    2.152463460875862e-05,
    9.613206031301483e-05,
    -0.00028260101394598304,
    -0.00034015796742923454,
    0.002514420645949956,
    0.00012794544471761112,
    -0.02405496475838042,
    0.008566324462806413,
    0.5338784693211447,
    -0.5205136460915125,
];

/// e^a in f64 with plain arithmetic, so that loops around it vectorize: a is
/// clamped to [−708, 709] (e^−708 ≈ 3e−308, the end of the normal numbers),
/// split as k·ln 2 + r with k whole and |r| ≤ ½ ln 2, e^r from its Taylor
/// series to r⁹ (relative error below 1e-11), times 2^k built in the
/// exponent bits.
#[inline(always)]
fn exp<const FMA: bool>(a: f64) -> f64 {
    // Adding 1.5·2⁵² rounds to a whole number, held in the low mantissa bits.
    const ROUND: f64 = 6755399441055744.0;
    const INV_FACT: [f64; 10] = [
        1.0 / 362880.0,
        1.0 / 40320.0,
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let a = a.clamp(-708.0, 709.0);
    let y = fma::<FMA>(a, std::f64::consts::LOG2_E, ROUND);
    let k = y - ROUND;
    let r = fma::<FMA>(-k, std::f64::consts::LN_2, a);
    let mut p = 0.0;
    for c in INV_FACT {
        p = fma::<FMA>(p, r, c);
    }
    let k = (y.to_bits() as i64).wrapping_sub(ROUND.to_bits() as i64);
    p * f64::from_bits(((k + 1023) as u64) << 52)
}

/// e^a in f32 for a ≤ 0, as `exp` does it: a clamped to −87 (e^−87 ≈ 1.6e−38,
/// the end of the normal f32 numbers), k·ln 2 subtracted in two parts (ln 2's
/// leading 9 bits make k·LN2_HI exact for |k| < 128), Taylor series to r⁷ (relative error
/// below 1e-8 before rounding).
#[inline(always)]
fn exp_f32<const FMA: bool>(a: f32) -> f32 {
    const ROUND: f32 = MAGIC; // 1.5·2²³
    let a = a.clamp(-87.0, 0.0);
    let y = fma32::<FMA>(a, std::f32::consts::LOG2_E, ROUND);
    let k = y - ROUND;
    let r = fma32::<FMA>(-k, LN2_LO, fma32::<FMA>(-k, LN2_HI, a));
    let mut p = 0.0;
    for c in EXP_TAYLOR {
        p = fma32::<FMA>(p, r, c);
    }
    let k = (y.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits(((k + 127) as u32) << 23)
}

/// x[i, j] += bias[j] over rows of width d.
pub fn add_bias(x: &mut [f32], bias: &[f32], d: usize) {
    x.par_chunks_mut(rows_per_task(d) * d).for_each(|x| {
        for row in x.chunks_exact_mut(d) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// The sizes of one `attention_bidirectional` call.
#[derive(Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    /// Head width.
    pub hd: usize,
    /// Rows per sequence (real tokens and padding).
    pub seq: usize,
}

/// out[b,i,h] = Σ_{j < len_b} softmax_j(q[b,i,h]·k[b,j,h] / sqrt(hd)) v[b,j,h]
/// for i < len_b, and zeros for the padding rows i ≥ len_b. One task per
/// sequence, writing its own rows of out; per head, S = Q·Kᵀ and O = P·V over
/// the real rows only, as GEMMs.
pub fn attention_bidirectional(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lens: &[usize],
    dims: Dims,
) {
    let Dims { heads, hd, seq } = dims;
    let width = heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    assert!(out.len() == lens.len() * seq * width && q.len() >= out.len());
    assert!(k.len() >= out.len() && v.len() >= out.len());
    out.par_chunks_mut((seq * width).max(1))
        .zip(lens.par_iter())
        .enumerate()
        .for_each(|(b, (out, &len))| {
            out[len * width..].fill(0.0);
            if len == 0 {
                return;
            }
            let mut s = vec![0.0f32; len * len];
            for h in 0..heads {
                // Head h of sequence b: len rows of hd at stride width.
                let first = b * seq * width + h * hd;
                // S = Q_h·K_hᵀ / sqrt(hd)
                // SAFETY: S is len×len; Q_h and K_h are len rows of hd at
                // stride width from `first`, the real rows of sequence b,
                // inside q and k (whose lengths are asserted above).
                unsafe {
                    mm(
                        &mut s,
                        len,
                        len,
                        len,
                        hd,
                        (q[first..].as_ptr(), width),
                        false,
                        (k[first..].as_ptr(), width),
                        true,
                        scale,
                    );
                }
                softmax_rows(&mut s, len);
                // O_h = P·V_h, written into columns h·hd.. of the len real
                // rows of this sequence's part of out.
                // SAFETY: P is len×len as written above; V_h is len rows of
                // hd at stride width from `first`, inside v; out[h·hd..] holds
                // (len − 1)·width + hd elements, as mm asserts.
                unsafe {
                    mm(
                        &mut out[h * hd..],
                        width,
                        len,
                        hd,
                        len,
                        (s.as_ptr(), len),
                        false,
                        (v[first..].as_ptr(), width),
                        false,
                        1.0,
                    );
                }
            }
        });
}

simd_versions! {
    /// Each row of width n of s, in place, becomes softmax(row).
    fn softmax_rows(s: &mut [f32], n: usize) = softmax_rows_kernel
}

#[inline(always)]
fn softmax_rows_kernel<const FMA: bool>(s: &mut [f32], n: usize) {
    const L: usize = 2 * LANES; // f32 lanes
    for row in s.chunks_exact_mut(n) {
        let mut max = [f32::NEG_INFINITY; L];
        let mut chunks = row.chunks_exact(L);
        for c in &mut chunks {
            for l in 0..L {
                max[l] = max[l].max(c[l]);
            }
        }
        let max = (chunks.remainder().iter().chain(&max)).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = [0.0f32; L];
        let mut chunks = row.chunks_exact_mut(L);
        for c in &mut chunks {
            for l in 0..L {
                c[l] = exp_f32::<FMA>(c[l] - max);
                sum[l] += c[l];
            }
        }
        let mut total = 0.0;
        for x in chunks.into_remainder() {
            *x = exp_f32::<FMA>(*x - max);
            total += *x as f64;
        }
        let inv = (1.0 / (sum.iter().map(|&v| v as f64).sum::<f64>() + total)) as f32;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}
