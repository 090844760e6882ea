//! Model definitions and the file formats their weights come in.

pub mod adapter;
pub mod batch;
pub mod bert;
pub mod config;
pub mod folder;
pub mod gguf;
pub mod gguf_model;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod llama;
pub mod llama_gguf;
pub mod lora;
pub mod quant_types;
pub mod train_step;
pub mod weight;
pub mod weights;
