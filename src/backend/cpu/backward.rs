//! The backward ops of the CPU device, each the plain math of the forward it
//! differentiates (see the doc comments of `Backend`, which quote the forward).
//!
//! Conventions: parameter gradients and activation gradients with several
//! consumers accumulate (`+=`), the others are overwritten; each function says
//! which. Work splits into blocks whose bounds do not depend on the thread
//! count, and partial sums are added in block order, so results are the same
//! bit for bit on any number of threads.

use super::attention::{mm, Dims, GEMM_MIN_QUERIES};
use super::matmul::dot;
use super::ops::silu;
use crate::backend::IGNORE;
use gemm::Parallelism;
use rayon::prelude::*;

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// dtable[ids[i]] += dout[i], rows of width d. Serial: repeated ids add into
/// the same row, and this is cheap next to everything else.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], d: usize) {
    let vocab = dtable.len() / d;
    for (row, &id) in dout.chunks_exact(d).zip(ids) {
        let id = id as usize;
        assert!(id < vocab, "token id {id} outside vocabulary {vocab}");
        for (g, o) in dtable[id * d..(id + 1) * d].iter_mut().zip(row) {
            *g += o;
        }
    }
}

/// Backward of out = x · r · w, r = 1/sqrt(mean(x²) + eps), per row of width d:
///   dx += r · (dout ∘ w) − x · r³ · mean(dout ∘ w ∘ x)
///   dw += Σ_rows dout ∘ x · r
/// Both accumulate.
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    d: usize,
    eps: f32,
) {
    let chunk = rows_per_task(d) * d;
    // Each task adds its rows into dx and returns its partial dw.
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(dout.par_chunks(chunk).zip(x.par_chunks(chunk)))
        .map(|(dx, (dout, x))| {
            let mut dw_part = vec![0.0f32; d];
            for ((dx, dout), x) in dx
                .chunks_exact_mut(d)
                .zip(dout.chunks_exact(d))
                .zip(x.chunks_exact(d))
            {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps).sqrt();
                // mean over the row of dout ∘ w ∘ x
                let mean_gwx = dout
                    .iter()
                    .zip(w)
                    .zip(x)
                    .map(|((g, w), x)| g * w * x)
                    .sum::<f32>()
                    / d as f32;
                let c = r * r * r * mean_gwx;
                for ((((dx, g), w), x), dw) in
                    dx.iter_mut().zip(dout).zip(w).zip(x).zip(&mut dw_part)
                {
                    *dx += r * g * w - x * c;
                    *dw += g * x * r;
                }
            }
            dw_part
        })
        .collect();
    for part in &partials {
        for (dw, p) in dw.iter_mut().zip(part) {
            *dw += p;
        }
    }
}

/// Rows of the output per gemm task in the matmul backward.
pub(super) const ROW_BLOCK: usize = 64;

/// Backward of out[n, m] = x[n, k] · w[m, k]ᵀ:
///   dx[n, k] += dout[n, m] · w[m, k]
///   dw[m, k] += dout[n, m]ᵀ · x[n, k]   (when dw is given)
/// Both accumulate. Each task computes a block of rows of dx or dw.
pub fn matmul_nt_backward(
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    (n, m, k): (usize, usize, usize),
) {
    assert!(dx.len() == n * k && dout.len() == n * m && x.len() == n * k && w.len() == m * k);
    dx.par_chunks_mut(ROW_BLOCK * k)
        .enumerate()
        .for_each(|(b, dx)| {
            let rows = dx.len() / k;
            let dout = &dout[b * ROW_BLOCK * m..][..rows * m];
            // SAFETY: dst is dx's rows×k block (row stride k); lhs is the
            // rows×m block of dout (row stride m); rhs is w, m×k (row stride
            // k). All three are slices of exactly those lengths.
            unsafe {
                gemm_acc(
                    (rows, k, m),
                    dx.as_mut_ptr(),
                    k,
                    (dout.as_ptr(), 1, m as isize),
                    (w.as_ptr(), 1, k as isize),
                    1.0,
                )
            };
        });
    if let Some(dw) = dw {
        assert_eq!(dw.len(), m * k);
        dw.par_chunks_mut(ROW_BLOCK * k)
            .enumerate()
            .for_each(|(b, dw)| {
                let rows = dw.len() / k;
                let j0 = b * ROW_BLOCK;
                // SAFETY: dst is dw's rows×k block (row stride k); lhs is
                // doutᵀ rows j0..j0+rows, read at dout[i·m + j] (i < n,
                // j0 ≤ j < j0+rows ≤ m: column stride m, row stride 1); rhs is
                // x, n×k (row stride k). All inside the asserted lengths.
                unsafe {
                    gemm_acc(
                        (rows, k, n),
                        dw.as_mut_ptr(),
                        k,
                        (dout.as_ptr().add(j0), m as isize, 1),
                        (x.as_ptr(), 1, k as isize),
                        1.0,
                    )
                };
            });
    }
}

/// Single-threaded dst[r, c] += scale · Σ_l lhs[r, l] · rhs[l, c] through
/// the gemm crate, for (r, c, l) < (rows, cols, inner); dst has row stride
/// `dst_rs` and each operand is (pointer, column stride, row stride).
///
/// # Safety
/// Every element addressed by those strides must be valid (dst for writes).
pub(super) unsafe fn gemm_acc(
    (rows, cols, inner): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
    scale: f32,
) {
    // SAFETY: the caller's promise. With read_dst, dst = 1·dst + scale·lhs·rhs.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            dst,
            1,
            dst_rs as isize,
            true,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Backward of rope: each pair turned by angle a in the forward turns back by
/// −a (the transpose of a rotation), in place. Same angles as `ops::rope`.
pub fn rope_backward(dx: &mut [f32], width: usize, heads: usize, pos0: usize, theta: f32) {
    let hd = width / heads;
    let half = hd / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32))
        .collect();
    dx.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let pos = (pos0 + r) as f32;
        for head in row.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for ((a, b), f) in a.iter_mut().zip(b.iter_mut()).zip(&inv_freq) {
                let (sin, cos) = (pos * f).sin_cos();
                let (g1, g2) = (*a, *b);
                *a = g1 * cos + g2 * sin;
                *b = g2 * cos - g1 * sin;
            }
        }
    });
}

/// Backward of causal GQA attention (see `Backend::attention_backward`), the
/// softmax recomputed from the forward's log-sum-exp (`lse` [heads, n]) and
/// D = rowsum(dout ∘ out). dq [n, heads·hd] is overwritten; dk, dv (rows
/// 0..pos0+n of the cache layout [·, kv_heads·hd]) accumulate.
///
/// One task per query head computes its dq block and its own contribution to
/// dk, dv of its kv head; the contributions are then added in head order.
/// As in the forward, a few queries take plain loops and more take per-head
/// matrix products.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    fwd: (&[f32], &[f32]),
    dims: Dims,
) {
    let Dims {
        n,
        heads,
        kv_heads,
        hd,
        pos0,
    } = dims;
    let group = heads / kv_heads;
    let (width, kv_width) = (heads * hd, kv_heads * hd);
    let len = pos0 + n;
    assert!(dq.len() == n * width && dout.len() == n * width && q.len() == n * width);
    assert!(k.len() >= len * kv_width && v.len() >= len * kv_width);
    assert!(dk.len() >= len * kv_width && dv.len() >= len * kv_width);
    let per_head: Vec<HeadGrads> = (0..heads)
        .into_par_iter()
        .map(|h| {
            if n >= GEMM_MIN_QUERIES {
                head_backward_gemm(h, dout, q, k, v, fwd, dims)
            } else {
                head_backward_loop(h, dout, q, k, v, fwd, dims)
            }
        })
        .collect();
    for (h, grads) in per_head.iter().enumerate() {
        let g = h / group;
        for (dst, src) in dq.chunks_exact_mut(width).zip(grads.dq.chunks_exact(hd)) {
            dst[h * hd..(h + 1) * hd].copy_from_slice(src);
        }
        for j in 0..len {
            let at = j * kv_width + g * hd;
            for (d, s) in dk[at..at + hd].iter_mut().zip(&grads.dk[j * hd..]) {
                *d += s;
            }
            for (d, s) in dv[at..at + hd].iter_mut().zip(&grads.dv[j * hd..]) {
                *d += s;
            }
        }
    }
}

/// One query head's share of the attention gradients.
struct HeadGrads {
    dq: Vec<f32>, // [n, hd]
    dk: Vec<f32>, // [len, hd]
    dv: Vec<f32>, // [len, hd]
}

/// Head h's gradients with the softmax recomputed row by row from
/// `(out, lse)`, the forward's.
fn head_backward_loop(
    h: usize,
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (out_f, lse): (&[f32], &[f32]),
    dims: Dims,
) -> HeadGrads {
    let Dims {
        n,
        heads,
        kv_heads,
        hd,
        pos0,
    } = dims;
    let g = h / (heads / kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let (width, kv_width, len) = (heads * hd, kv_heads * hd, pos0 + n);
    let kj = |j: usize| &k[j * kv_width + g * hd..][..hd];
    let vj = |j: usize| &v[j * kv_width + g * hd..][..hd];
    let mut out = HeadGrads {
        dq: vec![0.0; n * hd],
        dk: vec![0.0; len * hd],
        dv: vec![0.0; len * hd],
    };
    let mut p = Vec::with_capacity(len);
    let mut dp = Vec::with_capacity(len);
    for i in 0..n {
        let qi = &q[i * width + h * hd..][..hd];
        let doi = &dout[i * width + h * hd..][..hd];
        let visible = pos0 + i + 1;
        // p_j = exp(q·k_j · scale − lse), the forward's softmax
        let lse_i = lse[h * n + i];
        p.clear();
        p.extend((0..visible).map(|j| (dot(qi, kj(j)) * scale - lse_i).exp()));
        // dp_j = dout·v_j; D = Σ_j p_j dp_j = dout·out
        dp.clear();
        dp.extend((0..visible).map(|j| dot(doi, vj(j))));
        let pdp = dot(doi, &out_f[i * width + h * hd..][..hd]);
        let dqi = &mut out.dq[i * hd..(i + 1) * hd];
        for j in 0..visible {
            // ds_j = p_j (dp_j − Σ p dp), times the score scale
            let ds = p[j] * (dp[j] - pdp) * scale;
            let (k_j, dk_j) = (kj(j), &mut out.dk[j * hd..(j + 1) * hd]);
            for c in 0..hd {
                dqi[c] += ds * k_j[c];
                dk_j[c] += ds * qi[c];
            }
            for (dv, o) in out.dv[j * hd..(j + 1) * hd].iter_mut().zip(doi) {
                *dv += p[j] * o;
            }
        }
    }
    out
}

/// Head h's gradients as five matrix products over the whole sequence,
/// with g its kv head, S = Q_h K_gᵀ · scale and P = exp(S − lse) (causal,
/// the forward's softmax from its log-sum-exp):
///   dP = dO_h V_gᵀ,  dS = P ∘ (dP − rowsum(dO_h ∘ O_h)) · scale
///   dQ_h = dS K_g,  dK_g += dSᵀ Q_h,  dV_g += Pᵀ dO_h
fn head_backward_gemm(
    h: usize,
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (out_f, lse): (&[f32], &[f32]),
    dims: Dims,
) -> HeadGrads {
    let Dims {
        n,
        heads,
        kv_heads,
        hd,
        pos0,
    } = dims;
    let g = h / (heads / kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let (width, kv_width, len) = (heads * hd, kv_heads * hd, pos0 + n);
    // Row-major views into the interleaved tensors: (pointer, row stride).
    let q_h = (q[h * hd..].as_ptr(), width);
    let do_h = (dout[h * hd..].as_ptr(), width);
    let k_g = (k[g * hd..].as_ptr(), kv_width);
    let v_g = (v[g * hd..].as_ptr(), kv_width);
    let mut p = vec![0.0f32; n * len];
    let mut ds = vec![0.0f32; n * len];
    // SAFETY (all products below): every operand is addressed inside its
    // slice: Q_h, dO_h are n rows of hd at stride width from h·hd; K_g, V_g
    // are len rows of hd at stride kv_width from g·hd, and len·kv_width ≤
    // their lengths (asserted by the caller); P, dS are n×len, the outputs
    // n×hd or len×hd, all owned here.
    unsafe {
        // P = S = Q_h K_gᵀ · scale, then exp(S − lse) per row (causal)
        mm(&mut p, len, n, len, hd, q_h, false, k_g, true, scale);
        for (i, row) in p.chunks_exact_mut(len).enumerate() {
            let visible = pos0 + i + 1;
            let lse_i = lse[h * n + i];
            row[..visible]
                .iter_mut()
                .for_each(|s| *s = (*s - lse_i).exp());
            row[visible..].fill(0.0);
        }
        // dP = dO_h V_gᵀ (into ds), then dS in place
        mm(&mut ds, len, n, len, hd, do_h, false, v_g, true, 1.0);
    }
    for (i, (prow, drow)) in p
        .chunks_exact(len)
        .zip(ds.chunks_exact_mut(len))
        .enumerate()
    {
        let at = i * width + h * hd;
        let pdp = dot(&dout[at..at + hd], &out_f[at..at + hd]);
        for (d, p) in drow.iter_mut().zip(prow) {
            *d = p * (*d - pdp) * scale;
        }
    }
    let mut out = HeadGrads {
        dq: vec![0.0; n * hd],
        dk: vec![0.0; len * hd],
        dv: vec![0.0; len * hd],
    };
    let (p, ds) = ((p.as_ptr(), len), (ds.as_ptr(), len));
    unsafe {
        mm(&mut out.dq, hd, n, hd, len, ds, false, k_g, false, 1.0);
        mm(&mut out.dk, hd, len, hd, n, ds, true, q_h, false, 1.0);
        mm(&mut out.dv, hd, len, hd, n, p, true, do_h, false, 1.0);
    }
    out
}

/// Backward of out = silu(gate) ∘ up, σ the logistic function:
///   dgate = dout ∘ up ∘ σ(gate) (1 + gate (1 − σ(gate)))
///   dup   = dout ∘ silu(gate)
/// Both overwritten.
pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    const CHUNK: usize = 16384;
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK).zip(gate.par_chunks(CHUNK)))
        .zip(up.par_chunks(CHUNK))
        .for_each(|(((dg, du), (o, g)), u)| {
            for ((((dg, du), o), g), u) in dg.iter_mut().zip(du).zip(o).zip(g).zip(u) {
                let sig = 1.0 / (1.0 + (-g).exp());
                *dg = o * u * sig * (1.0 + g * (1.0 - sig));
                *du = o * silu(*g);
            }
        });
}

/// Fused softmax cross-entropy over rows of width `vocab`: returns
/// Σ over counted rows of lse(x) − x[t]; with dlogits, writes
/// (softmax(x) − onehot(t)) · scale there (zeros for IGNORE rows).
pub fn cross_entropy(
    dlogits: Option<&mut [f32]>,
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    scale: f32,
) -> f32 {
    for &t in targets {
        assert!(
            t == IGNORE || (t as usize) < vocab,
            "target {t} outside vocabulary {vocab}"
        );
    }
    // log-sum-exp of one row
    let lse = |x: &[f32]| {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
    };
    let loss_of = |x: &[f32], t: u32| -> f64 {
        if t == IGNORE {
            0.0
        } else {
            (lse(x) - x[t as usize]) as f64
        }
    };
    let losses: Vec<f64> = match dlogits {
        None => logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(x, &t)| loss_of(x, t))
            .collect(),
        Some(dl) => dl
            .par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
            .map(|(dl, (x, &t))| {
                if t == IGNORE {
                    dl.fill(0.0);
                    return 0.0;
                }
                let l = lse(x);
                for (d, x) in dl.iter_mut().zip(x) {
                    *d = (x - l).exp() * scale;
                }
                dl[t as usize] -= scale;
                (l - x[t as usize]) as f64
            })
            .collect(),
    };
    losses.iter().sum::<f64>() as f32
}
