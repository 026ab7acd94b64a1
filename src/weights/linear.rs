//! Linear and embedding layers behind one type each, whatever the weights are stored as.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use super::gguf::MappedBytes;
use crate::autograd;
use crate::error::Result;
use crate::kernels::dense::{packed_matmul, PackedMatrix};
use crate::kernels::strided::MatrixView;
use crate::kernels::{self, QuantKind, QuantMatrix, QuantTensor};

/// GGUF blocks of a type our own kernels handle, interleaved for them once at load.
#[derive(Clone)]
pub struct QuantWeight(Arc<QuantTensor>);

impl QuantWeight {
    /// Interleave the blocks of a (rows, cols) GGUF tensor; the file pages they came from are
    /// released afterwards, so the process holds the weights once.
    pub fn from_gguf(kind: QuantKind, rows: usize, cols: usize, bytes: &MappedBytes) -> Self {
        debug_assert_eq!(bytes.as_slice().len(), rows * kind.row_bytes(cols));
        let tensor = QuantTensor::from_gguf(kind, rows, cols, bytes.as_slice());
        bytes.release();
        QuantWeight(Arc::new(tensor))
    }

    fn matrix(&self) -> QuantMatrix<'_> {
        self.0.matrix()
    }

    /// x (m, cols) f32 on the CPU -> (m, rows).
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        cpu_matmul(x, self.0.cols(), self.0.rows(), |data, m, out| {
            kernels::quant_matmul_precise(&self.matrix(), data, m, out)
        })
    }

    /// x (m, cols) through several matrices of that width at once: (m, rows) each
    /// ([`kernels::quant_matmul_precise_many`]).
    fn matmul_many(weights: &[&QuantWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        let out_cols: Vec<usize> = weights.iter().map(|w| w.0.rows()).collect();
        cpu_matmuls(x, weights[0].0.cols(), &out_cols, |data, m, outs| {
            let matrices: Vec<QuantMatrix> = weights.iter().map(|w| w.matrix()).collect();
            kernels::quant_matmul_precise_many(&matrices, data, m, outs)
        })
    }

    /// Rows `ids` dequantized to f32: (n, cols).
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let matrix = self.matrix();
        gather_rows(ids, self.0.rows(), self.0.cols(), |row, out| {
            kernels::dequantize_row(&matrix, row, out)
        })
    }
}

/// Rows `ids` (n,) of a (rows, cols) table as an (n, cols) f32 tensor, each read by `read_row`.
fn gather_rows(
    ids: &Tensor,
    rows: usize,
    cols: usize,
    read_row: impl Fn(usize, &mut [f32]),
) -> Result<Tensor> {
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    let mut out = vec![0f32; ids.len() * cols];
    for (row, chunk) in ids.iter().zip(out.chunks_mut(cols)) {
        if *row as usize >= rows {
            return Err(crate::Error::invalid(format!(
                "token id {row} is outside the embedding table of {rows}"
            )));
        }
        read_row(*row as usize, chunk);
    }
    Ok(Tensor::from_vec(
        out,
        (ids.len(), cols),
        &candle_core::Device::Cpu,
    )?)
}

/// `f(x rows, m, out)` over x (m, cols) read in place as f32 on the CPU, giving (m, out_cols).
fn cpu_matmul(
    x: &Tensor,
    cols: usize,
    out_cols: usize,
    f: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<Tensor> {
    let mut outs = cpu_matmuls(x, cols, &[out_cols], |data, m, outs| f(data, m, outs[0]))?;
    Ok(outs.remove(0))
}

/// [`cpu_matmul`] with several outputs, (m, out_cols[i]) each.
fn cpu_matmuls(
    x: &Tensor,
    cols: usize,
    out_cols: &[usize],
    f: impl FnOnce(&[f32], usize, &mut [&mut [f32]]),
) -> Result<Vec<Tensor>> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let m = x.dim(0)?;
    let mut outs: Vec<Vec<f32>> = out_cols.iter().map(|&n| vec![0f32; m * n]).collect();
    with_host_f32(&x, |data| {
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
        f(&data[..m * cols], m, &mut slices)
    })?;
    outs.into_iter()
        .zip(out_cols)
        .map(|(out, &n)| Ok(Tensor::from_vec(out, (m, n), x.device())?))
        .collect()
}

pub(crate) use crate::autograd::with_host_f32;

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
            // Packed straight from the tensor's memory: no third copy of a large table.
            let weight = weight.contiguous()?;
            let packed = with_host_f32(&weight, |w| PackedMatrix::pack_weights(w, n, k))?;
            return Ok(LinearWeight::Packed(Arc::new(packed)));
        }
        Ok(LinearWeight::Dense(weight))
    }
}

/// `y = x Wᵀ + b`, with x of shape (..., in_features), plus a LoRA update when one is attached.
#[derive(Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The bias as host floats, for kernels that add it in place.
    host_bias: Option<Arc<Vec<f32>>>,
    lora: Option<LoraAdapter>,
    /// Mixed precision: a trainable dense weight's product computed in this dtype.
    autocast: Option<DType>,
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
            lora: None,
            autocast: None,
            in_features,
            out_features,
        })
    }

    /// The same frozen layer with a low-rank update added to its output.
    pub fn with_lora(mut self, adapter: LoraAdapter) -> Self {
        self.lora = Some(adapter);
        self
    }

    /// The same layer multiplying in `dtype` (master weights and output keep theirs).
    pub fn with_autocast(mut self, dtype: Option<DType>) -> Self {
        self.autocast = dtype;
        self
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `out (m × out) = x (m × in) · Wᵀ + b` straight on host rows, for forward passes that keep
    /// their activations out of candle (where [`Linear::has_host_kernel`]).
    pub fn forward_host(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        match &self.weight {
            LinearWeight::Packed(p) if self.lora.is_none() => {
                let bias = self.host_bias.as_deref().map(Vec::as_slice);
                packed_matmul(p, x, m, bias, out);
                Ok(())
            }
            _ => Err(crate::Error::invalid(
                "this layer has no host kernel (weights not packed f32, or an adapter attached)",
            )),
        }
    }

    /// Whether [`Linear::forward_host`] runs for this layer.
    pub fn has_host_kernel(&self) -> bool {
        matches!(self.weight, LinearWeight::Packed(_)) && self.lora.is_none()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.in_features))?;
        let y = match &self.lora {
            Some(lora) if lora.fuses(&x2) => {
                self.add_bias(lora.fused_forward(self.frozen_matmul(), &x2)?)?
            }
            Some(lora) => {
                let y = self.frozen_forward(&x2)?;
                let update = lora.forward(&x2)?.to_dtype(y.dtype())?;
                (y + update)?
            }
            None => self.frozen_forward(&x2)?,
        };
        Ok(y.reshape(out_shape(dims, self.out_features))?)
    }

    /// `x` through several layers that all read it (a block's q, k and v projections). Where
    /// all hold weights for our quantized kernels (no adapter, no autograd), one product call
    /// quantizes `x` once and splits all their rows over the threads together
    /// ([`kernels::quant_matmul_precise_many`]); otherwise each layer runs its own forward.
    pub fn forward_many<const N: usize>(layers: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let weights: Option<Vec<&QuantWeight>> = layers
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Quant(q) if l.lora.is_none() => Some(q),
                _ => None,
            })
            .collect();
        let same_input = layers
            .iter()
            .all(|l| l.in_features == layers[0].in_features);
        let outputs: Vec<Tensor> = match weights {
            Some(weights) if same_input && !x.track_op() => {
                let dims = x.dims().to_vec();
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let x2 = x.reshape((rows, layers[0].in_features))?;
                let products = QuantWeight::matmul_many(&weights, &x2)?;
                layers
                    .iter()
                    .zip(products)
                    .map(|(l, y)| {
                        let y = l.add_bias(y.to_dtype(x.dtype())?)?;
                        Ok(y.reshape(out_shape(dims.clone(), l.out_features))?)
                    })
                    .collect::<Result<_>>()?
            }
            _ => layers.iter().map(|l| l.forward(x)).collect::<Result<_>>()?,
        };
        Ok(outputs
            .try_into()
            .unwrap_or_else(|_| unreachable!("one output per layer")))
    }

    /// The stored weights' product, x2 (rows, in) -> (rows, out).
    fn frozen_forward(&self, x2: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => match &self.bias {
                Some(b)
                    if self.autocast.is_none()
                        && [x2, w, b].iter().all(|t| autograd::supports(t)) =>
                {
                    return autograd::linear(x2, w, b);
                }
                _ => product(x2, w, self.autocast)?,
            },
            // Our kernels leave the autograd graph; a frozen layer under a trainable one (LoRA)
            // still has to pass the gradient on to its input.
            _ if x2.track_op() => x2
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1(self.frozen_matmul())?
                .to_dtype(x2.dtype())?,
            LinearWeight::Quant(q) => q.matmul(x2)?.to_dtype(x2.dtype())?,
            LinearWeight::CandleQuant(q) => q.forward(x2)?,
            LinearWeight::Packed(p) => {
                let bias = self.host_bias.as_deref().map(Vec::as_slice);
                return cpu_matmul(x2, self.in_features, self.out_features, |data, m, out| {
                    packed_matmul(p, data, m, bias, out)
                });
            }
        };
        self.add_bias(y)
    }

    /// The stored weights' product as an autograd op that passes gradients to its input.
    fn frozen_matmul(&self) -> FrozenMatmul {
        FrozenMatmul {
            weight: self.weight.clone(),
            in_features: self.in_features,
            out_features: self.out_features,
        }
    }

    /// `y` plus the layer's bias, if it has one.
    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            // Training: one op each way instead of a broadcast and a one-thread reduction.
            Some(b)
                if (y.track_op() || b.track_op())
                    && autograd::supports(&y)
                    && autograd::supports(b) =>
            {
                autograd::bias_add(&y, b)?
            }
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

impl LinearWeight {
    /// The (out, in) matrix as plain f32, whatever it is stored as.
    fn to_f32(&self, out_features: usize, in_features: usize) -> Result<Tensor> {
        let shape = (out_features, in_features);
        Ok(match self {
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
            LinearWeight::Packed(p) => Tensor::from_vec(p.unpack(), shape, &Device::Cpu)?,
            LinearWeight::Quant(q) => Tensor::from_vec(
                kernels::reference::dequantize(&q.matrix()),
                shape,
                &Device::Cpu,
            )?,
            LinearWeight::CandleQuant(q) => match &**q {
                QMatMul::QTensor(t) => t.dequantize(&Device::Cpu)?,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
            },
        })
    }
}

/// `x Wᵀ` through our kernels as an autograd op: the weights are constants, so the backward
/// pass only needs `dx = dy W`. W is expanded to f32 for that product and dropped again, so a
/// quantized base stays quantized in memory (QLoRA).
struct FrozenMatmul {
    weight: LinearWeight,
    in_features: usize,
    out_features: usize,
}

impl FrozenMatmul {
    /// `x (m × in) · Wᵀ` on host rows: (m × out).
    fn product(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let mut out = vec![0f32; m * self.out_features];
        match &self.weight {
            LinearWeight::Packed(p) => packed_matmul(p, x, m, None, &mut out),
            LinearWeight::Quant(q) => kernels::quant_matmul_precise(&q.matrix(), x, m, &mut out),
            LinearWeight::Dense(_) | LinearWeight::CandleQuant(_) => {
                let x = Tensor::from_slice(x, (m, self.in_features), &Device::Cpu)?;
                out = x
                    .matmul(&self.weight_f32()?.t()?)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
            }
        }
        Ok(out)
    }

    /// The input's gradient `dy (m × out) · W`: (m × in) host rows.
    fn input_gradient(&self, dy: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let (n, k) = (self.out_features, self.in_features);
        let mut dx = vec![0f32; m * k];
        autograd::host(&self.weight_f32()?, |w| {
            autograd::gemm(
                &mut dx,
                m,
                k,
                n,
                MatrixView::rows(dy, n),
                MatrixView::rows(w, k),
                false,
            )
        })?;
        Ok(dx)
    }

    fn weight_f32(&self) -> candle_core::Result<Tensor> {
        self.weight
            .to_f32(self.out_features, self.in_features)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = autograd::input(storage, layout)?;
        let m = x.len() / self.in_features;
        Ok((
            candle_core::CpuStorage::F32(self.product(x, m)?),
            candle_core::Shape::from((m, self.out_features)),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let m = x.dim(0)?;
        let dx = autograd::host(&grad_y.to_dtype(DType::F32)?, |dy| {
            self.input_gradient(dy, m)
        })??;
        Ok(Some(autograd::tensor(dx, x.shape())?))
    }
}

/// A frozen layer and its trainable LoRA adapter as one autograd op over (x, A, B):
/// `y = x·Wᵀ + scale·((x ⊙ mask)·Aᵀ)·Bᵀ`. As candle ops that was six graph nodes per layer
/// (the mask, two products, the scaling, the sum and the frozen product), each costing the
/// backward pass a zeroed tensor and an addition besides its own pass over the rows; SFT
/// with adapters on every linear layer has 210 such layers.
struct AdaptedMatmul {
    base: FrozenMatmul,
    scale: f32,
    /// The dropout mask of x (0 or 1/(1−p) per element), drawn before the op.
    mask: Option<Vec<f32>>,
}

impl AdaptedMatmul {
    /// The adapter's input: x with dropout applied.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(mask) => x.iter().zip(mask).map(|(x, m)| x * m).collect(),
            None => x.into(),
        }
    }

    /// `h = (x ⊙ mask)·Aᵀ`: (m × rank).
    fn down(&self, dropped: &[f32], a: &[f32], m: usize, rank: usize) -> Vec<f32> {
        let k = self.base.in_features;
        let mut h = vec![0f32; m * rank];
        let (x, a) = (MatrixView::rows(dropped, k), MatrixView::rows(a, k).t());
        autograd::gemm(&mut h, m, rank, k, x, a, false);
        h
    }
}

impl candle_core::CustomOp3 for AdaptedMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        a: &candle_core::CpuStorage,
        a_layout: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        b_layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, a, b) = (
            autograd::input(x, x_layout)?,
            autograd::input(a, a_layout)?,
            autograd::input(b, b_layout)?,
        );
        let (k, n) = (self.base.in_features, self.base.out_features);
        let (rank, a_cols) = a_layout.shape().dims2()?;
        let m = x.len() / k;
        if a_cols != k || b_layout.shape().dims2()? != (n, rank) {
            return Err(candle_core::Error::Msg(format!(
                "LoRA adapter A {:?}, B {:?} do not fit a layer of {k} -> {n}",
                a_layout.shape(),
                b_layout.shape()
            )));
        }
        let mut out = self.base.product(x, m)?;
        let h = self.down(&self.dropped(x), a, m, rank);
        let mut update = vec![0f32; m * n];
        let (h, b) = (MatrixView::rows(&h, rank), MatrixView::rows(b, rank).t());
        autograd::gemm(&mut update, m, n, rank, h, b, false);
        let scale = self.scale;
        out.iter_mut()
            .zip(&update)
            .for_each(|(y, u)| *y += scale * u);
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((m, n)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (k, n) = (self.base.in_features, self.base.out_features);
        let ((m, _), (rank, _)) = (x.dims2()?, a.dims2()?);
        // The first layer's input (the embeddings, frozen) wants no gradient.
        let wants_dx = x.track_op();
        let (mut da, mut db, mut dh) = (
            vec![0f32; rank * k],
            vec![0f32; n * rank],
            vec![0f32; m * rank],
        );
        let dx = autograd::host(x, |x| {
            autograd::host(a, |a| {
                autograd::host(b, |b| {
                    autograd::host(dy, |dy| {
                        let dropped = self.dropped(x);
                        let h = self.down(&dropped, a, m, rank);
                        let dy_rows = MatrixView::rows(dy, n);
                        // dB = scale·dyᵀ·h, dh = scale·dy·B, dA = dhᵀ·(x ⊙ mask)
                        autograd::gemm(
                            &mut db,
                            n,
                            rank,
                            m,
                            dy_rows.t(),
                            MatrixView::rows(&h, rank),
                            false,
                        );
                        autograd::gemm(
                            &mut dh,
                            m,
                            rank,
                            n,
                            dy_rows,
                            MatrixView::rows(b, rank),
                            false,
                        );
                        dh.iter_mut().chain(&mut db).for_each(|v| *v *= self.scale);
                        let dh_rows = MatrixView::rows(&dh, rank);
                        autograd::gemm(
                            &mut da,
                            rank,
                            k,
                            m,
                            dh_rows.t(),
                            MatrixView::rows(&dropped, k),
                            false,
                        );
                        if !wants_dx {
                            return Ok(None);
                        }
                        // dx = dy·W + (dh·A) ⊙ mask
                        let mut dx = self.base.input_gradient(dy, m)?;
                        let a_rows = MatrixView::rows(a, k);
                        match &self.mask {
                            None => autograd::gemm(&mut dx, m, k, rank, dh_rows, a_rows, true),
                            Some(mask) => {
                                let mut through = vec![0f32; m * k];
                                autograd::gemm(&mut through, m, k, rank, dh_rows, a_rows, false);
                                dx.iter_mut()
                                    .zip(through.iter().zip(mask))
                                    .for_each(|(dx, (t, m))| *dx += t * m);
                            }
                        }
                        candle_core::Result::Ok(Some(dx))
                    })
                })
            })
        })?????;
        Ok((
            dx.map(|dx| autograd::tensor(dx, x.shape())).transpose()?,
            Some(autograd::tensor(da, a.shape())?),
            Some(autograd::tensor(db, b.shape())?),
        ))
    }
}

/// A low-rank update `scale · B A x` beside a frozen layer (LoRA, Hu et al. 2021): A is
/// (rank, in), B is (out, rank).
#[derive(Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`), seeded per module.
    pub dropout: f32,
    pub mode: Arc<AdapterMode>,
    /// Mixed into the dropout seed so that every module draws its own mask.
    pub module_seed: u64,
    /// Mixed precision: the products computed in this dtype, the update returned in f32.
    pub autocast: Option<DType>,
}

/// Training or evaluation, switched for every adapter of a model at once (PyTorch's
/// `model.train()` / `model.eval()`), plus the seed of the current micro-batch's dropout.
#[derive(Debug, Default)]
pub struct AdapterMode {
    training: std::sync::atomic::AtomicBool,
    seed: std::sync::atomic::AtomicU64,
}

impl AdapterMode {
    /// Train with dropout masks drawn from `seed`.
    pub fn train(&self, seed: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.seed.store(seed, Relaxed);
        self.training.store(true, Relaxed);
    }

    /// Evaluate: adapters read as constants, no dropout, so the fast kernels run.
    pub fn eval(&self) {
        self.training
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn training(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.training.load(Relaxed).then(|| self.seed.load(Relaxed))
    }
}

impl LoraAdapter {
    /// Whether [`LoraAdapter::fused_forward`] runs for x2: training in f32 on the CPU, no
    /// mixed precision.
    fn fuses(&self, x2: &Tensor) -> bool {
        self.mode.training().is_some()
            && self.autocast.is_none()
            && [x2, &self.a, &self.b].iter().all(|t| autograd::supports(t))
    }

    /// The frozen product `base` of x2 (rows, in) plus this adapter's update, as one op
    /// ([`AdaptedMatmul`]; the same dropout mask as [`LoraAdapter::forward`] draws).
    fn fused_forward(&self, base: FrozenMatmul, x2: &Tensor) -> Result<Tensor> {
        let seed = self.mode.training().unwrap_or_default();
        let mask = (self.dropout > 0.0)
            .then(|| dropout_values(x2.elem_count(), self.dropout, seed ^ self.module_seed));
        let op = AdaptedMatmul {
            base,
            scale: self.scale as f32,
            mask,
        };
        Ok(x2.contiguous()?.apply_op3(&self.a, &self.b, op)?)
    }

    /// x2 (rows, in) -> (rows, out).
    fn forward(&self, x2: &Tensor) -> Result<Tensor> {
        let (a, b, x) = match self.mode.training() {
            Some(seed) => {
                let x = x2.to_dtype(DType::F32)?;
                let x = if self.dropout > 0.0 {
                    let mask = dropout_mask(x.dims(), self.dropout, seed ^ self.module_seed)?;
                    (x * mask)?
                } else {
                    x
                };
                (self.a.clone(), self.b.clone(), x)
            }
            None => (self.a.detach(), self.b.detach(), x2.to_dtype(DType::F32)?),
        };
        let update = product(&product(&x, &a, self.autocast)?, &b, self.autocast)?;
        Ok((update * self.scale)?)
    }
}

/// `x wᵀ`, multiplied in `autocast`'s dtype where one is set (mixed precision); the result in
/// x's dtype.
fn product(x: &Tensor, w: &Tensor, autocast: Option<DType>) -> Result<Tensor> {
    Ok(match autocast {
        Some(dtype) if dtype != x.dtype() => x
            .to_dtype(dtype)?
            .matmul(&w.to_dtype(dtype)?.t()?)?
            .to_dtype(x.dtype())?,
        _ => x.matmul(&w.t()?)?,
    })
}

/// Inverted dropout: each element kept with probability 1 - p and scaled by 1 / (1 - p).
pub fn dropout_mask(dims: &[usize], p: f32, seed: u64) -> Result<Tensor> {
    let values = dropout_values(dims.iter().product(), p, seed);
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// The `n` elements of [`dropout_mask`].
fn dropout_values(n: usize, p: f32, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    // An element is dropped when its uniform 32-bit draw falls under p·2³². Drawn in one block
    // and compared in a loop that vectorises: one f32 draw at a time was 5% of a LoRA SFT step.
    let threshold = (f64::from(p) * 4_294_967_296.0) as u64;
    let mut draws = vec![0u32; n];
    rng.fill(&mut draws[..]);
    draws
        .iter()
        .map(|&d| if u64::from(d) < threshold { 0.0 } else { keep })
        .collect()
}

fn out_shape(mut dims: Vec<usize>, out_features: usize) -> Vec<usize> {
    *dims.last_mut().expect("x has at least one dim") = out_features;
    dims
}

/// Token-id lookup into a (vocab, hidden) table.
#[derive(Clone)]
pub enum Embedding {
    Dense(Tensor),
    /// A tied f32 table, packed for the output projection it doubles as.
    Packed(Arc<PackedMatrix>),
    Quant(QuantWeight),
    CandleQuant(Arc<QTensor>),
}

impl Embedding {
    /// ids of shape (n,) -> (n, hidden).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(table) => table.index_select(ids, 0)?,
            Embedding::Packed(p) => {
                gather_rows(ids, p.rows(), p.cols(), |row, out| p.row_into(row, out))?
            }
            Embedding::Quant(q) => q.rows(ids)?,
            Embedding::CandleQuant(q) => q.embedding(ids)?,
        })
    }

    pub fn hidden_size(&self) -> Result<usize> {
        Ok(match self {
            Embedding::Dense(t) => t.dim(D::Minus1)?,
            Embedding::Packed(p) => p.cols(),
            Embedding::Quant(q) => q.0.cols(),
            Embedding::CandleQuant(q) => q.shape().dim(D::Minus1)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::gguf::MappedBytes;

    /// Gradient of sum(y²) with respect to x through `weight`, and through the same matrix as a
    /// plain dense tensor.
    fn input_gradients(weight: LinearWeight, dense: &Tensor) -> (Vec<f32>, Vec<f32>) {
        let (out, inp) = dense.dims2().unwrap();
        let x = candle_core::Var::from_tensor(
            &Tensor::arange(0f32, (3 * inp) as f32, &Device::Cpu)
                .unwrap()
                .reshape((3, inp))
                .unwrap()
                .sin()
                .unwrap(),
        )
        .unwrap();
        let linear = Linear::new(weight, None, inp, out).unwrap();
        let ours = linear
            .forward(x.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = ours.backward().unwrap();
        let theirs = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
        let reference = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |g: &candle_core::backprop::GradStore| {
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        (flat(&grads), flat(&reference))
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4 * scale, "{x} vs {y}");
        }
    }

    #[test]
    fn frozen_quantized_and_packed_layers_pass_gradients_to_their_input() {
        let (rows, cols) = (8, 64);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        for kind in [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q8_0] {
            let bytes = kernels::reference::quantize(kind, &values, rows, cols);
            let weight = QuantWeight::from_gguf(kind, rows, cols, &MappedBytes::from_bytes(&bytes));
            let dense = Tensor::from_vec(
                kernels::reference::dequantize(&weight.matrix()),
                (rows, cols),
                &Device::Cpu,
            )
            .unwrap();
            let (ours, reference) = input_gradients(LinearWeight::Quant(weight), &dense);
            assert_close(&ours, &reference);
        }
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let (ours, reference) =
            input_gradients(LinearWeight::dense(dense.clone()).unwrap(), &dense);
        assert_close(&ours, &reference);
    }

    #[test]
    fn a_trained_adapter_as_one_op_matches_candle_composite() {
        // y = x·Wᵀ + scale·((x ⊙ mask)·Aᵀ)·Bᵀ written out with candle's ops, against the fused
        // op over a packed base: outputs and the gradients of x, A and B, with and without
        // dropout.
        let (m, k, n, rank) = (5, 24, 16, 4);
        let values = |len: usize, salt: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + salt * 31) % 97) as f32 / 97.0 - 0.5)
                .collect()
        };
        let var = |len: usize, dims: (usize, usize), salt: usize| {
            candle_core::Var::from_vec(values(len, salt), dims, &Device::Cpu).unwrap()
        };
        let w = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).unwrap();
        for dropout in [0.0, 0.5] {
            let (x, a, b) = (
                var(m * k, (m, k), 2),
                var(rank * k, (rank, k), 3),
                var(n * rank, (n, rank), 4),
            );
            let mode = Arc::new(AdapterMode::default());
            mode.train(11);
            let adapter = LoraAdapter {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 2.0,
                dropout,
                mode,
                module_seed: 5,
                autocast: None,
            };
            let layer = Linear::new(LinearWeight::dense(w.clone()).unwrap(), None, k, n)
                .unwrap()
                .with_lora(adapter);
            let fused = layer.forward(x.as_tensor()).unwrap();
            let dropped = if dropout > 0.0 {
                (x.as_tensor() * dropout_mask(&[m, k], dropout, 11 ^ 5).unwrap()).unwrap()
            } else {
                x.as_tensor().clone()
            };
            let update = dropped
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap();
            let composite =
                (x.as_tensor().matmul(&w.t().unwrap()).unwrap() + (update * 2.0).unwrap()).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&flat(&fused), &flat(&composite));
            let loss = |y: &Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let (ours, theirs) = (loss(&fused), loss(&composite));
            for t in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
                assert_close(&flat(ours.get(t).unwrap()), &flat(theirs.get(t).unwrap()));
            }
        }
    }
}
