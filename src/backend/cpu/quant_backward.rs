//! The backward of a product with a frozen quantized weight
//! (`Backend::matmul_q_backward`): dx += dy · deq(W), for LoRA on a
//! quantized base.

use super::backward::{gemm_acc, ROW_BLOCK};
use super::quant::QWeight;
use crate::quant::dequant;
use rayon::prelude::*;

/// Weight rows dequantized at a time: bounds the scratch (256 × 1536 f32 is
/// 1.5 MiB) where widening a tied head at once would take 113 MB.
const W_ROWS: usize = 256;

/// dx [n, k] += dy [n, m] · deq(w [m, k]), a chunk of weight rows at a time.
pub fn matmul_q_backward(dx: &mut [f32], dy: &[f32], w: &QWeight, n: usize) {
    let [m, k] = w.shape();
    assert!(dx.len() == n * k && dy.len() == n * m);
    let mut wf = vec![0f32; W_ROWS * k];
    for j0 in (0..m).step_by(W_ROWS) {
        let rows = W_ROWS.min(m - j0);
        let wf = &mut wf[..rows * k];
        wf.par_chunks_mut(k)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (j, row)| {
                let blocks = w.file_row(j0 + j, scratch);
                dequant::dequantize(w.ty(), blocks, row).expect("checked at upload");
            });
        let wf = &*wf;
        dx.par_chunks_mut(ROW_BLOCK * k)
            .enumerate()
            .for_each(|(b, dx)| {
                let i0 = b * ROW_BLOCK;
                let block_rows = dx.len() / k;
                // SAFETY: dst is dx's block_rows×k block (row stride k); lhs is
                // dy's rows i0.., columns j0..j0+rows (row stride m); rhs is the
                // rows×k chunk of w (row stride k). All inside the slices.
                unsafe {
                    gemm_acc(
                        (block_rows, k, rows),
                        dx.as_mut_ptr(),
                        k,
                        (dy.as_ptr().add(i0 * m + j0), 1, m as isize),
                        (wf.as_ptr(), 1, k as isize),
                        1.0,
                    )
                };
            });
    }
}
