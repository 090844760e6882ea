//! `engine finetune`: LoRA (--lora-rank) or every weight (--full) on a JSONL
//! dataset.

use super::common::{weights, count, count_u64, cpu_unless_asked, model_path, on_device, DeviceArg};
use engine::model::quant_types::Weights;
use anyhow::{bail, Context, Result};
use engine::backend::Backend;
use engine::model::lora::{parse_targets, LoraConfig};
use engine::train::batch::Layout;
use engine::train::schedule::{Decay, Length};
use engine::train::trainer::{finetune, Outcome, RunPaths, TrainOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("method").required(true).args(["lora_rank", "full"])))]
pub struct Args {
    /// Model folder (config.json, *.safetensors, tokenizer.json), or a
    /// llama GGUF file, run with its matrices in their own formats.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: PathBuf,
    /// The format of a model folder's matrices once loaded: f32, bf16, or
    /// quantized as llama-quantize would (q8_0, q4_0, q4_1, q4_k, q6_k).
    #[arg(long, value_name = "FORMAT", default_value = "f32", value_parser = weights)]
    weights: Weights,
    /// Training data, JSONL: one {"text"}, {"prompt","completion"} or {"messages"} per line.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Eval data (same format): its mean loss every --eval-every steps and at the end.
    #[arg(long, value_name = "FILE")]
    eval: Option<PathBuf>,
    /// Train a LoRA adapter of this rank (the base stays frozen).
    #[arg(long, value_name = "R", value_parser = count, allow_negative_numbers = true)]
    lora_rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/rank (default: 2 × rank).
    #[arg(long, value_name = "A", requires = "lora_rank", allow_negative_numbers = true)]
    lora_alpha: Option<f32>,
    /// Dropout on the LoRA branch's input.
    #[arg(long, value_name = "P", default_value_t = 0.0, requires = "lora_rank", allow_negative_numbers = true)]
    lora_dropout: f32,
    /// Projections to adapt, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj), or all.
    #[arg(long, default_value = "all", requires = "lora_rank")]
    lora_targets: String,
    /// rsLoRA: scale by alpha/sqrt(rank) instead of alpha/rank.
    #[arg(long, requires = "lora_rank")]
    rslora: bool,
    /// Train every weight (f32 master weights and AdamW state).
    #[arg(long)]
    full: bool,
    /// Optimizer steps to take.
    #[arg(long, value_name = "N", conflicts_with = "epochs", value_parser = count_u64, allow_negative_numbers = true)]
    steps: Option<u64>,
    /// Passes over the training data (default 1; fractions allowed).
    #[arg(long, value_name = "E", allow_negative_numbers = true)]
    epochs: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long, value_name = "B", default_value_t = 8, value_parser = count, allow_negative_numbers = true)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, value_name = "G", default_value_t = 1, value_parser = count, allow_negative_numbers = true)]
    grad_accum: usize,
    /// Tokens per sequence: longer examples are truncated, shorter ones padded.
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = count, allow_negative_numbers = true)]
    seq_len: usize,
    /// Pack examples into full sequences of --seq-len instead of padding each.
    #[arg(long)]
    pack: bool,
    /// Peak learning rate (default: 2e-4 for LoRA, 2e-5 for --full).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Learning rate at the end of the decay.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_lr: f64,
    /// Steps of linear warmup.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = count_u64, allow_negative_numbers = true)]
    warmup: u64,
    /// Decay after warmup: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    decay: String,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f64,
    /// Clip the gradients' global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    max_grad_norm: f64,
    /// Seed of the adapter's initialisation, the shuffling and dropout.
    #[arg(long, default_value_t = 0, value_parser = count_u64, allow_negative_numbers = true)]
    seed: u64,
    /// Eval loss every N steps (0: only at the end).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = count_u64, allow_negative_numbers = true)]
    eval_every: u64,
    /// Write a checkpoint every K steps (0: never; Ctrl-C still writes one).
    #[arg(long, value_name = "K", default_value_t = 100, value_parser = count_u64, allow_negative_numbers = true)]
    save_every: u64,
    /// Output folder: the adapter (or model), metrics.jsonl, loss.svg, checkpoints.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Continue the run in this folder (its latest checkpoint) or from this checkpoint.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Recompute each layer's activations in the backward instead of keeping
    /// them: less memory for about one more forward pass; the same results.
    #[arg(long)]
    recompute: bool,
    /// Where the model runs [default: auto: the CPU, until a real GPU has run
    /// the training kernels; cuda or emu tries them].
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

pub fn run(a: Args) -> Result<()> {
    model_path(&a.model)?;
    on_device!(cpu_unless_asked(a.device, "training")?, |be| finetune_on(
        be, &a
    ))
}

fn finetune_on<B: Backend>(be: B, a: &Args) -> Result<()> {
    let lora = match a.lora_rank {
        Some(rank) => Some(LoraConfig::new(
            rank,
            a.lora_alpha.unwrap_or(2.0 * rank as f32),
            a.lora_dropout,
            parse_targets(&a.lora_targets)?,
            a.rslora,
        )?),
        None => None,
    };
    let decay = match a.decay.as_str() {
        "cosine" => Decay::Cosine,
        "linear" => Decay::Linear,
        "constant" => Decay::Constant,
        other => bail!("--decay must be cosine, linear or constant, not {other:?}"),
    };
    if !(a.max_grad_norm >= 0.0 && a.max_grad_norm.is_finite()) {
        bail!(
            "--max-grad-norm must be a number ≥ 0, got {}",
            a.max_grad_norm
        );
    }
    if !(a.weight_decay >= 0.0 && a.weight_decay.is_finite()) {
        bail!(
            "--weight-decay must be a number ≥ 0, got {}",
            a.weight_decay
        );
    }
    let opts = TrainOptions {
        length: match a.steps {
            Some(n) => Length::Steps(n),
            None => Length::Epochs(a.epochs.unwrap_or(1.0)),
        },
        batch: a.batch,
        grad_accum: a.grad_accum,
        seq_len: a.seq_len,
        layout: if a.pack { Layout::Pack } else { Layout::Pad },
        lr: a.lr.unwrap_or(if lora.is_some() { 2e-4 } else { 2e-5 }),
        lora,
        min_lr: a.min_lr,
        warmup: a.warmup,
        decay,
        weight_decay: a.weight_decay,
        betas: (0.9, 0.999),
        eps: 1e-8,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        recompute: a.recompute,
        weights: a.weights,
    };
    let paths = RunPaths {
        model: &a.model,
        data: &a.data,
        eval: a.eval.as_deref(),
        out: &a.out,
        resume: a.resume.as_deref(),
    };
    // The first Ctrl-C asks for a checkpoint after the current step; a
    // second one quits at once (checkpoints are written atomically).
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })
    .context("cannot install the Ctrl-C handler")?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match finetune(be, &paths, &opts, &interrupt, progress)? {
        Outcome::Finished {
            steps,
            train_loss,
            eval_loss,
            tokens_per_s,
        } => {
            let eval = eval_loss
                .map(|l| format!(", eval loss {l:.4}"))
                .unwrap_or_default();
            let what = if opts.lora.is_some() {
                format!(
                    "adapter: --model {} --adapter {}",
                    a.model.display(),
                    a.out.display()
                )
            } else {
                format!("model: --model {}", a.out.display())
            };
            println!(
                "trained {steps} steps ({tokens_per_s:.0} tok/s): loss {train_loss:.4}{eval}; \
                 use the {what}"
            );
        }
        Outcome::Interrupted { step, checkpoint } => {
            eprintln!(
                "stopped after step {step}: checkpoint {}; continue with --resume {}",
                checkpoint.display(),
                a.out.display()
            );
            std::process::exit(130);
        }
    }
    Ok(())
}
