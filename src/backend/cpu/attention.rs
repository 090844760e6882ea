//! Causal grouped-query attention over a KV cache, on the CPU.

use super::matmul::dot;
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

/// out[i, h] = Σ_j softmax_j(q[i,h]·k[j,g] / sqrt(hd)) v[j,g], j ≤ pos0 + i,
/// with g = h / (heads / kv_heads) the key/value head that head h shares.
pub fn causal(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], dims: Dims) {
    let Dims {
        n,
        heads,
        kv_heads,
        hd,
        pos0,
    } = dims;
    assert_eq!(out.len(), n * heads * hd);
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let kv_width = kv_heads * hd;
    // One task per (query row, head): each owns hd outputs.
    out.par_chunks_mut(hd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (task, o)| {
            let (i, h) = (task / heads, task % heads);
            let g = h / group;
            let qh = &q[task * hd..(task + 1) * hd];
            let len = pos0 + i + 1;
            scores.clear();
            scores.extend((0..len).map(|j| {
                let kj = &k[j * kv_width + g * hd..][..hd];
                dot(qh, kj) * scale
            }));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let vj = &v[j * kv_width + g * hd..][..hd];
                let p = p / sum;
                for (o, v) in o.iter_mut().zip(vj) {
                    *o += p * v;
                }
            }
        },
    );
}
