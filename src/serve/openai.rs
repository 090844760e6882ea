//! The request bodies of OpenAI's API that engine serves, as serde reads
//! them. Fields engine does not use (`user`, `presence_penalty`, …) are
//! ignored, as OpenAI-compatible servers do; fields it reads are typed, so a
//! wrong type is a 400 naming the field.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Return each token's log-probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many alternatives per token (0–20).
    pub top_logprobs: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    /// Answer from the index's passages (an engine extension).
    pub retrieval: Option<Retrieval>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Content,
}

/// A message's content: a string, or a list of parts of which engine reads
/// the text ones.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
    #[default]
    None,
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Retrieval {
    /// Passages to retrieve.
    pub k: Option<usize>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Return the log-probabilities of each token and of this many
    /// alternatives (0–5).
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
}

/// A completion prompt: a string, or a list holding one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    List(Vec<String>),
}

/// What chat and completion requests share.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Sample among the k most likely tokens (an extension; 0 or absent: all).
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    /// Keep generating past the end-of-sequence token (an extension, as in
    /// vLLM and llama.cpp: benchmarks that want a fixed output length).
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}
