#!/usr/bin/env bash
# Rehearses the GPU session on the GPU machine's software stack, on a machine without a GPU: Python 3.12,
# torch 2.11, triton 3.6, transformers 5.17 (the H200 image's versions; the development stack is newer).
# Run it before every change that touches GPU-facing code (the Triton kernels or their configs, csrc/cuda, the
# dispatch / compile paths, the benchmark, benchmarks/device_run.sh): a GPU session is rare and short, and a
# failure there costs the whole session.
#
#   bash benchmarks/rehearse_gpu_stack.sh [VENV]      (VENV: default $REHEARSAL_VENV, else .venv312)
#
# The venv, once (packages from PyPI; numpy < 2.4 because triton 3.6's interpreter, which the CPU tests use,
# fails every kernel with numpy >= 2.4 -- the GPU image has numpy 2.5.2 but compiles, never interprets):
#   python3.12 -m venv .venv312 && .venv312/bin/pip install torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest \
#     pytest-xdist pytest-timeout ninja pybind11 setuptools wheel "transformers==5.17.*" accelerate
#
# Steps (each timed; the script stops at the first failure and says which):
#   1 build    setup.py build_ext --inplace for sm_90 (FASTATTN_BUILD_CUDA=auto: CUDA too when nvcc is found, as
#              on the GPU machine; REHEARSE_CUDA=0 builds the CPU part only, much faster). The extension is
#              fastattn/_C.cpython-312-*.so, beside the development stack's (another Python version): both stay.
#   2 import   import fastattn, fastattn._C and `python -m fastattn.info`
#   3 compile  torch.compile(fullgraph=True) tests (test_compile.py, the Triton and decode compile tests), the
#              Triton's decode kernel for sm_90.
#   4 aot      the Triton kernels compiled for sm_90 / sm_80 with triton 3.6 (tests/test_triton_aot.py -m slow)
#   5 bench    the benchmark CLI: --preset tiny on CPU with --stream, and the gpu-first preset's cases
#   6 dry-run  benchmarks/device_run.sh with DRY_RUN=1 (the same steps and commands on CPU, short timeouts),
#              then checks its outputs: every pytest printed a summary (the stage cut by its timeout too),
#              results streamed, the log complete, the files in $OUT within the device tool's limits
#   7 dry-run-speed  the same for benchmarks/device_speed.sh (the next session's speed call)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${1:-${REHEARSAL_VENV:-.venv312}}
PY=$VENV/bin/python
[ -x "$PY" ] || { echo "no python at $PY: create the venv first (see the top of this script)"; exit 2; }
R=${REHEARSAL_DIR:-/tmp/fastattn_rehearsal}; rm -rf "$R"; mkdir -p "$R"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
T0=$(date +%s)
TIMES=()
fail() { echo; echo "REHEARSAL FAILED at step $1 (logs in $R)"; exit 1; }
run_step() {  # name, command...: prints the command's output to $R/<name>.log and its end here
  local name=$1 t=$(date +%s) rc; shift
  echo; echo "=== $name: $* ==="
  "$@" > "$R/$name.log" 2>&1; rc=$?
  tail -n 15 "$R/$name.log"
  TIMES+=("$name $(( $(date +%s) - t )) s (rc $rc)")
  echo "--- $name: rc $rc in $(( $(date +%s) - t )) s"
  [ "$rc" = 0 ] || fail "$name"
}

echo "=== stack"
$PY - <<'EOF' || fail stack
import sys, numpy, torch, triton, transformers
v = lambda s: tuple(int(x) for x in s.split("+")[0].split(".")[:2])
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "numpy",
      numpy.__version__, "transformers", transformers.__version__)
want = {"python": ((3, 12), v(sys.version.split()[0])), "torch": ((2, 11), v(torch.__version__)),
        "triton": ((3, 6), v(triton.__version__)), "transformers": ((5, 17), v(transformers.__version__))}
off = [f"{k} {got} (GPU image: {exp})" for k, (exp, got) in want.items() if got != exp]
if off:
    print("WARNING: not the GPU machine's stack:", "; ".join(off))
if v(triton.__version__) < (3, 8) and v(numpy.__version__) >= (2, 4):
    sys.exit("numpy >= 2.4 with triton < 3.8: the interpreter fails every Triton kernel; install 'numpy<2.4'")
EOF

run_step build env FASTATTN_BUILD_CUDA=$([ "${REHEARSE_CUDA:-auto}" = 0 ] && echo 0 || echo auto) \
  FASTATTN_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-2} $PY setup.py build_ext --inplace
run_step import bash -c "$PY -c 'import fastattn, fastattn._C; print(fastattn.__file__, fastattn._C.__file__)' && \
  $PY -m fastattn.info | tee /dev/stderr | grep -E -q 'C\+\+ ops +loaded'"
run_step compile $PY -m pytest -p no:cacheprovider -q -ra tests/test_compile.py \
  "tests/test_triton.py::test_compile_fullgraph_traces_the_op" "tests/test_triton.py::test_unavailable_reasons" \
  tests/test_decode.py -k "compile or unavailable"
run_step aot $PY -m pytest -p no:cacheprovider -q -ra -m slow tests/test_triton_aot.py
run_step bench bash -c "$PY -m fastattn.benchmark --preset tiny --device cpu --out $R/bench --no-progress \
  --max-seconds 60 --stream $R/bench/stream.jsonl && test \$(wc -l < $R/bench/stream.jsonl) -ge 2 && \
  $PY -c 'from fastattn.benchmark import cli
a = cli.parser().parse_args(\"--preset gpu-first --out x --max-seconds 100 --stream s --no-progress\".split())
p, cases = cli.build_cases(a, \"cuda\")
print(len(cases), \"gpu-first cases, first:\", cases[0].label); assert len(cases) == 92'"

run_step dry-run env DRY_RUN=1 OUT="$R/out" WORK="$R/work" PYTHON="$PY" bash benchmarks/device_run.sh
echo; echo "=== dry-run checks"
ok=1
check() { if eval "$2"; then echo "ok:   $1"; else echo "FAIL: $1"; ok=0; fi; }
S='[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran'
check "device_run.log is complete (tee waited for)" "tail -n 1 '$R/out/device_run.log' | grep -q '^done in'"
check "stage A printed a pytest summary" "grep -E -q '$S' '$R/out/tests_cuda.txt'"
check "stage B was cut by its timeout and still printed a summary" \
  "grep -q 'B1 rc=1[23][0-9]' '$R/out/tests_triton.txt' && grep -E -q '$S' '$R/out/tests_triton.txt'"
check "the sanitizer steps printed summaries" "[ \$(grep -E -c '$S' '$R/out/sanitizer.txt') -ge 2 ]"
check "benchmark results streamed and written" \
  "[ \$(wc -l < '$R/out/bench_stream.jsonl') -ge 2 ] && [ -s '$R/out/results.json' ]"
check "the files in \$OUT fit the device tool's limits" "! grep -q 'OUT LIMITS BROKEN' '$R/out/device_run.log'"
check "the tarball is there" "[ -s '$R/out/device_run.tar.gz' ]"
[ "$ok" = 1 ] || fail dry-run-checks

run_step dry-run-speed env DRY_RUN=1 OUT="$R/out_speed" WORK="$R/work_speed" PYTHON="$PY" bash benchmarks/device_speed.sh
check "speed.log is complete" "tail -n 1 '$R/out_speed/speed.log' | grep -q '^done in'"
check "host time printed every call's row (busy and quiet)" \
  "[ \$(grep -c '^prefill triton' '$R/out_speed/host_time_busy.txt' '$R/out_speed/host_time.txt' | grep -c ':1') = 2 ]"
check "the split sweep printed its rows" "grep -q '^  cpu ' '$R/out_speed/decode_splits.txt'"
check "benchmark results streamed" "[ \$(wc -l < '$R/out_speed/tuned.jsonl') -ge 2 ]"
check "at most 8 files in \$OUT" "[ \$(ls '$R/out_speed' | wc -l) -le 8 ]"
[ "$ok" = 1 ] || fail dry-run-speed-checks

echo; echo "=== rehearsal passed in $(( $(date +%s) - T0 )) s:"; printf '  %s\n' "${TIMES[@]}"
