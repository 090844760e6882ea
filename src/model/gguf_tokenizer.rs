//! A byte-level BPE tokenizer both ways between GGUF's `tokenizer.ggml.*`
//! metadata and HF's tokenizer.json + tokenizer_config.json:
//! [`TokenizerFiles::build`] for `engine convert` and `--model FILE.gguf`
//! ([`SpecialIds`] alone for the config), [`tokenizer_metadata`] for
//! `engine quantize`. The pre-tokenizer is the one part that is named in GGUF
//! (`tokenizer.ggml.pre`) and spelled out in tokenizer.json; `pre_tokenizer`
//! is the table between the two.

use crate::error::{Error, Result};
use crate::model::gguf::{Gguf, Value};
use serde_json::{json, Map, Value as Json};
use std::path::Path;

/// tokenizer.json and tokenizer_config.json built from the GGUF vocabulary.
pub struct TokenizerFiles {
    pub tokenizer: Json,
    pub config: Json,
}

/// The special token ids of a GGUF vocabulary (`tokenizer.ggml.*_token_id`),
/// each checked against its size: what config.json needs of the tokenizer,
/// read without building it.
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
}

impl SpecialIds {
    pub fn read(g: &Gguf) -> Result<Self> {
        let n_tokens = g.get_array("tokenizer.ggml.tokens")?.len();
        let token_id = |key: &str| -> Result<Option<u32>> {
            if g.get(key).is_none() {
                return Ok(None);
            }
            let id = g.get_u32(key)?;
            if id as usize >= n_tokens {
                return Err(Error::format(
                    g.path(),
                    format!("{key} is {id}, past the vocabulary of {n_tokens} tokens"),
                ));
            }
            Ok(Some(id))
        };
        Ok(SpecialIds {
            bos: token_id("tokenizer.ggml.bos_token_id")?,
            eos: token_id("tokenizer.ggml.eos_token_id")?,
            pad: token_id("tokenizer.ggml.padding_token_id")?,
            unk: token_id("tokenizer.ggml.unknown_token_id")?,
        })
    }
}

/// The Llama-3 ("llama-bpe") pre-tokenizer split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer of the model family's own HF tokenizer.json for
/// `tokenizer.ggml.pre` = `name`, and its BPE model's `ignore_merges`.
fn pre_tokenizer(name: &str) -> Option<(Json, bool)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Some(match name {
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
        _ => return None,
    })
}

/// The name written for a tokenizer.json pre-tokenizer: one of these whose
/// [`pre_tokenizer`] it is.
const PRE_NAMES: &[&str] = &["gpt2", "smollm", "llama-bpe"];

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
        let SpecialIds {
            bos: bos_id,
            eos: eos_id,
            pad: pad_id,
            unk: unk_id,
        } = SpecialIds::read(g)?;
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
        let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: tokenizer pre-tokenizer '{pre}' is not supported (known: default, gpt2, smollm, starcoder, refact, codeshell, llama-bpe)",
                path.display()
            ))
        })?;

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
        })
    }
}

/// Reads a JSON file.
fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// The `tokenizer.*` metadata of the byte-level BPE tokenizer of model folder
/// `dir` (tokenizer.json, and tokenizer_config.json when there is one), as
/// llama.cpp's convert_hf_to_gguf.py writes it for a model of `vocab` tokens:
/// token types normal (1), control (3: an added token marked special),
/// user-defined (4: another added token) and unused (5: ids the tokenizer
/// lacks, written as "[PAD{id}]"); the special tokens tokenizer_config.json
/// names, else the ids `bos` / `eos` (config.json's); the chat template.
pub fn tokenizer_metadata(
    dir: &Path,
    vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let tj = read_json(&path)?;
    let bad = |msg: String| Error::format(&path, msg);
    let model = &tj["model"];
    let kind = model["type"].as_str().unwrap_or("(none)");
    if kind != "BPE" || model["byte_fallback"] == json!(true) {
        return Err(Error::Unsupported(format!(
            "{}: tokenizer model '{kind}'{} is not supported (engine writes byte-level BPE tokenizers to GGUF)",
            path.display(),
            if kind == "BPE" { " with byte fallback" } else { "" }
        )));
    }
    let pre = PRE_NAMES
        .iter()
        .find(|name| pre_tokenizer(name).is_some_and(|(p, _)| p == tj["pre_tokenizer"]))
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: pre-tokenizer {} is not one engine can name in GGUF (byte-level BPE as GPT-2, SmolLM or Llama 3 split text)",
                path.display(),
                tj["pre_tokenizer"]
            ))
        })?;

    // Tokens by id: the model's vocabulary, then the added tokens.
    let mut tokens: Vec<Option<String>> = vec![None; vocab];
    let mut types = vec![5i32; vocab];
    let mut place = |id: Option<u64>, tok: &str, ty: i32| -> Result<()> {
        let id = id.ok_or_else(|| bad(format!("token {tok:?} has no integer id")))?;
        let slot = usize::try_from(id)
            .ok()
            .filter(|&i| i < vocab)
            .ok_or_else(|| {
                bad(format!(
                    "token {tok:?} has id {id}, past the model's {vocab} tokens"
                ))
            })?;
        match &tokens[slot] {
            Some(other) if other != tok => {
                return Err(bad(format!("id {id} is both {other:?} and {tok:?}")))
            }
            _ => {}
        }
        tokens[slot] = Some(tok.to_string());
        types[slot] = ty;
        Ok(())
    };
    let words = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    for (tok, id) in words {
        place(id.as_u64(), tok, 1)?;
    }
    for t in tj["added_tokens"].as_array().into_iter().flatten() {
        let tok = t["content"]
            .as_str()
            .ok_or_else(|| bad(format!("added token {t} has no content")))?;
        let ty = if t["special"] == json!(true) { 3 } else { 4 };
        place(t["id"].as_u64(), tok, ty)?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.unwrap_or_else(|| format!("[PAD{id}]")))
        .collect();

    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is not an array".into()))?
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 && pair.iter().all(Json::is_string) => {
                Ok(format!(
                    "{} {}",
                    pair[0].as_str().unwrap(),
                    pair[1].as_str().unwrap()
                ))
            }
            _ => Err(bad(format!("merge {i} ({m}) is not two tokens"))),
        })
        .collect::<Result<Vec<_>>>()?;

    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.exists() {
        read_json(&config_path)?
    } else {
        json!({})
    };
    // A special token is named by its text, or by an object holding it.
    let special = |key: &str| -> Result<Option<u32>> {
        let v = &config[key];
        let Some(text) = v.as_str().or_else(|| v["content"].as_str()) else {
            return Ok(None);
        };
        let id = tokens.iter().position(|t| t == text).ok_or_else(|| {
            Error::format(
                &config_path,
                format!("{key} {text:?} is not in tokenizer.json"),
            )
        })?;
        Ok(Some(id as u32))
    };
    let flag = |key: &str| config[key].as_bool().unwrap_or(false);

    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String(pre.to_string()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.iter().cloned().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
    ];
    let ids = [
        ("bos_token_id", special("bos_token")?.or(bos)),
        ("eos_token_id", special("eos_token")?.or(eos)),
        ("unknown_token_id", special("unk_token")?),
        ("padding_token_id", special("pad_token")?),
    ];
    for (key, id) in ids {
        if let Some(id) = id {
            if id as usize >= tokens.len() {
                return Err(bad(format!(
                    "{key} {id} is past the model's {vocab} tokens"
                )));
            }
            out.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(flag("add_bos_token")),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(flag("add_eos_token")),
    ));
    // A template, or a list of named ones of which GGUF's is "default".
    let template = match &config["chat_template"] {
        Json::String(t) => Some(t.clone()),
        Json::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str().map(String::from)),
        _ => None,
    };
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(out)
}
