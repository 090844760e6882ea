//! The Llama-family decoder (SmolLM2, TinyLlama, Llama-3 style), written once
//! against `Backend`.
//!
//! Per layer, with x the residual stream [n, d]:
//!   h = rmsnorm(x) · w_attn_norm
//!   q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ;  rope(q), rope(k);  cache k, v
//!   x += attention(q, k_cache, v_cache) · Woᵀ
//!   h = rmsnorm(x) · w_ffn_norm
//!   x += (silu(h·Wgateᵀ) ∘ h·Wupᵀ) · Wdownᵀ
//! then logits = rmsnorm(x) · w_norm · Wembᵀ (tied) or · Wlm_headᵀ.
//! With a LoRA adapter, an adapted projection adds its branch
//! s·(h·Aᵀ)·Bᵀ to h·Wᵀ (`model::adapter`).

use crate::backend::{Backend, LoraRef, NO_ADAPTER};
use crate::error::{Error, Result};
use crate::model::adapter::{Lora, LoraScratch};
use crate::model::batch::{Batch, PagedKv};
use crate::model::config::LlamaConfig;
use crate::model::gguf::Gguf;
use crate::model::gguf_model::{self, HfView};
use crate::model::llama_gguf::{tensor_names, Hparams};
use crate::model::lora::{LoraAdapter, Target};
use crate::model::quant_types::{TensorIn, Weights};
use crate::model::weight::Weight;
use crate::model::weights::SafetensorsFiles;
use crate::quant::quantize::quantize_rows;
use crate::quant::{GgmlType, QBytes};
use crate::tensor::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub struct LayerWeights<B: Backend> {
    pub attn_norm: Tensor<B>, // [d]
    pub wq: Weight<B>,        // [heads·hd, d]
    pub wk: Weight<B>,        // [kv_heads·hd, d]
    pub wv: Weight<B>,        // [kv_heads·hd, d]
    pub wo: Weight<B>,        // [d, heads·hd]
    pub ffn_norm: Tensor<B>,  // [d]
    pub w_gate: Weight<B>,    // [f, d]
    pub w_up: Weight<B>,      // [f, d]
    pub w_down: Weight<B>,    // [d, f]
}

/// The norms are always dense (f32 on the CPU): they are small, and
/// precision matters there.
pub struct LlamaWeights<B: Backend> {
    pub embed: Weight<B>, // [vocab, d]
    pub layers: Vec<LayerWeights<B>>,
    pub norm: Tensor<B>,            // [d]
    pub lm_head: Option<Weight<B>>, // [vocab, d]; None when tied to `embed`
}

impl<B: Backend> LlamaWeights<B> {
    /// The matrices in a fixed order, with their HF names.
    pub fn matrices(&self) -> Vec<(String, &Weight<B>)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.extend([
                (format!("{p}.self_attn.q_proj.weight"), &l.wq),
                (format!("{p}.self_attn.k_proj.weight"), &l.wk),
                (format!("{p}.self_attn.v_proj.weight"), &l.wv),
                (format!("{p}.self_attn.o_proj.weight"), &l.wo),
                (format!("{p}.mlp.gate_proj.weight"), &l.w_gate),
                (format!("{p}.mlp.up_proj.weight"), &l.w_up),
                (format!("{p}.mlp.down_proj.weight"), &l.w_down),
            ]);
        }
        out.extend(
            self.lm_head
                .iter()
                .map(|w| ("lm_head.weight".to_string(), w)),
        );
        out
    }

    /// An error naming the first quantized matrix, for what needs every
    /// weight dense (full fine-tuning).
    pub fn require_dense(&self, what: &str) -> Result<()> {
        match self.matrices().into_iter().find(|(_, w)| !w.is_dense()) {
            Some((name, w)) => Err(Error::Unsupported(format!(
                "{what} needs unquantized weights, and {name} is {}",
                w.format()
            ))),
            None => Ok(()),
        }
    }
}

/// Keys and values of every layer for the positions seen so far.
pub struct KvCache<B: Backend> {
    pub k: Vec<Tensor<B>>, // per layer [capacity, kv_heads·hd]
    pub v: Vec<Tensor<B>>,
    pub len: usize,
    pub capacity: usize,
}

/// Activations of one forward call, allocated once for up to `max_rows` tokens
/// and reshaped to the rows of each call.
pub struct Activations<B: Backend> {
    max_rows: usize,
    x: Tensor<B>,    // residual stream [n, d], f32
    h: Tensor<B>,    // normed input of a block [n, d]
    q: Tensor<B>,    // [n, heads·hd]
    k: Tensor<B>,    // [n, kv_heads·hd]
    v: Tensor<B>,    // [n, kv_heads·hd]
    att: Tensor<B>,  // attention output [n, heads·hd]
    proj: Tensor<B>, // a block's output before the residual add [n, d]
    gate: Tensor<B>, // [n, f]
    up: Tensor<B>,   // [n, f]
    act: Tensor<B>,  // silu(gate) ∘ up [n, f]
    lora: Option<LoraScratch<B>>,
}

impl<B: Backend> Activations<B> {
    fn set_rows(&mut self, n: usize) {
        assert!(n <= self.max_rows, "{n} rows > capacity {}", self.max_rows);
        for t in [
            &mut self.x,
            &mut self.h,
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.att,
            &mut self.proj,
            &mut self.gate,
            &mut self.up,
            &mut self.act,
        ] {
            t.shape[0] = n;
        }
    }
}

pub struct Llama<B: Backend> {
    pub config: LlamaConfig,
    pub weights: LlamaWeights<B>,
    /// A LoRA adapter applied unmerged (inference with `--adapter`, and the
    /// trained parameters of a LoRA fine-tune).
    pub adapter: Option<Lora<B>>,
    pub backend: B,
}

impl<B: Backend> Llama<B> {
    /// Loads an HF model folder (`config.json` and safetensors weights), or
    /// a llama GGUF file, whose matrices keep their formats
    /// (`gguf_model::load_weights`).
    pub fn load(backend: B, path: &Path) -> Result<Self> {
        Self::load_as(backend, path, Weights::F32)
    }

    /// [`Llama::load`], a folder's matrices quantized (or stored in bf16) at
    /// load as `weights` says; a GGUF keeps its own formats.
    pub fn load_as(backend: B, path: &Path, weights: Weights) -> Result<Self> {
        if path.is_file() {
            if weights != Weights::F32 {
                return Err(Error::Invalid(format!(
                    "--weights {weights} converts a model folder at load; {} is a GGUF, run with the formats it has (engine quantize makes others)",
                    path.display()
                )));
            }
            let g = Gguf::open(path)?;
            let hf = HfView::read(&g)?;
            let config = LlamaConfig::parse(&hf.config.to_string(), path)?;
            let weights = gguf_model::load_weights(&backend, &g, &hf)?;
            return Ok(Llama {
                config,
                weights,
                adapter: None,
                backend,
            });
        }
        let dir = path;
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let files = SafetensorsFiles::open_dir(dir)?;
        let weights = load_weights(&backend, &config, &files, dir, weights)?;
        Ok(Llama {
            config,
            weights,
            adapter: None,
            backend,
        })
    }

    /// Applies a PEFT LoRA adapter (unmerged) to every later forward. The
    /// adapter must have been loaded for this model's config.
    pub fn set_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        let lora = Lora::upload(&self.backend, adapter, self.backend.dtype())?;
        self.adapter = Some(lora);
        Ok(())
    }

    pub fn new_cache(&self, capacity: usize) -> Result<KvCache<B>> {
        let (c, be) = (&self.config, &self.backend);
        let kv_width = c.num_kv_heads * c.head_dim;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..c.num_layers {
            k.push(be.zeros(&[capacity, kv_width], be.dtype())?);
            v.push(be.zeros(&[capacity, kv_width], be.dtype())?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    pub fn new_activations(&self, max_rows: usize) -> Result<Activations<B>> {
        let c = &self.config;
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let be = &self.backend;
        let t = |cols: usize| be.zeros(&[max_rows, cols], be.dtype());
        Ok(Activations {
            max_rows,
            // The residual stream sums every block's output: kept in f32 on
            // every device, as half-precision rounding would pile up there.
            x: be.zeros(&[max_rows, d], DType::F32)?,
            h: t(d)?,
            q: t(qw)?,
            k: t(kvw)?,
            v: t(kvw)?,
            att: t(qw)?,
            proj: t(d)?,
            gate: t(f)?,
            up: t(f)?,
            act: t(f)?,
            lora: match &self.adapter {
                Some(l) => Some(LoraScratch::new(be, l.config.rank, max_rows)?),
                None => None,
            },
        })
    }

    /// Runs `ids` (the tokens after the `cache.len` already cached) through the
    /// decoder, appends their keys and values to the cache, and leaves the
    /// final normed hidden states [n, d] in `out`.
    pub fn forward(
        &self,
        out: &mut Tensor<B>,
        ids: &[u32],
        cache: &mut KvCache<B>,
        a: &mut Activations<B>,
    ) -> Result<()> {
        let (c, w, be) = (&self.config, &self.weights, &self.backend);
        let n = ids.len();
        let pos0 = cache.len;
        if pos0 + n > c.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "{} tokens do not fit the model's context of {} (max_position_embeddings)",
                pos0 + n,
                c.max_position_embeddings
            )));
        }
        assert!(
            pos0 + n <= cache.capacity,
            "KV cache of {} rows is full",
            cache.capacity
        );
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        a.set_rows(n);
        w.embed.gather(be, &mut a.x, ids)?;
        for (l, lw) in w.layers.iter().enumerate() {
            // attention block
            be.rmsnorm(&mut a.h, &a.x, &lw.attn_norm, c.rms_norm_eps)?;
            self.linear(&mut a.q, &a.h, &lw.wq, l, Target::QProj, &mut a.lora)?;
            self.linear(&mut a.k, &a.h, &lw.wk, l, Target::KProj, &mut a.lora)?;
            self.linear(&mut a.v, &a.h, &lw.wv, l, Target::VProj, &mut a.lora)?;
            be.rope(&mut a.q, c.num_heads, pos0, c.rope_theta)?;
            be.rope(&mut a.k, c.num_kv_heads, pos0, c.rope_theta)?;
            be.copy_rows(&mut cache.k[l], pos0, &a.k, 0, n)?;
            be.copy_rows(&mut cache.v[l], pos0, &a.v, 0, n)?;
            be.attention(
                &mut a.att,
                None,
                &a.q,
                &cache.k[l],
                &cache.v[l],
                c.num_heads,
                c.num_kv_heads,
                pos0,
            )?;
            self.linear(&mut a.proj, &a.att, &lw.wo, l, Target::OProj, &mut a.lora)?;
            be.add_assign(&mut a.x, &a.proj)?;
            // feed-forward block
            self.feed_forward(a, lw, l)?;
        }
        out.shape[0] = n;
        be.rmsnorm(out, &a.x, &w.norm, c.rms_norm_eps)?;
        cache.len += n;
        Ok(())
    }

    /// Runs one step of batched inference: the rows of many sequences at
    /// once, each at its own position, with keys and values in the paged
    /// cache `kv`, and each sequence's LoRA adapter taken from `adapters`
    /// by its slot (`BatchSeq::adapter`). Writes the next-token logits
    /// [batch.logit_rows, vocab] (f32) to `logits`.
    ///
    /// Every op here computes a row the same way whatever the other rows
    /// are (`matmul_nt_invariant`, per-row norms, attention and adapters),
    /// so on the CPU a sequence's results do not depend on its batch.
    pub fn forward_batch(
        &self,
        logits: &mut Tensor<B>,
        batch: &Batch,
        kv: &mut PagedKv<B>,
        a: &mut Activations<B>,
        adapters: &[Option<&Lora<B>>],
    ) -> Result<()> {
        let (c, w, be) = (&self.config, &self.weights, &self.backend);
        if self.adapter.is_some() {
            return Err(Error::Invalid(
                "forward_batch takes adapters per sequence, not one set on the model".into(),
            ));
        }
        if let Some(&bad) = batch.ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let n = batch.rows();
        let seqs = batch.paged_seqs();
        let lora = RowAdapters {
            slots: adapters,
            rows: batch.row_adapters(),
        };
        a.set_rows(n);
        w.embed.gather(be, &mut a.x, &batch.ids)?;
        for (l, lw) in w.layers.iter().enumerate() {
            // attention block
            be.rmsnorm(&mut a.h, &a.x, &lw.attn_norm, c.rms_norm_eps)?;
            lora.linear(be, &mut a.q, &a.h, &lw.wq, l, Target::QProj)?;
            lora.linear(be, &mut a.k, &a.h, &lw.wk, l, Target::KProj)?;
            lora.linear(be, &mut a.v, &a.h, &lw.wv, l, Target::VProj)?;
            be.rope_rows(&mut a.q, c.num_heads, &batch.positions, c.rope_theta)?;
            be.rope_rows(&mut a.k, c.num_kv_heads, &batch.positions, c.rope_theta)?;
            be.scatter_rows(&mut kv.k[l], &a.k, &batch.slots)?;
            be.scatter_rows(&mut kv.v[l], &a.v, &batch.slots)?;
            be.attention_paged(
                &mut a.att,
                &a.q,
                &kv.k[l],
                &kv.v[l],
                &seqs,
                c.num_heads,
                c.num_kv_heads,
                kv.block_size,
            )?;
            lora.linear(be, &mut a.proj, &a.att, &lw.wo, l, Target::OProj)?;
            be.add_assign(&mut a.x, &a.proj)?;
            // feed-forward block
            be.rmsnorm(&mut a.h, &a.x, &lw.ffn_norm, c.rms_norm_eps)?;
            lora.linear(be, &mut a.gate, &a.h, &lw.w_gate, l, Target::GateProj)?;
            lora.linear(be, &mut a.up, &a.h, &lw.w_up, l, Target::UpProj)?;
            be.swiglu(&mut a.act, &a.gate, &a.up)?;
            lora.linear(be, &mut a.proj, &a.act, &lw.w_down, l, Target::DownProj)?;
            be.add_assign(&mut a.x, &a.proj)?;
        }
        // The final norm over every row, then the logits of the wanted rows
        // only (gathered into `proj`, free by now).
        be.rmsnorm(&mut a.h, &a.x, &w.norm, c.rms_norm_eps)?;
        let r = batch.logit_rows.len();
        a.proj.shape[0] = r;
        for (i, &row) in batch.logit_rows.iter().enumerate() {
            be.copy_rows(&mut a.proj, i, &a.h, row, 1)?;
        }
        logits.shape[0] = r;
        let head = w.lm_head.as_ref().unwrap_or(&w.embed);
        head.matmul_invariant(be, logits, &a.proj)
    }

    /// x += (silu(h·Wgateᵀ) ∘ h·Wupᵀ) · Wdownᵀ with h = rmsnorm(x) · w_ffn_norm.
    fn feed_forward(&self, a: &mut Activations<B>, lw: &LayerWeights<B>, l: usize) -> Result<()> {
        let (c, be) = (&self.config, &self.backend);
        be.rmsnorm(&mut a.h, &a.x, &lw.ffn_norm, c.rms_norm_eps)?;
        self.linear(
            &mut a.gate,
            &a.h,
            &lw.w_gate,
            l,
            Target::GateProj,
            &mut a.lora,
        )?;
        self.linear(&mut a.up, &a.h, &lw.w_up, l, Target::UpProj, &mut a.lora)?;
        be.swiglu(&mut a.act, &a.gate, &a.up)?;
        self.linear(
            &mut a.proj,
            &a.act,
            &lw.w_down,
            l,
            Target::DownProj,
            &mut a.lora,
        )?;
        be.add_assign(&mut a.x, &a.proj)
    }

    /// y = x·Wᵀ, plus the adapter's branch when `(layer, target)` is adapted.
    fn linear(
        &self,
        y: &mut Tensor<B>,
        x: &Tensor<B>,
        w: &Weight<B>,
        layer: usize,
        target: Target,
        scratch: &mut Option<LoraScratch<B>>,
    ) -> Result<()> {
        // Inference takes the batch-invariant product everywhere, so that a
        // prompt gives the same bits through `forward` and `forward_batch`.
        w.matmul_invariant(&self.backend, y, x)?;
        match (&self.adapter, scratch) {
            (Some(lora), Some(s)) => {
                lora.forward(&self.backend, y, x, layer, target, None, None, s)
            }
            (Some(_), None) => Err(Error::Invalid(
                "activations were made before the adapter was set".into(),
            )),
            _ => Ok(()),
        }
    }

    /// logits [n, vocab] = hidden [n, d] · Wᵀ of the output projection.
    pub fn logits(&self, out: &mut Tensor<B>, hidden: &Tensor<B>) -> Result<()> {
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        head.matmul(&self.backend, out, hidden)
    }
}

fn load_weights<B: Backend>(
    be: &B,
    c: &LlamaConfig,
    files: &SafetensorsFiles,
    dir: &Path,
    weights: Weights,
) -> Result<LlamaWeights<B>> {
    let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let load = |name: &str, shape: &[usize]| -> Result<Tensor<B>> {
        be.upload(files.load_f32(name, shape)?, shape, be.dtype())
    };
    // The format of each matrix, by HF name, under the rules llama-quantize
    // follows for the same tensors.
    let names = tensor_names(&Hparams::from_config(c), v, c.tie_word_embeddings);
    let inputs: Vec<TensorIn> = names
        .iter()
        .map(|n| TensorIn {
            name: n.gguf.clone(),
            ne: n.shape.iter().rev().copied().collect(),
            ty: GgmlType::F32,
        })
        .collect();
    let formats: HashMap<&str, Option<GgmlType>> = names
        .iter()
        .map(|n| n.hf.as_str())
        .zip(weights.types(&inputs, c.num_layers))
        .collect();
    let matrix = |name: &str, shape: &[usize]| -> Result<Weight<B>> {
        let Some(&Some(ty)) = formats.get(name) else {
            return load(name, shape).map(Weight::Dense);
        };
        let values = files.load_f32(name, shape)?;
        let bytes = quantize_rows(ty, &values, shape[1])
            .map_err(|e| Error::format(dir, format!("{name}: {e}")))?;
        match be.upload_quant(QBytes::Owned(bytes), ty, shape[0], shape[1]) {
            Ok(q) => Ok(Weight::Quant(q)),
            // A format this device has no kernel for: dense.
            Err(Error::Unsupported(_)) => be.upload(values, shape, be.dtype()).map(Weight::Dense),
            Err(e) => Err(e),
        }
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        layers.push(LayerWeights {
            attn_norm: load(&format!("{p}.input_layernorm.weight"), &[d])?,
            wq: matrix(&format!("{p}.self_attn.q_proj.weight"), &[qw, d])?,
            wk: matrix(&format!("{p}.self_attn.k_proj.weight"), &[kvw, d])?,
            wv: matrix(&format!("{p}.self_attn.v_proj.weight"), &[kvw, d])?,
            wo: matrix(&format!("{p}.self_attn.o_proj.weight"), &[d, qw])?,
            ffn_norm: load(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
            w_gate: matrix(&format!("{p}.mlp.gate_proj.weight"), &[f, d])?,
            w_up: matrix(&format!("{p}.mlp.up_proj.weight"), &[f, d])?,
            w_down: matrix(&format!("{p}.mlp.down_proj.weight"), &[d, f])?,
        });
    }
    // A tied model may still ship lm_head.weight (a copy); use it only if untied.
    let lm_head = if c.tie_word_embeddings {
        None
    } else if files.contains("lm_head.weight") {
        Some(matrix("lm_head.weight", &[v, d])?)
    } else {
        return Err(Error::format(
            dir,
            "tie_word_embeddings is false but there is no lm_head.weight",
        ));
    };
    Ok(LlamaWeights {
        embed: matrix("model.embed_tokens.weight", &[v, d])?,
        layers,
        norm: load("model.norm.weight", &[d])?,
        lm_head,
    })
}

/// The adapters of one batched forward: each slot's LoRA (None: an empty
/// slot) and each row's slot.
struct RowAdapters<'a, B: Backend> {
    slots: &'a [Option<&'a Lora<B>>],
    rows: Vec<u32>,
}

impl<B: Backend> RowAdapters<'_, B> {
    /// y = x·Wᵀ, plus, for each row, the branch of its adapter if that
    /// adapter adapts `(layer, target)`.
    fn linear(
        &self,
        be: &B,
        y: &mut Tensor<B>,
        x: &Tensor<B>,
        w: &Weight<B>,
        layer: usize,
        target: Target,
    ) -> Result<()> {
        w.matmul_invariant(be, y, x)?;
        if self.rows.iter().all(|&s| s == NO_ADAPTER) {
            return Ok(());
        }
        // This target's adapters, and where each slot's went in that list.
        let mut refs = Vec::new();
        let mut index = vec![NO_ADAPTER; self.slots.len()];
        for (slot, lora) in self.slots.iter().enumerate() {
            let Some(lora) = lora else { continue };
            if let Some(j) = lora.config.targets.iter().position(|&t| t == target) {
                index[slot] = refs.len() as u32;
                let pair = &lora.layers[layer][j];
                refs.push(LoraRef {
                    a: &pair.a,
                    b: &pair.b,
                    scale: lora.config.scaling(),
                });
            }
        }
        if refs.is_empty() {
            return Ok(());
        }
        let rows: Vec<u32> = self
            .rows
            .iter()
            .map(|&s| index.get(s as usize).copied().unwrap_or(NO_ADAPTER))
            .collect();
        be.lora_gathered(y, x, &refs, &rows)
    }
}
