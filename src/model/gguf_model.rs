//! A llama GGUF file as the model (`--model FILE.gguf`): [`HfView`] reads it
//! in Hugging Face's terms (config.json, tokenizer files, tensor names; what
//! `engine convert` writes out as a folder), and [`load_weights`] puts its
//! tensors on a device in their own formats.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::folder::short_f64;
use crate::model::gguf::Gguf;
use crate::model::gguf_tokenizer::{SpecialIds, TokenizerFiles};
use crate::model::llama::{LayerWeights, LlamaWeights};
use crate::model::llama_gguf::{gguf_tensor_names, unpermute_rows, Hparams, TensorName};
use crate::model::weight::Weight;
use crate::quant::{GgmlType, QBytes};
use crate::tensor::Tensor;
use serde_json::{json, Value as Json};

/// A llama GGUF file in HF's terms: what `engine convert` writes as a model
/// folder, and what loading the file as a model reads in its place.
pub struct HfView {
    /// `general.architecture`.
    pub arch: String,
    pub hparams: Hparams,
    /// config.json, without `torch_dtype` (the caller's choice).
    pub config: Json,
    pub generation_config: Json,
    /// Every tensor, GGUF name → HF name.
    pub plan: Vec<TensorName>,
    pub vocab: usize,
    pub tied: bool,
}

impl HfView {
    /// Reads the hyperparameters, special token ids and tensor names of `g`;
    /// the tokenizer, the costly part, only when asked ([`HfView::tokenizer`]):
    /// loading the weights needs just the config.
    ///
    /// Refused: architectures other than `llama`, RoPE scaling, and any
    /// tensor without an HF Llama counterpart (e.g. Llama 3.1's
    /// `rope_freqs`), each as [`Error::Unsupported`] naming it.
    pub fn read(g: &Gguf) -> Result<Self> {
        let arch = g.get_str("general.architecture")?.to_string();
        if arch != "llama" {
            return Err(Error::Unsupported(format!(
                "{}: architecture '{arch}' is not supported (engine reads llama GGUF files)",
                g.path().display()
            )));
        }
        let hp = Hparams::read(g)?;
        let plan = gguf_tensor_names(g, &hp)?;
        let vocab = plan[0].shape[0];
        let tied = g.tensor_info("output.weight").is_none();
        let ids = SpecialIds::read(g)?;

        let config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hp.hidden,
            "intermediate_size": hp.ffn,
            "num_hidden_layers": hp.n_layers,
            "num_attention_heads": hp.n_head,
            "num_key_value_heads": hp.n_kv_head,
            "head_dim": hp.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": short_f64(hp.rms_norm_eps),
            "rope_theta": short_f64(hp.rope_theta),
            "rope_scaling": null,
            "attention_bias": false,
            "mlp_bias": false,
            "vocab_size": vocab,
            "max_position_embeddings": hp.context_length,
            "tie_word_embeddings": tied,
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos,
            "pad_token_id": ids.pad,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
        });
        let generation_config = json!({
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos,
            "pad_token_id": ids.pad,
        });
        Ok(HfView {
            arch,
            hparams: hp,
            config,
            generation_config,
            plan,
            vocab,
            tied,
        })
    }

    /// tokenizer.json and tokenizer_config.json of `g` (the file this view
    /// was read from). Refused: tokenizers other than byte-level BPE
    /// (`tokenizer.ggml.model == "gpt2"`), as [`Error::Unsupported`].
    pub fn tokenizer(&self, g: &Gguf) -> Result<TokenizerFiles> {
        TokenizerFiles::build(g, self.hparams.context_length)
    }
}

/// The weights of the GGUF `g` (read as `hf`) on `be`: matrices in the
/// file's own format where the device computes on it (`Backend::upload_quant`;
/// on the CPU straight from the memory map), else widened to the device's
/// element type; f32 matrices and the norms dense.
pub fn load_weights<B: Backend>(be: &B, g: &Gguf, hf: &HfView) -> Result<LlamaWeights<B>> {
    let mut tensors = std::collections::HashMap::new();
    for p in &hf.plan {
        tensors.insert(p.hf.as_str(), p);
    }
    let dense = |p: &TensorName| -> Result<Tensor<B>> {
        let (shape, mut values) = g.tensor_f32(&p.gguf)?;
        if let Some(heads) = p.rope_heads {
            values = unpermute_rows(&values, shape[0], shape[1], heads);
        }
        be.upload(values, &p.shape, be.dtype())
    };
    let take = |name: &str| -> Result<&TensorName> {
        tensors
            .get(name)
            .copied()
            .ok_or_else(|| Error::format(g.path(), format!("no tensor for {name}")))
    };
    let norm = |name: &str| take(name).and_then(dense);
    let matrix = |name: &str| -> Result<Weight<B>> {
        let p = take(name)?;
        let info = g
            .tensor_info(&p.gguf)
            .expect("planned from the file's tensors");
        let (rows, cols) = (p.shape[0], p.shape[1]);
        if info.ggml_type == GgmlType::F32 {
            return dense(p).map(Weight::Dense);
        }
        let bytes = match p.rope_heads {
            None => g.tensor_qbytes(&p.gguf)?,
            Some(heads) => QBytes::Owned(g.tensor_copy(&p.gguf, |raw| {
                unpermute_rows(raw, rows, raw.len() / rows, heads)
            })?),
        };
        match be.upload_quant(bytes, info.ggml_type, rows, cols) {
            Ok(q) => Ok(Weight::Quant(q)),
            // A format this device has no kernel for: widened.
            Err(Error::Unsupported(_)) => dense(p).map(Weight::Dense),
            Err(e) => Err(Error::format(g.path(), format!("tensor '{}': {e}", p.gguf))),
        }
    };
    let mut layers = Vec::with_capacity(hf.hparams.n_layers);
    for i in 0..hf.hparams.n_layers {
        let p = format!("model.layers.{i}");
        layers.push(LayerWeights {
            attn_norm: norm(&format!("{p}.input_layernorm.weight"))?,
            wq: matrix(&format!("{p}.self_attn.q_proj.weight"))?,
            wk: matrix(&format!("{p}.self_attn.k_proj.weight"))?,
            wv: matrix(&format!("{p}.self_attn.v_proj.weight"))?,
            wo: matrix(&format!("{p}.self_attn.o_proj.weight"))?,
            ffn_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
            w_gate: matrix(&format!("{p}.mlp.gate_proj.weight"))?,
            w_up: matrix(&format!("{p}.mlp.up_proj.weight"))?,
            w_down: matrix(&format!("{p}.mlp.down_proj.weight"))?,
        });
    }
    Ok(LlamaWeights {
        embed: matrix("model.embed_tokens.weight")?,
        layers,
        norm: norm("model.norm.weight")?,
        lm_head: if hf.tied {
            None
        } else {
            Some(matrix("lm_head.weight")?)
        },
    })
}
