#!/usr/bin/env bash
# One prepared GPU session (device tool): build, CUDA/Triton parity, benchmarks, short table.
#   run(command="bash benchmarks/gpu_check.sh", carry=[".devcarry"], timeout_s=540)
# .devcarry/fixtures holds a copy of ../shared/fixtures (shared/ does not travel).
# Writes everything under $OUT (or /tmp/ppap_gpu_out): gpu.txt, build.log, tests.txt, bench.json, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ppap_gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PPAP_FIXTURES="${PPAP_FIXTURES:-$PWD/.devcarry/fixtures}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
t0=$(date +%s); stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

stamp "build extension for this torch"
rm -f ppap_fast/_C*.so
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; stamp "BUILD FAILED (tests continue on triton/reference paths)"
fi
python3 -c "import ppap_fast.ops as o, json; print(json.dumps(o.backend_report('cuda'), indent=1))" | tee "$OUT/backends.json"

stamp "parity tests on CUDA"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_guided_update.py tests/test_lora_ops.py tests/test_sampling.py -m "cuda or not slow" \
  2>&1 | tee "$OUT/tests.txt" | tail -25

stamp "benchmarks"
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/run.py --device cuda --quick --json "$OUT/bench.json" 2>&1 | tail -30

stamp "summary"
python3 benchmarks/summarize.py "$OUT" | tee "$OUT/summary.txt"
