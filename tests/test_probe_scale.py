"""benchmarks/probe_scale.py runs end to end at tiny sizes and prints its table (the figures are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import HANG_GUARD, ROOT, script_env


def test_probe_scale_prints_a_row_per_size_device_and_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "probe_scale.py")]
        + ["--scale", "0.001", "--dim", "16", "--linear-steps", "2", "--knn-queries", "8", "--repeats", "2"],
        cwd=tmp_path,
        env=script_env(threads=1),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and ("with avx512_bf16" in lines[0] or "without avx512_bf16" in lines[0])
    header = next(i for i, line in enumerate(lines) if line.startswith("| features"))
    assert lines[header + 1] == "|---|---|---|---|---|---|---|---|"
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[header + 2 :] if line.startswith("|")]
    assert all(len(r) == 8 for r in rows)
    measured = [r for r in rows if r[1].startswith("cpu") or r[1] == "cuda"]
    sizes = ["ImageNet-LT: 2 classes, 116 / 50, 16-d", "iNaturalist 2018: 8 classes, 438 / 24, 16-d"]
    cpu = [(r[0], r[2]) for r in measured if r[1].startswith("cpu")]
    assert cpu == [(s, code) for s in sizes for code in ("previous", "current")]
    time = r"[\d.e+-]+ (ms|s|min|h)"
    for r in measured:  # wall-clock, and on the CPU the CPU time in parentheses
        assert all(re.fullmatch(time + (rf" \({time}\)" if r[1].startswith("cpu") else ""), c) for c in r[3:7]), r
    assert rows[-1][3] == "not measured: no GPU here" or any(r[1] == "cuda" for r in rows)
    assert "1 of 1 steps; 8 of 50 queries; fastest of 2" in {r[7] for r in measured}
