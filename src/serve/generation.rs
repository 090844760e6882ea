//! One request's generation as the API sees it: sampling fields checked
//! and turned into an engine `Request`, then the engine's token events
//! turned into text pieces, with stop strings applied.
//!
//! Text is decoded from all the tokens so far each time (a token may carry
//! half a character, and a tokenizer may merge across tokens), and held
//! back while it ends in an incomplete character or in what could be the
//! start of a stop string, so a stream never shows text that a stop string
//! later cuts.

use crate::backend::sample::SamplerConfig;
use crate::infer::engine::{Event, FinishReason, Request, Usage};
use crate::serve::error::ApiError;
use crate::serve::openai::{Sampling, Stop};
use crate::serve::AppState;
use crate::tokenizer::Tokenizer;
use axum::http::StatusCode;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// The most stop strings a request may give (as OpenAI).
const MAX_STOPS: usize = 4;

/// Checked sampling settings of one request.
pub struct Settings {
    pub sampler: SamplerConfig,
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Settings {
    /// Checks the fields; an absent temperature is OpenAI's default, 1.
    pub fn from_request(s: &Sampling) -> Result<Self, ApiError> {
        if let Some(n) = s.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!("n must be 1 (engine returns one choice per request), got {n}"),
                ));
            }
        }
        let temperature = s.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        if s.max_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let stops = match &s.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {MAX_STOPS} stop strings, got {}", stops.len()),
            ));
        }
        if stops.iter().any(|s| s.is_empty()) {
            return Err(ApiError::invalid("stop", "a stop string is empty"));
        }
        if s.stream_options.is_some() && !s.stream {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        Ok(Settings {
            sampler: SamplerConfig {
                temperature,
                top_k: s.top_k.unwrap_or(0) as usize,
                top_p,
                seed: s.seed.unwrap_or_else(rand::random),
            },
            max_tokens: s.max_tokens.map(|n| n as usize),
            stops,
            stream: s.stream,
            include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
            ignore_eos: s.ignore_eos,
        })
    }
}

/// A token's log-probability and its alternatives, as text.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

pub enum Piece {
    /// New text, and the tokens that brought it (with logprobs when asked).
    Text(String, Vec<TokenLogprob>),
    Done(&'static str, Usage),
}

/// A request in the engine: its events come in through `rx`; dropping this
/// cancels it (the engine frees its blocks at its next token).
pub struct Running {
    rx: mpsc::UnboundedReceiver<Event>,
    _permit: OwnedSemaphorePermit,
    tokenizer: Arc<Tokenizer>,
    stops: Vec<String>,
    ids: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    sent: usize,
    /// Logprobs of the tokens whose text is not handed out yet.
    pending: Vec<TokenLogprob>,
    /// Pieces ready to hand out (the last text and the end).
    ready: VecDeque<Piece>,
    prompt_tokens: usize,
    cached_tokens: usize,
    done: bool,
}

/// Admits a request (429 when the queue is full) and sends it to the engine.
pub fn start(
    state: &AppState,
    prompt: Vec<u32>,
    settings: &Settings,
    logprobs: Option<usize>,
    adapter: Option<String>,
) -> Result<Running, ApiError> {
    let max_len = state.engine.max_len;
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    if prompt.len() >= max_len {
        return Err(ApiError::bad_request(format!(
            "the prompt has {} tokens; this server's context holds at most {} prompt tokens",
            prompt.len(),
            max_len - 1
        ))
        .with_code("context_length_exceeded"));
    }
    let permit = state.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the server's request queue is full; retry later",
        )
    })?;
    // Past the context the engine stops with "length" anyway.
    let room = max_len - prompt.len();
    let max_tokens = settings.max_tokens.unwrap_or(room).min(room);
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let request = Request {
        prompt,
        max_tokens,
        sampler: settings.sampler,
        stop_ids: if settings.ignore_eos {
            Vec::new()
        } else {
            state.stop_ids.clone()
        },
        logprobs,
        adapter,
    };
    state
        .engine
        .submit(request, Box::new(move |e| tx.send(e).is_ok()))?;
    Ok(Running {
        rx,
        _permit: permit,
        tokenizer: state.tokenizer.clone(),
        stops: settings.stops.clone(),
        ids: Vec::new(),
        sent: 0,
        pending: Vec::new(),
        ready: VecDeque::new(),
        prompt_tokens,
        cached_tokens: 0,
        done: false,
    })
}

impl Running {
    /// The next piece of text or the end; None after the end.
    pub async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Some(Ok(piece));
            }
            if self.done {
                return None;
            }
            let Some(event) = self.rx.recv().await else {
                self.done = true;
                return Some(Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the inference engine stopped",
                )));
            };
            let step = match event {
                Event::Cached(n) => {
                    self.cached_tokens = n;
                    Ok(())
                }
                Event::Token(t) => self.on_token(t.id, t.logprob),
                Event::Finished(reason, usage) => self.on_finish(reason, usage),
                Event::Failed(msg) => {
                    self.done = true;
                    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg))
                }
            };
            if let Err(e) = step {
                self.done = true;
                return Some(Err(e));
            }
        }
    }

    fn on_token(
        &mut self,
        id: u32,
        logprob: Option<(f32, Vec<(u32, f32)>)>,
    ) -> Result<(), ApiError> {
        self.ids.push(id);
        if let Some((logprob, top)) = logprob {
            let top = top
                .into_iter()
                .map(|(id, lp)| (self.token_text(id), lp))
                .collect();
            let token = self.token_text(id);
            self.pending.push(TokenLogprob {
                token,
                logprob,
                top,
            });
        }
        let text = self.tokenizer.decode(&self.ids)?;
        if let Some(cut) = find_stop(&text, self.sent, &self.stops) {
            // Closing the channel cancels the request in the engine.
            self.rx.close();
            self.push_text(&text, cut);
            let usage = Usage {
                prompt_tokens: self.prompt_tokens,
                cached_tokens: self.cached_tokens,
                completion_tokens: self.ids.len(),
            };
            self.ready.push_back(Piece::Done("stop", usage));
            self.done = true;
        } else if !text.ends_with('\u{FFFD}') {
            self.push_text(&text, text.len() - held_back(&text, &self.stops));
        }
        Ok(())
    }

    fn on_finish(&mut self, reason: FinishReason, usage: Usage) -> Result<(), ApiError> {
        let text = self.tokenizer.decode(&self.ids)?;
        self.push_text(&text, text.len());
        let reason = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        self.ready.push_back(Piece::Done(reason, usage));
        self.done = true;
        Ok(())
    }

    /// Hands out text[sent..end] with the pending logprobs, if either is
    /// non-empty.
    fn push_text(&mut self, text: &str, end: usize) {
        let end = end.max(self.sent);
        if end == self.sent && self.pending.is_empty() {
            return;
        }
        let piece = text[self.sent..end].to_string();
        self.sent = end;
        self.ready
            .push_back(Piece::Text(piece, std::mem::take(&mut self.pending)));
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }
}

/// Where the first stop string in `text` begins, looking only where one
/// could end in text not handed out yet (past `sent`).
fn find_stop(text: &str, sent: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter_map(|s| {
            let mut from = sent.saturating_sub(s.len() - 1);
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..].find(s.as_str()).map(|i| from + i)
        })
        .min()
}

/// Bytes at the end of `text` to hold back: the longest end that is the
/// start of a stop string (it may yet become one), kept whole characters.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (k, _) in s.char_indices().skip(1) {
            if k > hold && text.ends_with(&s[..k]) {
                hold = k;
            }
        }
    }
    hold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stop_strings_are_found_across_pieces_and_the_earliest_wins() {
        let s = stops(&["END", "\n\n"]);
        assert_eq!(find_stop("abc EN", 0, &s), None);
        assert_eq!(find_stop("abc END more", 6, &s), Some(4));
        assert_eq!(find_stop("a\n\nb END", 0, &s), Some(1));
        // Before `sent` minus a stop's length nothing is searched again.
        assert_eq!(find_stop("END and more", 12, &s), None);
    }

    #[test]
    fn the_start_of_a_stop_string_is_held_back() {
        let s = stops(&["END", "é!"]);
        assert_eq!(held_back("the E", &s), 1);
        assert_eq!(held_back("the EN", &s), 2);
        assert_eq!(held_back("the ENX", &s), 0);
        assert_eq!(held_back("café", &s), "é".len());
        assert_eq!(held_back("anything", &[]), 0);
    }
}
