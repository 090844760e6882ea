//! `POST /v1/chat/completions` and `POST /v1/completions`: a request becomes
//! prompt tokens and sampling settings, runs in the engine, and comes back
//! as one JSON object or as server-sent events (one `chat.completion.chunk`
//! per piece of text, the finish reason once, the usage last when asked,
//! then `data: [DONE]`).

use crate::infer::engine::Usage;
use crate::serve::error::ApiError;
use crate::serve::generation::{self, Piece, Running, Settings, TokenLogprob};
use crate::serve::openai::{ChatRequest, CompletionRequest, Content, Prompt};
use crate::serve::{parse_json, AppState};
use crate::tokenizer::Message;
use axum::body::Bytes;
use axum::extract::State;
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
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_json(&body)?;
    state.check_model(&req.model)?;
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
    if req.retrieval.is_some() {
        return Err(ApiError::invalid(
            "retrieval",
            "this server has no index: start it with --index DIR --embedder DIR",
        ));
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
    let messages = chat_messages(&req.messages)?;
    let text = state.tokenizer.apply_chat_template(&messages, true)?;
    let prompt = state.tokenizer.encode(&text, false)?;
    let logprobs = want_logprobs.then_some(top as usize);
    let running = generation::start(&state, prompt, &settings, logprobs)?;
    respond(Api::Chat, req.model, running, &settings, logprobs.is_some()).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_json(&body)?;
    state.check_model(&req.model)?;
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
    let running = generation::start(&state, prompt, &settings, logprobs)?;
    respond(
        Api::Completion,
        req.model,
        running,
        &settings,
        logprobs.is_some(),
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

async fn respond(
    api: Api,
    model: String,
    mut running: Running,
    settings: &Settings,
    logprobs: bool,
) -> Result<Response, ApiError> {
    let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
    let ids = Ids {
        id: format!("{prefix}-{:032x}", rand::random::<u128>()),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model,
    };
    if settings.stream {
        return Ok(stream(api, ids, running, settings.include_usage, logprobs).into_response());
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
                let choice = match api {
                    Api::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs.then(|| chat_logprobs(&tokens)),
                        "finish_reason": reason,
                    }),
                    Api::Completion => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": logprobs.then(|| completion_logprobs(&tokens, 0)),
                        "finish_reason": reason,
                    }),
                };
                let object = if api == Api::Chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Ok(Json(json!({
                    "id": ids.id,
                    "object": object,
                    "created": ids.created,
                    "model": ids.model,
                    "choices": [choice],
                    "usage": usage_json(&usage),
                }))
                .into_response());
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(ApiError::bad_request(
                    "the generation ended without a result",
                ))
            }
        }
    }
}

fn stream(
    api: Api,
    ids: Ids,
    running: Running,
    include_usage: bool,
    logprobs: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let object = if api == Api::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": ids.id,
            "object": object,
            "created": ids.created,
            "model": ids.model,
            "choices": choices,
        });
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        SseEvent::default().data(c.to_string())
    };
    // State: the running request, whether the role chunk went out, the
    // text offset (completion logprobs), and whether the stream is over.
    let init = (running, false, 0usize, false);
    let events = futures_util::stream::unfold(
        init,
        move |(mut run, mut began, mut offset, over)| {
            let chunk = chunk.clone();
            async move {
                if over {
                    return None;
                }
                let mut out: Vec<SseEvent> = Vec::new();
                if api == Api::Chat && !began {
                    began = true;
                    out.push(chunk(
                    json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                    None,
                ));
                }
                let mut over = false;
                match run.next().await {
                    Some(Ok(Piece::Text(t, lp))) => {
                        let choice = match api {
                            Api::Chat => json!({
                                "index": 0,
                                "delta": {"content": t},
                                "logprobs": logprobs.then(|| chat_logprobs(&lp)),
                                "finish_reason": null,
                            }),
                            Api::Completion => json!({
                                "index": 0,
                                "text": t,
                                "logprobs": logprobs.then(|| completion_logprobs(&lp, offset)),
                                "finish_reason": null,
                            }),
                        };
                        offset += t.len();
                        out.push(chunk(json!([choice]), None));
                    }
                    Some(Ok(Piece::Done(reason, usage))) => {
                        let choice = match api {
                            Api::Chat => {
                                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason})
                            }
                            Api::Completion => {
                                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason})
                            }
                        };
                        out.push(chunk(json!([choice]), None));
                        if include_usage {
                            out.push(chunk(json!([]), Some(usage_json(&usage))));
                        }
                        out.push(SseEvent::default().data("[DONE]"));
                        over = true;
                    }
                    Some(Err(e)) => {
                        // Mid-stream the status is sent already: the error goes
                        // in the stream, as OpenAI does.
                        out.push(SseEvent::default().data(e.body().to_string()));
                        out.push(SseEvent::default().data("[DONE]"));
                        over = true;
                    }
                    None => over = true,
                }
                let items = futures_util::stream::iter(out.into_iter().map(Ok));
                Some((items, (run, began, offset, over)))
            }
        },
    );
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
