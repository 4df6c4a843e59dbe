"""This project against lightly on the same work, in one run on the same machine: step time and pipeline cost.

Step (batch --batch-size, --image-size px, synthetic images, the autocast of --amp, median of --repeats after two
warm-ups), on one batch drawn through our pipeline:
  simsiam  ours: simsiam_rwsam.py's train_step with --sam none (ResNet-18, CIFAR stem, our 2-layer projector and
           predictor, our loss, fused SGD). lightly: the same backbone and SGD under lightly 1.6.0's
           SimSiamProjectionHead (3 layers), SimSiamPredictionHead and NegativeCosineSimilarity, as its example.
  msn/pmsn ours: msn_prior.py's train_step (uniform prior with Sinkhorn, or --prior power-law --sinkhorn off, as
           lightly's PMSNLoss). lightly: the same model forward, the script's own optimizer step (gradient clipping
           included) and EMA, with lightly's MSNLoss / PMSNLoss in place of our loss: the difference is the loss.
Pipeline at --pipeline-size px (ms per image per core, one thread, decode of a JPEG to every normalised view, on the
same generated 500 x 375 JPEGs): our train_transform (benchmarks/pipeline.py) against lightly's SimSiamTransform
and MSNTransform built with the same view counts, sizes and crop scales.
Prints a markdown table with ours / lightly per method (below 1: ours is faster). Asserts nothing. lightly is a
benchmark-only dependency: pip install -r benchmarks/requirements.txt.

    python benchmarks/peers.py                                   # simsiam, msn, pmsn
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import pipeline  # noqa: E402
import step_cost  # noqa: E402

import lt_data  # noqa: E402

SCRIPTS = {
    "simsiam": ("simsiam_rwsam.py", ["--sam", "none"]),
    "msn": ("msn_prior.py", []),
    "pmsn": ("msn_prior.py", ["--prior", "power-law", "--sinkhorn", "off"]),  # lightly's PMSNLoss: no Sinkhorn
}


class PeersError(Exception):
    """Bad input or a missing dependency: one line on stderr, exit code 2."""


@dataclass
class PeersArgs:
    """Ours against lightly: training-step time and pipeline cost per method, in one run."""

    methods: tuple[Literal["simsiam", "msn", "pmsn"], ...] = ("simsiam", "msn", "pmsn")
    """methods to compare"""
    batch_size: int = 64
    """batch size of the step"""
    image_size: int = 32
    """image size of the step (synthetic images)"""
    amp: Literal["bf16", "none"] = "bf16"
    """autocast dtype of both steps"""
    repeats: int = 8
    """timed steps per implementation (median reported)"""
    pipeline_size: int = 224
    """image size of the pipeline comparison; 0 skips it"""
    pipeline_images: int = 32
    """generated JPEGs for the pipeline comparison"""
    output: str = "peers.json"
    """where the figures are written (JSON)"""


def import_lightly():
    try:
        from lightly import loss, models, transforms
    except ImportError:
        raise PeersError("lightly is not installed: pip install -r benchmarks/requirements.txt") from None
    return loss, models.modules, transforms


def our_step(method: str, args: PeersArgs, device: torch.device):
    """(module, run, batch, step function) of our script, built as step_cost.py builds it."""
    script, flags = SCRIPTS[method]
    module = step_cost.load_script(script)
    margs = tyro.cli(
        module.Args,
        args=[
            "--dataset",
            "synthetic",
            "--image-size",
            str(args.image_size),
            "--imbalance-ratio",
            "10",
            "--amp",
            args.amp,
            "--batch-size",
            str(args.batch_size),
            *flags,
        ],
    )
    run = step_cost.make_run(module, margs, device)
    batch = step_cost.real_batch(module, run, args.batch_size)
    run.model.train()
    return module, run, batch, lambda: module.train_step(run, batch)


def lightly_simsiam_step(run, batch, lightly_loss, heads):
    """Our backbone and optimiser settings under lightly's SimSiam heads and loss (lightly's example loop)."""
    args = run.args
    torch.manual_seed(0)
    backbone = run.model.backbone
    projection = heads.SimSiamProjectionHead(512, args.proj_dim, args.proj_dim).to(run.device)
    prediction = heads.SimSiamPredictionHead(args.proj_dim, args.pred_dim, args.proj_dim).to(run.device)
    modules = nn.ModuleList([backbone, projection, prediction]).train()
    optimizer = torch.optim.SGD(modules.parameters(), lr=0.06, momentum=0.9, weight_decay=args.weight_decay, fused=True)
    criterion = lightly_loss.NegativeCosineSimilarity()
    (x0, x1), _, _ = batch

    def step():
        with run.autocast():
            z0, z1 = projection(backbone(x0)), projection(backbone(x1))
            p0, p1 = prediction(z0), prediction(z1)
            loss = 0.5 * (criterion(z0.detach(), p1) + criterion(z1.detach(), p0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def lightly_msn_step(module, run, batch, lightly_loss, power_law: bool):
    """Our MSN model, AdamW and EMA with lightly's MSNLoss (uniform prior, Sinkhorn) or PMSNLoss (power law)."""
    args, model = run.args, run.model
    if power_law:
        criterion = lightly_loss.PMSNLoss(
            temperature=args.anchor_temp,
            sinkhorn_iterations=0,
            regularization_weight=args.reg_weight,
            power_law_exponent=args.prior_tau,
        )
    else:
        criterion = lightly_loss.MSNLoss(
            temperature=args.anchor_temp,
            sinkhorn_iterations=model.sinkhorn_iters,
            regularization_weight=args.reg_weight,
        )
    views, _, indices = batch

    def step():
        with run.autocast():
            anchor, prototypes = run.train_model(views[1:], indices, run.step)
            target = model.target_forward(views[0])
        loss = criterion(
            anchor.float(), target.float(), prototypes.float(), target_sharpen_temperature=args.target_temp
        )
        online = [*model.encoder.parameters(), *model.head.parameters()]
        module.optimizer_step(run, loss, clip=online, max_norm=args.clip_grad or math.inf)  # as ours: same step
        target_params = [*model.target_encoder.parameters(), *model.target_head.parameters()]
        torch._foreach_lerp_(target_params, [p.detach() for p in online], 1 - run.schedule["ema_momentum"])

    return step


def lightly_transform(method: str, our_transform, transforms):
    """lightly's transform with our view counts, sizes and crop scales (its other defaults)."""
    if method == "simsiam":
        size = our_transform.transform.transforms[0].size[0]
        return transforms.SimSiamTransform(input_size=size, min_scale=our_transform.transform.transforms[0].scale[0])
    crops = our_transform
    return transforms.MSNTransform(
        random_size=crops.global_t.transforms[0].size[0],
        focal_size=crops.local_t.transforms[0].size[0],
        random_views=crops.num_global,
        focal_views=crops.num_local,
        random_crop_scale=crops.global_t.transforms[0].scale,
        focal_crop_scale=crops.local_t.transforms[0].scale,
    )


def main(args: PeersArgs) -> dict:
    if args.batch_size < 2 or args.repeats < 1 or args.image_size < 8:
        raise PeersError("--batch-size must be >= 2, --repeats >= 1 and --image-size >= 8")
    lightly_loss, heads, transforms = import_lightly()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, {args.image_size} px, "
        f"amp {args.amp}",
        flush=True,
    )
    results = {}
    for method in args.methods:
        module, run, batch, ours = our_step(method, args, device)
        t_ours = step_cost.median_time(ours, args.repeats)
        if method == "simsiam":
            theirs = lightly_simsiam_step(run, batch, lightly_loss, heads)
        else:
            theirs = lightly_msn_step(module, run, batch, lightly_loss, method == "pmsn")
        t_lightly = step_cost.median_time(theirs, args.repeats)
        results[method] = {"step_ms": {"ours": 1e3 * t_ours, "lightly": 1e3 * t_lightly}}
        print(f"{method}: step {1e3 * t_ours:.1f} ms ours, {1e3 * t_lightly:.1f} ms lightly", flush=True)
    if args.pipeline_size:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            pipeline.write_jpegs(tmp, args.pipeline_images)
            for method in args.methods:
                if method == "pmsn":  # the same views as msn
                    results[method]["pipeline_ms"] = results["msn"]["pipeline_ms"]
                    continue
                data, ours = pipeline.build_transform(
                    "simsiam" if method == "simsiam" else "msn", tmp, args.pipeline_size
                )
                indices = list(range(len(data.train_full)))
                theirs = lightly_transform(method, ours, transforms)
                results[method]["pipeline_ms"] = {
                    "ours": 1e3 * pipeline.per_core(data, ours, indices, 3),
                    "lightly": 1e3 * pipeline.per_core(data, theirs, indices, 3),
                }
                print(
                    f"{method}: pipeline {results[method]['pipeline_ms']['ours']:.1f} ms/img ours, "
                    f"{results[method]['pipeline_ms']['lightly']:.1f} lightly",
                    flush=True,
                )
    lines = [
        "| method | step ours (ms) | step lightly (ms) | ours / lightly | pipeline ours (ms/img/core) | "
        "pipeline lightly | ours / lightly |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in results.items():
        step, pipe = row["step_ms"], row.get("pipeline_ms")
        cells = [f"{step['ours']:.1f}", f"{step['lightly']:.1f}", f"{step['ours'] / step['lightly']:.2f}"]
        cells += (
            [f"{pipe['ours']:.1f}", f"{pipe['lightly']:.1f}", f"{pipe['ours'] / pipe['lightly']:.2f}"]
            if pipe
            else ["", "", ""]
        )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    print(
        f"\nOurs against lightly ({device}; step: batch {args.batch_size}, {args.image_size} px, amp {args.amp}; "
        f"pipeline: {args.pipeline_size} px, one thread)\n\n" + "\n".join(lines)
    )
    summary = {"args": dict(vars(args)), "device": str(device), "results": results}
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    try:
        main(tyro.cli(PeersArgs, description=__doc__.split("\n\n")[0]))
    except (PeersError, lt_data.DataError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
