"""SimSiam with re-weighted sharpness-aware minimisation (rwSAM).

Liu, HaoChen, Gaidon, Ma (ICLR 2022), "Self-supervised Learning is More Robust to Dataset Imbalance":
SimSiam (Chen & He 2021: projector, predictor, symmetric negative cosine with stop-gradient) trained
with a sharpness-aware optimiser whose adversarial (ascent) step uses a *re-weighted* loss: examples in
low-density regions of the representation space (the rare ones) get larger weights, so it is their
sharpness that gets penalised. Each step: (1) gradient g of the weighted loss; (2) ascent
e = rho theta^2 g / || |theta| g || (ASAM; SAM: rho g / ||g||), one global norm; (3) gradient of the
unweighted loss at theta + e on the same two views; (4) restore theta, SGD step with that gradient.
Weights come from a Gaussian kernel density estimate on L2-normalised backbone features of the
un-augmented training images (label-free), recomputed every --reweight-every epochs.

    python simsiam_rwsam.py --dataset cifar10 --imbalance-ratio 100                 # rwSAM (ASAM + KDE weights)
    python simsiam_rwsam.py --dataset cifar10 --sam none                          # plain SimSiam
    python simsiam_rwsam.py --dataset cifar10 --reweight none                     # plain ASAM
    python simsiam_rwsam.py --dataset cifar10 --reweight label --rho 7            # oracle label weights
    python simsiam_rwsam.py --dataset synthetic --epochs 5 --batch-size 64        # no data needed
    torchrun --nproc_per_node 4 simsiam_rwsam.py --batch-size 128                 # --batch-size is per process
    python linear_probe.py runs/<run-name>/backbone.pt

Sections marked "shared" are textually identical in supervised_baseline.py, simsiam_rwsam.py,
msn_prior.py and excb.py (tests/test_skeleton.py enforces it): diff two scripts to see the method.
Reading order: the flags with their recipes (RECIPES) and ranges (RANGES), the method's interface and algorithm
(train_step), the training loop, the method's parts, and the shared plumbing last.
docs/simsiam_rwsam.md has the logged metrics and the implementation notes.
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
    arch: Literal["resnet18", "resnet50", "vit_tiny", "vit_small"] = "resnet18"
    """backbone: ResNets (the papers'; CIFAR stem below 64 px; SGD) or ViTs (tiny 192-d/3 heads, small 384-d/6 heads, 12
    layers; AdamW, as MoCo v3 trains SimSiam-style ViTs)"""
    vit_layers: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """ViT only: override the preset's number of transformer layers"""
    vit_dim: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """ViT only: override the preset's width; the MLP is 4x the width"""
    vit_heads: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """ViT only: override the preset's number of attention heads"""
    patch_size: Annotated[Optional[int], lt_data.resolved_later("4 below 64 px, else 16", "INT")] = None
    """ViT only: patch size"""
    epochs: int = 800
    """training epochs (the paper's CIFAR code trains 800 to 1600)"""
    batch_size: int = 512
    """batch size per process (the global batch is this times the number of processes)"""
    lr: Annotated[Optional[float], lt_data.resolved_later("0.03 for ResNets, 5e-4 for ViTs", "FLOAT")] = None
    """learning rate for a global batch of 256, scaled linearly: SGD for ResNets (0.06 at the paper's batch 512), AdamW
    for ViTs"""
    weight_decay: Annotated[Optional[float], lt_data.resolved_later("5e-4 for ResNets, 0.05 for ViTs", "FLOAT")] = None
    """weight decay: on all parameters for ResNets (SimSiam's CIFAR recipe), on weight matrices only for ViTs"""
    warmup_epochs: int = 0
    """linear learning-rate warm-up epochs before the cosine decay (SimSiam: none)"""
    proj_layers: Annotated[Optional[int], lt_data.resolved_later("3 at 96 px and above, 2 below", "INT")] = None
    """linear layers of the projector (SimSiam: 3 on ImageNet, 2 on CIFAR); each but the last is Linear-BN-ReLU"""
    proj_dim: int = 2048
    """projector width (hidden and output) and predictor output"""
    pred_dim: int = 512
    """predictor bottleneck width"""
    crop_min_scale: float = 0.2
    """smallest area fraction of RandomResizedCrop (SimSiam: 0.2); a larger one keeps more of the object
    in small images"""
    sam: Literal["asam", "sam", "none"] = "asam"
    """sharpness-aware step: asam (adaptive, e = rho theta^2 g / || |theta| g ||), sam (e = rho g / ||g||), none (plain
    SimSiam)"""
    rho: float = 0.5
    """radius of the ascent step (ASAM scale; the paper's code uses 0.5 by default, 7 for CIFAR label weights, 2 on
    ImageNet)"""
    reweight: Literal["kde", "label", "none"] = "kde"
    """weights of the ascent loss: kde (label-free density, the paper's method), label (oracle: base^frequency rank),
    none (plain (A)SAM); ignored with --sam none"""
    reweight_warmup: int = 10
    """epochs of uniform weights before the first KDE"""
    reweight_every: int = 10
    """recompute the KDE weights every this many epochs (from --reweight-warmup on)"""
    kde_bandwidth: float = 0.3
    """Gaussian kernel bandwidth h on L2-normalised features (squared distances lie in [0, 4])"""
    kde_alpha: float = 1.0
    """weights are proportional to density^(-alpha)"""
    kde_max_ratio: float = 10.0
    """weights are clipped so that max / min <= this"""
    kde_reference: int = 0
    """KDE against a seeded random subset of M = this many training images (cost O(N M)); 0: every image (O(N^2), exact)
    up to N = 1,048,576 images, a subset of M = 1,048,576 above (a Monte-Carlo estimate of the same density, relative
    error about 1/sqrt(neighbours within the bandwidth among the M); measured costs in docs/simsiam_rwsam.md)"""
    kde_chunk_size: int = 4096
    """block size of the chunked KDE (memory ~ 3 x chunk^2 floats)"""
    label_base: float = 1.2
    """--reweight label: w = base^(rank of the class by training frequency, 0 = most frequent), as the paper's code"""

    def __post_init__(self):  # the backbone picks the optimiser's defaults
        vit = self.arch.startswith("vit")
        self.lr = self.lr if self.lr is not None else (5e-4 if vit else 0.03)
        self.weight_decay = self.weight_decay if self.weight_decay is not None else (0.05 if vit else 5e-4)


# --recipe NAME: named flag values, applied before the command line's flags (which win).
RECIPES = {
    "cpu": (
        "SimSiam + rwSAM, 4-layer ViT, 16 px, 8 epochs of Fashion-MNIST-LT (docs/cpu_recipes.md; --sam none: SimSiam)",
        dict(arch="vit_tiny", vit_layers=4, vit_dim=96, vit_heads=3, image_size=16, train_steps=1800)
        | dict(warmup_epochs=1, batch_size=64, lr=2e-3, proj_dim=512, pred_dim=128, crop_min_scale=0.5)
        | dict(sam="asam", reweight="kde", reweight_warmup=2, reweight_every=2),
    ),
    "cifar10-lt": (
        "Liu et al.'s CIFAR-10-LT setting: ResNet-18, 32 px, 800 epochs, batch 512, SGD, ASAM rho 0.5, KDE weights",
        dict(dataset="cifar10", imbalance_ratio=100, image_size=32)  # Liu et al. Sec. 4.1: CIFAR-10-LT, r 100
        | dict(arch="resnet18", proj_layers=2, proj_dim=2048)  # official code cifar/main_sam_weight.py defaults
        | dict(epochs=800, batch_size=512, warmup_epochs=0, weight_decay=5e-4)  # the same file; cosine, no warm-up
        | dict(lr=0.025)  # the same file: 0.05 at batch 512 (SimSiam's paper: 0.06); per 256 here
        | dict(crop_min_scale=0.2, sam="asam", rho=0.5, reweight="kde"),  # the same file: scale 0.2, adaptive, 0.5
    ),
}

# The range of every numeric flag of the method (validate; the shared flags': SHARED_RANGES, the data's: lt_data.RANGES)
RANGES = dict(
    batch_size="[2, inf): the projector's BatchNorm needs 2 images per process"
)  # a view's batch: one process's
RANGES |= dict(rho="(0, inf)", kde_bandwidth="(0, inf)", kde_alpha="(0, inf)", label_base="(0, inf)")
RANGES |= dict(kde_max_ratio="[1, inf)", reweight_every="[1, inf)", kde_chunk_size="[1, inf)", proj_dim="[1, inf)")
RANGES |= dict(pred_dim="[1, inf)", proj_layers="[2, inf)", reweight_warmup="[0, inf)", kde_reference="[0, inf)")
RANGES |= dict(crop_min_scale="(0, 1]")


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
METHOD = "simsiam_rwsam"


def simsiam_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """SimSiam's symmetric loss (Chen & He 2021, eq. 2-3), optionally re-weighted per example (rwSAM's L_w):

        L_w = 1/2 mean_i w_i D(p1_i, sg(z2_i)) + 1/2 mean_i w_i D(p2_i, sg(z1_i)),  D(p, z) = -cos(p, z),

    p, z [B, D]; sg = stop-gradient (applied here). ``weights=None`` means w_i = 1 (plain SimSiam). Computed in
    fp32 (or fp64).
    """
    dtype = torch.promote_types(p1.dtype, torch.float32)
    d1 = -F.cosine_similarity(p1.to(dtype), z2.detach().to(dtype), dim=-1)
    d2 = -F.cosine_similarity(p2.to(dtype), z1.detach().to(dtype), dim=-1)
    if weights is None:
        return 0.5 * d1.mean() + 0.5 * d2.mean()
    w = weights.to(d1.dtype)
    return 0.5 * (w * d1).mean() + 0.5 * (w * d2).mean()


def sam_perturbation(params, rho: float, adaptive: bool = True) -> list[torch.Tensor]:
    """The ascent vector e of (adaptive) sharpness-aware minimisation, from each parameter's current ``.grad``.

    ASAM (Kwon et al. 2021, with T_theta = |theta|; Liu et al. 2022, rwSAM step 2):
        e = rho theta^2 * g / (|| |theta| * g ||_2 + 1e-12)
    SAM (Foret et al. 2021, eq. 2):  e = rho g / (||g||_2 + 1e-12).
    The norm is one global norm over all given parameters; parameters without a gradient get zeros.
    """
    params = list(params)
    having = [p for p in params if p.grad is not None]
    if not having:
        return [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        wide = [p if p.dtype in (torch.float32, torch.float64) else p.float() for p in having]
        grads = [p.grad.to(w.dtype) for p, w in zip(having, wide)]
        # theta * g has the norm of |theta| * g, and theta * (theta * g) = theta^2 g: no |theta| pass (memory-bound)
        e = torch._foreach_mul(wide, grads) if adaptive else [g.clone() for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(e)))
        if adaptive:
            torch._foreach_mul_(e, wide)
        torch._foreach_mul_(e, rho / (norm + 1e-12))
        ascent = iter(e)
        return [next(ascent).to(p.dtype) if p.grad is not None else torch.zeros_like(p) for p in params]


def kde_weights(
    features: torch.Tensor,
    bandwidth: float,
    alpha: float = 1.0,
    max_ratio: float = 10.0,
    reference: Optional[torch.Tensor] = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Label-free per-example weights of rwSAM (Liu et al. 2022): rare = low density = large weight.

    f_i = features_i / ||features_i|| (features [N, D]); p_i = mean_j exp(-||f_i - f_j||^2 / (2 h^2)) with
    h = ``bandwidth``, over the reference points j: by default all other examples (self excluded); ``reference`` =
    a 1-d integer tensor of indices into ``features`` (a random subset of M points: cost O(N M); self excluded
    where present) or a float tensor of reference features (nothing excluded).
    w_i proportional to p_i^(-alpha), clipped so that max(w) / min(w) <= ``max_ratio``, normalised to mean 1 [N].
    Computed in blocks of ``chunk_size`` x ``chunk_size`` (bounded memory).
    """
    f = F.normalize(features.float(), dim=1)
    ids = torch.arange(f.shape[0], device=f.device)
    if reference is None:
        log_p = _kde_log_density(f, f, bandwidth, chunk_size, ids, ids)
    elif not reference.is_floating_point():
        ref_ids = reference.to(f.device).long()
        log_p = _kde_log_density(f, f[ref_ids], bandwidth, chunk_size, ids, ref_ids)
    else:
        log_p = _kde_log_density(f, F.normalize(reference.float().to(f.device), dim=1), bandwidth, chunk_size)
    return _weights_from_log_density(log_p, alpha, max_ratio)


def train_step(run: RunState, batch) -> dict[str, torch.Tensor]:
    """One rwSAM step (Liu et al. 2022, Sec. 4) on two views x1, x2 [B, 3, H, W] of the images idx [B]; returns the
    losses and what ``diagnostics`` needs (no host sync). --sam none: plain SimSiam, one step on L(theta).

    1. g = gradient of the weighted loss L_w(theta), w = the images' KDE (or label) weights (DDP averages it
       over ranks: the global gradient)
    2. ascent e = rho theta^2 g / || |theta| g || (ASAM) or rho g / ||g|| (SAM), one global norm
    3. g' = gradient of the unweighted loss L(theta + e) on the same views
    4. back to theta (exact copy, BatchNorm keeps pass 1's statistics), base optimiser step with g'
    """
    (x1, x2), _, idx = batch
    args, model, optimizer = run.args, run.model, run.optimizer
    with run.autocast():
        p1, p2, z1, z2 = run.train_model(x1, x2)
    views = {"p1": p1.detach(), "p2": p2.detach(), "z1": z1.detach(), "z2": z2.detach()}
    if args.sam == "none":
        loss = simsiam_loss(p1, p2, z1, z2)
        optimizer_step(run, loss)
        return {"loss": loss.detach(), **views}
    # 1.
    weights = model.sample_weights[idx] if args.reweight != "none" else None
    loss_w = simsiam_loss(p1, p2, z1, z2, weights)
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss_w).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    fp16 = run.scaler.is_enabled()
    if fp16:  # unscale this pass by hand (unscale_ may run once per update())
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / run.scaler._get_scale_async())
    # 2. fp16: an overflowed gradient gives e = 0 (GradScaler's business, no host sync); in bf16/fp32 a non-finite
    # gradient propagates to the loss and the NaN guard stops the run.
    e = sam_perturbation(params, args.rho, adaptive=args.sam == "asam")
    e_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(e)))
    ascent_ok = torch.isfinite(e_norm)
    if fp16:
        e = [torch.where(ascent_ok, ei, torch.zeros_like(ei)) for ei in e]
    theta = [p.detach().clone() for p in params]
    bn_statistics = [b.clone() for b in _batchnorm_buffers(model)]
    with torch.no_grad():
        torch._foreach_add_(params, e)
    # 3.
    with run.autocast():
        q1, q2, y1, y2 = run.train_model(x1, x2)
    loss = simsiam_loss(q1, q2, y1, y2)
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    # 4.
    with torch.no_grad():
        torch._foreach_copy_(params, theta)
        for buffer, saved in zip(_batchnorm_buffers(model), bn_statistics):
            buffer.copy_(saved)
    run.scaler.step(optimizer)
    run.scaler.update()
    return {
        "loss": loss.detach(),
        "losses/ascent_weighted": loss_w.detach(),
        **views,
        "e_norm": e_norm,
        "ascent_ok": ascent_ok,
        "weights": weights,
    }


@torch.no_grad()
def diagnostics(run: RunState, out: dict) -> dict[str, torch.Tensor]:
    """The charts of a log step, from ``train_step``'s output: the spread of the projector outputs (collapse shows
    as std -> 0; 1/sqrt(D) when healthy), the first pass's unweighted loss, the ascent and the weights."""
    charts = {"charts/output_std": F.normalize(out["z1"].float(), dim=1).std(0).mean()}
    if "e_norm" in out:
        charts["losses/first_pass"] = simsiam_loss(out["p1"], out["p2"], out["z1"], out["z2"])
        charts["charts/perturbation_norm"] = torch.where(out["ascent_ok"], out["e_norm"], 0.0)
        charts["charts/ascent_skipped"] = (~out["ascent_ok"]).float()  # fp16: pass 1 overflowed, e = 0
    if out.get("weights") is not None:
        weights = run.model.sample_weights
        charts.update(
            {
                "charts/batch_weights": out["weights"],
                "charts/weight_min": weights.min(),
                "charts/weight_max": weights.max(),
            }
        )
    return charts


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
    backbone_spec(args.arch, data.image_size, args.vit_layers, args.vit_heads, args.vit_dim, args.patch_size)


def train_transform(args: Args, data: lt_data.LTData):
    """Two SimSiam views per image (RandomResizedCrop --crop-min-scale..1, flip, jitter .4/.4/.4/.1 p .8, grayscale
    p .2, Gaussian blur p .5 from 96 px up)."""
    return lt_data.TwoViews(lt_data.ssl_augment(data.image_size, data.mean, data.std, (args.crop_min_scale, 1.0)))


class Model(nn.Module):
    """Backbone, SimSiam projector and predictor, and the per-example ascent weights (a buffer)."""

    export_prefix = "backbone."  # what backbone.pt exports

    def __init__(self, args: Args, data: lt_data.LTData):
        super().__init__()
        self.backbone_spec = backbone_spec(
            args.arch, data.image_size, args.vit_layers, args.vit_heads, args.vit_dim, args.patch_size
        )
        arch, arch_kwargs = self.backbone_spec["arch"], self.backbone_spec["arch_kwargs"]
        self.backbone = build_backbone(arch, **arch_kwargs)
        d, h, b = feature_dim(arch, **arch_kwargs), args.proj_dim, args.pred_dim
        layers = (
            args.proj_layers if args.proj_layers is not None else 3 if data.image_size >= 96 else 2
        )  # SimSiam: ImageNet 3, CIFAR 2 (App. D)
        hidden = [
            m
            for i in range(layers - 1)
            for m in (nn.Linear(d if i == 0 else h, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True))
        ]
        self.projector = nn.Sequential(*hidden, nn.Linear(h, h, bias=False), nn.BatchNorm1d(h, affine=False))
        self.predictor = nn.Sequential(
            nn.Linear(h, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True), nn.Linear(b, h)
        )
        train_idx = data.pretrain_indices(args.balanced_twin)
        if args.reweight == "label":
            w = label_weights([data.train_full.targets[i] for i in train_idx], data.num_classes, args.label_base)
        else:
            w = torch.ones(len(train_idx))
        self.register_buffer("sample_weights", w)  # saved in checkpoints: a resumed run keeps its weights

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """(p1, p2, z1, z2); both views in one call so DDP sees one forward per backward."""
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return self.predictor(z1), self.predictor(z2), z1, z2


def make_optimizer(args: Args, model: Model, lr: float) -> torch.optim.Optimizer:
    """The base optimiser of (A)SAM. ResNets: SGD momentum 0.9 with weight decay on all parameters (SimSiam's CIFAR
    recipe); ViTs: AdamW with weight decay on weight matrices only."""
    if not args.arch.startswith("vit"):
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay, fused=args.amp != "fp16"
        )  # unfused with fp16: see resolve_amp
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def schedules(args: Args, step: int, total_steps: int, steps_per_epoch: int) -> dict[str, float]:
    """lr_scale (x the peak lr): linear warm-up over --warmup-epochs (SimSiam: none), then a cosine to 0."""
    return {"lr_scale": warmup_cosine(step, args.warmup_epochs * steps_per_epoch, total_steps)}


def on_epoch_start(run: RunState, epoch: int) -> None:
    """--reweight kde with a SAM step (not --sam none): recompute the KDE weights at epochs warmup, warmup + every, ...
    (--reweight-warmup, --reweight-every; all ranks identical)."""
    args = run.args
    if args.sam == "none" or args.reweight != "kde" or epoch < args.reweight_warmup:
        return
    if (epoch - args.reweight_warmup) % args.reweight_every:
        return
    started, n = time.perf_counter(), len(run.train_set)
    start, stop, _ = shard_bounds(n, run.rank, run.world_size)
    local = backbone_features(run, start, stop)
    reference = kde_reference_indices(n, args.kde_reference, args.seed, epoch)  # the same on every rank
    w = sharded_kde_weights(
        local, n, args.kde_bandwidth, args.kde_alpha, args.kde_max_ratio, reference, args.kde_chunk_size
    )
    run.model.sample_weights.copy_(w)
    if run.rank == 0:
        against = "every other image" if reference is None else f"a subset of {len(reference)}"
        print(
            f"epoch {epoch + 1}: KDE weights of {n} images against {against} in {time.perf_counter() - started:.1f}s "
            f"(min {w.min().item():.3f}, max {w.max().item():.3f})",
            flush=True,
        )


# --kde-reference 0 (the default): the exact KDE up to this many images, a seeded subset of this many above. An
# update costs M reference pairs per image, an epoch one step per image, so its share of the E = --reweight-every
# epochs between updates is M x (time per pair) / (E x step time per image) at any N and any number of ranks: a
# bound on M bounds it. Measured on one core of our CPU (D 2048: 35-40 ns per pair; ResNet-50 rwSAM at 224 px:
# 0.56-0.71 s per image): < 0.8% of 10 epochs at M = 2^20; on GPUs, assuming the update 100x faster than that core
# and 750 rwSAM images/s per GPU, about 3% (5% near M = 1.7M). ImageNet-LT (115,846 images: 0.3%) and iNaturalist
# 2018 (437,513: 1.3%) stay exact (docs/simsiam_rwsam.md, benchmarks/kde_scale.py).
KDE_AUTO_REFERENCE = 2**20


def kde_reference_indices(n: int, kde_reference: int, seed: int, epoch: int) -> Optional[torch.Tensor]:
    """The reference points of the KDE update of ``epoch`` over ``n`` images: None (every other image: the exact
    density of ``kde_weights``) or a sorted int64 tensor [M] of M distinct indices in [0, n), drawn uniformly by a
    generator seeded with (seed, epoch): every rank, and a resumed run, draw the same subset.

    M = ``kde_reference`` (--kde-reference) if 0 < it < n; 0 means every image while n <= KDE_AUTO_REFERENCE and
    M = KDE_AUTO_REFERENCE above. The subset gives a Monte-Carlo estimate of the same density (unbiased up to the
    self-exclusion): p_i = mean_j k(f_i, f_j) over M points drawn without replacement has relative standard deviation
    sqrt((1 - M/(n-1)) / M) x std_j k / mean_j k, about 1 / sqrt(the expected number of i's neighbours within a
    bandwidth among the M), largest for the rarest images."""
    m = kde_reference or (KDE_AUTO_REFERENCE if n > KDE_AUTO_REFERENCE else 0)
    if not 0 < m < n:
        return None
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g)[:m].sort().values


@torch.no_grad()
def backbone_features(run: RunState, start: int, stop: int) -> torch.Tensor:
    """Eval-mode backbone features of un-augmented training images start..stop-1 [stop - start, D] (fp32).

    Computed in fp32 whatever --amp says: the densities go through an exponential kernel, and bf16 features
    (3 significant digits) would shift the weights by about 1e-3 relative, enough for a resumed process that picks
    other bf16 kernels to end with other weights than the run it resumes, and a resume that is not bit-identical
    (tests/test_scripts.py::test_killed_run_resumes_bit_identical)."""
    data, indices = run.data, run.train_set.indices[start:stop]
    transform = lt_data.eval_transform(data.image_size, data.mean, data.std)
    dataset = lt_data.IndexedDataset(data.train_full, indices, transform)
    workers = run.args.num_workers if run.args.num_workers is not None else min(4, lt_data.usable_cpus())
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=max(run.args.batch_size, 256),
        shuffle=False,
        num_workers=workers,
        generator=torch.Generator(),
        worker_init_fn=lt_data.leave_process_group,
    )
    backbone, feats = run.model.backbone, []
    backbone.eval()
    try:
        for x, _, _ in loader:
            feats.append(backbone(run.to_device(x)).float())
    finally:
        run.model.train()
    spec = run.model.backbone_spec
    dim = feature_dim(spec["arch"], **spec["arch_kwargs"])
    return torch.cat(feats) if feats else torch.zeros(0, dim, device=run.device)


def _kde_log_density(
    queries: torch.Tensor,
    reference: torch.Tensor,
    bandwidth: float,
    chunk_size: int,
    query_ids: Optional[torch.Tensor] = None,
    reference_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log p_i = log mean_j exp(-||q_i - r_j||^2 / (2 h^2)) over the reference points j with
    reference_ids[j] != query_ids[i] (self excluded when ids are given). Rows of ``queries`` and ``reference``
    are unit vectors, so ||q - r||^2 = 2 - 2 q.r. Blockwise log-sum-exp: memory O(chunk^2), no underflow."""
    n, m = queries.shape[0], reference.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=queries.device)
    inv = 1.0 / (2.0 * bandwidth * bandwidth)
    for qs in range(0, n, chunk_size):
        q = queries[qs : qs + chunk_size]
        parts, selves = [], torch.zeros(q.shape[0], device=q.device)
        for rs in range(0, m, chunk_size):
            logk = (q @ reference[rs : rs + chunk_size].T).mul_(2).sub_(2).clamp_(max=0).mul_(inv)  # -d^2 / (2h^2)
            if query_ids is not None and reference_ids is not None:
                same = query_ids[qs : qs + chunk_size, None] == reference_ids[None, rs : rs + chunk_size]
                logk.masked_fill_(same, -math.inf)
                selves += same.sum(1)
            parts.append(torch.logsumexp(logk, dim=1))
        count = (m - selves).clamp_(min=1)
        out[qs : qs + chunk_size] = torch.logsumexp(torch.stack(parts, 1), dim=1) - count.log()
    return out


def _weights_from_log_density(log_density: torch.Tensor, alpha: float, max_ratio: float) -> torch.Tensor:
    """w_i proportional to p_i^(-alpha), the largest clipped to max_ratio times the smallest, mean 1."""
    logw = -alpha * log_density.double()
    logw = torch.minimum(logw, logw.min() + math.log(max_ratio))
    w = (logw - logw.max()).exp()
    return (w / w.mean()).float()


def _gather_rows(x: torch.Tensor, rows_per_rank: int) -> torch.Tensor:
    """Concatenate every rank's rows (each padded to rows_per_rank) in rank order."""
    if not dist.is_initialized():
        return x
    padded = x.new_zeros((rows_per_rank, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded)
    return torch.cat(out)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """Contiguous shard [start, stop) of n examples for one rank, and the padded shard size."""
    per = -(-n // world_size)
    return min(rank * per, n), min((rank + 1) * per, n), per


def sharded_kde_weights(
    local_features: torch.Tensor,
    n: int,
    bandwidth: float,
    alpha: float = 1.0,
    max_ratio: float = 10.0,
    reference: Optional[torch.Tensor] = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """``kde_weights`` under DDP: each rank holds the features of its ``shard_bounds`` rows; features are
    all-gathered, each rank estimates its rows' densities, densities are all-gathered, so every rank ends
    with the same N weights (= kde_weights on all features; ``reference``: integer indices, same on all ranks)."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    start, stop, per = shard_bounds(n, rank, world)
    mine = F.normalize(local_features.float(), dim=1)
    f = _gather_rows(mine, per)[:n]
    ids = torch.arange(n, device=f.device)
    ref_ids = ids if reference is None else reference.to(f.device).long()
    ref = f if reference is None else f[ref_ids]  # no copy of all N features (3.6 GB at iNaturalist's N, D 2048)
    log_p = _kde_log_density(mine, ref, bandwidth, chunk_size, ids[start:stop], ref_ids)
    return _weights_from_log_density(_gather_rows(log_p, per)[:n], alpha, max_ratio)


def label_weights(labels, num_classes: int, base: float) -> torch.Tensor:
    """Oracle weights of the paper's code: w = base^(rank of the example's class by frequency, 0 = most
    frequent; ties by class index), normalised to mean 1."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes)
    order = sorted(range(num_classes), key=lambda c: (-int(counts[c]), c))
    rank = torch.empty(num_classes, dtype=torch.float64)
    rank[torch.tensor(order)] = torch.arange(num_classes, dtype=torch.float64)
    w = torch.as_tensor(base, dtype=torch.float64) ** rank[y]
    return (w / w.mean()).float()


def _batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


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
