//! Exact search of an [`Index`]: for each query, the k live rows whose
//! vectors have the largest inner product with it, best first, ties to the
//! lower id (`backend::top_k_order`).
//!
//! On the host (the CPU device) the vectors are used where they lie, in the
//! memory map: blocks of rows are scored for all queries at once by one
//! matrix product (the `gemm` crate), blocks in parallel with rayon, each
//! thread keeping a bounded [`TopK`] per query that skips dead rows.
//!
//! On another device, [`DeviceVectors`] holds the live rows there in large
//! blocks; each block's scores come from `Backend::matmul_nt` (f32, so the
//! ranking is the host's) and its k best from `Backend::top_k`, and the host
//! merges the blocks' candidates.

use super::index::Index;
use crate::backend::topk::TopK;
use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::{DType, Tensor};
use rayon::prelude::*;

/// Rows per block of the host search: one matrix product and one scan each.
/// (512 was the fastest of 128 to 4096 at dim 384 on one AVX2 core, for
/// single queries and batches of 64: 64 × 512 scores stay in L2.)
const BLOCK: usize = 512;
/// Queries scored together, bounding the score buffers.
const QUERY_GROUP: usize = 256;
/// Rows per block on a device: 256 queries × 2¹⁸ rows of f32 scores is 256 MiB.
const DEVICE_BLOCK: usize = 1 << 18;

/// scores [nq × rb] = queries [nq × dim] · blockᵀ, block [rb × dim], all
/// row-major.
fn score_block(scores: &mut [f32], queries: &[f32], block: &[f32], nq: usize, dim: usize) {
    let rb = block.len() / dim;
    assert!(queries.len() == nq * dim && block.len() == rb * dim && scores.len() == nq * rb);
    if nq == 0 || rb == 0 {
        return;
    }
    // SAFETY: the assertion: gemm reads nq × dim values of `queries` (row
    // stride dim), rb × dim of `block` (read transposed: column stride dim,
    // row stride 1) and writes nq × rb of `scores` (row stride rb).
    unsafe {
        gemm::gemm(
            nq,
            rb,
            dim,
            scores.as_mut_ptr(),
            1,
            rb as isize,
            false,
            queries.as_ptr(),
            1,
            dim as isize,
            block.as_ptr(),
            dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The host search over `vectors` (rows × dim; bit i of `live` set when row
/// i is live, every row when None) for the queries (nq × dim), k ≥ 1.
pub(super) fn on_host(
    vectors: &[f32],
    dim: usize,
    live: Option<&[u64]>,
    queries: &[f32],
    k: usize,
) -> Vec<Vec<(usize, f32)>> {
    let rows = vectors.len() / dim;
    let mut out = Vec::with_capacity(queries.len() / dim);
    for group in queries.chunks(QUERY_GROUP * dim) {
        let gq = group.len() / dim;
        let fresh = || vec![TopK::new(k); gq];
        let best = (0..rows.div_ceil(BLOCK))
            .into_par_iter()
            .fold(
                || (fresh(), Vec::new()),
                |(mut heaps, mut scores): (Vec<TopK>, Vec<f32>), b| {
                    let r0 = b * BLOCK;
                    let rb = BLOCK.min(rows - r0);
                    scores.resize(gq * rb, 0.0);
                    let block = &vectors[r0 * dim..(r0 + rb) * dim];
                    score_block(&mut scores, group, block, gq, dim);
                    for (q, heap) in heaps.iter_mut().enumerate() {
                        heap.scan(&scores[q * rb..(q + 1) * rb], r0, live);
                    }
                    (heaps, scores)
                },
            )
            .map(|(heaps, _)| heaps)
            .reduce(fresh, |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    x.merge(y);
                }
                a
            });
        out.extend(best.into_iter().map(TopK::into_sorted));
    }
    out
}

/// One block of live rows on the device and the index ids they hold, in
/// ascending order (so the device's ties to the lower column are ties to the
/// lower id).
struct Block<B: Backend> {
    vectors: Tensor<B>,
    ids: Vec<usize>,
}

/// The live vectors of an [`Index`] snapshot resident on a device, to search
/// there as often as wanted (upload once, search many).
pub struct DeviceVectors<B: Backend> {
    blocks: Vec<Block<B>>,
    dim: usize,
}

impl<B: Backend> DeviceVectors<B> {
    /// Copies the live rows of `index` to `be`'s device as f32.
    pub fn upload(be: &B, index: &Index) -> Result<Self> {
        Self::upload_blocks(be, index, DEVICE_BLOCK)
    }

    /// [`DeviceVectors::upload`] in blocks of `rows` rows: a search holds
    /// queries × `rows` f32 scores on the device at a time.
    pub fn upload_blocks(be: &B, index: &Index, rows: usize) -> Result<Self> {
        assert!(rows > 0, "blocks of 0 rows");
        let dim = index.dim();
        let ids = index.live_ids();
        let mut blocks = Vec::with_capacity(ids.len().div_ceil(rows));
        for ids in ids.chunks(rows) {
            let mut data = Vec::with_capacity(ids.len() * dim);
            for &id in ids {
                data.extend_from_slice(index.vector(id)?);
            }
            blocks.push(Block {
                vectors: be.upload(data, &[ids.len(), dim], DType::F32)?,
                ids: ids.to_vec(),
            });
        }
        Ok(DeviceVectors { blocks, dim })
    }

    /// (id, score) of the k best rows for each query in `queries` (nq × dim,
    /// finite, checked by the caller), best first.
    pub fn search_ids(&self, be: &B, queries: &[f32], k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let d = self.dim;
        let mut out = Vec::with_capacity(queries.len() / d);
        for group in queries.chunks(QUERY_GROUP * d) {
            let gq = group.len() / d;
            let q = be.upload(group.to_vec(), &[gq, d], DType::F32)?;
            let mut best = vec![TopK::new(k); gq];
            for block in &self.blocks {
                let mut scores = be.zeros(&[gq, block.ids.len()], DType::F32)?;
                be.matmul_nt(&mut scores, &q, &block.vectors)?;
                for (heap, found) in best.iter_mut().zip(be.top_k(&scores, k)?) {
                    for (col, score) in found {
                        heap.offer(block.ids[col as usize], score);
                    }
                }
            }
            out.extend(best.into_iter().map(TopK::into_sorted));
        }
        Ok(out)
    }
}
