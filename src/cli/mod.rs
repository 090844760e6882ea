//! The `engine` command line: one module per command, each holding its
//! flags (`Args`, clap derive) and its `run(args)`; `common` holds what
//! several share (device choice, model folders, numeric flag parsers).
//!
//! Adding a command: a module `src/cli/NAME.rs` with `pub struct Args` and
//! `pub fn run(args: Args) -> anyhow::Result<()>`, and one entry in the
//! `commands!` list below (its doc line is the command's help).

pub mod common;

/// Declares the modules, the `Command` enum clap parses, and its dispatch,
/// from one list of `/// help` + `Variant => module`.
macro_rules! commands {
    ($($(#[doc = $doc:literal])* $variant:ident => $module:ident,)*) => {
        $(pub mod $module;)*

        #[derive(clap::Subcommand)]
        pub enum Command {
            $($(#[doc = $doc])* $variant(Box<$module::Args>),)*
        }

        impl Command {
            pub fn run(self) -> anyhow::Result<()> {
                match self {
                    $(Command::$variant(args) => $module::run(*args),)*
                }
            }
        }
    };
}

commands! {
    /// Generate text after a prompt, streamed to stdout.
    Generate => generate,
    /// Log-probability of each token of a text given the ones before it.
    Score => score,
    /// Sentence embeddings from a BERT-family sentence-transformers folder (all-MiniLM-L6-v2).
    Embed => embed,
    /// Answer a question from an index's passages, citing them.
    Ask => ask,
    /// A RAG index of documents: add, remove, list, search.
    Index => index,
    /// Describe a model folder, its chat template included.
    Info => info,
    /// Convert a GGUF file into an HF model folder (safetensors, config, tokenizer).
    Convert => convert,
    /// Quantize a model (HF folder or GGUF) into a GGUF file that llama.cpp loads: q8_0, q4_0, q4_1, q4_k, q6_k.
    Quantize => quantize,
    /// Fine-tune a model on a JSONL dataset: LoRA (--lora-rank) or every weight (--full).
    Finetune => finetune,
    /// Merge a LoRA adapter (PEFT format) into a model's weights, writing a new model folder.
    Merge => merge,
    /// Serve the model behind OpenAI's API, with continuous batching.
    Serve => serve,
    /// The CUDA kernels (kernels/*.cu).
    Kernels => kernels,
}

#[derive(clap::Parser)]
#[command(
    name = "engine",
    version,
    about = "Fine-tune, retrieve and serve transformers with one binary"
)]
pub struct Cli {
    /// Worker threads for the CPU device (default: all cores).
    #[arg(long, global = true, value_name = "N", value_parser = common::count, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}
