"""CLIP-VG (Xiao et al., IEEE TMM 2023) box inference in PyTorch: groundkit's own transcription, for parity fixtures.

Written from /work/shared/checkpoints.md Part A §4 and a reading of linhuixiao/CLIP-VG @8116ebd (models/clip_vg.py
ML_CLIP_VG, models/clip/model.py, models/vl_transformer.py, train_clip_vg.py); no code is copied. The CLIP part is
OpenAI CLIP's own structure (not HF), as CLIP-VG vendors it:

  clip            ModifiedCLIP: positional_embedding, text_projection, logit_scale (own parameters, so first in the
                  state dict), visual = VisionTransformer (class_embedding, positional_embedding, proj, conv1 (no
                  bias), ln_pre, transformer.resblocks.N, ln_post), transformer.resblocks.N (causal mask),
                  token_embedding, ln_final. ResidualAttentionBlock = nn.MultiheadAttention `attn` (in_proj), ln_1,
                  mlp (c_fc, QuickGELU, c_proj), ln_2; pre-norm. LayerNorm computes in fp32 and casts back.
                  convert_weights: Conv/Linear/MHA weights and biases and `proj`/`text_projection` fp16; LayerNorms,
                  embeddings, class/positional embeddings and logit_scale stay fp32.
  wrappers        image_encoder_clip_vg (MultiLevel_ImageEncoder_modified) and text_encoder_clip_vg
                  (TextEncoder_modified) hold CLIP's own submodules/parameters, so the state dict names every CLIP
                  tensor used by the forward twice (same storage).
  visual          conv1 -> [CLS; patches] + positional_embedding -> ln_pre -> resblocks 0..11, the outputs after
                  blocks extract_layer = [0, 3, 7, 11] concatenated on channels (no ln_post, no proj) -> ml_visu_proj
  text            token_embedding + positional_embedding -> all 77 positions, causal -> ln_final -> @ text_projection
                  -> text_proj
  fusion          [reg, text 77, visual (CLS first, 1 + N)], mask [False, token == 0, False, patch mask], vl_pos_embed
                  on q and k, DETR post-norm encoder layers without a final norm, box = sigmoid(MLP(token 0)) =
                  cxcywh normalised by the 224 canvas. visu_proj = Linear(512, d) exists but is unused.
  patch mask      torchvision 0.10 Resize([14, 14]) of the int pad mask: bilinear WITHOUT antialias, round, bool.

The heads of the CLIP towers are parameters here (OpenAI CLIP derives width // 64, which is 0 at tiny widths).
"""
from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn

import hivg_ref as H
import transvg_ref as T
from hivg_ref import QuickGELU, patch_mask


@dataclass(frozen=True)
class CLIPVGConfig(H.ClipVgTokens):
    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_heads: int = 12
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    extract_layer: tuple = (0, 3, 7, 11)
    vl_hidden_dim: int = 512  # ML_CLIP_VG uses hidden_dim = clip.transformer.width: the two must be equal
    vl_nheads: int = 8
    vl_dim_feedforward: int = 2048
    vl_enc_layers: int = 6
    visu_proj_in: int = 512  # nn.Linear(512, hidden_dim) hard-coded (clip_vg.py:162), unused

    @property
    def grid(self) -> int:
        return self.image_resolution // self.vision_patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(extract_layer=list(self.extract_layer), grid=self.grid, num_visu_token=self.num_visu_token,
                 num_visual_tokens_with_cls=self.num_visu_token + 1, vl_pos_rows=self.vl_pos_rows,
                 vision_ffn=4 * self.vision_width, text_ffn=4 * self.transformer_width, vl_normalize_before=False,
                 vl_final_norm=False, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        return d


FULL_B16 = CLIPVGConfig()


# --------------------------------------------------------------------------
# OpenAI CLIP (CLIP-VG's models/clip/model.py structure)
# --------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """fp32 LayerNorm that casts back to the input dtype."""

    def forward(self, x):
        t = x.dtype
        return super().forward(x.type(torch.float32)).type(t)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, d * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d * 4, d))]))
        self.ln_2 = LayerNorm(d)
        self.attn_mask = attn_mask  # a plain attribute, not a buffer: not in the state dict

    def forward(self, x):  # x [L, B, d]
        m = self.attn_mask.to(dtype=x.dtype) if self.attn_mask is not None else None
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=m)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPVGConfig):
        super().__init__()
        self.context_length = cfg.context_length
        self.visual = VisionTransformer(cfg.image_resolution, cfg.vision_patch_size, cfg.vision_width,
                                        cfg.vision_layers, cfg.vision_heads, cfg.embed_dim)
        mask = torch.empty(cfg.context_length, cfg.context_length).fill_(float("-inf")).triu_(1)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads, mask)
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype


def convert_weights_fp16_(model: nn.Module) -> None:
    """OpenAI CLIP's convert_weights (what clip.load does on CUDA)."""
    def conv(m):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()
        if isinstance(m, nn.MultiheadAttention):
            for a in ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                      "bias_v"]:
                t = getattr(m, a)
                if t is not None:
                    t.data = t.data.half()
        for a in ("text_projection", "proj"):
            if hasattr(m, a) and getattr(m, a) is not None:
                getattr(m, a).data = getattr(m, a).data.half()
    model.apply(conv)


# --------------------------------------------------------------------------
# CLIP-VG's wrappers and ML_CLIP_VG
# --------------------------------------------------------------------------
def hold_(wrapper: nn.Module, src: nn.Module, names: str) -> None:
    """`wrapper.<name> = src.<name>` for each of the space-separated `names`, in that order: the wrapper holds
    CLIP's own submodules / parameters (same objects), registered in the order CLIP-VG's wrapper assigns them."""
    for n in names.split():
        setattr(wrapper, n, getattr(src, n))


class MultiLevelTransformer(nn.Module):
    def __init__(self, clip_vit: Transformer, extract_layer):
        super().__init__()
        hold_(self, clip_vit, "width layers resblocks")
        self.extract_layer = list(extract_layer)

    def forward(self, x):
        feats = []
        for i in range(max(self.extract_layer) + 1):
            x = self.resblocks[i](x)
            if i in self.extract_layer:
                feats.append(x)
        return feats


class MultiLevelImageEncoder(nn.Module):
    def __init__(self, v: VisionTransformer, extract_layer):
        super().__init__()
        hold_(self, v, "input_resolution output_dim conv1 class_embedding positional_embedding ln_pre")
        self.transformer = MultiLevelTransformer(v.transformer, extract_layer)
        hold_(self, v, "ln_post proj")

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = torch.cat(self.transformer(x), dim=2)
        return x.permute(1, 0, 2)  # [B, 1+N, 4*width]


class TextEncoder(nn.Module):
    def __init__(self, clip: CLIP):
        super().__init__()
        hold_(self, clip, "transformer positional_embedding ln_final text_projection token_embedding")

    def forward(self, ids):
        dtype = self.transformer.resblocks[0].attn.in_proj_weight.dtype  # = clip.dtype (conv1's)
        x = self.token_embedding(ids).type(dtype) + self.positional_embedding.type(dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_final(x).type(dtype) @ self.text_projection  # [B, 77, embed]


class MLCLIPVG(nn.Module):
    """ML_CLIP_VG with the same registration order (clip_vg.py:137-176)."""

    def __init__(self, cfg: CLIPVGConfig):
        super().__init__()
        assert cfg.vl_hidden_dim == cfg.transformer_width == cfg.embed_dim
        self.cfg = cfg
        self.clip = CLIP(cfg)
        d = cfg.transformer_width
        self.visu_proj = nn.Linear(cfg.visu_proj_in, d)
        self.text_proj = nn.Linear(d, d)
        self.reg_token = nn.Embedding(1, d)
        self.vl_pos_embed = nn.Embedding(cfg.vl_pos_rows, d)
        self.vl_transformer = T.EncoderOnlyTransformer(cfg.vl_hidden_dim, cfg.vl_nheads, cfg.vl_dim_feedforward,
                                                       cfg.vl_enc_layers)
        self.image_encoder_clip_vg = MultiLevelImageEncoder(self.clip.visual, cfg.extract_layer)
        self.text_encoder_clip_vg = TextEncoder(self.clip)
        self.bbox_embed = T.MLP(d, d, 4, 3)
        self.ml_visu_proj = nn.Linear(len(cfg.extract_layer) * cfg.vision_width, d)
        self.eval()

    def forward(self, canvas, mask, ids, keep: dict | None = None):
        """canvas [B,3,S,S], mask [B,S,S] int32 (1 = pad), ids [B,77] -> boxes [B,4] cxcywh / S (fp32 head)."""
        B = canvas.shape[0]
        dtype = self.clip.dtype
        image_features = self.image_encoder_clip_vg(canvas.type(dtype))
        text_features = self.text_encoder_clip_vg(ids)
        visu_src = self.ml_visu_proj(image_features.float()).permute(1, 0, 2)
        text_src = self.text_proj(text_features.float()).permute(1, 0, 2)
        tgt = self.reg_token.weight.unsqueeze(1).repeat(1, B, 1)
        src = torch.cat([tgt, text_src, visu_src], dim=0)
        visu_mask = patch_mask(mask, self.cfg.grid, antialias=False)
        text_mask = ~(ids > 0)
        z = torch.zeros(B, 1, dtype=torch.bool)
        vl_mask = torch.cat([z, text_mask, z, visu_mask], dim=1)
        pos = self.vl_pos_embed.weight.unsqueeze(1).repeat(1, B, 1)
        out = self.vl_transformer.encoder(src, vl_mask, pos)
        reg = out[0]
        box = self.bbox_embed(reg).sigmoid()
        if keep is not None:
            keep.update(image_features=image_features.float(), text_features=text_features.float(),
                        visu_mask=visu_mask, vl_mask=vl_mask, reg=reg)
        return box


# --------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: MLCLIPVG, gen: torch.Generator) -> None:
    """hivg_ref's module loop (the wrappers hold CLIP's own modules: each is drawn once), then CLIP's own
    parameters (positional embeddings, projections, class embedding, logit scale)."""
    H.randomize_modules_(model, gen)
    c = model.clip
    c.positional_embedding.copy_(torch.randn(c.positional_embedding.shape, generator=gen))
    c.text_projection.copy_(torch.randn(c.text_projection.shape, generator=gen) / math.sqrt(c.text_projection.shape[0]))
    c.visual.class_embedding.copy_(torch.randn(c.visual.class_embedding.shape, generator=gen))
    c.visual.positional_embedding.copy_(torch.randn(c.visual.positional_embedding.shape, generator=gen))
    c.visual.proj.copy_(torch.randn(c.visual.proj.shape, generator=gen) / math.sqrt(c.visual.proj.shape[0]))
    c.logit_scale.fill_(math.log(1 / 0.07))


def unused_by_box(model: MLCLIPVG) -> list[str]:
    out = []
    for k in model.state_dict():
        if k in ("clip.logit_scale", "clip.visual.proj", "image_encoder_clip_vg.proj") or \
                k.startswith(("clip.visual.ln_post.", "image_encoder_clip_vg.ln_post.", "visu_proj.")):
            out.append(k)
    return out


def aliases(model: MLCLIPVG) -> "OrderedDict[str, str]":
    """Every state-dict key that shares its tensor with an earlier key -> that earlier key."""
    first, out = {}, OrderedDict()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in first:
            out[k] = first[id(v)]
        else:
            first[id(v)] = k
    return out


# --------------------------------------------------------------------------
# Checkpoint objects in train_clip_vg.py's format
# --------------------------------------------------------------------------
CLIPVG_TRAIN_DEFAULTS = OrderedDict([
    ("sup_type", "un"), ("lr", 1e-4), ("lr_bert", 1e-5), ("lr_visu_cnn", 1e-5), ("lr_visu_tra", 1e-5),
    ("batch_size", 32), ("weight_decay", 1e-4), ("epochs", 90), ("lr_power", 0.9), ("lr_exponential", 0.9),
    ("clip_max_norm", 0.0), ("eval", False), ("optimizer", "adamw"), ("lr_scheduler", "step"), ("lr_drop", 60),
    ("aug_blur", False), ("aug_crop", False), ("aug_scale", False), ("aug_translate", False), ("model", "ViT-B/16"),
    ("dim_feedforward", 2048), ("dropout", 0.1), ("nheads", 8), ("num_queries", 100), ("pre_norm", False),
    ("imsize", 224), ("emb_size", 512), ("vl_dropout", 0.1), ("vl_nheads", 8), ("vl_hidden_dim", 512),
    ("vl_dim_feedforward", 2048), ("vl_enc_layers", 6), ("vl_dec_layers", 6), ("data_root", "./data/image_data/"),
    ("split_root", "./data/pseudo_samples/"), ("dataset", "referit"), ("max_query_len", 77),
    ("prompt", "{pseudo_query}"), ("output_dir", "./outputs"), ("device", "cuda"), ("seed", 13), ("resume", ""),
    ("retrain", ""), ("light", False), ("start_epoch", 0), ("num_workers", 4), ("world_size", 1),
    ("dist_url", "env://"),
])


def clipvg_train_flags(cfg: CLIPVGConfig, dataset: str = "unc") -> OrderedDict:
    """train_and_eval_script/train_and_eval_full_sup.sh (fully supervised), with the tiny fusion sizes."""
    return OrderedDict(num_workers=4, epochs=110, batch_size=64, lr=0.00025, lr_scheduler="cosine", aug_crop=True,
                       aug_scale=True, aug_translate=True, vl_hidden_dim=cfg.vl_hidden_dim, vl_nheads=cfg.vl_nheads,
                       vl_dim_feedforward=cfg.vl_dim_feedforward, vl_enc_layers=cfg.vl_enc_layers,
                       imsize=cfg.image_resolution, max_query_len=cfg.context_length, sup_type="full",
                       dataset=dataset, data_root="/path_to_image_data", split_root="/path_to_split",
                       output_dir=f"/path_to_output/{dataset}")


def clipvg_args(cfg: CLIPVGConfig, dataset: str = "unc") -> argparse.Namespace:
    return H.train_namespace(CLIPVG_TRAIN_DEFAULTS, clipvg_train_flags(cfg, dataset), world_size=5)


def trainable_names(model: MLCLIPVG) -> list[str]:
    """CLIP frozen except the visual positional_embedding (clip_vg.py:42, 158-159), everything else trainable;
    named_parameters() lists each shared parameter once, under its first name."""
    return [n for n, _ in model.named_parameters()
            if not n.startswith("clip.") or n == "clip.visual.positional_embedding"]


def optimizer_state(model: MLCLIPVG, args, *, stateful: set[str], gen: torch.Generator, epoch: int):
    """train_clip_vg.py: AdamW with 4 groups (rest, visu_cnn, visu_tra, text_tra: only `rest` non-empty),
    cosine LambdaLR; moments only for `stateful`."""
    return H.adamw_cosine_state(model, trainable_names(model), args, stateful=stateful, gen=gen, epoch=epoch,
                                empty_group_lrs=(args.lr_visu_cnn, args.lr_visu_tra, args.lr_bert))
