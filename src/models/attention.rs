//! Rotary position embeddings and causal self-attention over a sequence's KV cache,
//! shared by every decoder family.

use candle_core::{DType, Device, Tensor, D};

use super::kv_cache::KvCache;
use super::SeqInput;
use crate::error::Result;
use crate::kernels::attention::{decode_group_attention, GroupQuery, HeadRows};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// HF layout: dimension i rotates with i + head_dim/2 (`rotate_half`).
    Half,
    /// GGUF llama layout (Q/K rows permuted by the converter): dimension 2i rotates with 2i+1.
    Interleaved,
}

/// Inverse frequencies of a rotary embedding, with any context-extension scaling already applied.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
}

/// `rope_scaling` of config.json.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f32>,
    #[serde(default)]
    pub low_freq_factor: Option<f32>,
    #[serde(default)]
    pub high_freq_factor: Option<f32>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

impl Rope {
    pub fn new(
        rotary_dim: usize,
        theta: f32,
        scaling: Option<&RopeScaling>,
        style: RopeStyle,
    ) -> Result<Self> {
        let mut inv_freq: Vec<f32> = (0..rotary_dim / 2)
            .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / rotary_dim as f64) as f32)
            .collect();
        if let Some(s) = scaling {
            match s.rope_type.as_str() {
                "default" => {}
                "linear" => {
                    let factor = required(s.factor, "factor")?;
                    inv_freq.iter_mut().for_each(|f| *f /= factor);
                }
                "llama3" => llama3_scale(&mut inv_freq, s)?,
                other => {
                    return Err(crate::Error::invalid(format!(
                        "rope_scaling type `{other}` is not supported (supported: default, linear, llama3)"
                    )))
                }
            }
        }
        Ok(Rope { inv_freq, style })
    }

    /// Divide each frequency by a per-dimension factor (GGUF's `rope_freqs` tensor).
    pub fn with_frequency_factors(mut self, factors: &[f32]) -> Self {
        for (f, factor) in self.inv_freq.iter_mut().zip(factors) {
            *f /= factor;
        }
        self
    }

    /// cos and sin tables, each (t, rotary_dim/2), for positions start..start+t.
    pub fn tables(&self, start: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in start..start + t {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), device)?,
            Tensor::from_vec(sin, (t, half), device)?,
        ))
    }

    /// Rotate x of shape (heads, t, head_dim) with tables from `tables`. When the rotary
    /// dimension is smaller than the head (GPT-J, GPT-NeoX), the remaining dimensions pass through.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)?;
        let rotary_dim = 2 * self.inv_freq.len();
        if rotary_dim < head_dim {
            let rotated = self.apply(&x.narrow(D::Minus1, 0, rotary_dim)?, cos, sin)?;
            let passed = x.narrow(D::Minus1, rotary_dim, head_dim - rotary_dim)?;
            return Ok(Tensor::cat(&[rotated, passed.contiguous()?], D::Minus1)?);
        }
        let x = x.unsqueeze(0)?.contiguous()?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        // The fused kernels have no backward pass; training takes the composite ones.
        let y = match (self.style, x.track_op()) {
            (RopeStyle::Half, false) => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            (RopeStyle::Half, true) => candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)?,
            (RopeStyle::Interleaved, false) => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            (RopeStyle::Interleaved, true) => candle_nn::rotary_emb::rope_i_slow(&x, &cos, &sin)?,
        };
        Ok(y.squeeze(0)?)
    }
}

impl Rope {
    /// Rotate `heads` heads of one position in place (host memory), exactly as [`Rope::apply`].
    pub fn rotate(&self, x: &mut [f32], position: usize, head_dim: usize) {
        let half = self.inv_freq.len();
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let angle = position as f32 * f;
                let (sin, cos) = (angle.sin(), angle.cos());
                let (a, b) = match self.style {
                    RopeStyle::Half => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// How a layer attends: head layout, positions, scaling and reach.
#[derive(Clone, Copy)]
pub struct AttentionShape<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rotary embedding and each sequence's (cos, sin) tables for its new positions;
    /// `None` for families with learned absolute positions.
    pub rope: Option<(&'a Rope, &'a [(Tensor, Tensor)])>,
    /// Multiplier of the q·k scores: 1/sqrt(head_dim) almost everywhere, 1 for GPT-Neo.
    pub scale: f32,
    /// Local attention: a position sees only itself and the `window - 1` before it.
    pub window: Option<usize>,
}

impl<'a> AttentionShape<'a> {
    /// The usual layout: scores scaled by 1/sqrt(head_dim), no window.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttentionShape {
            heads,
            kv_heads,
            head_dim,
            rope: None,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
        }
    }
}

/// Per-sequence rotary tables for a batch's new positions, computed once per forward pass.
pub fn rope_tables(
    rope: &Rope,
    batch: &[SeqInput<'_>],
    device: &Device,
) -> Result<Vec<(Tensor, Tensor)>> {
    batch
        .iter()
        .map(|s| rope.tables(s.cache.len(), s.tokens.len(), device))
        .collect()
}

/// Causal self-attention of one layer for a whole batch. q: (n, heads·head_dim) and
/// k, v: (n, kv_heads·head_dim) hold every sequence's new rows packed in batch order;
/// returns (n, heads·head_dim). Appends the new keys and values to each sequence's cache.
pub fn batch_attention(
    shape: &AttentionShape<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &mut [SeqInput<'_>],
    layer: usize,
) -> Result<Tensor> {
    // Decode steps on the CPU in f32 take the host path, reading q/k/v rows in place.
    let decoding = batch.iter().any(|s| s.tokens.len() == 1);
    let host = if decoding && q.device().is_cpu() && q.dtype() == DType::F32 {
        Some((
            q.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?,
            v.flatten_all()?.to_vec1::<f32>()?,
        ))
    } else {
        None
    };
    let (heads, kv_heads, head_dim) = (shape.heads, shape.kv_heads, shape.head_dim);
    let mut decoded = match &host {
        Some((hq, hk, hv)) => decode_steps_attention(shape, hq, hk, hv, batch, layer)?,
        None => vec![None; batch.len()],
    };
    super::per_sequence(batch, |i, offset, t, cache| {
        if let Some(output) = decoded[i].take() {
            return Ok(output);
        }
        // (t, n·head_dim) -> (n, t, head_dim)
        let split = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.narrow(0, offset, t)?
                .reshape((t, n, head_dim))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let (mut q, mut k) = (split(q, heads)?, split(k, kv_heads)?);
        if let Some((rope, tables)) = shape.rope {
            let (cos, sin) = &tables[i];
            q = rope.apply(&q, cos, sin)?;
            k = rope.apply(&k, cos, sin)?;
        }
        causal_attention(shape, &q, &k, &split(v, kv_heads)?, cache, layer)
    })
}

/// The decode steps (one new position each) of a batch's sequences, on the CPU in f32: rotary
/// embedding and cache append per sequence, then attention over every cache read in place, for
/// all (sequence, key/value head) pairs in one parallel pass. The same result as
/// [`Rope::apply`] + [`causal_attention`], without the dozen framework ops and the thread
/// hand-off per sequence and layer that would dominate a batched decode step. q, k, v: the
/// batch's projection rows. Returns a (1, heads·head_dim) output for each decoding sequence.
fn decode_steps_attention(
    shape: &AttentionShape<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: &mut [SeqInput<'_>],
    layer: usize,
) -> Result<Vec<Option<Tensor>>> {
    struct Step {
        seq: usize,
        q: Vec<f32>,
        keys: Tensor,
        values: Tensor,
        first: usize,
        n: usize,
    }
    let (heads, kv_heads, head_dim) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
    let device = Device::Cpu;
    let mut steps = Vec::new();
    let mut offset = 0;
    for (seq, input) in batch.iter_mut().enumerate() {
        let t = input.tokens.len();
        if t == 1 {
            let position = input.cache.len();
            let mut qs = q[offset * qw..][..qw].to_vec();
            let mut ks = k[offset * kw..][..kw].to_vec();
            if let Some((rope, _)) = shape.rope {
                rope.rotate(&mut qs, position, head_dim);
                rope.rotate(&mut ks, position, head_dim);
            }
            let ks = Tensor::from_vec(ks, (kv_heads, 1, head_dim), &device)?;
            let vs = Tensor::from_slice(&v[offset * kw..][..kw], (kv_heads, 1, head_dim), &device)?;
            let (keys, values) = input.cache.append(layer, &ks, &vs)?;
            let total = position + 1;
            let first = shape.window.map_or(0, |w| total.saturating_sub(w));
            steps.push(Step {
                seq,
                q: qs,
                keys,
                values,
                first,
                n: total - first,
            });
        }
        offset += t;
    }
    // Every cache's keys and values as host rows: (kv head) -> HeadRows from the first attended
    // position.
    let guards: Vec<_> = steps
        .iter()
        .map(|s| (s.keys.storage_and_layout(), s.values.storage_and_layout()))
        .collect();
    let mut rows: Vec<Vec<(HeadRows<'_>, HeadRows<'_>)>> = Vec::with_capacity(steps.len());
    for (step, ((key_storage, key_layout), (value_storage, value_layout))) in
        steps.iter().zip(&guards)
    {
        let (keys, values) = (
            head_rows(key_storage, key_layout, kv_heads, step.first)?,
            head_rows(value_storage, value_layout, kv_heads, step.first)?,
        );
        rows.push(keys.into_iter().zip(values).collect());
    }
    let group = heads / kv_heads;
    let width = group * head_dim;
    let mut out = vec![0f32; steps.len() * qw];
    let outp = crate::kernels::SendPtr(out.as_mut_ptr());
    let unit = |u: usize| {
        let (s, h) = (u / kv_heads, u % kv_heads);
        let step = &steps[s];
        let (keys, values) = rows[s][h];
        let mut scores = vec![0f32; group * step.n];
        // SAFETY: unit (s, h) alone writes this slice: its query heads' outputs.
        let out =
            unsafe { std::slice::from_raw_parts_mut(outp.get().add(s * qw + h * width), width) };
        let query = GroupQuery {
            q: &step.q[h * width..][..width],
            head_dim,
            keys,
            values,
            n: step.n,
            scale: shape.scale,
        };
        decode_group_attention(query, &mut scores, out);
    };
    // Bytes of keys and values read per unit.
    let longest = steps.iter().map(|s| s.n).max().unwrap_or(0);
    crate::kernels::parallel_chunks(steps.len() * kv_heads, longest * head_dim * 8, |u0, u1| {
        (u0..u1).for_each(unit)
    });
    let mut outputs = vec![None; batch.len()];
    for (s, step) in steps.iter().enumerate() {
        outputs[step.seq] = Some(Tensor::from_slice(&out[s * qw..][..qw], (1, qw), &device)?);
    }
    Ok(outputs)
}

/// A cache tensor (kv_heads, capacity, head_dim) as host rows per head, from position `first`.
fn head_rows<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    kv_heads: usize,
    first: usize,
) -> Result<Vec<HeadRows<'a>>> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        return Err(crate::Error::invalid(
            "decode attention runs on the CPU only",
        ));
    };
    let (data, stride) = (cpu.as_slice::<f32>()?, layout.stride());
    if stride[2] != 1 {
        return Err(crate::Error::invalid(
            "the KV cache rows are not contiguous",
        ));
    }
    Ok((0..kv_heads)
        .map(|h| HeadRows {
            data: &data[layout.start_offset() + h * stride[0] + first * stride[1]..],
            stride: stride[1],
        })
        .collect())
}

fn required(value: Option<f32>, name: &str) -> Result<f32> {
    value.ok_or_else(|| crate::Error::invalid(format!("rope_scaling is missing `{name}`")))
}

/// Llama 3.1's frequency-dependent scaling: long wavelengths are stretched, short ones kept.
fn llama3_scale(inv_freq: &mut [f32], s: &RopeScaling) -> Result<()> {
    let factor = required(s.factor, "factor")?;
    let low = required(s.low_freq_factor, "low_freq_factor")?;
    let high = required(s.high_freq_factor, "high_freq_factor")?;
    let original = s.original_max_position_embeddings.ok_or_else(|| {
        crate::Error::invalid("rope_scaling is missing `original_max_position_embeddings`")
    })? as f32;
    let low_wavelen = original / low;
    let high_wavelen = original / high;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        if wavelen < high_wavelen {
            continue;
        }
        if wavelen > low_wavelen {
            *f /= factor;
        } else {
            let smooth = (original / wavelen - low) / (high - low);
            *f = (1.0 - smooth) * *f / factor + smooth * *f;
        }
    }
    Ok(())
}

/// Causal attention of `t` new positions of one sequence.
/// q: (heads, t, head_dim); k, v: (kv_heads, t, head_dim), already rotated. Appends k, v to the
/// cache at `layer` and returns (t, heads * head_dim).
fn causal_attention(
    shape: &AttentionShape<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: &mut KvCache,
    layer: usize,
) -> Result<Tensor> {
    let window = shape.window;
    let (heads, t, head_dim) = q.dims3()?;
    let kv_heads = k.dim(0)?;
    let past = cache.len();
    let (keys, values) = cache.append(layer, k, v)?;
    // A fresh sequence attends to exactly its own keys: use them as they are, which also keeps
    // them in the autograd graph (the cache's copy is not).
    let (keys, values) = if past == 0 {
        (k.clone(), v.clone())
    } else {
        (keys, values)
    };
    let total = past + t;
    let group = heads / kv_heads;
    if t > 1 && !q.track_op() && q.device().is_cpu() && q.dtype() == DType::F32 {
        return prefill_attention_host(shape, q, &keys, &values, past);
    }
    // Heads sharing a kv head are adjacent, so grouping them as extra query rows avoids copying K/V.
    let q = q.contiguous()?.reshape((kv_heads, group * t, head_dim))?;
    let scores = (q.matmul(&keys.t()?)? * shape.scale as f64)?; // (kv_heads, group*t, total)
    let scores = if t > 1 || window.is_some_and(|w| w < total) {
        let mask = causal_mask(t, past, window, scores.dtype(), scores.device())?; // (t, total)
        scores
            .reshape((kv_heads, group, t, total))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * t, total))?
    } else {
        scores
    };
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)? // differentiable
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let out = probs.matmul(&values.contiguous()?)?; // (kv_heads, group*t, head_dim)
    Ok(out
        .reshape((heads, t, head_dim))?
        .transpose(0, 1)?
        .reshape((t, heads * head_dim))?)
}

thread_local! {
    /// Scores and output rows of one [`prefill_attention_host`] task, kept by each thread
    /// across tasks and calls (~150 KB).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`causal_attention`]'s product for a prompt chunk on the CPU in f32, without autograd: per kv
/// head, scores = Q·Kᵀ and out = P·V through the packed f32 GEMM kernel, softmax in place over
/// each query's visible keys. Candle's path spends more on the (heads·t × total) score tensors'
/// allocation, masking and scalar exponentials than on the products.
/// q: (heads, t, head_dim); keys, values: (kv_heads, total, head_dim). Returns (t, heads·head_dim).
fn prefill_attention_host(
    shape: &AttentionShape<'_>,
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    past: usize,
) -> Result<Tensor> {
    use crate::kernels::dense::{packed_matmul, PackedMatrix};
    let (heads, t, head_dim) = q.dims3()?;
    let (kv_heads, total) = (keys.dim(0)?, keys.dim(1)?);
    let group = heads / kv_heads;
    let host = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.contiguous()?.flatten_all()?.to_vec1()?) };
    let (q, keys, values) = (host(q)?, host(keys)?, host(values)?);
    let mut out = vec![0f32; t * heads * head_dim];
    // Query rows go in blocks, each against only the keys some row of it sees: causal (and
    // windowed) attention skips the masked part of Q·Kᵀ and P·V, about half of both.
    const BLOCK: usize = 64;
    let blocks = t.div_ceil(BLOCK);
    let first = |pos: usize| shape.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    // Keys [lo, hi) cover every row of block b.
    let keys_of = |b: usize| (first(past + b * BLOCK), past + ((b + 1) * BLOCK).min(t));
    let outp = crate::kernels::SendPtr(out.as_mut_ptr());
    for kvh in 0..kv_heads {
        let kh = &keys[kvh * total * head_dim..][..total * head_dim];
        let vh = &values[kvh * total * head_dim..][..total * head_dim];
        // Packed here, so that the tasks allocate nothing: memory a worker thread frees stays
        // in its own allocator heap (packing inside the tasks raised peak RSS by a few MiB).
        let packed: Vec<_> = (0..blocks)
            .map(|b| {
                let (lo, hi) = keys_of(b);
                let n = hi - lo;
                let (kb, vb) = (
                    &kh[lo * head_dim..hi * head_dim],
                    &vh[lo * head_dim..hi * head_dim],
                );
                (
                    PackedMatrix::pack(kb, n, head_dim),
                    PackedMatrix::pack_transposed(vb, head_dim, n),
                )
            })
            .collect();
        // One task per query block, the latest (most keys) first, its products on its own
        // thread: a fork-join per product was ~200 per layer, most too short to split.
        crate::kernels::spinning_tasks(blocks, |task| {
            let b = blocks - 1 - task;
            let (i0, i1) = (b * BLOCK, ((b + 1) * BLOCK).min(t));
            let ((lo, hi), (packed_keys, packed_values)) = (keys_of(b), &packed[b]);
            let (rows, n) = (i1 - i0, hi - lo);
            SCRATCH.with_borrow_mut(|(scores, block)| {
                scores.resize(rows * n, 0.0);
                block.resize(rows * head_dim, 0.0);
                for g in 0..group {
                    let h = kvh * group + g;
                    let qh = &q[(h * t + i0) * head_dim..(h * t + i1) * head_dim];
                    packed_matmul(packed_keys, qh, rows, None, scores);
                    for (r, row) in scores.chunks_exact_mut(n).enumerate() {
                        let pos = past + i0 + r;
                        let visible = &mut row[first(pos) - lo..=pos - lo];
                        visible.iter_mut().for_each(|s| *s *= shape.scale);
                        crate::kernels::activation::softmax_inplace(visible);
                        row[..first(pos) - lo].fill(0.0);
                        row[pos - lo + 1..].fill(0.0);
                    }
                    packed_matmul(packed_values, scores, rows, None, block);
                    // out is (token, head, dim).
                    for (r, o) in block.chunks_exact(head_dim).enumerate() {
                        // SAFETY: rows i0..i1 of head h belong to this task alone; `out`
                        // outlives it.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                outp.get().add(((i0 + r) * heads + h) * head_dim),
                                head_dim,
                            )
                        };
                        dst.copy_from_slice(o);
                    }
                }
            });
        });
    }
    Ok(Tensor::from_vec(out, (t, heads * head_dim), &Device::Cpu)?)
}

/// Additive mask (t, past + t): query i (at position past + i) sees keys at positions
/// <= past + i, and with a window only the last `window` of those.
fn causal_mask(
    t: usize,
    past: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let total = past + t;
    let mut mask = vec![0f32; t * total];
    for i in 0..t {
        let pos = past + i;
        for j in 0..total {
            let too_new = j > pos;
            let too_old = window.is_some_and(|w| pos >= w && j <= pos - w);
            if too_new || too_old {
                mask[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)?)
}

/// (t, heads·head_dim) -> (heads, t, head_dim), contiguous.
pub fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let t = x.dim(0)?;
    Ok(x.reshape((t, heads, head_dim))?
        .transpose(0, 1)?
        .contiguous()?)
}

/// Unmasked attention of `q` (heads, t, head_dim) over `keys`/`values` (heads, s, head_dim):
/// softmax(scale·q·kᵀ + bias)·v with an optional additive `bias` (heads, t, s), merged back to
/// (t, heads·head_dim). Encoder self-attention, cross-attention, one decoder position.
pub fn full_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (heads, t, head_dim) = q.dims3()?;
    let mut scores = q.matmul(&keys.t()?)?;
    if scale != 1.0 {
        scores = (scores * scale)?;
    }
    if let Some(bias) = bias {
        scores = (scores + bias)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs
        .matmul(&values.contiguous()?)?
        .transpose(0, 1)?
        .reshape((t, heads * head_dim))?)
}

/// Log-softmax over the last dimension, computed in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host prefill path against a plain f64 evaluation of masked attention: grouped kv
    /// heads, a chunk after earlier positions (past > 0) and local windows; the long chunk spans
    /// several query blocks, each with its own key range.
    #[test]
    fn host_prefill_attention_matches_masked_softmax() {
        for (past, t) in [(7, 5), (30, 150)] {
            for window in [None, Some(4), Some(70)] {
                check_prefill_attention(past, t, window);
            }
        }
    }

    fn check_prefill_attention(past: usize, t: usize, window: Option<usize>) {
        let (heads, kv_heads, head_dim) = (6, 2, 8);
        let total = past + t;
        let value = |i: usize, salt: usize| (((i * 37 + salt * 11) % 97) as f32 - 48.0) / 30.0;
        let q: Vec<f32> = (0..heads * t * head_dim).map(|i| value(i, 1)).collect();
        let k: Vec<f32> = (0..kv_heads * total * head_dim)
            .map(|i| value(i, 2))
            .collect();
        let v: Vec<f32> = (0..kv_heads * total * head_dim)
            .map(|i| value(i, 3))
            .collect();
        let dev = Device::Cpu;
        let qt = Tensor::from_vec(q.clone(), (heads, t, head_dim), &dev).unwrap();
        let kt = Tensor::from_vec(k.clone(), (kv_heads, total, head_dim), &dev).unwrap();
        let vt = Tensor::from_vec(v.clone(), (kv_heads, total, head_dim), &dev).unwrap();
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
            rope: None,
            scale: 0.35,
            window,
        };
        let got = prefill_attention_host(&shape, &qt, &kt, &vt, past).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            for i in 0..t {
                let pos = past + i;
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let scores: Vec<f64> = (first..=pos)
                    .map(|j| {
                        (0..head_dim)
                            .map(|d| {
                                q[(h * t + i) * head_dim + d] as f64
                                    * k[(kvh * total + j) * head_dim + d] as f64
                            })
                            .sum::<f64>()
                            * 0.35
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for d in 0..head_dim {
                    let want: f64 = (first..=pos)
                        .zip(&scores)
                        .map(|(j, s)| {
                            (s - max).exp() / z * v[(kvh * total + j) * head_dim + d] as f64
                        })
                        .sum();
                    let have = got[(i * heads + h) * head_dim + d] as f64;
                    assert!(
                        (have - want).abs() < 1e-5,
                        "past {past} t {t} {window:?} h{h} i{i} d{d}: {have} vs {want}"
                    );
                }
            }
        }
    }
}
