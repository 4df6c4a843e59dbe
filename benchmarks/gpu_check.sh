#!/usr/bin/env bash
# The GPU check (estimated, not yet run on a GPU: 5-8 minutes for the modes, 1-2 more for the checks on one
# H100): every training script at 224 px for 30 steps in bf16, fp16 and bf16 + --compile, on synthetic data;
# prints images/s, peak GPU memory, first-step compile time and step / limit; then checks --deterministic (a ViT
# with focal crops), ExCB's k-means init, a SIGTERM and resume, and the probe; exits non-zero on any failure.
# `--device cpu` is the smoke mode the tests run. Flags are benchmarks/gpu_check.py's (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"  # the GPU machine has python3, not python
