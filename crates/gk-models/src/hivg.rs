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
//! Ours, where the public code differs ([`BridgeMode`] and `level_norm` select HiVG's own
//! behaviour, which imported checkpoints use): the cross-attention runs **per sample** with
//! the text padding masked (HiVG's code attends to all 77 positions unmasked and
//! reinterprets its `L×B` text buffer as `B×L`, which mixes text across the samples of a
//! batch); the MLP's output layer starts at zero and `E_k` at
//! zero, so a fresh bridge leaves the pretrained CLIP unchanged. HiVG projects the raw
//! hidden states, whose scale grows with depth (the benchmark teacher's: rms 1.0 after the
//! embeddings, 3.0 and 4.6 after layers 2 and 4); its box head reads the fusion's final
//! norm and does not mind, but our dense head scores the projected tokens directly and the
//! raw scale put its initial cell logits far apart (cell loss 7.8 over 64 cells against a
//! uniform 4.2); a layer norm per level (weight 1, bias 0) fixes the scale.
//!
//! Without bridges this is CLIP-VG's visual side (multi-level CLS + patch tokens of a plain
//! CLIP tower). [`patch_mask`] turns the pixel mask into the token mask the way each
//! system's code does (nearest pixel, torchvision's bilinear resize with or without
//! antialiasing, then rounding half to even).
//!
//! Keys: the CLIP tower's own (`embeddings.*`, `pre_layrnorm`, `encoder.layers.*`,
//! `post_layernorm`), then `bridge.{j}.{adaptive.{k}, gate, cross_norm,
//! cross_attn.{q,k,v,out}_proj (a CLIP attention run as cross-attention), cross_mlp.fc1,
//! cross_mlp.fc2}`, `ml_norm.{i}` and `ml_visual_projection`. LoRA sets of the vision config
//! also land on the bridge's attention projections (HiVG's LoRA targets match them by name).

use crate::clip::{ClipAttention, ClipMlp, ClipVisionConfig, ClipVisionTransformer};
use crate::lora::LoraLinear;
use crate::nn::{self, Activation, LayerNorm};
use candle_core::{DType, IndexOp, Module, Result, Tensor, D};
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
    /// A layer norm per multi-level feature (`ml_norm.{i}`, ours); HiVG and CLIP-VG project
    /// the raw hidden states.
    #[serde(default = "yes")]
    pub level_norm: bool,
    /// How the bridges' cross-attention reads the text.
    #[serde(default)]
    pub bridge_mode: BridgeMode,
    /// What feeds the bridges.
    #[serde(default)]
    pub bridge_text: BridgeText,
    /// HiVG's auxiliary heads (`hivg_aux.*`, for its token and mask losses); imported
    /// checkpoints have none of ours.
    #[serde(default = "yes")]
    pub aux_heads: bool,
    /// How the pixel mask becomes the token mask.
    #[serde(default)]
    pub patch_mask: PatchMask,
    /// Hidden width of the bridges' MLP; 0 = 4x the vision width (ours). HiVG builds it
    /// as CLIP's MLP (`intermediate_size`: also 4x for ViT-B/L).
    #[serde(default)]
    pub bridge_ffn: usize,
}

fn yes() -> bool {
    true
}

/// How a bridge's cross-attention reads the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeMode {
    /// Ours: each sample reads its own text, padding masked.
    #[default]
    Masked,
    /// HiVG's attention at batch 1: each sample reads its own `text_len` positions, padding
    /// included (the text tower ran without a padding mask), nothing masked.
    PerSample,
    /// HiVG's code as its models were trained and evaluated (`HiVG.py` permutes the text to
    /// `[L, B, C]` and its attention views that buffer as `[B, L, C]`): sample `b`,
    /// position `l` reads row `r = b·L + l` of the `L×B` buffer, i.e. position `r / B` of
    /// sample `r % B`. Outputs depend on the batch size and each sample's place in it; at
    /// batch 1 it equals `PerSample`.
    Batched,
}

/// What feeds the bridges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeText {
    /// The chosen text layers' hidden states, reweighted and gated (`adaptive`, `gate`).
    #[default]
    Hidden,
    /// HiVG's mixup pretraining (`--mixup_pretrain`): every bridge reads
    /// `condition_text_proj(text_projection(final-normed last layer))`, with
    /// `condition_text_proj` (`contrastive_dim` -> vision width) applied to CLIP's projected
    /// text (the grounder's `layout.text_projection`).
    Projected,
}

/// How the `[B, S, S]` pixel mask becomes the patch mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchMask {
    /// The top-left pixel of each patch (TransVG's `F.interpolate(mode='nearest')`).
    #[default]
    Nearest,
    /// CLIP-VG: torchvision 0.10's `Resize` of the int pad mask (bilinear, no antialias:
    /// the mean of the 2x2 pixels at each patch's centre), rounded half to even.
    Bilinear,
    /// HiVG: torchvision 0.17's `Resize` (bilinear with antialias: a triangle filter as
    /// wide as two patches), rounded half to even.
    BilinearAntialias,
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
            level_norm: true,
            bridge_mode: BridgeMode::Masked,
            bridge_text: BridgeText::Hidden,
            aux_heads: true,
            patch_mask: PatchMask::Nearest,
            bridge_ffn: 0,
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
            ..Self::clip_b16()
        }
    }
}

impl PatchMask {
    /// `pixel_mask: [B, S, S]` (1 = image) -> `[B, gh * gw]` (1 = image, f32). The resizing
    /// kinds act on the pad mask (1 = pad) as the originals do (rounding half to even is
    /// not symmetric under `1 - m`: a patch exactly half padded counts as image).
    pub fn apply(self, pixel_mask: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
        let (b, h, w) = pixel_mask.dims3()?;
        if self == Self::Nearest {
            let (ph, pw) = (h / gh, w / gw);
            return pixel_mask
                .reshape((b, gh, ph, gw, pw))?
                .i((.., .., 0, .., 0))?
                .reshape((b, gh * gw))?
                .to_dtype(DType::F32);
        }
        let (rows, cols) = match self {
            Self::Bilinear => (bilinear_weights(h, gh), bilinear_weights(w, gw)),
            _ => (antialias_weights(h, gh), antialias_weights(w, gw)),
        };
        let image = pixel_mask.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        let mut out = Vec::with_capacity(b * gh * gw);
        for m in &image {
            // horizontal pass, then vertical, accumulating in f32 as torch's CPU kernels do
            let across: Vec<Vec<f32>> = m
                .iter()
                .map(|row| {
                    cols.iter()
                        .map(|(j0, wts)| resample(wts, |k| 1.0 - row[j0 + k]))
                        .collect()
                })
                .collect();
            for (i0, wts) in &rows {
                for x in 0..gw {
                    let pad = resample(wts, |k| across[i0 + k][x]).round_ties_even();
                    out.push(if pad != 0.0 { 0f32 } else { 1.0 });
                }
            }
        }
        Tensor::from_vec(out, (b, gh * gw), pixel_mask.device())
    }
}

/// `sum_k wts[k] * value(k)`, left to right in f32.
fn resample(wts: &[f32], value: impl Fn(usize) -> f32) -> f32 {
    wts.iter()
        .enumerate()
        .fold(0f32, |acc, (k, &wt)| acc + value(k) * wt)
}

/// torch's `upsample_bilinear2d` (align_corners=False) taps from `input` to `output`
/// samples: per output, the first input index and the weights.
fn bilinear_weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = src as usize;
            let l1 = src - i0 as f32;
            match i0 + 1 < input {
                true => (i0, vec![1.0 - l1, l1]),
                false => (i0, vec![1.0]),
            }
        })
        .collect()
}

/// torch's antialiased bilinear taps (`_compute_indices_min_size_weights_aa`, f32): a
/// triangle filter of half-width `scale` when downscaling, weights normalised to sum 1.
fn antialias_weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f32 / output as f32;
    let (support, invscale) = match scale >= 1.0 {
        true => (scale, 1.0 / scale),
        false => (1.0, 1.0),
    };
    (0..output)
        .map(|i| {
            let center = scale * (i as f32 + 0.5);
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut wts: Vec<f32> = (lo..hi)
                .map(|j| (1.0 - ((j as f32 - center + 0.5) * invscale).abs()).max(0.0))
                .collect();
            let total: f32 = wts.iter().sum();
            if total != 0.0 {
                wts.iter_mut().for_each(|v| *v /= total);
            }
            (lo, wts)
        })
        .collect()
}

/// One bridge.
#[derive(Debug, Clone)]
struct Bridge {
    /// `BridgeText::Hidden`: the adaptive weights `E_k` and the gate.
    adaptive: Vec<Tensor>,
    gate: Option<Linear>,
    cross_norm: LayerNorm,
    cross_attn: ClipAttention,
    cross_mlp: ClipMlp,
}

impl Bridge {
    fn new(vb: VarBuilder, cfg: &HivgConfig) -> Result<Self> {
        let v = &cfg.vision;
        let c = v.hidden_size;
        let mlp = vb.pp("cross_mlp");
        let hidden = match cfg.bridge_ffn {
            0 => 4 * c,
            n => n,
        };
        // the output layer at zero: a fresh bridge adds nothing
        let fc1 = candle_nn::linear(c, hidden, mlp.pp("fc1"))?;
        let fc2 = Linear::new(
            mlp.pp("fc2")
                .get_with_hints((c, hidden), "weight", candle_nn::Init::Const(0.0))?,
            Some(
                mlp.pp("fc2")
                    .get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?,
            ),
        );
        let reads_hidden = cfg.bridge_text == BridgeText::Hidden;
        Ok(Self {
            adaptive: match reads_hidden {
                true => (0..cfg.text_layers.len())
                    .map(|k| {
                        vb.pp("adaptive").get_with_hints(
                            (cfg.text_len, cfg.text_dim),
                            &k.to_string(),
                            candle_nn::Init::Const(0.0),
                        )
                    })
                    .collect::<Result<_>>()?,
                false => Vec::new(),
            },
            gate: match reads_hidden {
                true => Some(candle_nn::linear(
                    cfg.text_dim * cfg.text_layers.len(),
                    c,
                    vb.pp("gate"),
                )?),
                false => None,
            },
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
        match &self.gate {
            Some(gate) => gate.forward(&Tensor::cat(&parts, D::Minus1)?),
            None => candle_core::bail!("hivg: this bridge reads projected text, not hidden states"),
        }
    }

    /// `h + MLP(CrossAttn(LN(h), T̃))`; `bias`: the text padding mask (`BridgeMode::Masked`).
    fn forward(&self, h: &Tensor, t: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let a = self
            .cross_attn
            .forward_kv(&self.cross_norm.forward(h)?, t, bias)?;
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
    /// `BridgeText::Projected`: HiVG's `condition_text_proj` (`text_dim` -> vision width).
    condition_text_proj: Option<Linear>,
    /// `level_norm`: one per multi-level feature.
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
        let hidden = cfg.bridge_text == BridgeText::Hidden;
        if hidden && cfg.text_layers.is_empty() && !cfg.bridge_layers.is_empty() {
            candle_core::bail!("hivg: bridges need text_layers");
        }
        if cfg.multi_layers.is_empty() {
            candle_core::bail!("hivg: multi_layers must not be empty");
        }
        let c = cfg.vision.hidden_size;
        Ok(Self {
            clip: ClipVisionTransformer::new(vb.clone(), &cfg.vision)?,
            bridges: (0..cfg.bridge_layers.len())
                .map(|j| Bridge::new(vb.pp(format!("bridge.{j}")), cfg))
                .collect::<Result<_>>()?,
            condition_text_proj: match hidden {
                true => None,
                false => Some(candle_nn::linear(
                    cfg.contrastive_dim,
                    c,
                    vb.pp("condition_text_proj"),
                )?),
            },
            ml_norms: match cfg.level_norm {
                true => (0..cfg.multi_layers.len())
                    .map(|i| {
                        LayerNorm::new(vb.pp(format!("ml_norm.{i}")), c, cfg.vision.layer_norm_eps)
                    })
                    .collect::<Result<_>>()?,
                false => Vec::new(),
            },
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
    /// first), `projected`: CLIP's `text_projection` of its final-normed output
    /// (`BridgeText::Projected` only), `text_mask: [B, L]` (1 = token; `BridgeMode::Masked`
    /// only).
    pub fn forward(
        &self,
        pixels: &Tensor,
        text_hidden: &[Tensor],
        projected: Option<&Tensor>,
        text_mask: &Tensor,
    ) -> Result<HivgOutput> {
        let texts: Vec<&Tensor> = match self.cfg.bridge_text {
            BridgeText::Hidden => self
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
                .collect::<Result<_>>()?,
            BridgeText::Projected => Vec::new(),
        };
        // the one text of every bridge in mixup mode: [B, L, Cv]
        // HiVG's batch mixing: its [L, B, C] text buffer read as [B, L, C]
        let mode = self.cfg.bridge_mode;
        let mix = |t: Tensor| -> Result<Tensor> {
            match mode {
                BridgeMode::Batched => {
                    let (b, n, c) = t.dims3()?;
                    t.transpose(0, 1)?.contiguous()?.reshape((b, n, c))
                }
                BridgeMode::Masked | BridgeMode::PerSample => Ok(t),
            }
        };
        // mixup: one text for every bridge, mixed once
        let shared = match (&self.condition_text_proj, projected) {
            (Some(p), Some(t)) => Some(mix(p.forward(t)?)?),
            (Some(_), None) => candle_core::bail!("hivg: projected text missing"),
            (None, _) => None,
        };
        let bias = match mode {
            BridgeMode::Masked => Some(nn::key_padding_bias(text_mask, pixels.dtype())?), // [B, 1, 1, L]
            BridgeMode::PerSample | BridgeMode::Batched => None,
        };
        let mut x = self.clip.embed(pixels)?;
        let mut hidden = vec![x.clone()];
        for (l, layer) in self.clip.layers.iter().enumerate() {
            x = layer.attn_block(&x, None)?;
            if let Some(j) = self.cfg.bridge_layers.iter().position(|&b| b == l) {
                let t = match &shared {
                    Some(t) => t.clone(),
                    None => mix(self.bridges[j].text(&texts)?)?,
                };
                x = self.bridges[j].forward(&x, &t, bias.as_ref())?;
            }
            x = layer.mlp_block(&x)?;
            hidden.push(x.clone());
        }
        let levels = self
            .cfg
            .multi_layers
            .iter()
            .enumerate()
            .map(|(k, &i)| match self.ml_norms.get(k) {
                Some(norm) => norm.forward(&hidden[i]),
                None => Ok(hidden[i].clone()),
            })
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
        let out = net.forward(&px, &text, None, &mask)?;
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
        let a = net.forward(&px, &text, None, &mask)?.tokens;
        let mut changed = text.clone();
        for t in changed.iter_mut() {
            let pad = Tensor::randn(0f32, 1.0, (1, 3, 24), &dev)?;
            let s1 = Tensor::cat(&[&t.get(1)?.unsqueeze(0)?.narrow(1, 0, 3)?, &pad], 1)?;
            *t = Tensor::cat(&[&t.get(0)?.unsqueeze(0)?, &s1], 0)?;
        }
        let b = net.forward(&px, &changed, None, &mask)?.tokens;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "padded text tokens changed the output by {d}");
        let mut other = text.clone();
        for t in other.iter_mut() {
            let noise = Tensor::randn(0f32, 1.0, (1, 6, 24), &dev)?;
            *t = Tensor::cat(&[&t.get(0)?.unsqueeze(0)?, &noise], 0)?;
        }
        let c = net.forward(&px, &other, None, &mask)?.tokens;
        let a = net.forward(&px, &text, None, &mask)?.tokens;
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

    #[test]
    fn batched_bridges_mix_the_batch_and_equal_per_sample_alone() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let per_sample = HivgConfig {
            bridge_mode: BridgeMode::PerSample,
            level_norm: false,
            ..HivgConfig::tiny(24, 6)
        };
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let a = HivgVisual::new(vb.clone(), &per_sample)?;
        let b = HivgVisual::new(
            vb,
            &HivgConfig {
                bridge_mode: BridgeMode::Batched,
                ..per_sample.clone()
            },
        )?;
        for (name, var) in map.data().lock().unwrap().iter() {
            if name.contains("fc2") || name.contains("adaptive") {
                var.set(&Tensor::randn(0f32, 0.2, var.shape(), &dev)?)?;
            }
        }
        let (px, text, mask) = inputs(&dev)?;
        let diff = |x: &Tensor, y: &Tensor| -> Result<f32> {
            (x - y)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        // alone, the two modes agree
        let one: Vec<Tensor> = text
            .iter()
            .map(|t| t.narrow(0, 1, 1))
            .collect::<Result<_>>()?;
        let (p1, m1) = (px.narrow(0, 1, 1)?, mask.narrow(0, 1, 1)?);
        let d = diff(
            &a.forward(&p1, &one, None, &m1)?.tokens,
            &b.forward(&p1, &one, None, &m1)?.tokens,
        )?;
        assert_eq!(d, 0.0);
        // in a batch of two, batched mode reads the other sample's text; per-sample mode
        // equals each sample alone
        let both_a = a.forward(&px, &text, None, &mask)?.tokens;
        let both_b = b.forward(&px, &text, None, &mask)?.tokens;
        let alone = a.forward(&p1, &one, None, &m1)?.tokens;
        let d = diff(&both_a.narrow(0, 1, 1)?, &alone)?;
        assert!(d < 1e-4, "per-sample in a batch vs alone: {d}"); // f32 summation order
        assert!(diff(&both_a, &both_b)? > 1e-3);
        // the text mask plays no part outside the masked mode
        let d = diff(
            &both_a,
            &a.forward(&px, &text, None, &mask.ones_like()?)?.tokens,
        )?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn patch_masks_follow_torchvision() -> Result<()> {
        let dev = Device::Cpu;
        // 32x32 pixels, 2x2 patches of 16; image rows 0..23 (the last 9 rows pad)
        let rows: Vec<f32> = (0..32 * 32)
            .map(|i| if i / 32 < 23 { 1.0 } else { 0.0 })
            .collect();
        let m = Tensor::from_vec(rows, (1, 32, 32), &dev)?;
        // nearest: the top-left pixel of each patch is image
        assert_eq!(
            PatchMask::Nearest.apply(&m, 2, 2)?.to_vec2::<f32>()?,
            [[1., 1., 1., 1.]]
        );
        // bilinear: rows 23, 24 at the lower patch's centre are both pad -> masked
        assert_eq!(
            PatchMask::Bilinear.apply(&m, 2, 2)?.to_vec2::<f32>()?,
            [[1., 1., 0., 0.]]
        );
        // antialiased: the lower patch's triangle (taps 8..31 around 24, cut at the border)
        // weighs pad rows 23..31 at 6.97 / 14 < 1/2 -> image; from row 22 on, 7.88 / 14 -> pad
        assert_eq!(
            PatchMask::BilinearAntialias
                .apply(&m, 2, 2)?
                .to_vec2::<f32>()?,
            [[1., 1., 1., 1.]]
        );
        let more: Vec<f32> = (0..32 * 32)
            .map(|i| if i / 32 < 22 { 1.0 } else { 0.0 })
            .collect();
        let m22 = Tensor::from_vec(more, (1, 32, 32), &dev)?;
        assert_eq!(
            PatchMask::BilinearAntialias
                .apply(&m22, 2, 2)?
                .to_vec2::<f32>()?,
            [[1., 1., 0., 0.]]
        );
        let half: Vec<f32> = (0..32 * 32)
            .map(|i| if i / 32 < 24 { 1.0 } else { 0.0 })
            .collect();
        let h = Tensor::from_vec(half, (1, 32, 32), &dev)?;
        assert_eq!(
            PatchMask::Bilinear.apply(&h, 2, 2)?.to_vec2::<f32>()?,
            [[1., 1., 1., 1.]]
        );
        Ok(())
    }
}
