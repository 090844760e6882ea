//! The reference quantizers: f32 → ggml blocks, the inverse of dequant.rs.
//!
//! Q8_0, Q4_0, Q4_1, Q5_0 and BF16 follow the arithmetic of the gguf Python
//! package (`gguf/quants.py`), which is itself bit-exact with ggml's
//! `quantize_row_*_ref`; F16 rounds to nearest even as numpy and ggml do.
//! Q4_K and Q6_K follow ggml's `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref`
//! (ggml-quants.c) with their helpers `make_qkx2_quants`, `make_qx_quants`
//! and `nearest_int`: what llama-quantize runs when it has no importance
//! matrix. Every f32 operation is the one those programs perform, in the same
//! order, and Rust never fuses a multiply and an add on its own, so the bytes
//! are identical (tests/quantize.rs checks them against bytes gguf-py and
//! ggml-quants.c wrote).
//!
//! The block functions are plain and sequential (the readable reference);
//! [`quantize_rows`] runs them on rows in parallel.

use super::dequant::QK_K;
use crate::error::{Error, Result};
use half::f16;
use rayon::prelude::*;

use super::GgmlType;

/// The types [`quantize`] writes.
pub const QUANTIZABLE: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

impl GgmlType {
    /// Whether [`quantize`] writes this type.
    pub fn can_quantize(self) -> bool {
        QUANTIZABLE.contains(&self)
    }
}

/// A block quantizer: one block of values → its bytes.
type BlockFn = fn(&[f32], &mut [u8]);

/// The block quantizer of `ty`.
fn block_fn(ty: GgmlType) -> Result<BlockFn> {
    Ok(match ty {
        GgmlType::F32 => |x, b| b.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => |x, b| b.copy_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
        GgmlType::BF16 => |x, b| b.copy_from_slice(&bf16_bits(x[0]).to_le_bytes()),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q6_K => q6_k,
        _ => {
            let names: Vec<&str> = QUANTIZABLE.iter().map(|t| t.name()).collect();
            return Err(Error::Unsupported(format!(
                "quantizing to ggml type {ty} is not supported (supported: {})",
                names.join(", ")
            )));
        }
    })
}

/// Quantizes `x` (whole blocks of type `ty`) into `out`, which must hold
/// exactly their bytes. Sequential: the reference.
pub fn quantize(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<()> {
    let f = block_fn(ty)?;
    if ty.bytes_for(x.len()) != Some(out.len()) {
        return Err(Error::Invalid(format!(
            "quantize {ty}: {} values do not fill {} bytes of whole blocks",
            x.len(),
            out.len()
        )));
    }
    for (x, b) in x
        .chunks_exact(ty.block_size())
        .zip(out.chunks_exact_mut(ty.type_size()))
    {
        f(x, b);
    }
    Ok(())
}

/// Quantizes a row-major tensor whose rows are `row_len` values long, the
/// rows in parallel. Each block depends on its own values only, so the
/// bytes are those of [`quantize`] whatever the thread count.
pub fn quantize_rows(ty: GgmlType, x: &[f32], row_len: usize) -> Result<Vec<u8>> {
    let f = block_fn(ty)?;
    let row_bytes = match ty.bytes_for(row_len) {
        Some(n) if row_len > 0 && x.len().is_multiple_of(row_len) => n,
        _ => {
            return Err(Error::Invalid(format!(
                "quantize {ty}: {} values are not whole rows of {row_len}, or a row is not whole blocks of {}",
                x.len(),
                ty.block_size()
            )))
        }
    };
    let mut out = vec![0u8; x.len() / row_len * row_bytes];
    // Chunks of about 64k values: enough work per task, many tasks per core.
    let rows_per_chunk = (65536 / row_len).max(1);
    out.par_chunks_mut(rows_per_chunk * row_bytes)
        .zip(x.par_chunks(rows_per_chunk * row_len))
        .for_each(|(b, x)| {
            for (x, b) in x
                .chunks_exact(ty.block_size())
                .zip(b.chunks_exact_mut(ty.type_size()))
            {
                f(x, b);
            }
        });
    Ok(out)
}

/// The index of the first block of `data` (whole blocks of `ty`) whose f16
/// or bf16 scales are not finite — what ggml's `ggml_validate_row_data`
/// refuses (a value too large for the type's scale).
pub fn first_nonfinite_block(ty: GgmlType, data: &[u8]) -> Option<usize> {
    // Byte offsets of the f16 fields of each block.
    let f16_at: &[usize] = match ty {
        GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::BF16 => {
            return data.chunks_exact(2).position(|b| {
                let bits = u16::from_le_bytes([b[0], b[1]]);
                bits & 0x7f80 == 0x7f80
            })
        }
        GgmlType::F32 => {
            return data
                .chunks_exact(4)
                .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
        }
        _ => return None,
    };
    data.chunks_exact(ty.type_size()).position(|b| {
        f16_at
            .iter()
            .any(|&i| !f16::from_le_bytes([b[i], b[i + 1]]).is_finite())
    })
}

/// f32 → bf16 bits as gguf-py (and ggml's `ggml_compute_fp32_to_bf16`):
/// NaN made quiet, else rounded to nearest even.
fn bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 64) as u16;
    }
    ((n as u64 + (0x7fff + ((n as u64 >> 16) & 1))) >> 16) as u16
}

/// The f16 bytes of `x`, rounded to nearest even.
fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// The value of the f16 at byte `i` of `b`.
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 1/d, or 0 for a zero scale (an all-zero block).
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The value of largest magnitude (the first of equals), with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Q8_0: { f16 d; i8 qs[32] }, d = max|x| / 127, q = round(x / d) (half away
/// from zero, as C's roundf).
fn q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f16_bytes(d));
    for (q, &v) in b[2..34].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

/// Q4_0: { f16 d; u8 qs[16] }, d = max / -8 (max: the value of largest
/// magnitude), q = min(15, trunc(x / d + 8.5)); value j < 16 in the low
/// nibble of byte j, value j + 16 in its high nibble.
fn q4_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f16_bytes(d));
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as u8).min(15);
        let q1 = ((x[j + 16] * id + 8.5) as u8).min(15);
        b[2 + j] = q0 | q1 << 4;
    }
}

/// Q4_1: { f16 d; f16 m; u8 qs[16] }, m = min, d = (max - min) / 15,
/// q = min(15, trunc((x - m) / d + 0.5)).
fn q4_1(x: &[f32], b: &mut [u8]) {
    let min = x.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
    let max = x.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
    let d = (max - min) / 15.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(min));
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as u8).min(15);
        let q1 = (((x[j + 16] - min) * id + 0.5) as u8).min(15);
        b[4 + j] = q0 | q1 << 4;
    }
}

/// Q5_0: { f16 d; u32 qh; u8 qs[16] }, d = max / -16,
/// q = min(31, trunc(x / d + 16.5)); the low 4 bits as in Q4_0, bit 4 of
/// value j in bit j of qh.
fn q5_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f16_bytes(d));
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((x[j] * id + 16.5) as u8).min(31);
        let q1 = ((x[j + 16] * id + 16.5) as u8).min(31);
        b[6 + j] = (q0 & 0x0F) | (q1 & 0x0F) << 4;
        qh |= u32::from(q0 >> 4) << j | u32::from(q1 >> 4) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// ggml's `nearest_int`: round to nearest, ties to even, through the bits
/// of `f + 1.5·2²³` (exact for |f| < 2²²; beyond that ggml gets whatever
/// the bits give, and so does this).
fn nearest_int(f: f32) -> i32 {
    let v = f + 12582912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qkx2_quants`: levels L in 0..=nmax and (scale, min) for
/// x ≈ scale·L − min, minimizing the error weighted by `w`, searched over
/// nstep + 1 scales around nmax / (max − min). Returns (scale, min), min ≥ 0.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    w: &[f32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let l = l as f32;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels.copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K: { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }: 8 sub-blocks of
/// 32, each x ≈ (d·sc)·q − dmin·m with 6-bit sc and m (packed as dequant.rs's
/// `scale_min_k4` reads them) and 4-bit q. ggml's `quantize_row_q4_K_ref`.
fn q4_k(x: &[f32], b: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0f32; 32];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let levels = &mut levels[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(15, xs, &weights, levels, -1.0, 0.1, 20);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut b[4..16];
    for j in 0..8 {
        // ggml stores nearest_int's result in a u8 (modulo 256) before the min.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0F) | (lm & 0x0F) << 4;
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    b[0..2].copy_from_slice(&f16_bytes(max_scale / 63.0));
    b[2..4].copy_from_slice(&f16_bytes(max_min / 63.0));
    let (d_all, dmin_all) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..8 {
        let (sc, m) = super::dequant::scale_min_k4(&b[4..16], j);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    // Bytes 32c..32c+32 of qs: sub-block 2c in the low nibbles, 2c+1 high.
    let qs = &mut b[16..144];
    for (c, q) in qs.chunks_exact_mut(32).enumerate() {
        for (l, q) in q.iter_mut().enumerate() {
            *q = levels[64 * c + l] | levels[64 * c + 32 + l] << 4;
        }
    }
}

/// ggml's `make_qx_quants` with rmse_type 1 and no importance weights:
/// signed levels in −nmax..nmax−1 (stored + nmax), the scale searched over
/// 19 candidates, weighting each value by x². Returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [u8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = level(iscale, v);
        levels[i] = (l + nmax) as u8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        (sumlx, suml2) = (0.0, 0.0);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                levels[i] = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it is zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Q6_K: { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }: 16 sub-blocks of
/// 16, x ≈ (d·scale)·(q − 32) with 8-bit scales and 6-bit q (laid out as
/// dequant.rs's `q6_k` reads them). ggml's `quantize_row_q6_K_ref`.
fn q6_k(x: &[f32], b: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut levels[16 * ib..16 * ib + 16],
        );
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    b[208..210].copy_from_slice(&f16_bytes(1.0 / iscale));
    for ib in 0..16 {
        b[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = f16_at(b, 208);
    for j in 0..16 {
        let d = d_all * (b[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as u8;
        }
    }
    // Value e = 128h + r: low 4 bits in ql[64h + r % 64] (low nibble if
    // r < 64), high 2 bits in qh[32h + r % 32] at bit 2·(r / 32).
    let (ql, rest) = b.split_at_mut(128);
    let qh = &mut rest[..64];
    for h in 0..2 {
        let l = &levels[128 * h..128 * h + 128];
        for r in 0..32 {
            ql[64 * h + r] = (l[r] & 0x0F) | (l[r + 64] & 0x0F) << 4;
            ql[64 * h + r + 32] = (l[r + 32] & 0x0F) | (l[r + 96] & 0x0F) << 4;
            qh[32 * h + r] =
                l[r] >> 4 | (l[r + 32] >> 4) << 2 | (l[r + 64] >> 4) << 4 | (l[r + 96] >> 4) << 6;
        }
    }
}
