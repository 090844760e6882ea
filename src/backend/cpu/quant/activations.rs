//! The rows of x quantized to 8 bits, once per `matmul_q` call, with what
//! the kernels need per lane (group of 4 values) laid out ready to load:
//! a kernel step reads 64 codes and 16 lanes of each array at the same
//! offset, whatever the weight type.
//!
//! Per block of 32 values of a row (the module doc of `quant` has the whole
//! arithmetic): a = max |x|, d = a / 127, q = x · (127 / a) rounded to the
//! nearest integer, ties to even (all q = 0 where a = 0), so q ∈ −127..=127
//! (never −128: the AVX2 kernels negate codes). Every step is one exactly
//! rounded f32 operation on this row alone, so the codes do not depend on
//! the batch, the thread or the instruction set.

use rayon::prelude::*;

/// Values per block of activations (and of the 32-value weight types).
pub(super) const BLOCK: usize = 32;
/// Values per kernel step: a pair of blocks, 16 lanes of 4.
pub(super) const PAIR: usize = 2 * BLOCK;
/// Values per lane.
pub(super) const GROUP: usize = 4;

/// 1.5 · 2²³: v + MAGIC − MAGIC rounds v to an integer, ties to even, for
/// |v| ≤ 2²² (no call, unlike `round_ties_even` on an SSE2 baseline).
const MAGIC: f32 = 12_582_912.0;

/// n rows of activations, each k values padded with zeros to `kp`, a whole
/// number of pairs (a padded block contributes exactly nothing).
pub(super) struct Acts {
    pub kp: usize,
    /// [n, kp]: the codes q.
    pub qs: Vec<i8>,
    /// [n, kp / 4]: d of each lane's block.
    pub d: Vec<f32>,
    /// [n, kp / 4]: −offset · Σ q over the lane, the start of the lane's
    /// integer sum for weights stored as code + offset.
    pub init: Vec<i32>,
    /// [n, kp / 4]: d · Σ q over the lane, which a weight type's min
    /// multiplies.
    pub sums: Vec<f32>,
}

impl Acts {
    /// Quantizes x [n, k] (k a multiple of 32), rows in parallel.
    pub fn new(x: &[f32], n: usize, k: usize, offset: i32) -> Acts {
        debug_assert!(k.is_multiple_of(BLOCK) && x.len() >= n * k);
        let kp = k.next_multiple_of(PAIR);
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
            .for_each(|((((qs, d), init), sums), x)| quantize_row(x, qs, d, init, sums, offset));
        a
    }
}

/// One row: `x` [k] into the first k / 4 lanes of the row's arrays.
fn quantize_row(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    init: &mut [i32],
    sums: &mut [f32],
    offset: i32,
) {
    let lanes_per_block = BLOCK / GROUP;
    for (b, x) in x.chunks_exact(BLOCK).enumerate() {
        // max |x| on the bits: exact, and a NaN (larger bits than ∞) wins,
        // so a NaN or ∞ in the block makes its outputs NaN or ∞.
        let bits = x.iter().map(|v| v.to_bits() & 0x7FFF_FFFF).max();
        let amax = f32::from_bits(bits.unwrap_or(0));
        let scale = amax / 127.0;
        let inv = if amax == 0.0 { 0.0 } else { 127.0 / amax };
        let q = &mut qs[b * BLOCK..(b + 1) * BLOCK];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = ((v * inv + MAGIC) - MAGIC) as i8;
        }
        for (g, q) in q.chunks_exact(GROUP).enumerate() {
            let lane = b * lanes_per_block + g;
            let s: i32 = q.iter().map(|&q| q as i32).sum();
            d[lane] = scale;
            init[lane] = -offset * s;
            sums[lane] = scale * s as f32;
        }
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
        let a = Acts::new(&x, 1, 96, 8);
        assert_eq!(a.kp, 128);
        assert_eq!(a.d[0], 15.5 / 127.0);
        for (q, v) in a.qs[..32].iter().zip(&x) {
            assert_eq!(*q as f32, (v * (127.0 / 15.5)).round_ties_even());
        }
        assert_eq!(a.qs[64 + 3], -127);
        assert!(a.qs[32..64].iter().all(|&q| q == 0) && a.d[8] == 0.0);
        let s: i32 = a.qs[..4].iter().map(|&q| q as i32).sum();
        assert_eq!((a.init[0], a.sums[0]), (-8 * s, a.d[0] * s as f32));
        assert!(a.qs[96..].iter().all(|&q| q == 0));
        assert!(a.d[24..].iter().all(|&d| d == 0.0));
    }
}
