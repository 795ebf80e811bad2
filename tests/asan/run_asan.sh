#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: builds csrc/*.cpp and csrc/cpu/*.cpp with
# -fsanitize=address,undefined (tests/asan/build.py, into a copy of the package under $FASTATTN_ASAN_DIR), then runs
# the cpu backend's tests on it — the correctness matrix's cells except the two long ones, the kernel tests, the
# op-level bad-input tests, the decode kernel, the cpu cases of the fuzz test — with libasan preloaded (Python itself
# is not instrumented). Any invalid access or undefined behaviour aborts the run with a report. Opt-in (not part of
# `pytest tests` unless FASTATTN_ASAN=1, see tests/test_asan.py): about 18 minutes on 2 cores, 17 of them the build.
#   usage: tests/asan/run_asan.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
DIR="${FASTATTN_ASAN_DIR:-${TMPDIR:-/tmp}/fastattn_asan_$(id -u)}"
mkdir -p "$DIR"
ASAN_LIB="$(${CC:-gcc} -print-file-name=libasan.so)"
UBSAN_LIB="$(${CC:-gcc} -print-file-name=libubsan.so)"
export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB"
# Python and torch allocate for good at exit (leaks are not what this run looks for); torch's own libraries are not
# instrumented, so only errors inside fastattn's code (and the memory it touches) are reported.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
start=$(date +%s)
"$PY" tests/asan/build.py "$DIR"
echo "asan build took $(( $(date +%s) - start )) s"
# The sanitized package shadows the checkout's: pytest is started without the checkout on sys.path.
export PYTHONPATH="$DIR"
export FASTATTN_FUZZ_CASES="${FASTATTN_FUZZ_CASES:-120}" FASTATTN_FUZZ_BACKENDS=cpu
"$PY" -P -c "import fastattn, fastattn.ops as o; assert o.loaded(), o.LOAD_ERROR; print('testing', fastattn.__file__)"
"$PY" -P -m pytest -q -p no:cacheprovider \
  "tests/test_matrix.py" -k "cpu- and not long_1025 and not square_257" \
  "$@"
"$PY" -P -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py tests/test_op_safety.py tests/test_fuzz.py \
  tests/test_decode.py tests/test_kvcache_safety.py -k "not triton and not sm90 and not memory_linear" "$@"
echo "asan run took $(( $(date +%s) - start )) s"
