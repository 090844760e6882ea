//! Tensor: a device buffer, its shape and its element type. No autograd: model
//! code calls forward (and later backward) ops explicitly, as llm.c does.

use crate::backend::Backend;
use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Element types of stored weights and of device buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The name safetensors and config.json (`torch_dtype`) use.
    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" => Ok(DType::F16),
            _ => Err(Error::Invalid(format!(
                "unknown dtype '{s}' (expected f32, bf16 or f16)"
            ))),
        }
    }
}

/// A buffer on a device with a row-major shape and the element type the
/// buffer holds.
pub struct Tensor<B: Backend> {
    pub buf: B::Buf,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl<B: Backend> Tensor<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows and columns when the tensor is viewed as a matrix (all leading dims
    /// folded into rows).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = *self.shape.last().unwrap_or(&1);
        (self.numel() / cols.max(1), cols)
    }
}
