//! T5 / Flan-T5: an encoder-decoder with no position embeddings. Attention scores (unscaled)
//! get a learned bias per head looked up by relative-position bucket (exact for near offsets,
//! logarithmic up to `relative_attention_max_distance`), computed by the first layer of each
//! stack and shared by the others. Pre-norm blocks with a scale-only RMS LayerNorm; the
//! feed-forward is ReLU or a gated GELU (Flan-T5).

use candle_core::{DType, Device, Tensor};

use super::attention::{full_attention, split_heads};
use super::kv_cache::KvCache;
use super::layers::Activation;
use super::EncoderMemory;
use crate::error::{Error, Result};
use crate::weights::{Embedding, Linear, WeightStore};

/// config.json of a T5 checkpoint (transformers' T5Config defaults).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    /// Tied output layers read the decoder output scaled by d_model^-0.5.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}
fn default_eos() -> u32 {
    1
}

/// T5's bucket of a key at `relative` = key position - query position.
fn relative_bucket(
    relative: i64,
    bidirectional: bool,
    buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = buckets as i64;
    let mut bucket = 0i64;
    let distance = if bidirectional {
        buckets /= 2;
        if relative > 0 {
            bucket += buckets;
        }
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let max_exact = buckets / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        // Computed in f32 as torch does, then truncated.
        let scaled = ((distance as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln()
            * (buckets - max_exact) as f32) as i64;
        (max_exact + scaled).min(buckets - 1)
    };
    bucket as usize
}

/// T5's bias-free linear layer `prefix.name`.
fn linear(
    w: &WeightStore,
    prefix: &str,
    name: &str,
    inp: usize,
    out: usize,
    device: &Device,
) -> Result<Linear> {
    w.linear(
        &format!("{prefix}.{name}"),
        inp,
        out,
        false,
        DType::F32,
        device,
    )
}

/// Scale-only RMS norm (no mean subtraction, no bias), in f32.
struct T5LayerNorm {
    weight: Tensor,
    eps: f32,
}

impl T5LayerNorm {
    fn load(w: &WeightStore, name: &str, d: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(T5LayerNorm {
            weight: w.tensor(&format!("{name}.weight"), &[d], DType::F32, device)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
    /// (buckets, heads), in the first layer of each stack only.
    relative_bias: Option<Tensor>,
}

impl Attention {
    fn load(
        w: &WeightStore,
        prefix: &str,
        cfg: &T5Config,
        with_bias: bool,
        device: &Device,
    ) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let lin = |name: &str, inp: usize, out: usize| linear(w, prefix, name, inp, out, device);
        Ok(Attention {
            q: lin("q", cfg.d_model, inner)?,
            k: lin("k", cfg.d_model, inner)?,
            v: lin("v", cfg.d_model, inner)?,
            o: lin("o", inner, cfg.d_model)?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            relative_bias: if with_bias {
                Some(w.tensor(
                    &format!("{prefix}.relative_attention_bias.weight"),
                    &[cfg.relative_attention_num_buckets, cfg.num_heads],
                    DType::F32,
                    device,
                )?)
            } else {
                None
            },
        })
    }

    /// (t, heads·d_kv) -> (heads, t, d_kv)
    fn split(&self, x: &Tensor) -> Result<Tensor> {
        split_heads(x, self.heads, self.d_kv)
    }

    /// Queries (t, d) over keys/values (heads, s, d_kv), plus `bias` (heads, t, s) if any.
    /// T5 does not scale the scores.
    fn attend(
        &self,
        x: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = self.split(&self.q.forward(x)?)?;
        self.o
            .forward(&full_attention(&q, keys, values, 1.0, bias)?)
    }

    fn keys_values(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split(&self.k.forward(x)?)?,
            self.split(&self.v.forward(x)?)?,
        ))
    }
}

struct FeedForward {
    wi: Vec<Linear>,
    wo: Linear,
    activation: Activation,
}

impl FeedForward {
    fn load(w: &WeightStore, prefix: &str, cfg: &T5Config, device: &Device) -> Result<Self> {
        let (gated, act) = match cfg.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, cfg.feed_forward_proj.as_str()),
            Some(_) => {
                return Err(Error::file(
                    w.path(),
                    format!(
                        "feed_forward_proj `{}` is not `ACT` or `gated-ACT`",
                        cfg.feed_forward_proj
                    ),
                ))
            }
        };
        // transformers maps gated-gelu to the tanh approximation.
        let act = if gated && act == "gelu" {
            "gelu_new"
        } else {
            act
        };
        let lin = |name: &str, inp: usize, out: usize| linear(w, prefix, name, inp, out, device);
        let wi = if gated {
            vec![
                lin("wi_0", cfg.d_model, cfg.d_ff)?,
                lin("wi_1", cfg.d_model, cfg.d_ff)?,
            ]
        } else {
            vec![lin("wi", cfg.d_model, cfg.d_ff)?]
        };
        Ok(FeedForward {
            wi,
            wo: lin("wo", cfg.d_ff, cfg.d_model)?,
            activation: Activation::for_checkpoint(act, w)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.activation.forward(&self.wi[0].forward(x)?)?;
        if let Some(linear) = self.wi.get(1) {
            h = (h * linear.forward(x)?)?;
        }
        self.wo.forward(&h)
    }
}

struct EncoderBlock {
    attention_norm: T5LayerNorm,
    attention: Attention,
    ff_norm: T5LayerNorm,
    ff: FeedForward,
}

struct DecoderBlock {
    self_norm: T5LayerNorm,
    self_attention: Attention,
    cross_norm: T5LayerNorm,
    cross_attention: Attention,
    ff_norm: T5LayerNorm,
    ff: FeedForward,
}

/// A T5 encoder-decoder.
pub struct T5 {
    shared: Embedding,
    encoder: Vec<EncoderBlock>,
    encoder_norm: T5LayerNorm,
    decoder: Vec<DecoderBlock>,
    decoder_norm: T5LayerNorm,
    lm_head: Linear,
    output_scale: f64,
    pub config: T5Config,
    device: Device,
}

impl T5 {
    pub fn load(config: T5Config, w: &WeightStore, device: &Device) -> Result<Self> {
        let (d, eps) = (config.d_model, config.layer_norm_epsilon);
        let mut shared = w.embedding("shared.weight", config.vocab_size, d, DType::F32, device)?;
        let norm = |name: &str| T5LayerNorm::load(w, name, d, eps, device);
        let encoder = (0..config.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                Ok(EncoderBlock {
                    attention_norm: norm(&format!("{p}.0.layer_norm"))?,
                    attention: Attention::load(
                        w,
                        &format!("{p}.0.SelfAttention"),
                        &config,
                        i == 0,
                        device,
                    )?,
                    ff_norm: norm(&format!("{p}.1.layer_norm"))?,
                    ff: FeedForward::load(w, &format!("{p}.1.DenseReluDense"), &config, device)?,
                })
            })
            .collect::<Result<_>>()?;
        let decoder = (0..config.num_decoder_layers.unwrap_or(config.num_layers))
            .map(|i| {
                let p = format!("decoder.block.{i}.layer");
                Ok(DecoderBlock {
                    self_norm: norm(&format!("{p}.0.layer_norm"))?,
                    self_attention: Attention::load(
                        w,
                        &format!("{p}.0.SelfAttention"),
                        &config,
                        i == 0,
                        device,
                    )?,
                    cross_norm: norm(&format!("{p}.1.layer_norm"))?,
                    cross_attention: Attention::load(
                        w,
                        &format!("{p}.1.EncDecAttention"),
                        &config,
                        false,
                        device,
                    )?,
                    ff_norm: norm(&format!("{p}.2.layer_norm"))?,
                    ff: FeedForward::load(w, &format!("{p}.2.DenseReluDense"), &config, device)?,
                })
            })
            .collect::<Result<_>>()?;
        let lm_head = if w.contains("lm_head.weight") {
            w.linear("lm_head", d, config.vocab_size, false, DType::F32, device)?
        } else {
            WeightStore::tied_linear(&mut shared, config.vocab_size, d)?
        };
        Ok(T5 {
            encoder_norm: norm("encoder.final_layer_norm")?,
            decoder_norm: norm("decoder.final_layer_norm")?,
            shared,
            encoder,
            decoder,
            lm_head,
            output_scale: if config.tie_word_embeddings != Some(false) {
                (d as f64).powf(-0.5)
            } else {
                1.0
            },
            config,
            device: device.clone(),
        })
    }

    /// Relative-position bias (heads, queries, keys) for queries at `query_positions`.
    fn position_bias(
        &self,
        table: &Tensor,
        query_positions: std::ops::Range<usize>,
        keys: usize,
        bidirectional: bool,
    ) -> Result<Tensor> {
        let (buckets, max_distance) = (
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        );
        let queries = query_positions.len();
        let mut index = Vec::with_capacity(queries * keys);
        for q in query_positions {
            for k in 0..keys {
                index.push(relative_bucket(
                    k as i64 - q as i64,
                    bidirectional,
                    buckets,
                    max_distance,
                ) as u32);
            }
        }
        let index = Tensor::from_vec(index, queries * keys, &self.device)?;
        let heads = self.config.num_heads;
        Ok(table
            .index_select(&index, 0)? // (q·k, heads)
            .reshape((queries, keys, heads))?
            .permute((2, 0, 1))?
            .contiguous()?)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(bad) => Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            ))),
            None => Ok(()),
        }
    }

    pub fn encode(&self, ids: &[u32]) -> Result<EncoderMemory> {
        if ids.is_empty() {
            return Err(Error::invalid("the source has no tokens"));
        }
        self.check_ids(ids)?;
        let mut x = self.shared.forward(&Tensor::new(ids, &self.device)?)?;
        let table = self.encoder[0]
            .attention
            .relative_bias
            .as_ref()
            .ok_or_else(|| {
                Error::invalid("T5 encoder without a relative attention bias in its first layer")
            })?;
        let bias = self.position_bias(table, 0..ids.len(), ids.len(), true)?;
        for block in &self.encoder {
            let h = block.attention_norm.forward(&x)?;
            let (k, v) = block.attention.keys_values(&h)?;
            x = (&x + block.attention.attend(&h, &k, &v, Some(&bias))?)?;
            x = (&x + block.ff.forward(&block.ff_norm.forward(&x)?)?)?;
        }
        let hidden = self.encoder_norm.forward(&x)?;
        let layers = self
            .decoder
            .iter()
            .map(|block| block.cross_attention.keys_values(&hidden))
            .collect::<Result<_>>()?;
        Ok(EncoderMemory { layers, hidden })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.decoder.len(),
            self.config.num_heads,
            self.config.d_kv,
            DType::F32,
            &self.device,
        )
    }

    /// One decoder step for sequences at the same position: sequence i takes `tokens[i]` and
    /// attends to source `memories[i]`. Returns f32 logits (n, vocab).
    pub fn decode_step(
        &self,
        memories: &[&EncoderMemory],
        tokens: &[u32],
        caches: &mut [KvCache],
    ) -> Result<Tensor> {
        let position = super::kv_cache::shared_position(caches)?;
        self.check_ids(tokens)?;
        let table = self.decoder[0]
            .self_attention
            .relative_bias
            .as_ref()
            .ok_or_else(|| {
                Error::invalid("T5 decoder without a relative attention bias in its first layer")
            })?;
        let bias = self.position_bias(table, position..position + 1, position + 1, false)?;
        let mut x = self.shared.forward(&Tensor::new(tokens, &self.device)?)?; // (n, d)
        for (index, block) in self.decoder.iter().enumerate() {
            let h = block.self_norm.forward(&x)?;
            let attn = &block.self_attention;
            let (q_all, k_all, v_all) = (
                attn.q.forward(&h)?,
                attn.k.forward(&h)?,
                attn.v.forward(&h)?,
            );
            let mut rows = Vec::with_capacity(tokens.len());
            for (i, cache) in caches.iter_mut().enumerate() {
                let (keys, values) = cache.append(
                    index,
                    &attn.split(&k_all.narrow(0, i, 1)?)?,
                    &attn.split(&v_all.narrow(0, i, 1)?)?,
                )?;
                let q = attn.split(&q_all.narrow(0, i, 1)?)?;
                rows.push(full_attention(&q, &keys, &values, 1.0, Some(&bias))?);
            }
            x = (&x + attn.o.forward(&Tensor::cat(&rows, 0)?)?)?;
            let h = block.cross_norm.forward(&x)?;
            let attended = EncoderMemory::attend_each(&h, memories, |rows, memory| {
                let (keys, values) = &memory.layers[index];
                block.cross_attention.attend(rows, keys, values, None)
            })?;
            x = (&x + attended)?;
            x = (&x + block.ff.forward(&block.ff_norm.forward(&x)?)?)?;
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let x = (self.decoder_norm.forward(&x)? * self.output_scale)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn relative_buckets_match_transformers() {
        // transformers' _relative_position_bucket(…, num_buckets=32, max_distance=128)
        let bi = |r| relative_bucket(r, true, 32, 128);
        assert_eq!(
            [
                bi(0),
                bi(-1),
                bi(1),
                bi(-7),
                bi(7),
                bi(-8),
                bi(-20),
                bi(-200)
            ],
            [0, 1, 17, 7, 23, 8, 10, 15]
        );
        let uni = |r| relative_bucket(r, false, 32, 128);
        assert_eq!(
            [
                uni(0),
                uni(3),
                uni(-3),
                uni(-15),
                uni(-16),
                uni(-40),
                uni(-500)
            ],
            [0, 0, 3, 15, 16, 23, 31]
        );
    }
}
