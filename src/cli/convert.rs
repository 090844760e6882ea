//! `engine convert`: a GGUF file into an HF model folder.

use anyhow::Result;
use engine::tensor::DType;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file.
    input: PathBuf,
    /// The folder to write (must be new, empty, or an earlier convert's output).
    out_dir: PathBuf,
    /// Element type of the written weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(a: Args) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    let summary = engine::convert::convert(&a.input, &a.out_dir, dtype)?;
    println!("{summary}");
    Ok(())
}
