//! `config.json` of a Llama-family decoder, as HF transformers writes it.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// What the weights are stored as (`torch_dtype`), for `engine info`.
    pub torch_dtype: Option<String>,
}

/// The fields as they appear in the file; optional ones get HF's defaults.
#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes {"rope_theta", "rope_type"} here instead.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// Token ids may be a number, a list of numbers or null.
fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not a valid config.json: {e}")))?;
        let model_type = raw.model_type.as_deref().unwrap_or("");
        let arch = raw.architectures.as_ref().and_then(|a| a.first()).cloned();
        if model_type != "llama" && arch.as_deref() != Some("LlamaForCausalLM") {
            let what = arch.unwrap_or_else(|| format!("model_type '{model_type}'"));
            return Err(Error::format(
                path,
                format!("unsupported architecture {what} (engine runs Llama-family decoders: model_type \"llama\")"),
            ));
        }
        let need = |v: Option<usize>, key: &str| {
            v.filter(|&v| v > 0)
                .ok_or_else(|| Error::format(path, format!("missing or zero field \"{key}\"")))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_heads);
        let cfg = LlamaConfig {
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw
                .rope_parameters
                .as_ref()
                .and_then(|p| p.get("rope_theta")?.as_f64())
                .map(|t| t as f32)
                .or(raw.rope_theta)
                .unwrap_or(10000.0),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::format(
                path,
                format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"),
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(Error::format(
                path,
                format!("head_dim {head_dim} is odd; RoPE needs pairs"),
            ));
        }
        let unsupported = |what: String| Err(Error::format(path, format!("unsupported: {what}")));
        for scaling in [&raw.rope_scaling, &raw.rope_parameters]
            .into_iter()
            .flatten()
        {
            let kind = scaling.get("rope_type").or(scaling.get("type"));
            let default = kind.is_none_or(|k| k == "default");
            if !scaling.is_null() && !default {
                return unsupported(format!("RoPE scaling {scaling}"));
            }
        }
        if raw.attention_bias == Some(true) || raw.mlp_bias == Some(true) {
            return unsupported("attention_bias / mlp_bias".into());
        }
        if let Some(act) = raw.hidden_act.filter(|a| a != "silu") {
            return unsupported(format!("hidden_act \"{act}\" (only silu)"));
        }
        Ok(cfg)
    }

    /// Number of parameters, counting a tied embedding once.
    pub fn num_parameters(&self) -> usize {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2;
        let layer = attn + 3 * d * f + 2 * d;
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_layers * layer + d
    }
}
