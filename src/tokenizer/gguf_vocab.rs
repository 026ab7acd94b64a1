//! Rebuild a `tokenizers` tokenizer from GGUF metadata, the way `transformers` does when it
//! loads a GGUF file (integrations/gguf), so token ids match it.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
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
    if model != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "{}: GGUF tokenizer model `{model}` is not supported yet (supported: gpt2 byte-level BPE)",
            gguf.path().display()
        )));
    }
    let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
    let types = gguf
        .opt("tokenizer.ggml.token_type", GgufFile::get_i32_array)?
        .unwrap_or_default();
    let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
    let pre = gguf
        .opt("tokenizer.ggml.pre", GgufFile::get_string)?
        .unwrap_or_default();

    let byte_chars = byte_alphabet();
    let alphabet: std::collections::HashSet<char> = byte_chars.values().copied().collect();
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

    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, ty)| **ty == TOKEN_TYPE_CONTROL && t.chars().all(|c| alphabet.contains(&c)))
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
        .unwrap_or(false);
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
