//! Text tokenisation over Hugging Face `tokenizer.json` files (BERT WordPiece, CLIP BPE).
//!
//! The file's own truncation and padding settings are ignored: we encode the content
//! tokens, truncate them to `max_len - 2`, wrap them in the begin/end specials
//! (`[CLS] … [SEP]` or `<|startoftext|> … <|endoftext|>`) and pad with `pad_id` to
//! `max_len`, exactly as `tokenizer(text, max_length=max_len, truncation=True,
//! padding="max_length")` does in Python (checked in `tests/tokenizer_parity.rs`).

use crate::error::{DataError, Result};
use std::path::Path;

/// The token ids and attention mask of one expression, both `max_len` long.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// 1 = token, 0 = padding.
    pub mask: Vec<u32>,
    /// Content tokens were dropped to fit `max_len`.
    pub truncated: bool,
}

/// A tokenizer with explicit specials and padding.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

impl TextTokenizer {
    /// Reads a `tokenizer.json`; the specials are found by name (`[CLS]`/`[SEP]`/`[PAD]`
    /// for BERT, `<|startoftext|>`/`<|endoftext|>` for CLIP, which pads with
    /// `<|endoftext|>` as Hugging Face's CLIP tokenizer does).
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| DataError::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        if !path.is_file() {
            return Err(err("file not found".into()));
        }
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Self::from_bytes(&bytes, path)
    }

    /// [`Self::from_file`] on the file's bytes (`path` names it in errors). The bytes must
    /// be JSON before the tokenizers library sees them: on some malformed files it panics
    /// instead of returning an error (found by `gk_data::fuzz`); a panic left anyway is
    /// caught and reported as an error.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let err = |msg: String| DataError::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| err(format!("not JSON: {e}")))?;
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| err("the tokenizers library failed on this file (a panic)".into()))?;
        let inner = parsed.map_err(|e| err(e.to_string()))?;
        Self::from_tokenizer(inner).map_err(|e| err(e.to_string()))
    }

    /// Wraps an in-memory tokenizer (e.g. the benchmark's word-level one).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Result<Self> {
        let id = |t: &str| inner.token_to_id(t);
        let (bos, eos, pad) = if let (Some(b), Some(e)) = (id("[CLS]"), id("[SEP]")) {
            (b, e, id("[PAD]").unwrap_or(0))
        } else if let (Some(b), Some(e)) = (id("<|startoftext|>"), id("<|endoftext|>")) {
            (b, e, e)
        } else {
            return Err(DataError::Encode(
                "no [CLS]/[SEP] or <|startoftext|>/<|endoftext|> tokens in the vocabulary".into(),
            ));
        };
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
        })
    }

    /// Pad with another id (HiVG's `clip.tokenize` pads with 0).
    pub fn with_pad_id(mut self, pad: u32) -> Self {
        self.pad = pad;
        self
    }

    /// [`Self::with_pad_id`] when a pad id is given (a model kind's own; `None`: unchanged).
    pub fn with_pad_override(self, pad: Option<u32>) -> Self {
        match pad {
            Some(p) => self.with_pad_id(p),
            None => self,
        }
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The inner Hugging Face tokenizer (to save it with a run).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes one expression to exactly `max_len` ids (`max_len >= 3`).
    /// An expression with no tokens (empty, whitespace only) is [`DataError::EmptyText`].
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Encoded> {
        if max_len < 3 {
            return Err(DataError::Encode(format!(
                "max_len must be at least 3, got {max_len}"
            )));
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Encode(e.to_string()))?;
        let content = enc.get_ids();
        if content.is_empty() {
            return Err(DataError::EmptyText);
        }
        let keep = content.len().min(max_len - 2);
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos);
        let mut mask = vec![1u32; ids.len()];
        ids.resize(max_len, self.pad);
        mask.resize(max_len, 0);
        Ok(Encoded {
            ids,
            mask,
            truncated: keep < content.len(),
        })
    }
}

/// BERT's WordPiece tokenizer from a `vocab.txt` (one token per line, the line number is
/// the id), as `pytorch_pretrained_bert`'s `BertTokenizer(vocab, do_lower_case)` that
/// TransVG uses: clean control characters, space CJK characters, (lower-case and strip
/// accents,) split on whitespace and punctuation, greedy longest-match WordPiece with `##`
/// continuations, a word over 100 characters or with an unmatched piece is `[UNK]`.
/// `[CLS]`, `[SEP]`, `[PAD]` and `[UNK]` must be in the vocabulary.
pub fn bert_wordpiece(vocab: &Path, lowercase: bool) -> Result<TextTokenizer> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    let err = |msg: String| DataError::Tokenizer {
        path: vocab.to_path_buf(),
        msg,
    };
    if !vocab.is_file() {
        return Err(err("vocabulary file not found".into()));
    }
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| err(format!("not a WordPiece vocab.txt: {e}")))?;
    for special in ["[CLS]", "[SEP]", "[PAD]", "[UNK]"] {
        if tokenizers::Model::token_to_id(&model, special).is_none() {
            return Err(err(format!(
                "not a BERT vocabulary: no {special} line ({} tokens)",
                tokenizers::Model::get_vocab_size(&model)
            )));
        }
    }
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(
        true,
        true,
        Some(lowercase),
        lowercase,
    )))
    .with_pre_tokenizer(Some(BertPreTokenizer));
    TextTokenizer::from_tokenizer(tok).map_err(|e| err(e.to_string()))
}

/// Builds a word-level tokenizer (BERT normaliser and pre-tokeniser, lowercase) whose
/// vocabulary is every word of `texts`, with `[PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3`.
/// Used for models trained from scratch on the embedded benchmark; save it with the run
/// (`inner().save(...)`) so prediction reads the same ids.
pub fn word_level<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<TextTokenizer> {
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let err = |e: tokenizers::Error| DataError::Encode(e.to_string());
    let normalizer = BertNormalizer::new(true, true, Some(true), true);
    let mut words = std::collections::BTreeSet::new();
    for t in texts {
        let mut s = tokenizers::NormalizedString::from(t);
        tokenizers::Normalizer::normalize(&normalizer, &mut s).map_err(err)?;
        let mut pre = PreTokenizedString::from(s.get());
        BertPreTokenizer.pre_tokenize(&mut pre).map_err(err)?;
        for (w, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Char) {
            words.insert(w.to_string());
        }
    }
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    let vocab: std::collections::HashMap<String, u32> = specials
        .iter()
        .map(|s| s.to_string())
        .chain(words)
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .map_err(err)?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(normalizer))
        .with_pre_tokenizer(Some(BertPreTokenizer));
    TextTokenizer::from_tokenizer(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_level_tokenizer_round_trips_through_json() {
        let tok =
            word_level(["The small red circle", "the circle left of the blue star!"]).unwrap();
        let enc = tok.encode("the blue circle, left", 8).unwrap();
        assert_eq!(enc.ids[0], 2);
        assert_eq!(enc.mask, vec![1, 1, 1, 1, 1, 1, 1, 0]); // [CLS] the blue circle , left [SEP]
        let unk = tok.encode("the purple hexagon", 6).unwrap();
        assert_eq!(&unk.ids[2..4], &[1, 1]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        tok.inner().save(&p, false).unwrap();
        let back = TextTokenizer::from_file(&p).unwrap();
        assert_eq!(back.encode("the blue circle, left", 8).unwrap(), enc);
    }

    #[test]
    fn bert_wordpiece_from_vocab_txt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vocab.txt");
        let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\ncafe\nman\n##s\n,\n!\n";
        std::fs::write(&p, vocab).unwrap();
        let tok = bert_wordpiece(&p, true).unwrap();
        let enc = tok.encode("The Café, MANS! xyz", 9).unwrap();
        // [CLS] the cafe , man ##s ! [UNK] [SEP]
        assert_eq!(enc.ids, vec![2, 4, 5, 8, 6, 7, 9, 1, 3]);
        assert!(!enc.truncated);
        std::fs::write(&p, "hello\nworld\n").unwrap();
        let e = bert_wordpiece(&p, true).unwrap_err().to_string();
        assert!(e.contains("no [CLS]") && e.contains("vocab.txt"), "{e}");
    }
}
