//! `engine quantize`: a llama model — an HF folder, or a GGUF file whose
//! tensors are dequantized first — into a GGUF file of ggml block types that
//! llama.cpp loads, with the type llama.cpp's llama-quantize gives each
//! tensor.
//!
//! Which type each tensor gets: [`crate::model::quant_types`].
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
use crate::model::quant_types::{choose_types, FileType, TensorIn};
use crate::model::weights::SafetensorsFiles;
use crate::quant::quantize::{first_nonfinite_block, quantize_rows};
use crate::quant::GgmlType;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

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
