#!/usr/bin/env bash
# The API is what its schema says (#10 item 5): schemathesis, every check on, a fixed
# seed and a few hundred examples per operation, against a live `capkv dev` cluster
# started from BIN. Rules the schema cannot state are in .ci/schemathesis.toml.
# Fails on any server error (a 500), schema mismatch or undocumented status.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/capkv}
ST=${ST:-st}
PORT_BASE=${PORT_BASE:-17500}
URL="http://127.0.0.1:$((PORT_BASE + 1))"
DATA=$(mktemp -d)
"$BIN" dev --data-dir "$DATA" --base-port "$PORT_BASE" >"$DATA/dev.log" 2>&1 &
DEV=$!
cleanup() {
  kill "$DEV" 2>/dev/null || true
  wait "$DEV" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT
for _ in $(seq 1 120); do
  if curl -fsS "$URL/v1/keyspaces" 2>/dev/null | grep -q '"ap"'; then break; fi
  sleep 0.5
done
curl -fsS "$URL/v1/keyspaces" | grep -q '"ap"' || { cat "$DATA/dev.log"; echo "dev did not start"; exit 1; }
"$ST" --no-color --config-file .ci/schemathesis.toml run "$URL/v1/openapi.json" \
  --url "$URL" --checks all --seed 1 --max-examples 200 --workers 1
