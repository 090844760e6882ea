//! `engine ask`: answer a question from an index's passages, citing them.

use super::common::{weights, count, folder, model_path, load_model_and_adapter, on_device, open_device, DeviceArg};
use engine::model::quant_types::Weights;
use anyhow::{bail, Result};
use engine::backend::cpu::Cpu;
use engine::backend::sample::SamplerConfig;
use engine::backend::Backend;
use engine::infer::generate::{generate, GenerateOptions};
use engine::infer::stream::TextStream;
use engine::model::bert::Embedder;
use engine::rag::answer::{cited, messages, passages, Passage};
use engine::rag::index::Index;
use engine::tokenizer::Tokenizer;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The model that answers (config.json, *.safetensors, tokenizer.json with a chat template),
    /// or a llama GGUF file.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: PathBuf,
    /// The format of a model folder's matrices once loaded: f32, bf16, or
    /// quantized as llama-quantize would (q8_0, q4_0, q4_1, q4_k, q6_k).
    #[arg(long, value_name = "FORMAT", default_value = "f32", value_parser = weights)]
    weights: Weights,
    /// A LoRA adapter folder (PEFT format), applied unmerged.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// The index folder (`engine index add`).
    #[arg(long, value_name = "DIR")]
    index: PathBuf,
    /// The embedder the index was built with.
    #[arg(long, value_name = "DIR")]
    embedder: PathBuf,
    /// How many passages to retrieve (SmolLM2-135M stays closer to the
    /// text with few).
    #[arg(short, default_value_t = 2, value_parser = count, allow_negative_numbers = true)]
    k: usize,
    /// Most tokens of the answer.
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = count, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Print {"answer", "citations", "passages"} as JSON instead of streaming.
    #[arg(long)]
    json: bool,
    /// Where the model runs (the embedder runs on the CPU) [default: auto:
    /// the first CUDA GPU if one can be used, else the CPU].
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// The question.
    question: String,
}

pub fn run(a: Args) -> Result<()> {
    model_path(&a.model)?;
    folder("embedder", &a.embedder)?;
    if let Some(adapter) = &a.adapter {
        folder("adapter", adapter)?;
    }
    on_device!(open_device(a.device)?, |be| ask_on(be, &a))
}

fn ask_on<B: Backend>(be: B, a: &Args) -> Result<()> {
    let ix = Index::open(&a.index)?;
    let embedder = Embedder::load(&a.embedder, Cpu)?;
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
    let (llm, adapter) = load_model_and_adapter(be, &a.model, a.adapter.as_deref(), a.weights)?;
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
    generate(&llm, adapter.as_ref(), &ids, &opts, |id| {
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
        let item = |p: &Passage| serde_json::json!({"n": p.n, "source": p.source, "lines": [p.line_start, p.line_end], "score": p.score});
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
