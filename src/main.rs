//! The `engine` command line: one subcommand per job, each a thin layer over
//! the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::GpuDriver;
use engine::backend::cuda::real::Real;
use engine::backend::cuda::Cuda;
use engine::backend::sample::SamplerConfig;
use engine::backend::Backend;
use engine::infer::generate::{generate, GenerateOptions};
use engine::infer::score::score;
use engine::infer::stream::TextStream;
use engine::model::llama::Llama;
use engine::model::lora::{parse_targets, LoraAdapter, LoraConfig};
use engine::model::weights::SafetensorsFiles;
use engine::tensor::DType;
use engine::tokenizer::{Message, Tokenizer};
use engine::train::batch::Layout;
use engine::train::schedule::{Decay, Length};
use engine::train::trainer::{finetune, Outcome, RunPaths, TrainOptions};
use std::io::Write;

mod cli {
    pub mod serve;
}
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "engine",
    version,
    about = "Fine-tune, retrieve and serve transformers with one binary"
)]
struct Cli {
    /// Worker threads for the CPU device (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text after a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Log-probability of each token of a text given the ones before it.
    Score(ScoreArgs),
    /// Sentence embeddings from a BERT-family sentence-transformers folder (all-MiniLM-L6-v2).
    Embed(EmbedArgs),
    /// Answer a question from an index's passages, citing them.
    Ask(AskArgs),
    /// A RAG index of documents: add, remove, list, search.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// Describe a model folder.
    Info {
        /// Model folder (config.json, *.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
    },
    /// Convert a GGUF file into an HF model folder (safetensors, config, tokenizer).
    Convert {
        /// The GGUF file.
        input: PathBuf,
        /// The folder to write (must be new, empty, or an earlier convert's output).
        out_dir: PathBuf,
        /// Element type of the written weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Fine-tune a model on a JSONL dataset: LoRA (--lora-rank) or every weight (--full).
    Finetune(Box<FinetuneArgs>),
    /// Merge a LoRA adapter (PEFT format) into a model's weights, writing a new model folder.
    Merge {
        /// The base model folder.
        #[arg(long)]
        model: PathBuf,
        /// The adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The folder to write (must not exist yet, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve the model behind OpenAI's API (chat, completions), with continuous batching.
    Serve(Box<cli::serve::ServeArgs>),
    /// The CUDA kernels (kernels/*.cu).
    Kernels {
        #[command(subcommand)]
        command: KernelsCommand,
    },
}

#[derive(Subcommand)]
enum KernelsCommand {
    /// Compile every kernel with NVRTC and ptxas (no GPU needed) and print
    /// registers, shared memory and spills; fails on a compile error or a spill.
    Check {
        /// GPU architectures, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
        arch: Vec<String>,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Add files, or folders recursively (.txt, .md, .html): chunk, embed and
    /// store them. A changed file replaces its chunks; an unchanged one is
    /// skipped. Creates the index on first use.
    Add {
        /// The index folder.
        #[arg(long)]
        index: PathBuf,
        /// The embedder: a sentence-transformers folder (models/all-minilm-l6-v2).
        #[arg(long)]
        embedder: PathBuf,
        /// Most tokens per chunk (the embedder's tokens, [CLS]/[SEP] included).
        #[arg(long, default_value_t = 256)]
        chunk_tokens: usize,
        /// Tokens a chunk repeats from the previous one where a paragraph is cut.
        #[arg(long, default_value_t = 32)]
        overlap: usize,
        /// Where the embedder runs (auto: the CPU).
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Remove files, or every file under a folder, from the index.
    Rm {
        /// The index folder.
        #[arg(long)]
        index: PathBuf,
        /// Files or folders, as they were added.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List the indexed files and their chunks.
    Ls {
        /// The index folder.
        #[arg(long)]
        index: PathBuf,
    },
    /// The chunks nearest a query, best first.
    Search {
        /// The index folder.
        #[arg(long)]
        index: PathBuf,
        /// The embedder the index was built with.
        #[arg(long)]
        embedder: PathBuf,
        /// How many chunks.
        #[arg(short, default_value_t = 5)]
        k: usize,
        /// Print a JSON array of {"rank", "score", "source", "lines", "text"}.
        #[arg(long)]
        json: bool,
        /// Where the embedder runs (auto: the CPU).
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// The query.
        query: String,
    },
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DeviceArg {
    /// The first CUDA GPU if one can be used, else the CPU (says which, and why).
    Auto,
    /// The CPU (f32).
    Cpu,
    /// The first CUDA GPU (bf16 kernels compiled by NVRTC).
    Cuda,
    /// The CUDA kernels in the CPU emulator (a build with `--features emu`).
    Emu,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
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
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample within the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling random numbers: same seed, same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A LoRA adapter folder (PEFT format) to apply, unmerged.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// A sentence-transformers folder (modules.json, 1_Pooling/, config.json,
    /// model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A text to embed; repeat for several.
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    text: Vec<String>,
    /// Embed each line of this file instead (blank lines are skipped).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Print a JSON array of {"text", "embedding"} (every value) instead.
    #[arg(long)]
    json: bool,
    /// Texts per forward pass (each padded to the longest in its batch).
    #[arg(long, default_value_t = engine::model::bert::DEFAULT_BATCH_SIZE)]
    batch: usize,
    /// Where the model runs (auto: the CPU, until the encoder has CUDA kernels).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

#[derive(clap::Args)]
struct AskArgs {
    /// The model that answers (config.json, *.safetensors, tokenizer.json with a chat template).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT format), applied unmerged.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The index folder (`engine index add`).
    #[arg(long)]
    index: PathBuf,
    /// The embedder the index was built with.
    #[arg(long)]
    embedder: PathBuf,
    /// How many passages to retrieve (SmolLM2-135M stays closer to the
    /// text with few).
    #[arg(short, default_value_t = 2)]
    k: usize,
    /// Most tokens of the answer.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Print {"answer", "citations", "passages"} as JSON instead of streaming.
    #[arg(long)]
    json: bool,
    /// Where the model runs (the embedder runs on the CPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// The question.
    question: String,
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// Model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The text to score (no special tokens are added).
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// Score the contents of this file instead.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Print one JSON object: token_ids, logprobs, nll, ppl.
    #[arg(long)]
    json: bool,
    /// A LoRA adapter folder (PEFT format) to apply, unmerged.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("method").required(true).args(["lora_rank", "full"])))]
struct FinetuneArgs {
    /// Model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Training data, JSONL: one {"text"}, {"prompt","completion"} or {"messages"} per line.
    #[arg(long)]
    data: PathBuf,
    /// Eval data (same format): its mean loss every --eval-every steps and at the end.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Train a LoRA adapter of this rank (the base stays frozen).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/rank (default: 2 × rank).
    #[arg(long, requires = "lora_rank")]
    lora_alpha: Option<f32>,
    /// Dropout on the LoRA branch's input.
    #[arg(long, default_value_t = 0.0, requires = "lora_rank")]
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
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Passes over the training data (default 1; fractions allowed).
    #[arg(long)]
    epochs: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Tokens per sequence: longer examples are truncated, shorter ones padded.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Pack examples into full sequences of --seq-len instead of padding each.
    #[arg(long)]
    pack: bool,
    /// Peak learning rate (default: 2e-4 for LoRA, 2e-5 for --full).
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the decay.
    #[arg(long, default_value_t = 0.0)]
    min_lr: f64,
    /// Steps of linear warmup.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Decay after warmup: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    decay: String,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the gradients' global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of the adapter's initialisation, the shuffling and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Eval loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// Write a checkpoint every K steps (0: never; Ctrl-C still writes one).
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Output folder: the adapter (or model), metrics.jsonl, loss.svg, checkpoints.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in this folder (its latest checkpoint) or from this checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Recompute each layer's activations in the backward instead of keeping
    /// them: less memory for about one more forward pass; the same results.
    #[arg(long)]
    recompute: bool,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

/// An opened device (one per process, so its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Device {
    Cpu,
    Cuda(Real),
    #[cfg(feature = "emu")]
    Emu,
}

fn open_device(arg: DeviceArg) -> Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda(Real::new(0).context("--device cuda")?),
        #[cfg(feature = "emu")]
        DeviceArg::Emu => Device::Emu,
        #[cfg(not(feature = "emu"))]
        DeviceArg::Emu => bail!("--device emu needs engine built with `--features emu`"),
        DeviceArg::Auto => match Real::new(0) {
            Ok(gpu) => {
                eprintln!("device: {}", gpu.name());
                Device::Cuda(gpu)
            }
            Err(why) => {
                eprintln!("device: cpu (no CUDA GPU: {why})");
                Device::Cpu
            }
        },
    })
}

/// Runs `$body` with `$be` bound to the backend of `$device`.
macro_rules! on_device {
    ($device:expr, |$be:ident| $body:expr) => {
        match $device {
            Device::Cpu => {
                let $be = Cpu;
                $body
            }
            Device::Cuda(gpu) => {
                let $be = Cuda::new(gpu);
                $body
            }
            #[cfg(feature = "emu")]
            Device::Emu => {
                let $be = Cuda::new(engine::backend::cuda::driver::Emu::new());
                $body
            }
        }
    };
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        // One line: the error and its causes, as ripgrep prints them.
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    // The server's engine thread runs on the pool; the HTTP side must not
    // hold a worker.
    if let Command::Serve(args) = cli.command {
        return cli::serve::run(*args);
    }
    // The command runs on a thread of the pool, so that each CPU op's
    // parallel loop starts where it is called. From outside the pool every
    // op wakes a worker and sleeps until it is done: on one thread that
    // round trip cost a third of a decoded token's time.
    rayon::scope(|_| command(cli.command))
}

fn command(command: Command) -> Result<()> {
    match command {
        Command::Serve(_) => unreachable!("served outside the pool"),
        Command::Generate(args) => {
            on_device!(open_device(args.device)?, |be| generate_cmd(be, &args))?
        }
        Command::Score(args) => on_device!(open_device(args.device)?, |be| score_cmd(be, &args))?,
        Command::Embed(args) => {
            on_device!(encoder_device(args.device)?, |be| embed_cmd(be, &args))?
        }
        Command::Ask(args) => on_device!(open_device(args.device)?, |be| ask_cmd(be, &args))?,
        Command::Index { command } => index_cmd(command)?,
        Command::Info { model } => info(&model)?,
        Command::Finetune(args) => {
            // The training kernels have run only in the emulator so far:
            // `auto` trains on the CPU until a real GPU has run them.
            let device = match args.device {
                DeviceArg::Auto => {
                    eprintln!(
                        "device: cpu (CUDA training is verified only in the emulator so far; \
                         --device cuda tries it)"
                    );
                    Device::Cpu
                }
                other => open_device(other)?,
            };
            on_device!(device, |be| finetune_cmd(be, &args))?
        }
        Command::Convert {
            input,
            out_dir,
            dtype,
        } => {
            let dtype: DType = dtype.parse()?;
            let summary = engine::convert::convert(&input, &out_dir, dtype)?;
            println!("{summary}");
        }
        Command::Merge {
            model,
            adapter,
            out,
        } => {
            let config = engine::model::config::LlamaConfig::from_file(&model.join("config.json"))?;
            let lora = engine::model::lora::LoraAdapter::load(&adapter, &config)?;
            let s = engine::model::lora::merge_to_dir(&model, &lora, &out)?;
            println!(
                "merged {} of {} tensors (rank {}, scaling {}) into {}",
                s.n_merged,
                s.n_tensors,
                lora.config.rank,
                lora.config.scaling(),
                out.display()
            );
        }
        Command::Kernels {
            command: KernelsCommand::Check { arch },
        } => {
            let report = engine::kernels_check::inspect(&arch)?;
            println!("{report}");
            report.ensure_no_spills()?;
        }
    }
    Ok(())
}

/// Loads a model folder and, when given, applies a LoRA adapter to it.
fn load_model<B: Backend>(be: B, dir: &Path, adapter: Option<&Path>) -> Result<Llama<B>> {
    let mut llm = Llama::load(be, dir)?;
    if let Some(adapter) = adapter {
        let lora = LoraAdapter::load(adapter, &llm.config)?;
        llm.set_adapter(&lora)?;
    }
    Ok(llm)
}

fn generate_cmd<B: Backend>(be: B, a: &GenerateArgs) -> Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a number ≥ 0, got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    let tokenizer = Tokenizer::load(&a.model)?;
    let llm = load_model(be, &a.model, a.adapter.as_deref())?;
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
    let gen = generate(&llm, &ids, &opts, |id| {
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
    writeln!(stdout).ok();
    let rate = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "[prompt {} tokens, {:.1} tok/s | generated {} tokens, {:.1} tok/s]",
        gen.prompt_tokens,
        rate(gen.prompt_tokens, gen.prefill),
        gen.ids.len(),
        rate(gen.ids.len().saturating_sub(1), gen.decode),
    );
    Ok(())
}

fn score_cmd<B: Backend>(be: B, a: &ScoreArgs) -> Result<()> {
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => unreachable!("clap requires --text or --file"),
    };
    let tokenizer = Tokenizer::load(&a.model)?;
    let llm = load_model(be, &a.model, a.adapter.as_deref())?;
    let ids = tokenizer.encode(&text, false)?;
    let s = score(&llm, &ids)?;
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

/// One embedding per text. Plain output: one line per text, `N  norm X
/// [first values …]  "text"`; --json: the full vectors.
/// The encoder's device: `auto` is the CPU until a real GPU has run the
/// encoder's kernels; --device cuda or emu tries them.
fn encoder_device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Auto => Ok(Device::Cpu),
        other => open_device(other),
    }
}

fn ask_cmd<B: Backend>(be: B, a: &AskArgs) -> Result<()> {
    use engine::rag::answer::{cited, messages, passages};
    let ix = engine::rag::index::Index::open(&a.index)?;
    let embedder = engine::model::bert::Embedder::load(&a.embedder, Cpu)?;
    ix.check_embedder(embedder.identity(), embedder.dim())?;
    let query = embedder.embed(&[a.question.as_str()])?.remove(0);
    let passages = passages(ix.search(&query, a.k)?);
    if passages.is_empty() {
        bail!(
            "{}: the index is empty (engine index add first)",
            a.index.display()
        );
    }
    let tokenizer = Tokenizer::load(&a.model)?;
    let llm = load_model(be, &a.model, a.adapter.as_deref())?;
    let text = tokenizer.apply_chat_template(&messages(&a.question, &passages), true)?;
    let ids = tokenizer.encode(&text, false)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        },
        stop_ids: tokenizer.stop_ids(&llm.config.eos_token_ids),
    };
    let mut stream = TextStream::new(&tokenizer);
    let mut answer = String::new();
    let mut stdout = std::io::stdout().lock();
    generate(&llm, &ids, &opts, |id| {
        let piece = stream.push(id)?;
        answer.push_str(&piece);
        if !a.json
            && stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
                .is_err()
        {
            return Err(engine::Error::Invalid("stdout closed".into()));
        }
        Ok(())
    })?;
    let used = cited(&answer, passages.len());
    if a.json {
        let item = |p: &engine::rag::answer::Passage| serde_json::json!({"n": p.n, "source": p.source, "lines": [p.line_start, p.line_end], "score": p.score});
        let doc = serde_json::json!({
            "answer": answer.trim(),
            "citations": used.iter().map(|&n| item(&passages[n - 1])).collect::<Vec<_>>(),
            "passages": passages.iter().map(item).collect::<Vec<_>>(),
        });
        writeln!(stdout, "{doc}")?;
        return Ok(());
    }
    writeln!(stdout)?;
    if used.is_empty() {
        writeln!(stdout, "\n(the answer cites no passage; retrieved:)")?;
        for p in &passages {
            writeln!(stdout, "  [{}] {}  ({:.3})", p.n, p.location(), p.score)?;
        }
    } else {
        writeln!(stdout)?;
        for n in used {
            let p = &passages[n - 1];
            writeln!(stdout, "[{}] {}", p.n, p.location())?;
        }
    }
    Ok(())
}

fn index_cmd(command: IndexCommand) -> Result<()> {
    use engine::rag::index::{Index, Writer};
    match command {
        IndexCommand::Add {
            index,
            embedder,
            chunk_tokens,
            overlap,
            device,
            paths,
        } => {
            let opts = engine::rag::chunk::ChunkOptions {
                max_tokens: chunk_tokens,
                overlap,
            };
            on_device!(encoder_device(device)?, |be| index_add(
                be, &index, &embedder, &opts, &paths
            ))?
        }
        IndexCommand::Rm { index, paths } => {
            let mut writer = Writer::open(&index)?;
            let mut removed = 0;
            for p in &paths {
                let name = engine::rag::ingest::source_name(p);
                let folder = format!("{}/", name.trim_end_matches('/'));
                let matching: Vec<String> = writer
                    .sources()
                    .into_iter()
                    .map(|s| s.source)
                    .filter(|s| *s == name || s.starts_with(&folder))
                    .collect();
                if matching.is_empty() {
                    bail!("{}: not in the index {}", name, index.display());
                }
                for s in matching {
                    writer.remove(&s);
                    removed += 1;
                }
            }
            writer.commit()?;
            println!("removed {removed} file(s) from {}", index.display());
        }
        IndexCommand::Ls { index } => {
            let ix = Index::open(&index)?;
            let sources = ix.sources();
            println!(
                "{}: {} chunk(s) from {} file(s), embedder {} ({} values)",
                index.display(),
                sources.iter().map(|s| s.ids.len()).sum::<usize>(),
                sources.len(),
                ix.embedder(),
                ix.dim()
            );
            for s in sources {
                println!("{:>6}  {}", s.ids.len(), s.source);
            }
        }
        IndexCommand::Search {
            index,
            embedder,
            k,
            json,
            device,
            query,
        } => on_device!(encoder_device(device)?, |be| index_search(
            be, &index, &embedder, k, json, &query
        ))?,
    }
    Ok(())
}

fn index_add<B: Backend>(
    be: B,
    index: &Path,
    embedder_dir: &Path,
    opts: &engine::rag::chunk::ChunkOptions,
    paths: &[PathBuf],
) -> Result<()> {
    use engine::rag::ingest::{add_file, files_under, Outcome};
    let files = files_under(paths)?;
    let embedder = engine::model::bert::Embedder::load(embedder_dir, be)?;
    let mut writer =
        engine::rag::index::Writer::open_or_create(index, embedder.identity(), embedder.dim())?;
    let bar = indicatif::ProgressBar::new(files.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} files  {msg}")
            .expect("a valid template"),
    );
    let (mut added, mut chunks, mut unchanged, mut empty) = (0, 0, 0, Vec::new());
    for f in &files {
        bar.set_message(f.display().to_string());
        match add_file(&mut writer, &embedder, opts, f)? {
            Outcome::Added(n) => (added, chunks) = (added + 1, chunks + n),
            Outcome::Unchanged => unchanged += 1,
            Outcome::Empty => empty.push(f.display().to_string()),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    writer.commit()?;
    for e in &empty {
        eprintln!("{e}: no text, skipped");
    }
    let ix = engine::rag::index::Index::open(index)?;
    println!(
        "added {added} file(s) ({chunks} chunks), {unchanged} unchanged; {} holds {} chunk(s) from {} file(s)",
        index.display(),
        ix.len(),
        ix.sources().len()
    );
    Ok(())
}

fn index_search<B: Backend>(
    be: B,
    index: &Path,
    embedder_dir: &Path,
    k: usize,
    json: bool,
    query: &str,
) -> Result<()> {
    let ix = engine::rag::index::Index::open(index)?;
    let embedder = engine::model::bert::Embedder::load(embedder_dir, be)?;
    ix.check_embedder(embedder.identity(), embedder.dim())?;
    let q = embedder.embed(&[query])?.remove(0);
    // Search where the query was embedded: on a GPU through its matrix
    // product and top-k kernels.
    let hits = ix.search_batch_on(embedder.backend(), &q, k)?.remove(0);
    let mut out = std::io::stdout().lock();
    if json {
        let items: Vec<serde_json::Value> = hits
            .iter()
            .enumerate()
            .map(|(i, h)| {
                serde_json::json!({
                    "rank": i + 1,
                    "score": h.score,
                    "source": h.chunk.source,
                    "lines": [h.chunk.line_start, h.chunk.line_end],
                    "text": h.chunk.text,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(items))?;
    } else {
        for (i, h) in hits.iter().enumerate() {
            let c = &h.chunk;
            let line: String = c.text.split_whitespace().collect::<Vec<_>>().join(" ");
            let shown: String = line.chars().take(90).collect();
            let more = if shown.len() < line.len() { "…" } else { "" };
            writeln!(
                out,
                "{:>2}. {:.4}  {}:{}-{}  {shown}{more}",
                i + 1,
                h.score,
                c.source,
                c.line_start,
                c.line_end
            )?;
        }
    }
    Ok(())
}

fn embed_cmd<B: Backend>(be: B, a: &EmbedArgs) -> Result<()> {
    let texts: Vec<String> = match &a.file {
        Some(f) => {
            let all = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            let lines: Vec<String> = all
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect();
            if lines.is_empty() {
                bail!(
                    "{}: no text to embed (one text per line; blank lines are skipped)",
                    f.display()
                );
            }
            lines
        }
        None => a.text.clone(),
    };
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let mut embedder = engine::model::bert::Embedder::load(&a.model, be)?;
    embedder.set_batch_size(a.batch)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let start = std::time::Instant::now();
    let vectors = embedder.embed(&refs)?;
    let elapsed = start.elapsed();
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let items: Vec<serde_json::Value> = texts
            .iter()
            .zip(&vectors)
            .map(|(t, e)| serde_json::json!({"text": t, "embedding": e}))
            .collect();
        writeln!(stdout, "{}", serde_json::Value::Array(items))?;
    } else {
        for (i, (t, e)) in texts.iter().zip(&vectors).enumerate() {
            let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
            let first: Vec<String> = e.iter().take(4).map(|x| format!("{x:.4}")).collect();
            let shown: String = t.chars().take(60).collect();
            let more = if shown.len() < t.len() { "…" } else { "" };
            writeln!(
                stdout,
                "{:>4}  norm {norm:.4}  [{}, …]  {:?}{more}",
                i + 1,
                first.join(", "),
                shown
            )?;
        }
    }
    eprintln!(
        "[embedded {} text(s) with {} ({} values each) in {:.2} s]",
        texts.len(),
        embedder.identity(),
        embedder.dim(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

fn finetune_cmd<B: Backend>(be: B, a: &FinetuneArgs) -> Result<()> {
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

fn info(dir: &std::path::Path) -> Result<()> {
    let config = engine::model::config::LlamaConfig::from_file(&dir.join("config.json"))?;
    let files = SafetensorsFiles::open_dir(dir)?;
    let tokenizer = Tokenizer::load(dir)?;
    let c = &config;
    println!("architecture      llama (LlamaForCausalLM)");
    println!(
        "parameters        {} ({:.1} M)",
        c.num_parameters(),
        c.num_parameters() as f64 / 1e6
    );
    println!("stored dtypes     {}", files.dtypes().join(", "));
    println!("layers            {}", c.num_layers);
    println!(
        "hidden / ffn      {} / {}",
        c.hidden_size, c.intermediate_size
    );
    println!(
        "heads / kv heads  {} / {} (head dim {})",
        c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!(
        "vocabulary        {} (tokenizer: {})",
        c.vocab_size,
        tokenizer.vocab_size()
    );
    println!("context length    {}", c.max_position_embeddings);
    println!("rope theta        {}", c.rope_theta);
    println!("tied embeddings   {}", c.tie_word_embeddings);
    println!(
        "chat template     {}",
        if tokenizer.has_chat_template() {
            "yes"
        } else {
            "no"
        }
    );
    Ok(())
}
