#!/usr/bin/env bash
# Accounts overhead by SQLite writer mode, in one run: grokgate with accounts and the writer process, with
# accounts and the writer thread (GROKGATE_SQLITE_WRITER=thread), and with accounts off, measured in
# alternating rounds by ../shared/bench/loadgen.py (non-stream) against ../shared/bench/fake_upstream.js.
#
#   bash bench/accounts_ab.sh [CONCURRENCY=64] [SECONDS=5] [ROUNDS=2]
#
# Prints req/s, errors, p50 latency and CPU per request of each server's process tree (the writer child
# included). Needs .venv (make test) and the bench venv (../shared/bench/setup.sh, which gateway.sh runs).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=$(cd "${SHARED_BENCH:-$ROOT/../shared/bench}" && pwd)
PY=${BENCH_HOME:-$HOME/.cache/grokgate-bench}/bench-venv/bin/python
CONC=${1:-64} DUR=${2:-5} ROUNDS=${3:-2}
[ -x "$PY" ] || { echo "run $SHARED/setup.sh first" >&2; exit 1; }
W=$(mktemp -d "${TMPDIR:-/tmp}/grokgate-accounts-ab.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; sleep 1; rm -rf "$W"; }
trap cleanup EXIT
if ! (exec 3<>/dev/tcp/127.0.0.1/18000) 2>/dev/null; then
  setsid node "$SHARED/fake_upstream.js" --port 18000 >"$W/upstream.log" 2>&1 & PIDS+=($!); sleep 1
fi
printf 'backends: {fake: {kind: openai, base_url: "http://127.0.0.1:18000/v1"}}\nmodels: {grok-3: [{backend: fake}]}\n' \
  >"$W/routing.yaml"
ADMIN="gg-admin-ab-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
start() {  # start NAME PORT ACCOUNTS WRITER
  setsid env GROKGATE_API_KEYS="$ADMIN" GROKGATE_DATA_DIR="$W/data-$1" GROKGATE_CONFIG="$W/routing.yaml" \
    GROKGATE_ACCOUNTS="$3" GROKGATE_SQLITE_WRITER="$4" GROKGATE_GRPC_PORT=0 "$ROOT/.venv/bin/grokgate" serve --port "$2" \
    --log-level WARNING >"$W/$1.log" 2>&1 &
  PIDS+=($!)
}
start process 8200 true process; start thread 8201 true thread; start off 8202 false thread
GG=("${PIDS[@]: -3}")
for port in 8200 8201 8202; do
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
token() {
  curl -s -X POST "http://127.0.0.1:$1/admin/keys" -H "Authorization: Bearer $ADMIN" \
    -H 'content-type: application/json' -d '{"name": "bench", "credits": "100000000"}' |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}
KEYS=("$(token 8200)" "$(token 8201)" "$ADMIN")
tree_ticks() {  # CPU ticks of a process and its children
  local t=0 p
  for p in $1 $(cat /proc/"$1"/task/*/children 2>/dev/null); do t=$((t + $(awk '{print $14 + $15}' /proc/"$p"/stat))); done
  echo "$t"
}
measure() {  # measure PORT KEY PID
  local c0 c1 out
  c0=$(tree_ticks "$3")
  out=$("$PY" "$SHARED/loadgen.py" --url "http://127.0.0.1:$1/grok/chat/completions" --key "$2" -c "$CONC" \
    -d "$DUR" --warmup 1 | "$PY" -c 'import json, sys; d = json.load(sys.stdin); print(d["rps"], d["errors"], d["lat_ms"]["p50"])')
  c1=$(tree_ticks "$3")
  "$PY" -c 'import sys; rps, err, p50, ticks, secs = map(float, sys.argv[1:])
print(f"{rps:8.0f} req/s  errors {err:.0f}  p50 {p50:6.2f} ms  CPU {ticks * 10 / (rps * secs):.3f} ms/req")' \
    $out $((c1 - c0)) $((DUR + 1))
}
NAMES=("accounts, writer process" "accounts, writer thread " "accounts off            ")
echo "c=$CONC, ${DUR}s per round, $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  for i in 0 1 2; do echo "round $r  ${NAMES[$i]}: $(measure $((8200 + i)) "${KEYS[$i]}" "${GG[$i]}")"; done
done
