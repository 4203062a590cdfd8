#!/usr/bin/env bash
# Long property-test runs ("fuzzing" on stable Rust: cargo-fuzz needs nightly, which CI
# does not have). Each target's property tests run again and again with fresh random seeds
# for SECONDS seconds, at nice 19, and stop at the first failure (its output is kept).
#
#   bench/fuzz.sh [SECONDS] [TARGET...]     targets: sip mesh nodefile adminjson (default: all)
#
# Results: one line per target in target/fuzz/summary.txt (runs, cases, failures).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-3600}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(sip mesh nodefile adminjson)
CASES=${FUZZ_CASES:-5000}
OUT=target/fuzz
mkdir -p "$OUT"

# Builds a test binary and copies it aside, so later builds do not replace it mid-run.
binary() { # package, cargo test selector...
  local pkg=$1; shift
  cargo test -p "$pkg" "$@" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' | tail -1
}

declare -A BIN FILTER
BIN[sip]=$(binary causeway-sip --test parse);            FILTER[sip]=""
BIN[mesh]=$(binary causeway-mesh --lib);                 FILTER[mesh]="never_panic|round_trip|without_panic"
BIN[nodefile]=$(binary causeway-cluster --lib);          FILTER[nodefile]="a_damaged_node_file"
BIN[adminjson]=$(binary causeway-admin --test api_json); FILTER[adminjson]=""

run_target() {
  local t=$1 bin="$OUT/$1.bin" runs=0 end=$(( $(date +%s) + SECONDS_EACH ))
  cp "${BIN[$t]}" "$bin"
  local args=()
  [ -n "${FILTER[$t]}" ] && mapfile -t args < <("$bin" --list 2>/dev/null | sed -n 's/: test$//p' | grep -E "${FILTER[$t]}")
  while [ "$(date +%s)" -lt "$end" ]; do
    if ! PROPTEST_CASES=$CASES nice -n 19 "$bin" --exact "${args[@]}" >"$OUT/$t.last" 2>&1; then
      cp "$OUT/$t.last" "$OUT/$t.failure"
      echo "$t: FAILED after $runs runs ($(( runs * CASES )) cases per property); see $OUT/$t.failure" | tee -a "$OUT/summary.txt"
      return 1
    fi
    runs=$((runs + 1))
  done
  local props
  props=$(grep -c '\.\.\. ok' "$OUT/$t.last" || true)
  echo "$t: $runs runs x $CASES cases x $props tests in ${SECONDS_EACH}s (nice 19), 0 failures ($(date -u +%FT%TZ))" | tee -a "$OUT/summary.txt"
}

pids=()
for t in "${TARGETS[@]}"; do run_target "$t" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
