//! Fine-tuning a BERT-family encoder as a sequence classifier (all weights trained). The model is
//! the inference `Encoder` itself, built over trainable parameters; the result is saved as an HF
//! directory (`*ForSequenceClassification`) that transformers and `wordloom classify` load.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

use super::data::Example;
use super::{Evaluation, Precision, Task};
use crate::error::{Error, Result};
use crate::models::bert::{Encoder, EncoderConfig, EncoderInput, Flavor, HeadKind, Positions};
use crate::tasks::encoder::EncoderModel;
use crate::weights::{FreshInit, Parameters, WeightStore};
use crate::LoadOptions;

/// Examples the evaluation runs per forward pass.
const EVAL_BATCH: usize = 32;

/// A classifier being fine-tuned, with its tokenized data.
pub struct ClassifierTask {
    base_dir: std::path::PathBuf,
    config: EncoderConfig,
    flavor: Flavor,
    params: Arc<Parameters>,
    pub labels: Vec<String>,
    train: Vec<(EncoderInput, u32)>,
    eval: Vec<(EncoderInput, u32)>,
    /// Texts cut to the length limit (training and held-out).
    pub truncated: usize,
    pub max_tokens: usize,
}

impl ClassifierTask {
    /// Prepare fine-tuning of `base` (an HF encoder directory or hub id) on `train`, evaluated
    /// on `eval`; inputs are cut to `max_len` tokens (default: the model's limit). The passes
    /// compute in `precision`'s dtype over f32 master weights.
    pub fn new(
        base: &str,
        train: &[Example],
        eval: &[Example],
        max_len: Option<usize>,
        seed: u64,
        precision: Precision,
    ) -> Result<Self> {
        let model = EncoderModel::load(base, &LoadOptions::default())?;
        let labels: Vec<String> = train
            .iter()
            .map(|e| e.label.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if labels.len() < 2 {
            return Err(Error::invalid(format!(
                "classification needs at least two labels in the training data, found {labels:?}"
            )));
        }
        if let Some(unseen) = eval.iter().find(|e| !labels.contains(&e.label)) {
            return Err(Error::invalid(format!(
                "{}: label `{}` never occurs in the training data (labels: {})",
                unseen.origin,
                unseen.label,
                labels.join(", ")
            )));
        }
        let encoder = &model.encoder;
        let flavor = encoder.flavor;
        if encoder.head_kind.is_some() {
            let same = encoder.head_kind == Some(HeadKind::SequenceClassification)
                && encoder.labels.iter().collect::<BTreeSet<_>>() == labels.iter().collect();
            if !same {
                return Err(Error::invalid(format!(
                    "`{base}` already has {} with labels [{}]; the data's labels are [{}] — start from a bare encoder",
                    HeadKind::describe(encoder.head_kind),
                    encoder.labels.join(", "),
                    labels.join(", ")
                )));
            }
        }
        // Keep an existing head's label order; a new head takes the sorted labels.
        let labels = if encoder.head_kind.is_some() {
            encoder.labels.clone()
        } else {
            labels
        };
        let mut config = encoder.config.clone();
        let head = match flavor {
            Flavor::Bert => "BertForSequenceClassification",
            Flavor::Roberta => "RobertaForSequenceClassification",
            Flavor::DistilBert => "DistilBertForSequenceClassification",
        };
        config.architectures = vec![head.to_string()];
        config.id2label = Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.clone()))
                .collect(),
        );
        config.problem_type = Some("single_label_classification".into());
        let params = Arc::new(
            Parameters::from_base(
                WeightStore::open_hf_dir(&model.dir)?,
                Some(FreshInit { std: 0.02, seed }),
            )
            .with_autocast(precision.autocast()),
        );
        let max_tokens = max_len.map_or(model.max_tokens, |l| l.min(model.max_tokens));
        let mut tokenizer = model.truncating_tokenizer(TruncationStrategy::LongestFirst, 0)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let label_ids: HashMap<&str, u32> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i as u32))
            .collect();
        let mut truncated = 0;
        let mut tokenize = |examples: &[Example]| -> Result<Vec<(EncoderInput, u32)>> {
            examples
                .iter()
                .map(|e| {
                    let encoding = tokenizer
                        .encode(e.text.as_str(), true)
                        .map_err(|err| Error::Tokenizer(format!("{}: {err}", e.origin)))?;
                    if !encoding.get_overflowing().is_empty() {
                        truncated += 1;
                    }
                    Ok((
                        EncoderInput {
                            ids: encoding.get_ids().to_vec(),
                            type_ids: encoding.get_type_ids().to_vec(),
                        },
                        label_ids[e.label.as_str()],
                    ))
                })
                .collect()
        };
        let (train, eval) = (tokenize(train)?, tokenize(eval)?);
        let task = ClassifierTask {
            base_dir: model.dir.clone(),
            config,
            flavor,
            params,
            labels,
            train,
            eval,
            truncated,
            max_tokens,
        };
        task.model()?; // registers every parameter, the new head's included
        Ok(task)
    }

    /// The encoder over the current parameter values (cheap: tensors are shared, not copied).
    fn model(&self) -> Result<Encoder> {
        Encoder::from_weights(
            self.config.clone(),
            &WeightStore::Trainable(self.params.clone()),
            DType::F32,
            &Device::Cpu,
        )
    }

    pub fn head_created(&self) -> bool {
        !self.params.created().is_empty()
    }

    /// Write the classifier as an HF directory: config.json with the labels, model.safetensors
    /// under transformers' names, and the base model's tokenizer files.
    pub fn save(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let prefix = self.flavor.head_prefix();
        let mut tensors = HashMap::new();
        for (name, var) in self.params.vars() {
            let head = name.starts_with("classifier") || name.starts_with("pre_classifier");
            let full = if head || name.starts_with(prefix) {
                name
            } else {
                format!("{prefix}{name}")
            };
            tensors.insert(full, var.as_tensor().detach());
        }
        let weights = out.join("model.safetensors");
        let tmp = super::sibling(&weights, ".tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
        let config_path = self.base_dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let mut config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&config_path, format!("invalid JSON: {e}")))?;
        let id2label: BTreeMap<String, &String> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l))
            .collect();
        let label2id: BTreeMap<&String, usize> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l, i))
            .collect();
        config["architectures"] = serde_json::json!(self.config.architectures);
        config["id2label"] = serde_json::json!(id2label);
        config["label2id"] = serde_json::json!(label2id);
        config["problem_type"] = serde_json::json!("single_label_classification");
        config["torch_dtype"] = serde_json::json!("float32");
        let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::invalid(e.to_string()))?;
        super::write_atomic(&out.join("config.json"), &json)?;
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
            "sentencepiece.bpe.model",
        ] {
            let from = self.base_dir.join(name);
            if from.is_file() {
                std::fs::copy(&from, out.join(name)).map_err(|e| Error::io(&from, e))?;
            }
        }
        Ok(())
    }

    fn batch(&self, rows: &[&(EncoderInput, u32)]) -> Result<(Vec<EncoderInput>, Tensor, usize)> {
        let inputs: Vec<EncoderInput> = rows.iter().map(|(i, _)| i.clone()).collect();
        let targets: Vec<u32> = rows.iter().map(|(_, l)| *l).collect();
        let tokens = inputs.iter().map(|i| i.ids.len()).sum();
        Ok((inputs, Tensor::new(targets, &Device::Cpu)?, tokens))
    }
}

impl Task for ClassifierTask {
    fn examples(&self) -> usize {
        self.train.len()
    }

    fn parameters(&self) -> &Arc<Parameters> {
        &self.params
    }

    fn loss(&self, indices: &[usize], seed: u64) -> Result<(Tensor, usize)> {
        let rows: Vec<_> = indices.iter().map(|&i| &self.train[i]).collect();
        let (inputs, targets, tokens) = self.batch(&rows)?;
        let model = self.model()?.with_training_dropout(seed);
        let logits =
            model.sequence_logits(&model.forward_positions(&inputs, Positions::FirstOnly)?)?;
        Ok((candle_nn::loss::cross_entropy(&logits, &targets)?, tokens))
    }

    fn evaluate(&self) -> Result<Option<Evaluation>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let model = Encoder::from_weights(
            self.config.clone(),
            &WeightStore::Trainable(Arc::new(self.params.frozen_view())),
            DType::F32,
            &Device::Cpu,
        )?;
        let mut order: Vec<usize> = (0..self.eval.len()).collect();
        order.sort_by_key(|&i| self.eval[i].0.ids.len());
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for chunk in order.chunks(EVAL_BATCH) {
            let rows: Vec<_> = chunk.iter().map(|&i| &self.eval[i]).collect();
            let (inputs, targets, _) = self.batch(&rows)?;
            let logits =
                model.sequence_logits(&model.forward_positions(&inputs, Positions::FirstOnly)?)?;
            let batch_loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
            loss += batch_loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            correct += predicted
                .iter()
                .zip(rows.iter())
                .filter(|(p, (_, l))| *p == l)
                .count();
        }
        let n = self.eval.len() as f64;
        Ok(Some(Evaluation {
            loss: loss / n,
            accuracy: Some(correct as f64 / n),
        }))
    }
}
