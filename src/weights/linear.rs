//! Linear and embedding layers behind one type each, whatever the weights are stored as.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor, D};

use super::gguf::MappedBytes;
use crate::error::Result;
use crate::kernels::dense::{packed_matmul, PackedMatrix};
use crate::kernels::{self, QuantKind, QuantMatrix};

/// GGUF blocks of a type our own kernels handle, read in place from the file mapping.
#[derive(Clone)]
pub struct QuantWeight {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    bytes: MappedBytes,
}

impl QuantWeight {
    pub fn new(kind: QuantKind, rows: usize, cols: usize, bytes: MappedBytes) -> Self {
        debug_assert_eq!(bytes.as_slice().len(), rows * kind.row_bytes(cols));
        QuantWeight {
            kind,
            rows,
            cols,
            bytes,
        }
    }

    fn matrix(&self) -> QuantMatrix<'_> {
        QuantMatrix::new(self.kind, self.rows, self.cols, self.bytes.as_slice())
    }

    /// x (m, cols) f32 on the CPU -> (m, rows).
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        cpu_matmul(x, self.cols, self.rows, |data, m, out| {
            kernels::quant_matmul_precise(&self.matrix(), data, m, out)
        })
    }

    /// Rows `ids` dequantized to f32: (n, cols).
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let matrix = self.matrix();
        let mut out = vec![0f32; ids.len() * self.cols];
        for (row, chunk) in ids.iter().zip(out.chunks_mut(self.cols)) {
            if *row as usize >= self.rows {
                return Err(crate::Error::invalid(format!(
                    "token id {row} is outside the embedding table of {}",
                    self.rows
                )));
            }
            kernels::dequantize_row(&matrix, *row as usize, chunk);
        }
        Ok(Tensor::from_vec(
            out,
            (ids.len(), self.cols),
            &candle_core::Device::Cpu,
        )?)
    }
}

/// `f(x rows, m, out)` over x (m, cols) read in place as f32 on the CPU, giving (m, out_cols).
fn cpu_matmul(
    x: &Tensor,
    cols: usize,
    out_cols: usize,
    f: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let m = x.dim(0)?;
    let mut out = vec![0f32; m * out_cols];
    {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(crate::Error::invalid(
                "CPU kernels got a tensor on another device",
            ));
        };
        let start = layout.start_offset();
        f(
            &cpu.as_slice::<f32>()?[start..start + m * cols],
            m,
            &mut out,
        );
    }
    Ok(Tensor::from_vec(out, (m, out_cols), x.device())?)
}

/// The stored form of a weight matrix of shape (out_features, in_features).
#[derive(Clone)]
pub enum LinearWeight {
    /// Plain tensor in the compute dtype.
    Dense(Tensor),
    /// GGUF blocks run by our own CPU kernels (Q4_0, Q4_1, Q8_0).
    Quant(QuantWeight),
    /// GGUF blocks run by candle's quantized kernels (other types, other devices).
    CandleQuant(Arc<QMatMul>),
    /// f32 weights repacked for our CPU kernel (inference on the CPU).
    Packed(Arc<PackedMatrix>),
}

impl LinearWeight {
    /// A plain (out, in) weight tensor; f32 on the CPU is repacked once here for our kernel, so
    /// that no matmul has to pack the weights again.
    pub fn dense(weight: Tensor) -> Result<Self> {
        if weight.dtype() == DType::F32 && weight.device().is_cpu() {
            let (n, k) = weight.dims2()?;
            let packed = PackedMatrix::pack(&weight.flatten_all()?.to_vec1::<f32>()?, n, k);
            return Ok(LinearWeight::Packed(Arc::new(packed)));
        }
        Ok(LinearWeight::Dense(weight))
    }
}

/// `y = x Wᵀ + b`, with x of shape (..., in_features).
#[derive(Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The bias as host floats, for kernels that add it in place.
    host_bias: Option<Arc<Vec<f32>>>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    pub fn new(
        weight: LinearWeight,
        bias: Option<Tensor>,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self> {
        let host_bias = match (&weight, &bias) {
            (LinearWeight::Packed(_), Some(b)) => {
                Some(Arc::new(b.to_dtype(DType::F32)?.to_vec1::<f32>()?))
            }
            _ => None,
        };
        Ok(Linear {
            weight,
            bias,
            host_bias,
            in_features,
            out_features,
        })
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
            LinearWeight::Quant(q) => q.matmul(&x2)?.to_dtype(x.dtype())?,
            LinearWeight::CandleQuant(q) => q.forward(&x2)?,
            LinearWeight::Packed(p) => {
                let bias = self.host_bias.as_deref().map(Vec::as_slice);
                let y = cpu_matmul(&x2, self.in_features, self.out_features, |data, m, out| {
                    packed_matmul(p, data, m, bias, out)
                })?;
                return Ok(y.reshape(out_shape(dims, self.out_features))?);
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(y.reshape(out_shape(dims, self.out_features))?)
    }
}

fn out_shape(mut dims: Vec<usize>, out_features: usize) -> Vec<usize> {
    *dims.last_mut().expect("x has at least one dim") = out_features;
    dims
}

/// Token-id lookup into a (vocab, hidden) table.
#[derive(Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quant(QuantWeight),
    CandleQuant(Arc<QTensor>),
}

impl Embedding {
    /// ids of shape (n,) -> (n, hidden).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(table) => table.index_select(ids, 0)?,
            Embedding::Quant(q) => q.rows(ids)?,
            Embedding::CandleQuant(q) => q.embedding(ids)?,
        })
    }

    pub fn hidden_size(&self) -> Result<usize> {
        Ok(match self {
            Embedding::Dense(t) => t.dim(D::Minus1)?,
            Embedding::Quant(q) => q.cols,
            Embedding::CandleQuant(q) => q.shape().dim(D::Minus1)?,
        })
    }
}
