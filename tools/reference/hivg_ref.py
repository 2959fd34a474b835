"""HiVG (Xiao et al., ACM MM 2024) box inference in PyTorch: groundkit's own transcription, for parity fixtures.

Written from /work/shared/checkpoints.md Part B §2 and a reading of linhuixiao/HiVG @51f9233 (models/HiVG.py,
models/vl_transformer.py, hivg_train.py, datasets/transforms.py) and huggingface/peft v0.3.0 (tuners/lora.py,
peft_model.py); no code is copied. It sits on top of HF `transformers.CLIPModel` (built from a CLIPConfig, never
downloaded) and reuses its embeddings, layer norms, self-attentions and MLPs, as HiVG does. Every size is a
parameter, so tiny models have exactly the released layout (key names, key order, ranks):

  clip            CLIPModel wrapped (1 + hi_lora_stage) times in peft-0.3 PeftModel/LoraModel, so every key reads
                  `clip.` + `base_model.model.` * depth + the transformers-4.30 CLIPModel name (incl. the persistent
                  `position_ids` buffers of 4.30); q/k/v/out_proj of every text layer, every vision self-attention
                  and every bridge cross-attention are peft-0.3 LoRA Linears (`X.weight`, `X.bias`,
                  `X.lora_A.default.weight` [r, in], `X.lora_B.default.weight` [out, r]; W_eff = W + alpha/r * B @ A)
  vision tower    HiVG's CLIP_Vision_Model_with_Crossmodal_Bridge: HF embeddings (class token, patch conv,
                  position table, its own persistent position_ids), pre-LN, layers with the bridge in `adapt_layer`
                    h = h + SA(LN1 h)
                    x = cross_norm(h); T~ = cross_gate(concat_i(E_i * T_i + T_i))   (adaptive weights)
                                     or T~ = T_last                                 (no adaptive weights)
                    h = h + cross_mlp(cross_attn(x, T~))        (no norm in between, no mask)
                    h = h + MLP(LN2 h)
                  T_i = CLIP text hidden_states[k] (pre final LN) for k in extract_text_layer; mixup-pretrain:
                  T_last = condition_text_proj(text_projection(last_hidden_state)).
  cross-attention bridge_mode 'batched': HiVG's own memory reinterpretation (T~ permuted to [77, B, C], k/v
                  projected, then `.view(B, -1, heads, hd)`: sample b' key l' reads row 77 b' + l' of the
                  [77 * B] (l-major) buffer, i.e. text position (77 b' + l') // B of sample (77 b' + l') % B);
                  'per_sample': each sample attends to its own 77 text states. Identical at batch 1.
  text            HF text model on all 77 positions, causal mask only (no padding mask); fusion text =
                  text_proj(text_projection(last_hidden_state)) (post final LN)
  visual          concat(vision hidden_states[extract_vision_layer]) (pre post-LN, incl. CLS) ->
                  ml_visual_projection -> visu_proj
  fusion          [REG; visual (CLS first, 1 + N); text 77], mask [0, 0, patch mask, token == 0], vl_pos_embed added
                  to q and k, DETR pre-norm encoder layers (normalize_before) with the final encoder.norm,
                  box = sigmoid(bbox_embed(token 0)) = cxcywh normalised by the square canvas
  patch mask      torchvision Resize([g, g]) of the int32 pad mask (torchvision 0.17: bilinear, antialias=True),
                  round half to even, bool

Also here: the Namespace of hivg_train.py, its AdamW + cosine LambdaLR states, the newer-peft `base_layer` renaming.
make_hivg_fixtures.py uses all of it.
"""
from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import transvg_ref as T

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "wte")  # HiVG.py:776


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------
class ClipVgTokens(T.VisuTokens):
    """CLIP-VG / HiVG: `vl_pos_embed` has a row per token of [REG, visual (CLS + grid), text (context_length)]."""

    @property
    def vl_pos_rows(self) -> int:
        return self.num_visu_token + 1 + self.context_length + 1


@dataclass(frozen=True)
class HiVGConfig(ClipVgTokens):
    variant: str = "B"  # "B": ViT-B/16 layout; "L": ViT-L/14 layout (HiVG.py:661-683)
    dataset: str = "unc"  # decides extract_text_layer (HiVG.py:686-699)
    mixup_pretrain: bool = False
    enable_adaptive_weights: bool = True
    hi_lora_stage: int = 3  # peft nesting depth = 1 + hi_lora_stage
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    text_ffn: int = 2048
    vision_width: int = 768
    vision_heads: int = 12
    vision_layers: int = 12
    vision_ffn: int = 3072
    patch_size: int = 16
    image_size: int = 224
    projection_dim: int = 512  # = HiVG's hidden_dim = the fusion width
    vl_heads: int = 8
    vl_ffn: int = 2048
    vl_layers: int = 6
    lora_r: int = 32
    lora_alpha: int = 16
    token_mlp_dim: int = 3072  # visu_token_mlp hidden (3072 hard-coded in HiVG.py:757; unused by the box)
    layer_norm_eps: float = 1e-5

    @property
    def adapt_layers(self) -> list[int]:
        return {"B": [0, 3, 7, 11], "L": [4, 10, 16, 22]}[self.variant]

    @property
    def extract_vision_layers(self) -> list[int]:
        return {"B": [1, 4, 8, 12], "L": [6, 12, 18, 24]}[self.variant]

    @property
    def extract_text_layers(self) -> list[int]:
        if self.mixup_pretrain:
            return [12]
        if self.dataset in ("gref_umd", "gref"):
            return [i + 1 for i in range(12)]
        if self.dataset in ("unc+", "referit"):
            return [6, 12]
        return [12]  # unc and the else branch (flickr, ...)

    @property
    def peft_depth(self) -> int:
        return 1 + self.hi_lora_stage

    @property
    def grid(self) -> int:
        assert self.image_size % self.patch_size == 0
        return self.image_size // self.patch_size

    @property
    def key_prefix(self) -> str:
        return "clip." + "base_model.model." * self.peft_depth

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(adapt_layers=self.adapt_layers, extract_vision_layers=self.extract_vision_layers,
                 extract_text_layers=self.extract_text_layers, n_text_levels=len(self.extract_text_layers),
                 peft_depth=self.peft_depth, key_prefix=self.key_prefix, grid=self.grid,
                 num_visu_token=self.num_visu_token, num_visual_tokens_with_cls=self.num_visu_token + 1,
                 vl_pos_rows=self.vl_pos_rows, vl_hidden_dim=self.projection_dim, lora_scaling=self.lora_scaling,
                 vl_normalize_before=True, vl_final_norm=True, hidden_act="quick_gelu")
        return d


FULL_B = HiVGConfig()
FULL_L = replace(FULL_B, variant="L", text_width=768, text_heads=12, text_ffn=3072, vision_width=1024,
                 vision_heads=16, vision_layers=24, vision_ffn=4096, patch_size=14, projection_dim=768)


def hf_clip_config(cfg: HiVGConfig):
    from transformers import CLIPConfig

    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.text_ffn,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.context_length, hidden_act="quick_gelu", layer_norm_eps=cfg.layer_norm_eps,
                projection_dim=cfg.projection_dim, attention_dropout=0.0,
                bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1, pad_token_id=0)
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_ffn,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads, num_channels=3,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu",
                  layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim, attention_dropout=0.0)
    c = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim,
                   logit_scale_init_value=2.6592)
    c._attn_implementation = "eager"
    return c


def new_hf_clip(cfg: HiVGConfig):
    """A fresh (randomly initialised by transformers) HF CLIPModel of this size, eager attention."""
    from transformers import CLIPModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    m = CLIPModel(hf_clip_config(cfg))
    assert m.text_model.config._attn_implementation == "eager"
    return m.eval()


# --------------------------------------------------------------------------
# peft 0.3.0 layout: LoRA Linear and the PeftModel / LoraModel nesting
# --------------------------------------------------------------------------
class LoraLinear(nn.Linear):
    """peft 0.3.0 `tuners.lora.Linear(nn.Linear, LoraLayer)`: the base Linear's own weight/bias, then the ModuleDicts
    lora_dropout, lora_A, lora_B and the (empty) ParameterDicts lora_embedding_A/B, adapter 'default'.
    Unmerged forward: F.linear(x, W, b) + lora_B(lora_A(dropout(x))) * lora_alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: int, adapter: str = "default"):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight = base.weight
        if base.bias is not None:
            self.bias = base.bias
        self.r = {adapter: r}
        self.lora_alpha = {adapter: alpha}
        self.scaling = {adapter: alpha / r}
        self.lora_dropout = nn.ModuleDict({adapter: nn.Identity()})  # Dropout(0.1) in the release: eval = identity
        self.lora_A = nn.ModuleDict({adapter: nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({adapter: nn.Linear(r, base.out_features, bias=False)})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.active_adapter = adapter

    def forward(self, x):
        a = self.active_adapter
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x))) * self.scaling[a]

    def merged_weight(self) -> torch.Tensor:
        a = self.active_adapter
        return self.weight + self.scaling[a] * (self.lora_B[a].weight @ self.lora_A[a].weight)


class LoraModelLike(nn.Module):
    """peft 0.3 LoraModel: holds the wrapped model as `.model`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class PeftModelLike(nn.Module):
    """peft 0.3 PeftModel: holds the LoraModel as `.base_model` (keys base_model.model.*)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base_model = LoraModelLike(model)

    @property
    def inner(self) -> nn.Module:
        return self.base_model.model


def add_lora_(model: nn.Module, r: int, alpha: int) -> list[str]:
    """Replace every Linear whose module name ends with a HiVG target name by a LoraLinear (peft 0.3's
    `_find_and_replace` rule: `key.endswith(target)`), in place (same position in the parent). Returns the names."""
    hit = []
    for name, mod in list(model.named_modules()):
        if any(name.endswith(t) for t in LORA_TARGETS):
            assert type(mod) is nn.Linear, (name, type(mod))
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], LoraLinear(mod, r, alpha))
            hit.append(name)
    return hit


@torch.no_grad()
def merge_lora_(model: nn.Module) -> list[str]:
    """Replace every LoraLinear by a plain nn.Linear holding W + alpha/r * B @ A and the same bias, in place (what
    peft's merge_and_unload and groundkit's importer do): the same function of x, one matmul instead of three. Key
    names lose the lora_A / lora_B entries. Returns the merged module names."""
    merged = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device=mod.weight.device, dtype=mod.weight.dtype)
            lin.weight = nn.Parameter(mod.merged_weight().detach().clone())
            if mod.bias is not None:
                lin.bias = nn.Parameter(mod.bias.detach().clone())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, lin)
            merged.append(name)
    return merged


def peft_nest(model: nn.Module, depth: int) -> nn.Module:
    for _ in range(depth):
        model = PeftModelLike(model)
    return model


def base_layer_renaming(sd: "OrderedDict[str, torch.Tensor]", lora_modules: set[str]) -> "OrderedDict":
    """Newer peft (>= 0.7) names: `X.weight` / `X.bias` of every LoRA-wrapped Linear X become `X.base_layer.weight` /
    `X.base_layer.bias`; lora_A / lora_B keep their names (and the order within X is base_layer, lora_A, lora_B)."""
    out = OrderedDict()
    for k, v in sd.items():
        mod, _, leaf = k.rpartition(".")
        if mod in lora_modules and leaf in ("weight", "bias"):
            k = f"{mod}.base_layer.{leaf}"
        out[k] = v
    return out


# --------------------------------------------------------------------------
# The vision tower with the multi-layer adaptive cross-modal bridge
# --------------------------------------------------------------------------
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class BridgeMLP(nn.Module):  # HiVG's CLIPMLP (QuickGELU), used as cross_mlp
    def __init__(self, width: int, ffn: int):
        super().__init__()
        self.activation_fn = QuickGELU()
        self.fc1 = nn.Linear(width, ffn)
        self.fc2 = nn.Linear(ffn, width)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class CrossAttention(nn.Module):
    """HiVG's CLIP_Cross_Attention: CLIP-style MHA, q from the vision tokens, k/v from the text states, scale
    hd^-0.5, no mask, k/v/q/out registered in that order (as HF CLIPAttention)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.embed_dim = width
        self.num_heads = heads
        self.head_dim = width // heads
        assert self.head_dim * heads == width
        self.scale = self.head_dim ** -0.5
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, text, bridge_mode: str):
        # x [B, L, C] vision tokens (after cross_norm); text [B, 77, C] = T~
        B, L, C = x.shape
        H, hd = self.num_heads, self.head_dim
        q = (self.q_proj(x) * self.scale).view(B, L, H, hd).transpose(1, 2)
        if bridge_mode == "batched":
            t = text.permute(1, 0, 2)  # B L C -> L B C (HiVG.py:444)
            k = self.k_proj(t).contiguous().view(B, -1, H, hd).transpose(1, 2)  # _shape: .view(bsz, -1, H, hd)
            v = self.v_proj(t).contiguous().view(B, -1, H, hd).transpose(1, 2)
        elif bridge_mode == "per_sample":
            k = self.k_proj(text).view(B, -1, H, hd).transpose(1, 2)
            v = self.v_proj(text).view(B, -1, H, hd).transpose(1, 2)
        else:
            raise ValueError(bridge_mode)
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        out = (att @ v).transpose(1, 2).reshape(B, L, C)
        return self.out_proj(out)


def batched_row_source(batch: int, length: int = 77) -> list[list[tuple[int, int]]]:
    """Where 'batched' mode's key/value position l' of sample b' comes from: (sample, text position)."""
    return [[((length * b + l) % batch, (length * b + l) // batch) for l in range(length)] for b in range(batch)]


class BridgeLayer(nn.Module):
    """CLIPEncoderLayer_with_Crossmodal_Bridge: reuses the HF layer's self_attn / layer norms / mlp; in adapt layers
    adds cross_norm, cross_attn, cross_mlp, cross_gate, cross_adaptive_weights (registered between self_attn and
    layer_norm1, as HiVG.py:381-397)."""

    def __init__(self, cfg: HiVGConfig, i: int, hf_layer: nn.Module):
        super().__init__()
        self.embed_dim = cfg.vision_width
        self.self_attn = hf_layer.self_attn
        self.enable_adaptive_weights = cfg.enable_adaptive_weights
        self.is_bridge = i in cfg.adapt_layers
        if self.is_bridge:
            n = len(cfg.extract_text_layers)
            self.cross_norm = nn.LayerNorm(cfg.vision_width, eps=cfg.layer_norm_eps)
            self.cross_attn = CrossAttention(cfg.vision_width, cfg.vision_heads)
            self.cross_mlp = BridgeMLP(cfg.vision_width, cfg.vision_ffn)
            self.cross_gate = nn.Linear(cfg.text_width * n, cfg.vision_width)
            self.cross_adaptive_weights = nn.ModuleList(nn.Embedding(cfg.context_length, cfg.text_width)
                                                        for _ in range(n))
        self.layer_norm1 = hf_layer.layer_norm1
        self.mlp = hf_layer.mlp
        self.layer_norm2 = hf_layer.layer_norm2

    def text_states(self, text_states: list[torch.Tensor]) -> torch.Tensor:
        """T~ [B, 77, vision_width]."""
        if self.enable_adaptive_weights:
            parts = [e.weight.unsqueeze(0) * t + t for e, t in zip(self.cross_adaptive_weights, text_states)]
            return self.cross_gate(torch.cat(parts, dim=-1))
        return text_states[-1]

    def forward(self, h, text_states, bridge_mode: str, keep: dict | None = None, index: int = 0):
        h = h + self.self_attn(self.layer_norm1(h))[0]
        if self.is_bridge:
            t = self.text_states(text_states)
            if keep is not None:
                keep[f"bridge{index}.text"] = t
            h = h + self.cross_mlp(self.cross_attn(self.cross_norm(h), t, bridge_mode))
        return h + self.mlp(self.layer_norm2(h))


class BridgeEncoder(nn.Module):
    def __init__(self, cfg: HiVGConfig, hf_encoder: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(BridgeLayer(cfg, i, hf_encoder.layers[i]) for i in range(cfg.vision_layers))


class ModifiedVisionEmbeddings(nn.Module):
    """Modified_CLIPVisionEmbeddings: HF's class token, patch conv (no bias) and position table, plus its own
    persistent `position_ids` buffer. (The bicubic position interpolation of HiVG.py:49-59 is only for grids other
    than the table's; not needed at 224.)"""

    def __init__(self, hf_emb: nn.Module):
        super().__init__()
        self.class_embedding = hf_emb.class_embedding
        self.patch_embedding = hf_emb.patch_embedding
        self.num_patches = hf_emb.num_patches
        self.num_positions = hf_emb.num_positions
        self.position_embedding = hf_emb.position_embedding
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)))

    def forward(self, pixels):
        B = pixels.shape[0]
        p = self.patch_embedding(pixels)
        assert p.shape[2] * p.shape[3] == self.num_patches, "only the table's own grid is supported"
        p = p.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(B, 1, -1), p], dim=1)
        return x + self.position_embedding(self.position_ids)


class BridgeVisionModel(nn.Module):
    """CLIP_Vision_Model_with_Crossmodal_Bridge: embeddings, pre_layrnorm, encoder, post_layernorm (unused)."""

    def __init__(self, cfg: HiVGConfig, hf_vision: nn.Module):
        super().__init__()
        self.embeddings = ModifiedVisionEmbeddings(hf_vision.embeddings)
        self.pre_layrnorm = hf_vision.pre_layrnorm
        self.encoder = BridgeEncoder(cfg, hf_vision.encoder)
        self.post_layernorm = hf_vision.post_layernorm

    def forward(self, pixels, text_states, bridge_mode: str, keep: dict | None = None) -> list[torch.Tensor]:
        """hidden_states as HF returns them: [pre-LN'd embeddings, output of layer 0, ..., output of layer N-1]."""
        h = self.pre_layrnorm(self.embeddings(pixels))
        states = [h]
        for i, layer in enumerate(self.encoder.layers):
            h = layer(h, text_states, bridge_mode, keep, i)
            states.append(h)
        return states


class TokenMLP(nn.Module):  # HiVG's TOKEN_MLP (visu_token_mlp, unused by the box)
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.activation_fn = QuickGELU()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)


def patch_mask(mask: torch.Tensor, grid: int, antialias: bool = True) -> torch.Tensor:
    """torchvision Resize([grid, grid]) of the int32 [B, S, S] pad mask (1 = pad), as HiVG's/CLIP-VG's get_masks:
    bilinear (antialias per torchvision version), round half to even, then bool. Returns [B, grid*grid] bool."""
    from torchvision.transforms import Resize

    assert mask.dtype == torch.int32 and mask.dim() == 3
    r = Resize([grid, grid], antialias=antialias)(mask)
    assert r.dtype == torch.int32
    ref = F.interpolate(mask[:, None].float(), size=(grid, grid), mode="bilinear", align_corners=False,
                        antialias=antialias)[:, 0].round().to(torch.int32)
    assert torch.equal(r, ref)
    return r.to(torch.bool).flatten(1)


# --------------------------------------------------------------------------
# HiVG
# --------------------------------------------------------------------------
class HiVG(nn.Module):
    """Same modules in the same registration order as HiVG.HiVG (HiVG.py:651-767), so `state_dict()` gives the
    release's keys in the release's order."""

    def __init__(self, cfg: HiVGConfig):
        super().__init__()
        self.cfg = cfg
        clip = new_hf_clip(cfg)
        # transformers 4.30 (the release's) keeps position_ids as a persistent buffer (made non-persistent in 4.31)
        emb = clip.text_model.embeddings
        emb.register_buffer("position_ids", torch.arange(cfg.context_length).expand((1, -1)), persistent=True)
        clip.vision_model = BridgeVisionModel(cfg, clip.vision_model)
        self.lora_modules = add_lora_(clip, cfg.lora_r, cfg.lora_alpha)
        n_bridge = len(cfg.adapt_layers)
        assert len(self.lora_modules) == 4 * (cfg.text_layers + cfg.vision_layers + n_bridge), len(self.lora_modules)
        self.clip = peft_nest(clip, cfg.peft_depth)
        P, Vw, n = cfg.projection_dim, cfg.vision_width, len(cfg.extract_text_layers)
        self.visu_proj = nn.Linear(P, P)
        self.condition_text_proj = nn.Linear(P, Vw)
        self.ml_text_feat_perceiver = nn.Linear(cfg.text_width * n, Vw)
        self.text_proj = nn.Linear(P, P)
        self.reg_token = nn.Embedding(1, P)
        self.vl_pos_embed = nn.Embedding(cfg.vl_pos_rows, P)
        # DETR pre-norm encoder (vl_transformer.py, normalize_before=True) with the final encoder.norm
        self.vl_transformer = T.EncoderOnlyTransformer(P, cfg.vl_heads, cfg.vl_ffn, cfg.vl_layers,
                                                       normalize_before=True)
        self.bbox_embed = T.MLP(P, P, 4, 3)
        self.reg_pos_embed = nn.Embedding(1, P)
        self.condition_text_pos_embed = nn.Embedding(cfg.context_length, Vw)
        self.ml_visual_projection = nn.Linear(len(cfg.extract_vision_layers) * Vw, P)
        self.visu_token_norm = nn.LayerNorm(P, eps=1e-5)
        self.visu_token_mlp = TokenMLP(P, cfg.token_mlp_dim)
        self.seg_conv1 = nn.ConvTranspose2d(P, P, kernel_size=(2, 2), stride=(2, 2), bias=False)
        self.seg_conv2 = nn.ConvTranspose2d(P, P, kernel_size=(2, 2), stride=(2, 2), bias=False)
        self.seg_conv3 = nn.ConvTranspose2d(P, P, kernel_size=(2, 2), stride=(2, 2), bias=False)
        self.eval()

    @property
    def inner(self):
        m = self.clip
        while isinstance(m, PeftModelLike):
            m = m.inner
        return m

    def lora_module_keys(self) -> set[str]:
        """Full state-dict module names (with the clip prefix) of the LoRA-wrapped Linears."""
        return {self.cfg.key_prefix + n for n in self.lora_modules}

    def text_forward(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """HF text model on all positions with the causal mask only: (hidden_states [13 x B,77,W], last_hidden)."""
        tm = self.inner.text_model
        h = tm.embeddings(input_ids=ids)
        L = ids.shape[1]
        causal = torch.full((L, L), torch.finfo(h.dtype).min).triu(1)[None, None].expand(ids.shape[0], 1, L, L)
        states = [h]
        for layer in tm.encoder.layers:
            h = layer(h, causal)
            states.append(h)
        return states, tm.final_layer_norm(h)

    def forward(self, canvas, mask, ids, bridge_mode: str = "per_sample", keep: dict | None = None):
        """canvas [B,3,S,S] normalised, mask [B,S,S] int32 (1 = pad), ids [B,77] int64 -> boxes [B,4] cxcywh/S."""
        cfg, clip = self.cfg, self.inner
        B = canvas.shape[0]
        text_mask = ids.eq(0)
        states, last = self.text_forward(ids)
        text_features = clip.text_projection(last)  # [B, 77, P]
        if cfg.mixup_pretrain:
            ml_text = [self.condition_text_proj(text_features)]
        else:
            ml_text = [states[i] for i in cfg.extract_text_layers]
        visu_mask = patch_mask(mask, cfg.grid, antialias=True)
        vstates = clip.vision_model(canvas, ml_text, bridge_mode, keep)
        ml = torch.cat([vstates[i] for i in cfg.extract_vision_layers], dim=2)  # [B, 1+N, 4*Vw]
        visu_src = self.visu_proj(self.ml_visual_projection(ml))
        text_src = self.text_proj(text_features)
        reg = self.reg_token.weight.unsqueeze(0).repeat(B, 1, 1)
        src = torch.cat([reg, visu_src, text_src], dim=1).transpose(0, 1)  # [1+1+N+77, B, P]
        zeros = torch.zeros(B, 2, dtype=torch.bool)
        vl_mask = torch.cat([zeros, visu_mask, text_mask], dim=1)
        pos = self.vl_pos_embed.weight.unsqueeze(1).repeat(1, B, 1)
        out = self.vl_transformer(src, vl_mask, pos)
        reg_out = out[0]
        box = self.bbox_embed(reg_out).sigmoid()
        if keep is not None:
            keep.update(text_features=text_features, text_states=states, visu_mask=visu_mask, vl_mask=vl_mask,
                        ml_visual=ml, reg=reg_out, vision_states=vstates)
        return box


# --------------------------------------------------------------------------
# Random weights that make a meaningful test
# --------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: HiVG, gen: torch.Generator, lora_b_std: float = 0.3) -> None:
    """Default-like inits with every bias, LayerNorm affine and LoRA B non-trivial."""
    randomize_modules_(model, gen, lora_b_std)
    model.inner.logit_scale.fill_(math.log(1 / 0.07))


@torch.no_grad()
def randomize_modules_(model: nn.Module, gen: torch.Generator, lora_b_std: float = 0.3) -> None:
    """randomize_'s module loop (also CLIP-VG's): LayerNorm, MultiheadAttention, Linear (LoRA A / B apart), Conv2d /
    ConvTranspose2d, Embedding, HiVG's vision embeddings; every module once (named_modules skips shared ones)."""
    def uni(shape, bound):
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound

    for name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
            mod.bias.copy_((torch.rand(mod.bias.shape, generator=gen) - 0.5) * 0.2)
        elif isinstance(mod, nn.MultiheadAttention):
            d = mod.embed_dim
            mod.in_proj_weight.copy_(uni(mod.in_proj_weight.shape, math.sqrt(6.0 / (2 * d))))
            mod.in_proj_bias.copy_((torch.rand(mod.in_proj_bias.shape, generator=gen) - 0.5) * 0.2)
        elif isinstance(mod, nn.Linear):
            if ".lora_A." in name + "." or name.endswith("lora_A.default"):
                mod.weight.copy_(uni(mod.weight.shape, 1.0 / math.sqrt(mod.in_features)))  # peft: kaiming a=sqrt(5)
            elif name.endswith("lora_B.default"):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * lora_b_std)  # peft inits 0: not here
            else:
                b = 1.0 / math.sqrt(mod.in_features)
                mod.weight.copy_(uni(mod.weight.shape, b * math.sqrt(3)))
                if mod.bias is not None:
                    mod.bias.copy_(uni(mod.bias.shape, b))
        elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.weight.shape[0] * 4
            mod.weight.copy_(uni(mod.weight.shape, math.sqrt(6.0 / fan_in)))
            if mod.bias is not None:
                mod.bias.copy_(uni(mod.bias.shape, 1.0 / math.sqrt(fan_in)))
        elif isinstance(mod, nn.Embedding):
            std = 0.5 if "cross_adaptive_weights" in name else 1.0
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
        elif isinstance(mod, ModifiedVisionEmbeddings):
            mod.class_embedding.copy_(torch.randn(mod.class_embedding.shape, generator=gen))


def unused_by_box(model: HiVG) -> list[str]:
    """State-dict keys the box does not depend on, by rule (checked against autograd in the generator)."""
    cfg = model.cfg
    pre = cfg.key_prefix
    out = []
    for k in model.state_dict():
        rest = k[len(pre):] if k.startswith(pre) else None
        if rest is not None:
            if rest in ("logit_scale", "visual_projection.weight") or rest.startswith("vision_model.post_layernorm."):
                out.append(k)
            elif not cfg.enable_adaptive_weights and (".cross_gate." in rest or ".cross_adaptive_weights." in rest):
                out.append(k)
            continue
        head = k.split(".")[0]
        if head in ("ml_text_feat_perceiver", "reg_pos_embed", "condition_text_pos_embed", "visu_token_norm",
                    "visu_token_mlp", "seg_conv1", "seg_conv2", "seg_conv3"):
            out.append(k)
        elif head == "condition_text_proj" and not cfg.mixup_pretrain:
            out.append(k)
    return out


# --------------------------------------------------------------------------
# Checkpoint objects in hivg_train.py's format
# --------------------------------------------------------------------------
# hivg_train.py get_args_parser() defaults, in parser order (checked against the mirror by make_hivg_fixtures.py)
HIVG_TRAIN_DEFAULTS = OrderedDict([
    ("sup_type", "full"), ("lr", 1e-4), ("batch_size", 8), ("weight_decay", 1e-4), ("epochs", 90),
    ("lr_power", 0.9), ("lr_exponential", 0.9), ("clip_max_norm", 0.0), ("eval", False), ("optimizer", "adamw"),
    ("lr_scheduler", "step"), ("lr_drop", 60), ("aug_blur", False), ("aug_crop", False), ("aug_scale", False),
    ("aug_translate", False), ("model", "ViT-B/16"), ("model_name", "HiVG"), ("extract_layer", 0),
    ("warmup", False), ("dilation", False), ("position_embedding", "sine"), ("dim_feedforward", 2048),
    ("dropout", 0.1), ("nheads", 8), ("num_queries", 100), ("pre_norm", False), ("imsize", 224),
    ("emb_size", 512), ("vl_dropout", 0.1), ("vl_nheads", 8), ("vl_hidden_dim", 512),
    ("vl_dim_feedforward", 2048), ("vl_enc_layers", 6), ("vl_dec_layers", 6), ("data_root", "./data/image_data/"),
    ("split_root", "./data/pseudo_samples/"), ("dataset", "referit"), ("max_query_len", 77), ("prompt", ""),
    ("use_cot_prompt", False), ("cot_length", 0), ("use_contrastive_loss", False),
    ("use_rtcc_constrain_loss", False), ("use_mask_loss", False), ("use_seg_mask", False), ("retrain", ""),
    ("adapt_mlp", False), ("normalize_before", False), ("save_hilora_clip", False), ("hi_lora_stage", 0),
    ("hi_lora_retrain", ""), ("hi_lora_clip", ""), ("mixup_pretrain", False), ("enable_adaptive_weights", False),
    ("cross_num_attention_heads", 1), ("cross_vis_hidden_size", 512), ("cross_text_hidden_size", 512),
    ("cross_hidden_dropout_prob", 0.1), ("cross_attention_probs_dropout_prob", 0.1), ("output_dir", "./outputs"),
    ("device", "cuda"), ("seed", 13), ("resume", ""), ("clip_model", ""), ("bert_model", "bert-base-uncased"),
    ("light", False), ("start_epoch", 0), ("num_workers", 8), ("world_size", 1), ("dist_url", "env://"),
])


def hivg_train_flags(cfg: HiVGConfig) -> OrderedDict:
    """The command-line values of the last HiLoRA stage in train_and_eval_script/train_*.sh (stage 3), with the
    tiny fusion sizes; `hivg_args` applies them to the defaults."""
    stage_dir = "output_v203" if cfg.mixup_pretrain else "output_v103"
    out = "/path_to_output" if cfg.mixup_pretrain else "/patch_to_output"
    prev = "output_v202" if cfg.mixup_pretrain else "output_v102"
    ckpt = "checkpoint.pth" if cfg.mixup_pretrain else "best_checkpoint.pth"
    ds = "mixup" if cfg.mixup_pretrain else cfg.dataset
    f = OrderedDict(
        num_workers=4, epochs=10 if cfg.variant == "L" else 20, batch_size={"L": 32}.get(cfg.variant, 64
                                                                                      if cfg.mixup_pretrain else 40),
        lr=2e-5 if cfg.mixup_pretrain else 2.5e-5, lr_scheduler="cosine", aug_crop=True, aug_scale=True,
        aug_translate=True, vl_hidden_dim=cfg.projection_dim, vl_nheads=cfg.vl_heads,
        vl_dim_feedforward=cfg.vl_ffn, vl_enc_layers=cfg.vl_layers, imsize=cfg.image_size,
        max_query_len=cfg.context_length, normalize_before=True, dataset=ds, use_contrastive_loss=True,
        use_rtcc_constrain_loss=True, use_mask_loss=True, hi_lora_stage=cfg.hi_lora_stage,
        data_root="/path_to_image_data", split_root="/path_to_split/ref_data_shuffled",
        hi_lora_retrain=f"{out}/{prev}/{ds}/{ckpt}", hi_lora_clip=f"{out}/{prev}/{ds}/clip_lora_stage_with_bridge.pth",
        output_dir=f"{out}/{stage_dir}/{ds}", sup_type="full")
    if cfg.enable_adaptive_weights:
        f["enable_adaptive_weights"] = True
    if cfg.mixup_pretrain:
        f["mixup_pretrain"] = True
    else:
        f["save_hilora_clip"] = True
    if cfg.variant == "L":
        f["model"] = "ViT-L/14"
    return f


def hivg_args(cfg: HiVGConfig) -> argparse.Namespace:
    """hivg_train.py's Namespace after parsing the stage-3 command and utils.misc.init_distributed_mode (launched
    with torch.distributed.launch --use_env on 7 GPUs: rank, world_size, gpu set; distributed, dist_backend added)."""
    return train_namespace(HIVG_TRAIN_DEFAULTS, hivg_train_flags(cfg), world_size=7)


def train_namespace(defaults: OrderedDict, flags: OrderedDict, world_size: int) -> argparse.Namespace:
    """A train script's Namespace (hivg_train.py, train_clip_vg.py): its parser defaults in parser order, the
    command's `flags` applied (each a known option), then init_distributed_mode's fields for `world_size` GPUs."""
    a = OrderedDict(defaults)
    for k, v in flags.items():
        assert k in a, k
        a[k] = v
    a.update(rank=0, world_size=world_size, gpu=0, distributed=True, dist_backend="nccl")
    ns = argparse.Namespace()
    for k, v in a.items():
        setattr(ns, k, v)
    return ns


def trainable_names(model: HiVG) -> list[str]:
    """What requires grad after set_HiLoRA(stage 3) and the bridge unfreezing (HiVG.py:719-729, 769-869): every LoRA
    A/B (text, vision, bridge), every cross_* parameter, and everything outside `clip`; in named_parameters order."""
    out = []
    for n, _ in model.named_parameters():
        if not n.startswith("clip."):
            out.append(n)
        elif ".lora_A." in n or ".lora_B." in n:
            out.append(n)
        elif any(f".{c}." in n for c in ("cross_attn", "cross_norm", "cross_mlp", "cross_gate",
                                         "cross_adaptive_weights")):
            out.append(n)
    return out


def optimizer_state(model: HiVG, args, *, stateful: set[str], gen: torch.Generator, epoch: int) -> tuple[dict, dict]:
    """(optimizer.state_dict(), lr_scheduler.state_dict()) of hivg_train.py: AdamW with one group (rest_param,
    lr=args.lr) and the cosine LambdaLR, after `epoch + 1` epochs; moments only for the parameters in `stateful`
    (a real run has them for all; kept small here)."""
    return adamw_cosine_state(model, trainable_names(model), args, stateful=stateful, gen=gen, epoch=epoch)


def adamw_cosine_state(model: nn.Module, names: list[str], args, *, stateful: set[str], gen: torch.Generator,
                       epoch: int, empty_group_lrs: tuple = ()) -> tuple[dict, dict]:
    """(optimizer.state_dict(), lr_scheduler.state_dict()) of hivg_train.py / train_clip_vg.py (transvg_ref's
    adamw_state): AdamW (args.lr, args.weight_decay) whose first group holds the parameters `names` (lr=args.lr),
    then one empty group per `empty_group_lrs`, and LambdaLR 0.5 (1 + cos(pi e / args.epochs)), after `epoch + 1`
    epochs; moments only for the parameters in `stateful`."""
    epochs = args.epochs
    osd, ssd = T.adamw_state(dict(model.named_parameters()), [names] + [[] for _ in empty_group_lrs],
                             [args.lr, *empty_group_lrs], lr=args.lr, weight_decay=args.weight_decay,
                             lr_lambda=lambda e: 0.5 * (1. + math.cos(math.pi * e / epochs)), no_grad=set(),
                             stateful=stateful, gen=gen, epoch=epoch, style="torch2")
    assert len(osd["state"]) == len(stateful), (len(osd["state"]), stateful)
    return osd, ssd
