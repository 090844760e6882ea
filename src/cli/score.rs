//! `engine score`: the log-probability of each token of a text given the
//! ones before it.

use super::common::{weights, count, folder, model_path, load_model, on_device, open_device, DeviceArg};
use engine::model::quant_types::Weights;
use anyhow::{Context, Result};
use engine::backend::Backend;
use engine::infer::score::score_windowed;
use engine::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (config.json, *.safetensors, tokenizer.json), or a
    /// llama GGUF file, run with its matrices in their own formats.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: PathBuf,
    /// The format of a model folder's matrices once loaded: f32, bf16, or
    /// quantized as llama-quantize would (q8_0, q4_0, q4_1, q4_k, q6_k).
    #[arg(long, value_name = "FORMAT", default_value = "f32", value_parser = weights)]
    weights: Weights,
    /// The text to score (no special tokens are added).
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// Score the contents of this file instead.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Print one JSON object: token_ids, logprobs, nll, ppl.
    #[arg(long)]
    json: bool,
    /// Tokens per forward pass [default: the model's context]. A longer text
    /// is scored in windows of N tokens that advance by N/2: each token is
    /// scored once, with at least N/2 tokens before it as context (all of
    /// them in the first window). Smaller is faster on long texts.
    #[arg(long, value_name = "N", value_parser = count, allow_negative_numbers = true)]
    window: Option<usize>,
    /// A LoRA adapter folder (PEFT format) to apply, unmerged.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Where the model runs [default: auto: the first CUDA GPU if one can be
    /// used, else the CPU; stderr names a GPU, and says why not when --device
    /// auto is given].
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

pub fn run(a: Args) -> Result<()> {
    model_path(&a.model)?;
    if let Some(adapter) = &a.adapter {
        folder("adapter", adapter)?;
    }
    on_device!(open_device(a.device)?, |be| score_on(be, &a))
}

fn score_on<B: Backend>(be: B, a: &Args) -> Result<()> {
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => unreachable!("clap requires --text or --file"),
    };
    let tokenizer = Tokenizer::load(&a.model)?;
    let llm = load_model(be, &a.model, a.adapter.as_deref(), a.weights)?;
    let ids = tokenizer.encode(&text, false)?;
    let window = a.window.unwrap_or(llm.config.max_position_embeddings);
    let s = score_windowed(&llm, &ids, window)?;
    if s.windows > 1 {
        eprintln!(
            "[{} tokens: longer than a window of {window}, scored in {} windows \
             advancing by {}]",
            ids.len(),
            s.windows,
            window / 2
        );
    }
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        for (i, lp) in s.logprobs.iter().enumerate() {
            let id = s.token_ids[i + 1];
            let piece = tokenizer.decode(&[id])?;
            println!("{:>6} {:>8} {:>10.4}  {:?}", i + 1, id, lp, piece);
        }
        println!(
            "tokens {}  nll {:.4}  ppl {:.4}",
            s.token_ids.len(),
            s.nll,
            s.ppl
        );
    }
    Ok(())
}
