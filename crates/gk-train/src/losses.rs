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
    /// HiVG's auxiliary losses (HiVG grounders only; HiVG: 20, 2, 20, 2; 0 = off): focal and
    /// dice of the text-token similarity of every patch against the box mask on the patch
    /// grid, and of the mask head against the box mask at its resolution.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub token_focal: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub token_dice: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mask_focal: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mask_dice: f64,
    /// HiVG's CLIP contrastive term (HiVG grounders with `contrastive_dim`; HiVG: 1; 0 =
    /// off): symmetric InfoNCE of CLIP's image and text embeddings at CLIP's logit scale.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub contrastive: f64,
    /// Grounders with a `word_head` (0 = off; the demo: 10): [`word_bag_loss`], the
    /// expression's words predicted from its target cell.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub words: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
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
            token_focal: 0.0,
            token_dice: 0.0,
            mask_focal: 0.0,
            mask_dice: 0.0,
            contrastive: 0.0,
            words: 0.0,
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

/// Sigmoid focal loss (DETR's / torchvision's) of logits `x` against 0/1 targets `t`, both
/// `[B, N]`: `α_t (1 - p_t)^γ · BCE(x, t)`, mean over N, summed over B, divided by B.
pub fn sigmoid_focal(x: &Tensor, t: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let b = x.dim(0)?;
    // BCE with logits, stable: max(x, 0) - x t + log(1 + e^{-|x|})
    let ce = ((x.relu()? - (x * t)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let p = gk_models::nn::sigmoid(x)?;
    let one_minus_t = t.affine(-1.0, 1.0)?;
    let p_t = ((&p * t)? + (p.affine(-1.0, 1.0)? * &one_minus_t)?)?;
    let modulating = p_t.affine(-1.0, 1.0)?.powf(gamma)?;
    let alpha_t = (t.affine(alpha, 0.0)? + one_minus_t.affine(1.0 - alpha, 0.0)?)?;
    let loss = (ce * modulating)?.mul(&alpha_t)?;
    Ok((loss.mean(1)?.sum_all()? / b as f64)?)
}

/// DETR's dice loss of `σ(x)` against `t` (`[B, N]`): mean over B of
/// `1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)`.
pub fn dice(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let p = gk_models::nn::sigmoid(x)?;
    let num = ((&p * t)?.sum(1)? * 2.0)?.affine(1.0, 1.0)?;
    let den = (p.sum(1)? + t.sum(1)?)?.affine(1.0, 1.0)?;
    Ok((num / den)?.affine(-1.0, 1.0)?.mean_all()?)
}

/// HiVG's auxiliary losses (those with a non-zero weight): `token_focal` and `token_dice` of
/// the patch-text similarities against the box mask on the patch grid, `mask_focal` and
/// `mask_dice` of the mask logits against the box mask at the mask's resolution (HiVG
/// upsamples the logits to the image instead; ours keeps candle's differentiable ops).
pub fn hivg_aux_losses(
    aux: &gk_models::hivg::HivgAux,
    grid: (usize, usize),
    target: &Tensor,
    cfg: &BoxLossConfig,
    parts: &mut LossParts,
) -> Result<()> {
    if cfg.token_focal > 0.0 || cfg.token_dice > 0.0 {
        let m = box_masks(target, grid)?;
        parts.push(
            "token_focal",
            cfg.token_focal,
            sigmoid_focal(&aux.token_sim, &m, 0.25, 2.0)?,
        );
        parts.push("token_dice", cfg.token_dice, dice(&aux.token_sim, &m)?);
    }
    if cfg.mask_focal > 0.0 || cfg.mask_dice > 0.0 {
        let m = box_masks(target, aux.seg_grid)?;
        parts.push(
            "mask_focal",
            cfg.mask_focal,
            sigmoid_focal(&aux.seg, &m, 0.25, 2.0)?,
        );
        parts.push("mask_dice", cfg.mask_dice, dice(&aux.seg, &m)?);
    }
    Ok(())
}

/// The box masks `[B, gh * gw]` of `target: [B, 4]` (normalised cxcywh) on a grid: 1 where a
/// cell's centre lies inside the box (nearest downsampling of the box rectangle).
pub fn box_masks(target: &Tensor, (gh, gw): (usize, usize)) -> Result<Tensor> {
    let t = target.to_vec2::<f32>()?;
    let mut m = vec![0f32; t.len() * gh * gw];
    for (i, b) in t.iter().enumerate() {
        let [x1, y1, x2, y2] = gk_box::cxcywh_to_xyxy([b[0], b[1], b[2], b[3]]);
        for r in 0..gh {
            let cy = (r as f32 + 0.5) / gh as f32;
            for c in 0..gw {
                let cx = (c as f32 + 0.5) / gw as f32;
                if cx >= x1 && cx <= x2 && cy >= y1 && cy <= y2 {
                    m[(i * gh + r) * gw + c] = 1.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (t.len(), gh * gw), target.device())?)
}

/// Row-major index of the grid cell holding each target centre (`target: [B, 4]` cxcywh).
/// MAttNet-style attribute supervision taken from the expression itself: the unfused
/// token of the cell holding each target centre predicts which vocabulary words its
/// expression uses. `logits [B, N, V]` (the grounder's `word_logits`), `ids [B, L]` (u32);
/// ids below [`FIRST_WORD_ID`] (the word-level tokenizer's `[PAD] [UNK] [CLS] [SEP]`) are
/// not words. Binary cross-entropy with logits against the multi-hot bag, averaged over the
/// words of the vocabulary and the batch.
pub fn word_bag_loss(
    logits: &Tensor,
    grid: (usize, usize),
    target: &Tensor,
    ids: &Tensor,
) -> Result<Tensor> {
    let (b, _, v) = logits.dims3()?;
    let cells = target_cells(target, grid)?;
    let mut bag = vec![0f32; b * v];
    for (i, row) in ids
        .to_dtype(candle_core::DType::U32)?
        .to_vec2::<u32>()?
        .iter()
        .enumerate()
    {
        for &id in row
            .iter()
            .filter(|&&id| id >= FIRST_WORD_ID && (id as usize) < v)
        {
            bag[i * v + id as usize] = 1.0;
        }
    }
    let first = FIRST_WORD_ID as usize;
    let bag = Tensor::from_vec(bag, (b, v), logits.device())?.narrow(1, first, v - first)?;
    let idx = Tensor::from_vec(cells, (b, 1, 1), logits.device())?
        .broadcast_as((b, 1, v))?
        .contiguous()?;
    let x = logits
        .gather(&idx, 1)?
        .squeeze(1)?
        .narrow(1, first, v - first)?; // [B, V']
                                       // stable BCE with logits: max(x, 0) - x t + log(1 + e^{-|x|})
    let bce = ((x.relu()? - (&x * &bag)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(bce.mean_all()?)
}

/// The first id of a word in the word-level tokenizer (`[PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3`).
pub const FIRST_WORD_ID: u32 = 4;

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The word loss against BCE written out per entry, and its gradient: only the target
    /// cells' logits of real words move.
    #[test]
    fn word_bag_loss_is_bce_of_the_target_cells_bag() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, v) = (2, 4, 7); // a 2x2 grid, ids 4..7 are words
        let vals: Vec<f32> = (0..b * n * v)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let logits = Var::from_vec(vals.clone(), (b, n, v), &dev)?;
        // centres in cell 3 (bottom right) and cell 0 (top left)
        let target = Tensor::new(&[[0.8f32, 0.7, 0.2, 0.2], [0.1, 0.2, 0.1, 0.1]], &dev)?;
        // [CLS] w4 w6 w4 [SEP] [PAD] / [CLS] w5 [UNK] [SEP] [PAD] [PAD]
        let ids = Tensor::new(&[[2u32, 4, 6, 4, 3, 0], [2, 5, 1, 3, 0, 0]], &dev)?;
        let loss = word_bag_loss(logits.as_tensor(), (2, 2), &target, &ids)?;
        let bags = [[1f32, 0.0, 1.0], [0.0, 1.0, 0.0]];
        let cells = [3usize, 0];
        let mut want = 0f32;
        for i in 0..b {
            for (k, t) in bags[i].iter().enumerate() {
                let x = vals[(i * n + cells[i]) * v + 4 + k];
                let p = 1.0 / (1.0 + (-x).exp());
                want -= t * p.ln() + (1.0 - t) * (1.0 - p).ln();
            }
        }
        want /= (b * 3) as f32;
        let got = loss.to_scalar::<f32>()?;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let g = loss.backward()?.get(&logits).unwrap().to_vec3::<f32>()?;
        for (i, gi) in g.iter().enumerate() {
            for (c, gc) in gi.iter().enumerate() {
                for (k, &x) in gc.iter().enumerate() {
                    let moves = c == cells[i] && k >= 4;
                    assert_eq!(x != 0.0, moves, "sample {i} cell {c} id {k}");
                }
            }
        }
        Ok(())
    }
}
