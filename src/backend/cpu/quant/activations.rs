//! The rows of x quantized to 8 bits, once per `matmul_q` call, with what
//! the kernels need per lane (group of 8 values) laid out ready to load:
//! a kernel step reads a quad of blocks — 128 codes and 16 lanes of each
//! array at the same offset, whatever the weight type. A quad's codes are
//! stored split: the first 64 bytes hold values 8l..8l+4 of each lane l,
//! the next 64 values 8l+4..8l+8 (`split_quad`), so that two vpdpbusd, one
//! on each half, sum each lane's 8 values into one i32.
//!
//! Per block of 32 values of a row (the module doc of `quant` has the whole
//! arithmetic): a = max |x|, d = a / 127, q = x · (127 / a) rounded to the
//! nearest integer, ties to even (all q = 0 where a = 0), so q ∈ −127..=127
//! (never −128: AVX2's Q8_0 product negates them). Every step is one exactly
//! rounded f32 operation on this row alone, so the codes do not depend on
//! the batch, the thread or the instruction set each set compiles
//! `quantize_row` for (`Simd::quantize_row`).

use super::kernel::Simd;
use rayon::prelude::*;

/// Values per block of activations (and of the 32-value weight types).
pub(super) const BLOCK: usize = 32;
/// Values per kernel step: a quad of blocks, 16 lanes of 8.
pub(super) const QUAD: usize = 4 * BLOCK;
/// Values per lane.
pub(super) const GROUP: usize = 8;

/// 1.5 · 2²³: v + MAGIC rounds v to an integer, ties to even, for |v| ≤
/// 2²², and holds it in its low bits (no call, unlike `round_ties_even` on
/// an SSE2 baseline).
const MAGIC: f32 = 12_582_912.0;

/// n rows of activations, each k values padded with zeros to `kp`, a whole
/// number of quads (a padded block contributes exactly nothing).
pub(super) struct Acts {
    pub kp: usize,
    /// [n, kp]: the codes q, each quad split.
    pub qs: Vec<i8>,
    /// [n, kp / 8]: d of each lane's block.
    pub d: Vec<f32>,
    /// [n, kp / 8]: −offset · Σ q over the lane, the start of the lane's
    /// integer sum for weights stored as code + offset.
    pub init: Vec<i32>,
    /// [n, kp / 8]: d · Σ q over the lane, which a weight type's min
    /// multiplies.
    pub sums: Vec<f32>,
}

impl Acts {
    /// Quantizes x [n, k] (k a multiple of 32), rows in parallel, with S's
    /// build of `quantize_row`.
    pub fn new<S: Simd>(x: &[f32], n: usize, k: usize, offset: i32) -> Acts {
        debug_assert!(k.is_multiple_of(BLOCK) && x.len() >= n * k);
        let kp = k.next_multiple_of(QUAD);
        let lanes = kp / GROUP;
        let mut a = Acts {
            kp,
            qs: vec![0; n * kp],
            d: vec![0.0; n * lanes],
            init: vec![0; n * lanes],
            sums: vec![0.0; n * lanes],
        };
        if n == 0 {
            return a;
        }
        a.qs.par_chunks_mut(kp)
            .zip(a.d.par_chunks_mut(lanes))
            .zip(a.init.par_chunks_mut(lanes))
            .zip(a.sums.par_chunks_mut(lanes))
            .zip(x.par_chunks(k))
            .with_min_len(8)
            .for_each(|((((qs, d), init), sums), x)| {
                let row = Row { qs, d, init, sums };
                // SAFETY: the caller of `matmul_q_with` checked that the
                // processor has S.
                unsafe { S::quantize_row(x, row, offset) }
            });
        a
    }
}

/// One row of `Acts`' arrays.
pub(super) struct Row<'a> {
    pub qs: &'a mut [i8],
    pub d: &'a mut [f32],
    pub init: &'a mut [i32],
    pub sums: &'a mut [f32],
}

/// One row: `x` [k] into the first k values and k / 8 lanes of `row`. Plain
/// loops over exactly rounded operations (no call, no fused multiply-add:
/// Rust never contracts), so every instruction set's build of it vectorizes
/// them differently and gives the same bits.
#[inline(always)]
pub(super) fn quantize_row(x: &[f32], row: Row, offset: i32) {
    for (b, x) in x.chunks_exact(BLOCK).enumerate() {
        let x: &[f32; BLOCK] = x.try_into().unwrap();
        // max |x| on the bits: exact, and a NaN (larger bits than ∞) wins,
        // so a NaN or ∞ in the block makes its outputs NaN or ∞.
        let bits = x.iter().fold(0, |m, v| (v.to_bits() & 0x7FFF_FFFF).max(m));
        let amax = f32::from_bits(bits);
        let scale = amax / 127.0;
        let inv = if amax == 0.0 { 0.0 } else { 127.0 / amax };
        // v + MAGIC is an integer (ties to even) with the code in its low
        // byte, two's complement.
        // (Two plain loops: one mixing the float and the byte steps, or
        // closures, stayed scalar.)
        let mut q = [0i8; BLOCK];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * inv + MAGIC).to_bits() as u8 as i8;
        }
        // Each lane's first and second 4 values to the quad's halves.
        let quad = &mut row.qs[b / 4 * QUAD..][..QUAD];
        for g in 0..BLOCK / GROUP {
            let at = (b % 4) * 16 + 4 * g;
            quad[at..at + 4].copy_from_slice(&q[8 * g..8 * g + 4]);
            quad[QUAD / 2 + at..][..4].copy_from_slice(&q[8 * g + 4..8 * g + 8]);
            let lane = b * (BLOCK / GROUP) + g;
            let s: i32 = q[8 * g..8 * g + 8].iter().map(|&q| q as i32).sum();
            row.d[lane] = scale;
            row.init[lane] = -offset * s;
            row.sums[lane] = scale * s as f32;
        }
    }
}

/// A quad's 128 values in their order → halves: lane l's values 8l..8l+4
/// at 4l.., its values 8l+4..8l+8 at 64 + 4l.. (4-byte groups 2l and 2l+1:
/// the even and the odd ones).
pub(super) fn split_quad<T: Copy>(natural: &[T; QUAD], out: &mut [T]) {
    for (g, four) in natural.chunks_exact(4).enumerate() {
        let at = (g % 2) * QUAD / 2 + (g / 2) * 4;
        out[at..at + 4].copy_from_slice(four);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes are the rounded, scaled values; the largest is ±127; a zero
    /// block has d = 0; the pad is zero.
    #[test]
    fn codes_and_lanes() {
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
        x.extend([0.0; 32]);
        x.extend((0..32).map(|i| if i == 3 { -2.0 } else { 0.5 }));
        let a = Acts::new::<super::super::portable::Portable>(&x, 1, 96, 8);
        assert_eq!(a.kp, 128);
        assert_eq!(a.d[0], 15.5 / 127.0);
        // Back in their order: value e of the quad is at its lane's half.
        let at = |e: usize| (e / 4 % 2) * 64 + e / 8 * 4 + e % 4;
        let q: Vec<i8> = (0..128).map(|e| a.qs[at(e)]).collect();
        for (q, v) in q[..32].iter().zip(&x) {
            assert_eq!(*q as f32, (v * (127.0 / 15.5)).round_ties_even());
        }
        assert_eq!(q[64 + 3], -127);
        assert!(q[32..64].iter().all(|&q| q == 0) && a.d[4] == 0.0);
        let s: i32 = q[..8].iter().map(|&q| q as i32).sum();
        assert_eq!((a.init[0], a.sums[0]), (-8 * s, a.d[0] * s as f32));
        assert!(q[96..].iter().all(|&q| q == 0));
        assert!(a.d[12..].iter().all(|&d| d == 0.0));
    }
}
