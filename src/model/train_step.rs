//! One training step of the Llama, written once against `Backend`, in the
//! style of llm.c's train_gpt2.c: preallocated gradients and activations, a
//! forward that is a flat list of op calls, and a backward that is the same
//! list reversed.
//!
//! A batch is `batch` sequences of `seq` tokens each, laid out row after row
//! ([batch·seq, ·]). The matrix products run over all rows at once; RoPE and
//! attention run one sequence at a time (positions 0..seq, the sequence's own
//! keys and values), through per-sequence scratch buffers.
//!
//! Gradient conventions (those of `Backend`): parameter gradients accumulate
//! over calls of [`forward_backward`], so gradient accumulation over
//! micro-batches is several calls before one [`adamw_update`]; the caller
//! zeroes them with [`Grads::zero`] once per optimizer step.
//!
//! What trains is [`Trainable`]: every weight, or only the LoRA adapter of
//! `Llama::adapter` (the base frozen: its matrix products run backward with
//! no weight gradient, and norms' gradients go to a scratch). Gradient
//! clipping reduces and scales on the device ([`clip_grad_norm`]).
//!
//! Activation checkpointing per layer ([`TrainActivations::with_recompute`])
//! keeps only each layer's input through the forward and recomputes the
//! layer's activations in the backward: less memory for more compute.

use crate::backend::{AdamW, AdamWTensors, Backend};
use crate::error::{Error, Result};
use crate::model::adapter::{Lora, LoraScratch};
use crate::model::llama::{LayerWeights, Llama, LlamaWeights};
use crate::model::lora::Target;
use crate::model::weight::Weight;
use crate::tensor::{DType, Tensor};

/// Which weights train. Gradients are computed (and the optimizer steps)
/// only for these; the others are frozen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trainable {
    /// Full fine-tuning: every weight, f32 gradients and AdamW state.
    Full,
    /// LoRA: only the adapter set on the model (`Llama::adapter`).
    Lora,
}

/// The parameter tensors of a Llama in one fixed order: embed, then per
/// layer attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down, then
/// norm and lm_head (when untied). Gradients and AdamW state use the same
/// order, so zipping the lists pairs each weight with its own state.
pub fn param_list<B: Backend>(w: &LlamaWeights<B>) -> Vec<&Tensor<B>> {
    let mut out = vec![w.embed.dense()];
    for l in &w.layers {
        out.extend([
            &l.attn_norm,
            l.wq.dense(),
            l.wk.dense(),
            l.wv.dense(),
            l.wo.dense(),
            &l.ffn_norm,
            l.w_gate.dense(),
            l.w_up.dense(),
            l.w_down.dense(),
        ]);
    }
    out.push(&w.norm);
    out.extend(w.lm_head.as_ref().map(Weight::dense));
    assert_eq!(out.len(), param_count(w), "parameter list out of step");
    out
}

/// [`param_list`], mutable.
pub fn param_list_mut<B: Backend>(w: &mut LlamaWeights<B>) -> Vec<&mut Tensor<B>> {
    let count = param_count(w);
    let mut out = vec![w.embed.dense_mut()];
    for l in &mut w.layers {
        out.extend([
            &mut l.attn_norm,
            l.wq.dense_mut(),
            l.wk.dense_mut(),
            l.wv.dense_mut(),
            l.wo.dense_mut(),
            &mut l.ffn_norm,
            l.w_gate.dense_mut(),
            l.w_up.dense_mut(),
            l.w_down.dense_mut(),
        ]);
    }
    out.push(&mut w.norm);
    out.extend(w.lm_head.as_mut().map(Weight::dense_mut));
    assert_eq!(out.len(), count, "parameter list out of step");
    out
}

/// The HF names of [`param_list`]'s tensors, in its order.
pub fn param_names<B: Backend>(w: &LlamaWeights<B>) -> Vec<String> {
    let mut out = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..w.layers.len() {
        out.extend(
            [
                "input_layernorm",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "post_attention_layernorm",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ]
            .map(|m| format!("model.layers.{i}.{m}.weight")),
        );
    }
    out.push("model.norm.weight".into());
    if w.lm_head.is_some() {
        out.push("lm_head.weight".into());
    }
    out
}

/// 1 embedding + 9 per layer + 1 final norm + 1 untied head.
fn param_count<B: Backend>(w: &LlamaWeights<B>) -> usize {
    2 + 9 * w.layers.len() + usize::from(w.lm_head.is_some())
}

/// f32 zeros shaped like every weight of `w`.
fn zeros_like<B: Backend>(be: &B, w: &LlamaWeights<B>) -> Result<LlamaWeights<B>> {
    let z = |t: &Tensor<B>| be.zeros(&t.shape, DType::F32);
    let zw = |w: &Weight<B>| Ok(Weight::Dense(be.zeros(&w.shape(), DType::F32)?));
    let mut layers = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        layers.push(LayerWeights {
            attn_norm: z(&l.attn_norm)?,
            wq: zw(&l.wq)?,
            wk: zw(&l.wk)?,
            wv: zw(&l.wv)?,
            wo: zw(&l.wo)?,
            ffn_norm: z(&l.ffn_norm)?,
            w_gate: zw(&l.w_gate)?,
            w_up: zw(&l.w_up)?,
            w_down: zw(&l.w_down)?,
        });
    }
    Ok(LlamaWeights {
        embed: zw(&w.embed)?,
        layers,
        norm: z(&w.norm)?,
        lm_head: w.lm_head.as_ref().map(zw).transpose()?,
    })
}

/// f32 tensors shaped like the trainable parameters: their gradients, and
/// (in [`AdamWState`]) their moments.
pub enum Grads<B: Backend> {
    /// One per weight, the shapes of the model's `LlamaWeights` (dL/d`embed`
    /// is `embed`, and so on). With tied embeddings there is no `lm_head`
    /// gradient: the head's adds into `embed`.
    Full(LlamaWeights<B>),
    /// One per adapter tensor, the shapes of `Llama::adapter`.
    Lora(Lora<B>),
}

impl<B: Backend> Grads<B> {
    pub fn new(model: &Llama<B>, trainable: Trainable) -> Result<Self> {
        let be = &model.backend;
        match trainable {
            Trainable::Full => {
                model.weights.require_dense("full fine-tuning")?;
                Ok(Grads::Full(zeros_like(be, &model.weights)?))
            }
            Trainable::Lora => match &model.adapter {
                Some(lora) => Ok(Grads::Lora(lora.zeros_like(be)?)),
                None => Err(Error::Invalid(
                    "LoRA training needs an adapter on the model".into(),
                )),
            },
        }
    }

    pub fn trainable(&self) -> Trainable {
        match self {
            Grads::Full(_) => Trainable::Full,
            Grads::Lora(_) => Trainable::Lora,
        }
    }

    /// The per-weight gradients of full fine-tuning.
    pub fn full(&self) -> Option<&LlamaWeights<B>> {
        match self {
            Grads::Full(g) => Some(g),
            Grads::Lora(_) => None,
        }
    }

    /// The adapter's gradients of LoRA training.
    pub fn lora(&self) -> Option<&Lora<B>> {
        match self {
            Grads::Lora(g) => Some(g),
            Grads::Full(_) => None,
        }
    }

    /// Every tensor, in the order of the parameters they belong to
    /// ([`param_list`], or `Lora::tensors`).
    pub fn tensors(&self) -> Vec<&Tensor<B>> {
        match self {
            Grads::Full(g) => param_list(g),
            Grads::Lora(g) => g.tensors(),
        }
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor<B>> {
        match self {
            Grads::Full(g) => param_list_mut(g),
            Grads::Lora(g) => g.tensors_mut(),
        }
    }

    /// Zeroes every tensor (gradients: once per optimizer step).
    pub fn zero(&mut self, be: &B) -> Result<()> {
        for t in self.tensors_mut() {
            be.zero(t)?;
        }
        Ok(())
    }
}

/// The trainable parameters of a model's weights and adapter, in the order
/// of [`Grads::tensors`].
fn trainable_params_mut<'a, B: Backend>(
    weights: &'a mut LlamaWeights<B>,
    adapter: &'a mut Option<Lora<B>>,
    trainable: Trainable,
) -> Vec<&'a mut Tensor<B>> {
    match trainable {
        Trainable::Full => param_list_mut(weights),
        Trainable::Lora => adapter
            .as_mut()
            .map(|l| l.tensors_mut())
            .unwrap_or_default(),
    }
}

/// What the backward of one layer needs, for all batch·seq rows. (The
/// layer's input, the residual stream, is `TrainActivations::x_in[l]`.)
pub struct LayerActivations<B: Backend> {
    pub h1: Tensor<B>,  // rmsnorm(x_in) · attn_norm [n, d]
    pub q: Tensor<B>,   // after rope [n, heads·hd]
    pub k: Tensor<B>,   // after rope [n, kv_heads·hd]
    pub v: Tensor<B>,   // [n, kv_heads·hd]
    pub att: Tensor<B>, // attention output [n, heads·hd]
    /// attention's log-sum-exp per sequence, head and row [batch·heads, seq], f32
    pub lse: Tensor<B>,
    pub x_mid: Tensor<B>, // x_in + att·Woᵀ [n, d], f32
    pub h2: Tensor<B>,    // rmsnorm(x_mid) · ffn_norm [n, d]
    pub gate: Tensor<B>,  // [n, f]
    pub up: Tensor<B>,    // [n, f]
    pub act: Tensor<B>,   // silu(gate) ∘ up [n, f]
    /// With an adapter: t = drop(x)·Aᵀ [n, r] of each adapted projection,
    /// in the order of the adapter's targets.
    pub lora_t: Vec<Tensor<B>>,
}

impl<B: Backend> LayerActivations<B> {
    fn tensors(&self) -> impl Iterator<Item = &Tensor<B>> {
        [
            &self.h1,
            &self.q,
            &self.k,
            &self.v,
            &self.att,
            &self.lse,
            &self.x_mid,
            &self.h2,
            &self.gate,
            &self.up,
            &self.act,
        ]
        .into_iter()
        .chain(&self.lora_t)
    }
}

/// One sequence's attention buffers [seq, ·]: RoPE and attention run a
/// sequence at a time.
struct SeqScratch<B: Backend> {
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    att: Tensor<B>, // the output; in the backward, its gradient
    out: Tensor<B>, // the output again, in the backward
    lse: Tensor<B>, // [heads, seq], f32
    dq: Tensor<B>,
    dk: Tensor<B>,
    dv: Tensor<B>,
}

/// Rows of logits made at a time: the head's product, the cross-entropy
/// and the head's backward run over chunks of this many rows, so the
/// [n, vocab] logits (and their gradient) are never held whole — for
/// SmolLM2's 49152-token vocabulary, 48 MiB each instead of 192 KiB per row.
const LOGIT_ROWS: usize = 256;

/// The scratch of [`head_loss_backward`], for up to `LOGIT_ROWS` rows.
struct HeadScratch<B: Backend> {
    hf: Tensor<B>,      // a chunk of rmsnorm(x_out) · norm [c, d]
    logits: Tensor<B>,  // [c, vocab], f32
    dlogits: Tensor<B>, // [c, vocab], f32
    dh: Tensor<B>,      // [c, d]
}

/// Activations of one `forward_backward` call on `batch` sequences of `seq`
/// tokens, kept for the backward, plus the scratch the backward uses.
///
/// With `recompute` (activation checkpointing per layer) the forward keeps
/// only each layer's input `x_in[l]` and runs every layer into one shared
/// working set, `layers[0]`; the backward re-runs layer l's forward from
/// `x_in[l]` before its backward. Same ops on the same inputs: the same
/// numbers, for about one more forward's compute and a layer's activations
/// instead of all of them.
pub struct TrainActivations<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    pub recompute: bool,
    /// The residual stream entering each block [n, d], f32, one per layer.
    pub x_in: Vec<Tensor<B>>,
    /// Each layer's activations; with `recompute`, the one working set.
    pub layers: Vec<LayerActivations<B>>,
    pub x_out: Tensor<B>, // residual stream after the last block [n, d], f32
    pub hf: Tensor<B>,    // rmsnorm(x_out) · norm [n, d]
    head: HeadScratch<B>,
    // backward scratch, all rows
    proj: Tensor<B>, // a block's output before the residual add [n, d]
    dx: Tensor<B>,   // gradient of the residual stream [n, d], f32
    dh: Tensor<B>,   // [n, d]
    datt: Tensor<B>, // [n, heads·hd]
    dq: Tensor<B>,   // [n, heads·hd]
    dk: Tensor<B>,   // [n, kv_heads·hd]
    dv: Tensor<B>,   // [n, kv_heads·hd]
    dact: Tensor<B>, // [n, f]
    dgate: Tensor<B>,
    dup: Tensor<B>,
    s: SeqScratch<B>,
    /// The gradient of a frozen RMSNorm gain (LoRA), computed and dropped [d].
    dnorm_frozen: Tensor<B>,
    lora: Option<LoraScratch<B>>,
}

impl<B: Backend> TrainActivations<B> {
    /// Activations for `model` as it is now: set the adapter first.
    pub fn new(model: &Llama<B>, batch: usize, seq: usize) -> Result<Self> {
        Self::with_recompute(model, batch, seq, false)
    }

    /// [`TrainActivations::new`], recomputing each layer's activations in
    /// the backward when `recompute` is set.
    pub fn with_recompute(
        model: &Llama<B>,
        batch: usize,
        seq: usize,
        recompute: bool,
    ) -> Result<Self> {
        let c = &model.config;
        let be = &model.backend;
        let n = batch * seq;
        let (d, f, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let dt = be.dtype();
        let t = |rows: usize, cols: usize| be.zeros(&[rows, cols], dt);
        // The residual stream and its gradient stay f32 on every device.
        let f32t = |cols: usize| be.zeros(&[n, cols], DType::F32);
        let lora = model.adapter.as_ref();
        // Without recompute one set per layer, with it one shared set.
        let sets = if recompute { 1 } else { c.num_layers };
        let mut layers = Vec::with_capacity(sets);
        for _ in 0..sets {
            let lora_t = match lora {
                Some(l) => (0..l.config.targets.len())
                    .map(|_| be.zeros(&[n, l.config.rank], DType::F32))
                    .collect::<Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            layers.push(LayerActivations {
                h1: t(n, d)?,
                q: t(n, qw)?,
                k: t(n, kvw)?,
                v: t(n, kvw)?,
                att: t(n, qw)?,
                lse: be.zeros(&[batch * c.num_heads, seq], DType::F32)?,
                x_mid: f32t(d)?,
                h2: t(n, d)?,
                gate: t(n, f)?,
                up: t(n, f)?,
                act: t(n, f)?,
                lora_t,
            });
        }
        Ok(TrainActivations {
            batch,
            seq,
            recompute,
            x_in: (0..c.num_layers).map(|_| f32t(d)).collect::<Result<_>>()?,
            layers,
            x_out: f32t(d)?,
            hf: t(n, d)?,
            head: HeadScratch {
                hf: t(n.min(LOGIT_ROWS), d)?,
                logits: be.zeros(&[n.min(LOGIT_ROWS), vocab], DType::F32)?,
                dlogits: be.zeros(&[n.min(LOGIT_ROWS), vocab], DType::F32)?,
                dh: t(n.min(LOGIT_ROWS), d)?,
            },
            proj: t(n, d)?,
            dx: f32t(d)?,
            dh: t(n, d)?,
            datt: t(n, qw)?,
            dq: t(n, qw)?,
            dk: t(n, kvw)?,
            dv: t(n, kvw)?,
            dact: t(n, f)?,
            dgate: t(n, f)?,
            dup: t(n, f)?,
            s: SeqScratch {
                q: t(seq, qw)?,
                k: t(seq, kvw)?,
                v: t(seq, kvw)?,
                att: t(seq, qw)?,
                out: t(seq, qw)?,
                lse: be.zeros(&[c.num_heads, seq], DType::F32)?,
                dq: t(seq, qw)?,
                dk: t(seq, kvw)?,
                dv: t(seq, kvw)?,
            },
            dnorm_frozen: be.zeros(&[d], DType::F32)?,
            lora: lora
                .map(|l| LoraScratch::new(be, l.config.rank, n))
                .transpose()?,
        })
    }

    /// Device bytes of every activation and scratch buffer held: with
    /// `recompute`, one layer's activations and every layer's input instead
    /// of every layer's activations.
    pub fn bytes(&self) -> usize {
        let s = &self.s;
        let held = [
            &self.x_out,
            &self.hf,
            &self.head.hf,
            &self.head.logits,
            &self.head.dlogits,
            &self.head.dh,
            &self.proj,
            &self.dx,
            &self.dh,
            &self.datt,
            &self.dq,
            &self.dk,
            &self.dv,
            &self.dact,
            &self.dgate,
            &self.dup,
            &s.q,
            &s.k,
            &s.v,
            &s.att,
            &s.out,
            &s.lse,
            &s.dq,
            &s.dk,
            &s.dv,
            &self.dnorm_frozen,
        ];
        let layers = self.layers.iter().flat_map(|la| la.tensors());
        held.into_iter()
            .chain(&self.x_in)
            .chain(layers)
            .map(|t| t.numel() * t.dtype.size())
            .sum::<usize>()
            + self.lora.as_ref().map_or(0, LoraScratch::bytes)
    }
}

/// The adapter's branches during one step: the adapter, its gradients (in
/// the backward), its scratch, and the step's dropout seed.
struct Branches<'a, B: Backend> {
    lora: &'a Lora<B>,
    grads: Option<&'a mut Lora<B>>,
    scratch: &'a mut LoraScratch<B>,
    seed: u64,
}

impl<B: Backend> Branches<'_, B> {
    /// Index of `target` among the adapter's targets, and its dropout: one
    /// mask per (step, layer, projection), as PEFT draws one per module.
    fn branch(&self, layer: usize, target: Target) -> Option<(usize, Option<(f32, u64)>)> {
        let j = self.lora.config.targets.iter().position(|&t| t == target)?;
        let id = (layer * Target::ALL.len() + target as usize + 1) as u64;
        let seed = self.seed ^ id.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Some((j, Some((self.lora.config.dropout, seed))))
    }
}

/// y = x·Wᵀ, plus the adapter's branch (t kept in `ts`) when adapted.
#[allow(clippy::too_many_arguments)]
fn linear<B: Backend>(
    be: &B,
    br: &mut Option<Branches<B>>,
    y: &mut Tensor<B>,
    x: &Tensor<B>,
    w: &Weight<B>,
    ts: &mut [Tensor<B>],
    layer: usize,
    target: Target,
) -> Result<()> {
    w.matmul(be, y, x)?;
    let Some(br) = br else { return Ok(()) };
    let Some((j, dropout)) = br.branch(layer, target) else {
        return Ok(());
    };
    br.lora.forward(
        be,
        y,
        x,
        layer,
        target,
        dropout,
        Some(&mut ts[j]),
        br.scratch,
    )
}

/// The backward of [`linear`]: dx += dy·W, dW += dyᵀ·x when W trains
/// (`dw`), and the branch's backward when adapted.
#[allow(clippy::too_many_arguments)]
fn linear_backward<B: Backend>(
    be: &B,
    br: &mut Option<Branches<B>>,
    dx: &mut Tensor<B>,
    dw: Option<&mut Tensor<B>>,
    dy: &Tensor<B>,
    x: &Tensor<B>,
    w: &Weight<B>,
    ts: &[Tensor<B>],
    layer: usize,
    target: Target,
) -> Result<()> {
    w.matmul_backward(be, dx, dw, dy, x)?;
    let Some(br) = br else { return Ok(()) };
    let Some((j, dropout)) = br.branch(layer, target) else {
        return Ok(());
    };
    let grads = br
        .grads
        .as_deref_mut()
        .expect("LoRA gradients in the backward");
    br.lora.backward(
        be, grads, dx, dy, x, &ts[j], layer, target, dropout, br.scratch,
    )
}

/// The forward of block `l` over all rows, from its input `x_in` [n, d]
/// (f32): its activations into `la` (the LoRA t's included), and, when
/// `x_out` is given, its output x_out = x_mid + act·Wdᵀ [n, d] (f32). `proj`
/// and `s` are scratch. Both the forward and the backward's recomputation run it,
/// so the two compute the same numbers.
#[allow(clippy::too_many_arguments)]
fn layer_forward<B: Backend>(
    model: &Llama<B>,
    br: &mut Option<Branches<B>>,
    la: &mut LayerActivations<B>,
    x_out: Option<&mut Tensor<B>>,
    proj: &mut Tensor<B>,
    s: &mut SeqScratch<B>,
    x_in: &Tensor<B>,
    l: usize,
    batch: usize,
    seq: usize,
) -> Result<()> {
    let (c, be, lw) = (&model.config, &model.backend, &model.weights.layers[l]);
    let (heads, kv_heads, theta, eps) = (c.num_heads, c.num_kv_heads, c.rope_theta, c.rms_norm_eps);
    let n = batch * seq;
    let ts = &mut la.lora_t;
    be.rmsnorm(&mut la.h1, x_in, &lw.attn_norm, eps)?;
    linear(be, br, &mut la.q, &la.h1, &lw.wq, ts, l, Target::QProj)?;
    linear(be, br, &mut la.k, &la.h1, &lw.wk, ts, l, Target::KProj)?;
    linear(be, br, &mut la.v, &la.h1, &lw.wv, ts, l, Target::VProj)?;
    for i in 0..batch {
        let r = i * seq;
        be.copy_rows(&mut s.q, 0, &la.q, r, seq)?;
        be.copy_rows(&mut s.k, 0, &la.k, r, seq)?;
        be.copy_rows(&mut s.v, 0, &la.v, r, seq)?;
        be.rope(&mut s.q, heads, 0, theta)?;
        be.rope(&mut s.k, kv_heads, 0, theta)?;
        let lse = Some(&mut s.lse);
        be.attention(&mut s.att, lse, &s.q, &s.k, &s.v, heads, kv_heads, 0)?;
        be.copy_rows(&mut la.lse, i * heads, &s.lse, 0, heads)?;
        be.copy_rows(&mut la.q, r, &s.q, 0, seq)?;
        be.copy_rows(&mut la.k, r, &s.k, 0, seq)?;
        be.copy_rows(&mut la.att, r, &s.att, 0, seq)?;
    }
    linear(be, br, proj, &la.att, &lw.wo, ts, l, Target::OProj)?;
    be.copy_rows(&mut la.x_mid, 0, x_in, 0, n)?;
    be.add_assign(&mut la.x_mid, proj)?;
    be.rmsnorm(&mut la.h2, &la.x_mid, &lw.ffn_norm, eps)?;
    linear(
        be,
        br,
        &mut la.gate,
        &la.h2,
        &lw.w_gate,
        ts,
        l,
        Target::GateProj,
    )?;
    linear(be, br, &mut la.up, &la.h2, &lw.w_up, ts, l, Target::UpProj)?;
    be.swiglu(&mut la.act, &la.gate, &la.up)?;
    // (Run also when recomputing: it keeps the down projection's LoRA t.)
    linear(be, br, proj, &la.act, &lw.w_down, ts, l, Target::DownProj)?;
    if let Some(x_out) = x_out {
        be.copy_rows(x_out, 0, &la.x_mid, 0, n)?;
        be.add_assign(x_out, proj)?;
    }
    Ok(())
}

/// The loss head over `LOGIT_ROWS` rows at a time, forward and backward:
///   logits = hf · Wheadᵀ;  the fused cross-entropy (dlogits scaled by
///   `loss_scale`);  dh = dlogits · Whead,  dWhead += dlogitsᵀ · hf
/// with dh [n, d] overwritten and dWhead (`dhead`, None when frozen)
/// accumulated. Returns the summed loss over the counted targets.
#[allow(clippy::too_many_arguments)]
fn head_loss_backward<B: Backend>(
    be: &B,
    h: &mut HeadScratch<B>,
    dh: &mut Tensor<B>,
    mut dhead: Option<&mut Tensor<B>>,
    hf: &Tensor<B>,
    head: &Weight<B>,
    targets: &[u32],
    loss_scale: f32,
) -> Result<f32> {
    let n = targets.len();
    let mut loss = 0.0f64;
    for r0 in (0..n).step_by(LOGIT_ROWS) {
        let rows = LOGIT_ROWS.min(n - r0);
        for t in [&mut h.hf, &mut h.logits, &mut h.dlogits, &mut h.dh] {
            t.shape[0] = rows;
        }
        be.copy_rows(&mut h.hf, 0, hf, r0, rows)?;
        head.matmul(be, &mut h.logits, &h.hf)?;
        let chunk = &targets[r0..r0 + rows];
        loss += be.cross_entropy(Some(&mut h.dlogits), &h.logits, chunk, Some(loss_scale))? as f64;
        be.zero(&mut h.dh)?;
        head.matmul_backward(be, &mut h.dh, dhead.as_deref_mut(), &h.dlogits, &h.hf)?;
        be.copy_rows(dh, r0, &h.dh, 0, rows)?;
    }
    Ok(loss as f32)
}

/// One forward and backward over `batch` sequences of `seq` tokens.
///
/// `ids` and `targets` are [batch·seq]; a target of `backend::IGNORE` counts
/// no loss. The cross-entropy's gradient is scaled by `loss_scale` (usually
/// 1 / the counted targets of the whole optimizer step, across
/// micro-batches), and parameter gradients are *added* into `grads`.
/// `dropout_seed` draws the LoRA dropout masks (give each call its own).
/// Returns the summed loss over the counted targets of this call.
///
/// Forward, per layer, as `Llama::forward` runs it:
///   h1 = rmsnorm(x_in)·attn_norm; q, k, v = h1·Wqᵀ, h1·Wkᵀ, h1·Wvᵀ; rope(q, k)
///   x_mid = x_in + attention(q, k, v)·Woᵀ
///   h2 = rmsnorm(x_mid)·ffn_norm; x_out = x_mid + (silu(h2·Wgᵀ) ∘ h2·Wuᵀ)·Wdᵀ
/// then logits = rmsnorm(x)·norm·Wheadᵀ and the fused cross-entropy. With
/// an adapter, each adapted product adds its LoRA branch (`model::adapter`).
/// With `a.recompute`, the backward re-runs each layer's forward (the same
/// [`layer_forward`]) before that layer's backward: the same numbers.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<B: Backend>(
    model: &Llama<B>,
    a: &mut TrainActivations<B>,
    grads: &mut Grads<B>,
    ids: &[u32],
    targets: &[u32],
    batch: usize,
    seq: usize,
    loss_scale: f32,
    dropout_seed: u64,
) -> Result<f32> {
    let (c, w, be) = (&model.config, &model.weights, &model.backend);
    let n = batch * seq;
    if (a.batch, a.seq) != (batch, seq) {
        return Err(Error::Invalid(format!(
            "activations are for {} sequences of {} tokens, the batch is {batch} of {seq}",
            a.batch, a.seq
        )));
    }
    if ids.len() != n || targets.len() != n {
        return Err(Error::Invalid(format!(
            "a batch of {batch}×{seq} needs {n} ids and targets; got {} and {}",
            ids.len(),
            targets.len()
        )));
    }
    if seq > c.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "sequences of {seq} tokens do not fit the model's context of {}",
            c.max_position_embeddings
        )));
    }
    let vocab = c.vocab_size as u32;
    if let Some(&bad) = ids.iter().find(|&&id| id >= vocab) {
        return Err(Error::Invalid(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    if let Some(&bad) = targets
        .iter()
        .find(|&&t| t >= vocab && t != crate::backend::IGNORE)
    {
        return Err(Error::Invalid(format!(
            "target id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let (mut gfull, glora) = match grads {
        Grads::Full(g) => (Some(g), None),
        Grads::Lora(g) => (None, Some(g)),
    };
    if model.adapter.is_some() != glora.is_some() || a.lora.is_some() != glora.is_some() {
        return Err(Error::Invalid(
            "LoRA training needs the adapter set on the model before its activations and \
             gradients are made; full fine-tuning needs no adapter (merge it first)"
                .into(),
        ));
    }
    let (heads, kv_heads, theta, eps) = (c.num_heads, c.num_kv_heads, c.rope_theta, c.rms_norm_eps);
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    let mut br = match (&model.adapter, a.lora.as_mut()) {
        (Some(lora), Some(scratch)) => Some(Branches {
            lora,
            grads: None,
            scratch,
            seed: dropout_seed,
        }),
        _ => None,
    };

    // ----- forward -----
    w.embed.gather(be, &mut a.x_in[0], ids)?;
    for l in 0..c.num_layers {
        let (done, rest) = a.x_in.split_at_mut(l + 1);
        let next = rest.first_mut().unwrap_or(&mut a.x_out);
        let la = &mut a.layers[if a.recompute { 0 } else { l }];
        let (x, proj, s) = (&done[l], &mut a.proj, &mut a.s);
        layer_forward(model, &mut br, la, Some(next), proj, s, x, l, batch, seq)?;
    }
    be.rmsnorm(&mut a.hf, &a.x_out, &w.norm, eps)?;
    // logits = hf · Wheadᵀ, the loss, and (the backward starting) dh and
    // the head's gradient — a tied head's adds into the embedding's.
    let dhead = gfull
        .as_deref_mut()
        .map(|g| g.lm_head.as_mut().unwrap_or(&mut g.embed).dense_mut());
    let (h, dh, hf) = (&mut a.head, &mut a.dh, &a.hf);
    let loss = head_loss_backward(be, h, dh, dhead, hf, head, targets, loss_scale)?;

    // ----- backward: the same list reversed -----
    if let Some(br) = br.as_mut() {
        br.grads = glora;
    }
    // hf = rmsnorm(x_out) · norm; dx collects every block's contribution.
    be.zero(&mut a.dx)?;
    let dnorm = match gfull.as_deref_mut() {
        Some(g) => &mut g.norm,
        None => &mut a.dnorm_frozen,
    };
    be.rmsnorm_backward(&mut a.dx, dnorm, &a.dh, &a.x_out, &w.norm, eps)?;
    for l in (0..c.num_layers).rev() {
        // Recompute: the working set still holds the last layer's forward;
        // every other layer's is run again from its input.
        if a.recompute && l + 1 < c.num_layers {
            let (la, x) = (&mut a.layers[0], &a.x_in[l]);
            layer_forward(
                model,
                &mut br,
                la,
                None,
                &mut a.proj,
                &mut a.s,
                x,
                l,
                batch,
                seq,
            )?;
        }
        let (lw, la) = (&w.layers[l], &a.layers[if a.recompute { 0 } else { l }]);
        let ts = &la.lora_t;
        let mut gl = gfull.as_deref_mut().map(|g| &mut g.layers[l]);
        // x_out = x_mid + act · Wdᵀ: dx flows on unchanged, and into the block
        be.zero(&mut a.dact)?;
        let dw = gl.as_deref_mut().map(|g| g.w_down.dense_mut());
        let (dy, x) = (&a.dx, &la.act);
        linear_backward(
            be,
            &mut br,
            &mut a.dact,
            dw,
            dy,
            x,
            &lw.w_down,
            ts,
            l,
            Target::DownProj,
        )?;
        // act = silu(gate) ∘ up
        be.swiglu_backward(&mut a.dgate, &mut a.dup, &a.dact, &la.gate, &la.up)?;
        // gate, up = h2 · Wgᵀ, h2 · Wuᵀ
        be.zero(&mut a.dh)?;
        let dw = gl.as_deref_mut().map(|g| g.w_gate.dense_mut());
        let (dy, x) = (&a.dgate, &la.h2);
        linear_backward(
            be,
            &mut br,
            &mut a.dh,
            dw,
            dy,
            x,
            &lw.w_gate,
            ts,
            l,
            Target::GateProj,
        )?;
        let dw = gl.as_deref_mut().map(|g| g.w_up.dense_mut());
        let dy = &a.dup;
        linear_backward(
            be,
            &mut br,
            &mut a.dh,
            dw,
            dy,
            x,
            &lw.w_up,
            ts,
            l,
            Target::UpProj,
        )?;
        // h2 = rmsnorm(x_mid) · ffn_norm
        let dnorm = match gl.as_deref_mut() {
            Some(g) => &mut g.ffn_norm,
            None => &mut a.dnorm_frozen,
        };
        be.rmsnorm_backward(&mut a.dx, dnorm, &a.dh, &la.x_mid, &lw.ffn_norm, eps)?;
        // x_mid = x_in + att · Woᵀ
        be.zero(&mut a.datt)?;
        let dw = gl.as_deref_mut().map(|g| g.wo.dense_mut());
        let (dy, x) = (&a.dx, &la.att);
        linear_backward(
            be,
            &mut br,
            &mut a.datt,
            dw,
            dy,
            x,
            &lw.wo,
            ts,
            l,
            Target::OProj,
        )?;
        // att = attention(rope(q), rope(k), v), one sequence at a time
        for s in 0..batch {
            let r = s * seq;
            be.copy_rows(&mut a.s.att, 0, &a.datt, r, seq)?; // s.att holds d(att) here
            be.copy_rows(&mut a.s.q, 0, &la.q, r, seq)?;
            be.copy_rows(&mut a.s.k, 0, &la.k, r, seq)?;
            be.copy_rows(&mut a.s.v, 0, &la.v, r, seq)?;
            be.copy_rows(&mut a.s.out, 0, &la.att, r, seq)?;
            be.copy_rows(&mut a.s.lse, 0, &la.lse, s * heads, heads)?;
            be.zero(&mut a.s.dk)?;
            be.zero(&mut a.s.dv)?;
            be.attention_backward(
                &mut a.s.dq,
                &mut a.s.dk,
                &mut a.s.dv,
                &a.s.att,
                &a.s.q,
                &a.s.k,
                &a.s.v,
                &a.s.out,
                &a.s.lse,
                heads,
                kv_heads,
                0,
            )?;
            be.rope_backward(&mut a.s.dq, heads, 0, theta)?;
            be.rope_backward(&mut a.s.dk, kv_heads, 0, theta)?;
            be.copy_rows(&mut a.dq, r, &a.s.dq, 0, seq)?;
            be.copy_rows(&mut a.dk, r, &a.s.dk, 0, seq)?;
            be.copy_rows(&mut a.dv, r, &a.s.dv, 0, seq)?;
        }
        // q, k, v = h1 · Wqᵀ, h1 · Wkᵀ, h1 · Wvᵀ
        be.zero(&mut a.dh)?;
        let x = &la.h1;
        let dw = gl.as_deref_mut().map(|g| g.wq.dense_mut());
        linear_backward(
            be,
            &mut br,
            &mut a.dh,
            dw,
            &a.dq,
            x,
            &lw.wq,
            ts,
            l,
            Target::QProj,
        )?;
        let dw = gl.as_deref_mut().map(|g| g.wk.dense_mut());
        linear_backward(
            be,
            &mut br,
            &mut a.dh,
            dw,
            &a.dk,
            x,
            &lw.wk,
            ts,
            l,
            Target::KProj,
        )?;
        let dw = gl.as_deref_mut().map(|g| g.wv.dense_mut());
        linear_backward(
            be,
            &mut br,
            &mut a.dh,
            dw,
            &a.dv,
            x,
            &lw.wv,
            ts,
            l,
            Target::VProj,
        )?;
        // h1 = rmsnorm(x_in) · attn_norm
        let dnorm = match gl {
            Some(g) => &mut g.attn_norm,
            None => &mut a.dnorm_frozen,
        };
        be.rmsnorm_backward(&mut a.dx, dnorm, &a.dh, &a.x_in[l], &lw.attn_norm, eps)?;
    }
    // x = embed[ids]
    if let Some(g) = gfull {
        be.embedding_backward(g.embed.dense_mut(), &a.dx, ids)?;
    }
    Ok(loss)
}

/// AdamW moments, f32, one pair per trainable tensor (the shapes of
/// `Grads`), and, on a device whose weights are not f32 (bf16 on a GPU), f32
/// master copies of the trained tensors: the optimizer steps the masters and
/// refreshes the working copies from them, so that updates smaller than the
/// working type's resolution are not lost.
pub struct AdamWState<B: Backend> {
    pub m: Grads<B>,
    pub v: Grads<B>,
    pub master: Option<Grads<B>>,
}

impl<B: Backend> AdamWState<B> {
    pub fn new(model: &Llama<B>, trainable: Trainable) -> Result<Self> {
        let be = &model.backend;
        let master = if be.dtype() == DType::F32 {
            None
        } else {
            let mut master = Grads::new(model, trainable)?;
            let params: Vec<&Tensor<B>> = match trainable {
                Trainable::Full => param_list(&model.weights),
                Trainable::Lora => model
                    .adapter
                    .as_ref()
                    .map(|l| l.tensors())
                    .unwrap_or_default(),
            };
            for (dst, src) in master.tensors_mut().into_iter().zip(params) {
                be.convert(dst, src)?;
            }
            Some(master)
        };
        Ok(AdamWState {
            m: Grads::new(model, trainable)?,
            v: Grads::new(model, trainable)?,
            master,
        })
    }
}

/// One AdamW step (`Backend::adamw_step`, one launch) on every trainable tensor, with
/// `hp.step` the step number from 1. Gradients are left as they are: zero
/// them before the next step's first `forward_backward`.
pub fn adamw_update<B: Backend>(
    model: &mut Llama<B>,
    grads: &Grads<B>,
    state: &mut AdamWState<B>,
    hp: &AdamW,
) -> Result<()> {
    let trainable = grads.trainable();
    if state.m.trainable() != trainable {
        return Err(Error::Invalid(
            "optimizer state and gradients are for different parameters".into(),
        ));
    }
    let Llama {
        weights,
        adapter,
        backend: be,
        ..
    } = model;
    let params = trainable_params_mut(weights, adapter, trainable);
    let gs = grads.tensors();
    let ms = state.m.tensors_mut();
    let vs = state.v.tensors_mut();
    assert!(params.len() == gs.len() && ms.len() == gs.len() && vs.len() == gs.len());
    // With masters, AdamW steps the f32 master and refreshes the working
    // weight from it in the same pass.
    let masters: Vec<Option<&mut Tensor<B>>> = match state.master.as_mut() {
        Some(master) => master.tensors_mut().into_iter().map(Some).collect(),
        None => gs.iter().map(|_| None).collect(),
    };
    let mut tensors: Vec<AdamWTensors<B>> = params
        .into_iter()
        .zip(masters)
        .zip(gs)
        .zip(ms.into_iter().zip(vs))
        .map(|(((p, master), grad), (m, v))| match master {
            Some(w) => AdamWTensors {
                param: w,
                m,
                v,
                grad,
                copy: Some(p),
            },
            None => AdamWTensors {
                param: p,
                m,
                v,
                grad,
                copy: None,
            },
        })
        .collect();
    be.adamw_step(&mut tensors, hp)
}

/// The global L2 norm of all gradients, sqrt(Σ g²), summed in f64 on the
/// device (`Backend::sum_squares`).
pub fn grad_norm<B: Backend>(be: &B, grads: &Grads<B>) -> Result<f32> {
    let mut sum = 0.0f64;
    for t in grads.tensors() {
        sum += be.sum_squares(t)?;
    }
    Ok(sum.sqrt() as f32)
}

/// Global-norm clipping as torch's `clip_grad_norm_`: when the norm exceeds
/// `max_norm`, every gradient is scaled by max_norm / (norm + 1e-6), a
/// factor rounded to f32 as torch's is. Returns the norm before clipping.
pub fn clip_grad_norm<B: Backend>(be: &B, grads: &mut Grads<B>, max_norm: f32) -> Result<f32> {
    let norm = grad_norm(be, grads)?;
    let coef = (max_norm as f64 / (norm as f64 + 1e-6)) as f32;
    if coef < 1.0 {
        for t in grads.tensors_mut() {
            be.scale(t, coef)?;
        }
    }
    Ok(norm)
}
