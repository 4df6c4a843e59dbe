#!/usr/bin/env bash
# The GPU check (about 5-8 minutes on one H100/H200): every training script at 224 px for 30 steps in bf16, fp16
# and bf16 + --compile, on synthetic data; prints images/s, peak GPU memory, first-step compile time and
# step / limit, and exits non-zero on any failure. `--device cpu` is the smoke mode the tests run. Flags are
# benchmarks/gpu_check.py's (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"  # the GPU machine has python3, not python
