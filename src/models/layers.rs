//! Building blocks shared by several model families.

use candle_core::{DType, Device, Tensor};

use crate::autograd;
use crate::error::Result;
use crate::kernels::activation;
use crate::weights::WeightStore;

/// LayerNorm with weight and bias (`name.weight`, `name.bias`).
#[derive(Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(
        w: &WeightStore,
        name: &str,
        size: usize,
        eps: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.tensor(&format!("{name}.weight"), &[size], dtype, device)?,
            bias: w.tensor(&format!("{name}.bias"), &[size], dtype, device)?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused kernel has no backward pass: training takes ours, or the composite.
        if self.weight.track_op() || x.track_op() {
            let ours = [x, &self.weight, &self.bias]
                .iter()
                .all(|t| autograd::supports(t));
            if ours {
                return autograd::layer_norm(x, &self.weight, &self.bias, self.eps);
            }
            return Ok(candle_nn::ops::layer_norm_slow(
                x,
                &self.weight,
                &self.bias,
                self.eps,
            )?);
        }
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }

    /// `x ← LayerNorm(x + residual)` on host rows (where [`LayerNorm::has_host_kernel`]).
    pub fn add_forward_host(&self, x: &mut [f32], residual: &[f32]) -> Result<()> {
        use crate::weights::linear::with_host_f32;
        with_host_f32(&self.weight, |gamma| {
            with_host_f32(&self.bias, |beta| {
                crate::kernels::norm::add_layer_norm(x, residual, gamma, beta, self.eps)
            })
        })??;
        Ok(())
    }

    /// Frozen f32 weights on the CPU, contiguous: what the host kernel reads.
    pub fn has_host_kernel(&self) -> bool {
        [&self.weight, &self.bias]
            .iter()
            .all(|t| host_f32(t) && t.is_contiguous() && t.rank() == 1)
    }
}

/// The feed-forward activations of `hidden_act` / `activation` in HF configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf), HF `gelu`.
    Gelu,
    /// Tanh approximation, HF `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
    Silu,
    Tanh,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            _ => return None,
        })
    }

    /// The activation a checkpoint's config names, or an error naming the file.
    pub fn for_checkpoint(name: &str, weights: &WeightStore) -> Result<Self> {
        Self::from_hf(name).ok_or_else(|| {
            crate::Error::File {
                path: weights.path().to_path_buf(),
                message: format!("activation `{name}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, tanh)"),
            }
        })
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu if host_f32(x) => map_host(x, activation::gelu_erf_inplace)?,
            Activation::Gelu if autograd::supports(x) => autograd::gelu_erf(x)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh if host_f32(x) => map_host(x, activation::gelu_tanh_inplace)?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu if host_f32(x) => map_host(x, activation::silu_inplace)?,
            Activation::Silu => x.silu()?,
            Activation::Tanh => x.tanh()?,
        })
    }

    /// The activation in place over host values (inference; parallel over the kernel pool
    /// where the values are many).
    pub fn apply_host(self, values: &mut [f32]) {
        match self {
            Activation::Gelu => activation::gelu_erf_inplace(values),
            Activation::GeluTanh => activation::gelu_tanh_inplace(values),
            Activation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Silu => activation::silu_inplace(values),
            Activation::Tanh => values.iter_mut().for_each(|v| *v = v.tanh()),
        }
    }
}

/// SwiGLU's gating, `silu(gate) · up`: one host pass at inference, our op with its backward
/// pass in training on the CPU, candle's ops (which carry gradients) otherwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if host_f32(gate) && host_f32(up) && gate.shape() == up.shape() {
        let mut values = gate.flatten_all()?.to_vec1::<f32>()?;
        let up = up.contiguous()?;
        crate::weights::linear::with_host_f32(&up, |up| {
            activation::silu_mul_inplace(&mut values, up)
        })?;
        return Ok(Tensor::from_vec(values, gate.shape(), gate.device())?);
    }
    if (gate.track_op() || up.track_op())
        && autograd::supports(gate)
        && autograd::supports(up)
        && gate.shape() == up.shape()
    {
        return autograd::swiglu(gate, up);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

/// Whether our host kernels may run: CPU f32, and no gradient to carry (they leave the graph).
fn host_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op()
}

/// Run one of our element-wise kernels over a CPU f32 tensor's values.
fn map_host(x: &Tensor, kernel: fn(&mut [f32])) -> Result<Tensor> {
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    kernel(&mut values);
    Ok(Tensor::from_vec(values, x.shape(), x.device())?)
}
