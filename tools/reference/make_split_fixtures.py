#!/usr/bin/env python3
"""Write the small, committed split-file fixtures for gk-data's split readers.

What it writes (under crates/gk-data/tests/fixtures/splits/, about 55 KB in all):

  unc/unc_val.pth            zip torch.save, 6 TransVG 5-tuples (img, '<ann_id>.pth', xywh, phrase, attri)
  unc/unc_testA.pth          the same kind of rows, 4 of them, LEGACY (pre-1.6, non-zip) container
  flickr/flickr_test.pth     zip, 5 TransVG flickr 3-tuples (img, numpy xyxy row, phrase); f4/i8/f8 arrays,
                             numpy pickled as numpy 2 writes it (`numpy._core.multiarray._reconstruct`)
  flickr/flickr_val.pth      legacy container, 3 flickr rows, numpy pickled as numpy 1.x wrote it
                             (`numpy.core.multiarray._reconstruct`), like the 2019-2020 index files
  referit/referit_test.pth   zip written through a buffer (entries under `archive/`), 4 referit 5-tuples
                             (img, '<name>.pth', xyxy python ints or floats, phrase, [])
  hivg/unc_train.pth         zip, 3 HiVG rows (img, {'height','width'}, xywh, phrase, [[polygon...], ...])
  mixup/mixup_train.pth      zip, 6 HiVG mixup rows: COCO rows as in hivg/, flickr and referit rows whose
                             element 1 is the string 'flickr' / 'referit'. HiVG's pull_item applies the xywh
                             conversion to every mixup row (its referit/flickr test is on the dataset name,
                             which is 'mixup'), and uses the stored box as xywh for the box mask, so all mixup
                             boxes are stored xywh. Element 4 of flickr/referit rows is never read (the loader
                             replaces it by the box); what the real file holds there is unknown: None (flickr)
                             and [] (referit) here.
  refer/refcoco/refs(unc).p + instances.json     lichengunc/refer format, refs pickled with protocol 2
  refer/refcocog/refs(umd).p + instances.json    refs as a Python-2 protocol-0 pickle (py2 `str` = opcode S
                             with a repr-quoted literal, UTF-8 bytes), written by the emitter below
  <each of the above>.expected.json              what the Python loaders produce, see below
  hostile/...                truncated / bad magic / forbidden global / bad arity / NaN / negative box / bad refs;
                             hostile/hostile.expected.json says what is wrong with each (no other expectations)

Expected files (`<fixture file name>.expected.json`): a list in row order.
  .pth rows: {"row", "image", "expr" (as stored), "bbox_raw" (the 4 stored numbers as floats),
              "bbox_xyxy" (floats; coco-style rows x, y, x+w, y+h in float64, referit/flickr as stored,
              every mixup row as coco), "bbox_int_xyxy" (TransVG/HiVG pull_item: np.array(bbox, dtype=int),
              then x2=x+w, y2=y+h unless referit/flickr), "extra": {"elem1": element 1, "elem4": element 4}
              as JSON (tuples and numpy arrays as lists; flickr 3-tuples have "extra": {}),
              mixup rows also "source": "coco"|"flickr"|"referit" (HiVG's rule: 'COCO_' prefix, else elem1)}
  refs:       one object per (ref, sentence), refs order: {"image" (instances file_name of image_id),
              "expr" (sentence['sent']), "bbox_raw" (ann xywh), "bbox_xyxy", "width", "height", "image_id",
              "ann_id", "ref_id", "sent_id", "category_id", "split"}
Every expectation is computed from the fixture as Python reads it back (torch.load / pickle.load),
with TransVG's own int conversion code.

Determinism: fixed content, no randomness. torch's zip writer stores a random 40-digit
`<archive>/.data/serialization_id` record in every zip; this script overwrites it in place with a
content-derived id (sha256 of data.pkl, 40 decimal digits) and fixes both CRC-32 fields, so re-running
gives identical bytes. Everything else in torch's zip (1980 timestamps, 64-byte alignment) is stable.

Run (from the repo root, reference venv of tools/reference/setup.sh; no GPU, a few seconds):

    .venv-ref/bin/python tools/reference/make_split_fixtures.py [--out DIR]

It prints a table (file, bytes, rows, sha256) and the pickle opcodes / globals found in all fixtures.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import sys
import types
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_OUT = ROOT / "crates" / "gk-data" / "tests" / "fixtures" / "splits"

# --------------------------------------------------------------------------
# Pickling helpers
# --------------------------------------------------------------------------
_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy._core.multiarray._reconstruct (numpy 2)


class _NumpyV1Pickler(pickle._Pickler):
    """The pure-Python pickler, naming numpy's array reconstructor as numpy 1.x did.

    numpy 2 pickles arrays with GLOBAL 'numpy._core.multiarray _reconstruct'; files written with
    numpy 1.x (all published split files) say 'numpy.core.multiarray _reconstruct'. Everything
    else is byte-identical to the C pickler (checked in _check_v1_pickler).
    """

    def save_global(self, obj, name=None):
        if obj is _NP_RECONSTRUCT:
            assert self.proto < 4
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _v1_dump(obj, f, protocol=2):
    _NumpyV1Pickler(f, protocol).dump(obj)


NUMPY_V1_PICKLE = types.ModuleType("numpy_v1_pickle")
NUMPY_V1_PICKLE.Pickler = _NumpyV1Pickler
NUMPY_V1_PICKLE.dump = _v1_dump


def _check_v1_pickler() -> None:
    obj = [("a.jpg", np.array([1.5, 2, 3, 4], np.float32), "x"), ("b.jpg", np.arange(4, dtype=np.int64), "y")]
    c = pickle.dumps(obj, protocol=2)
    buf = io.BytesIO()
    _v1_dump(obj, buf)
    v1 = buf.getvalue()
    assert b"numpy._core.multiarray\n_reconstruct" in c, "numpy no longer pickles as numpy 2 did"
    assert v1 == c.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")


def _fix_serialization_id(path: Path) -> None:
    """Replace torch's random `.data/serialization_id` record by a content-derived one (same length)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        names = z.namelist()
        sid = [n for n in names if n.endswith("/.data/serialization_id")]
        if not sid:
            return
        pkl = z.read([n for n in names if n.endswith("/data.pkl")][0])
    name = sid[0].encode()
    # central directory
    eocd = data.rfind(b"PK\x05\x06")
    assert eocd >= 0
    n_entries, cd_size, cd_off = struct.unpack("<HII", data[eocd + 10:eocd + 20])
    pos, local_off, cd_entry = cd_off, None, None
    for _ in range(n_entries):
        assert data[pos:pos + 4] == b"PK\x01\x02"
        comp, = struct.unpack("<H", data[pos + 10:pos + 12])
        size, = struct.unpack("<I", data[pos + 20:pos + 24])
        fl, el, cl = struct.unpack("<HHH", data[pos + 28:pos + 34])
        off, = struct.unpack("<I", data[pos + 42:pos + 46])
        if bytes(data[pos + 46:pos + 46 + fl]) == name:
            assert comp == 0
            local_off, cd_entry, old_size = off, pos, size
        pos += 46 + fl + el + cl
    assert local_off is not None
    assert data[local_off:local_off + 4] == b"PK\x03\x04"
    fl, el = struct.unpack("<HH", data[local_off + 26:local_off + 30])
    start = local_off + 30 + fl + el
    new = str(int(hashlib.sha256(pkl).hexdigest(), 16) % 10 ** old_size).zfill(old_size).encode()
    assert len(new) == old_size
    data[start:start + old_size] = new
    crc = zlib.crc32(new) & 0xFFFFFFFF
    data[local_off + 14:local_off + 18] = struct.pack("<I", crc)
    data[cd_entry + 16:cd_entry + 20] = struct.pack("<I", crc)
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert z.read(sid[0]) == new


def save_zip(obj, path: Path, *, via_buffer=False, pickle_module=pickle, protocol=2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if via_buffer:  # entries are then named archive/..., as when saving to a file object
        buf = io.BytesIO()
        torch.save(obj, buf, pickle_module=pickle_module, pickle_protocol=protocol)
        path.write_bytes(buf.getvalue())
    else:  # entries are named <file stem>/...
        torch.save(obj, str(path), pickle_module=pickle_module, pickle_protocol=protocol)
    _fix_serialization_id(path)


def save_legacy(obj, path: Path, *, pickle_module=pickle) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path), pickle_module=pickle_module, _use_new_zipfile_serialization=False)


def load_pth(path: Path):
    # Our own, trusted files (never the hostile ones): unrestricted load, as the 2020 loaders did.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), weights_only=False)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def to_json(x):
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    assert x is None or isinstance(x, (str, int, float)), type(x)
    return x


# --------------------------------------------------------------------------
# Python-2 protocol-0 pickle emitter (what cPickle.dump(obj, f) wrote in Python 2)
# --------------------------------------------------------------------------
def py2_str_literal(b: bytes) -> bytes:
    """repr() of a Python 2 str: single quotes unless it holds ' and no ", \\xNN for non-printables."""
    q = b'"' if (b"'" in b and b'"' not in b) else b"'"
    out = bytearray(q)
    for c in b:
        ch = bytes([c])
        if ch == b"\\":
            out += b"\\\\"
        elif ch == q:
            out += b"\\" + q
        elif c == 9:
            out += b"\\t"
        elif c == 10:
            out += b"\\n"
        elif c == 13:
            out += b"\\r"
        elif 32 <= c < 127:
            out += ch
        else:
            out += b"\\x%02x" % c
    out += q
    return bytes(out)


class Py2Proto0Writer:
    """dict/list/str/int/float/None -> protocol 0 as Python 2's cPickle wrote it.

    str becomes a py2 `str` (UTF-8 bytes, opcode S); each dict/list/str gets a PUT (pN); an equal
    str seen again is fetched with GET (gN), as py2's memo did for the interned dict keys.
    """

    def __init__(self):
        self.out = bytearray()
        self.n = 0
        self.strmemo: dict[bytes, int] = {}

    def _put(self) -> int:
        i = self.n
        self.out += b"p%d\n" % i
        self.n += 1
        return i

    def save(self, x) -> None:
        if x is None:
            self.out += b"N"
        elif isinstance(x, bool):
            self.out += b"I01\n" if x else b"I00\n"
        elif isinstance(x, int):
            self.out += b"I%d\n" % x
        elif isinstance(x, float):
            self.out += b"F" + repr(x).encode() + b"\n"
        elif isinstance(x, str):
            b = x.encode("utf-8")
            if b in self.strmemo:
                self.out += b"g%d\n" % self.strmemo[b]
                return
            self.out += b"S" + py2_str_literal(b) + b"\n"
            self.strmemo[b] = self._put()
        elif isinstance(x, list):
            self.out += b"(l"
            self._put()
            for v in x:
                self.save(v)
                self.out += b"a"
        elif isinstance(x, dict):
            self.out += b"(d"
            self._put()
            for k, v in x.items():
                self.save(k)
                self.save(v)
                self.out += b"s"
        else:
            raise TypeError(type(x))

    def dumps(self, x) -> bytes:
        self.save(x)
        self.out += b"."
        return bytes(self.out)


def ascii_masked(proto0: bytes) -> bytes:
    """A protocol-0 pickle with every \\xNN escape >= 0x80 replaced by '?' (same opcodes).

    pickletools decodes the S literal as ASCII and fails on py2 str holding UTF-8; this copy is
    only for opcode listings.
    """
    return re.sub(rb"\\x[89a-f][0-9a-f]", b"?", proto0)


def _map_str(x, f):
    if isinstance(x, str):
        return f(x)
    if isinstance(x, list):
        return [_map_str(v, f) for v in x]
    if isinstance(x, dict):
        return {_map_str(k, f): _map_str(v, f) for k, v in x.items()}
    return x


def dump_py2_proto0(obj, path: Path) -> None:
    data = Py2Proto0Writer().dumps(obj)
    assert not data.startswith(b"\x80")
    # well-formed (memo consistent); pickletools cannot show non-ASCII py2 str, so mask those bytes
    pickletools.dis(ascii_masked(data), out=io.StringIO())
    back = pickle.loads(data, encoding="latin1")
    assert back == _map_str(obj, lambda s: s.encode("utf-8").decode("latin1"))
    if all(s.isascii() for s in _iter_str(obj)):
        assert back == obj
    assert pickle.loads(data, encoding="bytes") == _map_str(obj, lambda s: s.encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _iter_str(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, list):
        for v in x:
            yield from _iter_str(v)
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _iter_str(k)
            yield from _iter_str(v)


# --------------------------------------------------------------------------
# Row content
# --------------------------------------------------------------------------
def attri(**slots):
    """TransVG's 5th element: 8 (rN, [words]) parse slots, ['none'] where empty."""
    return [(f"r{i}", slots.get(f"r{i}", ["none"])) for i in range(1, 9)]


LONG_PHRASE = ("the man in the dark blue jacket who is standing behind the little girl with the red "
               "balloon near the fountain at the very left edge of the picture and is holding a black "
               "umbrella over his head while looking down at his phone with a frown")
assert len(LONG_PHRASE.split()) > 40

UNC_VAL = [
    # the real row quoted in CLIP-VG's data_loader.py
    ("COCO_train2014_000000000839.jpg", "482127.pth", [303.58, 69.03, 293.29, 425.79],
     "guy flopping around on the right",
     attri(r1=["guy"], r8=["right", "flopping", "around"])),
    # same image; int truncation matters: int(10.9)+int(30.9)=40 but x+w=41.8
    ("COCO_train2014_000000000839.jpg", "482128.pth", [10.9, 20.9, 30.9, 40.9],
     "LEFT GUY IN RED SHIRT", attri(r1=["guy"], r2=["red"], r8=["left"])),
    ("COCO_train2014_000000581857.jpg", "1719310.pth", [103.93, 299.99, 134.22, 177.42],
     "the café sign on the left", attri(r1=["sign"], r2=["café"], r8=["left"])),
    ("COCO_train2014_000000123456.jpg", "99887.pth", [0.99, 0.5, 99.99, 149.5],
     LONG_PHRASE, attri(r1=["man"], r2=["dark", "blue"], r8=["left"])),
    ("COCO_train2014_000000000042.jpg", "1001.pth", [100.0, 200.0, 50.0, 60.0],
     "zebra in the back", attri(r1=["zebra"], r8=["back"])),
    # truncation turns this into a zero-size box: [639, 479, 639, 479]
    ("COCO_train2014_000000000042.jpg", "1002.pth", [639.5, 479.5, 0.5, 0.5],
     "tiny dot in the corner", attri(r1=["dot"], r2=["tiny"], r8=["corner"])),
]

UNC_TESTA = [
    ("COCO_train2014_000000000110.jpg", "190841.pth", [242.88, 103.33, 195.23, 370.15],
     "woman in white", attri(r1=["woman"], r2=["white"])),
    ("COCO_train2014_000000000110.jpg", "190842.pth", [0.0, 87.71, 223.45, 392.29],
     "person left", attri(r1=["person"], r8=["left"])),
    ("COCO_train2014_000000000307.jpg", "455522.pth", [399.98, 12.01, 240.02, 415.99],
     "Man On Right With Glasses", attri(r1=["man"], r8=["right"])),
    ("COCO_train2014_000000000486.jpg", "1707045.pth", [5.5, 6.75, 0.25, 300.5],
     "the thin pole", attri(r1=["pole"], r2=["thin"])),
]

FLICKR_TEST = [
    ("1000092795.jpg", np.array([12.5, 34.25, 156.7, 278.9], np.float32), "two young guys"),
    ("1000092795.jpg", np.array([0.0, 0.0, 499.0, 374.0], np.float32), "shrubbery"),
    ("10002456.jpg", np.array([5, 17, 243, 333], np.int64), "several men in hard hats"),
    ("1000268201.jpg", np.array([1.5, 2.5, 300.75, 200.125], np.float64), "a child in a pink dress"),
    ("1000344755.jpg", np.array([99.9, 0.1, 100.9, 1.1], np.float32), "A MAN"),
]

FLICKR_VAL = [
    ("1018148011.jpg", np.array([101.3, 55.6, 240.8, 330.2], np.float32), "a dog"),
    ("1018148011.jpg", np.array([0.0, 300.0, 500.0, 333.0], np.float32), "the grass"),
    ("1029450589.jpg", np.array([17.9, 8.1, 88.2, 120.7], np.float32), "a woman's red hat"),
]

REFERIT_TEST = [
    ("12345.jpg", "12345_1.pth", [10, 20, 110, 220], "man on left", []),
    ("12345.jpg", "12345_2.pth", [10.5, 20.7, 100.2, 200.9], "SKY", []),
    ("8756.jpg", "8756_3.pth", [0, 0, 479, 359], "whole picture", []),
    ("20001.jpg", "20001_1.pth", [33.3, 44.4, 55.5, 66.6], "the rock in the center", []),
]


def _rect_poly(x, y, w, h):
    return [x, y, round(x + w, 2), y, round(x + w, 2), round(y + h, 2), x, round(y + h, 2)]


HIVG_TRAIN = [
    ("COCO_train2014_000000000839.jpg", {"height": 500, "width": 640}, [303.58, 69.03, 293.29, 425.79],
     "guy flopping around on the right",
     [[310.5, 72.1, 590.3, 75.6, 596.8, 490.2, 305.0, 494.8, 303.58, 300.0]]),
    ("COCO_train2014_000000581857.jpg", {"height": 480, "width": 640}, [10.9, 20.9, 30.9, 40.9],
     "Lady With The Umbrella", [_rect_poly(10.9, 20.9, 30.9, 40.9)]),
    # two polygons (an occluded object)
    ("COCO_train2014_000000000042.jpg", {"height": 640, "width": 480}, [100.25, 200.75, 50.5, 60.5],
     "zebra in the back",
     [[100.25, 200.75, 150.75, 200.75, 150.75, 230.0], [100.25, 240.0, 150.75, 240.0, 150.75, 261.25]]),
]

MIXUP_TRAIN = [  # stored order is shuffled across sources, as in HiVG's ref_data_shuffled
    ("COCO_train2014_000000000839.jpg", {"height": 500, "width": 640}, [303.58, 69.03, 293.29, 425.79],
     "guy flopping around on the right", [_rect_poly(303.58, 69.03, 293.29, 425.79)]),
    ("1000092795.jpg", "flickr", np.array([12.5, 34.25, 144.2, 244.65], np.float32), "two young guys", None),
    ("12345.jpg", "referit", [10, 20, 100, 200], "man on left", []),
    ("COCO_train2014_000000581857.jpg", {"height": 480, "width": 640}, [10.9, 20.9, 30.9, 40.9],
     "Lady With The Umbrella", [_rect_poly(10.9, 20.9, 30.9, 40.9)]),
    ("12345.jpg", "referit", [10.5, 20.7, 89.7, 180.2], "SKY", []),
    ("1000268201.jpg", "flickr", [1.5, 2.5, 299.25, 197.625], "a child in a pink dress", None),
]

# --- refer (lichengunc) -----------------------------------------------------
COCO_NAME = "COCO_train2014_%012d.jpg"


def _sent(sent_id, raw, sent=None):
    sent = sent if sent is not None else raw.lower().rstrip(".")
    return {"tokens": sent.split(), "raw": raw, "sent_id": sent_id, "sent": sent}


def _ref(ref_id, ann_id, cat, image_id, split, sents, suffix):
    return {"sent_ids": [s["sent_id"] for s in sents],
            "file_name": "COCO_train2014_%012d_%d.jpg" % (image_id, suffix),
            "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split,
            "sentences": sents, "category_id": cat}


REFCOCO_REFS = [
    _ref(0, 1719310, 1, 581857, "train",
         [_sent(0, "The lady with the blue shirt"), _sent(1, "lady w back to us")], 16),
    _ref(1, 1719311, 3, 581857, "val", [_sent(2, "Car on the RIGHT.", "car on the right")], 17),
    _ref(2, 482127, 1, 839, "testA",
         [_sent(3, "guy flopping around on the right"), _sent(4, "GUY RIGHT", "guy right")], 3),
    _ref(3, 99001, 44, 123456, "testB", [_sent(5, "the café sign on the left")], 1),
    _ref(4, 99002, 44, 123456, "train", [_sent(6, "bottle, far right", "bottle far right")], 2),
]

REFCOCO_INSTANCES = {
    "images": [
        {"id": 581857, "file_name": COCO_NAME % 581857, "height": 480, "width": 640},
        {"id": 839, "file_name": COCO_NAME % 839, "height": 500, "width": 640},
        {"id": 123456, "file_name": COCO_NAME % 123456, "height": 640, "width": 480},
        {"id": 42, "file_name": COCO_NAME % 42, "height": 375, "width": 500},  # no ref uses it
    ],
    "annotations": [
        {"id": 1719310, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.42], "category_id": 1,
         "area": 23812.5, "iscrowd": 0, "segmentation": [_rect_poly(103.93, 299.99, 134.22, 177.42)]},
        {"id": 1719311, "image_id": 581857, "bbox": [0.0, 10.9, 30.9, 40.9], "category_id": 3,
         "area": 1263.81, "iscrowd": 0, "segmentation": [_rect_poly(0.0, 10.9, 30.9, 40.9)]},
        {"id": 482127, "image_id": 839, "bbox": [303.58, 69.03, 293.29, 425.79], "category_id": 1,
         "area": 124879.95, "iscrowd": 0, "segmentation": [_rect_poly(303.58, 69.03, 293.29, 425.79)]},
        {"id": 99001, "image_id": 123456, "bbox": [0.99, 0.5, 99.99, 149.5], "category_id": 44,
         "area": 14948.5, "iscrowd": 0, "segmentation": [_rect_poly(0.99, 0.5, 99.99, 149.5)]},
        {"id": 99002, "image_id": 123456, "bbox": [400.5, 100.25, 79.5, 200.0], "category_id": 44,
         "area": 15900.0, "iscrowd": 0, "segmentation": [_rect_poly(400.5, 100.25, 79.5, 200.0)]},
        {"id": 5, "image_id": 42, "bbox": [1.0, 2.0, 3.0, 4.0], "category_id": 1,
         "area": 12.0, "iscrowd": 0, "segmentation": [_rect_poly(1.0, 2.0, 3.0, 4.0)]},
    ],
    "categories": [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
        {"id": 44, "name": "bottle", "supercategory": "kitchen"},
    ],
}

REFCOCOG_REFS = [  # py2 str: raw has a ', a " and ', and UTF-8 bytes; sent stays ASCII
    _ref(0, 1805627, 1, 380440, "train",
         [_sent(10, "A man's hat on the left side.", "a man's hat on the left side"),
          _sent(11, 'The "big" man\'s coat.', "the big man's coat")], 9),
    _ref(1, 1805628, 18, 380440, "val", [_sent(12, "A brown dog lying on a café chair.",
                                               "a brown dog lying on a cafe chair")], 10),
    _ref(2, 2001, 1, 1337, "test", [_sent(13, "woman in black\twith a bag", "woman in black with a bag")], 1),
]

REFCOCOG_INSTANCES = {
    "images": [
        {"id": 380440, "file_name": COCO_NAME % 380440, "height": 500, "width": 375},
        {"id": 1337, "file_name": COCO_NAME % 1337, "height": 480, "width": 640},
    ],
    "annotations": [
        {"id": 1805627, "image_id": 380440, "bbox": [12.34, 56.78, 90.12, 345.67], "category_id": 1,
         "area": 31151.78, "iscrowd": 0, "segmentation": [_rect_poly(12.34, 56.78, 90.12, 345.67)]},
        {"id": 1805628, "image_id": 380440, "bbox": [150.0, 300.5, 200.25, 150.125], "category_id": 18,
         "area": 30062.53, "iscrowd": 0, "segmentation": [_rect_poly(150.0, 300.5, 200.25, 150.125)]},
        {"id": 2001, "image_id": 1337, "bbox": [320.9, 0.1, 100.1, 479.8], "category_id": 1,
         "area": 48027.98, "iscrowd": 0, "segmentation": [_rect_poly(320.9, 0.1, 100.1, 479.8)]},
    ],
    "categories": [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 18, "name": "dog", "supercategory": "animal"},
    ],
}


# --------------------------------------------------------------------------
# Expected outputs (computed from the files as Python reads them back)
# --------------------------------------------------------------------------
def transvg_int_box(bbox, xywh: bool):
    """TransVG / HiVG pull_item, verbatim."""
    if xywh:
        bbox = np.array(bbox, dtype=int)
        bbox[2], bbox[3] = bbox[0] + bbox[2], bbox[1] + bbox[3]
    else:
        bbox = np.array(bbox, dtype=int)
    return [int(v) for v in bbox]


def expected_rows(rows, kind: str):
    """kind: coco (unc/unc+/gref/hivg), referit, flickr, mixup."""
    out = []
    for i, row in enumerate(rows):
        if kind == "flickr":
            img, bbox, phrase = row
            extra = {}
        else:
            img, e1, bbox, phrase, e4 = row
            extra = {"elem1": to_json(e1), "elem4": to_json(e4)}
        raw = [float(v) for v in (bbox.tolist() if isinstance(bbox, np.ndarray) else bbox)]
        assert len(raw) == 4 and all(math.isfinite(v) for v in raw)
        xywh = kind in ("coco", "mixup")  # HiVG converts every mixup row (dataset name is 'mixup')
        xyxy = [raw[0], raw[1], raw[0] + raw[2], raw[1] + raw[3]] if xywh else list(raw)
        rec = {"row": i, "image": img, "expr": phrase, "bbox_raw": raw, "bbox_xyxy": xyxy,
               "bbox_int_xyxy": transvg_int_box(bbox, xywh), "extra": extra}
        if kind == "mixup":
            if img.split("_")[0] == "COCO":
                rec["source"] = "coco"
            elif e1 in ("flickr", "referit"):
                rec["source"] = e1
            else:
                raise ValueError(img)
        out.append(rec)
    return out


def expected_refer(refs, instances):
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    out = []
    for ref in refs:
        ann = anns[ref["ann_id"]]
        im = images[ref["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        for s in ref["sentences"]:
            out.append({"image": im["file_name"], "expr": s["sent"], "bbox_raw": [x, y, w, h],
                        "bbox_xyxy": [x, y, x + w, y + h], "width": im["width"], "height": im["height"],
                        "image_id": ref["image_id"], "ann_id": ref["ann_id"], "ref_id": ref["ref_id"],
                        "sent_id": s["sent_id"], "category_id": ref["category_id"], "split": ref["split"]})
    return out


def _same(a, b) -> bool:
    """Deep equality for rows read back (numpy arrays compared by dtype and values)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------
# Hostile files
# --------------------------------------------------------------------------
class Evil:
    """Pickles as a call to os.system. Pickling it runs nothing; only unpickling would."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def write_hostile(out: Path, good_zip: Path, good_legacy: Path) -> list[dict]:
    h = out / "hostile"
    h.mkdir(parents=True, exist_ok=True)
    notes = []

    zb = good_zip.read_bytes()
    (h / "truncated.pth").write_bytes(zb[: len(zb) // 2])
    notes.append({"file": "truncated.pth", "container": "zip",
                  "defect": f"first {len(zb) // 2} of {len(zb)} bytes of unc/unc_val.pth (no central directory)"})

    lb = good_legacy.read_bytes()
    n = len(lb) * 6 // 10
    (h / "legacy_truncated.pth").write_bytes(lb[:n])
    notes.append({"file": "legacy_truncated.pth", "container": "legacy",
                  "defect": f"first {n} of {len(lb)} bytes of unc/unc_testA.pth (object pickle cut, no STOP)"})

    # A legacy file whose first pickle is a well-formed LONG1 that is not torch's magic number.
    assert lb[:4] == b"\x80\x02\x8a\x0a"
    magic = lb[4:14]
    assert int.from_bytes(magic, "little") == 0x1950A86A20F9469CFC6C
    bad = lb[:4] + bytes(reversed(magic)) + lb[14:]
    assert not bad.startswith(b"PK")
    (h / "bad_magic.pth").write_bytes(bad)
    notes.append({"file": "bad_magic.pth", "container": "neither",
                  "defect": "unc/unc_testA.pth with the 10 magic bytes reversed: not PK\\x03\\x04, and the first "
                            "pickle is LONG1 0x%x instead of 0x1950a86a20f9469cfc6c"
                            % int.from_bytes(bytes(reversed(magic)), "little")})

    good_row = UNC_VAL[0]
    save_zip([good_row, Evil()], h / "evil_global.pth")
    with zipfile.ZipFile(h / "evil_global.pth") as z:
        pkl = z.read("evil_global/data.pkl")
    assert b"cposix\nsystem\n" in pkl, pkl
    notes.append({"file": "evil_global.pth", "container": "zip",
                  "defect": "row 1 is REDUCE of GLOBAL 'posix system' with ('echo pwned',); protocol 2"})

    save_zip([good_row, Evil()], h / "evil_stack_global.pth", protocol=4)
    with zipfile.ZipFile(h / "evil_stack_global.pth") as z:
        pkl = z.read("evil_stack_global/data.pkl")
    ops = [op.name for op, _, _ in pickletools.genops(pkl)]
    assert "STACK_GLOBAL" in ops and b"posix" in pkl and b"system" in pkl
    notes.append({"file": "evil_stack_global.pth", "container": "zip",
                  "defect": "the same call as evil_global.pth with pickle protocol 4: "
                            "SHORT_BINUNICODE 'posix', 'system', STACK_GLOBAL"})

    rows = [UNC_VAL[0], UNC_VAL[1][:4], UNC_VAL[2]]
    save_zip(rows, h / "bad_arity.pth")
    notes.append({"file": "bad_arity.pth", "container": "zip", "bad_row": 1,
                  "defect": "unc rows; row 1 is a 4-tuple (no attri)"})

    rows = [UNC_VAL[0], (UNC_VAL[1][0], UNC_VAL[1][1], [10.0, float("nan"), 30.0, 40.0]) + UNC_VAL[1][3:],
            UNC_VAL[2]]
    save_zip(rows, h / "nan_box.pth")
    notes.append({"file": "nan_box.pth", "container": "zip", "bad_row": 1, "defect": "box y is NaN"})

    rows = [UNC_VAL[0], UNC_VAL[1], (UNC_VAL[2][0], UNC_VAL[2][1], [50.0, 60.0, -20.0, 30.0]) + UNC_VAL[2][3:]]
    save_zip(rows, h / "negative_box.pth")
    notes.append({"file": "negative_box.pth", "container": "zip", "bad_row": 2,
                  "defect": "box width is -20.0 (xywh)"})

    refs = [dict(r) for r in REFCOCO_REFS[:3]]
    del refs[1]["sentences"]
    with open(h / "bad_refs.p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    notes.append({"file": "bad_refs.p", "container": "pickle protocol 2", "bad_row": 1,
                  "defect": "ref index 1 (ref_id 1) has no 'sentences' key"})

    write_json(h / "hostile.expected.json", notes)
    return notes


# --------------------------------------------------------------------------
# Opcode report
# --------------------------------------------------------------------------
def pickles_in(path: Path):
    """Yield (label, bytes-or-stream position info) for each pickle in a fixture."""
    data = path.read_bytes()
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                name = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
                yield name, z.read(name)
        except zipfile.BadZipFile as e:
            yield "unreadable zip: " + str(e), None
        return
    if not data.startswith(b"\x80"):  # protocol 0 (Python 2 refs): one pickle, text opcodes
        yield "protocol-0 pickle", data
        return
    f = io.BytesIO(data)
    k = 0
    while f.tell() < len(data):
        start = f.tell()
        try:
            ops = list(pickletools.genops(f))
        except Exception as e:  # noqa: BLE001
            yield f"pickle {k} at byte {start}: cut ({e})", data[start:]
            return
        yield f"pickle {k} at bytes {start}..{f.tell()}", data[start:f.tell()]
        k += 1


def scan_ops(pkl: bytes):
    if not pkl.startswith(b"\x80"):
        pkl = ascii_masked(pkl)
    names, globs = set(), set()
    strs = []  # STACK_GLOBAL takes module and name from the two strings pushed just before it
    try:
        for op, arg, _ in pickletools.genops(pkl):
            names.add(op.name)
            if op.name == "GLOBAL":
                globs.add(arg.replace(" ", "."))
            if isinstance(arg, str) and op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strs.append(arg)
            if op.name == "STACK_GLOBAL":
                globs.add(f"{strs[-2]}.{strs[-1]} (STACK_GLOBAL)")
    except Exception:  # noqa: BLE001 - truncated hostile files
        names.add("<truncated>")
    return names, globs


def report(out: Path, files: list[Path]) -> None:
    good_ops, bad_ops, good_g, bad_g = set(), set(), {}, {}
    print("\n# pickles per file")
    for p in files:
        if p.suffix not in (".pth", ".p"):
            continue
        rel = p.relative_to(out).as_posix()
        hostile = rel.startswith("hostile/")
        for label, pkl in pickles_in(p):
            if pkl is None:
                print(f"  {rel}: {label}")
                continue
            names, globs = scan_ops(pkl)
            (bad_ops if hostile else good_ops).update(names)
            for g in globs:
                (bad_g if hostile else good_g).setdefault(g, set()).add(rel)
            print(f"  {rel}: {label}, {len(pkl)} bytes" + (f", globals {sorted(globs)}" if globs else ""))
    print("\n# distinct opcodes, non-hostile fixtures:\n  " + " ".join(sorted(good_ops)))
    print("# globals, non-hostile fixtures:")
    for g, fs in sorted(good_g.items()):
        print(f"  {g}: {', '.join(sorted(fs))}")
    print("# opcodes only in hostile files:\n  " + " ".join(sorted(bad_ops - good_ops)))
    print("# globals, hostile files:")
    for g, fs in sorted(bad_g.items()):
        print(f"  {g}: {', '.join(sorted(fs))}")


# --------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-report", action="store_true", help="skip the pickle opcode report")
    args = ap.parse_args()
    out: Path = args.out
    _check_v1_pickler()

    rows_count: dict[str, int] = {}

    def pth(rel: str, rows, kind: str, container: str, **kw):
        p = out / rel
        if container == "zip":
            save_zip(rows, p, **kw)
        else:
            save_legacy(rows, p, **kw)
        back = load_pth(p)
        assert isinstance(back, list) and _same(list(rows), back), rel
        write_json(p.with_name(p.name + ".expected.json"), expected_rows(back, kind))
        rows_count[rel] = len(back)

    pth("unc/unc_val.pth", UNC_VAL, "coco", "zip")
    pth("unc/unc_testA.pth", UNC_TESTA, "coco", "legacy")
    pth("flickr/flickr_test.pth", FLICKR_TEST, "flickr", "zip")
    pth("flickr/flickr_val.pth", FLICKR_VAL, "flickr", "legacy", pickle_module=NUMPY_V1_PICKLE)
    pth("referit/referit_test.pth", REFERIT_TEST, "referit", "zip", via_buffer=True)
    pth("hivg/unc_train.pth", HIVG_TRAIN, "coco", "zip")
    pth("mixup/mixup_train.pth", MIXUP_TRAIN, "mixup", "zip", pickle_module=NUMPY_V1_PICKLE)

    # refer
    rc = out / "refer" / "refcoco"
    rc.mkdir(parents=True, exist_ok=True)
    with open(rc / "refs(unc).p", "wb") as f:
        pickle.dump(REFCOCO_REFS, f, protocol=2)
    write_json(rc / "instances.json", REFCOCO_INSTANCES)
    with open(rc / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    assert refs == REFCOCO_REFS
    with open(rc / "instances.json", encoding="utf-8") as f:
        inst = json.load(f)
    exp = expected_refer(refs, inst)
    write_json(rc / "refs(unc).p.expected.json", exp)
    rows_count["refer/refcoco/refs(unc).p"] = len(exp)

    rg = out / "refer" / "refcocog"
    dump_py2_proto0(REFCOCOG_REFS, rg / "refs(umd).p")
    write_json(rg / "instances.json", REFCOCOG_INSTANCES)
    with open(rg / "refs(umd).p", "rb") as f:  # what refer.py does under Python 3 (latin1 for py2 str)
        refs = pickle.load(f, encoding="latin1")
    with open(rg / "instances.json", encoding="utf-8") as f:
        inst = json.load(f)
    exp = expected_refer(refs, inst)
    assert all(e["expr"].isascii() for e in exp)  # latin1 vs utf-8 does not matter for sent
    write_json(rg / "refs(umd).p.expected.json", exp)
    rows_count["refer/refcocog/refs(umd).p"] = len(exp)

    write_hostile(out, out / "unc" / "unc_val.pth", out / "unc" / "unc_testA.pth")

    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = 0
    print(f"{'file':<48} {'bytes':>7} {'rows':>5}  sha256[:16]")
    for p in files:
        rel = p.relative_to(out).as_posix()
        n = p.stat().st_size
        total += n
        rows = rows_count.get(rel, "")
        print(f"{rel:<48} {n:>7} {rows!s:>5}  {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")
    print(f"{'total':<48} {total:>7}")
    assert total < 150_000, total
    if not args.no_report:
        report(out, files)


if __name__ == "__main__":
    sys.exit(main())
