//! Rebuild a `tokenizers` tokenizer from GGUF metadata, the way `transformers` does when it
//! loads a GGUF file (integrations/gguf), so token ids match it.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::Tokenizer;
use crate::error::{Error, Result};
use crate::weights::GgufFile;

/// llama.cpp's token types.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex a GGUF `tokenizer.ggml.pre` names; `None` means GPT-2's own ByteLevel regex.
fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

pub fn tokenizer_from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    let model = gguf.get_str("tokenizer.ggml.model")?.to_string();
    let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
    let types = gguf
        .opt("tokenizer.ggml.token_type", GgufFile::get_i32_array)?
        .unwrap_or_default();
    let byte_chars = byte_alphabet();
    let alphabet: std::collections::HashSet<char> = byte_chars.values().copied().collect();
    let (mut inner, add_bos_default) = match model.as_str() {
        "gpt2" => (
            byte_level_bpe(gguf, &tokens, &byte_chars, &alphabet)?,
            false,
        ),
        // transformers (like llama.cpp) adds BOS to a SentencePiece vocabulary that does not say otherwise.
        "llama" => (sentencepiece_bpe(gguf, &tokens)?, true),
        other => {
            return Err(Error::Tokenizer(format!(
                "{}: GGUF tokenizer model `{other}` is not supported (supported: gpt2, llama)",
                gguf.path().display()
            )))
        }
    };
    // In a byte-level vocabulary a control token spelled outside the byte alphabet is a
    // converter mislabel; transformers skips it so the vocabulary keeps the model's size.
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, ty)| {
            **ty == TOKEN_TYPE_CONTROL
                && (model != "gpt2" || t.chars().all(|c| alphabet.contains(&c)))
        })
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    inner.add_special_tokens(&control);
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, ty)| **ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    inner.add_tokens(&user);

    let token_at = |key: &str| -> Result<Option<String>> {
        Ok(gguf
            .opt(key, GgufFile::get_u32)?
            .and_then(|id| tokens.get(id as usize).cloned()))
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;
    let add_bos = gguf
        .opt("tokenizer.ggml.add_bos_token", GgufFile::get_bool)?
        .unwrap_or(add_bos_default);
    let add_eos = gguf
        .opt("tokenizer.ggml.add_eos_token", GgufFile::get_bool)?
        .unwrap_or(false);
    if add_bos || add_eos {
        let template = special_token_template(
            &inner,
            bos.as_deref().filter(|_| add_bos),
            eos.as_deref().filter(|_| add_eos),
        )?;
        inner.with_post_processor(Some(template));
    }
    let mut extra_eos = Vec::new();
    if let Some(eot) = gguf.opt("tokenizer.ggml.eot_token_id", GgufFile::get_u32)? {
        extra_eos.push(eot);
    }
    let template = gguf.opt("tokenizer.chat_template", GgufFile::get_string)?;
    Tokenizer::new(inner, bos, eos, &extra_eos, template)
}

/// GPT-2 style byte-level BPE: tokens and merges as the file spells them.
fn byte_level_bpe(
    gguf: &GgufFile,
    tokens: &[String],
    byte_chars: &HashMap<u8, char>,
    alphabet: &std::collections::HashSet<char>,
) -> Result<tokenizers::Tokenizer> {
    let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
    let pre = gguf
        .opt("tokenizer.ggml.pre", GgufFile::get_string)?
        .unwrap_or_default();
    // Tokens already spelled in the byte alphabet stay; others are re-spelled byte by byte.
    let spell = |token: &str| -> String {
        if token.chars().all(|c| alphabet.contains(&c)) {
            token.to_string()
        } else {
            token.bytes().map(|b| byte_chars[&b]).collect()
        }
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (spell(t), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("malformed merge `{m}` in GGUF")))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building BPE from GGUF: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    match split_regex(&pre) {
        Some(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                split.into(),
                ByteLevel::default()
                    .add_prefix_space(false)
                    .use_regex(false)
                    .into(),
            ])));
        }
        None => {
            inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        }
    }
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// A SentencePiece vocabulary (tokens + scores, no merges) as the BPE `transformers`' LlamaTokenizer
/// builds from it: merges recovered from the scores, byte fallback, `▁` for spaces.
fn sentencepiece_bpe(gguf: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let scores = gguf.get_f32_array("tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        return Err(Error::Tokenizer(format!(
            "{}: {} tokens but {} scores",
            gguf.path().display(),
            tokens.len(),
            scores.len()
        )));
    }
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let merges = match gguf.opt("tokenizer.ggml.merges", GgufFile::get_str_array)? {
        Some(listed) => listed
            .iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect(),
        None => merges_from_scores(tokens, &scores, &vocab),
    };
    let owned: tokenizers::models::bpe::Vocab =
        vocab.iter().map(|(t, i)| (t.to_string(), *i)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(owned, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building BPE from GGUF: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let space = Replace::new("▁", " ").map_err(|e| Error::Tokenizer(e.to_string()))?;
    inner.with_decoder(Some(DecoderSequence::new(vec![
        space.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(inner)
}

/// Every split of every token into two vocabulary pieces, best score first (transformers'
/// `generate_merges`: ties keep vocabulary order, then shorter left and right pieces first).
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &HashMap<&str, u32>,
) -> Vec<(String, String)> {
    // Later duplicates of a token win, as in a Python dict built from the same pairs.
    let mut last_score: HashMap<&str, (usize, f32)> = HashMap::new();
    for (i, (t, s)) in tokens.iter().zip(scores).enumerate() {
        let first = last_score.get(t.as_str()).map_or(i, |(at, _)| *at);
        last_score.insert(t, (first, *s));
    }
    let mut ordered: Vec<(&str, usize, f32)> = last_score
        .iter()
        .map(|(t, (at, s))| (*t, *at, *s))
        .collect();
    ordered.sort_by_key(|(_, at, _)| *at);
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (token, _, score) in ordered {
        let mut local: Vec<(&str, &str, f32)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| (&token[..at], &token[at..]))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    // Python's stable sort with reverse=True keeps equal keys in their original order.
    merges.sort_by(|a, b| {
        let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

fn special_token_template(
    inner: &tokenizers::Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<TemplateProcessing> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some(bos) = bos {
        single.push(bos.to_string());
        pair.push(bos.to_string());
        specials.push((bos.to_string(), inner.token_to_id(bos).unwrap_or_default()));
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if let Some(eos) = eos {
        single.push(eos.to_string());
        specials.push((eos.to_string(), inner.token_to_id(eos).unwrap_or_default()));
    }
    pair.push("$B:1".to_string());
    TemplateProcessing::builder()
        .try_single(single.join(" "))
        .and_then(|b| b.try_pair(pair.join(" ")))
        .map_err(|e| Error::Tokenizer(format!("special-token template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| Error::Tokenizer(format!("special-token template: {e}")))
}

/// GPT-2's byte -> printable-character table.
fn byte_alphabet() -> HashMap<u8, char> {
    let mut bytes: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("valid code point")))
        .collect()
}
