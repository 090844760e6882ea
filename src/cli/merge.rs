//! `engine merge`: fold a LoRA adapter (PEFT format) into a model's weights,
//! as a new model folder.

use super::common::folder;
use anyhow::Result;
use engine::model::config::LlamaConfig;
use engine::model::lora::{merge_to_dir, LoraAdapter};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The base model folder.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// The folder to write (must not exist yet, or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    folder("model", &a.model)?;
    folder("adapter", &a.adapter)?;
    let config = LlamaConfig::from_file(&a.model.join("config.json"))?;
    let lora = LoraAdapter::load(&a.adapter, &config)?;
    let s = merge_to_dir(&a.model, &lora, &a.out)?;
    println!(
        "merged {} of {} tensors (rank {}, scaling {}) into {}",
        s.n_merged,
        s.n_tensors,
        lora.config.rank,
        lora.config.scaling(),
        a.out.display()
    );
    Ok(())
}
