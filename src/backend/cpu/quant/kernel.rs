//! The one tile loop every instruction set runs, generic over its registers
//! (`Simd`) and over how a weight type unpacks a pair of blocks (`Format`).
//! The arithmetic it performs per output is the module doc's of `quant`;
//! the sets differ only in the tile of outputs in flight together.

use super::activations::{Acts, BLOCK, GROUP, PAIR};
use crate::backend::cpu::matmul_invariant::Lanes;
use crate::quant::GgmlType;

/// Lanes per pair of blocks (one accumulator).
pub(super) const LANES: usize = PAIR / GROUP;

/// One instruction set's registers for a pair of blocks.
///
/// # Safety
/// Its functions may be called only where the processor has the set.
pub(super) trait Simd: Sized {
    /// 64 codes: a pair of blocks of weights (unsigned) or activations.
    type Bytes: Copy;
    /// 16 i32 lanes.
    type Ints: Copy;
    /// 16 f32 lanes: matmul_invariant's accumulators, so its tree too.
    type Floats: Lanes;

    /// p[0..64]; p valid for reads of 64 bytes.
    unsafe fn load_bytes(p: *const i8) -> Self::Bytes;
    /// p[0..16]; p valid for reads of 16 i32.
    unsafe fn load_ints(p: *const i32) -> Self::Ints;
    unsafe fn zero_ints() -> Self::Ints;
    /// init + Σ of w·x over each lane's 4 bytes, w unsigned, x signed.
    unsafe fn dot(init: Self::Ints, w: Self::Bytes, x: Self::Bytes) -> Self::Ints;
    /// fma(sw · d, f32(p), acc) in every lane.
    unsafe fn step(
        acc: Self::Floats,
        sw: Self::Floats,
        d: Self::Floats,
        p: Self::Ints,
    ) -> Self::Floats;
    /// Asks for the cache line at p, a hint that never faults.
    fn prefetch(p: *const u8);
    /// Computes `b` with this set's tiles (a function compiled for the set).
    unsafe fn block<W: Format<Self>>(b: Block);
}

/// A pair of weight blocks unpacked: codes, and per lane the scale and the
/// min (zero for types without one).
pub(super) struct Unpacked<S: Simd> {
    pub codes: S::Bytes,
    pub sw: S::Floats,
    pub mw: S::Floats,
}

// Clone and Copy by hand: a derive would ask S itself to be Copy.
impl<S: Simd> Clone for Unpacked<S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S: Simd> Copy for Unpacked<S> {}

/// How one weight type's pairs of blocks unpack in one instruction set.
///
/// # Safety
/// As `Simd`.
pub(super) trait Format<S: Simd> {
    const TYPE: GgmlType;
    /// What `unpack`'s codes exceed the integer weights by.
    const OFFSET: i32;
    /// Whether the type has a min (`Unpacked::mw`).
    const MIN: bool;
    /// Pair `c` (values 64c..64c+64) of the row at `row`, which holds it.
    unsafe fn unpack(row: *const u8, c: usize) -> Unpacked<S>;
    /// The lane sums of integer weights times codes, from `init` (the
    /// activations' −OFFSET · Σ q): `Simd::dot`, unless a set does it
    /// otherwise.
    #[inline(always)]
    unsafe fn dot(init: S::Ints, w: S::Bytes, x: S::Bytes) -> S::Ints {
        // SAFETY: the caller's promise (the processor has S).
        unsafe { S::dot(init, w, x) }
    }
}

/// Marker types of the weight formats the integer kernels take.
#[allow(non_camel_case_types)]
pub(super) struct Q8_0;
#[allow(non_camel_case_types)]
pub(super) struct Q4_0;
#[allow(non_camel_case_types)]
pub(super) struct Q4_1;
#[allow(non_camel_case_types)]
pub(super) struct Q5_0;
#[allow(non_camel_case_types)]
pub(super) struct Q5_1;
#[allow(non_camel_case_types)]
pub(super) struct Q4_K;
#[allow(non_camel_case_types)]
pub(super) struct Q5_K;
#[allow(non_camel_case_types)]
pub(super) struct Q6_K;

/// One task: out[i, j] (row stride `ldo`) for activation rows
/// row0..row0+rows and weight rows w[0..cols] (`row_bytes` apart).
#[derive(Clone, Copy)]
pub(super) struct Block<'a> {
    pub out: *mut f32,
    pub ldo: usize,
    pub acts: &'a Acts,
    pub row0: usize,
    pub rows: usize,
    pub w: *const u8,
    pub row_bytes: usize,
    pub cols: usize,
    /// Values per row (a multiple of the type's block size).
    pub k: usize,
}

/// Block `b` in tiles of R rows × C columns (the last columns one at a
/// time, the last rows in one smaller tile). With several row tiles
/// (prefill), each column tile's pairs are unpacked once into a buffer and
/// read back by every row tile; with one (decode), as they are used.
///
/// # Safety
/// b.out valid for writes at out[i·ldo + j], i < rows, j < cols; b.w for
/// reads of cols rows of row_bytes, each k values of W; rows row0.. of
/// b.acts exist; the processor has S.
#[inline(always)]
pub(super) unsafe fn block<S: Simd, W: Format<S>, const R: usize, const C: usize>(b: Block) {
    let pairs = (b.k / BLOCK).div_ceil(2);
    let mut buf = Vec::with_capacity(if b.rows > R { C * pairs } else { 0 });
    let mut j = 0;
    // SAFETY: each column tile lies inside the block.
    unsafe {
        while j + C <= b.cols {
            columns::<S, W, R, C>(b, j, &mut buf);
            j += C;
        }
        for j in j..b.cols {
            columns::<S, W, R, 1>(b, j, &mut buf);
        }
    }
}

/// Columns j..j+C of the block, all its rows.
///
/// # Safety
/// Columns j..j+C inside the block; the rest as [`block`].
#[inline(always)]
unsafe fn columns<S: Simd, W: Format<S>, const R: usize, const C: usize>(
    b: Block,
    j: usize,
    buf: &mut Vec<Unpacked<S>>,
) {
    let blocks = b.k / BLOCK;
    let rows = Rows {
        // SAFETY: rows j..j+C of w are inside the block (the caller's promise).
        w: std::array::from_fn(|c| unsafe { b.w.add((j + c) * b.row_bytes) }),
        pairs: blocks / 2,
        // Each row advances `step` bytes a pair; reading ahead keeps enough
        // misses in flight for memory's bandwidth (unpacking is too much
        // work a byte for the processor's window to do it alone).
        step: b.row_bytes * 2 / blocks,
        ahead: PREFETCH_TILES * C * b.row_bytes,
    };
    let tail = blocks % 2 == 1;
    // SAFETY (whole body): the tiles' rows lie in the block, the buffer
    // holds every pair; the rest is the caller's promise.
    unsafe {
        if b.rows <= R {
            tile_rows::<S, W, _, R, C>(b, b.rows, 0, j, tail, &rows);
            return;
        }
        buf.clear();
        for p in 0..rows.pairs {
            buf.extend_from_slice(&Source::<S, W, C>::pair(&rows, p));
        }
        if tail {
            buf.extend_from_slice(&Source::<S, W, C>::last(&rows));
        }
        let unpacked = Buffer::<S, C>(buf.as_ptr(), rows.pairs);
        let mut i = 0;
        while i < b.rows {
            tile_rows::<S, W, _, R, C>(b, R.min(b.rows - i), i, j, tail, &unpacked);
            i += R;
        }
    }
}

/// Where a tile takes the unpacked weights of its C columns.
trait Source<S: Simd, W: Format<S>, const C: usize> {
    /// Pair p of the whole pairs of blocks.
    unsafe fn pair(&self, p: usize) -> [Unpacked<S>; C];
    /// The last block alone, as a pair with a zero block.
    unsafe fn last(&self) -> [Unpacked<S>; C];
}

/// The C rows of weights themselves.
struct Rows<const C: usize> {
    w: [*const u8; C],
    /// Whole pairs of blocks per row.
    pairs: usize,
    /// Bytes a pair.
    step: usize,
    /// Bytes read ahead.
    ahead: usize,
}

impl<S: Simd, W: Format<S>, const C: usize> Source<S, W, C> for Rows<C> {
    #[inline(always)]
    unsafe fn pair(&self, p: usize) -> [Unpacked<S>; C] {
        for w in self.w {
            S::prefetch(w.wrapping_add(p * self.step + self.ahead));
        }
        // SAFETY: the rows hold pair p (the caller's promise).
        unsafe { unpack_all::<S, W, C>(&self.w, p) }
    }

    /// A copy of the last block followed by a zero block, whose scale and
    /// min are 0 and whose activations are the zero pad, so its lanes add
    /// exactly nothing (fma(±0, 0, acc) = acc; acc is never −0). Only
    /// 32-value types have an odd number of blocks.
    #[inline(always)]
    unsafe fn last(&self) -> [Unpacked<S>; C] {
        let size = W::TYPE.type_size();
        let at = 2 * self.pairs * size;
        let padded: [[u8; 2 * MAX_BLOCK_BYTES]; C] = std::array::from_fn(|c| {
            let mut buf = [0u8; 2 * MAX_BLOCK_BYTES];
            // SAFETY: the row's last block (the caller's promise).
            buf[..size]
                .copy_from_slice(unsafe { std::slice::from_raw_parts(self.w[c].add(at), size) });
            buf
        });
        let at: [*const u8; C] = std::array::from_fn(|c| padded[c].as_ptr());
        // SAFETY: each copy holds a pair of blocks.
        unsafe { unpack_all::<S, W, C>(&at, 0) }
    }
}

/// Pairs unpacked by `Rows` into a buffer: pair p of column c at p·C + c,
/// the last block alone after the whole pairs.
struct Buffer<S: Simd, const C: usize>(*const Unpacked<S>, usize);

impl<S: Simd, W: Format<S>, const C: usize> Source<S, W, C> for Buffer<S, C> {
    #[inline(always)]
    unsafe fn pair(&self, p: usize) -> [Unpacked<S>; C] {
        // SAFETY: the buffer holds pair p (the caller's promise).
        unsafe { self.0.add(p * C).cast::<[Unpacked<S>; C]>().read() }
    }

    #[inline(always)]
    unsafe fn last(&self) -> [Unpacked<S>; C] {
        // SAFETY: the buffer holds the last block after the pairs.
        unsafe { Source::<S, W, C>::pair(self, self.1) }
    }
}

/// `tile` with r ≤ R rows (a compile-time row count per case).
///
/// # Safety
/// As [`tile`] with r rows.
#[inline(always)]
unsafe fn tile_rows<S: Simd, W: Format<S>, Src: Source<S, W, C>, const R: usize, const C: usize>(
    b: Block,
    r: usize,
    i: usize,
    j: usize,
    tail: bool,
    src: &Src,
) {
    // SAFETY: passed on, with the row count the caller promised (the
    // last arm only for r = R: a smaller r there would write past the block).
    unsafe {
        match r {
            1 => tile::<S, W, Src, 1, C>(b, i, j, tail, src),
            2 if R > 2 => tile::<S, W, Src, 2, C>(b, i, j, tail, src),
            3 if R > 3 => tile::<S, W, Src, 3, C>(b, i, j, tail, src),
            _ => {
                assert_eq!(r, R, "tiles have at most 4 rows or exactly R");
                tile::<S, W, Src, R, C>(b, i, j, tail, src)
            }
        }
    }
}

/// out for rows i..i+R and columns j..j+C of the block: all R·C
/// accumulators in registers through the pairs of blocks.
///
/// # Safety
/// Rows i..i+R and columns j..j+C inside the block, `src` holding their
/// weights (with a last block alone where `tail`); the rest as [`block`].
#[inline(always)]
unsafe fn tile<S: Simd, W: Format<S>, Src: Source<S, W, C>, const R: usize, const C: usize>(
    b: Block,
    i: usize,
    j: usize,
    tail: bool,
    src: &Src,
) {
    let a = b.acts;
    let rows: [usize; R] = std::array::from_fn(|r| b.row0 + i + r);
    let pairs = b.k / BLOCK / 2;
    // SAFETY (whole body): pair p of an activation row is inside kp;
    // out[(i + r)·ldo + j + c] is in the block; the rest is the caller's
    // promise.
    unsafe {
        let mut acc = [[S::Floats::zero(); C]; R];
        for p in 0..pairs {
            acc = pair::<S, W, R, C>(acc, &src.pair(p), a, &rows, p);
        }
        if tail {
            acc = pair::<S, W, R, C>(acc, &src.last(), a, &rows, pairs);
        }
        for (r, acc) in acc.iter().enumerate() {
            let o = b.out.add((i + r) * b.ldo + j);
            if C == 4 {
                let sums = S::Floats::reduce4([acc[0], acc[1], acc[2], acc[3]]);
                o.copy_from_nonoverlapping(sums.as_ptr(), 4);
            } else {
                for (c, acc) in acc.iter().enumerate() {
                    *o.add(c) = acc.reduce();
                }
            }
        }
    }
}

/// Pair p of each of the C rows at `w`. (A loop, not `array::from_fn`: a
/// closure is a function of its own, compiled without the set's features
/// unless inlined, and then every intrinsic in it is a call.)
///
/// # Safety
/// As [`Format::unpack`] for each row.
#[inline(always)]
unsafe fn unpack_all<S: Simd, W: Format<S>, const C: usize>(
    w: &[*const u8; C],
    p: usize,
) -> [Unpacked<S>; C] {
    // SAFETY: the caller's promise.
    unsafe {
        let mut ws = [W::unpack(w[0], p); C];
        for c in 1..C {
            ws[c] = W::unpack(w[c], p);
        }
        ws
    }
}

/// One step of the tile: pair `p` of its activation rows `rows` with the
/// unpacked weights `ws` into the accumulators. (By value: through a
/// reference, one of them lived on the stack, a store and a reload each
/// step.)
///
/// # Safety
/// Pair p lies inside the rows of `a`; the processor has S.
// Indices r (row), c (column) name the accumulator tile's cells plainly.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn pair<S: Simd, W: Format<S>, const R: usize, const C: usize>(
    mut acc: [[S::Floats; C]; R],
    ws: &[Unpacked<S>; C],
    a: &Acts,
    rows: &[usize; R],
    p: usize,
) -> [[S::Floats; C]; R] {
    let lanes = a.kp / GROUP;
    for r in 0..R {
        let at = rows[r] * lanes + p * LANES;
        // SAFETY: pair p of row rows[r] is inside each array (the caller's
        // promise); the processor has S.
        unsafe {
            let x = S::load_bytes(a.qs.as_ptr().add(rows[r] * a.kp + p * PAIR));
            let init = if W::OFFSET != 0 {
                S::load_ints(a.init.as_ptr().add(at))
            } else {
                S::zero_ints()
            };
            let d = S::Floats::load(a.d.as_ptr().add(at));
            let sums = S::Floats::load(a.sums.as_ptr().add(at));
            for c in 0..C {
                let dot = W::dot(init, ws[c].codes, x);
                acc[r][c] = S::step(acc[r][c], ws[c].sw, d, dot);
                if W::MIN {
                    acc[r][c] = acc[r][c].fma(ws[c].mw, sums);
                }
            }
        }
    }
    acc
}

/// The 8 six-bit scales and 8 mins of a Q4_K/Q5_K super-block from its 12
/// packed bytes, a byte each (scales, mins): `dequant::scale_min_k4` for
/// all eight at once, on 32-bit words. Sub-blocks 0..4 keep the low 6 bits
/// of bytes 0..4 (scales) and 4..8 (mins); 4..8 take the low (scales) or
/// high (mins) nibbles of bytes 8..12, and their top 2 bits from the top 2
/// bits of bytes 0..4 (scales) or 4..8 (mins).
#[inline(always)]
pub(super) fn k4_scales_mins(s: &[u8; 12]) -> (u64, u64) {
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let (low6, low4, top2) = (0x3F3F_3F3F, 0x0F0F_0F0F, 0x0303_0303);
    let sc_hi = (c & low4) | ((a >> 6) & top2) << 4;
    let m_hi = ((c >> 4) & low4) | ((b >> 6) & top2) << 4;
    let join = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
    (join(a & low6, sc_hi), join(b & low6, m_hi))
}

/// Tiles of weights read ahead (a tile's C rows are contiguous, so this
/// is the same position in a later tile's rows).
const PREFETCH_TILES: usize = 2;

/// The largest block of a 32-value type (Q8_0's 34 bytes).
const MAX_BLOCK_BYTES: usize = 34;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequant::scale_min_k4;

    /// The word arithmetic is `scale_min_k4`, on every byte pattern's bits.
    #[test]
    fn k4_scales_mins_is_scale_min_k4() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1000 {
            let s: [u8; 12] = std::array::from_fn(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            });
            let (sc, m) = k4_scales_mins(&s);
            for j in 0..8 {
                let got = ((sc >> (8 * j)) as u8, (m >> (8 * j)) as u8);
                assert_eq!(got, scale_min_k4(&s, j), "{s:?} sub-block {j}");
            }
        }
    }
}
