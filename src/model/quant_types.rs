//! The ggml type each tensor of a llama model gets for a file type, as
//! llama.cpp's llama-quantize chooses: `engine quantize` writes them, and
//! `--weights` quantizes a model folder with them at load.
//!
//! The rules (llama.cpp's `llama_tensor_get_type`, src/llama-quant.cpp, for
//! the file types offered here; no importance matrix):
//! - 1-D tensors (the norms) are not quantized: F32.
//! - The output head — the token embedding when the two are tied — is Q6_K,
//!   or Q8_0 for a `q8_0` file or when its rows are not whole blocks of the
//!   file's type.
//! - `q4_k` is llama.cpp's Q4_K_M: Q4_K, except `attn_v` and `ffn_down` of
//!   the first and last eighth of the layers and every third layer between,
//!   which are Q6_K. (llama.cpp also gives a 70B model's `attn_v` Q5_K, a
//!   type engine does not write; here they stay Q4_K.)
//! - Every other matrix: the file's type.
//! - A K type (256-value blocks) on rows that are not whole blocks falls
//!   back as llama.cpp's `tensor_type_fallback` does: Q4_K → Q5_0,
//!   Q6_K → Q8_0; rows that are not whole 32-value blocks either → F16.

use crate::error::{Error, Result};
use crate::quant::GgmlType;
use std::fmt;
use std::str::FromStr;

/// The file types `engine quantize` writes: llama.cpp's `llama_ftype`s of
/// the same names (`q4_k` is its Q4_K_M).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
}

impl FileType {
    pub const ALL: [FileType; 5] = [
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q4_K,
        FileType::Q6_K,
    ];

    /// The `llama_ftype` number stored as `general.file_type`.
    pub fn id(self) -> u32 {
        match self {
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q4_K => 15,
            FileType::Q6_K => 18,
        }
    }

    /// The type of a matrix no rule singles out.
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q4_K => GgmlType::Q4_K,
            FileType::Q6_K => GgmlType::Q6_K,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileType::Q8_0 => "q8_0",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q4_K => "q4_k",
            FileType::Q6_K => "q6_k",
        }
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FileType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        let lower = if lower == "q4_k_m" { "q4_k" } else { &lower };
        FileType::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown quantization type '{s}' (expected q8_0, q4_0, q4_1, q4_k or q6_k)"
                ))
            })
    }
}

/// One tensor as the type rules see it.
#[derive(Clone, Debug)]
pub struct TensorIn {
    /// llama.cpp's name.
    pub name: String,
    /// Dims innermost first.
    pub ne: Vec<usize>,
    /// Its type in the input (F32 for an HF folder's).
    pub ty: GgmlType,
}

/// The types llama-quantize gives `tensors` (in its order: see
/// [`llama_cpp_order`]) for file type `ftype` in a model of `n_layers`
/// layers, and how many fell back because their rows are not whole blocks.
pub fn choose_types(
    tensors: &[TensorIn],
    ftype: FileType,
    n_layers: usize,
) -> (Vec<GgmlType>, usize) {
    let layer_kind = |name: &str, kind: &str| name.contains(&format!("{kind}.weight"));
    let n_attn_v = tensors
        .iter()
        .filter(|t| layer_kind(&t.name, "attn_v"))
        .count();
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    // llama.cpp's "use more bits" layers: the first and last eighth, and
    // every third between.
    let more_bits = |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
    let (mut i_attn_v, mut i_ffn_down, mut fallbacks) = (0, 0, 0);
    let types = tensors
        .iter()
        .map(|t| {
            let quantized =
                t.ne.len() >= 2 && t.name.ends_with("weight") && !t.name.contains("_norm.weight");
            if !quantized {
                return t.ty;
            }
            let row = t.ne[0];
            let mut ty = ftype.default_type();
            if t.name == "output.weight" || (tied && t.name == "token_embd.weight") {
                if !row.is_multiple_of(ty.block_size()) || ty == GgmlType::Q8_0 {
                    ty = GgmlType::Q8_0;
                } else {
                    ty = GgmlType::Q6_K;
                }
            } else if layer_kind(&t.name, "attn_v") {
                if ftype == FileType::Q4_K && more_bits(i_attn_v, n_attn_v) {
                    ty = GgmlType::Q6_K;
                }
                i_attn_v += 1;
            } else if t.name.contains("ffn_down") {
                if ftype == FileType::Q4_K && more_bits(i_ffn_down, n_layers) {
                    ty = GgmlType::Q6_K;
                }
                i_ffn_down += 1;
            }
            if !row.is_multiple_of(ty.block_size()) {
                fallbacks += 1;
                ty = match ty {
                    GgmlType::Q4_K => GgmlType::Q5_0,
                    GgmlType::Q6_K => GgmlType::Q8_0,
                    other => other,
                };
                if !row.is_multiple_of(ty.block_size()) {
                    ty = GgmlType::F16;
                }
            }
            ty
        })
        .collect();
    (types, fallbacks)
}

/// `--weights`: the format a model folder's matrices take at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Weights {
    /// Dense in the device's element type (f32 on the CPU).
    #[default]
    F32,
    /// Every matrix in bf16: half the memory on the CPU.
    Bf16,
    /// The types llama-quantize gives each tensor for this file type.
    Quantized(FileType),
}

impl Weights {
    /// The type of each of a model's tensors, by its llama.cpp name (`None`:
    /// dense). `tensors` are the model's, as [`choose_types`] takes them.
    pub fn types(self, tensors: &[TensorIn], n_layers: usize) -> Vec<Option<GgmlType>> {
        let matrix = |t: &TensorIn| t.ne.len() >= 2;
        match self {
            Weights::F32 => vec![None; tensors.len()],
            Weights::Bf16 => tensors
                .iter()
                .map(|t| matrix(t).then_some(GgmlType::BF16))
                .collect(),
            Weights::Quantized(ftype) => {
                let (types, _) = choose_types(tensors, ftype, n_layers);
                tensors
                    .iter()
                    .zip(types)
                    .map(|(t, ty)| (matrix(t) && ty != GgmlType::F32).then_some(ty))
                    .collect()
            }
        }
    }
}

impl FromStr for Weights {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Weights::F32),
            "bf16" => Ok(Weights::Bf16),
            other => other.parse().map(Weights::Quantized).map_err(|_| {
                Error::Invalid(format!(
                    "unknown weight format '{s}' (expected f32, bf16, q8_0, q4_0, q4_1, q4_k or q6_k)"
                ))
            }),
        }
    }
}

impl fmt::Display for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Weights::F32 => f.write_str("f32"),
            Weights::Bf16 => f.write_str("bf16"),
            Weights::Quantized(t) => t.fmt(f),
        }
    }
}
