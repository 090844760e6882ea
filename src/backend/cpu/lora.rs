//! LoRA branches (`Backend::lora_forward`, `lora_backward`): the low-rank
//! products through the gemm crate, in blocks of rows whose bounds do not
//! depend on the thread count, so results are the same on any number of
//! threads. Dropout's mask is `ops::dropout`'s, indexed by the element's
//! flat position in x, as `Backend::dropout` over the whole tensor draws it.
//! `gathered` (`Backend::lora_gathered`, serving) is plain loops, row by row.

use super::backward::{gemm_acc, ROW_BLOCK};
use super::matmul::dot;
use super::ops;
use crate::backend::shapes::LoraDims;
use rayon::prelude::*;
use std::borrow::Cow;

/// Rows of x per partial sum of dA (a fixed split: the partials add in
/// order).
const DA_ROWS: usize = 256;

/// Dropout with p = 0 is the identity: no mask to draw.
fn active(dropout: Option<(f32, u64)>) -> Option<(f32, u64)> {
    dropout.filter(|&(p, _)| p > 0.0)
}

/// Rows of x from row `row0` on, dropped out when asked.
fn dropped(x: &[f32], row0: usize, cols: usize, dropout: Option<(f32, u64)>) -> Cow<'_, [f32]> {
    match dropout {
        None => Cow::Borrowed(x),
        Some((p, seed)) => {
            let mut v = x.to_vec();
            ops::dropout(&mut v, row0 * cols, p, seed);
            Cow::Owned(v)
        }
    }
}

/// t = drop(x)·Aᵀ (overwritten), y += s·t·Bᵀ.
pub fn forward(
    (y, t): (&mut [f32], &mut [f32]),
    x: &[f32],
    (a, b): (&[f32], &[f32]),
    s: f32,
    dropout: Option<(f32, u64)>,
    LoraDims { inp, out, r, .. }: LoraDims,
) {
    let dropout = active(dropout);
    y.par_chunks_mut(ROW_BLOCK * out)
        .zip(t.par_chunks_mut(ROW_BLOCK * r))
        .enumerate()
        .for_each(|(blk, (y, t))| {
            let rows = t.len() / r;
            let row0 = blk * ROW_BLOCK;
            let x = &x[row0 * inp..][..rows * inp];
            let x = dropped(x, row0, inp, dropout);
            t.fill(0.0);
            // SAFETY: t is rows×r (row stride r); x is rows×inp (row stride
            // inp); Aᵀ [inp, r] reads A[c·inp + l]; Bᵀ [r, out] reads
            // B[o·r + k]; y is rows×out. All are slices of those lengths.
            unsafe {
                gemm_acc(
                    (rows, r, inp),
                    t.as_mut_ptr(),
                    r,
                    (x.as_ptr(), 1, inp as isize),
                    (a.as_ptr(), inp as isize, 1),
                    1.0,
                );
                gemm_acc(
                    (rows, out, r),
                    y.as_mut_ptr(),
                    out,
                    (t.as_ptr(), 1, r as isize),
                    (b.as_ptr(), r as isize, 1),
                    s,
                );
            }
        });
}

/// The backward of [`forward`]: dt = s·dy·B (overwritten), dx +=
/// drop'(dt·A), dB += s·dyᵀ·t, dA += dtᵀ·drop(x).
pub fn backward(
    (dx, da, db, dt): (&mut [f32], &mut [f32], &mut [f32], &mut [f32]),
    (dy, x, t): (&[f32], &[f32], &[f32]),
    (a, b): (&[f32], &[f32]),
    s: f32,
    dropout: Option<(f32, u64)>,
    LoraDims { n, inp, out, r }: LoraDims,
) {
    let dropout = active(dropout);
    dx.par_chunks_mut(ROW_BLOCK * inp)
        .zip(dt.par_chunks_mut(ROW_BLOCK * r))
        .enumerate()
        .for_each(|(blk, (dx, dt))| {
            let rows = dt.len() / r;
            let row0 = blk * ROW_BLOCK;
            let dy = &dy[row0 * out..][..rows * out];
            dt.fill(0.0);
            // SAFETY: dt is rows×r; dy is rows×out (row stride out); B is
            // out×r (row stride r).
            unsafe {
                gemm_acc(
                    (rows, r, out),
                    dt.as_mut_ptr(),
                    r,
                    (dy.as_ptr(), 1, out as isize),
                    (b.as_ptr(), 1, r as isize),
                    s,
                )
            };
            // dt·A lands in dx directly, or through a buffer that takes
            // the mask first.
            let mut masked = dropout.map(|_| vec![0.0; rows * inp]);
            let dst = masked.as_deref_mut().unwrap_or(dx);
            // SAFETY: dst is rows×inp; dt is rows×r; A is r×inp.
            unsafe {
                gemm_acc(
                    (rows, inp, r),
                    dst.as_mut_ptr(),
                    inp,
                    (dt.as_ptr(), 1, r as isize),
                    (a.as_ptr(), 1, inp as isize),
                    1.0,
                )
            };
            if let (Some(mut g), Some((p, seed))) = (masked, dropout) {
                ops::dropout(&mut g, row0 * inp, p, seed);
                dx.iter_mut().zip(&g).for_each(|(d, g)| *d += g);
            }
        });
    db.par_chunks_mut(ROW_BLOCK * r)
        .enumerate()
        .for_each(|(blk, db)| {
            let rows = db.len() / r;
            let j0 = blk * ROW_BLOCK;
            // SAFETY: db is rows×r; dyᵀ rows j0..j0+rows read dy[i·out + j]
            // (i < n, j < out); t is n×r.
            unsafe {
                gemm_acc(
                    (rows, r, n),
                    db.as_mut_ptr(),
                    r,
                    (dy.as_ptr().add(j0), out as isize, 1),
                    (t.as_ptr(), 1, r as isize),
                    s,
                )
            };
        });
    // dA [r, inp] has few rows: split the sum over n instead, and add the
    // partials in order.
    let dt = &*dt;
    let partials: Vec<Vec<f32>> = (0..n.div_ceil(DA_ROWS))
        .into_par_iter()
        .map(|blk| {
            let row0 = blk * DA_ROWS;
            let rows = DA_ROWS.min(n - row0);
            let x = dropped(&x[row0 * inp..][..rows * inp], row0, inp, dropout);
            let dt = &dt[row0 * r..][..rows * r];
            let mut part = vec![0.0; r * inp];
            // SAFETY: part is r×inp; dtᵀ [r, rows] reads dt[i·r + k]; x is
            // rows×inp.
            unsafe {
                gemm_acc(
                    (r, inp, rows),
                    part.as_mut_ptr(),
                    inp,
                    (dt.as_ptr(), r as isize, 1),
                    (x.as_ptr(), 1, inp as isize),
                    1.0,
                )
            };
            part
        })
        .collect();
    for part in partials {
        da.iter_mut().zip(&part).for_each(|(d, p)| *d += p);
    }
}

/// One adapter of [`gathered`]: A [r, in], B [out, r] (row-major), its rank
/// r and scaling s.
pub struct Adapter<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub s: f32,
}

/// y[i] += s·(x[i]·Aᵀ)·Bᵀ with adapter `row_adapter[i]`, rows whose entry is
/// NO_ADAPTER (or any index past `adapters`: the caller has checked) left
/// alone. Each row on its own, in a fixed order — t_j = dot(x[i], A[j]),
/// then y[i, c] += s·Σ_j t_j·B[c, j] for j = 0, 1, … — so its result does not
/// depend on the other rows.
pub fn gathered(
    y: &mut [f32],
    x: &[f32],
    adapters: &[Adapter<'_>],
    row_adapter: &[u32],
    (inp, out): (usize, usize),
) {
    y.par_chunks_mut(out)
        .zip(x.par_chunks(inp))
        .zip(row_adapter)
        .for_each(|((y, x), &a)| {
            let Some(Adapter { a, b, r, s }) = adapters.get(a as usize) else {
                return;
            };
            let t: Vec<f32> = a.chunks_exact(inp).map(|a_j| dot(x, a_j)).collect();
            for (yc, b_c) in y.iter_mut().zip(b.chunks_exact(*r)) {
                let mut sum = 0.0f32;
                for (t_j, b_cj) in t.iter().zip(b_c) {
                    sum += t_j * b_cj;
                }
                *yc += s * sum;
            }
        });
}
