//! Autoregressive generation: prefill the prompt into the KV cache, then
//! decode one token at a time until a stop token or the token budget.

use crate::backend::sample::{Sampler, SamplerConfig};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::infer::PREFILL_CHUNK;
use crate::model::llama::Llama;
use crate::tensor::DType;
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

/// Generates after `prompt`, calling `on_token` with each new token id.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    let c = &model.config;
    let capacity = (prompt.len() + opts.max_tokens).min(c.max_position_embeddings);
    if prompt.len() >= capacity && opts.max_tokens > 0 {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens; the model's context is {}",
            prompt.len(),
            c.max_position_embeddings
        )));
    }
    let be = &model.backend;
    let mut cache = model.new_cache(capacity.max(prompt.len()))?;
    let mut acts = model.new_activations(PREFILL_CHUNK.min(prompt.len()))?;
    let mut hidden = be.zeros(
        &[PREFILL_CHUNK.min(prompt.len()), c.hidden_size],
        be.dtype(),
    )?;
    let mut last = be.zeros(&[1, c.hidden_size], be.dtype())?;
    let mut logits = be.zeros(&[1, c.vocab_size], DType::F32)?;
    let mut sampler = Sampler::new(opts.sampler);

    let start = Instant::now();
    let mut out = Generation {
        ids: Vec::new(),
        prompt_tokens: prompt.len(),
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
        hit_stop: false,
    };
    let mut next_input: Vec<u32> = prompt.to_vec();
    while out.ids.len() < opts.max_tokens {
        // Feed pending tokens (the prompt in chunks, then one at a time).
        for chunk in next_input.chunks(PREFILL_CHUNK) {
            model.forward(&mut hidden, chunk, &mut cache, &mut acts)?;
        }
        let rows = hidden.shape[0];
        be.copy_rows(&mut last, 0, &hidden, rows - 1, 1)?;
        model.logits(&mut logits, &last)?;
        let u = sampler.draw();
        let id = be.sample(&logits, sampler.config(), u)?;
        if out.ids.is_empty() {
            out.prefill = start.elapsed();
        }
        if opts.stop_ids.contains(&id) {
            out.hit_stop = true;
            break;
        }
        out.ids.push(id);
        on_token(id)?;
        if cache.len == cache.capacity {
            break;
        }
        next_input = vec![id];
    }
    out.decode = start.elapsed().saturating_sub(out.prefill);
    Ok(out)
}
