//! Trainable parameters: f32 `Var`s addressed by their HF names. Model code loads them through
//! [`WeightStore::Trainable`](super::WeightStore) exactly as it loads frozen weights, so one
//! model definition serves inference and training; building the model again after an optimizer
//! step picks up the updated values (fused or transposed copies are derived on each build).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::WeightStore;
use crate::error::{Error, Result};

/// How tensors missing from the base checkpoint (a new task head) are initialised, as
/// transformers' `_init_weights` does for BERT: weights N(0, std²), biases 0, norm weights 1.
#[derive(Clone, Copy, Debug)]
pub struct FreshInit {
    pub std: f32,
    pub seed: u64,
}

/// The parameters of a model being trained.
pub struct Parameters {
    base: Option<Arc<WeightStore>>,
    path: PathBuf,
    fresh: Option<FreshInit>,
    /// Names of tensors that were initialised here rather than loaded.
    created: Arc<Mutex<Vec<String>>>,
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    /// A view for evaluation: current values detached from the graph, fast inference kernels.
    frozen: bool,
    /// Mixed precision: the dtype the linear layers built over these parameters multiply in.
    autocast: Option<DType>,
}

impl Parameters {
    /// Parameters starting from `base`; names it lacks are initialised with `fresh` (or are an error).
    pub fn from_base(base: WeightStore, fresh: Option<FreshInit>) -> Self {
        Parameters {
            path: base.path().to_path_buf(),
            base: Some(Arc::new(base)),
            fresh,
            created: Arc::default(),
            vars: Arc::default(),
            frozen: false,
            autocast: None,
        }
    }

    /// The same parameters, with the linear layers built over them multiplying in `dtype`
    /// (f32 master weights cast on the fly, as torch.autocast does); `None` keeps f32.
    pub fn with_autocast(mut self, dtype: Option<DType>) -> Self {
        self.autocast = dtype;
        self
    }

    pub fn autocast(&self) -> Option<DType> {
        self.autocast
    }

    /// Parameters that all start fresh (a new adapter), created on first use.
    pub fn fresh(path: &Path, fresh: FreshInit) -> Self {
        Parameters {
            base: None,
            path: path.to_path_buf(),
            fresh: Some(fresh),
            created: Arc::default(),
            vars: Arc::default(),
            frozen: false,
            autocast: None,
        }
    }

    /// The same parameters read as constants (no gradients), for evaluation.
    pub fn frozen_view(&self) -> Self {
        Parameters {
            base: self.base.clone(),
            path: self.path.clone(),
            fresh: self.fresh,
            created: self.created.clone(),
            vars: self.vars.clone(),
            frozen: true,
            autocast: self.autocast,
        }
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Parameters with the given values (e.g. restored from a checkpoint), no base.
    pub fn from_tensors(path: &Path, tensors: BTreeMap<String, Tensor>) -> Result<Self> {
        let vars = tensors
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
            .collect::<Result<_>>()?;
        Ok(Parameters {
            base: None,
            path: path.to_path_buf(),
            fresh: None,
            created: Arc::default(),
            vars: Arc::new(Mutex::new(vars)),
            frozen: false,
            autocast: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name) || self.base.as_ref().is_some_and(|b| b.contains(name))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Var>> {
        self.vars.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current value of `name` (registered as a trainable variable on first use).
    pub fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        if let Some(var) = self.lock().get(name) {
            if var.dims() != shape {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: var.dims().to_vec(),
                });
            }
            return Ok(if self.frozen {
                var.as_tensor().detach()
            } else {
                var.as_tensor().clone()
            });
        }
        let initial = match &self.base {
            Some(base) if base.contains(name) => base.tensor(name, shape, DType::F32, device)?,
            _ => {
                let Some(fresh) = self.fresh else {
                    return Err(Error::MissingTensor {
                        path: self.path.clone(),
                        name: name.to_string(),
                    });
                };
                self.created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(name.to_string());
                fresh_tensor(name, shape, fresh, device)?
            }
        };
        let var = Var::from_tensor(&initial)?;
        let value = if self.frozen {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        };
        self.lock().insert(name.to_string(), var);
        Ok(value)
    }

    /// Every parameter by name, in name order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    /// Names that were initialised here (a new head) rather than loaded.
    pub fn created(&self) -> Vec<String> {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A new tensor by transformers' rules (PEFT's for LoRA: A Kaiming-uniform with bound
/// 1/sqrt(in), B zero), seeded by the run's seed and the tensor's name so the
/// result does not depend on the order tensors are created in.
fn fresh_tensor(name: &str, shape: &[usize], init: FreshInit, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let norm_weight = name.ends_with("LayerNorm.weight") || name.ends_with("layer_norm.weight");
    let mut rng = rand::rngs::StdRng::seed_from_u64(init.seed ^ name_hash(name));
    let values: Vec<f32> = if name.ends_with(".bias") || name.ends_with("lora_B.weight") {
        vec![0.0; n]
    } else if name.ends_with("lora_A.weight") {
        let bound = 1.0 / (shape[shape.len() - 1] as f32).sqrt();
        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
    } else if norm_weight {
        vec![1.0; n]
    } else {
        (0..n)
            .map(|_| {
                // Box-Muller from two uniforms in (0, 1].
                let u1: f32 = 1.0 - rng.random::<f32>();
                let u2: f32 = rng.random::<f32>();
                init.std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    };
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// A stable 64-bit hash of a tensor or module name (FNV-1a), for per-name seeds.
pub(crate) fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
