//! F16, BF16 and F32 weights: each task widens its block of weight rows to
//! f32 (exactly) and takes `matmul_invariant`'s product, so an output is that
//! product's arithmetic on the widened row, whatever the batch.

use super::super::matmul::SendPtr;
use super::super::matmul_invariant::{matmul_nt_invariant_with, Isa};
use crate::quant::GgmlType;
use half::{bf16, f16};
use rayon::prelude::*;

/// Bytes of widened weights per task: room in L2 beside the rows of x.
const BLOCK_BYTES: usize = 64 * 1024;

/// out [n, m] = x [n, k] · w [m, k]ᵀ for w of type `ty` (F16, BF16, F32).
pub(super) fn matmul(
    isa: Isa,
    ty: GgmlType,
    out: &mut [f32],
    x: &[f32],
    w: &[u8],
    n: usize,
    m: usize,
    k: usize,
) {
    let size = ty.type_size();
    let cols = (BLOCK_BYTES / (4 * k.max(1))).max(1);
    let dst = SendPtr(out.as_mut_ptr());
    w.par_chunks(cols * k * size)
        .enumerate()
        .for_each(|(task, w)| {
            let (j0, width) = (task * cols, w.len() / (k * size));
            let mut wf = vec![0f32; width * k];
            widen(ty, w, &mut wf);
            let mut part = vec![0f32; n * width];
            matmul_nt_invariant_with(isa, &mut part, x, &wf, n, width, k);
            for (i, part) in part.chunks_exact(width).enumerate() {
                // SAFETY: row i, columns j0..j0+width of out [n, m]: this
                // task's columns, which no other task writes.
                unsafe {
                    let o = dst.get().add(i * m + j0);
                    o.copy_from_nonoverlapping(part.as_ptr(), width);
                }
            }
        });
}

/// The values of `w` (whole values of `ty`) into `out`, exactly.
fn widen(ty: GgmlType, w: &[u8], out: &mut [f32]) {
    let halves = w.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    match ty {
        GgmlType::F16 => {
            for (o, h) in out.iter_mut().zip(halves) {
                *o = f16::from_bits(h).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, h) in out.iter_mut().zip(halves) {
                *o = bf16::from_bits(h).to_f32();
            }
        }
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(w.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        _ => unreachable!("not a float type"),
    }
}
