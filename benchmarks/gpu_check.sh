#!/usr/bin/env bash
# One prepared GPU session (device tool): build, CUDA/Triton parity, benchmarks, real-scale runs, short table.
#   A session has 15 device minutes and a machine start costs 1-2 of them, so everything runs in ONE call:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".devcarry"], timeout_s=600), then give_back.
#   The script keeps to GPU_CHECK_DEADLINE seconds (default 560): every stage's timeout is cut to what is
#   left, minus what the later stages are promised, so a slow stage costs its own figures and no others.
#   Stages (default: build tests bench scale; also probe: toolchain facts + C++ error path), in this order;
#   e.g. `gpu_check.sh bench` alone. BENCH_SUITES, SCALE_SUITES, LORA_TEST_ARGS (default "-m cuda"), LORA_TEST_K
#   (a pytest -k expression, spaces allowed) narrow a rerun; TESTS_ONLY (pytest args, no spaces inside
#   one) replaces the test groups with one group run after the build (at most TESTS_ONLY_CAP s, default 120,
#   TESTS_ONLY_WORKERS pytest-xdist workers, default 4; tests start in the order given, so put new ones first);
#   BENCH_MIN / SCALE_MIN: seconds promised to those stages;
#   BENCH_CAP: the most the bench stage may take (default 300).
#   The build runs in the background while the tests that do not need the extension run.
# .devcarry/fixtures holds a copy of ../shared/fixtures (shared/ does not travel).
# Writes under $OUT (or /tmp/ppap_gpu_out; the device tool returns at most 8 files): gpu.txt, build.log,
# backends.json, tests.txt (every group), bench.json (written after every suite), scale.json, summary.txt;
# gpu.txt also gets the benchmarks' whole output (tracebacks of a failing suite, seconds per suite). PPAP_GEN_IMAGES: images generated (default 256).
# gpu.txt also gets the card's clocks, power, temperature and throttle reasons at the start and after the
# bench stage (gpu_state; bench.json's device_probe has the same with a measured matmul and copy speed).
# Dry run without a GPU (checks this script, runs nothing on a device): GPU_CHECK_DEVICE=cpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ppap_gpu_out}"; mkdir -p "$OUT"
DEV="${GPU_CHECK_DEVICE:-cuda}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PPAP_FIXTURES="${PPAP_FIXTURES:-$PWD/.devcarry/fixtures}"
export MAX_JOBS="${MAX_JOBS:-12}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
STAGES="${*:-build tests bench scale}"
DEADLINE="${GPU_CHECK_DEADLINE:-560}"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
stamp() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$OUT/gpu.txt"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
# seconds promised to the later stages that run (env *_MIN): a slow stage cannot eat them
r_if() { has "$1" && echo "$2" || echo 0; }
R_UPDATE=$(r_if tests 40) R_LORA=$(r_if tests 60) R_BENCH=$(r_if bench "${BENCH_MIN:-110}") R_SCALE=$(r_if scale "${SCALE_MIN:-100}")
BENCH_SUITES="${BENCH_SUITES:-bench_update bench_lora bench_distill bench_denoiser bench_step}"
SCALE_SUITES="${SCALE_SUITES:-bench_scale bench_generate}"
LORA_TEST_ARGS="${LORA_TEST_ARGS:--m cuda}"
# left CAP RESERVE: seconds to the deadline less RESERVE, at most CAP (may be 0 or negative)
left() { local b=$(( DEADLINE - $(elapsed) - $2 )); (( b > $1 )) && b=$1; echo $b; }
# budget CAP RESERVE: seconds this stage may take (at most CAP, leaving RESERVE for later stages; >= 10)
budget() { local b; b=$(left "$1" "$2"); (( b < 10 )) && b=10; echo $b; }
SUMMARY_S=8  # kept for the summary by the GPU state reads and the scale stage
HAVE_XDIST=0; python3 -c "import xdist" 2>/dev/null && HAVE_XDIST=1
SMI_STATE=clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu
gpu_state() {  # clocks, power, temperature, active throttle reasons into gpu.txt; never fails the script
  local why="nvidia-smi not found" lim rc
  if command -v nvidia-smi >/dev/null 2>&1; then
    why=""
    for reasons in clocks_throttle_reasons.active clocks_event_reasons.active; do  # renamed in newer drivers
      lim=$(left 20 "$SUMMARY_S")  # a hanging nvidia-smi must not cost summary.txt
      if (( lim < 3 )); then why="${why:+$why; }skipped: ${lim}s left before the deadline less ${SUMMARY_S}s"; break; fi
      timeout "$lim" nvidia-smi --query-gpu="$SMI_STATE,$reasons" --format=csv > "$OUT/.smi" 2>&1; rc=$?
      if (( rc == 0 )); then
        stamp "gpu state $1:"; tee -a "$OUT/gpu.txt" < "$OUT/.smi"; rm -f "$OUT/.smi"; return 0
      fi
      why="nvidia-smi failed (exit $rc$( (( rc == 124 )) && echo ": hung ${lim}s"))"
      [[ -s $OUT/.smi ]] && why="$why: $(head -c 200 "$OUT/.smi")"
    done
    rm -f "$OUT/.smi"
  fi
  stamp "gpu state $1: $why"
}
run_tests() {  # name, seconds, workers, pytest args
  local name=$1 limit=$2 workers=$3; shift 3
  local par=(); (( HAVE_XDIST && workers > 1 )) && par=(-n "$workers")
  stamp "tests $name (limit ${limit}s, ${workers} workers)"
  echo "=== tests $name" >> "$OUT/tests.txt"
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider "${par[@]}" --durations=5 "$@" > "$OUT/.tests_part" 2>&1
  echo "exit status $?" >> "$OUT/.tests_part"
  cat "$OUT/.tests_part" >> "$OUT/tests.txt"; tail -12 "$OUT/.tests_part"; rm -f "$OUT/.tests_part"
}

if [[ $DEV == cuda ]]; then
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    > "$OUT/gpu.txt" || echo "nvidia-smi failed or hung (exit $?)" >> "$OUT/gpu.txt"
else
  echo "no GPU: dry run on $DEV" > "$OUT/gpu.txt"
fi
cat "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
gpu_state start

build_pid=
if has build || ! ls ppap_fast/_C*.so >/dev/null 2>&1; then
  stamp "build extension for this torch (background, into .gpu_build)"
  rm -f ppap_fast/_C*.so
  timeout "$(budget 180 $(( R_UPDATE + R_LORA + R_BENCH + R_SCALE )))" python3 setup.py build_ext --build-lib .gpu_build/lib --build-temp .gpu_build/tmp \
    > "$OUT/build.log" 2>&1 &
  build_pid=$!
fi
finish_build() {  # wait for the background build (it has its own timeout), then put the extension in place
  [[ -z $build_pid ]] && return
  if wait "$build_pid" && cp .gpu_build/lib/ppap_fast/_C*.so ppap_fast/; then
    stamp "extension built: $(ls ppap_fast/_C*.so)"
  else
    tail -30 "$OUT/build.log"; stamp "BUILD FAILED (tests go on with the triton/reference paths)"
  fi
  build_pid=
}

if has tests && [[ -z ${TESTS_ONLY:-} ]]; then
  # these pick Triton/reference paths by themselves and need no extension: they overlap the build
  run_tests sampling_norm "$(budget 150 $(( R_UPDATE + R_LORA + R_BENCH + R_SCALE )))" 6 tests/test_norm_ops.py tests/test_sampling.py tests/test_adm.py \
    tests/test_fast_sampling.py tests/test_norm_act.py -m cuda
fi
finish_build
timeout 90 python3 -c "import ppap_fast.ops as o, json; print(json.dumps(o.backend_report('$DEV'), indent=1))" > "$OUT/backends.json" 2>&1
if has probe; then  # toolchain facts and whether a C++ error raised in the extension reaches Python
  stamp "probe"
  timeout 60 bash benchmarks/ext_probe.sh >> "$OUT/gpu.txt" 2>&1
fi

if has tests && [[ -n ${TESTS_ONLY:-} ]]; then  # a rerun's few tests, after the build
  # shellcheck disable=SC2086
  run_tests only "$(budget "${TESTS_ONLY_CAP:-120}" $(( R_BENCH + R_SCALE )))" "${TESTS_ONLY_WORKERS:-4}" $TESTS_ONLY
elif has tests; then
  run_tests update_graph_build "$(budget 90 $(( R_LORA + R_BENCH + R_SCALE )))" 8 tests/test_guided_update.py \
    tests/test_extension_build.py tests/test_train_graph.py
  # shellcheck disable=SC2086
  run_tests lora "$(budget 150 $(( R_BENCH + R_SCALE )))" 10 tests/test_lora_ops.py $LORA_TEST_ARGS \
    ${LORA_TEST_K:+-k "$LORA_TEST_K"}
fi

if has bench; then
  lim=$(budget "${BENCH_CAP:-300}" "$R_SCALE"); stamp "benchmarks (limit ${lim}s; bench.json after every suite)"
  timeout "$lim" python3 benchmarks/run.py --device "$DEV" --quick --json "$OUT/bench.json" \
    --only $BENCH_SUITES 2>&1 | tee -a "$OUT/gpu.txt" | grep -v "^  " | tail -25
  rm -f "$OUT"/.*.tmp "$OUT"/*.tmp  # a JSON write cut by the timeout (hidden name; the tool returns few files)
  gpu_state "after bench"
fi

if has scale; then
  export PPAP_GEN_IMAGES="${PPAP_GEN_IMAGES:-256}"
  lim=$(budget 200 "$SUMMARY_S")
  stamp "real scale (limit ${lim}s): ADM-256 + ResNet50 PPAP-10 DDIM-25 batch 32; generation of $PPAP_GEN_IMAGES images"
  timeout "$lim" python3 benchmarks/run.py --device "$DEV" --quick --json "$OUT/scale.json" \
    --only $SCALE_SUITES 2>&1 | tee -a "$OUT/gpu.txt" | grep -v "^  " | tail -12
  rm -f "$OUT"/.*.tmp "$OUT"/*.tmp
fi

stamp "summary"
lim=$(left 25 0); (( lim < 5 )) && lim=5
timeout "$lim" python3 benchmarks/summarize.py "$OUT" | tee "$OUT/summary.txt"
