//! Extractive question answering, as transformers' `question-answering` pipeline does it: the
//! (question, context) pair is cut into overlapping windows of the context, each window scores
//! every (start, end) span as p(start)·p(end), and the best spans map back to character offsets
//! of the context, widened to whole words.

use candle_core::Tensor;
use tokenizers::{Encoding, TruncationStrategy};

use super::encoder::{run_valid, EncoderModel};
use crate::error::{Error, Result};
use crate::models::bert::{HeadKind, Positions};

/// Settings with the pipeline's defaults.
#[derive(Clone, Debug)]
pub struct QaOptions {
    /// How many answers to return.
    pub top_k: usize,
    /// Longest answer in tokens.
    pub max_answer_len: usize,
    /// Window length in tokens (question + context + special tokens); capped by the model.
    pub max_seq_len: usize,
    /// Tokens of overlap between consecutive context windows.
    pub doc_stride: usize,
    /// Also offer the empty answer, scored by the first token.
    pub handle_impossible_answer: bool,
}

impl Default for QaOptions {
    fn default() -> Self {
        QaOptions {
            top_k: 1,
            max_answer_len: 15,
            max_seq_len: 384,
            doc_stride: 128,
            handle_impossible_answer: false,
        }
    }
}

/// One answer span; `start`/`end` are character offsets into the context.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Answer {
    pub answer: String,
    pub score: f32,
    pub start: usize,
    pub end: usize,
}

/// Answer `question` from `context`: up to `top_k` answers, best first.
pub fn answer(
    model: &EncoderModel,
    question: &str,
    context: &str,
    options: &QaOptions,
) -> Result<Vec<Answer>> {
    model.require_head(HeadKind::QuestionAnswering)?;
    if question.trim().is_empty() {
        return Err(Error::invalid("the question is empty"));
    }
    if context.trim().is_empty() {
        return Err(Error::invalid("the context is empty"));
    }
    if options.top_k == 0 || options.max_answer_len == 0 {
        return Err(Error::invalid(
            "top_k and max_answer_len must be at least 1",
        ));
    }
    let max_seq_len = options.max_seq_len.min(model.max_tokens);
    let doc_stride = options.doc_stride.min(max_seq_len / 2);
    let mut tokenizer = model.truncating_tokenizer(TruncationStrategy::OnlySecond, doc_stride)?;
    if let Some(params) = tokenizer.get_truncation_mut() {
        params.max_length = max_seq_len;
    }
    let mut first = tokenizer
        .encode_char_offsets((question, context), true)
        .map_err(|e| {
            Error::invalid(format!(
                "cannot fit the question into a window of {max_seq_len} tokens: {e}"
            ))
        })?;
    let mut windows = std::mem::take(first.get_overflowing_mut());
    windows.insert(0, first);
    if windows
        .iter()
        .all(|w| !w.get_sequence_ids().contains(&Some(1)))
    {
        return Err(Error::invalid(format!(
            "the question leaves no room for the context in a window of {max_seq_len} tokens"
        )));
    }

    let cls_id = first_special_id(&windows[0]);
    let context_chars: Vec<char> = context.chars().collect();
    let mut answers = Vec::new();
    let mut min_null_score = 1_000_000f32;
    let per_window = run_valid(
        model,
        windows.iter().cloned().map(Ok).collect(),
        Positions::All,
        |batch, hidden| {
            let (start, end) = model.encoder.span_logits(hidden)?;
            batch
                .iter()
                .enumerate()
                .map(|(row, (_, w))| {
                    let take = |t: &Tensor| -> Result<Vec<f32>> {
                        Ok(t.get(row)?.narrow(0, 0, w.len())?.to_vec1::<f32>()?)
                    };
                    Ok((take(&start)?, take(&end)?))
                })
                .collect()
        },
    )?;
    for (window, logits) in windows.iter().zip(per_window) {
        let (start_logits, end_logits) = logits?;
        // Only context tokens (and the CLS token) may be part of an answer.
        let allowed: Vec<bool> = window
            .get_sequence_ids()
            .iter()
            .zip(window.get_ids())
            .map(|(seq, id)| *seq == Some(1) || Some(*id) == cls_id)
            .collect();
        let mut start = masked_softmax(&start_logits, &allowed);
        let mut end = masked_softmax(&end_logits, &allowed);
        if options.handle_impossible_answer {
            min_null_score = min_null_score.min(start[0] * end[0]);
        }
        start[0] = 0.0;
        end[0] = 0.0;
        // Widening to words maps several token spans to one text: take extra candidates and
        // add up the scores of those that name the same answer (transformers 4.4x onwards).
        let candidates = options.top_k * 2 + 10;
        for (s, e, score) in best_spans(&start, &end, &allowed, candidates, options) {
            let (cs, ce) = char_span(window, s, e);
            let text: String = context_chars
                [cs.min(context_chars.len())..ce.min(context_chars.len())]
                .iter()
                .collect();
            let lower = text.to_lowercase();
            match answers
                .iter_mut()
                .find(|a: &&mut Answer| a.answer.to_lowercase() == lower)
            {
                Some(same) => same.score += score,
                None => answers.push(Answer {
                    answer: text,
                    score,
                    start: cs,
                    end: ce,
                }),
            }
        }
    }
    if options.handle_impossible_answer {
        answers.push(Answer {
            answer: String::new(),
            score: min_null_score,
            start: 0,
            end: 0,
        });
    }
    answers.sort_by(|a, b| b.score.total_cmp(&a.score));
    answers.truncate(options.top_k);
    Ok(answers)
}

/// The CLS-like first special token of a window (the pipeline never masks it).
fn first_special_id(window: &Encoding) -> Option<u32> {
    (window.get_special_tokens_mask().first() == Some(&1)).then(|| window.get_ids()[0])
}

/// Softmax with disallowed positions set to -10000 first, as the pipeline does.
fn masked_softmax(logits: &[f32], allowed: &[bool]) -> Vec<f32> {
    let masked: Vec<f32> = logits
        .iter()
        .zip(allowed)
        .map(|(&x, &ok)| if ok { x } else { -10000.0 })
        .collect();
    super::ner::softmax(&masked)
}

/// The `count` best (start, end, score) spans with start <= end < start + max_answer_len, both
/// ends allowed.
fn best_spans(
    start: &[f32],
    end: &[f32],
    allowed: &[bool],
    count: usize,
    options: &QaOptions,
) -> Vec<(usize, usize, f32)> {
    let mut candidates = Vec::new();
    for (s, p_start) in start.iter().enumerate() {
        for (e, p_end) in end.iter().enumerate().skip(s).take(options.max_answer_len) {
            candidates.push((s, e, p_start * p_end));
        }
    }
    // Row-major order first, then a stable sort by score, so ties resolve like numpy's argsort.
    candidates.sort_by(|a, b| b.2.total_cmp(&a.2));
    candidates.truncate(count);
    // Position 0 stays eligible, as the pipeline's index test lets it through (its score is 0).
    candidates
        .into_iter()
        .filter(|&(s, e, _)| (allowed[s] || s == 0) && (allowed[e] || e == 0))
        .collect()
}

/// Character span of tokens s..=e in the context, widened to the words they fall in.
fn char_span(window: &Encoding, s: usize, e: usize) -> (usize, usize) {
    let word_chars = |token: usize| {
        let (_, word) = window.token_to_word(token)?;
        window.word_to_chars(word, 1)
    };
    match (word_chars(s), word_chars(e)) {
        (Some((start, _)), Some((_, end))) => (start, end),
        _ => (window.get_offsets()[s].0, window.get_offsets()[e].1),
    }
}
