//! One step of batched inference: the rows of many sequences at once, and
//! the paged KV cache they read and write.
//!
//! A `Batch` is what the scheduler (`infer::scheduler`) hands the model for
//! one forward call: decode tokens of running sequences and chunks of new
//! prompts, each row with its own position and KV slot. It lives in `model`
//! so that the model never needs to know about requests or scheduling.

use crate::backend::{Backend, PagedSeq, NO_ADAPTER};
use crate::error::Result;
use crate::tensor::Tensor;

/// One sequence's rows in a batch.
#[derive(Clone, Debug)]
pub struct BatchSeq {
    /// Its first row in the batch.
    pub row: usize,
    /// Its rows: positions ctx − rows .. ctx.
    pub rows: usize,
    /// Its length once this step's rows are cached.
    pub ctx: usize,
    /// The cache blocks of positions 0..ctx, in order.
    pub blocks: Vec<u32>,
    /// Its adapter's slot in the forward's adapter list, or `NO_ADAPTER`.
    pub adapter: u32,
}

/// The rows of one forward call.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Token id of each row.
    pub ids: Vec<u32>,
    /// Position of each row in its sequence.
    pub positions: Vec<u32>,
    /// The cache slot each row's key and value are written to
    /// (block · block_size + offset).
    pub slots: Vec<u32>,
    pub seqs: Vec<BatchSeq>,
    /// The rows whose next-token logits are wanted, in the order of the
    /// logits' rows.
    pub logit_rows: Vec<usize>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    /// Adds `ids`, at positions `start..`, as the rows of one sequence
    /// whose cache blocks are `blocks` and whose adapter is `adapter`;
    /// `logits` asks for its last row's.
    pub fn push_seq(
        &mut self,
        ids: &[u32],
        start: usize,
        blocks: &[u32],
        block_size: usize,
        adapter: u32,
        logits: bool,
    ) {
        let row = self.ids.len();
        for (i, &id) in ids.iter().enumerate() {
            let pos = start + i;
            self.ids.push(id);
            self.positions.push(pos as u32);
            self.slots
                .push(blocks[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
        }
        self.seqs.push(BatchSeq {
            row,
            rows: ids.len(),
            ctx: start + ids.len(),
            blocks: blocks.to_vec(),
            adapter,
        });
        if logits {
            self.logit_rows.push(row + ids.len() - 1);
        }
    }

    /// Each row's adapter slot (`NO_ADAPTER` for the base model).
    pub fn row_adapters(&self) -> Vec<u32> {
        let mut rows = vec![NO_ADAPTER; self.rows()];
        for s in &self.seqs {
            rows[s.row..s.row + s.rows].fill(s.adapter);
        }
        rows
    }

    /// The sequences as `Backend::attention_paged` takes them.
    pub fn paged_seqs(&self) -> Vec<PagedSeq<'_>> {
        self.seqs
            .iter()
            .map(|s| PagedSeq {
                row: s.row,
                rows: s.rows,
                ctx: s.ctx,
                blocks: &s.blocks,
            })
            .collect()
    }
}

/// The paged KV cache: per layer, keys and values of `num_blocks` blocks of
/// `block_size` positions, [num_blocks · block_size, kv_heads · hd] each.
pub struct PagedKv<B: Backend> {
    pub k: Vec<Tensor<B>>,
    pub v: Vec<Tensor<B>>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl<B: Backend> PagedKv<B> {
    pub fn new(
        be: &B,
        layers: usize,
        kv_width: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        let slots = num_blocks * block_size;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(be.zeros(&[slots, kv_width], be.dtype())?);
            v.push(be.zeros(&[slots, kv_width], be.dtype())?);
        }
        Ok(PagedKv {
            k,
            v,
            block_size,
            num_blocks,
        })
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn block_bytes(layers: usize, kv_width: usize, block_size: usize, elem: usize) -> usize {
        2 * layers * kv_width * block_size * elem
    }
}
