//! AVX2: a pair of blocks unpacks into two ymm of 32 codes (block 2c,
//! block 2c+1) and the 16 lane accumulators are two ymm of f32 (`Ymm2`:
//! lanes 0..8, 8..16). maddubs multiplies unsigned codes by signed
//! activations into i16 pairs and madd sums pairs into each lane's i32 (a
//! quad's halves one after the other); no pair can saturate (codes
//! ≤ 63 here, |q| ≤ 127). Q8_0's signed weights would (255 · 127 · 2 >
//! 2¹⁵), so its dot multiplies |w| by q with w's sign instead.

use super::super::matmul_invariant::x86::Ymm2;
use super::activations::{self, Row};
use super::kernel::Unpacked;
use super::kernel::{self, k4_scales_mins, Block, Format, Layout, PackedFormat, Quad, Simd};
use super::kernel::{Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
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
        let mut out = init;
        for h in 0..2 {
            let pairs = _mm256_maddubs_epi16(w[h], x[h]);
            out[h] = _mm256_add_epi32(init[h], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step(acc: Ymm2, sw: Ymm2, d: Ymm2, p: Two) -> Ymm2 {
        Ymm2(
            _mm256_fmadd_ps(_mm256_mul_ps(sw.0, d.0), _mm256_cvtepi32_ps(p[0]), acc.0),
            _mm256_fmadd_ps(_mm256_mul_ps(sw.1, d.1), _mm256_cvtepi32_ps(p[1]), acc.1),
        )
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn split(a: Two, b: Two) -> (Two, Two) {
        let (a0, a1) = (_mm256_castsi256_ps(a[0]), _mm256_castsi256_ps(a[1]));
        let (b0, b1) = (_mm256_castsi256_ps(b[0]), _mm256_castsi256_ps(b[1]));
        let int = _mm256_castps_si256;
        (
            [int(lanes_of::<0x88>(a0, a1)), int(lanes_of::<0x88>(b0, b1))],
            [int(lanes_of::<0xDD>(a0, a1)), int(lanes_of::<0xDD>(b0, b1))],
        )
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn evens(a: Ymm2, b: Ymm2) -> Ymm2 {
        Ymm2(lanes_of::<0x88>(a.0, a.1), lanes_of::<0x88>(b.0, b.1))
    }

    #[inline(always)]
    fn prefetch(p: *const u8) {
        // Into L2, as matmul_invariant's (see PREFETCH_TILES there).
        // SAFETY: SSE is x86-64's baseline; a prefetch never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T2>(p.cast()) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_row(x: &[f32], row: Row, offset: i32) {
        activations::quantize_row(x, row, offset)
    }

    unsafe fn block<W: Format<Self>, L: Layout<Self, W>>(b: Block) {
        // SAFETY: the caller's promises, passed on.
        unsafe { block_avx2::<W, L>(b) }
    }
}

/// The even (SEL 0x88) or odd (0xDD) lanes of x‖y, in order: shufps takes
/// them per 128-bit half ([x0 x2 y0 y2 | x4 x6 y4 y6]), vpermpd puts the
/// halves' 64-bit pieces in order.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes_of<const SEL: i32>(x: __m256, y: __m256) -> __m256 {
    let v = _mm256_shuffle_ps::<SEL>(x, y);
    _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)))
}

/// 16 ymm registers: 2×2 accumulators of two each; codes, scales and mins
/// are reloaded from the stack where they do not fit.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2<W: Format<Avx2>, L: Layout<Avx2, W>>(b: Block) {
    // SAFETY: the caller's promises; the processor has these features.
    unsafe { kernel::block::<Avx2, W, L, 2, 2>(b) }
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
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller's promise.
    let bits = unsafe { u16_at(p) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The four f16 at p, widened, each over its block's 4 lanes.
///
/// # Safety
/// p valid for reads of 8 bytes.
#[inline(always)]
unsafe fn f16_quarters(p: *const u8) -> Ymm2 {
    // SAFETY: the caller's promise.
    let four = _mm256_castps128_ps256(_mm_cvtph_ps(unsafe { _mm_loadl_epi64(p.cast()) }));
    Ymm2(
        _mm256_permutevar8x32_ps(four, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)),
        _mm256_permutevar8x32_ps(four, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)),
    )
}

/// A packed quad of a 4-bit (5-bit with FIVE) type: the halves are the low
/// and the high nibbles, plus 16 where their fifth bit is set; then the
/// scales, and the mins with MIN.
///
/// # Safety
/// The quad lies at p.
#[inline(always)]
unsafe fn packed_nibbles<const FIVE: bool, const MIN: bool>(p: *const u8) -> Quad<Avx2> {
    let mask = _mm256_set1_epi8(0x0F);
    // SAFETY: the caller's promise; the offsets are inside the quad.
    unsafe {
        let (v0, v1) = (
            _mm256_loadu_si256(p.cast()),
            _mm256_loadu_si256(p.add(32).cast()),
        );
        let mut even = [_mm256_and_si256(v0, mask), _mm256_and_si256(v1, mask)];
        let mut odd = [
            _mm256_and_si256(_mm256_srli_epi16::<4>(v0), mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v1), mask),
        ];
        let mut at = 64;
        if FIVE {
            for (h, codes) in [&mut even, &mut odd].into_iter().enumerate() {
                for (i, codes) in codes.iter_mut().enumerate() {
                    *codes = _mm256_or_si256(*codes, bit_16s(u32_at(p.add(64 + 8 * h + 4 * i))));
                }
            }
            at += 16;
        }
        let zero = _mm256_setzero_ps();
        let mw = if MIN {
            f16_quarters(p.add(at + 8))
        } else {
            Ymm2(zero, zero)
        };
        Quad::new(even, odd, f16_quarters(p.add(at)), mw)
    }
}

kernel::packed_nibble_formats!(Avx2);

/// A packed Q8_0 quad: the halves as stored, the signed weights `dot` takes.
impl PackedFormat<Avx2> for Q8_0 {
    #[inline(always)]
    unsafe fn packed_quad(p: *const u8) -> Quad<Avx2> {
        // SAFETY: the quad lies at p, the caller's promise.
        unsafe {
            let even = [
                _mm256_loadu_si256(p.cast()),
                _mm256_loadu_si256(p.add(32).cast()),
            ];
            let odd = [
                _mm256_loadu_si256(p.add(64).cast()),
                _mm256_loadu_si256(p.add(96).cast()),
            ];
            let zero = _mm256_setzero_ps();
            Quad::new(even, odd, f16_quarters(p.add(128)), Ymm2(zero, zero))
        }
    }
}

/// The 4-bit codes of a 32-value block's 16 bytes at p: low nibbles, then
/// high ones.
///
/// # Safety
/// p valid for reads of 16 bytes.
#[inline(always)]
unsafe fn nibbles_16(p: *const u8) -> __m256i {
    // SAFETY: the caller's promise.
    let q = unsafe { _mm_loadu_si128(p.cast()) };
    let v = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// 16 where bit e of `bits` is set, for each byte e.
#[inline(always)]
unsafe fn bit_16s(bits: u32) -> __m256i {
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
#[inline(always)]
unsafe fn high_bits(v: __m256i, shift: i32, mask: i8) -> __m256i {
    let v = _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift));
    _mm256_slli_epi16::<4>(_mm256_and_si256(v, _mm256_set1_epi8(mask)))
}

/// A 32-value block with 4-bit codes at `a`: d at byte 0, an optional m at
/// `m`, an optional u32 of fifth bits at `qh` and 16 bytes of nibbles at
/// `qs`.
///
/// # Safety
/// The block lies at a.
#[inline(always)]
unsafe fn block32(a: *const u8, qs: usize, qh: Option<usize>, m: Option<usize>) -> Half {
    // SAFETY: the caller's promise; the offsets are inside the block.
    unsafe {
        let mut codes = nibbles_16(a.add(qs));
        if let Some(qh) = qh {
            codes = _mm256_or_si256(codes, bit_16s(u32_at(a.add(qh))));
        }
        let m = match m {
            Some(m) => f16_at(a.add(m)),
            None => 0.0,
        };
        (codes, _mm256_set1_ps(f16_at(a)), _mm256_set1_ps(m))
    }
}

/// The 32-value types with 4-bit codes: `block32` twice.
macro_rules! formats32 {
    ($($ty:ident: offset $offset:expr, m $m:expr, qh $qh:expr, qs $qs:expr;)*) => {$(
        impl Format<Avx2> for $ty {
            const TYPE: GgmlType = GgmlType::$ty;
            const OFFSET: i32 = $offset;
            const MIN: bool = {
                let m: Option<usize> = $m;
                m.is_some()
            };

            #[inline(always)]
            unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
                let size = GgmlType::$ty.type_size();
                // SAFETY: both blocks lie at row, the caller's promise.
                unsafe {
                    let a = row.add(2 * c * size);
                    join(
                        block32(a, $qs, $qh, $m),
                        block32(a.add(size), $qs, $qh, $m),
                    )
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

impl Format<Avx2> for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const OFFSET: i32 = 0;
    const MIN: bool = false;

    /// Codes are the signed weights themselves (see `dot`).
    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
        // SAFETY: both blocks lie at row, the caller's promise.
        unsafe {
            let (a, b) = (row.add(2 * c * 34), row.add(2 * c * 34 + 34));
            let zero = _mm256_setzero_ps();
            join(
                (
                    _mm256_loadu_si256(a.add(2).cast()),
                    _mm256_set1_ps(f16_at(a)),
                    zero,
                ),
                (
                    _mm256_loadu_si256(b.add(2).cast()),
                    _mm256_set1_ps(f16_at(b)),
                    zero,
                ),
            )
        }
    }

    /// |w| · (q with w's sign) = w · q, with |w| ≤ 128 and |q| ≤ 127, so
    /// maddubs's pairs stay under 2¹⁵.
    #[inline(always)]
    unsafe fn dot(init: Two, w: Two, x: Two) -> Two {
        let mut out = init;
        // SAFETY: the caller's promise (the processor has AVX2).
        unsafe {
            for h in 0..2 {
                let (w, x) = (w[h], x[h]);
                let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
                out[h] = _mm256_add_epi32(out[h], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
            }
        }
        out
    }
}

/// The 8 bytes of b as 8 f32 (exactly).
#[inline(always)]
unsafe fn bytes_to_f32(b: u64) -> __m256 {
    // SAFETY: the caller's promise (the processor has AVX2).
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(b as i64))) }
}

/// Q4_K, Q5_K: d·sc and −(dmin·m) of the 8 sub-blocks of super-block
/// `sb`, from d, dmin and the 12 bytes of 6-bit scales and mins.
///
/// # Safety
/// sb valid for reads of 16 bytes.
#[inline(always)]
unsafe fn k4_scales(sb: *const u8) -> (__m256, __m256) {
    // SAFETY: the caller's promise.
    unsafe {
        let (sc, m) = k4_scales_mins(&*sb.add(4).cast::<[u8; 12]>());
        let sw = _mm256_mul_ps(bytes_to_f32(sc), _mm256_set1_ps(f16_at(sb)));
        let m = _mm256_mul_ps(bytes_to_f32(m), _mm256_set1_ps(f16_at(sb.add(2))));
        (sw, _mm256_xor_ps(m, _mm256_set1_ps(-0.0)))
    }
}

/// Q4_K and Q5_K: sub-blocks 2t and 2t+1 of super-block c / 4, codes the
/// low and high nibbles of qs[32t..32t+32] (qs at `qs`), plus for Q5_K bit
/// 2t or 2t+1 of qh[0..32] (at 16).
///
/// # Safety
/// The super-block lies at row.
#[inline(always)]
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
        let (sw, mw) = k4_scales(sb);
        let (ga, gb) = (
            _mm256_set1_epi32(2 * t as i32),
            _mm256_set1_epi32(2 * t as i32 + 1),
        );
        let a = (
            _mm256_permutevar8x32_ps(sw, ga),
            _mm256_permutevar8x32_ps(mw, ga),
        );
        let b = (
            _mm256_permutevar8x32_ps(sw, gb),
            _mm256_permutevar8x32_ps(mw, gb),
        );
        join((codes[0], a.0, a.1), (codes[1], b.0, b.1))
    }
}

impl Format<Avx2> for Q4_K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const OFFSET: i32 = 0;
    const MIN: bool = true;

    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
        // SAFETY: the caller's promise.
        unsafe { pair_k4(row, c, 144, 16, false) }
    }
}

impl Format<Avx2> for Q5_K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const OFFSET: i32 = 0;
    const MIN: bool = true;

    #[inline(always)]
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
    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Avx2> {
        let (t, h) = (c % 4, c % 4 / 2);
        let shift = 4 * (t % 2) as i32;
        // SAFETY: the super-block lies at row, the caller's promise.
        unsafe {
            let sb = row.add(c / 4 * 210);
            let qh = _mm256_loadu_si256(sb.add(128 + 32 * h).cast());
            let mut codes = [_mm256_setzero_si256(); 2];
            for (half, codes) in codes.iter_mut().enumerate() {
                let ql = _mm256_loadu_si256(sb.add(64 * h + 32 * half).cast());
                let lo = _mm256_srl_epi16(ql, _mm_cvtsi32_si128(shift));
                let lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
                *codes = _mm256_or_si256(lo, high_bits(qh, shift + 2 * half as i32, 3));
            }
            let d = f16_at(sb.add(208));
            let sc = _mm_cvtepi8_epi32(_mm_cvtsi32_si128(u32_at(sb.add(192 + 4 * t)) as i32));
            let sw = _mm256_castps128_ps256(_mm_mul_ps(_mm_set1_ps(d), _mm_cvtepi32_ps(sc)));
            let first = _mm256_permutevar8x32_ps(sw, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
            let second = _mm256_permutevar8x32_ps(sw, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
            let zero = _mm256_setzero_ps();
            join((codes[0], first, zero), (codes[1], second, zero))
        }
    }
}
