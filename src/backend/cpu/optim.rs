//! The optimizer step of the CPU device.

use crate::backend::{AdamW, AdamWScalars};
use rayon::prelude::*;

/// One AdamW step, element-wise, in torch.optim.AdamW's order (its
/// single-tensor path): weight decay first, then the moments, then the
/// bias-corrected update. The scalars are formed in f64 as Python does, then
/// used in f32 as torch does for an f32 tensor.
pub fn adamw(param: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], hp: &AdamW) {
    let AdamWScalars {
        decay,
        step_size,
        bc2_sqrt,
        one_minus_beta1: one_minus_b1,
        one_minus_beta2: one_minus_b2,
        beta2,
        eps,
    } = hp.scalars();
    const CHUNK: usize = 16384;
    param
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)))
        .for_each(|((p, m), (v, g))| {
            for (((p, m), v), g) in p.iter_mut().zip(m).zip(v).zip(g) {
                *p *= decay;
                *m += one_minus_b1 * (g - *m); // torch: m.lerp_(g, 1 − β1)
                *v = *v * beta2 + one_minus_b2 * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * (*m / denom);
            }
        });
}
