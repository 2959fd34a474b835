//! CLIP vision and text transformers in the Hugging Face key layout.
//!
//! Port of transformers `models/clip/modeling_clip.py`
//! (<https://github.com/huggingface/transformers/blob/v4.57.0/src/transformers/models/clip/modeling_clip.py>):
//! `CLIPVisionEmbeddings`, `CLIPTextEmbeddings`, `CLIPAttention`, `CLIPMLP`,
//! `CLIPEncoderLayer`, `CLIPVisionTransformer`, `CLIPTextTransformer`, `CLIPModel`.
//! Keys: `vision_model.*`, `text_model.*`, `visual_projection`, `text_projection`,
//! `logit_scale`. Built only from the trainable ops of [`crate::nn`], and returning every
//! layer's hidden state (HiVG reads intermediate layers). Checked against transformers on
//! a tiny random model in `tests/clip_parity.rs`.

use crate::lora::{self, LoraConfig, LoraLinear};
use crate::nn::{self, Activation, LayerNorm};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// `CLIPVisionConfig` (field names and defaults as in transformers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// LoRA sets on the tower's linear layers (ours; absent from Hugging Face configs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lora: Vec<LoraConfig>,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self::vit_base_patch32()
    }
}

impl ClipVisionConfig {
    pub fn vit_base_patch32() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            lora: Vec::new(),
        }
    }
    pub fn vit_base_patch16() -> Self {
        Self {
            patch_size: 16,
            ..Self::vit_base_patch32()
        }
    }
    pub fn vit_large_patch14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            ..Self::vit_base_patch32()
        }
    }
    /// A few-thousand-parameter model for tests.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 32,
            patch_size: 8,
            ..Self::vit_base_patch32()
        }
    }
    /// Patches per side at the pre-training image size.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// `CLIPTextConfig` (field names and defaults as in transformers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// LoRA sets on the tower's linear layers (ours; absent from Hugging Face configs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lora: Vec<LoraConfig>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self::base()
    }
}

impl ClipTextConfig {
    /// The text tower of ViT-B/32 and ViT-B/16.
    pub fn base() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
            lora: Vec::new(),
        }
    }
    /// The text tower of ViT-L/14.
    pub fn large() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_attention_heads: 12,
            ..Self::base()
        }
    }
    pub fn tiny() -> Self {
        Self {
            vocab_size: 1000,
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 16,
            bos_token_id: 998,
            eos_token_id: 999,
            ..Self::base()
        }
    }
}

/// `CLIPConfig`: both towers and the shared projection size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
}

fn default_projection_dim() -> usize {
    512
}

impl ClipConfig {
    pub fn vit_base_patch32() -> Self {
        Self {
            text_config: ClipTextConfig::base(),
            vision_config: ClipVisionConfig::vit_base_patch32(),
            projection_dim: 512,
        }
    }
    pub fn vit_base_patch16() -> Self {
        Self {
            vision_config: ClipVisionConfig::vit_base_patch16(),
            ..Self::vit_base_patch32()
        }
    }
    pub fn vit_large_patch14() -> Self {
        Self {
            text_config: ClipTextConfig::large(),
            vision_config: ClipVisionConfig::vit_large_patch14(),
            projection_dim: 768,
        }
    }
    pub fn tiny() -> Self {
        Self {
            text_config: ClipTextConfig::tiny(),
            vision_config: ClipVisionConfig::tiny(),
            projection_dim: 24,
        }
    }
}

/// `CLIPAttention`: q/k/v/out projections with bias (each with the LoRA sets that target it).
#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    out_proj: LoraLinear,
    heads: usize,
}

impl ClipAttention {
    pub fn new(vb: VarBuilder, dim: usize, heads: usize, lora: &[LoraConfig]) -> Result<Self> {
        Ok(Self {
            q_proj: lora::linear(dim, dim, vb.pp("q_proj"), lora)?,
            k_proj: lora::linear(dim, dim, vb.pp("k_proj"), lora)?,
            v_proj: lora::linear(dim, dim, vb.pp("v_proj"), lora)?,
            out_proj: lora::linear(dim, dim, vb.pp("out_proj"), lora)?,
            heads,
        })
    }

    /// LoRA folded into the projections.
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            q_proj: self.q_proj.merge()?,
            k_proj: self.k_proj.merge()?,
            v_proj: self.v_proj.merge()?,
            out_proj: self.out_proj.merge()?,
            heads: self.heads,
        })
    }

    /// Self-attention: `x: [B, L, C]`, `bias` additive `[B|1, 1, L|1, L]` -> `[B, L, C]`.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.forward_kv(x, x, bias)
    }

    /// Cross-attention (HiVG's bridge): queries from `x: [B, N, C]`, keys and values from
    /// `kv: [B, L, C]`, `bias` broadcastable to `[B, heads, N, L]` -> `[B, N, C]`.
    pub fn forward_kv(&self, x: &Tensor, kv: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (q, k, v) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(kv)?,
            self.v_proj.forward(kv)?,
        );
        self.out_proj
            .forward(&nn::attention(&q, &k, &v, self.heads, bias)?)
    }
}

/// `CLIPMLP`: fc1 -> activation -> fc2.
#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
    act: Activation,
}

impl ClipMlp {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        hidden: usize,
        act: Activation,
        lora: &[LoraConfig],
    ) -> Result<Self> {
        Ok(Self {
            fc1: lora::linear(dim, hidden, vb.pp("fc1"), lora)?,
            fc2: lora::linear(hidden, dim, vb.pp("fc2"), lora)?,
            act,
        })
    }

    /// An MLP from built layers (HiVG's bridge builds its own).
    pub fn from_parts(fc1: LoraLinear, fc2: LoraLinear, act: Activation) -> Self {
        Self { fc1, fc2, act }
    }

    /// LoRA folded into the layers.
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            fc1: self.fc1.merge()?,
            fc2: self.fc2.merge()?,
            act: self.act,
        })
    }
}

impl Module for ClipMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

/// `CLIPEncoderLayer` (pre-norm). The two residual blocks are public so a bridge
/// (HiVG) can run between them.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        hidden: usize,
        act: Activation,
        eps: f64,
        lora: &[LoraConfig],
    ) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), dim, heads, lora)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), dim, eps)?,
            mlp: ClipMlp::new(vb.pp("mlp"), dim, hidden, act, lora)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), dim, eps)?,
        })
    }

    /// The layer with its LoRA sets folded into the base weights.
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            self_attn: self.self_attn.merge_lora()?,
            layer_norm1: self.layer_norm1.clone(),
            mlp: self.mlp.merge_lora()?,
            layer_norm2: self.layer_norm2.clone(),
        })
    }

    /// `x + attn(ln1(x))`.
    pub fn attn_block(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, bias)?
    }

    /// `x + mlp(ln2(x))`.
    pub fn mlp_block(&self, x: &Tensor) -> Result<Tensor> {
        x + self.mlp.forward(&self.layer_norm2.forward(x)?)?
    }

    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.mlp_block(&self.attn_block(x, bias)?)
    }
}

#[allow(clippy::too_many_arguments)] // the shape of one tower, shared by vision and text
fn encoder_layers(
    vb: VarBuilder,
    n: usize,
    dim: usize,
    heads: usize,
    hidden: usize,
    act: Activation,
    eps: f64,
    lora: &[LoraConfig],
) -> Result<Vec<ClipEncoderLayer>> {
    (0..n)
        .map(|i| {
            ClipEncoderLayer::new(
                vb.pp(format!("encoder.layers.{i}")),
                dim,
                heads,
                hidden,
                act,
                eps,
                lora,
            )
        })
        .collect()
}

/// Every layer with its LoRA sets folded in (the config keeps no sets).
fn merge_layers(layers: &[ClipEncoderLayer]) -> Result<Vec<ClipEncoderLayer>> {
    layers.iter().map(ClipEncoderLayer::merge_lora).collect()
}

/// What a CLIP tower returns.
#[derive(Debug, Clone)]
pub struct ClipTowerOutput {
    /// Input embeddings then every layer's output: `num_hidden_layers + 1` tensors `[B, L, C]`
    /// (as transformers' `hidden_states`; for vision the first is after `pre_layrnorm`).
    pub hidden_states: Vec<Tensor>,
    /// `[B, L, C]`: vision: last layer output; text: `final_layer_norm` of it.
    pub last_hidden_state: Tensor,
    /// `[B, C]`: vision: `post_layernorm(CLS)`; text: the EOS token of `last_hidden_state`.
    pub pooled: Tensor,
}

/// `CLIPVisionTransformer`.
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    /// `[C, 3, p, p]`, applied as a patchify + matmul (equal to the stride-p convolution,
    /// whose candle backward is very slow on CPU).
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    pub layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    cfg: ClipVisionConfig,
}

impl ClipVisionTransformer {
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let p = cfg.patch_size;
        let fan_in = (cfg.num_channels * p * p) as f64;
        let n_pos = cfg.grid() * cfg.grid() + 1;
        Ok(Self {
            class_embedding: emb.get_with_hints(
                c,
                "class_embedding",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            patch_embedding: emb.get_with_hints(
                (c, cfg.num_channels, p, p),
                "patch_embedding.weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / fan_in.sqrt(),
                },
            )?,
            position_embedding: emb.get_with_hints(
                (n_pos, c),
                "position_embedding.weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), c, cfg.layer_norm_eps)?,
            layers: encoder_layers(
                vb.clone(),
                cfg.num_hidden_layers,
                c,
                cfg.num_attention_heads,
                cfg.intermediate_size,
                cfg.hidden_act,
                cfg.layer_norm_eps,
                &cfg.lora,
            )?,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), c, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    /// The tower with its LoRA sets folded into the base weights: the same outputs, the
    /// cost of a plain CLIP.
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            layers: merge_layers(&self.layers)?,
            cfg: ClipVisionConfig {
                lora: Vec::new(),
                ..self.cfg.clone()
            },
            ..self.clone()
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// Position embeddings `[1 + gh*gw, C]` for a `gh x gw` patch grid: the stored table,
    /// or its patch part resized bicubically (align_corners=False) as transformers'
    /// `interpolate_pos_encoding` does.
    pub fn position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g = self.cfg.grid();
        if gh == g && gw == g {
            return Ok(self.position_embedding.clone());
        }
        let c = self.cfg.hidden_size;
        let cls = self.position_embedding.i(0..1)?;
        let grid = self.position_embedding.i(1..)?.reshape((g, g, c))?; // [g, g, C]
        let dev = grid.device();
        let mh = bicubic_matrix(g, gh, dev)?; // [gh, g]
        let mw = bicubic_matrix(g, gw, dev)?; // [gw, g]
                                              // rows: [gh, g] x [g, g*C] -> [gh, g, C]; columns: per row [gw, g] x [g, C]
        let rows = mh.matmul(&grid.reshape((g, g * c))?)?.reshape((gh, g, c))?;
        let cols = mw
            .unsqueeze(0)?
            .broadcast_as((gh, gw, g))?
            .contiguous()?
            .matmul(&rows)?; // [gh, gw, C]
        Tensor::cat(&[cls, cols.reshape((gh * gw, c))?], 0)
    }

    /// `pixels: [B, 3, H, W]` (H, W multiples of the patch size) -> all hidden states.
    pub fn forward(&self, pixels: &Tensor) -> Result<ClipTowerOutput> {
        let x = self.embed(pixels)?;
        let mut hidden_states = vec![x.clone()];
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
            hidden_states.push(x.clone());
        }
        let pooled = self.post_layernorm.forward(&x.i((.., 0))?)?;
        Ok(ClipTowerOutput {
            hidden_states,
            last_hidden_state: x,
            pooled,
        })
    }

    /// Patch + class + position embeddings, then `pre_layrnorm`: `[B, 1 + N, C]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let c = self.cfg.hidden_size;
        let (gh, gw) = (h / p, w / p);
        if gh * p != h || gw * p != w {
            candle_core::bail!("image size {h}x{w} is not a multiple of the patch size {p}");
        }
        let patches = nn::patch_embed(pixels, &self.patch_embedding)?; // [B, N, C]
        let cls = self
            .class_embedding
            .reshape((1, 1, c))?
            .broadcast_as((b, 1, c))?;
        let x =
            Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings(gh, gw)?)?;
        self.pre_layrnorm.forward(&x)
    }

    /// `post_layernorm`, for callers that pool themselves.
    pub fn post_layernorm(&self, x: &Tensor) -> Result<Tensor> {
        self.post_layernorm.forward(x)
    }
}

/// PyTorch's bicubic (A = -0.75, align_corners=False, borders clamped) as a `[out, in]` matrix.
fn bicubic_matrix(n_in: usize, n_out: usize, dev: &Device) -> Result<Tensor> {
    const A: f64 = -0.75;
    let cc1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = n_in as f64 / n_out as f64;
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let real = (o as f64 + 0.5) * scale - 0.5;
        let base = real.floor();
        let t = real - base;
        let w = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let idx = (base as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            m[o * n_in + idx] += *wk as f32;
        }
    }
    Tensor::from_vec(m, (n_out, n_in), dev)
}

/// `CLIPTextTransformer`.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: candle_nn::Embedding,
    position_embedding: Tensor,
    pub layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipTextTransformer {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, c, emb.pp("token_embedding"))?,
            position_embedding: emb.get_with_hints(
                (cfg.max_position_embeddings, c),
                "position_embedding.weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
            )?,
            layers: encoder_layers(
                vb.clone(),
                cfg.num_hidden_layers,
                c,
                cfg.num_attention_heads,
                cfg.intermediate_size,
                cfg.hidden_act,
                cfg.layer_norm_eps,
                &cfg.lora,
            )?,
            final_layer_norm: LayerNorm::new(vb.pp("final_layer_norm"), c, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    /// The tower with its LoRA sets folded into the base weights.
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            layers: merge_layers(&self.layers)?,
            cfg: ClipTextConfig {
                lora: Vec::new(),
                ..self.cfg.clone()
            },
            ..self.clone()
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// `ids: [B, L]` (u32/i64), `mask: [B, L]` (1 = token, 0 = pad) -> all hidden states.
    ///
    /// Causal attention plus the padding mask; the pooled output is the first EOS token
    /// (or the largest id when `eos_token_id == 2`, as transformers does for old configs).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<ClipTowerOutput> {
        let l = ids.dim(1)?;
        if l > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "text length {l} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.i(0..l)?)?;
        let mut bias = nn::causal_bias(l, x.dtype(), x.device())?;
        if let Some(mask) = mask {
            bias = bias.broadcast_add(&nn::key_padding_bias(mask, x.dtype())?)?;
        }
        let mut hidden_states = vec![x.clone()];
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&bias))?;
            hidden_states.push(x.clone());
        }
        let last = self.final_layer_norm.forward(&x)?;
        let eos = self.eos_positions(ids)?;
        let pooled = gather_rows(&last, &eos)?;
        Ok(ClipTowerOutput {
            hidden_states,
            last_hidden_state: last,
            pooled,
        })
    }

    /// Index of the pooled (EOS) token in each row.
    pub fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        Ok(rows
            .iter()
            .map(|r| {
                if self.cfg.eos_token_id == 2 {
                    // argmax, first maximum
                    r.iter()
                        .enumerate()
                        .fold(0, |best, (i, v)| if *v > r[best] { i } else { best })
                } else {
                    r.iter()
                        .position(|v| *v == self.cfg.eos_token_id as i64)
                        .unwrap_or(0)
                }
            })
            .collect())
    }
}

/// `x: [B, L, C]`, one position per row -> `[B, C]`.
pub fn gather_rows(x: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let (b, l, _) = x.dims3()?;
    let flat: Vec<u32> = pos
        .iter()
        .enumerate()
        .map(|(i, p)| (i * l + p) as u32)
        .collect();
    let idx = Tensor::from_vec(flat, b, x.device())?;
    x.flatten_to(1)?.index_select(&idx, 0)
}

/// `CLIPModel`: both towers and their projections.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub vision: ClipVisionTransformer,
    pub text: ClipTextTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    logit_scale: Tensor,
}

/// Projected (not normalised) embeddings and the towers' outputs.
#[derive(Debug, Clone)]
pub struct ClipEmbeds {
    pub tower: ClipTowerOutput,
    /// `[B, projection_dim]`.
    pub embeds: Tensor,
}

impl ClipModel {
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let p = cfg.projection_dim;
        Ok(Self {
            vision: ClipVisionTransformer::new(vb.pp("vision_model"), &cfg.vision_config)?,
            text: ClipTextTransformer::new(vb.pp("text_model"), &cfg.text_config)?,
            visual_projection: nn::linear(
                vb.pp("visual_projection"),
                cfg.vision_config.hidden_size,
                p,
                false,
            )?,
            text_projection: nn::linear(
                vb.pp("text_projection"),
                cfg.text_config.hidden_size,
                p,
                false,
            )?,
            logit_scale: vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(2.6592))?,
        })
    }

    /// Both towers with their LoRA sets folded into the base weights.
    pub fn merge_lora(&self) -> Result<Self> {
        Ok(Self {
            vision: self.vision.merge_lora()?,
            text: self.text.merge_lora()?,
            ..self.clone()
        })
    }

    pub fn encode_image(&self, pixels: &Tensor) -> Result<ClipEmbeds> {
        let tower = self.vision.forward(pixels)?;
        let embeds = self.visual_projection.forward(&tower.pooled)?;
        Ok(ClipEmbeds { tower, embeds })
    }

    pub fn encode_text(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<ClipEmbeds> {
        let tower = self.text.forward(ids, mask)?;
        let embeds = self.text_projection.forward(&tower.pooled)?;
        Ok(ClipEmbeds { tower, embeds })
    }

    pub fn project_visual(&self, x: &Tensor) -> Result<Tensor> {
        self.visual_projection.forward(x)
    }

    pub fn project_text(&self, x: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(x)
    }

    /// `exp(logit_scale)`.
    pub fn logit_scale(&self) -> Result<Tensor> {
        self.logit_scale.exp()
    }

    /// `logits_per_image [B_img, B_txt]` = scale * cos(image, text).
    pub fn logits_per_image(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let i = nn::l2_normalize(image_embeds)?;
        let t = nn::l2_normalize(text_embeds)?;
        i.matmul(&t.t()?)?.broadcast_mul(&self.logit_scale()?)
    }
}
