//! LoRA adapters in PEFT's layout: `adapter_config.json` plus `adapter_model.safetensors` with
//! `base_model.model.{module}.lora_A.weight` (rank, in) and `….lora_B.weight` (out, rank) for
//! every adapted linear layer. The same adapter trains (its tensors are trainable parameters),
//! runs at inference (`--lora DIR`) and folds into the base weights (`wordloom merge`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::linear::{AdapterMode, Linear, LoraAdapter};
use super::params::{FreshInit, Parameters};
use crate::error::{Error, Result};

/// PEFT's prefix of adapter tensor names (its wrapper `base_model` around the model `model`).
pub const PEFT_PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// `target_modules` as PEFT writes it: module names (matching a full name or its last parts),
/// `"all-linear"`, or a regular expression the whole module name must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

/// The settings of adapter_config.json that change what the adapter computes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    /// Scale alpha / sqrt(r) instead of alpha / r.
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub peft_type: Option<String>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

impl LoraConfig {
    /// A config for training: rank, alpha, dropout and target module names.
    pub fn new(r: usize, alpha: f64, dropout: f64, targets: TargetModules) -> Result<Self> {
        let config = LoraConfig {
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: targets,
            use_rslora: false,
            fan_in_fan_out: false,
            use_dora: false,
            bias: Some("none".into()),
            peft_type: Some("LORA".into()),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            modules_to_save: None,
        };
        config.check()?;
        Ok(config)
    }

    /// Refuse the PEFT features we would otherwise silently ignore.
    fn check(&self) -> Result<()> {
        let unsupported = |what: &str| {
            Err(Error::invalid(format!(
                "LoRA adapter: {what} is not supported"
            )))
        };
        if self.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return unsupported(&format!("peft_type {:?}", self.peft_type));
        }
        if self.r == 0 {
            return Err(Error::invalid("LoRA rank r must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::invalid(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        if self.use_dora {
            return unsupported("DoRA (use_dora)");
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out (GPT-2 Conv1D layers)");
        }
        if self.bias.as_deref().is_some_and(|b| b != "none") {
            return unsupported(&format!("bias = {:?}", self.bias));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return unsupported("rank_pattern / alpha_pattern");
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported("layers_to_transform");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return unsupported("modules_to_save");
        }
        self.matcher()?;
        Ok(())
    }

    /// The factor of B A x.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    fn matcher(&self) -> Result<Matcher> {
        Ok(match &self.target_modules {
            TargetModules::Names(names) => Matcher::Names(names.clone()),
            TargetModules::Pattern(p) if p == "all-linear" => Matcher::AllLinear,
            TargetModules::Pattern(p) => Matcher::Regex(
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| Error::invalid(format!("target_modules pattern: {e}")))?,
            ),
        })
    }

    pub fn describe_targets(&self) -> String {
        match &self.target_modules {
            TargetModules::Names(n) => n.join(", "),
            TargetModules::Pattern(p) => p.clone(),
        }
    }
}

/// PEFT's `check_target_module_exists`.
enum Matcher {
    Names(Vec<String>),
    AllLinear,
    Regex(regex::Regex),
}

impl Matcher {
    fn matches(&self, module: &str) -> bool {
        match self {
            Matcher::Names(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            // Every linear layer but the output projection.
            Matcher::AllLinear => module != "lm_head" && !module.ends_with(".lm_head"),
            Matcher::Regex(r) => r.is_match(module),
        }
    }
}

/// An adapter being trained or applied: its config, its tensors, and which layers took it.
pub struct Lora {
    config: LoraConfig,
    matcher: Matcher,
    params: Arc<Parameters>,
    mode: Arc<AdapterMode>,
    /// Every linear layer the model asked for, and those that got an adapter.
    seen: Mutex<Vec<String>>,
    attached: Mutex<BTreeSet<String>>,
    /// Read from a saved adapter (so every targeted layer must have its tensors).
    loaded: bool,
}

fn tensor_name(module: &str, which: char) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{which}.weight")
}

impl Lora {
    /// A new adapter to train: A from PEFT's Kaiming-uniform init (seeded), B zero, so the
    /// adapted model starts out equal to the base.
    pub fn fresh(config: LoraConfig, seed: u64, autocast: Option<DType>) -> Result<Self> {
        config.check()?;
        let params = Parameters::fresh(
            Path::new("(new LoRA adapter)"),
            FreshInit { std: 0.0, seed },
        )
        .with_autocast(autocast);
        Self::with_parameters(config, Arc::new(params), false)
    }

    fn with_parameters(config: LoraConfig, params: Arc<Parameters>, loaded: bool) -> Result<Self> {
        Ok(Lora {
            loaded,
            matcher: config.matcher()?,
            config,
            params,
            mode: Arc::default(),
            seen: Mutex::default(),
            attached: Mutex::default(),
        })
    }

    /// A saved adapter (PEFT layout), for inference or to continue training.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(Error::file(
                dir,
                format!("not a LoRA adapter directory: no {CONFIG_FILE}"),
            ));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: LoraConfig = serde_json::from_str(&text)
            .map_err(|e| Error::file(&config_path, format!("invalid adapter config: {e}")))?;
        config
            .check()
            .map_err(|e| Error::file(&config_path, e.to_string()))?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(Error::file(dir, format!("adapter has no {WEIGHTS_FILE}")));
        }
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
            .map_err(|e| Error::file(&weights, format!("corrupt or truncated safetensors: {e}")))?;
        for name in tensors.keys() {
            let known = name.starts_with(PEFT_PREFIX)
                && (name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight"));
            if !known {
                return Err(Error::file(
                    &weights,
                    format!("tensor `{name}` is not a LoRA A/B weight (only plain LoRA adapters are supported)"),
                ));
            }
        }
        let params = Parameters::from_tensors(&weights, tensors.into_iter().collect())?;
        Self::with_parameters(config, Arc::new(params), true)
    }

    pub fn parameters(&self) -> &Arc<Parameters> {
        &self.params
    }

    /// Switch every adapter of the models built over this LoRA between training and evaluation.
    pub fn mode(&self) -> &Arc<AdapterMode> {
        &self.mode
    }

    /// `linear` (the layer `module`, e.g. `model.layers.0.self_attn.q_proj`) with this adapter
    /// added when the module is a target.
    pub fn attach(&self, module: &str, linear: Linear, device: &Device) -> Result<Linear> {
        lock(&self.seen).push(module.to_string());
        if !self.matcher.matches(module) {
            return Ok(linear);
        }
        let r = self.config.r;
        if self.loaded && !self.params.contains(&tensor_name(module, 'A')) {
            return Err(Error::file(
                self.params.path(),
                format!("the adapter has no weights for `{module}`, a layer its target_modules select — was it trained on another base model?"),
            ));
        }
        let a = self.params.tensor(
            &tensor_name(module, 'A'),
            &[r, linear.in_features()],
            device,
        )?;
        let b = self.params.tensor(
            &tensor_name(module, 'B'),
            &[linear.out_features(), r],
            device,
        )?;
        lock(&self.attached).insert(module.to_string());
        Ok(linear.with_lora(LoraAdapter {
            a,
            b,
            scale: self.config.scale(),
            dropout: self.config.lora_dropout as f32,
            mode: self.mode.clone(),
            module_seed: super::params::name_hash(module),
            autocast: self.params.autocast(),
        }))
    }

    /// After a model was built: the adapter reached some layer, and every tensor it carries
    /// belongs to a layer of this model (else it was trained for another base).
    pub fn check_attached(&self, base: &Path) -> Result<()> {
        let attached = lock(&self.attached).clone();
        if attached.is_empty() {
            let mut kinds: Vec<String> = lock(&self.seen)
                .iter()
                .map(|m| m.rsplit('.').next().unwrap_or(m).to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if kinds.is_empty() {
                kinds.push("(none: this architecture does not support LoRA yet)".into());
            }
            return Err(Error::file(
                base,
                format!(
                    "LoRA target modules [{}] match no linear layer of this model (its layers: {})",
                    self.config.describe_targets(),
                    kinds.join(", ")
                ),
            ));
        }
        let expected: BTreeSet<String> = attached
            .iter()
            .flat_map(|m| [tensor_name(m, 'A'), tensor_name(m, 'B')])
            .collect();
        if let Some((stray, _)) = self
            .params
            .vars()
            .into_iter()
            .find(|(name, _)| !expected.contains(name))
        {
            return Err(Error::file(
                self.params.path(),
                format!(
                    "adapter tensor `{stray}` has no matching layer in {} — was the adapter trained on another base model?",
                    base.display()
                ),
            ));
        }
        Ok(())
    }

    /// Write the adapter as PEFT does (`save_pretrained`), readable by `PeftModel.from_pretrained`.
    pub fn save(&self, dir: &Path, base_model: &str, task_type: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: std::collections::HashMap<String, Tensor> = self
            .params
            .vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().detach()))
            .collect();
        let weights = dir.join(WEIGHTS_FILE);
        let tmp = weights.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
        let mut targets: Vec<String> = lock(&self.attached)
            .iter()
            .map(|m| m.rsplit('.').next().unwrap_or(m).to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if let TargetModules::Pattern(p) = &self.config.target_modules {
            targets = vec![p.clone()];
        }
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.lora_alpha,
            "lora_dropout": self.config.lora_dropout,
            "target_modules": match &self.config.target_modules {
                TargetModules::Pattern(p) => serde_json::json!(p),
                TargetModules::Names(_) => serde_json::json!(targets),
            },
            "use_rslora": self.config.use_rslora,
            "use_dora": false,
            "fan_in_fan_out": false,
            "bias": "none",
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        let text = serde_json::to_vec_pretty(&config).map_err(|e| Error::invalid(e.to_string()))?;
        let path = dir.join(CONFIG_FILE);
        let tmp: PathBuf = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    /// `scale · B A` of `module`, the update `merge` adds to its (out, in) weight.
    pub fn delta(&self, module: &str) -> Result<Option<Tensor>> {
        let (a, b) = (tensor_name(module, 'A'), tensor_name(module, 'B'));
        if !self.params.contains(&a) {
            return Ok(None);
        }
        let vars: BTreeMap<String, candle_core::Var> = self.params.vars().into_iter().collect();
        let (Some(a), Some(b)) = (vars.get(&a), vars.get(&b)) else {
            return Err(Error::file(
                self.params.path(),
                format!("adapter has `{a}` without its `{b}`"),
            ));
        };
        Ok(Some(
            (b.as_tensor().detach().matmul(&a.as_tensor().detach())? * self.config.scale())?,
        ))
    }

    /// Fold the adapter into the HF checkpoint `base_dir` (W += scale·B·A, in W's dtype) and
    /// write the merged checkpoint to `out`: model.safetensors plus the base's config and
    /// tokenizer files. Returns how many weights changed.
    pub fn merge(&self, base_dir: &Path, out: &Path) -> Result<usize> {
        if !base_dir.join("config.json").is_file() {
            return Err(Error::file(
                base_dir,
                "merging needs the base as a Hugging Face directory (a GGUF base is quantized: apply the adapter at run time with --lora instead)",
            ));
        }
        if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(base_dir).ok() {
            return Err(Error::file(
                out,
                "the output directory is the base model itself",
            ));
        }
        let store = super::WeightStore::open_hf_dir(base_dir)?;
        let mut tensors = std::collections::HashMap::new();
        let mut merged = BTreeSet::new();
        for (name, tensor) in store.all_tensors()? {
            let module = name.strip_suffix(".weight").unwrap_or(&name);
            let tensor = match self.delta(module)? {
                Some(delta) if name.ends_with(".weight") => {
                    if delta.dims() != tensor.dims() {
                        return Err(Error::ShapeMismatch {
                            name: format!("{name} (adapter update)"),
                            expected: tensor.dims().to_vec(),
                            found: delta.dims().to_vec(),
                        });
                    }
                    merged.insert(module.to_string());
                    let dtype = tensor.dtype();
                    (tensor.to_dtype(candle_core::DType::F32)? + delta)?.to_dtype(dtype)?
                }
                _ => tensor,
            };
            tensors.insert(name, tensor);
        }
        if let Some(missing) = self.modules().into_iter().find(|m| !merged.contains(m)) {
            return Err(Error::file(
                base_dir,
                format!("the adapter changes `{missing}`, which this checkpoint does not have — was it trained on another base?"),
            ));
        }
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let weights = out.join("model.safetensors");
        let tmp = weights.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
        for entry in std::fs::read_dir(base_dir).map_err(|e| Error::io(base_dir, e))? {
            let path = entry.map_err(|e| Error::io(base_dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let weights_file = name.ends_with(".safetensors")
                || name == "model.safetensors.index.json"
                || name == "pytorch_model.bin";
            if path.is_file() && !weights_file {
                std::fs::copy(&path, out.join(name)).map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(merged.len())
    }

    /// Modules the adapter carries weights for.
    pub fn modules(&self) -> Vec<String> {
        self.params
            .vars()
            .into_iter()
            .filter_map(|(name, _)| {
                name.strip_prefix(PEFT_PREFIX)?
                    .strip_suffix(".lora_A.weight")
                    .map(str::to_string)
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_modules_match_as_peft_does() {
        let names =
            LoraConfig::new(4, 8.0, 0.0, TargetModules::Names(vec!["q_proj".into()])).unwrap();
        let m = names.matcher().unwrap();
        assert!(m.matches("model.layers.0.self_attn.q_proj"));
        assert!(!m.matches("model.layers.0.self_attn.qq_proj"));
        let all =
            LoraConfig::new(4, 8.0, 0.0, TargetModules::Pattern("all-linear".into())).unwrap();
        assert!(all.matcher().unwrap().matches("model.layers.0.mlp.up_proj"));
        assert!(!all.matcher().unwrap().matches("lm_head"));
        let re = LoraConfig::new(
            4,
            8.0,
            0.0,
            TargetModules::Pattern(r".*\.(q|v)_proj".into()),
        )
        .unwrap();
        assert!(re
            .matcher()
            .unwrap()
            .matches("model.layers.1.self_attn.v_proj"));
        assert!(!re
            .matcher()
            .unwrap()
            .matches("model.layers.1.self_attn.k_proj"));
        assert!(LoraConfig::new(0, 8.0, 0.0, TargetModules::Names(vec![])).is_err());
        assert_eq!(names.scale(), 2.0);
    }
}
