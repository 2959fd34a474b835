"""PyTorch reference for the Swin backbone of QRNet's detector checkpoints (mmdet 2.11 / mmcv 1.3 layout).

Our own transcription, written from a reading of the original code, not copied:
  * SwinTransformer/Swin-Transformer-Object-Detection @c7b20110, mmdet/models/backbones/swin_transformer.py
  * LukeForeverYoung/QRNet @6aaa23c, models/swin_model/mmdet/models/backbones/swin_transformer.py, whose
    `SwinTransformer` class is the same code (QRNet adds `MuSwinTransformer`/`MultiModalBasicLayer` with QD-ATT,
    which are left out here: the detector files hold the plain backbone).
The mmdet 2.11 Mask R-CNN parts around it (FPN neck, RPNHead, Shared2FCBBoxHead, FCNMaskHead) are modelled only
as far as their state_dict names, order and shapes go (QRNet's vendored mmdet 2.11 code); the neck's lateral 1x1
convs also run, since QRNet's own neck reuses them.

What the backbone does (eval mode; dropout and drop-path are identities there, ape=False):
  PatchEmbed     zero-pad W then H on the right/bottom to multiples of the patch size, Conv2d(k=s=patch),
                 LayerNorm over channels (patch_norm=True).
  per stage i    BasicLayer: depth_i SwinTransformerBlocks (even j: W-MSA, odd j: SW-MSA with shift window//2),
                 the stage output x_out, then PatchMerging (stages 0..2) for the next stage.
  block          x + attn(pad(norm1(x))) then x + mlp(norm2(x)): norm1 first, THEN zero-pad right/bottom to
                 multiples of the window (padded tokens take part in attention, they are not masked), cyclic
                 roll by -shift, window attention (fused qkv Linear, q*head_dim^-0.5, + relative position bias
                 table[index], + the -100 shift mask of the padded grid, softmax, proj), roll back, crop, residual.
                 Mlp = fc1, GELU (exact erf), fc2.
  shift mask     built per stage on the padded Hp x Wp grid: regions by the slices (0,-w), (-w,-s), (-s,None) on
                 each axis, label 3*hi+wi; within a window, pairs of different labels get -100.0, equal ones 0.0.
  PatchMerging   zero-pad odd H/W at the bottom/right, concat x[0::2,0::2], x[1::2,0::2], x[0::2,1::2],
                 x[1::2,1::2] (row parity first) -> LayerNorm(4C) -> Linear(4C, 2C, bias=False).
  outputs        norm{i}(x_out) reshaped to NCHW, for out_indices (0, 1, 2, 3).
LayerNorm eps 1e-5 everywhere.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
LN_EPS = 1e-5
SHIFT_MASK_VALUE = -100.0

# mmdet 2.11 CocoDataset.CLASSES (QRNet models/swin_model/mmdet/datasets/coco.py), what meta['CLASSES'] holds
COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush')
assert len(COCO_CLASSES) == 80


@dataclass
class SwinDetConfig:
    """mmdet MaskRCNN(SwinTransformer, FPN, RPNHead, StandardRoIHead) sizes. Defaults: Swin-S as QRNet uses it."""
    embed_dim: int = 96
    depths: list = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    patch_size: int = 4
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = False
    patch_norm: bool = True
    out_indices: tuple = (0, 1, 2, 3)
    neck_out_channels: int = 256      # FPN out_channels (= RPN in_channels, RoI extractor out_channels)
    rpn_feat_channels: int = 256
    num_anchors: int = 3              # AnchorGenerator scales [8] x ratios [0.5, 1, 2]
    bbox_fc_out_channels: int = 1024  # Shared2FCBBoxHead fc_out_channels
    bbox_roi_feat_size: int = 7
    mask_conv_out_channels: int = 256  # FCNMaskHead conv_out_channels, num_convs 4
    mask_num_convs: int = 4
    num_classes: int = 80

    @property
    def num_features(self) -> list[int]:
        return [self.embed_dim * 2 ** i for i in range(len(self.depths))]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_indices"] = list(self.out_indices)
        d["num_features"] = self.num_features
        d["head_dims"] = [c // h for c, h in zip(self.num_features, self.num_heads)]
        d["layer_norm_eps"] = LN_EPS
        d["shift_size"] = self.window_size // 2
        d["shift_mask_value"] = SHIFT_MASK_VALUE
        d["gelu"] = "exact (erf)"
        return d


# --------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------
def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] int64: for tokens p=(ph,pw), q=(qh,qw) of a window, (ph-qh+w-1)*(2w-1) + (pw-qw+w-1)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (window - 1)
    dx = xs[:, None] - xs[None, :] + (window - 1)
    return (dy * (2 * window - 1) + dx).to(torch.int64)


def to_windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of w) -> [B*nH*nW, w*w, C], windows in row-major order."""
    b, h, ww, c = x.shape
    x = x.reshape(b, h // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def from_windows(x: torch.Tensor, w: int, h: int, ww: int) -> torch.Tensor:
    c = x.shape[-1]
    b = x.shape[0] // ((h // w) * (ww // w))
    x = x.reshape(b, h // w, ww // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, ww, c)


def shift_attention_mask(hp: int, wp: int, window: int, shift: int) -> torch.Tensor:
    """[nW, w*w, w*w] float32: 0 within a region, -100 across regions, on the padded hp x wp grid."""
    labels = torch.zeros(hp, wp)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, hs in enumerate(bands):
        for j, ws in enumerate(bands):
            labels[hs, ws] = 3 * i + j
    lw = to_windows(labels[None, :, :, None], window)[..., 0]  # [nW, w*w]
    diff = lw[:, None, :] - lw[:, :, None]
    return torch.where(diff != 0, torch.full_like(diff, SHIFT_MASK_VALUE), torch.zeros_like(diff))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        # registration order = state_dict order: table (parameter), index (buffer), qkv, proj
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        bw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)  # [bw, h, n, n]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, h).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.reshape(bw // nw, nw, h, n, n) + mask[None, :, None]).reshape(bw, h, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        assert 0 <= shift < window
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, hw: tuple[int, int], mask):
        h, w = hw
        b, n, c = x.shape
        assert n == h * w
        ws = self.window
        y = self.norm1(x).reshape(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))  # zeros AFTER norm1
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(to_windows(y, ws), mask if self.shift else None)
        y = from_windows(y, ws, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, n, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=LN_EPS)

    def forward(self, x, hw: tuple[int, int]):
        h, w = hw
        b, n, c = x.shape
        x = x.reshape(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, qkv_bias: bool,
                 downsample: bool):
        super().__init__()
        self.window, self.shift = window, window // 2
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window, 0 if j % 2 == 0 else window // 2, mlp_ratio, qkv_bias)
            for j in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, hw):
        h, w = hw
        hp, wp = math.ceil(h / self.window) * self.window, math.ceil(w / self.window) * self.window
        mask = shift_attention_mask(hp, wp, self.window, self.shift).to(x.dtype)
        for blk in self.blocks:
            x = blk(x, hw, mask)
        if self.downsample is None:
            return x, x, hw
        return x, self.downsample(x, hw), ((h + 1) // 2, (w + 1) // 2)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int, norm: bool):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS) if norm else None

    def forward(self, x):
        _, _, h, w = x.shape
        p = self.patch
        if w % p:
            x = F.pad(x, (0, p - w % p))
        if h % p:
            x = F.pad(x, (0, 0, 0, p - h % p))
        x = self.proj(x)
        if self.norm is not None:
            b, c, hh, ww = x.shape
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
        return x


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinDetConfig):
        super().__init__()
        assert not cfg.ape, "absolute position embedding is off in every QRNet / Swin detector config"
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_norm)
        n = len(cfg.depths)
        self.layers = nn.ModuleList([
            BasicLayer(cfg.num_features[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio,
                       cfg.qkv_bias, downsample=i < n - 1) for i in range(n)])
        for i in cfg.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(cfg.num_features[i], eps=LN_EPS))

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, x, hw_next = layer(x, hw)
            if i in self.cfg.out_indices:
                y = getattr(self, f"norm{i}")(x_out)
                outs.append(y.reshape(-1, hw[0], hw[1], y.shape[-1]).permute(0, 3, 1, 2).contiguous())
            hw = hw_next
        return tuple(outs)


# --------------------------------------------------------------------------
# The mmdet 2.11 Mask R-CNN around it (state_dict layout; the lateral convs also run)
# --------------------------------------------------------------------------
class ConvModule(nn.Module):
    """mmcv ConvModule without norm: the conv is the child `conv` (keys `<name>.conv.weight/bias`)."""

    def __init__(self, cin: int, cout: int, k: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding)

    def forward(self, x):
        return self.conv(x)


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList([ConvModule(c, out_channels, 1) for c in in_channels])
        self.fpn_convs = nn.ModuleList([ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels])

    def laterals(self, feats):
        """The 1x1 lateral convs (bias, no norm, no activation) on each stage: what QRNet's neck reuses."""
        return [conv(f) for conv, f in zip(self.lateral_convs, feats)]


class RPNHead(nn.Module):
    def __init__(self, cin: int, feat: int, num_anchors: int):
        super().__init__()
        self.rpn_conv = nn.Conv2d(cin, feat, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat, num_anchors * 1, 1)  # use_sigmoid: 1 class channel per anchor
        self.rpn_reg = nn.Conv2d(feat, num_anchors * 4, 1)


class Shared2FCBBoxHead(nn.Module):
    """ConvFCBBoxHead(num_shared_fcs=2): BBoxHead.__init__ registers fc_cls/fc_reg first and ConvFCBBoxHead
    re-assigns them after shared_fcs (same slot), so the key order is fc_cls, fc_reg, shared_fcs.0, shared_fcs.1."""

    def __init__(self, cin: int, roi: int, fc: int, num_classes: int):
        super().__init__()
        self.fc_cls = nn.Linear(fc, num_classes + 1)
        self.fc_reg = nn.Linear(fc, 4 * num_classes)  # reg_class_agnostic=False
        self.shared_fcs = nn.ModuleList([nn.Linear(cin * roi * roi, fc), nn.Linear(fc, fc)])


class FCNMaskHead(nn.Module):
    def __init__(self, cin: int, conv_out: int, num_convs: int, num_classes: int):
        super().__init__()
        self.convs = nn.ModuleList([ConvModule(cin if i == 0 else conv_out, conv_out, 3, padding=1)
                                    for i in range(num_convs)])
        self.upsample = nn.ConvTranspose2d(conv_out, conv_out, 2, stride=2)  # upsample_cfg type 'deconv'
        self.conv_logits = nn.Conv2d(conv_out, num_classes, 1)


class StandardRoIHead(nn.Module):
    def __init__(self, cfg: SwinDetConfig):
        super().__init__()
        # bbox_roi_extractor / mask_roi_extractor (RoIAlign) hold no tensors
        self.bbox_head = Shared2FCBBoxHead(cfg.neck_out_channels, cfg.bbox_roi_feat_size,
                                           cfg.bbox_fc_out_channels, cfg.num_classes)
        self.mask_head = FCNMaskHead(cfg.neck_out_channels, cfg.mask_conv_out_channels, cfg.mask_num_convs,
                                     cfg.num_classes)


class MaskRCNN(nn.Module):
    def __init__(self, cfg: SwinDetConfig):
        super().__init__()
        self.backbone = SwinTransformer(cfg)
        self.neck = FPN(cfg.num_features, cfg.neck_out_channels)
        self.rpn_head = RPNHead(cfg.neck_out_channels, cfg.rpn_feat_channels, cfg.num_anchors)
        self.roi_head = StandardRoIHead(cfg)

    @torch.no_grad()
    def features(self, pixels):
        stages = self.backbone(pixels)
        return stages, self.neck.laterals(stages)


BACKBONE_INIT_PREFIXES = ("backbone.", "neck.lateral_convs.")


def used_by_backbone_init(key: str) -> bool:
    """The keys a QRNet backbone init takes from a detector file: all of backbone.* (QRNet's MuSwinTransformer
    has them under the same names, plus its qdatt modules that the file lacks) and the neck's lateral convs."""
    return key.startswith(BACKBONE_INIT_PREFIXES)


@torch.no_grad()
def randomize_(model: nn.Module, gen: torch.Generator) -> None:
    """Random weights that keep activations O(1): weights N(0, 1/fan_in), biases N(0, 0.1^2), LayerNorm weight
    1 + N(0, 0.2^2) and bias N(0, 0.1^2), relative position bias tables N(0, 0.5^2) (so they visibly matter)."""
    for name, p in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif p.ndim == 1:
            is_norm_w = name.endswith(".weight")
            base = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * base if is_norm_w else 0.1 * base)
        else:
            fan_in = p.shape[1] * (p[0, 0].numel() if p.ndim > 2 else 1)
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.ConvTranspose2d):
                fan_in = p.shape[0] * p[0, 0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


# --------------------------------------------------------------------------
# mmcv 1.3 checkpoint object (Swin-Transformer-Object-Detection's EpochBasedRunnerAmp + mmcv_custom
# save_checkpoint, as QRNet's vendored copy has it)
# --------------------------------------------------------------------------
SWIN_PARAMWISE_CUSTOM_KEYS = {"absolute_pos_embed": 0.0, "relative_position_bias_table": 0.0, "norm": 0.0}


def mmcv_param_groups(model: nn.Module, base_lr: float, base_wd: float) -> list[tuple[str, dict]]:
    """mmcv 1.3 DefaultOptimizerConstructor.add_params with the Swin configs' paramwise_cfg: one group per
    parameter in named_parameters() order; a custom key (longest first) sets lr = base_lr * 1 and weight_decay =
    base_wd * decay_mult; else a (non-norm) bias gets lr = base_lr * bias_lr_mult(1) and weight_decay = base_wd *
    bias_decay_mult(1); other weights get nothing (torch fills the defaults)."""
    keys = sorted(sorted(SWIN_PARAMWISE_CUSTOM_KEYS), key=len, reverse=True)
    groups = []
    for name, _ in model.named_parameters():
        g = {}
        hit = next((k for k in keys if k in name), None)
        if hit is not None:
            g["lr"] = base_lr * 1.0
            g["weight_decay"] = base_wd * SWIN_PARAMWISE_CUSTOM_KEYS[hit]
        elif name.endswith(".bias"):
            g["lr"] = base_lr * 1.0
            g["weight_decay"] = base_wd * 1.0
        groups.append((name, g))
    return groups


def adamw_torch110_state_dict(model: nn.Module, gen: torch.Generator, *, base_lr: float, base_wd: float,
                              current_lr: float, step: int) -> dict:
    """optimizer.state_dict() of a torch 1.10 AdamW built by mmcv 1.3 (one group per parameter), after `step`
    updates: state {i: {'step': int, 'exp_avg', 'exp_avg_sq'}} (torch 1.10 keeps `step` as a Python int), and
    param_groups whose keys are mmcv's (lr, weight_decay) then torch 1.10's AdamW defaults in order (lr, betas,
    eps, weight_decay, amsgrad) via setdefault, then mmcv's LrUpdaterHook `initial_lr`, then `params` (packed)."""
    defaults = OrderedDict(lr=base_lr, betas=(0.9, 0.999), eps=1e-08, weight_decay=base_wd, amsgrad=False)
    named = dict(model.named_parameters())
    state, groups = {}, []
    for i, (name, g) in enumerate(mmcv_param_groups(model, base_lr, base_wd)):
        for k, v in defaults.items():
            g.setdefault(k, v)
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = current_lr
        g["params"] = [i]
        groups.append(g)
        p = named[name]
        m = torch.randn(p.shape, generator=gen) * 1e-4
        v = (torch.randn(p.shape, generator=gen) * 1e-4) ** 2 + 1e-10
        state[i] = {"step": int(step), "exp_avg": m, "exp_avg_sq": v}
    return {"state": state, "param_groups": groups}


@contextlib.contextmanager
def storage_locations(default: str, overrides: dict[int, str]):
    """torch.save tags each storage with location_tag(storage); map data_ptr -> location (else `default`).
    mmcv's save_checkpoint moves the weights to the CPU (weights_to_cpu) but not the optimizer state, so a
    training checkpoint has state_dict storages on 'cpu' and optimizer storages on 'cuda:0'."""
    import torch.serialization as ser

    orig = ser.location_tag

    def tag(storage):
        return overrides.get(storage.data_ptr(), default)

    ser.location_tag = tag
    try:
        yield
    finally:
        ser.location_tag = orig


def tensor_ptrs(obj) -> list[int]:
    out = []
    if isinstance(obj, torch.Tensor):
        out.append(obj.untyped_storage().data_ptr())
    elif isinstance(obj, dict):
        for v in obj.values():
            out += tensor_ptrs(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += tensor_ptrs(v)
    return out


def save_mmcv_zip(obj: dict, path: Path, *, optimizer_location: str = "cuda:0") -> None:
    """torch.save into a buffer (entries under `archive/`, as mmcv_custom.save_checkpoint's
    `torch.save(checkpoint, f)` with an open file writes them), made byte-stable by make_split_fixtures'
    serialization_id fix."""
    sys.path.insert(0, str(HERE))
    from make_split_fixtures import save_zip

    over = {p: optimizer_location for p in tensor_ptrs(obj.get("optimizer", {}))}
    with storage_locations("cpu", over):
        save_zip(obj, path, via_buffer=True)


def save_mmcv_legacy(obj: dict, path: Path, *, optimizer_location: str = "cuda:0") -> None:
    """The same object in torch's pre-1.6 (non-zip) container, written deterministically: transvg_ref's legacy
    format (magic, 1001, sys_info, object with ('storage', torch.<T>Storage, key, location, numel, None)
    persistent ids, sorted key list, then per key int64-LE numel + raw data) with per-storage locations."""
    sys.path.insert(0, str(HERE))
    import transvg_ref as T

    opt_ptrs = set(tensor_ptrs(obj.get("optimizer", {})))
    T.save_legacy_checkpoint(obj, path,
                             location=lambda st: optimizer_location if st.data_ptr() in opt_ptrs else "cpu")


# --------------------------------------------------------------------------
# The original class, for cross-checks (mirror git dirs; mmcv / mmdet / timm-free stubs)
# --------------------------------------------------------------------------
_STUBS = {
    "mmcv_custom/__init__.py": "def load_checkpoint(*a, **k):\n    raise RuntimeError('stub')\n",
    "mmdet/__init__.py": "",
    "mmdet/utils/__init__.py": "def get_root_logger(*a, **k):\n    import logging\n    return logging.getLogger('stub')\n",
    "mmdet/models/__init__.py": "",
    "mmdet/models/builder.py": (
        "class _Registry:\n"
        "    def __init__(self):\n        self.modules = {}\n"
        "    def register_module(self, *a, **k):\n"
        "        def deco(cls):\n            self.modules[cls.__name__] = cls\n            return cls\n"
        "        return deco\n"
        "BACKBONES = _Registry()\n"),
    "mmdet/models/backbones/__init__.py": "",
    # QRNet's copy also imports these (only used by MuSwinTransformer / inside forward)
    "models/__init__.py": "",
    "models/trans_vg.py": "class MuModule:\n    pass\n",
    "models/dynamic_attention/__init__.py": "",
    "models/dynamic_attention/query_dynamic_attention.py": "class QueryDynamicAttention:\n    pass\n",
    "icecream/__init__.py": "def ic(*a):\n    return a[0] if len(a) == 1 else a\n",
    # timm 0.4-era helpers the file imports (trunc_normal_ only initialises; DropPath is identity at eval)
    "timm/__init__.py": "",
    "timm/models/__init__.py": "",
    "timm/models/layers/__init__.py": (
        "import collections.abc, torch\n"
        "from torch import nn\n"
        "def to_2tuple(x):\n"
        "    return tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)\n"
        "def trunc_normal_(t, mean=0., std=1., a=-2., b=2.):\n"
        "    return nn.init.trunc_normal_(t, mean, std, a, b)\n"
        "class DropPath(nn.Module):\n"
        "    def __init__(self, p=None):\n        super().__init__()\n        self.p = p\n"
        "    def forward(self, x):\n"
        "        assert not self.training\n        return x\n"),
}

MIRRORS = {
    "swin_od": (Path("/work/.mirror/SwinTransformer+Swin-Transformer-Object-Detection/repo"),
                "mmdet/models/backbones/swin_transformer.py"),
    "qrnet": (Path("/work/.mirror/LukeForeverYoung+QRNet/repo"),
              "models/swin_model/mmdet/models/backbones/swin_transformer.py"),
}


def import_from_files(root: Path, files: dict[str, str | bytes], purge: tuple[str, ...], module: str):
    """Write `files` (path under `root` -> text or bytes), drop the loaded modules whose top-level package is in
    `purge` (earlier stubs or copies), then import `module` with `root` first on sys.path (warnings silenced)."""
    import importlib
    import warnings

    for p, data in files.items():
        f = root / p
        f.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            f.write_bytes(data)
        else:
            f.write_text(data)
    for name in list(sys.modules):
        if name.split(".")[0] in purge:
            del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    finally:
        sys.path.remove(str(root))


def load_original_swin(which: str, tmp: Path):
    """Import the original swin_transformer.py (bytes as in the mirror's HEAD) from a temporary package with
    stub mmcv_custom / mmdet / timm / icecream / models modules; returns (module, commit)."""
    import subprocess

    git_dir, rel = MIRRORS[which]
    src = subprocess.run(["git", "-C", str(git_dir), "show", f"HEAD:{rel}"], check=True,
                         capture_output=True).stdout
    commit = subprocess.run(["git", "-C", str(git_dir), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    mod = import_from_files(tmp / f"orig_{which}", {**_STUBS, "mmdet/models/backbones/swin_transformer.py": src},
                            ("mmcv_custom", "mmdet", "models", "icecream", "timm"),
                            "mmdet.models.backbones.swin_transformer")
    return mod, commit


def original_backbone(mod, cfg: SwinDetConfig) -> nn.Module:
    return mod.SwinTransformer(
        pretrain_img_size=224, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depths=list(cfg.depths), num_heads=list(cfg.num_heads), window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
        drop_path_rate=0.2, ape=False, patch_norm=True, out_indices=tuple(cfg.out_indices), frozen_stages=-1,
        use_checkpoint=False)


def qrnet_test_canvas(image_path: Path, side: int, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """QRNet's own eval transforms (datasets/__init__.py: RandomResize([side]), ToTensor(),
    NormalizeAndPad(size=side)) from the mirror's datasets/transforms.py, with stub utils.box_utils /
    utils.misc; returns (canvas [3,S,S], mask [S,S])."""
    import subprocess

    from PIL import Image

    git_dir = MIRRORS["qrnet"][0]
    src = subprocess.run(["git", "-C", str(git_dir), "show", "HEAD:datasets/transforms.py"], check=True,
                         capture_output=True).stdout
    files = {"qrnet_datasets/__init__.py": "",
             "utils/__init__.py": "",
             "utils/box_utils.py": ("import torch\n"
                                    "def xyxy2xywh(x):\n"
                                    "    x0, y0, x1, y1 = x.unbind(-1)\n"
                                    "    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)\n"),
             "utils/misc.py": "from torch.nn.functional import interpolate\n",
             "qrnet_datasets/transforms.py": src}
    tr = import_from_files(tmp / "orig_qrnet_transforms", files, ("utils", "qrnet_datasets"),
                           "qrnet_datasets.transforms")
    pipeline = tr.Compose([tr.RandomResize([side]), tr.ToTensor(), tr.NormalizeAndPad(size=side)])
    img = Image.open(image_path).convert("RGB")
    out = pipeline({"img": img, "box": torch.tensor([0.0, 0.0, 1.0, 1.0])})
    return out["img"], out["mask"]
