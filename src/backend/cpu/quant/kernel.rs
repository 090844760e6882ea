//! The one tile loop every instruction set runs, generic over its registers
//! (`Simd`), over how a weight type unpacks a pair of blocks (`Format`) and
//! over the rows' layout (`Layout`: the file's blocks, or quads packed at
//! load). A step takes a quad of blocks (128 values): two pairs, split into
//! the halves the activations are stored in (`activations::split_quad`), so
//! each lane sums its 8 values with two dot products into one i32. The
//! arithmetic per output is the module doc's of `quant`; the sets differ
//! only in the tile of outputs in flight together.

use super::activations::{Acts, Row, BLOCK, GROUP, QUAD};
use super::packed;
use crate::backend::cpu::matmul_invariant::Lanes;
use crate::quant::GgmlType;
use std::marker::PhantomData;

/// Lanes per quad of blocks (one accumulator).
pub(super) const LANES: usize = QUAD / GROUP;
/// Values per pair of blocks, which `Format::unpack` gives.
pub(super) const PAIR: usize = 2 * BLOCK;

/// One instruction set's registers.
///
/// # Safety
/// Its functions may be called only where the processor has the set.
pub(super) trait Simd: Sized {
    /// 64 codes: a pair of blocks in their order, or a half of a quad.
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
    /// Two pairs' codes a, b (128 bytes in order) → the quad's halves: the
    /// even 4-byte groups of a‖b, and the odd ones.
    unsafe fn split(a: Self::Bytes, b: Self::Bytes) -> (Self::Bytes, Self::Bytes);
    /// Lanes 0, 2, 4, … of a‖b (a pair's per-4-value lanes → the quad's
    /// per-8-value lanes; both values of a lane are equal).
    unsafe fn evens(a: Self::Floats, b: Self::Floats) -> Self::Floats;
    /// Asks for the cache line at p, a hint that never faults.
    fn prefetch(p: *const u8);
    /// `activations::quantize_row` compiled for the set.
    unsafe fn quantize_row(x: &[f32], row: Row, offset: i32);
    /// Computes `b` with this set's tiles (a function compiled for the set).
    unsafe fn block<W: Format<Self>, L: Layout<Self, W>>(b: Block);
}

/// A pair of weight blocks unpacked in their order: codes, and the scale
/// and the min (zero for types without one) of each group of 4 values.
pub(super) struct Unpacked<S: Simd> {
    pub codes: S::Bytes,
    pub sw: S::Floats,
    pub mw: S::Floats,
}

/// A quad of weight blocks ready for a step: the codes' halves, and each
/// lane's scale and min.
pub(super) struct Quad<S: Simd> {
    even: S::Bytes,
    odd: S::Bytes,
    sw: S::Floats,
    mw: S::Floats,
}

// Clone and Copy by hand: a derive would ask S itself to be Copy.
impl<S: Simd> Clone for Quad<S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S: Simd> Copy for Quad<S> {}

impl<S: Simd> Quad<S> {
    /// A quad from its halves' codes and its lanes' scales and mins.
    #[inline(always)]
    pub(super) fn new(even: S::Bytes, odd: S::Bytes, sw: S::Floats, mw: S::Floats) -> Self {
        Quad { even, odd, sw, mw }
    }

    /// The quad of two unpacked pairs, a then b: their codes split into
    /// the halves, their per-4-value scales and mins to per-8-value lanes.
    ///
    /// # Safety
    /// As `Simd`: the processor has S's set.
    #[inline(always)]
    unsafe fn of(a: Unpacked<S>, b: Unpacked<S>) -> Self {
        // SAFETY: the caller's promise.
        unsafe {
            let (even, odd) = S::split(a.codes, b.codes);
            Quad {
                even,
                odd,
                sw: S::evens(a.sw, b.sw),
                mw: S::evens(a.mw, b.mw),
            }
        }
    }
}

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

/// A format the CPU keeps packed (`packed`): how a set reads a packed quad.
///
/// # Safety
/// As `Simd`.
pub(super) trait PackedFormat<S: Simd>: Format<S> {
    /// The packed quad at p (`packed::quad_bytes` bytes).
    unsafe fn packed_quad(p: *const u8) -> Quad<S>;
}

/// `PackedFormat` of the 4- and 5-bit types on the set `$set`, through the
/// set's `packed_nibbles::<FIVE, MIN>` (in scope where this is used).
macro_rules! packed_nibble_formats {
    ($set:ty) => {
        kernel::packed_nibble_formats!($set: Q4_0 false false, Q4_1 false true,
            Q5_0 true false, Q5_1 true true);
    };
    ($set:ty: $($ty:ident $five:literal $min:literal),*) => {$(
        impl PackedFormat<$set> for $ty {
            #[inline(always)]
            unsafe fn packed_quad(p: *const u8) -> Quad<$set> {
                // SAFETY: the caller's promise.
                unsafe { packed_nibbles::<$five, $min>(p) }
            }
        }
    )*};
}
pub(super) use packed_nibble_formats;

/// How a matrix's rows are laid out, and where a step takes a quad from.
pub(super) trait Layout<S: Simd, W: Format<S>> {
    /// Bytes of a row of k values.
    fn row_bytes(k: usize) -> usize;
    /// A row of k values: its whole quads, and the blocks after them.
    fn quads(k: usize) -> (usize, usize);
    /// Quad q of the row at w.
    ///
    /// # Safety
    /// The row holds quad q; the processor has S.
    unsafe fn quad(w: *const u8, q: usize) -> Quad<S>;
    /// The row's last `rest` (1..=3) blocks after `quads` whole quads, as
    /// a quad with zero blocks.
    ///
    /// # Safety
    /// As `quads` says of the row; the processor has S.
    unsafe fn last(w: *const u8, quads: usize, rest: usize) -> Quad<S>;
}

/// Rows as the file lays them out: blocks in order.
pub(super) struct FileLayout;

impl<S: Simd, W: Format<S>> Layout<S, W> for FileLayout {
    fn row_bytes(k: usize) -> usize {
        W::TYPE.bytes_for(k).expect("k a whole number of blocks")
    }

    fn quads(k: usize) -> (usize, usize) {
        let blocks = k / BLOCK;
        (blocks / 4, blocks % 4)
    }

    #[inline(always)]
    unsafe fn quad(w: *const u8, q: usize) -> Quad<S> {
        // SAFETY: the caller's promise.
        unsafe { quad::<S, W>(w, q) }
    }

    #[inline(always)]
    unsafe fn last(w: *const u8, quads: usize, rest: usize) -> Quad<S> {
        // SAFETY: the caller's promise.
        unsafe { last_quad::<S, W>(w, 2 * quads, rest) }
    }
}

/// Rows packed at load (`packed`): whole quads, ready for a step.
pub(super) struct PackedLayout;

impl<S: Simd, W: PackedFormat<S>> Layout<S, W> for PackedLayout {
    fn row_bytes(k: usize) -> usize {
        packed::row_bytes(W::TYPE, k)
    }

    fn quads(k: usize) -> (usize, usize) {
        (k.div_ceil(QUAD), 0)
    }

    #[inline(always)]
    unsafe fn quad(w: *const u8, q: usize) -> Quad<S> {
        // SAFETY: the row holds quad q, the caller's promise.
        unsafe { W::packed_quad(w.add(q * packed::quad_bytes(W::TYPE))) }
    }

    unsafe fn last(_: *const u8, _: usize, _: usize) -> Quad<S> {
        unreachable!("packed rows hold whole quads")
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
/// (prefill), each column tile's quads are unpacked once into a buffer and
/// read back by every row tile; with one (decode), as they are used.
///
/// # Safety
/// b.out valid for writes at out[i·ldo + j], i < rows, j < cols; b.w for
/// reads of cols rows of row_bytes, each k values of W; rows row0.. of
/// b.acts exist; the processor has S.
#[inline(always)]
pub(super) unsafe fn block<S, W, L, const R: usize, const C: usize>(b: Block)
where
    S: Simd,
    W: Format<S>,
    L: Layout<S, W>,
{
    let quads = (b.k / BLOCK).div_ceil(4);
    let mut buf = Vec::with_capacity(if b.rows > R { C * quads } else { 0 });
    let mut j = 0;
    // SAFETY: each column tile lies inside the block.
    unsafe {
        while j + C <= b.cols {
            columns::<S, W, L, R, C>(b, j, &mut buf);
            j += C;
        }
        for j in j..b.cols {
            columns::<S, W, L, R, 1>(b, j, &mut buf);
        }
    }
}

/// Columns j..j+C of the block, all its rows.
///
/// # Safety
/// Columns j..j+C inside the block; the rest as [`block`].
#[inline(always)]
unsafe fn columns<S, W, L, const R: usize, const C: usize>(
    b: Block,
    j: usize,
    buf: &mut Vec<Quad<S>>,
) where
    S: Simd,
    W: Format<S>,
    L: Layout<S, W>,
{
    let (quads, rest) = L::quads(b.k);
    let rows = Rows::<L, C> {
        // SAFETY: rows j..j+C of w are inside the block (the caller's promise).
        w: std::array::from_fn(|c| unsafe { b.w.add((j + c) * b.row_bytes) }),
        quads,
        rest,
        // Each row advances `step` bytes a quad (of 4 blocks); reading
        // ahead keeps enough misses in flight for memory's bandwidth
        // (unpacking is too much work a byte for the processor's window to
        // do it alone).
        step: b.row_bytes * 4 / (4 * quads + rest),
        ahead: PREFETCH_TILES * C * b.row_bytes,
        layout: PhantomData,
    };
    let tail = rest > 0;
    // SAFETY (whole body): the tiles' rows lie in the block, the buffer
    // holds every quad; the rest is the caller's promise.
    unsafe {
        if b.rows <= R {
            tile_rows::<S, W, _, R, C>(b, b.rows, 0, j, (quads, tail), &rows);
            return;
        }
        buf.clear();
        for q in 0..quads {
            buf.extend_from_slice(&Source::<S, W, C>::quad(&rows, q));
        }
        if tail {
            buf.extend_from_slice(&Source::<S, W, C>::last(&rows));
        }
        let unpacked = Buffer::<S, C>(buf.as_ptr(), quads);
        let mut i = 0;
        while i < b.rows {
            let r = R.min(b.rows - i);
            tile_rows::<S, W, _, R, C>(b, r, i, j, (quads, tail), &unpacked);
            i += R;
        }
    }
}

/// Where a tile takes the quads of its C columns.
trait Source<S: Simd, W: Format<S>, const C: usize> {
    /// Quad q of the whole quads of blocks.
    unsafe fn quad(&self, q: usize) -> [Quad<S>; C];
    /// The last 1 to 3 blocks, as a quad with zero blocks.
    unsafe fn last(&self) -> [Quad<S>; C];
}

/// The C rows of weights themselves, laid out as L says.
struct Rows<L, const C: usize> {
    w: [*const u8; C],
    /// Whole quads of blocks per row, and blocks after them.
    quads: usize,
    rest: usize,
    /// Bytes a quad.
    step: usize,
    /// Bytes read ahead.
    ahead: usize,
    layout: PhantomData<L>,
}

impl<S, W, L, const C: usize> Source<S, W, C> for Rows<L, C>
where
    S: Simd,
    W: Format<S>,
    L: Layout<S, W>,
{
    #[inline(always)]
    unsafe fn quad(&self, q: usize) -> [Quad<S>; C] {
        // Every line of the step's bytes (a quad spans 72 to 136).
        for w in self.w {
            let mut at = q * self.step + self.ahead;
            while at < (q + 1) * self.step + self.ahead {
                S::prefetch(w.wrapping_add(at));
                at += 64;
            }
        }
        // SAFETY: the rows hold quad q (the caller's promise).
        unsafe { unpack_all::<S, W, L, C>(&self.w, q) }
    }

    #[inline(always)]
    unsafe fn last(&self) -> [Quad<S>; C] {
        // SAFETY: the rows hold `rest` blocks after their whole quads.
        unsafe {
            let mut ws = [L::last(self.w[0], self.quads, self.rest); C];
            for (ws, &w) in ws.iter_mut().zip(&self.w).skip(1) {
                *ws = L::last(w, self.quads, self.rest);
            }
            ws
        }
    }
}

/// Zero bytes: two blocks of any 32-value type with scale and min 0.
static ZEROS: [u8; 2 * MAX_BLOCK_BYTES] = [0; 2 * MAX_BLOCK_BYTES];

/// The quad of pairs `first`, `first + 1` of the row at w, which holds
/// `rest` (1..=3) blocks from pair `first` on: its last blocks (32-value
/// types only) and zero blocks, whose scale and min are 0 and whose
/// activations are the zero pad, so their lanes add exactly nothing
/// (fma(±0, 0, acc) = acc; acc is never −0). A whole pair is unpacked where
/// it lies, a last block alone from a copy followed by a zero block, an
/// empty pair from zeros.
///
/// # Safety
/// As said; the processor has S.
#[inline(always)]
unsafe fn last_quad<S: Simd, W: Format<S>>(w: *const u8, first: usize, rest: usize) -> Quad<S> {
    // SAFETY: the row holds `rest` blocks from pair `first`; each pair read
    // lies in the row, in a copy or in ZEROS.
    unsafe {
        let a = match rest {
            1 => alone::<S, W>(w, first),
            _ => W::unpack(w, first),
        };
        let b = match rest {
            3 => alone::<S, W>(w, first + 1),
            _ => W::unpack(ZEROS.as_ptr(), 0),
        };
        Quad::of(a, b)
    }
}

/// Pair p of the row at w holding its first block only: unpacked from a
/// copy of it followed by a zero block.
///
/// # Safety
/// Block 2p lies in the row; the processor has S.
#[inline(always)]
unsafe fn alone<S: Simd, W: Format<S>>(w: *const u8, p: usize) -> Unpacked<S> {
    let size = W::TYPE.type_size();
    let mut copy = [0u8; 2 * MAX_BLOCK_BYTES];
    // SAFETY: the caller's promise; the copy holds two blocks.
    unsafe {
        copy[..size].copy_from_slice(std::slice::from_raw_parts(w.add(2 * p * size), size));
        W::unpack(copy.as_ptr(), 0)
    }
}

/// Quads unpacked by `Rows` into a buffer: quad q of column c at q·C + c,
/// the last blocks after the whole quads.
struct Buffer<S: Simd, const C: usize>(*const Quad<S>, usize);

impl<S: Simd, W: Format<S>, const C: usize> Source<S, W, C> for Buffer<S, C> {
    #[inline(always)]
    unsafe fn quad(&self, q: usize) -> [Quad<S>; C] {
        // SAFETY: the buffer holds quad q (the caller's promise).
        unsafe { self.0.add(q * C).cast::<[Quad<S>; C]>().read() }
    }

    #[inline(always)]
    unsafe fn last(&self) -> [Quad<S>; C] {
        // SAFETY: the buffer holds the last blocks after the quads.
        unsafe { Source::<S, W, C>::quad(self, self.1) }
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
    quads: (usize, bool),
    src: &Src,
) {
    // SAFETY: passed on, with the row count the caller promised (the
    // last arm only for r = R: a smaller r there would write past the block).
    unsafe {
        match r {
            1 => tile::<S, W, Src, 1, C>(b, i, j, quads, src),
            2 if R > 2 => tile::<S, W, Src, 2, C>(b, i, j, quads, src),
            3 if R > 3 => tile::<S, W, Src, 3, C>(b, i, j, quads, src),
            _ => {
                assert_eq!(r, R, "tiles have at most 4 rows or exactly R");
                tile::<S, W, Src, R, C>(b, i, j, quads, src)
            }
        }
    }
}

/// out for rows i..i+R and columns j..j+C of the block: all R·C
/// accumulators in registers through the rows' whole quads and, where
/// `tail`, their last blocks (`(quads, tail)`).
///
/// # Safety
/// Rows i..i+R and columns j..j+C inside the block, `src` holding their
/// weights (with last blocks after the quads where `tail`); the rest as
/// [`block`].
#[inline(always)]
unsafe fn tile<S: Simd, W: Format<S>, Src: Source<S, W, C>, const R: usize, const C: usize>(
    b: Block,
    i: usize,
    j: usize,
    (quads, tail): (usize, bool),
    src: &Src,
) {
    let a = b.acts;
    let rows: [usize; R] = std::array::from_fn(|r| b.row0 + i + r);
    // SAFETY (whole body): quad q of an activation row is inside kp;
    // out[(i + r)·ldo + j + c] is in the block; the rest is the caller's
    // promise.
    unsafe {
        let mut acc = [[S::Floats::zero(); C]; R];
        for q in 0..quads {
            acc = step::<S, W, R, C>(acc, &src.quad(q), a, &rows, q);
        }
        if tail {
            acc = step::<S, W, R, C>(acc, &src.last(), a, &rows, quads);
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

/// Quad q of each of the C rows at `w`. (A loop, not `array::from_fn`: a
/// closure is a function of its own, compiled without the set's features
/// unless inlined, and then every intrinsic in it is a call.)
///
/// # Safety
/// As [`Layout::quad`] for each row.
#[inline(always)]
unsafe fn unpack_all<S, W, L, const C: usize>(w: &[*const u8; C], q: usize) -> [Quad<S>; C]
where
    S: Simd,
    W: Format<S>,
    L: Layout<S, W>,
{
    // SAFETY: the caller's promise.
    unsafe {
        let mut ws = [L::quad(w[0], q); C];
        for c in 1..C {
            ws[c] = L::quad(w[c], q);
        }
        ws
    }
}

/// Quad q of the row at w: its two pairs, split (`last_quad` too).
///
/// # Safety
/// As [`Format::unpack`] for pairs 2q and 2q+1.
#[inline(always)]
unsafe fn quad<S: Simd, W: Format<S>>(w: *const u8, q: usize) -> Quad<S> {
    // SAFETY: the caller's promise.
    unsafe {
        let (a, b) = (W::unpack(w, 2 * q), W::unpack(w, 2 * q + 1));
        Quad::of(a, b)
    }
}

/// One step of the tile: quad `q` of its activation rows `rows` with the
/// weights `ws` into the accumulators. (By value: through a reference, one
/// of them lived on the stack, a store and a reload each step.)
///
/// # Safety
/// Quad q lies inside the rows of `a`; the processor has S.
// Indices r (row), c (column) name the accumulator tile's cells plainly.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn step<S: Simd, W: Format<S>, const R: usize, const C: usize>(
    mut acc: [[S::Floats; C]; R],
    ws: &[Quad<S>; C],
    a: &Acts,
    rows: &[usize; R],
    q: usize,
) -> [[S::Floats; C]; R] {
    let lanes = a.kp / GROUP;
    for r in 0..R {
        let at = rows[r] * lanes + q * LANES;
        // SAFETY: quad q of row rows[r] is inside each array (the caller's
        // promise); the processor has S.
        unsafe {
            let x = a.qs.as_ptr().add(rows[r] * a.kp + q * QUAD);
            let (even, odd) = (S::load_bytes(x), S::load_bytes(x.add(QUAD / 2)));
            let init = if W::OFFSET != 0 {
                S::load_ints(a.init.as_ptr().add(at))
            } else {
                S::zero_ints()
            };
            let d = S::Floats::load(a.d.as_ptr().add(at));
            let sums = S::Floats::load(a.sums.as_ptr().add(at));
            for c in 0..C {
                let dot = W::dot(W::dot(init, ws[c].even, even), ws[c].odd, odd);
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
