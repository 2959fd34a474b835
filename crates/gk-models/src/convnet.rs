//! A small convolutional visual backbone for grounders trained from scratch (ours).
//!
//! Owns the patch stem, the residual 3x3 conv blocks and the 2x2 merges of the demo
//! grounder's visual encoder. A ViT trained from scratch on a few thousand images has no
//! locality prior and learns slowly (issue 3: the 16-px-patch ViT never left the mean-box
//! plateau in the demo's budget); convolutions give that prior for free.
//!
//! Layout: tokens stay channels-last (`[B, H, W, C]`) throughout. Weights keep PyTorch's
//! `Conv2d` layout (`[Cout, Cin, k, k]`) so `tools/reference/synth_twin.py` maps onto them
//! key for key; every convolution runs as an unfold (zero pad, shifted views, concat) and
//! one matmul, so the backward is matmuls and copies (candle's CPU `conv_transpose2d`
//! backward path is a plain loop).
//!
//! ```text
//! pixels [B,3,S,S] -stem (p x p, stride p)-> [B,S/p,S/p,C0] -blocks-> -merge 2x2-> [B,.,.,C1] ...
//!        -> + position_embedding -> norm -> tokens [B, g*g, C_last]
//! ```

use crate::nn::{Activation, LayerNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Shape of a [`ConvNet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvNetConfig {
    /// Channels per stage; stage `i > 0` starts with a 2x2 stride-2 merge.
    pub channels: Vec<usize>,
    /// Residual 3x3 blocks per stage.
    pub depths: Vec<usize>,
    /// Side of the stem's non-overlapping patches.
    pub patch_size: usize,
    /// Square input side in pixels.
    pub image_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_eps() -> f64 {
    1e-5
}

impl ConvNetConfig {
    /// The demo backbone: 128 px, stride 4/8/16 stages of 32/64/128 channels, an 8x8 grid.
    pub fn synth() -> Self {
        Self {
            channels: vec![32, 64, 128],
            depths: vec![1, 1, 2],
            patch_size: 4,
            image_size: 128,
            layer_norm_eps: 1e-5,
        }
    }

    /// For tests: 32 px, 8/16 channels, a 4x4 grid.
    pub fn tiny() -> Self {
        Self {
            channels: vec![8, 16],
            depths: vec![1, 1],
            patch_size: 4,
            image_size: 32,
            layer_norm_eps: 1e-5,
        }
    }

    /// Side of the output token grid.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size / (1 << (self.channels.len() - 1))
    }

    /// Total downsampling factor (pixels per output token side).
    pub fn stride(&self) -> usize {
        self.patch_size << (self.channels.len() - 1)
    }

    pub fn out_dim(&self) -> usize {
        *self.channels.last().unwrap_or(&0)
    }
}

/// A `k x k` convolution with stride 1 (k = 3, zero padding 1) or stride k (no padding)
/// on channels-last tokens, stored as `weight [Cout, Cin, k, k]`, `bias [Cout]`.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    /// `true`: stride k, no padding (patchify / merge). `false`: stride 1, "same" padding.
    strided: bool,
}

impl Conv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, k: usize, strided: bool) -> Result<Self> {
        // PyTorch Conv2d default init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Self {
            weight: vb.get_with_hints((cout, cin, k, k), "weight", init)?,
            bias: vb.get_with_hints(cout, "bias", init)?,
            k,
            strided,
        })
    }

    /// The weight as `[k*k*Cin, Cout]`, rows ordered `(ky, kx, cin)` like the unfolded input.
    fn matrix(&self) -> Result<Tensor> {
        let (cout, cin, k, _) = self.weight.dims4()?;
        self.weight
            .permute((0, 2, 3, 1))? // [Cout, ky, kx, Cin]
            .reshape((cout, k * k * cin))?
            .t()
    }

    /// `x: [B, H, W, Cin]` -> `[B, H', W', Cout]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let k = self.k;
        let (cols, oh, ow) = if self.strided {
            let (oh, ow) = (h / k, w / k);
            let cols = x
                .reshape((b, oh, k, ow, k, c))?
                .transpose(2, 3)? // [B, oh, ow, ky, kx, C]
                .contiguous()?
                .reshape((b * oh * ow, k * k * c))?;
            (cols, oh, ow)
        } else {
            (unfold(x, k)?.reshape((b * h * w, k * k * c))?, h, w)
        };
        let cout = self.weight.dim(0)?;
        cols.matmul(&self.matrix()?)?
            .broadcast_add(&self.bias)?
            .reshape((b, oh, ow, cout))
    }
}

/// `[B, H, W, C]` -> `[B, H, W, k*k*C]` zero-padded neighbourhoods, `(ky, kx, c)` order:
/// the fused kernel on CPU f32, shifted views and a concatenation elsewhere.
fn unfold(x: &Tensor, k: usize) -> Result<Tensor> {
    if crate::fused::applies(x) {
        return x.contiguous()?.apply_op1(crate::fused::Unfold { k });
    }
    let (_, h, w, _) = x.dims4()?;
    let pad = k / 2;
    let xp = x.pad_with_zeros(1, pad, pad)?.pad_with_zeros(2, pad, pad)?;
    let mut shifted = Vec::with_capacity(k * k);
    for ky in 0..k {
        let row = xp.narrow(1, ky, h)?;
        for kx in 0..k {
            shifted.push(row.narrow(2, kx, w)?);
        }
    }
    Tensor::cat(&shifted, 3)
}

/// `x + conv3x3(act(norm(x)))`.
#[derive(Debug, Clone)]
struct Block {
    norm: LayerNorm,
    conv: Conv,
}

impl Block {
    fn new(vb: VarBuilder, c: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::new(vb.pp("norm"), c, eps)?,
            conv: Conv::new(vb.pp("conv"), c, c, 3, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = Activation::QuickGelu.forward(&self.norm.forward(x)?)?;
        x + self.conv.forward(&h)?
    }
}

/// What [`ConvNet::forward`] returns.
#[derive(Debug, Clone)]
pub struct ConvNetOutput {
    /// `[B, g*g, C]` row-major tokens after the final norm.
    pub tokens: Tensor,
    /// Each stage's output, channels-last `[B, H_i, W_i, C_i]` (multi-scale features).
    pub stages: Vec<Tensor>,
}

/// The backbone. Keys: `stem`, `merges.{i}` (stage i+1), `stages.{i}.{j}.{norm,conv}`,
/// `position_embedding [g*g, C]`, `norm` — the names of `synth_twin.py`'s `ConvBackbone`.
#[derive(Debug, Clone)]
pub struct ConvNet {
    stem: Conv,
    merges: Vec<Conv>,
    stages: Vec<Vec<Block>>,
    position_embedding: Tensor,
    norm: LayerNorm,
    cfg: ConvNetConfig,
}

impl ConvNet {
    pub fn new(vb: VarBuilder, cfg: &ConvNetConfig) -> Result<Self> {
        let ch = &cfg.channels;
        if ch.is_empty() || ch.len() != cfg.depths.len() {
            candle_core::bail!(
                "convnet: {} channel entries for {} depth entries (need the same, at least one)",
                ch.len(),
                cfg.depths.len()
            );
        }
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.stride()) {
            candle_core::bail!(
                "convnet: image_size {} is not a multiple of the total stride {}",
                cfg.image_size,
                cfg.stride()
            );
        }
        let g = cfg.grid();
        let c = cfg.out_dim();
        Ok(Self {
            stem: Conv::new(vb.pp("stem"), 3, ch[0], cfg.patch_size, true)?,
            merges: (1..ch.len())
                .map(|i| {
                    Conv::new(
                        vb.pp(format!("merges.{}", i - 1)),
                        ch[i - 1],
                        ch[i],
                        2,
                        true,
                    )
                })
                .collect::<Result<_>>()?,
            stages: ch
                .iter()
                .zip(&cfg.depths)
                .enumerate()
                .map(|(i, (&c, &d))| {
                    (0..d)
                        .map(|j| {
                            Block::new(vb.pp(format!("stages.{i}.{j}")), c, cfg.layer_norm_eps)
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?,
            position_embedding: vb.get_with_hints(
                (g * g, c),
                "position_embedding",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            norm: LayerNorm::new(vb.pp("norm"), c, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ConvNetConfig {
        &self.cfg
    }

    /// `pixels: [B, 3, S, S]` with `S = image_size`.
    pub fn forward(&self, pixels: &Tensor) -> Result<ConvNetOutput> {
        let (b, c, h, w) = pixels.dims4()?;
        if c != 3 || h != self.cfg.image_size || w != self.cfg.image_size {
            candle_core::bail!(
                "convnet expects [B, 3, {s}, {s}] pixels, got {:?}",
                pixels.dims(),
                s = self.cfg.image_size
            );
        }
        // [B, 3, S, S] -> channels-last [B, S, S, 3] -> stem [B, S/p, S/p, C0]
        let mut x = self
            .stem
            .forward(&pixels.permute((0, 2, 3, 1))?.contiguous()?)?;
        let mut stages = Vec::with_capacity(self.stages.len());
        for (i, blocks) in self.stages.iter().enumerate() {
            if i > 0 {
                x = self.merges[i - 1].forward(&x)?; // [B, H/2, W/2, C_i]
            }
            for block in blocks {
                x = block.forward(&x)?;
            }
            stages.push(x.clone());
        }
        let (_, gh, gw, cl) = x.dims4()?;
        let tokens = x
            .reshape((b, gh * gw, cl))?
            .broadcast_add(&self.position_embedding)?;
        Ok(ConvNetOutput {
            tokens: self.norm.forward(&tokens)?,
            stages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Direct convolution on channels-last input, for checking the unfold path.
    fn naive(x: &[f32], dims: (usize, usize, usize, usize), conv: &Conv) -> Vec<f32> {
        let (b, h, w, cin) = dims;
        let wt = conv.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bias = conv.bias.to_vec1::<f32>().unwrap();
        let cout = bias.len();
        let k = conv.k;
        let (s, pad) = if conv.strided { (k, 0) } else { (1, k / 2) };
        let (oh, ow) = if conv.strided { (h / k, w / k) } else { (h, w) };
        let mut out = vec![0f32; b * oh * ow * cout];
        for n in 0..b {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..cout {
                        let mut acc = bias[co];
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (
                                    (oy * s + ky) as isize - pad as isize,
                                    (ox * s + kx) as isize - pad as isize,
                                );
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                for ci in 0..cin {
                                    acc += wt[((co * cin + ci) * k + ky) * k + kx]
                                        * x[((n * h + iy as usize) * w + ix as usize) * cin + ci];
                                }
                            }
                        }
                        out[((n * oh + oy) * ow + ox) * cout + co] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn unfold_convolutions_equal_direct_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let dims = (2, 8, 8, 3);
        let x = Tensor::randn(0f32, 1.0, dims, &dev)?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        for (name, k, strided) in [
            ("same3", 3, false),
            ("patch4", 4, true),
            ("merge2", 2, true),
        ] {
            let conv = Conv::new(vb.pp(name), 3, 5, k, strided)?;
            let got = conv.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let want = naive(&xv, dims, &conv);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{name}: max |diff| {err}");
        }
        Ok(())
    }

    #[test]
    fn fused_unfold_equals_composed_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 4, 3), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (2, 5, 4, 27), &dev)?;
        let fused = unfold(x.as_tensor(), 3)?;
        // the composed path, forced by going through f64
        let composed = unfold(&x.as_tensor().to_dtype(DType::F64)?, 3)?.to_dtype(DType::F32)?;
        let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let g1 = (fused * &w)?.sum_all()?.backward()?;
        let g2 = (composed * &w)?.sum_all()?.backward()?;
        let (g1, g2) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        let diff = (g1 - g2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient max |diff| {diff}");
        Ok(())
    }

    #[test]
    fn tiny_convnet_shapes_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let cfg = ConvNetConfig::tiny();
        let net = ConvNet::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
        let out = net.forward(&x)?;
        assert_eq!(out.tokens.dims(), &[2, cfg.grid() * cfg.grid(), 16]);
        assert_eq!(out.stages[0].dims(), &[2, 8, 8, 8]);
        let grads = out.tokens.sqr()?.sum_all()?.backward()?;
        for (name, var) in map.data().lock().unwrap().iter() {
            let g = grads
                .get(var)
                .expect(name)
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert!(g.is_finite() && g > 0.0, "{name}: |g| = {g}");
        }
        assert!(ConvNet::new(
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
            &ConvNetConfig {
                image_size: 30,
                ..cfg
            }
        )
        .is_err());
        Ok(())
    }
}
