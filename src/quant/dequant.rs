//! ggml tensor types and their exact dequantization to f32.
//!
//! A ggml tensor row is a sequence of *blocks*; each type packs `block_size`
//! values into `type_size` bytes. The layouts below follow ggml's
//! `ggml-common.h`, and the arithmetic follows the order of operations of the
//! gguf Python package (`gguf/quants.py`), so the results are bit-identical
//! to it (tests/gguf.rs checks that against values it computed).
//!
//! Every loop here is plain and per block: this is the readable reference, and
//! dequantization runs once, at import time.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Values per block of the "K" quantizations.
pub const QK_K: usize = 256;

/// Declares the ggml types GGUF files may contain, with their ggml id, their
/// name and (block size, bytes per block) — the table of ggml's `type_traits`.
macro_rules! ggml_types {
    ($($variant:ident = $id:literal, $name:literal, ($bs:expr, $ts:expr);)*) => {
        /// A ggml tensor element type, as stored in GGUF tensor infos.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum GgmlType {
            $($variant,)*
        }

        impl GgmlType {
            /// The type with ggml id `id`, or `None` for an id ggml does not define.
            pub fn from_id(id: u32) -> Option<Self> {
                match id {
                    $($id => Some(GgmlType::$variant),)*
                    _ => None,
                }
            }

            /// The ggml id (the number stored in a GGUF tensor info).
            pub fn id(self) -> u32 {
                match self {
                    $(GgmlType::$variant => $id,)*
                }
            }

            /// The name ggml uses, e.g. "Q4_K".
            pub fn name(self) -> &'static str {
                match self {
                    $(GgmlType::$variant => $name,)*
                }
            }

            /// Values per block.
            pub const fn block_size(self) -> usize {
                match self {
                    $(GgmlType::$variant => $bs,)*
                }
            }

            /// Bytes per block.
            pub const fn type_size(self) -> usize {
                match self {
                    $(GgmlType::$variant => $ts,)*
                }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "F32", (1, 4);
    F16 = 1, "F16", (1, 2);
    Q4_0 = 2, "Q4_0", (32, 2 + 16);
    Q4_1 = 3, "Q4_1", (32, 2 + 2 + 16);
    Q5_0 = 6, "Q5_0", (32, 2 + 4 + 16);
    Q5_1 = 7, "Q5_1", (32, 2 + 2 + 4 + 16);
    Q8_0 = 8, "Q8_0", (32, 2 + 32);
    Q8_1 = 9, "Q8_1", (32, 4 + 4 + 32);
    Q2_K = 10, "Q2_K", (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4);
    Q3_K = 11, "Q3_K", (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12);
    Q4_K = 12, "Q4_K", (QK_K, 2 + 2 + QK_K / 2 + 12);
    Q5_K = 13, "Q5_K", (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12);
    Q6_K = 14, "Q6_K", (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16);
    Q8_K = 15, "Q8_K", (QK_K, 4 + QK_K + QK_K / 8);
    IQ2_XXS = 16, "IQ2_XXS", (QK_K, 2 + QK_K / 4);
    IQ2_XS = 17, "IQ2_XS", (QK_K, 2 + QK_K / 4 + QK_K / 32);
    IQ3_XXS = 18, "IQ3_XXS", (QK_K, 2 + QK_K / 4 + QK_K / 8);
    IQ1_S = 19, "IQ1_S", (QK_K, 2 + QK_K / 8 + QK_K / 16);
    IQ4_NL = 20, "IQ4_NL", (32, 2 + 16);
    IQ3_S = 21, "IQ3_S", (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4);
    IQ2_S = 22, "IQ2_S", (QK_K, 2 + QK_K / 4 + QK_K / 16);
    IQ4_XS = 23, "IQ4_XS", (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64);
    I8 = 24, "I8", (1, 1);
    I16 = 25, "I16", (1, 2);
    I32 = 26, "I32", (1, 4);
    I64 = 27, "I64", (1, 8);
    F64 = 28, "F64", (1, 8);
    IQ1_M = 29, "IQ1_M", (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32);
    BF16 = 30, "BF16", (1, 2);
    TQ1_0 = 34, "TQ1_0", (QK_K, 2 + 4 * 13);
    TQ2_0 = 35, "TQ2_0", (QK_K, 2 + 64);
    MXFP4 = 39, "MXFP4", (32, 1 + 16);
}

/// The types [`dequantize`] handles.
pub const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl GgmlType {
    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        SUPPORTED.contains(&self)
    }

    /// Bytes taken by `n` values, or `None` when `n` is not a whole number of
    /// blocks (or the size overflows).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why [`dequantize`] refuses type `ty`, naming it and what it does handle.
pub fn unsupported_msg(ty: GgmlType) -> String {
    let names: Vec<&str> = SUPPORTED.iter().map(|t| t.name()).collect();
    format!(
        "dequantizing ggml type {ty} is not supported (supported: {})",
        names.join(", ")
    )
}

/// Dequantizes `data` (whole blocks of type `ty`) into `out`, which must hold
/// exactly the number of values the blocks encode.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(Error::Unsupported(unsupported_msg(ty)));
    }
    if ty.bytes_for(out.len()) != Some(data.len()) {
        return Err(Error::Invalid(format!(
            "dequantize {ty}: {} bytes do not hold {} values",
            data.len(),
            out.len()
        )));
    }
    let blocks = data.chunks_exact(ty.type_size());
    let outs = out.chunks_exact_mut(ty.block_size());
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        _ => unreachable!("checked by can_dequantize"),
    };
    for (b, y) in blocks.zip(outs) {
        block_fn(b, y);
    }
    Ok(())
}

/// [`dequantize`] into a new vector of `n` values.
pub fn dequantize_vec(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    dequantize(ty, data, &mut out)?;
    Ok(out)
}

/// The little-endian f16 at byte `i` of `b`, widened (exactly) to f32.
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 4-bit value `j` (0..32) of a 32-value block whose 16 bytes hold values
/// 0..16 in their low nibbles and 16..32 in their high nibbles.
fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    }
}

/// Q8_0: { f16 d; i8 qs[32] }, x = q * d.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, y) in y.iter_mut().enumerate() {
        *y = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q4_0: { f16 d; u8 qs[16] }, x = d * (q - 8).
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, y) in y.iter_mut().enumerate() {
        *y = d * (nibble(qs, j) as i32 - 8) as f32;
    }
}

/// Q4_1: { f16 d; f16 m; u8 qs[16] }, x = d * q + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for (j, y) in y.iter_mut().enumerate() {
        *y = d * nibble(qs, j) as f32 + m;
    }
}

/// Q5_0: { f16 d; u32 qh; u8 qs[16] }, 5-bit q = nibble | (bit j of qh) << 4,
/// x = d * (q - 16).
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, y) in y.iter_mut().enumerate() {
        let q = nibble(qs, j) | (((qh >> j) & 1) as u8) << 4;
        *y = d * (q as i32 - 16) as f32;
    }
}

/// Q5_1: { f16 d; f16 m; u32 qh; u8 qs[16] }, x = d * q + m.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for (j, y) in y.iter_mut().enumerate() {
        let q = nibble(qs, j) | (((qh >> j) & 1) as u8) << 4;
        *y = d * q as f32 + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block, from
/// the 12 packed bytes (ggml's `get_scale_min_k4`).
pub(crate) fn scale_min_k4(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        let sc = (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4);
        let m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc, m)
    }
}

/// Q4_K: { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }, 8 sub-blocks of 32.
/// Bytes qs[32c..32c+32] hold sub-block 2c in the low nibbles and 2c+1 in the
/// high nibbles; x = (d * sc) * q - (dmin * m).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, g);
        let (scale, min) = (d * sc as f32, dmin * m as f32);
        let bytes = &qs[32 * (g / 2)..32 * (g / 2) + 32];
        let shift = 4 * (g % 2);
        for (j, y) in y.iter_mut().enumerate() {
            let q = (bytes[j] >> shift) & 0x0F;
            *y = scale * q as f32 - min;
        }
    }
}

/// Q5_K: { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }: as Q4_K,
/// plus a fifth bit for value j of sub-block g in bit g of qh[j].
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, g);
        let (scale, min) = (d * sc as f32, dmin * m as f32);
        let bytes = &qs[32 * (g / 2)..32 * (g / 2) + 32];
        let shift = 4 * (g % 2);
        for (j, y) in y.iter_mut().enumerate() {
            let q = ((bytes[j] >> shift) & 0x0F) | ((qh[j] >> g) & 1) << 4;
            *y = scale * q as f32 - min;
        }
    }
}

/// Q6_K: { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }, 16 sub-blocks of 16.
/// Value e = 128h + r (h = 0, 1; r in 0..128): low 4 bits from
/// ql[64h + r % 64] (low nibble if r < 64, else high), high 2 bits from
/// qh[32h + r % 32] at bit 2 * (r / 32); x = (d * scales[e / 16]) * (q - 32).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for (e, y) in y.iter_mut().enumerate() {
        let (h, r) = (e / 128, e % 128);
        let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
        let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = (lo | hi << 4) as i32 - 32;
        let scale = d * (scales[e / 16] as i8) as f32;
        *y = scale * q as f32;
    }
}
