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


MODELS: dict[str, Callable] = {
    "clip-b16-vision": build_clip_b16_vision,
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
