//! One lookup for model weights by their Hugging Face names, over safetensors or GGUF.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::pickle::PthTensors;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::gguf::GgufFile;
use super::linear::{Embedding, Linear, LinearWeight, QuantWeight};
use super::lora::Lora;
use super::params::Parameters;
use crate::error::{Error, Result};
use crate::kernels::QuantKind;

/// HF name suffix -> GGUF name suffix, for every family we load from GGUF.
/// Layer-level names are matched after `model.layers.{i}.` / `blk.{i}.`.
const GGUF_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Translate `model.layers.3.self_attn.q_proj.weight` to `blk.3.attn_q.weight`.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    let (stem, kind) = hf_name.rsplit_once('.')?;
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (layer, module) = rest.split_once('.')?;
        let (_, gguf) = GGUF_NAMES.iter().find(|(hf, _)| *hf == module)?;
        return Some(format!("blk.{layer}.{gguf}.{kind}"));
    }
    let (_, gguf) = GGUF_NAMES.iter().find(|(hf, _)| *hf == stem)?;
    Some(format!("{gguf}.{kind}"))
}

/// Weights of one model, addressed by HF tensor names.
pub enum WeightStore {
    Safetensors {
        tensors: MmapedSafetensors,
        dir: PathBuf,
    },
    Gguf(Arc<GgufFile>),
    /// A PyTorch `pytorch_model.bin` state dict, for checkpoints that have no safetensors.
    Pth {
        tensors: PthTensors,
        path: PathBuf,
    },
    /// Trainable f32 parameters: every tensor is a `Var`, linear layers stay differentiable.
    Trainable(Arc<Parameters>),
    /// A frozen base whose targeted linear layers carry a LoRA adapter.
    Adapted {
        base: Arc<WeightStore>,
        lora: Arc<Lora>,
    },
}

impl WeightStore {
    /// Open every `*.safetensors` shard of an HF directory (through the index when there is one).
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            super::source::shard_names(&index)?
                .into_iter()
                .map(|n| dir.join(n))
                .collect()
        } else {
            super::source::files_with_extension(dir, "safetensors")?
        };
        if files.is_empty() {
            return Err(Error::file(
                dir,
                "no *.safetensors weights in the model directory",
            ));
        }
        for file in &files {
            if !file.is_file() {
                return Err(Error::file(
                    file,
                    "weight shard listed in the index is missing",
                ));
            }
        }
        // SAFETY: read-only mapping of model files, as for GGUF.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::file(dir, format!("corrupt or truncated safetensors: {e}")))?;
        Ok(WeightStore::Safetensors {
            tensors,
            dir: dir.to_path_buf(),
        })
    }

    /// The weights of an HF directory: safetensors when present, else `pytorch_model.bin`.
    pub fn open_hf_dir(dir: &Path) -> Result<Self> {
        let has_safetensors = dir.join("model.safetensors.index.json").is_file()
            || !super::source::files_with_extension(dir, "safetensors")?.is_empty();
        let pickle = dir.join("pytorch_model.bin");
        if !has_safetensors && pickle.is_file() {
            let tensors = PthTensors::new(&pickle, None)
                .map_err(|e| Error::file(&pickle, format!("unreadable PyTorch checkpoint: {e}")))?;
            return Ok(WeightStore::Pth {
                tensors,
                path: pickle,
            });
        }
        Self::open_safetensors_dir(dir)
    }

    pub fn path(&self) -> &Path {
        match self {
            WeightStore::Pth { path, .. } => path,
            WeightStore::Safetensors { dir, .. } => dir,
            WeightStore::Gguf(g) => g.path(),
            WeightStore::Trainable(p) => p.path(),
            WeightStore::Adapted { base, .. } => base.path(),
        }
    }

    fn gguf_key(&self, hf_name: &str) -> String {
        gguf_name(hf_name).unwrap_or_else(|| hf_name.to_string())
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            WeightStore::Safetensors { tensors, .. } => tensors.get(hf_name).is_ok(),
            WeightStore::Pth { tensors, .. } => tensors.tensor_infos().contains_key(hf_name),
            WeightStore::Gguf(g) => g.has_tensor(&self.gguf_key(hf_name)),
            WeightStore::Trainable(p) => p.contains(hf_name),
            WeightStore::Adapted { base, .. } => base.contains(hf_name),
        }
    }

    /// Every tensor of an HF checkpoint by name, in its stored dtype (for rewriting checkpoints).
    pub fn all_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        match self {
            WeightStore::Safetensors { tensors, dir } => {
                for (name, _) in tensors.tensors() {
                    let t = tensors
                        .load(&name, &Device::Cpu)
                        .map_err(|e| Error::file(dir, format!("tensor `{name}`: {e}")))?;
                    out.push((name, t));
                }
            }
            WeightStore::Pth { tensors, path } => {
                for name in tensors.tensor_infos().keys() {
                    let t = tensors
                        .get(name)
                        .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?
                        .ok_or_else(|| self.missing(name))?;
                    out.push((name.clone(), t));
                }
            }
            _ => {
                return Err(Error::file(
                    self.path(),
                    "only a Hugging Face checkpoint (safetensors or pytorch_model.bin) can be rewritten",
                ))
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// `prefix` when the checkpoint names `probe` with it (saved from a model with a head, e.g.
    /// `transformer.` of *ForCausalLM), else "" (saved from the bare model).
    pub fn prefix_if_present<'a>(&self, prefix: &'a str, probe: &str) -> &'a str {
        if self.contains(&format!("{prefix}{probe}")) {
            prefix
        } else {
            ""
        }
    }

    fn missing(&self, hf_name: &str) -> Error {
        let name = match self {
            WeightStore::Adapted { base, .. } => return base.missing(hf_name),
            WeightStore::Safetensors { .. }
            | WeightStore::Pth { .. }
            | WeightStore::Trainable(_) => hf_name.to_string(),
            WeightStore::Gguf(_) => self.gguf_key(hf_name),
        };
        Error::MissingTensor {
            path: self.path().to_path_buf(),
            name,
        }
    }

    /// A dense tensor in `dtype`, checked against the expected shape.
    pub fn tensor(
        &self,
        hf_name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if !self.contains(hf_name) && !matches!(self, WeightStore::Trainable(_)) {
            return Err(self.missing(hf_name));
        }
        let tensor = match self {
            WeightStore::Adapted { base, .. } => return base.tensor(hf_name, shape, dtype, device),
            // Master weights stay f32 (a new head's tensors are created on first use).
            WeightStore::Trainable(p) => p.tensor(hf_name, shape, device)?,
            WeightStore::Safetensors { tensors, dir } => tensors
                .load(hf_name, device)
                .map_err(|e| Error::file(dir, format!("tensor `{hf_name}`: {e}")))?
                .to_dtype(dtype)?,
            WeightStore::Pth { tensors, path } => tensors
                .get(hf_name)
                .map_err(|e| Error::file(path, format!("tensor `{hf_name}`: {e}")))?
                .ok_or_else(|| self.missing(hf_name))?
                .to_dtype(dtype)?,
            WeightStore::Gguf(g) => g.dense(&self.gguf_key(hf_name), dtype, device)?,
        };
        check_shape(hf_name, tensor.dims(), shape)?;
        Ok(tensor)
    }

    /// A linear layer `prefix.weight` (out, in) with an optional `prefix.bias`.
    pub fn linear(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        with_bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Linear> {
        if let WeightStore::Adapted { base, lora } = self {
            let linear =
                base.linear(prefix, in_features, out_features, with_bias, dtype, device)?;
            return lora.attach(prefix, linear, device);
        }
        let weight = self.linear_weight(
            &format!("{prefix}.weight"),
            in_features,
            out_features,
            dtype,
            device,
        )?;
        let bias = if with_bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out_features], dtype, device)?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias, in_features, out_features)?.with_autocast(self.autocast()))
    }

    /// The dtype trainable linear layers multiply in (mixed precision), if not f32.
    pub fn autocast(&self) -> Option<DType> {
        match self {
            WeightStore::Trainable(p) => p.autocast(),
            _ => None,
        }
    }

    fn linear_weight(
        &self,
        name: &str,
        in_features: usize,
        out_features: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<LinearWeight> {
        let shape = [out_features, in_features];
        if let WeightStore::Gguf(g) = self {
            let key = self.gguf_key(name);
            let (ggml, dims) = g.tensor_type(&key).map_err(|_| self.missing(name))?;
            check_shape(&key, &dims, &shape)?;
            if let Some(kind) = own_kernel(ggml, device) {
                let bytes = g.tensor_bytes(&key)?;
                return Ok(LinearWeight::Quant(QuantWeight::from_gguf(
                    kind,
                    out_features,
                    in_features,
                    &bytes,
                )));
            }
            if !matches!(ggml, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                let q = g.qtensor(&key, device)?;
                return Ok(LinearWeight::CandleQuant(Arc::new(QMatMul::from_qtensor(
                    q,
                )?)));
            }
        }
        self.dense_weight(self.tensor(name, &shape, dtype, device)?)
    }

    /// A dense (out, in) weight built from this store's tensors (fused or transposed) as a linear
    /// layer's weight: packed for our CPU kernel, except while training, where packing would
    /// copy it out of the autograd graph.
    pub fn dense_weight(&self, weight: Tensor) -> Result<LinearWeight> {
        match self {
            WeightStore::Adapted { base, .. } => base.dense_weight(weight),
            WeightStore::Trainable(p) if !p.is_frozen() => Ok(LinearWeight::Dense(weight)),
            _ => LinearWeight::dense(weight),
        }
    }

    /// An embedding table (vocab, hidden); quantized tables stay quantized.
    pub fn embedding(
        &self,
        name: &str,
        vocab: usize,
        hidden: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Embedding> {
        if let WeightStore::Adapted { base, .. } = self {
            return base.embedding(name, vocab, hidden, dtype, device);
        }
        if let WeightStore::Gguf(g) = self {
            let key = self.gguf_key(name);
            let (ggml, dims) = g.tensor_type(&key).map_err(|_| self.missing(name))?;
            check_shape(&key, &dims, &[vocab, hidden])?;
            if let Some(kind) = own_kernel(ggml, device) {
                return Ok(Embedding::Quant(QuantWeight::from_gguf(
                    kind,
                    vocab,
                    hidden,
                    &g.tensor_bytes(&key)?,
                )));
            }
            if !matches!(ggml, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                return Ok(Embedding::CandleQuant(Arc::new(g.qtensor(&key, device)?)));
            }
        }
        Ok(Embedding::Dense(self.tensor(
            name,
            &[vocab, hidden],
            dtype,
            device,
        )?))
    }

    /// The output projection that shares the embedding table (tied embeddings).
    /// A frozen f32 table on the CPU is packed once for our matmul kernel and `embedding` then
    /// looks rows up in the packed copy, so the table is held once.
    pub fn tied_linear(embedding: &mut Embedding, vocab: usize, hidden: usize) -> Result<Linear> {
        if let Embedding::Dense(t) = embedding {
            let frozen = !t.is_variable() && !t.track_op();
            if frozen && t.dtype() == DType::F32 && t.device().is_cpu() {
                if let LinearWeight::Packed(p) = LinearWeight::dense(t.clone())? {
                    *embedding = Embedding::Packed(p);
                }
            }
        }
        let weight = match embedding {
            Embedding::Dense(t) => LinearWeight::Dense(t.clone()),
            Embedding::Packed(p) => LinearWeight::Packed(p.clone()),
            Embedding::Quant(q) => LinearWeight::Quant(q.clone()),
            Embedding::CandleQuant(q) => {
                LinearWeight::CandleQuant(Arc::new(QMatMul::from_arc(q.clone())?))
            }
        };
        Linear::new(weight, None, hidden, vocab)
    }
}

/// The block types our own CPU kernels run; the rest go to candle.
fn own_kernel(ggml: GgmlDType, device: &Device) -> Option<QuantKind> {
    if !device.is_cpu() {
        return None;
    }
    match ggml {
        GgmlDType::Q4_0 => Some(QuantKind::Q4_0),
        GgmlDType::Q4_1 => Some(QuantKind::Q4_1),
        GgmlDType::Q8_0 => Some(QuantKind::Q8_0),
        _ => None,
    }
}

fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found != expected {
        return Err(Error::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::gguf_name;

    #[test]
    fn hf_names_map_to_gguf_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight").as_deref(),
            Some("blk.12.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_proj.bias").as_deref(),
            Some("blk.0.attn_k.bias")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            gguf_name("model.norm.weight").as_deref(),
            Some("output_norm.weight")
        );
        assert_eq!(
            gguf_name("model.layers.1.mlp.down_proj.weight").as_deref(),
            Some("blk.1.ffn_down.weight")
        );
    }
}
