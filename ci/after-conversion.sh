#!/usr/bin/env bash
# The CI job to run after any change to a checkpoint converter.
#
# 1. `parity run` on the mini sizes: synthetic Meta checkpoints, converted to HF and Megatron with the
#    converter in this checkout (the conversion cache is keyed by the converter's source, so a changed
#    converter is always re-run), scored by the three backends on the bundled samples.
# 2. `parity check` gates the run against thresholds (configs/thresholds.yaml) and the committed
#    baseline report (ci/baseline/report.json): exit 1 on a regression, 2 on unusable input.
#
# Use it in a GitHub Actions / GitLab job as `bash ci/after-conversion.sh` after installing parity.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${PARITY_CI_OUT:-results/ci-after-conversion}"

parity run --out "$out" --no-report
parity report "$out"
parity check "$out" --baseline ci/baseline/report.json --explain
