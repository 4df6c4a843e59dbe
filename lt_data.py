"""Long-tailed datasets, their balanced twins, shot groups and SSL views.

Shared by every training script and by ``linear_probe.py``. Run it to inspect a split:

    python lt_data.py --dataset cifar10 --imbalance-ratio 100
    python lt_data.py --dataset synthetic --synthetic-classes 20 --imbalance-profile step

Datasets (``--dataset``):
  cifar10, cifar100  torchvision's on-disk python format under ``--data-dir``.
  fashion-mnist      the four IDX files (``.gz`` or not) in ``--data-dir`` (Debian's dataset-fashion-mnist
                     puts them in /usr/share/datasets/fashion-mnist) or torchvision's ``FashionMNIST/raw/``.
  imagenet-lt        OLTR split files (``relative/path label`` lines) over an image root.
  imagefolder        ``--data-dir`` holding ``train/`` and ``val/`` folders of class folders.
  synthetic          procedurally generated, class-structured images; no files, no download.

Long-tail construction (Cao et al. 2019, "LDAM"): class i keeps int(n_max * r^(-i/(C-1)))
images (``exp``) or half the classes keep n_max and half n_max/r (``step``); which images
is a seeded per-class choice. The *balanced twin* has the same total and uniform class
counts, drawn from the same call (Liu et al. 2022 compare pre-training on both).

Every training sample is returned as ``(views, label, index)`` where ``index`` is the
sample's position in the pre-training set (0..N-1), so per-example weights can be indexed.
"""

from __future__ import annotations

import ast
import errno
import gc
import gzip
import inspect
import math
import os
import pickle
import re
import shutil
import signal
import stat
import sys
import textwrap
import zlib
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Optional, Sequence, get_args, get_type_hints

import numpy as np
import torch
import torchvision.transforms as T
import tyro
from PIL import Image, ImageFilter
from torchvision.datasets.folder import IMG_EXTENSIONS

DatasetName = Literal["cifar10", "cifar100", "fashion-mnist", "imagenet-lt", "imagefolder", "synthetic"]
DATASETS = get_args(DatasetName)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,) * 3, (0.3530,) * 3
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class DataError(ValueError):
    """Bad flags or data files; scripts print the message as one line and exit 2."""


# The range of every numeric data flag (``check_ranges``); the scripts and the probe add theirs. 0 is in a range only
# where it means 0 (tests/test_scripts.py checks that every numeric flag of every program has a range).
RANGES = dict(imbalance_ratio="[1, inf)", split_seed="[0, 4294967296)", image_size="[8, inf)")
RANGES |= dict(synthetic_classes="[2, inf)", synthetic_per_class="[1, inf)", synthetic_test_per_class="[1, inf)")


def check_ranges(args, ranges: dict[str, str]) -> None:
    """Raise DataError, in one line naming the flag, for the first flag of ``args`` outside its interval in ``ranges``
    (``"[1, inf)"``, ``"(0, 1]"``, ...; nan is outside every interval; ``"[2, inf): why"`` adds why to the message);
    None (unset) passes; each value of a tuple flag is checked. The seed's range, [0, 2**32), is numpy's (the seed
    reaches every generator)."""
    for name, spec in ranges.items():
        interval, _, why = spec.partition(": ")
        lo, hi = (float(v) for v in interval[1:-1].split(","))
        words = (f">= {lo:g}" if interval[0] == "[" else f"> {lo:g}") if hi == math.inf else f"in {interval}"
        value = getattr(args, name)
        for v in [v for v in (value if isinstance(value, tuple) else [value]) if v is not None]:
            if not ((lo < v or interval[0] == "[" and v == lo) and (v < hi or interval[-1] == "]" and v == hi)):
                raise DataError(f"--{name.replace('_', '-')} must be {words}{f' ({why})' if why else ''}, got {v}")


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that are not UTF-8 (which Python decodes to lone surrogates, PEP 383)
    written as backslash escapes (``caf\\xe9``): what TensorBoard, JSON and the logs can hold."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class QuietWhenClosed:
    """A text stream that goes quiet (to os.devnull) once its reader has closed the pipe (``script --help | head``)
    instead of raising BrokenPipeError in the middle of the work, and writes the undecodable bytes of a file name as
    backslash escapes instead of raising UnicodeEncodeError."""

    def __init__(self, stream):
        self.stream = stream
        if hasattr(stream, "reconfigure"):  # a terminal whose encoding is not UTF-8 (pytest's captures have none)
            stream.reconfigure(errors="backslashreplace")

    def write(self, text: str) -> int:
        try:
            return self.stream.write(printable(text))
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())  # also what is still buffered
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


def quiet_when_closed() -> None:
    """Wrap sys.stdout and sys.stderr in QuietWhenClosed (once): every program's first call, before --help."""
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), QuietWhenClosed):
            setattr(sys, name, QuietWhenClosed(getattr(sys, name)))


def error_line(e: BaseException) -> str:
    """The one line to print for an error, also when a DataLoader worker re-raised it wrapped in its traceback
    ("Caught DataError in DataLoader worker process 0. Original Traceback ...": the message is the last line)."""
    text = str(e).strip()
    if "Original Traceback" in text:
        kind, _, message = text.splitlines()[-1].partition(": ")
        text = message if kind.endswith(("Error", "Exception")) else text.splitlines()[-1]
    return text


def resolved_later(hint: str, metavar: str):
    """A flag whose None default is resolved at run time: --help states the rule, not "(default: None)"."""
    return tyro.conf.arg(metavar=metavar, help_behavior_hint=f"(default: {hint})")


def help_from_docstrings(cls):
    """Class decorator: each flag's attribute docstring reaches --help as flowing text, whatever its line breaks.

    tyro 1.0.17 joins a docstring's lines before it dedents them, and keeps a line break before any line that does not
    start with a letter: every indented continuation line became a hard break in --help, mid-sentence. This gives tyro
    the same text through its public API, ``tyro.conf.arg(help=...)``, as paragraphs (a blank line in a docstring
    still separates two) of single-spaced words, merged with the field's other ``tyro.conf.arg`` settings."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    hints = get_type_hints(cls, include_extras=True)
    for field, doc in zip(body, body[1:]):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", str(doc.value.value)))
            text = "\n\n".join(p for p in paragraphs if p)
            cls.__annotations__[field.target.id] = Annotated[hints[field.target.id], tyro.conf.arg(help=text)]
    return cls


@help_from_docstrings
@dataclass
class DataArgs:
    """Data flags shared by every training script and the probe."""

    dataset: DatasetName = "cifar10"
    """which data set: cifar10/cifar100 (torchvision's python format), fashion-mnist (IDX files), imagenet-lt (split
    files over an image root), imagefolder (train/ and val/ class folders), synthetic (generated, no files)"""
    data_dir: str = "data"
    """root of the data: CIFAR's parent folder of cifar-10-batches-py, the folder of Fashion-MNIST's IDX files (or of
    FashionMNIST/raw/), the image root for imagenet-lt, the folder holding train/ and val/ for imagefolder"""
    split_file: Optional[str] = None
    """imagenet-lt: training split file of `relative/path label` lines (e.g. ImageNet_LT_train.txt)"""
    test_split_file: Optional[str] = None
    """imagenet-lt: evaluation split file; default: the --split-file name with 'train' replaced by 'test'"""
    index_file: Optional[str] = None
    """optional text file of training-set indices (whitespace separated) that replaces the long-tail construction, e.g.
    SDCLR/BCL split files"""
    imbalance_ratio: Annotated[
        Optional[float], resolved_later("100 for cifar/fashion-mnist/synthetic, 1 for imagenet-lt/imagefolder", "FLOAT")
    ] = None
    """head/tail class-size ratio r >= 1 (1: the data as is)"""
    imbalance_profile: Literal["exp", "step"] = "exp"
    """exp: class i keeps int(n_max * r^(-i/(C-1))); step: first half of the classes keep n_max, the rest
    int(n_max/r)"""
    balanced_twin: bool = False
    """pre-train on the balanced twin: same total size as the long-tailed set, uniform class counts"""
    split_seed: int = 0
    """seed of the per-class choice of images (0 is the field's reference)"""
    synthetic_classes: int = 10
    """synthetic: number of classes"""
    synthetic_per_class: int = 500
    """synthetic: training images per class before long-tail subsampling (n_max)"""
    synthetic_test_per_class: int = 100
    """synthetic: test images per class"""
    image_size: Annotated[
        Optional[int],
        resolved_later("32 for cifar/synthetic, 28 for fashion-mnist, 224 for imagenet-lt/imagefolder", "INT"),
    ] = None
    """input resolution"""
    download: bool = True
    """download CIFAR or Fashion-MNIST when it is missing and the network allows it"""


# --------------------------------------------------------------------------- long-tail counts


def long_tail_counts(
    n_max: int | Sequence[int], num_classes: int, imbalance_ratio: float, profile: str = "exp"
) -> list[int]:
    """Per-class image counts of the standard long-tailed construction.

    exp:  n_i = int(n_max * (1/r) ** (i / (C - 1)))   (Cao et al. 2019; CIFAR-10-LT r=100 -> 5000 ... 50)
    step: n_i = n_max for i < C/2, int(n_max / r) otherwise.
    ``n_max`` may be a list of available images per class; counts never exceed it and are at least 1
    (only tiny test sets reach that floor: CIFAR-100 at r=100 keeps 5 images in its tail class).
    """
    if imbalance_ratio < 1:
        raise DataError(f"--imbalance-ratio must be >= 1 (head/tail size ratio), got {imbalance_ratio}")
    if profile not in ("exp", "step"):
        raise DataError(f"--imbalance-profile must be exp or step, got {profile!r}")
    available = [n_max] * num_classes if isinstance(n_max, int) else list(n_max)
    head = max(available)
    counts = []
    for i in range(num_classes):
        if profile == "exp":
            n = int(head * (1 / imbalance_ratio) ** (i / max(num_classes - 1, 1)))
        else:
            n = head if i < num_classes // 2 else int(head / imbalance_ratio)
        counts.append(min(max(n, 1), available[i]))
    return counts


def balanced_counts(total: int, num_classes: int) -> list[int]:
    """Uniform class counts summing to ``total`` (the remainder goes to the first classes)."""
    base, rest = divmod(total, num_classes)
    return [base + (1 if i < rest else 0) for i in range(num_classes)]


def select_per_class(targets: Sequence[int], counts: Sequence[int], seed: int) -> list[int]:
    """A seeded random choice of ``counts[c]`` indices of each class c, returned sorted."""
    by_class: list[list[int]] = [[] for _ in counts]
    for i, y in enumerate(targets):
        by_class[y].append(i)
    g = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c, (pool, n) in enumerate(zip(by_class, counts)):
        if n > len(pool):
            raise DataError(f"class {c} has {len(pool)} images, {n} requested")
        perm = torch.randperm(len(pool), generator=g)[:n].tolist()
        chosen.extend(pool[j] for j in perm)
    return sorted(chosen)


def class_histogram(targets: Sequence[int], num_classes: int) -> list[int]:
    return torch.bincount(torch.as_tensor(list(targets), dtype=torch.long), minlength=num_classes).tolist()


def shot_groups(class_counts: Sequence[int], rule: str = "thirds") -> dict[str, list[int]]:
    """Many / medium / few classes of a long-tailed training set.

    thresholds (ImageNet-LT, OLTR convention): many > 100 images, few < 20, medium 20..100 inclusive.
    thirds (SDCLR/BCL CIFAR convention): classes sorted by count (descending, ties by class
    index), split into thirds; with C = 3q+m the first m extra classes go to many, then medium.
    """
    C = len(class_counts)
    if rule == "thresholds":
        return {
            "many": [c for c in range(C) if class_counts[c] > 100],
            "medium": [c for c in range(C) if 20 <= class_counts[c] <= 100],
            "few": [c for c in range(C) if class_counts[c] < 20],
        }
    order = sorted(range(C), key=lambda c: (-class_counts[c], c))
    q, m = divmod(C, 3)
    sizes = [q + (m > 0), q + (m > 1), q]
    return {
        "many": sorted(order[: sizes[0]]),
        "medium": sorted(order[sizes[0] : sizes[0] + sizes[1]]),
        "few": sorted(order[sizes[0] + sizes[1] :]),
    }


# --------------------------------------------------------------------------- base image sets


class ImageSet:
    """A list of labelled images: ``targets`` and ``image(i) -> PIL.Image``."""

    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError


class ArrayImages(ImageSet):
    """Images held in memory as a uint8 array [N, H, W, 3] (CIFAR) or [N, H, W] (grey, returned as RGB)."""

    def __init__(self, array, targets: list[int]):
        self.array, self.targets = array, targets

    def image(self, i: int) -> Image.Image:
        img = Image.fromarray(self.array[i])
        return img if img.mode == "RGB" else img.convert("RGB")


class FileImages(ImageSet):
    """Images read from files: ``files[i]`` is the path of image i relative to ``root`` (the training-set fingerprint
    hashes these), ``targets[i]`` its label."""

    def __init__(self, root: str, files: list[str], targets: list[int]):
        self.root, self.files, self.targets = root, files, targets

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def image(self, i: int) -> Image.Image:
        """The decoded image; DataError naming the file if it cannot be read or decoded (unreadable, empty, truncated,
        not an image): indexing stats no file, so these are found here, when the image is first read."""
        path = self.path(i)
        try:
            with open(path, "rb") as f:
                try:
                    img = Image.open(f)
                    img.load()  # decoded while the file is open
                except Exception:
                    if os.fstat(f.fileno()).st_size == 0:
                        raise DataError(f"cannot read image {path}: the file is empty (0 bytes)") from None
                    raise
                return to_rgb(img, path)
        except DataError:
            raise
        except OSError as e:
            if e.errno is None:  # Pillow's own OSErrors ("image file is truncated"): no errno, the message says it
                raise DataError(f"cannot read image {path}: {_first_line(e)}") from None
            raise DataError(f"cannot read image {path}: {os_reason(path, e)}") from None
        except Exception as e:
            raise DataError(f"cannot read image {path}: {_first_line(e)}") from None


def to_rgb(img: Image.Image, path: str) -> Image.Image:
    """8-bit RGB from any mode Pillow opens. 16-bit grey (I;16, I;16B, ...) is scaled by 255/65535: convert("RGB")
    clips it, so that 100/255 (25,700) read as white. 32-bit integer (I) and float (F) pixels have no agreed range:
    refused with DataError naming the mode."""
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img).astype(np.float32) * (255 / 65535)).round().astype(np.uint8))
    elif img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DataError(
            f"cannot read image {path}: mode {img.mode} ({kind} pixels) has no 0..255 range; save 8 or 16 bit"
        )
    return img if img.mode == "RGB" else img.convert("RGB")


def _first_line(e: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), or its type's name if it has none."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def read_text(path: str, what: str = "list file") -> str:
    """A list file (split, index) in the encodings editors save: UTF-8 with or without a BOM, UTF-16 and UTF-32 with
    their BOM (Windows Notepad's "Unicode"), else Latin-1 (any byte decodes; a wrong guess shows as a named file
    that is not found: ``not_utf8_line`` says where the first non-UTF-8 byte is). DataError naming the file when it
    cannot be read (``what`` names it: "split file", "index file")."""
    return _decode_text(path, what)[0]


def _decode_text(path: str, what: str) -> tuple[str, Optional[int]]:
    """(text, the line of the first byte that is not UTF-8, or None) of a list file; see read_text."""
    check_path(path, what)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {os_reason(path, e)}") from None
    for bom, encoding in (
        (b"\xff\xfe\x00\x00", "utf-32"),
        (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"),
        (b"\xfe\xff", "utf-16"),
    ):
        if raw.startswith(bom):
            try:
                return raw.decode(encoding), None
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{what} {path}: starts with a {encoding.upper()} byte-order mark but is not {encoding.upper()} "
                    f"text (byte {e.start}: {e.reason})"
                ) from None
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return raw.decode("latin-1"), raw[: e.start].count(b"\n") + 1


def _prefixes(path: str) -> list[str]:
    """``path`` and the folders above it as the user wrote them, shortest first: a/b/c -> a, a/b, a/b/c."""
    parts, head = [], path
    while True:
        parts.append(head)
        up = os.path.dirname(head)
        if not up or up == head:
            return parts[::-1]
        head = up


def _stat_errno(path: str) -> int:
    try:
        os.stat(path)
        return 0
    except OSError as e:
        return e.errno or -1


def os_reason(path: str, e: OSError) -> str:
    """What is wrong with ``path``, to follow "{path}: ", from the OSError's errno rather than assumed missing: "it is a
    symbolic-link loop" (ELOOP; or "F is a symbolic-link loop" for the folder F above it that is one), "it is a
    symbolic link to T, which is not there", "not found", "F is not a folder" (ENOTDIR: the file F in the way), "it is
    a folder, not a file", else the OS's words ("Permission denied")."""

    def first(test) -> Optional[str]:
        return next((p for p in _prefixes(path) if test(p)), None)

    def name(p: Optional[str], phrase: str) -> str:
        return f"it {phrase}" if p is None or p == path else f"{p} {phrase}"

    if e.errno == errno.ELOOP:
        return name(first(lambda p: _stat_errno(p) == errno.ELOOP), "is a symbolic-link loop")
    if e.errno == errno.ENOENT:
        link = first(lambda p: os.path.islink(p) and _stat_errno(p) == errno.ENOENT)
        if link is None:
            return "not found"
        return name(link, f"is a symbolic link to {os.readlink(link)}, which is not there")
    if e.errno == errno.ENOTDIR:
        return name(first(lambda p: p != path and os.path.exists(p) and not os.path.isdir(p)), "is not a folder")
    if e.errno == errno.EISDIR:
        return "it is a folder, not a file"
    return e.strerror or _first_line(e)


def check_path(path: str, what: str, folder: bool = False, missing_ok: bool = False, hint: str = "") -> bool:
    """DataError unless ``path`` is there as a file (``folder``: a folder) that can be stat-ed: "{what} not found:
    {path}{hint}" when it is simply not there (``missing_ok``: False is returned instead), else "{what} {path}:
    <os_reason>" (a symbolic-link loop, a dangling link, a file in the way, no permission, a folder for a file)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        reason = os_reason(path, e)
        if reason == "not found":
            if missing_ok:
                return False
            raise DataError(f"{what} not found: {path}{hint}") from None
        raise DataError(f"{what} {path}: {reason}") from None
    if folder and not stat.S_ISDIR(mode):
        raise DataError(f"{what} {path}: it is a file, not a folder")
    if not folder and stat.S_ISDIR(mode):
        raise DataError(f"{what} {path}: it is a folder, not a file")
    return True


class SyntheticImages(ImageSet):
    """Procedurally generated, class-structured images, deterministic by (seed, split, index).

    Class c is an oriented periodic pattern with its own orientation (in [0, pi/2], mirrored at
    random per image so horizontal flips keep the class), spatial frequency and edge sharpness.
    Each image draws its phase, two colours, contrast, an occluding rectangle and pixel noise at
    random, so the mean colour carries no class information and neighbouring classes overlap:
    learnable, but not trivially.
    """

    def __init__(self, num_classes: int, per_class: int, image_size: int, seed: int, train: bool):
        if num_classes < 2 or per_class < 1 or image_size < 8:
            raise DataError("synthetic data needs >= 2 classes, >= 1 image per class and --image-size >= 8")
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.rand(num_classes, generator=g) * (math.pi / 2)
        self.freq = 1.5 + 3.5 * torch.rand(num_classes, generator=g)  # cycles per image
        self.sharp = 1.0 + 5.0 * torch.rand(num_classes, generator=g)
        self.size, self.seed, self.split = image_size, seed, 0 if train else 1
        self.targets = [i % num_classes for i in range(num_classes * per_class)]
        ax = torch.linspace(-0.5, 0.5, image_size)
        self.yy, self.xx = torch.meshgrid(ax, ax, indexing="ij")

    def image(self, i: int) -> Image.Image:
        c = self.targets[i]
        g = torch.Generator().manual_seed(((self.seed * 2 + self.split) * 1_000_003 + i) % (2**63))
        r = torch.rand(12, generator=g)
        theta = self.theta[c] + 0.08 * (r[0] - 0.5)
        theta = torch.where(r[1] < 0.5, theta, math.pi - theta)
        freq = self.freq[c] * (0.9 + 0.2 * r[2])
        u = self.xx * torch.cos(theta) + self.yy * torch.sin(theta)
        wave = torch.tanh(self.sharp[c] * torch.sin(2 * math.pi * (freq * u + r[3])))
        wave = wave * (0.5 + 0.5 * r[4])
        a, b = torch.rand(3, generator=g), torch.rand(3, generator=g)
        img = a[:, None, None] * (1 + wave) / 2 + b[:, None, None] * (1 - wave) / 2
        s = self.size
        h, w = int(r[5] * s / 2), int(r[6] * s / 2)
        y0, x0 = int(r[7] * (s - h)), int(r[8] * (s - w))
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g)
        img = img + 0.08 * torch.randn(img.shape, generator=g)
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
        return Image.fromarray(arr.numpy())


def _read_cifar(root: str, name: str, train: bool, download: bool) -> ArrayImages:
    """CIFAR in torchvision's on-disk format (the 'python version' pickles)."""

    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    files = (
        ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"])
        if name == "cifar10"
        else (["train"] if train else ["test"])
    )
    paths = [os.path.join(root, folder, f) for f in files]
    check_path(root, "--data-dir", folder=True, missing_ok=True)  # a loop, a file, no permission: not "missing"
    if not all([check_path(p, f"{name} file", missing_ok=True) for p in paths]):
        if download:
            created = _missing_ancestor(root)  # the download makes it; a failed one must not leave it behind
            before = set(os.listdir(root)) if created is None else set()
            try:
                import torchvision.datasets as D

                (D.CIFAR10 if name == "cifar10" else D.CIFAR100)(root, train=train, download=True)
            except Exception as e:  # offline: say where the files go
                _remove_new(root, created, before)
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(
                    f"{name} not found in {os.path.join(root, folder)} and the download failed "
                    f"({reason}); put the extracted python-version archive there "
                    f"(--data-dir {root}) or use --dataset synthetic"
                ) from None
        else:
            raise DataError(
                f"{name} not found in {os.path.join(root, folder)}; put the extracted python-version "
                f"archive there, pass --download, or use --dataset synthetic"
            )
    arrays, targets = [], []
    for p in paths:
        data, labels = _read_cifar_batch(p, "labels" if name == "cifar10" else "fine_labels")
        arrays.append(data)
        targets.extend(labels)
    return ArrayImages(np.concatenate(arrays).transpose(0, 2, 3, 1).copy(), targets)


def _read_cifar_batch(path: str, key: str) -> tuple[np.ndarray, list[int]]:
    """One batch of CIFAR's python version: a pickled dict whose ``data`` is N rows of 3x32x32 uint8 (or such an
    array) and ``key`` (labels / fine_labels) N integer labels. DataError naming the file when it cannot be read,
    is not such a pickle (truncated, another format), lacks a key or holds other shapes."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except OSError as e:
        raise DataError(f"cannot read {path}: {os_reason(path, e)}") from None
    except Exception as e:  # not a pickle, truncated (EOFError, UnpicklingError), a class it cannot find
        raise DataError(f"cannot read {path}: not a CIFAR python batch ({_first_line(e)})") from None
    if not isinstance(entry, dict) or "data" not in entry or key not in entry:
        found = f"keys {', '.join(map(repr, list(entry)[:6]))}" if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{path} is not a CIFAR python batch: expected a dict with 'data' and {key!r}, found {found}")
    try:
        data = np.asarray(entry["data"])
        labels = np.asarray(entry[key])
    except Exception as e:
        raise DataError(f"{path}: unreadable 'data' or {key!r} ({_first_line(e)})") from None
    if data.dtype != np.uint8 or data.ndim not in (2, 4) or data.shape[1:] not in ((3072,), (3, 32, 32)):
        raise DataError(f"{path}: 'data' must be N rows of 3x32x32 uint8 pixels, found {data.dtype} {data.shape}")
    if len(data) == 0:
        raise DataError(f"{path}: 'data' holds no images")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DataError(
            f"{path}: {key!r} must be {len(data)} integer labels (one per row of 'data'), found {labels.dtype} "
            f"{labels.shape}"
        )
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: {key!r} holds a negative label ({labels.min()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(int).tolist()


def _missing_ancestor(path: str) -> Optional[str]:
    """The outermost folder of ``path`` that does not exist yet (``path`` itself or a parent), None if it exists."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        top, path = path, os.path.dirname(path)
    return top


def _remove_new(root: str, created: Optional[str], before: set) -> None:
    """Undo a failed download: the folders it created, or the entries it added to an existing ``root``."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for entry in set(os.listdir(root)) - before:
        target = os.path.join(root, entry)
        shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.remove(target)


FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str):
    """One IDX file (LeCun's MNIST format, optionally gzipped) as a numpy array: magic 0x0000 <dtype 0x08 = uint8>
    <ndim>, then ndim big-endian uint32 sizes, then the data. Raises DataError naming the file: unreadable, a damaged
    or truncated gzip stream, another magic, a short header or payload."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        if e.errno is None:  # gzip's own: not a gzip file, CRC check failed
            raise DataError(f"cannot read {path}: damaged gzip file ({_first_line(e)})") from None
        raise DataError(f"cannot read {path}: {os_reason(path, e)}") from None
    except EOFError:
        raise DataError(f"cannot read {path}: the gzip stream is truncated") from None
    except zlib.error as e:
        raise DataError(f"cannot read {path}: damaged gzip file ({_first_line(e)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] < 1:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing: empty file'})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path}: the IDX header of {ndim} sizes is cut off ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    count = math.prod(shape)
    if len(raw) != offset + count:
        raise DataError(f"{path}: header says {shape} ({count} bytes), the file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _find_fashion_mnist(root: str, train: bool) -> Optional[list[str]]:
    """Paths of the (images, labels) IDX files in ``root`` or torchvision's ``root/FashionMNIST/raw``, or None."""
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        found = []
        for name in FASHION_MNIST_FILES[train]:
            path = next(  # a broken one counts as there: read_idx names what is wrong with it
                (p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz")) if _there(p)), None
            )
            found.append(path)
        if all(found):
            return found
    return None


def _there(path: str) -> bool:
    """``path`` is there, usable or not (a symbolic-link loop, a dangling link, a folder, no permission): only a
    plain absence is False."""
    return os.path.lexists(path) or _stat_errno(path) not in (errno.ENOENT, errno.ENOTDIR)


def fashion_mnist_root(data_dir: str) -> str:
    """--data-dir, or Debian's folder (apt-get install dataset-fashion-mnist) when --data-dir is the default and
    does not hold the files: the main job needs no --data-dir where the package is installed."""
    default = data_dir == DataArgs.data_dir and not _find_fashion_mnist(data_dir, True)
    return FASHION_MNIST_DEBIAN if default and _find_fashion_mnist(FASHION_MNIST_DEBIAN, True) else data_dir


def _read_fashion_mnist(root: str, train: bool, download: bool) -> ArrayImages:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training / 10,000 test 28x28 grey images of 10 classes."""
    check_path(root, "--data-dir", folder=True, missing_ok=True)  # a loop, a file, no permission: not "missing"
    paths = _find_fashion_mnist(root, train)
    if paths is None and download:
        created = _missing_ancestor(root)  # the download makes it; a failed one must not leave it behind
        before = set(os.listdir(root)) if created is None else set()
        try:
            import torchvision.datasets as D

            D.FashionMNIST(root, train=train, download=True)
        except Exception as e:  # offline: say where the files go
            _remove_new(root, created, before)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"fashion-mnist not found in {root} and the download failed ({reason}); "
                f"apt-get install dataset-fashion-mnist (read from {FASHION_MNIST_DEBIAN} without --data-dir), "
                f"or put the four IDX files in {root}"
            ) from None
        paths = _find_fashion_mnist(root, train)
    if paths is None:
        raise DataError(
            f"fashion-mnist not found in {root} (expected {FASHION_MNIST_FILES[train][0]}[.gz] there "
            f"or in {os.path.join(root, 'FashionMNIST', 'raw')}); apt-get install dataset-fashion-mnist "
            f"(read from {FASHION_MNIST_DEBIAN} without --data-dir), or pass --download"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or 0 in images.shape[1:]:
        raise DataError(f"{paths[0]}: expected images [N, H, W], the IDX header says {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{paths[1]}: expected labels [N], the IDX header says {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{paths[0]} and {paths[1]} do not hold N images [N, H, W] and N labels "
            f"(shapes {images.shape} and {labels.shape})"
        )
    return ArrayImages(images, labels.astype(int).tolist())


def _read_split_file(root: str, split_file: str) -> FileImages:
    """The ``relative/path label`` lines of an OLTR split file. Every listed image must exist: checked against one
    listing of each folder the file names, not a stat per image (a network file system answers a listing in one
    round trip, a stat in one each; ImageNet-LT names 1,000 folders for 115,846 images). DataError naming the file and
    line of the first fault: no label, a label that is not a non-negative integer, an image not there."""
    text, not_utf8 = _decode_text(split_file, "split file")
    files, targets, lines = [], [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{split_file}:{lineno}: expected 'relative/path label', got {line.strip()[:200]!r}")
        try:
            label = int(parts[1]) if parts[1].isascii() else None
        except ValueError:
            label = None
        if label is None or label < 0:
            raise DataError(
                f"{split_file}:{lineno}: the label must be an integer >= 0 (expected 'relative/path label'), "
                f"got {parts[1][:50]!r}"
            )
        files.append(parts[0])
        targets.append(label)
        lines.append(lineno)
    if not files:
        raise DataError(f"split file {split_file} lists no images")
    check_path(root, "--data-dir", folder=True)
    listings: dict[str, set[str]] = {}
    missing = []
    for k, rel in enumerate(files):
        folder, _, name = rel.rpartition("/")
        if folder not in listings:
            listings[folder] = _listing(os.path.join(root, folder))
        if name not in listings[folder]:
            missing.append(k)
    if missing:
        rel, lineno = files[missing[0]], lines[missing[0]]
        path = os.path.join(root, rel)
        try:
            os.stat(path)
            why = ""
        except OSError as e:
            why = os_reason(path, e)
            why = "" if why == "not found" else f": {path}: {why}"
        encoding = (
            f"; the file is not UTF-8 (line {not_utf8}) and was read as Latin-1: save it as UTF-8"
            if not_utf8 is not None
            else "; check --data-dir"
        )
        raise DataError(
            f"{split_file}:{lineno}: {len(missing)} listed images not found under {root} (first: {rel}){why}{encoding}"
        )
    return FileImages(root, files, targets)


def _listing(folder: str) -> set[str]:
    """The names in ``folder`` (none if it is missing) but symbolic links whose target is not there or that loop
    (only links are stat-ed; the caller names what is wrong with a listed one)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if not e.is_symlink() or os.path.exists(e.path)}
    except OSError as e:
        reason = os_reason(folder, e)
        if reason == "not found" or e.errno == errno.ENOTDIR:
            return set()
        raise DataError(f"cannot list {folder}: {reason}") from None


def _entries(folder: str) -> tuple[list[str], list[str], set[str]]:
    """(sub-folders, image files, the sub-folders that are symbolic links) of ``folder`` by name, from one listing:
    the entries' types come with it, so only symbolic links are stat-ed (followed, as torchvision's ImageFolder does;
    DataError naming one whose target is missing, a storage mount that is not there, or that is a symbolic-link
    loop). Hidden entries (macOS ``._x.png``, ``.DS_Store``, ``.ipynb_checkpoints/``) are never images or classes."""
    folders, images, linked = [], [], set()
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                link = e.is_symlink()
                code = _stat_errno(e.path) if link else 0
                if code == errno.ENOENT:
                    raise DataError(f"{e.path} is a symbolic link to {os.readlink(e.path)}, which is not there")
                if code == errno.ELOOP:
                    raise DataError(f"{e.path} is a symbolic-link loop")
                if code:
                    raise DataError(f"{e.path}: {os.strerror(code)}")
                if e.is_dir():
                    folders.append(e.name)
                    if link:
                        linked.add(e.name)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    images.append(e.name)
    except OSError as e:
        raise DataError(f"cannot list {folder}: {os_reason(folder, e)}") from None
    return sorted(folders), sorted(images), linked


def _loop_check(path: str, parent_real: str, chain: tuple[str, ...]) -> str:
    """The real path of the folder ``path`` (a symbolic link in the folder whose real path is ``parent_real``, below
    the real folders ``chain``); DataError if it leads back to one of them or to a folder above: the walk would go
    round that loop (40 levels deep, then fail on a path of 40 repeats)."""
    real = os.path.realpath(path)
    if real in chain or parent_real == real or parent_real.startswith(real.rstrip(os.sep) + os.sep):
        raise DataError(f"{path} is a symbolic-link loop: it links to {os.readlink(path)}, a folder that holds it")
    return real


def _image_files(folder: str, rel: str) -> list[str]:
    """The image files below ``folder`` as paths that start with ``rel``, in the order of torchvision's
    ``make_dataset`` (folders sorted by path, the files of each by name): each folder listed once."""
    parent = os.path.realpath(os.path.dirname(folder))
    real = _loop_check(folder, parent, ()) if os.path.islink(folder) else os.path.join(parent, os.path.basename(folder))
    walked, pending = [], [(folder, rel, real, (real,))]
    while pending:
        path, prefix, real, chain = pending.pop()
        folders, images, linked = _entries(path)
        walked.append((path, [f"{prefix}/{name}" for name in images]))
        for d in folders:  # the real path of each folder is followed, to find links that lead back (loops)
            sub = _loop_check(os.path.join(path, d), real, chain) if d in linked else os.path.join(real, d)
            pending.append((os.path.join(path, d), f"{prefix}/{d}", sub, (*chain, sub)))
    return [f for _, files in sorted(walked, key=lambda w: w[0]) for f in files]


def _read_image_folder(folder: str) -> tuple[FileImages, list[str]]:
    """An ImageFolder (class folders of images, nested folders allowed) with the classes and samples torchvision's
    ``ImageFolder`` finds, in its order; file paths relative to the parent of ``folder`` (--data-dir)."""
    check_path(folder, "image folder", folder=True, hint=" (expected class folders of images)")
    classes = _entries(folder)[0]
    if not classes:
        raise DataError(f"{folder} holds no class folders")
    split, files, targets = os.path.basename(os.path.normpath(folder)), [], []
    for c, name in enumerate(classes):
        found = _image_files(os.path.join(folder, name), f"{split}/{name}")
        if not found:
            raise DataError(f"class folder {os.path.join(folder, name)} holds no images ({', '.join(IMG_EXTENSIONS)})")
        files += found
        targets += [c] * len(found)
    return FileImages(os.path.dirname(os.path.normpath(folder)), files, targets), classes


# --------------------------------------------------------------------------- the data bundle


@dataclass
class LTData:
    """Everything a script needs: the full training set, its long-tailed subset and balanced twin."""

    name: str
    train_full: ImageSet  # every training image (the probe trains on it by default)
    test: ImageSet
    lt_indices: list[int]  # the long-tailed subset of train_full
    twin_indices: list[int]  # same size, uniform class counts
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    shot_rule: str
    source: str = ""  # the folder the images were read from ("generated" for synthetic data)

    @property
    def class_counts(self) -> list[int]:
        return class_histogram([self.train_full.targets[i] for i in self.lt_indices], self.num_classes)

    @property
    def groups(self) -> dict[str, list[int]]:
        return shot_groups(self.class_counts, self.shot_rule)

    def pretrain_indices(self, balanced_twin: bool) -> list[int]:
        return self.twin_indices if balanced_twin else self.lt_indices


def resolved_ratio(args: DataArgs) -> float:
    """--imbalance-ratio with its default filled in: 1 (as is) for natural data sets, 100 otherwise."""
    if args.imbalance_ratio is not None:
        return args.imbalance_ratio
    return 1.0 if args.dataset in ("imagenet-lt", "imagefolder") else 100.0


def build_data(args: DataArgs) -> LTData:
    """Load ``args.dataset`` and build its long-tailed subset and balanced twin. Raises DataError."""
    if args.dataset not in DATASETS:
        raise DataError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    check_ranges(args, RANGES)
    natural = args.dataset in ("imagenet-lt", "imagefolder")
    ratio = resolved_ratio(args)
    if args.image_size is not None:
        size = args.image_size
    else:
        size = 224 if natural else 28 if args.dataset == "fashion-mnist" else 32
    mean, std = (
        (CIFAR_MEAN, CIFAR_STD)
        if args.dataset.startswith("cifar")
        else (SYNTHETIC_MEAN, SYNTHETIC_STD)
        if args.dataset == "synthetic"
        else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        if args.dataset == "fashion-mnist"
        else (IMAGENET_MEAN, IMAGENET_STD)
    )

    source, class_names = args.data_dir, None  # where the images are read from; an image folder's class names
    if args.dataset in ("cifar10", "cifar100"):
        train = _read_cifar(args.data_dir, args.dataset, True, args.download)
        test = _read_cifar(args.data_dir, args.dataset, False, args.download)
    elif args.dataset == "fashion-mnist":
        source = fashion_mnist_root(args.data_dir)
        train, test = (
            _read_fashion_mnist(source, True, args.download),
            _read_fashion_mnist(source, False, args.download),
        )
    elif args.dataset == "synthetic":
        train = SyntheticImages(args.synthetic_classes, args.synthetic_per_class, size, args.split_seed, True)
        test = SyntheticImages(args.synthetic_classes, args.synthetic_test_per_class, size, args.split_seed, False)
    elif args.dataset == "imagenet-lt":
        if not args.split_file:
            raise DataError("--dataset imagenet-lt needs --split-file (e.g. ImageNet_LT_train.txt)")
        test_file = args.test_split_file or os.path.join(
            os.path.dirname(args.split_file), os.path.basename(args.split_file).replace("train", "test")
        )
        if test_file == args.split_file:
            raise DataError("cannot derive the test split from --split-file; pass --test-split-file")
        train, test = _read_split_file(args.data_dir, args.split_file), _read_split_file(args.data_dir, test_file)
    else:
        train, classes = _read_image_folder(os.path.join(args.data_dir, "train"))
        test, test_classes = _read_image_folder(os.path.join(args.data_dir, "val"))
        class_names = classes
        if classes != test_classes:
            raise DataError(
                f"class count mismatch: {len(classes)} class folders in train/, "
                f"{len(test_classes)} in val/ (or different names)"
            )

    where = _train_source(args, source)
    if not len(train) or not len(test):
        raise DataError(f"{where}: the {'training' if not len(train) else 'test'} set holds no images")
    name = lambda c: f"class {c}" if class_names is None else f"class folder {class_names[c]}"  # noqa: E731
    if len(set(train.targets)) < 2:  # one class: a loss of 0 and 100% accuracy, learning nothing
        raise DataError(
            f"{where}: all {len(train)} training images are of one class ({name(train.targets[0])}); "
            f"a data set needs >= 2 classes"
        )
    num_classes = max(train.targets) + 1
    if min(train.targets) < 0 or len(set(train.targets)) != num_classes:
        absent = next((c for c in range(num_classes) if c not in set(train.targets)), "< 0")
        raise DataError(
            f"{where}: training labels must cover 0..C-1; found {len(set(train.targets))} distinct "
            f"labels with max {num_classes - 1} (no image of class {absent})"
        )
    if min(test.targets) < 0 or max(test.targets) >= num_classes:
        raise DataError(
            f"class count mismatch: test labels reach {max(test.targets)}, training has {num_classes} classes"
        )

    available = class_histogram(train.targets, num_classes)
    if args.index_file:
        lt_indices = _read_index_file(args.index_file, len(train))
    elif ratio == 1 and natural:
        lt_indices = list(range(len(train)))  # naturally long-tailed: use as is
    else:
        counts = long_tail_counts(available, num_classes, ratio, args.imbalance_profile)
        lt_indices = select_per_class(train.targets, counts, args.split_seed)
    kept = len({train.targets[i] for i in lt_indices})
    if kept < 2:  # an index file of one class (the long-tail construction keeps >= 1 image of every class)
        raise DataError(
            f"{'index file ' + args.index_file if args.index_file else 'the long-tailed set'}: its "
            f"{len(lt_indices)} images are all of one class ({name(train.targets[lt_indices[0]])}; the data has "
            f"{num_classes}); a long-tailed set needs >= 2 classes"
        )
    twin_counts = balanced_counts(len(lt_indices), num_classes)
    short = [c for c in range(num_classes) if available[c] < twin_counts[c]]
    if short and args.balanced_twin:
        raise DataError(
            f"no balanced twin: class {short[0]} has {available[short[0]]} images, the twin needs "
            f"{twin_counts[short[0]]} per class (imagenet-lt: use --dataset imagefolder on the full "
            f"ImageNet train/ with --imbalance-ratio)"
        )
    twin_indices = [] if short else select_per_class(train.targets, twin_counts, args.split_seed + 1)
    rule = "thresholds" if natural else "thirds"
    source = "generated" if args.dataset == "synthetic" else source
    return LTData(args.dataset, train, test, lt_indices, twin_indices, num_classes, size, mean, std, rule, source)


def _read_index_file(path: str, n: int) -> list[int]:
    """The training-set indices of an --index-file (whitespace separated, in any of read_text's encodings). DataError
    naming the file and the line of the first fault: a token that is not an integer, an index outside 0..n-1, an
    index listed twice (it would count its image twice); or a file without indices."""
    idx: list[int] = []
    seen: dict[int, int] = {}
    for lineno, line in enumerate(read_text(path, "index file").splitlines(), 1):
        for word in line.split():
            try:
                i = int(word) if word.isascii() else None
            except ValueError:
                i = None
            if i is None:
                raise DataError(f"{path}:{lineno}: expected whitespace-separated integer indices, got {word[:50]!r}")
            if not 0 <= i < n:
                raise DataError(f"{path}:{lineno}: index {i} is outside 0..{n - 1} (the training set has {n} images)")
            if i in seen:
                raise DataError(f"{path}:{lineno}: index {i} is listed twice (first on line {seen[i]})")
            seen[i] = lineno
            idx.append(i)
    if not idx:
        raise DataError(f"{path} holds no index")
    return idx


def _train_source(args: DataArgs, source: str) -> str:
    """The file or folder the training labels come from, for the errors that name it."""
    if args.dataset == "imagenet-lt":
        return f"split file {args.split_file}"
    if args.dataset == "imagefolder":
        return f"image folder {os.path.join(args.data_dir, 'train')}"
    if args.dataset == "synthetic":
        return "--synthetic-classes"
    return f"{args.dataset} in {source}"


# --------------------------------------------------------------------------- views


class GaussianBlur:
    """Gaussian blur of a PIL image with sigma ~ U(sigma_min, sigma_max) pixels (SimSiam/MoCo v2/DINO: (0.1, 2.0)),
    by PIL's ImageFilter.GaussianBlur(radius=sigma) as the official SimSiam, MoCo v2 and DINO code does. torchvision's
    T.GaussianBlur(23) computes the same blur (a kernel truncated at +-11 px instead of PIL's extended box filters)
    about 25x slower at 224 px. sigma is drawn from torch's RNG, so a seeded sample (IndexedDataset) repeats it."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma}, PIL)"


class ToNormalizedTensor:
    """T.Normalize(mean, std)(T.ToTensor()(img)) of an RGB PIL image in one pass over a float tensor: (x - 255 mean) /
    (255 std) of the uint8 pixels, (3, H, W) float32; equal to the two steps up to float rounding, ~3x faster."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        self.shift = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())
        return x.float().sub_(self.shift).mul_(self.scale)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


def _color_ops(image_size: int, jitter=(0.4, 0.4, 0.4, 0.1), blur_p: float = 0.0) -> list:
    ops = [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)]
    if blur_p > 0:
        ops.append(T.RandomApply([GaussianBlur((0.1, 2.0))], p=blur_p))
    return ops


def ssl_augment(image_size: int, mean, std, scale=(0.2, 1.0), blur: Optional[bool] = None) -> T.Compose:
    """SimSiam/MoCo-v2 augmentation: RandomResizedCrop, flip, colour jitter p .8, grayscale p .2,
    Gaussian blur p .5 only at ImageNet resolutions (no blur at 32 px, as in the CIFAR recipes)."""
    blur = image_size >= 96 if blur is None else blur
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=scale, antialias=True),
            *_color_ops(image_size, blur_p=0.5 if blur else 0.0),
            ToNormalizedTensor(mean, std),
        ]
    )


def supervised_augment(image_size: int, mean, std) -> T.Compose:
    """Standard supervised augmentation: pad-4 random crop and flip at CIFAR sizes (LDAM recipe),
    RandomResizedCrop and flip at ImageNet sizes."""
    crop = (
        T.RandomResizedCrop(image_size, antialias=True)
        if image_size >= 64
        else T.Compose(
            [T.Resize((image_size, image_size), antialias=True), T.RandomCrop(image_size, padding=image_size // 8)]
        )
    )
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


class TwoViews:
    """Two independent augmentations of the same image (SimSiam)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img):
        return [self.transform(img), self.transform(img)]


class MultiCrop:
    """``num_global`` crops at ``global_size`` then ``num_local`` crops at ``local_size`` (MSN focal views,
    DINO/ExCB local views). Returns a list, global crops first."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        num_global: int,
        num_local: int,
        mean,
        std,
        global_scale=(0.3, 1.0),
        local_scale=(0.05, 0.3),
        blur: Optional[bool] = None,
    ):
        self.global_t = ssl_augment(global_size, mean, std, global_scale, blur)
        self.local_t = ssl_augment(local_size, mean, std, local_scale, blur)
        self.num_global, self.num_local = num_global, num_local

    def __call__(self, img):
        return [self.global_t(img) for _ in range(self.num_global)] + [self.local_t(img) for _ in range(self.num_local)]


def eval_transform(image_size: int, mean, std) -> T.Compose:
    """Deterministic evaluation view: resize to 1.14x and centre-crop at ImageNet sizes, resize only below 64 px."""
    if image_size >= 64:
        return T.Compose(
            [
                T.Resize(int(round(image_size * 256 / 224)), antialias=True),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    return T.Compose([T.Resize((image_size, image_size), antialias=True), T.ToTensor(), T.Normalize(mean, std)])


# --------------------------------------------------------------------------- datasets, samplers, loaders


class IndexedDataset(torch.utils.data.Dataset):
    """``images[indices[k]]`` through ``transform``, returned as (views, label, k).

    An item may be an int, an ``(int, seed)`` pair or an ``(int, seed, epoch)`` triple (from
    ResumableSampler): with a seed the augmentation's random draws are a function of (seed) alone,
    so a resumed run sees exactly the views an uninterrupted one would, whatever the worker count or
    skipped batches. A transform with ``set_epoch`` is told the item's epoch first (epoch-dependent
    augmentation, e.g. ExCB's crop-scale schedule, with persistent workers).
    """

    def __init__(self, images: ImageSet, indices: Sequence[int], transform: Callable):
        self.images, self.indices, self.transform = images, list(indices), transform
        self.targets = [images.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        k, seed, epoch = (*item, None)[:3] if isinstance(item, tuple) else (item, None, None)
        if epoch is not None and hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)
        img = self.images.image(self.indices[k])
        if seed is None:
            return self.transform(img), self.targets[k], k
        state = torch.get_rng_state()  # the transforms draw from the CPU generator alone: seed it (1 us), not every
        torch.default_generator.manual_seed(seed)  # device's (torch.manual_seed: ~170 us, as long as a small item)
        try:
            return self.transform(img), self.targets[k], k
        finally:
            torch.set_rng_state(state)


class ResumableSampler(torch.utils.data.Sampler):
    """Distributed, deterministic, resumable epoch sampler yielding ``(index, augmentation_seed, epoch)``.

    The epoch's order is a function of (seed, epoch): a random permutation (instance sampling) or
    N draws with replacement at probability 1/(C * n_class) (class-balanced sampling). Rank r takes
    positions r, r+R, r+2R, ... (the last N mod R positions are dropped, as the training loop drops
    incomplete batches anyway); so the b-th batch of R processes at batch B is exactly the b-th
    batch of one process at batch R*B, and both take floor(N / (R*B)) steps per epoch.
    ``set_epoch(epoch, skip)`` drops this rank's first ``skip`` samples (resume mid-epoch).
    """

    def __init__(
        self,
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        labels: Optional[Sequence[int]] = None,
    ):
        self.n, self.replicas, self.rank, self.seed, self.shuffle = num_samples, num_replicas, rank, seed, shuffle
        self.weights = None
        if labels is not None:
            y = torch.as_tensor(list(labels))
            self.weights = 1.0 / torch.bincount(y).double()[y]
        self.epoch, self.skip = 0, 0
        self.per_rank = num_samples // num_replicas

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        mine = slice(self.rank + self.skip * self.replicas, self.per_rank * self.replicas, self.replicas)
        return iter((k, seed, self.epoch) for k, seed in zip(order[mine].tolist(), seeds[mine].tolist()))


def leave_process_group(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the worker moves to a process group of its own, so a Ctrl-C, SIGTERM or SIGHUP
    sent to the run's group is the main process's alone to handle (it saves a checkpoint, then stops its workers;
    a worker killed by it would fail the next batch). Workers take the default handlers back from the ones the
    fork copied (a training script's raises its stop in the process that gets the signal: a traceback in a worker):
    ignoring SIGTERM instead made every exit hang, since the DataLoader's and multiprocessing's clean-up end workers
    with SIGTERM. A worker whose main process died exits on its own (the DataLoader's watchdog)."""
    os.setpgid(0, 0)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, cgroup cpusets, SLURM), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_loader(
    dataset,
    batch_size: int,
    num_workers: Optional[int],
    sampler=None,
    drop_last: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader that keeps a GPU fed: worker processes (None: min(8, the usable CPUs per process on the node)),
    pinned memory on CUDA, persistent workers, prefetching. ``generator`` seeds the workers instead of a draw from
    the global RNG (loaders that must not touch it)."""
    if num_workers is None:  # torchrun's processes on this node share its CPUs
        num_workers = min(8, max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if num_workers > 0:  # the objects that exist now (the file index above all) leave the garbage collector's view:
        gc.collect()  # its passes in a forked worker would write to every page it shares with this process (copy on
        gc.freeze()  # write), ~0.6 GB per training process at the default worker count after an epoch of 100k images
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=leave_process_group,
        generator=generator,
    )


# --------------------------------------------------------------------------- command line


def describe(data: LTData, args: DataArgs) -> str:
    """A printable summary of the split: per-class counts, totals, shot groups."""
    counts = data.class_counts
    twin = (
        class_histogram([data.train_full.targets[i] for i in data.twin_indices], data.num_classes)
        if data.twin_indices
        else None
    )
    lines = [
        f"dataset {data.name}: {data.num_classes} classes, {len(data.train_full)} training images "
        f"available, {len(data.test)} test images, image size {data.image_size}",
        f"long-tailed set: {len(data.lt_indices)} images, head/tail {max(counts)}/{min(counts)} "
        f"= {max(counts) / max(min(counts), 1):.1f}" + (f" (index file {args.index_file})" if args.index_file else ""),
        "balanced twin: "
        + (
            f"{len(data.twin_indices)} images, {min(twin)}..{max(twin)} per class"
            if twin
            else "not available (some class is too small)"
        ),
        "per-class counts: " + ", ".join(map(str, counts)),
    ]
    rule = (
        "ImageNet-LT thresholds: many > 100, medium 20..100, few < 20"
        if data.shot_rule == "thresholds"
        else "thirds of the classes sorted by count"
    )
    lines.append(f"shot groups ({rule}):")
    for name, cls in data.groups.items():
        lines.append(
            f"  {name:6s} {len(cls):4d} classes, {sum(counts[c] for c in cls):7d} images: "
            + (", ".join(map(str, cls)) if len(cls) <= 40 else f"{cls[:40]} ...")
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    quiet_when_closed()
    args = tyro.cli(
        DataArgs,
        args=argv,
        description="Inspect a long-tailed split: per-class counts, total, balanced twin and shot groups.",
    )
    try:
        print(describe(build_data(args), args))
    except DataError as e:
        print(f"lt_data.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
