//! Token classification (named entities), with the aggregation strategies of transformers'
//! `token-classification` pipeline: per-token softmax, optional fusion of sub-word tokens into
//! words, then grouping of adjacent B-/I- tags into entities. Offsets are in characters.

use std::str::FromStr;

use candle_core::Tensor;
use tokenizers::{Encoding, ModelWrapper};

use super::encoder::{run_valid, EncoderModel};
use crate::error::{Error, Result};
use crate::models::bert::{HeadKind, Positions};

/// How token predictions become entities (transformers' `aggregation_strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// One entry per token, no grouping.
    None,
    /// Group adjacent tokens with the same tag.
    #[default]
    Simple,
    /// Words take the tag of their first token, then grouped.
    First,
    /// Words take the tag of their averaged token scores, then grouped.
    Average,
    /// Words take the tag of their most confident token, then grouped.
    Max,
}

impl FromStr for Aggregation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Aggregation::None,
            "simple" => Aggregation::Simple,
            "first" => Aggregation::First,
            "average" => Aggregation::Average,
            "max" => Aggregation::Max,
            other => {
                return Err(Error::invalid(format!(
                    "unknown aggregation strategy `{other}` (expected none, simple, first, average or max)"
                )))
            }
        })
    }
}

/// One recognised entity (or, with `Aggregation::None`, one tagged token).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Entity {
    /// The tag without its B-/I- prefix (grouped strategies) or the full tag (`None`).
    #[serde(rename = "entity_group")]
    pub group: String,
    pub score: f32,
    pub word: String,
    /// Character offsets into the input.
    pub start: usize,
    pub end: usize,
    /// Token index (only for `Aggregation::None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

/// A token's softmax scores and where it came from.
struct TokenScores {
    word: String,
    scores: Vec<f32>,
    start: usize,
    end: usize,
    index: usize,
    is_subword: bool,
}

/// A token or word with its chosen tag, before grouping.
struct Tagged {
    tag: String,
    score: f32,
    word: String,
    start: usize,
    end: usize,
    index: usize,
}

/// Find entities in each text; each input keeps its own error.
pub fn recognize(
    model: &EncoderModel,
    texts: &[&str],
    strategy: Aggregation,
) -> Result<Vec<Result<Vec<Entity>>>> {
    model.require_head(HeadKind::TokenClassification)?;
    let encodings = model.tokenize_all(texts);
    run_valid(model, encodings, Positions::All, |batch, hidden| {
        let logits = model.encoder.token_logits(hidden)?;
        batch
            .iter()
            .enumerate()
            .map(|(row, (input, encoding))| {
                let row_logits = logits.get(row)?.narrow(0, 0, encoding.len())?;
                entities(model, texts[*input], encoding, &row_logits, strategy)
            })
            .collect()
    })
}

fn entities(
    model: &EncoderModel,
    text: &str,
    encoding: &Encoding,
    logits: &Tensor,
    strategy: Aggregation,
) -> Result<Vec<Entity>> {
    let labels = &model.encoder.labels;
    let tokenizer = model.tokenizer.inner();
    let word_aware = match tokenizer.get_model() {
        ModelWrapper::WordPiece(wp) => !wp.continuing_subword_prefix.is_empty(),
        ModelWrapper::BPE(bpe) => bpe
            .continuing_subword_prefix
            .as_ref()
            .is_some_and(|p| !p.is_empty()),
        _ => false,
    };
    let unk_id = unknown_token_id(tokenizer);
    let chars: Vec<char> = text.chars().collect();
    let slice = |s: usize, e: usize| {
        chars[s.min(chars.len())..e.min(chars.len())]
            .iter()
            .collect::<String>()
    };

    let rows = logits.to_vec2::<f32>()?;
    let mut tokens = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        if encoding.get_special_tokens_mask()[index] == 1 {
            continue;
        }
        let id = encoding.get_ids()[index];
        let (start, end) = encoding.get_offsets()[index];
        let word_ref = slice(start, end);
        let mut word = tokenizer.id_to_token(id).unwrap_or_default();
        let mut is_subword = if word_aware {
            word.chars().count() != word_ref.chars().count()
        } else {
            start > 0 && !slice(start - 1, start + 1).contains(' ')
        };
        if Some(id) == unk_id {
            word = word_ref;
            is_subword = false;
        }
        tokens.push(TokenScores {
            word,
            scores: softmax(row),
            start,
            end,
            index,
            is_subword,
        });
    }

    let label = |i: usize| {
        labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("LABEL_{i}"))
    };
    let tagged: Vec<Tagged> = match strategy {
        Aggregation::None | Aggregation::Simple => tokens
            .into_iter()
            .map(|t| {
                let best = argmax(&t.scores);
                Tagged {
                    tag: label(best),
                    score: t.scores[best],
                    word: t.word,
                    start: t.start,
                    end: t.end,
                    index: t.index,
                }
            })
            .collect(),
        _ => {
            let mut words: Vec<Vec<TokenScores>> = Vec::new();
            for token in tokens {
                match words.last_mut() {
                    Some(group) if token.is_subword => group.push(token),
                    _ => words.push(vec![token]),
                }
            }
            words
                .into_iter()
                .map(|group| aggregate_word(tokenizer, &group, strategy, &label))
                .collect::<Result<_>>()?
        }
    };

    let kept = |tag: &str| tag != "O";
    if strategy == Aggregation::None {
        return Ok(tagged
            .into_iter()
            .filter(|t| kept(&t.tag))
            .map(|t| Entity {
                group: t.tag,
                score: t.score,
                word: t.word,
                start: t.start,
                end: t.end,
                index: Some(t.index),
            })
            .collect());
    }
    let mut groups: Vec<Vec<Tagged>> = Vec::new();
    for t in tagged {
        let joins = groups.last().is_some_and(|g| {
            let (bi, tag) = split_tag(&t.tag);
            let (_, last_tag) = split_tag(&g.last().expect("non-empty group").tag);
            tag == last_tag && bi != "B"
        });
        if joins {
            groups.last_mut().expect("checked").push(t);
        } else {
            groups.push(vec![t]);
        }
    }
    let mut out = Vec::new();
    for group in groups {
        let first = &group[0];
        let name = first
            .tag
            .split_once('-')
            .map_or(first.tag.as_str(), |(_, rest)| rest)
            .to_string();
        if !kept(&name) {
            continue;
        }
        let score = group.iter().map(|t| t.score as f64).sum::<f64>() / group.len() as f64;
        let words: Vec<String> = group.iter().map(|t| t.word.clone()).collect();
        out.push(Entity {
            group: name,
            score: score as f32,
            word: tokens_to_string(tokenizer, words)?,
            start: first.start,
            end: group.last().expect("non-empty group").end,
            index: None,
        });
    }
    Ok(out)
}

/// The id of the tokenizer's unknown token, if it has one.
fn unknown_token_id(tokenizer: &tokenizers::Tokenizer) -> Option<u32> {
    let name = match tokenizer.get_model() {
        ModelWrapper::WordPiece(wp) => Some(wp.unk_token.clone()),
        ModelWrapper::BPE(bpe) => bpe.unk_token.clone(),
        ModelWrapper::WordLevel(wl) => Some(wl.unk_token.clone()),
        // Unigram keeps its unknown id private; SentencePiece models name it <unk>.
        ModelWrapper::Unigram(_) => Some("<unk>".to_string()),
    }?;
    tokenizer.token_to_id(&name)
}

fn aggregate_word(
    tokenizer: &tokenizers::Tokenizer,
    group: &[TokenScores],
    strategy: Aggregation,
    label: &dyn Fn(usize) -> String,
) -> Result<Tagged> {
    let word = tokens_to_string(tokenizer, group.iter().map(|t| t.word.clone()).collect())?;
    let (tag, score) = match strategy {
        Aggregation::First => {
            let best = argmax(&group[0].scores);
            (label(best), group[0].scores[best])
        }
        Aggregation::Max => {
            // The first token whose own best score is highest, as Python's max() picks it.
            let mut chosen = &group[0];
            for t in &group[1..] {
                if max_of(&t.scores) > max_of(&chosen.scores) {
                    chosen = t;
                }
            }
            let best = argmax(&chosen.scores);
            (label(best), chosen.scores[best])
        }
        _ => {
            let n = group[0].scores.len();
            let average: Vec<f32> = (0..n)
                .map(|k| group.iter().map(|t| t.scores[k]).sum::<f32>() / group.len() as f32)
                .collect();
            let best = argmax(&average);
            (label(best), average[best])
        }
    };
    Ok(Tagged {
        tag,
        score,
        word,
        start: group[0].start,
        end: group.last().expect("non-empty word").end,
        index: group[0].index,
    })
}

/// transformers' `convert_tokens_to_string`: the tokenizer's decoder, else tokens joined by spaces.
fn tokens_to_string(tokenizer: &tokenizers::Tokenizer, tokens: Vec<String>) -> Result<String> {
    match tokenizer.get_decoder() {
        Some(decoder) => {
            use tokenizers::Decoder;
            decoder
                .decode(tokens)
                .map_err(|e| Error::Tokenizer(e.to_string()))
        }
        None => Ok(tokens.join(" ")),
    }
}

/// ("B" | "I", tag) as transformers' `get_tag`: anything without a prefix continues ("I").
fn split_tag(name: &str) -> (&str, &str) {
    if let Some(tag) = name.strip_prefix("B-") {
        ("B", tag)
    } else if let Some(tag) = name.strip_prefix("I-") {
        ("I", tag)
    } else {
        ("I", name)
    }
}

pub(crate) fn softmax(row: &[f32]) -> Vec<f32> {
    let max = max_of(row);
    let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

pub(crate) fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

fn max_of(values: &[f32]) -> f32 {
    values.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}
