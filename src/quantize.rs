//! `engine quantize`: a llama model — an HF folder, or a GGUF file whose
//! tensors are dequantized first — into a GGUF file of ggml block types that
//! llama.cpp loads, with the type llama.cpp's llama-quantize gives each
//! tensor.
//!
//! Which type (llama.cpp's `llama_tensor_get_type`, src/llama-quant.cpp, for
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
//!
//! Tensors are written in llama-quantize's order (by layer, then by name),
//! and the block bytes are those llama-quantize writes for the same f32
//! values (see [`crate::quant::quantize`]). A GGUF input's tensor that keeps
//! its type is copied as it is; its metadata is copied too, with the new
//! `general.file_type`, as llama-quantize does. From an HF folder the
//! metadata is built as llama.cpp's convert_hf_to_gguf.py builds it, q/k rows
//! permuted into llama.cpp's RoPE order.

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::folder;
use crate::model::gguf::{Gguf, Value};
use crate::model::gguf_tokenizer::tokenizer_metadata;
use crate::model::gguf_write::{write_gguf, TensorSpec};
use crate::model::llama_gguf::{
    gguf_tensor_names, permute_rows, tensor_names, Hparams, TensorName,
};
use crate::model::weights::SafetensorsFiles;
use crate::quant::quantize::{first_nonfinite_block, quantize_rows};
use crate::quant::GgmlType;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
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

/// llama-quantize's order of tensors (llama.cpp's `weight_name_comparer`):
/// those outside the layers first, then layer by layer, by name within each.
pub fn llama_cpp_order(name: &str) -> (i64, &str) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1);
    (layer, name)
}

/// What [`quantize`] did, for printing.
#[derive(Clone, Debug)]
pub struct QuantizeSummary {
    pub output: PathBuf,
    pub ftype: FileType,
    /// How many tensors were written in each ggml type, e.g. {"Q4_K": 120}.
    pub types: BTreeMap<String, usize>,
    /// Tensors whose rows are not whole blocks of the type they would get.
    pub fallbacks: usize,
    /// Bytes of tensor data in the input and in the output.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl fmt::Display for QuantizeSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n: usize = self.types.values().sum();
        let types: Vec<String> = self.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        let size = |b: u64| match b {
            b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
            b => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        };
        let fallbacks = match self.fallbacks {
            0 => String::new(),
            n => format!("; {n} fell back, their rows not whole blocks of their type"),
        };
        write!(
            f,
            "{}: {n} tensors as {} ({}{fallbacks}), {} → {}",
            self.output.display(),
            self.ftype,
            types.join(", "),
            size(self.bytes_in),
            size(self.bytes_out)
        )
    }
}

/// Where the weights come from.
enum Source {
    Folder(SafetensorsFiles),
    Gguf(Gguf),
}

/// Quantizes the llama model `input` (an HF folder or a GGUF file) into the
/// GGUF file `out`, written under a temporary name and renamed into place.
/// An existing `out` is replaced only if it is a GGUF file, and never when
/// it is `input` itself.
pub fn quantize(input: &Path, out: &Path, ftype: FileType) -> Result<QuantizeSummary> {
    check_output(input, out)?;
    let (source, hp, mut names, metadata) = if input.is_dir() {
        let cfg = LlamaConfig::from_file(&input.join("config.json"))?;
        let hp = Hparams::from_config(&cfg);
        let names = tensor_names(&hp, cfg.vocab_size, cfg.tie_word_embeddings);
        let mut metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            (
                "general.name".to_string(),
                Value::String(folder::name(input)),
            ),
        ];
        metadata.extend(hp.metadata(cfg.vocab_size));
        metadata.extend(file_type_keys(ftype));
        let eos = cfg.eos_token_ids.first().copied();
        metadata.extend(tokenizer_metadata(
            input,
            cfg.vocab_size,
            cfg.bos_token_id,
            eos,
        )?);
        let st = SafetensorsFiles::open_dir(input)?;
        (Source::Folder(st), hp, names, metadata)
    } else {
        let g = Gguf::open(input)?;
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::Unsupported(format!(
                "{}: architecture '{arch}' is not supported (engine quantizes llama models)",
                input.display()
            )));
        }
        let hp = Hparams::read(&g)?;
        let names = gguf_tensor_names(&g, &hp)?;
        // llama-quantize's copy: all but the layout and the type keys.
        let mut metadata: Vec<(String, Value)> = g
            .metadata
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("split.")
                    && !matches!(
                        k.as_str(),
                        "general.alignment" | "general.file_type" | "general.quantization_version"
                    )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metadata.extend(file_type_keys(ftype));
        (Source::Gguf(g), hp, names, metadata)
    };

    names.sort_by(|a, b| llama_cpp_order(&a.gguf).cmp(&llama_cpp_order(&b.gguf)));
    let inputs: Vec<TensorIn> = names
        .iter()
        .map(|n| TensorIn {
            name: n.gguf.clone(),
            ne: n.shape.iter().rev().copied().collect(),
            ty: match &source {
                Source::Folder(_) => GgmlType::F32,
                Source::Gguf(g) => g
                    .tensor_info(&n.gguf)
                    .map_or(GgmlType::F32, |t| t.ggml_type),
            },
        })
        .collect();
    let (types, fallbacks) = choose_types(&inputs, ftype, hp.n_layers);
    let specs: Vec<TensorSpec> = inputs
        .iter()
        .zip(&types)
        .map(|(t, &ty)| TensorSpec {
            name: t.name.clone(),
            ne: t.ne.clone(),
            ty,
        })
        .collect();

    let mut bytes_in = 0u64;
    let mut bytes_out = 0u64;
    write_gguf(out, &metadata, &specs, |i| {
        let (n, spec) = (&names[i], &specs[i]);
        let bytes = tensor_bytes(input, &source, n, spec)?;
        bytes_in += match &source {
            Source::Folder(st) => st.nbytes(&n.hf).unwrap_or(0),
            Source::Gguf(g) => g.tensor_info(&n.gguf).map_or(0, |t| t.nbytes),
        } as u64;
        bytes_out += bytes.len() as u64;
        Ok(bytes)
    })?;

    let mut counts = BTreeMap::new();
    for ty in &types {
        *counts.entry(ty.name().to_string()).or_insert(0) += 1;
    }
    Ok(QuantizeSummary {
        output: out.to_path_buf(),
        ftype,
        types: counts,
        fallbacks,
        bytes_in,
        bytes_out,
    })
}

/// `general.file_type` and `general.quantization_version` (ggml's block
/// layouts, version 2 since 2023).
fn file_type_keys(ftype: FileType) -> [(String, Value); 2] {
    [
        ("general.file_type".into(), Value::U32(ftype.id())),
        ("general.quantization_version".into(), Value::U32(2)),
    ]
}

/// The bytes of tensor `n` in type `spec.ty`.
fn tensor_bytes(
    input: &Path,
    source: &Source,
    n: &TensorName,
    spec: &TensorSpec,
) -> Result<Vec<u8>> {
    let mut values = match source {
        Source::Gguf(g) => {
            if g.tensor_info(&n.gguf)
                .is_some_and(|t| t.ggml_type == spec.ty)
            {
                return Ok(g.tensor_bytes(&n.gguf)?.to_vec());
            }
            g.tensor_f32(&n.gguf)?.1
        }
        Source::Folder(st) => {
            let v = st.load_f32(&n.hf, &n.shape)?;
            match n.rope_heads {
                Some(heads) => permute_rows(&v, n.shape[0], n.shape[1], heads),
                None => v,
            }
        }
    };
    let bad = |msg: String| Error::format(input, format!("tensor '{}': {msg}", n.gguf));
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        let row = spec.ne[0];
        return Err(bad(format!(
            "value {} of row {} is {}; cannot quantize",
            i % row,
            i / row,
            values[i]
        )));
    }
    let bytes = quantize_rows(spec.ty, &values, spec.ne[0])?;
    values.clear();
    if let Some(b) = first_nonfinite_block(spec.ty, &bytes) {
        return Err(bad(format!(
            "block {b} has values too large for {}: its scale overflows f16",
            spec.ty
        )));
    }
    Ok(bytes)
}

/// Refuses an output that is the input, a folder, or an existing file that
/// is not a GGUF file (a mistyped path must not overwrite something else).
fn check_output(input: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let same = match (input.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::Invalid(format!(
            "{}: the output is the input; choose another output file",
            out.display()
        )));
    }
    if out.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: is a folder; the output is a .gguf file",
            out.display()
        )));
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(out)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if !is_gguf {
        return Err(Error::Invalid(format!(
            "{}: exists and is not a GGUF file; not overwriting it",
            out.display()
        )));
    }
    Ok(())
}
