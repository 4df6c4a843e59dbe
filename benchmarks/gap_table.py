"""Liu et al.'s (ICLR 2022) core measurement: how much does pre-training on a long-tailed set lose against
pre-training on its balanced twin of the same size, and does supervised pre-training lose more than SSL?

For every method in --methods and every seed in --seeds: pre-train on the long-tailed set and on the balanced
twin (same size, uniform class counts, one lt_data call), probe both backbones with linear_probe.py on the
balanced training set (probe --seed = training seed - 1), and probe each architecture at random init (the
floor: linear_probe.py --random-init on the runs' own backbone.pt). Reported: mean ± std over seeds of linear
and kNN top-1 and linear many / medium / few, the relative gap (A_balanced - A_long-tailed) / A_balanced of each
seed with its mean ± std, whether supervised's mean gap exceeds each SSL method's, a markdown table,
<output-dir>/gap_table.json (every per-seed number) and <output-dir>/gap_figure.png (per-class linear accuracy
against the long-tailed class count; needs matplotlib: pip install -r benchmarks/requirements.txt).

The whole table (6 methods x 2 pre-training sets x 3 seeds: 36 runs, 42 probes) uses the CPU recipes of
docs/cpu_recipes.md shortened to 3 epochs of Fashion-MNIST-LT (696 steps) for SimSiam and rwSAM and 2 epochs
(464) for the others, the 3:2 ratio of the recipes (1,800 and 1,200 steps). It took 4.0 core-hours on our 2-core
AMD EPYC (partly beside other jobs; docs/benchmarks.md), so run one worker per core, each on its own seeds
(workers must not share a seed), then gather:

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/gap_table.py --seeds 1 3 --num-workers 0 &
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/gap_table.py --seeds 2 --num-workers 0 &
    wait; python benchmarks/gap_table.py

It resumes: rerun the same command after an interruption. A run whose backbone.pt exists is not retrained, a
probe whose JSON exists is not re-run (an interrupted run resumes from its checkpoint); delete a run's folder to
redo it, e.g. after changing its recipe in benchmarks/recipes.py.

Paper scale (a GPU user's command; CIFAR-10-LT r=100, each method's paper epochs and batch):

    python benchmarks/gap_table.py --dataset cifar10 --data-dir data --image-size 32 --paper-scale
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import NoReturn, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from recipes import RECIPES, arch_label, data_args, data_flags, mean_std, probe  # noqa: E402  (the recipes, helpers)
from recipes import pretrain as pretrain_run  # noqa: E402

import lt_data  # noqa: E402  (the data sets the scripts accept)

# The CPU runs are the recipes of benchmarks/recipes.py on shorter budgets (steps: 3 epochs of Fashion-MNIST-LT at
# batch 64 for SimSiam and rwSAM, 2 for the others, the 3:2 ratio of the recipes); the paper-scale flags are a GPU
# user's (each method's paper epochs and batch).
GAP_STEPS = {"supervised": 464, "simsiam": 696, "rwsam": 696, "msn": 464, "pmsn": 464, "excb": 464}
PAPER = {
    "supervised": ["--epochs", "200"],
    "simsiam": ["--sam", "none", "--epochs", "800", "--batch-size", "512"],
    "rwsam": ["--sam", "asam", "--reweight", "kde", "--epochs", "800", "--batch-size", "512"],
    "msn": ["--epochs", "800", "--batch-size", "256"],
    "pmsn": ["--prior", "power-law", "--epochs", "800", "--batch-size", "256"],
    "excb": ["--epochs", "800", "--batch-size", "256"],
}
SETS = {"long-tailed": "lt", "balanced": "twin"}  # pre-training set -> run-name suffix
# (name in the table and JSON, probe, key): linear and kNN top-1, linear many / medium / few
METRICS = [
    ("linear top-1", "linear", "top1"),
    ("kNN top-1", "knn", "top1"),
    ("many", "linear", "many"),
    ("medium", "linear", "medium"),
    ("few", "linear", "few"),
]


@dataclass
class GapArgs:
    """Balanced-twin vs long-tailed pre-training gap of every method, over seeds."""

    methods: tuple[str, ...] = tuple(RECIPES)
    """methods to run (a random-init row per architecture is added)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """training seeds (>= 1; each run's probe uses --seed = training seed - 1)"""
    dataset: lt_data.DatasetName = "fashion-mnist"
    """data set of both pre-training sets and of the probe"""
    data_dir: str = lt_data.FASHION_MNIST_DEBIAN
    """--data-dir of the scripts"""
    imbalance_ratio: float = 100.0
    """head/tail ratio of the long-tailed set"""
    image_size: int = 16
    """input resolution (16 keeps the CPU run short; 32 for CIFAR)"""
    synthetic_classes: int = 10
    """synthetic: classes"""
    synthetic_per_class: int = 500
    """synthetic: images per class before subsampling"""
    train_steps: Optional[int] = None
    """replaces every CPU run's --train-steps (the recipes': 696 for SimSiam and rwSAM, 464 for the others)"""
    paper_scale: bool = False
    """use each method's paper-scale flags (hundreds of epochs: a GPU job) instead of the CPU recipes"""
    extra: str = ""
    """extra flags passed to every training script (after the recipe's), e.g. --extra="--amp none" """
    num_workers: int = 2
    """data-loading workers of the training scripts and the probe"""
    output_dir: str = "runs/gap"
    """where the runs, the probes' JSONs, gap_table.json and gap_figure.png go"""


def fail(message: str) -> NoReturn:
    print(f"gap_table.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def recipe(args: GapArgs, method: str) -> tuple[str, list[str]]:
    script, flags = RECIPES[method]
    if args.paper_scale:
        return script, PAPER[method]
    return script, [*flags, "--train-steps", str(args.train_steps or GAP_STEPS[method])]


def train_and_probe(args: GapArgs, method: str, pretrain: str, seed: int) -> tuple[str, dict]:
    """Pre-train ``method`` on ``pretrain`` (unless its backbone.pt exists) and probe it: (backbone.pt, probe JSON)."""
    script, flags = recipe(args, method)
    flags = [*flags, *shlex.split(args.extra), *(["--balanced-twin"] if pretrain == "balanced" else [])]
    data = data_flags(args)
    name = f"{method}_{SETS[pretrain]}_s{seed}"
    backbone = pretrain_run(script, flags, data, args.output_dir, name, seed, args.num_workers)
    return backbone, probe(backbone, os.path.join(args.output_dir, name, "probe.json"), seed - 1, args.num_workers)


def summarise(per_seed: dict[str, dict]) -> dict:
    """Mean ± std over seeds of every METRICS entry, from {seed: probe JSON's {"linear": ..., "knn": ...}}."""
    return {name: mean_std([r[which][key] for r in per_seed.values()]) for name, which, key in METRICS}


def relative_gaps(runs: dict, which: str) -> dict:
    """(A_balanced - A_long-tailed) / A_balanced of each seed (top-1 of the ``which`` probe), with mean ± std."""
    bal, lt = runs["balanced"], runs["long-tailed"]
    gaps = {s: (bal[s][which]["top1"] - lt[s][which]["top1"]) / bal[s][which]["top1"] for s in lt}
    return {"per_seed": gaps, **mean_std(list(gaps.values()))}


def main(args: GapArgs) -> dict:
    unknown = [m for m in args.methods if m not in RECIPES]
    if unknown or not args.methods:
        fail(f"unknown method {unknown[0]!r}; choose from {', '.join(RECIPES)}" if unknown else "give --methods")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 1:
        fail(f"--seeds must be one or more distinct seeds >= 1, got {list(args.seeds)}")
    if args.train_steps is not None and args.train_steps < 1:
        fail(f"--train-steps must be >= 1, got {args.train_steps}")
    if args.num_workers < 0:
        fail(f"--num-workers must be >= 0, got {args.num_workers}")
    try:  # the long-tailed class counts (the figure's x axis); also checks the data before hours of training
        counts = lt_data.build_data(data_args(args)).class_counts
    except lt_data.DataError as e:
        fail(lt_data.error_line(e))
    os.makedirs(args.output_dir, exist_ok=True)

    table, random_runs = {}, {}  # random_runs: architecture -> a long-tailed backbone.pt of each seed
    for seed in args.seeds:
        for method in args.methods:
            runs = table.setdefault(method, {"runs": {pretrain: {} for pretrain in SETS}})["runs"]
            for pretrain in SETS:
                backbone, res = train_and_probe(args, method, pretrain, seed)
                runs[pretrain][str(seed)] = {p: res[p] for p in ("linear", "knn")}
                if pretrain == "long-tailed":
                    table[method]["arch"] = arch_label(backbone, recipe(args, method)[1])
                    random_runs.setdefault(table[method]["arch"], {}).setdefault(seed, backbone)
    for arch, backbones in random_runs.items():
        slug = re.sub(r"[^A-Za-z0-9]+", "_", arch)
        runs = {
            str(s): probe(b, os.path.join(args.output_dir, f"random_{slug}_s{s}.json"), s - 1, args.num_workers, True)
            for s, b in backbones.items()
        }
        table[f"random ({arch})"] = {
            "arch": arch,
            "runs": {"random init": {s: {p: r[p] for p in ("linear", "knn")} for s, r in runs.items()}},
        }
    for row in table.values():
        row["summary"] = {pretrain: summarise(per_seed) for pretrain, per_seed in row["runs"].items()}
        if "balanced" in row["runs"]:
            row["relative_gap"] = {p: relative_gaps(row["runs"], p) for p in ("linear", "knn")}

    result = {"args": asdict(args), "long_tailed_class_counts": counts, "table": table, "claim": claim(table)}
    print(markdown(table))
    print(result["claim"])
    with open(os.path.join(args.output_dir, "gap_table.json"), "w") as f:
        json.dump(result, f, indent=1)
    figure(table, counts, os.path.join(args.output_dir, "gap_figure.png"))
    return result


def pm(s: dict, scale: float = 1.0, unit: str = "") -> str:
    """mean ± std (the mean alone with one seed); percentages (unit "%") with one decimal."""
    f = lambda v: f"{scale * v:.{1 if unit else 2}f}"  # noqa: E731
    return f(s["mean"]) + ("" if s["std"] is None else f" ± {f(s['std'])}") + unit


def markdown(table: dict) -> str:
    names = [name for name, _, _ in METRICS]
    lines = [
        f"| method | pre-training set | {' | '.join(names)} | relative gap (linear) | relative gap (kNN) |",
        "|---" * (len(names) + 4) + "|",
    ]
    for method, row in table.items():
        for pretrain, summary in row["summary"].items():
            gap = row.get("relative_gap") if pretrain == "long-tailed" else None
            gaps = [pm(gap[p], 100, "%") for p in ("linear", "knn")] if gap else ["", ""]
            cells = [pm(summary[n]) for n in names] + gaps
            lines.append(f"| {method} | {pretrain} | {' | '.join(cells)} |")
    return "\n".join(lines)


def claim(table: dict) -> str:
    """The paper's claim, supervised loses more to the long tail than SSL, checked on the mean linear gaps."""
    ssl = [m for m, row in table.items() if "relative_gap" in row and m != "supervised"]
    if "supervised" not in table or not ssl:
        return "supervised vs SSL: not checked (needs supervised and at least one SSL method in --methods)"
    sup = table["supervised"]["relative_gap"]["linear"]
    parts = [
        f"{'exceeds' if sup['mean'] > g['mean'] else 'does not exceed'} {m}'s {pm(g, 100, '%')}"
        for m, g in ((m, table[m]["relative_gap"]["linear"]) for m in ssl)
    ]
    return (
        f"supervised's mean relative gap (linear top-1, mean ± std over seeds), {pm(sup, 100, '%')}, {', '.join(parts)}"
    )


def figure(table: dict, counts: list[int], path: str) -> None:
    """One panel per method: per-class linear accuracy (mean over seeds) against the long-tailed class count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figure skipped: matplotlib is not installed (pip install -r benchmarks/requirements.txt)")
        return
    methods = [m for m, row in table.items() if "balanced" in row["runs"]]
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), sharey=True, squeeze=False)
    order = sorted(range(len(counts)), key=lambda c: counts[c])
    for ax, method in zip(axes.flat, methods):
        for pretrain, label in (("balanced", "balanced twin"), ("long-tailed", "long-tailed")):
            per_seed = [r["linear"]["per_class"] for r in table[method]["runs"][pretrain].values()]
            acc = [statistics.mean(p[c] for p in per_seed) for c in order]
            ax.plot([counts[c] for c in order], acc, "o-", label=f"{label} pre-training")
        ax.set(
            xscale="log",
            title=f"{method}: relative gap {pm(table[method]['relative_gap']['linear'], 100, '%')}",
            xlabel="training images of the class in the long-tailed set",
        )
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("per-class linear top-1 (%)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(GapArgs))
