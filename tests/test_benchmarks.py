"""The benchmark scripts run end to end as a user runs them (tiny settings; their figures are not checked,
only that they are produced and consistent with what the scripts wrote)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import HANG_GUARD, NATIVE_AMP, ROOT, native_bf16, script_env


def run_benchmark(name: str, *args: str, cwd) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


# gpu_check's mode for the tests' precision: bf16 where the CPU has it natively, else fp32 (conftest.native_bf16)
NATIVE_MODE = "bf16" if NATIVE_AMP == "bf16" else "fp32"


def test_native_bf16_is_the_scripts_rule_unless_overridden(monkeypatch):
    """conftest.native_bf16: the scripts' --amp auto rule on this CPU; SSL_TEST_NO_BF16=1 runs the tests as on a CPU
    without native bf16 (the precision-picking tests then take their fp32 path)."""
    from supervised_baseline import resolve_amp

    monkeypatch.delenv("SSL_TEST_NO_BF16", raising=False)
    assert native_bf16() == (resolve_amp("auto", torch.device("cpu")) == "bf16")
    monkeypatch.setenv("SSL_TEST_NO_BF16", "1")
    assert native_bf16() is False


@pytest.mark.parametrize("name", ["gpu_check.py", "step_cost.py"])
def test_benchmark_rates_keep_three_significant_digits(name, monkeypatch):
    """A slow run's rate (bf16 emulated on a CPU without it: a fraction of an image per second) printed as 0 img/s,
    and the smoke test took it for a failure."""
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    assert [module.rate(x) for x in (0.04123, 0.4, 2.5, 26.31, 260.4, 12345.6)] == [
        "0.0412",
        "0.400",
        "2.50",
        "26.3",
        "260",
        "12346",
    ]


@pytest.mark.slow
def test_step_cost_prints_a_row_per_method_and_precision(tmp_path):
    """One row per method and precision (bf16 only where the CPU computes it natively: emulated, it is ~10x slower
    than fp32), its figures positive; step / limit >= step / (limit + optimizer) by construction (no timing race)."""
    amps = [NATIVE_AMP, "none"] if NATIVE_AMP != "none" else ["none"]
    out = run_benchmark(
        "step_cost.py",
        "--methods",
        "supervised",
        "excb",
        "--amp",
        *amps,
        "--repeats",
        "1",
        "--loop-steps",
        "2",
        "--batch-size",
        "8",
        "--image-size",
        "16",
        cwd=tmp_path,
    )
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| (supervised|excb) \|", line)]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [(m, a) for m in ("supervised", "excb") for a in amps]
    for r in rows:
        ratio, ratio_opt, *rates = (float(v) for v in r[2:])
        assert ratio >= ratio_opt > 0 and all(math.isfinite(v) and v > 0 for v in rates)


def test_kde_scale_prints_a_row_per_reference_size(tmp_path):
    """benchmarks/kde_scale.py at a tiny size: the CPU line, the assumptions line, and one table row per reference
    size (every other image first) with its times, shares and, for the subsets, their density error."""
    out = run_benchmark(
        "kde_scale.py",
        *("--n", "600", "--dim", "16", "--queries", "128", "--references", "0", "64", "256", "--chunk-size", "64"),
        *("--classes", "20", "--imbalance", "10", "--step-arch", "resnet18", "--step-size", "16", "--step-batch", "2"),
        *("--step-repeats", "1"),
        cwd=tmp_path,
    )
    assert re.search(r"^kde_scale on .+, (native|no native) bf16, 1 thread\(s\), torch .+: N 600, D 16,", out, re.M)
    assert "assumed, not measured: a GPU runs the update 100x faster" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| (all )?[\d,]+ \|", line)]
    assert [r[0].strip() for r in rows] == ["all 599", "64", "256"]
    for r in rows:
        assert len(r) == 10 and re.fullmatch(r" [\d.]+ s \([\d.]+ s\) ", r[1]) and float(r[2]) > 0
        assert all(re.fullmatch(r" [\d.]+ (ms|s|min|h) ", c) for c in r[3:6])
        assert all(re.fullmatch(r" [\d.]+% ", c) for c in r[6:8])
    assert [r[8].strip() for r in rows][0] == "-" and all(re.fullmatch(r" [\d.]+% ", r[8]) for r in rows[1:])


TINY_DATA = ["--dataset", "synthetic", "--synthetic-classes", "4", "--synthetic-per-class", "24"]


def _tiny_imagefolder(root, classes=4, train=12, val=4, size=16):
    """A tiny out-of-domain ImageFolder of PNGs: a class is a horizontal bar at its own height."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(n):
                img = (torch.rand(size, size, generator=g) * 60).to(torch.uint8)
                img[c * size // classes : c * size // classes + 2] = 255
                Image.fromarray(img.numpy(), "L").save(root / split / str(c) / f"{i}.png")
    return root


def _gap_tiny(tmp_path) -> list[str]:
    ood = tmp_path / "ood" if (tmp_path / "ood").exists() else _tiny_imagefolder(tmp_path / "ood")
    return [
        "--claims",
        "supervised-vs-ssl",
        *TINY_DATA,
        "--imbalance-ratio",
        "4",
        "--image-size",
        "16",
        "--ood-dir",
        str(ood),
        "--extra=--max-steps 2 --batch-size 8",
        "--num-workers",
        "0",
        "--jobs",
        "2",
        "--extension",
        "1",
        "--seeds",
        "1",
        "2",
    ]


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _import_benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its own imports (recipes) as when it runs as a script
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


DINO_VIT_S = {"n_last_blocks": 4, "avgpool_patchtokens": False}  # DINO's eval_linear.py for ViT-S


def _split_counts(path, targets) -> list[int]:
    idx = [int(i) for i in path.read_text().split()]
    return torch.bincount(torch.tensor([targets[i] for i in idx]), minlength=max(targets) + 1).tolist()


@pytest.mark.slow
def test_gap_table_states_each_claim_with_its_interval_and_verdict(tmp_path):
    out = run_benchmark("gap_table.py", *_gap_tiny(tmp_path), cwd=tmp_path)
    gap_dir = tmp_path / "runs" / "claims"
    result = json.loads((gap_dir / "gap_table.json").read_text())
    table = result["table"]
    assert set(table) == {"supervised", "simsiam", "random init", "raw pixels"}
    # each seed its own long-tailed subset and class order (an index file), the same for every row of the seed
    import lt_data

    args = lt_data.DataArgs(dataset="synthetic", synthetic_classes=4, synthetic_per_class=24, image_size=16)
    targets = lt_data.build_data(args).train_full.targets
    counts = {s: _split_counts(gap_dir / "splits" / f"lt_s{s}.txt", targets) for s in (1, 2)}
    assert sorted(counts[1]) == sorted(counts[2]) == sorted(lt_data.long_tail_counts(24, 4, 4.0))
    assert counts[1] != counts[2] and result["long_tailed_class_counts"] == {str(s): c for s, c in counts.items()}
    # every number is a probe's JSON: each run probed in domain and on the ImageFolder, with --seed = seed - 1
    for row in ("supervised", "simsiam"):
        for pretrain, suffix in (("long-tailed", "lt"), ("balanced", "twin")):
            for s in (1, 2):
                run = table[row][pretrain][str(s)]
                # --extension 1: never extended
                assert run["run"] == f"{row}_{suffix}_s{s}" and run["level"]["steps"] == 2
                for domain in ("in", "ood"):
                    probe = json.loads((gap_dir / f"{row}_{suffix}_s{s}" / f"probe_{domain}.json").read_text())
                    assert run[domain] == probe and probe["readout"] == DINO_VIT_S  # DINO's for ViT-S
                    assert probe["dataset"] == ("synthetic" if domain == "in" else "imagefolder")
                    assert set(probe["few_shot"]) == {"10", "100"} and not probe["random_init"]
                assert f"{row}_{suffix}_s{s}/backbone.pt --seed {s - 1} " in out
                ckpt = torch.load(gap_dir / f"{row}_{suffix}_s{s}" / "checkpoint.pt", weights_only=True)
                assert ckpt["args"]["index_file"] == str(gap_dir / "splits" / f"lt_s{s}.txt")
                assert ckpt["args"]["split_seed"] == s and ckpt["args"]["balanced_twin"] == (pretrain == "balanced")
                # many / medium / few follow the seed's own order: "few" is its smallest classes
                few = sorted(range(4), key=lambda c: (counts[s][c], -c))[:1]
                assert run["in"]["linear"]["few"] == pytest.approx(run["in"]["linear"]["per_class"][few[0]])
    for floor, slug, flag in (("random init", "random", "random_init"), ("raw pixels", "pixels", "raw_pixels")):
        for s in (1, 2):
            probe = json.loads((gap_dir / f"{slug}_ood_s{s}.json").read_text())
            assert table[floor]["floor"][str(s)]["ood"] == probe and probe[flag]
            assert probe["readout"] == (DINO_VIT_S if floor == "random init" else None)

    # the claim: supervised's relative gap minus SimSiam's, per seed, with a 95% t-interval (df 1: t = 12.706)
    def gap(row, s, domain):
        bal, lt = (table[row][p][str(s)][domain]["linear"]["top1"] for p in ("balanced", "long-tailed"))
        return 100 * (bal - lt) / bal

    claim = result["claims"][0]
    for domain, stat in (("in", claim["primary"]), ("ood", claim["secondary"]["ood linear"])):
        diffs = [gap("supervised", s, domain) - gap("simsiam", s, domain) for s in (1, 2)]
        m, sd = _mean_std(diffs)
        assert stat["per_seed"] == pytest.approx({"1": diffs[0], "2": diffs[1]})
        assert (stat["mean"], stat["low"], stat["high"]) == pytest.approx(
            (m, m - 12.706 * sd / math.sqrt(2), m + 12.706 * sd / math.sqrt(2))
        )
    # the verdict from the primary measure alone, unless a run it rests on is still learning (--extension 1: no
    # second chance); the secondary measures carry no verdict
    low, high = claim["primary"]["low"], claim["primary"]["high"]
    learning = [
        f"{r} {p} s{s}"
        for r in ("supervised", "simsiam")
        for p, runs in table[r].items()
        for s, run in runs.items()
        if not run["level"]["levelled"]
    ]
    assert claim["still_learning"] == learning
    assert claim["verdict"] == (
        "not resolved: still learning"
        if learning
        else "confirmed"
        if low > 0
        else "refuted"
        if high < 0
        else "not resolved at this budget"
    )
    assert "in linear" not in claim["secondary"] and "ood minus in, linear" in claim["secondary"]
    assert all("verdict" not in s for s in claim["secondary"].values())
    # the monitor of every run, read back from its events: before training, then at the end
    for row in ("supervised", "simsiam"):
        for runs in table[row].values():
            for v in (r["level"] for r in runs.values()):
                assert v["from_step"] == 0 and v["levelled"] == (v["gain_per_fifth"] < 0.5)
    report = (gap_dir / "claims.md").read_text()
    assert "| supervised | long-tailed | " in report and "- **supervised-vs-ssl**: " in report and report in out + "\n"
    assert "Secondary measures: 8 intervals, descriptive only" in report
    # a rerun trains and probes nothing and gives the same JSON
    outputs = sorted(gap_dir.glob("**/*.pt")) + sorted(gap_dir.glob("**/*probe_*.json"))
    assert len(outputs) == 8 * 2 + 8 * 2 and not list(gap_dir.glob("**/*.part"))
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    again = run_benchmark("gap_table.py", *_gap_tiny(tmp_path), cwd=tmp_path)
    assert "$ " not in again and [p.stat().st_mtime_ns for p in outputs] == mtimes
    assert json.loads((gap_dir / "gap_table.json").read_text()) == result
    if importlib.util.find_spec("matplotlib"):
        for fig in ("monitor_curves.png", "gap_figure.png"):
            assert (gap_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_gap_table_excb_claim_is_the_interaction_with_its_no_balancing_control(tmp_path):
    """ExCB's claim: (batch B with - without balancing) - (4B with - without), per seed, from the probes' JSONs;
    the 4x rows at 4x the batch over the same images, momenta matched per image; the controls with --no-balancing."""
    args = _gap_tiny(tmp_path)
    args[1] = "excb-batch"
    args[args.index("--extra=--max-steps 2 --batch-size 8")] = "--extra=--max-steps 2"
    args[args.index("--synthetic-per-class") + 1] = "300"  # a long-tailed set of 683 images: 2 batches of 256
    run_benchmark("gap_table.py", *args, cwd=tmp_path)
    gap_dir = tmp_path / "runs" / "claims"
    result = json.loads((gap_dir / "gap_table.json").read_text())
    top1 = {
        (row, s): json.loads((gap_dir / f"{row}_lt_s{s}" / "probe_in.json").read_text())["linear"]["top1"]
        for row in ("excb", "excb_nobal", "excb_4x", "excb_4x_nobal")
        for s in (1, 2)
    }
    for row, (batch, teacher, balancing) in {
        "excb": (64, 0.99, True),
        "excb_nobal": (64, 0.99, False),
        "excb_4x": (256, 0.96, True),
        "excb_4x_nobal": (256, 0.96, False),
    }.items():
        a = torch.load(gap_dir / f"{row}_lt_s1" / "checkpoint.pt", weights_only=True)["args"]
        assert (a["batch_size"], a["teacher_momentum"], a["balancing"]) == (batch, teacher, balancing)
        assert a["train_steps"] == (1200 if batch == 64 else 300)  # the same images seen
    claim = result["claims"][0]
    diffs = [top1["excb", s] - top1["excb_nobal", s] - (top1["excb_4x", s] - top1["excb_4x_nobal", s]) for s in (1, 2)]
    m, sd = _mean_std(diffs)
    half = 12.706 * sd / math.sqrt(2)
    assert (claim["primary"]["mean"], claim["primary"]["low"], claim["primary"]["high"]) == pytest.approx(
        (m, m - half, m + half)
    )
    verdict = "confirmed" if m - half > -1 else "refuted" if m + half < -1 else "not resolved at this budget"
    assert claim["verdict"] == ("not resolved: still learning" if claim["still_learning"] else verdict)
    assert claim["still_learning"] == [
        f"{row} long-tailed s{s}"
        for row in ("excb", "excb_nobal", "excb_4x", "excb_4x_nobal")
        for s in ("1", "2")
        if not result["table"][row]["long-tailed"][s]["level"]["levelled"]
    ]
    plain = [top1["excb", s] - top1["excb_4x", s] for s in (1, 2)]  # the plain batch comparison, beside it
    assert claim["secondary"]["excb - excb_4x, in linear"]["per_seed"] == pytest.approx(dict(zip("12", plain)))


@pytest.mark.slow
def test_gap_table_gpu_preset_runs_end_to_end_on_the_cpu_with_tiny_steps(tmp_path):
    """--preset gpu: each script's cifar10-lt recipe (ResNet-18 for supervised / SimSiam, the ViT-S for MSN / PMSN)
    on the chosen data at 28 px, the preset's epochs; a random-init floor per architecture, the ViTs read out with
    DINO's last 4 class tokens, the ResNets with their pooled feature."""
    args = _gap_tiny(tmp_path)
    args[args.index("--image-size") : args.index("--image-size") + 2] = []
    args[args.index("--seeds") :] = ["--seeds", "1"]
    run_benchmark("gap_table.py", "--preset", "gpu", *args[:2], "pmsn", *args[2:], cwd=tmp_path)
    gap_dir = tmp_path / "runs" / "claims"
    result = json.loads((gap_dir / "gap_table.json").read_text())
    assert set(result["table"]) == {
        "supervised", "simsiam", "msn", "pmsn", "random init (resnet18)", "random init (vit)", "raw pixels"
    }  # fmt: skip
    for run, arch, epochs, readout in (
        ("supervised_lt_s1", "resnet18", 8, None),
        ("simsiam_twin_s1", "resnet18", 32, None),
        ("pmsn_lt_s1", "vit_small", 32, DINO_VIT_S),
    ):
        a = torch.load(gap_dir / run / "checkpoint.pt", weights_only=True)["args"]
        assert (a["arch"], a["image_size"], a["epochs"], a["dataset"]) == (arch, 28, epochs, "synthetic")
        probe = json.loads((gap_dir / run / "probe_in.json").read_text())
        assert probe["readout"] == readout  # None: the backbone's own feature
    for slug, readout in (("random_resnet18", None), ("random_vit", DINO_VIT_S)):
        assert json.loads((gap_dir / f"{slug}_in_s1.json").read_text())["readout"] == readout
    assert [c["verdict"] for c in result["claims"]] == ["not resolved (fewer than 2 seeds)"] * 2


@pytest.mark.slow
def test_claims_estimate_counts_each_row_s_passes():
    """benchmarks/claims_estimate.py on every row of the GPU preset: SimSiam's image is two views of the same
    ResNet-18 pass as supervised's one, rwSAM's twice SimSiam's (SAM), the ExCB rows all alike; per-claim minutes."""
    out = run_benchmark("claims_estimate.py", "--dataset", "synthetic", "--images", "5", cwd=ROOT)
    runs, claims = (
        {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in part.splitlines()[2:] if line.startswith("| ")}
        for part in out.strip().split("\n\n")[-2:]
    )
    gflop = {row: float(cells[1]) for row, cells in runs.items()}
    assert set(gflop) == set(_import_benchmark("gap_table").PRESETS["gpu"].rows)
    assert gflop["simsiam"] == pytest.approx(2 * gflop["supervised"], rel=0.01)
    assert gflop["rwsam"] == pytest.approx(2 * gflop["simsiam"], rel=0.01)
    assert len({gflop[r] for r in ("excb", "excb_4x", "excb_nobal", "excb_4x_nobal")}) == 1
    assert list(claims) == ["supervised-vs-ssl", "rwsam", "pmsn", "excb-batch"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "0"], "--workers"),
        (["--achieved-tflops", "0"], "--achieved-tflops"),
        (["--data-dir", "nope"], "nope"),
    ],
)
def test_claims_estimate_bad_input_one_clear_line(tmp_path, extra, message):
    _fails_in_one_line("claims_estimate.py", extra, message, tmp_path)


def test_gap_table_rules_on_independent_numbers():
    """Independent numbers: 1, 2, 3 have mean 2, sd 1, and a 95% t-interval of 2 -+ 4.303 / sqrt(3)."""
    gap = _import_benchmark("gap_table")
    ci = gap.mean_ci([1.0, 2.0, 3.0])
    assert (ci["low"], ci["high"]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    superiority = gap.Claim("c", "s", "x", "a", "b", "acc")
    non_inferiority = gap.Claim("n", "s", "x", "a", "b", "acc", threshold=-1.0, refute_below=-1.0)
    stat = lambda low, high: {"low": low, "high": high}  # noqa: E731
    assert gap.verdict(superiority, stat(0.1, 2.0)) == "confirmed"
    assert gap.verdict(superiority, stat(-3.0, -0.1)) == "refuted"
    assert gap.verdict(superiority, stat(-0.5, 0.5)) == "not resolved at this budget"
    assert gap.verdict(non_inferiority, stat(-0.5, 0.5)) == "confirmed"
    assert gap.verdict(non_inferiority, stat(-1.5, 0.5)) == "not resolved at this budget"
    assert gap.verdict(non_inferiority, stat(-3.0, -1.2)) == "refuted"
    assert gap.verdict(superiority, {"low": None}) == "not resolved (fewer than 2 seeds)"
    # levelled off: the gain over the last window, per 20% of the run. 80% of 300 is 240: from step 200, a window
    # of a third of the run, so +0.8 there is +0.48 per fifth (levelled); +0.9 is +0.54 (not)
    level = gap.levelled([(0, 60.0), (100, 70.0), (200, 72.0), (300, 72.8)])
    assert level == {
        "gain": pytest.approx(0.8),
        "from_step": 200,
        "steps": 300,
        "final": 72.8,
        "gain_per_fifth": pytest.approx(0.48),
        "levelled": True,
    }
    assert not gap.levelled([(0, 60.0), (100, 70.0), (200, 72.0), (300, 72.9)])["levelled"]
    assert not gap.levelled([(0, 60.0)])["levelled"]
    # an interaction: (a - b) - (c - d) per seed, over the seeds all four rows have
    acc = lambda v: {"long-tailed": {s: {"in": {"linear": {"top1": x}}} for s, x in v.items()}}  # noqa: E731
    table = {
        "a": acc({"1": 80.0, "2": 81.0, "3": 79.0}),
        "b": acc({"1": 78.0, "2": 80.0, "3": 78.5}),
        "c": acc({"1": 70.0, "2": 71.0}),
        "d": acc({"1": 69.0, "2": 71.5}),
    }
    assert gap.paired(table, ("a", "b", "c", "d"), "acc", "in")["per_seed"] == {"1": 1.0, "2": 1.5}


def test_gap_table_split_files_are_the_seed_s_and_refuse_another_subset(tmp_path, capsys):
    """Seed s's split: the exp profile's sizes in a seeded class order, written once; the same command finds the
    same file, another --imbalance-ratio in the same --output-dir is refused in one line (its runs would train on
    the old subset: --index-file replaces the construction)."""
    gap = _import_benchmark("gap_table")
    targets = [c for c in range(5) for _ in range(40)]
    args = gap.GapArgs(output_dir=str(tmp_path), imbalance_ratio=10.0)
    path = gap.split_file(args, 3, targets)
    counts = gap.split_counts(path, targets)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()  # class of each size rank
    assert [counts[c] for c in order] == [40, 22, 12, 7, 4]  # int(40 * 10 ** (-i / 4)), in the seed's order
    assert gap.split_file(args, 3, targets) == path and gap.split_counts(path, targets) == counts
    with pytest.raises(SystemExit) as e:
        gap.split_file(gap.GapArgs(output_dir=str(tmp_path), imbalance_ratio=5.0), 3, targets)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "holds another long-tailed subset" in err


def test_gap_table_extends_a_budget_group_that_has_not_levelled_off_once(monkeypatch, tmp_path):
    """A run still learning is trained afresh with --extension times its steps (a new run, its schedules
    re-planned), and so is every run of its budget group at that seed (a row's long-tailed and balanced runs; PMSN
    with MSN; the four ExCB rows), so a difference a claim takes keeps one budget; the longer runs are the ones
    probed and reported. A claim resting on a run still learning after the extension is "not resolved: still
    learning", whatever its interval."""
    from concurrent.futures import Future

    gap = _import_benchmark("gap_table")
    curves = {
        "simsiam_lt_s1": [(0, 50.0), (800, 70.0), (1000, 74.0)],  # +4 over the last fifth: still learning
        "simsiam_twin_s1": [(0, 50.0), (800, 74.0), (1000, 74.1)],  # levelled, but its group is not
        "simsiam_lt_s1_x2": [(0, 50.0), (1600, 75.0), (2000, 75.1)],  # levelled
        "simsiam_twin_s1_x2": [(0, 50.0), (1600, 72.0), (2000, 75.0)],  # still learning at the cap
        "simsiam_lt_s2": [(0, 50.0), (800, 74.0), (1000, 74.1)],
        "simsiam_twin_s2": [(0, 50.0), (800, 74.0), (1000, 74.2)],
    }
    trained, probed = [], []

    def pretrain(script, flags, data, output_dir, name, seed, workers):
        trained.append((name, flags))
        return os.path.join(output_dir, name, "backbone.pt")

    top1 = {"top1": 80.0}
    result = {"linear": top1, "knn": top1, "few_shot": {"10": top1, "100": top1}}
    monkeypatch.setattr(gap, "pretrain_run", pretrain)
    monkeypatch.setattr(gap, "monitor_curve", lambda run_dir: curves[os.path.basename(run_dir)])
    monkeypatch.setattr(gap, "probe", lambda backbone, out, *a, **k: probed.append(out) or result)

    def done(value):
        future = Future()
        future.set_result(value)
        return future

    def seed(s: int, args) -> dict:
        base = {p: done(gap.train(args, "simsiam", p, s, [])) for p in ("long-tailed", "balanced")}
        return {p: gap.extend_and_probe(args, "simsiam", p, s, [], f, list(base.values())) for p, f in base.items()}

    args = gap.GapArgs(output_dir=str(tmp_path))
    s1 = seed(1, args)
    names = [name for name, _ in trained]
    assert names == ["simsiam_lt_s1", "simsiam_twin_s1", "simsiam_lt_s1_x2", "simsiam_twin_s1_x2"]
    assert trained[2][1] == [*trained[0][1], "--train-steps", "2000"]  # the same command, twice the steps
    assert trained[3][1] == [*trained[1][1], "--train-steps", "2000"]
    lt, twin = s1["long-tailed"], s1["balanced"]
    assert lt["run"] == "simsiam_lt_s1_x2" and lt["level"]["steps"] == 2000 and lt["level"]["levelled"]
    assert twin["run"] == "simsiam_twin_s1_x2" and not twin["level"]["levelled"]  # extended once, no more
    assert probed == [
        str(tmp_path / f"simsiam_{x}_s1_x2" / f"probe_{d}.json") for x in ("lt", "twin") for d in ("in", "ood")
    ]
    s2 = seed(2, args)  # a levelled group: not extended
    assert [name for name, _ in trained[4:]] == ["simsiam_lt_s2", "simsiam_twin_s2"]
    assert s2["balanced"]["run"] == "simsiam_twin_s2"
    rwsam = dict(lt, level={"levelled": True})
    table = {
        "simsiam": {"long-tailed": {"1": lt, "2": s2["long-tailed"]}, "balanced": {"1": twin, "2": s2["balanced"]}}
    }
    table["rwsam"] = {"long-tailed": {"1": rwsam, "2": rwsam}, "balanced": {"1": rwsam, "2": rwsam}}
    claim = gap.evaluate_claim(table, next(c for c in gap.CLAIMS if c.name == "rwsam"))
    assert claim["verdict"] == "not resolved: still learning" and claim["still_learning"] == ["simsiam balanced s1"]
    curves["simsiam_lt_s3"] = curves["simsiam_twin_s3"] = curves["simsiam_lt_s1"]  # --extension 1: never extended
    s3 = seed(3, gap.GapArgs(output_dir=str(tmp_path), extension=1))
    assert s3["balanced"]["run"] == "simsiam_twin_s3" and len(trained) == 8 and not s3["balanced"]["level"]["levelled"]
    # the budget groups: a row's own sets; PMSN with MSN; the four ExCB rows
    rows = gap.PRESETS["cpu"].rows
    assert {r: gap.group(rows[r]) for r in rows} == {
        "supervised": "supervised",
        "simsiam": "simsiam",
        "rwsam": "rwsam",
        "msn": "msn",
        "pmsn": "msn",
        "excb": "excb",
        "excb_4x": "excb",
        "excb_nobal": "excb",
        "excb_4x_nobal": "excb",
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--claims", "supervised-vs-ssl", "byol"], "unknown claim 'byol'; choose from supervised-vs-ssl, rwsam, pmsn"),
        (["--seeds", "1", "1"], "--seeds must be one or more distinct seeds >= 1, got [1, 1]"),
        (["--seeds", "0"], "--seeds must be one or more distinct seeds >= 1, got [0]"),
        (["--train-steps", "0"], "--train-steps must be >= 1, got 0"),
        (["--extension", "0"], "--extension must be >= 1, got 0"),
        (["--ood-dir", "missing"], "benchmarks/make_imagefolder.py mnist-5k"),
    ],
)
def test_gap_table_bad_input_one_clear_line(tmp_path, extra, message):
    _fails_in_one_line("gap_table.py", [*_gap_tiny(tmp_path), *extra], message, tmp_path)


def _fails_in_one_line(name: str, args: list[str], message: str, cwd) -> None:
    """The benchmark exits 2 with one stderr line holding ``message`` and creates no run folder."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (cwd / "runs").exists()


RECIPES_TINY = [
    "--methods",
    "simsiam",
    "msn",
    *TINY_DATA,
    "--imbalance-ratio",
    "4",
    "--train-steps",
    "2",
    "--extra=--batch-size 8",
    "--knn-k",
    "5",
    "--num-workers",
    "0",
    "--seeds",
    "1",
]


@pytest.mark.slow
def test_recipes_compares_each_method_with_its_random_backbone(tmp_path):
    out = run_benchmark("recipes.py", *RECIPES_TINY, cwd=tmp_path)
    rec_dir = tmp_path / "runs" / "recipes"
    result = json.loads((rec_dir / "recipes.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["simsiam", "msn"] and {r["arch"] for r in rows.values()} == {"vit_tiny 4x96"}
    # both ViT recipes share one random-init probe of the seed, with the trained probes' seed (training seed - 1)
    random_probe = json.loads((rec_dir / "random_vit_tiny_4x96_s1.json").read_text())
    assert random_probe["random_init"] and len(list(rec_dir.glob("random_*.json"))) == 1
    assert out.count("--random-init") == 1 and "--seed 0 --num-workers 0 --output" in out and "--knn-k 5" in out
    for method, row in rows.items():
        trained = json.loads((rec_dir / f"{method}_s1" / "probe.json").read_text())
        # --train-steps 2 replaced the recipe's budget: one whole epoch of the 54 long-tailed images at batch 8
        assert not trained["random_init"] and trained["step"] == 6
        assert row["trained"]["1"] == {p: trained[p]["top1"] for p in ("linear", "knn")}
        assert row["random init"]["1"] == {p: random_probe[p]["top1"] for p in ("linear", "knn")}
        for p in ("linear", "knn"):
            assert row["above_random"][p] == pytest.approx(trained[p]["top1"] - random_probe[p]["top1"])
        assert row["meets_bar"] == (row["above_random"]["linear"] >= 3 and row["above_random"]["knn"] >= 5)
        lin = row["above_random"]["linear"]
        assert f"| {method} | vit_tiny 4x96 | {trained['linear']['top1']:.2f} | " in out and f"| {lin:+.2f} |" in out
    # a rerun trains and probes nothing and gives the same JSON
    again = run_benchmark("recipes.py", *RECIPES_TINY, cwd=tmp_path)
    assert "$ " not in again and json.loads((rec_dir / "recipes.json").read_text()) == result


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "byol"], "unknown method 'byol'; choose from supervised, simsiam, rwsam, msn, pmsn, excb"),
        (["--train-steps", "0"], "--train-steps must be >= 1, got 0"),
        (["--knn-k", "0"], "--knn-k must be >= 1, got 0"),
        (["--dataset", "imagefolder", "--data-dir", "missing"], "image folder not found: missing/train"),
    ],
)
def test_recipes_bad_input_one_clear_line(tmp_path, extra, message):
    _fails_in_one_line("recipes.py", [*RECIPES_TINY, *extra], message, tmp_path)


@pytest.mark.slow
def test_make_imagefolder_writes_a_seeded_class_subset(tmp_path):
    import gzip

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)  # a tiny digits.csv.gz: 10 classes x 6 rows of 64 pixels (0..16) and a label
    rows = [[*rng.integers(0, 17, 64), c] for c in range(10) for _ in range(6)]
    csv = tmp_path / "digits.csv.gz"
    with gzip.open(csv, "wt") as f:
        f.write("\n".join(",".join(f"{v}.0" for v in r) for r in rows) + "\n")
    args = ["digits", "--digits-csv", str(csv), "--val-per-class", "2"]
    out = run_benchmark("make_imagefolder.py", *args, "--out", "a", cwd=tmp_path)
    assert "a: 40 training images (4, 4, 4, 4, 4, 4, 4, 4, 4, 4), 20 in val/" in out
    train, val = sorted((tmp_path / "a" / "train").glob("*/*.png")), sorted((tmp_path / "a" / "val").glob("*/*.png"))
    assert len(train) == 40 and len(val) == 20 and not {p.name for p in train} & {p.name for p in val}
    first = train[0]  # pixel values 0..16 scaled to 0..255, one grey 8x8 image per row, filed under its label
    i = int(first.stem)
    assert first.parent.name == f"{rows[i][64]:02d}"
    assert np.array_equal(np.asarray(Image.open(first)), np.round(np.array(rows[i][:64]) * 255 / 16).reshape(8, 8))
    run_benchmark("make_imagefolder.py", *args, "--out", "b", cwd=tmp_path)  # same seed, same files
    assert [p.relative_to(tmp_path / "b") for p in sorted((tmp_path / "b").glob("*/*/*.png"))] == [
        p.relative_to(tmp_path / "a") for p in sorted((tmp_path / "a").glob("*/*/*.png"))
    ]
    _fails_in_one_line("make_imagefolder.py", [*args, "--out", "a"], "error: a exists; give a new --out", tmp_path)


def test_make_imagefolder_reads_mnist_5k_rows_of_784_pixels(tmp_path):
    import gzip

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)  # a tiny mnist_5k.csv.gz: 10 classes x 3 rows of 784 pixels (0..255), label last
    rows = [[*rng.integers(0, 256, 784), c] for c in range(10) for _ in range(3)]
    csv = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(csv, "wt") as f:
        f.write("\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    out = run_benchmark(
        "make_imagefolder.py", "mnist-5k", "--mnist-csv", str(csv), "--val-per-class", "1", "--out", "m", cwd=tmp_path
    )
    assert "m: 20 training images (2, 2, 2, 2, 2, 2, 2, 2, 2, 2), 10 in val/" in out
    for png in sorted((tmp_path / "m").glob("*/*/*.png")):  # every image is its row, 28x28, under its label
        i = int(png.stem)
        assert png.parent.name == f"{rows[i][784]:02d}"
        assert np.array_equal(np.asarray(Image.open(png)), np.array(rows[i][:784]).reshape(28, 28))
    digits_csv = tmp_path / "digits.csv.gz"  # a digits file given as MNIST: one line naming the file and the shape
    with gzip.open(digits_csv, "wt") as f:
        f.write("0.0," * 64 + "1.0\n")
    _fails_in_one_line(
        "make_imagefolder.py",
        ["mnist-5k", "--mnist-csv", str(digits_csv), "--out", "x"],
        f"{digits_csv}: expected rows of 784 pixels and a label, got shape (1, 65)",
        tmp_path,
    )


@pytest.mark.slow
def test_feature_cone_is_the_mean_pairwise_cosine_of_the_random_backbone(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import feature_cone

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 4, generator=g) + 2
    hand = (
        sum(
            torch.nn.functional.cosine_similarity(feats[i], feats[j], dim=0).item()
            for i in range(6)
            for j in range(6)
            if i != j
        )
        / 30
    )
    assert feature_cone.mean_pairwise_cosine(feats) == pytest.approx(hand, rel=1e-9)
    assert feature_cone.mean_pairwise_cosine(torch.stack([torch.ones(3), 5 * torch.ones(3)])) == pytest.approx(1.0)
    tiny = [*TINY_DATA, "--image-size", "16"]
    out = run_benchmark("feature_cone.py", *tiny, "--images", "8", cwd=tmp_path)
    value = float(re.search(r"mean pairwise cosine (-?[0-9.]+) of the features of ([0-9]+) ", out).group(1))
    assert re.search(r"of the features of 8 long-tailed", out) and -1 <= value <= 1
    _fails_in_one_line(
        "feature_cone.py",
        [*tiny, "--arch", "resnet18", "--vit-dim", "8"],
        "apply to ViTs, not --arch resnet18",
        tmp_path,
    )
    _fails_in_one_line(
        "feature_cone.py", [*tiny, "--images", "1"], "error: --images must be >= 2 (a pair), got 1", tmp_path
    )


@pytest.mark.slow
def test_excb_usage_reports_the_teacher_assignments(tmp_path):
    from conftest import TINY_ARGS, run_script

    run_script(
        "excb.py",
        *TINY_ARGS["excb.py"],
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--num-workers",
        "0",
        "--run-name",
        "u",
        cwd=tmp_path,
    )
    out = json.loads(run_benchmark("excb_usage.py", str(tmp_path / "runs" / "u" / "checkpoint.pt"), cwd=tmp_path))
    assert out["K"] == 16 and out["step"] == 2
    for kind in ("raw", "balanced"):
        r = out[kind]
        k_used, h = r["clusters_in_use"], r["entropy_over_logK"]
        assert 1 <= k_used <= 16 and 0 <= h <= math.log(k_used) / math.log(16) + 1e-9  # entropy <= log(used)
        assert 1 / k_used - 1e-9 <= r["max_share"] <= 1 and len(r["clusters_per_class"]) == 4
        assert max(r["clusters_per_class"]) <= k_used
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "excb_usage.py")], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("usage:")


PARITY_TINY = [
    "--dataset",
    "synthetic",
    "--synthetic-classes",
    "4",
    "--synthetic-per-class",
    "32",
    "--synthetic-test-per-class",
    "8",
    "--image-size",
    "8",
    "--imbalance-ratio",
    "4",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--proj-dim",
    "32",
    "--pred-dim",
    "8",
    "--seeds",
    "0",
    "--num-workers",
    "0",
    "--amp",
    NATIVE_AMP,  # the benchmark's default, bf16, is emulated (slow) on a CPU without it
]


def _check_parity_curves(out: str, result: dict, implementations: tuple[str, ...]) -> None:
    assert list(result["curves"]) == list(implementations)
    header = "| step | " + " | ".join(f"{impl} seed 0" for impl in implementations) + " |"
    assert header in out
    for impl in implementations:
        curve = result["curves"][impl]["0"]
        assert [step for step, _ in curve] == [0, 9]  # 72 images / batch 8: 9 steps, kNN before and at the end
        assert all(0 <= top1 <= 100 for _, top1 in curve)
        assert result["final"][impl]["mean"] == curve[-1][1] and result["final"][impl]["half_range"] == 0
        assert "| 9 | " in out and f"{impl}: final kNN top-1 {curve[-1][1]:.2f} +- 0.00" in out


@pytest.mark.slow
def test_simsiam_parity_ours_writes_curves_and_resumes_by_skipping(tmp_path):
    out = run_benchmark("simsiam_parity.py", *PARITY_TINY, "--which", "ours", cwd=tmp_path)
    result = json.loads((tmp_path / "runs" / "parity" / "parity.json").read_text())
    _check_parity_curves(out, result, ("ours",))
    assert (tmp_path / "runs" / "parity" / "ours_s0" / "backbone.pt").exists()
    again = run_benchmark("simsiam_parity.py", *PARITY_TINY, "--which", "ours", cwd=tmp_path)
    assert "reusing runs/parity/ours_s0.json" in again and "simsiam_rwsam.py" not in again
    assert json.loads((tmp_path / "runs" / "parity" / "parity.json").read_text())["curves"] == result["curves"]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "simsiam_parity.py"),
            *PARITY_TINY,
            "--which",
            "ours",
            "--lr",
            "0.06",
        ],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "was written with --lr 0.03 (now 0.06)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seeds", "0", "0"], "--seeds must be one or more distinct seeds"),
        (["--crop-min-scale", "0"], "--crop-min-scale must be in (0, 1]"),
        (["--vit-dim", "16"], "--vit-layers/--vit-dim/--vit-heads apply to ViTs, not --arch resnet18"),
        (["--which", "lightly"], "lightly is not installed: pip install -r benchmarks/requirements.txt"),
    ],
)
@pytest.mark.slow
def test_simsiam_parity_bad_input_one_clear_line(tmp_path, extra, message):
    (tmp_path / "lightly").mkdir()  # a lightly that fails to import, whether or not the real one is installed
    (tmp_path / "lightly" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {**script_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "simsiam_parity.py"), *PARITY_TINY, *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs" / "parity" / "ours_s0").exists()


def test_simsiam_parity_both_implementations(tmp_path):
    pytest.importorskip("lightly")
    out = run_benchmark("simsiam_parity.py", *PARITY_TINY, "--which", "both", cwd=tmp_path)
    result = json.loads((tmp_path / "runs" / "parity" / "parity.json").read_text())
    _check_parity_curves(out, result, ("ours", "lightly"))
    ours, lightly = result["curves"]["ours"]["0"], result["curves"]["lightly"]["0"]
    assert ours[0][1] == pytest.approx(lightly[0][1], abs=1e-4)  # the same seed builds the same backbone
    assert result["difference"] == pytest.approx(ours[-1][1] - lightly[-1][1])
    assert "difference of means (ours - lightly)" in out and "negative cosine in fp32" in out
    assert "3 linear layers" not in out  # --proj-layers 3 (the default here): the heads agree


@pytest.mark.parametrize(
    "backbone",
    [
        [],
        [
            "--arch",
            "vit_tiny",
            "--vit-layers",
            "1",
            "--vit-dim",
            "16",
            "--vit-heads",
            "2",
            "--warmup-epochs",
            "1",
            "--lr",
            "2e-3",
            "--weight-decay",
            "0.05",
        ],  # the ViT recipe's optimiser: AdamW, warm-up, decay on matrices
    ],
    ids=["resnet18", "vit"],
)
def test_simsiam_parity_lightly_heads_shaped_like_ours_train_identically(tmp_path, monkeypatch, backbone):
    """The harness check: lightly's ProjectionHead built with our 2-layer projector, in fp32, gives our curve."""
    pytest.importorskip("lightly")
    import torch
    import tyro
    from lightly.models.modules.heads import ProjectionHead

    import lt_data

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import simsiam_parity

    def two_layer_projector(d, h, out):
        return ProjectionHead(
            [(d, h, torch.nn.BatchNorm1d(h), torch.nn.ReLU()), (h, out, torch.nn.BatchNorm1d(out, affine=False), None)]
        )

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)  # one thread here and in the subprocess: the same kernels, and no oversubscription
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = tyro.cli(
        simsiam_parity.ParityArgs,
        args=[*PARITY_TINY, "--epochs", "2", "--eval-every", "1", "--amp", "none", "--proj-layers", "2", *backbone],
    )
    _, prediction_head, loss = simsiam_parity.import_lightly()
    lightly = simsiam_parity.train_lightly(
        args, 0, lt_data.build_data(args), (two_layer_projector, prediction_head, loss)
    )
    ours = simsiam_parity.train_ours(args, 0)
    assert [step for step, _ in ours] == [0, 9, 18]
    assert [top1 for _, top1 in lightly] == pytest.approx([top1 for _, top1 in ours], abs=1e-4)


def _gpu_check(tmp_path, *flags: str, timeout: int = HANG_GUARD) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", *flags],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_script_end_to_end(tmp_path):
    """benchmarks/gpu_check.sh --device cpu --modes bf16 (fp32 on a CPU without native bf16): every script through its
    own command line, then step_cost's step / limit, then the four checks (--deterministic ViT with focal crops,
    ExCB's k-means init, a SIGTERM and resume, the probe of the resumed backbone); one row each, all passing, and
    the closing line only when all of them finished. (Each script's fp16 path is trained by test_scripts.py's amp
    test; the check's fp16 mode by the next test.)"""
    proc = _gpu_check(tmp_path, "--modes", NATIVE_MODE, "compile", "--amp", NATIVE_AMP)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    modes_table = proc.stdout.split("step / limit")[0]  # step_cost's rows below have the same first columns
    rows = re.findall(
        r"^\| (supervised|simsiam|msn|excb) \| (bf16|fp16|compile|fp32) \| ([\d.]+) \|", modes_table, re.M
    )
    # no --compile in the CPU smoke mode, though asked for
    assert [(m, a) for m, a, _ in rows] == [(m, NATIVE_MODE) for m in ("supervised", "simsiam", "msn", "excb")]
    assert all(float(images_per_s) > 0 for _, _, images_per_s in rows)
    step_rows = re.findall(
        rf"^\| (supervised|simsiam|msn|excb) \| {NATIVE_AMP} \| (\d+\.\d{{3}}) \|", proc.stdout, re.M
    )
    assert [m for m, _ in step_rows] == ["supervised", "simsiam", "msn", "excb"]
    assert all(float(ratio) > 0 for _, ratio in step_rows)
    checks = re.findall(r"^\| (\w+) \| (pass|FAILED) \| (\d+\.\d) \| (.+) \|$", proc.stdout, re.M)
    assert [(name, result) for name, result, _, _ in checks] == [
        ("deterministic", "pass"),
        ("kmeans", "pass"),
        ("resume", "pass"),
        ("probe", "pass"),
    ]
    assert all(float(seconds) > 0 for _, _, seconds, _ in checks)
    detail = {name: text for name, _, _, text in checks}
    assert "--deterministic" in detail["deterministic"] and "3 steps" in detail["deterministic"]
    assert "k-means init of 28 centroids on 56 images" in detail["kmeans"]
    m = re.search(r"stopped at step (\d+) \(exit 143\); the same command resumed at step (\d+) of 8", detail["resume"])
    assert m and m.group(1) == m.group(2) and 1 <= int(m.group(1)) < 8
    assert re.search(r"56 training / 8 test images, linear top-1 [\d.]+, kNN [\d.]+", detail["probe"])
    assert proc.stdout.rstrip().endswith("gpu_check: all runs finished")


@pytest.mark.slow
def test_gpu_check_runs_each_mode_it_is_given(tmp_path):
    """--modes bf16 fp16 (fp32 fp16 without native bf16): one row per mode, in order, the fp16 run with its
    GradScaler (the script's own --amp)."""
    flags = ("--methods", "supervised", "--modes", NATIVE_MODE, "fp16", "--no-step-cost", "--checks")
    proc = _gpu_check(tmp_path, *flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\| supervised \| (bf16|fp16|compile|fp32) \| ([\d.]+) \|", proc.stdout, re.M)
    assert [mode for mode, _ in rows] == [NATIVE_MODE, "fp16"]
    assert "step / limit" not in proc.stdout and "| check |" not in proc.stdout  # --checks with no value: none
    assert proc.stdout.rstrip().endswith("gpu_check: all runs finished")


def test_gpu_check_fails_on_a_failing_run_naming_the_command(tmp_path):
    """A failing run names its command and shows the script's error; the later runs still run and report (a lent GPU
    session gets every row), and the check exits non-zero listing what failed."""
    flags = (
        "--image-size",
        "4",
        "--methods",
        "supervised",
        "--modes",
        NATIVE_MODE,
        "--no-step-cost",
        "--checks",
        "deterministic",
        "--amp",
        NATIVE_AMP,
    )
    proc = _gpu_check(tmp_path, *flags)
    assert proc.returncode != 0
    assert (
        "gpu_check: FAILED" in proc.stderr and "supervised_baseline.py" in proc.stderr and "msn_prior.py" in proc.stderr
    )
    assert "--image-size must be >= 8, got 4" in proc.stderr  # the script's own one-line error is shown
    assert f"| supervised | {NATIVE_MODE} | FAILED |" in proc.stdout
    assert re.search(r"^\| deterministic \| FAILED \| [\d.]+ \| exit 2: .*--image-size must be >= 8", proc.stdout, re.M)
    assert proc.stderr.rstrip().endswith(f"gpu_check: 2 failed: supervised {NATIVE_MODE}, deterministic")
    assert "all runs finished" not in proc.stdout


def test_gpu_check_kills_a_run_at_its_timeout(tmp_path):
    """--timeout: a run that outlives it is killed (with its process group) and reported as failed, in one line."""
    flags = ("--methods", "supervised", "--modes", NATIVE_MODE, "--no-step-cost", "--checks", "--timeout", "1")
    proc = _gpu_check(tmp_path, *flags)  # importing torch alone takes longer than the 1 s limit
    assert proc.returncode != 0 and "gpu_check: FAILED (killed after the 1 s timeout)" in proc.stderr
    assert f"| supervised | {NATIVE_MODE} | FAILED |" in proc.stdout and "all runs finished" not in proc.stdout


def test_pipeline_benchmark_times_each_scripts_own_transform(tmp_path):
    out = run_benchmark(
        "pipeline.py",
        "--image-size",
        "32",
        "--num-images",
        "4",
        "--repeats",
        "1",
        "--workers",
        "0",
        "1",
        "--batch-size",
        "2",
        "--methods",
        "simsiam",
        "excb",
        "--breakdown",
        "--model-rate",
        "100",
        "--compare-torchvision",
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "pipeline.json").read_text())["results"]
    assert list(result) == ["simsiam", "excb"]
    assert result["simsiam"]["views"] == [[32, 32]] * 2
    assert result["excb"]["views"] == [[32, 32]] * 2 + [[16, 16]] * 6  # 2 global + 6 local crops (ExCB default)
    for row in result.values():
        ms = row["ms_per_image_per_core"]
        assert ms > 0 and row["cores_needed"] == pytest.approx(100 * ms / 1000)
        assert set(row["workers"]) == {"0", "1"} and all(v > 0 for v in row["workers"].values())
        assert sum(c for _, c in row["breakdown_ms_per_view"]) > 0
        assert row["torchvision_ops_ms_per_image_per_core"] > 0
    assert re.search(
        r"^\| simsiam \| 2 x 32 \| [0-9.]+ \| \d+ \| \d+ \| \d+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|$", out, re.M
    )
    assert "GaussianBlur" not in out  # no blur at 32 px (CIFAR recipes)


def test_peers_benchmark_without_lightly_fails_in_one_line(tmp_path):
    (tmp_path / "lightly").mkdir()  # a lightly that fails to import, whether or not the real one is installed
    (tmp_path / "lightly" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {**script_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == "peers.py: error: lightly is not installed: pip install -r benchmarks/requirements.txt"
    )


def test_peers_benchmark_compares_ours_and_lightly(tmp_path):
    pytest.importorskip("lightly")
    out = run_benchmark(
        "peers.py",
        "--batch-size",
        "4",
        "--image-size",
        "16",
        "--repeats",
        "1",
        "--pipeline-size",
        "32",
        "--pipeline-images",
        "2",
        "--amp",
        NATIVE_AMP,
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "peers.json").read_text())["results"]
    assert list(result) == ["simsiam", "msn", "pmsn"]
    for method, row in result.items():
        assert row["step_ms"]["ours"] > 0 and row["step_ms"]["lightly"] > 0
        assert row["pipeline_ms"]["ours"] > 0 and row["pipeline_ms"]["lightly"] > 0
        ratio = row["step_ms"]["ours"] / row["step_ms"]["lightly"]
        assert f"| {method} | {row['step_ms']['ours']:.1f} | {row['step_ms']['lightly']:.1f} | {ratio:.2f} |" in out


def test_gpu_check_runs_where_there_is_python3_and_no_python(tmp_path):
    """The lent GPU machine has python3 and no python (shared/specs/gpu_device.md): the check must start there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this environment's Python
    (bin_dir / "python3").chmod(0o755)
    env = {**script_env(), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env.pop("PYTHON", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "--device" in proc.stdout, proc.stderr
