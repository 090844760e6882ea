//! Row-wise and element-wise ops of the CPU device.

use crate::backend::dropout_keeps;
use crate::backend::topk::TopK;
use rayon::prelude::*;

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// out = x / sqrt(mean(x²) + eps) * w, per row of width d.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], d: usize, eps: f32) {
    let chunk = rows_per_task(d) * d;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let inv = 1.0 / (ms + eps).sqrt();
                for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * inv * w;
                }
            }
        });
}

/// Rotary embedding, "rotate half" layout (see `Backend::rope`).
pub fn rope(x: &mut [f32], width: usize, heads: usize, pos0: usize, theta: f32) {
    rope_by(x, width, heads, |r| (pos0 + r) as f32, theta);
}

/// `rope` with row r at `positions[r]` (see `Backend::rope_rows`): the same
/// arithmetic, so the same bits for the same positions.
pub fn rope_rows(x: &mut [f32], width: usize, heads: usize, positions: &[u32], theta: f32) {
    rope_by(x, width, heads, |r| positions[r] as f32, theta);
}

/// Rotary embedding of each row r by the angle of position `pos(r)`.
fn rope_by(
    x: &mut [f32],
    width: usize,
    heads: usize,
    pos: impl Fn(usize) -> f32 + Sync,
    theta: f32,
) {
    let hd = width / heads;
    let half = hd / 2;
    // Same arithmetic as HF: inv_freq in f32, angle = pos * inv_freq in f32.
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32))
        .collect();
    x.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let pos = pos(r);
        for head in row.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for ((a, b), f) in a.iter_mut().zip(b.iter_mut()).zip(&inv_freq) {
                let (sin, cos) = (pos * f).sin_cos();
                let (x1, x2) = (*a, *b);
                *a = x1 * cos - x2 * sin;
                *b = x2 * cos + x1 * sin;
            }
        }
    });
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// out = silu(gate) * up.
pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(16384)
        .zip(gate.par_chunks(16384).zip(up.par_chunks(16384)))
        .for_each(|(o, (g, u))| {
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = silu(*g) * u;
            }
        });
}

/// out = x - logsumexp(x), per row of width d.
pub fn log_softmax(out: &mut [f32], x: &[f32], d: usize) {
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            for (o, x) in o.iter_mut().zip(x) {
                *o = x - lse;
            }
        });
}

/// Inverted dropout in place over elements whose flat indices start at
/// `first`: x[i] ← x[i] / (1 − p) where `dropout_keeps(seed, first + i, p)`,
/// else 0.
pub fn dropout(x: &mut [f32], first: usize, p: f32, seed: u64) {
    let keep_scale = 1.0 / (1.0 - p);
    for (i, v) in x.iter_mut().enumerate() {
        *v = if dropout_keeps(seed, (first + i) as u64, p) {
            *v * keep_scale
        } else {
            0.0
        };
    }
}

/// `Backend::top_k` over `rows` rows of width m: the host's bounded
/// selection per row, rows in parallel.
pub fn top_k(scores: &[f32], rows: usize, m: usize, k: usize) -> Vec<Vec<(u32, f32)>> {
    let k = k.min(m);
    if k == 0 {
        return vec![Vec::new(); rows];
    }
    scores
        .par_chunks(m)
        .map(|row| {
            let mut best = TopK::new(k);
            best.scan(row, 0, None);
            best.into_sorted()
                .into_iter()
                .map(|(col, score)| (col as u32, score))
                .collect()
        })
        .collect()
}
