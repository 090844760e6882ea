//! `engine info`: describe a model folder or GGUF file.

use super::common::model_path;
use anyhow::Result;
use engine::model::config::LlamaConfig;
use engine::model::gguf::Gguf;
use engine::model::gguf_model::HfView;
use engine::model::weights::SafetensorsFiles;
use engine::tokenizer::{Message, Tokenizer};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (config.json, *.safetensors, tokenizer.json), or a
    /// llama GGUF file.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let dir = &a.model;
    model_path(dir)?;
    let (c, stored) = if dir.is_file() {
        let g = Gguf::open(dir)?;
        let config = HfView::read(&g)?.config.to_string();
        let mut types = BTreeMap::<&str, usize>::new();
        for t in g.tensors() {
            *types.entry(t.ggml_type.name()).or_default() += 1;
        }
        let types: Vec<String> = types.iter().map(|(t, n)| format!("{t} ({n})")).collect();
        (LlamaConfig::parse(&config, dir)?, types)
    } else {
        let c = LlamaConfig::from_file(&dir.join("config.json"))?;
        (c, SafetensorsFiles::open_dir(dir)?.dtypes())
    };
    let tokenizer = Tokenizer::load(dir)?;
    println!("architecture      llama (LlamaForCausalLM)");
    println!(
        "parameters        {} ({:.1} M)",
        c.num_parameters(),
        c.num_parameters() as f64 / 1e6
    );
    println!("stored dtypes     {}", stored.join(", "));
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
    let Some(template) = tokenizer.chat_template() else {
        println!("chat template     none (generate --chat and ask need one)");
        return Ok(());
    };
    println!("chat template     yes: below, and what it makes of a user message");
    println!();
    for line in template.trim_end().lines() {
        println!("    {line}");
    }
    let example = tokenizer.apply_chat_template(
        &[Message {
            role: "user".into(),
            content: "Hello!".into(),
        }],
        true,
    )?;
    println!();
    println!("  user \"Hello!\" becomes:");
    println!();
    for line in example.lines() {
        println!("    {line}");
    }
    Ok(())
}
