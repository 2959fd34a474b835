//! HiVG's visual side (`shared/methods.md` §3.1): a CLIP vision tower with the multi-layer
//! adaptive cross-modal bridge inside chosen layers, and multi-level visual features.
//!
//! - **Bridge** in vision layer `l` (after its self-attention residual, before its MLP):
//!   the text hidden states of the chosen text layers `T_k` `[B, L, Ct]`, each reweighted per
//!   token by learned adaptive weights `E_k` `[L, Ct]` as `E_k ⊙ T_k + T_k`, concatenated and
//!   projected by the gate (`Ct·n → Cv`) into `T̃`; then `h ← h + MLP(CrossAttn(LN(h), T̃))`
//!   with CLIP-style multi-head cross-attention (queries from the image tokens) and a
//!   QuickGELU MLP `Cv → 4Cv → Cv`.
//! - **Multi-level features**: the hidden states after the chosen vision layers, each layer
//!   normed (`ml_norm.{i}`, ours), concatenated over channels and projected
//!   (`ml_visual_projection`, `n·Cv → proj_dim`).
//!
//! Ours, where the public code differs: the cross-attention runs **per sample** with the
//! text padding masked (HiVG's code reinterprets its `L×B` text buffer as `B×L`, which mixes
//! text across the samples of a batch); the MLP's output layer starts at zero and `E_k` at
//! zero, so a fresh bridge leaves the pretrained CLIP unchanged. HiVG projects the raw
//! hidden states, whose scale grows with depth (the benchmark teacher's: rms 1.0 after the
//! embeddings, 3.0 and 4.6 after layers 2 and 4); its box head reads the fusion's final
//! norm and does not mind, but our dense head scores the projected tokens directly and the
//! raw scale put its initial cell logits far apart (cell loss 7.8 over 64 cells against a
//! uniform 4.2); a layer norm per level (weight 1, bias 0) fixes the scale.
//!
//! Keys: the CLIP tower's own (`embeddings.*`, `pre_layrnorm`, `encoder.layers.*`,
//! `post_layernorm`), then `bridge.{j}.{adaptive.{k}, gate, cross_norm,
//! cross_attn.{q,k,v,out}_proj (a CLIP attention run as cross-attention), cross_mlp.fc1,
//! cross_mlp.fc2}`, `ml_norm.{i}` and `ml_visual_projection`. LoRA sets of the vision config
//! also land on the bridge's attention projections (HiVG's LoRA targets match them by name).

use crate::clip::{ClipAttention, ClipMlp, ClipVisionConfig, ClipVisionTransformer};
use crate::lora::LoraLinear;
use crate::nn::{self, Activation, LayerNorm};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// HiVG's visual encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HivgConfig {
    pub vision: ClipVisionConfig,
    /// Vision layers (0-based) with a bridge: `[0, 3, 7, 11]` for ViT-B.
    pub bridge_layers: Vec<usize>,
    /// Text hidden states feeding every bridge (0 = the embeddings; `[12]` = the last layer
    /// of a 12-layer tower).
    pub text_layers: Vec<usize>,
    /// Vision hidden states concatenated into the multi-level feature (`[1, 4, 8, 12]`).
    pub multi_layers: Vec<usize>,
    /// Width of the text hidden states.
    pub text_dim: usize,
    /// Text length (rows of the adaptive weights).
    pub text_len: usize,
    /// Output width of `ml_visual_projection`.
    pub proj_dim: usize,
    /// CLIP's embedding width for HiVG's contrastive term (the grounder then holds CLIP's
    /// `visual_projection`, `text_projection` and `logit_scale`); 0 = no term.
    #[serde(default)]
    pub contrastive_dim: usize,
}

impl HivgConfig {
    /// HiVG-B/16 (RefCOCO: the last text layer into every bridge).
    pub fn clip_b16() -> Self {
        Self {
            vision: ClipVisionConfig::vit_base_patch16(),
            bridge_layers: vec![0, 3, 7, 11],
            text_layers: vec![12],
            multi_layers: vec![1, 4, 8, 12],
            text_dim: 512,
            text_len: 77,
            proj_dim: 512,
            contrastive_dim: 512,
        }
    }

    /// A tiny one over a tiny CLIP (2 layers): a bridge in both, both hidden states.
    pub fn tiny(text_dim: usize, text_len: usize) -> Self {
        Self {
            vision: ClipVisionConfig::tiny(),
            bridge_layers: vec![0, 1],
            text_layers: vec![1, 2],
            multi_layers: vec![1, 2],
            text_dim,
            text_len,
            proj_dim: 32,
            contrastive_dim: 16,
        }
    }
}

/// One bridge.
#[derive(Debug, Clone)]
struct Bridge {
    adaptive: Vec<Tensor>,
    gate: Linear,
    cross_norm: LayerNorm,
    cross_attn: ClipAttention,
    cross_mlp: ClipMlp,
}

impl Bridge {
    fn new(vb: VarBuilder, cfg: &HivgConfig) -> Result<Self> {
        let v = &cfg.vision;
        let c = v.hidden_size;
        let mlp = vb.pp("cross_mlp");
        // the output layer at zero: a fresh bridge adds nothing
        let fc1 = candle_nn::linear(c, 4 * c, mlp.pp("fc1"))?;
        let fc2 = Linear::new(
            mlp.pp("fc2")
                .get_with_hints((c, 4 * c), "weight", candle_nn::Init::Const(0.0))?,
            Some(
                mlp.pp("fc2")
                    .get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?,
            ),
        );
        Ok(Self {
            adaptive: (0..cfg.text_layers.len())
                .map(|k| {
                    vb.pp("adaptive").get_with_hints(
                        (cfg.text_len, cfg.text_dim),
                        &k.to_string(),
                        candle_nn::Init::Const(0.0),
                    )
                })
                .collect::<Result<_>>()?,
            gate: candle_nn::linear(cfg.text_dim * cfg.text_layers.len(), c, vb.pp("gate"))?,
            cross_norm: LayerNorm::new(vb.pp("cross_norm"), c, v.layer_norm_eps)?,
            cross_attn: ClipAttention::new(vb.pp("cross_attn"), c, v.num_attention_heads, &v.lora)?,
            cross_mlp: ClipMlp::from_parts(
                LoraLinear::plain(fc1),
                LoraLinear::plain(fc2),
                Activation::QuickGelu,
            ),
        })
    }

    /// The bridge's text `T̃ = gate(concat_k(E_k ⊙ T_k + T_k))`: `[B, L, Cv]` for any
    /// `L <= text_len` (the grounder cuts slots past a batch's longest expression).
    fn text(&self, texts: &[&Tensor]) -> Result<Tensor> {
        let parts = texts
            .iter()
            .zip(&self.adaptive)
            .map(|(t, e)| t.broadcast_mul(&e.narrow(0, 0, t.dim(1)?)?)? + *t)
            .collect::<Result<Vec<_>>>()?;
        self.gate.forward(&Tensor::cat(&parts, D::Minus1)?)
    }

    /// `h + MLP(CrossAttn(LN(h), T̃))`.
    fn forward(&self, h: &Tensor, t: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let a = self
            .cross_attn
            .forward_kv(&self.cross_norm.forward(h)?, t, Some(bias))?;
        h + self.cross_mlp.forward(&a)?
    }

    fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            cross_attn: self.cross_attn.merge_lora()?,
            ..self.clone()
        })
    }
}

/// HiVG's visual encoder: CLIP vision + bridges + multi-level projection.
#[derive(Debug, Clone)]
pub struct HivgVisual {
    pub clip: ClipVisionTransformer,
    bridges: Vec<Bridge>,
    ml_norms: Vec<LayerNorm>,
    ml_visual_projection: Linear,
    cfg: HivgConfig,
}

/// What [`HivgVisual::forward`] returns.
#[derive(Debug, Clone)]
pub struct HivgOutput {
    /// `[B, 1 + N, proj_dim]`: CLS and patches, multi-level and projected.
    pub tokens: Tensor,
    /// `[B, Cv]`: `post_layernorm` of the last CLS (CLIP's pooled output).
    pub pooled: Tensor,
    /// Embeddings then every layer's output, bridges included.
    pub hidden_states: Vec<Tensor>,
}

impl HivgVisual {
    pub fn new(vb: VarBuilder, cfg: &HivgConfig) -> Result<Self> {
        let n = cfg.vision.num_hidden_layers;
        if let Some(&bad) = cfg.bridge_layers.iter().find(|&&l| l >= n) {
            candle_core::bail!("hivg: bridge layer {bad} but the vision tower has {n} layers");
        }
        if let Some(&bad) = cfg.multi_layers.iter().find(|&&l| l > n) {
            candle_core::bail!("hivg: multi-level hidden state {bad} of {n} layers");
        }
        if cfg.text_layers.is_empty() || cfg.multi_layers.is_empty() {
            candle_core::bail!("hivg: text_layers and multi_layers must not be empty");
        }
        Ok(Self {
            clip: ClipVisionTransformer::new(vb.clone(), &cfg.vision)?,
            bridges: (0..cfg.bridge_layers.len())
                .map(|j| Bridge::new(vb.pp(format!("bridge.{j}")), cfg))
                .collect::<Result<_>>()?,
            ml_norms: (0..cfg.multi_layers.len())
                .map(|i| {
                    let (c, eps) = (cfg.vision.hidden_size, cfg.vision.layer_norm_eps);
                    LayerNorm::new(vb.pp(format!("ml_norm.{i}")), c, eps)
                })
                .collect::<Result<_>>()?,
            ml_visual_projection: candle_nn::linear(
                cfg.vision.hidden_size * cfg.multi_layers.len(),
                cfg.proj_dim,
                vb.pp("ml_visual_projection"),
            )?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &HivgConfig {
        &self.cfg
    }

    /// `pixels: [B, 3, S, S]`; `text_hidden`: the text tower's hidden states (embeddings
    /// first), `text_mask: [B, L]` (1 = token).
    pub fn forward(
        &self,
        pixels: &Tensor,
        text_hidden: &[Tensor],
        text_mask: &Tensor,
    ) -> Result<HivgOutput> {
        let texts: Vec<&Tensor> = self
            .cfg
            .text_layers
            .iter()
            .map(|&l| {
                text_hidden.get(l).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "hivg: text hidden state {l} of {}",
                        text_hidden.len()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let bias = nn::key_padding_bias(text_mask, pixels.dtype())?; // [B, 1, 1, L]
        let mut x = self.clip.embed(pixels)?;
        let mut hidden = vec![x.clone()];
        for (l, layer) in self.clip.layers.iter().enumerate() {
            x = layer.attn_block(&x, None)?;
            if let Some(j) = self.cfg.bridge_layers.iter().position(|&b| b == l) {
                let t = self.bridges[j].text(&texts)?;
                x = self.bridges[j].forward(&x, &t, &bias)?;
            }
            x = layer.mlp_block(&x)?;
            hidden.push(x.clone());
        }
        let levels = self
            .cfg
            .multi_layers
            .iter()
            .zip(&self.ml_norms)
            .map(|(&i, norm)| norm.forward(&hidden[i]))
            .collect::<Result<Vec<_>>>()?;
        let tokens = self
            .ml_visual_projection
            .forward(&Tensor::cat(&levels, D::Minus1)?)?;
        let pooled = self.clip.post_layernorm(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(HivgOutput {
            tokens,
            pooled,
            hidden_states: hidden,
        })
    }

    /// LoRA folded into CLIP and the bridges.
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            clip: self.clip.merge_lora()?,
            bridges: self
                .bridges
                .iter()
                .map(Bridge::merge_lora)
                .collect::<Result<_>>()?,
            ..self.clone()
        })
    }
}

/// HiVG's auxiliary heads on the fused tokens (keys `token_norm`, `token_mlp.{fc1,fc2}`,
/// `seg_head.{0,1,2}`): the similarity of every fused patch token (layer norm, then a
/// QuickGELU MLP `d → 6d → d`) to the L2-normalised fused text token that ends the
/// expression, and a mask head that upsamples the fused patch grid 8x with three
/// stride-2 transposed convolutions of kernel 2 (each a per-token linear map to a 2x2
/// block; widths d → d/2 → d/4 → d, ReLU between) and dots every pixel with that token.
#[derive(Debug, Clone)]
pub struct HivgAuxHeads {
    token_norm: LayerNorm,
    token_mlp: ClipMlp,
    seg_head: Vec<Linear>,
}

/// What the auxiliary heads give.
#[derive(Debug, Clone)]
pub struct HivgAux {
    /// `[B, gh * gw]` patch-text similarities (logits).
    pub token_sim: Tensor,
    /// `[B, 8gh * 8gw]` mask logits and their grid.
    pub seg: Tensor,
    pub seg_grid: (usize, usize),
}

impl HivgAuxHeads {
    pub fn new(vb: VarBuilder, d: usize) -> Result<Self> {
        let widths = [d, d / 2, d / 4, d];
        Ok(Self {
            token_norm: LayerNorm::new(vb.pp("token_norm"), d, 1e-5)?,
            token_mlp: ClipMlp::new(vb.pp("token_mlp"), d, 6 * d, Activation::QuickGelu, &[])?,
            seg_head: (0..3)
                .map(|i| {
                    candle_nn::linear(widths[i], 4 * widths[i + 1], vb.pp(format!("seg_head.{i}")))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// `visual: [B, N, d]` fused visual tokens (the last `gh * gw` are the patches), `text:
    /// [B, L, d]` fused text tokens, `text_mask: [B, L]`.
    pub fn forward(
        &self,
        visual: &Tensor,
        text: &Tensor,
        text_mask: &Tensor,
        (gh, gw): (usize, usize),
    ) -> Result<HivgAux> {
        let (b, n, d) = visual.dims3()?;
        let last: Vec<u32> = text_mask
            .sum(1)?
            .to_vec1::<f32>()?
            .iter()
            .map(|&s| (s as u32).saturating_sub(1))
            .collect();
        let idx = Tensor::from_vec(last, (b, 1, 1), visual.device())?
            .broadcast_as((b, 1, d))?
            .contiguous()?;
        let eos = text.contiguous()?.gather(&idx, 1)?.squeeze(1)?; // [B, d]
        let e = nn::l2_normalize(&eos)?.unsqueeze(2)?; // [B, d, 1]
        let patches = visual.narrow(1, n - gh * gw, gh * gw)?;
        let v = self
            .token_mlp
            .forward(&self.token_norm.forward(&patches)?)?;
        let token_sim = v.matmul(&e)?.squeeze(2)?; // [B, gh*gw]
        let (mut h, mut w) = (gh, gw);
        let mut x = patches.reshape((b, h, w, d))?;
        for (i, up) in self.seg_head.iter().enumerate() {
            let c = up.weight().dim(0)? / 4;
            x = up
                .forward(&x)?
                .reshape((b, h, w, 2, 2, c))?
                .permute((0, 1, 3, 2, 4, 5))?
                .contiguous()?
                .reshape((b, 2 * h, 2 * w, c))?;
            (h, w) = (2 * h, 2 * w);
            if i < 2 {
                x = crate::nn::relu(&x)?;
            }
        }
        let seg = x
            .reshape((b, h * w, d))?
            .matmul(&eos.unsqueeze(2)?)?
            .squeeze(2)?;
        Ok(HivgAux {
            token_sim,
            seg,
            seg_grid: (h, w),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn inputs(dev: &Device) -> Result<(Tensor, Vec<Tensor>, Tensor)> {
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), dev)?;
        let text: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1.0, (2, 6, 24), dev))
            .collect::<Result<_>>()?;
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 1., 1.], [1., 1., 1., 0., 0., 0.]], dev)?;
        Ok((pixels, text, mask))
    }

    #[test]
    fn a_fresh_bridge_leaves_clip_unchanged_and_samples_do_not_mix() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let cfg = HivgConfig::tiny(24, 6);
        let net = HivgVisual::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
        let (px, text, mask) = inputs(&dev)?;
        let out = net.forward(&px, &text, &mask)?;
        let plain = net.clip.forward(&px)?;
        for (a, b) in out.hidden_states.iter().zip(&plain.hidden_states) {
            assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        }
        // give the bridges weight, then: sample 0's output does not depend on sample 1's
        // text, nor on sample 1's padded tokens
        for (name, var) in map.data().lock().unwrap().iter() {
            if name.contains("fc2") || name.contains("adaptive") {
                var.set(&Tensor::randn(0f32, 0.2, var.shape(), &dev)?)?;
            }
        }
        let a = net.forward(&px, &text, &mask)?.tokens;
        let mut changed = text.clone();
        for t in changed.iter_mut() {
            let pad = Tensor::randn(0f32, 1.0, (1, 3, 24), &dev)?;
            let s1 = Tensor::cat(&[&t.get(1)?.unsqueeze(0)?.narrow(1, 0, 3)?, &pad], 1)?;
            *t = Tensor::cat(&[&t.get(0)?.unsqueeze(0)?, &s1], 0)?;
        }
        let b = net.forward(&px, &changed, &mask)?.tokens;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "padded text tokens changed the output by {d}");
        let mut other = text.clone();
        for t in other.iter_mut() {
            let noise = Tensor::randn(0f32, 1.0, (1, 6, 24), &dev)?;
            *t = Tensor::cat(&[&t.get(0)?.unsqueeze(0)?, &noise], 0)?;
        }
        let c = net.forward(&px, &other, &mask)?.tokens;
        let a = net.forward(&px, &text, &mask)?.tokens;
        let d0 = (a.get(0)? - c.get(0)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let d1 = (a.get(1)? - c.get(1)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(
            d0 == 0.0 && d1 > 1e-3,
            "sample 0 moved {d0}, sample 1 moved {d1}"
        );
        Ok(())
    }
}
