//! Inference jobs over a loaded model: sampling, generation and scoring.

pub mod engine;
pub mod generate;
pub mod kv_blocks;
pub mod metrics;
pub mod scheduler;
pub mod score;
pub mod stream;
pub mod thread;

/// Tokens per forward call while prefilling: bounds activation memory for
/// long prompts without costing speed (the matrix products are already large).
pub const PREFILL_CHUNK: usize = 256;
