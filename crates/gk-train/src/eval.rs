//! Evaluation: Acc@0.5, Acc@0.75 and mIoU, overall and per expression type.
//!
//! IoU is computed twice, as TransVG's `trans_vg_eval_test` does it (prediction clamped
//! to `[0, 1]` in the padded normalised frame against the normalised target) and on the
//! original image pixels (prediction mapped back through the letterbox and clamped to the
//! image). Both are reported; the pixel one is the headline. Ground truth is the stored
//! box, or with [`GtBoxes::TransvgInt`] the integer-truncated box TransVG's loader makes
//! (`gk_data::published::transvg_int_box`), to reproduce published numbers exactly.

use crate::error::Result;
use gk_box::Box4;
use gk_data::batch::{Batch, Loader};
use gk_data::dataset::Dataset;
use gk_models::grounder::Grounder;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Accumulated IoUs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub n: usize,
    pub hits50: usize,
    pub hits75: usize,
    pub iou_sum: f64,
    /// Hits at 0.5 in the padded normalised frame (TransVG's protocol).
    pub hits50_frame: usize,
}

impl Tally {
    pub fn add(&mut self, iou_px: f32, iou_frame: f32) {
        self.n += 1;
        self.hits50 += (iou_px >= 0.5) as usize;
        self.hits75 += (iou_px >= 0.75) as usize;
        self.iou_sum += iou_px as f64;
        self.hits50_frame += (iou_frame >= 0.5) as usize;
    }
    fn ratio(&self, k: usize) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            100.0 * k as f64 / self.n as f64
        }
    }
    pub fn acc50(&self) -> f64 {
        self.ratio(self.hits50)
    }
    pub fn acc75(&self) -> f64 {
        self.ratio(self.hits75)
    }
    pub fn acc50_frame(&self) -> f64 {
        self.ratio(self.hits50_frame)
    }
    pub fn miou(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            100.0 * self.iou_sum / self.n as f64
        }
    }
}

/// One prediction, for pictures and reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub index: usize,
    pub pred_px: Box4,
    pub iou: f32,
}

/// Results on one dataset.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalReport {
    pub all: Tally,
    pub by_type: BTreeMap<String, Tally>,
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
    /// Kind-specific set metrics ([`crate::infer::GroundingModel::set_metrics`]).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl EvalReport {
    /// A JSON summary with percentages.
    pub fn summary(&self) -> serde_json::Value {
        let t = |t: &Tally| serde_json::json!({"n": t.n, "acc50": t.acc50(), "acc75": t.acc75(), "miou": t.miou(), "acc50_frame": t.acc50_frame()});
        let mut v = serde_json::json!({"all": t(&self.all), "by_type": self.by_type.iter().map(|(k, v)| (k.clone(), t(v))).collect::<serde_json::Map<_, _>>()});
        for (k, x) in &self.extra {
            v[k] = x.clone();
        }
        v
    }
}

/// Which ground-truth box a prediction is scored against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GtBoxes {
    /// The record's float box.
    #[default]
    Stored,
    /// TransVG's: the source numbers truncated to integers (`extra.bbox_raw`).
    TransvgInt,
}

/// Scores the prediction `pred` (normalised `cxcywh` in the model's frame `frame`) of
/// record `i` of `ds` into `report`: pixel IoU with the prediction mapped back and clipped
/// to the image (`image_wh`, else the record's size when it has one), and TransVG's frame
/// IoU (prediction clamped to `[0, 1]` of the padded square).
pub fn score(
    report: &mut EvalReport,
    ds: &Dataset,
    i: usize,
    pred: Box4,
    frame: gk_box::Letterbox,
    image_wh: Option<(u32, u32)>,
    gt: GtBoxes,
) -> Result<()> {
    let rec = &ds.records[i];
    let gt_px = match gt {
        GtBoxes::Stored => rec.bbox_xyxy,
        GtBoxes::TransvgInt => gk_data::published::record_int_box(rec),
    };
    let t = frame.to_model(gt_px);
    let mut pred_px = frame.to_image(pred);
    if let Some((w, h)) = image_wh.or(rec.width.zip(rec.height)) {
        pred_px = [
            pred_px[0].clamp(0.0, w as f32),
            pred_px[1].clamp(0.0, h as f32),
            pred_px[2].clamp(0.0, w as f32),
            pred_px[3].clamp(0.0, h as f32),
        ];
    }
    let iou_px = gk_box::iou(pred_px, gt_px)?;
    let iou_frame = gk_box::iou(
        gk_box::clamp(gk_box::cxcywh_to_xyxy(pred), 0.0, 1.0),
        gk_box::cxcywh_to_xyxy(t),
    )?;
    report.all.add(iou_px, iou_frame);
    if let Some(ty) = ds.expr_type(i) {
        report
            .by_type
            .entry(ty.to_string())
            .or_default()
            .add(iou_px, iou_frame);
    }
    report.predictions.push(Prediction {
        index: i,
        pred_px,
        iou: iou_px,
    });
    Ok(())
}

/// Runs the model over every batch of `loader` (an eval loader: no augmentation).
pub fn evaluate(
    model: &Grounder,
    loader: &Loader,
    gt: GtBoxes,
    mut on_batch: impl FnMut(usize),
) -> Result<EvalReport> {
    let mut report = EvalReport::default();
    for batch in loader.epoch(0) {
        let batch: Batch = batch?;
        let out = model.forward(
            &batch.pixels,
            &batch.pixel_mask,
            &batch.ids,
            &batch.text_mask,
            gk_models::nn::Mode::Eval,
        )?;
        let preds = out.pred_box.to_vec2::<f32>()?;
        for (k, &i) in batch.indices.iter().enumerate() {
            let p = [preds[k][0], preds[k][1], preds[k][2], preds[k][3]];
            score(
                &mut report,
                loader.dataset(),
                i,
                p,
                batch.frames[k],
                None,
                gt,
            )?;
        }
        on_batch(batch.len());
    }
    Ok(report)
}
