//! Losses as named parts with weights from config; the criterion returns all parts.
//!
//! Box losses follow TransVG `utils/loss_utils.py::trans_vg_loss`
//! (<https://github.com/djiajunustc/TransVG/blob/main/utils/loss_utils.py>):
//! `l1 = Σ|b̂ - b| / B` over the 4 cxcywh coordinates and
//! `giou = Σ(1 - GIoU(xyxy(b̂), xyxy(b))) / B`. Golden values from torch in `tests/golden.rs`.

use crate::error::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Weights of the box losses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxLossConfig {
    pub l1: f64,
    pub giou: f64,
    /// Cross-entropy of the dense head's cell scores (`BoxHead::Dense` only).
    #[serde(default = "one")]
    pub cell: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for BoxLossConfig {
    /// TransVG's weights (1, 1). HiVG uses (2, 2).
    fn default() -> Self {
        Self {
            l1: 1.0,
            giou: 1.0,
            cell: 1.0,
        }
    }
}

/// Named, unweighted loss parts and their weighted total.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `(name, weight, value)`; `value` is an unweighted scalar tensor.
    pub parts: Vec<(String, f64, Tensor)>,
}

impl LossParts {
    pub fn new() -> Self {
        Self { parts: Vec::new() }
    }

    pub fn push(&mut self, name: &str, weight: f64, value: Tensor) {
        self.parts.push((name.to_string(), weight, value));
    }

    /// `Σ weight · value` (parts with weight 0 are left out of the graph).
    pub fn total(&self) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (_, w, v) in self.parts.iter().filter(|p| p.1 != 0.0) {
            let t = (v * *w)?;
            total = Some(match total {
                Some(acc) => (acc + t)?,
                None => t,
            });
        }
        total.ok_or_else(|| crate::error::TrainError::Config("every loss weight is 0".into()))
    }

    /// Scalar values by name, for logs.
    pub fn values(&self) -> Result<Vec<(String, f32)>> {
        self.parts
            .iter()
            .map(|(n, _, v)| {
                Ok((
                    n.clone(),
                    v.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?,
                ))
            })
            .collect()
    }
}

impl Default for LossParts {
    fn default() -> Self {
        Self::new()
    }
}

/// L1 and GIoU between predicted and target normalised cxcywh boxes `[B, 4]`.
pub fn box_losses(
    pred: &Tensor,
    target: &Tensor,
    cfg: &BoxLossConfig,
    parts: &mut LossParts,
) -> Result<()> {
    let b = pred.dim(0)? as f64;
    // |d| as d * sign(d) with the sign held constant: gradient sign(d), 0 at d = 0 as in torch.
    let d = (pred - target)?;
    let l1 = ((&d * d.sign()?.detach())?.sum_all()? / b)?;
    let (_, giou) = gk_box::iou_giou_t(
        &gk_box::cxcywh_to_xyxy_t(pred)?,
        &gk_box::cxcywh_to_xyxy_t(target)?,
    )?;
    let giou = (giou.affine(-1.0, 1.0)?.sum_all()? / b)?;
    parts.push("l1", cfg.l1, l1);
    parts.push("giou", cfg.giou, giou);
    Ok(())
}

/// The dense head's losses: cross-entropy of the cell scores `[B, N]` (row-major
/// `gh x gw` cells) against the cell that holds each target centre, and L1 + GIoU on
/// that cell's box (`boxes: [B, N, 4]`), as a one-stage detector trains its positive.
pub fn dense_losses(
    scores: &Tensor,
    boxes: &Tensor,
    grid: (usize, usize),
    target: &Tensor,
    cfg: &BoxLossConfig,
    parts: &mut LossParts,
) -> Result<()> {
    let (b, n) = scores.dims2()?;
    let cells = target_cells(target, grid)?;
    let mut onehot = vec![0f32; b * n];
    for (i, &c) in cells.iter().enumerate() {
        onehot[i * n + c as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b, n), scores.device())?;
    let logp = candle_nn::ops::log_softmax(scores, candle_core::D::Minus1)?;
    let ce = ((logp * onehot)?.sum_all()? / -(b as f64))?;
    let idx = Tensor::from_vec(cells, (b, 1, 1), scores.device())?
        .broadcast_as((b, 1, 4))?
        .contiguous()?;
    let picked = boxes.gather(&idx, 1)?.squeeze(1)?; // [B, 4]
    parts.push("cell", cfg.cell, ce);
    box_losses(&picked, target, cfg, parts)
}

/// Row-major index of the grid cell holding each target centre (`target: [B, 4]` cxcywh).
pub fn target_cells(target: &Tensor, (gh, gw): (usize, usize)) -> Result<Vec<u32>> {
    Ok(target
        .to_vec2::<f32>()?
        .iter()
        .map(|t| {
            let col = ((t[0] * gw as f32).floor().max(0.0) as usize).min(gw - 1);
            let row = ((t[1] * gh as f32).floor().max(0.0) as usize).min(gh - 1);
            (row * gw + col) as u32
        })
        .collect())
}
