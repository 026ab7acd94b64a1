//! Training's fused operations: candle autograd ops whose forward and backward passes run our
//! host kernels (f32 on the CPU).
//!
//! candle's own LayerNorm, exact GELU, attention and bias addition are composites of several
//! element-wise and reduction ops each, every one a fresh tensor and a pass over memory, the
//! reductions on one thread; in a classifier's training step they cost more than the matrix
//! products. Here each is one op forward and one backward, parallel on rayon's pool (which
//! candle's GEMMs between them use too).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};

use crate::error::Result;
use crate::kernels::attention::{self, QkvShape};
use crate::kernels::strided::{self, MatrixView};
use crate::kernels::{self, activation, norm};

/// Whether the fused ops run for `x`: f32 on the CPU.
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// `f` over the elements of a contiguous f32 CPU tensor, read in place.
pub(crate) fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(crate::Error::invalid(
            "CPU kernels got a tensor on another device",
        ));
    };
    let start = layout.start_offset();
    Ok(f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()]))
}

/// `f` over the elements of a contiguous f32 CPU tensor, changed in place: the storage is the
/// tensor's own (a [`candle_core::Var`]'s), so an optimizer step needs no copy out and back.
/// Returns `f`'s result.
pub(crate) fn update_host_f32(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    let op = InPlace {
        update: std::cell::Cell::new(Some(f)),
        result: std::cell::Cell::new(None),
    };
    t.inplace_op1(&op)?;
    op.result
        .take()
        .unwrap_or_else(|| Err(crate::Error::invalid("in-place update did not run")))
}

/// The op of [`update_host_f32`]: candle hands an in-place op the tensor's storage mutably.
struct InPlace<F> {
    update: std::cell::Cell<Option<F>>,
    result: std::cell::Cell<Option<Result<()>>>,
}

impl<F: FnOnce(&mut [f32]) -> Result<()>> candle_core::InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "host-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(values) = storage else {
            return Err(candle_core::Error::Msg(
                "in-place update of a non-f32 tensor".into(),
            ));
        };
        if !layout.is_contiguous() {
            return Err(candle_core::Error::Msg(
                "in-place update of a strided tensor".into(),
            ));
        }
        let range = layout.start_offset()..layout.start_offset() + layout.shape().elem_count();
        let result = match self.update.take() {
            Some(update) => update(&mut values[range]),
            None => Err(crate::Error::invalid("in-place update run twice")),
        };
        self.result.set(Some(result));
        Ok(())
    }
}

/// LayerNorm over the last dimension, weight `gamma`, bias `beta`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNorm { eps })?)
}

/// RMSNorm over the last dimension (Llama's), weight `gamma`.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&gamma.contiguous()?, RmsNorm { eps })?)
}

/// SwiGLU's gating `silu(gate) · up` (gate and up of one shape).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

/// Exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GeluErf)?)
}

/// `x Wᵀ + b` for x (rows, in), W (out, in), b (out), as one op each way: the products on
/// candle's GEMM (the `gemm` crate) called on the tensors' memory with strides, so nothing is
/// transposed into a copy, and the bias is where the forward product starts.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)?)
}

/// `y + bias`, the bias (of y's last dimension) added to every row.
pub fn bias_add(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(y.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd)?)
}

/// Bidirectional self-attention of `heads` heads over fused projections `qkv` (batch, t,
/// 3·hidden) → (batch, t, hidden); sequence b's keys past `lengths[b]` are padding (its padding
/// rows come out zero). `dropout`: a (batch, heads, t, t) mask of 0 or 1/(1−p) applied to the
/// attention probabilities.
pub fn bidirectional_attention(
    qkv: &Tensor,
    heads: usize,
    lengths: &[usize],
    dropout: Option<Tensor>,
) -> Result<Tensor> {
    let (batch, t, three_hidden) = qkv.dims3()?;
    let shape = QkvShape {
        batch,
        t,
        heads,
        head_dim: three_hidden / 3 / heads,
    };
    let dropout = match dropout {
        Some(mask) => Some(mask.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    Ok(qkv.contiguous()?.apply_op1(Attention {
        shape,
        lengths: lengths.to_vec(),
        dropout,
        probs: OnceLock::new(),
    })?)
}

/// The contiguous f32 elements of a custom op's input.
pub(crate) fn input<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: input not contiguous".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// `f` over the elements of a (made contiguous) tensor in a backward pass.
pub(crate) fn host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_host_f32(&t.contiguous()?, f).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

pub(crate) fn tensor(values: Vec<f32>, shape: &Shape) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Elements per parallel task of the element-wise ops (64 KB of f32).
const ELEMENTS_PER_TASK: usize = 16_384;

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        beta: &CpuStorage,
        beta_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (
            input(x, x_layout)?,
            input(gamma, gamma_layout)?,
            input(beta, beta_layout)?,
        );
        if gamma.is_empty() || x.len() % gamma.len() != 0 || beta.len() != gamma.len() {
            return Err(candle_core::Error::Msg(format!(
                "LayerNorm of size {} over {:?} (bias {})",
                gamma.len(),
                x_layout.shape(),
                beta.len()
            )));
        }
        let mut out = vec![0f32; x.len()];
        norm::layer_norm(x, gamma, beta, self.eps, &mut out);
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut dx = vec![0f32; x.elem_count()];
        let (dgamma, dbeta) = host(x, |x| {
            host(gamma, |gamma| {
                host(dy, |dy| {
                    norm::layer_norm_backward(x, gamma, self.eps, dy, &mut dx)
                })
            })
        })???;
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(dgamma, gamma.shape())?),
            Some(tensor(dbeta, beta.shape())?),
        ))
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        gamma_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, gamma) = (input(x, x_layout)?, input(gamma, gamma_layout)?);
        if gamma.is_empty() || x.len() % gamma.len() != 0 {
            return Err(candle_core::Error::Msg(format!(
                "RMSNorm of size {} over {:?}",
                gamma.len(),
                x_layout.shape()
            )));
        }
        let mut out = vec![0f32; x.len()];
        norm::rms_norm(x, gamma, self.eps, &mut out);
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut dx = vec![0f32; x.elem_count()];
        let dgamma = host(x, |x| {
            host(gamma, |gamma| {
                host(dy, |dy| {
                    norm::rms_norm_backward(x, gamma, self.eps, dy, &mut dx)
                })
            })
        })???;
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(dgamma, gamma.shape())?),
        ))
    }
}

/// `silu(gate) · up`: as candle ops a libm exponential per element, a product, and a
/// composite backward of five more passes.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (input(gate, gate_layout)?, input(up, up_layout)?);
        if gate.len() != up.len() {
            return Err(candle_core::Error::Msg(format!(
                "SwiGLU: gate {:?} and up {:?} differ",
                gate_layout.shape(),
                up_layout.shape()
            )));
        }
        let mut out = gate.to_vec();
        kernels::parallel_rows(&mut out, 1, ELEMENTS_PER_TASK, |start, end, values| {
            activation::silu_mul_serial(values, Some(&up[start..end]))
        });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // With s = silu(g) = g·σ(g): d/dg = u·(σ + s·(1 − σ)), d/du = s; σ = s / g (½ at 0).
        let mut d_gate = vec![0f32; gate.elem_count()];
        let mut d_up = vec![0f32; gate.elem_count()];
        let d_up_ptr = kernels::SendPtr(d_up.as_mut_ptr());
        host(gate, |g| {
            host(up, |u| {
                host(dy, |dy| {
                    kernels::parallel_rows(&mut d_gate, 1, ELEMENTS_PER_TASK, |start, end, dg| {
                        let mut silu = g[start..end].to_vec();
                        activation::silu_mul_serial(&mut silu, None);
                        // SAFETY: this task's range of d_up, which outlives the call.
                        let du = unsafe {
                            std::slice::from_raw_parts_mut(d_up_ptr.get().add(start), end - start)
                        };
                        let (g, u, dy) = (&g[start..end], &u[start..end], &dy[start..end]);
                        for i in 0..dg.len() {
                            let s = silu[i];
                            let sigmoid = if g[i] == 0.0 { 0.5 } else { s / g[i] };
                            dg[i] = dy[i] * u[i] * (sigmoid + s * (1.0 - sigmoid));
                            du[i] = dy[i] * s;
                        }
                    })
                })
            })
        })???;
        Ok((
            Some(tensor(d_gate, gate.shape())?),
            Some(tensor(d_up, up.shape())?),
        ))
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = input(x, layout)?.to_vec();
        kernels::parallel_rows(&mut out, 1, ELEMENTS_PER_TASK, |_, _, values| {
            activation::gelu_erf_serial(values)
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut dx = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        host(dy, |dy| {
            kernels::parallel_rows(&mut dx, 1, ELEMENTS_PER_TASK, |start, end, values| {
                activation::gelu_erf_backward_serial(values, &dy[start..end])
            })
        })?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// `out (m × n, row-major) [+]= a (m × k) · b (k × n)`: added to what `out` holds when
/// `accumulate`, written over it otherwise; on rayon's pool.
pub(crate) fn gemm(
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: MatrixView,
    b: MatrixView,
    accumulate: bool,
) {
    assert!(out.len() >= m * n, "GEMM output too short");
    // SAFETY: callers pass views of buffers holding the (m × k) and (k × n) operands; `out`
    // holds m × n floats and is borrowed mutably.
    unsafe { strided::matmul((m, n, k), out.as_mut_ptr(), n, a, b, 1.0, accumulate, true) }
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            input(x, x_layout)?,
            input(w, w_layout)?,
            input(b, b_layout)?,
        );
        let (m, k) = x_layout.shape().dims2()?;
        let (n, k_w) = w_layout.shape().dims2()?;
        if k_w != k || b.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "linear layer: input {:?}, weight {:?}, bias {:?}",
                x_layout.shape(),
                w_layout.shape(),
                b_layout.shape()
            )));
        }
        let mut out = vec![0f32; m * n];
        kernels::add_bias(&mut out, b);
        gemm(
            &mut out,
            m,
            n,
            k,
            MatrixView::rows(x, k),
            MatrixView::rows(w, k).t(),
            true,
        );
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ((m, k), n) = (x.dims2()?, w.dim(0)?);
        let (mut dx, mut dw) = (vec![0f32; m * k], vec![0f32; n * k]);
        let db = host(dy, |dy| {
            host(w, |w| {
                gemm(
                    &mut dx,
                    m,
                    k,
                    n,
                    MatrixView::rows(dy, n),
                    MatrixView::rows(w, k),
                    false,
                )
            })?;
            host(x, |x| {
                gemm(
                    &mut dw,
                    n,
                    k,
                    m,
                    MatrixView::rows(dy, n).t(),
                    MatrixView::rows(x, k),
                    false,
                )
            })?;
            candle_core::Result::Ok(kernels::column_sums(dy, n))
        })??;
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(dw, w.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        y_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, bias) = (input(y, y_layout)?, input(bias, bias_layout)?);
        let width = bias.len();
        if width == 0 || y_layout.shape().dims().last() != Some(&width) {
            return Err(candle_core::Error::Msg(format!(
                "a bias of {width} added to {:?}",
                y_layout.shape()
            )));
        }
        let mut out = y.to_vec();
        kernels::add_bias(&mut out, bias);
        Ok((CpuStorage::F32(out), y_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let width = bias.elem_count();
        let dbias = host(dout, |dout| kernels::column_sums(dout, width))?;
        Ok((Some(dout.clone()), Some(tensor(dbias, bias.shape())?)))
    }
}

struct Attention {
    shape: QkvShape,
    lengths: Vec<usize>,
    dropout: Option<Vec<f32>>,
    /// The forward pass's probabilities, which the backward pass reads.
    probs: OnceLock<Vec<f32>>,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-bidirectional-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = input(qkv, layout)?;
        let s = self.shape;
        let mut probs = vec![0f32; s.probs_len()];
        let mut out = vec![0f32; s.batch * s.t * s.heads * s.head_dim];
        attention::bidirectional_attention_train(
            qkv,
            s,
            &self.lengths,
            self.dropout.as_deref(),
            &mut probs,
            &mut out,
        );
        self.probs
            .set(probs)
            .map_err(|_| candle_core::Error::Msg("fused attention op applied twice".into()))?;
        let shape = Shape::from((s.batch, s.t, s.heads * s.head_dim));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let probs = self.probs.get().ok_or_else(|| {
            candle_core::Error::Msg("fused attention: backward pass before forward".into())
        })?;
        let mut dqkv = vec![0f32; qkv.elem_count()];
        host(qkv, |qkv| {
            host(dout, |dout| {
                attention::bidirectional_attention_backward(
                    qkv,
                    self.shape,
                    &self.lengths,
                    self.dropout.as_deref(),
                    probs,
                    dout,
                    &mut dqkv,
                )
            })
        })??;
        Ok(Some(tensor(dqkv, qkv.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Gradients of Σ w·f(inputs) through the fused op and through candle's composite.
    fn gradients(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composite: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&tensors), composite(&tensors));
        let weights = Tensor::arange(0f32, a.elem_count() as f32, &Device::Cpu)
            .unwrap()
            .affine(0.37, 0.0)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(a.shape())
            .unwrap();
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            diff.to_scalar::<f32>().unwrap() < 1e-5,
            "forward passes differ"
        );
        let ga = (&a * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (&b * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "input {i}: gradients differ by {diff}");
        }
    }

    fn var(dims: &[usize], salt: f32) -> Var {
        let n: usize = dims.iter().product();
        let t = Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .affine(0.61, salt as f64)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(dims)
            .unwrap();
        Var::from_tensor(&t).unwrap()
    }

    #[test]
    fn layer_norm_bias_and_gelu_match_candle() {
        let (x, gamma, beta) = (var(&[3, 5, 24], 0.0), var(&[24], 1.0), var(&[24], 2.0));
        gradients(
            &[x.clone(), gamma, beta],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        );
        let (x2, weight, bias) = (var(&[15, 24], 4.0), var(&[10, 24], 5.0), var(&[10], 6.0));
        gradients(
            &[x2, weight, bias],
            |t| linear(&t[0], &t[1], &t[2]).unwrap(),
            |t| {
                t[0].matmul(&t[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
        );
        let bias = var(&[24], 3.0);
        gradients(
            &[x.clone(), bias],
            |t| bias_add(&t[0], &t[1]).unwrap(),
            |t| t[0].broadcast_add(&t[1]).unwrap(),
        );
        gradients(
            &[x],
            |t| gelu_erf(&(&t[0] * 3.0).unwrap()).unwrap(),
            |t| (&t[0] * 3.0).unwrap().gelu_erf().unwrap(),
        );
    }

    #[test]
    fn rms_norm_and_swiglu_match_candle() {
        // 40 columns (lanes and a tail); the gate scaled so silu meets large and small values,
        // and one exact zero (σ taken as ½ there).
        let (x, gamma) = (var(&[3, 5, 40], 0.0), var(&[40], 1.0));
        gradients(
            &[x.clone(), gamma],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5).unwrap(),
        );
        let gate = Var::from_tensor(
            &(x.as_tensor() * 6.0)
                .unwrap()
                .slice_assign(
                    &[0..1, 0..1, 0..1],
                    &Tensor::zeros((1, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
                )
                .unwrap(),
        )
        .unwrap();
        gradients(
            &[gate, var(&[3, 5, 40], 2.0)],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
        );
    }

    #[test]
    fn attention_matches_candle_on_real_rows() {
        // Sequence lengths 6 and 4 of 6; padding rows compared as zeros.
        let (batch, t, heads, hd) = (2, 6, 2, 4);
        let hidden = heads * hd;
        let qkv = var(&[batch, t, 3 * hidden], 0.5);
        let lengths = [6, 4];
        let real = Tensor::from_vec(
            (0..batch * t)
                .map(|r| ((r % t) < lengths[r / t]) as u8 as f32)
                .collect::<Vec<_>>(),
            (batch, t, 1),
            &Device::Cpu,
        )
        .unwrap();
        let bias = Tensor::from_vec(
            (0..batch * t)
                .map(|r| if (r % t) < lengths[r / t] { 0f32 } else { -1e9 })
                .collect::<Vec<_>>(),
            (batch, 1, 1, t),
            &Device::Cpu,
        )
        .unwrap();
        gradients(
            &[qkv],
            |q| bidirectional_attention(&q[0], heads, &lengths, None).unwrap(),
            |q| {
                let split = |i: usize| {
                    q[0].narrow(2, i * hidden, hidden)
                        .unwrap()
                        .reshape((batch, t, heads, hd))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                };
                let scores = (split(0).matmul(&split(1).t().unwrap()).unwrap() * 0.5).unwrap();
                let probs =
                    candle_nn::ops::softmax(&scores.broadcast_add(&bias).unwrap(), 3).unwrap();
                probs
                    .matmul(&split(2))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((batch, t, hidden))
                    .unwrap()
                    .broadcast_mul(&real)
                    .unwrap()
            },
        );
    }
}
