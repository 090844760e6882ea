//! Scoring text: the log-probability of each token given the ones before it.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::infer::PREFILL_CHUNK;
use crate::model::llama::Llama;
use crate::tensor::DType;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Score {
    pub token_ids: Vec<u32>,
    /// log p(token_t | tokens_<t) for t = 1..n (the first token has no context).
    pub logprobs: Vec<f32>,
    /// Σ −logprobs.
    pub nll: f64,
    /// exp(mean nll).
    pub ppl: f64,
}

pub fn score<B: Backend>(model: &Llama<B>, ids: &[u32]) -> Result<Score> {
    if ids.len() < 2 {
        return Err(Error::Invalid(format!(
            "scoring needs at least 2 tokens; the text has {}",
            ids.len()
        )));
    }
    let c = &model.config;
    if ids.len() > c.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "the text has {} tokens; the model's context is {} (max_position_embeddings)",
            ids.len(),
            c.max_position_embeddings
        )));
    }
    let be = &model.backend;
    let chunk = PREFILL_CHUNK.min(ids.len());
    let mut cache = model.new_cache(ids.len())?;
    let mut acts = model.new_activations(chunk)?;
    let mut hidden = be.zeros(&[chunk, c.hidden_size], be.dtype())?;
    let mut logits = be.zeros(&[chunk, c.vocab_size], DType::F32)?;
    let mut logp = be.zeros(&[chunk, c.vocab_size], DType::F32)?;
    let mut logprobs = Vec::with_capacity(ids.len() - 1);
    for (i, part) in ids.chunks(chunk).enumerate() {
        model.forward(&mut hidden, part, &mut cache, &mut acts)?;
        logits.shape[0] = part.len();
        logp.shape[0] = part.len();
        model.logits(&mut logits, &hidden)?;
        be.log_softmax(&mut logp, &logits)?;
        let logp = be.download(&logp)?;
        // Row r predicts the token at absolute position i·chunk + r + 1.
        for (r, row) in logp.chunks_exact(c.vocab_size).enumerate() {
            if let Some(&next) = ids.get(i * chunk + r + 1) {
                logprobs.push(row[next as usize]);
            }
        }
    }
    let nll: f64 = logprobs.iter().map(|&l| -(l as f64)).sum();
    let ppl = (nll / logprobs.len() as f64).exp();
    Ok(Score {
        token_ids: ids.to_vec(),
        logprobs,
        nll,
        ppl,
    })
}
