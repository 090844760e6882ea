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

    /// Values from their little-endian bytes in this type (safetensors files,
    /// device buffers), widened to f32.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// Appends `values` to `out` as little-endian bytes of this type
    /// (half precision rounds to nearest even).
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            DType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            DType::BF16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
            ),
            DType::F16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes()),
            ),
        }
    }

    /// The engine type of a safetensors element type, if engine reads it.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            _ => None,
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
