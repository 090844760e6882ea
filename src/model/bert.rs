//! BERT-family sentence embedders (all-MiniLM-L6-v2 and its kin), loaded from
//! a sentence-transformers folder and written once against `Backend`.
//!
//! A batch of texts is tokenized ([CLS] … [SEP], truncated to the folder's
//! max_seq_length) and padded to its longest, seq rows per text. With x the
//! hidden states [batch·seq, d] and lens the real tokens of each text:
//!   x = LayerNorm(word[ids] + position[i] + token_type[t])
//! then per layer (post-LayerNorm, as BERT):
//!   q, k, v = x·Wqᵀ + bq, x·Wkᵀ + bk, x·Wvᵀ + bv
//!   x = LayerNorm(x + attention_bidirectional(q, k, v; lens)·Woᵀ + bo)
//!   x = LayerNorm(x + gelu(x·Wiᵀ + bi)·Wdᵀ + bd)
//! and each text's embedding is the mean of x over its real tokens,
//! divided by its L2 norm when the folder's modules.json has a Normalize
//! module (sentence-transformers' Pooling and Normalize).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::weights::SafetensorsFiles;
use crate::tensor::Tensor;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `config.json` of a BERT encoder, as HF transformers writes it.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
}

#[derive(Deserialize)]
struct RawBertConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f32>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: RawBertConfig = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not a valid config.json: {e}")))?;
        let model_type = raw.model_type.as_deref().unwrap_or("");
        if model_type != "bert" {
            let arch = raw.architectures.as_ref().and_then(|a| a.first());
            let what = match arch {
                Some(a) => format!("model_type \"{model_type}\" ({a})"),
                None => format!("model_type \"{model_type}\""),
            };
            return Err(Error::format(
                path,
                format!("{what} is not a BERT encoder (engine embeds with model_type \"bert\", e.g. all-MiniLM-L6-v2)"),
            ));
        }
        let need = |v: Option<usize>, key: &str| {
            v.filter(|&v| v > 0)
                .ok_or_else(|| Error::format(path, format!("missing or zero field \"{key}\"")))
        };
        let cfg = BertConfig {
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size: need(raw.hidden_size, "hidden_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads: need(raw.num_attention_heads, "num_attention_heads")?,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            max_position_embeddings: need(raw.max_position_embeddings, "max_position_embeddings")?,
            type_vocab_size: raw.type_vocab_size.unwrap_or(2).max(1),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
        };
        let unsupported = |what: String| Err(Error::format(path, format!("unsupported: {what}")));
        if !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            return unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_heads
            ));
        }
        if let Some(act) = raw.hidden_act.filter(|a| a != "gelu") {
            return unsupported(format!("hidden_act \"{act}\" (only gelu, the erf form)"));
        }
        if let Some(p) = raw.position_embedding_type.filter(|p| p != "absolute") {
            return unsupported(format!("position_embedding_type \"{p}\" (only absolute)"));
        }
        Ok(cfg)
    }
}

/// What the sentence-transformers files around the encoder say: how long a
/// text may be, how tokens are pooled and whether the result is normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct SentenceConfig {
    /// Tokens per text, [CLS] and [SEP] included; longer texts are truncated
    /// (`max_seq_length` of sentence_bert_config.json).
    pub max_seq_length: usize,
    /// Lowercase texts before tokenizing (sentence_bert_config.json).
    pub do_lower_case: bool,
    /// L2-normalise each embedding (a Normalize module in modules.json).
    pub normalize: bool,
    /// The folder of the encoder (the Transformer module's path).
    pub transformer_dir: PathBuf,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

impl SentenceConfig {
    /// Reads modules.json, the Pooling module's config.json and
    /// sentence_bert_config.json of a sentence-transformers folder. Only
    /// Transformer → Pooling (mean over tokens) → Normalize (optional) is
    /// supported; anything else is refused with the file that asks for it.
    pub fn load(dir: &Path, config: &BertConfig) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Err(Error::format(
                dir,
                "no modules.json: not a sentence-transformers folder (engine embeds with the pooling its modules.json and 1_Pooling/config.json describe)",
            ));
        }
        let modules: Vec<Module> = serde_json::from_value(read_json(&modules_path)?)
            .map_err(|e| Error::format(&modules_path, format!("not a list of modules: {e}")))?;
        let (mut transformer, mut pooling, mut normalize) = (None, None, false);
        for m in &modules {
            let kind = m.kind.rsplit('.').next().unwrap_or("");
            match kind {
                "Transformer" if transformer.is_none() => transformer = Some(dir.join(&m.path)),
                "Pooling" if pooling.is_none() => pooling = Some(dir.join(&m.path)),
                "Normalize" => normalize = true,
                _ => {
                    return Err(Error::format(
                        &modules_path,
                        format!(
                            "unsupported module {} (engine runs Transformer → Pooling → Normalize)",
                            m.kind
                        ),
                    ))
                }
            }
        }
        let transformer_dir = transformer.ok_or_else(|| {
            Error::format(
                &modules_path,
                "no sentence_transformers.models.Transformer module",
            )
        })?;
        let pooling = pooling.ok_or_else(|| {
            Error::format(
                &modules_path,
                "no sentence_transformers.models.Pooling module",
            )
        })?;
        check_pooling(&pooling.join("config.json"), config)?;

        let st_path = transformer_dir.join("sentence_bert_config.json");
        let (mut max_seq_length, mut do_lower_case) = (config.max_position_embeddings, false);
        if st_path.exists() {
            let st = read_json(&st_path)?;
            if let Some(n) = st.get("max_seq_length").filter(|v| !v.is_null()) {
                max_seq_length = n.as_u64().ok_or_else(|| {
                    Error::format(&st_path, "max_seq_length is not a whole number")
                })? as usize;
            }
            do_lower_case = st
                .get("do_lower_case")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
        }
        if max_seq_length < 3 || max_seq_length > config.max_position_embeddings {
            return Err(Error::format(
                &st_path,
                format!(
                    "max_seq_length {max_seq_length} is outside 3..={} (max_position_embeddings)",
                    config.max_position_embeddings
                ),
            ));
        }
        Ok(SentenceConfig {
            max_seq_length,
            do_lower_case,
            normalize,
            transformer_dir,
        })
    }
}

/// The Pooling module must pool by the mean over tokens, over vectors of the
/// encoder's width.
fn check_pooling(path: &Path, config: &BertConfig) -> Result<()> {
    let pooling = read_json(path)?;
    let obj = pooling
        .as_object()
        .ok_or_else(|| Error::format(path, "not a JSON object"))?;
    if let Some(dim) = obj.get("word_embedding_dimension").and_then(|v| v.as_u64()) {
        if dim as usize != config.hidden_size {
            return Err(Error::format(
                path,
                format!(
                    "word_embedding_dimension {dim} differs from the encoder's hidden_size {}",
                    config.hidden_size
                ),
            ));
        }
    }
    // Older files name the mode in "pooling_mode"; newer ones set flags.
    let named = obj.get("pooling_mode").and_then(|v| v.as_str());
    let flags: Vec<&str> = obj
        .iter()
        .filter(|(k, v)| k.starts_with("pooling_mode_") && v.as_bool() == Some(true))
        .map(|(k, _)| k.as_str())
        .collect();
    let mean = match named {
        Some(mode) => mode == "mean" && flags.iter().all(|&f| f == "pooling_mode_mean_tokens"),
        None => flags == ["pooling_mode_mean_tokens"],
    };
    if !mean {
        let what = named.map(|m| vec![m]).unwrap_or(flags);
        return Err(Error::format(
            path,
            format!(
                "pooling {what:?} is not supported (engine pools by the mean over tokens: pooling_mode_mean_tokens)"
            ),
        ));
    }
    Ok(())
}

/// y = x·Wᵀ + b.
pub struct Linear<B: Backend> {
    pub w: Tensor<B>, // [out, in]
    pub b: Tensor<B>, // [out]
}

impl<B: Backend> Linear<B> {
    fn forward(&self, be: &B, y: &mut Tensor<B>, x: &Tensor<B>) -> Result<()> {
        be.matmul_nt(y, x, &self.w)?;
        be.add_bias(y, &self.b)
    }
}

/// LayerNorm's weight and bias, [d] each.
pub struct Norm<B: Backend> {
    pub w: Tensor<B>,
    pub b: Tensor<B>,
}

pub struct BertLayer<B: Backend> {
    pub query: Linear<B>,    // [d, d]
    pub key: Linear<B>,      // [d, d]
    pub value: Linear<B>,    // [d, d]
    pub attn_out: Linear<B>, // [d, d]
    pub attn_norm: Norm<B>,  // after the attention block
    pub ffn_up: Linear<B>,   // [f, d] ("intermediate.dense")
    pub ffn_down: Linear<B>, // [d, f] ("output.dense")
    pub ffn_norm: Norm<B>,   // after the feed-forward block
}

pub struct BertWeights<B: Backend> {
    pub word: Tensor<B>,       // [vocab, d]
    pub position: Tensor<B>,   // [max_position_embeddings, d]
    pub token_type: Tensor<B>, // [type_vocab_size, d]
    pub embed_norm: Norm<B>,
    pub layers: Vec<BertLayer<B>>,
}

/// Token ids of one text, as the encoder takes them.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// Rows of a batch padded to its longest text.
fn padded_rows(batch: &[&Encoded]) -> usize {
    batch.len() * batch.iter().map(|e| e.ids.len()).max().unwrap_or(0).max(1)
}

/// The encoder's activations, allocated once for up to `max_rows` rows
/// (texts × padded length) and reshaped to the rows of each batch.
struct Activations<B: Backend> {
    max_rows: usize,
    x: Tensor<B>,   // hidden states [rows, d]
    h: Tensor<B>,   // a block's output before its LayerNorm [rows, d]
    q: Tensor<B>,   // [rows, d]
    k: Tensor<B>,   // [rows, d]
    v: Tensor<B>,   // [rows, d]
    att: Tensor<B>, // attention output [rows, d]
    up: Tensor<B>,  // [rows, f]
    act: Tensor<B>, // gelu(up) [rows, f]
}

impl<B: Backend> Activations<B> {
    fn set_rows(&mut self, rows: usize) {
        assert!(
            rows <= self.max_rows,
            "{rows} rows > capacity {}",
            self.max_rows
        );
        for t in [
            &mut self.x,
            &mut self.h,
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.att,
            &mut self.up,
            &mut self.act,
        ] {
            t.shape[0] = rows;
        }
    }
}

/// A sentence embedder: BERT encoder, mean pooling, optional L2 norm.
pub struct Embedder<B: Backend> {
    pub config: BertConfig,
    pub sentence: SentenceConfig,
    pub weights: BertWeights<B>,
    tokenizer: tokenizers::Tokenizer,
    /// The same without truncation, to count every token.
    counter: tokenizers::Tokenizer,
    backend: B,
    batch_size: usize,
    identity: String,
}

/// Texts per forward pass unless `set_batch_size` says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 32;

impl<B: Backend> Embedder<B> {
    /// Loads a sentence-transformers folder: config.json, model.safetensors
    /// and tokenizer.json of its Transformer module, and the pooling
    /// configuration.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: no such model folder (models/fetch.sh downloads all-minilm-l6-v2)",
                dir.display()
            )));
        }
        // The encoder's folder is the Transformer module's path (the root
        // itself in every folder seen so far). Its config.json is read before
        // the pooling files, so that the folder of some other model is told
        // it is not a BERT encoder.
        let model_dir = if dir.join("modules.json").exists() {
            transformer_dir(dir)?
        } else {
            dir.to_path_buf()
        };
        let config = BertConfig::from_file(&model_dir.join("config.json"))?;
        let sentence = SentenceConfig::load(dir, &config)?;
        let model_dir = &sentence.transformer_dir;
        let tokenizer = load_tokenizer(model_dir, sentence.max_seq_length)?;
        let mut counter = tokenizer.clone();
        counter
            .with_truncation(None)
            .expect("no truncation is valid");
        let files = SafetensorsFiles::open_dir(model_dir)?;
        let mut fp = Fingerprint::new();
        fp.add_bytes(
            format!(
                "{config:?} max_seq_length {} lower {} normalize {}",
                sentence.max_seq_length, sentence.do_lower_case, sentence.normalize
            )
            .as_bytes(),
        );
        let tok_path = model_dir.join("tokenizer.json");
        fp.add_bytes(&std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?);
        let weights = load_weights(&backend, &config, &files, model_dir, &mut fp)?;
        let name = crate::model::folder::name(dir);
        let identity = format!("{name}/{}/{:016x}", config.hidden_size, fp.finish());
        Ok(Embedder {
            config,
            sentence,
            weights,
            tokenizer,
            counter,
            backend,
            batch_size: DEFAULT_BATCH_SIZE,
            identity,
        })
    }

    /// The length of every embedding.
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// The device the embedder runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// "FOLDER/DIM/FINGERPRINT": the model folder's name, the embedding
    /// width, and 16 hex digits hashed from the configuration, tokenizer.json
    /// and every weight, so that an index can tell whether its vectors came
    /// from this model.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Texts per forward pass (each pass pads its texts to the longest).
    pub fn set_batch_size(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::Invalid("the batch size must be at least 1".into()));
        }
        self.batch_size = n;
        Ok(())
    }

    /// [CLS] text [SEP] as token ids, truncated to max_seq_length.
    pub fn tokenize(&self, text: &str) -> Result<Encoded> {
        let enc = self.encode(&self.tokenizer, text)?;
        let ids = enc.get_ids().to_vec();
        let type_ids = enc.get_type_ids().to_vec();
        let c = &self.config;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        if type_ids.iter().any(|&t| t as usize >= c.type_vocab_size) {
            return Err(Error::Invalid(format!(
                "a token type is outside type_vocab_size {}",
                c.type_vocab_size
            )));
        }
        Ok(Encoded { ids, type_ids })
    }

    /// The tokens of `text`, [CLS] and [SEP] included, before truncation:
    /// the chunker's measure, so that a chunk fits max_seq_length.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode(&self.counter, text)?.len())
    }

    fn encode(&self, tok: &tokenizers::Tokenizer, text: &str) -> Result<tokenizers::Encoding> {
        let lowered;
        let text = if self.sentence.do_lower_case {
            lowered = text.to_lowercase();
            &lowered
        } else {
            text
        };
        tok.encode_fast(text, true)
            .map_err(|e| Error::Invalid(format!("cannot tokenize text: {e}")))
    }

    /// One embedding per text, in order. Texts are grouped by length into
    /// batches of up to the batch size, each padded to its longest, as
    /// sentence-transformers does; the grouping changes nothing but the
    /// rounding. The activations are allocated once, for the largest batch.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encoded = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].ids.len()));
        let groups: Vec<Vec<&Encoded>> = order
            .chunks(self.batch_size)
            .map(|group| group.iter().map(|&i| &encoded[i]).collect())
            .collect();
        let max_rows = groups.iter().map(|g| padded_rows(g)).max().unwrap_or(0);
        let mut acts = self.activations(max_rows)?;
        let mut out = vec![Vec::new(); texts.len()];
        for (group, batch) in order.chunks(self.batch_size).zip(&groups) {
            for (&i, e) in group.iter().zip(self.embed_batch(batch, &mut acts)?) {
                out[i] = e;
            }
        }
        Ok(out)
    }

    /// Embeddings of already tokenized texts, in one forward pass over the
    /// batch padded to its longest.
    pub fn embed_encoded(&self, batch: &[&Encoded]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut acts = self.activations(padded_rows(batch))?;
        self.embed_batch(batch, &mut acts)
    }

    /// Activations for up to `max_rows` rows (texts × padded length).
    fn activations(&self, max_rows: usize) -> Result<Activations<B>> {
        let (be, c) = (&self.backend, &self.config);
        let max_rows = max_rows.max(1);
        let t =
            |cols: usize| be.zeros_with_capacity(&[max_rows, cols], max_rows * cols, be.dtype());
        let d = c.hidden_size;
        Ok(Activations {
            max_rows,
            x: t(d)?,
            h: t(d)?,
            q: t(d)?,
            k: t(d)?,
            v: t(d)?,
            att: t(d)?,
            up: t(c.intermediate_size)?,
            act: t(c.intermediate_size)?,
        })
    }

    /// One forward pass over a non-empty batch padded to its longest, in
    /// `acts`.
    fn embed_batch(&self, batch: &[&Encoded], acts: &mut Activations<B>) -> Result<Vec<Vec<f32>>> {
        let lens: Vec<usize> = batch.iter().map(|e| e.ids.len()).collect();
        let seq = lens.iter().copied().max().unwrap_or(0).max(1);
        if seq > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "{seq} tokens do not fit the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        // Padding rows take token 0, type 0 and their position; attention
        // never reads them and pooling skips them.
        let rows = batch.len() * seq;
        let (mut ids, mut types, mut positions) = (vec![0u32; rows], vec![0u32; rows], Vec::new());
        for (b, e) in batch.iter().enumerate() {
            ids[b * seq..][..e.ids.len()].copy_from_slice(&e.ids);
            types[b * seq..][..e.type_ids.len()].copy_from_slice(&e.type_ids);
            positions.extend(0..seq as u32);
        }
        acts.set_rows(rows);
        let hidden = self.forward(acts, &ids, &types, &positions, &lens)?;
        Ok(self.pool(&hidden, &lens, seq))
    }

    /// The encoder's last hidden states [batch·seq, d], downloaded as f32.
    fn forward(
        &self,
        acts: &mut Activations<B>,
        ids: &[u32],
        types: &[u32],
        positions: &[u32],
        lens: &[usize],
    ) -> Result<Vec<f32>> {
        let (c, w, be) = (&self.config, &self.weights, &self.backend);
        let eps = c.layer_norm_eps;
        let Activations {
            x,
            h,
            q,
            k,
            v,
            att,
            up,
            act,
            ..
        } = acts;

        // embeddings: x = LayerNorm(word + position + token type)
        be.embedding(h, ids, &w.word)?;
        be.embedding(x, positions, &w.position)?;
        be.add_assign(h, x)?;
        be.embedding(x, types, &w.token_type)?;
        be.add_assign(h, x)?;
        be.layernorm(x, h, &w.embed_norm.w, &w.embed_norm.b, eps)?;
        for l in &w.layers {
            // attention block
            l.query.forward(be, q, x)?;
            l.key.forward(be, k, x)?;
            l.value.forward(be, v, x)?;
            be.attention_bidirectional(att, q, k, v, c.num_heads, lens)?;
            l.attn_out.forward(be, h, att)?;
            be.add_assign(h, x)?;
            be.layernorm(x, h, &l.attn_norm.w, &l.attn_norm.b, eps)?;
            // feed-forward block
            l.ffn_up.forward(be, up, x)?;
            be.gelu(act, up)?;
            l.ffn_down.forward(be, h, act)?;
            be.add_assign(h, x)?;
            be.layernorm(x, h, &l.ffn_norm.w, &l.ffn_norm.b, eps)?;
        }
        be.download(x)
    }

    /// Mean over each text's real tokens (in f64), then the L2 norm if the
    /// folder asks for it (x / max(|x|, 1e-12), as torch's F.normalize).
    fn pool(&self, hidden: &[f32], lens: &[usize], seq: usize) -> Vec<Vec<f32>> {
        let d = self.dim();
        lens.iter()
            .enumerate()
            .map(|(b, &len)| {
                let mut sum = vec![0f64; d];
                for row in hidden[b * seq * d..][..len * d].chunks_exact(d) {
                    for (s, &x) in sum.iter_mut().zip(row) {
                        *s += x as f64;
                    }
                }
                let count = (len as f64).max(1e-9);
                let mut mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
                if self.sentence.normalize {
                    let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                    mean.iter_mut().for_each(|x| *x /= norm);
                }
                mean.into_iter().map(|x| x as f32).collect()
            })
            .collect()
    }
}

/// The Transformer module's folder according to modules.json.
fn transformer_dir(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("modules.json");
    let modules: Vec<Module> = serde_json::from_value(read_json(&path)?)
        .map_err(|e| Error::format(&path, format!("not a list of modules: {e}")))?;
    modules
        .iter()
        .find(|m| m.kind.ends_with("Transformer"))
        .map(|m| dir.join(&m.path))
        .ok_or_else(|| Error::format(&path, "no sentence_transformers.models.Transformer module"))
}

/// tokenizer.json with its own padding switched off (batches are padded
/// here) and truncation to max_seq_length tokens, [CLS] and [SEP] included,
/// as sentence-transformers calls it.
fn load_tokenizer(dir: &Path, max_seq_length: usize) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(Error::format(dir, "no tokenizer.json in this folder"));
    }
    let mut tok = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_seq_length,
        ..Default::default()
    }))
    .map_err(|e| Error::format(&path, format!("cannot truncate to {max_seq_length}: {e}")))?;
    Ok(tok)
}

/// The prefix the checkpoint puts before `embeddings.…`: none in
/// sentence-transformers' own folders, `bert.` in a BertFor… checkpoint,
/// `0.` or `0.bert.` in some re-saved ones.
fn name_prefix(files: &SafetensorsFiles, dir: &Path) -> Result<&'static str> {
    ["", "bert.", "0.", "0.bert.", "model."]
        .into_iter()
        .find(|p| files.contains(&format!("{p}embeddings.word_embeddings.weight")))
        .ok_or_else(|| {
            Error::format(
                dir.join("model.safetensors"),
                "no tensor embeddings.word_embeddings.weight (nor with a bert. or 0. prefix): not a BERT checkpoint",
            )
        })
}

fn load_weights<B: Backend>(
    be: &B,
    c: &BertConfig,
    files: &SafetensorsFiles,
    dir: &Path,
    fp: &mut Fingerprint,
) -> Result<BertWeights<B>> {
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let prefix = name_prefix(files, dir)?;
    let mut load = |name: &str, shape: &[usize]| -> Result<Tensor<B>> {
        let data = files.load_f32(&format!("{prefix}{name}"), shape)?;
        fp.add_bytes(name.as_bytes());
        fp.add_f32s(&data);
        be.upload(data, shape, be.dtype())
    };
    let word = load("embeddings.word_embeddings.weight", &[c.vocab_size, d])?;
    let position = load(
        "embeddings.position_embeddings.weight",
        &[c.max_position_embeddings, d],
    )?;
    let token_type = load(
        "embeddings.token_type_embeddings.weight",
        &[c.type_vocab_size, d],
    )?;
    let embed_norm = Norm {
        w: load("embeddings.LayerNorm.weight", &[d])?,
        b: load("embeddings.LayerNorm.bias", &[d])?,
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("encoder.layer.{i}");
        let mut linear = |name: &str, out: usize, inp: usize| -> Result<Linear<B>> {
            Ok(Linear {
                w: load(&format!("{p}.{name}.weight"), &[out, inp])?,
                b: load(&format!("{p}.{name}.bias"), &[out])?,
            })
        };
        let query = linear("attention.self.query", d, d)?;
        let key = linear("attention.self.key", d, d)?;
        let value = linear("attention.self.value", d, d)?;
        let attn_out = linear("attention.output.dense", d, d)?;
        let ffn_up = linear("intermediate.dense", f, d)?;
        let ffn_down = linear("output.dense", d, f)?;
        let mut norm = |name: &str| -> Result<Norm<B>> {
            Ok(Norm {
                w: load(&format!("{p}.{name}.weight"), &[d])?,
                b: load(&format!("{p}.{name}.bias"), &[d])?,
            })
        };
        layers.push(BertLayer {
            query,
            key,
            value,
            attn_out,
            attn_norm: norm("attention.output.LayerNorm")?,
            ffn_up,
            ffn_down,
            ffn_norm: norm("output.LayerNorm")?,
        });
    }
    Ok(BertWeights {
        word,
        position,
        token_type,
        embed_norm,
        layers,
    })
}

/// A 64-bit hash (xxh3) of the model's configuration, tokenizer and
/// weights, each part with its length: enough to tell two models apart, not
/// to resist someone forging a collision.
struct Fingerprint(xxhash_rust::xxh3::Xxh3);

impl Fingerprint {
    fn new() -> Self {
        Fingerprint(xxhash_rust::xxh3::Xxh3::new())
    }

    fn add_bytes(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn add_f32s(&mut self, values: &[f32]) {
        self.add_bytes(bytemuck::cast_slice(values));
    }

    fn finish(&self) -> u64 {
        self.0.digest()
    }
}
