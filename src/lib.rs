//! wordloom: load transformer checkpoints (Hugging Face layouts and GGUF) and run them —
//! generation, chat, perplexity — from one Rust library and binary.
//!
//! Layers, top to bottom (nothing below imports what is above):
//! `serve` -> `remote` -> `train` -> `tasks`/`generate` -> `models` -> `tokenizer` -> `weights`
//! -> `autograd` -> `kernels`.

pub mod autograd;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod models;
pub mod remote;
pub mod serve;
pub mod tasks;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use models::{CausalLM, LanguageModel, LoadOptions};
