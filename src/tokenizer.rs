//! Text ↔ token ids through HF `tokenizers`, and chat prompts through the
//! model's own Jinja chat template (rendered by minijinja, as transformers
//! renders it with Jinja2).

use crate::error::{Error, Result};
use crate::model::gguf::Gguf;
use crate::model::gguf_model::HfView;
use minijinja::{context, Environment};
use serde::Serialize;
use std::path::Path;
use std::str::FromStr;

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A special token in tokenizer_config.json is a string or {"content": ...}.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` (chat
    /// template, bos/eos) and `chat_template.jinja` from a model folder — or
    /// the same, built from the metadata of a GGUF file (`HfView`).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_file() {
            let g = Gguf::open(path)?;
            let files = HfView::read(&g)?.tokenizer(&g)?;
            let inner = tokenizers::Tokenizer::from_str(&files.tokenizer.to_string())
                .map_err(|e| Error::format(path, format!("cannot build its tokenizer: {e}")))?;
            return Self::new(inner, Some(&files.config), path);
        }
        let dir = path;
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::format(dir, "no tokenizer.json in this folder"));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Option<serde_json::Value> = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?,
            )
        } else {
            None
        };
        let mut tok = Self::new(inner, cfg.as_ref(), &path)?;
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.exists() {
            tok.chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        Ok(tok)
    }

    /// The tokenizer `inner` with the settings of tokenizer_config.json
    /// `cfg` (chat template, bos/eos); `path` names it in errors.
    fn new(
        mut inner: tokenizers::Tokenizer,
        cfg: Option<&serde_json::Value>,
        path: &Path,
    ) -> Result<Self> {
        // Callers pad and truncate themselves: a file's own settings
        // (all-MiniLM-L6-v2 pads and cuts every text to 128) would change
        // every token count.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::format(path, format!("cannot turn truncation off: {e}")))?;
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        };
        if let Some(cfg) = cfg {
            tok.bos_token = token_string(cfg.get("bos_token"));
            tok.eos_token = token_string(cfg.get("eos_token"));
            tok.chat_template = match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
        }
        Ok(tok)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The chat template's Jinja source, if the folder has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`. `add_special` adds what the tokenizer's
    /// post-processor adds around a sequence (a BOS token, for models that
    /// want one), as transformers does by default.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Invalid(format!("cannot tokenize text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Invalid(format!("cannot decode tokens: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of the tokenizer config's `eos_token`, if it names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.token_id(self.eos_token.as_deref()?)
    }

    /// Ids that end a generation: the config's eos ids, the tokenizer's eos
    /// token, and the end-of-turn markers of common chat formats.
    pub fn stop_ids(&self, config_eos: &[u32]) -> Vec<u32> {
        let mut ids = config_eos.to_vec();
        let named = [
            self.eos_token.as_deref(),
            Some("<|im_end|>"),
            Some("<|eot_id|>"),
        ];
        ids.extend(named.into_iter().flatten().filter_map(|t| self.token_id(t)));
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The prompt text for `messages` in the model's chat template, ending with
    /// the assistant's turn opener when `add_generation_prompt`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Invalid("this model has no chat template (tokenizer_config.json has no chat_template); drop --chat".into())
        })?;
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let bad = |e: minijinja::Error| Error::Invalid(format!("chat template: {e}"));
        env.add_template("chat", template).map_err(bad)?;
        env.get_template("chat")
            .map_err(bad)?
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(bad)
    }
}
