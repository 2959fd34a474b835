#!/usr/bin/env python3
"""Golden fixtures for groundkit's importers of the RELEASED HiVG and CLIP-VG checkpoints (box inference).

Writes tests/fixtures/hivg_release/ and tests/fixtures/clipvg_release/ from hivg_ref.py / clipvg_ref.py (our own
transcriptions), with random tiny weights saved in each release's exact checkpoint format:

  hivg_release/tokenizer.json        subset of the real CLIP BPE tokenizer (HF tokenizers JSON: NFC + whitespace +
                                     lowercase normalizer, CLIP split regex + ByteLevel, BPE with `</w>`), ids
                                     RENUMBERED densely in the full vocabulary's order: "!" = 0 (as in CLIP, where 0 is
                                     also the padding id, so a real "!" is masked), <|startoftext|> / <|endoftext|> the
                                     two last ids. Shared by both fixture dirs.
  hivg_release/hivg_b_tiny_uncplus.pth            Base layout, dataset unc+ (text levels [6, 12]), peft 0.3 names
  hivg_release/hivg_b_tiny_uncplus_base_layer.pth the same weights, newer peft names (`X.base_layer.weight`)
  hivg_release/hivg_l_tiny_gref.pth               Large layout (ViT-L/14: 24 layers, patch 14, 16 x 16 grid),
                                                  dataset gref_umd (text levels 1..12)
  hivg_release/hivg_b_tiny_missing_bridge.pth     (a) without one bridge's trained cross_attn base weights: refuse
  hivg_release/hivg_b_tiny_mixup.pth              mixup-pretrain variant (no adaptive weights, text level [12],
                                                  T~ = condition_text_proj(text_projection(last_hidden_state)))
  hivg_release/<model>.io.safetensors, cases.json
  clipvg_release/clipvg_b_tiny.pth   ML_CLIP_VG, fp16 CLIP weights (OpenAI convert_weights), `clip.*` and the
                                     duplicate `image_encoder_clip_vg.*` / `text_encoder_clip_vg.*` names sharing storages
  clipvg_release/clipvg_b_tiny.io.safetensors, cases.json

Images: the four PNGs of tests/fixtures/transvg/images/ (by relative path). Every checkpoint is a torch zip with
storages tagged 'cuda:0' and made byte-stable (serialization_id), top level {model, optimizer, lr_scheduler, epoch,
args, val_accu} as hivg_train.py / train_clip_vg.py write it.

cases.json (schema 1, both dirs):
  {"schema": 1, "system": "hivg" | "clipvg", "imsize": 224, "mean": [ImageNet], "std": [ImageNet],
   "tokenizer": {"file" (relative to cases.json), "vocab_size", "sot_id", "eot_id", "bang_id": 0, "pad_id": 0,
                 "context_length": 77, "truncate": true (HiVG) | false (CLIP-VG raises), "source",
                 "full_ids": {"sot": 49406, "eot": 49407, "!": 0}},
   "images": {name: {"path" (relative to cases.json), "width", "height", "png_mode", "ratio", "new_w", "new_h",
                     "top", "left"}},
   "models": {file: {"kind", "container": "zip", "location": "cuda:0", "peft_naming": "peft0.3" | "base_layer"
                     (HiVG), "config": {...}, "top_level": [...], "optimizer": {...}, "epoch", "val_accu",
                     "n_tensors" (keys of obj['model']), "n_values", "n_storages" (storage records in the zip,
                     optimizer included), "n_model_storages" (distinct storages behind obj['model']),
                     "dtypes": {dtype: count}, "unused_keys": [keys the box does not depend on],
                     "buffers": [int64 position_ids keys], HiVG: "n_lora_pairs", "trainable_at_stage3",
                     "same_weights_as" (the base_layer file); CLIP-VG: "aliases": {key: first key with the same
                     storage}, "fp16_keys", "n_unique_values", "reference", "fp16_vs_fp32_max_abs"; "io", "tokenizer",
                     "cases": [{"case", "image", "expr", "text" (lower-cased), "tokens" (BPE strings incl. SOT/EOT,
                                after truncation), "ids" (77, subset ids), "clip_ids" (77, the real CLIP ids),
                                "text_mask" (77, 1 = masked = id 0), "n_bpe" (before truncation), "truncated",
                                "ratio", "new_w", "new_h", "top", "left", "pred_cxcywh" (float32 values),
                                "bbox_xyxy" (image pixels after the [0,1] canvas clamp, float64, may leave the image),
                                "bbox_xyxy_clipped" (the same clipped to [0,w]x[0,h])}],
                     "batched" (HiVG): {"order": [case indices], "bridge_mode": "batched", "pred_cxcywh": [[4]...],
                                "bbox_xyxy", "bbox_xyxy_clipped", "per_sample_pred_cxcywh": [[4]...],
                                "max_abs_diff_per_sample_vs_batch1", "max_abs_diff_batched_vs_per_sample",
                                "row_source" (the mixing rule, in words)}}},
   "invalid": {file: {"kind": "missing_key", "defect", "removed_keys", "kept" (its LoRA A/B, still present),
                      "bridge_layer", "same_weights_as", "n_tensors", "n_storages"}}}
io.safetensors (F32): case{i}.pred [4] and case{i}.reg [d] (the fused REG token, after the final norm for HiVG,
  before the head) for every case; case0.pixels_row [3, 224] (canvas row 112); visu_mask.<image stem> [g*g]
  (1 = pad); case0.ml_visual_token0 [n_levels * vision_width] (multi-level visual token 0 = CLS, before the
  projection); case0.text_features [77, d] (text_projection of the final-LN text states); HiVG also
  case0.bridge0_text [77, vision_width] (T~ at the first bridge), batched.pred / batched.reg [B, .],
  batched_per_sample.pred [B, 4]; CLIP-VG also case{i}.pred_fp16 [4] (the CLIP part in fp16; information only).

Checks on every run: the subset tokenizer = the full HF CLIP tokenizer = open_clip's SimpleTokenizer /
clip.tokenize on every case (tokens, ids via the full vocab, offsets); our preprocessing = torchvision's; our HF
text loop = HF CLIPTextModel's hidden states; per_sample at batch B = batch 1 (1e-6); the unused-key lists =
autograd; the zip storages; byte-identical reload. With the mirrors (default /work/.mirror/...; --no-original to
skip): HiVG's own models/HiVG.py (+ peft v0.3.0's own source) and CLIP-VG's own models/clip_vg.py +
models/clip/model.py load our files (key sets and order) and give the same boxes (both bridge modes), and the
hard-coded argparse defaults equal their get_args_parser().

Run (reference venv; CPU only, one to three minutes on 2 threads; --verify-stable doubles it):
    .venv-ref/bin/python tools/reference/make_hivg_fixtures.py [--verify-stable] [--no-original]

--full DIR (not committed; tools/reference/hivg_full_check.py runs the binary on it): the same code at the released
sizes, into DIR (outside the repo), instead of the tiny dirs:
  DIR/hivg_b16_unc.pth     HiVG-B/16 fine-tune as released (H.FULL_B): dataset unc (text level [12]), HF CLIP
                           ViT-B/16 + text base (vocab 49408, 77 positions, projection 512), bridges [0,3,7,11],
                           unmerged peft-0.3 LoRA r 32 / alpha 16 (lora_B non-zero), 4 nested base_model.model.,
                           storages cuda:0, AdamW moments for every trainable parameter (as hivg_train.py saves them)
  DIR/clipvg_b16_unc.pth   CLIP-VG ViT-B/16 (C.FULL_B16), CLIP part fp16, aliased wrapper keys, AdamW moments for
                           every trainable parameter
  DIR/*.io.safetensors, DIR/images/ (copies of the four PNGs), DIR/tokenizer.json (the whole HF CLIP tokenizer, built
  offline from open_clip's BPE file by the same code as the subset: CLIP's own ids), DIR/cases.json: schema 1 as
  above with "system": "full", image paths "images/<name>", tokenizer.truncate {"hivg": true, "clipvg": false}, both
  models (HIVG_CASES / CLIPVG_CASES: ids = clip_ids; HiVG per_sample boxes and the batch FULL_BATCH_ORDER in
  'batched' mode; CLIP-VG fp32 boxes). ~2 GB of files; about 4 minutes on 2 threads (half of it HiVG's and CLIP-VG's
own code on the files), 6.2 GB peak memory:
    .venv-ref/bin/python tools/reference/make_hivg_fixtures.py --full /tmp/hivg_full [--no-original]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import types
import warnings
import zipfile
from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import clipvg_ref as C  # noqa: E402
import hivg_ref as H  # noqa: E402
import transvg_ref as T  # noqa: E402
from common import assert_same_files, load_clip_tokenizer, write_json_compact as write_json  # noqa: E402
from gen_fixtures import Tokenizer_from, bpe_pairs_seen, clip_pretokens, merge_pair  # noqa: E402

ROOT = HERE.parent.parent
FIX = ROOT / "tests" / "fixtures"
HIVG_OUT = FIX / "hivg_release"
CLIPVG_OUT = FIX / "clipvg_release"
IMAGES = FIX / "transvg" / "images"
MIRRORS = {"hivg": Path("/work/.mirror/linhuixiao+HiVG/repo"), "clipvg": Path("/work/.mirror/linhuixiao+CLIP-VG/repo"),
           "peft": Path("/work/.mirror/huggingface+peft/repo")}
S = 224
THREADS = 2
LOCATION = "cuda:0"

LONG = ("the tall dark tree behind the fence on the right side of the park, next to the white bench, with 12 posts "
        "in front of it and two dogs (one brown, one black) sitting on the grass below the grey path that crosses "
        "the whole picture from left to right, under a pale sky with a bright sun in the top left corner and a "
        "small red kite flying high above the three houses")
HIVG_CASES = [
    ("tie_330x512.png", "the man in red!; on the left"),  # "!;" -> "!" (id 0: masked as padding) + ";</w>"
    ("tie_330x512.png", "Red house with the white door (2nd window)"),
    ("wide_500x281.png", "the blue disc, top-right -- 100% sure"),
    ("wide_500x281.png", "person in green holding a brown bag"),
    ("small_150x100.png", "yellow square below the sun"),
    ("small_150x100.png", "café à gauche: the 3 small trees"),
    ("square_256x256.png", "white bench at the bottom right"),
    ("square_256x256.png", LONG),  # > 77 tokens: HiVG truncates (clip.tokenize(..., truncate=True))
]
CLIPVG_CASES = HIVG_CASES[:7] + [("square_256x256.png", "the dark tree behind the fence, right of the path")]
BATCH_ORDER = [5, 0, 7, 2, 6]

# ---------------------------------------------------------------- tiny sizes (the layer counts are the real ones)
TINY_HIVG = H.HiVGConfig(
    variant="B", dataset="unc+", vocab_size=0, text_width=8, text_heads=2, text_layers=12, text_ffn=16,
    vision_width=8, vision_heads=2, vision_layers=12, vision_ffn=16, patch_size=16, image_size=S,
    projection_dim=16, vl_heads=2, vl_ffn=32, vl_layers=2, lora_r=4, lora_alpha=2, token_mlp_dim=16)


def hivg_configs(vocab: int) -> "OrderedDict[str, H.HiVGConfig]":
    b = replace(TINY_HIVG, vocab_size=vocab)
    return OrderedDict([
        ("hivg_b_tiny_uncplus.pth", b),
        ("hivg_l_tiny_gref.pth", replace(b, variant="L", dataset="gref_umd", vision_layers=24, patch_size=14)),
        ("hivg_b_tiny_mixup.pth", replace(b, dataset="mixup", mixup_pretrain=True, enable_adaptive_weights=False)),
    ])


def clipvg_config(vocab: int) -> C.CLIPVGConfig:
    return C.CLIPVGConfig(embed_dim=16, image_resolution=S, vision_layers=12, vision_width=16, vision_heads=2,
                          vision_patch_size=16, context_length=77, vocab_size=vocab, transformer_width=16,
                          transformer_heads=2, transformer_layers=12, vl_hidden_dim=16, vl_nheads=2,
                          vl_dim_feedforward=32, vl_enc_layers=2)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=False)


def f32list(t: torch.Tensor) -> list:
    return [float(v) for v in t.tolist()]


def zip_storages(path: Path) -> int:
    """Storage records in the zip (model + optimizer)."""
    with zipfile.ZipFile(path) as z:
        return sum(1 for n in z.namelist() if "/data/" in n)


def model_storages(path: Path) -> int:
    """Distinct storages behind obj['model'] (as read back)."""
    return len({v.untyped_storage().data_ptr() for v in load(path)["model"].values()})


def save_checkpoint(obj: dict, path: Path, max_bytes: int | None = 1_000_000) -> None:
    """torch zip via transvg_ref (storages tagged cuda:0, byte-stable), then read back and compare (and, unless
    max_bytes is None, check the size: the committed files stay small)."""
    import make_transvg_fixtures as MT

    T.save_zip_checkpoint(obj, path, location=LOCATION)
    MT.check_locations(path, "zip")
    back = load(path)
    assert list(back) == list(obj)
    assert list(back["model"]) == list(obj["model"])
    for k, v in obj["model"].items():
        b = back["model"][k]
        assert b.dtype == v.dtype and b.shape == v.shape and torch.equal(b, v), k
    assert max_bytes is None or path.stat().st_size < max_bytes, (path, path.stat().st_size)


def save_io(io_: dict, path: Path) -> None:
    from safetensors.torch import save_file

    out = OrderedDict()
    for k, v in io_.items():
        v = v.detach().float().contiguous().clone()
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})
    path.chmod(0o644)


def dtype_counts(sd) -> dict:
    return dict(sorted(Counter(str(v.dtype).replace("torch.", "") for v in sd.values()).items()))


# --------------------------------------------------------------------------
# Tokenizer: dense subset of the CLIP BPE
# --------------------------------------------------------------------------
class SubsetTokenizer:
    """The CLIP BPE cut down to what `strings` need (ids renumbered densely in the full vocabulary's order), written
    to `out_path`; with whole=True nothing is cut: the whole HF CLIP tokenizer.json (49408 ids, 48894 merges, the
    ids are then CLIP's own), through the same code."""

    def __init__(self, out_path: Path, strings: list[str], whole: bool = False):
        from tokenizers import Tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            hf = load_clip_tokenizer(Path(tmp) / "clip")
            self.full_tok = Tokenizer_from(hf.backend_tokenizer)
        full = json.loads(self.full_tok.to_str())
        model = full["model"]
        assert model["type"] == "BPE" and not model.get("ignore_merges")
        suffix = model["end_of_word_suffix"]
        merges = [merge_pair(m) for m in model["merges"]]
        ranks = {p: i for i, p in enumerate(merges)}
        keep, seen = {"!"}, set()
        for s in ([] if whole else strings):
            for w in clip_pretokens(self.full_tok, s):
                syms = list(w)
                syms[-1] += suffix
                keep |= set(syms)
                seen |= bpe_pairs_seen(w, ranks, suffix)
        if whole:
            keep |= set(model["vocab"])
            seen = set(merges)
        kept = [p for p in merges if p in seen]
        keep |= {a + b for a, b in kept}
        specials = [t["content"] for t in full["added_tokens"]]
        assert specials == ["<|startoftext|>", "<|endoftext|>"], specials
        keep |= set(specials)
        self.full_vocab = model["vocab"]
        order = sorted((self.full_vocab[t], t) for t in keep)
        vocab = OrderedDict((t, i) for i, (_, t) in enumerate(order))
        n = len(vocab)
        assert vocab["!"] == 0 and self.full_vocab["!"] == 0
        assert vocab["<|startoftext|>"] == n - 2 and vocab["<|endoftext|>"] == n - 1
        if whole:
            assert vocab == self.full_vocab and n == 49408 and len(kept) == len(merges) == 48894, (n, len(kept))
        small = copy.deepcopy(full)
        small["model"]["vocab"] = dict(vocab)
        small["model"]["merges"] = ([[a, b] for a, b in kept] if isinstance(model["merges"][0], list)
                                    else [f"{a} {b}" for a, b in kept])
        for t in small["added_tokens"]:
            t["id"] = vocab[t["content"]]
        pp = small["post_processor"]
        assert pp["type"] == "RobertaProcessing", pp
        pp["sep"] = [pp["sep"][0], vocab[pp["sep"][0]]]
        pp["cls"] = [pp["cls"][0], vocab[pp["cls"][0]]]
        small["truncation"] = None
        small["padding"] = None
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(small, f, ensure_ascii=False, indent=1)
            f.write("\n")
        self.path = out_path
        self.tok = Tokenizer.from_file(str(out_path))
        self.vocab = vocab
        self.inv = {i: t for t, i in vocab.items()}
        self.size = n
        self.sot, self.eot = n - 2, n - 1
        self.n_merges = len(kept)
        self.verify(strings)

    def verify(self, strings: list[str]) -> None:
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        oc = SimpleTokenizer()
        for s in strings:
            a, b = self.full_tok.encode(s), self.tok.encode(s)
            assert a.tokens == b.tokens, (s, a.tokens, b.tokens)
            assert a.offsets == b.offsets, s
            assert [self.full_vocab[t] for t in b.tokens] == a.ids, s
            assert [self.inv[i] for i in b.ids] == b.tokens
            assert b.ids[0] == self.sot and b.ids[-1] == self.eot
            # OpenAI / open_clip semantics (ftfy + html unescape + whitespace + lower, then BPE)
            text = s.lower()
            assert [oc.decoder[i] for i in oc.encode(text)] == b.tokens[1:-1], s
            real = open_clip.tokenize([text])[0].tolist()  # context 77, truncate: first 75 BPE then EOT
            assert real == self.ids(text, truncate=True)["clip_ids"], s

    def ids(self, text: str, truncate: bool) -> dict:
        """clip.tokenize(text, 77, truncate) on the lower-cased text, in subset ids and in real CLIP ids."""
        enc = self.tok.encode(text, add_special_tokens=False)
        bpe = list(enc.ids)
        toks = [self.sot] + bpe + [self.eot]
        truncated = len(toks) > 77
        if truncated:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length 77")
            toks = toks[:77]
            toks[-1] = self.eot
        strings = [self.inv[i] for i in toks]
        pad = 77 - len(toks)
        ids = toks + [0] * pad
        clip_ids = [self.full_vocab[t] for t in strings] + [0] * pad
        return {"tokens": strings, "ids": ids, "clip_ids": clip_ids, "n_bpe": len(bpe), "truncated": truncated,
                "text_mask": [int(i == 0) for i in ids]}


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------
def prepare_images(names: list[str], rel_to: Path, src: Path = IMAGES) -> tuple[dict, dict]:
    """Preprocessed images (read from `src`) and their cases.json entries; paths relative to `rel_to` (the committed
    folder, also when writing elsewhere, so that a run into a temporary folder gives the same bytes)."""
    from PIL import Image
    import os

    prep, info = {}, OrderedDict()
    for name in names:
        p = src / name
        T.check_prepare_against_torchvision(p, S)
        pr = T.prepare_image(p, S)
        prep[name] = pr
        info[name] = OrderedDict(path=os.path.relpath(p, rel_to), width=pr.width, height=pr.height,
                                 png_mode=Image.open(p).mode, ratio=pr.ratio, new_w=pr.new_w, new_h=pr.new_h,
                                 top=pr.top, left=pr.left)
    return prep, info


def case_record(i, img, expr, t, p, pred) -> OrderedDict:
    xyxy, clipped = T.cxcywh_to_pixels(pred.tolist(), p, S)
    return OrderedDict(case=i, image=img, expr=expr, text=expr.lower(), tokens=t["tokens"], ids=t["ids"],
                       clip_ids=t["clip_ids"], text_mask=t["text_mask"], n_bpe=t["n_bpe"], truncated=t["truncated"],
                       ratio=p.ratio, new_w=p.new_w, new_h=p.new_h, top=p.top, left=p.left,
                       pred_cxcywh=f32list(pred), bbox_xyxy=xyxy, bbox_xyxy_clipped=clipped)


def case_io_(io_: OrderedDict, i: int, box: torch.Tensor, keep: dict, canv: torch.Tensor, visual_key: str) -> None:
    """Case i's io tensors: its box and fused reg token; for case 0 also canvas row S // 2, the first multi-level
    visual token (before the projection, `keep[visual_key]`) and the text features."""
    io_[f"case{i}.pred"] = box
    io_[f"case{i}.reg"] = keep["reg"][0]
    if i == 0:
        io_["case0.pixels_row"] = canv[0, :, S // 2, :]
        io_["case0.ml_visual_token0"] = keep[visual_key][0, 0]
        io_["case0.text_features"] = keep["text_features"][0]


def visu_masks_(io_: OrderedDict, prep: dict, grid: int, antialias: bool) -> None:
    """Each image's patch mask (1 = pad) as the system computes it."""
    for name, p in prep.items():
        io_[f"visu_mask.{Path(name).stem}"] = H.patch_mask(p.mask[None], grid, antialias=antialias)[0].float()


def check_boxes(preds: torch.Tensor, records: list, min_px: float = 3.0) -> None:
    assert preds.min() > 0.03 and preds.max() < 0.97, preds  # no saturated sigmoid
    for r in records:
        x0, y0, x1, y1 = r["bbox_xyxy_clipped"]
        assert x1 - x0 > 1 and y1 - y0 > 1, r  # not degenerate inside the image
    c = preds.double() * S
    for a in range(len(c)):
        for b in range(a):
            d = (c[a] - c[b]).abs().max().item()
            assert d > min_px, (a, b, d)  # every case gives a different box (cases share images: text matters)


# --------------------------------------------------------------------------
# The original code (mirrors), imported with stubs for what is not needed at inference
# --------------------------------------------------------------------------
class NestedTensor:
    def __init__(self, tensors, mask):
        self.tensors, self.mask = tensors, mask

    def to(self, device):
        return self


@contextlib.contextmanager
def original_code(tmp: Path):
    """Import HiVG's models/ (as hivg_models), CLIP-VG's models/ (as clipvg_models) and peft v0.3.0 (its own
    source) from the git mirrors. Stubs: utils.misc (NestedTensor only; the real one fails to import under
    torchvision 0.29), pkg_resources (clip.py needs only packaging), accelerate (peft imports it, never calls it)."""
    import packaging.version
    import transformers  # noqa: F401  (before the accelerate stub: transformers probes for accelerate)
    from transformers import CLIPModel, PreTrainedModel  # noqa: F401

    def archive(repo: Path, rev: str, path: str, dest: Path):
        dest.mkdir(parents=True, exist_ok=True)
        data = subprocess.run(["git", "-C", str(repo), "archive", rev, path], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=data, check=True)

    archive(MIRRORS["hivg"], "HEAD", "models", tmp / "hivg")
    (tmp / "hivg" / "models").rename(tmp / "hivg" / "hivg_models")
    archive(MIRRORS["clipvg"], "HEAD", "models", tmp / "clipvg")
    (tmp / "clipvg" / "models").rename(tmp / "clipvg" / "clipvg_models")
    archive(MIRRORS["peft"], "v0.3.0", "src/peft", tmp / "peft")
    stubs = {}
    for name, attrs in {"accelerate": ["dispatch_model", "infer_auto_device_map"],
                        "accelerate.hooks": ["AlignDevicesHook", "add_hook_to_module", "remove_hook_from_submodules"],
                        "accelerate.utils": ["get_balanced_memory"], "utils": [], "utils.misc": [],
                        "pkg_resources": []}.items():
        m = types.ModuleType(name)
        for a in attrs:
            setattr(m, a, None)
        stubs[name] = m
    stubs["utils.misc"].NestedTensor = NestedTensor
    stubs["utils.misc"].nested_tensor_from_tensor_list = None
    stubs["utils"].misc = stubs["utils.misc"]
    stubs["pkg_resources"].packaging = packaging
    saved = {k: sys.modules.get(k) for k in stubs}
    paths = [str(tmp / "hivg"), str(tmp / "clipvg"), str(tmp / "peft" / "src")]
    sys.modules.update(stubs)
    sys.path[:0] = paths
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import peft
            import hivg_models.HiVG  # noqa: F401  (hivg_models.HiVG is then the class; take the module)
            import clipvg_models.clip.model  # noqa: F401
            import clipvg_models.clip_vg  # noqa: F401
        HV, CM, CV, HC, CC = (sys.modules[n] for n in ("hivg_models.HiVG", "clipvg_models.clip.model",
                                                        "clipvg_models.clip_vg", "hivg_models.clip.clip",
                                                        "clipvg_models.clip.clip"))
        assert peft.__version__ == "0.3.0", peft.__version__
        yield types.SimpleNamespace(HV=HV, CM=CM, CV=CV, peft=peft, hivg_clip=HC, clipvg_clip=CC)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for p in paths:
            sys.path.remove(p)


def check_tokenize_original(O, tok: SubsetTokenizer) -> None:
    """The vendored OpenAI tokenizers: HiVG's clip.tokenize(texts, 77, truncate=True) (HiVG.py:906) and CLIP-VG's
    clip.tokenize(phrase) (data_loader.py:304, raises beyond 77) give our real-CLIP ids on every case."""
    for _, e in HIVG_CASES:
        t = e.lower()
        assert O.hivg_clip.tokenize([t], context_length=77, truncate=True)[0].tolist() == tok.ids(t, True)["clip_ids"]
    for _, e in CLIPVG_CASES:
        t = e.lower()
        assert O.clipvg_clip.tokenize(t)[0].tolist() == tok.ids(t, False)["clip_ids"], t
    try:
        O.clipvg_clip.tokenize(LONG.lower())
        raise AssertionError("CLIP-VG's clip.tokenize should refuse > 77 tokens")
    except RuntimeError:
        pass


def parser_defaults(repo: Path, path: str) -> "OrderedDict":
    src = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True,
                         check=True).stdout
    fn = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser"][0]
    ns = {"argparse": argparse}
    exec(compile(ast.Module([fn], []), path, "exec"), ns)
    return OrderedDict(vars(ns["get_args_parser"]().parse_args([])))


def original_hivg_boxes(O, cfg: H.HiVGConfig, sd: dict, canvas, mask, ids, texts) -> tuple[torch.Tensor, dict]:
    """HiVG's own HiVG(args) (peft 0.3.0 for the LoRA wrapping, our tiny HF CLIP in place of from_pretrained),
    loaded with our state dict; boxes for the given batch. Returns (boxes, key facts)."""
    from transformers import CLIPModel

    args = H.hivg_args(cfg)
    assert "from_pretrained" not in CLIPModel.__dict__
    CLIPModel.from_pretrained = classmethod(lambda cls, *a, **k: H.new_hf_clip(cfg))
    lora_config = O.HV.LoraConfig
    # HiVG.py:777 hard-codes r=32, lora_alpha=16 (scale 0.5): the tiny files use r=4, alpha=2 (the same scale)
    O.HV.LoraConfig = lambda **k: lora_config(**{**k, "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha})
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            m = O.HV.HiVG(args)
    finally:
        del CLIPModel.from_pretrained
        O.HV.LoraConfig = lora_config
    m.visu_token_mlp = O.HV.TOKEN_MLP(cfg.projection_dim, cfg.token_mlp_dim)  # 3072 hard-coded; unused by the box
    theirs = list(m.state_dict())
    res = m.load_state_dict(sd, strict=False)
    # transformers >= 4.31 no longer stores the text position_ids buffer (4.30, the release's, did)
    assert res.missing_keys == [], res.missing_keys
    assert res.unexpected_keys == [cfg.key_prefix + "text_model.embeddings.position_ids"], res.unexpected_keys
    assert [k for k in sd if k in set(theirs)] == theirs, "key order differs from HiVG's module"
    m.eval()
    table = {t: i for t, i in zip(texts, ids)}
    m.encode_text = lambda text_data, device=None: (torch.stack([table[t] for t in text_data]),
                                                    torch.stack([table[t] for t in text_data]).eq(0))
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        out = m(NestedTensor(canvas, mask), list(texts))[0]
    return out, {"their_keys": len(theirs)}


def original_clipvg(O, cfg: C.CLIPVGConfig, sd: dict, fp16: bool):
    """CLIP-VG's own ML_CLIP_VG around its own ModifiedCLIP (vision heads forced: OpenAI's width // 64 is 0 here),
    convert_weights applied (fp16 = what clip.load does on CUDA) or not (fp32), loaded with our state dict
    (strict). get_masks' Resize is given antialias=False (torchvision 0.10's behaviour, CLIP-VG's torch 1.9)."""
    import functools
    from torchvision.transforms import Resize

    CM, CV = O.CM, O.CV
    vit_init = CM.VisionTransformer.__init__

    def forced(self, input_resolution, patch_size, width, layers, heads, output_dim):
        vit_init(self, input_resolution, patch_size, width, layers, cfg.vision_heads, output_dim)

    CM.VisionTransformer.__init__ = forced
    try:
        clip = CM.ModifiedCLIP(cfg.embed_dim, cfg.image_resolution, cfg.vision_layers, cfg.vision_width,
                               cfg.vision_patch_size, cfg.context_length, cfg.vocab_size, cfg.transformer_width,
                               cfg.transformer_heads, cfg.transformer_layers)
    finally:
        CM.VisionTransformer.__init__ = vit_init
    if fp16:
        CM.convert_weights(clip)
    clip_sd = OrderedDict((k[5:], v) for k, v in sd.items() if k.startswith("clip."))
    assert list(clip.state_dict()) == list(clip_sd)
    if fp16:
        for k, v in clip.state_dict().items():
            assert v.dtype == clip_sd[k].dtype, (k, v.dtype, clip_sd[k].dtype)
    args = C.clipvg_args(cfg)
    args.device = "cpu"
    load_orig, resize_orig = CV.clip.load, CV.Resize
    CV.clip.load = lambda name, device=None, **k: (clip, None)
    CV.Resize = functools.partial(Resize, antialias=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            m = CV.ML_CLIP_VG(args)
    finally:
        CV.clip.load = load_orig
    assert list(m.state_dict()) == list(sd), "key order differs from ML_CLIP_VG's"
    m.load_state_dict(sd, strict=True)
    m.eval()

    def run(canvas, mask, ids):
        with torch.no_grad():
            return m(NestedTensor(canvas, mask), NestedTensor(ids, (ids > 0).int()))

    return m, run, (lambda: setattr(CV, "Resize", resize_orig))


# --------------------------------------------------------------------------
# HiVG
# --------------------------------------------------------------------------
def case_inputs(cases: list, prep: dict, texts: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cases as one batch: canvases [N, 3, S, S], pad masks [N, S, S], ids [N, 77]."""
    canv = torch.stack([prep[img].canvas for img, _ in cases])
    mask = torch.stack([prep[img].mask for img, _ in cases])
    ids = torch.tensor([t["ids"] for t in texts])
    return canv, mask, ids


@torch.no_grad()
def calibrate_on_cases_(model, run, canv, mask, ids, gen: torch.Generator) -> None:
    """transvg_ref.calibrate_box_head_ on the reg tokens of the cases, each run alone: `run(canvas, mask, ids, keep)`
    is the model's forward at batch 1 filling `keep`."""
    regs = []
    for i in range(len(ids)):
        keep = {}
        run(canv[i:i + 1], mask[i:i + 1], ids[i:i + 1], keep)
        regs.append(keep["reg"])
    T.calibrate_box_head_(model, torch.cat(regs), gen)


def build_hivg(cfg: H.HiVGConfig, seed: int, prep: dict, texts: list[dict], cases: list = HIVG_CASES):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = H.HiVG(cfg)
    H.randomize_(model, gen)
    canv, mask, ids = case_inputs(cases, prep, texts)
    calibrate_on_cases_(model, lambda c, m, i, keep: model(c, m, i, "per_sample", keep), canv, mask, ids, gen)
    return model, canv, mask, ids


@torch.no_grad()
def hivg_goldens(model: H.HiVG, canv, mask, ids, prep, texts, cases: list = HIVG_CASES,
                 order: list = BATCH_ORDER) -> tuple[list, OrderedDict, dict, dict]:
    cfg = model.cfg
    records, io_ = [], OrderedDict()
    preds, regs = [], []
    for i, ((img, expr), t) in enumerate(zip(cases, texts)):
        keep = {}
        box = model(canv[i:i + 1], mask[i:i + 1], ids[i:i + 1], "per_sample", keep)[0]
        b2 = model(canv[i:i + 1], mask[i:i + 1], ids[i:i + 1], "batched")[0]
        assert torch.equal(box, b2), "the two bridge modes must agree at batch 1"
        preds.append(box)
        regs.append(keep["reg"][0])
        records.append(case_record(i, img, expr, t, prep[img], box))
        case_io_(io_, i, box, keep, canv, "ml_visual")
        if i == 0:
            io_["case0.bridge0_text"] = keep[f"bridge{cfg.adapt_layers[0]}.text"][0]
    visu_masks_(io_, prep, cfg.grid, antialias=True)
    preds = torch.stack(preds)
    check_boxes(preds, records)
    # the batch
    o = list(order)
    keep_b = {}
    bb = model(canv[o], mask[o], ids[o], "batched", keep_b)
    bp = model(canv[o], mask[o], ids[o], "per_sample")
    d1 = (bp - preds[o]).abs().max().item()
    assert d1 < 1e-5, d1
    d2 = (bb - bp).abs().max().item()
    assert d2 > 1e-3, f"the bridge modes differ by only {d2}"
    io_["batched.pred"] = bb
    io_["batched.reg"] = keep_b["reg"]
    io_["batched_per_sample.pred"] = bp
    px = [T.cxcywh_to_pixels(b.tolist(), prep[cases[c][0]], S) for c, b in zip(o, bb)]
    batched = OrderedDict(order=o, bridge_mode="batched", pred_cxcywh=[f32list(b) for b in bb],
                          bbox_xyxy=[a for a, _ in px], bbox_xyxy_clipped=[b for _, b in px],
                          per_sample_pred_cxcywh=[f32list(b) for b in bp],
                          max_abs_diff_per_sample_vs_batch1=d1, max_abs_diff_batched_vs_per_sample=d2,
                          row_source="key/value position l of batch row b reads text position (77*b + l) // B of "
                                     "batch row (77*b + l) % B (B = batch size)")
    facts = {"d_batch1": d1, "d_modes": d2}
    return records, io_, batched, facts


def hivg_checks(model: H.HiVG, canv, mask, ids, order: list = BATCH_ORDER) -> None:
    cfg = model.cfg
    # our text loop = HF's CLIPTextModel (hidden_states semantics: [embeddings, layer 1, ..., layer 12])
    tm = model.inner.text_model
    with torch.no_grad():
        ours, last = model.text_forward(ids[:3])
        ref = tm(input_ids=ids[:3], output_hidden_states=True)
    assert len(ref.hidden_states) == cfg.text_layers + 1
    err = max((a - b).abs().max().item() for a, b in zip(ours, ref.hidden_states))
    assert err < 1e-5 and (last - ref.last_hidden_state).abs().max() < 1e-5, err
    # unused keys = autograd
    model.zero_grad(set_to_none=True)
    o = list(order)
    for mode in ("batched", "per_sample"):
        model(canv[o], mask[o], ids[o], mode).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    rule = [k for k in H.unused_by_box(model) if k in dict(model.named_parameters())]
    assert no_grad == rule, (set(no_grad) ^ set(rule))
    model.zero_grad(set_to_none=True)


def hivg_entry(name, cfg, obj, model, records, batched, io_name, naming, tok_rel) -> OrderedDict:
    sd = obj["model"]
    params = dict(model.named_parameters())
    return OrderedDict(
        kind="hivg", container="zip", location=LOCATION, peft_naming=naming, config=cfg.to_dict(),
        top_level=list(obj),
        optimizer=OrderedDict(type="AdamW", groups=len(obj["optimizer"]["param_groups"]),
                              n_params=len(obj["optimizer"]["param_groups"][0]["params"]),
                              n_with_state=len(obj["optimizer"]["state"]), lr_scheduler="LambdaLR (cosine)"),
        epoch=obj["epoch"], val_accu=obj["val_accu"], n_tensors=len(sd),
        n_values=sum(v.numel() for v in sd.values()), n_storages=None, dtypes=dtype_counts(sd),
        n_lora_pairs=sum(1 for k in sd if k.endswith(".lora_A.default.weight")),
        unused_keys=[renamed(k, model, naming) for k in H.unused_by_box(model)],
        buffers=[renamed(k, model, naming) for k in sd if k.endswith("position_ids")],
        trainable_at_stage3=len(H.trainable_names(model)),
        io=io_name, tokenizer=tok_rel, cases=records, batched=batched)


def renamed(k: str, model: H.HiVG, naming: str) -> str:
    if naming == "peft0.3":
        return k
    return next(iter(H.base_layer_renaming(OrderedDict([(k, None)]), model.lora_module_keys())))


TINY_STATEFUL = frozenset({"reg_token.weight", "bbox_embed.layers.2.bias"})  # AdamW moments kept in the tiny files


def hivg_checkpoint(model: H.HiVG, seed: int, epoch: int, val_accu: float, all_moments: bool = False) -> dict:
    """hivg_train.py's checkpoint object; AdamW moments for TINY_STATEFUL only, or (all_moments, as a real run
    saves it) for every trainable parameter."""
    args = H.hivg_args(model.cfg)
    stateful = set(H.trainable_names(model)) if all_moments else set(TINY_STATEFUL)
    osd, ssd = H.optimizer_state(model, args, stateful=stateful, gen=torch.Generator().manual_seed(1000 + seed),
                                 epoch=epoch)
    sd = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    return {"model": sd, "optimizer": osd, "lr_scheduler": ssd, "epoch": int(epoch), "args": args,
            "val_accu": float(val_accu)}


def make_hivg(out: Path, tok: SubsetTokenizer, original) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    prep, images = prepare_images(sorted({i for i, _ in HIVG_CASES}), HIVG_OUT)
    texts = [tok.ids(e.lower(), truncate=True) for _, e in HIVG_CASES]
    assert texts[0]["ids"].count(0) > 77 - len(texts[0]["tokens"]), "case 0 must hold a real '!' (id 0)"
    assert texts[7]["truncated"] and not any(t["truncated"] for t in texts[:7])
    doc = OrderedDict(schema=1, system="hivg", imsize=S, mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD,
                      tokenizer=tokenizer_doc(tok, "tokenizer.json", truncate=True), images=images,
                      models=OrderedDict(), invalid=OrderedDict())
    summary = OrderedDict()
    for seed, (name, cfg) in enumerate(hivg_configs(tok.size).items(), start=1):
        entry, obj, model, summary[name] = hivg_model(out, name, cfg, seed, 9 if cfg.variant == "L" else 19,
                                                      {1: 0.7806, 2: 0.8025, 3: 0.8652}[seed], prep, texts,
                                                      original)
        doc["models"][name] = entry
        if name == "hivg_b_tiny_uncplus.pth":
            # (b) newer peft naming, same weights
            bl = dict(obj)
            bl["model"] = H.base_layer_renaming(obj["model"], model.lora_module_keys())
            assert len(bl["model"]) == len(obj["model"])
            bname = "hivg_b_tiny_uncplus_base_layer.pth"
            save_checkpoint(bl, out / bname)
            e = copy.deepcopy(entry)
            e["peft_naming"] = "base_layer"
            e["unused_keys"] = [renamed(k, model, "base_layer") for k in H.unused_by_box(model)]
            e["buffers"] = [renamed(k, model, "base_layer") for k in e["buffers"]]
            e["n_storages"] = zip_storages(out / bname)
            e["n_model_storages"] = model_storages(out / bname)
            e["same_weights_as"] = name
            doc["models"][bname] = e
            # (d) one bridge layer's trained cross_attn base weights removed
            li = cfg.adapt_layers[1]
            pre = f"{cfg.key_prefix}vision_model.encoder.layers.{li}.cross_attn."
            removed = [pre + f"{p}_proj.{w}" for p in ("k", "v", "q", "out") for w in ("weight", "bias")]
            miss = dict(obj)
            miss["model"] = OrderedDict((k, v) for k, v in obj["model"].items() if k not in removed)
            assert len(miss["model"]) == len(obj["model"]) - 8
            mname = "hivg_b_tiny_missing_bridge.pth"
            save_checkpoint(miss, out / mname)
            doc["invalid"][mname] = OrderedDict(
                kind="missing_key", container="zip", location=LOCATION, same_weights_as=name, removed_keys=removed,
                bridge_layer=li, kept=[pre + f"{p}_proj.lora_{ab}.default.weight" for p in ("k", "v", "q", "out")
                                       for ab in ("A", "B")],
                n_tensors=len(miss["model"]), n_storages=zip_storages(out / mname),
                defect=f"the trained base weights (q/k/v/out_proj .weight/.bias) of bridge layer {li}'s cross_attn "
                       "are missing (their LoRA A/B are still there): a strict=False load would silently keep "
                       "random bridge weights, so the importer must refuse the file")
    write_json(out / "cases.json", doc)
    return summary


@contextlib.contextmanager
def timed(times: dict | None, label: str):
    """Adds the seconds the block takes to times[label] (when times is a dict)."""
    t = time.time()
    yield
    if times is not None:
        times[label] = times.get(label, 0.0) + time.time() - t


def hivg_model(out: Path, name: str, cfg: H.HiVGConfig, seed: int, epoch: int, val_accu: float, prep: dict,
               texts: list[dict], original, cases: list = HIVG_CASES, order: list = BATCH_ORDER, full: bool = False,
               times: dict | None = None) -> tuple[OrderedDict, dict, H.HiVG, tuple]:
    """One HiVG file as hivg_train.py writes it (`out / name`, peft 0.3 names) with its io.safetensors: random
    weights (seed), calibrated head, goldens on `cases` (batch 1) and the batch `order`, the checks, and (with
    `original`) HiVG's own code on the file. full: AdamW moments for every trainable parameter, no size limit.
    Returns (cases.json entry, checkpoint object, model, (records, batched, facts))."""
    with timed(times, "hivg: build + calibrate"):
        model, canv, mask, ids = build_hivg(cfg, seed, prep, texts, cases)
    with timed(times, "hivg: goldens"):
        records, io_, batched, facts = hivg_goldens(model, canv, mask, ids, prep, texts, cases, order)
    with timed(times, "hivg: checks (HF text loop, autograd)"):
        hivg_checks(model, canv, mask, ids, order)
    with timed(times, "hivg: optimizer state"):
        obj = hivg_checkpoint(model, seed, epoch=epoch, val_accu=val_accu, all_moments=full)
    io_name = name.replace(".pth", ".io.safetensors")
    with timed(times, "hivg: save + read back"):
        save_checkpoint(obj, out / name, max_bytes=None if full else 1_000_000)
        save_io(io_, out / io_name)
        entry = hivg_entry(name, cfg, obj, model, records, batched, io_name, "peft0.3", "tokenizer.json")
        entry["n_storages"] = zip_storages(out / name)
        entry["n_model_storages"] = model_storages(out / name)
    if original is not None:
        with timed(times, "hivg: HiVG's own code"):
            facts.update(check_hivg_original(original, model, obj["model"], canv, mask, ids, records, batched))
    return entry, obj, model, (records, batched, facts)


@torch.no_grad()
def check_hivg_original(O, model, sd, canv, mask, ids, records, batched) -> dict:
    cfg = model.cfg
    texts = [r["text"] for r in records]
    # batch 1, every case
    worst = 0.0
    for i, r in enumerate(records):
        box, _ = original_hivg_boxes(O, cfg, sd, canv[i:i + 1], mask[i:i + 1], ids[i:i + 1], texts[i:i + 1])
        worst = max(worst, (box[0] - torch.tensor(r["pred_cxcywh"])).abs().max().item())
    # the batch, HiVG's own (cross-sample) bridge
    o = batched["order"]
    bb, facts = original_hivg_boxes(O, cfg, sd, canv[o], mask[o], ids[o], [texts[c] for c in o])
    worst_b = (bb - torch.tensor(batched["pred_cxcywh"])).abs().max().item()
    assert worst < 1e-5 and worst_b < 1e-5, (worst, worst_b)
    return {"orig_batch1": worst, "orig_batched": worst_b, **facts}


# --------------------------------------------------------------------------
# CLIP-VG
# --------------------------------------------------------------------------
def make_clipvg(out: Path, tok: SubsetTokenizer, original) -> dict:
    import os

    out.mkdir(parents=True, exist_ok=True)
    prep, images = prepare_images(sorted({i for i, _ in CLIPVG_CASES}), CLIPVG_OUT)
    texts = [tok.ids(e.lower(), truncate=False) for _, e in CLIPVG_CASES]
    tok_rel = os.path.relpath(HIVG_OUT / "tokenizer.json", CLIPVG_OUT)
    name = "clipvg_b_tiny.pth"
    entry, summary = clipvg_model(out, name, clipvg_config(tok.size), 11, prep, texts, original, tok_rel)
    doc = OrderedDict(schema=1, system="clipvg", imsize=S, mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD,
                      tokenizer=tokenizer_doc(tok, tok_rel, truncate=False), images=images, models=OrderedDict(),
                      invalid=OrderedDict())
    doc["models"][name] = entry
    write_json(out / "cases.json", doc)
    return {name: summary}


def clipvg_model(out: Path, name: str, cfg: C.CLIPVGConfig, seed: int, prep: dict, texts: list[dict], original,
                 tok_rel: str, cases: list = CLIPVG_CASES, full: bool = False,
                 times: dict | None = None) -> tuple[OrderedDict, tuple]:
    """One CLIP-VG file as train_clip_vg.py writes it (`out / name`: CLIP part fp16, aliased wrapper keys) with its
    io.safetensors: random weights (seed), calibrated head, fp32 goldens on `cases` (batch 1), the checks, and (with
    `original`) CLIP-VG's own code on the file. full: AdamW moments for every trainable parameter, no size limit.
    Returns (cases.json entry, (records, None, facts))."""
    with timed(times, "clipvg: build + calibrate"):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = C.MLCLIPVG(cfg)
        C.randomize_(model, gen)
        T.strengthen_text_(model, gain=3.0)  # the 77 text tokens vs 197 visual ones: make the expression move the box
        C.convert_weights_fp16_(model.clip)
        ref = copy.deepcopy(model).float().eval()  # fp32 reference: the fp16 weights upcast
        canv, mask, ids = case_inputs(cases, prep, texts)
        calibrate_on_cases_(ref, ref, canv, mask, ids, gen)
        model.bbox_embed.load_state_dict(ref.bbox_embed.state_dict())  # the head is fp32 in both
    records, io_ = [], OrderedDict()
    preds, p16 = [], []
    with torch.no_grad(), timed(times, "clipvg: goldens (fp32, and fp16 for information)"):
        for i, ((img, expr), t) in enumerate(zip(cases, texts)):
            keep = {}
            box = ref(canv[i:i + 1], mask[i:i + 1], ids[i:i + 1], keep)[0]
            preds.append(box)
            records.append(case_record(i, img, expr, t, prep[img], box))
            case_io_(io_, i, box, keep, canv, "image_features")
            try:
                b16 = model(canv[i:i + 1], mask[i:i + 1], ids[i:i + 1])[0].float()
            except RuntimeError as e:  # CPU without fp16 kernels
                b16 = None
                fp16_error = str(e).split("\n")[0]
            p16.append(b16)
        visu_masks_(io_, prep, cfg.grid, antialias=False)
        preds = torch.stack(preds)
        check_boxes(preds, records)
        # batch = batch 1
        bt = ref(canv, mask, ids)
        d_batch = (bt - preds).abs().max().item()
        assert d_batch < 1e-5, d_batch
    facts = {"d_batch1": d_batch}
    if all(b is not None for b in p16):
        p16 = torch.stack(p16)
        for i, b in enumerate(p16):
            io_[f"case{i}.pred_fp16"] = b
        facts["fp16_vs_fp32"] = (p16 - preds).abs().max().item()
        facts["fp16_vs_fp32_px"] = facts["fp16_vs_fp32"] * S
    else:
        facts["fp16_vs_fp32"] = f"not run: {fp16_error}"
    # unused keys = autograd (through the fp32 reference; shared parameters reported under all their names)
    with timed(times, "clipvg: checks (autograd)"):
        ref.zero_grad(set_to_none=True)
        ref(canv, mask, ids).sum().backward()
        al = C.aliases(ref)
        grads = {n: p.grad for n, p in ref.named_parameters()}
        sdv = ref.state_dict(keep_vars=True)
        no_grad = [k for k in sdv if grads.get(al.get(k, k)) is None]
        assert no_grad == C.unused_by_box(ref), set(no_grad) ^ set(C.unused_by_box(ref))
        ref.zero_grad(set_to_none=True)
        del ref, grads, sdv
    # the checkpoint
    with timed(times, "clipvg: optimizer state"):
        args = C.clipvg_args(cfg)
        stateful = set(C.trainable_names(model)) if full else set(TINY_STATEFUL)
        osd, ssd = C.optimizer_state(model, args, stateful=stateful, gen=torch.Generator().manual_seed(1000 + seed),
                                     epoch=109)
    sd = model.state_dict()  # shared tensors stay shared: torch.save writes each storage once
    obj = {"model": sd, "optimizer": osd, "lr_scheduler": ssd, "epoch": 109, "args": args, "val_accu": 0.8125}
    with timed(times, "clipvg: save + read back"):
        save_checkpoint(obj, out / name, max_bytes=None if full else 1_000_000)
        n_st = zip_storages(out / name)
        back = load(out / name)["model"]
        for k, a in C.aliases(model).items():
            assert back[k].untyped_storage().data_ptr() == back[a].untyped_storage().data_ptr(), k
        del back
        n_model_st = model_storages(out / name)
        assert n_st < len(sd) and n_model_st == len(sd) - len(C.aliases(model)), (n_st, n_model_st, len(sd))
        io_name = name.replace(".pth", ".io.safetensors")
        save_io(io_, out / io_name)
    if original is not None:
        with timed(times, "clipvg: CLIP-VG's own code"):
            facts.update(check_clipvg_original(original, cfg, sd, canv, mask, ids, preds, p16))
    entry = OrderedDict(
        kind="clipvg", container="zip", location=LOCATION, config=cfg.to_dict(), top_level=list(obj),
        optimizer=OrderedDict(type="AdamW", groups=len(osd["param_groups"]),
                              n_params=[len(g["params"]) for g in osd["param_groups"]],
                              n_with_state=len(osd["state"]), lr_scheduler="LambdaLR (cosine)"),
        epoch=obj["epoch"], val_accu=obj["val_accu"], n_tensors=len(sd), n_values=sum(v.numel() for v in sd.values()),
        n_storages=n_st, n_model_storages=n_model_st, n_unique_values=sum(v.numel() for k, v in sd.items() if k not in C.aliases(model)),
        dtypes=dtype_counts(sd), fp16_keys=[k for k, v in sd.items() if v.dtype == torch.float16],
        unused_keys=C.unused_by_box(model), buffers=[], aliases=C.aliases(model),
        reference="fp32 on CPU, the fp16 weights upcast (the release ran the CLIP part in fp16 on CUDA)",
        fp16_vs_fp32_max_abs=facts["fp16_vs_fp32"], io=io_name, tokenizer=tok_rel, cases=records)
    return entry, (records, None, facts)


def check_clipvg_original(O, cfg, sd, canv, mask, ids, preds, p16) -> dict:
    m32, run32, restore = original_clipvg(O, cfg, sd, fp16=False)
    try:
        d32 = (run32(canv, mask, ids) - preds).abs().max().item()
        assert d32 < 1e-5, d32
        facts = {"orig_fp32": d32}
        m16, run16, _ = original_clipvg(O, cfg, sd, fp16=True)
        try:
            o16 = run16(canv, mask, ids).float()
            facts["orig_fp16_vs_our_fp16"] = ((o16 - p16).abs().max().item() if isinstance(p16, torch.Tensor)
                                              else None)
            facts["orig_fp16_vs_fp32"] = (o16 - preds).abs().max().item()
        except RuntimeError as e:
            facts["orig_fp16"] = f"not run: {str(e).splitlines()[0]}"
    finally:
        restore()
    return facts


def tokenizer_doc(tok: SubsetTokenizer, rel: str, truncate, full: bool = False) -> OrderedDict:
    source = ("CLIP BPE (open_clip bpe_simple_vocab_16e6 = OpenAI's), " +
              ("the whole HF CLIP tokenizer.json (CLIP's own ids)" if full else
               "subset, ids renumbered densely in the full vocabulary's order"))
    return OrderedDict(file=rel, vocab_size=tok.size, n_merges=tok.n_merges, sot_id=tok.sot, eot_id=tok.eot,
                       bang_id=tok.vocab["!"], pad_id=0, context_length=77, truncate=truncate, source=source,
                       full_ids=OrderedDict(sot=49406, eot=49407, bang=0))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
def check_args_against_mirrors() -> None:
    a = parser_defaults(MIRRORS["hivg"], "hivg_train.py")
    assert a == H.HIVG_TRAIN_DEFAULTS and list(a) == list(H.HIVG_TRAIN_DEFAULTS), set(a.items()) ^ set(
        H.HIVG_TRAIN_DEFAULTS.items())
    b = parser_defaults(MIRRORS["clipvg"], "train_clip_vg.py")
    assert b == C.CLIPVG_TRAIN_DEFAULTS and list(b) == list(C.CLIPVG_TRAIN_DEFAULTS)


def generate(hivg_out: Path, clipvg_out: Path, use_original: bool) -> dict:
    strings = [e for _, e in HIVG_CASES] + [e for _, e in CLIPVG_CASES]
    strings = list(dict.fromkeys(strings + [s.lower() for s in strings]))
    hivg_out.mkdir(parents=True, exist_ok=True)
    tok = SubsetTokenizer(hivg_out / "tokenizer.json", strings)
    if use_original:
        check_args_against_mirrors()
        with tempfile.TemporaryDirectory() as tmp, original_code(Path(tmp)) as O:
            check_tokenize_original(O, tok)
            s = make_hivg(hivg_out, tok, O)
            s.update(make_clipvg(clipvg_out, tok, O))
    else:
        s = make_hivg(hivg_out, tok, None)
        s.update(make_clipvg(clipvg_out, tok, None))
    return {"summary": s, "tok": tok}


def shown(d: Path) -> Path:
    """`d` relative to the repo root when inside it, else as given."""
    try:
        return d.resolve().relative_to(ROOT)
    except ValueError:
        return d


# --------------------------------------------------------------------------
# Full size (--full DIR; not committed)
# --------------------------------------------------------------------------
FULL_HIVG_NAME = "hivg_b16_unc.pth"
FULL_CLIPVG_NAME = "clipvg_b16_unc.pth"
FULL_BATCH_ORDER = [5, 0, 7, 2]


def make_full(out: Path, use_original: bool) -> None:
    """The full-size files (see the module docstring) into `out`, through the same code as the tiny ones."""
    t0 = time.time()
    times = OrderedDict()
    hcfg, ccfg = H.FULL_B, C.FULL_B16
    assert (hcfg.variant, hcfg.dataset, hcfg.extract_text_layers, hcfg.adapt_layers) == ("B", "unc", [12], [0, 3, 7, 11])
    assert (hcfg.vision_width, hcfg.vision_heads, hcfg.vision_layers, hcfg.vision_ffn) == (768, 12, 12, 3072)
    assert (hcfg.text_width, hcfg.text_heads, hcfg.text_layers, hcfg.text_ffn) == (512, 8, 12, 2048)
    assert (hcfg.vocab_size, hcfg.context_length, hcfg.projection_dim) == (49408, 77, 512)
    assert (hcfg.lora_r, hcfg.lora_alpha, hcfg.peft_depth) == (32, 16, 4)
    assert (ccfg.vision_width, ccfg.vision_heads, ccfg.transformer_width, ccfg.transformer_heads) == (768, 12, 512, 8)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({i for i, _ in HIVG_CASES + CLIPVG_CASES})
    assert names == sorted(p.name for p in IMAGES.glob("*.png")), names
    (out / "images").mkdir(exist_ok=True)
    for n in names:
        shutil.copyfile(IMAGES / n, out / "images" / n)
    with timed(times, "tokenizer (full, checked)"):
        strings = [e for _, e in HIVG_CASES] + [e for _, e in CLIPVG_CASES]
        strings = list(dict.fromkeys(strings + [s.lower() for s in strings]))
        tok = SubsetTokenizer(out / "tokenizer.json", strings, whole=True)
    prep, images = prepare_images(names, out, src=out / "images")
    htexts = [tok.ids(e.lower(), truncate=True) for _, e in HIVG_CASES]
    ctexts = [tok.ids(e.lower(), truncate=False) for _, e in CLIPVG_CASES]
    assert htexts[0]["ids"].count(0) > 77 - len(htexts[0]["tokens"]), "case 0 must hold a real '!' (id 0)"
    assert htexts[7]["truncated"] and not any(t["truncated"] for t in htexts[:7] + ctexts)
    assert all(t["ids"] == t["clip_ids"] for t in htexts + ctexts)
    assert max(max(t["ids"]) for t in htexts) == 49407
    doc = OrderedDict(schema=1, system="full", imsize=S, mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD,
                      tokenizer=tokenizer_doc(tok, "tokenizer.json", OrderedDict(hivg=True, clipvg=False), full=True),
                      images=images, models=OrderedDict(), invalid=OrderedDict())
    summary = OrderedDict()
    with contextlib.ExitStack() as stack:
        O = None
        if use_original:
            check_args_against_mirrors()
            O = stack.enter_context(original_code(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
            check_tokenize_original(O, tok)
        entry, obj, model, summary[FULL_HIVG_NAME] = hivg_model(
            out, FULL_HIVG_NAME, hcfg, 21, 19, 0.8431, prep, htexts, O, HIVG_CASES, FULL_BATCH_ORDER, full=True,
            times=times)
        doc["models"][FULL_HIVG_NAME] = entry
        del obj, model
        doc["models"][FULL_CLIPVG_NAME], summary[FULL_CLIPVG_NAME] = clipvg_model(
            out, FULL_CLIPVG_NAME, ccfg, 31, prep, ctexts, O, "tokenizer.json", CLIPVG_CASES, full=True, times=times)
    write_json(out / "cases.json", doc)
    times["total"] = time.time() - t0
    report([out], {"summary": summary, "tok": tok})
    print("\ntimings (s): " + json.dumps({k: round(v, 1) for k, v in times.items()}))


def report(dirs: list[Path], res: dict) -> None:
    tok = res["tok"]
    print(f"tokenizer: {tok.size} ids ({tok.n_merges} merges), '!' = {tok.vocab['!']}, SOT = {tok.sot}, "
          f"EOT = {tok.eot}")
    for d in dirs:
        total = 0
        print(f"\n{shown(d)}:")
        for p in sorted(q for q in d.rglob("*") if q.is_file()):
            n = p.stat().st_size
            total += n
            print(f"  {p.relative_to(d).as_posix():<42} {n:>10}  {sha(p)[:16]}")
        print(f"  {'total':<42} {total:>10}")
    for name, (records, batched, facts) in res["summary"].items():
        print(f"\n{name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in facts.items()))
        for r in records:
            print(f"  case {r['case']} {r['image']:<20} pred {np.round(r['pred_cxcywh'], 4).tolist()} "
                  f"clipped {np.round(r['bbox_xyxy_clipped'], 1).tolist()}")
        if batched:
            print(f"  batched {batched['order']}: " + " ".join(str(np.round(b, 3).tolist())
                                                         for b in batched["pred_cxcywh"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hivg-out", type=Path, default=HIVG_OUT)
    ap.add_argument("--clipvg-out", type=Path, default=CLIPVG_OUT)
    ap.add_argument("--no-original", action="store_true", help="skip the comparison with the mirrored code")
    ap.add_argument("--verify-stable", action="store_true", help="regenerate into a temp dir, assert same bytes")
    ap.add_argument("--full", type=Path, metavar="DIR",
                    help="write the full-size HiVG-B/16 and CLIP-VG-B/16 files to DIR instead (~2 GB, not committed)")
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    use_original = not a.no_original and all(p.exists() for p in MIRRORS.values())
    if not use_original:
        print("note: not comparing with HiVG's / CLIP-VG's own code (mirrors missing or --no-original)")
    if a.full:
        make_full(a.full, use_original)
        return
    res = generate(a.hivg_out, a.clipvg_out, use_original)
    report([a.hivg_out, a.clipvg_out], res)
    for d, limit in ((a.hivg_out, 2_000_000), (a.clipvg_out, 2_000_000)):
        total = sum(p.stat().st_size for p in d.iterdir())
        if total > limit:
            print(f"warning: {d.name} is {total} bytes (> {limit})")
    if a.verify_stable:
        with tempfile.TemporaryDirectory() as tmp:
            h2, c2 = Path(tmp) / "hivg_release", Path(tmp) / "clipvg_release"
            generate(h2, c2, False)
            for x, y in ((a.hivg_out, h2), (a.clipvg_out, c2)):
                assert_same_files(x, y)
        print("\nbyte-stable: a second run (in a temporary folder) gives identical bytes for every file")


if __name__ == "__main__":
    main()
