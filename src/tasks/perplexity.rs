//! Perplexity of a text: exp(mean negative log-likelihood) over non-overlapping windows.

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::models::attention::log_softmax;
use crate::models::{LanguageModel, LogitsWanted, SeqInput};

#[derive(Clone, Debug, Serialize)]
pub struct PerplexityReport {
    pub perplexity: f64,
    /// Tokens in the text.
    pub tokens: usize,
    /// Tokens that were predicted (every window's first token is context only).
    pub scored: usize,
    /// Mean negative log-likelihood in nats.
    pub mean_nll: f64,
}

/// Score `text` in windows of `ctx` tokens (no BOS added); `on_window(done, total)` reports progress.
pub fn perplexity(
    lm: &LanguageModel,
    text: &str,
    ctx: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<PerplexityReport> {
    if ctx < 2 {
        return Err(Error::invalid(format!(
            "--ctx must be at least 2, got {ctx}"
        )));
    }
    let context = lm.model.info().context_length;
    if ctx > context {
        return Err(Error::invalid(format!(
            "--ctx {ctx} exceeds the model's context window of {context}"
        )));
    }
    let ids = lm.tokenizer.encode(text, false)?;
    let windows: Vec<&[u32]> = ids.chunks(ctx).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(Error::invalid(format!(
            "the text has {} tokens: at least 2 are needed",
            ids.len()
        )));
    }
    let mut nll = 0.0f64;
    let mut scored = 0usize;
    for (i, window) in windows.iter().enumerate() {
        let mut cache = lm.model.new_cache();
        let logits = lm.model.forward(&mut [SeqInput {
            tokens: window,
            cache: &mut cache,
            logits: LogitsWanted::All,
        }])?;
        nll += window_nll(&logits, window)?;
        scored += window.len() - 1;
        on_window(i + 1, windows.len());
    }
    let mean_nll = nll / scored as f64;
    Ok(PerplexityReport {
        perplexity: mean_nll.exp(),
        tokens: ids.len(),
        scored,
        mean_nll,
    })
}

/// Sum of -log p(window[i+1] | window[..=i]) given logits for every position of the window.
pub fn window_nll(logits: &Tensor, window: &[u32]) -> Result<f64> {
    let t = window.len();
    let logprobs = log_softmax(&logits.narrow(0, 0, t - 1)?)?;
    let targets = Tensor::new(&window[1..], logits.device())?.unsqueeze(1)?;
    let picked = logprobs
        .gather(&targets, 1)?
        .to_dtype(candle_core::DType::F64)?;
    Ok(-picked.sum_all()?.to_scalar::<f64>()?)
}
