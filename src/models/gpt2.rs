//! GPT-2: learned absolute positions, pre-LayerNorm blocks of fused-QKV attention and a GELU MLP.
//! HF stores its projections as `Conv1D`, i.e. weights of shape (in, out).

use candle_core::{DType, Device, Tensor};

use super::attention::{batch_attention, AttentionShape};
use super::kv_cache::KvCache;
use super::layers::{Activation, LayerNorm};
use super::{CausalLM, ModelInfo, SeqInput};
use crate::error::Result;
use crate::weights::{Embedding, Linear, WeightStore};

/// config.json of a GPT-2 checkpoint.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}

fn conv1d(
    w: &WeightStore,
    name: &str,
    inp: usize,
    out: usize,
    dtype: DType,
    device: &Device,
) -> Result<Linear> {
    let weight = w
        .tensor(&format!("{name}.weight"), &[inp, out], dtype, device)?
        .t()?
        .contiguous()?;
    let bias = w.tensor(&format!("{name}.bias"), &[out], dtype, device)?;
    Linear::new(w.dense_weight(weight)?, Some(bias), inp, out)
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// A GPT-2 decoder.
pub struct Gpt2 {
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

impl Gpt2 {
    pub fn load(cfg: &Gpt2Config, w: &WeightStore, dtype: DType, device: &Device) -> Result<Self> {
        let activation = Activation::for_checkpoint(&cfg.activation_function, w)?;
        // Checkpoints saved from GPT2LMHeadModel prefix names with `transformer.`; GPT2Model's do not.
        let p = w.prefix_if_present("transformer.", "wte.weight");
        let (d, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        let inner = cfg.n_inner.unwrap_or(4 * d);
        let mut wte = w.embedding(&format!("{p}wte.weight"), cfg.vocab_size, d, dtype, device)?;
        let wpe = w.tensor(
            &format!("{p}wpe.weight"),
            &[cfg.n_positions, d],
            dtype,
            device,
        )?;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let b = format!("{p}h.{i}");
                Ok(Block {
                    ln_1: LayerNorm::load(w, &format!("{b}.ln_1"), d, eps, dtype, device)?,
                    c_attn: conv1d(w, &format!("{b}.attn.c_attn"), d, 3 * d, dtype, device)?,
                    attn_proj: conv1d(w, &format!("{b}.attn.c_proj"), d, d, dtype, device)?,
                    ln_2: LayerNorm::load(w, &format!("{b}.ln_2"), d, eps, dtype, device)?,
                    c_fc: conv1d(w, &format!("{b}.mlp.c_fc"), d, inner, dtype, device)?,
                    mlp_proj: conv1d(w, &format!("{b}.mlp.c_proj"), inner, d, dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(w, &format!("{p}ln_f"), d, eps, dtype, device)?;
        let lm_head = WeightStore::tied_linear(&mut wte, cfg.vocab_size, d)?;
        let info = ModelInfo {
            architecture: "gpt2".into(),
            vocab_size: cfg.vocab_size,
            context_length: cfg.n_positions,
            num_layers: cfg.n_layer,
            kv_heads: cfg.n_head,
            head_dim: d / cfg.n_head,
        };
        Ok(Gpt2 {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            activation,
            heads: cfg.n_head,
            info,
            dtype,
            device: device.clone(),
        })
    }
}

impl CausalLM for Gpt2 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_cache(&self) -> KvCache {
        KvCache::for_model(&self.info, self.dtype, &self.device)
    }

    fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Tensor> {
        let ids = super::packed_ids(batch, &self.info, &self.device)?;
        let mut x = super::embed_with_positions(&self.wte, &self.wpe, &ids, batch, self.dtype)?;
        let d = self.info.head_dim * self.heads;
        let shape = AttentionShape::new(self.heads, self.heads, self.info.head_dim);
        for (index, block) in self.blocks.iter().enumerate() {
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x)?)?; // (n, 3d)
            let column = |i: usize| qkv.narrow(1, i * d, d);
            let attended =
                batch_attention(&shape, &column(0)?, &column(1)?, &column(2)?, batch, index)?;
            x = (x + block.attn_proj.forward(&attended)?)?;
            let h = self
                .activation
                .forward(&block.c_fc.forward(&block.ln_2.forward(&x)?)?)?;
            x = (x + block.mlp_proj.forward(&h)?)?;
        }
        let x = super::finish_batch(&x, batch)?;
        Ok(self
            .lm_head
            .forward(&self.ln_f.forward(&x)?)?
            .to_dtype(DType::F32)?)
    }
}
