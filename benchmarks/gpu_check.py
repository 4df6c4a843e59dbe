"""The GPU check: every training script for a few dozen steps at paper resolution in bf16, fp16 and --compile, then
the paths a short run does not take: --deterministic, ExCB's k-means initialisation, a kill and resume, the probe.

Runs each training script as a user would (its own command line, synthetic images, no downloads) once per mode:
  bf16     --amp bf16
  fp16     --amp fp16 (with its GradScaler)
  compile  --amp bf16 --compile
  fp32     --amp none (for a CPU without native bf16, where torch emulates bf16 about 10x slower than fp32)
and prints, per script and mode: images/s of the last log interval (the full loop, data pipeline included), peak
GPU memory (from the script's progress line), seconds to the first progress line (start-up plus the first step;
compile minus bf16 is the first-step compile time), and then benchmarks/step_cost.py's step / limit at the same
size in bf16 (--amp none: fp32; the step against the forward and backward passes the method needs). Then four
checks, each a row with pass or FAILED, its seconds and what it saw (in bf16; --amp none: fp32):
  deterministic  msn_prior.py --arch vit_tiny --deterministic: a ViT with focal crops smaller than the image (their
                 position embeddings are interpolated), under torch.use_deterministic_algorithms
  kmeans         excb.py with its k-means initialisation of the centroids (--kmeans-samples 2048), which the mode
                 runs leave out (--no-kmeans-init); the checkpoint must say the centroids were initialised
  resume         simsiam_rwsam.py killed with SIGTERM after its first progress line (it must stop with a checkpoint
                 and exit 143), then the same command again: it must say "resuming at step N" and finish
  probe          linear_probe.py --epochs 2 on the backbone the resumed run exported
A failing run prints its command and the end of its output to stderr and the check goes on; the script exits
non-zero if anything failed (on CUDA every run has a --timeout). benchmarks/gpu_check.sh runs it; --device cpu is
the smoke mode the tests run (16 px, batch 8, 3 steps, no --compile, tiny heads: a check that it runs, not a
measurement).

    bash benchmarks/gpu_check.sh                   # on a CUDA machine: 224 px, batch 64, 30 steps per run
    bash benchmarks/gpu_check.sh --device cpu      # smoke mode
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "supervised": ("supervised_baseline.py", []),
    "simsiam": ("simsiam_rwsam.py", []),
    "msn": ("msn_prior.py", []),
    "excb": ("excb.py", ["--no-kmeans-init"]),
}
MODES = {
    "bf16": ["--amp", "bf16"],
    "fp16": ["--amp", "fp16"],
    "compile": ["--amp", "bf16", "--compile"],
    "fp32": ["--amp", "none"],
}
CHECKS = ("deterministic", "kmeans", "resume", "probe")
PROGRESS = re.compile(r"step (\d+)/\d+ loss ([-0-9.naif]+).*\| ([0-9.]+) img/s(?: \| ([0-9.]+) GiB)?")


@dataclass
class GpuCheckArgs:
    """Each training script for a few dozen steps per precision mode; images/s, memory, compile time, step/limit; then
    the --deterministic, k-means, kill-and-resume and probe checks."""

    device: Literal["cuda", "cpu"] = "cuda"
    """cuda: the check at --image-size; cpu: the smoke mode (16 px, batch 8, 3 steps, bf16 and fp16 only)"""
    methods: tuple[Literal["supervised", "simsiam", "msn", "excb"], ...] = ("supervised", "simsiam", "msn", "excb")
    """training scripts to run"""
    modes: tuple[Literal["bf16", "fp16", "compile", "fp32"], ...] = ("bf16", "fp16", "compile")
    """precision modes per script"""
    amp: Literal["bf16", "none"] = "bf16"
    """autocast of step_cost and the checks; none: fp32 (a CPU without native bf16 emulates bf16, about 10x slower)"""
    checks: tuple[Literal["deterministic", "kmeans", "resume", "probe"], ...] = CHECKS
    """end-to-end checks after the modes (probe needs resume); --checks with no value: none"""
    image_size: Optional[int] = None
    """image size (default: 224 on cuda, 16 on cpu)"""
    batch_size: Optional[int] = None
    """batch size per process (default: 64 on cuda, 8 on cpu)"""
    steps: Optional[int] = None
    """steps per run (default: 30 on cuda, 3 on cpu); images/s is that of the last log interval (the second half)"""
    num_workers: Optional[int] = None
    """DataLoader workers per run (default: 8 on cuda, 0 on cpu)"""
    step_cost: bool = True
    """also run benchmarks/step_cost.py (step / limit) in --amp at the same size"""
    timeout: Optional[int] = None
    """seconds after which a run is killed and counted as failed (default: 300 on cuda, no limit on cpu, where a shared
    machine may take minutes)"""


@dataclass
class Result:
    ok: bool
    text: str  # stdout and stderr together
    first: float  # seconds to the first progress line (nan: none)
    seconds: float
    returncode: Optional[int]  # None: killed at the timeout


def run(
    cmd: list[str], env: dict, timeout: Optional[float], ok_codes=(0,), on_progress: Optional[Callable] = None
) -> Result:
    """Run a command in its own process group; its output and the seconds to its first progress line. A return code
    outside ``ok_codes`` or the timeout (the whole group killed) is a failure: the command and the end of its output
    go to stderr. ``on_progress(proc)`` is called once, at the first progress line."""
    start, first, lines = time.perf_counter(), None, []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    timer = threading.Timer(timeout or math.inf, lambda: kill_group(proc))
    if timeout:
        timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if first is None and PROGRESS.search(line):
                first = time.perf_counter() - start
                if on_progress is not None:
                    on_progress(proc)
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # gpu_check itself interrupted: take the run with it
            kill_group(proc)
            proc.wait()
    seconds = time.perf_counter() - start
    timed_out = bool(timeout) and proc.returncode == -signal.SIGKILL and seconds >= timeout
    result = Result(
        proc.returncode in ok_codes and not timed_out,
        "".join(lines),
        first if first is not None else math.nan,
        seconds,
        None if timed_out else proc.returncode,
    )
    if not result.ok:
        print("".join(lines[-40:]), end="", file=sys.stderr)
        why = f"killed after the {timeout:.0f} s timeout" if timed_out else str(proc.returncode)
        print(f"gpu_check: FAILED ({why}): {' '.join(cmd)}", file=sys.stderr, flush=True)
    return result


def rate(x: float) -> str:
    """A rate to 3 significant digits (260, 26.3, 0.0412): a slow run (bf16 emulated on a CPU) does not print as 0."""
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}" if x > 0 and math.isfinite(x) else f"{x:.0f}"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run and its DataLoader workers (its process group), if still there."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def why_failed(r: Result) -> str:
    """One line for the table: the timeout, the script's one-line error, or the last line that looks like an error."""
    if r.returncode is None:
        return f"killed at the timeout ({r.seconds:.0f} s)"
    lines = [line.strip() for line in r.text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|Error|Exception|FAILED", line)]
    line = (errors or lines or [f"exit code {r.returncode}"])[-1]
    return f"exit {r.returncode}: {line[:160]}".replace("|", "/")


def main(args: GpuCheckArgs) -> list[dict]:
    cuda = args.device == "cuda"
    size = args.image_size or (224 if cuda else 16)
    batch = args.batch_size or (64 if cuda else 8)
    steps = args.steps or (30 if cuda else 3)
    workers = args.num_workers if args.num_workers is not None else (8 if cuda else 0)
    timeout = args.timeout or (300 if cuda else None)
    modes = args.modes if cuda else tuple(m for m in args.modes if m != "compile")
    env = {**os.environ, **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})}
    started = time.perf_counter()
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible; use --device cpu for the smoke mode")
        print(
            f"gpu_check on {torch.cuda.get_device_name()} (torch {torch.__version__}): {size} px, batch {batch}, "
            f"{steps} steps, {workers} workers",
            flush=True,
        )
    per_class = -(-batch * steps // 4) + batch  # enough synthetic images for --steps steps at r = 1 (4 classes)
    data = ["--dataset", "synthetic", "--synthetic-classes", "4", "--synthetic-per-class", str(per_class)]
    data += ["--synthetic-test-per-class", "2", "--imbalance-ratio", "1", "--image-size", str(size)]
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as out:

        def command(script: str, *flags: str, run_name: str, max_steps: int = steps) -> list[str]:
            return [
                *(sys.executable, os.path.join(ROOT, script), *data, *flags, "--batch-size", str(batch)),
                *("--max-steps", str(max_steps), "--log-every", str(max(1, max_steps // 2)), "--eval-every", "0"),
                *("--num-workers", str(workers), "--output-dir", out, "--run-name", run_name),
            ]

        for method in args.methods:
            script, flags = SCRIPTS[method]
            for mode in modes:
                r = run(command(script, *flags, *MODES[mode], run_name=f"{method}_{mode}"), env, timeout)
                progress = PROGRESS.findall(r.text)
                if not r.ok or not progress:
                    failed.append(f"{method} {mode}")
                    rows.append({"method": method, "mode": mode, "ok": False, "first_progress_s": r.first})
                    continue
                step, _, images_per_s, memory = progress[-1]
                rows.append(
                    {
                        "method": method,
                        "mode": mode,
                        "ok": True,
                        "images_per_s": float(images_per_s),
                        "peak_gib": float(memory) if memory else None,
                        "first_progress_s": r.first,
                        "steps": int(step),
                    }
                )
                print(
                    f"{method} {mode}: {rate(float(images_per_s))} img/s, "
                    f"{memory + ' GiB' if memory else 'no GPU memory'}, first progress line after {r.first:.1f} s",
                    flush=True,
                )
        print(
            "\n| script | mode | img/s (loop) | peak GPU memory (GiB) | first progress line (s) | compile time (s) |\n"
            "|---|---|---|---|---|---|"
        )
        first = {(r["method"], r["mode"]): r["first_progress_s"] for r in rows if r["ok"]}
        first_bf16 = {method: s for (method, mode), s in first.items() if mode == "bf16"}
        for r in rows:
            if not r["ok"]:
                print(f"| {r['method']} | {r['mode']} | FAILED | - | - | |")
                continue
            compile_s = (
                r["first_progress_s"] - first_bf16[r["method"]]
                if r["mode"] == "compile" and r["method"] in first_bf16
                else None
            )
            print(
                f"| {r['method']} | {r['mode']} | {rate(r['images_per_s'])} | "
                f"{r['peak_gib'] if r['peak_gib'] is not None else '-'} | {r['first_progress_s']:.1f} | "
                f"{'' if compile_s is None else f'{compile_s:.1f}'} |"
            )
        if args.step_cost:
            cmd = [
                *(sys.executable, os.path.join(ROOT, "benchmarks", "step_cost.py"), "--methods", *args.methods),
                *("--amp", args.amp, "--batch-size", str(batch), "--image-size", str(size)),
                *(
                    "--repeats",
                    "3" if cuda else "1",
                    "--loop-steps",
                    "4" if cuda else "2",
                    "--num-workers",
                    str(workers),
                ),
            ]
            r = run(cmd, env, timeout)
            if r.ok and "| method" in r.text:
                head = f"\nstep / limit (benchmarks/step_cost.py, {args.amp}):\n"
                print(head + r.text[r.text.index("| method") :], end="")
            else:
                failed.append("step_cost")
                print(f"\nstep / limit (benchmarks/step_cost.py, {args.amp}): FAILED, {why_failed(r)}")
        mode = "bf16" if args.amp == "bf16" else "fp32"  # the checks' precision, as a mode row
        first_same = {method: s for (method, m), s in first.items() if m == mode}
        checks = run_checks(args, command, env, timeout, first_same, out, workers, per_class, steps, cuda)
    if checks:
        print("\n| check | result | time (s) | detail |\n|---|---|---|---|")
        for c in checks:
            print(f"| {c['check']} | {'pass' if c['ok'] else 'FAILED'} | {c['seconds']:.1f} | {c['detail']} |")
    failed += [c["check"] for c in checks if not c["ok"]]
    print(f"\ngpu_check: {time.perf_counter() - started:.0f} s in all", flush=True)
    if failed:
        raise SystemExit(f"gpu_check: {len(failed)} failed: {', '.join(failed)}")
    print("gpu_check: all runs finished")
    return rows + checks


def run_checks(args, command, env, timeout, first_same, out, workers, per_class, steps, cuda) -> list[dict]:
    """The --checks rows: {"check", "ok", "seconds", "detail"}."""
    checks = []

    def add(name: str, ok: bool, seconds: float, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "seconds": seconds, "detail": detail})
        print(f"check {name}: {'pass' if ok else 'FAILED'} in {seconds:.1f} s: {detail}", flush=True)

    if "deterministic" in args.checks:
        # a ViT's focal crops are smaller than the image: their position embeddings are resized (bicubic), whose
        # backward must have a deterministic kernel under torch.use_deterministic_algorithms
        tiny = [] if cuda else ["--vit-layers", "2", "--num-focal", "2", "--num-prototypes", "16"]
        flags = ("--arch", "vit_tiny", *tiny, "--deterministic", "--amp", args.amp)
        r = run(command("msn_prior.py", *flags, run_name="det", max_steps=min(steps, 5)), env, timeout)
        progress = PROGRESS.findall(r.text)
        ok = r.ok and bool(progress)
        detail = "msn_prior.py --arch vit_tiny --deterministic, focal crops smaller than the image"
        add(
            "deterministic",
            ok,
            r.seconds,
            f"{detail}: {progress[-1][0]} steps, loss {progress[-1][1]}" if ok else why_failed(r),
        )

    if "kmeans" in args.checks:
        images = 4 * per_class
        clusters = min(1024, images // 2)  # excb.py's default K, fewer than the images (k-means needs more)
        tiny = [] if cuda else ["--hidden-dim", "64", "--out-dim", "32", "--num-local-crops", "2"]
        flags = ("--kmeans-samples", "2048", "--num-clusters", str(clusters), *tiny, "--amp", args.amp)
        cmd = command("excb.py", *flags, run_name="km", max_steps=min(steps, 5))
        r = run(cmd, env, timeout)
        ok, detail = r.ok, why_failed(r)
        if ok:
            import torch

            state = torch.load(os.path.join(out, "km", "checkpoint.pt"), map_location="cpu", weights_only=True)
            ok = bool(state["model"]["centroids_initialised"])
            without = first_same.get("excb")
            detail = (
                f"excb.py k-means init of {clusters} centroids on {min(images, 2048)} images: "
                f"first progress line after {r.first:.1f} s"
                + (f" ({args.amp} without k-means: {without:.1f} s)" if without is not None else "")
                if ok
                else "the checkpoint says the centroids were not initialised"
            )
        add("kmeans", ok, r.seconds, detail)

    if "resume" in args.checks or "probe" in args.checks:
        total = max(8, min(steps, 10))  # enough that the signal arrives before the end, even on a busy CPU
        cmd = command("simsiam_rwsam.py", "--amp", args.amp, run_name="resume", max_steps=total)
        stop = lambda proc: proc.send_signal(signal.SIGTERM)  # as `kill PID` does: the process, not its workers
        first = run(cmd, env, timeout, ok_codes=(128 + signal.SIGTERM,), on_progress=stop)
        stopped = re.search(r"interrupted at step (\d+); checkpoint saved", first.text)
        second = run(cmd, env, timeout) if first.ok and stopped else None
        # the second run's first line (the script's start line) must say where it resumes, and the run must finish
        start_line = next(
            (x for x in (second.text if second else "").splitlines() if x.startswith("simsiam_rwsam: ")), ""
        )
        resumed = re.search(r"resuming at step (\d+) of (\d+)", start_line)
        done = second is not None and re.search(rf"done: step {total};", second.text)
        ok = bool(stopped and second and second.ok and resumed and done and resumed.group(1) == stopped.group(1))
        seconds = first.seconds + (second.seconds if second is not None else 0.0)
        if ok:
            detail = (
                f"simsiam_rwsam.py: SIGTERM after the first progress line, stopped at step {stopped.group(1)} "
                f"(exit {first.returncode}); the same command resumed at step {resumed.group(1)} of {total}, finished"
            )
        elif first.returncode == 0:
            detail = "first run: finished before SIGTERM arrived (exit 0)"
        elif not first.ok or not stopped:
            detail = "first run: " + (why_failed(first) if not first.ok else "no 'interrupted at step' line")
        else:
            detail = "second run: " + (why_failed(second) if not second.ok else "no 'resuming at step N' or 'done'")
        if "resume" in args.checks:
            add("resume", ok, seconds, detail)

    if "probe" in args.checks:
        backbone = os.path.join(out, "resume", "backbone.pt")
        result = os.path.join(out, "probe.json")
        cmd = [sys.executable, os.path.join(ROOT, "linear_probe.py"), backbone, "--epochs", "2"]
        cmd += ["--num-workers", str(workers), "--output", result]
        r = run(cmd, env, timeout)
        ok = r.ok and os.path.exists(result)
        if ok:
            with open(result) as f:
                res = json.load(f)
            detail = (
                f"linear_probe.py --epochs 2 on the resumed run's backbone: {res['num_train']} training / "
                f"{res['num_test']} test images, linear top-1 {res['linear']['top1']:.2f}, kNN {res['knn']['top1']:.2f}"
            )
        else:
            detail = why_failed(r) if not r.ok else "no JSON written"
        add("probe", ok, r.seconds, detail)
    return checks


if __name__ == "__main__":
    main(tyro.cli(GpuCheckArgs, description=__doc__.split("\n\n")[0]))
