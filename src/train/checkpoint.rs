//! Checkpoints: parameters, AdamW moments and loop position, written so that a kill at any
//! moment leaves the last complete checkpoint readable (a new one is built beside it and swapped
//! in by renames), and metrics.jsonl, one line per step.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, LossScaler, Moments};
use super::{Progress, StepReport, TrainOptions};
use crate::error::{Error, Result};
use crate::weights::Parameters;

const DIR: &str = "checkpoint";

#[derive(Serialize, Deserialize)]
struct TrainerState {
    progress: Progress,
    optimizer_step: u64,
    options: TrainOptions,
    /// f16 runs: the loss scaler, so that a resumed run scales as the uninterrupted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scaler: Option<LossScaler>,
}

/// Save the run's state as `out/checkpoint`.
pub fn save(
    out: &Path,
    params: &Parameters,
    optimizer: &AdamW,
    loss_scaler: Option<&LossScaler>,
    progress: &Progress,
    options: &TrainOptions,
) -> Result<()> {
    let target = out.join(DIR);
    let fresh = out.join("checkpoint.tmp");
    let old = out.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&fresh);
    std::fs::create_dir_all(&fresh).map_err(|e| Error::io(&fresh, e))?;
    let mut weights = HashMap::new();
    let mut moments = HashMap::new();
    for (name, var) in params.vars() {
        weights.insert(name.clone(), var.as_tensor().detach());
        if let Some(m) = optimizer.moments.get(&name) {
            let shape = var.shape().clone();
            moments.insert(
                format!("m.{name}"),
                Tensor::from_slice(&m.m, &shape, &Device::Cpu)?,
            );
            moments.insert(
                format!("v.{name}"),
                Tensor::from_slice(&m.v, &shape, &Device::Cpu)?,
            );
        }
    }
    save_tensors(&fresh.join("model.safetensors"), &weights)?;
    save_tensors(&fresh.join("optimizer.safetensors"), &moments)?;
    let state = TrainerState {
        progress: progress.clone(),
        optimizer_step: optimizer.step,
        options: options.clone(),
        loss_scaler: loss_scaler.cloned(),
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| Error::invalid(e.to_string()))?;
    super::write_atomic(&fresh.join("trainer_state.json"), &json)?;
    // Swap: the previous checkpoint stays complete under one of two names at every moment.
    let _ = std::fs::remove_dir_all(&old);
    if target.exists() {
        std::fs::rename(&target, &old).map_err(|e| Error::io(&target, e))?;
    }
    std::fs::rename(&fresh, &target).map_err(|e| Error::io(&target, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path)?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Restore parameters and optimizer from `out`'s checkpoint; returns where the loop stood.
/// The run's settings must be those the checkpoint was written with (the data order and the
/// schedule depend on them); only how often to save and evaluate may change.
pub fn load(
    out: &Path,
    params: &Parameters,
    optimizer: &mut AdamW,
    loss_scaler: &mut Option<LossScaler>,
    options: &TrainOptions,
) -> Result<Progress> {
    let dir = [out.join(DIR), out.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.join("trainer_state.json").is_file())
        .ok_or_else(|| {
            Error::file(
                out,
                "no checkpoint to resume from (save one with --save-every)",
            )
        })?;
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::file(&state_path, format!("corrupt trainer state: {e}")))?;
    let comparable = |o: &TrainOptions| TrainOptions {
        save_every: None,
        eval_every: None,
        ..o.clone()
    };
    if comparable(&state.options) != comparable(options) {
        return Err(Error::file(
            &state_path,
            format!(
                "the checkpoint was written with other settings; resume with the same ones: {}",
                serde_json::to_string(&state.options).unwrap_or_default()
            ),
        ));
    }
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .map_err(|e| Error::file(dir.join("model.safetensors"), e.to_string()))?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)
        .map_err(|e| Error::file(dir.join("optimizer.safetensors"), e.to_string()))?;
    for (name, var) in params.vars() {
        let value = weights.get(&name).ok_or_else(|| {
            Error::file(&dir, format!("the checkpoint has no parameter `{name}`"))
        })?;
        if value.dims() != var.dims() {
            return Err(Error::file(
                &dir,
                format!("parameter `{name}` has another shape in the checkpoint"),
            ));
        }
        var.set(&value.to_device(var.device())?)?;
        if let (Some(m), Some(v)) = (
            moments.get(&format!("m.{name}")),
            moments.get(&format!("v.{name}")),
        ) {
            optimizer.moments.insert(
                name.clone(),
                Moments {
                    m: m.flatten_all()?.to_vec1()?,
                    v: v.flatten_all()?.to_vec1()?,
                },
            );
        }
    }
    optimizer.step = state.optimizer_step;
    if loss_scaler.is_some() {
        *loss_scaler = state.loss_scaler;
        if loss_scaler.is_none() {
            return Err(Error::file(
                &state_path,
                "an f16 checkpoint without its loss scale",
            ));
        }
    }
    Ok(state.progress)
}

pub fn read_metrics(path: &Path) -> Result<Vec<StepReport>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    // A line cut short by a kill is dropped; every complete line parses.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

pub fn write_metrics(path: &Path, reports: &[StepReport]) -> Result<()> {
    let mut text = String::new();
    for r in reports {
        text.push_str(&serde_json::to_string(r).map_err(|e| Error::invalid(e.to_string()))?);
        text.push('\n');
    }
    super::write_atomic(path, text.as_bytes())
}

pub fn append_metric(path: &Path, report: &StepReport) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(report).map_err(|e| Error::invalid(e.to_string()))?;
    writeln!(file, "{line}").map_err(|e| Error::io(path, e))
}
