#!/usr/bin/env bash
# One process against `grokgate serve --workers 2`, on SQLite and on PostgreSQL + Redis, measured in alternating
# rounds by ../shared/bench/loadgen.py (non-stream, a funded account token) against ../shared/bench/fake_upstream.js.
#
#   bash bench/workers.sh [CONCURRENCY=64] [SECONDS=5] [ROUNDS=2] [WORKERS=2]
#
# Prints req/s, errors, p50 latency and CPU per request of each server's whole process tree (supervisor, workers,
# SQLite writer child), and the load average before it starts: run it on a quiet machine. Needs .venv (make test),
# the bench venv (../shared/bench/setup.sh), PostgreSQL at 127.0.0.1:5432 (psql) and Redis at 127.0.0.1:6379.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=$(cd "${SHARED_BENCH:-$ROOT/../shared/bench}" && pwd)
PY=${BENCH_HOME:-$HOME/.cache/grokgate-bench}/bench-venv/bin/python
GG=${GROKGATE:-$ROOT/.venv/bin/grokgate}
CONC=${1:-64} DUR=${2:-5} ROUNDS=${3:-2} N=${4:-2}
PGURL=${GROKGATE_BENCH_PG:-postgresql://postgres@127.0.0.1:5432}
REDIS=${GROKGATE_BENCH_REDIS:-redis://127.0.0.1:6379/0}
[ -x "$PY" ] || { echo "run $SHARED/setup.sh first" >&2; exit 1; }
W=$(mktemp -d "${TMPDIR:-/tmp}/grokgate-workers-bench.XXXXXX")
DB="grokgate_bench_workers_$$"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done  # supervisors stop their workers
  for p in "${PIDS[@]}"; do for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; done
  for i in 1 2; do psql "$PGURL/postgres" -qc "DROP DATABASE IF EXISTS ${DB}_$i WITH (FORCE)" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
if ! (exec 3<>/dev/tcp/127.0.0.1/18000) 2>/dev/null; then
  setsid node "$SHARED/fake_upstream.js" --port 18000 >"$W/upstream.log" 2>&1 & PIDS+=($!); sleep 1
fi
printf 'backends: {fake: {kind: openai, base_url: "http://127.0.0.1:18000/v1"}}\nmodels: {grok-3: [{backend: fake}]}\n' \
  >"$W/routing.yaml"
for i in 1 2; do psql "$PGURL/postgres" -qc "CREATE DATABASE ${DB}_$i"; done
ADMIN="gg-admin-w-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
start() {  # start NAME PORT WORKERS [ENV...]
  local name=$1 port=$2 workers=$3; shift 3
  setsid env GROKGATE_API_KEYS="$ADMIN" GROKGATE_DATA_DIR="$W/data-$name" GROKGATE_CONFIG="$W/routing.yaml" \
    GROKGATE_GRPC_PORT=0 GROKGATE_DRAIN_SECONDS=0 "$@" "$GG" serve --port "$port" --workers "$workers" --log-level WARNING \
    >"$W/$name.log" 2>&1 &
  PIDS+=($!)
}
start sqlite-1 8300 1
start sqlite-w 8301 "$N"
start pg-1 8302 1 GROKGATE_DATABASE_URL="$PGURL/${DB}_1" GROKGATE_REDIS_URL="$REDIS"
start pg-w 8303 "$N" GROKGATE_DATABASE_URL="$PGURL/${DB}_2" GROKGATE_REDIS_URL="$REDIS"
SERVERS=("${PIDS[@]: -4}")
for port in 8300 8301 8302 8303; do
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
token() {
  curl -s -X POST "http://127.0.0.1:$1/admin/keys" -H "Authorization: Bearer $ADMIN" \
    -H 'content-type: application/json' -d '{"name": "bench", "credits": "100000000"}' |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}
KEYS=("$(token 8300)" "$(token 8301)" "$(token 8302)" "$(token 8303)")
tree_ticks() {  # CPU ticks of a process and all its descendants
  local t p
  t=$(awk '{print $14 + $15}' /proc/"$1"/stat 2>/dev/null || echo 0)
  for p in $(cat /proc/"$1"/task/*/children 2>/dev/null); do t=$((t + $(tree_ticks "$p"))); done
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
NAMES=("SQLite, 1 process       " "SQLite, --workers $N      " "PostgreSQL+Redis, 1     " "PostgreSQL+Redis, -w $N  ")
echo "c=$CONC, ${DUR}s per round, $ROUNDS rounds, $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  for i in 0 1 2 3; do echo "round $r  ${NAMES[$i]}: $(measure $((8300 + i)) "${KEYS[$i]}" "${SERVERS[$i]}")"; done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
