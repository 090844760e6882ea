//! AVX2: a pair of blocks is two ymm of 32 codes (block 2c, block 2c+1) and
//! the 16 lane accumulators two ymm of f32 (`Ymm2`: lanes 0..8, 8..16).
//! maddubs multiplies unsigned codes by signed activations into i16 pairs
//! and madd sums pairs into each lane's i32; no pair can saturate (codes
//! ≤ 63 here, |q| ≤ 127). Q8_0's signed weights would (255 · 127 · 2 >
//! 2¹⁵), so its dot multiplies |w| by q with w's sign instead.

use super::super::matmul_invariant::x86::Ymm2;
use super::kernel::{self, Block, Format, Simd, Unpacked};
use super::kernel::{Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
use crate::quant::dequant::scale_min_k4;
use crate::quant::GgmlType;
use std::arch::x86_64::*;

pub(super) struct Avx2;

type Two = [__m256i; 2];

impl Simd for Avx2 {
    type Bytes = Two;
    type Ints = Two;
    type Floats = Ymm2;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_bytes(p: *const i8) -> Two {
        // SAFETY: 64 bytes at p, the caller's promise.
        unsafe {
            [
                _mm256_loadu_si256(p.cast()),
                _mm256_loadu_si256(p.add(32).cast()),
            ]
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_ints(p: *const i32) -> Two {
        // SAFETY: 16 i32 at p, the caller's promise.
        unsafe {
            [
                _mm256_loadu_si256(p.cast()),
                _mm256_loadu_si256(p.add(8).cast()),
            ]
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero_ints() -> Two {
        [_mm256_setzero_si256(); 2]
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot(init: Two, w: Two, x: Two) -> Two {
        let ones = _mm256_set1_epi16(1);
        let lane = |h: usize| {
            let pairs = _mm256_maddubs_epi16(w[h], x[h]);
            _mm256_add_epi32(init[h], _mm256_madd_epi16(pairs, ones))
        };
        [lane(0), lane(1)]
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step(acc: Ymm2, sw: Ymm2, d: Ymm2, p: Two) -> Ymm2 {
        let half =
            |acc, sw, d, p| _mm256_fmadd_ps(_mm256_mul_ps(sw, d), _mm256_cvtepi32_ps(p), acc);
        Ymm2(half(acc.0, sw.0, d.0, p[0]), half(acc.1, sw.1, d.1, p[1]))
    }

    unsafe fn block<W: Format<Self>>(b: Block) {
        // SAFETY: the caller's promises, passed on.
        unsafe { block_avx2::<W>(b) }
    }
}

/// 16 ymm registers: 2×2 accumulators of two each; codes, scales and mins
/// are reloaded from the stack where they do not fit.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2<W: Format<Avx2>>(b: Block) {
    // SAFETY: the caller's promises; the processor has these features.
    unsafe { kernel::block::<Avx2, W, 2, 2>(b) }
}

/// One block's unpacked codes, scale and min.
type Half = (__m256i, __m256, __m256);

/// Blocks 2c, 2c+1 as a pair.
#[inline(always)]
fn join(a: Half, b: Half) -> Unpacked<Avx2> {
    Unpacked {
        codes: [a.0, b.0],
        sw: Ymm2(a.1, b.1),
        mw: Ymm2(a.2, b.2),
    }
}

/// The little-endian u16 and u32 at p (unaligned).
///
/// # Safety
/// p valid for reads of 2 or 4 bytes.
#[inline(always)]
unsafe fn u16_at(p: *const u8) -> u16 {
    // SAFETY: the caller's promise; x86 is little-endian.
    unsafe { p.cast::<u16>().read_unaligned() }
}

#[inline(always)]
unsafe fn u32_at(p: *const u8) -> u32 {
    // SAFETY: the caller's promise; x86 is little-endian.
    unsafe { p.cast::<u32>().read_unaligned() }
}

/// The f16 at p, widened.
///
/// # Safety
/// p valid for reads of 2 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller's promise.
    let bits = unsafe { u16_at(p) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The 4-bit codes of a 32-value block's 16 bytes at p: low nibbles, then
/// high ones.
///
/// # Safety
/// p valid for reads of 16 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles_16(p: *const u8) -> __m256i {
    // SAFETY: the caller's promise.
    let q = unsafe { _mm_loadu_si128(p.cast()) };
    let v = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// 16 where bit e of `bits` is set, for each byte e.
#[inline]
#[target_feature(enable = "avx2")]
fn bit_16s(bits: u32) -> __m256i {
    // Byte e takes byte e / 8 of bits (each 128-bit half holds all four),
    // then tests its bit e % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// ((v >> shift) & mask) << 4 in every byte, for the fifth and sixth bits.
#[inline]
#[target_feature(enable = "avx2")]
fn high_bits(v: __m256i, shift: i32, mask: i8) -> __m256i {
    let v = _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift));
    _mm256_slli_epi16::<4>(_mm256_and_si256(v, _mm256_set1_epi8(mask)))
}

/// The 32-value types with 4-bit codes: one block at `a` with d at byte 0,
/// an optional m at `m`, an optional u32 of fifth bits at `qh` and 16
/// bytes of nibbles at `qs`.
macro_rules! formats32 {
    ($($ty:ident: offset $offset:expr, m $m:expr, qh $qh:expr, qs $qs:expr;)*) => {$(
        impl Format<Avx2> for $ty {
            const TYPE: GgmlType = GgmlType::$ty;
            const OFFSET: i32 = $offset;
            const MIN: bool = {
                let m: Option<usize> = $m;
                m.is_some()
            };

            #[inline]
            #[target_feature(enable = "avx2,f16c")]
            unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
                let size = GgmlType::$ty.type_size();
                // SAFETY: both blocks lie at row, the caller's promise; the
                // offsets are inside a block.
                let block = |a: *const u8| unsafe {
                    let mut codes = nibbles_16(a.add($qs));
                    let qh: Option<usize> = $qh;
                    if let Some(qh) = qh {
                        codes = _mm256_or_si256(codes, bit_16s(u32_at(a.add(qh))));
                    }
                    let m: Option<usize> = $m;
                    let m = m.map_or(0.0, |m| f16_at(a.add(m)));
                    (codes, _mm256_set1_ps(f16_at(a)), _mm256_set1_ps(m))
                };
                // SAFETY: as above.
                let a = unsafe { row.add(2 * c * size) };
                // SAFETY: as above.
                join(block(a), block(unsafe { a.add(size) }))
            }
        }
    )*};
}

formats32! {
    Q4_0: offset 8, m None, qh None, qs 2;
    Q4_1: offset 0, m Some(2), qh None, qs 4;
    Q5_0: offset 16, m None, qh Some(2), qs 6;
    Q5_1: offset 0, m Some(2), qh Some(4), qs 8;
}

impl Format<Avx2> for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const OFFSET: i32 = 0;
    const MIN: bool = false;

    /// Codes are the signed weights themselves (see `dot`).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
        // SAFETY: both blocks lie at row, the caller's promise.
        let block = |a: *const u8| unsafe {
            let codes = _mm256_loadu_si256(a.add(2).cast());
            (codes, _mm256_set1_ps(f16_at(a)), _mm256_setzero_ps())
        };
        // SAFETY: as above.
        let a = unsafe { row.add(2 * c * 34) };
        // SAFETY: as above.
        join(block(a), block(unsafe { a.add(34) }))
    }

    /// |w| · (q with w's sign) = w · q, with |w| ≤ 128 and |q| ≤ 127, so
    /// maddubs's pairs stay under 2¹⁵.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot(init: Two, w: Two, x: Two) -> Two {
        let ones = _mm256_set1_epi16(1);
        let lane = |h: usize| {
            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w[h]), _mm256_sign_epi8(x[h], w[h]));
            _mm256_add_epi32(init[h], _mm256_madd_epi16(pairs, ones))
        };
        [lane(0), lane(1)]
    }
}

/// Q4_K, Q5_K: d, dmin and the 12 bytes of 6-bit scales and mins at the
/// start of super-block `sb`, for sub-block g: (sw, mw).
///
/// # Safety
/// sb valid for reads of 16 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn k4_scales(sb: *const u8, g: usize) -> (__m256, __m256) {
    // SAFETY: the caller's promise.
    let (d, dmin, scales) = unsafe {
        (
            f16_at(sb),
            f16_at(sb.add(2)),
            &*sb.add(4).cast::<[u8; 12]>(),
        )
    };
    let (sc, m) = scale_min_k4(scales, g);
    (
        _mm256_set1_ps(d * sc as f32),
        _mm256_set1_ps(-(dmin * m as f32)),
    )
}

/// Q4_K and Q5_K: sub-blocks 2t and 2t+1 of super-block c / 4, codes the
/// low and high nibbles of qs[32t..32t+32] (qs at `qs`), plus for Q5_K bit
/// 2t or 2t+1 of qh[0..32] (at 16).
///
/// # Safety
/// The super-block lies at row.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn pair_k4(row: *const u8, c: usize, size: usize, qs: usize, five: bool) -> Unpacked<Avx2> {
    let t = c % 4;
    // SAFETY: the caller's promise; the offsets are inside the super-block.
    unsafe {
        let sb = row.add(c / 4 * size);
        let q = _mm256_loadu_si256(sb.add(qs + 32 * t).cast());
        let mask = _mm256_set1_epi8(0x0F);
        let mut codes = [
            _mm256_and_si256(q, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
        ];
        if five {
            let qh = _mm256_loadu_si256(sb.add(16).cast());
            for (h, codes) in codes.iter_mut().enumerate() {
                *codes = _mm256_or_si256(*codes, high_bits(qh, (2 * t + h) as i32, 1));
            }
        }
        let (a, b) = (k4_scales(sb, 2 * t), k4_scales(sb, 2 * t + 1));
        join((codes[0], a.0, a.1), (codes[1], b.0, b.1))
    }
}

impl Format<Avx2> for Q4_K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const OFFSET: i32 = 0;
    const MIN: bool = true;

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
        // SAFETY: the caller's promise.
        unsafe { pair_k4(row, c, 144, 16, false) }
    }
}

impl Format<Avx2> for Q5_K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const OFFSET: i32 = 0;
    const MIN: bool = true;

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
        // SAFETY: the caller's promise.
        unsafe { pair_k4(row, c, 176, 48, true) }
    }
}

impl Format<Avx2> for Q6_K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const OFFSET: i32 = 32;
    const MIN: bool = false;

    /// The layout is the portable version's: ql[64h..64h+64] >> 4·(t % 2),
    /// qh[32h..32h+32] >> 4·(t % 2) and + 2, scales[4t..4t+4].
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
        let (t, h) = (c % 4, c % 4 / 2);
        let shift = 4 * (t % 2) as i32;
        // SAFETY: the super-block lies at row, the caller's promise.
        unsafe {
            let sb = row.add(c / 4 * 210);
            let qh = _mm256_loadu_si256(sb.add(128 + 32 * h).cast());
            let codes = |half: usize| {
                let ql = _mm256_loadu_si256(sb.add(64 * h + 32 * half).cast());
                let lo = _mm256_srl_epi16(ql, _mm_cvtsi32_si128(shift));
                let lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
                _mm256_or_si256(lo, high_bits(qh, shift + 2 * half as i32, 3))
            };
            let d = f16_at(sb.add(208));
            let sc = _mm_cvtepi8_epi32(_mm_cvtsi32_si128(u32_at(sb.add(192 + 4 * t)) as i32));
            let sw = _mm256_castps128_ps256(_mm_mul_ps(_mm_set1_ps(d), _mm_cvtepi32_ps(sc)));
            let lanes = |a, b| _mm256_setr_epi32(a, a, a, a, b, b, b, b);
            let zero = _mm256_setzero_ps();
            join(
                (codes(0), _mm256_permutevar8x32_ps(sw, lanes(0, 1)), zero),
                (codes(1), _mm256_permutevar8x32_ps(sw, lanes(2, 3)), zero),
            )
        }
    }
}
