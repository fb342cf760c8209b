"""PostgreSQL: a group commit of settlements and reservations in one round trip (store/pg_commit.py).

A batch used to cost its replica ~12 statements, each a round trip through SQLAlchemy (about 4.7 ms of the
gateway's CPU per request at one request in flight, bench/gateway.sh --scale-out). These functions run the same
rules server-side, so a batch is one `SELECT grokgate_commit(...)`: the same decisions, in the same lock order, as
store/batch.py `settle_many` / `reserve_many` and store/settling.py `charge_and_record`, which still serve SQLite and
the batches that carry other operations. tests/test_pg_commit.py runs both on the same batches and compares every
row they write.

Each batch is a JSON array of objects with short keys (store/pg_commit.py writes them):
  settlement: r request id, t token, a account, m model, b backend, e endpoint, pt ct ot rt st prompt / cached /
              completion / reasoning tokens / server tool calls, tk upstream cost ticks, c cost, pv price version,
              s status, est estimated, d duration ms, ps period start, lp limit period, h held (has a reservation)
  hold:       r request id, t token, a account, n amount, ps period start, lp limit period

Revision ID: 0007
Revises: 0006
Create Date: 2027-02-01
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Every function plans with enable_seqscan off. A replica's connection lives for days and plpgsql keeps each
# statement's generic plan for the session: planned while a table was small (a new deployment, or stats not yet
# analysed), a lookup by request id stayed a sequential scan as the ledger and the churned reservations grew
# (bench: 1,850 -> 880 req/s within a minute on one connection, back to 1,960 on a new one). Every lookup here has
# an index (request ids, primary keys), so the index is always the plan.
# The key's period rules (store/batch.py `_same` / `_later`): a period of the key's own calendar (its reset period,
# or '*': a reservation row's, which moved with the key) may start a new one; another calendar's counts in the key's.
_SAME = "(k.kind = '*' OR coalesce(limit_period, '') = k.kind)"

SETTLE = f"""
CREATE OR REPLACE FUNCTION grokgate_settle(batch jsonb, created bigint, today text) RETURNS jsonb
LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
DECLARE
  fresh jsonb;
  held jsonb;
  charges jsonb := '{{}}';  -- request id -> charge, only where capped below the cost
  balances jsonb := '{{}}';
  keys jsonb := '{{}}';
  capped jsonb := '[]';
  a record;
  s record;
  k record;
  bal bigint;
  remaining bigint;
  charge bigint;
  total bigint;
  kstart bigint;
  kspent bigint;
BEGIN
  -- Idempotent by request id: the first settlement of each id in the batch, unless the ledger has it already.
  -- Every lookup below is `= ANY(array)` or by primary key: an index scan whatever the planner guesses of a
  -- JSON function's rows (a join on one read the whole ledger).
  SELECT coalesce(jsonb_agg(x.item ORDER BY x.n), '[]') INTO fresh FROM (
    SELECT DISTINCT ON (e.item->>'r') e.item, e.n FROM jsonb_array_elements(batch) WITH ORDINALITY AS e(item, n)
    WHERE NOT (e.item->>'r' = ANY(ARRAY(
      SELECT request_id FROM ledger WHERE request_id = ANY(ARRAY(SELECT b->>'r' FROM jsonb_array_elements(batch) b)))))
    ORDER BY e.item->>'r', e.n) x;
  IF jsonb_array_length(fresh) = 0 THEN
    RETURN jsonb_build_object('b', balances, 'k', keys, 'c', capped);
  END IF;
  -- What each reservation held, and in which of its key's periods (missing: released by crash recovery).
  WITH d AS (
    DELETE FROM reservations WHERE request_id = ANY(ARRAY(
      SELECT f->>'r' FROM jsonb_array_elements(fresh) f WHERE (f->>'h')::boolean AND f->>'t' IS NOT NULL))
    RETURNING request_id, amount, period_start)
  SELECT coalesce(jsonb_object_agg(d.request_id, jsonb_build_array(d.amount, d.period_start)), '{{}}')
    INTO held FROM d;
  -- Each account in id order (every replica's lock order): in full when the balance covers the batch, else
  -- capped request by request, never below zero.
  FOR a IN
    SELECT (f->>'a')::int AS account, sum(coalesce((held->(f->>'r')->>0)::bigint, 0))::bigint AS released,
           sum((f->>'c')::bigint)::bigint AS wanted
    FROM jsonb_array_elements(fresh) f WHERE f->>'a' IS NOT NULL GROUP BY 1 ORDER BY 1
  LOOP
    UPDATE accounts SET balance = balance + a.released - a.wanted, reserved = reserved - a.released
      WHERE id = a.account AND balance + a.released >= a.wanted RETURNING balance INTO bal;
    IF FOUND THEN
      balances := balances || jsonb_build_object(a.account::text, bal);
      CONTINUE;
    END IF;
    UPDATE accounts SET balance = balance + a.released, reserved = reserved - a.released
      WHERE id = a.account RETURNING balance INTO remaining;
    IF FOUND THEN
      bal := remaining;
    ELSE
      bal := NULL;
      remaining := 0;
    END IF;
    total := 0;
    FOR s IN
      SELECT f->>'r' AS r, (f->>'c')::bigint AS cost FROM jsonb_array_elements(fresh) WITH ORDINALITY AS e(f, n)
      WHERE (f->>'a')::int = a.account ORDER BY n
    LOOP
      charge := least(s.cost, remaining);
      remaining := remaining - charge;
      total := total + charge;
      IF charge < s.cost THEN
        charges := charges || jsonb_build_object(s.r, charge);
        capped := capped || jsonb_build_array(jsonb_build_array(s.r, charge));
      END IF;
    END LOOP;
    IF total <> 0 THEN
      UPDATE accounts SET balance = balance - total WHERE id = a.account;
    END IF;
    IF bal IS NOT NULL THEN
      balances := balances || jsonb_build_object(a.account::text, remaining);
    END IF;
  END LOOP;
  -- Each key's spend, in the period its request was admitted in (core/budgets.py), in key order.
  FOR k IN
    SELECT (f->>'t')::int AS token,
           coalesce((held->(f->>'r')->>1)::bigint, (f->>'ps')::bigint) AS period,
           CASE WHEN held ? (f->>'r') THEN '*' ELSE coalesce(f->>'lp', '') END AS kind,
           sum(coalesce((charges->>(f->>'r'))::bigint, (f->>'c')::bigint))::bigint AS spend,
           sum(coalesce((held->(f->>'r')->>0)::bigint, 0))::bigint AS freed
    FROM jsonb_array_elements(fresh) f WHERE f->>'a' IS NOT NULL AND f->>'t' IS NOT NULL
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
  LOOP
    UPDATE api_tokens SET
      period_spent = CASE WHEN period_start = k.period THEN period_spent + k.spend
                          WHEN {_SAME} AND period_start < k.period THEN k.spend
                          WHEN {_SAME} THEN period_spent
                          ELSE period_spent + k.spend END,
      period_reserved = CASE WHEN period_start = k.period THEN period_reserved - k.freed
                             WHEN {_SAME} AND period_start < k.period THEN 0
                             WHEN {_SAME} THEN period_reserved
                             ELSE period_reserved - k.freed END,
      period_start = CASE WHEN {_SAME} AND period_start < k.period THEN k.period ELSE period_start END
    WHERE id = k.token RETURNING period_start, period_spent INTO kstart, kspent;
    IF FOUND THEN
      keys := keys || jsonb_build_object(k.token::text, jsonb_build_array(kstart, kspent));
    END IF;
  END LOOP;
  -- The ledger rows, and the day's totals from what was inserted: one statement.
  WITH rows AS (
    SELECT f, n, CASE WHEN f->>'a' IS NULL THEN 0
                      ELSE coalesce((charges->>(f->>'r'))::bigint, (f->>'c')::bigint) END AS due
    FROM jsonb_array_elements(fresh) WITH ORDINALITY AS e(f, n)),
  added AS (
    INSERT INTO ledger (request_id, token_id, account_id, kind, model, backend, endpoint, prompt_tokens,
                        cached_tokens, completion_tokens, reasoning_tokens, server_tool_calls, amount, cost,
                        price_version, status, estimated, duration_ms, created_at, upstream_cost_ticks, note)
    SELECT f->>'r', (f->>'t')::int, (f->>'a')::int, 'usage', f->>'m', f->>'b', f->>'e', (f->>'pt')::int,
           (f->>'ct')::int, (f->>'ot')::int, (f->>'rt')::int, (f->>'st')::int, -due, (f->>'c')::bigint,
           (f->>'pv')::int, f->>'s', (f->>'est')::boolean, (f->>'d')::int, created, (f->>'tk')::bigint,
           CASE WHEN f->>'a' IS NOT NULL AND due <> (f->>'c')::bigint
                THEN 'cost ' || (f->>'c') || ' capped at the balance' END
    FROM rows ORDER BY n
    RETURNING token_id, model, account_id, prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens,
              amount, upstream_cost_ticks)
  INSERT INTO usage_daily AS u (day, token_id, model, account_id, requests, prompt_tokens, cached_tokens,
                                completion_tokens, reasoning_tokens, cost, upstream_requests, upstream_cost_ticks,
                                upstream_charged)
  SELECT today, coalesce(token_id, 0), model, max(coalesce(account_id, 0)), count(*), sum(prompt_tokens),
         sum(cached_tokens), sum(completion_tokens), sum(reasoning_tokens), sum(-amount), count(upstream_cost_ticks),
         coalesce(sum(upstream_cost_ticks), 0), sum(CASE WHEN upstream_cost_ticks IS NOT NULL THEN -amount ELSE 0 END)
  FROM added GROUP BY coalesce(token_id, 0), model ORDER BY 2, 3
  ON CONFLICT (day, token_id, model) DO UPDATE SET
    requests = u.requests + excluded.requests, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
    cached_tokens = u.cached_tokens + excluded.cached_tokens,
    completion_tokens = u.completion_tokens + excluded.completion_tokens,
    reasoning_tokens = u.reasoning_tokens + excluded.reasoning_tokens, cost = u.cost + excluded.cost,
    upstream_requests = u.upstream_requests + excluded.upstream_requests,
    upstream_cost_ticks = u.upstream_cost_ticks + excluded.upstream_cost_ticks,
    upstream_charged = u.upstream_charged + excluded.upstream_charged;
  RETURN jsonb_build_object('b', balances, 'k', keys, 'c', capped);
END
$fn$
"""

RESERVE = """
CREATE OR REPLACE FUNCTION grokgate_reserve(batch jsonb, holder text, created bigint) RETURNS jsonb
LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
DECLARE
  balances jsonb := '{}';
  keys jsonb := '{}';
  held jsonb := '{}';
  key_held jsonb := '{}';
  results jsonb := '[]';
  r record;
  k record;
  i record;
  acct text;
  tok text;
  amount bigint;
  avail bigint;
  lim bigint;
  room bigint;
  kstart bigint;
  used bigint;
BEGIN
  IF jsonb_array_length(batch) = 0 THEN
    RETURN results;
  END IF;
  -- Accounts by id, then keys by id: the order settlements and releases lock them in (no deadlocks).
  FOR r IN
    SELECT id, balance FROM accounts
    WHERE id = ANY(ARRAY(SELECT DISTINCT (e->>'a')::int FROM jsonb_array_elements(batch) e)) ORDER BY id FOR UPDATE
  LOOP
    balances := balances || jsonb_build_object(r.id::text, r.balance);
  END LOOP;
  -- One row, one period: the first item's of each key (a batch spans a period's boundary only by a few ms).
  FOR k IN
    SELECT DISTINCT ON (x.token) x.token, x.period, x.kind FROM (
      SELECT (e->>'t')::int AS token, (e->>'ps')::bigint AS period, coalesce(e->>'lp', '') AS kind
      FROM jsonb_array_elements(batch) e) x
    ORDER BY x.token, x.period, x.kind
  LOOP
    UPDATE api_tokens SET
      period_spent = CASE WHEN coalesce(limit_period, '') = k.kind AND period_start < k.period THEN 0
                          ELSE period_spent END,
      period_reserved = CASE WHEN coalesce(limit_period, '') = k.kind AND period_start < k.period THEN 0
                             ELSE period_reserved END,
      period_start = CASE WHEN coalesce(limit_period, '') = k.kind AND period_start < k.period THEN k.period
                          ELSE period_start END
    WHERE id = k.token RETURNING spend_limit, period_start, period_spent + period_reserved INTO lim, kstart, used;
    IF FOUND THEN
      keys := keys || jsonb_build_object(k.token::text, jsonb_build_array(lim, kstart, used));
    END IF;
  END LOOP;
  -- First come, first served.
  FOR i IN SELECT e, n FROM jsonb_array_elements(batch) WITH ORDINALITY AS x(e, n) ORDER BY n LOOP
    acct := i.e->>'a';
    tok := i.e->>'t';
    amount := (i.e->>'n')::bigint;
    IF NOT (balances ? acct) OR NOT (keys ? tok) THEN
      results := results || '[[false, "balance", 0]]'::jsonb;
      CONTINUE;
    END IF;
    avail := (balances->>acct)::bigint - coalesce((held->>acct)::bigint, 0);
    IF amount > avail THEN
      results := results || jsonb_build_array(jsonb_build_array(false, 'balance', greatest(0, avail)));
      CONTINUE;
    END IF;
    lim := (keys->tok->>0)::bigint;
    IF lim IS NOT NULL THEN
      room := lim - (keys->tok->>2)::bigint - coalesce((key_held->>tok)::bigint, 0);
      IF amount > room THEN
        results := results || jsonb_build_array(jsonb_build_array(false, 'key_limit', greatest(0, room)));
        CONTINUE;
      END IF;
    END IF;
    held := held || jsonb_build_object(acct, coalesce((held->>acct)::bigint, 0) + amount);
    key_held := key_held || jsonb_build_object(tok, coalesce((key_held->>tok)::bigint, 0) + amount);
    results := results || '[[true, null, 0]]'::jsonb;
    INSERT INTO reservations (request_id, token_id, account_id, amount, period_start, owner, created_at)
      VALUES (i.e->>'r', tok::int, acct::int, amount, (keys->tok->>1)::bigint, holder, created);
  END LOOP;
  FOR r IN SELECT key::int AS id, value::bigint AS total FROM jsonb_each_text(held) LOOP
    IF r.total <> 0 THEN
      UPDATE accounts SET balance = balance - r.total, reserved = reserved + r.total WHERE id = r.id;
    END IF;
  END LOOP;
  FOR r IN SELECT key::int AS id, value::bigint AS total FROM jsonb_each_text(key_held) LOOP
    IF r.total <> 0 THEN
      UPDATE api_tokens SET period_reserved = period_reserved + r.total WHERE id = r.id;
    END IF;
  END LOOP;
  RETURN results;
END
$fn$
"""

# Settlements first (they free credits), then reservations, as store/sql.py `_run` orders a batch. Not durable:
# the commit returns before the WAL reaches the disk (synchronous_commit off for this transaction only), as the
# SQLite default (WAL, synchronous=NORMAL) does; a crash of PostgreSQL itself may lose the last ~3 x
# wal_writer_delay of batches, whole (docs/operations.md says what that gives away).
COMMIT = """
CREATE OR REPLACE FUNCTION grokgate_commit(settles jsonb, holds jsonb, holder text, created bigint, today text,
                                           durable boolean) RETURNS jsonb
LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
BEGIN
  IF NOT durable THEN
    PERFORM set_config('synchronous_commit', 'off', true);
  END IF;
  RETURN jsonb_build_object(
    's', CASE WHEN jsonb_array_length(settles) > 0 THEN grokgate_settle(settles, created, today) END,
    'r', grokgate_reserve(holds, holder, created));
END
$fn$
"""


# The reservations table is a queue (a row per request in flight, deleted at settlement): vacuumed by row count,
# not as a fraction of its few live rows, so dead rows do not pile up between autovacuum's visits.
CHURN = ("ALTER TABLE reservations SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, "
         "autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000)")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for ddl in (SETTLE, RESERVE, COMMIT, CHURN):
        op.execute(ddl)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE reservations RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, "
               "autovacuum_vacuum_insert_scale_factor, autovacuum_vacuum_insert_threshold)")
    op.execute("DROP FUNCTION IF EXISTS grokgate_commit(jsonb, jsonb, text, bigint, text, boolean)")
    op.execute("DROP FUNCTION IF EXISTS grokgate_reserve(jsonb, text, bigint)")
    op.execute("DROP FUNCTION IF EXISTS grokgate_settle(jsonb, bigint, text)")
