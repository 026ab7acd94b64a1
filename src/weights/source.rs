//! Where a model comes from: a local Hugging Face directory, a `.gguf` file, or a hub id.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A model location after resolution: everything needed is on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory in Hugging Face layout (config.json, *.safetensors, tokenizer.json, ...).
    HfDir(PathBuf),
    /// A single GGUF file holding weights, tokenizer and chat template.
    Gguf(PathBuf),
}

impl ModelSource {
    /// Resolve a user's model spec: an existing path, or a hub id `org/name` (optionally `org/name:file.gguf`).
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Self::from_path(path);
        }
        if looks_like_hub_id(spec) {
            return resolve_hub(spec);
        }
        Err(Error::ModelNotFound(spec.to_string()))
    }

    /// Classify an existing local path.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_file() {
            return if is_gguf(path)? {
                Ok(ModelSource::Gguf(path.to_path_buf()))
            } else {
                Err(Error::file(
                    path,
                    "not a GGUF file (no GGUF magic) and not a model directory",
                ))
            };
        }
        if path.join("config.json").is_file() {
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        let ggufs = files_with_extension(path, "gguf")?;
        match ggufs.as_slice() {
            [only] => Ok(ModelSource::Gguf(only.clone())),
            [] => Err(Error::file(
                path,
                "directory has no config.json and no .gguf file",
            )),
            _ => Err(Error::file(
                path,
                format!(
                    "directory has no config.json and {} .gguf files: name one",
                    ggufs.len()
                ),
            )),
        }
    }

    /// The path the user can recognise in messages.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p,
        }
    }
}

fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(_) => Ok(false),
    }
}

/// The files in `dir` with extension `ext`, sorted.
pub(crate) fn files_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    found.sort();
    Ok(found)
}

fn looks_like_hub_id(spec: &str) -> bool {
    let repo = spec.split(':').next().unwrap_or(spec);
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Files fetched for a Hugging Face layout repo; the optional ones may be absent.
const HUB_REQUIRED: &[&str] = &["config.json"];
const HUB_OPTIONAL: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    // sentence-transformers layout: pooling and normalisation of embeddings.
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// Fetch a hub repo into the standard HF cache (HF_HOME), or read it from there when HF_HUB_OFFLINE is set.
fn resolve_hub(spec: &str) -> Result<ModelSource> {
    let (repo_id, gguf_file) = match spec.split_once(':') {
        Some((repo, file)) => (repo, Some(file)),
        None => (spec, None),
    };
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let fetch = |file: &str| -> Result<Option<PathBuf>> {
        if offline {
            return Ok(hf_hub::Cache::from_env()
                .model(repo_id.to_string())
                .get(file));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .map_err(|e| Error::Hub(format!("{repo_id}: {e}")))?;
        match api.model(repo_id.to_string()).get(file) {
            Ok(path) => Ok(Some(path)),
            Err(hf_hub::api::sync::ApiError::RequestError(e))
                if matches!(*e, ureq::Error::Status(404, _)) =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::Hub(format!("{repo_id}/{file}: {e}"))),
        }
    };
    let need = |file: &str| -> Result<PathBuf> {
        fetch(file)?.ok_or_else(|| {
            let why = if offline {
                "not in the local cache (HF_HUB_OFFLINE is set)"
            } else {
                "not in the repository"
            };
            Error::Hub(format!("{repo_id}/{file}: {why}"))
        })
    };

    if let Some(file) = gguf_file {
        return Ok(ModelSource::Gguf(need(file)?));
    }
    let config = need(HUB_REQUIRED[0])?;
    for file in HUB_OPTIONAL {
        fetch(file)?;
    }
    if let Some(index) = fetch("model.safetensors.index.json")? {
        for shard in shard_names(&index)? {
            need(&shard)?;
        }
    } else if fetch("model.safetensors")?.is_none() {
        // Older checkpoints ship only PyTorch pickles.
        need("pytorch_model.bin")?;
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(ModelSource::HfDir(dir))
}

/// The distinct shard file names listed in a `model.safetensors.index.json`.
pub fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(index_path, format!("invalid JSON: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(index_path, "no `weight_map` object"))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_hub_id("org/name:model.Q4_1.gguf"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("single"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn missing_path_is_a_clear_error() {
        let err = ModelSource::resolve("/definitely/not/here").unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    }

    #[test]
    fn directory_without_config_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModelSource::resolve(dir.path().to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("no config.json"), "{err}");
    }
}
