//! QRNet's query-modulated visual backbone (`shared/methods.md` §2): a Swin whose every
//! stage output is refined by query-aware dynamic attention (QD-ATT) from the sentence
//! query, and a query-aware multiscale neck whose coarsest levels become the visual tokens.
//!
//! - [`DynamicLinear`]: `y = x·W(q) + b(q)` with `[W; b] = reshape(U(q)) · V`, `V` `[k, Cout]`
//!   zero-initialised (so a new QD-ATT starts as a fixed 0.5 gate and `U` gets its first
//!   gradient only once `V` has moved).
//! - [`QdAtt`]: channel gate `σ(MLP_q(avg_N x) + MLP_q(max_N x))` (shared two-layer dynamic
//!   MLP, reduction 16), then spatial gate `σ(DynLin(C→1)(x))` per token.
//! - [`QrNetBackbone`]: Swin blocks → QD-ATT after every stage (also the input of the next
//!   stage) → a layer norm per stage output → neck: lateral linear to `neck_dim` per level, top-down nearest-upsampled sums,
//!   bottom-up `out[i+1] += avgpool2x2(QD-ATT(out[i], q))` (query-aware soft merging), an
//!   extra level by stride-2 subsampling of the last; the last `token_levels` levels plus a
//!   learned scale embedding each are the visual tokens.
//!
//! Ours where the paper's code differs in form only: tokens are ordered coarse to fine (the
//! Dense head reads the finest used level as its grid; the fusion is order-free up to its
//! learned position embeddings); odd grids are zero-padded before 2x2 pooling.

use crate::nn::{sigmoid, LayerNorm};
use crate::swin::{Swin, SwinConfig};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// QRNet's visual side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QrNetConfig {
    pub swin: SwinConfig,
    /// Width of the sentence query (the text encoder's pooled [CLS]).
    pub query_dim: usize,
    /// Rank `k` of the dynamic layers' factorisation (30 in QRNet).
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Channel-gate MLP reduction (16).
    #[serde(default = "default_reduction")]
    pub reduction: usize,
    /// Ablation switches: the channel gate, the spatial gate, and the query-aware
    /// bottom-up merging of the neck (off: plain 2x2 average pooling).
    #[serde(default = "yes")]
    pub channel: bool,
    #[serde(default = "yes")]
    pub spatial: bool,
    #[serde(default = "yes")]
    pub neck: bool,
    /// Width of the neck's levels (256).
    #[serde(default = "default_neck_dim")]
    pub neck_dim: usize,
    /// How many of the coarsest levels (stages + the extra level) become tokens (2).
    #[serde(default = "default_token_levels")]
    pub token_levels: usize,
}

fn default_rank() -> usize {
    30
}
fn default_reduction() -> usize {
    16
}
fn yes() -> bool {
    true
}
fn default_neck_dim() -> usize {
    256
}
fn default_token_levels() -> usize {
    2
}

impl QrNetConfig {
    /// QRNet: Swin-S, BERT-base query, neck 256, the last two levels as tokens.
    pub fn swin_s() -> Self {
        Self {
            swin: SwinConfig::swin_s(),
            query_dim: 768,
            rank: 30,
            reduction: 16,
            channel: true,
            spatial: true,
            neck: true,
            neck_dim: 256,
            token_levels: 2,
        }
    }

    /// The same with Swin-T.
    pub fn swin_t() -> Self {
        Self {
            swin: SwinConfig::swin_t(),
            ..Self::swin_s()
        }
    }

    /// A small one for tests and the benchmark (tiny Swin, neck 32).
    pub fn tiny(query_dim: usize) -> Self {
        Self {
            swin: SwinConfig::tiny(),
            query_dim,
            rank: 8,
            reduction: 4,
            neck_dim: 32,
            ..Self::swin_s()
        }
    }

    /// Number of neck levels: every stage plus the extra one.
    pub fn levels(&self) -> usize {
        self.swin.depths.len() + 1
    }

    /// Grids of every level for a square input of side `s`.
    pub fn grids(&self, s: usize) -> Vec<(usize, usize)> {
        let mut g = s.div_ceil(self.swin.patch_size);
        let mut out = Vec::new();
        for _ in 0..self.levels() {
            out.push((g, g));
            g = g.div_ceil(2);
        }
        out
    }

    /// Visual tokens for a square input of side `s`.
    pub fn tokens(&self, s: usize) -> usize {
        let g = self.grids(s);
        g[g.len() - self.token_levels..]
            .iter()
            .map(|(h, w)| h * w)
            .sum()
    }
}

/// A linear layer whose weights are generated from a query (QRNet's `DynamicLinear`).
#[derive(Debug, Clone)]
pub struct DynamicLinear {
    u: Linear,
    v: Tensor,
    cin: usize,
    rank: usize,
}

impl DynamicLinear {
    /// Keys `u.{weight,bias}`, `v` (`[k, cout]`, zeros).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        cin: usize,
        cout: usize,
        rank: usize,
    ) -> Result<Self> {
        Ok(Self {
            u: candle_nn::linear(query_dim, (cin + 1) * rank, vb.pp("u"))?,
            v: vb.get_with_hints((rank, cout), "v", candle_nn::Init::Const(0.0))?,
            cin,
            rank,
        })
    }

    /// `x: [B, N, cin]`, `q: [B, Dq]` -> `[B, N, cout]`.
    pub fn forward(&self, x: &Tensor, q: &Tensor) -> Result<Tensor> {
        let b = q.dim(0)?;
        let p = self
            .u
            .forward(q)?
            .reshape((b, self.cin + 1, self.rank))?
            .broadcast_matmul(&self.v)?; // [B, cin + 1, cout]
        let w = p.narrow(1, 0, self.cin)?;
        let bias = p.narrow(1, self.cin, 1)?; // [B, 1, cout]
        x.matmul(&w)?.broadcast_add(&bias)
    }
}

/// Query-aware dynamic attention: a channel gate then a spatial gate, both from the query.
#[derive(Debug, Clone)]
pub struct QdAtt {
    channel: Option<(DynamicLinear, DynamicLinear)>,
    spatial: Option<DynamicLinear>,
}

impl QdAtt {
    /// Keys `channel.{0,1}.*`, `spatial.*`.
    pub fn new(vb: VarBuilder, dim: usize, cfg: &QrNetConfig) -> Result<Self> {
        let (q, k) = (cfg.query_dim, cfg.rank);
        let hidden = (dim / cfg.reduction).max(1);
        Ok(Self {
            channel: if cfg.channel {
                Some((
                    DynamicLinear::new(vb.pp("channel.0"), q, dim, hidden, k)?,
                    DynamicLinear::new(vb.pp("channel.1"), q, hidden, dim, k)?,
                ))
            } else {
                None
            },
            spatial: if cfg.spatial {
                Some(DynamicLinear::new(vb.pp("spatial"), q, dim, 1, k)?)
            } else {
                None
            },
        })
    }

    /// `x: [B, N, C]`, `q: [B, Dq]` -> `[B, N, C]`.
    pub fn forward(&self, x: &Tensor, q: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some((l1, l2)) = &self.channel {
            let mlp = |p: Tensor| -> Result<Tensor> {
                l2.forward(&crate::nn::relu(&l1.forward(&p, q)?)?, q)
            };
            let avg = x.mean_keepdim(1)?; // [B, 1, C]
            let max = x.max_keepdim(1)?;
            let gate = sigmoid(&(mlp(avg)? + mlp(max)?)?)?;
            x = x.broadcast_mul(&gate)?;
        }
        if let Some(s) = &self.spatial {
            let gate = sigmoid(&s.forward(&x, q)?)?; // [B, N, 1]
            x = x.broadcast_mul(&gate)?;
        }
        Ok(x)
    }
}

/// PyTorch's `nearest` source indices for resizing `from` to `n`: `floor(i · from / n)`.
fn nearest_index(n: usize, from: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u32> = (0..n).map(|i| (i * from / n) as u32).collect();
    Tensor::from_vec(v, n, dev)
}

/// Nearest-neighbour resize of `[B, H, W, C]` to `(h, w)`, by gathers so it differentiates
/// for any sizes.
fn resize_nearest(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (_, hi, wi, _) = x.dims4()?;
    x.index_select(&nearest_index(h, hi, x.device())?, 1)?
        .index_select(&nearest_index(w, wi, x.device())?, 2)
}

/// 2x2 average pooling of `[B, H, W, C]`, odd sides zero-padded: `[B, ⌈H/2⌉, ⌈W/2⌉, C]`.
fn avg_pool2(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    x.pad_with_zeros(1, 0, 2 * h2 - h)?
        .pad_with_zeros(2, 0, 2 * w2 - w)?
        .reshape((b, h2, 2, w2, 2, c))?
        .sum(4)?
        .sum(2)?
        .affine(0.25, 0.0)
}

/// QRNet's visual backbone (keys: `swin.*`, `qdatt.{i}.*`, `out_norm.{i}`, `lateral.{i}`, `merge.{i}.*`,
/// `scale_embed`).
#[derive(Debug, Clone)]
pub struct QrNetBackbone {
    swin: Swin,
    /// Each stage output's layer norm (mmdet's `norm{i}`), before the neck.
    out_norm: Vec<LayerNorm>,
    qdatt: Vec<QdAtt>,
    lateral: Vec<Linear>,
    /// Bottom-up merging of level `i` into `i + 1` (none: plain pooling).
    merge: Vec<Option<QdAtt>>,
    scale_embed: Tensor,
    cfg: QrNetConfig,
}

/// What [`QrNetBackbone::forward`] returns.
#[derive(Debug, Clone)]
pub struct QrNetOutput {
    /// `[B, N, neck_dim]`: the last `token_levels` levels, coarsest first, each with its
    /// scale embedding.
    pub tokens: Tensor,
    /// Grids of the token levels, coarsest first (the finest is the last `H*W` tokens).
    pub grids: Vec<(usize, usize)>,
    /// The refined stage outputs `[B, H_i*W_i, C_i]`.
    pub stages: Vec<Tensor>,
}

impl QrNetBackbone {
    pub fn new(vb: VarBuilder, cfg: &QrNetConfig) -> Result<Self> {
        let n = cfg.swin.depths.len();
        if cfg.token_levels == 0 || cfg.token_levels > cfg.levels() {
            candle_core::bail!(
                "qrnet: token_levels {} must be in 1..={}",
                cfg.token_levels,
                cfg.levels()
            );
        }
        let d = cfg.neck_dim;
        Ok(Self {
            swin: Swin::backbone(vb.pp("swin"), &cfg.swin)?,
            out_norm: (0..n)
                .map(|i| {
                    LayerNorm::new(
                        vb.pp(format!("out_norm.{i}")),
                        cfg.swin.stage_dim(i),
                        cfg.swin.layer_norm_eps,
                    )
                })
                .collect::<Result<_>>()?,
            qdatt: (0..n)
                .map(|i| QdAtt::new(vb.pp(format!("qdatt.{i}")), cfg.swin.stage_dim(i), cfg))
                .collect::<Result<_>>()?,
            lateral: (0..n)
                .map(|i| candle_nn::linear(cfg.swin.stage_dim(i), d, vb.pp(format!("lateral.{i}"))))
                .collect::<Result<_>>()?,
            merge: (0..n - 1)
                .map(|i| {
                    cfg.neck
                        .then(|| QdAtt::new(vb.pp(format!("merge.{i}")), d, cfg))
                        .transpose()
                })
                .collect::<Result<_>>()?,
            scale_embed: vb.get_with_hints(
                (cfg.token_levels, d),
                "scale_embed",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            cfg: cfg.clone(),
        })
    }

    /// `pixels: [B, 3, S, S]`, `query: [B, Dq]`.
    pub fn forward(&self, pixels: &Tensor, query: &Tensor) -> Result<QrNetOutput> {
        let out = self
            .swin
            .forward_with(pixels, |i, x, _| self.qdatt[i].forward(&x, query))?;
        let b = pixels.dim(0)?;
        let d = self.cfg.neck_dim;
        // lateral projections, channels-last maps
        let mut maps: Vec<Tensor> = out
            .stages
            .iter()
            .zip(&out.grids)
            .zip(self.lateral.iter().zip(&self.out_norm))
            .map(|((x, &(h, w)), (lat, norm))| {
                lat.forward(&norm.forward(x)?)?.reshape((b, h, w, d))
            })
            .collect::<Result<_>>()?;
        // top-down
        for i in (0..maps.len() - 1).rev() {
            let (_, h, w, _) = maps[i].dims4()?;
            maps[i] = (&maps[i] + resize_nearest(&maps[i + 1], (h, w))?)?;
        }
        // bottom-up, query-aware soft merging
        for i in 0..maps.len() - 1 {
            let src = match &self.merge[i] {
                Some(att) => {
                    let (_, h, w, _) = maps[i].dims4()?;
                    att.forward(&maps[i].reshape((b, h * w, d))?, query)?
                        .reshape((b, h, w, d))?
                }
                None => maps[i].clone(),
            };
            let pooled = avg_pool2(&src)?;
            maps[i + 1] = (&maps[i + 1] + pooled)?;
        }
        // extra level: stride-2 subsampling of the last
        let last = maps.last().expect("at least one stage").clone();
        let (_, h, w, _) = last.dims4()?;
        let even = |n: usize| {
            Tensor::from_vec(
                (0..n).step_by(2).map(|i| i as u32).collect::<Vec<_>>(),
                n.div_ceil(2),
                last.device(),
            )
        };
        maps.push(
            last.index_select(&even(h)?, 1)?
                .index_select(&even(w)?, 2)?,
        );
        // the last token_levels levels, coarsest first, with scale embeddings
        let used = &maps[maps.len() - self.cfg.token_levels..];
        let mut tokens = Vec::new();
        let mut grids = Vec::new();
        for (j, m) in used.iter().enumerate().rev() {
            let (_, h, w, _) = m.dims4()?;
            let e = self.scale_embed.narrow(0, j, 1)?; // [1, d]
            tokens.push(m.reshape((b, h * w, d))?.broadcast_add(&e)?);
            grids.push((h, w));
        }
        Ok(QrNetOutput {
            tokens: Tensor::cat(&tokens, 1)?,
            grids,
            stages: out.stages,
        })
    }
}

/// `[B, S, S]` pixel mask -> `[B, gh*gw]` by nearest sampling (any grid size).
pub fn grid_mask(pixel_mask: &Tensor, (gh, gw): (usize, usize)) -> Result<Tensor> {
    let (b, h, w) = pixel_mask.dims3()?;
    let dev = pixel_mask.device();
    pixel_mask
        .index_select(&nearest_index(gh, h, dev)?, 1)?
        .index_select(&nearest_index(gw, w, dev)?, 2)?
        .reshape((b, gh * gw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn nearest_resize_and_pooling_match_torch_conventions() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12.0, &dev)?.reshape((1, 3, 4, 1))?;
        // 3x4 -> 7x5: rows floor(i*3/7) = 0,0,0,1,1,2,2; cols floor(j*4/5) = 0,0,1,2,3
        let r = resize_nearest(&x, (7, 5))?
            .squeeze(3)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        assert_eq!(r[0], vec![0., 0., 1., 2., 3.]);
        assert_eq!(r[3], vec![4., 4., 5., 6., 7.]);
        assert_eq!(r[6], vec![8., 8., 9., 10., 11.]);
        let p = avg_pool2(&x)?.squeeze(3)?.squeeze(0)?.to_vec2::<f32>()?;
        // rows {0,1}, {2, pad}: (0+1+4+5)/4, ...; (8+9+0+0)/4
        assert_eq!(p, vec![vec![2.5, 4.5], vec![4.25, 5.25]]);
        Ok(())
    }

    #[test]
    fn fresh_qdatt_is_a_half_gate_and_every_part_learns() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = QrNetConfig::tiny(16);
        let net = QrNetBackbone::new(vb, &cfg)?;
        let px = Tensor::randn(0f32, 1.0, (2, 3, 56, 56), &dev)?;
        let q = Tensor::randn(0f32, 1.0, (2, 16), &dev)?;
        // V = 0: both gates are 0.5, so QD-ATT scales by 1/4
        let x = Tensor::randn(0f32, 1.0, (2, 5, 12), &dev)?;
        let y = net.qdatt[0].forward(&x, &q)?;
        let err = (y - (&x * 0.25)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        let out = net.forward(&px, &q)?;
        // levels 14, 7, 4, extra 2; tokens: 4x4 then 2x2, coarsest first
        assert_eq!(out.grids, vec![(2, 2), (4, 4)]);
        assert_eq!(out.tokens.dims(), &[2, 4 + 16, 32]);
        assert_eq!(cfg.tokens(56), 20);
        // move every V off zero (at init U's gradient is zero by design), then all learn
        for (name, var) in map.data().lock().unwrap().iter() {
            if name.ends_with(".v") {
                var.set(&Tensor::randn(0f32, 0.1, var.shape(), &dev)?)?;
            }
        }
        let out = net.forward(&px, &q)?;
        let grads = out.tokens.sqr()?.mean_all()?.backward()?;
        for (name, var) in map.data().lock().unwrap().iter() {
            let g = grads
                .get(var)
                .map(|g| g.abs()?.sum_all()?.to_scalar::<f32>())
                .transpose()?;
            assert!(g.is_some_and(|g| g.is_finite() && g > 0.0), "{name}: {g:?}");
        }
        Ok(())
    }

    #[test]
    fn switches_remove_their_parameters() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let cfg = QrNetConfig {
            channel: false,
            neck: false,
            ..QrNetConfig::tiny(16)
        };
        QrNetBackbone::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
        let names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
        assert!(names.iter().any(|n| n.starts_with("qdatt.0.spatial")));
        assert!(!names
            .iter()
            .any(|n| n.contains("channel") || n.starts_with("merge")));
        Ok(())
    }
}
