//! A llama model in GGUF's terms, both ways: the `llama.*` hyperparameter
//! keys, the GGUF ↔ HF tensor names and shapes, and the RoPE row order of
//! q/k weights. `engine convert` (GGUF → HF) and `engine quantize` (HF or
//! GGUF → GGUF) share them.

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::gguf::{Gguf, Value};

/// The hyperparameters of a llama model, as GGUF's `llama.*` keys hold them.
#[derive(Clone, Debug, PartialEq)]
pub struct Hparams {
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub context_length: usize,
}

const A: &str = "llama";

impl Hparams {
    /// Reads and checks the keys of a llama GGUF.
    pub fn read(g: &Gguf) -> Result<Self> {
        let n_head = g.get_usize(&format!("{A}.attention.head_count"))?;
        let hidden = g.get_usize(&format!("{A}.embedding_length"))?;
        let opt_usize = |key: &str| g.get(key).map(|_| g.get_usize(key)).transpose();
        let n_kv_head = opt_usize(&format!("{A}.attention.head_count_kv"))?.unwrap_or(n_head);
        let bad = |msg: String| Error::format(g.path(), msg);
        if n_head == 0 || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            return Err(bad(format!(
                "head counts {n_head} (query) / {n_kv_head} (key-value) are not valid"
            )));
        }
        let head_dim = match opt_usize(&format!("{A}.attention.key_length"))? {
            Some(d) => d,
            None if hidden.is_multiple_of(n_head) => hidden / n_head,
            None => {
                return Err(bad(format!(
                    "embedding length {hidden} is not a multiple of the head count {n_head}"
                )))
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head dimension {head_dim} is odd")));
        }
        if let Some(v) = g.get(&format!("{A}.rope.scaling.type")) {
            if v.as_str() != Some("none") {
                return Err(Error::Unsupported(format!(
                    "{}: RoPE scaling ({A}.rope.scaling.type = {v:?}) is not supported",
                    g.path().display()
                )));
            }
        }
        let opt_f32 = |key: &str| g.get(key).map(|_| g.get_f32(key)).transpose();
        Ok(Hparams {
            n_layers: g.get_usize(&format!("{A}.block_count"))?,
            hidden,
            ffn: g.get_usize(&format!("{A}.feed_forward_length"))?,
            n_head,
            n_kv_head,
            head_dim,
            rms_norm_eps: g.get_f32(&format!("{A}.attention.layer_norm_rms_epsilon"))?,
            rope_theta: opt_f32(&format!("{A}.rope.freq_base"))?.unwrap_or(10000.0),
            context_length: g.get_usize(&format!("{A}.context_length"))?,
        })
    }

    /// The hyperparameters of an HF config (which `LlamaConfig` has checked).
    pub fn from_config(c: &LlamaConfig) -> Self {
        Hparams {
            n_layers: c.num_layers,
            hidden: c.hidden_size,
            ffn: c.intermediate_size,
            n_head: c.num_heads,
            n_kv_head: c.num_kv_heads,
            head_dim: c.head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            context_length: c.max_position_embeddings,
        }
    }

    /// The `llama.*` keys llama.cpp's convert_hf_to_gguf.py writes for them.
    pub fn metadata(&self, vocab: usize) -> Vec<(String, Value)> {
        let u = |n: usize| Value::U32(n as u32);
        [
            ("block_count", u(self.n_layers)),
            ("context_length", u(self.context_length)),
            ("embedding_length", u(self.hidden)),
            ("feed_forward_length", u(self.ffn)),
            ("attention.head_count", u(self.n_head)),
            ("attention.head_count_kv", u(self.n_kv_head)),
            ("rope.freq_base", Value::F32(self.rope_theta)),
            (
                "attention.layer_norm_rms_epsilon",
                Value::F32(self.rms_norm_eps),
            ),
            ("attention.key_length", u(self.head_dim)),
            ("attention.value_length", u(self.head_dim)),
            ("vocab_size", u(vocab)),
            ("rope.dimension_count", u(self.head_dim)),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{A}.{k}"), v))
        .collect()
    }
}

/// One tensor of a llama model under both names.
#[derive(Clone, Debug)]
pub struct TensorName {
    pub gguf: String,
    pub hf: String,
    /// Row-major shape, outermost first (GGUF's `ne` reversed).
    pub shape: Vec<usize>,
    /// A q or k weight, whose rows llama.cpp stores in its RoPE order for
    /// this many heads.
    pub rope_heads: Option<usize>,
}

/// The tensors of a llama model, in the order convert writes them; `tied`:
/// the output head is the token embedding (no `output.weight`).
pub fn tensor_names(hp: &Hparams, vocab: usize, tied: bool) -> Vec<TensorName> {
    let (h, f) = (hp.hidden, hp.ffn);
    let (q_rows, kv_rows) = (hp.n_head * hp.head_dim, hp.n_kv_head * hp.head_dim);
    let t = |gguf: String, hf: String, shape: Vec<usize>, rope_heads: Option<usize>| TensorName {
        gguf,
        hf,
        shape,
        rope_heads,
    };
    let mut out = vec![t(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        None,
    )];
    for i in 0..hp.n_layers {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        let l = |s: &str| format!("model.layers.{i}.{s}.weight");
        out.extend([
            t(b("attn_norm"), l("input_layernorm"), vec![h], None),
            t(
                b("attn_q"),
                l("self_attn.q_proj"),
                vec![q_rows, h],
                Some(hp.n_head),
            ),
            t(
                b("attn_k"),
                l("self_attn.k_proj"),
                vec![kv_rows, h],
                Some(hp.n_kv_head),
            ),
            t(b("attn_v"), l("self_attn.v_proj"), vec![kv_rows, h], None),
            t(
                b("attn_output"),
                l("self_attn.o_proj"),
                vec![h, q_rows],
                None,
            ),
            t(b("ffn_norm"), l("post_attention_layernorm"), vec![h], None),
            t(b("ffn_gate"), l("mlp.gate_proj"), vec![f, h], None),
            t(b("ffn_up"), l("mlp.up_proj"), vec![f, h], None),
            t(b("ffn_down"), l("mlp.down_proj"), vec![h, f], None),
        ]);
    }
    out.push(t(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![h],
        None,
    ));
    if !tied {
        out.push(t(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![vocab, h],
            None,
        ));
    }
    out
}

/// The tensors of the llama GGUF `g`, checked: every tensor of `g` is one
/// of them (a tensor we would drop — rope_freqs, biases, … — means a model
/// we would get wrong) and each has the shape the metadata implies.
pub fn gguf_tensor_names(g: &Gguf, hp: &Hparams) -> Result<Vec<TensorName>> {
    let embd = g
        .tensor_info("token_embd.weight")
        .ok_or_else(|| Error::format(g.path(), "missing tensor 'token_embd.weight'"))?;
    let vocab = embd.shape()[0];
    let tied = g.tensor_info("output.weight").is_none();
    let names = tensor_names(hp, vocab, tied);
    for t in g.tensors() {
        if !names.iter().any(|n| n.gguf == t.name) {
            return Err(Error::Unsupported(format!(
                "{}: tensor '{}' has no counterpart in an HF Llama model",
                g.path().display(),
                t.name
            )));
        }
    }
    for n in &names {
        let t = g
            .tensor_info(&n.gguf)
            .ok_or_else(|| Error::format(g.path(), format!("missing tensor '{}'", n.gguf)))?;
        if t.shape() != n.shape {
            return Err(Error::format(
                g.path(),
                format!(
                    "tensor '{}' has shape {:?}, expected {:?} from the metadata",
                    n.gguf,
                    t.shape(),
                    n.shape
                ),
            ));
        }
    }
    Ok(names)
}

/// The stored row of each original row of a `[rows, cols]` q or k weight in
/// llama.cpp's RoPE order.
///
/// llama.cpp's converter stores `w.reshape(n_head, 2, rows/n_head/2, cols)
/// .swapaxes(1, 2)`: within each head, stored row `2i + j` is original row
/// `j * half + i` (half = head_dim / 2).
///
/// Panics unless `rows` splits into `n_head` heads of even size (callers
/// check shapes first).
fn rope_order(rows: usize, n_head: usize) -> impl Iterator<Item = (usize, usize)> {
    assert!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "rope row order: {rows} rows do not split into {n_head} heads of pairs"
    );
    let hd = rows / n_head;
    let half = hd / 2;
    (0..n_head).flat_map(move |h| {
        (0..2)
            .flat_map(move |j| (0..half).map(move |i| (h * hd + j * half + i, h * hd + 2 * i + j)))
    })
}

/// Undoes llama.cpp's RoPE permutation of a `[rows, cols]` q or k weight
/// (see [`permute_rows`]). Panics unless `w` is `rows * cols` long and
/// `rows` splits into `n_head` heads of even size.
/// A row is `cols` elements of `T`: f32 values, or the bytes of a row of
/// quantized blocks (a row's blocks move together).
pub fn unpermute_rows<T: Copy + Default>(
    w: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Vec<T> {
    assert_eq!(w.len(), rows * cols, "unpermute_rows: size");
    let mut out = vec![T::default(); w.len()];
    for (orig, stored) in rope_order(rows, n_head) {
        out[orig * cols..(orig + 1) * cols].copy_from_slice(&w[stored * cols..(stored + 1) * cols]);
    }
    out
}

/// Stores a `[rows, cols]` q or k weight in llama.cpp's RoPE order, as its
/// convert_hf_to_gguf.py does (the inverse of [`unpermute_rows`]). Panics
/// under the same conditions.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols, "permute_rows: size");
    let mut out = vec![0f32; w.len()];
    for (orig, stored) in rope_order(rows, n_head) {
        out[stored * cols..(stored + 1) * cols].copy_from_slice(&w[orig * cols..(orig + 1) * cols]);
    }
    out
}
