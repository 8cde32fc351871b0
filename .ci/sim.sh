#!/usr/bin/env bash
# The deterministic simulator in CI (docs/simulation.md): a few hundred seeds must keep
# every promise, and each fix of issue 8 taken back must be found within its stated number
# of seeds. Usage: .ci/sim.sh CAPKV_BINARY [SEEDS]
set -euo pipefail
BIN=${1:?usage: .ci/sim.sh CAPKV_BINARY [SEEDS]}
SEEDS=${2:-200}
JOBS=$(nproc)
OUT=target/ci-sim
mkdir -p "$OUT"

# Two clients per workload instead of three: the six workloads of a debug build take about
# 3 s of wall time a seed on two cores with three, and CI must stay under 30 minutes.
echo "== capkv sim: $SEEDS seeds (2 clients per workload)"
"$BIN" sim --seeds "$SEEDS" --jobs "$JOBS" --clients 2 --out "$OUT/failures" | tail -3

# More nodes than replicas: writes taken by a node that is home of none of their keys wait
# as hints, which the final phase must wait for (a false "lost write" before).
echo "== capkv sim: 20 seeds with 5 nodes"
"$BIN" sim --seeds 20 --first 4000 --nodes 5 --jobs "$JOBS" --clients 2 --out "$OUT/failures" | tail -3

# Each fix taken back must make some seed fail (exit 1) within the stated bound, and fail
# the way its bug shows (not for another reason).
# Extra arguments narrow the search (faults, workloads).
found_within() {
  local revert=$1 bound=$2 shows=$3 code=0
  shift 3
  echo "== capkv sim --revert $revert $*: found within $bound seeds?"
  "$BIN" sim --seeds "$bound" --until-failure --jobs "$JOBS" --revert "$revert" "$@" > "$OUT/revert-$revert.txt" || code=$?
  tail -2 "$OUT/revert-$revert.txt"
  if [ "$code" != 1 ]; then
    echo "FAILED: the simulator did not find the bug of --revert $revert within $bound seeds (exit $code)"
    return 1
  fi
  if ! grep -q -- "$shows" "$OUT/revert-$revert.txt"; then
    echo "FAILED: --revert $revert failed, but not with \"$shows\":"
    grep -A6 INVALID "$OUT/revert-$revert.txt" | head -20
    return 1
  fi
}
found_within ap-retries-maybe-delivered 10 "double-count"
found_within stop-answers503 150 "not-linearizable"
found_within purge-deletes-first 150 "the log has a hole"
found_within proposals-wedge 30 "proposals nobody answers" --faults partition --workloads register,unique-insert,idempotent
