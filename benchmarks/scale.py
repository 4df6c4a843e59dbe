"""The data path at ImageNet-LT / iNaturalist file counts, measured against torchvision on the same files (issue 33).

    python benchmarks/scale.py --n 20000 100000 300000          # one table per N
    python benchmarks/scale.py --n 2000 --epoch-images 2000      # a quick look (the tests' smoke run)
    python benchmarks/scale.py --n 100000 --code /path/to/an/older/checkout   # the same figures for other code

For each N it builds a synthetic long-tailed ImageFolder of --classes classes (exponential profile, head/tail
--ratio, N training images, --val-per-class validation images per class) and the matching OLTR split files, every
file a hard link to one of --distinct tiny JPEGs (so 300k files cost a few MB), then measures, in fresh processes:

- indexing: lt_data.build_data on the ImageFolder and on the split files (train + val) against torchvision's
  ImageFolder on train/ and val/ (the best of --repeats, warm file-system cache for both);
- start-up: seconds from `python supervised_baseline.py --max-steps 1` (ResNet-18, the ImageFolder) to its exit;
- one training item: the two-view SimSiam augmentation at --image-size of a random image, decode included, one
  thread: lt_data.IndexedDataset with a per-item seed (what the training loader asks for) against
  torchvision's ImageFolder[k] with the same transform;
- worker memory: the private memory (USS: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) of each of 2
  DataLoader workers after one pass over --epoch-images images (decode + ToTensor), lt_data.make_loader against a
  plain torch DataLoader over torchvision's ImageFolder, each in its own process;
- checkpoint save: supervised_baseline.save_checkpoint of a ResNet-18 run over the ImageFolder (mean of 3), and the
  one-off cost of the training-set fingerprint it stores.

Files go under --workdir (default: the system's temporary folder) and are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_tree(root: str, n: int, classes: int, ratio: float, val_per_class: int, distinct: int) -> dict:
    """train/ and val/ class folders (exponential long tail, N training images in all) of hard links to ``distinct``
    16x16 JPEGs, and the split files ImageNet_LT_train.txt / ImageNet_LT_test.txt over them. Returns the counts."""
    import numpy as np
    from PIL import Image

    pool = os.path.join(root, "pool")
    os.makedirs(pool)
    rng = np.random.default_rng(0)
    for i in range(distinct):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.path.join(pool, f"{i}.jpg"))
    shape = [ratio ** (-c / max(classes - 1, 1)) for c in range(classes)]
    lo, hi = 0.0, float(n)  # the head size whose profile, at least 1 image a class, sums to N (bisection)
    for _ in range(100):
        head = (lo + hi) / 2
        lo, hi = (head, hi) if sum(max(1, int(head * s)) for s in shape) < n else (lo, head)
    counts = [max(1, int(hi * s)) for s in shape]
    counts[0] += n - sum(counts)  # exactly N
    k = 0
    for split, per_class in (("train", counts), ("val", [val_per_class] * classes)):
        lines = []
        for c, count in enumerate(per_class):
            folder = os.path.join(root, split, f"n{c:05d}")
            os.makedirs(folder)
            for i in range(count):
                os.link(os.path.join(pool, f"{k % distinct}.jpg"), os.path.join(folder, f"n{c:05d}_{i}.jpg"))
                lines.append(f"{split}/n{c:05d}/n{c:05d}_{i}.jpg {c}")
                k += 1
        name = "ImageNet_LT_train.txt" if split == "train" else "ImageNet_LT_test.txt"
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return {"train": n, "val": val_per_class * classes, "head": counts[0], "tail": counts[-1]}


# ------------------------------------------------------------------ measurements, each run in a fresh process


def measure_index(root: str, repeats: int) -> dict:
    from torchvision.datasets import ImageFolder

    import lt_data

    def best(f):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    folder = lt_data.DataArgs(dataset="imagefolder", data_dir=root, image_size=16)
    split = lt_data.DataArgs(
        dataset="imagenet-lt", data_dir=root, split_file=os.path.join(root, "ImageNet_LT_train.txt"), image_size=16
    )
    return {
        "ours_folder": best(lambda: lt_data.build_data(folder)),
        "ours_split": best(lambda: lt_data.build_data(split)),
        "torchvision": best(lambda: (ImageFolder(os.path.join(root, "train")), ImageFolder(os.path.join(root, "val")))),
    }


def measure_item(root: str, items: int) -> dict:
    import torch
    from torchvision.datasets import ImageFolder

    import lt_data

    torch.set_num_threads(1)
    data = lt_data.build_data(lt_data.DataArgs(dataset="imagefolder", data_dir=root, image_size=16))
    transform = lt_data.TwoViews(lt_data.ssl_augment(16, data.mean, data.std))
    ours = lt_data.IndexedDataset(data.train_full, range(len(data.train_full)), transform)
    theirs = ImageFolder(os.path.join(root, "train"), transform=transform)
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(ours), (items,), generator=g).tolist()
    seeds = torch.randint(0, 2**62, (items,), generator=g).tolist()
    out = {}
    for _ in range(2):  # the second round counts (the first warms the file-system cache and the allocator)
        start = time.perf_counter()
        for k, seed in zip(picks, seeds):
            ours[(k, seed, 0)]
        out["ours"] = (time.perf_counter() - start) / items * 1e6
        start = time.perf_counter()
        for k in picks:
            theirs[k]
        out["torchvision"] = (time.perf_counter() - start) / items * 1e6
    return out


def uss_mb(pid: int) -> float:
    """Private memory of a process in MB (Private_Clean + Private_Dirty of smaps_rollup)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def measure_worker_memory(root: str, which: str, epoch_images: int) -> dict:
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    import lt_data

    tensor = T.ToTensor()
    if which == "ours":
        data = lt_data.build_data(lt_data.DataArgs(dataset="imagefolder", data_dir=root, image_size=16))
        dataset = lt_data.IndexedDataset(data.train_full, range(len(data.train_full)), tensor)
        sampler = lt_data.ResumableSampler(len(dataset), seed=0)
        loader = lt_data.make_loader(dataset, 256, 2, sampler)
    else:
        dataset = ImageFolder(os.path.join(root, "train"), transform=tensor)
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(dataset, 256, sampler=sampler, num_workers=2, persistent_workers=True)
    it = iter(loader)
    seen, start = 0, time.perf_counter()
    while seen < epoch_images:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += len(batch[1])
        if seen == len(batch[1]):  # after the first batch: the workers' memory before the pass
            first = [uss_mb(w.pid) for w in it._workers]
    last = [uss_mb(w.pid) for w in it._workers]
    return {"first_batch": max(first), "after": max(last), "images": seen, "seconds": time.perf_counter() - start}


def measure_save(root: str, out_dir: str) -> dict:
    import torch

    import lt_data
    import supervised_baseline as S

    args = S.Args(dataset="imagefolder", data_dir=root, image_size=16, amp="none", output_dir=out_dir)
    data = lt_data.build_data(args)
    train_set = lt_data.IndexedDataset(data.train_full, data.lt_indices, S.train_transform(args, data))
    model = S.Model(args, data)
    optimizer = S.make_optimizer(args, model, args.lr)
    start = time.perf_counter()
    run = S.RunState(args, model, model, optimizer, data, train_set, torch.device("cpu"), 10, out_dir)
    fingerprint = time.perf_counter() - start  # RunState computes the training-set fingerprint once (older code: None)
    if getattr(run, "training_set", None) is None:
        fingerprint = math.nan
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "checkpoint.pt")
    S.save_checkpoint(run, path)  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        S.save_checkpoint(run, path)
    return {"save": (time.perf_counter() - start) / 3, "fingerprint": fingerprint}


def measure_startup(root: str, out_dir: str, code: str) -> dict:
    """Seconds from `python supervised_baseline.py ... --max-steps 1` to its exit, and to its step-1 line."""
    cmd = [sys.executable, os.path.join(code, "supervised_baseline.py"), "--dataset", "imagefolder"]
    cmd += ["--data-dir", root, "--image-size", "16", "--batch-size", "32", "--max-steps", "1", "--eval-every", "0"]
    cmd += ["--num-workers", "2", "--output-dir", out_dir, "--run-name", "startup", "--amp", "none"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(code))
    first_step, lines = math.nan, []
    for line in proc.stdout:
        lines.append(line)
        if " step 1/" in line and math.isnan(first_step):
            first_step = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit("scale.py: the start-up run failed:\n" + "".join(lines[-20:]))
    return {"first_step": first_step, "run": time.perf_counter() - start}


def _env(code: str) -> dict:
    return {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1"}


def in_fresh_process(code: str, what: str, *args) -> dict:
    """Run ``what(*args)`` of this file in a new Python process that imports the project from ``code``."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--measure", what, "--code", code, "--", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(code),
    )
    if proc.returncode != 0:
        raise SystemExit(f"scale.py: measuring {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the table


def cpu_name() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        name += ", native bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else ", no native bf16"
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def table(n: int, counts: dict, r: dict) -> str:
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
    index, item, mem = r["index"], r["item"], r["memory"]
    rows = [
        f"### N = {n:,} training images ({counts['val']:,} val; head {counts['head']:,}, tail {counts['tail']})",
        "",
        "| what | ours | torchvision | ratio |",
        "|---|---|---|---|",
        f"| index train + val, ImageFolder (s) | {index['ours_folder']:.2f} | {index['torchvision']:.2f} | "
        f"{ratio(index['ours_folder'], index['torchvision'])} |",
        f"| index train + val, split files (s) | {index['ours_split']:.2f} | {index['torchvision']:.2f} | "
        f"{ratio(index['ours_split'], index['torchvision'])} |",
        f"| one training item, two 16 px views (us) | {item['ours']:.0f} | {item['torchvision']:.0f} | "
        f"{ratio(item['ours'], item['torchvision'])} |",
        *(
            f"| worker USS {when} (MB) | {ours[key]:.1f} | {theirs[key]:.1f} | {ratio(ours[key], theirs[key])} |"
            for ours, theirs in [(mem["ours"], mem["torchvision"])]
            for when, key in (("after the first batch", "first_batch"), (f"after {ours['images']:,} images", "after"))
        ),
        f"| start-up to step 1, supervised ResNet-18 (s) | {r['startup']['first_step']:.1f} | | |",
        f"| checkpoint save, ResNet-18 + SGD state (s) | {r['save']['save']:.3f} | | |",
        f"| training-set fingerprint, once per run (s) | {r['save']['fingerprint']:.3f} | | |",
    ]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000, 300_000], help="training images per table")
    p.add_argument("--classes", type=int, default=1000, help="classes (ImageNet-LT: 1,000)")
    p.add_argument("--ratio", type=float, default=256.0, help="head/tail class-size ratio (ImageNet-LT: 1280/5)")
    p.add_argument("--val-per-class", type=int, default=20, help="validation images per class (ImageNet-LT: 20)")
    p.add_argument("--distinct", type=int, default=300, help="distinct JPEGs the files link to")
    p.add_argument("--epoch-images", type=int, default=100_000, help="images the worker-memory pass reads")
    p.add_argument("--items", type=int, default=2000, help="items timed for the item cost")
    p.add_argument("--repeats", type=int, default=3, help="indexing runs per loader (the best counts)")
    p.add_argument("--workdir", default=None, help="folder for the synthetic files (default: the temporary folder)")
    p.add_argument("--code", default=ROOT, help="checkout whose lt_data.py and supervised_baseline.py are measured")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:  # a child: one measurement, its JSON on the last line
        sys.path.insert(0, a.code)
        fn = {"index": measure_index, "item": measure_item, "memory": measure_worker_memory, "save": measure_save}
        rest = [int(v) if v.isdigit() else v for v in a.rest]
        print(json.dumps(fn[a.measure](*rest)))
        return
    if any(v < 1 for v in (*a.n, a.classes, a.val_per_class, a.distinct, a.epoch_images, a.items, a.repeats)):
        p.error("--n, --classes, --val-per-class, --distinct, --epoch-images, --items and --repeats must be >= 1")
    if min(a.n) < a.classes:
        p.error(f"--n must be at least --classes ({a.classes}): every class needs an image")
    code = os.path.abspath(a.code)
    print(f"scale.py: {cpu_name()}; code {code}; python {platform.python_version()}", flush=True)
    results = {}
    for n in a.n:
        root = tempfile.mkdtemp(prefix=f"scale{n}_", dir=a.workdir)
        try:
            start = time.perf_counter()
            counts = build_tree(root, n, a.classes, a.ratio, a.val_per_class, a.distinct)
            print(f"built {n:,} + {counts['val']:,} files in {time.perf_counter() - start:.1f} s", flush=True)
            r = {"index": in_fresh_process(code, "index", root, a.repeats)}
            r["item"] = in_fresh_process(code, "item", root, a.items)
            r["memory"] = {
                w: in_fresh_process(code, "memory", root, w, a.epoch_images) for w in ("ours", "torchvision")
            }
            r["save"] = in_fresh_process(code, "save", root, os.path.join(root, "runs"))
            r["startup"] = measure_startup(root, os.path.join(root, "runs"), code)
            results[n] = {"counts": counts, **r}
            print("\n" + table(n, counts, r) + "\n", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu_name(), "code": code, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
