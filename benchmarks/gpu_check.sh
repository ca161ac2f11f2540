#!/usr/bin/env bash
# One prepared GPU session (device tool): build, CUDA/Triton parity, benchmarks, real-scale runs, short table.
#   stages (default: all four, in this order): build tests bench scale. All four rarely fit one call:
#   run(command="bash benchmarks/gpu_check.sh build tests", carry=[".devcarry"], timeout_s=590), then on
#   the warm machine run(command="bash benchmarks/gpu_check.sh bench scale", carry=[".devcarry"], timeout_s=500)
#   (PPAP_GEN_IMAGES=1000 for the issue's 1000-image generation figure; default 256).
# .devcarry/fixtures holds a copy of ../shared/fixtures (shared/ does not travel).
# Writes everything under $OUT (or /tmp/ppap_gpu_out): gpu.txt, build.log, backends.json, tests_*.txt,
# bench.json, scale.json, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ppap_gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PPAP_FIXTURES="${PPAP_FIXTURES:-$PWD/.devcarry/fixtures}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
STAGES="${*:-build tests bench scale}"
t0=$(date +%s); stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

if has build || ! ls ppap_fast/_C*.so >/dev/null 2>&1; then
  stamp "build extension for this torch"
  rm -f ppap_fast/_C*.so
  if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"; stamp "BUILD FAILED (tests continue on triton/reference paths)"
  fi
fi
python3 -c "import ppap_fast.ops as o, json; print(json.dumps(o.backend_report('cuda'), indent=1))" > "$OUT/backends.json"

if has tests; then
  stamp "parity tests on CUDA (each group under its own timeout)"
  run_tests() {  # name, timeout, pytest args
    local name=$1 limit=$2; shift 2
    timeout "$limit" python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/tests_$name.txt" | tail -6
  }
  run_tests update 120 tests/test_guided_update.py                      # picks its CUDA/Triton backends itself
  run_tests lora "${LORA_TEST_TIMEOUT:-300}" tests/test_lora_ops.py -m cuda
  run_tests rest "${TEST_TIMEOUT:-240}" tests/test_sampling.py tests/test_adm.py tests/test_fast_sampling.py \
    tests/test_norm_ops.py -m cuda
fi

if has bench; then
  stamp "benchmarks"
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/run.py --device cuda --quick --json "$OUT/bench.json" \
    --only bench_update bench_lora bench_step bench_distill 2>&1 | tail -30
fi

if has scale; then
  stamp "real scale: ADM-256 + ResNet50 PPAP-10 DDIM-25 batch 32; generation of ${PPAP_GEN_IMAGES:=256} images"
  export PPAP_GEN_IMAGES
  timeout "${SCALE_TIMEOUT:-200}" python3 benchmarks/run.py --device cuda --quick --json "$OUT/scale.json" \
    --only bench_scale 2>&1 | tail -10
fi

stamp "summary"
python3 benchmarks/summarize.py "$OUT" | tee "$OUT/summary.txt"
