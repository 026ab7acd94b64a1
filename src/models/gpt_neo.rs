//! GPT-Neo: GPT-3's architecture as EleutherAI replicated it. GPT-2's pre-LayerNorm blocks and
//! learned positions, with separate q/k/v projections, unscaled attention scores, and layers
//! that alternate between global attention and local attention over the last `window_size`
//! positions.

use candle_core::{DType, Device, Tensor};

use super::attention::{batch_attention, AttentionShape};
use super::kv_cache::KvCache;
use super::layers::{Activation, LayerNorm};
use super::{CausalLM, ModelInfo, SeqInput};
use crate::error::{Error, Result};
use crate::weights::{Embedding, Linear, WeightStore};

/// config.json of a GPT-Neo checkpoint.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct GptNeoConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Run-length form, e.g. `[[["global", "local"], 6]]`: the pattern repeated 6 times.
    #[serde(default)]
    pub attention_types: Vec<(Vec<String>, usize)>,
    #[serde(default = "default_window")]
    pub window_size: usize,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_tied")]
    pub tie_word_embeddings: bool,
}

fn default_window() -> usize {
    256
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_tied() -> bool {
    true
}

impl GptNeoConfig {
    /// Each layer's attention window: `None` for global layers.
    fn layer_windows(&self) -> Result<Vec<Option<usize>>> {
        let mut windows = Vec::with_capacity(self.num_layers);
        for (pattern, repeat) in &self.attention_types {
            for _ in 0..*repeat {
                for kind in pattern {
                    windows.push(match kind.as_str() {
                        "global" => None,
                        "local" => Some(self.window_size),
                        other => {
                            return Err(Error::invalid(format!(
                                "GPT-Neo attention type `{other}` is not one of global, local"
                            )))
                        }
                    });
                }
            }
        }
        if windows.len() != self.num_layers {
            return Err(Error::invalid(format!(
                "GPT-Neo attention_types describe {} layers but num_layers is {}",
                windows.len(),
                self.num_layers
            )));
        }
        Ok(windows)
    }
}

struct Block {
    ln_1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    window: Option<usize>,
}

/// A GPT-Neo decoder.
pub struct GptNeo {
    wte: Embedding,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    activation: Activation,
    heads: usize,
    info: ModelInfo,
    dtype: DType,
    device: Device,
}

impl GptNeo {
    pub fn load(
        cfg: &GptNeoConfig,
        w: &WeightStore,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let activation = Activation::for_checkpoint(&cfg.activation_function, w)?;
        let (d, heads, eps) = (cfg.hidden_size, cfg.num_heads, cfg.layer_norm_epsilon);
        if heads == 0 || d % heads != 0 {
            return Err(Error::file(
                w.path(),
                format!("hidden_size {d} is not a multiple of num_heads {heads}"),
            ));
        }
        let windows = cfg
            .layer_windows()
            .map_err(|e| Error::file(w.path(), e.to_string()))?;
        let inner = cfg.intermediate_size.unwrap_or(4 * d);
        // GPTNeoForCausalLM's names start with `transformer.`; GPTNeoModel's do not.
        let p = w.prefix_if_present("transformer.", "wte.weight");
        let mut wte = w.embedding(&format!("{p}wte.weight"), cfg.vocab_size, d, dtype, device)?;
        let wpe = w.tensor(
            &format!("{p}wpe.weight"),
            &[cfg.max_position_embeddings, d],
            dtype,
            device,
        )?;
        let blocks = windows
            .iter()
            .enumerate()
            .map(|(i, &window)| {
                let b = format!("{p}h.{i}");
                let lin = |name: &str, inp: usize, out: usize, bias: bool| {
                    w.linear(&format!("{b}.{name}"), inp, out, bias, dtype, device)
                };
                let norm =
                    |name: &str| LayerNorm::load(w, &format!("{b}.{name}"), d, eps, dtype, device);
                Ok(Block {
                    ln_1: norm("ln_1")?,
                    q_proj: lin("attn.attention.q_proj", d, d, false)?,
                    k_proj: lin("attn.attention.k_proj", d, d, false)?,
                    v_proj: lin("attn.attention.v_proj", d, d, false)?,
                    out_proj: lin("attn.attention.out_proj", d, d, true)?,
                    ln_2: norm("ln_2")?,
                    c_fc: lin("mlp.c_fc", d, inner, true)?,
                    c_proj: lin("mlp.c_proj", inner, d, true)?,
                    window,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(w, &format!("{p}ln_f"), d, eps, dtype, device)?;
        let lm_head = if cfg.tie_word_embeddings || !w.contains("lm_head.weight") {
            WeightStore::tied_linear(&mut wte, cfg.vocab_size, d)?
        } else {
            w.linear("lm_head", d, cfg.vocab_size, false, dtype, device)?
        };
        let info = ModelInfo {
            architecture: "gpt_neo".into(),
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position_embeddings,
            num_layers: cfg.num_layers,
            kv_heads: heads,
            head_dim: d / heads,
        };
        Ok(GptNeo {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            activation,
            heads,
            info,
            dtype,
            device: device.clone(),
        })
    }
}

impl CausalLM for GptNeo {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_cache(&self) -> KvCache {
        KvCache::for_model(&self.info, self.dtype, &self.device)
    }

    fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Tensor> {
        let ids = super::packed_ids(batch, &self.info, &self.device)?;
        let mut x = super::embed_with_positions(&self.wte, &self.wpe, &ids, batch, self.dtype)?;
        for (index, block) in self.blocks.iter().enumerate() {
            let h = block.ln_1.forward(&x)?;
            // GPT-Neo does not scale the scores by 1/sqrt(head_dim).
            let shape = AttentionShape {
                scale: 1.0,
                window: block.window,
                ..AttentionShape::new(self.heads, self.heads, self.info.head_dim)
            };
            let attended = batch_attention(
                &shape,
                &block.q_proj.forward(&h)?,
                &block.k_proj.forward(&h)?,
                &block.v_proj.forward(&h)?,
                batch,
                index,
            )?;
            x = (x + block.out_proj.forward(&attended)?)?;
            let h = self
                .activation
                .forward(&block.c_fc.forward(&block.ln_2.forward(&x)?)?)?;
            x = (x + block.c_proj.forward(&h)?)?;
        }
        let x = super::finish_batch(&x, batch)?;
        Ok(self
            .lm_head
            .forward(&self.ln_f.forward(&x)?)?
            .to_dtype(DType::F32)?)
    }
}
