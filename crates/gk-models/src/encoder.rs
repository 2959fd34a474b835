//! The transformer encoder layer of DETR and TransVG (`nn.MultiheadAttention` key names,
//! position codes added to queries and keys only), post-norm or pre-norm, shared by the
//! visual-linguistic fusion ([`crate::grounder`]) and DETR's visual encoder
//! ([`crate::detr`]).
//!
//! Port of DETR `models/transformer.py` `TransformerEncoderLayer`
//! (<https://github.com/facebookresearch/detr/blob/main/models/transformer.py>), which
//! TransVG copies into `models/visual_model/transformer.py` and `models/vl_transformer.py`.

use crate::nn::{self, LayerNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// A stack of encoder layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn: usize,
    pub dropout: f32,
    /// Pre-norm (HiVG, `--normalize_before`) adds a final layer norm; post-norm is TransVG.
    pub pre_norm: bool,
}

impl EncoderConfig {
    /// DETR's and TransVG's encoders: 6 post-norm layers of width 256, 8 heads, FFN 2048,
    /// dropout 0.1.
    pub fn detr() -> Self {
        Self {
            hidden: 256,
            layers: 6,
            heads: 8,
            ffn: 2048,
            dropout: 0.1,
            pre_norm: false,
        }
    }
}

/// One encoder layer with `nn.MultiheadAttention` key names (`self_attn.in_proj_weight`,
/// `self_attn.out_proj`, `linear1`, `linear2`, `norm1`, `norm2`), so TransVG checkpoints map.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    linear1: Linear,
    linear2: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    heads: usize,
    dropout: f32,
    pre_norm: bool,
}

impl EncoderLayer {
    pub fn new(vb: VarBuilder, cfg: &EncoderConfig) -> Result<Self> {
        let d = cfg.hidden;
        let bound = (6.0 / (d + 3 * d) as f64).sqrt(); // xavier_uniform on [3d, d]
        let att = vb.pp("self_attn");
        Ok(Self {
            in_proj_weight: att.get_with_hints(
                (3 * d, d),
                "in_proj_weight",
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?,
            in_proj_bias: att.get_with_hints(3 * d, "in_proj_bias", candle_nn::Init::Const(0.0))?,
            out_proj: candle_nn::linear(d, d, att.pp("out_proj"))?,
            linear1: candle_nn::linear(d, cfg.ffn, vb.pp("linear1"))?,
            linear2: candle_nn::linear(cfg.ffn, d, vb.pp("linear2"))?,
            norm1: LayerNorm::new(vb.pp("norm1"), d, 1e-5)?,
            norm2: LayerNorm::new(vb.pp("norm2"), d, 1e-5)?,
            heads: cfg.heads,
            dropout: cfg.dropout,
            pre_norm: cfg.pre_norm,
        })
    }

    /// `x: [B, T, d]` through rows `i*d..(i+1)*d` of the packed projection, as one 2-D matmul.
    fn proj(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let w = self.in_proj_weight.narrow(0, i * d, d)?;
        let bias = self.in_proj_bias.narrow(0, i * d, d)?;
        x.reshape((b * t, d))?
            .matmul(&w.t()?)?
            .broadcast_add(&bias)?
            .reshape((b, t, d))
    }

    fn drop(&self, x: Tensor) -> Result<Tensor> {
        nn::dropout(&x, self.dropout)
    }

    /// Self-attention with `pos` added to queries and keys (not values).
    fn attend(&self, x: &Tensor, pos: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let qk_in = x.broadcast_add(pos)?;
        let (q, k, v) = (
            self.proj(&qk_in, 0)?,
            self.proj(&qk_in, 1)?,
            self.proj(x, 2)?,
        );
        self.out_proj
            .forward(&nn::attention(&q, &k, &v, self.heads, Some(bias))?)
    }

    fn ffn(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.drop(nn::relu(&self.linear1.forward(x)?)?)?;
        self.linear2.forward(&h)
    }

    /// `x: [B, T, d]`, `pos: [1, T, d]` (or `[B, T, d]`), `bias: [B, 1, 1, T]`.
    pub fn forward(&self, x: &Tensor, pos: &Tensor, bias: &Tensor) -> Result<Tensor> {
        if self.pre_norm {
            let x = (x + self.drop(self.attend(&self.norm1.forward(x)?, pos, bias)?)?)?;
            &x + self.drop(self.ffn(&self.norm2.forward(&x)?)?)?
        } else {
            let x = self
                .norm1
                .forward(&(x + self.drop(self.attend(x, pos, bias)?)?)?)?;
            self.norm2.forward(&(&x + self.drop(self.ffn(&x)?)?)?)
        }
    }
}
