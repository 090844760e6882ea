//! Rows of exactly `seq_len` tokens, batches of B rows, per-epoch shuffling,
//! and a data position that can be saved and restored.
//!
//! Two layouts ([`Layout`]):
//!
//! - **Pad**: one example per row. Longer examples are truncated to their
//!   first `seq_len` tokens (the target of the last kept position is still the
//!   example's next token); shorter ones are padded with `pad_id`, whose
//!   targets are [`IGNORE`].
//! - **Pack**: the epoch's examples, in shuffled order, are concatenated into
//!   one stream, with an EOS after each example that does not already end with
//!   one, and the stream is cut into rows of `seq_len`; only the epoch's last
//!   row is padded. An example may continue from one row into the next.
//!   Targets come from the examples, whose last position is always
//!   [`IGNORE`], so no target ever points into another example (and the
//!   separators carry no loss). Attention is not masked between examples
//!   packed into one row (as in most trainers' packing).
//!
//! An epoch is the rows of every example once; its batches are B consecutive
//! rows, the last one smaller when B does not divide the number of rows. The
//! number of rows, and so of batches, is the same in every epoch.
//!
//! Shuffling: epoch e uses a permutation of the examples drawn by
//! Fisher–Yates from a SplitMix64 generator seeded with `seed + e`
//! (wrapping). The generator is written here rather than taken from `rand` so
//! that a checkpoint resumes with the same order whatever version of `rand`
//! the binary is built with. With `shuffle: false` every epoch is in file
//! order (for eval sets).
//!
//! [`DataPosition`] `{epoch, batch}` is the next batch to be produced; since an
//! epoch's rows are a pure function of (dataset, config, epoch), restoring it
//! with [`Loader::seek`] yields exactly the batches an uninterrupted run would.

use super::data::{Dataset, IGNORE};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How examples become rows of `seq_len` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// One example per row: truncate, then pad.
    Pad,
    /// Concatenate examples (EOS-separated) and cut into full rows.
    Pack,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchConfig {
    /// Rows per batch (B); the last batch of an epoch may have fewer.
    pub batch_size: usize,
    /// Tokens per row (L).
    pub seq_len: usize,
    pub layout: Layout,
    /// Shuffle each epoch (training); `false` keeps file order (eval).
    pub shuffle: bool,
    pub seed: u64,
    /// The input id of padding positions (their targets are IGNORE); the EOS
    /// id is a good choice.
    pub pad_id: u32,
}

/// `rows` × `seq_len` ids and targets, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Batch {
    /// Positions that carry loss (targets not [`IGNORE`]).
    pub fn loss_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    pub fn row_ids(&self, r: usize) -> &[u32] {
        &self.ids[r * self.seq_len..(r + 1) * self.seq_len]
    }

    pub fn row_targets(&self, r: usize) -> &[u32] {
        &self.targets[r * self.seq_len..(r + 1) * self.seq_len]
    }
}

/// Where the loader is: the next batch it produces is batch `batch` of epoch
/// `epoch` (both from 0). Saved in checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub batch: usize,
}

/// Endless batches over a dataset, epoch after epoch.
pub struct Loader {
    data: Dataset,
    cfg: BatchConfig,
    rows_per_epoch: usize,
    pos: DataPosition,
    /// The rows (ids, targets; each `seq_len` long) of epoch `cached_epoch`.
    cached: Vec<(Vec<u32>, Vec<u32>)>,
    cached_epoch: Option<u64>,
}

impl Loader {
    pub fn new(data: Dataset, cfg: BatchConfig) -> Result<Loader> {
        if cfg.batch_size == 0 {
            return Err(Error::Invalid("--batch must be at least 1".into()));
        }
        if cfg.seq_len < 2 {
            return Err(Error::Invalid("--seq-len must be at least 2".into()));
        }
        if data.is_empty() {
            return Err(Error::format(
                &data.path,
                "the dataset is empty: no examples",
            ));
        }
        let rows_per_epoch = match cfg.layout {
            Layout::Pad => data.len(),
            Layout::Pack => stream_len(&data).div_ceil(cfg.seq_len),
        };
        Ok(Loader {
            data,
            cfg,
            rows_per_epoch,
            pos: DataPosition::default(),
            cached: Vec::new(),
            cached_epoch: None,
        })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.data
    }

    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    pub fn rows_per_epoch(&self) -> usize {
        self.rows_per_epoch
    }

    /// Batches (micro-batches, for the trainer) in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.rows_per_epoch.div_ceil(self.cfg.batch_size)
    }

    /// The next batch's position (save this in a checkpoint).
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Continues from a saved position.
    pub fn seek(&mut self, pos: DataPosition) -> Result<()> {
        if pos.batch > self.batches_per_epoch() {
            return Err(Error::Invalid(format!(
                "data position: batch {} of epoch {} is past the {} batches of an epoch of {} \
                 (was the checkpoint made with another dataset, --batch or --seq-len?)",
                pos.batch,
                pos.epoch,
                self.batches_per_epoch(),
                self.data.path.display()
            )));
        }
        self.pos = pos;
        Ok(())
    }

    /// The batch at the current position; advances the position.
    pub fn next_batch(&mut self) -> Batch {
        if self.pos.batch >= self.batches_per_epoch() {
            self.pos = DataPosition {
                epoch: self.pos.epoch + 1,
                batch: 0,
            };
        }
        if self.cached_epoch != Some(self.pos.epoch) {
            self.cached = self.epoch_rows(self.pos.epoch);
            self.cached_epoch = Some(self.pos.epoch);
        }
        let b = self.cfg.batch_size;
        let rows =
            &self.cached[self.pos.batch * b..((self.pos.batch + 1) * b).min(self.cached.len())];
        let mut batch = Batch {
            rows: rows.len(),
            seq_len: self.cfg.seq_len,
            ids: Vec::with_capacity(rows.len() * self.cfg.seq_len),
            targets: Vec::with_capacity(rows.len() * self.cfg.seq_len),
        };
        for (ids, targets) in rows {
            batch.ids.extend_from_slice(ids);
            batch.targets.extend_from_slice(targets);
        }
        self.pos.batch += 1;
        batch
    }

    /// The order of the examples in `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        if self.cfg.shuffle {
            let mut rng = SplitMix64(self.cfg.seed.wrapping_add(epoch));
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    fn epoch_rows(&self, epoch: u64) -> Vec<(Vec<u32>, Vec<u32>)> {
        let l = self.cfg.seq_len;
        let pad = |ids: &mut Vec<u32>, targets: &mut Vec<u32>| {
            ids.resize(l, self.cfg.pad_id);
            targets.resize(l, IGNORE);
        };
        let order = self.epoch_order(epoch);
        let mut rows = Vec::with_capacity(self.rows_per_epoch);
        match self.cfg.layout {
            Layout::Pad => {
                for &i in &order {
                    let ex = &self.data.examples[i];
                    let n = ex.len().min(l);
                    let (mut ids, mut targets) = (ex.ids[..n].to_vec(), ex.targets[..n].to_vec());
                    pad(&mut ids, &mut targets);
                    rows.push((ids, targets));
                }
            }
            Layout::Pack => {
                let (mut ids, mut targets) = (Vec::with_capacity(l), Vec::with_capacity(l));
                let eos = self.data.eos_id;
                for &i in &order {
                    let ex = &self.data.examples[i];
                    let sep = (ex.ids.last() != Some(&eos)).then_some((eos, IGNORE));
                    let tokens = ex.ids.iter().copied().zip(ex.targets.iter().copied());
                    for (id, target) in tokens.chain(sep) {
                        ids.push(id);
                        targets.push(target);
                        if ids.len() == l {
                            rows.push((std::mem::take(&mut ids), std::mem::take(&mut targets)));
                        }
                    }
                }
                if !ids.is_empty() {
                    pad(&mut ids, &mut targets);
                    rows.push((ids, targets));
                }
            }
        }
        debug_assert_eq!(rows.len(), self.rows_per_epoch);
        rows
    }
}

/// Tokens in a packed epoch: every example plus its separator EOS.
fn stream_len(data: &Dataset) -> usize {
    data.examples
        .iter()
        .map(|ex| ex.len() + usize::from(ex.ids.last() != Some(&data.eos_id)))
        .sum()
}

/// SplitMix64 (Steele, Lea, Flood 2014): a small generator with a fixed,
/// documented output, so shuffles never change with a dependency's version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (multiply-shift; the bias is below 2⁻³² for any
    /// dataset size that fits in memory).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}
