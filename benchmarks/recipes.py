"""The CPU recipes (docs/cpu_recipes.md) and the check that they learn: every SSL method's exported backbone
against the same backbone at random init, on any data set, over seeds.

For every method in --methods and every seed in --seeds: pre-train with the method's CPU recipe (the script's
`--recipe cpu`) on the long-tailed set, probe the exported backbone with linear_probe.py (probe --seed = training
seed - 1), and probe the same architecture at random init with the same probe seed (linear_probe.py --random-init
on the run's own backbone.pt). Reported: linear and kNN top-1 per seed,
their means, the difference to the random backbone's mean, and whether it reaches the bar of issue 14 (+3 linear,
+5 kNN); a markdown table and <output-dir>/recipes.json (every per-seed number).

    python benchmarks/recipes.py                                  # Fashion-MNIST-LT (r = 100, 16 px), seeds 1 2
    python benchmarks/recipes.py --dataset imagefolder --data-dir data/digits --imbalance-ratio 10 \\
        --output-dir runs/recipes_digits                          # any ImageFolder

Each run is 6 to 10 minutes on one core of our 2-core CPU (docs/cpu_recipes.md); run one worker per core on
disjoint seeds or methods, then gather with the plain command (it resumes: a run whose backbone.pt exists is not
retrained, a probe whose JSON exists is not re-run, an interrupted run resumes from its checkpoint):

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/recipes.py --seeds 1 --num-workers 0 &
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/recipes.py --seeds 2 --num-workers 0 &
    wait; python benchmarks/recipes.py

benchmarks/gap_table.py runs the same recipes for the papers' claims (docs/claims.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import NoReturn, Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lt_data  # noqa: E402  (the data sets the scripts accept)

# The CPU recipes, one per method: each script's own `--recipe cpu` (its RECIPES table, docs/cpu_recipes.md),
# plus the flag that turns the script's method into its variant (SimSiam is rwSAM's script without SAM, PMSN is
# MSN's with the power-law prior).
RECIPES = {
    "supervised": ("supervised_baseline.py", ["--recipe", "cpu"]),  # the SSL rows' ViT and optimiser
    "simsiam": ("simsiam_rwsam.py", ["--recipe", "cpu", "--sam", "none"]),
    "rwsam": ("simsiam_rwsam.py", ["--recipe", "cpu"]),
    "msn": ("msn_prior.py", ["--recipe", "cpu"]),
    "pmsn": ("msn_prior.py", ["--recipe", "cpu", "--prior", "power-law"]),
    "excb": ("excb.py", ["--recipe", "cpu"]),
}
SSL = [m for m in RECIPES if m != "supervised"]
BAR = {"linear": 3.0, "knn": 5.0}  # issue 14: points above the random backbone, mean of the seeds


@dataclass
class RecipeArgs:
    """Each SSL method's CPU recipe against the same backbone at random init, over seeds."""

    methods: tuple[str, ...] = tuple(SSL)
    """methods to run (each gets the random-init row of its own backbone)"""
    seeds: tuple[int, ...] = (1, 2)
    """training seeds (>= 1; each run's probes use --seed = training seed - 1)"""
    dataset: lt_data.DatasetName = "fashion-mnist"
    """data set of the pre-training and of the probe"""
    data_dir: str = lt_data.FASHION_MNIST_DEBIAN
    """--data-dir of the scripts"""
    imbalance_ratio: Optional[float] = None
    """head/tail ratio of the long-tailed set; default: the scripts' (100 for Fashion-MNIST, 1 for an ImageFolder)"""
    image_size: int = 16
    """input resolution (the recipes are made for 16 px)"""
    synthetic_classes: int = 10
    """synthetic: classes"""
    synthetic_per_class: int = 500
    """synthetic: images per class before subsampling"""
    knn_k: Optional[int] = None
    """the probe's kNN neighbours; default: the probe's (200, at most a twentieth of the smallest class)"""
    train_steps: Optional[int] = None
    """replaces every recipe's --train-steps for a shorter check (the recipes': 1800 SimSiam/rwSAM, 1200 others)"""
    extra: str = ""
    """extra flags passed to every training script (after the recipe's), e.g. --extra="--amp none" """
    num_workers: int = 2
    """data-loading workers of the training scripts and the probe"""
    output_dir: str = "runs/recipes"
    """where the runs, the probes' JSONs and recipes.json go"""


def fail(message: str) -> NoReturn:
    print(f"recipes.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def run(cmd: list[str], log: str) -> None:
    """Run a script, its output appended to ``log`` (tail -f it); on failure print the end of the log and stop."""
    print("$", shlex.join(cmd), flush=True)
    with open(log, "a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(log) as f:
            sys.exit(f"failed ({code}), see {log}: {shlex.join(cmd)}\n{f.read()[-3000:]}")


def probe(backbone: str, out: str, seed: int, num_workers: int, random_init: bool = False, flags=()) -> dict:
    """linear_probe.py's JSON for ``backbone`` (run unless ``out`` exists; written whole or not at all)."""
    if not os.path.exists(out):
        cmd = [sys.executable, os.path.join(ROOT, "linear_probe.py"), backbone, "--seed", str(seed)]
        cmd += ["--num-workers", str(num_workers), "--output", out + ".part", *flags]
        run(cmd + (["--random-init"] if random_init else []), os.path.splitext(out)[0] + ".log")
        os.replace(out + ".part", out)
    with open(out) as f:
        return json.load(f)


def pretrain(script: str, flags: list[str], data: list[str], output_dir: str, name: str, seed: int, workers: int):
    """Run ``script`` as runs/<output_dir>/<name> unless its backbone.pt exists; returns the backbone.pt path."""
    run_dir = os.path.join(output_dir, name)
    backbone = os.path.join(run_dir, "backbone.pt")
    if not os.path.exists(backbone):
        os.makedirs(run_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(ROOT, script), *data, *flags, "--seed", str(seed)]
        cmd += ["--num-workers", str(workers), "--output-dir", output_dir, "--run-name", name]
        run(cmd, os.path.join(run_dir, "train.log"))
    return backbone


def arch_label(backbone: str) -> str:
    """The backbone's architecture as a row name: resnet18, or vit_tiny 4x96 (the run's --arch, layers x width)."""
    meta = torch.load(backbone, map_location="cpu", weights_only=True)["backbone"]
    if meta["arch"] != "vit":
        return meta["arch"]
    kw, ckpt = meta["arch_kwargs"], os.path.join(os.path.dirname(backbone), "checkpoint.pt")
    name = torch.load(ckpt, map_location="cpu", weights_only=True)["args"]["arch"]
    return f"{name} {kw['num_layers']}x{kw['hidden_dim']}"


def data_args(args) -> lt_data.DataArgs:
    """The data flags of a benchmark's arguments (RecipeArgs, GapArgs) as lt_data.DataArgs."""
    names = ("dataset", "data_dir", "imbalance_ratio", "image_size", "synthetic_classes", "synthetic_per_class")
    return lt_data.DataArgs(**{name: getattr(args, name) for name in names})


def data_flags(args) -> list[str]:
    """The same data flags for the training scripts (the synthetic set's sizes only for --dataset synthetic)."""
    data = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--image-size", str(args.image_size)]
    if args.dataset == "synthetic":
        data += ["--synthetic-classes", str(args.synthetic_classes)]
        data += ["--synthetic-per-class", str(args.synthetic_per_class)]
    return data + (["--imbalance-ratio", str(args.imbalance_ratio)] if args.imbalance_ratio is not None else [])


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (None with one seed)."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def main(args: RecipeArgs) -> dict:
    unknown = [m for m in args.methods if m not in RECIPES]
    if unknown or not args.methods:
        fail(f"unknown method {unknown[0]!r}; choose from {', '.join(RECIPES)}" if unknown else "give --methods")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 1:
        fail(f"--seeds must be one or more distinct seeds >= 1, got {list(args.seeds)}")
    if args.train_steps is not None and args.train_steps < 1:
        fail(f"--train-steps must be >= 1, got {args.train_steps}")
    if args.knn_k is not None and args.knn_k < 1:
        fail(f"--knn-k must be >= 1, got {args.knn_k}")
    try:  # checks the data before hours of training
        lt_data.build_data(data_args(args))
    except lt_data.DataError as e:
        fail(lt_data.error_line(e))
    data = data_flags(args)
    probe_flags = ["--knn-k", str(args.knn_k)] if args.knn_k is not None else []
    os.makedirs(args.output_dir, exist_ok=True)

    rows = {}
    for seed in args.seeds:
        for method in args.methods:
            script, flags = RECIPES[method]
            flags = [*flags, *(["--train-steps", str(args.train_steps)] if args.train_steps else [])]
            flags += shlex.split(args.extra)
            backbone = pretrain(script, flags, data, args.output_dir, f"{method}_s{seed}", seed, args.num_workers)
            arch = arch_label(backbone)
            row = rows.setdefault(method, {"arch": arch, "trained": {}, "random init": {}})
            slug = re.sub(r"[^A-Za-z0-9]+", "_", arch)
            outs = {  # one random-init probe per architecture and seed, shared by the methods that use it
                "trained": os.path.join(args.output_dir, f"{method}_s{seed}", "probe.json"),
                "random init": os.path.join(args.output_dir, f"random_{slug}_s{seed}.json"),
            }
            for which, out in outs.items():
                res = probe(backbone, out, seed - 1, args.num_workers, which == "random init", probe_flags)
                row[which][str(seed)] = {p: res[p]["top1"] for p in ("linear", "knn")}
    for row in rows.values():
        row["summary"] = {
            which: {p: mean_std([r[p] for r in row[which].values()]) for p in ("linear", "knn")}
            for which in ("trained", "random init")
        }
        row["above_random"] = {
            p: row["summary"]["trained"][p]["mean"] - row["summary"]["random init"][p]["mean"]
            for p in ("linear", "knn")
        }
        row["meets_bar"] = all(row["above_random"][p] >= BAR[p] for p in BAR)
    result = {"args": asdict(args), "bar": BAR, "rows": rows}
    print(markdown(rows))
    with open(os.path.join(args.output_dir, "recipes.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def markdown(rows: dict) -> str:
    lines = [
        "| method | backbone | linear top-1 (seeds) | mean | random init | vs random | kNN top-1 (seeds) | mean "
        "| random init | vs random | +3 linear and +5 kNN |",
        "|---" * 11 + "|",
    ]
    for method, row in rows.items():
        cells = [method, row["arch"]]
        for p in ("linear", "knn"):
            cells += [
                " / ".join(f"{r[p]:.2f}" for r in row["trained"].values()),
                f"{row['summary']['trained'][p]['mean']:.2f}",
                f"{row['summary']['random init'][p]['mean']:.2f}",
                f"{row['above_random'][p]:+.2f}",
            ]
        cells.append("yes" if row["meets_bar"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(RecipeArgs))
