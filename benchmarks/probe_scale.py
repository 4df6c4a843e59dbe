"""What do the probe's linear head and kNN cost at ImageNet-LT's and iNaturalist 2018's sizes?

Random features stand in for a ResNet-50's (2,048-d): ImageNet-LT, 1,000 classes, 115,846 training and 50,000
test images (Liu et al. 2019, OLTR); iNaturalist 2018, 8,142 classes, 437,513 training and 24,426 validation
images (Van Horn et al. 2018). For each, on this machine's CPU (and on the GPU when there is one):

  linear  one epoch of linear_probe.train_linear (batch 256), from the time of ``--linear-steps`` steps,
          extrapolated to the epoch's steps and to the default 100 epochs (plus the one standardisation of
          the features, timed whole);
  knn     linear_probe.knn_predict (k 20, T 0.07) over every test image, from the time of ``--knn-queries``
          queries against the whole bank, extrapolated (plus the one normalisation of the bank, timed whole);

each for the previous code (the probe before it followed the features' device: a frozen copy below) and the
current one, in the same run, alternating, ``--repeats`` times: the fastest of the repeats is reported (on a
shared machine the others measure the neighbours). Prints a markdown table with the CPU's name. Asserts nothing.

    python benchmarks/probe_scale.py                                # both sizes, as in docs/benchmarks.md
    python benchmarks/probe_scale.py --scale 0.001 --dim 16 --linear-steps 2 --knn-queries 8   # a tiny run
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import linear_probe  # noqa: E402
import lt_data  # noqa: E402

# name: (classes, training images, test images)
CASES = {"imagenet-lt": (1000, 115_846, 50_000), "inaturalist-2018": (8142, 437_513, 24_426)}
LABELS = {"imagenet-lt": "ImageNet-LT", "inaturalist-2018": "iNaturalist 2018"}


@dataclass
class Args:
    cases: tuple[Literal["imagenet-lt", "inaturalist-2018"], ...] = ("imagenet-lt", "inaturalist-2018")
    """the data sets whose sizes are measured"""
    scale: float = 1.0
    """multiplies every size (images and classes; at least 2 classes): 0.001 for a quick run"""
    dim: int = 2048
    """feature dimension (ResNet-50: 2,048)"""
    linear_steps: int = 10
    """linear-head steps timed per code and repeat (after 2 untimed ones), then extrapolated"""
    knn_queries: int = 1024
    """kNN queries timed per code and repeat against the whole bank, then extrapolated"""
    repeats: int = 3
    """alternating timings of each code; the fastest counts"""
    epochs: int = 100
    """linear-head epochs of the extrapolation (the probe's default)"""
    batch_size: int = 256
    """linear-head batch size (the probe's default)"""
    seed: int = 0


# ------------------------------------------------------------------ the previous code, frozen
# linear_probe.py's knn_predict and train_linear's loop at commit c377da9: features on the CPU, 1,024-query chunks,
# a CPU generator and LambdaLR; the same computation, kept here so that both can be timed in one run.


def old_knn_predict(train_f, train_y, test_f, num_classes, k, temperature, chunk=1024):
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    preds = []
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i : i + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def old_train_linear(train_f, train_y, num_classes, epochs, lr, batch_size, weight_decay, seed):
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    clf = nn.Linear(train_f.shape[1], num_classes)
    nn.init.zeros_(clf.weight), nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    xs = (train_f - mean) / std
    steps = epochs * math.ceil(len(xs) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(1, epochs + 1):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), batch_size):
            j = perm[i : i + batch_size]
            loss = F.cross_entropy(clf(xs[j]), train_y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return nn.Sequential(clf)


# ------------------------------------------------------------------ measurement


def cpu_name() -> str:
    """lscpu's model name (from /proc/cpuinfo) and whether the CPU has avx512_bf16 and AMX (amx_bf16)."""
    fields = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    model, flags = fields.get("model name", platform.processor() or platform.machine()), fields.get("flags", "")
    has = lambda flag: "with" if flag in flags.split() else "without"  # noqa: E731
    return f"{model}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, " + (
        f"{has('avx512_bf16')} avx512_bf16, {has('amx_bf16')} AMX (amx_bf16)"
    )


def timed(fn, device: torch.device) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all of this process's threads) of ``fn()``, the device's queue drained before
    and after. On a machine shared with other jobs the CPU time moves less than the wall-clock time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def seconds(s: float) -> str:
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def measure(name: str, args: Args, device: torch.device, codes: list[str]) -> list[list[str]]:
    """Table rows of one data set on one device: the linear head and kNN, per code."""
    classes, n_train, n_test = CASES[name]
    classes = max(2, round(classes * args.scale))
    n_train, n_test = max(classes, round(n_train * args.scale)), max(1, round(n_test * args.scale))
    g = torch.Generator().manual_seed(args.seed)
    train_f = torch.randn(n_train, args.dim, generator=g).to(device)
    train_y = torch.randint(0, classes, (n_train,), generator=g).to(device)
    test_f = torch.randn(n_test, args.dim, generator=g).to(device)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    steps = min(args.linear_steps, steps_per_epoch)
    queries = min(args.knn_queries, n_test)
    standardise = timed(lambda: (train_f - train_f.mean(0)) / train_f.std(0).clamp_min(1e-6), device)
    normalise = timed(lambda: F.normalize(train_f, dim=1), device)
    size = f"{LABELS[name]}: {classes:,} classes, {n_train:,} / {n_test:,}, {args.dim:,}-d"
    best = {code: {"step": [math.inf] * 2, "knn": [math.inf] * 2} for code in codes}  # (wall, CPU) seconds
    for _ in range(args.repeats):
        for code in codes:
            train_linear = old_train_linear if code == "previous" else linear_probe.train_linear
            knn_predict = old_knn_predict if code == "previous" else linear_probe.knn_predict

            def linear(n_steps):
                sub_f, sub_y = train_f[: n_steps * args.batch_size], train_y[: n_steps * args.batch_size]
                train_linear(sub_f, sub_y, classes, 1, 0.5, args.batch_size, 0.0, args.seed)

            linear(min(2, steps))  # warm-up: allocations, kernels
            step = [t / steps for t in timed(lambda: linear(steps), device)]
            knn = timed(lambda: knn_predict(train_f, train_y, test_f[:queries], classes, 20, 0.07), device)
            best[code]["step"] = [min(a, b) for a, b in zip(best[code]["step"], step)]
            best[code]["knn"] = [min(a, b) for a, b in zip(best[code]["knn"], knn)]
    rows = []
    where = f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else device.type
    for code in codes:
        epoch = [t * steps_per_epoch for t in best[code]["step"]]
        knn_all = [n + max(t - n, 0.0) * n_test / queries for t, n in zip(best[code]["knn"], normalise)]
        cpu = device.type == "cpu"
        rows.append(
            [
                size,
                where,
                code,
                f"{best[code]['step'][0] * 1000:.1f} ms" + (f" ({best[code]['step'][1] * 1000:.1f} ms)" if cpu else ""),
                seconds(epoch[0]) + (f" ({seconds(epoch[1])})" if cpu else ""),
                seconds(standardise[0] + epoch[0] * args.epochs)
                + (f" ({seconds(standardise[1] + epoch[1] * args.epochs)})" if cpu else ""),
                seconds(knn_all[0]) + (f" ({seconds(knn_all[1])})" if cpu else ""),
                f"{steps} of {steps_per_epoch:,} steps; {queries:,} of {n_test:,} queries; fastest of {args.repeats}",
            ]
        )
    return rows


def main() -> None:
    args = tyro.cli(Args)
    if min(args.scale, args.dim, args.linear_steps, args.knn_queries, args.epochs, args.repeats) <= 0:
        raise SystemExit(
            "probe_scale.py: error: --scale, --dim, --linear-steps, --knn-queries, --epochs, --repeats must be > 0"
        )
    if "OMP_NUM_THREADS" not in os.environ:  # as linear_probe.py's main
        torch.set_num_threads(lt_data.usable_cpus())
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"linear head: batch {args.batch_size}, {args.epochs} epochs extrapolated from --linear-steps; "
        f"kNN: k 20, T 0.07, all test images extrapolated from --knn-queries; wall-clock time, CPU time of all "
        f"threads in parentheses; load average at the start {os.getloadavg()[0]:.1f}\n"
    )
    print(
        f"| features (classes, train / test, dim) | device | code | linear step | linear epoch (est.) "
        f"| linear, {args.epochs} epochs (est.) | kNN, all queries (est.) | timed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        for device in devices:  # the previous code ran on the CPU whatever the device
            codes = ["previous", "current"] if device.type == "cpu" else ["current"]
            for row in measure(name, args, device, codes):
                print("| " + " | ".join(row) + " |", flush=True)
        if len(devices) == 1:
            print(f"| {LABELS[name]} | GPU | current | not measured: no GPU here | | | | |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
