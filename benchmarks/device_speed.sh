#!/usr/bin/env bash
# The next GPU session's one call, after the first contact (benchmarks/results/gpu-h200-20261204): the tests passed
# there, so this one measures what the first run left open, most valuable first; everything ends by BUDGET_S (420 s,
# which leaves a start and a rerun inside 15 minutes of device time). Each step's output lands in $OUT as written.
#
#   t=0   install (pip -e ., sm_90) in the background; the versions
#   t=0   host time per call (benchmarks/gpu_host_time.py, heuristic Triton config; the host busy with the build):
#         the first run's decode was flat at 0.47-0.74 ms from 4k to 32k keys; enqueue vs total vs kernel time,
#         host syncs per call
#   ~30 s the tuned Triton kernels (FASTATTN_TRITON_AUTOTUNE=1, a cold cache: every config compiled and timed) on
#         the shapes that decide the prefill (bf16, hd 128, S 8k, causal or not, fwd and fwd+bwd), beside cuDNN and
#         FlashAttention-2, and decode at 4k/32k keys; streamed as measured
#   then  the decode kernels against their number of splits (benchmarks/gpu_decode_splits.py), host time again on a
#         quiet host with the C++ extension built (the cuda backend's rows) and cProfile, and
#         the rechecks the first run cut (context-parallel GPU cells, the Triton fullgraph compile) in what is left
#
# Usage, from the repo root:  OUT=/some/dir bash benchmarks/device_speed.sh   (DRY_RUN=1: on CPU, no install)
. "$(dirname "$0")/device_lib.sh"  # OUT, PY, DRY; now, left, step, tmo, log_to, log_close
W=${WORK:-/tmp/fastattn_device_speed}; rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
BUDGET=${BUDGET_S:-420}
log_to "$OUT/speed.log"
TMO_MIN=10 TMO_KILL=10
if [ "$DRY" = 1 ]; then
  DEV="--device cpu"; SEQ=128; DSEQ=128,256; HOST_ARGS="--calls 50"
else
  DEV="--device cuda"; SEQ=8k; DSEQ=4k,32k; HOST_ARGS="--calls 200 --profile 25"
fi

step "install in the background; versions"
if [ "$DRY" = 1 ]; then ( exit 0 ) & INST=$!; else
  timeout 200 $PY -m pip install --no-index --no-build-isolation --no-deps --disable-pip-version-check -e . \
    > "$W/install.log" 2>&1 & INST=$!
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, triton; print('torch', torch.__version__, '| cudnn', torch.backends.cudnn.version(), '| triton', triton.__version__, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

step "host time per call, while the extension builds (a busy host; the quiet rerun and the cuda rows come later)"
FASTATTN_TRITON_AUTOTUNE=0 tmo 45 $PY benchmarks/gpu_host_time.py $HOST_ARGS --profile 0 > "$OUT/host_time_busy.txt" 2>&1
echo "rc=$?"; cat "$OUT/host_time_busy.txt"

step "tuned Triton kernels (cold autotuning) beside cuDNN and FlashAttention-2: bf16 hd128 S=$SEQ; decode $DSEQ"
B=$(( $(left) - 165 ))
tmo "$B" env FASTATTN_TRITON_AUTOTUNE=1 $PY -m fastattn.benchmark $DEV --dtype bf16 --headdims 128 --seqlens $SEQ \
  --causal both --mode fwd,fwd_bwd --model off --backends 'sdpa.cudnn,sdpa.flash,fastattn.triton' \
  --max-seconds $(( B - 15 )) --no-plots --no-progress --out "$W/tuned" --stream "$OUT/tuned.jsonl" \
  > "$W/tuned.txt" 2>&1
echo "rc=$?"; grep -v "skipped: time budget" "$W/tuned.txt" | tail -n 40
tmo $(( $(left) - 150 )) env FASTATTN_TRITON_AUTOTUNE=0 $PY -m fastattn.benchmark $DEV --dtype bf16 --headdims 128 \
  --seqlens $DSEQ --mode decode --model off --max-seconds 20 --no-plots --no-progress --out "$W/decode" \
  --backends 'sdpa.cudnn,fastattn.triton,fastattn.cuda,fastattn.auto' --stream "$OUT/decode.jsonl" \
  > "$W/decode.txt" 2>&1
echo "rc=$?"; grep -v "skipped: time budget" "$W/decode.txt" | tail -n 24

wait "$INST"; echo "install rc=$? ($(now) s)"; [ "$DRY" = 1 ] || tail -n 3 "$W/install.log"
step "the decode kernels against num_splits (the CUDA kernel read ~1 TB/s at 32k keys with the heuristic's 5)"
tmo 70 $PY benchmarks/gpu_decode_splits.py > "$OUT/decode_splits.txt" 2>&1
echo "rc=$?"; cat "$OUT/decode_splits.txt"

step "host time per call on a quiet host, the extension built (the cuda backend's rows), with cProfile"
FASTATTN_TRITON_AUTOTUNE=0 tmo 40 $PY benchmarks/gpu_host_time.py $HOST_ARGS > "$OUT/host_time.txt" 2>&1
echo "rc=$?"; head -n 16 "$OUT/host_time.txt"

step "rechecks the first run cut: context-parallel GPU cells, the Triton fullgraph compile"
PYTEST=($PY -m pytest -p no:cacheprovider -v -ra --tb=short)
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=60)
XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n "$([ "$DRY" = 1 ] && echo 2 || echo 8)")
K="(gpu_kernels_under_simulated_cp and triton) or test_compile_fullgraph_matches_eager"
FASTATTN_TRITON_AUTOTUNE=0 tmo $(( $(left) - 8 )) "${PYTEST[@]}" "${XDIST[@]}" -k "$K" tests/test_compile.py \
  tests/distributed/test_cp_attention.py > "$OUT/rechecks.txt" 2>&1
echo "rc=$?"; grep -E '^(FAILED|ERROR)|^=+ .*(passed|failed|error|no tests ran).* =+$' "$OUT/rechecks.txt" | tail -n 20
echo "done in $(now) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
log_close
