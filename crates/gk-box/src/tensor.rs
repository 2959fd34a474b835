//! Differentiable box ops on candle tensors, shape `[N, 4]`.

use crate::{BoxError, Result};
use candle_core::{Tensor, D};

fn check_shape(t: &Tensor) -> Result<()> {
    match t.dims() {
        [_, 4] => Ok(()),
        d => Err(BoxError::Shape(d.to_vec())),
    }
}

fn cols(t: &Tensor) -> Result<[Tensor; 4]> {
    check_shape(t)?;
    Ok([
        t.narrow(1, 0, 1)?,
        t.narrow(1, 1, 1)?,
        t.narrow(1, 2, 1)?,
        t.narrow(1, 3, 1)?,
    ])
}

/// `[N, 4]` cxcywh -> `[N, 4]` xyxy.
pub fn cxcywh_to_xyxy_t(b: &Tensor) -> Result<Tensor> {
    let [cx, cy, w, h] = cols(b)?;
    let (hw, hh) = ((w * 0.5)?, (h * 0.5)?);
    Ok(Tensor::cat(
        &[(&cx - &hw)?, (&cy - &hh)?, (&cx + &hw)?, (&cy + &hh)?],
        1,
    )?)
}

/// Rejects boxes with `x2 < x1`, `y2 < y1` or non-finite values (reads the values back).
fn check_valid(b: &Tensor) -> Result<()> {
    for r in b.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()? {
        crate::check_xyxy([r[0], r[1], r[2], r[3]])?;
    }
    Ok(())
}

/// Paired IoU and GIoU of `a[i]` with `b[i]`, both `[N, 4]` xyxy; returns two `[N]` tensors.
///
/// Differentiable in both inputs. Degenerate boxes give [`BoxError::Degenerate`].
/// Unions and hulls are floored at a tiny epsilon so zero-area pairs give 0, not NaN.
pub fn iou_giou_t(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    check_valid(a)?;
    check_valid(b)?;
    let [ax1, ay1, ax2, ay2] = cols(a)?;
    let [bx1, by1, bx2, by2] = cols(b)?;
    let area_a = ((&ax2 - &ax1)? * (&ay2 - &ay1)?)?;
    let area_b = ((&bx2 - &bx1)? * (&by2 - &by1)?)?;
    let iw = (ax2.minimum(&bx2)? - ax1.maximum(&bx1)?)?.relu()?;
    let ih = (ay2.minimum(&by2)? - ay1.maximum(&by1)?)?.relu()?;
    let inter = (iw * ih)?;
    let union = ((area_a + area_b)? - &inter)?;
    let eps = 1e-12;
    let iou = (&inter / union.clamp(eps, f64::MAX)?)?;
    let hw = (ax2.maximum(&bx2)? - ax1.minimum(&bx1)?)?;
    let hh = (ay2.maximum(&by2)? - ay1.minimum(&by1)?)?;
    let hull = (hw * hh)?.clamp(eps, f64::MAX)?;
    let giou = (&iou - ((&hull - &union)? / &hull)?)?;
    Ok((iou.squeeze(D::Minus1)?, giou.squeeze(D::Minus1)?))
}

/// Pairwise IoU matrix `[N, M]` of xyxy boxes `a: [N, 4]`, `b: [M, 4]` (not checked for
/// degeneracy: used for sampling and metrics on already validated boxes).
pub fn pairwise_iou_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let [ax1, ay1, ax2, ay2] = cols(a)?;
    let [bx1, by1, bx2, by2] = cols(b)?;
    let (bx1, by1, bx2, by2) = (bx1.t()?, by1.t()?, bx2.t()?, by2.t()?); // [1, M]
    let area_a = ((&ax2 - &ax1)? * (&ay2 - &ay1)?)?; // [N, 1]
    let area_b = ((&bx2 - &bx1)? * (&by2 - &by1)?)?; // [1, M]
    let iw = (ax2.broadcast_minimum(&bx2)? - ax1.broadcast_maximum(&bx1)?)?.relu()?;
    let ih = (ay2.broadcast_minimum(&by2)? - ay1.broadcast_maximum(&by1)?)?.relu()?;
    let inter = (iw * ih)?; // [N, M]
    let union = (area_a.broadcast_add(&area_b)? - &inter)?.clamp(1e-12, f64::MAX)?;
    Ok((inter / union)?)
}
