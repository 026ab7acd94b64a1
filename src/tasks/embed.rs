//! Sentence embeddings as sentence-transformers computes them: encoder, pooling (modules.json +
//! `1_Pooling/config.json`), optional L2 normalisation.

use std::path::Path;

use candle_core::Tensor;
use tokenizers::Encoding;

use super::encoder::{run_valid, EncoderModel};
use crate::error::{Error, Result};
use crate::models::bert::Positions;
use crate::models::LoadOptions;

/// Which pooled vectors make up an embedding; several are concatenated in this order, as
/// sentence-transformers does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pooling {
    pub cls: bool,
    pub max: bool,
    pub mean: bool,
    pub mean_sqrt_len: bool,
    pub last_token: bool,
}

impl Pooling {
    pub fn mean() -> Self {
        Pooling {
            mean: true,
            ..Default::default()
        }
    }

    fn from_config(path: &Path) -> Result<Self> {
        let json = read_json(path)?;
        let flag = |key: &str| json.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
        if flag("pooling_mode_weightedmean_tokens") {
            return Err(Error::file(
                path,
                "weighted-mean pooling is not supported (supported: cls, max, mean, mean_sqrt_len, lasttoken)",
            ));
        }
        let pooling = Pooling {
            cls: flag("pooling_mode_cls_token"),
            max: flag("pooling_mode_max_tokens"),
            mean: flag("pooling_mode_mean_tokens"),
            mean_sqrt_len: flag("pooling_mode_mean_sqrt_len_tokens"),
            last_token: flag("pooling_mode_lasttoken"),
        };
        if pooling == Pooling::default() {
            return Err(Error::file(path, "no pooling mode is enabled"));
        }
        Ok(pooling)
    }

    /// Pool one input's rows `hidden[..len]` (each `width` wide).
    fn pool(&self, hidden: &[f32], len: usize, width: usize) -> Vec<f32> {
        let rows = || hidden[..len * width].chunks_exact(width);
        let mut out = Vec::new();
        if self.cls {
            out.extend_from_slice(&hidden[..width]);
        }
        if self.max {
            let mut max = vec![f32::NEG_INFINITY; width];
            for row in rows() {
                for (m, v) in max.iter_mut().zip(row) {
                    *m = m.max(*v);
                }
            }
            out.extend(max);
        }
        if self.mean || self.mean_sqrt_len {
            let mut sum = vec![0f32; width];
            for row in rows() {
                for (s, v) in sum.iter_mut().zip(row) {
                    *s += v;
                }
            }
            if self.mean {
                out.extend(sum.iter().map(|s| s / len as f32));
            }
            if self.mean_sqrt_len {
                out.extend(sum.iter().map(|s| s / (len as f32).sqrt()));
            }
        }
        if self.last_token {
            out.extend_from_slice(&hidden[(len - 1) * width..len * width]);
        }
        out
    }
}

/// An encoder that turns texts into vectors.
pub struct Embedder {
    pub model: EncoderModel,
    pub pooling: Pooling,
    /// Whether the model's own pipeline ends in a Normalize module (or, for a bare encoder, our
    /// default: unit vectors, so that dot products are cosine similarities).
    pub normalize: bool,
}

impl Embedder {
    pub fn load(spec: &str, options: &LoadOptions) -> Result<Self> {
        let model = EncoderModel::load(spec, options)?;
        let (pooling, normalize) = sentence_transformers_modules(&model.dir)?;
        Ok(Embedder {
            model,
            pooling,
            normalize,
        })
    }

    /// Embedding width.
    pub fn dimension(&self) -> usize {
        let h = self.model.encoder.hidden_size();
        let p = &self.pooling;
        h * [p.cls, p.max, p.mean, p.mean_sqrt_len, p.last_token]
            .iter()
            .filter(|&&b| b)
            .count()
    }

    /// Embed every text; each input keeps its own error (empty text, too long when overflow is
    /// an error). `normalize` applies on top of the model's own setting only when both agree.
    pub fn embed(&self, texts: &[&str], normalize: bool) -> Result<Vec<Result<Vec<f32>>>> {
        let normalize = normalize && self.normalize;
        let encodings = self.model.tokenize_all(texts);
        run_valid(&self.model, encodings, Positions::All, |batch, hidden| {
            self.pool_batch(batch, hidden, normalize)
        })
    }

    /// Embed texts that must all succeed.
    pub fn embed_strict(&self, texts: &[&str], normalize: bool) -> Result<Vec<Vec<f32>>> {
        self.embed(texts, normalize)?.into_iter().collect()
    }

    fn pool_batch(
        &self,
        batch: &[(usize, &Encoding)],
        hidden: &Tensor,
        normalize: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let (_, t, width) = hidden.dims3()?;
        let data = hidden.flatten_all()?.to_vec1::<f32>()?;
        Ok(batch
            .iter()
            .enumerate()
            .map(|(row, (_, encoding))| {
                let rows = &data[row * t * width..(row + 1) * t * width];
                let mut v = self.pooling.pool(rows, encoding.len(), width);
                if normalize {
                    l2_normalize(&mut v);
                }
                v
            })
            .collect())
    }
}

/// Scale to unit length, as torch's `F.normalize` (eps 1e-12).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}

/// Pooling and normalisation from a sentence-transformers layout; mean pooling for a bare encoder.
fn sentence_transformers_modules(dir: &Path) -> Result<(Pooling, bool)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok((Pooling::mean(), true));
    }
    let modules = read_json(&modules_path)?;
    let modules = modules
        .as_array()
        .ok_or_else(|| Error::file(&modules_path, "expected a list of modules"))?;
    let mut pooling = None;
    let mut normalize = false;
    for module in modules {
        let kind = module.get("type").and_then(|v| v.as_str()).unwrap_or("");
        let path = module.get("path").and_then(|v| v.as_str()).unwrap_or("");
        match kind.rsplit('.').next().unwrap_or("") {
            "Transformer" => {}
            "Pooling" => pooling = Some(Pooling::from_config(&dir.join(path).join("config.json"))?),
            "Normalize" => normalize = true,
            other => {
                return Err(Error::file(
                    &modules_path,
                    format!(
                        "sentence-transformers module `{other}` is not supported (supported: Transformer, Pooling, Normalize)"
                    ),
                ))
            }
        }
    }
    Ok((pooling.unwrap_or_else(Pooling::mean), normalize))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}
