"""MSN / PMSN: Masked Siamese Networks with a uniform or a power-law cluster prior.

Assran et al. (ICLR 2023), "The Hidden Uniform Cluster Prior in Self-Supervised Learning", show that
MSN's mean-entropy maximisation is a KL to a uniform prior over prototypes, which hurts on long-tailed
data; PMSN replaces it by KL(p_mean || pi) to a power law pi_k ~ k^(-tau). MSN itself is Assran et al.
(ECCV 2022), "Masked Siamese Networks for Label-Efficient Learning": a ViT sees a masked anchor view and
small focal views; an EMA target encoder sees an unmasked view; both are soft-assigned to learnable
prototypes and the anchor assignment is trained to match the sharpened (and Sinkhorn-balanced) target.

    python msn_prior.py --dataset cifar10 --imbalance-ratio 100 --prior uniform         # MSN
    python msn_prior.py --dataset cifar10 --imbalance-ratio 100 --prior power-law --prior-tau 0.25   # PMSN
    python msn_prior.py --dataset synthetic --epochs 5 --arch vit_tiny                  # no data needed
    torchrun --nproc_per_node 4 msn_prior.py --batch-size 64    # --batch-size is per process
    python linear_probe.py runs/<run-name>/backbone.pt          # probes the target (EMA) encoder

Sections marked "shared" are textually identical in supervised_baseline.py, simsiam_rwsam.py,
msn_prior.py and excb.py (tests/test_skeleton.py enforces it): diff two scripts to see the method.
"""

# ============================================================ shared: imports
from __future__ import annotations

import dataclasses
import math
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro

import lt_data
from linear_probe import CHECKPOINT_FORMAT, EXPORT_FORMAT, KNNMonitor, build_backbone, feature_dim
from torchvision.utils import make_grid


# ============================================================ shared: arguments
@dataclass
class Args(lt_data.DataArgs):
    run_name: Optional[str] = None
    """run folder name under --output-dir; default: <method>_<dataset>_r<ratio>[_twin]_s<seed>. An existing run of that name resumes"""
    output_dir: str = "runs"
    """where run folders go (TensorBoard events, checkpoint.pt, backbone.pt)"""
    seed: int = 1
    """seed of initialisation, data order and augmentations"""
    deterministic: bool = False
    """deterministic kernels (torch.use_deterministic_algorithms); slower on GPU, needed for bit-identical resume there"""
    max_steps: Optional[int] = None
    """stop after this many optimisation steps (smoke runs); the schedules still span --epochs"""
    train_steps: Optional[int] = None
    """replaces --epochs by the fewest whole epochs of at least this many optimisation steps: one budget for data sets of any size"""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """autocast dtype: bf16, fp16 (with a GradScaler), none (fp32); auto: bf16 on CUDA GPUs with bf16, fp16 on older ones, bf16 on CPUs with native bf16 (AVX512-BF16/AMX, Arm BF16), else none (emulated bf16 is ~2x slower than fp32)"""
    compile: bool = False
    """torch.compile the training model"""
    channels_last: bool = True
    """channels-last memory format for the model and images (faster convolutions on CPU and tensor-core GPUs)"""
    sync_bn: bool = False
    """SyncBatchNorm across processes (CUDA only); otherwise BatchNorm statistics are per process"""
    sampling: Literal["instance", "class-balanced"] = "instance"
    """instance: each image once per epoch; class-balanced: draws with probability 1/(C*n_class) (uses labels: an oracle for SSL)"""
    num_workers: Optional[int] = None
    """data-loading processes per training process; default: min(8, CPU cores per process)"""
    log_every: int = 50
    """log to TensorBoard and print a progress line every this many steps (and after the first step)"""
    checkpoint_every: int = 500
    """also write checkpoint.pt every this many steps (always at the end of an epoch and of the run)"""
    eval_every: int = 5
    """online kNN monitor (eval/knn_top1 of the exported backbone; k 20, cosine, T 0.07): before training, every this many epochs and at the end; 0: off"""
    eval_bank: int = 5000
    """kNN monitor's bank: a class-balanced random subsample of this many un-augmented images of the full training set"""
    eval_queries: int = 2000
    """kNN monitor's queries: a class-balanced random subsample of this many test images; 0: the whole test set"""

    # ======================================================== method: arguments
    arch: Literal["vit_tiny", "vit_small", "vit_base"] = "vit_small"
    """ViT preset: tiny 192-d/3 heads, small 384-d/6 heads, base 768-d/12 heads; 12 layers, MLP 4x (DeiT)"""
    vit_layers: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """override the preset's number of transformer layers (tiny test models)"""
    vit_dim: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """override the preset's width (tiny test models); the MLP is 4x the width"""
    vit_heads: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """override the preset's number of attention heads"""
    patch_size: Annotated[Optional[int], lt_data.resolved_later("4 below 64 px, else 16", "INT")] = None
    """ViT patch size; default 4 below 64 px (CIFAR: 64 patches), 16 otherwise"""
    focal_size: Annotated[Optional[int], lt_data.resolved_later("half the image below 112 px, else 96", "INT")] = None
    """side of the focal anchor crops; default half the image below 112 px (CIFAR: 16), else 96 (MSN at 224)"""
    num_focal: int = 10
    """focal (small) anchor views per image (MSN: 10)"""
    mask_ratio: float = 0.15
    """fraction of the anchor view's patch tokens dropped (MSN ViT-S/16 config: 0.15); focal views are not masked"""
    mask_shared: bool = False
    """one mask for the whole batch, as the official MSN code; default: a mask per image"""
    head_hidden: int = 2048
    """hidden width of the 3-layer projection head (MSN: 2048)"""
    head_out: int = 256
    """output width of the projection head = prototype dimension (MSN: 256)"""
    num_prototypes: int = 1024
    """number of learnable prototypes K (MSN: 1024)"""
    anchor_temp: float = 0.1
    """softmax temperature of the anchor predictions"""
    target_temp: float = 0.025
    """softmax temperature of the targets (MSN: 0.1 sharpened with T = 0.25)"""
    prior: Literal["uniform", "power-law"] = "uniform"
    """cluster prior of the regulariser: uniform (MSN's mean-entropy maximisation) or power-law (PMSN)"""
    prior_tau: float = 0.25
    """power-law exponent tau: pi_k ~ k^(-tau) over prototype index k = 1..K (only with --prior power-law)"""
    sinkhorn: Annotated[Optional[Literal["uniform", "off"]],
                        lt_data.resolved_later("uniform for --prior uniform, off for --prior power-law", "{uniform,off}")] = None
    """Sinkhorn-balance the targets to uniform prototype marginals (3 iterations, global batch); default: uniform for --prior uniform, off for --prior power-law (uniform balancing fights a non-uniform prior)"""
    reg_weight: float = 1.0
    """weight lambda of the regulariser KL(p_mean || prior)"""
    epochs: int = 800
    """training epochs (MSN ViT-S/16: 800)"""
    batch_size: int = 256
    """batch size per process (the global batch is this times the number of processes)"""
    lr: float = 2.5e-4
    """AdamW peak learning rate for a global batch of 256, scaled linearly (MSN: 1e-3 at 1024)"""
    start_lr_ratio: float = 0.2
    """learning rate at step 0 as a fraction of the peak (MSN: 2e-4 / 1e-3)"""
    final_lr_ratio: float = 1e-3
    """cosine target of the learning rate as a fraction of the peak (MSN: 1e-6 / 1e-3)"""
    warmup_epochs: int = 10
    """linear warm-up epochs (MSN at 224 px: 15)"""
    weight_decay: float = 0.04
    """start of the cosine weight-decay schedule (weight matrices only)"""
    final_weight_decay: float = 0.4
    """end of the cosine weight-decay schedule"""
    ema_momentum: float = 0.996
    """start of the target encoder's EMA momentum; rises linearly to 1"""
    horizon: float = 1.25
    """the lr, weight-decay and momentum schedules span this many times the total steps (MSN: 1.25, so they never reach their end values)"""
    clip_grad: float = 3.0
    """gradient-norm clipping of the encoder and head (not the prototypes); 0 disables"""


# ============================================================ method: model and loss
import copy

from linear_probe import ProbeError, vit_kwargs

METHOD = "msn"


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceMean(torch.autograd.Function):
    """Forward: the mean over processes (all-reduce sum / world size). Backward: identity.

    Each process gets dR/dp_mean for its own share; DDP then averages the parameter gradients over
    processes, which supplies the 1/world-size factor: the result equals one process on the global batch."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad):
        return grad


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes with a gradient that survives DDP's averaging (identity when not distributed)."""
    return _AllReduceMean.apply(x) if _dist_world() > 1 else x


def power_law_prior(num_prototypes: int, tau: float) -> torch.Tensor:
    """PMSN's prior (Assran et al. 2023, Sec. 4): pi_k = k^(-tau) / sum_j j^(-tau), k = 1..K; tau = 0 is uniform."""
    k = torch.arange(1, num_prototypes + 1, dtype=torch.float64)
    pi = k.pow(-float(tau))
    return (pi / pi.sum()).float()


@torch.no_grad()
def sinkhorn(q: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp on target probabilities q [B, K] over the global batch (MSN, Eq. 3 of the ECCV paper and
    its code): alternately give every prototype the mass 1/K and every sample the mass 1/B_global; rows of the
    result sum to 1. Prototype sums are all-reduced across processes; sample sums are local."""
    world = _dist_world()
    Q = q.float().t().clone()                     # K x B
    K, B = Q.shape[0], Q.shape[1] * world
    total = Q.sum()
    if world > 1:
        dist.all_reduce(total)
    Q /= total
    for _ in range(iters):
        rows = Q.sum(dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(rows)
        Q /= rows
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def _msn_terms(anchor_emb, target_emb, prototypes, prior, anchor_temp=0.1, target_temp=0.025, sinkhorn_iters=3,
               reg_weight=1.0) -> dict:
    """msn_loss with its intermediate quantities (for the logs)."""
    num_views = anchor_emb.shape[0] // target_emb.shape[0]
    if num_views * target_emb.shape[0] != anchor_emb.shape[0]:
        raise ValueError(f"anchor rows {anchor_emb.shape[0]} are not a multiple of target rows {target_emb.shape[0]}")
    protos = F.normalize(prototypes.float(), dim=1)
    anchor = F.normalize(anchor_emb.float(), dim=1)
    log_p = F.log_softmax(anchor @ protos.t() / anchor_temp, dim=1)          # [V*B, K]
    with torch.no_grad():
        target = F.normalize(target_emb.float(), dim=1)
        q = F.softmax(target @ protos.t() / target_temp, dim=1)              # [B, K]
        if sinkhorn_iters > 0:
            q = sinkhorn(q, sinkhorn_iters)
        q_rep = q.repeat(num_views, 1)                                       # view-major, matches anchor rows
    cross_entropy = -(q_rep * log_p).sum(dim=1).mean()
    p_mean = global_mean(log_p.exp().mean(dim=0))                            # mean over the global batch
    prior = prior.to(p_mean)
    regulariser = (p_mean * (torch.log(p_mean.clamp_min(1e-12)) - torch.log(prior))).sum()
    return {"total": cross_entropy + reg_weight * regulariser, "cross_entropy": cross_entropy,
            "regulariser": regulariser, "p_mean": p_mean.detach(), "q": q, "log_p": log_p.detach()}


def msn_loss(anchor_emb: torch.Tensor, target_emb: torch.Tensor, prototypes: torch.Tensor, prior: torch.Tensor,
             anchor_temp: float = 0.1, target_temp: float = 0.025, sinkhorn_iters: int = 3,
             reg_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSN / PMSN objective; returns (total, cross_entropy, regulariser).

    anchor_emb [V*B, D] view-major (anchor view v is rows v*B .. v*B+B-1), target_emb [B, D], prototypes
    [K, D], prior [K]. Embeddings and prototypes are L2-normalised here.
      p_i = softmax(z_i . P / anchor_temp)                 anchor predictions (MSN Eq. 1)
      q_b = softmax(z+_b . P / target_temp), no gradient   targets: MSN's softmax at 0.1 sharpened with T=0.25
            then Sinkhorn over the global batch when sinkhorn_iters > 0 (MSN Eq. 3)
      CE  = mean_i H(q_{b(i)}, p_i)                        over all V*B anchor rows (MSN Eq. 2, first term)
      p_mean = mean_i p_i over every anchor row of the global batch (all-reduced across processes)
      R   = KL(p_mean || prior) = sum_k p_mean_k log(p_mean_k / prior_k)   (PMSN, Assran et al. 2023)
    With a uniform prior R = -H(p_mean) + log K: MSN's mean-entropy maximisation up to a constant.
    total = CE + reg_weight * R.
    """
    t = _msn_terms(anchor_emb, target_emb, prototypes, prior, anchor_temp, target_temp, sinkhorn_iters, reg_weight)
    return t["total"], t["cross_entropy"], t["regulariser"]


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style integer hash on int64 tensors (wrapping arithmetic)."""
    x = x + 0x1E3779B97F4A7C15
    x = (x ^ (x >> 30)) * 0x3F58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x14D049BB133111EB
    return x ^ (x >> 31)


def mask_keep_indices(indices: torch.Tensor, num_patches: int, keep: int, step: int, seed: int,
                      shared: bool = False) -> torch.Tensor:
    """The patch indices each anchor keeps [B, keep], a random subset drawn from (seed, step, image index).

    A function of the image index rather than of a process's RNG stream, so a run on 2 processes masks each
    image exactly as one process on the global batch does. shared: one subset for the whole batch (MSN code)."""
    idx = torch.zeros_like(indices) if shared else indices
    base = (idx.long() + (int(seed) * 1_000_003 + int(step)) * 1_000_000_007) * 65_537
    keys = base[:, None] + torch.arange(num_patches, device=indices.device)[None, :]
    return _mix64(_mix64(keys)).argsort(dim=1)[:, :keep]


def projection_head(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """MSN's head: Linear-BN-GELU-Linear-BN-GELU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out))


def resolved(args: Args, data: lt_data.LTData) -> dict:
    """Architecture and view sizes with defaults filled in; raises RunError on impossible combinations."""
    focal = args.focal_size or (data.image_size // 2 if data.image_size < 112 else 96)
    try:
        vit = vit_kwargs(args.arch, data.image_size, args.vit_layers, args.vit_heads, args.vit_dim, args.patch_size,
                         {"--focal-size": focal})
    except ProbeError as e:
        raise RunError(str(e)) from None
    check_floats(args, "[0, 1)", "mask_ratio")
    check_floats(args, "(0, inf)", "anchor_temp", "target_temp", "horizon")
    check_floats(args, "[0, inf)", "prior_tau", "reg_weight", "weight_decay", "final_weight_decay", "clip_grad")
    check_floats(args, "[0, 1]", "start_lr_ratio", "final_lr_ratio", "ema_momentum")
    if args.batch_size < 2:  # the target view goes through the head alone
        raise RunError(f"--batch-size must be >= 2: the target head's BatchNorm needs 2 images per process, "
                       f"got {args.batch_size}")
    if args.num_focal < 0 or args.num_prototypes < 2 or args.warmup_epochs < 0:
        raise RunError("--num-focal must be >= 0, --num-prototypes >= 2 and --warmup-epochs >= 0")
    sink = args.sinkhorn or ("uniform" if args.prior == "uniform" else "off")
    return {"vit": vit, "focal_size": focal, "sinkhorn_iters": 3 if sink == "uniform" else 0}


def train_transform(args: Args, data: lt_data.LTData):
    """View 0: target (unmasked, EMA encoder); view 1: the anchor (masked); views 2..: focal anchors.
    MSN crops: scale (0.3, 1) for the two full-size views, (0.05, 0.3) for the focal views."""
    r = resolved(args, data)
    return lt_data.MultiCrop(data.image_size, r["focal_size"], 2, args.num_focal, data.mean, data.std,
                             global_scale=(0.3, 1.0), local_scale=(0.05, 0.3))


class Model(nn.Module):
    """Anchor ViT + head + prototypes (trained, inside DDP) and the EMA target ViT + head (no gradient)."""

    export_prefix = "target_encoder."  # MSN evaluates the target encoder

    def __init__(self, args: Args, data: lt_data.LTData):
        super().__init__()
        r = resolved(args, data)
        self.backbone_spec = {"arch": "vit", "arch_kwargs": r["vit"]}
        self.seed, self.mask_ratio, self.mask_shared = args.seed, args.mask_ratio, args.mask_shared
        self.sinkhorn_iters = r["sinkhorn_iters"]
        self.encoder = build_backbone("vit", **r["vit"])
        self.head = projection_head(r["vit"]["hidden_dim"], args.head_hidden, args.head_out)
        bound = args.head_out ** -0.5
        self.prototypes = nn.Parameter(torch.empty(args.num_prototypes, args.head_out).uniform_(-bound, bound))
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_head = copy.deepcopy(self.head)
        for p in [*self.target_encoder.parameters(), *self.target_head.parameters()]:
            p.requires_grad_(False)
        tau = args.prior_tau if args.prior == "power-law" else 0.0
        self.register_buffer("prior", power_law_prior(args.num_prototypes, tau))

    def forward(self, anchors: list[torch.Tensor], indices: torch.Tensor, step: int):
        """Anchor embeddings [V*B, D] view-major (masked full-size anchor, then the focal views, one forward per
        resolution) and the prototypes (returned through forward so DDP sees them used)."""
        big = anchors[0]
        n_patches = self.encoder.grid ** 2
        keep = None
        if self.mask_ratio > 0:
            keep = mask_keep_indices(indices, n_patches, int(n_patches * (1 - self.mask_ratio)), step, self.seed,
                                     self.mask_shared)
        out = [self.head(self.encoder(big, keep))]
        if len(anchors) > 1:
            out.append(self.head(self.encoder(torch.cat(anchors[1:]))))
        return torch.cat(out), self.prototypes

    @torch.no_grad()
    def target_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_head(self.target_encoder(x))

    @torch.no_grad()
    def ema_update(self, m: float) -> None:
        """target <- m * target + (1 - m) * online, parameters only (MSN); target BatchNorm keeps its own statistics."""
        online = [*self.encoder.parameters(), *self.head.parameters()]
        target = [*self.target_encoder.parameters(), *self.target_head.parameters()]
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, online, alpha=1.0 - m)


def make_optimizer(args: Args, model: Model, lr: float) -> torch.optim.Optimizer:
    """AdamW: weight matrices (ndim > 1) with the weight-decay schedule; biases and norms without; the
    prototypes without weight decay (MSN). Fused kernel: one pass over the parameters (about 2x faster on CPU)."""
    online = [*model.encoder.parameters(), *model.head.parameters()]
    return torch.optim.AdamW([
        {"params": [p for p in online if p.ndim > 1], "weight_decay": args.weight_decay, "wd_schedule": True},
        {"params": [p for p in online if p.ndim <= 1], "weight_decay": 0.0},
        {"params": [model.prototypes], "weight_decay": 0.0}], lr=lr, fused=True)


def _cosine(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def lr_factor(args: Args, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear warm-up from --start-lr-ratio to 1 over --warmup-epochs, then a cosine toward --final-lr-ratio
    over --horizon x the total steps (MSN)."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return args.start_lr_ratio + (1 - args.start_lr_ratio) * step / warmup
    horizon = args.horizon * total_steps
    return _cosine(1.0, args.final_lr_ratio, (step - warmup) / max(horizon - warmup, 1))


def schedules(args: Args, step: int, total_steps: int) -> tuple[float, float]:
    """(weight decay, EMA momentum) at a step: cosine and linear over --horizon x the total steps (MSN)."""
    t = step / (args.horizon * total_steps)
    return (_cosine(args.weight_decay, args.final_weight_decay, t),
            args.ema_momentum + (1 - args.ema_momentum) * min(t, 1.0))


def on_epoch_start(run: "Run", epoch: int) -> None:
    """Nothing per epoch: every schedule is a function of the step."""


def train_step(run: "Run", batch) -> dict[str, torch.Tensor | float]:
    """Anchor forward through DDP, target forward without gradient, msn_loss, clipped AdamW step, EMA update."""
    views, _, indices = batch
    args, model = run.args, run.model
    wd, m = schedules(args, run.step, run.total_steps)
    for group in run.optimizer.param_groups:
        if group.get("wd_schedule"):
            group["weight_decay"] = wd
    with run.autocast():
        anchor, protos = run.ddp_model(views[1:], indices, run.step)
        target = model.target_forward(views[0])
    t = _msn_terms(anchor, target, protos, model.prior, args.anchor_temp, args.target_temp, model.sinkhorn_iters,
                   args.reg_weight)
    loss = t["total"]
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    online = [*model.encoder.parameters(), *model.head.parameters()]
    grad_norm = nn.utils.clip_grad_norm_(online, args.clip_grad if args.clip_grad > 0 else float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    model.ema_update(m)

    with torch.no_grad():
        p_mean, prior, q = t["p_mean"], model.prior, t["q"]
        log_pm = torch.log(p_mean.clamp_min(1e-12))
        entropy = -(p_mean * log_pm).sum()
        counts = torch.bincount(q.argmax(dim=1), minlength=q.shape[1]).float()
        if run.world_size > 1:
            dist.all_reduce(counts)
        sorted_usage = p_mean.sort(descending=True).values
        p = t["log_p"].exp()
    return {"loss": loss.detach(), "losses/cross_entropy": t["cross_entropy"].detach(),
            "losses/regulariser": t["regulariser"].detach(),
            "charts/kl_mean_to_prior": t["regulariser"].detach(),
            "charts/kl_prior_to_mean": (prior * (torch.log(prior) - log_pm)).sum(),
            "charts/kl_sorted_to_prior":
                (sorted_usage * (torch.log(sorted_usage.clamp_min(1e-12)) - torch.log(prior))).sum(),
            "charts/prototype_entropy": entropy, "charts/effective_prototypes": entropy.exp(),
            "charts/prototypes_in_use": (counts > 0).sum().float(),
            "charts/target_max_prob": q.max(dim=1).values.mean(),
            "charts/anchor_entropy": -(p * t["log_p"]).sum(dim=1).mean(),
            "charts/ema_momentum": m, "charts/weight_decay": wd,
            "charts/grad_norm": grad_norm.detach(),
            "charts/sorted_usage": sorted_usage, "charts/sorted_usage_over_prior": sorted_usage / prior}


# ============================================================ shared: runtime
class RunError(Exception):
    """A condition that stops the run with one clear line and exit code 2."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: the run saved a checkpoint and exits with 128 + the signal number."""


class StopSignal:
    """SIGINT and SIGTERM only set a flag; the loop checks it after each step (under DDP at log, checkpoint and
    epoch-end steps, where an all-reduce makes every rank agree), saves a checkpoint and stops."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, run: "Run", sync_point: bool) -> int:
        if run.world_size == 1 or not sync_point:
            return self.signum if run.world_size == 1 else 0
        flag = torch.tensor(self.signum, device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclass
class Run:
    """Everything a training step needs."""

    args: Args
    device: torch.device
    rank: int
    world_size: int
    data: lt_data.LTData
    train_set: lt_data.IndexedDataset
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    steps_per_epoch: int
    total_steps: int
    run_dir: str
    step: int = 0
    epoch: int = 0
    checkpoint_step: int = -1  # step of the checkpoint on disk, -1: none

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def optimizer_step(run: Run, loss: torch.Tensor, clip_grad: Optional[float] = None) -> None:
    """Backward (scaled for fp16), optional gradient clipping on unscaled gradients, optimizer step."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()


def to_device(x: torch.Tensor, run: Run) -> torch.Tensor:
    """Move a batch tensor to the device (asynchronously from pinned memory); images in channels-last."""
    if x.ndim == 4 and run.args.channels_last:
        return x.to(run.device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(run.device, non_blocking=True)


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto -> the fastest autocast dtype the device computes natively: "bf16", "fp16" or "none" (fp32).
    fp16 runs SGD unfused: fused SGD (torch 2.14) allocates its momentum with empty_like and, when the GradScaler
    skips an overflowing first step, keeps that uninitialised memory as the momentum of every later step (also
    seen in LibreYOLO PR #771); fused AdamW honours the skip."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if platform.machine().lower() in ("x86_64", "amd64"):  # oneDNN runs bf16 natively only with these
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    else:  # Arm: true with the BF16 extension
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native else "none"


def setup_distributed() -> tuple[torch.device, int, int]:
    """DDP from torchrun's environment: NCCL on CUDA, gloo on CPU; returns (device, rank, world size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device, rank, world_size


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """Write to a temporary file, fsync, rename: a crash never leaves a half-written file at ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# flags that may differ when a run resumes; any other change is refused
RESUMABLE_FLAGS = ("max_steps", "num_workers", "log_every", "checkpoint_every", "compile", "channels_last", "download",
                   "data_dir", "output_dir", "eval_every", "eval_bank", "eval_queries")


def backbone_meta(run: Run) -> dict:
    """What linear_probe.py needs to rebuild the backbone and its data."""
    data_args = {f.name: getattr(run.args, f.name) for f in dataclasses.fields(lt_data.DataArgs)}
    data_args.update(image_size=run.data.image_size, imbalance_ratio=lt_data.resolved_ratio(run.args))
    return {**run.model.backbone_spec, "prefix": run.model.export_prefix, "method": METHOD, "data": data_args,
            "step": run.step}


def all_finite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Whether every float tensor is finite, as a bool tensor on ``device``: one fused max-|x| pass, no host sync."""
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(n).to(device) for n in torch._foreach_norm(tensors, ord=math.inf)]).all()


def kept_checkpoint(run: Run, path: str) -> str:
    return f"the last good checkpoint {path} (step {run.checkpoint_step}) is untouched" \
        if run.checkpoint_step >= 0 else "no checkpoint was written"


def save_checkpoint(run: Run, path: str) -> None:
    """Model, optimizer, scaler, scheduler, step, every rank's RNG states and the args (collective call).
    Refuses (RunError) a model or optimizer state holding a non-finite tensor: one host sync, at save time only."""
    state = [*run.model.state_dict().values(),
             *(t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t))]
    ok = all_finite(state, run.device).int()
    if run.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok:
        raise RunError(f"non-finite weights after step {run.step}; stopping, {kept_checkpoint(run, path)}. "
                       f"Try a lower --lr or --amp none")
    states = [None] * run.world_size
    if run.world_size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if run.rank == 0:
        atomic_save({"format": CHECKPOINT_FORMAT, "model": run.model.state_dict(),
                     "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                     "scheduler": run.scheduler.state_dict(), "step": run.step, "world_size": run.world_size,
                     "rng": states, "args": dataclasses.asdict(run.args), "backbone": backbone_meta(run)}, path)
    run.checkpoint_step = run.step


def load_checkpoint(run: Run, path: str) -> None:
    """Resume: refuse a checkpoint of other flags; restore everything save_checkpoint wrote."""
    try:
        ckpt = torch.load(path, map_location=run.device, weights_only=True)
    except Exception as e:
        raise RunError(f"cannot resume from {path} ({str(e).strip().splitlines()[0][:200]}); "
                       f"move it away to start afresh") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a checkpoint of these scripts; move it away to start afresh")
    old, new = ckpt["args"], dataclasses.asdict(run.args)
    changed = [k for k in new if k not in RESUMABLE_FLAGS and old.get(k) != new[k]]
    if changed or ckpt["backbone"]["method"] != METHOD:
        what = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} -> {new[k]}" for k in changed) or "another method"
        raise RunError(f"{path} was written with other flags ({what}); resume with the same command or "
                       f"choose another --run-name")
    if ckpt["world_size"] != run.world_size:
        raise RunError(f"{path} was written by {ckpt['world_size']} processes, this run has {run.world_size}; "
                       f"the global batch, learning rate and data order would change")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    for p, state in run.optimizer.state.items():  # saved under another --channels-last or device: take the
        for k, v in state.items():                # parameter's layout (fused kernels pair them in memory order)
            if torch.is_tensor(v) and v.shape == p.shape and (v.stride() != p.stride() or v.device != p.device):
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
    if ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.step = run.checkpoint_step = ckpt["step"]
    set_rng_state(ckpt["rng"][run.rank])


def export_backbone(run: Run, path: str) -> None:
    """backbone.pt: the backbone's state dict in plain torchvision layout, loadable with strict=True."""
    prefix = run.model.export_prefix
    state = {k[len(prefix):]: v for k, v in run.model.state_dict().items() if k.startswith(prefix)}
    if not all_finite(list(state.values()), run.device):
        raise RunError(f"non-finite backbone weights at step {run.step}; {path} not written")
    atomic_save({"format": EXPORT_FORMAT, "backbone": backbone_meta(run), "state_dict": state}, path)


def format_eta(seconds: float) -> str:
    """Hours and minutes, both floored: 3,000 s is 0h50m."""
    minutes = int(max(seconds, 0) // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def resolved_args(run: Run) -> dict:
    """The flags with the values this run resolved at start (data defaults, backbone sizes): the hyperparameters."""
    values = dataclasses.asdict(run.args)
    if isinstance(run, Run):
        values.update(backbone_meta(run)["data"])
        values.update({f"backbone.{k}": v for k, v in run.model.backbone_spec["arch_kwargs"].items()})
    return values


class Logger:
    """Rank-0 TensorBoard (charts/ and losses/ namespaces) and a progress line; no host sync between logs."""

    def __init__(self, run: Run, resumed: bool):
        self.run, self.sums, self.count = run, {}, 0
        self.writer = None
        self.t0, self.step0 = time.perf_counter(), run.step
        if run.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            # a resumed run logs again from step + 1: older events at or after that step are from the lost run
            self.writer = SummaryWriter(run.run_dir, purge_step=run.step + 1 if resumed else None)
            if not resumed:
                rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(resolved_args(run).items()))
                self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def accumulate(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """Sum the scalars: tensors on the device (no sync), Python floats (host-side schedules) on the host."""
        for k, v in metrics.items():
            if not torch.is_tensor(v):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            elif v.ndim == 0:
                self.sums[k] = self.sums.get(k, 0) + v.detach().float().to(self.run.device, non_blocking=True)
        self.last = metrics
        self.count += 1

    def write(self, evals: Optional[dict[str, float]] = None, eval_seconds: float = 0.0) -> None:
        """Mean of each scalar since the last write, histograms of the last step, lr, images/s, ETA, and the
        evaluations ``evals`` (which took ``eval_seconds``, left out of images/s and the ETA)."""
        run, keys, evals = self.run, list(self.sums), evals or {}
        on_device = [k for k in keys if torch.is_tensor(self.sums[k])]
        means = dict(zip(on_device, torch.stack([self.sums[k] for k in on_device]).tolist() if on_device else []))
        values = [means.get(k, self.sums[k]) / self.count for k in keys]
        elapsed = time.perf_counter() - self.t0 - eval_seconds
        images_per_s = (run.step - self.step0) * run.args.batch_size * run.world_size / max(elapsed, 1e-9)
        stop_step = min(run.total_steps, run.args.max_steps or run.total_steps)  # where this run will stop
        eta = (stop_step - run.step) * elapsed / max(run.step - self.step0, 1)
        shown = "".join(f" | {k.split('/')[-1]} {v:.2f}" for k, v in evals.items()) + \
            (f" ({eval_seconds:.0f}s)" if evals else "")
        if self.writer is not None:
            for k, v in [*zip(keys, values), *evals.items()]:
                self.writer.add_scalar(k if "/" in k else f"losses/{k}", v, run.step)
        if self.writer is not None and self.count == 0:
            print(f"step {run.step}, before training{shown}", flush=True)
        elif self.writer is not None:
            for k, v in self.last.items():
                if torch.is_tensor(v) and v.ndim > 0:
                    self.writer.add_histogram(k, v.detach().float().cpu(), run.step)
            self.writer.add_scalar("charts/learning_rate", run.optimizer.param_groups[0]["lr"], run.step)
            self.writer.add_scalar("charts/images_per_second", images_per_s, run.step)
            self.writer.add_scalar("charts/epoch", run.step / run.steps_per_epoch, run.step)
            loss = dict(zip(keys, values)).get("loss", float("nan"))
            memory = f" | {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if run.device.type == "cuda" else ""
            print(f"epoch {run.epoch + 1}/{run.args.epochs} step {run.step}/{run.total_steps} loss {loss:.4f}{shown} "
                  f"| {images_per_s:.0f} img/s{memory} | eta {format_eta(eta)}", flush=True)
        self.sums, self.count, self.t0, self.step0 = {}, 0, time.perf_counter(), run.step

    def write_views(self, views: list[torch.Tensor] | torch.Tensor, mean, std) -> None:
        """One image of the first 8 images of the batch (rows) x their augmented views (columns, resized to the
        first view's size), un-normalised: what the augmentations do to these images."""
        if self.writer is None:
            return
        views = views if isinstance(views, list) else [views]
        size = views[0].shape[-2:]
        m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        cols = [F.interpolate(v[:8].detach().float().cpu(), size=size) * s + m for v in views]
        grid = make_grid(torch.stack(cols, 1).flatten(0, 1).clamp(0, 1), nrow=len(cols))
        self.writer.add_image("views/augmented", grid, self.run.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_finite(run: Run, first_bad: torch.Tensor, ckpt_path: str) -> None:
    """Stop on a non-finite loss (checked at log and checkpoint steps, so no per-step host sync)."""
    if run.world_size > 1:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    bad = int(first_bad)
    if bad < 2**62:
        raise RunError(f"non-finite loss at step {bad} (epoch {bad // run.steps_per_epoch + 1}); stopping, "
                       f"{kept_checkpoint(run, ckpt_path)}. Try a lower --lr or --amp none")


def check_floats(args: Args, interval: str, *names: str) -> None:
    """Refuse a float flag that is not finite or lies outside ``interval`` ("(0, inf)", "[0, 1)", ...)."""
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    words = (f">= {lo:g}" if interval[0] == "[" else f"> {lo:g}") if hi == math.inf else f"in {interval}"
    for name in names:
        v, flag = getattr(args, name), "--" + name.replace("_", "-")
        if not math.isfinite(v):
            raise RunError(f"{flag} must be a finite number, got {v}")
        if not ((lo < v or (interval[0] == "[" and v == lo)) and (v < hi or (interval[-1] == "]" and v == hi))):
            raise RunError(f"{flag} must be {words}, got {v}")


def evaluate(run: Run, monitor: KNNMonitor) -> tuple[dict[str, float], float]:
    """The kNN monitor on the backbone that backbone.pt exports; returns ({"eval/knn_top1": %}, seconds)."""
    t0 = time.perf_counter()
    exported = run.model.get_submodule(run.model.export_prefix.rstrip("."))
    top1 = monitor(exported, lambda x: to_device(x, run), run.autocast)
    return {"eval/knn_top1": top1}, time.perf_counter() - t0


def validate(args: Args, world_size: int) -> None:
    """Fail fast on arguments that cannot work, before any data is read (method flags: the first method hook)."""
    for name in ("batch_size", "epochs", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "train_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_floats(args, "(0, inf)", "lr")
    if args.sync_bn and not torch.cuda.is_available():
        raise RunError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel)")
    if args.num_workers is not None and args.num_workers < 0:
        raise RunError(f"--num-workers must be >= 0, got {args.num_workers}")
    for name in ("eval_every", "eval_bank", "eval_queries"):
        if getattr(args, name) < 0:
            raise RunError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def train(args: Args) -> str:
    """Build everything, resume if the run exists, train, export; returns the run folder."""
    device, rank, world_size = setup_distributed()
    validate(args, world_size)
    amp_choice = "" if args.amp != "auto" else " (--amp auto)"
    args.amp = resolve_amp(args.amp, device)  # the checkpoint and hyperparameters store the resolved dtype
    ratio = lt_data.resolved_ratio(args)
    run_name = args.run_name or f"{METHOD}_{args.dataset}_r{ratio:g}{'_twin' if args.balanced_twin else ''}_s{args.seed}"
    run_dir = os.path.join(args.output_dir, run_name)
    ckpt_path, export_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "backbone.pt")
    data = lt_data.build_data(args)
    train_set = lt_data.IndexedDataset(data.train_full, data.pretrain_indices(args.balanced_twin),
                                       train_transform(args, data))  # the first method hook checks method flags
    global_batch = args.batch_size * world_size
    if global_batch > len(train_set):
        raise RunError(f"--batch-size {args.batch_size} x {world_size} processes = {global_batch} exceeds the "
                       f"{len(train_set)} training images")
    if args.train_steps:  # before anything reads --epochs (the checkpoint stores the resolved value)
        args.epochs = -(-args.train_steps // (len(train_set) // world_size // args.batch_size))
    if rank == 0:  # only now, so that a refused start leaves nothing behind
        try:
            os.makedirs(run_dir, exist_ok=True)
            probe = os.path.join(run_dir, f".write-test{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise RunError(f"cannot write to the run folder {run_dir}: {e.strerror}") from None

    seed_everything(args.seed, args.deterministic)  # same initial weights on every rank
    model = Model(args, data).to(device, memory_format=torch.channels_last if args.channels_last else None)
    if args.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_model = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = make_optimizer(args, model, args.lr * global_batch / 256)  # linear scaling rule, global batch
    sampler = lt_data.ResumableSampler(len(train_set), world_size, rank, args.seed,
                                       labels=train_set.targets if args.sampling == "class-balanced" else None)
    steps_per_epoch = len(sampler) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(args, s, total_steps, steps_per_epoch))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run = Run(args, device, rank, world_size, data, train_set, model, ddp_model, optimizer, scheduler, scaler,
              amp_dtype, steps_per_epoch, total_steps, run_dir)
    resumed = os.path.exists(ckpt_path)
    if resumed:
        load_checkpoint(run, ckpt_path)
    else:
        torch.manual_seed(args.seed * 1000 + rank)  # ranks draw different masks, noise, ...
    workers = args.num_workers if args.num_workers is not None else \
        min(8, max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    loader = lt_data.make_loader(train_set, args.batch_size, workers, sampler, drop_last=True)
    stop_step = min(total_steps, args.max_steps or total_steps)
    if rank == 0:
        print(f"{METHOD}: {len(train_set)} training images, {data.num_classes} classes, global batch "
              f"{global_batch} on {world_size} x {device.type}, {steps_per_epoch} steps/epoch, "
              + (f"resuming at step {run.step} of {stop_step}" if resumed else f"{stop_step} steps")
              + f", amp {args.amp}{amp_choice} -> {run_dir}",
              flush=True)

    logger = Logger(run, resumed)
    monitor = None
    if args.eval_every:
        monitor = KNNMonitor(data, args.eval_bank, args.eval_queries, max(args.batch_size, 256), 0,  # in-process:
                             args.seed, rank, world_size)                                    # no idle workers
        if not resumed:
            logger.write(*evaluate(run, monitor))
    first_bad = torch.full((), 2**62, dtype=torch.long, device=device)  # first step with a non-finite loss
    inject_nan = int(os.environ.get("SSL_IMBALANCE_INJECT_NAN_AT_STEP", "-1"))  # for the tests of the guard
    if os.environ.get("SSL_IMBALANCE_BN_RUNNING_STATS") == "1":  # for the DDP-equivalence tests: BatchNorm uses
        for m in model.modules():                                # running statistics, so the only per-process
            if isinstance(m, nn.modules.batchnorm._BatchNorm):   # batch statistics are the method's own
                m.register_forward_pre_hook(lambda mod, _: setattr(mod, "training", False))
    run.model.train()
    stop, start_step = StopSignal(), run.step
    while run.step < stop_step:
        run.epoch, done_in_epoch = divmod(run.step, steps_per_epoch)
        sampler.set_epoch(run.epoch, skip=done_in_epoch * args.batch_size)
        if done_in_epoch == 0:
            on_epoch_start(run, run.epoch)
        for batch in loader:
            batch = [[to_device(v, run) for v in x] if isinstance(x, list) else to_device(x, run) for x in batch]
            if run.step == 0:
                logger.write_views(batch[0], data.mean, data.std)
            metrics = train_step(run, batch)
            run.scheduler.step()
            run.step += 1
            if run.step == inject_nan:
                metrics["loss"] = metrics["loss"] + float("nan")
            first_bad = torch.where(torch.isfinite(metrics["loss"]), first_bad, torch.full_like(first_bad, run.step))
            logger.accumulate(metrics)
            end_of_epoch = run.step % steps_per_epoch == 0
            due = monitor is not None and (run.step == stop_step or end_of_epoch and
                                           (run.epoch + 1) % args.eval_every == 0)
            first = run.step == start_step + 1   # a first progress line after one step, not after log_every
            if run.step % args.log_every == 0 or run.step == stop_step or end_of_epoch or first:
                check_finite(run, first_bad, ckpt_path)
                logger.write(*(evaluate(run, monitor) if due else (None, 0.0)))
            if run.step % args.checkpoint_every == 0 or run.step == stop_step or end_of_epoch:
                check_finite(run, first_bad, ckpt_path)
                save_checkpoint(run, ckpt_path)
                if logger.writer is not None:  # the events up to the checkpoint survive a kill
                    logger.writer.flush()
            if run.step >= stop_step:
                break
            sync_point = run.step % args.log_every == 0 or run.step % args.checkpoint_every == 0 or end_of_epoch
            signum = stop.agreed(run, sync_point)
            if signum:
                if run.checkpoint_step != run.step:
                    check_finite(run, first_bad, ckpt_path)
                    save_checkpoint(run, ckpt_path)
                logger.close()
                raise Interrupted(signum, f"interrupted at step {run.step}; checkpoint saved; run the same "
                                          f"command to resume")
    stop.restore()
    if rank == 0:
        export_backbone(run, export_path)
        print(f"done: step {run.step}; checkpoint {ckpt_path}; backbone {export_path}; probe with: "
              f"python linear_probe.py {export_path}", flush=True)
    logger.close()
    return run_dir


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    try:
        train(args)
    except (RunError, lt_data.DataError) as e:  # also a DataError re-raised by a DataLoader worker
        print(f"{os.path.basename(sys.argv[0])}: error: {lt_data.error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e.args[1], flush=True)
        sys.exit(128 + e.args[0])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
