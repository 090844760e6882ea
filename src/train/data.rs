//! Fine-tuning examples from JSONL: token ids and next-token targets.
//!
//! Each non-blank line of the file is one JSON object of one of three shapes
//! (other keys, such as an `"id"`, are ignored):
//!
//! | shape | tokens | loss on |
//! |---|---|---|
//! | `{"text": T}` | `encode(T, add_special) + [EOS]` | every token |
//! | `{"prompt": P, "completion": C}` | `encode(P, add_special) + encode(C) + [EOS]` | the completion and the EOS |
//! | `{"messages": [{"role", "content"}, ...]}` | the chat template, rendered without a generation prompt | each assistant turn, its end-of-turn marker included |
//!
//! `add_special` means what the tokenizer's post-processor adds (a BOS for
//! Llama-style tokenizers, nothing for SmolLM2), as transformers does by
//! default. The EOS appended to text and completions teaches the model to
//! stop. Prompt and completion are tokenized separately (no space is
//! inserted between them), exactly as at inference, where the prompt is
//! encoded and the model continues from its last token. A chat is tokenized
//! without `add_special`, as transformers' `apply_chat_template` does: the
//! template writes the BOS itself where the model wants one.
//!
//! ## Where the assistant turns are
//!
//! For assistant message i the template is rendered twice more: the messages
//! before it with the generation prompt (`before`), and the messages up to and
//! including it without (`upto`). The assistant's text is then the characters
//! `before.len()..upto.len()` of the full rendering, provided `before` is a
//! prefix of `upto` and `upto` a prefix of the full rendering (checked; a
//! template that rewrites earlier turns is an error). Trailing whitespace of
//! that span is not trained (it is the template's glue between turns, e.g. the
//! `\n` after `<|im_end|>` that a model never generates because it stops at
//! `<|im_end|>`). The rendering is then cut at the span boundaries and each
//! piece tokenized on its own, so a token never straddles a boundary and the
//! prompt part is tokenized as it is at inference (`apply_chat_template(...,
//! true)` then `encode`).
//!
//! ## Targets
//!
//! `targets[t]` is the id the model should predict at position t: `ids[t+1]`
//! when that token carries loss, [`IGNORE`] otherwise. The last position of an
//! example always has [`IGNORE`] (its next token is not part of the example).

use crate::error::{Error, Result};
use crate::tokenizer::{Message, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The target of a position that takes no loss.
pub const IGNORE: u32 = u32::MAX;

/// The roles a `messages` line may use.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One parsed line of a dataset, before tokenization.
#[derive(Clone, Debug)]
pub enum Record {
    Text(String),
    PromptCompletion { prompt: String, completion: String },
    Messages(Vec<Message>),
}

/// One tokenized example: `ids` and the parallel next-token `targets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Example {
    /// Builds the targets from a per-token loss flag: position t predicts
    /// `ids[t+1]` where `loss[t+1]`.
    pub fn from_loss_flags(ids: Vec<u32>, loss: &[bool]) -> Example {
        debug_assert_eq!(ids.len(), loss.len());
        let targets = (0..ids.len())
            .map(|t| match ids.get(t + 1) {
                Some(&next) if loss[t + 1] => next,
                _ => IGNORE,
            })
            .collect();
        Example { ids, targets }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Positions that carry loss.
    pub fn loss_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// Every example of a JSONL file, in file order.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// Appended to text and completions, and the separator when packing.
    pub eos_id: u32,
}

impl Dataset {
    /// Reads and tokenizes a JSONL file. A bad line is an
    /// [`Error::Format`] naming the file and the 1-based line number; a file
    /// with no examples (empty, or only blank lines) is an error too.
    pub fn load(path: &Path, tokenizer: &Tokenizer, eos_id: u32) -> Result<Dataset> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Dataset::parse(&bytes, path, tokenizer, eos_id)
    }

    /// [`Dataset::load`] on bytes already read; `path` names them in errors.
    pub fn parse(bytes: &[u8], path: &Path, tokenizer: &Tokenizer, eos_id: u32) -> Result<Dataset> {
        let mut examples = Vec::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let at = |msg: String| Error::format(path, format!("line {}: {msg}", i + 1));
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = std::str::from_utf8(raw).map_err(|e| at(format!("not UTF-8: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let record = parse_record(line).map_err(at)?;
            examples.push(encode_record(&record, tokenizer, eos_id).map_err(at)?);
        }
        if examples.is_empty() {
            return Err(Error::format(
                path,
                "the dataset is empty: no examples (one JSON object per line: \
                 {\"text\"}, {\"prompt\",\"completion\"} or {\"messages\"})",
            ));
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            examples,
            eos_id,
        })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn total_tokens(&self) -> usize {
        self.examples.iter().map(Example::len).sum()
    }

    pub fn loss_tokens(&self) -> usize {
        self.examples.iter().map(Example::loss_tokens).sum()
    }
}

/// The EOS id for a model folder: `eos_token` of tokenizer_config.json,
/// else the first `eos_token_id` of config.json; for a GGUF file, its
/// `tokenizer.ggml.eos_token_id` (the tokenizer's eos token).
pub fn eos_id(model_dir: &Path, tokenizer: &Tokenizer) -> Result<u32> {
    if model_dir.is_file() {
        return tokenizer
            .eos_token_id()
            .ok_or_else(|| Error::format(model_dir, "no EOS token (tokenizer.ggml.eos_token_id)"));
    }
    let read = |name: &str| -> Result<Option<Value>> {
        let path = model_dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))
    };
    if let Some(cfg) = read("tokenizer_config.json")? {
        let token = match cfg.get("eos_token") {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str),
            _ => None,
        };
        if let Some(id) = token.and_then(|t| tokenizer.token_id(t)) {
            return Ok(id);
        }
    }
    if let Some(cfg) = read("config.json")? {
        let id = match cfg.get("eos_token_id") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
            Some(v) => v.as_u64(),
            None => None,
        };
        if let Some(id) = id {
            return Ok(id as u32);
        }
    }
    Err(Error::format(
        model_dir,
        "no EOS token: neither tokenizer_config.json (eos_token) nor config.json (eos_token_id) names one",
    ))
}

const SHAPES: &str =
    "{\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]}";

/// One line of JSON → a [`Record`]; the error is the message without the
/// line number.
pub fn parse_record(line: &str) -> std::result::Result<Record, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err(format!("expected a JSON object: {SHAPES}"));
    };
    let has = |k: &str| obj.contains_key(k);
    let shapes = [
        has("text"),
        has("prompt") || has("completion"),
        has("messages"),
    ];
    match shapes.iter().filter(|&&s| s).count() {
        0 => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(format!("unknown shape (keys {keys:?}); expected {SHAPES}"));
        }
        1 => {}
        _ => return Err(format!("ambiguous shape: use exactly one of {SHAPES}")),
    }
    let string = |key: &str| -> std::result::Result<String, String> {
        match obj.get(key) {
            None => Err(format!("missing field \"{key}\"")),
            Some(Value::String(s)) if s.trim().is_empty() => Err(format!("empty \"{key}\"")),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(format!("\"{key}\" must be a string, not {}", kind(v))),
        }
    };
    if shapes[0] {
        return Ok(Record::Text(string("text")?));
    }
    if shapes[1] {
        return Ok(Record::PromptCompletion {
            prompt: string("prompt")?,
            completion: string("completion")?,
        });
    }
    let list = match &obj["messages"] {
        Value::Array(a) => a,
        v => return Err(format!("\"messages\" must be a list, not {}", kind(v))),
    };
    if list.is_empty() {
        return Err("empty \"messages\"".into());
    }
    let mut messages = Vec::with_capacity(list.len());
    for (j, m) in list.iter().enumerate() {
        let at = |msg: String| format!("message {}: {msg}", j + 1);
        let Value::Object(m) = m else {
            return Err(at(format!(
                "expected {{\"role\": ..., \"content\": ...}}, not {}",
                kind(m)
            )));
        };
        let field = |key: &str| match m.get(key) {
            None => Err(at(format!("missing field \"{key}\""))),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(at(format!("\"{key}\" must be a string, not {}", kind(v)))),
        };
        let role = field("role")?;
        if !ROLES.contains(&role.as_str()) {
            return Err(at(format!(
                "unknown role \"{role}\" (expected system, user or assistant)"
            )));
        }
        messages.push(Message {
            role,
            content: field("content")?,
        });
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("no assistant message: nothing to learn from this conversation".into());
    }
    Ok(Record::Messages(messages))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Tokenizes one record (see the module comment for the rules).
pub fn encode_record(
    record: &Record,
    tokenizer: &Tokenizer,
    eos_id: u32,
) -> std::result::Result<Example, String> {
    let enc =
        |text: &str, special: bool| tokenizer.encode(text, special).map_err(|e| e.to_string());
    match record {
        Record::Text(text) => {
            let mut ids = enc(text, true)?;
            push_eos(&mut ids, eos_id);
            let loss = vec![true; ids.len()];
            Ok(Example::from_loss_flags(ids, &loss))
        }
        Record::PromptCompletion { prompt, completion } => {
            let mut ids = enc(prompt, true)?;
            let mut loss = vec![false; ids.len()];
            ids.extend(enc(completion, false)?);
            push_eos(&mut ids, eos_id);
            loss.resize(ids.len(), true);
            Ok(Example::from_loss_flags(ids, &loss))
        }
        Record::Messages(messages) => encode_chat(messages, tokenizer),
    }
}

/// Appends the EOS unless the tokenizer's post-processor already did.
fn push_eos(ids: &mut Vec<u32>, eos_id: u32) {
    if ids.last() != Some(&eos_id) {
        ids.push(eos_id);
    }
}

fn encode_chat(
    messages: &[Message],
    tokenizer: &Tokenizer,
) -> std::result::Result<Example, String> {
    let render = |msgs: &[Message], gen: bool| {
        tokenizer
            .apply_chat_template(msgs, gen)
            .map_err(|e| e.to_string())
    };
    let full = render(messages, false)?;
    // Byte ranges of `full` that carry loss, in order.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let upto = render(&messages[..=i], false)?;
        let prev_end = spans.last().map_or(0, |s| s.1);
        if !upto.starts_with(&before) || !full.starts_with(&upto) || before.len() < prev_end {
            return Err(format!(
                "message {}: cannot find this assistant turn in the chat template's output \
                 (the template does not render a conversation as its earlier turns plus the new one)",
                i + 1
            ));
        }
        let end = before.len() + upto[before.len()..].trim_end().len();
        if end > before.len() {
            spans.push((before.len(), end));
        }
    }
    let mut ids = Vec::new();
    let mut loss = Vec::new();
    let mut piece = |text: &str, on: bool| -> std::result::Result<(), String> {
        if !text.is_empty() {
            let new = tokenizer.encode(text, false).map_err(|e| e.to_string())?;
            loss.resize(loss.len() + new.len(), on);
            ids.extend(new);
        }
        Ok(())
    };
    let mut cursor = 0;
    for &(start, end) in &spans {
        piece(&full[cursor..start], false)?;
        piece(&full[start..end], true)?;
        cursor = end;
    }
    piece(&full[cursor..], false)?;
    let example = Example::from_loss_flags(ids, &loss);
    if example.loss_tokens() == 0 {
        return Err("the assistant turns produced no tokens to learn".into());
    }
    Ok(example)
}
