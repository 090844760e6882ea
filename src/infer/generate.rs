//! Autoregressive generation of one request: the engine's batched path with
//! a batch of one, so `engine generate` and `engine serve` compute the same
//! tokens.

use crate::backend::sample::SamplerConfig;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::infer::engine::{Engine, EngineConfig, Event, FinishReason, Request};
use crate::infer::metrics::Metrics;
use crate::infer::PREFILL_CHUNK;
use crate::model::llama::Llama;
use crate::model::lora::LoraAdapter;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends after producing one of these (it is not returned).
    pub stop_ids: Vec<u32>,
}

#[derive(Debug)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// Time to the first token (prefill and its sampling).
    pub prefill: Duration,
    /// Time of the remaining tokens.
    pub decode: Duration,
    pub hit_stop: bool,
}

/// Positions per KV block (the server's default too).
pub const BLOCK_SIZE: usize = 16;

/// Generates after `prompt`, with `adapter` when given, calling `on_token`
/// with each new token id.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let c = &model.config;
    if prompt.len() >= c.max_position_embeddings && opts.max_tokens > 0 {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens; the model's context is {}",
            prompt.len(),
            c.max_position_embeddings
        )));
    }
    let len = (prompt.len() + opts.max_tokens).min(c.max_position_embeddings);
    let cfg = EngineConfig {
        max_batch_tokens: PREFILL_CHUNK,
        max_seqs: 1,
        block_size: BLOCK_SIZE,
        num_blocks: len.div_ceil(BLOCK_SIZE),
    };
    let start = Instant::now();
    let out = RefCell::new(Generation {
        ids: Vec::new(),
        prompt_tokens: prompt.len(),
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
        hit_stop: false,
    });
    let failed: RefCell<Option<Error>> = RefCell::new(None);
    let request = Request {
        prompt: prompt.to_vec(),
        max_tokens: opts.max_tokens,
        sampler: opts.sampler,
        stop_ids: opts.stop_ids.clone(),
        logprobs: None,
        adapter: adapter.map(|_| "adapter".to_string()),
    };
    let mut engine = Engine::new(model, cfg, Arc::new(Metrics::default()))?;
    if let Some(adapter) = adapter {
        engine.load_adapter("adapter", adapter)?;
    }
    engine.add(
        request,
        Box::new(|event| {
            let mut out = out.borrow_mut();
            match event {
                Event::Token(t) => {
                    if out.ids.is_empty() {
                        out.prefill = start.elapsed();
                    }
                    out.ids.push(t.id);
                    if let Err(e) = on_token(t.id) {
                        *failed.borrow_mut() = Some(e);
                        return false;
                    }
                }
                Event::Cached(_) => {}
                Event::Finished(reason, _) => {
                    out.hit_stop = reason == FinishReason::Stop;
                    // A stop token first: the prompt was computed all the same.
                    if out.hit_stop && out.ids.is_empty() {
                        out.prefill = start.elapsed();
                    }
                }
                Event::Failed(msg) => *failed.borrow_mut() = Some(Error::Invalid(msg)),
            }
            true
        }),
    )?;
    while !engine.is_idle() {
        engine.step()?;
    }
    drop(engine);
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    let mut out = out.into_inner();
    out.decode = start.elapsed().saturating_sub(out.prefill);
    Ok(out)
}
