"""Token ids that are never reused; the deployment's own id.

SQLite gives a new row the highest rowid + 1 unless its table is AUTOINCREMENT, so the id of the last token deleted
came back for the next token created, and with it everything keyed by that id (its ledger, daily usage, cached
answers, limits: core/tenancy.py). `api_tokens` is rebuilt AUTOINCREMENT with every id kept, and its sequence is set
to the highest token id anything holds, so an id deleted before this upgrade is not handed out again either.
PostgreSQL's serial sequence never goes back; it is only moved past any id the tables hold, should one be there that
the sequence did not hand out (a restore, a manual insert).

`deployment`: one row holding a random id made here. Replicas of one database share it and two databases never do,
so deployments sharing one Redis keep their keys apart by it (store/deployment.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-15
"""

import secrets
import time

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ID_MAX = 2**31 - 1  # token ids are int4 (core/accounts.py ID_MAX): anything larger is not a token's id
_TOKEN_COLUMNS = ("id, name, prefix, token_hash, created_at, expires_at, disabled, allowed_models, rpm, tpm, "
                  "max_concurrency, balance, reserved")
_REBUILT = "_api_tokens_0004"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        # pysqlite opens a transaction at the first INSERT/UPDATE/DELETE only, and runs DDL before it on its own:
        # this write opens it first, so the whole rebuild commits with the new revision or not at all.
        op.execute("UPDATE alembic_version SET version_num = version_num")
    op.create_table(
        "deployment",
        # One row: the primary key can only be 1.
        sa.Column("singleton", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.CheckConstraint("singleton = 1", name="ck_deployment_singleton"),
    )
    op.execute(sa.text("INSERT INTO deployment (singleton, id, created_at) VALUES (1, :id, :at)").bindparams(
        id=_new_deployment_id(), at=_now_ms()))
    highest = _highest_token_id(dialect)
    if dialect == "sqlite":
        _rebuild_autoincrement(highest)
    elif dialect == "postgresql" and highest:
        _move_sequence_past(highest)


def downgrade() -> None:
    # api_tokens stays AUTOINCREMENT: 0003 works the same on it, and ids must not come back after a downgrade either.
    op.drop_table("deployment")


def _new_deployment_id() -> str:
    return secrets.token_hex(8)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _highest_token_id(dialect: str) -> int:
    """The highest token id anything holds: tokens, their ledger and daily usage (kept when a token is deleted),
    reservations, stored responses (owner `token:<id>`) and, after an earlier rebuild, SQLite's own sequence."""
    if dialect == "postgresql":
        owner_id = ("SELECT MAX(CAST(substr(owner, 7) AS BIGINT)) FROM responses "
                    "WHERE owner ~ '^token:[0-9]{1,10}$'")
    else:
        owner_id = ("SELECT MAX(CAST(substr(owner, 7) AS INTEGER)) FROM responses "
                    "WHERE owner GLOB 'token:[0-9]*' AND length(owner) <= 16 AND substr(owner, 7) NOT GLOB '*[^0-9]*'")
    queries = [
        "SELECT MAX(id) FROM api_tokens",
        "SELECT MAX(token_id) FROM ledger WHERE token_id <= :top",
        "SELECT MAX(token_id) FROM usage_daily WHERE token_id <= :top",
        "SELECT MAX(token_id) FROM reservations",
        owner_id,
    ]
    bind = op.get_bind()
    if dialect == "sqlite" and bind.execute(sa.text(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'")).first():
        queries.append("SELECT MAX(seq) FROM sqlite_sequence WHERE name = 'api_tokens'")
    found = [bind.execute(sa.text(q).bindparams(top=ID_MAX) if ":top" in q else sa.text(q)).scalar() for q in queries]
    return max([int(v) for v in found if v is not None and int(v) <= ID_MAX] or [0])


def _move_sequence_past(highest: int) -> None:
    """PostgreSQL: the next token id is past `highest`; the sequence only ever moves forward."""
    bind = op.get_bind()
    sequence = bind.execute(sa.text("SELECT pg_get_serial_sequence('api_tokens', 'id')")).scalar()
    if sequence is None:
        return
    last, called = bind.execute(sa.text(f"SELECT last_value, is_called FROM {sequence}")).one()
    if last < highest or (last == highest and not called):
        bind.execute(sa.text("SELECT setval(:sequence, :n)").bindparams(sequence=sequence, n=highest))  # next: n + 1


def _rebuild_autoincrement(highest: int) -> None:
    """api_tokens again as 0001 made it, AUTOINCREMENT, every row and id kept. Its reservations are set aside
    meanwhile: with foreign keys on, dropping the old table would delete them (ON DELETE CASCADE)."""
    op.create_table(
        _REBUILT,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=True),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("allowed_models", sa.JSON, nullable=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.Integer, nullable=True),
        sa.Column("max_concurrency", sa.Integer, nullable=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False),
        sa.CheckConstraint("balance >= 0", name="ck_api_tokens_balance_nonnegative"),
        sa.CheckConstraint("reserved >= 0", name="ck_api_tokens_reserved_nonnegative"),
        sqlite_autoincrement=True,
    )
    op.execute(f"INSERT INTO {_REBUILT} ({_TOKEN_COLUMNS}) SELECT {_TOKEN_COLUMNS} FROM api_tokens")
    op.execute("CREATE TEMP TABLE _reservations_0004 AS SELECT * FROM reservations")
    op.execute("DELETE FROM reservations")
    op.drop_table("api_tokens")
    op.rename_table(_REBUILT, "api_tokens")  # reservations' foreign key names api_tokens: it finds the new table
    op.execute("INSERT INTO reservations SELECT * FROM _reservations_0004 "
               "WHERE token_id IN (SELECT id FROM api_tokens)")
    op.execute("DROP TABLE _reservations_0004")
    # The copy left the sequence at the highest id copied (or none for no rows); it must be past every id used.
    op.execute("DELETE FROM sqlite_sequence WHERE name = 'api_tokens'")
    op.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('api_tokens', :n)").bindparams(n=highest))
