//! Swin Transformer (Liu et al. 2021): window attention with a relative position bias,
//! shifted windows with their masks, patch merging; QRNet's visual backbone
//! (`shared/methods.md` §2).
//!
//! Parameter names are those of the Hugging Face checkpoints on the Hub
//! (`microsoft/swin-*`, transformers' classic layout): `embeddings.patch_embeddings.projection`,
//! `embeddings.norm`, `encoder.layers.{i}.blocks.{j}.{layernorm_before, attention.self.{query,
//! key, value, relative_position_bias_table}, attention.output.dense, layernorm_after,
//! intermediate.dense, output.dense}`, `encoder.layers.{i}.downsample.{norm, reduction}`,
//! `layernorm`. (transformers 5 renames these in memory when it loads such a file; our
//! fixture generator writes the classic names.)
//!
//! Behaviour follows transformers: the patch embedding and every block pad right/bottom to
//! a multiple of the patch or window size; a stage whose grid is not larger than the window
//! uses one window of the grid's size and no shift (mmdet's detection Swin, with
//! `fixed_windows`, pads it up to a full shifted window instead); odd grids are padded
//! before merging. `gk_train::import::mmdet_swin_backbone` maps an mmdet detector's
//! weights (fused `qkv`) onto these names.
//! [`Swin::forward_with`] lets a caller refine each stage's output before it is merged
//! (QRNet's query-aware dynamic attention).

use crate::nn::{self, Activation, LayerNorm};
use candle_core::{Device, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// `SwinConfig` (field names as in transformers' `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SwinConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_size: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// The detection Swin's windows (mmdet's `SwinTransformer`, QRNet's backbone): every
    /// stage uses `window_size`, a smaller grid padded up to it and shifted as usual,
    /// instead of transformers' one unshifted window of the grid's size. The same at QRNet's
    /// 640 px, where every stage is larger than a window.
    #[serde(default)]
    pub fixed_windows: bool,
}

impl Default for SwinConfig {
    fn default() -> Self {
        Self::swin_t()
    }
}

impl SwinConfig {
    /// Swin-T (`microsoft/swin-tiny-patch4-window7-224`).
    pub fn swin_t() -> Self {
        Self {
            image_size: 224,
            patch_size: 4,
            num_channels: 3,
            embed_dim: 96,
            depths: vec![2, 2, 6, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: 7,
            mlp_ratio: 4.0,
            qkv_bias: true,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
            fixed_windows: false,
        }
    }

    /// Swin-S (QRNet's backbone, with the detection Swin's windows).
    pub fn swin_s() -> Self {
        Self {
            depths: vec![2, 2, 18, 2],
            fixed_windows: true,
            ..Self::swin_t()
        }
    }

    /// A small model for tests and the embedded benchmark: three stages of width 12-48.
    pub fn tiny() -> Self {
        Self {
            image_size: 56,
            embed_dim: 12,
            depths: vec![2, 2, 2],
            num_heads: vec![2, 3, 6],
            window_size: 4,
            mlp_ratio: 2.0,
            ..Self::swin_t()
        }
    }

    /// Channels of stage `i`'s output.
    pub fn stage_dim(&self, i: usize) -> usize {
        self.embed_dim << i
    }
}

/// Window attention of one block: q/k/v/out projections and the relative position bias
/// table `[(2w-1)², heads]` of the configured window `w`.
#[derive(Debug, Clone)]
struct WindowAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    table: Tensor,
    table_window: usize,
    heads: usize,
}

impl WindowAttention {
    fn new(vb: VarBuilder, dim: usize, heads: usize, cfg: &SwinConfig) -> Result<Self> {
        let s = vb.pp("self");
        let w = cfg.window_size;
        Ok(Self {
            query: nn::linear(s.pp("query"), dim, dim, cfg.qkv_bias)?,
            key: nn::linear(s.pp("key"), dim, dim, cfg.qkv_bias)?,
            value: nn::linear(s.pp("value"), dim, dim, cfg.qkv_bias)?,
            out: candle_nn::linear(dim, dim, vb.pp("output").pp("dense"))?,
            table: s.get_with_hints(
                ((2 * w - 1) * (2 * w - 1), heads),
                "relative_position_bias_table",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            table_window: w,
            heads,
        })
    }

    /// `[1, heads, ws², ws²]` for windows of side `ws` (at most the configured window):
    /// the table row of each relative offset `(dh, dw)`.
    fn bias(&self, ws: usize) -> Result<Tensor> {
        let (w, n) = (self.table_window as i64, ws * ws);
        let mut idx = Vec::with_capacity(n * n);
        for i in 0..n {
            for j in 0..n {
                let dh = (i / ws) as i64 - (j / ws) as i64 + w - 1;
                let dw = (i % ws) as i64 - (j % ws) as i64 + w - 1;
                idx.push((dh * (2 * w - 1) + dw) as u32);
            }
        }
        let idx = Tensor::from_vec(idx, n * n, self.table.device())?;
        self.table
            .index_select(&idx, 0)? // [n*n, heads]
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// `x: [Bw, N, C]` windows, `bias` broadcastable to `[Bw, heads, N, N]`.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (
            self.query.forward(x)?,
            self.key.forward(x)?,
            self.value.forward(x)?,
        );
        self.out
            .forward(&nn::attention(&q, &k, &v, self.heads, Some(bias))?)
    }
}

/// `[B, H, W, C]` (H, W multiples of `ws`) -> `[B * nW, ws*ws, C]`, windows row-major.
fn window_partition(x: &Tensor, ws: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h / ws, ws, w / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * (h / ws) * (w / ws), ws * ws, c))
}

/// The inverse of [`window_partition`].
fn window_reverse(x: &Tensor, ws: usize, b: usize, h: usize, w: usize) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    x.reshape((b, h / ws, w / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, h, w, c))
}

/// The shifted-window mask `[nW, N, N]` (0 within a region, -100 across regions) for a
/// padded `h x w` grid, as transformers' `get_attn_mask`.
fn shift_mask(h: usize, w: usize, ws: usize, shift: usize, dev: &Device) -> Result<Tensor> {
    let region = |i: usize, len: usize| (i >= len - ws) as usize + (i >= len - shift) as usize;
    let (nh, nw, n) = (h / ws, w / ws, ws * ws);
    let mut data = Vec::with_capacity(nh * nw * n * n);
    for wy in 0..nh {
        for wx in 0..nw {
            let ids: Vec<usize> = (0..n)
                .map(|k| {
                    let (y, x) = (wy * ws + k / ws, wx * ws + k % ws);
                    region(y, h) * 3 + region(x, w)
                })
                .collect();
            for i in 0..n {
                for j in 0..n {
                    data.push(if ids[i] == ids[j] { 0f32 } else { -100.0 });
                }
            }
        }
    }
    Tensor::from_vec(data, (nh * nw, n, n), dev)
}

/// One Swin block (W-MSA or SW-MSA, then the MLP), pre-norm with residuals.
#[derive(Debug, Clone)]
struct SwinBlock {
    layernorm_before: LayerNorm,
    attention: WindowAttention,
    layernorm_after: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    shifted: bool,
    window: usize,
    fixed_windows: bool,
}

impl SwinBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        shifted: bool,
        cfg: &SwinConfig,
    ) -> Result<Self> {
        let hidden = (cfg.mlp_ratio * dim as f64) as usize;
        Ok(Self {
            layernorm_before: LayerNorm::new(vb.pp("layernorm_before"), dim, cfg.layer_norm_eps)?,
            attention: WindowAttention::new(vb.pp("attention"), dim, heads, cfg)?,
            layernorm_after: LayerNorm::new(vb.pp("layernorm_after"), dim, cfg.layer_norm_eps)?,
            fc1: candle_nn::linear(dim, hidden, vb.pp("intermediate").pp("dense"))?,
            fc2: candle_nn::linear(hidden, dim, vb.pp("output").pp("dense"))?,
            act: cfg.hidden_act,
            shifted,
            window: cfg.window_size,
            fixed_windows: cfg.fixed_windows,
        })
    }

    /// `x: [B, H*W, C]` on an `h x w` grid.
    fn forward(&self, x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        // one window of the grid's size, unshifted, when the grid is not larger than a window
        let (ws, shift) = if h.min(w) <= self.window && !self.fixed_windows {
            (h.min(w), 0)
        } else {
            (self.window, if self.shifted { self.window / 2 } else { 0 })
        };
        let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let mut t = self
            .layernorm_before
            .forward(x)?
            .reshape((b, h, w, c))?
            .pad_with_zeros(1, 0, hp - h)?
            .pad_with_zeros(2, 0, wp - w)?; // [B, Hp, Wp, C]
        if shift > 0 {
            t = t.roll(-(shift as i32), 1)?.roll(-(shift as i32), 2)?;
        }
        let windows = window_partition(&t, ws)?; // [B*nW, ws*ws, C]
        let mut bias = self.attention.bias(ws)?; // [1, heads, N, N]
        if shift > 0 {
            let mask = shift_mask(hp, wp, ws, shift, x.device())?; // [nW, N, N]
            let (nw, n) = (mask.dim(0)?, ws * ws);
            let mask =
                mask.unsqueeze(0)?
                    .broadcast_as((b, nw, n, n))?
                    .reshape((b * nw, 1, n, n))?;
            bias = bias.broadcast_add(&mask)?; // [B*nW, heads, N, N]
        }
        let attn = self.attention.forward(&windows, &bias)?;
        let mut t = window_reverse(&attn, ws, b, hp, wp)?;
        if shift > 0 {
            t = t.roll(shift as i32, 1)?.roll(shift as i32, 2)?;
        }
        let t = t.narrow(1, 0, h)?.narrow(2, 0, w)?.reshape((b, h * w, c))?;
        let x = (x + t)?;
        let y = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.layernorm_after.forward(&x)?)?)?,
        )?;
        x + y
    }
}

/// Patch merging: 2x2 neighbours concatenated (odd grids padded), normed, reduced to 2C.
#[derive(Debug, Clone)]
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
}

impl PatchMerging {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::new(vb.pp("norm"), 4 * dim, eps)?,
            reduction: nn::linear(vb.pp("reduction"), 4 * dim, 2 * dim, false)?,
        })
    }

    /// `[B, H*W, C]` -> `[B, ceil(H/2)*ceil(W/2), 2C]`.
    fn forward(&self, x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let t = x
            .reshape((b, h, w, c))?
            .pad_with_zeros(1, 0, 2 * h2 - h)?
            .pad_with_zeros(2, 0, 2 * w2 - w)?
            .reshape((b, h2, 2, w2, 2, c))?;
        // transformers' order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
        let part = |r: usize, col: usize| -> Result<Tensor> {
            t.narrow(2, r, 1)?
                .narrow(4, col, 1)?
                .reshape((b, h2 * w2, c))
        };
        let cat = Tensor::cat(
            &[part(0, 0)?, part(1, 0)?, part(0, 1)?, part(1, 1)?],
            D::Minus1,
        )?;
        self.reduction.forward(&self.norm.forward(&cat)?)
    }
}

/// What [`Swin::forward_with`] returns.
#[derive(Debug, Clone)]
pub struct SwinOutput {
    /// Each stage's output before merging (after the caller's refinement): `[B, H_i*W_i, C_i]`.
    pub stages: Vec<Tensor>,
    /// `(H_i, W_i)` of each stage's grid.
    pub grids: Vec<(usize, usize)>,
    /// The last stage after the final layer norm (if any), `[B, N, C]`, and its token mean `[B, C]`.
    pub last_hidden_state: Tensor,
    pub pooled: Tensor,
}

/// The Swin backbone.
#[derive(Debug, Clone)]
pub struct Swin {
    projection: Tensor,
    projection_bias: Tensor,
    embed_norm: LayerNorm,
    stages: Vec<(Vec<SwinBlock>, Option<PatchMerging>)>,
    /// The final norm (`layernorm`); absent in a multiscale backbone ([`Swin::backbone`]).
    layernorm: Option<LayerNorm>,
    cfg: SwinConfig,
}

impl Swin {
    /// The whole `SwinModel`, final layer norm included.
    pub fn new(vb: VarBuilder, cfg: &SwinConfig) -> Result<Self> {
        let mut swin = Self::backbone(vb.clone(), cfg)?;
        let last = cfg.stage_dim(cfg.depths.len() - 1);
        swin.layernorm = Some(LayerNorm::new(
            vb.pp("layernorm"),
            last,
            cfg.layer_norm_eps,
        )?);
        Ok(swin)
    }

    /// Without the final layer norm: a multiscale backbone whose caller norms the stages.
    pub fn backbone(vb: VarBuilder, cfg: &SwinConfig) -> Result<Self> {
        if cfg.depths.len() != cfg.num_heads.len() || cfg.depths.is_empty() {
            candle_core::bail!(
                "swin: depths {:?} and num_heads {:?} differ in length",
                cfg.depths,
                cfg.num_heads
            );
        }
        let (p, c) = (cfg.patch_size, cfg.embed_dim);
        let pe = vb.pp("embeddings").pp("patch_embeddings").pp("projection");
        let fan_in = (cfg.num_channels * p * p) as f64;
        let n = cfg.depths.len();
        let mut stages = Vec::with_capacity(n);
        for (i, (&depth, &heads)) in cfg.depths.iter().zip(&cfg.num_heads).enumerate() {
            let vb = vb.pp(format!("encoder.layers.{i}"));
            let dim = cfg.stage_dim(i);
            let blocks = (0..depth)
                .map(|j| SwinBlock::new(vb.pp(format!("blocks.{j}")), dim, heads, j % 2 == 1, cfg))
                .collect::<Result<Vec<_>>>()?;
            let merge = if i + 1 < n {
                Some(PatchMerging::new(
                    vb.pp("downsample"),
                    dim,
                    cfg.layer_norm_eps,
                )?)
            } else {
                None
            };
            stages.push((blocks, merge));
        }
        Ok(Self {
            projection: pe.get_with_hints(
                (c, cfg.num_channels, p, p),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / fan_in.sqrt(),
                },
            )?,
            projection_bias: pe.get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?,
            embed_norm: LayerNorm::new(vb.pp("embeddings").pp("norm"), c, cfg.layer_norm_eps)?,
            stages,
            layernorm: None,
            cfg: cfg.clone(),
        })
    }

    /// Patch embedding (input padded to a multiple of the patch size) and its norm:
    /// `[B, 3, H, W]` -> `[B, gh*gw, C]`, `(gh, gw)`.
    fn embed(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (_, _, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h.div_ceil(p), w.div_ceil(p));
        let padded = pixels
            .pad_with_zeros(2, 0, gh * p - h)?
            .pad_with_zeros(3, 0, gw * p - w)?;
        let x = nn::patch_embed(&padded, &self.projection)?.broadcast_add(&self.projection_bias)?;
        Ok((self.embed_norm.forward(&x)?, (gh, gw)))
    }

    /// The plain forward.
    pub fn forward(&self, pixels: &Tensor) -> Result<SwinOutput> {
        self.forward_with(pixels, |_, x, _| Ok(x))
    }

    /// The forward with `refine(stage, x [B, H*W, C], (H, W))` applied to every stage's
    /// output before it is merged and passed on.
    pub fn forward_with(
        &self,
        pixels: &Tensor,
        mut refine: impl FnMut(usize, Tensor, (usize, usize)) -> Result<Tensor>,
    ) -> Result<SwinOutput> {
        let (mut x, mut grid) = self.embed(pixels)?;
        let (mut stages, mut grids) = (Vec::new(), Vec::new());
        for (i, (blocks, merge)) in self.stages.iter().enumerate() {
            for block in blocks {
                x = block.forward(&x, grid)?;
            }
            x = refine(i, x, grid)?;
            stages.push(x.clone());
            grids.push(grid);
            if let Some(m) = merge {
                x = m.forward(&x, grid)?;
                grid = (grid.0.div_ceil(2), grid.1.div_ceil(2));
            }
        }
        let last_hidden_state = match &self.layernorm {
            Some(norm) => norm.forward(&x)?,
            None => x,
        };
        let pooled = last_hidden_state.mean(1)?;
        Ok(SwinOutput {
            stages,
            grids,
            last_hidden_state,
            pooled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;

    #[test]
    fn shift_mask_separates_wrapped_regions() -> Result<()> {
        // 8x8 grid, window 4, shift 2: the last window holds four regions of 4 tokens each
        let m = shift_mask(8, 8, 4, 2, &Device::Cpu)?;
        assert_eq!(m.dims(), &[4, 16, 16]);
        let first = m.get(0)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(first, 0.0, "the top-left window is one region");
        let last = m.get(3)?.to_vec2::<f32>()?;
        let allowed = last.iter().flatten().filter(|&&v| v == 0.0).count();
        assert_eq!(allowed, 4 * 16, "four regions of four tokens");
        Ok(())
    }

    #[test]
    fn windows_round_trip_and_every_parameter_gets_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8, 12, 3), &dev)?;
        let back = window_reverse(&window_partition(&x, 4)?, 4, 2, 8, 12)?;
        assert_eq!((back - &x)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);

        let map = VarMap::new();
        let cfg = SwinConfig::tiny();
        let swin = Swin::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
        let out = swin.forward(&Tensor::randn(0f32, 1.0, (2, 3, 56, 56), &dev)?)?;
        assert_eq!(out.grids, vec![(14, 14), (7, 7), (4, 4)]);
        assert_eq!(out.last_hidden_state.dims(), &[2, 16, 48]);
        let mut total = out.pooled.sqr()?.sum_all()?;
        for s in &out.stages {
            total = (total + s.sqr()?.mean_all()?)?;
        }
        let grads = total.backward()?;
        for (name, var) in map.data().lock().unwrap().iter() {
            let g = grads
                .get(var)
                .map(|g| g.abs()?.sum_all()?.to_scalar::<f32>())
                .transpose()?;
            assert!(
                g.is_some_and(|g| g.is_finite() && g > 0.0),
                "{name}: gradient {g:?}"
            );
        }
        Ok(())
    }
}
