//! Task pipelines over loaded models.

pub mod classify;
pub mod embed;
pub mod encoder;
pub mod inputs;
pub mod ner;
pub mod perplexity;
pub mod qa;
pub mod search;
pub mod translate;
