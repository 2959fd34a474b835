//! The typed errors of gk-data: each names the file, line or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable image: {source}")]
    Image {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("{path}:{line}: {msg}")]
    Annotation {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A whole-file problem in a published split or annotation file (container, pickle).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// One bad row of a published split or annotation file (0-based, as Python indexes it).
    #[error("{path}: row {row}: {msg}")]
    Row {
        path: PathBuf,
        row: usize,
        msg: String,
    },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("empty expression: nothing to ground")]
    EmptyText,
    #[error("tokenizer: {0}")]
    Encode(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DataError>;
