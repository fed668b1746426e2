#!/usr/bin/env bash
# The GPU check (docs/gpu-runbook.md): on one GPU host with PyTorch (CUDA) and this project
# installed from local wheels (nothing is fetched), run the gpu-marked tests and the paper's
# latency protocol at SD-Turbo scale; writes results/latency-gpu.md + JSON, prints a table last.
# Aims to finish in under 8 minutes on an H100/H200/L40S-class GPU.
#   scripts/gpu-check.sh                 # everything
#   scripts/gpu-check.sh --toy --no-tests # the same at toy scale (any machine, seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PYTHON" -m imageragturbo.cli bench gpu-check --out results "$@"
