#!/usr/bin/env bash
# The GPU checks (docs/gpu.md) as one command (sized for about 8 minutes on one H100/H200): the CUDA tests, then the
# GPU benchmark at the full configuration. Logs and figures go to OUT_DIR (default results/gpu).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pytest -q -m cuda tests/cuda -p no:cacheprovider -rs 2>&1 | tee "$out/cuda_tests.log"
tests=${PIPESTATUS[0]}
timeout 480 python benchmarks/gpu.py --json "$out/gpu.json" 2>&1 | tee "$out/gpu_benchmark.log"
bench=${PIPESTATUS[0]}
echo "CUDA tests exit code $tests, benchmark exit code $bench"
exit $(( tests != 0 || bench != 0 ))
