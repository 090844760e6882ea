//! `engine serve`: OpenAI's HTTP API over the inference engine.
//!
//! axum on tokio parses and checks requests, applies the chat template,
//! tokenizes, and sends each request to the engine thread
//! (`infer::engine::spawn`) with a channel for its tokens; it turns the
//! tokens back into text, JSON and server-sent events. It never touches a
//! tensor. A client that goes away drops its channel, which cancels its
//! request in the engine. A semaphore bounds the requests in the server
//! (running and queued); past it, a request gets 429.

pub mod adapters;
pub mod chat;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod openai;
pub mod rag;

use crate::infer::thread::EngineHandle;
use crate::model::config::LlamaConfig;
use crate::tokenizer::Tokenizer;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use error::ApiError;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// The largest request body read (a long RAG prompt fits many times over).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// The name clients give as `model` for the base model.
    pub model_name: String,
    pub stop_ids: Vec<u32>,
    pub api_key: Option<String>,
    /// Requests admitted (running or queued).
    pub permits: Arc<Semaphore>,
    /// When the server started (Unix seconds): the models' `created`.
    pub started: u64,
    pub model_config: LlamaConfig,
    /// The adapters loaded, by name.
    pub adapters: Mutex<BTreeSet<String>>,
    /// Where `POST /v1/adapters` loads from (None: it is refused).
    pub adapter_dir: Option<PathBuf>,
    /// The embedder and the index (`--index`, `--embedder`).
    pub rag: Option<Arc<rag::Rag>>,
}

impl AppState {
    /// The adapter a request's `model` names (None: the base model); 404
    /// for a model this server does not serve.
    pub fn check_model(&self, name: &str) -> Result<Option<String>, ApiError> {
        if name == self.model_name {
            return Ok(None);
        }
        if self.adapters.lock().unwrap().contains(name) {
            return Ok(Some(name.to_string()));
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model {name:?} does not exist here; this server has {:?} (GET /v1/models lists them)",
                self.model_name
            ),
        )
        .with_code("model_not_found"))
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/models", get(models))
        .route("/v1/adapters", post(adapters::post))
        .route("/v1/embeddings", post(rag::embeddings))
        .route(
            "/v1/documents",
            post(rag::add_document).delete(rag::delete_document),
        )
        .route(
            "/v1/adapters/{name}",
            axum::routing::delete(adapters::delete),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics::render))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint").with_code("unknown_url")
        })
        .with_state(state)
}

/// With an API key set, every /v1 request must carry
/// `Authorization: Bearer KEY`.
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send Authorization: Bearer KEY",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let model = |id: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": state.started,
            "owned_by": "engine",
            "parent": parent,
        })
    };
    let mut data = vec![model(&state.model_name, None)];
    for name in state.adapters.lock().unwrap().iter() {
        data.push(model(name, Some(&state.model_name)));
    }
    if let Some(rag) = &state.rag {
        data.push(model(&rag.name, None));
    }
    Json(json!({"object": "list", "data": data}))
}

/// A request body read as JSON of type T: one over `MAX_BODY_BYTES` is a
/// 413, malformed JSON or a wrong type a 400 saying what and where, both as
/// OpenAI error objects (axum's own extractors answer in plain text).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over {MAX_BODY_BYTES} bytes"),
                )
            })?;
        // The path names the field that is wrong ("messages[0].content").
        let mut json = serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(&mut json)
            .map(JsonBody)
            .map_err(|e| match e.path().to_string().as_str() {
                "." | "?" => {
                    ApiError::bad_request(format!("the request body is not valid: {}", e.inner()))
                }
                path => ApiError::bad_request(format!(
                    "the request body is not valid: {path}: {}",
                    e.inner()
                )),
            })
    }
}
