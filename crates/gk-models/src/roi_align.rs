//! RoIAlign (Mask R-CNN), as `torchvision.ops.roi_align` computes it: every output bin
//! averages bilinear samples on a regular grid inside the bin, `aligned` shifts boxes by
//! half a pixel, an adaptive sampling grid when `sampling_ratio <= 0`.
//!
//! The sampling positions depend only on the boxes, so they are built on the CPU as a
//! constant interpolation matrix `W [R * PH * PW, H * W]` per image and the pooling is
//! `W @ features`: a matmul, whose gradient flows to the features like torchvision's
//! backward (boxes get none, as in torchvision). Features are channels-last
//! `[B, H * W, C]`, the layout of our visual tokens.

use candle_core::{DType, Result, Tensor};

/// RoIAlign settings (torchvision's arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoiAlignConfig {
    /// Output bins `(PH, PW)`.
    pub output: (usize, usize),
    /// Box coordinates times this give feature-map coordinates.
    pub spatial_scale: f32,
    /// Samples per bin side; `<= 0`: `ceil(roi size / bins)` per box.
    pub sampling_ratio: i32,
    /// Shift boxes by -0.5 pixel (pixel centres at integer + 0.5).
    pub aligned: bool,
}

/// One region: the image it belongs to and its `x1, y1, x2, y2` box in input coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roi {
    pub batch: usize,
    pub xyxy: [f32; 4],
}

/// Bilinear weights of one sample point, torchvision's `bilinear_interpolate`.
fn bilinear(h: usize, w: usize, y: f32, x: f32, weight: f32, row: &mut [f32]) {
    if y < -1.0 || y > h as f32 || x < -1.0 || x > w as f32 {
        return;
    }
    let (y_low, y_high, ly) = axis(y, h);
    let (x_low, x_high, lx) = axis(x, w);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    row[y_low * w + x_low] += weight * hy * hx;
    row[y_low * w + x_high] += weight * hy * lx;
    row[y_high * w + x_low] += weight * ly * hx;
    row[y_high * w + x_high] += weight * ly * lx;
}

/// One axis of torchvision's interpolation: the two neighbours of `v` (clamped into
/// `0..size`, both the last index past the end) and the weight of the upper one.
fn axis(v: f32, size: usize) -> (usize, usize, f32) {
    let v = v.max(0.0);
    let low = v as usize;
    if low >= size - 1 {
        (size - 1, size - 1, 0.0)
    } else {
        (low, low + 1, v - low as f32)
    }
}

/// The interpolation rows of one box: `[PH * PW, H * W]`, row-major bins.
fn roi_rows(cfg: &RoiAlignConfig, (h, w): (usize, usize), b: [f32; 4]) -> Vec<f32> {
    let (ph, pw) = cfg.output;
    let offset = if cfg.aligned { 0.5 } else { 0.0 };
    let s = cfg.spatial_scale;
    let (x0, y0) = (b[0] * s - offset, b[1] * s - offset);
    let (mut rw, mut rh) = (b[2] * s - offset - x0, b[3] * s - offset - y0);
    if !cfg.aligned {
        rw = rw.max(1.0);
        rh = rh.max(1.0);
    }
    let (bin_h, bin_w) = (rh / ph as f32, rw / pw as f32);
    let grid = |size: f32, bins: usize| -> usize {
        if cfg.sampling_ratio > 0 {
            cfg.sampling_ratio as usize
        } else {
            (size / bins as f32).ceil().max(0.0) as usize
        }
    };
    let (gy, gx) = (grid(rh, ph), grid(rw, pw));
    let count = (gy * gx).max(1) as f32;
    let mut out = vec![0f32; ph * pw * h * w];
    for py in 0..ph {
        for px in 0..pw {
            let row = &mut out[(py * pw + px) * h * w..(py * pw + px + 1) * h * w];
            for iy in 0..gy {
                let y = y0 + py as f32 * bin_h + (iy as f32 + 0.5) * bin_h / gy as f32;
                for ix in 0..gx {
                    let x = x0 + px as f32 * bin_w + (ix as f32 + 0.5) * bin_w / gx as f32;
                    bilinear(h, w, y, x, 1.0 / count, row);
                }
            }
        }
    }
    out
}

/// Pools `rois` from `features: [B, H * W, C]` (channels-last, grid `(H, W)`); returns
/// `[R, PH * PW, C]` in the order of `rois`.
pub fn roi_align(
    features: &Tensor,
    grid: (usize, usize),
    rois: &[Roi],
    cfg: &RoiAlignConfig,
) -> Result<Tensor> {
    let (b, hw, c) = features.dims3()?;
    if hw != grid.0 * grid.1 {
        candle_core::bail!(
            "roi_align: {hw} feature positions for a {}x{} grid",
            grid.0,
            grid.1
        );
    }
    let bins = cfg.output.0 * cfg.output.1;
    if rois.is_empty() {
        return Tensor::zeros((0, bins, c), features.dtype(), features.device());
    }
    if let Some(r) = rois
        .iter()
        .find(|r| r.batch >= b || r.xyxy.iter().any(|v| !v.is_finite()))
    {
        candle_core::bail!("roi_align: bad region {r:?} for a batch of {b}");
    }
    // Per image: one matmul of its regions' rows with its features.
    let mut parts = Vec::new();
    let mut order = vec![0u32; rois.len()];
    let mut next = 0u32;
    for img in 0..b {
        let mine: Vec<usize> = (0..rois.len()).filter(|&i| rois[i].batch == img).collect();
        if mine.is_empty() {
            continue;
        }
        let mut rows = Vec::with_capacity(mine.len() * bins * hw);
        for &i in &mine {
            rows.extend(roi_rows(cfg, grid, rois[i].xyxy));
            order[i] = next;
            next += 1;
        }
        let m = Tensor::from_vec(rows, (mine.len() * bins, hw), features.device())?
            .to_dtype(features.dtype())?;
        let pooled = m.matmul(&features.get(img)?)?; // [r * bins, C]
        parts.push(pooled.reshape((mine.len(), bins, c))?);
    }
    let all = Tensor::cat(&parts, 0)?; // regions grouped by image
    let idx = Tensor::from_vec(order, rois.len(), features.device())?;
    all.index_select(&idx, 0)
}

/// `[R, 4]` boxes as rows of a tensor (a convenience for callers holding boxes in tensors).
pub fn rois_from_tensor(batch: &[usize], boxes: &Tensor) -> Result<Vec<Roi>> {
    let v = boxes.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    if v.len() != batch.len() {
        candle_core::bail!(
            "rois_from_tensor: {} batch indices for {} boxes",
            batch.len(),
            v.len()
        );
    }
    Ok(v.iter()
        .zip(batch)
        .map(|(b, &i)| Roi {
            batch: i,
            xyxy: [b[0], b[1], b[2], b[3]],
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_bin_covering_one_pixel_centre_reads_that_pixel() {
        // 3x3 map of values 0..9, one channel; aligned box around pixel (1, 2).
        let f = Tensor::arange(0f32, 9.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 9, 1))
            .unwrap();
        let cfg = RoiAlignConfig {
            output: (1, 1),
            spatial_scale: 1.0,
            sampling_ratio: 1,
            aligned: true,
        };
        let out = roi_align(
            &f,
            (3, 3),
            &[Roi {
                batch: 0,
                xyxy: [2.0, 1.0, 3.0, 2.0],
            }],
            &cfg,
        )
        .unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![5.0]
        );
    }

    #[test]
    fn output_follows_roi_order_across_images() {
        let f = Tensor::arange(0f32, 2.0 * 4.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 4, 1))
            .unwrap();
        let cfg = RoiAlignConfig {
            output: (1, 1),
            spatial_scale: 1.0,
            sampling_ratio: 1,
            aligned: true,
        };
        let r = |batch, x: f32| Roi {
            batch,
            xyxy: [x, 0.0, x + 1.0, 1.0],
        };
        let out = roi_align(&f, (2, 2), &[r(1, 0.0), r(0, 1.0), r(1, 1.0)], &cfg).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0, 1.0, 5.0]
        );
    }
}
