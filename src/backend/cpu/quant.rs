//! Matrix products and gathers with quantized weights (`Backend::matmul_q`,
//! `Backend::embedding_q`).

use crate::backend::cpu::matmul_invariant::matmul_nt_invariant;
use crate::error::{Error, Result};
use crate::quant::{dequant, GgmlType};

/// Checks that `len` bytes hold a [rows, cols] matrix of `ty`: one line
/// saying what is wrong otherwise.
pub fn check(ty: GgmlType, len: usize, rows: usize, cols: usize) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(Error::Unsupported(dequant::unsupported_msg(ty)));
    }
    let Some(row_bytes) = ty.bytes_for(cols) else {
        return Err(Error::Invalid(format!(
            "a {ty} row of {cols} values is not a whole number of {}-value blocks",
            ty.block_size()
        )));
    };
    if row_bytes.checked_mul(rows) != Some(len) {
        return Err(Error::Invalid(format!(
            "{len} bytes do not hold {rows} rows of {cols} {ty} values ({row_bytes} bytes a row)"
        )));
    }
    Ok(())
}

/// Weight rows dequantized per call of the reference product.
const ROWS_PER_CHUNK: usize = 64;

/// out [n, m] = x [n, k] · deq(w [m, k])ᵀ: each chunk of weight rows is
/// dequantized, then multiplied by the batch-invariant f32 product, so each
/// element depends only on its rows (the reference the integer kernels are
/// measured against).
pub fn matmul_q(ty: GgmlType, out: &mut [f32], x: &[f32], w: &[u8], n: usize, m: usize, k: usize) {
    let row_bytes = ty.bytes_for(k).expect("checked at upload");
    let mut wf = vec![0f32; ROWS_PER_CHUNK * k];
    let mut part = vec![0f32; n * ROWS_PER_CHUNK];
    for j0 in (0..m).step_by(ROWS_PER_CHUNK) {
        let rows = ROWS_PER_CHUNK.min(m - j0);
        let wf = &mut wf[..rows * k];
        dequant::dequantize(ty, &w[j0 * row_bytes..(j0 + rows) * row_bytes], wf)
            .expect("checked at upload");
        let part = &mut part[..n * rows];
        matmul_nt_invariant(part, x, wf, n, rows, k);
        for (o, p) in out.chunks_exact_mut(m).zip(part.chunks_exact(rows)) {
            o[j0..j0 + rows].copy_from_slice(p);
        }
    }
}

/// Rows `ids` of the quantized table `w` [vocab, d], dequantized into out.
pub fn embedding_q(ty: GgmlType, out: &mut [f32], ids: &[u32], w: &[u8], vocab: usize, d: usize) {
    let row_bytes = ty.bytes_for(d).expect("checked at upload");
    for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
        let id = id as usize;
        assert!(id < vocab, "token id {id} outside vocabulary {vocab}");
        dequant::dequantize(ty, &w[id * row_bytes..(id + 1) * row_bytes], row)
            .expect("checked at upload");
    }
}
