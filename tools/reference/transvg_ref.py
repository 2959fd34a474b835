"""TransVG (Deng et al., ICCV 2021) in PyTorch: groundkit's own transcription, for parity fixtures.

Written from the facts in /work/shared/checkpoints.md Part A §1-§3 and a reading of the original
code (djiajunustc/TransVG c862427); no code is copied. Every size is a parameter so that tiny,
test-sized models have exactly the released layout (key names, order, ranks) at small widths:

  visumodel    DETR without decoder: ResNet-50/101 (torchvision v1.5 bottlenecks, FrozenBatchNorm2d,
               base width parameter, optional dilation of layer4), 1x1 `input_proj`, normalised sine
               position embedding, post-norm encoder (nn.MultiheadAttention, q = k = src + pos), no final norm
  textmodel    BERT as pytorch_pretrained_bert 0.6.2 names it (`textmodel.bert.*`), the last layer's output,
               additive mask (1 - m) * -10000, exact-erf GELU, LayerNorm eps 1e-12, token types all 0
  fusion       visu_proj, text_proj, reg_token, vl_pos_embed, sequence [reg, text, visual],
               mask [False, text_pad, visual_pad], post-norm VL encoder, MLP(d, d, 4, 3) + sigmoid on the reg token

The test-time protocol (image resize/pad, tokenisation, box to pixels) and the checkpoint writers
(TransVG's train.py top-level dict, zip and legacy containers, storages tagged 'cuda:0') are here too;
make_transvg_fixtures.py uses them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import pickle
import re
import struct
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------
class VisuTokens:
    """For a config with a square `grid` of visual tokens (TransVG, CLIP-VG, HiVG)."""

    @property
    def num_visu_token(self) -> int:
        return self.grid ** 2


@dataclass(frozen=True)
class TransVGConfig(VisuTokens):
    backbone: str = "resnet50"  # resnet50 (3/4/6/3) | resnet101 (3/4/23/3)
    width: int = 64  # ResNet base width: conv1 out = width, planes width, 2w, 4w, 8w (expansion 4)
    dilation: bool = False  # replace_stride_with_dilation=[False, False, dilation]
    hidden_dim: int = 256  # DETR encoder
    nheads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6
    bert_vocab: int = 30522
    bert_hidden: int = 768
    bert_heads: int = 12
    bert_intermediate: int = 3072
    bert_layers: int = 12
    bert_max_pos: int = 512
    bert_type_vocab: int = 2
    vl_hidden_dim: int = 256
    vl_nheads: int = 8
    vl_dim_feedforward: int = 2048
    vl_enc_layers: int = 6
    imsize: int = 640
    max_query_len: int = 20

    @property
    def blocks(self) -> tuple[int, int, int, int]:
        return {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}[self.backbone]

    @property
    def stride(self) -> int:
        return 16 if self.dilation else 32

    @property
    def grid(self) -> int:
        assert self.imsize % self.stride == 0
        return self.imsize // self.stride

    @property
    def backbone_channels(self) -> int:
        return self.width * 8 * 4

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(grid=self.grid, num_visu_token=self.num_visu_token,
                 vl_pos_rows=1 + self.max_query_len + self.num_visu_token,
                 backbone_channels=self.backbone_channels, blocks=list(self.blocks))
        return d


FULL_R50 = TransVGConfig()
FULL_R101 = replace(FULL_R50, backbone="resnet101")


# --------------------------------------------------------------------------
# ResNet (torchvision v1.5 layout) with FrozenBatchNorm2d
# --------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """Four buffers (weight, bias, running_mean, running_var); eps 1e-5 inside the rsqrt."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        # v1.5: the stride sits on the 3x3 conv
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                         FrozenBatchNorm2d(planes * 4)) if downsample else None)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNetBody(nn.Module):
    """conv1 ... layer4 (torchvision names; no avgpool / fc), returns the layer4 map."""

    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(w)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, dil = w, 1
        for i, (n, planes) in enumerate(zip(cfg.blocks, (w, 2 * w, 4 * w, 8 * w))):
            stride = 1 if i == 0 else 2
            prev_dil = dil
            if i == 3 and cfg.dilation:
                dil *= stride
                stride = 1
            blocks = [Bottleneck(inplanes, planes, stride, prev_dil,
                                 downsample=stride != 1 or inplanes != planes * 4)]
            inplanes = planes * 4
            blocks += [Bottleneck(inplanes, planes, 1, dil, downsample=False) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def check_resnet_layout() -> None:
    """Our ResNet at width 64 has torchvision's keys, order and shapes (minus fc.*, num_batches_tracked), and
    computes what torchvision's resnet (norm_layer=FrozenBatchNorm2d) computes with the same random weights."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBN

    gen = torch.Generator().manual_seed(123)
    for name, dil in (("resnet50", False), ("resnet101", False), ("resnet50", True)):
        tv = torchvision.models.__dict__[name](replace_stride_with_dilation=[False, False, dil], norm_layer=TvFrozenBN)
        want = [(k, tuple(v.shape)) for k, v in tv.state_dict().items() if not k.startswith("fc.")]
        body = ResNetBody(replace(FULL_R50, backbone=name, dilation=dil))
        assert [(k, tuple(v.shape)) for k, v in body.state_dict().items()] == want, name
        if not dil:
            plain = torchvision.models.__dict__[name]()
            assert [k for k in plain.state_dict() if not k.startswith("fc.") and "num_batches" not in k] == \
                [k for k, _ in want]
        with torch.no_grad():
            for k, v in body.state_dict().items():
                if k.endswith("running_var"):
                    v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
                elif k.endswith("weight") and v.ndim == 1:
                    v.copy_((torch.rand(v.shape, generator=gen) + 0.5) * (0.3 if ".bn3." in k else 1.0))
                else:
                    v.copy_(torch.randn(v.shape, generator=gen) * (0.1 if v.ndim == 1 else 1.0 / math.sqrt(v[0].numel())))
            tv.load_state_dict(body.state_dict(), strict=False)
            tv.eval()
            x = torch.randn(1, 3, 96, 128, generator=gen)
            ref = nn.Sequential(*list(tv.children())[:-2])(x)
            out = body(x)
        assert out.shape == ref.shape == (1, 2048, 6 if dil else 3, 8 if dil else 4), out.shape
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (name, dil, err)


# --------------------------------------------------------------------------
# Transformer pieces (DETR post-norm encoder layer; the VL encoder uses the same layer)
# --------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    """DETR's TransformerEncoderLayer: `forward_post` (TransVG, CLIP-VG) or, with `normalize_before`,
    `forward_pre` (HiVG's `--normalize_before`); pos added to q and k, not v; ReLU FFN; no dropout (eval)."""

    def __init__(self, d: int, nhead: int, ffn: int, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=0.0)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.normalize_before = normalize_before

    def forward(self, src, key_padding_mask, pos):
        # src, pos: [L, B, d] (sequence first, as TransVG); key_padding_mask [B, L], True = ignore
        if self.normalize_before:
            return self.forward_pre(src, key_padding_mask, pos)
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask,
                                              need_weights=False)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))

    def forward_pre(self, src, key_padding_mask, pos):
        s = self.norm1(src)
        q = k = s + pos
        src = src + self.self_attn(q, k, value=s, key_padding_mask=key_padding_mask, need_weights=False)[0]
        s = self.norm2(src)
        return src + self.linear2(F.relu(self.linear1(s)))


class Encoder(nn.Module):
    """DETR's TransformerEncoder; the final `norm` exists with `normalize_before` only (DETR's encoder_norm)."""

    def __init__(self, d: int, nhead: int, ffn: int, layers: int, normalize_before: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, nhead, ffn, normalize_before) for _ in range(layers))
        if normalize_before:
            self.norm = nn.LayerNorm(d)
        self.normalize_before = normalize_before

    def forward(self, src, key_padding_mask, pos):
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return self.norm(src) if self.normalize_before else src  # post-norm: no final norm


class EncoderOnlyTransformer(nn.Module):
    """Holds `.encoder` so keys read `transformer.encoder.layers.N.*` / `vl_transformer.encoder.layers.N.*`."""

    def __init__(self, d: int, nhead: int, ffn: int, layers: int, normalize_before: bool = False):
        super().__init__()
        self.encoder = Encoder(d, nhead, ffn, layers, normalize_before)

    def forward(self, src, mask, pos):
        return self.encoder(src, mask, pos)


def sine_position_embedding(mask: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine embedding. mask [B, H, W] bool (True = pad) -> [B, 2*num_pos_feats, H, W]."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class BackboneWrapper(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.body = ResNetBody(cfg)


class SinePosition(nn.Module):  # no parameters; index 1 of the Joiner as in DETR
    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.num_pos_feats = num_pos_feats

    def forward(self, mask):
        return sine_position_embedding(mask, self.num_pos_feats)


class VisualModel(nn.Module):
    """TransVG's DETR: registration order transformer, backbone, input_proj (as detr.py)."""

    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.transformer = EncoderOnlyTransformer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.enc_layers)
        self.backbone = nn.ModuleList([BackboneWrapper(cfg), SinePosition(cfg.hidden_dim // 2)])
        self.input_proj = nn.Conv2d(cfg.backbone_channels, cfg.hidden_dim, 1)

    def forward(self, img, pixel_mask, keep: dict | None = None):
        """img [B, 3, S, S], pixel_mask [B, S, S] (True/1 = pad) -> (visu_mask [B, HW] bool, memory [HW, B, d])."""
        feat = self.backbone[0].body(img)
        mask = F.interpolate(pixel_mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]  # nearest
        pos = self.backbone[1](mask).to(feat.dtype)
        src = self.input_proj(feat)
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        memory = self.transformer.encoder(src, mask, pos)
        if keep is not None:
            keep.update(backbone=feat, visu_mask=mask, detr=memory.transpose(0, 1))
        return mask, memory


# --------------------------------------------------------------------------
# BERT with pytorch_pretrained_bert 0.6.2 names
# --------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        h = cfg.bert_hidden
        self.word_embeddings = nn.Embedding(cfg.bert_vocab, h)
        self.position_embeddings = nn.Embedding(cfg.bert_max_pos, h)
        self.token_type_embeddings = nn.Embedding(cfg.bert_type_vocab, h)
        self.LayerNorm = nn.LayerNorm(h, eps=1e-12)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], dtype=torch.long).unsqueeze(0).expand_as(ids)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(torch.zeros_like(ids))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        h = cfg.bert_hidden
        assert h % cfg.bert_heads == 0
        self.heads = cfg.bert_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def forward(self, x, additive_mask):
        b, n, h = x.shape
        dh = h // self.heads

        def split(t):
            return t.view(b, n, self.heads, dh).permute(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh) + additive_mask
        ctx = scores.softmax(-1) @ v
        return ctx.permute(0, 2, 1, 3).reshape(b, n, h)


class BertDenseLN(nn.Module):  # BertSelfOutput / BertOutput: dense, LayerNorm(x + residual)
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=1e-12)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertDenseLN(cfg.bert_hidden, cfg.bert_hidden)

    def forward(self, x, additive_mask):
        return self.output(self.self(x, additive_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.bert_hidden, cfg.bert_intermediate)

    def forward(self, x):
        x = self.dense(x)
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact GELU


class BertLayer(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseLN(cfg.bert_intermediate, cfg.bert_hidden)

    def forward(self, x, additive_mask):
        a = self.attention(x, additive_mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.bert_layers))


class BertPooler(nn.Module):  # present in the checkpoint, unused by TransVG
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.bert_hidden, cfg.bert_hidden)


class Bert(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)

    def forward(self, ids, mask):
        """Every layer's output (ppb's all_encoder_layers); mask 1 = token, 0 = pad."""
        additive = (1.0 - mask[:, None, None, :].to(torch.float32)) * -10000.0
        x = self.embeddings(ids)
        outs = []
        for layer in self.encoder.layer:
            x = layer(x, additive)
            outs.append(x)
        return outs


class TextModel(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.bert = Bert(cfg)

    def forward(self, ids, mask):
        return self.bert(ids, mask)[-1]  # bert_enc_num = number of layers: the last layer


# --------------------------------------------------------------------------
# TransVG
# --------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, n: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (n - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [d_out]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TransVG(nn.Module):
    def __init__(self, cfg: TransVGConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.vl_hidden_dim
        # registration order = state_dict order of the released files
        self.visumodel = VisualModel(cfg)
        self.textmodel = TextModel(cfg)
        self.vl_pos_embed = nn.Embedding(1 + cfg.max_query_len + cfg.num_visu_token, d)
        self.reg_token = nn.Embedding(1, d)
        self.visu_proj = nn.Linear(cfg.hidden_dim, d)
        self.text_proj = nn.Linear(cfg.bert_hidden, d)
        self.vl_transformer = EncoderOnlyTransformer(d, cfg.vl_nheads, cfg.vl_dim_feedforward, cfg.vl_enc_layers)
        self.bbox_embed = MLP(d, d, 4, 3)

    def fused_reg(self, img, pixel_mask, ids, text_mask, keep: dict | None = None):
        """The reg token after the VL encoder, [B, d]."""
        b = img.shape[0]
        visu_mask, memory = self.visumodel(img, pixel_mask, keep)
        visu_src = self.visu_proj(memory)  # [N, B, d]
        bert = self.textmodel(ids, text_mask)  # [B, L, hb]
        if keep is not None:
            keep["bert"] = bert
        text_src = self.text_proj(bert).permute(1, 0, 2)
        text_pad = ~text_mask.to(torch.bool)
        reg = self.reg_token.weight.unsqueeze(1).repeat(1, b, 1)
        src = torch.cat([reg, text_src, visu_src], dim=0)
        mask = torch.cat([torch.zeros(b, 1, dtype=torch.bool), text_pad, visu_mask], dim=1)
        pos = self.vl_pos_embed.weight.unsqueeze(1).repeat(1, b, 1)
        hs = self.vl_transformer.encoder(src, mask, pos)[0]
        if keep is not None:
            keep["reg"] = hs
        return hs

    def forward(self, img, pixel_mask, ids, text_mask, keep: dict | None = None):
        """Normalised (cx, cy, w, h) on the padded S x S canvas, [B, 4]."""
        return self.bbox_embed(self.fused_reg(img, pixel_mask, ids, text_mask, keep)).sigmoid()


# --------------------------------------------------------------------------
# Test-time protocol
# --------------------------------------------------------------------------
@dataclass
class Prepared:
    canvas: torch.Tensor  # [3, S, S] float32, normalised, zero padding
    mask: torch.Tensor  # [S, S] int32, 1 = pad
    width: int
    height: int
    ratio: float
    new_w: int
    new_h: int
    top: int
    left: int


def prepare_image(path, size: int = 640) -> Prepared:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    ratio = float(size / float(max(h, w)))
    new_w, new_h = round(w * ratio), round(h * ratio)  # Python round: half to even
    img = img.resize((new_w, new_h), Image.BILINEAR)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    top = round((size - new_h) / 2.0 - 0.1)
    left = round((size - new_w) / 2.0 - 0.1)
    canvas = torch.zeros(3, size, size)
    mask = torch.ones(size, size, dtype=torch.int32)
    canvas[:, top:top + new_h, left:left + new_w] = x
    mask[top:top + new_h, left:left + new_w] = 0
    return Prepared(canvas, mask, w, h, ratio, new_w, new_h, top, left)


def check_prepare_against_torchvision(path, size: int = 640) -> None:
    """Our preprocessing is bit-identical to torchvision's F.resize / to_tensor / normalize on PIL."""
    from PIL import Image
    import torchvision.transforms.functional as TF

    p = prepare_image(path, size)
    img = Image.open(path).convert("RGB")
    img = TF.resize(img, [p.new_h, p.new_w])
    x = TF.normalize(TF.to_tensor(img), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert torch.equal(p.canvas[:, p.top:p.top + p.new_h, p.left:p.left + p.new_w], x), path


def load_bert_tokenizer(vocab_file):
    """pytorch_pretrained_bert 0.6.2's BertTokenizer (what TransVG uses), lower-casing."""
    from pytorch_pretrained_bert.tokenization import BertTokenizer

    return BertTokenizer(str(vocab_file), do_lower_case=True)


def tokenize_expression(tokenizer, expr: str, max_query_len: int) -> dict:
    """TransVG's text path: lower(), strip(), BERT tokens, truncate to L-2, [CLS] .. [SEP], pad id 0."""
    text = expr.lower()
    line = text.strip()
    if re.match(r"^(.*) \|\|\| (.*)$", line):
        raise ValueError("' ||| ' makes a text pair in TransVG; not supported here")
    pieces = tokenizer.tokenize(line)
    pieces = pieces[:max_query_len - 2]
    tokens = ["[CLS]"] + pieces + ["[SEP]"]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    mask = [1] * len(ids)
    ids = ids + [0] * (max_query_len - len(ids))
    mask = mask + [0] * (max_query_len - len(mask))
    return {"text": text, "tokens": tokens, "ids": ids, "mask": mask}


def cxcywh_to_pixels(pred, prep: Prepared, size: int = 640) -> tuple[list[float], list[float]]:
    """Canvas-normalised cxcywh -> (xyxy in image pixels after the canvas clamp, the same clipped to the image).

    float64 arithmetic on the given (float32) values."""
    cx, cy, w, h = (float(v) for v in pred)
    xyxy = [cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h]
    xyxy = [min(max(v, 0.0), 1.0) for v in xyxy]
    off = [prep.left, prep.top, prep.left, prep.top]
    px = [(v * size - o) / prep.ratio for v, o in zip(xyxy, off)]
    lim = [prep.width, prep.height, prep.width, prep.height]
    clipped = [min(max(v, 0.0), float(m)) for v, m in zip(px, lim)]
    return px, clipped


# --------------------------------------------------------------------------
# Random weights that make a meaningful test
# --------------------------------------------------------------------------
def randomize_(model: TransVG, gen: torch.Generator) -> None:
    """Default-like inits, but every bias and LayerNorm affine non-trivial (so a swapped or dropped one shows)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_((torch.rand(mod.bias.shape, generator=gen) - 0.5) * 0.2)
            elif isinstance(mod, nn.Linear):
                bound = 1.0 / math.sqrt(mod.in_features)
                mod.weight.copy_((torch.rand(mod.weight.shape, generator=gen) * 2 - 1) * bound * math.sqrt(3))
                mod.bias.copy_((torch.rand(mod.bias.shape, generator=gen) * 2 - 1) * bound)
            elif isinstance(mod, nn.MultiheadAttention):
                d = mod.embed_dim
                a = math.sqrt(6.0 / (d + d))  # xavier_uniform, as TransVG's _reset_parameters
                mod.in_proj_weight.copy_((torch.rand(mod.in_proj_weight.shape, generator=gen) * 2 - 1) * a)
                mod.in_proj_bias.copy_((torch.rand(mod.in_proj_bias.shape, generator=gen) - 0.5) * 0.2)
            elif isinstance(mod, nn.Conv2d):
                fan_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                bound = math.sqrt(6.0 / fan_in)
                mod.weight.copy_((torch.rand(mod.weight.shape, generator=gen) * 2 - 1) * bound)
                if mod.bias is not None:
                    mod.bias.copy_((torch.rand(mod.bias.shape, generator=gen) * 2 - 1) / math.sqrt(fan_in))
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
            elif isinstance(mod, FrozenBatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_((torch.rand(mod.bias.shape, generator=gen) - 0.5) * 0.2)
        # MHA out_proj is an nn.Linear subclass (NonDynamicallyQuantizableLinear): covered above.


@torch.no_grad()
def calibrate_batchnorm_(model: TransVG, images: torch.Tensor) -> None:
    """Set every FrozenBN's running stats to the batch statistics of its input on `images`, in forward order.

    The residual-branch output BN (bn3) gets its weight halved so the residual sums stay O(1)."""
    body = model.visumodel.backbone[0].body
    hooks = []

    def pre(mod, inp):
        x = inp[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    for name, mod in body.named_modules():
        if isinstance(mod, FrozenBatchNorm2d):
            if name.endswith("bn3"):
                mod.weight.mul_(0.5)
            hooks.append(mod.register_forward_pre_hook(pre))
    body(images)
    for h in hooks:
        h.remove()


@torch.no_grad()
def strengthen_text_(model: TransVG, gain: float = 2.0) -> None:
    """Scale text_proj so the 20-40 text tokens weigh about as much as the 400 visual ones in the reg token's
    attention (at random weights the image otherwise dominates): expressions then move the box visibly."""
    model.text_proj.weight.mul_(gain)
    model.text_proj.bias.mul_(gain)


@torch.no_grad()
def calibrate_box_head_(model: TransVG, feats: torch.Tensor, gen: torch.Generator,
                        mean=(0.0, 0.0, -0.9, -0.9), std=(0.7, 0.7, 0.45, 0.45)) -> None:
    """Rescale the head's last Linear so that, over `feats` (the reg tokens of the cases), the four logits
    have the given mean/std: boxes spread over the canvas, sigmoids not saturated."""
    l0, l1, l2 = model.bbox_embed.layers
    h = F.relu(l1(F.relu(l0(feats))))  # [N, d]
    hc = h - h.mean(0, keepdim=True)
    w = torch.randn(l2.weight.shape, generator=gen)
    for i in range(4):
        s = (hc @ w[i]).std()
        assert s > 1e-4, "the reg token barely depends on the input"
        w[i] *= std[i] / s
    l2.weight.copy_(w)
    l2.bias.copy_(torch.tensor(mean) - w @ h.mean(0))


# --------------------------------------------------------------------------
# Checkpoint objects in TransVG's format
# --------------------------------------------------------------------------
def transvg_args(cfg: TransVGConfig, dataset: str = "unc", **over) -> argparse.Namespace:
    """TransVG train.py's Namespace (parser order), as the released command set it, then
    init_distributed_mode's fields (launched with torch.distributed)."""
    a = OrderedDict(
        lr=1e-4, lr_bert=1e-5, lr_visu_cnn=1e-5, lr_visu_tra=1e-5, batch_size=8, weight_decay=1e-4, epochs=90,
        lr_power=0.9, clip_max_norm=0.0, eval=False, optimizer="adamw", lr_scheduler="step", lr_drop=60,
        aug_blur=True, aug_crop=True, aug_scale=True, aug_translate=True, model_name="TransVG",
        backbone=cfg.backbone, dilation=cfg.dilation, position_embedding="sine", enc_layers=cfg.enc_layers,
        dec_layers=0, dim_feedforward=cfg.dim_feedforward, hidden_dim=cfg.hidden_dim, dropout=0.1,
        nheads=cfg.nheads, num_queries=100, pre_norm=False, imsize=cfg.imsize, emb_size=512,
        bert_enc_num=cfg.bert_layers, detr_enc_num=cfg.enc_layers, vl_dropout=0.1, vl_nheads=cfg.vl_nheads,
        vl_hidden_dim=cfg.vl_hidden_dim, vl_dim_feedforward=cfg.vl_dim_feedforward,
        vl_enc_layers=cfg.vl_enc_layers, data_root="./ln_data/", split_root="data", dataset=dataset,
        max_query_len=cfg.max_query_len, output_dir=f"outputs/{dataset}_r{cfg.backbone[6:]}", device="cuda",
        seed=13, resume="", detr_model=f"./saved_models/detr-r{cfg.backbone[6:]}-{dataset}.pth",
        bert_model="bert-base-uncased", light=False, start_epoch=0, num_workers=2, world_size=8,
        dist_url="env://", rank=0, gpu=0, distributed=True, dist_backend="nccl",
    )
    a.update(over)
    ns = argparse.Namespace()
    for k, v in a.items():
        setattr(ns, k, v)
    return ns


def transvg_param_groups(model: TransVG) -> tuple[list[list[str]], set[str]]:
    """train.py's four AdamW groups (rest, visual CNN, visual transformer, BERT) over trainable names, and the
    names that get no gradient (BERT pooler: TransVG never uses it, so AdamW keeps no state for it)."""
    names = []
    for n, _ in model.named_parameters():
        # BackboneBase freezes everything outside layer2..4 (conv1, layer1); FrozenBN holds buffers only
        if "backbone" in n and not any(f"layer{i}" in n for i in (2, 3, 4)):
            continue
        names.append(n)
    rest = [n for n in names if "visumodel" not in n and "textmodel" not in n]
    cnn = [n for n in names if "visumodel" in n and "backbone" in n]
    tra = [n for n in names if "visumodel" in n and "backbone" not in n]
    txt = [n for n in names if "textmodel" in n]
    return [rest, cnn, tra, txt], {n for n in names if ".pooler." in n}


def adamw_state(params: dict, groups: list[list[str]], group_lrs: list, *, lr: float, weight_decay: float,
                lr_drop: int | None = None, lr_lambda: Callable[[int], float] | None = None, no_grad: set[str],
                stateful: set[str] | None, gen: torch.Generator, epoch: int, style: str) -> tuple[dict, dict]:
    """(optimizer.state_dict(), lr_scheduler.state_dict()) of an AdamW + StepLR(lr_drop) (TransVG, DETR) or
    LambdaLR(lr_lambda) (CLIP-VG, HiVG: cosine) after `epoch + 1` epochs.

    A real torch AdamW runs one step on detached copies with random gradients, for the parameters in
    `stateful` (None = all) minus `no_grad` (parameters that never get a gradient keep no state, e.g. BERT's
    pooler in TransVG). group_lrs[i] None = the default lr. style 'torch1.5': int `step`, only the group keys of
    torch 1.5 (lr, betas, eps, weight_decay, amsgrad, initial_lr, params) and 1.5's StepLR keys; 'torch2': what
    this torch writes (0-d float tensor `step`, foreach/maximize/... keys)."""
    import warnings

    assert (lr_drop is None) != (lr_lambda is None), "one schedule: lr_drop (StepLR) or lr_lambda (LambdaLR)"
    shadow = {n: params[n].detach().clone().requires_grad_(True) for g in groups for n in g}
    pg = [({"params": [shadow[n] for n in g]} if glr is None else {"params": [shadow[n] for n in g], "lr": glr})
          for g, glr in zip(groups, group_lrs)]
    opt = torch.optim.AdamW(pg, lr=lr, weight_decay=weight_decay)
    if lr_lambda is None:
        sched = torch.optim.lr_scheduler.StepLR(opt, lr_drop)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for g in groups:
        for n in g:
            if n in no_grad or (stateful is not None and n not in stateful):
                continue
            shadow[n].grad = torch.randn(shadow[n].shape, generator=gen) * 1e-3
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(epoch + 1):
            sched.step()
    osd, ssd = opt.state_dict(), sched.state_dict()
    steps = (epoch + 1) * 1000
    for st in osd["state"].values():
        st["step"] = torch.tensor(float(steps))
    if style == "torch1.5":
        osd["state"] = {k: {"step": steps, "exp_avg": v["exp_avg"], "exp_avg_sq": v["exp_avg_sq"]}
                        for k, v in osd["state"].items()}
        keep = ("lr", "betas", "eps", "weight_decay", "amsgrad", "initial_lr", "params")
        osd["param_groups"] = [{k: g[k] for k in keep} for g in osd["param_groups"]]
        keep = ("step_size", "gamma", "base_lrs", "last_epoch", "_step_count", "_get_lr_called_within_step",
                "_last_lr")
        ssd = {k: ssd[k] for k in keep}
    else:
        assert style == "torch2"
    return osd, ssd


def transvg_optimizer(model: TransVG, args, **kw) -> tuple[dict, dict]:
    groups, no_grad = transvg_param_groups(model)
    return adamw_state(dict(model.named_parameters()), groups,
                       [None, args.lr_visu_cnn, args.lr_visu_tra, args.lr_bert], lr=args.lr,
                       weight_decay=args.weight_decay, lr_drop=args.lr_drop, no_grad=no_grad, **kw)


def checkpoint_object(model: TransVG, args, *, optimizer=None, lr_scheduler=None, epoch: int = 89,
                      val_accu: float = 0.8125, model_only: bool = False) -> dict:
    sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())
    if model_only:
        return {"model": sd}
    obj = {"model": sd}
    if optimizer is not None:
        obj["optimizer"] = optimizer
    if lr_scheduler is not None:
        obj["lr_scheduler"] = lr_scheduler
    obj.update(epoch=int(epoch), args=args, val_accu=float(val_accu))
    return obj


# --------------------------------------------------------------------------
# Containers (storages tagged 'cuda:0' as the released files are)
# --------------------------------------------------------------------------
@contextlib.contextmanager
def storages_tagged(location: str = "cuda:0"):
    orig = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location
    try:
        yield
    finally:
        torch.serialization.location_tag = orig


def save_zip_checkpoint(obj, path: Path, location: str = "cuda:0") -> None:
    """Default torch.save (zip), made byte-stable by make_split_fixtures' serialization_id fix."""
    sys.path.insert(0, str(HERE))
    from make_split_fixtures import save_zip

    with storages_tagged(location):
        save_zip(obj, path)


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _fake_address(i: int) -> str:
    """Deterministic 15-digit stand-ins for the `str(storage._cdata)` keys torch's legacy writer uses
    (heap addresses). Their sorted order (= data order) differs from first-use order, as with real files."""
    return str(139_000_000_000_000 + ((i * 2654435761) % (1 << 32)) * 64)


def save_legacy_checkpoint(obj, path: Path, location: str | Callable[[torch.UntypedStorage], str] = "cuda:0") -> None:
    """The pre-1.6 (non-zip) torch.save format, written deterministically.

    torch's own `_use_new_zipfile_serialization=False` writer keys storages by their memory address, so its
    bytes change from run to run; this writer is the same format (five protocol-2 pickles: magic, 1001,
    sys_info, the object with persistent ids ('storage', torch.FloatStorage, key, location, numel, None), the
    sorted key list; then per key an int64-LE element count and the raw data) with stable keys.
    `location`: every storage's tag, or a function of the (untyped) storage giving it.
    check_legacy_writer() compares it opcode by opcode with torch's writer."""
    serialized: dict[str, tuple[torch.UntypedStorage, torch.dtype]] = {}
    keys: dict[int, str] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, torch.storage.TypedStorage):
                st = o._untyped_storage
                key = keys.get(st._cdata)
                if key is None:
                    key = keys[st._cdata] = _fake_address(len(keys))
                    serialized[key] = (st, o.dtype)
                numel = st.nbytes() // torch.empty((), dtype=o.dtype).element_size()
                loc = location(st) if callable(location) else location
                return ("storage", getattr(torch, o._pickle_storage_type()), key, loc, numel, None)
            assert not torch.is_storage(o), type(o)
            return None

    f = io.BytesIO()
    sys_info = dict(protocol_version=LEGACY_PROTOCOL, little_endian=sys.byteorder == "little",
                    type_sizes=dict(short=2, int=4, long=4))
    pickle.dump(LEGACY_MAGIC, f, protocol=2)
    pickle.dump(LEGACY_PROTOCOL, f, protocol=2)
    pickle.dump(sys_info, f, protocol=2)
    Pickler(f, protocol=2).dump(obj)
    order = sorted(serialized)
    pickle.dump(order, f, protocol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(f.getvalue())
        for k in order:
            st, dtype = serialized[k]
            esz = torch.empty((), dtype=dtype).element_size()
            out.write(struct.pack("<q", st.nbytes() // esz))
            out.write(torch.empty(0, dtype=torch.uint8).set_(st).numpy().tobytes())


def _legacy_pickles(data: bytes):
    import pickletools

    f = io.BytesIO(data)
    out = []
    for _ in range(5):
        start = f.tell()
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(f)]
        out.append((ops, data[start:f.tell()]))
    return out, f.tell()


def check_legacy_writer(tmp: Path) -> None:
    """save_legacy_checkpoint == torch.save(..., _use_new_zipfile_serialization=False) up to the key strings."""
    obj = {"model": OrderedDict([("a", torch.arange(6, dtype=torch.float32).view(2, 3)),
                                 ("b", torch.ones(4)), ("c", torch.zeros(0)), ("d", torch.full((3,), 2.5))]),
           "args": argparse.Namespace(x=1, y="z"), "epoch": 3, "val_accu": 0.5,
           "optimizer": {"state": {0: {"step": 7, "exp_avg": torch.ones(2)}}, "param_groups": [{"betas": (0.9, 0.999)}]}}
    mine, theirs = tmp / "mine.pth", tmp / "theirs.pth"
    save_legacy_checkpoint(obj, mine)
    with storages_tagged("cuda:0"):
        torch.save(obj, str(theirs), _use_new_zipfile_serialization=False)
    a, b = mine.read_bytes(), theirs.read_bytes()
    (pa, ea), (pb, eb) = _legacy_pickles(a), _legacy_pickles(b)
    for i in (0, 1, 2):
        assert pa[i][1] == pb[i][1], i
    # object pickle: identical opcodes; args identical except the storage keys
    ka, kb = [], []
    assert len(pa[3][0]) == len(pb[3][0])
    for (na, xa), (nb, xb) in zip(pa[3][0], pb[3][0]):
        assert na == nb
        if xa != xb:
            assert isinstance(xa, str) and xa.isdigit() and xb.isdigit(), (xa, xb)
            ka.append(xa)
            kb.append(xb)
    kmap = dict(zip(kb, ka))
    assert len(kmap) == len(set(ka)) == 5
    # key lists are sorted; data blocks agree per key
    list_a = pickle.loads(pa[4][1])
    list_b = pickle.loads(pb[4][1])
    assert list_a == sorted(list_a) and sorted(kmap[k] for k in list_b) == list_a

    def blocks(data, start, order, sizes):
        out, pos = {}, start
        for k in order:
            n, = struct.unpack("<q", data[pos:pos + 8])
            out[k] = (n, data[pos + 8:pos + 8 + n * 4])
            pos += 8 + n * 4
        assert pos == len(data)
        return out

    ba = blocks(a, ea, list_a, None)
    bb = blocks(b, eb, list_b, None)
    assert all(bb[k] == ba[kmap[k]] for k in list_b)
    back = torch.load(str(mine), map_location="cpu", weights_only=False)
    assert all(torch.equal(back["model"][k], obj["model"][k]) for k in obj["model"])
    assert back["optimizer"]["state"][0]["step"] == 7


# --------------------------------------------------------------------------
# A DETR detection checkpoint (the training-init file users mistake for a TransVG model)
# --------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead)
        self.multihead_attn = nn.MultiheadAttention(d, nhead)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)


class DetrDecoder(nn.Module):
    def __init__(self, d, nhead, ffn, layers):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d, nhead, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)


class DetrTransformer(nn.Module):
    def __init__(self, d, nhead, ffn, enc, dec):
        super().__init__()
        self.encoder = Encoder(d, nhead, ffn, enc)
        self.decoder = DetrDecoder(d, nhead, ffn, dec)


class DetrDetector(nn.Module):
    """facebookresearch/detr's DETR parameter layout (registration order: transformer, class_embed, bbox_embed,
    query_embed, input_proj, backbone). Layout only: no forward."""

    def __init__(self, cfg: TransVGConfig, dec_layers: int = 1, num_queries: int = 5, num_classes: int = 91):
        super().__init__()
        d = cfg.hidden_dim
        self.transformer = DetrTransformer(d, cfg.nheads, cfg.dim_feedforward, cfg.enc_layers, dec_layers)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d)
        self.input_proj = nn.Conv2d(cfg.backbone_channels, d, 1)
        self.backbone = nn.ModuleList([BackboneWrapper(cfg), SinePosition(d // 2)])


def detr_args(cfg: TransVGConfig, dec_layers: int, num_queries: int) -> argparse.Namespace:
    a = OrderedDict(
        lr=1e-4, lr_backbone=1e-5, batch_size=4, weight_decay=1e-4, epochs=500, lr_drop=400, clip_max_norm=0.1,
        frozen_weights=None, backbone=cfg.backbone, dilation=cfg.dilation, position_embedding="sine",
        enc_layers=cfg.enc_layers, dec_layers=dec_layers, dim_feedforward=cfg.dim_feedforward,
        hidden_dim=cfg.hidden_dim, dropout=0.1, nheads=cfg.nheads, num_queries=num_queries, pre_norm=False,
        masks=False, aux_loss=True, set_cost_class=1, set_cost_bbox=5, set_cost_giou=2, mask_loss_coef=1,
        dice_loss_coef=1, bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1, dataset_file="coco",
        coco_path="/datasets01/COCO/022719", coco_panoptic_path=None, remove_difficult=False,
        output_dir="/checkpoint/detr", device="cuda", seed=42, resume="", start_epoch=0, eval=False,
        num_workers=2, world_size=64, dist_url="env://", rank=0, gpu=0, distributed=True, dist_backend="nccl",
    )
    ns = argparse.Namespace()
    for k, v in a.items():
        setattr(ns, k, v)
    return ns


# --------------------------------------------------------------------------
# Optional: compare against TransVG's own code (a checkout or git dir of djiajunustc/TransVG)
# --------------------------------------------------------------------------
class OriginalTransVG:
    """TransVG's own code as an oracle: exported from `repo` (a checkout, or a bare git dir) into a temporary
    folder and imported there. Nothing of it is copied into groundkit.

    Patches only what this newer environment needs, and only while a method runs: torchvision.__version__
    (utils/misc.py parses it as a float), torchvision's removed `pretrained` kwarg, ppb's
    BertModel.from_pretrained (no download: a BertConfig of our sizes) and a stub `scipy.io` (imported, unused,
    by data_loader.py)."""

    def __init__(self, repo: Path):
        import subprocess
        import tempfile

        repo = Path(repo)
        if (repo / "models" / "trans_vg.py").exists():
            self.src = repo
        else:
            self.src = Path(tempfile.mkdtemp(prefix="transvg_orig_"))
            subprocess.run(f"git --git-dir='{repo}' archive HEAD models utils datasets | tar -x -C '{self.src}'",
                           shell=True, check=True)

    @contextlib.contextmanager
    def _env(self, cfg: TransVGConfig | None = None):
        import types
        import torchvision
        from pytorch_pretrained_bert import modeling as ppb

        def purge():
            for m in [m for m in sys.modules if m.split(".")[0] in ("models", "utils", "datasets")]:
                del sys.modules[m]

        saved = dict(version=torchvision.__version__, r50=torchvision.models.resnet50,
                     r101=torchvision.models.resnet101, scipy=sys.modules.get("scipy"),
                     scipy_io=sys.modules.get("scipy.io"))
        assert "from_pretrained" not in ppb.BertModel.__dict__

        def no_pretrained(fn):
            def build(*a, pretrained=False, **kw):
                assert not pretrained
                return fn(*a, **kw)
            return build

        torchvision.__version__ = "9.9"
        torchvision.models.resnet50 = no_pretrained(saved["r50"])
        torchvision.models.resnet101 = no_pretrained(saved["r101"])
        if cfg is not None:
            bcfg = ppb.BertConfig(cfg.bert_vocab, hidden_size=cfg.bert_hidden, num_hidden_layers=cfg.bert_layers,
                                  num_attention_heads=cfg.bert_heads, intermediate_size=cfg.bert_intermediate,
                                  max_position_embeddings=cfg.bert_max_pos, type_vocab_size=cfg.bert_type_vocab)
            ppb.BertModel.from_pretrained = classmethod(lambda cls, name: cls(bcfg))
        if saved["scipy"] is None:
            stub = types.ModuleType("scipy")
            stub.io = types.ModuleType("scipy.io")
            sys.modules["scipy"], sys.modules["scipy.io"] = stub, stub.io
        purge()
        sys.path.insert(0, str(self.src))
        try:
            yield
        finally:
            sys.path.remove(str(self.src))
            purge()
            torchvision.__version__ = saved["version"]
            torchvision.models.resnet50 = saved["r50"]
            torchvision.models.resnet101 = saved["r101"]
            if "from_pretrained" in ppb.BertModel.__dict__:
                del ppb.BertModel.from_pretrained
            if saved["scipy"] is None:
                del sys.modules["scipy"], sys.modules["scipy.io"]

    def boxes(self, cfg: TransVGConfig, state_dict, args, batch) -> torch.Tensor:
        """Build TransVG's model from `args`, check its key order, load `state_dict` strictly, run it on
        batch = (canvas [B,3,S,S], mask [B,S,S] int, ids [B,L], text_mask [B,L]). At width != 64 the ResNet is
        ours (torchvision's has a fixed width; check_resnet_layout compares the two at width 64), and text_proj
        is rebuilt because TransVG hard-codes 768 inputs for 'bert-base-uncased'."""
        import importlib

        with self._env(cfg):
            models = importlib.import_module("models")
            misc = importlib.import_module("utils.misc")
            net = models.build_model(argparse.Namespace(**vars(args)))
            if cfg.width != 64:
                from torchvision.models._utils import IntermediateLayerGetter
                net.visumodel.backbone[0].body = IntermediateLayerGetter(ResNetBody(cfg), {"layer4": "0"})
                net.visumodel.input_proj = nn.Conv2d(cfg.backbone_channels, cfg.hidden_dim, 1)
            net.text_proj = nn.Linear(cfg.bert_hidden, cfg.vl_hidden_dim)
            assert list(net.state_dict().keys()) == list(state_dict.keys()), "key order differs from TransVG's"
            net.load_state_dict(state_dict, strict=True)
            net.eval()
            canvas, mask, ids, tmask = batch
            with torch.no_grad():
                return net(misc.NestedTensor(canvas, mask), misc.NestedTensor(ids, tmask))

    def text(self, tokenizer, phrase: str, max_query_len: int) -> tuple[list[str], list[int], list[int]]:
        """data_loader.py's __getitem__ text path: lower(), read_examples, convert_examples_to_features."""
        import importlib

        with self._env():
            dl = importlib.import_module("datasets.data_loader")
            ex = dl.read_examples(phrase.lower(), 0)
            f = dl.convert_examples_to_features(examples=ex, seq_length=max_query_len, tokenizer=tokenizer)[0]
            return f.tokens, f.input_ids, f.input_mask

    def image(self, path, size: int = 640) -> tuple[torch.Tensor, torch.Tensor]:
        """The test transforms of datasets/__init__.py (RandomResize([S]), ToTensor, NormalizeAndPad(S))."""
        import importlib
        from PIL import Image

        with self._env():
            T = importlib.import_module("datasets.transforms")
            tf = T.Compose([T.RandomResize([size]), T.ToTensor(), T.NormalizeAndPad(size=size)])
            out = tf({"img": Image.open(path).convert("RGB"), "box": torch.tensor([0.0, 0.0, 1.0, 1.0]),
                      "text": "x"})
            return out["img"], out["mask"]
