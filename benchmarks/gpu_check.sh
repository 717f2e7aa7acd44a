#!/usr/bin/env bash
# The GPU checks as one command, sized for a GPU session of minutes: every CUDA test of the suite
# (`pytest -m cuda`), then the GPU benchmark at the full configuration (benchmarks/gpu.py). About 8 minutes at
# most on one H100/H200: each step has its own time limit (below), so the whole script ends within 8 minutes
# whatever hangs.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]       on the GPU machine, with its own python3 and packages
#   bash benchmarks/gpu_check.sh --rehearse      the same steps on this machine's CPU, in a throw-away venv
#
# It runs on the GPU machine's own Python (python3 with torch, timm, tifffile, scikit-learn, scipy, matplotlib,
# pyyaml, tqdm, pillow and pytest; nothing can be installed there): no open3d is needed (the preprocessing of the
# generated data fits the background plane with m3dm's own RANSAC, which gives Open3D's plane), no install of
# m3dm (PYTHONPATH is the checkout). Logs and figures go to $OUT when it is set (the device tool's folder that
# comes back), else to OUT_DIR (default results/gpu): preflight.log, cuda_tests.log, gpu_benchmark.log, gpu.json.
#
# --rehearse builds a venv under /tmp (M3DM_REHEARSAL_VENV to choose where; kept for the next rehearsal) on
# Python 3.12 with torch 2.11 and only the packages listed above, no open3d, and runs the same steps on the CPU:
# the CUDA tests are collected and skipped, the benchmark runs at its tiny size and then at the full
# configuration on a few samples. It shows that every import, path and data step works without a GPU session.
set -uo pipefail

# time limits in seconds: preflight + tests + benchmark + the grace periods of `timeout -k` stay under 480
PREFLIGHT_S=40
TESTS_S=170
TEST_EACH_S=150  # one test (pytest-timeout, where installed)
BENCH_S=240
GRACE_S=10

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
rehearse=0
if [[ "${1:-}" == "--rehearse" ]]; then
    rehearse=1
    shift
    # a few cores, maybe shared, and cold caches instead of 16 cores: the same steps under limits 5 times longer
    PREFLIGHT_S=$((5 * PREFLIGHT_S)) TESTS_S=$((5 * TESTS_S)) TEST_EACH_S=$((5 * TEST_EACH_S)) BENCH_S=$((5 * BENCH_S))
fi
out=${OUT:-${1:-results/gpu}}
mkdir -p "$out"

build_rehearsal_venv() {
    # Python 3.12 and torch 2.11, as on the GPU machine; only the packages it has, so a missing import shows
    local venv=${M3DM_REHEARSAL_VENV:-/tmp/m3dm-gpu-rehearsal/venv} base
    for base in "$(command -v python3.12)" "$HOME"/.pyenv/versions/3.12*/bin/python3 ""; do
        [[ -n "$base" ]] && "$base" -c "" 2>/dev/null && break  # a pyenv shim may exist and not run
    done
    [[ -n "$base" ]] || { echo "rehearsal: no Python 3.12 found (python3.12 or ~/.pyenv/versions/3.12*)"; return 1; }
    if [[ ! -x "$venv/bin/python3" ]] || ! "$venv/bin/python3" -c "import torch, timm, pytest" 2>/dev/null; then
        echo "rehearsal: building $venv from $base (torch 2.11 is a download of several GB)"
        "$base" -m venv "$venv" || return 1
        "$venv/bin/python3" -m pip install -q "torch==2.11.*" "torchvision==0.26.*" timm tifffile scikit-learn \
            scipy matplotlib pyyaml tqdm pillow pytest pytest-timeout || return 1
    fi
    if "$venv/bin/python3" -c "import open3d" 2>/dev/null; then
        echo "rehearsal: $venv has open3d, which the GPU machine lacks; remove the venv and run again"
        return 1
    fi
}

run_tests() {
    # every test marked cuda in the whole suite (some live beside the CPU tests they mirror); -ra names the
    # reason of every skip, so a skipped CUDA test is seen
    local per_test=()
    python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "$TEST_EACH_S")
    timeout -k "$GRACE_S" "$TESTS_S" python3 -m pytest -q -m cuda tests -p no:cacheprovider -ra "${per_test[@]}"
}

run_benchmark() {
    if (( rehearse )); then
        # the tiny size end to end, then the full configuration (800 px scenes, ViT-B/8, 1024 x 128 groups) on a
        # few samples: the data step at the real size, the real models, on the CPU
        timeout -s INT -k "$GRACE_S" "$BENCH_S" python3 benchmarks/gpu.py --device cpu --tiny --json "$out/gpu_tiny.json" \
            && timeout -s INT -k "$GRACE_S" "$BENCH_S" python3 benchmarks/gpu.py --device cpu --train 2 --test 4 \
                   --batch_size 2 --json "$out/gpu.json"
    else
        # SIGINT at the limit: the benchmark prints and writes the figures it has measured by then
        timeout -s INT -k "$GRACE_S" "$BENCH_S" python3 benchmarks/gpu.py --json "$out/gpu.json"
    fi
}

started=$SECONDS
if (( rehearse )); then
    build_rehearsal_venv 2>&1 | tee "$out/rehearsal_venv.log"
    (( PIPESTATUS[0] == 0 )) || exit 2
    export PATH="${M3DM_REHEARSAL_VENV:-/tmp/m3dm-gpu-rehearsal/venv}/bin:$PATH"
fi
echo "== preflight (limit ${PREFLIGHT_S} s)"
cpu_flag=()
(( rehearse )) && cpu_flag=(--cpu)
timeout -k "$GRACE_S" "$PREFLIGHT_S" python3 benchmarks/gpu_preflight.py "${cpu_flag[@]}" 2>&1 | tee "$out/preflight.log"
(( PIPESTATUS[0] == 0 )) || { echo "preflight failed: see $out/preflight.log"; exit 2; }
echo "== CUDA tests (limit ${TESTS_S} s)"
run_tests 2>&1 | tee "$out/cuda_tests.log"
tests=${PIPESTATUS[0]}
echo "== GPU benchmark (limit ${BENCH_S} s)"
run_benchmark 2>&1 | tee "$out/gpu_benchmark.log"
bench=${PIPESTATUS[0]}
echo "CUDA tests exit code $tests, benchmark exit code $bench (124/137: time limit), $((SECONDS - started)) s in all;" \
     "logs and figures in $out"
exit $(( tests != 0 || bench != 0 ))
