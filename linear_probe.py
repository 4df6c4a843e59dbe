"""Evaluate a frozen backbone: linear probe, kNN, per-class / shot-group accuracy, few-shot probes.

    python linear_probe.py runs/RUN/backbone.pt                    # data flags default to the run's
    python linear_probe.py runs/RUN/checkpoint.pt --shots 100 50   # a full checkpoint works too
    python linear_probe.py runs/RUN/backbone.pt --dataset cifar100 --data-dir data   # out-of-domain

Features are extracted once (eval transform, every image, no drop_last) and reused by every probe.
The linear probe trains on the *balanced* full training set by default, as Liu et al. (2022) and
the SDCLR/BCL line do (``--train-on long-tailed`` for the long-tailed subset); kNN follows DINO's
protocol (Caron et al. 2021, Sec. 3.2: k 20 over the whole training set, cosine similarity, votes weighted
by exp(sim / 0.07)), which does not depend on the class sizes. Many / medium / few groups come from the
class counts of the long-tailed pre-training set (see lt_data.shot_groups). Features stay on the device
that extracted them (the GPU when there is one) and the probes run there; on a CPU the probe uses every
core it may run on unless OMP_NUM_THREADS says otherwise. Prints a markdown table and writes the same
numbers as JSON.

Also the one place that knows the backbones and the export format: ``build_backbone`` turns an export's
metadata into a model (torchvision's ResNets, or a ViT in torchvision's VisionTransformer layout that also
takes smaller crops), and every training script builds its own backbone with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro

import lt_data

EXPORT_FORMAT = "ssl-imbalance-backbone/1"
CHECKPOINT_FORMAT = "ssl-imbalance-checkpoint/1"


class ProbeError(ValueError):
    """Unusable checkpoint or arguments; printed as one line, exit code 2."""


# --------------------------------------------------------------------------- backbones and exports
# The backbones of the training scripts and of the probe (ResNets, the ViT), their flags and the export format.


class BackboneError(ValueError):
    """An impossible backbone configuration (flags that do not fit the architecture or the image size); the
    training scripts and the probe print it as one line, exit code 2."""


VIT_PRESETS = {"vit_tiny": (12, 3, 192), "vit_small": (12, 6, 384), "vit_base": (12, 12, 768)}  # layers, heads, dim


def vit_kwargs(
    preset: str,
    image_size: int,
    layers: Optional[int] = None,
    heads: Optional[int] = None,
    dim: Optional[int] = None,
    patch: Optional[int] = None,
    crop_sizes: Optional[dict] = None,
) -> dict:
    """``build_backbone("vit", **kwargs)`` arguments for a preset (DeiT sizes, MLP 4x) with optional overrides;
    the patch size defaults to 4 below 64 px (CIFAR: 64 patches) and 16 above. ``crop_sizes`` maps a flag name
    to another crop side the ViT must take (focal / local views). Raises BackboneError on impossible sizes."""
    p_layers, p_heads, p_dim = VIT_PRESETS[preset]
    layers, heads, dim = [p if v is None else v for v, p in ((layers, p_layers), (heads, p_heads), (dim, p_dim))]
    patch = (4 if image_size < 64 else 16) if patch is None else patch
    for name, v in {"--vit-layers": layers, "--vit-heads": heads, "--vit-dim": dim, "--patch-size": patch}.items():
        if v < 1:  # 0 is not "the preset's": None is
            raise BackboneError(f"{name} must be >= 1, got {v}")
    if dim % heads:
        raise BackboneError(f"--vit-dim {dim} is not divisible by --vit-heads {heads}")
    for name, size in {"--image-size": image_size, **(crop_sizes or {})}.items():
        if size % patch:
            raise BackboneError(f"{name} {size} is not a multiple of --patch-size {patch}")
    return {
        "image_size": image_size,
        "patch_size": patch,
        "num_layers": layers,
        "num_heads": heads,
        "hidden_dim": dim,
        "mlp_dim": 4 * dim,
    }


class _EncoderBlock(nn.Module):
    """Pre-norm transformer block, parameter names as torchvision's EncoderBlock; ``drop_path`` is the
    stochastic-depth rate of its two residual branches (per sample, training only; 0 = off)."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, hidden_dim), nn.Dropout(0.0)
        )
        self.drop_path = 0.0

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0:
            return y
        keep = torch.empty(y.shape[0], 1, 1, device=y.device, dtype=y.dtype).bernoulli_(1 - self.drop_path)
        return y * keep / (1 - self.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self._branch(y)
        return x + self._branch(self.mlp(self.ln_2(x)))


class _Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim))
        self.layers = nn.Sequential(
            OrderedDict(
                (f"encoder_layer_{i}", _EncoderBlock(num_heads, hidden_dim, mlp_dim)) for i in range(num_layers)
            )
        )
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)


class ViT(nn.Module):
    """ViT with a CLS token for SSL training; the state-dict keys of torchvision.models.VisionTransformer (without
    heads), so an export loads into it strictly and gives the same features: the CLS token after the final LayerNorm.

    forward(x, keep=None): x may be smaller than image_size (local / focal crops: the position embeddings are
    bicubically interpolated, as DINO/MSN/ExCB do, by two matmuls with ``bicubic_matrix``, deterministic on CUDA
    too); keep [B, n] drops all other patch tokens (MSN masking without mask tokens). Initialisation: truncated
    normal std 0.02 (DeiT, DINO, MSN). set_drop_path(rate): stochastic depth rising linearly over the blocks from 0
    to ``rate`` (DINO rule)."""

    def __init__(
        self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int
    ):
        super().__init__()
        self.grid, self.hidden_dim = image_size // patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = _Encoder(self.grid**2 + 1, num_layers, num_heads, hidden_dim, mlp_dim)
        nn.init.trunc_normal_(self.encoder.pos_embedding, std=0.02)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for blk in self.encoder.layers:
            nn.init.trunc_normal_(blk.self_attention.in_proj_weight, std=0.02)
            nn.init.zeros_(blk.self_attention.in_proj_bias)

    def set_drop_path(self, rate: float) -> ViT:
        blocks = list(self.encoder.layers)
        for i, blk in enumerate(blocks):
            blk.drop_path = rate * i / max(len(blocks) - 1, 1)
        return self

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.encoder.ln(self.encoder.layers(self.tokens(x, keep)))[:, 0]

    def readout(self, x: torch.Tensor, n_last_blocks: int = 1, avgpool_patchtokens: bool = False) -> torch.Tensor:
        """DINO's linear-evaluation features (Caron et al. 2021, Sec. 4.1; its eval_linear.py): the class tokens of
        the last ``n_last_blocks`` blocks, each after the final LayerNorm, concatenated [B, n D], and with
        ``avgpool_patchtokens`` the mean patch token of the last block (after the LayerNorm) after them
        [B, (n + 1) D]. DINO reads ViT-S/16 with n 4, ViT-B with n 1 and the mean patch token; n 1 alone is
        ``forward``."""
        x, blocks, outs = self.tokens(x), list(self.encoder.layers), []
        for i, block in enumerate(blocks):
            x = block(x)
            if i >= len(blocks) - n_last_blocks:
                outs.append(self.encoder.ln(x))
        return torch.cat([o[:, 0] for o in outs] + ([outs[-1][:, 1:].mean(1)] if avgpool_patchtokens else []), -1)

    def tokens(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The input of the first block [B, 1 + patches, D]: the class token, then the (kept) patch embeddings, each
        with its position embedding."""
        n = x.shape[0]
        x = self.conv_proj(x)
        h, w = x.shape[-2:]
        x = x.reshape(n, self.hidden_dim, h * w).permute(0, 2, 1)
        pos = self.encoder.pos_embedding
        pos_cls, pos_patch = pos[:, :1], pos[:, 1:]
        if (h, w) != (self.grid, self.grid):  # bicubic, separably: rows by A_h, columns by A_w, as two matmuls
            grid = pos_patch.reshape(self.grid, self.grid * self.hidden_dim).float()
            a_h, a_w = bicubic_matrix(self.grid, h, x.device), bicubic_matrix(self.grid, w, x.device)
            with torch.autocast(x.device.type, enabled=False):  # float32 under autocast too
                grid = a_w @ (a_h @ grid).reshape(h, self.grid, self.hidden_dim)  # [h, w, D]
            pos_patch = grid.reshape(1, h * w, self.hidden_dim).to(pos.dtype)
        x = x + pos_patch
        if keep is not None:
            x = torch.gather(x, 1, keep[:, :, None].expand(-1, -1, x.shape[-1]))
        return torch.cat([(self.class_token + pos_cls).expand(n, -1, -1), x], dim=1)


NO_READOUT = {"n_last_blocks": 1, "avgpool_patchtokens": False}  # the class token the ViT outputs


class DinoReadout(nn.Module):
    """A ViT whose forward is its ``readout`` (DINO's features for linear evaluation) with fixed arguments."""

    def __init__(self, vit: ViT, n_last_blocks: int, avgpool_patchtokens: bool):
        super().__init__()
        self.vit, self.n_last_blocks, self.avgpool_patchtokens = vit, n_last_blocks, avgpool_patchtokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.readout(x, self.n_last_blocks, self.avgpool_patchtokens)


_BICUBIC: dict[tuple, torch.Tensor] = {}  # (size, out, device) -> bicubic_matrix's matrix


def bicubic_matrix(size: int, out: int, device: torch.device) -> torch.Tensor:
    """The [out, size] float32 matrix (on ``device``) of 1-D bicubic resampling of ``size`` positions to ``out``:
    F.interpolate's (mode="bicubic", align_corners=False: Keys' cubic convolution, a = -0.75, border taps
    clamped) applied to the identity, so ``A @ v`` equals interpolating v. 2-D bicubic is separable:
    F.interpolate(G, (h, w)) = A_h @ G @ A_w^T per channel. Matmuls have deterministic backward passes on CUDA;
    F.interpolate's bicubic backward raises under torch.use_deterministic_algorithms(True) there. Computed once
    per (size, out, device)."""
    key = (size, out, str(device))
    if key not in _BICUBIC:
        with torch.no_grad():
            eye = torch.eye(size, dtype=torch.float64).reshape(1, size, size, 1)  # channel i: the i-th unit vector
            a = F.interpolate(eye, size=(out, 1), mode="bicubic", align_corners=False).reshape(size, out).T
        _BICUBIC[key] = a.to(device, torch.float32).contiguous()
    return _BICUBIC[key]


def build_backbone(arch: str, **kwargs) -> nn.Module:
    """The backbone of every training script and of the probe; ``forward`` returns features.

    resnet18 / resnet50: torchvision's, classifier replaced by Identity; ``cifar_stem=True`` swaps in a 3x3
    stride-1 first conv and drops the max-pool (SimSiam on CIFAR does not reproduce without it). vit: ``ViT``
    above with ``image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim`` (see ``vit_kwargs``),
    parameter-compatible with torchvision's VisionTransformer; features are the CLS token.
    """
    if arch in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, arch)()
        if kwargs.get("cifar_stem", False):
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        model.fc = nn.Identity()
        return model
    if arch == "vit":
        return ViT(**kwargs)
    raise BackboneError(f"unknown backbone architecture {arch!r}")


def backbone_spec(
    arch: str,
    image_size: int,
    vit_layers: Optional[int] = None,
    vit_heads: Optional[int] = None,
    vit_dim: Optional[int] = None,
    patch_size: Optional[int] = None,
    crop_sizes: Optional[dict] = None,
) -> dict:
    """``{"arch", "arch_kwargs"}`` for build_backbone and the export, from a training script's --arch (resnet18,
    resnet50: CIFAR stem below 64 px; vit_*: ``vit_kwargs``). Raises BackboneError on ViT flags with a ResNet or
    impossible ViT sizes."""
    if not arch.startswith("vit"):
        if any(v is not None for v in (vit_layers, vit_dim, vit_heads, patch_size)):
            raise BackboneError(f"--vit-layers/--vit-dim/--vit-heads/--patch-size apply to ViTs, not --arch {arch}")
        return {"arch": arch, "arch_kwargs": {"cifar_stem": image_size < 64}}
    return {
        "arch": "vit",
        "arch_kwargs": vit_kwargs(arch, image_size, vit_layers, vit_heads, vit_dim, patch_size, crop_sizes),
    }


def feature_dim(arch: str, **kwargs) -> int:
    return {"resnet18": 512, "resnet50": 2048}.get(arch) or kwargs["hidden_dim"]


_PEEKED: dict = {}  # (path, mtime, size) -> the object main read to name the output; load_backbone takes it


def _load(path: str, keep: bool = False) -> dict:
    """A backbone export or checkpoint of these scripts; ProbeError naming the file when it cannot be read (worded
    from the OSError: a symbolic-link loop is not 'not found'), is not a torch file or is truncated, or lacks what
    the probe reads. ``keep``: the next _load of the unchanged file returns this object instead of reading it again."""
    try:
        st = os.stat(path)
    except OSError as e:
        reason = lt_data.os_reason(path, e)
        raise ProbeError(
            f"checkpoint not found: {path}" if reason == "not found" else f"checkpoint {path}: {reason}"
        ) from None
    key = (path, st.st_mtime_ns, st.st_size)
    if key in _PEEKED:
        return _PEEKED.pop(key)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ProbeError(f"cannot load {path}: {lt_data.os_reason(path, e)}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProbeError(
            f"cannot load {path}: not a readable checkpoint or refused by weights_only=True ({first[:200]})"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") not in (EXPORT_FORMAT, CHECKPOINT_FORMAT):
        raise ProbeError(
            f"{path} is not a backbone export or checkpoint of these scripts "
            f"(expected format {EXPORT_FORMAT} or {CHECKPOINT_FORMAT})"
        )
    meta = obj.get("backbone")
    weights = "state_dict" if obj["format"] == EXPORT_FORMAT else "model"
    needed = ("arch", "arch_kwargs") if weights == "state_dict" else ("arch", "arch_kwargs", "prefix")
    if (
        not isinstance(meta, dict)
        or any(k not in meta for k in needed)
        or not isinstance(meta["arch_kwargs"], dict)
        or not isinstance(obj.get(weights), dict)
    ):
        raise ProbeError(
            f"{path}: a damaged {obj['format']} file: expected 'backbone' with {', '.join(needed)} and {weights!r}"
        )
    if keep:
        _PEEKED.clear()
        _PEEKED[key] = obj
    return obj


def load_backbone(path: str) -> tuple[nn.Module, dict]:
    """Load ``backbone.pt`` or a full ``checkpoint.pt``; returns (torchvision backbone, metadata)."""
    obj = _load(path)
    meta = obj["backbone"]
    if obj["format"] == EXPORT_FORMAT:
        state = obj["state_dict"]
    else:
        prefix = meta["prefix"]
        state = {k[len(prefix) :]: v for k, v in obj["model"].items() if k.startswith(prefix)}
    try:
        model = build_backbone(meta["arch"], **meta["arch_kwargs"])
    except TypeError as e:  # arch_kwargs that are not the architecture's
        raise ProbeError(f"{path}: a damaged backbone description ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ProbeError(
            f"{path}: weights do not fit a {meta['arch']} backbone "
            f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})"
        ) from None
    return model, meta


# --------------------------------------------------------------------------- probes on features


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp: str = "none",
    label: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features [N, D] (float32) and labels [N] (int64) of every item of ``dataset`` (eval mode, no
    drop_last), in order, both on ``device``: the probes then run where the features are. With a ``label``, a
    progress line at about every tenth of the images."""
    model.eval().to(device, memory_format=torch.channels_last)
    loader = lt_data.make_loader(dataset, batch_size, num_workers, sampler=None, drop_last=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    feats, labels = [], []
    every, done = max(1, math.ceil(len(loader) / 10)), 0
    for i, (x, y, _) in enumerate(loader, 1):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            feats.append(model(x.to(device, non_blocking=True, memory_format=torch.channels_last)).float())
        labels.append(y)
        done += len(y)
        if label and (i % every == 0 or i == len(loader)):
            print(f"extracting features of the {label} images: {done}/{len(dataset)}", flush=True)
    return torch.cat(feats), torch.cat(labels).to(device)


# The probe's kNN protocol: DINO's weighted k-NN over the whole probe training set (Caron et al. 2021, "Emerging
# Properties in Self-Supervised Vision Transformers", Sec. 3.2: "20 NN is consistently working the best"; the
# temperature is the default of its eval_knn.py). It does not depend on the class sizes, so it holds on a long
# tail whose smallest class has 5 images (ImageNet-LT), where InstDisc's k 200 (Wu et al. 2018) cannot.
KNN_K = 20
KNN_TEMPERATURE = 0.07
KNN_BLOCK_BYTES = 256 * 2**20  # at most this much of query x bank similarities at a time
KNN_MIN_QUERIES = 1024  # queries per pass over the bank, at least: each pass reads the whole bank


def knn_predict(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018; DINO's defaults): cosine similarity of test_f [M, D] to the bank
    train_f [N, D] (labels train_y [N], int64), the min(k, N) nearest vote for their class with weight
    exp(sim / temperature); returns the predicted classes [M] (int64) on test_f's device, where it runs.

    Memory: ``chunk`` queries at a time (None: as many as fit KNN_BLOCK_BYTES, 256 MB, of float32 similarities
    against the whole bank, and at least KNN_MIN_QUERIES, 1,024), each against bank tiles of as many rows as keep
    the [chunk, tile] similarities within KNN_BLOCK_BYTES (at least k); the k nearest of the tiles are merged, so
    the result is the whole bank's k nearest. At ImageNet-LT's size (115,846) that is 1,024 queries against tiles
    of 65,536 images."""
    device = test_f.device
    train_f, test_f = F.normalize(train_f.to(device), dim=1), F.normalize(test_f, dim=1)
    train_y = train_y.to(device)
    k = min(k, len(train_f))
    chunk = chunk or max(KNN_MIN_QUERIES, KNN_BLOCK_BYTES // (4 * max(len(train_f), 1)))
    preds = []
    for i in range(0, len(test_f), chunk):
        queries = test_f[i : i + chunk]
        tile = max(k, KNN_BLOCK_BYTES // (4 * len(queries)))
        sim = idx = None
        for j in range(0, len(train_f), tile):
            s, n = (queries @ train_f[j : j + tile].T).topk(min(k, len(train_f) - j), dim=1)
            if sim is not None:  # the k nearest so far and this tile's: keep the k nearest
                s, pos = torch.cat([sim, s], dim=1).topk(k, dim=1)
                n = torch.cat([idx, n + j], dim=1).gather(1, pos)
            sim, idx = s, n
        weight, label = (sim / temperature).exp(), train_y[idx]
        votes = sim.new_zeros(len(sim), num_classes)
        rows = torch.arange(len(sim), device=device)
        for j in range(k):  # one vote per row at a time: no two writes meet in a cell, so no atomics on a GPU
            votes[rows, label[:, j]] += weight[:, j]
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device`` where it has one (CUDA, MPS), else on the CPU."""
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:
        return torch.Generator().manual_seed(seed)


def train_linear(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    verbose: bool = False,
) -> nn.Module:
    """Logistic regression on standardised frozen features train_f [N, D] with labels train_y [N] (int64): SGD
    momentum 0.9, cosine lr from ``lr`` to 0 over every step, cross-entropy, batches of a seeded permutation per
    epoch (``verbose``: a progress line at about every tenth of the epochs). Returns standardisation + nn.Linear,
    mapping [B, D] to logits [B, num_classes], with its parameters and buffers on train_f's device, where it
    trained."""
    device = train_f.device
    train_y = train_y.to(device)
    g = _generator(device, seed)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    clf = nn.Linear(train_f.shape[1], num_classes, device=device)
    nn.init.zeros_(clf.weight), nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    xs = (train_f - mean) / std
    steps, step = epochs * math.ceil(len(xs) / batch_size), 0
    for epoch in range(1, epochs + 1):
        if verbose and (epoch % max(1, epochs // 10) == 0 or epoch == epochs):
            print(f"training the linear head: epoch {epoch}/{epochs}", flush=True)
        perm = torch.randperm(len(xs), generator=g, device=g.device).to(device)
        for j in perm.split(batch_size):
            loss = F.cross_entropy(clf(xs[j]), train_y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            opt.param_groups[0]["lr"] = lr * (0.5 * (1 + math.cos(math.pi * step / steps)))  # a float: no sync
    return nn.Sequential(_Standardise(mean, std), clf)


class _Standardise(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


def accuracy_report(pred: torch.Tensor, target: torch.Tensor, num_classes: int, groups: dict[str, list[int]]) -> dict:
    """Top-1, per-class accuracy, the mean per-class accuracy of each shot group and the std of the groups (in %),
    of predictions pred [M] against target [M] (any device). A class without test images, or a group without
    classes, is None (JSON null: strict readers refuse NaN)."""
    correct = (pred.cpu() == target.cpu()).double()
    target = target.cpu()
    per_class = [correct[target == c].mean().item() * 100 if (target == c).any() else None for c in range(num_classes)]
    out = {"top1": correct.mean().item() * 100, "per_class": per_class}
    accs = []
    for name, cls in groups.items():
        vals = [per_class[c] for c in cls if per_class[c] is not None]
        out[name] = sum(vals) / len(vals) if vals else None
        accs.append(out[name])
    if accs and None not in accs:
        m = sum(accs) / len(accs)
        out["group_std"] = math.sqrt(sum((a - m) ** 2 for a in accs) / len(accs))
    return out


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices into labels [N] of ``shots`` random examples of each class present (all of a class that has fewer),
    class by class in increasing order; drawn on the CPU (the same on every device), returned on labels' device."""
    g = torch.Generator().manual_seed(seed)
    by_class = _indices_by_class(labels.cpu())
    picks = [idx[torch.randperm(len(idx), generator=g)[:shots]] for idx in by_class if len(idx)]
    return torch.cat(picks).to(labels.device)


def _indices_by_class(labels: torch.Tensor) -> list[torch.Tensor]:
    """For each class 0..max(labels), the increasing indices of its examples in labels [N] (CPU): one stable sort,
    not one pass over the labels per class (8,142 classes of iNaturalist 2018)."""
    counts = torch.bincount(labels) if len(labels) else torch.zeros(0, dtype=torch.long)
    return list(torch.argsort(labels, stable=True).split(counts.tolist()))


# --------------------------------------------------------------------------- online kNN monitor


def balanced_subset(targets, total: int, seed: int) -> list[int]:
    """A seeded, sorted random choice of exactly ``total`` indices of ``targets`` (class labels 0..C-1), as
    class-balanced as the class sizes allow: every class gets the same number L (all of a class that has at most
    L) and the remaining r images go one each to r random classes that have more, L the largest number that
    leaves r >= 0. So ``total // C`` of each class when every class has that many, and, when ``total`` < C, one
    image each of ``total`` random classes. ``total = 0`` or ``total >= len(targets)`` keeps every index."""
    if total <= 0 or total >= len(targets):
        return list(range(len(targets)))
    by_class = _indices_by_class(torch.as_tensor(list(targets)))
    counts = torch.tensor([len(idx) for idx in by_class])
    low, high = 0, int(counts.max())  # the largest level L with sum(min(count, L)) <= total (< len(targets))
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if int(counts.clamp(max=mid).sum()) <= total else (low, mid - 1)
    quota = counts.clamp(max=low)
    g = torch.Generator().manual_seed(seed)
    rest = total - int(quota.sum())
    if rest:  # fewer than the classes that still have images: sum(min(count, L + 1)) > total
        more = torch.nonzero(counts > low).flatten()
        quota[more[torch.randperm(len(more), generator=g)[:rest]]] += 1
    picks = [idx[torch.randperm(len(idx), generator=g)[:q]] for idx, q in zip(by_class, quota.tolist()) if q]
    return sorted(torch.cat(picks).tolist())


def _subset_words(targets, picked: list[int], num_classes: int) -> str:
    """How ``picked`` spreads over the classes, e.g. "1 each of 5,000 of 8,142 classes", "3 to 4 each of 10 classes"."""
    counts = torch.bincount(torch.as_tensor([targets[i] for i in picked], dtype=torch.long), minlength=num_classes)
    used = counts[counts > 0]
    if not len(used):
        return "none"
    low, high = int(used.min()), int(used.max())
    each = f"{low:,}" if low == high else f"{low:,} to {high:,}"
    of = f"{len(used):,} of {num_classes:,}" if len(used) < num_classes else f"{num_classes:,}"
    return f"{each} each of {of} classes"


class KNNMonitor:
    """kNN top-1 of a backbone while it trains: the online monitor of solo-learn and lightly.

    Bank: ``bank`` images of the full (balanced) training set; queries: ``queries`` images of the test set (0: all
    of it); both exactly that many, as class-balanced as the classes allow (``balanced_subset``: at 8,142 classes
    and a bank of 5,000, one image each of 5,000 random classes), un-augmented (eval transform), embedded by the
    backbone in eval mode, then ``knn_predict`` with k = 20, cosine similarity, votes exp(sim / 0.07) (Wu et al.
    2018, the monitors' defaults; DINO's k-NN protocol). ``description`` says this in one line, for the log. In a
    process group (DDP) pass every rank the same arguments: each embeds 1/R of the images, the features are
    all-gathered, and every rank returns the accuracy one process would. Draws nothing from the global RNGs, so
    training is the same with or without it.
    """

    def __init__(
        self,
        data: lt_data.LTData,
        bank: int,
        queries: int,
        batch_size: int = 256,
        num_workers: int = 0,  # in-process: no idle workers between evaluations
        seed: int = 0,
        k: int = KNN_K,
        temperature: float = KNN_TEMPERATURE,
    ):
        tf = lt_data.eval_transform(data.image_size, data.mean, data.std)
        bank_idx = balanced_subset(data.train_full.targets, bank, seed)
        query_idx = balanced_subset(data.test.targets, queries, seed + 1)
        self.sizes = (len(bank_idx), len(query_idx))
        self.description = (
            f"kNN monitor: {len(bank_idx):,} bank images "
            f"({_subset_words(data.train_full.targets, bank_idx, data.num_classes)}), {len(query_idx):,} test queries "
            f"({_subset_words(data.test.targets, query_idx, data.num_classes)}), k {min(k, len(bank_idx))}, "
            f"T {temperature:g}"
        )
        dist = torch.distributed.is_initialized()
        rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
        self.world_size, self.k, self.temperature = world_size, k, temperature
        self.num_classes = data.num_classes
        self.per_rank = -(-sum(self.sizes) // world_size)
        images = [(data.train_full, i) for i in bank_idx] + [(data.test, i) for i in query_idx]
        self.targets = torch.tensor([s.targets[i] for s, i in images])
        mine = images[rank * self.per_rank : (rank + 1) * self.per_rank]
        self.loader = lt_data.make_loader(
            _ImageList(mine, tf), batch_size, num_workers, generator=torch.Generator()
        )  # no draw from the global RNG

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, prepare=lambda x: x, autocast=None) -> float:
        """Top-1 (%) of ``backbone`` (restored to its train/eval mode afterwards); ``prepare`` moves a batch to
        the device, ``autocast`` is an optional context-manager factory for the forward passes."""
        was_training = backbone.training
        backbone.eval()
        try:
            feats = []
            for x in self.loader:
                with autocast() if autocast is not None else contextlib.nullcontext():
                    feats.append(backbone(prepare(x)).float())
        finally:
            backbone.train(was_training)
        device = next(backbone.parameters()).device
        f = torch.cat(feats) if feats else torch.zeros(0, 1, device=device)
        if self.world_size > 1:
            padded = f.new_zeros(self.per_rank, f.shape[1])
            padded[: len(f)] = f
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, padded)
            f = torch.cat(parts)
        f = f[: sum(self.sizes)].cpu()
        n_bank = self.sizes[0]
        pred = knn_predict(f[:n_bank], self.targets[:n_bank], f[n_bank:], self.num_classes, self.k, self.temperature)
        return (pred == self.targets[n_bank:]).double().mean().item() * 100


class _ImageList(torch.utils.data.Dataset):
    """(image set, index) pairs through one transform; yields image tensors only."""

    def __init__(self, items: list, transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        images, j = self.items[i]
        return self.transform(images.image(j))


# --------------------------------------------------------------------------- command line


def _from_run(metavar: str):
    """A data flag of the probe: not passed (None) means the pre-training run's value."""
    return tyro.conf.arg(metavar=metavar, help_behavior_hint="(default: the pre-training run's)")


@lt_data.help_from_docstrings
@dataclass
class ProbeArgs:
    """Linear-probe, kNN and few-shot evaluation of a frozen backbone. Data flags you do not pass are
    taken from the pre-training run (unless --dataset names another data set: out-of-domain probing)."""

    checkpoint: tyro.conf.Positional[str] = ""
    """backbone.pt or checkpoint.pt written by one of the training scripts, or a run folder (its backbone.pt, else
    its checkpoint.pt)"""
    dataset: Annotated[Optional[lt_data.DatasetName], _from_run("{" + ",".join(lt_data.DATASETS) + "}")] = None
    """data set to probe on (another one: out-of-domain probing, whose other data flags default as in the training
    scripts)"""
    data_dir: Annotated[Optional[str], _from_run("STR")] = None
    """root of the data (see the training scripts)"""
    split_file: Annotated[Optional[str], _from_run("STR")] = None
    """imagenet-lt: training split file"""
    test_split_file: Annotated[Optional[str], _from_run("STR")] = None
    """imagenet-lt: evaluation split file"""
    index_file: Annotated[Optional[str], _from_run("STR")] = None
    """training-set indices replacing the long-tail construction (shot groups, --train-on long-tailed)"""
    imbalance_ratio: Annotated[Optional[float], _from_run("FLOAT")] = None
    """head/tail class-size ratio of the long-tailed set (shot groups, --train-on long-tailed)"""
    imbalance_profile: Annotated[Optional[Literal["exp", "step"]], _from_run("{exp,step}")] = None
    """long-tail profile"""
    split_seed: Annotated[Optional[int], _from_run("INT")] = None
    """seed of the per-class choice of images"""
    synthetic_classes: Annotated[Optional[int], _from_run("INT")] = None
    """synthetic: number of classes"""
    synthetic_per_class: Annotated[Optional[int], _from_run("INT")] = None
    """synthetic: training images per class"""
    synthetic_test_per_class: Annotated[Optional[int], _from_run("INT")] = None
    """synthetic: test images per class"""
    image_size: Annotated[Optional[int], _from_run("INT")] = None
    """input resolution (also out of domain: the backbone's)"""
    download: bool = True
    """download CIFAR or Fashion-MNIST when it is missing and the network allows it"""
    train_on: Literal["balanced", "long-tailed"] = "balanced"
    """training set of the linear probe and kNN bank: the full training set (balanced for CIFAR, Fashion-MNIST and
    synthetic data: the papers' protocol; an ImageFolder or ImageNet-LT keeps its counts, and the JSON then says
    "full (imbalanced)") or the long-tailed pre-training subset"""
    epochs: int = 100
    """linear-probe epochs over the pre-extracted features"""
    lr: float = 0.5
    """linear-probe learning rate (SGD momentum 0.9, cosine decay, on standardised features)"""
    batch_size: int = 256
    """linear-probe batch size"""
    weight_decay: float = 0.0
    """linear-probe weight decay"""
    knn_k: int = KNN_K
    """kNN neighbours, over the whole probe training set (DINO's k-NN, Caron et al. 2021, Sec. 3.2; whatever the
    class sizes)"""
    knn_temperature: float = KNN_TEMPERATURE
    """kNN vote temperature: a neighbour's vote is exp(cosine similarity / T) (DINO's eval_knn.py)"""
    shots: tuple[int, ...] = ()
    """few-shot probes: examples per class, e.g. --shots 100 50"""
    few_shot_seeds: int = 3
    """random subsets averaged per few-shot probe"""
    n_last_blocks: int = 1
    """ViTs: the features are the class tokens of the last this many blocks, concatenated (DINO's linear evaluation:
    4 for ViT-S, 1 for ViT-B; Caron et al. 2021, eval_linear.py); 1: the class token the backbone outputs"""
    avgpool_patchtokens: bool = False
    """ViTs: append the mean patch token of the last block to the features (DINO's linear evaluation of ViT-B)"""
    random_init: bool = False
    """probe a randomly initialised backbone of the same architecture instead (a floor for the numbers)"""
    raw_pixels: bool = False
    """probe the flattened, standardised input image instead of a backbone (the floor a representation must beat
    to be better than its input); the checkpoint still gives the data flags"""
    seed: int = 0
    """seed of the probe's training and of --random-init"""
    extract_batch_size: int = 256
    """batch size of feature extraction"""
    num_workers: int = 2
    """data-loading worker processes for feature extraction"""
    amp: Literal["bf16", "fp16", "none"] = "none"
    """autocast dtype of feature extraction"""
    output: Optional[str] = None
    """JSON output path; default: probe_<dataset>.json beside the checkpoint"""
    tensorboard: bool = False
    """also log the numbers into the pre-training run's TensorBoard (the checkpoint's folder)"""


# The range of every numeric flag of the probe beside lt_data.RANGES' data flags (lt_data.check_ranges).
RANGES = dict(epochs="[1, inf)", lr="(0, inf)", batch_size="[1, inf)", weight_decay="[0, inf)", knn_k="[1, inf)")
RANGES |= dict(knn_temperature="(0, inf)", shots="[1, inf)", few_shot_seeds="[1, inf)", seed="[0, 4294967296)")
RANGES |= dict(extract_batch_size="[1, inf)", num_workers="[0, inf)", n_last_blocks="[1, inf)")

DATA_FIELDS = [f.name for f in dataclasses.fields(lt_data.DataArgs) if f.name not in ("balanced_twin", "download")]


def resolve_data_args(args: ProbeArgs, meta: dict) -> lt_data.DataArgs:
    """The probe's data flags: each one passed (not None) wins; the others come from the pre-training run when
    the data set is the run's, else from lt_data.DataArgs' defaults (the image size is the run's either way)."""
    pre = meta.get("data", {})
    same = args.dataset is None or args.dataset == pre.get("dataset")
    values = {}
    for name in DATA_FIELDS:
        mine = getattr(args, name)
        if mine is not None:
            values[name] = mine
        elif name in pre and (same or name == "image_size"):
            values[name] = pre[name]
    return lt_data.DataArgs(**values, download=args.download)


def run_probe(args: ProbeArgs) -> dict:
    model, meta = load_backbone(args.checkpoint)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = build_backbone(meta["arch"], **meta["arch_kwargs"])
    dino = args.n_last_blocks != 1 or args.avgpool_patchtokens
    if dino and (meta["arch"] != "vit" or args.raw_pixels):
        what = "the raw pixels have none" if args.raw_pixels else f"a {meta['arch']} has none"
        raise ProbeError(f"--n-last-blocks and --avgpool-patchtokens read a ViT's tokens; {what}")
    if dino and args.n_last_blocks > meta["arch_kwargs"]["num_layers"]:
        layers = meta["arch_kwargs"]["num_layers"]
        raise ProbeError(f"--n-last-blocks {args.n_last_blocks} exceeds the ViT's {layers} blocks")
    if dino:  # the same readout for a --random-init floor
        model = DinoReadout(model, args.n_last_blocks, args.avgpool_patchtokens)
    if args.raw_pixels:  # the linear probe standardises every pixel; kNN compares the normalised images
        model = nn.Flatten()
    data_args = resolve_data_args(args, meta)
    patch = meta["arch_kwargs"]["patch_size"] if meta["arch"] == "vit" else 1
    if data_args.image_size % patch:  # a smaller image fails in the patch conv, a larger one loses its border
        raise ProbeError(f"--image-size {data_args.image_size} is not a multiple of the ViT's patch size {patch}")
    data = lt_data.build_data(data_args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf = lt_data.eval_transform(data.image_size, data.mean, data.std)
    train_idx = list(range(len(data.train_full))) if args.train_on == "balanced" else data.lt_indices
    counts = lt_data.class_histogram([data.train_full.targets[i] for i in train_idx], data.num_classes)
    trained_on = args.train_on if args.train_on == "long-tailed" or min(counts) == max(counts) else "full (imbalanced)"
    extract = lambda images, idx, label: extract_features(  # noqa: E731
        model,
        lt_data.IndexedDataset(images, idx, tf),
        args.extract_batch_size,
        args.num_workers,
        device,
        args.amp,
        label,
    )
    train_f, train_y = extract(data.train_full, train_idx, "training")
    test_f, test_y = extract(data.test, range(len(data.test)), "test")
    groups = data.groups
    C = data.num_classes

    clf = train_linear(
        train_f, train_y, C, args.epochs, args.lr, args.batch_size, args.weight_decay, args.seed, verbose=True
    )
    with torch.no_grad():
        linear = accuracy_report(clf(test_f).argmax(1), test_y, C, groups)
    knn_k = min(args.knn_k, len(train_f))  # knn_predict's cap: all of a smaller bank
    knn = accuracy_report(knn_predict(train_f, train_y, test_f, C, knn_k, args.knn_temperature), test_y, C, groups)
    knn["k"], knn["temperature"] = knn_k, args.knn_temperature
    few = {}
    for shots in args.shots:
        runs = []
        for s in range(args.few_shot_seeds):
            idx = few_shot_indices(train_y, shots, args.seed + s)
            clf_s = train_linear(
                train_f[idx], train_y[idx], C, args.epochs, args.lr, args.batch_size, args.weight_decay, args.seed + s
            )
            with torch.no_grad():
                runs.append(accuracy_report(clf_s(test_f).argmax(1), test_y, C, groups)["top1"])
        m = sum(runs) / len(runs)
        few[str(shots)] = {"top1": m, "std": math.sqrt(sum((r - m) ** 2 for r in runs) / len(runs)), "runs": runs}
    return {
        "checkpoint": lt_data.printable(args.checkpoint),  # JSON holds no undecodable bytes
        "method": meta.get("method"),
        "step": meta.get("step"),
        "random_init": args.random_init,
        "raw_pixels": args.raw_pixels,
        "dataset": data_args.dataset,
        "pretrain_dataset": meta.get("data", {}).get("dataset"),
        "train_on": trained_on,  # what the probe trained on: an ImageFolder used as is is not balanced
        "readout": {"n_last_blocks": args.n_last_blocks, "avgpool_patchtokens": args.avgpool_patchtokens}
        if meta["arch"] == "vit" and not args.raw_pixels
        else None,  # DINO's for ViTs (n 1 without the mean patch token: the class token the backbone outputs)
        "feature_dim": train_f.shape[1],
        "num_train": len(train_f),
        "num_test": len(test_f),
        "groups": groups,
        "linear": linear,
        "knn": knn,
        "few_shot": few,
    }


def markdown(res: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"probe of {'the raw pixels of ' if res['raw_pixels'] else ''}{res['checkpoint']} ({res['method']}"
        f"{', random init' if res['random_init'] else ''}) "
        f"on {res['dataset']}: {res['num_train']} training / {res['num_test']} test images, "
        f"probe trained on the {res['train_on']} set"
        + (
            f"; DINO's readout: {res['feature_dim']}-d features" if res.get("readout") not in (None, NO_READOUT) else ""
        ),
        "",
        "| probe | top-1 | many | medium | few | std(groups) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("linear", "knn"):
        r = res[name]
        label = f"knn (k {r['k']}, T {r['temperature']:g})" if "k" in r else name
        lines.append(
            f"| {label} | {fmt(r['top1'])} | {fmt(r.get('many'))} | {fmt(r.get('medium'))} | "
            f"{fmt(r.get('few'))} | {fmt(r.get('group_std'))} |"
        )
    for shots, r in res["few_shot"].items():
        lines.append(f"| linear {shots}-shot (mean of {len(r['runs'])}) | {fmt(r['top1'])} ± {fmt(r['std'])} | | | | |")
    return "\n".join(lines)


def check_writable(path: str, what: str = "the results") -> None:
    """Raise ProbeError unless the file ``path`` can be written (os.replace of a sibling .part, as the JSON is): it is
    not a folder, its folder exists and takes a new file (tried, since root passes every access check; nothing is
    left behind). ``path`` ending in os.sep: a folder that must exist and take new files (TensorBoard's events)."""
    folder = path if path.endswith(os.sep) else os.path.dirname(os.path.abspath(path))
    if not path.endswith(os.sep) and os.path.isdir(path):
        raise ProbeError(f"cannot write {what} to {path}: it is a folder; name a file, e.g. {path}/probe.json")
    try:
        os.stat(path)
    except OSError as e:
        if e.errno != errno.ENOENT:  # a loop, a file in the way (a dangling link is replaced, as a missing file)
            raise ProbeError(f"cannot write {what} to {path}: {lt_data.os_reason(path, e)}") from None
    test = os.path.join(folder, f".write-test{os.getpid()}")
    try:
        with open(test, "x"):
            pass
    except OSError as e:
        reason = e.strerror if e.errno in (errno.ENOENT, errno.EACCES, errno.EROFS) else lt_data.os_reason(folder, e)
        raise ProbeError(f"cannot write {what} to {folder.rstrip(os.sep) or os.sep}: {reason}") from None
    os.remove(test)


def output_path(args: ProbeArgs) -> str:
    """Where the JSON goes: --output, else probe_<dataset><variant>.json beside the checkpoint, <dataset> being the
    probe's --dataset or the pre-training run's (read from the checkpoint, which run_probe then reuses)."""
    if args.output:
        return args.output
    meta = _load(args.checkpoint, keep=True)["backbone"]
    dataset = resolve_data_args(args, meta).dataset
    return os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"probe_{dataset}{variant(args)}.json")


def variant(args: ProbeArgs) -> str:
    """A probe's suffix in file names and TensorBoard tags: DINO's readout (_last<n>, _last<n>avg) and the floor
    (_random, _pixels); empty for the backbone's own features."""
    dino = args.n_last_blocks != 1 or args.avgpool_patchtokens
    readout = f"_last{args.n_last_blocks}{'avg' if args.avgpool_patchtokens else ''}" if dino else ""
    return readout + ("_random" if args.random_init else "_pixels" if args.raw_pixels else "")


def _strict(value):
    """``value`` with every non-finite float as None: strict JSON, written in one try (allow_nan=False cannot fail)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_results(res: dict, out: str) -> None:
    """The JSON at ``out`` through a .part file (os.replace); ProbeError on failure, leaving no .part behind."""
    part = f"{out}.part"
    try:
        with open(part, "w") as f:
            json.dump(_strict(res), f, indent=1, allow_nan=False)
        os.replace(part, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(part)
        raise ProbeError(f"cannot write {out}: {lt_data.os_reason(out, e)}") from None


def log_tensorboard(res: dict, folder: str, suffix: str) -> None:
    """The numbers into the run's TensorBoard (``folder``): groups without classes (None) are skipped."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(folder) as w:
        tag = f"probe/{res['dataset']}{suffix}"
        for name in ("linear", "knn"):
            for key in ("top1", "many", "medium", "few", "group_std"):
                value = res[name].get(key)
                if value is not None:
                    w.add_scalar(f"{tag}/{name}_{key}", value, res["step"] or 0)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    lt_data.quiet_when_closed()  # linear_probe.py ... | head: the probe still ends with its JSON
    args = tyro.cli(ProbeArgs, args=argv)
    try:
        lt_data.check_ranges(args, lt_data.RANGES | RANGES)
        if not args.checkpoint:
            raise ProbeError("give the checkpoint to probe: python linear_probe.py runs/RUN/backbone.pt")
        if os.path.isdir(args.checkpoint):  # a run folder: its export, else its checkpoint
            found = [f for f in ("backbone.pt", "checkpoint.pt") if os.path.isfile(os.path.join(args.checkpoint, f))]
            if not found:
                raise ProbeError(f"{args.checkpoint} is a folder without backbone.pt or checkpoint.pt")
            args.checkpoint = os.path.join(args.checkpoint, found[0])
        if args.random_init and args.raw_pixels:
            raise ProbeError("--random-init and --raw-pixels exclude each other: the raw pixels have no weights")
        if "OMP_NUM_THREADS" not in os.environ:  # a share of the cores set on purpose (parallel jobs) wins
            torch.set_num_threads(lt_data.usable_cpus())  # here, not at import: the training scripts import this
        out = output_path(args)  # the final path, checked before the work, not after it
        check_writable(out)
        events = os.path.dirname(os.path.abspath(args.checkpoint)) + os.sep
        if args.tensorboard:  # its folder too: nothing after the JSON may fail
            if lt_data.printable(events) != events:  # TensorBoard's event writer encodes its path as UTF-8
                raise ProbeError(
                    f"--tensorboard: {lt_data.printable(events)} is not UTF-8, which TensorBoard cannot write to"
                )
            check_writable(events, "TensorBoard events")
        res = run_probe(args)
        suffix = variant(args)
        print(markdown(res))  # the numbers on the screen first: a failed write loses nothing
        write_results(res, out)
    except (ProbeError, BackboneError, lt_data.DataError) as e:  # also a DataError re-raised by a DataLoader worker
        print(f"linear_probe.py: error: {lt_data.error_line(e)}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    if args.tensorboard:
        try:
            log_tensorboard(res, events, suffix)
        except Exception as e:  # the results are written: say so, in one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(
                f"linear_probe.py: error: wrote {out}, but the TensorBoard log in {events} failed: {reason[:200]}",
                file=sys.stderr,
            )
            sys.exit(2)
    return res


if __name__ == "__main__":
    main()
