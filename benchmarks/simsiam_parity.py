"""Parity with a peer: our SimSiam (simsiam_rwsam.py --sam none) against lightly's SimSiam heads and loss.

Both train on the same data (lt_data's long-tailed set, same sampler seed, so the same images in the same
order with the same augmentation draws), the same backbone (linear_probe.build_backbone: ResNet-18 with the
CIFAR stem below 64 px, or the ViT of --arch vit_tiny with --vit-*, initialised from torch.manual_seed(seed) in
both, so it starts bit-identical), the same batch, the same optimiser as simsiam_rwsam.py picks for the backbone
(ResNet: SGD momentum 0.9, weight decay on all parameters; ViT: AdamW, weight decay on weight matrices only;
lr * batch / 256, --warmup-epochs of linear warm-up, then cosine per step to 0), autocast and number of steps.
What differs is the SimSiam part: ours is the project's script, run as a subprocess; lightly's
is lightly 1.6.0's SimSiamProjectionHead, SimSiamPredictionHead and NegativeCosineSimilarity in a small
loop here, used as lightly's SimSiam example does. Both are scored by the same online kNN monitor
(linear_probe.KNNMonitor: k 20, T 0.07, on the backbone) before training, every --eval-every epochs and at
the end. Printed: a markdown table of the kNN top-1 curves per implementation and seed, the final mean +-
half-range over seeds, and the difference of the means; written: <output-dir>/parity.json with all curves.

Projector: lightly's SimSiamProjectionHead has 3 linear layers (ImageNet SimSiam) and no depth argument; ours
runs with --proj-layers (default 3 here, so the heads agree; 2 is SimSiam's CIFAR variant, and the difference is
then printed with the results). Hidden and output widths are both --proj-dim. One difference remains (printed):
the loss precision: ours computes the negative cosine in fp32; lightly's in the autocast dtype (bf16 under CPU
autocast; CUDA autocast runs cosine_similarity in fp32 anyway). With lightly's ProjectionHead built as deep as
ours and --amp none, the two loops give the same curves (tests/test_benchmarks.py checks it), so a gap here
comes from these differences.

Each (implementation, seed) writes <output-dir>/<impl>_s<seed>.json when done; a rerun of the same command
reuses those and so resumes an interrupted benchmark (ours also resumes its own run from its checkpoint).
lightly is a benchmark-only dependency: pip install -r benchmarks/requirements.txt.

The CPU recipe of simsiam_rwsam.py (docs/cpu_recipes.md: 8 epochs of 232 steps), 2 seeds of each:

    python benchmarks/simsiam_parity.py --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist \\
        --image-size 16 --arch vit_tiny --vit-layers 4 --vit-dim 96 --vit-heads 3 --epochs 8 --warmup-epochs 1 \\
        --batch-size 64 --lr 2e-3 --weight-decay 0.05 --proj-dim 512 --pred-dim 128 --crop-min-scale 0.5 \\
        --eval-every 1 --num-workers 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lt_data  # noqa: E402
from linear_probe import KNNMonitor, backbone_spec, build_backbone, feature_dim  # noqa: E402

IMPLEMENTATIONS = ("ours", "lightly")
# flags that cannot change a curve: a finished run's JSON written with other values of these is still reused
NOT_COMPARED = ("seeds", "which", "output_dir", "data_dir", "download", "num_workers")
PROJECTOR_DIFFERENCE = (
    "projector: lightly's SimSiamProjectionHead has 3 linear layers (Linear-BN-ReLU, "
    "Linear-BN-ReLU, Linear-BN(affine=False)) and no depth argument; ours has --proj-layers {}"
)
DIFFERENCES = [
    "loss: ours computes the negative cosine in fp32; lightly's NegativeCosineSimilarity in the autocast dtype "
    "(bf16 under CPU autocast with --amp bf16; CUDA autocast computes cosine_similarity in fp32)",
]


class ParityError(Exception):
    """Bad input or a failed run: one line on stderr, exit code 2."""


@dataclass
class ParityArgs(lt_data.DataArgs):
    """Our SimSiam against lightly's on the same data, backbone, optimiser and steps: online kNN curves."""

    arch: Literal["resnet18", "vit_tiny", "vit_small"] = "resnet18"
    """backbone, as simsiam_rwsam.py's --arch (ResNet: SGD; ViT: AdamW)"""
    vit_layers: Optional[int] = None
    """ViT only: override the preset's number of transformer layers"""
    vit_dim: Optional[int] = None
    """ViT only: override the preset's width"""
    vit_heads: Optional[int] = None
    """ViT only: override the preset's number of attention heads"""
    seeds: tuple[int, ...] = (0, 1)
    """training seeds; every implementation runs each (the spread over seeds is the yardstick of a difference)"""
    which: Literal["ours", "lightly", "both"] = "both"
    """implementations to run"""
    epochs: int = 800
    """training epochs (the cosine schedule spans them); the method defaults are simsiam_rwsam.py's"""
    batch_size: int = 512
    """batch size"""
    lr: float = 0.03
    """learning rate for a batch of 256, scaled linearly (SGD for ResNets, AdamW for ViTs)"""
    weight_decay: float = 5e-4
    """weight decay (ResNets: all parameters; ViTs: weight matrices only)"""
    warmup_epochs: int = 0
    """linear learning-rate warm-up epochs before the cosine decay"""
    proj_layers: int = 3
    """our projector's linear layers (simsiam_rwsam.py --proj-layers); lightly's SimSiamProjectionHead has 3"""
    proj_dim: int = 2048
    """projector width (hidden and output) and predictor output"""
    pred_dim: int = 512
    """predictor bottleneck width"""
    crop_min_scale: float = 0.2
    """smallest area fraction of RandomResizedCrop"""
    amp: Literal["bf16", "none"] = "bf16"
    """autocast dtype of the forward passes: bf16 or none (fp32)"""
    eval_every: int = 5
    """kNN monitor before training, every this many epochs and at the end"""
    eval_bank: int = 5000
    """kNN monitor's bank: a class-balanced subsample of this many training images"""
    eval_queries: int = 2000
    """kNN monitor's queries: a class-balanced subsample of this many test images; 0: the whole test set"""
    max_steps: Optional[int] = None
    """stop after this many steps (smoke runs); the schedule still spans --epochs"""
    num_workers: int = 2
    """data-loading processes of each training run"""
    output_dir: str = "runs/parity"
    """where our runs, the per-run JSONs and parity.json go"""


def validate(args: ParityArgs) -> None:
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ParityError(f"--seeds must be one or more distinct seeds, got {list(args.seeds)}")
    if args.proj_layers < 2:
        raise ParityError(f"--proj-layers must be >= 2, got {args.proj_layers}")
    for name in ("epochs", "batch_size", "proj_dim", "pred_dim", "eval_every"):
        if getattr(args, name) < 1:
            raise ParityError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_bank", "eval_queries", "num_workers"):
        if getattr(args, name) < 0:
            raise ParityError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.arch.startswith("vit") and vit_flags(args):
        raise ParityError(f"--vit-layers/--vit-dim/--vit-heads apply to ViTs, not --arch {args.arch}")
    if args.warmup_epochs < 0:
        raise ParityError(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ParityError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.lr > 0 or not args.weight_decay >= 0:
        raise ParityError(f"--lr must be > 0 and --weight-decay >= 0, got {args.lr} and {args.weight_decay}")
    if not 0 < args.crop_min_scale <= 1:
        raise ParityError(f"--crop-min-scale must be in (0, 1], got {args.crop_min_scale}")


def differences(args: ParityArgs) -> list[str]:
    return ([PROJECTOR_DIFFERENCE.format(args.proj_layers)] if args.proj_layers != 3 else []) + DIFFERENCES


def compared_flags(args: ParityArgs) -> dict:
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_COMPARED}


def data_flags(args: ParityArgs) -> list[str]:
    """The lt_data.DataArgs flags as simsiam_rwsam.py's command line takes them."""
    flags = []
    for f in dataclasses.fields(lt_data.DataArgs):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def vit_flags(args: ParityArgs) -> list[str]:
    return [
        item
        for name in ("vit_layers", "vit_dim", "vit_heads")
        if getattr(args, name) is not None
        for item in ("--" + name.replace("_", "-"), str(getattr(args, name)))
    ]


def train_ours(args: ParityArgs, seed: int) -> list[tuple[int, float]]:
    """simsiam_rwsam.py --sam none in a subprocess; the curve from its TensorBoard scalars eval/knn_top1."""
    run_name = f"ours_s{seed}"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "simsiam_rwsam.py"),
        "--sam",
        "none",
        *data_flags(args),
        "--arch",
        args.arch,
        *vit_flags(args),
        "--seed",
        str(seed),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--weight-decay",
        str(args.weight_decay),
        "--proj-layers",
        str(args.proj_layers),
        "--proj-dim",
        str(args.proj_dim),
        "--pred-dim",
        str(args.pred_dim),
        "--warmup-epochs",
        str(args.warmup_epochs),
        "--crop-min-scale",
        str(args.crop_min_scale),
        "--amp",
        args.amp,
        "--eval-every",
        str(args.eval_every),
        "--eval-bank",
        str(args.eval_bank),
        "--eval-queries",
        str(args.eval_queries),
        "--num-workers",
        str(args.num_workers),
        "--output-dir",
        args.output_dir,
        "--run-name",
        run_name,
        *(["--max-steps", str(args.max_steps)] if args.max_steps else []),
    ]
    print("$", " ".join(cmd), flush=True)
    returncode = subprocess.run(cmd).returncode
    if returncode != 0:
        raise ParityError(f"ours (seed {seed}) failed with exit code {returncode}; its output is above")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(args.output_dir, run_name))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("eval/knn_top1")]


def import_lightly():
    """lightly's SimSiam heads and loss (a benchmark-only dependency, so imported here, not at top level)."""
    try:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    except ImportError:
        raise ParityError("lightly is not installed: pip install -r benchmarks/requirements.txt") from None
    return SimSiamProjectionHead, SimSiamPredictionHead, NegativeCosineSimilarity


class LightlySimSiam(nn.Module):
    """Our backbone under lightly's heads, wired as lightly's SimSiam example: forward(x) = (sg(z), p)."""

    def __init__(self, args: ParityArgs, image_size: int, projection_head_cls, prediction_head_cls):
        super().__init__()
        spec = backbone_spec(args.arch, image_size, args.vit_layers, args.vit_heads, args.vit_dim)
        self.backbone = build_backbone(spec["arch"], **spec["arch_kwargs"])
        self.projection_head = projection_head_cls(
            feature_dim(spec["arch"], **spec["arch_kwargs"]), args.proj_dim, args.proj_dim
        )
        self.prediction_head = prediction_head_cls(args.proj_dim, args.pred_dim, args.proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projection_head(self.backbone(x))
        return z.detach(), self.prediction_head(z)


def train_lightly(args: ParityArgs, seed: int, data: lt_data.LTData, lightly_modules) -> list[tuple[int, float]]:
    """SimSiam with lightly's heads and loss, every other choice as simsiam_rwsam.py makes it for one process."""
    projection_head_cls, prediction_head_cls, loss_cls = lightly_modules
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    train_set = lt_data.IndexedDataset(
        data.train_full,
        data.pretrain_indices(args.balanced_twin),
        lt_data.TwoViews(lt_data.ssl_augment(data.image_size, data.mean, data.std, (args.crop_min_scale, 1.0))),
    )
    torch.manual_seed(seed)
    model = LightlySimSiam(args, data.image_size, projection_head_cls, prediction_head_cls).to(
        device, memory_format=torch.channels_last
    )
    criterion = loss_cls()
    lr = args.lr * args.batch_size / 256
    if args.arch.startswith("vit"):  # as simsiam_rwsam.make_optimizer: AdamW, no decay on biases and norms
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": args.weight_decay},
                {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
            ],
            lr=lr,
            fused=True,
        )
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay, fused=True)
    sampler = lt_data.ResumableSampler(len(train_set), 1, 0, seed)
    steps_per_epoch = len(sampler) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    stop_step = min(total_steps, args.max_steps or total_steps)
    warmup = min(args.warmup_epochs * steps_per_epoch, total_steps)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 0 (simsiam_rwsam.lr_factor)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loader = lt_data.make_loader(train_set, args.batch_size, args.num_workers, sampler, drop_last=True)
    monitor = KNNMonitor(data, args.eval_bank, args.eval_queries, seed=seed)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def to_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)

    curve = [(0, monitor(model.backbone, to_device, autocast))]
    print(
        f"lightly seed {seed}: {len(train_set)} training images, {stop_step} steps; step 0 knn_top1 {curve[-1][1]:.2f}",
        flush=True,
    )
    step = 0
    model.train()
    while step < stop_step:
        sampler.set_epoch(step // steps_per_epoch)
        for (x0, x1), _, _ in loader:
            with autocast():
                z0, p0 = model(to_device(x0))
                z1, p1 = model(to_device(x1))
                loss = 0.5 * (criterion(z0, p1) + criterion(z1, p0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            epochs_done, mid_epoch = divmod(step, steps_per_epoch)
            if step == stop_step or not mid_epoch and epochs_done % args.eval_every == 0:
                if not torch.isfinite(loss):
                    raise ParityError(f"lightly (seed {seed}): non-finite loss at step {step}; try a lower --lr")
                curve.append((step, monitor(model.backbone, to_device, autocast)))
                print(
                    f"lightly seed {seed}: step {step}/{stop_step} loss {loss.item():.4f} knn_top1 {curve[-1][1]:.2f}",
                    flush=True,
                )
            if step == stop_step:
                break
    return curve


def load_finished(path: str, args: ParityArgs) -> Optional[list[tuple[int, float]]]:
    """The curve of a finished run written with the same flags; None if there is none; refuses other flags."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    now = compared_flags(args)
    changed = [k for k in now if saved["flags"].get(k) != now[k]]
    if changed:
        k = changed[0]
        raise ParityError(
            f"{path} was written with --{k.replace('_', '-')} {saved['flags'].get(k)} (now {now[k]}); "
            f"use another --output-dir or delete it"
        )
    print(f"reusing {path}", flush=True)
    return [tuple(point) for point in saved["curve"]]


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half-range)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def report(args: ParityArgs, curves: dict[str, dict[int, list]]) -> dict:
    """Print the markdown table of the curves and the final comparison; return the summary."""
    columns = [(impl, seed) for impl in curves for seed in curves[impl]]
    steps = sorted({step for impl, seed in columns for step, _ in curves[impl][seed]})
    lookup = {(impl, seed): dict(curves[impl][seed]) for impl, seed in columns}
    lines = [
        "| step | " + " | ".join(f"{impl} seed {seed}" for impl, seed in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for step in steps:
        cells = [f"{lookup[c][step]:.2f}" if step in lookup[c] else "" for c in columns]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    print("\nkNN top-1 (%) of the backbone\n\n" + "\n".join(lines) + "\n")
    final = {}
    for impl in curves:
        values = [curves[impl][seed][-1][1] for seed in curves[impl]]
        mean, half_range = spread(values)
        final[impl] = {
            "mean": mean,
            "half_range": half_range,
            "min": min(values),
            "max": max(values),
            "step": curves[impl][args.seeds[0]][-1][0],
        }
        print(
            f"{impl}: final kNN top-1 {mean:.2f} +- {half_range:.2f} (mean +- half-range over seeds "
            f"{', '.join(map(str, args.seeds))}; step {final[impl]['step']})"
        )
    summary = {"final": final}
    if len(final) == 2:
        ours, lightly = final["ours"], final["lightly"]
        difference = ours["mean"] - lightly["mean"]
        overlap = ours["min"] <= lightly["max"] and lightly["min"] <= ours["max"]
        print(
            f"difference of means (ours - lightly): {difference:+.2f}; seed spread (half-range): ours "
            f"{ours['half_range']:.2f}, lightly {lightly['half_range']:.2f}; the seed ranges "
            f"{'overlap' if overlap else 'do not overlap'}"
        )
        summary.update(difference=difference, ranges_overlap=overlap)
    if "lightly" in curves:
        print("\nknown differences between the two:\n" + "\n".join(f"  - {d}" for d in differences(args)))
    return summary


def main(args: ParityArgs) -> dict:
    validate(args)
    data = lt_data.build_data(args)
    if args.batch_size > len(data.pretrain_indices(args.balanced_twin)):
        raise ParityError(
            f"--batch-size {args.batch_size} exceeds the "
            f"{len(data.pretrain_indices(args.balanced_twin))} training images"
        )
    os.makedirs(args.output_dir, exist_ok=True)
    implementations = IMPLEMENTATIONS if args.which == "both" else (args.which,)
    paths = {
        (impl, seed): os.path.join(args.output_dir, f"{impl}_s{seed}.json")
        for impl in implementations
        for seed in args.seeds
    }
    curves = {impl: {} for impl in implementations}
    finished = {key: load_finished(path, args) for key, path in paths.items()}
    to_train = [key for key, curve in finished.items() if curve is None]
    lightly_modules = import_lightly() if any(impl == "lightly" for impl, _ in to_train) else None
    for seed in args.seeds:
        for impl in implementations:
            curve = finished[(impl, seed)]
            if curve is None:
                t0 = time.perf_counter()
                curve = train_ours(args, seed) if impl == "ours" else train_lightly(args, seed, data, lightly_modules)
                with open(paths[(impl, seed)], "w") as f:
                    json.dump(
                        {
                            "implementation": impl,
                            "seed": seed,
                            "flags": compared_flags(args),
                            "curve": curve,
                            "seconds": time.perf_counter() - t0,
                        },
                        f,
                        indent=1,
                    )
            curves[impl][seed] = curve
    summary = report(args, curves)
    result = {
        "args": dataclasses.asdict(args),
        "curves": curves,
        **summary,
        "differences": differences(args) if "lightly" in curves else [],
    }
    with open(os.path.join(args.output_dir, "parity.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(ParityArgs, description=__doc__.split("\n\n")[0]))
    except (ParityError, lt_data.DataError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
