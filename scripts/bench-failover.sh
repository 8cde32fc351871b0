#!/usr/bin/env bash
# Measures cp failover: kill -9 the leader of a 3-node `capkv serve` cluster and time until a
# write through a surviving node is acknowledged. Repeats ROUNDS times (each round restarts the
# killed node first). Usage, from the project root after `cargo build --release`:
#   bash scripts/bench-failover.sh [ROUNDS]      (EXTRA="--election-timeout-ms 300" to pass serve flags)
set -u
BIN=${BIN:-target/release/capkv}
ROUNDS=${1:-10}
P=$((30000 + (RANDOM % 300) * 100))
DIR=$(mktemp -d /tmp/capkv-failover.XXXXXX)
CLUSTER="n1=127.0.0.1:$((P+101))@127.0.0.1:$((P+1)),n2=127.0.0.1:$((P+102))@127.0.0.1:$((P+2)),n3=127.0.0.1:$((P+103))@127.0.0.1:$((P+3))"
declare -A PID
start() { "$BIN" serve --id "n$1" --data-dir "$DIR/n$1" --cluster "$CLUSTER" ${EXTRA:-} >>"$DIR/n$1.log" 2>&1 & PID[$1]=$!; }
cleanup() { kill -9 "${PID[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
for i in 1 2 3; do start $i; done
url() { echo "http://127.0.0.1:$((P+$1))"; }
until curl -sf -XPOST "$(url 1)/v1/keyspaces" -d '{"name":"cp","mode":"cp"}' >/dev/null 2>&1 \
  || curl -s "$(url 1)/v1/keyspaces" 2>/dev/null | grep -q '"cp"'; do sleep 0.2; done
leader() { for i in 1 2 3; do curl -s -m 1 "$(url $i)/v1/cluster" 2>/dev/null | grep -q '"role":"leader"' && { echo $i; return; }; done; }
results=()
for r in $(seq 1 "$ROUNDS"); do
  until curl -sf -XPUT "$(url 1)/v1/kv/cp/warm" -d x >/dev/null 2>&1; do sleep 0.1; done
  L=""; while [ -z "$L" ]; do L=$(leader); done
  S=$(( L % 3 + 1 ))
  t0=$(date +%s%N)
  kill -9 "${PID[$L]}"; wait "${PID[$L]}" 2>/dev/null || true
  until curl -sf -m 3 -XPUT "$(url $S)/v1/kv/cp/r$r?timeout_ms=2000" -d x >/dev/null 2>&1; do :; done
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  results+=("$ms"); echo "round $r: leader n$L killed, write through n$S acknowledged after ${ms} ms"
  start "$L"
  until curl -sf -m 1 "$(url $L)/healthz" >/dev/null 2>&1; do sleep 0.1; done
  sleep 2
done
sorted=$(printf '%s\n' "${results[@]}" | sort -n)
echo "failover ms: min $(echo "$sorted" | head -1), median $(echo "$sorted" | sed -n "$(( (ROUNDS+1)/2 ))p"), max $(echo "$sorted" | tail -1)"
