# Sourced by benchmarks/device_run.sh and benchmarks/device_recheck.sh: the settings both read ($OUT made absolute,
# PYTHON, DRY_RUN) and the clock helpers. The caller sets BUDGET (seconds) before it calls left or step.
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
