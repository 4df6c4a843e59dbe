"""Evaluate a frozen backbone: linear probe, kNN, per-class / shot-group accuracy, few-shot probes.

    python linear_probe.py runs/RUN/backbone.pt                    # data flags default to the run's
    python linear_probe.py runs/RUN/checkpoint.pt --shots 100 50   # a full checkpoint works too
    python linear_probe.py runs/RUN/backbone.pt --dataset cifar100 --data-dir data   # out-of-domain

Features are extracted once (eval transform, every image, no drop_last) and reused by every probe.
The linear probe trains on the *balanced* full training set by default, as Liu et al. (2022) and
the SDCLR/BCL line do (``--train-on long-tailed`` for the long-tailed subset); kNN follows the
InstDisc protocol (k=200, cosine similarity, votes weighted by exp(sim / 0.1)). Many / medium / few
groups come from the class counts of the long-tailed pre-training set (see lt_data.shot_groups).
Prints a markdown table and writes the same numbers as JSON.

Also the one place that knows the export format: ``build_backbone`` turns an export's metadata into
a plain torchvision model, which every training script uses for its own backbone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro

import lt_data

EXPORT_FORMAT = "ssl-imbalance-backbone/1"
CHECKPOINT_FORMAT = "ssl-imbalance-checkpoint/1"


class ProbeError(ValueError):
    """Unusable checkpoint or arguments; printed as one line, exit code 2."""


# --------------------------------------------------------------------------- backbones and exports


def build_backbone(arch: str, **kwargs) -> nn.Module:
    """A plain torchvision backbone whose ``forward`` returns features (classifier replaced by Identity).

    resnet18 / resnet50: ``cifar_stem=True`` swaps in a 3x3 stride-1 first conv and drops the max-pool
    (SimSiam on CIFAR does not reproduce without it). vit: torchvision's VisionTransformer with
    ``image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim``; features are the CLS token.
    """
    if arch in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, arch)()
        if kwargs.get("cifar_stem", False):
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        model.fc = nn.Identity()
        return model
    if arch == "vit":
        model = torchvision.models.VisionTransformer(**kwargs)
        model.heads = nn.Identity()
        return model
    raise ProbeError(f"unknown backbone architecture {arch!r}")


def feature_dim(arch: str, **kwargs) -> int:
    return {"resnet18": 512, "resnet50": 2048}.get(arch) or kwargs["hidden_dim"]


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise ProbeError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProbeError(f"cannot load {path}: not a readable checkpoint or refused by weights_only=True "
                         f"({first[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") not in (EXPORT_FORMAT, CHECKPOINT_FORMAT):
        raise ProbeError(f"{path} is not a backbone export or checkpoint of these scripts "
                         f"(expected format {EXPORT_FORMAT} or {CHECKPOINT_FORMAT})")
    return obj


def load_backbone(path: str) -> tuple[nn.Module, dict]:
    """Load ``backbone.pt`` or a full ``checkpoint.pt``; returns (torchvision backbone, metadata)."""
    obj = _load(path)
    meta = obj["backbone"]
    if obj["format"] == EXPORT_FORMAT:
        state = obj["state_dict"]
    else:
        prefix = meta["prefix"]
        state = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
    model = build_backbone(meta["arch"], **meta["arch_kwargs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ProbeError(f"{path}: weights do not fit a {meta['arch']} backbone "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model, meta


# --------------------------------------------------------------------------- probes on features


@torch.inference_mode()
def extract_features(model: nn.Module, dataset, batch_size: int, num_workers: int, device: torch.device,
                     amp: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features and labels of every item of ``dataset`` (eval mode, no drop_last), in order."""
    model.eval().to(device, memory_format=torch.channels_last)
    loader = lt_data.make_loader(dataset, batch_size, num_workers, sampler=None, drop_last=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    feats, labels = [], []
    for x, y, _ in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            feats.append(model(x.to(device, non_blocking=True, memory_format=torch.channels_last)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest vote with weight exp(sim / T)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    preds = []
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def train_linear(train_f: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int, lr: float,
                 batch_size: int, weight_decay: float, seed: int) -> nn.Module:
    """Logistic regression on standardised frozen features: SGD momentum 0.9, cosine lr, cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    clf = nn.Linear(train_f.shape[1], num_classes)
    nn.init.zeros_(clf.weight), nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    xs = (train_f - mean) / std
    steps = epochs * math.ceil(len(xs) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), batch_size):
            j = perm[i:i + batch_size]
            loss = F.cross_entropy(clf(xs[j]), train_y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return nn.Sequential(_Standardise(mean, std), clf)


class _Standardise(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


def accuracy_report(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                    groups: dict[str, list[int]]) -> dict:
    """Top-1, per-class accuracy, the mean per-class accuracy of each shot group and the std of the groups."""
    correct = (pred == target).double()
    per_class = [correct[target == c].mean().item() * 100 if (target == c).any() else float("nan")
                 for c in range(num_classes)]
    out = {"top1": correct.mean().item() * 100, "per_class": per_class}
    accs = []
    for name, cls in groups.items():
        vals = [per_class[c] for c in cls if not math.isnan(per_class[c])]
        out[name] = sum(vals) / len(vals) if vals else float("nan")
        accs.append(out[name])
    if accs and not any(math.isnan(a) for a in accs):
        m = sum(accs) / len(accs)
        out["group_std"] = math.sqrt(sum((a - m) ** 2 for a in accs) / len(accs))
    return out


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """``shots`` random examples of each class (all of a class that has fewer)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(picks)


# --------------------------------------------------------------------------- command line


@dataclass
class ProbeArgs(lt_data.DataArgs):
    """Linear-probe, kNN and few-shot evaluation of a frozen backbone. Data flags you do not pass are
    taken from the pre-training run (unless --dataset names another data set: out-of-domain probing)."""

    checkpoint: tyro.conf.Positional[str] = ""
    """backbone.pt or checkpoint.pt written by one of the training scripts"""
    train_on: Literal["balanced", "long-tailed"] = "balanced"
    """training set of the linear probe and kNN bank: the full balanced training set (the papers' protocol) or the long-tailed pre-training subset"""
    epochs: int = 100
    """linear-probe epochs over the pre-extracted features"""
    lr: float = 0.5
    """linear-probe learning rate (SGD momentum 0.9, cosine decay, on standardised features)"""
    batch_size: int = 256
    """linear-probe batch size"""
    weight_decay: float = 0.0
    """linear-probe weight decay"""
    knn_k: int = 200
    """kNN neighbours"""
    knn_temperature: float = 0.1
    """kNN vote temperature"""
    shots: tuple[int, ...] = ()
    """few-shot probes: examples per class, e.g. --shots 100 50"""
    few_shot_seeds: int = 3
    """random subsets averaged per few-shot probe"""
    random_init: bool = False
    """probe a randomly initialised backbone of the same architecture instead (a floor for the numbers)"""
    seed: int = 0
    """seed of the probe's training and of --random-init"""
    extract_batch_size: int = 256
    """batch size of feature extraction"""
    num_workers: int = 2
    """data-loading worker processes for feature extraction"""
    amp: Literal["bf16", "fp16", "none"] = "none"
    """autocast dtype of feature extraction"""
    output: Optional[str] = None
    """JSON output path; default: probe_<dataset>.json beside the checkpoint"""
    tensorboard: bool = False
    """also log the numbers into the pre-training run's TensorBoard (the checkpoint's folder)"""


def _passed(name: str, argv: list[str]) -> bool:
    flag = "--" + name.replace("_", "-")
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def resolve_data_args(args: ProbeArgs, meta: dict, argv: list[str]) -> ProbeArgs:
    """Fill the data flags the user did not pass from the pre-training run's (same data set only)."""
    pre = meta.get("data", {})
    same = not _passed("dataset", argv) or args.dataset == pre.get("dataset")
    updates = {}
    for f in dataclasses.fields(lt_data.DataArgs):
        if f.name in pre and not _passed(f.name, argv) and (same or f.name == "image_size"):
            updates[f.name] = pre[f.name]
    return dataclasses.replace(args, **updates)


def run_probe(args: ProbeArgs, argv: list[str]) -> dict:
    model, meta = load_backbone(args.checkpoint)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = build_backbone(meta["arch"], **meta["arch_kwargs"])
    args = resolve_data_args(args, meta, argv)
    data = lt_data.build_data(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf = lt_data.eval_transform(data.image_size, data.mean, data.std)
    train_idx = list(range(len(data.train_full))) if args.train_on == "balanced" else data.lt_indices
    extract = lambda images, idx: extract_features(  # noqa: E731
        model, lt_data.IndexedDataset(images, idx, tf), args.extract_batch_size, args.num_workers, device, args.amp)
    train_f, train_y = extract(data.train_full, train_idx)
    test_f, test_y = extract(data.test, range(len(data.test)))
    groups = data.groups
    C = data.num_classes

    clf = train_linear(train_f, train_y, C, args.epochs, args.lr, args.batch_size, args.weight_decay, args.seed)
    with torch.no_grad():
        linear = accuracy_report(clf(test_f).argmax(1), test_y, C, groups)
    knn = accuracy_report(knn_predict(train_f, train_y, test_f, C, args.knn_k, args.knn_temperature),
                          test_y, C, groups)
    few = {}
    for shots in args.shots:
        runs = []
        for s in range(args.few_shot_seeds):
            idx = few_shot_indices(train_y, shots, args.seed + s)
            clf_s = train_linear(train_f[idx], train_y[idx], C, args.epochs, args.lr, args.batch_size,
                                 args.weight_decay, args.seed + s)
            with torch.no_grad():
                runs.append(accuracy_report(clf_s(test_f).argmax(1), test_y, C, groups)["top1"])
        m = sum(runs) / len(runs)
        few[str(shots)] = {"top1": m, "std": math.sqrt(sum((r - m) ** 2 for r in runs) / len(runs)), "runs": runs}
    return {"checkpoint": args.checkpoint, "method": meta.get("method"), "step": meta.get("step"),
            "random_init": args.random_init, "dataset": args.dataset, "pretrain_dataset":
            meta.get("data", {}).get("dataset"), "train_on": args.train_on, "num_train": len(train_f),
            "num_test": len(test_f), "groups": groups, "linear": linear, "knn": knn, "few_shot": few}


def markdown(res: dict) -> str:
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    lines = [f"probe of {res['checkpoint']} ({res['method']}{', random init' if res['random_init'] else ''}) "
             f"on {res['dataset']}: {res['num_train']} training / {res['num_test']} test images, "
             f"probe trained on the {res['train_on']} set", "",
             "| probe | top-1 | many | medium | few | std(groups) |", "|---|---|---|---|---|---|"]
    for name in ("linear", "knn"):
        r = res[name]
        lines.append(f"| {name} | {fmt(r['top1'])} | {fmt(r.get('many'))} | {fmt(r.get('medium'))} | "
                     f"{fmt(r.get('few'))} | {fmt(r.get('group_std'))} |")
    for shots, r in res["few_shot"].items():
        lines.append(f"| linear {shots}-shot (mean of {len(r['runs'])}) | {fmt(r['top1'])} ± {fmt(r['std'])} "
                     f"| | | | |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = tyro.cli(ProbeArgs, args=argv)
    try:
        if not args.checkpoint:
            raise ProbeError("give the checkpoint to probe: python linear_probe.py runs/RUN/backbone.pt")
        if args.epochs < 1 or args.batch_size < 1 or args.knn_k < 1 or any(s < 1 for s in args.shots):
            raise ProbeError("--epochs, --batch-size, --knn-k and --shots must be >= 1")
        res = run_probe(args, argv)
    except (ProbeError, lt_data.DataError) as e:
        print(f"linear_probe.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown(res))
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                      f"probe_{res['dataset']}{'_random' if args.random_init else ''}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(os.path.dirname(os.path.abspath(args.checkpoint))) as w:
            tag = f"probe/{res['dataset']}{'_random' if args.random_init else ''}"
            for name in ("linear", "knn"):
                for key in ("top1", "many", "medium", "few", "group_std"):
                    if key in res[name]:
                        w.add_scalar(f"{tag}/{name}_{key}", res[name][key], res["step"] or 0)
    return res


if __name__ == "__main__":
    main()
