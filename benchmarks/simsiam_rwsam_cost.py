"""Costs of simsiam_rwsam.py: the (A)SAM step against a plain SimSiam step, and the KDE weights at scale.

    python benchmarks/simsiam_rwsam_cost.py --what step --image-size 32 --batch-size 32
    python benchmarks/simsiam_rwsam_cost.py --what kde --n 115846 --dim 512 --reference 8192

step: median time of simsiam_rwsam.train_step with --sam none / sam / asam on the same random batch
      (ResNet-18, default widths), ratio to --sam none.
kde:  kde_weights on random unit features of N x D (time, peak resident memory above the features);
      with --reference M the cost is O(N M) (the full O(N^2) time is then extrapolated as N / M times it);
      and the yardstick: one eval-mode ResNet-18 forward over N images of --forward-size px, timed on
      --forward-batch images and extrapolated to N. Prints one line per measurement; asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lt_data  # noqa: E402
import simsiam_rwsam as ss  # noqa: E402
from linear_probe import build_backbone  # noqa: E402


@dataclass
class CostArgs:
    what: Literal["step", "kde"]
    """step: (A)SAM step cost ratio; kde: KDE weights time and memory"""
    image_size: int = 32
    batch_size: int = 32
    amp: Literal["bf16", "none"] = "bf16"
    repeats: int = 5
    n: int = 115846
    dim: int = 512
    reference: int = 0
    """0: every other example (O(N^2)); M: a random reference subset of M points"""
    chunk_size: int = 4096
    forward_size: int = 224
    forward_batch: int = 16


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def bench_step(a: CostArgs) -> None:
    times = {}
    g = torch.Generator().manual_seed(0)
    views = [
        torch.randn(a.batch_size, 3, a.image_size, a.image_size, generator=g).contiguous(
            memory_format=torch.channels_last
        )
        for _ in range(2)
    ]
    batch = [views, torch.zeros(a.batch_size, dtype=torch.long), torch.arange(a.batch_size)]
    for sam in ("none", "sam", "asam"):
        args = ss.Args(
            dataset="synthetic",
            synthetic_classes=4,
            synthetic_per_class=a.batch_size,
            image_size=a.image_size,
            imbalance_ratio=1.0,
            batch_size=a.batch_size,
            amp=a.amp,
            sam=sam,
            reweight="kde" if sam != "none" else "none",
        )
        data = lt_data.build_data(args)
        torch.manual_seed(0)
        model = ss.Model(args, data).to(memory_format=torch.channels_last)
        model.sample_weights.uniform_(0.5, 2.0)
        opt = ss.make_optimizer(args, model, 0.01)
        run = ss.RunState(
            args=args,
            data=data,
            model=model,
            train_model=model,
            optimizer=opt,
        )
        model.train()
        ss.train_step(run, batch)  # warm-up
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = ss.train_step(run, batch)
            out["loss"].item()
            ts.append(time.perf_counter() - t0)
        times[sam] = statistics.median(ts)
        print(
            f"--sam {sam}: {times[sam]:.3f} s/step (median of {a.repeats}), ratio to --sam none "
            f"{times[sam] / times['none']:.2f}  [batch {a.batch_size}, {a.image_size} px, amp {a.amp}, "
            f"{torch.get_num_threads()} threads]",
            flush=True,
        )


def bench_kde(a: CostArgs) -> None:
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(a.n, a.dim), dim=1)
    reference = torch.randperm(a.n)[: a.reference].sort().values if a.reference else None
    base = peak_rss_mb()
    reset_peak()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    w = ss.kde_weights(feats, bandwidth=0.3, reference=reference, chunk_size=a.chunk_size)
    t = time.perf_counter() - t0
    peak = peak_rss_mb()
    m = a.reference or a.n - 1
    print(
        f"kde_weights N={a.n} D={a.dim} M={m} chunk {a.chunk_size}: {t:.1f} s, peak RSS +{peak - base:.0f} MB "
        f"above the {feats.numel() * 4 / 2**20:.0f} MB features (min {w.min():.3f}, max {w.max():.3f}); "
        f"full O(N^2) estimate {t * (a.n - 1) / m:.0f} s  [{torch.get_num_threads()} threads]",
        flush=True,
    )
    model = build_backbone("resnet18", cifar_stem=a.forward_size < 64).eval().to(memory_format=torch.channels_last)
    x = torch.randn(a.forward_batch, 3, a.forward_size, a.forward_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        model(x)
        tf = time.perf_counter() - t0
    total = tf / a.forward_batch * a.n
    print(
        f"yardstick: ResNet-18 fp32 eval forward at {a.forward_size} px: {tf / a.forward_batch * 1e3:.1f} ms/image "
        f"-> {total:.0f} s for {a.n} images (extrapolated); KDE / forward = {t / total:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    a = tyro.cli(CostArgs)
    bench_step(a) if a.what == "step" else bench_kde(a)
