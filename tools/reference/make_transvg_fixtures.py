#!/usr/bin/env python3
"""Golden fixtures for groundkit's TransVG port (importer, preprocessing, forward), from transvg_ref.py.

Default: the committed tiny fixtures in tests/fixtures/transvg/ (about 5 MB, a minute on 2 cores):

  vocab.txt                  subset of bert-base-uncased's vocab.txt (original order, [PAD] [UNK] [CLS] [SEP]
                             [MASK] kept) with every token the full vocab gives on the case expressions; the ppb
                             tokenizer gives the same token strings with it as with the full vocab (asserted)
  images/*.png               4 procedural scenes: tie_330x512 (412.5 -> 412: the half-to-even resize tie),
                             wide_500x281, small_150x100 (enlarged), square_256x256 (8-bit grayscale PNG: 'L' mode,
                             so convert('RGB') matters)
  r50_tiny.pth               TransVG, zip container, ResNet-50 depth at width 2, DETR 32/4/64 x2, BERT 128/2 heads/
                             256 x2 layers (64 positions), VL 32/4/64 x2, max_query_len 20 (vl_pos_embed [421, 32]);
                             optimizer (torch>=1.12 style AdamW: 0-d tensor `step`) + StepLR state
  r101_tiny_legacy.pth       TransVG, LEGACY container, ResNet-101 depth at width 2, BERT 1 layer, max_query_len 40
                             (vl_pos_embed [441, 32]); optimizer in torch-1.5 style (int `step`)
  r50_tiny_dilated.pth       TransVG, zip, dilation True (stride 16: 40x40 = 1600 visual tokens, vl_pos_embed
                             [1621, 16]), the minimal widths of bad_shape.pth; no optimizer / lr_scheduler entries
  detr_r50_tiny.pth          a DETR *detection* checkpoint (the training-init file, not a TransVG model)
  bad_shape.pth              smallest valid TransVG file with text_proj.weight transposed
  missing_key.pth            the same without vl_pos_embed.weight
  <model>.io.safetensors     per case the predicted box; for cases 0 and 1 the intermediates
  cases.json                 everything else (schema below)

--full OUT: full-size random R-50 TransVG (622 tensors, 149.85 M values) + the same cases (not committed).
--full-r101 OUT: the same for R-101 (legacy container with args, no optimizer).

cases.json (schema 1):
  {"schema": 1, "imsize": 640, "mean": [...], "std": [...],
   "vocab": {"file", "lines", "source_sha256" (the full vocab it was cut from)},
   "images": {name: {"width", "height", "png_mode", "ratio" (float64), "new_w", "new_h", "top", "left"}},
   "models": {file: {"container": "zip"|"legacy", "kind": "transvg", "config": {TransVGConfig + derived},
                     "top_level": [keys], "optimizer": null|"torch1.5"|"torch2", "n_tensors", "n_values",
                     "io": "<file>.io.safetensors", "vocab": "vocab.txt",
                     "cases": [{"case", "image", "expr", "text" (lower-cased), "tokens", "ids", "mask",
                                "ratio", "new_w", "new_h", "top", "left",
                                "pred_cxcywh" (float32 values as JSON numbers),
                                "bbox_xyxy" (image pixels after the canvas clamp, float64, may leave the image),
                                "bbox_xyxy_clipped" (the same clipped to [0,w]x[0,h])}]}},
   "invalid": {file: {"kind", "defect", ...}}}
io.safetensors: case{i}.pred F32 [4] for every case; for i in (0, 1): case{i}.pixels_sum, case{i}.pixels_abs_sum
  (F64 0-d: sums over the normalised padded [3,S,S] canvas), case{i}.pixels_row F32 [3, S] (canvas row S//2),
  case{i}.visu_mask F32 [grid^2] (1 = pad), case{i}.backbone F32 [C, grid, grid] (layer4), case{i}.detr
  F32 [grid^2, d] (DETR memory, batch-first), case{i}.bert F32 [L, bert_hidden] (last layer, pads included),
  case{i}.reg F32 [vl_d] (the reg token after the VL encoder, before the head). The dilated model's io has
  pred for every case and visu_mask/reg for case 0 only.

Checks made on every run: our ResNet = torchvision's (keys, order, shapes at width 64; numerics), our BERT =
ppb 0.6.2's BertModel (strict load, outputs), our legacy writer = torch's (opcode by opcode, up to keys), our
preprocessing = torchvision's functional path bit for bit, and, when a TransVG checkout/git dir is given
(--original, default /work/.mirror/djiajunustc+TransVG/repo if present), TransVG's own model code (strict load,
same key order, boxes to 1e-5), its test transforms (canvas bit-identical) and its text code (same ids).
--verify-stable regenerates into a temporary folder and asserts identical bytes.

Run (reference venv of tools/reference/setup.sh; CPU only):
    .venv-ref/bin/python tools/reference/make_transvg_fixtures.py [--out DIR] [--verify-stable]
    .venv-ref/bin/python tools/reference/make_transvg_fixtures.py --full /tmp/transvg_full [--bench]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import transvg_ref as T  # noqa: E402
from common import assert_same_files  # noqa: E402

ROOT = HERE.parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "transvg"
FULL_VOCAB = ROOT / ".venv-ref" / "assets" / "minilm" / "vocab.txt"
FULL_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"  # bert-base-uncased
DEFAULT_ORIGINAL = Path("/work/.mirror/djiajunustc+TransVG/repo")
S = 640
THREADS = 2

# --------------------------------------------------------------------------
# Images: procedural scenes (smooth gradients + flat shapes, 2x supersampled, no noise)
# --------------------------------------------------------------------------
SKY = ((70, 120, 200), (180, 210, 240))
GRASS = ((90, 150, 70), (50, 100, 40))


def _scene(w, h, sky, ground, horizon, sun, shapes, mode="RGB"):
    from PIL import Image, ImageDraw

    ss = 2
    W, H = w * ss, h * ss
    y = np.arange(H, dtype=np.float64)[:, None, None]
    hz = horizon * H
    t_sky = np.clip(y / max(hz, 1.0), 0, 1)
    t_gr = np.clip((y - hz) / max(H - hz, 1.0), 0, 1)
    top = np.array(sky[0]) * (1 - t_sky) + np.array(sky[1]) * t_sky
    bot = np.array(ground[0]) * (1 - t_gr) + np.array(ground[1]) * t_gr
    arr = np.where(y < hz, top, bot) * np.ones((1, W, 1))
    if sun is not None:
        cx, cy, r, col = sun
        xx = np.arange(W, dtype=np.float64)[None, :]
        yy = np.arange(H, dtype=np.float64)[:, None]
        d = np.sqrt((xx - cx * W) ** 2 + (yy - cy * H) ** 2) / (r * min(W, H))
        glow = np.exp(-1.5 * d ** 2)[..., None]
        arr = arr * (1 - glow) + np.array(col, dtype=np.float64) * glow
    img = Image.fromarray(np.clip(np.floor(arr + 0.5), 0, 255).astype(np.uint8), "RGB")
    dr = ImageDraw.Draw(img)
    for kind, b, col in shapes:
        bx = [b[0] * W, b[1] * H, b[2] * W, b[3] * H]
        if kind == "rect":
            dr.rectangle(bx, fill=tuple(col))
        elif kind == "ellipse":
            dr.ellipse(bx, fill=tuple(col))
        elif kind == "tri":
            dr.polygon([(bx[0], bx[3]), ((bx[0] + bx[2]) / 2, bx[1]), (bx[2], bx[3])], fill=tuple(col))
        else:
            raise ValueError(kind)
    img = img.resize((w, h), Image.LANCZOS)
    return img.convert(mode) if mode != "RGB" else img


HOUSE = [("rect", (0.55, 0.55, 0.85, 0.80), (190, 40, 40)), ("tri", (0.50, 0.40, 0.90, 0.56), (90, 50, 30)),
         ("rect", (0.66, 0.66, 0.74, 0.80), (240, 240, 235)), ("rect", (0.58, 0.60, 0.63, 0.65), (250, 230, 120)),
         ("rect", (0.77, 0.60, 0.82, 0.65), (250, 230, 120))]
TREE = [("rect", (0.18, 0.45, 0.24, 0.78), (100, 70, 40)), ("ellipse", (0.06, 0.22, 0.36, 0.52), (40, 130, 50))]
MAN = [("ellipse", (0.42, 0.62, 0.48, 0.67), (230, 190, 160)), ("rect", (0.41, 0.67, 0.49, 0.82), (200, 30, 40))]

IMAGES = {
    # 330 wide, 512 high: 330 * 640/512 = 412.5 -> 412 (half to even)
    "tie_330x512.png": lambda: _scene(330, 512, SKY, GRASS, 0.55, (0.80, 0.15, 0.12, (255, 230, 140)),
                                      HOUSE + TREE + MAN),
    # wide beach: sea, a big blue disc top right, boats, a person with a bag
    "wide_500x281.png": lambda: _scene(
        500, 281, ((120, 170, 230), (220, 235, 250)), ((30, 90, 160), (230, 210, 160)), 0.45, None,
        [("ellipse", (0.78, 0.05, 0.95, 0.35), (40, 60, 200)),
         ("rect", (0.10, 0.50, 0.30, 0.56), (120, 60, 30)), ("tri", (0.14, 0.25, 0.26, 0.50), (245, 245, 240)),
         ("rect", (0.55, 0.55, 0.66, 0.59), (200, 200, 40)), ("ellipse", (0.40, 0.62, 0.44, 0.70), (230, 190, 160)),
         ("rect", (0.39, 0.70, 0.45, 0.92), (30, 150, 60)), ("rect", (0.45, 0.76, 0.50, 0.84), (110, 70, 40))]),
    # small, enlarged 4.27x: sun, yellow square, tree, house
    "small_150x100.png": lambda: _scene(
        150, 100, SKY, GRASS, 0.6, (0.45, 0.18, 0.15, (255, 220, 90)),
        [("rect", (0.40, 0.42, 0.52, 0.58), (240, 220, 30))] + TREE + HOUSE),
    # square park, stored as 8-bit grayscale
    "square_256x256.png": lambda: _scene(
        256, 256, ((150, 160, 190), (225, 225, 230)), ((110, 140, 90), (70, 90, 60)), 0.5,
        (0.2, 0.2, 0.1, (250, 250, 240)),
        [("rect", (0.62, 0.10, 0.70, 0.72), (90, 60, 40)), ("ellipse", (0.50, 0.02, 0.84, 0.40), (40, 100, 40)),
         ("rect", (0.0, 0.60, 1.0, 0.63), (200, 200, 200)), ("rect", (0.0, 0.70, 1.0, 0.73), (200, 200, 200))]
        + [("rect", (x, 0.56, x + 0.02, 0.78), (210, 210, 210)) for x in np.arange(0.02, 1.0, 0.08)]
        + [("ellipse", (0.10, 0.80, 0.26, 0.90), (60, 40, 30)), ("ellipse", (0.35, 0.82, 0.47, 0.90), (160, 120, 80)),
           ("ellipse", (0.55, 0.84, 0.62, 0.90), (240, 240, 240))], mode="L"),
}

CASES = [
    ("tie_330x512.png", "the man, in red -- on the left!"),
    ("tie_330x512.png", "Red house with the white door"),
    ("wide_500x281.png", "café à gauche, Noël"),
    ("wide_500x281.png", "THE LARGE BLUE CIRCLE NEAR THE TOP RIGHT CORNER"),
    ("small_150x100.png", "a small yellow square sitting just below the big round sun, to the right of the tall "
                          "green tree and next to the little red house with a white door, two windows and a brown "
                          "roof on a sunny day"),
    ("small_150x100.png", "the 2nd person's bag"),
    ("square_256x256.png", "  the  \u201ctall\u201d tree \u2014\tbehind the fence  "),
    ("square_256x256.png", "dog #3 (the one that's smallest) \u2603 \u732b"),
    ("tie_330x512.png", "tree"),
    ("wide_500x281.png", "the white sail"),
]

# --------------------------------------------------------------------------
# Model configurations
# --------------------------------------------------------------------------
TINY_BASE = T.TransVGConfig(
    backbone="resnet50", width=2, dilation=False, hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=2,
    bert_vocab=0, bert_hidden=128, bert_heads=2, bert_intermediate=256, bert_layers=2, bert_max_pos=64,
    vl_hidden_dim=32, vl_nheads=4, vl_dim_feedforward=64, vl_enc_layers=2, imsize=S, max_query_len=20)


MINIMAL = dict(hidden_dim=16, nheads=2, dim_feedforward=32, enc_layers=1, bert_hidden=64, bert_heads=1,
               bert_intermediate=64, bert_layers=1, bert_max_pos=32, vl_hidden_dim=16, vl_nheads=2,
               vl_dim_feedforward=32, vl_enc_layers=1)


def tiny_configs(vocab_size: int) -> dict[str, T.TransVGConfig]:
    r50 = replace(TINY_BASE, bert_vocab=vocab_size)
    return {
        "r50_tiny.pth": r50,
        "r101_tiny_legacy.pth": replace(r50, backbone="resnet101", bert_layers=1, max_query_len=40),
        "r50_tiny_dilated.pth": replace(r50, dilation=True, **MINIMAL),
    }


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=False)


def read_vocab(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def check_locations(path: Path, container: str) -> None:
    """Every storage of the file is tagged 'cuda:0' (torch.load(map_location='cpu') then reads it: save())."""
    import pickletools

    with open(path, "rb") as f:
        head = f.read(4)
        if container == "zip":
            assert head == b"PK\x03\x04"
            with zipfile.ZipFile(path) as z:
                pkl = z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0])
            ops = list(pickletools.genops(pkl))
        else:
            assert head == b"\x80\x02\x8a\x0a"
            f.seek(0)
            ops = [op for _ in range(4) for op in pickletools.genops(f)]
    strings = {arg for _, arg, _ in ops if isinstance(arg, str)}
    assert "cuda:0" in strings and "cpu" not in strings, path


class Generator:
    def __init__(self, out: Path, original: Path | None):
        self.out = out
        self.original = T.OriginalTransVG(original) if original else None
        self.tok_full = T.load_bert_tokenizer(FULL_VOCAB)

    # ---------------------------------------------------------------- images
    def write_images(self) -> dict:
        imgdir = self.out / "images"
        imgdir.mkdir(parents=True, exist_ok=True)
        info = {}
        for name, make in IMAGES.items():
            p = imgdir / name
            make().save(p, format="PNG", optimize=True)
            assert p.stat().st_size < 60_000, (name, p.stat().st_size)
            T.check_prepare_against_torchvision(p, S)
            prep = T.prepare_image(p, S)
            from PIL import Image
            with Image.open(p) as im:
                mode = im.mode
            info[name] = {"width": prep.width, "height": prep.height, "png_mode": mode, "ratio": prep.ratio,
                          "new_w": prep.new_w, "new_h": prep.new_h, "top": prep.top, "left": prep.left}
            if self.original is not None:
                canvas, mask = self.original.image(p, S)
                assert torch.equal(canvas, prep.canvas) and torch.equal(mask.to(torch.int32), prep.mask), name
        t = info["tie_330x512.png"]
        assert (t["new_w"], t["new_h"]) == (412, 640) and 330 * 640 / 512 == 412.5
        assert info["small_150x100.png"]["ratio"] > 1
        return info

    def prepared(self) -> dict[str, T.Prepared]:
        return {name: T.prepare_image(self.out / "images" / name, S) for name in IMAGES}

    # ---------------------------------------------------------------- vocab
    def write_subset_vocab(self) -> Path:
        full = read_vocab(FULL_VOCAB)
        need = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
        for _, expr in CASES:
            need.update(self.tok_full.tokenize(expr.lower().strip()))
        lines = [t for t in full if t in need]
        assert lines[0] == "[PAD]" and set(lines) == need, need - set(lines)
        p = self.out / "vocab.txt"
        p.write_text("".join(t + "\n" for t in lines), encoding="utf-8")
        sub = T.load_bert_tokenizer(p)
        for _, expr in CASES:
            for L in (20, 40, 512):
                a = T.tokenize_expression(self.tok_full, expr, L)
                b = T.tokenize_expression(sub, expr, L)
                assert a["tokens"] == b["tokens"] and a["mask"] == b["mask"], expr
                assert [lines.index(t) for t in b["tokens"]] == b["ids"][:len(b["tokens"])]
        assert len(self.tok_full.tokenize(CASES[4][1].lower())) > 38  # truncated at 20 and at 40
        return p

    # ---------------------------------------------------------------- model
    def build(self, cfg: T.TransVGConfig, seed: int, prep: dict, tok, keep_cases=(0, 1)):
        """Random TransVG calibrated on the case images; returns (model, per-case records, io tensors)."""
        gen = torch.Generator().manual_seed(seed)
        model = T.TransVG(cfg)
        T.randomize_(model, gen)
        model.eval()
        names = list(IMAGES)
        T.calibrate_batchnorm_(model, torch.stack([prep[n].canvas for n in names]))
        T.strengthen_text_(model, 2.0)
        texts = [T.tokenize_expression(tok, expr, cfg.max_query_len) for _, expr in CASES]
        if self.original is not None:
            for (_, expr), t in zip(CASES, texts):
                toks, ids, mask = self.original.text(tok, expr, cfg.max_query_len)
                assert (toks, ids, mask) == (t["tokens"], t["ids"], t["mask"]), expr
        regs, keeps = [], []
        with torch.no_grad():
            for i, ((img, _), t) in enumerate(zip(CASES, texts)):
                keep = {} if i in keep_cases else None
                p = prep[img]
                reg = model.fused_reg(p.canvas[None], p.mask[None], torch.tensor([t["ids"]]),
                                      torch.tensor([t["mask"]]), keep)
                regs.append(reg)
                keeps.append(keep)
            T.calibrate_box_head_(model, torch.cat(regs), gen)
            preds = [model.bbox_embed(r).sigmoid()[0] for r in regs]
            # the head applied to the stored reg is the full forward (checked on case 0)
            p0, t0 = prep[CASES[0][0]], texts[0]
            full0 = model(p0.canvas[None], p0.mask[None], torch.tensor([t0["ids"]]), torch.tensor([t0["mask"]]))[0]
            assert torch.equal(full0, preds[0])
        records, io = [], OrderedDict()
        for i, ((img, expr), t, pred) in enumerate(zip(CASES, texts, preds)):
            p = prep[img]
            xyxy, clipped = T.cxcywh_to_pixels(pred.tolist(), p, S)
            records.append(OrderedDict(
                case=i, image=img, expr=expr, text=t["text"], tokens=t["tokens"], ids=t["ids"], mask=t["mask"],
                ratio=p.ratio, new_w=p.new_w, new_h=p.new_h, top=p.top, left=p.left,
                pred_cxcywh=[float(v) for v in pred.tolist()], bbox_xyxy=xyxy, bbox_xyxy_clipped=clipped))
            io[f"case{i}.pred"] = pred.clone()
        for i in keep_cases:
            p, k = prep[CASES[i][0]], keeps[i]
            io[f"case{i}.pixels_sum"] = p.canvas.double().sum()
            io[f"case{i}.pixels_abs_sum"] = p.canvas.double().abs().sum()
            io[f"case{i}.pixels_row"] = p.canvas[:, S // 2, :].clone()
            io[f"case{i}.visu_mask"] = k["visu_mask"][0].float()
            io[f"case{i}.backbone"] = k["backbone"][0]
            io[f"case{i}.detr"] = k["detr"][0]
            io[f"case{i}.bert"] = k["bert"][0]
            io[f"case{i}.reg"] = k["reg"][0]
        self.check_boxes(records, cfg)
        self.check_bert(model, cfg, texts)
        return model, records, io, texts

    def check_boxes(self, records, cfg) -> None:
        preds = torch.tensor([r["pred_cxcywh"] for r in records])
        assert preds.min() > 0.03 and preds.max() < 0.97, preds  # no saturated sigmoid
        for r in records:
            x0, y0, x1, y1 = r["bbox_xyxy_clipped"]
            assert x1 - x0 > 1 and y1 - y0 > 1, r  # not degenerate inside the image
        canvas = [[v * S for v in r["pred_cxcywh"]] for r in records]
        for a in range(len(records)):
            for b in range(a):
                d = max(abs(x - y) for x, y in zip(canvas[a], canvas[b]))
                assert d > 4.0, (a, b, d)  # every case gives a different box (> 4 canvas px)
        # (cases 0/1/8, 2/3/9, 4/5, 6/7 share an image, so this includes "the text moves the box")

    def check_bert(self, model, cfg, texts) -> None:
        from pytorch_pretrained_bert import modeling as ppb

        bc = ppb.BertConfig(cfg.bert_vocab, hidden_size=cfg.bert_hidden, num_hidden_layers=cfg.bert_layers,
                            num_attention_heads=cfg.bert_heads, intermediate_size=cfg.bert_intermediate,
                            max_position_embeddings=cfg.bert_max_pos, type_vocab_size=cfg.bert_type_vocab)
        ref = ppb.BertModel(bc)
        ours = model.textmodel.bert
        assert list(ref.state_dict()) == list(ours.state_dict())
        ref.load_state_dict(ours.state_dict(), strict=True)
        ref.eval()
        ids = torch.tensor([t["ids"] for t in texts])
        mask = torch.tensor([t["mask"] for t in texts])
        with torch.no_grad():
            a = ref(ids, None, mask)[0]
            b = ours(ids, mask)
        assert len(a) == len(b) == cfg.bert_layers
        err = max((x - y).abs().max().item() for x, y in zip(a, b))
        assert err < 1e-4, err

    def check_original(self, model, cfg, args, prep, texts, cases=None) -> float:
        if self.original is None:
            return float("nan")
        idx = list(range(len(CASES))) if cases is None else cases
        batch = (torch.stack([prep[CASES[i][0]].canvas for i in idx]),
                 torch.stack([prep[CASES[i][0]].mask for i in idx]),
                 torch.tensor([texts[i]["ids"] for i in idx]), torch.tensor([texts[i]["mask"] for i in idx]))
        theirs = self.original.boxes(cfg, model.state_dict(), args, batch)
        with torch.no_grad():
            ours = model(*batch)
        err = (theirs - ours).abs().max().item()
        assert err < 1e-5, err
        return err


def model_entry(path: Path, cfg, container, obj, io_name, vocab_name, records, opt_style) -> dict:
    sd = obj["model"]
    return OrderedDict(container=container, kind="transvg", config=cfg.to_dict(), top_level=list(obj),
                       optimizer=opt_style, n_tensors=len(sd), n_values=sum(v.numel() for v in sd.values()),
                       io=io_name, vocab=vocab_name, cases=records)


def save(obj, path: Path, container: str) -> None:
    if container == "zip":
        T.save_zip_checkpoint(obj, path)
    else:
        T.save_legacy_checkpoint(obj, path)
    check_locations(path, container)
    back = load(path)
    assert list(back) == list(obj)
    assert list(back["model"]) == list(obj["model"])
    for k, v in obj["model"].items():
        assert back["model"][k].dtype == torch.float32 and torch.equal(back["model"][k], v), k


def save_io(io: dict, path: Path) -> None:
    from safetensors.torch import save_file

    out = OrderedDict()
    for k, v in io.items():
        v = v.detach().contiguous().clone()
        assert v.dtype in (torch.float32, torch.float64), (k, v.dtype)
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------
# Tiny fixtures
# --------------------------------------------------------------------------
def make_tiny(out: Path, original: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = Generator(out, original)
    T.check_resnet_layout()
    with tempfile.TemporaryDirectory() as tmp:
        T.check_legacy_writer(Path(tmp))
    images = g.write_images()
    vocab_path = g.write_subset_vocab()
    vocab = read_vocab(vocab_path)
    tok = T.load_bert_tokenizer(vocab_path)
    prep = g.prepared()
    cfgs = tiny_configs(len(vocab))
    doc = OrderedDict(schema=1, imsize=S, mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD,
                      vocab=OrderedDict(file="vocab.txt", lines=len(vocab), source_sha256=FULL_VOCAB_SHA256),
                      images=images, models=OrderedDict(), invalid=OrderedDict())
    summary = {}
    for seed, (name, cfg) in enumerate(cfgs.items(), start=1):
        dilated = cfg.dilation
        model, records, io, texts = g.build(cfg, seed, prep, tok, keep_cases=(0,) if dilated else (0, 1))
        if dilated:  # keep its io small: the 1600-token intermediates are large
            io = OrderedDict((k, v) for k, v in io.items() if k.endswith((".pred", ".visu_mask", ".reg")))
        args = T.transvg_args(cfg, dataset="gref_umd" if cfg.max_query_len == 40 else "unc")
        err = g.check_original(model, cfg, args, prep, texts)
        gen = torch.Generator().manual_seed(100 + seed)
        container = "legacy" if "legacy" in name else "zip"
        if dilated:
            obj, style = T.checkpoint_object(model, args, epoch=59, val_accu=0.7931), None
        else:
            style = "torch1.5" if container == "legacy" else "torch2"
            optim, sched = T.transvg_optimizer(model, args, stateful={"reg_token.weight", "bbox_embed.layers.2.bias"},
                                               gen=gen, epoch=89, style=style)
            obj = T.checkpoint_object(model, args, optimizer=optim, lr_scheduler=sched, epoch=89,
                                      val_accu=0.8125 if container == "zip" else 0.6875)
        path = out / name
        save(obj, path, container)
        io_name = name.replace(".pth", ".io.safetensors")
        save_io(io, out / io_name)
        doc["models"][name] = model_entry(path, cfg, container, obj, io_name, "vocab.txt", records, style)
        summary[name] = (records, err)

    # DETR detection checkpoint (training init of TransVG's docs), at the smallest sizes
    dcfg = replace(TINY_BASE, bert_vocab=len(vocab), **{k: MINIMAL[k] for k in ("hidden_dim", "nheads",
                                                                                "dim_feedforward", "enc_layers")})
    gen = torch.Generator().manual_seed(50)
    detr = T.DetrDetector(dcfg, dec_layers=1, num_queries=5)
    T.randomize_(detr, gen)
    dargs = T.detr_args(dcfg, dec_layers=1, num_queries=5)
    params = dict(detr.named_parameters())
    bb = [n for n in params if "backbone" in n and any(f"layer{i}" in n for i in (2, 3, 4))]
    rest = [n for n in params if "backbone" not in n]
    dopt, dsched = T.adamw_state(params, [rest, bb], [None, dargs.lr_backbone], lr=dargs.lr,
                                 weight_decay=dargs.weight_decay, lr_drop=dargs.lr_drop, no_grad=set(),
                                 stateful={"query_embed.weight", "class_embed.bias"}, gen=gen, epoch=499,
                                 style="torch2")
    dobj = {"model": OrderedDict((k, v.detach().clone()) for k, v in detr.state_dict().items()),
            "optimizer": dopt, "lr_scheduler": dsched, "epoch": 499, "args": dargs}
    save(dobj, out / "detr_r50_tiny.pth", "zip")
    dk = list(dobj["model"])
    doc["invalid"]["detr_r50_tiny.pth"] = OrderedDict(
        kind="detr", container="zip",
        defect="a DETR detection checkpoint (facebookresearch/detr layout: transformer.encoder/decoder, "
               "class_embed, bbox_embed, query_embed, input_proj, backbone.0.body), not a TransVG model",
        top_level=list(dobj), n_tensors=len(dk), first_keys=dk[:3],
        key_prefixes=sorted({".".join(k.split(".")[:2]) for k in dk}),
        shapes={k: list(dobj["model"][k].shape) for k in ("query_embed.weight", "class_embed.weight",
                                                         "bbox_embed.layers.2.weight", "input_proj.weight")})

    # the smallest structurally valid TransVG, then broken two ways
    mcfg = replace(TINY_BASE, bert_vocab=len(vocab), **MINIMAL)
    gen = torch.Generator().manual_seed(60)
    small = T.TransVG(mcfg)
    T.randomize_(small, gen)
    margs = T.transvg_args(mcfg)
    good = T.checkpoint_object(small, margs, epoch=9, val_accu=0.25)
    bad = dict(good)
    bad["model"] = OrderedDict((k, v.t().contiguous() if k == "text_proj.weight" else v)
                               for k, v in good["model"].items())
    save(bad, out / "bad_shape.pth", "zip")
    doc["invalid"]["bad_shape.pth"] = OrderedDict(
        kind="bad_shape", container="zip", key="text_proj.weight", shape=list(bad["model"]["text_proj.weight"].shape),
        expected=list(good["model"]["text_proj.weight"].shape), config=mcfg.to_dict(),
        defect="text_proj.weight stored transposed")
    miss = dict(good)
    miss["model"] = OrderedDict((k, v) for k, v in good["model"].items() if k != "vl_pos_embed.weight")
    save(miss, out / "missing_key.pth", "zip")
    doc["invalid"]["missing_key.pth"] = OrderedDict(
        kind="missing_key", container="zip", key="vl_pos_embed.weight", config=mcfg.to_dict(),
        defect="vl_pos_embed.weight removed (everything else as in bad_shape.pth, untransposed)")

    write_json(out / "cases.json", doc)
    report(out, summary)


def report(out: Path, summary: dict) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = 0
    print(f"\n{'file':<40} {'bytes':>9}  sha256[:16]")
    for p in files:
        n = p.stat().st_size
        total += n
        print(f"{p.relative_to(out).as_posix():<40} {n:>9}  {sha(p)[:16]}")
    print(f"{'total':<40} {total:>9}")
    for name, (records, err) in summary.items():
        preds = np.array([r["pred_cxcywh"] for r in records])
        print(f"\n{name}: pred cxcywh min {preds.min(0).round(3).tolist()} max {preds.max(0).round(3).tolist()}; "
              f"|ours - TransVG's code| = {err:.2e}")
        for r in records:
            print(f"  case {r['case']} {r['image']:<20} pred {np.round(r['pred_cxcywh'], 4).tolist()} "
                  f"xyxy {np.round(r['bbox_xyxy'], 1).tolist()} clipped {np.round(r['bbox_xyxy_clipped'], 1).tolist()}")


def verify_stable(out: Path, original: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        again = Path(tmp) / "again"
        make_tiny(again, original)
        n = assert_same_files(out, again)
    print(f"\nbyte-stable: a second run gives identical bytes for all {n} files")


# --------------------------------------------------------------------------
# Full size
# --------------------------------------------------------------------------
def make_full(out: Path, cfg: T.TransVGConfig, original: Path | None, bench: bool, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    times = OrderedDict()
    g = Generator(out, original)
    images = g.write_images()
    shutil.copyfile(FULL_VOCAB, out / "vocab.txt")
    assert sha(out / "vocab.txt") == FULL_VOCAB_SHA256
    vocab = read_vocab(out / "vocab.txt")
    assert len(vocab) == 30522 and vocab[0] == "[PAD]" and vocab[100:103] == ["[UNK]", "[CLS]", "[SEP]"]
    prep = g.prepared()
    cfg = replace(cfg, bert_vocab=len(vocab))
    times["images+vocab"] = time.time() - t0
    t = time.time()
    model, records, io, texts = g.build(cfg, 7 if cfg.backbone == "resnet50" else 8, prep, g.tok_full)
    times["build+calibrate+forward(10 cases)"] = time.time() - t
    sd = model.state_dict()
    n_values = sum(v.numel() for v in sd.values())
    if cfg == replace(T.FULL_R50, bert_vocab=30522):
        assert len(sd) == 622 and n_values == 149_852_100, (len(sd), n_values)
    args = T.transvg_args(cfg, dataset="unc")
    t = time.time()
    err = g.check_original(model, cfg, args, prep, texts, cases=[0, 1])
    times["TransVG's own code, 2 cases"] = time.time() - t
    doc = OrderedDict(schema=1, imsize=S, mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD,
                      vocab=OrderedDict(file="vocab.txt", lines=len(vocab), source_sha256=FULL_VOCAB_SHA256),
                      images=images, models=OrderedDict(), invalid=OrderedDict())
    if tag == "r50":
        t = time.time()
        optim, sched = T.transvg_optimizer(model, args, stateful=None, gen=torch.Generator().manual_seed(70),
                                           epoch=89, style="torch2")
        obj = T.checkpoint_object(model, args, optimizer=optim, lr_scheduler=sched, epoch=89, val_accu=0.8125)
        times["optimizer state"] = time.time() - t
        t = time.time()
        save(obj, out / "transvg_r50.pth", "zip")
        times["save+verify transvg_r50.pth (zip)"] = time.time() - t
        doc["models"]["transvg_r50.pth"] = model_entry(out / "transvg_r50.pth", cfg, "zip", obj,
                                                       "transvg_r50.io.safetensors", "vocab.txt", records, "torch2")
        del obj, optim
        t = time.time()
        lobj = T.checkpoint_object(model, args, model_only=True)
        save(lobj, out / "transvg_r50_legacy.pth", "legacy")
        times["save+verify transvg_r50_legacy.pth (legacy)"] = time.time() - t
        doc["models"]["transvg_r50_legacy.pth"] = model_entry(out / "transvg_r50_legacy.pth", cfg, "legacy", lobj,
                                                              "transvg_r50.io.safetensors", "vocab.txt", records,
                                                              None)
        save_io(io, out / "transvg_r50.io.safetensors")
    else:
        t = time.time()
        obj = T.checkpoint_object(model, args, epoch=89, val_accu=0.6875)
        save(obj, out / f"transvg_{tag}_legacy.pth", "legacy")
        times[f"save+verify transvg_{tag}_legacy.pth"] = time.time() - t
        doc["models"][f"transvg_{tag}_legacy.pth"] = model_entry(out / f"transvg_{tag}_legacy.pth", cfg, "legacy",
                                                                 obj, f"transvg_{tag}.io.safetensors", "vocab.txt",
                                                                 records, None)
        save_io(io, out / f"transvg_{tag}.io.safetensors")
    write_json(out / "cases.json", doc)
    times["total"] = time.time() - t0
    report(out, {tag: (records, err)})
    print("\ntimings (s): " + json.dumps({k: round(v, 1) for k, v in times.items()}))
    if bench:
        benchmark(model, prep, texts)


def benchmark(model, prep, texts, runs: int = 3) -> None:
    names = [CASES[i][0] for i in range(8)]
    for b in (1, 8):
        canvas = torch.stack([prep[n].canvas for n in names[:b]])
        mask = torch.stack([prep[n].mask for n in names[:b]])
        ids = torch.tensor([texts[i]["ids"] for i in range(b)])
        tm = torch.tensor([texts[i]["mask"] for i in range(b)])
        with torch.no_grad():
            model(canvas, mask, ids, tm)  # warm-up
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                model(canvas, mask, ids, tm)
                ts.append(time.perf_counter() - t)
        print(json.dumps({"model": "transvg_" + model.cfg.backbone, "batch": b, "threads": torch.get_num_threads(),
                          "median_ms": round(statistics.median(ts) * 1000, 1),
                          "runs_ms": [round(x * 1000, 1) for x in ts]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--full", type=Path, metavar="OUT", help="write the full-size R-50 files to OUT")
    ap.add_argument("--full-r101", type=Path, metavar="OUT", help="write the full-size R-101 files to OUT")
    ap.add_argument("--bench", action="store_true", help="with --full: time the forward at batch 1 and 8")
    ap.add_argument("--original", type=Path, default=DEFAULT_ORIGINAL if DEFAULT_ORIGINAL.exists() else None,
                    help="TransVG checkout or git dir to compare with (default: the local mirror if present)")
    ap.add_argument("--no-original", action="store_true")
    ap.add_argument("--verify-stable", action="store_true", help="regenerate and assert identical bytes")
    a = ap.parse_args()
    if not FULL_VOCAB.exists():
        sys.exit(f"missing {FULL_VOCAB}: run tools/reference/setup.sh")
    assert sha(FULL_VOCAB) == FULL_VOCAB_SHA256
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    original = None if a.no_original else a.original
    if original is None:
        print("note: no TransVG checkout given; skipping the comparison with TransVG's own code")
    if a.full:
        make_full(a.full, T.FULL_R50, original, a.bench, "r50")
    if a.full_r101:
        make_full(a.full_r101, T.FULL_R101, original, a.bench, "r101")
    if not (a.full or a.full_r101):
        make_tiny(a.out, original)
        if a.verify_stable:
            verify_stable(a.out, original)


if __name__ == "__main__":
    main()
