#!/usr/bin/env python3
"""Golden fixtures for initialising groundkit's QRNet Swin-S backbone from an mmdet 2.11 / mmcv 1.3 detector file.

QRNet (LukeForeverYoung/QRNet) released no grounding model, only Swin Mask R-CNN detector checkpoints
(/work/shared/checkpoints.md Part B §1.2). This writes a tiny random detector file in exactly that layout and the
backbone features our transcription (mmdet_swin_ref.py) computes from it, into tests/fixtures/mmdet_swin/:

  mask_rcnn_swin_mini.pth  mmcv training checkpoint as Swin-Transformer-Object-Detection's EpochBasedRunnerAmp +
                           mmcv_custom.save_checkpoint write it (QRNet vendors that code; its `unc_latest.pth` is
                           such a `latest.pth`): zip container with entries under `archive/` (torch.save into an
                           open file), top level {'meta', 'state_dict', 'optimizer', 'amp'}; state_dict storages
                           tagged 'cpu' (mmcv's weights_to_cpu; a fresh OrderedDict, no `_metadata`), optimizer
                           storages 'cuda:0'. Swin-S-shaped at tiny widths: embed_dim 4, depths [2,2,4,2], heads
                           [1,2,4,8], window 7, FPN width 16; random weights (seed below).
  io.safetensors           F32: `pixels` [1,3,S,S] (wide_500x281.png preprocessed as QRNet does, S = SIDE),
                           `stage{i}` [1,C_i,H_i,W_i] (after norm{i}), `lateral{i}` [1,16,H_i,W_i] (neck lateral
                           1x1 conv, bias, no norm); `odd.*` the same for a random [1,3,37,50] input (patch
                           padding, odd PatchMerging, non-square); `debug.*` intermediates of the main input:
                           `debug.patch_embed` [1,C0,H0,W0] (after its LayerNorm), `debug.stage0.block{j}` [1,H0*W0,C0]
                           (block outputs, j=0 W-MSA, j=1 SW-MSA), `debug.merge0` [1,H1*W1,2*C0] (PatchMerging).
  cases.json               schema below.

cases.json (schema 1):
  {"schema": 1, "generator", "seed", "sources": {name: {"repo", "commit", "path"}},
   "config": SwinDetConfig.to_dict() (embed_dim, depths, num_heads, window_size, patch_size, mlp_ratio, in_chans,
             qkv_bias, ape, patch_norm, out_indices, neck_out_channels, rpn_feat_channels, num_anchors,
             bbox_fc_out_channels, bbox_roi_feat_size, mask_conv_out_channels, mask_num_convs, num_classes,
             num_features, head_dims, layer_norm_eps, shift_size, shift_mask_value, gelu),
   "checkpoint": {"file", "bytes", "sha256", "container": "zip", "zip_prefix": "archive", "zip_records": [names],
                  "pickle_protocol": 2, "pickle_globals": ["module name", ...] (every GLOBAL in data.pkl, sorted),
                  "top_level": [keys], "storage_locations": {"state_dict": "cpu", "optimizer": "cuda:0"},
                  "meta": {key: JSON value; "config" and "env_info" as {"chars", "sha256", "head"}},
                  "meta_key_order": [...], "amp": {...},
                  "optimizer": {"type": "AdamW (torch 1.10)", "n_state", "n_param_groups", "step" (int),
                                "state_keys", "group_keys": [[keys of group 0], ...distinct key orders],
                                "example_groups": {param name: group without params}},
                  "n_tensors", "n_values", "n_storages"},
   "state_dict": [{"key", "shape", "dtype" ("float32"|"int64"), "backbone_init": bool}, ...] in file order,
   "backbone_init": {"prefixes": ["backbone.", "neck.lateral_convs."], "n_used", "n_unused", "n_values_used",
                     "unused_prefixes": [...], "not_in_file": "what QRNet's own model has that the file lacks"},
   "image": {"file" (relative to the repo root), "width", "height", "side", "ratio", "new_w", "new_h", "top",
             "left", "mean", "std", "resize", "pad"},
   "io": {"file", "tensors": {name: {"shape", "dtype"}}, "cases": {"main"|"odd": {"input_hw", "stage_hw":
          [[H_i, W_i]...], "window_padded_hw": [[Hp_i, Wp_i]...], "patch_padded_hw"}}}}

Checks made on every run: our preprocessing equals torchvision's functional path bit for bit (transvg_ref),
torch.load gives back every tensor, location tags and zip prefix as intended, the dir stays < 1.5 MB, and, when
the mirrors are present (/work/.mirror/...), the original SwinTransformer class of Swin-Transformer-Object-Detection
and of QRNet (imported from the mirror bytes with stub mmcv_custom/mmdet/timm modules) loads our backbone
state_dict strictly with the same key order and gives the same features (max |diff| printed; also at a 320
canvas). --verify-stable regenerates into a temporary folder and asserts identical bytes.

Run (reference venv, CPU, a few seconds):
    .venv-ref/bin/python tools/reference/make_mmdet_swin_fixtures.py [--out DIR] [--verify-stable] [--no-original]
        [--legacy-out DIR]   # also the same object in the legacy container (1.1 MB, not committed)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pickletools
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mmdet_swin_ref as M  # noqa: E402
from common import assert_same_files  # noqa: E402
import transvg_ref as T  # noqa: E402  (QRNet's test transforms are TransVG's: prepare_image)

ROOT = HERE.parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "mmdet_swin"
IMAGE = Path("tests/fixtures/transvg/images/wide_500x281.png")  # relative to ROOT, read in place
SIDE = 88          # canvas side (QRNet: 640); 88 -> stages 22, 11, 6, 3: all window-padded (28, 14, 7, 7), 11 odd
ODD_HW = (37, 50)  # patch pad -> 40x52 -> stages 10x13, 5x7, 3x4, 2x2 (odd merges at every step)
SEED = 20220603
THREADS = 2
MAX_DIR_BYTES = 1_500_000
CKPT = "mask_rcnn_swin_mini.pth"
LEGACY = "mask_rcnn_swin_mini_legacy.pth"

CFG = M.SwinDetConfig(embed_dim=4, depths=[2, 2, 4, 2], num_heads=[1, 2, 4, 8], window_size=7, patch_size=4,
                      neck_out_channels=16, rpn_feat_channels=16, bbox_fc_out_channels=4,
                      mask_conv_out_channels=4)

# Training schedule of the Swin detector configs (AdamW lr 1e-4, wd 0.05, steps [27, 33], 36 epochs); the
# iteration counts, dates, paths, hash and loss scale below are invented but of the real kind.
BASE_LR, BASE_WD, EPOCH, ITERS_PER_EPOCH, SKIPPED = 1e-4, 0.05, 36, 7330, 17
EXP = "mask_rcnn_swin_mini_patch4_window7_mstrain_480-800_adamw_3x_coco"
WORK_DIR = f"./work_dirs/{EXP}"


# --------------------------------------------------------------------------
# meta, as EpochBasedRunnerAmp.save_checkpoint + mmcv_custom save_checkpoint build it at epoch >= 2
# --------------------------------------------------------------------------
def config_pretty_text(cfg: M.SwinDetConfig) -> str:
    """A mmcv Config.pretty_text of the tiny config (what tools/train.py stores as meta['config'])."""
    f = cfg.num_features
    return f"""model = dict(
    type='MaskRCNN',
    pretrained=None,
    backbone=dict(
        type='SwinTransformer',
        embed_dim={cfg.embed_dim},
        depths={cfg.depths},
        num_heads={cfg.num_heads},
        window_size={cfg.window_size},
        mlp_ratio={cfg.mlp_ratio},
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        ape=False,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        use_checkpoint=False),
    neck=dict(
        type='FPN',
        in_channels={f},
        out_channels={cfg.neck_out_channels},
        num_outs=5),
    rpn_head=dict(
        type='RPNHead',
        in_channels={cfg.neck_out_channels},
        feat_channels={cfg.rpn_feat_channels},
        anchor_generator=dict(
            type='AnchorGenerator',
            scales=[8],
            ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels={cfg.neck_out_channels},
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels={cfg.neck_out_channels},
            fc_out_channels={cfg.bbox_fc_out_channels},
            roi_feat_size={cfg.bbox_roi_feat_size},
            num_classes={cfg.num_classes},
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        mask_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
            out_channels={cfg.neck_out_channels},
            featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead',
            num_convs={cfg.mask_num_convs},
            in_channels={cfg.neck_out_channels},
            conv_out_channels={cfg.mask_conv_out_channels},
            num_classes={cfg.num_classes},
            loss_mask=dict(
                type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=256,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(
            nms_pre=2000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=512,
                pos_fraction=0.25,
                neg_pos_ub=-1,
                add_gt_as_proposals=True),
            mask_size=28,
            pos_weight=-1,
            debug=False)),
    test_cfg=dict(
        rpn=dict(
            nms_pre=1000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.5),
            max_per_img=100,
            mask_thr_binary=0.5)))
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
data = dict(
    samples_per_gpu=2,
    workers_per_gpu=2,
    train=dict(
        type='CocoDataset',
        ann_file='data/coco/annotations/instances_train2017.json',
        img_prefix='data/coco/train2017/'),
    val=dict(
        type='CocoDataset',
        ann_file='data/coco/annotations/instances_val2017.json',
        img_prefix='data/coco/val2017/'),
    test=dict(
        type='CocoDataset',
        ann_file='data/coco/annotations/instances_val2017.json',
        img_prefix='data/coco/val2017/'))
evaluation = dict(metric=['bbox', 'segm'])
optimizer = dict(
    type='AdamW',
    lr={BASE_LR},
    betas=(0.9, 0.999),
    weight_decay={BASE_WD},
    paramwise_cfg=dict(
        custom_keys=dict(
            absolute_pos_embed=dict(decay_mult=0.0),
            relative_position_bias_table=dict(decay_mult=0.0),
            norm=dict(decay_mult=0.0))))
optimizer_config = dict(
    type='DistOptimizerHook',
    update_interval=1,
    grad_clip=None,
    coalesce=True,
    bucket_size_mb=-1,
    use_fp16=True)
lr_config = dict(
    policy='step',
    warmup='linear',
    warmup_iters=500,
    warmup_ratio=0.001,
    step=[27, 33])
runner = dict(type='EpochBasedRunnerAmp', max_epochs={EPOCH})
checkpoint_config = dict(interval=1)
log_config = dict(interval=50, hooks=[dict(type='TextLoggerHook')])
custom_hooks = [dict(type='NumClassCheckHook')]
dist_params = dict(backend='nccl')
log_level = 'INFO'
load_from = None
resume_from = None
workflow = [('train', 1)]
fp16 = None
work_dir = '{WORK_DIR}'
gpu_ids = range(0, 8)
"""


ENV_INFO = """sys.platform: linux
Python: 3.8.10 (default, Jun  4 2021, 15:09:15) [GCC 7.5.0]
CUDA available: True
GPU 0,1,2,3,4,5,6,7: NVIDIA GeForce RTX 3090
CUDA_HOME: /usr/local/cuda
NVCC: Build cuda_11.3.r11.3/compiler.29920130_0
GCC: gcc (Ubuntu 7.5.0-3ubuntu1~18.04) 7.5.0
PyTorch: 1.10.2
PyTorch compiling details: PyTorch built with:
  - GCC 7.3
  - C++ Version: 201402
  - Intel(R) oneAPI Math Kernel Library Version 2021.4-Product Build 20210904 for Intel(R) 64 architecture applications
  - OpenMP 201511 (a.k.a. OpenMP 4.5)
  - CUDA Runtime 11.3
  - CuDNN 8.2
  - Magma 2.5.2

TorchVision: 0.11.3
OpenCV: 4.5.5
MMCV: 1.3.18
MMCV Compiler: GCC 7.3
MMCV CUDA Compiler: 11.3
MMDetection: 2.11.0+"""


def build_meta(cfg: M.SwinDetConfig) -> dict:
    # CheckpointHook's meta (tools/train.py: mmdet_version = __version__ + get_git_hash()[:7], CLASSES), then
    # EpochBasedRunnerAmp: update(epoch, iter), update(runner.meta: env_info, config, seed, exp_name, hook_msgs
    # (added by CheckpointHook after the first save, so it lands after mmcv_version/time from epoch 2 on)),
    # then mmcv_custom.save_checkpoint: update(mmcv_version, time), update(CLASSES).
    git7 = "c7b2011"
    meta = {"mmdet_version": "2.11.0" + git7, "CLASSES": M.COCO_CLASSES,
            "epoch": EPOCH, "iter": EPOCH * ITERS_PER_EPOCH,
            "env_info": ENV_INFO + git7, "config": config_pretty_text(cfg), "seed": None,
            "exp_name": EXP + ".py", "mmcv_version": "1.3.18", "time": "Thu Mar 10 21:47:03 2022",
            "hook_msgs": {"last_ckpt": f"{WORK_DIR}/epoch_{EPOCH - 1}.pth"}}
    return meta


def build_checkpoint(model: M.MaskRCNN, gen: torch.Generator) -> dict:
    sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())
    current_lr = BASE_LR * (0.1 ** 2)  # StepLrUpdaterHook after both steps
    opt = M.adamw_torch110_state_dict(model, gen, base_lr=BASE_LR, base_wd=BASE_WD, current_lr=current_lr,
                                      step=EPOCH * ITERS_PER_EPOCH - SKIPPED)
    amp = OrderedDict([("loss_scaler0", {"loss_scale": 1024.0, "unskipped": 1863})])  # apex.amp.state_dict()
    return {"meta": build_meta(model.backbone.cfg), "state_dict": sd, "optimizer": opt, "amp": amp}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    """indent=1, but lists of scalars, and dicts whose values are scalars or lists of scalars, on one line."""

    def flat(x) -> bool:
        scalar = (str, int, float, bool, type(None))
        if isinstance(x, list):
            return all(isinstance(v, scalar) for v in x)
        if isinstance(x, dict):
            return all(isinstance(v, scalar) or (isinstance(v, list) and flat(v)) for v in x.values())
        return True

    def emit(x, ind: int) -> str:
        if flat(x) and not (isinstance(x, dict) and len(json.dumps(x)) > 160):
            return json.dumps(x, ensure_ascii=False)
        pad, inner = " " * ind, " " * (ind + 1)
        if isinstance(x, list):
            return "[\n" + ",\n".join(inner + emit(v, ind + 1) for v in x) + "\n" + pad + "]"
        items = [inner + json.dumps(k, ensure_ascii=False) + ": " + emit(v, ind + 1) for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"

    text = emit(obj, 0)
    assert json.loads(text) == json.loads(json.dumps(obj))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=False)


def pickle_scan(path: Path) -> dict:
    """GLOBALs, protocol and storage locations of a torch zip's data.pkl (pickletools, no unpickling)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = z.read([n for n in names if n.endswith("/data.pkl")][0])
    globals_, protocol, strings, ops = set(), None, [], []
    for op, arg, _ in pickletools.genops(pkl):
        ops.append(op.name)
        if op.name == "PROTO":
            protocol = arg
        elif op.name == "GLOBAL":
            globals_.add(arg.replace("\n", " ") if "\n" in arg else arg)
        elif op.name == "STACK_GLOBAL":
            raise AssertionError("protocol-2 torch pickles use GLOBAL")
        if isinstance(arg, str):
            strings.append(arg)
    return {"names": names, "globals": sorted(globals_), "protocol": protocol, "strings": strings,
            "opcodes": sorted(set(ops))}


def check_file(path: Path, obj: dict) -> dict:
    scan = pickle_scan(path)
    assert all(n.startswith("archive/") for n in scan["names"]), scan["names"][:3]
    back = load(path)
    assert list(back) == list(obj)
    assert list(back["state_dict"]) == list(obj["state_dict"])
    for k, v in obj["state_dict"].items():
        b = back["state_dict"][k]
        assert b.dtype == v.dtype and torch.equal(b, v), k
    assert back["meta"] == obj["meta"] and back["amp"] == obj["amp"]
    assert back["optimizer"]["param_groups"] == obj["optimizer"]["param_groups"]
    for i, st in obj["optimizer"]["state"].items():
        assert back["optimizer"]["state"][i]["step"] == st["step"] and isinstance(st["step"], int)
        assert torch.equal(back["optimizer"]["state"][i]["exp_avg"], st["exp_avg"])
    # location tags: 'cpu' for the weights, 'cuda:0' for the optimizer state (the persistent ids carry them)
    locs = storage_locations_by_place(path)
    assert set(locs["state_dict"]) == {"cpu"} and len(locs["state_dict"]) == len(obj["state_dict"])
    assert set(locs["optimizer"]) == {"cuda:0"} and len(locs["optimizer"]) == 2 * len(obj["optimizer"]["state"])
    assert "_metadata" not in scan["strings"], "mmcv's weights_to_cpu state_dict has no _metadata"
    return scan


def storage_locations_by_place(path: Path) -> dict[str, list[str]]:
    """Unpickle data.pkl with only the allow-listed globals, tensors replaced by their storage's location tag."""
    import io
    import pickle

    class Loader(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, *args: ("tensor", storage)
            if module == "torch" and name.endswith("Storage"):
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

        def persistent_load(self, pid):
            assert pid[0] == "storage" and len(pid) == 5, pid
            return pid[3]

    with zipfile.ZipFile(path) as z:
        pkl = z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0])
    obj = Loader(io.BytesIO(pkl)).load()

    def tags(x):
        if isinstance(x, tuple) and len(x) == 2 and x[0] == "tensor":
            return [x[1]]
        if isinstance(x, dict):
            return [t for v in x.values() for t in tags(v)]
        if isinstance(x, (list, tuple)):
            return [t for v in x for t in tags(v)]
        return []

    return {k: tags(v) for k, v in obj.items()}


def stage_geometry(h: int, w: int, cfg: M.SwinDetConfig) -> dict:
    p, ws = cfg.patch_size, cfg.window_size
    hh, ww = -(-h // p), -(-w // p)
    stages, padded = [], []
    for _ in cfg.depths:
        stages.append([hh, ww])
        padded.append([-(-hh // ws) * ws, -(-ww // ws) * ws])
        hh, ww = (hh + 1) // 2, (ww + 1) // 2
    return {"input_hw": [h, w], "patch_padded_hw": [-(-h // p) * p, -(-w // p) * p], "stage_hw": stages,
            "window_padded_hw": padded}


@torch.no_grad()
def run_case(model: M.MaskRCNN, pixels: torch.Tensor, prefix: str, debug: bool) -> OrderedDict:
    io = OrderedDict()
    io[f"{prefix}pixels"] = pixels
    stages, lats = model.features(pixels)
    for i, s in enumerate(stages):
        io[f"{prefix}stage{i}"] = s
    for i, l in enumerate(lats):
        io[f"{prefix}lateral{i}"] = l
    if debug:
        bb = model.backbone
        x = bb.patch_embed(pixels)
        io["debug.patch_embed"] = x
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        layer = bb.layers[0]
        hp, wp = (-(-hw[0] // layer.window) * layer.window, -(-hw[1] // layer.window) * layer.window)
        mask = M.shift_attention_mask(hp, wp, layer.window, layer.shift)
        for j, blk in enumerate(layer.blocks):
            x = blk(x, hw, mask)
            io[f"debug.stage0.block{j}"] = x
        io["debug.merge0"] = layer.downsample(x, hw)
    return io


def cross_check(model: M.MaskRCNN, inputs: dict[str, torch.Tensor]) -> dict:
    """Our backbone vs the original SwinTransformer classes (strict load, key order, outputs)."""
    bsd = OrderedDict((k[len("backbone."):], v) for k, v in model.state_dict().items() if k.startswith("backbone."))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which, (git_dir, rel) in M.MIRRORS.items():
            if not git_dir.exists():
                print(f"note: no mirror {git_dir}; skipping the {which} cross-check")
                continue
            mod, commit = M.load_original_swin(which, Path(tmp))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                orig = M.original_backbone(mod, CFG)
            assert list(orig.state_dict()) == list(bsd), f"{which}: key order differs"
            for k, v in orig.state_dict().items():
                assert v.shape == bsd[k].shape and v.dtype == bsd[k].dtype, (which, k)
            orig.load_state_dict(bsd, strict=True)
            orig.eval()
            errs = {}
            with torch.no_grad():
                for name, x in inputs.items():
                    ours = model.backbone(x)
                    theirs = orig(x)
                    assert len(ours) == len(theirs) == 4
                    errs[name] = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
                    assert all(a.shape == b.shape for a, b in zip(ours, theirs))
            out[which] = (commit[:8], errs)
            print(f"cross-check vs {which} @{commit[:8]} ({rel}): strict load OK, same key order; "
                  + ", ".join(f"{n} max|diff| {e:.3e}" for n, e in errs.items()))
            assert max(errs.values()) < 1e-4, errs
    return out


def group_summary(opt: dict, names: list[str]) -> dict:
    orders, examples = [], {}
    for name, g in zip(names, opt["param_groups"]):
        ks = list(g)
        if ks not in orders:
            orders.append(ks)
            examples[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
    return {"group_keys": orders, "example_groups": examples}


def text_summary(s: str) -> dict:
    return {"chars": len(s), "sha256": hashlib.sha256(s.encode()).hexdigest(), "head": s[:60]}


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
def make(out: Path, original: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    model = M.MaskRCNN(CFG)
    M.randomize_(model, gen)
    model.eval()

    img_path = ROOT / IMAGE
    T.check_prepare_against_torchvision(img_path, SIDE)
    prep = T.prepare_image(img_path, SIDE)
    pixels = prep.canvas[None].contiguous()
    odd = torch.randn((1, 3) + ODD_HW, generator=gen)

    io = run_case(model, pixels, "", debug=True)
    io.update(run_case(model, odd, "odd.", debug=False))
    geo = {"main": stage_geometry(SIDE, SIDE, CFG), "odd": stage_geometry(*ODD_HW, CFG)}
    for prefix, case in (("", "main"), ("odd.", "odd")):
        for i, (h, w) in enumerate(geo[case]["stage_hw"]):
            assert list(io[f"{prefix}stage{i}"].shape) == [1, CFG.num_features[i], h, w]
            assert list(io[f"{prefix}lateral{i}"].shape) == [1, CFG.neck_out_channels, h, w]
    for k, v in io.items():
        if "stage" in k and "debug" not in k:
            assert v.std().item() > 0.3, (k, v.std().item())  # features are O(1), not trivially small

    if original:
        big = T.prepare_image(img_path, 320).canvas[None]
        cross_check(model, {"main": pixels, "odd": odd, "canvas320": big})
        if M.MIRRORS["qrnet"][0].exists():
            with tempfile.TemporaryDirectory() as tmp:
                for side in (SIDE, 320, 640):
                    canvas, mask = M.qrnet_test_canvas(img_path, side, Path(tmp))
                    p = T.prepare_image(img_path, side)
                    assert torch.equal(canvas, p.canvas) and torch.equal(mask, p.mask), side
            print(f"preprocessing: QRNet's own eval transforms (datasets/transforms.py) give the same canvas "
                  f"and mask bit for bit at {SIDE}, 320 and 640")

    # checkpoint
    obj = build_checkpoint(model, gen)
    path = out / CKPT
    M.save_mmcv_zip(obj, path)
    scan = check_file(path, obj)

    # io.safetensors
    from safetensors.torch import save_file

    io = OrderedDict((k, v.detach().contiguous().clone().to(torch.float32)) for k, v in io.items())
    save_file(io, str(out / "io.safetensors"), metadata={"format": "pt"})

    # cases.json
    sd = obj["state_dict"]
    entries = [OrderedDict(key=k, shape=list(v.shape), dtype=str(v.dtype).replace("torch.", ""),
                           backbone_init=M.used_by_backbone_init(k)) for k, v in sd.items()]
    used = [e for e in entries if e["backbone_init"]]
    unused_prefixes = sorted({".".join(e["key"].split(".")[:2]) for e in entries if not e["backbone_init"]})
    meta_json = OrderedDict()
    for k, v in obj["meta"].items():
        if k in ("config", "env_info"):
            meta_json[k] = text_summary(v)
        elif isinstance(v, tuple):
            meta_json[k] = list(v)
        else:
            meta_json[k] = v
    opt = obj["optimizer"]
    names = [n for n, _ in model.named_parameters()]
    storages = {p for p in M.tensor_ptrs(obj)}
    cases = OrderedDict(
        schema=1,
        generator="tools/reference/make_mmdet_swin_fixtures.py",
        seed=SEED,
        sources=OrderedDict(
            swin_od=dict(repo="SwinTransformer/Swin-Transformer-Object-Detection", commit="c7b20110",
                         path="mmdet/models/backbones/swin_transformer.py"),
            qrnet=dict(repo="LukeForeverYoung/QRNet", commit="6aaa23c",
                       path="models/swin_model/mmdet/models/backbones/swin_transformer.py")),
        config=CFG.to_dict(),
        checkpoint=OrderedDict(
            file=CKPT, bytes=path.stat().st_size, sha256=sha(path), container="zip", zip_prefix="archive",
            zip_records=scan["names"][:4] + ["..."] + scan["names"][-3:],
            pickle_protocol=scan["protocol"], pickle_globals=scan["globals"], pickle_opcodes=scan["opcodes"],
            top_level=list(obj), storage_locations={"state_dict": "cpu", "optimizer": "cuda:0"},
            meta_key_order=list(obj["meta"]), meta=meta_json, amp=obj["amp"],
            optimizer=OrderedDict(type="AdamW (torch 1.10 state_dict: int step)", n_state=len(opt["state"]),
                                  n_param_groups=len(opt["param_groups"]),
                                  step=next(iter(opt["state"].values()))["step"],
                                  state_keys=list(next(iter(opt["state"].values()))),
                                  **group_summary(opt, names)),
            n_tensors=len(sd), n_values=sum(v.numel() for v in sd.values()), n_storages=len(storages)),
        state_dict=entries,
        backbone_init=OrderedDict(
            prefixes=list(M.BACKBONE_INIT_PREFIXES), n_used=len(used), n_unused=len(entries) - len(used),
            n_values_used=sum(sd[e["key"]].numel() for e in used), unused_prefixes=unused_prefixes,
            not_in_file="QRNet's MuSwinTransformer adds layers.{i}.qdatt.* and its neck fpn_down.{0..2}.qdatt.*; "
                        "those are not in a detector file (QRNet loads it with strict=False)"),
        image=OrderedDict(file=IMAGE.as_posix(), width=prep.width, height=prep.height, side=SIDE,
                          ratio=prep.ratio, new_w=prep.new_w, new_h=prep.new_h, top=prep.top, left=prep.left,
                          mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD,
                          resize="PIL convert('RGB'), long side to `side`: new = (round(w*ratio), round(h*ratio)) "
                                 "with Python round, PIL BILINEAR; ToTensor (/255); (x-mean)/std",
                          pad="zero canvas side x side (zeros after normalisation), top = round(dh/2 - 0.1), "
                              "left = round(dw/2 - 0.1)"),
        io=OrderedDict(file="io.safetensors",
                       tensors={k: {"shape": list(v.shape), "dtype": "float32"} for k, v in io.items()},
                       cases=geo))
    write_json(out / "cases.json", cases)

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"\n{'file':<28} {'bytes':>9}  sha256")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(out).as_posix():<28} {p.stat().st_size:>9}  {sha(p)}")
    print(f"{'total':<28} {total:>9}")
    print(f"pickle globals: {scan['globals']}")
    assert total < MAX_DIR_BYTES, total


def make_legacy(out: Path) -> None:
    """The committed checkpoint's object (same seed, same values) in torch's legacy container."""
    import pickletools

    gen = torch.Generator().manual_seed(SEED)
    model = M.MaskRCNN(CFG)
    M.randomize_(model, gen)
    torch.randn((1, 3) + ODD_HW, generator=gen)  # the draws of make() before build_checkpoint
    obj = build_checkpoint(model, gen)
    path = out / LEGACY
    M.save_mmcv_legacy(obj, path)
    # same pickles as torch's own legacy writer, up to the storage keys (torch uses heap addresses)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = Path(tmp) / "theirs.pth"
        over = {p: "cuda:0" for p in M.tensor_ptrs(obj["optimizer"])}
        with M.storage_locations("cpu", over):
            torch.save(obj, str(theirs), _use_new_zipfile_serialization=False)
        (pa, _), (pb, _) = T._legacy_pickles(path.read_bytes()), T._legacy_pickles(theirs.read_bytes())
    assert [pa[i][1] for i in (0, 1, 2)] == [pb[i][1] for i in (0, 1, 2)]
    assert len(pa[3][0]) == len(pb[3][0])
    for (na, xa), (nb, xb) in zip(pa[3][0], pb[3][0]):
        assert na == nb and (xa == xb or (isinstance(xa, str) and xa.isdigit() and xb.isdigit())), (na, xa, xb)
    back = load(path)
    assert list(back) == list(obj) and list(back["state_dict"]) == list(obj["state_dict"])
    assert all(torch.equal(back["state_dict"][k], v) for k, v in obj["state_dict"].items())
    assert back["meta"] == obj["meta"] and back["optimizer"]["param_groups"] == obj["optimizer"]["param_groups"]
    data = path.read_bytes()
    import io as _io
    f = _io.BytesIO(data)
    globals_ = set()
    for _ in range(5):
        for op, arg, _ in pickletools.genops(f):
            if op.name == "GLOBAL":
                globals_.add(arg)
    committed = load(DEFAULT_OUT / CKPT) if (DEFAULT_OUT / CKPT).exists() else None
    if committed is not None:
        assert all(torch.equal(committed["state_dict"][k], v) for k, v in obj["state_dict"].items())
    print(f"\nlegacy: {path} {path.stat().st_size} bytes sha256 {sha(path)}; globals {sorted(globals_)}")


def verify_stable(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        again = Path(tmp) / "again"
        make(again, original=False)
        n = assert_same_files(out, again)
    print(f"\nbyte-stable: a second run gives identical bytes for all {n} files")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-original", action="store_true", help="skip the cross-check with the mirrors' code")
    ap.add_argument("--verify-stable", action="store_true", help="regenerate and assert identical bytes")
    ap.add_argument("--legacy-out", type=Path, metavar="DIR",
                    help=f"also write the same checkpoint object in the legacy container to DIR/{LEGACY} "
                         "(not committed: it would take the fixture dir over 1.5 MB)")
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    make(a.out, original=not a.no_original)
    if a.legacy_out:
        make_legacy(a.legacy_out)
    if a.verify_stable:
        verify_stable(a.out)


if __name__ == "__main__":
    main()
