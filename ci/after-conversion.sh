#!/usr/bin/env bash
# The CI job to run after any change to a checkpoint converter.
#
# 1. `parity run` on the mini sizes: synthetic Meta checkpoints, converted to HF and Megatron with the
#    converter in this checkout (the conversion cache is keyed by the converter's source, so a changed
#    converter is always re-run), scored by the three backends on the bundled samples, on the device and
#    in the dtype the baseline was made with (read from it: on a GPU machine too, the run stays cpu/fp32
#    like the committed baseline; `parity check` refuses a baseline of another device or dtype).
# 2. `parity check` gates the run against thresholds (configs/thresholds.yaml) and the committed
#    baseline report (ci/baseline/report.json): exit 1 on a regression, 2 on unusable input.
#
# Use it in a GitHub Actions / GitLab job as `bash ci/after-conversion.sh` after installing parity.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${PARITY_CI_OUT:-results/ci-after-conversion}"
baseline=ci/baseline/report.json
read -r device dtype < <(python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))["run"]; print(r["device"], r["dtype"])' "$baseline")

parity run --out "$out" --no-report --device "$device" --dtype "$dtype"
parity report "$out"
parity check "$out" --baseline "$baseline" --explain
