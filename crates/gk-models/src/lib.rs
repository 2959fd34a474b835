//! gk-models: network definitions only (no file I/O beyond a `VarBuilder`).
//!
//! Every module here is trainable end to end: it uses the differentiable layer norm,
//! softmax and attention of [`nn`] and never candle's fused ops that drop gradients.
pub mod bert;
pub mod ckd;
pub mod clip;
pub mod convnet;
pub mod detr;
pub mod encoder;
pub mod fused;
pub mod grounder;
pub mod hivg;
pub mod lora;
pub mod nn;
pub mod qrnet;
pub mod resnet;
pub mod roi_align;
pub mod swin;
