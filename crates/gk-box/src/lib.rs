//! gk-box: the one box convention of groundkit, and box overlap measures.
//!
//! * Model side: **normalised `cxcywh`** in the padded square frame the model sees
//!   (centre x, centre y, width, height, all in `[0, 1]` of the padded side).
//! * Image side: **absolute pixel `xyxy`** in the original image (`x2 = x + w`, no `+1`).
//!
//! [`Letterbox`] maps between the two. IoU and GIoU come twice: on `f32` arrays for metrics
//! and on candle tensors (differentiable) for losses. Degenerate boxes (`x2 < x1` or
//! `y2 < y1`, or non-finite coordinates) are rejected with [`BoxError`], never turned into NaN.
//!
//! Ported from DETR `util/box_ops.py`
//! (<https://github.com/facebookresearch/detr/blob/main/util/box_ops.py>) and checked
//! against `torchvision.ops.box_iou` / `generalized_box_iou` (tests in `tests/golden.rs`).

mod tensor;

pub use tensor::{cxcywh_to_xyxy_t, iou_giou_t, pairwise_iou_t};

/// A box as four coordinates; which four is always said by the function name.
pub type Box4 = [f32; 4];

/// Errors from box conversions and overlap measures.
#[derive(Debug, thiserror::Error)]
pub enum BoxError {
    #[error("degenerate box {0:?}: need x2 >= x1 and y2 >= y1 with finite coordinates")]
    Degenerate(Box4),
    #[error("box tensor must have shape [N, 4], got {0:?}")]
    Shape(Vec<usize>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, BoxError>;

/// `(cx, cy, w, h)` -> `(x1, y1, x2, y2)`.
pub fn cxcywh_to_xyxy(b: Box4) -> Box4 {
    let [cx, cy, w, h] = b;
    [cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h]
}

/// `(x1, y1, x2, y2)` -> `(cx, cy, w, h)`.
pub fn xyxy_to_cxcywh(b: Box4) -> Box4 {
    let [x1, y1, x2, y2] = b;
    [(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1]
}

/// COCO `(x, y, w, h)` -> `(x1, y1, x2, y2)` with `x2 = x + w` (no `+1`).
pub fn xywh_to_xyxy(b: Box4) -> Box4 {
    let [x, y, w, h] = b;
    [x, y, x + w, y + h]
}

/// Checks that an `xyxy` box is finite and not inverted; zero area is allowed.
pub fn check_xyxy(b: Box4) -> Result<Box4> {
    let ok = b.iter().all(|v| v.is_finite()) && b[2] >= b[0] && b[3] >= b[1];
    if ok {
        Ok(b)
    } else {
        Err(BoxError::Degenerate(b))
    }
}

/// Area of an `xyxy` box (0 for inverted boxes).
pub fn area(b: Box4) -> f32 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

/// Intersection over union of two `xyxy` boxes. Two zero-area boxes give 0.
pub fn iou(a: Box4, b: Box4) -> Result<f32> {
    let (a, b) = (check_xyxy(a)?, check_xyxy(b)?);
    let inter = area([
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ]);
    let union = area(a) + area(b) - inter;
    Ok(if union > 0.0 { inter / union } else { 0.0 })
}

/// Generalised IoU (Rezatofighi et al. 2019) of two `xyxy` boxes, in `[-1, 1]`.
pub fn giou(a: Box4, b: Box4) -> Result<f32> {
    let i = iou(a, b)?;
    let inter = area([
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ]);
    let union = area(a) + area(b) - inter;
    let hull = area([
        a[0].min(b[0]),
        a[1].min(b[1]),
        a[2].max(b[2]),
        a[3].max(b[3]),
    ]);
    Ok(if hull > 0.0 {
        i - (hull - union) / hull
    } else {
        i
    })
}

/// Clamp every coordinate of a box to `[lo, hi]`.
pub fn clamp(b: Box4, lo: f32, hi: f32) -> Box4 {
    b.map(|v| v.clamp(lo, hi))
}

/// The resize-and-pad that maps an image of `width x height` pixels into a square of
/// `side` pixels: scale so the long side fits, then offset by `(pad_x, pad_y)`.
///
/// It is the single place where pixel `xyxy` boxes become normalised `cxcywh` boxes and back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    pub side: u32,
    pub scale: f32,
    pub pad_x: f32,
    pub pad_y: f32,
    /// The resized image's size before padding.
    pub width: u32,
    pub height: u32,
}

/// Python's `round` of a float: half to even.
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

impl Letterbox {
    /// The centred letterbox of an image into a `side x side` square, as TransVG's test
    /// transform computes it: `ratio = side / max(w, h)` in f64, the new size rounded half
    /// to even (Python's `round`), the padding `round((side - new) / 2 - 0.1)`, which is
    /// `(side - new) / 2` in integers.
    pub fn centred(width: u32, height: u32, side: u32) -> Self {
        let ratio = f64::from(side) / f64::from(width.max(height).max(1));
        let size = |n: u32| (round_half_even(f64::from(n) * ratio) as u32).clamp(1, side);
        let (w, h) = (size(width), size(height));
        Letterbox {
            side,
            scale: ratio as f32,
            pad_x: ((side - w) / 2) as f32,
            pad_y: ((side - h) / 2) as f32,
            width: w,
            height: h,
        }
    }

    /// Size of an image scaled by `scale`, rounded half to even (at least 1 pixel).
    pub fn scaled_size(width: u32, height: u32, scale: f32) -> (u32, u32) {
        let size = |n: u32| (round_half_even(f64::from(n) * f64::from(scale)) as u32).max(1);
        (size(width), size(height))
    }

    /// Pixel `xyxy` in the original image -> normalised `cxcywh` in the padded square.
    pub fn to_model(&self, xyxy_px: Box4) -> Box4 {
        let s = self.side as f32;
        let [x1, y1, x2, y2] = xyxy_px;
        xyxy_to_cxcywh([
            (x1 * self.scale + self.pad_x) / s,
            (y1 * self.scale + self.pad_y) / s,
            (x2 * self.scale + self.pad_x) / s,
            (y2 * self.scale + self.pad_y) / s,
        ])
    }

    /// Normalised `cxcywh` in the padded square -> pixel `xyxy` in the original image.
    pub fn to_image(&self, cxcywh_norm: Box4) -> Box4 {
        let s = self.side as f32;
        let [x1, y1, x2, y2] = cxcywh_to_xyxy(cxcywh_norm);
        [
            (x1 * s - self.pad_x) / self.scale,
            (y1 * s - self.pad_y) / self.scale,
            (x2 * s - self.pad_x) / self.scale,
            (y2 * s - self.pad_y) / self.scale,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Box4, b: Box4) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
    }

    #[test]
    fn conversions_round_trip() {
        let b = [0.3, 0.4, 0.2, 0.5];
        assert!(close(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b));
        assert_eq!(
            xywh_to_xyxy([10.0, 20.0, 5.0, 6.0]),
            [10.0, 20.0, 15.0, 26.0]
        );
    }

    #[test]
    fn letterbox_round_trip() {
        for (w, h) in [(640, 480), (300, 500), (64, 64)] {
            let lb = Letterbox::centred(w, h, 224);
            let b = [10.0, 20.0, 55.5, 60.25];
            let m = lb.to_model(b);
            assert!(m.iter().all(|v| (0.0..=1.0).contains(v)), "{m:?}");
            assert!(close(lb.to_image(m), b), "{w}x{h}");
        }
    }

    #[test]
    fn centred_sizes_follow_transvg() {
        // 330x512 -> 412.5 x 640: Python's round gives 412 (half to even), pad (640-412)/2
        let lb = Letterbox::centred(330, 512, 640);
        assert_eq!(
            (lb.width, lb.height, lb.pad_x, lb.pad_y),
            (412, 640, 114.0, 0.0)
        );
        // 500x281 -> 640 x 359.68: 360, top = round(140 - 0.1) = 140
        let lb = Letterbox::centred(500, 281, 640);
        assert_eq!(
            (lb.width, lb.height, lb.pad_x, lb.pad_y),
            (640, 360, 0.0, 140.0)
        );
        // odd padding: round(114.5 - 0.1) = 114
        let lb = Letterbox::centred(411, 640, 640);
        assert_eq!((lb.width, lb.pad_x), (411, 114.0));
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
    }

    #[test]
    fn iou_and_giou_simple_cases() {
        let a = [0.0, 0.0, 2.0, 2.0];
        assert_eq!(iou(a, a).unwrap(), 1.0);
        assert_eq!(giou(a, a).unwrap(), 1.0);
        let b = [1.0, 1.0, 3.0, 3.0];
        assert!((iou(a, b).unwrap() - 1.0 / 7.0).abs() < 1e-6);
        let far = [4.0, 0.0, 6.0, 2.0];
        assert_eq!(iou(a, far).unwrap(), 0.0);
        // hull 12, union 8 -> -(4/12)
        assert!((giou(a, far).unwrap() + 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn degenerate_boxes_are_rejected() {
        let bad = [2.0, 0.0, 1.0, 1.0];
        assert!(matches!(iou(bad, [0.0; 4]), Err(BoxError::Degenerate(b)) if b == bad));
        let nan = [0.0, f32::NAN, 1.0, 1.0];
        assert!(giou(nan, [0.0, 0.0, 1.0, 1.0]).is_err());
        // zero-area boxes are valid and give 0, not NaN
        assert_eq!(
            iou([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]).unwrap(),
            0.0
        );
    }
}
