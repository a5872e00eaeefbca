#!/usr/bin/env bash
# A bounded load check on loopback only: wrk on search and on ask against `domainrag serve`,
# health probes during the load, and the server's resident memory before and after.
# Usage: scripts/load-check.sh [collection]   (needs wrk from Debian, a built binary, an ingested collection)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COLLECTION=${1:-postgres}
PORT=${PORT:-18080}
BIN=${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/domainrag-target}/release/domainrag}
URL=http://127.0.0.1:$PORT
# A key for this run only (auth is on by default), revoked when the script ends.
KEY_JSON=$("$BIN" keys create --admin --name load-check --json)
export DOMAINRAG_KEY=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$KEY_JSON")
KEY_ID=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$KEY_JSON")
DOMAINRAG__GENERATE__MAX_TOKENS=${MAX_TOKENS:-48} "$BIN" serve --bind 127.0.0.1:$PORT 2>/tmp/domainrag-load.log &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; "$BIN" keys revoke "$KEY_ID" >/dev/null' EXIT
for _ in $(seq 1 120); do curl -fsS "$URL/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
rss() { awk '/VmRSS/ {print $2/1024 " MiB"}' /proc/$PID/status; }
echo "RSS at start: $(rss)"
health() { # ok count, p50 and max latency (ms) of N health probes taken during the load
  local out
  out=$(for _ in $(seq 1 "$1"); do curl -o /dev/null -s -w '%{http_code} %{time_total}\n' "$URL/healthz"; sleep 0.2; done)
  local ok n
  ok=$(grep -c '^200 ' <<<"$out" || true)
  n=$(wc -l <<<"$out")
  awk '{print $2*1000}' <<<"$out" | sort -n | awk -v ok="$ok" -v n="$n" \
    '{t[NR]=$1} END {printf "health: %d/%d ok, p50 %.1f ms, max %.1f ms\n", ok, n, t[int((NR+1)/2)], t[NR]}'
}
echo "== search: wrk -t2 -c16 -d20s"
health 60 & HP=$!
wrk -t2 -c16 -d20s --latency -s scripts/load/search.lua "$URL/api/collections/$COLLECTION/search" | grep -E "Requests/sec|Latency|50%|99%|Non-2xx"
wait $HP
echo "RSS after search load: $(rss)"
echo "== ask: wrk -t2 -c16 -d30s (max_concurrent 4 run + queue_depth 8 wait; the rest get 429)"
health 100 & HP=$!
wrk -t2 -c16 -d30s --timeout 60s -s scripts/load/ask.lua "$URL/api/collections/$COLLECTION/ask" | grep -E "Requests/sec|Latency|status|Non-2xx"
wait $HP
echo "RSS after ask load: $(rss)"
echo "== ask again (does memory plateau?)"
wrk -t2 -c16 -d30s --timeout 60s -s scripts/load/ask.lua "$URL/api/collections/$COLLECTION/ask" | grep -E "Requests/sec|Non-2xx"
echo "RSS after second ask load: $(rss)"
