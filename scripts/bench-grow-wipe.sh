#!/bin/bash
# #9 item 5: grow a 3-node cluster under load and wipe a node in the middle.
#
#   scripts/bench-grow-wipe.sh BIN MODE GIB WIPE_AFTER_S OUT_DIR
#
# Starts three `capkv serve` nodes (not `capkv dev`, so one can be killed and restarted),
# runs `capkv bench --grow-gib GIB --value-bytes 16384` against them, and WIPE_AFTER_S
# seconds in kills n3 with SIGKILL, deletes its data directory and starts it again with
# `--initial-cluster-state existing` (a replaced disk): it must catch up (cp: by snapshot)
# while the load goes on. Samples (throughput, latency, RSS, disk, leader changes per node)
# land in OUT_DIR, with the nodes' logs.
# BENCH_FLAGS adds flags to `capkv bench` (e.g. BENCH_FLAGS="--w 2").
set -euo pipefail
BIN=$(realpath "$1"); MODE=$2; GIB=$3; WIPE_AFTER=$4; OUT=$5
BASE=${GROW_BASE_PORT:-29600}
DIR=$(mktemp -d /tmp/capkv-grow.XXXXXX)
mkdir -p "$OUT"
CLUSTER="n1=127.0.0.1:$((BASE + 11))@127.0.0.1:$((BASE + 1)),n2=127.0.0.1:$((BASE + 12))@127.0.0.1:$((BASE + 2)),n3=127.0.0.1:$((BASE + 13))@127.0.0.1:$((BASE + 3))"
declare -A PIDS
start() { # start node $1 with extra flags
    local i=$1; shift
    "$BIN" serve --id "n$i" --data-dir "$DIR/n$i" --cluster "$CLUSTER" --enable-faults "$@" \
        >> "$OUT/n$i.log" 2>&1 &
    PIDS[$i]=$!
}
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
for i in 1 2 3; do start "$i"; done
for _ in $(seq 1 60); do
    curl -sf "http://127.0.0.1:$((BASE + 1))/healthz" > /dev/null && break
    sleep 1
done
"$BIN" bench --node "http://127.0.0.1:$((BASE + 1))" --mode "$MODE" --grow-gib "$GIB" \
    --value-bytes 16384 --clients 64 --report-every 10 --out "$OUT" ${BENCH_FLAGS:-} > "$OUT/bench.out" 2>&1 &
BENCH=$!
sleep "$WIPE_AFTER"
echo "$(date -u +%T) wiping n3" | tee -a "$OUT/bench.out"
kill -9 "${PIDS[3]}"; wait "${PIDS[3]}" 2>/dev/null || true
rm -rf "$DIR/n3"
start 3 --initial-cluster-state existing
wait "$BENCH"
tail -5 "$OUT/bench.out"
