//! Building blocks shared by several model families.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
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
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
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

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu if x.device().is_cpu() && x.dtype() == DType::F32 => {
                let mut values = x.flatten_all()?.to_vec1::<f32>()?;
                crate::kernels::activation::gelu_erf_inplace(&mut values);
                Tensor::from_vec(values, x.shape(), x.device())?
            }
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
            Activation::Tanh => x.tanh()?,
        })
    }
}
