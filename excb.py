"""ExCB: self-supervised clustering with online explicit cluster balancing.

Maniadis Metaxas, Tzimiropoulos, Patras (ECCV 2024), "ExCB: Efficient Unsupervised Visual Representation
Learning with Explicit Cluster Balancing" (arXiv 2407.11168; code github.com/ManiadisG/ExCB). A student and an
EMA teacher map images to K learnable centroids (cosine scores). The teacher's scores of the two global views are
*balanced* with an online estimate s of the relative cluster sizes (over-used clusters are pushed down,
under-used ones pulled up, proportionally to K*s_k/sum(s)), sharpened into targets, and the student predicts them
from every view (global and local crops). s is a momentum average of the histogram of balanced teacher
assignments, all-reduced over processes, so balancing is explicit, global and independent of the batch size.

    python excb.py --dataset cifar10 --imbalance-ratio 100
    python excb.py --dataset synthetic --epochs 5 --num-clusters 64    # no data needed
    python excb.py --arch vit_small                                     # ViT-S (AdamW recipe; patch 4 at 32 px)
    torchrun --nproc_per_node 4 excb.py --batch-size 64                 # --batch-size is per process
    python linear_probe.py runs/<run-name>/backbone.pt                  # probes the teacher backbone

Sections marked "shared" are textually identical in supervised_baseline.py, simsiam_rwsam.py,
msn_prior.py and excb.py (tests/test_skeleton.py enforces it): diff two scripts to see the method.
Reading order: the flags with their recipes (RECIPES) and ranges (RANGES), the method's interface and algorithm
(train_step), the training loop, the method's parts, and the shared plumbing last.
docs/excb.md has the logged metrics and the implementation notes.
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
    """backbone of student and teacher: ResNets (CIFAR stem below 64 px; SGD, official ResNet-50 recipe) or ViTs (tiny
    192-d/3 heads, small 384-d/6 heads, 12 layers; AdamW, official ViT-S/16 recipe)"""
    vit_layers: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """ViT only: override the preset's number of transformer layers (tiny test models)"""
    vit_dim: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """ViT only: override the preset's width; the MLP is 4x the width"""
    vit_heads: Annotated[Optional[int], lt_data.resolved_later("the preset's", "INT")] = None
    """ViT only: override the preset's number of attention heads"""
    patch_size: Annotated[Optional[int], lt_data.resolved_later("4 below 64 px, else 16", "INT")] = None
    """ViT only: patch size; default 4 below 64 px (32 px: 8x8 patches, 16 px local crops: 4x4), 16 otherwise"""
    drop_path: float = 0.1
    """ViT only: stochastic-depth rate of the student's last block (linear over blocks); the teacher has
    none (official)"""
    epochs: int = 800
    """training epochs"""
    batch_size: int = 128
    """batch size per process (the global batch is this times the number of processes)"""
    lr: Annotated[Optional[float], lt_data.resolved_later("0.15 for ResNets, 5e-4 for ViTs", "FLOAT")] = None
    """learning rate for a global batch of 256, scaled linearly; default: 0.15 for ResNets (SGD; official 0.6 per 1024),
    5e-4 for ViTs (AdamW; official 2e-3 per 1024)"""
    weight_decay: Annotated[Optional[float], lt_data.resolved_later("1e-4 for ResNets, 0.04 for ViTs", "FLOAT")] = None
    """weight decay of the weight matrices (not biases/norms) at step 0; default: 1e-4 for ResNets, 0.04 for ViTs. The
    centroids get x(1+9c) on top, c a cosine 1 -> 0 over the run (official)"""
    final_weight_decay: Annotated[
        Optional[float], lt_data.resolved_later("--weight-decay for ResNets, 10x for ViTs", "FLOAT")
    ] = None
    """weight decay at the last step (cosine from --weight-decay); default: constant for ResNets, 10x (0.4) for ViTs"""
    warmup_epochs: int = 10
    """linear learning-rate warm-up epochs before the per-step cosine decay to lr*1e-4"""
    num_clusters: int = 1024
    """K, the number of centroids (about N/12 to N/20 for N training images; 65536 on ImageNet)"""
    hidden_dim: int = 2048
    """width of the projector and predictor hidden layers"""
    out_dim: int = 256
    """projector output (centroid) dimension"""
    predictor: bool = True
    """student predictor head (official); --no-predictor pairs each teacher view with the student projector of every
    other view"""
    num_local_crops: int = 6
    """M local crops per image (student only)"""
    local_size: Annotated[Optional[int], lt_data.resolved_later("half the image below 112 px, else 96", "INT")] = None
    """local crop resolution (official: 96 px at 224 px; the CIFAR setting: 16 px at 32 px)"""
    crop_scale: tuple[float, float] = (0.26, 0.14)
    """crop-scale split s at the first and the last epoch (cosine over epochs, official): global crops use scale (s, 1),
    local crops (0.05, s); give two equal values for a constant split"""
    teacher_temp: float = 0.04
    """teacher softmax temperature (constant, no warm-up)"""
    student_temp: float = 0.1
    """student softmax temperature"""
    size_momentum: float = 0.999
    """momentum m_s of the cluster-size estimate s <- m_s*s + (1-m_s)*histogram"""
    teacher_momentum: float = 0.996
    """initial EMA momentum of the teacher, raised to 1 on a cosine over all steps"""
    balancing: bool = True
    """explicit cluster balancing of the teacher scores (--no-balancing: plain sharpened teacher targets,
    an ablation)"""
    kmeans_init: bool = True
    """initialise the centroids by spherical k-means on the random teacher's projector outputs before epoch 0"""
    kmeans_samples: int = 500_000
    """at most this many training images (one deterministic view each) for the k-means initialisation"""
    kmeans_iters: int = 50
    """k-means iterations"""
    kmeans_restarts: int = 5
    """k-means attempts until no cluster is empty (the attempt with the fewest empty clusters is kept)"""

    def __post_init__(self):  # the backbone picks the official recipe's defaults
        vit = self.arch.startswith("vit")
        self.lr = self.lr if self.lr is not None else (5e-4 if vit else 0.15)
        self.weight_decay = self.weight_decay if self.weight_decay is not None else (0.04 if vit else 1e-4)
        if self.final_weight_decay is None:
            self.final_weight_decay = self.weight_decay * (10 if vit else 1)


# --recipe NAME: named flag values, applied before the command line's flags (which win). ExCB reports no CIFAR
# setting: cifar10-lt is the official ResNet config (ManiadisG/ExCB) with CIFAR's stem and crop sizes, our adaptation.
RECIPES = {
    "cpu": (
        "ExCB, 4-layer ViT, 16 px, 6 epochs of Fashion-MNIST-LT (docs/cpu_recipes.md)",
        dict(arch="vit_tiny", vit_layers=4, vit_dim=96, vit_heads=3, image_size=16, train_steps=1200)
        | dict(warmup_epochs=1, batch_size=64, lr=2e-3, teacher_momentum=0.99)
        | dict(num_clusters=256, hidden_dim=512, out_dim=64, num_local_crops=2),
    ),
    "cifar10-lt": (
        "the official ResNet config on CIFAR-10-LT: ResNet-18, 32/16 px crops, K 1024, 800 epochs, SGD (ours)",
        dict(dataset="cifar10", imbalance_ratio=100, image_size=32)  # the LDAM-DRW CIFAR-10-LT (Cao et al. 2019)
        | dict(arch="resnet18", local_size=16, num_clusters=1024)  # CIFAR stem, half-size locals, K ~ N/12 (ours)
        | dict(epochs=800, batch_size=128, warmup_epochs=10)  # official: 10 warm-up epochs; 800 epochs ours
        | dict(lr=0.15, weight_decay=1e-4)  # official: SGD 0.6 at 1024 (per 256 here), weight decay 1e-4
        | dict(hidden_dim=2048, out_dim=256, num_local_crops=6, teacher_momentum=0.996),  # official heads, crops
    ),
    "imagenet-lt": (
        "the official ResNet-50 config on ImageNet-LT: 224/96 px crops, 400 epochs, SGD, batch 8 x 128 = 1024",
        dict(dataset="imagenet-lt", image_size=224, local_size=96)  # the OLTR split files; official crop sizes
        | dict(arch="resnet50", epochs=400, batch_size=128, warmup_epochs=10)  # official: 400 epochs, 1024 global
        | dict(lr=0.15, weight_decay=1e-4, num_clusters=8192)  # official SGD 0.6 at 1024; K ~ N/14 (ours)
        | dict(hidden_dim=2048, out_dim=256, num_local_crops=6, teacher_momentum=0.996),  # official
    ),
}

# The range of every numeric flag of the method (validate; the shared flags': SHARED_RANGES, the data's: lt_data.RANGES)
RANGES = dict(drop_path="[0, 1)", final_weight_decay="[0, inf)", num_clusters="[2, inf)", hidden_dim="[1, inf)")
RANGES |= dict(out_dim="[1, inf)", num_local_crops="[0, inf)", local_size="[1, inf)", crop_scale="(0.05, 1)")
RANGES |= dict(teacher_temp="(0, inf)", student_temp="(0, inf)", size_momentum="[0, 1]", teacher_momentum="[0, 1]")
RANGES |= dict(kmeans_samples="[1, inf)", kmeans_iters="[1, inf)", kmeans_restarts="[1, inf)")


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
METHOD = "excb"
BOOST = 1.01  # the official code multiplies each row's largest balanced score by this before the softmax


def balance_scores(scores: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The balancing operator B of ExCB (paper Sec. 3, the cluster-balancing equation), in float32.

    ``scores`` [N, K] teacher cosines z in [-1, 1]; ``sizes`` [K] the size estimate s. With the relative size
    r_k = K * s_k / sum(s) (1 = a fair share): an undersized cluster (r_k < 1) gets 1 - (1 - z) * r_k (its cosine
    distance shrinks by r_k), an oversized one (r_k > 1) gets (1 + z) / r_k - 1 (its score moves towards -1),
    r_k = 1 leaves z. B maps [-1, 1] into itself and is increasing in z; no boost and no noise here.
    """
    z = scores.float()
    s = sizes.float()
    r = s * (s.numel() / s.sum())
    return torch.where(r < 1, 1 - (1 - z) * r, torch.where(r > 1, (1 + z) / r - 1, z))


@torch.no_grad()
def excb_targets(teacher_scores: torch.Tensor, sizes: torch.Tensor, teacher_temp: float = 0.04) -> torch.Tensor:
    """Teacher targets q [N, K] = softmax(clamp(boost(B(z, s)), -1, 1) / teacher_temp) (paper: targets from
    balanced scores; the x1.01 boost of each row's maximum and the clamp are from the official code). No gradient."""
    balanced = balance_scores(teacher_scores, sizes)
    top = balanced.argmax(dim=1, keepdim=True)
    balanced = balanced.scatter(1, top, balanced.gather(1, top) * BOOST).clamp(-1, 1)
    return torch.softmax(balanced / teacher_temp, dim=1)


@torch.no_grad()
def update_cluster_sizes(sizes: torch.Tensor, assignments: torch.Tensor, momentum: float = 0.999) -> torch.Tensor:
    """Online cluster-size estimate (paper: the momentum update of the relative cluster sizes).

    h = bincount(assignments, K) / len(assignments), averaged over processes (all-reduce sum / world size) when a
    process group is initialised, so every process holds the same global estimate; returns
    momentum * s + (1 - momentum) * h [K] in float32 whatever the autocast state (bf16 would round 0.999 to 1).
    """
    with torch.autocast(sizes.device.type, enabled=False):
        k = sizes.numel()
        h = torch.bincount(assignments.reshape(-1), minlength=k).to(torch.float32) / max(assignments.numel(), 1)
        if dist.is_initialized():
            dist.all_reduce(h)
            h = h / dist.get_world_size()
        return momentum * sizes.to(torch.float32) + (1 - momentum) * h


def excb_loss(targets: torch.Tensor, student_scores: torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """Cross-entropy of one teacher/student view pair (targets, scores [B, K]): batch mean of
    -sum_k q_k log softmax(z_student / tau_s)_k (paper: the clustering loss; averaged over the view pairs)."""
    return -(targets * F.log_softmax(student_scores.float() / student_temp, dim=1)).sum(dim=1).mean()


def train_step(run: RunState, batch) -> dict[str, torch.Tensor]:
    """One ExCB step (Maniadis Metaxas et al. 2024, Sec. 3) on two global views [B, 3, H, W] and M local views
    [B, 3, h, w] of B images; returns the loss and what ``diagnostics`` needs (no host sync).

    1. teacher scores z [2B, K] of the global views (cosines to the teacher's centroids, no gradient)
    2. targets q = excb_targets(z, s): balanced by the cluster-size estimate s (--no-balancing: s uniform)
    3. student scores; L = the mean, over the teacher's global views t, of excb_loss(q_t, scores) for: the student
       projector's scores of the other global view, and, with the predictor (default), the predictor's scores of
       every view, global view t itself included (as the official code), centroids detached; with --no-predictor,
       the projector's scores of every local view instead
    4. optimizer step on L (scheduled lr and weight decay)
    5. teacher <- m teacher + (1 - m) student (EMA, m scheduled from --teacher-momentum to 1)
    6. s <- m_s s + (1 - m_s) histogram of argmax q (all-reduced): step t's targets use s up to step t-1
    """
    args, model = run.args, run.model
    views, _, _ = batch
    b = views[0].shape[0]
    global_views = torch.cat(views[:2])
    local_views = torch.cat(views[2:]) if len(views) > 2 else None
    with torch.no_grad():  # 1, 2
        with run.autocast():
            teacher_features = model.teacher.project(global_views)
            teacher_scores = model.teacher.scores(teacher_features).float()
        sizes = model.sizes if args.balancing else torch.ones_like(model.sizes)
        targets = excb_targets(teacher_scores, sizes, args.teacher_temp)
    with run.autocast():  # 3
        projected, predicted = run.train_model(global_views, local_views)
    projected, predicted = projected.float(), (predicted.float() if predicted is not None else None)
    losses = []
    for view, target in enumerate(targets.chunk(2)):
        losses.append(excb_loss(target, projected.chunk(2)[1 - view], args.student_temp))
        if predicted is not None:
            losses += [excb_loss(target, scores, args.student_temp) for scores in predicted.split(b)]
    loss = torch.stack(losses).mean()
    optimizer_step(run, loss)  # 4
    teacher, student = list(model.teacher.parameters()), [p.detach() for p in model.student.parameters()]
    torch._foreach_lerp_(teacher, student, 1 - run.schedule["teacher_momentum"])  # 5: m teacher + (1 - m) student
    assignments = targets.argmax(1)
    model.sizes.copy_(update_cluster_sizes(model.sizes, assignments, args.size_momentum))  # 6
    student_scores = torch.cat([projected] + ([predicted] if predicted is not None else [])).detach()
    return {
        "loss": loss.detach(),
        "teacher_features": teacher_features,
        "teacher_scores": teacher_scores,
        "targets": targets,
        "assignments": assignments,
        "student_scores": student_scores,
    }


@torch.no_grad()
def diagnostics(run: RunState, out: dict) -> dict[str, torch.Tensor]:
    """The charts of a log step, from ``train_step``'s output: cluster usage (in use, entropy, sorted relative
    sizes), the confidences of teacher and student, agreement of the two views, what balancing changed, and the
    teacher cone: the norm of the global batch's mean unit teacher projection (0 for spread features, 1 when every
    image projects to one direction: the cosines then differ by less than the balancing moves them, and the targets
    stop depending on the image; docs/excb.md)."""
    args, sizes, assignments = run.args, run.model.sizes, out["assignments"]
    counts = torch.bincount(assignments, minlength=args.num_clusters).float()
    unit_sum = F.normalize(out["teacher_features"].float(), dim=1).sum(0)
    if run.world_size > 1:
        dist.all_reduce(counts)
        dist.all_reduce(unit_sum)
    share = sizes / sizes.sum()
    entropy = -(share * share.clamp_min(1e-12).log()).sum()
    relative = sizes * (args.num_clusters / sizes.sum())
    b = assignments.shape[0] // 2
    return {
        "charts/clusters_in_use": (counts > 0).sum().float(),
        "charts/usage_entropy": entropy / math.log(args.num_clusters),
        "charts/effective_clusters": entropy.exp(),
        "charts/cluster_sizes_sorted": relative.sort(descending=True).values,
        "charts/size_ratio_max": relative.max(),
        "charts/size_ratio_min": relative.min(),
        "charts/teacher_confidence": out["targets"].amax(1).mean(),
        "charts/student_confidence": torch.softmax(out["student_scores"] / args.student_temp, 1).amax(1).mean(),
        "charts/view_agreement": (assignments[:b] == assignments[b:]).float().mean(),
        "charts/changed_by_balancing": (out["teacher_scores"].argmax(1) != assignments).float().mean(),
        "charts/teacher_cone": (unit_sum / counts.sum()).norm(),
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
    excb_backbone_spec(args, data)
    n = min(len(data.pretrain_indices(args.balanced_twin)), args.kmeans_samples)
    if args.kmeans_init and n <= args.num_clusters:
        raise RunError(
            f"k-means initialisation of {args.num_clusters} centroids needs more than {args.num_clusters} images, "
            f"got {n}; lower --num-clusters or use --no-kmeans-init"
        )


def local_size(args: Args, data: lt_data.LTData) -> int:
    """--local-size's value, the local crop size: as given, else 96 px at ImageNet sizes (official ExCB/DINO: 224/96)
    and half the image (at least 8 px) at CIFAR sizes (32/16), for a ViT rounded down to a multiple of the patch
    (Fashion-MNIST's 28 px with patch 4: 12, not 14)."""
    size = args.local_size or (max(8, data.image_size // 2) if data.image_size < 112 else 96)
    patch = (args.patch_size or (4 if data.image_size < 64 else 16)) if args.arch.startswith("vit") else 1
    return size if args.local_size else max(patch, size // patch * patch)


def excb_backbone_spec(args: Args, data: lt_data.LTData) -> dict:
    """The backbone for build_backbone and the export; raises BackboneError on impossible backbone flags."""
    return backbone_spec(
        args.arch,
        data.image_size,
        args.vit_layers,
        args.vit_heads,
        args.vit_dim,
        args.patch_size,
        {"--local-size": local_size(args, data)},
    )


def crop_split(args: Args, epoch: int) -> float:
    """The crop-scale split s of an epoch: cosine from --crop-scale[0] to --crop-scale[1] over --epochs (official)."""
    return cosine(*args.crop_scale, epoch / max(args.epochs, 1))


def train_transform(args: Args, data: lt_data.LTData):
    return ExcbCrops(args, data)


class ExcbCrops:
    """Two global crops at scale (s, 1), then --num-local-crops local crops at (0.05, s) (official ExCB/DINO
    multi-crop, no blur below 96 px). s follows ``crop_split``: every sample carries its epoch
    (lt_data.ResumableSampler), so persistent workers and resumed runs use the right s."""

    def __init__(self, args: Args, data: lt_data.LTData):
        self.args, self.epoch = args, None
        self.sizes, self.mean, self.std = (data.image_size, local_size(args, data)), data.mean, data.std
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            s = crop_split(self.args, epoch)
            self.crops = lt_data.MultiCrop(
                *self.sizes,
                2,
                self.args.num_local_crops,
                self.mean,
                self.std,
                global_scale=(s, 1.0),
                local_scale=(0.05, s),
            )
            self.epoch = epoch

    def __call__(self, img):
        return self.crops(img)


class Model(nn.Module):
    """Student (backbone, projector, centroids, predictor), EMA teacher (same without predictor, no gradients),
    the cluster-size estimate s (float32 buffer, 1/K) and the centroid-initialisation flag, all in the state dict."""

    export_prefix = "teacher.backbone."  # the teacher backbone is exported and probed (official)

    def __init__(self, args: Args, data: lt_data.LTData):
        super().__init__()
        self.backbone_spec = excb_backbone_spec(args, data)
        self.student = Encoder(args, self.backbone_spec)
        vit = self.backbone_spec["arch"] == "vit"
        self.predictor = None
        if args.predictor:
            mlp = _mlp([args.out_dim, args.hidden_dim, args.out_dim], bn=not vit, act=nn.GELU if vit else nn.ReLU)
            self.predictor = nn.Sequential(nn.BatchNorm1d(args.out_dim), mlp)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        if vit:  # stochastic depth in the student only (official)
            self.student.backbone.set_drop_path(args.drop_path)
        self.register_buffer("sizes", torch.full((args.num_clusters,), 1.0 / args.num_clusters, dtype=torch.float32))
        self.register_buffer("centroids_initialised", torch.tensor(False))

    def forward(self, global_views: torch.Tensor, local_views: Optional[torch.Tensor]):
        """Student scores: (projector scores of the global views [2B, K], and either the predictor scores of all
        views [(2+M)B, K] with detached centroids, or, without predictor, the projector scores of the local
        views)."""
        student = self.student
        projected = student.project(global_views)
        projected_local = student.project(local_views) if local_views is not None else None
        if self.predictor is not None:
            both = projected if projected_local is None else torch.cat([projected, projected_local])
            return student.scores(projected), student.scores(self.predictor(both), detach_centroids=True)
        return student.scores(projected), (student.scores(projected_local) if projected_local is not None else None)

    def parameter_groups(self):
        """(weight matrices, biases/BatchNorm, centroids) of the student."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        centroids = [p for n, p in named if n.endswith("centroids")]
        decay = [p for n, p in named if p.ndim > 1 and not n.endswith("centroids")]
        no_decay = [p for n, p in named if p.ndim <= 1]
        return decay, no_decay, centroids


class Encoder(nn.Module):
    """Backbone, projector (ResNets: Linear-BN-ReLU-Linear-BN-ReLU-Linear; ViTs: GELU, no BN, official) and K
    centroids used as v_k / ||v_k||."""

    def __init__(self, args: Args, spec: dict):
        super().__init__()
        self.backbone = build_backbone(spec["arch"], **spec["arch_kwargs"])
        for m in self.backbone.modules():  # last BatchNorm of each residual block starts at 0 (official)
            for name in ("bn3", "bn2") if hasattr(m, "conv2") else ():
                if hasattr(m, name):
                    nn.init.zeros_(getattr(m, name).weight)
                    break
        vit = spec["arch"] == "vit"
        dims = [feature_dim(spec["arch"], **spec["arch_kwargs"]), args.hidden_dim, args.hidden_dim, args.out_dim]
        self.projector = _mlp(dims, bn=not vit, act=nn.GELU if vit else nn.ReLU)
        self.centroids = nn.Parameter(F.normalize(torch.randn(args.num_clusters, args.out_dim), dim=1))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def scores(self, h: torch.Tensor, detach_centroids: bool = False) -> torch.Tensor:
        """Cosines [N, K] of the rows of h [N, D] to the K centroids."""
        centroids = F.normalize(self.centroids, dim=1)
        return F.normalize(h, dim=1) @ (centroids.detach() if detach_centroids else centroids).t()


def _mlp(dims: list[int], bn: bool = True, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with [BN]-activation between them; truncated-normal (std 0.02) weights, zero biases (official)."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        nn.init.trunc_normal_(layers[-1].weight, std=0.02)
        nn.init.zeros_(layers[-1].bias)
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(b), act()] if bn else [act()]
    return nn.Sequential(*layers)


def make_optimizer(args: Args, model: Model, lr: float) -> torch.optim.Optimizer:
    """SGD momentum 0.9 (ResNets) or AdamW (ViTs), as the official configs; weight decay on weight matrices only,
    on the weight_decay schedule (the centroids on their own). Fused kernels (one pass; SGD unfused under fp16)."""
    decay, no_decay, centroids = model.parameter_groups()
    groups = [
        {"params": decay, "weight_decay": args.weight_decay, "weight_decay_schedule": "weight_decay"},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": centroids, "weight_decay": 10 * args.weight_decay, "weight_decay_schedule": "centroid_weight_decay"},
    ]
    if args.arch.startswith("vit"):
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, fused=args.amp != "fp16")  # see resolve_amp


def schedules(args: Args, step: int, total_steps: int, steps_per_epoch: int) -> dict[str, float]:
    """The official schedules: lr_scale (x the peak lr) a linear warm-up over --warmup-epochs, then a per-step
    cosine from 1 to 1e-4; weight_decay a cosine from --weight-decay to --final-weight-decay; the centroids'
    weight decay x(1 + 9c), c a cosine 1 -> 0; teacher_momentum a cosine from --teacher-momentum to 1; crop_scale
    the epoch's crop-scale split s (``crop_split``; logged only: the data workers' ``ExcbCrops`` apply it)."""
    progress = step / max(total_steps, 1)
    decaying = cosine(1.0, 0.0, progress)
    weight_decay = cosine(args.weight_decay, args.final_weight_decay, progress)
    return {
        "lr_scale": warmup_cosine(step, args.warmup_epochs * steps_per_epoch, total_steps, end=1e-4),
        "weight_decay": weight_decay,
        "centroid_weight_decay": weight_decay * (1 + 9 * decaying),
        "teacher_momentum": cosine(args.teacher_momentum, 1.0, progress),
        "crop_scale": crop_split(args, step // steps_per_epoch),
    }


def on_epoch_start(run: RunState, epoch: int) -> None:
    """Before epoch 0: k-means initialisation of the centroids (once; the flag is in the checkpoint)."""
    if run.args.kmeans_init and not bool(run.model.centroids_initialised):
        init_centroids(run)
        run.model.centroids_initialised.fill_(True)


KMEANS_CHUNK = 256  # images per forward pass of the k-means embedding (train-mode BatchNorm normalises each chunk)


@torch.no_grad()
def init_centroids(run: RunState) -> None:
    """Spherical k-means on the random teacher's projector outputs, before epoch 0 (official code: the teacher
    embeds a sample of the training set, then k-means; engine/trainer.py, ``Trainer.init_centroids``); student and
    teacher centroids are both set to the result.

    At most --kmeans-samples training images, drawn by a generator seeded with --seed, are embedded by all processes
    together (``embed_for_kmeans``: the features one process computes, in its order). Rank 0 alone runs the k-means
    and broadcasts the centroids, so every rank holds one process's result by construction (a k-means on every rank
    could drift apart: CUDA's index_add_ adds in no fixed order; the official distributed k-means all-reduces its
    sums, utils/misc.py); it takes seconds where the embedding takes minutes.
    Neither the global RNG nor the teacher's BatchNorm statistics move (own generators, a throw-away teacher copy).
    Rank 0 prints a start line, progress lines and a closing line with the times."""
    args, model = run.args, run.model
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(run.train_set), generator=g)[: args.kmeans_samples].sort().values.tolist()
    start = time.perf_counter()
    features = embed_for_kmeans(run, pick)
    centroids = torch.empty_like(model.student.centroids)
    if run.rank == 0:
        embedded = time.perf_counter()
        centroids.copy_(spherical_kmeans(features, args.num_clusters, args.kmeans_iters, args.kmeans_restarts, g))
        rate, done = len(pick) / (embedded - start), time.perf_counter()
        how = f"{len(pick)} images embedded at {rate:.0f} img/s on {run.world_size} x {run.device.type}"
        line = f"done in {done - start:.0f} s: {how}, {args.num_clusters} centroids in {done - embedded:.1f} s"
        print(f"k-means initialisation {line}", flush=True)
    if run.world_size > 1:
        dist.broadcast(centroids, 0)
    model.student.centroids.copy_(centroids)
    model.teacher.centroids.copy_(centroids)


def kmeans_chunks(n: int) -> list[range]:
    """The forward passes of the k-means embedding of ``n`` images: ranges of KMEANS_CHUNK positions, in order; a
    last chunk of one image joins the previous one (train-mode BatchNorm refuses a batch of 1). Every chunk but the
    last has KMEANS_CHUNK images."""
    bounds = [*range(0, n, KMEANS_CHUNK), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class KMeansChunks(torch.utils.data.Dataset):
    """Item i: the views [len(chunks[i]), 3, H, W] of ``dataset``'s items ``chunks[i]``, stacked, so that a
    DataLoader without batching (batch_size None) hands each worker whole chunks, unequal ones included."""

    def __init__(self, dataset: lt_data.IndexedDataset, chunks: list[range]):
        self.dataset, self.chunks = dataset, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([self.dataset[k][0] for k in self.chunks[i]])


@torch.no_grad()
def embed_for_kmeans(run: RunState, pick: list[int]) -> torch.Tensor:
    """The random teacher's projector outputs [len(pick), --out-dim] (float32, on run.device, on every rank) of the
    training images at positions ``pick`` of run.train_set, one deterministic view each (lt_data.eval_transform),
    in the order of ``pick``.

    One process embeds the chunks of ``kmeans_chunks`` in turn. Rank r of R embeds chunks r, r + R, r + 2R, ...
    through a DataLoader with --num-workers workers; the ranks all-gather their features (padded to the longest
    share: a rank may have one chunk more) and put them back in order. Every BatchNorm batch, hence every feature,
    is one process's, and the pass takes 1/R of its time (docs/excb.md has the cost). The teacher copy runs in
    train mode (batch statistics, as the teacher uses in training) with plain BatchNorm (``without_sync_batchnorm``),
    so no rank waits for another until the all-gather. The official code also splits the pass, each rank embedding
    its share of the training loader; there one training view per image, at the training batch size, and features
    that depend on the number of processes; here one deterministic view, chunks of KMEANS_CHUNK images."""
    args, rank, world = run.args, run.rank, run.world_size
    chunks = kmeans_chunks(len(pick))
    share = [sum(map(len, chunks[r::world])) for r in range(world)]  # images per rank
    views = lt_data.IndexedDataset(
        run.train_set.images,
        [run.train_set.indices[j] for j in pick],
        lt_data.eval_transform(run.data.image_size, run.data.mean, run.data.std),
    )
    # batch_size None: an item is a whole chunk; a generator of its own: the loader draws nothing from torch's RNG
    mine = KMeansChunks(views, chunks[rank::world])
    loader = lt_data.make_loader(mine, None, args.num_workers, generator=torch.Generator())
    teacher = without_sync_batchnorm(copy.deepcopy(run.model.teacher)).train()
    features = torch.zeros(max(share), args.out_dim, device=run.device)
    with StopsBetweenChunks() as stops:
        chunk_stream = iter(loader)  # the workers start
        if rank == 0:
            on = f"{world} process{'es' if world > 1 else ''} x {loader.num_workers} data-loading workers"
            print(f"k-means initialisation: embedding {len(pick)} training images on {on}", flush=True)
        start = last = time.perf_counter()
        done, tenths = 0, 0
        for x in chunk_stream:
            stops.pass_on()  # a stop signal that came while the chunk was awaited takes effect here
            with run.autocast():
                features[done : done + len(x)] = teacher.project(run.to_device(x)).float()
            done, now = done + len(x), time.perf_counter()
            if rank == 0 and done < share[0] and (10 * done // share[0] > tenths or now - last >= 30):
                tenths, last, rate = 10 * done // share[0], now, done / (now - start)
                eta = round((share[0] - done) / rate)
                line = f"{done}/{share[0]} images on rank 0, {rate:.0f} img/s per process"
                print(f"k-means initialisation: {line}, eta {eta // 60}m{eta % 60:02d}s", flush=True)
    del chunk_stream, loader, teacher  # the workers end here
    gathered = [features]
    if world > 1:
        gathered = [torch.empty_like(features) for _ in range(world)]
        dist.all_gather(gathered, features)
    # chunk c is the (c // R)-th chunk of rank c % R, after (c // R) full chunks of that rank
    rows = [gathered[c % world][c // world * KMEANS_CHUNK :][: len(chunk)] for c, chunk in enumerate(chunks)]
    return torch.cat(rows)


class StopsBetweenChunks:
    """While active, a stop signal (SIGINT, SIGTERM, SIGHUP) is only noted; ``pass_on()`` hands it to the handler it
    replaced (in a run, the training loop's, which stops it; SIG_DFL: the default action) at a point the caller
    chooses, and leaving does so at the latest. The k-means pass waits inside torch's DataLoader, where a stop raised
    while a worker hands a chunk over (shared memory) cuts the hand-over and leaves the worker's traceback on stderr
    (tests/test_excb.py::test_a_stop_signal_during_the_kmeans_init_stops_the_run_at_once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.noted = []
        self.handlers = {s: signal.signal(s, lambda signum, _: self.noted.append(signum)) for s in self.SIGNALS}
        return self

    def pass_on(self) -> None:
        while self.noted:
            signum = self.noted.pop(0)
            handler = self.handlers[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:  # what the signal would have done without this object: end the process
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

    def __exit__(self, *exc) -> None:
        for s, handler in self.handlers.items():
            signal.signal(s, handler)
        if exc[0] is None:
            self.pass_on()


def without_sync_batchnorm(encoder: Encoder) -> Encoder:
    """``encoder`` with every nn.SyncBatchNorm (--sync-bn under DDP) replaced, in place, by the plain BatchNorm that
    nn.SyncBatchNorm.convert_sync_batchnorm made it from (BatchNorm2d in the ResNet backbone, BatchNorm1d in the
    projector), sharing its parameters and buffers. For the k-means pass's throw-away teacher copy: each rank embeds
    its own chunks, so a SyncBatchNorm's all-gathers there would pair with other ranks' other chunks, or with none
    (a hang), where one process normalises each chunk by its own statistics."""
    for name, m in list(encoder.named_modules()):
        if isinstance(m, nn.SyncBatchNorm):
            kind = nn.BatchNorm2d if name.startswith("backbone.") else nn.BatchNorm1d
            plain = kind(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(plain, key, getattr(m, key))
            encoder.set_submodule(name, plain.train(m.training))
    return encoder


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iters: int, restarts: int, generator: torch.Generator) -> torch.Tensor:
    """Spherical k-means on L2-normalised rows of ``x`` [N, D] -> centroids [k, D]; restarts until no cluster is
    empty (or ``restarts`` tries, keeping the attempt with the fewest empty clusters, whose empty centroids stay at
    their random sample)."""
    x = F.normalize(x.float(), dim=1)
    best, best_empty = None, None
    for _ in range(max(restarts, 1)):
        centroids = x[torch.randperm(len(x), generator=generator)[:k]].clone()
        for _ in range(iters):
            assigned = (x @ centroids.t()).argmax(1)
            sums = torch.zeros_like(centroids).index_add_(0, assigned, x)
            counts = torch.bincount(assigned, minlength=k)
            centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centroids)
        empty = int((torch.bincount((x @ centroids.t()).argmax(1), minlength=k) == 0).sum())
        if best is None or empty < best_empty:
            best, best_empty = centroids, empty
        if empty == 0:
            break
    return best


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
