//! Fine-tuning: the data pipeline (JSONL → token ids and next-token targets →
//! batches), the learning-rate schedule, and the trainer loop with its
//! metrics and checkpoints.
//!
//! - [`data`]: reading `{"text"}`, `{"prompt","completion"}` and
//!   `{"messages"}` lines into [`data::Example`]s (ids + targets, [`IGNORE`]
//!   where no loss is taken).
//! - [`batch`]: rows of exactly `seq_len` tokens by truncation + padding or by
//!   packing, batches of B rows, per-epoch shuffling from a seed, and a
//!   resumable [`batch::DataPosition`].
//! - [`schedule`]: warmup then cosine/linear decay, and the number of
//!   optimizer steps for `--steps` / `--epochs` with gradient accumulation.
//! - [`trainer`]: `engine finetune`: the loop, eval, interrupts, the result.
//! - [`checkpoint`]: resumable checkpoints, written atomically.
//! - [`metrics`]: `metrics.jsonl` and the `loss.svg` curve.

pub mod batch;
pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod schedule;
pub mod trainer;

pub use batch::{Batch, BatchConfig, DataPosition, Layout, Loader};
pub use data::{Dataset, Example, Record, IGNORE};
pub use schedule::{total_steps, Decay, Length, Schedule};
