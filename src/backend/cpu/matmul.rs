//! Matrix products on the CPU: the `gemm` crate for real matrices, and a
//! bandwidth-bound matrix-vector loop for the few rows of a decode step,
//! where streaming the weights once is all that matters.

use gemm::Parallelism;
use rayon::prelude::*;

/// Up to this many rows of x go through `matvec_nt`: each weight row is read
/// once from memory and used for every x row while it is in cache.
const MATVEC_MAX_ROWS: usize = 4;

/// out[n, m] = x[n, k] · w[m, k]ᵀ, all row-major.
pub fn matmul_nt(out: &mut [f32], x: &[f32], w: &[f32], n: usize, m: usize, k: usize) {
    assert!(out.len() >= n * m && x.len() >= n * k && w.len() >= m * k);
    if n <= MATVEC_MAX_ROWS {
        return matvec_nt(&mut out[..n * m], &x[..n * k], &w[..m * k], n, m, k);
    }
    // gemm's own threading leaves a core idle at these sizes (a 128×576
    // output ran no faster on 2 threads than on 1), so split the output into
    // tiles ourselves: blocks of ROW_BLOCK rows of x times blocks of COL_BLOCK
    // columns (rows of w). Each task packs and multiplies only its tile's
    // operands; with many rows (an encoder batch is thousands) there are
    // enough tiles to keep every thread busy, where the column blocks alone
    // (three for a 384-wide layer) left one of two threads idle a third of
    // the time. The tiles do not depend on the thread count, so neither do
    // the results, bit for bit.
    let dst = SendPtr(out.as_mut_ptr());
    let col_blocks = m.div_ceil(COL_BLOCK);
    (0..n.div_ceil(ROW_BLOCK) * col_blocks)
        .into_par_iter()
        .for_each(|tile| {
            let (i0, j0) = (tile / col_blocks * ROW_BLOCK, tile % col_blocks * COL_BLOCK);
            let (rows, width) = (ROW_BLOCK.min(n - i0), COL_BLOCK.min(m - j0));
            // SAFETY: tile (i0, j0) writes only rows i0..i0+rows, columns
            // j0..j0+width of out (row stride m), disjoint from every other
            // tile's, and reads rows i0..i0+rows of x and j0..j0+width of w;
            // the assertion above bounds all three.
            unsafe {
                gemm_nt(
                    dst.get().add(i0 * m + j0),
                    m,
                    &x[i0 * k..(i0 + rows) * k],
                    &w[j0 * k..(j0 + width) * k],
                    rows,
                    width,
                    k,
                )
            };
        });
}

/// Output columns per tile: a multiple of the widest micro-kernel (64 floats),
/// small enough to balance two or more threads on 576-wide layers.
const COL_BLOCK: usize = 128;

/// Output rows per tile: enough that packing a tile's block of w (k×128)
/// costs little next to multiplying it.
const ROW_BLOCK: usize = 512;

/// A pointer the tasks of one product share, each writing its own tile
/// (here and in `matmul_invariant`).
#[derive(Clone, Copy)]
pub(super) struct SendPtr<T = f32>(pub(super) *mut T);
// SAFETY: the tasks write disjoint elements through it, or only read (see
// each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

/// Single-threaded dst[n, m] (row stride `dst_rs`) = x[n, k] · w[m, k]ᵀ
/// through the gemm crate.
///
/// # Safety
/// dst must be valid for writes at dst[i·dst_rs + j] for i < n, j < m.
unsafe fn gemm_nt(
    dst: *mut f32,
    dst_rs: usize,
    x: &[f32],
    w: &[f32],
    n: usize,
    m: usize,
    k: usize,
) {
    assert!(x.len() >= n * k && w.len() >= m * k);
    // SAFETY: dst is the caller's promise; lhs is n×k with row stride k and
    // rhs = wᵀ is k×m read as w[j·k + i] (row stride 1, column stride k),
    // both inside the asserted lengths.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// out[r, j] = x[r] · w[j] for a few rows r; weight rows split across threads.
fn matvec_nt(out: &mut [f32], x: &[f32], w: &[f32], n: usize, m: usize, k: usize) {
    // Output columns per task: ~64 KiB of weights, enough to amortise a task.
    let cols = (16384 / k.max(1)).clamp(1, m.max(1));
    // Each task computes a block of columns for all rows into a local buffer.
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(cols * k)
        .map(|wb| {
            let mut res = Vec::with_capacity(n * wb.len() / k);
            for r in 0..n {
                let xr = &x[r * k..(r + 1) * k];
                res.extend(wb.chunks_exact(k).map(|wj| dot(xr, wj)));
            }
            res
        })
        .collect();
    for (b, res) in blocks.iter().enumerate() {
        let width = res.len() / n;
        for r in 0..n {
            out[r * m + b * cols..][..width].copy_from_slice(&res[r * width..(r + 1) * width]);
        }
    }
}

/// Dot product, with AVX2 where the processor has it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the processor supports AVX2, checked just above.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// Independent partial sums in 32 lanes, so the compiler can keep several
/// vector registers busy (floating-point addition is not reassociated for us).
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0.0f32; L];
    let split = a.len() / L * L;
    for (x, y) in a[..split].chunks_exact(L).zip(b[..split].chunks_exact(L)) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a[split..].iter().zip(&b[split..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
