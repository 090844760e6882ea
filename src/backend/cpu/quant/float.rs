//! F16, BF16 and F32 weights: `matmul_invariant`'s product reading them
//! as they are stored, each value widened exactly to f32 as it is loaded, so
//! an output is that product's arithmetic on the widened row, whatever the
//! batch — and decode reads 2 bytes a weight, not a widened copy's 4.

use super::super::matmul_invariant::{matmul_nt_invariant_elems, Isa};
use crate::quant::GgmlType;
use half::{bf16, f16};

/// out [n, m] = x [n, k] · w [m, k]ᵀ for w of type `ty` (F16, BF16, F32),
/// little-endian values at any alignment.
#[allow(clippy::too_many_arguments)]
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
    assert!(w.len() >= m * k * ty.type_size());
    // SAFETY: w holds m·k values of ty (asserted), read unaligned; the
    // target is little-endian like the file.
    unsafe {
        match ty {
            GgmlType::F32 => {
                matmul_nt_invariant_elems(isa, out, x, w.as_ptr().cast::<f32>(), n, m, k)
            }
            GgmlType::BF16 => {
                matmul_nt_invariant_elems(isa, out, x, w.as_ptr().cast::<bf16>(), n, m, k)
            }
            GgmlType::F16 => {
                matmul_nt_invariant_elems(isa, out, x, w.as_ptr().cast::<f16>(), n, m, k)
            }
            _ => unreachable!("not a float type"),
        }
    }
}
