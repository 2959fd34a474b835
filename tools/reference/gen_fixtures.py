#!/usr/bin/env python3
"""Generate the small, committed reference fixtures under tests/fixtures/.

Run with the reference venv (see tools/reference/README.md):

    .venv-ref/bin/python tools/reference/gen_fixtures.py [--only clip,bert,box,tok,roi,distill,lora,swin,hivg,ckd]

Deterministic: every section re-seeds torch/numpy/random with 0 before it starts,
so sections can be regenerated independently and give the same bytes.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FIXTURES, load_bert_tokenizer, load_clip_tokenizer, rel,  # noqa: E402
                    seed_everything, write_json)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def big_init(model: torch.nn.Module, std: float = 0.2, ln_std: float = 0.1) -> None:
    """Larger-than-default random init so that outputs are not trivial.

    every parameter ~ N(0, std); LayerNorm weight ~ 1 + N(0, ln_std),
    LayerNorm bias ~ N(0, ln_std); CLIP's logit_scale keeps its init value
    (log(1/0.07) = 2.6592).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            p.normal_(0.0, std)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1.0 + ln_std * torch.randn_like(m.weight))
                m.bias.normal_(0.0, ln_std)


def save_weights(model: torch.nn.Module, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(folder / "config.json"))
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    params = {k for k, _ in model.named_parameters()}
    assert set(sd) == params, (set(sd) ^ params)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sd


def save_io(tensors: dict, path: Path) -> None:
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().clone()
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


# --------------------------------------------------------------------------
# a) tiny CLIP
# --------------------------------------------------------------------------
def gen_clip_tiny() -> None:
    from transformers import CLIPConfig, CLIPModel

    seed_everything(0)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, bos_token_id=998, eos_token_id=999, pad_token_id=1,
                projection_dim=24)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_channels=3, image_size=32, patch_size=8, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, projection_dim=24)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24,
                     logit_scale_init_value=2.6592)
    cfg._attn_implementation = "eager"
    model = CLIPModel(cfg).eval()
    big_init(model)
    out_dir = FIXTURES / "clip_tiny"
    sd = save_weights(model, out_dir)
    for k in sd:
        assert k.split(".")[0] in ("vision_model", "text_model", "visual_projection",
                                   "text_projection", "logit_scale"), k

    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32, generator=g)
    body0 = torch.randint(2, 998, (5,), generator=g)
    body1 = torch.randint(2, 998, (3,), generator=g)
    input_ids = torch.tensor([[998, *body0.tolist(), 999],
                              [998, *body1.tolist(), 999, 1, 1]], dtype=torch.int64)
    attention_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.int64)

    io = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        vo = model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        to = model.text_model(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=True)
        full = model(pixel_values=pixel_values, input_ids=input_ids,
                     attention_mask=attention_mask)
        nl = cfg.vision_config.num_hidden_layers
        assert len(vo.hidden_states) == nl + 1
        assert len(to.hidden_states) == cfg.text_config.num_hidden_layers + 1
        for i, h in enumerate(vo.hidden_states):
            io[f"vision_hidden.{i}"] = h
        for i, h in enumerate(to.hidden_states):
            io[f"text_hidden.{i}"] = h
        io["vision_last"] = vo.last_hidden_state
        io["vision_pooled"] = vo.pooler_output
        io["image_embeds"] = model.visual_projection(vo.pooler_output)
        io["text_last"] = to.last_hidden_state
        io["text_pooled"] = to.pooler_output
        io["text_embeds"] = model.text_projection(to.pooler_output)
        io["logits_per_image"] = full.logits_per_image

        # Document what the hidden-state tuples hold (checked, not assumed).
        emb = model.vision_model.embeddings(pixel_values)
        assert close(vo.hidden_states[0], model.vision_model.pre_layrnorm(emb))
        assert close(vo.hidden_states[-1], vo.last_hidden_state)  # no post-LN on the sequence
        assert close(vo.pooler_output, model.vision_model.post_layernorm(vo.last_hidden_state[:, 0]))
        assert close(to.hidden_states[0], model.text_model.embeddings(input_ids=input_ids))
        assert close(model.text_model.final_layer_norm(to.hidden_states[-1]), to.last_hidden_state)
        eos_pos = (input_ids == 999).int().argmax(-1)
        assert close(to.pooler_output, to.last_hidden_state[torch.arange(2), eos_pos])
        ie = F.normalize(io["image_embeds"], dim=-1)
        te = F.normalize(io["text_embeds"], dim=-1)
        assert close(full.logits_per_image, model.logit_scale.exp() * ie @ te.t(), 1e-4)
        assert close(full.image_embeds, ie) and close(full.text_embeds, te)

        # position-embedding interpolation at 48x48 (6x6 patches instead of 4x4)
        pv48 = torch.randn(2, 3, 48, 48, generator=g)
        v48 = model.vision_model(pixel_values=pv48, interpolate_pos_encoding=True)
        io["pixel_values_48"] = pv48
        io["vision_last_48"] = v48.last_hidden_state
        io["vision_pooled_48"] = v48.pooler_output
        # our own re-implementation of the interpolation (see NOTES.md) must agree
        pos = model.vision_model.embeddings.position_embedding.weight  # [17, 32]
        cls, patch = pos[:1], pos[1:]
        d = patch.shape[-1]
        patch = patch.reshape(1, 4, 4, d).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(6, 6), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(36, d)
        io["pos_embed_48"] = torch.cat([cls, patch], 0)  # [37, 32]
        emb48 = model.vision_model.embeddings(pv48, interpolate_pos_encoding=True)
        conv = model.vision_model.embeddings.patch_embedding(pv48).flatten(2).transpose(1, 2)
        cls_tok = model.vision_model.embeddings.class_embedding.expand(2, 1, -1)
        mine = torch.cat([cls_tok, conv], 1) + io["pos_embed_48"][None]
        assert close(emb48, mine), (emb48 - mine).abs().max()

    save_io(io, out_dir / "io.safetensors")
    print("clip_tiny: ok", rel(out_dir))


# --------------------------------------------------------------------------
# b) tiny BERT
# --------------------------------------------------------------------------
def gen_bert_tiny() -> None:
    from transformers import BertConfig, BertModel

    seed_everything(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
                     hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = BertModel(cfg, add_pooling_layer=True).eval()
    big_init(model)
    out_dir = FIXTURES / "bert_tiny"
    sd = save_weights(model, out_dir)
    assert not any(k.startswith("bert.") for k in sd)

    g = torch.Generator().manual_seed(2)
    r0 = torch.randint(104, 1000, (7,), generator=g).tolist()
    r1 = torch.randint(104, 1000, (4,), generator=g).tolist()
    input_ids = torch.tensor([[101, *r0, 102], [101, *r1, 102, 0, 0, 0]], dtype=torch.int64)
    attention_mask = (input_ids != 0).to(torch.int64)
    token_type_ids = torch.zeros_like(input_ids)
    io = {"input_ids": input_ids, "attention_mask": attention_mask,
          "token_type_ids": token_type_ids}
    with torch.no_grad():
        o = model(input_ids=input_ids, attention_mask=attention_mask,
                  token_type_ids=token_type_ids, output_hidden_states=True)
        assert len(o.hidden_states) == cfg.num_hidden_layers + 1
        for i, h in enumerate(o.hidden_states):
            io[f"hidden.{i}"] = h
        io["last"] = o.last_hidden_state
        io["pooled"] = o.pooler_output
        assert close(o.hidden_states[-1], o.last_hidden_state)
        assert close(o.hidden_states[0], model.embeddings(input_ids=input_ids,
                                                          token_type_ids=token_type_ids))
        assert close(o.pooler_output, torch.tanh(model.pooler.dense(o.last_hidden_state[:, 0])))
    save_io(io, out_dir / "io.safetensors")
    print("bert_tiny: ok", rel(out_dir))


# --------------------------------------------------------------------------
# c) box ops and the TransVG loss
# --------------------------------------------------------------------------
def cxcywh_to_xyxy(x):
    # TransVG utils/box_utils.py xywh2xyxy (it is really cxcywh -> xyxy)
    x_c, y_c, w, h = x.unbind(-1)
    return torch.stack([x_c - 0.5 * w, y_c - 0.5 * h, x_c + 0.5 * w, y_c + 0.5 * h], dim=-1)


def trans_vg_loss(batch_pred, batch_target):
    """TransVG models/loss.py trans_vg_loss, verbatim semantics:

        batch_size = batch_pred.shape[0]; num_boxes = batch_size
        loss_bbox = F.l1_loss(batch_pred, batch_target, reduction='none')        # [B,4]
        loss_giou = 1 - torch.diag(generalized_box_iou(xywh2xyxy(batch_pred),
                                                       xywh2xyxy(batch_target)))  # [B]
        losses['loss_bbox'] = loss_bbox.sum() / num_boxes
        losses['loss_giou'] = loss_giou.sum() / num_boxes

    boxes are normalised (cx, cy, w, h); generalized_box_iou is
    torchvision.ops.generalized_box_iou (same formula as DETR's util/box_ops.py).
    """
    from torchvision.ops import generalized_box_iou

    b = batch_pred.shape[0]
    loss_bbox = F.l1_loss(batch_pred, batch_target, reduction="none")
    loss_giou = 1 - torch.diag(generalized_box_iou(cxcywh_to_xyxy(batch_pred),
                                                   cxcywh_to_xyxy(batch_target)))
    return loss_bbox.sum() / b, loss_giou.sum() / b


def gen_box() -> None:
    from torchvision.ops import box_iou, generalized_box_iou

    seed_everything(0)
    g = torch.Generator().manual_seed(3)
    n = 16

    def rand_boxes():
        wh = 0.05 + 0.85 * torch.rand(n, 2, generator=g)
        # centres so that the box lies mostly inside [0,1] (at most 0.05 outside)
        lo = wh / 2 - 0.05
        hi = 1 - wh / 2 + 0.05
        c = lo + (hi - lo) * torch.rand(n, 2, generator=g)
        return torch.cat([c, wh], -1)

    pred = rand_boxes()
    tgt = rand_boxes()
    tgt[0] = pred[0]                                   # identical pair
    pred[1] = torch.tensor([0.20, 0.20, 0.20, 0.20])   # disjoint pair (gap 0.35 in x)
    tgt[1] = torch.tensor([0.75, 0.70, 0.30, 0.20])
    pred[2] = torch.tensor([0.50, 0.50, 0.20, 0.20])   # pred strictly inside tgt
    tgt[2] = torch.tensor([0.48, 0.53, 0.60, 0.50])

    pred_xyxy = cxcywh_to_xyxy(pred)
    tgt_xyxy = cxcywh_to_xyxy(tgt)
    iou_m = box_iou(pred_xyxy, tgt_xyxy)
    giou_m = generalized_box_iou(pred_xyxy, tgt_xyxy)
    assert iou_m[0, 0] == 1.0 and iou_m[1, 1] == 0.0 and giou_m[1, 1] < 0

    def grad_of(fn):
        p = pred.clone().requires_grad_(True)
        fn(p).backward()
        return p.grad.detach().clone()

    loss_l1, loss_giou = trans_vg_loss(pred, tgt)
    io = {
        "pred_cxcywh": pred, "tgt_cxcywh": tgt,
        "pred_xyxy": pred_xyxy, "tgt_xyxy": tgt_xyxy,
        "iou": torch.diag(iou_m).contiguous(), "iou_matrix": iou_m,
        "giou_matrix": giou_m,
        "loss_l1": loss_l1.reshape(()), "loss_giou": loss_giou.reshape(()),
        "grad_pred": grad_of(lambda p: sum(trans_vg_loss(p, tgt))),
        "grad_pred_l1": grad_of(lambda p: trans_vg_loss(p, tgt)[0]),
        "grad_pred_giou": grad_of(lambda p: trans_vg_loss(p, tgt)[1]),
    }
    # torch: d|x|/dx at x == 0 is 0 (sign(0) = 0), so the identical pair's L1 grad is 0
    assert torch.all(io["grad_pred_l1"][0] == 0)
    out = FIXTURES / "box"
    out.mkdir(parents=True, exist_ok=True)
    save_io(io, out / "golden.safetensors")
    print(f"box: ok loss_l1={loss_l1.item():.6f} loss_giou={loss_giou.item():.6f}")


# --------------------------------------------------------------------------
# d) tokenizers
# --------------------------------------------------------------------------
LONG_WORDS = ("the tall man on the far left wearing a red shirt and blue jeans is standing next "
              "to a small brown dog near the old wooden bench").split()
LONG = " ".join(LONG_WORDS[i % len(LONG_WORDS)] for i in range(120))

STRINGS = [
    "a photo",
    "The MAN in Red",
    "man,left-most!!",
    "café naïve Ångström",
    "2nd from the left 1234567",
    "the 🐶 dog 👍",
    "the man's hat, don't",
    "I'm here, you're there, we'll see, they've gone, he'd go, she'll've",
    "左边的人",
    "  man \t in\tthe\n\nmiddle   of  it  ",
    LONG,
    "   ",
    "",
    "left-hand side, top-right corner -- far-left",
    "(the one) [in brackets] {curly} <angle>",
    "#hashtag @mention $5 & 100%",
    "https://example.com/a/b?c=d&e=f_g",
    "Guy w/ blue shirt ... far LEFT :) ;-)",
    "unaffable unbelievably antidisestablishmentarianism",
    "über straße ﬁne Œuvre",
    "3.14 and 1,000,000 and 10th",
    "mañana Ελληνικά русский שלום",
    "no\u00a0break\u200bzero\u3000ideo\u2019quote",
    "family 👨\u200d👩\u200d👧 flag 🇫🇷 skin 👍🏽",
    "l'homme à gauche, RIGHT-MOST zebra!!!???",
    "x" * 120,
]


def hf_batch(tok, strings, max_len):
    enc = tok(strings, max_length=max_len, truncation=True, padding="max_length")
    return enc["input_ids"], enc["attention_mask"]


def clip_pretokens(backend, s):
    norm = backend.normalizer.normalize_str(s) if backend.normalizer else s
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(norm)]


def bpe_pairs_seen(word: str, ranks: dict, suffix: str) -> set:
    """Run BPE on one pre-token; return every adjacent pair (that is a merge)
    seen at any step."""
    syms = list(word)
    if not syms:
        return set()
    syms[-1] = syms[-1] + suffix
    seen = set()
    while True:
        pairs = [(syms[i], syms[i + 1]) for i in range(len(syms) - 1)]
        cand = [p for p in pairs if p in ranks]
        seen.update(cand)
        if not cand:
            return seen
        best = min(cand, key=lambda p: ranks[p])
        new, i = [], 0
        while i < len(syms):
            if i < len(syms) - 1 and (syms[i], syms[i + 1]) == best:
                new.append(syms[i] + syms[i + 1])
                i += 2
            else:
                new.append(syms[i])
                i += 1
        syms = new


def merge_pair(m):
    return tuple(m) if isinstance(m, list) else tuple(m.split(" "))


def small_clip_json(full: dict, backend, strings) -> dict:
    model = full["model"]
    assert model["type"] == "BPE" and not model.get("ignore_merges"), model.get("ignore_merges")
    suffix = model.get("end_of_word_suffix") or ""
    merges = [merge_pair(m) for m in model["merges"]]
    ranks = {p: i for i, p in enumerate(merges)}
    seen = set()
    for s in strings:
        for w in clip_pretokens(backend, s):
            seen |= bpe_pairs_seen(w, ranks, suffix)
    kept = [p for p in merges if p in seen]  # original relative order
    vocab = model["vocab"]
    keep_tokens = {t for t, i in vocab.items() if i < 512}  # 256 bytes + 256 bytes</w>
    keep_tokens |= {a + b for a, b in kept}
    keep_tokens |= {t["content"] for t in full["added_tokens"]}
    small = copy.deepcopy(full)
    small["model"]["vocab"] = {t: i for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
                               if t in keep_tokens}
    if isinstance(model["merges"][0], list):
        small["model"]["merges"] = [[a, b] for a, b in kept]
    else:
        small["model"]["merges"] = [f"{a} {b}" for a, b in kept]
    small["truncation"] = None
    small["padding"] = None
    return small


def small_wordpiece_json(full: dict, backend, strings) -> dict:
    model = full["model"]
    assert model["type"] == "WordPiece"
    needed = set()
    for s in strings:
        needed |= set(backend.encode(s).tokens)
    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    needed |= specials
    needed |= {t["content"] for t in full["added_tokens"]}
    vocab = model["vocab"]
    small = copy.deepcopy(full)
    small["model"]["vocab"] = {t: i for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
                               if t in needed}
    assert specials <= set(small["model"]["vocab"])
    small["truncation"] = None
    small["padding"] = None
    return small


def verify_small(small_path: Path, full_backend, strings, name: str) -> None:
    from tokenizers import Tokenizer

    small = Tokenizer.from_file(str(small_path))
    full = Tokenizer.from_str(full_backend.to_str())
    full.no_truncation()
    full.no_padding()
    for s in strings:
        a, b = full.encode(s), small.encode(s)
        assert a.ids == b.ids, (name, s, a.ids, b.ids)
        assert a.tokens == b.tokens, (name, s)
        assert a.offsets == b.offsets, (name, s)
    print(f"tokenizers/{name}: small tokenizer.json matches the full one on "
          f"{len(strings)} strings ({len(small.get_vocab())} vocab entries)")


def gen_tokenizers() -> None:
    out = FIXTURES / "tokenizers"
    cases = {"strings": STRINGS}
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = load_clip_tokenizer(Path(tmp) / "clip")
        bert_tok = load_bert_tokenizer()
        for name, tok, kind in (("clip", clip_tok, "bpe"), ("bert", bert_tok, "wp")):
            backend = tok.backend_tokenizer
            raw = Tokenizer_from(backend)
            full = json.loads(raw.to_str())
            small = (small_clip_json if kind == "bpe" else small_wordpiece_json)(full, raw, STRINGS)
            path = out / name / "tokenizer.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(small, f, ensure_ascii=False, indent=1)
                f.write("\n")
            verify_small(path, raw, STRINGS, name)
            # transformers' unpadded, untruncated ids == the raw tokenizers ids
            hf_ids = tok(STRINGS)["input_ids"]
            assert hf_ids == [e.ids for e in raw.encode_batch(STRINGS)], name
            cases[f"{name}_raw"] = {"ids": hf_ids}
            lens = {"clip": (77, 8), "bert": (20, 6)}[name]
            for suffix, max_len in zip(("", "_short"), lens):
                ids, mask = hf_batch(tok, STRINGS, max_len)
                assert all(len(r) == max_len for r in ids)
                cases[name + suffix] = {"max_len": max_len, "pad_id": tok.pad_token_id,
                                        "pad_token": tok.pad_token,
                                        "ids": ids, "mask": mask}
    write_json(out / "cases.json", cases)
    print("tokenizers: ok", rel(out))


def Tokenizer_from(backend):
    """An independent copy of a transformers backend tokenizer, with truncation
    and padding cleared (the MiniLM file ships truncation 128 / padding 128)."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(backend.to_str())
    t.no_truncation()
    t.no_padding()
    return t


# --------------------------------------------------------------------------
# e) RoIAlign (torchvision) and the distillation losses (torch), values and gradients
# --------------------------------------------------------------------------
ROI_CONFIGS = [  # (name, output (ph, pw), spatial_scale, sampling_ratio, aligned)
    ("a", (2, 2), 1.0, 2, True),
    ("b", (3, 2), 0.5, 0, False),
    ("c", (2, 3), 1.0, -1, True),
    ("d", (1, 1), 0.25, 0, True),
]


def gen_roi() -> None:
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(11)
    feats = torch.randn(2, 3, 6, 7, generator=g)  # [B, C, H, W]
    rois = torch.tensor([
        [0, 0.0, 0.0, 7.0, 6.0],      # the whole map
        [1, 1.3, 0.7, 4.9, 3.2],      # fractional
        [0, 5.5, 4.5, 9.0, 8.0],      # crosses the right/bottom border
        [1, -2.0, -1.5, 1.0, 1.0],    # crosses the top-left border
        [0, 2.2, 2.2, 2.4, 2.6],      # tiny (< 1 px)
        [1, 3.0, 1.0, 3.0, 5.0],      # zero width
        [0, 10.0, 10.0, 14.0, 12.0],  # entirely outside
        [1, 0.5, 2.5, 6.5, 5.5],
    ])
    io = {"features": feats, "rois": rois}
    for name, out, scale, ratio, aligned in ROI_CONFIGS:
        x = feats.clone().requires_grad_(True)
        y = roi_align(x, rois, out, spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
        w = torch.randn(y.shape, generator=g)
        (y * w).sum().backward()
        io[f"{name}_out"] = y
        io[f"{name}_weight"] = w
        io[f"{name}_grad"] = x.grad
    out = FIXTURES / "roi"
    out.mkdir(parents=True, exist_ok=True)
    save_io(io, out / "golden.safetensors")
    print(f"roi: ok {len(ROI_CONFIGS)} configs x {len(rois)} boxes")


def gen_distill() -> None:
    """The losses of gk-train/src/distill.rs written in torch the obvious way."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(5)
    n, d, k = 6, 8, 5
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    scale = torch.tensor(14.3)
    teacher_sim = torch.randn(n, n, generator=g) * 3
    student_sim = torch.randn(n, n, generator=g) * 3
    feat_t = torch.randn(n, d, generator=g)
    anchor = torch.randn(n, d, generator=g)
    cands = torch.randn(n, k, d, generator=g)
    pos = (torch.rand(n, k, generator=g) < 0.4).float()
    pos[:, 0] = 1.0  # every anchor has a positive
    temp, tau = 2.0, 0.1

    def info_nce(a, b):
        logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        y = torch.arange(n)
        return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2

    def sim_kl(s):
        def rows(s, t):
            return F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1),
                            log_target=True, reduction="batchmean") * temp ** 2
        return (rows(s, teacher_sim) + rows(s.T, teacher_sim.T)) / 2

    def cos_loss(s):
        return (1 - F.cosine_similarity(s, feat_t, dim=-1)).mean()

    def mse_loss(s):
        return F.mse_loss(s, feat_t)

    def region(an):
        sim = torch.einsum("nkd,nd->nk", F.normalize(cands, dim=-1), F.normalize(an, dim=-1)) / tau
        return (torch.logsumexp(sim, -1) - torch.logsumexp(sim.masked_fill(pos == 0, -1e9), -1)).mean()

    io = {"a": a, "b": b, "scale": scale, "teacher_sim": teacher_sim, "student_sim": student_sim,
          "feat_t": feat_t, "anchor": anchor, "cands": cands, "pos": pos,
          "temp": torch.tensor(temp), "tau": torch.tensor(tau)}
    for name, fn, x in [("info_nce", lambda x: info_nce(x, b), a), ("sim_kl", sim_kl, student_sim),
                        ("cos", cos_loss, a), ("mse", mse_loss, a), ("region", region, anchor)]:
        x = x.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        io[f"{name}_loss"] = loss.detach().reshape(())
        io[f"{name}_grad"] = x.grad
    out = FIXTURES / "distill"
    out.mkdir(parents=True, exist_ok=True)
    save_io(io, out / "golden.safetensors")
    print("distill: ok " + " ".join(f"{k}={v.item():.5f}" for k, v in io.items() if k.endswith("_loss")))


# --------------------------------------------------------------------------
# LoRA on the tiny CLIP (HiVG's HiLoRA: stacked sets)
# --------------------------------------------------------------------------
class LoraLinear(torch.nn.Module):
    """A base nn.Linear plus stacked LoRA sets: y = W x + b + sum_s (alpha_s / r_s) B_s A_s x
    (peft's LoraLayer without dropout, the inference path)."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.sets = []  # (name, A [r, in], B [out, r], scale)

    def forward(self, x):
        y = self.base(x)
        for _, a, b, scale in self.sets:
            y = y + scale * F.linear(F.linear(x, a), b)
        return y


def gen_clip_lora() -> None:
    """Two LoRA sets on the tiny CLIP of clip_tiny/ (which must exist): s1 (rank 4, alpha 8)
    on q_proj and v_proj, s2 (rank 2, alpha 6) on k_proj, self_attn.out_proj and fc1, in
    both towers; B non-zero so that the sets matter. Writes clip_lora/lora.safetensors
    (peft-style keys `<path>.lora_A.<set>.weight`), sets.json and io.safetensors."""
    from transformers import CLIPModel

    seed_everything(0)
    model = CLIPModel.from_pretrained(str(FIXTURES / "clip_tiny"), attn_implementation="eager").eval()
    sets = [dict(name="s1", rank=4, alpha=8.0, dropout=0.1, targets=["q_proj", "v_proj"]),
            dict(name="s2", rank=2, alpha=6.0, dropout=0.0,
                 targets=["k_proj", "self_attn.out_proj", "fc1"])]

    def matches(path, targets):
        return any(path == t or path.endswith("." + t) for t in targets)

    g = torch.Generator().manual_seed(3)
    lora_sd = {}
    wrapped = 0
    for path, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or not path.split(".")[0] in ("vision_model", "text_model"):
            continue
        lin = LoraLinear(mod)
        for c in sets:
            if matches(path, c["targets"]):
                a = torch.randn(c["rank"], mod.in_features, generator=g) * 0.3
                b = torch.randn(mod.out_features, c["rank"], generator=g) * 0.3
                lin.sets.append((c["name"], a, b, c["alpha"] / c["rank"]))
                lora_sd[f"{path}.lora_A.{c['name']}.weight"] = a
                lora_sd[f"{path}.lora_B.{c['name']}.weight"] = b
        if lin.sets:
            parent = model.get_submodule(path.rsplit(".", 1)[0])
            setattr(parent, path.rsplit(".", 1)[1], lin)
            wrapped += 1
    assert wrapped == 2 * 2 * 5, wrapped  # 2 towers x 2 layers x (q, v, k, out, fc1)
    io_in = load_io(FIXTURES / "clip_tiny" / "io.safetensors")
    io = {}
    with torch.no_grad():
        vo = model.vision_model(pixel_values=io_in["pixel_values"])
        to = model.text_model(input_ids=io_in["input_ids"], attention_mask=io_in["attention_mask"])
        io["vision_last"] = vo.last_hidden_state
        io["image_embeds"] = model.visual_projection(vo.pooler_output)
        io["text_last"] = to.last_hidden_state
        io["text_embeds"] = model.text_projection(to.pooler_output)
        assert (io["image_embeds"] - io_in["image_embeds"]).abs().max() > 0.1, "LoRA changes nothing"
    out = FIXTURES / "clip_lora"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora_sd.items()}, str(out / "lora.safetensors"),
              metadata={"format": "pt"})
    write_json(out / "sets.json", sets)
    save_io(io, out / "io.safetensors")
    print("clip_lora: ok", rel(out), len(lora_sd), "LoRA tensors")


# --------------------------------------------------------------------------
# tiny Swin (QRNet's backbone), saved in the Hub's classic key layout
# --------------------------------------------------------------------------
SWIN_CLASSIC = [  # transformers-5 name fragment -> the name in Hub checkpoints
    (".attention.q_proj.", ".attention.self.query."),
    (".attention.k_proj.", ".attention.self.key."),
    (".attention.v_proj.", ".attention.self.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".attention.relative_position_bias.relative_position_bias_table",
     ".attention.self.relative_position_bias_table"),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
]


def gen_swin_tiny() -> None:
    """A 3-stage Swin (embed 12, depths 2/2/2, heads 2/3/6, MLP ratio 2, window 4, patch 4) on 56x56
    (grids 14, 7, 4: padded and shifted windows, an odd merge, a stage of one window) and on
    50x60 (the patch embedding pads too). Writes swin_tiny/{config.json, model.safetensors,
    io.safetensors}: every stage's output before merging ([B, H*W, C]), the final
    layer-normed sequence and the pooled output."""
    from transformers import SwinConfig, SwinModel

    seed_everything(0)
    cfg = SwinConfig(image_size=56, patch_size=4, num_channels=3, embed_dim=12, depths=[2, 2, 2],
                     num_heads=[2, 3, 6], window_size=4, mlp_ratio=2.0, qkv_bias=True,
                     hidden_act="gelu", layer_norm_eps=1e-5, drop_path_rate=0.0)
    cfg._attn_implementation = "eager"
    model = SwinModel(cfg).eval()
    big_init(model)
    out_dir = FIXTURES / "swin_tiny"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(str(out_dir / "config.json"))
    sd = {}
    for k, v in model.state_dict().items():
        for new, old in SWIN_CLASSIC:
            k = k.replace(new, old)
        sd[k] = v.detach().contiguous().clone()
    assert not any("q_proj" in k or "o_proj" in k or ".mlp." in k for k in sd), sorted(sd)
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    g = torch.Generator().manual_seed(5)
    io = {}
    with torch.no_grad():
        for tag, (h, w) in (("", (56, 56)), ("_odd", (50, 60))):
            pv = torch.randn(2, 3, h, w, generator=g)
            io[f"pixel_values{tag}"] = pv
            emb, dims = model.embeddings(pv)
            enc = model.encoder(emb, dims, output_hidden_states=True,
                                output_hidden_states_before_downsampling=True)
            for i, st in enumerate(enc.reshaped_hidden_states[1:]):
                io[f"stage{i}{tag}"] = st.flatten(2).transpose(1, 2)  # [B, H*W, C]
            full = model(pixel_values=pv)
            io[f"last{tag}"] = full.last_hidden_state
            io[f"pooled{tag}"] = full.pooler_output
            assert close(model.layernorm(enc.last_hidden_state), full.last_hidden_state)
    save_io(io, out_dir / "io.safetensors")
    print("swin_tiny: ok", rel(out_dir), {k: tuple(v.shape) for k, v in io.items() if k.startswith("stage")})


def gen_hivg_losses() -> None:
    """DETR's sigmoid_focal_loss (alpha 0.25, gamma 2) and dice_loss with num_boxes = B, as
    HiVG's loss_utils uses them, on random logits and 0/1 targets [B, N]."""
    g = torch.Generator().manual_seed(9)
    b, n = 3, 20
    x = torch.randn(b, n, generator=g) * 3
    t = (torch.rand(b, n, generator=g) < 0.3).float()

    def focal(x):
        prob = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = prob * t + (1 - prob) * (1 - t)
        loss = ce * ((1 - p_t) ** 2)
        loss = (0.25 * t + 0.75 * (1 - t)) * loss
        return loss.mean(1).sum() / b

    def dice(x):
        p = x.sigmoid()
        num = 2 * (p * t).sum(1)
        den = p.sum(-1) + t.sum(-1)
        return (1 - (num + 1) / (den + 1)).sum() / b

    io = {"x": x, "t": t}
    for name, fn in (("focal", focal), ("dice", dice)):
        xx = x.clone().requires_grad_(True)
        loss = fn(xx)
        loss.backward()
        io[f"{name}_loss"] = loss.detach().reshape(())
        io[f"{name}_grad"] = xx.grad
    out = FIXTURES / "hivg"
    out.mkdir(parents=True, exist_ok=True)
    save_io(io, out / "golden.safetensors")
    print("hivg: ok focal=%.5f dice=%.5f" % (io["focal_loss"], io["dice_loss"]))


def gen_ckd() -> None:
    """CKD's scores and losses (gk-train/src/ckd.rs) written in torch from the TF code's
    semantics (nce_distill_model.py): s = <e_p, e_r>; S[i, j] = 2 * sum_p max_r s (padding
    masked); NCE = CE(S, i) with same-image pairs removed; distillation over the K regions
    with the highest IoU with the student's top region, teacher softmax(P - mean), soft-label
    CE of softmax(scale * s); total = nce + ramp(1234) * distill."""
    from torchvision.ops import box_iou
    g = torch.Generator().manual_seed(11)
    b, p, r, e, c, k = 4, 3, 6, 8, 5, 3
    phrases = F.normalize(torch.randn(b, p, e, generator=g), dim=-1)
    regions = F.normalize(torch.randn(b, r, e, generator=g), dim=-1)
    region_valid = torch.ones(b, r)
    region_valid[2, 4:] = 0
    phrase_valid = torch.ones(b, p)
    phrase_valid[1, 2:] = 0
    phrase_valid[3, 1:] = 0
    image_of = [0, 1, 0, 2]
    exclude = torch.tensor([[float(i != j and image_of[i] == image_of[j]) for j in range(b)]
                            for i in range(b)])
    xy = torch.rand(b, r, 2, generator=g) * 40
    wh = torch.rand(b, r, 2, generator=g) * 30 + 5
    boxes = torch.cat([xy, xy + wh], -1)
    posteriors = torch.softmax(torch.randn(b, r, c + 1, generator=g) * 2, -1)
    classes = torch.tensor([[0, 3, -1], [2, -1, 1], [4, 4, 0], [1, 2, 2]])
    scale, student_scale, lam = 2.0, 1.5, min(0.001 + 1234 // 500, 3.0)

    def losses(ph, rg):
        s = torch.einsum("ipe,jre->ipjr", ph, rg)
        masked = s.masked_fill(region_valid[None, None] == 0, -1e9)
        S = scale * (masked.max(-1).values * phrase_valid[:, :, None]).sum(1)
        nce = F.cross_entropy(S - 1e4 * exclude, torch.arange(b))
        terms = []
        for i in range(b):
            n = int(region_valid[i].sum())
            for j in range(p):
                if phrase_valid[i, j] == 0 or classes[i, j] < 0:
                    continue
                own = s[i, j, i, :n]
                top = int(own.argmax())
                iou = box_iou(boxes[i, :n], boxes[i, top:top + 1])[:, 0]
                order = sorted(range(n), key=lambda q: (-float(iou[q]), q))[:k]
                t = posteriors[i, order, classes[i, j]]
                q = torch.softmax(t - t.mean(), -1)
                terms.append(-(q * F.log_softmax(student_scale * own[order], -1)).sum())
        distill = torch.stack(terms).mean()
        return S, nce, distill

    ph = phrases.clone().requires_grad_(True)
    rg = regions.clone().requires_grad_(True)
    S, nce, distill = losses(ph, rg)
    total = nce + lam * distill
    total.backward()
    io = {"phrases": phrases, "regions": regions, "region_valid": region_valid,
          "phrase_valid": phrase_valid, "exclude": exclude, "boxes": boxes,
          "posteriors": posteriors, "classes": classes.float(), "S": S.detach(),
          "nce": nce.detach().reshape(()), "distill": distill.detach().reshape(()),
          "total": total.detach().reshape(()), "grad_phrases": ph.grad, "grad_regions": rg.grad,
          "scale": torch.tensor(scale), "student_scale": torch.tensor(student_scale),
          "k": torch.tensor(float(k))}
    out = FIXTURES / "ckd"
    out.mkdir(parents=True, exist_ok=True)
    save_io(io, out / "golden.safetensors")
    print(f"ckd: ok nce={nce.item():.5f} distill={distill.item():.5f} total={total.item():.5f}")


def load_io(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


SECTIONS = {"clip": gen_clip_tiny, "bert": gen_bert_tiny, "box": gen_box,
            "tok": gen_tokenizers, "roi": gen_roi, "distill": gen_distill,
            "lora": gen_clip_lora, "swin": gen_swin_tiny, "hivg": gen_hivg_losses,
            "ckd": gen_ckd}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SECTIONS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.only.split(","):
        SECTIONS[name]()
    total = 0
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            assert p.stat().st_size < 1_000_000, p
    print(f"fixtures total: {total} bytes")


if __name__ == "__main__":
    main()
