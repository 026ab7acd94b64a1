//! Model files: where they come from (local dir, GGUF, hub) and how their tensors are read.

pub mod gguf;
pub mod linear;
pub mod lora;
pub mod packaged;
pub mod params;
pub mod source;
pub mod store;

pub use gguf::GgufFile;
pub use linear::{AdapterMode, Embedding, Linear, LinearWeight};
pub use lora::{Lora, LoraConfig, TargetModules};
pub use params::{FreshInit, Parameters};
pub use source::ModelSource;
pub use store::WeightStore;
