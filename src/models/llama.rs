//! The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): pre-norm decoder blocks of
//! RMSNorm -> grouped-query attention with rotary positions -> RMSNorm -> SwiGLU MLP.

use candle_core::{DType, Device, Tensor};

use super::attention::{
    batch_attention, rope_tables, AttentionShape, Rope, RopeScaling, RopeStyle,
};
use super::kv_cache::KvCache;
use super::{CausalLM, ModelInfo, SeqInput};
use crate::error::{Error, Result};
use crate::weights::{Embedding, GgufFile, Linear, WeightStore};

/// config.json of a Llama-family checkpoint, with HF's defaults.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f32>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers >= 5 writes `rope_theta` and the scaling here instead.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral / Qwen2 local attention; used only when set (Qwen2 also needs `use_sliding_window`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn rope_theta(&self) -> f32 {
        let nested = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta")?.as_f64());
        self.rope_theta
            .or(nested.map(|t| t as f32))
            .unwrap_or(10_000.0)
    }

    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        if self.rope_scaling.is_some() {
            return Ok(self.rope_scaling.clone());
        }
        let Some(params) = &self.rope_parameters else {
            return Ok(None);
        };
        if params.get("rope_type").is_none() && params.get("type").is_none() {
            return Ok(None);
        }
        serde_json::from_value(params.clone())
            .map(Some)
            .map_err(|e| Error::invalid(format!("config rope_parameters: {e}")))
    }

    /// Qwen2 always has q/k/v biases; Llama has them only with `attention_bias`.
    fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    fn window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            "qwen2" if self.use_sliding_window == Some(true) => self.sliding_window,
            _ => None,
        }
    }

    /// The same config, read from a GGUF file's `{arch}.*` metadata.
    pub fn from_gguf(gguf: &GgufFile, arch: &str) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let heads = gguf.get_u32(&key("attention.head_count"))? as usize;
        let hidden = gguf.get_u32(&key("embedding_length"))? as usize;
        let vocab = match gguf.opt(&key("vocab_size"), GgufFile::get_u32)? {
            Some(v) => v as usize,
            None => gguf.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let key_length = gguf
            .opt(&key("attention.key_length"), GgufFile::get_u32)?
            .map(|v| v as usize);
        Ok(LlamaConfig {
            model_type: arch.to_string(),
            hidden_size: hidden,
            intermediate_size: gguf.get_u32(&key("feed_forward_length"))? as usize,
            num_hidden_layers: gguf.get_u32(&key("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: gguf
                .opt(&key("attention.head_count_kv"), GgufFile::get_u32)?
                .map(|v| v as usize),
            head_dim: key_length,
            rms_norm_eps: gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))? as f64,
            rope_theta: gguf.opt(&key("rope.freq_base"), GgufFile::get_f32)?,
            rope_scaling: None,
            rope_parameters: None,
            max_position_embeddings: gguf
                .opt(&key("context_length"), GgufFile::get_u32)?
                .map_or(2048, |v| v as usize),
            vocab_size: vocab,
            tie_word_embeddings: !gguf.has_tensor("output.weight"),
            attention_bias: gguf.has_tensor("blk.0.attn_output.bias"),
            mlp_bias: false,
            sliding_window: None,
            use_sliding_window: None,
        })
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(
        w: &WeightStore,
        name: &str,
        size: usize,
        eps: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.tensor(&format!("{name}.weight"), &[size], dtype, device)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused kernel has no backward pass: training takes ours, or the composite.
        if x.track_op() || self.weight.track_op() {
            if crate::autograd::supports(x) && crate::autograd::supports(&self.weight) {
                return crate::autograd::rms_norm(x, &self.weight, self.eps);
            }
            return Ok(candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?);
        }
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// SwiGLU: down(silu(gate(x)) * up(x)).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_many([&self.gate_proj, &self.up_proj], x)?;
        self.down_proj.forward(&super::layers::swiglu(&gate, &up)?)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family decoder.
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    window: Option<usize>,
    info: ModelInfo,
    dtype: DType,
    device: Device,
}

impl Llama {
    pub fn load(
        cfg: &LlamaConfig,
        w: &WeightStore,
        rope_style: RopeStyle,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (hidden, heads, kv_heads, head_dim) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_heads(),
            cfg.head_dim(),
        );
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::file(
                w.path(),
                format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"),
            ));
        }
        let mut embed_tokens = w.embedding(
            "model.embed_tokens.weight",
            cfg.vocab_size,
            hidden,
            dtype,
            device,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let lin = |name: &str, inp: usize, out: usize, bias: bool| {
                w.linear(&format!("{p}.{name}"), inp, out, bias, dtype, device)
            };
            layers.push(Block {
                input_layernorm: RmsNorm::load(
                    w,
                    &format!("{p}.input_layernorm"),
                    hidden,
                    cfg.rms_norm_eps,
                    dtype,
                    device,
                )?,
                self_attn: Attention {
                    q_proj: lin("self_attn.q_proj", hidden, heads * head_dim, cfg.qkv_bias())?,
                    k_proj: lin(
                        "self_attn.k_proj",
                        hidden,
                        kv_heads * head_dim,
                        cfg.qkv_bias(),
                    )?,
                    v_proj: lin(
                        "self_attn.v_proj",
                        hidden,
                        kv_heads * head_dim,
                        cfg.qkv_bias(),
                    )?,
                    o_proj: lin(
                        "self_attn.o_proj",
                        heads * head_dim,
                        hidden,
                        cfg.attention_bias,
                    )?,
                    heads,
                    kv_heads,
                    head_dim,
                },
                post_attention_layernorm: RmsNorm::load(
                    w,
                    &format!("{p}.post_attention_layernorm"),
                    hidden,
                    cfg.rms_norm_eps,
                    dtype,
                    device,
                )?,
                mlp: Mlp {
                    gate_proj: lin("mlp.gate_proj", hidden, cfg.intermediate_size, cfg.mlp_bias)?,
                    up_proj: lin("mlp.up_proj", hidden, cfg.intermediate_size, cfg.mlp_bias)?,
                    down_proj: lin("mlp.down_proj", cfg.intermediate_size, hidden, cfg.mlp_bias)?,
                },
            });
        }
        let norm = RmsNorm::load(w, "model.norm", hidden, cfg.rms_norm_eps, dtype, device)?;
        let lm_head = if cfg.tie_word_embeddings || !w.contains("lm_head.weight") {
            WeightStore::tied_linear(&mut embed_tokens, cfg.vocab_size, hidden)?
        } else {
            w.linear("lm_head", hidden, cfg.vocab_size, false, dtype, device)?
        };
        let mut rope = Rope::new(
            head_dim,
            cfg.rope_theta(),
            cfg.rope_scaling()?.as_ref(),
            rope_style,
        )?;
        if w.contains("rope_freqs.weight") {
            let factors = w
                .tensor("rope_freqs.weight", &[head_dim / 2], DType::F32, device)?
                .to_vec1::<f32>()?;
            rope = rope.with_frequency_factors(&factors);
        }
        let info = ModelInfo {
            architecture: cfg.model_type.clone(),
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position_embeddings,
            num_layers: cfg.num_hidden_layers,
            kv_heads,
            head_dim,
        };
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            window: cfg.window(),
            info,
            dtype,
            device: device.clone(),
        })
    }
}

impl CausalLM for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_cache(&self) -> KvCache {
        KvCache::for_model(&self.info, self.dtype, &self.device)
    }

    fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Tensor> {
        let ids = super::packed_ids(batch, &self.info, &self.device)?;
        let mut x = self.embed_tokens.forward(&ids)?.to_dtype(self.dtype)?; // (n, hidden)
        let tables = rope_tables(&self.rope, batch, &self.device)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            let h = layer.input_layernorm.forward(&x)?;
            let shape = AttentionShape {
                rope: Some((&self.rope, &tables)),
                window: self.window,
                ..AttentionShape::new(attn.heads, attn.kv_heads, attn.head_dim)
            };
            let [q, k, v] = Linear::forward_many([&attn.q_proj, &attn.k_proj, &attn.v_proj], &h)?;
            let attended = batch_attention(&shape, &q, &k, &v, batch, index)?;
            x = (x + attn.o_proj.forward(&attended)?)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = (x + layer.mlp.forward(&h)?)?;
        }
        let x = super::finish_batch(&x, batch)?;
        let logits = self.lm_head.forward(&self.norm.forward(&x)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::LlamaConfig;

    fn config(extra: &str) -> LlamaConfig {
        let json = format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 10 {extra}}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn rope_settings_are_read_from_both_config_layouts() {
        assert_eq!(config("").rope_theta(), 10_000.0);
        assert_eq!(
            config(r#", "rope_theta": 100000.0"#).rope_theta(),
            100_000.0
        );
        let v5 = config(
            r#", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        assert_eq!(v5.rope_theta(), 500_000.0);
        assert_eq!(v5.rope_scaling().unwrap().unwrap().rope_type, "llama3");
        let plain_v5 =
            config(r#", "rope_parameters": {"rope_theta": 1000.0, "rope_type": "default"}"#);
        assert_eq!(
            plain_v5.rope_scaling().unwrap().unwrap().rope_type,
            "default"
        );
    }
}
