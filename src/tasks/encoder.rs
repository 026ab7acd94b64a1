//! What every encoder task shares: a BERT-family model with its tokenizer, input limits, and
//! length-sorted batching so that padding stays small.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tokenizers::{Encoding, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};
use crate::models::bert::{Encoder, EncoderInput, HeadKind, Positions};
use crate::models::LoadOptions;
use crate::tokenizer::Tokenizer;
use crate::weights::ModelSource;

/// Inputs per forward pass unless the caller says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// What to do with an input longer than the model accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Cut it to the model's maximum length (what transformers and sentence-transformers do).
    #[default]
    Truncate,
    /// Refuse it with an error.
    Error,
}

/// An encoder model, its tokenizer and the rules for feeding it.
pub struct EncoderModel {
    pub encoder: Encoder,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
    /// Longest input in tokens, special tokens included.
    pub max_tokens: usize,
    pub overflow: Overflow,
    pub batch_size: usize,
    single_tokenizer: tokenizers::Tokenizer,
    pair_tokenizer: tokenizers::Tokenizer,
}

impl EncoderModel {
    /// Load from a model spec (local HF directory or hub id).
    pub fn load(spec: &str, options: &LoadOptions) -> Result<Self> {
        let dir = match ModelSource::resolve(spec)? {
            ModelSource::HfDir(dir) => dir,
            ModelSource::Gguf(path) => {
                return Err(Error::file(
                    path,
                    "encoder models are read from Hugging Face directories, not GGUF",
                ))
            }
        };
        let encoder = Encoder::load(&dir, options.dtype, &options.device)?;
        let tokenizer = Tokenizer::from_hf_dir(&dir)?;
        let max_tokens = input_limit(&dir, encoder.max_input_tokens())?;
        let single_tokenizer =
            truncating(&tokenizer, max_tokens, TruncationStrategy::LongestFirst, 0)?;
        let pair_tokenizer = truncating(&tokenizer, max_tokens, TruncationStrategy::OnlyFirst, 0)?;
        Ok(EncoderModel {
            single_tokenizer,
            pair_tokenizer,
            encoder,
            tokenizer,
            dir,
            max_tokens,
            overflow: Overflow::default(),
            batch_size: DEFAULT_BATCH_SIZE,
        })
    }

    /// Tokenize one text, or a (text, pair) pair, with special tokens and character offsets,
    /// applying the overflow rule. A pair is truncated in its first member, as NLI pipelines do.
    pub fn tokenize(&self, text: &str, pair: Option<&str>) -> Result<Encoding> {
        if text.trim().is_empty() {
            return Err(Error::invalid("the input text is empty"));
        }
        let encoding = match pair {
            Some(second) => self
                .pair_tokenizer
                .encode_char_offsets((text, second), true),
            None => self.single_tokenizer.encode_char_offsets(text, true),
        }
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if self.overflow == Overflow::Error && !encoding.get_overflowing().is_empty() {
            let mut untruncated = self.single_tokenizer.clone();
            untruncated
                .with_truncation(None)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let full = match pair {
                Some(second) => untruncated.encode((text, second), true),
                None => untruncated.encode(text, true),
            }
            .map(|e| e.len())
            .unwrap_or(0);
            return Err(Error::invalid(format!(
                "the input has {full} tokens but the model accepts at most {} (without --no-truncate it is cut to fit)",
                self.max_tokens
            )));
        }
        Ok(encoding)
    }

    /// The model's tokenizer without padding, truncating to the input limit with `strategy`.
    pub fn truncating_tokenizer(
        &self,
        strategy: TruncationStrategy,
        stride: usize,
    ) -> Result<tokenizers::Tokenizer> {
        truncating(&self.tokenizer, self.max_tokens, strategy, stride)
    }

    /// Run the encoder over `encodings` in length-sorted batches; `consume(indices, hidden)` gets
    /// the batch's input indices and its hidden states (b, t, h) (t = 1 for
    /// [`Positions::FirstOnly`]), row i for `indices[i]`.
    pub fn for_each_batch(
        &self,
        encodings: &[&Encoding],
        outputs: Positions,
        mut consume: impl FnMut(&[usize], &Tensor) -> Result<()>,
    ) -> Result<()> {
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));
        for chunk in order.chunks(self.batch_size.max(1)) {
            let inputs: Vec<EncoderInput> = chunk
                .iter()
                .map(|&i| EncoderInput {
                    ids: encodings[i].get_ids().to_vec(),
                    type_ids: encodings[i].get_type_ids().to_vec(),
                })
                .collect();
            let hidden = self.encoder.forward_positions(&inputs, outputs)?;
            consume(chunk, &hidden)?;
        }
        Ok(())
    }

    /// An error naming the head this model has, unless it has `wanted`.
    pub fn require_head(&self, wanted: HeadKind) -> Result<()> {
        if self.encoder.head_kind == Some(wanted) {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "this command needs a model with {}, but `{}` has {}",
            HeadKind::describe(Some(wanted)),
            self.dir.display(),
            HeadKind::describe(self.encoder.head_kind)
        )))
    }

    /// Tokenize every text; each keeps its own error so that one bad line does not stop a file.
    pub fn tokenize_all(&self, texts: &[&str]) -> Vec<Result<Encoding>> {
        texts.iter().map(|t| self.tokenize(t, None)).collect()
    }
}

/// Run `per_batch` over the inputs that tokenized, and put each result back in input order,
/// next to the tokenizer errors of the rest. `per_batch` gets (input index, encoding) pairs in
/// batch-row order with the batch's hidden states at `outputs`.
pub fn run_valid<T>(
    model: &EncoderModel,
    encodings: Vec<Result<Encoding>>,
    outputs: Positions,
    mut per_batch: impl FnMut(&[(usize, &Encoding)], &Tensor) -> Result<Vec<T>>,
) -> Result<Vec<Result<T>>> {
    let mut slots: Vec<Result<Option<T>>> = Vec::with_capacity(encodings.len());
    let mut valid = Vec::new();
    for encoding in encodings {
        match encoding {
            Ok(e) => {
                valid.push((slots.len(), e));
                slots.push(Ok(None));
            }
            Err(err) => slots.push(Err(err)),
        }
    }
    let refs: Vec<&Encoding> = valid.iter().map(|(_, e)| e).collect();
    model.for_each_batch(&refs, outputs, |indices, hidden| {
        let batch: Vec<(usize, &Encoding)> =
            indices.iter().map(|&i| (valid[i].0, refs[i])).collect();
        for (&i, value) in indices.iter().zip(per_batch(&batch, hidden)?) {
            slots[valid[i].0] = Ok(Some(value));
        }
        Ok(())
    })?;
    Ok(slots
        .into_iter()
        .map(|slot| slot.map(|v| v.expect("every valid input has a result")))
        .collect())
}

fn truncating(
    tokenizer: &Tokenizer,
    max_tokens: usize,
    strategy: TruncationStrategy,
    stride: usize,
) -> Result<tokenizers::Tokenizer> {
    let mut tokenizer = tokenizer.inner().clone();
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            strategy,
            stride,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

/// The input limit: the position table, capped by tokenizer_config's `model_max_length` and
/// sentence-transformers' `max_seq_length` where given.
fn input_limit(dir: &Path, positions: usize) -> Result<usize> {
    let mut limit = positions;
    let caps = [
        ("tokenizer_config.json", "model_max_length"),
        ("sentence_bert_config.json", "max_seq_length"),
    ];
    for (file, key) in caps {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
        // tokenizer_config uses a huge sentinel (1e30) for "no limit".
        if let Some(cap) = json.get(key).and_then(|v| v.as_f64()) {
            if cap >= 1.0 && cap < limit as f64 {
                limit = cap as usize;
            }
        }
    }
    Ok(limit)
}
