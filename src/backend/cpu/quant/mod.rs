//! Matrix products and gathers with quantized weights (`Backend::matmul_q`,
//! `Backend::embedding_q`), as llama.cpp computes them: the activations are
//! quantized to 8 bits once per call, then integer dot products per block,
//! scaled and summed in f32. Batch-invariant, like `matmul_invariant`: an
//! output element is one fixed arithmetic on its x row, its w row and k —
//! not on n, m, the thread count, the tile or the instruction set.
//!
//! The arithmetic of out[i, j], a = x[i], w = row j of the weights:
//! - a's blocks of 32 values are quantized (`activations`): d_b = max|a| /
//!   127 and codes q = rne(a · 127/max|a|) ∈ −127..=127.
//! - w's blocks of 32 values (a K type's sub-blocks of 32) give integer
//!   weights v and, per lane g of 8 values, a scale sw_g and a min mw (0
//!   where the type has none), with deq(w) = sw·v + mw:
//!   Q8_0 v = q, sw = d; Q4_0 v = q − 8, Q5_0 v = q − 16, sw = d; Q4_1,
//!   Q5_1 v = q, sw = d, mw = m; Q4_K, Q5_K v = q, sw = d·sc, mw = −(dmin·m)
//!   of the sub-block; Q6_K v = q − 32, sw = d·sc of the lane's 16 values
//!   (d, m, dmin widened from f16; each product one f32 rounding).
//! - 16 f32 lane accumulators, all +0.0. Block b feeds lanes 4·(b mod 4) + g,
//!   g = 0..4 its groups of 8 values (8g..8g+8), in block order; for each
//!   lane: p = Σ v·q over the group (an exact i32); acc = fma(sw_g · d_b,
//!   f32(p), acc); and for types with a min, acc = fma(mw, d_b · f32(Σ q
//!   over the group), acc). (Rows padded to whole quads of 4 blocks with
//!   zero blocks, which change no bit.)
//! - then `matmul_invariant`'s fixed tree: acc[l] += acc[l + 8], l + 4,
//!   l + 2, l + 1; the result is acc[0].
//!
//! Integer sums are exact and every f32 step is one rounding, so AVX-512 with
//! VNNI (one zmm per accumulator, vpdpbusd), AVX2 (two ymm, maddubs/madd) and
//! the portable build give the same bits (`Isa`). They share one tile loop
//! (`kernel`: a step is a quad of blocks, 8 values a lane summed by two
//! 4-byte dot products, which halves the f32 work of 4-value lanes) and
//! differ in how a pair of blocks unpacks (`portable`, `avx2`, `avx512`).
//! F16, BF16 and F32 weights go through the f32 product (`float`). The
//! 32-value types' rows are repacked at load (`QWeight`, `packed`) so that
//! a step loads its codes ready to multiply; the arithmetic, and so the
//! bits, stay those of the file's layout.
//!
//! Speed: tasks are blocks of up to `ROW_BLOCK` rows × the columns whose
//! weights fill about `W_BLOCK_BYTES`; a decode step (n ≤ `ROW_BLOCK`) reads
//! each weight row from memory once per call, for all its rows, and with
//! several row tiles each column tile is unpacked once for all of them.

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod float;
mod kernel;
mod packed;
mod portable;

use super::matmul::SendPtr;
use super::matmul_invariant as f32_product;
use crate::error::{Error, Result};
use crate::quant::{dequant, GgmlType, QBytes};
use activations::Acts;
use kernel::{Block, FileLayout, Format, Layout, PackedFormat, PackedLayout, Simd};
use kernel::{Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
use rayon::prelude::*;

/// Checks that `len` bytes hold a [rows, cols] matrix of `ty`: one line
/// saying what is wrong otherwise.
pub fn check(ty: GgmlType, len: usize, rows: usize, cols: usize) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(Error::Unsupported(dequant::unsupported_msg(ty)));
    }
    let Some(row_bytes) = ty.bytes_for(cols) else {
        return Err(Error::Invalid(format!(
            "a {ty} row of {cols} values is not a whole number of {}-value blocks",
            ty.block_size()
        )));
    };
    if row_bytes.checked_mul(rows) != Some(len) {
        return Err(Error::Invalid(format!(
            "{len} bytes do not hold {rows} rows of {cols} {ty} values ({row_bytes} bytes a row)"
        )));
    }
    Ok(())
}

/// A quantized weight [rows, cols] as the CPU keeps it (the CPU's `QBuf`):
/// the file's blocks, or, for the types `packed` takes, the same bits
/// repacked at load for the kernels.
pub struct QWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    bytes: QBytes,
    packed: bool,
}

impl QWeight {
    /// Checks `data` (`check`) and keeps it in memory of its own, packed
    /// where the type packs. A mapped file's pages are let go as each chunk
    /// of rows is copied, so the process never holds both; and none are
    /// read again (a fault on a mapped tensor maps its neighbours' pages
    /// too: read in place, the K types of SmolLM2's Q4_K_M file raised the
    /// peak RSS by 8 MB of packed tensors' pages).
    pub fn new(ty: GgmlType, data: QBytes, rows: usize, cols: usize) -> Result<QWeight> {
        let mut w = QWeight::file_layout(ty, data, rows, cols)?;
        let packs = packed::packs(ty);
        if !packs && matches!(w.bytes, QBytes::Owned(_)) {
            return Ok(w);
        }
        let file_row = ty.bytes_for(cols).expect("checked");
        let row = if packs {
            packed::row_bytes(ty, cols)
        } else {
            file_row
        };
        let mut out = vec![0u8; rows * row];
        let chunk = (COPY_CHUNK_BYTES / file_row.max(1)).max(1);
        for r in (0..rows).step_by(chunk) {
            let end = (r + chunk).min(rows);
            let (file, into) = (r * file_row..end * file_row, &mut out[r * row..end * row]);
            match packs {
                true => packed::pack(ty, &w.bytes[file.clone()], cols, into),
                false => into.copy_from_slice(&w.bytes[file.clone()]),
            }
            w.bytes.drop_pages(file);
        }
        (w.bytes, w.packed) = (QBytes::Owned(out), packs);
        Ok(w)
    }

    /// Checks `data` and keeps it in the file's layout, as every type
    /// `packed` does not take is kept (tests compare the two layouts).
    pub fn file_layout(ty: GgmlType, data: QBytes, rows: usize, cols: usize) -> Result<QWeight> {
        check(ty, data.len(), rows, cols)?;
        Ok(QWeight {
            ty,
            rows,
            cols,
            bytes: data,
            packed: false,
        })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// [rows, cols].
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Row r as the file lays it out: where it lies, or unpacked into
    /// `scratch`.
    pub fn file_row<'a>(&'a self, r: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
        let row_bytes = self.ty.bytes_for(self.cols).expect("checked by new");
        assert!(r < self.rows, "row {r} of {}", self.rows);
        if !self.packed {
            return &self.bytes[r * row_bytes..(r + 1) * row_bytes];
        }
        scratch.resize(row_bytes, 0);
        packed::unpack_row(self.ty, &self.bytes, r, self.cols, scratch);
        scratch
    }
}

/// File bytes copied before their pages are let go (`QWeight::new`).
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// The instruction sets the integer kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 with VNNI (vpdpbusd) and BW.
    Avx512Vnni,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// The build's baseline.
    Portable,
}

impl Isa {
    /// The fastest set this processor has.
    pub fn detect() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this processor can run `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                avx2 && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2,
            Isa::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The f32 product's set for the float types (same bits on each).
    fn f32_isa(self) -> f32_product::Isa {
        match self {
            Isa::Avx512Vnni => f32_product::Isa::Avx512,
            Isa::Avx2 => f32_product::Isa::Avx2,
            Isa::Portable => f32_product::Isa::Portable,
        }
    }
}

/// out [n, m] = x [n, k] · deq(w [m, k])ᵀ, batch-invariant (see the module
/// doc), with the fastest instruction set of this processor.
pub fn matmul_q(out: &mut [f32], x: &[f32], w: &QWeight, n: usize) {
    matmul_q_with(Isa::detect(), out, x, w, n);
}

/// [`matmul_q`] with the given instruction set (tests compare them). Panics
/// if the processor lacks it or the sizes do not match.
pub fn matmul_q_with(isa: Isa, out: &mut [f32], x: &[f32], w: &QWeight, n: usize) {
    assert!(
        isa.available(),
        "{isa:?} is not available on this processor"
    );
    let (ty, m, k) = (w.ty, w.rows, w.cols);
    assert!(out.len() >= n * m && x.len() >= n * k);
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        // Empty sums (the kernels take whole blocks, at least one).
        out[..n * m].fill(0.0);
        return;
    }
    if matches!(ty, GgmlType::F16 | GgmlType::BF16 | GgmlType::F32) {
        return float::matmul(isa.f32_isa(), ty, out, x, &w.bytes, n, m, k);
    }
    let args = (out, x, &w.bytes[..], n, m, k);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => by_type::<avx512::Avx512>(ty, w.packed, args),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_type::<avx2::Avx2>(ty, w.packed, args),
        _ => by_type::<portable::Portable>(ty, w.packed, args),
    }
}

/// `matmul_q_with`'s checked arguments: out, x, w's bytes, n, m, k.
type Args<'a> = (&'a mut [f32], &'a [f32], &'a [u8], usize, usize, usize);

/// The integer product of weight type `ty` on the set S, from rows packed
/// or as the file lays them out.
fn by_type<S: Simd>(ty: GgmlType, packed: bool, args: Args)
where
    Q8_0: PackedFormat<S>,
    Q4_0: PackedFormat<S>,
    Q4_1: PackedFormat<S>,
    Q5_0: PackedFormat<S>,
    Q5_1: PackedFormat<S>,
    Q4_K: Format<S>,
    Q5_K: Format<S>,
    Q6_K: Format<S>,
{
    type File = FileLayout;
    match (ty, packed) {
        (GgmlType::Q8_0, true) => run::<S, Q8_0, PackedLayout>(args),
        (GgmlType::Q4_0, true) => run::<S, Q4_0, PackedLayout>(args),
        (GgmlType::Q4_1, true) => run::<S, Q4_1, PackedLayout>(args),
        (GgmlType::Q5_0, true) => run::<S, Q5_0, PackedLayout>(args),
        (GgmlType::Q5_1, true) => run::<S, Q5_1, PackedLayout>(args),
        (GgmlType::Q8_0, false) => run::<S, Q8_0, File>(args),
        (GgmlType::Q4_0, false) => run::<S, Q4_0, File>(args),
        (GgmlType::Q4_1, false) => run::<S, Q4_1, File>(args),
        (GgmlType::Q5_0, false) => run::<S, Q5_0, File>(args),
        (GgmlType::Q5_1, false) => run::<S, Q5_1, File>(args),
        (GgmlType::Q4_K, false) => run::<S, Q4_K, File>(args),
        (GgmlType::Q5_K, false) => run::<S, Q5_K, File>(args),
        (GgmlType::Q6_K, false) => run::<S, Q6_K, File>(args),
        (other, packed) => unreachable!("{other} (packed: {packed}) is refused by QWeight"),
    }
}

/// Rows of x per task: a decode step's few rows are one block, so the
/// weights are read once; many rows split further for more tasks.
const ROW_BLOCK: usize = 64;

/// Bytes of weights per task's column block: with the task's rows of
/// activations (4 bytes a value), near the 48 KiB L1 of Zen 5.
const W_BLOCK_BYTES: usize = 16 * 1024;

/// Columns per task are a multiple of this (every set's tile width divides it).
const COL_ALIGN: usize = 12;

/// The product for weight format W laid out as L on the set S, tasks in
/// parallel.
fn run<S: Simd, W: Format<S>, L: Layout<S, W>>((out, x, w, n, m, k): Args) {
    let acts = Acts::new::<S>(x, n, k, W::OFFSET);
    let row_bytes = L::row_bytes(k);
    assert!(w.len() >= m * row_bytes);
    let cols = (W_BLOCK_BYTES / row_bytes / COL_ALIGN * COL_ALIGN).max(COL_ALIGN);
    let col_blocks = m.div_ceil(cols);
    let dst = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(ROW_BLOCK) * col_blocks)
        .into_par_iter()
        .for_each(|task| {
            let (i0, j0) = (task / col_blocks * ROW_BLOCK, task % col_blocks * cols);
            let b = Block {
                // SAFETY: out[i0, j0] is inside out (i0 < n, j0 < m).
                out: unsafe { dst.get().add(i0 * m + j0) },
                ldo: m,
                acts: &acts,
                row0: i0,
                rows: ROW_BLOCK.min(n - i0),
                // SAFETY: row j0 < m of w, inside w (asserted by the caller).
                w: unsafe { w.as_ptr().add(j0 * row_bytes) },
                row_bytes,
                cols: cols.min(m - j0),
                k,
            };
            // SAFETY: the task writes out[i, j] for its rows and columns
            // only (row stride m), disjoint from every other task's; it
            // reads its rows of acts and its whole rows of w, inside their
            // lengths; the caller checked that the processor has S.
            unsafe { S::block::<W, L>(b) }
        });
}

/// Rows `ids` of the quantized table `w` [vocab, d], dequantized into out.
pub fn embedding_q(out: &mut [f32], ids: &[u32], w: &QWeight) {
    let (vocab, d) = (w.rows, w.cols);
    let mut scratch = Vec::new();
    for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
        let id = id as usize;
        assert!(id < vocab, "token id {id} outside vocabulary {vocab}");
        dequant::dequantize(w.ty, w.file_row(id, &mut scratch), row).expect("checked at upload");
    }
}
