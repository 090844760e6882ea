//! Retrieval while serving (`--index DIR --embedder DIR`):
//! `POST /v1/embeddings`, chat completions that answer from the index's
//! passages (`"retrieval": {"k": 3}`) and cite them, and
//! `POST /v1/documents` / `DELETE /v1/documents?source=…`, which change the
//! index for the next request.
//!
//! The embedder runs on the CPU, on a blocking thread; index writes go
//! through the index's own writer (lock, write, atomic publish), so they
//! keep its crash-safety. A document's `source` is a label stored in the
//! index, never a path the server opens or writes.

use crate::backend::cpu::Cpu;
use crate::model::bert::Embedder;
use crate::rag::answer::{self, Passage};
use crate::rag::chunk::{chunk_text, ChunkOptions, Format};
use crate::rag::index::{Index, Writer, MANIFEST};
use crate::rag::ingest;
use crate::serve::error::ApiError;
use crate::serve::{AppState, JsonBody};
use crate::tokenizer::Message;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// The most texts one embeddings request may hold.
const MAX_INPUTS: usize = 2048;
/// The longest source label.
const MAX_SOURCE: usize = 512;
/// The most passages a retrieval may ask for.
const MAX_K: usize = 20;

pub struct Rag {
    pub embedder: Embedder<Cpu>,
    /// The name clients give as `model` for embeddings.
    pub name: String,
    pub index_dir: PathBuf,
    /// The index as last read; reopened when a writer has committed since.
    index: RwLock<Option<Index>>,
    /// Serialises this server's writes (the writer's file lock guards
    /// against other processes).
    writing: Mutex<()>,
}

impl Rag {
    pub fn open(embedder: Embedder<Cpu>, name: String, index_dir: PathBuf) -> crate::Result<Rag> {
        let rag = Rag {
            embedder,
            name,
            index_dir,
            index: RwLock::new(None),
            writing: Mutex::new(()),
        };
        rag.refresh()?;
        Ok(rag)
    }

    /// Chunks in the index (0 before the first document).
    pub fn len(&self) -> usize {
        self.index.read().unwrap().as_ref().map_or(0, Index::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` passages nearest `question`, best first, from the index as
    /// it is now.
    pub fn retrieve(&self, question: &str, k: usize) -> crate::Result<Vec<Passage>> {
        self.refresh()?;
        let guard = self.index.read().unwrap();
        let Some(index) = guard.as_ref() else {
            return Ok(Vec::new());
        };
        let query = self.embedder.embed(&[question])?.remove(0);
        Ok(answer::passages(index.search(&query, k)?))
    }

    /// Opens the index, or reopens it if a writer committed since it was
    /// read (none before the first document).
    fn refresh(&self) -> crate::Result<()> {
        let fresh = match self.index.read().unwrap().as_ref() {
            Some(index) => index.reload()?,
            None if self.index_dir.join(MANIFEST).exists() => Some(Index::open_for(
                &self.index_dir,
                self.embedder.identity(),
                self.embedder.dim(),
            )?),
            None => None,
        };
        if let Some(fresh) = fresh {
            *self.index.write().unwrap() = Some(fresh);
        }
        Ok(())
    }

    /// Adds (or replaces) the document `source`; returns its chunk count.
    fn add(&self, source: &str, text: &str) -> crate::Result<usize> {
        // The label's extension picks the format, as a file's would.
        let format = Format::from_path(Path::new(source)).unwrap_or(Format::Text);
        let opts = ChunkOptions::default();
        let chunks = chunk_text(source, text, format, &opts, &self.embedder)?;
        if chunks.is_empty() {
            return Err(crate::Error::Invalid(format!(
                "the document {source:?} has no text"
            )));
        }
        let (pieces, vectors) = ingest::embed_chunks(&self.embedder, chunks)?;
        let hash = ingest::content_hash(text.as_bytes(), &opts);
        let _one = self.writing.lock().unwrap();
        let mut w = Writer::open_or_create(
            &self.index_dir,
            self.embedder.identity(),
            self.embedder.dim(),
        )?;
        w.add(source, &hash, &pieces, &vectors)?;
        w.commit()?;
        self.refresh()?;
        Ok(pieces.len())
    }

    /// Removes the document `source`; false if the index does not hold it.
    fn remove(&self, source: &str) -> crate::Result<bool> {
        let _one = self.writing.lock().unwrap();
        if !self.index_dir.join(MANIFEST).exists() {
            return Ok(false);
        }
        let mut w = Writer::open(&self.index_dir)?;
        let had = w.remove(source);
        w.commit()?;
        self.refresh()?;
        Ok(had)
    }
}

/// The retrieval prompt for a chat: its last user message is the question,
/// answered from the passages with the instruction `engine ask` uses
/// (which also becomes the system message unless the chat has one).
pub fn retrieval_messages(
    messages: &[Message],
    passages: &[Passage],
) -> Result<Vec<Message>, ApiError> {
    let last = messages
        .iter()
        .rposition(|m| m.role == "user")
        .ok_or_else(|| ApiError::invalid("messages", "retrieval needs a user message to answer"))?;
    let mut rag = answer::messages(&messages[last].content, passages);
    let has_system = messages.iter().any(|m| m.role == "system");
    let mut out = Vec::with_capacity(messages.len() + 1);
    if !has_system {
        out.push(rag.remove(0));
    } else {
        rag.remove(0);
    }
    out.extend(messages[..last].iter().cloned());
    out.extend(rag);
    out.extend(messages[last + 1..].iter().cloned());
    Ok(out)
}

/// The citations of an answer: the passages it cites as [n], in order.
pub fn citations(answer_text: &str, passages: &[Passage]) -> Value {
    let cited = answer::cited(answer_text, passages.len());
    Value::Array(
        cited
            .iter()
            .map(|&n| passage_json(&passages[n - 1]))
            .collect(),
    )
}

pub fn passage_json(p: &Passage) -> Value {
    json!({"n": p.n, "source": p.source, "lines": [p.line_start, p.line_end], "score": p.score})
}

/// `k` of a retrieval request, checked.
pub fn check_k(k: Option<usize>) -> Result<usize, ApiError> {
    let k = k.unwrap_or(3);
    if k == 0 || k > MAX_K {
        return Err(ApiError::invalid(
            "retrieval",
            format!("retrieval.k must be between 1 and {MAX_K}, got {k}"),
        ));
    }
    Ok(k)
}

fn rag(state: &AppState) -> Result<Arc<Rag>, ApiError> {
    state.rag.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this server has no index: start it with --index DIR --embedder DIR",
        )
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    input: Input,
    encoding_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Input {
    One(String),
    Many(Vec<String>),
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<EmbeddingsRequest>,
) -> Result<Json<Value>, ApiError> {
    let rag = rag(&state)?;
    if req.model != rag.name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the embedding model {:?} does not exist here; this server has {:?}",
                req.model, rag.name
            ),
        )
        .with_code("model_not_found"));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be float or base64, got {other:?}"),
            ))
        }
    };
    let texts = match req.input {
        Input::One(t) => vec![t],
        Input::Many(v) => v,
    };
    if texts.is_empty() || texts.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "input must hold 1 to {MAX_INPUTS} texts, got {}",
                texts.len()
            ),
        ));
    }
    let model = req.model.clone();
    let (vectors, tokens) = blocking(move || {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens = texts
            .iter()
            .map(|t| rag.embedder.count_tokens(t))
            .sum::<crate::Result<usize>>()?;
        Ok((rag.embedder.embed(&refs)?, tokens))
    })
    .await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                json!(base64::engine::general_purpose::STANDARD
                    .encode(bytemuck::cast_slice::<f32, u8>(v)))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

#[derive(Deserialize)]
pub struct DocumentRequest {
    source: String,
    text: String,
}

pub async fn add_document(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<DocumentRequest>,
) -> Result<Json<Value>, ApiError> {
    let rag = rag(&state)?;
    check_source(&req.source)?;
    let source = req.source.clone();
    let chunks = blocking(move || rag.add(&req.source, &req.text)).await?;
    Ok(Json(
        json!({"object": "document", "source": source, "chunks": chunks}),
    ))
}

#[derive(Deserialize)]
pub struct SourceQuery {
    source: Option<String>,
}

pub async fn delete_document(
    State(state): State<Arc<AppState>>,
    Query(q): Query<SourceQuery>,
) -> Result<Json<Value>, ApiError> {
    let rag = rag(&state)?;
    let Some(source) = q.source else {
        return Err(ApiError::invalid(
            "source",
            "give the document as ?source=…",
        ));
    };
    check_source(&source)?;
    let s = source.clone();
    if !blocking(move || rag.remove(&s)).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the index holds no document {source:?}"),
        ));
    }
    Ok(Json(
        json!({"object": "document", "source": source, "deleted": true}),
    ))
}

/// A source label: 1–512 characters, no control characters.
fn check_source(source: &str) -> Result<(), ApiError> {
    if source.is_empty()
        || source.chars().count() > MAX_SOURCE
        || source.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "source",
            format!(
                "a source is a label of 1 to {MAX_SOURCE} characters without control characters"
            ),
        ));
    }
    Ok(())
}
