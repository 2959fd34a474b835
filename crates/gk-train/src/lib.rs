//! gk-train: losses, weights and run directories, the trainer, evaluation and prediction.
pub mod error;
pub mod losses;
pub mod run;
pub mod weights;

pub use error::{Result, TrainError};
