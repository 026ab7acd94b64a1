//! SentencePiece `.model` files (`source.spm`, `spiece.model`, `sentencepiece.bpe.model`) read
//! directly: the protobuf is decoded here and turned into a `tokenizers` pipeline the way
//! transformers' `SpmConverter` does (legacy mode, i.e. exactly what the `sentencepiece`
//! library produces), so checkpoints that ship no tokenizer.json need no conversion step.

use std::path::Path;

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::{NormalizerWrapper, Precompiled, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

use crate::error::{Error, Result};

/// A piece's role (sentencepiece_model.proto `SentencePiece.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Clone, Debug)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// What the tokenizer needs from a SentencePiece model file.
#[derive(Clone, Debug)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    /// 1 unigram, 2 BPE (TrainerSpec.model_type).
    pub model_type: u64,
    pub unk_id: usize,
    pub byte_fallback: bool,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

/// A minimal protobuf reader: the wire format is varints, fixed 32/64-bit words and
/// length-delimited byte runs, tagged with field numbers.
struct Wire<'a> {
    bytes: &'a [u8],
    at: usize,
}

enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

impl<'a> Wire<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Wire { bytes, at: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at)?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let run = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(run)
    }

    /// The next (field number, value), `Ok(None)` at the end, `Err` on malformed input.
    fn field(&mut self) -> std::result::Result<Option<(u64, Value<'a>)>, ()> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint().ok_or(())?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint().ok_or(())?),
            1 => {
                self.take(8).ok_or(())?;
                Value::Varint(0)
            }
            2 => {
                let n = self.varint().ok_or(())? as usize;
                Value::Bytes(self.take(n).ok_or(())?)
            }
            5 => {
                let b = self.take(4).ok_or(())?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => return Err(()),
        };
        Ok(Some((key >> 3, value)))
    }
}

impl SentencePieceModel {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes).map_err(|message| Error::file(path, message))
    }

    fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let corrupt = |_| "not a SentencePiece model (corrupt or truncated protobuf)".to_string();
        let mut model = SentencePieceModel {
            pieces: Vec::new(),
            model_type: 1,
            unk_id: 0,
            byte_fallback: false,
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut wire = Wire::new(bytes);
        while let Some((field, value)) = wire.field().map_err(corrupt)? {
            match (field, value) {
                (1, Value::Bytes(b)) => model.pieces.push(parse_piece(b).map_err(corrupt)?),
                (2, Value::Bytes(b)) => {
                    let mut spec = Wire::new(b);
                    while let Some((field, value)) = spec.field().map_err(corrupt)? {
                        match (field, value) {
                            (3, Value::Varint(v)) => model.model_type = v,
                            (35, Value::Varint(v)) => model.byte_fallback = v != 0,
                            (40, Value::Varint(v)) => model.unk_id = v as usize,
                            _ => {}
                        }
                    }
                }
                (3, Value::Bytes(b)) => {
                    let mut spec = Wire::new(b);
                    while let Some((field, value)) = spec.field().map_err(corrupt)? {
                        match (field, value) {
                            (2, Value::Bytes(map)) => model.precompiled_charsmap = map.to_vec(),
                            (3, Value::Varint(v)) => model.add_dummy_prefix = v != 0,
                            (4, Value::Varint(v)) => model.remove_extra_whitespaces = v != 0,
                            (5, Value::Varint(v)) => model.escape_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err("not a SentencePiece model (no pieces)".into());
        }
        if model.unk_id >= model.pieces.len() {
            return Err(format!(
                "unk_id {} is outside the {} pieces",
                model.unk_id,
                model.pieces.len()
            ));
        }
        Ok(model)
    }

    /// A `tokenizers` tokenizer producing the same pieces (and piece ids) as `sentencepiece`.
    pub fn tokenizer(&self, path: &Path) -> Result<tokenizers::Tokenizer> {
        let mut tokenizer = match self.model_type {
            1 => {
                let vocab = self
                    .pieces
                    .iter()
                    .map(|p| (p.piece.clone(), f64::from(p.score)))
                    .collect();
                let unigram = Unigram::from(vocab, Some(self.unk_id), self.byte_fallback)
                    .map_err(|e| Error::file(path, format!("SentencePiece vocabulary: {e}")))?;
                tokenizers::Tokenizer::new(unigram)
            }
            2 => tokenizers::Tokenizer::new(self.bpe(path)?),
            other => {
                return Err(Error::file(
                    path,
                    format!(
                        "SentencePiece model type {other} is not supported (unigram and BPE are)"
                    ),
                ))
            }
        };
        let replace = |pattern: tokenizers::normalizers::replace::ReplacePattern, to: &str| {
            Replace::new(pattern, to)
                .map(NormalizerWrapper::Replace)
                .map_err(|e| Error::Tokenizer(e.to_string()))
        };
        use tokenizers::normalizers::replace::ReplacePattern::{Regex, String as Literal};
        // SentencePiece's order: character map, whitespace clean-up, escaping, dummy prefix.
        let mut normalizers = Vec::new();
        if !self.precompiled_charsmap.is_empty() {
            let map = Precompiled::from(&self.precompiled_charsmap)
                .map_err(|e| Error::file(path, format!("precompiled_charsmap: {e}")))?;
            normalizers.push(NormalizerWrapper::Precompiled(map));
        }
        if self.remove_extra_whitespaces {
            normalizers.push(replace(Regex(r"\A +| +\z".into()), "")?);
            normalizers.push(replace(Regex(" {2,}".into()), " ")?);
        }
        if self.escape_whitespaces {
            normalizers.push(replace(Literal(" ".into()), "▁")?);
        }
        if self.add_dummy_prefix {
            // Metaspace skips the dummy prefix when the text already starts with "▁"; SentencePiece does not.
            normalizers.push(replace(Regex(r"\A▁".into()), "▁▁")?);
        }
        tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
        if self.add_dummy_prefix {
            tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, false)));
        }
        Ok(tokenizer)
    }

    /// A BPE model whose merges are ranked by the merged piece's score, as transformers'
    /// converter builds them (only normal pieces merge).
    fn bpe(&self, path: &Path) -> Result<tokenizers::models::bpe::BPE> {
        let normal: std::collections::HashMap<&str, (f32, usize)> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == PieceType::Normal)
            .map(|(i, p)| (p.piece.as_str(), (p.score, i)))
            .collect();
        let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
        for (&token, &(score, id)) in &normal {
            for (at, _) in token.char_indices().skip(1) {
                let (left, right) = token.split_at(at);
                if normal.contains_key(left) && normal.contains_key(right) {
                    ranked.push((-score, id, left, right));
                }
            }
        }
        ranked.sort_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(b.2))
                .then(a.3.cmp(b.3))
        });
        let merges = ranked
            .into_iter()
            .map(|(_, _, l, r)| (l.to_string(), r.to_string()))
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.piece.clone(), i as u32))
            .collect();
        tokenizers::models::bpe::BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(self.pieces[self.unk_id].piece.clone())
            .fuse_unk(true)
            .byte_fallback(self.byte_fallback)
            .build()
            .map_err(|e| Error::file(path, format!("SentencePiece BPE vocabulary: {e}")))
    }

    /// Text of `pieces` as `sentencepiece`'s `decode_pieces` gives it.
    pub fn decode_pieces<S: AsRef<str>>(&self, pieces: &[S]) -> String {
        let mut bytes = Vec::new();
        for piece in pieces {
            let piece = piece.as_ref();
            let byte = piece
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .filter(|_| self.byte_fallback)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match byte {
                Some(b) => bytes.push(b),
                None => bytes.extend_from_slice(piece.replace('▁', " ").as_bytes()),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match (self.add_dummy_prefix, text.strip_prefix(' ')) {
            (true, Some(rest)) => rest.to_string(),
            _ => text,
        }
    }
}

fn parse_piece(bytes: &[u8]) -> std::result::Result<Piece, ()> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut wire = Wire::new(bytes);
    while let Some((field, value)) = wire.field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => piece.piece = String::from_utf8(b.to_vec()).map_err(|_| ())?,
            (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Value::Varint(v)) => {
                piece.kind = match v {
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    _ => PieceType::Normal,
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

/// Tokenizers of the opus-mt / M2M100 kind: SentencePiece models split the text into pieces,
/// and a separate `vocab.json` numbers the pieces (the model's ids are not the SentencePiece
/// ids). Source and target may have their own SentencePiece models.
pub struct PieceVocabTokenizer {
    source: tokenizers::Tokenizer,
    /// The source model's unknown-piece id.
    source_unk: u32,
    target: SentencePieceModel,
    vocab: std::collections::HashMap<String, u32>,
    tokens: Vec<String>,
    pub unk_id: u32,
    pub eos_id: u32,
    pub pad_id: Option<u32>,
    /// M2M100's language tokens (`__fr__`), numbered after the vocabulary.
    languages: std::collections::HashMap<String, u32>,
    /// Token put before the source pieces (M2M100's source language).
    pub source_prefix: Option<u32>,
}

impl PieceVocabTokenizer {
    /// `source_spm` and `target_spm` (may be the same file) with `vocab.json`.
    pub fn load(source_spm: &Path, target_spm: &Path, vocab_path: &Path) -> Result<Self> {
        for path in [source_spm, target_spm, vocab_path] {
            if !path.is_file() {
                return Err(Error::file(path, "missing tokenizer file"));
            }
        }
        let source_model = SentencePieceModel::read(source_spm)?;
        let source = source_model.tokenizer(source_spm)?;
        let target = SentencePieceModel::read(target_spm)?;
        let text = std::fs::read_to_string(vocab_path).map_err(|e| Error::io(vocab_path, e))?;
        let vocab: std::collections::HashMap<String, u32> = serde_json::from_str(&text)
            .map_err(|e| Error::file(vocab_path, format!("invalid vocabulary JSON: {e}")))?;
        let size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let mut tokens = vec![String::new(); size];
        for (token, &id) in &vocab {
            tokens[id as usize] = token.clone();
        }
        let id = |token: &str| vocab.get(token).copied();
        let unk_id =
            id("<unk>").ok_or_else(|| Error::file(vocab_path, "the vocabulary has no `<unk>`"))?;
        let eos_id =
            id("</s>").ok_or_else(|| Error::file(vocab_path, "the vocabulary has no `</s>`"))?;
        let pad_id = id("<pad>");
        Ok(PieceVocabTokenizer {
            source,
            source_unk: source_model.unk_id as u32,
            target,
            vocab,
            tokens,
            unk_id,
            eos_id,
            pad_id,
            languages: std::collections::HashMap::new(),
            source_prefix: None,
        })
    }

    /// Add language tokens numbered after the vocabulary, in `codes` order (M2M100).
    pub fn with_languages(mut self, tokens: &[String]) -> Self {
        for token in tokens {
            let id = self.tokens.len() as u32;
            self.languages.insert(token.clone(), id);
            self.tokens.push(token.clone());
        }
        self
    }

    /// The id of a language token given as `fr`, `__fr__` or the token itself.
    pub fn language_id(&self, code: &str) -> Result<u32> {
        for candidate in [code.to_string(), format!("__{code}__")] {
            if let Some(&id) = self.languages.get(&candidate) {
                return Ok(id);
            }
        }
        let mut known: Vec<&str> = self.languages.keys().map(|t| t.trim_matches('_')).collect();
        known.sort_unstable();
        Err(Error::invalid(format!(
            "unknown language `{code}`; this model knows: {}",
            known.join(", ")
        )))
    }

    pub fn has_languages(&self) -> bool {
        !self.languages.is_empty()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab
            .get(token)
            .or_else(|| self.languages.get(token))
            .copied()
    }

    /// Source pieces of `text` (what `tokenizer.tokenize` shows in Python). A leading target
    /// language code `>>xx<<` of multilingual opus-mt models is one token of its own.
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        let (code, rest) = match text.strip_prefix(">>").and_then(|r| r.split_once("<<")) {
            Some((code, rest)) if self.vocab.contains_key(&format!(">>{code}<<")) => {
                (Some(format!(">>{code}<<")), rest)
            }
            _ => (None, text),
        };
        let encoding = self
            .source
            .encode(rest, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        // SentencePiece shows an unknown piece as the text it covers, not as `<unk>`.
        let unk = self.source.id_to_token(self.source_unk);
        let pieces = encoding
            .get_tokens()
            .iter()
            .zip(encoding.get_offsets())
            .map(
                |(token, &(start, end))| match (&unk, rest.get(start..end)) {
                    (Some(u), Some(surface)) if token == u && !surface.is_empty() => {
                        surface.to_string()
                    }
                    _ => token.clone(),
                },
            );
        Ok(code.into_iter().chain(pieces).collect())
    }

    /// Model ids of `pieces` (after the source-language token, if set), unknown pieces as
    /// `<unk>`, then `</s>`.
    pub fn ids(&self, pieces: &[String]) -> Vec<u32> {
        self.source_prefix
            .into_iter()
            .chain(
                pieces
                    .iter()
                    .map(|p| self.vocab.get(p).copied().unwrap_or(self.unk_id)),
            )
            .chain(std::iter::once(self.eos_id))
            .collect()
    }

    /// Text of generated ids, special tokens (`</s>`, `<pad>`, `<unk>`) left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bos = self.vocab.get("<s>").copied();
        let pieces: Vec<&str> = ids
            .iter()
            .filter(|&&id| {
                id != self.eos_id && id != self.unk_id && Some(id) != self.pad_id && Some(id) != bos
            })
            .filter(|id| !self.languages.values().any(|l| l == *id))
            .filter_map(|&id| self.tokens.get(id as usize).map(String::as_str))
            .collect();
        self.target.decode_pieces(&pieces).trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_or_foreign_files_are_refused() {
        assert!(SentencePieceModel::parse(b"").is_err());
        assert!(SentencePieceModel::parse(b"\x0a\x05ab").is_err());
        assert!(SentencePieceModel::parse(b"{\"model\": 1}").is_err());
    }
}
