//! The inference engine: requests in, tokens out, one batched forward per
//! step.
//!
//! An [`Engine`] owns the paged KV cache, the scheduler and every request's
//! sampler; it borrows the model. Each [`Engine::step`] runs the scheduler's
//! batch through `Llama::forward_batch`, samples the next token of every
//! sequence that caught up, and hands each token to its request's sink. It
//! sees token ids only: text, templates and stop strings stay with the
//! caller. A sink that returns false (its receiver is gone: the client
//! disconnected) cancels its request and frees its blocks at once.
//!
//! `engine generate` runs one request through an `Engine` on the calling
//! thread; `engine serve` runs one on a thread of its own
//! (`infer::thread::spawn`) fed by a channel.

use crate::backend::sample::{Sampler, SamplerConfig};
use crate::backend::Backend;
use crate::backend::NO_ADAPTER;
use crate::error::{Error, Result};
use crate::infer::kv_blocks::BlockPool;
use crate::infer::metrics::Metrics;
use crate::infer::scheduler::{Scheduler, SchedulerConfig, Sequence};
use crate::model::adapter::Lora;
use crate::model::batch::PagedKv;
use crate::model::llama::{Activations, Llama};
use crate::model::lora::LoraAdapter;
use crate::tensor::{DType, Tensor};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Most tokens computed in one step (decode rows and prompt chunks).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_blocks: usize,
}

impl EngineConfig {
    /// The blocks that `mib` MiB of KV cache hold for `model`.
    pub fn blocks_in_mib<B: Backend>(model: &Llama<B>, block_size: usize, mib: usize) -> usize {
        let c = &model.config;
        let bytes = PagedKv::<B>::block_bytes(
            c.num_layers,
            c.num_kv_heads * c.head_dim,
            block_size,
            model.backend.dtype().size(),
        );
        mib * (1 << 20) / bytes
    }
}

/// What to generate after a prompt.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends after one of these (it is not returned).
    pub stop_ids: Vec<u32>,
    /// Report each token's log-probability, with this many of the most
    /// likely alternatives.
    pub logprobs: Option<usize>,
    /// The loaded adapter to generate with (None: the base model).
    pub adapter: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub id: u32,
    /// With `Request::logprobs`: log p(id), and the most likely tokens with
    /// theirs, best first.
    pub logprob: Option<(f32, Vec<(u32, f32)>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Sent once, before the first token: the prompt tokens whose keys and
    /// values came from the prefix cache.
    Cached(usize),
    Token(Token),
    Finished(FinishReason, Usage),
    /// The engine failed while running the request.
    Failed(String),
}

/// Where a request's events go; false means nobody listens any more.
pub type Sink<'a> = Box<dyn FnMut(Event) -> bool + 'a>;

struct Live<'a> {
    max_tokens: usize,
    stop_ids: Vec<u32>,
    logprobs: Option<usize>,
    sampler: Sampler,
    sink: Sink<'a>,
    arrived: Instant,
    last_token: Option<Instant>,
    /// Its adapter's slot, or NO_ADAPTER.
    adapter: u32,
}

/// A loaded adapter. An unloaded one stays until its last request ends.
struct Slot<B: Backend> {
    name: String,
    lora: Lora<B>,
    /// `LoraAdapter::content_hash`: part of its sequences' cache keys.
    hash: u64,
    users: usize,
    unloaded: bool,
}

pub struct Engine<'a, B: Backend> {
    model: &'a Llama<B>,
    kv: PagedKv<B>,
    sched: Scheduler,
    acts: Activations<B>,
    /// Next-token logits of a step's sampled rows [≤ max_seqs, vocab], f32.
    logits: Tensor<B>,
    /// One row of them, and its log-softmax.
    row: Tensor<B>,
    row_logp: Tensor<B>,
    live: HashMap<u64, Live<'a>>,
    adapters: Vec<Option<Slot<B>>>,
    next_id: u64,
    /// The longest a sequence may grow: the model's context, or the whole
    /// KV pool if that is smaller.
    max_len: usize,
    metrics: Arc<Metrics>,
}

impl<'a, B: Backend> Engine<'a, B> {
    pub fn new(model: &'a Llama<B>, cfg: EngineConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let c = &model.config;
        if cfg.num_blocks == 0 {
            return Err(Error::Invalid("the KV cache holds no block".into()));
        }
        let be = &model.backend;
        let kv = PagedKv::new(
            be,
            c.num_layers,
            c.num_kv_heads * c.head_dim,
            cfg.num_blocks,
            cfg.block_size,
        )?;
        let sched = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: cfg.max_batch_tokens,
                max_seqs: cfg.max_seqs,
            },
            BlockPool::new(cfg.num_blocks, cfg.block_size),
        );
        metrics
            .kv_blocks_total
            .store(cfg.num_blocks as u64, Relaxed);
        metrics.kv_blocks_free.store(cfg.num_blocks as u64, Relaxed);
        Ok(Engine {
            model,
            kv,
            sched,
            acts: model.new_activations(cfg.max_batch_tokens)?,
            logits: be.zeros(&[cfg.max_seqs, c.vocab_size], DType::F32)?,
            row: be.zeros(&[1, c.vocab_size], DType::F32)?,
            row_logp: be.zeros(&[1, c.vocab_size], DType::F32)?,
            live: HashMap::new(),
            adapters: Vec::new(),
            next_id: 0,
            max_len: c
                .max_position_embeddings
                .min(cfg.num_blocks * cfg.block_size),
            metrics,
        })
    }

    /// The longest a sequence (prompt and generated tokens) may be.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn is_idle(&self) -> bool {
        self.sched.is_idle()
    }

    /// Queues a request; its events go to `sink`. A request the engine can
    /// never run (an empty or too long prompt, a token outside the
    /// vocabulary) is an error here, before anything is queued.
    pub fn add(&mut self, req: Request, sink: Sink<'a>) -> Result<u64> {
        let (adapter, extra) = self.resolve(&req)?;
        Ok(self.enqueue(req, sink, adapter, extra))
    }

    /// Queues a request, or tells its sink why it cannot run (`Failed`).
    pub fn submit(&mut self, req: Request, mut sink: Sink<'a>) {
        match self.resolve(&req) {
            Ok((adapter, extra)) => {
                self.enqueue(req, sink, adapter, extra);
            }
            Err(e) => {
                sink(Event::Failed(e.to_string()));
            }
        }
    }

    /// Checks a request and finds its adapter: the slot and the content
    /// hash its cache keys carry (NO_ADAPTER and 0 for the base model).
    fn resolve(&self, req: &Request) -> Result<(u32, u64)> {
        check_request(req, self.model.config.vocab_size, self.max_len)?;
        let Some(name) = &req.adapter else {
            return Ok((NO_ADAPTER, 0));
        };
        let slot = self
            .adapter_slot(name)
            .ok_or_else(|| Error::Invalid(format!("the adapter {name:?} is not loaded")))?;
        Ok((
            slot as u32,
            self.adapters[slot].as_ref().expect("found").hash,
        ))
    }

    /// Queues a request `resolve` accepted; returns its id.
    fn enqueue(&mut self, req: Request, sink: Sink<'a>, adapter: u32, extra: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.metrics
            .prompt_tokens
            .fetch_add(req.prompt.len() as u64, Relaxed);
        let mut live = Live {
            max_tokens: req.max_tokens,
            stop_ids: req.stop_ids,
            logprobs: req.logprobs,
            sampler: Sampler::new(req.sampler),
            sink,
            arrived: Instant::now(),
            last_token: None,
            adapter,
        };
        if req.max_tokens == 0 {
            let usage = Usage {
                prompt_tokens: req.prompt.len(),
                ..Usage::default()
            };
            (live.sink)(Event::Finished(FinishReason::Length, usage));
            return id;
        }
        if let Some(slot) = self
            .adapters
            .get_mut(adapter as usize)
            .and_then(Option::as_mut)
        {
            slot.users += 1;
        }
        self.sched
            .add(Sequence::new(id, req.prompt, adapter, extra));
        self.live.insert(id, live);
        self.update_gauges();
        id
    }

    /// Drops a request (the client went away) and frees its blocks.
    pub fn abort(&mut self, id: u64) {
        self.sched.remove(id);
        if let Some(live) = self.live.remove(&id) {
            self.release_adapter(live.adapter);
        }
        self.update_gauges();
    }

    /// Fails every request (the engine cannot go on) and drops them.
    pub fn fail_all(&mut self, msg: &str) {
        for (id, mut live) in std::mem::take(&mut self.live) {
            self.sched.remove(id);
            self.release_adapter(live.adapter);
            (live.sink)(Event::Failed(msg.to_string()));
        }
        self.update_gauges();
    }

    /// Loads `adapter` under `name` for the requests that name it. A name
    /// in use is replaced: requests running with the old one finish with it.
    pub fn load_adapter(&mut self, name: &str, adapter: &LoraAdapter) -> Result<()> {
        let c = &self.model.config;
        if adapter.layers.len() != c.num_layers {
            return Err(Error::Invalid(format!(
                "the adapter has {} layers; the model has {}",
                adapter.layers.len(),
                c.num_layers
            )));
        }
        let be = &self.model.backend;
        let slot = Slot {
            name: name.to_string(),
            lora: Lora::upload(be, adapter, be.dtype())?,
            hash: adapter.content_hash(),
            users: 0,
            unloaded: false,
        };
        let _ = self.unload_adapter(name);
        match self.adapters.iter().position(Option::is_none) {
            Some(free) => self.adapters[free] = Some(slot),
            None => self.adapters.push(Some(slot)),
        }
        Ok(())
    }

    /// Unloads an adapter: new requests can no longer name it; its memory
    /// goes when its last running request ends.
    pub fn unload_adapter(&mut self, name: &str) -> Result<()> {
        let slot = self
            .adapter_slot(name)
            .ok_or_else(|| Error::Invalid(format!("the adapter {name:?} is not loaded")))?;
        let s = self.adapters[slot].as_mut().expect("found");
        s.unloaded = true;
        if s.users == 0 {
            self.adapters[slot] = None;
        }
        Ok(())
    }

    /// The slot of the loaded (not unloaded) adapter `name`.
    fn adapter_slot(&self, name: &str) -> Option<usize> {
        self.adapters
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.name == name && !s.unloaded))
    }

    /// A request of adapter slot `slot` ended.
    fn release_adapter(&mut self, slot: u32) {
        let Some(entry) = self.adapters.get_mut(slot as usize) else {
            return;
        };
        if let Some(s) = entry {
            s.users -= 1;
            if s.unloaded && s.users == 0 {
                *entry = None;
            }
        }
    }

    /// One step: a batched forward over the scheduler's rows, then a token
    /// for every sequence that caught up. Does nothing when idle.
    pub fn step(&mut self) -> Result<()> {
        let Some(step) = self.sched.schedule() else {
            return Ok(());
        };
        let adapters: Vec<Option<&Lora<B>>> = self
            .adapters
            .iter()
            .map(|s| s.as_ref().map(|s| &s.lora))
            .collect();
        self.model.forward_batch(
            &mut self.logits,
            &step.batch,
            &mut self.kv,
            &mut self.acts,
            &adapters,
        )?;
        self.sched.complete(&step);
        let sampled = step.work.iter().filter(|w| w.sample).map(|w| w.id);
        for (row, id) in sampled.enumerate() {
            self.emit_next(id, row)?;
        }
        self.update_gauges();
        Ok(())
    }

    /// Samples sequence `id`'s next token from row `row` of the logits and
    /// hands it on, finishing the request at a stop token or its length.
    fn emit_next(&mut self, id: u64, row: usize) -> Result<()> {
        let be = &self.model.backend;
        let live = self
            .live
            .get_mut(&id)
            .expect("a scheduled sequence is live");
        be.copy_rows(&mut self.row, 0, &self.logits, row, 1)?;
        let u = live.sampler.draw();
        let token = be.sample(&self.row, live.sampler.config(), u)?;
        let now = Instant::now();
        match live.last_token {
            None => self.metrics.time_to_first_token.observe(now - live.arrived),
            Some(t) => self.metrics.inter_token_latency.observe(now - t),
        }
        live.last_token = Some(now);
        if live.stop_ids.contains(&token) {
            return self.finish(id, FinishReason::Stop);
        }
        let logprob = match live.logprobs {
            Some(top) => Some(logprobs(be, &mut self.row_logp, &self.row, token, top)?),
            None => None,
        };
        let seq = self
            .sched
            .get_mut(id)
            .expect("a live sequence is scheduled");
        if seq.generated().is_empty() && !(live.sink)(Event::Cached(seq.cached_tokens.unwrap_or(0)))
        {
            self.abort(id);
            return Ok(());
        }
        seq.tokens.push(token);
        let (generated, len) = (seq.generated().len(), seq.tokens.len());
        self.metrics.generation_tokens.fetch_add(1, Relaxed);
        if !(live.sink)(Event::Token(Token { id: token, logprob })) {
            self.abort(id);
            return Ok(());
        }
        if generated >= live.max_tokens || len >= self.max_len {
            return self.finish(id, FinishReason::Length);
        }
        Ok(())
    }

    fn finish(&mut self, id: u64, reason: FinishReason) -> Result<()> {
        let seq = self.sched.remove(id).expect("a live sequence is scheduled");
        let mut live = self.live.remove(&id).expect("checked by the caller");
        let usage = Usage {
            prompt_tokens: seq.prompt_len,
            cached_tokens: seq.cached_tokens.unwrap_or(0),
            completion_tokens: seq.generated().len(),
        };
        (live.sink)(Event::Finished(reason, usage));
        self.release_adapter(live.adapter);
        self.metrics.requests_finished.fetch_add(1, Relaxed);
        Ok(())
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.requests_running
            .store(self.sched.num_running() as u64, Relaxed);
        m.requests_waiting
            .store(self.sched.num_waiting() as u64, Relaxed);
        m.kv_blocks_free
            .store(self.sched.pool().num_free() as u64, Relaxed);
        m.prefix_queried_tokens
            .store(self.sched.prefix_queried, Relaxed);
        m.prefix_hit_tokens.store(self.sched.prefix_hits, Relaxed);
    }
}

fn check_request(req: &Request, vocab: usize, max_len: usize) -> Result<()> {
    if req.prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    if req.prompt.len() >= max_len {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens; at most {} fit (the model's context, or the KV cache)",
            req.prompt.len(),
            max_len - 1
        )));
    }
    if let Some(&bad) = req.prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::Invalid(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// log p(token), and the `top` most likely tokens with theirs (best first,
/// ties to the lower id), from one row of logits.
fn logprobs<B: Backend>(
    be: &B,
    logp: &mut Tensor<B>,
    logits: &Tensor<B>,
    token: u32,
    top: usize,
) -> Result<(f32, Vec<(u32, f32)>)> {
    be.log_softmax(logp, logits)?;
    let row = be.download(logp)?;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        let key = |i: &u32| {
            (
                std::cmp::Reverse(crate::backend::sample::key(row[*i as usize])),
                *i,
            )
        };
        let top = top.min(order.len());
        order.select_nth_unstable_by_key(top - 1, key);
        order.truncate(top);
        order.sort_unstable_by_key(key);
        best = order.into_iter().map(|i| (i, row[i as usize])).collect();
    }
    Ok((row[token as usize], best))
}
