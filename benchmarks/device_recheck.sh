#!/usr/bin/env bash
# A short second GPU call after benchmarks/device_run.sh: re-runs what the first run found failing, once fixed,
# and measures the two facts `auto`'s GPU rule rests on (which kernel PyTorch's own SDPA picks, and fp16/fp32
# beside bf16). Sized for what a session has left after the main run (~4-5 min of device time, a ~30 s start):
# everything ends by BUDGET_S (230 s); each step's output lands in $OUT as it is written.
#
#   t=0   install (pip -e ., sm_90) in the background; meanwhile the Triton-side rechecks (no C++ extension
#         needed), pytest-xdist: torch.compile through inductor, the prune predicate's mask tile, the launch lock
#         under simulated context-parallel ranks (threads), the tests fixed for a GPU machine, the GPU hand-over
#   ~75 s the cuda-side rechecks (the extension built): decode kernel cells, racecheck, the cuda matrix cells
#   then  PyTorch's SDPA pick per dtype, and the benchmark: fwd, fp16 and fp32, hd 64/128, S 2k, causal or not
#
# Usage, from the repo root:  OUT=/some/dir bash benchmarks/device_recheck.sh   (DRY_RUN=1: on CPU, no install)
. "$(dirname "$0")/device_lib.sh"  # OUT, PY, DRY; now, left, step, tmo, log_to, log_close
W=${WORK:-/tmp/fastattn_device_recheck}; rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export FASTATTN_TRITON_AUTOTUNE=${FASTATTN_TRITON_AUTOTUNE:-0}
BUDGET=${BUDGET_S:-230}
log_to "$OUT/recheck.log"
PYTEST=($PY -m pytest -p no:cacheprovider -v -ra --tb=short)  # -v: a line per test as it ends (kept if cut)
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=90)
XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n "${PYTEST_WORKERS:-8}")
TMO_MIN=10 TMO_KILL=10  # short steps: tmo runs a step from 10 s left, kills 10 s after its SIGINT
ends() { echo "$(grep -c -E ' PASSED' "$1") passed, $(grep -c -E ' (FAILED|ERROR)' "$1") failed/errors so far:"
         grep -E '^(FAILED|ERROR|SKIPPED)|^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$1" | tail -n 40; }

step "install in the background; versions"
if [ "$DRY" = 1 ]; then ( exit 0 ) & INST=$!; else
  timeout 150 $PY -m pip install --no-index --no-build-isolation --no-deps --disable-pip-version-check -e . \
    > "$W/install.log" 2>&1 & INST=$!
fi
$PY -c "import torch, triton; print('torch', torch.__version__, '| cudnn', torch.backends.cudnn.version(), '| triton', triton.__version__, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

step "Triton-side rechecks (pytest ${XDIST[*]:-without xdist}), while the extension builds"
K_T="compile_fullgraph or refuses_mask or varlen_bert or inductor_dropout or hands_pytorch or mask_tile"
K_T="$K_T or launch_lock or bad_start_values or bad_block_arguments or (triton.decode_split and (dense_short or"
K_T="$K_T dispatcher_routes)) or (gpu_kernels_under_simulated_cp and triton) or test_compile_fullgraph_matches_eager"
T_T=$([ "$DRY" = 1 ] && echo 60 || echo 95)
tmo "$T_T" "${PYTEST[@]}" "${XDIST[@]}" -k "$K_T" tests/test_triton.py tests/test_compile.py tests/test_decode.py \
  tests/test_blocks_triton.py tests/distributed/test_cp_attention.py > "$OUT/recheck_triton.txt" 2>&1 &
TRI=$!
wait "$INST"; echo "install rc=$? ($(now) s)"; [ "$DRY" = 1 ] || tail -3 "$W/install.log"
wait "$TRI"; echo "--- Triton rechecks rc=$?:"; ends "$OUT/recheck_triton.txt"

step "cuda-side rechecks: decode kernel cells, racecheck, alignment, the cuda matrix cells"
K_C="cuda.decode_fwd or alignment or (compute_sanitizer and racecheck) or matrix[cuda-"
tmo $(( $(left) - 80 )) "${PYTEST[@]}" "${XDIST[@]}" -k "$K_C" tests/test_decode.py tests/test_cuda_gpu.py \
  tests/test_matrix.py > "$OUT/recheck_cuda.txt" 2>&1
echo "--- cuda rechecks rc=$?:"; ends "$OUT/recheck_cuda.txt"

step "PyTorch's own SDPA pick per dtype (torch._fused_sdp_choice), and fastattn auto's"
tmo 20 $PY - <<'EOF'
import torch, fastattn
from torch.nn.attention import SDPBackend
dev = "cuda" if torch.cuda.is_available() else "cpu"
for dt in (torch.bfloat16, torch.float16, torch.float32):
    for causal in (False, True):
        q = torch.randn(2, 16, 2048, 128, device=dev, dtype=dt)
        pick = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=causal)).name
        print(f"{str(dt)[6:]:8} causal={causal!s:5} torch picks {pick:20} fastattn auto: "
              f"{fastattn.explain(q, q, q, is_causal=causal).chosen}")
EOF

step "benchmark: fwd fp16 + fp32, hd 64/128, S 2k (PyTorch's pick as fastattn.sdpa beside each kernel forced)"
B=$(( $(left) - 12 ))
if [ "$B" -gt 25 ]; then
  DEVB=$([ "$DRY" = 1 ] && echo "cpu --seqlens 128" || echo "cuda --seqlens 2k")
  tmo "$B" $PY -m fastattn.benchmark --device $DEVB --dtype fp16,fp32 --headdims 64,128 --causal both --mode fwd \
    --model off --backends 'sdpa.flash,sdpa.efficient,sdpa.cudnn,fastattn.sdpa,fastattn.triton,fastattn.auto' --max-seconds $(( B - 10 )) \
    --no-plots --no-progress --out "$W/bench" --stream "$OUT/recheck_bench.jsonl" > "$W/bench.txt" 2>&1
  echo "benchmark rc=$?"; grep -v "skipped: time budget" "$W/bench.txt" | tail -60
else
  echo "skipped: only $(left) s left"
fi
echo "done in $(now) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
log_close
