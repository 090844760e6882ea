//! The portable set: the arithmetic lane by lane, and each weight type's
//! pair of blocks unpacked byte by byte — the plain statement of the
//! layouts (those of `quant::dequant`) that the vector sets must match.

use super::activations::{self, split_quad, Row, QUAD};
use super::kernel::{self, Block, Format, Layout, PackedFormat, Quad, Simd, Unpacked};
use super::kernel::{LANES, PAIR};
use super::kernel::{Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
use crate::quant::dequant::scale_min_k4;
use crate::quant::GgmlType;
use half::f16;

pub(super) struct Portable;

type Floats = [f32; LANES];

impl Simd for Portable {
    type Bytes = [u8; PAIR];
    type Ints = [i32; LANES];
    type Floats = Floats;

    #[inline(always)]
    unsafe fn load_bytes(p: *const i8) -> Self::Bytes {
        // SAFETY: 64 bytes at p, the caller's promise.
        unsafe { p.cast::<Self::Bytes>().read_unaligned() }
    }

    #[inline(always)]
    unsafe fn load_ints(p: *const i32) -> Self::Ints {
        // SAFETY: 16 i32 at p, the caller's promise.
        unsafe { p.cast::<Self::Ints>().read_unaligned() }
    }

    #[inline(always)]
    unsafe fn zero_ints() -> Self::Ints {
        [0; LANES]
    }

    #[inline(always)]
    unsafe fn dot(init: Self::Ints, w: Self::Bytes, x: Self::Bytes) -> Self::Ints {
        std::array::from_fn(|l| {
            let g = 4 * l..4 * l + 4;
            let s: i32 = (w[g.clone()].iter().zip(&x[g]))
                .map(|(&w, &x)| w as i32 * x as i8 as i32)
                .sum();
            init[l] + s
        })
    }

    #[inline(always)]
    unsafe fn step(mut acc: Floats, sw: Floats, d: Floats, p: Self::Ints) -> Floats {
        for l in 0..LANES {
            acc[l] = (sw[l] * d[l]).mul_add(p[l] as f32, acc[l]);
        }
        acc
    }

    #[inline(always)]
    unsafe fn split(a: Self::Bytes, b: Self::Bytes) -> (Self::Bytes, Self::Bytes) {
        let mut both = [0u8; QUAD];
        both[..PAIR].copy_from_slice(&a);
        both[PAIR..].copy_from_slice(&b);
        let mut out = [0u8; QUAD];
        split_quad(&both, &mut out);
        (
            out[..PAIR].try_into().unwrap(),
            out[PAIR..].try_into().unwrap(),
        )
    }

    #[inline(always)]
    unsafe fn evens(a: Floats, b: Floats) -> Floats {
        std::array::from_fn(|l| {
            if l < LANES / 2 {
                a[2 * l]
            } else {
                b[2 * l - LANES]
            }
        })
    }

    #[inline(always)]
    fn prefetch(_: *const u8) {}

    #[inline(always)]
    unsafe fn quantize_row(x: &[f32], row: Row, offset: i32) {
        activations::quantize_row(x, row, offset)
    }

    unsafe fn block<W: Format<Self>, L: Layout<Self, W>>(b: Block) {
        // SAFETY: the caller's promises, passed on.
        unsafe { kernel::block::<Self, W, L, 2, 2>(b) }
    }
}

/// The bytes of the row from `at` (the caller promises they exist).
///
/// # Safety
/// `at` valid for reads of `len` bytes.
#[inline(always)]
unsafe fn bytes<'a>(at: *const u8, len: usize) -> &'a [u8] {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(at, len) }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// [a; 8] then [b; 8]: one value per block of the pair.
fn halves(a: f32, b: f32) -> Floats {
    std::array::from_fn(|l| if l < LANES / 2 { a } else { b })
}

/// Code e of a 32-value block of nibbles: low nibbles then high ones.
fn nibble(qs: &[u8], e: usize) -> u8 {
    (qs[e % 16] >> (4 * (e / 16))) & 0x0F
}

/// The 32-value types: (codes, d, m) of one block from its bytes.
fn block32(ty: GgmlType, b: &[u8]) -> ([u8; 32], f32, f32) {
    let bit =
        |qh: &[u8], e: usize| ((u32::from_le_bytes(qh[..4].try_into().unwrap()) >> e) & 1) as u8;
    let (codes, m): ([u8; 32], f32) = match ty {
        GgmlType::Q8_0 => (std::array::from_fn(|e| b[2 + e] ^ 0x80), 0.0),
        GgmlType::Q4_0 => (std::array::from_fn(|e| nibble(&b[2..], e)), 0.0),
        GgmlType::Q4_1 => (std::array::from_fn(|e| nibble(&b[4..], e)), f16_at(b, 2)),
        GgmlType::Q5_0 => (
            std::array::from_fn(|e| nibble(&b[6..], e) | bit(&b[2..], e) << 4),
            0.0,
        ),
        GgmlType::Q5_1 => (
            std::array::from_fn(|e| nibble(&b[8..], e) | bit(&b[4..], e) << 4),
            f16_at(b, 2),
        ),
        _ => unreachable!("not a 32-value type"),
    };
    (codes, f16_at(b, 0), m)
}

/// A pair of 32-value blocks (2c, 2c+1) of `W::TYPE`.
///
/// # Safety
/// Both blocks lie at row.
unsafe fn pair32<W: Format<Portable>>(row: *const u8, c: usize) -> Unpacked<Portable> {
    let size = W::TYPE.type_size();
    // SAFETY: the pair's bytes, the caller's promise.
    let b = unsafe { bytes(row.add(2 * c * size), 2 * size) };
    let (qa, da, ma) = block32(W::TYPE, &b[..size]);
    let (qb, db, mb) = block32(W::TYPE, &b[size..]);
    Unpacked {
        codes: std::array::from_fn(|e| if e < 32 { qa[e] } else { qb[e - 32] }),
        sw: halves(da, db),
        mw: halves(ma, mb),
    }
}

macro_rules! formats32 {
    ($($ty:ident: $offset:expr, $min:expr;)*) => {$(
        impl Format<Portable> for $ty {
            const TYPE: GgmlType = GgmlType::$ty;
            const OFFSET: i32 = $offset;
            const MIN: bool = $min;
            #[inline(always)]
            unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Portable> {
                // SAFETY: the caller's promise.
                unsafe { pair32::<Self>(row, c) }
            }
        }
    )*};
}

formats32! {
    Q8_0: 128, false;
    Q4_0: 8, false;
    Q4_1: 0, true;
    Q5_0: 16, false;
    Q5_1: 0, true;
}

/// 4 f16 of a packed quad (its scales or mins) at byte `at`, lane l taking
/// block l / 4's.
///
/// # Safety
/// p valid for reads of at + 8 bytes.
unsafe fn packed_scales(p: *const u8, at: usize) -> Floats {
    // SAFETY: the caller's promise.
    let s = unsafe { bytes(p.add(at), 8) };
    std::array::from_fn(|l| f16_at(s, 2 * (l / 4)))
}

/// A packed quad of a 4-bit (5-bit with FIVE) type: the halves are the low
/// and the high nibbles, plus 16 where their fifth bit is set (bit t of a
/// u64 per half); then the scales, and the mins with MIN.
///
/// # Safety
/// The quad lies at p.
unsafe fn packed_nibbles<const FIVE: bool, const MIN: bool>(p: *const u8) -> Quad<Portable> {
    let at = PAIR + if FIVE { 16 } else { 0 };
    // SAFETY: the caller's promise.
    let (v, sw) = unsafe { (bytes(p, at), packed_scales(p, at)) };
    let high = |h: usize, t: usize| match FIVE {
        true => (v[PAIR + 8 * h + t / 8] >> (t % 8) & 1) << 4,
        false => 0,
    };
    let mw = match MIN {
        // SAFETY: the caller's promise.
        true => unsafe { packed_scales(p, at + 8) },
        false => [0.0; LANES],
    };
    Quad::new(
        std::array::from_fn(|t| v[t] & 0x0F | high(0, t)),
        std::array::from_fn(|t| v[t] >> 4 | high(1, t)),
        sw,
        mw,
    )
}

kernel::packed_nibble_formats!(Portable);

/// A packed Q8_0 quad: the halves as stored, + 128 as `unpack`'s codes.
impl PackedFormat<Portable> for Q8_0 {
    unsafe fn packed_quad(p: *const u8) -> Quad<Portable> {
        // SAFETY: the quad lies at p, the caller's promise.
        let (v, sw) = unsafe { (bytes(p, 2 * PAIR), packed_scales(p, 2 * PAIR)) };
        Quad::new(
            std::array::from_fn(|t| v[t] ^ 0x80),
            std::array::from_fn(|t| v[PAIR + t] ^ 0x80),
            sw,
            [0.0; LANES],
        )
    }
}

/// Q4_K and Q5_K: sub-blocks 2t, 2t+1 of super-block c / 4 (t = c % 4),
/// scale d·sc and min −(dmin·m) each; codes from the nibbles of
/// qs[32t..32t+32] (low, then high) and, for Q5_K, bit 2t or 2t+1 of qh.
///
/// # Safety
/// The super-block lies at row.
unsafe fn pair_k4(ty: GgmlType, row: *const u8, c: usize) -> Unpacked<Portable> {
    let size = ty.type_size();
    // SAFETY: the super-block's bytes, the caller's promise.
    let b = unsafe { bytes(row.add(c / 4 * size), size) };
    let t = c % 4;
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let (qh, qs) = match ty {
        GgmlType::Q5_K => (Some(&b[16..48]), &b[48 + 32 * t..80 + 32 * t]),
        _ => (None, &b[16 + 32 * t..48 + 32 * t]),
    };
    let (sa, ma) = scale_min_k4(scales, 2 * t);
    let (sb, mb) = scale_min_k4(scales, 2 * t + 1);
    Unpacked {
        codes: std::array::from_fn(|e| {
            let (h, i) = (e / 32, e % 32);
            let high = qh.map_or(0, |qh| (qh[i] >> (2 * t + h)) & 1);
            (qs[i] >> (4 * h)) & 0x0F | high << 4
        }),
        sw: halves(d * sa as f32, d * sb as f32),
        mw: halves(-(dmin * ma as f32), -(dmin * mb as f32)),
    }
}

impl Format<Portable> for Q4_K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const OFFSET: i32 = 0;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Portable> {
        // SAFETY: the caller's promise.
        unsafe { pair_k4(GgmlType::Q4_K, row, c) }
    }
}

impl Format<Portable> for Q5_K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const OFFSET: i32 = 0;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Portable> {
        // SAFETY: the caller's promise.
        unsafe { pair_k4(GgmlType::Q5_K, row, c) }
    }
}

/// Q6_K: blocks 2t, 2t+1 (t = c % 4) of super-block c / 4, in its half
/// h = t / 2: low 4 bits from ql[64h..64h+64] shifted by 4·(t % 2), high
/// 2 bits from qh[32h..32h+32] shifted by 4·(t % 2) (first block) or
/// 4·(t % 2) + 2 (second); lanes of 16 values take scales[4t..4t+4] · d.
impl Format<Portable> for Q6_K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const OFFSET: i32 = 32;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<Portable> {
        let size = GgmlType::Q6_K.type_size();
        // SAFETY: the super-block's bytes, the caller's promise.
        let b = unsafe { bytes(row.add(c / 4 * size), size) };
        let (t, h) = (c % 4, c % 4 / 2);
        let (ql, qh) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..160 + 32 * h]);
        let d = f16_at(b, 208);
        let shift = 4 * (t % 2);
        Unpacked {
            codes: std::array::from_fn(|e| {
                let lo = (ql[e] >> shift) & 0x0F;
                let hi = (qh[e % 32] >> (shift + 2 * (e / 32))) & 0x03;
                lo | hi << 4
            }),
            sw: std::array::from_fn(|l| d * (b[192 + 4 * t + l / 4] as i8) as f32),
            mw: [0.0; LANES],
        }
    }
}
