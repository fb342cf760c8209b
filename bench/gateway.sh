#!/usr/bin/env bash
# grokgate vs LiteLLM vs the upstream called directly, in one run, with the shared harness in ../shared/bench.
#
#   bash bench/gateway.sh [--with-accounts-off] [--no-litellm] [gateway_bench.py args...]
#
# Run from anywhere (it cds to the repo root); needs .venv (`make test` or `make serve` made it) and node.
# It starts, and on exit stops, every process it needs:
#   - the fake upstream on 127.0.0.1:18000 (only if nothing listens there already; a running one is reused),
#   - LiteLLM proxy (one worker, no database) on :4000 or the next free port,
#   - grokgate with accounts ON (tokens, credits, ledger; SQLite in a fresh temp data dir) on :8000 or the
#     next free port, grok-3 routed to the fake upstream through a routing file, benchmarked with a funded
#     account token (not the admin token), so admission, reservation, settlement and the ledger are measured,
#   - with --with-accounts-off, a second grokgate with GROKGATE_ACCOUNTS=false (target "grokgate-noacct").
#   --no-litellm leaves LiteLLM out: with --with-accounts-off, the accounts overhead alone, in half the time.
#   --scale-out adds "grokgate-pg": the same grokgate as a scale-out replica, accounts in a fresh PostgreSQL database
#     (GROKGATE_PG_ADMIN, default postgresql://postgres@127.0.0.1:5432/test, creates and drops it) and rate limits in
#     Redis (GROKGATE_BENCH_REDIS, default redis://127.0.0.1:6379/0, under a key prefix of its own).
#   --workers N adds "grokgate-wN": the SQLite default served by `grokgate serve --workers N` (its CPU is the whole
#     process tree's: supervisor and workers).
#   --base REV adds "grokgate-base": grokgate as of git revision REV (a temporary worktree on PYTHONPATH, same
#     venv), accounts on, measured in the same alternating rounds: a change's before/after on one host, one run.
# Then it runs gateway_bench.py (defaults: --concurrency 1,16,64 --modes nonstream,stream -d 10 --warmup 2
# --rounds 2; any extra args are passed through and win, e.g. `-d 5 --rounds 1`), prints its Markdown table,
# and after it grokgate's idle RSS, the x-grokgate-overhead-ms header of a few single requests, the non-200
# statuses seen under load, and a ledger check (reservations all released, usage rows recorded).
# Raw JSON: ${TMPDIR:-/tmp}/grokgate-gateway-bench-<time>.json (or --json-out PATH).
#
# Env: SHARED_BENCH (default <repo>/../shared/bench), BENCH_HOME (default ~/.cache/grokgate-bench),
#      KEEP_WORKDIR=1 keeps the temp dir (logs, data dirs) also after a successful run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
SHARED=$(cd "$SHARED" && pwd)
BENCH_HOME=${BENCH_HOME:-$HOME/.cache/grokgate-bench}
export BENCH_HOME
BENCH_PY=$BENCH_HOME/bench-venv/bin/python
GROKGATE=$ROOT/.venv/bin/grokgate
UPSTREAM_PORT=18000
MODEL=grok-3
LITELLM_KEY=sk-bench-master

say() { printf '[gateway.sh] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# ---- arguments -------------------------------------------------------------------------------------------
WITH_NOACCT=0
NO_LITELLM=0
BASE_REV=""
SCALE_OUT=0
WORKERS=""
EXTRA=()
JSON_OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --with-accounts-off) WITH_NOACCT=1 ;;
    --no-litellm) NO_LITELLM=1 ;;
    --scale-out) SCALE_OUT=1 ;;
    --workers) [ $# -ge 2 ] || die "--workers needs a number"; WORKERS=$2; shift ;;
    --base) [ $# -ge 2 ] || die "--base needs a git revision"; BASE_REV=$2; shift ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --json-out) [ $# -ge 2 ] || die "--json-out needs a path"; JSON_OUT=$2; shift ;;
    --json-out=*) JSON_OUT=${1#--json-out=} ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done
TMPBASE=${TMPDIR:-/tmp}
JSON_OUT=${JSON_OUT:-$TMPBASE/grokgate-gateway-bench-$(date +%Y%m%d-%H%M%S).json}

[ -x "$GROKGATE" ] || die "$GROKGATE not found: run 'make test' (or 'make serve') first"
[ -d "$SHARED" ] || die "shared harness not found at $SHARED"
command -v curl >/dev/null || die "curl is needed"

WORK=$(mktemp -d "$TMPBASE/grokgate-gateway-bench.XXXXXX")

# ---- process bookkeeping and cleanup ---------------------------------------------------------------------
# Every long-lived process is started with setsid, so it leads its own process group and stopping the group
# stops whatever it spawned. Only PIDs recorded here are ever signalled.
UPSTREAM_PID="" LITELLM_PID="" LITELLM_STARTER_PID="" GG_PID="" GG2_PID="" GG3_PID="" GG4_PID="" GG5_PID="" BASE_TREE=""
PG_DB="" PG_BASE_DB=""
PG_ADMIN=${GROKGATE_PG_ADMIN:-postgresql://postgres@127.0.0.1:5432/test}
OK=0

pgid_of() { awk '{sub(/^.*\) /, ""); print $3}' "/proc/$1/stat" 2>/dev/null; }

stop_proc() {  # stop_proc NAME PID: TERM its group (or just it), wait up to 10 s, then KILL
  local name=$1 pid=$2 target i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  target=$pid
  [ "$(pgid_of "$pid")" = "$pid" ] && target=-$pid
  say "stopping $name (pid $pid)"
  kill -TERM -- "$target" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name did not stop on TERM; sending KILL"
    kill -KILL -- "$target" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  stop_proc grokgate-noacct "$GG2_PID"
  stop_proc grokgate-base "$GG3_PID"
  stop_proc grokgate-pg "$GG4_PID"
  stop_proc "grokgate-w$WORKERS" "$GG5_PID"
  [ -z "$PG_DB" ] || psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB" >/dev/null 2>&1 || true
  [ -z "$PG_BASE_DB" ] || psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_BASE_DB" >/dev/null 2>&1 || true
  [ -z "$BASE_TREE" ] || git -C "$ROOT" worktree remove --force "$BASE_TREE" 2>/dev/null || true
  stop_proc grokgate "$GG_PID"
  if [ -z "$LITELLM_PID" ] && [ -n "$LITELLM_STARTER_PID" ]; then
    # interrupted while start_litellm.sh was still waiting: its child is the litellm we started
    LITELLM_PID=$(pgrep -P "$LITELLM_STARTER_PID" -x litellm 2>/dev/null | head -1)
    stop_proc start_litellm.sh "$LITELLM_STARTER_PID"
  fi
  stop_proc litellm "$LITELLM_PID"
  stop_proc fake-upstream "$UPSTREAM_PID"
  if [ "$OK" = 1 ] && [ "${KEEP_WORKDIR:-0}" != 1 ]; then
    rm -rf "$WORK"
  else
    say "logs and data dirs kept in $WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {  # first port >= $1 that nothing listens on
  local p=$1
  while listening "$p"; do p=$((p + 1)); done
  echo "$p"
}

wait_http() {  # wait_http NAME URL PID SECONDS: until GET URL answers 200, or the process dies
  local name=$1 url=$2 pid=$3 secs=$4 i
  for i in $(seq 1 $((secs * 10))); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" 2>/dev/null)" = 200 ] && return 0
    [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# ---- 1. harness tools ------------------------------------------------------------------------------------
if [ "$NO_LITELLM" = 1 ] && [ -x "$BENCH_PY" ]; then
  say "step 1: the load generator's venv is there; LiteLLM is not needed (--no-litellm)"
else
  say "step 1: $SHARED/setup.sh (idempotent)"
  "$SHARED/setup.sh" >&2
fi
[ -x "$BENCH_PY" ] || die "$BENCH_PY missing after setup.sh"

# ---- 2. fake upstream ------------------------------------------------------------------------------------
if listening "$UPSTREAM_PORT"; then
  say "step 2: something already listens on :$UPSTREAM_PORT; reusing it as the fake upstream"
else
  say "step 2: starting the fake upstream on :$UPSTREAM_PORT"
  setsid node "$SHARED/fake_upstream.js" --port "$UPSTREAM_PORT" >"$WORK/fake_upstream.log" 2>&1 &
  UPSTREAM_PID=$!
  wait_http fake-upstream "http://127.0.0.1:$UPSTREAM_PORT/health" "$UPSTREAM_PID" 10 ||
    die "fake upstream did not come up; see $WORK/fake_upstream.log"
  say "fake upstream pid $UPSTREAM_PID"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$UPSTREAM_PORT/v1/chat/completions" \
  -H 'content-type: application/json' -d "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}")
[ "$code" = 200 ] || die "the service on :$UPSTREAM_PORT is not the fake upstream (POST answered $code)"

# ---- 3. LiteLLM ------------------------------------------------------------------------------------------
LITELLM_LINE="(not run: --no-litellm)"
if [ "$NO_LITELLM" = 0 ]; then
LITELLM_PORT=$(free_port 4000)
say "step 3: starting LiteLLM on :$LITELLM_PORT (takes ~15 s: readiness, then 5 s idle for its RSS figure)"
"$SHARED/start_litellm.sh" "$SHARED/litellm_config.yaml" "$LITELLM_PORT" 1 "$WORK/litellm.log" \
  >"$WORK/litellm_start.out" 2>&1 &
LITELLM_STARTER_PID=$!
wait "$LITELLM_STARTER_PID" || die "start_litellm.sh failed: $(cat "$WORK/litellm_start.out"); see $WORK/litellm.log"
LITELLM_LINE=$(grep -m1 '^PID=' "$WORK/litellm_start.out" || true)
LITELLM_PID=$(sed -n 's/^PID=\([0-9]*\).*/\1/p' <<<"$LITELLM_LINE")
[ -n "$LITELLM_PID" ] || die "no PID from start_litellm.sh: $(cat "$WORK/litellm_start.out")"
kill -0 "$LITELLM_PID" 2>/dev/null || die "litellm exited; see $WORK/litellm.log"
say "litellm: $LITELLM_LINE"
fi

# ---- 4. grokgate -----------------------------------------------------------------------------------------
ADMIN_TOKEN="gg-admin-bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
cat >"$WORK/grokgate.yaml" <<EOF
backends:
  fake:
    kind: openai
    base_url: http://127.0.0.1:$UPSTREAM_PORT/v1
models:
  $MODEL: [{backend: fake}]
EOF

start_grokgate() {  # start_grokgate NAME PORT ACCOUNTS(true|false) PIDVAR [SRC [ENV...]]: the pid goes into $PIDVAR at once
  local name=$1 port=$2 accounts=$3 pid
  mkdir -p "$WORK/data-$name"
  setsid env ${5:+PYTHONPATH="$5"} "${@:6}" GROKGATE_API_KEYS="$ADMIN_TOKEN" GROKGATE_DATA_DIR="$WORK/data-$name" \
    GROKGATE_CONFIG="$WORK/grokgate.yaml" GROKGATE_ACCOUNTS="$accounts" GROKGATE_GRPC_PORT=0 \
    "$GROKGATE" serve --port "$port" --log-level WARNING ${SERVE_ARGS:-} >"$WORK/$name.log" 2>&1 &
  pid=$!
  printf -v "$4" '%s' "$pid"  # recorded before waiting, so cleanup stops it even if it never gets ready
  local t0=$SECONDS
  wait_http "$name" "http://127.0.0.1:$port/readyz" "$pid" 60 ||
    die "$name did not become ready on :$port; log:
$(tail -n 30 "$WORK/$name.log")"
  say "$name pid $pid ready on :$port after ~$((SECONDS - t0)) s (accounts=$accounts)"
}

GG_PORT=$(free_port 8000)
say "step 4: starting grokgate (accounts on, SQLite in $WORK/data-grokgate) on :$GG_PORT"
start_grokgate grokgate "$GG_PORT" true GG_PID
GG_URL=http://127.0.0.1:$GG_PORT

say "creating a funded account token through POST /admin/keys"
code=$(curl -s -o "$WORK/key.json" -w '%{http_code}' -X POST "$GG_URL/admin/keys" \
  -H "Authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
  -d '{"name": "bench", "credits": "100000000"}')
[ "$code" = 201 ] || die "POST /admin/keys answered $code: $(cat "$WORK/key.json")"
TOKEN=$("$BENCH_PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$WORK/key.json")
[ -n "$TOKEN" ] || die "no token in $(cat "$WORK/key.json")"

GG_IDLE_RSS_KB=$(rss_kb "$GG_PID")
say "grokgate idle RSS: $GG_IDLE_RSS_KB kB"

GG2_PORT="" GG2_IDLE_RSS_KB=""
if [ "$WITH_NOACCT" = 1 ]; then
  GG2_PORT=$(free_port $((GG_PORT + 1)))
  say "starting grokgate-noacct (GROKGATE_ACCOUNTS=false) on :$GG2_PORT"
  start_grokgate grokgate-noacct "$GG2_PORT" false GG2_PID
  GG2_IDLE_RSS_KB=$(rss_kb "$GG2_PID")
fi

GG4_PORT="" PG_TOKEN=""
if [ "$SCALE_OUT" = 1 ]; then
  command -v psql >/dev/null || die "--scale-out needs psql (and a PostgreSQL at $PG_ADMIN)"
  PG_DB="grokgate_bench_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
  psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_DB" >/dev/null || die "cannot create database $PG_DB at $PG_ADMIN"
  GG4_PORT=$(free_port $((GG_PORT + 3)))
  say "starting grokgate-pg (PostgreSQL database $PG_DB + Redis, accounts on) on :$GG4_PORT"
  start_grokgate grokgate-pg "$GG4_PORT" true GG4_PID "" GROKGATE_DATABASE_URL="${PG_ADMIN%/*}/$PG_DB" \
    GROKGATE_REDIS_URL="${GROKGATE_BENCH_REDIS:-redis://127.0.0.1:6379/0}" GROKGATE_REDIS_KEY_PREFIX="$PG_DB:" \
    GROKGATE_INSTANCE_ID="bench-pg"
  PG_TOKEN=$(curl -s -X POST "http://127.0.0.1:$GG4_PORT/admin/keys" -H "Authorization: Bearer $ADMIN_TOKEN" \
    -H 'content-type: application/json' -d '{"name": "bench", "credits": "100000000"}' |
    "$BENCH_PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])') || die "no token from grokgate-pg"
fi

GG5_PORT="" W_TOKEN=""
if [ -n "$WORKERS" ]; then
  GG5_PORT=$(free_port $((GG_PORT + 4)))
  say "starting grokgate-w$WORKERS (grokgate serve --workers $WORKERS, SQLite, accounts on) on :$GG5_PORT"
  SERVE_ARGS="--workers $WORKERS" start_grokgate "grokgate-w$WORKERS" "$GG5_PORT" true GG5_PID
  W_TOKEN=$(curl -s -X POST "http://127.0.0.1:$GG5_PORT/admin/keys" -H "Authorization: Bearer $ADMIN_TOKEN" \
    -H 'content-type: application/json' -d '{"name": "bench", "credits": "100000000"}' |
    "$BENCH_PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])') || die "no token from grokgate-w$WORKERS"
fi

GG3_PORT="" BASE_TOKEN=""
if [ -n "$BASE_REV" ]; then
  BASE_TREE="$WORK/base-tree"
  git -C "$ROOT" worktree add --detach "$BASE_TREE" "$BASE_REV" >&2 || die "cannot check out $BASE_REV"
  GG3_PORT=$(free_port $((GG_PORT + 2)))
  say "starting grokgate-base ($BASE_REV, accounts on) on :$GG3_PORT"
  BASE_ENV=()
  if [ "$SCALE_OUT" = 1 ]; then  # before/after of the scale-out path: the base on PostgreSQL + Redis as well
    PG_BASE_DB="${PG_DB}_base"
    psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_BASE_DB" >/dev/null || die "cannot create database $PG_BASE_DB"
    BASE_ENV=(GROKGATE_DATABASE_URL="${PG_ADMIN%/*}/$PG_BASE_DB" GROKGATE_INSTANCE_ID="bench-pg-base"
              GROKGATE_REDIS_URL="${GROKGATE_BENCH_REDIS:-redis://127.0.0.1:6379/0}" GROKGATE_REDIS_KEY_PREFIX="$PG_BASE_DB:")
  fi
  start_grokgate grokgate-base "$GG3_PORT" true GG3_PID "$BASE_TREE/src" ${BASE_ENV[@]+"${BASE_ENV[@]}"}
  BASE_TOKEN=$(curl -s -X POST "http://127.0.0.1:$GG3_PORT/admin/keys" -H "Authorization: Bearer $ADMIN_TOKEN" \
    -H 'content-type: application/json' -d '{"name": "bench", "credits": "100000000"}' |
    "$BENCH_PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])') || die "no token from grokgate-base"
fi

# One request of each kind through every target, so a misconfiguration fails here and not as a column of errors.
chat_body() {  # chat_body STREAM(0|1)
  if [ "$1" = 1 ]; then
    printf '{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":64,"stream":true,"stream_options":{"include_usage":true}}' "$MODEL"
  else
    printf '{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":64}' "$MODEL"
  fi
}
smoke() {  # smoke NAME URL KEY
  local s code
  for s in 0 1; do
    code=$(curl -s -o "$WORK/smoke.out" -w '%{http_code}' -X POST "$2" -H "Authorization: Bearer $3" \
      -H 'content-type: application/json' -d "$(chat_body "$s")")
    [ "$code" = 200 ] || die "$1 (stream=$s) answered $code: $(head -c 500 "$WORK/smoke.out")"
  done
}
say "smoke test: one non-streaming and one streaming request through each gateway"
[ "$NO_LITELLM" = 1 ] || smoke litellm "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions" "$LITELLM_KEY"
smoke grokgate "$GG_URL/grok/chat/completions" "$TOKEN"
[ -z "$GG3_PORT" ] || smoke grokgate-base "http://127.0.0.1:$GG3_PORT/grok/chat/completions" "$BASE_TOKEN"
[ -z "$GG5_PORT" ] || smoke "grokgate-w$WORKERS" "http://127.0.0.1:$GG5_PORT/grok/chat/completions" "$W_TOKEN"
[ -z "$GG4_PORT" ] || smoke grokgate-pg "http://127.0.0.1:$GG4_PORT/grok/chat/completions" "$PG_TOKEN"
[ -z "$GG2_PORT" ] || smoke grokgate-noacct "http://127.0.0.1:$GG2_PORT/grok/chat/completions" "$ADMIN_TOKEN"

# x-grokgate-overhead-ms of N sequential single requests; prints "n=.. min=.. p50=.. max=.. ms"
overhead() {  # overhead URL KEY STREAM N
  local i vals=()
  for i in $(seq 1 "$4"); do
    vals+=("$(curl -s -o /dev/null -D - -X POST "$1" -H "Authorization: Bearer $2" \
      -H 'content-type: application/json' -d "$(chat_body "$3")" |
      tr -d '\r' | awk -F': ' 'tolower($1) == "x-grokgate-overhead-ms" {print $2}')")
  done
  "$BENCH_PY" - "${vals[@]}" <<'PY'
import sys
raw = sys.argv[1:]
v = sorted(float(x) for x in raw if x)
if not v:
    print("header missing on all %d responses" % len(raw))
else:
    print("n=%d min=%.3f p50=%.3f max=%.3f ms%s" % (len(v), v[0], v[len(v) // 2], v[-1],
          "" if len(v) == len(raw) else " (header missing on %d)" % (len(raw) - len(v))))
PY
}
N_OVH=10
say "measuring x-grokgate-overhead-ms on $N_OVH sequential single requests per mode (before load)"
OVH_GG_NS=$(overhead "$GG_URL/grok/chat/completions" "$TOKEN" 0 "$N_OVH")
OVH_GG_ST=$(overhead "$GG_URL/grok/chat/completions" "$TOKEN" 1 "$N_OVH")
if [ -n "$GG4_PORT" ]; then
  OVH_GG4_NS=$(overhead "http://127.0.0.1:$GG4_PORT/grok/chat/completions" "$PG_TOKEN" 0 "$N_OVH")
  OVH_GG4_ST=$(overhead "http://127.0.0.1:$GG4_PORT/grok/chat/completions" "$PG_TOKEN" 1 "$N_OVH")
fi
if [ -n "$GG2_PORT" ]; then
  OVH_GG2_NS=$(overhead "http://127.0.0.1:$GG2_PORT/grok/chat/completions" "$ADMIN_TOKEN" 0 "$N_OVH")
  OVH_GG2_ST=$(overhead "http://127.0.0.1:$GG2_PORT/grok/chat/completions" "$ADMIN_TOKEN" 1 "$N_OVH")
fi

# ---- 5. the benchmark ------------------------------------------------------------------------------------
TARGETS=(--target "grokgate|$GG_URL|/grok/chat/completions|$TOKEN|$GG_PID")
[ "$NO_LITELLM" = 1 ] ||
  TARGETS=(--target "litellm|http://127.0.0.1:$LITELLM_PORT|/v1/chat/completions|$LITELLM_KEY|$LITELLM_PID"
           "${TARGETS[@]}")
[ -z "$GG2_PORT" ] ||
  TARGETS+=(--target "grokgate-noacct|http://127.0.0.1:$GG2_PORT|/grok/chat/completions|$ADMIN_TOKEN|$GG2_PID")
[ -z "$GG3_PORT" ] ||
  TARGETS+=(--target "grokgate-base|http://127.0.0.1:$GG3_PORT|/grok/chat/completions|$BASE_TOKEN|$GG3_PID")
[ -z "$GG5_PORT" ] ||
  TARGETS+=(--target "grokgate-w$WORKERS|http://127.0.0.1:$GG5_PORT|/grok/chat/completions|$W_TOKEN|$GG5_PID")
[ -z "$GG4_PORT" ] ||
  TARGETS+=(--target "grokgate-pg|http://127.0.0.1:$GG4_PORT|/grok/chat/completions|$PG_TOKEN|$GG4_PID")
say "step 5: gateway_bench.py (progress below; the table follows on stdout)"
"$BENCH_PY" "$SHARED/gateway_bench.py" --label grokgate-vs-litellm \
  --direct-url "http://127.0.0.1:$UPSTREAM_PORT/v1/chat/completions" --model "$MODEL" --python "$BENCH_PY" \
  "${TARGETS[@]}" --concurrency 1,16,64 --modes nonstream,stream -d 10 --warmup 2 --rounds 2 \
  ${EXTRA[@]+"${EXTRA[@]}"} --json-out "$JSON_OUT"

# ---- 6. extra lines --------------------------------------------------------------------------------------
for name in grokgate grokgate-noacct litellm; do
  case $name in
    grokgate) pid=$GG_PID ;; grokgate-noacct) pid=$GG2_PID ;; litellm) pid=$LITELLM_PID ;;
  esac
  [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null || say "WARNING: $name (pid $pid) is no longer running"
done
GG_AFTER_RSS_KB=$(rss_kb "$GG_PID" 2>/dev/null || echo "?")
curl -s -H "Authorization: Bearer $ADMIN_TOKEN" "$GG_URL/admin/keys/bench" >"$WORK/key_after.json" || true
curl -s -H "Authorization: Bearer $ADMIN_TOKEN" "$GG_URL/admin/usage?by=model" >"$WORK/usage_after.json" || true
echo
echo "### Extra figures"
echo
echo "- litellm start: $LITELLM_LINE"
echo "- grokgate idle RSS before load (/proc/$GG_PID/status VmRSS): $((GG_IDLE_RSS_KB / 1024)) MB ($GG_IDLE_RSS_KB kB); after the run: $GG_AFTER_RSS_KB kB"
[ -z "$GG2_PORT" ] ||
  echo "- grokgate-noacct idle RSS before load: $((GG2_IDLE_RSS_KB / 1024)) MB ($GG2_IDLE_RSS_KB kB)"
echo "- grokgate x-grokgate-overhead-ms, single requests before load, non-stream: $OVH_GG_NS"
echo "- grokgate x-grokgate-overhead-ms, single requests before load, stream (until the response starts): $OVH_GG_ST"
if [ -n "$GG4_PORT" ]; then
  echo "- grokgate-pg x-grokgate-overhead-ms, non-stream: $OVH_GG4_NS"
  echo "- grokgate-pg x-grokgate-overhead-ms, stream: $OVH_GG4_ST"
fi
if [ -n "$GG2_PORT" ]; then
  echo "- grokgate-noacct x-grokgate-overhead-ms, non-stream: $OVH_GG2_NS"
  echo "- grokgate-noacct x-grokgate-overhead-ms, stream: $OVH_GG2_ST"
fi
"$BENCH_PY" - "$JSON_OUT" "$WORK/key_after.json" "$WORK/usage_after.json" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))
bad = []
for r in res:
    st = {k: v for k, v in r.get("status", {}).items() if str(k) != "200"}
    if r.get("errors") or st:
        bad.append("%s %s c=%d: errors=%s statuses=%s detail=%s sample=%s" % (
            r["side"], r["mode"], r["concurrency"], r.get("errors"), st, r.get("err_detail"),
            [s[:160] for s in r.get("sample_errors", [])]))
print("- errors / non-200 statuses under load: %s" % ("none" if not bad else ""))
for b in bad:
    print("  - " + b)
gg_ok = sum(r["ok"] for r in res if r["side"] == "grokgate")
try:
    key = json.load(open(sys.argv[2]))
    usage = json.load(open(sys.argv[3]))["data"]
    reqs = sum(u["requests"] for u in usage)
    print("- grokgate ledger after the run: %d usage requests recorded (measured ok responses: %d, plus warmup and"
          " single requests), balance %s credits, still reserved %s micro-credits%s" % (
              reqs, gg_ok, key.get("balance_credits"), key.get("reserved"),
              "" if key.get("reserved") == 0 else "  <-- reservations not released"))
except Exception as exc:  # noqa: BLE001
    print("- grokgate ledger check failed: %r" % exc)
PY
for name in grokgate grokgate-noacct grokgate-base grokgate-pg "grokgate-w$WORKERS"; do
  log=$WORK/$name.log
  [ -f "$log" ] || continue
  # started with --log-level WARNING: anything but the start-up banner is worth a look
  n=$(grep -cv '^grokgate: serving on ' "$log" || true)
  if [ "$n" = 0 ]; then
    echo "- $name log: no warnings or errors"
  else
    echo "- $name log: $n line(s) besides the banner; first ones:"
    grep -v '^grokgate: serving on ' "$log" | head -n 5 | cut -c1-300 | sed 's/^/  /'
  fi
done
echo "- raw JSON: $JSON_OUT"
OK=1
