//! DETR's visual encoder as TransVG uses it (`visumodel`): a ResNet trunk, `input_proj`
//! (1x1 convolution to the model width), DETR's normalised sine position code and the
//! post-norm transformer encoder (no decoder), giving one token per cell of the stride-32
//! (or, dilated, stride-16) grid.
//!
//! Port of TransVG `models/visual_model/{detr,backbone,position_encoding,transformer}.py`
//! (<https://github.com/djiajunustc/TransVG/tree/main/models/visual_model>, copied from
//! DETR). Keys: `backbone.*` (torchvision's, [`crate::resnet`]), `input_proj.{weight,bias}`
//! (`[d, C, 1, 1]`, as the checkpoint stores it), `encoder.layers.{i}.*`
//! ([`crate::encoder::EncoderLayer`]).

use crate::encoder::{EncoderConfig, EncoderLayer};
use crate::nn;
use crate::resnet::{ResNet, ResNetConfig};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// TransVG's visual branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetrConfig {
    pub backbone: ResNetConfig,
    /// DETR's encoder (post-norm); its `hidden` is the token width.
    pub encoder: EncoderConfig,
}

impl DetrConfig {
    /// TransVG's released shape: ResNet-50, no dilation, 6 encoder layers of width 256.
    pub fn r50() -> Self {
        Self {
            backbone: ResNetConfig::resnet50(),
            encoder: EncoderConfig::detr(),
        }
    }

    /// Cells per side of the token grid for a square input of `side` pixels.
    pub fn grid(&self, side: usize) -> usize {
        side / self.backbone.stride()
    }
}

/// DETR's `PositionEmbeddingSine(num_pos_feats, temperature=10000, normalize=True,
/// scale=2π)` of a cell mask `[B, H, W]` (1 = image): `[B, H * W, 2 * num_pos_feats]`,
/// channels-last, the row code first. Cumulative sums count image cells only, so cells
/// above or left of the image code 0; each sum is divided by its last row/column (+1e-6).
pub fn sine_position(mask: &Tensor, num_pos_feats: usize) -> Result<Tensor> {
    let (b, h, w) = mask.dims3()?;
    let dev = mask.device();
    let mask = mask.to_dtype(DType::F32)?;
    let scale = 2.0 * std::f64::consts::PI;
    let y = mask.cumsum(1)?; // [B, H, W]
    let x = mask.cumsum(2)?;
    let y = y
        .broadcast_div(&(y.narrow(1, h - 1, 1)? + 1e-6)?)?
        .affine(scale, 0.0)?;
    let x = x
        .broadcast_div(&(x.narrow(2, w - 1, 1)? + 1e-6)?)?
        .affine(scale, 0.0)?;
    let n = num_pos_feats;
    let dim_t: Vec<f32> = (0..n)
        .map(|i| 10000f32.powf((2 * (i / 2)) as f32 / n as f32))
        .collect();
    let dim_t = Tensor::from_vec(dim_t, (1, 1, 1, n), dev)?;
    let even: Vec<f32> = (0..n).map(|i| (i % 2 == 0) as u8 as f32).collect();
    let even = Tensor::from_vec(even, (1, 1, 1, n), dev)?;
    let odd = (1.0 - &even)?;
    // sin on even channels, cos on odd ones (DETR stacks and interleaves them)
    let code = |e: &Tensor| -> Result<Tensor> {
        let p = e.unsqueeze(3)?.broadcast_div(&dim_t)?; // [B, H, W, n]
        p.sin()?.broadcast_mul(&even)? + p.cos()?.broadcast_mul(&odd)?
    };
    Tensor::cat(&[code(&y)?, code(&x)?], 3)?.reshape((b, h * w, 2 * n))
}

/// The visual branch's output.
#[derive(Debug, Clone)]
pub struct DetrOutput {
    /// `[B, H * W, d]` encoder memory, row-major cells.
    pub tokens: Tensor,
    /// `[B, H * W]`, 1 = image, 0 = padding.
    pub mask: Tensor,
    pub grid: (usize, usize),
}

/// DETR's backbone + `input_proj` + encoder.
#[derive(Debug, Clone)]
pub struct DetrVisual {
    backbone: ResNet,
    input_proj_weight: Tensor,
    input_proj_bias: Tensor,
    layers: Vec<EncoderLayer>,
    cfg: DetrConfig,
}

impl DetrVisual {
    pub fn new(vb: VarBuilder, cfg: &DetrConfig) -> Result<Self> {
        if cfg.encoder.pre_norm {
            candle_core::bail!("DETR's encoder is post-norm (TransVG's pre_norm = False)");
        }
        let (d, c) = (cfg.encoder.hidden, cfg.backbone.out_channels());
        // nn.Conv2d default init: U(+-1/sqrt(fan_in))
        let bound = 1.0 / (c as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let proj = vb.pp("input_proj");
        Ok(Self {
            backbone: ResNet::new(vb.pp("backbone"), &cfg.backbone)?,
            input_proj_weight: proj.get_with_hints((d, c, 1, 1), "weight", init)?,
            input_proj_bias: proj.get_with_hints(d, "bias", init)?,
            layers: (0..cfg.encoder.layers)
                .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), &cfg.encoder))
                .collect::<Result<_>>()?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DetrConfig {
        &self.cfg
    }

    /// `pixels: [B, 3, S, S]`, `pixel_mask: [B, S, S]` (1 = image; S a multiple of 32).
    pub fn forward(&self, pixels: &Tensor, pixel_mask: &Tensor) -> Result<DetrOutput> {
        let f = self.backbone.forward(pixels)?; // [B, C, gh, gw]
        let (b, c, gh, gw) = f.dims4()?;
        let d = self.cfg.encoder.hidden;
        // input_proj as one matmul on channels-last cells
        let cells = f.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // [B, gh*gw, C]
        let w = self.input_proj_weight.reshape((d, c))?;
        let mut x = cells
            .reshape((b * gh * gw, c))?
            .matmul(&w.t()?)?
            .broadcast_add(&self.input_proj_bias)?
            .reshape((b, gh * gw, d))?;
        // F.interpolate(mask, size=(gh, gw)), nearest: cell (i, j) reads pixel (s*i, s*j)
        let cell_mask = crate::grounder::patch_mask(pixel_mask, gh, gw)?; // [B, gh*gw]
        let pos = sine_position(&cell_mask.reshape((b, gh, gw))?, d / 2)?; // [B, gh*gw, d]
        let bias = nn::key_padding_bias(&cell_mask, x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &pos, &bias)?;
        }
        Ok(DetrOutput {
            tokens: x,
            mask: cell_mask.to_dtype(DType::F32)?,
            grid: (gh, gw),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// DETR's `PositionEmbeddingSine` computed by hand on a 3x4 grid whose first column
    /// and last row are padding.
    #[test]
    fn sine_position_matches_the_definition() -> Result<()> {
        let dev = Device::Cpu;
        let (h, w, n) = (3usize, 4usize, 6usize);
        let m: Vec<f32> = (0..h * w)
            .map(|i| (i % w != 0 && i / w != h - 1) as u8 as f32)
            .collect();
        let mask = Tensor::from_vec(m.clone(), (1, h, w), &dev)?;
        let pos = sine_position(&mask, n)?.squeeze(0)?.to_vec2::<f32>()?;
        let two_pi = 2.0 * std::f64::consts::PI;
        for i in 0..h {
            for j in 0..w {
                let cum = |rows: bool| -> (f64, f64) {
                    let at = |a: usize, b: usize| m[a * w + b] as f64;
                    if rows {
                        (
                            (0..=i).map(|a| at(a, j)).sum(),
                            (0..h).map(|a| at(a, j)).sum(),
                        )
                    } else {
                        (
                            (0..=j).map(|b| at(i, b)).sum(),
                            (0..w).map(|b| at(i, b)).sum(),
                        )
                    }
                };
                for (half, rows) in [(0, true), (1, false)] {
                    let (c, last) = cum(rows);
                    let e = c / (last + 1e-6) * two_pi;
                    for k in 0..n {
                        let t = e / 10000f64.powf((2 * (k / 2)) as f64 / n as f64);
                        let want = if k % 2 == 0 { t.sin() } else { t.cos() };
                        let got = pos[i * w + j][half * n + k] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "({i},{j}) ch {k}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
