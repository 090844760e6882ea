//! The fine-tuning loop behind `engine finetune`: full or LoRA, on any
//! device, written once against `Backend`.
//!
//! One optimizer step takes `grad_accum` micro-batches of `batch` rows of
//! `seq_len` tokens. The loss is the mean over the step's counted targets (all
//! its micro-batches together), so accumulation gives the gradient of one
//! big batch. Then: global-norm clipping, the learning rate of the schedule,
//! one AdamW step. Every `eval_every` steps the eval set's mean loss is
//! measured (no dropout), every `save_every` steps a checkpoint is written,
//! and an interrupt (Ctrl-C) writes one before returning. A run resumed from
//! a checkpoint takes the same batches, dropout masks and learning rates as
//! the uninterrupted run, so it reproduces its losses.
//!
//! `--out` ends up holding `metrics.jsonl`, `loss.svg`, the checkpoints, and
//! the result itself: the adapter's PEFT files (`--adapter OUT` loads it) or,
//! for full fine-tuning, a complete model folder (`--model OUT`).

use crate::backend::{AdamW, Backend};
use crate::error::{Error, Result};
use crate::model::llama::Llama;
use crate::model::lora::{LoraAdapter, LoraConfig};
use crate::model::quant_types::Weights;
use crate::model::train_step::{
    adamw_update, clip_grad_norm, forward_backward, grad_norm, AdamWState, Grads, TrainActivations,
    Trainable,
};
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;
use crate::train::batch::{BatchConfig, Layout, Loader};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::data::{eos_id, Dataset, IGNORE};
use crate::train::metrics::{EvalRecord, MetricsLog, TrainRecord};
use crate::train::schedule::{total_steps, Decay, Length, Schedule};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// What a run trains, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// LoRA's settings; None trains every weight.
    pub lora: Option<LoraConfig>,
    /// The format of a model folder's matrices at load (quantized: LoRA on
    /// a frozen quantized base).
    pub weights: Weights,
    pub length: Length,
    /// Rows per micro-batch.
    pub batch: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub layout: Layout,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub decay: Decay,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Global-norm clipping threshold; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Eval loss every N steps (and at the end); 0: only at the end.
    pub eval_every: u64,
    /// A checkpoint every K steps; 0: none (Ctrl-C still writes one).
    pub save_every: u64,
    /// Recompute each layer's activations in the backward instead of
    /// keeping them (activation checkpointing per layer): less memory, about
    /// one more forward of compute, the same numbers.
    pub recompute: bool,
}

/// The files of a run.
pub struct RunPaths<'a> {
    pub model: &'a Path,
    pub data: &'a Path,
    pub eval: Option<&'a Path>,
    pub out: &'a Path,
    pub resume: Option<&'a Path>,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    Finished {
        steps: u64,
        train_loss: f64,
        eval_loss: Option<f64>,
        tokens_per_s: f64,
    },
    /// Stopped by an interrupt after `step` steps, saved in `checkpoint`.
    Interrupted { step: u64, checkpoint: PathBuf },
}

/// Runs (or resumes) a fine-tune of the model in `paths.model` on `be`.
/// `interrupt` is polled between optimizer steps; `progress` shows a bar.
pub fn finetune<B: Backend>(
    be: B,
    paths: &RunPaths,
    opts: &TrainOptions,
    interrupt: &AtomicBool,
    progress: bool,
) -> Result<Outcome> {
    let tokenizer = Tokenizer::load(paths.model)?;
    let eos = eos_id(paths.model, &tokenizer)?;
    let train = Dataset::load(paths.data, &tokenizer, eos)?;
    let eval = paths
        .eval
        .map(|p| Dataset::load(p, &tokenizer, eos))
        .transpose()?;
    let batch_config = |shuffle: bool, batch_size: usize| BatchConfig {
        batch_size,
        seq_len: opts.seq_len,
        layout: opts.layout,
        shuffle,
        seed: opts.seed,
        pad_id: eos,
    };
    let train_examples = (train.len(), train.total_tokens());
    check_truncation(&train, opts)?;
    let mut loader = Loader::new(train, batch_config(true, opts.batch))?;
    let mut eval_loader = eval
        .map(|d| Loader::new(d, batch_config(false, 1)))
        .transpose()?;
    let total = total_steps(opts.length, loader.batches_per_epoch(), opts.grad_accum)?;
    let schedule = Schedule::new(opts.lr, opts.min_lr, opts.warmup, total, opts.decay)?;
    let run = run_settings(opts, total, train_examples);
    let fingerprint = checkpoint::fingerprint(paths.model)?;

    // The model, its trained parameters and the optimizer: fresh, or from
    // the checkpoint being resumed.
    let resume = match paths.resume {
        Some(p) => {
            let dir = checkpoint::find(p)?;
            let state = checkpoint::read_state(&dir)?;
            check_resume(&dir, &state, &fingerprint, &run)?;
            Some((dir, state))
        }
        None => {
            prepare_out(paths.out)?;
            None
        }
    };
    let weights_dir = match (&resume, &opts.lora) {
        (Some((dir, _)), None) => dir.as_path(), // full: the checkpoint is a model folder
        _ => paths.model,
    };
    let mut model = Llama::load_as(be, weights_dir, opts.weights)?;
    if let Some(lora) = &opts.lora {
        let adapter = match &resume {
            Some((dir, _)) => LoraAdapter::load(dir, &model.config)?,
            None => {
                let mut a = LoraAdapter::init(lora.clone(), &model.config, opts.seed)?;
                a.base_model = Some(paths.model.display().to_string());
                a
            }
        };
        model.set_adapter(&adapter)?;
    }
    let trainable = if opts.lora.is_some() {
        Trainable::Lora
    } else {
        Trainable::Full
    };
    let mut grads = Grads::new(&model, trainable)?;
    let mut opt = AdamWState::new(&model, trainable)?;
    let mut start = 0;
    if let Some((dir, state)) = &resume {
        checkpoint::load_optimizer(dir, &model, &mut opt)?;
        checkpoint::load_masters(dir, &model, &mut opt)?;
        loader.seek(state.data)?;
        start = state.step;
    }
    let mut metrics = MetricsLog::open(paths.out, resume.as_ref().map(|(_, s)| s.step))?;

    let bar = progress_bar(progress, total, start);
    let say = |msg: String| {
        if bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            bar.println(msg);
        }
    };
    if let Some((dir, _)) = &resume {
        say(format!(
            "resuming from {} at step {start} of {total}",
            dir.display()
        ));
    }
    // Training time of the runs before this one, and this one's clock.
    let before = resume.as_ref().map_or(0.0, |(_, s)| s.elapsed_s);
    let began = Instant::now();
    let save = |model: &Llama<B>, opt: &AdamWState<B>, step: u64, loader: &Loader| {
        let dir = checkpoint::checkpoint_dir(paths.out, step);
        let state = TrainerState::new(
            step,
            loader.position(),
            paths.model,
            fingerprint.clone(),
            run.clone(),
            before + began.elapsed().as_secs_f64(),
        );
        checkpoint::save(&dir, model, paths.model, opt, &state).map(|_| dir)
    };

    let mut acts: HashMap<usize, TrainActivations<B>> = HashMap::new();
    let (mut tokens_done, mut last_loss, mut last_eval) = (0usize, f64::NAN, None);
    let log_every = (total / 20).max(1);
    for step in start..total {
        if interrupt.load(Ordering::SeqCst) {
            let dir = save(&model, &opt, step, &loader)?;
            bar.abandon();
            metrics.write_plot()?;
            return Ok(Outcome::Interrupted {
                step,
                checkpoint: dir,
            });
        }
        // One optimizer step over grad_accum micro-batches.
        let batches: Vec<_> = (0..opts.grad_accum).map(|_| loader.next_batch()).collect();
        let counted: usize = batches.iter().map(|b| b.loss_tokens()).sum();
        let scale = 1.0 / counted.max(1) as f32;
        grads.zero(&model.backend)?;
        let mut loss_sum = 0.0f64;
        let mut tokens = 0;
        for (micro, b) in batches.iter().enumerate() {
            let a = match acts.entry(b.rows) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let a = TrainActivations::with_recompute(
                        &model,
                        b.rows,
                        b.seq_len,
                        opts.recompute,
                    )?;
                    say(format!(
                        "activations: {:.1} MiB for {}×{} tokens{}",
                        mib(a.bytes()),
                        b.rows,
                        b.seq_len,
                        if opts.recompute {
                            " (recomputed per layer)"
                        } else {
                            ""
                        }
                    ));
                    e.insert(a)
                }
            };
            let seed = dropout_seed(opts.seed, step, micro);
            loss_sum += forward_backward(
                &model, a, &mut grads, &b.ids, &b.targets, b.rows, b.seq_len, scale, seed,
            )? as f64;
            tokens += b.ids.len();
        }
        let norm = if opts.max_grad_norm > 0.0 {
            clip_grad_norm(&model.backend, &mut grads, opts.max_grad_norm as f32)?
        } else {
            grad_norm(&model.backend, &grads)?
        };
        let lr = schedule.lr_at(step);
        let hp = AdamW {
            lr,
            beta1: opts.betas.0,
            beta2: opts.betas.1,
            eps: opts.eps,
            weight_decay: opts.weight_decay,
            step: step + 1,
        };
        adamw_update(&mut model, &grads, &mut opt, &hp)?;

        let done = step + 1;
        tokens_done += tokens;
        let elapsed = began.elapsed().as_secs_f64();
        let tokens_per_s = tokens_done as f64 / elapsed.max(1e-9);
        last_loss = if counted > 0 {
            loss_sum / counted as f64
        } else {
            f64::NAN
        };
        metrics.train(TrainRecord {
            step: done,
            loss: last_loss,
            lr,
            grad_norm: norm as f64,
            tokens: tokens as u64,
            tokens_per_s,
            elapsed_s: before + elapsed,
            act_mib: mib(acts.values().map(TrainActivations::bytes).sum()),
        })?;
        bar.set_position(done);
        bar.set_message(format!("loss {last_loss:.4} | {tokens_per_s:.0} tok/s"));
        if bar.is_hidden() && (done % log_every == 0 || done == total) {
            eprintln!(
                "step {done}/{total}  loss {last_loss:.4}  lr {lr:.3e}  {tokens_per_s:.0} tok/s"
            );
        }
        let eval_now = opts.eval_every > 0 && done % opts.eval_every == 0 || done == total;
        if let (true, Some(ev)) = (eval_now, eval_loader.as_mut()) {
            let loss = eval_loss(&model, ev)?;
            metrics.eval(EvalRecord {
                step: done,
                eval_loss: loss,
            })?;
            metrics.write_plot()?;
            say(format!("step {done}: eval loss {loss:.4}"));
            last_eval = Some(loss);
        }
        if opts.save_every > 0 && done % opts.save_every == 0 && done < total {
            let dir = save(&model, &opt, done, &loader)?;
            say(format!("step {done}: checkpoint {}", dir.display()));
        }
    }
    bar.finish_and_clear();
    save_result(paths.out, &model, paths.model, &opt)?;
    metrics.write_plot()?;
    let elapsed = began.elapsed().as_secs_f64();
    Ok(Outcome::Finished {
        steps: total,
        train_loss: last_loss,
        eval_loss: last_eval,
        tokens_per_s: tokens_done as f64 / elapsed.max(1e-9),
    })
}

/// The mean loss over an eval set's counted targets, one row at a time
/// through the inference forward (no dropout, no gradients).
fn eval_loss<B: Backend>(model: &Llama<B>, loader: &mut Loader) -> Result<f64> {
    let (be, c) = (&model.backend, &model.config);
    let seq = loader.config().seq_len;
    let mut cache = model.new_cache(seq)?;
    let mut acts = model.new_activations(seq)?;
    let mut hidden = be.zeros(&[seq, c.hidden_size], be.dtype())?;
    let mut logits = be.zeros(&[seq, c.vocab_size], DType::F32)?;
    loader.seek(Default::default())?;
    let (mut sum, mut count) = (0.0f64, 0usize);
    for _ in 0..loader.batches_per_epoch() {
        let b = loader.next_batch();
        for r in 0..b.rows {
            cache.len = 0;
            model.forward(&mut hidden, b.row_ids(r), &mut cache, &mut acts)?;
            model.logits(&mut logits, &hidden)?;
            let targets = b.row_targets(r);
            sum += be.cross_entropy(None, &logits, targets, Some(1.0))? as f64;
            count += targets.iter().filter(|&&t| t != IGNORE).count();
        }
    }
    Ok(if count > 0 {
        sum / count as f64
    } else {
        f64::NAN
    })
}

/// With padding, an example whose loss tokens all lie past `--seq-len`
/// (a long prompt, its answer truncated away) teaches nothing: all of them
/// is an error, some of them a warning.
fn check_truncation(data: &Dataset, opts: &TrainOptions) -> Result<()> {
    if opts.layout != Layout::Pad {
        return Ok(());
    }
    let lost = data
        .examples
        .iter()
        .filter(|e| e.targets.iter().take(opts.seq_len).all(|&t| t == IGNORE))
        .count();
    if lost == data.len() {
        return Err(Error::format(
            &data.path,
            format!(
                "no example has a loss token within --seq-len {}: the prompts fill the rows \
                 and the answers are cut off; raise --seq-len",
                opts.seq_len
            ),
        ));
    }
    if lost > 0 {
        eprintln!(
            "warning: {lost} of {} examples in {} have no loss token within --seq-len {} \
             (their answers are cut off)",
            data.len(),
            data.path.display(),
            opts.seq_len
        );
    }
    Ok(())
}

/// Each micro-batch's own dropout masks, a pure function of the run's seed
/// and its place in the run (so a resumed run draws the same ones).
fn dropout_seed(seed: u64, step: u64, micro: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step << 20 | micro as u64)
}

/// Bytes in MiB.
fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The settings that decide a run's numbers; a resumed run must match them.
/// (`recompute` changes memory and time, not the numbers: it is left out,
/// so a run may be resumed with or without it.)
fn run_settings(o: &TrainOptions, total: u64, (examples, tokens): (usize, usize)) -> Json {
    json!({
        "method": if o.lora.is_some() { "lora" } else { "full" },
        "lora_rank": o.lora.as_ref().map(|l| l.rank),
        "lora_alpha": o.lora.as_ref().map(|l| l.alpha),
        "lora_dropout": o.lora.as_ref().map(|l| l.dropout),
        "lora_targets": o.lora.as_ref().map(|l| l.targets.iter().map(|t| t.name()).collect::<Vec<_>>()),
        "rslora": o.lora.as_ref().map(|l| l.rslora),
        "steps": total,
        "batch": o.batch,
        "grad_accum": o.grad_accum,
        "seq_len": o.seq_len,
        "pack": o.layout == Layout::Pack,
        "lr": o.lr,
        "min_lr": o.min_lr,
        "warmup": o.warmup,
        "decay": format!("{:?}", o.decay).to_lowercase(),
        "weight_decay": o.weight_decay,
        "betas": [o.betas.0, o.betas.1],
        "eps": o.eps,
        "max_grad_norm": o.max_grad_norm,
        "seed": o.seed,
        "train_examples": examples,
        "train_tokens": tokens,
    })
}

/// A resume continues the same run: same base weights, same settings.
fn check_resume(dir: &Path, state: &TrainerState, fingerprint: &str, run: &Json) -> Result<()> {
    let at = dir.join(checkpoint::STATE_FILE);
    if state.fingerprint != fingerprint {
        return Err(Error::Invalid(format!(
            "{}: this checkpoint was trained from another model ({}); give that model's --model",
            at.display(),
            state.base_model
        )));
    }
    if let (Some(then), Some(now)) = (state.run.as_object(), run.as_object()) {
        let changed: Vec<String> = now
            .iter()
            .filter_map(|(key, v)| {
                let old = then.get(key).unwrap_or(&Json::Null);
                (old != v).then(|| format!("{key} {old} → {v}"))
            })
            .collect();
        if !changed.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: this run's settings differ from the checkpoint's ({}); resume with the \
                 same settings and data",
                at.display(),
                changed.join(", ")
            )));
        }
    }
    Ok(())
}

/// A new run's `--out`: absent or empty, so one folder holds one run.
fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_none();
        if !empty {
            return Err(Error::Invalid(format!(
                "{}: folder exists and is not empty; continue its run with --resume {0}, or \
                 choose a new --out",
                out.display()
            )));
        }
    }
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))
}

/// Writes the trained adapter (or model) into `out`: each file into a
/// temporary folder first, then renamed into place.
fn save_result<B: Backend>(
    out: &Path,
    model: &Llama<B>,
    model_dir: &Path,
    opt: &AdamWState<B>,
) -> Result<()> {
    let tmp = out.join(".result-tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    checkpoint::write_weights(&tmp, model, model_dir, opt.master.as_ref())?;
    for e in fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
        let e = e.map_err(|e| Error::io(&tmp, e))?;
        let to = out.join(e.file_name());
        fs::rename(e.path(), &to).map_err(|err| Error::io(&to, err))?;
    }
    fs::remove_dir(&tmp).map_err(|e| Error::io(&tmp, e))
}

fn progress_bar(show: bool, total: u64, start: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} step {pos}/{len} | {msg} | {elapsed_precise} < {eta_precise}",
        )
        .expect("a valid template"),
    );
    bar.set_position(start);
    bar.reset_eta();
    bar
}
