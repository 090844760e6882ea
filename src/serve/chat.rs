//! `POST /v1/chat/completions` and `POST /v1/completions`: a request becomes
//! prompt tokens and sampling settings, runs in the engine, and comes back
//! as one JSON object or as server-sent events (one `chat.completion.chunk`
//! per piece of text, the finish reason once, the usage last when asked,
//! then `data: [DONE]`).

use crate::infer::engine::Usage;
use crate::rag::answer::Passage;
use crate::serve::error::ApiError;
use crate::serve::generation::{self, Piece, Running, Settings, TokenLogprob};
use crate::serve::openai::{ChatRequest, CompletionRequest, Content, Prompt};
use crate::serve::{rag, AppState, JsonBody};
use crate::tokenizer::Message;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// The most alternatives per token `top_logprobs` may ask for (as OpenAI).
const MAX_TOP_LOGPROBS: u32 = 20;
/// The same for the completions API's `logprobs`.
const MAX_COMPLETION_LOGPROBS: u32 = 5;
/// OpenAI's default `max_tokens` for completions.
const COMPLETION_MAX_TOKENS: u32 = 16;

/// Chat or completion: the two shapes of the same generation.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completion,
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let adapter = state.check_model(&req.model)?;
    let mut settings = Settings::from_request(&req.sampling)?;
    if let Some(n) = req.max_completion_tokens {
        if n == 0 {
            return Err(ApiError::invalid(
                "max_completion_tokens",
                "max_completion_tokens must be at least 1",
            ));
        }
        settings.max_tokens = Some(n as usize);
    }
    let top = req.top_logprobs.unwrap_or(0);
    if top > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}"),
        ));
    }
    let want_logprobs = req.logprobs.unwrap_or(false);
    if req.top_logprobs.is_some() && !want_logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    let mut messages = chat_messages(&req.messages)?;
    let mut passages = None;
    if let Some(retrieval) = &req.retrieval {
        let Some(rag) = state.rag.clone() else {
            return Err(ApiError::invalid(
                "retrieval",
                "this server has no index: start it with --index DIR --embedder DIR",
            ));
        };
        let k = rag::check_k(retrieval.k)?;
        let question = messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let found = tokio::task::spawn_blocking(move || rag.retrieve(&question, k))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        messages = rag::retrieval_messages(&messages, &found)?;
        passages = Some(found);
    }
    let text = state.tokenizer.apply_chat_template(&messages, true)?;
    let prompt = state.tokenizer.encode(&text, false)?;
    let logprobs = want_logprobs.then_some(top as usize);
    let running = generation::start(&state, prompt, &settings, logprobs, adapter)?;
    respond(
        Api::Chat,
        req.model,
        running,
        &settings,
        logprobs.is_some(),
        passages,
    )
    .await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let adapter = state.check_model(&req.model)?;
    let mut settings = Settings::from_request(&req.sampling)?;
    settings.max_tokens = Some(
        settings
            .max_tokens
            .unwrap_or(COMPLETION_MAX_TOKENS as usize),
    );
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    let prompt = match req.prompt {
        Prompt::Text(t) => t,
        Prompt::List(mut v) if v.len() == 1 => v.remove(0),
        Prompt::List(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("give one prompt per request, not {}", v.len()),
            ))
        }
    };
    let top = req.logprobs.unwrap_or(0);
    if top > MAX_COMPLETION_LOGPROBS {
        return Err(ApiError::invalid(
            "logprobs",
            format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {top}"),
        ));
    }
    let prompt = state.tokenizer.encode(&prompt, true)?;
    let logprobs = req.logprobs.map(|n| n as usize);
    let running = generation::start(&state, prompt, &settings, logprobs, adapter)?;
    respond(
        Api::Completion,
        req.model,
        running,
        &settings,
        logprobs.is_some(),
        None,
    )
    .await
}

/// The messages as the chat template takes them: string contents, the text
/// parts of a list joined.
fn chat_messages(messages: &[crate::serve::openai::ChatMessage]) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages is empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant") {
                return Err(ApiError::invalid(
                    "messages",
                    format!("messages[{i}].role must be system, user or assistant, got {:?}", m.role),
                ));
            }
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    "messages",
                                    format!("messages[{i}]: content parts of type {kind:?} are not supported"),
                                ))
                            }
                        }
                    }
                    text
                }
                Content::None => String::new(),
            };
            // Templates know system, user and assistant.
            let role = if m.role == "developer" { "system" } else { &m.role };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

struct Ids {
    id: String,
    created: u64,
    model: String,
}

/// What one response carries besides the text: the request's shape and
/// options, and the retrieved passages of a retrieval chat.
struct Shape {
    api: Api,
    ids: Ids,
    logprobs: bool,
    include_usage: bool,
    passages: Option<Vec<Passage>>,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completion, _) => "text_completion",
        }
    }

    /// The response object around `choices`.
    fn body(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.ids.id,
            "object": self.object(chunk),
            "created": self.ids.created,
            "model": self.ids.model,
            "choices": choices,
        })
    }

    /// One choice: a message (or a stream's delta) with `text`.
    fn choice(
        &self,
        chunk: bool,
        text: &str,
        tokens: &[TokenLogprob],
        offset: usize,
        finish: Option<&str>,
    ) -> Value {
        let logprobs = self.logprobs.then(|| match self.api {
            Api::Chat => chat_logprobs(tokens),
            Api::Completion => completion_logprobs(tokens, offset),
        });
        match (self.api, chunk) {
            (Api::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            (Api::Chat, true) => {
                let delta = if finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            (Api::Completion, _) => json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    /// A retrieval answer's sources: the passages it cites, and all retrieved.
    fn add_sources(&self, body: &mut Value, answer: &str) {
        if let Some(passages) = &self.passages {
            body["citations"] = rag::citations(answer, passages);
            body["passages"] = passages.iter().map(rag::passage_json).collect();
        }
    }
}

async fn respond(
    api: Api,
    model: String,
    mut running: Running,
    settings: &Settings,
    logprobs: bool,
    passages: Option<Vec<Passage>>,
) -> Result<Response, ApiError> {
    let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
    let shape = Shape {
        api,
        ids: Ids {
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            model,
        },
        logprobs,
        include_usage: settings.include_usage,
        passages,
    };
    if settings.stream {
        return Ok(stream(shape, running).into_response());
    }
    let mut text = String::new();
    let mut tokens: Vec<TokenLogprob> = Vec::new();
    loop {
        match running.next().await {
            Some(Ok(Piece::Text(t, lp))) => {
                text.push_str(&t);
                tokens.extend(lp);
            }
            Some(Ok(Piece::Done(reason, usage))) => {
                let choice = shape.choice(false, &text, &tokens, 0, Some(reason));
                let mut body = shape.body(false, json!([choice]));
                body["usage"] = usage_json(&usage);
                shape.add_sources(&mut body, &text);
                return Ok(Json(body).into_response());
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the generation ended without a result",
                ))
            }
        }
    }
}

/// The server-sent events of a streamed response: a chat opens with the
/// assistant's role, each piece of text is a chunk, the finish reason comes
/// once (with the citations of a retrieval answer), the usage last when
/// asked (with no choices), then `[DONE]`.
fn stream(
    shape: Shape,
    running: Running,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let shape = Arc::new(shape);
    let event = |body: Value| SseEvent::default().data(body.to_string());
    // State: the running request, the text so far, whether the stream began
    // and whether it is over.
    let init = (running, String::new(), false, false);
    let events = futures_util::stream::unfold(init, move |(mut run, mut text, began, over)| {
        let shape = shape.clone();
        async move {
            if over {
                return None;
            }
            let mut out: Vec<SseEvent> = Vec::new();
            let with_usage = |mut body: Value, usage: Value| {
                if shape.include_usage {
                    body["usage"] = usage;
                }
                body
            };
            if shape.api == Api::Chat && !began {
                let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                out.push(event(with_usage(shape.body(true, role), Value::Null)));
            }
            let mut over = false;
            match run.next().await {
                Some(Ok(Piece::Text(t, lp))) => {
                    let choice = shape.choice(true, &t, &lp, text.len(), None);
                    text.push_str(&t);
                    out.push(event(with_usage(
                        shape.body(true, json!([choice])),
                        Value::Null,
                    )));
                }
                Some(Ok(Piece::Done(reason, usage))) => {
                    let choice = shape.choice(true, "", &[], text.len(), Some(reason));
                    let mut last = with_usage(shape.body(true, json!([choice])), Value::Null);
                    shape.add_sources(&mut last, &text);
                    out.push(event(last));
                    if shape.include_usage {
                        out.push(event(with_usage(
                            shape.body(true, json!([])),
                            usage_json(&usage),
                        )));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    over = true;
                }
                Some(Err(e)) => {
                    // Mid-stream the status is sent already: the error goes
                    // in the stream, as OpenAI does.
                    out.push(event(e.body()));
                    out.push(SseEvent::default().data("[DONE]"));
                    over = true;
                }
                None => over = true,
            }
            let items = futures_util::stream::iter(out.into_iter().map(Ok));
            Some((items, (run, text, true, over)))
        }
    });
    Sse::new(futures_util::StreamExt::flatten(events))
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.token, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(s, lp)| entry(s, *lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// The completions API's shape: parallel lists, text offsets from
/// `offset` (the text already sent).
fn completion_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.token.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|t| t.top.iter().map(|(s, lp)| (s.clone(), json!(lp))).collect::<serde_json::Map<_, _>>())
            .collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}
