//! `engine generate`: text after a prompt, streamed to stdout.

use super::common::{weights, count, count_u64, folder, model_path, load_model_and_adapter, on_device, open_device, rate, DeviceArg};
use engine::model::quant_types::Weights;
use anyhow::{bail, Result};
use engine::backend::sample::SamplerConfig;
use engine::backend::Backend;
use engine::infer::generate::{generate, GenerateOptions};
use engine::infer::stream::TextStream;
use engine::tokenizer::{Message, Tokenizer};
use std::io::Write;
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
    /// The text to continue (or, with --chat, the user's message).
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: whatever the template uses).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Stop after this many new tokens (or at end of sequence / end of turn).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = count, allow_negative_numbers = true)]
    max_tokens: usize,
    /// 0 picks the most likely token every time (greedy).
    #[arg(long, value_name = "T", default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, value_name = "K", default_value_t = 0, value_parser = count, allow_negative_numbers = true)]
    top_k: usize,
    /// Sample within the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P", default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Seed of the sampling random numbers: same seed, same text.
    #[arg(long, default_value_t = 0, value_parser = count_u64, allow_negative_numbers = true)]
    seed: u64,
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
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a number ≥ 0, got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    model_path(&a.model)?;
    if let Some(adapter) = &a.adapter {
        folder("adapter", adapter)?;
    }
    on_device!(open_device(a.device)?, |be| generate_on(be, &a))
}

fn generate_on<B: Backend>(be: B, a: &Args) -> Result<()> {
    let tokenizer = Tokenizer::load(&a.model)?;
    let (llm, adapter) = load_model_and_adapter(be, &a.model, a.adapter.as_deref(), a.weights)?;
    let ids = if a.chat {
        let mut messages = Vec::new();
        if let Some(system) = &a.system {
            messages.push(Message {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        let text = tokenizer.apply_chat_template(&messages, true)?;
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&a.prompt, true)?
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop_ids: tokenizer.stop_ids(&llm.config.eos_token_ids),
    };
    let mut stream = TextStream::new(&tokenizer);
    let mut stdout = std::io::stdout().lock();
    let gen = generate(&llm, adapter.as_ref(), &ids, &opts, |id| {
        let text = stream.push(id)?;
        // A closed pipe (`| head`) ends the generation quietly.
        if stdout
            .write_all(text.as_bytes())
            .and_then(|_| stdout.flush())
            .is_err()
        {
            return Err(engine::Error::Invalid("stdout closed".into()));
        }
        Ok(())
    })?;
    if !gen.ids.is_empty() {
        writeln!(stdout).ok();
    }
    // A rate only where something was timed: the prefill's over the prompt,
    // the decode's over the tokens after the first.
    let shown = |r: Option<f64>| r.map(|r| format!(", {r:.1} tok/s")).unwrap_or_default();
    eprintln!(
        "[prompt {} tokens{} | generated {} tokens{}]",
        gen.prompt_tokens,
        shown(rate(gen.prompt_tokens, gen.prefill)),
        gen.ids.len(),
        shown(rate(gen.ids.len().saturating_sub(1), gen.decode)),
    );
    Ok(())
}
