# Sourced by benchmarks/device_run.sh and benchmarks/device_recheck.sh: the settings both read ($OUT made absolute,
# PYTHON, DRY_RUN), the clock helpers, the step timeout and the log. The caller sets BUDGET (seconds) before it calls
# left or step, and TMO_MIN / TMO_KILL (seconds) to change tmo's defaults.
set -u
OUT=${OUT:-./device_out}
PY=${PYTHON:-python3}
DRY=${DRY_RUN:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(now) )); }
step() { echo; echo "=== $* (t=$(now) s, $(left) s left) ==="; }
# tmo SECONDS CMD...: CMD under `timeout -s INT` (pytest then prints its summary), SIGKILL TMO_KILL s later; skipped
# (rc 124) when fewer than TMO_MIN seconds are given
tmo() { local s=$1; shift
        if [ "$s" -lt "${TMO_MIN:-15}" ]; then echo "skipped: only $s s left for: $*"; return 124; fi
        timeout -s INT -k "${TMO_KILL:-20}" "$s" "$@"; }
# log_to FILE: this script's output to FILE and the terminal from here on; log_close at the end waits for tee (bash
# does not wait for a process substitution: without it the log's end is lost), at most 10 s
log_to() { exec > >(tee "$1") 2>&1; TEE_PID=$!; }
log_close() { exec >&- 2>&-; for _ in $(seq 40); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.25; done; }
