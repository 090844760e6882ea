//! `engine convert`: a llama-architecture GGUF file → an HF-style model folder
//! (`model.safetensors`, `config.json`, `generation_config.json`,
//! `tokenizer.json`, `tokenizer_config.json`) that both engine and HF
//! transformers load.
//!
//! Every tensor is dequantized to f32 (see [`crate::quant::dequant`]) and
//! written in the requested dtype. llama.cpp's converter permutes the rows of
//! `attn_q` / `attn_k` for its RoPE layout; [`unpermute_rows`] undoes that.

use crate::error::{Error, Result};
use crate::model::folder::{short_f64, write_dir_atomically, write_json};
use crate::model::gguf::Gguf;
use crate::tensor::DType;
use serde_json::{json, Map, Value as Json};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The file a folder written by [`convert`] carries, so a later convert may
/// replace it.
pub const MARKER: &str = ".engine-convert";

/// What [`convert`] did, for printing.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub input: PathBuf,
    pub out_dir: PathBuf,
    /// `general.architecture`.
    pub arch: String,
    /// `general.name`, if the file has one.
    pub name: Option<String>,
    pub dtype: DType,
    /// Tensors written to model.safetensors.
    pub n_tensors: usize,
    /// Values in those tensors.
    pub n_params: usize,
    pub n_layers: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    /// How many GGUF tensors were stored in each ggml type, e.g. {"Q4_1": 210}.
    pub source_types: BTreeMap<String, usize>,
}

impl fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let types: Vec<String> = self
            .source_types
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        write!(
            f,
            "{} ({}): {} layers, vocab {}, {} tensors, {} parameters ({} in the GGUF), {} embeddings, written as {} to {}",
            self.name.as_deref().unwrap_or("model"),
            self.arch,
            self.n_layers,
            self.vocab_size,
            self.n_tensors,
            self.n_params,
            types.join(", "),
            if self.tied_embeddings { "tied" } else { "untied" },
            self.dtype,
            self.out_dir.display()
        )
    }
}

/// The hyperparameters of a llama GGUF.
struct Hparams {
    n_layers: usize,
    hidden: usize,
    ffn: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    rms_norm_eps: f32,
    rope_theta: f32,
    context_length: usize,
}

impl Hparams {
    fn read(g: &Gguf) -> Result<Self> {
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
struct Plan {
    gguf: String,
    hf: String,
    /// Row-major shape it must have.
    shape: Vec<usize>,
    /// Undo llama.cpp's RoPE row permutation with this many heads.
    unpermute_heads: Option<usize>,
}

/// The GGUF → HF name map of a llama model, in the order tensors are written.
fn plan(g: &Gguf, hp: &Hparams, vocab: usize) -> Result<Vec<Plan>> {
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
/// Panics unless `w` is `rows * cols` long and `rows` splits into `n_head`
/// heads of even size ([`convert`] checks the shapes before calling it).
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols, "unpermute_rows: size");
    assert!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "unpermute_rows: {rows} rows do not split into {n_head} heads of pairs"
    );
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
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

/// Converts the llama GGUF `input` into an HF-style folder `out_dir`, with
/// weights stored as `dtype`.
///
/// Crash safety: everything is written into a temporary sibling folder
/// (`.NAME.convert-tmp-PID`), which is renamed to `out_dir` only when
/// complete; on error it is removed. A crash can leave that temporary folder
/// behind, never a half-written `out_dir`.
///
/// Overwriting: an existing `out_dir` is replaced only if it is empty or was
/// written by a previous convert (it holds the [`MARKER`] file); any other
/// non-empty folder is refused with [`Error::Invalid`], so a convert never
/// deletes files it did not make.
///
/// Refused inputs: architectures other than `llama`, tokenizers other than
/// byte-level BPE (`tokenizer.ggml.model == "gpt2"`), RoPE scaling, and any
/// tensor without an HF Llama counterpart (e.g. Llama 3.1's `rope_freqs`),
/// each as [`Error::Unsupported`] naming it.
pub fn convert(input: &Path, out_dir: &Path, dtype: DType) -> Result<ConvertSummary> {
    let g = Gguf::open(input)?;
    let arch = g.get_str("general.architecture")?.to_string();
    if arch != "llama" {
        return Err(Error::Unsupported(format!(
            "{}: architecture '{arch}' is not supported (engine converts llama GGUF files)",
            input.display()
        )));
    }
    let hp = Hparams::read(&g)?;
    let embd = g
        .tensor_info("token_embd.weight")
        .ok_or_else(|| Error::format(input, "missing tensor 'token_embd.weight'"))?;
    let vocab = embd.shape()[0];
    let plan = plan(&g, &hp, vocab)?;
    let tied = g.tensor_info("output.weight").is_none();
    let tok = TokenizerFiles::build(&g, hp.context_length)?;

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
        "torch_dtype": dtype.hf_name(),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
    });
    let generation_config = json!({
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
    });

    let mut n_params = 0;
    let is_convert_output = |d: &Path| d.join(MARKER).exists();
    write_dir_atomically(out_dir, "convert", is_convert_output, |tmp| {
        n_params = write_safetensors(&g, &plan, dtype, &tmp.join("model.safetensors"))?;
        write_json(&tmp.join("config.json"), &config)?;
        write_json(&tmp.join("generation_config.json"), &generation_config)?;
        write_json(&tmp.join("tokenizer.json"), &tok.tokenizer)?;
        write_json(&tmp.join("tokenizer_config.json"), &tok.config)?;
        let marker = tmp.join(MARKER);
        fs::write(&marker, format!("converted from {}\n", input.display()))
            .map_err(|e| Error::io(&marker, e))
    })?;

    let mut source_types = BTreeMap::new();
    for t in g.tensors() {
        *source_types
            .entry(t.ggml_type.name().to_string())
            .or_insert(0) += 1;
    }
    Ok(ConvertSummary {
        input: input.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        arch,
        name: g
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(String::from),
        dtype,
        n_tensors: plan.len(),
        n_params,
        n_layers: hp.n_layers,
        vocab_size: vocab,
        tied_embeddings: tied,
        source_types,
    })
}

/// Writes the planned tensors to a safetensors file, one tensor at a time
/// (so memory holds one dequantized tensor, not the model). Returns the
/// number of values written.
fn write_safetensors(g: &Gguf, plan: &[Plan], dtype: DType, path: &Path) -> Result<usize> {
    let st_dtype = match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
    };
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut n_params = 0usize;
    for p in plan {
        let n: usize = p.shape.iter().product();
        let end = offset + n * dtype.size();
        header.insert(
            p.hf.clone(),
            json!({"dtype": st_dtype, "shape": p.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
        n_params += n;
    }
    let mut header = serde_json::to_string(&header).expect("JSON values serialize");
    // The data that follows starts 8-byte aligned, as safetensors writes it.
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut bytes = Vec::new();
    for p in plan {
        let (shape, mut values) = g.tensor_f32(&p.gguf)?;
        if let Some(n_head) = p.unpermute_heads {
            values = unpermute_rows(&values, shape[0], shape[1], n_head);
        }
        bytes.clear();
        dtype.encode_into(&values, &mut bytes);
        w.write_all(&bytes).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(n_params)
}

/// tokenizer.json and tokenizer_config.json built from the GGUF vocabulary.
struct TokenizerFiles {
    tokenizer: Json,
    config: Json,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
}

/// The Llama-3 ("llama-bpe") pre-tokenizer split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl TokenizerFiles {
    /// Builds the files for a `tokenizer.ggml.model == "gpt2"` (byte-level
    /// BPE) vocabulary; SentencePiece ("llama") vocabularies are not
    /// supported yet.
    fn build(g: &Gguf, context_length: usize) -> Result<Self> {
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
