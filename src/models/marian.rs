//! Marian (the opus-mt translation models) and M2M100 / NLLB: BART-shaped encoder-decoders. Token embeddings
//! scaled by sqrt(d_model) plus fixed sinusoidal positions; post-LayerNorm blocks (attention,
//! add, norm; feed-forward, add, norm); the decoder adds cross-attention over the encoder's
//! output. The encoder runs once per source; each decoder step reads its own self-attention
//! cache and the cross-attention keys/values computed once from the encoder output.
//! M2M100 differs only in where the norms sit (before each block, plus a final norm per stack)
//! and in its position table (fairseq's: sines then cosines of a geometric frequency series,
//! offset past the padding id).

use candle_core::{DType, Device, Tensor};

use super::attention::{batch_attention, full_attention, split_heads, AttentionShape};
use super::kv_cache::KvCache;
use super::layers::{Activation, LayerNorm};
use super::{EncoderMemory, LogitsWanted, SeqInput};
use crate::error::{Error, Result};
use crate::weights::{Embedding, Linear, WeightStore};

/// config.json of a Marian checkpoint (transformers' MarianConfig defaults).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct MarianConfig {
    pub vocab_size: usize,
    #[serde(default)]
    pub decoder_vocab_size: Option<usize>,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "default_true")]
    pub share_encoder_decoder_embeddings: bool,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
    pub decoder_start_token_id: u32,
    #[serde(default)]
    pub forced_eos_token_id: Option<u32>,
}

fn default_activation() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}

/// BART-family layer norms use PyTorch's default epsilon.
const LAYER_NORM_EPS: f64 = 1e-5;

/// Multi-head attention with biased q/k/v/out projections.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(
        w: &WeightStore,
        prefix: &str,
        d: usize,
        heads: usize,
        device: &Device,
    ) -> Result<Self> {
        let lin =
            |name: &str| w.linear(&format!("{prefix}.{name}"), d, d, true, DType::F32, device);
        Ok(Attention {
            q_proj: lin("q_proj")?,
            k_proj: lin("k_proj")?,
            v_proj: lin("v_proj")?,
            out_proj: lin("out_proj")?,
            heads,
            head_dim: d / heads,
        })
    }

    /// (t, d) -> (heads, t, head_dim)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        split_heads(x, self.heads, self.head_dim)
    }

    /// Queries (n, d) attending over all of `keys`/`values` (heads, s, head_dim): no mask.
    fn attend(&self, queries: &Tensor, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        let q = self.split_heads(&self.q_proj.forward(queries)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        self.out_proj
            .forward(&full_attention(&q, keys, values, scale, None)?)
    }

    /// Keys and values of `x` (t, d), each (heads, t, head_dim).
    fn keys_values(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split_heads(&self.k_proj.forward(x)?)?,
            self.split_heads(&self.v_proj.forward(x)?)?,
        ))
    }
}

struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl FeedForward {
    fn load(
        w: &WeightStore,
        prefix: &str,
        d: usize,
        ffn: usize,
        activation: Activation,
        device: &Device,
    ) -> Result<Self> {
        Ok(FeedForward {
            fc1: w.linear(&format!("{prefix}.fc1"), d, ffn, true, DType::F32, device)?,
            fc2: w.linear(&format!("{prefix}.fc2"), ffn, d, true, DType::F32, device)?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward(&self.activation.forward(&self.fc1.forward(x)?)?)
    }
}

fn norm(w: &WeightStore, name: &str, d: usize, device: &Device) -> Result<LayerNorm> {
    LayerNorm::load(w, name, d, LAYER_NORM_EPS, DType::F32, device)
}

struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    feed_forward: FeedForward,
    final_layer_norm: LayerNorm,
}

struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    feed_forward: FeedForward,
    final_layer_norm: LayerNorm,
}

/// Which member of the family a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Post-norm blocks, positions from 0.
    Marian,
    /// Pre-norm blocks with a final norm per stack, positions from padding id + 1.
    M2M100,
}

/// A Marian or M2M100 encoder-decoder.
pub struct Marian {
    pub flavor: Flavor,
    encoder_embed: Embedding,
    decoder_embed: Embedding,
    positions: Tensor,
    /// Row of `positions` for position 0.
    position_offset: usize,
    /// M2M100's norms after the last encoder / decoder block.
    final_norms: Option<(LayerNorm, LayerNorm)>,
    embed_scale: f64,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    lm_head: Linear,
    final_logits_bias: Tensor,
    pub config: MarianConfig,
    device: Device,
}

/// fairseq's position table (M2M100): row p is [sin(p·f_i)…, cos(p·f_i)…] with
/// f_i = exp(-i·ln(10000)/(d/2 - 1)), in f32 as transformers computes it; the padding row is zero.
fn fairseq_positions(n: usize, d: usize, padding: usize, device: &Device) -> Result<Tensor> {
    let half = d / 2;
    let step = (10000f32).ln() / (half as f32 - 1.0);
    let mut table = vec![0f32; n * d];
    for pos in 0..n {
        for i in 0..half {
            let angle = pos as f32 * (i as f32 * -step).exp();
            table[pos * d + i] = angle.sin();
            table[pos * d + half + i] = angle.cos();
        }
    }
    if padding < n {
        table[padding * d..(padding + 1) * d].fill(0.0);
    }
    Ok(Tensor::from_vec(table, (n, d), device)?)
}

/// Marian's fixed position table: the first half of each row sines, the second half cosines,
/// of pos / 10000^(2i / d) (computed in f64, as transformers does with numpy).
fn sinusoidal_positions(n: usize, d: usize, device: &Device) -> Result<Tensor> {
    let sentinel = d.div_ceil(2);
    let mut table = vec![0f32; n * d];
    for pos in 0..n {
        for j in 0..d {
            let angle = |j: usize| pos as f64 / 10000f64.powf(2.0 * (j / 2) as f64 / d as f64);
            table[pos * d + j] = if j < sentinel {
                angle(2 * j).sin() as f32
            } else {
                angle(2 * (j - sentinel) + 1).cos() as f32
            };
        }
    }
    Ok(Tensor::from_vec(table, (n, d), device)?)
}

impl Marian {
    pub fn load(
        config: MarianConfig,
        flavor: Flavor,
        w: &WeightStore,
        device: &Device,
    ) -> Result<Self> {
        let d = config.d_model;
        let activation = Activation::for_checkpoint(&config.activation_function, w)?;
        let decoder_vocab = config.decoder_vocab_size.unwrap_or(config.vocab_size);
        let mut shared = w.embedding(
            "model.shared.weight",
            config.vocab_size,
            d,
            DType::F32,
            device,
        )?;
        let own_decoder_table = !config.share_encoder_decoder_embeddings
            && w.contains("model.decoder.embed_tokens.weight");
        let mut decoder_embed = if own_decoder_table {
            w.embedding(
                "model.decoder.embed_tokens.weight",
                decoder_vocab,
                d,
                DType::F32,
                device,
            )?
        } else {
            shared.clone()
        };
        let lm_head = if w.contains("lm_head.weight") {
            w.linear("lm_head", d, decoder_vocab, false, DType::F32, device)?
        } else {
            WeightStore::tied_linear(&mut decoder_embed, decoder_vocab, d)?
        };
        if !own_decoder_table {
            // Tying may have repacked the table: the encoder then looks up the same copy.
            shared = decoder_embed.clone();
        }
        let encoder_embed = if w.contains("model.encoder.embed_tokens.weight") {
            w.embedding(
                "model.encoder.embed_tokens.weight",
                config.vocab_size,
                d,
                DType::F32,
                device,
            )?
        } else {
            shared
        };
        if config.encoder_attention_heads == 0 || !d.is_multiple_of(config.encoder_attention_heads)
        {
            return Err(Error::file(
                w.path(),
                format!(
                    "d_model {d} is not a multiple of {} heads",
                    config.encoder_attention_heads
                ),
            ));
        }
        let encoder = (0..config.encoder_layers)
            .map(|i| {
                let p = format!("model.encoder.layers.{i}");
                Ok(EncoderLayer {
                    self_attn: Attention::load(
                        w,
                        &format!("{p}.self_attn"),
                        d,
                        config.encoder_attention_heads,
                        device,
                    )?,
                    self_attn_layer_norm: norm(w, &format!("{p}.self_attn_layer_norm"), d, device)?,
                    feed_forward: FeedForward::load(
                        w,
                        &p,
                        d,
                        config.encoder_ffn_dim,
                        activation,
                        device,
                    )?,
                    final_layer_norm: norm(w, &format!("{p}.final_layer_norm"), d, device)?,
                })
            })
            .collect::<Result<_>>()?;
        let decoder = (0..config.decoder_layers)
            .map(|i| {
                let p = format!("model.decoder.layers.{i}");
                let heads = config.decoder_attention_heads;
                Ok(DecoderLayer {
                    self_attn: Attention::load(w, &format!("{p}.self_attn"), d, heads, device)?,
                    self_attn_layer_norm: norm(w, &format!("{p}.self_attn_layer_norm"), d, device)?,
                    encoder_attn: Attention::load(
                        w,
                        &format!("{p}.encoder_attn"),
                        d,
                        heads,
                        device,
                    )?,
                    encoder_attn_layer_norm: norm(
                        w,
                        &format!("{p}.encoder_attn_layer_norm"),
                        d,
                        device,
                    )?,
                    feed_forward: FeedForward::load(
                        w,
                        &p,
                        d,
                        config.decoder_ffn_dim,
                        activation,
                        device,
                    )?,
                    final_layer_norm: norm(w, &format!("{p}.final_layer_norm"), d, device)?,
                })
            })
            .collect::<Result<_>>()?;
        let final_logits_bias = if w.contains("final_logits_bias") {
            w.tensor("final_logits_bias", &[1, decoder_vocab], DType::F32, device)?
        } else {
            Tensor::zeros((1, decoder_vocab), DType::F32, device)?
        };
        let (positions, position_offset, final_norms) = match flavor {
            Flavor::Marian => (
                sinusoidal_positions(config.max_position_embeddings, d, device)?,
                0,
                None,
            ),
            Flavor::M2M100 => {
                let offset = config.pad_token_id as usize + 1;
                let table = fairseq_positions(
                    config.max_position_embeddings + offset,
                    d,
                    config.pad_token_id as usize,
                    device,
                )?;
                let norms = (
                    norm(w, "model.encoder.layer_norm", d, device)?,
                    norm(w, "model.decoder.layer_norm", d, device)?,
                );
                (table, offset, Some(norms))
            }
        };
        Ok(Marian {
            flavor,
            encoder_embed,
            decoder_embed,
            positions,
            position_offset,
            final_norms,
            embed_scale: if config.scale_embedding {
                (d as f64).sqrt()
            } else {
                1.0
            },
            encoder,
            decoder,
            lm_head,
            final_logits_bias,
            config,
            device: device.clone(),
        })
    }

    pub fn decoder_vocab_size(&self) -> usize {
        self.config
            .decoder_vocab_size
            .unwrap_or(self.config.vocab_size)
    }

    /// One block with its residual connection: `norm(x + f(x))` (Marian) or `x + f(norm(x))` (M2M100).
    fn residual(
        &self,
        x: &Tensor,
        norm: &LayerNorm,
        mut f: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        Ok(match self.flavor {
            Flavor::Marian => norm.forward(&(x + f(x)?)?)?,
            Flavor::M2M100 => (x + f(&norm.forward(x)?)?)?,
        })
    }

    /// Source embeddings: scaled, plus positions 0.. .
    fn embed_source(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.len() > self.config.max_position_embeddings {
            return Err(Error::ContextOverflow {
                prompt_tokens: ids.len(),
                context: self.config.max_position_embeddings,
            });
        }
        let x = self
            .encoder_embed
            .forward(&Tensor::new(ids, &self.device)?)?;
        Ok(((x * self.embed_scale)?
            + self.positions.narrow(0, self.position_offset, ids.len())?)?)
    }

    /// Run the encoder over one source sentence's ids.
    pub fn encode(&self, ids: &[u32]) -> Result<EncoderMemory> {
        if ids.is_empty() {
            return Err(Error::invalid("the source has no tokens"));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let mut x = self.embed_source(ids)?;
        for layer in &self.encoder {
            x = self.residual(&x, &layer.self_attn_layer_norm, |h| {
                let (k, v) = layer.self_attn.keys_values(h)?;
                layer.self_attn.attend(h, &k, &v)
            })?;
            x = self.residual(&x, &layer.final_layer_norm, |h| {
                layer.feed_forward.forward(h)
            })?;
        }
        if let Some((encoder_norm, _)) = &self.final_norms {
            x = encoder_norm.forward(&x)?;
        }
        let layers = self
            .decoder
            .iter()
            .map(|layer| layer.encoder_attn.keys_values(&x))
            .collect::<Result<_>>()?;
        Ok(EncoderMemory { layers, hidden: x })
    }

    /// An empty self-attention cache for one decoder sequence (beam).
    pub fn new_cache(&self) -> KvCache {
        let heads = self.config.decoder_attention_heads;
        KvCache::new(
            self.config.decoder_layers,
            heads,
            self.config.d_model / heads,
            DType::F32,
            &self.device,
        )
    }

    /// One decoder step for a batch of sequences, all at the same position: sequence i takes
    /// `tokens[i]` after what its cache holds and attends to source `memories[i]`. Returns f32
    /// logits (n, vocab).
    pub fn decode_step(
        &self,
        memories: &[&EncoderMemory],
        tokens: &[u32],
        caches: &mut [KvCache],
    ) -> Result<Tensor> {
        let position = super::kv_cache::shared_position(caches)?;
        if position >= self.config.max_position_embeddings {
            return Err(Error::ContextOverflow {
                prompt_tokens: position + 1,
                context: self.config.max_position_embeddings,
            });
        }
        if let Some(bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.decoder_vocab_size())
        {
            return Err(Error::invalid(format!(
                "decoder token id {bad} is outside the vocabulary"
            )));
        }
        // Every sequence sits at the same position: one row of the table for all.
        let ids = Tensor::new(tokens, &self.device)?;
        let row = self
            .positions
            .narrow(0, self.position_offset + position, 1)?;
        let mut x = (self.decoder_embed.forward(&ids)? * self.embed_scale)?.broadcast_add(&row)?;
        let mut batch: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(tokens.chunks(1))
            .map(|(cache, token)| SeqInput {
                tokens: token,
                cache,
                logits: LogitsWanted::Last,
            })
            .collect();
        for (index, layer) in self.decoder.iter().enumerate() {
            let attn = &layer.self_attn;
            let shape = AttentionShape::new(attn.heads, attn.heads, attn.head_dim);
            x = self.residual(&x, &layer.self_attn_layer_norm, |h| {
                let attended = batch_attention(
                    &shape,
                    &attn.q_proj.forward(h)?,
                    &attn.k_proj.forward(h)?,
                    &attn.v_proj.forward(h)?,
                    &mut batch,
                    index,
                )?;
                attn.out_proj.forward(&attended)
            })?;
            x = self.residual(&x, &layer.encoder_attn_layer_norm, |h| {
                EncoderMemory::attend_each(h, memories, |rows, memory| {
                    let (keys, values) = &memory.layers[index];
                    layer.encoder_attn.attend(rows, keys, values)
                })
            })?;
            x = self.residual(&x, &layer.final_layer_norm, |h| {
                layer.feed_forward.forward(h)
            })?;
        }
        if let Some((_, decoder_norm)) = &self.final_norms {
            x = decoder_norm.forward(&x)?;
        }
        for seq in batch.iter_mut() {
            seq.cache.advance(1);
        }
        let logits = self
            .lm_head
            .forward(&x)?
            .broadcast_add(&self.final_logits_bias)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}
