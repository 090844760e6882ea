//! The learning rate over a run, and how many optimizer steps a run has.
//!
//! Steps count optimizer steps from 0. With `warmup` W and `total` T:
//!
//! - `step < W`: linear warmup, `lr = peak · (step + 1) / W`, so the first step
//!   already moves the weights and step W − 1 reaches the peak (as llm.c does;
//!   HF's schedules start at 0 instead);
//! - `W ≤ step`: decay from the peak at step W to `min_lr` at step T, over
//!   `progress = (step − W) / (T − W)`: cosine `min + (peak − min) · ½(1 + cos πp)`,
//!   linear `min + (peak − min) · (1 − p)`, or constant (no decay). The last
//!   step a run takes, T − 1, is one step short of the minimum; steps ≥ T
//!   get `min_lr`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    /// Reached at step `total` (0 by default in the CLI).
    pub min_lr: f64,
    pub warmup: u64,
    pub total: u64,
    pub decay: Decay,
}

impl Schedule {
    /// Checks the values: `0 ≤ min_lr ≤ peak_lr`, both finite, `total ≥ 1`,
    /// `warmup ≤ total`.
    pub fn new(peak_lr: f64, min_lr: f64, warmup: u64, total: u64, decay: Decay) -> Result<Self> {
        if !(peak_lr.is_finite() && peak_lr > 0.0) {
            return Err(Error::Invalid(format!(
                "--lr must be a positive number, not {peak_lr}"
            )));
        }
        if !(min_lr.is_finite() && (0.0..=peak_lr).contains(&min_lr)) {
            return Err(Error::Invalid(format!(
                "the minimum learning rate must be between 0 and --lr ({peak_lr}), not {min_lr}"
            )));
        }
        if total == 0 {
            return Err(Error::Invalid("the run has no optimizer steps".into()));
        }
        if warmup > total {
            return Err(Error::Invalid(format!(
                "--warmup {warmup} is longer than the run ({total} optimizer steps)"
            )));
        }
        Ok(Schedule {
            peak_lr,
            min_lr,
            warmup,
            total,
            decay,
        })
    }

    /// The learning rate of optimizer step `step` (from 0).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak_lr * (step + 1) as f64 / self.warmup as f64;
        }
        if self.decay == Decay::Constant {
            return self.peak_lr;
        }
        if step >= self.total {
            return self.min_lr;
        }
        let p = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        let coeff = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Decay::Linear => 1.0 - p,
            Decay::Constant => 1.0,
        };
        self.min_lr + (self.peak_lr - self.min_lr) * coeff
    }
}

/// How long a run is: `--steps N` (optimizer steps) or `--epochs E` (passes
/// over the training data; fractions allowed).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Length {
    Steps(u64),
    Epochs(f64),
}

/// Optimizer steps in a run, where one optimizer step takes `grad_accum`
/// micro-batches and an epoch has `batches_per_epoch` micro-batches.
///
/// For epochs: `ceil(E · batches_per_epoch / grad_accum)`. The loader is one
/// endless stream, so an accumulation window may run across an epoch
/// boundary, and the last step may take up to `grad_accum − 1` micro-batches
/// past the E-th epoch: every example is seen at least E times (rounded up to
/// whole micro-batches).
pub fn total_steps(length: Length, batches_per_epoch: usize, grad_accum: usize) -> Result<u64> {
    if grad_accum == 0 {
        return Err(Error::Invalid("--grad-accum must be at least 1".into()));
    }
    let steps = match length {
        Length::Steps(n) => n,
        Length::Epochs(e) => {
            if !(e.is_finite() && e > 0.0) {
                return Err(Error::Invalid(format!(
                    "--epochs must be positive, not {e}"
                )));
            }
            // Less a hair, so that 0.1 × 30 (= 3.0000000000000004) is 3.
            let micro = (e * batches_per_epoch as f64 - 1e-9).ceil().max(0.0) as u64;
            micro.div_ceil(grad_accum as u64)
        }
    };
    if steps == 0 {
        return Err(Error::Invalid(
            "the run has no optimizer steps (--steps 0, or an empty dataset)".into(),
        ));
    }
    Ok(steps)
}
