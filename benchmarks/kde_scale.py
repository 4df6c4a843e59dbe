"""The KDE update of simsiam_rwsam.py at ImageNet-LT and iNaturalist sizes: one update's time, against every image
and against reference subsets of M images, and its share of the training epochs between two updates.

The update's cost is the density estimate of N L2-normalised backbone features of dimension D (ResNet-50: 2048)
against M reference features: O(N M D) in blocks of --chunk-size. Timing all N rows at N = 115,846 and M = N takes
minutes, so this times --queries rows (random images, as many blocks of --chunk-size rows) with the script's own
estimator, exactly as ``sharded_kde_weights`` runs it for one rank's rows, and extrapolates: the rows are independent
blocks of equal work, so the time is proportional to the rows (one update = timed x N / queries). Under DDP the
rows are sharded: a rank's share is that divided by the number of ranks R (the two all-gathers are not timed). The
subsets are the script's own (``kde_reference_indices``: seeded, uniform). Times are the process's CPU time (user +
system), which on a shared machine is what one quiet core would take at --threads 1 (wall-clock shown beside it).

The features are synthetic, clustered like a long-tailed data set: --classes class centres (random unit vectors),
class sizes on an exponential profile with head/tail ratio --imbalance scaled to N images, each image its centre plus
Gaussian noise of norm --spread, normalised. The timing does not depend on the values; the density error does: for
the timed rows, the relative error |p_M / p - 1| of the subset estimate p_M against the exact p (every other image),
median over all rows and over the rows of the rare classes (fewer than 20 images: ImageNet-LT's few-shot group).

The share of the E = --reweight-every epochs between updates: (1) on this CPU, with the same threads, against a
measured rwSAM step (simsiam_rwsam.train_step, --sam asam, --step-arch at --step-size px, bf16 if the CPU has native
bf16, else fp32): share = update / (E x N x step seconds per image); (2) on R GPUs under two stated assumptions, not
measurements: a GPU computes the update --gpu-speedup times faster than this CPU, and trains --gpu-images-per-s
rwSAM images per second (each image: two views, two forward-backward passes). The share does not depend on N or R:
it is M x (seconds per query-reference pair) / (E x seconds per training image).

    OMP_NUM_THREADS=1 python benchmarks/kde_scale.py                             # ImageNet-LT: N 115,846, D 2048
    OMP_NUM_THREADS=1 python benchmarks/kde_scale.py --n 437513 --classes 8142 --imbalance 500 --queries 4096

Prints the CPU, the settings and a Markdown table, one row per reference size. Asserts nothing.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lt_data  # noqa: E402
import simsiam_rwsam as ss  # noqa: E402


@dataclass
class KdeScaleArgs:
    n: int = 115_846
    """images (ImageNet-LT's training set: 115,846; iNaturalist 2018: 437,513)"""
    dim: int = 2048
    """feature dimension: the backbone's (ResNet-50: 2048, ResNet-18: 512; the script's KDE uses backbone features)"""
    references: tuple[int, ...] = (0, 4096, 16384, 32768)
    """reference sizes M to time; 0: every other image (the exact KDE)"""
    queries: int = 8192
    """rows timed per reference size (random images); the update's time is extrapolated by N / queries"""
    chunk_size: int = 4096
    """the script's --kde-chunk-size"""
    bandwidth: float = 0.3
    """the script's --kde-bandwidth"""
    classes: int = 1000
    """classes of the synthetic features (ImageNet-LT: 1,000; iNaturalist 2018: 8,142)"""
    imbalance: float = 256.0
    """head/tail class-size ratio of the synthetic features (ImageNet-LT: 1,280 / 5; iNaturalist 2018: 1,000 / 2)"""
    spread: float = 0.5
    """norm of each image's Gaussian offset from its class centre (a unit vector), before normalisation"""
    threads: int = 1
    """torch threads"""
    seed: int = 0
    reweight_every: int = 10
    """E, the epochs between two updates (the script's --reweight-every)"""
    ranks: int = 8
    """R, processes sharing the update's rows (DDP)"""
    step_arch: Literal["resnet18", "resnet50"] = "resnet50"
    """backbone of the measured rwSAM step (the yardstick on this CPU)"""
    step_size: int = 224
    """image size of the measured step"""
    step_batch: int = 8
    """batch of the measured step; 0: no step measured (no CPU share column)"""
    step_repeats: int = 2
    """timed steps after one warm-up step (median)"""
    gpu_speedup: float = 100.0
    """ASSUMED: a GPU computes the update this many times faster than this CPU at --threads"""
    gpu_images_per_s: float = 750.0
    """ASSUMED: rwSAM training images per second per GPU (ResNet-50, 224 px, bf16; 4 forward-backward per image)"""


def cpu_name() -> str:
    """lscpu's model name (from /proc/cpuinfo), and whether the CPU computes bf16 natively."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    native = ss.resolve_amp("auto", torch.device("cpu")) == "bf16"
    return f"{name}, {'native bf16' if native else 'no native bf16'}"


def clustered_features(a: KdeScaleArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] unit rows and their class labels [N]: class c has about N r^(-c/(C-1)) / sum images (at least 1)."""
    g = torch.Generator().manual_seed(a.seed)
    share = a.imbalance ** (-torch.arange(a.classes, dtype=torch.float64) / max(a.classes - 1, 1))
    counts = torch.clamp((share / share.sum() * a.n).floor().long(), min=1)
    while counts.sum() != a.n:  # hand the rounding's remainder to (or take it from) the largest classes
        step = 1 if counts.sum() < a.n else -1
        counts[: min(abs(int(counts.sum()) - a.n), a.classes)] += step
    labels = torch.repeat_interleave(torch.arange(a.classes), counts)
    centres = F.normalize(torch.randn(a.classes, a.dim, generator=g), dim=1)
    feats = torch.empty(a.n, a.dim)
    for s in range(0, a.n, 16384):  # in blocks: no second N x D temporary
        e = min(s + 16384, a.n)
        noise = torch.randn(e - s, a.dim, generator=g) * (a.spread / math.sqrt(a.dim))
        feats[s:e] = F.normalize(centres[labels[s:e]] + noise, dim=1)
    return feats, labels


def step_seconds_per_image(a: KdeScaleArgs) -> float:
    """Median CPU seconds per image of simsiam_rwsam.train_step (--sam asam, KDE weights) on a random batch."""
    amp = "bf16" if ss.resolve_amp("auto", torch.device("cpu")) == "bf16" else "none"
    args = ss.Args(
        dataset="synthetic",
        synthetic_classes=2,
        synthetic_per_class=a.step_batch,
        image_size=a.step_size,
        imbalance_ratio=1.0,
        batch_size=a.step_batch,
        arch=a.step_arch,
        amp=amp,
    )
    data = lt_data.build_data(args)
    torch.manual_seed(a.seed)
    model = ss.Model(args, data).to(memory_format=torch.channels_last)
    model.sample_weights.uniform_(0.5, 2.0)
    run = ss.RunState(
        args=args, model=model, train_model=model, optimizer=ss.make_optimizer(args, model, 0.01), data=data
    )
    g = torch.Generator().manual_seed(a.seed)
    views = [torch.randn(a.step_batch, 3, a.step_size, a.step_size, generator=g) for _ in range(2)]
    batch = [[v.contiguous(memory_format=torch.channels_last) for v in views], None, torch.arange(a.step_batch)]
    model.train()
    times = []
    for i in range(a.step_repeats + 1):
        start = time.process_time()
        ss.train_step(run, batch)["loss"].item()
        if i:  # the first step is a warm-up (oneDNN primitive creation)
            times.append(time.process_time() - start)
    return statistics.median(times) / a.step_batch


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def main(a: KdeScaleArgs) -> list[dict]:
    torch.set_num_threads(a.threads)
    if not 0 < a.queries <= a.n:
        raise SystemExit(f"kde_scale: --queries must be in [1, --n], got {a.queries}")
    feats, labels = clustered_features(a)
    counts = torch.bincount(labels, minlength=a.classes)
    g = torch.Generator().manual_seed(a.seed + 1)
    rows_ids = torch.randperm(a.n, generator=g)[: a.queries].sort().values
    queries, rare = feats[rows_ids], counts[labels[rows_ids]] < 20
    ids = torch.arange(a.n)
    ss._kde_log_density(queries[:64], feats[:4096], a.bandwidth, a.chunk_size, rows_ids[:64], ids[:4096])  # warm-up
    step_s = step_seconds_per_image(a) if a.step_batch else math.nan
    print(
        f"kde_scale on {cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}: "
        f"N {a.n}, D {a.dim}, "
        f"{a.queries} timed rows in blocks of {a.chunk_size}, bandwidth {a.bandwidth}; features: {a.classes} classes "
        f"({int(counts.max())} to {int(counts.min())} images), spread {a.spread}, {int(rare.sum())} timed rows in "
        f"classes under 20 images",
        flush=True,
    )
    if a.step_batch:
        print(
            f"rwSAM step on this CPU ({a.step_arch}, {a.step_size} px, batch {a.step_batch}, median of "
            f"{a.step_repeats}): {step_s:.3f} s per image -> {duration(step_s * a.n)} per epoch of N images",
            flush=True,
        )
    gpu_epoch = a.n / (a.ranks * a.gpu_images_per_s)
    print(
        f"assumed, not measured: a GPU runs the update {a.gpu_speedup:g}x faster than this CPU and trains "
        f"{a.gpu_images_per_s:g} rwSAM images/s -> one epoch on {a.ranks} GPUs {duration(gpu_epoch)}, "
        f"{a.reweight_every} epochs {duration(a.reweight_every * gpu_epoch)}",
        flush=True,
    )
    rows, exact = [], None
    for m in a.references:
        reference = None if m == 0 else ss.kde_reference_indices(a.n, m, a.seed, 0)
        ref_ids = ids if reference is None else reference
        ref = feats if reference is None else feats[ref_ids]
        start, wall = time.process_time(), time.perf_counter()
        log_p = ss._kde_log_density(queries, ref, a.bandwidth, a.chunk_size, rows_ids, ref_ids)
        timed, wall = time.process_time() - start, time.perf_counter() - wall
        m_eff = a.n - 1 if reference is None else len(reference)
        update = timed * a.n / a.queries
        row = {
            "m": m_eff,
            "timed_s": timed,
            "wall_s": wall,
            "ns_per_pair": timed / (a.queries * m_eff) * 1e9,
            "update_s": update,
            "per_rank_s": update / a.ranks,
            "gpu_per_rank_s": update / a.ranks / a.gpu_speedup,
            "cpu_share": update / (a.reweight_every * a.n * step_s),
            "gpu_share": update / a.ranks / a.gpu_speedup / (a.reweight_every * gpu_epoch),
            "error_median": math.nan,
            "error_rare": math.nan,
        }
        if m == 0:
            exact = log_p
        elif exact is not None:
            error = (log_p - exact).exp().sub(1).abs()
            row["error_median"] = error.median().item()
            row["error_rare"] = error[rare].median().item() if rare.any() else math.nan
        rows.append(row)
    print(
        f"\n| M | timed: {a.queries} rows, CPU (wall) | ns / pair | one update, N rows | per rank, R = {a.ranks} "
        f"| per rank on GPUs (assumed) | share of {a.reweight_every} epochs, this CPU "
        f"| share, {a.ranks} GPUs (assumed) "
        f"| density error, median | median, classes < 20 |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        name = f"all {r['m']:,}" if r["m"] == a.n - 1 else f"{r['m']:,}"
        pct = lambda v, d=1: "-" if math.isnan(v) else f"{100 * v:.{d}f}%"
        print(
            f"| {name} | {r['timed_s']:.2f} s ({r['wall_s']:.2f} s) | {r['ns_per_pair']:.2f} | "
            f"{duration(r['update_s'])} | "
            f"{duration(r['per_rank_s'])} | {duration(r['gpu_per_rank_s'])} | {pct(r['cpu_share'], 2)} | "
            f"{pct(r['gpu_share'], 2)} | {pct(r['error_median'])} | {pct(r['error_rare'])} |"
        )
    return rows


if __name__ == "__main__":
    main(tyro.cli(KdeScaleArgs, description=__doc__.split("\n\n")[0]))
