//! Causal grouped-query attention over a KV cache, on the CPU.
//!
//! Two paths compute the same thing: a loop of dot products for the few
//! queries of a decode step (bound by reading the cache), and per-head matrix
//! products for prefill, where S = Q·Kᵀ and O = P·V are real GEMMs.

use super::matmul::dot;
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
    // One task per (query row, head): each owns hd outputs and one lse.
    let mut lse = vec![0.0f32; dims.n * heads];
    out.par_chunks_mut(hd)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (task, (o, lse))| {
            let (i, h) = (task / heads, task % heads);
            let g = h / group;
            let qh = &q[task * hd..(task + 1) * hd];
            let len = pos0 + i + 1;
            scores.clear();
            scores.extend((0..len).map(|j| {
                let kj = &k[j * kv_width + g * hd..][..hd];
                dot(qh, kj) * scale
            }));
            *lse = softmax_in_place(scores);
            o.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let vj = &v[j * kv_width + g * hd..][..hd];
                for (o, v) in o.iter_mut().zip(vj) {
                    *o += p * v;
                }
            }
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
/// fixed order — `dot` per key, softmax over the keys in order, the
/// weighted sum of v in key order — whatever the other rows are and however
/// rayon spreads the tasks. (This is also `causal_loop`'s arithmetic, so a
/// decode row gives the bits of the contiguous `attention` of fewer than
/// GEMM_MIN_QUERIES rows.)
pub fn paged(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: &[Option<(&[u32], usize)>],
    dims: PagedDims,
) {
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
    let avx2 = avx2_available();
    out.par_chunks_mut(hd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (task, o)| {
            let (r, h) = (task / heads, task % heads);
            let Some((blocks, pos)) = rows[r] else {
                return;
            };
            let g = h / group;
            let qh = &q[task * hd..(task + 1) * hd];
            // Position p's row of the pool, at kv head g.
            let at = |p: usize| {
                let slot = blocks[p / block_size] as usize * block_size + p % block_size;
                slot * kv_width + g * hd
            };
            scores.clear();
            scores.extend((0..=pos).map(|p| dot(qh, &k[at(p)..][..hd]) * scale));
            softmax_in_place(scores);
            o.fill(0.0);
            let rows = scores
                .iter()
                .enumerate()
                .map(|(p, &w)| (w, &v[at(p)..][..hd]));
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the processor has AVX2 (checked above).
                return unsafe { weighted_sum_avx2(o, rows) };
            }
            weighted_sum(o, rows)
        },
    );
}

/// o += w · v for each (w, v) in order: each element its own product and
/// sum, rounded apart (Rust never fuses them), so every vector width gives
/// the same bits.
#[inline(always)]
fn weighted_sum<'a>(o: &mut [f32], rows: impl Iterator<Item = (f32, &'a [f32])>) {
    for (w, v) in rows {
        for (o, v) in o.iter_mut().zip(v) {
            *o += w * v;
        }
    }
}

/// [`weighted_sum`] compiled for AVX2's 8 lanes: the V rows of a decode
/// step come from memory, and the baseline's 4-lane loop was a tenth of
/// a decode step's time.
///
/// # Safety
/// The processor must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_sum_avx2<'a>(o: &mut [f32], rows: impl Iterator<Item = (f32, &'a [f32])>) {
    weighted_sum(o, rows)
}

/// Whether [`weighted_sum_avx2`] may run here.
fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}
