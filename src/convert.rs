//! `engine convert`: a llama-architecture GGUF file → an HF-style model folder
//! (`model.safetensors`, `config.json`, `generation_config.json`,
//! `tokenizer.json`, `tokenizer_config.json`) that both engine and HF
//! transformers load.
//!
//! Every tensor is dequantized to f32 (see [`crate::quant::dequant`]) and
//! written in the requested dtype. llama.cpp's converter permutes the rows of
//! `attn_q` / `attn_k` for its RoPE layout; `unpermute_rows` undoes that.
//! The file is read in HF's terms by [`HfView`], as `--model FILE.gguf`
//! reads it.

use crate::error::{Error, Result};
use crate::model::folder::{write_dir_atomically, write_json};
use crate::model::gguf::Gguf;
use crate::model::gguf_model::HfView;
use crate::model::llama_gguf::{unpermute_rows, TensorName};
use crate::tensor::DType;
use serde_json::{json, Map};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The file a folder written by [`convert`] carries, so a later convert may
/// replace it.
pub const MARKER: &str = ".engine-convert";

/// What [`convert`] did, for printing.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub input: PathBuf,
    pub out_dir: PathBuf,
    /// `general.architecture`.
    pub arch: String,
    /// `general.name`, if the file has one.
    pub name: Option<String>,
    pub dtype: DType,
    /// Tensors written to model.safetensors.
    pub n_tensors: usize,
    /// Values in those tensors.
    pub n_params: usize,
    pub n_layers: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    /// How many GGUF tensors were stored in each ggml type, e.g. {"Q4_1": 210}.
    pub source_types: BTreeMap<String, usize>,
}

impl fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let types: Vec<String> = self
            .source_types
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        write!(
            f,
            "{} ({}): {} layers, vocab {}, {} tensors, {} parameters ({} in the GGUF), {} embeddings, written as {} to {}",
            self.name.as_deref().unwrap_or("model"),
            self.arch,
            self.n_layers,
            self.vocab_size,
            self.n_tensors,
            self.n_params,
            types.join(", "),
            if self.tied_embeddings { "tied" } else { "untied" },
            self.dtype,
            self.out_dir.display()
        )
    }
}

/// Converts the llama GGUF `input` into an HF-style folder `out_dir`, with
/// weights stored as `dtype`.
///
/// Crash safety: everything is written into a temporary sibling folder
/// (`.NAME.convert-tmp-PID`), which is renamed to `out_dir` only when
/// complete; on error it is removed. A crash can leave that temporary folder
/// behind, never a half-written `out_dir`.
///
/// Overwriting: an existing `out_dir` is replaced only if it is empty or was
/// written by a previous convert (it holds the [`MARKER`] file); any other
/// non-empty folder is refused with [`Error::Invalid`], so a convert never
/// deletes files it did not make.
///
/// Refused inputs: those [`HfView::read`] and [`HfView::tokenizer`] refuse.
pub fn convert(input: &Path, out_dir: &Path, dtype: DType) -> Result<ConvertSummary> {
    let g = Gguf::open(input)?;
    let hf = HfView::read(&g)?;
    let tokenizer = hf.tokenizer(&g)?;
    let mut config = hf.config.clone();
    config["torch_dtype"] = json!(dtype.hf_name());
    let mut n_params = 0;
    let is_convert_output = |d: &Path| d.join(MARKER).exists();
    write_dir_atomically(out_dir, "convert", is_convert_output, |tmp| {
        n_params = write_safetensors(&g, &hf.plan, dtype, &tmp.join("model.safetensors"))?;
        write_json(&tmp.join("config.json"), &config)?;
        write_json(&tmp.join("generation_config.json"), &hf.generation_config)?;
        write_json(&tmp.join("tokenizer.json"), &tokenizer.tokenizer)?;
        write_json(&tmp.join("tokenizer_config.json"), &tokenizer.config)?;
        let marker = tmp.join(MARKER);
        fs::write(&marker, format!("converted from {}\n", input.display()))
            .map_err(|e| Error::io(&marker, e))
    })?;

    let mut source_types = BTreeMap::new();
    for t in g.tensors() {
        *source_types
            .entry(t.ggml_type.name().to_string())
            .or_insert(0) += 1;
    }
    Ok(ConvertSummary {
        input: input.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        arch: hf.arch,
        name: g
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(String::from),
        dtype,
        n_tensors: hf.plan.len(),
        n_params,
        n_layers: hf.hparams.n_layers,
        vocab_size: hf.vocab,
        tied_embeddings: hf.tied,
        source_types,
    })
}

/// Writes the planned tensors to a safetensors file, one tensor at a time
/// (so memory holds one dequantized tensor, not the model). Returns the
/// number of values written.
fn write_safetensors(g: &Gguf, plan: &[TensorName], dtype: DType, path: &Path) -> Result<usize> {
    let st_dtype = match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
    };
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut n_params = 0usize;
    for p in plan {
        let n: usize = p.shape.iter().product();
        let end = offset + n * dtype.size();
        header.insert(
            p.hf.clone(),
            json!({"dtype": st_dtype, "shape": p.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
        n_params += n;
    }
    let mut header = serde_json::to_string(&header).expect("JSON values serialize");
    // The data that follows starts 8-byte aligned, as safetensors writes it.
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut bytes = Vec::new();
    for p in plan {
        let (shape, mut values) = g.tensor_f32(&p.gguf)?;
        if let Some(n_head) = p.rope_heads {
            values = unpermute_rows(&values, shape[0], shape[1], n_head);
        }
        bytes.clear();
        dtype.encode_into(&values, &mut bytes);
        w.write_all(&bytes).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(n_params)
}
