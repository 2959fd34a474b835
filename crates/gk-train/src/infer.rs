//! One inference interface for every run kind: the demo conv model, the CLIP, Swin/QRNet,
//! HiVG and TransVG grounders ([`crate::predict::Predictor`]) and weakly supervised CKD
//! students ([`crate::ckd::CkdPredictor`]). Each kind carries its own preprocessing and its
//! map from the model's frame back to the image's pixels; `predict`, `eval` and `serve` see
//! only [`GroundingModel`] and [`open`], which is the one place that looks at a run's kind.
//!
//! Evaluation over a dataset through it ([`evaluate`]) scores exactly as training-time
//! evaluation does ([`crate::eval::score`]).

use crate::error::{Result, TrainError};
use crate::eval::{EvalReport, GtBoxes};
use crate::run::RunDir;
use gk_box::{Box4, Letterbox};
use gk_data::dataset::Dataset;
use image::RgbImage;
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;

/// One question: an image and an expression.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub image: &'a RgbImage,
    pub expr: &'a str,
}

/// One answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// Pixel `xyxy` in the query's image, clipped to the image.
    pub bbox_xyxy: Box4,
    /// The model's box: normalised `cxcywh` in its padded square frame (unclamped).
    pub model_cxcywh: Box4,
    /// The map between the image's pixels and the model's frame.
    #[serde(skip)]
    pub frame: Letterbox,
    /// The expression was cut to the model's text length.
    pub truncated: bool,
    /// A confidence where the model has one (CKD: the region-phrase score).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// CKD: the phrase of the expression that was grounded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phrase: Option<String>,
}

impl Answer {
    /// An answer from the model's box: mapped back through `frame`, clipped to a `w x h`
    /// image.
    pub fn from_model_box(model_cxcywh: Box4, frame: Letterbox, w: u32, h: u32) -> Self {
        let px = frame.to_image(model_cxcywh);
        let (w, h) = (w as f32, h as f32);
        Self {
            bbox_xyxy: [
                px[0].clamp(0.0, w),
                px[1].clamp(0.0, h),
                px[2].clamp(0.0, w),
                px[3].clamp(0.0, h),
            ],
            model_cxcywh,
            frame,
            truncated: false,
            score: None,
            phrase: None,
        }
    }
}

/// What is being served or evaluated.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The model kind (`transvg`, `clip`, `hivg`, `qrnet`, `conv`, `ckd`, ...).
    pub kind: String,
    pub run: PathBuf,
    /// The weights file read.
    pub weights: PathBuf,
    /// Side of the model's square input, pixels.
    pub image_size: u32,
    /// Text length the model reads, special tokens included.
    pub max_text_len: usize,
    pub parameters: usize,
    /// Set when an answer depends on the other queries of its batch and their order (HiVG's
    /// batch-mixing bridges): what does so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_dependent: Option<String>,
    /// The run's data settings (its val and test sets, image root).
    #[serde(skip)]
    pub data: crate::train::DataConfig,
}

/// A model answering grounding queries.
pub trait GroundingModel: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// One answer per query, in order. A query the model cannot read (an expression with
    /// no tokens) fails the call, naming it.
    fn ground(&self, queries: &[Query<'_>]) -> Result<Vec<Answer>>;

    /// Metrics of a whole set beyond box accuracy that this kind defines (CKD: phrase
    /// recall R@1/5/10), as named JSON entries; none by default.
    fn set_metrics(&self, _ds: &Dataset) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(Default::default())
    }
}

/// The weights a run serves: `best.safetensors`, or `model.safetensors` before the first
/// evaluation.
pub fn serving_weights(run: &RunDir) -> &'static str {
    if run.file("best.safetensors").is_file() {
        "best.safetensors"
    } else {
        "model.safetensors"
    }
}

/// Opens any run for inference (its serving weights, [`serving_weights`]).
pub fn open(run: &RunDir) -> Result<Box<dyn GroundingModel>> {
    let text = std::fs::read_to_string(run.file("config.toml"))
        .map_err(crate::error::io_err(&run.file("config.toml")))?;
    if crate::ckd::is_ckd_config(&text) {
        Ok(Box::new(crate::ckd::CkdPredictor::open(run)?))
    } else {
        Ok(Box::new(crate::predict::Predictor::open(run)?))
    }
}

/// Evaluates `model` on every record of `ds` in batches of `batch` queries (images decoded
/// in parallel); `on_batch` gets the number of records done in each batch.
pub fn evaluate(
    model: &dyn GroundingModel,
    ds: &Dataset,
    gt: GtBoxes,
    batch: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<EvalReport> {
    let mut report = EvalReport::default();
    let indices: Vec<usize> = (0..ds.len()).collect();
    for chunk in indices.chunks(batch.max(1)) {
        let samples = chunk
            .par_iter()
            .map(|&i| ds.get(i))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let queries: Vec<Query> = samples
            .iter()
            .map(|s| Query {
                image: &s.image,
                expr: &s.expr,
            })
            .collect();
        let answers = model.ground(&queries)?;
        if answers.len() != chunk.len() {
            return Err(TrainError::Config(format!(
                "the model gave {} answers to {} queries",
                answers.len(),
                chunk.len()
            )));
        }
        for ((&i, s), a) in chunk.iter().zip(&samples).zip(&answers) {
            let (w, h) = s.image.dimensions();
            crate::eval::score(
                &mut report,
                ds,
                i,
                a.model_cxcywh,
                a.frame,
                Some((w, h)),
                gt,
            )?;
        }
        on_batch(chunk.len());
    }
    report.extra = model.set_metrics(ds)?;
    Ok(report)
}
