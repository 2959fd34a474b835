//! gk-train: losses, weights and run directories, the trainer, evaluation and prediction.
pub mod batch_predict;
pub mod ckd;
pub mod detector;
pub mod distill;
pub mod draw;
pub mod error;
pub mod eval;
mod font6x11;
pub mod hilora;
pub mod import;
pub mod infer;
pub mod init;
pub mod losses;
pub mod optim;
pub mod predict;
pub mod run;
pub mod teacher;
pub mod train;
pub mod weights;

pub use error::{Result, TrainError};
