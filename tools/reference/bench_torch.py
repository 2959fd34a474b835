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
    """TransVG `VisionLanguageEncoderLayer`: `forward_pre` (`--normalize_before`, as CLIP-VG and
    HiVG) or `forward_post` (TransVG's default); pos added to queries and keys, not values; ReLU
    FFN; dropout inactive (eval)."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float, pre_norm: bool,
                 need_weights: bool):
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
        self.pre_norm = pre_norm
        self.need_weights = need_weights

    def _attend(self, h, pos, key_padding_mask):
        qk = h + pos
        # q is k but not v: the slow path of nn.MultiheadAttention with three in-projections
        # (the fast path needs q is k is v). need_weights=False -> F.scaled_dot_product_attention;
        # True -> explicit baddbmm + softmax (TransVG's literal call, used for --attn eager).
        a = self.self_attn(qk, qk, value=h, key_padding_mask=key_padding_mask,
                           need_weights=self.need_weights)[0]
        return self.dropout1(a)

    def _ffn(self, h):
        return self.dropout2(self.linear2(self.dropout(torch.relu(self.linear1(h)))))

    def forward(self, x, pos, key_padding_mask):
        if self.pre_norm:
            x = x + self._attend(self.norm1(x), pos, key_padding_mask)
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self._attend(x, pos, key_padding_mask))
        return self.norm2(x + self._ffn(x))


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


class _QuickGeluMlp(torch.nn.Module):
    """CLIP's MLP (`fc1`, `fc2`) with QuickGELU `x * sigmoid(1.702 x)` (Rust `ClipMlp`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


def _cls_patch_mask(pixel_mask, patch: int):
    """`[B, S, S]` -> `[B, 1 + N]` (Rust `cls_patch_mask`): nearest downsampling of the pixel
    mask (top-left pixel of each patch), CLS valid."""
    b = pixel_mask.shape[0]
    pm = pixel_mask[:, ::patch, ::patch].reshape(b, -1)
    return torch.cat([pm.new_ones(b, 1), pm], 1)


class _TransVgGrounder(torch.nn.Module):
    """What the Rust `Grounder` (crates/gk-models/src/grounder.rs) runs after its backbones with
    `BoxHead::RegMlp`: visu_proj, text_proj, [REG] token, learned pos (1 + L + N, d) on q/k of
    the fusion layers, final LayerNorm (pre-norm only), MLP d->d->d->4 + sigmoid on [REG].
    Subclasses add `visual` and `text` and call `fuse` then `box`."""

    def __init__(self, attn: str, visual_dim: int, text_dim: int, n_vis: int, max_text_len: int,
                 d: int, layers: int, heads: int, ffn: int, dropout: float, pre_norm: bool):
        super().__init__()
        nn = torch.nn
        self.visu_proj = nn.Linear(visual_dim, d)
        self.text_proj = nn.Linear(text_dim, d)
        self.reg_token = nn.Embedding(1, d)
        self.vl_pos_embed = nn.Embedding(1 + max_text_len + n_vis, d)
        self.layers = nn.ModuleList(
            _FusionLayer(d, heads, ffn, dropout, pre_norm, need_weights=(attn == "eager"))
            for _ in range(layers))
        self.norm = nn.LayerNorm(d, eps=1e-5) if pre_norm else None
        self.bbox_embed = _Mlp([d, d, d, 4])

    def fuse(self, vtok, vmask, ttok, tmask):
        """`vtok [B, N, Cv]`, `vmask [B, N]`, `ttok [B, L, Ct]`, `tmask [B, L]` (1 = keep) ->
        fused `[B, 1+L+N, d]`: [REG], text, visual."""
        v, t = self.visu_proj(vtok), self.text_proj(ttok)
        b = v.shape[0]
        reg = self.reg_token.weight.unsqueeze(0).expand(b, -1, -1)
        x = torch.cat([reg, t, v], 1)
        mask = torch.cat([vmask.new_ones(b, 1), tmask.to(vmask.dtype), vmask], 1)
        key_padding_mask = mask == 0  # True = ignore
        pos = self.vl_pos_embed.weight.unsqueeze(0)
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask)
        return x if self.norm is None else self.norm(x)

    def box(self, x):
        """Normalised cxcywh `[B, 4]` from the fused [REG] token."""
        return torch.sigmoid(self.bbox_embed(x[:, 0]))


class GrounderClipB16(_TransVgGrounder):
    """Twin of the Rust `Grounder` with `GrounderConfig::clip_b16()`
    (crates/gk-models/src/grounder.rs): CLIP ViT-B/16 @224 (all 197 tokens through
    post_layernorm) + CLIP text base (77 tokens, causal + padding mask), visu_proj 768->512,
    text_proj 512->512, [REG] token, learned pos (1+77+197, 512) on q/k of 6 pre-norm fusion
    layers (8 heads, FFN 2048, ReLU), final LayerNorm, MLP 512->512->512->4 + sigmoid on [REG]."""

    def __init__(self, attn: str, d: int = 512, layers: int = 6, heads: int = 8, ffn: int = 2048,
                 dropout: float = 0.1, max_text_len: int = 77):
        from transformers import CLIPTextModel, CLIPVisionModel

        cfg = clip_b16_config()
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        vcfg._attn_implementation = attn
        tcfg._attn_implementation = attn
        n_vis = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        super().__init__(attn, vcfg.hidden_size, tcfg.hidden_size, n_vis, max_text_len, d, layers,
                         heads, ffn, dropout, pre_norm=True)
        self.visual = CLIPVisionModel(vcfg)
        self.text = CLIPTextModel(tcfg)
        self.patch = vcfg.patch_size

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask):
        vout = self.visual(pixel_values=pixel_values)
        # all tokens (CLS + patches) through post_layernorm, as the Rust VisualEncoder
        # transformers 5 flattens CLIPVisionModel (no .vision_model); 4.x nests it
        post_ln = getattr(self.visual, "vision_model", self.visual).post_layernorm
        vtok = post_ln(vout.last_hidden_state)
        ttok = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        x = self.fuse(vtok, _cls_patch_mask(pixel_mask, self.patch), ttok, attention_mask)
        return self.box(x)


class _CrossAttention(torch.nn.Module):
    """A CLIP attention run as cross-attention (Rust `ClipAttention::forward_kv`): queries from
    the image tokens, keys and values from the text, an additive key bias. `sdpa` ->
    F.scaled_dot_product_attention, `eager` -> explicit softmax (as HF's two CLIP paths)."""

    def __init__(self, dim: int, heads: int, attn: str):
        super().__init__()
        nn = torch.nn
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.heads = heads
        self.eager = attn == "eager"

    def forward(self, x, kv, bias):
        b, n, c = x.shape
        hd = c // self.heads

        def split(t):  # [B, T, C] -> [B, heads, T, hd]
            return t.view(b, -1, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(kv)), split(self.v_proj(kv))
        if self.eager:
            a = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + bias, -1) @ v
        else:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(a.transpose(1, 2).reshape(b, n, c))


class _HivgBridge(torch.nn.Module):
    """One HiVG bridge (Rust `Bridge`, crates/gk-models/src/hivg.rs): text
    `T~ = gate(concat_k(E_k * T_k + T_k))`, then `h + cross_mlp(cross_attn(cross_norm(h), T~))`
    (no residual around the attention alone). The Rust starts `E_k` and `cross_mlp.fc2` at zero;
    here they are random (same ops)."""

    def __init__(self, dim: int, heads: int, eps: float, text_dim: int, text_len: int,
                 n_text: int, attn: str):
        super().__init__()
        nn = torch.nn
        self.adaptive = nn.ParameterList(
            nn.Parameter(0.02 * torch.randn(text_len, text_dim)) for _ in range(n_text))
        self.gate = nn.Linear(text_dim * n_text, dim)
        self.cross_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = _CrossAttention(dim, heads, attn)
        self.cross_mlp = _QuickGeluMlp(dim, 4 * dim)

    def text(self, texts):
        """`texts`: the chosen text hidden states `[B, L, Ct]` -> `[B, L, Cv]`."""
        parts = [t * e[: t.shape[1]] + t for t, e in zip(texts, self.adaptive)]
        return self.gate(torch.cat(parts, -1))

    def forward(self, h, t, bias):
        return h + self.cross_mlp(self.cross_attn(self.cross_norm(h), t, bias))


class _HivgVisual(torch.nn.Module):
    """Rust `HivgVisual` (crates/gk-models/src/hivg.rs): HF CLIPVisionModel's modules driven layer
    by layer, a bridge between the self-attention residual and the MLP residual of the chosen
    layers; multi-level tokens = the chosen hidden states (0 = embeddings after pre_layrnorm),
    each layer-normed (`ml_norm`), concatenated over channels -> ml_visual_projection; pooled = post_layernorm(last CLS)."""

    def __init__(self, vcfg, attn: str, bridge_layers: list[int], text_layers: list[int],
                 multi_layers: list[int], text_dim: int, text_len: int, proj_dim: int):
        super().__init__()
        from transformers import CLIPVisionModel

        c = vcfg.hidden_size
        self.clip = CLIPVisionModel(vcfg)
        self.bridge = torch.nn.ModuleDict({
            str(layer): _HivgBridge(c, vcfg.num_attention_heads, vcfg.layer_norm_eps, text_dim,
                                    text_len, len(text_layers), attn)
            for layer in bridge_layers})
        self.ml_norm = torch.nn.ModuleList(
            torch.nn.LayerNorm(c, eps=vcfg.layer_norm_eps) for _ in multi_layers)
        self.ml_visual_projection = torch.nn.Linear(c * len(multi_layers), proj_dim)
        self.text_layers, self.multi_layers = text_layers, multi_layers

    def forward(self, pixel_values, text_hidden, text_bias):
        """`text_hidden`: the text tower's hidden states (embeddings first), `text_bias`
        `[B, 1, 1, L]` additive -> tokens `[B, 1 + N, proj_dim]`, pooled `[B, Cv]`."""
        # transformers 5 flattens CLIPVisionModel (no .vision_model); 4.x nests it
        vm = getattr(self.clip, "vision_model", self.clip)
        texts = [text_hidden[i] for i in self.text_layers]
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        hidden = [x]
        for i, layer in enumerate(vm.encoder.layers):
            # CLIPEncoderLayer.forward split in two; self_attn(h) -> (out, weights) in 4.x and 5.x
            x = x + layer.self_attn(layer.layer_norm1(x))[0]
            if str(i) in self.bridge:
                bridge = self.bridge[str(i)]
                x = bridge(x, bridge.text(texts), text_bias)
            x = x + layer.mlp(layer.layer_norm2(x))
            hidden.append(x)
        levels = [norm(hidden[i]) for i, norm in zip(self.multi_layers, self.ml_norm)]
        tokens = self.ml_visual_projection(torch.cat(levels, -1))
        return tokens, vm.post_layernorm(x[:, 0])


class _HivgAuxHeads(torch.nn.Module):
    """Rust `HivgAuxHeads` (crates/gk-models/src/hivg.rs) on the fused tokens: token_sim =
    token_mlp(token_norm(patches)) (QuickGELU d->6d->d) . L2-normalised fused EOS text token
    (the last kept one); seg = three per-token linears each to a 2x2 block (widths d -> d/2 ->
    d/4 -> d, ReLU between; the grid grows 8x) . the (unnormalised) EOS token."""

    def __init__(self, d: int):
        super().__init__()
        nn = torch.nn
        widths = [d, d // 2, d // 4, d]
        self.token_norm = nn.LayerNorm(d, eps=1e-5)
        self.token_mlp = _QuickGeluMlp(d, 6 * d)
        self.seg_head = nn.ModuleList(nn.Linear(widths[i], 4 * widths[i + 1]) for i in range(3))

    def forward(self, visual, text, text_mask, grid: tuple[int, int]):
        """`visual [B, N, d]` (the last gh*gw are the patches), `text [B, L, d]`,
        `text_mask [B, L]` -> token_sim `[B, gh*gw]`, seg `[B, 8gh*8gw]`."""
        b, n, d = visual.shape
        h, w = grid
        last = (text_mask.sum(1).long() - 1).clamp(min=0)
        eos = text[torch.arange(b), last]  # [B, d]
        e = torch.nn.functional.normalize(eos, dim=-1).unsqueeze(2)  # [B, d, 1]
        patches = visual[:, n - h * w:]
        token_sim = (self.token_mlp(self.token_norm(patches)) @ e).squeeze(2)
        x = patches.reshape(b, h, w, d)
        for i, up in enumerate(self.seg_head):
            c = up.out_features // 4
            x = up(x).reshape(b, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(b, 2 * h, 2 * w, c)  # [B, 2h, 2w, c]: each token's 2x2 block in place
            h, w = 2 * h, 2 * w
            if i < 2:
                x = torch.relu(x)
        seg = (x.reshape(b, h * w, d) @ eos.unsqueeze(2)).squeeze(2)
        return token_sim, seg


class GrounderHivgB16(_TransVgGrounder):
    """Twin of the Rust `Grounder` with `GrounderConfig::hivg_b16()` (grounder.rs, hivg.rs) at
    `train=false`: `clip_b16()` with the vision tower replaced by HiVG's. CLIP text base (77
    tokens; its hidden state 12, i.e. the last layer before final_layer_norm, feeds every bridge;
    final_layer_norm tokens go to text_proj), CLIP ViT-B/16 @224 with bridges in layers
    [0, 3, 7, 11] (12-head cross-attention from the image tokens to the gated text, padding
    masked; QuickGELU MLP 768->3072->768), multi-level tokens from hidden states [1, 4, 8, 12]
    (4*768 -> 512), visu_proj 512->512, text_proj 512->512, the pre-norm fusion and head of
    `clip_b16()`; plus what the Rust forward computes unconditionally for this config: HiVG's
    auxiliary heads on the fused tokens and CLIP's contrastive head (`ClipHead`: bias-free
    visual_projection 768->512 of post_layernorm(CLS), text_projection 512->512 of the EOS
    token, exp(logit_scale); projections not normalised, as the Rust returns them).
    Returns (box [B, 4], token_sim [B, 196], seg [B, 112*112], image [B, 512], text [B, 512],
    scale). Unlike the Rust, text slots past the batch's longest expression are not cut
    (`used_text_len`): the bench's masks are all ones, so the Rust keeps all 77 as well."""

    def __init__(self, attn: str, d: int = 512, layers: int = 6, heads: int = 8, ffn: int = 2048,
                 dropout: float = 0.1, max_text_len: int = 77, contrastive_dim: int = 512):
        from transformers import CLIPTextModel

        cfg = clip_b16_config()
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        vcfg._attn_implementation = attn
        tcfg._attn_implementation = attn
        proj_dim = 512  # HivgConfig::clip_b16().proj_dim
        n_vis = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        super().__init__(attn, proj_dim, tcfg.hidden_size, n_vis, max_text_len, d, layers, heads,
                         ffn, dropout, pre_norm=True)
        self.visual = _HivgVisual(vcfg, attn, bridge_layers=[0, 3, 7, 11],
                                  text_layers=[tcfg.num_hidden_layers], multi_layers=[1, 4, 8, 12],
                                  text_dim=tcfg.hidden_size, text_len=max_text_len,
                                  proj_dim=proj_dim)
        self.text = CLIPTextModel(tcfg)
        self.hivg_aux = _HivgAuxHeads(d)
        self.visual_projection = torch.nn.Linear(vcfg.hidden_size, contrastive_dim, bias=False)
        self.text_projection = torch.nn.Linear(tcfg.hidden_size, contrastive_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
        self.patch = vcfg.patch_size

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask):
        tout = self.text(input_ids=input_ids, attention_mask=attention_mask,
                         output_hidden_states=True)
        text_bias = (attention_mask[:, None, None, :].to(pixel_values.dtype) - 1) * 1e9
        vtok, vpooled = self.visual(pixel_values, tout.hidden_states, text_bias)
        x = self.fuse(vtok, _cls_patch_mask(pixel_mask, self.patch), tout.last_hidden_state,
                      attention_mask)
        l, g = input_ids.shape[1], pixel_values.shape[-1] // self.patch
        token_sim, seg = self.hivg_aux(x[:, 1 + l:], x[:, 1:1 + l], attention_mask, (g, g))
        return (self.box(x), token_sim, seg, self.visual_projection(vpooled),
                self.text_projection(tout.pooler_output), self.logit_scale.exp())


class _DynamicLinear(torch.nn.Module):
    """QRNet's `DynamicLinear` (Rust qrnet.rs): `[W; b] = reshape(U(q), [cin + 1, k]) @ V`,
    `y = x @ W + b`. The Rust starts `V` at zero; here it is random (same ops)."""

    def __init__(self, query_dim: int, cin: int, cout: int, rank: int):
        super().__init__()
        self.u = torch.nn.Linear(query_dim, (cin + 1) * rank)
        self.v = torch.nn.Parameter(0.02 * torch.randn(rank, cout))
        self.cin, self.rank = cin, rank

    def forward(self, x, q):
        """`x [B, N, cin]`, `q [B, Dq]` -> `[B, N, cout]`."""
        p = self.u(q).reshape(q.shape[0], self.cin + 1, self.rank) @ self.v  # [B, cin + 1, cout]
        return x @ p[:, : self.cin] + p[:, self.cin:]


class _QdAtt(torch.nn.Module):
    """QRNet's query-aware dynamic attention (Rust `QdAtt`): channel gate
    `sigmoid(mlp(avg_N x) + mlp(max_N x))` (shared dynamic 2-layer MLP, reduction 16, ReLU),
    then spatial gate `sigmoid(DynLin(C -> 1)(x))` per token."""

    def __init__(self, dim: int, query_dim: int, rank: int, reduction: int):
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.channel = torch.nn.ModuleList([_DynamicLinear(query_dim, dim, hidden, rank),
                                            _DynamicLinear(query_dim, hidden, dim, rank)])
        self.spatial = _DynamicLinear(query_dim, dim, 1, rank)

    def forward(self, x, q):
        """`x [B, N, C]`, `q [B, Dq]` -> `[B, N, C]`."""
        l1, l2 = self.channel

        def mlp(p):
            return l2(torch.relu(l1(p, q)), q)

        x = x * torch.sigmoid(mlp(x.mean(1, keepdim=True)) + mlp(x.amax(1, keepdim=True)))
        return x * torch.sigmoid(self.spatial(x, q))


def _nearest_index(n: int, size: int):
    """PyTorch's `nearest` source indices for resizing `size` to `n`: `floor(i * size / n)`."""
    return torch.arange(n) * size // n


def _resize_nearest(x, hw: tuple[int, int]):
    """Nearest resize of `[B, H, W, C]` by gathers, as the Rust `resize_nearest`."""
    return (x.index_select(1, _nearest_index(hw[0], x.shape[1]))
            .index_select(2, _nearest_index(hw[1], x.shape[2])))


def _avg_pool2(x):
    """2x2 average pooling of `[B, H, W, C]`, odd sides zero-padded (Rust `avg_pool2`)."""
    b, h, w, c = x.shape
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    x = torch.nn.functional.pad(x, (0, 0, 0, 2 * w2 - w, 0, 2 * h2 - h))
    return x.reshape(b, h2, 2, w2, 2, c).mean((2, 4))


class _QrNetBackbone(torch.nn.Module):
    """Rust `QrNetBackbone` with `QrNetConfig::swin_s()` (crates/gk-models/src/qrnet.rs, swin.rs):
    HF SwinModel's patch embedding and stages (Swin-S: patch 4, window 7, depths [2, 2, 18, 2],
    heads [3, 6, 12, 24], embed 96), QD-ATT after each stage's blocks (its output is the stage
    output and the input of the next stage's patch merging), a LayerNorm per stage output, the
    neck (lateral linears to 256, top-down nearest-upsampled sums, bottom-up
    `out[i+1] += avgpool2x2(QD-ATT(out[i], q))`, an extra level by stride-2 subsampling), the
    last `token_levels` levels (coarsest first) plus a scale embedding each as tokens.
    HF's patch embedding is a stride-4 Conv2d, the Rust's a patchify + matmul (same math).
    SwinModel's final layernorm is left out: the Rust backbone (`Swin::backbone`) has none."""

    def __init__(self, attn: str, image_size: int, query_dim: int = 768, rank: int = 30,
                 reduction: int = 16, neck_dim: int = 256, token_levels: int = 2):
        super().__init__()
        from transformers import SwinConfig, SwinModel

        nn = torch.nn
        scfg = SwinConfig(image_size=image_size, patch_size=4, embed_dim=96, depths=[2, 2, 18, 2],
                          num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True,
                          hidden_act="gelu", layer_norm_eps=1e-5)
        scfg._attn_implementation = attn
        swin = SwinModel(scfg, add_pooling_layer=False)
        self.embeddings, self.stages = swin.embeddings, swin.encoder.layers
        dims = [scfg.embed_dim << i for i in range(len(scfg.depths))]
        self.out_norm = nn.ModuleList(nn.LayerNorm(c, eps=scfg.layer_norm_eps) for c in dims)
        self.qdatt = nn.ModuleList(_QdAtt(c, query_dim, rank, reduction) for c in dims)
        self.lateral = nn.ModuleList(nn.Linear(c, neck_dim) for c in dims)
        self.merge = nn.ModuleList(
            _QdAtt(neck_dim, query_dim, rank, reduction) for _ in dims[1:])
        self.scale_embed = nn.Parameter(0.02 * torch.randn(token_levels, neck_dim))
        self.neck_dim, self.token_levels = neck_dim, token_levels

    @staticmethod
    def tokens(image_size: int, patch: int = 4, stages: int = 4, token_levels: int = 2) -> int:
        """Visual tokens for a square input (Rust `QrNetConfig::tokens`): the last
        `token_levels` of the stage grids and the extra level."""
        g, grids = -(-image_size // patch), []
        for _ in range(stages + 1):
            grids.append(g)
            g = -(-g // 2)
        return sum(g * g for g in grids[-token_levels:])

    def forward(self, pixel_values, query):
        """`pixel_values [B, 3, S, S]`, `query [B, Dq]` -> tokens `[B, N, neck_dim]` and the
        token levels' grids, coarsest first."""
        x, grid = self.embeddings(pixel_values)
        b, d = x.shape[0], self.neck_dim
        stages, grids = [], []
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                x = block(x, grid)[0]  # SwinLayer -> (hidden, attn weights) in 4.x and 5.x
            x = self.qdatt[i](x, query)
            stages.append(x)
            grids.append(grid)
            if stage.downsample is not None:
                x = stage.downsample(x, grid)
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        maps = [lat(norm(s)).reshape(b, h, w, d)
                for s, (h, w), lat, norm in zip(stages, grids, self.lateral, self.out_norm)]
        for i in reversed(range(len(maps) - 1)):  # top-down
            maps[i] = maps[i] + _resize_nearest(maps[i + 1], maps[i].shape[1:3])
        for i, merge in enumerate(self.merge):  # bottom-up, query-aware
            _, h, w, _ = maps[i].shape
            src = merge(maps[i].reshape(b, h * w, d), query).reshape(b, h, w, d)
            maps[i + 1] = maps[i + 1] + _avg_pool2(src)
        maps.append(maps[-1][:, ::2, ::2])  # extra level
        tokens, token_grids = [], []
        for j, m in reversed(list(enumerate(maps[-self.token_levels:]))):
            _, h, w, _ = m.shape
            tokens.append(m.reshape(b, h * w, d) + self.scale_embed[j])
            token_grids.append((h, w))
        return torch.cat(tokens, 1), token_grids


def _grid_mask(pixel_mask, grid: tuple[int, int]):
    """`[B, S, S]` -> `[B, gh*gw]` by nearest sampling (Rust `grid_mask`)."""
    b, s, t = pixel_mask.shape
    m = pixel_mask.index_select(1, _nearest_index(grid[0], s))
    return m.index_select(2, _nearest_index(grid[1], t)).reshape(b, -1)


class GrounderQrNetSwinS(_TransVgGrounder):
    """Twin of the Rust `Grounder` with `GrounderConfig::qrnet_swin_s()` (grounder.rs, qrnet.rs,
    swin.rs): HF BertModel (BertConfig defaults = bert-base, pooler included: the Rust BERT
    computes it too) on 20 tokens; its raw [CLS] hidden state (not the pooler output) is the
    query of QRNet's Swin-S @640 (stage grids 160/80/40/20, extra level 10; tokens: 10x10 then
    20x20 = 500 of width 256); visu_proj 256->256, text_proj 768->256, [REG], learned pos
    (1+20+500, 256) on q/k of 6 post-norm fusion layers (8 heads, FFN 2048, ReLU), no final
    norm, MLP 256->256->256->4 + sigmoid on [REG]. Left out: the Rust's `VisualFeatures::pooled`
    (the mean of the 400 finest tokens), computed but unused for this head."""

    def __init__(self, attn: str, d: int = 256, layers: int = 6, heads: int = 8, ffn: int = 2048,
                 dropout: float = 0.1, image_size: int = 640, max_text_len: int = 20):
        from transformers import BertConfig, BertModel

        tcfg = BertConfig()
        tcfg._attn_implementation = attn
        neck_dim = 256  # QrNetConfig::swin_s().neck_dim
        super().__init__(attn, neck_dim, tcfg.hidden_size, _QrNetBackbone.tokens(image_size),
                         max_text_len, d, layers, heads, ffn, dropout, pre_norm=False)
        self.visual = _QrNetBackbone(attn, image_size, query_dim=tcfg.hidden_size,
                                     neck_dim=neck_dim)
        self.text = BertModel(tcfg)

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask):
        ttok = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vtok, grids = self.visual(pixel_values, ttok[:, 0])
        vmask = torch.cat([_grid_mask(pixel_mask, g) for g in grids], 1)
        return self.box(self.fuse(vtok, vmask, ttok, attention_mask))


def _grounder_inputs(batch: int, size: int, text_len: int) -> dict:
    """The Rust bench's inputs: random pixels, all-ones pixel and text masks, ids all 1."""
    return {
        "pixel_values": torch.randn(batch, 3, size, size),
        "pixel_mask": torch.ones(batch, size, size),
        "input_ids": torch.ones(batch, text_len, dtype=torch.long),
        "attention_mask": torch.ones(batch, text_len, dtype=torch.long),
    }


def build_grounder_clip_b16(batch: int, attn: str):
    """PyTorch twin of `GrounderConfig::clip_b16()`; --attn picks the HF CLIP attention
    (sdpa|eager) and, in the fusion, need_weights=False (SDPA) or True (explicit softmax)."""
    return GrounderClipB16(attn).eval(), _grounder_inputs(batch, 224, 77)


def build_grounder_hivg_b16(batch: int, attn: str):
    """PyTorch twin of `GrounderConfig::hivg_b16()`; --attn picks the HF CLIP attention, the
    bridges' cross-attention (SDPA or explicit softmax) and the fusion's need_weights."""
    return GrounderHivgB16(attn).eval(), _grounder_inputs(batch, 224, 77)


def build_grounder_qrnet_swin_s(batch: int, attn: str):
    """PyTorch twin of `GrounderConfig::qrnet_swin_s()`; --attn picks the HF Swin and BERT
    attention and the fusion's need_weights."""
    return GrounderQrNetSwinS(attn).eval(), _grounder_inputs(batch, 640, 20)


def build_grounder_transvg_r50(batch: int, attn: str):
    """TransVG-R50 as published: our transcription of TransVG (`transvg_ref.TransVG`, checked
    against TransVG's own code by make_transvg_fixtures.py) at `FULL_R50` with bert-base's
    vocabulary, the Rust bench's inputs in TransVG's mask convention (1 = pad: none here).
    TransVG uses nn.MultiheadAttention and ppb's BERT as written; --attn does not apply."""
    from dataclasses import replace

    import transvg_ref as T

    model = T.TransVG(replace(T.FULL_R50, bert_vocab=30522)).eval()
    return model, {
        "img": torch.randn(batch, 3, 640, 640),
        "pixel_mask": torch.zeros(batch, 640, 640, dtype=torch.int32),
        "ids": torch.ones(batch, 20, dtype=torch.long),
        "text_mask": torch.ones(batch, 20, dtype=torch.long),
    }


class _ReleaseGrounder(torch.nn.Module):
    """A released grounder's transcription (`self.model`) plus CLIP's contrastive outputs, as the Rust's ClipHead
    computes them: (box [B, 4], image [B, 512], text [B, 512], exp(logit_scale)). Subclasses build the model and
    say how to run it (`box`, filling `keep`) and where its pooled image embedding is (`image`)."""

    def forward(self, canvas, mask, ids):
        keep = {}
        box = self.box(canvas, mask, ids, keep)
        # the EOS row of text_projection(final-LN'd text) = text_projection of the pooled EOS token
        text = keep["text_features"][torch.arange(ids.shape[0]), ids.argmax(-1)]
        return box, self.image(keep), text, self.logit_scale.exp()


class _HivgRelease(_ReleaseGrounder):
    """`hivg_ref.HiVG` at `FULL_B` with its LoRA merged (see build_grounder_hivg_b16_release)."""

    def __init__(self):
        import hivg_ref as H

        super().__init__()
        self.model = H.HiVG(H.FULL_B)
        H.merge_lora_(self.model)
        self.clip = self.model.inner
        self.logit_scale = self.clip.logit_scale

    def box(self, canvas, mask, ids, keep):
        return self.model(canvas, mask, ids, "per_sample", keep)

    def image(self, keep):
        return self.clip.visual_projection(self.clip.vision_model.post_layernorm(keep["vision_states"][-1][:, 0]))


class _ClipVgRelease(_ReleaseGrounder):
    """`clipvg_ref.MLCLIPVG` at `FULL_B16` in fp32 (see build_grounder_clipvg_b16)."""

    def __init__(self):
        import clipvg_ref as C

        super().__init__()
        self.model = C.MLCLIPVG(C.FULL_B16)
        # CLIP's positional_embedding / text_projection are torch.empty until initialised
        C.randomize_(self.model, torch.Generator().manual_seed(0))
        self.logit_scale = self.model.clip.logit_scale

    def box(self, canvas, mask, ids, keep):
        return self.model(canvas, mask, ids, keep)

    def image(self, keep):
        # the last extracted level is block 11's output: its CLS through ln_post and proj
        v = self.model.clip.visual
        return v.ln_post(keep["image_features"][:, 0, -v.ln_post.normalized_shape[0]:]) @ v.proj


def _release_inputs(batch: int) -> dict:
    """The Rust bench's inputs in CLIP-VG's / HiVG's convention: random 224 px canvas, int32 pad mask all 0 (all
    image), ids all 1 (77 of them, none 0, so none masked as padding)."""
    return {
        "canvas": torch.randn(batch, 3, 224, 224),
        "mask": torch.zeros(batch, 224, 224, dtype=torch.int32),
        "ids": torch.ones(batch, 77, dtype=torch.long),
    }


def build_grounder_hivg_b16_release(batch: int, attn: str):
    """HiVG-B/16 as released, PyTorch side: our transcription (`hivg_ref.HiVG`, checked against HiVG's own
    code by make_hivg_fixtures.py) at `FULL_B` (HF CLIP ViT-B/16 + text base, dataset 'unc': bridges in vision
    layers 0, 3, 7, 11 reading text hidden state 12 through the adaptive weights and cross_gate, multi-level
    hidden states 1, 4, 8, 12, 6 pre-norm fusion layers of width 512 with the final norm), bridge_mode
    'per_sample', random weights (transformers' init), every LoRA merged into its Linear (`merge_lora_`: the Rust
    importer merges too), on `_release_inputs`.
    Rust twin `GrounderConfig::hivg_b16_release()` computes the same box path, plus CLIP's contrastive head
    (visual_projection of post_layernorm(last CLS), text_projection of the EOS token, exp(logit_scale)); the
    wrapper here computes those as well (the text one as the EOS row of HiVG's already projected text, one
    [B, 512] x [512, 512] matmul less). Not computed on either side: HiVG's auxiliary heads (visu_token_mlp,
    seg convs; `aux_heads` off in the Rust), ml_text_feat_perceiver, condition_text_proj (mixup only). Only
    here: the patch mask is resized twice (torchvision Resize and the F.interpolate check; B x 224 x 224, cheap).
    Attention as transcribed (HF eager CLIP attention, explicit softmax in the bridges, nn.MultiheadAttention
    in the fusion): --attn does not apply."""
    return _HivgRelease().eval(), _release_inputs(batch)


def build_grounder_clipvg_b16(batch: int, attn: str):
    """CLIP-VG (ViT-B/16) as released, PyTorch side: our transcription (`clipvg_ref.MLCLIPVG`, checked against
    CLIP-VG's own code by make_hivg_fixtures.py) at `FULL_B16` (OpenAI CLIP ViT-B/16 + text base, the outputs of
    blocks 0, 3, 7, 11 into ml_visu_proj, text through ln_final, text_projection and text_proj, 6 post-norm
    fusion layers of width 512 without a final norm), in fp32 (the release runs CLIP in fp16 on CUDA; the Rust
    side is f32), random weights (clipvg_ref.randomize_), on `_release_inputs`.
    Rust twin `GrounderConfig::clipvg_b16()` computes the same box path (its CLIP tower runs all 12 layers, as
    here: block 11 is extracted), plus CLIP's contrastive head (visual_projection of the post-LN'd last CLS,
    text_projection of the EOS token, exp(logit_scale)); the wrapper here computes those as well (ln_post and
    proj on the CLS of the last level; the EOS row of the already projected text). CLIP-VG's visu_proj exists
    but is unused on both sides. Only here: the patch mask's torchvision Resize plus its F.interpolate check.
    Attention as transcribed (nn.MultiheadAttention throughout): --attn does not apply."""
    return _ClipVgRelease().eval(), _release_inputs(batch)


MODELS: dict[str, Callable] = {
    "clip-b16-vision": build_clip_b16_vision,
    "grounder-clip-b16": build_grounder_clip_b16,
    "grounder-hivg-b16": build_grounder_hivg_b16,
    "grounder-hivg-b16-release": build_grounder_hivg_b16_release,
    "grounder-clipvg-b16": build_grounder_clipvg_b16,
    "grounder-qrnet-swin-s": build_grounder_qrnet_swin_s,
    "grounder-transvg-r50": build_grounder_transvg_r50,
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
