//! A batch-invariant matrix product: out[n, m] = x[n, k] · w[m, k]ᵀ where
//! every output element is computed by one fixed arithmetic that depends
//! only on its x row, its w row and k — never on n, m, the other rows, the
//! thread count or the processor's vector width. A sequence served in a
//! batch then gets the same bits as served alone (`Backend::matmul_nt_invariant`).
//!
//! The arithmetic of out[i, j] = dot(a, b), a = x[i], b = w[j]:
//! - 16 lane accumulators, all +0.0; lane l takes, for each chunk c of 16 in
//!   order, acc[l] = fma(a[16c + l], b[16c + l], acc[l]). A last partial
//!   chunk is read as if both rows were padded with zeros to a multiple of 16.
//! - then a fixed pairwise tree: acc[l] += acc[l + 8] for l < 8, then
//!   l + 4, l + 2, l + 1; the result is acc[0].
//!
//! fma rounds once, so this is a definition, not a hint: AVX-512 (one zmm per
//! accumulator), AVX2 + FMA (two ymm: lanes 0–7 and 8–15) and the portable
//! build (`f32::mul_add`, a libm call where the processor has no FMA) give
//! the same bits, so results also agree across machines. The three share
//! one generic tile loop over each set's 16-lane values (`Lanes`) and are
//! picked at run time (`Isa::detect`); they differ only in the tile of
//! outputs computed at once (`block_avx512`, `block_avx2`), which changes
//! which products are in flight together, never an element's order of
//! operations. (NaN results may differ in their payload bits only.)
//!
//! Speed: an R×C tile of outputs keeps R·C accumulators in registers; each
//! chunk loads R chunks of x and C of w for R·C fused multiply-adds. Tasks
//! are blocks of rows × blocks of columns of out (about `W_BLOCK_BYTES` of
//! w); within one, each column tile's C rows of w stay in L1 while the row
//! tiles pass over them, and later tiles' weights are asked for into L2
//! meanwhile (`PREFETCH_TILES`). A decode step (n ≤ `ROW_BLOCK`) has one
//! block of rows, so each weight row is streamed from memory once per call
//! and used for all n rows.

use super::matmul::SendPtr;
use rayon::prelude::*;

/// Lanes of the accumulators (one AVX-512 register of f32).
pub const LANES: usize = 16;

/// 1.5 · 2²³: x + MAGIC rounds x to an integer (ties to even) for |x| ≤ 2²²
/// and keeps it in the low bits (`Lanes::ldexp_magic`).
pub(super) const MAGIC: f32 = 12_582_912.0;

/// The instruction sets the kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    /// The build's baseline: whatever the target has, `mul_add` as a call
    /// where it has no FMA instruction.
    Portable,
}

impl Isa {
    /// The fastest set this processor has.
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this processor can run `self`.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            Isa::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Bytes of w per task's column block: small enough to stay in L1 beside a
/// tile of x (48 KiB on Zen 5; 24–32 KiB measured best there, 96 KiB about
/// 10% slower at 256 rows), large enough that a task's scheduling and its
/// pass over x are small next to its multiply-adds.
const W_BLOCK_BYTES: usize = 32 * 1024;

/// Rows of x per task: a decode step's few rows are one block, so the
/// weights are read once; many rows split further for more tasks.
const ROW_BLOCK: usize = 64;

/// Column tiles of weights asked for ahead of the one being read (a tile's
/// C rows are contiguous, so this is the same place in a later tile). Into
/// L2 (`prefetch`): asked into L1, the lines in flight are too few for
/// memory's bandwidth (one thread streamed 15 GB/s of the 31 it can read
/// on the 2-core Zen 5 VM; into L2, 24).
const PREFETCH_TILES: usize = 2;

/// out[n, m] = x[n, k] · w[m, k]ᵀ, all row-major, batch-invariant (see the
/// module doc), with the fastest instruction set of this processor.
pub fn matmul_nt_invariant(out: &mut [f32], x: &[f32], w: &[f32], n: usize, m: usize, k: usize) {
    matmul_nt_invariant_with(Isa::detect(), out, x, w, n, m, k);
}

/// [`matmul_nt_invariant`] with the given instruction set (tests compare
/// them). Panics if the processor lacks it.
pub fn matmul_nt_invariant_with(
    isa: Isa,
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    m: usize,
    k: usize,
) {
    assert!(w.len() >= m * k);
    // SAFETY: w holds m·k floats (asserted).
    unsafe { matmul_nt_invariant_elems(isa, out, x, w.as_ptr(), n, m, k) }
}

/// [`matmul_nt_invariant_with`] for weights of any `Elem` type, each widened
/// exactly to f32 as it is loaded: the same arithmetic on the widened
/// values, so a bf16 or f16 matrix gives the bits of its f32 copy without
/// the copy. Panics if the processor lacks `isa`.
///
/// # Safety
/// w valid for reads of m·k elements (unaligned is fine).
pub(super) unsafe fn matmul_nt_invariant_elems<W: Elem>(
    isa: Isa,
    out: &mut [f32],
    x: &[f32],
    w: *const W,
    n: usize,
    m: usize,
    k: usize,
) {
    assert!(
        isa.available(),
        "{isa:?} is not available on this processor"
    );
    assert!(out.len() >= n * m && x.len() >= n * k);
    if n == 0 || m == 0 {
        return;
    }
    // A whole number of the widest tile (4 columns), at least one tile.
    let cols = (W_BLOCK_BYTES / (std::mem::size_of::<W>() * k.max(1)) / 4 * 4).max(4);
    let col_blocks = m.div_ceil(cols);
    let dst = SendPtr(out.as_mut_ptr());
    let w = SendPtr(w.cast_mut());
    (0..n.div_ceil(ROW_BLOCK) * col_blocks)
        .into_par_iter()
        .for_each(|task| {
            let (i0, j0) = (task / col_blocks * ROW_BLOCK, task % col_blocks * cols);
            let (rows, width) = (ROW_BLOCK.min(n - i0), cols.min(m - j0));
            // SAFETY: the task writes out[i, j] for i in i0..i0+rows, j in
            // j0..j0+width only (row stride m), disjoint from every other
            // task's block; it reads rows i0..i0+rows of x and j0..j0+width
            // of w, all inside the lengths asserted or promised above; the
            // processor has `isa` (asserted above).
            unsafe {
                block(
                    isa,
                    Block {
                        out: dst.get().add(i0 * m + j0),
                        ldo: m,
                        x: x.as_ptr().add(i0 * k),
                        rows,
                        w: w.get().add(j0 * k).cast_const(),
                        cols: width,
                        k,
                    },
                )
            }
        });
}

/// A weight element the product reads: loaded 16 at a time into f32 lanes,
/// widened exactly.
///
/// # Safety
/// As `Lanes`: call only where the processor has V's instruction set.
pub(super) trait Elem: Copy + Send + Sync {
    /// p[0..16]; p valid for reads of 16 elements.
    unsafe fn load<V: Lanes>(p: *const Self) -> V;
    /// p[0..n] and zeros after; p valid for reads of n < 16 elements.
    unsafe fn load_part<V: Lanes>(p: *const Self, n: usize) -> V;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load<V: Lanes>(p: *const f32) -> V {
        // SAFETY: the caller's promises.
        unsafe { V::load(p) }
    }

    #[inline(always)]
    unsafe fn load_part<V: Lanes>(p: *const f32, n: usize) -> V {
        // SAFETY: the caller's promises.
        unsafe { V::load_part(p, n) }
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    unsafe fn load<V: Lanes>(p: *const Self) -> V {
        // SAFETY: the caller's promises.
        unsafe { V::load_bf16(p.cast()) }
    }

    #[inline(always)]
    unsafe fn load_part<V: Lanes>(p: *const Self, n: usize) -> V {
        // SAFETY: p[..n] readable, the caller's promise; the rest is ours.
        unsafe { V::load_bf16(padded(p.cast(), n).as_ptr()) }
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    unsafe fn load<V: Lanes>(p: *const Self) -> V {
        // SAFETY: the caller's promises.
        unsafe { V::load_f16(p.cast()) }
    }

    #[inline(always)]
    unsafe fn load_part<V: Lanes>(p: *const Self, n: usize) -> V {
        // SAFETY: p[..n] readable, the caller's promise; the rest is ours.
        unsafe { V::load_f16(padded(p.cast(), n).as_ptr()) }
    }
}

/// p[..n] of 16-bit values, then zeros (+0.0 in both half formats), by
/// value: a loop, not a memcpy call between the accumulators.
///
/// # Safety
/// p valid for reads of n ≤ 16 values (unaligned is fine).
#[inline(always)]
unsafe fn padded(p: *const u16, n: usize) -> [u16; LANES] {
    let mut out = [0u16; LANES];
    for (l, o) in out.iter_mut().enumerate().take(n) {
        // SAFETY: l < n, the caller's promise.
        *o = unsafe { p.add(l).read_unaligned() };
    }
    out
}

/// One task's block: out[i, j] (row stride `ldo`) for `rows` rows of x and
/// `cols` rows of w, both of length k, contiguous.
#[derive(Clone, Copy)]
struct Block<W> {
    out: *mut f32,
    ldo: usize,
    x: *const f32,
    rows: usize,
    w: *const W,
    cols: usize,
    k: usize,
}

/// Computes block `b` with `isa`'s tiles.
///
/// # Safety
/// b.x and b.w valid for reads of rows·k and cols·k floats, b.out for
/// writes at out[i·ldo + j] for i < rows, j < cols; the processor has `isa`.
unsafe fn block<W: Elem>(isa: Isa, b: Block<W>) {
    // SAFETY: the caller's promises, passed on.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::block_avx512::<W>(b),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::block_avx2::<W>(b),
            _ => block_tiles::<[f32; LANES], W, 2, 2>(b),
        }
    }
}

/// The 16 lane accumulators of one output element in one instruction set's
/// registers, and the operations of the module's arithmetic on them (the
/// quantized products accumulate in them too, so they share the tree).
///
/// # Safety
/// Implementations for an instruction set may be called only where the
/// processor has it.
pub(super) trait Lanes: Copy {
    /// All lanes +0.0.
    unsafe fn zero() -> Self;
    /// p[0..16]; p valid for reads of 16 floats.
    unsafe fn load(p: *const f32) -> Self;
    /// acc[l] = fma(a[l], b[l], acc[l]) in every lane.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    /// The fixed pairwise tree: lanes l + 8, l + 4, l + 2, l + 1 into lane 0.
    unsafe fn reduce(self) -> f32;

    /// p[0..n] and zeros after; p valid for reads of n < 16 floats.
    unsafe fn load_part(p: *const f32, n: usize) -> Self;
    /// 16 bf16 values at p (unaligned), widened exactly.
    unsafe fn load_bf16(p: *const u16) -> Self;
    /// 16 f16 values at p (unaligned), widened exactly.
    unsafe fn load_f16(p: *const u16) -> Self;
    /// x in every lane.
    unsafe fn splat(x: f32) -> Self;
    /// Per lane `if self > b { self } else { b }` (so b where self is NaN).
    unsafe fn max(self, b: Self) -> Self;
    /// Per lane self · 2ⁿ with n = bits(t) − bits(1.5·2²³): the integer a
    /// `t = x + 1.5·2²³` rounding left in t's low bits, added to self's
    /// exponent field (exact while the result stays normal).
    unsafe fn ldexp_magic(self, t: Self) -> Self;
    /// Lanes 0..n to p[0..n]; p valid for writes of n ≤ 16 floats.
    unsafe fn store_part(self, p: *mut f32, n: usize);

    /// `reduce` of four accumulators, for sets that can do them together.
    #[inline(always)]
    unsafe fn reduce4(v: [Self; 4]) -> [f32; 4] {
        // SAFETY: the caller's promise (the processor has the set).
        v.map(|v| unsafe { v.reduce() })
    }
}

/// The portable version: the definition itself, lane by lane.
impl Lanes for [f32; LANES] {
    #[inline(always)]
    unsafe fn zero() -> Self {
        [0.0; LANES]
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: 16 floats at p, the caller's promise.
        unsafe { p.cast::<Self>().read_unaligned() }
    }

    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> Self {
        // SAFETY: p[..n] is inside the row, the caller's promise.
        std::array::from_fn(|l| if l < n { unsafe { *p.add(l) } } else { 0.0 })
    }

    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        // SAFETY: 16 values at p, the caller's promise.
        std::array::from_fn(|l| f32::from_bits((unsafe { p.add(l).read_unaligned() } as u32) << 16))
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        // SAFETY: 16 values at p, the caller's promise.
        std::array::from_fn(|l| half::f16::from_bits(unsafe { p.add(l).read_unaligned() }).to_f32())
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        [x; LANES]
    }

    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        std::array::from_fn(|l| if self[l] > b[l] { self[l] } else { b[l] })
    }

    #[inline(always)]
    unsafe fn ldexp_magic(self, t: Self) -> Self {
        std::array::from_fn(|l| {
            let n = t[l].to_bits().wrapping_sub(MAGIC.to_bits());
            f32::from_bits(self[l].to_bits().wrapping_add(n << 23))
        })
    }

    #[inline(always)]
    unsafe fn store_part(self, p: *mut f32, n: usize) {
        // SAFETY: p[..n] is writable, the caller's promise.
        unsafe { p.copy_from_nonoverlapping(self.as_ptr(), n) }
    }

    #[inline(always)]
    unsafe fn fma(mut self, a: Self, b: Self) -> Self {
        for l in 0..LANES {
            self[l] = a[l].mul_add(b[l], self[l]);
        }
        self
    }

    #[inline(always)]
    unsafe fn reduce(mut self) -> f32 {
        let mut half = LANES / 2;
        while half > 0 {
            for l in 0..half {
                self[l] += self[l + half];
            }
            half /= 2;
        }
        self[0]
    }
}

/// The block in tiles of R rows × C columns, a column tile's row tiles in
/// turn (the last rows in one smaller tile, the last columns one at a
/// time). While its first row tile reads a column tile's weights, it asks
/// for a later column tile's (past the block: the next task's), so the
/// other row tiles compute while those arrive: with a few rows (a batched
/// decode step) memory and arithmetic overlap instead of taking turns.
///
/// # Safety
/// As [`block`], with the processor having V's instruction set.
#[inline(always)]
unsafe fn block_tiles<V: Lanes, W: Elem, const R: usize, const C: usize>(b: Block<W>) {
    let Block {
        out,
        ldo,
        x,
        rows,
        w,
        cols,
        k,
    } = b;
    // SAFETY: tiles stay inside the block: rows i..i+r ≤ rows, columns
    // j..j+C ≤ cols (or j < cols for the single columns); prefetches are
    // hints, never dereferenced.
    unsafe {
        let column = |j: usize, c: usize| {
            let mut i = 0;
            while i < rows {
                let (o, xi) = (out.add(i * ldo + j), x.add(i * k));
                let wj = w.add(j * k);
                let ahead = (i == 0).then(|| wj.wrapping_add(PREFETCH_TILES * C * k));
                if c == C {
                    tile_rows::<V, W, R, C>(R.min(rows - i), o, ldo, xi, wj, k, ahead)
                } else {
                    tile_rows::<V, W, R, 1>(R.min(rows - i), o, ldo, xi, wj, k, ahead)
                }
                i += R;
            }
        };
        let mut j = 0;
        while j + C <= cols {
            column(j, C);
            j += C;
        }
        for j in j..cols {
            column(j, 1);
        }
    }
}

/// `tile` with r ≤ R rows (a compile-time row count per case), prefetching
/// `ahead` when given.
///
/// # Safety
/// As [`tile`] with r rows.
#[inline(always)]
unsafe fn tile_rows<V: Lanes, W: Elem, const R: usize, const C: usize>(
    r: usize,
    out: *mut f32,
    ldo: usize,
    x: *const f32,
    w: *const W,
    k: usize,
    ahead: Option<*const W>,
) {
    // SAFETY: passed on, with the row count the caller promised.
    unsafe {
        let run = |ahead| match r {
            1 => tile::<V, W, 1, C>(out, ldo, x, w, k, ahead),
            2 if R > 2 => tile::<V, W, 2, C>(out, ldo, x, w, k, ahead),
            3 if R > 3 => tile::<V, W, 3, C>(out, ldo, x, w, k, ahead),
            _ => tile::<V, W, R, C>(out, ldo, x, w, k, ahead),
        };
        match ahead {
            Some(p) => run(p),
            None => run(std::ptr::null()),
        }
    }
}

/// out[i·ldo + j] = dot(x[i], w[j]) for i < R, j < C, by the module's
/// arithmetic: all R·C accumulators in registers through the k loop. With
/// `ahead` not null, each chunk also asks for the cache line at the same
/// place in `ahead`'s C rows.
///
/// # Safety
/// x valid for reads of R rows of k, w of C rows, out for writes at
/// i·ldo + j; the processor has V's instruction set. `ahead` is only
/// prefetched, so it may point anywhere.
// Indices i (row), j (column) name the accumulator tile's cells plainly.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile<V: Lanes, W: Elem, const R: usize, const C: usize>(
    out: *mut f32,
    ldo: usize,
    x: *const f32,
    w: *const W,
    k: usize,
    ahead: *const W,
) {
    // SAFETY (whole body): chunk c of a row (c·16 + 16 ≤ k) and its last
    // `rest` elements lie inside the row; the rest is the caller's promise.
    unsafe {
        let mut acc = [[V::zero(); C]; R];
        let full = k / LANES;
        for c in 0..full {
            let xs: [V; R] = std::array::from_fn(|i| V::load(x.add(i * k + c * LANES)));
            for j in 0..C {
                if !ahead.is_null() {
                    prefetch(ahead.wrapping_add(j * k + c * LANES));
                }
                let wv = W::load::<V>(w.add(j * k + c * LANES));
                for i in 0..R {
                    acc[i][j] = acc[i][j].fma(xs[i], wv);
                }
            }
        }
        // The last chunk, padded with zeros: fma(0, 0, acc) = acc exactly (acc
        // is never −0: it starts at +0, and a sum is −0 only if both terms
        // are), so the padding changes no bit.
        let rest = k - full * LANES;
        if rest > 0 {
            let at = full * LANES;
            let xs: [V; R] = std::array::from_fn(|i| V::load_part(x.add(i * k + at), rest));
            for j in 0..C {
                let wv = W::load_part::<V>(w.add(j * k + at), rest);
                for i in 0..R {
                    acc[i][j] = acc[i][j].fma(xs[i], wv);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let o = out.add(i * ldo);
            if C == 4 {
                let sums = V::reduce4([acc[0], acc[1], acc[2], acc[3]]);
                o.copy_from_nonoverlapping(sums.as_ptr(), 4);
            } else {
                for (j, acc) in acc.iter().enumerate() {
                    *o.add(j) = acc.reduce();
                }
            }
        }
    }
}

/// Asks for the cache line holding p into L2: a hint, which never faults.
#[inline(always)]
pub(super) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching reads nothing architecturally; SSE is baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T2};
        _mm_prefetch::<_MM_HINT_T2>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The x86-64 versions: the generic code compiled with AVX-512 or AVX2 + FMA
/// enabled, on registers of those instruction sets.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{block_tiles, Block, Elem, Lanes, MAGIC};
    use std::arch::x86_64::*;

    /// 32 zmm registers: 4×4 accumulators, 4 chunks of x, one of w. (6×4
    /// spilled accumulators and ran 40% slower; 5×4 ran no faster.)
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn block_avx512<W: Elem>(b: Block<W>) {
        // SAFETY: the caller's promises; the processor has AVX-512F.
        unsafe { block_tiles::<Zmm, W, 4, 4>(b) }
    }

    /// 16 ymm registers, two per accumulator: 2×3 accumulators (12), and
    /// halves of x and w in the other four.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block_avx2<W: Elem>(b: Block<W>) {
        // SAFETY: the caller's promises; the processor has AVX2, FMA and F16C.
        unsafe { block_tiles::<Ymm2, W, 2, 3>(b) }
    }

    /// 16 lanes in one AVX-512 register.
    #[derive(Clone, Copy)]
    pub(in crate::backend::cpu) struct Zmm(pub(in crate::backend::cpu) __m512);

    impl Lanes for Zmm {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn zero() -> Self {
            Zmm(_mm512_setzero_ps())
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: 16 floats at p, the caller's promise.
            Zmm(unsafe { _mm512_loadu_ps(p) })
        }

        /// A masked load: lanes n.. read nothing (no fault past the row)
        /// and are zero. No call (a memcpy would clobber the accumulators).
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_part(p: *const f32, n: usize) -> Self {
            // SAFETY: only lanes under the mask, p[..n], are read.
            Zmm(unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p) })
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_bf16(p: *const u16) -> Self {
            // SAFETY: 16 values at p, the caller's promise.
            let h = unsafe { _mm256_loadu_si256(p.cast()) };
            Zmm(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                _mm512_cvtepu16_epi32(h),
            )))
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: 16 values at p, the caller's promise.
            Zmm(_mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.cast()) }))
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(x: f32) -> Self {
            Zmm(_mm512_set1_ps(x))
        }

        /// vmaxps returns its second operand unless the first is greater.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn max(self, b: Self) -> Self {
            Zmm(_mm512_max_ps(self.0, b.0))
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn ldexp_magic(self, t: Self) -> Self {
            let magic = _mm512_set1_epi32(MAGIC.to_bits() as i32);
            let n = _mm512_sub_epi32(_mm512_castps_si512(t.0), magic);
            let bits = _mm512_add_epi32(_mm512_castps_si512(self.0), _mm512_slli_epi32::<23>(n));
            Zmm(_mm512_castsi512_ps(bits))
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store_part(self, p: *mut f32, n: usize) {
            let mask = if n >= 16 {
                u16::MAX
            } else {
                ((1u32 << n) - 1) as u16
            };
            // SAFETY: only lanes under the mask, p[..n], are written.
            unsafe { _mm512_mask_storeu_ps(p, mask, self.0) }
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Zmm(_mm512_fmadd_ps(a.0, b.0, self.0))
        }

        /// The tree of `reduce` for four accumulators at once, each step's
        /// additions done for all four in one instruction: the same pairs
        /// added, so the same bits.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn reduce4(v: [Self; 4]) -> [f32; 4] {
            let [a, b, c, d] = v.map(|v| v.0);
            // l + 8: blocks 0 + 2 and 1 + 3 of each → [a8, b8], [c8, d8].
            let ab = _mm512_add_ps(Self::blocks::<0x44>(a, b), Self::blocks::<0xEE>(a, b));
            let cd = _mm512_add_ps(Self::blocks::<0x44>(c, d), Self::blocks::<0xEE>(c, d));
            // l + 4: blocks 0 + 1 of each 8 → [a4, b4, c4, d4].
            let s4 = _mm512_add_ps(Self::blocks::<0x88>(ab, cd), Self::blocks::<0xDD>(ab, cd));
            // l + 2, then l + 1, inside each block (addition commutes bit
            // for bit, so lane 2's s4[2] + s4[0] is lane 0's sum too).
            let s2 = _mm512_add_ps(s4, _mm512_permute_ps::<0x4E>(s4));
            let s1 = _mm512_add_ps(s2, _mm512_permute_ps::<0xB1>(s2));
            // Lane 0 of each block.
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
            let sums = _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, s1));
            let mut out = [0.0f32; 4];
            // SAFETY: out holds 4 floats.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
            out
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn reduce(self) -> f32 {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
            // SAFETY: the lanes 8..16, taken above, and 0..8 as one ymm.
            unsafe { Ymm2(_mm512_castps512_ps256(self.0), hi).reduce() }
        }
    }

    impl Zmm {
        /// Blocks (of 4 lanes) p, q of a and r, s of b: [a.p, a.q, b.r, b.s].
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn blocks<const PQRS: i32>(a: __m512, b: __m512) -> __m512 {
            _mm512_shuffle_f32x4::<PQRS>(a, b)
        }
    }

    /// 16 lanes in two AVX registers: lanes 0..8 and 8..16.
    #[derive(Clone, Copy)]
    pub(in crate::backend::cpu) struct Ymm2(
        pub(in crate::backend::cpu) __m256,
        pub(in crate::backend::cpu) __m256,
    );

    impl Lanes for Ymm2 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn zero() -> Self {
            Ymm2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: 16 floats at p, the caller's promise.
            unsafe { Ymm2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }

        /// Masked loads: lanes n.. read nothing and are zero.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_part(p: *const f32, n: usize) -> Self {
            // Lane l is loaded where its mask's sign bit is set: l < n.
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let n = _mm256_set1_epi32(n as i32);
            let lo = _mm256_cmpgt_epi32(n, lanes);
            let hi = _mm256_cmpgt_epi32(n, _mm256_add_epi32(lanes, _mm256_set1_epi32(8)));
            // SAFETY: only lanes under the masks, p[..n], are read.
            unsafe { Ymm2(_mm256_maskload_ps(p, lo), _mm256_maskload_ps(p.add(8), hi)) }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_bf16(p: *const u16) -> Self {
            // SAFETY: 16 values at p, the caller's promise.
            let (lo, hi) = unsafe { (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(8).cast())) };
            let widen = |h| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
            Ymm2(widen(lo), widen(hi))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: 16 values at p, the caller's promise.
            let (lo, hi) = unsafe { (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(8).cast())) };
            Ymm2(_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn splat(x: f32) -> Self {
            Ymm2(_mm256_set1_ps(x), _mm256_set1_ps(x))
        }

        /// vmaxps returns its second operand unless the first is greater.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn max(self, b: Self) -> Self {
            Ymm2(_mm256_max_ps(self.0, b.0), _mm256_max_ps(self.1, b.1))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn ldexp_magic(self, t: Self) -> Self {
            let magic = _mm256_set1_epi32(MAGIC.to_bits() as i32);
            let half = |p: __m256, t: __m256| {
                let n = _mm256_sub_epi32(_mm256_castps_si256(t), magic);
                let bits = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32::<23>(n));
                _mm256_castsi256_ps(bits)
            };
            Ymm2(half(self.0, t.0), half(self.1, t.1))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store_part(self, p: *mut f32, n: usize) {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let n = _mm256_set1_epi32(n as i32);
            let lo = _mm256_cmpgt_epi32(n, lanes);
            let hi = _mm256_cmpgt_epi32(n, _mm256_add_epi32(lanes, _mm256_set1_epi32(8)));
            // SAFETY: only lanes under the masks, p[..n], are written.
            unsafe {
                _mm256_maskstore_ps(p, lo, self.0);
                _mm256_maskstore_ps(p.add(8), hi, self.1);
            }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Ymm2(
                _mm256_fmadd_ps(a.0, b.0, self.0),
                _mm256_fmadd_ps(a.1, b.1, self.1),
            )
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn reduce(self) -> f32 {
            // Lane l of each step: s8 = a[l] + a[l+8], s4 = s8[l] + s8[l+4],
            // s2 = s4[l] + s4[l+2], then s2[0] + s2[1].
            let s8 = _mm256_add_ps(self.0, self.1);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
            _mm_cvtss_f32(s1)
        }
    }
}
