//! Fine-tuning: the data pipeline (JSONL → token ids and next-token targets →
//! batches) and the learning-rate schedule. The optimizer, the trainer loop
//! and checkpoints build on these.
//!
//! - [`data`]: reading `{"text"}`, `{"prompt","completion"}` and
//!   `{"messages"}` lines into [`data::Example`]s (ids + targets, [`IGNORE`]
//!   where no loss is taken).
//! - [`batch`]: rows of exactly `seq_len` tokens by truncation + padding or by
//!   packing, batches of B rows, per-epoch shuffling from a seed, and a
//!   resumable [`batch::DataPosition`].
//! - [`schedule`]: warmup then cosine/linear decay, and the number of
//!   optimizer steps for `--steps` / `--epochs` with gradient accumulation.

pub mod batch;
pub mod data;
pub mod schedule;

pub use batch::{Batch, BatchConfig, DataPosition, Layout, Loader};
pub use data::{Dataset, Example, Record, IGNORE};
pub use schedule::{total_steps, Decay, Length, Schedule};
