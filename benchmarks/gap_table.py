"""Liu et al.'s (ICLR 2022) core measurement: how much does pre-training on a long-tailed set lose against
pre-training on its balanced twin of the same size?

For every method: pre-train on the long-tailed set and on the balanced twin (same size, uniform class
counts, one lt_data call), probe both backbones with linear_probe.py on the balanced training set, and
report the relative gap (A_balanced - A_long-tailed) / A_balanced with overall and many / medium / few
accuracy, as a markdown table and JSON. Runs are ordinary runs of the scripts, so an interrupted table
resumes where it stopped.

    python benchmarks/gap_table.py                                   # CPU-sized defaults on synthetic data
    python benchmarks/gap_table.py --methods supervised --extra="--max-steps 20"   # a smoke run

Paper scale (a GPU user's command; CIFAR-10-LT r=100, ResNet-18, 800 epochs):

    python benchmarks/gap_table.py --dataset cifar10 --data-dir data --imbalance-ratio 100 --image-size 32 \\
        --paper-scale
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lt_data  # noqa: E402  (the data sets the scripts accept)

# Per method: its script, the flags of the CPU-sized run (small heads, 12 epochs at batch 64) and of the
# paper-scale run (the papers' epochs and batches; a GPU job).
SIMSIAM_CPU = ["--epochs", "12", "--batch-size", "64", "--proj-dim", "512", "--pred-dim", "128"]
METHODS = {
    "supervised": ("supervised_baseline.py", ["--epochs", "12", "--batch-size", "64"], ["--epochs", "200"]),
    "simsiam": ("simsiam_rwsam.py", ["--sam", "none", *SIMSIAM_CPU],
                ["--sam", "none", "--epochs", "800", "--batch-size", "512"]),
    "rwsam": ("simsiam_rwsam.py", ["--sam", "asam", "--reweight", "kde", "--reweight-warmup", "4",
                                   "--reweight-every", "4", *SIMSIAM_CPU],
              ["--sam", "asam", "--reweight", "kde", "--epochs", "800", "--batch-size", "512"]),
    "msn": ("msn_prior.py", ["--prior", "power-law", "--arch", "vit_tiny", "--vit-layers", "4", "--vit-dim", "96",
                             "--vit-heads", "3", "--num-focal", "4", "--head-hidden", "256", "--head-out", "64",
                             "--num-prototypes", "64", "--epochs", "12", "--warmup-epochs", "2", "--batch-size", "64",
                             "--lr", "2e-3", "--ema-momentum", "0.99"],
            ["--prior", "power-law", "--epochs", "800", "--batch-size", "256"]),
    "excb": ("excb.py", ["--num-clusters", "64", "--hidden-dim", "512", "--out-dim", "64", "--num-local-crops", "2",
                         "--epochs", "12", "--warmup-epochs", "2", "--batch-size", "64"],
             ["--epochs", "800", "--batch-size", "256"]),
}


@dataclass
class GapArgs:
    """Balanced-vs-long-tailed pre-training gap for every method."""

    methods: tuple[str, ...] = tuple(m for m, (script, _, _) in METHODS.items()
                                     if os.path.exists(os.path.join(ROOT, script)))
    """methods to run (default: every method whose script is present)"""
    dataset: lt_data.DatasetName = "synthetic"
    """data set of both pre-training sets and of the probe"""
    data_dir: str = "data"
    """--data-dir of the scripts"""
    imbalance_ratio: float = 100.0
    """head/tail ratio of the long-tailed set"""
    image_size: int = 16
    """input resolution (16 keeps the CPU run short; 32 for CIFAR)"""
    synthetic_classes: int = 10
    """synthetic: classes"""
    synthetic_per_class: int = 500
    """synthetic: images per class before subsampling"""
    paper_scale: bool = False
    """use each method's paper-scale flags (hundreds of epochs: a GPU job) instead of the CPU-sized ones"""
    extra: str = ""
    """extra flags passed to every training script, e.g. --extra="--amp none" """
    seed: int = 1
    """training seed"""
    num_workers: int = 2
    """data-loading workers"""
    output_dir: str = "runs/gap"
    """where the runs and gap_table.json go"""


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")


def main(args: GapArgs) -> dict:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"gap_table.py: error: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    data = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--imbalance-ratio", str(args.imbalance_ratio),
            "--image-size", str(args.image_size), "--synthetic-classes", str(args.synthetic_classes),
            "--synthetic-per-class", str(args.synthetic_per_class)]
    results = {}
    for method in args.methods:
        script, cpu_flags, paper_flags = METHODS[method]
        results[method] = {}
        for kind in ("long-tailed", "balanced"):
            name = f"{method}_{'lt' if kind == 'long-tailed' else 'twin'}"
            flags = [*data, *(paper_flags if args.paper_scale else cpu_flags), *shlex.split(args.extra), "--seed", str(args.seed),
                     "--num-workers", str(args.num_workers), "--output-dir", args.output_dir, "--run-name", name]
            run([sys.executable, os.path.join(ROOT, script), *flags, *(["--balanced-twin"] if kind == "balanced" else [])])
            out = os.path.join(args.output_dir, name, "probe.json")
            run([sys.executable, os.path.join(ROOT, "linear_probe.py"), os.path.join(args.output_dir, name, "backbone.pt"),
                 "--num-workers", str(args.num_workers), "--output", out])
            with open(out) as f:
                results[method][kind] = json.load(f)["linear"]
    table = {}
    for method, r in results.items():
        bal, lt = r["balanced"], r["long-tailed"]
        table[method] = {"balanced": {k: bal[k] for k in ("top1", "many", "medium", "few")},
                         "long-tailed": {k: lt[k] for k in ("top1", "many", "medium", "few")},
                         "relative_gap": (bal["top1"] - lt["top1"]) / bal["top1"]}
    print(markdown(table))
    with open(os.path.join(args.output_dir, "gap_table.json"), "w") as f:
        json.dump({"args": vars(args), "table": table}, f, indent=1)
    return table


def markdown(table: dict) -> str:
    lines = ["| method | pre-training set | top-1 | many | medium | few | relative gap |", "|---|---|---|---|---|---|---|"]
    for method, r in table.items():
        for kind in ("balanced", "long-tailed"):
            a = r[kind]
            gap = f"{100 * r['relative_gap']:.1f}%" if kind == "long-tailed" else ""
            lines.append(f"| {method} | {kind} | {a['top1']:.2f} | {a['many']:.2f} | {a['medium']:.2f} | "
                         f"{a['few']:.2f} | {gap} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(GapArgs))
