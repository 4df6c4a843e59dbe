"""The three papers' claims at a scale a CPU can run, each as an experiment that can fail.

Every row pre-trains the same backbone (the CPU recipes' 4-layer ViT, benchmarks/recipes.py) on Fashion-MNIST-LT
and, for Liu et al.'s claims, on its balanced twin of the same size, over --seeds. Each exported backbone is probed
frozen with linear_probe.py in domain (the balanced Fashion-MNIST test set: linear, kNN, many / medium / few and
few-shot linear probes) and out of domain (MNIST digits, --ood-dir: linear, kNN, few-shot). Two floors sit beside
the trained rows: the same ViT at random init and the raw pixels (linear_probe.py --raw-pixels). Each run's online
kNN monitor (whole test set, every epoch) is read back from its TensorBoard events: the run counts as levelled off
when the monitor gained less than LEVEL_POINTS over the last part of the run (from its last evaluation at or before
80% of the steps to the end).

The claims and what would confirm or refute each (written before the runs; CLAIMS below): a claim's statistic is a
per-seed paired difference (seed s of one row against seed s of the other: the same split, probe seed and
initialisation seed), reported as its mean with a 95% t-interval over seeds. Confirmed when the interval lies on
the claim's side of its threshold, refuted when it lies wholly on the other side, else not resolved at this budget.

One command runs everything and resumes after an interruption (a trained run is not retrained, a probe whose JSON
exists is not re-run, an interrupted run resumes from its checkpoint); the claims run in order, and after each one
the report (<output-dir>/claims.md, gap_table.json, the figures) is rewritten with every verdict so far:

    python benchmarks/make_imagefolder.py mnist-5k --mnist-csv mnist_5k.csv.gz --train-per-class 400 \\
        --val-per-class 100 --out data/mnist5k      # the out-of-domain set (docs/claims.md says where the file is)
    python benchmarks/gap_table.py --jobs 2 --extra="--amp none"

--jobs N runs N pre-trainings or probes at once, each with cores/N threads and in-process data loading.
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
from typing import NoReturn, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from recipes import RECIPES, data_args, data_flags, probe  # noqa: E402  (the recipes, helpers)
from recipes import pretrain as pretrain_run  # noqa: E402

import lt_data  # noqa: E402  (the data sets the scripts accept)

# Rows: name -> (recipe of benchmarks/recipes.py, flags after the recipe's, pre-training sets). ExCB at batch 256
# sees the same images as at 64 (300 x 256 = 1,200 x 64) with its per-step momenta matched per image
# (1 - 4 (1 - m): the teacher's 0.99 -> 0.96, the size estimate's 0.999 -> 0.996) and its learning rate scaled
# linearly with the batch (the scripts' rule).
ROWS = {
    "supervised": ("supervised", [], ("long-tailed", "balanced")),
    "simsiam": ("simsiam", [], ("long-tailed", "balanced")),
    "rwsam": ("rwsam", [], ("long-tailed", "balanced")),
    "msn": ("msn", [], ("long-tailed",)),
    "pmsn": ("pmsn", [], ("long-tailed",)),
    "excb": ("excb", [], ("long-tailed",)),
    "excb_b256": (
        "excb",
        ["--batch-size", "256", "--train-steps", "300", "--teacher-momentum", "0.96", "--size-momentum", "0.996"],
        ("long-tailed",),
    ),
}
SETS = {"long-tailed": "lt", "balanced": "twin"}  # pre-training set -> run-name suffix
MONITOR = ["--eval-every", "1", "--eval-queries", "0"]  # the kNN monitor every epoch on the whole test set
LEVEL_POINTS = 0.5  # levelled off: the monitor gained less than this over the last >= 20% of the steps
SHOTS = ("10", "100")  # few-shot linear probes, images per class (3 random subsets each)
DOMAINS = ("in", "ood")  # in domain (the pre-training data set's balanced test set), out of domain (--ood-dir)


@dataclass(frozen=True)
class Claim:
    """A claim as a paired difference over seeds: ``a`` minus ``b`` of ``measure`` (gap: the relative linear gap
    (A_balanced - A_long-tailed) / A_balanced in %; acc: long-tailed linear top-1 in points). Confirmed when the
    95% interval lies above ``threshold``, refuted when it lies below ``refute_below``."""

    name: str
    source: str
    statement: str
    a: str
    b: str
    measure: str
    threshold: float = 0.0
    refute_below: float = 0.0


CLAIMS = [
    Claim(
        "supervised-vs-ssl",
        "Liu et al. (ICLR 2022), Sec. 3",
        "supervised pre-training loses more to the long tail than SSL: supervised's relative gap minus SimSiam's "
        "is > 0 (confirmed if the 95% interval is above 0, refuted if below 0), in domain and more so out of domain",
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
        "ExCB's balancing does not need large batches: its linear top-1 at batch 64 minus batch 256 at the same "
        "images seen is not below -1 point (confirmed if the 95% interval is above -1, refuted if below 0)",
        "excb",
        "excb_b256",
        "acc",
        threshold=-1.0,
    ),
]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


@dataclass
class GapArgs:
    """The papers' claims on long-tailed pre-training, each with a verdict that can fail."""

    claims: tuple[str, ...] = tuple(c.name for c in CLAIMS)
    """claims to run, in order (the rows each needs are trained and probed, then its verdict is written)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """training seeds (>= 1; each run's probes use --seed = training seed - 1)"""
    dataset: lt_data.DatasetName = "fashion-mnist"
    """data set of the pre-training sets and of the in-domain probe"""
    data_dir: str = lt_data.FASHION_MNIST_DEBIAN
    """--data-dir of the scripts"""
    imbalance_ratio: float = 100.0
    """head/tail ratio of the long-tailed set"""
    image_size: int = 16
    """input resolution (16 keeps a CPU run to minutes)"""
    synthetic_classes: int = 10
    """synthetic: classes"""
    synthetic_per_class: int = 500
    """synthetic: images per class before subsampling"""
    ood_dir: str = "data/mnist5k"
    """the out-of-domain ImageFolder (train/ and val/ of class folders; benchmarks/make_imagefolder.py mnist-5k)"""
    train_steps: Optional[int] = None
    """replaces every run's --train-steps (short checks; the recipes': 1,800 supervised/SimSiam/rwSAM, 1,200 others)"""
    extra: str = ""
    """extra flags passed to every training script (after the recipe's), e.g. --extra="--amp none" """
    jobs: int = 1
    """runs and probes at once, each with cores / jobs threads and in-process data loading"""
    num_workers: int = 2
    """data-loading workers of each training run and probe (0 with --jobs above 1)"""
    output_dir: str = "runs/claims"
    """where the runs, the probes' JSONs, claims.md, gap_table.json and the figures go"""


def fail(message: str) -> NoReturn:
    print(f"gap_table.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_name(row: str, pretrain: str, seed: int) -> str:
    return f"{row}_{SETS[pretrain]}_s{seed}"


def train_and_probe(args: GapArgs, row: str, pretrain: str, seed: int) -> dict:
    """Pre-train one run (unless its backbone.pt exists) and probe it in and out of domain: {domain: probe JSON}."""
    method, flags, _ = ROWS[row]
    script, recipe = RECIPES[method]
    steps = ["--train-steps", str(args.train_steps)] if args.train_steps else []
    flags = [*recipe, *MONITOR, *flags, *steps, *shlex.split(args.extra)]
    flags += ["--balanced-twin"] if pretrain == "balanced" else []
    name = run_name(row, pretrain, seed)
    backbone = pretrain_run(script, flags, data_flags(args), args.output_dir, name, seed, args.num_workers)
    return {
        d: probe_domain(args, backbone, os.path.join(args.output_dir, name, f"probe_{d}.json"), seed, d)
        for d in DOMAINS
    }


def probe_domain(args: GapArgs, backbone: str, out: str, seed: int, domain: str, floor: str = "") -> dict:
    flags = ["--shots", *SHOTS, *(["--dataset", "imagefolder", "--data-dir", args.ood_dir] if domain == "ood" else [])]
    # the kNN docs/claims.md registered (the probe's defaults then): T 0.1, k 200 capped at a twentieth of the
    # smallest class (200 in domain, 20 on the 400-a-class MNIST set); the probe now defaults to DINO's k 20, T 0.07
    flags += ["--knn-k", "20" if domain == "ood" else "200", "--knn-temperature", "0.1"]
    flags += {"": [], "random init": ["--random-init"], "raw pixels": ["--raw-pixels"]}[floor]
    return probe(backbone, out, seed - 1, args.num_workers, flags=flags)


def floors(args: GapArgs, seed: int, trained) -> dict:
    """The same ViT at random init and the raw pixels, probed like the trained rows (``trained``: the future of a
    trained run of the architecture, whose backbone.pt gives the metadata)."""
    backbone = trained.result()["in"]["checkpoint"]
    slug = {"random init": "random", "raw pixels": "pixels"}
    return {
        f: {
            d: probe_domain(args, backbone, os.path.join(args.output_dir, f"{slug[f]}_{d}_s{seed}.json"), seed, d, f)
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
    """The monitor's gain from its last evaluation at or before 80% of the steps to its last one, and the rule."""
    if len(curve) < 2:
        return {"gain": None, "from_step": None, "levelled": False}
    last_step = curve[-1][0]
    start = max((p for p in curve if p[0] <= 0.8 * last_step), key=lambda p: p[0])
    gain = curve[-1][1] - start[1]
    return {"gain": gain, "from_step": start[0], "final": curve[-1][1], "levelled": gain < LEVEL_POINTS}


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


def statistic(table: dict, claim: Claim, domain: str, metric: str = "linear") -> Optional[dict]:
    """The claim's per-seed paired difference a - b (gap: relative gaps in %; acc: long-tailed top-1 in points)."""

    def per_seed(row: str) -> dict:
        runs = table.get(row, {})
        lt = {s: top1(r[domain], metric) for s, r in runs.get("long-tailed", {}).items()}
        if claim.measure == "acc":
            return lt
        bal = {s: top1(r[domain], metric) for s, r in runs.get("balanced", {}).items()}
        return {s: 100 * (bal[s] - lt[s]) / bal[s] for s in lt if s in bal}

    a, b = per_seed(claim.a), per_seed(claim.b)
    seeds = sorted(set(a) & set(b), key=int)
    if not seeds:
        return None
    diffs = {s: a[s] - b[s] for s in seeds}
    return {
        "per_seed": diffs,
        "a": mean_ci([a[s] for s in seeds]),
        "b": mean_ci([b[s] for s in seeds]),
        **mean_ci(list(diffs.values())),
    }


def verdict(claim: Claim, stat: Optional[dict]) -> str:
    if stat is None or stat["low"] is None:
        return "not resolved (fewer than 2 seeds)"
    if stat["low"] > claim.threshold:
        return "confirmed"
    if stat["high"] < claim.refute_below:
        return "refuted"
    return "not resolved at this budget"


def evaluate_claim(table: dict, claim: Claim) -> dict:
    out = {"claim": asdict(claim), "results": {}}
    for domain in DOMAINS:
        for metric in ("linear", "knn", *(f"{s}-shot" for s in SHOTS)):
            stat = statistic(table, claim, domain, metric)
            out["results"][f"{domain} {metric}"] = {"stat": stat, "verdict": verdict(claim, stat)}
    if claim.name == "supervised-vs-ssl":  # "more so out of domain": the difference's out-of-domain excess
        i, o = statistic(table, claim, "in"), statistic(table, claim, "ood")
        if i and o:
            per_seed = {s: o["per_seed"][s] - i["per_seed"][s] for s in i["per_seed"]}
            excess = {"per_seed": per_seed, **mean_ci(list(per_seed.values()))}
            out["results"]["ood minus in, linear"] = {"stat": excess, "verdict": verdict(claim, excess)}
    out["verdict"] = out["results"]["in linear"]["verdict"]
    return out


def main(args: GapArgs) -> dict:
    names = [c.name for c in CLAIMS]
    unknown = [c for c in args.claims if c not in names]
    if unknown or not args.claims:
        fail(f"unknown claim {unknown[0]!r}; choose from {', '.join(names)}" if unknown else "give --claims")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 1:
        fail(f"--seeds must be one or more distinct seeds >= 1, got {list(args.seeds)}")
    if args.train_steps is not None and args.train_steps < 1:
        fail(f"--train-steps must be >= 1, got {args.train_steps}")
    if args.num_workers < 0 or args.jobs < 1:
        fail(f"--num-workers must be >= 0 and --jobs >= 1, got {args.num_workers} and {args.jobs}")
    try:  # the long-tailed class counts (the figure's x axis); checks both data sets before hours of training
        counts = lt_data.build_data(data_args(args)).class_counts
        lt_data.build_data(lt_data.DataArgs(dataset="imagefolder", data_dir=args.ood_dir, image_size=args.image_size))
    except lt_data.DataError as e:
        fail(f"{lt_data.error_line(e)} (the out-of-domain set: benchmarks/make_imagefolder.py mnist-5k)")
    os.makedirs(args.output_dir, exist_ok=True)
    if args.jobs > 1:  # every run and probe a share of the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, lt_data.usable_cpus() // args.jobs))

    claims = [c for c in CLAIMS if c.name in args.claims]
    table, done, result, tasks, floor_tasks = {}, [], {}, {}, {}
    with ThreadPoolExecutor(args.jobs) as pool:  # everything queued in claim order; a claim's report waits for its rows
        for claim in claims:
            for key in ((r, p, s) for s in args.seeds for r in (claim.a, claim.b) for p in ROWS[r][2]):
                tasks[key] = tasks.get(key) or pool.submit(train_and_probe, args, *key)
            for s in args.seeds if not floor_tasks else ():  # the floors, once, with a trained run's metadata
                floor_tasks[s] = pool.submit(floors, args, s, tasks[(claim.a, "long-tailed", s)])
        for claim in claims:
            for r, p, s in ((r, p, s) for (r, p, s) in tasks if r in (claim.a, claim.b)):
                table.setdefault(r, {}).setdefault(p, {})[str(s)] = tasks[(r, p, s)].result()
            for s, task in floor_tasks.items():
                for f, res in task.result().items():
                    table.setdefault(f, {}).setdefault("floor", {})[str(s)] = res
            done.append(evaluate_claim(table, claim))
            result = report(args, table, done, counts)
    return result


def report(args: GapArgs, table: dict, claims: list[dict], counts: list[int]) -> dict:
    """Rewrite claims.md, gap_table.json and the figures from every row and verdict so far; print the verdicts."""
    curves = {
        f"{row} {pretrain}": {
            s: monitor_curve(os.path.join(args.output_dir, run_name(row, pretrain, int(s)))) for s in runs
        }
        for row, sets in table.items()
        for pretrain, runs in sets.items()
        if pretrain != "floor"
    }
    level = {name: {s: levelled(c) for s, c in per_seed.items()} for name, per_seed in curves.items()}
    result = {
        "args": asdict(args),
        "long_tailed_class_counts": counts,
        "table": table,
        "levelled": level,
        "claims": claims,
    }
    text = markdown(table, level, claims)
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
        return f"{s['mean']:.2f}{unit}"
    return (
        f"{s['mean']:+.2f}{unit} [{s['low']:+.2f}, {s['high']:+.2f}]"
        if "per_seed" in s
        else f"{s['mean']:.2f} ± {s['std']:.2f}"
    )


def markdown(table: dict, level: dict, claims: list[dict]) -> str:
    cols = [(d, m) for d in DOMAINS for m in ("linear", "knn", *(f"{s}-shot" for s in SHOTS))]
    lines = [
        "| row | pre-training set | "
        + " | ".join(f"{d} {m}" for d, m in cols)
        + " | in: many / medium / few | monitor: final kNN, gain over the last >= 20% | levelled |",
        "|---" * (len(cols) + 5) + "|",
    ]
    for row, sets in table.items():
        for pretrain, runs in sets.items():
            cells = [fmt(mean_ci([top1(r[d], m) for r in runs.values()])) for d, m in cols]
            groups = " / ".join(
                fmt(mean_ci([r["in"]["linear"][g] for r in runs.values()])) for g in ("many", "medium", "few")
            )
            lv = [v for v in level.get(f"{row} {pretrain}", {}).values() if v["gain"] is not None]
            finals, gains = (
                statistics.mean(v["final"] for v in lv) if lv else 0,
                " / ".join(f"{v['gain']:+.2f}" for v in lv),
            )
            mon = f"{finals:.2f}, {gains}" if lv else "-"
            ok = f"{sum(v['levelled'] for v in lv)} of {len(runs)}" if pretrain != "floor" else "-"
            lines.append(f"| {row} | {pretrain} | {' | '.join(cells)} | {groups} | {mon} | {ok} |")
    lines += [
        "",
        "| claim | source | measured (a - b: mean [95% interval] over seeds) | verdict |",
        "|---|---|---|---|",
    ]
    for c in claims:
        claim, unit = c["claim"], "%" if c["claim"]["measure"] == "gap" else ""
        for key, r in c["results"].items():
            name = f"{claim['name']} ({claim['a']} - {claim['b']})"
            lines.append(f"| {name} | {claim['source']} | {key}: {fmt(r['stat'], unit)} | {r['verdict']} |")
    lines += [
        "",
        *(
            f"- **{c['claim']['name']}**: {c['claim']['statement']}. Verdict (in domain, linear): {c['verdict']}."
            for c in claims
        ),
    ]
    return "\n".join(lines)


def figures(table: dict, curves: dict, counts: list[int], out_dir: str) -> None:
    """monitor_curves.png: kNN monitor against steps, one line per row and set (mean over seeds); gap_figure.png:
    per-class linear top-1 against the long-tailed class count for the rows with a balanced twin."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figures skipped: matplotlib is not installed (pip install -r benchmarks/requirements.txt)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.set(xlabel="training step", ylabel="kNN monitor top-1 (%), mean over seeds", title="online kNN monitor")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "monitor_curves.png"), dpi=120)
    plt.close(fig)
    twins = [r for r, sets in table.items() if "balanced" in sets]
    if twins:
        order = sorted(range(len(counts)), key=lambda c: counts[c])
        fig, axes = plt.subplots(1, len(twins), figsize=(4 * len(twins), 3.4), sharey=True, squeeze=False)
        for ax, row in zip(axes.flat, twins):
            for pretrain in ("balanced", "long-tailed"):
                per_class = [r["in"]["linear"]["per_class"] for r in table[row][pretrain].values()]
                ax.plot(
                    [counts[c] for c in order],
                    [statistics.mean(p[c] for p in per_class) for c in order],
                    "o-",
                    label=f"{pretrain} pre-training",
                )
            ax.set(xscale="log", title=row, xlabel="images of the class in the long-tailed set")
        axes[0, 0].set_ylabel("per-class linear top-1 (%)")
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "gap_figure.png"), dpi=120)
        plt.close(fig)
    print(f"wrote {out_dir}/monitor_curves.png and {out_dir}/gap_figure.png")


if __name__ == "__main__":
    main(tyro.cli(GapArgs))
