//! The ops of BERT-family encoders on the CPU: LayerNorm, exact GELU, a
//! Linear layer's bias, and bidirectional attention over padded sequences.
//! The matrix products of attention go through `attention::mm` (the `gemm`
//! crate), as the causal attention's do.

use super::attention::{mm, softmax_in_place};
use rayon::prelude::*;

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// out = (x − mean) / sqrt(var + eps) · w + b, per row of width d, with the
/// biased variance (see `Backend::layernorm`). The row statistics take two
/// passes in f64 (a row's cost is small next to the matmuls around it), so
/// neither a large mean nor a wide row costs precision.
pub fn layernorm(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], d: usize, eps: f32) {
    let chunk = rows_per_task(d) * d;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (var + eps as f64).sqrt();
                for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                    *o = ((x as f64 - mean) * inv) as f32 * w + b;
                }
            }
        });
}

/// out = x · ½ (1 + erf(x / √2)), element-wise, evaluated in f64.
pub fn gelu(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(16384)
        .zip(x.par_chunks(16384))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                let x = x as f64;
                *o = (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32;
            }
        });
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
/// (sequence, head): S = Q·Kᵀ and O = P·V over the real rows only, as GEMMs.
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
    let blocks: Vec<Vec<f32>> = (0..lens.len() * heads)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / heads, task % heads);
            let len = lens[b];
            let mut o = vec![0.0f32; len * hd];
            if len == 0 {
                return o;
            }
            // Head h of sequence b: len rows of hd at stride width.
            let first = b * seq * width + h * hd;
            let mut s = vec![0.0f32; len * len];
            // S = Q_h·K_hᵀ / sqrt(hd)
            // SAFETY: S is len×len; Q_h and K_h are len rows of hd at
            // stride width from `first`, the real rows of sequence b, inside
            // q and k (whose lengths are asserted above).
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
            for row in s.chunks_exact_mut(len) {
                softmax_in_place(row);
            }
            // O_h = P·V_h
            // SAFETY: P is len×len as written above; V_h is len rows of hd
            // at stride width from `first`, inside v; O_h is len×hd.
            unsafe {
                mm(
                    &mut o,
                    hd,
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
            o
        })
        .collect();
    out.fill(0.0);
    for (task, o) in blocks.iter().enumerate() {
        let (b, h) = (task / heads, task % heads);
        let rows = out[b * seq * width..].chunks_exact_mut(width);
        for (dst, src) in rows.zip(o.chunks_exact(hd)) {
            dst[h * hd..(h + 1) * hd].copy_from_slice(src);
        }
    }
}
