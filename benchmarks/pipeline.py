"""What does each training script's data pipeline cost per image, and how many cores does a GPU need to be fed?

For each method, from a JPEG file on disk to the normalised view tensors, through the script's own data path
(lt_data's imagefolder reader, then the script's own train_transform, i.e. every view the method draws):
  ms/img/core   one process, one thread, images decoded and augmented one after another (median of --repeats
                passes over the files, every pass with fresh augmentation draws);
  img/s (N w.)  the script's DataLoader (lt_data.make_loader: persistent workers, prefetch; batch --batch-size)
                with N worker processes, after the first batch;
  cores needed  for --model-rate training images per second (each image with all its views): model rate x
                ms/img/core / 1000. Take the model rate from benchmarks/gpu_check.sh on the GPU you use.
With --breakdown it also prints the cost of each operation of one view of each method's global transform.
Asserts nothing; writes <output> (JSON) with every figure.

The images are real JPEG files: --image-dir an ImageFolder (train/<class>/*.jpg and val/<class>/*.jpg), or by
default --num-images generated ones (500 x 375, quality 90, the size of a typical ImageNet photo: smooth colour
fields plus texture and noise, so the decoder does real work).

    python benchmarks/pipeline.py --image-size 224                    # SimSiam, MSN, ExCB at 224 px
    python benchmarks/pipeline.py --image-size 224 --workers 2 4 --breakdown
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from step_cost import load_script  # noqa: E402

import lt_data  # noqa: E402

SCRIPTS = {
    "supervised": "supervised_baseline.py",
    "simsiam": "simsiam_rwsam.py",
    "msn": "msn_prior.py",
    "excb": "excb.py",
}
# Method flags that only keep the transform buildable on a few images (the transform does not depend on them).
METHOD_FLAGS = {"excb": ["--no-kmeans-init", "--num-clusters", "16"]}


@dataclass
class PipelineArgs:
    """The augmentation pipeline of each training script, per image per core and with DataLoader workers."""

    methods: tuple[Literal["supervised", "simsiam", "msn", "excb"], ...] = ("simsiam", "msn", "excb")
    """training scripts whose train_transform is measured"""
    image_size: int = 224
    """--image-size of the scripts (crop size of the global views; local/focal views follow each script's rule)"""
    image_dir: Optional[str] = None
    """an ImageFolder root of real JPEGs (train/ and val/ class folders); default: generated JPEGs"""
    num_images: int = 64
    """generated JPEGs (without --image-dir)"""
    repeats: int = 3
    """passes over the images per method (the median pass is reported)"""
    workers: tuple[int, ...] = (2,)
    """DataLoader worker counts to measure (none: skip the loader)"""
    batch_size: int = 32
    """DataLoader batch size"""
    model_rate: float = 1000.0
    """training images per second the model consumes (from gpu_check.sh), for the cores-needed column"""
    breakdown: bool = False
    """also time each operation of one global view"""
    compare_torchvision: bool = False
    """also time the same views with torchvision's GaussianBlur (kernel 10% of the size) and ToTensor + Normalize,
    the pipeline before lt_data.GaussianBlur and ToNormalizedTensor: the speed-up measured in the same run"""
    output: str = "pipeline.json"
    """where the figures are written (JSON)"""


def write_jpegs(root: str, n: int, seed: int = 0) -> None:
    """n photo-sized JPEGs (500 x 375) in an ImageFolder of two classes, plus a small val/ split."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for split, count in (("train", n), ("val", 2)):
        for i in range(count):
            folder = os.path.join(root, split, f"c{i % 2}")
            os.makedirs(folder, exist_ok=True)
            phase, freq = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.005, 0.05, 3)
            smooth = np.stack([np.sin(freq[c] * (xx + 1.7 * yy) + phase[c]) for c in range(3)], -1)
            texture = np.sin(0.3 * xx + rng.uniform(0, 6)) * np.sin(0.2 * yy + rng.uniform(0, 6))
            image = 127 + 80 * smooth + 25 * texture[..., None] + rng.normal(0, 8, (375, 500, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def build_transform(method: str, image_dir: str, image_size: int):
    """The script's own data set and train_transform, as its command line builds them."""
    module = load_script(SCRIPTS[method])
    args = tyro.cli(
        module.Args,
        args=[
            "--dataset",
            "imagefolder",
            "--data-dir",
            image_dir,
            "--image-size",
            str(image_size),
            "--imbalance-ratio",
            "1",
            *METHOD_FLAGS.get(method, []),
        ],
    )
    data = lt_data.build_data(args)
    return data, module.train_transform(args, data)


def with_torchvision_ops(transform):
    """A deep copy of the transform with lt_data's GaussianBlur and ToNormalizedTensor replaced by torchvision's
    T.GaussianBlur(kernel 10% of the crop, odd) and T.ToTensor() + T.Normalize (the same distributions)."""
    import copy

    import torchvision.transforms as T

    transform = copy.deepcopy(transform)
    composes = [
        t
        for t in (
            getattr(transform, "transform", None),
            getattr(transform, "global_t", None),
            getattr(transform, "local_t", None),
        )
        if t is not None
    ]
    if hasattr(transform, "crops"):  # ExcbCrops
        composes += [transform.crops.global_t, transform.crops.local_t]
    for compose in composes:
        size = compose.transforms[0].size[0]
        ops = []
        for op in compose.transforms:
            if isinstance(op, T.RandomApply) and isinstance(op.transforms[0], lt_data.GaussianBlur):
                kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
                op = T.RandomApply([T.GaussianBlur(kernel, sigma=op.transforms[0].sigma)], p=op.p)
            if isinstance(op, lt_data.ToNormalizedTensor):
                ops += [T.ToTensor(), T.Normalize(op.mean, op.std)]
                continue
            ops.append(op)
        compose.transforms = ops
    return transform


def views_of(sample) -> list[torch.Tensor]:
    return sample if isinstance(sample, list) else [sample]


def per_core(data, transform, indices: list[int], repeats: int) -> float:
    """Median over passes of the seconds per image: decode + every view, one thread."""
    passes = []
    for r in range(repeats):
        torch.manual_seed(r)
        start = time.perf_counter()
        for i in indices:
            views_of(transform(data.train_full.image(i)))
        passes.append((time.perf_counter() - start) / len(indices))
    return statistics.median(passes)


def with_workers(data, transform, indices: list[int], workers: int, batch_size: int, passes: int) -> float:
    """Images per second through the script's DataLoader with this many workers, after the first batch."""
    dataset = lt_data.IndexedDataset(data.train_full, indices, transform)
    sampler = lt_data.ResumableSampler(len(dataset), seed=0)
    loader = lt_data.make_loader(dataset, min(batch_size, len(dataset)), workers, sampler, drop_last=True)
    seen, start = 0, None
    for epoch in range(passes + 1):
        sampler.set_epoch(epoch)
        for batch in loader:
            if start is None:  # after the first batch: workers started, prefetch under way
                start = time.perf_counter()
                continue
            seen += batch[0][0].shape[0] if isinstance(batch[0], list) else batch[0].shape[0]
    return seen / (time.perf_counter() - start)


def breakdown(data, transform, indices: list[int]) -> list[tuple[str, float]]:
    """ms per view of each operation of the first global view's Compose (RandomApply: averaged over its p)."""
    compose = transform
    while not hasattr(compose, "transforms"):  # TwoViews / MultiCrop / ExcbCrops wrap a Compose
        compose = getattr(compose, "transform", None) or getattr(compose, "global_t", None) or compose.crops
    costs = [0.0] * len(compose.transforms)
    torch.manual_seed(0)
    for i in indices:
        x = data.train_full.image(i)
        for k, op in enumerate(compose.transforms):
            start = time.perf_counter()
            x = op(x)
            costs[k] += time.perf_counter() - start
    return [(repr(op).replace("\n", " ")[:90], 1000 * c / len(indices)) for op, c in zip(compose.transforms, costs)]


def main(args: PipelineArgs) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        image_dir = args.image_dir
        if image_dir is None:
            image_dir = tmp
            write_jpegs(tmp, args.num_images)
        results = {}
        for method in args.methods:
            data, transform = build_transform(method, image_dir, args.image_size)
            indices = list(range(len(data.train_full)))
            views = views_of(transform(data.train_full.image(0)))
            seconds = per_core(data, transform, indices, args.repeats)
            row = {
                "views": [list(v.shape[-2:]) for v in views],
                "ms_per_image_per_core": 1000 * seconds,
                "images_per_s_per_core": 1 / seconds,
                "cores_needed": args.model_rate * seconds,
                "workers": {
                    w: with_workers(data, transform, indices, w, args.batch_size, args.repeats) for w in args.workers
                },
            }
            if args.breakdown:
                row["breakdown_ms_per_view"] = breakdown(data, transform, indices)
            if args.compare_torchvision:
                before = 1000 * per_core(data, with_torchvision_ops(transform), indices, args.repeats)
                row["torchvision_ops_ms_per_image_per_core"] = before
                print(
                    f"{method}: with torchvision's blur and ToTensor + Normalize {before:.1f} ms/img/core, "
                    f"{before / row['ms_per_image_per_core']:.1f}x",
                    flush=True,
                )
            results[method] = row
            print(
                f"{method}: {len(views)} views {' + '.join(f'{h}x{w}' for h, w in row['views'])}: "
                f"{row['ms_per_image_per_core']:.1f} ms/img/core",
                flush=True,
            )
    header = [
        "method",
        "views",
        "ms/img/core",
        "img/s/core",
        *(f"img/s ({w} workers)" for w in args.workers),
        f"cores for {args.model_rate:g} img/s",
    ]
    if args.compare_torchvision:
        header += ["ms/img/core, torchvision blur + ToTensor", "speed-up"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in results.items():
        sizes = {}
        for h, _ in row["views"]:
            sizes[h] = sizes.get(h, 0) + 1
        cells = [
            method,
            " + ".join(f"{n} x {s}" for s, n in sizes.items()),
            f"{row['ms_per_image_per_core']:.1f}",
            f"{row['images_per_s_per_core']:.0f}",
            *(f"{row['workers'][w]:.0f}" for w in args.workers),
            f"{row['cores_needed']:.1f}",
        ]
        if args.compare_torchvision:
            before = row["torchvision_ops_ms_per_image_per_core"]
            cells += [f"{before:.1f}", f"{before / row['ms_per_image_per_core']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    print(
        f"\nPipeline at {args.image_size} px, JPEG decode to normalised views "
        f"({'generated' if args.image_dir is None else args.image_dir}; {os.cpu_count()} CPUs here)\n"
    )
    print("\n".join(lines))
    for method, row in results.items():
        if "breakdown_ms_per_view" in row:
            print(f"\n{method}, one global view, ms per operation:")
            for name, ms in row["breakdown_ms_per_view"]:
                print(f"  {ms:7.2f}  {name}")
    summary = {"args": {k: v for k, v in vars(args).items()}, "cpus": os.cpu_count(), "results": results}
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main(tyro.cli(PipelineArgs, description=__doc__.split("\n\n")[0]))
