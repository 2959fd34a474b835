#!/usr/bin/env python3
"""CPU timing of reference PyTorch forwards, for comparison with the Rust side.

    .venv-ref/bin/python tools/reference/bench_torch.py --threads 2 --batch 1 --iters 10

Prints one JSON object on stdout, e.g.
    {"model": "clip-b16-vision", "batch": 1, "threads": 2, "median_ms": 123.4, ...}
Random weights (timing does not depend on them), float32, torch.inference_mode.
To add a model: write a builder returning (module, example_inputs_dict) and
register it in MODELS.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clip_b16_config  # noqa: E402


def time_fn(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Run fn warmup times, then iters timed times; return per-call ms."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def build_clip_b16_vision(batch: int, attn: str):
    """HF CLIPVisionModel (ViT-B/16 @224): patch embed, pre-LN, 12 layers,
    post-LN of the CLS token. No visual projection."""
    from transformers import CLIPVisionModel

    vcfg = clip_b16_config().vision_config
    vcfg._attn_implementation = attn
    model = CLIPVisionModel(vcfg).eval()
    x = torch.randn(batch, 3, vcfg.image_size, vcfg.image_size)
    return model, {"pixel_values": x}


class _FusionLayer(torch.nn.Module):
    """TransVG `VisionLanguageEncoderLayer` (`forward_pre`, `--normalize_before`):
    pos added to queries and keys, not values; ReLU FFN; dropout inactive (eval)."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float, need_weights: bool):
        super().__init__()
        nn = torch.nn
        # batch_first=True ([B, T, d]), the same layout as the Rust side; TransVG itself
        # runs [T, B, d] with batch_first=False (same math, one transpose less here).
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.need_weights = need_weights

    def forward(self, x, pos, key_padding_mask):
        h = self.norm1(x)
        qk = h + pos
        # q is k but not v: the slow path of nn.MultiheadAttention with three in-projections
        # (the fast path needs q is k is v). need_weights=False -> F.scaled_dot_product_attention;
        # True -> explicit baddbmm + softmax (TransVG's literal call, used for --attn eager).
        a = self.self_attn(qk, qk, value=h, key_padding_mask=key_padding_mask,
                           need_weights=self.need_weights)[0]
        x = x + self.dropout1(a)
        h = self.linear2(self.dropout(torch.relu(self.linear1(self.norm2(x)))))
        return x + self.dropout2(h)


class _Mlp(torch.nn.Module):
    """DETR's MLP (`layers.{i}`), ReLU between the linears."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


class GrounderClipB16(torch.nn.Module):
    """Twin of the Rust `Grounder` with `GrounderConfig::clip_b16()`
    (crates/gk-models/src/grounder.rs): CLIP ViT-B/16 @224 (all 197 tokens through
    post_layernorm) + CLIP text base (77 tokens, causal + padding mask), visu_proj 768->512,
    text_proj 512->512, [REG] token, learned pos (1+77+197, 512) on q/k of 6 pre-norm fusion
    layers (8 heads, FFN 2048, ReLU), final LayerNorm, MLP 512->512->512->4 + sigmoid on [REG]."""

    def __init__(self, attn: str, d: int = 512, layers: int = 6, heads: int = 8, ffn: int = 2048,
                 dropout: float = 0.1, max_text_len: int = 77):
        super().__init__()
        from transformers import CLIPTextModel, CLIPVisionModel

        nn = torch.nn
        cfg = clip_b16_config()
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        vcfg._attn_implementation = attn
        tcfg._attn_implementation = attn
        self.visual = CLIPVisionModel(vcfg)
        self.text = CLIPTextModel(tcfg)
        self.patch = vcfg.patch_size
        n_vis = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        self.visu_proj = nn.Linear(vcfg.hidden_size, d)
        self.text_proj = nn.Linear(tcfg.hidden_size, d)
        self.reg_token = nn.Embedding(1, d)
        self.vl_pos_embed = nn.Embedding(1 + max_text_len + n_vis, d)
        self.layers = nn.ModuleList(
            _FusionLayer(d, heads, ffn, dropout, need_weights=(attn == "eager")) for _ in range(layers))
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.bbox_embed = _Mlp([d, d, d, 4])

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask):
        vout = self.visual(pixel_values=pixel_values)
        # all tokens (CLS + patches) through post_layernorm, as the Rust VisualEncoder
        # transformers 5 flattens CLIPVisionModel (no .vision_model); 4.x nests it
        post_ln = getattr(self.visual, "vision_model", self.visual).post_layernorm
        vtok = post_ln(vout.last_hidden_state)
        b = pixel_values.shape[0]
        # nearest downsampling of the pixel mask (top-left pixel of each patch), CLS valid
        pm = pixel_mask[:, ::self.patch, ::self.patch].reshape(b, -1)
        vmask = torch.cat([pm.new_ones(b, 1), pm], 1)
        ttok = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        v, t = self.visu_proj(vtok), self.text_proj(ttok)
        reg = self.reg_token.weight.unsqueeze(0).expand(b, -1, -1)
        x = torch.cat([reg, t, v], 1)  # [B, 1+L+N, d]: [REG, text, visual]
        mask = torch.cat([vmask.new_ones(b, 1), attention_mask.to(vmask.dtype), vmask], 1)
        key_padding_mask = mask == 0  # True = ignore
        pos = self.vl_pos_embed.weight.unsqueeze(0)
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask)
        x = self.norm(x)
        return torch.sigmoid(self.bbox_embed(x[:, 0]))


def build_grounder_clip_b16(batch: int, attn: str):
    """PyTorch twin of `GrounderConfig::clip_b16()`; --attn picks the HF CLIP attention
    (sdpa|eager) and, in the fusion, need_weights=False (SDPA) or True (explicit softmax)."""
    model = GrounderClipB16(attn).eval()
    s, l = 224, 77
    inputs = {
        "pixel_values": torch.randn(batch, 3, s, s),
        "pixel_mask": torch.ones(batch, s, s),
        "input_ids": torch.ones(batch, l, dtype=torch.long),
        "attention_mask": torch.ones(batch, l, dtype=torch.long),
    }
    return model, inputs


MODELS: dict[str, Callable] = {
    "clip-b16-vision": build_clip_b16_vision,
    "grounder-clip-b16": build_grounder_clip_b16,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="clip-b16-vision", choices=sorted(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    model, inputs = MODELS[args.model](args.batch, args.attn)
    with torch.inference_mode():
        ms = time_fn(lambda: model(**inputs), args.warmup, args.iters)
    print(json.dumps({
        "model": args.model, "batch": args.batch, "threads": args.threads,
        "median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3),
        "iters": args.iters, "warmup": args.warmup, "attn": args.attn,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
