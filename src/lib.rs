//! engine: fine-tune, retrieve and serve transformers with one binary.
//!
//! The arrows point one way: jobs (`convert`, `quantize`, `infer`) → `model` → `backend`.

pub mod backend;
pub mod convert;
pub mod error;
pub mod infer;
pub mod kernels_check;
pub mod model;
pub mod quant;
pub mod quantize;
pub mod rag;
pub mod serve;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
