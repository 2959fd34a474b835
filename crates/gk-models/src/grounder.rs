//! The TransVG-style grounder: visual encoder + text encoder + projections + [REG] token +
//! visual-linguistic transformer + box head.
//!
//! Port of TransVG `models/trans_vg.py` and `models/vl_transformer.py`
//! (<https://github.com/djiajunustc/TransVG/blob/main/models/trans_vg.py>), with the
//! backbone and fusion choices of CLIP-VG/HiVG available by config (CLIP towers, pre-norm).
//! Sub-modules are built outside the fusion and passed in (DETR style); every method
//! variant plugs in as a backbone or a loss, never as a flag inside this file.

use crate::bert::{Bert, BertConfig};
use crate::clip::{ClipTextConfig, ClipTextTransformer, ClipVisionConfig, ClipVisionTransformer};
use crate::convnet::{ConvNet, ConvNetConfig};
use crate::detr::{DetrConfig, DetrVisual};
use crate::encoder::{EncoderConfig, EncoderLayer};
use crate::hivg::{HivgAux, HivgAuxHeads, HivgConfig, HivgVisual, PatchMask};
use crate::nn::{self, LayerNorm, Mode};
use crate::qrnet::{grid_mask, QrNetBackbone, QrNetConfig};
use candle_core::{DType, IndexOp, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// Which visual backbone, with its own config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VisualConfig {
    /// A CLIP ViT tower (`vision_model.*` keys); all tokens (CLS + patches) after
    /// `post_layernorm` go to the fusion.
    ClipVit(ClipVisionConfig),
    /// Ours: a small conv net (`convnet`), the grid tokens (no CLS) go to the fusion.
    ConvNet(ConvNetConfig),
    /// QRNet: a Swin refined by the sentence query (the text encoder's pooled output) and
    /// its query-aware neck; the coarsest neck levels go to the fusion.
    QrNet(QrNetConfig),
    /// HiVG: a CLIP ViT with cross-modal bridges fed by the text encoder's hidden states;
    /// its multi-level tokens (CLS + patches) go to the fusion.
    Hivg(HivgConfig),
    /// TransVG's DETR branch: a ResNet with frozen batch norm, `input_proj` and DETR's
    /// post-norm encoder with sine positions; one token per grid cell (no CLS).
    Detr(DetrConfig),
}

/// Which text backbone, with its own config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TextConfig {
    Bert(BertConfig),
    /// A CLIP text tower (`text_model.*` keys), causal attention.
    ClipText(ClipTextConfig),
}

/// How the box is read out of the fused tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxHead {
    /// TransVG: an MLP on the [REG] token, sigmoid -> cxcywh.
    #[default]
    RegMlp,
    /// Ours, for models trained from scratch: the [REG] token attends over the fused patch
    /// tokens; the centre is the attention-weighted mean of the patch centres plus an offset
    /// of at most one patch, width and height come from the MLP. Gives the box a spatial
    /// prior, and a heat map (`GrounderOutput::token_probs`) to look at.
    TokenAttention,
    /// Ours, one-stage-detector style: every fused patch token predicts a box relative to
    /// its cell (centre within one cell of the cell centre, sigmoid width/height) and a
    /// score `<q(u), k(token)> / sqrt(d) + <coord(u), cell centre in [-1, 1]^2> +
    /// <q'(t), k'(cell)> / sqrt(d)` with `u` = [REG] + the mean fused text token, and the
    /// last term on the projected tokens before fusion (`t` the mean text token). Training:
    /// cross-entropy of the scores against the cell holding the target centre, box losses
    /// on that cell's box.
    /// Inference: the box of the best-scoring cell. The per-cell classification gives
    /// every step a strong signal; a single regressed box from scratch sits at the mean
    /// box for thousands of steps (issue 3).
    Dense,
}

/// A whole grounder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrounderConfig {
    pub visual: VisualConfig,
    pub text: TextConfig,
    pub fusion: EncoderConfig,
    /// Square input side in pixels.
    pub image_size: usize,
    /// Text length including the special tokens.
    pub max_text_len: usize,
    #[serde(default)]
    pub head: BoxHead,
    /// `BoxHead::Dense` only: a linear head from every unfused cell token to the text
    /// vocabulary (`word_head`), for the loss that predicts an expression's words from its
    /// target cell (MAttNet's attribute supervision taken from the expression). Meant for
    /// word-level vocabularies: its output is `[B, cells, vocab]`.
    #[serde(default)]
    pub word_head: bool,
    /// How the text and the tokens meet in the fusion; the default is TransVG's and ours,
    /// imported CLIP-VG and HiVG models carry theirs.
    #[serde(default)]
    pub layout: FusionLayout,
}

/// What a published system does around the fusion, where it differs from TransVG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FusionLayout {
    /// `[REG, visual, text]` (HiVG) instead of `[REG, text, visual]` (TransVG, CLIP-VG);
    /// `vl_pos_embed`'s rows follow the same order.
    pub visual_first: bool,
    /// The tokenizer pads with this id instead of its own pad token (`clip.tokenize` pads
    /// with 0).
    pub pad_id: Option<u32>,
    /// The fusion masks every text position whose id is 0 (CLIP-VG's `token > 0`, HiVG's
    /// `token == 0`): padding, and also a real "!", CLIP's token 0.
    pub mask_zero_ids: bool,
    /// The text tower reads all `max_text_len` positions with no padding mask (CLIP's
    /// causal mask only) and none are cut: HiVG's bridges read the padding positions.
    pub full_text: bool,
    /// The text tokens pass CLIP's `text_projection` before `text_proj` (CLIP-VG, HiVG).
    pub text_projection: bool,
    /// `visu_proj` maps the visual tokens into the fusion; CLIP-VG has the layer but its
    /// `ml_visu_proj` output goes to the fusion directly.
    pub visu_proj: bool,
}

impl FusionLayout {
    /// What both CLIP releases do: `clip.tokenize`'s zero padding and id-0 mask, the text
    /// tower on all positions, CLIP's `text_projection` before `text_proj`; HiVG puts the
    /// visual tokens first and keeps `visu_proj`, CLIP-VG neither.
    pub fn clip_release(hivg: bool) -> Self {
        Self {
            visual_first: hivg,
            pad_id: Some(0),
            mask_zero_ids: true,
            full_text: true,
            text_projection: true,
            visu_proj: hivg,
        }
    }
}

impl Default for FusionLayout {
    fn default() -> Self {
        Self {
            visual_first: false,
            pad_id: None,
            mask_zero_ids: false,
            full_text: false,
            text_projection: false,
            visu_proj: true,
        }
    }
}

impl GrounderConfig {
    /// CLIP ViT-B/16 towers, 224 px, 77 tokens, 6-layer pre-norm fusion of width 512:
    /// the CLIP-VG/HiVG shape without the bridge.
    pub fn clip_b16() -> Self {
        Self {
            visual: VisualConfig::ClipVit(ClipVisionConfig::vit_base_patch16()),
            text: TextConfig::ClipText(ClipTextConfig::base()),
            fusion: EncoderConfig {
                hidden: 512,
                layers: 6,
                heads: 8,
                ffn: 2048,
                dropout: 0.1,
                pre_norm: true,
            },
            image_size: 224,
            max_text_len: 77,
            head: BoxHead::RegMlp,
            word_head: false,
            layout: FusionLayout::default(),
        }
    }

    /// HiVG-B/16 at its paper size (`configs/hivg-b16-refcoco.toml`): [`Self::clip_b16`] with
    /// the CLIP vision tower replaced by HiVG's (bridges in layers 0, 3, 7, 11 fed by the last
    /// text layer, multi-level tokens from hidden states 1, 4, 8, 12, the auxiliary heads and
    /// CLIP's contrastive head).
    pub fn hivg_b16() -> Self {
        Self {
            visual: VisualConfig::Hivg(HivgConfig::clip_b16()),
            ..Self::clip_b16()
        }
    }

    /// HiVG-B/16 as released (what `import hivg` makes of a RefCOCO Base checkpoint):
    /// bridges in vision layers 0, 3, 7, 11 reading the last text layer, raw multi-level
    /// features of hidden states 1, 4, 8, 12, per-sample bridges (`BridgeMode::PerSample`),
    /// the antialiased patch mask, no auxiliary heads, HiVG's fusion layout.
    pub fn hivg_b16_release() -> Self {
        let mut text = ClipTextConfig::base();
        text.pad_token_id = 0;
        Self {
            visual: VisualConfig::Hivg(HivgConfig {
                level_norm: false,
                bridge_mode: crate::hivg::BridgeMode::PerSample,
                aux_heads: false,
                patch_mask: PatchMask::BilinearAntialias,
                bridge_ffn: 3072,
                ..HivgConfig::clip_b16()
            }),
            text: TextConfig::ClipText(text),
            layout: FusionLayout::clip_release(true),
            ..Self::clip_b16()
        }
    }

    /// CLIP-VG as released (ViT-B/16; what `import clip-vg` makes): no bridges, the raw
    /// features of blocks 0, 3, 7, 11 into `ml_visu_proj`, the plain bilinear patch mask, a
    /// post-norm fusion of width 512 and CLIP-VG's layout.
    pub fn clipvg_b16() -> Self {
        let release = Self::hivg_b16_release();
        let VisualConfig::Hivg(h) = release.visual else {
            unreachable!("hivg_b16_release is a HiVG grounder")
        };
        Self {
            visual: VisualConfig::Hivg(HivgConfig {
                bridge_layers: Vec::new(),
                text_layers: Vec::new(),
                patch_mask: PatchMask::Bilinear,
                bridge_ffn: 0,
                ..h
            }),
            fusion: EncoderConfig {
                pre_norm: false,
                ..release.fusion
            },
            layout: FusionLayout::clip_release(false),
            ..release
        }
    }

    /// QRNet at its paper size: Swin-S at 640 px refined by the BERT-base [CLS] query, the
    /// neck at 256 and its two coarsest levels as tokens (500), a TransVG fusion (6 post-norm
    /// layers of width 256, 8 heads, FFN 2048), 20 text tokens and the regression head.
    pub fn qrnet_swin_s() -> Self {
        let base = Self::clip_b16();
        Self {
            visual: VisualConfig::QrNet(QrNetConfig::swin_s()),
            text: TextConfig::Bert(BertConfig::base()),
            fusion: EncoderConfig {
                hidden: 256,
                pre_norm: false,
                ..base.fusion
            },
            image_size: 640,
            max_text_len: 20,
            ..base
        }
    }

    /// TransVG as released (`djiajunustc/TransVG`, R-50): DETR's ResNet-50 branch (frozen
    /// batch norm, 6 post-norm encoder layers of width 256) at 640 px (a 20x20 grid),
    /// BERT-base (its last layer), a 6-layer post-norm fusion of width 256 with 8 heads and
    /// FFN 2048, 20 text tokens (40 for RefCOCOg) and the regression head.
    pub fn transvg_r50() -> Self {
        Self {
            visual: VisualConfig::Detr(DetrConfig::r50()),
            text: TextConfig::Bert(BertConfig::base()),
            fusion: EncoderConfig::detr(),
            image_size: 640,
            max_text_len: 20,
            head: BoxHead::RegMlp,
            word_head: false,
            layout: FusionLayout::default(),
        }
    }

    /// A tiny grounder for tests (tiny CLIP vision + tiny BERT).
    pub fn tiny() -> Self {
        Self {
            visual: VisualConfig::ClipVit(ClipVisionConfig::tiny()),
            text: TextConfig::Bert(BertConfig {
                max_position_embeddings: 16,
                ..BertConfig::tiny()
            }),
            fusion: EncoderConfig {
                hidden: 32,
                layers: 2,
                heads: 4,
                ffn: 64,
                dropout: 0.0,
                pre_norm: false,
            },
            image_size: 32,
            max_text_len: 12,
            head: BoxHead::RegMlp,
            word_head: false,
            layout: FusionLayout::default(),
        }
    }

    /// The demo grounder for the embedded benchmark, trained from scratch on 2 CPU cores:
    /// a conv backbone (128 px to an 8x8 grid of width 128, `ConvNetConfig::synth`), a
    /// 2-layer BERT over a word-level vocabulary (sized when the run is prepared), a
    /// 3-layer pre-norm fusion and the dense head.
    pub fn synth_small() -> Self {
        Self {
            visual: VisualConfig::ConvNet(ConvNetConfig::synth()),
            text: TextConfig::Bert(BertConfig {
                vocab_size: 128,
                hidden_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 256,
                max_position_embeddings: 32,
                ..BertConfig::tiny()
            }),
            fusion: EncoderConfig {
                hidden: 128,
                layers: 3,
                heads: 4,
                ffn: 256,
                dropout: 0.0,
                pre_norm: true,
            },
            image_size: 128,
            max_text_len: 20,
            head: BoxHead::Dense,
            word_head: true,
            layout: FusionLayout::default(),
        }
    }

    /// QRNet-tiny for the embedded benchmark: [`Self::synth_small`] with its conv net
    /// replaced by a 3-stage Swin (width 32-128, patch 8, window 4; grids 16, 8, 4 and the
    /// extra 2 at 128 px) refined by the BERT [CLS] query, neck width 128, and the three
    /// coarsest levels as tokens, so that the Dense head reads the 8x8 level as it reads
    /// the conv net's grid (QRNet itself uses two levels of a 640 px input).
    pub fn qrnet_synth() -> Self {
        let base = Self::synth_small();
        let swin = crate::swin::SwinConfig {
            image_size: 128,
            patch_size: 8,
            embed_dim: 32,
            depths: vec![2, 2, 2],
            num_heads: vec![2, 4, 8],
            window_size: 4,
            mlp_ratio: 2.0,
            ..crate::swin::SwinConfig::swin_t()
        };
        Self {
            visual: VisualConfig::QrNet(QrNetConfig {
                swin,
                neck_dim: 128,
                rank: 8,
                reduction: 4,
                token_levels: 3,
                ..QrNetConfig::tiny(base.text_dim())
            }),
            ..base
        }
    }

    /// HiVG-tiny for the embedded benchmark, the model of `configs/hivg-synth.toml`: the
    /// benchmark teacher's CLIP shapes (`PretrainConfig::synth()`, word-level vocabulary of
    /// 73 on the seed-0 benchmark), bridges in vision layers 1 and 3, multi-level tokens from
    /// hidden states 2 and 4, the demo's fusion and dense head, at 64 px: the teacher's own
    /// resolution (an 8x8 grid of 8-px patches, as the demo's grid; HiVG runs CLIP at its
    /// pre-training 224 px too). At 128 px (16x16 interpolated positions) a step cost 4.5x.
    pub fn hivg_synth() -> Self {
        let vision = ClipVisionConfig {
            hidden_size: 128,
            intermediate_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            image_size: 64,
            patch_size: 8,
            ..ClipVisionConfig::tiny()
        };
        Self {
            visual: VisualConfig::Hivg(HivgConfig {
                vision,
                bridge_layers: vec![1, 3],
                text_layers: vec![3],
                multi_layers: vec![2, 4],
                text_dim: 128,
                text_len: 20,
                proj_dim: 128,
                contrastive_dim: 128,
                ..HivgConfig::clip_b16()
            }),
            image_size: 64,
            text: TextConfig::ClipText(ClipTextConfig {
                vocab_size: 73,
                hidden_size: 128,
                intermediate_size: 256,
                num_hidden_layers: 3,
                num_attention_heads: 4,
                max_position_embeddings: 48,
                pad_token_id: 0,
                bos_token_id: 2,
                eos_token_id: 3,
                ..ClipTextConfig::tiny()
            }),
            ..Self::synth_small()
        }
    }

    /// Number of visual tokens the fusion sees (CLS + patches).
    pub fn visual_tokens(&self) -> usize {
        match &self.visual {
            VisualConfig::ClipVit(c) => {
                let g = self.image_size / c.patch_size;
                g * g + 1
            }
            VisualConfig::ConvNet(c) => c.grid() * c.grid(),
            VisualConfig::QrNet(c) => c.tokens(self.image_size),
            VisualConfig::Hivg(c) => {
                let g = self.image_size / c.vision.patch_size;
                g * g + 1
            }
            VisualConfig::Detr(c) => c.grid(self.image_size).pow(2),
        }
    }

    /// Width of the visual backbone's tokens.
    pub fn visual_dim(&self) -> usize {
        match &self.visual {
            VisualConfig::ClipVit(c) => c.hidden_size,
            VisualConfig::ConvNet(c) => c.out_dim(),
            VisualConfig::QrNet(c) => c.neck_dim,
            VisualConfig::Hivg(c) => c.proj_dim,
            VisualConfig::Detr(c) => c.encoder.hidden,
        }
    }

    /// Width of the text encoder's tokens.
    pub fn text_dim(&self) -> usize {
        match &self.text {
            TextConfig::Bert(c) => c.hidden_size,
            TextConfig::ClipText(c) => c.hidden_size,
        }
    }

    /// Width of the text tokens `text_proj` reads: CLIP's projection width with
    /// `layout.text_projection`, else the text encoder's.
    pub fn fused_text_dim(&self) -> usize {
        match &self.visual {
            VisualConfig::Hivg(h) if self.layout.text_projection => h.contrastive_dim,
            _ => self.text_dim(),
        }
    }

    /// Size of the text encoder's vocabulary.
    pub fn text_vocab(&self) -> usize {
        match &self.text {
            TextConfig::Bert(c) => c.vocab_size,
            TextConfig::ClipText(c) => c.vocab_size,
        }
    }
}

/// A visual backbone.
#[derive(Debug, Clone)]
pub enum VisualEncoder {
    ClipVit(ClipVisionTransformer),
    ConvNet(ConvNet),
    QrNet(QrNetBackbone),
    Hivg(HivgVisual),
    Detr(DetrVisual),
}

/// Visual backbone output in fusion-ready form.
#[derive(Debug, Clone)]
pub struct VisualFeatures {
    /// `[B, N, Cv]` tokens (for CLIP: CLS then patches, after `post_layernorm`).
    pub tokens: Tensor,
    /// `[B, N]`, 1 = image, 0 = padding.
    pub mask: Tensor,
    /// `[B, Cv]` a global feature (CLIP: pooled CLS).
    pub pooled: Tensor,
    /// `(gh, gw)` of the patch grid, for region pooling.
    pub grid: (usize, usize),
}

impl VisualEncoder {
    pub fn new(vb: VarBuilder, cfg: &VisualConfig) -> Result<Self> {
        match cfg {
            VisualConfig::ClipVit(c) => Ok(Self::ClipVit(ClipVisionTransformer::new(vb, c)?)),
            VisualConfig::ConvNet(c) => Ok(Self::ConvNet(ConvNet::new(vb, c)?)),
            VisualConfig::QrNet(c) => Ok(Self::QrNet(QrNetBackbone::new(vb, c)?)),
            VisualConfig::Hivg(c) => Ok(Self::Hivg(HivgVisual::new(vb, c)?)),
            VisualConfig::Detr(c) => Ok(Self::Detr(DetrVisual::new(vb, c)?)),
        }
    }

    /// LoRA sets folded into the base weights (backbones without LoRA are returned as is).
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(match self {
            Self::ClipVit(v) => Self::ClipVit(v.merge_lora()?),
            Self::Hivg(h) => Self::Hivg(h.merge_lora()?),
            other => other.clone(),
        })
    }

    /// [`Self::forward`] for pixels that hold each distinct image once: `image_index [B]`
    /// (u32) is the row of `pixels` of each sample. Query-independent backbones (CLIP ViT,
    /// conv net) encode each image once and share its tokens; query-aware ones (QRNet,
    /// HiVG) encode a copy per sample.
    pub fn forward_indexed(
        &self,
        pixels: &Tensor,
        pixel_mask: &Tensor,
        image_index: Option<&Tensor>,
        text: &TextFeatures,
        text_mask: &Tensor,
    ) -> Result<VisualFeatures> {
        let Some(ix) = image_index else {
            return self.forward(pixels, pixel_mask, text, text_mask);
        };
        match self {
            Self::ClipVit(_) | Self::ConvNet(_) | Self::Detr(_) => {
                let f = self.forward(pixels, pixel_mask, text, text_mask)?; // [U, ...]
                Ok(VisualFeatures {
                    tokens: f.tokens.index_select(ix, 0)?, // [B, N, C]
                    mask: f.mask.index_select(ix, 0)?,
                    pooled: f.pooled.index_select(ix, 0)?,
                    grid: f.grid,
                })
            }
            Self::QrNet(_) | Self::Hivg(_) => self.forward(
                &pixels.index_select(ix, 0)?,
                &pixel_mask.index_select(ix, 0)?,
                text,
                text_mask,
            ),
        }
    }

    /// `pixels: [B, 3, S, S]`, `pixel_mask: [B, S, S]` (1 = image); the text encoder's
    /// output and mask are read by query-aware backbones only (QRNet: the pooled query;
    /// HiVG: the hidden states).
    pub fn forward(
        &self,
        pixels: &Tensor,
        pixel_mask: &Tensor,
        text: &TextFeatures,
        text_mask: &Tensor,
    ) -> Result<VisualFeatures> {
        match self {
            Self::ClipVit(vit) => {
                let out = vit.forward(pixels)?;
                let tokens = vit.post_layernorm(&out.last_hidden_state)?;
                let patch = vit.config().patch_size;
                let (mask, grid) = cls_patch_mask(pixel_mask, patch, PatchMask::Nearest)?;
                Ok(VisualFeatures {
                    tokens,
                    mask,
                    pooled: out.pooled,
                    grid,
                })
            }
            Self::Hivg(net) => {
                let c = net.config();
                let out = net.forward(
                    pixels,
                    &text.hidden_states,
                    text.projected.as_ref(),
                    text_mask,
                )?;
                let (mask, grid) = cls_patch_mask(pixel_mask, c.vision.patch_size, c.patch_mask)?;
                Ok(VisualFeatures {
                    tokens: out.tokens,
                    mask,
                    pooled: out.pooled,
                    grid,
                })
            }
            Self::ConvNet(net) => {
                let out = net.forward(pixels)?;
                let g = net.config().grid();
                let mask = patch_mask(pixel_mask, g, g)?.to_dtype(out.tokens.dtype())?;
                Ok(VisualFeatures {
                    pooled: out.tokens.mean(1)?,
                    tokens: out.tokens,
                    mask,
                    grid: (g, g),
                })
            }
            Self::Detr(net) => {
                let out = net.forward(pixels, pixel_mask)?;
                Ok(VisualFeatures {
                    pooled: nn::masked_mean(&out.tokens, &out.mask)?,
                    tokens: out.tokens,
                    mask: out.mask,
                    grid: out.grid,
                })
            }
            Self::QrNet(net) => {
                let out = net.forward(pixels, &text.pooled)?;
                let masks = out
                    .grids
                    .iter()
                    .map(|&g| grid_mask(pixel_mask, g))
                    .collect::<Result<Vec<_>>>()?;
                let mask = Tensor::cat(&masks, 1)?.to_dtype(out.tokens.dtype())?;
                let grid = *out.grids.last().expect("at least one token level");
                let n = out.tokens.dim(1)?;
                Ok(VisualFeatures {
                    pooled: out
                        .tokens
                        .narrow(1, n - grid.0 * grid.1, grid.0 * grid.1)?
                        .mean(1)?,
                    tokens: out.tokens,
                    mask,
                    grid,
                })
            }
        }
    }
}

/// A ViT's token mask `[B, 1 + gh*gw]` (CLS, then patches) and its patch grid.
fn cls_patch_mask(
    pixel_mask: &Tensor,
    patch: usize,
    kind: PatchMask,
) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w) = pixel_mask.dims3()?;
    let (gh, gw) = (h / patch, w / patch);
    let patches = kind.apply(pixel_mask, gh, gw)?;
    let cls = Tensor::ones((b, 1), DType::F32, pixel_mask.device())?;
    Ok((Tensor::cat(&[cls, patches], 1)?, (gh, gw)))
}

/// `[B, S, S]` pixel mask -> `[B, gh * gw]` cell mask: the top-left pixel of each cell
/// (nearest-neighbour downsampling, as TransVG's `F.interpolate`).
pub(crate) fn patch_mask(pixel_mask: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
    PatchMask::Nearest.apply(pixel_mask, gh, gw)
}

/// A text backbone.
#[derive(Debug, Clone)]
pub enum TextEncoder {
    Bert(Bert),
    ClipText(ClipTextTransformer),
}

/// Text backbone output.
#[derive(Debug, Clone)]
pub struct TextFeatures {
    /// `[B, L, Ct]`.
    pub tokens: Tensor,
    /// `[B, Ct]`: BERT [CLS] hidden state, CLIP EOS token.
    pub pooled: Tensor,
    pub hidden_states: Vec<Tensor>,
    /// `[B, L, P]`: CLIP's `text_projection` of `tokens`, where the fusion reads it
    /// (`FusionLayout::text_projection`).
    pub projected: Option<Tensor>,
}

impl TextEncoder {
    pub fn new(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        match cfg {
            TextConfig::Bert(c) => Ok(Self::Bert(Bert::new(vb, c)?)),
            TextConfig::ClipText(c) => Ok(Self::ClipText(ClipTextTransformer::new(vb, c)?)),
        }
    }

    /// LoRA sets folded into the base weights.
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(match self {
            Self::ClipText(t) => Self::ClipText(t.merge_lora()?),
            other => other.clone(),
        })
    }

    /// `ids, mask: [B, L]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<TextFeatures> {
        match self {
            Self::Bert(bert) => {
                let out = bert.forward(ids, mask, None)?;
                let pooled = out.last_hidden_state.i((.., 0))?;
                Ok(TextFeatures {
                    tokens: out.last_hidden_state,
                    pooled,
                    hidden_states: out.hidden_states,
                    projected: None,
                })
            }
            Self::ClipText(t) => {
                let out = t.forward(ids, Some(mask))?;
                Ok(TextFeatures {
                    tokens: out.last_hidden_state,
                    pooled: out.pooled,
                    hidden_states: out.hidden_states,
                    projected: None,
                })
            }
        }
    }
}

/// DETR's `MLP`: `layers.{i}` linears with ReLU between.
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(vb: VarBuilder, dims: &[usize]) -> Result<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x)?;
            if i + 1 < self.layers.len() {
                x = nn::relu(&x)?;
            }
        }
        Ok(x)
    }
}

/// What [`Grounder::forward`] returns.
#[derive(Debug, Clone)]
pub struct GrounderOutput {
    /// `[B, 4]` normalised cxcywh in the padded square frame.
    pub pred_box: Tensor,
    /// `[B, d]` the fused [REG] token.
    pub reg: Tensor,
    /// `[B, N, d]` fused visual tokens.
    pub visual_tokens: Tensor,
    /// `[B, L, d]` fused text tokens (zeros past the batch's longest expression).
    pub text_tokens: Tensor,
    /// `[B, gh * gw]` attention of the box head over the patches (`BoxHead::TokenAttention`),
    /// or the softmax of the cell scores (`BoxHead::Dense`).
    pub token_probs: Option<Tensor>,
    /// `BoxHead::Dense`: `[B, gh * gw]` cell scores (padding cells at -1e9) and
    /// `[B, gh * gw, 4]` every cell's normalised cxcywh box; `pred_box` is the best cell's.
    pub cells: Option<(Tensor, Tensor)>,
    /// HiVG grounders: the auxiliary heads' token similarities and mask logits.
    pub aux: Option<HivgAux>,
    /// `word_head`: `[B, gh * gw, vocab]` word logits of every unfused cell token.
    pub word_logits: Option<Tensor>,
    /// HiVG grounders with `contrastive_dim`: CLIP's image and text embeddings.
    pub clip: Option<ClipEmbeds>,
    /// Backbone outputs before fusion (distillation and region losses read these); text
    /// tokens and hidden states are zeros past the batch's longest expression.
    pub visual: VisualFeatures,
    pub text: TextFeatures,
}

/// CLIP's embeddings of a batch: `image`, `text` `[B, P]` (not normalised) and the
/// logit scale `exp(logit_scale)` (a scalar).
#[derive(Debug, Clone)]
pub struct ClipEmbeds {
    pub image: Tensor,
    pub text: Tensor,
    pub scale: Tensor,
}

/// CLIP's projections and logit scale, with CLIP's top-level keys (`visual_projection`,
/// `text_projection`, `logit_scale`), so a Hugging Face CLIP file maps by name.
#[derive(Debug, Clone)]
struct ClipHead {
    visual_projection: Linear,
    text_projection: Linear,
    logit_scale: Tensor,
}

impl ClipHead {
    fn new(vb: VarBuilder, visual: usize, text: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            visual_projection: nn::linear(vb.pp("visual_projection"), visual, dim, false)?,
            text_projection: nn::linear(vb.pp("text_projection"), text, dim, false)?,
            logit_scale: vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(2.6592))?,
        })
    }

    /// `visual, text: [B, C]` pooled outputs -> [`ClipEmbeds`].
    fn forward(&self, visual: &Tensor, text: &Tensor) -> Result<ClipEmbeds> {
        Ok(ClipEmbeds {
            image: self.visual_projection.forward(visual)?,
            text: self.text_projection.forward(text)?,
            scale: self.logit_scale.exp()?,
        })
    }
}

/// The grounder. Keys: `visual.*`, `text.*`, `visu_proj`, `text_proj`, `reg_token`,
/// `vl_pos_embed`, `vl_transformer.layers.{i}`, `vl_transformer.norm` (pre-norm only), `bbox_embed`,
/// and per head `token_attn.{q,k}`, `dense_coord`, `dense_direct.{q,k}`; with HiVG's visual
/// encoder `hivg_aux.*` ([`HivgAuxHeads`]) and, with `contrastive_dim`, CLIP's
/// `visual_projection`, `text_projection`, `logit_scale`.
#[derive(Debug, Clone)]
pub struct Grounder {
    pub visual: VisualEncoder,
    pub text: TextEncoder,
    /// `layout.visu_proj` only.
    visu_proj: Option<Linear>,
    text_proj: Linear,
    reg_token: Tensor,
    vl_pos_embed: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: Option<LayerNorm>,
    bbox_embed: Mlp,
    /// `BoxHead::TokenAttention` and `Dense`: query and key projections.
    token_attn: Option<(Linear, Linear)>,
    /// `BoxHead::Dense`: query -> a direction over the grid added to the cell scores.
    dense_coord: Option<Linear>,
    /// `BoxHead::Dense`: query and key projections of the unfused text mean and cells.
    dense_direct: Option<(Linear, Linear)>,
    /// `word_head`: unfused cell token -> vocabulary logits.
    word_head: Option<Linear>,
    hivg_aux: Option<HivgAuxHeads>,
    clip_head: Option<ClipHead>,
    cfg: GrounderConfig,
}

impl Grounder {
    pub fn new(vb: VarBuilder, cfg: &GrounderConfig) -> Result<Self> {
        if let VisualConfig::QrNet(q) = &cfg.visual {
            if q.query_dim != cfg.text_dim() {
                candle_core::bail!(
                    "qrnet: query_dim {} must equal the text encoder's width {}",
                    q.query_dim,
                    cfg.text_dim()
                );
            }
        }
        let visual = VisualEncoder::new(vb.pp("visual"), &cfg.visual)?;
        let text = TextEncoder::new(vb.pp("text"), &cfg.text)?;
        Self::from_parts(vb, cfg, visual, text)
    }

    /// Builds the fusion and head around already built backbones.
    pub fn from_parts(
        vb: VarBuilder,
        cfg: &GrounderConfig,
        visual: VisualEncoder,
        text: TextEncoder,
    ) -> Result<Self> {
        let f = &cfg.fusion;
        let d = f.hidden;
        let n_tokens = 1 + cfg.max_text_len + cfg.visual_tokens();
        if cfg.word_head && cfg.head != BoxHead::Dense {
            candle_core::bail!("word_head needs the dense head (it reads the cells)");
        }
        let vl = vb.pp("vl_transformer");
        Ok(Self {
            visual,
            text,
            visu_proj: match cfg.layout.visu_proj {
                true => Some(candle_nn::linear(cfg.visual_dim(), d, vb.pp("visu_proj"))?),
                false if cfg.visual_dim() == d => None,
                false => candle_core::bail!(
                    "without visu_proj the visual tokens ({}) must have the fusion's width {d}",
                    cfg.visual_dim()
                ),
            },
            text_proj: candle_nn::linear(cfg.fused_text_dim(), d, vb.pp("text_proj"))?,
            reg_token: vb.get_with_hints(
                (1, d),
                "reg_token.weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            vl_pos_embed: vb.get_with_hints(
                (n_tokens, d),
                "vl_pos_embed.weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            layers: (0..f.layers)
                .map(|i| EncoderLayer::new(vl.pp(format!("layers.{i}")), f))
                .collect::<Result<_>>()?,
            final_norm: if f.pre_norm {
                Some(LayerNorm::new(vl.pp("norm"), d, 1e-5)?)
            } else {
                None
            },
            bbox_embed: Mlp::new(vb.pp("bbox_embed"), &[d, d, d, 4])?,
            token_attn: match cfg.head {
                BoxHead::RegMlp => None,
                BoxHead::TokenAttention | BoxHead::Dense => Some((
                    candle_nn::linear(d, d, vb.pp("token_attn.q"))?,
                    candle_nn::linear(d, d, vb.pp("token_attn.k"))?,
                )),
            },
            dense_coord: match cfg.head {
                BoxHead::Dense => Some(candle_nn::linear(d, 2, vb.pp("dense_coord"))?),
                _ => None,
            },
            dense_direct: match cfg.head {
                BoxHead::Dense => Some((
                    candle_nn::linear(d, d, vb.pp("dense_direct.q"))?,
                    candle_nn::linear(d, d, vb.pp("dense_direct.k"))?,
                )),
                _ => None,
            },
            word_head: match cfg.word_head {
                true => Some(candle_nn::linear(d, cfg.text_vocab(), vb.pp("word_head"))?),
                false => None,
            },
            hivg_aux: match &cfg.visual {
                VisualConfig::Hivg(h) if h.aux_heads => {
                    Some(HivgAuxHeads::new(vb.pp("hivg_aux"), d)?)
                }
                _ => None,
            },
            clip_head: match &cfg.visual {
                VisualConfig::Hivg(h) if h.contrastive_dim > 0 => Some(ClipHead::new(
                    vb.clone(),
                    h.vision.hidden_size,
                    cfg.text_dim(),
                    h.contrastive_dim,
                )?),
                _ => None,
            },
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &GrounderConfig {
        &self.cfg
    }

    /// The grounder with every LoRA set folded into its backbones' weights: the same
    /// outputs at the cost of the plain model (used for prediction).
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            visual: self.visual.merge_lora()?,
            text: self.text.merge_lora()?,
            ..self.clone()
        })
    }

    /// `pixels: [B, 3, S, S]`, `pixel_mask: [B, S, S]` (1 = image), `ids, text_mask: [B, L]`
    /// (L = `max_text_len`). `mode`: inference, or training with seeded dropout (the
    /// fusion's and the LoRA sets').
    pub fn forward(
        &self,
        pixels: &Tensor,
        pixel_mask: &Tensor,
        ids: &Tensor,
        text_mask: &Tensor,
        mode: Mode,
    ) -> Result<GrounderOutput> {
        self.forward_indexed(pixels, pixel_mask, None, ids, text_mask, mode)
    }

    /// [`Self::forward`] on a grouped batch: `pixels [U, 3, S, S]` hold each distinct
    /// image once and `image_index [B]` (u32) names each sample's row
    /// ([`VisualEncoder::forward_indexed`]); `None` is [`Self::forward`].
    pub fn forward_indexed(
        &self,
        pixels: &Tensor,
        pixel_mask: &Tensor,
        image_index: Option<&Tensor>,
        ids: &Tensor,
        text_mask: &Tensor,
        mode: Mode,
    ) -> Result<GrounderOutput> {
        // dropout inside draws from the mode's seed
        mode.run(|| {
            // Slots past the batch's longest expression are padding in every row: encode and
            // fuse the first `l` only (the same numbers: padded keys are masked out anyway) and
            // pad the text outputs back to `full` with zeros.
            let full = ids.dim(1)?;
            let lay = &self.cfg.layout;
            // the fusion's text mask: the tokenizer's, or CLIP-VG's/HiVG's `id != 0`
            let text_mask = &match lay.mask_zero_ids {
                true => ids.ne(0u32)?.to_dtype(DType::F32)?,
                false => text_mask.to_dtype(DType::F32)?,
            };
            let l = match lay.full_text {
                true => full,
                false => used_text_len(text_mask)?,
            };
            let (ids, text_mask) = (&ids.narrow(1, 0, l)?, &text_mask.narrow(1, 0, l)?);
            let mut text = match lay.full_text {
                true => self.text.forward(ids, &text_mask.ones_like()?)?,
                false => self.text.forward(ids, text_mask)?,
            };
            if lay.text_projection {
                let head = self.clip_head.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("text_projection needs CLIP's projections".into())
                })?;
                text.projected = Some(head.text_projection.forward(&text.tokens)?);
            }
            let visual =
                self.visual
                    .forward_indexed(pixels, pixel_mask, image_index, &text, text_mask)?;
            let v = match &self.visu_proj {
                Some(p) => p.forward(&visual.tokens)?,
                None => visual.tokens.clone(),
            }; // [B, N, d]
            let t = self
                .text_proj
                .forward(text.projected.as_ref().unwrap_or(&text.tokens))?; // [B, l, d]
            let (b, n, d) = v.dims3()?;
            if 1 + full + n != self.vl_pos_embed.dim(0)? {
                candle_core::bail!(
                    "grounder expects {} tokens (1 + text {} + visual {}), got 1 + {full} + {n}",
                    self.vl_pos_embed.dim(0)?,
                    self.cfg.max_text_len,
                    self.cfg.visual_tokens()
                );
            }
            // where the visual and text tokens sit in the fused sequence
            let (vis_at, text_at) = match lay.visual_first {
                true => (1, 1 + n),
                false => (1 + l, 1),
            };
            let reg = self.reg_token.unsqueeze(0)?.broadcast_as((b, 1, d))?;
            let ones = Tensor::ones((b, 1), DType::F32, v.device())?;
            let vmask = visual.mask.to_dtype(DType::F32)?;
            let (mut x, mask) = match lay.visual_first {
                true => (
                    Tensor::cat(&[&reg, &v, &t], 1)?, // [B, 1+N+L, d]
                    Tensor::cat(&[&ones, &vmask, text_mask], 1)?,
                ),
                false => (
                    Tensor::cat(&[&reg, &t, &v], 1)?, // [B, 1+L+N, d]
                    Tensor::cat(&[&ones, text_mask, &vmask], 1)?,
                ),
            };
            let bias = nn::key_padding_bias(&mask, x.dtype())?;
            let pos = if l == full {
                self.vl_pos_embed.clone()
            } else {
                // [REG], text slots, visual: the first `l` text slots
                let p = &self.vl_pos_embed; // [1 + full + N, d]
                match lay.visual_first {
                    true => p.narrow(0, 0, 1 + n + l)?,
                    false => Tensor::cat(&[p.narrow(0, 0, 1 + l)?, p.narrow(0, 1 + full, n)?], 0)?,
                }
            }
            .unsqueeze(0)?;
            for layer in &self.layers {
                x = layer.forward(&x, &pos, &bias)?;
            }
            if let Some(norm) = &self.final_norm {
                x = norm.forward(&x)?;
            }
            let reg = x.i((.., 0))?; // [B, d]
            let visual_tokens = x.narrow(D::Minus2, vis_at, n)?;
            let (gh, gw) = visual.grid;
            let (pred_box, token_probs, cells) = match (&self.token_attn, self.cfg.head) {
                (Some((q, k)), head) => {
                    // contiguous: a strided input sends candle's Linear to a broadcast batched matmul
                    let patches = visual_tokens
                        .narrow(1, n - gh * gw, gh * gw)?
                        .contiguous()?; // [B, N', d] (no CLS)
                    let query = if head == BoxHead::Dense {
                        // [REG] + the mean fused text token: a direct text path into the scores
                        (&reg + nn::masked_mean(&x.narrow(1, text_at, l)?, text_mask)?)?
                    } else {
                        reg.clone()
                    };
                    let centres = cell_centres(gh, gw, x.device())?; // [N', 2]
                    let mut scores = (k
                        .forward(&patches)?
                        .matmul(&q.forward(&query)?.unsqueeze(2)?)?
                        .squeeze(2)? // [B, N']
                        / (d as f64).sqrt())?;
                    if let Some(coord) = &self.dense_coord {
                        // + <coord(query), cell centre in [-1, 1]^2>: "leftmost", "at the top"
                        // become one linear preference over the grid (CoordConv-like prior)
                        let pm = centres.affine(2.0, -1.0)?; // [N', 2]
                        scores = (scores + coord.forward(&query)?.matmul(&pm.t()?)?)?;
                    }
                    if let Some((dq, dk)) = &self.dense_direct {
                        // + <q(mean projected text), k(projected cell)> before fusion: attribute
                        // words meet cell features without passing through the fusion layers
                        // (val Acc@0.5 +9 points at 4 epochs on the twin, attributes 27 -> 48%)
                        let t_mean = nn::masked_mean(&t, text_mask)?; // [B, d]
                        let cells = v.narrow(1, n - gh * gw, gh * gw)?; // [B, N', d]
                        let direct = dk
                            .forward(&cells)?
                            .matmul(&dq.forward(&t_mean)?.unsqueeze(2)?)?
                            .squeeze(2)?; // [B, N']
                        scores = (scores + (direct / (d as f64).sqrt())?)?;
                    }
                    let pad = nn::key_padding_bias(
                        &visual.mask.narrow(1, n - gh * gw, gh * gw)?,
                        scores.dtype(),
                    )?
                    .flatten_from(1)?;
                    let scores = (scores + pad)?;
                    let probs = nn::softmax(&scores)?;
                    let step = Tensor::new(&[1.0 / gw as f32, 1.0 / gh as f32], x.device())?;
                    if head == BoxHead::Dense {
                        let raw = self.bbox_embed.forward(&patches)?; // [B, N', 4]
                        let offset = raw.narrow(2, 0, 2)?.tanh()?.broadcast_mul(&step)?;
                        let centre = offset.broadcast_add(&centres)?;
                        let boxes = Tensor::cat(&[centre, nn::sigmoid(&raw.narrow(2, 2, 2)?)?], 2)?;
                        let best = scores
                            .argmax_keepdim(1)? // [B, 1]
                            .unsqueeze(2)?
                            .broadcast_as((b, 1, 4))?
                            .contiguous()?;
                        let pred = boxes.gather(&best, 1)?.squeeze(1)?; // [B, 4]
                        (pred, Some(probs), Some((scores, boxes)))
                    } else {
                        let centre = probs.matmul(&centres)?; // [B, 2]
                        let raw = self.bbox_embed.forward(&reg)?; // [B, 4]
                        let offset = raw.narrow(1, 0, 2)?.tanh()?.broadcast_mul(&step)?;
                        let wh = nn::sigmoid(&raw.narrow(1, 2, 2)?)?;
                        (
                            Tensor::cat(&[(centre + offset)?, wh], 1)?,
                            Some(probs),
                            None,
                        )
                    }
                }
                (None, _) => (nn::sigmoid(&self.bbox_embed.forward(&reg)?)?, None, None),
            };
            let text_tokens = x.narrow(D::Minus2, text_at, l)?;
            let aux = match &self.hivg_aux {
                Some(h) => Some(h.forward(&visual_tokens, &text_tokens, text_mask, visual.grid)?),
                None => None,
            };
            let clip = match &self.clip_head {
                Some(h) => Some(h.forward(&visual.pooled, &text.pooled)?),
                None => None,
            };
            let word_logits = match &self.word_head {
                Some(h) => {
                    let (gh, gw) = visual.grid;
                    Some(h.forward(&v.narrow(1, n - gh * gw, gh * gw)?)?) // [B, N', V]
                }
                None => None,
            };
            let pad = |t: &Tensor| t.pad_with_zeros(1, 0, full - l); // [B, l, C] -> [B, full, C]
            let text = TextFeatures {
                tokens: pad(&text.tokens)?,
                pooled: text.pooled,
                hidden_states: text.hidden_states.iter().map(pad).collect::<Result<_>>()?,
                projected: text.projected.as_ref().map(pad).transpose()?,
            };
            Ok(GrounderOutput {
                pred_box,
                token_probs,
                cells,
                aux,
                word_logits,
                clip,
                reg,
                text_tokens: pad(&text_tokens)?,
                visual_tokens,
                visual,
                text,
            })
        })
    }
}

/// One past the last text slot that any row of `text_mask [B, L]` keeps (at least 1).
fn used_text_len(text_mask: &Tensor) -> Result<usize> {
    let rows = text_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let last = rows
        .iter()
        .filter_map(|r| r.iter().rposition(|&m| m > 0.0))
        .max();
    Ok(last.map_or(1, |i| i + 1))
}

/// `[gh * gw, 2]` normalised (x, y) centres of the grid cells, row-major.
fn cell_centres(gh: usize, gw: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let c: Vec<f32> = (0..gh * gw)
        .flat_map(|i| {
            [
                ((i % gw) as f32 + 0.5) / gw as f32,
                ((i / gw) as f32 + 0.5) / gh as f32,
            ]
        })
        .collect();
    Tensor::from_vec(c, (gh * gw, 2), dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hivg::{BridgeMode, BridgeText};
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn tiny_grounder_shapes_and_all_parameters_get_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for head in [BoxHead::RegMlp, BoxHead::TokenAttention, BoxHead::Dense] {
            for backbone in [
                "clip",
                "conv",
                "qrnet",
                "hivg",
                "detr",
                "hivg-release",
                "mixup",
                "clip-vg",
            ] {
                let map = VarMap::new();
                let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
                let mut cfg = GrounderConfig {
                    head,
                    word_head: head == BoxHead::Dense,
                    ..GrounderConfig::tiny()
                };
                match backbone {
                    "conv" => cfg.visual = VisualConfig::ConvNet(ConvNetConfig::tiny()),
                    // reduction 1: the channel gate's hidden layer is 12 wide, not 3, whose
                    // ReLUs could all be dead at an unseeded init (7 in ~100 runs at 3)
                    "qrnet" => {
                        cfg.visual = VisualConfig::QrNet(QrNetConfig {
                            reduction: 1,
                            ..QrNetConfig::tiny(cfg.text_dim())
                        })
                    }
                    "hivg" => {
                        cfg.visual =
                            VisualConfig::Hivg(HivgConfig::tiny(cfg.text_dim(), cfg.max_text_len))
                    }
                    // the published systems' layouts, as `import hivg` / `import clip-vg` make
                    "hivg-release" | "mixup" | "clip-vg" => {
                        let tiny = HivgConfig::tiny(cfg.text_dim(), cfg.max_text_len);
                        let h = HivgConfig {
                            level_norm: false,
                            bridge_mode: BridgeMode::Batched,
                            bridge_text: match backbone {
                                "mixup" => BridgeText::Projected,
                                _ => BridgeText::Hidden,
                            },
                            aux_heads: false,
                            patch_mask: PatchMask::BilinearAntialias,
                            ..tiny.clone()
                        };
                        cfg.layout = FusionLayout::clip_release(backbone != "clip-vg");
                        cfg.visual = VisualConfig::Hivg(match backbone {
                            "clip-vg" => HivgConfig {
                                bridge_layers: Vec::new(),
                                text_layers: Vec::new(),
                                patch_mask: PatchMask::Bilinear,
                                proj_dim: cfg.fusion.hidden,
                                ..h
                            },
                            _ => h,
                        });
                    }
                    "detr" => {
                        // Width 8, not 2: the weights are drawn unseeded, and a bottleneck's
                        // c x c 1x1 conv after a ReLU is dead (no gradient) when all of its
                        // weights are negative, p = 2^-(c*c): 1/16 per block at width 2.
                        cfg.visual = VisualConfig::Detr(DetrConfig {
                            backbone: crate::resnet::ResNetConfig {
                                layers: [1, 1, 1, 1],
                                width: 8,
                                dilation: true,
                            },
                            encoder: EncoderConfig {
                                layers: 1,
                                ..cfg.fusion.clone()
                            },
                        })
                    }
                    _ => {}
                }
                check_gradients(&map, vb, &cfg)?;
            }
        }
        Ok(())
    }

    /// A sample's output does not depend on its batch: shared images (`image_index`) give
    /// what per-sample copies give, and a short expression gives the same whether or not
    /// a longer one shares the batch (text slots past the longest are cut).
    #[test]
    fn shared_images_and_cut_text_slots_change_nothing() -> Result<()> {
        let dev = Device::Cpu;
        for backbone in ["conv", "qrnet"] {
            let map = VarMap::new();
            let mut cfg = GrounderConfig {
                head: BoxHead::Dense,
                visual: VisualConfig::ConvNet(ConvNetConfig::tiny()),
                ..GrounderConfig::tiny()
            };
            if backbone == "qrnet" {
                cfg.visual = VisualConfig::QrNet(QrNetConfig::tiny(cfg.text_dim()));
            }
            let g = Grounder::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
            let (s, l) = (cfg.image_size, cfg.max_text_len);
            let images = Tensor::randn(0f32, 1.0, (2, 3, s, s), &dev)?;
            let image_mask = Tensor::ones((2, s, s), DType::F32, &dev)?;
            let index = Tensor::new(&[1u32, 0, 1], &dev)?;
            // rows: 3, 5 and all l tokens
            let lens = [3usize, 5, l];
            let mask: Vec<f32> = (lens.iter())
                .flat_map(|&n| (0..l).map(move |j| (j < n) as u8 as f32))
                .collect();
            let mask = Tensor::from_vec(mask, (3, l), &dev)?;
            let ids = Tensor::arange(1u32, 1 + 3 * l as u32, &dev)? // ids < 1000 (tiny vocab)
                .reshape((3, l))?
                .mul(&mask.to_dtype(DType::U32)?)?;
            let shared =
                g.forward_indexed(&images, &image_mask, Some(&index), &ids, &mask, Mode::Eval)?;
            let copies = g.forward(
                &images.index_select(&index, 0)?,
                &image_mask.index_select(&index, 0)?,
                &ids,
                &mask,
                Mode::Eval,
            )?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(
                diff(&shared.pred_box, &copies.pred_box)? < 1e-5,
                "{backbone}"
            );
            // the first two rows alone: text cut to 5 slots instead of l
            let two = Tensor::new(&[0u32, 1], &dev)?;
            let short = g.forward(
                &images.index_select(&index.index_select(&two, 0)?, 0)?,
                &image_mask.narrow(0, 0, 2)?,
                &ids.narrow(0, 0, 2)?,
                &mask.narrow(0, 0, 2)?,
                Mode::Eval,
            )?;
            let (c_short, c_full) = (
                short.cells.as_ref().unwrap().0.clone(),
                copies.cells.as_ref().unwrap().0.narrow(0, 0, 2)?,
            );
            assert!(diff(&c_short, &c_full)? < 1e-4, "{backbone}: cell scores");
            assert_eq!(short.text_tokens.dims(), &[2, l, cfg.fusion.hidden]);
            assert_eq!(short.text.tokens.dims()[1], l);
        }
        Ok(())
    }

    #[test]
    fn dense_head_predicts_the_best_cells_box() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let cfg = GrounderConfig {
            head: BoxHead::Dense,
            visual: VisualConfig::ConvNet(ConvNetConfig::tiny()),
            ..GrounderConfig::tiny()
        };
        let g = Grounder::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
        let s = cfg.image_size;
        let out = g.forward(
            &Tensor::randn(0f32, 1.0, (3, 3, s, s), &dev)?,
            &Tensor::ones((3, s, s), DType::F32, &dev)?,
            &Tensor::ones((3, cfg.max_text_len), DType::U32, &dev)?,
            &Tensor::ones((3, cfg.max_text_len), DType::F32, &dev)?,
            Mode::Eval,
        )?;
        let (scores, boxes) = out.cells.expect("dense head gives cells");
        let (scores, boxes) = (scores.to_vec2::<f32>()?, boxes.to_vec3::<f32>()?);
        let pred = out.pred_box.to_vec2::<f32>()?;
        let g = 4; // tiny convnet grid
        for i in 0..3 {
            let best = (0..g * g)
                .max_by(|&a, &b| scores[i][a].total_cmp(&scores[i][b]))
                .unwrap();
            assert_eq!(pred[i], boxes[i][best]);
            // centre within one cell of its cell's centre
            let (cx, cy) = (
                ((best % g) as f32 + 0.5) / 4.0,
                ((best / g) as f32 + 0.5) / 4.0,
            );
            assert!((pred[i][0] - cx).abs() <= 0.25 && (pred[i][1] - cy).abs() <= 0.25);
        }
        Ok(())
    }

    fn check_gradients(map: &VarMap, vb: VarBuilder, cfg: &GrounderConfig) -> Result<()> {
        let dev = Device::Cpu;
        let g = Grounder::new(vb, cfg)?;
        // Zero-initialised parts block their inputs' gradient by design at the start
        // (QRNet's dynamic layers, HiVG's bridges): move them off zero
        for (name, var) in map.data().lock().unwrap().iter() {
            if name.ends_with(".v") || name.contains("cross_mlp.fc2") || name.contains("adaptive") {
                var.set(&Tensor::randn(0f32, 0.1, var.shape(), &dev)?)?;
            }
        }
        let b = 2;
        let s = cfg.image_size;
        let pixels = Tensor::randn(0f32, 1.0, (b, 3, s, s), &dev)?;
        let mut pm = vec![1f32; b * s * s];
        pm[s * s..s * s + s * 8].iter_mut().for_each(|v| *v = 0.0); // padded top rows of sample 1
        let pixel_mask = Tensor::from_vec(pm, (b, s, s), &dev)?;
        let ids = Tensor::from_vec(
            (0..b * cfg.max_text_len)
                .map(|i| (i % 50) as u32 + 1)
                .collect::<Vec<_>>(),
            (b, cfg.max_text_len),
            &dev,
        )?;
        let mut tm = vec![1f32; b * cfg.max_text_len];
        tm[cfg.max_text_len + 5..].iter_mut().for_each(|v| *v = 0.0);
        let text_mask = Tensor::from_vec(tm, (b, cfg.max_text_len), &dev)?;
        let out = g.forward(
            &pixels,
            &pixel_mask,
            &ids,
            &text_mask,
            Mode::Train { seed: 0 },
        )?;
        assert_eq!(out.pred_box.dims(), &[b, 4]);
        assert_eq!(out.visual_tokens.dims(), &[b, cfg.visual_tokens(), 32]);
        // a loss touching every output path
        let mut loss = (out.pred_box.sum_all()? + out.visual.pooled.sqr()?.sum_all()?)?;
        if let Some(aux) = &out.aux {
            loss = (loss + aux.token_sim.sqr()?.mean_all()? + aux.seg.sqr()?.mean_all()?)?;
        }
        if let Some(c) = &out.clip {
            // (a softmax of the scaled logits can saturate at random init: no gradient)
            let embeds = (c.image.sqr()?.mean_all()? + c.text.sqr()?.mean_all()?)?;
            loss = (loss + embeds.broadcast_mul(&c.scale)?)?;
        }
        if let Some((scores, boxes)) = &out.cells {
            // + the raw score of the last cell (never padded here): the softmax alone can
            // saturate at an unseeded init and pass no gradient to the score path (1 in ~100)
            let n = scores.dim(1)?;
            let first = nn::softmax(scores)?.narrow(1, 0, 1)?.sum_all()?;
            let last = scores.narrow(1, n - 1, 1)?.sum_all()?;
            loss = (loss + first + last + boxes.sum_all()?)?;
        }
        if let Some(w) = &out.word_logits {
            loss = (loss + w.sqr()?.mean_all()?)?;
        }
        let grads = loss.backward()?;
        let data = map.data().lock().unwrap();
        let mut missing = Vec::new();
        for (name, var) in data.iter() {
            match grads.get(var) {
                Some(g) => {
                    let s = g.abs()?.sum_all()?.to_scalar::<f32>()?;
                    if !(s.is_finite() && s > 0.0) {
                        missing.push(format!("{name} (|g| = {s})"));
                    }
                }
                None => missing.push(format!("{name} (none)")),
            }
        }
        // The BERT pooler is not in the box loss; frozen batch norms are buffers and must
        // get none.
        let buffer =
            |n: &str| n.starts_with("visual.backbone.") && crate::resnet::is_frozen_buffer(n);
        for (name, var) in data.iter() {
            if buffer(name) {
                assert!(
                    grads.get(var).is_none(),
                    "{name} is a frozen buffer but got a gradient"
                );
            }
        }
        // A key projection's bias adds the same `<b, q>` to every score of a query: where
        // only the softmax reads the scores (the token-attention head) its true gradient is
        // 0 (the rounding noise it usually gets is exactly 0 now and then).
        let score_key_bias =
            |n: &str| n.starts_with("token_attn.k.bias") || n.starts_with("dense_direct.k.bias");
        missing.retain(|n| {
            !n.starts_with("text.pooler")
                && !buffer(n.split(' ').next().unwrap())
                && !score_key_bias(n)
        });
        assert!(
            missing.is_empty(),
            "parameters without gradient: {missing:#?}"
        );
        Ok(())
    }
}
