//! Sequence classification, as transformers' `text-classification` pipeline scores it: softmax
//! for single-label models, sigmoid for multi-label (and one-output) models, raw scores for
//! regression; and NLI-based zero-shot classification on top of the same head.

use super::encoder::{run_valid, EncoderModel};
use super::ner::softmax;
use crate::error::{Error, Result};
use crate::models::bert::{HeadKind, Positions, ProblemType};

/// Every label's score for one input, best first.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Classification {
    /// (label, score), sorted by score, highest first.
    pub scores: Vec<(String, f32)>,
}

impl Classification {
    pub fn best(&self) -> (&str, f32) {
        let (label, score) = &self.scores[0];
        (label, *score)
    }
}

/// Probabilities (or raw scores) from one row of logits, following the model's problem type.
fn scores(problem: ProblemType, logits: &[f32]) -> Vec<f32> {
    match problem {
        ProblemType::SingleLabel => softmax(logits),
        ProblemType::MultiLabel => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        ProblemType::Regression => logits.to_vec(),
    }
}

/// Classify each text; each input keeps its own error.
pub fn classify(model: &EncoderModel, texts: &[&str]) -> Result<Vec<Result<Classification>>> {
    model.require_head(HeadKind::SequenceClassification)?;
    let encodings = model.tokenize_all(texts);
    let rows = run_valid(model, encodings, Positions::FirstOnly, |_, hidden| {
        Ok(model.encoder.sequence_logits(hidden)?.to_vec2::<f32>()?)
    })?;
    let labels = &model.encoder.labels;
    Ok(rows
        .into_iter()
        .map(|row| {
            let row = row?;
            let mut scored: Vec<(String, f32)> = scores(model.encoder.problem_type, &row)
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    let name = labels
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("LABEL_{i}"));
                    (name, s)
                })
                .collect();
            // Stable: equal scores keep label order.
            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
            Ok(Classification { scores: scored })
        })
        .collect())
}

/// Options of NLI-based zero-shot classification.
#[derive(Clone, Debug)]
pub struct ZeroShotOptions {
    /// Turned into hypotheses by replacing `{}` with each label.
    pub hypothesis_template: String,
    /// Score each label independently (entailment vs contradiction) instead of across labels.
    pub multi_label: bool,
}

impl Default for ZeroShotOptions {
    fn default() -> Self {
        ZeroShotOptions {
            hypothesis_template: "This example is {}.".into(),
            multi_label: false,
        }
    }
}

/// Zero-shot: each (text, "This example is {label}.") pair goes through an NLI model; the
/// entailment logit decides. Returns, per text, the labels sorted by score.
pub fn zero_shot(
    model: &EncoderModel,
    texts: &[&str],
    candidate_labels: &[String],
    options: &ZeroShotOptions,
) -> Result<Vec<Result<Classification>>> {
    model.require_head(HeadKind::SequenceClassification)?;
    if candidate_labels.is_empty() || candidate_labels.iter().any(|l| l.trim().is_empty()) {
        return Err(Error::invalid(
            "zero-shot needs at least one non-empty candidate label",
        ));
    }
    if !options.hypothesis_template.contains("{}") {
        return Err(Error::invalid(format!(
            "the hypothesis template `{}` has no `{{}}` where the label goes",
            options.hypothesis_template
        )));
    }
    let labels = &model.encoder.labels;
    let entailment = labels
        .iter()
        .position(|l| l.to_lowercase().starts_with("entail"))
        .ok_or_else(|| {
            Error::invalid(format!(
                "zero-shot needs an NLI model with an `entailment` label; this one has {labels:?}"
            ))
        })?;
    // transformers: contradiction is the last label when entailment is the first, else the first.
    let contradiction = if entailment == 0 { labels.len() - 1 } else { 0 };
    let hypotheses: Vec<String> = candidate_labels
        .iter()
        .map(|l| options.hypothesis_template.replacen("{}", l, 1))
        .collect();

    let mut pairs = Vec::with_capacity(texts.len() * hypotheses.len());
    for text in texts {
        for hypothesis in &hypotheses {
            pairs.push(model.tokenize(text, Some(hypothesis)));
        }
    }
    let logits = run_valid(model, pairs, Positions::FirstOnly, |_, hidden| {
        Ok(model.encoder.sequence_logits(hidden)?.to_vec2::<f32>()?)
    })?;
    let mut logits = logits.into_iter();
    let mut out = Vec::with_capacity(texts.len());
    for _ in texts {
        let rows: Result<Vec<Vec<f32>>> = logits.by_ref().take(hypotheses.len()).collect();
        out.push(rows.map(|rows| {
            let label_scores: Vec<f32> = if options.multi_label || candidate_labels.len() == 1 {
                rows.iter()
                    .map(|r| softmax(&[r[contradiction], r[entailment]])[1])
                    .collect()
            } else {
                softmax(&rows.iter().map(|r| r[entailment]).collect::<Vec<_>>())
            };
            let mut scored: Vec<(String, f32)> =
                candidate_labels.iter().cloned().zip(label_scores).collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
            Classification { scores: scored }
        }));
    }
    Ok(out)
}
