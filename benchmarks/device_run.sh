#!/usr/bin/env bash
# One cold GPU session in one call: H200, no network, Python 3.12, torch 2.11, triton 3.6, an empty Triton cache,
# 16 cores. The whole script stays under BUDGET_S (570 s); every step's output lands in $OUT as it is written.
#
#   t=0    install (pip -e ., sm_90 only, in the background) while the versions print
#   ~80 s  fastattn.info; then two test stages side by side:
#            A (foreground, no Triton compiles): the cuda backend's GPU tests, its matrix cells, decode and
#              dropout on cuda; then compute-sanitizer memcheck, and racecheck if B still compiles (the workload
#              without PyTorch's caching allocator, so memcheck sees accesses past a tensor's end)
#            B (background, pytest-xdist): everything that compiles Triton or inductor kernels: test_triton.py,
#              test_compile.py, the Triton fp16/bf16 matrix cells, Triton decode and dropout; fp32 cells last
#   B done the benchmark alone on the GPU (--preset gpu-first: most important shapes first, each result streamed
#          to $OUT as measured, FASTATTN_TRITON_AUTOTUNE=0: the heuristic Triton config, no cold autotuning)
#   end    racecheck with what time is left, if it did not run beside B; pack
#
# Every pytest gets `timeout -s INT` (pytest then prints its summary of what ran), -ra --durations, and its whole
# output in a file under $OUT. Usage, from the repo root:  OUT=/some/dir bash benchmarks/device_run.sh
# The device tool returns at most 8 files from $OUT; this script writes 7: device_run.log, tests_cuda.txt,
# tests_triton.txt, sanitizer.txt, bench_stream.jsonl, results.json, device_run.tar.gz (every other log, the CSVs
# and plots).
#
# DRY_RUN=1 (benchmarks/rehearse_gpu_stack.sh, no GPU): the same control flow and commands on CPU with short
# timeouts: no pip install (the rehearsal builds in place), the benchmark on --device cpu --preset tiny, and the
# files in $OUT checked against the tool's limits at the end.
. "$(dirname "$0")/device_lib.sh"  # OUT, PY, DRY; now, left, step, tmo, log_to, log_close
W=${WORK:-/tmp/fastattn_device_run}; rm -rf "$W"; mkdir -p "$W"  # working files: only the key ones go to $OUT
export PYTHONUNBUFFERED=1 FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# Cold cache: one heuristic Triton config per kernel key instead of compiling and timing every config.
export FASTATTN_TRITON_AUTOTUNE=${FASTATTN_TRITON_AUTOTUNE:-0}
if [ "$DRY" = 1 ]; then
  BUDGET=${BUDGET_S:-300}; T_INSTALL=0; T_A=120; BENCH_MIN=45; NB=2; BENCH="--device cpu --preset tiny"
else
  BUDGET=${BUDGET_S:-570}; T_INSTALL=240; T_A=170; BENCH_MIN=190; NB=${PYTEST_WORKERS:-8}
  BENCH="--device cuda --preset gpu-first"
fi
TAIL=25  # seconds kept for packing at the end
log_to "$OUT/device_run.log"

# pytest: the summary of failures, errors and skips with reasons, the slowest tests, and (with pytest-timeout)
# a per-test limit so one hanging test cannot eat the budget.
PYTEST=($PY -m pytest -p no:cacheprovider -q -ra --tb=short --durations=10)
HAS_TO=; $PY -c "import pytest_timeout" 2>/dev/null && HAS_TO=1 && PYTEST+=(--timeout=150)
to() { [ -n "$HAS_TO" ] && echo "--timeout=$1"; }  # a later --timeout overrides the 150 s
XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n "$NB")
summary() { echo "--- $1: rc=$2 (0 passed, 1 failures, 5 nothing selected, 124/130 timed out); its end:"
            grep -v -E '^(\.|s|F|E|x)+ *(\[ *[0-9]+%\])?$' "$3" | tail -n "${4:-30}"; }

step "install in the background (FASTATTN_CUDA_ARCHS=$FASTATTN_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS) and versions"
INSTALL=($PY -m pip install --no-index --no-build-isolation --no-deps --disable-pip-version-check -e .)
if [ "$DRY" = 1 ]; then
  echo "DRY_RUN: not running ${INSTALL[*]} (the rehearsal built the extension in place)"; ( exit 0 ) & INST=$!
else
  timeout "$T_INSTALL" "${INSTALL[@]}" > "$W/install.log" 2>&1 & INST=$!
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,compute_cap --format=csv \
  || echo "nvidia-smi: not available"
$PY - <<'EOF'
import sys, numpy, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn",
      torch.backends.cudnn.version(), "| triton", tv, "| numpy", numpy.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "| sm", f"{p.major}.{p.minor}", "|", p.multi_processor_count, "SMs |",
          round(p.total_memory / 2**30), "GiB")
EOF
$PY -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -i -E '^(transformers|accelerate|pytest|pytest-xdist|pytest-timeout|ninja|setuptools) ' | tr -s ' '
echo "compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null \
  || echo 'not found')"
wait "$INST"; RC=$?
if [ "$RC" = 0 ]; then
  echo "install ok ($(now) s)"
else
  echo "INSTALL FAILED or timed out (rc=$RC); the end of its log:"; tail -30 "$W/install.log"
  if [ "$(left)" -gt 400 ]; then  # e.g. the image's venv is not writable: build in place instead
    echo "trying: setup.py build_ext --inplace"
    timeout 240 $PY setup.py build_ext --inplace -j "$MAX_JOBS" > "$W/build_inplace.log" 2>&1; echo "rc=$?"
    tail -5 "$W/build_inplace.log"
  fi
  echo "continuing: the Triton, SDPA and reference backends do not need the C++ extension"
fi

step "python -m fastattn.info"
# Outputs go to files, never through a pipe: a stray child that kept a pipe open would block the script.
timeout 60 $PY -m fastattn.info > "$W/info.txt" 2>&1; cat "$W/info.txt"

# Stage B first (it runs longest): it must end by B_END so the benchmark keeps BENCH_MIN seconds.
B_END=$(( BUDGET - BENCH_MIN - TAIL ))
# On CPU the interpreter is slow: stage B is cut, as a rehearsal of that (its first part takes ~70 s on 2 quiet
# cores, so 40 s cuts it however quiet the machine; 75 s had let it finish in time on a quiet one).
[ "$DRY" = 1 ] && B_END=$(( $(now) + 40 ))
step "stage B in the background (pytest ${XDIST[*]:-without xdist}): Triton and inductor compiles, until t=$B_END"
(
  K_B1="test_triton.py or test_compile.py or (matrix[triton- and not float32) or triton.decode_split"
  K_B1="$K_B1 or triton-cuda or test_auto_prefers or test_blocks_triton or (gpu_kernels_under_simulated_cp and triton)"
  [ "$DRY" = 1 ] && K_B1="test_triton.py or test_compile.py or matrix[triton-"  # on CPU: cut by the timeout
  echo "### B1: Triton and inductor tests, fp16/bf16 Triton matrix cells (-k \"$K_B1\")"
  tmo $(( B_END - $(now) )) "${PYTEST[@]}" "${XDIST[@]}" -m "not slow" -k "$K_B1" tests/test_triton.py \
    tests/test_compile.py tests/test_matrix.py tests/test_decode.py tests/test_dropout_determinism.py \
    tests/test_blocks_triton.py tests/distributed/test_cp_attention.py
  echo "### B1 rc=$?"
  echo "### B2: fp32 Triton matrix cells with what is left"
  tmo $(( B_END - $(now) )) "${PYTEST[@]}" "${XDIST[@]}" -k "matrix[triton- and float32" tests/test_matrix.py
  echo "### B2 rc=$?"
) > "$OUT/tests_triton.txt" 2>&1 &
STAGE_B=$!

step "stage A: the cuda backend (no Triton compiles): GPU tests, matrix cells, decode and dropout"
# test_cuda_gpu.py includes the block-split checks (offsets, out_fp32, bwd_acc, dropout keyed on positions); the CP
# matrix runs the cuda kernels under W simulated ranks on the one GPU.
K_A="test_cuda_gpu.py or matrix[cuda- or cuda.decode_fwd or generic.cuda or cuda-cuda"
K_A="$K_A or (gpu_kernels_under_simulated_cp and not triton)"
tmo "$T_A" "${PYTEST[@]}" -m "not slow" -k "$K_A" tests/test_cuda_gpu.py tests/test_matrix.py tests/test_decode.py \
  tests/distributed/test_cp_attention.py \
  tests/test_dropout_determinism.py > "$OUT/tests_cuda.txt" 2>&1
summary "stage A" $? "$OUT/tests_cuda.txt"

# compute-sanitizer through tests/test_cuda_gpu.py::test_compute_sanitizer (its workload runs with
# PYTORCH_NO_CUDA_MEMORY_CACHING=1); --timeout: the step's limit instead of the per-test 150 s
sanitize() {  # tool, seconds
  { echo "### $1"; tmo "$2" "${PYTEST[@]}" $(to "$2") -k "compute_sanitizer and $1" tests/test_cuda_gpu.py
    echo "### $1 rc=$?"; } >> "$OUT/sanitizer.txt" 2>&1
  summary "$1" "$(sed -n "s/^### $1 rc=//p" "$OUT/sanitizer.txt")" "$OUT/sanitizer.txt" 12
}
step "compute-sanitizer memcheck while stage B compiles"
S=$(( B_END - $(now) )); [ "$S" -lt 90 ] && S=90  # at least 90 s, but never into the benchmark's minimum
M=$(( $(left) - BENCH_MIN - TAIL )); [ "$S" -gt "$M" ] && S=$M
sanitize memcheck "$S"
RACE=0
if [ $(( B_END - $(now) )) -ge 45 ] && kill -0 "$STAGE_B" 2>/dev/null; then
  step "compute-sanitizer racecheck while stage B still compiles"
  sanitize racecheck $(( B_END - $(now) )); RACE=1
fi

step "waiting for stage B"
wait "$STAGE_B"
echo "--- stage B's ends (full output: tests_triton.txt):"
grep -E '^(###|FAILED|ERROR|=+ .*(passed|failed|error|skipped|no tests ran).* =+$)|Timeout|KeyboardInterrupt' \
  "$OUT/tests_triton.txt" | tail -60

step "benchmark: python -m fastattn.benchmark $BENCH (FASTATTN_TRITON_AUTOTUNE=$FASTATTN_TRITON_AUTOTUNE)"
B=$(( $(left) - TAIL - (RACE == 1 || DRY == 1 ? 0 : 60) ))  # 60 s for racecheck unless it already ran
if [ "$B" -gt 40 ]; then
  # --max-seconds: no new case after it; the table, results.json and the plots follow (~10-20 s).
  tmo "$B" $PY -m fastattn.benchmark $BENCH --out "$W/bench" --max-seconds $(( B - 25 )) --no-progress \
    --stream "$OUT/bench_stream.jsonl" > "$W/bench.txt" 2>&1
  RC=$?; tail -150 "$W/bench.txt"
  echo "benchmark rc=$RC; $(( $(cat "$OUT/bench_stream.jsonl" 2>/dev/null | wc -l) - 1 )) results streamed"
  cp "$W/bench/results.json" "$OUT/" 2>/dev/null || echo "no results.json (the stream has what was measured)"
else
  echo "skipped: only $(left) s left"
fi

if [ "$RACE" = 0 ]; then
  step "compute-sanitizer racecheck with what is left"
  sanitize racecheck $(( $(left) - TAIL ))
fi

step "pack"
tar czf "$OUT/device_run.tar.gz" -C "$(dirname "$W")" "$(basename "$W")" 2>/dev/null || echo "tar failed"
if [ "$DRY" = 1 ]; then  # the device tool's limits on what comes back: 8 files, plain names, 2 folders deep
  n=$(find "$OUT" -type f | wc -l)
  bad=$(find "$OUT" -mindepth 1 | sed "s|^$OUT/||" | grep -v -E '^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,2}$')
  echo "DRY_RUN: $n files in \$OUT (limit 8)${bad:+; bad names: $bad}"
  [ "$n" -le 8 ] && [ -z "$bad" ] || echo "DRY_RUN: OUT LIMITS BROKEN"
fi
echo "done in $(now) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
log_close
