//! Model families behind narrow traits. A decoder is a `CausalLM`: the CLI, the server's
//! scheduler, perplexity and the trainer all drive it the same way.

pub mod attention;
pub mod bert;
pub mod gpt2;
pub mod gpt_neo;
pub mod gptj;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod marian;
pub mod t5;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

pub use kv_cache::KvCache;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::{Embedding, GgufFile, Lora, ModelSource, WeightStore};

/// Facts about a loaded decoder that callers need.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub architecture: String,
    pub vocab_size: usize,
    pub context_length: usize,
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// An encoder's output as an encoder-decoder's decoder reads it: each decoder layer's
/// cross-attention keys and values (heads, source tokens, head_dim), computed once per source.
pub struct EncoderMemory {
    pub layers: Vec<(Tensor, Tensor)>,
    /// The encoder's last hidden states (source tokens, d_model).
    pub hidden: Tensor,
}

impl EncoderMemory {
    /// Cross-attention for a decoder step whose row i reads source `memories[i]`: the rows of
    /// one source (consecutive, as a search's beams are) go through `attend` together with its
    /// memory; the results come back in row order.
    pub fn attend_each(
        x: &Tensor,
        memories: &[&EncoderMemory],
        mut attend: impl FnMut(&Tensor, &EncoderMemory) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if memories.len() != x.dim(0)? {
            return Err(Error::invalid(format!(
                "{} decoder rows but {} encoder memories",
                x.dim(0)?,
                memories.len()
            )));
        }
        let mut parts = Vec::new();
        let mut start = 0;
        while start < memories.len() {
            let same = memories[start..]
                .iter()
                .take_while(|m| std::ptr::eq(**m, memories[start]))
                .count();
            parts.push(attend(&x.narrow(0, start, same)?, memories[start])?);
            start += same;
        }
        Ok(match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Tensor::cat(&parts, 0)?,
        })
    }
}

/// Which positions of a sequence the caller wants logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted<'a> {
    /// Only the last new position (generation).
    Last,
    /// Every new position (perplexity).
    All,
    /// These new positions, in order (training: only where a target token follows).
    Positions(&'a [u32]),
}

/// One sequence's share of a forward pass: its new tokens, appended after what its cache holds.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: LogitsWanted<'a>,
}

/// A decoder-only language model over a batch of sequences at different positions.
pub trait CausalLM: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// An empty cache for one sequence.
    fn new_cache(&self) -> KvCache;

    /// Run every sequence's new tokens, extending its cache. Returns f32 logits (rows, vocab):
    /// for each sequence in order, one row (`Last`) or one row per new token (`All`).
    fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Tensor>;
}

/// All new tokens of a batch as one (n,) id tensor, after checking them.
pub(crate) fn packed_ids(
    batch: &[SeqInput<'_>],
    info: &ModelInfo,
    device: &Device,
) -> Result<Tensor> {
    let mut ids = Vec::new();
    for seq in batch {
        if seq.tokens.is_empty() {
            return Err(Error::invalid("a sequence in the batch has no new tokens"));
        }
        let end = seq.cache.len() + seq.tokens.len();
        if end > info.context_length {
            return Err(Error::ContextOverflow {
                prompt_tokens: end,
                context: info.context_length,
            });
        }
        if let Some(bad) = seq.tokens.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                info.vocab_size
            )));
        }
        ids.extend_from_slice(seq.tokens);
    }
    Ok(Tensor::new(ids, device)?)
}

/// Token embeddings plus learned absolute position embeddings (GPT-2, GPT-Neo): each new
/// token sits at its sequence's cache length onwards. Returns (n, hidden) in `dtype`.
pub(crate) fn embed_with_positions(
    token_table: &Embedding,
    position_table: &Tensor,
    ids: &Tensor,
    batch: &[SeqInput<'_>],
    dtype: DType,
) -> Result<Tensor> {
    let positions: Vec<u32> = batch
        .iter()
        .flat_map(|s| (s.cache.len()..s.cache.len() + s.tokens.len()).map(|p| p as u32))
        .collect();
    let positions = Tensor::new(positions, position_table.device())?;
    Ok((token_table.forward(ids)?.to_dtype(dtype)?
        + position_table.index_select(&positions, 0)?)?)
}

/// Run `attend(i, row_offset, t, cache)` for each sequence `i` of the batch (its `t` new rows start
/// at `row_offset` of the packed activations) and stack the results in batch order.
pub(crate) fn per_sequence(
    batch: &mut [SeqInput<'_>],
    mut attend: impl FnMut(usize, usize, usize, &mut KvCache) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut outputs = Vec::with_capacity(batch.len());
    let mut offset = 0;
    for (i, seq) in batch.iter_mut().enumerate() {
        let t = seq.tokens.len();
        outputs.push(attend(i, offset, t, seq.cache)?);
        offset += t;
    }
    if outputs.len() == 1 {
        return Ok(outputs.pop().expect("one sequence"));
    }
    Ok(Tensor::cat(&outputs, 0)?)
}

/// After the last layer: commit the new positions to every cache and keep the rows whose logits are wanted.
pub(crate) fn finish_batch(x: &Tensor, batch: &mut [SeqInput<'_>]) -> Result<Tensor> {
    for seq in batch.iter_mut() {
        seq.cache.advance(seq.tokens.len());
    }
    select_logit_rows(x, batch)
}

/// Keep the hidden-state rows whose logits are wanted, so the vocabulary projection runs only on those.
fn select_logit_rows(x: &Tensor, batch: &[SeqInput<'_>]) -> Result<Tensor> {
    if batch.iter().all(|s| s.logits == LogitsWanted::All) {
        return Ok(x.clone());
    }
    let mut rows = Vec::new();
    let mut offset = 0u32;
    for seq in batch {
        let t = seq.tokens.len() as u32;
        match seq.logits {
            LogitsWanted::All => rows.extend(offset..offset + t),
            LogitsWanted::Last => rows.push(offset + t - 1),
            LogitsWanted::Positions(positions) => {
                if let Some(bad) = positions.iter().find(|&&p| p >= t) {
                    return Err(Error::invalid(format!(
                        "logits wanted at position {bad} of a sequence with {t} new tokens"
                    )));
                }
                rows.extend(positions.iter().map(|p| offset + p));
            }
        }
        offset += t;
    }
    let index = Tensor::new(rows, x.device())?;
    Ok(x.index_select(&index, 0)?)
}

/// Options for loading a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// Activation and dense-weight dtype; f32 is the CPU default.
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

/// A decoder with its tokenizer: what generate, chat, perplexity and serve work with.
#[derive(Clone)]
pub struct LanguageModel {
    pub model: Arc<dyn CausalLM>,
    pub tokenizer: Arc<Tokenizer>,
    pub source: ModelSource,
}

/// A family's config struct from config.json's value (its type is inferred at the call).
fn parse_config<C: serde::de::DeserializeOwned>(
    config: serde_json::Value,
    path: &std::path::Path,
) -> Result<C> {
    serde_json::from_value(config).map_err(|e| Error::file(path, format!("invalid config: {e}")))
}

const SUPPORTED_DECODERS: &str = "llama, mistral, qwen2 (LlamaForCausalLM, MistralForCausalLM, \
     Qwen2ForCausalLM), gpt2, gpt_neo (GPTNeoForCausalLM), gptj (GPTJForCausalLM)";

impl LanguageModel {
    /// Load a decoder and its tokenizer from a model spec (path or hub id).
    pub fn load(spec: &str, options: &LoadOptions) -> Result<Self> {
        Self::load_adapted(spec, options, None)
    }

    /// Load a decoder with a LoRA adapter on its targeted linear layers (the base stays frozen).
    pub fn load_adapted(
        spec: &str,
        options: &LoadOptions,
        lora: Option<Arc<Lora>>,
    ) -> Result<Self> {
        let source = ModelSource::resolve(spec)?;
        let model = Self::load_source(source, options, lora.clone())?;
        if let Some(lora) = lora {
            lora.check_attached(model.source.path())?;
        }
        Ok(model)
    }

    fn load_source(
        source: ModelSource,
        options: &LoadOptions,
        lora: Option<Arc<Lora>>,
    ) -> Result<Self> {
        let adapt = |weights: WeightStore| match &lora {
            Some(lora) => WeightStore::Adapted {
                base: Arc::new(weights),
                lora: lora.clone(),
            },
            None => weights,
        };
        let (model, tokenizer): (Arc<dyn CausalLM>, Tokenizer) = match &source {
            ModelSource::HfDir(dir) => {
                let config_path = dir.join("config.json");
                let text = std::fs::read_to_string(&config_path)
                    .map_err(|e| Error::io(&config_path, e))?;
                let config: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::file(&config_path, format!("invalid JSON: {e}")))?;
                let model_type = config
                    .get("model_type")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string();
                let weights = adapt(WeightStore::open_hf_dir(dir)?);
                let (dtype, device) = (options.dtype, &options.device);
                let model: Arc<dyn CausalLM> = match model_type.as_str() {
                    "llama" | "mistral" | "qwen2" => Arc::new(llama::Llama::load(
                        &parse_config(config, &config_path)?,
                        &weights,
                        attention::RopeStyle::Half,
                        dtype,
                        device,
                    )?),
                    "gpt2" => Arc::new(gpt2::Gpt2::load(
                        &parse_config(config, &config_path)?,
                        &weights,
                        dtype,
                        device,
                    )?),
                    "gpt_neo" => Arc::new(gpt_neo::GptNeo::load(
                        &parse_config(config, &config_path)?,
                        &weights,
                        dtype,
                        device,
                    )?),
                    "gptj" => Arc::new(gptj::Gptj::load(
                        &parse_config(config, &config_path)?,
                        &weights,
                        dtype,
                        device,
                    )?),
                    other => {
                        return Err(Error::UnsupportedArchitecture {
                            found: if other.is_empty() {
                                "(config.json has no model_type)".into()
                            } else {
                                other.into()
                            },
                            supported: SUPPORTED_DECODERS,
                        })
                    }
                };
                (model, Tokenizer::from_hf_dir(dir)?)
            }
            ModelSource::Gguf(path) => {
                let gguf = Arc::new(GgufFile::open(path)?);
                let arch = gguf.get_str("general.architecture")?.to_string();
                let style = match arch.as_str() {
                    // llama.cpp's converter permutes Llama Q/K rows for adjacent-pair rotation.
                    "llama" | "mistral" => attention::RopeStyle::Interleaved,
                    "qwen2" => attention::RopeStyle::Half,
                    other => {
                        return Err(Error::UnsupportedArchitecture {
                            found: other.into(),
                            supported: "llama, mistral, qwen2 (GGUF)",
                        })
                    }
                };
                let cfg = llama::LlamaConfig::from_gguf(&gguf, &arch)?;
                let tokenizer = Tokenizer::from_gguf(&gguf)?;
                let weights = adapt(WeightStore::Gguf(gguf));
                let model =
                    llama::Llama::load(&cfg, &weights, style, options.dtype, &options.device)?;
                (Arc::new(model), tokenizer)
            }
        };
        Ok(LanguageModel {
            model,
            tokenizer: Arc::new(tokenizer),
            source,
        })
    }
}
