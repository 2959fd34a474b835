//! gk-data: records, datasets, transforms, tokenizers and batching.
pub mod batch;
pub mod dataset;
pub mod entities;
pub mod error;
pub mod fuzz;
pub mod image_io;
pub mod phrases;
pub mod pickle;
pub mod proposals;
pub mod pth;
pub mod published;
pub mod record;
pub mod refer;
pub mod referit;
pub mod sha256;
pub mod synth;
pub mod tokenize;
pub mod transforms;

pub use error::{DataError, Result};
