//! `engine quantize`: a model (HF folder or GGUF) into a quantized GGUF file.

use anyhow::{bail, Result};
use engine::model::quant_types::FileType;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The model: an HF folder (config.json, safetensors, tokenizer.json) or a GGUF file.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: PathBuf,
    /// Quantization: q8_0, q4_0, q4_1, q4_k (llama.cpp's Q4_K_M) or q6_k.
    #[arg(long = "type", value_name = "TYPE")]
    ftype: String,
    /// The GGUF file to write (replaced if it is one already).
    #[arg(long, value_name = "FILE.gguf")]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let ftype: FileType = a.ftype.parse()?;
    if !a.model.exists() {
        bail!("model {} does not exist", a.model.display());
    }
    let summary = engine::quantize::quantize(&a.model, &a.out, ftype)?;
    println!("{summary}");
    Ok(())
}
