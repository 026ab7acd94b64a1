//! Fine-tuning: the optimizer loop shared by every task (AdamW, warmup schedules, gradient
//! accumulation, global-norm clipping, seeded shuffling), checkpoints that survive a kill and
//! resume exactly, `metrics.jsonl` and a training curve. A task supplies the loss of a batch.

pub mod checkpoint;
pub mod classify;
pub mod curve;
pub mod data;
pub mod optim;
pub mod sft;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

pub use optim::{AdamW, AdamWConfig, LossScaler, Precision, Schedule};

use crate::error::{Error, Result};
use crate::weights::Parameters;

/// The loop's settings (transformers' TrainingArguments by other names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: f64,
    /// Overrides `epochs` when set.
    pub max_steps: Option<u64>,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub clip_norm: Option<f64>,
    pub seed: u64,
    pub save_every: Option<u64>,
    pub eval_every: Option<u64>,
    /// Mixed precision: the dtype the tasks' linear layers multiply in (autocast).
    #[serde(default)]
    pub precision: Precision,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 1.0,
            max_steps: None,
            lr: 5e-5,
            batch_size: 16,
            grad_accum: 1,
            warmup_steps: 0,
            schedule: Schedule::Linear,
            weight_decay: 0.0,
            clip_norm: Some(1.0),
            seed: 42,
            save_every: None,
            eval_every: None,
            precision: Precision::F32,
        }
    }
}

/// Held-out results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: Option<f64>,
}

/// What a task must provide to be trained.
pub trait Task {
    /// Training examples.
    fn examples(&self) -> usize;
    fn parameters(&self) -> &Arc<Parameters>;
    /// Mean loss over the examples `indices` (attached to the graph) and their token count.
    /// `seed` drives this micro-batch's dropout masks (fixed by the run's seed and position, so
    /// a resumed run draws the same ones).
    fn loss(&self, indices: &[usize], seed: u64) -> Result<(Tensor, usize)>;
    /// Loss (and accuracy) on the held-out set, if there is one.
    fn evaluate(&self) -> Result<Option<Evaluation>>;
}

/// One optimizer step's report (a line of metrics.jsonl).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    /// Training examples per second (optimizer step, without evaluation).
    #[serde(default)]
    pub samples_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<Evaluation>,
    /// The f16 loss scale the step ran with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// The gradients overflowed at that scale: no update was made (`grad_norm` is then 0).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// Where the loop stands; saved in checkpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub epoch: u64,
    /// Micro-batches of the current epoch already consumed.
    pub position: usize,
}

/// The example order of `epoch`: a shuffle seeded by the run's seed and the epoch number, so
/// that a resumed run sees the same order without storing it.
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    order.shuffle(&mut rng);
    order
}

/// Run the loop to the end, writing checkpoints and metrics under `out`. With `resume`, continue
/// from `out`'s last checkpoint. `on_step` sees every step's report.
pub fn train(
    task: &dyn Task,
    options: &TrainOptions,
    out: &Path,
    resume: bool,
    mut on_step: impl FnMut(&StepReport),
) -> Result<Vec<StepReport>> {
    if options.batch_size == 0 || options.grad_accum == 0 {
        return Err(Error::invalid(
            "--batch-size and --grad-accum must be at least 1",
        ));
    }
    if !(options.lr > 0.0 && options.lr.is_finite()) {
        return Err(Error::invalid(format!(
            "--lr must be positive, got {}",
            options.lr
        )));
    }
    let n = task.examples();
    let micro_per_epoch = n.div_ceil(options.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(options.grad_accum) as u64;
    let total = match options.max_steps {
        Some(s) => s,
        None => (options.epochs * steps_per_epoch as f64).ceil() as u64,
    };
    if total == 0 {
        return Err(Error::invalid(
            "the run has no steps (check --epochs / --max-steps)",
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let params = task.parameters();
    let mut optimizer = AdamW::new(AdamWConfig {
        weight_decay: options.weight_decay,
        ..AdamWConfig::default()
    });
    let mut progress = Progress::default();
    let mut scaler = options.precision.loss_scaler();
    let metrics_path = out.join("metrics.jsonl");
    let mut reports: Vec<StepReport> = Vec::new();
    if resume {
        let restored = checkpoint::load(out, params, &mut optimizer, &mut scaler, options)?;
        progress = restored;
        // Keep the metrics up to the checkpoint; later lines are from the interrupted attempt.
        reports = checkpoint::read_metrics(&metrics_path)?
            .into_iter()
            .filter(|r| r.step <= progress.step)
            .collect();
    }
    checkpoint::write_metrics(&metrics_path, &reports)?;
    let vars = params.vars();
    if vars.is_empty() {
        return Err(Error::invalid("the task has no trainable parameters"));
    }
    let mut order = epoch_order(n, options.seed, progress.epoch);
    // Gradient sums, one buffer per parameter, reused by every step.
    let mut sums: Vec<Vec<f32>> = Vec::new();
    while progress.step < total {
        let start = Instant::now();
        let loss_scale = scaler.as_ref().map(|s| s.scale);
        let (mut loss_sum, mut tokens, mut samples) = (0.0f64, 0usize, 0usize);
        for micro in 0..options.grad_accum {
            if progress.position >= micro_per_epoch {
                progress.epoch += 1;
                progress.position = 0;
                order = epoch_order(n, options.seed, progress.epoch);
            }
            let first = progress.position * options.batch_size;
            let batch = &order[first..(first + options.batch_size).min(n)];
            progress.position += 1;
            samples += batch.len();
            let dropout_seed = options.seed
                ^ (progress.step * options.grad_accum as u64 + micro as u64)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let (loss, batch_tokens) = task.loss(batch, dropout_seed)?;
            tokens += batch_tokens;
            loss_sum += loss.to_scalar::<f32>()? as f64 / options.grad_accum as f64;
            let grads =
                (loss * (loss_scale.unwrap_or(1.0) / options.grad_accum as f64))?.backward()?;
            accumulate_gradients(&vars, &grads, &mut sums, micro == 0)?;
        }
        let lr = options.lr
            * options
                .schedule
                .factor(progress.step, options.warmup_steps, total);
        let skipped = scaler.as_mut().is_some_and(|s| !s.unscale(&mut sums));
        let grad_norm = if skipped {
            0.0
        } else {
            apply_gradients(&vars, &mut sums, &mut optimizer, lr, options.clip_norm).map_err(
                |e| match e {
                    Error::InvalidArgument(m) => {
                        Error::invalid(format!("step {}: {m}", progress.step + 1))
                    }
                    other => other,
                },
            )?
        };
        progress.step += 1;
        let seconds = start.elapsed().as_secs_f64();
        let (tokens_per_second, samples_per_second) =
            (tokens as f64 / seconds, samples as f64 / seconds);
        let eval = match options.eval_every {
            Some(every) if progress.step % every == 0 || progress.step == total => {
                task.evaluate()?
            }
            None if progress.step == total => task.evaluate()?,
            _ => None,
        };
        let report = StepReport {
            step: progress.step,
            total_steps: total,
            epoch: progress.epoch as f64 + progress.position as f64 / micro_per_epoch as f64,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_second,
            samples_per_second,
            eval,
            loss_scale,
            skipped,
        };
        checkpoint::append_metric(&metrics_path, &report)?;
        on_step(&report);
        reports.push(report);
        let save = options.save_every.is_some_and(|e| progress.step % e == 0);
        if save && progress.step < total {
            checkpoint::save(out, params, &optimizer, scaler.as_ref(), &progress, options)?;
        }
    }
    curve::write_svg(&out.join("training.svg"), &reports)?;
    Ok(reports)
}

/// Every parameter's gradient as host values (zeros for one the loss does not reach).
pub fn collect_gradients(vars: &[(String, Var)], grads: &GradStore) -> Result<Vec<Vec<f32>>> {
    let mut sums = Vec::new();
    accumulate_gradients(vars, grads, &mut sums, true)?;
    Ok(sums)
}

/// Every parameter's gradient added into `sums` (one buffer per parameter, made on the first
/// call and reused after), or written over it when `first`: zeros for one the loss does not
/// reach.
pub fn accumulate_gradients(
    vars: &[(String, Var)],
    grads: &GradStore,
    sums: &mut Vec<Vec<f32>>,
    first: bool,
) -> Result<()> {
    use rayon::prelude::*;
    sums.resize_with(vars.len(), Vec::new);
    for ((_, var), sum) in vars.iter().zip(sums.iter_mut()) {
        sum.resize(var.elem_count(), 0.0);
        let Some(grad) = grads.get(var.as_tensor()) else {
            if first {
                sum.fill(0.0);
            }
            continue;
        };
        let mut add = |values: &[f32]| {
            let chunks = sum.par_chunks_mut(optim::PARALLEL_CHUNK);
            chunks
                .zip(values.par_chunks(optim::PARALLEL_CHUNK))
                .for_each(|(sum, values)| match first {
                    true => sum.copy_from_slice(values),
                    false => sum.iter_mut().zip(values).for_each(|(s, g)| *s += g),
                });
        };
        if crate::autograd::supports(grad) && grad.is_contiguous() {
            crate::autograd::with_host_f32(grad, add)?;
        } else {
            add(&grad.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(())
}

/// Clip the gradients to `clip_norm` (global L2 norm) and take one AdamW step on every
/// parameter at learning rate `lr`. Returns the norm before clipping.
pub fn apply_gradients(
    vars: &[(String, Var)],
    grads: &mut [Vec<f32>],
    optimizer: &mut AdamW,
    lr: f64,
    clip_norm: Option<f64>,
) -> Result<f64> {
    let (grad_norm, factor) = optim::clip_factor(grads.iter().map(Vec::as_slice), clip_norm);
    if !grad_norm.is_finite() {
        return Err(Error::invalid(format!(
            "the gradient norm is {grad_norm}: lower --lr"
        )));
    }
    let corrections = optimizer.begin_step();
    for ((name, var), grad) in vars.iter().zip(grads.iter_mut()) {
        if factor != 1.0 {
            use rayon::prelude::*;
            grad.par_iter_mut().for_each(|g| *g *= factor as f32);
        }
        let tensor = var.as_tensor();
        if crate::autograd::supports(tensor) && tensor.is_contiguous() {
            crate::autograd::update_host_f32(tensor, |values| {
                optimizer.update(name, values, grad, lr, corrections)
            })?;
        } else {
            let mut values = var.flatten_all()?.to_vec1::<f32>()?;
            optimizer.update(name, &mut values, grad, lr, corrections)?;
            var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
        }
    }
    Ok(grad_norm)
}

/// Write `bytes` to `path` atomically: a temporary sibling, flushed to disk, then renamed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, ".tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}
