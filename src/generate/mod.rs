//! Text generation: sampling, stop rules, and the decode loop over a `CausalLM`.

pub mod beam;
pub mod json_mode;
pub mod sampling;
pub mod sequence;

use std::time::Instant;

use serde::Serialize;

pub use sampling::{LogprobEntry, Sampler, SamplingParams, TokenLogprob};
pub use sequence::{FinishReason, GenerationParams, Sequence, StepOutput};

use crate::error::Result;
use crate::models::{LanguageModel, LogitsWanted, SeqInput};

/// Prompts are fed in chunks of this many tokens so attention scratch stays bounded.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Timings {
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// The result of one generation.
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    pub text: String,
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<LogprobEntry>>,
}

/// Generate a continuation of `prompt_ids`, calling `on_text` with each piece of final text.
pub fn generate(
    lm: &LanguageModel,
    prompt_ids: Vec<u32>,
    params: &GenerationParams,
    mut on_text: impl FnMut(&str),
) -> Result<Completion> {
    let model = lm.model.as_ref();
    let mut seq = Sequence::new(model, &lm.tokenizer, prompt_ids, params.clone())?;
    let prompt_len = seq.prompt_ids().len();
    let start = Instant::now();
    // Prefill all but the prompt's last chunk without computing logits.
    while seq.pending_len() > PREFILL_CHUNK {
        let tokens = seq.next_input(PREFILL_CHUNK).to_vec();
        model.forward(&mut [SeqInput {
            tokens: &tokens,
            cache: &mut seq.cache,
            logits: LogitsWanted::Last,
        }])?;
        seq.consumed(tokens.len());
    }
    let mut prefill_seconds = 0.0;
    let mut decode_start = start;
    let mut steps = 0usize;
    loop {
        let tokens = seq.next_input(PREFILL_CHUNK).to_vec();
        let logits = model.forward(&mut [SeqInput {
            tokens: &tokens,
            cache: &mut seq.cache,
            logits: LogitsWanted::Last,
        }])?;
        let mut row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let step = seq.accept(tokens.len(), &mut row, &lm.tokenizer)?;
        if steps == 0 {
            prefill_seconds = start.elapsed().as_secs_f64();
            decode_start = Instant::now();
        }
        steps += 1;
        if !step.text_delta.is_empty() {
            on_text(&step.text_delta);
        }
        if step.finished.is_some() {
            break;
        }
    }
    let decode_seconds = decode_start.elapsed().as_secs_f64();
    // The first sampled token comes from the prefill; each later one costs one decode step.
    let decode_steps = steps.saturating_sub(1);
    Ok(Completion {
        text: seq.text().to_string(),
        prompt_token_ids: seq.prompt_ids().to_vec(),
        token_ids: seq.generated_ids().to_vec(),
        finish_reason: seq.finished().unwrap_or(FinishReason::Length),
        usage: Usage {
            prompt_tokens: prompt_len,
            completion_tokens: seq.generated_ids().len(),
        },
        timings: Timings {
            prefill_tokens_per_second: rate(prompt_len, prefill_seconds),
            decode_tokens_per_second: rate(decode_steps, decode_seconds),
            prefill_seconds,
            decode_seconds,
        },
        logprobs: params.logprobs.map(|_| seq.logprobs().to_vec()),
    })
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}
