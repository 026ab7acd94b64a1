//! Text <-> token ids, exactly as `transformers` does it, from tokenizer.json or GGUF metadata;
//! plus chat templates and incremental detokenizing for streaming.

pub mod chat_template;
pub mod gguf_vocab;
pub mod sentencepiece;

use std::path::Path;

pub use chat_template::{ChatMessage, ChatTemplate};

use crate::error::{Error, Result};
use crate::weights::GgufFile;

/// A tokenizer with the special-token facts that generation and chat need.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every id that ends generation (tokenizer eos plus generation_config / config eos ids).
    pub eos_token_ids: Vec<u32>,
    pub chat_template: Option<ChatTemplate>,
    /// Each token's text on its own, built on first use (constrained sampling tries them all).
    token_texts: std::sync::OnceLock<Vec<String>>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        extra_eos_ids: &[u32],
        chat_template: Option<String>,
    ) -> Result<Self> {
        let mut eos_token_ids: Vec<u32> = eos_token
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        for id in extra_eos_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        let chat_template = chat_template
            .map(|source| ChatTemplate::new(&source, bos_token.clone(), eos_token.clone()))
            .transpose()?;
        Ok(Tokenizer {
            inner,
            bos_token,
            eos_token,
            eos_token_ids,
            chat_template,
            token_texts: std::sync::OnceLock::new(),
        })
    }

    /// tokenizer.json + tokenizer_config.json (+ generation_config.json / config.json eos ids).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::file(
                dir,
                "tokenizer missing: no tokenizer.json in the model directory",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::file(&path, format!("invalid tokenizer: {e}")))?;
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let token_field = |key: &str| -> Option<String> {
            let value = config.as_ref()?.get(key)?;
            value
                .as_str()
                .map(str::to_string)
                .or_else(|| value.get("content")?.as_str().map(str::to_string))
        };
        let chat_template = config
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .and_then(template_source);
        let chat_template =
            chat_template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let mut eos_ids = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(json) = read_json_if_present(&dir.join(file))? {
                eos_ids.extend(ids_field(json.get("eos_token_id")));
            }
        }
        Tokenizer::new(
            inner,
            token_field("bos_token"),
            token_field("eos_token"),
            &eos_ids,
            chat_template,
        )
    }

    /// The tokenizer a GGUF file describes in its metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        gguf_vocab::tokenizer_from_gguf(gguf)
    }

    /// Encode text; `add_special_tokens` applies the tokenizer's BOS/EOS rules.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// Every id's decoded text (special tokens decode to ""), indexed by id.
    pub fn token_texts(&self) -> &[String] {
        self.token_texts.get_or_init(|| {
            (0..self.vocab_size() as u32)
                .map(|id| self.inner.decode(&[id], true).unwrap_or_default())
                .collect()
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Render a conversation with the model's chat template, ready for the assistant's turn.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(
                "the model has no chat template; use `generate` for raw prompts".into(),
            )
        })?;
        template.render(messages, true)
    }
}

/// `chat_template` is a string, or a list of named templates of which "default" is used.
fn template_source(value: &serde_json::Value) -> Option<String> {
    if let Some(s) = value.as_str() {
        return Some(s.to_string());
    }
    let list = value.as_array()?;
    let named = |name: &str| {
        list.iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string))
    };
    named("default").or_else(|| list.first()?.get("template")?.as_str().map(str::to_string))
}

fn ids_field(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}
