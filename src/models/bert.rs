//! BERT-family encoders: BERT, RoBERTa / XLM-RoBERTa and DistilBERT.
//!
//! Word + position (+ token type) embeddings, then post-LayerNorm blocks: bidirectional
//! self-attention over the unpadded keys, a residual LayerNorm, a GELU feed-forward, another
//! residual LayerNorm. The three flavours differ only in tensor names, in how positions are
//! numbered (RoBERTa starts after its padding index) and in the layers of their task heads.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::layers::{Activation, LayerNorm};
use crate::error::{Error, Result};
use crate::weights::{Embedding, Linear, WeightStore};

pub const SUPPORTED_ENCODERS: &str = "bert, roberta, xlm-roberta, camembert, distilbert";

/// config.json of a BERT-family checkpoint (DistilBERT's own key names are accepted too).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct EncoderConfig {
    #[serde(default)]
    pub model_type: String,
    pub vocab_size: usize,
    #[serde(alias = "dim")]
    pub hidden_size: usize,
    #[serde(alias = "n_layers")]
    pub num_hidden_layers: usize,
    #[serde(alias = "n_heads")]
    pub num_attention_heads: usize,
    #[serde(alias = "hidden_dim")]
    pub intermediate_size: usize,
    #[serde(alias = "activation", default = "default_activation")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub problem_type: Option<String>,
    /// Dropout while training (DistilBERT: `dropout`, `attention_dropout`,
    /// `seq_classif_dropout`); transformers' defaults where absent.
    #[serde(default, alias = "dropout")]
    pub hidden_dropout_prob: Option<f32>,
    #[serde(default, alias = "attention_dropout")]
    pub attention_probs_dropout_prob: Option<f32>,
    #[serde(default, alias = "seq_classif_dropout")]
    pub classifier_dropout: Option<f32>,
}

fn default_activation() -> String {
    "gelu".into()
}

fn default_eps() -> f64 {
    1e-12
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Bert,
    Roberta,
    DistilBert,
}

impl Flavor {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "bert" => Flavor::Bert,
            "roberta" | "xlm-roberta" | "camembert" => Flavor::Roberta,
            "distilbert" => Flavor::DistilBert,
            _ => return None,
        })
    }

    /// The prefix of encoder tensors in checkpoints saved from a model with a head.
    pub fn head_prefix(self) -> &'static str {
        match self {
            Flavor::Bert => "bert.",
            Flavor::Roberta => "roberta.",
            Flavor::DistilBert => "distilbert.",
        }
    }
}

/// The task head a checkpoint carries, from `architectures` in config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadKind {
    SequenceClassification,
    TokenClassification,
    QuestionAnswering,
}

impl HeadKind {
    pub fn describe(kind: Option<HeadKind>) -> &'static str {
        match kind {
            Some(HeadKind::SequenceClassification) => "a sequence-classification head",
            Some(HeadKind::TokenClassification) => "a token-classification head",
            Some(HeadKind::QuestionAnswering) => "a question-answering head",
            None => "no task head (a bare encoder)",
        }
    }
}

/// How class scores are turned into probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemType {
    /// One label per input: softmax.
    SingleLabel,
    /// Independent labels: sigmoid per label.
    MultiLabel,
    /// Raw scores.
    Regression,
}

/// One input: token ids and their segment (token type) ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncoderInput {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

struct Embeddings {
    word: Embedding,
    position: Tensor,
    token_type: Option<Tensor>,
    norm: LayerNorm,
}

/// The positions whose last hidden states an encoder pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    All,
    /// Only each sequence's first token (what sequence heads read).
    FirstOnly,
}

struct Block {
    /// Query, key and value projections fused into one (hidden → 3 × hidden) matmul.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    output_norm: LayerNorm,
}

enum Head {
    None,
    /// `pre` is BERT's pooler (tanh), RoBERTa's `classifier.dense` (tanh) or DistilBERT's
    /// `pre_classifier` (ReLU), applied to the first token.
    Sequence {
        pre: Option<(Linear, Activation)>,
        classifier: Linear,
    },
    Token(Linear),
    QuestionAnswering(Linear),
}

/// A loaded BERT-family encoder with its head.
pub struct Encoder {
    pub config: EncoderConfig,
    pub flavor: Flavor,
    pub head_kind: Option<HeadKind>,
    pub problem_type: ProblemType,
    /// Label names in id order (empty for a bare encoder or a QA head).
    pub labels: Vec<String>,
    embeddings: Embeddings,
    blocks: Vec<Block>,
    head: Head,
    activation: Activation,
    dtype: DType,
    device: Device,
    /// Set while training: dropout masks are drawn, from this seed.
    dropout: Option<Dropout>,
}

/// Dropout probabilities of a training pass (transformers' `model.train()`), from the config,
/// and the seed its masks are drawn from (fixed per micro-batch, so a resumed run draws the
/// same ones).
#[derive(Clone, Copy, Debug)]
struct Dropout {
    hidden: f32,
    attention: f32,
    classifier: f32,
    seed: u64,
}

/// Where a dropout mask is drawn, mixed into its seed so that every site gets its own.
#[derive(Clone, Copy)]
enum DropoutSite {
    Embeddings,
    AttentionProbs(usize),
    AttentionOutput(usize),
    FeedForwardOutput(usize),
    ClassifierInput,
    ClassifierDense,
}

impl DropoutSite {
    fn salt(self) -> u64 {
        let (kind, layer) = match self {
            DropoutSite::Embeddings => (1, 0),
            DropoutSite::AttentionProbs(l) => (2, l),
            DropoutSite::AttentionOutput(l) => (3, l),
            DropoutSite::FeedForwardOutput(l) => (4, l),
            DropoutSite::ClassifierInput => (5, 0),
            DropoutSite::ClassifierDense => (6, 0),
        };
        ((kind << 32) | layer as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

impl Encoder {
    /// Load from an HF directory (config.json + safetensors or pytorch_model.bin).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: EncoderConfig = serde_json::from_str(&text)
            .map_err(|e| Error::file(&config_path, format!("invalid encoder config: {e}")))?;
        let weights = WeightStore::open_hf_dir(dir)?;
        Self::from_weights(config, &weights, dtype, device)
    }

    pub fn from_weights(
        config: EncoderConfig,
        w: &WeightStore,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let flavor = Flavor::from_model_type(&config.model_type).ok_or_else(|| {
            Error::UnsupportedArchitecture {
                found: config.model_type.clone(),
                supported: SUPPORTED_ENCODERS,
            }
        })?;
        if let Some(kind) = &config.position_embedding_type {
            if kind != "absolute" {
                return Err(Error::file(
                    w.path(),
                    format!("position_embedding_type `{kind}` is not supported (only absolute)"),
                ));
            }
        }
        let activation = Activation::for_checkpoint(&config.hidden_act, w)?;
        let (h, heads) = (config.hidden_size, config.num_attention_heads);
        if heads == 0 || h % heads != 0 {
            return Err(Error::file(
                w.path(),
                format!("hidden size {h} is not divisible by {heads} attention heads"),
            ));
        }
        let head_kind = config.architectures.iter().find_map(|a| {
            if a.ends_with("ForSequenceClassification") {
                Some(HeadKind::SequenceClassification)
            } else if a.ends_with("ForTokenClassification") {
                Some(HeadKind::TokenClassification)
            } else if a.ends_with("ForQuestionAnswering") {
                Some(HeadKind::QuestionAnswering)
            } else {
                None
            }
        });
        // Checkpoints of a bare encoder have no prefix; those saved with a head have one.
        let with_head = flavor.head_prefix();
        let p = w.prefix_if_present(with_head, "embeddings.word_embeddings.weight");
        let eps = config.layer_norm_eps;
        let linear = |name: &str, i: usize, o: usize| w.linear(name, i, o, true, dtype, device);
        let fused_qkv = |names: [String; 3]| -> Result<Linear> {
            let mut weights = Vec::new();
            let mut biases = Vec::new();
            for name in &names {
                weights.push(w.tensor(&format!("{name}.weight"), &[h, h], dtype, device)?);
                biases.push(w.tensor(&format!("{name}.bias"), &[h], dtype, device)?);
            }
            Ok(Linear::new(
                w.dense_weight(Tensor::cat(&weights, 0)?)?,
                Some(Tensor::cat(&biases, 0)?),
                h,
                3 * h,
            )?
            .with_autocast(w.autocast()))
        };
        let norm = |name: &str| LayerNorm::load(w, name, h, eps, dtype, device);

        let token_type = if flavor == Flavor::DistilBert || config.type_vocab_size == 0 {
            None
        } else {
            Some(w.tensor(
                &format!("{p}embeddings.token_type_embeddings.weight"),
                &[config.type_vocab_size, h],
                dtype,
                device,
            )?)
        };
        let embeddings = Embeddings {
            word: w.embedding(
                &format!("{p}embeddings.word_embeddings.weight"),
                config.vocab_size,
                h,
                dtype,
                device,
            )?,
            position: w.tensor(
                &format!("{p}embeddings.position_embeddings.weight"),
                &[config.max_position_embeddings, h],
                dtype,
                device,
            )?,
            token_type,
            norm: norm(&format!("{p}embeddings.LayerNorm"))?,
        };

        let ffn = config.intermediate_size;
        let blocks = (0..config.num_hidden_layers)
            .map(|i| {
                if flavor == Flavor::DistilBert {
                    let b = format!("{p}transformer.layer.{i}");
                    Ok(Block {
                        qkv: fused_qkv(
                            ["q_lin", "k_lin", "v_lin"].map(|n| format!("{b}.attention.{n}")),
                        )?,
                        attention_out: linear(&format!("{b}.attention.out_lin"), h, h)?,
                        attention_norm: norm(&format!("{b}.sa_layer_norm"))?,
                        ffn_in: linear(&format!("{b}.ffn.lin1"), h, ffn)?,
                        ffn_out: linear(&format!("{b}.ffn.lin2"), ffn, h)?,
                        output_norm: norm(&format!("{b}.output_layer_norm"))?,
                    })
                } else {
                    let b = format!("{p}encoder.layer.{i}");
                    Ok(Block {
                        qkv: fused_qkv(
                            ["query", "key", "value"].map(|n| format!("{b}.attention.self.{n}")),
                        )?,
                        attention_out: linear(&format!("{b}.attention.output.dense"), h, h)?,
                        attention_norm: norm(&format!("{b}.attention.output.LayerNorm"))?,
                        ffn_in: linear(&format!("{b}.intermediate.dense"), h, ffn)?,
                        ffn_out: linear(&format!("{b}.output.dense"), ffn, h)?,
                        output_norm: norm(&format!("{b}.output.LayerNorm"))?,
                    })
                }
            })
            .collect::<Result<Vec<_>>>()?;

        let labels = label_names(&config);
        let n = labels.len();
        let head = match head_kind {
            None => Head::None,
            Some(HeadKind::SequenceClassification) => {
                let (pre, classifier) = match flavor {
                    Flavor::Bert => (
                        Some((linear(&format!("{p}pooler.dense"), h, h)?, Activation::Tanh)),
                        linear("classifier", h, n)?,
                    ),
                    Flavor::Roberta => (
                        Some((linear("classifier.dense", h, h)?, Activation::Tanh)),
                        linear("classifier.out_proj", h, n)?,
                    ),
                    Flavor::DistilBert => (
                        Some((linear("pre_classifier", h, h)?, Activation::Relu)),
                        linear("classifier", h, n)?,
                    ),
                };
                Head::Sequence { pre, classifier }
            }
            Some(HeadKind::TokenClassification) => Head::Token(linear("classifier", h, n)?),
            Some(HeadKind::QuestionAnswering) => {
                Head::QuestionAnswering(linear("qa_outputs", h, 2)?)
            }
        };
        let problem_type = match config.problem_type.as_deref() {
            Some("multi_label_classification") => ProblemType::MultiLabel,
            Some("regression") => ProblemType::Regression,
            // As transformers' pipeline: a single output is read through a sigmoid.
            _ if n == 1 => ProblemType::MultiLabel,
            _ => ProblemType::SingleLabel,
        };
        let labels = if head_kind == Some(HeadKind::QuestionAnswering) {
            Vec::new()
        } else {
            labels
        };
        Ok(Encoder {
            config,
            flavor,
            head_kind,
            problem_type,
            labels,
            embeddings,
            blocks,
            head,
            activation,
            dtype,
            device: device.clone(),
            dropout: None,
        })
    }

    /// The same encoder in training mode: dropout as the checkpoint's config sets it (BERT's
    /// defaults 0.1; DistilBERT's classifier 0.2), masks drawn from `seed`.
    pub fn with_training_dropout(mut self, seed: u64) -> Self {
        let c = &self.config;
        let distil = self.flavor == Flavor::DistilBert;
        let hidden = c.hidden_dropout_prob.unwrap_or(0.1);
        self.dropout = Some(Dropout {
            hidden,
            attention: c.attention_probs_dropout_prob.unwrap_or(0.1),
            classifier: c
                .classifier_dropout
                .unwrap_or(if distil { 0.2 } else { hidden }),
            seed,
        });
        self
    }

    /// `x` with dropout applied at `site` while training; `x` itself otherwise.
    fn dropout(&self, x: Tensor, site: DropoutSite) -> Result<Tensor> {
        let mask = self.dropout_mask(x.dims(), site)?;
        self.apply_dropout(x, mask)
    }

    fn apply_dropout(&self, x: Tensor, mask: Option<Tensor>) -> Result<Tensor> {
        match mask {
            Some(mask) => Ok((x * mask.to_dtype(self.dtype)?.to_device(&self.device)?)?),
            None => Ok(x),
        }
    }

    /// The dropout mask (0 or 1/(1−p), f32 on the CPU) of a tensor of `dims` at `site` while
    /// training with p > 0 there.
    fn dropout_mask(&self, dims: &[usize], site: DropoutSite) -> Result<Option<Tensor>> {
        let Some(d) = self.dropout else {
            return Ok(None);
        };
        let p = match site {
            DropoutSite::Embeddings
            | DropoutSite::AttentionOutput(_)
            | DropoutSite::FeedForwardOutput(_) => d.hidden,
            DropoutSite::AttentionProbs(_) => d.attention,
            DropoutSite::ClassifierInput | DropoutSite::ClassifierDense => d.classifier,
        };
        if p <= 0.0 {
            return Ok(None);
        }
        let mask = crate::weights::linear::dropout_mask(dims, p, d.seed ^ site.salt())?;
        Ok(Some(mask))
    }

    /// The longest input (special tokens included) the position table allows.
    pub fn max_input_tokens(&self) -> usize {
        let offset = match self.flavor {
            // RoBERTa numbers positions from padding_idx + 1.
            Flavor::Roberta => self.config.pad_token_id.unwrap_or(1) as usize + 1,
            _ => 0,
        };
        self.config.max_position_embeddings.saturating_sub(offset)
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Last hidden states (batch, max_len, hidden) of right-padded inputs; rows past an input's
    /// length are padding and meaningless.
    pub fn forward(&self, inputs: &[EncoderInput]) -> Result<Tensor> {
        self.forward_positions(inputs, Positions::All)
    }

    /// [`Self::forward`] for the positions wanted: with [`Positions::FirstOnly`], (batch, 1,
    /// hidden), the first token's state, all a sequence head reads. The last layer still
    /// attends over every position (its keys and values need them all), but its output
    /// projection and feed-forward run for the first token only, which skips five sixths of that
    /// layer's products: the same values as the first row of `forward`, and in training the
    /// same gradients (the other rows never reach the loss).
    pub fn forward_positions(&self, inputs: &[EncoderInput], outputs: Positions) -> Result<Tensor> {
        let (ids, type_ids, positions, mask_bias) = self.pack(inputs)?;
        let lengths: Vec<usize> = inputs.iter().map(|i| i.ids.len()).collect();
        let (b, t) = ids.dims2()?;
        let e = &self.embeddings;
        let mut x = e
            .word
            .forward(&ids.flatten_all()?)?
            .to_dtype(self.dtype)?
            .reshape((b, t, self.hidden_size()))?;
        x = x.broadcast_add(&e.position.index_select(&positions, 0)?.reshape((
            b,
            t,
            self.hidden_size(),
        ))?)?;
        if let Some(table) = &e.token_type {
            let tt = table.index_select(&type_ids.flatten_all()?, 0)?.reshape((
                b,
                t,
                self.hidden_size(),
            ))?;
            x = (x + tt)?;
        }
        x = self.dropout(e.norm.forward(&x)?, DropoutSite::Embeddings)?;
        if self.runs_on_host(&x) {
            return crate::kernels::on_kernel_pool(|| self.blocks_on_host(&x, &lengths, outputs));
        }
        let layers = self.blocks.len();
        for (layer, block) in self.blocks.iter().enumerate() {
            let rows = if layer + 1 == layers {
                outputs
            } else {
                Positions::All
            };
            x = self.block(block, layer, &x, &lengths, mask_bias.as_ref(), rows)?;
        }
        if outputs == Positions::FirstOnly && x.dim(1)? > 1 {
            x = x.narrow(1, 0, 1)?; // a model without layers
        }
        Ok(x)
    }

    fn block(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        lengths: &[usize],
        mask_bias: Option<&Tensor>,
        outputs: Positions,
    ) -> Result<Tensor> {
        let qkv = block.qkv.forward(x)?;
        let mut context = self.attention(&qkv, layer, lengths, mask_bias)?;
        // Masks are drawn for every position and cut to the rows kept, so that computing the
        // first tokens only keeps their draws (and the training run) unchanged.
        let all_positions = x.dims().to_vec();
        let dropout = |y: Tensor, site: DropoutSite| -> Result<Tensor> {
            let mask = match self.dropout_mask(&all_positions, site)? {
                Some(mask) => Some(mask.narrow(1, 0, y.dim(1)?)?),
                None => None,
            };
            self.apply_dropout(y, mask)
        };
        let mut x = x.clone();
        if outputs == Positions::FirstOnly {
            context = context.narrow(1, 0, 1)?;
            x = x.narrow(1, 0, 1)?;
        }
        let mut projected = block.attention_out.forward(&context)?;
        // DistilBERT has no dropout on its attention output projection.
        if self.flavor != Flavor::DistilBert {
            projected = dropout(projected, DropoutSite::AttentionOutput(layer))?;
        }
        let attended = block.attention_norm.forward(&(projected + &x)?)?;
        let inner = self.activation.forward(&block.ffn_in.forward(&attended)?)?;
        let output = dropout(
            block.ffn_out.forward(&inner)?,
            DropoutSite::FeedForwardOutput(layer),
        )?;
        block.output_norm.forward(&(output + attended)?)
    }

    /// Whether the blocks can run on host buffers end to end: f32 inference on the CPU (no
    /// dropout, no gradient), every layer frozen with a host kernel.
    fn runs_on_host(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && !x.track_op()
            && self.dropout.is_none()
            && self.blocks.iter().all(|b| {
                [&b.qkv, &b.attention_out, &b.ffn_in, &b.ffn_out]
                    .iter()
                    .all(|l| l.has_host_kernel())
                    && b.attention_norm.has_host_kernel()
                    && b.output_norm.has_host_kernel()
            })
    }

    /// `block` over every layer on host buffers: the same operations in the same order, the
    /// residual adds fused into the norms, and five buffers reused by all layers instead of a
    /// dozen fresh tensors per layer (a third of a batch's time went to allocating, copying
    /// and synchronising them).
    fn blocks_on_host(&self, x: &Tensor, lengths: &[usize], outputs: Positions) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let (m, heads) = (b * t, self.config.num_attention_heads);
        let ffn = self
            .blocks
            .first()
            .map_or(0, |block| block.ffn_in.out_features());
        let mut x = x.flatten_all()?.to_vec1::<f32>()?; // (m, h)
        let mut qkv = vec![0f32; m * 3 * h]; // (m, 3h)
        let mut context = vec![0f32; m * h];
        let mut attended = vec![0f32; m * h];
        let mut inner = vec![0f32; m * ffn];
        for (layer, block) in self.blocks.iter().enumerate() {
            block.qkv.forward_host(&x, m, &mut qkv)?;
            crate::kernels::attention::bidirectional_attention(
                &qkv,
                b,
                t,
                heads,
                h / heads,
                lengths,
                &mut context,
            );
            // The last layer's rows past each first token feed nothing a sequence head reads.
            let rows = if outputs == Positions::FirstOnly && layer + 1 == self.blocks.len() {
                keep_first_rows(&mut context, b, t, h);
                keep_first_rows(&mut x, b, t, h);
                b
            } else {
                m
            };
            let (context, attended, inner) = (
                &context[..rows * h],
                &mut attended[..rows * h],
                &mut inner[..rows * ffn],
            );
            block.attention_out.forward_host(context, rows, attended)?;
            block.attention_norm.add_forward_host(attended, &x)?;
            block.ffn_in.forward_host(attended, rows, inner)?;
            self.activation.apply_host(inner);
            block.ffn_out.forward_host(inner, rows, &mut x)?;
            block.output_norm.add_forward_host(&mut x, attended)?;
        }
        if outputs == Positions::FirstOnly {
            if x.len() > b * h {
                keep_first_rows(&mut x, b, t, h); // a model without layers
            }
            return Ok(Tensor::from_vec(x, (b, 1, h), &self.device)?);
        }
        Ok(Tensor::from_vec(x, (b, t, h), &self.device)?)
    }

    /// Self-attention over each sequence's unpadded keys: (b, t, 3h) fused projections -> (b, t, h).
    fn attention(
        &self,
        qkv: &Tensor,
        layer: usize,
        lengths: &[usize],
        mask_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, three_h) = qkv.dims3()?;
        let h = three_h / 3;
        let heads = self.config.num_attention_heads;
        let hd = h / heads;
        if qkv.device().is_cpu() && qkv.dtype() == DType::F32 && !qkv.track_op() {
            let data = qkv.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; b * t * h];
            crate::kernels::attention::bidirectional_attention(
                &data, b, t, heads, hd, lengths, &mut out,
            );
            return Ok(Tensor::from_vec(out, (b, t, h), qkv.device())?);
        }
        if crate::autograd::supports(qkv) {
            // Training on the CPU: one op forward and one backward (the same dropout mask).
            let site = DropoutSite::AttentionProbs(layer);
            let mask = self.dropout_mask(&[b, heads, t, t], site)?;
            return crate::autograd::bidirectional_attention(qkv, heads, lengths, mask);
        }
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * h, h)?
                .reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = (split(0)? * (1.0 / (hd as f64).sqrt()))?;
        let (k, v) = (split(1)?, split(2)?);
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(bias) = mask_bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = if scores.track_op() {
            candle_nn::ops::softmax(&scores, D::Minus1)? // differentiable
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = self.dropout(probs, DropoutSite::AttentionProbs(layer))?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?)
    }

    /// Pad the batch: (ids, type ids, flat position ids, additive key mask (b,1,1,t) when padded).
    fn pack(&self, inputs: &[EncoderInput]) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        if inputs.is_empty() {
            return Err(Error::invalid("no inputs to encode"));
        }
        let t = inputs.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        let limit = self.max_input_tokens();
        for input in inputs {
            if input.ids.is_empty() {
                return Err(Error::invalid("an input has no tokens"));
            }
            if input.ids.len() > limit {
                return Err(Error::ContextOverflow {
                    prompt_tokens: input.ids.len(),
                    context: limit,
                });
            }
            if let Some(bad) = input
                .ids
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(Error::invalid(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            if let Some(bad) = input
                .type_ids
                .iter()
                .find(|&&id| id as usize >= self.config.type_vocab_size.max(1))
            {
                return Err(Error::invalid(format!(
                    "token type id {bad} is outside the model's {} segment types",
                    self.config.type_vocab_size
                )));
            }
        }
        let b = inputs.len();
        let pad = self.config.pad_token_id.unwrap_or(0);
        let first_position = match self.flavor {
            Flavor::Roberta => pad + 1,
            _ => 0,
        };
        let mut ids = vec![pad; b * t];
        let mut type_ids = vec![0u32; b * t];
        let mut positions = vec![first_position; b * t];
        let mut bias = vec![0f32; b * t];
        for (row, input) in inputs.iter().enumerate() {
            let n = input.ids.len();
            ids[row * t..row * t + n].copy_from_slice(&input.ids);
            for (dst, src) in type_ids[row * t..].iter_mut().zip(&input.type_ids) {
                *dst = *src;
            }
            for (i, p) in positions[row * t..row * t + n].iter_mut().enumerate() {
                *p = first_position + i as u32;
            }
            bias[row * t + n..(row + 1) * t].fill(f32::MIN);
        }
        let padded = inputs.iter().any(|i| i.ids.len() < t);
        let mask_bias = if padded {
            Some(Tensor::from_vec(bias, (b, 1, 1, t), &self.device)?.to_dtype(self.dtype)?)
        } else {
            None
        };
        Ok((
            Tensor::from_vec(ids, (b, t), &self.device)?,
            Tensor::from_vec(type_ids, (b, t), &self.device)?,
            Tensor::from_vec(positions, b * t, &self.device)?,
            mask_bias,
        ))
    }

    fn require(&self, wanted: HeadKind) -> Result<()> {
        if self.head_kind == Some(wanted) {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "this task needs a model with {}, but the model has {}",
            HeadKind::describe(Some(wanted)).trim_start_matches("a "),
            HeadKind::describe(self.head_kind)
        )))
    }

    /// Sequence-classification logits (batch, labels) from `forward`'s hidden states.
    pub fn sequence_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.require(HeadKind::SequenceClassification)?;
        let Head::Sequence { pre, classifier } = &self.head else {
            unreachable!("head kind checked above");
        };
        let mut x = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        // RoBERTa's head drops out before its dense layer too; BERT's pooler and DistilBERT's
        // pre_classifier come before the only dropout.
        if self.flavor == Flavor::Roberta {
            x = self.dropout(x, DropoutSite::ClassifierDense)?;
        }
        if let Some((dense, act)) = pre {
            x = act.forward(&dense.forward(&x)?)?;
        }
        x = self.dropout(x, DropoutSite::ClassifierInput)?;
        Ok(classifier.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Token-classification logits (batch, max_len, labels).
    pub fn token_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.require(HeadKind::TokenClassification)?;
        let Head::Token(classifier) = &self.head else {
            unreachable!("head kind checked above");
        };
        Ok(classifier.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// Answer-span logits (start, end), each (batch, max_len).
    pub fn span_logits(&self, hidden: &Tensor) -> Result<(Tensor, Tensor)> {
        self.require(HeadKind::QuestionAnswering)?;
        let Head::QuestionAnswering(qa) = &self.head else {
            unreachable!("head kind checked above");
        };
        let logits = qa.forward(hidden)?.to_dtype(DType::F32)?;
        Ok((
            logits.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?,
            logits.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?,
        ))
    }
}

/// Keep row 0 of each of `b` sequences of `t` rows of `h` values, packed at the front.
fn keep_first_rows(values: &mut Vec<f32>, b: usize, t: usize, h: usize) {
    for i in 1..b {
        values.copy_within(i * t * h..i * t * h + h, i * h);
    }
    values.truncate(b * h);
}

/// `id2label` in id order; ids missing from the map get transformers' `LABEL_i` names.
fn label_names(config: &EncoderConfig) -> Vec<String> {
    let Some(map) = &config.id2label else {
        return Vec::new();
    };
    let by_id: BTreeMap<usize, &String> = map
        .iter()
        .filter_map(|(k, v)| Some((k.parse::<usize>().ok()?, v)))
        .collect();
    let n = by_id.keys().next_back().map_or(0, |m| m + 1);
    (0..n)
        .map(|i| {
            by_id
                .get(&i)
                .map_or_else(|| format!("LABEL_{i}"), |s| s.to_string())
        })
        .collect()
}
