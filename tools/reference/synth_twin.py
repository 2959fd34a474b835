#!/usr/bin/env python3
"""The demo grounder (`GrounderConfig::synth_small`) written in PyTorch, on the same data.

Two uses:
  * train it on a benchmark written by `groundkit synth` (same splits, same word-level
    vocabulary rule, same augmentation, same losses incl. the word loss, batches grouped by
    image) to compare accuracy per sample seen:
        .venv-ref/bin/python tools/reference/synth_twin.py train --data demo-run/data --epochs 8
  * time it (training samples/s and inference latency), for docs/benchmarks.md:
        .venv-ref/bin/python tools/reference/synth_twin.py bench --model synth-small-train --batch 32
    prints one JSON line (`model`, `batch`, `threads`, `median_ms`, `samples_per_s`): model
    `synth-small` is the forward (inference mode), `synth-small-train` one training step
    (forward, loss, backward, clipping, AdamW), as `groundkit bench --models ...` times them.

The architecture mirrors crates/gk-models (conv backbone, BERT text encoder, pre-norm
fusion with positions added to queries and keys, dense box head); the PyTorch side uses
its native fast forms (Conv2d for the 3x3 and patch convolutions, SDPA attention), the
same arithmetic as the Rust side's unfold-and-matmul.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def sincos_2d(g, dim):
    """MAE's 2-D sine-cosine table [g*g, dim] (rows: y then x), as gk-train's `sincos_2d`."""
    q = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / max(q, 1))
    out = torch.zeros(g * g, dim, dtype=torch.float64)
    for y in range(g):
        for x in range(g):
            row = []
            for p in (y, x):
                row += [torch.sin(p * freq), torch.cos(p * freq)]
            out[y * g + x, : 4 * q] = torch.cat(row)
    return out.float()


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class ConvBlock(nn.Module):
    """x + conv3x3(act(LN(x))), NHWC in and out."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-5)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # [B, H, W, C]
        h = quick_gelu(self.norm(x)).permute(0, 3, 1, 2)
        return x + self.conv(h).permute(0, 2, 3, 1)


class ConvBackbone(nn.Module):
    def __init__(self, channels=(32, 64, 128), depths=(1, 1, 2), patch=4, image=128):
        super().__init__()
        self.stem = nn.Conv2d(3, channels[0], patch, stride=patch)
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, (c, d) in enumerate(zip(channels, depths)):
            if i > 0:
                self.merges.append(nn.Conv2d(channels[i - 1], c, 2, stride=2))
            self.stages.append(nn.ModuleList([ConvBlock(c) for _ in range(d)]))
        g = image // patch // 2 ** (len(channels) - 1)
        self.grid = g
        self.pos = nn.Parameter(sincos_2d(g, channels[-1]))
        self.norm = nn.LayerNorm(channels[-1], eps=1e-5)

    def forward(self, x):  # [B, 3, S, S] -> [B, g*g, C]
        x = self.stem(x).permute(0, 2, 3, 1)
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x = self.merges[i - 1](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            for b in blocks:
                x = b(x)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1]) + self.pos
        return self.norm(x)


class BertLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, bias):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.ln1(x + self.out(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class Bert(nn.Module):
    def __init__(self, vocab, d=128, layers=2, heads=4, ffn=256, max_pos=32):
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_pos, d)
        self.token_type = nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList([BertLayer(d, heads, ffn) for _ in range(layers)])

    def forward(self, ids, mask):
        t = ids.shape[1]
        x = self.ln(self.word(ids) + self.pos.weight[:t] + self.token_type.weight[0])
        bias = ((mask[:, None, None, :].float() - 1.0) * 1e9)
        for layer in self.layers:
            x = layer(x, bias)
        return x


class FusionLayer(nn.Module):
    """Pre-norm; positions added to queries and keys, not values; ReLU FFN."""

    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)

    def forward(self, x, pos, bias):
        b, t, d = x.shape
        h = self.norm1(x)
        w, bi = self.in_proj.weight, self.in_proj.bias
        qk = F.linear(h + pos, w[: 2 * d], bi[: 2 * d])
        v = F.linear(h, w[2 * d:], bi[2 * d:])
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k = qk.chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.linear2(torch.relu(self.linear1(self.norm2(x))))


class Grounder(nn.Module):
    def __init__(self, vocab, d=128, layers=3, heads=4, ffn=256, text_len=20, image=128,
                 channels=(32, 64, 128), depths=(1, 1, 2), words=True):
        super().__init__()
        self.visual = ConvBackbone(channels=channels, depths=depths, image=image)
        self.text = Bert(vocab)
        self.visu_proj = nn.Linear(channels[-1], d)
        self.text_proj = nn.Linear(128, d)
        self.reg = nn.Parameter(torch.randn(1, 1, d))
        g = self.visual.grid
        self.grid = g
        pos = torch.randn(1, 1 + text_len + g * g, d)
        pos[0, 1 + text_len:] = sincos_2d(g, d)
        self.pos = nn.Parameter(pos)
        self.layers = nn.ModuleList([FusionLayer(d, heads, ffn) for _ in range(layers)])
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.coord = nn.Linear(d, 2)
        # word_head: every unfused cell -> vocabulary logits (the Rust model's `word_head`)
        self.word_head = nn.Linear(d, vocab) if words else None
        if DIRECT:
            self.q2 = nn.Linear(d, d)
            self.k2 = nn.Linear(d, d)
        self.box = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))
        cells = torch.arange(g * g)
        self.register_buffer("cell_xy", torch.stack([(cells % g).float(), (cells // g).float()], 1) + 0.5)
        self.register_buffer("cell_pm", self.cell_xy * (2.0 / g) - 1.0)  # centres in [-1, 1]

    def forward(self, pixels, ids, text_mask, inv=None):
        v = self.visu_proj(self.visual(pixels))
        if inv is not None:  # pixels hold each image once; inv maps expressions to images
            v = v[inv]
        t = self.text_proj(self.text(ids, text_mask))
        b, n, d = v.shape
        x = torch.cat([self.reg.expand(b, 1, d), t, v], 1)
        mask = torch.cat([torch.ones(b, 1), text_mask.float(), torch.ones(b, n)], 1)
        bias = ((mask - 1.0) * 1e9)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, self.pos, bias)
        x = self.norm(x)
        reg, vis = x[:, 0], x[:, -n:]
        tm = text_mask.float().unsqueeze(2)
        text_mean = (x[:, 1:1 + t.shape[1]] * tm).sum(1) / tm.sum(1)
        query = reg + text_mean
        scores = (self.k(vis) @ self.q(query).unsqueeze(2)).squeeze(2) / math.sqrt(d)  # [B, N]
        scores = scores + self.coord(query) @ self.cell_pm.T  # text-chosen direction over the grid
        if DIRECT:  # unfused text mean against unfused cells
            t0 = (t * tm).sum(1) / tm.sum(1)
            scores = scores + (self.k2(v) @ self.q2(t0).unsqueeze(2)).squeeze(2) / math.sqrt(d)
        raw = self.box(vis)  # [B, N, 4]
        centre = (self.cell_xy + torch.tanh(raw[..., :2])) / self.grid
        boxes = torch.cat([centre, torch.sigmoid(raw[..., 2:])], -1)
        self.last_cells = v  # [B, N, d] projected cells before fusion (auxiliary word loss)
        return scores, boxes


def xyxy(b):
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def giou(a, b):
    a, b = xyxy(a), xyxy(b)
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    lt, rb = torch.max(a[..., :2], b[..., :2]), torch.min(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area(a) + area(b) - inter
    iou = inter / union
    lt2, rb2 = torch.min(a[..., :2], b[..., :2]), torch.max(a[..., 2:], b[..., 2:])
    hull = (rb2 - lt2).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull, iou


MULTI_POS = False
DIRECT = True  # dense_direct, as in gk-models; `train --no-direct` ablates it


def word_bag_loss(model, ids, target):
    """gk-train's `word_bag_loss`: the target cell's unfused token predicts the expression's
    words (multi-hot, ids < 4 are [PAD] [UNK] [CLS] [SEP]); BCE averaged over words and batch."""
    g = model.grid
    cell = (target[:, 1] * g).long().clamp(0, g - 1) * g + (target[:, 0] * g).long().clamp(0, g - 1)
    logits = model.word_head(model.last_cells[torch.arange(len(cell)), cell])  # [B, V]
    bag = torch.zeros_like(logits).scatter_(1, ids, 1.0)
    return F.binary_cross_entropy_with_logits(logits[:, 4:], bag[:, 4:])


def criterion(scores, boxes, target, grid):
    b = target.shape[0]
    col = (target[:, 0] * grid).long().clamp(0, grid - 1)
    row = (target[:, 1] * grid).long().clamp(0, grid - 1)
    cell = row * grid + col
    if MULTI_POS:
        n = grid * grid
        cells = torch.arange(n)
        cxy = torch.stack([(cells % grid).float(), (cells // grid).float()], 1) + 0.5  # [N, 2] grid units
        inside = ((cxy / grid - target[:, None, :2]).abs() < target[:, None, 2:] / 2).all(-1)  # [B, N]
        centre = torch.stack([col, row], 1).float() + 0.5
        near = ((cxy[None] - centre[:, None]).abs() <= 1.0).all(-1)
        pos = (inside & near) | F.one_hot(cell, n).bool()
        ce = (torch.logsumexp(scores, 1) - torch.logsumexp(scores.masked_fill(~pos, -1e9), 1)).mean()
        w = pos.float() / pos.float().sum(1, keepdim=True)  # [B, N]
        l1 = ((boxes - target[:, None]).abs().sum(-1) * w).sum() / b
        g, _ = giou(boxes, target[:, None].expand_as(boxes))
        return ce, l1, ((1 - g) * w).sum() / b
    picked = boxes[torch.arange(b), cell]
    ce = F.cross_entropy(scores, cell)
    l1 = (picked - target).abs().sum() / b
    g, _ = giou(picked, target)
    return ce, l1, (1 - g).sum() / b


# ---------------------------------------------------------------------------------------------
# data


def words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def load_split(data: Path, name: str):
    from PIL import Image

    rows = [json.loads(line) for line in (data / f"{name}.jsonl").read_text().splitlines() if line]
    cache = {}
    imgs = []
    for r in rows:
        if r["image"] not in cache:
            im = np.asarray(Image.open(data / r["image"]).convert("RGB"), dtype=np.float32) / 255.0
            cache[r["image"]] = torch.from_numpy(im).permute(2, 0, 1)
        imgs.append(cache[r["image"]])
    return rows, imgs


def encode(vocab, text, max_len):
    ids = [2] + [vocab.get(w, 1) for w in words(text)][: max_len - 2] + [3]
    mask = [1] * len(ids)
    return ids + [0] * (max_len - len(ids)), mask + [0] * (max_len - len(mask))


def flip_text(t):
    return t.replace("left", "\0").replace("right", "left").replace("\0", "right")


def make_batch(rows, imgs, idx, vocab, text_len, rng=None, group=False):
    """group: each distinct image once in the pixels (one augmentation shared by its
    expressions) and an index from expressions to images as a fifth output."""
    pix, ids, masks, tgt, inv, seen = [], [], [], [], [], {}
    for i in idx:
        r, im = rows[i], imgs[i]
        s = im.shape[-1]
        x1, y1, x2, y2 = r["bbox_xyxy"]
        text = r["expr"]
        key = r["image"] if group else i
        if key not in seen:
            aug = (rng.random() < 0.5, rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)) if rng is not None else None
            if aug is not None:
                if aug[0]:
                    im = im.flip(-1)
                im = ((im - im.mean()) * aug[2] + im.mean() * aug[1]).clamp(0, 1)
            seen[key] = (len(pix), aug)
            pix.append(im)
        k, aug = seen[key]
        inv.append(k)
        if aug is not None and aug[0]:
            x1, x2 = s - x2, s - x1
            text = flip_text(text)
        e = encode(vocab, text, text_len)
        ids.append(e[0])
        masks.append(e[1])
        tgt.append([(x1 + x2) / 2 / s, (y1 + y2) / 2 / s, (x2 - x1) / s, (y2 - y1) / s])
    pix = (torch.stack(pix) - MEAN) / STD
    if group:
        return pix, torch.tensor(ids), torch.tensor(masks), torch.tensor(tgt), torch.tensor(inv)
    return pix, torch.tensor(ids), torch.tensor(masks), torch.tensor(tgt)


def evaluate(model, rows, imgs, vocab, text_len, bs=64):
    model.eval()
    hits, by_type = 0, {}
    with torch.inference_mode():
        for s in range(0, len(rows), bs):
            idx = list(range(s, min(s + bs, len(rows))))
            pix, ids, mask, tgt = make_batch(rows, imgs, idx, vocab, text_len)
            scores, boxes = model(pix, ids, mask)
            best = boxes[torch.arange(len(idx)), scores.argmax(1)]
            _, iou = giou(best.clamp(0, 1), tgt)
            # pointing: the predicted centre lies inside the target box (selection right,
            # whatever the box quality)
            inside = ((best[:, :2] - tgt[:, :2]).abs() <= tgt[:, 2:] / 2).all(1)
            for k, i in enumerate(idx):
                ok = bool(iou[k] >= 0.5)
                hits += ok
                ty = rows[i].get("extra", {}).get("type", "?")
                h, p, n = by_type.get(ty, (0, 0, 0))
                by_type[ty] = (h + ok, p + bool(inside[k]), n + 1)
    model.train()
    return 100.0 * hits / len(rows), {k: (round(100.0 * h / n, 1), round(100.0 * p / n, 1)) for k, (h, p, n) in by_type.items()}


def cmd_train(a):
    global MULTI_POS, DIRECT
    MULTI_POS, DIRECT = a.multi_pos, a.direct
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    data = Path(a.data)
    rows, imgs = load_split(Path(a.train_data) if a.train_data else data, "train")
    vrows, vimgs = load_split(data, "val")
    vocab = {w: i + 4 for i, w in enumerate(sorted({w for r in rows for w in words(r["expr"])}))}
    model = Grounder(len(vocab) + 4, layers=a.layers, channels=tuple(a.channels), depths=tuple(a.depths),
                     words=a.words > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
    per_epoch = len(rows) // a.batch
    total = per_epoch * a.epochs
    t0 = time.time()
    step = 0
    for epoch in range(a.epochs):
        order = rng.permutation(len(rows))
        if a.group:  # images in random order, each image's expressions together
            by_image = {}
            for i in range(len(rows)):
                by_image.setdefault(rows[i]["image"], []).append(i)
            keys = list(by_image)
            order = [i for j in rng.permutation(len(keys)) for i in by_image[keys[j]]]
        for k in range(per_epoch):
            lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / total)))
            for gr in opt.param_groups:
                gr["lr"] = lr
            batch = make_batch(rows, imgs, order[k * a.batch:(k + 1) * a.batch], vocab, 20, rng, a.group)
            pix, ids, mask, tgt = batch[:4]
            scores, boxes = model(pix, ids, mask, batch[4] if a.group else None)
            ce, l1, gi = criterion(scores, boxes, tgt, model.grid)
            loss = ce + l1 + gi
            if a.words > 0:
                loss = loss + a.words * word_bag_loss(model, ids, tgt)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{total} loss {loss.item():.3f} ce {ce.item():.3f} l1 {l1.item():.3f} "
                      f"giou {gi.item():.3f} {step * a.batch / (time.time() - t0):.0f} samples/s", flush=True)
        acc, types = evaluate(model, vrows, vimgs, vocab, 20)
        tr_acc, _ = evaluate(model, rows[:500], imgs[:500], vocab, 20)
        print(json.dumps({"epoch": epoch + 1, "step": step, "val_acc50": round(acc, 2), "by_type": types,
                          "train500_acc50": round(tr_acc, 2),
                          "elapsed_s": round(time.time() - t0, 1)}), flush=True)


def cmd_bench(a):
    torch.manual_seed(0)
    model = Grounder(70)
    b = a.batch
    pix = torch.randn(b, 3, 128, 128)
    ids = torch.randint(4, 70, (b, 20))
    mask = torch.ones(b, 20, dtype=torch.long)
    mask[:, 12:] = 0
    tgt = torch.rand(b, 4) * 0.3 + 0.3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        scores, boxes = model(pix, ids, mask)
        loss = sum(criterion(scores, boxes, tgt, model.grid)) + 10.0 * word_bag_loss(model, ids, tgt)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def infer():
        with torch.inference_mode():
            model(pix, ids, mask)

    train = a.model.endswith("-train")
    fn = train_step if train else infer
    model.train(train)
    for _ in range(a.warmup):
        fn()
    ms = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(ms)
    print(json.dumps({"impl": "pytorch", "model": a.model, "batch": b, "threads": a.threads,
                      "median_ms": round(med, 2), "samples_per_s": round(1e3 * b / med, 1)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--train-data", help="take the train split from this folder instead (same generator, more rows)")
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--wd", type=float, default=1e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--no-direct", dest="direct", action="store_false",
                   help="drop the unfused text-mean x cell score (dense_direct; the Rust model has it)")
    t.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128], help="conv net channels per stage")
    t.add_argument("--depths", type=int, nargs="+", default=[1, 1, 2], help="conv blocks per stage")
    t.add_argument("--layers", type=int, default=3, help="fusion layers")
    t.add_argument("--words", type=float, default=10.0,
                   help="weight of the word loss (the expression's words from the target cell; 0 = no word head)")
    t.add_argument("--no-group", dest="group", action="store_false",
                   help="shuffle expressions, not images (default: each image's expressions in one batch, encoded once)")
    t.add_argument("--multi-pos", action="store_true", help="every cell near the centre and inside the box is a positive")
    bch = sub.add_parser("bench")
    bch.add_argument("--model", choices=["synth-small", "synth-small-train"], default="synth-small-train")
    bch.add_argument("--batch", type=int, default=32)
    bch.add_argument("--threads", type=int, default=2)
    bch.add_argument("--warmup", type=int, default=1)
    bch.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    {"train": cmd_train, "bench": cmd_bench}[a.cmd](a)


if __name__ == "__main__":
    main()
