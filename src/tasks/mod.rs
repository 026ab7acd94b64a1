//! Task pipelines over loaded models.

pub mod perplexity;
