//! AdamW with decoupled weight decay, global-norm gradient clipping and the learning-rate
//! schedules of transformers' `get_*_schedule_with_warmup`, on host f32 buffers. The moment
//! estimates are plain vectors so that checkpoints can store and restore them exactly.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// torch.optim.AdamW's settings.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one parameter.
#[derive(Clone, Debug, Default)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// The optimizer's state: step count and moments by parameter name.
#[derive(Clone, Debug, Default)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub moments: BTreeMap<String, Moments>,
}

/// transformers' Trainer rule: no weight decay on biases and LayerNorm weights.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm.") || name.contains("layer_norm."))
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// Begin a step: returns the bias corrections for this step number.
    pub fn begin_step(&mut self) -> (f64, f64) {
        self.step += 1;
        let t = self.step as i32;
        (
            1.0 - self.config.beta1.powi(t),
            1.0 - self.config.beta2.powi(t),
        )
    }

    /// Update `param` in place from `grad`, as torch's single-tensor AdamW does.
    pub fn update(
        &mut self,
        name: &str,
        param: &mut [f32],
        grad: &[f32],
        lr: f64,
        corrections: (f64, f64),
    ) -> Result<()> {
        if param.len() != grad.len() {
            return Err(Error::invalid(format!(
                "gradient of `{name}` has {} values for {} parameters",
                grad.len(),
                param.len()
            )));
        }
        let c = self.config;
        let state = self.moments.entry(name.to_string()).or_default();
        if state.m.is_empty() {
            state.m = vec![0.0; param.len()];
            state.v = vec![0.0; param.len()];
        }
        let decay = if decays(name) { c.weight_decay } else { 0.0 };
        let (bc1, bc2) = corrections;
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let keep = (1.0 - lr * decay) as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        // Element-wise, so in parallel chunks (a vocabulary table is millions of values).
        param
            .par_chunks_mut(PARALLEL_CHUNK)
            .zip(grad.par_chunks(PARALLEL_CHUNK))
            .zip(state.m.par_chunks_mut(PARALLEL_CHUNK))
            .zip(state.v.par_chunks_mut(PARALLEL_CHUNK))
            .for_each(|(((param, grad), m), v)| {
                for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(m).zip(v) {
                    *p *= keep;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p -= step_size * *m / denom;
                }
            });
        Ok(())
    }
}

/// Values per parallel task of the optimizer's element-wise passes.
pub(crate) const PARALLEL_CHUNK: usize = 1 << 16;

/// The global L2 norm of all gradients, and the factor clipping to `max_norm` scales them by
/// (1 when within the bound), as `torch.nn.utils.clip_grad_norm_`.
pub fn clip_factor<'a>(
    grads: impl Iterator<Item = &'a [f32]>,
    max_norm: Option<f64>,
) -> (f64, f64) {
    // Squares summed per fixed chunk, in parallel, the chunks' sums then in order: the same
    // norm on any number of threads.
    let norm = grads
        .map(|g| {
            let chunks: Vec<f64> = g
                .par_chunks(PARALLEL_CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            chunks.iter().sum::<f64>()
        })
        .sum::<f64>()
        .sqrt();
    let factor = match max_norm {
        Some(max) => (max / (norm + 1e-6)).min(1.0),
        None => 1.0,
    };
    (norm, factor)
}

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

impl Schedule {
    /// The multiplier of the base rate at optimizer step `step` (0-based) of `total`.
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (total.saturating_sub(step) as f64
                / (total.saturating_sub(warmup)).max(1) as f64)
                .max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// The dtype the forward and backward passes compute in. Master weights, gradients and the
/// optimizer state stay f32 whatever it is (mixed precision, as torch.autocast + GradScaler).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }

    /// The dtype linear layers multiply in, where it is not f32.
    pub fn autocast(self) -> Option<candle_core::DType> {
        (self != Precision::F32).then(|| self.dtype())
    }

    /// f16's range ends at 65504 and its small gradients underflow: it needs loss scaling.
    /// bf16 has f32's exponent range and does not.
    pub fn loss_scaler(self) -> Option<LossScaler> {
        (self == Precision::F16).then(LossScaler::default)
    }
}

/// Dynamic loss scaling with `torch.amp.GradScaler`'s rules: the loss is multiplied by `scale`
/// before the backward pass and the gradients divided by it after; a step whose gradients
/// overflowed is skipped and halves the scale; `growth_interval` clean steps in a row double it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u64,
    pub growth_interval: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            clean_steps: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// Divide the scale out of `grads`; false (and the scale halved) when any of them is not
    /// finite, in which case the step must be skipped.
    pub fn unscale(&mut self, grads: &mut [Vec<f32>]) -> bool {
        let inverse = (1.0 / self.scale) as f32;
        let mut finite = true;
        for g in grads.iter_mut().flat_map(|g| g.iter_mut()) {
            *g *= inverse;
            finite &= g.is_finite();
        }
        if finite {
            self.clean_steps += 1;
            if self.clean_steps == self.growth_interval {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.clean_steps = 0;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scaler_halves_on_overflow_and_doubles_after_clean_steps() {
        let mut scaler = LossScaler {
            growth_interval: 3,
            ..LossScaler::default()
        };
        let mut grads = vec![vec![65536.0, -131072.0], vec![32768.0]];
        assert!(scaler.unscale(&mut grads));
        assert_eq!(grads, vec![vec![1.0, -2.0], vec![0.5]]);
        let mut overflowed = vec![vec![1.0, f32::INFINITY]];
        assert!(!scaler.unscale(&mut overflowed));
        assert_eq!((scaler.scale, scaler.clean_steps), (32768.0, 0));
        let mut nan = vec![vec![f32::NAN]];
        assert!(!scaler.unscale(&mut nan));
        assert_eq!(scaler.scale, 16384.0);
        for _ in 0..2 {
            assert!(scaler.unscale(&mut [vec![1.0]]));
        }
        assert_eq!((scaler.scale, scaler.clean_steps), (16384.0, 2));
        assert!(scaler.unscale(&mut [vec![1.0]]));
        assert_eq!((scaler.scale, scaler.clean_steps), (32768.0, 0));
    }
}
