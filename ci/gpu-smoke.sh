#!/usr/bin/env bash
# GPU smoke check: does parity run on this GPU machine? One PASS / FAIL / SKIP line per check, exit 1 on
# any FAIL. Checks: CUDA + nccl + bf16; the mini sizes at TP 1 on CUDA for all three backends; TP 2 and
# TP 8 on one GPU over gloo (nccl refuses two ranks on one device); 1b-synthetic in bf16 for all three
# backends with a parity check; with 2+ GPUs, nccl TP 2 and hf spread over two GPUs. Written to take
# under 5 minutes on one GPU (the first run also makes and converts the 1b-synthetic checkpoint into the
# cache, ~2.5 GB). The logic and the list of checks are in ci/gpu_smoke.py.
#
#   bash ci/gpu-smoke.sh [--list] [--only NAME,...] [--out DIR]     (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" ci/gpu_smoke.py "$@"
