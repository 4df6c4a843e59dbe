"""The benchmark scripts run end to end as a user runs them (tiny settings; their figures are not checked,
only that they are produced and consistent with what the scripts wrote)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, script_env


def run_benchmark(name: str, *args: str, cwd) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=cwd, env=script_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_step_cost_prints_a_row_per_method_and_precision(tmp_path):
    out = run_benchmark("step_cost.py", "--methods", "supervised", "excb", "--amp", "bf16", "none", "--repeats",
                        "1", "--loop-steps", "2", "--batch-size", "8", "--image-size", "16", cwd=tmp_path)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| (supervised|excb) \|", line)]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("supervised", "bf16"), ("supervised", "none"),
                                                            ("excb", "bf16"), ("excb", "none")]
    for r in rows:
        ratio, ratio_opt, *rates = (float(v) for v in r[2:])
        assert ratio > ratio_opt > 0 and all(math.isfinite(v) and v > 0 for v in rates)


def test_gap_table_reports_the_relative_gap_of_the_probes(tmp_path):
    out = run_benchmark("gap_table.py", "--methods", "supervised", "--synthetic-classes", "4",
                        "--synthetic-per-class", "24", "--imbalance-ratio", "4", "--image-size", "16",
                        "--extra=--max-steps 2 --batch-size 8", "--num-workers", "0", cwd=tmp_path)
    result = json.loads((tmp_path / "runs" / "gap" / "gap_table.json").read_text())["table"]["supervised"]
    for kind, run in (("long-tailed", "supervised_lt"), ("balanced", "supervised_twin")):
        probe = json.loads((tmp_path / "runs" / "gap" / run / "probe.json").read_text())["linear"]
        assert result[kind]["top1"] == probe["top1"]
    bal, lt = result["balanced"]["top1"], result["long-tailed"]["top1"]
    assert result["relative_gap"] == (bal - lt) / bal
    assert f"| supervised | long-tailed | {lt:.2f} |" in out


def test_excb_usage_reports_the_teacher_assignments(tmp_path):
    from conftest import TINY_ARGS, run_script
    run_script("excb.py", *TINY_ARGS["excb.py"], "--batch-size", "8", "--max-steps", "2", "--num-workers", "0",
               "--run-name", "u", cwd=tmp_path)
    out = json.loads(run_benchmark("excb_usage.py", str(tmp_path / "runs" / "u" / "checkpoint.pt"), cwd=tmp_path))
    assert out["K"] == 16 and out["step"] == 2
    for kind in ("raw", "balanced"):
        r = out[kind]
        k_used, h = r["clusters_in_use"], r["entropy_over_logK"]
        assert 1 <= k_used <= 16 and 0 <= h <= math.log(k_used) / math.log(16) + 1e-9   # entropy <= log(used)
        assert 1 / k_used - 1e-9 <= r["max_share"] <= 1 and len(r["clusters_per_class"]) == 4
        assert max(r["clusters_per_class"]) <= k_used
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "excb_usage.py")], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("usage:")


PARITY_TINY = ["--dataset", "synthetic", "--synthetic-classes", "4", "--synthetic-per-class", "32",
               "--synthetic-test-per-class", "8", "--image-size", "8", "--imbalance-ratio", "4", "--batch-size", "8",
               "--epochs", "1", "--proj-dim", "32", "--pred-dim", "8", "--seeds", "0", "--num-workers", "0"]


def _check_parity_curves(out: str, result: dict, implementations: tuple[str, ...]) -> None:
    assert list(result["curves"]) == list(implementations)
    header = "| step | " + " | ".join(f"{impl} seed 0" for impl in implementations) + " |"
    assert header in out
    for impl in implementations:
        curve = result["curves"][impl]["0"]
        assert [step for step, _ in curve] == [0, 9]   # 72 images / batch 8: 9 steps, kNN before and at the end
        assert all(0 <= top1 <= 100 for _, top1 in curve)
        assert result["final"][impl]["mean"] == curve[-1][1] and result["final"][impl]["half_range"] == 0
        assert "| 9 | " in out and f"{impl}: final kNN top-1 {curve[-1][1]:.2f} +- 0.00" in out


def test_simsiam_parity_ours_writes_curves_and_resumes_by_skipping(tmp_path):
    out = run_benchmark("simsiam_parity.py", *PARITY_TINY, "--which", "ours", cwd=tmp_path)
    result = json.loads((tmp_path / "runs" / "parity" / "parity.json").read_text())
    _check_parity_curves(out, result, ("ours",))
    assert (tmp_path / "runs" / "parity" / "ours_s0" / "backbone.pt").exists()
    again = run_benchmark("simsiam_parity.py", *PARITY_TINY, "--which", "ours", cwd=tmp_path)
    assert "reusing runs/parity/ours_s0.json" in again and "simsiam_rwsam.py" not in again
    assert json.loads((tmp_path / "runs" / "parity" / "parity.json").read_text())["curves"] == result["curves"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "simsiam_parity.py"), *PARITY_TINY, "--which",
                           "ours", "--lr", "0.06"], cwd=tmp_path, env=script_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "was written with --lr 0.03 (now 0.06)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0", "0"], "--seeds must be one or more distinct seeds"),
    (["--crop-min-scale", "0"], "--crop-min-scale must be in (0, 1]"),
    (["--which", "lightly"], "lightly is not installed: pip install -r benchmarks/requirements.txt"),
])
def test_simsiam_parity_bad_input_one_clear_line(tmp_path, extra, message):
    (tmp_path / "lightly").mkdir()   # a lightly that fails to import, whether or not the real one is installed
    (tmp_path / "lightly" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {**script_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "simsiam_parity.py"), *PARITY_TINY, *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs" / "parity" / "ours_s0").exists()


def test_simsiam_parity_both_implementations(tmp_path):
    pytest.importorskip("lightly")
    out = run_benchmark("simsiam_parity.py", *PARITY_TINY, "--which", "both", cwd=tmp_path)
    result = json.loads((tmp_path / "runs" / "parity" / "parity.json").read_text())
    _check_parity_curves(out, result, ("ours", "lightly"))
    ours, lightly = result["curves"]["ours"]["0"], result["curves"]["lightly"]["0"]
    assert ours[0][1] == pytest.approx(lightly[0][1], abs=1e-4)   # the same seed builds the same backbone
    assert result["difference"] == pytest.approx(ours[-1][1] - lightly[-1][1])
    assert "difference of means (ours - lightly)" in out and "3 linear layers" in out


def test_simsiam_parity_lightly_heads_shaped_like_ours_train_identically(tmp_path, monkeypatch):
    """The harness check: lightly's ProjectionHead built with our 2-layer projector, in fp32, gives our curve."""
    pytest.importorskip("lightly")
    import torch
    import tyro
    from lightly.models.modules.heads import ProjectionHead

    import lt_data
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import simsiam_parity

    def two_layer_projector(d, h, out):
        return ProjectionHead([(d, h, torch.nn.BatchNorm1d(h), torch.nn.ReLU()),
                               (h, out, torch.nn.BatchNorm1d(out, affine=False), None)])

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)   # one thread here and in the subprocess: the same kernels, and no oversubscription
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = tyro.cli(simsiam_parity.ParityArgs, args=[*PARITY_TINY, "--epochs", "2", "--eval-every", "1",
                                                     "--amp", "none"])
    _, prediction_head, loss = simsiam_parity.import_lightly()
    lightly = simsiam_parity.train_lightly(args, 0, lt_data.build_data(args), (two_layer_projector, prediction_head,
                                                                               loss))
    ours = simsiam_parity.train_ours(args, 0)
    assert [step for step, _ in ours] == [0, 9, 18]
    assert [top1 for _, top1 in lightly] == pytest.approx([top1 for _, top1 in ours], abs=1e-4)
