"""What does each method's training step cost against the passes it intrinsically needs?

For every method at 32 px and batch 64, in bf16 autocast and in fp32, on the device present:
  limit     the forward and backward passes the method needs, timed on random tensors here;
  optimizer one step of the script's own optimizer alone (not in the limit: it is the same for every method);
  step      one real training step of the script's own code (train_step: loss, balancing, EMA, weights,
            optimizer), on the same random batch;
  loop      the script's full loop including its DataLoader (a --max-steps run, images/s from its log);
  pipeline  the data pipeline alone (the script's own transform and loader), images/s.
Prints a markdown table of medians, the ratio step / limit and step / (limit + optimizer). Asserts nothing.

    python benchmarks/step_cost.py                      # every method, bf16 and fp32
    python benchmarks/step_cost.py --methods supervised --amp bf16 --repeats 10
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lt_data  # noqa: E402


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the intrinsic passes of each method
# Each takes (model, views, labels, indices, autocast) and runs the forward and backward passes the method
# cannot do without, with a trivial loss: what any implementation of the method must pay.


def limit_supervised(model, views, labels, idx, autocast):
    """One forward and backward of backbone + classifier on one view."""
    with autocast():
        logits = model(views)
    F.cross_entropy(logits.float(), labels).backward()


def limit_simsiam(model, views, labels, idx, autocast):
    """Backbone, projector and predictor on both views, forward and backward."""
    with autocast():
        p1, p2, z1, z2 = model(*views)
    (p1.float().mean() + p2.float().mean()).backward()


def limit_rwsam(model, views, labels, idx, autocast):
    """(A)SAM needs the SimSiam passes twice (ascent and descent gradients)."""
    limit_simsiam(model, views, labels, idx, autocast)
    limit_simsiam(model, views, labels, idx, autocast)


def limit_msn(model, views, labels, idx, autocast):
    """Target forward on the target view; masked anchor and focal forwards and backwards."""
    with autocast():
        with torch.no_grad():
            model.target_forward(views[0])
        anchor, protos = model(views[1:], idx, 0)
    (anchor.float() @ protos.float().T).mean().backward()


def limit_excb(model, views, labels, idx, autocast):
    """Teacher forward on the two global views; student forward and backward on all crops."""
    global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:]) if len(views) > 2 else None
    with autocast():
        with torch.no_grad():
            model.teacher.scores(model.teacher.project(global_views))
        a, b = model(global_views, local_views)
    (a.float().mean() + (b.float().mean() if b is not None else 0)).backward()


# method: (script, its flags, intrinsic passes)
METHODS: dict[str, tuple[str, list[str], Callable]] = {
    "supervised": ("supervised_baseline.py", [], limit_supervised),
    "simsiam": ("simsiam_rwsam.py", ["--sam", "none"], limit_simsiam),
    "rwsam": ("simsiam_rwsam.py", ["--sam", "asam", "--reweight", "kde"], limit_rwsam),
    "msn": ("msn_prior.py", ["--prior", "power-law"], limit_msn),
    "excb": ("excb.py", ["--no-kmeans-init"], limit_excb),
}


@dataclass
class BenchArgs:
    """Step cost of every method against its intrinsic forward/backward passes."""

    methods: tuple[str, ...] = tuple(
        m for m, (script, _, _) in METHODS.items() if os.path.exists(os.path.join(ROOT, script))
    )
    """methods to measure (default: every method whose script is present)"""
    amp: tuple[Literal["bf16", "none"], ...] = ("bf16", "none")
    """autocast settings to measure"""
    batch_size: int = 64
    """batch size"""
    image_size: int = 32
    """input resolution"""
    repeats: int = 8
    """timed repetitions per measurement (the median is reported), after 2 warm-ups"""
    loop_steps: int = 12
    """steps of the full-loop run (its images/s excludes the first log interval)"""
    num_workers: int = 2
    """DataLoader workers of the pipeline and loop measurements"""


def rate(x: float) -> str:
    """A rate to 3 significant digits (260, 26.3, 0.0412): a slow run (bf16 emulated on a CPU) does not print as 0."""
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}" if x > 0 and math.isfinite(x) else f"{x:.0f}"


def median_time(fn: Callable, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_run(module, args, device):
    """The script's own RunState, built the way its train() builds it (one process)."""
    data = lt_data.build_data(args)
    train_set = lt_data.IndexedDataset(
        data.train_full, data.pretrain_indices(False), module.train_transform(args, data)
    )
    torch.manual_seed(args.seed)
    model = module.Model(args, data).to(device, memory_format=torch.channels_last if args.channels_last else None)
    optimizer = module.make_optimizer(args, model, args.lr * args.batch_size / 256)
    run = module.RunState(
        args=args,
        device=device,
        data=data,
        train_set=train_set,
        model=model,
        train_model=model,
        optimizer=optimizer,
        steps_per_epoch=len(train_set) // args.batch_size,
        run_dir=tempfile.mkdtemp(),
    )
    module.set_schedules(run)  # the step's scheduled values (lr, weight decay, EMA momentum), as the loop sets them
    return run


def real_batch(module, run, batch_size):
    """A batch from the script's own pipeline, moved to the device by its own code (as in training)."""
    loader = lt_data.make_loader(run.train_set, batch_size, 0, sampler=None, drop_last=True)
    views, labels, idx = next(iter(loader))

    def move(x):
        return [run.to_device(v) for v in x] if isinstance(x, list) else run.to_device(x)

    return move(views), move(labels), move(idx)


def pipeline_rate(run, batch_size, workers, batches=10) -> float:
    """images/s of the script's own loader over `batches` batches after the first (as many epochs as that takes)."""
    sampler = lt_data.ResumableSampler(len(run.train_set), seed=0)
    loader = lt_data.make_loader(run.train_set, batch_size, workers, sampler, drop_last=True)
    n, t, epoch = -1, None, 0
    while n < batches:
        sampler.set_epoch(epoch)
        for _ in loader:
            n += 1
            if n == 0:
                t = time.perf_counter()
            if n == batches:
                break
        epoch += 1
    return batches * batch_size / (time.perf_counter() - t)


def loop_rate(script, data_flags, args: BenchArgs, amp) -> float:
    """images/s of the script's own full loop (DataLoader included), from its last progress line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, script),
                *data_flags,
                "--amp",
                amp,
                "--batch-size",
                str(args.batch_size),
                "--max-steps",
                str(args.loop_steps),
                "--log-every",
                str(args.loop_steps // 2),
                "--num-workers",
                str(args.num_workers),
                "--output-dir",
                tmp,
                "--eval-every",
                "0",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return float(re.findall(r"\| ([0-9.]+) img/s", out)[-1])


def main(args: BenchArgs) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_flags = ["--dataset", "synthetic", "--image-size", str(args.image_size), "--imbalance-ratio", "10"]
    print(f"device {device}, batch {args.batch_size}, {args.image_size} px, torch threads {torch.get_num_threads()}")
    rows = []
    for method in args.methods:
        script, flags, limit = METHODS[method]
        module = load_script(script)
        for amp in args.amp:
            margs = tyro.cli(
                module.Args, args=[*data_flags, *flags, "--amp", amp, "--batch-size", str(args.batch_size)]
            )
            run = make_run(module, margs, device)
            views, labels, idx = real_batch(module, run, args.batch_size)
            run.model.train()

            def intrinsic():
                run.model.zero_grad(set_to_none=True)
                limit(run.model, views, labels, idx, run.autocast)

            t_limit = median_time(intrinsic, args.repeats)
            t_opt = median_time(run.optimizer.step, args.repeats)  # on the gradients intrinsic() left
            t_step = median_time(lambda: module.train_step(run, (views, labels, idx)), args.repeats)
            loop = loop_rate(script, [*data_flags, *flags], args, amp)
            pipe = pipeline_rate(run, args.batch_size, args.num_workers)
            rows.append((method, amp, t_limit, t_opt, t_step, loop, pipe))
            print(
                f"{method} {amp}: limit {t_limit * 1e3:.0f} ms, optimizer {t_opt * 1e3:.1f} ms, step "
                f"{t_step * 1e3:.0f} ms, ratio {t_step / t_limit:.3f}; loop {rate(loop)} img/s; pipeline "
                f"{rate(pipe)} img/s",
                flush=True,
            )
    print(
        "\n| method | amp | step / limit | step / (limit + optimizer) | model img/s (step) | full loop img/s | "
        f"pipeline img/s (workers={args.num_workers}) | pipeline / model |\n|---|---|---|---|---|---|---|---|"
    )
    for method, amp, t_limit, t_opt, t_step, loop, pipe in rows:
        model_rate = args.batch_size / t_step
        print(
            f"| {method} | {amp} | {t_step / t_limit:.3f} | {t_step / (t_limit + t_opt):.3f} | {rate(model_rate)} | "
            f"{rate(loop)} | {rate(pipe)} | {pipe / model_rate:.2f} |"
        )


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
