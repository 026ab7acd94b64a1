//! Translation: an encoder-decoder checkpoint (Marian / opus-mt) with beam search and the
//! checkpoint's generation defaults, as transformers' translation pipeline runs it; or a chat
//! model asked to translate (so the default model translates out of the box).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::generate::beam::{
    beam_search_batch, BeamSettings, EarlyStopping, Hypothesis, StepDecoder,
};
use crate::generate::sampling::SamplingParams;
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
    #[serde(default)]
    do_sample: bool,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    top_p: Option<f32>,
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

    /// f32 logits (n, vocab) of one decoder step of n sequences at one position, sequence i
    /// over source `memories[i]`.
    pub fn decode_step(
        &self,
        memories: &[&EncoderMemory],
        tokens: &[u32],
        caches: &mut [KvCache],
    ) -> Result<candle_core::Tensor> {
        match self {
            Seq2SeqModel::Marian(m) => m.decode_step(memories, tokens, caches),
            Seq2SeqModel::T5(m) => m.decode_step(memories, tokens, caches),
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
    /// SentencePiece models plus vocab.json (opus-mt, M2M100).
    PieceVocab(PieceVocabTokenizer),
    /// tokenizer.json (T5; NLLB with its language codes).
    Hf {
        tokenizer: Tokenizer,
        languages: Option<LanguageCodes>,
    },
}

/// Language codes that are tokens of a tokenizer.json (NLLB's `fra_Latn`, …).
pub struct LanguageCodes {
    ids: std::collections::HashMap<String, u32>,
    /// The source language's token, before the text (after `</s>` in NLLB's legacy behaviour).
    source: u32,
    legacy: bool,
    eos: u32,
}

impl LanguageCodes {
    /// NLLB's codes from tokenizer_config.json (`additional_special_tokens`), each a token of
    /// `tokenizer`; the source language is the config's `src_lang`, else English, as
    /// transformers' NllbTokenizer assumes.
    fn nllb(dir: &Path, tokenizer: &Tokenizer) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let mut ids = std::collections::HashMap::new();
        for code in language_tokens(dir)? {
            let id = tokenizer.token_to_id(&code).ok_or_else(|| {
                Error::file(
                    dir.join("tokenizer.json"),
                    format!("has no token for the language code `{code}` of tokenizer_config.json"),
                )
            })?;
            ids.insert(code, id);
        }
        let eos = tokenizer
            .token_to_id("</s>")
            .ok_or_else(|| Error::file(dir.join("tokenizer.json"), "has no `</s>` token"))?;
        let mut codes = LanguageCodes {
            ids,
            source: 0,
            legacy: config
                .get("legacy_behaviour")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            eos,
        };
        let source = config.get("src_lang").and_then(|v| v.as_str());
        codes.source = codes.id(source.unwrap_or("eng_Latn"))?;
        Ok(codes)
    }

    fn id(&self, code: &str) -> Result<u32> {
        self.ids.get(code).copied().ok_or_else(|| {
            let mut known: Vec<&str> = self.ids.keys().map(String::as_str).collect();
            known.sort_unstable();
            Error::invalid(format!(
                "unknown language `{code}`; this model knows: {}",
                known.join(", ")
            ))
        })
    }

    /// `[source] text </s>` (legacy: `text </s> [source]`), as NllbTokenizer builds it.
    fn wrap(&self, text_ids: Vec<u32>) -> Vec<u32> {
        if self.legacy {
            text_ids
                .into_iter()
                .chain([self.eos, self.source])
                .collect()
        } else {
            std::iter::once(self.source)
                .chain(text_ids)
                .chain([self.eos])
                .collect()
        }
    }
}

impl Seq2SeqTokenizer {
    /// Source pieces of `text`, as `tokenizer.tokenize` shows them in Python.
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => t.pieces(text),
            Seq2SeqTokenizer::Hf { tokenizer, .. } => Ok(tokenizer
                .inner()
                .encode(text, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_tokens()
                .to_vec()),
        }
    }

    /// Source ids, special tokens (`</s>`, a language code) included.
    pub fn source_ids(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => Ok(t.ids(&t.pieces(text)?)),
            Seq2SeqTokenizer::Hf {
                tokenizer,
                languages: None,
            } => tokenizer.encode(text, true),
            Seq2SeqTokenizer::Hf {
                tokenizer,
                languages: Some(codes),
            } => Ok(codes.wrap(tokenizer.encode(text, false)?)),
        }
    }

    /// Text of generated ids, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => Ok(t.decode(ids)),
            Seq2SeqTokenizer::Hf { tokenizer, .. } => tokenizer.decode(ids, true),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => t.token_to_id(token),
            Seq2SeqTokenizer::Hf { tokenizer, .. } => tokenizer.token_to_id(token),
        }
    }

    fn has_languages(&self) -> bool {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => t.has_languages(),
            Seq2SeqTokenizer::Hf { languages, .. } => languages.is_some(),
        }
    }

    /// The id of a language code's token (`fr` for M2M100, `fra_Latn` for NLLB).
    fn language_id(&self, code: &str) -> Result<u32> {
        match self {
            Seq2SeqTokenizer::PieceVocab(t) if t.has_languages() => t.language_id(code),
            Seq2SeqTokenizer::Hf {
                languages: Some(codes),
                ..
            } => codes.id(code),
            _ => Err(Error::invalid("this model does not take language codes")),
        }
    }

    /// Put `code`'s token into every source from now on.
    fn set_source_language(&mut self, code: &str) -> Result<()> {
        let id = self.language_id(code)?;
        match self {
            Seq2SeqTokenizer::PieceVocab(t) => t.source_prefix = Some(id),
            Seq2SeqTokenizer::Hf { languages, .. } => {
                if let Some(codes) = languages {
                    codes.source = id;
                }
            }
        }
        Ok(())
    }
}

/// An encoder-decoder translation model with its tokenizer and generation defaults.
pub struct Translator {
    pub model: Seq2SeqModel,
    pub tokenizer: Seq2SeqTokenizer,
    defaults: GenerationDefaults,
    pub dir: PathBuf,
}

/// Beams of a batch of source sentences, for the beam search.
struct SourcesDecoder<'a> {
    model: &'a Seq2SeqModel,
    memories: Vec<EncoderMemory>,
}

impl StepDecoder for SourcesDecoder<'_> {
    type State = KvCache;

    fn initial_state(&self) -> KvCache {
        self.model.new_cache()
    }

    fn fork(&self, state: &KvCache) -> Result<KvCache> {
        state.deep_copy()
    }

    fn step(
        &self,
        sources: &[usize],
        states: &mut [KvCache],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let memories: Vec<&EncoderMemory> = sources.iter().map(|&s| &self.memories[s]).collect();
        Ok(self
            .model
            .decode_step(&memories, tokens, states)?
            .to_vec2::<f32>()?)
    }
}

const ENCODER_DECODERS: &str = "marian (opus-mt), t5 (T5, Flan-T5), m2m_100 (M2M100, NLLB)";

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// M2M100's and NLLB's language tokens in id order: tokenizer_config.json's
/// `additional_special_tokens` (`extra_special_tokens` as transformers 5 saves it).
fn language_tokens(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("tokenizer_config.json");
    let config = read_json(&path)?;
    let tokens: Vec<String> = ["additional_special_tokens", "extra_special_tokens"]
        .iter()
        .find_map(|key| config.get(*key)?.as_array())
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
        let config = read_json(&config_path)?;
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
                let tokenizer = if dir.join("vocab.json").is_file() {
                    // M2M100: SentencePiece pieces numbered by vocab.json, language tokens after.
                    let spm = dir.join("sentencepiece.bpe.model");
                    let mut tokenizer =
                        PieceVocabTokenizer::load(&spm, &spm, &dir.join("vocab.json"))?
                            .with_languages(&language_tokens(&dir)?);
                    // transformers' M2M100Tokenizer reads English unless told otherwise.
                    tokenizer.source_prefix = tokenizer.language_id("en").ok();
                    Seq2SeqTokenizer::PieceVocab(tokenizer)
                } else if dir.join("tokenizer.json").is_file() {
                    // NLLB: everything, language codes included, is in tokenizer.json.
                    let tokenizer = Tokenizer::from_hf_dir(&dir)?;
                    let languages = LanguageCodes::nllb(&dir, &tokenizer)?;
                    Seq2SeqTokenizer::Hf {
                        tokenizer,
                        languages: Some(languages),
                    }
                } else {
                    return Err(Error::file(
                        &dir,
                        "an M2M100 / NLLB checkpoint needs vocab.json (M2M100) or tokenizer.json (NLLB)",
                    ));
                };
                (
                    Seq2SeqModel::Marian(Marian::load(config, Flavor::M2M100, &weights, &device)?),
                    tokenizer,
                )
            }
            "t5" => {
                let weights = WeightStore::open_hf_dir(&dir)?;
                let config = serde_json::from_value(config.clone()).map_err(parse_error)?;
                (
                    Seq2SeqModel::T5(T5::load(config, &weights, &device)?),
                    Seq2SeqTokenizer::Hf {
                        tokenizer: Tokenizer::from_hf_dir(&dir)?,
                        languages: None,
                    },
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
            read_json(&generation_path)?
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

    /// Choose the source and target languages of a multilingual model (M2M100, NLLB): the
    /// source token goes with the text, the target token is forced as the first generated one.
    pub fn set_languages(
        &mut self,
        source: Option<&str>,
        target: Option<&str>,
        settings: &mut BeamSettings,
    ) -> Result<()> {
        if let Some(code) = source {
            self.tokenizer.set_source_language(code)?;
        }
        if let Some(code) = target {
            settings.forced_bos_token_id = Some(self.tokenizer.language_id(code)?);
        }
        Ok(())
    }

    /// Whether the model needs `--tgt` (a multilingual model with language tokens).
    pub fn is_multilingual(&self) -> bool {
        self.tokenizer.has_languages()
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
            // transformers' defaults when do_sample is set: temperature 1, top-k 50.
            sampling: d.do_sample.then(|| SamplingParams {
                temperature: d.temperature.unwrap_or(1.0),
                top_k: Some(d.top_k.unwrap_or(50)).filter(|&k| k > 0),
                top_p: d.top_p,
                ..SamplingParams::default()
            }),
        }
    }

    /// Source ids of `text`, as the Python tokenizer gives them (`</s>` last).
    pub fn source_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.source_ids(text)
    }

    /// Translate one text. A text longer than the model's input limit is split at sentence
    /// ends and translated piece by piece (never cut silently).
    pub fn translate(&self, text: &str, settings: &BeamSettings) -> Result<Vec<Translation>> {
        let mut results = self.translate_batch(&[text], settings, 1)?;
        results.pop().expect("one result per text")
    }

    /// Translate several texts; each gets its own result, in order (an empty or over-long text
    /// fails alone). The sources, pieces of split texts included, are searched `batch` at a
    /// time in lockstep: one decoder step carries the beams of all of them, so the weights are
    /// read once per step for the batch. The outer error is the model's, for the whole call.
    pub fn translate_batch(
        &self,
        texts: &[&str],
        settings: &BeamSettings,
        batch: usize,
    ) -> Result<Vec<Result<Vec<Translation>>>> {
        let plans: Vec<Result<Vec<Vec<u32>>>> =
            texts.iter().map(|text| self.source_pieces(text)).collect();
        let sources: Vec<&[u32]> = plans
            .iter()
            .flat_map(|plan| plan.iter().flatten().map(Vec::as_slice))
            .collect();
        let mut found = Vec::with_capacity(sources.len());
        for chunk in sources.chunks(batch.max(1)) {
            found.extend(self.search(chunk, settings)?);
        }
        let mut found = found.into_iter();
        Ok(plans
            .into_iter()
            .map(|plan| {
                let pieces: Vec<Vec<Translation>> = found.by_ref().take(plan?.len()).collect();
                Self::join(pieces)
            })
            .collect())
    }

    /// The sources a text is translated as: its ids, or those of its sentences when it is over
    /// the model's input limit.
    fn source_pieces(&self, text: &str) -> Result<Vec<Vec<u32>>> {
        if text.trim().is_empty() {
            return Err(Error::invalid("nothing to translate: the text is empty"));
        }
        let ids = self.source_ids(text)?;
        let Some(limit) = self.model.max_source_tokens().filter(|&l| ids.len() > l) else {
            return Ok(vec![ids]);
        };
        let sentences = split_sentences(text);
        if sentences.len() < 2 {
            return Err(Error::invalid(format!(
                "a sentence of {} tokens is longer than the model's input limit of {limit} tokens",
                ids.len()
            )));
        }
        let mut pieces = Vec::with_capacity(sentences.len());
        for sentence in sentences {
            pieces.extend(self.source_pieces(sentence)?);
        }
        Ok(pieces)
    }

    /// A text's translations from those of its pieces: one piece gives all its hypotheses,
    /// several give their best ones joined.
    fn join(mut pieces: Vec<Vec<Translation>>) -> Result<Vec<Translation>> {
        if pieces.len() == 1 {
            return Ok(pieces.pop().expect("one piece"));
        }
        let mut joined = Translation {
            text: String::new(),
            token_ids: Vec::new(),
            score: None,
        };
        for piece in pieces {
            let best = piece.into_iter().next().expect("at least one hypothesis");
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
        Ok(self.search(&[ids], settings)?.pop().expect("one source"))
    }

    /// Beam search over each source, all in one batch.
    fn search(&self, sources: &[&[u32]], settings: &BeamSettings) -> Result<Vec<Vec<Translation>>> {
        let decoder = SourcesDecoder {
            model: &self.model,
            memories: sources
                .iter()
                .map(|ids| self.model.encode(ids))
                .collect::<Result<_>>()?,
        };
        let start = self.model.decoder_start_token_id();
        beam_search_batch(&decoder, sources.len(), start, settings)?
            .into_iter()
            .map(|hypotheses| {
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
