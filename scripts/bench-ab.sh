#!/bin/bash
# One A/B leg: a fresh `capkv dev` cluster from binary BIN, loaded by `capkv bench`, then
# stopped and removed. Prints the bench's last samples and totals, and the CPU seconds the
# three nodes used meanwhile (from /proc, so builds without the CPU gauge are measured too).
# Run legs of two builds one after the other, on a quiet machine, and compare ratios.
#
#   scripts/bench-ab.sh BIN LABEL MODE [more capkv bench flags]
#   e.g. scripts/bench-ab.sh target/release/capkv after ap --w 1
set -euo pipefail
BIN=$1; LABEL=$2; MODE=$3; shift 3
DIR=$(mktemp -d /tmp/capkv-ab.XXXXXX)
PORT=${AB_BASE_PORT:-29300}
"$BIN" dev --base-port "$PORT" --data-dir "$DIR/data" > "$DIR/dev.out" 2>&1 &
DEV=$!
trap 'kill -INT $DEV 2>/dev/null; wait $DEV 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 1 60); do
    curl -sf "http://127.0.0.1:$((PORT + 1))/healthz" > /dev/null && break
    sleep 1
done
sleep 3
cpu() { # CPU seconds (user + system) of this cluster's nodes
    local ticks total=0
    ticks=$(getconf CLK_TCK)
    for pid in $(pgrep -f "serve --id n[0-9]+ --data-dir $DIR/data"); do
        total=$((total + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$pid/stat")))
    done
    echo "scale=2; $total / $ticks" | bc
}
before=$(cpu)
echo "== $LABEL $MODE $*"
"$BIN" bench --node "http://127.0.0.1:$((PORT + 1))" --mode "$MODE" --clients 64 \
    --duration "${AB_SECONDS:-60}" --report-every 20 "$@" 2>&1 | tail -3
echo "node cpu seconds: $(echo "$(cpu) - $before" | bc)"
