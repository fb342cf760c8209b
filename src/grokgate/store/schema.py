"""Tables of the account store. Money columns are BigInteger micro-credits; times are epoch milliseconds
(except the heartbeats of `instances`, which are the database's own timestamps)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# The customers (migration 0006): an account holds the balance its keys spend from, and may limit the rate of all
# its keys together. AUTOINCREMENT, as api_tokens: the account is the tenant (core/tenancy.py), and its id is never
# reused. Every token that existed before 0006 became the account of the same id, with one key: that token.
accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_concurrency", Integer, nullable=True),
    # Available credits; what reservations hold has already been moved to `reserved`.
    Column("balance", BigInteger, nullable=False, default=0),
    Column("reserved", BigInteger, nullable=False, default=0),
    CheckConstraint("balance >= 0", name="ck_accounts_balance_nonnegative"),
    CheckConstraint("reserved >= 0", name="ck_accounts_reserved_nonnegative"),
    sqlite_autoincrement=True,
)

# AUTOINCREMENT (migration 0004): SQLite never hands a deleted token's id to a new one, as PostgreSQL's sequence never
# does; everything a token leaves behind is keyed by its id (core/tenancy.py).
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("prefix", String(32), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("allowed_models", JSON, nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_concurrency", Integer, nullable=True),
    # Before 0006 a token held its own balance; since then its account does, and these two stay 0 (SQLite cannot
    # drop a column a CHECK names without rebuilding the table; an older replica reading them finds nothing to spend).
    Column("balance", BigInteger, nullable=False, default=0),
    Column("reserved", BigInteger, nullable=False, default=0),
    # The account it spends from (null only in a database 0006 has not migrated: SQLite cannot add NOT NULL).
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=True),
    # The key's own spending limit in micro-credits (null: none), reset each `limit_period` (daily | weekly |
    # monthly, UTC calendar; null: never), and its counters for the period starting at `period_start` (core/budgets.py).
    Column("spend_limit", BigInteger, nullable=True),
    Column("limit_period", String(8), nullable=True),
    Column("period_start", BigInteger, nullable=False, server_default="0"),
    Column("period_spent", BigInteger, nullable=False, server_default="0"),
    Column("period_reserved", BigInteger, nullable=False, server_default="0"),
    # Rotation: the secret before the current one, valid until `previous_valid_until` (ms).
    Column("previous_hash", String(64), nullable=True),
    Column("previous_valid_until", BigInteger, nullable=True),
    Column("rotated_at", BigInteger, nullable=True),
    Index("ix_api_tokens_account", "account_id"),
    Index("ix_api_tokens_previous_hash", "previous_hash", unique=True),
    CheckConstraint("balance >= 0", name="ck_api_tokens_balance_nonnegative"),
    CheckConstraint("reserved >= 0", name="ck_api_tokens_reserved_nonnegative"),
    sqlite_autoincrement=True,
)

# The deployment's identity (migration 0004 makes the one row, with a random id): shared by the replicas of one
# database, never by two databases, it keeps deployments apart in a shared Redis (store/deployment.py).
deployment = Table(
    "deployment",
    metadata,
    Column("singleton", Integer, primary_key=True, autoincrement=False),
    Column("id", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    CheckConstraint("singleton = 1", name="ck_deployment_singleton"),
)

prices = Table(
    "prices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("input", BigInteger, nullable=False),
    Column("cached_input", BigInteger, nullable=False),
    Column("output", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("model", "version", name="uq_prices_model_version"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("token_id", Integer, ForeignKey("api_tokens.id", ondelete="CASCADE"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("account_id", Integer, nullable=True),  # whose balance holds `amount` (0006)
    Column("period_start", BigInteger, nullable=False, server_default="0"),  # the key's period it counts in
    Column("owner", String(200), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# The serving instances of a shared database (PostgreSQL), each renewing its heartbeat; the living release
# the reservations of an instance whose heartbeat is too old. Times are the database's (now()), not the
# replicas' clocks.
instances = Table(
    "instances",
    metadata,
    Column("owner", String(200), primary_key=True),  # reservations.owner
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("token_id", Integer, nullable=True),  # null: a bootstrap admin token, or a top-up of an account
    Column("account_id", Integer, nullable=True),  # the balance it moved (0006); null: a bootstrap admin token
    Column("kind", String(16), nullable=False),  # usage | topup
    Column("model", String(200), nullable=True),
    Column("backend", String(100), nullable=True),
    # The API a usage row's request came through: chat | responses (null: a top-up). The server default keeps
    # what an older replica writes during a rolling upgrade (it knows only chat) right.
    Column("endpoint", String(16), nullable=True, server_default="chat"),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("reasoning_tokens", Integer, nullable=False, default=0),
    Column("server_tool_calls", Integer, nullable=False, default=0, server_default="0"),  # priced per call
    # Signed balance movement: negative for usage, positive for top-ups.
    Column("amount", BigInteger, nullable=False),
    Column("cost", BigInteger, nullable=False, default=0),
    Column("price_version", Integer, nullable=True),
    Column("status", String(32), nullable=False),
    Column("estimated", Boolean, nullable=False, default=False),
    Column("duration_ms", Integer, nullable=True),
    # What the upstream said the request cost it (xAI's cost_in_usd_ticks; 1 USD = 1e10 ticks); null: not reported.
    Column("upstream_cost_ticks", BigInteger, nullable=True),
    Column("note", String(500), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_ledger_token_created", "token_id", "created_at"),
    Index("ix_ledger_account_created", "account_id", "created_at"),
    Index("ix_ledger_created", "created_at"),
)

usage_daily = Table(
    "usage_daily",
    metadata,
    Column("day", String(10), primary_key=True),
    Column("token_id", Integer, primary_key=True),  # 0 for bootstrap admin tokens
    Column("model", String(200), primary_key=True),
    Column("account_id", Integer, nullable=False, server_default="0"),  # the token's account (0006); 0: none
    Column("requests", BigInteger, nullable=False, default=0),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("cost", BigInteger, nullable=False, default=0),
    # The requests whose upstream reported its own cost (xAI's cost_in_usd_ticks): how many, that cost in ticks, and
    # what grokgate charged for those same requests, so a drift report compares like with like.
    Column("upstream_requests", BigInteger, nullable=False, server_default="0"),
    Column("upstream_cost_ticks", BigInteger, nullable=False, server_default="0"),
    Column("upstream_charged", BigInteger, nullable=False, server_default="0"),
)

# Stored responses of the Responses API (core/responses.py, store/responses_sql.py): scoped by `owner` on every
# read, purged after `expires_at`. `size` (bytes of JSON) and `item_count` (input + output items) let a
# `previous_response_id` chain be bounded by a walk over these columns alone, before any JSON is read.
responses = Table(
    "responses",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("previous_id", String(100), nullable=True),
    # JSON text as orjson writes it (UTF-8): serialized once, and `size` is its length in bytes.
    Column("input_items", Text, nullable=False),
    Column("response", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("item_count", Integer, nullable=False),
    Index("ix_responses_expires", "expires_at"),
)
