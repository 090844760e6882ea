//! Causal grouped-query attention over a KV cache, on the CPU.
//!
//! Two paths compute the same thing: one task per (query row, head) for the
//! few queries of a decode step and for the paged cache, where every row
//! must get the same bits whatever its batch (`attend`), and per-head matrix
//! products for the contiguous cache's prefill, where S = Q·Kᵀ and O = P·V
//! are real GEMMs.

use super::matmul_invariant::{prefetch, Isa, Lanes, LANES, MAGIC};
use gemm::Parallelism;
use rayon::prelude::*;

#[derive(Clone, Copy)]
pub struct Dims {
    /// New queries in this call.
    pub n: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Head width.
    pub hd: usize,
    /// Position of the first new query; keys 0..pos0+n are valid.
    pub pos0: usize,
}

/// From this many queries on, the GEMM path is faster.
pub const GEMM_MIN_QUERIES: usize = 8;

/// out[i, h] = Σ_j softmax_j(q[i,h]·k[j,g] / sqrt(hd)) v[j,g], j ≤ pos0 + i,
/// with g = h / (heads / kv_heads) the key/value head that head h shares;
/// and, when asked, each row's log-sum-exp of the scores into lse [heads, n].
pub fn causal(
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
) {
    assert_eq!(out.len(), dims.n * dims.heads * dims.hd);
    assert!(k.len() >= (dims.pos0 + dims.n) * dims.kv_heads * dims.hd);
    // Row statistics in [heads, n] order.
    let row_lse = if dims.n >= GEMM_MIN_QUERIES {
        causal_gemm(out, q, k, v, dims)
    } else {
        causal_loop(out, q, k, v, dims)
    };
    if let Some(lse) = lse {
        lse.copy_from_slice(&row_lse);
    }
}

/// Returns the log-sum-exp of each row, [heads, n].
fn causal_loop(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> Vec<f32> {
    let Dims {
        heads,
        kv_heads,
        hd,
        pos0,
        ..
    } = dims;
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let kv_width = kv_heads * hd;
    let isa = Isa::detect();
    // One task per (query row, head): each owns hd outputs and one lse.
    let mut lse = vec![0.0f32; dims.n * heads];
    out.par_chunks_mut(hd)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (task, (o, lse))| {
            let (i, h) = (task / heads, task % heads);
            let g = h / group;
            let qh = &q[task * hd..(task + 1) * hd];
            scratch.at.clear();
            scratch
                .at
                .extend((0..pos0 + i + 1).map(|j| j * kv_width + g * hd));
            // SAFETY: the caller asserted k holds pos0 + n rows of kv_width.
            *lse = unsafe { attend(isa, o, qh, k, v, scale, scratch) };
        });
    // [n, heads] → [heads, n]
    (0..heads * dims.n)
        .map(|e| lse[(e % dims.n) * heads + e / dims.n])
        .collect()
}

/// Returns the log-sum-exp of each row, [heads, n].
fn causal_gemm(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> Vec<f32> {
    let Dims {
        n,
        heads,
        kv_heads,
        hd,
        pos0,
    } = dims;
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (width, kv_width) = (heads * hd, kv_heads * hd);
    let len = pos0 + n; // keys visible to the last query
                        // One task per head, each producing its [n, hd] output block.
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let mut s = vec![0.0f32; n * len];
            let mut o = vec![0.0f32; n * hd];
            let mut lse = vec![0.0f32; n];
            // SAFETY: S is n×len; Q_h is n rows of hd at stride width from
            // h·hd (inside q's n·width); K_g and V_g are len rows of hd at
            // stride kv_width from g·hd, inside the asserted valid cache
            // rows; O_h is n×hd.
            unsafe {
                mm(
                    &mut s,
                    len,
                    n,
                    len,
                    hd,
                    (q[h * hd..].as_ptr(), width),
                    false,
                    (k[g * hd..].as_ptr(), kv_width),
                    true,
                    scale,
                );
            }
            for (i, (row, lse)) in s.chunks_exact_mut(len).zip(&mut lse).enumerate() {
                let visible = pos0 + i + 1;
                *lse = softmax_in_place(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            // O_h = P·V_g
            // SAFETY: P is n×len as written above; V_g and O_h as above.
            unsafe {
                mm(
                    &mut o,
                    hd,
                    n,
                    hd,
                    len,
                    (s.as_ptr(), len),
                    false,
                    (v[g * hd..].as_ptr(), kv_width),
                    false,
                    1.0,
                );
            }
            (o, lse)
        })
        .collect();
    for (h, (o, _)) in blocks.iter().enumerate() {
        for (dst, src) in out.chunks_exact_mut(width).zip(o.chunks_exact(hd)) {
            dst[h * hd..(h + 1) * hd].copy_from_slice(src);
        }
    }
    blocks.into_iter().flat_map(|(_, lse)| lse).collect()
}

/// p = exp(s − max) / Σ exp(s − max); returns the log-sum-exp of s,
/// max + ln Σ exp(s − max).
pub fn softmax_in_place(s: &mut [f32]) -> f32 {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in s.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// dst [m, n] (row stride `dst_rs`) = scale · op(A) op(B), op(A) [m, k],
/// op(B) [k, n], where A and B are row-major views (pointer, row stride),
/// transposed when the flag says so.
///
/// # Safety
/// Every element the product reads lies inside the allocation behind its
/// pointer, and dst holds m rows of stride dst_rs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn mm(
    dst: &mut [f32],
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: (*const f32, usize),
    a_t: bool,
    b: (*const f32, usize),
    b_t: bool,
    scale: f32,
) {
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    // (column stride, row stride) of op(X) for a row-major view of stride s
    let strides = |s: usize, t: bool| if t { (s as isize, 1) } else { (1, s as isize) };
    let (a_cs, a_rs) = strides(a.1, a_t);
    let (b_cs, b_rs) = strides(b.1, b_t);
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.0,
            a_cs,
            a_rs,
            b.0,
            b_cs,
            b_rs,
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// The sizes of an `attention_paged` call (see `Backend::attention_paged`).
#[derive(Clone, Copy)]
pub struct PagedDims {
    pub heads: usize,
    pub kv_heads: usize,
    /// Head width.
    pub hd: usize,
    pub block_size: usize,
}

/// Causal attention of a ragged batch over a paged KV pool: the query of
/// row r at position P (per `rows[r]`: its sequence's block table and P, or
/// None for a row no sequence covers, left untouched) attends to positions
/// 0..=P, position p read from slot blocks[p / block_size]·block_size +
/// p % block_size of k and v [num_slots, kv_heads·hd].
///
/// Batch invariance: one task per (row, head), each computed alone in one
/// fixed arithmetic (`attend`) whatever the other rows are and however
/// rayon spreads the tasks. It is also `causal`'s loop, so a decode row
/// gives the bits of the contiguous `attention` of fewer than
/// GEMM_MIN_QUERIES rows.
pub fn paged(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: &[Option<(&[u32], usize)>],
    dims: PagedDims,
) {
    paged_with(Isa::detect(), out, q, k, v, rows, dims)
}

/// [`paged`] with the given instruction set (tests compare them). Panics if
/// the processor lacks it. The block tables must lie inside k and v (as
/// `shapes::attention_paged` checks).
pub fn paged_with(
    isa: Isa,
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: &[Option<(&[u32], usize)>],
    dims: PagedDims,
) {
    assert!(
        isa.available(),
        "{isa:?} is not available on this processor"
    );
    let PagedDims {
        heads,
        kv_heads,
        hd,
        block_size,
    } = dims;
    assert_eq!(out.len(), rows.len() * heads * hd);
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let kv_width = kv_heads * hd;
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (task, o)| {
            let (r, h) = (task / heads, task % heads);
            let Some((blocks, pos)) = rows[r] else {
                return;
            };
            let g = h / group;
            let qh = &q[task * hd..(task + 1) * hd];
            // Position p's row of the pool, at kv head g: slot
            // blocks[p / block_size]·block_size + p % block_size.
            let len = pos + 1;
            scratch.at.clear();
            for (b, &block) in blocks[..len.div_ceil(block_size)].iter().enumerate() {
                let first = block as usize * block_size;
                let n = block_size.min(len - b * block_size);
                scratch
                    .at
                    .extend((first..first + n).map(|slot| slot * kv_width + g * hd));
            }
            // SAFETY: `shapes::attention_paged` checked that every block of
            // the tables lies inside the pools.
            unsafe { attend(isa, o, qh, k, v, scale, scratch) };
        });
}

/// A task's reusable buffers: the offsets of its key/value rows in k and
/// v, in position order, and their scores.
#[derive(Default)]
struct Scratch {
    at: Vec<usize>,
    scores: Vec<f32>,
}

/// One query row of one head against the key and value rows at
/// `scratch.at` (offsets into k and v, in position order); returns the
/// log-sum-exp of the scores. The one arithmetic of `causal`'s loop and of
/// `paged`, fixed whatever the batch, the thread or the instruction set:
/// - score_j = dot(q, k_j) · scale, the dot in `matmul_invariant`'s
///   arithmetic (16 lanes of fma over the head, then its fixed tree);
/// - softmax over the scores (`softmax_lanes`);
/// - o[d] = fma(p_j, v_j[d], o[d]) over j in position order, from +0.0.
///
/// # Safety
/// Every offset in `scratch.at` is followed by q.len() floats in k and v.
unsafe fn attend(
    isa: Isa,
    o: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scratch: &mut Scratch,
) -> f32 {
    debug_assert!(scratch
        .at
        .iter()
        .all(|&at| at + q.len() <= k.len().min(v.len())));
    // SAFETY: the caller's promise; `isa` is this processor's.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::attend_avx512(o, q, k, v, scale, scratch),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::attend_avx2(o, q, k, v, scale, scratch),
            _ => attend_lanes::<[f32; LANES], 2>(o, q, k, v, scale, scratch),
        }
    }
}

/// [`attend`] on L's registers, C of them holding outputs at once.
///
/// # Safety
/// As [`attend`], with the processor having L's instruction set.
#[inline(always)]
unsafe fn attend_lanes<L: Lanes, const C: usize>(
    o: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scratch: &mut Scratch,
) -> f32 {
    let Scratch { at, scores } = scratch;
    let hd = q.len();
    // SAFETY (every pointer below): at + hd ≤ k.len() and v.len() for each
    // offset (the caller's promise), and chunks stay below hd.
    let dot = |row: usize| unsafe { dot_lanes::<L>(q, k.as_ptr().add(row)) };
    scores.clear();
    // Four keys' trees at once where the set can (the same pairs, so the
    // same bits as one at a time).
    let mut quads = at.chunks_exact(4);
    for (i, quad) in (&mut quads).enumerate() {
        // The keys two quads on, and these keys' values for the weighted
        // pass: rows spread over the pool's blocks, which one thread
        // otherwise waits on a line at a time.
        for &row in at.iter().skip(4 * i + 8).take(4) {
            lines(k.as_ptr().wrapping_add(row), hd);
        }
        for &row in quad {
            lines(v.as_ptr().wrapping_add(row), hd);
        }
        // SAFETY: the processor has L's set, the caller's promise.
        let s = unsafe { L::reduce4([dot(quad[0]), dot(quad[1]), dot(quad[2]), dot(quad[3])]) };
        scores.extend(s.map(|s| s * scale));
    }
    for &row in quads.remainder() {
        // SAFETY: as above.
        scores.push(unsafe { dot(row).reduce() } * scale);
    }
    // SAFETY: the processor has L's set, the caller's promise.
    let lse = unsafe { softmax_lanes::<L>(scores) };
    // The outputs up to C chunks a pass, each chunk's accumulator in a
    // register for the whole pass over the values; a partial last chunk
    // in a pass of its own.
    let (full, rest) = (hd / LANES, hd % LANES);
    let mut c0 = 0;
    while c0 < full {
        let n = (full - c0).min(C);
        let d = c0 * LANES;
        // SAFETY: as above, chunks c0..c0 + n lie below hd.
        unsafe {
            match n {
                1 => weighted_pass::<L, 1>(o, v, at, scores, d, LANES),
                2 => weighted_pass::<L, 2>(o, v, at, scores, d, LANES),
                3 => weighted_pass::<L, 3>(o, v, at, scores, d, LANES),
                4 => weighted_pass::<L, 4>(o, v, at, scores, d, LANES),
                5 => weighted_pass::<L, 5>(o, v, at, scores, d, LANES),
                6 => weighted_pass::<L, 6>(o, v, at, scores, d, LANES),
                7 => weighted_pass::<L, 7>(o, v, at, scores, d, LANES),
                _ => weighted_pass::<L, 8>(o, v, at, scores, d, LANES),
            }
        }
        c0 += n;
    }
    if rest > 0 {
        // SAFETY: as above, the chunk at full·LANES holds rest values.
        unsafe { weighted_pass::<L, 1>(o, v, at, scores, full * LANES, rest) };
    }
    lse
}

/// p = exp(s − max) / Σ exp(s − max) in place; returns the log-sum-exp,
/// max + ln Σ exp(s − max). 16 scores a step: `exp_lanes` of each, summed
/// into 16 lanes chunk by chunk in order (a last partial chunk's missing
/// lanes add nothing) and then by the fixed tree; the max is exact in any
/// order, and ln is taken once, of the sum.
///
/// # Safety
/// The processor has L's set.
#[inline(always)]
unsafe fn softmax_lanes<L: Lanes>(s: &mut [f32]) -> f32 {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (full, rest) = (s.len() / LANES, s.len() % LANES);
    // SAFETY (whole body): chunks stay inside s; L's set is the caller's.
    unsafe {
        let (neg_max, one) = (L::splat(-max), L::splat(1.0));
        let p = s.as_mut_ptr();
        let mut sum = L::zero();
        for c in 0..full {
            // (`acc.fma(a, b)` is acc + a·b: here s − max and sum + e.)
            let e = exp_lanes(L::load(p.add(c * LANES)).fma(one, neg_max));
            e.store_part(p.add(c * LANES), LANES);
            sum = e.fma(one, sum);
        }
        if rest > 0 {
            let at = p.add(full * LANES);
            exp_lanes(L::load_part(at, rest).fma(one, neg_max)).store_part(at, rest);
            sum = L::load_part(at, rest).fma(one, sum);
        }
        let sum = sum.reduce();
        let inv = L::splat(1.0 / sum);
        for c in 0..full {
            let e = L::load(p.add(c * LANES));
            L::zero().fma(e, inv).store_part(p.add(c * LANES), LANES);
        }
        if rest > 0 {
            let at = p.add(full * LANES);
            L::zero()
                .fma(L::load_part(at, rest), inv)
                .store_part(at, rest);
        }
        max + sum.ln()
    }
}

/// ln 2 in two parts for Cody–Waite's r = x − n·ln 2: the high part 355/512,
/// 9 bits, so n·LN2_HI is exact for |n| < 2¹⁵; the low part ln 2 − LN2_HI.
/// Shared with the encoder's scalar f32 exp, which computes the same way.
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;

/// e^r's Taylor coefficients, 1/7! down to 1/0!, for Horner's rule.
pub(super) const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// e^x per lane for x ≤ 0, within 2 ulp, in one fixed sequence of exactly
/// rounded operations (the same bits on every set):
/// - x clamped to ≥ −80 (e^−80 ≈ 2e−35 is nothing beside a softmax's sum
///   of at least 1, and keeps every result normal);
/// - n = rint(x · log₂e), r = x − n·ln2 in two steps (Cody–Waite, ln2's
///   high part exact in 9 bits), so |r| ≤ ln2 / 2 ≈ 0.347;
/// - e^r by its Taylor series to r⁷ (error r⁸/8! < 6e−9), Horner with fma;
/// - times 2ⁿ through the exponent field; a NaN x gives NaN.
///
/// # Safety
/// The processor has L's set.
#[inline(always)]
unsafe fn exp_lanes<L: Lanes>(x: L) -> L {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // SAFETY: the caller's promise.
    unsafe {
        // (−80 first: max gives its second operand where the first is not
        // greater, so a NaN x stays NaN.)
        let x = L::splat(-80.0).max(x);
        // (`acc.fma(a, b)` is acc + a·b, rounded once.)
        let t = L::splat(MAGIC).fma(x, L::splat(LOG2E));
        let n = t.fma(L::splat(1.0), L::splat(-MAGIC));
        let r = x.fma(n, L::splat(-LN2_HI));
        let r = r.fma(n, L::splat(-LN2_LO));
        let mut p = L::splat(EXP_TAYLOR[0]);
        for &c in &EXP_TAYLOR[1..] {
            p = L::splat(c).fma(p, r);
        }
        // The exponent arithmetic would turn a NaN into a number: adding
        // x · 0 (+0, or NaN where x is NaN) gives it back.
        let nan_guard = L::zero().fma(x, L::zero());
        p.ldexp_magic(t).fma(L::splat(1.0), nan_guard)
    }
}

/// o[d..d + N·16] (or, with `width` < 16, the `width` values at d, N = 1):
/// Σ_j p_j v_j in the order of `at`, each lane its own chain of fma from
/// +0.0.
///
/// # Safety
/// o and every v row at `at` hold d + N·16 (or d + width) floats; the
/// processor has L's set.
#[inline(always)]
unsafe fn weighted_pass<L: Lanes, const N: usize>(
    o: &mut [f32],
    v: &[f32],
    at: &[usize],
    p: &[f32],
    d: usize,
    width: usize,
) {
    debug_assert!(N <= 8 && (width == LANES || N == 1) && d + N * width <= o.len());
    // SAFETY: the caller's promises.
    unsafe {
        let mut acc = [L::zero(); N];
        for (&row, &p) in at.iter().zip(p) {
            let (p, v) = (L::splat(p), v.as_ptr().add(row + d));
            for (c, acc) in acc.iter_mut().enumerate() {
                let chunk = if width == LANES {
                    L::load(v.add(c * LANES))
                } else {
                    L::load_part(v, width)
                };
                *acc = acc.fma(p, chunk);
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            acc.store_part(o.as_mut_ptr().add(d + c * LANES), width);
        }
    }
}

/// Asks for the lines of the `n` floats at p (`matmul_invariant::prefetch`).
#[inline(always)]
fn lines(p: *const f32, n: usize) {
    for at in (0..n).step_by(16) {
        prefetch(p.wrapping_add(at));
    }
}

/// q · k[..q.len()] as 16 lane accumulators, before the tree. (A function,
/// not a closure: closures do not inherit the caller's target features, so
/// the lanes' operations would not inline into one.)
///
/// # Safety
/// k valid for reads of q.len() floats; the processor has L's set.
#[inline(always)]
unsafe fn dot_lanes<L: Lanes>(q: &[f32], k: *const f32) -> L {
    let (full, rest) = (q.len() / LANES, q.len() % LANES);
    let q = q.as_ptr();
    // SAFETY: chunks stay below q.len(), the caller's promise for k.
    unsafe {
        let mut acc = L::zero();
        for c in 0..full {
            acc = acc.fma(L::load(q.add(c * LANES)), L::load(k.add(c * LANES)));
        }
        if rest > 0 {
            let (qc, kc) = (q.add(full * LANES), k.add(full * LANES));
            acc = acc.fma(L::load_part(qc, rest), L::load_part(kc, rest));
        }
        acc
    }
}

/// [`attend`] compiled for AVX-512 and for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::matmul_invariant::x86::{Ymm2, Zmm};
    use super::{attend_lanes, Scratch};

    /// 8 of the 32 zmm hold outputs: a head of up to 128 in one pass.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn attend_avx512(
        o: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        scratch: &mut Scratch,
    ) -> f32 {
        // SAFETY: the caller's promises; the processor has AVX-512F.
        unsafe { attend_lanes::<Zmm, 8>(o, q, k, v, scale, scratch) }
    }

    /// 4 pairs of the 16 ymm hold outputs: a head of 64 in one pass.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_avx2(
        o: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        scratch: &mut Scratch,
    ) -> f32 {
        // SAFETY: the caller's promises; the processor has AVX2 and FMA.
        unsafe { attend_lanes::<Ymm2, 4>(o, q, k, v, scale, scratch) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_lanes` (the portable build, which every set's bits equal)
    /// against f64 over the range softmax uses, and at its edges.
    #[test]
    fn exp_lanes_is_within_two_ulp() {
        let mut xs: Vec<f32> = (0..=160_000).map(|i| -(i as f32) / 2000.0).collect();
        xs.extend([0.0, -0.0, -1e-30, -79.999, -80.0, -80.5, f32::NEG_INFINITY]);
        for chunk in xs.chunks(LANES) {
            let mut v = [0.0f32; LANES];
            v[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: the portable lanes run anywhere.
            let e = unsafe { exp_lanes::<[f32; LANES]>(v) };
            for (&x, &e) in chunk.iter().zip(&e) {
                let want = (x.max(-80.0) as f64).exp();
                let ulp = (want as f32).to_bits().abs_diff(e.to_bits());
                assert!(ulp <= 2, "exp({x}) = {e:e}, want {want:e}: {ulp} ulp");
            }
        }
        // SAFETY: as above.
        let nan = unsafe { exp_lanes::<[f32; LANES]>([f32::NAN; LANES]) };
        assert!(nan.iter().all(|e| e.is_nan()));
    }
}
