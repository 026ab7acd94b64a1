//! GPT-J: one LayerNorm feeding attention and MLP in parallel (both added to the residual),
//! rotary positions on the first `rotary_dim` dimensions of each head in adjacent pairs, and
//! an untied output projection with a bias.

use candle_core::{DType, Device, Tensor};

use super::attention::{batch_attention, rope_tables, AttentionShape, Rope, RopeStyle};
use super::kv_cache::KvCache;
use super::layers::{Activation, LayerNorm};
use super::{CausalLM, ModelInfo, SeqInput};
use crate::error::{Error, Result};
use crate::weights::{Embedding, Linear, WeightStore};

/// config.json of a GPT-J checkpoint.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct GptjConfig {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Dimensions of each head that rotate; the whole head when absent.
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}

struct Block {
    ln_1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    fc_in: Linear,
    fc_out: Linear,
}

/// A GPT-J decoder.
pub struct Gptj {
    wte: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    rope: Rope,
    activation: Activation,
    heads: usize,
    info: ModelInfo,
    dtype: DType,
    device: Device,
}

impl Gptj {
    pub fn load(cfg: &GptjConfig, w: &WeightStore, dtype: DType, device: &Device) -> Result<Self> {
        let activation = Activation::for_checkpoint(&cfg.activation_function, w)?;
        let (d, heads, eps) = (cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon);
        if heads == 0 || d % heads != 0 {
            return Err(Error::file(
                w.path(),
                format!("n_embd {d} is not a multiple of n_head {heads}"),
            ));
        }
        let head_dim = d / heads;
        let rotary_dim = cfg.rotary_dim.unwrap_or(head_dim);
        if rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
            return Err(Error::file(
                w.path(),
                format!(
                    "rotary_dim {rotary_dim} must be even and at most the head size {head_dim}"
                ),
            ));
        }
        let inner = cfg.n_inner.unwrap_or(4 * d);
        let p = w.prefix_if_present("transformer.", "wte.weight");
        let mut wte = w.embedding(&format!("{p}wte.weight"), cfg.vocab_size, d, dtype, device)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let b = format!("{p}h.{i}");
                let lin = |name: &str, inp: usize, out: usize, bias: bool| {
                    w.linear(&format!("{b}.{name}"), inp, out, bias, dtype, device)
                };
                Ok(Block {
                    ln_1: LayerNorm::load(w, &format!("{b}.ln_1"), d, eps, dtype, device)?,
                    q_proj: lin("attn.q_proj", d, d, false)?,
                    k_proj: lin("attn.k_proj", d, d, false)?,
                    v_proj: lin("attn.v_proj", d, d, false)?,
                    out_proj: lin("attn.out_proj", d, d, false)?,
                    fc_in: lin("mlp.fc_in", d, inner, true)?,
                    fc_out: lin("mlp.fc_out", inner, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(w, &format!("{p}ln_f"), d, eps, dtype, device)?;
        let lm_head = if cfg.tie_word_embeddings {
            WeightStore::tied_linear(&mut wte, cfg.vocab_size, d)?
        } else {
            w.linear("lm_head", d, cfg.vocab_size, true, dtype, device)?
        };
        let info = ModelInfo {
            architecture: "gptj".into(),
            vocab_size: cfg.vocab_size,
            context_length: cfg.n_positions,
            num_layers: cfg.n_layer,
            kv_heads: heads,
            head_dim,
        };
        Ok(Gptj {
            wte,
            blocks,
            ln_f,
            lm_head,
            rope: Rope::new(rotary_dim, 10_000.0, None, RopeStyle::Interleaved)?,
            activation,
            heads,
            info,
            dtype,
            device: device.clone(),
        })
    }
}

impl CausalLM for Gptj {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_cache(&self) -> KvCache {
        KvCache::for_model(&self.info, self.dtype, &self.device)
    }

    fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Tensor> {
        let ids = super::packed_ids(batch, &self.info, &self.device)?;
        let mut x = self.wte.forward(&ids)?.to_dtype(self.dtype)?; // (n, d)
        let tables = rope_tables(&self.rope, batch, &self.device)?;
        let shape = AttentionShape {
            rope: Some((&self.rope, &tables)),
            ..AttentionShape::new(self.heads, self.heads, self.info.head_dim)
        };
        for (index, block) in self.blocks.iter().enumerate() {
            let h = block.ln_1.forward(&x)?;
            let attended = batch_attention(
                &shape,
                &block.q_proj.forward(&h)?,
                &block.k_proj.forward(&h)?,
                &block.v_proj.forward(&h)?,
                batch,
                index,
            )?;
            let mlp = block
                .fc_out
                .forward(&self.activation.forward(&block.fc_in.forward(&h)?)?)?;
            x = ((x + block.out_proj.forward(&attended)?)? + mlp)?;
        }
        let x = super::finish_batch(&x, batch)?;
        Ok(self
            .lm_head
            .forward(&self.ln_f.forward(&x)?)?
            .to_dtype(DType::F32)?)
    }
}
