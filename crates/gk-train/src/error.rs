//! Typed errors of gk-train.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: weights do not match the model:\n{report}")]
    Weights { path: PathBuf, report: String },
    #[error("non-finite loss at step {step}: {parts}")]
    NonFinite { step: usize, parts: String },
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Box(#[from] gk_box::BoxError),
    #[error(transparent)]
    Data(#[from] gk_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}
