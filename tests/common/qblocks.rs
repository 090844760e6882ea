//! Random weights in ggml's block formats, for the quantized products'
//! tests and benchmark (there is no quantizer to make them from floats):
//! random bytes, with every f16 scale and min set to a sane value, ±2⁻¹⁰ to
//! ±2⁻⁵ (6-bit K scales up to 63 make that up to about ±2), and the float
//! types' values in ±1.

use engine::quant::GgmlType;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

/// Byte offsets of the f16 scales and mins inside one block of `ty`.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// `rows` rows of `cols` values of `ty` (cols a multiple of its block size).
pub fn random_blocks(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let len = ty.bytes_for(cols).expect("whole blocks") * rows;
    let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let value = |rng: &mut StdRng| rng.random_range(-1.0f32..1.0);
    for block in bytes.chunks_exact_mut(ty.type_size()) {
        let put =
            |b: &mut [u8], at: usize, bits: u16| b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
        match ty {
            GgmlType::F16 => put(block, 0, f16::from_f32(value(rng)).to_bits()),
            GgmlType::BF16 => put(block, 0, bf16::from_f32(value(rng)).to_bits()),
            GgmlType::F32 => block.copy_from_slice(&value(rng).to_le_bytes()),
            _ => {
                for &at in f16_fields(ty) {
                    let scale = value(rng).signum() * (rng.random_range(-10.0f32..-5.0)).exp2();
                    put(block, at, f16::from_f32(scale).to_bits());
                }
            }
        }
    }
    bytes
}
