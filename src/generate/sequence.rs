//! One sequence being generated: its cache, sampler, stop rules and text so far. The CLI drives
//! one of these; the server's scheduler drives many in one batch.

use std::collections::HashMap;

use serde::Serialize;

use super::json_mode::{mask_logits, mask_to_closing, JsonPrefix};
use super::sampling::{logprob_entry, LogprobEntry, Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::models::{CausalLM, KvCache};
use crate::tokenizer::Tokenizer;

/// What a generation request asks for, besides the prompt.
#[derive(Clone, Debug)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-sequence tokens (benchmarks, parity tests).
    pub ignore_eos: bool,
    /// Constrain sampling to one JSON object and stop when it closes.
    pub json_mode: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
            json_mode: false,
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_tokens == 0 {
            return Err(Error::invalid("max tokens must be at least 1"));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::invalid("stop strings must not be empty"));
        }
        Ok(())
    }
}

/// Why generation ended, as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// max_tokens or the context window.
    Length,
}

/// What one step produced.
#[derive(Debug)]
pub struct StepOutput {
    pub token_id: u32,
    /// Text that became final with this step (may be empty while a character or a possible stop string is incomplete).
    pub text_delta: String,
    pub logprobs: Option<LogprobEntry>,
    pub finished: Option<FinishReason>,
}

pub struct Sequence {
    pub cache: KvCache,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// Ids fed at the next forward: the prompt (or what is left of it), then each sampled token.
    pending: Vec<u32>,
    counts: HashMap<u32, usize>,
    sampler: Sampler,
    params: GenerationParams,
    eos_ids: Vec<u32>,
    context_length: usize,
    /// Generated text already handed out.
    emitted: String,
    finished: Option<FinishReason>,
    logprobs: Vec<LogprobEntry>,
    /// JSON mode: the document so far, how many bytes of the generated text it has seen, and
    /// whether the budget forced closing it (once started, closing continues to the end).
    json: Option<(JsonPrefix, usize, bool)>,
}

impl Sequence {
    pub fn new(
        model: &dyn CausalLM,
        tokenizer: &Tokenizer,
        prompt: Vec<u32>,
        params: GenerationParams,
    ) -> Result<Self> {
        params.validate()?;
        let context_length = model.info().context_length;
        if prompt.is_empty() {
            return Err(Error::invalid(
                "the prompt is empty (it encodes to no tokens)",
            ));
        }
        if prompt.len() >= context_length {
            return Err(Error::ContextOverflow {
                prompt_tokens: prompt.len(),
                context: context_length,
            });
        }
        Ok(Sequence {
            cache: model.new_cache(),
            pending: prompt.clone(),
            prompt,
            generated: Vec::new(),
            counts: HashMap::new(),
            sampler: Sampler::new(params.sampling.clone())?,
            eos_ids: if params.ignore_eos {
                Vec::new()
            } else {
                tokenizer.eos_token_ids.clone()
            },
            json: params.json_mode.then(|| (JsonPrefix::default(), 0, false)),
            params,
            context_length,
            emitted: String::new(),
            finished: None,
            logprobs: Vec::new(),
        })
    }

    /// Ids to feed next, at most `chunk` of them (prompts are prefilled in chunks).
    pub fn next_input(&self, chunk: usize) -> &[u32] {
        &self.pending[..self.pending.len().min(chunk)]
    }

    /// How many ids wait to be fed.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Record that `n` ids of `next_input` were consumed by a forward that produced no logits for us.
    pub fn consumed(&mut self, n: usize) {
        self.pending.drain(..n);
    }

    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt
    }

    pub fn generated_ids(&self) -> &[u32] {
        &self.generated
    }

    pub fn text(&self) -> &str {
        &self.emitted
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    pub fn logprobs(&self) -> &[LogprobEntry] {
        &self.logprobs
    }

    /// Consume the last `n` fed ids and the logits row of the last one: pick the next token and
    /// update text and stop state.
    pub fn accept(
        &mut self,
        n: usize,
        logits: &mut [f32],
        tokenizer: &Tokenizer,
    ) -> Result<StepOutput> {
        self.pending.drain(..n);
        debug_assert!(
            self.pending.is_empty(),
            "logits are taken only after the whole prompt"
        );
        let context: Vec<u32> = if self.params.sampling.repetition_penalty.is_some() {
            self.prompt.iter().chain(&self.generated).copied().collect()
        } else {
            Vec::new()
        };
        let raw = self.params.logprobs.map(|_| logits.to_vec());
        let left = self.params.max_tokens.saturating_sub(self.generated.len());
        let token = match &mut self.json {
            // The object is closed: end here.
            Some((json, _, _)) if json.is_complete() => self.eos_ids.first().copied().unwrap_or(0),
            Some((json, _, closing_started)) => {
                let texts = tokenizer.token_texts();
                let closing = json.closing_text();
                // Every closing character has a one-character token, so this many steps suffice;
                // once started, closing goes on to the end.
                *closing_started |= left <= closing.chars().count() + 1;
                if *closing_started {
                    mask_to_closing(json, &closing, texts, logits);
                } else {
                    mask_logits(json, texts, &tokenizer.eos_token_ids, logits);
                }
                self.sampler.sample(logits, &context, &self.counts)
            }
            None => self.sampler.sample(logits, &context, &self.counts),
        };
        let json_closed = self.json.as_ref().is_some_and(|(j, _, _)| j.is_complete());
        let logprobs = match (self.params.logprobs, raw) {
            (Some(k), Some(raw)) => Some(logprob_entry(&raw, token, k)),
            _ => None,
        };
        if let Some(entry) = &logprobs {
            self.logprobs.push(entry.clone());
        }
        let mut finished = None;
        let mut text_delta = String::new();
        if self.eos_ids.contains(&token) || json_closed {
            finished = Some(FinishReason::Stop);
        } else {
            self.generated.push(token);
            *self.counts.entry(token).or_default() += 1;
            self.pending.push(token);
            let text = tokenizer.decode(&self.generated, true)?;
            if let Some((json, seen, _)) = &mut self.json {
                // Feed the document what the text really gained (an incomplete character waits).
                let upto = text.trim_end_matches('\u{FFFD}').len();
                if upto > *seen && text.is_char_boundary(*seen) {
                    if !json.feed_str(&text[*seen..upto]) {
                        finished = Some(FinishReason::Stop);
                    }
                    *seen = upto;
                }
            }
            let (final_len, stopped) = self.settled_text_len(&text);
            if stopped || self.json.as_ref().is_some_and(|(j, _, _)| j.is_complete()) {
                finished = Some(FinishReason::Stop);
            }
            if final_len > self.emitted.len() && text.is_char_boundary(self.emitted.len()) {
                text_delta = text[self.emitted.len()..final_len].to_string();
                self.emitted.push_str(&text_delta);
            }
        }
        if finished.is_none()
            && (self.generated.len() >= self.params.max_tokens
                || self.prompt.len() + self.generated.len() >= self.context_length)
        {
            finished = Some(FinishReason::Length);
        }
        if finished.is_some() {
            // Flush text held back only because it might have grown into a stop string or a character.
            if let Some(rest) = self.flush(tokenizer)? {
                text_delta.push_str(&rest);
            }
        }
        self.finished = finished;
        Ok(StepOutput {
            token_id: token,
            text_delta,
            logprobs,
            finished,
        })
    }

    /// How much of `text` is final, and whether a stop string was hit (text is cut before it).
    fn settled_text_len(&self, text: &str) -> (usize, bool) {
        let search_from = self
            .emitted
            .len()
            .saturating_sub(self.params.stop.iter().map(String::len).max().unwrap_or(0));
        let search_from = floor_char_boundary(text, search_from);
        let hit = self
            .params
            .stop
            .iter()
            .filter_map(|s| {
                text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(at) = hit {
            return (at, true);
        }
        // Hold back an incomplete character and any tail that could still become a stop string.
        let mut settled = text.len();
        if text.ends_with('\u{FFFD}') {
            settled = text.len() - '\u{FFFD}'.len_utf8();
        }
        for stop in &self.params.stop {
            for k in (1..stop.len()).rev() {
                if stop.is_char_boundary(k) && text[..settled].ends_with(&stop[..k]) {
                    settled = settled.min(text.len() - k);
                    break;
                }
            }
        }
        (
            floor_char_boundary(text, settled.max(self.emitted.len().min(settled))),
            false,
        )
    }

    /// At the end: everything not yet emitted, except what a stop string cut.
    fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let text = tokenizer.decode(&self.generated, true)?;
        let end = self
            .params
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
            .unwrap_or(text.len());
        if end > self.emitted.len() && text.is_char_boundary(self.emitted.len()) {
            let rest = text[self.emitted.len()..end].to_string();
            self.emitted.push_str(&rest);
            return Ok(Some(rest));
        }
        Ok(None)
    }
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}
