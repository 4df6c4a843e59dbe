"""Cost of ExCB's k-means initialisation: the images/s of its embedding pass, as excb.py's own closing line reports
it, for each image size x DataLoader workers x processes. Each measurement is one short ``excb.py --max-steps 1``
run on synthetic data (torchrun for 2+ processes: gloo on CPU, NCCL on GPUs), the CPU's cores split evenly
between the processes (OMP_NUM_THREADS; --threads to choose). Prints a markdown table; asserts nothing.

    python benchmarks/excb_init_cost.py                                 # 32 and 64 px, 0/2 workers, 1/2 processes
    python benchmarks/excb_init_cost.py --sizes 224 --arch resnet50 --samples 512 --processes 1

The init's cost is one forward pass of the teacher over --kmeans-samples images divided between the processes:
--kmeans-samples / (processes x the rate of one process) seconds (docs/excb.md).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class CostArgs:
    sizes: tuple[int, ...] = (32, 64)
    """image sizes (px) of the synthetic images"""
    workers: tuple[int, ...] = (0, 2)
    """--num-workers values (DataLoader processes per training process)"""
    processes: tuple[int, ...] = (1, 2)
    """training processes (torchrun --nproc_per_node for 2 and more)"""
    samples: int = 2048
    """--kmeans-samples of each run (the synthetic set has exactly this many images)"""
    arch: str = "resnet18"
    """--arch of each run"""
    amp: str = "auto"
    """--amp of each run"""
    threads: Optional[int] = None
    """torch threads per process (OMP_NUM_THREADS); default: the cores divided by the processes"""


def measure(args: CostArgs, size: int, workers: int, processes: int, out_dir: str) -> str:
    """The img/s of the embedding pass of one run (a string, as printed), or why the run failed."""
    flags = ["--dataset", "synthetic", "--synthetic-classes", "4", "--synthetic-per-class", str(-(-args.samples // 4))]
    flags += ["--imbalance-ratio", "1", "--image-size", str(size), "--arch", args.arch, "--amp", args.amp]
    flags += ["--num-clusters", "64", "--num-local-crops", "2", "--kmeans-samples", str(args.samples)]
    flags += ["--batch-size", "8", "--max-steps", "1", "--eval-every", "0", "--num-workers", str(workers)]
    flags += ["--output-dir", out_dir, "--run-name", f"s{size}_w{workers}_p{processes}"]
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([*launch, os.path.join(ROOT, "excb.py"), *flags], env=env, capture_output=True, text=True)
    found = re.search(r"images embedded at (\d+) img/s", proc.stdout)
    if proc.returncode or not found:
        return f"failed ({proc.returncode}): {(proc.stderr.strip().splitlines() or [''])[-1][:80]}"
    return found.group(1)


def main() -> None:
    args = tyro.cli(CostArgs, description=__doc__.split("\n\n")[0])
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    threads = f"{args.threads} torch threads per process" if args.threads else "the cores split between processes"
    print(f"{args.arch}, {args.samples} images per run, --amp {args.amp}, {threads}; {os.cpu_count()} x {cpu}\n")
    print("| image size | --num-workers | processes | embedding img/s (all processes) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out_dir:
        for size in args.sizes:
            for workers in args.workers:
                for processes in args.processes:
                    rate = measure(args, size, workers, processes, out_dir)
                    print(f"| {size} px | {workers} | {processes} | {rate} |", flush=True)


if __name__ == "__main__":
    main()
