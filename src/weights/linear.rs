//! Linear and embedding layers behind one type each, whatever the weights are stored as.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor, D};

use crate::error::Result;

/// The stored form of a weight matrix of shape (out_features, in_features).
#[derive(Clone)]
pub enum LinearWeight {
    /// Plain tensor in the compute dtype.
    Dense(Tensor),
    /// GGUF blocks run by candle's quantized kernels (types without our own kernels).
    CandleQuant(Arc<QMatMul>),
}

/// `y = x Wᵀ + b`, with x of shape (..., in_features).
#[derive(Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    pub fn new(
        weight: LinearWeight,
        bias: Option<Tensor>,
        in_features: usize,
        out_features: usize,
    ) -> Self {
        Linear {
            weight,
            bias,
            in_features,
            out_features,
        }
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.in_features))?;
        let y = match &self.weight {
            LinearWeight::Dense(w) => x2.matmul(&w.t()?)?,
            LinearWeight::CandleQuant(q) => q.forward(&x2)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has at least one dim") = self.out_features;
        Ok(y.reshape(out_dims)?)
    }
}

/// Token-id lookup into a (vocab, hidden) table.
#[derive(Clone)]
pub enum Embedding {
    Dense(Tensor),
    CandleQuant(Arc<QTensor>),
}

impl Embedding {
    /// ids of shape (n,) -> (n, hidden).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(table) => table.index_select(ids, 0)?,
            Embedding::CandleQuant(q) => q.embedding(ids)?,
        })
    }

    pub fn hidden_size(&self) -> Result<usize> {
        Ok(match self {
            Embedding::Dense(t) => t.dim(D::Minus1)?,
            Embedding::CandleQuant(q) => q.shape().dim(D::Minus1)?,
        })
    }
}
