#!/usr/bin/env bash
# One GPU session (H200, no network; Python 3.12, torch 2.11, triton 3.6): install, versions, GPU tests, benchmark.
# Everything lands under $OUT (default ./device_out); the whole script stays under ~9.5 minutes:
#   install <= 240 s, GPU tests <= 170 s, the rest (>= ~150 s) for the benchmark (quick preset, --max-seconds;
#   SIGTERM from `timeout` still writes what was measured).
# Usage, from the repo root:  OUT=/some/dir bash benchmarks/device_run.sh
# The device tool brings back at most 8 files from $OUT: device_run.log, results.json, results.csv,
# tflops_fwd_bf16.png, bench_table.txt and device_run.tar.gz (every log, plot and CSV of the run).
set -u
OUT=${OUT:-./device_out}
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-570}
mkdir -p "$OUT"
# Working files live outside $OUT (the tool returns at most 8 files): only the key ones and a tarball go there.
W=${WORK:-/tmp/fastattn_device_run}; rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
step() { echo; echo "=== $* (t=$(( $(date +%s) - T0 )) s, $(left) s left) ==="; }
exec > >(tee "$OUT/device_run.log") 2>&1

step "install (FASTATTN_CUDA_ARCHS=$FASTATTN_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
if timeout 240 $PY -m pip install --no-build-isolation --no-deps -e . > "$W/install.log" 2>&1; then
  echo "install ok"
else
  echo "INSTALL FAILED or timed out (rc=$?); the tail of its log:"; tail -30 "$W/install.log"
  echo "continuing: the Triton, SDPA and reference backends do not need the C++ extension"
fi

step "versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'triton', triton.__version__)"
$PY -m fastattn.info 2>&1 | tee "$W/info.txt"

# Correctness steps need no tuning: one heuristic Triton config per key instead of timing every config.
TESTENV="env FASTATTN_TRITON_AUTOTUNE=0"
step "GPU tests: pytest tests -m 'gpu and not slow'"
timeout 75 $TESTENV $PY -m pytest tests -m "gpu and not slow" -x -q -p no:cacheprovider 2>&1 | tail -25 | tee "$W/pytest_gpu.txt"
step "correctness matrix on cuda"
timeout 45 $TESTENV $PY -m pytest tests/test_matrix.py -k cuda -x -q -p no:cacheprovider 2>&1 | tail -25 \
  | tee "$W/pytest_matrix_cuda.txt"

step "decode kernels and dropout on cuda: test_decode.py, test_dropout_determinism.py"
timeout 50 $TESTENV $PY -m pytest tests/test_decode.py tests/test_dropout_determinism.py -q -p no:cacheprovider 2>&1 \
  | tail -25 | tee "$W/pytest_decode_dropout.txt"

step "benchmark: python -m fastattn.benchmark --preset quick --device cuda"
B=$(( $(left) - 130 ))  # ~100 s stay for the sanitizer step
MS=$(( B - 75 )); [ "$MS" -lt 30 ] && MS=30
if [ "$B" -gt 60 ]; then
  # --max-seconds bounds the measurements; the model-level part and the writing come after it.
  timeout "$B" $PY -m fastattn.benchmark --preset quick --device cuda --out "$W/bench" \
    --max-seconds "$MS" --no-progress 2>&1 | tee "$W/bench.txt" | tail -120
else
  echo "skipped: only $(left) s left"
fi

step "compute-sanitizer memcheck + racecheck on small shapes (what time is left)"
S=$(( $(left) - 25 ))
if [ "$S" -gt 30 ]; then
  timeout "$S" $TESTENV $PY -m pytest tests/test_cuda_gpu.py -k compute_sanitizer -q -p no:cacheprovider 2>&1 \
    | tail -15 | tee "$W/pytest_sanitizer.txt"
else
  echo "skipped: only $(left) s left"
fi

step "pack"
cp "$W/bench/results.json" "$W/bench/results.csv" "$OUT/" 2>/dev/null
cp "$W/bench/tflops_fwd_bf16.png" "$OUT/" 2>/dev/null
cp "$W/bench.txt" "$OUT/bench_table.txt" 2>/dev/null
tar czf "$OUT/device_run.tar.gz" -C "$(dirname "$W")" "$(basename "$W")"
echo "done in $(( $(date +%s) - T0 )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
