"""The benchmark scripts run end to end as a user runs them (tiny settings; their figures are not checked,
only that they are produced and consistent with what the scripts wrote)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

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
