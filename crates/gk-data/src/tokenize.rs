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
        f.debug_struct("TextTokenizer").field("bos", &self.bos).field("eos", &self.eos).field("pad", &self.pad).finish()
    }
}

impl TextTokenizer {
    /// Reads a `tokenizer.json`; the specials are found by name (`[CLS]`/`[SEP]`/`[PAD]`
    /// for BERT, `<|startoftext|>`/`<|endoftext|>` for CLIP, which pads with
    /// `<|endoftext|>` as Hugging Face's CLIP tokenizer does).
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| DataError::Tokenizer { path: path.to_path_buf(), msg };
        if !path.is_file() {
            return Err(err("file not found".into()));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
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
            return Err(DataError::Encode("no [CLS]/[SEP] or <|startoftext|>/<|endoftext|> tokens in the vocabulary".into()));
        };
        Ok(Self { inner, bos, eos, pad })
    }

    /// Pad with another id (HiVG's `clip.tokenize` pads with 0).
    pub fn with_pad_id(mut self, pad: u32) -> Self {
        self.pad = pad;
        self
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
            return Err(DataError::Encode(format!("max_len must be at least 3, got {max_len}")));
        }
        let enc = self.inner.encode(text, false).map_err(|e| DataError::Encode(e.to_string()))?;
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
        Ok(Encoded { ids, mask, truncated: keep < content.len() })
    }
}
