"""The three papers' claims on long-tailed pre-training, each as an experiment that can fail.

Two presets of one protocol (docs/claims.md):
- cpu (default): every row pre-trains the CPU recipes' 4-layer ViT (benchmarks/recipes.py) on Fashion-MNIST-LT at
  16 px; the whole table fits a few hours of a 2-core CPU.
- gpu: Fashion-MNIST-LT at its own 28 px with the papers' backbones (each script's --recipe cifar10-lt: the CIFAR-stem
  ResNet-18 for supervised / SimSiam / rwSAM / ExCB, MSN's ViT-S/4 for MSN / PMSN), at 1/25 of the papers' CIFAR-LT
  epochs (PRESETS), so that Liu et al.'s claim fits about 10 minutes of one H100 (docs/claims.md: the estimate).

Liu et al.'s rows are also pre-trained on the balanced twin of the same size. Each seed s has its own long-tailed
subset and its own class-to-size order (a seeded permutation of the classes, written as an index file, as the
SDCLR/BCL split files do for CIFAR-LT), the same for every row: a claim's paired difference compares rows on the
same data. Each exported backbone is probed frozen with linear_probe.py in domain (the balanced test set: linear,
kNN, many / medium / few, few-shot) and out of domain (MNIST digits, --ood-dir); ViTs with DINO's readout for small
ViTs (the class tokens of the last 4 blocks, Caron et al. 2021, eval_linear.py). Two floors sit beside the rows,
probed the same way: the same architecture at random init and the raw pixels.

Levelled off, with a consequence: each run's online kNN monitor (whole test set, every epoch) is read back from its
TensorBoard events; the run has levelled off when its gain over its last window (from its last evaluation at or
before 80% of the steps to the end), scaled to 20% of the run, is under LEVEL_POINTS. A run that has not is trained
afresh with --extension times its steps (its schedules re-planned), once, with the runs of its budget group at that
seed (a row's two sets; PMSN with MSN; the ExCB rows: a difference a claim takes keeps one budget); the longer runs
replace them. A claim resting on a run still learning at this cap is "not resolved: still learning".

Verdicts come from each claim's pre-registered primary measure alone (in-domain linear top-1): a per-seed paired
difference with its 95% t-interval over seeds, confirmed when the interval lies on the claim's side of its threshold,
refuted when it lies wholly on the other side of refute_below, else not resolved. Every other measure is a
descriptive interval.

One command runs everything and resumes after an interruption (a trained run is not retrained, a probe whose JSON
exists is not re-run, an interrupted run resumes from its checkpoint); the claims run in order, and after each one
the report (<output-dir>/claims.md, gap_table.json, the figures) is rewritten with every verdict so far:

    python benchmarks/make_imagefolder.py mnist-5k --mnist-csv mnist_5k.csv.gz --train-per-class 400 \\
        --val-per-class 100 --out data/mnist5k      # the out-of-domain set (docs/claims.md says where the file is)
    python benchmarks/gap_table.py --jobs 2 --num-workers 0 --extra="--amp none"
    python benchmarks/gap_table.py --preset gpu --jobs 2 --num-workers 6 --output-dir runs/claims_gpu  # one GPU

--jobs N runs N pre-trainings or probes at once, each with cores/N threads.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal, NoReturn, Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from recipes import RECIPES, data_args, data_flags, probe  # noqa: E402  (the recipes, helpers)
from recipes import pretrain as pretrain_run  # noqa: E402

import lt_data  # noqa: E402  (the data sets the scripts accept)


@dataclass(frozen=True)
class Row:
    """A row: a method of benchmarks/recipes.py (its script and variant flag), flags after the preset's recipe,
    the pre-training sets it is trained on, and its budget group: the runs of a seed whose difference a claim takes
    directly (a row's long-tailed and balanced runs; the rows of an accuracy claim) are extended together, so
    they keep one budget (None: the method's name)."""

    method: str
    flags: tuple[str, ...] = ()
    sets: tuple[str, ...] = ("long-tailed",)
    group: Optional[str] = None


@dataclass(frozen=True)
class Preset:
    """The scripts' --recipe every row starts from, the input size, each method's backbone (the probe's readout and
    the random-init floor follow it) and the rows."""

    recipe: str
    image_size: int
    arch: dict
    rows: dict


def excb_rows(batch: int, base: tuple[str, ...], large: tuple[str, ...], teacher: float, sizes: float = 0.999) -> dict:
    """ExCB at the recipe's batch (flags ``base``) and at 4x that batch over the same images (a quarter of the
    steps; ``base`` then ``large``), each with and without balancing (--no-balancing: the control). The 4x run's
    per-step momenta are matched per image (1 - 4 (1 - m)); its learning rate scales linearly with the batch (the
    scripts' rule)."""
    four = ["--batch-size", str(4 * batch), "--teacher-momentum", f"{1 - 4 * (1 - teacher):.3f}"]
    four += ["--size-momentum", f"{1 - 4 * (1 - sizes):.3f}"]
    rows = {"excb": Row("excb", base), "excb_4x": Row("excb", (*base, *large, *four))}
    return rows | {f"{name}_nobal": Row("excb", (*row.flags, "--no-balancing")) for name, row in rows.items()}


def group(row: Row) -> str:
    """The row's budget group: PMSN with MSN (their claim's difference), each other method its own."""
    return row.group or {"pmsn": "msn"}.get(row.method, row.method)


BOTH = ("long-tailed", "balanced")
PRESETS = {
    # The CPU recipes (docs/cpu_recipes.md): 1,800 steps (8 epochs) supervised / SimSiam / rwSAM, 1,200 (6) others;
    # ExCB at 4x the batch: 300 steps (--train-steps) over the same images.
    "cpu": Preset(
        "cpu",
        16,
        dict.fromkeys(RECIPES, "vit"),
        {
            "supervised": Row("supervised", (), BOTH),
            "simsiam": Row("simsiam", (), BOTH),
            "rwsam": Row("rwsam", (), BOTH),
            "msn": Row("msn"),
            "pmsn": Row("pmsn"),
            **excb_rows(64, ("--train-steps", "1200"), ("--train-steps", "300"), teacher=0.99),
        },
    ),
    # The papers' CIFAR-LT budgets (each script's cifar10-lt recipe) at 1/25 of their epochs and warm-ups:
    # supervised 200 -> 8 epochs, SimSiam / rwSAM / MSN / ExCB 800 -> 32; rwSAM's KDE weights every 2 epochs after 2
    # (the CPU recipe's), as 10 / 10 of 800 would leave 2 updates.
    "gpu": Preset(
        "cifar10-lt",
        28,
        dict.fromkeys(RECIPES, "resnet18") | dict(msn="vit", pmsn="vit"),
        {
            "supervised": Row("supervised", ("--epochs", "8", "--warmup-epochs", "1"), BOTH),
            "simsiam": Row("simsiam", ("--epochs", "32"), BOTH),
            "rwsam": Row("rwsam", ("--epochs", "32", "--reweight-warmup", "2", "--reweight-every", "2"), BOTH),
            "msn": Row("msn", ("--epochs", "32", "--warmup-epochs", "1")),
            "pmsn": Row("pmsn", ("--epochs", "32", "--warmup-epochs", "1")),
            **excb_rows(128, ("--epochs", "32", "--warmup-epochs", "1"), (), teacher=0.996),
        },
    ),
}
SETS = {"long-tailed": "lt", "balanced": "twin"}  # pre-training set -> run-name suffix
MONITOR = ["--eval-every", "1", "--eval-queries", "0"]  # the kNN monitor every epoch on the whole test set
LEVEL_POINTS = 0.5  # levelled off: the monitor gains less than this per 20% of the run over its last window
READOUT = {"vit": ["--n-last-blocks", "4"], "resnet18": []}  # DINO's linear readout for ViT-S (eval_linear.py)
SHOTS = ("10", "100")  # few-shot linear probes, images per class (3 random subsets each)
DOMAINS = ("in", "ood")  # in domain (the pre-training data set's balanced test set), out of domain (--ood-dir)
PRIMARY = "in linear"  # every claim's pre-registered primary measure


@dataclass(frozen=True)
class Claim:
    """A claim as a paired difference over seeds: ``a`` minus ``b`` of ``measure`` (gap: the relative linear gap
    (A_balanced - A_long-tailed) / A_balanced in %; acc: long-tailed top-1 in points), minus ``c`` minus ``d`` when
    a control pair is given (an interaction). Confirmed when the primary measure's 95% interval lies above
    ``threshold``, refuted when it lies below ``refute_below``. ``also``: paired differences reported beside it."""

    name: str
    source: str
    statement: str
    a: str
    b: str
    measure: str
    threshold: float = 0.0
    refute_below: float = 0.0
    control: tuple[str, ...] = ()
    also: tuple[tuple[str, str], ...] = ()

    @property
    def rows(self) -> tuple[str, ...]:
        return (self.a, self.b, *self.control, *(r for pair in self.also for r in pair))


CLAIMS = [
    Claim(
        "supervised-vs-ssl",
        "Liu et al. (ICLR 2022), Sec. 3",
        "supervised pre-training loses more to the long tail than SSL: supervised's relative gap minus SimSiam's "
        "is > 0 (confirmed if the 95% interval is above 0, refuted if below 0); out of domain, and its excess over "
        "in domain, are reported beside it",
        "supervised",
        "simsiam",
        "gap",
    ),
    Claim(
        "rwsam",
        "Liu et al. (ICLR 2022), Sec. 4",
        "rwSAM closes part of SSL's gap: SimSiam's relative gap minus rwSAM's is > 0 (confirmed if the 95% interval "
        "is above 0, refuted if below 0)",
        "simsiam",
        "rwsam",
        "gap",
    ),
    Claim(
        "pmsn",
        "Assran et al. (ICLR 2023), Sec. 5",
        "on long-tailed data a power-law cluster prior beats MSN's uniform one: PMSN's linear top-1 minus MSN's is "
        "> 0 (confirmed if the 95% interval is above 0, refuted if below 0)",
        "pmsn",
        "msn",
        "acc",
    ),
    Claim(
        "excb-batch",
        "Metaxas et al. (ECCV 2024), Sec. 3",
        "ExCB's balancing does not need large batches: balancing's advantage (linear top-1 with minus without "
        "--no-balancing) at the recipe's batch minus the same at 4x the batch, same images seen, is not below "
        "-1 point (margin 1 point: confirmed if the 95% interval is above -1, refuted if below -1); the plain batch "
        "comparison and each batch's advantage are reported beside it",
        "excb",
        "excb_nobal",
        "acc",
        threshold=-1.0,
        refute_below=-1.0,
        control=("excb_4x", "excb_4x_nobal"),
        also=(("excb", "excb_4x"), ("excb", "excb_nobal"), ("excb_4x", "excb_4x_nobal")),
    ),
]
# the range of every numeric flag (lt_data.check_ranges; the data flags' are lt_data.RANGES, checked by build_data)
RANGES = dict(extension="[1, inf)", train_steps="[1, inf)", jobs="[1, inf)", num_workers="[0, inf)")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


@lt_data.help_from_docstrings
@dataclass
class GapArgs:
    """The papers' claims on long-tailed pre-training, each with a verdict that can fail."""

    preset: Literal["cpu", "gpu"] = "cpu"
    """cpu: the CPU recipes' ViT at 16 px for every row; gpu: the papers' backbones at 28 px (each script's
    cifar10-lt recipe) at 1/25 of their CIFAR-LT epochs (docs/claims.md)"""
    claims: tuple[str, ...] = tuple(c.name for c in CLAIMS)
    """claims to run, in order (the rows each needs are trained and probed, then its verdict is written)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """training seeds (>= 1): seed s also picks the long-tailed subset and its class order; its probes use
    --seed s - 1"""
    dataset: lt_data.DatasetName = "fashion-mnist"
    """data set of the pre-training sets and of the in-domain probe"""
    data_dir: str = lt_data.FASHION_MNIST_DEBIAN
    """--data-dir of the scripts"""
    imbalance_ratio: float = 100.0
    """head/tail ratio of the long-tailed sets"""
    image_size: Optional[int] = None
    """input resolution; default: the preset's (16 cpu, 28 gpu)"""
    synthetic_classes: int = 10
    """synthetic: classes"""
    synthetic_per_class: int = 500
    """synthetic: images per class before subsampling"""
    ood_dir: str = "data/mnist5k"
    """the out-of-domain ImageFolder (train/ and val/ of class folders; benchmarks/make_imagefolder.py mnist-5k)"""
    extension: int = 2
    """the levelled-off rule's cap: a run that has not levelled off is trained afresh once with this many times
    its steps; 1: never"""
    train_steps: Optional[int] = None
    """replaces every run's --train-steps (short checks; the 4x-batch ExCB rows then see 4x the images)"""
    extra: str = ""
    """extra flags passed to every training script (after the recipe's), e.g. --extra="--amp none" """
    jobs: int = 1
    """runs and probes at once, each with cores / jobs threads"""
    num_workers: int = 2
    """data-loading workers of each training run and probe (0: in-process loading, best with --jobs above 1 on a
    small CPU)"""
    output_dir: str = "runs/claims"
    """where the runs, the split files, the probes' JSONs, claims.md, gap_table.json and the figures go"""


def fail(message: str) -> NoReturn:
    print(f"gap_table.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_name(row: str, pretrain: str, seed: int) -> str:
    return f"{row}_{SETS[pretrain]}_s{seed}"


def split_file(args: GapArgs, seed: int, targets: list[int]) -> str:
    """Seed ``seed``'s long-tailed subset as an --index-file (<output-dir>/splits/lt_s<seed>.txt): the exp
    profile's counts (lt_data.long_tail_counts, n_max the smallest class) given to the classes in a seeded random
    order, then a seeded choice of each class's images (lt_data.select_per_class). Written once; a file that holds
    another subset (another data set or ratio in the same --output-dir) stops the run with one line."""
    path = os.path.abspath(os.path.join(args.output_dir, "splits", f"lt_s{seed}.txt"))
    num_classes = max(targets) + 1
    sizes = lt_data.long_tail_counts(
        min(lt_data.class_histogram(targets, num_classes)), num_classes, args.imbalance_ratio
    )
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    counts = [0] * num_classes
    for rank, c in enumerate(order):  # the rank-th largest size goes to class order[rank]
        counts[c] = sizes[rank]
    text = "\n".join(map(str, lt_data.select_per_class(targets, counts, seed))) + "\n"
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                fail(
                    f"{path} holds another long-tailed subset (another data set or --imbalance-ratio); "
                    "use another --output-dir"
                )
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "w") as f:
        f.write(text)
    os.replace(path + ".part", path)
    return path


def split_counts(path: str, targets: list[int]) -> list[int]:
    """The class counts of a split file's images."""
    with open(path) as f:
        return lt_data.class_histogram([targets[int(i)] for i in f.read().split()], max(targets) + 1)


def flags_of(args: GapArgs, row: str, pretrain: str) -> tuple[str, list[str]]:
    """The training script of a row and its flags: the preset's recipe, the monitor, the row's, --extra's."""
    preset = PRESETS[args.preset]
    spec = preset.rows[row]
    script, recipe = RECIPES[spec.method]
    recipe = [preset.recipe if i and recipe[i - 1] == "--recipe" else f for i, f in enumerate(recipe)]
    steps = ["--train-steps", str(args.train_steps)] if args.train_steps else []
    flags = [*recipe, *MONITOR, *spec.flags, *steps, *shlex.split(args.extra)]
    return script, flags + (["--balanced-twin"] if pretrain == "balanced" else [])


def train(args: GapArgs, row: str, pretrain: str, seed: int, data: list[str]) -> dict:
    """Pre-train one run (unless its backbone.pt exists): {"run": its folder name, "level": levelled()}."""
    script, flags = flags_of(args, row, pretrain)
    name = run_name(row, pretrain, seed)
    backbone = pretrain_run(script, flags, data, args.output_dir, name, seed, args.num_workers)
    level = levelled(monitor_curve(os.path.dirname(backbone)))
    return {"run": name, "level": level}


def extend_and_probe(args: GapArgs, row: str, pretrain: str, seed: int, data: list[str], base, group_runs) -> dict:
    """The levelled-off rule's consequence, then the probes: when a run of the budget group (``group_runs``: the
    futures of train() of the group's runs at this seed) has not levelled off, every run of the group is trained
    afresh once with --extension times its own steps (its schedules re-planned; <run>_x<extension>), and that run
    replaces it. The final run is probed in and out of domain: {domain: probe JSON, "run", "level"}."""
    run = base.result()
    if args.extension > 1 and not all(r.result()["level"]["levelled"] for r in group_runs):
        script, flags = flags_of(args, row, pretrain)
        name = f"{run['run']}_x{args.extension}"
        longer = [*flags, "--train-steps", str(args.extension * run["level"]["steps"])]
        backbone = pretrain_run(script, longer, data, args.output_dir, name, seed, args.num_workers)
        level = levelled(monitor_curve(os.path.dirname(backbone)))
        run = {"run": name, "level": level}
    backbone = os.path.join(args.output_dir, run["run"], "backbone.pt")
    arch = PRESETS[args.preset].arch[PRESETS[args.preset].rows[row].method]
    out = lambda d: os.path.join(args.output_dir, run["run"], f"probe_{d}.json")  # noqa: E731
    return {d: probe_domain(args, backbone, out(d), seed, d, arch) for d in DOMAINS} | run


def probe_domain(args: GapArgs, backbone: str, out: str, seed: int, domain: str, arch: str, floor: str = "") -> dict:
    flags = ["--shots", *SHOTS, *(["--dataset", "imagefolder", "--data-dir", args.ood_dir] if domain == "ood" else [])]
    # the kNN docs/claims.md registered: T 0.1, k 200 in domain, 20 on the 400-a-class MNIST set
    flags += ["--knn-k", "20" if domain == "ood" else "200", "--knn-temperature", "0.1"]
    flags += {"": READOUT[arch], "random init": ["--random-init", *READOUT[arch]], "raw pixels": ["--raw-pixels"]}[
        floor
    ]
    return probe(backbone, out, seed - 1, args.num_workers, flags=flags)


def floors(args: GapArgs, seed: int, arch: str, trained, pixels: bool) -> dict:
    """The architecture ``arch`` at random init (and, with ``pixels``, the raw pixels), probed like the trained rows
    (``trained``: the future of a trained run of ``arch`` and seed ``seed``, whose backbone.pt gives the data flags
    and the architecture)."""
    run = trained.result()["run"]
    backbone = os.path.join(args.output_dir, run, "backbone.pt")
    one_arch = len(set(PRESETS[args.preset].arch.values())) == 1
    slug = {"random init": "random" if one_arch else f"random_{arch}"} | ({"raw pixels": "pixels"} if pixels else {})
    row = lambda f: f if one_arch or f == "raw pixels" else f"{f} ({arch})"  # noqa: E731
    return {
        row(f): {
            d: probe_domain(
                args, backbone, os.path.join(args.output_dir, f"{slug[f]}_{d}_s{seed}.json"), seed, d, arch, f
            )
            for d in DOMAINS
        }
        for f in slug
    }


def monitor_curve(run_dir: str) -> list[tuple[int, float]]:
    """(step, eval/knn_top1) of a run's online kNN monitor, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("eval/knn_top1")] if "eval/knn_top1" in acc.Tags()["scalars"] else []


def levelled(curve: list[tuple[int, float]]) -> dict:
    """The levelled-off rule on a monitor curve: the gain from its last evaluation at or before 80% of the steps
    to its last one, that gain per 20% of the run (the window holds 20% to 33% of the steps with one evaluation an
    epoch), and whether that rate is under LEVEL_POINTS."""
    if len(curve) < 2:
        return {"gain": None, "from_step": None, "steps": curve[-1][0] if curve else None, "levelled": False}
    last_step = curve[-1][0]
    start = max((p for p in curve if p[0] <= 0.8 * last_step), key=lambda p: p[0])
    gain = curve[-1][1] - start[1]
    per_fifth = gain * 0.2 * last_step / (last_step - start[0])
    return {
        "gain": gain,
        "from_step": start[0],
        "steps": last_step,
        "final": curve[-1][1],
        "gain_per_fifth": per_fifth,
        "levelled": per_fifth < LEVEL_POINTS,
    }


def mean_ci(values: list[float]) -> dict:
    """Mean, sample std and the 95% t-interval of the mean over seeds (no interval from one seed)."""
    m = statistics.mean(values)
    if len(values) < 2:
        return {"mean": m, "std": None, "low": None, "high": None, "n": len(values)}
    sd = statistics.stdev(values)
    half = T975.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
    return {"mean": m, "std": sd, "low": m - half, "high": m + half, "n": len(values)}


def top1(res: dict, metric: str) -> float:
    """linear / knn top-1, or a few-shot linear top-1 ("10-shot")."""
    return res["few_shot"][metric.split("-")[0]]["top1"] if metric.endswith("shot") else res[metric]["top1"]


def per_seed(table: dict, row: str, measure: str, domain: str, metric: str) -> dict:
    """{seed: the row's value}: long-tailed top-1 (acc) or the relative gap in % (gap)."""
    runs = table.get(row, {})
    lt = {s: top1(r[domain], metric) for s, r in runs.get("long-tailed", {}).items()}
    if measure == "acc":
        return lt
    bal = {s: top1(r[domain], metric) for s, r in runs.get("balanced", {}).items()}
    return {s: 100 * (bal[s] - lt[s]) / bal[s] for s in lt if s in bal}


def paired(table: dict, rows: tuple[str, ...], measure: str, domain: str, metric: str = "linear") -> Optional[dict]:
    """The per-seed paired difference rows[0] - rows[1] (minus rows[2] - rows[3] when four rows are given: an
    interaction), over the seeds every row has, with its mean and 95% interval."""
    values = [per_seed(table, r, measure, domain, metric) for r in rows]
    seeds = sorted(set.intersection(*(set(v) for v in values)), key=int)
    if not seeds:
        return None
    diffs = {s: values[0][s] - values[1][s] - (values[2][s] - values[3][s] if len(rows) == 4 else 0) for s in seeds}
    return {"per_seed": diffs, **mean_ci(list(diffs.values()))}


def verdict(claim: Claim, stat: Optional[dict]) -> str:
    if stat is None or stat["low"] is None:
        return "not resolved (fewer than 2 seeds)"
    if stat["low"] > claim.threshold:
        return "confirmed"
    if stat["high"] < claim.refute_below:
        return "refuted"
    return "not resolved at this budget"


def evaluate_claim(table: dict, claim: Claim) -> dict:
    """The primary measure's interval and verdict, and every secondary measure as a descriptive interval. Rows of
    the primary statistic still learning at the cap make the verdict "not resolved: still learning"."""
    rows = (claim.a, claim.b, *claim.control)
    metrics = ("linear", "knn", *(f"{s}-shot" for s in SHOTS))
    results = {f"{d} {m}": paired(table, rows, claim.measure, d, m) for d in DOMAINS for m in metrics}
    primary = results.pop(PRIMARY)
    if claim.name == "supervised-vs-ssl" and primary and results["ood linear"]:  # "more so out of domain"
        o = results["ood linear"]["per_seed"]
        excess = {s: o[s] - primary["per_seed"][s] for s in primary["per_seed"] if s in o}
        results["ood minus in, linear"] = {"per_seed": excess, **mean_ci(list(excess.values()))}
    for a, b in claim.also:
        for d in DOMAINS:
            results[f"{a} - {b}, {d} linear"] = paired(table, (a, b), claim.measure, d)
    learning = [
        f"{r} {p} s{s}"
        for r in rows
        for p, runs in table.get(r, {}).items()
        for s, run in runs.items()
        if not run["level"]["levelled"]
    ]
    v = verdict(claim, primary)
    if learning and v != "not resolved (fewer than 2 seeds)":
        v = "not resolved: still learning"
    return {"claim": asdict(claim), "primary": primary, "verdict": v, "still_learning": learning, "secondary": results}


def main(args: GapArgs) -> dict:
    names = [c.name for c in CLAIMS]
    unknown = [c for c in args.claims if c not in names]
    if unknown or not args.claims:
        fail(f"unknown claim {unknown[0]!r}; choose from {', '.join(names)}" if unknown else "give --claims")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 1:
        fail(f"--seeds must be one or more distinct seeds >= 1, got {list(args.seeds)}")
    preset = PRESETS[args.preset]
    args.image_size = args.image_size or preset.image_size
    try:  # the flags' ranges; the training set's labels (the split files); both data sets before hours of training
        lt_data.check_ranges(args, RANGES)
        targets = list(lt_data.build_data(data_args(args)).train_full.targets)
        lt_data.build_data(lt_data.DataArgs(dataset="imagefolder", data_dir=args.ood_dir, image_size=args.image_size))
    except lt_data.DataError as e:
        fail(f"{lt_data.error_line(e)} (the out-of-domain set: benchmarks/make_imagefolder.py mnist-5k)")
    os.makedirs(args.output_dir, exist_ok=True)
    if args.jobs > 1:  # every run and probe a share of the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, lt_data.usable_cpus() // args.jobs))
    splits = {s: split_file(args, s, targets) for s in args.seeds}
    counts = {str(s): split_counts(path, targets) for s, path in splits.items()}  # the figure's x axis
    # seed s's data flags: its split file, and its split seed (the balanced twin's draw)
    data = {s: [*data_flags(args), "--index-file", path, "--split-seed", str(s)] for s, path in splits.items()}

    claims = [c for c in CLAIMS if c.name in args.claims]
    table, done, result, base, tasks, floor_tasks = {}, [], {}, {}, {}, {}
    with ThreadPoolExecutor(args.jobs) as pool:  # everything queued in claim order; a claim's report waits for its rows
        for claim in claims:
            keys = [(r, p, s) for s in args.seeds for r in dict.fromkeys(claim.rows) for p in preset.rows[r].sets]
            keys = [k for k in keys if k not in tasks]
            for key in keys:  # the runs first, then (FIFO: a task waits only on tasks already started) the rule
                base[key] = pool.submit(train, args, *key, data[key[2]])
            for r, p, s in keys:
                grouped = [
                    f for (r2, _, s2), f in base.items() if s2 == s and group(preset.rows[r2]) == group(preset.rows[r])
                ]
                tasks[(r, p, s)] = pool.submit(extend_and_probe, args, r, p, s, data[s], base[(r, p, s)], grouped)
            for r, _, s in keys:  # the floors of each architecture, once, with a trained run's data flags
                arch = preset.arch[preset.rows[r].method]
                if (arch, s) not in floor_tasks:
                    pixels = not any(k[1] == s for k in floor_tasks)
                    floor_tasks[(arch, s)] = pool.submit(floors, args, s, arch, tasks[(r, "long-tailed", s)], pixels)
        archs = set()  # the architectures of the claims reported so far (their floors)
        for claim in claims:
            for r, p, s in ((r, p, s) for (r, p, s) in tasks if r in claim.rows):
                table.setdefault(r, {}).setdefault(p, {})[str(s)] = tasks[(r, p, s)].result()
            archs |= {preset.arch[preset.rows[r].method] for r in claim.rows}
            for (arch, s), task in floor_tasks.items():
                for f, res in task.result().items() if arch in archs else ():
                    table.setdefault(f, {}).setdefault("floor", {})[str(s)] = res
            done.append(evaluate_claim(table, claim))
            result = report(args, table, done, counts)
    return result


def report(args: GapArgs, table: dict, claims: list[dict], counts: dict) -> dict:
    """Rewrite claims.md, gap_table.json and the figures from every row and verdict so far; print the report."""
    curves = {
        f"{row} {pretrain}": {s: monitor_curve(os.path.join(args.output_dir, r["run"])) for s, r in runs.items()}
        for row, sets in table.items()
        for pretrain, runs in sets.items()
        if pretrain != "floor"
    }
    result = {"args": asdict(args), "long_tailed_class_counts": counts, "table": table, "claims": claims}
    text = markdown(table, claims)
    print(text)
    with open(os.path.join(args.output_dir, "claims.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "gap_table.json"), "w") as f:
        json.dump(result, f, indent=1)
    figures(table, curves, counts, args.output_dir)
    return result


def fmt(s: Optional[dict], unit: str = "") -> str:
    if s is None:
        return "-"
    if s.get("low") is None:
        return f"{s['mean']:+.2f}{unit}" if "per_seed" in s else f"{s['mean']:.2f}"
    return (
        f"{s['mean']:+.2f}{unit} [{s['low']:+.2f}, {s['high']:+.2f}]"
        if "per_seed" in s
        else f"{s['mean']:.2f} ± {s['std']:.2f}"
    )


def markdown(table: dict, claims: list[dict]) -> str:
    cols = [(d, m) for d in DOMAINS for m in ("linear", "knn", *(f"{s}-shot" for s in SHOTS))]
    lines = [
        "| row | pre-training set | "
        + " | ".join(f"{d} {m}" for d, m in cols)
        + " | in: many / medium / few | steps | monitor: final kNN, gain per 20% of the run | levelled |",
        "|---" * (len(cols) + 6) + "|",
    ]
    for row, sets in table.items():
        for pretrain, runs in sets.items():
            cells = [fmt(mean_ci([top1(r[d], m) for r in runs.values()])) for d, m in cols]
            groups = " / ".join(
                fmt(mean_ci([r["in"]["linear"][g] for r in runs.values()])) for g in ("many", "medium", "few")
            )
            if pretrain == "floor":
                lines.append(f"| {row} | {pretrain} | {' | '.join(cells)} | {groups} | - | - | - |")
                continue
            level = [r["level"] for r in runs.values()]
            steps = " / ".join(str(v["steps"]) for v in level)
            rated = [v for v in level if v["gain"] is not None]
            mon = (
                f"{statistics.mean(v['final'] for v in rated):.2f}, "
                + " / ".join(f"{v['gain_per_fifth']:+.2f}" for v in rated)
                if rated
                else "-"
            )
            ok = f"{sum(v['levelled'] for v in level)} of {len(level)}"
            lines.append(f"| {row} | {pretrain} | {' | '.join(cells)} | {groups} | {steps} | {mon} | {ok} |")
    lines += [
        "",
        "| claim | source | primary: in-domain linear, a - b (mean [95% interval] over seeds) | verdict |",
        "|---|---|---|---|",
    ]
    for c in claims:
        claim, unit = c["claim"], "%" if c["claim"]["measure"] == "gap" else ""
        name = f"{claim['name']} ({claim['a']} - {claim['b']}"
        name += f") - ({claim['control'][0]} - {claim['control'][1]})" if claim["control"] else ")"
        learning = f" ({', '.join(c['still_learning'])})" if c["verdict"] == "not resolved: still learning" else ""
        lines.append(f"| {name} | {claim['source']} | {fmt(c['primary'], unit)} | {c['verdict']}{learning} |")
    n = sum(len(c["secondary"]) for c in claims)
    lines += [
        "",
        f"Secondary measures: {n} intervals, descriptive only. At 95% each, about {n / 20:.1f} of them would exclude 0 "
        "by chance alone if no difference were real; none makes a verdict.",
        "",
        "| claim | secondary measure | mean [95% interval] |",
        "|---|---|---|",
    ]
    for c in claims:
        unit = "%" if c["claim"]["measure"] == "gap" else ""
        lines += [f"| {c['claim']['name']} | {key} | {fmt(s, unit)} |" for key, s in c["secondary"].items()]
    lines += ["", *(f"- **{c['claim']['name']}**: {c['claim']['statement']}. Verdict: {c['verdict']}." for c in claims)]
    return "\n".join(lines)


def figures(table: dict, curves: dict, counts: dict, out_dir: str) -> None:
    """monitor_curves.png: kNN monitor against steps, one line per row and set (mean over seeds, up to the shortest
    seed's last step; tab20's colours: no two of up to 20 lines share one, consecutive lines pair a hue, dark then
    light); gap_figure.png: per-class linear top-1 against the class's count in its seed's long-tailed set, for the
    rows with a balanced twin (mean over seeds of the class of each size rank)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figures skipped: matplotlib is not installed (pip install -r benchmarks/requirements.txt)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for name, per_seed in curves.items():
        pts = [c for c in per_seed.values() if c]
        if pts:
            n = min(len(c) for c in pts)
            ax.plot(
                [p[0] for p in pts[0][:n]],
                [statistics.mean(c[i][1] for c in pts) for i in range(n)],
                "o-",
                ms=3,
                label=name,
            )
    ax.set(
        xlabel="training step",
        ylabel="kNN monitor top-1 (%), mean over seeds",
        title="online kNN monitor (to the shortest seed's end)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "monitor_curves.png"), dpi=120)
    plt.close(fig)
    twins = [r for r, sets in table.items() if "balanced" in sets]
    if twins:
        ranked = {s: sorted(range(len(c)), key=lambda k: -c[k]) for s, c in counts.items()}  # classes by size
        sizes = sorted(next(iter(counts.values())), reverse=True)
        fig, axes = plt.subplots(1, len(twins), figsize=(4 * len(twins), 3.4), sharey=True, squeeze=False)
        for ax, row in zip(axes.flat, twins):
            for pretrain in ("balanced", "long-tailed"):
                runs = table[row][pretrain]
                ax.plot(
                    sizes,
                    [
                        statistics.mean(r["in"]["linear"]["per_class"][ranked[s][k]] for s, r in runs.items())
                        for k in range(len(sizes))
                    ],
                    "o-",
                    label=f"{pretrain} pre-training",
                )
            ax.set(xscale="log", title=row, xlabel="images of the class in its seed's long-tailed set")
        axes[0, 0].set_ylabel("per-class linear top-1 (%)")
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "gap_figure.png"), dpi=120)
        plt.close(fig)
    print(f"wrote {out_dir}/monitor_curves.png and {out_dir}/gap_figure.png")


if __name__ == "__main__":
    main(tyro.cli(GapArgs))
