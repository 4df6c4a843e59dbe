"""The GPU check: every training script for a few dozen steps at paper resolution in bf16, fp16 and --compile.

Runs each training script as a user would (its own command line, synthetic images, no downloads) once per mode:
  bf16     --amp bf16
  fp16     --amp fp16 (with its GradScaler)
  compile  --amp bf16 --compile
and prints, per script and mode: images/s of the last log interval (the full loop, data pipeline included), peak
GPU memory (from the script's progress line), seconds to the first progress line (start-up plus the first step;
compile minus bf16 is the first-step compile time), and then benchmarks/step_cost.py's step / limit at the same
size in bf16 (the step against the forward and backward passes the method needs). Exits non-zero on the first
failure, with the failing command and its output. benchmarks/gpu_check.sh runs it; --device cpu is the smoke mode
the tests run (16 px, batch 8, 3 steps, no --compile: a check that it runs, not a measurement).

    bash benchmarks/gpu_check.sh                   # on a CUDA machine: 224 px, batch 64, 30 steps per run
    bash benchmarks/gpu_check.sh --device cpu      # smoke mode
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "supervised": ("supervised_baseline.py", []),
    "simsiam": ("simsiam_rwsam.py", []),
    "msn": ("msn_prior.py", []),
    "excb": ("excb.py", ["--no-kmeans-init"]),
}
MODES = {"bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"], "compile": ["--amp", "bf16", "--compile"]}
PROGRESS = re.compile(r"step (\d+)/\d+ .*\| ([0-9.]+) img/s(?: \| ([0-9.]+) GiB)?")


@dataclass
class GpuCheckArgs:
    """Each training script for a few dozen steps per precision mode; images/s, memory, compile time, step/limit."""

    device: Literal["cuda", "cpu"] = "cuda"
    """cuda: the check at --image-size; cpu: the smoke mode (16 px, batch 8, 3 steps, bf16 and fp16 only)"""
    methods: tuple[Literal["supervised", "simsiam", "msn", "excb"], ...] = ("supervised", "simsiam", "msn", "excb")
    """training scripts to run"""
    modes: tuple[Literal["bf16", "fp16", "compile"], ...] = ("bf16", "fp16", "compile")
    """precision modes per script"""
    image_size: Optional[int] = None
    """image size (default: 224 on cuda, 16 on cpu)"""
    batch_size: Optional[int] = None
    """batch size per process (default: 64 on cuda, 8 on cpu)"""
    steps: Optional[int] = None
    """steps per run (default: 30 on cuda, 3 on cpu); images/s is that of the last log interval (the second half)"""
    num_workers: Optional[int] = None
    """DataLoader workers per run (default: 8 on cuda, 0 on cpu)"""
    step_cost: bool = True
    """also run benchmarks/step_cost.py (step / limit) in bf16 at the same size"""


def run(cmd: list[str], env: dict) -> tuple[str, float]:
    """Run a command; return its output and the seconds to its first progress line. Raises SystemExit on failure."""
    start, first, lines = time.perf_counter(), None, []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    for line in proc.stdout:
        lines.append(line)
        if first is None and PROGRESS.search(line):
            first = time.perf_counter() - start
    if proc.wait() != 0:
        print("".join(lines[-40:]), end="", file=sys.stderr)
        raise SystemExit(f"gpu_check: FAILED ({proc.returncode}): {' '.join(cmd)}")
    return "".join(lines), first if first is not None else float("nan")


def main(args: GpuCheckArgs) -> list[dict]:
    cuda = args.device == "cuda"
    size = args.image_size or (224 if cuda else 16)
    batch = args.batch_size or (64 if cuda else 8)
    steps = args.steps or (30 if cuda else 3)
    workers = args.num_workers if args.num_workers is not None else (8 if cuda else 0)
    modes = args.modes if cuda else tuple(m for m in args.modes if m != "compile")
    env = {**os.environ, **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})}
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible; use --device cpu for the smoke mode")
        print(
            f"gpu_check on {torch.cuda.get_device_name()}: {size} px, batch {batch}, {steps} steps, {workers} workers",
            flush=True,
        )
    per_class = -(-batch * steps // 4) + batch  # enough synthetic images for --steps steps at r = 1 (4 classes)
    data = [
        "--dataset",
        "synthetic",
        "--synthetic-classes",
        "4",
        "--synthetic-per-class",
        str(per_class),
        "--synthetic-test-per-class",
        "2",
        "--imbalance-ratio",
        "1",
        "--image-size",
        str(size),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for method in args.methods:
            script, flags = SCRIPTS[method]
            for mode in modes:
                cmd = [
                    sys.executable,
                    os.path.join(ROOT, script),
                    *data,
                    *flags,
                    *MODES[mode],
                    "--batch-size",
                    str(batch),
                    "--max-steps",
                    str(steps),
                    "--log-every",
                    str(max(1, steps // 2)),
                    "--eval-every",
                    "0",
                    "--num-workers",
                    str(workers),
                    "--output-dir",
                    out,
                    "--run-name",
                    f"{method}_{mode}",
                ]
                text, first = run(cmd, env)
                progress = PROGRESS.findall(text)
                step, images_per_s, memory = progress[-1]
                rows.append(
                    {
                        "method": method,
                        "mode": mode,
                        "images_per_s": float(images_per_s),
                        "peak_gib": float(memory) if memory else None,
                        "first_progress_s": first,
                        "steps": int(step),
                    }
                )
                print(
                    f"{method} {mode}: {float(images_per_s):.0f} img/s, "
                    f"{memory + ' GiB' if memory else 'no GPU memory'}, first progress line after {first:.1f} s",
                    flush=True,
                )
    print(
        "\n| script | mode | img/s (loop) | peak GPU memory (GiB) | first progress line (s) | compile time (s) |\n"
        "|---|---|---|---|---|---|"
    )
    first_bf16 = {r["method"]: r["first_progress_s"] for r in rows if r["mode"] == "bf16"}
    for r in rows:
        compile_s = (
            r["first_progress_s"] - first_bf16[r["method"]]
            if r["mode"] == "compile" and r["method"] in first_bf16
            else None
        )
        print(
            f"| {r['method']} | {r['mode']} | {r['images_per_s']:.0f} | "
            f"{r['peak_gib'] if r['peak_gib'] is not None else '-'} | {r['first_progress_s']:.1f} | "
            f"{'' if compile_s is None else f'{compile_s:.1f}'} |"
        )
    if args.step_cost:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "step_cost.py"),
            "--methods",
            *args.methods,
            "--amp",
            "bf16",
            "--batch-size",
            str(batch),
            "--image-size",
            str(size),
            "--repeats",
            "3" if cuda else "1",
            "--loop-steps",
            "4" if cuda else "2",
            "--num-workers",
            str(workers),
        ]
        text, _ = run(cmd, env)
        print("\nstep / limit (benchmarks/step_cost.py, bf16):\n" + text[text.index("| method") :], end="")
    print("gpu_check: all runs finished")
    return rows


if __name__ == "__main__":
    main(tyro.cli(GpuCheckArgs, description=__doc__.split("\n\n")[0]))
