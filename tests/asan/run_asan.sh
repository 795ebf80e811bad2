#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: builds csrc/*.cpp and csrc/cpu/*.cpp with
# -fsanitize=address,undefined (tests/asan/build.py, into a copy of the package under $FASTATTN_ASAN_DIR), then runs
# the cpu backend's tests on it — the correctness matrix's cells except the two long ones, the kernel tests, the
# op-level bad-input tests, the decode kernel, the cpu cases of the fuzz test — with libasan preloaded (Python itself
# is not instrumented). Any invalid access or undefined behaviour aborts the run with a report. Part of
# `pytest tests` through tests/test_asan.py (FASTATTN_ASAN=0 skips it): about 3 minutes on 2 cores, half of it the
# build (MAX_JOBS compile jobs; a second run in the same checkout rebuilds only changed sources).
#   usage: tests/asan/run_asan.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
# One build folder per checkout, Python and torch: two checkouts running this at once must not share the package
# copy, and a library built against another torch is not loadable (torch's JIT build would not rebuild it).
STACK="$("$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)')"
TAG="$(printf '%s %s' "$(pwd -P)" "$STACK" | cksum | cut -d' ' -f1)"
DIR="${FASTATTN_ASAN_DIR:-${TMPDIR:-/tmp}/fastattn_asan_$(id -u)_$TAG}"
mkdir -p "$DIR"
ASAN_LIB="$(${CC:-gcc} -print-file-name=libasan.so)"
UBSAN_LIB="$(${CC:-gcc} -print-file-name=libubsan.so)"
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  [ -f "$lib" ] || { echo "${CC:-gcc} has no $lib (install gcc's libasan/libubsan)"; exit 1; }
done
export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB"
# Python and torch allocate for good at exit (leaks are not what this run looks for); torch's own libraries are not
# instrumented, so only errors inside fastattn's code (and the memory it touches) are reported.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
start=$(date +%s)
"$PY" tests/asan/build.py "$DIR"
echo "asan build took $(( $(date +%s) - start )) s (in $DIR)"
# The sanitized package shadows the checkout's: Python starts in $DIR (sys.path[0], and PYTHONPATH for the child
# processes some tests start), so `import fastattn` finds the copy, never the checkout (works on Python 3.10 too).
ROOT="$(pwd -P)"
cd "$DIR"
DIR="$(pwd -P)"
export PYTHONPATH="$DIR"
export FASTATTN_FUZZ_CASES="${FASTATTN_FUZZ_CASES:-120}" FASTATTN_FUZZ_BACKENDS=cpu
"$PY" -c "import sys, fastattn, fastattn.ops as o; assert fastattn.__file__.startswith(sys.argv[1]), fastattn.__file__
assert o.loaded(), o.LOAD_ERROR; print('testing', fastattn.__file__)" "$DIR/"
# --capture=sys: pytest's default fd-level capture would swallow the sanitizer's report when it aborts the process.
"$PY" -m pytest -q -p no:cacheprovider --capture=sys \
  "$ROOT/tests/test_matrix.py" -k "cpu- and not long_1025 and not square_257" \
  "$@"
# fp16's forward on bf16 pairs for every cell (by default only forwards of 64 rows a KV head take them)
FASTATTN_CPU_FP16_PAIRS=1 "$PY" -m pytest -q -p no:cacheprovider --capture=sys \
  "$ROOT/tests/test_matrix.py" -k "cpu- and float16 and not long_1025" \
  "$@"
"$PY" -m pytest -q -p no:cacheprovider --capture=sys "$ROOT/tests/test_cpu_kernels.py" "$ROOT/tests/test_op_safety.py" \
  "$ROOT/tests/test_fuzz.py" "$ROOT/tests/test_decode.py" "$ROOT/tests/test_kvcache_safety.py" \
  "$ROOT/tests/test_mask_band.py" "$ROOT/tests/test_decode_mask.py" \
  -k "not triton and not sm90 and not memory_linear and not planted and not compiled and not forced_fp16" "$@"
echo "asan run took $(( $(date +%s) - start )) s"
