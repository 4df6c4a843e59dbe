"""Shared test helpers: tiny data in the real on-disk formats and subprocess runs of the scripts."""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# pytest-xdist (-n N, the README's command) runs N tests at once: each gets its share of the cores, in-process
# and in the scripts it starts, so that N workers never ask for N x cores threads (torch threads that share a
# core spin against each other)
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))

# The one time limit of the tests' subprocess runs and waits: a hang guard, not a speed check. Generous, so that a
# slow or busy machine (2 cores, a CPU without native bf16, pytest-xdist neighbours) never hits it; the tests assert
# behaviour, never speed. (gpu_check's --timeout test keeps its 1 s limit: there the timeout is the behaviour.)
HANG_GUARD = 3600


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16 or AMX; Arm: the BF16 extension): the scripts' own
    ``--amp auto`` rule. SSL_TEST_NO_BF16=1 answers False, to run the tests as on a CPU without it (there torch
    emulates bf16, about 10x slower than fp32)."""
    if os.environ.get("SSL_TEST_NO_BF16", "") not in ("", "0"):
        return False
    from supervised_baseline import resolve_amp

    return resolve_amp("auto", torch.device("cpu")) == "bf16"


# --amp for tests that train in "the fast precision" and do not test a precision: bf16 where native, else fp32
NATIVE_AMP = "bf16" if native_bf16() else "none"

# A tiny synthetic long-tailed set: 4 classes, 32 images of the head class, 16 px. Steps take milliseconds.
TINY_DATA = [
    "--dataset",
    "synthetic",
    "--synthetic-classes",
    "4",
    "--synthetic-per-class",
    "32",
    "--synthetic-test-per-class",
    "8",
    "--image-size",
    "16",
    "--imbalance-ratio",
    "4",
]


# Per training script: its tiny configuration (data + a small model), and one architecture flag change with
# the words the refusal to resume must contain. Add a script here and tests/test_scripts.py covers it.
TINY_ARGS = {
    "supervised_baseline.py": [*TINY_DATA],
    "msn_prior.py": [
        *TINY_DATA,
        "--arch",
        "vit_tiny",
        "--vit-layers",
        "2",
        "--vit-dim",
        "32",
        "--vit-heads",
        "2",
        "--patch-size",
        "4",
        "--focal-size",
        "8",
        "--num-focal",
        "2",
        "--head-hidden",
        "32",
        "--head-out",
        "16",
        "--num-prototypes",
        "16",
        "--warmup-epochs",
        "1",
    ],
    "simsiam_rwsam.py": [
        *TINY_DATA[:-4],
        "--image-size",
        "8",
        *TINY_DATA[-2:],
        "--proj-dim",
        "32",
        "--pred-dim",
        "8",
        "--reweight-warmup",
        "0",
        "--reweight-every",
        "1",
    ],  # 8 px: two passes per step
    "excb.py": [
        *TINY_DATA,
        "--num-clusters",
        "16",
        "--hidden-dim",
        "64",
        "--out-dim",
        "32",
        "--num-local-crops",
        "2",
        "--kmeans-iters",
        "5",
    ],
}
ARCH_CHANGE = {
    "supervised_baseline.py": (["--arch", "resnet50"], "--arch resnet18 -> resnet50"),
    "msn_prior.py": (["--vit-layers", "3"], "--vit-layers 2 -> 3"),
    "simsiam_rwsam.py": (["--arch", "resnet50"], "--arch resnet18 -> resnet50"),
    "excb.py": (["--num-clusters", "32"], "--num-clusters 16 -> 32"),
}


def script_env(threads: int | None = None) -> dict:
    """The environment of a script run: no torchrun variables, the repository importable, ``threads`` (default:
    this worker's share of the cores) torch threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = str(threads or THREADS)
    return env


def with_seams(script: str, seams: tuple[str, ...]) -> list[str]:
    """``script.py``, or ``tests/seams.py SEAMS script.py`` (a test seam around the script's loop; see seams.py)."""
    return [str(ROOT / "tests" / "seams.py"), *seams, str(ROOT / script)] if seams else [str(ROOT / script)]


def run_script(
    script: str,
    *args: str,
    cwd,
    env: dict | None = None,
    timeout: float = HANG_GUARD,
    check: bool = True,
    seams: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run a top-level script as a user would: ``python script.py ARGS`` in ``cwd`` (``seams``: see seams.py)."""
    proc = subprocess.run(
        [sys.executable, *with_seams(script, seams), *args],
        cwd=cwd,
        env=env or script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_torchrun(
    script: str,
    *args: str,
    cwd,
    nproc: int = 2,
    env: dict | None = None,
    timeout: float = HANG_GUARD,
    seams: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N script.py ARGS`` on CPU (gloo), one thread per process."""
    env = {**(env or script_env()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *with_seams(script, seams),
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_cifar(root: Path, name: str, per_class_train: int, per_class_test: int, seed: int = 0) -> list[int]:
    """CIFAR-10/100 in torchvision's on-disk python format (pickled dicts of uint8 rows); returns train labels."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    key = "labels" if name == "cifar10" else "fine_labels"

    def batch(per_class):
        labels = rng.permutation(np.repeat(np.arange(classes), per_class)).tolist()
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        return {"data": data, key: labels}

    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    train = batch(per_class_train)
    if name == "cifar10":
        n = len(train[key])
        for i in range(5):  # five data batches, like the real archive
            part = slice(i * n // 5, (i + 1) * n // 5)
            with open(folder / f"data_batch_{i + 1}", "wb") as f:
                pickle.dump({"data": train["data"][part], key: train[key][part]}, f)
        files = {"test_batch": batch(per_class_test)}
    else:
        files = {"train": train, "test": batch(per_class_test)}
    for fname, entry in files.items():
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f)
    return train[key]


def write_idx(path: Path, array: np.ndarray) -> None:
    """One IDX file (uint8, big-endian sizes), gzipped when ``path`` ends in .gz, as the MNIST family ships."""
    import gzip

    raw = (
        bytes([0, 0, 0x08, array.ndim])
        + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(raw)


def write_fashion_mnist(
    folder: Path, per_class_train: int, per_class_test: int, gz: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The four Fashion-MNIST IDX files (28x28 grey, 10 classes, shuffled labels) in ``folder``; returns the
    training images and labels."""
    rng = np.random.default_rng(seed)
    out = None
    for split, n in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        ext = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", labels)
        out = out or (images, labels)
    return out


@pytest.fixture(scope="session")
def tiny_supervised_run(tmp_path_factory):
    """One short supervised run on tiny synthetic data, shared by the probe and export tests."""
    cwd = tmp_path_factory.mktemp("sup")
    run_script(
        "supervised_baseline.py",
        *TINY_DATA,
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--num-workers",
        "0",
        "--run-name",
        "tiny",
        "--log-every",
        "2",
        cwd=cwd,
    )
    return cwd / "runs" / "tiny"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, THREADS))


# What starts a Python process of its own (a script, torchrun, a benchmark): seconds each (a torch import alone took
# 5 s on a 2-core Xeon), so such a test is ``slow`` whether or not it is marked: ``-m "not slow"`` keeps the tests
# that run in-process (README, Set-up).
PROCESS_STARTERS = {"run_script", "run_torchrun", "subprocess", "Popen", "check_output"}
PROCESS_FIXTURES = {"tiny_supervised_run"}


def _starts_processes(fn, module, depth: int = 3) -> bool:
    """Whether ``fn`` names a process starter, directly or through the module's functions it calls (``depth``)."""
    names = set(getattr(fn, "__code__", None) and fn.__code__.co_names or ())
    if names & PROCESS_STARTERS:
        return True
    helpers = [getattr(module, n) for n in names if inspect.isfunction(getattr(module, n, None))]
    return depth > 0 and any(_starts_processes(h, module, depth - 1) for h in helpers if h is not fn)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        if fn is not None and (
            PROCESS_FIXTURES & set(item.fixturenames) or _starts_processes(fn, inspect.getmodule(fn))
        ):
            item.add_marker(pytest.mark.slow)
