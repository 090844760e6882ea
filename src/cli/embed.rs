//! `engine embed`: sentence embeddings from a BERT-family
//! sentence-transformers folder.

use super::common::{count, cpu_unless_asked, folder, on_device, DeviceArg};
use anyhow::{bail, Context, Result};
use engine::backend::Backend;
use engine::model::bert::Embedder;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A sentence-transformers folder (modules.json, 1_Pooling/, config.json,
    /// model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A text to embed; repeat for several.
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    text: Vec<String>,
    /// Embed each line of this file instead (blank lines are skipped).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Print a JSON array of {"text", "embedding"} (every value) instead.
    #[arg(long)]
    json: bool,
    /// Texts per forward pass (each padded to the longest in its batch).
    #[arg(long, value_name = "N", default_value_t = engine::model::bert::DEFAULT_BATCH_SIZE,
          value_parser = count, allow_negative_numbers = true)]
    batch: usize,
    /// Where the model runs [default: auto: the CPU, until a real GPU has run
    /// the encoder's kernels; cuda or emu tries them].
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

pub fn run(a: Args) -> Result<()> {
    folder("model", &a.model)?;
    on_device!(cpu_unless_asked(a.device, "the encoder")?, |be| embed_on(be, &a))
}

/// One embedding per text. Plain output: one line per text, `N  norm X
/// [first values …]  "text"`; --json: the full vectors.
fn embed_on<B: Backend>(be: B, a: &Args) -> Result<()> {
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
    let mut embedder = Embedder::load(&a.model, be)?;
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
