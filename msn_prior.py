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
Reading order: the flags with their recipes (RECIPES) and ranges (RANGES), the method's interface and algorithm
(train_step), the training loop, the method's parts, and the shared plumbing last.
docs/msn_prior.md has the logged metrics and the implementation notes.
"""

# ============================================================ shared: imports
from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import io
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Callable, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

import linear_probe
import lt_data
from linear_probe import BackboneError, KNNMonitor, backbone_spec, build_backbone, feature_dim, vit_kwargs


# ============================================================ shared: arguments
@lt_data.help_from_docstrings
@dataclass
class Args(lt_data.DataArgs):
    recipe: Optional[str] = None  # named flag values (RECIPES, listed above), applied before the command line's flags
    run_name: Optional[str] = None  # run folder; default <method>_<dataset>_r<ratio>[_twin]_s<seed>; existing: resumed
    output_dir: str = "runs"  # where run folders go (TensorBoard events, checkpoint.pt, backbone.pt)
    seed: int = 1  # seed of initialisation, data order, augmentations and each step's random draws
    deterministic: bool = False  # deterministic kernels: slower on GPU, needed there to resume bit-exactly
    max_steps: Optional[int] = None  # stop after this many optimisation steps (smoke runs); schedules span --epochs
    train_steps: Optional[int] = None  # replaces --epochs by the fewest whole epochs of at least this many steps
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # autocast; auto: native bf16, else fp16 (GPU), fp32 (CPU)
    compile: bool = False  # torch.compile the training model
    channels_last: bool = True  # channels-last model and images (faster convolutions on CPU and tensor-core GPUs)
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only); otherwise BatchNorm statistics are per process
    sampling: Literal["instance", "class-balanced"] = "instance"  # class-balanced: p = 1/(C n_class), a label oracle
    num_workers: Optional[int] = None  # data-loading processes per training process; default min(8, cores/process)
    log_every: int = 50  # TensorBoard and a progress line every this many steps (and after the first)
    checkpoint_every: int = 500  # checkpoint.pt every this many steps (and at the end of each epoch and of the run)
    eval_every: int = 5  # kNN monitor (k 20, T 0.07) before training, every this many epochs and at the end; 0: off
    eval_bank: int = 5000  # kNN monitor's bank: a class-balanced subsample of this many un-augmented training images
    eval_queries: int = 2000  # kNN monitor's queries: a class-balanced subsample of this many test images; 0: all

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
    sinkhorn: Annotated[
        Optional[Literal["uniform", "prior", "off"]],
        lt_data.resolved_later("uniform for --prior uniform, prior for --prior power-law", "{uniform,prior,off}"),
    ] = None
    """Sinkhorn-balance the targets (3 iterations, global batch) to uniform prototype marginals or to the prior's
    (pi_k: PMSN's targets then use the prototypes as the regulariser asks) or not at all; default: uniform for
    --prior uniform, prior for --prior power-law (uniform balancing fights a non-uniform prior; without balancing
    the targets collapsed onto one prototype on MNIST, docs/msn_prior.md)"""
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
    """the lr, weight-decay and momentum schedules span this many times the total steps (MSN: 1.25, so they never reach
    their end values)"""
    clip_grad: float = 3.0
    """gradient-norm clipping of the encoder and head (not the prototypes); 0 disables"""


# --recipe NAME: named flag values, applied before the command line's flags (which win). Assran et al. give no
# CIFAR-LT setting: cifar10-lt is MSN's ViT-S/16 config (msn_vits16.yaml) at CIFAR's 32 px, our adaptation.
RECIPES = {
    "cpu": (
        "MSN, 4-layer ViT, 16 px, 6 epochs of Fashion-MNIST-LT (docs/cpu_recipes.md; --prior power-law: PMSN)",
        dict(arch="vit_tiny", vit_layers=4, vit_dim=96, vit_heads=3, image_size=16, train_steps=1200)
        | dict(warmup_epochs=1, batch_size=64, lr=2e-3, ema_momentum=0.99)
        | dict(num_focal=4, head_hidden=256, head_out=64, num_prototypes=64),
    ),
    "cifar10-lt": (
        "MSN's ViT-S config at 32 px on CIFAR-10-LT: ViT-S/4, 10 focal views of 16 px, 800 epochs, AdamW (ours)",
        dict(dataset="cifar10", imbalance_ratio=100, image_size=32)  # the LDAM-DRW CIFAR-10-LT (Cao et al. 2019)
        | dict(arch="vit_small", patch_size=4, focal_size=16)  # msn_vits16.yaml's ViT-S; 32/16 px crops (ours)
        | dict(num_focal=10, mask_ratio=0.15, num_prototypes=1024, head_hidden=2048, head_out=256)  # msn_vits16.yaml
        | dict(epochs=800, batch_size=256, lr=2.5e-4, warmup_epochs=10)  # yaml: 800 epochs, 1e-3 at 1024; warm-up ours
        | dict(weight_decay=0.04, final_weight_decay=0.4, ema_momentum=0.996, horizon=1.25, clip_grad=3.0),  # yaml
    ),
    "imagenet-lt": (
        "MSN's ViT-S/16 config (msn_vits16.yaml) on ImageNet-LT: 224 px, 10 focal views of 96 px, 800 epochs",
        dict(dataset="imagenet-lt", image_size=224)  # the OLTR split files (Liu et al., CVPR 2019)
        | dict(arch="vit_small", patch_size=16, focal_size=96, num_focal=10, mask_ratio=0.15)  # msn_vits16.yaml
        | dict(num_prototypes=1024, head_hidden=2048, head_out=256, epochs=800, batch_size=64)  # yaml: 64 x 16 GPUs
        | dict(lr=2.5e-4, warmup_epochs=15, weight_decay=0.04, final_weight_decay=0.4)  # yaml: 1e-3 at 1024
        | dict(ema_momentum=0.996, horizon=1.25, clip_grad=3.0),  # yaml
    ),
}

# The range of every numeric flag of the method (validate; the shared flags': SHARED_RANGES, the data's: lt_data.RANGES)
RANGES = dict(batch_size="[2, inf): the target head's BatchNorm needs 2 images per process")  # the target view alone
RANGES |= dict(mask_ratio="[0, 1)", anchor_temp="(0, inf)", target_temp="(0, inf)", horizon="(0, inf)")
RANGES |= dict(prior_tau="[0, inf)", reg_weight="[0, inf)", final_weight_decay="[0, inf)", clip_grad="[0, inf)")
RANGES |= dict(start_lr_ratio="[0, 1]", final_lr_ratio="[0, 1]", ema_momentum="[0, 1]", num_focal="[0, inf)")
RANGES |= dict(num_prototypes="[2, inf)", head_hidden="[1, inf)", head_out="[1, inf)", focal_size="[1, inf)")


# ============================================================ method: algorithm
# The method's interface: what the shared sections call here, and what each must return (a new method defines all):
#   METHOD                           str: the run name's prefix and the method that checkpoint.pt and backbone.pt name
#   Args (method: arguments)         the method's flags, with epochs, batch_size, lr, weight_decay, warmup_epochs,
#                                    vit_layers, vit_dim, vit_heads, patch_size among them (the shared code reads them)
#   RECIPES                          {name: (one-line description, {flag: value})}: what --recipe NAME applies
#   RANGES                           {flag: "[lo, hi)"}: the interval of every numeric flag of the method
#   check_args(args, data)           None; raises RunError or BackboneError for flags that cannot work with the data
#   train_transform(args, data)      image -> a view or a list of views (batch[0]); its set_epoch(epoch), if any, is
#                                    called with each item's epoch
#   Model(args, data)                nn.Module with .backbone_spec (build_backbone's {"arch", "arch_kwargs"}) and
#                                    .export_prefix (the state-dict prefix of the backbone that backbone.pt holds)
#   make_optimizer(args, model, lr)  the optimizer at peak lr (scaled to the global batch); a param group with
#                                    "weight_decay_schedule": KEY takes schedules()[KEY] as its weight decay each step
#   schedules(args, step, total_steps, steps_per_epoch)
#                                    {"lr_scale": float (x each group's peak lr), other keys: floats}: run.schedule,
#                                    which train_step reads, each key logged as charts/<key>
#   on_epoch_start(run, epoch)       None; before an epoch's first step (not on a resume inside an epoch: what it
#                                    sets must be in the model's state dict)
#   train_step(run, batch)           one optimisation step on batch = [views, labels, indices] (on the device); returns
#                                    {"loss": scalar tensor (a non-finite one stops the run), ...}, no host sync; keys
#                                    starting with "loss" are averaged over the log interval, the rest feed diagnostics
#   diagnostics(run, out)            {chart name: tensor} from train_step's output at log steps, on every rank (it may
#                                    all-reduce): scalars as charts, vectors as histograms
#   run: the RunState (shared: runtime); the shared helpers: optimizer_step, cosine, warmup_cosine, run.autocast,
#   run.train_model (the model as the step calls it), run.to_device, run.schedule (this step's schedules)
METHOD = "msn"


def power_law_prior(num_prototypes: int, tau: float) -> torch.Tensor:
    """PMSN's prior (Assran et al. 2023, Sec. 4): pi_k = k^(-tau) / sum_j j^(-tau), k = 1..K; tau = 0 is uniform."""
    k = torch.arange(1, num_prototypes + 1, dtype=torch.float64)
    pi = k.pow(-float(tau))
    return (pi / pi.sum()).float()


def msn_loss(
    anchor_emb: torch.Tensor,
    target_emb: torch.Tensor,
    prototypes: torch.Tensor,
    prior: torch.Tensor,
    anchor_temp: float = 0.1,
    target_temp: float = 0.025,
    sinkhorn_iters: int = 3,
    reg_weight: float = 1.0,
    sinkhorn_marginals: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSN / PMSN objective; returns (total, cross_entropy, regulariser).

    anchor_emb [V*B, D] view-major (anchor view v is rows v*B .. v*B+B-1), target_emb [B, D], prototypes
    [K, D], prior [K]. Embeddings and prototypes are L2-normalised here.
      p_i = softmax(z_i . P / anchor_temp)                 anchor predictions (MSN Eq. 1)
      q_b = softmax(z+_b . P / target_temp), no gradient   targets: MSN's softmax at 0.1 sharpened with T=0.25
            then Sinkhorn over the global batch when sinkhorn_iters > 0 (MSN Eq. 3), to prototype marginals
            sinkhorn_marginals [K] (default uniform 1/K; the prior for --sinkhorn prior)
      CE  = mean_i H(q_{b(i)}, p_i)                        over all V*B anchor rows (MSN Eq. 2, first term)
      p_mean = mean_i p_i over every anchor row of the global batch (all-reduced across processes)
      R   = KL(p_mean || prior) = sum_k p_mean_k log(p_mean_k / prior_k)   (PMSN, Assran et al. 2023)
    With a uniform prior R = -H(p_mean) + log K: MSN's mean-entropy maximisation up to a constant.
    total = CE + reg_weight * R.
    """
    terms = msn_terms(
        anchor_emb,
        target_emb,
        prototypes,
        prior,
        anchor_temp,
        target_temp,
        sinkhorn_iters,
        reg_weight,
        sinkhorn_marginals,
    )
    return terms["total"], terms["cross_entropy"], terms["regulariser"]


def msn_terms(
    anchor_emb,
    target_emb,
    prototypes,
    prior,
    anchor_temp=0.1,
    target_temp=0.025,
    sinkhorn_iters=3,
    reg_weight=1.0,
    sinkhorn_marginals=None,
) -> dict:
    """``msn_loss`` with its intermediate quantities (p_mean [K], targets q [B, K], log p [V*B, K]) for the logs."""
    num_views = anchor_emb.shape[0] // target_emb.shape[0]
    if num_views * target_emb.shape[0] != anchor_emb.shape[0]:
        raise ValueError(f"anchor rows {anchor_emb.shape[0]} are not a multiple of target rows {target_emb.shape[0]}")
    protos = F.normalize(prototypes.float(), dim=1)
    anchor = F.normalize(anchor_emb.float(), dim=1)
    log_p = F.log_softmax(anchor @ protos.t() / anchor_temp, dim=1)  # [V*B, K]
    with torch.no_grad():
        target = F.normalize(target_emb.float(), dim=1)
        q = F.softmax(target @ protos.t() / target_temp, dim=1)  # [B, K]
        if sinkhorn_iters > 0:
            q = sinkhorn_knopp(q, sinkhorn_iters, sinkhorn_marginals)
        q_rep = q.repeat(num_views, 1)  # view-major, matches anchor rows
    cross_entropy = -(q_rep * log_p).sum(dim=1).mean()
    p_mean = global_mean(log_p.exp().mean(dim=0))  # mean over the global batch
    prior = prior.to(p_mean)
    regulariser = (p_mean * (torch.log(p_mean.clamp_min(1e-12)) - torch.log(prior))).sum()
    return {
        "total": cross_entropy + reg_weight * regulariser,
        "cross_entropy": cross_entropy,
        "regulariser": regulariser,
        "p_mean": p_mean.detach(),
        "q": q,
        "log_p": log_p.detach(),
    }


@torch.no_grad()
def sinkhorn_knopp(q: torch.Tensor, iters: int = 3, marginals: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sinkhorn-Knopp on target probabilities q [B, K] over the global batch (MSN, Eq. 3 of the ECCV paper and
    its code): alternately give every prototype k the mass marginals[k] (default 1/K; a prior [K] summing to 1)
    and every sample the mass 1/B_global; rows of the result sum to 1. Prototype sums are all-reduced across
    processes; sample sums are local."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    Q = q.float().t().clone()  # K x B
    K, B = Q.shape[0], Q.shape[1] * world
    total = Q.sum()
    if world > 1:
        dist.all_reduce(total)
    Q /= total
    mass = Q.new_full((K, 1), 1 / K) if marginals is None else marginals.to(Q)[:, None]  # prototype k's mass
    tiny = torch.finfo(Q.dtype).tiny  # a prototype whose targets underflowed to 0 (sharp --target-temp, a steep
    for _ in range(iters):  # prior) keeps 0 rather than making 0/0 NaN of its row
        rows = Q.sum(dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(rows)
        Q /= rows.clamp_min(tiny)
        Q *= mass
        Q /= Q.sum(dim=0, keepdim=True).clamp_min(tiny)
        Q /= B
    Q *= B
    return Q.t()


def train_step(run: RunState, batch) -> dict[str, torch.Tensor]:
    """One MSN / PMSN step (Assran et al. 2022, Sec. 3; 2023, Sec. 4) on the views of B images: view 0 the target
    (unmasked), view 1 the anchor (masked), views 2.. the focal anchors; returns the losses and what
    ``diagnostics`` needs (no host sync).

    1. anchor embeddings of the masked anchor and focal views (run.train_model: under DDP, and torch.compile with
       --compile); target embeddings of view 0 by the EMA target encoder (no gradient)
    2. L = CE(sharpened, Sinkhorn-balanced targets, anchor predictions) + lambda KL(p_mean || prior)  (msn_loss)
    3. AdamW step, the gradients of encoder and head clipped to --clip-grad (scheduled lr and weight decay)
    4. target <- m target + (1 - m) online (EMA, m scheduled from --ema-momentum to 1)
    """
    views, _, indices = batch
    args, model = run.args, run.model
    with run.autocast():
        anchor, prototypes = run.train_model(views[1:], indices, run.step)  # 1
        target = model.target_forward(views[0])
    terms = msn_terms(
        anchor,
        target,
        prototypes,
        model.prior,
        args.anchor_temp,
        args.target_temp,
        model.sinkhorn_iters,
        args.reg_weight,
        model.prior if model.sinkhorn_to_prior else None,
    )  # 2
    online = [*model.encoder.parameters(), *model.head.parameters()]
    grad_norm = optimizer_step(run, terms["total"], clip=online, max_norm=args.clip_grad or math.inf)  # 3
    target_params = [*model.target_encoder.parameters(), *model.target_head.parameters()]
    torch._foreach_lerp_(target_params, [p.detach() for p in online], 1 - run.schedule["ema_momentum"])  # 4: EMA
    return {
        "loss": terms["total"].detach(),
        "losses/cross_entropy": terms["cross_entropy"].detach(),
        "losses/regulariser": terms["regulariser"].detach(),
        "grad_norm": grad_norm.detach(),
        **{k: terms[k] for k in ("p_mean", "q", "log_p")},
    }


@torch.no_grad()
def diagnostics(run: RunState, out: dict) -> dict[str, torch.Tensor]:
    """The charts of a log step, from ``train_step``'s output: prototype usage against the prior (KLs both ways,
    entropy, prototypes in use, sorted usage), target and anchor sharpness, the gradient norm."""
    p_mean, prior, q, log_p = out["p_mean"], run.model.prior, out["q"], out["log_p"]
    log_pm = torch.log(p_mean.clamp_min(1e-12))
    entropy = -(p_mean * log_pm).sum()
    counts = torch.bincount(q.argmax(dim=1), minlength=q.shape[1]).float()
    if run.world_size > 1:
        dist.all_reduce(counts)
    sorted_usage = p_mean.sort(descending=True).values
    kl_sorted = (sorted_usage * (torch.log(sorted_usage.clamp_min(1e-12)) - torch.log(prior))).sum()
    return {
        "charts/kl_mean_to_prior": out["losses/regulariser"],
        "charts/kl_prior_to_mean": (prior * (torch.log(prior) - log_pm)).sum(),
        "charts/kl_sorted_to_prior": kl_sorted,
        "charts/prototype_entropy": entropy,
        "charts/effective_prototypes": entropy.exp(),
        "charts/prototypes_in_use": (counts > 0).sum().float(),
        "charts/target_max_prob": q.max(dim=1).values.mean(),
        "charts/anchor_entropy": -(log_p.exp() * log_p).sum(dim=1).mean(),
        "charts/grad_norm": out["grad_norm"],
        "charts/sorted_usage": sorted_usage,
        "charts/sorted_usage_over_prior": sorted_usage / prior,
    }


# ============================================================ shared: loop
def train(args: Args) -> str:
    """Build everything, resume if the run exists, train, export; returns the run folder."""
    world_size, rank, local_rank = launch_env()
    # SIGINT, SIGTERM and SIGHUP (a closed terminal; torchrun forwards them), from the first line on: before this
    # process's first step there is nothing to save, so the run stops at once (``Stopped``); after it they are noted,
    # and the run stops at the first step where every rank knows of one (``agreed_stop``), after a checkpoint
    signals, stops, stepped = [], (signal.SIGINT, signal.SIGTERM, signal.SIGHUP), False

    def on_signal(signum: int, _) -> None:
        if not stepped:
            raise Stopped(signum)
        signals.append(signum)

    handlers = {s: signal.signal(s, on_signal) for s in stops}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:  # DDP: NCCL on CUDA, gloo on CPU
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    validate(args)
    amp_flag, args.amp = args.amp, resolve_amp(args.amp, device)  # the checkpoint and hyperparameters: resolved
    data = from_rank0(lambda: lt_data.build_data(args), rank)  # indexed once per job, sent to the other ranks
    check_args(args, data)
    indices = data.pretrain_indices(args.balanced_twin)
    train_set = lt_data.IndexedDataset(data.train_full, indices, train_transform(args, data))
    global_batch, steps_per_epoch = args.batch_size * world_size, len(train_set) // world_size // args.batch_size
    if not steps_per_epoch:
        why = f"--batch-size {args.batch_size} x {world_size} processes = {global_batch}"
        raise RunError(f"{why} exceeds the {len(train_set)} training images")
    if args.train_steps:  # before anything reads --epochs (the checkpoint stores the resolved value)
        args.epochs = -(-args.train_steps // steps_per_epoch)
    twin = "_twin" if args.balanced_twin else ""
    name = args.run_name or f"{METHOD}_{args.dataset}_r{lt_data.resolved_ratio(args):g}{twin}_s{args.seed}"
    run_dir = os.path.join(args.output_dir, name)
    ckpt_path, export_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "backbone.pt")
    lock = make_run_dir(run_dir) if rank == 0 else None  # noqa: F841  (only now: a refused start leaves nothing)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.deterministic
    model = Model(args, data).to(device, memory_format=torch.channels_last if args.channels_last else None)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn and world_size > 1 else model
    train_model = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    train_model = torch.compile(train_model) if args.compile else train_model
    optimizer = make_optimizer(args, model, args.lr * global_batch / 256)  # linear scaling rule, global batch
    run = RunState(args, model, train_model, optimizer, data, train_set, device, steps_per_epoch, run_dir, amp_flag)
    ckpt = from_rank0(lambda: read_checkpoint(ckpt_path), rank)  # rank 0's run folder alone decides: all ranks
    if resumed := ckpt is not None:  # resume from its checkpoint, or none does (a per-node --output-dir works)
        load_checkpoint(run, ckpt, ckpt_path)
    labels = train_set.targets if args.sampling == "class-balanced" else None
    sampler = lt_data.ResumableSampler(len(train_set), world_size, rank, args.seed, labels=labels)
    loader = lt_data.make_loader(train_set, args.batch_size, args.num_workers, sampler, drop_last=True)
    logger = Logger(run, resumed)
    amp = f"amp {args.amp}" + (" (--amp auto)" if amp_flag == "auto" else "")
    if resumed and ckpt["args"]["amp"] != args.amp:  # --amp auto, resolved otherwise on this kind of machine
        amp += f", the checkpoint's steps ran in {ckpt['args']['amp']} (so the resume is not bit-exact)"
    schedule = f" of the schedules' {run.total_steps} (--max-steps)" if run.stop_step < run.total_steps else ""
    logger.say(
        f"{METHOD}: {len(train_set)} training images from {data.source}, {data.num_classes} classes, global batch "
        f"{global_batch} on {world_size} x {device.type}, {steps_per_epoch} steps/epoch, "
        + (f"resuming at step {run.step} of {run.stop_step}" if resumed else f"{run.stop_step} steps")
        + f"{schedule}, {amp} -> {run_dir}{logger.moved}"
    )
    monitor = KNNMonitor(data, args.eval_bank, args.eval_queries, seed=args.seed) if args.eval_every else None
    if monitor is not None and not resumed:
        logger.say(monitor.description)  # the step-0 evaluation can take minutes: never silent
        logger.write(monitor)
    first_nonfinite_step = torch.full((), 2**62, dtype=torch.long, device=device)  # 2**62: no non-finite loss yet
    while run.step < run.stop_step:
        epoch, done_in_epoch = divmod(run.step, steps_per_epoch)
        sampler.set_epoch(epoch, skip=done_in_epoch * args.batch_size)
        if done_in_epoch == 0:
            on_epoch_start(run, epoch)
        for batch in batches(loader, run, ckpt_path):
            random.seed(f"{args.seed} {rank} {run.step}")  # the step's draws (drop path, noise) are a function of
            torch.manual_seed(random.getrandbits(63))  # seed, rank and step alone: a resume draws what the run drew
            batch = [[run.to_device(v) for v in x] if isinstance(x, list) else run.to_device(x) for x in batch]
            if run.step == 0:
                logger.write_views(batch[0], data.mean, data.std)
            set_schedules(run)  # this step's lr, weight decay and the method's scheduled values
            out = train_step(run, batch)
            run.step, stepped = run.step + 1, True
            first_nonfinite_step = torch.where(torch.isfinite(out["loss"]), first_nonfinite_step, run.step)
            logger.accumulate({k: v for k, v in out.items() if k.startswith("loss")})
            # this step's decisions; every rank takes the same ones (agreed_stop: one all-reduce at log and save steps)
            last, end_of_epoch = run.step == run.stop_step, run.step % steps_per_epoch == 0
            log_now = run.step % args.log_every == 0 or run.step == logger.start + 1 or last or end_of_epoch
            save_now = run.step % args.checkpoint_every == 0 or last or end_of_epoch
            eval_now = monitor is not None and (last or run.step % (args.eval_every * steps_per_epoch) == 0)
            agree_now = log_now or save_now or signals and world_size == 1  # alone, a signal needs no agreement
            signum = agreed_stop(run, first_nonfinite_step, signals, ckpt_path) if agree_now else 0
            if log_now:
                logger.accumulate({**diagnostics(run, out), **{f"charts/{k}": v for k, v in run.schedule.items()}})
                logger.write(monitor if eval_now else None)
            if save_now or signum and run.checkpoint_step != run.step:
                save_checkpoint(run, ckpt_path)
            if signum:  # the exit code a shell gives a process the signal killed
                logger.close(f"interrupted at step {run.step}; checkpoint saved; run the same command to resume")
                sys.exit(128 + signum)
            if last:
                break
    for s, handler in handlers.items():
        signal.signal(s, handler)
    if rank == 0:
        export_backbone(run, export_path)
    probe = f"python linear_probe.py {shlex.quote(export_path)}"
    logger.close(f"done: step {run.step}; checkpoint {ckpt_path}; backbone {export_path}; probe with: {probe}")
    return run_dir


# ============================================================ method: parts
def check_args(args: Args, data: lt_data.LTData) -> None:
    """The method's flags that need the data (``validate`` checked every flag's range before the data was read)."""
    vit_spec(args, data)
    if args.prior == "power-law" and power_law_prior(args.num_prototypes, args.prior_tau).min() == 0:
        safe = 103.0 / math.log(args.num_prototypes)  # float32 holds no positive number below e^-103.3
        raise RunError(
            f"--prior-tau {args.prior_tau:g} gives the last of --num-prototypes {args.num_prototypes} a prior mass "
            f"below float32's range (k^-tau): its log is -inf and the loss non-finite; use --prior-tau below {safe:.1f}"
        )


def focal_size(args: Args, data: lt_data.LTData) -> int:
    """--focal-size's value, the focal crops' side: as given, else half the image below 112 px (CIFAR: 16) or 96 (MSN
    at 224), rounded down to a multiple of the patch, at least one (Fashion-MNIST's 28 px with patch 4: 12, not 14,
    which the ViT cannot tile)."""
    patch = args.patch_size or (4 if data.image_size < 64 else 16)
    return args.focal_size or max(patch, (data.image_size // 2 if data.image_size < 112 else 96) // patch * patch)


def vit_spec(args: Args, data: lt_data.LTData) -> dict:
    """The ViT's build_backbone arguments; raises BackboneError on impossible sizes (focal views included)."""
    return vit_kwargs(
        args.arch,
        data.image_size,
        args.vit_layers,
        args.vit_heads,
        args.vit_dim,
        args.patch_size,
        {"--focal-size": focal_size(args, data)},
    )


def train_transform(args: Args, data: lt_data.LTData):
    """View 0: target (unmasked, EMA encoder); view 1: the anchor (masked); views 2..: focal anchors.
    MSN crops: scale (0.3, 1) for the two full-size views, (0.05, 0.3) for the focal views."""
    return lt_data.MultiCrop(
        data.image_size,
        focal_size(args, data),
        2,
        args.num_focal,
        data.mean,
        data.std,
        global_scale=(0.3, 1.0),
        local_scale=(0.05, 0.3),
    )


class Model(nn.Module):
    """Anchor ViT + head + prototypes (trained, inside DDP) and the EMA target ViT + head (no gradient)."""

    export_prefix = "target_encoder."  # MSN evaluates the target encoder

    def __init__(self, args: Args, data: lt_data.LTData):
        super().__init__()
        vit = vit_spec(args, data)
        self.backbone_spec = {"arch": "vit", "arch_kwargs": vit}
        self.seed, self.mask_ratio, self.mask_shared = args.seed, args.mask_ratio, args.mask_shared
        sinkhorn = args.sinkhorn or ("uniform" if args.prior == "uniform" else "prior")  # None: by the prior
        self.sinkhorn_iters = 0 if sinkhorn == "off" else 3
        self.sinkhorn_to_prior = sinkhorn == "prior"
        self.encoder = build_backbone("vit", **vit)
        self.head = projection_head(vit["hidden_dim"], args.head_hidden, args.head_out)
        bound = args.head_out**-0.5
        self.prototypes = nn.Parameter(torch.empty(args.num_prototypes, args.head_out).uniform_(-bound, bound))
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_head = copy.deepcopy(self.head).requires_grad_(False)
        tau = args.prior_tau if args.prior == "power-law" else 0.0
        self.register_buffer("prior", power_law_prior(args.num_prototypes, tau))

    def forward(self, anchors: list[torch.Tensor], indices: torch.Tensor, step: int):
        """Anchor embeddings [V*B, D] view-major (masked full-size anchor, then the focal views, one forward per
        resolution) and the prototypes (returned through forward so DDP sees them used)."""
        num_patches = self.encoder.grid**2
        keep = None
        if self.mask_ratio > 0:
            kept = int(num_patches * (1 - self.mask_ratio))
            keep = mask_keep_indices(indices, num_patches, kept, step, self.seed, self.mask_shared)
        out = [self.head(self.encoder(anchors[0], keep))]
        if len(anchors) > 1:
            out.append(self.head(self.encoder(torch.cat(anchors[1:]))))
        return torch.cat(out), self.prototypes

    @torch.no_grad()
    def target_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_head(self.target_encoder(x))


def projection_head(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """MSN's head: Linear-BN-GELU-Linear-BN-GELU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.GELU(),
        nn.Linear(hidden, out),
    )


def make_optimizer(args: Args, model: Model, lr: float) -> torch.optim.Optimizer:
    """AdamW: weight matrices (ndim > 1) on the weight-decay schedule; biases, norms and the prototypes without
    weight decay (MSN). Fused kernel: one pass over the parameters (about 2x faster on CPU)."""
    online = [*model.encoder.parameters(), *model.head.parameters()]
    groups = [
        {
            "params": [p for p in online if p.ndim > 1],
            "weight_decay": args.weight_decay,
            "weight_decay_schedule": "weight_decay",
        },
        {"params": [p for p in online if p.ndim <= 1], "weight_decay": 0.0},
        {"params": [model.prototypes], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def schedules(args: Args, step: int, total_steps: int, steps_per_epoch: int) -> dict[str, float]:
    """MSN's schedules, all over --horizon x the total steps (so they never reach their end values):
    lr_scale (x the peak lr) linear from --start-lr-ratio to 1 over --warmup-epochs, then a cosine toward
    --final-lr-ratio; weight_decay a cosine from --weight-decay to --final-weight-decay; ema_momentum linear from
    --ema-momentum to 1."""
    warmup, horizon = args.warmup_epochs * steps_per_epoch, args.horizon * total_steps
    if step < warmup:
        lr_scale = args.start_lr_ratio + (1 - args.start_lr_ratio) * step / warmup
    else:
        lr_scale = cosine(1.0, args.final_lr_ratio, (step - warmup) / max(horizon - warmup, 1))
    progress = step / horizon
    return {
        "lr_scale": lr_scale,
        "weight_decay": cosine(args.weight_decay, args.final_weight_decay, progress),
        "ema_momentum": args.ema_momentum + (1 - args.ema_momentum) * min(progress, 1.0),
    }


def on_epoch_start(run: RunState, epoch: int) -> None:
    """Nothing per epoch: every schedule is a function of the step."""


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
    return _AllReduceMean.apply(x) if dist.is_initialized() else x


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style integer hash on int64 tensors (wrapping arithmetic)."""
    x = x + 0x1E3779B97F4A7C15
    x = (x ^ (x >> 30)) * 0x3F58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x14D049BB133111EB
    return x ^ (x >> 31)


def mask_keep_indices(
    indices: torch.Tensor, num_patches: int, keep: int, step: int, seed: int, shared: bool = False
) -> torch.Tensor:
    """The patch indices each anchor keeps [B, keep], a random subset drawn from (seed, step, image index).

    A function of the image index rather than of a process's RNG stream, so a run on 2 processes masks each
    image exactly as one process on the global batch does. shared: one subset for the whole batch (MSN code)."""
    idx = torch.zeros_like(indices) if shared else indices
    salt = (int(seed) * 1_000_003 + int(step)) * 1_000_000_007 % (2**63 - 1)  # any seed: a Python int fits int64 here
    base = (idx.long() + salt) * 65_537  # int64 arithmetic wraps, which the hash mixes anyway
    keys = base[:, None] + torch.arange(num_patches, device=indices.device)[None, :]
    return _mix64(_mix64(keys)).argsort(dim=1)[:, :keep]


# ============================================================ shared: runtime
class RunError(Exception): ...  # a condition that stops the run with one clear line and exit code 2


class Stopped(BaseException): ...  # a stop signal before the first step (its number); not an Exception: never caught


def from_rank0(make: Callable, rank: int):
    """``make()`` on rank 0 alone, its result sent to every rank (the data set is indexed and the checkpoint read
    once per job, and every rank agrees on them); a RunError or DataError it raises is raised on every rank."""
    try:
        box = [make() if rank == 0 else None]
    except (RunError, lt_data.DataError) as e:
        box = [e]
    if dist.is_initialized():
        dist.broadcast_object_list(box, 0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


@dataclass
class RunState:  # one run's flags, model, optimizer, data, device and step: the ``run`` every function gets
    args: Args  # with --amp resolved (resolve_amp)
    model: nn.Module  # the module whose state is saved and exported
    train_model: nn.Module  # what train_step calls: ``model`` in DDP (several processes), then torch.compile'd
    optimizer: torch.optim.Optimizer
    data: lt_data.LTData
    train_set: Optional[lt_data.IndexedDataset] = None
    device: torch.device = torch.device("cpu")
    steps_per_epoch: int = 1
    run_dir: str = ""
    amp_flag: str = ""  # --amp as given (auto resolves per machine; args.amp holds the resolved dtype)
    step: int = 0
    checkpoint_step: int = -1  # step of the checkpoint on disk, -1: none

    def __post_init__(self):
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.backbone = self.model.get_submodule(self.model.export_prefix.rstrip("."))  # what backbone.pt holds
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[self.args.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=dtype, enabled=dtype is not None)
        self.total_steps = self.args.epochs * self.steps_per_epoch  # the schedules' length
        self.stop_step = min(self.total_steps, self.args.max_steps or self.total_steps)
        self.peak_lr = [group["lr"] for group in self.optimizer.param_groups]  # what make_optimizer set
        self.training_set = training_set(self) if self.train_set is not None else None  # once: a hash of N items

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if x.ndim == 4 and self.args.channels_last else torch.preserve_format
        return x.to(self.device, non_blocking=True, memory_format=layout)


def set_schedules(run: RunState) -> None:
    """The method's ``schedules`` at ``run.step``: each group's lr is its peak lr x lr_scale, a group marked
    ``{"weight_decay_schedule": name}`` takes that value; ``train_step`` reads the others from ``run.schedule``."""
    run.schedule = schedules(run.args, run.step, run.total_steps, run.steps_per_epoch)
    for group, peak in zip(run.optimizer.param_groups, run.peak_lr):
        group["lr"] = peak * run.schedule["lr_scale"]
        if "weight_decay_schedule" in group:
            group["weight_decay"] = run.schedule[group["weight_decay_schedule"]]


def cosine(start: float, end: float, t: float) -> float:
    """start -> end on a half cosine as t goes 0 -> 1 (t is clipped to [0, 1]): every decaying schedule."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def warmup_cosine(step: int, warmup: int, total: int, end: float = 0.0) -> float:
    """(step + 1) / warmup over the first ``warmup`` steps (at most ``total``), then a cosine from 1 to ``end``."""
    warmup = min(warmup, total)
    return (step + 1) / warmup if step < warmup else cosine(1.0, end, (step - warmup) / max(total - warmup, 1))


def optimizer_step(run: RunState, loss: torch.Tensor, clip: list | tuple = (), max_norm=math.inf) -> torch.Tensor:
    """Backward (scaled for fp16) and optimizer step; clips the unscaled gradients of ``clip`` (parameters) to
    ``max_norm`` (inf: measure only) and returns their norm before clipping."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)  # a no-op without fp16
    norm = nn.utils.clip_grad_norm_(clip, max_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return norm


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto -> the fastest autocast dtype the device computes natively: "bf16", "fp16" or "none" (fp32)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    arm = platform.machine().lower() in ("arm64", "aarch64")  # mkldnn's check: the BF16 extension (x86: emulated too)
    x86 = not arm and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())  # native bf16
    return "bf16" if x86 or arm and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"


def make_run_dir(run_dir: str):
    """Create and lock the run folder, so that a second start of a live run (a requeue, another terminal) is refused.
    lockf, not flock: a POSIX lock dies with this process, an flock with its last orphaned DataLoader worker. Keep it
    open (tests/test_scripts.py::test_the_same_run_started_twice_is_refused_while_the_first_lives)."""
    lock = None
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, ".lock"), "a")
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        busy = lock is not None and isinstance(e, (BlockingIOError, PermissionError))  # lockf's EAGAIN or EACCES
        line = f"{run_dir} is being trained by another process; wait for it or choose another --run-name"
        raise RunError(line if busy else f"cannot write to the run folder {run_dir}: {e.strerror}") from None
    for path in (os.path.join(run_dir, f) for f in ("checkpoint.pt", "backbone.pt")):  # a folder in the way of a
        if os.path.isdir(path):  # file written at the end fails now, not after the training
            raise RunError(f"{path} is a folder, where the run writes a file; move it away")
    return lock


def atomic_save(obj, path: str) -> None:
    """Write a temporary file, fsync, rename: a crash never leaves a half-written ``path``, and a full disk stops the
    run in one line naming the OS error, the old file intact (torch.save into a file words it "unexpected pos").
    Test: tests/test_scripts.py::test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint."""
    buffer, tmp = io.BytesIO(), f"{path}.tmp{os.getpid()}"
    torch.save(obj, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        why = f"{e.strerror}; the {os.path.basename(path)} on disk is untouched"
        raise RunError(f"cannot write {path}: {why}") from None
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)  # the rename itself survives a power loss
    os.fsync(folder)
    os.close(folder)


# flags that may differ when a run resumes; any other change is refused
RESUMABLE_FLAGS = (
    "max_steps num_workers log_every checkpoint_every compile channels_last download data_dir output_dir eval_every "
    "eval_bank eval_queries"
).split()


def backbone_meta(run: RunState) -> dict:
    """What linear_probe.py needs to rebuild the backbone and its data."""
    data_args = {f.name: getattr(run.args, f.name) for f in fields(lt_data.DataArgs)}
    data_args.update(image_size=run.data.image_size, imbalance_ratio=lt_data.resolved_ratio(run.args))
    prefix = run.model.export_prefix
    return {**run.model.backbone_spec, "prefix": prefix, "method": METHOD, "data": data_args, "step": run.step}


def training_set(run: RunState) -> dict:
    """What defines the training set, saved in the checkpoint: its size, classes, and a fingerprint of its (image,
    label) list (file paths relative to --data-dir, else indices), so a resume refuses a changed set."""
    t = run.train_set
    files = getattr(t.images, "files", None)
    items = [(files[i] if files else i, t.images.targets[i]) for i in t.indices]
    return {"images": len(t), "classes": run.data.num_classes, "sha1": hashlib.sha1(repr(items).encode()).hexdigest()}


def non_finite_stop(run: RunState, path: str) -> str:
    kept = f"the last good checkpoint {path} (step {run.checkpoint_step}) is untouched"
    kept = kept if run.checkpoint_step >= 0 else "no checkpoint was written"
    return f"stopping, {kept}. Try a lower --lr or --amp none"


def save_checkpoint(run: RunState, path: str) -> None:
    """A collective call. Refuses (RunError) a non-finite model or optimizer state: one fused pass, one host sync."""
    state = [*run.model.state_dict().values(), *(t for s in run.optimizer.state.values() for t in s.values())]
    floats = [t for t in state if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    ok = torch.stack([torch.isfinite(n).to(run.device) for n in torch._foreach_norm(floats, math.inf)]).all().int()
    if run.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok:
        raise RunError(f"non-finite weights after step {run.step}; {non_finite_stop(run, path)}")
    if run.rank == 0:
        ckpt = dict(format=linear_probe.CHECKPOINT_FORMAT, model=run.model.state_dict(), step=run.step)
        ckpt.update(optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), world_size=run.world_size)
        ckpt.update(args=asdict(run.args), backbone=backbone_meta(run), training_set=run.training_set)
        ckpt.update(amp_flag=run.amp_flag)
        atomic_save(ckpt, path)
    run.checkpoint_step = run.step


def read_checkpoint(path: str) -> Optional[dict]:
    """The checkpoint at ``path`` on the CPU (weights_only=True), None if there is none."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the first line of torch's message (weights_only's runs to a page)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(f"cannot resume from {path} ({why}); move it away to start afresh") from None


def load_checkpoint(run: RunState, ckpt: dict, path: str) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != linear_probe.CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a checkpoint of these scripts; move it away to start afresh")
    old, new = ckpt["args"], asdict(run.args)
    if ckpt.get("amp_flag") == run.amp_flag == "auto":  # a requeue on another kind of machine may resolve it otherwise
        old = {**old, "amp": new["amp"]}
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    if added := ", ".join(flag(k) for k in new if k not in old):  # flags of a later version of the script
        why = f"was written before {added} existed; resume it with the version of the script that wrote it"
        raise RunError(f"{path} {why}, or choose another --run-name")
    changed = [f"{flag(k)} {old[k]} -> {new[k]}" for k in new if k not in RESUMABLE_FLAGS and old[k] != new[k]]
    if changed or ckpt["backbone"]["method"] != METHOD:
        why = f"was written with other flags ({', '.join(changed) or 'another method'})"
        raise RunError(f"{path} {why}; resume with the same command or choose another --run-name")
    was, now = ckpt.get("training_set"), run.training_set
    if was is not None and was != now:
        what = [f"{k} {was[k]} -> {now[k]}" for k in ("images", "classes") if was[k] != now[k]] or ["other images"]
        raise RunError(f"{path} was trained on another training set ({', '.join(what)}); choose another --run-name")
    if ckpt["world_size"] != run.world_size:
        why = f"was written by {ckpt['world_size']} processes, this run has {run.world_size}"
        raise RunError(f"{path} {why}; the global batch, learning rate and data order would change")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    for p, state in run.optimizer.state.items():  # saved under another --channels-last or device: take the
        for k, v in state.items():  # parameter's layout (fused kernels pair them in memory order)
            if torch.is_tensor(v) and v.shape == p.shape and (v.stride() != p.stride() or v.device != p.device):
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
    if ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    run.step = run.checkpoint_step = ckpt["step"]


def move_earlier_run(run_dir: str) -> str:
    """On a fresh start in a folder with an earlier run's files (events, backbone.pt, probe JSONs; not a launcher's
    log) but no checkpoint: move them to ``earlier_<n>/`` (a run of its own in TensorBoard), and say so."""
    files = [f for f in sorted(os.listdir(run_dir)) if f.startswith(("events.out.tfevents.", "probe_", "backbone.pt"))]
    if not files:
        return ""
    aside = next(p for n in range(1, 2**31) if not os.path.exists(p := os.path.join(run_dir, f"earlier_{n}")))
    os.mkdir(aside)
    for f in files:
        os.replace(os.path.join(run_dir, f), os.path.join(aside, f))
    return f"; the earlier run's {len(files)} files (no checkpoint) moved to {aside}"


def export_backbone(run: RunState, path: str) -> None:
    """The backbone in build_backbone's layout (strict=True); finite, as the last step's checkpoint refused others."""
    state = run.backbone.state_dict()
    atomic_save({"format": linear_probe.EXPORT_FORMAT, "backbone": backbone_meta(run), "state_dict": state}, path)


class Logger:
    """Rank 0's TensorBoard (charts/, losses/, eval/) and progress lines. ``accumulate`` keeps scalars on the device
    (no host sync); ``write`` logs their means since the last write, the last vectors' histograms, a kNN monitor's
    top-1 (%) if given one, and a progress line whose images/s and ETA leave the monitor's time out."""

    def __init__(self, run: RunState, resumed: bool):
        self.run, self.scalars, self.vectors, self.start, self.step0 = run, {}, {}, run.step, run.step
        self.clock, self.pace, self.evals = time.perf_counter(), [0.0, 0], [0.0, 0]  # pace, evals: seconds, count
        self.moved = move_earlier_run(run.run_dir) if run.rank == 0 and not resumed else ""
        purge = run.step + 1 if resumed else None  # TensorBoard hides a lost run's events from this step on
        self.writer = SummaryWriter(run.run_dir, purge_step=purge) if run.rank == 0 else None
        if self.writer is not None and not resumed:  # the flags with the values resolved at start
            table = {**asdict(run.args), **backbone_meta(run)["data"], "amp_flag": run.amp_flag}
            table.update({f"backbone.{k}": v for k, v in run.model.backbone_spec["arch_kwargs"].items()})
            rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(table.items()))
            self.writer.add_text("hyperparameters", lt_data.printable(f"|param|value|\n|-|-|\n{rows}"))

    def say(self, line: str) -> None:
        if self.run.rank == 0:
            print(line, flush=True)

    def accumulate(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach().float().to(self.run.device, non_blocking=True)
            if v.ndim:
                self.vectors[k] = v
            else:
                self.scalars.setdefault(k, []).append(v)

    def eta(self) -> str:
        """Hours and minutes left, rounded up (0h00m only when nothing is left), the kNN evaluations to run included."""
        run, (step_s, steps), (eval_s, evals), stop = self.run, self.pace, self.evals, self.run.stop_step
        every = run.args.eval_every * run.steps_per_epoch
        evals_left = len(range(every * (run.step // every + 1), stop, every)) + (run.step < stop) if every else 0
        minutes = math.ceil(((stop - run.step) * step_s / max(steps, 1) + evals_left * eval_s / max(evals, 1)) / 60)
        return f"{minutes // 60}h{minutes % 60:02d}m" if steps else "--"

    def write(self, monitor: Optional[KNNMonitor] = None) -> None:
        run, steps, evals, eval_s = self.run, self.run.step - self.step0, {}, 0.0
        means = [torch.stack(v).mean() for v in self.scalars.values()]
        means = dict(zip(self.scalars, torch.stack(means).tolist() if means else []))  # waits for the steps to end
        elapsed = time.perf_counter() - self.clock
        if monitor is not None:
            evals["eval/knn_top1"] = monitor(run.backbone, run.to_device, run.autocast)
            eval_s = time.perf_counter() - self.clock - elapsed
            self.evals = [self.evals[0] + eval_s, self.evals[1] + 1]
        if self.step0 > self.start or steps > 1:  # the first step alone (warm-up, compilation) is not the pace
            self.pace = [self.pace[0] + elapsed, self.pace[1] + steps]
        images_per_s = steps * run.args.batch_size * run.world_size / max(elapsed, 1e-9)
        if steps:
            means["charts/learning_rate"] = run.optimizer.param_groups[0]["lr"]
            means.update({"charts/images_per_second": images_per_s, "charts/epoch": run.step / run.steps_per_epoch})
        if self.writer is not None:  # flushed: a checkpoint follows a write or adds no event, so a kill loses none
            for k, v in {**means, **evals}.items():
                self.writer.add_scalar(k if "/" in k else f"losses/{k}", v, run.step)
            for k, v in self.vectors.items():
                self.writer.add_histogram(k, v.cpu(), run.step)
            self.writer.flush()
        shown = "".join(f" | {k.split('/')[-1]} {v:.2f} ({eval_s:.0f}s)" for k, v in evals.items())
        memory = f" | {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if run.device.type == "cuda" else ""
        self.say(
            f"epoch {math.ceil(run.step / run.steps_per_epoch)}/{math.ceil(run.stop_step / run.steps_per_epoch)} "
            f"step {run.step}/{run.stop_step} "
            f"loss {means.get('loss', math.nan):.4f}{shown} | {images_per_s:.0f} img/s{memory} | eta {self.eta()}"
            if steps
            else f"step {run.step}, before training{shown}"
        )
        self.scalars, self.vectors, self.clock, self.step0 = {}, {}, time.perf_counter(), run.step

    def write_views(self, views: list[torch.Tensor] | torch.Tensor, mean, std) -> None:
        """The first 8 images of the batch (rows) x their augmented views (columns, resized to the first view's
        size), un-normalised: what the augmentations do."""
        if self.writer is not None:
            views = views if isinstance(views, list) else [views]
            m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
            cols = [F.interpolate(v[:8].detach().float().cpu(), size=views[0].shape[-2:]) * s + m for v in views]
            grid = make_grid(torch.stack(cols, 1).flatten(0, 1).clamp(0, 1), nrow=len(cols))
            self.writer.add_image("views/augmented", grid, self.run.step)

    def close(self, line: str) -> None:
        self.say(line)
        if self.writer is not None:
            self.writer.close()


def worker_died(e: BaseException) -> Optional[str]:
    """If ``e`` is how a DataLoader reports a worker that died (the OOM killer, SIGBUS on a full /dev/shm): why."""
    if isinstance(e, ConnectionResetError) or isinstance(e, RuntimeError) and "DataLoader worker" in str(e):
        why = "the out-of-memory killer, or SIGBUS on a full /dev/shm? try fewer --num-workers"
        return f"a data-loading worker died ({why}); run the same command to resume"


def batches(loader, run: RunState, ckpt_path: str):
    """The loader's batches. A worker that dies, or an image that cannot be read, while a batch is fetched (between
    steps: the model is consistent) leaves a checkpoint in a one-process run (save_checkpoint is a collective call);
    ``main`` reports it, and a worker that died mid-step, in one line."""
    try:
        yield from loader  # what the loop's body raises is not raised here
    except Exception as e:
        loader_failed = worker_died(e) or isinstance(e, lt_data.DataError)
        if loader_failed and run.world_size == 1 and run.checkpoint_step != run.step:
            save_checkpoint(run, ckpt_path)
        raise


def agreed_stop(run: RunState, first_nonfinite_step: torch.Tensor, signals: list[int], ckpt_path: str) -> int:
    """At log and checkpoint steps (and at a signal, alone): one all-reduce tells every rank the first step with a
    non-finite loss, which stops the run, and a stop signal any rank got, which it returns (0: none)."""
    flags = torch.stack([first_nonfinite_step, torch.full_like(first_nonfinite_step, -(signals or [0])[0])])
    if run.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    bad, signum = flags.tolist()
    if bad < 2**62:
        where = f"step {bad} (epoch {math.ceil(bad / run.steps_per_epoch)})"
        raise RunError(f"non-finite loss at {where}; {non_finite_stop(run, ckpt_path)}")
    return -signum


def launch_env() -> tuple[int, int, int]:
    """World size, rank and local rank from torchrun's environment (1, 0, 0 without it); RunError, naming the
    variables, for a partial one (WORLD_SIZE left in a shell: init_process_group's traceback wants RANK)."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: os.environ[k] for k in names if k in os.environ}
    if env.get("WORLD_SIZE", "1") == "1":  # one process (torchrun --nproc_per_node 1, or none)
        return 1, 0, 0
    world_size, rank, local = (int(v) if v.isdigit() else -1 for v in (env.get(k, "") for k in names[:3]))
    if len(env) < len(names) or not 0 <= rank < world_size or local < 0:
        found = " ".join(f"{k}={v}" for k, v in env.items())
        raise RunError(f"a partial torchrun environment ({found}): launch with torchrun, or unset these variables")
    return world_size, rank, local


# The range of every numeric flag the scripts share (validate; the method's: RANGES, the data's: lt_data.RANGES)
SHARED_RANGES = dict(seed="[0, 4294967296)", batch_size="[1, inf)", epochs="[1, inf)", max_steps="[1, inf)")
SHARED_RANGES |= dict(train_steps="[1, inf)", log_every="[1, inf)", checkpoint_every="[1, inf)", lr="(0, inf)")
SHARED_RANGES |= dict(num_workers="[0, inf)", eval_every="[0, inf)", eval_bank="[0, inf)", eval_queries="[0, inf)")
SHARED_RANGES |= dict(weight_decay="[0, inf)", warmup_epochs="[0, inf)", vit_layers="[1, inf)", vit_dim="[1, inf)")
SHARED_RANGES |= dict(vit_heads="[1, inf)", patch_size="[1, inf)")


def validate(args: Args) -> None:
    """Fail fast, before any data is read, on flags that cannot work: every numeric flag has a range (the scripts'
    shared, the method's, the data's; tests/test_scripts.py checks that none lacks one); ``check_args`` checks what
    needs the data."""
    lt_data.check_ranges(args, SHARED_RANGES | RANGES | lt_data.RANGES)
    for flag, path in (("--output-dir", args.output_dir), ("--run-name", args.run_name or "")):
        if lt_data.printable(path) != path:  # TensorBoard's event writer encodes its path as UTF-8
            raise RunError(f"{flag} {lt_data.printable(path)} is not UTF-8, which TensorBoard cannot write to")
    if args.sync_bn and not torch.cuda.is_available():
        raise RunError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel)")


def parse_args(argv: list[str]) -> Args:
    """Two passes: the first finds --recipe NAME, the second puts RECIPES[NAME]'s values before the command line's
    flags (the last of a repeated flag wins), so the run resolves them, and the defaults that follow from them (an
    --arch's lr), like any other flag."""
    recipes = "".join(f"\n  {name}: {about}" for name, (about, _) in RECIPES.items())
    description = f"{__doc__.split(chr(10) * 2)[0]}\n\nrecipes (--recipe NAME; a flag given beside it wins):{recipes}"
    args = tyro.cli(Args, args=argv, description=description)
    if args.recipe is None:
        return args
    if args.recipe not in RECIPES:
        raise RunError(f"--recipe {args.recipe} is not one of {', '.join(RECIPES)}")
    flags = []
    for name, value in RECIPES[args.recipe][1].items():
        flag = "--" + name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return tyro.cli(Args, args=[*flags, *argv], description=description)


def main() -> None:
    lt_data.quiet_when_closed()  # script --help | head: no BrokenPipeError; non-UTF-8 bytes of paths as escapes
    try:
        train(parse_args(sys.argv[1:]))
    except Stopped as e:  # the exit code a shell gives a process the signal killed
        if os.environ.get("RANK", "0") == "0":
            name = signal.Signals(e.args[0]).name
            print(f"interrupted ({name}) before the first step: nothing to save; run the same command to go on")
        sys.exit(128 + e.args[0])
    except Exception as e:  # one line and exit code 2 for what the user can act on; a traceback for the rest
        known = isinstance(e, (RunError, BackboneError, lt_data.DataError))  # a DataError may come from a worker
        line = lt_data.error_line(e) if known else worker_died(e)
        if line is None:
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
