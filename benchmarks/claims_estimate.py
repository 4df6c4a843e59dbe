"""How long gap_table.py --preset gpu takes on one GPU, estimated where no GPU is: per claim, in minutes.

Measured here, for every row of the preset exactly as gap_table.py launches it (each script's parse_args on the
row's flags, its Model and its train_transform on the data set):
  GFLOP/img   the backbone's forward FLOPs of every view one training image gets (torch.utils.flop_counter), times
              the passes each view costs: 3 for a view trained through (forward + backward), 1 for a teacher's
              forward; rwSAM twice SimSiam's (SAM's ascent and descent passes); heads left out (their matrix
              products are about 1.5% of the ResNet-18's forward at 28 px: 14 of 913 MFLOP for SimSiam's);
  ms/img/core the script's train_transform on one core (one thread, --images images, median of 3 passes).
Assumed, each a flag: the GPU's achieved rate (--achieved-tflops; default 37, our earlier guess of 3,000 ResNet-50
forward-backward passes per second at 224 px in bf16 on an H100, docs/simsiam_rwsam.md), the loader workers that
feed it (--workers), and what a process costs besides (--startup-s: Python, CUDA, data; --probe-s: a probe's
linear head, kNN and few-shot fits on the GPU). A run takes max(GPU time, pipeline time) plus its kNN monitor (one
forward of 15,000 images an epoch) and a start; a probe its extraction (70,000 images in domain, 5,000 out) and
--probe-s. With --jobs J the GPU work adds up and the rest overlaps J ways: wall = max(GPU total, all / J).

    python benchmarks/claims_estimate.py                        # Fashion-MNIST-LT, the preset's 28 px
    python benchmarks/claims_estimate.py --achieved-tflops 80   # with gpu_check.sh's measured rate instead
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
import gap_table  # noqa: E402  (the preset, its rows and claims)
from recipes import RECIPES  # noqa: E402
from step_cost import load_script  # noqa: E402  (a training script as a module)

import lt_data  # noqa: E402

TEACHER = {"msn": 1, "pmsn": 1, "excb": 2}  # views that also get a teacher forward (MSN: the target; ExCB: 2 globals)
SAM = {"rwsam": 2}  # SAM: every view's forward and backward twice


@lt_data.help_from_docstrings
@dataclass
class EstimateArgs:
    """Minutes of gap_table.py --preset gpu on one GPU, per claim, from measured FLOPs and pipeline costs."""

    dataset: lt_data.DatasetName = "fashion-mnist"
    """the data set (the preset's: Fashion-MNIST; synthetic for a quick check)"""
    data_dir: str = lt_data.FASHION_MNIST_DEBIAN
    """Fashion-MNIST's IDX files"""
    achieved_tflops: float = 37.0
    """the GPU's achieved dense rate on these backbones, TFLOP/s (assumed; gpu_check.sh measures it)"""
    workers: int = 14
    """data-loading workers feeding the GPU (each one core)"""
    startup_s: float = 20.0
    """seconds a training process costs besides its steps (assumed)"""
    probe_s: float = 15.0
    """seconds a probe costs besides its feature extraction (assumed)"""
    jobs: int = 2
    """gap_table.py --jobs"""
    seeds: int = 3
    """seeds per row"""
    images: int = 300
    """images timed through each train_transform"""


def measure(row: str, args: EstimateArgs) -> dict:
    """GFLOP per training image, ms per image per core, epochs and the backbone's forward GFLOP at full size."""
    preset = gap_table.PRESETS["gpu"]
    method = preset.rows[row].method
    script, recipe = RECIPES[method]
    recipe = [preset.recipe if i and recipe[i - 1] == "--recipe" else f for i, f in enumerate(recipe)]
    data_flags = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--image-size", "28"]
    module = load_script(script)
    run = module.parse_args([*recipe, *preset.rows[row].flags, *data_flags, "--imbalance-ratio", "100"])
    data = lt_data.build_data(run)
    model = module.Model(run, data)
    backbone = model.get_submodule(model.export_prefix.rstrip(".")).eval()
    transform = module.train_transform(run, data)
    images = [data.train_full.image(i) for i in range(args.images)]
    views = transform(images[0])
    views = list(views) if isinstance(views, (list, tuple)) else [views]

    def gflop(x: torch.Tensor) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            backbone(x.unsqueeze(0))
        return counter.get_total_flops() / 1e9

    per_view = [gflop(v) for v in views]
    passes = [3 * SAM.get(method, 1)] * len(views)
    for i in range(TEACHER.get(method, 0)):  # MSN's view 0 is the target alone; ExCB's globals also the teacher's
        passes[i] = 1 if method in ("msn", "pmsn") and i == 0 else passes[i] + 1
    torch.set_num_threads(1)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for img in images:
            transform(img)
        times.append((time.perf_counter() - start) / len(images))
    return {
        "gflop_per_image": sum(f * p for f, p in zip(per_view, passes)),
        "ms_per_image_core": 1000 * statistics.median(times),
        "epochs": run.epochs,
        "forward_gflop": gflop(torch.zeros(views[0].shape)),
        "lt_images": len(data.lt_indices),
        "views": len(views),
    }


RANGES = dict(achieved_tflops="(0, inf)", workers="[1, inf)", startup_s="[0, inf)", probe_s="[0, inf)")
RANGES |= dict(jobs="[1, inf)", seeds="[1, inf)", images="[1, inf)")


def main(args: EstimateArgs) -> None:
    try:
        lt_data.check_ranges(args, RANGES)
        lt_data.build_data(lt_data.DataArgs(dataset=args.dataset, data_dir=args.data_dir, image_size=28))
    except lt_data.DataError as e:
        print(f"claims_estimate.py: error: {lt_data.error_line(e)}", file=sys.stderr)
        sys.exit(2)
    preset = gap_table.PRESETS["gpu"]
    rate = args.achieved_tflops * 1e3  # GFLOP/s
    cost, lines = {}, []
    for row, spec in preset.rows.items():
        m = measure(row, args)
        images = m["epochs"] * m["lt_images"]
        gpu = images * m["gflop_per_image"] / rate + m["epochs"] * 15_000 * m["forward_gflop"] / rate
        pipeline = images * m["ms_per_image_core"] / 1000 / args.workers
        probes = [(70_000 + 5_000) * m["forward_gflop"] / rate, 2 * args.probe_s]  # GPU, other
        run_gpu = max(gpu, pipeline)  # a pipeline-bound run holds the GPU that long
        cost[row] = (len(spec.sets) * args.seeds, run_gpu + probes[0], args.startup_s + probes[1])
        lines.append(
            f"| {row} | {m['views']} | {m['gflop_per_image']:.2f} | {m['ms_per_image_core']:.2f} | {m['epochs']} | "
            f"{gpu:.0f} | {pipeline:.0f} | {run_gpu + probes[0] + args.startup_s + probes[1]:.0f} |"
        )
    print("| row | views | GFLOP/img (passes) | ms/img/core | epochs | GPU s | pipeline s | run + probes s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    floor = 4 * args.probe_s  # random-init and raw-pixel probes, in and out of domain: 4 a seed, no training
    done = set()
    print(f"\n| claim | runs | GPU min | wall min (--jobs {args.jobs}) |\n|---|---|---|---|")
    for claim in gap_table.CLAIMS:
        rows = [r for r in dict.fromkeys(claim.rows) if r not in done]
        done |= set(rows)
        n = sum(cost[r][0] for r in rows)
        gpu = sum(cost[r][0] * cost[r][1] for r in rows)
        other = sum(cost[r][0] * cost[r][2] for r in rows) + (args.seeds * floor if claim is gap_table.CLAIMS[0] else 0)
        print(f"| {claim.name} | {n} | {gpu / 60:.1f} | {max(gpu, (gpu + other) / args.jobs) / 60:.1f} |")


if __name__ == "__main__":
    main(tyro.cli(EstimateArgs))
