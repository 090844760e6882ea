//! LoRA adapters while serving: `--adapter NAME=DIR` at startup, and
//! `POST /v1/adapters {"name"}` / `DELETE /v1/adapters/NAME` at run time.
//!
//! A request names an adapter, never a path: it loads from
//! `--adapter-dir/NAME`, and the name may hold only letters, digits, `.`,
//! `_` and `-` (no `..`, no `/`). The folder and its files must resolve to
//! inside `--adapter-dir`, so a symbolic link cannot lead elsewhere.

use crate::model::lora::LoraAdapter;
use crate::serve::error::ApiError;
use crate::serve::{AppState, JsonBody};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Deserialize)]
pub struct LoadRequest {
    name: String,
}

/// Loads `dir` as adapter `name` and tells the engine (blocking: call it
/// from a blocking thread or before serving).
pub fn load(state: &AppState, name: &str, dir: &Path) -> crate::Result<()> {
    let adapter = LoraAdapter::load(dir, &state.model_config)?;
    state.engine.load_adapter(name, adapter)?;
    state.adapters.lock().unwrap().insert(name.to_string());
    Ok(())
}

pub async fn post(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<LoadRequest>,
) -> Result<Json<Value>, ApiError> {
    let name = req.name;
    check_name(&name, &state.model_name)?;
    let Some(root) = state.adapter_dir.clone() else {
        return Err(ApiError::bad_request(
            "this server loads no adapters at run time: start it with --adapter-dir DIR",
        ));
    };
    let dir = inside(&root, &name)?;
    let s = state.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || load(&s, &n, &dir))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::bad_request(format!("cannot load adapter {name:?}: {e}")))?;
    Ok(Json(json!({
        "id": name,
        "object": "model",
        "created": state.started,
        "owned_by": "engine",
        "parent": state.model_name,
    })))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    if !state.adapters.lock().unwrap().remove(&name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no adapter {name:?} is loaded"),
        )
        .with_code("model_not_found"));
    }
    let s = state.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || s.engine.unload_adapter(&n))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(
        json!({"id": name, "object": "model", "deleted": true}),
    ))
}

/// An adapter's name: a file name of plain characters, not the base's.
pub fn check_name(name: &str, base: &str) -> Result<(), ApiError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 128 || name.starts_with('.') || !name.chars().all(plain) {
        return Err(ApiError::invalid(
            "name",
            format!("an adapter name is 1–128 letters, digits, '.', '_' or '-', not starting with '.'; got {name:?}"),
        ));
    }
    if name == base {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} is the base model's name"),
        ));
    }
    Ok(())
}

/// `root/name`, when it and the files the adapter is read from resolve to
/// inside `root`.
fn inside(root: &Path, name: &str) -> Result<PathBuf, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no adapter folder {name:?} in the server's adapter folder"),
        )
    };
    let root = root.canonicalize().map_err(|_| not_found())?;
    let dir = root.join(name).canonicalize().map_err(|_| not_found())?;
    let escapes = |p: &Path| !p.starts_with(&root);
    if escapes(&dir) {
        return Err(ApiError::bad_request(format!(
            "the adapter folder {name:?} leads outside the server's adapter folder"
        )));
    }
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        if let Ok(p) = dir.join(file).canonicalize() {
            if escapes(&p) {
                return Err(ApiError::bad_request(format!(
                    "{name}/{file} leads outside the server's adapter folder"
                )));
            }
        }
    }
    Ok(dir)
}
