//! Scoring text: the log-probability of each token given the ones before it.
//!
//! A text longer than the window (by default the model's context) is scored
//! in sliding windows that advance by half a window: the first window scores
//! its tokens 1..W, each later one only the tokens past the previous
//! window's end, so every token is scored once, with at least W/2 tokens of
//! context (all of them, up to W − 1, in the first window).

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
    /// Forward passes over windows of the text (1 when it fits one window).
    #[serde(skip)]
    pub windows: usize,
}

/// Scores `ids`, in windows of the model's whole context when it is longer.
pub fn score<B: Backend>(model: &Llama<B>, ids: &[u32]) -> Result<Score> {
    score_windowed(model, ids, model.config.max_position_embeddings)
}

/// Scores `ids` in windows of at most `window` tokens (2 ≤ window ≤ the
/// model's context) that advance by `window / 2`: see the module's comment.
pub fn score_windowed<B: Backend>(model: &Llama<B>, ids: &[u32], window: usize) -> Result<Score> {
    if ids.len() < 2 {
        return Err(Error::Invalid(format!(
            "scoring needs at least 2 tokens; the text has {}",
            ids.len()
        )));
    }
    let c = &model.config;
    if window < 2 || window > c.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "a scoring window of {window} tokens does not fit: it must be at least 2 \
             and at most the model's context of {} (max_position_embeddings)",
            c.max_position_embeddings
        )));
    }
    let be = &model.backend;
    let window = window.min(ids.len());
    let stride = window / 2;
    let chunk = PREFILL_CHUNK.min(window);
    let mut cache = model.new_cache(window)?;
    let mut acts = model.new_activations(chunk)?;
    let mut hidden = be.zeros(&[chunk, c.hidden_size], be.dtype())?;
    let mut logits = be.zeros(&[chunk, c.vocab_size], DType::F32)?;
    let mut logp = be.zeros(&[chunk, c.vocab_size], DType::F32)?;
    let mut logprobs = Vec::with_capacity(ids.len() - 1);
    let (mut start, mut windows) = (0, 0);
    loop {
        let end = (start + window).min(ids.len());
        // The first token this window scores: the one after the previous
        // window's end (token 1 in the first).
        let first = logprobs.len() + 1 - start;
        cache.len = 0;
        let part = &ids[start..end];
        for (i, rows) in part.chunks(chunk).enumerate() {
            model.forward(&mut hidden, rows, &mut cache, &mut acts)?;
            // Row r predicts the window's token i·chunk + r + 1; rows before
            // `first` − 1 predict tokens already scored, so the LM head is
            // skipped for chunks that hold only those.
            let (row0, row_end) = (i * chunk, i * chunk + rows.len());
            if row_end < first {
                continue;
            }
            logits.shape[0] = rows.len();
            logp.shape[0] = rows.len();
            model.logits(&mut logits, &hidden)?;
            be.log_softmax(&mut logp, &logits)?;
            let logp = be.download(&logp)?;
            for (r, row) in logp.chunks_exact(c.vocab_size).enumerate() {
                let t = row0 + r + 1;
                if t >= first && t < part.len() {
                    logprobs.push(row[part[t] as usize]);
                }
            }
        }
        windows += 1;
        if end == ids.len() {
            break;
        }
        start += stride;
    }
    let nll: f64 = logprobs.iter().map(|&l| -(l as f64)).sum();
    let ppl = (nll / logprobs.len() as f64).exp();
    Ok(Score {
        token_ids: ids.to_vec(),
        logprobs,
        nll,
        ppl,
        windows,
    })
}
