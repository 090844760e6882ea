//! A llama-architecture GGUF file read in Hugging Face's terms: its
//! hyperparameters as config.json, its vocabulary as tokenizer.json, and its
//! tensors under HF names. `engine convert` writes these out as a model
//! folder; `Llama::load` and `Tokenizer::load` read a GGUF through them
//! directly, its tensors staying in their own formats.
//!
//! llama.cpp's converter permutes the rows of `attn_q` / `attn_k` for its
//! RoPE layout; [`unpermute_rows`] undoes that.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::folder::short_f64;
use crate::model::gguf::Gguf;
use crate::model::llama::{LayerWeights, LlamaWeights};
use crate::model::weight::Weight;
use crate::quant::{GgmlType, QBytes};
use crate::tensor::Tensor;
use serde_json::{json, Map, Value as Json};

/// The hyperparameters of a llama GGUF.
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

impl Hparams {
    pub fn read(g: &Gguf) -> Result<Self> {
        let a = "llama";
        let n_head = g.get_usize(&format!("{a}.attention.head_count"))?;
        let hidden = g.get_usize(&format!("{a}.embedding_length"))?;
        let opt_usize = |key: &str| g.get(key).map(|_| g.get_usize(key)).transpose();
        let n_kv_head = opt_usize(&format!("{a}.attention.head_count_kv"))?.unwrap_or(n_head);
        let bad = |msg: String| Error::format(g.path(), msg);
        if n_head == 0 || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            return Err(bad(format!(
                "head counts {n_head} (query) / {n_kv_head} (key-value) are not valid"
            )));
        }
        let head_dim = match opt_usize(&format!("{a}.attention.key_length"))? {
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
        if let Some(v) = g.get(&format!("{a}.rope.scaling.type")) {
            if v.as_str() != Some("none") {
                return Err(Error::Unsupported(format!(
                    "{}: RoPE scaling ({a}.rope.scaling.type = {v:?}) is not supported",
                    g.path().display()
                )));
            }
        }
        let opt_f32 = |key: &str| g.get(key).map(|_| g.get_f32(key)).transpose();
        Ok(Hparams {
            n_layers: g.get_usize(&format!("{a}.block_count"))?,
            hidden,
            ffn: g.get_usize(&format!("{a}.feed_forward_length"))?,
            n_head,
            n_kv_head,
            head_dim,
            rms_norm_eps: g.get_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
            rope_theta: opt_f32(&format!("{a}.rope.freq_base"))?.unwrap_or(10000.0),
            context_length: g.get_usize(&format!("{a}.context_length"))?,
        })
    }
}

/// One tensor to write: where it comes from and how.
pub struct Plan {
    pub gguf: String,
    pub hf: String,
    /// Row-major shape it must have.
    pub shape: Vec<usize>,
    /// Undo llama.cpp's RoPE row permutation with this many heads.
    pub unpermute_heads: Option<usize>,
}

/// The GGUF → HF name map of a llama model, in the order tensors are written.
pub fn plan(g: &Gguf, hp: &Hparams, vocab: usize) -> Result<Vec<Plan>> {
    let (h, f) = (hp.hidden, hp.ffn);
    let (q_rows, kv_rows) = (hp.n_head * hp.head_dim, hp.n_kv_head * hp.head_dim);
    let p = |gguf: String, hf: String, shape: Vec<usize>, heads: Option<usize>| Plan {
        gguf,
        hf,
        shape,
        unpermute_heads: heads,
    };
    let mut out = vec![p(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        None,
    )];
    for i in 0..hp.n_layers {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        let l = |s: &str| format!("model.layers.{i}.{s}.weight");
        out.extend([
            p(b("attn_norm"), l("input_layernorm"), vec![h], None),
            p(
                b("attn_q"),
                l("self_attn.q_proj"),
                vec![q_rows, h],
                Some(hp.n_head),
            ),
            p(
                b("attn_k"),
                l("self_attn.k_proj"),
                vec![kv_rows, h],
                Some(hp.n_kv_head),
            ),
            p(b("attn_v"), l("self_attn.v_proj"), vec![kv_rows, h], None),
            p(
                b("attn_output"),
                l("self_attn.o_proj"),
                vec![h, q_rows],
                None,
            ),
            p(b("ffn_norm"), l("post_attention_layernorm"), vec![h], None),
            p(b("ffn_gate"), l("mlp.gate_proj"), vec![f, h], None),
            p(b("ffn_up"), l("mlp.up_proj"), vec![f, h], None),
            p(b("ffn_down"), l("mlp.down_proj"), vec![h, f], None),
        ]);
    }
    out.push(p(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![h],
        None,
    ));
    if g.tensor_info("output.weight").is_some() {
        out.push(p(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![vocab, h],
            None,
        ));
    }
    // Every tensor must be accounted for, with the shape the config implies:
    // a tensor we would drop (rope_freqs, biases, …) means a model we would
    // get wrong.
    for t in g.tensors() {
        if !out.iter().any(|p| p.gguf == t.name) {
            return Err(Error::Unsupported(format!(
                "{}: tensor '{}' has no counterpart in an HF Llama model",
                g.path().display(),
                t.name
            )));
        }
    }
    for p in &out {
        let t = g
            .tensor_info(&p.gguf)
            .ok_or_else(|| Error::format(g.path(), format!("missing tensor '{}'", p.gguf)))?;
        if t.shape() != p.shape {
            return Err(Error::format(
                g.path(),
                format!(
                    "tensor '{}' has shape {:?}, expected {:?} from the metadata",
                    p.gguf,
                    t.shape(),
                    p.shape
                ),
            ));
        }
    }
    Ok(out)
}

/// Undoes llama.cpp's RoPE permutation of a `[rows, cols]` q or k weight.
///
/// llama.cpp's converter stores `w.reshape(n_head, 2, rows/n_head/2, cols)
/// .swapaxes(1, 2)`: within each head, stored row `2i + j` is original row
/// `j * half + i` (half = head_dim / 2). So original row `h*hd + j*half + i`
/// is stored row `h*hd + 2i + j`.
///
/// A row is `cols` elements of `T`: f32 values, or the bytes of a row of
/// quantized blocks (a row's blocks move together).
///
/// Panics unless `w` is `rows * cols` long and `rows` splits into `n_head`
/// heads of even size ([`plan`] checks the shapes).
pub fn unpermute_rows<T: Copy + Default>(
    w: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Vec<T> {
    assert_eq!(w.len(), rows * cols, "unpermute_rows: size");
    assert!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "unpermute_rows: {rows} rows do not split into {n_head} heads of pairs"
    );
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let orig = h * hd + j * half + i;
                let stored = h * hd + 2 * i + j;
                out[orig * cols..(orig + 1) * cols]
                    .copy_from_slice(&w[stored * cols..(stored + 1) * cols]);
            }
        }
    }
    out
}

/// A llama GGUF file in HF's terms: what `engine convert` writes as a model
/// folder, and what loading the file as a model reads in its place.
pub struct HfView {
    /// `general.architecture`.
    pub arch: String,
    pub hparams: Hparams,
    /// config.json, without `torch_dtype` (the caller's choice).
    pub config: Json,
    pub generation_config: Json,
    pub tokenizer: TokenizerFiles,
    /// Every tensor, GGUF name → HF name.
    pub plan: Vec<Plan>,
    pub vocab: usize,
    pub tied: bool,
}

impl HfView {
    /// Reads the hyperparameters, tokenizer and tensor names of `g`.
    ///
    /// Refused: architectures other than `llama`, tokenizers other than
    /// byte-level BPE (`tokenizer.ggml.model == "gpt2"`), RoPE scaling, and
    /// any tensor without an HF Llama counterpart (e.g. Llama 3.1's
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
        let embd = g
            .tensor_info("token_embd.weight")
            .ok_or_else(|| Error::format(g.path(), "missing tensor 'token_embd.weight'"))?;
        let vocab = embd.shape()[0];
        let plan = plan(g, &hp, vocab)?;
        let tied = g.tensor_info("output.weight").is_none();
        let tok = TokenizerFiles::build(g, hp.context_length)?;

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
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
        });
        let generation_config = json!({
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id,
        });
        Ok(HfView {
            arch,
            hparams: hp,
            config,
            generation_config,
            tokenizer: tok,
            plan,
            vocab,
            tied,
        })
    }
}

/// tokenizer.json and tokenizer_config.json built from the GGUF vocabulary.
pub struct TokenizerFiles {
    pub tokenizer: Json,
    pub config: Json,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

/// The Llama-3 ("llama-bpe") pre-tokenizer split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl TokenizerFiles {
    /// Builds the files for a `tokenizer.ggml.model == "gpt2"` (byte-level
    /// BPE) vocabulary; SentencePiece ("llama") vocabularies are not
    /// supported yet.
    pub fn build(g: &Gguf, context_length: usize) -> Result<Self> {
        let path = g.path();
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Unsupported(format!(
                "{}: tokenizer model '{model}' is not supported (engine converts byte-level BPE, 'gpt2', vocabularies)",
                path.display()
            )));
        }
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let merges = g.get_str_array("tokenizer.ggml.merges")?;
        let types = match g.get("tokenizer.ggml.token_type") {
            Some(_) => g.get_int_array("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(Error::format(
                path,
                format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                ),
            ));
        }
        let token_id = |key: &str| -> Result<Option<u32>> {
            if g.get(key).is_none() {
                return Ok(None);
            }
            let id = g.get_u32(key)?;
            if id as usize >= tokens.len() {
                return Err(Error::format(
                    path,
                    format!(
                        "{key} is {id}, past the vocabulary of {} tokens",
                        tokens.len()
                    ),
                ));
            }
            Ok(Some(id))
        };
        let bos_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = token_id("tokenizer.ggml.eos_token_id")?;
        let pad_id = token_id("tokenizer.ggml.padding_token_id")?;
        let unk_id = token_id("tokenizer.ggml.unknown_token_id")?;
        let flag = |key: &str, default: bool| -> Result<bool> {
            g.get(key).map_or(Ok(default), |_| g.get_bool(key))
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token", false)?;
        let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;

        // Pre-tokenizer of the model family's own HF tokenizer.json.
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let (pre_tokenizer, ignore_merges) = match pre {
            "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
            "smollm" | "starcoder" | "refact" | "codeshell" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(true),
                ]}),
                false,
            ),
            "llama-bpe" | "llama3" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN},
                     "behavior": "Isolated", "invert": false},
                    byte_level(false),
                ]}),
                true,
            ),
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: tokenizer pre-tokenizer '{other}' is not supported (known: default, gpt2, smollm, starcoder, refact, codeshell, llama-bpe)",
                    path.display()
                )))
            }
        };

        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
            if vocab.contains_key(tok) {
                return Err(Error::format(
                    path,
                    format!("token {tok:?} appears twice in tokenizer.ggml.tokens"),
                ));
            }
            vocab.insert(tok.to_string(), json!(id));
            // 3: control, 4: user-defined.
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3,
                }));
            }
        }
        let merges: Vec<Json> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| {
                        Error::format(path, format!("merge {i} ({m:?}) is not two tokens"))
                    })
            })
            .collect::<Result<_>>()?;

        let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
        let post_processor = if add_bos || add_eos {
            let tok_of = |id: Option<u32>, what: &str| {
                id.map(|id| tokens[id as usize].to_string()).ok_or_else(|| {
                    Error::format(path, format!("tokenizer.ggml.add_{what}_token is set but there is no {what} token id"))
                })
            };
            let mut specials = Map::new();
            let (mut single, mut pair) = (Vec::new(), Vec::new());
            let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
            if add_bos {
                let t = tok_of(bos_id, "bos")?;
                specials.insert(t.clone(), json!({"id": t, "ids": [bos_id], "tokens": [t]}));
                single.push(special(&t));
                pair.push(special(&t));
            }
            single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
            pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
            let eos = if add_eos {
                Some(tok_of(eos_id, "eos")?)
            } else {
                None
            };
            if let Some(t) = &eos {
                specials.insert(t.clone(), json!({"id": t, "ids": [eos_id], "tokens": [t]}));
                single.push(special(t));
                pair.push(special(t));
            }
            if add_bos {
                pair.push(json!({"SpecialToken": {"id": tok_of(bos_id, "bos")?, "type_id": 1}}));
            }
            pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
            if let Some(t) = &eos {
                pair.push(json!({"SpecialToken": {"id": t, "type_id": 1}}));
            }
            json!({"type": "Sequence", "processors": [
                byte_level_post,
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
            ]})
        } else {
            byte_level_post
        };

        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": ignore_merges,
                "vocab": vocab,
                "merges": merges,
            },
        });

        let mut config = Map::new();
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        config.insert("add_bos_token".into(), json!(add_bos));
        config.insert("add_eos_token".into(), json!(add_eos));
        for (key, id) in [
            ("bos_token", bos_id),
            ("eos_token", eos_id),
            ("unk_token", unk_id),
            ("pad_token", pad_id),
        ] {
            if let Some(id) = id {
                config.insert(key.into(), json!(tokens[id as usize]));
            }
        }
        if g.get("tokenizer.chat_template").is_some() {
            let template = g.get_str("tokenizer.chat_template")?;
            config.insert("chat_template".into(), json!(template));
        }
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        config.insert("model_max_length".into(), json!(context_length));
        Ok(TokenizerFiles {
            tokenizer,
            config: Json::Object(config),
            bos_id,
            eos_id,
            pad_id,
        })
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
    let dense = |p: &Plan| -> Result<Tensor<B>> {
        let (shape, mut values) = g.tensor_f32(&p.gguf)?;
        if let Some(heads) = p.unpermute_heads {
            values = unpermute_rows(&values, shape[0], shape[1], heads);
        }
        be.upload(values, &p.shape, be.dtype())
    };
    let take = |name: &str| -> Result<&Plan> {
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
        let bytes = match p.unpermute_heads {
            None => g.tensor_qbytes(&p.gguf)?,
            Some(heads) => {
                let raw = g.tensor_bytes(&p.gguf)?;
                QBytes::Owned(unpermute_rows(raw, rows, raw.len() / rows, heads))
            }
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
