//! Translation: an encoder-decoder checkpoint (Marian / opus-mt) with beam search and the
//! checkpoint's generation defaults, as transformers' translation pipeline runs it; or a chat
//! model asked to translate (so the default model translates out of the box).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::generate::beam::{beam_search, BeamSettings, EarlyStopping, Hypothesis, StepDecoder};
use crate::generate::sequence::GenerationParams;
use crate::models::marian::{Flavor, Marian};
use crate::models::t5::T5;
use crate::models::{EncoderMemory, KvCache, LanguageModel, LoadOptions};
use crate::tokenizer::sentencepiece::PieceVocabTokenizer;
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::weights::{ModelSource, WeightStore};

/// generation_config.json (or the generation keys of config.json), transformers' defaults.
#[derive(Clone, Debug, serde::Deserialize)]
struct GenerationDefaults {
    #[serde(default = "one")]
    num_beams: usize,
    #[serde(default)]
    max_length: Option<usize>,
    #[serde(default = "unit")]
    length_penalty: f32,
    #[serde(default)]
    early_stopping: serde_json::Value,
    #[serde(default)]
    no_repeat_ngram_size: usize,
    #[serde(default)]
    bad_words_ids: Vec<Vec<u32>>,
    #[serde(default)]
    forced_eos_token_id: Option<u32>,
    #[serde(default)]
    forced_bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    renormalize_logits: bool,
}

fn one() -> usize {
    1
}
fn unit() -> f32 {
    1.0
}
/// transformers' `max_length` when the checkpoint sets none: 20 new tokens after the decoder start.
const DEFAULT_MAX_LENGTH: usize = 20 + 1;

/// A translated text and how it scored.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Translation {
    pub text: String,
    /// Decoder ids, decoder start token first.
    pub token_ids: Vec<u32>,
    /// Beam score (sum log-probability / length^length_penalty); `None` from a chat model.
    pub score: Option<f32>,
}

/// The encoder-decoder families.
pub enum Seq2SeqModel {
    Marian(Marian),
    T5(T5),
}

impl Seq2SeqModel {
    pub fn encode(&self, ids: &[u32]) -> Result<EncoderMemory> {
        match self {
            Seq2SeqModel::Marian(m) => m.encode(ids),
            Seq2SeqModel::T5(m) => m.encode(ids),
        }
    }

    pub fn new_cache(&self) -> KvCache {
        match self {
            Seq2SeqModel::Marian(m) => m.new_cache(),
            Seq2SeqModel::T5(m) => m.new_cache(),
        }
    }

    /// f32 logits (n, vocab) of one decoder step of n sequences over one source.
    pub fn decode_step(
        &self,
        memory: &EncoderMemory,
        tokens: &[u32],
        caches: &mut [KvCache],
    ) -> Result<candle_core::Tensor> {
        match self {
            Seq2SeqModel::Marian(m) => m.decode_step(memory, tokens, caches),
            Seq2SeqModel::T5(m) => m.decode_step(memory, tokens, caches),
        }
    }

    pub fn decoder_start_token_id(&self) -> u32 {
        match self {
            Seq2SeqModel::Marian(m) => m.config.decoder_start_token_id,
            Seq2SeqModel::T5(m) => m
                .config
                .decoder_start_token_id
                .unwrap_or(m.config.pad_token_id),
        }
    }

    pub fn eos_token_id(&self) -> u32 {
        match self {
            Seq2SeqModel::Marian(m) => m.config.eos_token_id,
            Seq2SeqModel::T5(m) => m.config.eos_token_id,
        }
    }

    /// The longest source the model takes (fixed position tables), if limited.
    fn max_source_tokens(&self) -> Option<usize> {
        match self {
            Seq2SeqModel::Marian(m) => Some(m.config.max_position_embeddings),
            Seq2SeqModel::T5(_) => None,
        }
    }
}

/// Source text to ids and generated ids to text.
pub enum Seq2SeqTokenizer {
    /// SentencePiece models plus vocab.json (opus-mt).
    PieceVocab(PieceVocabTokenizer),
    /// tokenizer.json (T5).
    Hf(Tokenizer),
}

impl Seq2SeqTokenizer {
    /// Source pieces of `text`, as `tokenizer.tokenize` shows them in Python.
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => t.pieces(text),
            Seq2SeqTokenizer::Hf(t) => Ok(t
                .inner()
                .encode(text, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_tokens()
                .to_vec()),
        }
    }

    /// Source ids, special tokens (`</s>`) included.
    pub fn source_ids(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => Ok(t.ids(&t.pieces(text)?)),
            Seq2SeqTokenizer::Hf(t) => t.encode(text, true),
        }
    }

    /// Text of generated ids, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => Ok(t.decode(ids)),
            Seq2SeqTokenizer::Hf(t) => t.decode(ids, true),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => t.token_to_id(token),
            Seq2SeqTokenizer::Hf(t) => t.token_to_id(token),
        }
    }
}

/// An encoder-decoder translation model with its tokenizer and generation defaults.
pub struct Translator {
    pub model: Seq2SeqModel,
    pub tokenizer: Seq2SeqTokenizer,
    defaults: GenerationDefaults,
    pub dir: PathBuf,
}

/// Beams of one source sentence, for the beam search.
struct SourceDecoder<'a> {
    model: &'a Seq2SeqModel,
    memory: EncoderMemory,
}

impl StepDecoder for SourceDecoder<'_> {
    type State = KvCache;

    fn initial_state(&self) -> KvCache {
        self.model.new_cache()
    }

    fn fork(&self, state: &KvCache) -> Result<KvCache> {
        state.deep_copy()
    }

    fn step(&self, states: &mut [KvCache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .model
            .decode_step(&self.memory, tokens, states)?
            .to_vec2::<f32>()?)
    }
}

const ENCODER_DECODERS: &str = "marian (opus-mt), t5 (T5, Flan-T5), m2m_100 (M2M100)";

/// M2M100's language tokens in id order: tokenizer_config.json's `additional_special_tokens`.
fn language_tokens(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let tokens: Vec<String> = config
        .get("additional_special_tokens")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().or_else(|| t.get("content")?.as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if tokens.is_empty() {
        return Err(Error::file(
            &path,
            "no language tokens (additional_special_tokens)",
        ));
    }
    Ok(tokens)
}

impl Translator {
    /// Load an encoder-decoder from an HF directory or hub id.
    pub fn load(spec: &str) -> Result<Self> {
        let dir = match ModelSource::resolve(spec)? {
            ModelSource::HfDir(dir) => dir,
            ModelSource::Gguf(path) => {
                return Err(Error::file(
                    path,
                    "a GGUF file holds a decoder-only model; translation with it goes through its chat template",
                ))
            }
        };
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&config_path, format!("invalid JSON: {e}")))?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let parse_error =
            |e: serde_json::Error| Error::file(&config_path, format!("invalid config: {e}"));
        let device = LoadOptions::default().device;
        let (model, tokenizer) = match model_type {
            "marian" => {
                let weights = WeightStore::open_hf_dir(&dir)?;
                let config = serde_json::from_value(config.clone()).map_err(parse_error)?;
                let tokenizer = PieceVocabTokenizer::load(
                    &dir.join("source.spm"),
                    &dir.join("target.spm"),
                    &dir.join("vocab.json"),
                )?;
                (
                    Seq2SeqModel::Marian(Marian::load(config, Flavor::Marian, &weights, &device)?),
                    Seq2SeqTokenizer::PieceVocab(tokenizer),
                )
            }
            "m2m_100" => {
                let weights = WeightStore::open_hf_dir(&dir)?;
                let config = serde_json::from_value(config.clone()).map_err(parse_error)?;
                let spm = dir.join("sentencepiece.bpe.model");
                let mut tokenizer = PieceVocabTokenizer::load(&spm, &spm, &dir.join("vocab.json"))?
                    .with_languages(&language_tokens(&dir)?);
                // transformers' M2M100Tokenizer reads English unless told otherwise.
                tokenizer.source_prefix = tokenizer.language_id("en").ok();
                (
                    Seq2SeqModel::Marian(Marian::load(config, Flavor::M2M100, &weights, &device)?),
                    Seq2SeqTokenizer::PieceVocab(tokenizer),
                )
            }
            "t5" => {
                let weights = WeightStore::open_hf_dir(&dir)?;
                let config = serde_json::from_value(config.clone()).map_err(parse_error)?;
                (
                    Seq2SeqModel::T5(T5::load(config, &weights, &device)?),
                    Seq2SeqTokenizer::Hf(Tokenizer::from_hf_dir(&dir)?),
                )
            }
            other => {
                return Err(Error::UnsupportedArchitecture {
                    found: if other.is_empty() {
                        "(config.json has no model_type)".into()
                    } else {
                        other.to_string()
                    },
                    supported: ENCODER_DECODERS,
                })
            }
        };
        let generation_path = dir.join("generation_config.json");
        let defaults_json = if generation_path.is_file() {
            let text = std::fs::read_to_string(&generation_path)
                .map_err(|e| Error::io(&generation_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::file(&generation_path, format!("invalid JSON: {e}")))?
        } else {
            config
        };
        let defaults = serde_json::from_value(defaults_json).map_err(|e| {
            Error::file(&generation_path, format!("invalid generation config: {e}"))
        })?;
        Ok(Translator {
            model,
            tokenizer,
            defaults,
            dir,
        })
    }

    /// Choose the source and target languages of a multilingual model (M2M100): the source
    /// token goes before the text, the target token is forced as the first generated one.
    pub fn set_languages(
        &mut self,
        source: Option<&str>,
        target: Option<&str>,
        settings: &mut BeamSettings,
    ) -> Result<()> {
        let Seq2SeqTokenizer::PieceVocab(tokenizer) = &mut self.tokenizer else {
            return Err(Error::invalid("this model does not take language codes"));
        };
        if !tokenizer.has_languages() {
            return Err(Error::invalid("this model does not take language codes"));
        }
        if let Some(code) = source {
            tokenizer.source_prefix = Some(tokenizer.language_id(code)?);
        }
        if let Some(code) = target {
            settings.forced_bos_token_id = Some(tokenizer.language_id(code)?);
        }
        Ok(())
    }

    /// Whether the model needs `--tgt` (a multilingual model with language tokens).
    pub fn is_multilingual(&self) -> bool {
        matches!(&self.tokenizer, Seq2SeqTokenizer::PieceVocab(t) if t.has_languages())
    }

    /// The checkpoint's own search settings (what `model.generate(**inputs)` uses).
    pub fn default_settings(&self) -> BeamSettings {
        let d = &self.defaults;
        let eos = match &d.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]),
            Some(serde_json::Value::Array(a)) => Some(
                a.iter()
                    .filter_map(|v| v.as_u64().map(|v| v as u32))
                    .collect(),
            ),
            _ => None,
        }
        .unwrap_or_else(|| vec![self.model.eos_token_id()]);
        BeamSettings {
            num_beams: d.num_beams.max(1),
            num_return_sequences: 1,
            length_penalty: d.length_penalty,
            early_stopping: match &d.early_stopping {
                serde_json::Value::Bool(true) => EarlyStopping::True,
                serde_json::Value::String(s) if s == "never" => EarlyStopping::Never,
                _ => EarlyStopping::False,
            },
            no_repeat_ngram_size: d.no_repeat_ngram_size,
            max_length: d.max_length.unwrap_or(DEFAULT_MAX_LENGTH),
            eos_token_ids: eos,
            forced_bos_token_id: d.forced_bos_token_id,
            forced_eos_token_id: d.forced_eos_token_id,
            suppressed: d
                .bad_words_ids
                .iter()
                .filter(|w| w.len() == 1)
                .map(|w| w[0])
                .collect(),
            renormalize: d.renormalize_logits,
        }
    }

    /// Source ids of `text`, as the Python tokenizer gives them (`</s>` last).
    pub fn source_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.source_ids(text)
    }

    /// Translate one text. A text longer than the model's input limit is split at sentence
    /// ends and translated piece by piece (never cut silently).
    pub fn translate(&self, text: &str, settings: &BeamSettings) -> Result<Vec<Translation>> {
        if text.trim().is_empty() {
            return Err(Error::invalid("nothing to translate: the text is empty"));
        }
        let ids = self.source_ids(text)?;
        let Some(limit) = self.model.max_source_tokens().filter(|&l| ids.len() > l) else {
            return self.translate_ids(&ids, settings);
        };
        let sentences = split_sentences(text);
        if sentences.len() < 2 {
            return Err(Error::invalid(format!(
                "a sentence of {} tokens is longer than the model's input limit of {limit} tokens",
                ids.len()
            )));
        }
        let mut joined = Translation {
            text: String::new(),
            token_ids: Vec::new(),
            score: None,
        };
        for sentence in sentences {
            let best = self.translate(
                sentence,
                &BeamSettings {
                    num_return_sequences: 1,
                    ..settings.clone()
                },
            )?;
            let best = best.into_iter().next().expect("one hypothesis");
            if !joined.text.is_empty() {
                joined.text.push(' ');
            }
            joined.text.push_str(&best.text);
            joined.token_ids.extend(best.token_ids);
        }
        Ok(vec![joined])
    }

    /// Translate source ids (already tokenized, `</s>` included).
    pub fn translate_ids(&self, ids: &[u32], settings: &BeamSettings) -> Result<Vec<Translation>> {
        let decoder = SourceDecoder {
            model: &self.model,
            memory: self.model.encode(ids)?,
        };
        let hypotheses = beam_search(&decoder, self.model.decoder_start_token_id(), settings)?;
        hypotheses
            .into_iter()
            .map(|Hypothesis { tokens, score }| {
                Ok(Translation {
                    text: self.tokenizer.decode(&tokens[1..])?,
                    token_ids: tokens,
                    score: Some(score),
                })
            })
            .collect()
    }
}

/// Sentences of `text`: split after `.`, `!`, `?` (and their CJK forms) followed by whitespace.
pub fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end_mark = matches!(c, '.' | '!' | '?' | '。' | '！' | '？');
        let next_is_space = chars.peek().is_none_or(|(_, n)| n.is_whitespace());
        if end_mark && next_is_space {
            let end = i + c.len_utf8();
            let piece = text[start..end].trim();
            if !piece.is_empty() {
                out.push(piece);
            }
            start = end;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// The chat turn that asks a chat model for a translation (local or remote).
pub fn translation_request(text: &str, source: Option<&str>, target: &str) -> Result<ChatMessage> {
    if text.trim().is_empty() {
        return Err(Error::invalid("nothing to translate: the text is empty"));
    }
    let from = source.map_or(String::new(), |s| format!(" from {}", language_name(s)));
    Ok(ChatMessage::new(
        "user",
        format!(
            "Translate the following text{from} into {}. Reply with the translation only.\n\n{text}",
            language_name(target)
        ),
    ))
}

/// Translate with a local chat model: the request goes through its chat template and the
/// answer is decoded greedily.
pub fn translate_by_prompt(
    lm: &LanguageModel,
    text: &str,
    source: Option<&str>,
    target: &str,
    max_tokens: usize,
) -> Result<Translation> {
    let request = translation_request(text, source, target)?;
    let prompt = lm.tokenizer.apply_chat_template(&[request])?;
    let ids = lm.tokenizer.encode(&prompt, false)?;
    let params = GenerationParams {
        max_tokens,
        ..GenerationParams::default()
    };
    let completion = crate::generate::generate(lm, ids, &params, |_| {})?;
    Ok(Translation {
        text: completion.text.trim().to_string(),
        token_ids: completion.token_ids,
        score: None,
    })
}

/// English name of a language code (ISO 639-1, or NLLB's `fra_Latn` form), else the code.
pub fn language_name(code: &str) -> String {
    let base = code.split(['_', '-']).next().unwrap_or(code).to_lowercase();
    let name = match base.as_str() {
        "en" | "eng" => "English",
        "fr" | "fra" => "French",
        "de" | "deu" => "German",
        "es" | "spa" => "Spanish",
        "it" | "ita" => "Italian",
        "pt" | "por" => "Portuguese",
        "nl" | "nld" => "Dutch",
        "ru" | "rus" => "Russian",
        "zh" | "zho" => "Chinese",
        "ja" | "jpn" => "Japanese",
        "ko" | "kor" => "Korean",
        "ar" | "arb" => "Arabic",
        "pl" | "pol" => "Polish",
        "sv" | "swe" => "Swedish",
        "tr" | "tur" => "Turkish",
        _ => return code.to_string(),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_their_ends_only() {
        assert_eq!(
            split_sentences("It is 3.5 m long. Really? Yes!  Done"),
            ["It is 3.5 m long.", "Really?", "Yes!", "Done"]
        );
        assert_eq!(split_sentences("no end mark"), ["no end mark"]);
    }
}
