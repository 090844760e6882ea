//! AVX-512 with VNNI: a pair of blocks unpacks into one zmm of 64 codes,
//! vpdpbusd sums each lane's 4 unsigned codes times signed activations into
//! an i32 (twice a step: a quad's halves), and a zmm of f32 holds the 16
//! lane accumulators. Codes are unsigned:
//! Q8_0's signed weights are stored + 128 (OFFSET), the activations' `init`
//! taking the 128·Σ q back out.

use super::super::matmul_invariant::x86::Zmm;
use super::super::matmul_invariant::Lanes;
use super::activations::{self, Row};
use super::kernel::Unpacked;
use super::kernel::{self, k4_scales_mins, Block, Format, Layout, PackedFormat, Quad, Simd};
use super::kernel::{Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
use crate::quant::GgmlType;
use std::arch::x86_64::*;

pub(super) struct Avx512;

impl Simd for Avx512 {
    type Bytes = __m512i;
    type Ints = __m512i;
    type Floats = Zmm;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_bytes(p: *const i8) -> __m512i {
        // SAFETY: 64 bytes at p, the caller's promise.
        unsafe { _mm512_loadu_si512(p.cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_ints(p: *const i32) -> __m512i {
        // SAFETY: 16 i32 at p, the caller's promise.
        unsafe { _mm512_loadu_si512(p.cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero_ints() -> __m512i {
        _mm512_setzero_si512()
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dot(init: __m512i, w: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(init, w, x)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn step(acc: Zmm, sw: Zmm, d: Zmm, p: __m512i) -> Zmm {
        Zmm(_mm512_fmadd_ps(
            _mm512_mul_ps(sw.0, d.0),
            _mm512_cvtepi32_ps(p),
            acc.0,
        ))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn split(a: __m512i, b: __m512i) -> (__m512i, __m512i) {
        let (even, odd) = even_odd();
        (
            _mm512_permutex2var_epi32(a, even, b),
            _mm512_permutex2var_epi32(a, odd, b),
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn evens(a: Zmm, b: Zmm) -> Zmm {
        Zmm(_mm512_permutex2var_ps(a.0, even_odd().0, b.0))
    }

    #[inline(always)]
    fn prefetch(p: *const u8) {
        // Into L2, as matmul_invariant's (see PREFETCH_TILES there).
        // SAFETY: SSE is x86-64's baseline; a prefetch never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T2>(p.cast()) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn quantize_row(x: &[f32], row: Row, offset: i32) {
        activations::quantize_row(x, row, offset)
    }

    unsafe fn block<W: Format<Self>, L: Layout<Self, W>>(b: Block) {
        // SAFETY: the caller's promises, passed on.
        unsafe { block_avx512::<W, L>(b) }
    }
}

/// Indices of the even and the odd lanes of a‖b (32 lanes).
#[inline]
#[target_feature(enable = "avx512f")]
fn even_odd() -> (__m512i, __m512i) {
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    (even, _mm512_add_epi32(even, _mm512_set1_epi32(1)))
}

/// 32 zmm registers: 4×4 accumulators, 4 columns' codes and scales, a
/// row's activations; types with a min need 4 more (mins), so 4×3.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn block_avx512<W: Format<Avx512>, L: Layout<Avx512, W>>(b: Block) {
    // SAFETY: the caller's promises; the processor has these features.
    unsafe {
        if W::MIN {
            kernel::block::<Avx512, W, L, 4, 3>(b)
        } else {
            kernel::block::<Avx512, W, L, 4, 4>(b)
        }
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

/// The f16 at a and at b, widened: [a; 8] then [b; 8].
///
/// # Safety
/// a and b valid for reads of 2 bytes.
#[inline(always)]
unsafe fn f16_halves(a: *const u8, b: *const u8) -> Zmm {
    // SAFETY: the caller's promise.
    let bits = unsafe { u16_at(a) as u32 | (u16_at(b) as u32) << 16 };
    let ab = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    Zmm(_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(ab)))
}

/// The four f16 at p, widened, each over its block's 4 lanes.
///
/// # Safety
/// p valid for reads of 8 bytes.
#[inline(always)]
unsafe fn f16_quarters(p: *const u8) -> Zmm {
    // SAFETY: the caller's promise.
    let four = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(p.cast()) });
    let idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    Zmm(_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(four)))
}

/// A packed quad of a 4-bit (5-bit with FIVE) type: the halves are the low
/// and the high nibbles, plus 16 where their fifth bit is set; then the
/// scales, and the mins with MIN.
///
/// # Safety
/// The quad lies at p.
#[inline(always)]
unsafe fn packed_nibbles<const FIVE: bool, const MIN: bool>(p: *const u8) -> Quad<Avx512> {
    let mask = _mm512_set1_epi8(0x0F);
    // SAFETY: the caller's promise; the offsets are inside the quad.
    unsafe {
        let v = _mm512_loadu_si512(p.cast());
        let mut even = _mm512_and_si512(v, mask);
        let mut odd = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
        let mut at = 64;
        if FIVE {
            even = _mm512_or_si512(even, bit_16s(p.add(64).cast::<u64>().read_unaligned()));
            odd = _mm512_or_si512(odd, bit_16s(p.add(72).cast::<u64>().read_unaligned()));
            at += 16;
        }
        let mw = if MIN {
            f16_quarters(p.add(at + 8))
        } else {
            Zmm::zero()
        };
        Quad::new(even, odd, f16_quarters(p.add(at)), mw)
    }
}

kernel::packed_nibble_formats!(Avx512);

/// A packed Q8_0 quad: the halves as stored, + 128 as `unpack`'s codes.
impl PackedFormat<Avx512> for Q8_0 {
    #[inline(always)]
    unsafe fn packed_quad(p: *const u8) -> Quad<Avx512> {
        let flip = _mm512_set1_epi8(-128);
        // SAFETY: the quad lies at p, the caller's promise.
        unsafe {
            let even = _mm512_xor_si512(_mm512_loadu_si512(p.cast()), flip);
            let odd = _mm512_xor_si512(_mm512_loadu_si512(p.add(64).cast()), flip);
            Quad::new(even, odd, f16_quarters(p.add(128)), Zmm::zero())
        }
    }
}

/// The 4-bit codes of two 32-value blocks whose 16 bytes lie at a and b:
/// low nibbles of a, high of a, low of b, high of b.
///
/// # Safety
/// a and b valid for reads of 16 bytes.
#[inline(always)]
unsafe fn nibbles_2x16(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: the caller's promise.
    let (qa, qb) = unsafe { (_mm_loadu_si128(a.cast()), _mm_loadu_si128(b.cast())) };
    let (qa, qb) = (
        _mm256_broadcastsi128_si256(qa),
        _mm256_broadcastsi128_si256(qb),
    );
    let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qa), qb);
    let v = _mm512_mask_blend_epi64(0xCC, v, _mm512_srli_epi16::<4>(v));
    _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
}

/// The 4-bit codes of the 32 bytes at p: low nibbles, then high ones.
///
/// # Safety
/// p valid for reads of 32 bytes.
#[inline(always)]
unsafe fn nibbles_32(p: *const u8) -> __m512i {
    // SAFETY: the caller's promise.
    let v = _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(p.cast()) });
    let v = _mm512_mask_blend_epi64(0xF0, v, _mm512_srli_epi16::<4>(v));
    _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
}

/// 16 where bit e of `bits` is set, for each byte e.
#[inline(always)]
unsafe fn bit_16s(bits: u64) -> __m512i {
    _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(16))
}

/// The 32-value types: blocks 2c and 2c+1 at a and b = a + size, each with
/// d at byte 0, an optional m at `m`, an optional u32 of fifth bits at `qh`
/// and 16 bytes of nibbles at `qs`.
macro_rules! formats32 {
    ($($ty:ident: offset $offset:expr, m $m:expr, qh $qh:expr, qs $qs:expr;)*) => {$(
        impl Format<Avx512> for $ty {
            const TYPE: GgmlType = GgmlType::$ty;
            const OFFSET: i32 = $offset;
            const MIN: bool = {
                let m: Option<usize> = $m;
                m.is_some()
            };

            #[inline(always)]
            unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx512> {
                let size = GgmlType::$ty.type_size();
                // SAFETY: both blocks lie at row, the caller's promise; the
                // offsets are inside a block.
                unsafe {
                    let a = row.add(2 * c * size);
                    let b = a.add(size);
                    let mut codes = nibbles_2x16(a.add($qs), b.add($qs));
                    let qh: Option<usize> = $qh;
                    if let Some(qh) = qh {
                        let bits = u32_at(a.add(qh)) as u64 | (u32_at(b.add(qh)) as u64) << 32;
                        codes = _mm512_or_si512(codes, bit_16s(bits));
                    }
                    let m: Option<usize> = $m;
                    let mw = match m {
                        Some(m) => f16_halves(a.add(m), b.add(m)),
                        None => Zmm::zero(),
                    };
                    Unpacked {
                        codes,
                        sw: f16_halves(a, b),
                        mw,
                    }
                }
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

impl Format<Avx512> for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const OFFSET: i32 = 128;
    const MIN: bool = false;

    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx512> {
        // SAFETY: both blocks lie at row, the caller's promise.
        unsafe {
            let a = row.add(2 * c * 34);
            let b = a.add(34);
            let qa = _mm256_loadu_si256(a.add(2).cast());
            let qb = _mm256_loadu_si256(b.add(2).cast());
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qa), qb);
            Unpacked {
                codes: _mm512_xor_si512(q, _mm512_set1_epi8(-128)),
                sw: f16_halves(a, b),
                mw: Zmm::zero(),
            }
        }
    }
}

/// Q4_K, Q5_K: (sw, mw) of sub-blocks 2t and 2t+1 from d, dmin and the 12
/// bytes of 6-bit scales and mins at the start of super-block `sb`: all
/// eight d·sc and dmin·m in one vector, then the pair's lanes picked.
///
/// # Safety
/// sb valid for reads of 16 bytes.
#[inline(always)]
unsafe fn k4_scales(sb: *const u8, t: usize) -> (Zmm, Zmm) {
    // SAFETY: the caller's promise.
    unsafe {
        let (sc, m) = k4_scales_mins(&*sb.add(4).cast::<[u8; 12]>());
        let both = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(m as i64, sc as i64)));
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(u32_at(sb) as i32));
        let eights = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let dd = _mm512_permutexvar_ps(eights, _mm512_castps128_ps512(dd));
        // [d·sc_0..8, dmin·m_0..8], each product one rounding as in portable.
        let prod = _mm512_mul_ps(both, dd);
        let pick = _mm512_add_epi32(eights, _mm512_set1_epi32(2 * t as i32));
        let sw = _mm512_permutexvar_ps(pick, prod);
        let m = _mm512_permutexvar_ps(_mm512_add_epi32(pick, _mm512_set1_epi32(8)), prod);
        let mw = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(m),
            _mm512_set1_epi32(i32::MIN),
        ));
        (Zmm(sw), Zmm(mw))
    }
}

impl Format<Avx512> for Q4_K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const OFFSET: i32 = 0;
    const MIN: bool = true;

    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx512> {
        let t = c % 4;
        // SAFETY: the super-block lies at row, the caller's promise.
        unsafe {
            let sb = row.add(c / 4 * 144);
            let (sw, mw) = k4_scales(sb, t);
            Unpacked {
                codes: nibbles_32(sb.add(16 + 32 * t)),
                sw,
                mw,
            }
        }
    }
}

impl Format<Avx512> for Q5_K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const OFFSET: i32 = 0;
    const MIN: bool = true;

    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx512> {
        let t = c % 4;
        // SAFETY: the super-block lies at row, the caller's promise.
        unsafe {
            let sb = row.add(c / 4 * 176);
            let (sw, mw) = k4_scales(sb, t);
            // Bit 2t (first block) or 2t+1 (second) of qh[0..32].
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(sb.add(16).cast()));
            let (lo, hi) = ((1u8 << (2 * t)) as i8, (1u8 << (2 * t + 1)) as i8);
            let bit = _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi8(lo), _mm512_set1_epi8(hi));
            let high = _mm512_test_epi8_mask(qh, bit);
            Unpacked {
                codes: _mm512_or_si512(nibbles_32(sb.add(48 + 32 * t)), bit_16s(high)),
                sw,
                mw,
            }
        }
    }
}

impl Format<Avx512> for Q6_K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const OFFSET: i32 = 32;
    const MIN: bool = false;

    /// The layout is the portable version's: ql[64h..64h+64] >> 4·(t % 2),
    /// qh[32h..32h+32] >> 4·(t % 2) and + 2, scales[4t..4t+4].
    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx512> {
        let (t, h) = (c % 4, c % 4 / 2);
        let shift = 4 * (t % 2) as i32;
        // SAFETY: the super-block lies at row, the caller's promise.
        unsafe {
            let sb = row.add(c / 4 * 210);
            let ql = _mm512_loadu_si512(sb.add(64 * h).cast());
            let lo = _mm512_srl_epi16(ql, _mm_cvtsi32_si128(shift));
            let lo = _mm512_and_si512(lo, _mm512_set1_epi8(0x0F));
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(sb.add(128 + 32 * h).cast()));
            let counts = _mm512_mask_blend_epi64(
                0xF0,
                _mm512_set1_epi16(shift as i16),
                _mm512_set1_epi16(shift as i16 + 2),
            );
            let hi = _mm512_and_si512(_mm512_srlv_epi16(qh, counts), _mm512_set1_epi8(3));
            let codes = _mm512_or_si512(lo, _mm512_slli_epi16::<4>(hi));
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16_at(sb.add(208)) as i32)));
            let sc = _mm_cvtepi8_epi32(_mm_cvtsi32_si128(u32_at(sb.add(192 + 4 * t)) as i32));
            let sw = _mm_mul_ps(_mm_set1_ps(d), _mm_cvtepi32_ps(sc));
            let idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            Unpacked {
                codes,
                sw: Zmm(_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(sw))),
                mw: Zmm::zero(),
            }
        }
    }
}
